-- The latest export of each reschedule among the loads $after < load_id <= $upto, unless the
-- current table still holds a later one (reschedules_current_delete.sql ran first). The
-- latest rows are picked on their keys alone, then read whole.
INSERT INTO reschedules_current BY NAME
SELECT r.* EXCLUDE (extra_columns)
FROM raw_reschedules AS r
SEMI JOIN (
    SELECT load_id, source_line
    FROM raw_reschedules
    WHERE load_id > $after AND load_id <= $upto
    QUALIFY row_number() OVER (
        PARTITION BY session_id, cancelled_at
        ORDER BY created_at DESC NULLS LAST, load_id DESC, source_line DESC
    ) = 1
) AS latest USING (load_id, source_line)
ANTI JOIN reschedules_current AS c
    ON c.session_id = r.session_id AND c.cancelled_at IS NOT DISTINCT FROM r.cancelled_at
WHERE r.load_id > $after AND r.load_id <= $upto
