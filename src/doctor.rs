//! `clawdforge doctor`: is this appliance ready to serve? Checks the CLIs and their
//! versions, the login, the ACP adapter acpx needs, the data directories, the database and
//! free disk, and names the fix to try for each problem.
//!
//! It needs neither a server nor a database (a missing one is "will be created"), and it
//! changes nothing: the only writes are a temp file in each directory, removed at once.
//! The CLIs are probed the way the server runs them (the child env allowlist, a timeout),
//! so a CLI that works from the operator's shell but not for the server shows up here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::config::Config;
use crate::probe::{output_of, version_of};

/// Below this much free space on the data dir's filesystem: a warning.
const LOW_DISK_BYTES: u64 = 1 << 30;
/// The longest `PRAGMA integrity_check` may run (it reads every page of the database).
const DB_CHECK_TIMEOUT: Duration = Duration::from_secs(60);
/// What the fix for a missing CLI says first.
const INSTALL_FIX: &str =
    "install the pinned CLIs with scripts/install-agents.sh (the image has them)";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Works now, but needs attention soon; does not fail the run.
    Warn,
    Fail,
    /// Not checked, because a check it depends on failed.
    Skip,
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    fn skip(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Skip,
            detail: detail.into(),
            fix: None,
        }
    }

    fn problem(
        name: &'static str,
        status: Status,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check {
            name,
            status,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub ok: bool,
    pub checks: Vec<Check>,
}

impl Report {
    fn new(checks: Vec<Check>) -> Report {
        let ok = !checks.iter().any(|c| c.status == Status::Fail);
        Report { ok, checks }
    }

    fn count(&self, status: Status) -> usize {
        self.checks.iter().filter(|c| c.status == status).count()
    }

    /// The table for people: one line per check, the fix indented under a problem.
    pub fn table(&self) -> String {
        let mut out = String::new();
        for c in &self.checks {
            let status = match c.status {
                Status::Ok => "ok",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
                Status::Skip => "skip",
            };
            out.push_str(&format!("{status:<5} {:<14} {}\n", c.name, c.detail));
            if let Some(fix) = &c.fix {
                out.push_str(&format!("{:<5} {:<14} fix: {fix}\n", "", ""));
            }
        }
        let (fails, warns) = (self.count(Status::Fail), self.count(Status::Warn));
        out.push_str(&match (fails, warns) {
            (0, 0) => "\nready: every check passed\n".to_string(),
            (0, w) => format!("\nready, with {w} warning(s)\n"),
            (f, _) => {
                format!("\nnot ready: {f} problem(s); try the fixes above and run doctor again\n")
            }
        });
        out
    }
}

/// Runs every check and prints the table (or JSON). An error means something is wrong.
pub async fn run(config: &Config, json: bool) -> anyhow::Result<()> {
    let report = diagnose(config).await;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    if !report.ok {
        anyhow::bail!("doctor found {} problem(s)", report.count(Status::Fail));
    }
    Ok(())
}

pub async fn diagnose(config: &Config) -> Report {
    let s = &config.settings;
    let env = crate::process::child_env(config);
    let var = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let search_path = var("PATH").unwrap_or_default();
    let (claude_version, auth, acpx_version) = tokio::join!(
        version_of(config, &s.claude_bin),
        output_of(config, &s.claude_bin, &["auth", "status"]),
        version_of(config, &s.acpx_bin),
    );
    let claude = cli_check(
        "claude",
        "CLAUDE_BIN",
        &s.claude_bin,
        &search_path,
        &claude_version,
    );
    let login = match &claude_version {
        Some(_) => login_check(auth),
        None => Check::skip("login", "not checked: claude does not run"),
    };
    let acpx = cli_check("acpx", "ACPX_BIN", &s.acpx_bin, &search_path, &acpx_version);
    let adapter = adapter_check(config, &search_path);
    let mut checks = vec![claude, login, acpx, adapter];
    checks.extend([
        dir_check("data dir", "CLAWDFORGE_DATA_DIR", &s.data_dir, "the server"),
        dir_check("runs dir", "RUNS_DIR", &config.runs_dir, "the server"),
        dir_check(
            "sessions dir",
            "ACPX_SESSIONS_CWD",
            &config.sessions_dir,
            "the server",
        ),
        dir_check(
            "uploads dir",
            "CLAWDFORGE_DATA_DIR",
            &config.uploads_dir,
            "the server",
        ),
    ]);
    // The agents keep their own state under HOME: the login and transcripts (Claude Code),
    // session records and queue locks (acpx). On a read-only root fs these must be volumes.
    let home = var("HOME").map(PathBuf::from);
    let claude_config = var("CLAUDE_CONFIG_DIR")
        .map(PathBuf::from)
        .or_else(|| home.as_ref().map(|h| h.join(".claude")));
    checks.push(match claude_config {
        Some(dir) => dir_check("claude config", "CLAUDE_CONFIG_DIR", &dir, "claude"),
        None => Check::skip("claude config", "HOME is not set"),
    });
    checks.push(match &home {
        Some(home) => dir_check("acpx state", "HOME", &home.join(".acpx"), "acpx"),
        None => Check::skip("acpx state", "HOME is not set"),
    });
    checks.push(database_check(&config.db_path).await);
    checks.push(disk_check(&s.data_dir, s.max_upload_bytes));
    Report::new(checks)
}

/// Where `program` resolves: as given when it names a path, else the first executable
/// file of that name on `search_path`.
fn resolve(program: &Path, search_path: &str) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return is_executable(program).then(|| program.to_path_buf());
    }
    std::env::split_paths(search_path)
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
}

