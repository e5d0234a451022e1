-- Scored tutors (the registered frame checked_scores) missing from the tutors view.
SELECT DISTINCT c.tutor_id
FROM checked_scores AS c
ANTI JOIN tutors AS t USING (tutor_id)
ORDER BY c.tutor_id
