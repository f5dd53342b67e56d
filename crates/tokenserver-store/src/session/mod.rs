//! Session-token storage: the [`SessionStore`] trait and its backends (memory, SQLite,
//! PostgreSQL, Redis and Redis Cluster).
//!
//! Every backend keeps one record per token, keyed by the token's [`TokenHash`], and makes each call
//! atomic: the record is read, [`tokenserver_core::session::decide`] says what to do, and the
//! backend does it inside the same shard lock / transaction / guarded script. Rotation semantics
//! (grace window, reuse detection, expiry, metadata limits) are therefore the same everywhere.

pub mod memory;
pub mod postgres;
pub mod redis;
pub use crate::sqlite::session as sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use tokenserver_core::session::{
    decide, replay_answer, ChainId, Decision, Invalid, MetaError, RotateRequest, Rotated, RotationPolicy,
    SessionRecord, SessionToken, TokenHash,
};

use crate::{PoolSettings, StoreError};

/// Result of a session storage call.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The outcome of a rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RotateOutcome {
    /// The token was live: here is its successor.
    Rotated {
        /// The new token.
        token: SessionToken,
        /// Its record.
        record: SessionRecord,
    },
    /// A retry inside the grace window: the successor issued the first time.
    Replayed {
        /// The same successor as before.
        token: SessionToken,
        /// Its current record.
        record: SessionRecord,
    },
    /// The token is not usable; nothing was issued.
    Refused(Invalid),
    /// A rotated token was reused after the grace window: the session was revoked.
    Revoked,
    /// The merged metadata breaks a limit; nothing changed.
    Rejected(MetaError),
}

/// One live session in a dump (no token: tokens are never readable from a store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpEntry {
    /// Idle expiry, ms since the epoch.
    pub expires_at: u64,
    /// Absolute end, ms since the epoch.
    pub deadline: u64,
    /// Canonical JSON metadata.
    pub meta: String,
}

/// One page of a dump.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DumpPage {
    /// Live sessions, at most the limit asked for (Redis: a `SCAN` batch may add a few).
    pub entries: Vec<DumpEntry>,
    /// Where the next page starts; `None` on the last page. Opaque, backend-specific.
    pub next: Option<String>,
    /// Records stored, on the first page, when the backend knows it cheaply.
    pub records: Option<u64>,
}

/// Session storage. Each method is atomic on its own.
#[async_trait]
pub trait SessionStore: Send + Sync + std::fmt::Debug {
    /// Backend name for logs and metrics.
    fn backend(&self) -> &'static str;
    /// Stores a new session's first token.
    async fn create(&self, token: &SessionToken, record: &SessionRecord) -> Result<()>;
    /// Exchanges a token for its successor under `policy`.
    async fn rotate(&self, req: &RotateRequest, policy: &RotationPolicy) -> Result<RotateOutcome>;
    /// Ends the session `token` belongs to (its live token and the rotated ones after `token`).
    /// True when `token` was a known, unexpired token of the session.
    async fn end(&self, token: &SessionToken, now: u64) -> Result<bool>;
    /// A page of up to `limit` live sessions, starting where the page before ended (`after`,
    /// its [`DumpPage::next`]); [`StoreError::InvalidInput`] for a cursor this backend did not
    /// make. Memory per call is bounded by `limit`, however many sessions are stored.
    async fn dump(&self, now: u64, after: Option<&str>, limit: usize) -> Result<DumpPage>;
    /// Removes expired records; returns how many. Backends with native expiry return 0.
    async fn purge(&self, now: u64) -> Result<u64>;
    /// Reachability (health checks).
    async fn check(&self) -> Result<()>;
}

/// The token hash a SQL store's dump page starts after: the hex cursor of the page before, or
/// the lowest hash (empty) for the first page.
pub(crate) fn hash_cursor(after: Option<&str>) -> Result<Vec<u8>> {
    match after {
        None => Ok(Vec::new()),
        Some(cursor) => hex::decode(cursor)
            .ok()
            .filter(|h| h.len() == 32)
            .ok_or_else(|| StoreError::InvalidInput("not a dump cursor of this store".into())),
    }
}

/// Milliseconds since the UNIX epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The storage steps of a session call, for backends that run them synchronously inside their
/// own atomic section (a memory shard's lock, SQLite's single writer).
pub(crate) trait SessionOps {
    /// The record of `hash`.
    fn load(&mut self, hash: &TokenHash) -> Result<Option<SessionRecord>>;
    /// Inserts a record.
    fn insert(&mut self, hash: &TokenHash, chain: &ChainId, record: &SessionRecord) -> Result<()>;
    /// Marks a record rotated (dropping its metadata).
    fn mark_rotated(&mut self, hash: &TokenHash, rotated: &Rotated) -> Result<()>;
    /// Deletes one record.
    fn remove(&mut self, hash: &TokenHash) -> Result<()>;
    /// Deletes the session's records from `from` on (following successors, or by chain).
    fn revoke(&mut self, chain: &ChainId, from: &TokenHash) -> Result<()>;
}

