//! Uploaded files: stored under `uploads/<file token>`, visible only to the token that
//! uploaded them, and staged (copied) into run and session working dirs on request.
//! [`sanitize`] names them.

pub mod sanitize;

use std::path::Path;

use rusqlite::params;

use crate::error::ApiError;
use crate::store::Db;
use crate::util::now_ms;

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
        let (ft2, owner) = (ft.clone(), token_id.to_string());
        let stored: Option<String> = db
            .read(move |c| {
                c.query_row(
                    "SELECT stored_name FROM files WHERE file_token = ?1 AND token_id = ?2 AND expires_at > ?3",
                    params![ft2, owner, now_ms()],
                    |r| r.get(0),
                )
                .map(Some)
                .or_else(|e| match e {
                    rusqlite::Error::QueryReturnedNoRows => Ok(None),
                    e => Err(e),
                })
            })
            .await?;
        let Some(stored) = stored else {
            return Err(ApiError::NotFound(format!("no such file: {ft}")));
        };
        let name = sanitize::distinct(&stored, &names);
        tokio::fs::copy(uploads_dir.join(ft), dir.join(&name))
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => ApiError::NotFound(format!("no such file: {ft}")),
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
