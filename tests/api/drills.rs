//! Fault drills. The real binary is SIGKILLed at random points of runs, uploads, session
//! creations and turns and restarted on the same data dir, again and again; and a data dir lives on a tiny tmpfs
//! that fills up. After each restart (and once the disk has room again) what the contract
//! promises must still hold: the database is sound, every 2xx answer has its audit row,
//! and nothing is left behind (processes, run dirs, temp uploads, bytes without a row).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::Client;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::harness::alive;
use crate::harness::serve;

const ADMIN: &str = "drill-admin-secret-0123456789abcdef";
/// How many times the server is killed.
const KILLS: usize = 20;
/// The latest kill point after a batch is launched, on a quiet machine; see the calibration
/// in the drill for a busy one.
const MAX_KILL_DELAY_MS: u64 = 300;

/// The seed of the kill points: `CLAWDFORGE_DRILL_SEED` replays a run's choices (timing on
/// a busy machine still differs), else a fresh one, printed.
fn drill_seed() -> u64 {
    let seed = std::env::var("CLAWDFORGE_DRILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("drill seed: {seed} (CLAWDFORGE_DRILL_SEED={seed} replays its choices)");
    seed
}

/// How one request ended.
#[derive(Debug)]
enum Ended {
    /// A complete answer (for a stream: its `event: result` or `event: error`).
    Answered(u16, Value),
    /// The connection failed or the answer was cut short.
    Cut,
}

/// What a 2xx answer promised, to be checked after every restart.
#[derive(Debug, Clone)]
enum Promise {
    Run(String),
    Upload {
        file_token: String,
        size: u64,
        sha256: String,
    },
    Session(String),
    Turn {
        session_id: String,
        turn_index: i64,
    },
}

async fn post_run(client: Client, url: String, token: String, body: Value) -> Ended {
    post_prompt(client, format!("{url}/run"), token, body).await
}

/// A run or a turn at `url`, JSON or streamed.
async fn post_prompt(client: Client, url: String, token: String, body: Value) -> Ended {
    let res = client
        .post(url)
        .bearer_auth(&token)
        .json(&body)
        .send()
        .await;
    ended(res, body["stream"] == json!(true)).await
}

/// How a request ended: its status and JSON body, or cut short. A stream's answer is its
/// final `result` or `error` event.
async fn ended(res: reqwest::Result<reqwest::Response>, stream: bool) -> Ended {
    let Ok(res) = res else { return Ended::Cut };
    let status = res.status().as_u16();
    let Ok(text) = res.text().await else {
        return Ended::Cut;
    };
    if stream && status == 200 {
        // The answer is the final event; a stream without one was cut.
        let last = text
            .split("\n\n")
            .filter_map(|ev| {
                let name = ev.lines().find_map(|l| l.strip_prefix("event: "))?;
                let data = ev.lines().find_map(|l| l.strip_prefix("data: "))?;
                Some((name.to_string(), data.to_string()))
            })
            .find(|(name, _)| name == "result" || name == "error");
        return match last {
            Some((name, data)) => {
                let v: Value = serde_json::from_str(&data).expect("event data is JSON");
                // An error event after the stream started has no status of its own.
                Ended::Answered(if name == "result" { 200 } else { 599 }, v)
            }
            None => Ended::Cut,
        };
    }
    match serde_json::from_str(&text) {
        Ok(v) => Ended::Answered(status, v),
        Err(_) => Ended::Cut,
    }
}

async fn post_session(client: Client, url: String, token: String) -> Ended {
    let res = client
        .post(format!("{url}/sessions"))
        .bearer_auth(&token)
        .json(&json!({}))
        .send()
        .await;
    ended(res, false).await
}

const BOUNDARY: &str = "drill-boundary-5f0c2a";

/// A multipart upload of `chunks` × `chunk_bytes`, sent one chunk per `pause` (so a kill can
/// land in the middle of it), chunked transfer encoding.
async fn post_upload(
    client: Client,
    url: String,
    token: String,
    (chunks, chunk_bytes): (usize, usize),
    pause: Duration,
) -> Ended {
    let head = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"drill.bin\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    );
    let tail = format!("\r\n--{BOUNDARY}--\r\n");
    let parts = std::iter::once(Bytes::from(head))
        .chain((0..chunks).map(move |i| Bytes::from(vec![b'a' + (i % 26) as u8; chunk_bytes])))
        .chain(std::iter::once(Bytes::from(tail)));
    let body =
        futures_util::StreamExt::then(futures_util::stream::iter(parts), move |b| async move {
            tokio::time::sleep(pause).await;
            Ok::<Bytes, std::io::Error>(b)
        });
    let res = client
        .post(format!("{url}/files"))
        .bearer_auth(&token)
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await;
    ended(res, false).await
}

/// Live (not zombie) processes this drill is responsible for: those carrying its marker in
/// their environment (the stubs and what they spawn inherit it) or working under its data
/// dir, other than `server` itself.
fn leftover_processes(marker: &str, data: &Path, server: Option<u32>) -> Vec<String> {
    let me = std::process::id();
    let needle = marker.as_bytes();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me || Some(pid) == server || !alive(pid as i32) {
            continue;
        }
        let marked = std::fs::read(entry.path().join("environ"))
            .is_ok_and(|env| env.split(|&b| b == 0).any(|kv| kv == needle));
        let under_data = std::fs::read_link(entry.path().join("cwd")).is_ok_and(|cwd| {
            let cwd = cwd.to_string_lossy();
            Path::new(cwd.trim_end_matches(" (deleted)")).starts_with(data)
        });
        if marked || under_data {
            let cmd = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            found.push(format!(
                "{pid}: {}",
                String::from_utf8_lossy(&cmd).replace('\0', " ")
            ));
        }
    }
    found
}

