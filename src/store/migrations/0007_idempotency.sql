-- Idempotency keys (issue #13, API.md "Reliability additions"): per app token, the
-- SHA-256 of each `Idempotency-Key` it sent, of the request that came with it, and the
-- first answer, so a repeat within 24 h gets that answer instead of a second run. Only
-- hashes of the key are kept. Rows are deleted by the sweeper after 24 h; a row still
-- `running` at start-up is deleted by reconciliation (its request died with the server).
CREATE TABLE idempotency_keys (
    token_id      TEXT NOT NULL,
    key_hash      BLOB NOT NULL,                 -- SHA-256 of the key
    request_hash  BLOB NOT NULL,                 -- SHA-256 of route, stream flag, canonical body
    claim         TEXT NOT NULL,                 -- random, names the request that holds the key
    state         TEXT NOT NULL CHECK (state IN ('running', 'done')),
    status        INTEGER,                       -- the answer's HTTP status (done)
    content_type  TEXT,                          -- the answer's Content-Type (done)
    answer        BLOB,                          -- the answer's body (done)
    created_at    INTEGER NOT NULL,              -- unix milliseconds
    PRIMARY KEY (token_id, key_hash)
) STRICT;
CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);
