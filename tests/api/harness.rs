//! Test harness: a real server on 127.0.0.1:0 in this process (through the same
//! `App::start` + `serve` that `main` uses), an HTTP client, and helpers to look at what the
//! server left behind (database rows, files, processes).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clawdforge::{App, AppState, Config};

use crate::fake_upstream::FakeUpstream;
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

/// A program of the tests' Python venv (`.venv-tests`, made by scripts/install-sdk-tests.sh
/// from the pins in tests/sdk/requirements.txt): `python`, or a tool a package installed.
pub fn venv_bin(name: &str) -> PathBuf {
    let p = repo_root().join(".venv-tests/bin").join(name);
    assert!(
        p.exists(),
        "{} missing: run scripts/install-sdk-tests.sh",
        p.display()
    );
    p
}

/// Runs `cmd` to its end; panics with its output unless it exits 0, else answers its stdout.
pub async fn stdout_of(mut cmd: tokio::process::Command) -> String {
    let out = cmd.output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
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
    // Pooled sessions would run acpx in the background of every test; the pool's own
    // tests turn it on.
    config.settings.session_pool = 0;
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

    /// `GET path` without a token, which must answer 200, as JSON.
    pub async fn get_json(&self, path: &str) -> Value {
        let res = self.req(Method::GET, path).send().await.unwrap();
        assert_eq!(res.status(), 200, "GET {path}");
        res.json().await.unwrap()
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

/// The command line of `pid`, its arguments joined by spaces (`None` once it is gone).
pub fn cmdline(pid: i32) -> Option<String> {
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(String::from_utf8_lossy(&cmd).replace('\0', " "))
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
        let Some(cmd) = cmdline(pid) else {
            continue;
        };
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
pub async fn eventually(what: &str, cond: impl FnMut() -> bool) {
    eventually_within(what, std::time::Duration::from_secs(15), cond).await
}

/// [`eventually`] with its own bound, for what the real agents do in the background
/// (starting one takes several seconds on a loaded machine).
pub async fn eventually_within(what: &str, limit: std::time::Duration, cond: impl FnMut() -> bool) {
    eventually_saying(what, limit, cond, String::new).await
}

/// [`eventually_within`] whose timeout also says what `detail` reads then (which
/// processes are left, say), for failures that happen only on a loaded CI machine.
pub async fn eventually_saying(
    what: &str,
    limit: std::time::Duration,
    mut cond: impl FnMut() -> bool,
    detail: impl Fn() -> String,
) {
    let deadline = std::time::Instant::now() + limit;
    while !cond() {
        if std::time::Instant::now() >= deadline {
            panic!("timed out waiting for: {what}{}", detail());
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

// ---- Shared helpers of the test files (one home; no test file imports another's) ----

/// Waits until the (one) run's audit row says `outcome`.
pub async fn run_outcome_becomes(s: &TestServer, outcome: &str) {
    let db = s.db();
    eventually(&format!("audit row {outcome}"), || {
        db.query_row("SELECT outcome FROM audit WHERE kind='run'", [], |r| {
            r.get::<_, String>(0)
        })
        .unwrap()
            == outcome
    })
    .await;
}

/// Every record the stub wrote (one per answered prompt), oldest first.
pub fn records(dir: &Path) -> Vec<Value> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.retain(|p: &std::path::PathBuf| p.extension().is_some_and(|e| e == "json"));
    files.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    files
        .iter()
        .map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap())
        .collect()
}

pub async fn run(s: &TestServer, token: &str, body_json: Value) -> (u16, Value) {
    body(
        s.app(token, Method::POST, "/run")
            .json(&body_json)
            .send()
            .await
            .unwrap(),
    )
    .await
}

/// Pids the stub recorded for its grandchildren.
pub fn grandchildren(dir: &Path) -> Vec<i32> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("grandchild-"))
        .map(|e| {
            std::fs::read_to_string(e.path())
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        })
        .collect()
}

/// Reads an SSE body into (event, data) pairs.
pub async fn sse_events(res: reqwest::Response) -> Vec<(String, Value)> {
    let text = res.text().await.unwrap();
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let mut event = None;
        let mut data = String::new();
        for line in block.lines() {
            if let Some(e) = line
                .strip_prefix("event: ")
                .or_else(|| line.strip_prefix("event:"))
            {
                event = Some(e.trim().to_string());
            } else if let Some(d) = line
                .strip_prefix("data: ")
                .or_else(|| line.strip_prefix("data:"))
            {
                data.push_str(d);
            }
        }
        if let Some(e) = event {
            out.push((e, serde_json::from_str(&data).unwrap_or(Value::Null)));
        }
    }
    out
}

pub fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_clawdforge"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null());
    cmd
}

