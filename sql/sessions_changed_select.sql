-- Current sessions whose latest export came in a load after $after, whatever their scheduled
-- time (a session moved out of the serving horizon leaves the store), for a delta publish.
SELECT session_id, tutor_id, student_id, scheduled_time, completed_time, status,
       duration_minutes, created_at, updated_at
FROM sessions
WHERE load_id > $after
ORDER BY session_id
