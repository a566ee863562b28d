//! Talking to acpx 0.19.1: the argv of each command, short control commands (`sessions
//! ensure`, `cancel`, `sessions close`) run to completion, and the files acpx keeps under
//! the children's `$HOME/.acpx`:
//! - `queues/<key>.lock` (key = first 24 hex digits of SHA-256 of the acpx record id) names
//!   the detached queue owner that keeps the agent warm between turns: its `pid`, its
//!   `processIdentity` (boot id and start ticks, so a reused pid is recognised) and its
//!   `socketPath`. The owner leads its own session and process group, with the adapter and
//!   `claude` inside that group, so killing a turn's `acpx prompt` group misses it.
//!   A lock is stale when its pid is gone, or alive but another process (start ticks or
//!   boot id differ), or the owner stopped refreshing `heartbeatAt` (15 s).
//! - `sessions/<record id>.json` and `<record id>.stream*.ndjson`: the session record and
//!   its event log, deleted with the session at the hard TTL.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::config::{Config, SessionPermissions};
use crate::process::{child_env, Event, Proc, ProcError, Spec, KILL_GRACE};
use crate::store::Db;

/// Where a session lives for acpx: sessions are keyed by (agent, cwd, name).
#[derive(Debug, Clone)]
pub struct Target {
    pub agent: String,
    pub cwd: PathBuf,
    pub name: String,
}

impl Target {
    /// The flags every command starts with. Values go in `--flag=value` form so that one
    /// starting with `-` is never read as a flag.
    fn global(&self) -> Vec<OsString> {
        let mut cwd = OsString::from("--cwd=");
        cwd.push(&self.cwd);
        vec!["--format".into(), "json".into(), cwd]
    }

    /// `sessions ensure`, which stores the model and system prompt with acpx's record.
    pub fn ensure_args(&self, model: &str, system: Option<&str>) -> Vec<OsString> {
        let mut args = self.global();
        args.extend(agent_options(model, system));
        args.extend([
            self.agent.clone().into(),
            "sessions".into(),
            "ensure".into(),
            "--name".into(),
            self.name.clone().into(),
        ]);
        args
    }

    /// One turn, the prompt on stdin. The model and system prompt are repeated because any
    /// turn may start a new ACP session (after a restart whose resume fails, acpx falls
    /// back to `session/new`); on a live session acpx ignores the system prompt and keeps
    /// the model. `--ttl` keeps the queue owner (and the warm agent) alive as long as the
    /// session may idle; the permission mode answers every request itself, and
    /// `--non-interactive-permissions deny` refuses whatever it would have asked a human
    /// about, so no turn ever waits for one.
    pub fn prompt_args(
        &self,
        config: &Config,
        permissions: SessionPermissions,
        model: &str,
        system: Option<&str>,
    ) -> Vec<OsString> {
        self.prompt_args_ttl(config.settings.session_ttl_secs, permissions, model, system)
    }

    /// The pool's warm-up prompt (see `pool`): the queue owner it starts has no idle TTL
    /// (`--ttl=0`); the warm-agent limit and the session's idle TTL bound it instead.
    pub fn warm_up_args(&self, config: &Config, model: &str) -> Vec<OsString> {
        self.prompt_args_ttl(0, config.settings.session_permissions, model, None)
    }

    fn prompt_args_ttl(
        &self,
        ttl_secs: u64,
        permissions: SessionPermissions,
        model: &str,
        system: Option<&str>,
    ) -> Vec<OsString> {
        let mut args = self.global();
        args.extend(agent_options(model, system));
        args.extend([
            format!("--ttl={ttl_secs}").into(),
            permissions.acpx_flag().into(),
            "--non-interactive-permissions=deny".into(),
            self.agent.clone().into(),
            "prompt".into(),
            "-s".into(),
            self.name.clone().into(),
            "-f".into(),
            "-".into(),
        ]);
        args
    }

    pub fn cancel_args(&self) -> Vec<OsString> {
        let mut args = self.global();
        args.extend([
            self.agent.clone().into(),
            "cancel".into(),
            "-s".into(),
            self.name.clone().into(),
        ]);
        args
    }

    pub fn close_args(&self) -> Vec<OsString> {
        let mut args = self.global();
        args.extend([
            self.agent.clone().into(),
            "sessions".into(),
            "close".into(),
            self.name.clone().into(),
        ]);
        args
    }

    /// The spec of an acpx process for this session, started in the session's dir (or its
    /// parent once the dir is gone, at close).
    pub fn spec(&self, config: &Config, args: Vec<OsString>, audit_id: Option<i64>) -> Spec {
        let cwd = if self.cwd.is_dir() {
            self.cwd.clone()
        } else {
            config.sessions_dir.clone()
        };
        Spec {
            program: config.settings.acpx_bin.clone(),
            args,
            cwd,
            env: child_env(config),
            max_output: config.settings.max_output_bytes,
            // Never the session dir: crash reconciliation removes the dirs its processes
            // own, and a session's dir outlives every turn.
            owns_dir: None,
            audit_id,
        }
    }
}

