//! Test harness: a mock FxA, a real tokenserver on port 0, JWT minting and DB access.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use sqlx::Row;
use tokenserver::app::{self, Running};
use tokenserver::config;
use tokenserver_store::sync::NewNode;
use tokenserver_store::testing::{fresh, FreshDb};
use tokenserver_store::Backend;

pub const SYNC_SCOPE: &str = "https://identity.mozilla.com/apps/oldsync";
pub const TEST_KEY_PEM: &[u8] = include_bytes!("../fixtures/test-rsa.pem");
pub const OTHER_KEY_PEM: &[u8] = include_bytes!("../fixtures/other-rsa.pem");
pub const TEST_JWK: &str = include_str!("../fixtures/test-rsa.jwk.json");
pub const SECRET: &str = "secret0";
pub const DOMAIN: &str = "test.com";
pub const NODE: &str = "https://example.com";
/// The admin key every test server is started with (unless a test sets its own).
pub const ADMIN_KEY: &str = "test-admin-key";

pub fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Counters and behaviour of the mock FxA.
#[derive(Default)]
pub struct FxaCounters {
    pub jwks: AtomicUsize,
    pub verify: AtomicUsize,
}

pub struct MockFxa {
    pub url: String,
    pub counters: Arc<FxaCounters>,
}

async fn jwks(State(c): State<Arc<FxaCounters>>) -> Json<Value> {
    c.jwks.fetch_add(1, Ordering::SeqCst);
    let key: Value = serde_json::from_str(TEST_JWK).unwrap();
    Json(json!({ "keys": [key, {"kty": "EC", "crv": "P-256", "x": "x", "y": "y"}] }))
}

/// Like Mozilla's mock: the bearer token is a JSON document `{"status": n, "body": …}`;
/// `{"sleep_ms": n}` delays the answer.
async fn verify(State(c): State<Arc<FxaCounters>>, Json(req): Json<Value>) -> axum::response::Response {
    use axum::response::IntoResponse;
    c.verify.fetch_add(1, Ordering::SeqCst);
    let token = req.get("token").and_then(Value::as_str).unwrap_or("");
    let Ok(doc) = serde_json::from_str::<Value>(token) else {
        return (axum::http::StatusCode::UNAUTHORIZED, Json(json!({"code": 401, "errno": 108}))).into_response();
    };
    if let Some(ms) = doc.get("sleep_ms").and_then(Value::as_u64) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let status = doc.get("status").and_then(Value::as_u64).unwrap_or(200) as u16;
    let body = doc.get("body").cloned().unwrap_or(json!({}));
    (axum::http::StatusCode::from_u16(status).unwrap(), Json(body)).into_response()
}

impl MockFxa {
    pub async fn start() -> Self {
        let counters = Arc::new(FxaCounters::default());
        let app =
            Router::new().route("/v1/jwks", get(jwks)).route("/v1/verify", post(verify)).with_state(counters.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url: format!("http://{addr}"), counters }
    }

    pub fn jwks_hits(&self) -> usize {
        self.counters.jwks.load(Ordering::SeqCst)
    }

    pub fn verify_hits(&self) -> usize {
        self.counters.verify.load(Ordering::SeqCst)
    }
}

/// A bearer token for the mock's remote verification.
pub fn remote_token(user: &str, generation: Option<i64>, status: u16) -> String {
    json!({
        "status": status,
        "body": {"user": user, "generation": generation, "client_id": "fake client id", "scope": [SYNC_SCOPE]}
    })
    .to_string()
}

pub struct Jwt<'a> {
    pub sub: &'a str,
    pub generation: Option<i64>,
    pub scope: &'a str,
    pub exp: Option<i64>,
    pub typ: Option<&'a str>,
    pub kid: Option<&'a str>,
    pub key: &'a [u8],
}

impl<'a> Jwt<'a> {
    pub fn new(sub: &'a str, generation: Option<i64>) -> Self {
        Self {
            sub,
            generation,
            scope: SYNC_SCOPE,
            exp: Some(now_s() as i64 + 3600),
            typ: Some("at+jwt"),
            kid: Some("test-rsa"),
            key: TEST_KEY_PEM,
        }
    }

