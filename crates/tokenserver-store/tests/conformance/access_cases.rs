//! `AccessStore` cases: creation, uniqueness per service, expiry, listing by cursor, revocation,
//! purge, concurrent and cancelled creates — the same on every backend.

use std::collections::{BTreeSet, HashMap};

use futures::future::join_all;
use tokenserver_core::access::generate_token;
use tokenserver_core::clock::now_ms;
use tokenserver_store::access::{AccessStore, Listing, NewToken};
use tokenserver_store::StoreError;

const MIN: u64 = 60_000;

fn new<'a>(
    service: &'a str,
    token: &'a str,
    app: &'a str,
    user: Option<&'a str>,
    expires: Option<u64>,
    now: u64,
) -> NewToken<'a> {
    NewToken { service, token, app_id: app, user_id: user, expires_at: expires, now }
}

/// Every token of a listing, page by page of `limit`; fails on a duplicate.
async fn all_pages(
    s: &dyn AccessStore,
    service: &str,
    app: &str,
    user: Option<&str>,
    limit: usize,
    now: u64,
) -> Vec<String> {
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..10_000 {
        let page = s
            .list(&Listing { service, app_id: app, user_id: user, after: after.as_deref(), limit, now })
            .await
            .unwrap();
        assert!(page.tokens.len() <= limit, "{} > {limit}", page.tokens.len());
        for t in &page.tokens {
            assert_eq!(t.grant.app_id, app);
            if let Some(u) = user {
                assert_eq!(t.grant.user_id.as_deref(), Some(u));
            }
            seen.push(t.token.clone());
        }
        after = page.next;
        if after.is_none() {
            break;
        }
    }
    let unique: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no duplicates");
    seen.sort();
    seen
}

pub async fn create_get_delete(s: &dyn AccessStore) {
    let now = now_ms();
    s.create(&new("svc1", "VALID-TOKEN", "app1", None, None, now)).await.unwrap();
    let got = s.get("svc1", "VALID-TOKEN", now).await.unwrap().unwrap();
    assert_eq!(
        (got.token.as_str(), got.grant.app_id.as_str(), got.grant.user_id, got.grant.expires_at),
        ("VALID-TOKEN", "app1", None, None)
    );
    assert_eq!(got.created_at, now);
    // Unique per service: the same token for another app is refused, in another service it is
    // another token.
    let dup = s.create(&new("svc1", "VALID-TOKEN", "app2", None, None, now)).await;
    assert!(matches!(dup, Err(StoreError::AlreadyExists(_))), "{dup:?}");
    s.create(&new("svc2", "VALID-TOKEN", "other", Some("u"), Some(now + MIN), now)).await.unwrap();
    let other = s.get("svc2", "VALID-TOKEN", now).await.unwrap().unwrap();
    assert_eq!(
        (other.grant.app_id.as_str(), other.grant.user_id.as_deref(), other.grant.expires_at),
        ("other", Some("u"), Some(now + MIN))
    );
    assert_eq!(s.get("svc1", "VALID-TOKEN", now).await.unwrap().unwrap().grant.app_id, "app1");
    assert!(s.get("svc1", "nope", now).await.unwrap().is_none());
    assert!(s.delete("svc1", "VALID-TOKEN", now).await.unwrap());
    assert!(s.get("svc1", "VALID-TOKEN", now).await.unwrap().is_none());
    assert!(!s.delete("svc1", "VALID-TOKEN", now).await.unwrap(), "deleted once");
    assert!(s.get("svc2", "VALID-TOKEN", now).await.unwrap().is_some(), "the other service's is untouched");
    s.check().await.unwrap();
}

pub async fn tokens_of_any_shape_round_trip(s: &dyn AccessStore) {
    let now = now_ms();
    let long = format!("{}β", "A".repeat(3582));
    // Generated tokens are keyed by their issue time, then hash: an early one and a late one.
    let (early, late) = (generate_token(1), generate_token(now));
    for (i, token) in [
        "foo bar",
        "_*-/9090",
        "?---$$$$",
        "6666",
        "hello.xml.xml",
        "va/lid/tok/en",
        "ü:{x}",
        long.as_str(),
        early.as_str(),
        late.as_str(),
    ]
    .into_iter()
    .enumerate()
    {
        let app = format!("app/{i}:{{x}}");
        s.create(&new("svc:{a}", token, &app, Some("u:1/ü"), None, now)).await.unwrap();
        let got = s.get("svc:{a}", token, now).await.unwrap().unwrap_or_else(|| panic!("{token}"));
        assert_eq!(
            (got.token.as_str(), got.grant.app_id.as_str(), got.grant.user_id.as_deref()),
            (token, app.as_str(), Some("u:1/ü"))
        );
        assert_eq!(all_pages(s, "svc:{a}", &app, None, 10, now).await, [token]);
        assert_eq!(all_pages(s, "svc:{a}", &app, Some("u:1/ü"), 10, now).await, [token]);
    }
}

