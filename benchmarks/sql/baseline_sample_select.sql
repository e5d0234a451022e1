-- A deterministic sample of the sessions the original system would have processed last: those
-- scheduled in the week before the snapshot's as-of instant.
SELECT session_id, tutor_id
FROM sessions
WHERE scheduled_time >= %(since)s AND scheduled_time < %(as_of)s
ORDER BY md5(session_id)
LIMIT %(sample)s
