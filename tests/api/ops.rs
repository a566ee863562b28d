//! Operator commands, run as the real binary: `clawdforge doctor` (healthy with the stub
//! CLIs; failing with an exit status and a fix when the login, acpx, its adapter, a
//! directory or the database is wrong), `clawdforge backup` (a consistent copy taken while
//! the server writes, which a new server then runs on), and `scripts/smoke.sh` against a
//! live server.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use reqwest::Method;
use serde_json::{json, Value};
use tempfile::TempDir;

use crate::harness::bin;
use crate::harness::{body, repo_root, stub, TestServer, ADMIN};

/// A directory holding `bin/` with the stub CLIs the way an npm prefix holds the real
/// ones: `claude`, `acpx` and (unless left out) the ACP adapter beside acpx.
fn agents_dir(with_adapter: bool) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    let bin_dir = dir.path().join("bin");
    std::fs::create_dir(&bin_dir).unwrap();
    std::os::unix::fs::symlink(stub("claude"), bin_dir.join("claude")).unwrap();
    std::os::unix::fs::symlink(stub("acpx"), bin_dir.join("acpx")).unwrap();
    if with_adapter {
        let adapter = bin_dir.join("claude-agent-acp");
        std::fs::write(&adapter, "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(&adapter, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir
}

/// `clawdforge doctor` with the CLIs found on PATH in `agents/bin`, as in the image.
fn doctor_cmd(agents: &Path, data: &Path) -> Command {
    let mut cmd = bin();
    cmd.env(
        "PATH",
        format!("{}:/usr/bin:/bin", agents.join("bin").display()),
    )
    .env("CLAWDFORGE_DATA_DIR", data)
    .env("HOME", agents.join("home"));
    cmd
}

/// Exit status and the `--json` report.
fn doctor_json(cmd: &mut Command) -> (i32, Value) {
    let out = cmd.args(["doctor", "--json"]).output().unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor --json printed no JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), report)
}

fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name}: {report}"))
}

const CHECKS: &[&str] = &[
    "claude",
    "login",
    "acpx",
    "acp adapter",
    "data dir",
    "runs dir",
    "sessions dir",
    "uploads dir",
    "claude config",
    "acpx state",
    "database",
    "disk",
];

#[tokio::test]
async fn doctor_passes_with_the_stub_clis_with_and_without_a_server() {
    let agents = agents_dir(true);
    let data = agents.path().join("data");

    // A fresh machine: no database, no server, not even the data dir.
    let (code, report) = doctor_json(&mut doctor_cmd(agents.path(), &data));
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["ok"], true);
    let names: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, CHECKS);
    for c in report["checks"].as_array().unwrap() {
        assert_eq!(c["status"], "ok", "{c}");
        assert!(c["detail"].as_str().unwrap().len() > 3, "{c}");
        assert!(c.get("fix").is_none(), "{c}");
    }
    assert_eq!(
        check(&report, "claude")["detail"],
        format!(
            "2.1.197 (Claude Code) ({})",
            agents.path().join("bin/claude").display()
        )
    );
    assert!(check(&report, "database")["detail"]
        .as_str()
        .unwrap()
        .contains("does not exist yet"));
    assert!(!data.exists(), "doctor created {}", data.display());

    // A running server, writing: the database is checked beside it.
    let s = TestServer::start().await;
    s.mint("busy").await;
    let data = s.data_dir();
    let (code, report) = doctor_json(&mut doctor_cmd(agents.path(), &data));
    assert_eq!(code, 0, "{report:#}");
    let db = check(&report, "database")["detail"].as_str().unwrap();
    assert!(db.contains("integrity ok"), "{db}");
    assert_eq!(
        check(&report, "runs dir")["detail"],
        format!("{} is writable", data.join("runs").display())
    );

    // The table for people says the same.
    let out = doctor_cmd(agents.path(), &data)
        .arg("doctor")
        .output()
        .unwrap();
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("ok    login          logged in"), "{table}");
    assert!(
        table.trim_end().ends_with("ready: every check passed"),
        "{table}"
    );
}

/// Asserts a failed doctor run: exit 1, the named check failed, and its fix says `fix`.
fn assert_fails(code: i32, report: &Value, name: &str, fix: &str) {
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["ok"], false);
    let c = check(report, name);
    assert_eq!(c["status"], "fail", "{c}");
    let said = c["fix"].as_str().unwrap_or_default();
    assert!(said.contains(fix), "{name}: fix {said:?} lacks {fix:?}");
}

