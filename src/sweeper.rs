//! The sweeper: every `CLAWDFORGE_SWEEP_INTERVAL_SECS` (on a `tokio-cron-scheduler` job)
//! and once at start-up, it soft-closes sessions idle past `CLAWDFORGE_SESSION_TTL_SECS`
//! (and those of tokens revoked offline), deletes sessions closed past
//! `CLAWDFORGE_SESSION_HARD_TTL_SECS` with their acpx records, deletes expired uploads,
//! removes run and session dirs that nothing owns, trims the audit log past
//! `CLAWDFORGE_AUDIT_RETENTION_DAYS`, and deletes `Idempotency-Key`s older than 24 h. [`sweep_once`] is one pass, callable from tests.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use serde::Serialize;
use tokio_cron_scheduler::{Job, JobScheduler};

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::governance::idempotency;
use crate::metrics::Metrics;
use crate::sessions::{self, store, Sessions};
use crate::store::Db;
use crate::store::StoreError;
use crate::util::now_ms;

/// A run makes its dir just before its process is registered in `live_processes`; a dir
/// younger than this may be one in that window.
const RUN_DIR_GRACE: Duration = Duration::from_secs(600);
/// Idle sessions closed at once (each close runs acpx).
const CLOSE_PARALLEL: usize = 4;

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct SweepReport {
    pub sessions_closed: usize,
    pub sessions_deleted: usize,
    pub uploads_deleted: usize,
    pub run_dirs_removed: usize,
    pub session_dirs_removed: usize,
    pub audit_rows_deleted: usize,
    pub idempotency_keys_deleted: usize,
}

/// One pass. Passes never overlap (a slow one delays the next); a step that fails is
/// logged and the others still run.
pub async fn sweep_once(state: &Sweep) -> SweepReport {
    let _one_at_a_time = state.one_at_a_time.lock().await;
    let now = now_ms();
    let settings = &state.config.settings;
    let secs = |s: u64| i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX);
    let report = SweepReport {
        sessions_closed: counted(
            "closing idle sessions",
            close_idle(state, now.saturating_sub(secs(settings.session_ttl_secs))).await,
        ),
        sessions_deleted: counted(
            "deleting closed sessions",
            delete_closed(
                state,
                now.saturating_sub(secs(settings.session_hard_ttl_secs)),
            )
            .await,
        ),
        uploads_deleted: counted(
            "deleting expired uploads",
            crate::files::delete_expired(&state.db, &state.config.uploads_dir, now).await,
        ),
        run_dirs_removed: counted(
            "removing orphaned run dirs",
            remove_orphan_run_dirs(state).await,
        ),
        session_dirs_removed: counted(
            "removing orphaned session dirs",
            remove_orphan_session_dirs(state).await,
        ),
        audit_rows_deleted: counted("trimming the audit log", {
            let cutoff =
                now.saturating_sub(secs(u64::from(settings.audit_retention_days) * 86_400));
            state
                .db
                .write(move |c| crate::audit::trim_before(c, cutoff))
                .await
        }),
        idempotency_keys_deleted: counted("deleting old idempotency keys", {
            let cutoff = now.saturating_sub(idempotency::KEEP_MS);
            state
                .db
                .write(move |c| idempotency::delete_before(c, cutoff))
                .await
        }),
    };
    for (action, n) in [
        ("session_closed", report.sessions_closed),
        ("session_deleted", report.sessions_deleted),
        ("upload_deleted", report.uploads_deleted),
        ("run_dir_removed", report.run_dirs_removed),
        ("session_dir_removed", report.session_dirs_removed),
        ("audit_row_deleted", report.audit_rows_deleted),
        ("idempotency_key_deleted", report.idempotency_keys_deleted),
    ] {
        state.metrics.sweeper_action(action, n as u64);
    }
    if report == SweepReport::default() {
        tracing::debug!("sweep: nothing to do");
    } else {
        tracing::info!(
            sessions_closed = report.sessions_closed,
            sessions_deleted = report.sessions_deleted,
            uploads_deleted = report.uploads_deleted,
            run_dirs_removed = report.run_dirs_removed,
            session_dirs_removed = report.session_dirs_removed,
            audit_rows_deleted = report.audit_rows_deleted,
            idempotency_keys_deleted = report.idempotency_keys_deleted,
            "sweep"
        );
    }
    report
}

fn counted(step: &str, r: Result<usize, impl std::fmt::Display>) -> usize {
    r.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "sweep: {step} failed");
        0
    })
}

