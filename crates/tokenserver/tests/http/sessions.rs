//! Session-token routes, black box over HTTP: HaKr's `/token` API route by route (statuses,
//! content types, exact bodies), the v1 API, reuse detection, limits, keys, and the same flow on
//! every session backend.

use std::time::Duration;

use serde_json::{json, Value};
use tokenserver_store::testing::fresh;
use tokenserver_store::Backend;

use crate::common::{Response, TestServer};

const HAKR_REJECT_CT: &str = "text/plain; charset=utf-8";

async fn send(server: &TestServer, method: &str, path: &str, content_type: Option<&str>, body: &str) -> Response {
    send_auth(server, method, path, content_type, body, None).await
}

async fn send_auth(
    server: &TestServer,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &str,
    bearer: Option<&str>,
) -> Response {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = server.http.request(method, format!("{}{path}", server.internal)).body(body.to_string());
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    if let Some(b) = bearer {
        req = req.header("authorization", format!("Bearer {b}"));
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.text().await.unwrap();
    Response { status, headers, body }
}

fn ct(r: &Response) -> &str {
    r.headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("")
}

const JSON: Option<&str> = Some("application/json");

async fn hakr_create(server: &TestServer, meta: Value) -> String {
    let r = send(server, "POST", "/token", JSON, &json!({ "meta": meta }).to_string()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(ct(&r), "text/plain; charset=utf-8");
    r.body
}

async fn hakr_put(server: &TestServer, token: &str, meta: Option<Value>) -> Response {
    let mut body = json!({ "token": token });
    if let Some(m) = meta {
        body["meta"] = m;
    }
    send(server, "PUT", "/token", JSON, &body.to_string()).await
}

fn ok_token(r: &Response) -> String {
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(ct(r), "application/json");
    r.json()["Ok"]["token"].as_str().unwrap_or_else(|| panic!("not Ok: {}", r.body)).to_string()
}

#[tokio::test]
async fn hakr_create_returns_a_plain_text_token() {
    let server = TestServer::start(&[]).await;
    let token = hakr_create(&server, json!({"name": "My user", "year": 2022, "period": 11})).await;
    assert_eq!(token.len(), 48);
    assert!(token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    // Content types HaKr accepts; unknown top-level fields are ignored.
    for ct in ["application/json; charset=utf-8", "application/vnd.x+json"] {
        let r = send(&server, "POST", "/token", Some(ct), r#"{"meta":{},"extra":1}"#).await;
        assert_eq!(r.status, 200, "{ct}: {}", r.body);
    }
    // Only the hash is stored.
    let stored: Vec<(Vec<u8>, String)> = match &server.db {
        crate::common::TestDb::Sqlite(p) => {
            sqlx::query_as("SELECT token_hash, meta FROM tokenserver_sessions").fetch_all(p).await.unwrap()
        }
        _ => unreachable!(),
    };
    assert_eq!(stored.len(), 3);
    assert!(stored.iter().all(|(h, _)| h.len() == 32 && !String::from_utf8_lossy(h).contains(&token)));
    assert!(stored.iter().any(|(_, m)| m == r#"{"name":"My user","period":11,"year":2022}"#));
    server.finish().await;
}

#[tokio::test]
async fn hakr_rejections_are_axums_plain_text_ones() {
    let server = TestServer::start(&[]).await;
    let cases: &[(&str, Option<&str>, &str, u16, &str)] = &[
        ("POST", None, r#"{"meta":{}}"#, 415, "Expected request with `Content-Type: application/json`"),
        ("POST", Some("text/xml"), r#"{"meta":{}}"#, 415, "Expected request with `Content-Type: application/json`"),
        ("POST", JSON, "", 400, "Failed to parse the request body as JSON: EOF while parsing a value at line 1 column 0"),
        ("POST", JSON, r#"{"meta":"#, 400, "Failed to parse the request body as JSON: meta: EOF while parsing a value at line 1 column 8"),
        ("POST", JSON, r#"{"meta":42}"#, 422, "Failed to deserialize the JSON body into the target type: meta: invalid type: integer `42`, expected a map at line 1 column 10"),
        ("POST", JSON, r#"{"meta":null}"#, 422, "Failed to deserialize the JSON body into the target type: meta: invalid type: null, expected a map at line 1 column 12"),
        ("POST", JSON, "{}", 422, "Failed to deserialize the JSON body into the target type: missing field `meta` at line 1 column 2"),
        ("POST", JSON, "[]", 422, "Failed to deserialize the JSON body into the target type: invalid length 0, expected struct CreatePayload with 1 element at line 1 column 2"),
        ("PUT", JSON, r#"{"meta":{}}"#, 422, "Failed to deserialize the JSON body into the target type: missing field `token` at line 1 column 11"),
        ("PUT", JSON, r#"{"token":123}"#, 422, "Failed to deserialize the JSON body into the target type: token: invalid type: integer `123`, expected a string at line 1 column 12"),
        ("DELETE", JSON, "", 400, "Failed to parse the request body as JSON: EOF while parsing a value at line 1 column 0"),
        ("DELETE", None, r#"{"token":"x"}"#, 415, "Expected request with `Content-Type: application/json`"),
    ];
    for (method, content_type, body, status, text) in cases {
        let r = send(&server, method, "/token", *content_type, body).await;
        assert_eq!((r.status, r.body.as_str()), (*status, *text), "{method} {body}");
        assert_eq!(ct(&r), HAKR_REJECT_CT, "{method} {body}");
    }
    // A body over the limit.
    let big = format!(r#"{{"meta":{{"k":"{}"}}}}"#, "x".repeat(70 * 1024));
    let r = send(&server, "POST", "/token", JSON, &big).await;
    assert_eq!((r.status, r.body.as_str()), (413, "Failed to buffer the request body: length limit exceeded"));
    // Fallbacks.
    let r = send(&server, "GET", "/token", None, "").await;
    assert_eq!((r.status, r.body.as_str()), (405, ""));
    let allow = r.headers.get("allow").unwrap().to_str().unwrap().to_string();
    let mut methods: Vec<&str> = allow.split(',').map(str::trim).collect();
    methods.sort();
    assert_eq!(methods, ["DELETE", "POST", "PUT"]);
    assert_eq!(send(&server, "GET", "/nope", None, "").await.status, 404);
    server.finish().await;
}

#[tokio::test]
async fn hakr_put_rotates_merges_shallowly_and_always_answers_200() {
    let server = TestServer::start(&[]).await;
    let t1 = hakr_create(&server, json!({"name": "My user", "a": {"x": 1}})).await;
    let r = hakr_put(&server, &t1, Some(json!({"a": {"y": 2}, "z": null, "year": 2023, "period": 11}))).await;
    let t2 = ok_token(&r);
    assert_ne!(t2, t1);
    // Exact body: keys sorted, nested object replaced, null stored.
    assert_eq!(
        r.body,
        format!(
            r#"{{"Ok":{{"token":"{t2}","meta":{{"a":{{"y":2}},"name":"My user","period":11,"year":2023,"z":null}}}}}}"#
        )
    );
    // A 422 does not consume the token.
    let bad = send(&server, "PUT", "/token", JSON, &format!(r#"{{"token":"{t2}","meta":42}}"#)).await;
    assert_eq!(bad.status, 422);
    // meta null, absent or {} change nothing but still rotate.
    let t3 = ok_token(&hakr_put(&server, &t2, Some(Value::Null)).await);
    let t4 = ok_token(&hakr_put(&server, &t3, None).await);
    let r = hakr_put(&server, &t4, Some(json!({}))).await;
    let t5 = ok_token(&r);
    assert_eq!(
        r.json()["Ok"]["meta"],
        json!({"a": {"y": 2}, "name": "My user", "period": 11, "year": 2023, "z": null})
    );
    // Unknown and malformed tokens: 200 with the error body.
    for token in ["87b3d203-252a-4202-a352-2ce800049715", "", &"A".repeat(43), &"A".repeat(47), &"A".repeat(48)] {
        let r = hakr_put(&server, token, None).await;
        assert_eq!((r.status, ct(&r), r.body.as_str()), (200, "application/json", r#"{"Err":"InvalidToken"}"#));
    }
    ok_token(&hakr_put(&server, &t5, None).await);
    server.finish().await;
}

#[tokio::test]
async fn hakr_delete_is_202_for_known_and_unknown_tokens() {
    let server = TestServer::start(&[]).await;
    let t = hakr_create(&server, json!({})).await;
    for token in [t.as_str(), t.as_str(), "unknown"] {
        let r = send(&server, "DELETE", "/token", JSON, &json!({ "token": token }).to_string()).await;
        assert_eq!((r.status, r.body.as_str()), (202, ""));
        assert!(r.headers.get("content-type").is_none());
    }
    assert_eq!(hakr_put(&server, &t, None).await.body, r#"{"Err":"InvalidToken"}"#);
    server.finish().await;
}

#[tokio::test]
async fn hakr_dump_is_opt_in() {
    let server = TestServer::start(&[]).await;
    assert_eq!(send(&server, "HEAD", "/dump", None, "").await.status, 404);
    server.finish().await;
    // Enabled: mounted only when DEBUG logging is on for tokenserver (HaKr's rule). The test
    // process installs no subscriber, so DEBUG is off and the route stays unmounted.
    let server = TestServer::start(&[("TOKENSERVER_SESSIONS__DUMP_ENABLED", "1")]).await;
    let debug = tracing::enabled!(target: "tokenserver", tracing::Level::DEBUG);
    let r = send(&server, "HEAD", "/dump", None, "").await;
    assert_eq!(r.status, if debug { 202 } else { 404 });
    server.finish().await;
}

#[tokio::test]
async fn expiry_and_sliding_lifetime() {
    let server = TestServer::start(&[
        ("TOKENSERVER_SESSIONS__TOKEN_LIFETIME", "1500ms"),
        ("TOKENSERVER_SESSIONS__GRACE_PERIOD", "0s"),
        ("TOKENSERVER_SESSIONS__PURGE_INTERVAL", "200ms"),
    ])
    .await;
    let t1 = hakr_create(&server, json!({})).await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    let t2 = ok_token(&hakr_put(&server, &t1, None).await);
    tokio::time::sleep(Duration::from_millis(900)).await;
    // 1.8 s after creation, but 0.9 s after its rotation: still valid (sliding expiry).
    let t3 = ok_token(&hakr_put(&server, &t2, None).await);
    tokio::time::sleep(Duration::from_millis(1700)).await;
    assert_eq!(hakr_put(&server, &t3, None).await.body, r#"{"Err":"InvalidToken"}"#);
    server.finish().await;
}

async fn v1(server: &TestServer, method: &str, path: &str, body: Value) -> Response {
    send(server, method, path, JSON, &body.to_string()).await
}

fn envelope(r: &Response) -> (u16, String) {
    assert_eq!(ct(r), "application/json", "{}", r.body);
    (r.status, r.json()["error"].as_str().unwrap_or("").to_string())
}

#[tokio::test]
async fn v1_create_rotate_with_merge_patch_and_delete() {
    let server = TestServer::start(&[]).await;
    let r = v1(&server, "POST", "/v1/sessions", json!({"meta": {"user": "u1", "prefs": {"a": 1, "b": 2}}, "ttl": 600}))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let created = r.json();
    let t1 = created["token"].as_str().unwrap().to_string();
    assert_eq!(created["meta"], json!({"prefs": {"a": 1, "b": 2}, "user": "u1"}));
    let expires = humantime::parse_rfc3339(created["expires_at"].as_str().unwrap()).unwrap();
    let in_s = expires.duration_since(std::time::SystemTime::now()).unwrap_or_default().as_secs();
    assert!((595..=600).contains(&in_s), "ttl honoured: {in_s}");

    let r = v1(
        &server,
        "POST",
        "/v1/sessions/rotate",
        json!({"token": t1, "meta": {"prefs": {"a": null, "c": 3}, "user": null, "role": "admin"}}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let t2 = r.json()["token"].as_str().unwrap().to_string();
    assert_eq!(r.json()["meta"], json!({"prefs": {"b": 2, "c": 3}, "role": "admin"}));
    assert_ne!(t1, t2);

    // Retry inside the grace window: same successor, same metadata.
    let r = v1(&server, "POST", "/v1/sessions/rotate", json!({"token": t1, "meta": {"role": "other"}})).await;
    assert_eq!((r.status, r.json()["token"].as_str().unwrap()), (200, t2.as_str()));
    assert_eq!(r.json()["meta"]["role"], "admin");

    assert_eq!(v1(&server, "DELETE", "/v1/sessions", json!({"token": t2})).await.status, 204);
    assert_eq!(
        envelope(&v1(&server, "DELETE", "/v1/sessions", json!({"token": t2})).await),
        (404, "session_not_found".into())
    );
    assert_eq!(
        envelope(&v1(&server, "POST", "/v1/sessions/rotate", json!({"token": t2})).await),
        (401, "invalid_token".into())
    );
    server.finish().await;
}

#[tokio::test]
async fn v1_reuse_after_the_grace_window_revokes_the_session() {
    let server = TestServer::start(&[("TOKENSERVER_SESSIONS__GRACE_PERIOD", "300ms")]).await;
    let t1 =
        v1(&server, "POST", "/v1/sessions", json!({"meta": {}})).await.json()["token"].as_str().unwrap().to_string();
    let t2 = v1(&server, "POST", "/v1/sessions/rotate", json!({"token": t1})).await.json()["token"]
        .as_str()
        .unwrap()
        .to_string();
    tokio::time::sleep(Duration::from_millis(400)).await;
    // The stolen old token is presented: refused, and the legitimate successor dies with it.
    assert_eq!(envelope(&v1(&server, "POST", "/v1/sessions/rotate", json!({"token": t1})).await).0, 401);
    assert_eq!(envelope(&v1(&server, "POST", "/v1/sessions/rotate", json!({"token": t2})).await).0, 401);
    server.finish().await;
}

#[tokio::test]
async fn v1_errors_use_the_envelope() {
    let server = TestServer::start(&[
        ("TOKENSERVER_SESSIONS__MAX_META_BYTES", "64"),
        ("TOKENSERVER_SESSIONS__MAX_META_DEPTH", "2"),
        ("TOKENSERVER_SESSIONS__MAX_META_KEYS", "3"),
        ("TOKENSERVER_SESSIONS__MAX_AGE", "2h"),
    ])
    .await;
    let cases = [
        (json!({"meta": {"k": "x".repeat(80)}}), 413, "metadata_too_large"),
        (json!({"meta": {"a": {"b": {}}}}), 422, "metadata_too_deep"),
        (json!({"meta": {"a": 1, "b": 2, "c": 3, "d": 4}}), 422, "metadata_too_many_keys"),
        (json!({"meta": 42}), 422, "invalid_body"),
        (json!({"meta": {}, "ttl": 0}), 422, "invalid_ttl"),
        (json!({"meta": {}, "ttl": 7201}), 422, "invalid_ttl"),
        (json!({"meta": {}, "unknown": 1}), 422, "invalid_body"),
        // An object, not its fields in a row.
        (json!([{}, 60]), 422, "invalid_body"),
    ];
    for (body, status, code) in cases {
        let r = v1(&server, "POST", "/v1/sessions", body.clone()).await;
        assert_eq!(envelope(&r), (status, code.to_string()), "{body}");
    }
    let r = send(&server, "POST", "/v1/sessions", None, "{}").await;
    assert_eq!(envelope(&r), (415, "unsupported_media_type".into()));
    let r = send(&server, "POST", "/v1/sessions", JSON, "{").await;
    assert_eq!(envelope(&r), (400, "invalid_json".into()));
    let r = send(&server, "POST", "/v1/sessions", JSON, &"x".repeat(70 * 1024)).await;
    assert_eq!(envelope(&r), (413, "body_too_large".into()));
    // A rotation whose merged metadata breaks a limit changes nothing.
    let t = v1(&server, "POST", "/v1/sessions", json!({"meta": {"a": 1}})).await.json()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let r = v1(&server, "POST", "/v1/sessions/rotate", json!({"token": t, "meta": {"b": 1, "c": 2, "d": 3}})).await;
    assert_eq!(envelope(&r), (422, "metadata_too_many_keys".into()));
    let r = v1(&server, "POST", "/v1/sessions/rotate", json!({"token": t, "meta": [1]})).await;
    assert_eq!(envelope(&r), (422, "invalid_body".into()));
    let r = v1(&server, "POST", "/v1/sessions/rotate", json!({"token": t})).await;
    assert_eq!((r.status, r.json()["meta"].clone()), (200, json!({"a": 1})));
    // HaKr's routes report limits in text.
    let r = send(&server, "POST", "/token", JSON, &json!({"meta": {"a": {"b": {}}}}).to_string()).await;
    assert_eq!((r.status, r.body.as_str()), (422, "metadata nests deeper than the limit of 2 levels"));
    server.finish().await;
}

#[tokio::test]
async fn dump_needs_the_admin_key_and_lists_no_tokens() {
    // No key configured: one is generated (SQLite keeps it), and the dump answers only to it.
    let server = TestServer::start(&[("TOKENSERVER_INTERNAL__ADMIN_KEY", "")]).await;
    let r = send(&server, "GET", "/v1/sessions/dump", None, "").await;
    assert_eq!(envelope(&r), (401, "unauthorized".into()));
    server.finish().await;

    let server = TestServer::start(&[("TOKENSERVER_INTERNAL__ADMIN_KEY", "adm")]).await;
    let t = hakr_create(&server, json!({"who": "dumped"})).await;
    let r = send(&server, "GET", "/v1/sessions/dump", None, "").await;
    assert_eq!(envelope(&r), (401, "unauthorized".into()));
    // A malformed query is not judged before the key, and then in JSON.
    let r = send(&server, "GET", "/v1/sessions/dump?limit=abc", None, "").await;
    assert_eq!(envelope(&r), (401, "unauthorized".into()));
    let r = send_auth(&server, "GET", "/v1/sessions/dump?limit=abc", None, "", Some("adm")).await;
    assert_eq!(envelope(&r), (422, "invalid_limit".into()));
    let r = send_auth(&server, "GET", "/v1/sessions/dump?limit=10", None, "", Some("adm")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let body = r.json();
    assert_eq!(body["sessions"].as_array().unwrap().len(), 1);
    assert_eq!(body["sessions"][0]["meta"], json!({"who": "dumped"}));
    assert_eq!(body["records"], 1);
    assert!(!r.body.contains(&t));
    let r = send_auth(&server, "GET", "/v1/sessions/dump?limit=5000", None, "", Some("adm")).await;
    assert_eq!(envelope(&r), (422, "invalid_limit".into()));
    server.finish().await;
}

#[tokio::test]
async fn api_key_guards_the_session_routes() {
    let server = TestServer::start(&[("TOKENSERVER_SESSIONS__API_KEY", "k1")]).await;
    let r = send_auth(&server, "POST", "/v1/sessions", JSON, r#"{"meta":{"n":1}}"#, Some("k1")).await;
    assert_eq!(r.status, 201);
    let token = r.json()["token"].as_str().unwrap().to_string();
    let with_token = format!(r#"{{"token":"{token}"}}"#);
    // Every route but the dumps, without the key and with a wrong one: refused before anything
    // of the request is read or done (the session is neither rotated nor ended).
    let refused = json!({"error": "unauthorized", "message": "a valid sessions.api_key is required"});
    for (method, path, body) in [
        ("POST", "/token", r#"{"meta":{}}"#),
        ("PUT", "/token", with_token.as_str()),
        ("DELETE", "/token", with_token.as_str()),
        ("POST", "/v1/sessions", r#"{"meta":{}}"#),
        ("POST", "/v1/sessions/rotate", with_token.as_str()),
        ("DELETE", "/v1/sessions", with_token.as_str()),
    ] {
        for key in [None, Some("k2")] {
            let r = send_auth(&server, method, path, JSON, body, key).await;
            assert_eq!((r.status, r.json()), (401, refused.clone()), "{method} {path} {key:?}");
        }
    }
    let r = send_auth(&server, "POST", "/v1/sessions/rotate", JSON, &with_token, Some("k1")).await;
    assert_eq!((r.status, r.json()["meta"].clone()), (200, json!({"n": 1})), "{}", r.body);
    server.finish().await;
}

#[tokio::test]
async fn sessions_survive_a_restart_on_sqlite() {
    let dir = crate::common::TempDir::new();
    let url = format!("sqlite://{}/sessions.db", dir.0.display());
    let settings = [("TOKENSERVER_SESSIONS__URL", url.as_str())];
    let server = TestServer::start(&settings).await;
    let t1 = hakr_create(&server, json!({"kept": true})).await;
    server.finish().await;
    let server = TestServer::start(&settings).await;
    let r = hakr_put(&server, &t1, None).await;
    ok_token(&r);
    assert_eq!(r.json()["Ok"]["meta"], json!({"kept": true}));
    server.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_rotations_of_one_token_over_http() {
    let server = TestServer::start(&[("TOKENSERVER_SESSIONS__GRACE_PERIOD", "0s")]).await;
    let t = hakr_create(&server, json!({})).await;
    let puts = (0..32).map(|_| hakr_put(&server, &t, None));
    let results = futures::future::join_all(puts).await;
    let oks = results.iter().filter(|r| r.body.starts_with(r#"{"Ok""#)).count();
    assert_eq!(oks, 1, "exactly one rotation succeeds");
    assert!(results.iter().all(|r| r.status == 200));
    server.finish().await;
}

async fn flow_on(backend: Backend) {
    let Some(db) = fresh(backend).await else { return };
    let server = TestServer::start(&[("TOKENSERVER_SESSIONS__URL", db.url.as_str())]).await;
    let t1 = hakr_create(&server, json!({"b": 1})).await;
    let t2 = ok_token(&hakr_put(&server, &t1, Some(json!({"a": 2}))).await);
    let r = v1(&server, "POST", "/v1/sessions/rotate", json!({"token": t2, "meta": {"b": null}})).await;
    assert_eq!((r.status, r.json()["meta"].clone()), (200, json!({"a": 2})));
    let t3 = r.json()["token"].as_str().unwrap().to_string();
    assert_eq!(v1(&server, "DELETE", "/v1/sessions", json!({"token": t3})).await.status, 204);
    assert_eq!(hakr_put(&server, &t3, None).await.body, r#"{"Err":"InvalidToken"}"#);
    server.finish().await;
    db.drop_now().await;
}

#[tokio::test]
async fn flow_on_memory() {
    flow_on(Backend::Memory).await;
}

#[tokio::test]
async fn flow_on_postgres() {
    flow_on(Backend::Postgres).await;
}

#[tokio::test]
async fn flow_on_redis() {
    flow_on(Backend::Redis).await;
}

#[tokio::test]
async fn flow_on_redis_cluster() {
    flow_on(Backend::RedisCluster).await;
}

/// The real binary with HaKr's dump on: `HEAD /dump` needs the admin key and logs the sessions in
/// lines of at most 100 (HaKr wrote them all into one line).
#[tokio::test]
async fn hakr_dump_needs_the_admin_key_and_logs_in_bounded_lines() {
    use std::io::BufRead;
    let dir = crate::common::TempDir::new();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tokenserver"))
        .current_dir(&dir.0)
        .env_clear()
        .envs([
            ("TOKENSERVER_PORT", "0"),
            ("TOKENSERVER_INTERNAL__PORT", "0"),
            ("SYNC_MASTER_SECRET", "s"),
            ("TOKENSERVER_INTERNAL__ADMIN_KEY", "adm"),
            ("TOKENSERVER_SESSIONS__URL", "memory:"),
            ("TOKENSERVER_SESSIONS__DUMP_ENABLED", "1"),
            ("TOKENSERVER_SESSIONS__REQUIRE_API_KEY", "false"),
            ("SYNC_TOKENSERVER__FXA_OAUTH_SERVER_URL", "http://127.0.0.1:9"),
            ("RUST_LOG", "tokenserver=debug"),
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                let _ = tx.send(v);
            }
        }
    });
    let next = |what: &str| -> Value {
        loop {
            let v = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| panic!("no {what} line"));
            if v["message"].as_str().unwrap_or("").starts_with(what) {
                return v;
            }
        }
    };
    let internal = format!("http://{}", next("Server running")["internal"].as_str().unwrap());
    let http = reqwest::Client::new();
    for i in 0..250 {
        let r = http.post(format!("{internal}/token")).json(&json!({"meta": {"n": i}})).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = http.head(format!("{internal}/dump")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http.head(format!("{internal}/dump")).bearer_auth("adm").send().await.unwrap();
    assert_eq!(r.status(), 202);
    let mut sizes = Vec::new();
    while sizes.iter().sum::<usize>() < 250 {
        let line = next("DUMP: [");
        sizes.push(line["message"].as_str().unwrap().matches("\"expires\"").count());
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(sizes, [100, 100, 50]);
}

#[tokio::test]
async fn the_memory_store_refuses_sessions_past_its_cap() {
    let server =
        TestServer::start(&[("TOKENSERVER_SESSIONS__URL", "memory:"), ("TOKENSERVER_SESSIONS__MAX_SESSIONS", "2")])
            .await;
    let a = hakr_create(&server, json!({})).await;
    assert_eq!(v1(&server, "POST", "/v1/sessions", json!({"meta": {}})).await.status, 201);
    let r = v1(&server, "POST", "/v1/sessions", json!({"meta": {}})).await;
    assert_eq!(envelope(&r), (503, "store_full".into()));
    let r = send(&server, "POST", "/token", JSON, r#"{"meta":{}}"#).await;
    assert_eq!((r.status, r.body.as_str()), (503, "StoreFull"));
    // Existing sessions go on; ending one makes room.
    let b = ok_token(&hakr_put(&server, &a, None).await);
    send(&server, "DELETE", "/token", JSON, &json!({ "token": b }).to_string()).await;
    assert_eq!(v1(&server, "POST", "/v1/sessions", json!({"meta": {}})).await.status, 201);
    server.finish().await;
}
