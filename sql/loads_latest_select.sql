-- The newest load of the warehouse (0: none) among those up to $upto, and a fingerprint of
-- every load up to it (count, XOR of hashes of their files and ids): a delta publish builds
-- on an earlier publish's loads only if this warehouse still has exactly those.
SELECT coalesce(max(load_id), 0) AS load_id,
       count(*) AS loads,
       CAST(coalesce(bit_xor(hash(file_hash || ':' || CAST(load_id AS VARCHAR))), 0) AS VARCHAR)
           AS fingerprint
FROM loaded_files
WHERE load_id <= $upto
