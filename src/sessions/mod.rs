//! Multi-turn sessions through `acpx`: creating, turning, cancelling and closing them, and
//! the rows that record them. Each session has its own working dir under
//! `ACPX_SESSIONS_CWD` and is an acpx named session (name = session id) in that dir.
//!
//! The [`SessionManager`] is the in-memory half: which sessions have something running
//! (a turn, a close, a creation). A session takes one thing at a time — that is what makes
//! a second turn `busy` — and a running turn can be told to stop from outside (cancel,
//! close, token revocation).

pub mod acp_log;
pub mod acpx;
pub mod pool;
pub mod store;
mod turn;
pub mod warm;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::ApiError;
use crate::governance::Admitter;
use crate::store::Db;
use crate::supervise::Supervisor;
pub use crate::supervise::{StopWhy, Stopper};
use crate::util::{new_id, now_ms};
use acpx::Target;
use store::SessionRecord;

pub use turn::{execute_turn, prepare_turn, run_turn, PreparedTurn, TurnAnswer, TurnInput};

/// Longest wait for `sessions ensure` (it starts the agent once to create the session).
const ENSURE_LIMIT: Duration = Duration::from_secs(120);
/// Longest wait for `sessions close`.
const CLOSE_LIMIT: Duration = Duration::from_secs(30);
/// How long a cancel or close waits for the running turn to wind down. A turn stops
/// within a few seconds however it is stopped; this only bounds a wedged one.
const STOP_WAIT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Creating,
    Turn,
    Closing,
    /// The warm-agent keeper is at work on it: stopping its idle agent to stay within
    /// `CLAWDFORGE_MAX_WARM_AGENTS`, or noting its ended turn and starting the next turn's
    /// client. A turn or a close waits for that (a moment) rather than racing it.
    Upkeep,
}

#[derive(Clone)]
struct Activity {
    kind: Kind,
    stop: Stopper,
    done: watch::Receiver<bool>,
}

impl Activity {
    /// Waits (bounded) until the activity's claim is released.
    async fn finished(mut self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.done.wait_for(|d| *d)).await;
    }
}

/// What runs in which session now.
#[derive(Default, Clone)]
pub struct SessionManager {
    active: Arc<Mutex<HashMap<String, Activity>>>,
    /// Told the id of every session whose turn ended (the warm-agent keeper listens).
    turn_ended: Option<mpsc::UnboundedSender<String>>,
}

/// The right to act on a session alone; released (and waiters woken) on drop.
pub struct Claim {
    active: Arc<Mutex<HashMap<String, Activity>>>,
    id: String,
    done: watch::Sender<bool>,
    pub stop: Stopper,
    /// Set for a turn's claim: its end is reported here.
    turn_ended: Option<mpsc::UnboundedSender<String>>,
}

impl Claim {
    pub fn session_id(&self) -> &str {
        &self.id
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Ok(mut map) = self.active.lock() {
            map.remove(&self.id);
        }
        let _ = self.done.send(true);
        if let Some(tx) = &self.turn_ended {
            let _ = tx.send(self.id.clone());
        }
    }
}

impl SessionManager {
    /// A manager that reports every ended turn's session id to `turn_ended`.
    fn reporting_to(turn_ended: mpsc::UnboundedSender<String>) -> Self {
        SessionManager {
            active: Arc::default(),
            turn_ended: Some(turn_ended),
        }
    }

    fn claim(&self, id: &str, kind: Kind) -> Result<Claim, Activity> {
        let mut map = self
            .active
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(a) = map.get(id) {
            return Err(a.clone());
        }
        let (done, rx) = watch::channel(false);
        let stop = Stopper::default();
        map.insert(
            id.to_string(),
            Activity {
                kind,
                stop: stop.clone(),
                done: rx,
            },
        );
        Ok(Claim {
            active: self.active.clone(),
            id: id.to_string(),
            done,
            stop,
            turn_ended: self.turn_ended.clone().filter(|_| kind == Kind::Turn),
        })
    }

    fn get(&self, id: &str) -> Option<Activity> {
        self.active.lock().ok().and_then(|m| m.get(id).cloned())
    }

