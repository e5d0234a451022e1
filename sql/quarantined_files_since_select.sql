-- Files quarantined since a point in time, with the reason.
SELECT file_name, reason, quarantined_at
FROM quarantined_files
WHERE quarantined_at >= $since
ORDER BY quarantined_at, file_name
