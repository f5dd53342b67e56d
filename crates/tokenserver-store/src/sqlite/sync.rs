//! `SyncStore` for SQLite: its SQL; the implementation is [`crate::sql_backend`]'s.

use sqlx::sqlite::{SqliteArguments, SqliteRow};
use sqlx::Sqlite;

use super::{write, SqliteStore};

pub(super) mod sql {
    pub const EXISTING_TABLES: &str = "SELECT name FROM sqlite_master WHERE type = 'table' \
        AND name IN ('services', 'nodes', 'users', '__diesel_schema_migrations')";

    pub const APPLIED_VERSIONS: &str = "SELECT version FROM __diesel_schema_migrations";

    pub const RECORD_VERSION: &str = "INSERT INTO __diesel_schema_migrations (version) VALUES (?)";

    pub const SERVICE_ID: &str = "SELECT id FROM services WHERE service = ?";

    /// Plans pinned: with statistics (after an `ANALYZE`) SQLite plans the node `LEFT JOIN` as a
    /// scan of `unique_idx`, which doubled the cost of a request (benchmarked); rowid subqueries
    /// give the same columns (NULL when the node is gone) with a lookup whatever the statistics.
    pub const USER_ROWS: &str = "SELECT users.uid, (SELECT id FROM nodes WHERE id = users.nodeid), \
        (SELECT node FROM nodes WHERE id = users.nodeid), users.generation, users.keys_changed_at, \
        users.client_state, users.created_at, users.replaced_at \
        FROM users INDEXED BY lookup_idx \
        WHERE users.email = ? AND users.service = (SELECT id FROM services WHERE service = ?) \
        ORDER BY users.created_at DESC, users.uid DESC LIMIT 20";

    /// Writes go through one connection in `BEGIN IMMEDIATE` transactions: no row locks needed.
    pub const LOCK_USER: Option<&str> = None;

    pub const LOCK_NODES: &str = "SELECT id, node, available, current_load, capacity, downed, backoff \
        FROM nodes WHERE service = ? ORDER BY id";

    pub const RELEASE: &str = "UPDATE nodes SET available = ? WHERE id = ?";

    pub const ADD_USER_TO_NODE: &str =
        "UPDATE nodes SET current_load = current_load + 1, available = MAX(available - 1, 0) WHERE id = ?";

    pub const POST_USER: &str = "INSERT INTO users \
        (service, email, generation, client_state, created_at, nodeid, keys_changed_at, replaced_at) \
        VALUES (?, ?, ?, ?, ?, ?, ?, NULL) RETURNING uid";

    // SQLite's planner, without statistics, prefers replaced_at_idx (service, replaced_at) for
    // these, i.e. a scan of every live user of the service: the writes that filter by email are
    // pinned to lookup_idx (email, service, created_at).
    pub const PUT_USER: &str = "UPDATE users INDEXED BY lookup_idx SET generation = ?, keys_changed_at = ? \
        WHERE service = ? AND email = ? AND generation <= ? \
        AND COALESCE(keys_changed_at, 0) <= COALESCE(?, keys_changed_at, 0) AND replaced_at IS NULL";

    pub const REPLACE_OTHERS: &str = "UPDATE users INDEXED BY lookup_idx SET replaced_at = ? \
        WHERE service = ? AND email = ? AND replaced_at IS NULL AND uid <> ?";

    pub const REPLACE_USER: &str = "UPDATE users SET replaced_at = ? \
        WHERE service = (SELECT id FROM services WHERE service = ?) AND uid = ? AND replaced_at IS NULL";

    pub const RETIRE_USER: &str = "UPDATE users INDEXED BY lookup_idx SET generation = ?, replaced_at = ? \
        WHERE service = (SELECT id FROM services WHERE service = ?) AND email = ? AND replaced_at IS NULL";

    pub const UPDATE_USER_GENERATION: &str =
        "UPDATE users INDEXED BY lookup_idx SET generation = COALESCE(?, generation), \
        keys_changed_at = COALESCE(?, keys_changed_at) \
        WHERE service = (SELECT id FROM services WHERE service = ?) AND email = ? \
        AND generation <= COALESCE(?, generation) \
        AND COALESCE(keys_changed_at, 0) <= COALESCE(?, keys_changed_at, 0) AND replaced_at IS NULL";

    pub const INSERT_NODE: &str = "INSERT INTO nodes \
        (service, node, available, current_load, capacity, downed, backoff) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id";

    pub const INIT_NODE: &str = "INSERT OR IGNORE INTO nodes \
        (service, node, available, current_load, capacity, downed, backoff) VALUES (?, ?, ?, 0, ?, 0, 0)";

