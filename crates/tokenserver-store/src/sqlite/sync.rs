//! `SyncStore` for SQLite.

use async_trait::async_trait;
use sqlx::{Row, SqliteConnection};
use tokenserver_core::sync::allocation::NodeState;
use tokenserver_core::sync::users::UserRow;

use super::SqliteStore;
use crate::sync::{Allocate, MigrationReport, NewNode, NodeRecord, Result, SyncStore, UserChange};
use crate::tx::{self, NewUser, SyncTx};
use crate::StoreError;

const SERVICE_ID: &str = "SELECT id FROM services WHERE service = ?";

const USER_ROWS: &str = "SELECT users.uid, nodes.id, nodes.node, users.generation, users.keys_changed_at, \
    users.client_state, users.created_at, users.replaced_at \
    FROM users LEFT OUTER JOIN nodes ON users.nodeid = nodes.id \
    WHERE users.email = ? AND users.service = (SELECT id FROM services WHERE service = ?) \
    ORDER BY users.created_at DESC, users.uid DESC LIMIT 20";

const NODES_OF_SERVICE: &str = "SELECT id, node, available, current_load, capacity, downed, backoff \
    FROM nodes WHERE service = ? ORDER BY id";

const RELEASE: &str = "UPDATE nodes SET available = ? WHERE id = ?";

const ADD_USER_TO_NODE: &str =
    "UPDATE nodes SET current_load = current_load + 1, available = MAX(available - 1, 0) WHERE id = ?";

const POST_USER: &str = "INSERT INTO users \
    (service, email, generation, client_state, created_at, nodeid, keys_changed_at, replaced_at) \
    VALUES (?, ?, ?, ?, ?, ?, ?, NULL) RETURNING uid";

const PUT_USER: &str = "UPDATE users SET generation = ?, keys_changed_at = ? \
    WHERE service = ? AND email = ? AND generation <= ? \
    AND COALESCE(keys_changed_at, 0) <= COALESCE(?, keys_changed_at, 0) AND replaced_at IS NULL";

const REPLACE_OTHERS: &str = "UPDATE users SET replaced_at = ? \
    WHERE service = ? AND email = ? AND replaced_at IS NULL AND uid <> ?";

const REPLACE_USER: &str = "UPDATE users SET replaced_at = ? \
    WHERE service = (SELECT id FROM services WHERE service = ?) AND uid = ? AND replaced_at IS NULL";

const RETIRE_USER: &str = "UPDATE users SET generation = ?, replaced_at = ? \
    WHERE service = (SELECT id FROM services WHERE service = ?) AND email = ? AND replaced_at IS NULL";

const UPDATE_USER_GENERATION: &str = "UPDATE users SET generation = COALESCE(?, generation), \
    keys_changed_at = COALESCE(?, keys_changed_at) \
    WHERE service = (SELECT id FROM services WHERE service = ?) AND email = ? \
    AND generation <= COALESCE(?, generation) \
    AND COALESCE(keys_changed_at, 0) <= COALESCE(?, keys_changed_at, 0) AND replaced_at IS NULL";

const INSERT_NODE: &str = "INSERT INTO nodes (service, node, available, current_load, capacity, downed, backoff) \
    VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id";

const INIT_NODE: &str = "INSERT OR IGNORE INTO nodes \
    (service, node, available, current_load, capacity, downed, backoff) VALUES (?, ?, ?, 0, ?, 0, 0)";

const LIST_NODES: &str = "SELECT COALESCE(services.service, ''), nodes.id, nodes.node, nodes.available, \
    nodes.current_load, nodes.capacity, nodes.downed, nodes.backoff \
    FROM nodes LEFT OUTER JOIN services ON nodes.service = services.id \
    WHERE (? IS NULL OR services.service = ?) ORDER BY nodes.id";

fn user_row(r: &sqlx::sqlite::SqliteRow) -> std::result::Result<UserRow, sqlx::Error> {
    Ok(UserRow {
        uid: r.try_get(0)?,
        node_id: r.try_get(1)?,
        node: r.try_get(2)?,
        generation: r.try_get(3)?,
        keys_changed_at: r.try_get(4)?,
        client_state: r.try_get(5)?,
        created_at: r.try_get(6)?,
        replaced_at: r.try_get(7)?,
    })
}

