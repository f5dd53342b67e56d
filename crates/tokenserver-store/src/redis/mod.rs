//! Redis and Redis Cluster: one connection per store, shared by the families Redis holds.
//!
//! A URL is `redis://…` / `rediss://…` for one server or `redis+cluster://h1:p1,h2:p2/` for a
//! cluster, with our own optional `?prefix=` (the key prefix, default `tokenserver:`), which is
//! taken off before the client sees the URL. A single server's connection reconnects by itself
//! (`ConnectionManager`); a cluster's follows the cluster's slot map.

pub mod access;
pub mod apisonator;
pub mod session;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use crate::StoreError;

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
        StoreError::Unavailable(err.to_string())
    } else {
        StoreError::Backend(err.to_string())
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

/// A connection to a server or a cluster, with the key prefix and the nodes (for `SCAN`).
#[derive(Clone)]
pub(crate) struct Redis {
    pub(crate) conn: Conn,
    pub(crate) prefix: String,
    /// Standalone URLs of every node (one for a single server).
    pub(crate) nodes: Vec<String>,
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
            return Ok(Self { conn: Conn::Cluster(conn), prefix, nodes });
        }
        let client = redis::Client::open(url.as_str()).map_err(|err| StoreError::Config(err.to_string()))?;
        let conn = client.get_connection_manager().await.map_err(e)?;
        Ok(Self { conn: Conn::Single(conn), prefix, nodes: vec![url] })
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
