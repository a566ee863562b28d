//! Sessions with the real stack: the pinned `acpx`, its Claude ACP adapter and Claude Code,
//! against the fake Anthropic API. What only the real programs can show: context carried
//! across turns and restarts, the detached queue owner, cancel/timeout through it, and
//! acpx's own files.

use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;

use crate::fake_upstream::{conversation_text, system_text, FakeUpstream, Reply};
use crate::harness::{agent_processes, client_pids, home, owner_pids, request_for};
use crate::harness::{alive, eventually, no_agent_left};
use crate::harness::{call, create, served_session, spawn_served_turn, spawn_turn, turn};
use crate::harness::{real_server, real_server_in};

/// The session idle TTL, hence acpx's `--ttl`: a test that fails before closing its
/// session leaves a warm agent behind for this long, not the default hour.
const OWNER_TTL: u64 = 300;

fn pgid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()
}

#[tokio::test]
async fn real_acpx_carries_context_across_turns_and_a_restart() {
    let fake = FakeUpstream::start().await;
    fake.reply_when("TURNONE", Reply::text("Noted, pineapple."));
    let tweak = |c: &mut clawdforge::Config| {
        // Warm-pool claude processes share HOME and would be counted as agents here.
        c.settings.warm_pool = 0;
        c.settings.sweep_interval_secs = 3600;
        c.settings.session_ttl_secs = OWNER_TTL;
    };
    let s = real_server(&fake, tweak).await;
    let home = home(&s);
    let (_, t) = s.mint("real").await;
    let started = Instant::now();
    let (st, v) = create(
        &s,
        &t,
        json!({"model": "haiku", "system": "SYS-CF be brief"}),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    let create_time = started.elapsed();
    let id = v["session_id"].as_str().unwrap().to_string();

    let started = Instant::now();
    let (st, v) = turn(&s, &t, &id, json!({"prompt": "remember TURNONE pineapple"})).await;
    let cold = started.elapsed();
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["text"], "Noted, pineapple.");
    assert_eq!(
        (&v["turn_index"], &v["stop_reason"]),
        (&json!(1), &json!("end_turn"))
    );
    assert_eq!(v["usage"]["input_tokens"], 25);
    assert!(v["usage"]["cost_usd"].as_f64().unwrap() > 0.0, "{v}");
    assert!(!v.to_string().contains("available_commands_update"));
    let owner = owner_pids(&home);
    assert_eq!(owner.len(), 1, "a queue owner keeps the agent warm");

    let started = Instant::now();
    let (st, v) = turn(&s, &t, &id, json!({"prompt": "which fruit? TURNTWO"})).await;
    let warm = started.elapsed();
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["turn_index"], 2);
    assert_eq!(owner_pids(&home), owner, "the same warm agent answered");
    let second = request_for(&fake, "TURNTWO");
    let convo = conversation_text(&second);
    assert!(
        convo.contains("remember TURNONE pineapple") && convo.contains("Noted, pineapple."),
        "turn 2 carries turn 1: {convo}"
    );
    assert!(second["model"].as_str().unwrap().contains("haiku"));
    assert!(system_text(&second).contains("SYS-CF be brief"));

    // Turn costs add up to the agent's running total: each is its own share.
    let audit = s.audit_rows("turn");
    let sum: f64 = audit.iter().map(|r| r["cost_usd"].as_f64().unwrap()).sum();
    let total: f64 = s
        .db()
        .query_row(
            "SELECT cost_total FROM sessions WHERE id = ?1",
            [&id],
            |r| r.get(0),
        )
        .unwrap();
    assert!((sum - total).abs() < 1e-9, "{sum} vs {total}");
    assert!(audit[1]["cost_usd"].as_f64().unwrap() < total);

    // A graceful restart leaves the idle warm agent to the next server process.
    let dir = s.stop().await;
    assert!(alive(owner[0]));
    // Not the client started ahead for the next turn: it goes with the server, even when
    // the keeper was still starting it as the server stopped.
    eventually("the stopped server's client is gone", || {
        client_pids(&home, &id).is_empty()
    })
    .await;
    let s = real_server_in(&fake, dir, tweak).await;
    let started = Instant::now();
    let (st, v) = turn(&s, &t, &id, json!({"prompt": "and again TURNTHREE"})).await;
    let after_restart = started.elapsed();
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["turn_index"], 3);
    assert_eq!(owner_pids(&home), owner, "the warm agent served it");
    assert!(v["usage"]["cost_usd"].as_f64().unwrap() > 0.0, "{v}");
    let third = request_for(&fake, "TURNTHREE");
    let convo = conversation_text(&third);
    assert!(
        convo.contains("TURNONE") && convo.contains("TURNTWO"),
        "context survives the restart: {convo}"
    );
    assert!(third["model"].as_str().unwrap().contains("haiku"));
    assert!(system_text(&third).contains("SYS-CF be brief"));

    // Without a warm agent (it died), the next turn resumes the session from disk.
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(owner[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Only the client started ahead for the next turn is left; it starts a new agent.
    eventually("the agent is dead", || {
        agent_processes(&home) == client_pids(&home, &id)
    })
    .await;
    let started = Instant::now();
    let (st, v) = turn(&s, &t, &id, json!({"prompt": "once more TURNFOUR"})).await;
    let resumed = started.elapsed();
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["turn_index"], 4);
    let fourth = request_for(&fake, "TURNFOUR");
    let convo = conversation_text(&fourth);
    assert!(
        convo.contains("TURNONE") && convo.contains("TURNTWO") && convo.contains("TURNTHREE"),
        "context resumed from disk: {convo}"
    );
    assert!(fourth["model"].as_str().unwrap().contains("haiku"));
    eprintln!(
        "real acpx: create {create_time:?}, cold turn {cold:?}, warm turn {warm:?}, \
         warm after restart {after_restart:?}, resumed after the agent died {resumed:?}"
    );

    // Closing stops the queue owner and its agent and removes the working dir.
    let owner = owner_pids(&home);
    assert_eq!(owner.len(), 1);
    let cwd: String = s
        .db()
        .query_row("SELECT cwd FROM sessions WHERE id = ?1", [&id], |r| {
            r.get(0)
        })
        .unwrap();
    let (st, v) = call(&s, &t, Method::DELETE, &format!("/sessions/{id}")).await;
    assert_eq!((st, &v["status"]), (200, &json!("closed")), "{v}");
    eventually("the queue owner is stopped", || !alive(owner[0])).await;
    assert!(owner_pids(&home).is_empty(), "lock cleared");
    assert!(!Path::new(&cwd).exists());
    no_agent_left(&home).await;

    // Past the hard TTL, acpx's record and Claude's transcript go with the row.
    let record_id: String = s
        .db()
        .query_row(
            "SELECT acpx_record_id FROM sessions WHERE id = ?1",
            [&id],
            |r| r.get(0),
        )
        .unwrap();
    let record = home.join(format!(".acpx/sessions/{record_id}.json"));
    assert!(record.exists());
    let db = rusqlite::Connection::open(s.data_dir().join("clawdforge.db")).unwrap();
    db.busy_timeout(Duration::from_secs(5)).unwrap();
    db.execute("UPDATE sessions SET closed_at = 0 WHERE id = ?1", [&id])
        .unwrap();
    let report = clawdforge::sweeper::sweep_once(&s.state.sweep).await;
    assert_eq!(report.sessions_deleted, 1);
    assert!(!record.exists());
    let projects = s.dir.path().join("claude-config/projects");
    let left: Vec<_> = std::fs::read_dir(&projects)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "transcripts left: {left:?}");
    let (st, _) = call(&s, &t, Method::GET, &format!("/sessions/{id}")).await;
    assert_eq!(st, 404);
}

