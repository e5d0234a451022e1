-- The current state of each entity: the latest export of a row wins, by updated_at (or
-- created_at) and then by drop order (load_id, then line within the file).
--
-- sessions_current and reschedules_current hold that state as of the loads up to their
-- watermark in current_loads (ingest merges each pass's loads in: sessions_current_delete /
-- _insert.sql). Loads after the watermark (a pass that stopped before merging) are merged in
-- here on the fly, so the views are exact whatever the tables' watermark, and cost a scan of
-- the current table when nothing is pending.
CREATE OR REPLACE VIEW sessions AS
WITH pending AS (
    SELECT * EXCLUDE (extra_columns)
    FROM raw_sessions
    WHERE load_id > (
        SELECT coalesce(max(load_id), 0) FROM current_loads WHERE entity = 'sessions'
    )
)
SELECT c.* FROM sessions_current AS c ANTI JOIN pending AS p USING (session_id)
UNION ALL BY NAME
SELECT *
FROM (
    SELECT * FROM pending
    UNION ALL BY NAME
    SELECT c.* FROM sessions_current AS c SEMI JOIN pending AS p USING (session_id)
)
QUALIFY row_number() OVER (
    PARTITION BY session_id
    ORDER BY updated_at DESC NULLS LAST, load_id DESC, source_line DESC
) = 1;

CREATE OR REPLACE VIEW reschedules AS
WITH pending AS (
    SELECT * EXCLUDE (extra_columns)
    FROM raw_reschedules
    WHERE load_id > (
        SELECT coalesce(max(load_id), 0) FROM current_loads WHERE entity = 'reschedules'
    )
),
latest AS (
    SELECT c.*
    FROM reschedules_current AS c
    ANTI JOIN pending AS p
        ON p.session_id = c.session_id AND p.cancelled_at IS NOT DISTINCT FROM c.cancelled_at
    UNION ALL BY NAME
    SELECT *
    FROM (
        SELECT * FROM pending
        UNION ALL BY NAME
        SELECT c.*
        FROM reschedules_current AS c
        SEMI JOIN pending AS p
            ON p.session_id = c.session_id
            AND p.cancelled_at IS NOT DISTINCT FROM c.cancelled_at
    )
    QUALIFY row_number() OVER (
        PARTITION BY session_id, cancelled_at
        ORDER BY created_at DESC NULLS LAST, load_id DESC, source_line DESC
    ) = 1
)
SELECT * EXCLUDE (hours_before_session),
       coalesce(
           hours_before_session,
           epoch(original_time - cancelled_at) / 3600.0
       ) AS hours_before_session
FROM latest;

-- Tutors from the tutors exports, plus every tutor seen only in sessions (created with what
-- is known: the id, active).
CREATE OR REPLACE VIEW tutors AS
WITH exported AS (
    SELECT tutor_id, name, email, coalesce(is_active, true) AS is_active, updated_at
    FROM raw_tutors
    QUALIFY row_number() OVER (
        PARTITION BY tutor_id
        ORDER BY updated_at DESC NULLS LAST, load_id DESC, source_line DESC
    ) = 1
),
seen_in_sessions AS (
    SELECT DISTINCT tutor_id FROM sessions
)
SELECT tutor_id, name, email, is_active, updated_at, true AS in_tutors_export FROM exported
UNION ALL
SELECT s.tutor_id, NULL, NULL, true, NULL, false
FROM seen_in_sessions s ANTI JOIN exported e USING (tutor_id);
