//! Access-token scenarios on each backend, through the v1 API with its bearer key: authorize (a
//! random one of 10,000 live tokens), create (a generated token each time), and two listings of
//! an application holding `--big` tokens: its first page, and a walk through its pages (each
//! request asks for the page after the previous answer's), which should cost what the first
//! page costs. The store is filled through the API itself before the measurements (and a
//! PostgreSQL table then vacuumed, as autovacuum would: [`settle`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::Method;
use rand::{Rng, SeedableRng};

use crate::ab::{Gens, Sides};
use crate::load::{self, Expect, Req, ReqGen};
use crate::{hello_now, Ctx, Row};

const SERVICE: &str = "bench-svc";
/// The v1 API's key in the runs.
const API_KEY: &str = "bench-access-key";
/// Tokens the authorize scenario picks from.
const AUTH_TOKENS: u64 = 10_000;
/// Lifetime of the run's tokens: they outlive it, and then leave a shared Redis by themselves.
const TTL_S: u64 = 7200;
/// The big application's id.
const BIG_APP: &str = "big";

fn keyed(mut r: Req) -> Req {
    r.headers.push(("authorization", format!("Bearer {API_KEY}")));
    r
}

fn path(rest: &str) -> String {
    format!("/v1/services/{SERVICE}{rest}")
}