#[test]
fn doctor_fails_when_logged_out_and_says_how_to_log_in() {
    let agents = agents_dir(true);
    let data = agents.path().join("data");
    // CLAUDE_* variables reach the probed CLI, as they reach agents.
    let (code, report) =
        doctor_json(doctor_cmd(agents.path(), &data).env("CLAUDE_STUB_LOGGED_OUT", "1"));
    assert_fails(code, &report, "login", "claude /login");
    assert!(check(&report, "login")["fix"]
        .as_str()
        .unwrap()
        .contains("ANTHROPIC_API_KEY"));
    assert_eq!(
        check(&report, "login")["detail"],
        "not logged in (auth method: none)"
    );
    // Only the login is wrong.
    let failed: Vec<&Value> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] != "ok")
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");

    // The table shows the fix under the problem, and the exit status is non-zero.
    let out = doctor_cmd(agents.path(), &data)
        .env("CLAUDE_STUB_LOGGED_OUT", "1")
        .arg("doctor")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("FAIL  login"), "{table}");
    assert!(table.contains("fix: log in once"), "{table}");
    assert!(table.contains("not ready: 1 problem(s)"), "{table}");
}

#[test]
fn doctor_fails_without_acpx_or_without_its_adapter() {
    let agents = agents_dir(false);
    let data = agents.path().join("data");
    let (code, report) = doctor_json(&mut doctor_cmd(agents.path(), &data));
    assert_fails(code, &report, "acp adapter", "scripts/install-agents.sh");
    assert!(check(&report, "acp adapter")["detail"]
        .as_str()
        .unwrap()
        .contains("npx"));
    assert_eq!(check(&report, "acpx")["status"], "ok");

    let (code, report) = doctor_json(
        doctor_cmd(agents.path(), &data).env("ACPX_BIN", agents.path().join("missing/acpx")),
    );
    assert_fails(code, &report, "acpx", "ACPX_BIN");
    let (code, report) =
        doctor_json(doctor_cmd(agents.path(), &data).env("CLAUDE_BIN", "no-such-claude"));
    assert_fails(code, &report, "claude", "scripts/install-agents.sh");
    assert_eq!(check(&report, "login")["status"], "skip");
}

#[test]
fn doctor_fails_on_a_dir_it_cannot_write_and_on_a_broken_database() {
    let agents = agents_dir(true);
    let data = agents.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    // Something in the way of the runs dir.
    let runs = agents.path().join("runs");
    std::fs::write(&runs, "not a dir").unwrap();
    std::fs::write(data.join("clawdforge.db"), vec![b'x'; 8192]).unwrap();
    let (code, report) = doctor_json(doctor_cmd(agents.path(), &data).env("RUNS_DIR", &runs));
    assert_fails(code, &report, "runs dir", "RUNS_DIR");
    assert!(check(&report, "runs dir")["detail"]
        .as_str()
        .unwrap()
        .contains("not a directory"));
    assert_fails(code, &report, "database", "clawdforge backup");
}

/// The container's classic: a volume owned by root while the server runs unprivileged.
/// Tests usually run as root, who may write anywhere, so the doctor runs as `nobody` then.
#[test]
fn doctor_fails_on_a_data_dir_owned_by_someone_else() {
    let agents = agents_dir(true);
    let data = agents.path().join("data");
    std::fs::create_dir_all(data.join("runs")).unwrap();
    let open = std::fs::Permissions::from_mode(0o755);
    std::fs::set_permissions(agents.path(), open.clone()).unwrap();
    std::fs::set_permissions(&data, open.clone()).unwrap();
    let as_service_user = |cmd: &mut Command| {
        use std::os::unix::process::CommandExt;
        if nix::unistd::geteuid().is_root() {
            cmd.uid(65534).gid(65534);
        }
    };
    if nix::unistd::geteuid().is_root() {
        let mut probe = bin();
        as_service_user(&mut probe);
        if !probe
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            eprintln!("skipped: `nobody` cannot run the test binary from this build dir");
            return;
        }
    } else {
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o555)).unwrap();
        std::fs::set_permissions(data.join("runs"), std::fs::Permissions::from_mode(0o555))
            .unwrap();
    }
    let mut cmd = doctor_cmd(agents.path(), &data);
    as_service_user(&mut cmd);
    let (code, report) = doctor_json(&mut cmd);
    for name in ["data dir", "runs dir"] {
        assert_fails(code, &report, name, "writable by uid");
        assert!(check(&report, name)["detail"]
            .as_str()
            .unwrap()
            .contains("cannot write"));
    }
    // Missing dirs under it cannot be created either.
    let uploads = check(&report, "uploads dir");
    assert_eq!(uploads["status"], "fail", "{uploads}");
    assert!(uploads["detail"]
        .as_str()
        .unwrap()
        .contains("cannot be created"));
}

