//! SQLite storage: the one writer connection, owned by a dedicated thread fed by a channel
//! of closures with oneshot replies (so async code never blocks on SQLite), a small pool of
//! read-only connections used from `spawn_blocking`, and the embedded migrations.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use tokio::sync::{mpsc, oneshot};

/// Migrations, applied in order; `PRAGMA user_version` records how many have run.
const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_init.sql"),
    include_str!("migrations/0002_audit_warm.sql"),
    include_str!("migrations/0003_sessions.sql"),
    include_str!("migrations/0004_governance.sql"),
    include_str!("migrations/0005_allowed_tools.sql"),
    include_str!("migrations/0006_hardening.sql"),
    include_str!("migrations/0007_idempotency.sql"),
];

/// How long a connection waits for a lock held by another connection (or process, such as
/// `clawdforge tokens mint` while the server runs) before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database error: {0}")]
    Io(#[from] std::io::Error),
    #[error("the database task has stopped")]
    Closed,
    #[error("database migration {index} failed: {source}")]
    Migration {
        index: usize,
        source: rusqlite::Error,
    },
}

pub type StoreResult<T> = Result<T, StoreError>;

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// What the writer thread is sent: a job, or the order to stop (sent by [`Db::close`];
/// other clones may still hold senders, so the channel closing is not enough).
enum Msg {
    Job(Job),
    Stop,
}

/// Handle to the database. Cheap to clone.
#[derive(Clone)]
pub struct Db {
    writer: mpsc::UnboundedSender<Msg>,
    readers: Arc<Mutex<Vec<Connection>>>,
    path: PathBuf,
    /// The file opened, to notice it being deleted or replaced while the server runs.
    identity: Option<(u64, u64)>,
    writer_thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "foreign_keys", true)?;
    Ok(())
}

fn open_writer(path: &Path) -> StoreResult<Connection> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    // Switching a new database to WAL takes an exclusive lock, and SQLite answers BUSY at
    // once (without its busy handler) when two processes do it together, e.g. the server
    // and `clawdforge tokens mint` on a fresh data dir: retry the whole open for a while.
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    loop {
        match try_open_writer(path) {
            Err(StoreError::Sqlite(rusqlite::Error::SqliteFailure(f, _)))
                if f.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

fn try_open_writer(path: &Path) -> StoreResult<Connection> {
    let mut conn = Connection::open(path)?;
    configure(&conn)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // NORMAL is durable across application crashes in WAL mode; only a power loss can
    // drop the last transactions, which is the usual trade for an appliance.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    migrate(&mut conn)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> StoreResult<()> {
    // One write transaction for the whole check-and-apply, so two processes opening a new
    // database at once (the server and `clawdforge tokens mint`) cannot both apply the same
    // migration: the second waits on the lock (busy_timeout), then sees it done.
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let done: usize = tx.pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))? as usize;
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(done) {
        tx.execute_batch(sql)
            .map_err(|source| StoreError::Migration {
                index: index + 1,
                source,
            })?;
        tx.pragma_update(None, "user_version", (index + 1) as i64)?;
    }
    tx.commit()?;
    Ok(())
}

/// `PRAGMA quick_check` on the database at `path`, if it exists: the problems it reports
/// (empty when the file is sound). A file SQLite cannot even read counts as one problem.
/// Run before serving: a damaged file otherwise serves wrong answers quietly (valid tokens
/// unknown, the usage ledger read as zero, i.e. budgets reset).
pub fn damage(path: &Path) -> Vec<String> {
    if !path.exists() {
        return Vec::new();
    }
    let check = || -> rusqlite::Result<Vec<String>> {
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        configure(&conn)?;
        let mut stmt = conn.prepare("PRAGMA quick_check(20)")?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows.into_iter().filter(|r| r != "ok").collect())
    };
    check().unwrap_or_else(|e| vec![e.to_string()])
}

/// Which file a path names: (device, inode).
fn identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

