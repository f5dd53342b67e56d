//! The internal listener (node API, metrics, admin key) and the CLI binary.

use serde_json::{json, Value};

use crate::common::*;

#[tokio::test]
async fn node_api_on_the_internal_listener() {
    let s = TestServer::start(&[]).await;
    let add = |body: Value| s.admin.post(format!("{}/v1/nodes", s.internal)).json(&body).send();
    let r = add(json!({"node": "https://sync-1.example.com", "capacity": 1000})).await.unwrap();
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["available"], 100, "ceil(capacity × 0.1)");
    assert_eq!((v["current_load"].as_i64(), v["downed"].as_bool()), (Some(0), Some(false)));
    let r = add(json!({"node": "https://sync-1.example.com", "capacity": 10})).await.unwrap();
    assert_eq!(r.status(), 409);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "node_already_exists");
    let r = add(json!({"node": "sync-2", "capacity": 10})).await.unwrap();
    assert_eq!(r.status(), 422);
    let r = add(json!({"node": "https://x.example.com", "capacity": 0})).await.unwrap();
    assert_eq!(r.status(), 422);
    let r = add(json!({"node": "https://x.example.com", "capacity": 5, "service": "nope-1"})).await.unwrap();
    assert_eq!(r.status(), 404);
    // A body is an object, not its fields in a row.
    let r = add(json!(["https://x.example.com", 5])).await.unwrap();
    assert_eq!(r.status(), 422);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "invalid_body");
    // Unknown routes and methods under /v1/ answer in the envelope too (the Allow header kept).
    let r = s.admin.put(format!("{}/v1/nodes", s.internal)).send().await.unwrap();
    assert_eq!((r.status().as_u16(), r.headers()["allow"].to_str().unwrap()), (405, "GET,HEAD,POST"));
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"error": "method_not_allowed", "message": "PUT is not allowed here (see the Allow header)"})
    );
    let r = s.admin.get(format!("{}/v1/nodez", s.internal)).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"error": "not_found", "message": "no such route"}));
    // A body over 64 KiB, announced or found while reading, is refused in the envelope too.
    let too_large =
        json!({"error": "body_too_large", "message": "Failed to buffer the request body: length limit exceeded"});
    let over = json!({"node": "https://big.example.com", "capacity": 5, "pad": "x".repeat(70_000)}).to_string();
    let r =
        s.admin.post(format!("{}/v1/nodes", s.internal)).header("content-type", "application/json").body(over.clone());
    let r = r.send().await.unwrap();
    assert_eq!((r.status().as_u16(), r.json::<Value>().await.unwrap()), (413, too_large.clone()));
    let bearer = format!("Bearer {ADMIN_KEY}");
    let (status, body) =
        chunked_request(&s.internal, "POST", "/v1/nodes", &[("authorization", &bearer)], over.as_bytes()).await;
    assert_eq!((status, serde_json::from_str::<Value>(&body).unwrap()), (413, too_large));
    // Without the key, the body is never read: 401 first.
    let (status, _) = chunked_request(&s.internal, "POST", "/v1/nodes", &[], over.as_bytes()).await;
    assert_eq!(status, 401);
    let r = s.admin.get(format!("{}/v1/nodes", s.internal)).send().await.unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["nodes"].as_array().unwrap().len(), 1);
    // The node API is not on the public listener.
    let r = s.admin.get(format!("{}/v1/nodes", s.base)).send().await.unwrap();
    assert_eq!(r.status(), 404);
    // Metrics are exported.
    assert_eq!(s.token(&Jwt::new("u1", Some(1)).sign(), "1-qqo").await.status, 200);
    let text = s.admin.get(format!("{}/metrics", s.internal)).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("tokenserver_token_requests_total"), "{text}");
    // The new user's allocation went through the SQLite group-commit writer.
    assert!(text.contains(r#"tokenserver_sqlite_batch_calls_count{writer="sync-writer"} "#), "{text}");
    assert!(text.contains(r#"tokenserver_sqlite_batch_seconds_count{writer="sync-writer"} "#), "{text}");
}

/// Query strings and path segments the admin API cannot read are answered in the envelope, like
/// its bodies (axum's own answers are plain text).
#[tokio::test]
async fn unreadable_queries_and_paths_answer_in_the_envelope() {
    let s = TestServer::start(&[]).await;
    let get = |path: &str| s.admin.get(format!("{}{path}", s.internal)).send();
    let r = get("/v1/count_users?timestamp=yesterday").await.unwrap();
    assert_eq!(
        (r.status().as_u16(), r.json::<Value>().await.unwrap()),
        (
            400,
            json!({"error": "invalid_query",
                   "message": "Failed to deserialize query string: timestamp: invalid digit found in string"})
        )
    );
    let not_utf8 = json!({"error": "not_found", "message": "a path segment is not valid UTF-8"});
    for path in ["/v1/services/sync-1.5/users/%FF", "/v1/services/sync-1.5/nodes/%C3%28", "/v1/services/%FF/buckets"] {
        let r = get(path).await.unwrap();
        assert_eq!((r.status().as_u16(), r.json::<Value>().await.unwrap()), (404, not_utf8.clone()), "{path}");
    }
    let r = s
        .admin
        .put(format!("{}/v1/services/sync-1.5/buckets/seven", s.internal))
        .json(&json!({"node": NODE}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.status().as_u16(), r.json::<Value>().await.unwrap()),
        (422, json!({"error": "invalid_bucket", "message": "bucket must be a whole number, not \"seven\""}))
    );
    // What does read still works.
    let r = get("/v1/count_users?timestamp=0").await.unwrap();
    assert_eq!(r.status(), 200);
    s.finish().await;
}

#[tokio::test]
async fn admin_key_guards_the_internal_api() {
    let s = TestServer::start(&[("TOKENSERVER_INTERNAL__ADMIN_KEY", "s3cret-admin")]).await;
    let url = format!("{}/v1/nodes", s.internal);
    let r = s.http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "unauthorized");
    let r = s.http.get(&url).bearer_auth("wrong").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = s.http.get(&url).bearer_auth("s3cret-admin").send().await.unwrap();
    assert_eq!(r.status(), 200);
    // Load balancers may probe liveness without the key.
    let r = s.http.get(format!("{}/__lbheartbeat__", s.internal)).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn cli_node_add_list_migrate_and_config_errors() {
    let dir = TempDir::new();
    let (code, out, err) = cli(&dir.0, &["node", "add", "https://sync-1.example.com", "--capacity", "1000"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("added node https://sync-1.example.com (id 1, service sync-1.5, capacity 1000, available 100)"),
        "{out}"
    );
    assert!(dir.0.join("tokenserver.db").exists(), "zero configuration uses ./tokenserver.db");
    let (code, out, _) = cli(&dir.0, &["node", "list", "--json"], &[]);
    assert_eq!(code, 0);
    let nodes: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(nodes[0]["node"], "https://sync-1.example.com");
    assert_eq!(nodes[0]["capacity"], 1000);
    let (code, out, _) = cli(&dir.0, &["node", "list"], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("https://sync-1.example.com") && out.contains("1000"), "{out}");
    let (code, _, err) = cli(&dir.0, &["node", "add", "https://sync-1.example.com", "--capacity", "5"], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("already exists"), "{err}");
    let (code, out, _) = cli(&dir.0, &["migrate"], &[]);
    assert_eq!((code, out.trim()), (0, "database schema is up to date"));
    // A bad setting: exit 2, one line naming the key.
    let (code, _, err) = cli(&dir.0, &["node", "list"], &[("SYNC_TOKENSERVER__NODE_TYPE", "oracle")]);
    assert_eq!(code, 2);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("SYNC_TOKENSERVER__NODE_TYPE: must be mysql, postgres or spanner"), "named as typed: {err}");
}

#[tokio::test]
async fn cli_token_inspect_verifies_like_a_storage_node() {
    let s = TestServer::start(&[]).await;
    s.add_node(NODE, 100, 100).await;
    let body = s.token(&Jwt::new("u1", Some(1234)).sign(), "1234-qqo").await.json();
    let id = body["id"].as_str().unwrap();
    let dir = TempDir::new();
    let (code, out, err) = cli(&dir.0, &["token", "inspect", id, "--secret", "old", "--secret", SECRET], &[]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["valid"], true);
    assert_eq!(v["expired"], false);
    assert_eq!(v["secret_index"], 1);
    assert_eq!(v["key"], body["key"]);
    assert_eq!(v["payload"]["fxa_kid"], "0000000001234-qqo");
    assert_eq!(v["payload"]["uid"], body["uid"]);
    let (code, _, err) = cli(&dir.0, &["token", "inspect", id, "--secret", "wrong"], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("invalid signature"), "{err}");
    // With no --secret, the configured secrets are used.
    let (code, out, _) = cli(&dir.0, &["token", "inspect", id], &[("SYNC_MASTER_SECRET", SECRET)]);
    assert_eq!(code, 0);
    assert!(out.contains("\"valid\": true"));
}

#[tokio::test]
async fn generated_master_secret_is_persisted_across_restarts() {
    let dir = TempDir::new();
    let db = format!("sqlite://{}/ts.db", dir.0.display());
    let vars = |db: &str| -> Vec<(String, String)> {
        [("TOKENSERVER_PORT", "0"), ("TOKENSERVER_INTERNAL__PORT", "0"), ("TOKENSERVER_DATABASE_URL", db)]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let cfg = tokenserver::config::load(None, &vars(&db)).unwrap();
    let store = tokenserver::app::open_store(&cfg).await.unwrap();
    let first = tokenserver::app::master_secrets(&cfg, store.as_ref()).await.unwrap();
    drop(store);
    let store = tokenserver::app::open_store(&cfg).await.unwrap();
    let second = tokenserver::app::master_secrets(&cfg, store.as_ref()).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].expose(), second[0].expose());
    assert_eq!(first[0].expose().len(), 64);
}

#[tokio::test]
async fn without_a_configured_key_the_internal_listener_answers_only_to_generated_ones() {
    let s = TestServer::start(&[
        ("TOKENSERVER_INTERNAL__ADMIN_KEY", ""),
        ("TOKENSERVER_SESSIONS__REQUIRE_API_KEY", "true"),
    ])
    .await;
    // Whoever reaches the listener is refused, and nothing changes.
    let r = s
        .http
        .post(format!("{}/v1/nodes", s.internal))
        .json(&json!({"node": "https://attacker.example", "capacity": 9}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "unauthorized");
    assert_eq!(s.http.get(format!("{}/metrics", s.internal)).send().await.unwrap().status(), 401);
    let r = s.http.post(format!("{}/v1/sessions", s.internal)).json(&json!({"meta": {}})).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(s.loads_and_users().await, vec![], "no node was added");
    // The CLI shows the keys the server generated and keeps in the database.
    let dir = TempDir::new();
    let env = [("TOKENSERVER_DATABASE_URL", s.db_url()), ("SYNC_MASTER_SECRET", SECRET)];
    let (code, out, err) = cli(&dir.0, &["keys", "--json"], &env);
    assert_eq!(code, 0, "{err}");
    let keys: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(keys["master_secret"], json!({"origin": "configured", "value": null}));
    assert_eq!(keys["internal.admin_key"]["origin"], "generated");
    assert_eq!(keys["sessions.api_key"]["origin"], "generated");
    let admin = keys["internal.admin_key"]["value"].as_str().unwrap();
    let sessions = keys["sessions.api_key"]["value"].as_str().unwrap();
    assert_eq!((admin.len(), sessions.len()), (64, 64));
    assert_ne!(admin, sessions);
    let r = s
        .http
        .post(format!("{}/v1/nodes", s.internal))
        .bearer_auth(admin)
        .json(&json!({"node": "https://sync.example.com", "capacity": 9}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = s
        .http
        .post(format!("{}/v1/sessions", s.internal))
        .bearer_auth(sessions)
        .json(&json!({"meta": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // Each key opens its own routes only.
    let r = s
        .http
        .post(format!("{}/v1/sessions", s.internal))
        .bearer_auth(admin)
        .json(&json!({"meta": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        s.http.get(format!("{}/v1/nodes", s.internal)).bearer_auth(sessions).send().await.unwrap().status(),
        401
    );
    // The text form names each key and where it came from.
    let (code, out, _) = cli(&dir.0, &["keys"], &env);
    assert_eq!(code, 0);
    assert!(
        out.lines().any(|l| l.starts_with("internal.admin_key") && l.contains("generated") && l.ends_with(admin)),
        "{out}"
    );
    assert!(out.lines().any(|l| l.starts_with("master_secret") && l.contains("(set in the configuration)")), "{out}");
    s.finish().await;
}

#[tokio::test]
async fn without_a_key_a_database_that_cannot_keep_one_turns_the_routes_off() {
    let Some(s) = TestServer::start_on(
        tokenserver_store::Backend::Postgres,
        &[("TOKENSERVER_INTERNAL__ADMIN_KEY", ""), ("TOKENSERVER_SESSIONS__REQUIRE_API_KEY", "true")],
    )
    .await
    else {
        return;
    };
    let r = s
        .admin
        .post(format!("{}/v1/nodes", s.internal))
        .json(&json!({"node": "https://x.example", "capacity": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "admin_key_required");
    let r = s.http.post(format!("{}/v1/sessions", s.internal)).json(&json!({"meta": {}})).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "api_key_required");
    let r = s.http.get(format!("{}/v1/sessions/dump", s.internal)).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(s.http.get(format!("{}/__lbheartbeat__", s.internal)).send().await.unwrap().status(), 200);
    s.finish().await;
}

/// `https://a.example.com` as one path segment.
fn segment(url: &str) -> String {
    url.replace(':', "%3A").replace('/', "%2F")
}

/// Drain, update (set and clear flags), unassign and remove over the internal API, with users
/// on the nodes: drained users keep their node, removed ones are given another on their next
/// request, and every answer is the node as stored.
#[tokio::test]
async fn node_lifecycle_over_the_internal_api() {
    let s = TestServer::start(&[]).await;
    let (a, b) = ("https://a.example.com", "https://b.example.com");
    let a_id = s.add_node(a, 100, 10).await;
    let node_url =
        |url: &str, action: &str| format!("{}/v1/services/sync-1.5/nodes/{}{action}", s.internal, segment(url));
    let endpoint = |r: &Response| r.json()["api_endpoint"].as_str().unwrap().to_string();
    let first = s.token(&Jwt::new("u1", Some(1)).sign(), "1-qqo").await;
    assert!(endpoint(&first).starts_with(a), "{}", first.body);

    // Drain a: new users go to b, u1 keeps a.
    let r = s.admin.post(node_url(a, "/drain")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!((v["id"].as_i64(), v["available"].as_i64(), v["backoff"].as_bool()), (Some(a_id), Some(0), Some(true)));
    let b_id = s.add_node(b, 100, 10).await;
    let second = s.token(&Jwt::new("u2", Some(1)).sign(), "1-qqo").await;
    assert!(endpoint(&second).starts_with(b), "{}", second.body);
    assert!(endpoint(&s.token(&Jwt::new("u1", Some(1)).sign(), "1-qqo").await).starts_with(a));

    // The list counts live users per node.
    let v: Value = s.admin.get(format!("{}/v1/nodes", s.internal)).send().await.unwrap().json().await.unwrap();
    let users: Vec<_> =
        v["nodes"].as_array().unwrap().iter().map(|n| (n["id"].as_i64(), n["live_users"].as_i64())).collect();
    assert_eq!(users, vec![(Some(a_id), Some(1)), (Some(b_id), Some(1))]);

    // Clear backoff (which Mozilla's script cannot), set capacity; absent fields are kept.
    let r = s.admin.patch(node_url(a, "")).json(&json!({"backoff": false, "capacity": 500})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (v["backoff"].as_bool(), v["capacity"].as_i64(), v["available"].as_i64(), v["live_users"].as_i64()),
        (Some(false), Some(500), Some(0), Some(1))
    );
    let r = s.admin.get(node_url(a, "")).send().await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["capacity"], 500);
    let r = s.admin.patch(node_url(a, "")).json(&json!({})).send().await.unwrap();
    assert_eq!(r.status(), 422);
    let r = s.admin.patch(node_url(a, "")).json(&json!({"capacity": 0})).send().await.unwrap();
    assert_eq!(r.status(), 422);
    let r = s.admin.patch(node_url(a, "")).json(&json!({"colour": "red"})).send().await.unwrap();
    assert_eq!(r.status(), 422);
    for missing in [
        s.admin.patch(node_url("https://none.example.com", "")).json(&json!({"downed": true})).send().await.unwrap(),
        s.admin.post(node_url("https://none.example.com", "/unassign")).send().await.unwrap(),
        s.admin.delete(node_url("https://none.example.com", "")).send().await.unwrap(),
    ] {
        assert_eq!(missing.status(), 404);
        assert_eq!(missing.json::<Value>().await.unwrap()["error"], "unknown_node");
    }

    // Remove a: u1's row is replaced and its next request lands on b, keeping its state.
    let r = s.admin.delete(node_url(a, "")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"removed": a, "unassigned": 1}));
    let rows = s.user_rows("u1").await;
    assert_eq!((rows.len(), rows[0].nodeid, rows[0].replaced_at.is_some()), (1, a_id, true));
    let moved = s.token(&Jwt::new("u1", Some(1)).sign(), "1-qqo").await;
    assert_eq!(moved.status, 200, "{}", moved.body);
    assert!(endpoint(&moved).starts_with(b), "{}", moved.body);
    let rows = s.user_rows("u1").await;
    assert_eq!((rows.len(), rows[1].nodeid, rows[1].replaced_at, rows[1].generation), (2, b_id, None, 1));

    // Unassign b: both users are given a node again (b is the only one) on their next request.
    let r = s.admin.post(node_url(b, "/unassign")).send().await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"unassigned": 2}));
    assert!(endpoint(&s.token(&Jwt::new("u2", Some(1)).sign(), "1-qqo").await).starts_with(b));
    assert_eq!(s.user_rows("u2").await.len(), 2);
}

#[test]
fn cli_node_update_drain_unassign_remove() {
    let dir = TempDir::new();
    let run = |args: &[&str]| cli(&dir.0, args, &[]);
    // Read-only commands never create a database.
    for args in [&["node", "list"][..], &["user", "show", "u@x"], &["token", "inspect", "abc"]] {
        let (code, _, err) = run(args);
        assert_eq!(code, 1, "{args:?}");
        assert!(err.contains("no database at"), "{args:?}: {err}");
    }
    assert!(!dir.0.join("tokenserver.db").exists(), "a read-only command created the database");
    assert_eq!(run(&["node", "add", "https://a.example.com", "--capacity", "100", "--downed"]).0, 0);
    let (code, out, err) = run(&["node", "update", "https://a.example.com", "--downed", "false", "--capacity", "200"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("capacity 200") && out.contains("downed false"), "{out}");
    let (code, out, _) = run(&["node", "drain", "https://a.example.com"]);
    assert_eq!(code, 0);
    assert!(out.contains("available 0") && out.contains("backoff true"), "{out}");
    let (_, out, _) = run(&["node", "list", "--json"]);
    let nodes: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (&nodes[0]["capacity"], &nodes[0]["downed"], &nodes[0]["backoff"], &nodes[0]["live_users"]),
        (&json!(200), &json!(false), &json!(true), &json!(0))
    );
    let (code, out, _) = run(&["node", "unassign", "https://a.example.com"]);
    assert_eq!((code, out.trim()), (0, "unassigned 0 users of node https://a.example.com"));
    // A loopback URL is accepted, with a warning.
    let (code, _, err) = run(&["node", "add", "http://127.0.0.1:8080", "--capacity", "10"]);
    assert_eq!(code, 0);
    assert!(err.contains("loopback address"), "{err}");
    assert_eq!(run(&["node", "remove", "http://127.0.0.1:8080"]).0, 0);
    // Negative numbers are values, refused with the option's name (not "unexpected argument").
    let (code, _, err) = run(&["node", "update", "https://a.example.com", "--available", "-3"]);
    assert_eq!(code, 2);
    assert!(err.contains("invalid value '-3' for '--available") && !err.contains("unexpected argument"), "{err}");
    let (code, _, err) = run(&["node", "add", "https://b.example.com", "--capacity", "-5"]);
    assert_eq!(code, 2);
    assert!(err.contains("invalid value '-5' for '--capacity"), "{err}");
    let (code, _, err) = run(&["node", "update", "https://a.example.com"]);
    assert_eq!(code, 1);
    assert!(err.contains("nothing to change"), "{err}");
    let (code, out, _) = run(&["node", "remove", "https://a.example.com"]);
    assert_eq!((code, out.trim()), (0, "removed node https://a.example.com and unassigned its 0 users"));
    let (code, _, err) = run(&["node", "remove", "https://a.example.com"]);
    assert_eq!(code, 1);
    assert!(err.contains("not found") || err.contains("https://a.example.com"), "{err}");
    let (_, out, _) = run(&["node", "list", "--json"]);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), json!([]));
}
