//! One-shot runs: `claude -p` in a fresh staged working dir, supervised from spawn to exit.
//! [`prepare`] does everything that can fail before an answer starts (admission through
//! `governance::admit`, dir, files, audit row), so those failures are plain JSON even for streaming requests; [`execute`]
//! runs the CLI, optionally forwarding each stream-json line, and closes the audit row
//! before the answer leaves.

pub mod invocation;
pub mod parse;
pub mod warm;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::app::AppState;
use crate::audit::{self, AuditEntry, Completion, Outcome};
use crate::auth::tokens::TokenRecord;
use crate::error::ApiError;
use crate::governance::{self, Admission};
use crate::process::{child_env, Event, Proc, ProcError, Spec};
use crate::util::new_id;
use invocation::{Fixed, Image, Tools};

/// A validated `/run` request (or an SDK request mapped to one).
#[derive(Debug, Clone)]
pub struct RunInput {
    pub prompt: String,
    pub model: String,
    /// `Some("")` replaces Claude Code's own system prompt with nothing.
    pub system: Option<String>,
    pub files: Vec<String>,
    pub timeout: Duration,
    pub tools: Tools,
    pub json_schema: Option<Value>,
    pub images: Vec<Image>,
    /// The audit kind: `run`, or `chat` for the SDK routes.
    pub kind: &'static str,
}

impl RunInput {
    /// What the process is fixed to at spawn, which is also the warm pool's key.
    pub fn fixed(&self) -> Fixed {
        Fixed {
            model: self.model.clone(),
            system: self.system.clone(),
            tools: self.tools.clone(),
            json_schema: self.json_schema.as_ref().map(Value::to_string),
        }
    }
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Usage {
    pub input_tokens: i64,
    pub output_tokens: i64,
}

/// The body of a successful run (also the `result` event of a streamed one).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RunAnswer {
    pub run_id: String,
    /// The CLI's answer text as it came (the structured output's JSON text for a schema
    /// run), for the SDK routes' message content.
    #[serde(skip)]
    pub text: String,
    /// The answer: JSON when it parses as JSON (a surrounding Markdown fence removed), else
    /// the CLI's text.
    pub result: Value,
    pub duration_ms: u64,
    pub stop_reason: String,
    pub model: String,
    pub usage: Usage,
    pub cost_usd: f64,
}

/// Closes an audit row as `abandoned` if the run (or turn) is dropped before it finished
/// (the client hung up and the handler future was dropped).
pub(crate) struct AuditGuard {
    state: Arc<AppState>,
    pub(crate) id: i64,
    done: bool,
}

/// How often, and how many times, a row that could not be closed is tried again.
const CLOSE_RETRY_EVERY: Duration = Duration::from_secs(1);
const CLOSE_RETRIES: u32 = 300;

impl AuditGuard {
    pub(crate) fn new(state: Arc<AppState>, id: i64) -> AuditGuard {
        AuditGuard {
            state,
            id,
            done: false,
        }
    }

    /// Closes the row. The answer must not leave as if recorded when it was not (a full
    /// disk): then the error comes back for the caller to answer instead, and the row is
    /// closed in the background once the database takes writes again; should that not
    /// happen before a restart, start-up marks it abandoned.
    pub(crate) async fn complete(&mut self, c: Completion) -> Result<(), ApiError> {
        self.done = true;
        let id = self.id;
        let first = c.clone();
        let Err(e) = self
            .state
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
        let (db, shutdown) = (self.state.db.clone(), self.state.shutdown.clone());
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
        let (db, id) = (self.state.db.clone(), self.id);
        tokio::spawn(async move {
            let c = Completion {
                outcome: Some(Outcome::Abandoned),
                detail: Some("client went away".into()),
                ..Default::default()
            };
            let _ = db.write(move |conn| audit::complete(conn, id, &c)).await;
        });
    }
}

/// Removes a run dir however the run ends.
struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        crate::process::remove_dir(&self.0);
    }
}

/// A run ready to start: it holds its admission (slot and the token's in-flight count), dir
/// and open audit row.
pub struct Prepared {
    state: Arc<AppState>,
    pub run_id: String,
    input: RunInput,
    prompt_text: String,
    dir: DirGuard,
    audit: AuditGuard,
    /// A pre-started process from the warm pool, if one matched.
    warm: Option<Proc>,
    _admission: Admission,
}

