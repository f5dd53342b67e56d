//! Redis and Redis Cluster session store.
//!
//! One hash per token under `<prefix>s:{<chain id>}:<token hash hex>`: the chain id is the hash
//! tag, so every token of a session lives in one Cluster slot and the scripts below touch one
//! slot only. Fields: `m` metadata, `e` idle expiry, `d` deadline, `t` idle lifetime (ms), and
//! once rotated `r` (when), `s` (successor hash, hex), `x` (sealed successor). Each key expires
//! natively at `e` (`PEXPIREAT`), so there is nothing to purge.
//!
//! A rotation reads the record, decides in Rust (merging metadata there, so JSON is never
//! handled in Lua), then runs a script that applies the decision only if the token is still
//! live and unrotated — the compare-and-set that makes two concurrent rotations of one token
//! produce one successor; the loser re-reads and sees the rotated record.

use std::collections::HashMap;

use async_trait::async_trait;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Script, Value};
use tokenserver_core::session::{
    decide, replay_answer, Decision, Invalid, RotateRequest, Rotated, RotationPolicy, SealedSuccessor, SessionRecord,
    SessionToken, TokenHash,
};

use super::{DumpEntry, DumpPage, Result, RotateOutcome, SessionStore};
use crate::StoreError;

/// Rotation attempts before giving up on a token that keeps changing under us (it cannot: a live
/// token changes only by being rotated or deleted, after which the next read decides for good).
const MAX_ATTEMPTS: usize = 4;
/// Longest chain walked by a revocation.
const MAX_WALK: usize = 100_000;

const CREATE: &str = r"
redis.call('HSET', KEYS[1], 'm', ARGV[1], 'e', ARGV[2], 'd', ARGV[3], 't', ARGV[4])
redis.call('PEXPIREAT', KEYS[1], ARGV[2])
return 1
";

const ROTATE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], 'r') == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'r', ARGV[1], 's', ARGV[2], 'x', ARGV[3])
redis.call('HDEL', KEYS[1], 'm')
redis.call('HSET', KEYS[2], 'm', ARGV[4], 'e', ARGV[5], 'd', ARGV[6], 't', ARGV[7])
redis.call('PEXPIREAT', KEYS[2], ARGV[5])
return 1
";

/// Deletes KEYS[1] and its successors (ARGV[1]: the chain's key prefix, ARGV[2]: walk bound).
/// With ARGV[3] (now) set, only an unexpired KEYS[1] starts a walk. Returns 1 when it did.
const REVOKE: &str = r"
local key = KEYS[1]
if ARGV[3] ~= '' then
  local e = redis.call('HGET', key, 'e')
  local d = redis.call('HGET', key, 'd')
  if not e or not d then return 0 end
  local now = tonumber(ARGV[3])
  if now >= tonumber(e) or now >= tonumber(d) then
    redis.call('DEL', key)
    return 0
  end
end
local limit = tonumber(ARGV[2])
local n = 0
while key and n < limit do
  local s = redis.call('HGET', key, 's')
  redis.call('DEL', key)
  n = n + 1
  if s then key = ARGV[1] .. s else key = nil end
end
return 1
";

/// Keys asked of each `SCAN` in a dump; fixed, so that a page can resume inside a batch by
/// asking for the same batch again.
const DUMP_SCAN_COUNT: u64 = 100;

/// Where a dump's scan stands: a node and that node's `SCAN` cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ScanAt {
    node: usize,
    cursor: u64,
}

/// `<node>:<SCAN cursor>:<keys of that batch already seen>`. A page resumed after the keyspace
/// was resized may repeat or skip a few sessions (SCAN's own guarantee holds only for a whole
/// scan): dumps are an operator's view, not an export.
fn dump_cursor(at: ScanAt, skip: usize) -> String {
    format!("{}:{}:{skip}", at.node, at.cursor)
}

fn parse_dump_cursor(cursor: &str) -> Option<(ScanAt, usize)> {
    let mut parts = cursor.split(':');
    let node = parts.next()?.parse().ok()?;
    let scan = parts.next()?.parse().ok()?;
    let skip = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((ScanAt { node, cursor: scan }, skip))
}