/// The binary serving on a free port, its stderr collected line by line.
pub struct Served {
    pub child: Child,
    pub url: String,
    pub lines: std::sync::mpsc::Receiver<String>,
    /// What it logged before it listened.
    pub early: Vec<String>,
}

pub fn serve(data: &Path, extra: &[(&str, &str)]) -> Served {
    let mut cmd = bin();
    cmd.env("CLAWDFORGE_DATA_DIR", data)
        .env("CLAWDFORGE_LISTEN", "127.0.0.1:0")
        .env("CLAUDE_BIN", stub("claude"))
        .env("ACPX_BIN", stub("acpx"))
        .env("CLAWDFORGE_WARM_POOL", test_warm_pool().to_string())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The server logs its bound address once it listens.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut early = Vec::new();
    let url = loop {
        let line = match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => line,
            Err(e) => {
                // Not left running behind a failed test.
                let _ = child.kill();
                let _ = child.wait();
                panic!("server did not start: {e}; it logged: {early:?}");
            }
        };
        early.push(line.clone());
        if let Some(i) = line.find("127.0.0.1:") {
            if line.contains("listening") {
                let addr: String = line[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                    .collect();
                break format!("http://{addr}");
            }
        }
    };
    Served {
        child,
        url,
        lines: rx,
        early,
    }
}

