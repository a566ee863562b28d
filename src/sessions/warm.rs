//! Warm session agents: at most `CLAWDFORGE_MAX_WARM_AGENTS` of them alive between turns,
//! and for each of them the acpx client of its next turn, started ahead.
//!
//! A session's agent is acpx's queue owner with the ACP adapter and a `claude` in its
//! process group, ~400 MB together, alive for acpx's `--ttl` after every turn. Left alone,
//! N idle sessions hold N × 400 MB. The keeper here learns of every ended turn (from the
//! session manager) and of every pooled session the pool warms, and when more owners are
//! alive than the limit it stops the least recently used idle one. Its session stays open:
//! its next turn starts an agent again, which resumes the session from Claude's transcript
//! (context kept; see docs/cli-behaviour.md).
//!
//! What is alive is read from acpx's own lock files (`queue_owner`), not remembered, so an
//! owner that timed out, crashed or was stopped by a close simply stops counting.
//!
//! Pre-started clients: an `acpx prompt -s NAME -f -` costs ~0.4 s of Node start-up before
//! it reads its prompt. For every session with a live agent, the keeper starts the next
//! turn's client as soon as a turn ends, and it waits on stdin (it has not talked to the
//! queue owner yet, so stopping it is harmless). A turn takes it only if its argv is the
//! one the turn would run now (the token's permission mode, the model, the system prompt,
//! the TTL setting); any other is stopped, never used. Eviction, close and shutdown stop
//! it too, and so does the eviction pass once its agent has gone (until then its turn
//! could still take it: it starts the agent again). So there are never more clients than
//! sessions the keeper holds warm.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;
use tokio::sync::mpsc;

use super::{acpx, store, target, Sessions};
use crate::config::SessionPermissions;
use crate::process::Proc;

/// What `/healthz` shows as `warm_sessions`.
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
pub struct WarmStats {
    /// Session agents (queue owner, adapter, claude) alive now, pooled ones included.
    pub agents: usize,
    /// Pooled sessions ready to be taken by `POST /sessions`.
    pub pooled: usize,
    /// acpx clients started ahead for the next turn of a warm session.
    pub clients: usize,
    /// `CLAWDFORGE_MAX_WARM_AGENTS`.
    pub limit: usize,
}

#[derive(Debug, Clone)]
struct Entry {
    record_id: String,
    /// Larger is more recent.
    used: u64,
    pooled: bool,
}

/// A client started ahead, with the argv it was started with.
struct Client {
    args: Vec<OsString>,
    proc: Proc,
}

