-- The drivers of the current snapshot's watch/high tutors (assessment.py), as published.
SELECT * FROM tutor_risk_drivers_current ORDER BY tutor_id, as_of, driver
