//! `SyncStore` for SQLite.

use async_trait::async_trait;
use sqlx::{Row, SqliteConnection};
use tokenserver_core::sync::allocation::{choose_node, released_available, NodeState, MAX_RELEASE_ROUNDS};
use tokenserver_core::sync::users::{resolve, Status, UserRow};

use super::SqliteStore;
use crate::sync::{Allocate, MigrationReport, NewNode, NodeRecord, Result, SyncStore, UserChange};
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

/// Picks a node by the policy, releasing capacity in up to [`MAX_RELEASE_ROUNDS`] rounds.
async fn pick_node(conn: &mut SqliteConnection, service_id: i64, rate: f64) -> Result<NodeState> {
    for _ in 0..=MAX_RELEASE_ROUNDS {
        let rows = sqlx::query(NODES_OF_SERVICE).bind(service_id).fetch_all(&mut *conn).await?;
        let nodes = rows.iter().map(|r| node_state(r, 0)).collect::<std::result::Result<Vec<_>, _>>()?;
        if let Some(node) = choose_node(&nodes) {
            return Ok(node.clone());
        }
        let mut released = 0;
        for node in &nodes {
            if let Some(available) = released_available(node, rate) {
                sqlx::query(RELEASE).bind(available).bind(node.id).execute(&mut *conn).await?;
                released += 1;
            }
        }
        if released == 0 {
            break;
        }
    }
    Err(StoreError::NoNodeAvailable)
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
        let mut tx = self.write.begin_with("BEGIN IMMEDIATE").await?;
        let service = service_id(&mut tx, req.service).await?;
        let rows = rows_of(&mut tx, req.service, req.email).await?;
        let still_expected = match (req.expected_current, resolve(&rows)) {
            (None, None) => true,
            (Some(uid), Some(r)) => r.current.uid == uid && r.status == Status::NeedsNode,
            _ => false,
        };
        if !still_expected {
            return Err(StoreError::Conflict);
        }
        let node = pick_node(&mut tx, service, req.release_rate).await?;
        sqlx::query(ADD_USER_TO_NODE).bind(node.id).execute(&mut *tx).await?;
        let uid: i64 = sqlx::query_scalar(POST_USER)
            .bind(service)
            .bind(req.email)
            .bind(req.generation)
            .bind(req.client_state)
            .bind(req.now_ms)
            .bind(node.id)
            .bind(req.keys_changed_at)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(UserRow {
            uid,
            node_id: Some(node.id),
            node: Some(node.node),
            generation: req.generation,
            keys_changed_at: req.keys_changed_at,
            client_state: req.client_state.to_string(),
            created_at: req.now_ms,
            replaced_at: None,
        })
    }

    async fn change_user(
        &self,
        service: &str,
        email: &str,
        expected_current: i64,
        change: &UserChange<'_>,
        now_ms: i64,
    ) -> Result<i64> {
        let mut tx = self.write.begin_with("BEGIN IMMEDIATE").await?;
        let service_id = service_id(&mut tx, service).await?;
        let rows = rows_of(&mut tx, service, email).await?;
        match resolve(&rows) {
            Some(r) if r.current.uid == expected_current && r.status == Status::Assigned => {}
            _ => return Err(StoreError::Conflict),
        }
        let current = match change {
            UserChange::Update { generation, keys_changed_at } => {
                sqlx::query(PUT_USER)
                    .bind(generation)
                    .bind(keys_changed_at)
                    .bind(service_id)
                    .bind(email)
                    .bind(generation)
                    .bind(keys_changed_at)
                    .execute(&mut *tx)
                    .await?;
                expected_current
            }
            UserChange::NewClientState { generation, keys_changed_at, client_state, node_id } => {
                let uid: i64 = sqlx::query_scalar(POST_USER)
                    .bind(service_id)
                    .bind(email)
                    .bind(generation)
                    .bind(client_state)
                    .bind(now_ms)
                    .bind(node_id)
                    .bind(keys_changed_at)
                    .fetch_one(&mut *tx)
                    .await?;
                sqlx::query(REPLACE_OTHERS)
                    .bind(now_ms)
                    .bind(service_id)
                    .bind(email)
                    .bind(uid)
                    .execute(&mut *tx)
                    .await?;
                uid
            }
        };
        tx.commit().await?;
        Ok(current)
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
            .map_err(|e| match StoreError::from(e) {
                StoreError::AlreadyExists(_) => StoreError::AlreadyExists(format!("node {}", node.node)),
                other => other,
            })?;
        tx.commit().await?;
        Ok(NodeRecord {
            service: node.service.to_string(),
            state: NodeState {
                id,
                node: node.node.to_string(),
                available: node.available,
                current_load: node.current_load,
                capacity: node.capacity,
                downed: i64::from(node.downed),
                backoff: i64::from(node.backoff),
            },
        })
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
