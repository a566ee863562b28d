//! Who is calling and from where: app tokens (minting, hashing, lookup, revocation), the
//! admin bearer, and the CIDR allowlist with the client address behind trusted proxies.

pub mod net;
pub mod tokens;

pub use net::{client_ip, ip_allowed, AllowList};
pub use tokens::{hash_token, mint_plaintext, TokenRecord};
