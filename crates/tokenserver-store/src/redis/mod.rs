//! Redis and Redis Cluster: one connection per store, shared by the families Redis holds.
//!
//! A URL is `redis://…` / `rediss://…` for one server or `redis+cluster://h1:p1,h2:p2/` for a
//! cluster, with our own optional `?prefix=` (the key prefix, default `tokenserver:`), which is
//! taken off before the client sees the URL. A single server's connection reconnects by itself
//! (`ConnectionManager`); a cluster's follows the cluster's slot map.
//!
//! The request path's commands to a single server ([`Redis::send`]) leave in pipelines: every
//! command waiting at that moment goes out in one write and its answers come back in one read
//! ([`crate::batch`]), which costs the server one wake-up and us one driver round trip for the
//! lot. A cluster's pipelines must stay within one slot, and a session's or service's keys are
//! spread over all of them, so there each command goes on its own.

pub mod access;
pub mod apisonator;
pub mod session;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, ServerErrorKind, Value};

use crate::batch::Batcher;
use crate::StoreError;

/// Commands one pipeline carries at most.
const MAX_PIPELINE: usize = 256;
/// Pipelines out at once on the connection.
const PIPELINES_IN_FLIGHT: usize = 4;

type Result<T> = std::result::Result<T, StoreError>;

/// A standalone (auto-reconnecting) or cluster connection.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

pub(crate) fn e(err: redis::RedisError) -> StoreError {
    if err.is_io_error() || err.is_connection_dropped() || err.is_connection_refusal() || err.is_timeout() {
        return StoreError::Unavailable(err.to_string());
    }
    match err.code() {
        // `maxmemory` reached with a policy that evicts nothing: writes (and scripts that may
        // write, refused before they run) fail until memory is freed.
        Some("OOM") => StoreError::Full(format!("Redis is at its maxmemory: {err}")),
        // Loading its data, a failover or a cluster without quorum, a script running too long:
        // the server is there but cannot answer now.
        Some("LOADING" | "TRYAGAIN" | "CLUSTERDOWN" | "MASTERDOWN" | "READONLY" | "BUSY") => {
            StoreError::Unavailable(err.to_string())
        }
        _ => StoreError::Backend(err.to_string()),
    }
}

/// Splits our `prefix=` query parameter off a URL (Redis clients do not know it).
fn split_prefix(url: &str) -> (String, String) {
    let Some((base, query)) = url.split_once('?') else { return (url.to_string(), "tokenserver:".into()) };
    let mut prefix = "tokenserver:".to_string();
    let mut rest = Vec::new();
    for pair in query.split('&') {
        match pair.strip_prefix("prefix=") {
            Some(p) => prefix = p.to_string(),
            None if !pair.is_empty() => rest.push(pair),
            None => {}
        }
    }
    let url = if rest.is_empty() { base.to_string() } else { format!("{base}?{}", rest.join("&")) };
    (url, prefix)
}

/// `redis+cluster://[user:pw@]h1:p1,h2:p2[/][?prefix=…]` → one `redis://` URL per node.
fn cluster_nodes(url: &str) -> Result<Vec<String>> {
    let (scheme, rest) =
        url.split_once("://").ok_or_else(|| StoreError::Config(format!("invalid Redis Cluster URL {url:?}")))?;
    let plain = if scheme.eq_ignore_ascii_case("rediss+cluster") { "rediss" } else { "redis" };
    let rest = rest.trim_end_matches('/');
    let (auth, hosts) = match rest.rsplit_once('@') {
        Some((a, h)) => (format!("{a}@"), h),
        None => (String::new(), rest),
    };
    let nodes: Vec<String> =
        hosts.split(',').map(str::trim).filter(|h| !h.is_empty()).map(|h| format!("{plain}://{auth}{h}/")).collect();
    if nodes.is_empty() {
        return Err(StoreError::Config(format!("Redis Cluster URL {url:?} names no node")));
    }
    Ok(nodes)
}

/// A command for [`Redis::send`], and the source of the script it runs by `EVALSHA` (loaded
/// when the server does not know it yet, e.g. after a restart).
pub(crate) struct Piped {
    pub(crate) cmd: Cmd,
    pub(crate) script: Option<&'static str>,
}

/// `EVALSHA <script's hash> <keys>`: the start of a script's command for [`Redis::send`]; the
/// caller adds the keys, then the arguments.
pub(crate) fn evalsha(script: &redis::Script, keys: usize) -> Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(keys);
    cmd
}

fn no_script(err: &RedisError) -> bool {
    err.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}

/// One command on its own; a script unknown to the server is loaded and run again.
async fn send_one(conn: &mut Conn, cmd: &Cmd, script: Option<&str>) -> Result<Value> {
    match cmd.query_async::<Value>(conn).await {
        Err(err) if no_script(&err) => {
            let Some(source) = script else { return Err(e(err)) };
            redis::cmd("SCRIPT").arg("LOAD").arg(source).query_async::<String>(conn).await.map_err(e)?;
            cmd.query_async(conn).await.map_err(e)
        }
        other => other.map_err(e),
    }
}

