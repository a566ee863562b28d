-- Governance (issue #7): per-token policy and the daily usage ledger. Additive only, so it
-- merges with the sessions and files migrations in any order of development.

-- Policy columns; NULL means "no limit" (or, for session_permissions and default_model,
-- "the server's setting").
ALTER TABLE tokens ADD COLUMN budget_usd_per_day   REAL;
ALTER TABLE tokens ADD COLUMN budget_usd_per_month REAL;
ALTER TABLE tokens ADD COLUMN max_concurrent       INTEGER;
ALTER TABLE tokens ADD COLUMN rate_per_min         INTEGER;
ALTER TABLE tokens ADD COLUMN allowed_models       TEXT;     -- JSON array of model names
ALTER TABLE tokens ADD COLUMN default_model        TEXT;
ALTER TABLE tokens ADD COLUMN session_permissions  TEXT;     -- approve-reads|approve-all|deny-all
ALTER TABLE tokens ADD COLUMN expires_at           INTEGER;  -- unix milliseconds

-- Usage per token, UTC day and model, added to in the same transaction that closes a run's
-- or turn's audit row (audit::complete). Kept apart from the audit log so that budgets and
-- /usage stay cheap to read and outlive CLAWDFORGE_AUDIT_RETENTION_DAYS.
CREATE TABLE usage_daily (
    token_id       TEXT NOT NULL,
    day            TEXT NOT NULL,             -- YYYY-MM-DD, UTC, when the work finished
    model          TEXT NOT NULL,
    requests       INTEGER NOT NULL DEFAULT 0,
    input_tokens   INTEGER NOT NULL DEFAULT 0,
    output_tokens  INTEGER NOT NULL DEFAULT 0,
    cost_usd       REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (token_id, day, model)
) STRICT, WITHOUT ROWID;
CREATE INDEX usage_by_day ON usage_daily (day);
