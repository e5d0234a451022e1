SELECT * FROM tutor_scores_current ORDER BY tutor_id
