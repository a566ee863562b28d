//! Cached CLI probes behind `/healthz` and `/metrics`: `claude --version`, `acpx --version`
//! and `claude auth status`, run once before the server listens and then on a background
//! timer, never per request.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::process::Command;
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

#[derive(Clone, Default, Debug)]
pub struct Probes(Arc<RwLock<ProbeSnapshot>>);

impl Probes {
    pub fn snapshot(&self) -> ProbeSnapshot {
        self.0.read().map(|s| s.clone()).unwrap_or_default()
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
        if let Ok(mut s) = self.0.write() {
            if *s != snap {
                tracing::info!(claude = ?snap.claude_version, acpx = ?snap.acpx_version,
                               claude_logged_in = ?snap.claude_logged_in, "CLI probe");
            }
            *s = snap.clone();
        }
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

/// `PROGRAM ARGS...` with the children's environment, bounded in time; `None` when missing,
/// failing to start or slow.
async fn probe(
    config: &Config,
    program: &std::path::Path,
    args: &[&str],
) -> Option<std::process::Output> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(child_env(config))
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(PROBE_TIMEOUT, cmd.output())
        .await
        .ok()?
        .ok()
}

/// `claude auth status` prints `{"loggedIn":bool,...}` (exiting 1 when logged out, so the
/// exit status is not the answer); `None` when it printed no such object.
pub async fn logged_in(config: &Config, claude: &std::path::Path) -> Option<bool> {
    let out = probe(config, claude, &["auth", "status"]).await?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v.get("loggedIn")?.as_bool()
}

/// `PROGRAM --version`, first line, trimmed; `None` when missing, failing or slow.
pub async fn version_of(config: &Config, program: &std::path::Path) -> Option<String> {
    let out = probe(config, program, &["--version"]).await?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .next()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
}
