-- Every export, in any load, of the sessions that loads after $after hold a session or
-- reschedule row of: its tutor and scheduled time. Scores made before those loads may count
-- that tutor differently in any window holding that time (a later export may move a session
-- to another tutor or another time, so every version counts).
WITH changed AS (
    SELECT session_id FROM raw_sessions WHERE load_id > $after
    UNION
    SELECT session_id FROM raw_reschedules WHERE load_id > $after
)
SELECT DISTINCT s.tutor_id, s.scheduled_time
FROM raw_sessions AS s
SEMI JOIN changed USING (session_id)
WHERE s.tutor_id IS NOT NULL AND s.scheduled_time IS NOT NULL
