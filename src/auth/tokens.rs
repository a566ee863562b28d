//! App tokens: `cf_` + 43 base62 characters (256 bits of randomness), stored only as the
//! hex SHA-256 of the plaintext. The functions here take a plain `rusqlite::Connection` so
//! the HTTP admin routes (through the writer task) and the `tokens` subcommand (directly)
//! share them. A token carries its policy (`governance::policy`) in the same row.

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::audit::{self, AuditEntry};
use crate::config::SessionPermissions;
use crate::error::ApiError;
use crate::governance::policy::{Policy, PolicyPatch};
use crate::util::{new_id, now_ms, random_base62, rfc3339};

pub const TOKEN_PREFIX: &str = "cf_";
const TOKEN_RANDOM_CHARS: usize = 43; // 43 * log2(62) = 256.1 bits

/// A token as stored, minus its hash.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TokenRecord {
    pub id: String,
    pub name: String,
    #[serde(flatten)]
    pub policy: Policy,
    #[schema(value_type = String, format = DateTime)]
    #[serde(serialize_with = "crate::util::ser_rfc3339")]
    pub created_at: i64,
    #[serde(serialize_with = "crate::util::ser_opt_rfc3339")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_used_at: Option<i64>,
    #[serde(serialize_with = "crate::util::ser_opt_rfc3339")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub revoked_at: Option<i64>,
}

/// A fresh plaintext token.
pub fn mint_plaintext() -> String {
    random_base62(TOKEN_PREFIX, TOKEN_RANDOM_CHARS)
}

/// Hex SHA-256 of a bearer, the only form a token is stored in.
pub fn hash_token(plaintext: &str) -> String {
    hex::encode(Sha256::digest(plaintext.as_bytes()))
}

/// Whether `s` has the shape of an app token (so it is worth a database lookup).
pub fn looks_like_app_token(s: &str) -> bool {
    s.strip_prefix(TOKEN_PREFIX)
        .is_some_and(|rest| rest.len() >= 32 && rest.bytes().all(|b| b.is_ascii_alphanumeric()))
}

const COLUMNS: &str = "id, name, ip_cidrs, created_at, last_used_at, revoked_at,
    budget_usd_per_day, budget_usd_per_month, max_concurrent, rate_per_min, allowed_models,
    default_model, session_permissions, expires_at, allowed_tools, max_open_sessions,
    max_upload_bytes_stored";

fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRecord> {
    let cidrs: String = row.get(2)?;
    let models: Option<String> = row.get(10)?;
    let permissions: Option<String> = row.get(12)?;
    let tools: Option<String> = row.get(14)?;
    Ok(TokenRecord {
        id: row.get(0)?,
        name: row.get(1)?,
        policy: Policy {
            ip_cidrs: serde_json::from_str(&cidrs).unwrap_or_default(),
            budget_usd_per_day: row.get(6)?,
            budget_usd_per_month: row.get(7)?,
            max_concurrent: row.get(8)?,
            rate_per_min: row.get(9)?,
            allowed_models: models.and_then(|m| serde_json::from_str(&m).ok()),
            default_model: row.get(11)?,
            session_permissions: permissions
                .and_then(|p| <SessionPermissions as clap::ValueEnum>::from_str(&p, false).ok()),
            expires_at: row.get(13)?,
            allowed_tools: tools.and_then(|t| serde_json::from_str(&t).ok()),
            max_open_sessions: row.get(15)?,
            max_upload_bytes_stored: row.get::<_, Option<i64>>(16)?.map(|n| n.max(0) as u64),
        },
        created_at: row.get(3)?,
        last_used_at: row.get(4)?,
        revoked_at: row.get(5)?,
    })
}

/// Writes every policy column of token `id`.
fn write_policy(conn: &Connection, id: &str, p: &Policy) -> rusqlite::Result<usize> {
    // Serialising a list of strings cannot fail.
    let json = |v: &[String]| serde_json::to_string(v).unwrap_or_else(|_| "[]".into());
    conn.execute(
        "UPDATE tokens SET ip_cidrs = ?2, budget_usd_per_day = ?3, budget_usd_per_month = ?4,
                max_concurrent = ?5, rate_per_min = ?6, allowed_models = ?7,
                default_model = ?8, session_permissions = ?9, expires_at = ?10,
                allowed_tools = ?11, max_open_sessions = ?12, max_upload_bytes_stored = ?13
         WHERE id = ?1",
        params![
            id,
            json(&p.ip_cidrs),
            p.budget_usd_per_day,
            p.budget_usd_per_month,
            p.max_concurrent,
            p.rate_per_min,
            p.allowed_models.as_ref().map(|m| json(m)),
            p.default_model,
            p.session_permissions.map(SessionPermissions::as_str),
            p.expires_at,
            p.allowed_tools
                .as_ref()
                .and_then(|t| serde_json::to_string(t).ok()),
            p.max_open_sessions,
            p.max_upload_bytes_stored
                .map(|n| n.min(i64::MAX as u64) as i64),
        ],
    )
}

/// Creates a token with its policy and its audit row in one transaction; returns it with
/// its plaintext, which is never stored.
pub fn mint(
    conn: &mut Connection,
    name: &str,
    policy: &Policy,
    actor: &str,
) -> rusqlite::Result<(TokenRecord, String)> {
    let plaintext = mint_plaintext();
    let record = TokenRecord {
        id: new_id("tok_"),
        name: name.to_string(),
        policy: policy.clone(),
        created_at: now_ms(),
        last_used_at: None,
        revoked_at: None,
    };
    let tx = conn.transaction()?;
    tx.execute(
        "INSERT INTO tokens (id, name, hash, created_at) VALUES (?1, ?2, ?3, ?4)",
        params![
            record.id,
            record.name,
            hash_token(&plaintext),
            record.created_at
        ],
    )?;
    write_policy(&tx, &record.id, &record.policy)?;
    audit::insert(
        &tx,
        &AuditEntry::admin("token_mint", actor, &record.id, Some(&record.name)),
    )?;
    tx.commit()?;
    Ok((record, plaintext))
}

