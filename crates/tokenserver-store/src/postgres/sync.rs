//! `SyncStore` for PostgreSQL. INTEGER columns are read as BIGINT (`::BIGINT`) so one Rust type
//! serves every backend.

use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Postgres, Row};
use tokenserver_core::sync::allocation::NodeState;
use tokenserver_core::sync::users::UserRow;

use super::PgStore;
use crate::sync::{Allocate, MigrationReport, NewNode, NodeRecord, Result, SyncStore, UserChange};
use crate::tx::{self, NewUser, SyncTx};
use crate::StoreError;

const SERVICE_ID: &str = "SELECT id::BIGINT FROM services WHERE service = $1";

const USER_ROWS: &str = "SELECT users.uid, nodes.id, nodes.node::TEXT, users.generation, users.keys_changed_at, \
    users.client_state::TEXT, users.created_at, users.replaced_at \
    FROM users LEFT OUTER JOIN nodes ON users.nodeid = nodes.id \
    WHERE users.email = $1 AND users.service = (SELECT id FROM services WHERE service = $2) \
    ORDER BY users.created_at DESC, users.uid DESC LIMIT 20";

const LOCK_USER: &str = "SELECT uid FROM users WHERE email = $1 AND service = $2 FOR UPDATE";

const LOCK_NODES: &str = "SELECT id, node::TEXT, available::BIGINT, current_load::BIGINT, capacity::BIGINT, \
    downed::BIGINT, backoff::BIGINT FROM nodes WHERE service = $1 ORDER BY id FOR UPDATE";

const RELEASE: &str = "UPDATE nodes SET available = $1 WHERE id = $2";

const ADD_USER_TO_NODE: &str =
    "UPDATE nodes SET current_load = current_load + 1, available = GREATEST(available - 1, 0) WHERE id = $1";

const POST_USER: &str = "INSERT INTO users \
    (service, email, generation, client_state, created_at, nodeid, keys_changed_at, replaced_at) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, NULL) RETURNING uid";

const PUT_USER: &str = "UPDATE users SET generation = $1, keys_changed_at = $2 \
    WHERE service = $3 AND email = $4 AND generation <= $1 \
    AND COALESCE(keys_changed_at, 0) <= COALESCE($2, keys_changed_at, 0) AND replaced_at IS NULL";

const REPLACE_OTHERS: &str = "UPDATE users SET replaced_at = $1 \
    WHERE service = $2 AND email = $3 AND replaced_at IS NULL AND uid <> $4";

const REPLACE_USER: &str = "UPDATE users SET replaced_at = $1 \
    WHERE service = (SELECT id FROM services WHERE service = $2) AND uid = $3 AND replaced_at IS NULL";

const RETIRE_USER: &str = "UPDATE users SET generation = $1, replaced_at = $2 \
    WHERE service = (SELECT id FROM services WHERE service = $3) AND email = $4 AND replaced_at IS NULL";

const UPDATE_USER_GENERATION: &str = "UPDATE users SET generation = COALESCE($1, generation), \
    keys_changed_at = COALESCE($2, keys_changed_at) \
    WHERE service = (SELECT id FROM services WHERE service = $3) AND email = $4 \
    AND generation <= COALESCE($1, generation) \
    AND COALESCE(keys_changed_at, 0) <= COALESCE($2, keys_changed_at, 0) AND replaced_at IS NULL";

const INSERT_NODE: &str = "INSERT INTO nodes (service, node, available, current_load, capacity, downed, backoff) \
    VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id";

const INIT_NODE: &str = "INSERT INTO nodes (service, node, available, current_load, capacity, downed, backoff) \
    VALUES ($1, $2, $3, 0, $3, 0, 0) ON CONFLICT (service, node) DO NOTHING";

const LIST_NODES: &str = "SELECT COALESCE(services.service, '')::TEXT, nodes.id, nodes.node::TEXT, \
    nodes.available::BIGINT, nodes.current_load::BIGINT, nodes.capacity::BIGINT, nodes.downed::BIGINT, \
    nodes.backoff::BIGINT \
    FROM nodes LEFT OUTER JOIN services ON nodes.service = services.id \
    WHERE ($1::TEXT IS NULL OR services.service = $1) ORDER BY nodes.id";

