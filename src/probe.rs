//! Cached CLI probes behind `/healthz` and `/metrics`: `claude --version`, `acpx --version`
//! and `claude auth status`, run once before the server listens and then on a background
//! timer, never per request.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::process::child_env;

/// How long one probe may take before it counts as "not present".
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProbeSnapshot {
    pub claude_version: Option<String>,
    pub acpx_version: Option<String>,
    /// From `claude auth status`; `None` when the probe could not tell.
    pub claude_logged_in: Option<bool>,
}

/// The latest snapshot, watchable: the warm pool restarts its processes when it changes.
#[derive(Clone, Debug)]
pub struct Probes(Arc<tokio::sync::watch::Sender<ProbeSnapshot>>);

impl Default for Probes {
    fn default() -> Self {
        Probes(Arc::new(tokio::sync::watch::Sender::new(
            ProbeSnapshot::default(),
        )))
    }
}

impl Probes {
    pub fn snapshot(&self) -> ProbeSnapshot {
        self.0.borrow().clone()
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<ProbeSnapshot> {
        self.0.subscribe()
    }

    /// Probes both CLIs and claude's login (concurrently) and stores the result.
    pub async fn refresh(&self, config: &Config) -> ProbeSnapshot {
        let (claude, acpx, logged_in) = tokio::join!(
            version_of(config, &config.settings.claude_bin),
            version_of(config, &config.settings.acpx_bin),
            logged_in(config, &config.settings.claude_bin)
        );
        let snap = ProbeSnapshot {
            claude_version: claude,
            acpx_version: acpx,
            claude_logged_in: logged_in,
        };
        // Only a real change notifies watchers (the warm pool restarts on a change).
        self.0.send_if_modified(|s| {
            if *s == snap {
                return false;
            }
            tracing::info!(claude = ?snap.claude_version, acpx = ?snap.acpx_version,
                           claude_logged_in = ?snap.claude_logged_in, "CLI probe");
            *s = snap.clone();
            true
        });
        snap
    }

    /// Refreshes every `CLAWDFORGE_PROBE_INTERVAL_SECS` until `stop`.
    pub fn spawn_refresher(&self, config: Arc<Config>, stop: CancellationToken) {
        let probes = self.clone();
        let every = Duration::from_secs(config.settings.probe_interval_secs);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(every) => { probes.refresh(&config).await; }
                }
            }
        });
    }
}

/// Why a probe produced no output.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("could not run it: {0}")]
    Spawn(#[from] std::io::Error),
    #[error("no answer within {} s", PROBE_TIMEOUT.as_secs())]
    TimedOut,
}

/// Runs `PROGRAM ARGS...` the way agents are run (the child env allowlist, no stdin) and
/// collects its output, giving up after `PROBE_TIMEOUT` (the child is killed then).
pub async fn output_of(
    config: &Config,
    program: &std::path::Path,
    args: &[&str],
) -> Result<std::process::Output, ProbeError> {
    let mut cmd = crate::process::dying_with_server(program);
    cmd.args(args)
        .env_clear()
        .envs(child_env(config))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(PROBE_TIMEOUT, cmd.output())
        .await
        .map_err(|_| ProbeError::TimedOut)?
        .map_err(ProbeError::Spawn)
}

/// `claude auth status` prints `{"loggedIn":bool,...}` (exiting 1 when logged out, so the
/// exit status is not the answer); `None` when it printed no such object.
pub async fn logged_in(config: &Config, claude: &std::path::Path) -> Option<bool> {
    let out = output_of(config, claude, &["auth", "status"]).await.ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v.get("loggedIn")?.as_bool()
}

/// `PROGRAM --version`, first line, trimmed; `None` when missing, failing or slow.
pub async fn version_of(config: &Config, program: &std::path::Path) -> Option<String> {
    let out = output_of(config, program, &["--version"]).await.ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .next()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
}