fn names_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn open_db(data: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open_with_flags(
        data.join("clawdforge.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap()
}

fn integrity(db: &rusqlite::Connection) -> String {
    db.query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap()
}

fn count(db: &rusqlite::Connection, sql: &str) -> i64 {
    db.query_row(sql, [], |r| r.get(0)).unwrap()
}

fn file_tokens(db: &rusqlite::Connection) -> HashSet<String> {
    let mut stmt = db.prepare("SELECT file_token FROM files").unwrap();
    let rows = stmt.query_map([], |r| r.get(0)).unwrap();
    rows.map(Result::unwrap).collect()
}

fn sha256_of(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// The uploads dir holds exactly the files that have rows: no temp files of interrupted
/// uploads, no bytes without a row, no row without bytes.
fn assert_uploads_match_rows(data: &Path, db: &rusqlite::Connection, when: &str) {
    let on_disk: HashSet<String> = names_in(&data.join("uploads")).into_iter().collect();
    let rows = file_tokens(db);
    assert!(
        !on_disk.iter().any(|n| n.starts_with(".upload-")),
        "{when}: temp upload files left: {on_disk:?}"
    );
    assert_eq!(on_disk, rows, "{when}: upload bytes vs file rows");
}

/// A session dir exactly for each open session (closed ones have theirs removed).
fn assert_session_dirs_match_rows(data: &Path, db: &rusqlite::Connection, when: &str) {
    let dirs: HashSet<String> = names_in(&data.join("acpx-cwds")).into_iter().collect();
    let mut stmt = db
        .prepare("SELECT id FROM sessions WHERE status = 'open'")
        .unwrap();
    let open: HashSet<String> = stmt
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(dirs, open, "{when}: session dirs vs open sessions");
}

/// Everything a start-up after a crash must have put right, and every promise so far.
async fn assert_sound_after_restart(
    when: &str,
    marker: &str,
    data: &Path,
    server: u32,
    promises: &[Promise],
) {
    // Killed processes may take a moment to go; survivors are named.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = leftover_processes(marker, data, Some(server));
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{when}: processes left: {left:#?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let runs = names_in(&data.join("runs"));
    assert!(runs.is_empty(), "{when}: run dirs left: {runs:?}");
    let db = open_db(data);
    assert_eq!(integrity(&db), "ok", "{when}: integrity_check");
    assert_eq!(
        count(&db, "SELECT count(*) FROM audit WHERE outcome = 'running'"),
        0,
        "{when}: audit rows still running"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM live_processes"),
        0,
        "{when}: live_processes rows"
    );
    assert_uploads_match_rows(data, &db, when);
    assert_session_dirs_match_rows(data, &db, when);
    for p in promises {
        match p {
            Promise::Run(run_id) => {
                let outcome: Option<String> = db
                    .query_row(
                        "SELECT outcome FROM audit WHERE kind = 'run' AND subject = ?1",
                        [run_id],
                        |r| r.get(0),
                    )
                    .ok();
                assert_eq!(
                    outcome.as_deref(),
                    Some("ok"),
                    "{when}: audit row of answered run {run_id}"
                );
            }
            Promise::Upload {
                file_token,
                size,
                sha256,
            } => {
                let audited = count(
                    &db,
                    &format!(
                        "SELECT count(*) FROM audit WHERE kind = 'upload' AND subject = '{file_token}'"
                    ),
                );
                assert_eq!(
                    audited, 1,
                    "{when}: audit row of answered upload {file_token}"
                );
                let path = data.join("uploads").join(file_token);
                let meta = std::fs::metadata(&path)
                    .unwrap_or_else(|e| panic!("{when}: bytes of {file_token}: {e}"));
                assert_eq!(meta.len(), *size, "{when}: size of {file_token}");
                assert_eq!(&sha256_of(&path), sha256, "{when}: sha256 of {file_token}");
            }
            Promise::Session(id) => {
                let status: Option<String> = db
                    .query_row("SELECT status FROM sessions WHERE id = ?1", [id], |r| {
                        r.get(0)
                    })
                    .ok();
                assert_eq!(status.as_deref(), Some("open"), "{when}: session {id}");
            }
            Promise::Turn {
                session_id,
                turn_index,
            } => {
                // Each turn answered in this session has its own ok row.
                let answered = promises
                    .iter()
                    .filter(|p| matches!(p, Promise::Turn { session_id: s, .. } if s == session_id))
                    .count() as i64;
                let ok_rows = count(
                    &db,
                    &format!(
                        "SELECT count(*) FROM audit WHERE kind = 'turn' AND outcome = 'ok' \
                         AND subject = '{session_id}'"
                    ),
                );
                assert!(
                    ok_rows >= answered,
                    "{when}: {answered} turns of {session_id} answered, {ok_rows} ok rows"
                );
                let turns = count(
                    &db,
                    &format!("SELECT turn_count FROM sessions WHERE id = '{session_id}'"),
                );
                assert!(turns >= *turn_index, "{when}: turn_count of {session_id}");
            }
        }
    }
}

/// One batch: concurrent runs (short stub sleeps; some streamed, some with a grandchild,
/// some with an attachment), uploads (small ones, and a large one sent slowly), maybe a
/// session creation, and a turn in each of up to three sessions created before.
fn launch_batch(
    rng: &mut StdRng,
    client: &Client,
    url: &str,
    token: &str,
    promised: &[Promise],
) -> Vec<(&'static str, tokio::task::JoinHandle<Ended>)> {
    let attachable: Vec<&String> = promised
        .iter()
        .filter_map(|p| match p {
            Promise::Upload { file_token, .. } => Some(file_token),
            _ => None,
        })
        .collect();
    let sessions: Vec<&String> = promised
        .iter()
        .filter_map(|p| match p {
            Promise::Session(id) => Some(id),
            _ => None,
        })
        .collect();
    let mut tasks = Vec::new();
    if sessions.len() < 2 || rng.random_bool(0.3) {
        let fut = post_session(client.clone(), url.to_string(), token.to_string());
        tasks.push(("session", tokio::spawn(fut)));
    }
    // One turn per session at most: a second would be 409 busy.
    let first = sessions.len().saturating_sub(rng.random_range(1..=3));
    for id in &sessions[first..] {
        let mut body = json!({ "prompt": format!("@stub:sleep=0.0{}", rng.random_range(0..=5)) });
        if rng.random_bool(0.3) {
            body["stream"] = json!(true);
        }
        let fut = post_prompt(
            client.clone(),
            format!("{url}/sessions/{id}/turn"),
            token.to_string(),
            body,
        );
        tasks.push(("turn", tokio::spawn(fut)));
    }
    for _ in 0..rng.random_range(3..=6) {
        let mut prompt = format!("@stub:sleep=0.{}", rng.random_range(0..=3));
        if rng.random_bool(0.3) {
            prompt.push_str("\n@stub:grandchild");
        }
        let mut body = json!({ "prompt": prompt });
        if rng.random_bool(0.3) {
            body["stream"] = json!(true);
        }
        if !attachable.is_empty() && rng.random_bool(0.3) {
            let ft = attachable[rng.random_range(0..attachable.len())];
            body["files"] = json!([ft]);
        }
        let fut = post_run(client.clone(), url.to_string(), token.to_string(), body);
        tasks.push(("run", tokio::spawn(fut)));
    }
    for _ in 0..rng.random_range(1..=2) {
        let fut = post_upload(
            client.clone(),
            url.to_string(),
            token.to_string(),
            (rng.random_range(1..=2), 64 * 1024),
            Duration::ZERO,
        );
        tasks.push(("upload", tokio::spawn(fut)));
    }
    // ~4 MiB over ~400 ms or more: almost always cut by the kill.
    let fut = post_upload(
        client.clone(),
        url.to_string(),
        token.to_string(),
        (64, 64 * 1024),
        Duration::from_millis(6),
    );
    tasks.push(("upload", tokio::spawn(fut)));
    tasks
}

#[tokio::test]
async fn sigkill_at_random_points_leaves_a_sound_state_after_each_restart() {
    let started = Instant::now();
    let seed = drill_seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::Builder::new()
        .prefix("cf-drill-")
        .tempdir()
        .unwrap();
    let root = dir.path().canonicalize().unwrap();
    let data: PathBuf = root.join("data");
    let home = root.join("home");
    std::fs::create_dir_all(&home).unwrap();
    // Passed to the stubs (CLAUDE_* is allowlisted) and inherited by what they spawn.
    let marker = format!("CLAUDE_STUB_DRILL_MARK={}", root.display());
    let (mark_key, mark_value) = marker.split_once('=').unwrap();
    let home_s = home.display().to_string();
    let extra = [
        ("ADMIN_BOOTSTRAP_TOKEN", ADMIN),
        ("CLAWDFORGE_WARM_POOL", "0"),
        // The session pool's background work would be "processes left" at every check;
        // the pool has its own shutdown and restart test (tests/api/sessions_pool.rs).
        ("CLAWDFORGE_SESSION_POOL", "0"),
        ("HOME", home_s.as_str()),
        (mark_key, mark_value),
    ];
    let client = Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();

    let mut token = String::new();
    let mut promises: Vec<Promise> = Vec::new();
    let (mut answered, mut cut, mut cut_uploads, mut temp_left, mut dirs_left) = (0, 0, 0, 0, 0);
    let (mut turns_answered, mut turns_cut) = (0, 0);
    let mut max_kill_delay_ms = MAX_KILL_DELAY_MS;
    for round in 0..=KILLS {
        let mut served = serve(&data, &extra);
        let server = served.child.id();
        let when = format!("after restart {round} (seed {seed})");
        assert_sound_after_restart(&when, &marker, &data, server, &promises).await;
        if round == 0 {
            let res = client
                .post(format!("{}/admin/tokens", served.url))
                .bearer_auth(ADMIN)
                .json(&json!({"name": "drill"}))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 201);
            let v: Value = res.json().await.unwrap();
            token = v["token"].as_str().unwrap().to_string();
            // Calibrates the kill window to this machine: one session created and one turn
            // answered with no kill, timed. On a busy machine (the whole suite running
            // beside the drill) a session and a turn take longer than a fixed window, and
            // the drill would never see a turn end; twice their time keeps kills landing
            // both before and after answers.
            let t0 = Instant::now();
            let created = post_session(client.clone(), served.url.clone(), token.clone()).await;
            let Ended::Answered(201, v) = &created else {
                panic!("calibration: POST /sessions {created:?}")
            };
            let session_id = v["session_id"].as_str().unwrap().to_string();
            promises.push(Promise::Session(session_id.clone()));
            let turned = post_prompt(
                client.clone(),
                format!("{}/sessions/{session_id}/turn", served.url),
                token.clone(),
                json!({"prompt": "@stub:sleep=0.01"}),
            )
            .await;
            let Ended::Answered(200, v) = &turned else {
                panic!("calibration: a turn {turned:?}")
            };
            promises.push(Promise::Turn {
                session_id,
                turn_index: v["turn_index"].as_i64().unwrap(),
            });
            let measured = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
            max_kill_delay_ms = measured.saturating_mul(2).clamp(MAX_KILL_DELAY_MS, 10_000);
            eprintln!("drill: a session and a turn took {measured} ms; kills within {max_kill_delay_ms} ms");
        }
        if round == KILLS {
            // The last restart serves as before.
            let res = post_run(
                client.clone(),
                served.url.clone(),
                token.clone(),
                json!({"prompt": "still here"}),
            )
            .await;
            assert!(
                matches!(&res, Ended::Answered(200, v) if v["result"] == "echo: still here"),
                "{res:?}"
            );
            break;
        }

        let tasks = launch_batch(&mut rng, &client, &served.url, &token, &promises);
        let delay = rng.random_range(0..=max_kill_delay_ms);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        served.child.kill().unwrap();
        served.child.wait().unwrap();

        for (kind, task) in tasks {
            match task.await.unwrap() {
                Ended::Cut => {
                    cut += 1;
                    match kind {
                        "upload" => cut_uploads += 1,
                        "turn" => turns_cut += 1,
                        _ => {}
                    }
                }
                Ended::Answered(status, v) => {
                    assert!(
                        (200..300).contains(&status),
                        "round {round}: {kind} answered {status}: {v}"
                    );
                    answered += 1;
                    turns_answered += usize::from(kind == "turn");
                    let text = |k: &str| v[k].as_str().unwrap().to_string();
                    promises.push(match kind {
                        "run" => Promise::Run(text("run_id")),
                        "session" => Promise::Session(text("session_id")),
                        "turn" => Promise::Turn {
                            session_id: text("session_id"),
                            turn_index: v["turn_index"].as_i64().unwrap(),
                        },
                        _ => Promise::Upload {
                            file_token: v["file_token"].as_str().unwrap().to_string(),
                            size: v["size"].as_u64().unwrap(),
                            sha256: v["sha256"].as_str().unwrap().to_string(),
                        },
                    });
                }
            }
        }
        // The batch itself loads the machine more than the calibration did: while no turn
        // has ended before its kill yet, the window widens, so the drill cannot stay
        // vacuous on a slow machine (kill points stay random within it).
        if turns_answered == 0 {
            max_kill_delay_ms = max_kill_delay_ms.saturating_mul(2).min(10_000);
        }
        // What the crash left for the next start-up to clean (counted, to show the drill
        // reaches those paths).
        temp_left += names_in(&data.join("uploads"))
            .iter()
            .filter(|n| n.starts_with(".upload-"))
            .count();
        dirs_left += names_in(&data.join("runs")).len();
    }

    let db = open_db(&data);
    let abandoned = count(
        &db,
        "SELECT count(*) FROM audit WHERE kind = 'run' AND outcome = 'abandoned'",
    );
    let turns_abandoned = count(
        &db,
        "SELECT count(*) FROM audit WHERE kind = 'turn' AND outcome = 'abandoned'",
    );
    eprintln!(
        "drill: {KILLS} kills in {:.1} s; {answered} answered 2xx ({turns_answered} turns), \
         {cut} cut ({cut_uploads} uploads, {turns_cut} turns); {abandoned} runs and \
         {turns_abandoned} turns abandoned; left for start-up: {temp_left} temp uploads, \
         {dirs_left} run dirs",
        started.elapsed().as_secs_f64()
    );
    // Not vacuous: the kills landed both before and after answers.
    assert!(answered > 0, "no request was answered before its kill");
    assert!(cut > 0 && cut_uploads > 0, "no request was cut by a kill");
    assert!(abandoned > 0, "no run was killed mid-flight");
    assert!(
        turns_answered > 0 && turns_cut > 0,
        "turns were not both answered and cut"
    );
}

/// A tmpfs mounted for one test; unmounted on drop (lazily, should anything still hold it).
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// `None`, with the reason printed, where this process may not mount.
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: mounting a tmpfs needs root");
            return None;
        }
        std::fs::create_dir_all(dir).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status();
        match status {
            Ok(st) if st.success() => Some(Tmpfs(dir.to_path_buf())),
            other => {
                eprintln!("skipped: could not mount a tmpfs: {other:?}");
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Writes `path` until the filesystem is full; returns how many bytes fitted.
fn fill_disk(path: &Path) -> u64 {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![0u8; 64 * 1024];
    let mut written = 0;
    loop {
        match f.write(&block) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
            Err(e) => panic!("filling the disk: {e}"),
        }
    }
    written
}

/// Nothing half-written: no temp upload, no bytes without a row (or row without bytes), no
/// run dir, no session dir without an open session, no audit row left running.
fn assert_nothing_half_written(data: &Path, when: &str) {
    let db = open_db(data);
    assert_uploads_match_rows(data, &db, when);
    assert_session_dirs_match_rows(data, &db, when);
    let runs = names_in(&data.join("runs"));
    assert!(runs.is_empty(), "{when}: run dirs left: {runs:?}");
    assert_eq!(
        count(&db, "SELECT count(*) FROM audit WHERE outcome = 'running'"),
        0,
        "{when}: audit rows left running"
    );
}

fn assert_full_disk_answer(ended: &Ended, what: &str) {
    match ended {
        Ended::Answered(507, v) => assert_eq!(v["code"], "insufficient_storage", "{what}: {v}"),
        Ended::Answered(500, v) => assert_eq!(v["code"], "internal_error", "{what}: {v}"),
        other => panic!("{what}: expected 507 (or 500) on a full disk, got {other:?}"),
    }
}

#[tokio::test]
async fn a_full_disk_answers_507_leaves_nothing_half_written_and_recovers() {
    let dir = std::sync::Arc::new(
        tempfile::Builder::new()
            .prefix("cf-disk-")
            .tempdir()
            .unwrap(),
    );
    let Some(mount) = Tmpfs::mount(&dir.path().join("data"), "2m") else {
        return;
    };
    let s = crate::harness::TestServer::start_in(dir.clone(), |c| c.settings.warm_pool = 0).await;
    let data = s.data_dir();
    let (_, token) = s.mint("disk").await;
    let (url, client) = (s.url.clone(), s.client.clone());
    let upload = |chunks: (usize, usize)| {
        post_upload(
            client.clone(),
            url.clone(),
            token.clone(),
            chunks,
            Duration::ZERO,
        )
    };
    let run = |body: Value| post_run(client.clone(), url.clone(), token.clone(), body);

    // Room enough: an upload to attach later, a run, a session.
    let Ended::Answered(201, up) = upload((2, 4096)).await else {
        panic!("upload before the disk filled up")
    };
    let attached = up["file_token"].as_str().unwrap().to_string();
    assert!(matches!(
        run(json!({"prompt": "before"})).await,
        Ended::Answered(200, _)
    ));
    let session = || post_session(client.clone(), url.clone(), token.clone());
    let Ended::Answered(201, created) = session().await else {
        panic!("a session before the disk filled up")
    };
    let sid = created["session_id"].as_str().unwrap().to_string();
    let turn = |prompt: &str| {
        post_prompt(
            client.clone(),
            format!("{url}/sessions/{sid}/turn"),
            token.clone(),
            json!({ "prompt": prompt }),
        )
    };

    // SQLite lives on the same tmpfs, so the disk fills only now the server runs.
    let filler = data.join("filler");
    let filled = fill_disk(&filler);
    eprintln!("disk drill: filled {filled} bytes");

    let health = s.client.get(format!("{url}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200, "healthz on a full disk");

    let big = upload((4, 64 * 1024)).await;
    match &big {
        Ended::Answered(507, v) => assert_eq!(v["code"], "insufficient_storage", "{v}"),
        other => panic!("an upload that cannot fit: {other:?}"),
    }
    assert_nothing_half_written(&data, "after an upload that did not fit");

    let tiny = upload((1, 16)).await;
    assert_full_disk_answer(&tiny, "a small upload on a full disk");
    assert_nothing_half_written(&data, "after a small upload on a full disk");

    let staged = run(json!({"prompt": "with a file", "files": [attached]})).await;
    assert_full_disk_answer(&staged, "a run whose attachment cannot be staged");
    assert_nothing_half_written(&data, "after a run that could not stage its file");

    let refused = session().await;
    assert_full_disk_answer(&refused, "a session on a full disk");
    assert_nothing_half_written(&data, "after a session on a full disk");
    let turned = turn("on a full disk").await;
    assert_full_disk_answer(&turned, "a turn on a full disk");
    assert_nothing_half_written(&data, "after a turn on a full disk");

    let bare = run(json!({"prompt": "no file"})).await;
    eprintln!("disk drill: a run without files on a full disk: {bare:?}");
    if !matches!(bare, Ended::Answered(200, _)) {
        assert_full_disk_answer(&bare, "a run without files on a full disk");
    }
    assert_nothing_half_written(&data, "after a run on a full disk");

    // The disk fills up while a run is in flight: its answer cannot be recorded.
    std::fs::remove_file(&filler).unwrap();
    let in_flight = tokio::spawn(run(json!({"prompt": "@stub:sleep=1"})));
    crate::harness::eventually("the run's audit row is open", || {
        count(
            &open_db(&data),
            "SELECT count(*) FROM audit WHERE outcome = 'running'",
        ) == 1
    })
    .await;
    fill_disk(&filler);
    let late = in_flight.await.unwrap();
    assert_full_disk_answer(&late, "a run that could not record its end");

    // Admin writes and deletes meet the same full disk.
    let mint = s
        .admin(reqwest::Method::POST, "/admin/tokens")
        .json(&json!({"name": "on a full disk"}))
        .send()
        .await
        .unwrap();
    assert_eq!(mint.status(), 507, "minting on a full disk");
    let del = s
        .app(
            &token,
            reqwest::Method::DELETE,
            &format!("/files/{attached}"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 507, "deleting a file on a full disk");
    assert!(data.join("uploads").join(&attached).exists());

    let health = s.client.get(format!("{url}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200, "healthz after the failures");

    // Space again: everything works as before.
    std::fs::remove_file(&filler).unwrap();
    let Ended::Answered(201, _) = upload((2, 4096)).await else {
        panic!("upload once space was freed")
    };
    let again = run(json!({"prompt": "after", "files": [attached]})).await;
    assert!(
        matches!(&again, Ended::Answered(200, v) if v["result"].as_str().is_some_and(|r| r.starts_with("echo: after"))),
        "{again:?}"
    );
    // The run whose end could not be recorded gets its row closed once there is room.
    crate::harness::eventually("the open audit row is closed", || {
        count(
            &open_db(&data),
            "SELECT count(*) FROM audit WHERE outcome = 'running'",
        ) == 0
    })
    .await;
    let (outcome, detail, cost): (String, String, f64) = open_db(&data)
        .query_row(
            "SELECT outcome, detail, cost_usd FROM audit WHERE prompt = '@stub:sleep=1'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(
        (outcome.as_str(), detail.as_str()),
        ("error", "insufficient_storage")
    );
    assert!(cost > 0.0, "the work done is still accounted for");
    let again = turn("after").await;
    assert!(
        matches!(&again, Ended::Answered(200, v) if v["turn_index"].as_i64().is_some()),
        "{again:?}"
    );
    assert_nothing_half_written(&data, "after space was freed");
    assert_eq!(integrity(&open_db(&data)), "ok");
    s.stop().await;
    drop(mount);
}
