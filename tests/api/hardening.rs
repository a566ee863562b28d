//! Hostile and careless clients over raw sockets: unreadable forwarded addresses, slow and
//! idle connections, stalled bodies, the connection cap, hyper's own parse errors, and a
//! client that hangs up after sending a stray CRLF.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::records;
use crate::harness::{alive, eventually, repo_root, venv_bin, TestServer};

/// Longest any single read below may wait before the test calls the server stuck.
const STUCK: Duration = Duration::from_secs(20);

/// Sends `raw` and reads until the server closes: the status and the parsed JSON body.
async fn exchange(s: &TestServer, raw: &[u8]) -> (u16, Value) {
    let mut sock = TcpStream::connect(s.addr).await.unwrap();
    sock.write_all(raw).await.unwrap();
    read_answer(&mut sock).await
}

/// Reads one answer (the server sends `connection: close` or has closed after it).
async fn read_answer(sock: &mut TcpStream) -> (u16, Value) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = tokio::time::timeout(STUCK, sock.read(&mut chunk))
            .await
            .expect("server answered in time")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(answer) = parse_answer(&buf) {
            return answer;
        }
    }
    parse_answer(&buf)
        .unwrap_or_else(|| panic!("no whole answer: {:?}", String::from_utf8_lossy(&buf)))
}

fn parse_answer(buf: &[u8]) -> Option<(u16, Value)> {
    let text = std::str::from_utf8(buf).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status: u16 = head.split(' ').nth(1)?.parse().ok()?;
    let len: usize = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())?
    })?;
    if body.len() < len {
        return None;
    }
    let v: Value = serde_json::from_str(&body[..len])
        .unwrap_or_else(|_| panic!("status {status}: body is not JSON: {body:?}"));
    assert_eq!(v["ok"], json!(status < 400), "{v}");
    Some((status, v))
}

/// Reads until the server closes the connection; what it sent before.
async fn until_closed(sock: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(STUCK, sock.read_to_end(&mut out))
        .await
        .expect("the server closed the connection")
        .ok();
    out
}

#[tokio::test]
async fn unreadable_forwarded_for_from_a_trusted_proxy_is_refused() {
    let s = TestServer::start_with(|c| {
        c.settings.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
        c.settings.allow_cidrs = vec!["10.0.0.0/8".parse().unwrap()];
    })
    .await;
    let get = |xff: &[u8]| {
        let mut raw =
            b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-forwarded-for: ".to_vec();
        raw.extend_from_slice(xff);
        raw.extend_from_slice(b"\r\n\r\n");
        raw
    };
    // Readable: an allowed client is let in, an outside one is not, and a proxy forwarding
    // nothing is judged as itself.
    assert_eq!(exchange(&s, &get(b"10.1.2.3")).await.0, 200);
    assert_eq!(exchange(&s, &get(b"203.0.113.5")).await.0, 403);
    assert_eq!(
        exchange(
            &s,
            b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
        )
        .await
        .0,
        200
    );
    for bad in [
        &b"\xc3\xa9, 203.0.113.5"[..],
        b"203.0.113.5,",
        b"garbage",
        b"unknown",
        b"fe80::1%eth0",
        b"010.001.002.003",
        b"10.1.2.3, ",
    ] {
        let (st, v) = exchange(&s, &get(bad)).await;
        assert_eq!(
            (st, v["code"].as_str()),
            (403, Some("forbidden")),
            "{:?}: {v}",
            String::from_utf8_lossy(bad)
        );
    }
}

#[tokio::test]
async fn a_head_that_never_ends_is_closed_after_the_header_timeout() {
    let s = TestServer::start_with(|c| c.settings.header_timeout_secs = 1).await;
    let mut sock = TcpStream::connect(s.addr).await.unwrap();
    sock.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: ")
        .await
        .unwrap();
    let sent = until_closed(&mut sock).await;
    assert!(sent.is_empty(), "{:?}", String::from_utf8_lossy(&sent));
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_timeout() {
    let s = TestServer::start_with(|c| c.settings.header_timeout_secs = 1).await;
    let mut sock = TcpStream::connect(s.addr).await.unwrap();
    sock.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_answer(&mut sock).await.0, 200);
    // Kept alive for a next request that never comes: closed, nothing more sent.
    assert!(until_closed(&mut sock).await.is_empty());
}

