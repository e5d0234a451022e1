-- The as-of instant of the snapshot in tutor_scores_current (NULL before the first one).
SELECT max(as_of) AS as_of FROM tutor_scores_current