/// Admits the run under the token's policy (waiting in line for a slot), makes the run dir,
/// stages the files, opens the audit row.
pub async fn prepare(
    state: &Arc<AppState>,
    token: &TokenRecord,
    input: RunInput,
) -> Result<Prepared, ApiError> {
    let admission = governance::admit(state, token, &input.model).await?;
    let token_id = token.id.as_str();
    let (run_id, dir, warm) = match state.warm.take(&input.fixed()) {
        Some(w) => (w.run_id, w.dir, Some(w.proc)),
        None => {
            let run_id = new_id("run_");
            let dir = state.config.runs_dir.join(&run_id);
            tokio::fs::create_dir_all(&dir).await?;
            (run_id, dir, None)
        }
    };
    let dir = DirGuard(dir);
    let (prompt_text, audit) = stage_and_audit(
        state,
        Start {
            token_id,
            kind: input.kind,
            model: &input.model,
            subject: &run_id,
            prompt: &input.prompt,
            files: &input.files,
            dir: &dir.0,
            warm: Some(warm.is_some()),
        },
    )
    .await?;
    Ok(Prepared {
        state: state.clone(),
        run_id,
        input,
        prompt_text,
        dir,
        audit,
        warm,
        _admission: admission,
    })
}

/// What a run or turn records and stages before its agent starts.
pub(crate) struct Start<'a> {
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

/// Copies the attached files into the working dir, builds the text the agent gets (the
/// prompt, then a line naming the attachments) and opens the audit row as `running`.
pub(crate) async fn stage_and_audit(
    state: &Arc<AppState>,
    w: Start<'_>,
) -> Result<(String, AuditGuard), ApiError> {
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
    Ok((prompt_text, AuditGuard::new(state.clone(), audit_id)))
}

/// Starts the agent and feeds it `prompt` on stdin, concurrently with the caller's
/// reading, so a child that talks before it reads cannot deadlock against us. A failure
/// to start closes the audit row.
pub(crate) async fn spawn_with_prompt(
    state: &AppState,
    spec: Spec,
    prompt: impl Into<Vec<u8>>,
    audit: &mut AuditGuard,
) -> Result<Proc, ApiError> {
    let program = spec.program.display().to_string();
    let mut proc = match Proc::spawn(spec, Some(&state.db)).await {
        Ok(proc) => proc,
        Err(e) => {
            tracing::error!(error = %e, %program, "could not start the agent");
            let err = ApiError::Upstream("the agent could not be started".into());
            // The failure to start says more than a failure to record it.
            let _ = audit
                .complete(Completion {
                    outcome: Some(Outcome::Error),
                    detail: Some(err.code().into()),
                    ..Default::default()
                })
                .await;
            return Err(err);
        }
    };
    let prompt: Vec<u8> = prompt.into();
    if let Some(mut stdin) = proc.stdin.take() {
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let _ = stdin.write_all(&prompt).await;
            let _ = stdin.shutdown().await;
        });
    }
    Ok(proc)
}