#[tokio::test]
async fn a_stalled_upload_is_408_and_leaves_nothing_behind() {
    let s = TestServer::start_with(|c| c.settings.body_timeout_secs = 1).await;
    let (_, t) = s.mint("slow").await;
    let boundary = "cf-stall-boundary";
    let start = format!(
        "--{boundary}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"a.bin\"\r\n\
         content-type: application/octet-stream\r\n\r\n{}",
        "x".repeat(10_000)
    );
    let head = format!(
        "POST /files HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {t}\r\n\
         content-type: multipart/form-data; boundary={boundary}\r\ncontent-length: 1000000\r\n\r\n"
    );
    let mut sock = TcpStream::connect(s.addr).await.unwrap();
    sock.write_all(head.as_bytes()).await.unwrap();
    sock.write_all(start.as_bytes()).await.unwrap();
    let (st, v) = read_answer(&mut sock).await;
    assert_eq!((st, v["code"].as_str()), (408, Some("timeout")), "{v}");
    let rows: i64 = s
        .db()
        .query_row("SELECT count(*) FROM files", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 0);
    let uploads = s.state.config.uploads_dir.clone();
    eventually("no upload bytes kept", || {
        std::fs::read_dir(&uploads).unwrap().next().is_none()
    })
    .await;
}

#[tokio::test]
async fn a_stalled_run_body_is_408_and_runs_nothing() {
    let s = TestServer::start_with(|c| c.settings.body_timeout_secs = 1).await;
    let (_, t) = s.mint("slow").await;
    let head = format!(
        "POST /run HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {t}\r\n\
         content-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"prompt\": \"hi"
    );
    let (st, v) = exchange(&s, head.as_bytes()).await;
    assert_eq!((st, v["code"].as_str()), (408, Some("timeout")), "{v}");
    assert!(records(&s.record_dir).is_empty(), "no CLI was started");
    assert!(s.audit_rows("run").is_empty());
}

#[tokio::test]
async fn beyond_the_connection_cap_new_connections_wait() {
    let s = TestServer::start_with(|c| {
        c.settings.max_connections = 2;
        c.settings.header_timeout_secs = 60;
    })
    .await;
    let mut holders = Vec::new();
    for _ in 0..2 {
        let mut h = TcpStream::connect(s.addr).await.unwrap();
        h.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        // Answered, so this connection is surely being served (and kept alive).
        assert_eq!(read_answer(&mut h).await.0, 200);
        holders.push(h);
    }
    // The kernel completes the handshake, but the server does not take the connection.
    let mut third = TcpStream::connect(s.addr).await.unwrap();
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), third.read(&mut byte))
            .await
            .is_err(),
        "a connection beyond the cap was served"
    );
    drop(holders.pop());
    assert_eq!(read_answer(&mut third).await.0, 200);
}

#[tokio::test]
async fn hyper_parse_errors_are_answered_with_the_envelope() {
    let s = TestServer::start().await;
    let huge = format!(
        "GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(100_000)
    );
    let (st, v) = exchange(&s, huge.as_bytes()).await;
    assert_eq!((st, v["code"].as_str()), (431, Some("too_large")), "{v}");
    let (st, v) = exchange(&s, b"NOT HTTP AT ALL\r\n\r\n").await;
    assert_eq!((st, v["code"].as_str()), (400, Some("bad_request")), "{v}");
    let (st, v) = exchange(&s, b"GET /healthz HTTP/1.1\r\nbad header\r\n\r\n").await;
    assert_eq!((st, v["code"].as_str()), (400, Some("bad_request")), "{v}");
}

