-- Rows per tutor among the daily snapshots with $start <= as_of < $end, in tutor order (to
-- split a long range into parts of whole tutors).
SELECT tutor_id, count(*) AS rows
FROM tutor_scores_daily
WHERE as_of >= $start AND as_of < $end
GROUP BY tutor_id
ORDER BY tutor_id