/// How a run ended, before it becomes an answer.
enum End {
    Exited(Option<i32>),
    Timeout,
    Cancelled(&'static str),
    ClientGone,
    TooLarge,
}

/// Runs the CLI. With `sink`, every stdout line that is JSON is forwarded as it arrives
/// (the caller turns them into `event: claude`); a closed sink means the client is gone and
/// the run is stopped.
pub async fn execute(
    mut p: Prepared,
    sink: Option<mpsc::Sender<Value>>,
    cancel: CancellationToken,
) -> Result<RunAnswer, ApiError> {
    let started = Instant::now();
    let state = p.state.clone();
    let (args, stdin) = invocation::cold(
        &p.input.fixed(),
        &p.prompt_text,
        &p.input.images,
        sink.is_some(),
    );
    let spec = Spec {
        program: state.config.settings.claude_bin.clone(),
        args,
        cwd: p.dir.0.clone(),
        env: child_env(&state.config),
        max_output: state.config.settings.max_output_bytes,
        owns_dir: Some(p.dir.0.clone()),
        audit_id: Some(p.audit.id),
    };
    let mut proc = match p.warm.take() {
        Some(mut proc) => {
            // One stream-json user message; stdin stays open until the result line, then
            // closes, which ends the process.
            let message = invocation::user_message(&p.prompt_text, &p.input.images);
            if let Err(e) = proc.write_line(&message).await {
                tracing::warn!(error = %e, "a warm claude did not take its prompt");
            }
            proc
        }
        None => spawn_with_prompt(&state, spec, stdin, &mut p.audit).await?,
    };
    let deadline = tokio::time::sleep(p.input.timeout);
    tokio::pin!(deadline);
    let shutdown = state.shutdown.clone();
    let mut result: Option<parse::CliResult> = None;
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
                    if let Some(r) = parse::parse_result_line(&line) {
                        result = Some(r);
                        // A warm process answers one message; closing stdin ends it.
                        proc.stdin = None;
                    }
                    if let Some(sink) = &sink {
                        if let Ok(v) = serde_json::from_slice::<Value>(&line) {
                            if sink.send(v).await.is_err() {
                                break End::ClientGone;
                            }
                        }
                    }
                }
                Ok(Event::Exited(status)) => break End::Exited(status.code()),
                Err(ProcError::OutputTooLarge) => break End::TooLarge,
                Err(e) => {
                    tracing::error!(error = %e, "reading claude's output failed");
                    break End::Exited(None);
                }
            },
            _ = &mut deadline => break End::Timeout,
            _ = cancel.cancelled() => break End::Cancelled("cancelled"),
            _ = shutdown.cancelled() => break End::Cancelled("server shutting down"),
            _ = closed => break End::ClientGone,
        }
    };
    if !matches!(end, End::Exited(_)) {
        proc.terminate().await;
    }
    let duration_ms = started.elapsed().as_millis() as u64;
    let stderr = proc.stderr_tail();
    drop(proc);

    let now_secs = crate::util::now_ms() / 1000;
    let (outcome, judged, exit_code) = match end {
        End::Exited(code) => {
            let j = parse::judge(result, code, &stderr, now_secs)
                .and_then(|r| parse::structured(r, p.input.json_schema.is_some()));
            (
                if j.is_ok() {
                    Outcome::Ok
                } else {
                    Outcome::Error
                },
                j,
                code,
            )
        }
        End::Timeout => (Outcome::Timeout, Err(ApiError::Timeout), None),
        End::Cancelled(why) => (
            Outcome::Cancelled,
            Err(ApiError::Unavailable(why.into())),
            None,
        ),
        End::ClientGone => (
            Outcome::Abandoned,
            Err(ApiError::Unavailable("client went away".into())),
            None,
        ),
        End::TooLarge => (Outcome::Error, Err(ApiError::OutputTooLarge), None),
    };
    let completion = match &judged {
        Ok(r) => Completion {
            outcome: Some(outcome),
            response_chars: r.text.as_ref().map(|t| t.chars().count() as i64),
            duration_ms: Some(duration_ms as i64),
            exit_code: exit_code.map(i64::from),
            input_tokens: r.input_tokens,
            output_tokens: r.output_tokens,
            cost_usd: r.cost_usd,
            detail: None,
        },
        Err(e) => Completion {
            outcome: Some(outcome),
            duration_ms: Some(duration_ms as i64),
            exit_code: exit_code.map(i64::from),
            detail: Some(e.code().into()),
            ..Default::default()
        },
    };
    let recorded = p.audit.complete(completion).await;
    state
        .metrics
        .observe_run(outcome.as_str(), started.elapsed());
    if let Err(e) = &judged {
        state.governor.note(e);
    }
    if matches!(&judged, Err(ApiError::Upstream(m)) if m.contains("/login")) {
        // The login went away: warm processes started under it would fail the same way.
        state.warm.invalidate();
    }
    // A failed run answers its own error, which says more than a failure to record it.
    let r = judged?;
    recorded?;
    let text = r.text.clone().unwrap_or_default();
    Ok(RunAnswer {
        run_id: p.run_id.clone(),
        result: r
            .structured_output
            .clone()
            .unwrap_or_else(|| parse::answer_value(&text)),
        text,
        duration_ms,
        stop_reason: r.stop_reason.unwrap_or_else(|| "end_turn".into()),
        model: p.input.model.clone(),
        usage: Usage {
            input_tokens: r.input_tokens.unwrap_or(0),
            output_tokens: r.output_tokens.unwrap_or(0),
        },
        cost_usd: r.cost_usd.unwrap_or(0.0),
    })
}
