-- The daily snapshots with $start <= as_of < $end of the tutors $first_key..$last_key, in key
-- order (a part of tutor_scores_daily_tutor_rows_select's split).
SELECT * FROM tutor_scores_daily
WHERE as_of >= $start AND as_of < $end AND tutor_id BETWEEN $first_key AND $last_key
ORDER BY tutor_id, as_of
