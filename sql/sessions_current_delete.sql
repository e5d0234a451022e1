-- Current sessions superseded by a later export among the loads $after < load_id <= $upto
-- (later: by updated_at, nulls oldest, then by load and line, as in the sessions view).
DELETE FROM sessions_current AS c
USING (
    SELECT session_id, updated_at, load_id, source_line
    FROM raw_sessions
    WHERE load_id > $after AND load_id <= $upto
    QUALIFY row_number() OVER (
        PARTITION BY session_id
        ORDER BY updated_at DESC NULLS LAST, load_id DESC, source_line DESC
    ) = 1
) AS p
WHERE c.session_id = p.session_id
  AND (
      p.updated_at > c.updated_at
      OR (p.updated_at IS NOT NULL AND c.updated_at IS NULL)
      OR (
          p.updated_at IS NOT DISTINCT FROM c.updated_at
          AND (p.load_id > c.load_id OR (p.load_id = c.load_id AND p.source_line > c.source_line))
      )
  )
