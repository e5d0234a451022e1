-- Record a loaded file, inside the transaction that loads its rows.
INSERT INTO loaded_files (
    file_hash, load_id, entity, file_name, loaded_at,
    rows_read, rows_loaded, rows_rejected, min_scheduled_time, max_scheduled_time
)
VALUES (
    $file_hash, $load_id, $entity, $file_name, $loaded_at,
    $rows_read, $rows_loaded, $rows_rejected, $min_scheduled_time, $max_scheduled_time
)
