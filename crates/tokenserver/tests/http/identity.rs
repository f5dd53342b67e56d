//! OAuth verification (A5/A6): local JWTs, JWKS caching, remote verify, the verified-token cache.

use crate::common::*;

#[tokio::test]
async fn bad_jwts_are_invalid_credentials() {
    let s = TestServer::start(&[]).await;
    s.add_node(NODE, 100, 100).await;
    let cases: Vec<(&str, Jwt<'_>)> = vec![
        ("signed by another key", Jwt { key: OTHER_KEY_PEM, ..Jwt::new("u1", Some(1)) }),
        ("expired", Jwt { exp: Some(now_s() as i64 - 120), ..Jwt::new("u1", Some(1)) }),
        ("wrong typ", Jwt { typ: Some("JWT"), ..Jwt::new("u1", Some(1)) }),
        ("no typ", Jwt { typ: None, ..Jwt::new("u1", Some(1)) }),
        ("bad scope", Jwt { scope: "bad_scope", ..Jwt::new("u1", Some(1)) }),
        (
            "unrelated scopes",
            Jwt { scope: "profile https://identity.mozilla.com/apps/other", ..Jwt::new("u1", Some(1)) },
        ),
        (
            "comma-joined scope",
            Jwt { scope: "profile,https://identity.mozilla.com/apps/oldsync", ..Jwt::new("u1", Some(1)) },
        ),
    ];
    for (what, jwt) in cases {
        let r = s.token(&jwt.sign(), "1-qqo").await;
        assert_eq!(r.status, 401, "{what}");
        assert_401(&r, INVALID_CREDENTIALS);
    }
    // No key fell back to remote verification for these.
    assert_eq!(s.fxa.verify_hits(), 0);
    // A signature with its first character changed is a bad signature too.
    let token = Jwt::new("u1", Some(1)).sign();
    let (signed, signature) = token.rsplit_once('.').unwrap();
    let first = if signature.starts_with('A') { "B" } else { "A" };
    let tampered = format!("{signed}.{first}{}", &signature[1..]);
    let r = s.token(&tampered, "1-qqo").await;
    assert_401(&r, INVALID_CREDENTIALS);
    assert_eq!(s.fxa.verify_hits(), 0);
    assert_eq!(s.count_users().await, 0);
}

#[tokio::test]
async fn good_jwts_by_fxa_rules() {
    let s = TestServer::start(&[]).await;
    s.add_node(NODE, 100, 100).await;
    let cases: Vec<Jwt<'_>> = vec![
        Jwt { scope: "profile https://identity.mozilla.com/apps/oldsync", ..Jwt::new("a", Some(1)) },
        Jwt { scope: "https://identity.mozilla.com/apps", ..Jwt::new("b", Some(1)) },
        // No exp: accepted, as FxA's own verifier does.
        Jwt { exp: None, ..Jwt::new("c", Some(1)) },
        // Within the 60 s leeway.
        Jwt { exp: Some(now_s() as i64 - 30), ..Jwt::new("d", Some(1)) },
        Jwt { typ: Some("application/at+jwt"), ..Jwt::new("e", Some(1)) },
        // No kid: every key is tried.
        Jwt { kid: None, ..Jwt::new("f", Some(1)) },
    ];
    for jwt in cases {
        let r = s.token(&jwt.sign(), "1-qqo").await;
        assert_eq!(r.status, 200, "{}: {}", jwt.sub, r.body);
    }
    assert_eq!(s.fxa.verify_hits(), 0);
}

