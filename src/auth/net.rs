//! Client addresses and allowlists. The client is the TCP peer, unless the peer is a trusted
//! proxy, in which case it is the right-most `X-Forwarded-For` entry that is not itself a
//! trusted proxy. Loopback clients are always allowed; IPv4-mapped IPv6 peers are treated
//! as the IPv4 address they carry.

use std::net::IpAddr;

use axum::http::HeaderMap;
use ipnetwork::IpNetwork;

/// A list of CIDRs to match addresses against.
#[derive(Debug, Clone, Default)]
pub struct AllowList(pub Vec<IpNetwork>);

impl AllowList {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0
            .iter()
            .any(|net| net.contains(ip) || mapped_net_contains(net, ip))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// `::ffff:a.b.c.d` becomes `a.b.c.d`, so one IPv4 CIDR covers both socket families.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// An operator who wrote an IPv4-mapped IPv6 CIDR (`::ffff:10.0.0.0/104`) means the IPv4
/// range; match canonical IPv4 addresses against it too.
fn mapped_net_contains(net: &IpNetwork, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpNetwork::V6(n), IpAddr::V4(v4)) => n.contains(v4.to_ipv6_mapped()),
        _ => false,
    }
}

/// The address the allowlists judge: see the module comment.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted_proxies: &AllowList) -> IpAddr {
    let peer = canonical(peer);
    if trusted_proxies.is_empty() || !trusted_proxies.contains(peer) {
        return peer;
    }
    // Walk the chain right to left: each hop was appended by the proxy before it. The first
    // entry not belonging to a trusted proxy is the client; unparseable entries end the walk
    // (we cannot trust anything to their left), leaving the last trusted hop as the client.
    let mut client = peer;
    for value in headers.get_all("x-forwarded-for").iter().rev() {
        let Ok(text) = value.to_str() else {
            return client;
        };
        for part in text.rsplit(',') {
            let Some(ip) = parse_forwarded_ip(part.trim()) else {
                return client;
            };
            let ip = canonical(ip);
            if !trusted_proxies.contains(ip) {
                return ip;
            }
            client = ip;
        }
    }
    client
}

fn parse_forwarded_ip(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    // "[::1]:1234" or "1.2.3.4:1234"
    s.parse::<std::net::SocketAddr>().ok().map(|sa| sa.ip())
}

/// Whether `ip` may talk to the server at all: loopback always, else the global list.
pub fn ip_allowed(ip: IpAddr, global: &AllowList) -> bool {
    canonical(ip).is_loopback() || global.contains(ip)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn list(s: &[&str]) -> AllowList {
        AllowList(s.iter().map(|c| c.parse().unwrap()).collect())
    }

    #[test]
    fn loopback_always_and_mapped_v4() {
        let empty = AllowList::default();
        assert!(ip_allowed("127.0.0.1".parse().unwrap(), &empty));
        assert!(ip_allowed("::1".parse().unwrap(), &empty));
        assert!(ip_allowed("::ffff:127.0.0.1".parse().unwrap(), &empty));
        assert!(!ip_allowed("10.1.2.3".parse().unwrap(), &empty));
        let g = list(&["10.0.0.0/8", "fd00::/8"]);
        assert!(ip_allowed("::ffff:10.1.2.3".parse().unwrap(), &g));
        assert!(ip_allowed("fd12::1".parse().unwrap(), &g));
        assert!(!ip_allowed("192.168.1.1".parse().unwrap(), &g));
        let mapped = list(&["::ffff:192.168.0.0/112"]);
        assert!(ip_allowed("192.168.0.9".parse().unwrap(), &mapped));
    }

    #[test]
    fn forwarded_for_only_from_trusted_proxies() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("1.1.1.1, 203.0.113.7, 10.0.0.2"),
        );
        let proxies = list(&["127.0.0.0/8", "10.0.0.0/24"]);
        let peer: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(
            client_ip(peer, &h, &proxies),
            "203.0.113.7".parse::<IpAddr>().unwrap()
        );
        // Untrusted peer: the header is ignored.
        let peer: IpAddr = "192.168.1.5".parse().unwrap();
        assert_eq!(client_ip(peer, &h, &proxies), peer);
        // No proxies configured: a loopback peer's header is ignored too.
        let peer: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(client_ip(peer, &h, &AllowList::default()), peer);
        // Garbage in the chain stops the walk at the last trusted hop.
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("nonsense, 10.0.0.3"),
        );
        assert_eq!(
            client_ip(peer, &h, &proxies),
            "10.0.0.3".parse::<IpAddr>().unwrap()
        );
    }
}
