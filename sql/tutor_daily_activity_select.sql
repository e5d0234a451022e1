-- Per tutor and day: all sessions, sessions the tutor rescheduled (whatever their final
-- status), and no-shows, by the sessions' original scheduled time.
--
-- A "day" is the 24 hours starting $day_offset after midnight UTC, so that the windows of an
-- as-of instant T cover whole days: daily partitions use offset 0 (T is midnight), the hourly
-- snapshot uses T's time of day. Only sessions with $start <= scheduled_time < $end count.
WITH tutor_moved AS (
    SELECT DISTINCT session_id
    FROM reschedules
    WHERE initiator = 'tutor'
),
scheduled AS (
    SELECT
        s.tutor_id,
        CAST(s.scheduled_time - $day_offset AS DATE) AS activity_date,
        m.session_id IS NOT NULL AS moved_by_tutor,
        s.status = 'no_show' AS no_show
    FROM sessions AS s
    LEFT JOIN tutor_moved AS m USING (session_id)
    WHERE s.scheduled_time >= $start AND s.scheduled_time < $end
)
SELECT
    tutor_id,
    activity_date,
    count(*) AS sessions,
    count(*) FILTER (WHERE moved_by_tutor) AS tutor_reschedules,
    count(*) FILTER (WHERE no_show) AS no_shows
FROM scheduled
GROUP BY tutor_id, activity_date
ORDER BY tutor_id, activity_date
