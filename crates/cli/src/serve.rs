//! The HTTP/1.1 server loop: one hyper connection per client, with the
//! limits a server facing untrusted clients needs and `axum::serve` does not
//! set.
//!
//! - **Header read timeout**: a request head must arrive in full within it
//!   (hyper's timer, which also runs while a kept-alive connection waits for
//!   its next request); a client sending a byte at a time is cut off.
//! - **Idle timeout**: a connection with no request in flight and no byte
//!   moved for this long is closed. A request is in flight from its head
//!   until hyper has taken the last byte of its response, so a live stream
//!   is never idle.
//! - **Connection cap**: past it a new connection is answered `503
//!   too_many_connections` (JSON) and closed.
//! - **Shutdown**: connections with nothing in flight (idle, or a request
//!   still half-sent) are closed at once; the others finish their response
//!   (a stream ends once the node's turns have ended, with what they stored
//!   last), within a bound after the engine has stopped.
//! - **JSON errors before the router**: hyper answers a request it cannot
//!   parse (a garbage request line, a control byte or NUL in a header, a
//!   duplicate `Content-Length`, an oversized head or URI) itself, with an
//!   empty body. Those automatic answers are recognised on the way out (a
//!   `400`, `414` or `431` head with `content-length: 0` written while no
//!   request is in flight; Baton's own errors always have a body) and
//!   replaced by the JSON error. The connection closes after them, as hyper
//!   would. What hyper drops without answering (a header timeout, a
//!   connection reset) gets no answer.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// The largest request head (request line and headers), in bytes; past it
/// hyper answers `431`.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// How many refusals (at the connection cap) may be in progress at once;
/// past that a connection is closed without an answer.
const MAX_REFUSING: usize = 64;

/// The connection limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

/// Serves `router` on `listener` until `stop`, then lets connections with a
/// request in flight finish; `kill` drops every connection left.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    stop: CancellationToken,
    kill: CancellationToken,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_header_size(MAX_HEAD_BYTES);
    let http = Arc::new(http);
    // Held by each open connection: the cap.
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    match permits.clone().try_acquire_owned() {
                        Ok(permit) => {
                            conns.spawn(connection(
                                tcp, peer, router.clone(), http.clone(), limits,
                                stop.clone(), kill.clone(), permit,
                            ));
                        }
                        Err(_) => {
                            tracing::warn!(%peer, max = limits.max_connections, "connection refused: at the connection cap");
                            if let Ok(slot) = refusing.clone().try_acquire_owned() {
                                tokio::spawn(refuse(tcp, limits.max_connections, slot));
                            }
                        }
                    }
                }
                // Out of file descriptors, or a connection reset before it
                // was accepted: wait a moment rather than spin.
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}

#[allow(clippy::too_many_arguments)]
async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    router: Router,
    http: Arc<hyper::server::conn::http1::Builder>,
    limits: Limits,
    stop: CancellationToken,
    kill: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        tcp,
        activity: activity.clone(),
        out: Vec::new(),
        sent: 0,
    });
    let seen = activity.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let guard = InFlight::new(seen.clone());
        let router = router.clone();
        async move {
            let response = match router.oneshot(req.map(Body::new)).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            Ok::<_, Infallible>(response.map(|inner| Tracked {
                inner,
                _guard: guard,
            }))
        }
    });
    let conn = http.serve_connection(io, service);
    tokio::pin!(conn);
    let period = (limits.idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut draining = false;
    loop {
        tokio::select! {
            done = conn.as_mut() => {
                if let Err(e) = done {
                    tracing::debug!(%peer, error = %e, "connection ended");
                }
                return;
            }
            _ = stop.cancelled(), if !draining => {
                draining = true;
                // Nothing in flight: idle, or a request still half-sent.
                if !activity.busy() {
                    return;
                }
                conn.as_mut().graceful_shutdown();
            }
            _ = kill.cancelled() => return,
            _ = tick.tick() => {
                if !activity.busy()
                    && (draining || activity.idle_for() >= limits.idle_timeout)
                {
                    return;
                }
            }
        }
    }
}

