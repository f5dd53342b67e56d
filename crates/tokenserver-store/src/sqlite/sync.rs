//! `SyncStore` for SQLite. Writes run on the group-commit writer ([`super::group`]) through its
//! `rusqlite` connection, reusing the transactional logic of `tx.rs`: its steps never suspend
//! (rusqlite is synchronous), so the futures complete on the first poll, and one call to the
//! writer serves a whole write. Concurrent writes share a commit, each in its own savepoint after
//! the ones before it in the batch, so allocations stay serialized exactly as with one
//! transaction each. Reads run inline (or, in memory, on the writer). Each write says whether it
//! is one user's ([`Span::Short`]: its batch may run on a request worker) or may run long
//! ([`Span::Long`]: node operations, the schema).

use std::sync::Arc;

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension};
use tokenserver_core::sync::allocation::NodeState;
use tokenserver_core::sync::users::UserRow;

use super::group::Span;
use super::{rusqlite_error as e, SqliteStore, MIGRATIONS};
use crate::ready::run_now;
use crate::sql::migrate::{Existing, Migration};
use crate::sql::tx::{self, NewUser, SyncTx};
use crate::sql::SyncSql;
use crate::sync::{
    node_record, Allocate, BucketRecord, MigrationReport, NewNode, NodeChange, NodeRecord, NodeUsers, OldRecord,
    OldRecordsQuery, OwnedAllocate, OwnedUserChange, Result, SyncStore, UserChange,
};
use crate::StoreError;

/// SQLite's statements for the Sync store.
pub(crate) struct SqliteSql;

impl crate::sql::SyncSql for SqliteSql {
    /// One writer runs every write: nothing to lock.
    const LOCK_USER: Option<&'static str> = None;

    const EXISTING_TABLES: &'static str = "SELECT name FROM sqlite_master WHERE type = 'table' \
        AND name IN ('services', 'nodes', 'users', '__diesel_schema_migrations')";

    const APPLIED_VERSIONS: &'static str = "SELECT version FROM __diesel_schema_migrations";

    const RECORD_VERSION: &'static str = "INSERT INTO __diesel_schema_migrations (version) VALUES (?)";

    const SERVICE_ID: &'static str = "SELECT id FROM services WHERE service = ?";

    /// Plans pinned: with statistics (after an `ANALYZE`) SQLite plans the node `LEFT JOIN` as a
    /// scan of `unique_idx`; rowid subqueries give the same columns (NULL when the node is gone)
    /// with a lookup whatever the statistics.
    const USER_ROWS: &'static str = "SELECT users.uid, (SELECT id FROM nodes WHERE id = users.nodeid), \
        (SELECT node FROM nodes WHERE id = users.nodeid), users.generation, users.keys_changed_at, \
        users.client_state, users.created_at, users.replaced_at \
        FROM users INDEXED BY lookup_idx \
        WHERE users.email = ? AND users.service = (SELECT id FROM services WHERE service = ?) \
        ORDER BY users.created_at DESC, users.uid DESC LIMIT 20";

    const LOCK_NODES: &'static str = "SELECT id, node, available, current_load, capacity, downed, backoff \
        FROM nodes WHERE service = ? ORDER BY id";

    const RELEASE: &'static str = "UPDATE nodes SET available = ? WHERE id = ?";

    const ADD_USERS_TO_NODE: &'static str =
        "UPDATE nodes SET current_load = current_load + ?1, available = MAX(available - ?2, 0) WHERE id = ?3";

    const POST_USER: &'static str = "INSERT INTO users \
        (service, email, generation, client_state, created_at, nodeid, keys_changed_at, replaced_at) \
        VALUES (?, ?, ?, ?, ?, ?, ?, NULL) RETURNING uid";

    // SQLite's planner, without statistics, prefers replaced_at_idx (service, replaced_at) for
    // these, i.e. a scan of every live user of the service: the writes that filter by email are
    // pinned to lookup_idx (email, service, created_at).
    const PUT_USER: &'static str = "UPDATE users INDEXED BY lookup_idx SET generation = ?, keys_changed_at = ? \
        WHERE service = ? AND email = ? AND generation <= ? \
        AND COALESCE(keys_changed_at, 0) <= COALESCE(?, keys_changed_at, 0) AND replaced_at IS NULL";

