//! Server processes: start, wait until ready, sample memory, stop.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A free local port (bound, read, released).
pub fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

/// A running server process, killed on drop.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    /// The internal listener (tokenserver only).
    pub internal: Option<SocketAddr>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the hello server and reads its address from its first line of output.
pub fn hello(bin: &Path) -> Result<Server, String> {
    let mut child = Command::new(bin).stdout(Stdio::piped()).spawn().map_err(|e| format!("{}: {e}", bin.display()))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).map_err(|e| e.to_string())?;
    let addr = line.trim().parse().map_err(|e| format!("hello said {line:?}: {e}"))?;
    Ok(Server { child, addr, internal: None })
}

fn ready(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let req = format!("GET /__lbheartbeat__ HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.1 200")
}

/// `TOKIO_WORKER_THREADS` from the harness's environment, handed to every server it starts
/// (the hello server inherits it), so that a runtime experiment treats all of them alike.
fn runtime_env() -> Option<(&'static str, String)> {
    std::env::var("TOKIO_WORKER_THREADS").ok().map(|n| ("TOKIO_WORKER_THREADS", n))
}

/// Waits until `ready(addr)` holds for `server`, failing if it exits or takes more than 30 s.
fn wait_ready(mut server: Server, name: &str, ready: impl Fn(SocketAddr) -> bool) -> Result<Server, String> {
    let start = Instant::now();
    while !ready(server.addr) {
        if let Ok(Some(status)) = server.child.try_wait() {
            return Err(format!("{name} exited with {status} (see its log)"));
        }
        if start.elapsed() > Duration::from_secs(30) {
            return Err(format!("{name} did not become ready in 30 s"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(server)
}

/// Starts HaKr's `token_server` (it binds 127.0.0.1 on `--port`; ready once it accepts).
pub fn hakr(bin: &Path, log: &Path) -> Result<Server, String> {
    let port = free_port()?;
    let log = std::fs::File::create(log).map_err(|e| e.to_string())?;
    let child = Command::new(bin)
        .args(["--port", &port.to_string(), "--token-lifetime", "2h"])
        .env_clear()
        .envs(runtime_env())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    let server = Server { child, addr: ([127, 0, 0, 1], port).into(), internal: None };
    wait_ready(server, "token_server", |addr| {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
    })
}

/// Several tokenserver processes on one database, measured as one service.
pub struct Heads(pub Vec<Server>);

impl Heads {
    /// The processes' ids.
    pub fn pids(&self) -> Vec<u32> {
        self.0.iter().map(|s| s.child.id()).collect()
    }

    /// Their public listeners.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.0.iter().map(|s| s.addr).collect()
    }

    /// Their internal listeners.
    pub fn internals(&self) -> Result<Vec<SocketAddr>, String> {
        self.0.iter().map(|s| s.internal.ok_or_else(|| "no internal listener".to_string())).collect()
    }
}

/// Starts `n` tokenservers with `env`, one after the other (so that the first runs any
/// migration alone); the second and later log to `log` with `.2`, `.3`, … appended.
pub fn tokenservers(bin: &Path, env: &[(String, String)], log: &Path, n: usize) -> Result<Heads, String> {
    let mut heads = Vec::with_capacity(n.max(1));
    for i in 1..=n.max(1) {
        let path = if i == 1 { log.to_path_buf() } else { log.with_extension(format!("log.{i}")) };
        heads.push(tokenserver(bin, env, &path)?);
    }
    Ok(Heads(heads))
}

/// How often a tokenserver is started on new ports after it lost one (see [`tokenserver`]).
const PORT_ATTEMPTS: u32 = 3;

/// Starts tokenserver with `env` (on top of a clean environment), logs to `log`. Its ports are
/// found free and released before it binds them, so another socket can take one in between: a
/// server that exits for that is started again on new ports.
pub fn tokenserver(bin: &Path, env: &[(String, String)], log: &Path) -> Result<Server, String> {
    let mut attempt = 1;
    loop {
        match start_tokenserver(bin, env, log) {
            Err(_) if attempt < PORT_ATTEMPTS && lost_its_port(&std::fs::read_to_string(log).unwrap_or_default()) => {
                attempt += 1;
            }
            started => return started,
        }
    }
}

/// Whether a tokenserver's log says it could not bind a port because another socket had it.
fn lost_its_port(log: &str) -> bool {
    log.lines().any(|l| l.contains("cannot listen on") && l.contains("Address already in use"))
}

fn start_tokenserver(bin: &Path, env: &[(String, String)], log: &Path) -> Result<Server, String> {
    let port = free_port()?;
    let internal = free_port()?;
    let log = std::fs::File::create(log).map_err(|e| e.to_string())?;
    let child = Command::new(bin)
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .envs(runtime_env())
        .env("TOKENSERVER_PORT", port.to_string())
        .env("TOKENSERVER_INTERNAL__PORT", internal.to_string())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let server = Server { child, addr, internal: Some(([127, 0, 0, 1], internal).into()) };
    wait_ready(server, "tokenserver", ready)
}

/// Samples a process's resident memory every 50 ms; [`RssSampler::stop`] returns the peak and
/// the CPU time each party used meanwhile.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
    pids: Vec<u32>,
    cpu_start: Duration,
    database_start: Duration,
    load_start: Duration,
}

/// What a run used.
pub struct Usage {
    /// Peak RSS of the measured processes (the largest), KiB.
    pub peak_kib: u64,
    /// Their CPU time (the sum).
    pub cpu: Duration,
    /// The database servers' CPU time.
    pub database: Duration,
    /// The load generator's (this process's) CPU time: on a shared machine it is part of what
    /// bounds the rate.
    pub load: Duration,
}

fn cpu_of(pids: &[u32]) -> Duration {
    pids.iter().map(|&pid| cpu_time(pid)).sum()
}

/// User + system CPU time of a process (`/proc/<pid>/stat`, clock ticks of 10 ms).
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// Database servers whose CPU a run is charged with (every process of theirs on this machine).
const DATABASE_PROCESSES: &[&str] = &["postgres", "mariadbd", "mysqld", "redis-server"];

/// User + system CPU time of every database server process now (`/proc/*/stat`). A backend
/// process that exits within a run takes its time with it; the pools keep theirs open.
pub fn database_cpu_time() -> Duration {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Duration::ZERO };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            DATABASE_PROCESSES.contains(&comm.trim_end())
        })
        .map(cpu_time)
        .sum()
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