#[tokio::test]
async fn jwks_is_fetched_once_and_refreshed_only_on_unknown_kid_with_a_rate_limit() {
    let s = TestServer::start(&[("TOKENSERVER_FXA_OAUTH_JWKS_REFRESH_INTERVAL", "3600")]).await;
    s.add_node(NODE, 100, 100).await;
    for i in 0..20 {
        let user = format!("user{i}");
        let r = s.token(&Jwt::new(&user, Some(1)).sign(), "1-qqo").await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert_eq!(s.fxa.jwks_hits(), 1, "the JWKS is fetched once, not per request");
    // Unknown kids within the refresh interval: no further fetch, whatever the volume.
    for _ in 0..10 {
        let r = s.token(&Jwt { kid: Some("rotated-key"), ..Jwt::new("u", Some(1)) }.sign(), "1-qqo").await;
        // The signature is still checked against every key held: it verifies.
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert_eq!(s.fxa.jwks_hits(), 1);

    // Without a rate limit, each unknown kid triggers exactly one refresh.
    let s = TestServer::start(&[("TOKENSERVER_FXA_OAUTH_JWKS_REFRESH_INTERVAL", "0")]).await;
    s.add_node(NODE, 100, 100).await;
    assert_eq!(s.token(&Jwt::new("warm", Some(1)).sign(), "1-qqo").await.status, 200);
    let before = s.fxa.jwks_hits();
    for i in 0..3 {
        // Distinct tokens: an identical one would be answered from the verified-token cache.
        let user = format!("u{i}");
        let r = s.token(&Jwt { kid: Some("rotated-key"), ..Jwt::new(&user, Some(1)) }.sign(), "1-qqo").await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert_eq!(s.fxa.jwks_hits(), before + 3);
    // Known kids never refresh.
    assert_eq!(s.token(&Jwt::new("warm", Some(1)).sign(), "1-qqo").await.status, 200);
    assert_eq!(s.fxa.jwks_hits(), before + 3);
}

#[tokio::test]
async fn configured_jwk_means_no_jwks_fetch() {
    let jwk: serde_json::Value = serde_json::from_str(TEST_JWK).unwrap();
    let n = jwk["n"].as_str().unwrap().to_string();
    let s = TestServer::start(&[
        ("SYNC_TOKENSERVER__FXA_OAUTH_PRIMARY_JWK__KTY", "RSA"),
        ("SYNC_TOKENSERVER__FXA_OAUTH_PRIMARY_JWK__ALG", "RS256"),
        ("SYNC_TOKENSERVER__FXA_OAUTH_PRIMARY_JWK__KID", ""),
        ("SYNC_TOKENSERVER__FXA_OAUTH_PRIMARY_JWK__USE", "sig"),
        ("SYNC_TOKENSERVER__FXA_OAUTH_PRIMARY_JWK__N", &n),
        ("SYNC_TOKENSERVER__FXA_OAUTH_PRIMARY_JWK__E", "AQAB"),
        ("SYNC_TOKENSERVER__FXA_OAUTH_PRIMARY_JWK__FXA_CREATED_AT", "0"),
    ])
    .await;
    s.add_node(NODE, 100, 100).await;
    let r = s.token(&Jwt { kid: None, ..Jwt::new("u1", Some(1)) }.sign(), "1-qqo").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = s.token(&Jwt { key: OTHER_KEY_PEM, ..Jwt::new("u1", Some(1)) }.sign(), "1-qqo").await;
    assert_401(&r, INVALID_CREDENTIALS);
    assert_eq!(s.fxa.jwks_hits(), 0);
}

#[tokio::test]
async fn non_jwt_tokens_go_to_remote_verify_and_are_cached() {
    let s = TestServer::start(&[]).await;
    s.add_node(NODE, 100, 100).await;
    let token = remote_token("remote-user", Some(1234), 200);
    for _ in 0..3 {
        let r = s.token(&token, "1234-qqo").await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert_eq!(s.fxa.verify_hits(), 1, "verified tokens are cached");
    let rows = s.user_rows("remote-user").await;
    assert_eq!((rows.len(), rows[0].generation), (1, 1234));

    // FxA says no: 401, and the refusal is remembered for a while (no call for a replay).
    let refused = remote_token("x", None, 401);
    for _ in 0..2 {
        assert_401(&s.token(&refused, "1-qqo").await, INVALID_CREDENTIALS);
    }
    assert_eq!(s.fxa.verify_hits(), 2);
    // A 2xx with an unexpected body: 401.
    let odd = serde_json::json!({"status": 200, "body": {"unexpected": true}}).to_string();
    assert_401(&s.token(&odd, "1-qqo").await, INVALID_CREDENTIALS);
    // A remote token without the sync scope: 401.
    let scope =
        serde_json::json!({"status": 200, "body": {"user": "x", "scope": ["profile"], "client_id": "c"}}).to_string();
    assert_401(&s.token(&scope, "1-qqo").await, INVALID_CREDENTIALS);
    // FxA failing (5xx): 503 with Retry-After, not a 401 that would log the user out.
    let broken = remote_token("x", None, 500);
    let r = s.token(&broken, "1-qqo").await;
    assert_error(&r, 503, "error", "body", "", "Resource is not available");
    assert_eq!(r.headers["retry-after"], "10");
}

#[tokio::test]
async fn slow_or_unreachable_fxa_is_a_503_not_a_hang() {
    let s = TestServer::start(&[("SYNC_TOKENSERVER__FXA_OAUTH_REQUEST_TIMEOUT", "0.3")]).await;
    s.add_node(NODE, 100, 100).await;
    let slow = serde_json::json!({"sleep_ms": 3000, "status": 200, "body": {}}).to_string();
    let r = s.token(&slow, "1-qqo").await;
    assert_error(&r, 503, "error", "body", "", "Resource is not available");
    assert_eq!(r.headers["retry-after"], "10");

    // Nothing listening at the FxA URL.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let s2 = TestServer::start(&[("SYNC_TOKENSERVER__FXA_OAUTH_SERVER_URL", &dead_url)]).await;
    s2.add_node(NODE, 100, 100).await;
    let r = s2.token(&remote_token("x", None, 200), "1-qqo").await;
    assert_error(&r, 503, "error", "body", "", "Resource is not available");
    // A JWT with no JWKS available falls back to remote verify: also 503.
    let r = s2.token(&Jwt::new("x", Some(1)).sign(), "1-qqo").await;
    assert_error(&r, 503, "error", "body", "", "Resource is not available");
    assert_eq!(s2.count_users().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn remote_verifications_are_bounded_and_the_rest_get_a_503() {
    let s = std::sync::Arc::new(
        TestServer::start(&[
            ("SYNC_TOKENSERVER__FXA_OAUTH_VERIFY_CONCURRENCY", "2"),
            ("SYNC_TOKENSERVER__FXA_OAUTH_REFUSAL_CACHE_TTL", "0"),
        ])
        .await,
    );
    s.add_node(NODE, 100, 100).await;
    // Twelve distinct opaque tokens that FxA takes a while to answer.
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let s = s.clone();
            let token = serde_json::json!({"sleep_ms": 2000, "status": 200, "n": i,
                "body": {"user": format!("u{i}"), "scope": [SYNC_SCOPE], "client_id": "c"}})
            .to_string();
            tokio::spawn(async move { s.token(&token, "1-qqo").await })
        })
        .collect();
    let (mut ok, mut busy) = (0, 0);
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            200 => ok += 1,
            503 => {
                assert_error(&r, 503, "error", "body", "", "Resource is not available");
                assert_eq!(
                    (&r.headers["retry-after"], &r.headers["x-backoff"]),
                    (&"10".parse().unwrap(), &"10".parse().unwrap())
                );
                busy += 1;
            }
            other => panic!("{other}: {}", r.body),
        }
    }
    assert_eq!((ok, busy), (2, 10));
    assert_eq!(s.fxa.verify_hits(), 2, "no more than the bound reached FxA");
    // With the refusal cache off, a refused token is asked about every time.
    let refused = remote_token("x", None, 401);
    for _ in 0..2 {
        assert_401(&s.token(&refused, "1-qqo").await, INVALID_CREDENTIALS);
    }
    assert_eq!(s.fxa.verify_hits(), 4);
}