fn node_state(r: &sqlx::sqlite::SqliteRow, offset: usize) -> std::result::Result<NodeState, sqlx::Error> {
    Ok(NodeState {
        id: r.try_get(offset)?,
        node: r.try_get(offset + 1)?,
        available: r.try_get(offset + 2)?,
        current_load: r.try_get(offset + 3)?,
        capacity: r.try_get(offset + 4)?,
        downed: r.try_get(offset + 5)?,
        backoff: r.try_get(offset + 6)?,
    })
}

async fn rows_of(conn: &mut SqliteConnection, service: &str, email: &str) -> Result<Vec<UserRow>> {
    let rows = sqlx::query(USER_ROWS).bind(email).bind(service).fetch_all(conn).await?;
    Ok(rows.iter().map(user_row).collect::<std::result::Result<_, _>>()?)
}

async fn service_id(conn: &mut SqliteConnection, service: &str) -> Result<i64> {
    sqlx::query_scalar::<_, i64>(SERVICE_ID)
        .bind(service)
        .fetch_optional(conn)
        .await?
        .ok_or_else(|| StoreError::UnknownService(service.to_string()))
}

/// A write transaction. Writes are serialized by the single writer connection, so the row locks
/// other backends take are not needed here.
struct Tx(sqlx::Transaction<'static, sqlx::Sqlite>);

#[async_trait]
impl SyncTx for Tx {
    async fn service_id(&mut self, service: &str) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar(SERVICE_ID).bind(service).fetch_optional(&mut *self.0).await?)
    }

    async fn lock_user(&mut self, _service_id: i64, _email: &str) -> Result<()> {
        Ok(())
    }

    async fn user_rows(&mut self, service: &str, email: &str) -> Result<Vec<UserRow>> {
        rows_of(&mut self.0, service, email).await
    }

    async fn lock_nodes(&mut self, service_id: i64) -> Result<Vec<NodeState>> {
        let rows = sqlx::query(NODES_OF_SERVICE).bind(service_id).fetch_all(&mut *self.0).await?;
        Ok(rows.iter().map(|r| node_state(r, 0)).collect::<std::result::Result<_, _>>()?)
    }

    async fn set_available(&mut self, node_id: i64, available: i64) -> Result<()> {
        sqlx::query(RELEASE).bind(available).bind(node_id).execute(&mut *self.0).await?;
        Ok(())
    }

    async fn add_user_to_node(&mut self, node_id: i64) -> Result<()> {
        sqlx::query(ADD_USER_TO_NODE).bind(node_id).execute(&mut *self.0).await?;
        Ok(())
    }

    async fn insert_user(&mut self, u: NewUser<'_>) -> Result<i64> {
        Ok(sqlx::query_scalar(POST_USER)
            .bind(u.service_id)
            .bind(u.email)
            .bind(u.generation)
            .bind(u.client_state)
            .bind(u.created_at)
            .bind(u.node_id)
            .bind(u.keys_changed_at)
            .fetch_one(&mut *self.0)
            .await?)
    }

    async fn put_user(&mut self, service_id: i64, email: &str, generation: i64, kca: Option<i64>) -> Result<()> {
        sqlx::query(PUT_USER)
            .bind(generation)
            .bind(kca)
            .bind(service_id)
            .bind(email)
            .bind(generation)
            .bind(kca)
            .execute(&mut *self.0)
            .await?;
        Ok(())
    }

    async fn replace_others(&mut self, service_id: i64, email: &str, keep_uid: i64, now_ms: i64) -> Result<()> {
        sqlx::query(REPLACE_OTHERS)
            .bind(now_ms)
            .bind(service_id)
            .bind(email)
            .bind(keep_uid)
            .execute(&mut *self.0)
            .await?;
        Ok(())
    }
}

impl SqliteStore {
    async fn write_tx(&self) -> Result<Tx> {
        Ok(Tx(self.write.begin_with("BEGIN IMMEDIATE").await?))
    }
}

#[async_trait]
impl SyncStore for SqliteStore {
    async fn migrate(&self) -> Result<MigrationReport> {
        self.run_migrations().await
    }

