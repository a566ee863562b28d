//! Idempotency keys (API.md "Reliability additions"): an app that sends
//! `Idempotency-Key` with a run, a turn or an SDK request and repeats it (a retry after a
//! lost answer, an EventSource-style client re-POSTing when its stream ends) gets the first
//! answer again instead of a second run, billed once.
//!
//! This module owns the `idempotency_keys` table and what decides its rows: the key as
//! parsed at the edge, the fingerprint of the request that came with it, the atomic claim,
//! and which answers spend a key. `http::idempotency` wraps the four routes with it.
//!
//! Why the claim comes first: it is taken (one `INSERT … ON CONFLICT` on the writer
//! connection) before admission, so two repeats racing each other cannot both run; the
//! loser answers 409 `busy` while the first still runs.
//!
//! Which answers are kept: those of work that ran — every success (a cancelled run's
//! included) and the failures of the agent itself (`upstream_error`, `output_too_large`,
//! `timeout`). Any other error (bad request, auth, budget, rate, queue full, shutdown, a
//! client that hung up before its answer) releases the key: nothing ran to completion, so
//! a retry runs afresh. A row left `running` by a crash is released by start-up
//! reconciliation; every row goes 24 h after it was claimed.

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// How long a key answers with its first answer: 24 h.
pub const KEEP_MS: i64 = 24 * 60 * 60 * 1000;
/// Longest key accepted.
pub const MAX_KEY_LEN: usize = 255;

/// An `Idempotency-Key` as sent: 1..=255 visible ASCII characters. Only its hash is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// The key in a header value's bytes, or why it is not one.
    pub fn parse(raw: &[u8]) -> Result<IdempotencyKey, &'static str> {
        if raw.is_empty() {
            return Err("Idempotency-Key is empty");
        }
        if raw.len() > MAX_KEY_LEN {
            return Err("Idempotency-Key is longer than 255 characters");
        }
        if !raw.iter().all(|b| b.is_ascii_graphic()) {
            return Err("Idempotency-Key must be visible ASCII characters (no spaces)");
        }
        Ok(IdempotencyKey(String::from_utf8_lossy(raw).into_owned()))
    }

    pub fn hash(&self) -> [u8; 32] {
        Sha256::digest(self.0.as_bytes()).into()
    }
}

/// What a repeat must match to get the first answer: the route (its path, so a turn's
/// session id is part of it), whether `Accept` asked for a stream, and the body — as
/// canonical JSON when it is JSON, so key order and whitespace do not count.
pub fn request_hash(route: &str, accepts_stream: bool, body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(route.as_bytes());
    h.update([0, u8::from(accepts_stream), 0]);
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => canonical(&v, &mut h),
        Err(_) => h.update(body),
    }
    h.finalize().into()
}

/// `v` as JSON with every object's keys sorted and no whitespace, fed into `h`.
fn canonical(v: &Value, h: &mut Sha256) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            h.update(b"{");
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    h.update(b",");
                }
                h.update(Value::from(k.as_str()).to_string().as_bytes());
                h.update(b":");
                canonical(&map[k], h);
            }
            h.update(b"}");
        }
        Value::Array(items) => {
            h.update(b"[");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    h.update(b",");
                }
                canonical(item, h);
            }
            h.update(b"]");
        }
        scalar => h.update(scalar.to_string().as_bytes()),
    }
}

/// Whether an answer spends its key (kept and replayed) rather than releasing it: a
/// success, or an error `code` the agent's own work produced.
pub fn spends_key(success: bool, code: Option<&str>) -> bool {
    success
        || matches!(
            code,
            Some("upstream_error" | "output_too_large" | "timeout")
        )
}

/// A kept answer, replayed as it was first sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAnswer {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
}

/// What a claim found.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// The key is this request's now (under the holder's claim id).
    Taken,
    /// The first request with this key is still running.
    Running,
    /// The key came with a different request.
    Mismatch,
    /// The first request's answer.
    Answered(StoredAnswer),
}

/// Which request holds a key: the token, the key's hash and the claim's random id (so a
/// request whose key expired and was claimed again cannot touch the new claim's row).
#[derive(Debug, Clone)]
pub struct Holder {
    pub token_id: String,
    pub key_hash: [u8; 32],
    pub claim: String,
}