#[tokio::test]
async fn a_hang_up_after_a_stray_crlf_still_stops_the_run() {
    let s = TestServer::start().await;
    let (_, t) = s.mint("app").await;
    let body = json!({"prompt": "@stub:hang", "timeout_secs": 600}).to_string();
    let raw = format!(
        "POST /run HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {t}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}\r\n",
        body.len()
    );
    let mut sock = TcpStream::connect(s.addr).await.unwrap();
    sock.write_all(raw.as_bytes()).await.unwrap();
    let record_dir = s.record_dir.clone();
    eventually("the stub started", || !records(&record_dir).is_empty()).await;
    let pid = records(&s.record_dir)[0]["pid"].as_i64().unwrap() as i32;
    drop(sock);
    eventually("the run's process was killed", || !alive(pid)).await;
    crate::harness::run_outcome_becomes(&s, "abandoned").await;
    // The connection layer keeps working for everyone else.
    let (st, _) = crate::harness::body(s.req(Method::GET, "/healthz").send().await.unwrap()).await;
    assert_eq!(st, 200);
}

#[tokio::test]
async fn sigterm_with_slow_sockets_open_does_not_wait_for_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut served = crate::harness::serve(dir.path(), &[("CLAWDFORGE_HEADER_TIMEOUT_SECS", "60")]);
    let addr = served.url.trim_start_matches("http://").to_string();
    let mut slow = Vec::new();
    for _ in 0..50 {
        let mut sock = TcpStream::connect(&addr).await.unwrap();
        sock.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: ")
            .await
            .unwrap();
        slow.push(sock);
    }
    // A served request proves the slow sockets were accepted before the signal.
    let mut probe = TcpStream::connect(&addr).await.unwrap();
    probe
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    probe.read_to_end(&mut answer).await.unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"));
    let status = served.terminate(Duration::from_secs(15));
    assert!(status.success(), "{status:?}");
    let lines = served.collect_lines();
    assert!(
        !lines.iter().any(|l| l.contains("did not finish in time")),
        "shutdown waited out its grace period for idle sockets: {lines:?}"
    );
    for mut sock in slow {
        assert!(until_closed(&mut sock).await.is_empty());
    }
}

/// `clawdforge serve` on `data` with the stub CLIs, run until it exits (for start-ups that
/// must refuse).
fn serve_to_the_end(data: &std::path::Path) -> std::process::Output {
    crate::harness::bin()
        .env("CLAWDFORGE_DATA_DIR", data)
        .env("CLAWDFORGE_LISTEN", "127.0.0.1:0")
        .env("CLAUDE_BIN", crate::harness::stub("claude"))
        .env("ACPX_BIN", crate::harness::stub("acpx"))
        .arg("serve")
        .output()
        .unwrap()
}

#[test]
fn a_second_server_on_the_same_data_dir_refuses_naming_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let served = crate::harness::serve(dir.path(), &[]);
    let out = serve_to_the_end(dir.path());
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("pid {}", served.child.id())) && stderr.contains("in use"),
        "{stderr}"
    );
    // The first one was left alone: its lock file still names it.
    let holder = std::fs::read_to_string(dir.path().join("clawdforge.lock")).unwrap();
    assert_eq!(holder.trim(), served.child.id().to_string());
    // The offline subcommands work beside it.
    let tokens = crate::harness::bin()
        .env("CLAWDFORGE_DATA_DIR", dir.path())
        .args(["tokens", "list", "--json"])
        .output()
        .unwrap();
    assert!(tokens.status.success(), "{tokens:?}");
    let backup = crate::harness::bin()
        .env("CLAWDFORGE_DATA_DIR", dir.path())
        .arg("backup")
        .arg(dir.path().join("copy.db"))
        .output()
        .unwrap();
    assert!(backup.status.success(), "{backup:?}");
    let doctor = crate::harness::bin()
        .env("CLAWDFORGE_DATA_DIR", dir.path())
        .env("CLAUDE_BIN", crate::harness::stub("claude"))
        .env("ACPX_BIN", crate::harness::stub("acpx"))
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&doctor.stdout);
    assert!(
        report.contains("\"checks\"") || report.starts_with('{'),
        "{doctor:?}"
    );
    assert!(!String::from_utf8_lossy(&doctor.stderr).contains("in use"));
}

