//! The accept loop and each connection's life: what stands between a TCP peer and the router.
//!
//! axum's own `serve` has no head, body or idle timeouts, no connection cap and runs the
//! allowlist only after a whole head was read, so slow or idle sockets from anywhere could
//! pin memory and file descriptors without a token. Here:
//! - a permit of `CLAWDFORGE_MAX_CONNECTIONS` is taken *before* `accept`, so beyond the cap
//!   new connections wait in the kernel's backlog instead of costing an fd and a buffer;
//! - a peer that is neither allowed (`ALLOW_CIDRS`, loopback) nor a trusted proxy is dropped
//!   as soon as it is accepted, before a byte is read;
//! - hyper's `header_read_timeout` bounds a head and, because hyper restarts it when it
//!   waits for the next request, an idle keep-alive connection too; heads are capped at
//!   [`MAX_HEAD_BYTES`];
//! - a request body that delivers nothing for `CLAWDFORGE_BODY_TIMEOUT_SECS` fails, and the
//!   request is answered 408 `timeout` whatever the handler made of the failed read;
//! - a peer that goes while its request is in flight drops the connection (see `conn`);
//! - on shutdown, connections with nothing in flight close at once, the others after their
//!   answer, all within the grace period.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body as AxumBody;
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderValue, Request};
use axum::response::IntoResponse;
use axum::Router;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::auth::{ip_allowed, AllowList};
use crate::error::ApiError;
use crate::http::conn::{ClientGone, Guarded, InFlight, Socket};

/// The largest request head (request line and headers). hyper's default (~400 KB) let 2000
/// slow sockets hold 800 MB; real clients send a few KB.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// How long to back off after `accept` fails (out of fds, say) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What the loop enforces; from the settings of "Connections and slow clients".
#[derive(Debug, Clone)]
pub struct Limits {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub max_connections: usize,
    pub allow_cidrs: AllowList,
    pub trusted_proxies: AllowList,
}

impl Limits {
    /// Whether a peer may send us anything at all: the same test the allowlist middleware
    /// makes later, except that a trusted proxy is let in to have its forwarded address
    /// judged.
    fn admits(&self, peer: SocketAddr) -> bool {
        ip_allowed(peer.ip(), &self.allow_cidrs) || self.trusted_proxies.contains(peer.ip())
    }
}

/// Accepts and serves connections until `stop` is cancelled, then waits up to `grace` for
/// the connections with an answer in flight; what is still open then is dropped.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    stop: CancellationToken,
    grace: Duration,
) {
    let limits = Arc::new(limits);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            Some(_) = conns.join_next() => continue,
            accepted = async {
                let permit = permits.clone().acquire_owned().await;
                (permit, listener.accept().await)
            } => accepted,
        };
        let (tcp, peer) = match accepted {
            (Ok(permit), Ok((tcp, peer))) => (tcp, (permit, peer)),
            (_, Err(e)) => {
                tracing::warn!(error = %e, "accept failed; backing off");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
            // The semaphore is never closed.
            (Err(_), _) => break,
        };
        let (permit, peer) = peer;
        if !limits.admits(peer) {
            tracing::debug!(%peer, "dropped a connection from outside the allowlist");
            drop(tcp);
            continue;
        }
        let (router, limits, stop) = (router.clone(), limits.clone(), stop.clone());
        conns.spawn(async move {
            serve_connection(tcp, peer, router, &limits, stop).await;
            drop(permit);
        });
    }
    drop(listener);
    let drained =
        tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            open = conns.len(),
            "in-flight requests did not finish in time; closing anyway"
        );
        conns.shutdown().await;
    }
}

async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    router: Router,
    limits: &Limits,
    stop: CancellationToken,
) {
    let socket = Socket::new(tcp);
    let gone = ClientGone::default();
    let in_flight = InFlight::default();
    let body_timeout = limits.body_timeout;
    let service = {
        let (gone, in_flight) = (gone.clone(), in_flight.clone());
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let guard = in_flight.enter();
            let stalled = Arc::new(AtomicBool::new(false));
            let mut req = req.map(|body| {
                AxumBody::new(StallTimeout {
                    inner: body,
                    timeout: body_timeout,
                    sleep: None,
                    stalled: stalled.clone(),
                })
            });
            req.extensions_mut().insert(ConnectInfo(peer));
            req.extensions_mut().insert(gone.clone());
            let router = router.clone();
            async move {
                let res = match router.oneshot(req).await {
                    Ok(res) => res,
                    Err(never) => match never {},
                };
                let res = if stalled.load(Ordering::SeqCst) {
                    // The handler saw a failed read and answered as it does for a broken
                    // body; the client is told what really happened. The rest of the body
                    // is never read, so the connection cannot be reused.
                    let mut res = ApiError::BodyTimeout.into_response();
                    res.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                    res
                } else {
                    res
                };
                Ok::<_, Infallible>(res.map(|inner| Guarded { inner, guard }))
            }
        })
    };
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD_BYTES);
    let conn = http.serve_connection(TokioIo::new(socket.io()), service);
    tokio::pin!(conn);
    let peer_gone = socket.peer_gone();
    tokio::pin!(peer_gone);
    let (mut watching, mut draining) = (true, false);
    loop {
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = &mut peer_gone, if watching => {
                watching = false;
                // With nothing in flight hyper reads the EOF itself once it has taken what
                // was buffered; with a request in flight it may never look again.
                if in_flight.any() {
                    tracing::info!(%peer, "client hung up with a request in flight");
                    gone.0.cancel();
                    return;
                }
            }
            _ = stop.cancelled(), if !draining => {
                draining = true;
                if !in_flight.any() {
                    return;
                }
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// A request body that fails when no byte arrives for `timeout` while it is being read,
/// and says so in `stalled`.
struct StallTimeout {
    inner: Incoming,
    timeout: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    stalled: Arc<AtomicBool>,
}

/// The error a stalled body reads as.
#[derive(Debug, thiserror::Error)]
#[error("the request body stalled")]
struct BodyStalled;

impl Body for StallTimeout {
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.sleep = None;
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let timeout = this.timeout;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if sleep.as_mut().poll(cx).is_ready() {
            this.stalled.store(true, Ordering::SeqCst);
            return Poll::Ready(Some(Err(BodyStalled.into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
