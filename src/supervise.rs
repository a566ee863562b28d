//! The one lifecycle of an agent process that answers a request (a run, cold or warm; a
//! turn; the SDK routes): spawn with the prompt on stdin, read its lines under the output
//! cap, watch the deadline, an explicit stop (cancel, close), the client going away and
//! shutdown, stop it (softly first where the agent can be asked, then as a group), map how
//! it ended to an outcome and an error, close the audit row with whatever usage the CLI
//! reported, and feed the metrics and the governor.
//!
//! What differs between agents is a [`Fold`]: how lines fold into an answer, how the
//! exited process is judged, what it reported as usage, and how it is asked to stop.
//! Callers build their own answer from the fold afterwards, so nothing here knows `/run`'s
//! or a turn's answer type.
//!
//! A streaming client is fed through a [`Sink`] that is never awaited unboundedly: a line
//! that does not fit is held back (and the child's output left unread) while every other
//! ending stays watched; a sink that stays full for [`STALL_GRACE`] is a stalled client,
//! treated as one that went away.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use serde_json::Value;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::audit::{self, AuditEntry, Completion, Outcome};
use crate::config::Config;
use crate::error::ApiError;
use crate::governance::Governor;
use crate::metrics::Metrics;
use crate::process::{Event, Proc, ProcError, Spec};
use crate::store::Db;

/// Lines buffered between an agent and a streaming client.
pub const SINK_CAPACITY: usize = 64;
/// How long a streaming client may leave the buffer full before it counts as gone.
pub const STALL_GRACE: Duration = Duration::from_secs(10);
/// How long a softly stopped agent may take to end (observed for acpx: about 2 s) before
/// it is killed. Short enough to fit the shutdown grace.
pub const SOFT_STOP_GRACE: Duration = Duration::from_secs(5);
/// The audit `detail` of work whose client hung up (or stopped reading), streamed or not.
pub const CLIENT_GONE: &str = "client_gone";

/// Why work is stopped from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopWhy {
    /// A cancel request: the work answers 200 `stop_reason: "cancelled"`.
    Cancel,
    /// Its session is being closed (DELETE, idle TTL, token revoked): 409 `session_closed`.
    Close,
}

/// A request to stop, set at most once.
#[derive(Clone, Default)]
pub struct Stopper {
    token: CancellationToken,
    why: Arc<OnceLock<StopWhy>>,
}

impl Stopper {
    pub fn stop(&self, why: StopWhy) {
        let _ = self.why.set(why);
        self.token.cancel();
    }

    /// Resolves once `stop` was called, with its reason.
    pub async fn stopped(&self) -> StopWhy {
        self.token.cancelled().await;
        self.why.get().copied().unwrap_or(StopWhy::Cancel)
    }

    pub fn is_stopped(&self) -> bool {
        self.token.is_cancelled()
    }
}

/// Where a streaming client's lines go: already parsed JSON, in the order the agent
/// printed them. Dropping the receiver is how the client side says it is gone.
pub struct Sink {
    tx: mpsc::Sender<Value>,
}

impl Sink {
    pub fn channel() -> (Sink, mpsc::Receiver<Value>) {
        let (tx, rx) = mpsc::channel(SINK_CAPACITY);
        (Sink { tx }, rx)
    }
}

/// What differs between agents.
pub trait Fold: Send {
    /// Folds one stdout line in; returns what a streaming client should see of it.
    fn line(&mut self, line: &[u8]) -> Option<Value>;

    /// Whether the answer is complete: a process fed on an open stdin (a warm `claude`)
    /// then gets its stdin closed, which ends it.
    fn answered(&self) -> bool {
        false
    }

    /// Judges a process that exited on its own: its outcome, or the error to answer.
    fn judge(&self, exit_code: Option<i32>, stderr: &str) -> Result<Outcome, ApiError>;

    /// The usage the agent reported so far; recorded (and billed) however the work ends.
    fn metered(&self) -> Metered;

    /// Asks the agent to stop softly; resolves to whether it took the request (then its
    /// output is read on until it exits, within [`SOFT_STOP_GRACE`]). `None`: no such way,
    /// the group is killed at once.
    fn soft_stop(&self) -> Option<BoxFuture<'static, bool>> {
        None
    }

    /// What must go after the group was killed (processes living outside it).
    fn after_kill(&self) -> Option<BoxFuture<'static, ()>> {
        None
    }
}

