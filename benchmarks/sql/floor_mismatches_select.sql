-- Rows where the floor and the pipeline's stored daily snapshots (the attached warehouse
-- `pipeline`) disagree: a (tutor, day) only one of them has, or any windowed count differing.
-- Day D of the floor is the pipeline's snapshot as of D + 1 day, 00:00 UTC.
WITH pipeline AS (
    SELECT
        tutor_id,
        CAST(as_of AS DATE) - 1 AS day,
        total_sessions_7d, tutor_reschedules_7d, no_shows_7d,
        total_sessions_30d, tutor_reschedules_30d, no_shows_30d,
        total_sessions_90d, tutor_reschedules_90d, no_shows_90d
    FROM pipeline.tutor_scores_daily
    WHERE as_of >= CAST($first_day AS TIMESTAMPTZ) + INTERVAL 1 DAY
      AND as_of <= CAST($last_day AS TIMESTAMPTZ) + INTERVAL 1 DAY
)
SELECT
    count(*) FILTER (WHERE p.tutor_id IS NULL) AS only_in_floor,
    count(*) FILTER (WHERE f.tutor_id IS NULL) AS only_in_pipeline,
    count(*) FILTER (
        WHERE f.tutor_id IS NOT NULL AND p.tutor_id IS NOT NULL
          AND (f.total_sessions_7d, f.tutor_reschedules_7d, f.no_shows_7d,
               f.total_sessions_30d, f.tutor_reschedules_30d, f.no_shows_30d,
               f.total_sessions_90d, f.tutor_reschedules_90d, f.no_shows_90d)
              IS DISTINCT FROM
              (p.total_sessions_7d, p.tutor_reschedules_7d, p.no_shows_7d,
               p.total_sessions_30d, p.tutor_reschedules_30d, p.no_shows_30d,
               p.total_sessions_90d, p.tutor_reschedules_90d, p.no_shows_90d)
    ) AS counts_differ,
    count(*) FILTER (WHERE f.tutor_id IS NOT NULL AND p.tutor_id IS NOT NULL) AS compared
FROM floor_scores AS f
FULL JOIN pipeline AS p USING (tutor_id, day)
