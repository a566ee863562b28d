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

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::acp_log::TurnLog;
use super::acpx::{self, Target};
use super::store::{self, SessionRecord};
use super::{target, Claim, Sessions};
use crate::audit::{Completion, Outcome};
use crate::auth::tokens::TokenRecord;
use crate::config::Config;
use crate::error::ApiError;
use crate::governance::Admission;
use crate::process::Proc;
use crate::runner::claude_json::{answer_or_error, clip, usage_limit};
use crate::store::Db;
use crate::supervise::{
    self, AuditGuard, Child, Fold, Job, Kind, Metered, Sink, Staging, StopWhy, WarmPoolUse,
    SOFT_STOP_GRACE,
};
use crate::util::now_ms;

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
    state: Sessions,
    session: SessionRecord,
    claim: Claim,
    /// `None` when the turn was cancelled or its session closed while it waited for one.
    admission: Option<Admission>,
    /// The `acpx prompt` argv (with the token's permission mode, else the server's).
    args: Vec<OsString>,
    /// The client pre-started for this turn, if one fitted (see `warm`).
    client: Option<Proc>,
    timeout: Duration,
    prompt_text: String,
    audit: AuditGuard,
}

/// Checks the session is the caller's and open, claims it (`busy` if a turn runs), takes a
/// slot (waiting in line), stages the attachments into the session's dir and opens the
/// audit row.
pub async fn prepare_turn(
    state: &Sessions,
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
    let claim = state.active.claim_turn(&s.session_id).await?;
    // A close may have finished between the first read and the claim.
    let s = open(super::get(state, token_id, id).await?)?;
    let admission = tokio::select! {
        admitted = state.admitter.admit(token, &s.model) => Some(admitted?),
        _ = claim.stop.stopped() => None,
    };
    let permissions = token
        .policy
        .session_permissions
        .unwrap_or(state.config.settings.session_permissions);
    let args = target(&s).prompt_args(
        &state.config,
        permissions,
        &s.model,
        s.system_prompt.as_deref(),
    );
    let client = state.warm.take_client(&s.session_id, &args);
    let cwd = PathBuf::from(&s.cwd);
    tokio::fs::create_dir_all(&cwd).await?;
    let (prompt_text, audit) = state
        .supervisor
        .stage_and_audit(Staging {
            token_id,
            kind: "turn",
            model: &s.model,
            subject: &s.session_id,
            prompt: &input.prompt,
            files: &input.files,
            dir: &cwd,
            // For a turn, "warm" means its acpx client was started ahead.
            warm_pool: if client.is_some() {
                WarmPoolUse::Hit
            } else {
                WarmPoolUse::Miss
            },
        })
        .await?;
    Ok(PreparedTurn {
        state: state.clone(),
        session: s,
        claim,
        admission,
        args,
        client,
        timeout: input.timeout,
        prompt_text,
        audit,
    })
}

/// Runs a prepared turn on its own task and waits for it; see [`supervise::detached`].
pub async fn run_turn(p: PreparedTurn) -> Result<TurnAnswer, ApiError> {
    supervise::detached(move |gone| execute_turn(p, None, gone)).await
}

/// What one `acpx prompt` printed, folded as it arrives, and how to stop it softly: acpx
/// is asked to cancel the turn (the agent answers with `stopReason: "cancelled"`), and
/// after a kill the queue owner (outside the turn's group) goes too.
struct AcpFold {
    log: TurnLog,
    /// The session's cumulative cost before this turn (ACP reports running totals).
    cost_before: f64,
    config: Arc<Config>,
    db: Db,
    target: Target,
    record_id: Option<String>,
    /// The session, held until the turn is settled.
    claim: Option<Claim>,
}

impl Fold for AcpFold {
    fn line(&mut self, line: &[u8]) -> Option<Value> {
        self.log.push(line)
    }

    fn exited(&self, exit_code: Option<i32>, stderr: &str) -> Result<Outcome, ApiError> {
        let (outcome, judged) = turn_answer_or_error(&self.log, exit_code, stderr);
        judged.map(|_| outcome)
    }

    fn metered(&self) -> Metered {
        let r = self.log.result.as_ref();
        Metered {
            input_tokens: r.and_then(|r| r.input_tokens),
            output_tokens: r.and_then(|r| r.output_tokens),
            cost_usd: self.log.cost(self.cost_before).0,
            response_chars: Some(self.log.text().chars().count() as i64),
        }
    }

