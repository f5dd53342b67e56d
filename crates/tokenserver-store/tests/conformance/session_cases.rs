//! `SessionStore` cases: creation, rotation, metadata, grace window, reuse detection, expiry,
//! ending sessions, dumps, purge and concurrent rotations — the same on every backend.

use futures::future::join_all;
use serde_json::json;
use tokenserver_core::clock::now_ms;
use tokenserver_core::session::RotateOutcome;
use tokenserver_core::session::{
    Invalid, MetaError, MetaLimits, MetaUpdate, RotateRequest, RotationPolicy, SessionRecord, SessionToken,
};
use tokenserver_store::session::SessionStore;

const MIN: u64 = 60_000;

fn policy() -> RotationPolicy {
    RotationPolicy { grace_ms: 2_000, reuse_detection: true, limits: MetaLimits::default() }
}

async fn create(s: &dyn SessionStore, meta: &str, now: u64) -> SessionToken {
    let token = SessionToken::new_session();
    s.create(&token, &SessionRecord::new(meta.into(), now, 10 * MIN, 60 * MIN)).await.unwrap();
    token
}

/// A token of the first format (32 bytes, 43 characters), as issued before the current one.
pub fn first_format_token() -> SessionToken {
    use base64::Engine;
    let bytes: [u8; 32] = rand::random();
    let text = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    assert_eq!(text.len(), 43);
    SessionToken::parse(&text).unwrap()
}

fn req(t: &SessionToken, now: u64, update: Option<MetaUpdate>) -> RotateRequest {
    RotateRequest { presented: t.clone(), successor: t.successor(), update, now }
}

async fn rotate(s: &dyn SessionStore, t: &SessionToken, now: u64) -> RotateOutcome {
    s.rotate(&req(t, now, None), &policy()).await.unwrap()
}

fn rotated(outcome: RotateOutcome) -> (SessionToken, SessionRecord) {
    match outcome {
        RotateOutcome::Rotated { token, record } => (token, record),
        other => panic!("expected a rotation, got {other:?}"),
    }
}