/// Where `scripts/install-agents.sh` puts the CLIs in a clone (`./.agents`), as an absolute
/// path, when `program` is a bare name found there.
fn installed_here(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return None;
    }
    let local = std::env::current_dir()
        .ok()?
        .join(".agents/node_modules/.bin")
        .join(program);
    is_executable(&local).then_some(local)
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn cli_check(
    name: &'static str,
    setting: &str,
    program: &Path,
    search_path: &str,
    version: &Option<String>,
) -> Check {
    let found = resolve(program, search_path);
    match (version, &found) {
        (Some(v), Some(at)) => Check::ok(name, format!("{v} ({})", at.display())),
        (Some(v), None) => Check::ok(name, v.clone()),
        (None, Some(at)) => Check::problem(
            name,
            Status::Fail,
            format!("{} is there but `--version` failed", at.display()),
            format!(
                "run `{} --version` by hand to see why; {INSTALL_FIX}",
                at.display()
            ),
        ),
        (None, None) => match installed_here(program) {
            // scripts/install-agents.sh put it in the clone, but this process's PATH (which
            // the agents inherit) does not lead there.
            Some(local) => Check::problem(
                name,
                Status::Fail,
                format!(
                    "{} not found on the agents' PATH, but {} exists",
                    program.display(),
                    local.display()
                ),
                format!(
                    "run `scripts/serve.sh doctor` (it puts {} first on PATH), or add that dir \
                     to PATH, or set {setting}={}",
                    local.parent().unwrap_or(&local).display(),
                    local.display()
                ),
            ),
            None => Check::problem(
                name,
                Status::Fail,
                format!("{} not found on the agents' PATH", program.display()),
                format!("{INSTALL_FIX}, or set {setting} to the program"),
            ),
        },
    }
}

const LOGIN_FIX: &str = "log in once: `docker compose exec clawdforge claude /login` (outside \
     Docker: `claude /login` as the server's user, with the same CLAUDE_CONFIG_DIR), or set \
     ANTHROPIC_API_KEY in .env";

