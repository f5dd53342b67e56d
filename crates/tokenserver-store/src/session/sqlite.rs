//! SQLite session store (the default): durable in WAL mode, every call on one writer thread.
//!
//! Session calls are all small writes, so they go to a dedicated thread that owns one
//! connection and commits them in groups: it takes every call waiting in its queue (up to
//! [`MAX_BATCH`]), runs each inside its own savepoint, commits once, and only then answers.
//! Under load one commit carries many rotations; alone, a call commits at once. A restart loses
//! nothing that was answered (`synchronous = NORMAL` in WAL survives a process crash; a power cut
//! may lose the last commits).
//!
//! Rows are keyed by (session id, token hash), so a session's records sit side by side: a
//! rotation reads, updates and inserts on one leaf page, and revocation is a key-range delete.
//! The expiry index grows at its right edge (expiry = now + lifetime). Checkpoints (copying the
//! WAL back into the database, with an fsync) run on a thread of their own so that the writer
//! never waits for one.

use std::str::FromStr;
use std::sync::mpsc;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};
use tokenserver_core::session::{
    ChainId, RotateRequest, Rotated, RotationPolicy, SessionRecord, SessionToken, TokenHash,
};
use tokio::sync::oneshot;

use super::{end_with, rotate_with, DumpEntry, Result, RotateOutcome, SessionOps, SessionStore};
use crate::StoreError;

/// Most calls committed together.
const MAX_BATCH: usize = 512;
/// Expired records deleted per purge statement (keeps each writer turn short).
const PURGE_BATCH: i64 = 10_000;
/// How often the checkpointer looks at the WAL.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);
/// Page cache of the writer, KiB (negative `cache_size`): the hot part of the table stays in it.
const CACHE_KIB: i64 = 65_536;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS tokenserver_sessions (
    chain BLOB NOT NULL,
    token_hash BLOB NOT NULL,
    meta TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    deadline INTEGER NOT NULL,
    ttl_ms INTEGER NOT NULL,
    rotated_at INTEGER,
    successor BLOB,
    sealed BLOB,
    PRIMARY KEY (chain, token_hash)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tokenserver_sessions_expiry_idx ON tokenserver_sessions (expires_at);
"#;

/// The first layout (keyed by token hash alone, with a separate session-id index) is rewritten
/// into the current one on open.
const MIGRATE_FROM_HASH_KEY: &str = r#"
CREATE TABLE tokenserver_sessions_new (
    chain BLOB NOT NULL,
    token_hash BLOB NOT NULL,
    meta TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    deadline INTEGER NOT NULL,
    ttl_ms INTEGER NOT NULL,
    rotated_at INTEGER,
    successor BLOB,
    sealed BLOB,
    PRIMARY KEY (chain, token_hash)
) WITHOUT ROWID;
INSERT INTO tokenserver_sessions_new
    SELECT chain, token_hash, meta, expires_at, deadline, ttl_ms, rotated_at, successor, sealed
    FROM tokenserver_sessions;
DROP TABLE tokenserver_sessions;
ALTER TABLE tokenserver_sessions_new RENAME TO tokenserver_sessions;
"#;

const LOAD: &str = "SELECT meta, expires_at, deadline, ttl_ms, rotated_at, successor, sealed \
                    FROM tokenserver_sessions WHERE chain = ?1 AND token_hash = ?2";
const INSERT: &str = "INSERT INTO tokenserver_sessions (chain, token_hash, meta, expires_at, deadline, ttl_ms) \
                      VALUES (?1, ?2, ?3, ?4, ?5, ?6)";
const MARK_ROTATED: &str = "UPDATE tokenserver_sessions SET meta = '', rotated_at = ?3, successor = ?4, sealed = ?5 \
                            WHERE chain = ?1 AND token_hash = ?2";
const REMOVE: &str = "DELETE FROM tokenserver_sessions WHERE chain = ?1 AND token_hash = ?2";
const REVOKE: &str = "DELETE FROM tokenserver_sessions WHERE chain = ?1";
const DUMP: &str = "SELECT expires_at, deadline, meta FROM tokenserver_sessions \
                    WHERE rotated_at IS NULL AND expires_at > ?1 AND deadline > ?1 LIMIT ?2";
const COUNT: &str = "SELECT COUNT(*) FROM tokenserver_sessions";
const PURGE: &str = "DELETE FROM tokenserver_sessions WHERE (chain, token_hash) IN \
                     (SELECT chain, token_hash FROM tokenserver_sessions WHERE expires_at <= ?1 LIMIT ?2)";

fn e(err: rusqlite::Error) -> StoreError {
    super::super::sqlite::rusqlite_error(err)
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

/// One call's steps. Every record a call touches belongs to the session `chain` (a rotation's
/// successor shares its predecessor's session id).
struct Ops<'a> {
    conn: &'a Connection,
    chain: ChainId,
}

impl SessionOps for Ops<'_> {
    fn load(&mut self, hash: &TokenHash) -> Result<Option<SessionRecord>> {
        let mut stmt = self.conn.prepare_cached(LOAD).map_err(e)?;
        stmt.query_row(params![&self.chain.0[..], &hash.0[..]], record).optional().map_err(e)
    }

    fn insert(&mut self, hash: &TokenHash, chain: &ChainId, r: &SessionRecord) -> Result<()> {
        let mut stmt = self.conn.prepare_cached(INSERT).map_err(e)?;
        stmt.execute(params![
            &chain.0[..],
            &hash.0[..],
            r.meta,
            r.expires_at as i64,
            r.deadline as i64,
            r.ttl_ms as i64
        ])
        .map_err(e)?;
        Ok(())
    }

    fn mark_rotated(&mut self, hash: &TokenHash, rot: &Rotated) -> Result<()> {
        let mut stmt = self.conn.prepare_cached(MARK_ROTATED).map_err(e)?;
        stmt.execute(params![&self.chain.0[..], &hash.0[..], rot.at as i64, &rot.successor.0[..], &rot.sealed.0[..]])
            .map_err(e)?;
        Ok(())
    }

    fn remove(&mut self, hash: &TokenHash) -> Result<()> {
        let mut stmt = self.conn.prepare_cached(REMOVE).map_err(e)?;
        stmt.execute(params![&self.chain.0[..], &hash.0[..]]).map_err(e)?;
        Ok(())
    }

    fn revoke(&mut self, chain: &ChainId, _from: &TokenHash) -> Result<()> {
        self.conn.prepare_cached(REVOKE).and_then(|mut s| s.execute([&chain.0[..]])).map_err(e)?;
        Ok(())
    }
}

