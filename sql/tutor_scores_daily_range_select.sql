-- Daily snapshots with $start <= as_of < $end.
SELECT * FROM tutor_scores_daily
WHERE as_of >= $start AND as_of < $end
ORDER BY as_of, tutor_id