/// `claude auth status` prints `{"loggedIn": bool, "authMethod": ...}` (exit 1 when logged
/// out); only `loggedIn` decides.
fn login_check(auth: Result<std::process::Output, crate::probe::ProbeError>) -> Check {
    let out = match auth {
        Ok(out) => out,
        Err(e) => {
            return Check::problem(
                "login",
                Status::Fail,
                format!("`claude auth status`: {e}"),
                LOGIN_FIX,
            )
        }
    };
    let parsed: Option<serde_json::Value> = serde_json::from_slice(&out.stdout).ok();
    let method = parsed
        .as_ref()
        .and_then(|v| v["authMethod"].as_str())
        .unwrap_or("unknown")
        .to_string();
    match parsed.as_ref().and_then(|v| v["loggedIn"].as_bool()) {
        Some(true) => Check::ok("login", format!("logged in (auth method: {method})")),
        Some(false) => Check::problem(
            "login",
            Status::Fail,
            format!("not logged in (auth method: {method})"),
            LOGIN_FIX,
        ),
        None => Check::problem(
            "login",
            Status::Fail,
            format!(
                "`claude auth status` answered something else (exit {}): {}",
                out.status.code().unwrap_or(-1),
                first_line(&out.stdout, &out.stderr)
            ),
            LOGIN_FIX,
        ),
    }
}

fn first_line(stdout: &[u8], stderr: &[u8]) -> String {
    let text = [stdout, stderr]
        .iter()
        .map(|b| String::from_utf8_lossy(b).trim().to_string())
        .find(|t| !t.is_empty())
        .unwrap_or_else(|| "(nothing)".to_string());
    text.lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(200)
        .collect()
}

const ADAPTER: &str = "claude-agent-acp";

/// acpx starts the `claude` agent through the ACP adapter. It looks for `claude-agent-acp`
/// on PATH, then for the adapter's package in its own node_modules tree; failing both it
/// runs `npx`, which downloads the adapter on every cold start and fails without network.
fn adapter_check(config: &Config, search_path: &str) -> Check {
    let name = "acp adapter";
    if !config.settings.agents.iter().any(|a| a == "claude") {
        return Check::skip(
            name,
            "not needed: CLAWDFORGE_AGENTS does not include claude",
        );
    }
    let acpx = resolve(&config.settings.acpx_bin, search_path);
    match find_adapter(acpx.as_deref(), search_path) {
        Some(at) => Check::ok(name, at.display().to_string()),
        None => Check::problem(
            name,
            Status::Fail,
            format!("{ADAPTER} is neither beside acpx nor on the agents' PATH; acpx would fall back to `npx`, which needs the network"),
            format!("{INSTALL_FIX}: it installs {ADAPTER} beside acpx"),
        ),
    }
}

fn find_adapter(acpx: Option<&Path>, search_path: &str) -> Option<PathBuf> {
    if let Some(on_path) = resolve(Path::new(ADAPTER), search_path) {
        return Some(on_path);
    }
    let acpx = acpx?;
    let beside = acpx.parent().map(|d| d.join(ADAPTER));
    if let Some(beside) = beside.filter(|p| is_executable(p)) {
        return Some(beside);
    }
    // acpx's own lookup: `node_modules/<package>` in any ancestor of its real location.
    let real = std::fs::canonicalize(acpx).ok()?;
    real.ancestors()
        .map(|d| d.join("node_modules/@agentclientprotocol/claude-agent-acp"))
        .find(|pkg| pkg.join("package.json").is_file())
}

/// The first ancestor of `path` (itself included) that exists.
fn nearest_existing(path: &Path) -> Option<&Path> {
    path.ancestors()
        .find(|p| !p.as_os_str().is_empty() && p.exists())
        .or_else(|| path.is_relative().then_some(Path::new(".")))
}

/// A directory the server (or an agent) writes: it is writable if a temp file can be made
/// in it; one that does not exist yet is fine if `creator` will be able to create it.
fn dir_check(name: &'static str, setting: &str, dir: &Path, creator: &str) -> Check {
    let uid = nix::unistd::geteuid();
    let fix = format!(
        "make {} writable by uid {uid}, the user the server runs as (e.g. `chown -R {uid} {}`), or point {setting} elsewhere",
        dir.display(),
        dir.display()
    );
    if dir.is_dir() {
        return match tempfile::Builder::new()
            .prefix(".clawdforge-doctor-")
            .tempfile_in(dir)
        {
            Ok(_) => Check::ok(name, format!("{} is writable", dir.display())),
            Err(e) => Check::problem(
                name,
                Status::Fail,
                format!("cannot write in {}: {e}", dir.display()),
                fix,
            ),
        };
    }
    if dir.exists() {
        return Check::problem(
            name,
            Status::Fail,
            format!("{} exists but is not a directory", dir.display()),
            format!("move that file away, or point {setting} elsewhere"),
        );
    }
    let Some(parent) = nearest_existing(dir) else {
        return Check::problem(
            name,
            Status::Fail,
            format!("{} cannot be created", dir.display()),
            fix,
        );
    };
    let can_create = parent.is_dir()
        && nix::unistd::access(
            parent,
            nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
        )
        .is_ok();
    if can_create {
        Check::ok(
            name,
            format!("{} does not exist yet; {creator} creates it", dir.display()),
        )
    } else {
        Check::problem(
            name,
            Status::Fail,
            format!(
                "{} does not exist and cannot be created: {} is not writable",
                dir.display(),
                parent.display()
            ),
            fix,
        )
    }
}

