//! SQLite session store (the default): durable in WAL mode, every call on one writer.
//!
//! Session calls are all small writes, so every one goes to the database's group-commit writer
//! ([`super::group`], shared with the Sync store when both live in one file): under load one
//! commit carries many rotations; alone, a call commits at once. A restart loses nothing that
//! was answered (`synchronous = NORMAL` in WAL survives a process crash; a power cut may lose
//! the last commits).
//!
//! Rows are keyed by the token hash, which starts with the token's issue time
//! ([`tokenserver_core::session::token`]): new tokens go to the right edge of the table, and so do
//! the recently issued tokens that active sessions rotate, so one commit of many rotations writes
//! a few pages rather than one page per session (bench/results/tuning-notes.md). Revocation
//! follows successor links, as in the Redis store. The expiry index grows at its right edge too
//! (expiry = now + lifetime).

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};
use tokenserver_core::session::{
    ChainId, RotateOutcome, RotateRequest, Rotated, RotationPolicy, SessionRecord, SessionToken, TokenHash,
};

use super::group::{GroupWriter, Span};
use super::SqliteStore;
use crate::ready::run_now;
use crate::session::{end_with, revoke_by_walking, rotate, DumpEntry, DumpPage, Result, SessionOps, SessionStore};
use crate::StoreError;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS tokenserver_sessions (
    token_hash BLOB PRIMARY KEY NOT NULL,
    meta TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    deadline INTEGER NOT NULL,
    ttl_ms INTEGER NOT NULL,
    rotated_at INTEGER,
    successor BLOB,
    sealed BLOB
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tokenserver_sessions_expiry_idx ON tokenserver_sessions (expires_at);
"#;

/// Earlier layouts had a session-id column: the first keyed rows by token hash with a session-id
/// index, the second by (session id, token hash). Such a table is moved aside, recreated with
/// [`SCHEMA`] and copied back on open (in key order). Its indexes are dropped first: they would
/// keep their names on the renamed table and stop `SCHEMA` from creating them.
const MOVE_EARLIER_LAYOUT_ASIDE: &str = r#"
DROP INDEX IF EXISTS tokenserver_sessions_chain_idx;
DROP INDEX IF EXISTS tokenserver_sessions_expiry_idx;
ALTER TABLE tokenserver_sessions RENAME TO tokenserver_sessions_earlier;
"#;
const COPY_EARLIER_LAYOUT_BACK: &str = r#"
INSERT INTO tokenserver_sessions
    SELECT token_hash, meta, expires_at, deadline, ttl_ms, rotated_at, successor, sealed
    FROM tokenserver_sessions_earlier ORDER BY token_hash;
DROP TABLE tokenserver_sessions_earlier;
"#;

const LOAD: &str = "SELECT meta, expires_at, deadline, ttl_ms, rotated_at, successor, sealed \
                    FROM tokenserver_sessions WHERE token_hash = ?1";
const INSERT: &str = "INSERT INTO tokenserver_sessions (token_hash, meta, expires_at, deadline, ttl_ms) \
                      VALUES (?1, ?2, ?3, ?4, ?5)";
const MARK_ROTATED: &str = "UPDATE tokenserver_sessions SET meta = '', rotated_at = ?2, successor = ?3, sealed = ?4 \
                            WHERE token_hash = ?1";
const REMOVE: &str = "DELETE FROM tokenserver_sessions WHERE token_hash = ?1";
const DUMP: &str = "SELECT expires_at, deadline, meta, token_hash FROM tokenserver_sessions \
                    WHERE token_hash > ?2 AND rotated_at IS NULL AND expires_at > ?1 AND deadline > ?1 \
                    ORDER BY token_hash LIMIT ?3";
const COUNT: &str = "SELECT COUNT(*) FROM tokenserver_sessions";
const PURGE: &str = "DELETE FROM tokenserver_sessions WHERE token_hash IN \
                     (SELECT token_hash FROM tokenserver_sessions WHERE expires_at <= ?1 LIMIT ?2)";

fn e(err: rusqlite::Error) -> StoreError {
    super::rusqlite_error(err)
}

/// Reads a row of [`LOAD`].
fn record(row: &rusqlite::Row<'_>) -> rusqlite::Result<SessionRecord> {
    let rotated_at: Option<i64> = row.get(4)?;
    let successor: Option<Vec<u8>> = row.get(5)?;
    let sealed: Option<Vec<u8>> = row.get(6)?;
    let rotated = Rotated::from_columns(rotated_at, successor.as_deref(), sealed.as_deref());
    Ok(SessionRecord {
        meta: row.get(0)?,
        expires_at: row.get::<_, i64>(1)? as u64,
        deadline: row.get::<_, i64>(2)? as u64,
        ttl_ms: row.get::<_, i64>(3)? as u64,
        rotated,
    })
}

/// One call's steps, on the writer's connection.
struct Ops<'a> {
    conn: &'a mut Connection,
}

