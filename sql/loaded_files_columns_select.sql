-- The columns loaded_files has (its late-data columns arrived after the table did).
SELECT column_name
FROM information_schema.columns
WHERE table_name = 'loaded_files'
