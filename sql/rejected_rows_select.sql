-- A load's rejected rows, for the CSV written beside its archived file.
SELECT line_number, column_name, reason, raw_record
FROM rejected_rows
WHERE load_id = $load_id
ORDER BY line_number, column_name
