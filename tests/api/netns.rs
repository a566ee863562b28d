//! The allowlist end to end from a non-loopback address over a real socket: a network
//! namespace joined to this one by a veth pair (needs root, as CI has). Addresses come from
//! 198.18.0.0/15, the range set aside for benchmarking, and never leave the veth pair.

use std::process::Command;

use serde_json::json;

use crate::harness::TestServer;

struct Netns {
    name: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip(8) runs");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    fn create(tag: &str) -> Netns {
        let id = std::process::id() % 100_000;
        let name = format!("cf{tag}{id}");
        let (host, peer) = (format!("cfh{tag}{id}"), format!("cfn{tag}{id}"));
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = Netns { name: name.clone() };
        ip(&["link", "add", &host, "type", "veth", "peer", "name", &peer]);
        ip(&["link", "set", &peer, "netns", &name]);
        ip(&["addr", "add", "198.18.7.1/30", "dev", &host]);
        ip(&["link", "set", &host, "up"]);
        ip(&[
            "netns",
            "exec",
            &name,
            "ip",
            "addr",
            "add",
            "198.18.7.2/30",
            "dev",
            &peer,
        ]);
        ip(&["netns", "exec", &name, "ip", "link", "set", &peer, "up"]);
        ip(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"]);
        ns
    }

    /// GET `url` from inside the namespace (so from 198.18.7.2): the status code.
    async fn get(&self, url: &str, bearer: Option<&str>) -> u16 {
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.name,
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
        ]);
        if let Some(b) = bearer {
            cmd.args(["-H", &format!("Authorization: Bearer {b}")]);
        }
        let out = cmd.arg(url).output().await.unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace removes the veth pair with it.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[tokio::test]
async fn allowlist_from_a_real_non_loopback_peer() {
    if !is_root() {
        eprintln!("SKIPPED: network namespaces need root (CI runs as root)");
        return;
    }
    let ns = Netns::create("a");
    // Not allowed: ALLOW_CIDRS is empty, so only loopback may connect. The connection is
    // dropped as it is accepted: no answer at all (curl's status 000).
    let closed =
        TestServer::start_with(|c| c.settings.listen = "198.18.7.1:0".parse().unwrap()).await;
    assert_eq!(ns.get(&format!("{}/healthz", closed.url), None).await, 0);
    assert_eq!(ns.get(&format!("{}/nope", closed.url), None).await, 0);
    drop(closed);

    // A trusted proxy outside ALLOW_CIDRS is let in to have its forwarded address judged;
    // forwarding nothing, it is judged as itself (outside: 403 with the envelope).
    let proxied = TestServer::start_with(|c| {
        c.settings.listen = "198.18.7.1:0".parse().unwrap();
        c.settings.trusted_proxies = vec!["198.18.7.2/32".parse().unwrap()];
    })
    .await;
    assert_eq!(ns.get(&format!("{}/healthz", proxied.url), None).await, 403);
    drop(proxied);

    let open = TestServer::start_with(|c| {
        c.settings.listen = "198.18.7.1:0".parse().unwrap();
        c.settings.allow_cidrs = vec!["198.18.7.0/30".parse().unwrap()];
    })
    .await;
    assert_eq!(ns.get(&format!("{}/healthz", open.url), None).await, 200);
    let (_, mine) = open
        .mint_with(json!({"name": "ns", "ip_cidrs": ["198.18.7.2/32"]}))
        .await;
    let (_, elsewhere) = open
        .mint_with(json!({"name": "other", "ip_cidrs": ["198.18.7.3/32"]}))
        .await;
    assert_eq!(
        ns.get(&format!("{}/sessions", open.url), Some(&mine)).await,
        200
    );
    assert_eq!(
        ns.get(&format!("{}/sessions", open.url), Some(&elsewhere))
            .await,
        403
    );
}
