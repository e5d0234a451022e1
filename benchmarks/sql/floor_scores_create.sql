-- The floor: DuckDB alone, from the drops' Parquet files to every tutor's windowed counts on
-- every day (no validation, no Dagster, no warehouse tables, no publishing). The current row
-- of a session is its latest export (updated_at, then drop order = file name, then row), as in
-- the warehouse's views; day D's windows hold the sessions with D + 1 - W days <= scheduled
-- day <= D (UTC), i.e. the snapshot as of the end of D; a tutor is scored from their first
-- session's day on.
CREATE OR REPLACE TABLE floor_scores AS
WITH sessions AS (
    SELECT session_id, tutor_id, scheduled_time, status
    FROM read_parquet($sessions, filename = true, file_row_number = true)
    QUALIFY row_number() OVER (
        PARTITION BY session_id
        ORDER BY updated_at DESC NULLS LAST, filename DESC, file_row_number DESC
    ) = 1
),
reschedules AS (
    SELECT session_id, initiator
    FROM read_parquet($reschedules, filename = true, file_row_number = true)
    QUALIFY row_number() OVER (
        PARTITION BY session_id, cancelled_at
        ORDER BY created_at DESC NULLS LAST, filename DESC, file_row_number DESC
    ) = 1
),
tutor_moved AS (
    SELECT DISTINCT session_id FROM reschedules WHERE initiator = 'tutor'
),
daily AS (
    SELECT
        s.tutor_id,
        CAST(s.scheduled_time AS DATE) AS day,
        count(*) AS sessions,
        count(m.session_id) AS tutor_reschedules,
        count(*) FILTER (WHERE s.status = 'no_show') AS no_shows
    FROM sessions AS s
    LEFT JOIN tutor_moved AS m USING (session_id)
    WHERE CAST(s.scheduled_time AS DATE) <= $last_day
    GROUP BY ALL
),
grid AS (
    SELECT
        tutor_id,
        CAST(unnest(generate_series(min(day), $last_day, INTERVAL 1 DAY)) AS DATE) AS day
    FROM daily
    GROUP BY tutor_id
),
filled AS (
    SELECT
        g.tutor_id,
        g.day,
        coalesce(d.sessions, 0) AS sessions,
        coalesce(d.tutor_reschedules, 0) AS tutor_reschedules,
        coalesce(d.no_shows, 0) AS no_shows
    FROM grid AS g
    LEFT JOIN daily AS d USING (tutor_id, day)
)
SELECT
    tutor_id,
    day,
    sum(sessions) OVER w7 AS total_sessions_7d,
    sum(tutor_reschedules) OVER w7 AS tutor_reschedules_7d,
    sum(no_shows) OVER w7 AS no_shows_7d,
    sum(sessions) OVER w30 AS total_sessions_30d,
    sum(tutor_reschedules) OVER w30 AS tutor_reschedules_30d,
    sum(no_shows) OVER w30 AS no_shows_30d,
    sum(sessions) OVER w90 AS total_sessions_90d,
    sum(tutor_reschedules) OVER w90 AS tutor_reschedules_90d,
    sum(no_shows) OVER w90 AS no_shows_90d
FROM filled
WINDOW
    w7 AS (PARTITION BY tutor_id ORDER BY day ROWS 6 PRECEDING),
    w30 AS (PARTITION BY tutor_id ORDER BY day ROWS 29 PRECEDING),
    w90 AS (PARTITION BY tutor_id ORDER BY day ROWS 89 PRECEDING)
QUALIFY day >= $first_day