    /// Claims `id` for a turn: `busy` if a turn runs, `session_closed` while it closes;
    /// an eviction of its agent is waited out.
    pub async fn claim_turn(&self, id: &str) -> Result<Claim, ApiError> {
        loop {
            match self.claim(id, Kind::Turn) {
                Ok(claim) => return Ok(claim),
                Err(a) => match a.kind {
                    Kind::Closing => return Err(ApiError::SessionClosed),
                    Kind::Turn | Kind::Creating => return Err(ApiError::Busy),
                    Kind::Upkeep => a.finished(STOP_WAIT).await,
                },
            }
        }
    }

    /// Claims `id` for the warm-agent keeper; `None` while anything else runs in it.
    fn claim_upkeep(&self, id: &str) -> Option<Claim> {
        self.claim(id, Kind::Upkeep).ok()
    }

    /// Whether a turn is running in `id`.
    pub fn busy(&self, id: &str) -> bool {
        self.get(id).is_some_and(|a| a.kind == Kind::Turn)
    }

    /// Ids with anything running (turn, close, creation).
    pub fn active_ids(&self) -> Vec<String> {
        self.active
            .lock()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Asks the running turn of `id` to cancel and waits for it to end; whether there
    /// was one.
    pub async fn cancel(&self, id: &str) -> bool {
        match self.get(id) {
            Some(a) if a.kind == Kind::Turn => {
                a.stop.stop(StopWhy::Cancel);
                a.finished(STOP_WAIT).await;
                true
            }
            _ => false,
        }
    }

    /// Claims `id` for closing, stopping a running turn (and waiting out another close).
    async fn claim_close(&self, id: &str) -> Claim {
        loop {
            match self.claim(id, Kind::Closing) {
                Ok(claim) => return claim,
                Err(a) => {
                    if a.kind == Kind::Turn {
                        a.stop.stop(StopWhy::Close);
                    }
                    a.finished(STOP_WAIT).await;
                }
            }
        }
    }
}

/// A validated `POST /sessions`.
#[derive(Debug, Clone)]
pub struct CreateInput {
    pub agent: String,
    pub model: String,
    pub system: Option<String>,
}

/// Sessions and their turns, with the handles they take: built once at start-up.
#[derive(Clone)]
pub struct Sessions {
    config: Arc<Config>,
    db: Db,
    /// What runs in which session now.
    active: SessionManager,
    admitter: Admitter,
    supervisor: Supervisor,
    /// Sessions whose agents may be alive, for `CLAWDFORGE_MAX_WARM_AGENTS`, and the
    /// acpx clients pre-started for their next turns.
    warm: Arc<warm::WarmAgents>,
    /// Sessions made ahead of time (`CLAWDFORGE_SESSION_POOL`).
    pool: Arc<pool::SessionPool>,
    /// Ended turns, until [`Sessions::start`] hands them to the warm-agent keeper.
    turn_ended: Arc<Mutex<Option<mpsc::UnboundedReceiver<String>>>>,
    /// Cancelled when the server begins shutting down.
    shutdown: CancellationToken,
}

impl Sessions {
    pub fn new(
        config: Arc<Config>,
        db: Db,
        admitter: Admitter,
        supervisor: Supervisor,
        shutdown: CancellationToken,
    ) -> Sessions {
        let (tx, rx) = mpsc::unbounded_channel();
        Sessions {
            config,
            db,
            active: SessionManager::reporting_to(tx),
            admitter,
            supervisor,
            warm: Arc::default(),
            pool: Arc::default(),
            turn_ended: Arc::new(Mutex::new(Some(rx))),
            shutdown,
        }
    }

    /// Discards what a previous process pooled, then starts the background keepers: the
    /// warm-agent limit (fed by ended turns) and the session pool. Called once, after the
    /// start-up sweep and before the server listens.
    pub async fn start(&self) {
        pool::discard_leftovers(self).await;
        let ended = self.turn_ended.lock().ok().and_then(|mut rx| rx.take());
        if let Some(ended) = ended {
            warm::spawn_keeper(self.clone(), ended);
        }
        pool::spawn_keeper(self.clone());
    }

