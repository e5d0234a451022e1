-- The next $files load ids, in ascending order (one per file of a load, in drop order).
SELECT nextval('load_ids') AS load_id
FROM range($files)
ORDER BY load_id
