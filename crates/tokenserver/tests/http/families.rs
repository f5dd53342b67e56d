//! Families switched on and off, and configuration that fails loudly, through the real binary.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One HTTP/1.1 request on a fresh connection: (status, body).
fn http(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// `tokenserver serve` in `dir` with `env`, once its internal listener answers.
fn spawn(dir: &std::path::Path, env: &[(&str, &str)]) -> (Child, u16, u16) {
    let (public, internal) = (free_port(), free_port());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tokenserver"));
    cmd.arg("serve")
        .current_dir(dir)
        .env_remove("SYNC_MASTER_SECRET")
        .env("TOKENSERVER_PORT", public.to_string())
        .env("TOKENSERVER_INTERNAL__PORT", internal.to_string())
        .env("TOKENSERVER_HUMAN_LOGS", "true")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    for _ in 0..200 {
        if TcpStream::connect(("127.0.0.1", internal)).is_ok()
            && http(internal, "GET", "/__lbheartbeat__", &[], "").0 == 200
        {
            return (child, public, internal);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("server did not start: {}", std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default());
}

fn stop(mut child: Child) {
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    for _ in 0..400 {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status:?}");
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    panic!("did not exit");
}

async fn tables(db: &std::path::Path) -> Vec<String> {
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display())).await.unwrap();
    let names: Vec<(String,)> = sqlx::query_as(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    names.into_iter().map(|(n,)| n).collect()
}

#[tokio::test]
async fn a_sessions_only_server_opens_no_public_listener_creates_no_sync_tables_and_fetches_no_keys() {
    let fxa = MockFxa::start().await;
    let dir = TempDir::new();
    let env = [
        ("TOKENSERVER_SYNC__ENABLED", "false"),
        ("TOKENSERVER_ACCESS__ENABLED", "false"),
        ("TOKENSERVER_SESSIONS__API_KEY", "sessions-key-0123456789"),
        ("TOKENSERVER_INTERNAL__ADMIN_KEY", ADMIN_KEY),
        ("SYNC_TOKENSERVER__FXA_OAUTH_SERVER_URL", fxa.url.as_str()),
    ];
    let (child, public, internal) = spawn(&dir.0, &env);
    assert!(TcpStream::connect(("127.0.0.1", public)).is_err(), "no public listener");

    let auth = [("Authorization", "Bearer sessions-key-0123456789"), ("Content-Type", "application/json")];
    let (status, body) = http(internal, "POST", "/v1/sessions", &auth, r#"{"meta": {"user": 7}}"#);
    assert_eq!(status, 201, "{body}");
    let created: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(created["meta"], json!({"user": 7}));
    let (status, _) = http(internal, "POST", "/v1/sessions", &[("Content-Type", "application/json")], "{}");
    assert_eq!(status, 401, "the session key is required");
    // Sync's operator routes are not there; health is, checking the session store.
    assert_eq!(http(internal, "GET", "/v1/nodes", &[("Authorization", &format!("Bearer {ADMIN_KEY}"))], "").0, 404);
    let (status, body) = http(internal, "GET", "/__heartbeat__", &[], "");
    assert_eq!(status, 200, "{body}");
    let beat: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(beat, json!({"version": beat["version"], "status": "Ok", "sessions": "Ok"}));

    assert_eq!(tables(&dir.0.join("tokenserver.db")).await, ["tokenserver_sessions"], "no Sync tables");
    stop(child);
    assert_eq!(fxa.jwks_hits(), 0, "no FxA keys fetched");
    let log = std::fs::read_to_string(dir.0.join("stderr.log")).unwrap();
    for sync_talk in ["fxa_metrics_hash_secret", "storage node", "master_secret", "FxA", "stage"] {
        assert!(!log.contains(sync_talk), "{sync_talk:?} logged by a sessions-only server:\n{log}");
    }
    assert!(log.contains("internal listener only"), "{log}");
}

#[tokio::test]
async fn a_sync_only_server_serves_no_session_routes() {
    let fxa = MockFxa::start().await;
    let dir = TempDir::new();
    let env = [
        ("TOKENSERVER_SESSIONS__ENABLED", "false"),
        ("TOKENSERVER_INTERNAL__ADMIN_KEY", ADMIN_KEY),
        ("SYNC_MASTER_SECRET", SECRET),
        ("SYNC_TOKENSERVER__FXA_OAUTH_SERVER_URL", fxa.url.as_str()),
    ];
    let (child, public, internal) = spawn(&dir.0, &env);
    let json = [("Content-Type", "application/json")];
    assert_eq!(http(internal, "POST", "/v1/sessions", &json, r#"{"meta": {}}"#).0, 404);
    assert_eq!(http(internal, "POST", "/token", &json, r#"{"meta": {}}"#).0, 404);
    let (status, body) = http(public, "GET", "/__heartbeat__", &[], "");
    assert_eq!((status, serde_json::from_str::<Value>(&body).unwrap()["database"].clone()), (200, json!("Ok")));
    let (_, body) = http(internal, "GET", "/__heartbeat__", &[], "");
    let beat: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(beat["sessions"], Value::Null, "{beat}");
    assert_eq!((beat["database"].clone(), beat["access"].clone()), (json!("Ok"), json!("Ok")), "{beat}");
    // The positive control of the test above: a Sync server does fetch the FxA keys.
    for _ in 0..100 {
        if fxa.jwks_hits() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(fxa.jwks_hits() > 0);
    stop(child);
    let names = tables(&dir.0.join("tokenserver.db")).await;
    assert!(names.contains(&"users".to_string()) && !names.contains(&"tokenserver_sessions".to_string()), "{names:?}");
}

#[test]
fn a_misplaced_or_misspelt_key_stops_startup_naming_it() {
    let dir = TempDir::new();
    std::fs::write(dir.0.join("ts.toml"), "[tokenserver]\nmaster_secret = \"from-the-wrong-table\"\n").unwrap();
    let (code, _, err) = cli(&dir.0, &["--config", "ts.toml", "serve"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("tokenserver.master_secret: unknown configuration key; did you mean master_secret?"), "{err}");
    assert!(!dir.0.join("tokenserver.db").exists(), "nothing started");

    let (code, _, err) = cli(&dir.0, &["serve"], &[("TOKENSERVER_SESIONS__API_KEY", "x")]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(
            "TOKENSERVER_SESIONS__API_KEY: unknown configuration key; did you mean TOKENSERVER_SESSIONS__API_KEY?"
        ),
        "{err}"
    );

    let (code, _, err) = cli(&dir.0, &["serve"], &[("TOKENSERVER_PORT", "eighty")]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.trim(), "tokenserver: invalid configuration: TOKENSERVER_PORT: expected a whole number from 0 to 65535, found string \"eighty\"");
}

#[test]
fn config_check_shows_values_sources_and_masks_secrets() {
    let dir = TempDir::new();
    std::fs::write(
        dir.0.join("ts.toml"),
        "master_secret = \"file-secret-value\"\n[tokenserver]\nnode_type = \"mysql\"\n",
    )
    .unwrap();
    let env = [("TOKENSERVER_DATABASE_URL", "postgres://ts:db-password@db.example/ts"), ("SYNC_PORT", "9000")];
    let (code, out, err) = cli(&dir.0, &["--config", "ts.toml", "config", "check"], &env);
    assert_eq!(code, 0, "{out}{err}");
    let line = |key: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("{key} in\n{out}"))
            .to_string()
    };
    assert!(line("master_secret").contains("(set)") && line("master_secret").ends_with("# file ts.toml"), "{out}");
    assert!(line("tokenserver.database_url").contains("postgres://ts:****@db.example/ts"), "{out}");
    assert!(line("tokenserver.database_url").ends_with("# env TOKENSERVER_DATABASE_URL"), "{out}");
    assert!(line("port").starts_with("port = 9000") && line("port").ends_with("# env SYNC_PORT"), "{out}");
    assert!(line("host").ends_with("# default"), "{out}");
    assert!(!out.contains("file-secret-value") && !out.contains("db-password") && !err.contains("db-password"));
    assert!(err.contains("configuration is valid"), "{err}");

    std::fs::write(dir.0.join("bad.toml"), "[sessions]\ntoken_lifetme = \"1h\"\n").unwrap();
    let (code, out, err) = cli(&dir.0, &["--config", "bad.toml", "config", "check"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(out.contains("sessions.token_lifetme = \"1h\""), "the unknown key is shown: {out}");
    assert!(err.contains("did you mean sessions.token_lifetime?"), "{err}");
    let (code, _, err) = cli(&dir.0, &["--config", "bad.toml", "--lenient", "config", "check"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("warning: sessions.token_lifetme: unknown configuration key"), "{err}");
}

#[test]
fn an_unreachable_store_stops_startup_naming_the_store_host_and_cause() {
    let dir = TempDir::new();
    let closed = free_port();
    let url = format!("postgres://ts:pg-password@127.0.0.1:{closed}/ts");
    let (code, _, err) = cli(&dir.0, &["serve"], &[("TOKENSERVER_DATABASE_URL", &url), ("SYNC_MASTER_SECRET", SECRET)]);
    assert_eq!(code, 1, "{err}");
    // The error line; log lines may be flushed around it.
    let last = err.lines().find(|l| l.starts_with("tokenserver: ")).unwrap_or_default().to_string();
    assert!(
        last.starts_with(&format!(
            "tokenserver: cannot reach the Sync database, session store and access-token store at 127.0.0.1:{closed}: "
        )),
        "{err}"
    );
    assert!(last.contains("refused"), "{err}");
    assert!(!err.contains("pg-password"), "{err}");

    // A host that takes the connection and never speaks.
    let mute = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = mute.local_addr().unwrap().port();
    let held = std::thread::spawn(move || {
        mute.accept().map(|(_held, _)| std::thread::sleep(Duration::from_secs(8))).ok().map(|_| ())
    });
    let redis = format!("redis://127.0.0.1:{port}/");
    let env = [
        ("TOKENSERVER_SESSIONS__URL", redis.as_str()),
        ("TOKENSERVER_ACCESS__ENABLED", "false"),
        ("SYNC_MASTER_SECRET", SECRET),
    ];
    let (code, _, err) = cli(&dir.0, &["serve"], &env);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "the session store at 127.0.0.1:{port} accepts connections but did not answer within 5s"
        )),
        "{err}"
    );
    let _ = held.join();
}

#[test]
fn secret_show_rotate_and_an_online_backup() {
    let dir = TempDir::new();
    let (code, _, err) = cli(&dir.0, &["secret", "show"], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no database at"), "a read-only command creates nothing: {err}");
    assert_eq!(cli(&dir.0, &["node", "add", "https://sync-1.example.com", "--capacity", "10"], &[]).0, 0);
    let (code, first, _) = cli(&dir.0, &["secret", "show"], &[]);
    let first = first.trim().to_string();
    assert_eq!((code, first.len()), (0, 64), "{first}");
    assert!(first.bytes().all(|b| b.is_ascii_hexdigit()));

    let (code, _, err) = cli(&dir.0, &["secret", "rotate"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("2 in force"), "{err}");
    let (_, newest, _) = cli(&dir.0, &["secret", "show"], &[]);
    let (_, all, _) = cli(&dir.0, &["secret", "show", "--all"], &[]);
    let all: Vec<&str> = all.lines().collect();
    assert_eq!(all, [first.as_str(), newest.trim()], "newest last");
    assert_ne!(newest.trim(), first);
    let (code, _, err) = cli(&dir.0, &["secret", "rotate"], &[("SYNC_MASTER_SECRET", "configured-one")]);
    assert_eq!(code, 1);
    assert!(err.contains("master_secret is configured"), "{err}");
    let (_, shown, _) = cli(&dir.0, &["secret", "show"], &[("SYNC_MASTER_SECRET", "configured-one")]);
    assert_eq!(shown.trim(), "configured-one");

    // The copy holds everything: the node, the secrets.
    let (code, out, err) = cli(&dir.0, &["backup", "copy.db"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("backed up "), "{out}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.0.join("copy.db")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let copy = [("TOKENSERVER_DATABASE_URL", "sqlite://copy.db")];
    let (_, nodes, _) = cli(&dir.0, &["node", "list", "--json"], &copy);
    assert!(nodes.contains("https://sync-1.example.com"), "{nodes}");
    let (_, copied, _) = cli(&dir.0, &["secret", "show", "--all"], &copy);
    assert_eq!(copied.lines().collect::<Vec<_>>(), all);
    let (code, _, err) = cli(&dir.0, &["backup", "copy.db"], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("copy.db exists"), "{err}");
    let (code, _, err) = cli(&dir.0, &["backup", "x.db"], &[("TOKENSERVER_DATABASE_URL", "postgres://127.0.0.1/x")]);
    assert_eq!(code, 1);
    assert!(err.contains("pg_dump"), "{err}");
}

#[tokio::test]
async fn init_node_url_and_node_add_work_for_every_configured_application() {
    let apps = [
        ("TOKENSERVER_APPLICATIONS__SYNC-1.5__TOKEN_DURATION", "3600"),
        ("TOKENSERVER_APPLICATIONS__NOTES-2__TOKEN_DURATION", "60"),
    ];
    let mut env = apps.to_vec();
    env.push(("SYNC_TOKENSERVER__INIT_NODE_URL", "https://init.example.com"));
    let s = TestServer::start(&env).await;
    let nodes: Value = s.admin.get(format!("{}/v1/nodes", s.internal)).send().await.unwrap().json().await.unwrap();
    let mut found: Vec<(String, String)> = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["service"].as_str().unwrap().to_string(), n["node"].as_str().unwrap().to_string()))
        .collect();
    found.sort();
    assert_eq!(
        found,
        [
            ("notes-2".to_string(), "https://init.example.com".to_string()),
            ("sync-1.5".to_string(), "https://init.example.com".to_string())
        ]
    );
    s.finish().await;

    // Before any server ran: the CLI adds the configured application's service itself.
    let dir = TempDir::new();
    let (code, out, err) =
        cli(&dir.0, &["node", "add", "https://notes.example.com", "--capacity", "5", "--service", "notes-2"], &apps);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("service notes-2"), "{out}");
    let (code, _, err) =
        cli(&dir.0, &["node", "add", "https://x.example.com", "--capacity", "5", "--service", "unknown-9"], &apps);
    assert_eq!(code, 1, "an unconfigured service is still refused: {err}");
}
