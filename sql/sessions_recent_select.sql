-- Current sessions scheduled from $since on, as published to the serving store.
SELECT session_id, tutor_id, student_id, scheduled_time, completed_time, status,
       duration_minutes, created_at, updated_at
FROM sessions
WHERE scheduled_time >= $since
ORDER BY session_id
