-- The current state of each entity: the latest export of a row wins, by updated_at (or
-- created_at) and then by drop order (load_id, then line within the file).
CREATE OR REPLACE VIEW sessions AS
SELECT * EXCLUDE (extra_columns)
FROM raw_sessions
QUALIFY row_number() OVER (
    PARTITION BY session_id
    ORDER BY updated_at DESC NULLS LAST, load_id DESC, source_line DESC
) = 1;

CREATE OR REPLACE VIEW reschedules AS
SELECT * EXCLUDE (extra_columns, hours_before_session),
       coalesce(
           hours_before_session,
           epoch(original_time - cancelled_at) / 3600.0
       ) AS hours_before_session
FROM raw_reschedules
QUALIFY row_number() OVER (
    PARTITION BY session_id, cancelled_at
    ORDER BY created_at DESC NULLS LAST, load_id DESC, source_line DESC
) = 1;

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
