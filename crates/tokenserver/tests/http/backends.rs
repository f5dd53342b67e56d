//! Server behaviour that must hold on every backend: SQLite, PostgreSQL and MariaDB/MySQL.
//! Each test runs once per backend (`backends::<test>::<backend>`); a backend whose
//! `TOKENSERVER_TEST_*_URL` is unset is skipped with a notice.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokenserver_store::testing::fresh;
use tokenserver_store::Backend;

use crate::common::*;
use crate::proxy::{target_of, Proxy};

per_backend!(sql:
    token_flow_writes_mozillas_rows,
    fifty_concurrent_first_requests_create_one_user,
    concurrent_allocations_never_exceed_capacity,
    concurrent_client_state_changes_leave_one_current_row,
    slow_database_call_is_a_504,
    tables_rewritten_by_another_process_are_picked_up,
);

async fn token_flow_writes_mozillas_rows(backend: Backend) {
    let Some(s) = TestServer::start_on(backend, &[("SYNC_TOKENSERVER__NODE_TYPE", "postgres")]).await else { return };
    let node = s.add_node(NODE, 100, 100).await;
    let r = s.token(&Jwt::new("u1", Some(1234)).sign(), "1234-qqo").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let body = r.json();
    let rows = s.user_rows("u1").await;
    assert_eq!(rows.len(), 1);
    assert_eq!(body["uid"], rows[0].uid);
    assert_eq!(body["api_endpoint"], format!("{NODE}/1.5/{}", rows[0].uid));
    assert_eq!(body["node_type"], "postgres");
    assert_eq!(
        (rows[0].generation, rows[0].keys_changed_at, rows[0].client_state.as_str()),
        (1234, Some(1234), "aaaa")
    );
    assert_eq!((rows[0].nodeid, rows[0].replaced_at), (node, None));
    assert_eq!(s.node_load(node).await, (99, 1, 100));
    // Key change: a new row on the same node, the old one replaced.
    let r = s.token(&Jwt::new("u1", Some(2000)).sign(), &key_id(2000, "bbbb")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let rows = s.user_rows("u1").await;
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].replaced_at, Some(rows[1].created_at));
    assert_eq!(r.json()["uid"], rows[1].uid);
    // Stale state and backwards generation are refused with Mozilla's bodies.
    let r = s.token(&Jwt::new("u1", Some(3000)).sign(), &key_id(3000, "aaaa")).await;
    assert_error(
        &r,
        401,
        "invalid-client-state",
        "header",
        "X-Client-State",
        "Unacceptable client-state value stale value",
    );
    let r = s.token(&Jwt::new("u1", Some(1)).sign(), &key_id(2000, "bbbb")).await;
    assert_error(&r, 401, "invalid-generation", "body", "", "Unauthorized");
    // The heartbeat checks this database.
    let hb = s.request(reqwest::Method::GET, "/__heartbeat__", &[]).await;
    assert_eq!(hb.status, 200);
    s.finish().await;
}

async fn fifty_concurrent_first_requests_create_one_user(backend: Backend) {
    let Some(s) = TestServer::start_on(backend, &[]).await else { return };
    let s = Arc::new(s);
    let node = s.add_node(NODE, 100, 100).await;
    let jwt = Jwt::new("newbie", Some(10)).sign();
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (s, jwt) = (s.clone(), jwt.clone());
            tokio::spawn(async move { s.token(&jwt, &key_id(10, "aaaa")).await })
        })
        .collect();
    let mut uids = HashSet::new();
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
    Arc::into_inner(s).unwrap().finish().await;
}

async fn concurrent_allocations_never_exceed_capacity(backend: Backend) {
    let Some(s) = TestServer::start_on(backend, &[]).await else { return };
    let s = Arc::new(s);
    let node = s.add_node(NODE, 10, 10).await;
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move { s.token(&Jwt::new(&format!("user{i}"), Some(1)).sign(), "1-qqo").await })
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
    Arc::into_inner(s).unwrap().finish().await;
}

async fn concurrent_client_state_changes_leave_one_current_row(backend: Backend) {
    let Some(s) = TestServer::start_on(backend, &[]).await else { return };
    let s = Arc::new(s);
    let node = s.add_node(NODE, 100, 100).await;
    assert_eq!(s.token(&Jwt::new("u1", Some(1)).sign(), &key_id(1, "aaaa")).await.status, 200);
    let tasks: Vec<_> = (2..32)
        .map(|g: i64| {
            let s = s.clone();
            tokio::spawn(
                async move { s.token(&Jwt::new("u1", Some(g)).sign(), &key_id(g, &format!("{g:032x}"))).await },
            )
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            200 => ok += 1,
            // Losers see a newer state and are refused by the rules.
            401 => {}
            other => panic!("unexpected {other}: {}", r.body),
        }
    }
    assert!(ok >= 1);
    let rows = s.user_rows("u1").await;
    let live: Vec<_> = rows.iter().filter(|r| r.replaced_at.is_none()).collect();
    assert_eq!(live.len(), 1, "{rows:#?}");
    assert_eq!(live[0].generation, rows.iter().map(|r| r.generation).max().unwrap());
    assert!(rows.iter().all(|r| r.nodeid == node));
    assert_eq!(s.node_load(node).await.1, 1, "client-state changes never bump the load");
    Arc::into_inner(s).unwrap().finish().await;
}

