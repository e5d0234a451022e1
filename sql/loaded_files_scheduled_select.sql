-- Files loaded after load $after, with the range of scheduled times their rows touched.
SELECT load_id, entity, min_scheduled_time, max_scheduled_time
FROM loaded_files
WHERE load_id > $after
ORDER BY load_id
