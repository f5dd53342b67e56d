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

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use metrics::{Counter, Histogram};

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

/// The layer's body (`axum::middleware::from_fn_with_state`).
pub async fn observe(
    axum::extract::State(metrics): axum::extract::State<RouteMetrics>,
    req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    // A clone of the matched path is a reference count, not a copy of the pattern.
    let route = req.extensions().get::<MatchedPath>().cloned();
    let id = match req.headers().get(REQUEST_ID_HEADER).and_then(usable_id) {
        Some(id) => id.to_string(),
        None => hex::encode(rand::random::<[u8; 8]>()),
    };
    let header = HeaderValue::from_str(&id).ok();
    let mut resp = REQUEST_ID.scope(id, next.run(req)).await;
    if let Some(v) = header {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
    metrics.record(route, resp.status().as_u16(), started.elapsed().as_secs_f64());
    resp
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
