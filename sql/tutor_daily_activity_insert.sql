INSERT INTO tutor_daily_activity BY NAME
SELECT * FROM incoming_activity
