-- Each tutor's first scheduled session before $end: a tutor is scored as of T once it has a
-- session scheduled before T (the same tutors as the score snapshots).
SELECT tutor_id, min(scheduled_time) AS first_scheduled_time
FROM sessions
WHERE scheduled_time < $end
GROUP BY tutor_id
ORDER BY tutor_id
