//! An experiment, not a test or a benchmark: what acpx 0.19.1 does when an `acpx prompt`
//! client is joined, killed or cancelled in the second between printing its turn's result
//! and exiting (docs/cli-behaviour.md, "Answering a turn before `acpx prompt` exits").
//! Runs the pinned acpx directly against the fake upstream, in a throwaway HOME, and prints
//! what happened. `SCEN=join,wait,kill,term,cancel cargo run --example acpx_trailing`.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#[path = "../tests/common/fake_upstream.rs"]
mod fake_upstream;
use fake_upstream::{FakeUpstream, Reply};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Instant;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

struct Ctx {
    acpx: PathBuf,
    env: Vec<(String, String)>,
    cwd: PathBuf,
    name: String,
    t0: Instant,
}

impl Ctx {
    fn cmd(&self, tail: &[&str]) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(&self.acpx);
        c.args([
            "--format",
            "json",
            "--approve-reads",
            "--non-interactive-permissions",
            "deny",
            "--ttl",
            "600",
            "--cwd",
        ])
        .arg(&self.cwd)
        .arg("claude")
        .args(tail)
        .env_clear()
        .envs(self.env.clone())
        .process_group(0);
        c
    }
    fn t(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }
    /// Starts a prompt and returns once its result line was read (the client still runs).
    async fn prompt_until_result(&self, label: &str) -> (tokio::process::Child, i32) {
        let mut c = self.cmd(&["prompt", "-s", &self.name, "-f", "-"]);
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        let pid = child.id().unwrap() as i32;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"ping").await.unwrap();
        drop(stdin);
        let out = child.stdout.take().unwrap();
        let mut lines = BufReader::new(out).lines();
        let start = self.t();
        while let Some(l) = lines.next_line().await.unwrap() {
            if l.contains("\"result\"") && l.contains("stopReason") {
                println!(
                    "[{:.2}] {label}: result after {:.2}s: {}",
                    self.t(),
                    self.t() - start,
                    &l[..l.len().min(120)]
                );
                break;
            }
            if l.contains("\"error\"") {
                println!("[{:.2}] {label}: ERROR line {l}", self.t());
            }
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        (child, pid)
    }
    async fn finish(&self, label: &str, mut child: tokio::process::Child) {
        let mut err = String::new();
        let mut se = child.stderr.take().unwrap();
        let st = child.wait().await.unwrap();
        tokio::io::AsyncReadExt::read_to_string(&mut se, &mut err)
            .await
            .ok();
        println!(
            "[{:.2}] {label}: exit {:?} stderr: {}",
            self.t(),
            st.code(),
            err.trim().chars().take(300).collect::<String>()
        );
    }
    async fn full(&self, label: &str) {
        let (c, _) = self.prompt_until_result(label).await;
        self.finish(label, c).await;
    }
    fn owner(&self) -> String {
        let q = PathBuf::from(
            self.env
                .iter()
                .find(|(k, _)| k == "HOME")
                .unwrap()
                .1
                .clone(),
        )
        .join(".acpx/queues");
        let mut s = String::new();
        if let Ok(rd) = std::fs::read_dir(&q) {
            for e in rd.flatten() {
                if e.path().extension().map(|x| x == "lock").unwrap_or(false) {
                    let v: serde_json::Value = serde_json::from_str(
                        &std::fs::read_to_string(e.path()).unwrap_or_default(),
                    )
                    .unwrap_or_default();
                    s += &format!("owner pid {} hb {} ", v["pid"], v["heartbeatAt"]);
                }
            }
        }
        s
    }
}

#[tokio::main]
async fn main() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let bin = repo.join(".agents/node_modules/.bin");
    let fake = FakeUpstream::start().await;
    fake.set_default_reply(Reply::text("pong"));
    let home = tempfile::tempdir().unwrap();
    let env = fake.agent_env(home.path(), &bin);
    let cwd = tempfile::tempdir().unwrap();
    let ctx = Ctx {
        acpx: bin.join("acpx"),
        env,
        cwd: cwd.path().to_path_buf(),
        name: "probe".into(),
        t0: Instant::now(),
    };
    let st = ctx
        .cmd(&["sessions", "ensure", "--name", "probe"])
        .stdout(Stdio::null())
        .status()
        .await
        .unwrap();
    println!("ensure {:?}", st.code());
    ctx.full("warmup").await;
    println!("{}", ctx.owner());
    let scen = std::env::var("SCEN").unwrap_or_else(|_| "join,wait,kill,wait,cancel,wait".into());
    for s in scen.split(',') {
        println!("=== scenario {s}");
        match s {
            "join" => {
                // next client starts while the first trails
                let (c1, _) = ctx.prompt_until_result("p1").await;
                let (c2, _) = ctx.prompt_until_result("p2").await;
                ctx.finish("p1", c1).await;
                ctx.finish("p2", c2).await;
            }
            "wait" => {
                // next client starts once the first exited
                let (c1, _) = ctx.prompt_until_result("p1").await;
                ctx.finish("p1", c1).await;
                ctx.full("p2").await;
            }
            "kill" | "term" => {
                // the trailing client's group is signalled (server shutdown, group kill)
                let sig = if s == "kill" {
                    nix::sys::signal::Signal::SIGKILL
                } else {
                    nix::sys::signal::Signal::SIGTERM
                };
                let (c1, pid) = ctx.prompt_until_result("p1").await;
                nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), sig).unwrap();
                ctx.finish("p1", c1).await;
                println!("{}", ctx.owner());
                ctx.full("p2").await;
            }
            "cancel" => {
                // cancel arrives after the result, while the client trails
                let (c1, _) = ctx.prompt_until_result("p1").await;
                let o = ctx.cmd(&["cancel", "-s", "probe"]).output().await.unwrap();
                println!(
                    "[{:.2}] cancel exit {:?} {}",
                    ctx.t(),
                    o.status.code(),
                    String::from_utf8_lossy(&o.stdout).trim()
                );
                ctx.finish("p1", c1).await;
                println!("{}", ctx.owner());
                ctx.full("p2").await;
            }
            _ => {}
        }
        println!("{}", ctx.owner());
    }
    let _ = ctx.cmd(&["sessions", "close", "probe"]).output().await;
}
