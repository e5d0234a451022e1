-- One row per session scheduled in [$start, $end), in no order: the per-session events that
-- risk tiers and their drivers read (risk_tiers.py, drivers.py). Tiers sort them by their
-- integer keys, faster than this ORDER BY of strings; drivers only sum them.
--
-- moved_by_tutor follows the Scores contract (a tutor-initiated reschedule, whatever the
-- session's final status). A session the tutor moved more than once is described by its
-- first move (earliest cancelled_at): its reason code and notice in hours, NULL when unknown.
WITH tutor_moves AS (
    SELECT
        session_id,
        arg_min_null(reason_code, cancelled_at) AS reason_code,
        arg_min_null(hours_before_session, cancelled_at) AS notice_hours
    FROM reschedules
    WHERE initiator = 'tutor'
    GROUP BY session_id
)
SELECT
    s.tutor_id,
    s.session_id,
    s.scheduled_time,
    m.session_id IS NOT NULL AS moved_by_tutor,
    s.status = 'no_show' AS no_show,
    m.reason_code,
    m.notice_hours
FROM sessions AS s
LEFT JOIN tutor_moves AS m USING (session_id)
WHERE s.scheduled_time >= $start AND s.scheduled_time < $end