    pub const LIST_NODES: &str = "SELECT COALESCE(services.service, ''), nodes.id, nodes.node, nodes.available, \
        nodes.current_load, nodes.capacity, nodes.downed, nodes.backoff \
        FROM nodes LEFT OUTER JOIN services ON nodes.service = services.id \
        WHERE (? IS NULL OR services.service = ?) ORDER BY nodes.id";

    pub const INSERT_SERVICE: &str = "INSERT INTO services (service, pattern) VALUES (?, ?)";
}

/// A `users` row as `USER_ROWS` selects it, read through rusqlite.
pub(super) fn user_row_rusqlite(r: &rusqlite::Row<'_>) -> rusqlite::Result<UserRow> {
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

/// Runs an `INSERT … RETURNING id`.
async fn insert_id<'q>(
    q: sqlx::query::Query<'q, Sqlite, SqliteArguments<'q>>,
    conn: &mut sqlx::SqliteConnection,
) -> crate::sync::Result<i64> {
    Ok(q.fetch_one(conn).await?.try_get(0)?)
}

impl SqliteStore {
    fn reader(&self) -> &sqlx::SqlitePool {
        &self.read
    }

    fn writer(&self) -> &sqlx::SqlitePool {
        &self.write
    }

    /// `SELECT 1` through the sqlx read pool (opening the database file is what can fail).
    async fn probe(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.read).await?;
        Ok(())
    }

    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, Sqlite>> {
        Ok(self.write.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// `allocate_user` on the rusqlite writer when the database is a file.
    async fn write_allocate(&self, req: &Allocate<'_>) -> Result<UserRow> {
        let Some(writer) = &self.writer else {
            return self.sqlx_allocate(req).await;
        };
        let client_state = req.client_state.to_string();
        let owned = (req.generation, req.keys_changed_at, req.expected_current, req.now_ms, req.release_rate);
        writer
            .run((req.service.to_string(), req.email.to_string()), move |wtx, service, email| {
                let (generation, keys_changed_at, expected_current, now_ms, release_rate) = owned;
                let req = Allocate {
                    service,
                    email,
                    generation,
                    client_state: &client_state,
                    keys_changed_at,
                    expected_current,
                    now_ms,
                    release_rate,
                };
                write::run_now(tx::allocate(wtx, &req))
            })
            .await
    }

    /// `change_user` on the rusqlite writer when the database is a file.
    async fn write_change(
        &self,
        service: &str,
        email: &str,
        expected_current: i64,
        change: &UserChange<'_>,
        now_ms: i64,
    ) -> Result<i64> {
        let Some(writer) = &self.writer else {
            return self.sqlx_change(service, email, expected_current, change, now_ms).await;
        };
        let key = (service.to_string(), email.to_string());
        let owned = match change {
            UserChange::Update { generation, keys_changed_at } => (*generation, *keys_changed_at, None, 0),
            UserChange::NewClientState { generation, keys_changed_at, client_state, node_id } => {
                (*generation, *keys_changed_at, Some(client_state.to_string()), *node_id)
            }
        };
        writer
            .run(key, move |wtx, service, email| {
                let (generation, keys_changed_at, client_state, node_id) = owned;
                let change = match &client_state {
                    None => UserChange::Update { generation, keys_changed_at },
                    Some(cs) => UserChange::NewClientState { generation, keys_changed_at, client_state: cs, node_id },
                };
                write::run_now(tx::change(wtx, service, email, expected_current, &change, now_ms))
            })
            .await
    }

    /// A user's rows: inline through `rusqlite` when the database is a file.
    async fn read_user_rows(&self, service: &str, email: &str) -> Result<Vec<UserRow>> {
        let Some(inline) = &self.inline else {
            // In memory: through the sqlx pool.
            let mut conn = self.reader().acquire().await?;
            return rows_of(&mut conn, service, email).await;
        };
        let cache = self.rows.as_deref();
        let header = cache.and_then(|c| c.header());
        if let (Some(cache), Some(header)) = (cache, &header) {
            if let Some(rows) = cache.get(header, (service, email)) {
                return Ok(rows.to_vec());
            }
        }
        let rows: Vec<UserRow> = inline.with(|conn| {
            let mut stmt = conn.prepare_cached(sql::USER_ROWS)?;
            let rows = stmt.query_map((email, service), user_row_rusqlite)?;
            rows.collect()
        })?;
        if let (Some(cache), Some(header)) = (cache, &header) {
            cache.put(header, (service, email), rows.as_slice().into());
        }
        Ok(rows)
    }

    async fn generated_secret(&self, generate: &(dyn Fn() -> String + Send + Sync)) -> Result<(String, bool)> {
        let mut tx = self.begin_write().await?;
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

crate::sql_backend::sync_store!(
    store: SqliteStore, db: Sqlite, row: SqliteRow, conn: sqlx::SqliteConnection,
    request_path: (read_user_rows, write_allocate, write_change),
);
