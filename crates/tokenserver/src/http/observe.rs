//! Per-request observability, one layer on each listener: a request id (the caller's
//! `X-Request-Id` when it is a plain token, else a fresh one) returned in `X-Request-Id` and
//! kept in a task-local while the request is served, so that every log line written on its task
//! names it (`"rid"`, [`crate::telemetry`]); and the Prometheus
//! series `tokenserver_http_requests_total{listener,route,status}` with the latency histogram
//! `tokenserver_http_request_duration_seconds{listener,route}`. `route` is the matched route
//! pattern (`/1.0/{application}/{version}`), never the raw path, so the series stay few.

use foldhash::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderValue;
use axum::response::Response;
use metrics::{Counter, Histogram};
use tokio::task::futures::TaskLocalFuture;
use tower::{Layer, Service};

/// The histogram's name, for its buckets ([`crate::telemetry::metrics_handle`]).
pub const DURATION_METRIC: &str = "tokenserver_http_request_duration_seconds";

const REQUEST_ID_HEADER: &str = "x-request-id";

tokio::task_local! {
    /// The id of the request the current task serves. A task-local rather than a tracing span:
    /// a span is registered and its fields formatted for every request, whether or not a line is
    /// ever written inside it (~9% of an access-token `authorize`'s instructions, callgrind).
    static REQUEST_ID: String;
}

/// The id of the request the current task serves, if any.
pub fn current_request_id() -> Option<String> {
    REQUEST_ID.try_with(String::clone).ok()
}
const MAX_REQUEST_ID: usize = 64;

/// The metric handles of one listener, registered on first use of each (route, status): the
/// macros would hash and allocate their labels on every request.
#[derive(Clone)]
pub struct RouteMetrics {
    listener: &'static str,
    handles: Arc<RwLock<HashMap<String, Handles>>>,
}

#[derive(Default)]
struct Handles {
    duration: Option<Histogram>,
    by_status: HashMap<u16, Counter>,
}

impl RouteMetrics {
    /// Handles for the listener named `listener` (`public`, `internal`).
    pub fn new(listener: &'static str) -> Self {
        Self { listener, handles: Arc::default() }
    }

    fn record(&self, route: &str, status: u16, seconds: f64) {
        if let Ok(map) = self.handles.read() {
            if let Some(h) = map.get(route) {
                if let (Some(duration), Some(counter)) = (&h.duration, h.by_status.get(&status)) {
                    duration.record(seconds);
                    counter.increment(1);
                    return;
                }
            }
        }
        let Ok(mut map) = self.handles.write() else { return };
        let h = map.entry(route.to_string()).or_default();
        let (listener, owned) = (self.listener, route.to_string());
        let duration = h
            .duration
            .get_or_insert_with(|| metrics::histogram!(DURATION_METRIC, "listener" => listener, "route" => owned));
        duration.record(seconds);
        h.by_status
            .entry(status)
            .or_insert_with(|| {
                metrics::counter!("tokenserver_http_requests_total",
                    "listener" => listener, "route" => route.to_string(), "status" => status.to_string())
            })
            .increment(1);
    }
}

/// A caller's request id worth keeping: 1–64 of `[A-Za-z0-9._-]` (anything else could forge log
/// fields or carry a secret into the logs).
fn usable_id(v: &HeaderValue) -> Option<&str> {
    let s = v.to_str().ok()?;
    let ok = !s.is_empty()
        && s.len() <= MAX_REQUEST_ID
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    ok.then_some(s)
}

/// The layer, for `Router::layer`: one [`Observe`] around each route. Written out rather than with
/// `axum::middleware::from_fn`, which boxes the inner service and the future once more on every
/// request.
#[derive(Clone)]
pub struct ObserveLayer {
    metrics: RouteMetrics,
}

impl ObserveLayer {
    /// Observes the requests of the listener named `listener` (`public`, `internal`).
    pub fn new(listener: &'static str) -> Self {
        Self { metrics: RouteMetrics::new(listener) }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe { inner, metrics: self.metrics.clone() }
    }
}

/// A route, observed: its request id and metrics.
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    metrics: RouteMetrics,
}

impl<S> Service<Request> for Observe<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Observed<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let started = Instant::now();
        // A clone of the matched path is a reference count, not a copy of the pattern.
        let route = req.extensions().get::<MatchedPath>().cloned();
        let id = match req.headers().get(REQUEST_ID_HEADER).and_then(usable_id) {
            Some(id) => id.to_string(),
            None => hex::encode(rand::random::<[u8; 8]>()),
        };
        let header = HeaderValue::from_str(&id).ok();
        // The route's own work happens when its future is polled, inside the id's scope.
        let inner = REQUEST_ID.scope(id, self.inner.call(req));
        Observed { inner, started, route, header, metrics: self.metrics.clone() }
    }
}

pin_project_lite::pin_project! {
    /// A route's answer, given its request id header and counted once it is ready.
    pub struct Observed<F> {
        #[pin]
        inner: TaskLocalFuture<String, F>,
        started: Instant,
        route: Option<MatchedPath>,
        header: Option<HeaderValue>,
        metrics: RouteMetrics,
    }
}

impl<F: Future<Output = Result<Response, Infallible>>> Future for Observed<F> {
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(mut resp) = ready!(this.inner.poll(cx));
        if let Some(v) = this.header.take() {
            resp.headers_mut().insert(REQUEST_ID_HEADER, v);
        }
        let route = this.route.as_ref().map_or("unmatched", MatchedPath::as_str);
        this.metrics.record(route, resp.status().as_u16(), this.started.elapsed().as_secs_f64());
        Poll::Ready(Ok(resp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_request_ids_are_kept() {
        let ok =
            |s: &str| usable_id(&HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))).is_some();
        assert!(ok("abc-123_x.y"));
        assert!(!ok(""));
        assert!(!ok("has space"));
        assert!(!ok("quote\"d"));
        assert!(!ok(&"a".repeat(65)));
        assert!(ok(&"a".repeat(64)));
    }
}