    pub fn sign(&self) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.typ = self.typ.map(String::from);
        header.kid = self.kid.map(String::from);
        let mut claims = json!({"sub": self.sub, "scope": self.scope, "client_id": "5882386c6d801776", "iss": "https://accounts.firefox.com"});
        if let Some(g) = self.generation {
            claims["fxa-generation"] = json!(g);
        }
        if let Some(e) = self.exp {
            claims["exp"] = json!(e);
        }
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_rsa_pem(self.key).unwrap()).unwrap()
    }
}

/// `X-KeyID` for keys_changed_at and hex client state.
pub fn key_id(kca: i64, client_state_hex: &str) -> String {
    format!("{kca}-{}", URL_SAFE_NO_PAD.encode(hex::decode(client_state_hex).unwrap()))
}

/// Direct access to the server's database, for assertions and for playing "another process".
pub enum TestDb {
    Sqlite(sqlx::SqlitePool),
    Pg(sqlx::PgPool),
    My(sqlx::MySqlPool),
}

/// Runs the same code on whichever pool the test database uses.
/// One test module per case, one `#[tokio::test]` per backend: `per_backend!(sql: a, b)` runs each
/// case on SQLite, PostgreSQL and MySQL, `per_backend!(all: a)` on the Redis backends too. A
/// backend whose `TOKENSERVER_TEST_*` URL is unset is skipped by the case itself (`fresh`).
macro_rules! per_backend {
    (@one $name:ident [$($backend:ident => $variant:ident),+]) => {
        mod $name { $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $backend() { super::$name(tokenserver_store::Backend::$variant).await }
        )+ }
    };
    (sql: $($name:ident),+ $(,)?) => {
        per_backend!(@each [sqlite => Sqlite, postgres => Postgres, mysql => MySql] $($name),+);
    };
    (all: $($name:ident),+ $(,)?) => {
        per_backend!(@each [
            sqlite => Sqlite, postgres => Postgres, mysql => MySql, redis => Redis, redis_cluster => RedisCluster
        ] $($name),+);
    };
    (@each $backends:tt $($name:ident),+) => { $( per_backend!(@one $name $backends); )+ };
}

macro_rules! on_pool {
    ($db:expr, |$p:ident| $body:expr) => {
        match $db {
            TestDb::Sqlite($p) => $body,
            TestDb::Pg($p) => $body,
            TestDb::My($p) => $body,
        }
    };
}

/// An integer column as i64, whether the backend stores INTEGER or BIGINT.
fn int<R: Row>(r: &R, i: usize) -> Option<i64>
where
    usize: sqlx::ColumnIndex<R>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i32: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    r.try_get::<Option<i64>, _>(i).or_else(|_| r.try_get::<Option<i32>, _>(i).map(|v| v.map(i64::from))).unwrap()
}

