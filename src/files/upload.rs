//! Receiving an upload: the multipart body is parsed as it arrives, the file's bytes go
//! through SHA-256 into a temp file in the uploads dir, and only a complete upload within
//! the limit is renamed into place and given its row. Whatever ends an upload early (too
//! large, bad input, the client hanging up) drops the temp file, which deletes it.

use std::error::Error as StdError;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tempfile::NamedTempFile;
use tokio::io::{AsyncWriteExt, BufWriter};

use crate::audit::{self, AuditEntry};
use crate::error::ApiError;
use crate::files::{sanitize, FileRecord};
use crate::store::Db;
use crate::util::{now_ms, random_base62};

/// Bytes of a body that are not the file's own (boundaries, part headers, `ttl_secs`) that
/// are tolerated. It bounds what the parser may buffer while looking for the end of a part's
/// headers; the one read chunk it holds at a time (at most ~400 KiB) fits comfortably.
pub const ENVELOPE_MAX_BYTES: u64 = 4 * 1024 * 1024;
/// The longest filename accepted as uploaded (it is kept in the database).
const FILENAME_MAX_BYTES: usize = 64 * 1024;
/// Writes reach the disk in blocks of this size, so small network chunks do not each cost
/// a trip to the blocking pool.
const WRITE_BUFFER_BYTES: usize = 1024 * 1024;
/// Temp files in the uploads dir start with this; file tokens never do.
const TEMP_PREFIX: &str = ".upload-";
/// Random characters in a file token: 24 × 5.95 = 142 bits.
const FILE_TOKEN_CHARS: usize = 24;

/// A file's time to live: 60 s to 24 h, 1 h when not given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtlSecs(u64);

impl TtlSecs {
    pub const MIN: u64 = 60;
    pub const MAX: u64 = 86_400;

    pub fn parse(text: &str) -> Result<TtlSecs, ApiError> {
        match text.trim().parse::<u64>() {
            Ok(secs) if (Self::MIN..=Self::MAX).contains(&secs) => Ok(TtlSecs(secs)),
            _ => Err(ApiError::BadRequest(format!(
                "ttl_secs must be a whole number of seconds from {} to {}",
                Self::MIN,
                Self::MAX
            ))),
        }
    }

    pub fn get(self) -> u64 {
        self.0
    }
}

impl Default for TtlSecs {
    fn default() -> Self {
        TtlSecs(3600)
    }
}

/// A stored upload and the ttl it was given.
#[derive(Debug, Clone)]
pub struct Uploaded {
    pub record: FileRecord,
    pub ttl: TtlSecs,
}

/// Refuses a body whose declared length already says the file cannot fit, before any of it
/// is read.
pub fn check_declared_length(content_length: Option<u64>, max_bytes: u64) -> Result<(), ApiError> {
    match content_length {
        Some(len) if len > max_bytes.saturating_add(ENVELOPE_MAX_BYTES) => {
            Err(too_large(max_bytes))
        }
        _ => Ok(()),
    }
}

fn too_large(max_bytes: u64) -> ApiError {
    ApiError::TooLarge(format!(
        "the file is larger than the limit of {max_bytes} bytes"
    ))
}

/// The body carried more than [`ENVELOPE_MAX_BYTES`] besides the file.
#[derive(Debug, thiserror::Error)]
#[error("the multipart envelope is too large")]
struct EnvelopeTooLarge;

type BoxError = Box<dyn StdError + Send + Sync>;

/// The body as the parser sees it: it fails once more than [`ENVELOPE_MAX_BYTES`] of it
/// were not file bytes taken out of the parser (`file_bytes`), which bounds what the parser
/// may buffer while looking for the end of a part's headers; and chunks reach the parser
/// one per poll (see [`OneChunkPerPoll`]).
fn pace_and_guard<S, E>(
    body: S,
    file_bytes: Arc<AtomicU64>,
) -> impl Stream<Item = Result<Bytes, BoxError>> + Send + 'static
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Into<BoxError> + 'static,
{
    let mut total: u64 = 0;
    let guarded = body.map(move |chunk| {
        let chunk = chunk.map_err(Into::into)?;
        total += chunk.len() as u64;
        if total.saturating_sub(file_bytes.load(Ordering::Relaxed)) > ENVELOPE_MAX_BYTES {
            return Err(Box::new(EnvelopeTooLarge) as BoxError);
        }
        Ok(chunk)
    });
    OneChunkPerPoll {
        inner: Box::pin(guarded),
        paused: false,
    }
}

/// After each chunk, answers `Pending` once (waking itself at once). multer pulls
/// everything a stream has ready into its buffer before parsing, which for a fast enough
/// source would be the whole body; this way it holds one chunk at a time. (Hyper's request
/// bodies happen to behave like this already; this keeps the bound from depending on it.)
struct OneChunkPerPoll<S> {
    inner: Pin<Box<S>>,
    paused: bool,
}

impl<S: Stream> Stream for OneChunkPerPoll<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        if self.paused {
            self.paused = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let item = ready!(self.inner.as_mut().poll_next(cx));
        self.paused = item.is_some();
        Poll::Ready(item)
    }
}

