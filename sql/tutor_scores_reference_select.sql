-- Reference counts for the score checks, computed without the daily activity: no day
-- buckets, only instants. For every tutor with a session scheduled before an as-of instant T
-- (one of $instants, which lie whole days apart) and every window W of 7, 30 and 90 days: the
-- sessions with T - W <= scheduled_time < T, as C(T) - C(T - W), where C(t) counts the
-- tutor's sessions scheduled before t; likewise those the tutor rescheduled, and no-shows.
--
-- C is taken on a grid of instants one day apart, from $earliest (the first instant less 90
-- days) to $latest (the last instant), so C(T - W) is W grid steps before C(T). Sessions
-- before $earliest only tell when a tutor was first seen (so only those from $earliest on are
-- grouped by instant: a short range reads a short span of sessions).
WITH tutor_moved AS (
    SELECT DISTINCT session_id
    FROM reschedules
    WHERE initiator = 'tutor'
),
per_instant AS MATERIALIZED (
    -- Sessions per tutor and scheduled instant (several may share one) from $earliest on:
    -- only these are counted; earlier ones only tell when a tutor was first seen.
    SELECT
        s.tutor_id,
        s.scheduled_time,
        count(*) AS sessions,
        count(m.session_id) AS tutor_reschedules,
        count(*) FILTER (WHERE s.status = 'no_show') AS no_shows
    FROM sessions AS s
    LEFT JOIN tutor_moved AS m USING (session_id)
    WHERE s.scheduled_time >= $earliest AND s.scheduled_time < $latest
    GROUP BY s.tutor_id, s.scheduled_time
),
running AS (
    -- Per tutor, the counts of sessions scheduled from $earliest up to each instant.
    SELECT
        tutor_id,
        scheduled_time,
        sum(sessions) OVER tutor_so_far AS sessions,
        sum(tutor_reschedules) OVER tutor_so_far AS tutor_reschedules,
        sum(no_shows) OVER tutor_so_far AS no_shows
    FROM per_instant
    WINDOW tutor_so_far AS (
        PARTITION BY tutor_id ORDER BY scheduled_time ROWS UNBOUNDED PRECEDING
    )
),
first_seen AS (
    SELECT tutor_id, min(scheduled_time) AS first_time
    FROM sessions
    WHERE scheduled_time < $latest
    GROUP BY tutor_id
),
grid AS (
    SELECT unnest(generate_series($earliest, $latest, INTERVAL 24 HOUR)) AS grid_time
),
counted AS (
    -- C(t) for every tutor and grid instant: the last running count strictly before t.
    SELECT
        g.tutor_id,
        g.grid_time,
        g.first_time,
        coalesce(r.sessions, 0) AS sessions,
        coalesce(r.tutor_reschedules, 0) AS tutor_reschedules,
        coalesce(r.no_shows, 0) AS no_shows
    FROM (SELECT * FROM first_seen CROSS JOIN grid) AS g
    ASOF LEFT JOIN running AS r
        ON g.tutor_id = r.tutor_id AND g.grid_time > r.scheduled_time
),
windowed AS (
    SELECT
        tutor_id,
        grid_time AS as_of,
        first_time,
        sessions - lag(sessions, 7) OVER grid_order AS total_sessions_7d,
        tutor_reschedules - lag(tutor_reschedules, 7) OVER grid_order AS tutor_reschedules_7d,
        no_shows - lag(no_shows, 7) OVER grid_order AS no_shows_7d,
        sessions - lag(sessions, 30) OVER grid_order AS total_sessions_30d,
        tutor_reschedules - lag(tutor_reschedules, 30) OVER grid_order AS tutor_reschedules_30d,
        no_shows - lag(no_shows, 30) OVER grid_order AS no_shows_30d,
        sessions - lag(sessions, 90) OVER grid_order AS total_sessions_90d,
        tutor_reschedules - lag(tutor_reschedules, 90) OVER grid_order AS tutor_reschedules_90d,
        no_shows - lag(no_shows, 90) OVER grid_order AS no_shows_90d
    FROM counted
    WINDOW grid_order AS (PARTITION BY tutor_id ORDER BY grid_time)
)
-- Every tutor seen before T is scored as of T.
SELECT * EXCLUDE (first_time)
FROM windowed
WHERE as_of IN (SELECT unnest(CAST($instants AS TIMESTAMPTZ[]))) AND first_time < as_of
ORDER BY as_of, tutor_id