/// The sessions whose agents may be alive, with when each was last used, and their
/// pre-started clients.
#[derive(Default)]
pub struct WarmAgents {
    entries: Mutex<HashMap<String, Entry>>,
    clock: AtomicU64,
    clients: Mutex<HashMap<String, Client>>,
    /// The keeper's task, joined at shutdown before the clients are stopped.
    keeper: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl WarmAgents {
    /// Notes that the agent of session `id` was just used (or started).
    pub fn touch(&self, id: &str, record_id: &str, pooled: bool) {
        let used = self.clock.fetch_add(1, Ordering::SeqCst);
        lock(&self.entries).insert(
            id.to_string(),
            Entry {
                record_id: record_id.to_string(),
                used,
                pooled,
            },
        );
    }

    /// A pooled session became the caller's: from now on it is evicted like any other.
    pub fn unpool(&self, id: &str) {
        if let Some(e) = lock(&self.entries).get_mut(id) {
            e.pooled = false;
        }
    }

    /// Session `id` is gone (closed, discarded): its entry and its client go.
    pub fn forget(&self, id: &str) {
        lock(&self.entries).remove(id);
        self.discard_client(id);
    }

    /// The entries whose owner is alive, dropping the others (and their clients).
    fn alive(&self, home: &Path) -> Vec<(String, Entry)> {
        let snapshot: Vec<(String, Entry)> = lock(&self.entries)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let (live, dead): (Vec<_>, Vec<_>) = snapshot
            .into_iter()
            .partition(|(_, e)| owner_running(home, &e.record_id));
        for (id, e) in dead {
            let mut map = lock(&self.entries);
            // Only if untouched since: a turn may have just started its agent again.
            if map.get(&id).is_some_and(|now| now.used == e.used) {
                map.remove(&id);
                drop(map);
                self.discard_client(&id);
            }
        }
        live
    }

    /// How many session agents are alive now. It reads acpx's lock files and changes
    /// nothing: `/healthz` may be polled every second, and a probe must not stop a client
    /// on one reading (the eviction pass after the next ended turn prunes).
    pub fn agents(&self, home: Option<&Path>) -> usize {
        let Some(home) = home else {
            return 0;
        };
        let records: Vec<String> = lock(&self.entries)
            .values()
            .map(|e| e.record_id.clone())
            .collect();
        records.iter().filter(|r| owner_running(home, r)).count()
    }

    /// How many clients wait for a turn.
    pub fn clients(&self) -> usize {
        lock(&self.clients).len()
    }

    /// The pre-started client of session `id` if it was started with `args` and still
    /// runs; any other is stopped.
    pub fn take_client(&self, id: &str, args: &[OsString]) -> Option<Proc> {
        let mut client = lock(&self.clients).remove(id)?;
        if client.args == args && !client.proc.has_exited() {
            return Some(client.proc);
        }
        tracing::info!(session = %id, "discarded a pre-started acpx client that no longer fits");
        stop(client.proc);
        None
    }

    fn discard_client(&self, id: &str) {
        if let Some(client) = lock(&self.clients).remove(id) {
            stop(client.proc);
        }
    }

    /// Stops every pre-started client and waits for them.
    async fn discard_all_clients(&self) {
        let all: Vec<Client> = lock(&self.clients).drain().map(|(_, c)| c).collect();
        let stops = all
            .into_iter()
            .map(|mut c| async move { c.proc.terminate().await });
        futures_util::future::join_all(stops).await;
    }
}

/// Whether the queue owner (the agent) of acpx record `record_id` is running now.
fn owner_running(home: &Path, record_id: &str) -> bool {
    acpx::queue_owner(home, record_id).is_some_and(|o| o.is_running())
}

/// Stops a client's group in the background (SIGTERM, then SIGKILL), reaping it.
fn stop(mut proc: Proc) {
    tokio::spawn(async move { proc.terminate().await });
}

/// Starts the next turn's client for session `id` if it is open and has none yet; the
/// caller has just found its agent warm (an eviction pass drops entries whose owner died). The argv is the server's default permission mode's unless the owner's
/// token says otherwise, read now; a later change makes the turn discard it.
async fn prestart(state: &Sessions, id: &str) {
    if state.shutdown.is_cancelled() || lock(&state.warm.clients).contains_key(id) {
        return;
    }
    let lookup = id.to_string();
    let Ok(Some(s)) = state.db.read(move |c| store::get(c, &lookup)).await else {
        return;
    };
    if s.status != "open" && s.status != store::POOLED {
        return;
    }
    let permissions = token_permissions(state, &s.token_id)
        .await
        .unwrap_or(state.config.settings.session_permissions);
    let t = target(&s);
    let args = t.prompt_args(
        &state.config,
        permissions,
        &s.model,
        s.system_prompt.as_deref(),
    );
    let spec = t.spec(&state.config, args.clone(), None);
    match Proc::spawn(spec, Some(&state.db)).await {
        Ok(proc) => {
            let mut clients = lock(&state.warm.clients);
            // The session may have gone while the client started.
            if lock(&state.warm.entries).contains_key(id) && !clients.contains_key(id) {
                clients.insert(id.to_string(), Client { args, proc });
            } else {
                drop(clients);
                stop(proc);
            }
        }
        Err(e) => tracing::warn!(session = %id, error = %e, "could not pre-start an acpx client"),
    }
}

/// The session permission mode of token `token_id`'s policy, if it sets one.
async fn token_permissions(state: &Sessions, token_id: &str) -> Option<SessionPermissions> {
    if token_id.is_empty() {
        return None;
    }
    let id = token_id.to_string();
    let token = state
        .db
        .read(move |c| crate::auth::tokens::get(c, &id))
        .await
        .ok()??;
    token.policy.session_permissions
}

/// Stops least recently used idle agents until at most `limit` are alive (idle open
/// sessions first, then pooled ones). A session with anything running is skipped; the
/// next ended turn tries again. Returns how many were stopped.
pub async fn enforce(state: &Sessions) -> usize {
    let Some(home) = state.home() else {
        return 0;
    };
    let limit = state.config.settings.max_warm_agents as usize;
    let mut live = state.warm.alive(&home);
    if live.len() <= limit {
        return 0;
    }
    live.sort_by_key(|(_, e)| (e.pooled, e.used));
    let mut over = live.len() - limit;
    let mut stopped = 0;
    for (id, e) in live {
        if over == 0 {
            break;
        }
        let Some(_claim) = state.active.claim_upkeep(&id) else {
            continue;
        };
        // Its client first: the agent it would talk to is going.
        state.warm.discard_client(&id);
        if acpx::stop_queue_owner(&home, &e.record_id).await {
            stopped += 1;
            tracing::info!(session = %id, limit, "stopped the least recently used idle session agent");
        }
        lock(&state.warm.entries).remove(&id);
        over -= 1;
    }
    stopped
}

/// Notes session `id`'s agent as just used, keeps the number alive within the limit and
/// pre-starts its next client if it stayed warm. The caller holds the session's claim, so
/// a close (which forgets the session first) cannot come between the note and the client.
pub async fn after_use(state: &Sessions, id: &str, record_id: &str, pooled: bool) {
    state.warm.touch(id, record_id, pooled);
    enforce(state).await;
    if lock(&state.warm.entries).contains_key(id) {
        prestart(state, id).await;
    }
}

/// Session `id`'s turn ended: [`after_use`], with the session claimed by the keeper for
/// the note and again for the client, and let go for the eviction pass between them (so
/// the limit's order, idle open sessions before pooled ones, holds for this one too).
/// Without the claims, a close that began after the turn ended would have forgotten the
/// session before this note, and the client started here, the row being open until the
/// close finished, would wait forever for a turn of a closed session. A session that is
/// closing, or in a turn again (which reports its own end), is skipped.
async fn after_turn(state: &Sessions, id: &str) {
    {
        let Some(_claim) = state.active.claim_upkeep(id) else {
            return;
        };
        let lookup = id.to_string();
        let Ok(Some(s)) = state.db.read(move |c| store::get(c, &lookup)).await else {
            return;
        };
        let (true, Some(record_id)) = (s.status == "open", s.acpx_record_id) else {
            return;
        };
        state.warm.touch(id, &record_id, false);
    }
    enforce(state).await;
    let Some(_claim) = state.active.claim_upkeep(id) else {
        return;
    };
    // Still warm and not forgotten by a close that ran during the pass (`prestart` reads
    // the row again, so one that finished is seen closed).
    if lock(&state.warm.entries).contains_key(id) {
        prestart(state, id).await;
    }
}

/// Runs until shutdown: after every ended turn, [`after_turn`]. At start-up it first
/// adopts the agents a previous process left warm for open sessions (oldest use first).
pub fn spawn_keeper(state: Sessions, mut turn_ended: mpsc::UnboundedReceiver<String>) {
    let keeper = state.warm.clone();
    let task = tokio::spawn(async move {
        if let Some(home) = state.home() {
            let open = state
                .db
                .read(store::with_acpx_record)
                .await
                .unwrap_or_default();
            let mut open: Vec<_> = open.into_iter().filter(|s| s.status == "open").collect();
            open.sort_by_key(|s| s.last_used_at);
            for s in open {
                if let Some(record_id) = s.acpx_record_id.as_deref() {
                    if owner_running(&home, record_id) {
                        state.warm.touch(&s.session_id, record_id, false);
                    }
                }
            }
            enforce(&state).await;
        }
        loop {
            let id = tokio::select! {
                _ = state.shutdown.cancelled() => break,
                id = turn_ended.recv() => match id {
                    Some(id) => id,
                    None => break,
                },
            };
            after_turn(&state, &id).await;
        }
    });
    *lock(&keeper.keeper) = Some(task);
}

/// Shutdown: waits for the keeper (a client it is starting is in the map once it returns),
/// then stops every pre-started client. Stopping them first would miss one the keeper
/// started a moment later, and nothing would ever stop that one.
pub async fn shutdown(state: &Sessions) {
    let keeper = lock(&state.warm.keeper).take();
    if let Some(keeper) = keeper {
        let _ = keeper.await;
    }
    state.warm.discard_all_clients().await;
}

/// The numbers `/healthz` shows.
pub fn stats(state: &Sessions) -> WarmStats {
    WarmStats {
        agents: state.warm.agents(state.home().as_deref()),
        pooled: state.pool.ready(),
        clients: state.warm.clients(),
        limit: state.config.settings.max_warm_agents as usize,
    }
}
