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

per_backend!(all: access_tokens_over_two_heads);

/// One v1 access-token call at `internal` (a head's internal listener), for service `svc1`.
async fn access(http: &reqwest::Client, internal: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = http.request(method, format!("{internal}/v1/services/svc1{path}"));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap() })
}

/// Access tokens with the calls split between two processes on one store: fifty creates of one
/// token have one winner; what one head deletes or revokes the other stops answering for at
/// once, though it has just served the token (SQLite's heads each keep a cache of tokens read).
async fn access_tokens_over_two_heads(backend: Backend) {
    let Some(db) = fresh(backend).await else { return };
    let s = TestServer::start(&[("TOKENSERVER_ACCESS__URL", db.url.as_str())]).await;
    let head = s.second_head().await;
    let heads = [s.internal.clone(), head.internal.clone()];
    let call = |h: usize, method: &'static str, path: String, body: Option<Value>| {
        let (http, internal) = (s.http.clone(), heads[h % 2].clone());
        async move { access(&http, &internal, method, &path, body).await }
    };

    let answers =
        join_all((0..50).map(|i| {
            call(i, "POST", "/tokens".into(), Some(json!({"token": "contested", "app_id": format!("app-{i}")})))
        }))
        .await;
    let mut winners = Vec::new();
    for (i, (status, body)) in answers.iter().enumerate() {
        match status {
            201 => winners.push(format!("app-{i}")),
            409 => assert_eq!(body["error"], "access_token_already_exists", "{body}"),
            other => panic!("{other}: {body}\n{}", head.log()),
        }
    }
    assert_eq!(winners.len(), 1, "one winner over both heads: {answers:?}");
    for h in 0..2 {
        let (status, body) = call(h, "GET", "/tokens/contested".into(), None).await;
        assert_eq!((status, body["app_id"].as_str()), (200, Some(winners[0].as_str())), "head {h}");
    }

    let gone = json!({"error": "access_token_invalid", "message": "token \"t\" is invalid: expired or never defined"});
    for round in 0..20 {
        // Created at one head, served twice by the other (the second answer may come from a
        // cache), then deleted or revoked at the first: the other's next answer is 404.
        let (writer, reader) = (round % 2, (round + 1) % 2);
        let app = format!("app-r{round}");
        let created =
            call(writer, "POST", "/tokens".into(), Some(json!({"token": "t", "app_id": app, "ttl": 0}))).await;
        assert_eq!(created.0, 201, "{}", created.1);
        for _ in 0..2 {
            let (status, body) = call(reader, "POST", "/authorize".into(), Some(json!({"access_token": "t"}))).await;
            assert_eq!((status, body), (200, json!({"app_id": app, "user_id": null})), "round {round}");
        }
        if round % 4 < 2 {
            assert_eq!(call(writer, "DELETE", "/tokens/t".into(), None).await.0, 204);
        } else {
            let revoked = call(writer, "DELETE", format!("/applications/{app}/tokens"), None).await;
            assert_eq!(revoked, (200, json!({"revoked": 1})), "round {round}");
        }
        let (status, body) = call(reader, "POST", "/authorize".into(), Some(json!({"access_token": "t"}))).await;
        assert_eq!((status, &body), (404, &gone), "round {round}: the other head still answered");
        assert_eq!(call(reader, "GET", "/tokens/t".into(), None).await, (404, gone.clone()), "round {round}");
        let listed = call(reader, "GET", format!("/applications/{app}/tokens"), None).await;
        assert_eq!(listed, (200, json!({"tokens": [], "next_cursor": null})), "round {round}");
    }
    drop(head);
    s.finish().await;
    db.drop_now().await;
}