impl Db {
    /// Whether storage still works as opened: the database path still names the file this
    /// handle writes to (not deleted or replaced under it), and `dir` takes a new file.
    pub fn storage_sound(&self, dir: &Path) -> bool {
        identity(&self.path).is_some_and(|now| Some(now) == self.identity)
            && tempfile::Builder::new()
                .prefix(".clawdforge-probe-")
                .tempfile_in(dir)
                .is_ok()
    }

    /// Opens (creating if needed) the database at `path`, applies migrations, and starts
    /// the writer thread.
    pub fn open(path: &Path) -> StoreResult<Db> {
        let mut conn = open_writer(path)?;
        let (tx, mut rx) = mpsc::unbounded_channel::<Msg>();
        let handle = std::thread::Builder::new()
            .name("clawdforge-db".into())
            .spawn(move || {
                while let Some(Msg::Job(job)) = rx.blocking_recv() {
                    job(&mut conn);
                }
                // Dropping the connection here checkpoints the WAL and closes cleanly.
                drop(conn);
            })?;
        Ok(Db {
            writer: tx,
            readers: Arc::new(Mutex::new(Vec::new())),
            path: path.to_path_buf(),
            identity: identity(path),
            writer_thread: Arc::new(Mutex::new(Some(handle))),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the writer connection. Every write goes through here, so writes are
    /// serialised without lock contention inside the process.
    pub async fn write<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let _ = tx.send(f(conn));
        });
        self.writer
            .send(Msg::Job(job))
            .map_err(|_| StoreError::Closed)?;
        Ok(rx.await.map_err(|_| StoreError::Closed)??)
    }

    /// Runs `f` on a read-only connection from the pool, on a blocking thread. WAL lets
    /// these run alongside the writer.
    pub async fn read<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let db = self.clone();
        tokio::task::spawn_blocking(move || db.read_blocking(f))
            .await
            .map_err(|_| StoreError::Closed)?
    }

    fn read_blocking<T, F>(&self, f: F) -> StoreResult<T>
    where
        F: FnOnce(&Connection) -> rusqlite::Result<T>,
    {
        let pooled = self.readers.lock().map(|mut p| p.pop()).unwrap_or(None);
        let conn = match pooled {
            Some(c) => c,
            None => {
                let c = Connection::open_with_flags(
                    &self.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                configure(&c)?;
                c
            }
        };
        let out = f(&conn);
        if let Ok(mut pool) = self.readers.lock() {
            // A handful of idle readers is plenty for two cores; drop the rest.
            if pool.len() < 8 {
                pool.push(conn);
            }
        }
        Ok(out?)
    }

    /// Stops the writer thread after the queued writes have run and closes every
    /// connection. Other clones become unusable (their calls answer `Closed`).
    pub async fn close(self) {
        if let Ok(mut pool) = self.readers.lock() {
            pool.clear();
        }
        let handle = self.writer_thread.lock().ok().and_then(|mut h| h.take());
        let _ = self.writer.send(Msg::Stop);
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }
}

/// Opens the database for a one-off command (tokens, backup, doctor) without a server.
pub fn open_blocking(path: &Path) -> StoreResult<Connection> {
    open_writer(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn migrations_create_strict_wal_tables() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.db")).unwrap();
        let mode: String = db
            .read(|c| c.pragma_query_value(None, "journal_mode", |r| r.get(0)))
            .await
            .unwrap();
        assert_eq!(mode, "wal");
        let sql: String = db
            .read(|c| {
                c.query_row(
                    "SELECT sql FROM sqlite_master WHERE name='tokens'",
                    [],
                    |r| r.get(0),
                )
            })
            .await
            .unwrap();
        assert!(sql.contains("STRICT"));
        db.close().await;
        // Re-opening applies nothing twice.
        let db = Db::open(&dir.path().join("t.db")).unwrap();
        db.close().await;
    }

    #[test]
    fn concurrent_first_opens_migrate_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("race.db");
        let openers: Vec<_> = (0..4)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || open_blocking(&path).map(|_| ()))
            })
            .collect();
        for o in openers {
            o.join().unwrap().expect("every opener succeeds");
        }
    }
}
