-- Current reschedules superseded by a later export among the loads $after < load_id <= $upto
-- (later: by created_at, nulls oldest, then by load and line, as in the reschedules view).
DELETE FROM reschedules_current AS c
USING (
    SELECT session_id, cancelled_at, created_at, load_id, source_line
    FROM raw_reschedules
    WHERE load_id > $after AND load_id <= $upto
    QUALIFY row_number() OVER (
        PARTITION BY session_id, cancelled_at
        ORDER BY created_at DESC NULLS LAST, load_id DESC, source_line DESC
    ) = 1
) AS p
WHERE c.session_id = p.session_id
  AND c.cancelled_at IS NOT DISTINCT FROM p.cancelled_at
  AND (
      p.created_at > c.created_at
      OR (p.created_at IS NOT NULL AND c.created_at IS NULL)
      OR (
          p.created_at IS NOT DISTINCT FROM c.created_at
          AND (p.load_id > c.load_id OR (p.load_id = c.load_id AND p.source_line > c.source_line))
      )
  )
