-- The as-of instant of the latest stored daily snapshot (null when there is none).
SELECT max(as_of) AS as_of FROM tutor_scores_daily