async fn slow_database_call_is_a_504(backend: Backend) {
    let Some(s) = TestServer::start_on(backend, &[("SYNC_TOKENSERVER__DATABASE_REQUEST_TIMEOUT", "0.3")]).await else {
        return;
    };
    s.add_node(NODE, 100, 100).await;
    // Another process holds the locks an allocation needs: it waits past the request timeout.
    let blocker = s.block_allocations().await;
    let r = s.token(&Jwt::new("u1", Some(1)).sign(), "1-qqo").await;
    assert_error(&r, 504, "elapsed", "body", "", "Elapsed");
    blocker.release().await;
    assert_eq!(s.count_users().await, 0);
    // The server recovers once the locks are gone. On a loaded machine (the whole suite in
    // parallel on two cores) the writer may still be leaving SQLite's busy handler, so a request
    // or two can still run past the 0.3 s limit: each of those must be the same 504.
    let mut attempts = 0;
    let r = loop {
        let r = s.token(&Jwt::new("u1", Some(1)).sign(), "1-qqo").await;
        attempts += 1;
        if r.status != 504 || attempts == 20 {
            break r;
        }
        assert_error(&r, 504, "elapsed", "body", "", "Elapsed");
    };
    assert_eq!(r.status, 200, "after {attempts} attempts: {}", r.body);
    assert_eq!(s.count_users().await, 1);
    s.finish().await;
}

async fn tables_rewritten_by_another_process_are_picked_up(backend: Backend) {
    let Some(s) = TestServer::start_on(backend, &[]).await else { return };
    s.add_node(NODE, 100, 100).await;
    let first = s.token(&Jwt::new("u1", Some(1)).sign(), "1-qqo").await.json();
    // What Mozilla's integration-test fixtures and ops scripts do to a live database: wipe the
    // tables and re-create the service (with a new id) and a node with an explicit id.
    s.sql("DELETE FROM users").await;
    s.sql("DELETE FROM nodes").await;
    s.sql("DELETE FROM services").await;
    s.sql("INSERT INTO services (service, pattern) VALUES ('sync-1.5', '{node}/1.5/{uid}')").await;
    s.sql("INSERT INTO nodes (id, service, node, available, current_load, capacity, downed, backoff) \
           VALUES (800, (SELECT id FROM services WHERE service = 'sync-1.5'), 'https://other.example.com', 100, 0, 100, 0, 0)")
        .await;
    let r = s.token(&Jwt::new("u1", Some(1)).sign(), "1-qqo").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let body = r.json();
    assert_ne!(body["uid"], first["uid"]);
    assert_eq!(body["api_endpoint"], format!("https://other.example.com/1.5/{}", body["uid"]));
    let rows = s.user_rows("u1").await;
    assert_eq!((rows.len(), rows[0].nodeid), (1, 800));
    assert_eq!(s.node_load(800).await, (99, 1, 100));
    s.finish().await;
}

/// A database that goes away: 503 with Retry-After (never a hang or a 500), heartbeat 503, and
/// the server recovers by itself when the database is back.
async fn database_outage(backend: Backend) {
    let Some(db) = fresh(backend).await else { return };
    let proxy = Proxy::start(target_of(&db.url)).await;
    let mut proxied = db.clone();
    proxied.url = proxy.url_for(&db.url);
    let fxa = MockFxa::start().await;
    let s = TestServer::start_with(fxa, proxied, &[("SYNC_TOKENSERVER__DATABASE_POOL_CONNECTION_TIMEOUT", "1")]).await;
    s.add_node(NODE, 100, 100).await;
    let jwt = Jwt::new("u1", Some(1)).sign();
    assert_eq!(s.token(&jwt, "1-qqo").await.status, 200);

    proxy.cut().await;
    for _ in 0..2 {
        let r = s.token(&jwt, "1-qqo").await;
        assert_error(&r, 503, "internal-error", "internal", "", "Server error");
        assert_eq!(r.headers["retry-after"], "10");
    }
    let hb = s.request(reqwest::Method::GET, "/__heartbeat__", &[]).await;
    assert_eq!(hb.status, 503);
    assert_eq!(hb.json()["database"], "Unknown");

    proxy.restore();
    let r = s.token(&jwt, "1-qqo").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let hb = s.request(reqwest::Method::GET, "/__heartbeat__", &[]).await;
    assert_eq!(hb.status, 200);
    s.finish().await;
    db.drop_now().await;
}

/// The database restarting within a second (here: every connection cut, then the database
/// reachable again 200 ms later): the token requests that follow read on pooled connections found
/// dead, run their read again on new ones, and none fails.
async fn short_outage(backend: Backend) {
    let Some(db) = fresh(backend).await else { return };
    let proxy = Proxy::start(target_of(&db.url)).await;
    let mut proxied = db.clone();
    proxied.url = proxy.url_for(&db.url);
    let fxa = MockFxa::start().await;
    let s = Arc::new(TestServer::start_with(fxa, proxied, &[]).await);
    s.add_node(NODE, 100, 100).await;
    let users: Vec<String> = (0..8).map(|i| Jwt::new(&format!("u{i}"), Some(1)).sign()).collect();
    let tokens = |s: &Arc<TestServer>| -> Vec<_> {
        users
            .iter()
            .map(|jwt| {
                let (s, jwt) = (s.clone(), jwt.clone());
                tokio::spawn(async move { s.token(&jwt, "1-qqo").await })
            })
            .collect()
    };
    let mut uids = Vec::new();
    for t in tokens(&s) {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        uids.push(r.json()["uid"].clone());
    }

    proxy.cut().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.restore();
    for (t, uid) in tokens(&s).into_iter().zip(&uids) {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(&r.json()["uid"], uid);
    }
    Arc::into_inner(s).unwrap().finish().await;
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_restart_within_a_second_fails_no_token_request() {
    short_outage(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_restart_within_a_second_fails_no_token_request() {
    short_outage(Backend::MySql).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_outage_is_a_503_and_the_server_recovers() {
    database_outage(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_outage_is_a_503_and_the_server_recovers() {
    database_outage(Backend::MySql).await;
}
