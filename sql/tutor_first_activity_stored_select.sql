-- The first stored activity day of each tutor, up to $last_day.
SELECT tutor_id, min(activity_date) AS first_activity_date
FROM tutor_daily_activity
WHERE activity_date <= $last_day
GROUP BY tutor_id
