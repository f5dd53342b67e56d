//! The SQLite write path for the request flow (allocation, user changes): the whole transaction
//! runs on a blocking thread through one `rusqlite` connection, reusing the shared logic of
//! `tx.rs`. Its steps never suspend (rusqlite is synchronous), so the futures complete on the
//! first poll; one thread hop per write instead of one per statement.

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use async_trait::async_trait;
use tokenserver_core::sync::allocation::NodeState;
use tokenserver_core::sync::users::UserRow;

use super::rusqlite_error;
use super::sync::sql;
use crate::sync::Result;
use crate::tx::{NewUser, SyncTx};
use crate::StoreError;

/// How long a write waits for SQLite's lock (another process, e.g. the CLI, writing).
const WRITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The single writer connection (opened on first use).
#[derive(Debug)]
pub(super) struct Writer {
    path: std::path::PathBuf,
    conn: Mutex<Option<rusqlite::Connection>>,
}

/// A connection inside `BEGIN IMMEDIATE`.
pub(super) struct Tx {
    conn: rusqlite::Connection,
}

fn e(err: rusqlite::Error) -> StoreError {
    rusqlite_error(err)
}

#[async_trait]
impl SyncTx for Tx {
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

/// Sets the flag when the request's future is dropped (e.g. by the request timeout).
struct Abandoned(Arc<AtomicBool>);

impl Drop for Abandoned {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl Writer {
    pub(super) fn new(path: std::path::PathBuf) -> Self {
        Self { path, conn: Mutex::new(None) }
    }

    fn open(&self) -> rusqlite::Result<rusqlite::Connection> {
        let conn = rusqlite::Connection::open(&self.path)?;
        conn.busy_timeout(WRITE_BUSY_TIMEOUT)?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        Ok(conn)
    }

    /// Runs `step` in a `BEGIN IMMEDIATE` transaction on a blocking thread and commits if it
    /// succeeded — unless the caller gave up meanwhile (its future was dropped, e.g. by the
    /// request timeout), in which case it rolls back.
    pub(super) async fn run<T: Send + 'static>(
        self: &Arc<Self>,
        step: impl FnOnce(&mut Tx) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let abandoned = Arc::new(AtomicBool::new(false));
        let guard = Abandoned(abandoned.clone());
        let writer = self.clone();
        let out = tokio::task::spawn_blocking(move || {
            let mut slot = match writer.conn.lock() {
                Ok(s) => s,
                Err(poisoned) => poisoned.into_inner(),
            };
            let conn = match slot.take() {
                Some(c) => c,
                None => writer.open().map_err(e)?,
            };
            if let Err(err) = conn.execute_batch("BEGIN IMMEDIATE") {
                *slot = Some(conn);
                return Err(e(err));
            }
            let mut tx = Tx { conn };
            let result = step(&mut tx);
            let finish = match &result {
                Ok(_) if !abandoned.load(Ordering::Relaxed) => "COMMIT",
                _ => "ROLLBACK",
            };
            let done = tx.conn.execute_batch(finish);
            *slot = Some(tx.conn);
            done.map_err(e)?;
            if finish == "ROLLBACK" && result.is_ok() {
                return Err(StoreError::Unavailable("request abandoned before commit".into()));
            }
            result
        })
        .await
        .map_err(|err| StoreError::Backend(format!("write task failed: {err}")))?;
        drop(guard);
        out
    }
}
