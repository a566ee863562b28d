//! Supervised agent processes, shared by runs, turns and probes. Every child:
//! - starts with an environment rebuilt from an allowlist (no admin bearer, no caller token);
//! - is built with `Command::arg` (never a shell) and leads its own process group;
//! - gets `PR_SET_PDEATHSIG=SIGKILL` through `setpriv` when it is installed, so it dies with
//!   a SIGKILLed server (grandchildren are caught by start-up reconciliation instead);
//! - is recorded in `live_processes` while it runs, so a restart can kill survivors;
//! - has its output read in chunks and split into lines under a byte cap;
//! - is killed as a group (SIGTERM, a short grace, SIGKILL) on timeout, cancel, overflow,
//!   drop (client gone) and shutdown.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncWriteExt;
use tokio::process::{ChildStdin, Command};
use tokio_process_stream::{Item, ProcessChunkStream};

use crate::config::Config;
use crate::store::Db;
use crate::util::now_ms;

/// Names passed through as they are.
const EXACT: &[&str] = &[
    "PATH",
    "HOME",
    "LANG",
    "TZ",
    "TMPDIR",
    "IS_SANDBOX",
    "USER",
    "LOGNAME",
];
/// Prefixes passed through (`LC_ALL`, `ANTHROPIC_BASE_URL`, `CLAUDE_CONFIG_DIR`, ...).
const PREFIXES: &[&str] = &["LC_", "ANTHROPIC_", "CLAUDE_", "DISABLE_", "NODE_"];
/// Between SIGTERM and SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_millis(1500);
/// Stderr kept for error messages (the rest still counts towards the output cap).
const STDERR_KEEP: usize = 16 * 1024;

fn allowed(name: &str, extra: &[String]) -> bool {
    EXACT.contains(&name)
        || PREFIXES.iter().any(|p| name.starts_with(p))
        || extra.iter().any(|e| e == name)
}

/// The environment a child starts with: allowlisted server variables plus the names in
/// `CLAWDFORGE_CHILD_ENV`, then the config's overrides. `ADMIN_BOOTSTRAP_TOKEN` is never
/// passed, even if an operator lists it.
pub fn child_env(config: &Config) -> Vec<(String, String)> {
    let extra = &config.settings.child_env;
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| allowed(k, extra) && k != "ADMIN_BOOTSTRAP_TOKEN")
        .collect();
    for (k, v) in &config.child_env_overrides {
        env.retain(|(name, _)| name != k);
        env.push((k.clone(), v.clone()));
    }
    env
}

