//! One-shot runs: `claude -p` in a fresh staged working dir, supervised from spawn to exit.
//! [`Runner::prepare`] does everything that can fail before an answer starts (admission
//! through `governance::Admitter`, dir, files, audit row), so those failures are plain JSON even for streaming requests; [`execute`]
//! runs the CLI, optionally forwarding each stream-json line, and closes the audit row
//! before the answer leaves.

pub mod claude_json;
pub mod invocation;
pub mod warm;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::audit::{self, Outcome};
use crate::auth::tokens::TokenRecord;
use crate::config::Config;
use crate::error::ApiError;
use crate::governance::{Admission, Admitter};
use crate::process::{child_env, Proc, Spec};
use crate::supervise::{
    AuditGuard, Child, Fold, Job, Kind, Metered, Registration, Running, Sink, Staging, Supervisor,
    WarmPoolUse,
};
use crate::util::new_id;
use invocation::{Fixed, Image, Tools};
use warm::WarmPool;

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

/// Removes a run dir however the run ends.
struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        crate::process::remove_dir(&self.0);
    }
}

/// Runs `claude -p` for `/run`, with the handles that takes: built once at start-up.
#[derive(Clone)]
pub struct Runner {
    config: Arc<Config>,
    warm: Arc<WarmPool>,
    admitter: Admitter,
    supervisor: Supervisor,
    runs: Running,
}

/// A run ready to start: it holds its admission (slot and the token's in-flight count), dir
/// and open audit row.
pub struct Prepared {
    runner: Runner,
    pub run_id: String,
    input: RunInput,
    prompt_text: String,
    dir: DirGuard,
    audit: AuditGuard,
    /// A pre-started process from the warm pool, if one matched.
    warm: Option<Proc>,
    /// Makes the run cancellable by id while it is in flight.
    registration: Registration,
    _admission: Admission,
}

impl Runner {
    pub fn new(
        config: Arc<Config>,
        warm: Arc<WarmPool>,
        admitter: Admitter,
        supervisor: Supervisor,
    ) -> Runner {
        Runner {
            config,
            warm,
            admitter,
            supervisor,
            runs: Running::default(),
        }
    }

    /// Admits the run under the token's policy (waiting in line for a slot), makes the run
    /// dir, stages the files, opens the audit row.
    pub async fn prepare(
        &self,
        token: &TokenRecord,
        input: RunInput,
    ) -> Result<Prepared, ApiError> {
        prepare(self, token, input).await
    }

    /// Cancels `token_id`'s run `run_id` and waits until it has ended: `true`; `false` when
    /// that run of this token has already ended; `not_found` for an unknown run or another
    /// token's.
    pub async fn cancel(&self, run_id: &str, token_id: &str) -> Result<bool, ApiError> {
        if self.runs.cancel(run_id, token_id).await {
            return Ok(true);
        }
        let id = run_id.to_string();
        let owner = self
            .supervisor
            .db()
            .read(move |c| audit::run_owner(c, &id))
            .await?;
        match owner {
            Some(owner) if owner == token_id => Ok(false),
            _ => Err(ApiError::not_found("run")),
        }
    }
}

async fn prepare(
    state: &Runner,
    token: &TokenRecord,
    input: RunInput,
) -> Result<Prepared, ApiError> {
    let admission = state.admitter.admit(token, &input.model).await?;
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
    let (prompt_text, audit) = state
        .supervisor
        .stage_and_audit(Staging {
            token_id,
            kind: input.kind,
            model: &input.model,
            subject: &run_id,
            prompt: &input.prompt,
            files: &input.files,
            dir: &dir.0,
            warm_pool: match warm {
                Some(_) => WarmPoolUse::Hit,
                None => WarmPoolUse::Miss,
            },
        })
        .await?;
    let registration = state.runs.register(&run_id, token_id);
    Ok(Prepared {
        runner: state.clone(),
        run_id,
        input,
        prompt_text,
        dir,
        audit,
        warm,
        registration,
        _admission: admission,
    })
}

/// What a run's `claude` printed, folded as it arrives: the `result` object decides the
/// answer; with a streaming client every JSON line is forwarded.
struct ClaudeFold {
    streaming: bool,
    /// A `json_schema` run: its answer must be the structured output.
    schema: bool,
    result: Option<claude_json::CliResult>,
}