/// Fill request `i`: the authorize pool first (`auth-<i>` over 100 applications), then the big
/// application's tokens.
fn fill_request(i: u64) -> Req {
    let (token, app) = if i < AUTH_TOKENS {
        (format!("auth-{i}"), format!("app-{}", i % 100))
    } else {
        (format!("big-{:09}", i - AUTH_TOKENS), BIG_APP.to_string())
    };
    let body = format!(r#"{{"token":"{token}","app_id":"{app}","ttl":{TTL_S}}}"#);
    keyed(Req::json(Method::POST, path("/tokens"), body, Expect::Status(201)))
}

fn fill_gens(conns: usize, total: u64, made: Arc<AtomicU64>) -> Vec<ReqGen> {
    (0..conns)
        .map(|_| {
            let made = made.clone();
            Box::new(move |_: Option<&[u8]>| {
                let i = made.fetch_add(1, Ordering::Relaxed);
                (i < total).then(|| fill_request(i))
            }) as ReqGen
        })
        .collect()
}

fn authorize_gens(conns: usize) -> Vec<ReqGen> {
    (0..conns)
        .map(|_| {
            let mut rng = rand::rngs::SmallRng::from_rng(&mut rand::rng());
            Box::new(move |_: Option<&[u8]>| {
                let i = rng.random_range(0..AUTH_TOKENS);
                let body = format!(r#"{{"access_token":"auth-{i}"}}"#);
                Some(keyed(Req::json(Method::POST, path("/authorize"), body, Expect::Status(200))))
            }) as ReqGen
        })
        .collect()
}

fn create_gens(conns: usize) -> Vec<ReqGen> {
    (0..conns)
        .map(|c| {
            Box::new(move |_: Option<&[u8]>| {
                let body = format!(r#"{{"app_id":"new-{c}","ttl":{TTL_S}}}"#);
                Some(keyed(Req::json(Method::POST, path("/tokens"), body, Expect::Status(201))))
            }) as ReqGen
        })
        .collect()
}

fn page(cursor: Option<&str>) -> Req {
    let mut p = path(&format!("/applications/{BIG_APP}/tokens?limit=100"));
    if let Some(c) = cursor {
        p.push_str("&cursor=");
        p.push_str(&percent_encode(c));
    }
    keyed(Req::get(p, Vec::new(), Expect::Status(200)))
}

fn first_page_gens(conns: usize) -> Vec<ReqGen> {
    (0..conns).map(|_| Box::new(|_: Option<&[u8]>| Some(page(None))) as ReqGen).collect()
}

/// Each connection follows `next_cursor` from answer to answer (the first request, and any after
/// the last page, asks for the first page), so the pages read go deeper as the run goes on.
fn walk_gens(conns: usize) -> Vec<ReqGen> {
    (0..conns)
        .map(|_| Box::new(|last: Option<&[u8]>| Some(page(last.and_then(next_cursor).as_deref()))) as ReqGen)
        .collect()
}

/// `next_cursor` of a listing answer, `None` at the end (`null`) or when absent.
fn next_cursor(body: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    let start = text.find(r#""next_cursor":""#)? + 15;
    let len = text.get(start..)?.find('"')?;
    text.get(start..start + len).map(String::from)
}

fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn label(n: u64) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

/// After the fill, a PostgreSQL table is vacuumed and analyzed, as autovacuum does on a server
/// with its default settings once a table has grown by a fifth: this machine's PostgreSQL runs
/// with autovacuum off, which would leave the table without statistics or all-visible pages.
fn settle(name: &str, url: &str) -> Result<(), String> {
    if !url.starts_with("postgres") {
        return Ok(());
    }
    let started = std::time::Instant::now();
    // The caller is inside the harness's runtime: the statement runs on a runtime of its own.
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
            rt.block_on(async {
                use sqlx::{Connection, Executor};
                let mut c = sqlx::PgConnection::connect(url).await.map_err(|e| e.to_string())?;
                c.execute("VACUUM (ANALYZE) tokenserver_access_tokens").await.map_err(|e| e.to_string())?;
                c.close().await.map_err(|e| e.to_string())
            })
        })
        .join()
        .map_err(|_| "the vacuum thread panicked".to_string())?
    })?;
    eprintln!("{name}: vacuumed and analyzed in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Runs the four scenarios (those `--scenarios` names, numbered 1-4 in this order) on tokenserver
/// with access store `url`.
pub fn run_backend(ctx: &Ctx, name: &str, url: &str, big: u64, rows: &mut Vec<Row>) -> Result<(), String> {
    let mut env = ctx.env(&format!("sqlite://{}/sync.db", ctx.work.display()), true);
    env.push(("TOKENSERVER_ACCESS__URL".into(), url.into()));
    env.push(("TOKENSERVER_ACCESS__API_KEY".into(), API_KEY.into()));
    let log = ctx.work.join(format!("tokenserver-access-{name}.log"));
    let sides = Sides::start(ctx, &env, &log)?;
    let conns = ctx.common.connections;

    let started = std::time::Instant::now();
    let gens = fill_gens(conns, AUTH_TOKENS + big, Arc::new(AtomicU64::new(0)));
    let o = load::run_split(sides.a_addrs(), gens, Duration::ZERO, Duration::from_secs(7200))?;
    if o.unexpected + o.errors > 0 {
        return Err(format!("{name}: {} failed creates while filling", o.unexpected + o.errors));
    }
    eprintln!(
        "{name}: filled {} tokens in {:.0} s ({:.0} creates/s)",
        AUTH_TOKENS + big,
        started.elapsed().as_secs_f64(),
        o.rps
    );
    settle(name, url)?;
    let hello = hello_now(ctx)?;
    eprintln!("hello before {name}: {hello:.0} req/s");
    let big_label = label(big);
    let scenarios: [(String, Gens); 4] = [
        (format!("authorize (of {} tokens)", label(AUTH_TOKENS)), Box::new(move || authorize_gens(conns))),
        ("create (generated token)".to_string(), Box::new(move || create_gens(conns))),
        (format!("list: first page of a {big_label}-token app"), Box::new(move || first_page_gens(conns))),
        (format!("list: walking a {big_label}-token app's pages"), Box::new(move || walk_gens(conns))),
    ];
    for ((scenario, gens), _) in scenarios.into_iter().zip(1..).filter(|(_, number)| ctx.wants(*number)) {
        sides.measure(ctx, &ctx.label(name), &scenario, hello, gens, rows)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_are_read_and_sent_encoded() {
        assert_eq!(next_cursor(br#"{"tokens":[],"next_cursor":"big-000000099"}"#).as_deref(), Some("big-000000099"));
        assert_eq!(next_cursor(br#"{"tokens":[],"next_cursor":null}"#), None);
        assert_eq!(percent_encode("a b/c+"), "a%20b%2Fc%2B");
        assert!(page(Some("x/y")).path.ends_with("limit=100&cursor=x%2Fy"));
    }

    #[test]
    fn the_fill_makes_the_pool_then_the_big_app() {
        assert!(fill_request(0).body.unwrap().contains(r#""token":"auth-0","app_id":"app-0""#));
        let r = fill_request(AUTH_TOKENS + 5);
        assert!(r.body.unwrap().contains(r#""token":"big-000000005","app_id":"big""#));
        assert_eq!(r.headers.last().map(|h| h.1.as_str()), Some("Bearer bench-access-key"));
    }
}