/// `setpriv` from util-linux, if installed: it sets the parent-death signal and execs the
/// agent, which keeps `unsafe` (a `pre_exec` hook) out of this crate.
pub fn find_setpriv() -> Option<PathBuf> {
    ["/usr/bin/setpriv", "/bin/setpriv"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// A command for `program` that gets SIGKILL when the server dies, however it dies (through
/// `setpriv` when installed). Every child the server starts is built from this: agents and
/// the short CLI probes alike.
pub fn dying_with_server(program: &std::path::Path) -> Command {
    match find_setpriv() {
        Some(setpriv) => {
            let mut c = Command::new(setpriv);
            c.args(["--pdeathsig", "KILL", "--"]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Spec {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub cwd: PathBuf,
    pub env: Vec<(String, String)>,
    /// Kill the whole group when the total of stdout and stderr passes this.
    pub max_output: u64,
    /// The run dir (if any) this process owns, recorded for crash reconciliation.
    pub owns_dir: Option<PathBuf>,
    /// The audit row of the work this process does.
    pub audit_id: Option<i64>,
}

/// One event from a running child.
#[derive(Debug)]
pub enum Event {
    /// A complete stdout line (without its newline).
    Line(Vec<u8>),
    /// The child exited; stdout and stderr are closed.
    Exited(ExitStatus),
}

#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("could not start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("output over the limit")]
    OutputTooLarge,
    #[error("reading the child's output failed: {0}")]
    Io(#[from] std::io::Error),
}

/// A running child process group. Dropping it kills the group.
pub struct Proc {
    stream: ProcessChunkStream,
    pub stdin: Option<ChildStdin>,
    pub pgid: i32,
    db: Option<Db>,
    max_output: u64,
    seen: u64,
    pending: Vec<u8>,
    lines: std::collections::VecDeque<Vec<u8>>,
    stderr_tail: Vec<u8>,
    exit: Option<ExitStatus>,
    finished: bool,
}

impl Proc {
    /// Starts `spec` in its own process group and records it in `live_processes` (when a
    /// database is given) before returning.
    pub async fn spawn(spec: Spec, db: Option<&Db>) -> Result<Proc, ProcError> {
        let mut cmd = dying_with_server(&spec.program);
        cmd.args(&spec.args)
            .current_dir(&spec.cwd)
            .env_clear()
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|source| ProcError::Spawn {
            program: spec.program.display().to_string(),
            source,
        })?;
        let pgid = child.id().map(|p| p as i32).unwrap_or(0);
        let stdin = child.stdin.take();
        let stream = ProcessChunkStream::from(child);
        let proc = Proc {
            stream,
            stdin,
            pgid,
            db: db.cloned(),
            max_output: spec.max_output,
            seen: 0,
            pending: Vec::new(),
            lines: Default::default(),
            stderr_tail: Vec::new(),
            exit: None,
            finished: false,
        };
        if let Some(db) = db {
            let ticks = start_ticks(pgid).unwrap_or(0);
            let dir = spec.owns_dir.as_ref().map(|d| d.display().to_string());
            let audit_id = spec.audit_id;
            let registered = db
                .write(move |c| {
                    c.execute(
                        "INSERT OR REPLACE INTO live_processes (pgid, start_ticks, audit_id, dir, started_at)
                         VALUES (?1, ?2, ?3, ?4, ?5)",
                        rusqlite::params![pgid, ticks, audit_id, dir, now_ms()],
                    )
                })
                .await;
            if let Err(e) = registered {
                tracing::warn!(error = %e, "could not record a child process");
            }
        }
        Ok(proc)
    }

    /// Writes `data` to the child's stdin and closes it. A child that exits without reading
    /// (a crash) is not an error here: its exit status tells the story.
    pub async fn feed_and_close(&mut self, data: &[u8]) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(data).await;
            let _ = stdin.shutdown().await;
        }
    }

    /// Whether the child has exited (reaping it if so). For idle warm processes.
    pub fn has_exited(&mut self) -> bool {
        match self.stream.child_mut() {
            Some(child) => !matches!(child.try_wait(), Ok(None)),
            None => true,
        }
    }

    /// Writes one line to the child's stdin, keeping it open (stream-json input).
    pub async fn write_line(&mut self, line: &[u8]) -> std::io::Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| std::io::Error::other("stdin closed"))?;
        stdin.write_all(line).await?;
        stdin.write_all(b"\n").await?;
        stdin.flush().await
    }

    /// The last bytes the child wrote to stderr, as text.
    pub fn stderr_tail(&self) -> String {
        String::from_utf8_lossy(&self.stderr_tail)
            .trim()
            .to_string()
    }

    /// The next stdout line, or the exit once output is closed and the child reaped.
    pub async fn next_event(&mut self) -> Result<Event, ProcError> {
        loop {
            if let Some(line) = self.lines.pop_front() {
                return Ok(Event::Line(line));
            }
            if let Some(status) = self.exit {
                if !self.pending.is_empty() {
                    return Ok(Event::Line(std::mem::take(&mut self.pending)));
                }
                return Ok(Event::Exited(status));
            }
            match self.stream.next().await {
                Some(Item::Stdout(chunk)) => {
                    self.count(chunk.len())?;
                    self.split(&chunk);
                }
                Some(Item::Stderr(chunk)) => {
                    self.count(chunk.len())?;
                    self.stderr_tail.extend_from_slice(&chunk);
                    if self.stderr_tail.len() > STDERR_KEEP {
                        let cut = self.stderr_tail.len() - STDERR_KEEP;
                        self.stderr_tail.drain(..cut);
                    }
                }
                Some(Item::Done(status)) => {
                    let status = status?;
                    self.exit = Some(status);
                    // The leader is gone; anything it left in its group goes with it.
                    self.kill_group(Signal::SIGKILL);
                    self.finished = true;
                    self.unregister();
                }
                None => {
                    return Err(ProcError::Io(std::io::Error::other(
                        "child stream ended without an exit status",
                    )));
                }
            }
        }
    }

    fn count(&mut self, n: usize) -> Result<(), ProcError> {
        self.seen = self.seen.saturating_add(n as u64);
        if self.seen > self.max_output {
            return Err(ProcError::OutputTooLarge);
        }
        Ok(())
    }

    fn split(&mut self, chunk: &[u8]) {
        let mut rest = chunk;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            let mut line = std::mem::take(&mut self.pending);
            line.extend_from_slice(&rest[..i]);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            self.lines.push_back(line);
            rest = &rest[i + 1..];
        }
        self.pending.extend_from_slice(rest);
    }

    fn kill_group(&self, sig: Signal) {
        if self.pgid > 0 {
            // ESRCH (group already gone) is the normal case after a clean exit.
            let _ = killpg(Pid::from_raw(self.pgid), sig);
        }
    }

    /// Stops the group: SIGTERM, up to `KILL_GRACE` for the leader to exit, then SIGKILL
    /// for whatever is left (grandchildren, or a leader that ignores SIGTERM).
    pub async fn terminate(&mut self) {
        if self.finished {
            return;
        }
        self.kill_group(Signal::SIGTERM);
        let drained = tokio::time::timeout(KILL_GRACE, async {
            loop {
                match self.stream.next().await {
                    Some(Item::Done(_)) | None => break,
                    Some(_) => {}
                }
            }
        })
        .await;
        self.kill_group(Signal::SIGKILL);
        if drained.is_err() {
            // Reap the leader after SIGKILL so no zombie lingers.
            let _ = tokio::time::timeout(KILL_GRACE, async {
                while let Some(item) = self.stream.next().await {
                    if matches!(item, Item::Done(_)) {
                        break;
                    }
                }
            })
            .await;
        }
        self.finished = true;
        self.unregister();
    }

    fn unregister(&mut self) {
        if let Some(db) = self.db.take() {
            let pgid = self.pgid;
            tokio::spawn(async move {
                let _ = db
                    .write(move |c| c.execute("DELETE FROM live_processes WHERE pgid = ?1", [pgid]))
                    .await;
            });
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // Dropped mid-flight (the client went away, or a task was aborted): stop the group
        // without waiting here, and finish the job (SIGKILL) in the background.
        self.kill_group(Signal::SIGTERM);
        let pgid = self.pgid;
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    tokio::time::sleep(KILL_GRACE).await;
                    if pgid > 0 {
                        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
                    }
                });
            }
            Err(_) => self.kill_group(Signal::SIGKILL),
        }
        self.unregister();
    }
}