    const REPLACE_OTHERS: &'static str = "UPDATE users INDEXED BY lookup_idx SET replaced_at = ? \
        WHERE service = ? AND email = ? AND replaced_at IS NULL AND uid <> ?";

    const REPLACE_USER: &'static str = "UPDATE users SET replaced_at = ? \
        WHERE service = (SELECT id FROM services WHERE service = ?) AND uid = ? AND replaced_at IS NULL";

    const RETIRE_USER: &'static str = "UPDATE users INDEXED BY lookup_idx SET generation = ?, replaced_at = ? \
        WHERE service = (SELECT id FROM services WHERE service = ?) AND email = ? AND replaced_at IS NULL";

    const UPDATE_USER_GENERATION: &'static str =
        "UPDATE users INDEXED BY lookup_idx SET generation = COALESCE(?, generation), \
        keys_changed_at = COALESCE(?, keys_changed_at) \
        WHERE service = (SELECT id FROM services WHERE service = ?) AND email = ? \
        AND generation <= COALESCE(?, generation) \
        AND COALESCE(keys_changed_at, 0) <= COALESCE(?, keys_changed_at, 0) AND replaced_at IS NULL";

    const INSERT_NODE: &'static str = "INSERT INTO nodes \
        (service, node, available, current_load, capacity, downed, backoff) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id";

    const INIT_NODE: &'static str = "INSERT OR IGNORE INTO nodes \
        (service, node, available, current_load, capacity, downed, backoff) VALUES (?, ?, ?, 0, ?, 0, 0)";

    const LIST_NODES: &'static str = "SELECT COALESCE(services.service, ''), nodes.id, nodes.node, nodes.available, \
        nodes.current_load, nodes.capacity, nodes.downed, nodes.backoff \
        FROM nodes LEFT OUTER JOIN services ON nodes.service = services.id \
        WHERE (? IS NULL OR services.service = ?) ORDER BY nodes.id";

    const INSERT_SERVICE: &'static str = "INSERT INTO services (service, pattern) VALUES (?, ?)";

    const NODE_ID: &'static str = crate::sql::qmark::NODE_ID;
    const UPDATE_NODE: &'static str = crate::sql::qmark::UPDATE_NODE;
    const UNASSIGN_NODE: &'static str = crate::sql::qmark::UNASSIGN_NODE;
    const DELETE_NODE: &'static str = crate::sql::qmark::DELETE_NODE;
    const NODE_USERS: &'static str = crate::sql::qmark::NODE_USERS;
    const USER_EMAIL: &'static str = crate::sql::qmark::USER_EMAIL;
    const RECORD_OF: &'static str = crate::sql::qmark::RECORD_OF;
    const DELETE_USER: &'static str = crate::sql::qmark::DELETE_USER;
    const COUNT_USERS: &'static str = crate::sql::qmark::COUNT_USERS;
    const OLD_RECORDS: &'static str = crate::sql::qmark::OLD_RECORDS;
    const BUMP_REPLACED: &'static str = crate::sql::qmark::BUMP_REPLACED;
    const BUCKET_NODE: &'static str = crate::sql::qmark::BUCKET_NODE;
    const LIST_BUCKETS: &'static str = crate::sql::qmark::LIST_BUCKETS;
    const LIVE_ROWS: &'static str = crate::sql::qmark::LIVE_ROWS;
    const REPLACE_UID: &'static str = crate::sql::qmark::REPLACE_UID;
    const CREATE_BUCKETS: &'static str = "CREATE TABLE IF NOT EXISTS tokenserver_buckets \
        (service INTEGER NOT NULL, bucket INTEGER NOT NULL, node INTEGER NOT NULL, PRIMARY KEY (service, bucket))";
    const SET_BUCKET_NODE: &'static str = "INSERT INTO tokenserver_buckets (service, bucket, node) VALUES (?, ?, ?) \
        ON CONFLICT (service, bucket) DO UPDATE SET node = excluded.node";
    // Both expressions see the row's old values (as on PostgreSQL; MySQL's order is noted there).
    const FREE_SLOT: &'static str = "UPDATE nodes SET available = available + \
        (CASE WHEN available + MAX(current_load - 1, 0) < capacity THEN 1 ELSE 0 END), \
        current_load = MAX(current_load - 1, 0) WHERE id = ?";
}

