-- The load of a file with these bytes, if any (the same bytes load once).
SELECT load_id, file_name, loaded_at
FROM loaded_files
WHERE file_hash = ?
