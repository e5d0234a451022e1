-- Current reschedules whose latest export came in a load after $after, of sessions scheduled
-- from $since on, for a delta publish.
SELECT r.session_id, r.cancelled_at, r.initiator, r.original_time, r.new_time, r.reason,
       r.reason_code, r.hours_before_session, r.created_at
FROM reschedules AS r
SEMI JOIN sessions AS s ON s.session_id = r.session_id AND s.scheduled_time >= $since
WHERE r.load_id > $after
ORDER BY r.session_id, r.cancelled_at
