//! `GET /1.0/{application}/{version}`: the success path and the error catalogue.

use reqwest::Method;
use serde_json::Value;
use tokenserver_core::sync::hashes::metrics_hashes;
use tokenserver_core::sync::tokenlib::parse_token;

use crate::common::*;

#[tokio::test]
async fn a_valid_request_gets_mozillas_token_response() {
    let s = TestServer::start(&[]).await;
    let node = s.add_node(NODE, 100, 100).await;
    let resp = s.token(&Jwt::new("u1", Some(1234)).sign(), "1234-qqo").await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert_eq!(resp.headers["content-type"], "application/json");
    assert_eq!(resp.headers["x-content-type-options"], "nosniff");
    let ts: u64 = resp.headers["x-timestamp"].to_str().unwrap().parse().unwrap();
    assert!(ts.abs_diff(now_s()) <= 2);

    let body = resp.json();
    let keys: Vec<&str> = body.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["id", "key", "uid", "api_endpoint", "duration", "hashed_fxa_uid", "hashalg", "node_type"]);
    let rows = s.user_rows("u1").await;
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    let hashes = metrics_hashes(SECRET, "u1");
    assert_eq!(body["uid"], row.uid);
    assert_eq!(body["api_endpoint"], format!("{NODE}/1.5/{}", row.uid));
    assert_eq!(body["duration"], 3600);
    assert_eq!(body["hashed_fxa_uid"], hashes.hashed_fxa_uid);
    assert_eq!(body["hashalg"], "sha256");
    assert_eq!(body["node_type"], "spanner");

    // A storage node verifies the token with the master secret and derives the same key.
    let id = body["id"].as_str().unwrap();
    let parsed = parse_token(id, &[SECRET.as_bytes()], now_s() as f64, false).unwrap();
    assert_eq!(parsed.key, body["key"].as_str().unwrap());
    let p = &parsed.payload;
    let payload_keys: Vec<&str> = p.keys().map(String::as_str).collect();
    assert_eq!(
        payload_keys,
        [
            "node",
            "fxa_kid",
            "fxa_uid",
            "hashed_device_id",
            "hashed_fxa_uid",
            "expires",
            "uid",
            "tokenserver_origin",
            "salt"
        ]
    );
    assert_eq!(p["node"], NODE);
    assert_eq!(p["fxa_kid"], "0000000001234-qqo");
    assert_eq!(p["fxa_uid"], "u1");
    assert_eq!(p["hashed_device_id"], hashes.hashed_device_id);
    assert_eq!(p["hashed_fxa_uid"], hashes.hashed_fxa_uid);
    assert_eq!(p["expires"], ts + 3600);
    assert_eq!(p["uid"], row.uid);
    assert_eq!(p["tokenserver_origin"], "rust");
    let salt = p["salt"].as_str().unwrap();
    assert!(salt.len() == 6 && salt.bytes().all(|b| b.is_ascii_hexdigit()));

    // Exactly the row Mozilla writes, and one load increment.
    assert_eq!(row.email, format!("u1@{DOMAIN}"));
    assert_eq!((row.generation, row.keys_changed_at, row.client_state.as_str()), (1234, Some(1234), "aaaa"));
    assert_eq!((row.nodeid, row.replaced_at), (node, None));
    assert!((row.created_at / 1000).abs_diff(ts as i64) <= 2);
    assert_eq!(s.node_load(node).await, (99, 1, 100));

    // The same request again changes nothing and returns the same uid.
    let again = s.token(&Jwt::new("u1", Some(1234)).sign(), "1234-qqo").await;
    assert_eq!(again.json()["uid"], row.uid);
    assert_eq!(s.user_rows("u1").await, rows);
    assert_eq!(s.node_load(node).await, (99, 1, 100));
}

