-- Files loaded after load $after, with the range of scheduled times their rows touched: the
-- times a file's own rows carry (recorded when it was loaded), widened by every export of the
-- sessions it touched. A later export may move a session (its earlier day goes stale too), and
-- a reschedule's day is its session's, whether or not it gives an original_time.
WITH new_loads AS (
    SELECT load_id, entity, min_scheduled_time, max_scheduled_time
    FROM loaded_files
    WHERE load_id > $after
),
touched AS (
    SELECT load_id, session_id FROM raw_sessions WHERE load_id > $after
    UNION
    SELECT load_id, session_id FROM raw_reschedules WHERE load_id > $after
),
session_times AS (
    SELECT t.load_id, min(s.scheduled_time) AS low, max(s.scheduled_time) AS high
    FROM touched AS t
    JOIN raw_sessions AS s USING (session_id)
    GROUP BY t.load_id
)
SELECT
    n.load_id,
    n.entity,
    least(n.min_scheduled_time, st.low) AS min_scheduled_time,
    greatest(n.max_scheduled_time, st.high) AS max_scheduled_time
FROM new_loads AS n
LEFT JOIN session_times AS st USING (load_id)
ORDER BY n.load_id
