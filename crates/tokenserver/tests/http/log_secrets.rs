//! Secrets never reach the logs, at any level: the real binary at `RUST_LOG=trace` (JSON lines)
//! serves tokens, sessions, access tokens, the admin API and a purge (Hawk-signed outbound
//! calls); afterwards no secret, key or bearer token it saw or made appears in what it logged.

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::Request;
use axum::http::StatusCode;
use axum::Router;
use serde_json::{json, Value};

use crate::common::*;

const MASTER: &str = "MASTERsecretVALUE-7f3a9c";
const ADMIN: &str = "ADMINkeyVALUE-b81e40";
const METRICS: &str = "METRICSsecretVALUE-22d1";
const SESSIONS_KEY: &str = "SESSIONSkeyVALUE-0c7e";
const ACCESS_KEY: &str = "ACCESSkeyVALUE-5a9f";
const ACCESS_TOKEN: &str = "ACCESStokenVALUE-3b8c1d";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_secret_or_bearer_token_is_ever_logged() {
    let dir = TempDir::new();
    let fxa = MockFxa::start().await;
    // A storage node that keeps the Authorization headers purge sends it.
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let node = format!("http://{}", listener.local_addr().unwrap());
    {
        let seen = seen.clone();
        let app = Router::new().fallback(move |req: Request| {
            let seen = seen.clone();
            async move {
                if let Some(v) = req.headers().get("authorization") {
                    seen.lock().unwrap().push(v.to_str().unwrap().to_string());
                }
                StatusCode::NO_CONTENT
            }
        });
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    }

    let (public, internal) = (free_port(), free_port());
    let log_path = dir.0.join("server.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tokenserver"))
        .arg("serve")
        .current_dir(&dir.0)
        .env("RUST_LOG", "trace")
        .env("TOKENSERVER_HOST", "127.0.0.1")
        .env("TOKENSERVER_PORT", public.to_string())
        .env("TOKENSERVER_INTERNAL__PORT", internal.to_string())
        .env("SYNC_MASTER_SECRET", MASTER)
        .env("TOKENSERVER_INTERNAL__ADMIN_KEY", ADMIN)
        .env("SYNC_TOKENSERVER__FXA_METRICS_HASH_SECRET", METRICS)
        .env("SYNC_TOKENSERVER__FXA_EMAIL_DOMAIN", DOMAIN)
        .env("SYNC_TOKENSERVER__FXA_OAUTH_SERVER_URL", &fxa.url)
        .env("TOKENSERVER_SESSIONS__API_KEY", SESSIONS_KEY)
        .env("TOKENSERVER_ACCESS__API_KEY", ACCESS_KEY)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let (base, admin_base) = (format!("http://127.0.0.1:{public}"), format!("http://127.0.0.1:{internal}"));
    let http = reqwest::Client::new();
    let mut up = false;
    for _ in 0..200 {
        if http.get(format!("{base}/__lbheartbeat__")).send().await.is_ok_and(|r| r.status() == 200) {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "server did not start");
    let mut secrets: Vec<String> =
        [MASTER, ADMIN, METRICS, SESSIONS_KEY, ACCESS_KEY, ACCESS_TOKEN].map(String::from).to_vec();

    let admin = |req: reqwest::RequestBuilder| req.bearer_auth(ADMIN).send();
    let r =
        admin(http.post(format!("{admin_base}/v1/nodes")).json(&json!({"node": node, "capacity": 10}))).await.unwrap();
    assert_eq!(r.status(), 201);
    // Sync tokens: two client states (a replaced row for purge), and a refused bearer token.
    for (generation, cs) in [(1, "aaaa"), (2, "bbbb")] {
        let jwt = Jwt::new("u1", Some(generation)).sign();
        let r = http.get(format!("{base}/1.0/sync/1.5")).bearer_auth(&jwt).header("x-keyid", key_id(generation, cs));
        let r = r.header("x-request-id", format!("log-test.rid_{generation}"));
        let v: Value = r.send().await.unwrap().json().await.unwrap();
        secrets.extend([jwt, v["id"].as_str().unwrap().to_string(), v["key"].as_str().unwrap().to_string()]);
    }
    let forged = format!("{}x", Jwt::new("u2", Some(1)).sign());
    let r = http.get(format!("{base}/1.0/sync/1.5")).bearer_auth(&forged).header("x-keyid", "1-qqo").send().await;
    assert_eq!(r.unwrap().status(), 401);
    secrets.push(forged);
    // Sessions: create, rotate, end.
    let r = http.post(format!("{admin_base}/v1/sessions")).bearer_auth(SESSIONS_KEY).json(&json!({"meta": {"u": 1}}));
    let created: Value = r.send().await.unwrap().json().await.unwrap();
    let first = created["token"].as_str().unwrap().to_string();
    let r =
        http.post(format!("{admin_base}/v1/sessions/rotate")).bearer_auth(SESSIONS_KEY).json(&json!({"token": first}));
    let rotated: Value = r.send().await.unwrap().json().await.unwrap();
    let second = rotated["token"].as_str().unwrap().to_string();
    secrets.extend([first, second]);
    // Access tokens: create, authorize, read.
    let r = http
        .post(format!("{admin_base}/v1/services/s1/tokens"))
        .bearer_auth(ACCESS_KEY)
        .json(&json!({"token": ACCESS_TOKEN, "app_id": "app1", "ttl": 60}));
    assert_eq!(r.send().await.unwrap().status(), 201);
    let r = http
        .post(format!("{admin_base}/v1/services/s1/authorize"))
        .bearer_auth(ACCESS_KEY)
        .json(&json!({"access_token": ACCESS_TOKEN}));
    assert_eq!(r.send().await.unwrap().status(), 200);
    // A wrong admin key, and a purge that calls the storage node with Hawk.
    assert_eq!(
        http.get(format!("{admin_base}/v1/nodes")).bearer_auth("WRONGkeyVALUE-1").send().await.unwrap().status(),
        401
    );
    secrets.push("WRONGkeyVALUE-1".into());
    tokio::time::sleep(Duration::from_millis(5)).await;
    let r = admin(http.post(format!("{admin_base}/v1/purge")).json(&json!({"grace_period_s": 0}))).await.unwrap();
    let report: Value = r.json().await.unwrap();
    assert_eq!(report["data_deleted"], 1, "{report}");
    for header in seen.lock().unwrap().iter() {
        // Hawk id="<token>", ts, nonce, mac="…": the token and the MAC are secret material.
        for part in header.trim_start_matches("Hawk ").split(", ") {
            if let Some(v) = part.strip_prefix("id=\"").or_else(|| part.strip_prefix("mac=\"")) {
                secrets.push(v.trim_end_matches('"').to_string());
            }
        }
    }

    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert!(status.success());
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.lines().count() > 20 && log.contains("\"level\":\"TRACE\""), "trace logging was on");
    assert!(log.contains("\"rid\""), "request ids are logged");
    // The lines written while a request was served name it, as the line's first member (the
    // token line of each Sync request above, at least).
    let named: Vec<&str> = log.lines().filter(|l| l.contains("log-test.rid_1")).collect();
    assert!(named.iter().any(|l| l.contains("token issued")), "{named:?}");
    assert!(named.iter().all(|l| l.starts_with(r#"{"rid":"log-test.rid_1","#)), "{named:?}");
    assert!(named.iter().all(|l| serde_json::from_str::<Value>(l).is_ok()), "{named:?}");
    // The FxA key in use is named at startup by its kid.
    assert!(log.lines().any(|l| l.contains("FxA signing keys in use") && l.contains("\"kids\":\"test-rsa\"")), "{log}");
    for secret in &secrets {
        // Also their distinctive middle part, in case a line holds a fragment.
        let core = &secret[secret.len() / 4..secret.len() * 3 / 4];
        assert!(!log.contains(secret.as_str()) && !log.contains(core), "logged: {secret}");
    }
}