/// Hands a finished call its answer once the batch's commit outcome is known.
type Deliver = Box<dyn FnOnce(Option<StoreError>) + Send>;
/// A queued call: runs on the writer's connection (`None`: the transaction could not start),
/// says whether it failed, and how to answer.
type Job = Box<dyn FnOnce(Option<&Connection>) -> (bool, Deliver) + Send>;

/// The SQLite session store.
#[derive(Debug, Clone)]
pub struct SqliteSessions {
    jobs: mpsc::Sender<Job>,
}

/// The database file a URL names (`None`: in memory).
fn file_of(url: &str) -> Result<Option<std::path::PathBuf>> {
    if url.contains(":memory:") || url.contains("mode=memory") {
        return Ok(None);
    }
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)
        .map_err(|err| StoreError::Config(format!("invalid SQLite URL: {err}")))?;
    Ok(Some(options.get_filename().to_path_buf()))
}

fn open_connection(file: Option<&std::path::Path>) -> Result<Connection> {
    let conn = match file {
        None => Connection::open_in_memory().map_err(e)?,
        Some(path) => Connection::open(path).map_err(e)?,
    };
    conn.busy_timeout(Duration::from_secs(5)).map_err(e)?;
    conn.pragma_update(None, "journal_mode", "WAL").map_err(e)?;
    conn.pragma_update(None, "synchronous", "NORMAL").map_err(e)?;
    Ok(conn)
}

/// Creates the table, or brings an older layout up to date.
fn prepare_schema(conn: &Connection) -> Result<()> {
    let old_layout: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'tokenserver_sessions_chain_idx')",
            [],
            |r| r.get(0),
        )
        .map_err(e)?;
    if old_layout {
        conn.execute_batch(&format!("BEGIN IMMEDIATE; {MIGRATE_FROM_HASH_KEY} {SCHEMA} COMMIT;")).map_err(|err| {
            let _ = conn.execute_batch("ROLLBACK");
            e(err)
        })?;
        tracing::info!("session table rewritten with (session id, token hash) keys");
    }
    conn.execute_batch(SCHEMA).map_err(e)
}

/// Copies the WAL back into the database every [`CHECKPOINT_EVERY`], on its own connection
/// (a passive checkpoint never blocks the writer), until the writer stops.
fn checkpoint_loop(conn: Connection, stop: mpsc::Receiver<()>) {
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY) {
        if let Err(err) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %err, "session store checkpoint failed");
        }
    }
}

/// Runs one of the writer's transaction-control statements (prepared once).
fn control(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

fn writer_loop(conn: Connection, jobs: mpsc::Receiver<Job>) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if let Err(err) = control(&conn, "BEGIN IMMEDIATE") {
            let msg = err.to_string();
            for job in batch {
                let (_, deliver) = job(None);
                deliver(Some(StoreError::Unavailable(msg.clone())));
            }
            let _ = conn.execute_batch("ROLLBACK");
            continue;
        }
        let mut answers = Vec::with_capacity(batch.len());
        for job in batch {
            let ok = control(&conn, "SAVEPOINT call").is_ok();
            let (failed, deliver) = job(Some(&conn));
            if ok {
                if failed {
                    let _ = control(&conn, "ROLLBACK TO call");
                }
                let _ = control(&conn, "RELEASE call");
            }
            answers.push(deliver);
        }
        let commit = control(&conn, "COMMIT").err().map(|err| err.to_string());
        if commit.is_some() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        for deliver in answers {
            deliver(commit.as_ref().map(|m| StoreError::Unavailable(m.clone())));
        }
    }
}

