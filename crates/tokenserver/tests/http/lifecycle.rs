//! The process on SIGTERM: it stops accepting at once, lets in-flight requests finish within
//! `shutdown_timeout`, stops its background jobs and exits 0. And the runtime it serves on: as
//! many worker threads as `worker_threads` says.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `tokenserver serve` in `dir` on fresh ports, with the background purge on and `extra`
/// settings; (child, public port, internal port) once it answers its heartbeat.
fn spawn_server(dir: &std::path::Path, shutdown_timeout: &str, extra: &[(&str, &str)]) -> (Child, u16, u16) {
    let (public, internal) = (free_port(), free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_tokenserver"))
        .arg("serve")
        .current_dir(dir)
        .env("TOKENSERVER_HOST", "127.0.0.1")
        .env("TOKENSERVER_PORT", public.to_string())
        .env("TOKENSERVER_INTERNAL__PORT", internal.to_string())
        .env("SYNC_MASTER_SECRET", SECRET)
        .env("SYNC_TOKENSERVER__FXA_METRICS_HASH_SECRET", SECRET)
        .env("SYNC_TOKENSERVER__FXA_OAUTH_SERVER_URL", "http://127.0.0.1:9")
        .env("TOKENSERVER_SESSIONS__REQUIRE_API_KEY", "false")
        .env("TOKENSERVER_SHUTDOWN_TIMEOUT", shutdown_timeout)
        .env("TOKENSERVER_PURGE__ENABLED", "true")
        .env("TOKENSERVER_PURGE__INTERVAL", "1s")
        .env("TOKENSERVER_HUMAN_LOGS", "true")
        // tokio's own worker-count variable, from the caller's environment, would change the
        // runtime the tests expect; a test that wants it sets it in `extra`.
        .env_remove("TOKIO_WORKER_THREADS")
        .envs(extra.iter().copied())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", public)) {
            let _ = s.write_all(b"GET /__lbheartbeat__ HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            if out.starts_with("HTTP/1.1 200") {
                return (child, public, internal);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("server did not start: {}", std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default());
}

/// A session-create request with only part of its body sent: in flight until the rest comes.
fn half_sent_request(internal: u16) -> (TcpStream, &'static [u8]) {
    let body: &[u8] = br#"{"meta": {"user": 7}}"#;
    let mut s = TcpStream::connect(("127.0.0.1", internal)).unwrap();
    let head = format!(
        "POST /token HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&body[..8]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    (s, &body[8..])
}

fn sigterm(child: &Child) {
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
}

/// Waits for the process to exit (a guard, not a timing claim).
fn exit_status(child: &mut Child) -> std::process::ExitStatus {
    for _ in 0..600 {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the server did not exit after SIGTERM");
}

fn refused(port: u16) -> bool {
    (0..100).any(|_| {
        let gone = TcpStream::connect(("127.0.0.1", port)).is_err();
        if !gone {
            std::thread::sleep(Duration::from_millis(20));
        }
        gone
    })
}

#[test]
fn sigterm_finishes_in_flight_requests_then_exits() {
    let dir = TempDir::new();
    let (mut child, public, internal) = spawn_server(&dir.0, "30s", &[]);
    let (mut conn, rest) = half_sent_request(internal);
    std::thread::sleep(Duration::from_millis(100));
    sigterm(&child);
    // New connections are refused on both listeners while the request is still open.
    assert!(refused(public) && refused(internal), "listeners still open after SIGTERM");
    assert!(child.try_wait().unwrap().is_none(), "exited with a request in flight");
    conn.write_all(rest).unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let token = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    assert!(!token.is_empty(), "{answer}");
    let status = exit_status(&mut child);
    let log = std::fs::read_to_string(dir.0.join("stderr.log")).unwrap();
    assert!(status.success(), "{status:?}: {log}");
    assert!(log.contains("shutting down") && log.contains("Server closing"), "{log}");
    assert!(!log.contains("shutdown_timeout reached"), "{log}");
}

#[test]
fn sigterm_drops_requests_still_open_after_the_shutdown_timeout() {
    let dir = TempDir::new();
    let (mut child, _, internal) = spawn_server(&dir.0, "1s", &[]);
    let (mut conn, _rest) = half_sent_request(internal);
    std::thread::sleep(Duration::from_millis(100));
    sigterm(&child);
    let status = exit_status(&mut child);
    let log = std::fs::read_to_string(dir.0.join("stderr.log")).unwrap();
    assert!(status.success(), "{status:?}: {log}");
    assert!(log.contains("shutdown_timeout reached"), "{log}");
    // The stalled client sees its connection closed, without an answer.
    let mut answer = Vec::new();
    let _ = conn.read_to_end(&mut answer);
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
}

/// `GET /metrics` on the internal listener, with the admin key.
fn scrape(internal: u16, key: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", internal)).unwrap();
    let head = format!("GET /metrics HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn worker_threads_sets_the_runtime_workers_and_a_bad_value_stops_startup() {
    let key = "lifecycle-admin-key-0123456789abcdef";
    for (threads, expected) in [(None, std::thread::available_parallelism().map_or(1, usize::from)), (Some("3"), 3)] {
        let dir = TempDir::new();
        let mut extra = vec![("TOKENSERVER_INTERNAL__ADMIN_KEY", key)];
        // Set, ours wins over tokio's own variable (as docs/configuration.md says).
        extra.extend(
            threads.into_iter().flat_map(|n| [("TOKENSERVER_WORKER_THREADS", n), ("TOKIO_WORKER_THREADS", "2")]),
        );
        let (mut child, _, internal) = spawn_server(&dir.0, "1s", &extra);
        let metrics = scrape(internal, key);
        sigterm(&child);
        let status = exit_status(&mut child);
        assert!(status.success(), "{status:?}");
        assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
        let line = format!("tokenserver_runtime_workers {expected}");
        assert!(metrics.lines().any(|l| l == line), "{threads:?}: no {line:?} in {metrics}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_tokenserver"))
        .arg("serve")
        .env("TOKENSERVER_WORKER_THREADS", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TOKENSERVER_WORKER_THREADS: must be 1 to 1024 (unset: one per core), found 0"), "{err}");
}