/// Usage as the agent reported it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Metered {
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub cost_usd: Option<f64>,
    pub response_chars: Option<i64>,
}

/// For the metrics: which kind of work this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Run,
    Turn,
}

/// The process: to be started with `stdin` as its whole input, or already running (a warm
/// process that was given its prompt).
pub enum Child {
    Spawn { spec: Spec, stdin: String },
    Started(Box<Proc>),
}

/// One piece of work to supervise.
pub struct Job<F> {
    pub kind: Kind,
    pub child: Child,
    pub fold: F,
    pub timeout: Duration,
    /// Cancel or close from outside.
    pub stop: Stopper,
    /// Cancelled when the client of a non-streaming answer hangs up.
    pub gone: CancellationToken,
    /// The streaming client, if any; its closing also means the client is gone.
    pub sink: Option<Sink>,
}

/// How supervised work ended, after its audit row was closed.
pub struct Ended<F> {
    pub fold: F,
    pub outcome: Outcome,
    pub duration_ms: u64,
    /// `Ok` when the work answers (done, or cancelled); otherwise the error to answer. A
    /// failure to record comes second: the work's own error says more.
    pub result: Result<(), ApiError>,
}

/// How the process ended, before it becomes an outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Exited(Option<i32>),
    Timeout,
    Stopped(StopWhy),
    Shutdown,
    ClientGone,
    TooLarge,
}

/// What a run or turn records and stages before its agent starts.
pub struct Start<'a> {
    pub token_id: &'a str,
    /// The audit kind: `run` or `turn`.
    pub kind: &'a str,
    pub model: &'a str,
    /// The run or session id.
    pub subject: &'a str,
    pub prompt: &'a str,
    pub files: &'a [String],
    pub dir: &'a std::path::Path,
    /// Whether a pre-started process serves it (runs only).
    pub warm: Option<bool>,
}

/// The handles the lifecycle uses, built once at start-up.
#[derive(Clone)]
pub struct Supervisor {
    config: Arc<Config>,
    db: Db,
    metrics: Arc<Metrics>,
    governor: Governor,
    shutdown: CancellationToken,
}

impl Supervisor {
    pub fn new(
        config: Arc<Config>,
        db: Db,
        metrics: Arc<Metrics>,
        governor: Governor,
        shutdown: CancellationToken,
    ) -> Supervisor {
        Supervisor {
            config,
            db,
            metrics,
            governor,
            shutdown,
        }
    }

