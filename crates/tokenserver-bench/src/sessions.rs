//! Session-token scenarios: create, rotation chain, rotation with a metadata update — on each
//! session backend, with the store holding 0, 100k, 1M, 10M live sessions. The store is filled
//! through the API itself (v1 creates at full speed) before each size is measured.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::Method;

use crate::ab::{Gens, Sides};
use crate::load::{self, Expect, Req, ReqGen};
use crate::{hello_now, procs, Ctx, Row};

/// Which session API a run speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Api {
    /// `POST /v1/sessions`, `POST /v1/sessions/rotate`.
    V1,
    /// HaKr/token_server's `POST /token`, `PUT /token` (tokenserver serves it too).
    Hakr,
}

impl Api {
    fn create(self, c: usize, i: u64) -> Req {
        let body = format!(r#"{{"meta":{{"user":"u-{c}-{i}","role":"member"}}}}"#);
        match self {
            Api::V1 => Req::json(Method::POST, "/v1/sessions", body, Expect::Status(201)),
            Api::Hakr => Req::json(Method::POST, "/token", body, Expect::Status(200)),
        }
    }

    fn rotate(self, token: &str, meta: Option<String>) -> Req {
        let body = match meta {
            Some(m) => format!(r#"{{"token":"{token}","meta":{m}}}"#),
            None => format!(r#"{{"token":"{token}"}}"#),
        };
        match self {
            Api::V1 => Req::json(Method::POST, "/v1/sessions/rotate", body, Expect::Status(200)),
            // HaKr refuses with a 200 too: only an `Ok` answer counts.
            Api::Hakr => Req::json(Method::PUT, "/token", body, Expect::StatusAndPrefix(200, br#"{"Ok":"#)),
        }
    }

    /// The token an answer names: v1's `"token"` field, HaKr's text/plain create answer or the
    /// `"token"` inside its `{"Ok":…}`.
    fn token_in(self, body: &[u8]) -> Option<String> {
        let text = std::str::from_utf8(body).ok()?;
        if self == Api::Hakr && !text.starts_with('{') {
            return (!text.is_empty()).then(|| text.to_string());
        }
        let start = text.find(r#""token":""#)? + 9;
        let len = text.get(start..)?.find('"')?;
        text.get(start..start + len).map(String::from)
    }
}

/// Every connection creates sessions until `total` were made between them.
fn fill_gens(api: Api, conns: usize, total: u64, made: Arc<AtomicU64>) -> Vec<ReqGen> {
    (0..conns)
        .map(|c| {
            let made = made.clone();
            Box::new(move |_: Option<&[u8]>| {
                let i = made.fetch_add(1, Ordering::Relaxed);
                (i < total).then(|| api.create(c, i))
            }) as ReqGen
        })
        .collect()
}

fn create_gens(api: Api, conns: usize) -> Vec<ReqGen> {
    (0..conns)
        .map(|c| {
            let mut i = 0u64;
            Box::new(move |_: Option<&[u8]>| {
                i += 1;
                Some(api.create(c, i))
            }) as ReqGen
        })
        .collect()
}

/// Each connection creates one session, then rotates its token over and over (with a metadata
/// merge patch on every rotation when `with_meta`).
fn chain_gens(api: Api, conns: usize, with_meta: bool) -> Vec<ReqGen> {
    (0..conns)
        .map(|c| {
            let mut i = 0u64;
            Box::new(move |last: Option<&[u8]>| {
                // The previous answer names the next token; no token (first call, or a refusal
                // counted as unexpected) starts a new session.
                let token = last.and_then(|b| api.token_in(b));
                i += 1;
                Some(match &token {
                    None => api.create(c, i),
                    Some(t) => api.rotate(t, with_meta.then(|| format!(r#"{{"n":{i},"page":"/p/{}"}}"#, i % 7))),
                })
            }) as ReqGen
        })
        .collect()
}

fn label(n: u64) -> String {
    match n {
        0 => "0".into(),
        n if n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

/// Runs the three scenarios on tokenserver with session store `url`, through `api`.
pub fn run_backend(
    ctx: &Ctx,
    name: &str,
    url: &str,
    api: Api,
    sizes: &[u64],
    rows: &mut Vec<Row>,
) -> Result<(), String> {
    let mut env = ctx.env(&format!("sqlite://{}/sync.db", ctx.work.display()), true);
    env.push(("TOKENSERVER_SESSIONS__URL".into(), url.into()));
    // The benchmark's sessions must outlive the run.
    env.push(("TOKENSERVER_SESSIONS__TOKEN_LIFETIME".into(), "2h".into()));
    let log = ctx.work.join(format!("tokenserver-sessions-{name}.log"));
    let sides = Sides::start(ctx, &env, &log)?;
    let label = match api {
        Api::V1 => ctx.label(name),
        Api::Hakr => format!("{} (HaKr API)", ctx.label(name)),
    };
    run_sizes(ctx, &label, &sides, api, sizes, rows)
}

/// Runs the three scenarios on HaKr's `token_server` binary, for comparison in the same run.
pub fn run_hakr(ctx: &Ctx, bin: &std::path::Path, sizes: &[u64], rows: &mut Vec<Row>) -> Result<(), String> {
    let server = procs::hakr(bin, &ctx.work.join("hakr.log"))?;
    run_sizes(ctx, "HaKr token_server", &Sides::alone(server), Api::Hakr, sizes, rows)
}

/// Fills the store to each size in turn and measures the three scenarios there (those
/// `--scenarios` names, numbered 1-3 in this order).
fn run_sizes(ctx: &Ctx, name: &str, sides: &Sides, api: Api, sizes: &[u64], rows: &mut Vec<Row>) -> Result<(), String> {
    let conns = ctx.common.connections;
    let mut live = 0u64;
    for &size in sizes {
        if size > live {
            let started = std::time::Instant::now();
            let made = Arc::new(AtomicU64::new(0));
            let gens = fill_gens(api, conns, size - live, made);
            let o = load::run_split(sides.a_addrs(), gens, Duration::ZERO, Duration::from_secs(7200))?;
            if o.unexpected + o.errors > 0 {
                return Err(format!("{name}: {} failed creates while filling", o.unexpected + o.errors));
            }
            eprintln!(
                "{name}: filled to {} sessions in {:.0} s ({:.0} creates/s)",
                label(size),
                started.elapsed().as_secs_f64(),
                o.rps
            );
            live = size;
        }
        // Hello beside each server and size: the machine's speed drifts over a run of several
        // servers (hello lost a quarter of its rate in one), and the servers are compared by
        // their ratios to it.
        let hello = hello_now(ctx)?;
        eprintln!("hello before {name} @ {}: {hello:.0} req/s", label(size));
        let scenarios: [(&str, Gens); 3] = [
            ("rotation chain", Box::new(move || chain_gens(api, conns, false))),
            ("rotation + metadata merge", Box::new(move || chain_gens(api, conns, true))),
            ("create", Box::new(move || create_gens(api, conns))),
        ];
        for ((scenario, gens), _) in scenarios.into_iter().zip(1..).filter(|(_, number)| ctx.wants(*number)) {
            let at = format!("{scenario}, {} live", label(size));
            let made = sides.measure(ctx, name, &at, hello, gens, rows)?;
            if scenario == "create" {
                live += made;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_found_in_each_api_answer() {
        let v1 = br#"{"token":"abc-DEF_123","expires_at":1,"meta":{"token":"x"}}"#;
        assert_eq!(Api::V1.token_in(v1).as_deref(), Some("abc-DEF_123"));
        assert_eq!(Api::V1.token_in(b"plain").as_deref(), None);
        assert_eq!(
            Api::Hakr.token_in(b"eb6e0e90-9c57-4d87-b17c-79a57601b0f0").as_deref(),
            Some("eb6e0e90-9c57-4d87-b17c-79a57601b0f0")
        );
        let ok = br#"{"Ok":{"token":"2ef9b1e9-cc61","meta":{"a":1}}}"#;
        assert_eq!(Api::Hakr.token_in(ok).as_deref(), Some("2ef9b1e9-cc61"));
        assert_eq!(Api::Hakr.token_in(br#"{"Err":"InvalidToken"}"#), None);
        assert_eq!(Api::Hakr.token_in(b""), None);
    }

    #[test]
    fn requests_follow_each_api() {
        let r = Api::Hakr.rotate("t", Some(r#"{"n":1}"#.into()));
        assert_eq!(
            (r.method, r.path.as_str(), r.body.as_deref()),
            (Method::PUT, "/token", Some(r#"{"token":"t","meta":{"n":1}}"#))
        );
        let r = Api::V1.rotate("t", None);
        assert_eq!(
            (r.method, r.path.as_str(), r.body.as_deref()),
            (Method::POST, "/v1/sessions/rotate", Some(r#"{"token":"t"}"#))
        );
        assert_eq!(Api::V1.create(1, 2).expect, Expect::Status(201));
        assert_eq!(Api::Hakr.create(1, 2).path, "/token");
    }
}
