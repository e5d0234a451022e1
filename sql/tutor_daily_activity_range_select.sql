-- Stored daily activity for the days a run of daily snapshots reads.
SELECT tutor_id, activity_date, sessions, tutor_reschedules, no_shows
FROM tutor_daily_activity
WHERE activity_date >= $first_day AND activity_date <= $last_day