impl Served {
    pub fn collect_lines(&self) -> Vec<String> {
        self.early
            .iter()
            .cloned()
            .chain(self.lines.try_iter())
            .collect()
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn create(s: &TestServer, token: &str, b: Value) -> (u16, Value) {
    s.post_json(token, "/sessions", &b).await
}

pub async fn open_session(s: &TestServer, token: &str) -> String {
    let (st, v) = create(s, token, json!({})).await;
    assert_eq!(st, 201, "{v}");
    v["session_id"].as_str().unwrap().to_string()
}

pub async fn turn(s: &TestServer, token: &str, id: &str, b: Value) -> (u16, Value) {
    s.post_json(token, &format!("/sessions/{id}/turn"), &b)
        .await
}

/// A turn sent on its own task, for tests that act while it runs.
pub fn spawn_turn(
    s: &TestServer,
    token: &str,
    id: &str,
    prompt: &str,
) -> tokio::task::JoinHandle<(u16, Value)> {
    let req = s
        .app(token, Method::POST, &format!("/sessions/{id}/turn"))
        .json(&json!({ "prompt": prompt }));
    tokio::spawn(async move { body(req.send().await.unwrap()).await })
}

/// The same against the binary serving at `url`; the server may die under it.
pub fn spawn_served_turn(
    url: &str,
    token: &str,
    id: &str,
    prompt: &str,
) -> tokio::task::JoinHandle<reqwest::Result<reqwest::Response>> {
    let req = served_turn_request(url, token, id, json!({ "prompt": prompt }));
    tokio::spawn(async move { req.send().await })
}

fn served_turn_request(url: &str, token: &str, id: &str, b: Value) -> RequestBuilder {
    reqwest::Client::new()
        .post(format!("{url}/sessions/{id}/turn"))
        .bearer_auth(token)
        .json(&b)
}

/// A turn (`timeout_secs` 60) of session `id` on the binary serving at `url`.
pub async fn served_turn(url: &str, token: &str, id: &str, prompt: &str) -> (u16, Value) {
    let b = json!({ "prompt": prompt, "timeout_secs": 60 });
    body(served_turn_request(url, token, id, b).send().await.unwrap()).await
}

/// Closes session `id` on the binary serving at `url`; the status.
pub async fn served_close(url: &str, token: &str, id: &str) -> u16 {
    let res = reqwest::Client::new()
        .delete(format!("{url}/sessions/{id}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    res.status().as_u16()
}

/// With the binary serving at `url`: a token minted with `admin`, and a session of it.
pub async fn served_session(url: &str, admin: &str) -> (String, String) {
    let client = reqwest::Client::new();
    let res = client
        .post(format!("{url}/admin/tokens"))
        .bearer_auth(admin)
        .json(&json!({"name": "bin"}))
        .send()
        .await
        .unwrap();
    let token = body(res).await.1["token"].as_str().unwrap().to_string();
    let res = client
        .post(format!("{url}/sessions"))
        .bearer_auth(&token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let (st, v) = body(res).await;
    assert_eq!(st, 201, "{v}");
    (token, v["session_id"].as_str().unwrap().to_string())
}

pub async fn call(s: &TestServer, token: &str, method: Method, path: &str) -> (u16, Value) {
    body(s.app(token, method, path).send().await.unwrap()).await
}

/// A server whose children are the real CLIs, talking to `fake`.
pub async fn real_server(
    fake: &FakeUpstream,
    tweak: impl FnOnce(&mut clawdforge::Config),
) -> TestServer {
    let dir = Arc::new(
        tempfile::Builder::new()
            .prefix("cf-real-")
            .tempdir()
            .unwrap(),
    );
    real_server_in(fake, dir, tweak).await
}

/// The same on an existing dir (for restart tests): same data, `HOME` and Claude config.
pub async fn real_server_in(
    fake: &FakeUpstream,
    dir: Arc<tempfile::TempDir>,
    tweak: impl FnOnce(&mut clawdforge::Config),
) -> TestServer {
    let claude = real_bin("claude");
    assert!(
        claude.exists(),
        "{} missing: run scripts/install-agents.sh",
        claude.display()
    );
    let config_dir = dir.path().join("claude-config");
    std::fs::create_dir_all(&config_dir).unwrap();
    let mut env = fake.child_env(&config_dir);
    // acpx looks for claude-agent-acp beside itself and on PATH.
    let bin_dir = claude.parent().unwrap().display().to_string();
    env.push((
        "PATH".into(),
        format!("{bin_dir}:{}", std::env::var("PATH").unwrap_or_default()),
    ));
    TestServer::start_in(dir, move |c| {
        c.settings.claude_bin = claude.clone();
        c.settings.acpx_bin = real_bin("acpx");
        c.child_env_overrides.extend(env);
        tweak(c);
    })
    .await
}

pub const BOUNDARY: &str = "cf-test-boundary-7MA4YWxkTrZu0gW";

/// One multipart part: field name, the raw `filename` parameter (written as given between
/// quotes, so tests control every byte), and the content.
pub struct Part<'a> {
    pub name: &'a str,
    pub filename: Option<&'a [u8]>,
    pub data: &'a [u8],
}

pub fn file_part<'a>(filename: &'a str, data: &'a [u8]) -> Part<'a> {
    Part {
        name: "file",
        filename: Some(filename.as_bytes()),
        data,
    }
}

pub fn ttl_part(ttl: &str) -> Part<'_> {
    Part {
        name: "ttl_secs",
        filename: None,
        data: ttl.as_bytes(),
    }
}

pub fn multipart_head(name: &str, filename: Option<&[u8]>) -> Vec<u8> {
    let mut out =
        format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"").into_bytes();
    if let Some(f) = filename {
        out.extend_from_slice(b"; filename=\"");
        out.extend_from_slice(f);
        out.extend_from_slice(b"\"\r\nContent-Type: application/octet-stream");
    }
    out.extend_from_slice(b"\r\n\r\n");
    out
}

pub fn multipart(parts: &[Part<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        out.extend(multipart_head(p.name, p.filename));
        out.extend_from_slice(p.data);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    out
}

/// The head of a `POST /files` for a raw socket.
pub fn upload_head(s: &TestServer, token: &str, content_length: u64) -> String {
    format!(
        "POST /files HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\
         Content-Length: {content_length}\r\n\r\n",
        s.addr
    )
}

/// `req` with a multipart body in our boundary.
pub fn with_multipart(req: reqwest::RequestBuilder, body: Vec<u8>) -> reqwest::RequestBuilder {
    req.header(
        "content-type",
        format!("multipart/form-data; boundary={BOUNDARY}"),
    )
    .body(body)
}

pub async fn post_files(s: &TestServer, token: &str, parts: &[Part<'_>]) -> (u16, Value) {
    send(with_multipart(
        s.app(token, Method::POST, "/files"),
        multipart(parts),
    ))
    .await
}

/// Uploads `data` as `filename`; asserts 201 and returns the file token.
pub async fn upload(s: &TestServer, token: &str, filename: &str, data: &[u8]) -> String {
    let (st, v) = post_files(s, token, &[file_part(filename, data)]).await;
    assert_eq!(st, 201, "{v}");
    v["file_token"].as_str().unwrap().to_string()
}

/// Status and JSON body of a request (see [`body`]).
pub async fn send(req: reqwest::RequestBuilder) -> (u16, Value) {
    body(req.send().await.unwrap()).await
}

/// `POST /run` as `token` with `b`, answered as a stream: the response once its head arrived.
pub async fn stream_run(s: &TestServer, token: &str, b: Value) -> reqwest::Response {
    s.app(token, Method::POST, "/run")
        .json(&b)
        .send()
        .await
        .unwrap()
}

/// PATCHes a token's policy with the admin bearer.
pub async fn patch(s: &TestServer, id: &str, b: Value) -> (u16, Value) {
    body(
        s.admin(Method::PATCH, &format!("/admin/tokens/{id}"))
            .json(&b)
            .send()
            .await
            .unwrap(),
    )
    .await
}

/// A 1×1 PNG, for the image tests.
pub const PNG: &[u8] = b"\x89\x50\x4e\x47\x0d\x0a\x1a\x0a\x00\x00\x00\x0d\x49\x48\x44\x52\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89\x00\x00\x00\x0d\x49\x44\x41\x54\x78\xda\x63\x64\x60\xf8\x5f\x0f\x00\x02\x87\x01\x80\xeb\x47\xba\x92\x00\x00\x00\x00\x49\x45\x4e\x44\xae\x42\x60\x82";

pub fn b64(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// A writable connection to the server's database, for tests that age rows.
pub fn db_rw(s: &TestServer) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(s.data_dir().join("clawdforge.db")).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    c
}

/// `POST path` as an app with an `Idempotency-Key` (raw bytes, so tests can send bad ones).
pub fn keyed(
    s: &TestServer,
    token: &str,
    path: &str,
    key: &[u8],
    b: &Value,
) -> reqwest::RequestBuilder {
    s.app(token, Method::POST, path)
        .header(
            "idempotency-key",
            reqwest::header::HeaderValue::from_bytes(key).unwrap(),
        )
        .json(b)
}

/// Status, the `Idempotent-Replayed` header, and the body as text.
pub async fn keyed_answer(req: reqwest::RequestBuilder) -> (u16, bool, String) {
    let res = req.send().await.unwrap();
    let replayed = res
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    (res.status().as_u16(), replayed, res.text().await.unwrap())
}

/// The usage ledger of a token: (rows, requests summed).
pub fn usage_ledger(s: &TestServer, token_id: &str) -> (i64, i64) {
    s.db()
        .query_row(
            "SELECT COUNT(*), COALESCE(SUM(requests), 0) FROM usage_daily WHERE token_id = ?1",
            [token_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
}

// ---- Sessions with the real stack: acpx's queue owners and the agent processes ----

/// Waits until no process started with `HOME=home` is left (no agent, no acpx client).
pub async fn no_agent_left(home: &Path) {
    eventually_saying(
        "no agent process is left",
        std::time::Duration::from_secs(15),
        || agent_processes(home).is_empty(),
        || {
            let left: Vec<String> = agent_processes(home)
                .into_iter()
                .map(|pid| format!("{pid}: {}", cmdline(pid).unwrap_or_default()))
                .collect();
            format!("; left: {left:?}")
        },
    )
    .await;
}

/// Pids named by acpx's queue-owner locks under `home`.
pub fn owner_pids(home: &Path) -> Vec<i32> {
    std::fs::read_dir(home.join(".acpx/queues"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .filter_map(|t| serde_json::from_str::<Value>(&t).ok())
                .filter_map(|v| v["pid"].as_i64())
                .map(|p| p as i32)
                .collect()
        })
        .unwrap_or_default()
}

/// Live processes started with `HOME=home` (acpx clients, queue owners, adapters, claude).
pub fn agent_processes(home: &Path) -> Vec<i32> {
    let needle = format!("HOME={}", home.display());
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<i32>().ok()?;
            let env = std::fs::read(e.path().join("environ")).ok()?;
            (env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()) && alive(pid)).then_some(pid)
        })
        .collect()
}

/// The `HOME` a test server's children get (tests/api/harness.rs `test_config`).
pub fn home(s: &TestServer) -> PathBuf {
    s.dir.path().join("home")
}

/// The conversation request whose newest prompt contains `needle`.
pub fn request_for(fake: &FakeUpstream, needle: &str) -> Value {
    fake.conversation_requests()
        .into_iter()
        .rev()
        .find(|r| crate::fake_upstream::prompt_text(r).contains(needle))
        .unwrap_or_else(|| panic!("no request for {needle}: {:?}", fake.prompts()))
}

/// Pids of the acpx clients waiting for session `id`'s next turn (`acpx … prompt -s ID`).
pub fn client_pids(home: &Path, id: &str) -> Vec<i32> {
    agent_processes(home)
        .into_iter()
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
            args.windows(2)
                .any(|w| w[0] == b"-s" && w[1] == id.as_bytes())
                && args.contains(&b"prompt".as_slice())
        })
        .collect()
}

/// The environment of a `clawdforge serve` (see [`serve`]) driving the real acpx against
/// `fake`, with its own `HOME` and Claude config under `dir`, the admin token `admin`, the
/// warm pool off (its claude processes would share `HOME` and count as agents), and
/// `extra` on top; with the `HOME` it gets.
pub fn real_served_env(
    fake: &FakeUpstream,
    dir: &Path,
    admin: &str,
    extra: &[(&str, &str)],
) -> (PathBuf, Vec<(String, String)>) {
    let home = dir.join("home");
    let config_dir = dir.join("claude-config");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::create_dir_all(&config_dir).unwrap();
    let mut env: Vec<(String, String)> = fake.child_env(&config_dir);
    env.extend([
        ("ADMIN_BOOTSTRAP_TOKEN".to_string(), admin.to_string()),
        ("HOME".to_string(), home.display().to_string()),
        (
            "ACPX_BIN".to_string(),
            real_bin("acpx").display().to_string(),
        ),
        ("CLAWDFORGE_WARM_POOL".to_string(), "0".to_string()),
    ]);
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    (home, env)
}