const GET_META: &str = "SELECT value FROM tokenserver_meta WHERE name = ?";

const PUT_META: &str = "INSERT INTO tokenserver_meta (name, value) VALUES (?, ?)";
const SET_META: &str =
    "INSERT INTO tokenserver_meta (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value";

/// A `users` row as `USER_ROWS` selects it.
fn user_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<UserRow> {
    Ok(UserRow {
        uid: r.get(0)?,
        node_id: r.get(1)?,
        node: r.get(2)?,
        generation: r.get(3)?,
        keys_changed_at: r.get(4)?,
        client_state: r.get(5)?,
        created_at: r.get(6)?,
        replaced_at: r.get(7)?,
    })
}

/// Node columns from `offset` on, in `LOCK_NODES` order.
fn node_state(r: &rusqlite::Row<'_>, offset: usize) -> rusqlite::Result<NodeState> {
    Ok(NodeState {
        id: r.get(offset)?,
        node: r.get(offset + 1)?,
        available: r.get(offset + 2)?,
        current_load: r.get(offset + 3)?,
        capacity: r.get(offset + 4)?,
        downed: r.get(offset + 5)?,
        backoff: r.get(offset + 6)?,
    })
}

fn rows_of(conn: &Connection, service: &str, email: &str) -> rusqlite::Result<Vec<UserRow>> {
    let mut stmt = conn.prepare_cached(SqliteSql::USER_ROWS)?;
    let rows = stmt.query_map((email, service), user_row)?;
    rows.collect()
}

fn service_id(conn: &Connection, service: &str) -> Result<Option<i64>> {
    let mut stmt = conn.prepare_cached(SqliteSql::SERVICE_ID).map_err(e)?;
    stmt.query_row([service], |r| r.get(0)).optional().map_err(e)
}

/// The id of `node` of `service`, or [`StoreError::NotFound`].
fn node_id(conn: &Connection, service: &str, node: &str) -> Result<i64> {
    conn.prepare_cached(SqliteSql::NODE_ID)
        .and_then(|mut s| s.query_row((service, node), |r| r.get(0)).optional())
        .map_err(e)?
        .ok_or_else(|| StoreError::NotFound(format!("node {node} of service {service}")))
}

/// Marks the node's live users replaced; how many.
fn unassign(conn: &Connection, node_id: i64, now_ms: i64) -> Result<u64> {
    let n = conn.prepare_cached(SqliteSql::UNASSIGN_NODE).and_then(|mut s| s.execute((now_ms, node_id))).map_err(e)?;
    Ok(n as u64)
}

fn require_service(conn: &Connection, service: &str) -> Result<i64> {
    service_id(conn, service)?.ok_or_else(|| StoreError::UnknownService(service.to_string()))
}

/// Brings the schema up to date (inside the writer's transaction).
fn apply_migrations(conn: &Connection, all: &[Migration]) -> Result<MigrationReport> {
    let tables = conn
        .prepare(SqliteSql::EXISTING_TABLES)
        .and_then(|mut s| s.query_map([], |r| r.get::<_, String>(0))?.collect::<rusqlite::Result<Vec<_>>>())
        .map_err(e)?;
    let applied = if crate::sql::migrate::has_bookkeeping(&tables) {
        conn.prepare(SqliteSql::APPLIED_VERSIONS)
            .and_then(|mut s| s.query_map([], |r| r.get::<_, String>(0))?.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(e)?
    } else {
        Vec::new()
    };
    let existing = Existing::new(&tables, applied);
    let todo = crate::sql::migrate::plan(all, &existing);
    if !todo.is_empty() && !existing.has_bookkeeping {
        conn.execute_batch(crate::sql::migrate::CREATE_BOOKKEEPING).map_err(e)?;
    }
    let mut report = MigrationReport::default();
    for m in todo {
        conn.execute_batch(m.sql).map_err(e)?;
        conn.execute(SqliteSql::RECORD_VERSION, [m.version]).map_err(e)?;
        report.applied.push(m.version.to_string());
    }
    Ok(report)
}

/// The writer's connection inside the batch transaction (and the call's savepoint). Every
/// write is already serialized by the one writer, so nothing needs locking.
struct Tx<'a> {
    conn: &'a mut Connection,
}

