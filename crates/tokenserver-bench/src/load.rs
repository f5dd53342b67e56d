//! The load generator: N keep-alive HTTP/1.1 connections, each sending one request at a time
//! (closed loop), on its own single-threaded runtime so it takes one core of a 2-core machine and
//! leaves the other to the server. Latency is recorded from send to the end of the body, into an
//! HDR histogram, for requests that start after the warm-up and end before the deadline.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use tokio::net::TcpStream;

/// What a response must be to count as expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Any 2xx.
    Success,
    /// Exactly this status.
    Status(u16),
    /// This status and a body that starts with these bytes (HaKr answers a refused rotation
    /// with a 200 too).
    StatusAndPrefix(u16, &'static [u8]),
}

impl Expect {
    fn accepts(self, status: u16, body: &[u8]) -> bool {
        match self {
            Expect::Success => (200..300).contains(&status),
            Expect::Status(s) => s == status,
            Expect::StatusAndPrefix(s, prefix) => s == status && body.starts_with(prefix),
        }
    }
}

/// One request.
#[derive(Debug, Clone)]
pub struct Req {
    pub method: hyper::Method,
    pub path: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: Option<String>,
    pub expect: Expect,
}

impl Req {
    /// A GET.
    pub fn get(path: impl Into<String>, headers: Vec<(&'static str, String)>, expect: Expect) -> Self {
        Self { method: hyper::Method::GET, path: path.into(), headers, body: None, expect }
    }

    /// A request with a JSON body.
    pub fn json(method: hyper::Method, path: impl Into<String>, body: String, expect: Expect) -> Self {
        Self {
            method,
            path: path.into(),
            headers: vec![("content-type", "application/json".into())],
            body: Some(body),
            expect,
        }
    }
}

/// Makes one connection's requests, given the previous response's body (`None` at first);
/// `None` ends the connection (pool exhausted).
pub type ReqGen = Box<dyn FnMut(Option<&[u8]>) -> Option<Req> + Send>;

/// Figures of one run.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub requests: u64,
    pub seconds: f64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub non_2xx: u64,
    pub unexpected: u64,
    pub errors: u64,
}

struct Shared {
    hist: Mutex<Histogram<u64>>,
    requests: AtomicU64,
    non_2xx: AtomicU64,
    unexpected: AtomicU64,
    errors: AtomicU64,
}

