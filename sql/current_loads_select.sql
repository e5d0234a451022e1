-- Up to which load each current table has been merged, and the newest load there is.
SELECT
    (SELECT coalesce(max(load_id), 0) FROM loaded_files) AS newest_load,
    (SELECT coalesce(max(load_id), 0) FROM current_loads WHERE entity = 'sessions') AS sessions,
    (SELECT coalesce(max(load_id), 0) FROM current_loads WHERE entity = 'reschedules')
        AS reschedules
