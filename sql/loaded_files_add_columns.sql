-- Columns of loaded_files newer than the table: added to a warehouse created before them.
ALTER TABLE loaded_files ADD COLUMN IF NOT EXISTS min_scheduled_time TIMESTAMPTZ;
ALTER TABLE loaded_files ADD COLUMN IF NOT EXISTS max_scheduled_time TIMESTAMPTZ;