async fn connection(
    addr: SocketAddr,
    mut gen: ReqGen,
    measure_from: Instant,
    deadline: Instant,
    shared: Arc<Shared>,
) -> Result<(), String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(io).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?;
    let host = addr.to_string();
    let mut last: Option<Bytes> = None;
    while Instant::now() < deadline {
        let Some(req) = gen(last.as_deref()) else { break };
        let mut builder = Request::builder().method(req.method.clone()).uri(&req.path).header("host", &host);
        for (k, v) in &req.headers {
            builder = builder.header(*k, v);
        }
        let body = req.body.map(Bytes::from).unwrap_or_default();
        let request = builder.body(Full::new(body)).map_err(|e| e.to_string())?;
        let start = Instant::now();
        let result = async {
            let resp = sender.send_request(request).await?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<(u16, Bytes), hyper::Error>((status, body))
        }
        .await;
        let result = result.map(|(status, body)| {
            let expected = req.expect.accepts(status, &body);
            last = Some(body);
            (status, expected)
        });
        let end = Instant::now();
        if start < measure_from || end > deadline {
            if result.is_err() {
                break;
            }
            continue;
        }
        shared.requests.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok((status, expected)) => {
                let _ = local.record(end.duration_since(start).as_micros() as u64);
                if !(200..300).contains(&status) {
                    shared.non_2xx.fetch_add(1, Ordering::Relaxed);
                }
                if !expected {
                    shared.unexpected.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(_) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
    }
    if let Ok(mut h) = shared.hist.lock() {
        let _ = h.add(&local);
    }
    Ok(())
}

/// Runs `gens.len()` connections, dealt out over `addrs` in turn (several servers behind one
/// imaginary load balancer): `warmup`, then `duration` measured, one outcome for them all. The
/// load runs on a thread of its own with a single-threaded runtime.
pub fn run_split(
    addrs: &[SocketAddr],
    gens: Vec<ReqGen>,
    warmup: Duration,
    duration: Duration,
) -> Result<Outcome, String> {
    if addrs.is_empty() {
        return Err("no server to load".into());
    }
    let addrs = addrs.to_vec();
    std::thread::scope(|s| s.spawn(move || run_here(&addrs, gens, warmup, duration)).join())
        .map_err(|_| "load generator panicked".to_string())?
}

fn run_here(addrs: &[SocketAddr], gens: Vec<ReqGen>, warmup: Duration, duration: Duration) -> Result<Outcome, String> {
    let shared = Arc::new(Shared {
        hist: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?),
        requests: AtomicU64::new(0),
        non_2xx: AtomicU64::new(0),
        unexpected: AtomicU64::new(0),
        errors: AtomicU64::new(0),
    });
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let start = Instant::now();
    let measure_from = start + warmup;
    let deadline = measure_from + duration;
    let last_end = rt.block_on(async {
        let tasks: Vec<_> = gens
            .into_iter()
            .enumerate()
            .map(|(i, g)| tokio::spawn(connection(addrs[i % addrs.len()], g, measure_from, deadline, shared.clone())))
            .collect();
        for t in tasks {
            match t.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(Instant::now().min(deadline))
    })?;
    let seconds = last_end.saturating_duration_since(measure_from).as_secs_f64().max(0.001);
    let hist = shared.hist.lock().map_err(|e| e.to_string())?;
    let requests = shared.requests.load(Ordering::Relaxed);
    let ms = |us: u64| us as f64 / 1000.0;
    Ok(Outcome {
        requests,
        seconds,
        rps: requests as f64 / seconds,
        p50_ms: ms(hist.value_at_quantile(0.50)),
        p99_ms: ms(hist.value_at_quantile(0.99)),
        max_ms: ms(hist.max()),
        non_2xx: shared.non_2xx.load(Ordering::Relaxed),
        unexpected: shared.unexpected.load(Ordering::Relaxed),
        errors: shared.errors.load(Ordering::Relaxed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expectations() {
        assert!(Expect::Success.accepts(204, b""));
        assert!(!Expect::Success.accepts(302, b""));
        assert!(Expect::Status(401).accepts(401, b"x"));
        assert!(!Expect::Status(401).accepts(403, b"x"));
        let ok = Expect::StatusAndPrefix(200, br#"{"Ok":"#);
        assert!(ok.accepts(200, br#"{"Ok":{"token":"t"}}"#));
        assert!(!ok.accepts(200, br#"{"Err":"InvalidToken"}"#));
        assert!(!ok.accepts(500, br#"{"Ok":{}}"#));
    }

    /// The generator against a real local server: counts, statuses and expectations.
    #[test]
    fn measures_a_local_server() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .route("/ok", axum::routing::get(|| async { "ok" }))
            .route("/no", axum::routing::get(|| async { axum::http::StatusCode::UNAUTHORIZED }));
        rt.spawn(async move { axum::serve(listener, app).await });
        let gens: Vec<ReqGen> = (0..4)
            .map(|c| {
                Box::new(move |_: Option<&[u8]>| {
                    Some(if c == 0 {
                        Req::get("/no", vec![], Expect::Status(401))
                    } else if c == 1 {
                        Req::get("/no", vec![], Expect::Success)
                    } else {
                        Req::get("/ok", vec![("x-test", "1".into())], Expect::Success)
                    })
                }) as ReqGen
            })
            .collect();
        let o = run_split(&[addr], gens, Duration::from_millis(100), Duration::from_millis(400)).unwrap();
        assert!(o.requests > 100, "{o:?}");
        assert!(o.non_2xx > 0 && o.non_2xx < o.requests, "{o:?}");
        // Connection 1 expects success and gets 401: every one of its requests is unexpected.
        assert!(o.unexpected > 0 && o.unexpected < o.non_2xx, "{o:?}");
        assert_eq!(o.errors, 0);
        assert!(o.p50_ms > 0.0 && o.p99_ms >= o.p50_ms && o.max_ms >= o.p99_ms, "{o:?}");
        assert!((o.rps - o.requests as f64 / o.seconds).abs() < 1.0);
    }
}