fn token_ids(v: &Value) -> Vec<String> {
    v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect()
}

fn run_backup(data: &Path, dest: &Path) -> Output {
    bin()
        .env("CLAWDFORGE_DATA_DIR", data)
        .arg("backup")
        .arg(dest)
        .output()
        .unwrap()
}

#[tokio::test]
async fn backup_while_the_server_writes_is_consistent_and_restores() {
    let s = TestServer::start().await;
    let (_, app_token) = s.mint("before").await;
    // Writers: keep minting tokens through the admin API (each one a write transaction
    // with an audit row) until told to stop, recording each id once its answer is in.
    let minted = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..2 {
        let (url, minted, stop) = (s.url.clone(), minted.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let res = client
                    .post(format!("{url}/admin/tokens"))
                    .bearer_auth(ADMIN)
                    .json(&json!({ "name": format!("writer-{w}-{n}") }))
                    .send()
                    .await
                    .unwrap();
                let (st, v) = body(res).await;
                assert_eq!(st, 201, "{v}");
                minted
                    .lock()
                    .unwrap()
                    .push(v["id"].as_str().unwrap().to_string());
                n += 1;
            }
            n
        }));
    }
    while minted.lock().unwrap().len() < 40 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // Everything minted so far must be in the copy: taken before the backup starts.
    let before: Vec<String> = minted.lock().unwrap().clone();
    let copy_dir = tempfile::tempdir().unwrap();
    let copy = copy_dir.path().join("backup.db");
    let (data, dest) = (s.data_dir(), copy.clone());
    let out = tokio::task::spawn_blocking(move || run_backup(&data, &dest))
        .await
        .unwrap();
    let during = minted.lock().unwrap().len() - before.len();
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for w in writers {
        total += w.await.unwrap();
    }
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("backed up"));
    eprintln!(
        "backup: {} rows before, {during} written during, {total} in all",
        before.len()
    );
    assert!(during > 0, "no writes happened during the backup");

    // The copy: one self-contained, intact file with every row that existed before.
    assert!(!copy_dir.path().join("backup.db-wal").exists());
    let names: Vec<_> = std::fs::read_dir(copy_dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("backup.db")],
        "leftovers"
    );
    {
        let db = rusqlite::Connection::open_with_flags(
            &copy,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let check: String = db
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
        let mode: String = db
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "delete");
        for id in &before {
            let n: i64 = db
                .query_row("SELECT count(*) FROM tokens WHERE id = ?1", [id], |r| {
                    r.get(0)
                })
                .unwrap();
            assert_eq!(n, 1, "{id} minted before the backup is not in it");
        }
    }
    s.stop().await;

    // Restore: a new server on a data dir holding the copy serves the same tokens.
    let restored = Arc::new(tempfile::tempdir().unwrap());
    std::fs::create_dir_all(restored.path().join("data")).unwrap();
    std::fs::copy(&copy, restored.path().join("data/clawdforge.db")).unwrap();
    let r = TestServer::start_in(restored, |_| {}).await;
    let (st, v) = body(r.admin(Method::GET, "/admin/tokens").send().await.unwrap()).await;
    assert_eq!(st, 200);
    let listed = token_ids(&v);
    for id in &before {
        assert!(listed.contains(id), "{id} missing after restore");
    }
    // Secrets came along as hashes: a token minted before the backup still works.
    let res = r
        .app(&app_token, Method::POST, "/run")
        .json(&json!({ "prompt": "still here?" }))
        .send()
        .await
        .unwrap();
    let (st, v) = body(res).await;
    assert_eq!(st, 200, "{v}");
}