#[async_trait]
impl SyncTx for Tx<'_> {
    async fn service_id(&mut self, service: &str) -> Result<Option<i64>> {
        service_id(self.conn, service)
    }

    async fn lock_user(&mut self, _service_id: i64, _email: &str) -> Result<()> {
        Ok(())
    }

    async fn user_rows(&mut self, service: &str, email: &str) -> Result<Vec<UserRow>> {
        rows_of(self.conn, service, email).map_err(e)
    }

    async fn lock_nodes(&mut self, service_id: i64) -> Result<Vec<NodeState>> {
        let mut stmt = self.conn.prepare_cached(SqliteSql::LOCK_NODES).map_err(e)?;
        let rows = stmt.query_map([service_id], |r| node_state(r, 0)).map_err(e)?;
        rows.collect::<rusqlite::Result<_>>().map_err(e)
    }

    async fn set_available(&mut self, node_id: i64, available: i64) -> Result<()> {
        self.conn.prepare_cached(SqliteSql::RELEASE).and_then(|mut s| s.execute((available, node_id))).map_err(e)?;
        Ok(())
    }

    async fn add_users_to_node(&mut self, node_id: i64, n: i64) -> Result<()> {
        self.conn
            .prepare_cached(SqliteSql::ADD_USERS_TO_NODE)
            .and_then(|mut s| s.execute([n, n, node_id]))
            .map_err(e)?;
        Ok(())
    }

    async fn insert_user(&mut self, u: NewUser<'_>) -> Result<i64> {
        let mut stmt = self.conn.prepare_cached(SqliteSql::POST_USER).map_err(e)?;
        let params = (u.service_id, u.email, u.generation, u.client_state, u.created_at, u.node_id, u.keys_changed_at);
        stmt.query_row(params, |r| r.get(0)).map_err(e)
    }

    async fn put_user(&mut self, service_id: i64, email: &str, generation: i64, kca: Option<i64>) -> Result<()> {
        let mut stmt = self.conn.prepare_cached(SqliteSql::PUT_USER).map_err(e)?;
        stmt.execute((generation, kca, service_id, email, generation, kca)).map_err(e)?;
        Ok(())
    }

    async fn replace_others(&mut self, service_id: i64, email: &str, keep_uid: i64, now_ms: i64) -> Result<()> {
        let mut stmt = self.conn.prepare_cached(SqliteSql::REPLACE_OTHERS).map_err(e)?;
        stmt.execute((now_ms, service_id, email, keep_uid)).map_err(e)?;
        Ok(())
    }

    async fn record_of(&mut self, service_id: i64, uid: i64) -> Result<Option<(String, Option<i64>)>> {
        let mut stmt = self.conn.prepare_cached(SqliteSql::RECORD_OF).map_err(e)?;
        stmt.query_row((service_id, uid), |r| Ok((r.get(0)?, r.get(1)?))).optional().map_err(e)
    }

    async fn free_slot(&mut self, node_id: i64) -> Result<()> {
        self.conn.prepare_cached(SqliteSql::FREE_SLOT).and_then(|mut s| s.execute([node_id])).map_err(e)?;
        Ok(())
    }

    async fn delete_row(&mut self, service_id: i64, uid: i64) -> Result<bool> {
        let n = self.conn.prepare_cached(SqliteSql::DELETE_USER).and_then(|mut s| s.execute((service_id, uid)));
        Ok(n.map_err(e)? > 0)
    }

    async fn bucket_node(&mut self, service_id: i64, bucket: i64) -> Result<Option<i64>> {
        let mut stmt = self.conn.prepare_cached(SqliteSql::BUCKET_NODE).map_err(e)?;
        stmt.query_row((service_id, bucket), |r| r.get(0)).optional().map_err(e)
    }

    async fn set_bucket_node(&mut self, service_id: i64, bucket: i64, node_id: i64) -> Result<()> {
        let mut stmt = self.conn.prepare_cached(SqliteSql::SET_BUCKET_NODE).map_err(e)?;
        stmt.execute((service_id, bucket, node_id)).map_err(e)?;
        Ok(())
    }

    async fn live_rows(&mut self, service_id: i64) -> Result<Vec<(i64, String, i64)>> {
        let mut stmt = self.conn.prepare_cached(SqliteSql::LIVE_ROWS).map_err(e)?;
        let rows = stmt.query_map([service_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).map_err(e)?;
        rows.collect::<rusqlite::Result<_>>().map_err(e)
    }

    async fn replace_uid(&mut self, service_id: i64, uid: i64, now_ms: i64) -> Result<()> {
        let mut stmt = self.conn.prepare_cached(SqliteSql::REPLACE_UID).map_err(e)?;
        stmt.execute((now_ms, service_id, uid)).map_err(e)?;
        Ok(())
    }
}

