-- Hardening (issue #13): two more per-token policy limits. Additive only.
ALTER TABLE tokens ADD COLUMN max_open_sessions       INTEGER;  -- open sessions at once
ALTER TABLE tokens ADD COLUMN max_upload_bytes_stored INTEGER;  -- bytes of unexpired uploads