/// Applies a policy patch to token `id` (read, apply, write in one transaction, so two
/// concurrent patches cannot lose each other's fields). `Ok(None)`: no such token;
/// `Ok(Some(Err(_)))`: the patch is refused, nothing changed.
pub fn update_policy(
    conn: &mut Connection,
    id: &str,
    patch: PolicyPatch,
    actor: &str,
) -> rusqlite::Result<Option<Result<TokenRecord, String>>> {
    let tx = conn.transaction()?;
    let Some(mut record) = get(&tx, id)? else {
        return Ok(None);
    };
    let changed = match patch.apply(&mut record.policy) {
        Ok(changed) => changed,
        Err(refused) => return Ok(Some(Err(refused))),
    };
    write_policy(&tx, id, &record.policy)?;
    let note = format!("set {}", changed.join(", "));
    audit::insert(
        &tx,
        &AuditEntry::admin("token_update", actor, id, Some(&note)),
    )?;
    tx.commit()?;
    Ok(Some(Ok(record)))
}

/// What rotating a token came to.
#[derive(Debug)]
pub enum Rotation {
    /// The new plaintext; the old one stopped working with this transaction.
    Rotated(Box<TokenRecord>, String),
    Revoked,
    Missing,
}

/// Gives token `id` a new secret. Its id, policy, usage, sessions and audit history stay,
/// since they hang off the id, not the hash.
pub fn rotate(conn: &mut Connection, id: &str, actor: &str) -> rusqlite::Result<Rotation> {
    let plaintext = mint_plaintext();
    let tx = conn.transaction()?;
    let changed = tx.execute(
        "UPDATE tokens SET hash = ?2 WHERE id = ?1 AND revoked_at IS NULL",
        params![id, hash_token(&plaintext)],
    )?;
    let outcome = match (changed, get(&tx, id)?) {
        (1, Some(record)) => {
            audit::insert(&tx, &AuditEntry::admin("token_rotate", actor, id, None))?;
            Rotation::Rotated(Box::new(record), plaintext)
        }
        (_, Some(_)) => Rotation::Revoked,
        (_, None) => Rotation::Missing,
    };
    tx.commit()?;
    Ok(outcome)
}

pub fn list(conn: &Connection) -> rusqlite::Result<Vec<TokenRecord>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM tokens ORDER BY created_at DESC, id"
    ))?;
    let rows = stmt.query_map([], from_row)?;
    rows.collect()
}

pub fn get(conn: &Connection, id: &str) -> rusqlite::Result<Option<TokenRecord>> {
    conn.query_row(
        &format!("SELECT {COLUMNS} FROM tokens WHERE id = ?1"),
        [id],
        from_row,
    )
    .optional()
}

/// Looks a bearer up by its hash. Revoked tokens are returned too; the caller decides.
pub fn find_by_hash(conn: &Connection, hash: &str) -> rusqlite::Result<Option<TokenRecord>> {
    let mut stmt = conn.prepare_cached(&format!("SELECT {COLUMNS} FROM tokens WHERE hash = ?1"))?;
    stmt.query_row([hash], from_row).optional()
}

/// Revokes a token (idempotent) and records it. `Ok(None)`: no such token.
pub fn revoke(
    conn: &mut Connection,
    id: &str,
    actor: &str,
) -> rusqlite::Result<Option<TokenRecord>> {
    let tx = conn.transaction()?;
    let now = now_ms();
    let changed = tx.execute(
        "UPDATE tokens SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
        params![id, now],
    )?;
    let record = get(&tx, id)?;
    if record.is_some() && changed > 0 {
        audit::insert(&tx, &AuditEntry::admin("token_revoke", actor, id, None))?;
    }
    tx.commit()?;
    Ok(record)
}

/// Writes batched `last_used_at` stamps (see `http::extract::LastUsed`).
pub fn touch_many(conn: &mut Connection, stamps: &[(String, i64)]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare_cached(
            "UPDATE tokens SET last_used_at = max(coalesce(last_used_at, 0), ?2) WHERE id = ?1",
        )?;
        for (id, at) in stamps {
            stmt.execute(params![id, at])?;
        }
    }
    tx.commit()
}

/// For printing tables: an RFC 3339 time or "-".
pub fn show_time(ms: Option<i64>) -> String {
    ms.map(rfc3339).unwrap_or_else(|| "-".into())
}

/// A token's name as the admin API and `tokens mint` take it: trimmed, 1 to 200 printable
/// characters.
pub fn parse_name(name: &str) -> Result<String, ApiError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "name must be 1 to 200 printable characters",
        ));
    }
    Ok(name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_shape_and_entropy() {
        let a = mint_plaintext();
        let b = mint_plaintext();
        assert_ne!(a, b);
        assert!(looks_like_app_token(&a));
        assert_eq!(a.len(), 3 + 43);
        // 43 base62 characters carry at least 190 bits.
        assert!((43.0 * 62f64.log2()) >= 190.0);
        assert_eq!(hash_token(&a).len(), 64);
        assert!(!looks_like_app_token("cf_short"));
        assert!(!looks_like_app_token("Bearer cf_..."));
    }
}