fn agent_options(model: &str, system: Option<&str>) -> Vec<OsString> {
    let mut args = vec![format!("--model={model}").into()];
    if let Some(system) = system {
        args.push(format!("--system-prompt={system}").into());
    }
    args
}

/// What a control command printed.
#[derive(Debug)]
pub struct Output {
    pub code: Option<i32>,
    pub lines: Vec<Value>,
    pub stderr: String,
}

impl Output {
    /// The first line carrying `"action": action` (acpx's answer to the command).
    pub fn action(&self, action: &str) -> Option<&Value> {
        self.lines
            .iter()
            .find(|l| l.get("action").and_then(Value::as_str) == Some(action))
    }

    /// The message of the first JSON-RPC error line, else the last stderr line.
    pub fn error_message(&self) -> String {
        self.lines
            .iter()
            .find_map(|l| l.pointer("/error/message").and_then(Value::as_str))
            .map(str::to_string)
            .or_else(|| {
                self.stderr
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| match self.code {
                Some(c) => format!("acpx exited with status {c}"),
                None => "acpx was killed by a signal".into(),
            })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Proc(#[from] ProcError),
    #[error("acpx did not finish within {0:?}")]
    Timeout(Duration),
}

/// Runs a short acpx command to completion (bounded by `limit`), collecting its JSON lines.
pub async fn control(
    config: &Config,
    db: &Db,
    target: &Target,
    args: Vec<OsString>,
    limit: Duration,
) -> Result<Output, ControlError> {
    control_fed(config, db, target, args, b"", limit).await
}

/// [`control`] with `input` on the command's stdin (a prompt for `-f -`).
pub async fn control_fed(
    config: &Config,
    db: &Db,
    target: &Target,
    args: Vec<OsString>,
    input: &[u8],
    limit: Duration,
) -> Result<Output, ControlError> {
    let spec = target.spec(config, args, None);
    let mut proc = Proc::spawn(spec, Some(db)).await?;
    proc.feed_and_close(input).await;
    let mut lines = Vec::new();
    let read = async {
        loop {
            match proc.next_event().await? {
                Event::Line(l) => {
                    if let Ok(v) = serde_json::from_slice::<Value>(&l) {
                        lines.push(v);
                    }
                }
                Event::Exited(status) => return Ok::<_, ProcError>(status.code()),
            }
        }
    };
    let code = match tokio::time::timeout(limit, read).await {
        Ok(code) => code,
        Err(_) => {
            proc.terminate().await;
            return Err(ControlError::Timeout(limit));
        }
    };
    let code = match code {
        Ok(code) => code,
        Err(e) => {
            proc.terminate().await;
            return Err(e.into());
        }
    };
    Ok(Output {
        code,
        lines,
        stderr: proc.stderr_tail(),
    })
}

/// The `HOME` the children get, where acpx keeps its state.
pub fn children_home(config: &Config) -> Option<PathBuf> {
    env_var(config, "HOME").map(PathBuf::from)
}

fn env_var(config: &Config, name: &str) -> Option<String> {
    child_env(config)
        .into_iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty())
}

/// The queue owner a lock file names.
#[derive(Debug, Clone)]
pub struct QueueOwner {
    pub pid: i32,
    start_ticks: Option<i64>,
    boot_id: Option<String>,
    lock: PathBuf,
    socket: Option<PathBuf>,
}

fn queue_key(record_id: &str) -> String {
    let digest = Sha256::digest(record_id.as_bytes());
    hex::encode(digest)[..24].to_string()
}

/// Reads the queue-owner lock of the session with acpx record id `record_id`.
pub fn queue_owner(home: &Path, record_id: &str) -> Option<QueueOwner> {
    let lock = home
        .join(".acpx/queues")
        .join(format!("{}.lock", queue_key(record_id)));
    let text = std::fs::read_to_string(&lock).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    if v.get("sessionId").and_then(Value::as_str) != Some(record_id) {
        return None;
    }
    let pid = v.get("pid").and_then(Value::as_i64)? as i32;
    let identity = v.get("processIdentity");
    let field = |k: &str| identity.and_then(|i| i.get(k)).and_then(Value::as_str);
    Some(QueueOwner {
        pid,
        start_ticks: field("startTicks").and_then(|s| s.parse().ok()),
        boot_id: field("bootId").map(str::to_string),
        lock,
        socket: v
            .get("socketPath")
            .and_then(Value::as_str)
            .map(PathBuf::from),
    })
}

fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
}

/// Whether `pid` is running (a zombie is not: nothing may ever reap it in a container).
pub fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next()),
            Some("Z") | Some("X") | None
        ),
        Err(_) => false,
    }
}

impl QueueOwner {
    /// Whether the process the lock names is alive and is the one that wrote the lock.
    pub fn is_running(&self) -> bool {
        if self.pid <= 1 || !pid_alive(self.pid) {
            return false;
        }
        if let (Some(theirs), Some(ours)) = (&self.boot_id, boot_id()) {
            if *theirs != ours {
                return false;
            }
        }
        match self.start_ticks {
            Some(ticks) => crate::process::start_ticks(self.pid) == Some(ticks),
            None => true,
        }
    }