#[tokio::test]
async fn real_acpx_cancel_and_timeout_leave_the_session_usable() {
    let fake = FakeUpstream::start().await;
    fake.reply_when(
        "SLOWONE",
        Reply::delayed(Duration::from_secs(30), Reply::text("too late")),
    );
    fake.reply_when("HANGONE", Reply::Hang);
    let s = real_server(&fake, |c| {
        c.settings.warm_pool = 0;
        c.settings.session_ttl_secs = OWNER_TTL;
    })
    .await;
    let home = home(&s);
    let (_, t) = s.mint("real").await;
    let (_, v) = create(&s, &t, json!({})).await;
    let id = v["session_id"].as_str().unwrap().to_string();
    let (st, v) = turn(&s, &t, &id, json!({"prompt": "warm up"})).await;
    assert_eq!(st, 200, "{v}");
    let owner = owner_pids(&home);

    // Cancel: acpx cancels the prompt; the agent stays warm.
    let pending = spawn_turn(&s, &t, &id, "please SLOWONE");
    eventually("the slow prompt reached the upstream", || {
        fake.prompts().iter().any(|p| p.contains("SLOWONE"))
    })
    .await;
    let (st, v) = call(&s, &t, Method::POST, &format!("/sessions/{id}/cancel")).await;
    assert_eq!((st, &v["cancelled"]), (200, &json!(true)), "{v}");
    let (st, v) = pending.await.unwrap();
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        (&v["stop_reason"], &v["turn_index"]),
        (&json!("cancelled"), &json!(2))
    );
    assert_eq!(owner_pids(&home), owner, "cancel keeps the agent warm");

    // Timeout: the turn is cancelled in the agent and its `acpx prompt` group is gone;
    // nothing but the queue owner's group (owner, adapter, claude) remains, and the client
    // started ahead for the next turn.
    let (st, v) = turn(
        &s,
        &t,
        &id,
        json!({"prompt": "HANGONE now", "timeout_secs": 8}),
    )
    .await;
    assert_eq!((st, v["code"].as_str()), (504, Some("timeout")), "{v}");
    let owner = owner_pids(&home);
    eventually("only the queue owner's group is left", || {
        let waiting = client_pids(&home, &id);
        agent_processes(&home)
            .iter()
            .all(|p| owner.iter().any(|o| pgid(*p) == Some(*o)) || waiting.contains(p))
    })
    .await;

    let (st, v) = turn(&s, &t, &id, json!({"prompt": "still there? TURNFOUR"})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["turn_index"], 4);
    let convo = conversation_text(&request_for(&fake, "TURNFOUR"));
    assert!(convo.contains("warm up"), "{convo}");
    let (st, _) = call(&s, &t, Method::DELETE, &format!("/sessions/{id}")).await;
    assert_eq!(st, 200);
    no_agent_left(&home).await;
}

