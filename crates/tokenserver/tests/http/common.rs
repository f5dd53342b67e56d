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
use sqlx::sqlite::SqlitePoolOptions;
use sqlx::{Row, SqlitePool};
use tokenserver::app::{self, Running};
use tokenserver::config;
use tokenserver_store::sync::NewNode;

pub const SYNC_SCOPE: &str = "https://identity.mozilla.com/apps/oldsync";
pub const TEST_KEY_PEM: &[u8] = include_bytes!("../fixtures/test-rsa.pem");
pub const OTHER_KEY_PEM: &[u8] = include_bytes!("../fixtures/other-rsa.pem");
pub const TEST_JWK: &str = include_str!("../fixtures/test-rsa.jwk.json");
pub const SECRET: &str = "secret0";
pub const DOMAIN: &str = "test.com";
pub const NODE: &str = "https://example.com";

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

pub struct TestServer {
    pub running: Option<Running>,
    pub base: String,
    pub internal: String,
    pub db: SqlitePool,
    pub fxa: MockFxa,
    pub http: reqwest::Client,
    _dir: TempDir,
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
    /// Starts a server with the default test settings plus `extra` environment-style settings.
    pub async fn start(extra: &[(&str, &str)]) -> Self {
        let fxa = MockFxa::start().await;
        Self::start_with(fxa, extra).await
    }

    pub async fn start_with(fxa: MockFxa, extra: &[(&str, &str)]) -> Self {
        let dir = TempDir::new();
        let db_url = format!("sqlite://{}/ts.db", dir.0.display());
        let mut vars: Vec<(String, String)> = vec![
            ("TOKENSERVER_HOST".into(), "127.0.0.1".into()),
            ("TOKENSERVER_PORT".into(), "0".into()),
            ("TOKENSERVER_INTERNAL__PORT".into(), "0".into()),
            ("TOKENSERVER_DATABASE_URL".into(), db_url.clone()),
            ("SYNC_MASTER_SECRET".into(), SECRET.into()),
            ("SYNC_TOKENSERVER__FXA_METRICS_HASH_SECRET".into(), SECRET.into()),
            ("SYNC_TOKENSERVER__FXA_EMAIL_DOMAIN".into(), DOMAIN.into()),
            ("SYNC_TOKENSERVER__FXA_OAUTH_SERVER_URL".into(), fxa.url.clone()),
        ];
        vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let cfg = config::load(None, &vars).unwrap_or_else(|e| panic!("{e}"));
        let running = app::start(cfg).await.unwrap_or_else(|e| panic!("{e}"));
        let db = SqlitePoolOptions::new().max_connections(2).connect(&db_url).await.unwrap();
        Self {
            base: format!("http://{}", running.public_addr),
            internal: format!("http://{}", running.internal_addr),
            running: Some(running),
            db,
            fxa,
            http: reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap(),
            _dir: dir,
        }
    }

    pub async fn add_node(&self, node: &str, capacity: i64, available: i64) -> i64 {
        let store = &self.running.as_ref().unwrap().state.store;
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

    /// Rows of a user: (uid, generation, client_state, created_at, replaced_at, nodeid, keys_changed_at).
    pub async fn user_rows(&self, user: &str) -> Vec<UserRowView> {
        sqlx::query("SELECT * FROM users WHERE email = ? ORDER BY uid")
            .bind(format!("{user}@{DOMAIN}"))
            .fetch_all(&self.db)
            .await
            .unwrap()
            .iter()
            .map(|r| UserRowView {
                uid: r.get(0),
                service: r.get(1),
                email: r.get(2),
                generation: r.get(3),
                client_state: r.get(4),
                created_at: r.get(5),
                replaced_at: r.get(6),
                nodeid: r.get(7),
                keys_changed_at: r.get(8),
            })
            .collect()
    }

    /// (available, current_load, capacity) of a node.
    pub async fn node_load(&self, id: i64) -> (i64, i64, i64) {
        let r = sqlx::query("SELECT available, current_load, capacity FROM nodes WHERE id = ?")
            .bind(id)
            .fetch_one(&self.db)
            .await
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    }

    pub async fn sql(&self, statement: &str) {
        sqlx::query(statement).execute(&self.db).await.unwrap();
    }

    pub async fn count_users(&self) -> i64 {
        sqlx::query_scalar("SELECT COUNT(*) FROM users").fetch_one(&self.db).await.unwrap()
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