pub async fn expired_tokens_are_invisible_at_once_and_can_be_created_again(s: &dyn AccessStore) {
    let now = now_ms();
    s.create(&new("svc", "short", "app1", None, Some(now + 100), now)).await.unwrap();
    assert!(s.get("svc", "short", now + 99).await.unwrap().is_some());
    assert!(s.get("svc", "short", now + 100).await.unwrap().is_none(), "expired at its expiry");
    assert!(all_pages(s, "svc", "app1", None, 10, now + 100).await.is_empty());
    assert!(!s.delete("svc", "short", now + 100).await.unwrap(), "an expired token is not there to delete");
    // A live one cannot be created over, an expired one can (even before its storage is reclaimed).
    let live = s.create(&new("svc", "short", "app2", None, None, now + 50)).await;
    assert!(matches!(live, Err(StoreError::AlreadyExists(_))), "{live:?}");
    s.create(&new("svc", "short", "app2", Some("u"), None, now + 200)).await.unwrap();
    let got = s.get("svc", "short", now + 300).await.unwrap().unwrap();
    assert_eq!(
        (got.grant.app_id.as_str(), got.grant.user_id.as_deref(), got.grant.expires_at),
        ("app2", Some("u"), None)
    );
    assert!(all_pages(s, "svc", "app1", None, 10, now + 300).await.is_empty(), "gone from its old application");
    assert_eq!(all_pages(s, "svc", "app2", Some("u"), 10, now + 300).await, ["short"]);
}

pub async fn listing_pages_cover_every_token_once(s: &dyn AccessStore) {
    let now = now_ms();
    let mut want_app = Vec::new();
    let mut want_user = Vec::new();
    for i in 0..120 {
        let token = format!("tok-{i:04}");
        let user = (i % 3 == 0).then_some("u1");
        s.create(&new("svc", &token, "app", user, Some(now + 10 * MIN), now)).await.unwrap();
        want_app.push(token.clone());
        if user.is_some() {
            want_user.push(token);
        }
    }
    // Generated tokens are keyed by issue time, not by their hash alone: a cursor made from one
    // must still resume right after it.
    for i in 0..10 {
        let token = generate_token(now - i * MIN);
        s.create(&new("svc", &token, "app", None, None, now)).await.unwrap();
        want_app.push(token);
    }
    for i in 0..10 {
        s.create(&new("svc", &format!("other-{i}"), "app-b", None, None, now)).await.unwrap();
        // Expired ones are listed nowhere.
        s.create(&new("svc", &format!("gone-{i}"), "app", None, Some(now + 1), now)).await.unwrap();
    }
    want_app.sort();
    want_user.sort();
    for limit in [1, 7, 100, 1000] {
        assert_eq!(all_pages(s, "svc", "app", None, limit, now + 2).await, want_app, "limit {limit}");
    }
    assert_eq!(all_pages(s, "svc", "app", Some("u1"), 7, now + 2).await, want_user);
    assert!(all_pages(s, "svc", "app", Some("nobody"), 7, now + 2).await.is_empty());
    assert_eq!(all_pages(s, "svc", "app-b", None, 3, now + 2).await.len(), 10);
    assert!(all_pages(s, "svc", "no-such-app", None, 3, now + 2).await.is_empty());
    let bad =
        s.list(&Listing { service: "svc", app_id: "app", user_id: None, after: Some("%%%"), limit: 5, now }).await;
    assert!(matches!(bad, Err(StoreError::InvalidInput(_))), "{bad:?}");
    // Tokens created and deleted during a listing: those present throughout are each seen once.
    let first = s
        .list(&Listing { service: "svc", app_id: "app", user_id: None, after: None, limit: 50, now: now + 2 })
        .await
        .unwrap();
    for t in first.tokens.iter().take(5) {
        assert!(s.delete("svc", &t.token, now + 2).await.unwrap());
    }
    s.create(&new("svc", "tok-late", "app", None, None, now + 2)).await.unwrap();
    let mut rest = Vec::new();
    let mut after = first.next.clone();
    while let Some(cursor) = after {
        let page = s
            .list(&Listing {
                service: "svc",
                app_id: "app",
                user_id: None,
                after: Some(&cursor),
                limit: 50,
                now: now + 2,
            })
            .await
            .unwrap();
        rest.extend(page.tokens.into_iter().map(|t| t.token));
        after = page.next;
    }
    let seen: BTreeSet<String> = first.tokens.iter().map(|t| t.token.clone()).chain(rest.iter().cloned()).collect();
    assert_eq!(seen.len(), first.tokens.len() + rest.len(), "no duplicates");
    assert!(want_app.iter().all(|t| seen.contains(t)), "no misses");
}

