-- Record that an entity's current table holds every load up to $load_id.
INSERT OR REPLACE INTO current_loads (entity, load_id) VALUES ($entity, $load_id)
