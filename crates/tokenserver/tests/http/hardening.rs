//! Hardening: clients that go away mid-request, on every backend.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokenserver_store::Backend;

use crate::common::*;

macro_rules! per_backend {
    ($($name:ident),+ $(,)?) => { $(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() { super::$name(tokenserver_store::Backend::Sqlite).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() { super::$name(tokenserver_store::Backend::Postgres).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn mysql() { super::$name(tokenserver_store::Backend::MySql).await }
        }
    )+ };
}

per_backend!(cancelled_writes_never_wedge_the_store);

/// A client that gives up after `ms` milliseconds (its connection is closed, and the server
/// drops the request's future wherever it was).
fn impatient(ms: u64) -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_micros(ms * 1000 + rand::random::<u64>() % 1000)).build().unwrap()
}

/// Fifty parallel node additions, new users and key changes whose clients leave after 0–4 ms,
/// several rounds; then every kind of write answers at once and the rows are consistent.
async fn cancelled_writes_never_wedge_the_store(backend: Backend) {
    let mut extra = vec![("SYNC_TOKENSERVER__DATABASE_POOL_CONNECTION_TIMEOUT", "2")];
    if backend == Backend::MySql {
        // MySQL holds no sessions; the session writes go to the in-process store.
        extra.push(("TOKENSERVER_SESSIONS__URL", "memory:"));
    }
    let Some(s) = TestServer::start_on(backend, &extra).await else { return };
    let s = Arc::new(s);
    s.add_node(NODE, 1_000_000, 1_000_000).await;
    for round in 0..10u64 {
        let tasks: Vec<_> = (0..50u64)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move {
                    let client = impatient(i % 5);
                    let n = round * 100 + i;
                    match (i + round) % 3 {
                        0 => {
                            let body = json!({"node": format!("https://n{n}.example.com"), "capacity": 10});
                            let _ = client.post(format!("{}/v1/nodes", s.internal)).json(&body).send().await;
                        }
                        1 => {
                            let jwt = Jwt::new(&format!("u{n}"), Some(1)).sign();
                            let _ = client
                                .get(format!("{}/1.0/sync/1.5", s.base))
                                .bearer_auth(jwt)
                                .header("x-keyid", "1-qqo")
                                .send()
                                .await;
                        }
                        _ => {
                            let _ = client
                                .post(format!("{}/v1/sessions", s.internal))
                                .json(&json!({"meta": {"n": n}}))
                                .send()
                                .await;
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    }
    // Every write path answers now.
    let r = s
        .http
        .post(format!("{}/v1/nodes", s.internal))
        .json(&json!({"node": "https://after.example.com", "capacity": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let r = s.token(&Jwt::new("after", Some(1)).sign(), "1-qqo").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = s.token(&Jwt::new("after", Some(2)).sign(), &key_id(2, "bbbb")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = s.http.post(format!("{}/v1/sessions", s.internal)).json(&json!({"meta": {}})).send().await.unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let hb = s.request(reqwest::Method::GET, "/__heartbeat__", &[]).await;
    assert_eq!(hb.status, 200, "{}", hb.body);
    // Each allocation that happened is whole: a node's load is the number of its users.
    for (id, load, users) in s.loads_and_users().await {
        assert_eq!(load, users, "node {id}");
    }
    Arc::into_inner(s).unwrap().finish().await;
}
