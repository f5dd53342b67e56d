//! Hardening: clients that go away mid-request, on every backend.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokenserver_store::Backend;

use crate::common::*;

per_backend!(sql: cancelled_writes_never_wedge_the_store, heartbeat_fails_when_writes_cannot_get_the_database);

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
                            let _ = client
                                .post(format!("{}/v1/nodes", s.internal))
                                .bearer_auth(ADMIN_KEY)
                                .json(&body)
                                .send()
                                .await;
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
        .admin
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

/// Writes stuck behind a lock held elsewhere (SQLite: another process's write transaction;
/// PostgreSQL/MySQL: the one write connection waiting on node locks): reads still work, but the
/// heartbeat says the database cannot take writes, and recovers once they can.
async fn heartbeat_fails_when_writes_cannot_get_the_database(backend: Backend) {
    let extra = [
        ("SYNC_TOKENSERVER__DATABASE_REQUEST_TIMEOUT", "0.5"),
        ("SYNC_TOKENSERVER__DATABASE_POOL_MAX_SIZE", "1"),
        ("TOKENSERVER_SESSIONS__URL", "memory:"),
    ];
    let Some(s) = TestServer::start_on(backend, &extra).await else { return };
    let s = Arc::new(s);
    s.add_node(NODE, 100, 100).await;
    let hb = s.request(reqwest::Method::GET, "/__heartbeat__", &[]).await;
    assert_eq!((hb.status, hb.json()["database"].as_str()), (200, Some("Ok")), "{}", hb.body);
    let blocker = s.block_allocations().await;
    // A new user's allocation waits on the locks, holding the server's one write connection.
    let waiting = {
        let s = s.clone();
        tokio::spawn(async move { s.token(&Jwt::new("stuck", Some(1)).sign(), "1-qqo").await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let hb = s.request(reqwest::Method::GET, "/__heartbeat__", &[]).await;
    assert_eq!(hb.status, 503, "{}", hb.body);
    let v = hb.json();
    assert_eq!((v["status"].as_str(), v["database"].as_str()), (Some("Err"), Some("Err")), "{v}");
    assert_eq!(v["failed"], "database_write", "{v}");
    assert_eq!(hb.headers["retry-after"], "10");
    blocker.release().await;
    assert_eq!(waiting.await.unwrap().status, 504, "the stuck request timed out");
    let mut hb = s.request(reqwest::Method::GET, "/__heartbeat__", &[]).await;
    for _ in 0..20 {
        if hb.status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        hb = s.request(reqwest::Method::GET, "/__heartbeat__", &[]).await;
    }
    assert_eq!(hb.status, 200, "{}", hb.body);
    Arc::into_inner(s).unwrap().finish().await;
}

/// Reads from `stream` until the server closes it (`Ok(bytes)`), or gives up after `guard`.
async fn read_until_closed(stream: &mut tokio::net::TcpStream, guard: Duration) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(guard, read).await.ok()?;
    Some(out)
}

async fn connect(base: &str) -> tokio::net::TcpStream {
    tokio::net::TcpStream::connect(base.trim_start_matches("http://")).await.unwrap()
}

const HANG_GUARD: Duration = Duration::from_secs(20);

#[tokio::test]
async fn a_request_whose_headers_never_end_is_cut_off() {
    use tokio::io::AsyncWriteExt;
    let s = TestServer::start(&[("TOKENSERVER_LIMITS__HEADER_READ_TIMEOUT", "300ms")]).await;
    let mut slow = connect(&s.base).await;
    slow.write_all(b"GET /__lbheartbeat__ HTTP/1.1\r\nHost: x\r\nX-Slow: ").await.unwrap();
    let answer = read_until_closed(&mut slow, HANG_GUARD).await.expect("the server closed the connection");
    assert!(answer.is_empty() || String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 408"), "{answer:?}");
    // Others are served meanwhile and after.
    assert_eq!(s.request(reqwest::Method::GET, "/__lbheartbeat__", &[]).await.status, 200);
    s.finish().await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout_not_the_header_one() {
    use tokio::io::AsyncWriteExt;
    let s = TestServer::start(&[
        ("TOKENSERVER_LIMITS__HEADER_READ_TIMEOUT", "60s"),
        ("TOKENSERVER_LIMITS__IDLE_TIMEOUT", "1500ms"),
    ])
    .await;
    let mut conn = connect(&s.base).await;
    let request = b"GET /__lbheartbeat__ HTTP/1.1\r\nHost: x\r\n\r\n";
    conn.write_all(request).await.unwrap();
    let mut buf = [0u8; 1024];
    let n = tokio::io::AsyncReadExt::read(&mut conn, &mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // A short pause keeps the connection.
    tokio::time::sleep(Duration::from_millis(100)).await;
    conn.write_all(request).await.unwrap();
    let n = tokio::io::AsyncReadExt::read(&mut conn, &mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"), "reused");
    // Then idle: closed by the idle bound (the header bound alone would wait a minute).
    let rest = read_until_closed(&mut conn, HANG_GUARD).await.expect("closed while idle");
    assert!(rest.is_empty(), "{rest:?}");
    s.finish().await;
}

#[tokio::test]
async fn a_body_shorter_than_its_content_length_is_a_408() {
    use tokio::io::AsyncWriteExt;
    let s = TestServer::start(&[("TOKENSERVER_LIMITS__BODY_TIMEOUT", "300ms")]).await;
    let mut conn = connect(&s.internal).await;
    conn.write_all(
        b"POST /v1/nodes HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer test-admin-key\r\n\
          Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"node\":",
    )
    .await
    .unwrap();
    let answer = read_until_closed(&mut conn, HANG_GUARD).await.expect("answered and closed");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    s.finish().await;
}

#[tokio::test]
async fn a_flooded_public_listener_holds_its_cap_and_the_internal_one_keeps_serving() {
    use tokio::io::AsyncWriteExt;
    let s = TestServer::start(&[
        ("TOKENSERVER_LIMITS__PUBLIC_MAX_CONNECTIONS", "20"),
        ("TOKENSERVER_LIMITS__IDLE_TIMEOUT", "60s"),
        ("TOKENSERVER_LIMITS__HEADER_READ_TIMEOUT", "60s"),
    ])
    .await;
    let mut idle = Vec::new();
    // Past the cap, connections wait in the kernel's accept queue (which holds at least 128).
    for _ in 0..60 {
        idle.push(connect(&s.base).await);
    }
    // Past the cap, a request waits in the accept queue...
    let mut waiting = connect(&s.base).await;
    waiting.write_all(b"GET /__lbheartbeat__ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 256];
    let early =
        tokio::time::timeout(Duration::from_millis(300), tokio::io::AsyncReadExt::read(&mut waiting, &mut buf)).await;
    assert!(early.is_err(), "answered past the cap");
    // ...while the internal listener answers at once.
    let r = s.http.get(format!("{}/__lbheartbeat__", s.internal)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // Once the flood goes, the waiting request is served.
    drop(idle);
    let answer = read_until_closed(&mut waiting, HANG_GUARD).await.expect("served");
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    s.finish().await;
}
