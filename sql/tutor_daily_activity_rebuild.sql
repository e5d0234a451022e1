-- Recreate tutor_daily_activity without its primary key, keeping its rows and NOT NULLs.
ALTER TABLE tutor_daily_activity RENAME TO tutor_daily_activity_keyed;
CREATE TABLE tutor_daily_activity (
    tutor_id           VARCHAR NOT NULL,
    activity_date      DATE NOT NULL,
    sessions           BIGINT NOT NULL,
    tutor_reschedules  BIGINT NOT NULL,
    no_shows           BIGINT NOT NULL
);
INSERT INTO tutor_daily_activity BY NAME SELECT * FROM tutor_daily_activity_keyed;
DROP TABLE tutor_daily_activity_keyed;