/// Field 22 of /proc/PID/stat: when the process started, in clock ticks since boot.
pub fn start_ticks(pid: i32) -> Option<i64> {
    stat_fields(pid).and_then(|f| f.get(19).and_then(|s| s.parse().ok()))
}

/// Fields of /proc/PID/stat after the `(comm)` field: index 0 is field 3 (state).
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    Some(after.split_whitespace().map(str::to_string).collect())
}

/// Kills every process in group `pgid` that started no earlier than `since_ticks` (so a
/// reused pid is left alone). Returns how many were signalled.
pub fn kill_survivors(pgid: i32, since_ticks: i64) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut killed = 0;
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Some(fields) = stat_fields(pid) else {
            continue;
        };
        let pgrp: Option<i32> = fields.get(2).and_then(|s| s.parse().ok());
        let started: Option<i64> = fields.get(19).and_then(|s| s.parse().ok());
        if pgrp == Some(pgid)
            && started.is_some_and(|t| t >= since_ticks)
            && nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok()
        {
            killed += 1;
        }
    }
    killed
}

/// Start-up: kill what the previous process left running and remove the dirs it owned.
pub async fn reconcile(db: &Db) -> anyhow::Result<(usize, usize)> {
    let rows: Vec<(i32, i64, Option<String>)> = db
        .read(|c| {
            let mut stmt = c.prepare("SELECT pgid, start_ticks, dir FROM live_processes")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect()
        })
        .await?;
    let mut killed = 0;
    let mut dirs = 0;
    for (pgid, ticks, dir) in &rows {
        killed += kill_survivors(*pgid, *ticks);
        if let Some(dir) = dir {
            if remove_dir(Path::new(dir)) {
                dirs += 1;
            }
        }
    }
    db.write(|c| c.execute("DELETE FROM live_processes", []))
        .await?;
    Ok((killed, dirs))
}

