//! One client connection's socket, as hyper sees it, plus what the serve loop learns from
//! it that hyper does not tell: whether the peer has gone while a request is in flight, and
//! whether an answer being written is hyper's own bodiless error page.
//!
//! Why a wrapper at all:
//! - hyper stops reading the socket once a request's body is read *and* bytes of a next
//!   request are already buffered (one stray CRLF after the body is enough). It then never
//!   sees the peer's EOF or RST, so a hung-up client's run went on to its timeout. Here the
//!   socket is read ahead (bounded, [`READ_AHEAD`]) into a buffer hyper drains, so EOF and
//!   errors are seen whatever hyper is waiting for.
//! - hyper answers a head it cannot parse (400), an over-long URI (414) or a head over its
//!   buffer (431) itself, with an empty body, and offers no hook. Every answer of this
//!   server is the JSON envelope, so such a head is recognised as it is written (a 4xx with
//!   `content-length: 0`, which no route of ours sends) and replaced by the envelope.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll, Waker};

use bytes::{Buf, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;

/// Bytes read ahead of hyper. Past this, reading pauses until hyper takes some, so a peer
/// that pipelines more than this during a run is again only noticed by hyper.
const READ_AHEAD: usize = 16 * 1024;

/// Cancelled when the peer of this request's connection has gone (EOF or a socket error)
/// while a request was in flight. The serve loop also drops the connection then, which
/// drops the handler and any SSE body (how runs and turns learn of a hang-up today); work
/// that runs detached from the handler can watch this instead. In every request's
/// extensions.
#[derive(Debug, Clone, Default)]
pub struct ClientGone(pub CancellationToken);

impl ClientGone {
    pub async fn gone(&self) {
        self.0.cancelled().await
    }

    pub fn is_gone(&self) -> bool {
        self.0.is_cancelled()
    }
}

/// What the socket has delivered that hyper has not taken yet.
#[derive(Default)]
struct ReadState {
    buf: BytesMut,
    eof: bool,
    error: Option<io::ErrorKind>,
    /// The watcher, parked because the buffer is full; woken when hyper drains it.
    parked: Option<Waker>,
}

impl ReadState {
    fn ended(&self) -> bool {
        self.eof || self.error.is_some()
    }
}

/// The socket, shared by hyper's side ([`ConnIo`]) and the watcher ([`Socket::peer_gone`]).
/// Both are polled from the connection's one task, so the lock is never contended.
#[derive(Clone)]
pub struct Socket {
    tcp: Arc<TcpStream>,
    read: Arc<Mutex<ReadState>>,
}

impl Socket {
    pub fn new(tcp: TcpStream) -> Socket {
        Socket {
            tcp: Arc::new(tcp),
            read: Arc::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ReadState> {
        // A poisoned lock only means a panic elsewhere mid-copy; the bytes are still valid.
        self.read.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads what the socket has into the buffer; Ready once something was read or the
    /// stream ended, Pending when the socket has nothing.
    fn fill(&self, st: &mut ReadState, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if st.ended() {
                return Poll::Ready(());
            }
            match self.tcp.poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => {
                    st.error = Some(e.kind());
                    return Poll::Ready(());
                }
                Poll::Ready(Ok(())) => {}
            }
            st.buf
                .reserve(READ_AHEAD.saturating_sub(st.buf.len()).max(1024));
            match self.tcp.try_read_buf(&mut st.buf) {
                Ok(0) => st.eof = true,
                Ok(_) => return Poll::Ready(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => st.error = Some(e.kind()),
            }
        }
    }

    /// Resolves when the peer has closed or reset the connection. Meant to be polled beside
    /// the hyper connection for its whole life.
    pub async fn peer_gone(&self) {
        std::future::poll_fn(|cx| {
            let mut st = self.lock();
            loop {
                if st.ended() {
                    return Poll::Ready(());
                }
                if st.buf.len() >= READ_AHEAD {
                    st.parked = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                ready!(self.fill(&mut st, cx));
            }
        })
        .await
    }

    /// hyper's side of this socket.
    pub fn io(&self) -> ConnIo {
        ConnIo {
            socket: self.clone(),
            replacement: None,
        }
    }
}

/// The socket as hyper reads and writes it.
pub struct ConnIo {
    socket: Socket,
    /// An envelope being written in place of hyper's own error head: (bytes, written).
    replacement: Option<(Vec<u8>, usize)>,
}

impl AsyncRead for ConnIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut st = this.socket.lock();
        if st.buf.is_empty() {
            ready!(this.socket.fill(&mut st, cx));
        }
        if !st.buf.is_empty() {
            let n = st.buf.len().min(out.remaining());
            out.put_slice(&st.buf[..n]);
            st.buf.advance(n);
            if let Some(w) = st.parked.take() {
                w.wake();
            }
            return Poll::Ready(Ok(()));
        }
        match st.error {
            Some(kind) => Poll::Ready(Err(kind.into())),
            None => Poll::Ready(Ok(())), // EOF
        }
    }
}

impl ConnIo {
    /// Writes what is left of a replacement; Ready(Ok) once it is all out.
    fn drain_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, done)) = &mut self.replacement {
            if *done >= bytes.len() {
                self.replacement = None;
                break;
            }
            ready!(self.socket.tcp.poll_write_ready(cx))?;
            match self.socket.tcp.try_write(&bytes[*done..]) {
                Ok(n) => *done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.drain_replacement(cx))?;
        if let Some(envelope) = envelope_for_hyper_error(buf) {
            this.replacement = Some((envelope, 0));
            ready!(this.drain_replacement(cx))?;
            // hyper's own bytes count as written: they were replaced, not lost.
            return Poll::Ready(Ok(buf.len()));
        }
        loop {
            ready!(this.socket.tcp.poll_write_ready(cx))?;
            match this.socket.tcp.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().drain_replacement(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.drain_replacement(cx))?;
        let shut = socket2::SockRef::from(&*this.socket.tcp).shutdown(std::net::Shutdown::Write);
        Poll::Ready(match shut {
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            other => other,
        })
    }

    // Not vectored, so hyper flattens each answer's head into one buffer, which is what
    // `envelope_for_hyper_error` looks at.
    fn is_write_vectored(&self) -> bool {
        false
    }
}

/// If `buf` is exactly one of hyper's automatic error answers (status 400, 414 or 431, no
/// body), the envelope to send instead, with the same status. Our own answers always carry
/// a JSON body, so a bodiless 4xx head can only come from hyper's parser.
fn envelope_for_hyper_error(buf: &[u8]) -> Option<Vec<u8>> {
    if !buf.ends_with(b"\r\n\r\n") {
        return None;
    }
    let (status, error) = match buf.strip_prefix(b"HTTP/1.1 ")?.get(..4)? {
        b"400 " => (
            "400 Bad Request",
            ApiError::bad_request("the request could not be parsed as HTTP/1.1"),
        ),
        b"414 " => (
            "414 URI Too Long",
            ApiError::TooLarge("the request line is too long".into()),
        ),
        b"431 " => (
            "431 Request Header Fields Too Large",
            ApiError::TooLarge("the request head is too large".into()),
        ),
        _ => return None,
    };
    let head = std::str::from_utf8(buf).ok()?.to_ascii_lowercase();
    if !head.contains("\r\ncontent-length: 0\r\n") {
        return None;
    }
    let body = serde_json::to_vec(&error.body()).ok()?;
    let mut out = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    Some(out)
}

/// Requests of one connection that have been handed to the router and whose answer body
/// has not finished (or been dropped) yet.
#[derive(Debug, Clone, Default)]
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    pub fn enter(&self) -> InFlightGuard {
        self.0.fetch_add(1, Ordering::SeqCst);
        InFlightGuard(self.0.clone())
    }

    pub fn any(&self) -> bool {
        self.0.load(Ordering::SeqCst) > 0
    }
}

#[derive(Debug)]
pub struct InFlightGuard(Arc<AtomicUsize>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An answer body that keeps its request counted as in flight until it is done.
pub struct Guarded<B> {
    pub inner: B,
    pub guard: InFlightGuard,
}

impl<B: Body + Unpin> Body for Guarded<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hyper_error_heads_become_the_envelope() {
        let hyper_431 = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Tue, 01 Dec 2026 18:00:00 GMT\r\n\r\n";
        let out = String::from_utf8(envelope_for_hyper_error(hyper_431).unwrap()).unwrap();
        assert!(out.starts_with("HTTP/1.1 431 "), "{out}");
        assert!(out.ends_with(r#""code":"too_large"}"#), "{out}");
        let hyper_400 = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n";
        let out = String::from_utf8(envelope_for_hyper_error(hyper_400).unwrap()).unwrap();
        assert!(out.contains(r#""code":"bad_request""#), "{out}");
        // Our own answers (with a body) and other statuses pass through.
        assert!(envelope_for_hyper_error(
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 60\r\n\r\n{\"ok\":false}"
        )
        .is_none());
        assert!(
            envelope_for_hyper_error(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none()
        );
    }
}
