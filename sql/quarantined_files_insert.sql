-- Record a file that could not be loaded at all, and why.
INSERT INTO quarantined_files (file_hash, file_name, quarantined_at, reason)
VALUES ($file_hash, $file_name, $at, $reason)
