//! `tokenserver-bench`: measures tokenserver against a trivial axum server in the same run.
//!
//! `run` benchmarks the Sync scenarios on each backend; `scale` repeats the cached-token scenario
//! with millions of users in the database. Results are printed and written as a Markdown table.

mod ab;
mod access;
mod load;
mod populate;
mod procs;
mod sessions;
mod tokens;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use clap::{Parser, Subcommand};
use load::{Expect, Outcome, Req, ReqGen};
use populate::Backend;
use rand::{Rng, SeedableRng};
use tokens::{pool, Claims, SYNC_SCOPE};

#[derive(Parser)]
#[command(about = "Benchmark harness for tokenserver")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// Concurrent connections.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Measured seconds per scenario.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Warm-up seconds before measuring.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// PostgreSQL server for the PostgreSQL runs (loopback: no TLS, which sqlx would otherwise
    /// negotiate and which cost ~30% of the server's CPU).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable")]
    postgres_url: String,
    /// MySQL / MariaDB server for the MariaDB runs (loopback: no TLS).
    #[arg(long, default_value = "mysql://root@127.0.0.1:3306/mysql?ssl-mode=disabled")]
    mysql_url: String,
    /// Where to write the Markdown report.
    #[arg(long)]
    out: Option<PathBuf>,
    /// The server's `RUST_LOG` (the default logs one line per issued token, as in production).
    #[arg(long, default_value = "info")]
    server_log: String,
    /// Extra `KEY=VALUE` settings for every tokenserver started (repeatable), to compare a
    /// setting's values, e.g. `TOKENSERVER_DATABASE_POOL_MAX_SIZE=4`; listed in the report.
    #[arg(long = "server-env", value_parser = parse_setting)]
    server_env: Vec<(String, String)>,
    /// Only these scenarios, all by default: Sync 1-5; sessions 1-3 (chain, metadata, create);
    /// access 1-4 (authorize, create, first page, walking pages).
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<u8>,
    /// tokenserver processes on the one database (web heads), the connections dealt out over
    /// them; figures are their sum (CPU) and largest (RSS).
    #[arg(long, default_value_t = 1)]
    heads: usize,
    /// A second tokenserver binary (build B) to compare with (access and sessions): started
    /// beside this harness's tokenserver (A) on the same store, with the same settings, and each
    /// scenario measured on A and B in turn, `--rounds` pairs; the report adds their summary.
    #[arg(long, value_name = "TOKENSERVER")]
    against: Option<PathBuf>,
    /// Pairs of runs per scenario with `--against` (A B, then B A, …).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

#[derive(Subcommand)]
enum Command {
    /// The Sync scenarios on each backend.
    Run {
        #[command(flatten)]
        common: Common,
        /// Backends: sqlite, postgres, mysql.
        #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres,mysql")]
        backends: Vec<String>,
        /// Existing users in the database.
        #[arg(long, default_value_t = 1000)]
        users: usize,
        /// Size of the new-user token pool (scenario 3 stops early if it runs out).
        #[arg(long, default_value_t = 200_000)]
        new_users: usize,
    },
    /// Session tokens: create, rotation chain, rotation with metadata, at each store size.
    Sessions {
        #[command(flatten)]
        common: Common,
        /// Session backends: memory, sqlite, postgres, redis, redis-cluster.
        #[arg(long, value_delimiter = ',', default_value = "memory,sqlite")]
        backends: Vec<String>,
        /// Live sessions to fill the store to before each measurement (ascending).
        #[arg(long, value_delimiter = ',', default_value = "0,100000,1000000,10000000")]
        sizes: Vec<u64>,
        /// Redis server for the redis runs.
        #[arg(long, default_value = "redis://127.0.0.1:6379/")]
        redis_url: String,
        /// Redis Cluster nodes for the redis-cluster runs.
        #[arg(long, default_value = "redis+cluster://127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103/")]
        redis_cluster_url: String,
        /// The session API tokenserver is measured through.
        #[arg(long, value_enum, default_value = "v1")]
        api: sessions::Api,
        /// HaKr's `token_server` binary (e.g. from `cargo install token_server --root DIR`), measured
        /// through its own API in the same run, before tokenserver.
        #[arg(long)]
        hakr: Option<PathBuf>,
    },
    /// Access tokens: authorize, create, and listing pages of a big application, per backend.
    Access {
        #[command(flatten)]
        common: Common,
        /// Access-token backends: sqlite, postgres, mysql, redis, redis-cluster.
        #[arg(long, value_delimiter = ',', default_value = "sqlite,redis")]
        backends: Vec<String>,
        /// Tokens of the big application the listing scenarios page through.
        #[arg(long, default_value_t = 1_000_000)]
        big: u64,
        /// Redis server for the redis runs.
        #[arg(long, default_value = "redis://127.0.0.1:6379/")]
        redis_url: String,
        /// Redis Cluster nodes for the redis-cluster runs.
        #[arg(long, default_value = "redis+cluster://127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103/")]
        redis_cluster_url: String,
    },
    /// Scenario 2 with 1,000 users, then with `--users` users in the database (SQLite).
    Scale {
        #[command(flatten)]
        common: Common,
        /// Users to bulk-load.
        #[arg(long, default_value_t = 10_000_000)]
        users: u64,
    },
}