impl RssSampler {
    /// Samples the processes `pids`: the peak is the largest of theirs, the CPU time their sum.
    pub fn start(pids: &[u32]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let largest = |pids: &[u32]| pids.iter().filter_map(|&pid| rss_kib(pid)).max();
        let peak = Arc::new(AtomicU64::new(largest(pids).unwrap_or(0)));
        let (s, p, sampled) = (stop.clone(), peak.clone(), pids.to_vec());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(kib) = largest(&sampled) {
                    p.fetch_max(kib, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let pids = pids.to_vec();
        let cpu_start = cpu_of(&pids);
        let load_start = cpu_time(std::process::id());
        Self { stop, peak, thread: Some(thread), pids, cpu_start, database_start: database_cpu_time(), load_start }
    }

    /// What was used since `start`.
    pub fn stop(mut self) -> Usage {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        Usage {
            peak_kib: self.peak.load(Ordering::Relaxed),
            cpu: cpu_of(&self.pids).saturating_sub(self.cpu_start),
            database: database_cpu_time().saturating_sub(self.database_start),
            load: cpu_time(std::process::id()).saturating_sub(self.load_start),
        }
    }
}

/// Runs `tokenserver <args>` to completion.
pub fn tokenserver_cmd(bin: &Path, env: &[(String, String)], args: &[&str]) -> Result<(), String> {
    let out = Command::new(bin)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("tokenserver {args:?}: {}", String::from_utf8_lossy(&out.stderr)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_taken_before_the_server_bound_it_is_told_apart() {
        // The line a server wrote in a benchmark run when its port had been taken meanwhile.
        let taken = "tokenserver: cannot listen on 127.0.0.1:42471: Address already in use (os error 98)\n";
        assert!(lost_its_port(taken));
        assert!(lost_its_port(&format!("{{\"level\":\"INFO\"}}\n{taken}")));
        // Other reasons to stop are not retried.
        assert!(!lost_its_port("tokenserver: cannot listen on 127.0.0.1:1: Permission denied (os error 13)\n"));
        assert!(!lost_its_port("tokenserver: database: connection refused\n"));
        assert!(!lost_its_port(""));
    }
}
