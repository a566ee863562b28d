//! Uploaded files: stored under `uploads/<file token>`, visible only to the token that
//! uploaded them until they expire, and staged (copied) into run and session working dirs
//! on request. [`upload`] receives them; [`sanitize`] names them.

pub mod sanitize;
pub mod upload;

use std::collections::HashSet;
use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use crate::audit::{self, AuditEntry};
use crate::error::ApiError;
use crate::store::{Db, StoreError};
use crate::util::now_ms;

/// A stored file as its owner sees it (`GET /files/{file_token}`).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct FileRecord {
    pub file_token: String,
    #[serde(skip)]
    pub token_id: String,
    /// As uploaded, kept for the owner's records; never used in a path.
    pub filename: String,
    /// Sanitised: the name the file has in a run dir.
    pub stored_name: String,
    pub size: u64,
    pub sha256: String,
    #[serde(serialize_with = "crate::util::ser_rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: i64,
    #[serde(serialize_with = "crate::util::ser_rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub expires_at: i64,
}

fn not_found(file_token: &str) -> ApiError {
    ApiError::NotFound(format!(
        "no such file: {}",
        file_token.chars().take(64).collect::<String>()
    ))
}

fn insert(conn: &Connection, r: &FileRecord) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO files (file_token, token_id, filename, stored_name, size, sha256,
                            created_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            r.file_token,
            r.token_id,
            r.filename,
            r.stored_name,
            r.size as i64,
            r.sha256,
            r.created_at,
            r.expires_at
        ],
    )?;
    Ok(())
}

/// The file if `token_id` owns it and it has not expired: another token's file and an
/// expired one (still on disk until the sweeper comes) look exactly like a missing one.
pub async fn find(db: &Db, token_id: &str, file_token: &str) -> Result<FileRecord, ApiError> {
    let (owner, ft) = (token_id.to_string(), file_token.to_string());
    db.read(move |c| {
        c.query_row(
            "SELECT file_token, token_id, filename, stored_name, size, sha256, created_at,
                    expires_at
             FROM files WHERE file_token = ?1 AND token_id = ?2 AND expires_at > ?3",
            params![ft, owner, now_ms()],
            |r| {
                Ok(FileRecord {
                    file_token: r.get(0)?,
                    token_id: r.get(1)?,
                    filename: r.get(2)?,
                    stored_name: r.get(3)?,
                    size: r.get::<_, i64>(4)? as u64,
                    sha256: r.get(5)?,
                    created_at: r.get(6)?,
                    expires_at: r.get(7)?,
                })
            },
        )
        .optional()
    })
    .await?
    .ok_or_else(|| not_found(file_token))
}

/// Bytes of `token_id`'s unexpired uploads (what `max_upload_bytes_stored` bounds).
pub async fn stored_bytes(db: &Db, token_id: &str) -> Result<u64, StoreError> {
    let owner = token_id.to_string();
    db.read(move |c| {
        c.query_row(
            "SELECT coalesce(sum(size), 0) FROM files WHERE token_id = ?1 AND expires_at > ?2",
            params![owner, now_ms()],
            |r| r.get::<_, i64>(0),
        )
    })
    .await
    .map(|n| n.max(0) as u64)
}

/// Deletes the caller's file (row and bytes) and records a `file_delete` audit row in the
/// same transaction.
pub async fn delete(
    db: &Db,
    uploads_dir: &Path,
    token_id: &str,
    file_token: &str,
) -> Result<(), ApiError> {
    let (owner, ft) = (token_id.to_string(), file_token.to_string());
    let deleted = db
        .write(move |c| {
            let tx = c.transaction()?;
            let n = tx.execute(
                "DELETE FROM files WHERE file_token = ?1 AND token_id = ?2 AND expires_at > ?3",
                params![ft, owner, now_ms()],
            )?;
            if n == 1 {
                let entry = AuditEntry {
                    token_id: Some(owner),
                    kind: "file_delete".into(),
                    subject: Some(ft),
                    ..AuditEntry::default()
                };
                audit::insert(&tx, &entry)?;
            }
            tx.commit()?;
            Ok(n == 1)
        })
        .await?;
    if !deleted {
        return Err(not_found(file_token));
    }
    remove_bytes(uploads_dir, file_token).await;
    Ok(())
}

async fn remove_bytes(uploads_dir: &Path, file_token: &str) {
    let path = uploads_dir.join(file_token);
    match tokio::fs::remove_file(&path).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "could not remove an upload"),
    }
}

/// Deletes every file expired at `now_ms`, rows and bytes; returns how many. For the
/// sweeper.
pub async fn delete_expired(db: &Db, uploads_dir: &Path, now_ms: i64) -> Result<usize, StoreError> {
    let expired: Vec<String> = db
        .write(move |c| {
            let mut stmt =
                c.prepare("DELETE FROM files WHERE expires_at <= ?1 RETURNING file_token")?;
            let tokens = stmt.query_map([now_ms], |r| r.get(0))?;
            tokens.collect()
        })
        .await?;
    for ft in &expired {
        remove_bytes(uploads_dir, ft).await;
    }
    Ok(expired.len())
}

/// Removes whatever in `uploads_dir` has no row: uploads interrupted by a crash (their temp
/// files) or caught between their rename and their row. Only safe while no upload is in
/// flight, i.e. at start-up. Returns how many were removed.
pub async fn remove_orphans(db: &Db, uploads_dir: &Path) -> Result<usize, StoreError> {
    let known: HashSet<String> = db
        .read(|c| {
            let mut stmt = c.prepare("SELECT file_token FROM files")?;
            let tokens = stmt.query_map([], |r| r.get(0))?;
            tokens.collect()
        })
        .await?;
    let mut entries = tokio::fs::read_dir(uploads_dir).await?;
    let mut removed = 0;
    while let Some(entry) = entries.next_entry().await? {
        let orphan = entry.file_type().await?.is_file()
            && !known.contains(entry.file_name().to_string_lossy().as_ref());
        if orphan && tokio::fs::remove_file(entry.path()).await.is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

/// Copies the caller's files into `dir` under their sanitised names and returns those
/// names, in the order given. Two files with the same stored name get distinct ones
/// (`a.txt`, `a-2.txt`); a file attached twice is copied once. Any file that is unknown,
/// expired or another token's answers 404 (they look the same). Copies, never links: the
/// agent must not be able to follow a path back into the data dir.
pub async fn stage_into(
    db: &Db,
    uploads_dir: &Path,
    token_id: &str,
    file_tokens: &[String],
    dir: &Path,
) -> Result<Vec<String>, ApiError> {
    let mut names = Vec::with_capacity(file_tokens.len());
    let mut staged: Vec<&str> = Vec::with_capacity(file_tokens.len());
    for ft in file_tokens {
        if staged.contains(&ft.as_str()) {
            continue;
        }
        let record = find(db, token_id, ft).await?;
        let name = sanitize::distinct(&record.stored_name, &names);
        tokio::fs::copy(uploads_dir.join(ft), dir.join(&name))
            .await
            .map_err(|e| match e.kind() {
                // Deleted or swept between the lookup and the copy.
                std::io::ErrorKind::NotFound => not_found(ft),
                _ => ApiError::from(e),
            })?;
        names.push(name);
        staged.push(ft);
    }
    Ok(names)
}

/// The line appended to a prompt naming its attachments.
pub fn attachment_line(names: &[String]) -> Option<String> {
    (!names.is_empty()).then(|| format!("Attached files: {}", names.join(", ")))
}
