//! The consistency rules V1–V8 and the writes of §1.7, driven through HTTP.

use crate::common::*;

fn cs_error(desc: &str) -> (&'static str, &'static str, &'static str, String) {
    ("invalid-client-state", "header", "X-Client-State", format!("Unacceptable client-state value {desc}"))
}

async fn expect_cs_error(s: &TestServer, jwt: &str, kid: &str, desc: &str) {
    let r = s.token(jwt, kid).await;
    let (st, loc, name, d) = cs_error(desc);
    assert_error(&r, 401, st, loc, name, &d);
}

async fn ok(s: &TestServer, user: &str, generation: Option<i64>, kid: &str) -> serde_json::Value {
    let r = s.token(&Jwt::new(user, generation).sign(), kid).await;
    assert_eq!(r.status, 200, "{user} gen={generation:?} kid={kid}: {}", r.body);
    r.json()
}

#[tokio::test]
async fn each_rule_v1_to_v8_gives_its_error() {
    let s = TestServer::start(&[]).await;
    s.add_node(NODE, 100, 100).await;
    // Baseline: generation 10, kca 10, client state aaaa.
    ok(&s, "u1", Some(10), &key_id(10, "aaaa")).await;

    // V1: keys changed (20 > 10) but the generation (15) predates the change.
    let r = s.token(&Jwt::new("u1", Some(15)).sign(), &key_id(20, "aaaa")).await;
    assert_error(&r, 401, "invalid-keysChangedAt", "body", "", "Unauthorized");
    // V2: empty client state once one is known.
    expect_cs_error(&s, &Jwt::new("u1", Some(10)).sign(), "10-", "empty string").await;
    // V4: new client state, same generation.
    expect_cs_error(&s, &Jwt::new("u1", Some(10)).sign(), &key_id(10, "bbbb"), "new value with no generation change")
        .await;
    // V5: new client state, newer generation, same kca.
    expect_cs_error(
        &s,
        &Jwt::new("u1", Some(11)).sign(),
        &key_id(10, "bbbb"),
        "new value with no keys_changed_at change",
    )
    .await;
    // V6: generation going backwards.
    let r = s.token(&Jwt::new("u1", Some(9)).sign(), &key_id(10, "aaaa")).await;
    assert_error(&r, 401, "invalid-generation", "body", "", "Unauthorized");
    // V7: keys_changed_at going backwards.
    let r = s.token(&Jwt::new("u1", Some(10)).sign(), &key_id(9, "aaaa")).await;
    assert_error(&r, 401, "invalid-keysChangedAt", "body", "", "Unauthorized");
    // V8: keys_changed_at absent (0) once known.
    let r = s.token(&Jwt::new("u1", Some(10)).sign(), "0-qqo").await;
    assert_error(&r, 401, "invalid-keysChangedAt", "body", "", "Unauthorized");
    // None of the rejections wrote anything.
    let rows = s.user_rows("u1").await;
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].generation, rows[0].keys_changed_at, rows[0].client_state.as_str()), (10, Some(10), "aaaa"));

    // A proper key change: new row on the same node, old one replaced, load unchanged.
    let before = s.node_load(rows[0].nodeid).await;
    let body = ok(&s, "u1", Some(20), &key_id(20, "bbbb")).await;
    let rows = s.user_rows("u1").await;
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1].uid, body["uid"].as_i64().unwrap());
    assert_ne!(rows[0].uid, rows[1].uid);
    assert_eq!(rows[1].nodeid, rows[0].nodeid);
    assert_eq!((rows[1].generation, rows[1].keys_changed_at, rows[1].client_state.as_str()), (20, Some(20), "bbbb"));
    assert_eq!(rows[0].replaced_at, Some(rows[1].created_at));
    assert_eq!(rows[1].replaced_at, None);
    assert_eq!(s.node_load(rows[0].nodeid).await, before);
    let parsed =
        tokenserver_core::sync::tokenlib::parse_token(body["id"].as_str().unwrap(), &[SECRET.as_bytes()], 0.0, false)
            .unwrap();
    assert_eq!(parsed.payload["fxa_kid"], "0000000000020-u7s");

    // V3: the old client state is now stale.
    expect_cs_error(&s, &Jwt::new("u1", Some(30)).sign(), &key_id(30, "aaaa"), "stale value").await;
}