impl SqliteSessions {
    /// Opens (creating if missing) the database at `url` and starts its writer thread (and, for
    /// a file, its checkpointer).
    pub async fn open(url: &str) -> Result<Self> {
        let file = file_of(url)?;
        let opened = file.clone();
        let (conn, checkpointer) = tokio::task::spawn_blocking(move || -> Result<_> {
            let conn = open_connection(opened.as_deref())?;
            prepare_schema(&conn)?;
            conn.pragma_update(None, "cache_size", -CACHE_KIB).map_err(e)?;
            let checkpointer = match &opened {
                Some(path) => {
                    // The checkpointer does this connection's checkpoints; the WAL file is cut
                    // back after each reset so a burst does not leave it large.
                    conn.pragma_update(None, "wal_autocheckpoint", 0).map_err(e)?;
                    conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024).map_err(e)?;
                    Some(open_connection(Some(path))?)
                }
                None => None,
            };
            Ok((conn, checkpointer))
        })
        .await
        .map_err(|err| StoreError::Backend(format!("open task failed: {err}")))??;
        let (tx, rx) = mpsc::channel::<Job>();
        // The checkpointer stops when the writer does (its `stop` sender is dropped).
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        if let Some(cp) = checkpointer {
            std::thread::Builder::new()
                .name("session-checkpoint".into())
                .spawn(move || checkpoint_loop(cp, stop_rx))
                .map_err(|err| StoreError::Backend(format!("cannot start the session checkpointer: {err}")))?;
        }
        std::thread::Builder::new()
            .name("session-writer".into())
            .spawn(move || {
                writer_loop(conn, rx);
                drop(stop_tx);
            })
            .map_err(|err| StoreError::Backend(format!("cannot start the session writer: {err}")))?;
        Ok(Self { jobs: tx })
    }

    async fn call<T: Send + 'static>(&self, f: impl FnOnce(&Connection) -> Result<T> + Send + 'static) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let out = match conn {
                Some(conn) => f(conn),
                None => Err(StoreError::Unavailable("the transaction could not start".into())),
            };
            let failed = out.is_err();
            let deliver: Deliver = Box::new(move |commit_error| {
                let _ = tx.send(match commit_error {
                    Some(err) => Err(err),
                    None => out,
                });
            });
            (failed, deliver)
        });
        self.jobs.send(job).map_err(|_| StoreError::Unavailable("the session writer stopped".into()))?;
        rx.await.map_err(|_| StoreError::Unavailable("the session writer stopped".into()))?
    }
}

#[async_trait]
impl SessionStore for SqliteSessions {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn create(&self, token: &SessionToken, record: &SessionRecord) -> Result<()> {
        let (hash, chain, record) = (token.hash(), token.chain(), record.clone());
        self.call(move |conn| Ops { conn, chain }.insert(&hash, &chain, &record)).await
    }

    async fn rotate(&self, req: &RotateRequest, policy: &RotationPolicy) -> Result<RotateOutcome> {
        let (req, policy) = (req.clone(), *policy);
        self.call(move |conn| rotate_with(&mut Ops { conn, chain: req.presented.chain() }, &req, &policy)).await
    }

    async fn end(&self, token: &SessionToken, now: u64) -> Result<bool> {
        let token = token.clone();
        self.call(move |conn| end_with(&mut Ops { conn, chain: token.chain() }, &token, now)).await
    }

    async fn dump(&self, now: u64, limit: usize) -> Result<(Vec<DumpEntry>, Option<u64>)> {
        self.call(move |conn| {
            let mut stmt = conn.prepare_cached(DUMP).map_err(e)?;
            let rows = stmt
                .query_map(params![now as i64, limit as i64], |r| {
                    Ok(DumpEntry {
                        expires_at: r.get::<_, i64>(0)? as u64,
                        deadline: r.get::<_, i64>(1)? as u64,
                        meta: r.get(2)?,
                    })
                })
                .map_err(e)?;
            let entries = rows.collect::<rusqlite::Result<Vec<_>>>().map_err(e)?;
            let count: i64 = conn.query_row(COUNT, [], |r| r.get(0)).map_err(e)?;
            Ok((entries, Some(count as u64)))
        })
        .await
    }

    async fn purge(&self, now: u64) -> Result<u64> {
        let mut total = 0u64;
        loop {
            let n = self
                .call(move |conn| {
                    conn.prepare_cached(PURGE).and_then(|mut s| s.execute(params![now as i64, PURGE_BATCH])).map_err(e)
                })
                .await?;
            total += n as u64;
            if (n as i64) < PURGE_BATCH {
                return Ok(total);
            }
        }
    }

    async fn check(&self) -> Result<()> {
        self.call(|conn| conn.query_row("SELECT 1", [], |_| Ok(())).map_err(e)).await
    }
}
