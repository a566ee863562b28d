//! Test harness: a real server on 127.0.0.1:0 in this process (through the same
//! `App::start` + `serve` that `main` uses), an HTTP client, and helpers to look at what the
//! server left behind (database rows, files, processes).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clawdforge::{App, AppState, Config};
use reqwest::{Method, RequestBuilder, Response};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const ADMIN: &str = "test-admin-bootstrap-secret-0123456789";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn stub(name: &str) -> PathBuf {
    repo_root().join("tests/stubs").join(name)
}

/// The pinned real CLIs, installed by `scripts/install-agents.sh`.
pub fn real_bin(name: &str) -> PathBuf {
    let prefix = std::env::var_os("CLAWDFORGE_AGENTS_PREFIX")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".agents"));
    prefix.join("node_modules/.bin").join(name)
}

/// The warm pool size tests run with: `CLAWDFORGE_TEST_WARM_POOL` (scripts/test.sh runs the
/// suite with the pool off and on), default off.
pub fn test_warm_pool() -> u32 {
    std::env::var("CLAWDFORGE_TEST_WARM_POOL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Whether a run's working dir (as the stub recorded it) is gone.
pub fn dir_gone(record: &serde_json::Value) -> bool {
    !Path::new(record["cwd"].as_str().expect("record has a cwd")).exists()
}

pub struct TestServer {
    pub url: String,
    pub addr: std::net::SocketAddr,
    pub client: reqwest::Client,
    pub state: Arc<AppState>,
    /// The data dir (and anything else a test wants to keep beside it).
    pub dir: Arc<TempDir>,
    /// Where the stubs record what they saw (`CLAUDE_STUB_RECORD_DIR`).
    pub record_dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

/// A config for tests: fresh data dir, the stubs as CLIs, the admin API on, no warm pool.
pub fn test_config(dir: &Path) -> Config {
    let mut config = Config::defaults_for(&dir.join("data"));
    config.settings.admin_bootstrap_token = Some(ADMIN.to_string());
    config.settings.claude_bin = stub("claude");
    config.settings.acpx_bin = stub("acpx");
    config.settings.listen = "127.0.0.1:0".parse().unwrap();
    config.settings.allow_cidrs = Vec::new();
    config.settings.trusted_proxies = Vec::new();
    config.settings.warm_pool = test_warm_pool();
    let record = dir.join("records");
    std::fs::create_dir_all(&record).unwrap();
    let home = dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    config.child_env_overrides = vec![
        (
            "CLAUDE_STUB_RECORD_DIR".into(),
            record.display().to_string(),
        ),
        ("HOME".into(), home.display().to_string()),
    ];
    config
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestServer {
        let dir = Arc::new(
            tempfile::Builder::new()
                .prefix("cf-test-")
                .tempdir()
                .unwrap(),
        );
        Self::start_in(dir, tweak).await
    }

    /// Starts a server on an existing dir (for restart tests).
    pub async fn start_in(dir: Arc<TempDir>, tweak: impl FnOnce(&mut Config)) -> TestServer {
        let mut config = test_config(dir.path());
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind(config.settings.listen)
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let app = App::start(config).await.unwrap();
        let state = app.state();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(app.serve(listener, async move {
            let _ = rx.await;
        }));
        TestServer {
            url: format!("http://{addr}"),
            addr,
            client: reqwest::Client::new(),
            state,
            record_dir: dir.path().join("records"),
            dir,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Graceful stop, as on SIGTERM; returns the data dir for a restart.
    pub async fn stop(mut self) -> Arc<TempDir> {
        self.shutdown().await;
        self.dir.clone()
    }

    async fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn req(&self, method: Method, path: &str) -> RequestBuilder {
        self.client.request(method, format!("{}{}", self.url, path))
    }

    pub fn admin(&self, method: Method, path: &str) -> RequestBuilder {
        self.req(method, path).bearer_auth(ADMIN)
    }

    pub fn app(&self, token: &str, method: Method, path: &str) -> RequestBuilder {
        self.req(method, path).bearer_auth(token)
    }

    /// `POST path` with a JSON body as an app: status and body.
    pub async fn post_json(&self, token: &str, path: &str, b: &Value) -> (u16, Value) {
        body(
            self.app(token, Method::POST, path)
                .json(b)
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    /// Mints an app token through the admin API: (id, plaintext).
    pub async fn mint(&self, name: &str) -> (String, String) {
        self.mint_with(json!({ "name": name })).await
    }

    pub async fn mint_with(&self, body: Value) -> (String, String) {
        let res = self
            .admin(Method::POST, "/admin/tokens")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201);
        let v: Value = res.json().await.unwrap();
        (
            v["id"].as_str().unwrap().to_string(),
            v["token"].as_str().unwrap().to_string(),
        )
    }

    /// A read-only look at the database.
    pub fn db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open_with_flags(
            self.data_dir().join("clawdforge.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap()
    }

    pub fn audit_rows(&self, kind: &str) -> Vec<Value> {
        let db = self.db();
        let mut stmt = db
            .prepare(
                "SELECT id, token_id, kind, model, prompt, prompt_chars, response_chars, outcome,
                        exit_code, input_tokens, output_tokens, cost_usd, subject, detail
                 FROM audit WHERE kind = ?1 ORDER BY id",
            )
            .unwrap();
        stmt.query_map([kind], |r| {
            Ok(json!({
                "id": r.get::<_, i64>(0)?, "token_id": r.get::<_, Option<String>>(1)?,
                "kind": r.get::<_, String>(2)?, "model": r.get::<_, Option<String>>(3)?,
                "prompt": r.get::<_, Option<String>>(4)?, "prompt_chars": r.get::<_, Option<i64>>(5)?,
                "response_chars": r.get::<_, Option<i64>>(6)?, "outcome": r.get::<_, String>(7)?,
                "exit_code": r.get::<_, Option<i64>>(8)?, "input_tokens": r.get::<_, Option<i64>>(9)?,
                "output_tokens": r.get::<_, Option<i64>>(10)?, "cost_usd": r.get::<_, Option<f64>>(11)?,
                "subject": r.get::<_, Option<String>>(12)?, "detail": r.get::<_, Option<String>>(13)?,
            }))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Status and JSON body, asserting the envelope's `ok` agrees with the status.
pub async fn body(res: Response) -> (u16, Value) {
    let status = res.status().as_u16();
    let text = res.text().await.unwrap();
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("status {status}: body is not JSON: {text:?}"));
    assert_eq!(
        v["ok"],
        json!(status < 400),
        "envelope ok vs status {status}: {v}"
    );
    if status >= 400 {
        assert!(
            v["code"].is_string() && v["error"].is_string(),
            "error envelope: {v}"
        );
    }
    (status, v)
}

/// Every process whose command line mentions `needle` (from /proc).
#[allow(dead_code)] // for tests of processes started outside a run dir (acpx queue owners)
pub fn processes_matching(needle: &str) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    let me = std::process::id() as i32;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        // Zombies have an empty cmdline; they hold no resources beyond a pid, but a test
        // that leaks them should still see them, so read the state too.
        if cmd.contains(needle) {
            out.push((pid, cmd));
        }
    }
    out
}

/// Whether a pid is alive (and not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

/// Waits (bounded) until `cond` holds, polling: for state the server settles asynchronously
/// after it has answered (a killed process group disappearing). Panics with `what`.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}