/// Open sessions whose last turn ended before `cutoff` and that run none now, and those
/// of tokens revoked behind the server's back (`clawdforge tokens revoke` works on the
/// database directly).
async fn close_idle(state: &Sweep, cutoff: i64) -> Result<usize, StoreError> {
    let idle = state.db.read(move |c| store::idle_since(c, cutoff)).await?;
    let closes = idle
        .into_iter()
        .filter(|s| !state.sessions.busy(&s.session_id))
        .map(|s| async move { sessions::close(&state.sessions, &s, "idle").await.is_ok() });
    let closed = futures_util::stream::iter(closes)
        .buffer_unordered(CLOSE_PARALLEL)
        .filter(|ok| std::future::ready(*ok))
        .count()
        .await;
    Ok(closed)
}

/// Sessions closed before `cutoff`: their row, acpx's record and Claude Code's transcript.
async fn delete_closed(state: &Sweep, cutoff: i64) -> Result<usize, StoreError> {
    let old = state
        .db
        .read(move |c| store::closed_before(c, cutoff))
        .await?;
    for s in &old {
        let cwd = Path::new(&s.cwd);
        sessions::acpx::delete_records(&state.config, s.acpx_record_id.as_deref(), cwd);
        crate::process::remove_dir(cwd);
        let id = s.session_id.clone();
        state.db.write(move |c| store::delete(c, &id)).await?;
    }
    Ok(old.len())
}

fn dir_names(dir: &Path) -> std::io::Result<Vec<(String, std::fs::Metadata)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)?.flatten() {
        if let Ok(meta) = entry.metadata() {
            if meta.is_dir() {
                out.push((entry.file_name().to_string_lossy().into_owned(), meta));
            }
        }
    }
    Ok(out)
}

/// Run dirs no live process owns, older than the grace period.
async fn remove_orphan_run_dirs(state: &Sweep) -> Result<usize, StoreError> {
    let runs_dir = state.config.runs_dir.clone();
    let live: HashSet<String> = state.db.read(crate::process::live_dirs).await?;
    let mut removed = 0;
    for (name, meta) in dir_names(&runs_dir)? {
        let path = runs_dir.join(&name);
        let young = meta
            .modified()
            .ok()
            .and_then(|m| SystemTime::now().duration_since(m).ok())
            .is_none_or(|age| age < RUN_DIR_GRACE);
        if young || live.contains(&path.display().to_string()) {
            continue;
        }
        if crate::process::remove_dir(&path) {
            removed += 1;
        }
    }
    Ok(removed)
}

/// Session dirs with no open or pooled session and nothing (creation, turn, close) running in them.
/// The dirs are listed first, then the running work, then the open rows: a session being
/// created holds its claim from before its dir exists until after its row does, so it is
/// always seen in one of the two.
async fn remove_orphan_session_dirs(state: &Sweep) -> Result<usize, StoreError> {
    let sessions_dir = state.config.sessions_dir.clone();
    let names = dir_names(&sessions_dir)?;
    let active: HashSet<String> = state.sessions.active_ids().into_iter().collect();
    let open: HashSet<String> = state.db.read(store::open_ids).await?;
    let mut removed = 0;
    for (name, _) in names {
        if active.contains(&name) || open.contains(&name) {
            continue;
        }
        if crate::process::remove_dir(&sessions_dir.join(&name)) {
            removed += 1;
        }
    }
    Ok(removed)
}

/// The scheduled sweeper; [`Sweeper::stop`] ends it.
/// What a sweep pass touches, built once at start-up.
#[derive(Clone)]
pub struct Sweep {
    config: Arc<Config>,
    db: Db,
    sessions: Sessions,
    metrics: Arc<Metrics>,
    /// Held by a pass, so passes never overlap.
    one_at_a_time: Arc<tokio::sync::Mutex<()>>,
}

impl Sweep {
    pub fn new(config: Arc<Config>, db: Db, sessions: Sessions, metrics: Arc<Metrics>) -> Sweep {
        Sweep {
            config,
            db,
            sessions,
            metrics,
            one_at_a_time: Arc::default(),
        }
    }
}

pub struct Sweeper {
    sched: JobScheduler,
}