#[tokio::test]
async fn authorization_errors_a1_to_a4() {
    let s = TestServer::start(&[]).await;
    s.add_node(NODE, 100, 100).await;
    let kid: &[u8] = b"1234-qqo";
    let r = s.request(Method::GET, "/1.0/sync/1.5", &[("x-keyid", kid)]).await;
    assert_401(&r, UNAUTHORIZED);
    let r = s.request(Method::GET, "/1.0/sync/1.5", &[("authorization", b"Bearer \xfftoken"), ("x-keyid", kid)]).await;
    assert_401(&r, UNAUTHORIZED);
    let r = s.request(Method::GET, "/1.0/sync/1.5", &[("authorization", b"Bearer"), ("x-keyid", kid)]).await;
    assert_401(&r, UNAUTHORIZED);
    let r =
        s.request(Method::GET, "/1.0/sync/1.5", &[("authorization", b"BrowserID assertion"), ("x-keyid", kid)]).await;
    assert_error(&r, 401, "error", "body", "", "Unsupported");
    // Authentication errors win over an unknown application and a bad X-Client-State.
    let r = s.request(Method::GET, "/1.0/xXx/token", &[("x-client-state", b"state!")]).await;
    assert_401(&r, UNAUTHORIZED);
    // An absurdly long bearer token is refused without being verified.
    let long = "a".repeat(20_000);
    let r = s.token(&long, "1234-qqo").await;
    assert_401(&r, INVALID_CREDENTIALS);
    assert_eq!(s.fxa.verify_hits(), 0);
    assert_eq!(s.count_users().await, 0);
}

#[tokio::test]
async fn key_id_errors_k1_to_k7() {
    let s = TestServer::start(&[]).await;
    s.add_node(NODE, 100, 100).await;
    let jwt = Jwt::new("u1", Some(1234)).sign();
    let auth = format!("Bearer {jwt}");
    let get = |headers: Vec<(&'static str, Vec<u8>)>| {
        let auth = auth.clone();
        let s = &s;
        async move {
            let mut all: Vec<(&str, Vec<u8>)> = vec![("authorization", auth.into_bytes())];
            all.extend(headers);
            let refs: Vec<(&str, &[u8])> = all.iter().map(|(k, v)| (*k, v.as_slice())).collect();
            s.request(Method::GET, "/1.0/sync/1.5", &refs).await
        }
    };
    let r = get(vec![]).await;
    assert_error(&r, 401, "invalid-key-id", "header", "", "Missing X-KeyID header");
    let r = get(vec![("x-keyid", b"1234-qq\xffo".to_vec())]).await;
    assert_error(&r, 401, "invalid-key-id", "header", "", "Invalid X-KeyID header");
    let r = get(vec![("x-keyid", b"1234qqo".to_vec())]).await;
    assert_401(&r, INVALID_CREDENTIALS);
    let r = get(vec![("x-keyid", b"1234-state!".to_vec())]).await;
    assert_401(&r, INVALID_CREDENTIALS);
    let r = get(vec![("x-keyid", b"1234-qqo".to_vec()), ("x-client-state", b"state!".to_vec())]).await;
    assert_error(&r, 400, "error", "header", "X-Client-State", "Invalid client state value");
    let r = get(vec![("x-keyid", b"1234-qqo".to_vec()), ("x-client-state", b"bbbb".to_vec())]).await;
    assert_error(&r, 401, "invalid-client-state", "body", "", "Unauthorized");
    let r = get(vec![("x-keyid", b"None-qqo".to_vec())]).await;
    assert_401(&r, INVALID_CREDENTIALS);
    // A client state longer than the 32-char column is refused, not a 500.
    let long_state = key_id(1234, &"ab".repeat(17));
    let r = get(vec![("x-keyid", long_state.into_bytes())]).await;
    assert_401(&r, INVALID_CREDENTIALS);
    assert_eq!(s.count_users().await, 0);
    // A matching X-Client-State is fine.
    let r = get(vec![("x-keyid", b"1234-qqo".to_vec()), ("x-client-state", b"aaaa".to_vec())]).await;
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test]
async fn unknown_application_and_version_p1_p2() {
    let s = TestServer::start(&[]).await;
    s.add_node(NODE, 100, 100).await;
    let jwt = Jwt::new("u1", Some(1)).sign();
    let r = s.get_path("/1.0/xXx/token", &jwt, "1-qqo").await;
    assert_error(&r, 404, "error", "url", "application", "Unsupported application");
    let r = s.get_path("/1.0/sync/1.2", &jwt, "1-qqo").await;
    assert_error(&r, 404, "error", "url", "1.2", "Unsupported application version");
    // A segment that is not UTF-8 once decoded: still JSON, still after authentication.
    let r = s.get_path("/1.0/%FF/1.5", &jwt, "1-qqo").await;
    assert_error(&r, 404, "error", "url", "application", "Unsupported application");
    let r = s.request(Method::GET, "/1.0/%FF/1.5", &[]).await;
    assert_401(&r, UNAUTHORIZED);
    assert_eq!(s.count_users().await, 0);
}