    /// Copies the attached files into the working dir, builds the text the agent gets (the
    /// prompt, then a line naming the attachments) and opens the audit row as `running`.
    pub async fn stage_and_audit(&self, w: Start<'_>) -> Result<(String, AuditGuard), ApiError> {
        let state = self;
        let names = crate::files::stage_into(
            &state.db,
            &state.config.uploads_dir,
            w.token_id,
            w.files,
            w.dir,
        )
        .await?;
        let prompt_text = match crate::files::attachment_line(&names) {
            Some(line) => format!("{}\n\n{line}", w.prompt),
            None => w.prompt.to_string(),
        };
        let entry = AuditEntry {
            token_id: Some(w.token_id.to_string()),
            kind: w.kind.into(),
            model: Some(w.model.to_string()),
            prompt: state
                .config
                .settings
                .audit_prompts
                .then(|| w.prompt.to_string()),
            prompt_chars: Some(w.prompt.chars().count() as i64),
            outcome: Some(Outcome::Running),
            subject: Some(w.subject.to_string()),
            warm: w.warm,
            ..Default::default()
        };
        let audit_id = state.db.write(move |c| audit::insert(c, &entry)).await?;
        Ok((prompt_text, self.audit_guard(audit_id)))
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// An audit guard for row `id`, closing it through this supervisor's database.
    pub fn audit_guard(&self, id: i64) -> AuditGuard {
        AuditGuard::new(self.db.clone(), self.shutdown.clone(), id)
    }

    /// Runs `job` to its end and closes `audit` with how it ended.
    pub async fn supervise<F: Fold>(&self, job: Job<F>, audit: &mut AuditGuard) -> Ended<F> {
        let started = Instant::now();
        let Job {
            kind,
            child,
            mut fold,
            timeout,
            stop,
            gone,
            sink,
        } = job;
        let mut proc = match child {
            Child::Started(proc) => *proc,
            Child::Spawn { spec, stdin } => match self.spawn(spec, stdin).await {
                Ok(proc) => proc,
                Err(err) => {
                    let c = Completion {
                        outcome: Some(Outcome::Error),
                        detail: Some(err.code().into()),
                        ..Default::default()
                    };
                    // The failure to start says more than a failure to record it.
                    let _ = audit.complete(c).await;
                    self.observe(kind, Outcome::Error, started);
                    return Ended {
                        fold,
                        outcome: Outcome::Error,
                        duration_ms: started.elapsed().as_millis() as u64,
                        result: Err(err),
                    };
                }
            },
        };

        let ending =
            watch_until_end(&mut proc, &mut fold, timeout, &stop, &gone, &sink, self).await;
        let mut exit_code = match ending {
            Ending::Exited(code) => code,
            _ => None,
        };
        let mut hard_stop = matches!(ending, Ending::TooLarge);
        if !matches!(ending, Ending::Exited(_) | Ending::TooLarge) {
            // The client may be gone; the lines still tell how the work ended.
            let sink = sink.as_ref().filter(|_| ending != Ending::ClientGone);
            match fold.soft_stop() {
                Some(ask) => match soften(&mut proc, &mut fold, sink, ask).await {
                    Some(code) => exit_code = code,
                    None => hard_stop = true,
                },
                None => hard_stop = true,
            }
        }
        if hard_stop {
            proc.terminate().await;
            if let Some(cleanup) = fold.after_kill() {
                cleanup.await;
            }
        }
        let duration_ms = started.elapsed().as_millis() as u64;
        let stderr = proc.stderr_tail();
        drop(proc);

        let (outcome, judged) = match ending {
            Ending::Exited(code) => match fold.judge(code, &stderr) {
                Ok(outcome) => (outcome, Ok(())),
                Err(e) => (Outcome::Error, Err(e)),
            },
            Ending::Timeout => (Outcome::Timeout, Err(ApiError::Timeout)),
            Ending::Stopped(StopWhy::Cancel) => (Outcome::Cancelled, Ok(())),
            Ending::Stopped(StopWhy::Close) => (Outcome::Cancelled, Err(ApiError::SessionClosed)),
            Ending::Shutdown => (
                Outcome::Cancelled,
                Err(ApiError::Unavailable("server shutting down".into())),
            ),
            Ending::ClientGone => (
                Outcome::Abandoned,
                Err(ApiError::Unavailable("client went away".into())),
            ),
            Ending::TooLarge => (Outcome::Error, Err(ApiError::OutputTooLarge)),
        };
        let m = fold.metered();
        let detail = match (&ending, &judged) {
            (Ending::ClientGone, _) => Some(CLIENT_GONE.to_string()),
            (_, Err(e)) => Some(e.code().to_string()),
            (_, Ok(())) => None,
        };
        let recorded = audit
            .complete(Completion {
                outcome: Some(outcome),
                response_chars: m.response_chars,
                duration_ms: Some(duration_ms as i64),
                exit_code: exit_code.map(i64::from),
                input_tokens: m.input_tokens,
                output_tokens: m.output_tokens,
                cost_usd: m.cost_usd,
                detail,
            })
            .await;
        self.observe(kind, outcome, started);
        if let Err(e) = &judged {
            self.governor.note(e);
        }
        Ended {
            fold,
            outcome,
            duration_ms,
            result: judged.and(recorded),
        }
    }

    fn observe(&self, kind: Kind, outcome: Outcome, started: Instant) {
        match kind {
            Kind::Run => self
                .metrics
                .observe_run(outcome.as_str(), started.elapsed()),
            Kind::Turn => self
                .metrics
                .observe_turn(outcome.as_str(), started.elapsed()),
        }
    }

    /// Starts the agent and feeds it `stdin` concurrently with the caller's reading, so a
    /// child that talks before it reads cannot deadlock against us.
    async fn spawn(&self, spec: Spec, stdin: String) -> Result<Proc, ApiError> {
        let program = spec.program.display().to_string();
        let mut proc = Proc::spawn(spec, Some(&self.db)).await.map_err(|e| {
            tracing::error!(error = %e, %program, "could not start the agent");
            ApiError::Upstream("the agent could not be started".into())
        })?;
        if let Some(mut pipe) = proc.stdin.take() {
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let _ = pipe.write_all(stdin.as_bytes()).await;
                let _ = pipe.shutdown().await;
            });
        }
        Ok(proc)
    }
}