#[test]
fn a_damaged_database_is_refused_at_start_up_with_the_doctors_fix() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["a", "b", "c"] {
        let out = crate::harness::bin()
            .env("CLAWDFORGE_DATA_DIR", dir.path())
            .args(["tokens", "mint", "--name", name])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let db = dir.path().join("clawdforge.db");
    // Zero bytes inside every page after the first (the schema page stays readable, so
    // the file opens and looks fine until its pages are read).
    let mut bytes = std::fs::read(&db).unwrap();
    let page = 4096;
    assert!(bytes.len() > 2 * page, "the database has several pages");
    for start in (page..bytes.len()).step_by(page) {
        let end = (start + 200).min(bytes.len());
        bytes[start..end].fill(0);
    }
    std::fs::write(&db, &bytes).unwrap();
    let out = serve_to_the_end(dir.path());
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is damaged") && stderr.contains("clawdforge backup"),
        "{stderr}"
    );
    assert!(!stderr.contains("listening"), "{stderr}");
}

#[tokio::test]
async fn healthz_reports_storage_failing_when_the_data_dir_goes() {
    let s = TestServer::start().await;
    let health = || async {
        let (st, v) =
            crate::harness::body(s.req(Method::GET, "/healthz").send().await.unwrap()).await;
        assert_eq!(st, 200, "{v}");
        v["storage"].as_str().unwrap().to_string()
    };
    assert_eq!(health().await, "ok");
    // The database replaced under the server: the path names another file now.
    let db = s.data_dir().join("clawdforge.db");
    let copy = s.data_dir().join("copy.db");
    std::fs::copy(&db, &copy).unwrap();
    std::fs::rename(&copy, &db).unwrap();
    assert_eq!(health().await, "failing");
    // The whole data dir deleted.
    std::fs::remove_dir_all(s.data_dir()).unwrap();
    assert_eq!(health().await, "failing");
}

