-- Daily snapshots with $start <= as_of < $end, in stored order: the audit sorts them only if
-- they are not sorted already (a range run stores them sorted; DuckDB's sort cost ~0.2 s per
-- 180 days at 10M sessions).
SELECT * FROM tutor_scores_daily
WHERE as_of >= $start AND as_of < $end