    async fn check(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.read).await?;
        Ok(())
    }

    async fn user_rows(&self, service: &str, email: &str) -> Result<Vec<UserRow>> {
        let mut conn = self.read.acquire().await?;
        rows_of(&mut conn, service, email).await
    }

    async fn allocate_user(&self, req: &Allocate<'_>) -> Result<UserRow> {
        let mut tx = self.write_tx().await?;
        let row = tx::allocate(&mut tx, req).await?;
        tx.0.commit().await?;
        Ok(row)
    }

    async fn change_user(
        &self,
        service: &str,
        email: &str,
        expected_current: i64,
        change: &UserChange<'_>,
        now_ms: i64,
    ) -> Result<i64> {
        let mut tx = self.write_tx().await?;
        let uid = tx::change(&mut tx, service, email, expected_current, change, now_ms).await?;
        tx.0.commit().await?;
        Ok(uid)
    }

    async fn replace_rows(&self, service: &str, uids: &[i64], replaced_at: i64) -> Result<()> {
        let mut tx = self.write.begin_with("BEGIN IMMEDIATE").await?;
        for uid in uids {
            sqlx::query(REPLACE_USER).bind(replaced_at).bind(service).bind(uid).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn retire_user(&self, service: &str, email: &str, now_ms: i64) -> Result<u64> {
        let done = sqlx::query(RETIRE_USER)
            .bind(tokenserver_core::sync::MAX_GENERATION)
            .bind(now_ms)
            .bind(service)
            .bind(email)
            .execute(&self.write)
            .await?;
        Ok(done.rows_affected())
    }

    async fn update_user_generation(
        &self,
        service: &str,
        email: &str,
        generation: Option<i64>,
        keys_changed_at: Option<i64>,
    ) -> Result<u64> {
        let done = sqlx::query(UPDATE_USER_GENERATION)
            .bind(generation)
            .bind(keys_changed_at)
            .bind(service)
            .bind(email)
            .bind(generation)
            .bind(keys_changed_at)
            .execute(&self.write)
            .await?;
        Ok(done.rows_affected())
    }

    async fn add_node(&self, node: &NewNode<'_>) -> Result<NodeRecord> {
        let mut tx = self.write.begin_with("BEGIN IMMEDIATE").await?;
        let service = service_id(&mut tx, node.service).await?;
        let id: i64 = sqlx::query_scalar(INSERT_NODE)
            .bind(service)
            .bind(node.node)
            .bind(node.available)
            .bind(node.current_load)
            .bind(node.capacity)
            .bind(i64::from(node.downed))
            .bind(i64::from(node.backoff))
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| crate::error::node_exists(e, node.node))?;
        tx.commit().await?;
        Ok(crate::sync::node_record(node, id))
    }

    async fn init_node(&self, service: &str, node: &str, capacity: i64) -> Result<bool> {
        let mut tx = self.write.begin_with("BEGIN IMMEDIATE").await?;
        let service = service_id(&mut tx, service).await?;
        let done =
            sqlx::query(INIT_NODE).bind(service).bind(node).bind(capacity).bind(capacity).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(done.rows_affected() > 0)
    }

    async fn list_nodes(&self, service: Option<&str>) -> Result<Vec<NodeRecord>> {
        let rows = sqlx::query(LIST_NODES).bind(service).bind(service).fetch_all(&self.read).await?;
        rows.iter()
            .map(|r| Ok(NodeRecord { service: r.try_get(0)?, state: node_state(r, 1)? }))
            .collect::<std::result::Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    async fn ensure_service(&self, service: &str, pattern: &str) -> Result<i64> {
        let mut tx = self.write.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query("INSERT OR IGNORE INTO services (service, pattern) VALUES (?, ?)")
            .bind(service)
            .bind(pattern)
            .execute(&mut *tx)
            .await?;
        let id = service_id(&mut tx, service).await?;
        tx.commit().await?;
        Ok(id)
    }

    async fn generated_master_secret(&self, generate: &(dyn Fn() -> String + Send + Sync)) -> Result<(String, bool)> {
        let mut tx = self.write.begin_with("BEGIN IMMEDIATE").await?;
        let existing: Option<String> =
            sqlx::query_scalar("SELECT value FROM tokenserver_meta WHERE name = 'master_secret'")
                .fetch_optional(&mut *tx)
                .await?;
        if let Some(secret) = existing {
            return Ok((secret, false));
        }
        let secret = generate();
        sqlx::query("INSERT INTO tokenserver_meta (name, value) VALUES ('master_secret', ?)")
            .bind(&secret)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok((secret, true))
    }
}