#[tokio::test]
async fn probe_children_die_with_the_server() {
    if clawdforge::process::find_setpriv().is_none() {
        eprintln!("SKIPPED: setpriv (util-linux) is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("probe-pids");
    // A CLI whose every probe hangs: it notes its pid, then becomes `sleep` (same process).
    let cli = dir.path().join("hanging-cli");
    std::fs::write(
        &cli,
        format!("#!/bin/sh\necho $$ >> {}\nexec sleep 600\n", pids.display()),
    )
    .unwrap();
    std::fs::set_permissions(&cli, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut server = crate::harness::bin()
        .env("CLAWDFORGE_DATA_DIR", dir.path().join("data"))
        .env("CLAWDFORGE_LISTEN", "127.0.0.1:0")
        .env("CLAUDE_BIN", &cli)
        .env("ACPX_BIN", &cli)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let read_pids = || -> Vec<i32> {
        std::fs::read_to_string(&pids)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    };
    eventually("the first probe started", || !read_pids().is_empty()).await;
    let probes = read_pids();
    server.kill().unwrap();
    server.wait().unwrap();
    for pid in probes {
        eventually("a probe child died with its server", || !alive(pid)).await;
    }
}

/// Runs `cmd` with `text` on its stdin: its exit status and what it said.
fn pipe_through(mut cmd: std::process::Command, text: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

/// `promtool check metrics` on `text` (scripts/test.sh installs Debian's prometheus package).
fn promtool(text: &str) -> (bool, String) {
    let mut cmd = std::process::Command::new("promtool");
    cmd.args(["check", "metrics"]);
    pipe_through(cmd, text)
}

/// tests/sdk/openmetrics_check.py (prometheus_client's OpenMetrics parser) on `text`: whether
/// it parsed, and `name type samples` per family (or the parser's complaint).
fn openmetrics_parse(text: &str) -> (bool, String) {
    let mut cmd = std::process::Command::new(venv_bin("python"));
    cmd.arg(repo_root().join("tests/sdk/openmetrics_check.py"));
    pipe_through(cmd, text)
}

#[tokio::test]
async fn metrics_negotiate_their_format_and_pass_promtool_and_an_openmetrics_parser() {
    let s = TestServer::start().await;
    let (_, t) = s.mint("app").await;
    // Something in every family: a run (counters, histogram) and a refused request.
    let (st, _) = s.post_json(&t, "/run", &json!({"prompt": "hi"})).await;
    assert_eq!(st, 200);
    let scrape = |accept: Option<&'static str>| {
        let mut req = s.admin(Method::GET, "/metrics");
        if let Some(a) = accept {
            req = req.header("accept", a);
        }
        async move {
            let res = req.send().await.unwrap();
            assert_eq!(res.status(), 200);
            let ct = res.headers()["content-type"].to_str().unwrap().to_string();
            (ct, res.text().await.unwrap())
        }
    };
    let (ct, text) = scrape(None).await;
    assert_eq!(ct, "text/plain; version=0.0.4; charset=utf-8");
    assert!(!text.contains("# EOF"));
    assert!(
        text.contains("# TYPE clawdforge_http_requests_total counter"),
        "{text}"
    );
    let (ok, said) = promtool(&text);
    assert!(ok, "promtool on the text format: {said}\n{text}");

    // What Prometheus itself sends.
    let (ct, text) = scrape(Some(
        "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    ))
    .await;
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    assert!(text.ends_with("# EOF\n"));
    // promtool 2.42 (Debian's) parses only the text format: it reads this answer without a
    // parse error, and its only findings are the counters' HELP, which OpenMetrics gives
    // the family (`x`) and the text format the sample (`x_total`).
    let (_, said) = promtool(&text);
    for finding in said.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            finding.ends_with("_total no help text"),
            "promtool on OpenMetrics: {said}\n{text}"
        );
    }
    // So the OpenMetrics answer is checked by a parser of that format: prometheus_client's
    // (strict about `# EOF`, types, units and `_total`).
    let (ok, said) = openmetrics_parse(&text);
    assert!(ok, "prometheus_client on OpenMetrics: {said}\n{text}");
    let families: Vec<(&str, &str)> = said
        .lines()
        .filter_map(|l| {
            let mut w = l.split(' ');
            Some((w.next()?, w.next()?))
        })
        .collect();
    for family in [
        ("clawdforge_http_requests", "counter"),
        ("clawdforge_run_duration_seconds", "histogram"),
        ("clawdforge_processes_running", "gauge"),
    ] {
        assert!(families.contains(&family), "{family:?} not in {said}");
    }
    assert!(
        families.iter().all(|(_, ty)| *ty != "unknown"),
        "a family lost its type: {said}"
    );
}

#[tokio::test]
async fn openapi_states_the_real_bounds() {
    let s = TestServer::start_with(|c| c.settings.max_timeout_secs = 300).await;
    let res = s.req(Method::GET, "/openapi.json").send().await.unwrap();
    assert_eq!(res.status(), 200);
    let doc: Value = res.json().await.unwrap();
    let schemas = &doc["components"]["schemas"];
    for body in ["RunBody", "TurnBody"] {
        let t = &schemas[body]["properties"]["timeout_secs"];
        assert_eq!(
            (t["minimum"].as_u64(), t["maximum"].as_u64()),
            (Some(1), Some(300)),
            "{body}: {t}"
        );
    }
    let ttl = &schemas["UploadForm"]["properties"]["ttl_secs"];
    assert_eq!(
        (ttl["minimum"].as_u64(), ttl["maximum"].as_u64()),
        (Some(60), Some(86400)),
        "{ttl}"
    );
    let metrics = &doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"];
    assert!(
        metrics.get("text/plain; version=0.0.4").is_some(),
        "{metrics}"
    );
    assert!(
        metrics.get("application/openmetrics-text").is_some(),
        "{metrics}"
    );
}

#[tokio::test]
async fn max_open_sessions_bounds_post_sessions() {
    let s = TestServer::start().await;
    let (id, t) = s
        .mint_with(json!({"name": "few", "max_open_sessions": 1}))
        .await;
    let (st, first) = s.post_json(&t, "/sessions", &json!({})).await;
    assert_eq!(st, 201, "{first}");
    let res = s
        .app(&t, Method::POST, "/sessions")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert!(res.headers().contains_key("retry-after"));
    let (st, v) = crate::harness::body(res).await;
    assert_eq!((st, v["code"].as_str()), (429, Some("overloaded")), "{v}");
    let sessions: i64 = s
        .db()
        .query_row("SELECT count(*) FROM sessions", [], |r| r.get(0))
        .unwrap();
    assert_eq!(sessions, 1, "the refused one left no row");
    // A closed session no longer counts.
    let sid = first["session_id"].as_str().unwrap();
    let res = s
        .app(&t, Method::DELETE, &format!("/sessions/{sid}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(s.post_json(&t, "/sessions", &json!({})).await.0, 201);
    // PATCH: omitted keeps, null clears.
    let patch = |body: Value| {
        s.admin(Method::PATCH, &format!("/admin/tokens/{id}"))
            .json(&body)
            .send()
    };
    let (_, v) = crate::harness::body(patch(json!({"rate_per_min": 100})).await.unwrap()).await;
    assert_eq!(v["max_open_sessions"], 1);
    assert_eq!(s.post_json(&t, "/sessions", &json!({})).await.0, 429);
    let (_, v) =
        crate::harness::body(patch(json!({"max_open_sessions": null})).await.unwrap()).await;
    assert_eq!(v["max_open_sessions"], Value::Null);
    assert_eq!(s.post_json(&t, "/sessions", &json!({})).await.0, 201);
    let (st, _) = crate::harness::body(patch(json!({"max_open_sessions": 0})).await.unwrap()).await;
    assert_eq!(st, 400);
}

#[tokio::test]
async fn max_upload_bytes_stored_bounds_what_a_token_keeps() {
    let s = TestServer::start().await;
    let (id, t) = s
        .mint_with(json!({"name": "small", "max_upload_bytes_stored": 100}))
        .await;
    let upload = |n: usize| {
        let form = reqwest::multipart::Form::new().part(
            "file",
            reqwest::multipart::Part::bytes(vec![b'x'; n]).file_name("f.bin"),
        );
        s.app(&t, Method::POST, "/files").multipart(form).send()
    };
    let files = || -> i64 {
        s.db()
            .query_row("SELECT count(*) FROM files", [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(crate::harness::body(upload(60).await.unwrap()).await.0, 201);
    let (st, v) = crate::harness::body(upload(50).await.unwrap()).await;
    assert_eq!((st, v["code"].as_str()), (413, Some("too_large")), "{v}");
    assert_eq!(files(), 1, "nothing kept of the refused upload");
    // Exactly at the quota is accepted; then nothing more fits.
    assert_eq!(crate::harness::body(upload(40).await.unwrap()).await.0, 201);
    let (st, v) = crate::harness::body(upload(1).await.unwrap()).await;
    assert_eq!((st, v["code"].as_str()), (413, Some("too_large")), "{v}");
    assert_eq!(files(), 2);
    let uploads = std::fs::read_dir(&s.state.config.uploads_dir)
        .unwrap()
        .count();
    assert_eq!(uploads, 2, "no bytes of refused uploads kept");
    // Cleared with null: any number again (up to CLAWDFORGE_MAX_UPLOAD_BYTES each).
    let res = s
        .admin(Method::PATCH, &format!("/admin/tokens/{id}"))
        .json(&json!({"max_upload_bytes_stored": null}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        crate::harness::body(upload(500).await.unwrap()).await.0,
        201
    );
}
