-- One row per session scheduled in [$start, $end) with whether its tutor moved it: the only
-- columns risk tiers read (risk_tiers.py), a narrow twin of risk_session_events_select.sql.
-- In no order: sorting 10M rows here costs more than sorting their integer keys in Python.
--
-- moved_by_tutor follows the Scores contract, as there: the session has a tutor-initiated
-- reschedule, whatever its final status.
WITH tutor_moved AS (
    SELECT DISTINCT session_id
    FROM reschedules
    WHERE initiator = 'tutor'
)
SELECT
    s.tutor_id,
    s.session_id,
    s.scheduled_time,
    m.session_id IS NOT NULL AS moved_by_tutor
FROM sessions AS s
LEFT JOIN tutor_moved AS m USING (session_id)
WHERE s.scheduled_time >= $start AND s.scheduled_time < $end
