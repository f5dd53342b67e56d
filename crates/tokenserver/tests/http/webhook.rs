//! `POST /1.0/webhooks/fxa/events` with security event tokens signed by the test key.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::Method;
use serde_json::{json, Value};

use crate::common::*;

const CLIENT_ID: &str = "test-client";
const ISSUER: &str = "https://accounts.firefox.com/";
const DELETE: &str = "https://schemas.accounts.firefox.com/event/delete-user";
const PASSWORD: &str = "https://schemas.accounts.firefox.com/event/password-change";

fn set(sub: &str, events: Value, aud: &str, key: &[u8]) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.typ = Some("secevent+jwt".into());
    header.kid = Some("test-rsa".into());
    let claims = json!({"sub": sub, "iss": ISSUER, "aud": aud, "iat": now_s(), "events": events});
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_rsa_pem(key).unwrap()).unwrap()
}

async fn post(s: &TestServer, token: Option<&str>) -> Response {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &[u8])> = auth.iter().map(|a| ("authorization", a.as_bytes())).collect();
    s.request(Method::POST, "/1.0/webhooks/fxa/events", &headers).await
}

async fn server(extra: &[(&str, &str)]) -> TestServer {
    let mut env = vec![
        ("SYNC_TOKENSERVER__FXA_WEBHOOK_ENABLED", "true"),
        ("SYNC_TOKENSERVER__FXA_WEBHOOK_SET_CLIENT_ID", CLIENT_ID),
        ("SYNC_TOKENSERVER__FXA_WEBHOOK_SET_ISSUER", ISSUER),
    ];
    env.extend_from_slice(extra);
    let s = TestServer::start(&env).await;
    s.add_node(NODE, 100, 100).await;
    s
}

#[tokio::test]
async fn delete_user_retires_the_account() {
    let s = server(&[]).await;
    assert_eq!(s.token(&Jwt::new("u1", Some(10)).sign(), "10-qqo").await.status, 200);
    let r = post(&s, Some(&set("u1", json!({ DELETE: {} }), CLIENT_ID, TEST_KEY_PEM))).await;
    assert_eq!((r.status, r.body.as_str()), (200, ""));
    let rows = s.user_rows("u1").await;
    assert_eq!(rows[0].generation, i64::MAX);
    assert!(rows[0].replaced_at.is_some());
    let r = s.token(&Jwt::new("u1", Some(10)).sign(), "10-qqo").await;
    assert_error(&r, 401, "invalid-generation", "body", "", "Unauthorized");
}

#[tokio::test]
async fn password_change_raises_the_generation_to_change_time_minus_one() {
    let s = server(&[]).await;
    assert_eq!(s.token(&Jwt::new("u1", Some(10)).sign(), "10-qqo").await.status, 200);
    let r = post(&s, Some(&set("u1", json!({ PASSWORD: {"changeTime": 5000} }), CLIENT_ID, TEST_KEY_PEM))).await;
    assert_eq!(r.status, 200);
    assert_eq!(s.user_rows("u1").await[0].generation, 4999);
    // Never lowered.
    post(&s, Some(&set("u1", json!({ PASSWORD: {"changeTime": 100} }), CLIENT_ID, TEST_KEY_PEM))).await;
    assert_eq!(s.user_rows("u1").await[0].generation, 4999);
    // No changeTime: nothing. Unknown events: ignored.
    post(&s, Some(&set("u1", json!({ PASSWORD: {}, "https://example.com/other": {} }), CLIENT_ID, TEST_KEY_PEM))).await;
    assert_eq!(s.user_rows("u1").await[0].generation, 4999);
    // The client with the new generation and new keys passes V4.
    let r = s.token(&Jwt::new("u1", Some(5000)).sign(), &key_id(5000, "bbbb")).await;
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test]
async fn bad_sets_are_refused() {
    let s = server(&[]).await;
    assert_eq!(s.token(&Jwt::new("u1", Some(10)).sign(), "10-qqo").await.status, 200);
    assert_401(&post(&s, None).await, UNAUTHORIZED);
    let events = json!({ DELETE: {} });
    assert_401(&post(&s, Some(&set("u1", events.clone(), CLIENT_ID, OTHER_KEY_PEM))).await, INVALID_CREDENTIALS);
    assert_401(&post(&s, Some(&set("u1", events.clone(), "someone-else", TEST_KEY_PEM))).await, INVALID_CREDENTIALS);
    assert_401(&post(&s, Some("not.a.jwt")).await, INVALID_CREDENTIALS);
    // Events that are not an object: 200, nothing done.
    let r = post(&s, Some(&set("u1", json!(["x"]), CLIENT_ID, TEST_KEY_PEM))).await;
    assert_eq!(r.status, 200);
    assert_eq!(s.user_rows("u1").await[0].generation, 10);
}

#[tokio::test]
async fn metrics_only_and_disabled() {
    let s = server(&[("SYNC_TOKENSERVER__FXA_WEBHOOK_METRICS_ONLY", "1")]).await;
    assert_eq!(s.token(&Jwt::new("u1", Some(10)).sign(), "10-qqo").await.status, 200);
    let r = post(&s, Some(&set("u1", json!({ DELETE: {} }), CLIENT_ID, TEST_KEY_PEM))).await;
    assert_eq!(r.status, 200);
    assert_eq!(s.user_rows("u1").await[0].generation, 10);

    let off = TestServer::start(&[]).await;
    let r = post(&off, Some(&set("u1", json!({ DELETE: {} }), CLIENT_ID, TEST_KEY_PEM))).await;
    assert_eq!((r.status, r.body.as_str()), (404, ""));
}

#[tokio::test]
async fn unconfigured_verification_refuses_everything() {
    let s = TestServer::start(&[("SYNC_TOKENSERVER__FXA_WEBHOOK_ENABLED", "true")]).await;
    let r = post(&s, Some(&set("u1", json!({ DELETE: {} }), CLIENT_ID, TEST_KEY_PEM))).await;
    assert_401(&r, INVALID_CREDENTIALS);
}