fn multipart_error(e: multer::Error, max_bytes: u64) -> ApiError {
    match e {
        multer::Error::StreamReadFailed(inner) if inner.is::<EnvelopeTooLarge>() => {
            ApiError::TooLarge(format!(
                "the multipart fields besides the file exceed {ENVELOPE_MAX_BYTES} bytes"
            ))
        }
        // The client went away or the connection broke; nobody is listening for this.
        multer::Error::StreamReadFailed(_) => {
            ApiError::bad_request("the upload ended before it was complete")
        }
        multer::Error::StreamSizeExceeded { .. } | multer::Error::FieldSizeExceeded { .. } => {
            too_large(max_bytes)
        }
        other => ApiError::BadRequest(format!("malformed multipart body: {other}")),
    }
}

/// The file's bytes in a temp file, with their size and hash.
struct Spooled {
    temp: NamedTempFile,
    size: u64,
    sha256: String,
}

/// Streams the `file` field into a temp file in `dir`, counting and hashing on the way,
/// and fails as soon as it passes `max_bytes`.
async fn spool(
    field: &mut multer::Field<'_>,
    dir: &Path,
    max_bytes: u64,
    file_bytes: &AtomicU64,
) -> Result<Spooled, ApiError> {
    // Creating and later renaming a file in the data dir are single quick syscalls.
    let temp = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .tempfile_in(dir)?;
    let mut out = BufWriter::with_capacity(
        WRITE_BUFFER_BYTES,
        tokio::fs::File::from_std(temp.as_file().try_clone()?),
    );
    let mut hasher = Sha256::new();
    let mut size: u64 = 0;
    while let Some(chunk) = field
        .chunk()
        .await
        .map_err(|e| multipart_error(e, max_bytes))?
    {
        size += chunk.len() as u64;
        file_bytes.store(size, Ordering::Relaxed);
        if size > max_bytes {
            return Err(too_large(max_bytes));
        }
        hasher.update(&chunk);
        out.write_all(&chunk).await?;
    }
    // Not fsynced: an upload lives an hour or so, and a power cut that loses one costs the
    // app a re-upload; syncing every upload would cost every app its latency.
    out.flush().await?;
    Ok(Spooled {
        temp,
        size,
        sha256: hex::encode(hasher.finalize()),
    })
}

/// Reads a small text field (such as `ttl_secs`) whole.
async fn small_text(field: &mut multer::Field<'_>, max_bytes: u64) -> Result<String, ApiError> {
    const LIMIT: usize = 64;
    let mut buf = Vec::new();
    while let Some(chunk) = field
        .chunk()
        .await
        .map_err(|e| multipart_error(e, max_bytes))?
    {
        buf.extend_from_slice(&chunk);
        if buf.len() > LIMIT {
            break;
        }
    }
    match String::from_utf8(buf) {
        Ok(s) if s.len() <= LIMIT => Ok(s),
        _ => Err(ApiError::bad_request("ttl_secs must be a short number")),
    }
}

/// Receives a `multipart/form-data` body with boundary `boundary`: field `file` (required,
/// at most `max_bytes` bytes) and `ttl_secs` (optional), in any order, nothing else. On
/// success the bytes are at `uploads_dir/<file token>` and the row and its `upload` audit
/// row are written.
pub async fn receive<S, E>(
    db: &Db,
    uploads_dir: &Path,
    max_bytes: u64,
    token_id: &str,
    boundary: String,
    body: S,
) -> Result<Uploaded, ApiError>
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Into<BoxError> + 'static,
{
    let started = Instant::now();
    let file_bytes = Arc::new(AtomicU64::new(0));
    let mut parts = multer::Multipart::new(pace_and_guard(body, file_bytes.clone()), boundary);
    let mut file: Option<(String, Spooled)> = None;
    let mut ttl: Option<TtlSecs> = None;
    while let Some(mut field) = parts
        .next_field()
        .await
        .map_err(|e| multipart_error(e, max_bytes))?
    {
        match field.name() {
            Some("file") if file.is_none() => {
                let filename = field.file_name().unwrap_or("").to_string();
                if filename.len() > FILENAME_MAX_BYTES {
                    return Err(ApiError::BadRequest(format!(
                        "the filename is longer than {FILENAME_MAX_BYTES} bytes"
                    )));
                }
                let spooled = spool(&mut field, uploads_dir, max_bytes, &file_bytes).await?;
                file = Some((filename, spooled));
            }
            Some("ttl_secs") if ttl.is_none() => {
                ttl = Some(TtlSecs::parse(&small_text(&mut field, max_bytes).await?)?);
            }
            Some(name @ ("file" | "ttl_secs")) => {
                return Err(ApiError::BadRequest(format!(
                    "field {name} was given more than once"
                )))
            }
            Some(other) => {
                return Err(ApiError::BadRequest(format!(
                    "unknown field {:?}; expected file and optionally ttl_secs",
                    other.chars().take(64).collect::<String>()
                )))
            }
            None => return Err(ApiError::bad_request("a multipart part has no name")),
        }
    }
    let Some((filename, spooled)) = file else {
        return Err(ApiError::bad_request(
            "the multipart field file is required",
        ));
    };
    let ttl = ttl.unwrap_or_default();
    let created_at = now_ms();
    let record = FileRecord {
        file_token: random_base62("ff_", FILE_TOKEN_CHARS),
        token_id: token_id.to_string(),
        stored_name: sanitize::sanitize(&filename),
        filename,
        size: spooled.size,
        sha256: spooled.sha256,
        created_at,
        expires_at: created_at + (ttl.get() as i64) * 1000,
    };
    let audit = AuditEntry {
        token_id: Some(token_id.to_string()),
        kind: "upload".into(),
        subject: Some(record.file_token.clone()),
        detail: Some(format!("{} bytes", record.size)),
        duration_ms: Some(started.elapsed().as_millis() as i64),
        ..AuditEntry::default()
    };
    // Committed in its own task: a client hanging up now cannot separate the bytes from
    // their row (the file then simply expires unused).
    let commit = tokio::spawn(commit(
        db.clone(),
        uploads_dir.join(&record.file_token),
        spooled.temp,
        record.clone(),
        audit,
    ));
    commit.await.map_err(ApiError::internal)??;
    Ok(Uploaded { record, ttl })
}