/// A transaction holding the locks every allocation needs (SQLite's write lock, or the node rows).
pub enum Blocker {
    Sqlite(sqlx::pool::PoolConnection<sqlx::Sqlite>),
    Pg(sqlx::Transaction<'static, sqlx::Postgres>),
    My(sqlx::Transaction<'static, sqlx::MySql>),
}

impl Blocker {
    pub async fn release(self) {
        match self {
            Blocker::Sqlite(mut c) => {
                sqlx::query("ROLLBACK").execute(&mut *c).await.unwrap();
            }
            Blocker::Pg(tx) => tx.rollback().await.unwrap(),
            Blocker::My(tx) => tx.rollback().await.unwrap(),
        }
    }
}

pub struct TestServer {
    pub running: Option<Running>,
    pub base: String,
    pub internal: String,
    pub db: TestDb,
    pub fxa: MockFxa,
    pub http: reqwest::Client,
    /// A client that sends [`ADMIN_KEY`].
    pub admin: reqwest::Client,
    fresh: FreshDb,
    /// The settings it was started with (for [`TestServer::second_head`]).
    vars: Vec<(String, String)>,
}

/// A second tokenserver *process* (the real binary) on the same database and settings as a
/// [`TestServer`]: another web head behind the same load balancer. Stopped when dropped.
pub struct Head {
    child: std::process::Child,
    pub base: String,
    pub internal: String,
    log: std::path::PathBuf,
    _dir: TempDir,
}

impl Drop for Head {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        for _ in 0..200 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Head {
    /// What the process logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new() -> Self {
        let p = std::env::temp_dir().join(format!("ts-test-{}-{}", std::process::id(), rand::random::<u64>()));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct Response {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

impl TestServer {
    /// Starts a server on SQLite with the default test settings plus `extra` environment-style
    /// settings.
    pub async fn start(extra: &[(&str, &str)]) -> Self {
        Self::start_on(Backend::Sqlite, extra).await.unwrap()
    }

    /// Starts a server on a fresh database of `backend`; `None` when that backend is skipped.
    pub async fn start_on(backend: Backend, extra: &[(&str, &str)]) -> Option<Self> {
        let fxa = MockFxa::start().await;
        let db = fresh(backend).await?;
        Some(Self::start_with(fxa, db, extra).await)
    }

    pub async fn start_with(fxa: MockFxa, fresh_db: FreshDb, extra: &[(&str, &str)]) -> Self {
        let mut vars: Vec<(String, String)> = vec![
            ("TOKENSERVER_HOST".into(), "127.0.0.1".into()),
            ("TOKENSERVER_PORT".into(), "0".into()),
            ("TOKENSERVER_INTERNAL__PORT".into(), "0".into()),
            ("TOKENSERVER_DATABASE_URL".into(), fresh_db.url.clone()),
            ("SYNC_MASTER_SECRET".into(), SECRET.into()),
            ("SYNC_TOKENSERVER__FXA_METRICS_HASH_SECRET".into(), SECRET.into()),
            ("SYNC_TOKENSERVER__FXA_EMAIL_DOMAIN".into(), DOMAIN.into()),
            ("SYNC_TOKENSERVER__FXA_OAUTH_SERVER_URL".into(), fxa.url.clone()),
            ("TOKENSERVER_INTERNAL__ADMIN_KEY".into(), ADMIN_KEY.into()),
            // HaKr's API has no key; the tests talk to a loopback listener, where that is allowed.
            ("TOKENSERVER_SESSIONS__REQUIRE_API_KEY".into(), "false".into()),
            ("TOKENSERVER_ACCESS__REQUIRE_API_KEY".into(), "false".into()),
        ];
        vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let cfg = config::load(None, &vars).unwrap_or_else(|e| panic!("{e}"));
        let started_with = vars.clone();
        let running = app::start(cfg).await.unwrap_or_else(|e| panic!("{e}"));
        let db = match fresh_db.backend {
            Backend::Sqlite => TestDb::Sqlite(sqlx::SqlitePool::connect(&fresh_db.url).await.unwrap()),
            Backend::Postgres => TestDb::Pg(sqlx::PgPool::connect(&fresh_db.url).await.unwrap()),
            Backend::MySql => TestDb::My(sqlx::MySqlPool::connect(&fresh_db.url).await.unwrap()),
            other => panic!("{other:?} holds no Sync database"),
        };
        Self {
            base: running.public_addr.map(|a| format!("http://{a}")).unwrap_or_default(),
            internal: format!("http://{}", running.internal_addr),
            running: Some(running),
            db,
            fxa,
            http: reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap(),
            admin: reqwest::Client::builder()
                .default_headers(
                    [(reqwest::header::AUTHORIZATION, format!("Bearer {ADMIN_KEY}").parse().unwrap())]
                        .into_iter()
                        .collect(),
                )
                .build()
                .unwrap(),
            fresh: fresh_db,
            vars: started_with,
        }
    }

    /// Starts the real binary with this server's settings (its database, secrets, mock FxA) on
    /// ports of its own, and waits until it answers.
    pub async fn second_head(&self) -> Head {
        let dir = TempDir::new();
        let log = dir.0.join("head.log");
        let (public, internal) = (free_port(), free_port());
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tokenserver"));
        cmd.arg("serve")
            .current_dir(&dir.0)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("TOKENSERVER_PORT", public.to_string())
            .env("TOKENSERVER_INTERNAL__PORT", internal.to_string())
            .env("TOKENSERVER_HUMAN_LOGS", "true")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let head = Head {
            child: cmd.spawn().unwrap(),
            base: format!("http://127.0.0.1:{public}"),
            internal: format!("http://127.0.0.1:{internal}"),
            log,
            _dir: dir,
        };
        for _ in 0..200 {
            if let Ok(r) = self.http.get(format!("{}/__lbheartbeat__", head.internal)).send().await {
                if r.status() == 200 {
                    return head;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the second head did not start: {}", head.log());
    }

    /// The database URL the server runs on.
    pub fn db_url(&self) -> &str {
        &self.fresh.url
    }

    /// Stops the server and drops its database.
    pub async fn finish(mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
        on_pool!(&self.db, |p| p.close().await);
        self.fresh.drop_now().await;
    }

    /// Holds the locks an allocation needs until [`Blocker::release`].
    pub async fn block_allocations(&self) -> Blocker {
        match &self.db {
            TestDb::Sqlite(p) => {
                let mut c = p.acquire().await.unwrap();
                sqlx::query("BEGIN IMMEDIATE").execute(&mut *c).await.unwrap();
                Blocker::Sqlite(c)
            }
            TestDb::Pg(p) => {
                let mut tx = p.begin().await.unwrap();
                sqlx::query("SELECT id FROM nodes FOR UPDATE").fetch_all(&mut *tx).await.unwrap();
                Blocker::Pg(tx)
            }
            TestDb::My(p) => {
                let mut tx = p.begin().await.unwrap();
                sqlx::query("SELECT id FROM nodes FOR UPDATE").fetch_all(&mut *tx).await.unwrap();
                Blocker::My(tx)
            }
        }
    }

    pub async fn add_node(&self, node: &str, capacity: i64, available: i64) -> i64 {
        let store = &self.running.as_ref().unwrap().state.sync.as_ref().expect("Sync is on").store;
        let rec = store
            .add_node(&NewNode {
                service: "sync-1.5",
                node,
                capacity,
                available,
                current_load: 0,
                downed: false,
                backoff: false,
            })
            .await
            .unwrap();
        rec.state.id
    }

    pub async fn request(&self, method: reqwest::Method, path: &str, headers: &[(&str, &[u8])]) -> Response {
        let mut req = self.http.request(method, format!("{}{}", self.base, path));
        for (k, v) in headers {
            req = req.header(*k, reqwest::header::HeaderValue::from_bytes(v).unwrap());
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.text().await.unwrap();
        Response { status, headers, body }
    }

    /// `GET /1.0/sync/1.5` with a bearer token and X-KeyID.
    pub async fn token(&self, bearer: &str, kid: &str) -> Response {
        self.get_path("/1.0/sync/1.5", bearer, kid).await
    }

    pub async fn get_path(&self, path: &str, bearer: &str, kid: &str) -> Response {
        let auth = format!("Bearer {bearer}");
        self.request(reqwest::Method::GET, path, &[("authorization", auth.as_bytes()), ("x-keyid", kid.as_bytes())])
            .await
    }

    /// Rows of a user, all columns in Mozilla's order.
    pub async fn user_rows(&self, user: &str) -> Vec<UserRowView> {
        let sql = format!("SELECT * FROM users WHERE email = '{user}@{DOMAIN}' ORDER BY uid");
        on_pool!(&self.db, |p| sqlx::query(&sql)
            .fetch_all(p)
            .await
            .unwrap()
            .iter()
            .map(|r| UserRowView {
                uid: int(r, 0).unwrap(),
                service: int(r, 1).unwrap(),
                email: r.get(2),
                generation: int(r, 3).unwrap(),
                client_state: r.get(4),
                created_at: int(r, 5).unwrap(),
                replaced_at: int(r, 6),
                nodeid: int(r, 7).unwrap(),
                keys_changed_at: int(r, 8),
            })
            .collect())
    }

    /// (available, current_load, capacity) of a node.
    pub async fn node_load(&self, id: i64) -> (i64, i64, i64) {
        let sql = format!("SELECT available, current_load, capacity FROM nodes WHERE id = {id}");
        on_pool!(&self.db, |p| {
            let r = sqlx::query(&sql).fetch_one(p).await.unwrap();
            (int(&r, 0).unwrap(), int(&r, 1).unwrap(), int(&r, 2).unwrap())
        })
    }

    /// Runs a statement as another process would.
    pub async fn sql(&self, statement: &str) {
        on_pool!(&self.db, |p| {
            sqlx::query(statement).execute(p).await.unwrap();
        })
    }

    /// Every node's (id, current_load, distinct users assigned to it), by id.
    pub async fn loads_and_users(&self) -> Vec<(i64, i64, i64)> {
        let sql = "SELECT id, current_load, (SELECT COUNT(DISTINCT email) FROM users WHERE users.nodeid = nodes.id) \
                   FROM nodes ORDER BY id";
        on_pool!(&self.db, |p| sqlx::query(sql)
            .fetch_all(p)
            .await
            .unwrap()
            .iter()
            .map(|r| (int(r, 0).unwrap(), int(r, 1).unwrap(), int(r, 2).unwrap()))
            .collect())
    }

    pub async fn count_users(&self) -> i64 {
        on_pool!(&self.db, |p| {
            let r = sqlx::query("SELECT COUNT(*) FROM users").fetch_one(p).await.unwrap();
            int(&r, 0).unwrap()
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRowView {
    pub uid: i64,
    pub service: i64,
    pub email: String,
    pub generation: i64,
    pub client_state: String,
    pub created_at: i64,
    pub replaced_at: Option<i64>,
    pub nodeid: i64,
    pub keys_changed_at: Option<i64>,
}

/// The exact Cornice body of a catalogue error.
pub fn error_body(status: &str, location: &str, name: &str, description: &str) -> String {
    format!(
        r#"{{"status":"{status}","errors":[{{"location":"{location}","name":"{name}","description":"{description}"}}]}}"#
    )
}

pub fn assert_error(resp: &Response, http: u16, status: &str, location: &str, name: &str, description: &str) {
    assert_eq!(resp.status, http, "body: {}", resp.body);
    assert_eq!(resp.body, error_body(status, location, name, description));
    assert_eq!(resp.headers.get("content-type").unwrap(), "application/json");
    assert!(resp.headers.get("x-timestamp").is_none());
}

pub const UNAUTHORIZED: (&str, &str, &str, &str) = ("error", "body", "", "Unauthorized");
pub const INVALID_CREDENTIALS: (&str, &str, &str, &str) = ("invalid-credentials", "body", "", "Unauthorized");

pub fn assert_401(resp: &Response, e: (&str, &str, &str, &str)) {
    assert_error(resp, 401, e.0, e.1, e.2, e.3);
}

/// Runs the binary in `dir` with `args` (and `env` on top of ours, without SYNC_MASTER_SECRET):
/// (exit code, stdout, stderr).
pub fn cli(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tokenserver"));
    cmd.current_dir(dir).args(args).env_remove("SYNC_MASTER_SECRET");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// One request written by hand on a fresh connection to `base` (`http://host:port`), its body in
/// one chunk of `Transfer-Encoding: chunked`, so that the server learns its size only by reading
/// it: (status, body). The server may answer before the body is all sent; write errors are
/// ignored for that reason.
pub async fn chunked_request(
    base: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(base.trim_start_matches("http://")).await.unwrap();
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("\r\n{:x}\r\n", body.len()));
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body).await;
    let _ = stream.write_all(b"\r\n0\r\n\r\n").await;
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "no answer within 20 s");
    let out = String::from_utf8_lossy(&out).into_owned();
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}