/// `KEY=VALUE`, as `--server-env` takes it.
fn parse_setting(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

struct Ctx {
    bin_dir: PathBuf,
    work: PathBuf,
    cache: PathBuf,
    common: Common,
}

impl Ctx {
    fn tokenserver(&self) -> PathBuf {
        self.bin_dir.join("tokenserver")
    }

    fn admin_url(&self, backend: Backend) -> String {
        match backend {
            Backend::Sqlite => self.work.display().to_string(),
            Backend::Postgres => self.common.postgres_url.clone(),
            Backend::MySql => self.common.mysql_url.clone(),
        }
    }

    fn env(&self, db_url: &str, cache: bool) -> Vec<(String, String)> {
        let mut env = vec![
            ("SYNC_MASTER_SECRET".into(), "bench-master-secret".into()),
            ("SYNC_TOKENSERVER__FXA_METRICS_HASH_SECRET".into(), "bench-metrics-secret".into()),
            ("TOKENSERVER_DATABASE_URL".into(), db_url.into()),
            ("SYNC_TOKENSERVER__FXA_EMAIL_DOMAIN".into(), populate::DOMAIN.into()),
            // Never reached: the bench key is configured, and every token is a JWT.
            ("SYNC_TOKENSERVER__FXA_OAUTH_SERVER_URL".into(), "http://127.0.0.1:9".into()),
            ("RUST_LOG".into(), self.common.server_log.clone()),
            // Session calls carry no key, as HaKr's clients send none (a loopback listener).
            ("TOKENSERVER_SESSIONS__REQUIRE_API_KEY".into(), "false".into()),
            ("TOKENSERVER_INTERNAL__ADMIN_KEY".into(), "bench-admin-key".into()),
            // The new-users scenario measures allocation itself, not the abuse limit.
            ("TOKENSERVER_NEW_USER_RATE".into(), "0".into()),
        ];
        if !cache {
            env.push(("TOKENSERVER_FXA_OAUTH_CACHE_SIZE".into(), "0".into()));
        }
        env.extend(tokens::jwk_env());
        env.extend(self.common.server_env.iter().cloned());
        env
    }

    /// The `--heads` tokenserver processes with `env`.
    fn servers(&self, env: &[(String, String)], log: &std::path::Path) -> Result<procs::Heads, String> {
        procs::tokenservers(&self.tokenserver(), env, log, self.common.heads)
    }

    /// A backend's name in the report, with the number of web heads when there are several.
    fn label(&self, backend: &str) -> String {
        match self.common.heads {
            0 | 1 => backend.to_string(),
            n => format!("{backend} ×{n} heads"),
        }
    }

    fn wants(&self, scenario: u8) -> bool {
        self.common.scenarios.is_empty() || self.common.scenarios.contains(&scenario)
    }

    fn duration(&self) -> (Duration, Duration) {
        (Duration::from_secs(self.common.warmup), Duration::from_secs(self.common.duration))
    }
}

/// One line of the report.
struct Row {
    backend: String,
    scenario: String,
    outcome: Outcome,
    sample: Sample,
    /// With `--against`: the pair (from 0) and the build it was measured on.
    ab: Option<(usize, ab::Side)>,
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

fn req(token: &str, key_id: String, expect: Expect) -> Req {
    Req::get("/1.0/sync/1.5", vec![("authorization", bearer(token)), ("x-keyid", key_id)], expect)
}

fn random_key_id(kca: i64) -> String {
    format!("{kca}-{}", URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>()))
}

/// Runs the load and returns its figures with the server's peak RSS (KiB) and its CPU time per
/// request (µs, warm-up included in both numerator and denominator).
fn measure(server: &procs::Server, gens: Vec<ReqGen>, ctx: &Ctx) -> Result<(Outcome, Sample), String> {
    measure_at(&[server.child.id()], &[server.addr], gens, ctx)
}

/// [`measure`], with the hello server measured just before (its req/s goes into the sample):
/// the machine's speed drifts within a run, so the ratio is taken against the hello run beside
/// the scenario rather than one a minute away.
fn measure_beside_hello(heads: &procs::Heads, gens: Vec<ReqGen>, ctx: &Ctx) -> Result<(Outcome, Sample), String> {
    let hello = hello_now(ctx)?;
    let (outcome, sample) = measure_at(&heads.pids(), &heads.addrs(), gens, ctx)?;
    Ok((outcome, Sample { hello_rps: Some(hello), ..sample }))
}

/// The hello server's req/s now (a server started and measured for the purpose).
fn hello_now(ctx: &Ctx) -> Result<f64, String> {
    let hello = procs::hello(&ctx.bin_dir.join("bench-hello"))?;
    let (outcome, _) = measure(&hello, hello_gens(ctx.common.connections), ctx)?;
    Ok(outcome.rps)
}

/// [`measure`] on given listeners (one per process, the connections dealt out over them) of the
/// processes `pids`.
fn measure_at(
    pids: &[u32],
    addrs: &[std::net::SocketAddr],
    gens: Vec<ReqGen>,
    ctx: &Ctx,
) -> Result<(Outcome, Sample), String> {
    let sampler = procs::RssSampler::start(pids);
    let (warmup, duration) = ctx.duration();
    let outcome = load::run_split(addrs, gens, warmup, duration)?;
    let usage = sampler.stop();
    let total_requests = outcome.rps * (warmup + duration).as_secs_f64();
    let per_req = |d: Duration| d.as_secs_f64() * 1e6 / total_requests.max(1.0);
    Ok((
        outcome,
        Sample {
            rss_kib: usage.peak_kib,
            cpu_us_per_req: per_req(usage.cpu),
            db_cpu_us_per_req: per_req(usage.database),
            load_cpu_us_per_req: per_req(usage.load),
            hello_rps: None,
        },
    ))
}

/// What was sampled from the server process during a run.
#[derive(Debug, Clone, Copy)]
struct Sample {
    rss_kib: u64,
    cpu_us_per_req: f64,
    /// The database servers' CPU (PostgreSQL, MariaDB, Redis processes on this machine).
    db_cpu_us_per_req: f64,
    /// The load generator's CPU (this process).
    load_cpu_us_per_req: f64,
    /// The hello server's req/s measured just before, when it was ([`measure_beside_hello`]).
    hello_rps: Option<f64>,
}

impl Sample {
    /// CPU µs a request cost the server, the databases and the load generator together.
    fn total_cpu_us(&self) -> f64 {
        self.cpu_us_per_req + self.db_cpu_us_per_req + self.load_cpu_us_per_req
    }

    /// The req/s `cores` fully busy cores could serve at this CPU per request: the bound a path
    /// runs into on a machine it shares with its database and its load ([`None`] when nothing
    /// was measured).
    fn cpu_bound_rps(&self, cores: usize) -> Option<f64> {
        let total = self.total_cpu_us();
        (total > 0.0).then(|| cores as f64 * 1e6 / total)
    }

    /// How much of `cores` the three used at `rps`, in percent; the rest was idle or went to other
    /// processes.
    fn cores_busy_percent(&self, rps: f64, cores: usize) -> f64 {
        rps * self.total_cpu_us() / (cores.max(1) as f64 * 1e6) * 100.0
    }
}

/// Each connection cycles over its own users (`u % connections == c`) with their tokens.
fn cached_users(users: &Arc<Vec<String>>, range: std::ops::Range<usize>, conns: usize) -> Vec<ReqGen> {
    (0..conns)
        .map(|c| {
            let mine: Vec<usize> = range.clone().filter(|u| u % conns == c).collect();
            let users = users.clone();
            let mut i = 0usize;
            Box::new(move |_: Option<&[u8]>| {
                let u = *mine.get(i % mine.len().max(1))?;
                i += 1;
                Some(req(&users[u], "0-".into(), Expect::Success))
            }) as ReqGen
        })
        .collect()
}

fn hello_gens(conns: usize) -> Vec<ReqGen> {
    (0..conns)
        .map(|_| Box::new(|_: Option<&[u8]>| Some(Req::get("/", Vec::new(), Expect::Success))) as ReqGen)
        .collect()
}

/// Measures the hello server once, filed as `label`.
fn run_hello(ctx: &Ctx, rows: &mut Vec<Row>, label: &str) -> Result<f64, String> {
    let hello = procs::hello(&ctx.bin_dir.join("bench-hello"))?;
    let gens = hello_gens(ctx.common.connections);
    let (outcome, sample) = measure(&hello, gens, ctx)?;
    let rps = outcome.rps;
    eprintln!("{label}: {:.0} req/s", rps);
    rows.push(Row { backend: "-".into(), scenario: label.into(), outcome, sample, ab: None });
    Ok(rps)
}

const HELLO_FIRST: &str = "hello (axum, fixed JSON), start of run";

/// Measures hello again at the end of a run and returns the mean of the two: this machine's
/// speed drifts during a run (hello has measured 47k–85k req/s on one day), and a ratio against
/// both ends is steadier than one against the start alone.
fn hello_mean(ctx: &Ctx, rows: &mut Vec<Row>, first: f64) -> Result<f64, String> {
    let last = run_hello(ctx, rows, "hello (axum, fixed JSON), end of run")?;
    Ok((first + last) / 2.0)
}

struct Pools {
    users: Arc<Vec<String>>,
    new_users: Arc<Vec<String>>,
    password: Arc<Vec<String>>,
    bad_sig: Arc<Vec<String>>,
    bad_scope: Arc<Vec<String>>,
}

const PASSWORD_CHANGES_PER_USER: usize = 3;

fn pools(ctx: &Ctx, users: usize, new_users: usize) -> Pools {
    let user = |sub: String| Claims { sub, generation: None, scope: SYNC_SCOPE, other_key: false };
    let half = users / 2;
    Pools {
        users: Arc::new(pool(&ctx.cache, "users", users, |i| user(format!("bench{i}")))),
        new_users: Arc::new(pool(&ctx.cache, "new-users", new_users, |i| user(format!("new{i}")))),
        password: Arc::new(pool(
            &ctx.cache,
            &format!("password-{users}"),
            (users - half) * PASSWORD_CHANGES_PER_USER,
            |i| {
                let u = half + i / PASSWORD_CHANGES_PER_USER;
                let g = 1_000_000_000 + (i % PASSWORD_CHANGES_PER_USER) as i64 + 1;
                Claims { sub: format!("bench{u}"), generation: Some(g), scope: SYNC_SCOPE, other_key: false }
            },
        )),
        bad_sig: Arc::new(pool(&ctx.cache, "bad-signature", 100, |i| Claims {
            sub: format!("bench{i}"),
            generation: None,
            scope: SYNC_SCOPE,
            other_key: true,
        })),
        bad_scope: Arc::new(pool(&ctx.cache, "bad-scope", 100, |i| Claims {
            sub: format!("bench{i}"),
            generation: None,
            scope: "unrelated scopes",
            other_key: false,
        })),
    }
}

/// Scenario 4: every request changes the user's keys (new client state, newer keys_changed_at).
fn key_change_gens(p: &Pools, range: std::ops::Range<usize>, conns: usize) -> Vec<ReqGen> {
    (0..conns)
        .map(|c| {
            let mine: Vec<usize> = range.clone().filter(|u| u % conns == c).collect();
            let mut kca = vec![0i64; mine.len()];
            let users = p.users.clone();
            let mut i = 0usize;
            Box::new(move |_: Option<&[u8]>| {
                if mine.is_empty() {
                    return None;
                }
                let k = i % mine.len();
                i += 1;
                kca[k] += 1;
                Some(req(&users[mine[k]], random_key_id(kca[k]), Expect::Success))
            }) as ReqGen
        })
        .collect()
}

/// Scenario 5: Mozilla's load-test mix — valid 3000, bad signature 100, bad scope 100, key
/// change 20, password change 20.
fn mixed_gens(p: &Pools, range: std::ops::Range<usize>, conns: usize) -> Vec<ReqGen> {
    let half = range.start;
    (0..conns)
        .map(|c| {
            let mine: Vec<usize> = range.clone().filter(|u| u % conns == c).collect();
            let mut state: Vec<(i64, String, usize)> = mine.iter().map(|_| (0, "0-".to_string(), 0)).collect();
            let (users, password, bad_sig, bad_scope) =
                (p.users.clone(), p.password.clone(), p.bad_sig.clone(), p.bad_scope.clone());
            let mut rng = rand::rngs::SmallRng::from_rng(&mut rand::rng());
            Box::new(move |_: Option<&[u8]>| {
                if mine.is_empty() {
                    return None;
                }
                let k = rng.random_range(0..mine.len());
                let u = mine[k];
                let pick = rng.random_range(0..3240u32);
                let (kca, key_id, pw_used) = &mut state[k];
                Some(match pick {
                    0..3000 => req(&users[u], key_id.clone(), Expect::Success),
                    3000..3100 => req(&bad_sig[rng.random_range(0..bad_sig.len())], "0-".into(), Expect::Status(401)),
                    3100..3200 => {
                        req(&bad_scope[rng.random_range(0..bad_scope.len())], "0-".into(), Expect::Status(401))
                    }
                    3200..3220 => {
                        *kca += 1;
                        *key_id = random_key_id(*kca);
                        req(&users[u], key_id.clone(), Expect::Success)
                    }
                    _ if *pw_used < PASSWORD_CHANGES_PER_USER => {
                        let token = &password[(u - half) * PASSWORD_CHANGES_PER_USER + *pw_used];
                        *pw_used += 1;
                        req(token, key_id.clone(), Expect::Success)
                    }
                    _ => req(&users[u], key_id.clone(), Expect::Success),
                })
            }) as ReqGen
        })
        .collect()
}

async fn prepare(ctx: &Ctx, backend: Backend, users: u64) -> Result<String, String> {
    let url = populate::fresh_database(backend, &ctx.admin_url(backend)).await?;
    let env = ctx.env(&url, true);
    let bin = ctx.tokenserver();
    procs::tokenserver_cmd(&bin, &env, &["migrate"])?;
    procs::tokenserver_cmd(
        &bin,
        &env,
        &["node", "add", populate::NODE, "--capacity", "1000000000", "--available", "1000000000"],
    )?;
    populate::users(backend, &url, 0, users).await?;
    Ok(url)
}

fn parse_backend(s: &str) -> Result<Backend, String> {
    match s {
        "sqlite" => Ok(Backend::Sqlite),
        "postgres" | "postgresql" => Ok(Backend::Postgres),
        "mysql" | "mariadb" => Ok(Backend::MySql),
        other => Err(format!("unknown backend {other:?}")),
    }
}

async fn run_backend(ctx: &Ctx, backend: Backend, p: &Pools, users: usize, rows: &mut Vec<Row>) -> Result<(), String> {
    let url = prepare(ctx, backend, users as u64).await?;
    let conns = ctx.common.connections;
    let log = ctx.work.join(format!("tokenserver-{}.log", backend.name()));
    let mut push = |scenario: &str, (outcome, sample): (Outcome, Sample)| {
        eprintln!(
            "{} / {scenario}: {} requests in {:.1} s = {:.0} req/s, p99 {:.2} ms, unexpected {}",
            backend.name(),
            outcome.requests,
            outcome.seconds,
            outcome.rps,
            outcome.p99_ms,
            outcome.unexpected
        );
        rows.push(Row { backend: ctx.label(backend.name()), scenario: scenario.into(), outcome, sample, ab: None });
    };

    if ctx.wants(2) {
        let server = ctx.servers(&ctx.env(&url, true), &log)?;
        push(
            "2 existing users, cached JWT",
            measure_beside_hello(&server, cached_users(&p.users, 0..users, conns), ctx)?,
        );
    }
    if ctx.wants(1) {
        let server = ctx.servers(&ctx.env(&url, false), &log)?;
        push(
            "1 existing users, RS256 verify per request",
            measure_beside_hello(&server, cached_users(&p.users, 0..users, conns), ctx)?,
        );
    }
    let server = ctx.servers(&ctx.env(&url, true), &log)?;
    if ctx.wants(3) {
        let next = Arc::new(AtomicUsize::new(0));
        let gens: Vec<ReqGen> = (0..conns)
            .map(|_| {
                let (next, pool) = (next.clone(), p.new_users.clone());
                Box::new(move |_: Option<&[u8]>| {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    pool.get(i).map(|t| req(t, "0-".into(), Expect::Success))
                }) as ReqGen
            })
            .collect();
        push("3 new users (allocation)", measure_beside_hello(&server, gens, ctx)?);
    }
    let half = users / 2;
    if ctx.wants(4) {
        push(
            "4 client-state change per request",
            measure_beside_hello(&server, key_change_gens(p, 0..half, conns), ctx)?,
        );
    }
    if ctx.wants(5) {
        push(
            "5 mixed (Mozilla load-test weights)",
            measure_beside_hello(&server, mixed_gens(p, half..users, conns), ctx)?,
        );
    }
    drop(server);
    Ok(())
}

fn report(rows: &[Row], hello_rps: f64, ctx: &Ctx, title: &str) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "### {title}\n");
    let _ = writeln!(
        md,
        "{} connections, {} s warm-up + {} s measured per scenario, load generator on one core of the same machine. \
         × hello is against the hello req/s beside it: a hello run just before the scenario (session \
         runs: before each server's scenarios at each store size) where the harness measures one, \
         else the mean of the hello runs at the start and the end of the run ({:.0} req/s).\n",
        ctx.common.connections, ctx.common.warmup, ctx.common.duration, hello_rps
    );
    if let Some(b) = &ctx.common.against {
        let _ = writeln!(
            md,
            "A/B: A is `{}`, B `{}`, both up on each store; each scenario measured in {} pairs of runs (A B, then B A, …).\n",
            ctx.tokenserver().display(),
            b.display(),
            ctx.common.rounds.max(1)
        );
    }
    if !ctx.common.server_env.is_empty() {
        let set: Vec<String> = ctx.common.server_env.iter().map(|(k, v)| format!("`{k}={v}`")).collect();
        let _ = writeln!(md, "tokenserver started with {}.\n", set.join(", "));
    }
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let _ = writeln!(
        md,
        "CPU bound × hello: the req/s the machine's {cores} cores would serve if fully busy at the \
         CPU per request measured (server + database + load generator), as a ratio to the same \
         hello; cores busy: the share of the cores those three used.\n"
    );
    let _ = writeln!(
        md,
        "| Backend | Scenario | req/s | × hello | hello req/s | p50 ms | p99 ms | max ms | non-2xx | unexpected | server CPU µs/req | database CPU µs/req | load generator CPU µs/req | CPU bound × hello | cores busy | peak RSS MiB |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let o = &r.outcome;
        let hello = r.sample.hello_rps.unwrap_or(hello_rps);
        let bound = r.sample.cpu_bound_rps(cores).map_or_else(|| "-".to_string(), |b| format!("{:.2}", b / hello));
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.2} | {:.0} | {:.2} | {:.2} | {:.1} | {} | {} | {:.0} | {:.0} | {:.0} | {} | {:.0}% | {:.1} |",
            match r.ab {
                Some((_, side)) => format!("{}, {}", r.backend, side.name()),
                None => r.backend.clone(),
            },
            match r.ab {
                Some((pair, _)) => format!("{}, pair {}", r.scenario, pair + 1),
                None => r.scenario.clone(),
            },
            o.rps,
            o.rps / hello,
            hello,
            o.p50_ms,
            o.p99_ms,
            o.max_ms,
            o.non_2xx,
            o.unexpected + o.errors,
            r.sample.cpu_us_per_req,
            r.sample.db_cpu_us_per_req,
            r.sample.load_cpu_us_per_req,
            bound,
            r.sample.cores_busy_percent(o.rps, cores),
            r.sample.rss_kib as f64 / 1024.0
        );
    }
    if let Some(summary) = ab::summary(rows) {
        let _ = writeln!(md, "\n{summary}");
    }
    md
}

