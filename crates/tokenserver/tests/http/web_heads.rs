//! Two web heads on one database: the concurrency claims hold when the requests are split
//! between two tokenserver processes — the test's own server and the real binary started
//! beside it with the same settings — as they are behind a load balancer.

use std::collections::HashSet;

use futures::future::join_all;
use serde_json::{json, Value};
use tokenserver_store::testing::fresh;
use tokenserver_store::Backend;

use crate::common::*;

per_backend!(sql: fifty_first_requests_over_two_heads_create_one_user);

async fn fifty_first_requests_over_two_heads_create_one_user(backend: Backend) {
    let Some(s) = TestServer::start_on(backend, &[]).await else { return };
    let node = s.add_node(NODE, 100, 100).await;
    let head = s.second_head().await;
    let jwt = Jwt::new("newbie", Some(10)).sign();
    let kid = key_id(10, "aaaa");
    let bases = [s.base.clone(), head.base.clone()];
    let answers = join_all((0..50).map(|i| {
        let req = s
            .http
            .get(format!("{}/1.0/sync/1.5", bases[i % 2]))
            .header("authorization", format!("Bearer {jwt}"))
            .header("x-keyid", &kid);
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    }))
    .await;
    let mut uids = HashSet::new();
    for (status, body) in &answers {
        assert_eq!(*status, 200, "{body}\n{}", head.log());
        let body: Value = serde_json::from_str(body).unwrap();
        uids.insert(body["uid"].as_i64().unwrap());
    }
    assert_eq!(uids.len(), 1, "one user for both heads");
    let rows = s.user_rows("newbie").await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].replaced_at, None);
    assert_eq!(s.node_load(node).await, (99, 1, 100));
    drop(head);
    s.finish().await;
}

async fn put(http: &reqwest::Client, internal: &str, token: &str) -> (u16, String) {
    let r = http
        .put(format!("{internal}/token"))
        .header("content-type", "application/json")
        .body(json!({ "token": token }).to_string())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Each of several tokens rotated 16 times at once, half the calls at each head, inside the
/// grace window: every call gets the same successor (one rotation, the others replays of it),
/// and that successor rotates at the other head.
async fn rotations_over_two_heads_issue_one_successor(backend: Backend) {
    let Some(db) = fresh(backend).await else { return };
    let settings = [("TOKENSERVER_SESSIONS__URL", db.url.as_str()), ("TOKENSERVER_SESSIONS__GRACE_PERIOD", "60s")];
    let s = TestServer::start(&settings).await;
    let head = s.second_head().await;
    let internals = [s.internal.clone(), head.internal.clone()];
    for round in 0..8 {
        let created = s
            .http
            .post(format!("{}/token", internals[round % 2]))
            .header("content-type", "application/json")
            .body(r#"{"meta":{"n":1}}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(created.status(), 200);
        let token = created.text().await.unwrap();
        let answers = join_all((0..16).map(|i| put(&s.http, &internals[i % 2], &token))).await;
        let mut successors = HashSet::new();
        for (status, body) in &answers {
            assert_eq!(*status, 200, "{body}");
            let body: Value = serde_json::from_str(body).unwrap();
            assert_eq!(body["Ok"]["meta"], json!({"n": 1}), "{body}\n{}", head.log());
            successors.insert(body["Ok"]["token"].as_str().unwrap().to_string());
        }
        assert_eq!(successors.len(), 1, "one successor for both heads: {answers:?}");
        let successor = successors.into_iter().next().unwrap();
        let (status, body) = put(&s.http, &internals[(round + 1) % 2], &successor).await;
        assert_eq!(status, 200);
        assert!(body.starts_with(r#"{"Ok""#), "{body}");
    }
    drop(head);
    s.finish().await;
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotations_over_two_heads_on_sqlite() {
    rotations_over_two_heads_issue_one_successor(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotations_over_two_heads_on_postgres() {
    rotations_over_two_heads_issue_one_successor(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotations_over_two_heads_on_redis() {
    rotations_over_two_heads_issue_one_successor(Backend::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotations_over_two_heads_on_redis_cluster() {
    rotations_over_two_heads_issue_one_successor(Backend::RedisCluster).await;
}