/// The run dirs owned by live agent processes (`live_processes`).
pub fn live_dirs(
    conn: &rusqlite::Connection,
) -> rusqlite::Result<std::collections::HashSet<String>> {
    let mut stmt = conn.prepare_cached("SELECT dir FROM live_processes WHERE dir IS NOT NULL")?;
    let rows = stmt.query_map([], |r| r.get(0))?;
    rows.collect()
}

/// Removes a directory tree, treating "already gone" as done.
pub fn remove_dir(dir: &Path) -> bool {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "could not remove a working dir");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowlist() {
        let extra = vec!["MY_PROXY".to_string()];
        for ok in [
            "PATH",
            "HOME",
            "LC_ALL",
            "ANTHROPIC_API_KEY",
            "CLAUDE_CONFIG_DIR",
            "NODE_OPTIONS",
            "MY_PROXY",
            "IS_SANDBOX",
        ] {
            assert!(allowed(ok, &extra), "{ok}");
        }
        for no in [
            "ADMIN_BOOTSTRAP_TOKEN_X",
            "AWS_SECRET_ACCESS_KEY",
            "CLAWDFORGE_LISTEN",
            "SSH_AUTH_SOCK",
        ] {
            assert!(!allowed(no, &extra), "{no}");
        }
    }

    fn spec(script: &str, max_output: u64) -> Spec {
        Spec {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            cwd: std::env::temp_dir(),
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            max_output,
            owns_dir: None,
            audit_id: None,
        }
    }

    #[tokio::test]
    async fn lines_then_exit() {
        let mut p = Proc::spawn(spec("printf 'a\\nb\\r\\nc'; exit 3", 1 << 20), None)
            .await
            .unwrap();
        let mut lines = Vec::new();
        let status = loop {
            match p.next_event().await.unwrap() {
                Event::Line(l) => lines.push(String::from_utf8(l).unwrap()),
                Event::Exited(s) => break s,
            }
        };
        assert_eq!(lines, ["a", "b", "c"]);
        assert_eq!(status.code(), Some(3));
    }

    #[tokio::test]
    async fn output_cap_counts_bytes_not_lines() {
        let mut p = Proc::spawn(spec("head -c 100000 /dev/zero", 50_000), None)
            .await
            .unwrap();
        let err = loop {
            match p.next_event().await {
                Ok(Event::Exited(_)) => panic!("cap not enforced"),
                Ok(Event::Line(_)) => {}
                Err(e) => break e,
            }
        };
        assert!(matches!(err, ProcError::OutputTooLarge));
        p.terminate().await;
    }
}

#[cfg(test)]
mod reconcile_tests {
    use super::*;

    #[tokio::test]
    async fn reconcile_kills_a_forgotten_group() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.db")).unwrap();
        let spec = Spec {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), "sleep 1000 & sleep 1000".into()],
            cwd: dir.path().to_path_buf(),
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            max_output: 1000,
            owns_dir: None,
            audit_id: None,
        };
        let p = Proc::spawn(spec, Some(&db)).await.unwrap();
        let pgid = p.pgid;
        // Both sleeps running (the group's leader is sh, which execs the last one).
        let members = || {
            std::fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter(|e| {
                    let pid: i32 = e.file_name().to_string_lossy().parse().unwrap_or(-1);
                    stat_fields(pid).and_then(|f| f.get(2).cloned()) == Some(pgid.to_string())
                })
                .count()
        };
        while members() < 2 {
            tokio::task::yield_now().await;
        }
        // A crash: nothing of the Proc runs its cleanup.
        std::mem::forget(p);
        let (killed, _) = reconcile(&db).await.unwrap();
        assert!(killed >= 2, "killed {killed} in group {pgid}");
    }
}