/// Reads the process until something ends the work. A line for the client that does not
/// fit in the sink is held back, and the process not read, until it fits: every other
/// ending stays watched meanwhile.
async fn watch_until_end<F: Fold>(
    proc: &mut Proc,
    fold: &mut F,
    timeout: Duration,
    stop: &Stopper,
    gone: &CancellationToken,
    sink: &Option<Sink>,
    sup: &Supervisor,
) -> Ending {
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let stall = tokio::time::sleep(STALL_GRACE);
    tokio::pin!(stall);
    let mut held: Option<Value> = None;
    loop {
        tokio::select! {
            ev = proc.next_event(), if held.is_none() => match ev {
                Ok(Event::Line(line)) => {
                    let out = fold.line(&line);
                    if fold.answered() {
                        proc.stdin = None;
                    }
                    if let (Some(v), Some(sink)) = (out, sink) {
                        match sink.tx.try_send(v) {
                            Ok(()) => {}
                            Err(TrySendError::Full(v)) => {
                                held = Some(v);
                                stall.as_mut().reset(tokio::time::Instant::now() + STALL_GRACE);
                            }
                            Err(TrySendError::Closed(_)) => return Ending::ClientGone,
                        }
                    }
                }
                Ok(Event::Exited(status)) => return Ending::Exited(status.code()),
                Err(ProcError::OutputTooLarge) => return Ending::TooLarge,
                Err(e) => {
                    tracing::error!(error = %e, "reading the agent's output failed");
                    return Ending::Exited(None);
                }
            },
            permit = reserve(sink), if held.is_some() => match (permit, held.take()) {
                (Some(permit), Some(v)) => permit.send(v),
                _ => return Ending::ClientGone,
            },
            _ = &mut stall, if held.is_some() => {
                tracing::warn!("a streaming client stopped reading; stopping its work");
                return Ending::ClientGone;
            }
            _ = &mut deadline => return Ending::Timeout,
            why = stop.stopped() => return Ending::Stopped(why),
            _ = sup.shutdown.cancelled() => return Ending::Shutdown,
            _ = gone.cancelled() => return Ending::ClientGone,
            _ = closed(sink) => return Ending::ClientGone,
        }
    }
}

async fn reserve(sink: &Option<Sink>) -> Option<mpsc::Permit<'_, Value>> {
    match sink {
        Some(s) => s.tx.reserve().await.ok(),
        None => std::future::pending().await,
    }
}

async fn closed(sink: &Option<Sink>) {
    match sink {
        Some(s) => s.tx.closed().await,
        None => std::future::pending().await,
    }
}

/// Asks the agent to stop and keeps folding its lines until it exits. `None` when it did
/// not take the request or did not end within [`SOFT_STOP_GRACE`].
async fn soften<F: Fold>(
    proc: &mut Proc,
    fold: &mut F,
    sink: Option<&Sink>,
    ask: BoxFuture<'static, bool>,
) -> Option<Option<i32>> {
    let mut ask = ask;
    let mut asked = false;
    let ended = tokio::time::timeout(SOFT_STOP_GRACE, async {
        loop {
            tokio::select! {
                accepted = &mut ask, if !asked => {
                    asked = true;
                    if !accepted {
                        return None;
                    }
                }
                ev = proc.next_event() => match ev {
                    Ok(Event::Line(line)) => {
                        // Best effort: the work is ending, a full sink only loses a line.
                        if let (Some(v), Some(sink)) = (fold.line(&line), sink) {
                            let _ = sink.tx.try_send(v);
                        }
                    }
                    Ok(Event::Exited(status)) => return Some(status.code()),
                    Err(_) => return None,
                },
            }
        }
    })
    .await;
    ended.ok().flatten()
}

/// Runs `work` on its own task and waits for it. The task, not this future, owns the work:
/// if the client hangs up (this future is dropped), `gone` is cancelled and the work ends
/// the way a streamed one whose client left does.
pub async fn detached<T, Fut>(work: impl FnOnce(CancellationToken) -> Fut) -> Result<T, ApiError>
where
    T: Send + 'static,
    Fut: Future<Output = Result<T, ApiError>> + Send + 'static,
{
    let gone = CancellationToken::new();
    let task = tokio::spawn(work(gone.clone()));
    let _hang_up = gone.drop_guard();
    task.await
        .map_err(|e| ApiError::internal(format!("work task failed: {e}")))?
}

