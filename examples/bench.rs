//! Benchmarks (not tests): latency of `/run` against spawning the CLI directly, with the
//! warm pool off and on, the real pinned `claude` against the fake upstream and the stub
//! `claude`, and the server's memory idle and under a queue. Prints one table; every row
//! of a group is measured side by side in the same run. Run through `scripts/bench.sh`,
//! which builds the release binary first.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/fake_upstream.rs"]
mod fake_upstream;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fake_upstream::{FakeUpstream, Reply};
use serde_json::{json, Value};

const ADMIN: &str = "bench-admin-secret-0123456789abcdef";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A release server in its own process, so its memory can be read from /proc.
struct Server {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(claude: &Path, env: &[(String, String)], extra: &[(&str, String)]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let bin = repo().join("target/release/clawdforge");
        let mut cmd = Command::new(&bin);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("CLAWDFORGE_DATA_DIR", dir.path().join("data"))
            .env("CLAWDFORGE_LISTEN", "127.0.0.1:0")
            .env("ADMIN_BOOTSTRAP_TOKEN", ADMIN)
            .env("CLAUDE_BIN", claude)
            .env("ACPX_BIN", repo().join("tests/stubs/acpx"))
            .env("RUST_LOG", "warn,clawdforge=info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e} (run scripts/bench.sh)", bin.display()));
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let url = loop {
            let line = lines.next().expect("server exited").unwrap();
            if let (true, Some(i)) = (line.contains("listening"), line.find("127.0.0.1:")) {
                let addr: String = line[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                    .collect();
                break format!("http://{addr}");
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server {
            child,
            url,
            _dir: dir,
        }
    }

    fn rss_kb(&self) -> u64 {
        status_kb(self.child.id(), "VmRSS")
    }

    async fn mint(&self, client: &reqwest::Client) -> String {
        let v: Value = client
            .post(format!("{}/admin/tokens", self.url))
            .bearer_auth(ADMIN)
            .json(&json!({"name": "bench"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["token"].as_str().unwrap().to_string()
    }

    /// `/healthz`'s `warm_sessions`.
    async fn warm_sessions(&self, client: &reqwest::Client) -> Value {
        self.healthz(client).await["warm_sessions"].clone()
    }

    async fn healthz(&self, client: &reqwest::Client) -> Value {
        client
            .get(format!("{}/healthz", self.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// `POST /sessions` asking for nothing; the session's id.
    async fn create_session(&self, client: &reqwest::Client, token: &str) -> String {
        let v: Value = client
            .post(format!("{}/sessions", self.url))
            .bearer_auth(token)
            .json(&json!({}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["session_id"].as_str().unwrap().to_string()
    }

    /// One turn (`ping`) in session `sid`, which must answer 200.
    async fn turn(&self, client: &reqwest::Client, token: &str, sid: &str) {
        let res = client
            .post(format!("{}/sessions/{sid}/turn", self.url))
            .bearer_auth(token)
            .json(&json!({"prompt": "ping"}))
            .send()
            .await
            .unwrap();
        let status = res.status();
        assert_eq!(status, 200, "{}", res.text().await.unwrap_or_default());
    }

    /// A user's pause between turns: until the next turn's acpx client has been started
    /// ahead (bounded), then `THINK_TIME` for it to load, as a person typing would give it.
    async fn think(&self, client: &reqwest::Client) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.warm_sessions(client).await["clients"].as_u64() == Some(0)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(THINK_TIME).await;
    }

    /// Waits (bounded) until the session pool holds a session again.
    async fn pooled(&self, client: &reqwest::Client) {
        let deadline = Instant::now() + Duration::from_secs(180);
        while self.warm_sessions(client).await["pooled"].as_u64() != Some(1) {
            assert!(Instant::now() < deadline, "the session pool did not refill");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn warm_idle(&self, client: &reqwest::Client) -> u64 {
        self.healthz(client).await["warm_pool"]["idle"]
            .as_u64()
            .unwrap_or(0)
    }

    /// Until the warm pool holds `size` idle processes, and then a while longer: a spawned
    /// process needs ~0.6 s (more with four at once on two cores) before it is really warm;
    /// requests arriving at a steady trickle find it so.
    async fn settled(&self, client: &reqwest::Client, size: u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.warm_idle(client).await < size {
            assert!(Instant::now() < deadline, "the warm pool did not refill");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }
}

/// The fake upstream answering "pong", its CLI config dir, and the env that points a real
/// `claude` at it (keep the first two alive while it runs).
async fn pong_upstream() -> (FakeUpstream, tempfile::TempDir, Vec<(String, String)>) {
    let fake = FakeUpstream::start().await;
    fake.set_default_reply(Reply::text("pong"));
    let cfg = tempfile::tempdir().unwrap();
    let env = fake.child_env(cfg.path());
    (fake, cfg, env)
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(field)).map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse()
                    .unwrap_or(0)
            })
        })
        .unwrap_or(0)
}

#[derive(Default)]
struct Stats {
    ms: Vec<f64>,
}

impl Stats {
    fn pct(&self, p: f64) -> f64 {
        let mut v = self.ms.clone();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        if v.is_empty() {
            return f64::NAN;
        }
        let i = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        v[i]
    }
}

/// Runs `total` calls of `f` with `conc` in flight at once; latency of each.
async fn measure<F, Fut>(total: usize, conc: usize, f: F) -> Stats
where
    F: Fn(usize) -> Fut + Send + Sync + 'static + Clone,
    Fut: std::future::Future<Output = ()> + Send,
{
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..conc {
        let (f, next) = (f.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= total {
                    break;
                }
                let t = Instant::now();
                f(i).await;
                out.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            out
        }));
    }
    let mut stats = Stats::default();
    for w in workers {
        stats.ms.extend(w.await.unwrap());
    }
    stats
}

/// Spawns the CLI directly the way a caller without the broker would, with `flags` beyond
/// the plain one-shot ones.
async fn direct(claude: PathBuf, env: Vec<(String, String)>, prompt: String, flags: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(&claude)
        .args([
            "-p",
            "--output-format",
            "json",
            "--model=sonnet",
            "--no-session-persistence",
        ])
        .args(flags)
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stdin, prompt.as_bytes())
        .await
        .unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).expect("direct spawn printed JSON");
    assert_eq!(v["is_error"], false, "{v}");
}

async fn via(client: reqwest::Client, url: String, token: String, prompt: String) {
    let res = client
        .post(format!("{url}/run"))
        .bearer_auth(token)
        .json(&json!({ "prompt": prompt }))
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.status(),
        200,
        "{}",
        res.text().await.unwrap_or_default()
    );
}

struct Table(Vec<[String; 6]>);

impl Table {
    fn row(&mut self, group: &str, what: &str, conc: usize, s: &Stats, base: Option<&Stats>) {
        let diff = base
            .map(|b| format!("{:+.1}", s.pct(0.5) - b.pct(0.5)))
            .unwrap_or_default();
        self.0.push([
            group.into(),
            what.into(),
            conc.to_string(),
            format!("{:.1}", s.pct(0.5)),
            format!("{:.1}", s.pct(0.99)),
            diff,
        ]);
    }

    fn note(&mut self, group: &str, what: &str, value: String) {
        self.0.push([
            group.into(),
            what.into(),
            String::new(),
            value,
            String::new(),
            String::new(),
        ]);
    }

    fn print(&self) {
        let head = [
            "group",
            "measurement",
            "conc",
            "p50 ms / value",
            "p99 ms",
            "Δp50 vs direct",
        ];
        let mut w = head.map(str::len);
        for r in &self.0 {
            for (i, c) in r.iter().enumerate() {
                w[i] = w[i].max(c.len());
            }
        }
        let line = |r: &[String; 6]| {
            let cells: Vec<String> = r
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{:<width$}", c, width = w[i]))
                .collect();
            format!("| {} |", cells.join(" | "))
        };
        let out = std::io::stdout();
        let mut out = out.lock();
        writeln!(out, "{}", line(&head.map(String::from))).unwrap();
        writeln!(
            out,
            "|{}|",
            w.iter()
                .map(|n| "-".repeat(n + 2))
                .collect::<Vec<_>>()
                .join("|")
        )
        .unwrap();
        for r in &self.0 {
            writeln!(out, "{}", line(r)).unwrap();
        }
    }
}

async fn real_claude_rows(table: &mut Table) {
    let claude = repo().join(".agents/node_modules/.bin/claude");
    if !claude.exists() {
        table.note(
            "real claude",
            "skipped: run scripts/install-agents.sh",
            String::new(),
        );
        return;
    }
    let n = env_usize("BENCH_REAL_N", 12);
    let (_fake, _cfg, env) = pong_upstream().await;
    let client = reqwest::Client::new();
    let cold = Server::start(
        &claude,
        &env,
        &[
            ("CLAWDFORGE_WARM_POOL", "0".into()),
            ("CLAWDFORGE_MAX_CONCURRENT", "4".into()),
        ],
    );
    let warm = Server::start(
        &claude,
        &env,
        &[
            ("CLAWDFORGE_WARM_POOL", "4".into()),
            ("CLAWDFORGE_MAX_CONCURRENT", "4".into()),
        ],
    );
    let (ct, wt) = (cold.mint(&client).await, warm.mint(&client).await);
    for conc in [1usize, 4] {
        let total = n * conc.min(2);
        let (c2, e2) = (claude.clone(), env.clone());
        let d = measure(total, conc, move |_| {
            direct(c2.clone(), e2.clone(), "ping".into(), &[])
        })
        .await;
        let (cl, u, t) = (client.clone(), cold.url.clone(), ct.clone());
        let c = measure(total, conc, move |_| {
            via(cl.clone(), u.clone(), t.clone(), "ping".into())
        })
        .await;
        // Warm rows: wait for the pool to be full and settled between bursts, as a steady
        // trickle of requests would find it.
        let mut w = Stats::default();
        for _ in 0..(total / conc) {
            warm.settled(&client, 4).await;
            let (cl, u, t) = (client.clone(), warm.url.clone(), wt.clone());
            let burst = measure(conc, conc, move |_| {
                via(cl.clone(), u.clone(), t.clone(), "ping".into())
            })
            .await;
            w.ms.extend(burst.ms);
        }
        table.row("real claude", "direct cold spawn", conc, &d, None);
        table.row("real claude", "/run cold (pool off)", conc, &c, Some(&d));
        table.row("real claude", "/run warm (pool 4)", conc, &w, Some(&d));
        table.note(
            "real claude",
            "warm p50 / direct p50",
            format!("{:.2}x", w.pct(0.5) / d.pct(0.5)),
        );
    }
    let rss_warm = warm.rss_kb();
    table.note(
        "real claude",
        "server RSS (pool 4, excl. children)",
        format!("{} MB", rss_warm / 1024),
    );
}

/// scripts/lib/bench_openai.py: the official `openai` SDK making one request per line asked
/// of it, so the caller paces them.
struct OpenaiDriver {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl OpenaiDriver {
    fn start(python: &Path, url: &str, token: &str) -> OpenaiDriver {
        let mut child = tokio::process::Command::new(python)
            .arg(repo().join("scripts/lib/bench_openai.py"))
            .env("CF_BASE_URL", url)
            .env("CF_TOKEN", token)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let out = tokio::io::BufReader::new(child.stdout.take().unwrap());
        OpenaiDriver {
            child,
            stdin,
            lines: tokio::io::AsyncBufReadExt::lines(out),
        }
    }

    /// One `chat` or `stream` request: its total and first-content-chunk milliseconds.
    async fn request(&mut self, kind: &str) -> (f64, Option<f64>) {
        tokio::io::AsyncWriteExt::write_all(&mut self.stdin, format!("{kind}\n").as_bytes())
            .await
            .unwrap();
        let line = self.lines.next_line().await.unwrap();
        let v: Value = serde_json::from_str(
            &line.unwrap_or_else(|| panic!("bench_openai.py exited: {:?}", self.child.try_wait())),
        )
        .unwrap();
        (v["ms"].as_f64().unwrap(), v["first_ms"].as_f64())
    }

    /// `n` requests of `kind`, each once `ready` allows: total and first-chunk latencies.
    async fn series(&mut self, kind: &str, n: usize, ready: impl AsyncFn()) -> (Stats, Stats) {
        let (mut total, mut first) = (Stats::default(), Stats::default());
        for _ in 0..n {
            ready().await;
            let (ms, first_ms) = self.request(kind).await;
            total.ms.push(ms);
            first.ms.extend(first_ms);
        }
        (total, first)
    }
}

/// The drop-in route through the official `openai` SDK against a direct cold `claude -p`
/// with the flags `/v1/chat/completions` gives it (tools off, Claude Code's system prompt
/// replaced), the real CLI against the fake upstream, one request at a time.
async fn sdk_rows(table: &mut Table) {
    let group = "openai SDK (real claude)";
    let claude = repo().join(".agents/node_modules/.bin/claude");
    let python = repo().join(".venv-tests/bin/python");
    if !claude.exists() || !python.exists() {
        table.note(
            group,
            "skipped: run scripts/install-agents.sh and scripts/install-sdk-tests.sh",
            String::new(),
        );
        return;
    }
    let n = env_usize("BENCH_SDK_N", 12);
    let (_fake, _cfg, env) = pong_upstream().await;
    let client = reqwest::Client::new();
    let server = |pool: &str| {
        Server::start(
            &claude,
            &env,
            &[
                ("CLAWDFORGE_WARM_POOL", pool.into()),
                ("CLAWDFORGE_MAX_CONCURRENT", "4".into()),
            ],
        )
    };
    let (cold, warm) = (server("0"), server("4"));
    let (ct, wt) = (cold.mint(&client).await, warm.mint(&client).await);

    let (c2, e2) = (claude.clone(), env.clone());
    let direct_cold = measure(n, 1, move |_| {
        direct(
            c2.clone(),
            e2.clone(),
            "ping".into(),
            &["--system-prompt=", "--tools="],
        )
    })
    .await;

    let mut sdk = OpenaiDriver::start(&python, &cold.url, &ct);
    let now = async || {};
    let (cold_chat, _) = sdk.series("chat", n, now).await;
    let (cold_stream, cold_first) = sdk.series("stream", n, now).await;

    // Warm: the first request teaches the pool this route's combination (a miss); then each
    // request waits until the pool is full and settled, as a steady trickle finds it.
    let mut sdk = OpenaiDriver::start(&python, &warm.url, &wt);
    sdk.request("chat").await;
    let settled = async || warm.settled(&client, 4).await;
    let (warm_chat, _) = sdk.series("chat", n, settled).await;
    let (warm_stream, warm_first) = sdk.series("stream", n, settled).await;

    table.row(
        group,
        "direct cold claude -p (/v1's flags)",
        1,
        &direct_cold,
        None,
    );
    table.row(
        group,
        "chat.completions, pool off",
        1,
        &cold_chat,
        Some(&direct_cold),
    );
    table.row(
        group,
        "chat.completions, pool 4",
        1,
        &warm_chat,
        Some(&direct_cold),
    );
    table.row(
        group,
        "stream: first content chunk, pool off",
        1,
        &cold_first,
        Some(&direct_cold),
    );
    table.row(
        group,
        "stream: first content chunk, pool 4",
        1,
        &warm_first,
        Some(&direct_cold),
    );
    table.row(
        group,
        "stream: whole answer, pool off",
        1,
        &cold_stream,
        Some(&direct_cold),
    );
    table.row(
        group,
        "stream: whole answer, pool 4",
        1,
        &warm_stream,
        Some(&direct_cold),
    );
    table.note(
        group,
        "pool-4 chat p50 / direct cold p50 (target <= 0.3x)",
        format!("{:.2}x", warm_chat.pct(0.5) / direct_cold.pct(0.5)),
    );
}

async fn stub_rows(table: &mut Table) {
    let claude = repo().join("tests/stubs/claude");
    let n = env_usize("BENCH_STUB_N", 200);
    let client = reqwest::Client::new();
    let s = Server::start(
        &claude,
        &[],
        &[
            ("CLAWDFORGE_WARM_POOL", "0".into()),
            ("CLAWDFORGE_MAX_CONCURRENT", "16".into()),
        ],
    );
    let t = s.mint(&client).await;
    table.note(
        "stub claude",
        "server RSS idle",
        format!("{} MB", s.rss_kb() / 1024),
    );
    for conc in [1usize, 16] {
        let c2 = claude.clone();
        let d = measure(n, conc, move |_| {
            direct(c2.clone(), vec![], "ping".into(), &[])
        })
        .await;
        let (cl, u, tk) = (client.clone(), s.url.clone(), t.clone());
        let r = measure(n, conc, move |_| {
            via(cl.clone(), u.clone(), tk.clone(), "ping".into())
        })
        .await;
        table.row("stub claude", "direct spawn", conc, &d, None);
        table.row("stub claude", "/run (pool off)", conc, &r, Some(&d));
    }
    drop(s);

    // 200 requests in flight: 4 running, the rest queued.
    let s = Server::start(
        &claude,
        &[],
        &[
            ("CLAWDFORGE_WARM_POOL", "0".into()),
            ("CLAWDFORGE_MAX_CONCURRENT", "4".into()),
            ("CLAWDFORGE_MAX_QUEUE", "256".into()),
            ("CLAWDFORGE_QUEUE_TIMEOUT_SECS", "120".into()),
        ],
    );
    let t = s.mint(&client).await;
    let idle = s.rss_kb();
    let pid = s.child.id();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        std::thread::spawn(move || {
            while sampling.load(std::sync::atomic::Ordering::SeqCst) {
                peak.fetch_max(status_kb(pid, "VmRSS"), std::sync::atomic::Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let (cl, u) = (client.clone(), s.url.clone());
    measure(200, 200, move |_| {
        via(cl.clone(), u.clone(), t.clone(), "@stub:sleep=0.2".into())
    })
    .await;
    sampling.store(false, std::sync::atomic::Ordering::SeqCst);
    sampler.join().unwrap();
    table.note("server", "RSS idle", format!("{} MB", idle / 1024));
    table.note(
        "server",
        "RSS peak, 200 requests queued/running",
        format!(
            "{} MB",
            peak.load(std::sync::atomic::Ordering::SeqCst) / 1024
        ),
    );
}

/// One acpx prompt run directly, the way a caller without the broker would (warm: the
/// session's queue owner is alive).
async fn acpx_direct_turn(acpx: PathBuf, env: Vec<(String, String)>, cwd: PathBuf, name: String) {
    let mut child = tokio::process::Command::new(&acpx)
        .args([
            "--format",
            "json",
            "--approve-reads",
            "--non-interactive-permissions",
            "deny",
            "--ttl",
            "600",
            "--cwd",
        ])
        .arg(&cwd)
        .args(["claude", "prompt", "-s", &name, "-f", "-"])
        .env_clear()
        .envs(env)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stdin, b"ping")
        .await
        .unwrap();
    drop(stdin);
    assert!(child.wait().await.unwrap().success());
}

async fn session_rows(table: &mut Table) {
    let bin = repo().join(".agents/node_modules/.bin");
    if !bin.join("acpx").exists() {
        table.note(
            "sessions",
            "skipped: run scripts/install-agents.sh",
            String::new(),
        );
        return;
    }
    let n = env_usize("BENCH_TURN_N", 5);
    let fake = FakeUpstream::start().await;
    fake.set_default_reply(Reply::text("pong"));
    let home = tempfile::tempdir().unwrap();
    let env = fake.agent_env(home.path(), &bin);
    let client = reqwest::Client::new();
    let server = session_server(&bin, &env, 0);
    let token = server.mint(&client).await;
    let (mut create, mut cold, mut warm) = (Stats::default(), Stats::default(), Stats::default());
    for _ in 0..2 {
        let t = Instant::now();
        let sid = server.create_session(&client, &token).await;
        create.ms.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        server.turn(&client, &token, &sid).await;
        cold.ms.push(t.elapsed().as_secs_f64() * 1000.0);
        for _ in 0..n {
            server.think(&client).await;
            let t = Instant::now();
            server.turn(&client, &token, &sid).await;
            warm.ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        client
            .delete(format!("{}/sessions/{sid}", server.url))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
    }
    // The same warm turn, calling acpx directly.
    let cwd = tempfile::tempdir().unwrap();
    let name = "bench-direct".to_string();
    let acpx = bin.join("acpx");
    let status = tokio::process::Command::new(&acpx)
        .args(["--format", "json", "--cwd"])
        .arg(cwd.path())
        .args(["claude", "sessions", "ensure", "--name", &name])
        .env_clear()
        .envs(env.clone())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .unwrap();
    assert!(status.success());
    acpx_direct_turn(
        acpx.clone(),
        env.clone(),
        cwd.path().to_path_buf(),
        name.clone(),
    )
    .await;
    let mut direct = Stats::default();
    for _ in 0..n * 2 {
        tokio::time::sleep(THINK_TIME).await;
        let t = Instant::now();
        acpx_direct_turn(
            acpx.clone(),
            env.clone(),
            cwd.path().to_path_buf(),
            name.clone(),
        )
        .await;
        direct.ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let _ = tokio::process::Command::new(&acpx)
        .args(["--format", "json", "--cwd"])
        .arg(cwd.path())
        .args(["claude", "sessions", "close", &name])
        .env_clear()
        .envs(env.clone())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
    drop(server);

    // The same with the session pool: a plain create takes a pooled session whose agent
    // the pool already started.
    let server = session_server(&bin, &env, 1);
    let token = server.mint(&client).await;
    let (mut pooled_create, mut pooled_first) = (Stats::default(), Stats::default());
    let mut pooled_ids = Vec::new();
    for _ in 0..3 {
        server.pooled(&client).await;
        server.think(&client).await;
        let t = Instant::now();
        let sid = server.create_session(&client, &token).await;
        pooled_create.ms.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        server.turn(&client, &token, &sid).await;
        pooled_first.ms.push(t.elapsed().as_secs_f64() * 1000.0);
        pooled_ids.push(sid);
    }
    server.pooled(&client).await;
    let ws = server.warm_sessions(&client).await;
    let agents = ws["agents"].as_u64().unwrap_or(0);
    let agent_kb = agent_rss_kb(home.path());
    for sid in &pooled_ids {
        client
            .delete(format!("{}/sessions/{sid}", server.url))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
    }
    drop(server);

    table.row(
        "sessions (real acpx)",
        "acpx prompt directly, warm",
        1,
        &direct,
        None,
    );
    table.row(
        "sessions (real acpx)",
        "POST /sessions, pool off",
        1,
        &create,
        None,
    );
    table.row(
        "sessions (real acpx)",
        "POST /sessions, pool 1 (pooled)",
        1,
        &pooled_create,
        Some(&create),
    );
    table.row(
        "sessions (real acpx)",
        "first turn of a pooled session",
        1,
        &pooled_first,
        Some(&warm),
    );
    table.row(
        "sessions (real acpx)",
        "first turn (agent cold)",
        1,
        &cold,
        None,
    );
    table.row(
        "sessions (real acpx)",
        "later turns (agent warm)",
        1,
        &warm,
        Some(&direct),
    );
    table.note(
        "sessions (real acpx)",
        "warm turn p50 / direct p50",
        format!("{:.2}x", warm.pct(0.5) / direct.pct(0.5)),
    );
    table.note(
        "sessions (real acpx)",
        "pooled first turn p50 / warm turn p50",
        format!("{:.2}x", pooled_first.pct(0.5) / warm.pct(0.5)),
    );
    table.note(
        "sessions (real acpx)",
        &format!("RSS of the warm session agents ({agents} alive)"),
        format!(
            "{} MB ({} MB each)",
            agent_kb / 1024,
            agent_kb / 1024 / agents.max(1)
        ),
    );
}

/// A server driving the real acpx in `bin`, without /run's warm pool (its claude processes
/// would share `HOME` and count as agents), with `pool` pooled sessions.
fn session_server(bin: &Path, env: &[(String, String)], pool: u32) -> Server {
    Server::start(
        &bin.join("claude"),
        env,
        &[
            ("ACPX_BIN", bin.join("acpx").display().to_string()),
            ("CLAWDFORGE_WARM_POOL", "0".into()),
            ("CLAWDFORGE_SESSION_POOL", pool.to_string()),
        ],
    )
}

/// RSS of every live process started with `HOME=home` (queue owners, adapters, claude).
fn agent_rss_kb(home: &Path) -> u64 {
    let needle = format!("HOME={}", home.display());
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()))
        })
        .map(|pid| status_kb(pid, "VmRSS"))
        .sum()
}

/// The pause between a session's turns in the session rows (see `Server::think`); the
/// direct `acpx prompt` row pauses as long.
const THINK_TIME: Duration = Duration::from_secs(1);

#[tokio::main]
async fn main() {
    let mut table = Table(Vec::new());
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only == "stub" {
        stub_rows(&mut table).await;
    }
    if only.is_empty() || only == "real" {
        real_claude_rows(&mut table).await;
    }
    if only.is_empty() || only == "sdk" {
        sdk_rows(&mut table).await;
    }
    if only.is_empty() || only == "sessions" {
        session_rows(&mut table).await;
    }
    table.print();
}
