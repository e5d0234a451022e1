-- The first day each tutor had a session scheduled before $end (days as in
-- tutor_daily_activity_select.sql): a snapshot scores every tutor seen by then.
SELECT tutor_id, CAST(min(scheduled_time) - $day_offset AS DATE) AS first_activity_date
FROM sessions
WHERE scheduled_time < $end
GROUP BY tutor_id