#[tokio::test]
async fn real_acpx_survivors_of_a_sigkilled_server_are_stopped_at_start_up() {
    use crate::harness::{real_served_env, serve, served_close, served_turn};
    let fake = FakeUpstream::start().await;
    fake.reply_when("HANGTWO", Reply::Hang);
    let dir = tempfile::tempdir().unwrap();
    let admin = "admin-secret-for-the-real-kill-test-012345";
    let ttl = OWNER_TTL.to_string();
    let (home, env) = real_served_env(
        &fake,
        dir.path(),
        admin,
        &[
            ("CLAWDFORGE_SESSION_TTL_SECS", ttl.as_str()),
            // The session pool's agent would count too; its own kill test is in
            // sessions_pool.rs.
            ("CLAWDFORGE_SESSION_POOL", "0"),
        ],
    );
    let extra: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let data = dir.path().join("data");
    let mut served = serve(&data, &extra);
    let (token, id) = served_session(&served.url, admin).await;
    let pending = spawn_served_turn(&served.url, &token, &id, "remember HANGTWO");
    eventually("the hanging prompt reached the upstream", || {
        fake.prompts().iter().any(|p| p.contains("HANGTWO"))
    })
    .await;
    let owner = owner_pids(&home);
    assert_eq!(owner.len(), 1);

    served.child.kill().unwrap();
    served.child.wait().unwrap();
    assert!(pending.await.unwrap().is_err());
    assert!(
        alive(owner[0]),
        "the detached queue owner outlives the server"
    );

    // Start-up stops it and clears its lock; without that, the next turn would queue
    // behind the hung one forever.
    let served = serve(&data, &extra);
    assert!(!alive(owner[0]), "start-up stopped the queue owner");
    assert!(owner_pids(&home).iter().all(|p| !owner.contains(p)));
    let (st, v) = served_turn(&served.url, &token, &id, "after the crash TURNAFTER").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["turn_index"], 2);
    let convo = conversation_text(&request_for(&fake, "TURNAFTER"));
    assert!(convo.contains("remember HANGTWO"), "{convo}");
    let db = rusqlite::Connection::open(data.join("clawdforge.db")).unwrap();
    let outcomes: Vec<String> = db
        .prepare("SELECT outcome FROM audit WHERE kind = 'turn' ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(outcomes, ["abandoned", "ok"]);
    assert_eq!(served_close(&served.url, &token, &id).await, 200);
    // The server itself runs with that HOME too.
    let server = served.child.id() as i32;
    eventually("closed: no agent left", || {
        agent_processes(&home).iter().all(|p| *p == server)
    })
    .await;
}
