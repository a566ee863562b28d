//! One turn: `acpx prompt` with the prompt on stdin, supervised from spawn to exit.
//! [`prepare_turn`] does everything that can fail before an answer starts (ownership,
//! `busy`, slot, staging attachments into the session's dir, the audit row), so those
//! failures are plain JSON even for streaming requests; [`execute_turn`] runs acpx,
//! optionally forwarding each JSON line, and closes the audit row before the answer leaves.
//!
//! acpx hands the prompt to a detached queue owner that runs the agent, so killing the
//! `acpx prompt` process group does not stop the agent's work (the next turn would queue
//! behind it). However a turn is stopped (cancel, timeout, client gone, shutdown, close),
//! acpx is first asked to cancel it, which keeps the agent warm and its session as created
//! (acpx resumes a restarted agent without the system prompt). If that does not end the
//! turn within a few seconds, the `acpx prompt` group and the queue owner's group (adapter
//! and `claude`) are killed; the next turn starts the agent afresh and resumes the session.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::acpx::{self, Target};
use super::parse::TurnLog;
use super::store::{self, SessionRecord};
use super::{target, Claim, StopWhy};
use crate::app::AppState;
use crate::audit::{Completion, Outcome};
use crate::auth::tokens::TokenRecord;
use crate::config::SessionPermissions;
use crate::error::ApiError;
use crate::governance::{self, Admission};
use crate::process::{Event, Proc, ProcError};
use crate::runner::parse::{clip, judge, usage_limit};
use crate::runner::{spawn_with_prompt, stage_and_audit, AuditGuard, Start};
use crate::util::now_ms;

/// How long a stopped turn may take to end after acpx was asked to cancel it (observed:
/// about 2 s) before it is killed. Short enough to fit the shutdown grace.
const CANCEL_GRACE: Duration = Duration::from_secs(5);

/// A validated turn request.
#[derive(Debug, Clone)]
pub struct TurnInput {
    pub prompt: String,
    pub files: Vec<String>,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TurnUsage {
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub total_tokens: i64,
    /// This turn's own cost (ACP reports the session's running total).
    pub cost_usd: f64,
}

/// The body of a finished turn (also the `result` event of a streamed one).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TurnAnswer {
    pub session_id: String,
    /// Counts from 1.
    pub turn_index: i64,
    /// The turn's ACP JSON-RPC messages (the repeated `available_commands_update`
    /// notifications left out).
    #[schema(value_type = Vec<Object>)]
    pub events: Vec<Value>,
    pub text: String,
    pub stop_reason: String,
    pub duration_ms: u64,
    pub usage: TurnUsage,
}

/// A turn ready to start: it holds the session, its slot and its open audit row.
pub struct PreparedTurn {
    state: Arc<AppState>,
    session: SessionRecord,
    claim: Claim,
    /// `None` when the turn was cancelled or its session closed while it waited for one.
    slot: Option<Admission>,
    /// The token's permission mode, else the server's.
    permissions: SessionPermissions,
    timeout: Duration,
    prompt_text: String,
    audit: AuditGuard,
}

/// Checks the session is the caller's and open, claims it (`busy` if a turn runs), takes a
/// slot (waiting in line), stages the attachments into the session's dir and opens the
/// audit row.
pub async fn prepare_turn(
    state: &Arc<AppState>,
    token: &TokenRecord,
    id: &str,
    input: TurnInput,
) -> Result<PreparedTurn, ApiError> {
    let token_id = token.id.as_str();
    let open = |s: SessionRecord| {
        if s.status == "open" {
            Ok(s)
        } else {
            Err(ApiError::SessionClosed)
        }
    };
    let s = open(super::get(state, token_id, id).await?)?;
    let claim = state.sessions.claim_turn(&s.session_id)?;
    // A close may have finished between the first read and the claim.
    let s = open(super::get(state, token_id, id).await?)?;
    let slot = tokio::select! {
        admitted = governance::admit(state, token, &s.model) => Some(admitted?),
        _ = claim.stop.stopped() => None,
    };
    let cwd = PathBuf::from(&s.cwd);
    tokio::fs::create_dir_all(&cwd).await?;
    let (prompt_text, audit) = stage_and_audit(
        state,
        Start {
            token_id,
            kind: "turn",
            model: &s.model,
            subject: &s.session_id,
            prompt: &input.prompt,
            files: &input.files,
            dir: &cwd,
            warm: None,
        },
    )
    .await?;
    Ok(PreparedTurn {
        state: state.clone(),
        session: s,
        claim,
        slot,
        permissions: token
            .policy
            .session_permissions
            .unwrap_or(state.config.settings.session_permissions),
        timeout: input.timeout,
        prompt_text,
        audit,
    })
}