#[tokio::test]
async fn backup_refuses_to_overwrite_and_needs_a_database() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_backup(&dir.path().join("nothing"), &dir.path().join("b.db"));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not exist: nothing to back up"), "{err}");

    let s = TestServer::start().await;
    let dest = dir.path().join("taken.db");
    std::fs::write(&dest, "precious").unwrap();
    let out = run_backup(&s.data_dir(), &dest);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to overwrite"));
    assert_eq!(std::fs::read_to_string(&dest).unwrap(), "precious");
    let out = run_backup(&s.data_dir(), &dir.path().join("no/such/dir/b.db"));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot create a file in"));
}

/// `scripts/smoke.sh` with `ADMIN_BOOTSTRAP_TOKEN` and the server's URL, as an operator
/// runs it.
async fn smoke(s: &TestServer, extra: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = tokio::process::Command::new(repo_root().join("scripts/smoke.sh"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("ADMIN_BOOTSTRAP_TOKEN", ADMIN)
        .arg(&s.url)
        .stdin(std::process::Stdio::null());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), cmd.output())
        .await
        .expect("smoke.sh hung")
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// Every token smoke.sh minted is revoked again, whatever happened.
async fn assert_smoke_cleaned_up(s: &TestServer) {
    let (_, v) = body(s.admin(Method::GET, "/admin/tokens").send().await.unwrap()).await;
    let smoke: Vec<&Value> = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["name"].as_str().unwrap().starts_with("smoke-"))
        .collect();
    assert!(!smoke.is_empty());
    for t in smoke {
        assert!(t["revoked_at"].is_string(), "left behind: {t}");
    }
}

#[tokio::test]
async fn smoke_script_passes_against_a_live_server() {
    let s = TestServer::start().await;

    // The parts that exist on every build: healthz, minting, one run, cleanup.
    let (code, out) = smoke(&s, &[("SMOKE_SKIP_SESSIONS", "1")]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("OK    1. healthz: clawdforge 0.1.0"), "{out}");
    assert!(
        out.contains("OK    3. run: result=echo: Reply with"),
        "{out}"
    );
    assert!(
        out.contains("SKIP  sessions (SMOKE_SKIP_SESSIONS=1)"),
        "{out}"
    );
    assert!(out.contains("smoke: all 4 steps passed"), "{out}");
    assert_smoke_cleaned_up(&s).await;

    // The whole script, sessions included. Until the sessions routes exist it must fail
    // exactly there, after the run passed, and still clean up.
    let (code, out) = smoke(&s, &[]).await;
    assert!(out.contains("OK    3. run: "), "{out}");
    let probe = s.req(Method::POST, "/sessions").send().await.unwrap();
    let sessions_exist = !matches!(probe.status().as_u16(), 404 | 405);
    if sessions_exist {
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("smoke: all 7 steps passed"), "{out}");
    } else {
        assert_eq!(code, 1, "{out}");
        assert!(out.contains("FAIL  4. POST /sessions"), "{out}");
    }
    assert_smoke_cleaned_up(&s).await;
}

/// Outside the container, the CLIs `scripts/install-agents.sh` put in the clone's
/// `./.agents` are not on the operator's PATH: doctor says where they are and how to use them.
#[test]
fn doctor_points_at_the_clis_installed_in_the_clone() {
    let clone = tempfile::tempdir().unwrap();
    let bin_dir = clone.path().join(".agents/node_modules/.bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    std::os::unix::fs::symlink(stub("claude"), bin_dir.join("claude")).unwrap();
    std::os::unix::fs::symlink(stub("acpx"), bin_dir.join("acpx")).unwrap();
    let mut cmd = bin();
    cmd.current_dir(clone.path())
        .env("PATH", "/usr/bin:/bin")
        .env("CLAWDFORGE_DATA_DIR", clone.path().join("data"))
        .env("HOME", clone.path().join("home"));
    let (code, report) = doctor_json(&mut cmd);
    assert_ne!(code, 0);
    for name in ["claude", "acpx"] {
        let c = check(&report, name);
        assert_eq!(c["status"], "fail", "{c}");
        let fix = c["fix"].as_str().unwrap();
        assert!(fix.contains("scripts/serve.sh doctor"), "{fix}");
        assert!(
            fix.contains(&bin_dir.join(name).display().to_string()),
            "{fix}"
        );
    }
}
