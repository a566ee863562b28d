//! The session pool: `CLAWDFORGE_SESSION_POOL` sessions made ahead of time for the default
//! agent and model with no system prompt, so `POST /sessions` asking for nothing else
//! answers at once and the session's first turn finds its agent running.
//!
//! Creating a session costs `acpx sessions ensure` (~2.5 s, the agent started and stopped
//! once) and its first turn another agent start (~4 s). acpx starts a lasting agent (its
//! queue owner) only for a `prompt`, and the one prompt found that the agent answers
//! without asking the model is the local command `/rename`. So a pooled session is
//! ensured and then sent `/rename clawdforge`: no upstream request, no title request
//! later (the session has a title), at the price of the command's lines in the
//! conversation (see docs/cli-behaviour.md).
//!
//! A pooled session is a row with status `warming` (agent starting), then `pooled`, and no
//! token: nobody lists or reads it.
//! Taking one is one `UPDATE … RETURNING` that makes it the caller's (`created_at` = now).
//! A replacement is made in the background at once. The warm-up starts the queue owner
//! with `--ttl=0`, so a pooled agent waits however long it takes to be wanted; what
//! bounds it is `CLAWDFORGE_MAX_WARM_AGENTS` (and, once taken, the session's idle TTL). Pooled sessions are not kept across a
//! restart: at shutdown and at start-up every one is discarded (queue owner stopped,
//! acpx's records, transcript, dir and row deleted), so nothing of them outlives the
//! process that made them, whatever its settings were.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::store::{self, SessionRecord};
use super::{
    acpx, ensure_new, forget, new_record, CreateInput, Kind, Sessions, DEFAULT_AGENT, ENSURE_LIMIT,
};
use crate::config::Config;
use crate::error::ApiError;
use crate::util::now_ms;

/// The warm-up prompt: a local command (no model call), and a title that makes the
/// adapter skip its title request later.
const WARM_UP_PROMPT: &str = "/rename clawdforge";
/// How long to wait after a failed creation before trying again.
const RETRY_AFTER: Duration = Duration::from_secs(30);

/// The pool's keeper and what it holds ready.
#[derive(Default)]
pub struct SessionPool {
    ready: AtomicUsize,
    wake: Notify,
    keeper: Mutex<Option<JoinHandle<()>>>,
}

impl SessionPool {
    /// Pooled sessions ready to be taken.
    pub fn ready(&self) -> usize {
        self.ready.load(Ordering::SeqCst)
    }
}

/// Whether a `POST /sessions` asking for `input` can be answered from the pool.
pub fn fits(config: &Config, input: &CreateInput) -> bool {
    config.settings.session_pool > 0
        && input.agent == DEFAULT_AGENT
        && input.model == config.settings.default_model
        && input.system.is_none()
}

/// Hands a pooled session to `token_id`, if one is ready, and asks for a replacement.
pub async fn take(state: &Sessions, token_id: &str) -> Result<Option<SessionRecord>, ApiError> {
    let (token_id, model) = (
        token_id.to_string(),
        state.config.settings.default_model.clone(),
    );
    let taken = state
        .db
        .write(move |c| store::take_pooled(c, &token_id, DEFAULT_AGENT, &model, now_ms()))
        .await?;
    if let Some(s) = &taken {
        state.pool.ready.fetch_sub(1, Ordering::SeqCst);
        state.warm.unpool(&s.session_id);
        state.pool.wake.notify_one();
        tracing::info!(session = %s.session_id, "took a pooled session");
    }
    Ok(taken)
}

/// Start-up, before the server listens: discards what a previous process pooled.
pub async fn discard_leftovers(state: &Sessions) {
    discard_all(state).await;
}

/// Starts the keeper: it keeps `CLAWDFORGE_SESSION_POOL` sessions ready until shutdown.
pub fn spawn_keeper(state: Sessions) {
    let target = state.config.settings.session_pool as usize;
    let task_state = state.clone();
    let task = tokio::spawn(async move {
        let state = task_state;
        if target == 0 {
            return;
        }
        loop {
            if state.shutdown.is_cancelled() {
                break;
            }
            if state.pool.ready() < target {
                match make_one(&state).await {
                    Ok(()) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not make a pooled session");
                        tokio::select! {
                            _ = state.shutdown.cancelled() => break,
                            _ = tokio::time::sleep(RETRY_AFTER) => {}
                        }
                    }
                }
            } else {
                tokio::select! {
                    _ = state.shutdown.cancelled() => break,
                    _ = state.pool.wake.notified() => {}
                }
            }
        }
    });
    if let Ok(mut keeper) = state.pool.keeper.lock() {
        *keeper = Some(task);
    }
}

