-- Every known tutor, as published to the serving store.
SELECT tutor_id, name, email, is_active, in_tutors_export, updated_at
FROM tutors
ORDER BY tutor_id
