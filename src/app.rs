//! The application: its shared state, start-up (database, reconciliation, probes,
//! background tasks) and the serve loop with graceful shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::tokens;
use crate::auth::AllowList;
use crate::config::Config;
use crate::governance::{Admitter, Governor};
use crate::http::extract::{admin_digest, LastUsed};
use crate::http::serve::Limits;
use crate::lock::DataDirLock;
use crate::metrics::Metrics;
use crate::probe::Probes;
use crate::runner::warm::WarmPool;
use crate::runner::Runner;
use crate::sessions::Sessions;
use crate::slots::Slots;
use crate::store::Db;
use crate::supervise::Supervisor;
use crate::sweeper::{Sweep, Sweeper};

/// How often batched `last_used_at` stamps are written.
const LAST_USED_FLUSH: Duration = Duration::from_secs(5);
/// How long shutdown waits for in-flight requests after their children were told to stop.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long the first CLI probe may hold up start-up.
const FIRST_PROBE_LIMIT: Duration = Duration::from_secs(6);

/// Everything handlers share.
pub struct AppState {
    pub config: Arc<Config>,
    pub db: Db,
    pub probes: Probes,
    pub started_at: Instant,
    pub last_used: LastUsed,
    /// Cancelled when the server begins shutting down; long-running work watches it.
    pub shutdown: CancellationToken,
    pub allow_cidrs: AllowList,
    pub trusted_proxies: AllowList,
    pub admin_digest: Option<[u8; 32]>,
    /// Admission control for agent processes (runs and turns).
    pub slots: Slots,
    /// Sessions and their turns.
    pub sessions: Sessions,
    /// One-shot runs.
    pub runner: Runner,
    /// A sweep pass's handles (`sweeper::sweep_once`).
    pub sweep: Sweep,
    /// Pre-started claude processes for /run.
    pub warm: Arc<WarmPool>,
    /// Per-token admission (concurrency, rate) and the usage-limit block; see `governance`.
    pub governor: Governor,
    pub metrics: Arc<Metrics>,
    /// The one lifecycle of agent processes answering requests (runs, turns).
    pub supervisor: Supervisor,
    /// The gate every run and turn passes before it spawns.
    pub admitter: Admitter,
}

impl AppState {
    /// The largest JSON body accepted: a prompt at the byte limit may grow up to six-fold
    /// when JSON-escaped (`\u0000`), plus room for the other fields.
    pub fn json_body_limit(&self) -> usize {
        self.config
            .settings
            .max_prompt_bytes
            .saturating_mul(6)
            .saturating_add(64 * 1024)
    }

    /// Called after a token is revoked (by the admin API) to stop what it owns: its
    /// sessions are closed (a running turn is stopped first).
    pub async fn on_token_revoked(&self, token_id: &str) {
        match crate::sessions::close_all_of(&self.sessions, token_id).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                token_id,
                sessions = n,
                "closed the sessions of a revoked token"
            ),
            Err(e) => {
                tracing::warn!(token_id, error = %e, "could not close the sessions of a revoked token")
            }
        }
    }
}

/// A started application: state built, database open, background tasks running.
pub struct App {
    state: Arc<AppState>,
    sweeper: Sweeper,
    /// Released when the app is dropped, after the database is closed.
    lock: DataDirLock,
}

impl App {
    /// Opens the database, reconciles what a previous process left behind, probes the CLIs
    /// (bounded), and starts the background tasks.
    pub async fn start(config: Config) -> anyhow::Result<App> {
        let config = Arc::new(config);
        for dir in [
            &config.settings.data_dir,
            &config.runs_dir,
            &config.sessions_dir,
            &config.uploads_dir,
        ] {
            std::fs::create_dir_all(dir)
                .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
        }
        // Before anything looks at processes or rows another live server may own.
        let lock = DataDirLock::acquire(&config.settings.data_dir)?;
        let damage = crate::store::damage(&config.db_path);
        if !damage.is_empty() {
            anyhow::bail!(
                "{} is damaged ({}); refusing to serve it. Fix: {}",
                config.db_path.display(),
                damage.join("; "),
                crate::doctor::DB_FIX
            );
        }
        let db = Db::open(&config.db_path)
            .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", config.db_path.display()))?;
        reconcile(&db, &config).await?;

        let probes = Probes::default();
        if tokio::time::timeout(FIRST_PROBE_LIMIT, probes.refresh(&config))
            .await
            .is_err()
        {
            tracing::warn!(
                "CLI probe did not finish at start-up; /healthz reports them absent for now"
            );
        }
        let shutdown = CancellationToken::new();
        probes.spawn_refresher(config.clone(), shutdown.clone());

        let warm = WarmPool::new(config.clone(), db.clone(), shutdown.clone());
        warm.spawn_keeper(probes.subscribe());
        let slots = Slots::new(
            config.settings.max_concurrent as usize,
            config.settings.max_queue as usize,
            Duration::from_secs(config.settings.queue_timeout_secs),
        );
        let metrics = Arc::new(Metrics::new(slots.clone(), probes.clone()));
        let governor = Governor::default();
        let supervisor = Supervisor::new(
            config.clone(),
            db.clone(),
            metrics.clone(),
            governor.clone(),
            shutdown.clone(),
        );
        let admitter = Admitter::new(db.clone(), governor.clone(), slots.clone());
        let runner = Runner::new(
            config.clone(),
            warm.clone(),
            admitter.clone(),
            supervisor.clone(),
        );
        let sessions = Sessions::new(
            config.clone(),
            db.clone(),
            admitter.clone(),
            supervisor.clone(),
            shutdown.clone(),
        );
        let sweep = Sweep::new(
            config.clone(),
            db.clone(),
            sessions.clone(),
            metrics.clone(),
        );
        let state = Arc::new(AppState {
            warm,
            metrics,
            governor,
            supervisor,
            admitter,
            runner,
            sessions,
            sweep: sweep.clone(),
            allow_cidrs: AllowList(config.settings.allow_cidrs.clone()),
            trusted_proxies: AllowList(config.settings.trusted_proxies.clone()),
            admin_digest: config
                .settings
                .admin_bootstrap_token
                .as_deref()
                .map(admin_digest),
            slots,
            config,
            db,
            probes,
            started_at: Instant::now(),
            last_used: LastUsed::default(),
            shutdown,
        });
        spawn_last_used_flusher(state.clone());
        // The start-up pass runs before the server listens, so nothing races it.
        crate::sweeper::sweep_once(&sweep).await;
        let sweeper = Sweeper::start(sweep, state.shutdown.clone()).await?;
        state.sessions.start().await;
        Ok(App {
            state,
            sweeper,
            lock,
        })
    }