pub const DB_FIX: &str = "stop the server and restore the latest copy made by `clawdforge backup` \
     (README, \"Back up and restore\")";

/// `PRAGMA integrity_check` on a read-only connection, so a running server is not
/// disturbed and a broken file is not made worse. Interrupted if it runs too long.
async fn database_check(db_path: &Path) -> Check {
    let name = "database";
    if !db_path.exists() {
        return Check::ok(
            name,
            format!(
                "{} does not exist yet; the server creates it at start",
                db_path.display()
            ),
        );
    }
    let conn = match rusqlite::Connection::open_with_flags(
        db_path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    ) {
        Ok(conn) => conn,
        Err(e) => {
            return Check::problem(
                name,
                Status::Fail,
                format!("cannot open {}: {e}", db_path.display()),
                DB_FIX,
            )
        }
    };
    let interrupt = conn.get_interrupt_handle();
    let checking = tokio::task::spawn_blocking(move || integrity(&conn));
    let outcome = match tokio::time::timeout(DB_CHECK_TIMEOUT, checking).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(e)) => Err(format!("the check did not finish: {e}")),
        Err(_) => {
            interrupt.interrupt();
            Err(format!(
                "the check took longer than {} s",
                DB_CHECK_TIMEOUT.as_secs()
            ))
        }
    };
    match outcome {
        Ok((problems, version)) if problems.is_empty() => Check::ok(
            name,
            format!(
                "{}: integrity ok, schema version {version}",
                db_path.display()
            ),
        ),
        Ok((problems, _)) => Check::problem(
            name,
            Status::Fail,
            format!(
                "{} fails its integrity check: {}",
                db_path.display(),
                problems.join("; ")
            ),
            DB_FIX,
        ),
        Err(e) => Check::problem(
            name,
            Status::Fail,
            format!("{}: {e}", db_path.display()),
            DB_FIX,
        ),
    }
}

/// The integrity check's complaints (none when it says "ok") and the schema version.
fn integrity(conn: &rusqlite::Connection) -> Result<(Vec<String>, i64), String> {
    let run = || -> rusqlite::Result<(Vec<String>, i64)> {
        conn.busy_timeout(Duration::from_secs(5))?;
        let mut stmt = conn.prepare("PRAGMA integrity_check(20)")?;
        let rows: Vec<String> = stmt
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let version = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let problems = rows.into_iter().filter(|r| r != "ok").collect();
        Ok((problems, version))
    };
    run().map_err(|e| e.to_string())
}

/// Free space for the server (`f_bavail`, what an unprivileged user may still use) on the
/// filesystem holding the data dir.
fn disk_check(data_dir: &Path, max_upload_bytes: u64) -> Check {
    let name = "disk";
    let Some(on) = nearest_existing(data_dir) else {
        return Check::skip(name, format!("{} not found", data_dir.display()));
    };
    match nix::sys::statvfs::statvfs(on) {
        Ok(st) => {
            let free = st.blocks_available().saturating_mul(st.fragment_size());
            let total = st.blocks().saturating_mul(st.fragment_size());
            classify_disk(on, free, total, max_upload_bytes)
        }
        Err(e) => Check::skip(
            name,
            format!("cannot stat the filesystem of {}: {e}", on.display()),
        ),
    }
}