#[tokio::test]
async fn new_users_disabled_u1_still_serves_existing_users() {
    let s = TestServer::start(&[("SYNC_TOKENSERVER__ALLOW_NEW_USERS", "false")]).await;
    let node = s.add_node(NODE, 100, 100).await;
    let r = s.token(&Jwt::new("stranger", Some(1)).sign(), "1-qqo").await;
    assert_error(&r, 403, "new-users-disabled", "body", "", "New users are not allowed");
    assert_eq!(s.count_users().await, 0);
    s.sql(&format!(
        "INSERT INTO users (service, email, generation, client_state, created_at, nodeid, keys_changed_at) \
         VALUES ((SELECT id FROM services WHERE service='sync-1.5'), 'friend@{DOMAIN}', 1, 'aaaa', 1, {node}, 1)"
    ))
    .await;
    let r = s.token(&Jwt::new("friend", Some(1)).sign(), "1-qqo").await;
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test]
async fn no_node_u2_is_a_503_with_retry_after_and_writes_nothing() {
    let s = TestServer::start(&[]).await;
    let r = s.token(&Jwt::new("u1", Some(1)).sign(), "1-qqo").await;
    assert_error(&r, 503, "internal-error", "internal", "", "Server error");
    assert_eq!(r.headers["retry-after"], "10");
    assert_eq!(s.count_users().await, 0);
    // Full, downed and backoff nodes are no better.
    s.sql("INSERT INTO nodes (service, node, available, current_load, capacity, downed, backoff) VALUES (1, 'https://full', 0, 10, 10, 0, 0), (1, 'https://down', 10, 0, 10, 1, 0), (1, 'https://back', 10, 0, 10, 0, 1)").await;
    let r = s.token(&Jwt::new("u1", Some(1)).sign(), "1-qqo").await;
    assert_error(&r, 503, "internal-error", "internal", "", "Server error");
    assert_eq!(s.count_users().await, 0);
}

#[tokio::test]
async fn retired_nodeless_user_u3_and_missing_service() {
    let s = TestServer::start(&[]).await;
    s.add_node(NODE, 100, 100).await;
    s.sql(&format!(
        "INSERT INTO users (service, email, generation, client_state, created_at, replaced_at, nodeid, keys_changed_at) \
         VALUES (1, 'gone@{DOMAIN}', 9223372036854775807, 'aaaa', 1, 2, 999, 1)"
    ))
    .await;
    let r = s.token(&Jwt::new("gone", None).sign(), "1-qqo").await;
    assert_error(&r, 500, "internal-error", "internal", "", "Server error");
    // The service row deleted behind our back: a clean 500, no panic, nothing written.
    s.sql("DELETE FROM services").await;
    let r = s.token(&Jwt::new("u2", Some(1)).sign(), "1-qqo").await;
    assert_error(&r, 500, "internal-error", "internal", "", "Server error");
    assert_eq!(s.count_users().await, 1);
}

#[tokio::test]
async fn query_string_q1_and_duration() {
    let s = TestServer::start(&[]).await;
    s.add_node(NODE, 100, 100).await;
    let jwt = Jwt::new("u1", Some(1)).sign();
    let r = s.get_path("/1.0/sync/1.5?duration=1&duration=2", &jwt, "1-qqo").await;
    assert_error(&r, 400, "error", "url", "", "invalid query params");
    for (q, want) in [("12", 12), ("0", 0), ("4000", 3600), ("lolwut", 3600), ("-1", 3600)] {
        let r = s.get_path(&format!("/1.0/sync/1.5?duration={q}"), &jwt, "1-qqo").await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["duration"], want, "duration={q}");
        let id = r.json()["id"].as_str().unwrap().to_string();
        let parsed = parse_token(&id, &[SECRET.as_bytes()], 0.0, false).unwrap();
        let ts: u64 = r.headers["x-timestamp"].to_str().unwrap().parse().unwrap();
        assert_eq!(parsed.payload["expires"], ts + want);
    }
}