/// Runs a prepared turn on its own task and waits for it. The task, not this future, owns
/// the turn: if the client hangs up (this future is dropped), the task sees it, stops the
/// turn and closes its audit row.
pub async fn run_turn(p: PreparedTurn) -> Result<TurnAnswer, ApiError> {
    let gone = CancellationToken::new();
    let task = tokio::spawn(execute_turn(p, None, gone.clone()));
    let _hang_up = gone.drop_guard();
    task.await
        .map_err(|e| ApiError::internal(format!("turn task failed: {e}")))?
}

/// How a turn ended, before it becomes an answer.
enum End {
    Exited(Option<i32>),
    Cancelled,
    Timeout,
    Closed,
    Shutdown,
    ClientGone,
    TooLarge,
}

/// Runs the turn. With `sink`, every JSON line is forwarded as it arrives (the caller
/// turns them into `event: acp`); a closed sink or a cancelled `gone` means the client is
/// gone and the turn is stopped.
pub async fn execute_turn(
    p: PreparedTurn,
    sink: Option<mpsc::Sender<Value>>,
    gone: CancellationToken,
) -> Result<TurnAnswer, ApiError> {
    let PreparedTurn {
        state,
        session,
        claim,
        slot,
        permissions,
        timeout,
        prompt_text,
        mut audit,
    } = p;
    let started = Instant::now();
    let sid = session.session_id.clone();
    let id = sid.clone();
    let begun = state
        .db
        .write(move |c| store::begin_turn(c, &id, now_ms()))
        .await?;
    let (Some(turn_index), Some(_slot)) = (begun, slot) else {
        // Closed, or stopped while it waited for a slot: nothing was started.
        let cancelled = begun.is_some() && claim.stop.stopped().await == StopWhy::Cancel;
        let recorded = audit
            .complete(Completion {
                outcome: Some(Outcome::Cancelled),
                detail: (!cancelled).then(|| "session_closed".into()),
                ..Default::default()
            })
            .await;
        drop(claim);
        return match begun {
            Some(turn_index) if cancelled => recorded.map(|()| TurnAnswer {
                session_id: sid,
                turn_index,
                events: Vec::new(),
                text: String::new(),
                stop_reason: "cancelled".into(),
                duration_ms: started.elapsed().as_millis() as u64,
                usage: TurnUsage {
                    input_tokens: 0,
                    output_tokens: 0,
                    total_tokens: 0,
                    cost_usd: 0.0,
                },
            }),
            _ => Err(ApiError::SessionClosed),
        };
    };

    let t = target(&session);
    let args = t.prompt_args(
        &state.config,
        permissions,
        &session.model,
        session.system_prompt.as_deref(),
    );
    let spec = t.spec(&state.config, args, Some(audit.id));
    let mut proc = spawn_with_prompt(&state, spec, prompt_text, &mut audit).await?;

    let mut log = TurnLog::default();
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let shutdown = state.shutdown.clone();
    let end = loop {
        let closed = async {
            match &sink {
                Some(s) => s.closed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = proc.next_event() => match ev {
                Ok(Event::Line(line)) => {
                    if !forward(&mut log, &line, sink.as_ref()).await {
                        break End::ClientGone;
                    }
                }
                Ok(Event::Exited(status)) => break End::Exited(status.code()),
                Err(ProcError::OutputTooLarge) => break End::TooLarge,
                Err(e) => {
                    tracing::error!(error = %e, "reading acpx's output failed");
                    break End::Exited(None);
                }
            },
            _ = &mut deadline => break End::Timeout,
            why = claim.stop.stopped() => break match why {
                StopWhy::Cancel => End::Cancelled,
                StopWhy::Close => End::Closed,
            },
            _ = shutdown.cancelled() => break End::Shutdown,
            _ = gone.cancelled() => break End::ClientGone,
            _ = closed => break End::ClientGone,
        }
    };
    let mut exit_code = match end {
        End::Exited(code) => code,
        _ => None,
    };
    let mut hard_stop = matches!(end, End::TooLarge);
    if !matches!(end, End::Exited(_) | End::TooLarge) {
        // The client may be gone; the lines still tell how the turn ended.
        let sink = sink.as_ref().filter(|_| !matches!(end, End::ClientGone));
        match soft_cancel(&state, &t, &mut proc, &mut log, sink).await {
            Some(code) => exit_code = code,
            None => hard_stop = true,
        }
    }
    if hard_stop {
        proc.terminate().await;
        stop_agent(&state, &session).await;
    }
    let duration_ms = started.elapsed().as_millis() as u64;
    let stderr = proc.stderr_tail();
    drop(proc);

    let (outcome, judged) = match end {
        End::Exited(code) => judge_turn(&log, code, &stderr),
        End::Cancelled => (Outcome::Cancelled, Ok("cancelled".to_string())),
        End::Timeout => (Outcome::Timeout, Err(ApiError::Timeout)),
        End::Closed => (Outcome::Cancelled, Err(ApiError::SessionClosed)),
        End::Shutdown => (
            Outcome::Cancelled,
            Err(ApiError::Unavailable("server shutting down".into())),
        ),
        End::ClientGone => (
            Outcome::Abandoned,
            Err(ApiError::Unavailable("client went away".into())),
        ),
        End::TooLarge => (Outcome::Error, Err(ApiError::OutputTooLarge)),
    };
    let (cost, cost_total) = log.cost(session.cost_total);
    let id = sid.clone();
    if let Err(e) = state
        .db
        .write(move |c| store::end_turn(c, &id, now_ms(), cost_total))
        .await
    {
        tracing::error!(error = %e, "could not record the end of a turn");
    }
    let result = log.result.clone();
    let tokens = |f: fn(&super::parse::PromptResult) -> Option<i64>| result.as_ref().and_then(f);
    let text = log.text().to_string();
    let recorded = audit
        .complete(Completion {
            outcome: Some(outcome),
            response_chars: Some(text.chars().count() as i64),
            duration_ms: Some(duration_ms as i64),
            exit_code: exit_code.map(i64::from),
            input_tokens: tokens(|r| r.input_tokens),
            output_tokens: tokens(|r| r.output_tokens),
            cost_usd: cost,
            detail: judged.as_ref().err().map(|e| e.code().into()),
        })
        .await;
    state
        .metrics
        .observe_turn(outcome.as_str(), started.elapsed());
    if let Err(e) = &judged {
        state.governor.note(e);
    }
    // Free the session before the answer leaves, so a client's next turn is never `busy`.
    drop(claim);
    // A failed turn answers its own error, which says more than a failure to record it.
    let stop_reason = judged?;
    recorded?;
    Ok(TurnAnswer {
        session_id: sid,
        turn_index,
        text,
        stop_reason,
        duration_ms,
        usage: TurnUsage {
            input_tokens: tokens(|r| r.input_tokens).unwrap_or(0),
            output_tokens: tokens(|r| r.output_tokens).unwrap_or(0),
            total_tokens: tokens(|r| r.total_tokens).unwrap_or(0),
            cost_usd: cost.unwrap_or(0.0),
        },
        events: log.events,
    })
}

/// Folds a line into the log and forwards what the client should see; false when the
/// client is gone.
async fn forward(log: &mut TurnLog, line: &[u8], sink: Option<&mpsc::Sender<Value>>) -> bool {
    match (log.push(line), sink) {
        (Some(v), Some(sink)) => sink.send(v).await.is_ok(),
        _ => true,
    }
}

/// Asks acpx to cancel the turn and keeps reading until `acpx prompt` exits (the agent
/// answers the prompt with `stopReason: "cancelled"`). `None` when acpx had nothing to
/// cancel yet (the agent was still starting) or the turn did not end in time.
async fn soft_cancel(
    state: &AppState,
    t: &Target,
    proc: &mut Proc,
    log: &mut TurnLog,
    sink: Option<&mpsc::Sender<Value>>,
) -> Option<Option<i32>> {
    let cmd = acpx::control(state, t, t.cancel_args(), CANCEL_GRACE);
    tokio::pin!(cmd);
    let mut asked = false;
    let ended = tokio::time::timeout(CANCEL_GRACE, async {
        loop {
            tokio::select! {
                out = &mut cmd, if !asked => {
                    asked = true;
                    let accepted = out.is_ok_and(|o| {
                        o.lines.iter().any(|l| l.get("cancelled") == Some(&Value::Bool(true)))
                    });
                    if !accepted {
                        return None;
                    }
                }
                ev = proc.next_event() => match ev {
                    // The client may be gone already; the turn still has to end.
                    Ok(Event::Line(line)) => { forward(log, &line, sink).await; }
                    Ok(Event::Exited(status)) => return Some(status.code()),
                    Err(_) => return None,
                },
            }
        }
    })
    .await;
    ended.ok().flatten()
}

/// Stops the session's queue owner and the agent in its group.
async fn stop_agent(state: &AppState, s: &SessionRecord) {
    if let (Some(home), Some(record_id)) = (state.home(), s.acpx_record_id.as_deref()) {
        acpx::stop_queue_owner(&home, record_id).await;
    }
}

/// A finished `acpx prompt`: the result answering this turn's prompt is the answer, even
/// with a non-zero exit (acpx exits 5 when every permission request was denied, yet the
/// agent answered); otherwise its error line, otherwise its exit and stderr.
fn judge_turn(
    log: &TurnLog,
    code: Option<i32>,
    stderr: &str,
) -> (Outcome, Result<String, ApiError>) {
    let now_secs = now_ms() / 1000;
    if let Some(r) = &log.result {
        let outcome = if r.stop_reason == "cancelled" {
            Outcome::Cancelled
        } else {
            Outcome::Ok
        };
        return (outcome, Ok(r.stop_reason.clone()));
    }
    let err = match &log.error {
        Some(e) => usage_limit(&e.message, now_secs)
            .unwrap_or_else(|| ApiError::Upstream(clip(&e.message))),
        None => match judge(None, code, stderr, now_secs) {
            Err(e) => e,
            Ok(_) => ApiError::Upstream("the agent produced no result".into()),
        },
    };
    (Outcome::Error, Err(err))
}
