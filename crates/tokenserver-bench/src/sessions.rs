//! Session-token scenarios: create, rotation chain, rotation with a metadata update — on each
//! session backend, with the store holding 0, 100k, 1M, 10M live sessions. The store is filled
//! through the API itself (v1 creates at full speed) before each size is measured.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::Method;

use crate::load::{self, Expect, Req, ReqGen};
use crate::{measure_at, procs, Ctx, Row};

/// The token in a v1 answer (`{"token":"…",…}`).
fn token_in(body: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    let start = text.find(r#""token":""#)? + 9;
    text.get(start..start + 43).map(String::from)
}

fn create_req(c: usize, i: u64) -> Req {
    Req::json(
        Method::POST,
        "/v1/sessions",
        format!(r#"{{"meta":{{"user":"u-{c}-{i}","role":"member"}}}}"#),
        Expect::Status(201),
    )
}

/// Every connection creates sessions until `total` were made between them.
fn fill_gens(conns: usize, total: u64, made: Arc<AtomicU64>) -> Vec<ReqGen> {
    (0..conns)
        .map(|c| {
            let made = made.clone();
            Box::new(move |_: Option<&[u8]>| {
                let i = made.fetch_add(1, Ordering::Relaxed);
                (i < total).then(|| create_req(c, i))
            }) as ReqGen
        })
        .collect()
}

fn create_gens(conns: usize) -> Vec<ReqGen> {
    (0..conns)
        .map(|c| {
            let mut i = 0u64;
            Box::new(move |_: Option<&[u8]>| {
                i += 1;
                Some(create_req(c, i))
            }) as ReqGen
        })
        .collect()
}

/// Each connection creates one session, then rotates its token over and over (with a metadata
/// merge patch on every rotation when `with_meta`).
fn chain_gens(conns: usize, with_meta: bool) -> Vec<ReqGen> {
    (0..conns)
        .map(|c| {
            let mut i = 0u64;
            Box::new(move |last: Option<&[u8]>| {
                // The previous answer names the next token; no token (first call, or a refusal
                // counted as unexpected) starts a new session.
                let token = last.and_then(token_in);
                i += 1;
                Some(match &token {
                    None => create_req(c, i),
                    Some(t) if with_meta => Req::json(
                        Method::POST,
                        "/v1/sessions/rotate",
                        format!(r#"{{"token":"{t}","meta":{{"n":{i},"page":"/p/{}"}}}}"#, i % 7),
                        Expect::Status(200),
                    ),
                    Some(t) => Req::json(
                        Method::POST,
                        "/v1/sessions/rotate",
                        format!(r#"{{"token":"{t}"}}"#),
                        Expect::Status(200),
                    ),
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

/// Runs the three scenarios on `backend` (name, store URL) at each of `sizes`.
pub fn run_backend(ctx: &Ctx, name: &str, url: &str, sizes: &[u64], rows: &mut Vec<Row>) -> Result<(), String> {
    let mut env = ctx.env(&format!("sqlite://{}/sync.db", ctx.work.display()), true);
    env.push(("TOKENSERVER_SESSIONS__URL".into(), url.into()));
    // The benchmark's sessions must outlive the run.
    env.push(("TOKENSERVER_SESSIONS__TOKEN_LIFETIME".into(), "2h".into()));
    let log = ctx.work.join(format!("tokenserver-sessions-{name}.log"));
    let server = procs::tokenserver(&ctx.tokenserver(), &env, &log)?;
    let internal = server.internal.ok_or("no internal listener")?;
    let conns = ctx.common.connections;
    let mut live = 0u64;
    for &size in sizes {
        if size > live {
            let started = std::time::Instant::now();
            let made = Arc::new(AtomicU64::new(0));
            let o =
                load::run(internal, fill_gens(conns, size - live, made), Duration::ZERO, Duration::from_secs(7200))?;
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
        for (scenario, gens) in [
            ("rotation chain", chain_gens(conns, false)),
            ("rotation + metadata merge", chain_gens(conns, true)),
            ("create", create_gens(conns)),
        ] {
            let (o, sample) = measure_at(server.child.id(), internal, gens, ctx)?;
            eprintln!("{name} @ {}: {scenario}: {:.0} req/s", label(size), o.rps);
            if scenario == "create" {
                live += o.requests;
            }
            rows.push(Row {
                backend: name.into(),
                scenario: format!("{scenario}, {} live", label(size)),
                outcome: o,
                sample,
            });
        }
    }
    Ok(())
}