    pub fn state(&self) -> Arc<AppState> {
        self.state.clone()
    }

    pub fn router(&self) -> axum::Router {
        crate::http::router(self.state.clone())
    }

    /// Serves until `shutdown` resolves, then stops accepting, tells running work to stop,
    /// waits (bounded) for in-flight answers, flushes and closes the database.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let state = self.state.clone();
        let router = self.router();
        let sweeper = self.sweeper;
        let lock = self.lock;
        let settings = &state.config.settings;
        let limits = Limits {
            header_timeout: Duration::from_secs(settings.header_timeout_secs),
            body_timeout: Duration::from_secs(settings.body_timeout_secs),
            max_connections: settings.max_connections as usize,
            allow_cidrs: state.allow_cidrs.clone(),
            trusted_proxies: state.trusted_proxies.clone(),
        };
        let stop = state.shutdown.clone();
        let signal = tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutting down");
            stop.cancel();
        });
        crate::http::serve::serve(
            listener,
            router,
            limits,
            state.shutdown.clone(),
            SHUTDOWN_GRACE,
        )
        .await;
        signal.abort();
        state.shutdown.cancel();
        sweeper.stop().await;
        state.sessions.shutdown().await;
        state.warm.shutdown().await;
        flush_last_used(&state).await;
        state.db.clone().close().await;
        drop(lock);
        Ok(())
    }
}

/// Starts the application and serves on `listener` until `shutdown` resolves. `main` and
/// the tests both come through here.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    App::start(config).await?.serve(listener, shutdown).await
}

async fn flush_last_used(state: &AppState) {
    let stamps = state.last_used.take();
    if stamps.is_empty() {
        return;
    }
    if let Err(e) = state
        .db
        .write(move |c| tokens::touch_many(c, &stamps))
        .await
    {
        tracing::warn!(error = %e, "could not record token use");
    }
}

fn spawn_last_used_flusher(state: Arc<AppState>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(LAST_USED_FLUSH);
        loop {
            tokio::select! {
                _ = state.shutdown.cancelled() => break,
                _ = tick.tick() => flush_last_used(&state).await,
            }
        }
    });
}

/// Start-up reconciliation, the one place it happens, before anything serves. What a
/// previous process (crashed, killed or stopped) left behind, in this order:
/// 1. agent process groups it recorded in `live_processes` that are still alive are killed
///    (start time checked, so a reused pid is left alone), and the run dirs they owned go;
/// 2. every other run dir goes (no run is live yet);
/// 3. acpx queue owners busy with a turn that was in flight, or serving a closed session,
///    are stopped, and stale acpx locks removed;
/// 4. uploads interrupted mid-write are removed;
/// 5. audit rows still `running` (the work in flight) are marked `abandoned` — last, so
///    nothing of that work can still be running when its row says it ended — and the
///    `Idempotency-Key`s that work held are released, so a retry runs it afresh.
///
/// Then `App::start` runs one sweep pass (idle sessions, expired uploads, old audit rows)
/// before the server listens.
async fn reconcile(db: &Db, config: &Config) -> anyhow::Result<()> {
    // Whatever the previous process left running is killed before its rows are
    // marked abandoned, so nothing it started outlives this start-up.
    let (killed, dirs) = crate::process::reconcile(db).await?;
    if killed + dirs > 0 {
        tracing::warn!(killed, dirs, "cleaned up after the previous process");
    }
    remove_orphan_run_dirs(&config.runs_dir);
    let in_flight = db
        .read(|c| crate::audit::running_subjects(c, "turn"))
        .await?;
    let owners = crate::sessions::reconcile_owners(db, config, &in_flight).await?;
    if owners > 0 {
        tracing::warn!(
            owners,
            "stopped acpx queue owners busy with abandoned turns"
        );
    }
    let orphans = crate::files::remove_orphans(db, &config.uploads_dir).await?;
    if orphans > 0 {
        tracing::warn!(orphans, "removed uploads interrupted by the last shutdown");
    }
    let abandoned = db.write(|c| crate::audit::abandon_running(c)).await?;
    if abandoned > 0 {
        tracing::warn!(
            abandoned,
            "marked work in flight at the last shutdown as abandoned"
        );
    }
    db.write(|c| crate::governance::idempotency::release_running(c))
        .await?;
    Ok(())
}

/// At start-up no run is live, so every run dir is an orphan.
fn remove_orphan_run_dirs(runs_dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(runs_dir) else {
        return;
    };
    for entry in entries.flatten() {
        crate::process::remove_dir(&entry.path());
    }
}
