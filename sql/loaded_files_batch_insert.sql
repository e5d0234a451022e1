-- Record the files of a load (the registered frame incoming_files, one row per file), inside
-- the transaction that loads their rows.
INSERT INTO loaded_files BY NAME
SELECT * FROM incoming_files
