-- Per tutor and day: all sessions, sessions the tutor rescheduled (whatever their final
-- status), and no-shows, by the sessions' original scheduled time, for the sessions with
-- $start <= scheduled_time < $end; and each tutor's first activity day before $end.
--
-- A "day" is the 24 hours starting $day_offset after midnight UTC (on the UTC clock, whatever
-- the connection's TimeZone), so that the windows of an as-of instant T cover whole days:
-- daily partitions use offset 0 (T is midnight), the hourly snapshot uses T's time of day.
--
-- One pass over the sessions view gives both: the sessions before $start are grouped into
-- one row per tutor with a null activity_date, which only carries first_activity_date.
WITH tutor_moved AS (
    SELECT DISTINCT session_id
    FROM reschedules
    WHERE initiator = 'tutor'
),
scheduled AS (
    SELECT
        s.tutor_id,
        s.scheduled_time,
        CASE
            WHEN s.scheduled_time >= $start
                THEN CAST(timezone('UTC', s.scheduled_time) - $day_offset AS DATE)
        END AS activity_date,
        m.session_id IS NOT NULL AS moved_by_tutor,
        s.status = 'no_show' AS no_show
    FROM sessions AS s
    LEFT JOIN tutor_moved AS m USING (session_id)
    WHERE s.scheduled_time < $end
)
SELECT
    tutor_id,
    activity_date,
    CAST(timezone('UTC', min(scheduled_time)) - $day_offset AS DATE) AS first_activity_date,
    count(*) AS sessions,
    count(*) FILTER (WHERE moved_by_tutor) AS tutor_reschedules,
    count(*) FILTER (WHERE no_show) AS no_shows
FROM scheduled
GROUP BY tutor_id, activity_date
ORDER BY tutor_id, activity_date NULLS FIRST
