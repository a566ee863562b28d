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

/// Why a trusted proxy's `X-Forwarded-For` could not be read. Such a request is refused:
/// falling back to the proxy's own (often loopback) address would let any client behind it
/// in by sending a header the parser rejects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardedError {
    #[error("X-Forwarded-For is not ASCII")]
    NotText,
    #[error("X-Forwarded-For has an empty entry")]
    Empty,
    #[error("X-Forwarded-For entry {0:?} is not an IP address")]
    Unparseable(String),
}

/// The address the allowlists judge: see the module comment. A trusted proxy's header that
/// cannot be read up to the client's entry is an error, never the proxy's own address.
pub fn client_ip(
    peer: IpAddr,
    headers: &HeaderMap,
    trusted_proxies: &AllowList,
) -> Result<IpAddr, ForwardedError> {
    let peer = canonical(peer);
    if trusted_proxies.is_empty() || !trusted_proxies.contains(peer) {
        return Ok(peer);
    }
    // Walk the chain right to left: each hop was appended by the proxy before it. The first
    // entry not belonging to a trusted proxy is the client. An entry that cannot be read
    // before that point hides who the client is, so the request is refused.
    let mut client = peer;
    for value in headers.get_all("x-forwarded-for").iter().rev() {
        let text = value.to_str().map_err(|_| ForwardedError::NotText)?;
        for part in text.rsplit(',') {
            let ip = canonical(parse_forwarded_ip(part.trim())?);
            if !trusted_proxies.contains(ip) {
                return Ok(ip);
            }
            client = ip;
        }
    }
    Ok(client)
}

/// One entry: an address, optionally with a port (`1.2.3.4:80`, `[::1]:80`). Std's parser
/// already refuses what is ambiguous: octets with leading zeros (`010.001.002.003`, which
/// some parsers read as octal), zone ids (`fe80::1%eth0`), and names like `unknown`.
fn parse_forwarded_ip(s: &str) -> Result<IpAddr, ForwardedError> {
    if s.is_empty() {
        return Err(ForwardedError::Empty);
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(ip);
    }
    s.parse::<std::net::SocketAddr>()
        .map(|sa| sa.ip())
        .map_err(|_| ForwardedError::Unparseable(s.chars().take(64).collect()))
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
            Ok("203.0.113.7".parse::<IpAddr>().unwrap())
        );
        // Untrusted peer: the header is ignored.
        let peer: IpAddr = "192.168.1.5".parse().unwrap();
        assert_eq!(client_ip(peer, &h, &proxies), Ok(peer));
        // No proxies configured: a loopback peer's header is ignored too.
        let peer: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(client_ip(peer, &h, &AllowList::default()), Ok(peer));
        // Garbage before the client's entry hides the client: refused.
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("nonsense, 10.0.0.3"),
        );
        assert!(client_ip(peer, &h, &proxies).is_err());
        // Garbage left of the client's entry is the client's own business.
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("nonsense, 203.0.113.7"),
        );
        assert_eq!(
            client_ip(peer, &h, &proxies),
            Ok("203.0.113.7".parse::<IpAddr>().unwrap())
        );
        // A proxy forwarding nothing is the client itself.
        assert_eq!(client_ip(peer, &HeaderMap::new(), &proxies), Ok(peer));
    }

    #[test]
    fn unreadable_forwarded_for_is_an_error_never_the_proxy() {
        let proxies = list(&["127.0.0.1/32"]);
        let peer: IpAddr = "127.0.0.1".parse().unwrap();
        let bad: &[&[u8]] = &[
            b"\xc3\xa9, 203.0.113.5",
            b"203.0.113.5,",
            b"",
            b" ",
            b"garbage",
            b"unknown",
            b"fe80::1%eth0",
            b"010.001.002.003",
            b"203.0.113.5, ,",
        ];
        for raw in bad {
            let mut h = HeaderMap::new();
            h.insert("x-forwarded-for", HeaderValue::from_bytes(raw).unwrap());
            assert!(
                client_ip(peer, &h, &proxies).is_err(),
                "{:?} must be refused",
                String::from_utf8_lossy(raw)
            );
        }
    }
}
