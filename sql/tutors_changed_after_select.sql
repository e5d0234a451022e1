-- Tutors whose counts loads after $after may have changed: the tutor of every export of a
-- session that those loads hold a session or reschedule row of (a later export may move a
-- session to another tutor, so both tutors count). Sorted.
WITH changed AS (
    SELECT session_id FROM raw_sessions WHERE load_id > $after
    UNION
    SELECT session_id FROM raw_reschedules WHERE load_id > $after
)
SELECT DISTINCT s.tutor_id
FROM raw_sessions AS s
SEMI JOIN changed USING (session_id)
WHERE s.tutor_id IS NOT NULL
ORDER BY s.tutor_id