/// An [`OldRecord`] as `OLD_RECORDS` selects it.
fn old_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<OldRecord> {
    Ok(OldRecord {
        uid: r.get(0)?,
        email: r.get(1)?,
        generation: r.get(2)?,
        keys_changed_at: r.get(3)?,
        client_state: r.get(4)?,
        node: r.get(5)?,
        downed: r.get::<_, i64>(6)? != 0,
        created_at: r.get(7)?,
        replaced_at: r.get(8)?,
    })
}

/// Which users' rows a write may change, for the user-row cache.
enum Touch {
    /// None (nodes and services added, bookkeeping).
    Nothing,
    /// This user's (service, email): its rows are read again after the write.
    User(String, String),
    /// Any user's.
    All,
}

impl SqliteStore {
    /// Runs `step` on the writer, in the next batch's transaction; kept if it succeeds and its
    /// caller still waits (see [`super::group::GroupWriter::call`]).
    async fn write<T: Send + 'static>(
        &self,
        span: Span,
        touch: Touch,
        step: impl FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let cache = self.rows.clone();
        self.writer
            .call(span, move |conn| {
                let out = step(conn);
                if let Some(cache) = &cache {
                    match &touch {
                        Touch::Nothing => {}
                        Touch::All => cache.touch_all(),
                        Touch::User(service, email) => {
                            // The user's rows as this call leaves them, read on the writer's
                            // warm connection, so the next request for the user needs no read.
                            let rows = match &out {
                                Ok(_) => rows_of(conn, service, email).ok().map(Arc::from),
                                Err(_) => None,
                            };
                            cache.touch(service, email.clone(), rows);
                        }
                    }
                }
                out
            })
            .await
    }

    /// Runs `f` on a read connection: inline for a file, on the writer in memory.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        match &self.reads {
            Some(reads) => reads.with(f),
            // In memory only; some of these reads are of whole tables.
            None => self.writer.call(Span::Long, move |conn| f(conn).map_err(e)).await,
        }
    }
}

#[async_trait]
impl SyncStore for SqliteStore {
    async fn migrate(&self) -> Result<MigrationReport> {
        self.write(Span::Long, Touch::All, |conn| apply_migrations(conn, MIGRATIONS)).await
    }

    async fn check(&self) -> Result<()> {
        self.read(|conn| conn.query_row("SELECT 1", [], |_| Ok(()))).await
    }

    async fn check_write(&self) -> Result<()> {
        self.write(Span::Short, Touch::Nothing, |conn| conn.query_row("SELECT 1", [], |_| Ok(())).map_err(e)).await
    }

