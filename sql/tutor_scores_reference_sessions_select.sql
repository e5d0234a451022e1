-- Sessions the score checks count, one row each (no day buckets): those scheduled in
-- [$earliest, $latest), as the tutor's rank in the registered frame reference_tutors
-- (tutor_id, tutor_rank), the exact scheduled instant in microseconds since the epoch (UTC),
-- whether the tutor rescheduled the session (whatever its final status), and whether it was a
-- no-show. Unordered: the caller sorts what it searches.
WITH tutor_moved AS (
    SELECT DISTINCT session_id
    FROM reschedules
    WHERE initiator = 'tutor'
)
SELECT
    t.tutor_rank,
    epoch_us(s.scheduled_time) AS scheduled_us,
    m.session_id IS NOT NULL AS moved_by_tutor,
    s.status = 'no_show' AS no_show
FROM sessions AS s
JOIN reference_tutors AS t USING (tutor_id)
LEFT JOIN tutor_moved AS m USING (session_id)
WHERE s.scheduled_time >= $earliest AND s.scheduled_time < $latest