/// Shutdown: waits for the keeper (a session being made is discarded by it), then
/// discards every pooled session.
pub async fn shutdown(state: &Sessions) {
    let keeper = state.pool.keeper.lock().ok().and_then(|mut k| k.take());
    if let Some(keeper) = keeper {
        let _ = keeper.await;
    }
    discard_all(state).await;
}

/// Makes one pooled session: dir, `sessions ensure`, the row, then the warm-up prompt
/// that leaves its agent running. Stopped by shutdown, it leaves nothing behind.
async fn make_one(state: &Sessions) -> Result<(), ApiError> {
    let id = crate::util::new_id("ses_");
    // Held until the row exists, so the sweeper never takes the new dir for an orphan.
    let _claim = state
        .active
        .claim(&id, Kind::Creating)
        .map_err(|_| ApiError::internal("a new session id is already in use"))?;
    let input = CreateInput {
        agent: DEFAULT_AGENT.into(),
        model: state.config.settings.default_model.clone(),
        system: None,
    };
    let made = async {
        // Starting the agent takes a slot like any other agent process.
        let _slot = state.admitter.unmetered_slot().await?;
        let (t, record_id) = ensure_new(state, &id, &input).await?;
        let record = new_record(
            &id,
            "",
            input.clone(),
            &t,
            record_id.clone(),
            store::WARMING,
        );
        // The row comes before the agent, so a crash from here on leaves a row that the
        // next start-up finds and discards.
        let row = record.clone();
        if let Err(e) = state.db.write(move |c| store::insert(c, &row)).await {
            forget(state, &id, Some(&record_id), &t.cwd).await;
            return Err(e.into());
        }
        let args = t.warm_up_args(&state.config, &input.model);
        let warmed = acpx::control_fed(
            &state.config,
            &state.db,
            &t,
            args,
            WARM_UP_PROMPT.as_bytes(),
            ENSURE_LIMIT,
        )
        .await;
        let warm = matches!(&warmed, Ok(out) if out.code == Some(0));
        match warmed {
            Ok(out) if out.code == Some(0) => {}
            // Still a good session; its first turn starts the agent.
            Ok(out) => {
                tracing::warn!(error = %out.error_message(), "could not warm a pooled session")
            }
            Err(e) => tracing::warn!(error = %e, "could not warm a pooled session"),
        }
        let ready = id.clone();
        state
            .db
            .write(move |c| store::mark_pooled(c, &ready))
            .await?;
        Ok::<_, ApiError>((record, record_id, warm))
    };
    let (record, record_id, warmed) = tokio::select! {
        made = made => made?,
        _ = state.shutdown.cancelled() => {
            // Whatever got made (the warm-up's processes were stopped with the future).
            let lookup = id.clone();
            if let Ok(Some(s)) = state.db.read(move |c| store::get(c, &lookup)).await {
                discard(state, &s).await;
            } else {
                crate::process::remove_dir(&state.config.sessions_dir.join(&id));
            }
            return Ok(());
        }
    };
    state.pool.ready.fetch_add(1, Ordering::SeqCst);
    if warmed {
        // Within the warm-agent limit, with its first turn's client started ahead.
        super::warm::after_use(state, &record.session_id, &record_id, true).await;
    }
    tracing::info!(session = %record.session_id, "pooled a session");
    Ok(())
}

/// Discards one pooled session, unless it was taken meanwhile; whether it was discarded.
async fn discard(state: &Sessions, s: &SessionRecord) -> bool {
    let id = s.session_id.clone();
    let deleted = state
        .db
        .write(move |c| store::delete_pooled(c, &id))
        .await
        .unwrap_or(false);
    if deleted {
        forget(
            state,
            &s.session_id,
            s.acpx_record_id.as_deref(),
            std::path::Path::new(&s.cwd),
        )
        .await;
    }
    deleted
}

/// Discards every pooled session (start-up and shutdown).
async fn discard_all(state: &Sessions) {
    let pooled = state.db.read(store::pooled).await.unwrap_or_default();
    let mut n = 0;
    for s in &pooled {
        if discard(state, s).await {
            n += 1;
        }
    }
    state.pool.ready.store(0, Ordering::SeqCst);
    if n > 0 {
        tracing::info!(sessions = n, "discarded pooled sessions");
    }
}
