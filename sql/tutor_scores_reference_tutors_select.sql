-- Tutors the score checks expect rows for: every tutor with a session scheduled before $latest,
-- with the instant of their first session, in tutor_id order.
SELECT tutor_id, min(scheduled_time) AS first_time
FROM sessions
WHERE scheduled_time < $latest
GROUP BY tutor_id
ORDER BY tutor_id