impl Fold for ClaudeFold {
    fn line(&mut self, line: &[u8]) -> Option<Value> {
        let v: Value = serde_json::from_slice(line).ok()?;
        if let Some(r) = claude_json::result_of(&v) {
            self.result = Some(r);
        }
        self.streaming.then_some(v)
    }

    fn answered(&self) -> bool {
        self.result.is_some()
    }

    fn exited(&self, exit_code: Option<i32>, stderr: &str) -> Result<Outcome, ApiError> {
        let now_secs = crate::util::now_ms() / 1000;
        claude_json::answer_or_error(self.result.clone(), exit_code, stderr, now_secs)
            .and_then(|r| claude_json::structured(r, self.schema))
            .map(|_| Outcome::Ok)
    }

    fn metered(&self) -> Metered {
        let r = self.result.as_ref();
        Metered {
            input_tokens: r.and_then(|r| r.input_tokens),
            output_tokens: r.and_then(|r| r.output_tokens),
            cost_usd: r.and_then(|r| r.cost_usd),
            response_chars: r
                .filter(|r| !r.is_error)
                .and_then(|r| r.text.as_ref())
                .map(|t| t.chars().count() as i64),
        }
    }
}

/// Runs the CLI under the shared supervision path. With `sink`, every stdout line that is
/// JSON is forwarded as it arrives (the caller turns them into `event: claude`); a closed
/// sink or a cancelled `gone` means the client is gone and the run is stopped.
pub async fn execute(
    mut p: Prepared,
    sink: Option<Sink>,
    gone: CancellationToken,
) -> Result<RunAnswer, ApiError> {
    let state = p.runner.clone();
    let prompt = std::mem::take(&mut p.prompt_text);
    let child = match p.warm.take() {
        Some(mut proc) => {
            // One stream-json user message; stdin stays open until the result line, then
            // closes, which ends the process.
            let message = invocation::user_message(&prompt, &p.input.images);
            if let Err(e) = proc.write_line(message.as_bytes()).await {
                tracing::warn!(error = %e, "a warm claude did not take its prompt");
            }
            Child::Started(Box::new(proc))
        }
        None => {
            let (args, stdin) =
                invocation::cold(&p.input.fixed(), &prompt, &p.input.images, sink.is_some());
            Child::Spawn {
                spec: Spec {
                    program: state.config.settings.claude_bin.clone(),
                    args,
                    cwd: p.dir.0.clone(),
                    env: child_env(&state.config),
                    max_output: state.config.settings.max_output_bytes,
                    owns_dir: Some(p.dir.0.clone()),
                    audit_id: Some(p.audit.id),
                },
                stdin,
            }
        }
    };
    let job = Job {
        kind: Kind::Run,
        child,
        fold: ClaudeFold {
            streaming: sink.is_some(),
            schema: p.input.json_schema.is_some(),
            result: None,
        },
        timeout: p.input.timeout,
        stop: p.registration.stop.clone(),
        gone,
        sink,
    };
    let ended = state.supervisor.supervise(job, &mut p.audit).await;
    if matches!(&ended.result, Err(ApiError::NotLoggedIn(_))) {
        // The login went away: warm processes started under it would fail the same way.
        state.warm.invalidate();
    }
    ended.result?;
    let r = ended
        .fold
        .result
        .unwrap_or_else(claude_json::CliResult::empty);
    // Judged already: a schema run that got here has its structured output.
    let r = claude_json::structured(r.clone(), p.input.json_schema.is_some()).unwrap_or(r);
    let (text, stop_reason) = match ended.outcome {
        Outcome::Cancelled => (String::new(), "cancelled".to_string()),
        _ => (
            r.text.clone().unwrap_or_default(),
            r.stop_reason.clone().unwrap_or_else(|| "end_turn".into()),
        ),
    };
    let result = match (&r.structured_output, ended.outcome) {
        (Some(out), Outcome::Ok) => out.clone(),
        _ => claude_json::answer_value(&text),
    };
    Ok(RunAnswer {
        run_id: p.run_id.clone(),
        result,
        text,
        duration_ms: ended.duration_ms,
        stop_reason,
        model: p.input.model.clone(),
        usage: Usage {
            input_tokens: r.input_tokens.unwrap_or(0),
            output_tokens: r.output_tokens.unwrap_or(0),
        },
        cost_usd: r.cost_usd.unwrap_or(0.0),
    })
}