const ENSURE_SERVICE: &str = "INSERT INTO services (service, pattern) SELECT $1, $2 \
    WHERE NOT EXISTS (SELECT 1 FROM services WHERE service = $1)";

fn user_row(r: &PgRow) -> std::result::Result<UserRow, sqlx::Error> {
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

fn node_state(r: &PgRow, offset: usize) -> std::result::Result<NodeState, sqlx::Error> {
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

async fn rows_of(conn: &mut PgConnection, service: &str, email: &str) -> Result<Vec<UserRow>> {
    let rows = sqlx::query(USER_ROWS).bind(email).bind(service).fetch_all(conn).await?;
    Ok(rows.iter().map(user_row).collect::<std::result::Result<_, _>>()?)
}

struct Tx(sqlx::Transaction<'static, Postgres>);

#[async_trait]
impl SyncTx for Tx {
    async fn service_id(&mut self, service: &str) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar(SERVICE_ID).bind(service).fetch_optional(&mut *self.0).await?)
    }

    async fn lock_user(&mut self, service_id: i64, email: &str) -> Result<()> {
        sqlx::query(LOCK_USER).bind(email).bind(service_id).fetch_all(&mut *self.0).await?;
        Ok(())
    }

    async fn user_rows(&mut self, service: &str, email: &str) -> Result<Vec<UserRow>> {
        rows_of(&mut self.0, service, email).await
    }

    async fn lock_nodes(&mut self, service_id: i64) -> Result<Vec<NodeState>> {
        let rows = sqlx::query(LOCK_NODES).bind(service_id).fetch_all(&mut *self.0).await?;
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
        sqlx::query(PUT_USER).bind(generation).bind(kca).bind(service_id).bind(email).execute(&mut *self.0).await?;
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

impl PgStore {
    async fn write_tx(&self) -> Result<Tx> {
        Ok(Tx(self.pool.begin().await?))
    }
}

#[async_trait]
impl SyncStore for PgStore {
    async fn migrate(&self) -> Result<MigrationReport> {
        self.run_migrations().await
    }

    async fn check(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn user_rows(&self, service: &str, email: &str) -> Result<Vec<UserRow>> {
        let mut conn = self.pool.acquire().await?;
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
        let mut tx = self.pool.begin().await?;
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
            .execute(&self.pool)
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
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn add_node(&self, node: &NewNode<'_>) -> Result<NodeRecord> {
        let mut tx = self.pool.begin().await?;
        let service = sqlx::query_scalar::<_, i64>(SERVICE_ID)
            .bind(node.service)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::UnknownService(node.service.to_string()))?;
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
        let mut tx = self.pool.begin().await?;
        let service = sqlx::query_scalar::<_, i64>(SERVICE_ID)
            .bind(service)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::UnknownService(service.to_string()))?;
        let done = sqlx::query(INIT_NODE).bind(service).bind(node).bind(capacity).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(done.rows_affected() > 0)
    }

    async fn list_nodes(&self, service: Option<&str>) -> Result<Vec<NodeRecord>> {
        let rows = sqlx::query(LIST_NODES).bind(service).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| Ok(NodeRecord { service: r.try_get(0)?, state: node_state(r, 1)? }))
            .collect::<std::result::Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    async fn ensure_service(&self, service: &str, pattern: &str) -> Result<i64> {
        sqlx::query(ENSURE_SERVICE).bind(service).bind(pattern).execute(&self.pool).await?;
        sqlx::query_scalar::<_, i64>(SERVICE_ID)
            .bind(service)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::UnknownService(service.to_string()))
    }

    async fn generated_master_secret(&self, _generate: &(dyn Fn() -> String + Send + Sync)) -> Result<(String, bool)> {
        Err(StoreError::Config(
            "master_secret must be set when the database is PostgreSQL or MySQL (Mozilla's schema has nowhere to keep a generated one)".into(),
        ))
    }
}
