-- The original system's way, one query per window for each session it processed: count the
-- tutor's sessions in the window, those the tutor rescheduled, and the no-shows, straight
-- from the serving store's sessions and reschedules.
SELECT
    count(*) AS total_sessions,
    count(moved.session_id) AS tutor_reschedules,
    count(*) FILTER (WHERE s.status = 'no_show') AS no_shows
FROM sessions AS s
LEFT JOIN LATERAL (
    SELECT r.session_id
    FROM reschedules AS r
    WHERE r.session_id = s.session_id AND r.initiator = 'tutor'
    LIMIT 1
) AS moved ON true
WHERE s.tutor_id = %(tutor_id)s
  AND s.scheduled_time >= %(start)s
  AND s.scheduled_time < %(end)s