/// Claims the key for a request whose fingerprint is `request_hash`, at `now`: a key
/// unknown, or claimed more than [`KEEP_MS`] ago (swept or not yet), is taken; otherwise
/// the row says what the first request did.
pub fn claim(
    conn: &Connection,
    holder: &Holder,
    request_hash: &[u8; 32],
    now: i64,
) -> rusqlite::Result<Claim> {
    let taken = conn
        .prepare_cached(
            "INSERT INTO idempotency_keys (token_id, key_hash, request_hash, claim, state, created_at)
             VALUES (?1, ?2, ?3, ?4, 'running', ?5)
             ON CONFLICT (token_id, key_hash) DO UPDATE SET
                 request_hash = excluded.request_hash, claim = excluded.claim,
                 state = 'running', status = NULL, content_type = NULL, answer = NULL,
                 created_at = excluded.created_at
             WHERE idempotency_keys.created_at <= ?6",
        )?
        .execute(params![
            holder.token_id,
            &holder.key_hash[..],
            &request_hash[..],
            holder.claim,
            now,
            now - KEEP_MS
        ])?;
    if taken == 1 {
        return Ok(Claim::Taken);
    }
    let row = conn
        .prepare_cached(
            "SELECT request_hash, state, status, content_type, answer FROM idempotency_keys
             WHERE token_id = ?1 AND key_hash = ?2",
        )?
        .query_row(params![holder.token_id, &holder.key_hash[..]], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<u16>>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, Option<Vec<u8>>>(4)?,
            ))
        })
        .optional()?;
    Ok(match row {
        // Released between the insert and the read: cannot happen on the one writer
        // connection, but a missing row is a key nobody holds.
        None => Claim::Running,
        Some((hash, _, _, _, _)) if hash != request_hash[..] => Claim::Mismatch,
        Some((_, state, Some(status), content_type, Some(body))) if state == "done" => {
            Claim::Answered(StoredAnswer {
                status,
                content_type: content_type.unwrap_or_default(),
                body,
            })
        }
        Some(_) => Claim::Running,
    })
}

/// Keeps the holder's answer for its repeats.
pub fn keep(conn: &Connection, holder: &Holder, answer: &StoredAnswer) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "UPDATE idempotency_keys SET state = 'done', status = ?4, content_type = ?5, answer = ?6
         WHERE token_id = ?1 AND key_hash = ?2 AND claim = ?3",
    )?
    .execute(params![
        holder.token_id,
        &holder.key_hash[..],
        holder.claim,
        answer.status,
        answer.content_type,
        answer.body
    ])?;
    Ok(())
}

/// Gives the key up: the holder ended without an answer worth replaying.
pub fn release(conn: &Connection, holder: &Holder) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "DELETE FROM idempotency_keys WHERE token_id = ?1 AND key_hash = ?2 AND claim = ?3",
    )?
    .execute(params![holder.token_id, &holder.key_hash[..], holder.claim])?;
    Ok(())
}

/// Start-up: keys still `running` belonged to requests the last process was serving.
pub fn release_running(conn: &Connection) -> rusqlite::Result<usize> {
    conn.execute("DELETE FROM idempotency_keys WHERE state = 'running'", [])
}

/// The sweep: keys claimed at or before `cutoff`.
pub fn delete_before(conn: &Connection, cutoff: i64) -> rusqlite::Result<usize> {
    conn.execute(
        "DELETE FROM idempotency_keys WHERE created_at <= ?1",
        [cutoff],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_one_to_255_visible_ascii_characters() {
        assert!(IdempotencyKey::parse(b"order-42:retry/1").is_ok());
        assert!(IdempotencyKey::parse(&[b'k'; 255]).is_ok());
        assert!(IdempotencyKey::parse(b"").is_err());
        assert!(IdempotencyKey::parse(&[b'k'; 256]).is_err());
        assert!(IdempotencyKey::parse(b"two words").is_err());
        assert!(IdempotencyKey::parse("caf\u{e9}".as_bytes()).is_err());
        assert!(IdempotencyKey::parse(b"tab\there").is_err());
    }

    #[test]
    fn the_fingerprint_ignores_key_order_and_whitespace_only() {
        let a = request_hash("/run", false, br#"{"prompt":"hi","stream":false}"#);
        let b = request_hash(
            "/run",
            false,
            b"{ \"stream\": false,\n \"prompt\": \"hi\" }",
        );
        assert_eq!(a, b);
        assert_ne!(
            a,
            request_hash("/run", false, br#"{"prompt":"hi!","stream":false}"#)
        );
        assert_ne!(
            a,
            request_hash("/run", true, br#"{"prompt":"hi","stream":false}"#)
        );
        assert_ne!(
            request_hash("/sessions/ses_a/turn", false, b"{}"),
            request_hash("/sessions/ses_b/turn", false, b"{}")
        );
        // Not JSON: the bytes themselves.
        assert_ne!(
            request_hash("/run", false, b"not json"),
            request_hash("/run", false, b"not  json")
        );
    }

    #[test]
    fn only_the_work_that_ran_spends_a_key() {
        assert!(spends_key(true, None));
        assert!(spends_key(false, Some("upstream_error")));
        assert!(spends_key(false, Some("timeout")));
        for code in [
            "bad_request",
            "unauthorized",
            "budget_exhausted",
            "overloaded",
            "rate_limited",
            "usage_limit",
            "busy",
            "unavailable",
            "internal_error",
        ] {
            assert!(!spends_key(false, Some(code)), "{code}");
        }
    }
}
