-- The latest export of each session among the loads $after < load_id <= $upto, unless the
-- current table still holds a later one (sessions_current_delete.sql ran first). The latest
-- rows are picked on their keys alone, then read whole: a rebuild ranks 10 million rows.
INSERT INTO sessions_current BY NAME
SELECT r.* EXCLUDE (extra_columns)
FROM raw_sessions AS r
SEMI JOIN (
    SELECT load_id, source_line
    FROM raw_sessions
    WHERE load_id > $after AND load_id <= $upto
    QUALIFY row_number() OVER (
        PARTITION BY session_id
        ORDER BY updated_at DESC NULLS LAST, load_id DESC, source_line DESC
    ) = 1
) AS latest USING (load_id, source_line)
ANTI JOIN sessions_current AS c USING (session_id)
WHERE r.load_id > $after AND r.load_id <= $upto
