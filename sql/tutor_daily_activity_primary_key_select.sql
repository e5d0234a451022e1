-- Whether tutor_daily_activity still has the primary key of warehouses made before it was
-- dropped (rows are unique by construction; the key made every rebuild slow).
SELECT count(*) > 0
FROM duckdb_constraints()
WHERE table_name = 'tutor_daily_activity' AND constraint_type = 'PRIMARY KEY'
