-- Clear the days of a partition range before writing them again.
DELETE FROM tutor_daily_activity
WHERE activity_date >= $first_day AND activity_date <= $last_day
