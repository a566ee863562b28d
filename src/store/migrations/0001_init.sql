-- App tokens. Only the SHA-256 of the plaintext is kept (hex), never the token itself.
CREATE TABLE tokens (
    id            TEXT PRIMARY KEY,          -- tok_...
    name          TEXT NOT NULL,
    hash          TEXT NOT NULL UNIQUE,      -- hex SHA-256 of the plaintext bearer
    ip_cidrs      TEXT NOT NULL DEFAULT '[]',-- JSON array of CIDR strings
    created_at    INTEGER NOT NULL,          -- unix milliseconds
    last_used_at  INTEGER,
    revoked_at    INTEGER
) STRICT;

-- One row per run, turn, upload, file delete and admin action. Runs and turns get their
-- row when they start (outcome 'running') and are finished before the answer leaves, so
-- a crash leaves a 'running' row that start-up marks 'abandoned'.
CREATE TABLE audit (
    id             INTEGER PRIMARY KEY,
    at             INTEGER NOT NULL,         -- unix milliseconds
    token_id       TEXT,                     -- NULL for admin actions by the bootstrap token
    kind           TEXT NOT NULL,            -- run|turn|upload|file_delete|token_mint|token_revoke|...
    model          TEXT,
    prompt         TEXT,                     -- NULL when CLAWDFORGE_AUDIT_PROMPTS=false
    prompt_chars   INTEGER,
    response_chars INTEGER,
    duration_ms    INTEGER,
    outcome        TEXT NOT NULL,            -- running|ok|error|timeout|cancelled|abandoned
    exit_code      INTEGER,
    input_tokens   INTEGER,
    output_tokens  INTEGER,
    cost_usd       REAL,
    subject        TEXT,                     -- run id, session id, file token or token id acted on
    detail         TEXT                      -- error code or other short note; never a secret
) STRICT;
CREATE INDEX audit_by_token ON audit (token_id, id);
CREATE INDEX audit_by_outcome ON audit (outcome) WHERE outcome = 'running';

-- Agent process groups alive right now, so that a restart after a crash can kill the ones
-- that survived. start_ticks (field 22 of /proc/PID/stat) guards against a reused pid.
CREATE TABLE live_processes (
    pgid        INTEGER PRIMARY KEY,
    start_ticks INTEGER NOT NULL,
    audit_id    INTEGER,
    dir         TEXT,                        -- the working dir the process owns, if any
    started_at  INTEGER NOT NULL
) STRICT;

-- Multi-turn sessions driven through acpx. Rows of closed sessions stay until the hard TTL.
CREATE TABLE sessions (
    id              TEXT PRIMARY KEY,        -- ses_...
    token_id        TEXT NOT NULL,
    agent           TEXT NOT NULL,
    model           TEXT NOT NULL,
    system_prompt   TEXT,
    acpx_name       TEXT NOT NULL,           -- the acpx session name (equal to id)
    acpx_record_id  TEXT,
    cwd             TEXT NOT NULL,
    status          TEXT NOT NULL,           -- open|closed
    created_at      INTEGER NOT NULL,
    last_used_at    INTEGER NOT NULL,        -- last turn (reads do not count)
    closed_at       INTEGER,
    turn_count      INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE INDEX sessions_by_token ON sessions (token_id, created_at);

-- Uploaded files: bytes under uploads/<file token>, only the uploading token sees them.
CREATE TABLE files (
    file_token   TEXT PRIMARY KEY,           -- ff_...
    token_id     TEXT NOT NULL,
    filename     TEXT NOT NULL,              -- as uploaded
    stored_name  TEXT NOT NULL,              -- sanitised, used in run dirs
    size         INTEGER NOT NULL,
    sha256       TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL
) STRICT;
CREATE INDEX files_by_expiry ON files (expires_at);
