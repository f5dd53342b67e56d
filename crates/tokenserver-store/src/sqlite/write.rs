//! The SQLite write path for the request flow (allocation, user changes): the whole transaction
//! runs on the group-commit writer thread ([`super::group`]) through its `rusqlite` connection,
//! reusing the shared logic of `tx.rs`. Its steps never suspend (rusqlite is synchronous), so the
//! futures complete on the first poll; one thread hop per write instead of one per statement,
//! and concurrent writes share a commit. Each runs in its own savepoint after the ones before it
//! in the batch, so allocations stay serialized exactly as with one transaction each.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use async_trait::async_trait;
use tokenserver_core::sync::allocation::NodeState;
use tokenserver_core::sync::users::UserRow;

use super::group::{BatchObserver, GroupWriter};
use super::row_cache::{CommitWatch, RowCache};
use super::rusqlite_error;
use super::sync::sql;
use crate::sync::Result;
use crate::tx::{NewUser, SyncTx};
use crate::StoreError;

/// How long a write waits for SQLite's lock (another process, e.g. the CLI, writing).
const WRITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The single writer.
#[derive(Debug)]
pub(super) struct Writer {
    group: GroupWriter,
    rows: Option<Arc<RowCache>>,
}

/// The writer's connection inside `BEGIN IMMEDIATE` (and the call's savepoint).
pub(super) struct Tx<'a> {
    conn: &'a mut rusqlite::Connection,
}

fn e(err: rusqlite::Error) -> StoreError {
    rusqlite_error(err)
}

#[async_trait]
impl SyncTx for Tx<'_> {
    async fn service_id(&mut self, service: &str) -> Result<Option<i64>> {
        use rusqlite::OptionalExtension;
        let mut stmt = self.conn.prepare_cached(sql::SERVICE_ID).map_err(e)?;
        stmt.query_row([service], |r| r.get(0)).optional().map_err(e)
    }

    async fn lock_user(&mut self, _service_id: i64, _email: &str) -> Result<()> {
        // One writer, in BEGIN IMMEDIATE: nothing else can write meanwhile.
        Ok(())
    }

    async fn user_rows(&mut self, service: &str, email: &str) -> Result<Vec<UserRow>> {
        let mut stmt = self.conn.prepare_cached(sql::USER_ROWS).map_err(e)?;
        let rows = stmt.query_map((email, service), super::sync::user_row_rusqlite).map_err(e)?;
        rows.collect::<rusqlite::Result<_>>().map_err(e)
    }

    async fn lock_nodes(&mut self, service_id: i64) -> Result<Vec<NodeState>> {
        let mut stmt = self.conn.prepare_cached(sql::LOCK_NODES).map_err(e)?;
        let rows = stmt
            .query_map([service_id], |r| {
                Ok(NodeState {
                    id: r.get(0)?,
                    node: r.get(1)?,
                    available: r.get(2)?,
                    current_load: r.get(3)?,
                    capacity: r.get(4)?,
                    downed: r.get(5)?,
                    backoff: r.get(6)?,
                })
            })
            .map_err(e)?;
        rows.collect::<rusqlite::Result<_>>().map_err(e)
    }

    async fn set_available(&mut self, node_id: i64, available: i64) -> Result<()> {
        self.conn.prepare_cached(sql::RELEASE).and_then(|mut s| s.execute((available, node_id))).map_err(e)?;
        Ok(())
    }

    async fn add_user_to_node(&mut self, node_id: i64) -> Result<()> {
        self.conn.prepare_cached(sql::ADD_USER_TO_NODE).and_then(|mut s| s.execute([node_id])).map_err(e)?;
        Ok(())
    }

    async fn insert_user(&mut self, u: NewUser<'_>) -> Result<i64> {
        let mut stmt = self.conn.prepare_cached(sql::POST_USER).map_err(e)?;
        let params = (u.service_id, u.email, u.generation, u.client_state, u.created_at, u.node_id, u.keys_changed_at);
        stmt.query_row(params, |r| r.get(0)).map_err(e)
    }

    async fn put_user(&mut self, service_id: i64, email: &str, generation: i64, kca: Option<i64>) -> Result<()> {
        let mut stmt = self.conn.prepare_cached(sql::PUT_USER).map_err(e)?;
        stmt.execute((generation, kca, service_id, email, generation, kca)).map_err(e)?;
        Ok(())
    }

    async fn replace_others(&mut self, service_id: i64, email: &str, keep_uid: i64, now_ms: i64) -> Result<()> {
        let mut stmt = self.conn.prepare_cached(sql::REPLACE_OTHERS).map_err(e)?;
        stmt.execute((now_ms, service_id, email, keep_uid)).map_err(e)?;
        Ok(())
    }
}

/// Completes a future that never suspends (every step above is synchronous).
pub(super) fn run_now<T>(fut: impl Future<Output = Result<T>>) -> Result<T> {
    let mut fut = pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => Err(StoreError::Backend("a SQLite write step suspended".into())),
    }
}

impl Writer {
    /// Opens the writer's connections to `path` and starts its thread.
    /// `rows`: the user-row cache this writer keeps current (see [`super::row_cache`]).
    pub(super) fn open(path: &std::path::Path, rows: Option<Arc<RowCache>>) -> Result<Self> {
        let open = || -> rusqlite::Result<rusqlite::Connection> {
            let conn = rusqlite::Connection::open(path)?;
            conn.busy_timeout(WRITE_BUSY_TIMEOUT)?;
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            Ok(conn)
        };
        let conn = open().map_err(e)?;
        let checkpoints = open().map_err(e)?;
        let watch = rows.clone().map(|rows| Box::new(CommitWatch::new(rows)) as Box<dyn BatchObserver>);
        Ok(Self { group: GroupWriter::start("sync-writer", conn, Some(checkpoints), watch)?, rows })
    }

    /// Runs `step` in the writer's transaction; it is kept if it succeeded and the caller is
    /// still waiting (a request timeout that dropped the future rolls it back).
    /// `key` (service, email) names the user whose rows `step` may change.
    pub(super) async fn run<T: Send + 'static>(
        &self,
        key: (String, String),
        step: impl FnOnce(&mut Tx, &str, &str) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let cache = self.rows.clone();
        self.group
            .call(move |conn| {
                let mut tx = Tx { conn };
                let out = step(&mut tx, &key.0, &key.1);
                if let Some(cache) = &cache {
                    // The user's rows as this call leaves them, read on the writer's warm
                    // connection, so the next request for the user needs no read of its own.
                    let rows = match &out {
                        Ok(_) => run_now(tx.user_rows(&key.0, &key.1)).ok().map(Arc::from),
                        Err(_) => None,
                    };
                    cache.touch((&key.0, &key.1), rows);
                }
                out
            })
            .await
    }
}