impl Sweeper {
    /// Starts the periodic job (the first run comes one interval after start-up, which
    /// runs its own pass).
    pub async fn start(sweep: Sweep, shutdown: CancellationToken) -> anyhow::Result<Sweeper> {
        let state = Arc::new(sweep);
        let every = Duration::from_secs(state.config.settings.sweep_interval_secs);
        let sched = JobScheduler::new().await?;
        let job = Job::new_repeated_async(every, move |_id, _sched| {
            let (state, shutdown) = (state.clone(), shutdown.clone());
            Box::pin(async move {
                if !shutdown.is_cancelled() {
                    sweep_once(&state).await;
                }
            })
        })?;
        sched.add(job).await?;
        sched.start().await?;
        Ok(Sweeper { sched })
    }

    pub async fn stop(mut self) {
        if let Err(e) = self.sched.shutdown().await {
            tracing::warn!(error = %e, "could not stop the sweeper");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{self, AuditEntry, Outcome};
    use crate::governance::{Admitter, Governor};
    use crate::probe::Probes;
    use crate::slots::Slots;
    use crate::supervise::Supervisor;

    /// A sweep over a data dir of its own, with no server around it.
    fn sweep_for(dir: &Path) -> (Sweep, Db) {
        let config = Arc::new(Config::defaults_for(dir));
        for d in [&config.runs_dir, &config.sessions_dir, &config.uploads_dir] {
            std::fs::create_dir_all(d).unwrap();
        }
        let db = Db::open(&config.db_path).unwrap();
        let slots = Slots::new(1, 1, Duration::from_secs(1));
        let metrics = Arc::new(Metrics::new(slots.clone(), Probes::default()));
        let governor = Governor::default();
        let supervisor = Supervisor::new(
            config.clone(),
            db.clone(),
            metrics.clone(),
            governor.clone(),
            CancellationToken::new(),
        );
        let admitter = Admitter::new(db.clone(), governor, slots);
        let sessions = Sessions::new(
            config.clone(),
            db.clone(),
            admitter,
            supervisor,
            CancellationToken::new(),
        );
        (Sweep::new(config, db.clone(), sessions, metrics), db)
    }

    #[tokio::test]
    async fn a_pass_removes_what_nothing_owns_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let (sweep, db) = sweep_for(dir.path());
        let config = sweep.config.clone();

        // Run dirs: an old one that no live run owns goes; a young one may belong to a run
        // that is still being set up, so it stays.
        let old_run = config.runs_dir.join("run_old");
        let young_run = config.runs_dir.join("run_young");
        std::fs::create_dir_all(&old_run).unwrap();
        std::fs::create_dir_all(&young_run).unwrap();
        let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::open(&old_run)
            .unwrap()
            .set_modified(an_hour_ago)
            .unwrap();
        // A session dir with no session row and nothing running in it.
        let orphan_session = config.sessions_dir.join("ses_gone");
        std::fs::create_dir_all(&orphan_session).unwrap();
        // Audit rows: one past the retention, one fresh.
        let insert = |kind: &str| {
            let e = AuditEntry {
                kind: kind.into(),
                outcome: Some(Outcome::Ok),
                ..Default::default()
            };
            let db = db.clone();
            async move { db.write(move |c| audit::insert(c, &e)).await.unwrap() }
        };
        let old_row = insert("run").await;
        let fresh_row = insert("run").await;
        let days = i64::from(config.settings.audit_retention_days) + 1;
        db.write(move |c| {
            c.execute(
                "UPDATE audit SET at = at - ?2 WHERE id = ?1",
                rusqlite::params![old_row, days * 86_400_000],
            )
        })
        .await
        .unwrap();

        let report = sweep_once(&sweep).await;
        assert_eq!(report.run_dirs_removed, 1, "{report:?}");
        assert_eq!(report.session_dirs_removed, 1, "{report:?}");
        assert_eq!(report.audit_rows_deleted, 1, "{report:?}");
        assert_eq!(report.sessions_closed, 0);
        assert_eq!(report.uploads_deleted, 0);
        assert!(!old_run.exists());
        assert!(young_run.exists());
        assert!(!orphan_session.exists());
        let ids: Vec<i64> = db
            .read(|c| {
                let mut s = c.prepare("SELECT id FROM audit ORDER BY id")?;
                let rows = s.query_map([], |r| r.get(0))?;
                rows.collect()
            })
            .await
            .unwrap();
        assert_eq!(ids, vec![fresh_row]);

        // A second pass finds nothing left to do.
        assert_eq!(sweep_once(&sweep).await, SweepReport::default());
    }
}
