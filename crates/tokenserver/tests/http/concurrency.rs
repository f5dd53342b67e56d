//! Concurrency claims, proven with many parallel HTTP requests (Mozilla's server fails these).

use std::sync::Arc;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_first_requests_create_one_user_and_one_load_increment() {
    let s = Arc::new(TestServer::start(&[]).await);
    let node = s.add_node(NODE, 100, 100).await;
    let jwt = Jwt::new("newbie", Some(10)).sign();
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let s = s.clone();
            let jwt = jwt.clone();
            tokio::spawn(async move { s.token(&jwt, &key_id(10, "aaaa")).await })
        })
        .collect();
    let mut uids = std::collections::HashSet::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        uids.insert(r.json()["uid"].as_i64().unwrap());
    }
    assert_eq!(uids.len(), 1);
    let rows = s.user_rows("newbie").await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].replaced_at, None);
    assert_eq!(s.node_load(node).await, (99, 1, 100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_allocations_never_exceed_capacity() {
    let s = Arc::new(TestServer::start(&[]).await);
    let node = s.add_node(NODE, 10, 10).await;
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                let user = format!("user{i}");
                s.token(&Jwt::new(&user, Some(1)).sign(), "1-qqo").await
            })
        })
        .collect();
    let (mut ok, mut full) = (0, 0);
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            200 => ok += 1,
            503 => {
                assert_error(&r, 503, "internal-error", "internal", "", "Server error");
                full += 1;
            }
            other => panic!("unexpected {other}: {}", r.body),
        }
    }
    assert_eq!((ok, full), (10, 30));
    assert_eq!(s.count_users().await, 10);
    let (_, load, capacity) = s.node_load(node).await;
    assert_eq!((load, capacity), (10, 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_client_state_changes_leave_exactly_one_current_row() {
    let s = Arc::new(TestServer::start(&[]).await);
    let node = s.add_node(NODE, 100, 100).await;
    assert_eq!(s.token(&Jwt::new("u1", Some(1)).sign(), &key_id(1, "aaaa")).await.status, 200);
    let tasks: Vec<_> = (2..32)
        .map(|g: i64| {
            let s = s.clone();
            tokio::spawn(async move {
                let state = format!("{:032x}", g);
                s.token(&Jwt::new("u1", Some(g)).sign(), &key_id(g, &state)).await
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            200 => ok += 1,
            // Losers see a newer state and are refused by the rules (stale / backwards).
            401 => {}
            other => panic!("unexpected {other}: {}", r.body),
        }
    }
    assert!(ok >= 1);
    let rows = s.user_rows("u1").await;
    let live: Vec<_> = rows.iter().filter(|r| r.replaced_at.is_none()).collect();
    assert_eq!(live.len(), 1, "{rows:#?}");
    // The live row is the current one: highest generation.
    let max_gen = rows.iter().map(|r| r.generation).max().unwrap();
    assert_eq!(live[0].generation, max_gen);
    assert!(rows.iter().all(|r| r.nodeid == node));
    assert_eq!(s.node_load(node).await.1, 1, "client-state changes never bump the load");
}