/// Tokens either side of 1,024 bytes (PostgreSQL lists the two kinds from two indexes) up to
/// apisonator's limit, with ids of the longest length accepted, in one listing: every page in one
/// order, each token once.
pub async fn long_and_short_tokens_share_one_listing(s: &dyn AccessStore) {
    let now = now_ms();
    let (service, app, user) = ("s".repeat(256), "a".repeat(256), "u".repeat(256));
    let mut want = Vec::new();
    let mut want_user = Vec::new();
    for len in [1, 56, 1023, 1024, 1025, 2000, 3584] {
        for (i, fill) in ["x", "y", "z"].into_iter().enumerate() {
            let token = format!("{i}{}", fill.repeat(len - 1));
            let owner = (i != 1).then_some(user.as_str());
            s.create(&new(&service, &token, &app, owner, None, now)).await.unwrap();
            if owner.is_some() {
                want_user.push(token.clone());
            }
            want.push(token);
        }
    }
    want.sort();
    want_user.sort();
    let one_page = s
        .list(&Listing { service: &service, app_id: &app, user_id: None, after: None, limit: 1000, now })
        .await
        .unwrap();
    assert!(one_page.next.is_none());
    let in_order: Vec<String> = one_page.tokens.into_iter().map(|t| t.token).collect();
    for limit in [1, 2, 5] {
        let mut paged = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = s
                .list(&Listing { service: &service, app_id: &app, user_id: None, after: after.as_deref(), limit, now })
                .await
                .unwrap();
            paged.extend(page.tokens.into_iter().map(|t| t.token));
            after = page.next;
            if after.is_none() {
                break;
            }
        }
        assert_eq!(paged, in_order, "limit {limit}: the pages in one order");
        assert_eq!(all_pages(s, &service, &app, None, limit, now).await, want, "limit {limit}");
    }
    assert_eq!(all_pages(s, &service, &app, Some(&user), 3, now).await, want_user);
}

pub async fn revocations_count_the_live_tokens_they_remove(s: &dyn AccessStore) {
    let now = now_ms();
    for i in 0..2_500 {
        let expires = if i % 100 == 0 { Some(now + 1) } else { None };
        s.create(&new("svc", &format!("a-{i}"), "app-a", Some("u"), expires, now)).await.unwrap();
    }
    for i in 0..10 {
        s.create(&new("svc", &format!("b-{i}"), "app-b", None, Some(now + MIN), now)).await.unwrap();
        s.create(&new("other", &format!("o-{i}"), "app-a", None, None, now)).await.unwrap();
    }
    // Read before they go (a store that caches reads must not answer from its cache after).
    assert!(s.get("svc", "a-1", now + 2).await.unwrap().is_some());
    assert!(s.get("svc", "b-1", now + 2).await.unwrap().is_some());
    // 2,500 tokens, 25 of them expired: removed in several bounded batches.
    assert_eq!(s.revoke_app("svc", "app-a", now + 2).await.unwrap(), 2_475);
    assert!(all_pages(s, "svc", "app-a", None, 100, now + 2).await.is_empty());
    assert!(all_pages(s, "svc", "app-a", Some("u"), 100, now + 2).await.is_empty());
    assert!(s.get("svc", "a-1", now + 2).await.unwrap().is_none());
    assert_eq!(all_pages(s, "svc", "app-b", None, 100, now + 2).await.len(), 10);
    assert_eq!(s.revoke_app("svc", "app-a", now + 2).await.unwrap(), 0, "nothing left");
    assert!(s.get("svc", "b-1", now + 2).await.unwrap().is_some());
    assert_eq!(s.revoke_service("svc", now + 2).await.unwrap(), 10);
    assert!(s.get("svc", "b-1", now + 2).await.unwrap().is_none());
    assert!(all_pages(s, "svc", "app-b", None, 100, now + 2).await.is_empty());
    assert_eq!(all_pages(s, "other", "app-a", None, 100, now + 2).await.len(), 10, "other services untouched");
}

