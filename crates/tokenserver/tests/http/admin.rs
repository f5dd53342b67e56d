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
    assert!(err.contains("tokenserver.node_type"), "{err}");
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