/// Work that can be stopped by id from another request (`POST /runs/{id}/cancel`), and
/// by whom: only its owner.
#[derive(Clone, Default)]
pub struct Running {
    active: Arc<Mutex<HashMap<String, Entry>>>,
}

#[derive(Clone)]
struct Entry {
    owner: String,
    stop: Stopper,
    done: watch::Receiver<bool>,
}

/// How long a cancel waits for the work to wind down (it stops within seconds however it
/// is stopped; this only bounds a wedged one).
const STOP_WAIT: Duration = Duration::from_secs(20);

/// An id's entry in [`Running`], removed (and waiters woken) on drop.
pub struct Registration {
    active: Arc<Mutex<HashMap<String, Entry>>>,
    id: String,
    done: watch::Sender<bool>,
    pub stop: Stopper,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut map) = self.active.lock() {
            map.remove(&self.id);
        }
        let _ = self.done.send(true);
    }
}

impl Running {
    pub fn register(&self, id: &str, owner: &str) -> Registration {
        let (done, rx) = watch::channel(false);
        let stop = Stopper::default();
        if let Ok(mut map) = self.active.lock() {
            map.insert(
                id.to_string(),
                Entry {
                    owner: owner.to_string(),
                    stop: stop.clone(),
                    done: rx,
                },
            );
        }
        Registration {
            active: self.active.clone(),
            id: id.to_string(),
            done,
            stop,
        }
    }

    /// Cancels `owner`'s work `id` and waits (bounded) until it has ended. `false` when no
    /// such work of that owner is running.
    pub async fn cancel(&self, id: &str, owner: &str) -> bool {
        let entry = self
            .active
            .lock()
            .ok()
            .and_then(|m| m.get(id).filter(|e| e.owner == owner).cloned());
        let Some(mut entry) = entry else {
            return false;
        };
        entry.stop.stop(StopWhy::Cancel);
        let _ = tokio::time::timeout(STOP_WAIT, entry.done.wait_for(|d| *d)).await;
        true
    }
}

/// How often, and how many times, a row that could not be closed is tried again.
const CLOSE_RETRY_EVERY: Duration = Duration::from_secs(1);
const CLOSE_RETRIES: u32 = 300;

/// Closes an audit row as `abandoned` if its work is dropped before it finished (its task
/// was aborted); normally [`Supervisor::supervise`] closes it.
pub struct AuditGuard {
    db: Db,
    shutdown: CancellationToken,
    pub id: i64,
    done: bool,
}

impl AuditGuard {
    pub fn new(db: Db, shutdown: CancellationToken, id: i64) -> AuditGuard {
        AuditGuard {
            db,
            shutdown,
            id,
            done: false,
        }
    }

    /// Closes the row. The answer must not leave as if recorded when it was not (a full
    /// disk): then the error comes back for the caller to answer instead, and the row is
    /// closed in the background once the database takes writes again; should that not
    /// happen before a restart, start-up marks it abandoned.
    pub async fn complete(&mut self, c: Completion) -> Result<(), ApiError> {
        self.done = true;
        let id = self.id;
        let first = c.clone();
        let Err(e) = self
            .db
            .write(move |conn| audit::complete(conn, id, &first))
            .await
        else {
            return Ok(());
        };
        tracing::error!(error = %e, "could not close an audit row; retrying in the background");
        let err = ApiError::from(e);
        let mut later = c;
        if later.outcome == Some(Outcome::Ok) {
            // The work was done (and paid for) but its answer never left.
            later.outcome = Some(Outcome::Error);
            later.detail = Some(err.code().into());
        }
        let (db, shutdown) = (self.db.clone(), self.shutdown.clone());
        tokio::spawn(async move {
            for _ in 0..CLOSE_RETRIES {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(CLOSE_RETRY_EVERY) => {}
                }
                let c = later.clone();
                if db
                    .write(move |conn| audit::complete(conn, id, &c))
                    .await
                    .is_ok()
                {
                    return;
                }
            }
        });
        Err(err)
    }
}

impl Drop for AuditGuard {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let (db, id) = (self.db.clone(), self.id);
        tokio::spawn(async move {
            let c = Completion {
                outcome: Some(Outcome::Abandoned),
                detail: Some("interrupted".into()),
                ..Default::default()
            };
            let _ = db.write(move |conn| audit::complete(conn, id, &c)).await;
        });
    }
}