/// Answers `503 too_many_connections` and closes.
async fn refuse(mut tcp: TcpStream, max: usize, _slot: OwnedSemaphorePermit) {
    let body = format!(
        "{{\"error\":{{\"code\":\"too_many_connections\",\"message\":\"the server holds its maximum of {max} connections; retry later\"}}}}"
    );
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        // Read what the client sent, and then until it closes: closing a
        // socket with unread data resets it, which can destroy the answer
        // before the client reads it.
        let mut buf = [0u8; 8192];
        let _ = tokio::time::timeout(Duration::from_millis(200), tcp.read(&mut buf)).await;
        tcp.write_all(response.as_bytes()).await?;
        tcp.shutdown().await?;
        while tcp.read(&mut buf).await? > 0 {}
        Ok::<_, io::Error>(())
    })
    .await;
}

/// A connection's activity, read by its watchdog.
struct Activity {
    start: Instant,
    /// Milliseconds after `start` when a byte last moved.
    last: AtomicU64,
    /// Requests whose response hyper has not yet taken in full.
    in_flight: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        self.last
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }

    fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
    }
}

/// Counts a request in flight while alive.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request in flight until hyper drops it.
struct Tracked {
    inner: Body,
    _guard: InFlight,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The socket, noting activity and replacing hyper's empty automatic error
/// answers with JSON ones.
struct Watched {
    tcp: TcpStream,
    activity: Arc<Activity>,
    /// A replacement answer still to be written, and how much of it was.
    out: Vec<u8>,
    sent: usize,
}

impl Watched {
    fn flush_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.out.len() {
            match Pin::new(&mut self.tcp).poll_write(cx, &self.out[self.sent..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.sent += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.out.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.tcp).poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.touch();
        }
        res
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.flush_out(cx))?;
        if !this.activity.busy() {
            if let Some(json) = json_answer_for(buf) {
                this.out = json;
                // Written by the next flush if the socket is full now.
                if let Poll::Ready(Err(e)) = this.flush_out(cx) {
                    return Poll::Ready(Err(e));
                }
                return Poll::Ready(Ok(buf.len()));
            }
        }
        let res = Pin::new(&mut this.tcp).poll_write(cx, buf);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        res
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.flush_out(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.flush_out(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

/// The JSON answer replacing one of hyper's automatic answers to an
/// unparseable request, if `head` is one: a whole `400`, `414` or `431`
/// head with `content-length: 0`.
fn json_answer_for(head: &[u8]) -> Option<Vec<u8>> {
    let rest = head.strip_prefix(b"HTTP/1.1 ")?;
    if !head.ends_with(b"\r\n\r\n")
        || !head
            .windows(21)
            .any(|w| w.eq_ignore_ascii_case(b"\r\ncontent-length: 0\r\n"))
    {
        return None;
    }
    let (status, code, message) = match rest.get(..4)? {
        b"400 " => (
            "400 Bad Request",
            "invalid_request",
            "the request could not be parsed: a malformed request line, a control character in a header, or a duplicate or invalid Content-Length",
        ),
        b"414 " => ("414 URI Too Long", "uri_too_long", "the request's URI is too long"),
        b"431 " => (
            "431 Request Header Fields Too Large",
            "header_too_large",
            "the request's head is larger than the server accepts",
        ),
        _ => return None,
    };
    let body = format!("{{\"error\":{{\"code\":\"{code}\",\"message\":\"{message}\"}}}}");
    Some(
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

#[cfg(test)]
mod tests {
    use super::json_answer_for;

    #[test]
    fn only_hyper_s_empty_automatic_answers_are_replaced() {
        let auto = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: Sat, 05 Dec 2026 12:00:00 GMT\r\n\r\n";
        let json = json_answer_for(auto).map(String::from_utf8);
        assert!(
            matches!(&json, Some(Ok(s)) if s.contains("\"code\":\"invalid_request\"")),
            "{json:?}"
        );
        let ours = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 60\r\n\r\n";
        assert!(json_answer_for(ours).is_none());
        let ok = b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n";
        assert!(json_answer_for(ok).is_none());
    }
}