#[tokio::test]
async fn routing_404_405_and_limits() {
    let s = TestServer::start(&[]).await;
    let r = s.request(Method::GET, "/nope", &[]).await;
    assert_eq!((r.status, r.body.as_str()), (404, "0"));
    assert_eq!(r.headers["content-type"], "application/json");
    let r = s.request(Method::GET, "/1.0/sync/1.5/", &[]).await;
    assert_eq!((r.status, r.body.as_str()), (404, ""));
    let r = s.request(Method::GET, "/1.0/sync", &[]).await;
    assert_eq!((r.status, r.body.as_str()), (404, ""));
    let r = s.request(Method::POST, "/1.0/sync/1.5", &[]).await;
    assert_eq!((r.status, r.body.as_str()), (405, ""));
    let r = s.request(Method::HEAD, "/1.0/sync/1.5", &[]).await;
    assert_eq!(r.status, 405);
    let r = s.request(Method::GET, "/", &[]).await;
    assert_eq!(r.status, 302);
    assert_eq!(r.headers["location"], "https://mozilla-services.readthedocs.io/en/latest/token/apis.html");
}

#[tokio::test]
async fn oversized_headers_are_refused() {
    let s = TestServer::start(&[]).await;
    let big = vec![b'a'; 40 * 1024];
    let r = s.request(Method::GET, "/1.0/sync/1.5", &[("x-padding", &big)]).await;
    assert_eq!(r.status, 431);
    let r =
        s.http.post(format!("{}/1.0/webhooks/fxa/events", s.base)).body(vec![b'x'; 100 * 1024]).send().await.unwrap();
    assert_eq!(r.status(), 413);
}

#[tokio::test]
async fn health_routes() {
    let s = TestServer::start(&[]).await;
    let r = s.request(Method::GET, "/__heartbeat__", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, format!(r#"{{"version":"{}","database":"Ok","status":"Ok"}}"#, env!("CARGO_PKG_VERSION")));
    let r = s.request(Method::GET, "/__lbheartbeat__", &[]).await;
    assert_eq!((r.status, r.body.as_str()), (200, "{}"));
    let r = s.request(Method::GET, "/__version__", &[]).await;
    let v = r.json();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    for k in ["build", "commit", "source"] {
        assert!(v[k].is_string(), "{k}");
    }
    // Built from a git checkout (as here): the commit the binary was built from.
    let head = std::process::Command::new("git").args(["rev-parse", "HEAD"]).output().unwrap();
    if head.status.success() && std::env::var_os("TOKENSERVER_COMMIT").is_none() {
        let commit = v["commit"].as_str().unwrap();
        assert!(commit.len() == 40 && commit.bytes().all(|b| b.is_ascii_hexdigit()), "{commit}");
        assert_eq!(commit, String::from_utf8_lossy(&head.stdout).trim());
    }
}

#[tokio::test]
async fn several_applications_with_their_own_patterns() {
    let s = TestServer::start(&[
        ("TOKENSERVER_APPLICATIONS__SYNC-1.5__TOKEN_DURATION", "300"),
        ("TOKENSERVER_APPLICATIONS__NOTES-2__PATTERN", "{node}/notes/v2/{uid}"),
        ("TOKENSERVER_APPLICATIONS__NOTES-2__NODE_TYPE", "postgres"),
    ])
    .await;
    s.add_node(NODE, 100, 100).await;
    let notes_node = "https://notes.example.com";
    s.sql(&format!("INSERT INTO nodes (service, node, available, current_load, capacity, downed, backoff) VALUES ((SELECT id FROM services WHERE service='notes-2'), '{notes_node}', 10, 0, 10, 0, 0)")).await;
    let jwt = Jwt::new("u1", Some(1)).sign();
    let r = s.get_path("/1.0/notes/2", &jwt, "1-qqo").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let body = r.json();
    assert_eq!(body["api_endpoint"], format!("{notes_node}/notes/v2/{}", body["uid"]));
    assert_eq!(body["node_type"], "postgres");
    assert_eq!(body["duration"], 3600);
    let r = s.get_path("/1.0/sync/1.5", &jwt, "1-qqo").await;
    assert_eq!(r.json()["duration"], 300);
    assert_ne!(r.json()["uid"], body["uid"]);
    let r = s.get_path("/1.0/notes/3", &jwt, "1-qqo").await;
    assert_error(&r, 404, "error", "url", "3", "Unsupported application version");
    let v: Value = r.json();
    assert!(v.is_object());
}