    async fn user_rows(&self, service: &str, email: &str) -> Result<Vec<UserRow>> {
        let Some(reads) = &self.reads else {
            let (service, email) = (service.to_string(), email.to_string());
            return self.read(move |conn| rows_of(conn, &service, &email)).await;
        };
        let cache = self.rows.as_deref();
        let header = cache.and_then(|c| c.header());
        if let (Some(cache), Some(header)) = (cache, &header) {
            if let Some(rows) = cache.get(header, service, email) {
                return Ok(rows.to_vec());
            }
        }
        let rows = reads.with(|conn| rows_of(conn, service, email))?;
        if let (Some(cache), Some(header)) = (cache, &header) {
            cache.put(header, service, email.to_string(), rows.as_slice().into());
        }
        Ok(rows)
    }

    async fn allocate_user(&self, req: &Allocate<'_>) -> Result<UserRow> {
        let owned = OwnedAllocate::new(req);
        let touch = Touch::User(req.service.to_string(), req.email.to_string());
        self.write(Span::Short, touch, move |conn| run_now(tx::allocate(&mut Tx { conn }, &owned.borrow()))).await
    }

    async fn change_user(
        &self,
        service: &str,
        email: &str,
        expected_current: i64,
        change: &UserChange<'_>,
        now_ms: i64,
    ) -> Result<i64> {
        let change = OwnedUserChange::new(change);
        let (service, email) = (service.to_string(), email.to_string());
        let touch = Touch::User(service.clone(), email.clone());
        self.write(Span::Short, touch, move |conn| {
            run_now(tx::change(&mut Tx { conn }, &service, &email, expected_current, &change.borrow(), now_ms))
        })
        .await
    }

    async fn replace_rows(&self, service: &str, uids: &[i64], replaced_at: i64) -> Result<()> {
        let (service, uids) = (service.to_string(), uids.to_vec());
        self.write(Span::Short, Touch::All, move |conn| {
            let mut stmt = conn.prepare_cached(SqliteSql::REPLACE_USER).map_err(e)?;
            for uid in uids {
                stmt.execute((replaced_at, &service, uid)).map_err(e)?;
            }
            Ok(())
        })
        .await
    }

    async fn retire_user(&self, service: &str, email: &str, now_ms: i64) -> Result<u64> {
        let (s, m) = (service.to_string(), email.to_string());
        self.write(Span::Short, Touch::User(s.clone(), m.clone()), move |conn| {
            let mut stmt = conn.prepare_cached(SqliteSql::RETIRE_USER).map_err(e)?;
            let n = stmt.execute((tokenserver_core::sync::MAX_GENERATION, now_ms, &s, &m)).map_err(e)?;
            Ok(n as u64)
        })
        .await
    }

    async fn update_user_generation(
        &self,
        service: &str,
        email: &str,
        generation: Option<i64>,
        keys_changed_at: Option<i64>,
    ) -> Result<u64> {
        let (s, m) = (service.to_string(), email.to_string());
        self.write(Span::Short, Touch::User(s.clone(), m.clone()), move |conn| {
            let mut stmt = conn.prepare_cached(SqliteSql::UPDATE_USER_GENERATION).map_err(e)?;
            let n = stmt.execute((generation, keys_changed_at, &s, &m, generation, keys_changed_at)).map_err(e)?;
            Ok(n as u64)
        })
        .await
    }

    async fn add_node(&self, node: &NewNode<'_>) -> Result<NodeRecord> {
        let (service, url) = (node.service.to_string(), node.node.to_string());
        let (capacity, available, load) = (node.capacity, node.available, node.current_load);
        let (downed, backoff) = (i64::from(node.downed), i64::from(node.backoff));
        let id = self
            .write(Span::Long, Touch::Nothing, move |conn| {
                let service = require_service(conn, &service)?;
                let mut stmt = conn.prepare_cached(SqliteSql::INSERT_NODE).map_err(e)?;
                stmt.query_row((service, &url, available, load, capacity, downed, backoff), |r| r.get::<_, i64>(0))
                    .map_err(|err| match e(err) {
                        StoreError::AlreadyExists(_) => StoreError::AlreadyExists(format!("node {url}")),
                        other => other,
                    })
            })
            .await?;
        Ok(node_record(node, id))
    }