    fn soft_stop(&self) -> Option<BoxFuture<'static, bool>> {
        let (config, db, t) = (self.config.clone(), self.db.clone(), self.target.clone());
        Some(Box::pin(async move {
            let out = acpx::control(&config, &db, &t, t.cancel_args(), SOFT_STOP_GRACE).await;
            // `false` also when acpx had nothing to cancel yet (the agent was starting).
            out.is_ok_and(|o| {
                o.lines
                    .iter()
                    .any(|l| l.get("cancelled") == Some(&Value::Bool(true)))
            })
        }))
    }

    /// Records the session's new cost total and frees it before the audit row closes, so
    /// a client's next turn is never `busy`.
    fn settle(&mut self) -> Option<BoxFuture<'static, ()>> {
        let claim = self.claim.take()?;
        let (_, cost_total) = self.log.cost(self.cost_before);
        let (db, id) = (self.db.clone(), claim.session_id().to_string());
        Some(Box::pin(async move {
            if let Err(e) = db
                .write(move |c| store::end_turn(c, &id, now_ms(), cost_total))
                .await
            {
                tracing::error!(error = %e, "could not record the end of a turn");
            }
            drop(claim);
        }))
    }

    fn after_kill(&self) -> Option<BoxFuture<'static, ()>> {
        let home = acpx::children_home(&self.config)?;
        let record_id = self.record_id.clone()?;
        Some(Box::pin(async move {
            acpx::stop_queue_owner(&home, &record_id).await;
        }))
    }
}

/// Runs the turn under the shared supervision path. With `sink`, every JSON line is
/// forwarded as it arrives (the caller turns them into `event: acp`); a closed sink or a
/// cancelled `gone` means the client is gone and the turn is stopped.
pub async fn execute_turn(
    p: PreparedTurn,
    sink: Option<Sink>,
    gone: CancellationToken,
) -> Result<TurnAnswer, ApiError> {
    let PreparedTurn {
        state,
        session,
        claim,
        admission,
        args,
        client,
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
    let (Some(turn_index), Some(_admission)) = (begun, admission) else {
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
    let stop = claim.stop.clone();
    let child = match client {
        Some(mut proc) => {
            proc.feed_and_close(prompt_text.as_bytes()).await;
            Child::Started(Box::new(proc))
        }
        None => Child::Spawn {
            spec: t.spec(&state.config, args, Some(audit.id)),
            stdin: prompt_text,
        },
    };
    let job = Job {
        kind: Kind::Turn,
        child,
        fold: AcpFold {
            log: TurnLog::default(),
            cost_before: session.cost_total,
            config: state.config.clone(),
            db: state.db.clone(),
            target: t,
            record_id: session.acpx_record_id.clone(),
            claim: Some(claim),
        },
        timeout,
        stop,
        gone,
        sink,
    };
    let ended = state.supervisor.supervise(job, &mut audit).await;
    let log = ended.fold.log;
    let (cost, _) = log.cost(session.cost_total);
    ended.result?;
    let result = log.result.clone();
    let tokens = |f: fn(&super::acp_log::PromptResult) -> Option<i64>| result.as_ref().and_then(f);
    let stop_reason = match (ended.outcome, &result) {
        (Outcome::Cancelled, _) => "cancelled".to_string(),
        (_, Some(r)) => r.stop_reason.clone(),
        (_, None) => "end_turn".to_string(),
    };
    Ok(TurnAnswer {
        session_id: sid,
        turn_index,
        text: log.text().to_string(),
        stop_reason,
        duration_ms: ended.duration_ms,
        usage: TurnUsage {
            input_tokens: tokens(|r| r.input_tokens).unwrap_or(0),
            output_tokens: tokens(|r| r.output_tokens).unwrap_or(0),
            total_tokens: tokens(|r| r.total_tokens).unwrap_or(0),
            cost_usd: cost.unwrap_or(0.0),
        },
        events: log.events,
    })
}

/// A finished `acpx prompt`: the result answering this turn's prompt is the answer, even
/// with a non-zero exit (acpx exits 5 when every permission request was denied, yet the
/// agent answered); otherwise its error line, otherwise its exit and stderr.
fn turn_answer_or_error(
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
        None => match answer_or_error(None, code, stderr, now_secs) {
            Err(e) => e,
            Ok(_) => ApiError::Upstream("the agent produced no result".into()),
        },
    };
    (Outcome::Error, Err(err))
}