fn write_out(ctx: &Ctx, md: &str) -> Result<(), String> {
    println!("{md}");
    if let Some(path) = &ctx.common.out {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        }
        std::fs::write(path, md).map_err(|e| e.to_string())?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// `--against` is for the access and session runs, whose scenarios share one filled store.
fn refuse_against(common: &Common, command: &str) -> Result<(), String> {
    match common.against {
        Some(_) => Err(format!("--against is for `access` and `sessions`, not `{command}`")),
        None => Ok(()),
    }
}

fn ctx(common: Common) -> Result<Ctx, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin_dir = exe.parent().ok_or("no binary directory")?.to_path_buf();
    let target = bin_dir.parent().unwrap_or(Path::new("."));
    let work = std::env::temp_dir().join(format!("tokenserver-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    Ok(Ctx { bin_dir: bin_dir.clone(), work, cache: target.join("bench-cache"), common })
}

async fn main_async(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Run { common, backends, users, new_users } => {
            refuse_against(&common, "run")?;
            let ctx = ctx(common)?;
            let backends: Vec<Backend> = backends.iter().map(|b| parse_backend(b)).collect::<Result<_, _>>()?;
            let p = pools(&ctx, users, new_users);
            let mut rows = Vec::new();
            let hello = run_hello(&ctx, &mut rows, HELLO_FIRST)?;
            for b in backends {
                run_backend(&ctx, b, &p, users, &mut rows).await?;
            }
            let hello = hello_mean(&ctx, &mut rows, hello)?;
            let md = report(&rows, hello, &ctx, "Sync token endpoint");
            write_out(&ctx, &md)?;
            let _ = std::fs::remove_dir_all(&ctx.work);
            Ok(())
        }
        Command::Sessions { common, backends, sizes, redis_url, redis_cluster_url, api, hakr } => {
            // Each process would have a memory store of its own, and B's would stay empty.
            if common.against.is_some() && backends.iter().any(|b| b == "memory") {
                return Err("--against needs a store both builds share; memory is per process".into());
            }
            let ctx = ctx(common)?;
            let mut rows = Vec::new();
            let hello = run_hello(&ctx, &mut rows, HELLO_FIRST)?;
            if let Some(bin) = &hakr {
                sessions::run_hakr(&ctx, bin, &sizes, &mut rows)?;
            }
            for b in &backends {
                let prefix = format!("bench{}:", std::process::id());
                let url = match b.as_str() {
                    "memory" => "memory:".to_string(),
                    "sqlite" => format!("sqlite://{}/sessions.db", ctx.work.display()),
                    // A database of the harness's own, as for access tokens: a table left in the
                    // server's `postgres` database, or one dropped from whatever database the URL
                    // names, is not the harness's to leave or to drop.
                    "postgres" => populate::fresh_database(Backend::Postgres, &ctx.common.postgres_url).await?,
                    "redis" => format!("{redis_url}?prefix={prefix}"),
                    "redis-cluster" => format!("{redis_cluster_url}?prefix={prefix}"),
                    other => return Err(format!("unknown session backend {other:?}")),
                };
                let ran = sessions::run_backend(&ctx, b, &url, api, &sizes, &mut rows);
                // A failed clean-up is reported, and costs neither the report nor the run.
                if let Err(e) = clear_redis_prefix(&url).await {
                    eprintln!("could not remove the run's Redis keys: {e}");
                }
                ran?;
            }
            let hello = hello_mean(&ctx, &mut rows, hello)?;
            let md = report(&rows, hello, &ctx, "Session tokens");
            write_out(&ctx, &md)?;
            let _ = std::fs::remove_dir_all(&ctx.work);
            Ok(())
        }
        Command::Access { common, backends, big, redis_url, redis_cluster_url } => {
            let ctx = ctx(common)?;
            let mut rows = Vec::new();
            let hello = run_hello(&ctx, &mut rows, HELLO_FIRST)?;
            for b in &backends {
                let prefix = format!("bench{}:", std::process::id());
                let url = match b.as_str() {
                    "sqlite" => format!("sqlite://{}/access.db", ctx.work.display()),
                    "postgres" => populate::fresh_database(Backend::Postgres, &ctx.common.postgres_url).await?,
                    "mysql" => populate::fresh_database(Backend::MySql, &ctx.common.mysql_url).await?,
                    "redis" => format!("{redis_url}?prefix={prefix}"),
                    "redis-cluster" => format!("{redis_cluster_url}?prefix={prefix}"),
                    other => return Err(format!("unknown access-token backend {other:?}")),
                };
                let ran = access::run_backend(&ctx, b, &url, big, &mut rows);
                // A failed clean-up is reported, and costs neither the report nor the run.
                if let Err(e) = clear_redis_prefix(&url).await {
                    eprintln!("could not remove the run's Redis keys: {e}");
                }
                ran?;
            }
            let hello = hello_mean(&ctx, &mut rows, hello)?;
            let md = report(&rows, hello, &ctx, "Access tokens");
            write_out(&ctx, &md)?;
            let _ = std::fs::remove_dir_all(&ctx.work);
            Ok(())
        }
        Command::Scale { common, users } => {
            refuse_against(&common, "scale")?;
            let ctx = ctx(common)?;
            let conns = ctx.common.connections;
            let small = 1000usize;
            let p = pools(&ctx, small, 1);
            let mut rows = Vec::new();
            let hello = run_hello(&ctx, &mut rows, HELLO_FIRST)?;
            let url = prepare(&ctx, Backend::Sqlite, small as u64).await?;
            let log = ctx.work.join("tokenserver-scale.log");
            let server = procs::Heads(vec![procs::tokenserver(&ctx.tokenserver(), &ctx.env(&url, true), &log)?]);
            let (o, sample) = measure_beside_hello(&server, cached_users(&p.users, 0..small, conns), &ctx)?;
            rows.push(Row {
                backend: "SQLite".into(),
                scenario: format!("2 cached JWT, {small} users in DB"),
                outcome: o,
                sample,
                ab: None,
            });
            drop(server);
            eprintln!("bulk-loading {users} users");
            let started = std::time::Instant::now();
            populate::users(Backend::Sqlite, &url, small as u64, users).await?;
            eprintln!("loaded in {:.0} s", started.elapsed().as_secs_f64());
            // 1,000 users spread over the whole table.
            let stride = (users / small as u64).max(1);
            let spread = Arc::new(pool(&ctx.cache, &format!("spread-{users}"), small, |i| Claims {
                sub: format!("bench{}", i as u64 * stride),
                generation: None,
                scope: SYNC_SCOPE,
                other_key: false,
            }));
            let server = procs::Heads(vec![procs::tokenserver(&ctx.tokenserver(), &ctx.env(&url, true), &log)?]);
            let (o, sample) = measure_beside_hello(&server, cached_users(&spread, 0..small, conns), &ctx)?;
            rows.push(Row {
                backend: "SQLite".into(),
                scenario: format!("2 cached JWT, {users} users in DB"),
                outcome: o,
                sample,
                ab: None,
            });
            drop(server);
            let hello = hello_mean(&ctx, &mut rows, hello)?;
            let md = report(&rows, hello, &ctx, "Scale of the user table");
            write_out(&ctx, &md)?;
            let _ = std::fs::remove_dir_all(&ctx.work);
            Ok(())
        }
    }
}

/// Deletes the keys a run left under its `?prefix=` on a Redis server or on every node of a
/// Redis Cluster (`redis+cluster://h:p,h:p/`), so that a shared Redis is as it was (the access
/// tokens would otherwise stay for their two-hour TTL). Other URLs are left alone.
async fn clear_redis_prefix(url: &str) -> Result<(), String> {
    let Some((base, prefix)) = url.split_once("?prefix=") else { return Ok(()) };
    let nodes: Vec<String> = match base.split_once("://") {
        Some(("redis", _)) => vec![base.to_string()],
        Some(("redis+cluster", hosts)) => {
            hosts.trim_end_matches('/').split(',').map(|h| format!("redis://{h}/")).collect()
        }
        _ => return Ok(()),
    };
    let mut removed = 0usize;
    for node in nodes {
        let client = redis::Client::open(node.as_str()).map_err(|e| e.to_string())?;
        let mut conn = client.get_multiplexed_async_connection().await.map_err(|e| e.to_string())?;
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}*"))
                .arg("COUNT")
                .arg(10_000)
                .query_async(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            // One key a command: a cluster node refuses a command whose keys span slots. (A SCAN
            // step may find nothing, and an empty pipeline is an error.)
            if !keys.is_empty() {
                let mut pipe = redis::pipe();
                for key in &keys {
                    pipe.cmd("UNLINK").arg(key).ignore();
                }
                pipe.query_async::<()>(&mut conn).await.map_err(|e| e.to_string())?;
                removed += keys.len();
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    eprintln!("removed the run's {removed} Redis keys (prefix {prefix})");
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(main_async(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tokenserver-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{parse_setting, refuse_against, Cli, Command, Sample};

    fn sample(server: f64, database: f64, load: f64) -> Sample {
        Sample {
            rss_kib: 0,
            cpu_us_per_req: server,
            db_cpu_us_per_req: database,
            load_cpu_us_per_req: load,
            hello_rps: None,
        }
    }

    #[test]
    fn the_cpu_bound_is_the_cores_over_the_cpu_per_request_of_all_three() {
        // 18 + 19 + 8 µs on 2 cores: 2,000,000 / 45 req/s.
        let s = sample(18.0, 19.0, 8.0);
        let bound = s.cpu_bound_rps(2).expect("measured");
        assert!((bound - 2e6 / 45.0).abs() < 1e-6, "{bound}");
        // At 33,745 req/s the three used 1.52 of the 2 cores.
        let busy = s.cores_busy_percent(33_745.0, 2);
        assert!((busy - 75.92625).abs() < 1e-6, "{busy}");
        assert_eq!(sample(0.0, 0.0, 0.0).cpu_bound_rps(2), None);
        assert_eq!(sample(0.0, 0.0, 0.0).cores_busy_percent(1000.0, 0), 0.0);
    }

    #[test]
    fn server_settings_are_key_equals_value() {
        assert_eq!(parse_setting("A_B=4"), Ok(("A_B".into(), "4".into())));
        assert_eq!(parse_setting("A=x=y"), Ok(("A".into(), "x=y".into())));
        assert_eq!(parse_setting("A="), Ok(("A".into(), String::new())));
        assert!(parse_setting("=4").is_err());
        assert!(parse_setting("A").is_err());
    }

    #[test]
    fn a_second_build_is_compared_in_access_and_session_runs_only() {
        let cli = Cli::parse_from(["tokenserver-bench", "access", "--against", "/tmp/B/tokenserver", "--rounds", "4"]);
        let Command::Access { common, .. } = cli.command else { panic!("not the access command") };
        assert_eq!(common.against.as_deref(), Some(std::path::Path::new("/tmp/B/tokenserver")));
        assert_eq!(common.rounds, 4);
        let Command::Sessions { common, .. } = Cli::parse_from(["tokenserver-bench", "sessions"]).command else {
            panic!("not the sessions command")
        };
        assert_eq!((common.against, common.rounds), (None, 3));
        let Command::Run { common, .. } = Cli::parse_from(["tokenserver-bench", "run", "--against", "b"]).command
        else {
            panic!("not the run command")
        };
        assert_eq!(refuse_against(&common, "run"), Err("--against is for `access` and `sessions`, not `run`".into()));
    }
}
