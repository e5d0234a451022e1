-- Which of these hashes ($hashes, a list) were loaded already (the same bytes load once).
SELECT file_hash
FROM loaded_files
WHERE list_contains($hashes, file_hash)
