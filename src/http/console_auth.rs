//! The operator console's sign-in: server-side sessions named by an `HttpOnly`,
//! `SameSite=Strict` cookie, a CSRF token per session for every state change, and a limit
//! on failed sign-ins per client address.
//!
//! Sessions live in memory: a restart signs the operator out, which is the safe direction
//! for an appliance whose only admin credential is the bootstrap bearer. The cookie is only
//! a capability for the admin routes; the CSRF token is handed to the console's own script
//! (`GET /console/session`), which the same-origin policy keeps from other sites' pages.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method};
use subtle::ConstantTimeEq;

use crate::auth::hash_token;
use crate::error::ApiError;
use crate::util::random_base62;

/// The cookie naming a console session.
pub const COOKIE: &str = "cf_console";
/// The header a state-changing console request carries its CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a session lasts after sign-in (not extended by use).
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Failed sign-ins from one address within [`FAILURE_WINDOW`] that block it.
const MAX_FAILURES: usize = 5;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// How long a blocked address gets 429.
const BLOCK_FOR: Duration = Duration::from_secs(60);
/// Bounds on what memory an attacker (or a forgetful operator) can make the maps hold.
const MAX_SESSIONS: usize = 256;
const MAX_TRACKED_ADDRESSES: usize = 10_000;

struct Session {
    csrf: String,
    expires: Instant,
    /// Wall-clock expiry, for the console to show.
    expires_at_ms: i64,
}

#[derive(Default)]
struct Failures {
    recent: Vec<Instant>,
    blocked_until: Option<Instant>,
}

#[derive(Default)]
struct Inner {
    /// Keyed by the SHA-256 of the cookie value, so a lookup's timing says nothing useful.
    sessions: HashMap<String, Session>,
    failures: HashMap<IpAddr, Failures>,
}

/// The console's sessions and sign-in limiter, shared by every request (an axum extension).
#[derive(Clone, Default)]
pub struct ConsoleSessions(Arc<Mutex<Inner>>);

/// A new session: the cookie value (shown to the browser once) and its CSRF token.
pub struct NewSession {
    pub id: String,
    pub csrf: String,
    pub expires_at_ms: i64,
}

/// What `GET /console/session` tells the console's script.
pub struct SessionInfo {
    pub csrf: String,
    pub expires_at_ms: i64,
}

impl ConsoleSessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A poisoned lock only means a panic elsewhere mid-update of plain maps; the data
        // is still usable.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `Some(seconds)` while `ip` is blocked after too many failed sign-ins.
    pub fn blocked(&self, ip: IpAddr) -> Option<u64> {
        let now = Instant::now();
        let inner = self.lock();
        let until = inner.failures.get(&ip)?.blocked_until?;
        (until > now).then(|| until.duration_since(now).as_secs().max(1))
    }

    /// Counts a failed sign-in; the fifth within a minute blocks the address for a minute.
    pub fn note_failure(&self, ip: IpAddr) {
        let now = Instant::now();
        let mut inner = self.lock();
        if inner.failures.len() >= MAX_TRACKED_ADDRESSES && !inner.failures.contains_key(&ip) {
            inner.failures.retain(|_, f| {
                f.blocked_until.is_some_and(|u| u > now)
                    || f.recent
                        .iter()
                        .any(|t| now.duration_since(*t) < FAILURE_WINDOW)
            });
        }
        let f = inner.failures.entry(ip).or_default();
        f.recent.retain(|t| now.duration_since(*t) < FAILURE_WINDOW);
        f.recent.push(now);
        if f.recent.len() >= MAX_FAILURES {
            f.blocked_until = Some(now + BLOCK_FOR);
            f.recent.clear();
        }
    }

    /// Starts a session (dropping expired ones, and the oldest beyond the cap).
    pub fn create(&self) -> NewSession {
        let id = random_base62("", 43);
        let csrf = random_base62("", 43);
        let now = Instant::now();
        let expires_at_ms = crate::util::now_ms() + SESSION_TTL.as_millis() as i64;
        let mut inner = self.lock();
        inner.sessions.retain(|_, s| s.expires > now);
        if inner.sessions.len() >= MAX_SESSIONS {
            if let Some(oldest) = inner
                .sessions
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
            {
                inner.sessions.remove(&oldest);
            }
        }
        inner.sessions.insert(
            hash_token(&id),
            Session {
                csrf: csrf.clone(),
                expires: now + SESSION_TTL,
                expires_at_ms,
            },
        );
        NewSession {
            id,
            csrf,
            expires_at_ms,
        }
    }

    /// The live session named by `id`, if any.
    pub fn get(&self, id: &str) -> Option<SessionInfo> {
        let key = hash_token(id);
        let mut inner = self.lock();
        let live = inner
            .sessions
            .get(&key)
            .is_some_and(|s| s.expires > Instant::now());
        if !live {
            inner.sessions.remove(&key);
            return None;
        }
        inner.sessions.get(&key).map(|s| SessionInfo {
            csrf: s.csrf.clone(),
            expires_at_ms: s.expires_at_ms,
        })
    }

    pub fn remove(&self, id: &str) {
        self.lock().sessions.remove(&hash_token(id));
    }
}