/// Follows successor links from `from`, deleting each record (for a store that keeps no chain
/// index: every rotated record names its successor).
pub(crate) fn revoke_by_walking(ops: &mut impl SessionOps, from: &TokenHash) -> Result<()> {
    let mut next = Some(*from);
    // A chain is as long as the rotations within one idle lifetime; bound the walk regardless.
    for _ in 0..1_000_000 {
        let Some(hash) = next else { break };
        next = ops.load(&hash)?.and_then(|r| r.rotated.map(|rot| rot.successor));
        ops.remove(&hash)?;
    }
    Ok(())
}

/// Rotation over [`SessionOps`].
pub(crate) fn rotate_with(
    ops: &mut impl SessionOps,
    req: &RotateRequest,
    policy: &RotationPolicy,
) -> Result<RotateOutcome> {
    let hash = req.presented.hash();
    let record = ops.load(&hash)?;
    Ok(match decide(record.as_ref(), req, policy) {
        Decision::Rotate { rotated, successor_hash, successor } => {
            ops.mark_rotated(&hash, &rotated)?;
            ops.insert(&successor_hash, &req.successor.chain(), &successor)?;
            RotateOutcome::Rotated { token: req.successor.clone(), record: successor }
        }
        Decision::Replay { successor_hash, successor } => {
            let current = ops.load(&successor_hash)?;
            match replay_answer(current.as_ref(), req.now) {
                Some(record) => RotateOutcome::Replayed { token: successor, record: record.clone() },
                None => RotateOutcome::Refused(Invalid::SuccessorGone),
            }
        }
        Decision::RevokeChain { from } => {
            ops.revoke(&req.presented.chain(), &from)?;
            RotateOutcome::Revoked
        }
        Decision::Refuse { why, remove } => {
            if remove {
                ops.remove(&hash)?;
            }
            RotateOutcome::Refused(why)
        }
        Decision::Reject(e) => RotateOutcome::Rejected(e),
    })
}

/// Ending a session over [`SessionOps`].
pub(crate) fn end_with(ops: &mut impl SessionOps, token: &SessionToken, now: u64) -> Result<bool> {
    let hash = token.hash();
    let Some(record) = ops.load(&hash)? else { return Ok(false) };
    if !record.alive(now) {
        ops.remove(&hash)?;
        return Ok(false);
    }
    ops.revoke(&token.chain(), &hash)?;
    Ok(true)
}

/// The backend a session URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionBackend {
    /// `memory:` — in process, lost on restart.
    Memory,
    /// `sqlite:` — the default, durable.
    Sqlite,
    /// `postgres://`.
    Postgres,
    /// `redis://` / `rediss://`.
    Redis,
    /// `redis+cluster://host:port,host:port/`.
    RedisCluster,
}

impl SessionBackend {
    /// Recognises the URL scheme.
    pub fn from_url(url: &str) -> Result<Self> {
        let scheme = url.split_once(':').map(|(s, _)| s.to_ascii_lowercase()).unwrap_or_default();
        match scheme.as_str() {
            "memory" => Ok(Self::Memory),
            "sqlite" => Ok(Self::Sqlite),
            "postgres" | "postgresql" => Ok(Self::Postgres),
            "redis" | "rediss" => Ok(Self::Redis),
            "redis+cluster" | "rediss+cluster" => Ok(Self::RedisCluster),
            _ => Err(StoreError::Config(format!(
                "unsupported session store URL scheme {scheme:?}: use memory:, sqlite:, postgres://, redis:// or redis+cluster://"
            ))),
        }
    }
}

/// How the in-process store (`memory:`) is laid out and bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryOptions {
    /// Shards (rounded up to a power of two).
    pub shards: usize,
    /// Live sessions held at most; creates beyond fail with [`StoreError::Full`].
    pub max_sessions: u64,
}

impl Default for MemoryOptions {
    fn default() -> Self {
        Self { shards: 256, max_sessions: 10_000_000 }
    }
}

/// Opens the session store named by `url`.
pub async fn open(url: &str, pool: &PoolSettings, memory: MemoryOptions) -> Result<Arc<dyn SessionStore>> {
    Ok(match SessionBackend::from_url(url)? {
        SessionBackend::Memory => {
            Arc::new(memory::MemorySessions::new(memory.shards).with_max_sessions(memory.max_sessions))
        }
        SessionBackend::Sqlite => Arc::new(sqlite::SqliteSessions::open(url, pool.sqlite_durability).await?),
        SessionBackend::Postgres => Arc::new(postgres::PgSessions::open(url, pool).await?),
        SessionBackend::Redis => Arc::new(redis::RedisSessions::open(url).await?),
        SessionBackend::RedisCluster => Arc::new(redis::RedisSessions::open_cluster(url).await?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_schemes() {
        assert_eq!(SessionBackend::from_url("memory:").ok(), Some(SessionBackend::Memory));
        assert_eq!(SessionBackend::from_url("sqlite://x.db").ok(), Some(SessionBackend::Sqlite));
        assert_eq!(SessionBackend::from_url("postgresql://h/db").ok(), Some(SessionBackend::Postgres));
        assert_eq!(SessionBackend::from_url("redis://127.0.0.1/").ok(), Some(SessionBackend::Redis));
        assert_eq!(
            SessionBackend::from_url("redis+cluster://127.0.0.1:7001,127.0.0.1:7002").ok(),
            Some(SessionBackend::RedisCluster)
        );
        assert!(SessionBackend::from_url("mysql://x").is_err());
    }
}
