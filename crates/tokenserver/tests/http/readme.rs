//! The README's quick starts, run as written: each block marked `<!-- docs-test: NAME -->` is a
//! bash script run in an empty directory with the built `tokenserver` first on the `PATH`, so the
//! README cannot drift from the binary.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

const README: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"));

/// (name, script) of every marked block.
fn quick_starts() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut lines = README.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line.trim().strip_prefix("<!-- docs-test: ").and_then(|r| r.strip_suffix(" -->")) else {
            continue;
        };
        let fence = lines.next().unwrap_or_default();
        assert_eq!(fence.trim(), "```sh", "the block after docs-test {name} must be a sh block");
        let script: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
        out.push((name.to_string(), script.join("\n")));
    }
    out
}

/// Runs `script` with bash in a fresh directory; (exit code, stdout, stderr).
fn run(script: &str) -> (i32, String, String) {
    use std::os::unix::process::CommandExt;
    let dir = crate::common::TempDir::new();
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_tokenserver")).parent().unwrap().to_path_buf();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(format!("set -euo pipefail\n{script}\nwait"))
        .current_dir(&dir.0)
        .env("PATH", path)
        .env("HOME", &dir.0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // The reader's own settings must not leak into the quick start.
    for (k, _) in std::env::vars() {
        if k.starts_with("SYNC_") || k.starts_with("TOKENSERVER_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd.spawn().unwrap();
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let mut stdout = String::new();
    let mut code = None;
    for _ in 0..1200 {
        if let Some(status) = child.try_wait().unwrap() {
            code = status.code();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // A script that did not finish is stopped with what it started: its process group (only
    // while the script still runs, so the group's id cannot have been reused).
    if code.is_none() {
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", child.id())]).status();
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = out.read_to_string(&mut stdout);
    (code.unwrap_or(-1), stdout, reader.join().unwrap_or_default())
}

#[test]
fn the_readme_quick_starts_work_as_written() {
    let blocks = quick_starts();
    let names: Vec<&str> = blocks.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["sync", "sessions", "access"], "every quick start is tested");
    let expected: &[(&str, &[&str])] = &[
        ("sync", &[r#""database":"Ok""#, r#""description":"Unauthorized"}]}"#]),
        ("sessions", &[r#"{"Ok":{"token":""#, r#"","meta":{"user":42}}}"#, r#"{"Err":"InvalidToken"}"#]),
        (
            "access",
            &[
                r#""token":"tok-alice-1","app_id":"app-1","user_id":"alice""#,
                r#"{"app_id":"app-1","user_id":"alice"}"#,
                "<app_id>app-1</app_id>",
                r#"{"revoked":1}"#,
            ],
        ),
    ];
    for (name, script) in &blocks {
        let (code, out, err) = run(script);
        assert_eq!(code, 0, "quick start {name} failed\n--- stdout\n{out}\n--- stderr\n{err}");
        let wanted = expected.iter().find(|(n, _)| n == name).map(|(_, w)| *w).unwrap_or(&[]);
        for w in wanted {
            assert!(out.contains(w), "quick start {name}: {w:?} not in\n{out}\n--- stderr\n{err}");
        }
    }
}
