//! The client address behind trusted proxies (`auth::net::client_ip`): `X-Forwarded-For`
//! values are whatever a client put there, and proxies' CIDRs come from configuration
//! strings. Nothing may panic, and the answer is the peer or an address from the header.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use arbitrary::Arbitrary;
use clawdforge::auth::net::{canonical, client_ip, ip_allowed, AllowList};
use http::{HeaderMap, HeaderValue};
use ipnetwork::IpNetwork;
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum Addr {
    V4([u8; 4]),
    V6([u8; 16]),
}

impl Addr {
    fn ip(&self) -> IpAddr {
        match self {
            Addr::V4(b) => IpAddr::V4(Ipv4Addr::from(*b)),
            Addr::V6(b) => IpAddr::V6(Ipv6Addr::from(*b)),
        }
    }
}

#[derive(Debug, Arbitrary)]
struct Input {
    peer: Addr,
    /// CIDRs as an operator writes them (parsed; the unparseable ones are skipped).
    proxy_texts: Vec<String>,
    /// And as address + prefix (invalid prefixes are skipped).
    proxy_nets: Vec<(Addr, u8)>,
    forwarded_for: Vec<Vec<u8>>,
}

/// Every address the header values could name, parsed as `client_ip` does.
fn header_addresses(headers: &HeaderMap) -> Vec<IpAddr> {
    headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|t| t.split(','))
        .filter_map(|p| {
            let p = p.trim();
            p.parse::<IpAddr>()
                .ok()
                .or_else(|| p.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
        })
        .map(canonical)
        .collect()
}

fuzz_target!(|input: Input| {
    let mut nets: Vec<IpNetwork> = input
        .proxy_texts
        .iter()
        .filter_map(|t| IpNetwork::from_str(t).ok())
        .collect();
    nets.extend(
        input
            .proxy_nets
            .iter()
            .filter_map(|(a, prefix)| IpNetwork::new(a.ip(), *prefix).ok()),
    );
    let proxies = AllowList(nets);
    let mut headers = HeaderMap::new();
    for v in &input.forwarded_for {
        if let Ok(v) = HeaderValue::from_bytes(v) {
            headers.append("x-forwarded-for", v);
        }
    }
    let peer = input.peer.ip();
    let client = client_ip(peer, &headers, &proxies);
    assert_eq!(canonical(client), client, "the answer is canonical");
    if proxies.is_empty() || !proxies.contains(peer) {
        assert_eq!(client, canonical(peer), "an untrusted peer is the client");
    } else {
        assert!(
            client == canonical(peer) || header_addresses(&headers).contains(&client),
            "{client} is neither the peer nor from the header"
        );
    }
    let _ = ip_allowed(client, &proxies);
    assert!(ip_allowed(IpAddr::V4(Ipv4Addr::LOCALHOST), &proxies));
});