/// A standalone (auto-reconnecting) or cluster connection.
#[derive(Clone)]
enum Conn {
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

fn e(err: redis::RedisError) -> StoreError {
    if err.is_io_error() || err.is_connection_dropped() || err.is_connection_refusal() || err.is_timeout() {
        StoreError::Unavailable(err.to_string())
    } else {
        StoreError::Backend(err.to_string())
    }
}

/// The Redis session store.
#[derive(Clone)]
pub struct RedisSessions {
    conn: Conn,
    prefix: String,
    /// Standalone URLs of every node (one for a single server), for `SCAN` in dumps.
    nodes: Vec<String>,
    create: Script,
    rotate: Script,
    revoke: Script,
}

impl std::fmt::Debug for RedisSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSessions").field("prefix", &self.prefix).finish_non_exhaustive()
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

impl RedisSessions {
    fn with(conn: Conn, prefix: String, nodes: Vec<String>) -> Self {
        Self {
            conn,
            prefix,
            nodes,
            create: Script::new(CREATE),
            rotate: Script::new(ROTATE),
            revoke: Script::new(REVOKE),
        }
    }

    /// Connects to one Redis server (`redis://…`, optional `?prefix=` for the key prefix).
    pub async fn open(url: &str) -> Result<Self> {
        let (url, prefix) = split_prefix(url);
        let client = redis::Client::open(url.as_str()).map_err(|err| StoreError::Config(err.to_string()))?;
        let conn = client.get_connection_manager().await.map_err(e)?;
        Ok(Self::with(Conn::Single(conn), prefix, vec![url]))
    }

    /// Connects to a Redis Cluster (`redis+cluster://h1:p1,h2:p2`).
    pub async fn open_cluster(url: &str) -> Result<Self> {
        let (url, prefix) = split_prefix(url);
        let nodes = cluster_nodes(&url)?;
        let client =
            redis::cluster::ClusterClient::new(nodes.clone()).map_err(|err| StoreError::Config(err.to_string()))?;
        let conn = client.get_async_connection().await.map_err(e)?;
        Ok(Self::with(Conn::Cluster(conn), prefix, nodes))
    }

    fn chain_prefix(&self, token: &SessionToken) -> String {
        format!("{}s:{{{}}}:", self.prefix, token.chain())
    }

    fn key(&self, token: &SessionToken, hash: &TokenHash) -> String {
        format!("{}{}", self.chain_prefix(token), hash.to_hex())
    }

    async fn load(&self, key: &str) -> Result<Option<SessionRecord>> {
        let mut conn = self.conn.clone();
        let fields: HashMap<String, Vec<u8>> =
            redis::cmd("HGETALL").arg(key).query_async(&mut conn).await.map_err(e)?;
        Ok(parse(&fields))
    }

    async fn walk_delete(&self, token: &SessionToken, first: &str, now: Option<u64>) -> Result<bool> {
        let mut conn = self.conn.clone();
        let done: i64 = self
            .revoke
            .key(first)
            .arg(self.chain_prefix(token))
            .arg(MAX_WALK)
            .arg(now.map(|n| n.to_string()).unwrap_or_default())
            .invoke_async(&mut conn)
            .await
            .map_err(e)?;
        Ok(done == 1)
    }
}

fn number(fields: &HashMap<String, Vec<u8>>, name: &str) -> Option<u64> {
    std::str::from_utf8(fields.get(name)?).ok()?.parse().ok()
}

fn parse(fields: &HashMap<String, Vec<u8>>) -> Option<SessionRecord> {
    let rotated = match (number(fields, "r"), fields.get("s"), fields.get("x")) {
        (Some(at), Some(s), Some(x)) => {
            let successor = TokenHash::from_slice(&hex::decode(s).ok()?)?;
            Some(Rotated { at, successor, sealed: SealedSuccessor::from_slice(x)? })
        }
        _ => None,
    };
    Some(SessionRecord {
        meta: fields.get("m").and_then(|m| String::from_utf8(m.clone()).ok()).unwrap_or_default(),
        expires_at: number(fields, "e")?,
        deadline: number(fields, "d")?,
        ttl_ms: number(fields, "t")?,
        rotated,
    })
}

#[async_trait]
impl SessionStore for RedisSessions {
    fn backend(&self) -> &'static str {
        match self.conn {
            Conn::Single(_) => "redis",
            Conn::Cluster(_) => "redis-cluster",
        }
    }

    async fn create(&self, token: &SessionToken, r: &SessionRecord) -> Result<()> {
        let mut conn = self.conn.clone();
        let _: i64 = self
            .create
            .key(self.key(token, &token.hash()))
            .arg(&r.meta)
            .arg(r.expires_at)
            .arg(r.deadline)
            .arg(r.ttl_ms)
            .invoke_async(&mut conn)
            .await
            .map_err(e)?;
        Ok(())
    }