    /// Removes the lock and its socket, so the next turn starts a new owner at once
    /// instead of first proving this one dead.
    fn remove_files(&self) {
        for path in std::iter::once(&self.lock).chain(self.socket.as_ref()) {
            if let Err(e) = std::fs::remove_file(path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "could not remove an acpx lock file");
                }
            }
        }
    }
}

/// Stops the queue owner of a session, with the agent processes in its group, and clears
/// its lock; a stale lock is only cleared. Returns whether a live owner was stopped.
pub async fn stop_queue_owner(home: &Path, record_id: &str) -> bool {
    let Some(owner) = queue_owner(home, record_id) else {
        return false;
    };
    let running = owner.is_running();
    if running {
        let group = Pid::from_raw(owner.pid);
        // The owner leads its group (it called setsid), so its pid is the group id.
        let _ = killpg(group, Signal::SIGTERM);
        let deadline = Instant::now() + KILL_GRACE;
        while pid_alive(owner.pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        // Whatever is left of the group (the adapter, claude) goes too.
        let _ = killpg(group, Signal::SIGKILL);
    }
    owner.remove_files();
    running
}

/// Deletes what acpx and Claude Code keep about a session: acpx's record and event log,
/// and Claude Code's transcript of the session's working dir. Returns how many entries
/// were removed.
pub fn delete_records(config: &Config, record_id: Option<&str>, cwd: &Path) -> usize {
    let mut removed = 0;
    let home = children_home(config);
    if let (Some(home), Some(record_id)) = (&home, record_id) {
        let prefix = format!("{record_id}.");
        if let Ok(entries) = std::fs::read_dir(home.join(".acpx/sessions")) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(&prefix)
                    && std::fs::remove_file(entry.path()).is_ok()
                {
                    removed += 1;
                }
            }
        }
    }
    let claude_dir = env_var(config, "CLAUDE_CONFIG_DIR")
        .map(PathBuf::from)
        .or_else(|| home.map(|h| h.join(".claude")));
    if let Some(claude_dir) = claude_dir {
        // Claude Code names a project's dir after its path, every other character '-'.
        let slug: String = cwd
            .to_string_lossy()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        if crate::process::remove_dir(&claude_dir.join("projects").join(slug)) {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_names_follow_acpx() {
        // Observed with acpx 0.19.1: record f9ffba5b-... had lock 95f2e09d2717ffc1afc518d9.
        assert_eq!(
            queue_key("f9ffba5b-b3c6-4fff-8dcc-d198d1e9f835"),
            "95f2e09d2717ffc1afc518d9"
        );
    }

    #[test]
    fn a_lock_naming_a_reused_pid_is_not_running() {
        let me = std::process::id() as i32;
        let dir = tempfile::tempdir().unwrap();
        let queues = dir.path().join(".acpx/queues");
        std::fs::create_dir_all(&queues).unwrap();
        let write = |ticks: i64| {
            let lock = serde_json::json!({
                "pid": me, "sessionId": "rec-1", "socketPath": "/nonexistent.sock",
                "processIdentity": {"kind": "linux-proc", "startTicks": ticks.to_string()},
            });
            std::fs::write(
                queues.join(format!("{}.lock", queue_key("rec-1"))),
                lock.to_string(),
            )
            .unwrap();
        };
        let ticks = crate::process::start_ticks(me).unwrap();
        write(ticks);
        assert!(queue_owner(dir.path(), "rec-1").unwrap().is_running());
        write(ticks + 1);
        assert!(!queue_owner(dir.path(), "rec-1").unwrap().is_running());
        assert!(queue_owner(dir.path(), "rec-2").is_none());
    }

    #[tokio::test]
    async fn stopping_an_owner_kills_its_whole_group_and_clears_its_lock() {
        use std::io::BufRead;
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let queues = dir.path().join(".acpx/queues");
        std::fs::create_dir_all(&queues).unwrap();
        // An "owner" leading its own group, with a child in that group (the agent).
        let mut owner = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 100 & echo $!; wait"])
            .process_group(0)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(owner.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let agent: i32 = line.trim().parse().unwrap();
        let pid = owner.id() as i32;
        let lock = queues.join(format!("{}.lock", queue_key("rec-9")));
        let ticks = crate::process::start_ticks(pid).unwrap();
        std::fs::write(
            &lock,
            serde_json::json!({"pid": pid, "sessionId": "rec-9", "socketPath": "/nonexistent.sock",
                               "processIdentity": {"startTicks": ticks.to_string()}})
            .to_string(),
        )
        .unwrap();
        assert!(stop_queue_owner(dir.path(), "rec-9").await);
        owner.wait().unwrap();
        assert!(!lock.exists());
        let deadline = Instant::now() + Duration::from_secs(5);
        while pid_alive(agent) {
            assert!(Instant::now() < deadline, "the agent survived");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A stale lock (its owner is gone) is only removed.
        std::fs::write(
            &lock,
            serde_json::json!({"pid": pid, "sessionId": "rec-9", "socketPath": "/x.sock"})
                .to_string(),
        )
        .unwrap();
        assert!(!stop_queue_owner(dir.path(), "rec-9").await);
        assert!(!lock.exists());
    }
}