pub async fn purge_reclaims_expired_tokens(s: &dyn AccessStore) {
    let now = now_ms();
    for i in 0..150 {
        s.create(&new("svc", &format!("p-{i}"), "app", (i % 2 == 0).then_some("u"), Some(now + 10), now))
            .await
            .unwrap();
    }
    s.create(&new("svc", "kept", "app", None, None, now)).await.unwrap();
    s.create(&new("svc", "later", "app", None, Some(now + MIN), now)).await.unwrap();
    assert_eq!(s.purge(now + 20).await.unwrap(), 150);
    assert_eq!(s.purge(now + 20).await.unwrap(), 0, "nothing more is due");
    assert_eq!(all_pages(s, "svc", "app", None, 1000, now + 20).await, ["kept", "later"]);
    // A token purged can be created again, and is then there whole.
    s.create(&new("svc", "p-0", "app2", None, None, now + 30)).await.unwrap();
    assert_eq!(s.get("svc", "p-0", now + 30).await.unwrap().unwrap().grant.app_id, "app2");
}

pub async fn concurrent_creates_of_one_token_have_one_winner(s: &dyn AccessStore) {
    let now = now_ms();
    let apps: Vec<String> = (0..40).map(|i| format!("app-{i}")).collect();
    let outcomes =
        join_all(apps.iter().map(|app| async move { s.create(&new("svc", "contested", app, None, None, now)).await }))
            .await;
    let winners: Vec<usize> = outcomes.iter().enumerate().filter(|(_, o)| o.is_ok()).map(|(i, _)| i).collect();
    assert_eq!(winners.len(), 1, "{outcomes:?}");
    assert!(outcomes.iter().all(|o| matches!(o, Ok(()) | Err(StoreError::AlreadyExists(_)))), "{outcomes:?}");
    let got = s.get("svc", "contested", now).await.unwrap().unwrap();
    assert_eq!(got.grant.app_id, apps[winners[0]]);
    // Only the winner's application lists it.
    let listed: usize =
        join_all(apps.iter().map(|app| all_pages(s, "svc", app, None, 10, now))).await.iter().map(Vec::len).sum();
    assert_eq!(listed, 1);
    // An expired token re-created concurrently: one winner too.
    s.create(&new("svc", "again", "first", None, Some(now + 1), now)).await.unwrap();
    let outcomes =
        join_all(apps.iter().map(|app| async move { s.create(&new("svc", "again", app, None, None, now + 5)).await }))
            .await;
    assert_eq!(outcomes.iter().filter(|o| o.is_ok()).count(), 1, "{outcomes:?}");
}

/// Calls cut short at random points (futures dropped after 0–3 ms) change all or nothing: a
/// token is readable exactly when its application lists it, and the store takes the next write.
pub async fn cancelled_calls_change_all_or_nothing(s: &dyn AccessStore) {
    let now = now_ms();
    let cut = || std::time::Duration::from_micros(rand::random::<u64>() % 3000);
    let tokens: Vec<String> = (0..200).map(|i| format!("c-{i}")).collect();
    join_all(tokens.iter().enumerate().map(|(i, t)| async move {
        let app = format!("app-{}", i % 4);
        let _ = tokio::time::timeout(cut(), async {
            s.create(&new("svc", t, &app, Some("u"), Some(now + MIN), now)).await?;
            if i % 3 == 0 {
                s.delete("svc", t, now).await?;
            }
            Ok::<_, StoreError>(())
        })
        .await;
    }))
    .await;
    // A cancelled caller's write may still be landing on its detached task, so the check reads
    // the store until two snapshots in a row agree (each token changes at most twice), then
    // holds the invariant against that quiet state.
    let snapshot = || async {
        let mut listed: HashMap<String, usize> = HashMap::new();
        for app in 0..4 {
            for t in all_pages(s, "svc", &format!("app-{app}"), None, 50, now).await {
                *listed.entry(t).or_default() += 1;
            }
            for t in all_pages(s, "svc", &format!("app-{app}"), Some("u"), 50, now).await {
                *listed.entry(t).or_default() += 1;
            }
        }
        let mut state = Vec::with_capacity(tokens.len());
        for t in &tokens {
            let readable = s.get("svc", t, now).await.unwrap().is_some();
            state.push((t.clone(), readable, listed.get(t).copied().unwrap_or(0)));
        }
        state
    };
    let mut last = snapshot().await;
    for _ in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        let next = snapshot().await;
        if next == last {
            break;
        }
        last = next;
    }
    for (t, readable, times) in &last {
        assert_eq!(*times, if *readable { 2 } else { 0 }, "{t}: readable {readable}, listed {times}");
    }
    s.create(&new("svc", "after", "app-0", None, None, now)).await.unwrap();
    assert!(s.get("svc", "after", now).await.unwrap().is_some());
}