    async fn rotate(&self, req: &RotateRequest, policy: &RotationPolicy) -> Result<RotateOutcome> {
        let key = self.key(&req.presented, &req.presented.hash());
        for _ in 0..MAX_ATTEMPTS {
            let current = self.load(&key).await?;
            match decide(current.as_ref(), req, policy) {
                Decision::Rotate { rotated, successor_hash, successor } => {
                    let mut conn = self.conn.clone();
                    let applied: i64 = self
                        .rotate
                        .key(&key)
                        .key(self.key(&req.successor, &successor_hash))
                        .arg(rotated.at)
                        .arg(rotated.successor.to_hex())
                        .arg(rotated.sealed.as_bytes())
                        .arg(&successor.meta)
                        .arg(successor.expires_at)
                        .arg(successor.deadline)
                        .arg(successor.ttl_ms)
                        .invoke_async(&mut conn)
                        .await
                        .map_err(e)?;
                    if applied == 1 {
                        return Ok(RotateOutcome::Rotated { token: req.successor.clone(), record: successor });
                    }
                    // Rotated or deleted meanwhile: decide again on what is there now.
                }
                Decision::Replay { successor_hash, successor } => {
                    let next = self.load(&self.key(&successor, &successor_hash)).await?;
                    return Ok(match replay_answer(next.as_ref(), req.now) {
                        Some(record) => RotateOutcome::Replayed { token: successor, record: record.clone() },
                        None => RotateOutcome::Refused(Invalid::SuccessorGone),
                    });
                }
                Decision::RevokeChain { from } => {
                    self.walk_delete(&req.presented, &self.key(&req.presented, &from), None).await?;
                    return Ok(RotateOutcome::Revoked);
                }
                // Expired keys vanish on their own.
                Decision::Refuse { why, .. } => return Ok(RotateOutcome::Refused(why)),
                Decision::Reject(err) => return Ok(RotateOutcome::Rejected(err)),
            }
        }
        Err(StoreError::Conflict)
    }

    async fn end(&self, token: &SessionToken, now: u64) -> Result<bool> {
        self.walk_delete(token, &self.key(token, &token.hash()), Some(now)).await
    }

    async fn dump(&self, now: u64, after: Option<&str>, limit: usize) -> Result<DumpPage> {
        let (mut at, mut skip) = match after {
            None => (ScanAt { node: 0, cursor: 0 }, 0),
            Some(c) => parse_dump_cursor(c)
                .filter(|(at, _)| at.node < self.nodes.len())
                .ok_or_else(|| StoreError::InvalidInput("not a dump cursor of this store".into()))?,
        };
        let limit = limit.max(1);
        let pattern = format!("{}s:*", self.prefix);
        let mut entries = Vec::new();
        while at.node < self.nodes.len() {
            let url = &self.nodes[at.node];
            let client = redis::Client::open(url.as_str()).map_err(|err| StoreError::Config(err.to_string()))?;
            let mut node = client.get_multiplexed_async_connection().await.map_err(e)?;
            let primary = match self.conn {
                // Replicas hold copies of their primary's keys: scan primaries only.
                Conn::Cluster(_) => {
                    let role: Vec<Value> = redis::cmd("ROLE").query_async(&mut node).await.map_err(e)?;
                    matches!(role.first(), Some(Value::BulkString(b)) if b == b"master")
                }
                Conn::Single(_) => true,
            };
            if primary {
                loop {
                    let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                        .arg(at.cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(DUMP_SCAN_COUNT)
                        .query_async(&mut node)
                        .await
                        .map_err(e)?;
                    for (i, key) in keys.iter().enumerate().skip(skip) {
                        if entries.len() >= limit {
                            return Ok(DumpPage { entries, next: Some(dump_cursor(at, i)), records: None });
                        }
                        let fields: HashMap<String, Vec<u8>> =
                            redis::cmd("HGETALL").arg(key).query_async(&mut node).await.map_err(e)?;
                        if let Some(r) = parse(&fields).filter(|r| r.is_live(now)) {
                            entries.push(DumpEntry { expires_at: r.expires_at, deadline: r.deadline, meta: r.meta });
                        }
                    }
                    skip = 0;
                    if next == 0 {
                        break;
                    }
                    at.cursor = next;
                }
            }
            at = ScanAt { node: at.node + 1, cursor: 0 };
        }
        Ok(DumpPage { entries, next: None, records: None })
    }

    async fn purge(&self, _now: u64) -> Result<u64> {
        Ok(0)
    }

    async fn check(&self) -> Result<()> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut conn).await.map_err(e)?;
        Ok(())
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
    fn dump_cursors_round_trip() {
        let at = ScanAt { node: 2, cursor: 1234 };
        assert_eq!(parse_dump_cursor(&dump_cursor(at, 7)), Some((at, 7)));
        for bad in ["", "1", "1:2", "1:2:3:4", "x:1:2", "1:-2:3"] {
            assert_eq!(parse_dump_cursor(bad), None, "{bad}");
        }
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