/// Fails when one upload of the allowed size would no longer fit; warns under a GiB.
fn classify_disk(on: &Path, free: u64, total: u64, max_upload_bytes: u64) -> Check {
    let detail = format!(
        "{} free of {} on the filesystem of {}",
        human_bytes(free),
        human_bytes(total),
        on.display()
    );
    let fix = "free space on the volume that holds the data dir: uploads expire and run dirs \
               are swept by themselves, old backups and logs do not";
    if free < max_upload_bytes {
        Check::problem(
            "disk",
            Status::Fail,
            format!("{detail}: less than one upload (CLAWDFORGE_MAX_UPLOAD_BYTES)"),
            fix,
        )
    } else if free < LOW_DISK_BYTES {
        Check::problem("disk", Status::Warn, format!("{detail}: low"), fix)
    } else {
        Check::ok("disk", detail)
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_thresholds() {
        let at = Path::new("/data");
        let gib = 1u64 << 30;
        assert_eq!(
            classify_disk(at, 20 * gib, 40 * gib, 100 << 20).status,
            Status::Ok
        );
        let low = classify_disk(at, 500 << 20, 40 * gib, 100 << 20);
        assert_eq!(low.status, Status::Warn);
        assert!(
            low.detail.contains("500.0 MiB free of 40.0 GiB"),
            "{}",
            low.detail
        );
        assert_eq!(
            classify_disk(at, 50 << 20, 40 * gib, 100 << 20).status,
            Status::Fail
        );
    }

    #[test]
    fn a_warning_does_not_fail_the_report() {
        let report = Report::new(vec![
            Check::ok("a", "fine"),
            Check::problem("b", Status::Warn, "low", "clean up"),
            Check::skip("c", "not needed"),
        ]);
        assert!(report.ok);
        let table = report.table();
        assert!(table.contains("WARN  b"), "{table}");
        assert!(table.contains("fix: clean up"), "{table}");
        assert!(table.contains("ready, with 1 warning(s)"), "{table}");
    }

    #[test]
    fn resolve_finds_programs_on_the_given_path_only() {
        let dir = tempfile::tempdir().unwrap();
        let prog = dir.path().join("tool");
        std::fs::write(&prog, "#!/bin/sh\n").unwrap();
        let search = dir.path().display().to_string();
        assert_eq!(resolve(Path::new("tool"), &search), None, "not executable");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(resolve(Path::new("tool"), &search), Some(prog.clone()));
        assert_eq!(resolve(Path::new("tool"), "/nonexistent"), None);
        assert_eq!(resolve(&prog, ""), Some(prog));
    }

    #[test]
    fn the_adapter_is_found_in_acpx_node_modules_tree() {
        // The layout npm leaves: prefix/node_modules/{acpx/dist/cli.js, .bin/acpx -> ..., @agentclientprotocol/claude-agent-acp}
        let dir = tempfile::tempdir().unwrap();
        let nm = dir.path().join("node_modules");
        std::fs::create_dir_all(nm.join("acpx/dist")).unwrap();
        std::fs::write(nm.join("acpx/dist/cli.js"), "").unwrap();
        let pkg = nm.join("@agentclientprotocol/claude-agent-acp");
        std::fs::create_dir_all(&pkg).unwrap();
        std::fs::write(pkg.join("package.json"), "{}").unwrap();
        std::fs::create_dir_all(dir.path().join("bin")).unwrap();
        let link = dir.path().join("bin/acpx");
        std::os::unix::fs::symlink(nm.join("acpx/dist/cli.js"), &link).unwrap();
        assert_eq!(find_adapter(Some(&link), ""), Some(pkg));
        std::fs::remove_file(nm.join("@agentclientprotocol/claude-agent-acp/package.json"))
            .unwrap();
        assert_eq!(find_adapter(Some(&link), ""), None);
    }

    #[test]
    fn a_missing_dir_is_fine_when_its_parent_is_writable() {
        let dir = tempfile::tempdir().unwrap();
        let c = dir_check(
            "runs dir",
            "RUNS_DIR",
            &dir.path().join("a/b"),
            "the server",
        );
        assert_eq!(c.status, Status::Ok, "{}", c.detail);
        assert!(c.detail.contains("does not exist yet"));
    }

    #[test]
    fn human_bytes_reads_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
