-- The session's cumulative agent cost as last reported by ACP `usage_update.cost`, which
-- counts from the start of the agent process: a turn's own cost is the difference.
ALTER TABLE sessions ADD COLUMN cost_total REAL NOT NULL DEFAULT 0;
-- Idle-TTL and hard-TTL scans.
CREATE INDEX sessions_by_status ON sessions (status, last_used_at);
