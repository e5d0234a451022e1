-- Bookkeeping tables of the warehouse. The raw_<entity> tables are created from the Pandera
-- models (schemas.py) so that their columns are declared in one place only.
CREATE SEQUENCE IF NOT EXISTS load_ids START 1;

CREATE TABLE IF NOT EXISTS loaded_files (
    file_hash      VARCHAR PRIMARY KEY,          -- sha256 of the bytes: the same bytes load once
    load_id        BIGINT NOT NULL UNIQUE,       -- drop order
    entity         VARCHAR NOT NULL,
    file_name      VARCHAR NOT NULL,
    loaded_at      TIMESTAMPTZ NOT NULL,
    rows_read      BIGINT NOT NULL,
    rows_loaded    BIGINT NOT NULL,
    rows_rejected  BIGINT NOT NULL,
    -- The range of scheduled times the load touched (sessions: scheduled_time; reschedules:
    -- original_time; NULL for tutors), so a late-data check can tell which days to redo.
    -- Warehouses older than these columns get them from loaded_files_add_columns.sql.
    min_scheduled_time  TIMESTAMPTZ,
    max_scheduled_time  TIMESTAMPTZ
);

CREATE TABLE IF NOT EXISTS quarantined_files (
    file_hash       VARCHAR NOT NULL,
    file_name       VARCHAR NOT NULL,
    quarantined_at  TIMESTAMPTZ NOT NULL,
    reason          VARCHAR NOT NULL
);

CREATE TABLE IF NOT EXISTS rejected_rows (
    load_id      BIGINT NOT NULL,
    entity       VARCHAR NOT NULL,
    source_file  VARCHAR NOT NULL,
    line_number  BIGINT NOT NULL,                 -- 1 is the CSV header; Parquet rows count from 1
    column_name  VARCHAR NOT NULL,
    reason       VARCHAR NOT NULL,
    raw_record   JSON                             -- the row as it was read, to fix and re-drop
);

-- One row per tutor and day by construction (materialize_daily_activity replaces whole day
-- ranges with grouped rows); no primary key, whose index made every rebuild's insert slow.
CREATE TABLE IF NOT EXISTS tutor_daily_activity (
    tutor_id           VARCHAR NOT NULL,
    activity_date      DATE NOT NULL,
    sessions           BIGINT NOT NULL,
    tutor_reschedules  BIGINT NOT NULL,
    no_shows           BIGINT NOT NULL
);

-- Up to which load (loaded_files.load_id) the current tables sessions_current and
-- reschedules_current hold every export (see current_views_create.sql).
CREATE TABLE IF NOT EXISTS current_loads (
    entity   VARCHAR PRIMARY KEY,
    load_id  BIGINT NOT NULL
);
