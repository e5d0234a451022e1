-- Per tutor and day: all sessions, sessions the tutor rescheduled (whatever their final
-- status), and no-shows, by the sessions' original scheduled time, for the sessions with
-- $start <= scheduled_time < $end; and each tutor's first activity day before $end.
--
-- A "day" is the 24 hours starting $day_offset after midnight UTC (on the UTC clock, whatever
-- the connection's TimeZone: make_timestamp(epoch_us(...)) is the instant's UTC wall clock,
-- without a time zone lookup per row), so that the windows of an as-of instant T cover whole
-- days: daily partitions use offset 0 (T is midnight), the hourly snapshot uses T's time of day.
--
-- The sessions before $start only tell when a tutor was first active: one row per tutor with
-- a null activity_date and null counts, which only carries first_activity_date (so a late
-- chunk of a long range joins and groups its own days only).
WITH tutor_moved AS (
    SELECT DISTINCT session_id
    FROM reschedules
    WHERE initiator = 'tutor'
),
scheduled AS (
    SELECT
        s.tutor_id,
        CAST(make_timestamp(epoch_us(s.scheduled_time)) - $day_offset AS DATE) AS activity_date,
        m.session_id IS NOT NULL AS moved_by_tutor,
        s.status = 'no_show' AS no_show
    FROM sessions AS s
    LEFT JOIN tutor_moved AS m USING (session_id)
    WHERE s.scheduled_time >= $start AND s.scheduled_time < $end
),
daily AS (
    SELECT
        tutor_id,
        activity_date,
        activity_date AS first_activity_date,
        count(*) AS sessions,
        count(*) FILTER (WHERE moved_by_tutor) AS tutor_reschedules,
        count(*) FILTER (WHERE no_show) AS no_shows
    FROM scheduled
    GROUP BY tutor_id, activity_date
),
earlier AS (
    SELECT
        tutor_id,
        CAST(NULL AS DATE) AS activity_date,
        CAST(make_timestamp(epoch_us(min(scheduled_time))) - $day_offset AS DATE)
            AS first_activity_date,
        CAST(NULL AS BIGINT) AS sessions,
        CAST(NULL AS BIGINT) AS tutor_reschedules,
        CAST(NULL AS BIGINT) AS no_shows
    FROM sessions
    WHERE scheduled_time < $start
    GROUP BY tutor_id
)
SELECT * FROM daily
UNION ALL
SELECT * FROM earlier
ORDER BY tutor_id, activity_date NULLS FIRST
