//! Sync operations beyond nodes, over the internal API and the CLI: users (lookup, assignment,
//! count), account events from JSON lines, and the purge of old records against a mock storage
//! node that checks every request as syncstorage does (Hawk signature under the key derived from
//! a token that verifies with the master secret).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Router;
use serde_json::{json, Value};
use tokenserver_core::sync::tokenlib::parse_token;

use crate::common::*;

fn segment(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// `/v1/services/sync-1.5/users/<user>` on the internal listener.
fn user_url(s: &TestServer, user: &str) -> String {
    format!("{}/v1/services/sync-1.5/users/{}", s.internal, segment(user))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn users_are_looked_up_moved_and_counted_over_the_internal_api() {
    let s = TestServer::start(&[]).await;
    let (a, b) = ("https://a.example.com", "https://b.example.com");
    let a_id = s.add_node(a, 100, 10).await;
    let first = s.token(&Jwt::new("u1", Some(5)).sign(), &key_id(5, "aaaa")).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let b_id = s.add_node(b, 100, 10).await;
    let email = format!("u1@{DOMAIN}");
    let rows = s.user_rows("u1").await;

    let r = s.admin.get(user_url(&s, &email)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let shown: Value = r.json().await.unwrap();
    let row = json!({
        "uid": rows[0].uid, "node": a, "generation": 5, "keys_changed_at": 5, "client_state": "aaaa",
        "created_at": rows[0].created_at, "replaced_at": null,
    });
    assert_eq!(
        shown,
        json!({
            "service": "sync-1.5", "email": email, "status": "assigned", "current": row,
            "first_seen_at": rows[0].created_at, "history": [row],
        })
    );
    let by_uid: Value = s.admin.get(user_url(&s, &rows[0].uid.to_string())).send().await.unwrap().json().await.unwrap();
    assert_eq!(by_uid, shown);
    for unknown in [format!("nobody@{DOMAIN}"), "999999".to_string()] {
        let r = s.admin.get(user_url(&s, &unknown)).send().await.unwrap();
        assert_eq!(r.status(), 404);
        assert_eq!(r.json::<Value>().await.unwrap()["error"], "unknown_user");
    }

    // Move u1 to b: a new current row there with its state; the next token points to b.
    let r = s.admin.put(format!("{}/node", user_url(&s, &email))).json(&json!({"node": b})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let moved: Value = r.json().await.unwrap();
    assert_eq!((moved["current"]["node"].as_str(), moved["history"].as_array().unwrap().len()), (Some(b), 2));
    let rows = s.user_rows("u1").await;
    assert_eq!(
        rows.iter()
            .map(|r| (r.nodeid, r.generation, r.client_state.as_str(), r.replaced_at.is_some()))
            .collect::<Vec<_>>(),
        vec![(a_id, 5, "aaaa", true), (b_id, 5, "aaaa", false)]
    );
    assert_eq!(s.node_load(b_id).await, (9, 1, 100));
    let again = s.token(&Jwt::new("u1", Some(5)).sign(), &key_id(5, "aaaa")).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert!(again.json()["api_endpoint"].as_str().unwrap().starts_with(b), "{}", again.body);
    assert_eq!(s.user_rows("u1").await.len(), 2, "the token request changed nothing");

    let r = s.admin.put(format!("{}/node", user_url(&s, &email))).json(&json!({"node": "https://none.example.com"}));
    let r = r.send().await.unwrap();
    assert_eq!((r.status().as_u16(), r.json::<Value>().await.unwrap()["error"].clone()), (404, json!("unknown_node")));
    let r = s.admin.put(format!("{}/node", user_url(&s, "no-at-sign"))).json(&json!({"node": b})).send().await.unwrap();
    assert_eq!((r.status().as_u16(), r.json::<Value>().await.unwrap()["error"].clone()), (422, json!("invalid_user")));
    let r = s.admin.put(format!("{}/node", user_url(&s, &email))).json(&json!({"nod": b})).send().await.unwrap();
    assert_eq!(r.status(), 422);

    // count_users: Mozilla's line, for a timestamp after both rows.
    let now = now_s() * 1000 + 1000;
    let r = s.admin.get(format!("{}/v1/count_users?timestamp={now}", s.internal)).send().await.unwrap();
    let count: Value = r.json().await.unwrap();
    assert_eq!((&count["op"], &count["total_users"], &count["v"]), (&json!("sync_count_users"), &json!(1), &json!(0)));
    assert!(count["hostname"].as_str().is_some_and(|h| !h.is_empty()) && count["pid"].as_u64().is_some());
    let r = s.admin.get(format!("{}/v1/count_users?timestamp=0", s.internal)).send().await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["time"], "1970-01-01T00:00:00Z");
    // Without the admin key: refused like every admin route.
    let r = s.http.get(user_url(&s, &email)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    s.finish().await;
}

fn envelope(event: Value) -> String {
    json!({ "Message": event.to_string() }).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn account_events_replayed_from_json_lines_are_idempotent() {
    let s = TestServer::start(&[]).await;
    s.add_node(NODE, 100, 10).await;
    for user in ["u1", "u2"] {
        assert_eq!(s.token(&Jwt::new(user, Some(12)).sign(), &key_id(12, "aaaa")).await.status, 200);
    }
    let lines = [
        envelope(json!({"event": "passwordChange", "uid": "u1", "iss": DOMAIN, "generation": 43})),
        json!({"event": "delete", "uid": format!("u2@{DOMAIN}")}).to_string(),
        String::new(),
        envelope(json!({"event": "delete", "uid": "ghost", "iss": DOMAIN})),
        json!({"event": "reset", "uid": format!("ghost2@{DOMAIN}"), "generation": 5}).to_string(),
        json!({"event": "frobnicate", "uid": "u1", "iss": DOMAIN}).to_string(),
        "wat".to_string(),
        json!({"Message": "wat"}).to_string(),
    ]
    .join("\n");
    let post = || s.admin.post(format!("{}/v1/account_events", s.internal)).body(lines.clone()).send();
    let r = post().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["summary"],
        json!({"messages": 7, "delete": 2, "reset": 1, "password_change": 1, "unknown": 1, "invalid": 2, "rows_changed": 2})
    );
    let warnings: Vec<(u64, &str)> = v["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["line"].as_u64().unwrap(), w["message"].as_str().unwrap()))
        .collect();
    assert_eq!(warnings.iter().map(|w| w.0).collect::<Vec<_>>(), vec![6, 7, 8]);
    assert!(warnings[0].1.contains("unknown event type") && warnings[1].1.starts_with("invalid account message"));

    // Stored: one less than the new generation; the deleted account retired. Unknown users: nothing.
    let u1 = s.user_rows("u1").await;
    assert_eq!((u1.len(), u1[0].generation, u1[0].replaced_at), (1, 42, None));
    let u2 = s.user_rows("u2").await;
    assert_eq!(
        (u2.len(), u2[0].generation, u2[0].replaced_at.is_some()),
        (1, tokenserver_core::sync::MAX_GENERATION, true)
    );
    assert!(s.user_rows("ghost").await.is_empty() && s.user_rows("ghost2").await.is_empty());
    let stale = s.token(&Jwt::new("u1", Some(12)).sign(), &key_id(12, "aaaa")).await;
    assert_401(&stale, ("invalid-generation", "body", "", "Unauthorized"));
    assert_eq!(s.token(&Jwt::new("u1", Some(43)).sign(), &key_id(12, "aaaa")).await.status, 200);

    // A replay changes nothing.
    let v: Value = post().await.unwrap().json().await.unwrap();
    assert_eq!(v["summary"]["rows_changed"], 0);
    assert_eq!(s.user_rows("u1").await[0].generation, 43);
    s.finish().await;
}

#[test]
fn cli_users_events_and_count() {
    let dir = TempDir::new();
    let run = |args: &[&str]| cli(&dir.0, args, &[]);
    let (code, _, err) = run(&["node", "add", "https://a.example.com", "--capacity", "10"]);
    assert_eq!(code, 0);
    // Logs to a pipe carry no colour codes.
    assert!(err.contains("INFO") && !err.contains('\x1b'), "{err:?}");
    let (code, out, err) = run(&["user", "assign", "u@example.com", "https://a.example.com", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (&v["status"], &v["current"]["generation"], &v["current"]["client_state"]),
        (&json!("assigned"), &json!(0), &json!(""))
    );
    let uid = v["current"]["uid"].as_i64().unwrap().to_string();
    let (code, out, _) = run(&["user", "show", &uid]);
    assert_eq!(code, 0);
    assert!(out.starts_with("user u@example.com (service sync-1.5): assigned"), "{out}");
    let (code, _, err) = run(&["user", "show", "nobody@example.com"]);
    assert_eq!(code, 1);
    assert!(err.contains("no user \"nobody@example.com\""), "{err}");

    let events = dir.0.join("events.jsonl");
    let line = json!({"event": "delete", "uid": "u", "iss": "example.com"}).to_string();
    std::fs::write(&events, format!("{line}\nnot json\n")).unwrap();
    let path = events.to_str().unwrap();
    let (code, out, err) = run(&["events", path]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        "2 messages: 1 delete, 0 reset, 0 passwordChange, 0 unknown, 1 invalid; 1 user rows changed"
    );
    assert!(err.contains("line 2: invalid account message"), "{err}");
    let (_, out, _) = run(&["events", path, "--json"]);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["rows_changed"], 0);
    let (_, out, _) = run(&["user", "show", "u@example.com", "--json"]);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["status"], "retired");

    let (code, out, _) = run(&["user", "count", "-t", "99999999999999"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!((&v["op"], &v["total_users"]), (&json!("sync_count_users"), &json!(0)));
    let (code, _, err) = run(&["user", "count", "-t", "-5"]);
    assert_eq!(code, 2, "{err}");
}

/// What the mock storage node saw: (method, path, uid in the token, fxa_uid, fxa_kid, node).
type Seen = Arc<Mutex<Vec<(String, String, i64, String, String, String)>>>;

/// A storage node checking each request as syncstorage does; answers 404 for uids in `gone`,
/// 503 for uids in `failing`, 204 otherwise, and 401 when the signature or token is wrong.
struct StorageNode {
    url: String,
    seen: Seen,
    failing: Arc<Mutex<Vec<i64>>>,
    gone: Arc<Mutex<Vec<i64>>>,
    bad_auth: Arc<Mutex<u32>>,
}

#[derive(Clone)]
struct NodeState {
    seen: Seen,
    failing: Arc<Mutex<Vec<i64>>>,
    gone: Arc<Mutex<Vec<i64>>>,
    bad_auth: Arc<Mutex<u32>>,
    port: u16,
}

async fn storage_call(State(n): State<NodeState>, req: Request) -> axum::response::Response {
    let path = req.uri().path().to_string();
    let method = req.method().to_string();
    let verified = (|| {
        let auth = req.headers().get("authorization")?.to_str().ok()?.strip_prefix("Hawk ")?;
        let header: hawk::Header = auth.parse().ok()?;
        let id = header.id.clone()?;
        let parsed = parse_token(&id, &[SECRET.as_bytes()], now_s() as f64, false).ok()?;
        let key = hawk::Key::new(parsed.key.as_bytes(), hawk::SHA256).ok()?;
        let request = hawk::RequestBuilder::new(&method, "127.0.0.1", n.port, &path).request();
        request.validate_header(&header, &key, Duration::from_secs(60)).then_some(parsed.payload)
    })();
    let Some(payload) = verified else {
        *n.bad_auth.lock().unwrap() += 1;
        return StatusCode::UNAUTHORIZED.into_response();
    };
    let uid = payload["uid"].as_i64().unwrap_or(-1);
    let text = |k: &str| payload[k].as_str().unwrap_or_default().to_string();
    n.seen.lock().unwrap().push((method, path.clone(), uid, text("fxa_uid"), text("fxa_kid"), text("node")));
    if path != format!("/1.5/{uid}") {
        return StatusCode::FORBIDDEN.into_response();
    }
    if n.failing.lock().unwrap().contains(&uid) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    if n.gone.lock().unwrap().contains(&uid) {
        return StatusCode::NOT_FOUND.into_response();
    }
    StatusCode::NO_CONTENT.into_response()
}

impl StorageNode {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = NodeState {
            seen: Seen::default(),
            failing: Arc::default(),
            gone: Arc::default(),
            bad_auth: Arc::default(),
            port,
        };
        let node = Self {
            url: format!("http://127.0.0.1:{port}"),
            seen: state.seen.clone(),
            failing: state.failing.clone(),
            gone: state.gone.clone(),
            bad_auth: state.bad_auth.clone(),
        };
        let app = Router::new().fallback(storage_call).with_state(state);
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        node
    }

    fn take(&self) -> Vec<(String, String, i64, String, String, String)> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

async fn purge(s: &TestServer, body: Value) -> Value {
    // Rows replaced in this very millisecond are not yet "before now".
    tokio::time::sleep(Duration::from_millis(5)).await;
    let r = s.admin.post(format!("{}/v1/purge", s.internal)).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

fn report(examined: u64, deleted: u64, data: u64, nodeless: u64, forced: u64, skipped: u64, failed: u64) -> Value {
    json!({
        "examined": examined, "deleted": deleted, "data_deleted": data, "nodeless": nodeless, "forced": forced,
        "skipped_downed": skipped, "failed": failed, "stopped_at_max": false, "dry_run": false,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn purge_deletes_data_with_hawk_signed_tokens_then_rows() {
    let s = TestServer::start(&[]).await;
    let node = StorageNode::start().await;
    let id = s.add_node(&node.url, 100, 10).await;
    // u1: aa (generation 123) → bb (456, keys changed at 450) → cc (789): two replaced rows.
    for (generation, kca, cs) in [(123, 123, "aa"), (456, 450, "bb"), (789, 789, "cc")] {
        let r = s.token(&Jwt::new("u1", Some(generation)).sign(), &key_id(kca, cs)).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let uids: Vec<i64> = s.user_rows("u1").await.iter().map(|r| r.uid).collect();
    assert_eq!(s.node_load(id).await, (9, 1, 100));

    // The default grace period (a day) keeps them, and no node is called.
    assert_eq!(purge(&s, json!({})).await, report(0, 0, 0, 0, 0, 0, 0));
    assert!(node.take().is_empty());
    // A dry run reports without calling or deleting.
    let dry = purge(&s, json!({"grace_period_s": 0, "dry_run": true})).await;
    assert_eq!((&dry["examined"], &dry["deleted"], &dry["dry_run"]), (&json!(2), &json!(2), &json!(true)));
    assert!(node.take().is_empty());
    assert_eq!(s.user_rows("u1").await.len(), 3);

    let done = purge(&s, json!({"grace_period_s": 0, "batch_size": 1})).await;
    assert_eq!(done, report(2, 2, 2, 0, 0, 0, 0));
    let seen = node.take();
    let fxa_uid = "u1".to_string();
    assert_eq!(
        seen,
        vec![
            (
                "DELETE".into(),
                format!("/1.5/{}", uids[0]),
                uids[0],
                fxa_uid.clone(),
                "0000000000123-qg".into(),
                node.url.clone()
            ),
            (
                "DELETE".into(),
                format!("/1.5/{}", uids[1]),
                uids[1],
                fxa_uid,
                "0000000000450-uw".into(),
                node.url.clone()
            ),
        ]
    );
    assert_eq!(*node.bad_auth.lock().unwrap(), 0);
    let left = s.user_rows("u1").await;
    assert_eq!((left.len(), left[0].uid, left[0].client_state.as_str(), left[0].replaced_at), (1, uids[2], "cc", None));
    // u1 still lives on the node: its slot is not freed.
    assert_eq!(s.node_load(id).await, (9, 1, 100));
    assert_eq!(s.token(&Jwt::new("u1", Some(789)).sign(), &key_id(789, "cc")).await.status, 200);
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn purge_retries_keeps_failed_rows_and_honours_downed_nodes() {
    let s = TestServer::start(&[]).await;
    let node = StorageNode::start().await;
    let id = s.add_node(&node.url, 100, 10).await;
    let other = s.add_node("https://other.example.com", 100, 10).await;
    s.sql(&format!("UPDATE nodes SET backoff = 1 WHERE id = {other}")).await;
    // Three users, each moved off the node: one replaced row each on it.
    for user in ["u1", "u2", "u3"] {
        assert_eq!(s.token(&Jwt::new(user, Some(1)).sign(), &key_id(1, "aaaa")).await.status, 200);
    }
    s.sql(&format!("UPDATE nodes SET backoff = 0 WHERE id = {other}")).await;
    let uid = |rows: &[UserRowView]| rows[0].uid;
    let (u1, u2, u3) = (uid(&s.user_rows("u1").await), uid(&s.user_rows("u2").await), uid(&s.user_rows("u3").await));
    for user in ["u1", "u2", "u3"] {
        let email = format!("{user}@{DOMAIN}");
        let url = format!("{}/v1/services/sync-1.5/users/{}/node", s.internal, segment(&email));
        let r = s.admin.put(url).json(&json!({"node": "https://other.example.com"})).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(s.node_load(id).await, (7, 3, 100));
    node.gone.lock().unwrap().push(u2);
    node.failing.lock().unwrap().push(u3);

    let done = purge(&s, json!({"grace_period_s": 0, "retries": 2, "retry_backoff_ms": 10})).await;
    assert_eq!(done, report(3, 2, 2, 0, 0, 0, 1));
    let calls: Vec<i64> = node.take().iter().map(|c| c.2).collect();
    assert_eq!(calls, vec![u1, u2, u3, u3, u3], "u3 tried once and retried twice");
    // u1's and u2's rows are gone and their slots freed; u3's kept, re-stamped for later.
    assert!(s.user_rows("u1").await.iter().all(|r| r.nodeid == other));
    assert!(s.user_rows("u2").await.iter().all(|r| r.nodeid == other));
    let u3_rows = s.user_rows("u3").await;
    assert_eq!(u3_rows.iter().filter(|r| r.nodeid == id).count(), 1);
    assert_eq!(s.node_load(id).await, (9, 1, 100));

    // The node downed: its rows are kept (and the node not called) unless forced.
    node.failing.lock().unwrap().clear();
    let url = format!("{}/v1/services/sync-1.5/nodes/{}", s.internal, segment(&node.url));
    assert_eq!(s.admin.patch(&url).json(&json!({"downed": true})).send().await.unwrap().status(), 200);
    assert_eq!(purge(&s, json!({"grace_period_s": 0})).await, report(1, 0, 0, 0, 0, 1, 0));
    assert_eq!(purge(&s, json!({"grace_period_s": 0, "force": true})).await, report(1, 1, 0, 0, 1, 0, 0));
    assert!(node.take().is_empty());
    assert!(s.user_rows("u3").await.iter().all(|r| r.nodeid == other));
    assert_eq!(s.node_load(id).await, (10, 0, 100));

    // Rows of a removed node are deleted without any call.
    let r =
        s.admin.delete(format!("{}/v1/services/sync-1.5/nodes/{}", s.internal, segment("https://other.example.com")));
    assert_eq!(r.send().await.unwrap().status(), 200);
    assert_eq!(purge(&s, json!({"grace_period_s": 0})).await, report(3, 3, 0, 3, 0, 0, 0));
    assert_eq!(s.count_users().await, 0);
    let r = s.admin.post(format!("{}/v1/purge", s.internal)).json(&json!({"batch_size": 0})).send().await.unwrap();
    assert_eq!(r.status(), 422);
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bucketed_assignment_places_users_by_bucket_and_moves_a_bucket_at_once() {
    use tokenserver_core::sync::buckets::bucket_of;
    let s = TestServer::start(&[("TOKENSERVER_BUCKETS", "2")]).await;
    let (a, b) = ("https://a.example.com", "https://b.example.com");
    let a_id = s.add_node(a, 100, 100).await;
    let b_id = s.add_node(b, 100, 100).await;
    let users: Vec<String> = (0..12).map(|i| format!("b{i}")).collect();
    let bucket = |u: &str| bucket_of(&format!("{u}@{DOMAIN}"), 2);
    for u in &users {
        assert_eq!(s.token(&Jwt::new(u, Some(1)).sign(), "1-qqo").await.status, 200);
    }
    // Every user of a bucket is on that bucket's node.
    let node_of = |rows: Vec<UserRowView>| rows.iter().find(|r| r.replaced_at.is_none()).unwrap().nodeid;
    let mut placed = std::collections::BTreeMap::new();
    for u in &users {
        let node = node_of(s.user_rows(u).await);
        assert_eq!(*placed.entry(bucket(u)).or_insert(node), node, "bucket {} split", bucket(u));
    }
    let url = format!("{}/v1/services/sync-1.5/buckets", s.internal);
    let listed: Value = s.admin.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(listed["buckets"], 2);
    let assigned = listed["assigned"].as_array().unwrap();
    assert_eq!(assigned.len(), placed.len());

    // Move bucket 0 to b: its users elsewhere are unassigned and land on b on their next request.
    let on_a_in_0 = users.iter().filter(|u| bucket(u) == 0 && placed[&0] == a_id).count() as u64;
    let r = s.admin.put(format!("{url}/0")).json(&json!({"node": b})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"bucket": 0, "node": b, "unassigned": on_a_in_0}));
    for u in users.iter().filter(|u| bucket(u) == 0) {
        let r = s.token(&Jwt::new(u, Some(1)).sign(), "1-qqo").await;
        assert!(r.json()["api_endpoint"].as_str().unwrap().starts_with(b), "{}", r.body);
        assert_eq!(node_of(s.user_rows(u).await), b_id);
    }
    let r = s.admin.put(format!("{url}/2")).json(&json!({"node": b})).send().await.unwrap();
    assert_eq!(
        (r.status().as_u16(), r.json::<Value>().await.unwrap()["error"].clone()),
        (422, json!("invalid_bucket"))
    );
    let r = s.admin.put(format!("{url}/1")).json(&json!({"node": "https://none.example.com"})).send().await.unwrap();
    assert_eq!(r.status(), 404);
    s.finish().await;

    // Off by default: the bucket routes say so.
    let s = TestServer::start(&[]).await;
    let r = s.admin.get(format!("{}/v1/services/sync-1.5/buckets", s.internal)).send().await.unwrap();
    assert_eq!((r.status().as_u16(), r.json::<Value>().await.unwrap()["error"].clone()), (422, json!("buckets_off")));
    s.finish().await;
}