    async fn init_node(&self, service: &str, node: &str, capacity: i64) -> Result<bool> {
        let (service, node) = (service.to_string(), node.to_string());
        self.write(Span::Long, Touch::Nothing, move |conn| {
            let service = require_service(conn, &service)?;
            let n = conn
                .prepare_cached(SqliteSql::INIT_NODE)
                .and_then(|mut s| s.execute((service, &node, capacity, capacity)))
                .map_err(e)?;
            Ok(n > 0)
        })
        .await
    }

    async fn list_nodes(&self, service: Option<&str>) -> Result<Vec<NodeRecord>> {
        let service = service.map(str::to_string);
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(SqliteSql::LIST_NODES)?;
            let rows = stmt
                .query_map((&service, &service), |r| Ok(NodeRecord { service: r.get(0)?, state: node_state(r, 1)? }))?;
            rows.collect()
        })
        .await
    }

    async fn update_node(&self, service: &str, node: &str, change: &NodeChange) -> Result<()> {
        let (service, node, c) = (service.to_string(), node.to_string(), change.clone());
        self.write(Span::Long, Touch::All, move |conn| {
            let id = node_id(conn, &service, &node)?;
            let flags = (c.downed.map(i64::from), c.backoff.map(i64::from));
            conn.prepare_cached(SqliteSql::UPDATE_NODE)
                .and_then(|mut s| s.execute((c.capacity, c.available, c.current_load, flags.0, flags.1, id)))
                .map_err(e)?;
            Ok(())
        })
        .await
    }

    async fn unassign_node(&self, service: &str, node: &str, now_ms: i64) -> Result<u64> {
        let (service, node) = (service.to_string(), node.to_string());
        self.write(Span::Long, Touch::All, move |conn| unassign(conn, node_id(conn, &service, &node)?, now_ms)).await
    }

    async fn remove_node(&self, service: &str, node: &str, now_ms: i64) -> Result<u64> {
        let (service, node) = (service.to_string(), node.to_string());
        self.write(Span::Long, Touch::All, move |conn| {
            let id = node_id(conn, &service, &node)?;
            let unassigned = unassign(conn, id, now_ms)?;
            conn.prepare_cached(SqliteSql::DELETE_NODE).and_then(|mut s| s.execute([id])).map_err(e)?;
            Ok(unassigned)
        })
        .await
    }

    async fn node_users(&self) -> Result<Vec<NodeUsers>> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(SqliteSql::NODE_USERS)?;
            let rows = stmt.query_map([], |r| Ok(NodeUsers { node_id: r.get(0)?, live: r.get(1)? }))?;
            rows.collect()
        })
        .await
    }

    async fn user_email(&self, service: &str, uid: i64) -> Result<Option<String>> {
        let service = service.to_string();
        self.read(move |conn| {
            conn.prepare_cached(SqliteSql::USER_EMAIL)?.query_row((&service, uid), |r| r.get(0)).optional()
        })
        .await
    }

    async fn assign_user(&self, service: &str, email: &str, node: &str, now_ms: i64) -> Result<UserRow> {
        let (service, email, node) = (service.to_string(), email.to_string(), node.to_string());
        let touch = Touch::User(service.clone(), email.clone());
        self.write(Span::Short, touch, move |conn| {
            run_now(tx::assign(&mut Tx { conn }, &service, &email, &node, now_ms))
        })
        .await
    }

    async fn count_users(&self, service: Option<&str>, created_before: i64) -> Result<i64> {
        let service = service.map(str::to_string);
        self.read(move |conn| {
            conn.prepare_cached(SqliteSql::COUNT_USERS)?.query_row((created_before, &service, &service), |r| r.get(0))
        })
        .await
    }

    async fn old_records(&self, q: &OldRecordsQuery<'_>) -> Result<Vec<OldRecord>> {
        let service = q.service.to_string();
        let (after_at, after_uid) = q.after.unwrap_or((i64::MIN, i64::MIN));
        let (before, above, below) =
            (q.replaced_before, q.uid_above.unwrap_or(i64::MIN), q.uid_below.unwrap_or(i64::MAX));
        let limit = q.limit;
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(SqliteSql::OLD_RECORDS)?;
            let params = rusqlite::params![service, before, after_at, after_at, after_uid, above, below, limit];
            let rows = stmt.query_map(params, old_record)?;
            rows.collect()
        })
        .await
    }

    async fn delete_user_record(&self, service: &str, uid: i64) -> Result<bool> {
        let service = service.to_string();
        self.write(Span::Short, Touch::All, move |conn| run_now(tx::delete_record(&mut Tx { conn }, &service, uid)))
            .await
    }

    async fn bump_replaced_at(&self, service: &str, uid: i64, now_ms: i64) -> Result<()> {
        let service = service.to_string();
        self.write(Span::Short, Touch::All, move |conn| {
            conn.prepare_cached(SqliteSql::BUMP_REPLACED)
                .and_then(|mut s| s.execute((now_ms, &service, uid)))
                .map_err(e)?;
            Ok(())
        })
        .await
    }

    async fn enable_buckets(&self) -> Result<()> {
        self.write(Span::Long, Touch::Nothing, |conn| conn.execute_batch(SqliteSql::CREATE_BUCKETS).map_err(e)).await
    }

    async fn buckets(&self, service: &str) -> Result<Vec<BucketRecord>> {
        let service = service.to_string();
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(SqliteSql::LIST_BUCKETS)?;
            let rows = stmt.query_map([&service], |r| Ok(BucketRecord { bucket: r.get(0)?, node: r.get(1)? }))?;
            rows.collect()
        })
        .await
    }

    async fn move_bucket(&self, service: &str, bucket: i64, total: i64, node: &str, now_ms: i64) -> Result<u64> {
        let (service, node) = (service.to_string(), node.to_string());
        self.write(Span::Long, Touch::All, move |conn| {
            run_now(tx::move_bucket(&mut Tx { conn }, &service, bucket, total, &node, now_ms))
        })
        .await
    }

    async fn ensure_service(&self, service: &str, pattern: &str) -> Result<i64> {
        let (service, pattern) = (service.to_string(), pattern.to_string());
        self.write(Span::Long, Touch::Nothing, move |conn| {
            if let Some(id) = service_id(conn, &service)? {
                return Ok(id);
            }
            conn.prepare_cached(SqliteSql::INSERT_SERVICE)
                .and_then(|mut s| s.execute((&service, &pattern)))
                .map_err(e)?;
            require_service(conn, &service)
        })
        .await
    }

    async fn generated_secret(
        &self,
        name: &str,
        generate: &(dyn Fn() -> String + Send + Sync),
    ) -> Result<Option<(String, bool)>> {
        let (name, fresh) = (name.to_string(), generate());
        let found = self
            .write(Span::Long, Touch::Nothing, move |conn| {
                let existing: Option<String> = conn
                    .prepare_cached(GET_META)
                    .and_then(|mut s| s.query_row([&name], |r| r.get(0)).optional())
                    .map_err(e)?;
                if let Some(secret) = existing {
                    return Ok((secret, false));
                }
                conn.prepare_cached(PUT_META).and_then(|mut s| s.execute((&name, &fresh))).map_err(e)?;
                Ok((fresh, true))
            })
            .await?;
        Ok(Some(found))
    }

    async fn add_generated_secret(&self, name: &str, fresh: &str) -> Result<Option<Vec<String>>> {
        let (name, fresh) = (name.to_string(), fresh.to_string());
        let list = self
            .write(Span::Long, Touch::Nothing, move |conn| {
                let existing: Option<String> = conn
                    .prepare_cached(GET_META)
                    .and_then(|mut s| s.query_row([&name], |r| r.get(0)).optional())
                    .map_err(e)?;
                let value = match existing {
                    Some(list) => format!("{list}\n{fresh}"),
                    None => fresh,
                };
                conn.prepare_cached(SET_META).and_then(|mut s| s.execute((&name, &value))).map_err(e)?;
                Ok(value)
            })
            .await?;
        Ok(Some(list.lines().map(String::from).collect()))
    }
}