/// The console cookie's value in a request, if it carries one.
pub fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim())
        .filter(|v| !v.is_empty())
}

/// The `Set-Cookie` value for a new session (`secure`: the browser reached us over TLS).
pub fn set_cookie(id: &str, secure: bool) -> HeaderValue {
    cookie_header(id, SESSION_TTL.as_secs(), secure)
}

/// The `Set-Cookie` value that makes the browser forget the session.
pub fn clear_cookie(secure: bool) -> HeaderValue {
    cookie_header("", 0, secure)
}

fn cookie_header(value: &str, max_age: u64, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    let cookie =
        format!("{COOKIE}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}");
    // Base62 ids and fixed attributes only: always a valid header value.
    HeaderValue::from_str(&cookie).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Whether a method changes state (and so needs the CSRF token).
fn changes_state(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Admin authentication by console cookie, for a request without a bearer: the session
/// must be live and, for a state change, the request must carry its CSRF token.
pub fn admin_by_cookie(parts: &Parts) -> Result<(), ApiError> {
    let sessions = parts
        .extensions
        .get::<ConsoleSessions>()
        .ok_or(ApiError::Unauthorized)?;
    let id = session_cookie(&parts.headers).ok_or(ApiError::Unauthorized)?;
    let session = sessions.get(id).ok_or(ApiError::Unauthorized)?;
    if changes_state(&parts.method) {
        check_csrf(&parts.headers, &session)?;
    }
    Ok(())
}

/// The request's CSRF header against the session's token, in constant time.
pub fn check_csrf(headers: &HeaderMap, session: &SessionInfo) -> Result<(), ApiError> {
    let given = headers
        .get(CSRF_HEADER)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if bool::from(given.ct_eq(session.csrf.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::Forbidden(
            "missing or wrong X-CSRF-Token for this console session".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fifth_failure_blocks_for_a_minute() {
        let s = ConsoleSessions::default();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..4 {
            s.note_failure(ip);
            assert_eq!(s.blocked(ip), None);
        }
        s.note_failure(ip);
        let secs = s.blocked(ip).expect("blocked");
        assert!((59..=60).contains(&secs), "{secs}");
        assert_eq!(s.blocked("192.0.2.2".parse().unwrap()), None);
    }

    #[test]
    fn cookies_are_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; cf_console=xyz; b=2"),
        );
        assert_eq!(session_cookie(&h), Some("xyz"));
        h.insert(header::COOKIE, HeaderValue::from_static("cf_consolex=1"));
        assert_eq!(session_cookie(&h), None);
    }

    #[test]
    fn a_removed_session_is_gone() {
        let s = ConsoleSessions::default();
        let new = s.create();
        assert_eq!(s.get(&new.id).map(|i| i.csrf), Some(new.csrf));
        s.remove(&new.id);
        assert!(s.get(&new.id).is_none());
    }
}