pub async fn rotation_chain_carries_metadata_and_consumes_each_token(s: &dyn SessionStore) {
    let now = now_ms();
    let first = create(s, r#"{"user":"u1"}"#, now).await;
    let mut current = first.clone();
    let mut seen = vec![first.clone()];
    for i in 1..=5u64 {
        let (next, record) = rotated(rotate(s, &current, now + i * 10_000).await);
        assert_eq!(next.chain(), first.chain());
        assert!(!seen.contains(&next));
        assert_eq!(record.meta, r#"{"user":"u1"}"#);
        assert_eq!(record.expires_at, now + i * 10_000 + 10 * MIN, "idle expiry renewed");
        assert_eq!(record.deadline, now + 60 * MIN, "deadline kept");
        seen.push(next.clone());
        current = next;
    }
    // The head is live; every earlier token is spent.
    let (mut current, record) = rotated(rotate(s, &current, now + 60_000).await);
    assert_eq!(record.meta, r#"{"user":"u1"}"#);
    // Near the deadline the idle expiry is renewed only up to it, exactly.
    for at in [9, 18, 27, 36, 45, 54, 59] {
        let (next, record) = rotated(rotate(s, &current, now + at * MIN).await);
        assert_eq!(record.expires_at, (now + at * MIN + 10 * MIN).min(now + 60 * MIN), "at {at} min");
        assert_eq!(record.deadline, now + 60 * MIN);
        assert_eq!(record.meta, r#"{"user":"u1"}"#);
        current = next;
    }
    assert_eq!(
        rotate(s, &current, now + 60 * MIN).await,
        RotateOutcome::Refused(Invalid::Expired),
        "past the deadline"
    );
}

pub async fn unknown_and_expired_tokens_are_refused(s: &dyn SessionStore) {
    let now = now_ms();
    assert_eq!(rotate(s, &SessionToken::new_session(), now).await, RotateOutcome::Refused(Invalid::Unknown));
    let t = create(s, "{}", now).await;
    assert_eq!(rotate(s, &t, now + 10 * MIN).await, RotateOutcome::Refused(Invalid::Expired));
    // Maximum age ends the session whatever the idle lifetime says.
    let capped = SessionToken::new_session();
    s.create(&capped, &SessionRecord::new("{}".into(), now, 10 * MIN, 5 * MIN)).await.unwrap();
    let (next, record) = rotated(rotate(s, &capped, now + 4 * MIN).await);
    assert_eq!(record.expires_at, now + 5 * MIN);
    assert_eq!(rotate(s, &next, now + 5 * MIN).await, RotateOutcome::Refused(Invalid::Expired));
}

pub async fn metadata_is_merged_and_bounded(s: &dyn SessionStore) {
    let now = now_ms();
    let t = create(s, r#"{"a":{"x":1},"b":2}"#, now).await;
    let shallow = MetaUpdate::Shallow(json!({"a": {"y": 2}, "c": null}).as_object().cloned().unwrap());
    let (t, record) = rotated(s.rotate(&req(&t, now + 1, Some(shallow)), &policy()).await.unwrap());
    assert_eq!(record.meta, r#"{"a":{"y":2},"b":2,"c":null}"#);
    let patch = MetaUpdate::MergePatch(json!({"a": {"z": 3}, "b": null, "c": null}));
    let (t, record) = rotated(s.rotate(&req(&t, now + 2, Some(patch)), &policy()).await.unwrap());
    assert_eq!(record.meta, r#"{"a":{"y":2,"z":3}}"#);
    // A patch breaking a limit changes nothing: the token stays live with its metadata.
    let tight = RotationPolicy { limits: MetaLimits { max_bytes: 24, ..MetaLimits::default() }, ..policy() };
    let big = MetaUpdate::MergePatch(json!({"long": "0123456789"}));
    assert_eq!(
        s.rotate(&req(&t, now + 3, Some(big)), &tight).await.unwrap(),
        RotateOutcome::Rejected(MetaError::TooLarge { size: 39, limit: 24 })
    );
    let (_, record) = rotated(rotate(s, &t, now + 4).await);
    assert_eq!(record.meta, r#"{"a":{"y":2,"z":3}}"#);
}

pub async fn retry_inside_the_grace_window_gets_the_same_successor(s: &dyn SessionStore) {
    let now = now_ms();
    let t1 = create(s, r#"{"k":1}"#, now).await;
    let (t2, first) = rotated(rotate(s, &t1, now).await);
    for dt in [0, 1_000, 1_999] {
        // A retry carries its update again; it is not applied twice.
        let retry = req(&t1, now + dt, Some(MetaUpdate::MergePatch(json!({"k": 2}))));
        assert_eq!(
            s.rotate(&retry, &policy()).await.unwrap(),
            RotateOutcome::Replayed { token: t2.clone(), record: first.clone() }
        );
    }
    // The successor is still the live head.
    let (t3, _) = rotated(rotate(s, &t2, now + 1_500).await);
    // T1 again: its successor T2 is spent now, so there is nothing to replay (and no revocation
    // inside the window): T3 lives on.
    assert_eq!(rotate(s, &t1, now + 1_600).await, RotateOutcome::Refused(Invalid::SuccessorGone));
    rotated(rotate(s, &t3, now + 1_700).await);
}

pub async fn reuse_after_the_grace_window_revokes_the_chain(s: &dyn SessionStore) {
    let now = now_ms();
    let t1 = create(s, "{}", now).await;
    let (t2, _) = rotated(rotate(s, &t1, now).await);
    let (t3, _) = rotated(rotate(s, &t2, now + 10_000).await);
    let other = create(s, "{}", now).await;
    // An attacker replays T1 long after: the session is revoked.
    assert_eq!(rotate(s, &t1, now + 20_000).await, RotateOutcome::Revoked);
    assert_eq!(rotate(s, &t3, now + 20_001).await, RotateOutcome::Refused(Invalid::Unknown));
    assert_eq!(rotate(s, &t2, now + 20_002).await, RotateOutcome::Refused(Invalid::Unknown));
    // Other sessions are untouched.
    rotated(rotate(s, &other, now + 20_003).await);
    // Without reuse detection the old token is only refused.
    let lenient = RotationPolicy { reuse_detection: false, ..policy() };
    let u1 = create(s, "{}", now).await;
    let (u2, _) = rotated(rotate(s, &u1, now).await);
    assert_eq!(
        s.rotate(&req(&u1, now + 10_000, None), &lenient).await.unwrap(),
        RotateOutcome::Refused(Invalid::Unknown)
    );
    rotated(rotate(s, &u2, now + 10_001).await);
}

/// A session stored before the token format changed: its first-format token rotates into a
/// current-format successor, retries replay it, and reuse revokes the session.
pub async fn first_format_tokens_keep_working(s: &dyn SessionStore) {
    let now = now_ms();
    let t1 = first_format_token();
    s.create(&t1, &SessionRecord::new(r#"{"k":1}"#.into(), now, 10 * MIN, 60 * MIN)).await.unwrap();
    let (t2, record) = rotated(rotate(s, &t1, now).await);
    assert_eq!(t2.encode().len(), 48);
    assert_eq!(t2.chain(), t1.chain());
    assert_eq!(record.meta, r#"{"k":1}"#);
    assert_eq!(rotate(s, &t1, now + 1_000).await, RotateOutcome::Replayed { token: t2.clone(), record });
    assert_eq!(rotate(s, &t1, now + 10_000).await, RotateOutcome::Revoked);
    assert_eq!(rotate(s, &t2, now + 10_001).await, RotateOutcome::Refused(Invalid::Unknown));
    // Ending works through a first-format token too.
    let u = first_format_token();
    s.create(&u, &SessionRecord::new("{}".into(), now, 10 * MIN, 60 * MIN)).await.unwrap();
    assert!(s.end(&u, now + 1).await.unwrap());
    assert_eq!(rotate(s, &u, now + 2).await, RotateOutcome::Refused(Invalid::Unknown));
}

pub async fn ending_a_session_revokes_it(s: &dyn SessionStore) {
    let now = now_ms();
    let t = create(s, "{}", now).await;
    assert!(s.end(&t, now + 1).await.unwrap());
    assert_eq!(rotate(s, &t, now + 2).await, RotateOutcome::Refused(Invalid::Unknown));
    assert!(!s.end(&t, now + 3).await.unwrap(), "already ended");
    assert!(!s.end(&SessionToken::new_session(), now).await.unwrap());
    // Ending through a spent token of the session ends the live one too.
    let u1 = create(s, "{}", now).await;
    let (u2, _) = rotated(rotate(s, &u1, now).await);
    assert!(s.end(&u1, now + 5).await.unwrap());
    assert_eq!(rotate(s, &u2, now + 6).await, RotateOutcome::Refused(Invalid::Unknown));
    // An expired token ends nothing.
    let v = create(s, "{}", now).await;
    assert!(!s.end(&v, now + 10 * MIN).await.unwrap());
}

pub async fn dump_lists_live_sessions_without_tokens(s: &dyn SessionStore) {
    let now = now_ms();
    let a = create(s, r#"{"who":"dump-a"}"#, now).await;
    let _b = create(s, r#"{"who":"dump-b"}"#, now).await;
    rotated(rotate(s, &a, now).await);
    let entries = s.dump(now + 1, None, 1000).await.unwrap().entries;
    let mut metas: Vec<&str> = entries.iter().map(|e| e.meta.as_str()).filter(|m| m.contains("dump-")).collect();
    metas.sort();
    // A's first token is spent (not listed); its successor carries the metadata.
    assert_eq!(metas, [r#"{"who":"dump-a"}"#, r#"{"who":"dump-b"}"#]);
    let limited = s.dump(now + 1, None, 1).await.unwrap().entries;
    assert_eq!(limited.len(), 1);
    let later = s.dump(now + 10 * MIN + 1, None, 1000).await.unwrap().entries;
    assert!(!later.iter().any(|e| e.meta.contains("dump-")), "expired sessions are not listed");
}

/// A dump read page by page lists every live session once (on Redis at least once: `SCAN` may
/// return a key twice when the key space shrank meanwhile, as the other tests' deletions on the
/// same Redis can make it), in pages no larger than asked, and a cursor the store did not make is
/// refused.
pub async fn dump_pages_cover_every_session_once(s: &dyn SessionStore) {
    let now = now_ms();
    let mut want: Vec<String> = Vec::new();
    for i in 0..25 {
        let meta = format!(r#"{{"page":{i}}}"#);
        create(s, &meta, now).await;
        want.push(meta);
    }
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..100 {
        let page = s.dump(now + 1, after.as_deref(), 7).await.unwrap();
        assert!(page.entries.len() <= 7, "{}", page.entries.len());
        seen.extend(page.entries.into_iter().map(|e| e.meta).filter(|m| m.contains("page")));
        after = page.next;
        if after.is_none() {
            break;
        }
    }
    assert!(after.is_none(), "the dump ended");
    seen.sort();
    if s.backend().starts_with("redis") {
        seen.dedup();
    }
    want.sort();
    assert_eq!(seen, want);
    assert!(matches!(s.dump(now, Some("not-a-cursor"), 7).await, Err(tokenserver_store::StoreError::InvalidInput(_))));
}

pub async fn purge_removes_expired_records(s: &dyn SessionStore) {
    let now = now_ms();
    let t = create(s, "{}", now).await;
    let before = s.dump(now, None, 10).await.unwrap().records;
    let purged = s.purge(now + 10 * MIN + 2 * MIN).await.unwrap();
    if s.backend().starts_with("redis") {
        assert_eq!(purged, 0, "Redis expires keys itself");
    } else {
        assert_eq!(purged, 1);
        assert_eq!(rotate(s, &t, now + 1).await, RotateOutcome::Refused(Invalid::Unknown));
        let after = s.dump(now, None, 10).await.unwrap().records;
        if let (Some(b), Some(a)) = (before, after) {
            if s.backend() != "postgres" {
                assert_eq!(a + 1, b);
            }
        }
    }
    s.check().await.unwrap();
}

pub async fn concurrent_rotations_issue_one_successor(s: &dyn SessionStore) {
    let now = now_ms();
    // Grace window: every concurrent request gets the same successor.
    let t = create(s, "{}", now).await;
    let p = policy();
    let outs = join_all((0..40).map(|_| {
        let r = RotateRequest { presented: t.clone(), successor: t.successor(), update: None, now };
        async move { s.rotate(&r, &p).await.unwrap() }
    }))
    .await;
    let mut tokens = Vec::new();
    let mut rotations = 0;
    for o in outs {
        match o {
            RotateOutcome::Rotated { token, .. } => {
                rotations += 1;
                tokens.push(token);
            }
            RotateOutcome::Replayed { token, .. } => tokens.push(token),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(rotations, 1);
    assert!(tokens.iter().all(|x| *x == tokens[0]));
    rotated(rotate(s, &tokens[0], now + 1).await);

    // No grace window: exactly one succeeds; the others are reuse and revoke the session.
    let strict = RotationPolicy { grace_ms: 0, ..policy() };
    let u = create(s, "{}", now).await;
    let outs = join_all((0..40).map(|_| {
        let r = RotateRequest { presented: u.clone(), successor: u.successor(), update: None, now };
        async move { s.rotate(&r, &strict).await.unwrap() }
    }))
    .await;
    let wins: Vec<_> = outs.iter().filter(|o| matches!(o, RotateOutcome::Rotated { .. })).collect();
    assert_eq!(wins.len(), 1, "{outs:?}");
    // Losers revoke the session, or find it already revoked (SQL stores delete the whole chain).
    assert!(outs.iter().all(|o| matches!(
        o,
        RotateOutcome::Rotated { .. } | RotateOutcome::Revoked | RotateOutcome::Refused(Invalid::Unknown)
    )));
    assert!(outs.iter().any(|o| matches!(o, RotateOutcome::Revoked)));
    let RotateOutcome::Rotated { token, .. } = wins[0] else { unreachable!() };
    assert_eq!(rotate(s, token, now + 1).await, RotateOutcome::Refused(Invalid::Unknown), "revoked by the reuse");

    // Many sessions rotated in parallel all succeed.
    let many: Vec<SessionToken> = join_all((0..100).map(|_| create(s, "{}", now))).await;
    let outs = join_all(many.iter().map(|t| rotate(s, t, now + 1))).await;
    assert!(outs.into_iter().all(|o| matches!(o, RotateOutcome::Rotated { .. })));
}

/// Calls cut short at random points (futures dropped after 0–3 ms) change all or nothing: a
/// cancelled rotation either happened (a retry is replayed) or did not (a retry rotates), a
/// cancelled end either ended the session or left it; and the store takes the next write.
pub async fn cancelled_calls_change_all_or_nothing(s: &dyn SessionStore) {
    let now = now_ms();
    let cut = || std::time::Duration::from_micros(rand::random::<u64>() % 3000);
    let tokens: Vec<SessionToken> = join_all((0..60).map(|_| create(s, r#"{"a":1}"#, now))).await;
    join_all(tokens.iter().enumerate().map(|(i, t)| async move {
        if i % 3 == 0 {
            let _ = tokio::time::timeout(cut(), s.end(t, now)).await;
        } else {
            let _ = tokio::time::timeout(cut(), s.rotate(&req(t, now, None), &policy())).await;
        }
    }))
    .await;
    for (i, t) in tokens.iter().enumerate() {
        let out = rotate(s, t, now + 1).await;
        if i % 3 == 0 {
            assert!(matches!(out, RotateOutcome::Rotated { .. } | RotateOutcome::Refused(Invalid::Unknown)), "{out:?}");
        } else {
            assert!(matches!(out, RotateOutcome::Rotated { .. } | RotateOutcome::Replayed { .. }), "{out:?}");
        }
    }
    // Cancelled creates: stored whole or not at all.
    let fresh: Vec<SessionToken> = (0..40).map(|_| SessionToken::new_session()).collect();
    join_all(fresh.iter().map(|t| async move {
        let record = SessionRecord::new(r#"{"b":2}"#.into(), now, 10 * MIN, 60 * MIN);
        let _ = tokio::time::timeout(cut(), s.create(t, &record)).await;
    }))
    .await;
    for t in &fresh {
        match rotate(s, t, now + 1).await {
            RotateOutcome::Rotated { record, .. } => assert_eq!(record.meta, r#"{"b":2}"#),
            other => assert_eq!(other, RotateOutcome::Refused(Invalid::Unknown)),
        }
    }
    rotated(rotate(s, &create(s, "{}", now).await, now + 1).await);
}
