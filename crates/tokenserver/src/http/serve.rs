//! Serving a listener with bounded connections: at most `max_connections` at once (further
//! clients wait in the kernel's accept queue, so a flood of one listener never takes the file
//! descriptors the other needs), a connection that starts a request must send its headers within
//! `header_read_timeout`, one idle between requests for `idle_timeout` is closed, and a request
//! body must arrive within `body_timeout` (else 408).
//!
//! hyper's own header timer starts when a connection begins waiting for its next request, so it
//! would also close idle keep-alive connections after the header bound. The two are kept apart
//! here: the connection's reads and its requests are watched ([`Activity`]) and a watchdog closes
//! it when either bound passes.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tower::Service;

use crate::config::Limits;

/// What a connection is doing, as its reads and its requests say.
#[derive(Debug)]
struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    /// Ms since `opened` when the last request ended (or the connection opened).
    idle_since: AtomicU64,
    /// Ms since `opened` of the first byte read while no request was in flight; [`NONE`] when
    /// none has been.
    head_started: AtomicU64,
    /// Wakes the watchdog when a deadline moves (a request begins to arrive, or one ended).
    changed: tokio::sync::Notify,
}

const NONE: u64 = u64::MAX;

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_started: AtomicU64::new(NONE),
            changed: tokio::sync::Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(NONE - 1)
    }

    fn bytes_read(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0 && self.head_started.load(Ordering::Relaxed) == NONE {
            self.head_started.store(self.now_ms(), Ordering::Relaxed);
            self.changed.notify_one();
        }
    }

    fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.head_started.store(NONE, Ordering::Relaxed);
    }

    fn request_ended(&self) {
        self.idle_since.store(self.now_ms(), Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.changed.notify_one();
    }
}

/// Why the watchdog ends a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expired {
    /// A request's headers took too long: close at once.
    Headers,
    /// Idle too long: close once nothing is in flight.
    Idle,
}

/// Resolves when the connection has outlived one of its bounds.
async fn watchdog(activity: &Activity, limits: &Limits) -> Expired {
    let header_ms = u64::try_from(limits.header_read_timeout.as_millis()).unwrap_or(NONE - 1);
    let idle_ms = u64::try_from(limits.idle_timeout.as_millis()).unwrap_or(NONE - 1);
    loop {
        let now = activity.now_ms();
        let wait_ms = if activity.in_flight.load(Ordering::Relaxed) > 0 {
            // Requests are bounded by the body timeout and their handlers' own timeouts.
            idle_ms
        } else {
            let head = activity.head_started.load(Ordering::Relaxed);
            if head != NONE {
                let due = head.saturating_add(header_ms);
                if now >= due {
                    return Expired::Headers;
                }
                due - now
            } else {
                let due = activity.idle_since.load(Ordering::Relaxed).saturating_add(idle_ms);
                if now >= due {
                    return Expired::Idle;
                }
                due - now
            }
        };
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(wait_ms.max(1))) => {}
            () = activity.changed.notified() => {}
        }
    }
}

pin_project_lite::pin_project! {
    /// A connection's socket, telling its [`Activity`] of every read.
    struct Watched<IO> {
        #[pin]
        io: IO,
        activity: Arc<Activity>,
    }
}

impl<IO: AsyncRead> AsyncRead for Watched<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let out = this.io.poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.bytes_read();
        }
        out
    }
}

impl<IO: AsyncWrite> AsyncWrite for Watched<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

pin_project_lite::pin_project! {
    /// A request body that must be complete by a deadline.
    struct DeadlineBody {
        #[pin]
        inner: Incoming,
        #[pin]
        deadline: tokio::time::Sleep,
        expired: Arc<AtomicBool>,
    }
}

/// The error a body past its deadline ends with.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
struct BodyTimedOut;

impl http_body::Body for DeadlineBody {
    type Data = hyper::body::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(axum::BoxError::from)));
        }
        if this.deadline.poll(cx).is_ready() {
            this.expired.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(Box::new(BodyTimedOut))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The router of a listener as hyper calls it: requests are counted in the connection's
/// [`Activity`], and bodies given their deadline.
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    body_timeout: Duration,
}

pin_project_lite::pin_project! {
    /// A request's response future; the request ends (for the idle bound) when it completes or
    /// is dropped.
    struct TrackedFuture<F> {
        #[pin]
        inner: F,
        ended: RequestEnd,
        expired: Option<Arc<AtomicBool>>,
    }
}

/// Ends a request in its connection's [`Activity`] once, when dropped.
struct RequestEnd(Arc<Activity>);

impl Drop for RequestEnd {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

impl<F: Future<Output = Result<Response, Infallible>>> Future for TrackedFuture<F> {
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        if this.expired.as_ref().is_some_and(|e| e.load(Ordering::Relaxed)) {
            // The handler saw its body fail; say why.
            return Poll::Ready(Ok((StatusCode::REQUEST_TIMEOUT, "request body timed out\n").into_response()));
        }
        Poll::Ready(out)
    }
}

impl<S> Service<hyper::Request<Incoming>> for Tracked<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = TrackedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: hyper::Request<Incoming>) -> Self::Future {
        self.activity.request_started();
        let ended = RequestEnd(self.activity.clone());
        let (req, expired) = if http_body::Body::is_end_stream(req.body()) {
            (req.map(Body::new), None)
        } else {
            let expired = Arc::new(AtomicBool::new(false));
            let deadline = tokio::time::sleep(self.body_timeout);
            let flag = expired.clone();
            (req.map(|inner| Body::new(DeadlineBody { inner, deadline, expired: flag })), Some(expired))
        };
        TrackedFuture { inner: self.inner.call(req), ended, expired }
    }
}

/// Serves `service` on `listener` within `limits` until `stop` turns true; then stops accepting,
/// lets every connection finish its requests, and returns.
pub async fn serve<S>(listener: TcpListener, service: S, limits: Limits, mut stop: watch::Receiver<bool>)
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let max = limits.max_connections.max(1);
    let slots = Arc::new(Semaphore::new(max));
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot,
            _ = stop.wait_for(|s| *s) => break,
        };
        let Ok(slot) = slot else { break };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|s| *s) => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                // EMFILE/ENFILE and the like: wait for descriptors to free up.
                tracing::warn!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::new());
        let io = TokioIo::new(Watched { io: stream, activity: activity.clone() });
        let svc = hyper_util::service::TowerToHyperService::new(Tracked {
            inner: service.clone(),
            activity: activity.clone(),
            body_timeout: limits.body_timeout,
        });
        let builder = builder.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let conn = builder.serve_connection_with_upgrades(io, svc);
            tokio::pin!(conn);
            let graceful = tokio::select! {
                _ = conn.as_mut() => false,
                expired = watchdog(&activity, &limits) => expired == Expired::Idle,
                _ = stop.wait_for(|s| *s) => true,
            };
            if graceful {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
            drop(slot);
        });
    }
    // Closed now: new connections are refused (a load balancer moves on) rather than left in the
    // backlog while the open ones finish.
    drop(listener);
    // Every connection holds a slot until it ends: taking them all waits for the last one.
    let _ = slots.acquire_many(u32::try_from(max).unwrap_or(u32::MAX)).await;
}