/// Many commands in one pipeline, each with its own answer.
async fn send_many(mut conn: Conn, jobs: Vec<Piped>) -> Result<Vec<Result<Value>>> {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    let mut scripts = Vec::with_capacity(jobs.len());
    for job in jobs {
        pipe.add_command(job.cmd);
        scripts.push(job.script);
    }
    let answers: Vec<redis::RedisResult<Value>> = pipe.query_async(&mut conn).await.map_err(e)?;
    let mut out = Vec::with_capacity(answers.len());
    for ((answer, script), cmd) in answers.into_iter().zip(scripts).zip(pipe.cmd_iter()) {
        out.push(match answer {
            Err(err) if no_script(&err) && script.is_some() => send_one(&mut conn, cmd, script).await,
            other => other.map_err(e),
        });
    }
    Ok(out)
}

/// A connection to a server or a cluster, with the key prefix and the nodes (for `SCAN`).
#[derive(Clone)]
pub(crate) struct Redis {
    pub(crate) conn: Conn,
    pub(crate) prefix: String,
    /// Standalone URLs of every node (one for a single server).
    pub(crate) nodes: Vec<String>,
    /// A single server's pipelines; `None` on a cluster.
    pipeline: Option<Batcher<Piped, Value>>,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis").field("prefix", &self.prefix).field("nodes", &self.nodes.len()).finish_non_exhaustive()
    }
}

impl Redis {
    /// Connects to the server or cluster `url` names.
    pub(crate) async fn connect(url: &str) -> Result<Self> {
        let (url, prefix) = split_prefix(url);
        let cluster =
            url.split_once("://").is_some_and(|(scheme, _)| scheme.to_ascii_lowercase().ends_with("+cluster"));
        if cluster {
            let nodes = cluster_nodes(&url)?;
            let client =
                redis::cluster::ClusterClient::new(nodes.clone()).map_err(|err| StoreError::Config(err.to_string()))?;
            let conn = client.get_async_connection().await.map_err(e)?;
            return Ok(Self { conn: Conn::Cluster(conn), prefix, nodes, pipeline: None });
        }
        let client = redis::Client::open(url.as_str()).map_err(|err| StoreError::Config(err.to_string()))?;
        let conn = Conn::Single(client.get_connection_manager().await.map_err(e)?);
        let piped = conn.clone();
        let pipeline = Batcher::start("redis_pipeline", MAX_PIPELINE, PIPELINES_IN_FLIGHT, move |jobs| {
            send_many(piped.clone(), jobs)
        });
        Ok(Self { conn, prefix, nodes: vec![url], pipeline: Some(pipeline) })
    }

    /// `cmd` (running `script`, if it is an `EVALSHA`) through the pipeline where there is one.
    pub(crate) async fn send(&self, cmd: Cmd, script: Option<&'static str>) -> Result<Value> {
        match &self.pipeline {
            Some(pipeline) => pipeline.call(Piped { cmd, script }).await,
            None => send_one(&mut self.conn(), &cmd, script).await,
        }
    }

    /// True for a cluster.
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self.conn, Conn::Cluster(_))
    }

    /// A handle to the connection (cheap: both kinds multiplex).
    pub(crate) fn conn(&self) -> Conn {
        self.conn.clone()
    }

    /// A connection to one node, for commands that must run node by node (`SCAN`), and whether
    /// it holds keys of its own (replicas copy their primary's).
    pub(crate) async fn node(&self, index: usize) -> Result<(redis::aio::MultiplexedConnection, bool)> {
        let url = self.nodes.get(index).ok_or_else(|| StoreError::InvalidInput("no such node".into()))?;
        let client = redis::Client::open(url.as_str()).map_err(|err| StoreError::Config(err.to_string()))?;
        let mut node = client.get_multiplexed_async_connection().await.map_err(e)?;
        if !self.is_cluster() {
            return Ok((node, true));
        }
        let role: Vec<Value> = redis::cmd("ROLE").query_async(&mut node).await.map_err(e)?;
        let primary = matches!(role.first(), Some(Value::BulkString(b)) if b == b"master");
        Ok((node, primary))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_parameter_is_ours() {
        assert_eq!(split_prefix("redis://h:1/"), ("redis://h:1/".into(), "tokenserver:".into()));
        assert_eq!(split_prefix("redis://h:1/?prefix=t1:"), ("redis://h:1/".into(), "t1:".into()));
        assert_eq!(
            split_prefix("redis://h:1/?protocol=resp3&prefix=x:"),
            ("redis://h:1/?protocol=resp3".into(), "x:".into())
        );
    }

    #[test]
    fn cluster_urls_name_each_node() {
        assert_eq!(
            cluster_nodes("redis+cluster://127.0.0.1:7001,127.0.0.1:7002/").ok(),
            Some(vec!["redis://127.0.0.1:7001/".to_string(), "redis://127.0.0.1:7002/".to_string()])
        );
        assert_eq!(
            cluster_nodes("rediss+cluster://:pw@a:1,b:2").ok(),
            Some(vec!["rediss://:pw@a:1/".to_string(), "rediss://:pw@b:2/".to_string()])
        );
        assert!(cluster_nodes("redis+cluster://").is_err());
    }
}
