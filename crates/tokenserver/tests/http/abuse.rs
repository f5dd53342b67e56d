//! Abuse resistance on the token path: the new-user allocation limit under a flood of distinct
//! new identities, and load shedding when the database work in flight reaches its bound.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};

use crate::common::*;

const RATE: f64 = 20.0;
const BURST: u64 = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_new_identities_take_no_more_than_the_allocation_rate() {
    let rate = RATE.to_string();
    let burst = BURST.to_string();
    let s = TestServer::start(&[("TOKENSERVER_NEW_USER_RATE", &rate), ("TOKENSERVER_NEW_USER_BURST", &burst)]).await;
    let node = s.add_node(NODE, 100_000, 100_000).await;
    assert_eq!(s.token(&Jwt::new("existing", Some(1)).sign(), "1-qqo").await.status, 200);
    let existing = Jwt::new("existing", Some(1)).sign();

    // Signed up front (RSA signing is the slow part), on every core.
    let mut signers = Vec::new();
    for part in 0..4 {
        signers.push(tokio::task::spawn_blocking(move || {
            (part * 2500..(part + 1) * 2500).map(|i| Jwt::new(&format!("flood{i}"), Some(1)).sign()).collect::<Vec<_>>()
        }));
    }
    let mut tokens = Vec::new();
    for s in signers {
        tokens.extend(s.await.unwrap());
    }

    let s = Arc::new(s);
    let started = Instant::now();
    // 64 at a time; every 100th request is the existing user's, who must keep getting tokens.
    let results: Vec<Response> = stream::iter(tokens.iter().enumerate())
        .map(|(i, jwt)| {
            let s = s.clone();
            let existing = existing.clone();
            async move {
                if i % 100 == 0 {
                    assert_eq!(s.token(&existing, "1-qqo").await.status, 200, "existing user refused");
                }
                s.token(jwt, "1-qqo").await
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let elapsed = started.elapsed().as_secs_f64();

    let admitted = results.iter().filter(|r| r.status == 200).count() as u64;
    let refused: Vec<&Response> = results.iter().filter(|r| r.status == 503).collect();
    assert_eq!(admitted + refused.len() as u64, 10_000, "only 200s and 503s");
    // The bucket: its burst, then the rate over the flood's duration (one more for the edge).
    let allowed = BURST + (RATE * elapsed).ceil() as u64 + 1;
    assert!(admitted >= BURST && admitted <= allowed, "{admitted} admitted, at most {allowed} in {elapsed:.1}s");
    for r in &refused {
        assert_eq!(r.body, error_body("internal-error", "internal", "", "Server error"));
        let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert_eq!(retry, 1, "at 20/s a token comes back within a second");
        assert_eq!(r.headers["x-backoff"], r.headers["retry-after"]);
    }
    // What the store holds: one row per admitted user (and the existing one), the node's load alike.
    assert_eq!(s.count_users().await as u64, admitted + 1);
    assert_eq!(s.node_load(node).await.1 as u64, admitted + 1);
    assert_eq!(s.user_rows("existing").await.len(), 1);
    Arc::into_inner(s).unwrap().finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_past_the_in_flight_bound_are_shed_at_once() {
    let s = Arc::new(TestServer::start(&[("TOKENSERVER_DATABASE_MAX_IN_FLIGHT", "1")]).await);
    s.add_node(NODE, 100, 100).await;
    let old = Jwt::new("old", Some(1)).sign();
    assert_eq!(s.token(&old, "1-qqo").await.status, 200);
    let blocker = s.block_allocations().await;
    // A new user's allocation waits on the database lock, holding the one slot.
    let stuck = {
        let s = s.clone();
        tokio::spawn(async move { s.token(&Jwt::new("stuck", Some(1)).sign(), "1-qqo").await })
    };
    // The existing user's (lock-free) read is served until the stuck request holds the slot.
    let mut shed = None;
    for _ in 0..200 {
        let r = s.token(&old, "1-qqo").await;
        if r.status == 503 {
            shed = Some(r);
            break;
        }
        assert_eq!(r.status, 200, "{}", r.body);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let shed = shed.expect("a request past the bound is shed");
    assert_eq!(shed.body, error_body("internal-error", "internal", "", "Server error"));
    assert_eq!(
        (&shed.headers["retry-after"], &shed.headers["x-backoff"]),
        (&"10".parse().unwrap(), &"10".parse().unwrap())
    );
    blocker.release().await;
    assert_eq!(stuck.await.unwrap().status, 200, "the waiting request completes");
    assert_eq!(s.token(&old, "1-qqo").await.status, 200);
    let metrics = s.admin.get(format!("{}/metrics", s.internal)).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.lines().any(|l| l.starts_with("tokenserver_requests_shed_total") && !l.ends_with(" 0")),
        "{metrics}"
    );
    Arc::into_inner(s).unwrap().finish().await;
}
