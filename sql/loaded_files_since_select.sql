-- Files loaded since a point in time (for the digest's data-quality notes).
SELECT file_name, entity, loaded_at, rows_read, rows_loaded, rows_rejected
FROM loaded_files
WHERE loaded_at >= $since
ORDER BY load_id
