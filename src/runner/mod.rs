//! One-shot runs: `claude -p` in a fresh staged working dir, supervised from spawn to exit.
//! [`prepare`] does everything that can fail before an answer starts (admission through
//! `governance::admit`, dir, files, audit row), so those failures are plain JSON even for streaming requests; [`execute`]
//! runs the CLI, optionally forwarding each stream-json line, and closes the audit row
//! before the answer leaves.

pub mod parse;
pub mod warm;

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::app::AppState;
use crate::audit::{self, AuditEntry, Outcome};
use crate::auth::tokens::TokenRecord;
use crate::error::ApiError;
use crate::governance::{self, Admission};
use crate::process::{child_env, Proc, Spec};
use crate::supervise::{AuditGuard, Child, Fold, Job, Kind, Metered, Registration, Sink};
use crate::util::new_id;

/// A validated `/run` request.
#[derive(Debug, Clone)]
pub struct RunInput {
    pub prompt: String,
    pub model: String,
    pub system: Option<String>,
    pub files: Vec<String>,
    pub timeout: Duration,
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
    /// Makes the run cancellable by id while it is in flight.
    registration: Registration,
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
    let key = warm::Key {
        model: input.model.clone(),
        system: input.system.clone(),
    };
    let (run_id, dir, warm) = match state.warm.take(&key) {
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
            kind: "run",
            model: &input.model,
            subject: &run_id,
            prompt: &input.prompt,
            files: &input.files,
            dir: &dir.0,
            warm: Some(warm.is_some()),
        },
    )
    .await?;
    let registration = state.runs.register(&run_id, token_id);
    Ok(Prepared {
        state: state.clone(),
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
    Ok((prompt_text, state.supervisor.audit_guard(audit_id)))
}

/// The argv after the program: prompt on stdin, never here. `--flag=value` keeps a value
/// that starts with `-` from being read as a flag.
fn claude_args(input: &RunInput, streaming: bool) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["-p".into()];
    if streaming {
        args.extend([
            "--output-format".into(),
            "stream-json".into(),
            "--verbose".into(),
        ]);
    } else {
        args.extend(["--output-format".into(), "json".into()]);
    }
    args.extend(model_and_system_args(&input.model, input.system.as_deref()));
    args
}

/// Flags shared by cold and warm runs. `--flag=value` keeps a value that starts with `-`
/// from being read as a flag; one-shot runs need no resumable transcript on disk.
pub fn model_and_system_args(model: &str, system: Option<&str>) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![format!("--model={model}").into()];
    if let Some(system) = system {
        args.push(format!("--system-prompt={system}").into());
    }
    args.push("--no-session-persistence".into());
    args
}

/// What a run's `claude` printed, folded as it arrives: the `result` object decides the
/// answer; with a streaming client every JSON line is forwarded.
struct ClaudeFold {
    streaming: bool,
    result: Option<parse::CliResult>,
}

impl Fold for ClaudeFold {
    fn line(&mut self, line: &[u8]) -> Option<Value> {
        let v: Value = serde_json::from_slice(line).ok()?;
        if let Some(r) = parse::result_of(&v) {
            self.result = Some(r);
        }
        self.streaming.then_some(v)
    }

    fn answered(&self) -> bool {
        self.result.is_some()
    }

    fn judge(&self, exit_code: Option<i32>, stderr: &str) -> Result<Outcome, ApiError> {
        let now_secs = crate::util::now_ms() / 1000;
        parse::judge(self.result.clone(), exit_code, stderr, now_secs).map(|_| Outcome::Ok)
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
    let state = p.state.clone();
    let prompt = std::mem::take(&mut p.prompt_text);
    let child = match p.warm.take() {
        Some(mut proc) => {
            // One stream-json user message; stdin stays open until the result line, then
            // closes, which ends the process.
            let message = serde_json::json!({
                "type": "user",
                "message": {"role": "user", "content": prompt},
            });
            if let Err(e) = proc.write_line(message.to_string().as_bytes()).await {
                tracing::warn!(error = %e, "a warm claude did not take its prompt");
            }
            Child::Started(Box::new(proc))
        }
        None => Child::Spawn {
            spec: Spec {
                program: state.config.settings.claude_bin.clone(),
                args: claude_args(&p.input, sink.is_some()),
                cwd: p.dir.0.clone(),
                env: child_env(&state.config),
                max_output: state.config.settings.max_output_bytes,
                owns_dir: Some(p.dir.0.clone()),
                audit_id: Some(p.audit.id),
            },
            stdin: prompt,
        },
    };
    let job = Job {
        kind: Kind::Run,
        child,
        fold: ClaudeFold {
            streaming: sink.is_some(),
            result: None,
        },
        timeout: p.input.timeout,
        stop: p.registration.stop.clone(),
        gone,
        sink,
    };
    let ended = state.supervisor.supervise(job, &mut p.audit).await;
    if matches!(&ended.result, Err(ApiError::Upstream(m)) if m.contains("/login")) {
        // The login went away: warm processes started under it would fail the same way.
        state.warm.invalidate();
    }
    ended.result?;
    let r = ended.fold.result.unwrap_or_else(parse::CliResult::empty);
    let (text, stop_reason) = match ended.outcome {
        Outcome::Cancelled => (String::new(), "cancelled".to_string()),
        _ => (
            r.text.clone().unwrap_or_default(),
            r.stop_reason.clone().unwrap_or_else(|| "end_turn".into()),
        ),
    };
    Ok(RunAnswer {
        run_id: p.run_id.clone(),
        result: parse::answer_value(&text),
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