/// Renames the temp file into place, then writes the row and the audit row in one
/// transaction; if that fails the bytes go again.
async fn commit(
    db: Db,
    path: std::path::PathBuf,
    temp: NamedTempFile,
    record: FileRecord,
    audit: AuditEntry,
) -> Result<(), ApiError> {
    temp.persist_noclobber(&path)
        .map_err(|e| ApiError::from(e.error))?;
    let written = db
        .write(move |c| {
            let tx = c.transaction()?;
            super::insert(&tx, &record)?;
            audit::insert(&tx, &audit)?;
            tx.commit()
        })
        .await;
    if let Err(e) = written {
        let _ = tokio::fs::remove_file(&path).await;
        return Err(e.into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::stream;

    const B: &str = "xyzzy";

    /// A body that starts with `head` and then sends `n` chunks of 64 KiB of `x`.
    fn body(
        head: String,
        n: usize,
        tail: &'static str,
    ) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        stream::iter(
            std::iter::once(Bytes::from(head))
                .chain(std::iter::repeat_n(chunk, n))
                .chain(std::iter::once(Bytes::from(tail)))
                .map(Ok),
        )
    }

    fn file_head(filename: &str) -> String {
        format!(
            "--{B}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n\r\n"
        )
    }

    #[tokio::test]
    async fn file_bytes_stream_through_and_do_not_count_as_envelope() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.db")).unwrap();
        // 160 chunks = 10 MiB, well past ENVELOPE_MAX_BYTES.
        let size = 160 * 64 * 1024;
        let up = receive(
            &db,
            dir.path(),
            size as u64,
            "tok_a",
            B.into(),
            body(file_head("a.bin"), 160, "\r\n--xyzzy--\r\n"),
        )
        .await
        .unwrap();
        assert_eq!(up.record.size, size as u64);
        assert_eq!(
            up.record.sha256,
            hex::encode(Sha256::digest(vec![b'x'; size]))
        );
        let stored = std::fs::metadata(dir.path().join(&up.record.file_token)).unwrap();
        assert_eq!(stored.len(), size as u64);
        db.close().await;
    }

    #[tokio::test]
    async fn a_body_in_one_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.db")).unwrap();
        let whole = format!("{}hello\r\n--{B}--\r\n", file_head("a.txt"));
        let body = stream::iter([Ok::<_, std::io::Error>(Bytes::from(whole))]);
        let up = receive(&db, dir.path(), 5, "tok_a", B.into(), body)
            .await
            .unwrap();
        assert_eq!(
            (up.record.size, up.record.stored_name.as_str()),
            (5, "a.txt")
        );
        db.close().await;
    }

    #[tokio::test]
    async fn part_headers_cannot_grow_without_bound() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.db")).unwrap();
        // A filename that never ends: the parser would buffer all of it.
        let head = format!("--{B}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"");
        let err = receive(
            &db,
            dir.path(),
            u64::MAX,
            "tok_a",
            B.into(),
            body(head, 100, ""),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ApiError::TooLarge(_)), "{err:?}");
        db.close().await;
    }

    #[test]
    fn ttl_bounds() {
        assert_eq!(TtlSecs::default().get(), 3600);
        assert_eq!(TtlSecs::parse("60").unwrap().get(), 60);
        assert_eq!(TtlSecs::parse(" 86400\r\n").unwrap().get(), 86_400);
        for bad in ["59", "86401", "0", "-60", "1e3", "", "abc", "3600.0"] {
            assert!(TtlSecs::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn declared_length_leaves_room_for_the_envelope() {
        assert!(check_declared_length(None, 10).is_ok());
        assert!(check_declared_length(Some(10 + ENVELOPE_MAX_BYTES), 10).is_ok());
        assert!(check_declared_length(Some(11 + ENVELOPE_MAX_BYTES), 10).is_err());
        assert!(check_declared_length(Some(u64::MAX), u64::MAX).is_ok());
    }
}