    /// Shutdown: the keepers are joined, the pool's sessions discarded and pre-started
    /// clients stopped.
    pub async fn shutdown(&self) {
        pool::shutdown(self).await;
        warm::shutdown(self).await;
    }

    /// What `/healthz` shows as `warm_sessions`.
    pub fn warm_stats(&self) -> warm::WarmStats {
        warm::stats(self)
    }

    fn home(&self) -> Option<PathBuf> {
        acpx::children_home(&self.config)
    }

    /// Whether a turn is running in `id`.
    pub fn busy(&self, id: &str) -> bool {
        self.active.busy(id)
    }

    /// Ids with anything running (turn, close, creation).
    pub fn active_ids(&self) -> Vec<String> {
        self.active.active_ids()
    }
}

fn target(s: &SessionRecord) -> Target {
    Target {
        agent: s.agent.clone(),
        cwd: PathBuf::from(&s.cwd),
        name: s.acpx_name.clone(),
    }
}

/// The agent a session gets when `POST /sessions` names none.
pub const DEFAULT_AGENT: &str = "claude";

/// Creates a session: a pooled one when the request asks for nothing the pool's do not
/// have; otherwise its own working dir, `acpx sessions ensure` there (which starts the
/// agent once, so it takes a slot), and its row.
pub async fn create(
    state: &Sessions,
    token: &crate::auth::tokens::TokenRecord,
    input: CreateInput,
) -> Result<SessionRecord, ApiError> {
    let token_id = token.id.as_str();
    if !state.config.settings.agents.contains(&input.agent) {
        return Err(ApiError::BadRequest(format!(
            "agent must be one of: {}",
            state.config.settings.agents.join(", ")
        )));
    }
    if let Some(limit) = token.policy.max_open_sessions {
        let owner = token.id.clone();
        let open = state.db.read(move |c| store::open_count(c, &owner)).await?;
        if open >= limit {
            return Err(ApiError::TooManySessions { limit });
        }
    }
    // The token's policy (model, budget, concurrency, rate) applies to starting the agent,
    // and just the same to taking a pooled session.
    let _admission = state.admitter.admit(token, &input.model).await?;
    if pool::fits(&state.config, &input) {
        if let Some(s) = pool::take(state, token_id).await? {
            return Ok(s);
        }
    }
    let id = new_id("ses_");
    // Held until the row exists, so the sweeper never takes the new dir for an orphan.
    let _claim = state
        .active
        .claim(&id, Kind::Creating)
        .map_err(|_| ApiError::internal("a new session id is already in use"))?;
    let (t, record_id) = ensure_new(state, &id, &input).await?;
    let record = new_record(&id, token_id, input, &t, record_id, "open");
    let row = record.clone();
    if let Err(e) = state.db.write(move |c| store::insert(c, &row)).await {
        // A session without a row (a full disk) is nobody's: acpx closes it, and its queue
        // owner, records and dir go now rather than linger.
        let _ = acpx::control(&state.config, &state.db, &t, t.close_args(), CLOSE_LIMIT).await;
        forget(state, &id, record.acpx_record_id.as_deref(), &t.cwd).await;
        return Err(e.into());
    }
    Ok(record)
}

/// The row of a session acpx just created as `t`.
fn new_record(
    id: &str,
    token_id: &str,
    input: CreateInput,
    t: &Target,
    record_id: String,
    status: &str,
) -> SessionRecord {
    let now = now_ms();
    SessionRecord {
        session_id: id.to_string(),
        token_id: token_id.to_string(),
        agent: input.agent,
        model: input.model,
        system_prompt: input.system,
        acpx_name: id.to_string(),
        acpx_record_id: Some(record_id),
        cwd: t.cwd.display().to_string(),
        status: status.into(),
        created_at: now,
        last_used_at: now,
        closed_at: None,
        turn_count: 0,
        cost_total: 0.0,
        busy: false,
    }
}

/// Makes session `id`'s working dir and has acpx create the session there; the target
/// and acpx's record id. On failure nothing is left behind.
async fn ensure_new(
    state: &Sessions,
    id: &str,
    input: &CreateInput,
) -> Result<(Target, String), ApiError> {
    let dir = state.config.sessions_dir.join(id);
    tokio::fs::create_dir_all(&dir).await?;
    // acpx keys sessions by absolute cwd; a relative ACPX_SESSIONS_CWD must not leak in.
    let cwd = tokio::fs::canonicalize(&dir).await?;
    let t = Target {
        agent: input.agent.clone(),
        cwd: cwd.clone(),
        name: id.to_string(),
    };
    let ensured = acpx::control(
        &state.config,
        &state.db,
        &t,
        t.ensure_args(&input.model, input.system.as_deref()),
        ENSURE_LIMIT,
    )
    .await;
    let record_id = match &ensured {
        Ok(out) if out.code == Some(0) => out
            .action("session_ensured")
            .and_then(|v| v.get("acpxRecordId"))
            .and_then(|v| v.as_str())
            .map(str::to_string),
        _ => None,
    };
    let Some(record_id) = record_id else {
        crate::process::remove_dir(&cwd);
        let why = match ensured {
            Ok(out) => out.error_message(),
            Err(e) => e.to_string(),
        };
        tracing::warn!(error = %why, "acpx could not create a session");
        return Err(ApiError::Upstream(format!(
            "the agent could not start a session: {why}"
        )));
    };
    Ok((t, record_id))
}

/// Removes what a session that nobody will use has outside its row: its pre-started
/// client, its queue owner with the agent, acpx's records, Claude Code's transcript and
/// its working dir.
async fn forget(state: &Sessions, id: &str, record_id: Option<&str>, cwd: &std::path::Path) {
    state.warm.forget(id);
    if let (Some(home), Some(record_id)) = (state.home(), record_id) {
        acpx::stop_queue_owner(&home, record_id).await;
    }
    acpx::delete_records(&state.config, record_id, cwd);
    crate::process::remove_dir(cwd);
}

/// The caller's session (another token's is `not_found`, like a missing one), with `busy`.
pub async fn get(state: &Sessions, token_id: &str, id: &str) -> Result<SessionRecord, ApiError> {
    let (token_id, id) = (token_id.to_string(), id.to_string());
    let mut s = state
        .db
        .read(move |c| store::get_for(c, &token_id, &id))
        .await?
        .ok_or_else(|| ApiError::not_found("session"))?;
    s.busy = state.active.busy(&s.session_id);
    Ok(s)
}

/// The caller's sessions, newest first, with `busy`.
pub async fn list(
    state: &Sessions,
    token_id: &str,
    status: Option<String>,
) -> Result<Vec<SessionRecord>, ApiError> {
    let token_id = token_id.to_string();
    let mut sessions = state
        .db
        .read(move |c| store::list_for(c, &token_id, status.as_deref()))
        .await?;
    for s in &mut sessions {
        s.busy = state.active.busy(&s.session_id);
    }
    Ok(sessions)
}

/// Every token's sessions (for the operator), newest first, with `busy`.
pub async fn list_all(
    state: &Sessions,
    token_id: Option<String>,
    status: Option<String>,
) -> Result<Vec<SessionRecord>, ApiError> {
    let mut sessions = state
        .db
        .read(move |c| store::list_all(c, token_id.as_deref(), status.as_deref()))
        .await?;
    for s in &mut sessions {
        s.busy = state.active.busy(&s.session_id);
    }
    Ok(sessions)
}

/// Soft-closes any token's session for the operator, as its owner's close would; returns
/// it as it is now (with `busy`) and whether it was open before.
pub async fn close_any(state: &Sessions, id: &str) -> Result<(SessionRecord, bool), ApiError> {
    let lookup = id.to_string();
    let s = state
        .db
        .read(move |c| store::get(c, &lookup))
        .await?
        .ok_or_else(|| ApiError::not_found("session"))?;
    close(state, &s, "admin").await?;
    Ok((get(state, &s.token_id, id).await?, s.status == "open"))
}

/// Cancels the caller's running turn; whether there was one.
pub async fn cancel(state: &Sessions, token_id: &str, id: &str) -> Result<bool, ApiError> {
    let s = get(state, token_id, id).await?;
    Ok(state.active.cancel(&s.session_id).await)
}

/// Soft-closes the caller's session (idempotent) and returns it as it is now.
pub async fn close_for(
    state: &Sessions,
    token_id: &str,
    id: &str,
) -> Result<SessionRecord, ApiError> {
    let s = get(state, token_id, id).await?;
    close(state, &s, "client").await?;
    get(state, token_id, id).await
}

/// Soft close: stops a running turn, `acpx sessions close`, stops the queue owner and its
/// agent if close left them, removes the working dir, marks the row closed. The row stays
/// readable until the hard TTL.
pub async fn close(state: &Sessions, s: &SessionRecord, why: &str) -> Result<(), ApiError> {
    let _claim = state.active.claim_close(&s.session_id).await;
    // A client waiting for this session's next turn has no turn to wait for.
    state.warm.forget(&s.session_id);
    let id = s.session_id.clone();
    let current = state.db.read(move |c| store::get(c, &id)).await?;
    if current.as_ref().is_none_or(|c| c.status != "open") {
        return Ok(());
    }
    let t = target(s);
    match acpx::control(&state.config, &state.db, &t, t.close_args(), CLOSE_LIMIT).await {
        Ok(out) if out.code == Some(0) => {}
        Ok(out) => {
            tracing::warn!(session = %s.session_id, error = %out.error_message(), "acpx sessions close failed")
        }
        Err(e) => tracing::warn!(session = %s.session_id, error = %e, "acpx sessions close failed"),
    }
    if let (Some(home), Some(record_id)) = (state.home(), s.acpx_record_id.as_deref()) {
        if acpx::stop_queue_owner(&home, record_id).await {
            tracing::info!(session = %s.session_id, "stopped a queue owner that close left running");
        }
    }
    crate::process::remove_dir(&t.cwd);
    let id = s.session_id.clone();
    state
        .db
        .write(move |c| store::mark_closed(c, &id, now_ms()))
        .await?;
    tracing::info!(session = %s.session_id, why, "session closed");
    Ok(())
}

/// Closes every open session of a revoked token.
pub async fn close_all_of(state: &Sessions, token_id: &str) -> Result<usize, ApiError> {
    let token_id = token_id.to_string();
    let open = state
        .db
        .read(move |c| store::open_of_token(c, &token_id))
        .await?;
    let closes = open.iter().map(|s| close(state, s, "token revoked"));
    let results = futures_util::future::join_all(closes).await;
    for r in &results {
        if let Err(e) = r {
            tracing::warn!(error = %e, "could not close a session of a revoked token");
        }
    }
    Ok(open.len())
}

/// Start-up: the queue owners of this server's sessions live outside every process group
/// it tracks. An owner whose session had a turn in flight when the previous process died
/// (`in_flight`: session ids) may still be working on it — the next turn would queue behind
/// it — and an owner of a closed session should not exist: both are stopped. An idle owner
/// of an open session is left to serve the next turn warm (with the session as created:
/// acpx resumes a restarted agent without its system prompt). Stale locks (owner dead, or
/// its pid reused) are removed. Returns how many owners were stopped.
pub async fn reconcile_owners(
    db: &crate::store::Db,
    config: &crate::Config,
    in_flight: &std::collections::HashSet<String>,
) -> Result<usize, crate::store::StoreError> {
    let Some(home) = acpx::children_home(config) else {
        return Ok(0);
    };
    let sessions = db.read(store::with_acpx_record).await?;
    let home = home.as_path();
    let stops = sessions.iter().filter_map(|s| {
        let record_id = s.acpx_record_id.as_deref()?;
        let owner = acpx::queue_owner(home, record_id)?;
        let unwanted = s.status != "open" || in_flight.contains(&s.session_id);
        Some(async move {
            if owner.is_running() && !unwanted {
                return false;
            }
            // Stopping a dead owner only clears its lock.
            acpx::stop_queue_owner(home, record_id).await && unwanted
        })
    });
    // Together: each may wait out a grace period.
    let stopped = futures_util::future::join_all(stops)
        .await
        .into_iter()
        .filter(|stopped| *stopped)
        .count();
    Ok(stopped)
}