impl SessionOps for Ops<'_> {
    fn load(&mut self, hash: &TokenHash) -> Result<Option<SessionRecord>> {
        let mut stmt = self.conn.prepare_cached(LOAD).map_err(e)?;
        stmt.query_row([&hash.0[..]], record).optional().map_err(e)
    }

    fn insert(&mut self, hash: &TokenHash, _chain: &ChainId, r: &SessionRecord) -> Result<()> {
        let mut stmt = self.conn.prepare_cached(INSERT).map_err(e)?;
        stmt.execute(params![&hash.0[..], r.meta, r.expires_at as i64, r.deadline as i64, r.ttl_ms as i64])
            .map_err(e)?;
        Ok(())
    }

    fn mark_rotated(&mut self, hash: &TokenHash, rot: &Rotated) -> Result<()> {
        let mut stmt = self.conn.prepare_cached(MARK_ROTATED).map_err(e)?;
        stmt.execute(params![&hash.0[..], rot.at as i64, &rot.successor.0[..], rot.sealed.as_bytes()]).map_err(e)?;
        Ok(())
    }

    fn remove(&mut self, hash: &TokenHash) -> Result<()> {
        let mut stmt = self.conn.prepare_cached(REMOVE).map_err(e)?;
        stmt.execute([&hash.0[..]]).map_err(e)?;
        Ok(())
    }

    fn revoke(&mut self, _chain: &ChainId, from: &TokenHash) -> Result<()> {
        revoke_by_walking(self, from)
    }
}

/// The SQLite session store.
#[derive(Debug, Clone)]
pub struct SqliteSessions {
    writer: GroupWriter,
}

/// Creates the table, or brings an older layout up to date (inside the writer's transaction).
fn prepare_schema(conn: &Connection) -> Result<()> {
    let earlier_layout: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM pragma_table_info('tokenserver_sessions') WHERE name = 'chain')",
            [],
            |r| r.get(0),
        )
        .map_err(e)?;
    if earlier_layout {
        conn.execute_batch(&format!("{MOVE_EARLIER_LAYOUT_ASIDE} {SCHEMA} {COPY_EARLIER_LAYOUT_BACK}")).map_err(e)?;
        tracing::info!("session table rewritten keyed by token hash alone");
    }
    conn.execute_batch(SCHEMA).map_err(e)
}

impl SqliteSessions {
    /// The session store of the database `db` opened, on its writer (one writer per file: Sync
    /// and session writes share its commits). Creates the table, or upgrades an earlier layout.
    pub async fn on(db: &SqliteStore) -> Result<Self> {
        let store = Self { writer: db.writer().clone() };
        store.call(Span::Long, |conn| prepare_schema(conn)).await?;
        Ok(store)
    }

    async fn call<T: Send + 'static>(
        &self,
        span: Span,
        f: impl FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.writer.call(span, f).await
    }
}

#[async_trait]
impl SessionStore for SqliteSessions {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn create(&self, token: &SessionToken, record: &SessionRecord) -> Result<()> {
        let (hash, chain, record) = (token.hash(), token.chain(), record.clone());
        self.call(Span::Short, move |conn| Ops { conn }.insert(&hash, &chain, &record)).await
    }

    async fn rotate(&self, req: &RotateRequest, policy: &RotationPolicy) -> Result<RotateOutcome> {
        let (req, policy) = (req.clone(), *policy);
        self.call(Span::Short, move |conn| run_now(rotate(&mut Ops { conn }, &req, &policy))).await
    }

    async fn end(&self, token: &SessionToken, now: u64) -> Result<bool> {
        let token = token.clone();
        self.call(Span::Short, move |conn| end_with(&mut Ops { conn }, &token, now)).await
    }

    async fn dump(&self, now: u64, after: Option<&str>, limit: usize) -> Result<DumpPage> {
        let first = after.is_none();
        let from = crate::hash_cursor(after)?;
        let limit = limit.max(1);
        // A page, and on the first the count of every record.
        self.call(Span::Long, move |conn| {
            let mut stmt = conn.prepare_cached(DUMP).map_err(e)?;
            let mut last = None;
            let rows = stmt
                .query_map(params![now as i64, &from[..], limit as i64], |r| {
                    Ok((
                        DumpEntry {
                            expires_at: r.get::<_, i64>(0)? as u64,
                            deadline: r.get::<_, i64>(1)? as u64,
                            meta: r.get(2)?,
                        },
                        r.get::<_, Vec<u8>>(3)?,
                    ))
                })
                .map_err(e)?;
            let mut entries = Vec::new();
            for row in rows {
                let (entry, hash) = row.map_err(e)?;
                entries.push(entry);
                last = Some(hash);
            }
            let next = last.filter(|_| entries.len() >= limit).map(hex::encode);
            let records =
                if first { Some(conn.query_row(COUNT, [], |r| r.get::<_, i64>(0)).map_err(e)? as u64) } else { None };
            Ok(DumpPage { entries, next, records })
        })
        .await
    }

    async fn purge_batch(&self, now: u64, max: u64) -> Result<u64> {
        let n = self
            .call(Span::Long, move |conn| {
                conn.prepare_cached(PURGE).and_then(|mut s| s.execute(params![now as i64, max as i64])).map_err(e)
            })
            .await?;
        Ok(n as u64)
    }

    async fn check(&self) -> Result<()> {
        self.call(Span::Short, |conn| conn.query_row("SELECT 1", [], |_| Ok(())).map_err(e)).await
    }
}