#[tokio::test]
async fn in_place_updates_and_generation_from_keys_changed_at() {
    let s = TestServer::start(&[]).await;
    s.add_node(NODE, 100, 100).await;
    ok(&s, "u1", Some(10), &key_id(10, "aaaa")).await;
    // Newer generation, same keys: updated in place.
    ok(&s, "u1", Some(12), &key_id(10, "aaaa")).await;
    let rows = s.user_rows("u1").await;
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].generation, rows[0].keys_changed_at), (12, Some(10)));
    // A key change without a generation bumps the generation to keys_changed_at.
    let body = ok(&s, "u1", None, &key_id(15, "bbbb")).await;
    let rows = s.user_rows("u1").await;
    assert_eq!(rows.len(), 2);
    assert_eq!((rows[1].generation, rows[1].keys_changed_at), (15, Some(15)));
    assert_eq!(body["uid"], rows[1].uid);
    // Without a generation, same keys: nothing changes.
    ok(&s, "u1", None, &key_id(15, "bbbb")).await;
    assert_eq!(s.user_rows("u1").await, rows);
}

#[tokio::test]
async fn zero_generation_and_zero_keys_changed_at_mean_absent() {
    let s = TestServer::start(&[]).await;
    s.add_node(NODE, 100, 100).await;
    ok(&s, "u1", Some(0), "0-qqo").await;
    let rows = s.user_rows("u1").await;
    assert_eq!((rows[0].generation, rows[0].keys_changed_at), (0, None));
    let body = ok(&s, "u1", None, "0-qqo").await;
    let parsed =
        tokenserver_core::sync::tokenlib::parse_token(body["id"].as_str().unwrap(), &[SECRET.as_bytes()], 0.0, false)
            .unwrap();
    // fxa_kid falls back to the generation when keys_changed_at is NULL.
    assert_eq!(parsed.payload["fxa_kid"], "0000000000000-qqo");
}

#[tokio::test]
async fn replaced_and_nodeless_users_are_reassigned() {
    let s = TestServer::start(&[]).await;
    let node = s.add_node(NODE, 100, 100).await;
    ok(&s, "u1", Some(10), &key_id(10, "aaaa")).await;
    // Ops unassigned the node: the user gets a new row, same account state.
    s.sql("UPDATE users SET replaced_at = 5").await;
    let body = ok(&s, "u1", Some(10), &key_id(10, "aaaa")).await;
    let rows = s.user_rows("u1").await;
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1].uid, body["uid"].as_i64().unwrap());
    assert_eq!((rows[1].generation, rows[1].client_state.as_str(), rows[1].replaced_at), (10, "aaaa", None));
    assert_eq!(s.node_load(node).await.1, 2);
    // Its node deleted: reassigned to another node.
    s.sql("DELETE FROM nodes").await;
    let node2 = s.add_node("https://other.example.com", 100, 100).await;
    let body = ok(&s, "u1", Some(10), &key_id(10, "aaaa")).await;
    assert_eq!(body["api_endpoint"], format!("https://other.example.com/1.5/{}", body["uid"]));
    let rows = s.user_rows("u1").await;
    assert_eq!(rows.last().unwrap().nodeid, node2);
}

#[tokio::test]
async fn race_recovery_marks_older_live_rows_replaced() {
    let s = TestServer::start(&[]).await;
    let node = s.add_node(NODE, 100, 100).await;
    for (gen, created) in [(1234, 1234), (1235, 1240)] {
        s.sql(&format!(
            "INSERT INTO users (service, email, generation, client_state, created_at, nodeid, keys_changed_at) \
             VALUES (1, 'u1@{DOMAIN}', {gen}, 'aaaa', {created}, {node}, 1234)"
        ))
        .await;
    }
    let body = ok(&s, "u1", Some(1235), &key_id(1234, "aaaa")).await;
    let rows = s.user_rows("u1").await;
    assert_eq!(body["uid"], rows[1].uid);
    assert_eq!(rows[0].replaced_at, Some(1240));
    assert_eq!(rows[1].replaced_at, None);
}

#[tokio::test]
async fn retired_users_are_refused_unless_they_send_no_generation() {
    let s = TestServer::start(&[]).await;
    let node = s.add_node(NODE, 100, 100).await;
    s.sql(&format!(
        "INSERT INTO users (service, email, generation, client_state, created_at, replaced_at, nodeid, keys_changed_at) \
         VALUES (1, 'gone@{DOMAIN}', 9223372036854775807, 'aaaa', 1, 2, {node}, 1)"
    ))
    .await;
    let r = s.token(&Jwt::new("gone", Some(5)).sign(), "1-qqo").await;
    assert_error(&r, 401, "invalid-generation", "body", "", "Unauthorized");
    let r = s.token(&Jwt::new("gone", Some(i64::MAX)).sign(), "1-qqo").await;
    assert_eq!(r.status, 200, "{}", r.body);
}
