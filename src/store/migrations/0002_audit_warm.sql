-- Whether a run was served by a pre-started (warm) claude process: 1, 0, or NULL for rows
-- that are not runs.
ALTER TABLE audit ADD COLUMN warm INTEGER;
