//! `SyncStore` for MySQL and MariaDB: its SQL; the implementation is [`crate::sql_backend`]'s.

use sqlx::mysql::{MySqlArguments, MySqlRow};
use sqlx::MySql;

use super::MySqlStore;

mod sql {
    pub const EXISTING_TABLES: &str = "SELECT CAST(table_name AS CHAR) FROM information_schema.tables \
        WHERE table_schema = DATABASE() \
        AND table_name IN ('services', 'nodes', 'users', '__diesel_schema_migrations')";

    pub const APPLIED_VERSIONS: &str = "SELECT CAST(version AS CHAR) FROM __diesel_schema_migrations";

    pub const RECORD_VERSION: &str = "INSERT INTO __diesel_schema_migrations (version) VALUES (?)";

    pub const SERVICE_ID: &str = "SELECT id FROM services WHERE service = ?";

    pub const USER_ROWS: &str = "SELECT users.uid, nodes.id, nodes.node, users.generation, users.keys_changed_at, \
        users.client_state, users.created_at, users.replaced_at \
        FROM users LEFT OUTER JOIN nodes ON users.nodeid = nodes.id \
        WHERE users.email = ? AND users.service = (SELECT id FROM services WHERE service = ?) \
        ORDER BY users.created_at DESC, users.uid DESC LIMIT 20";

    pub const LOCK_USER: &str = "SELECT uid FROM users WHERE email = ? AND service = ? FOR UPDATE";

    pub const LOCK_NODES: &str = "SELECT id, node, available, current_load, capacity, downed, backoff \
        FROM nodes WHERE service = ? ORDER BY id FOR UPDATE";

    pub const RELEASE: &str = "UPDATE nodes SET available = ? WHERE id = ?";

    pub const ADD_USER_TO_NODE: &str =
        "UPDATE nodes SET current_load = current_load + 1, available = GREATEST(available - 1, 0) WHERE id = ?";

    pub const POST_USER: &str = "INSERT INTO users \
        (service, email, generation, client_state, created_at, nodeid, keys_changed_at, replaced_at) \
        VALUES (?, ?, ?, ?, ?, ?, ?, NULL)";

    pub const PUT_USER: &str = "UPDATE users SET generation = ?, keys_changed_at = ? \
        WHERE service = ? AND email = ? AND generation <= ? \
        AND COALESCE(keys_changed_at, 0) <= COALESCE(?, keys_changed_at, 0) AND replaced_at IS NULL";

    pub const REPLACE_OTHERS: &str = "UPDATE users SET replaced_at = ? \
        WHERE service = ? AND email = ? AND replaced_at IS NULL AND uid <> ?";

    pub const REPLACE_USER: &str = "UPDATE users SET replaced_at = ? \
        WHERE service = (SELECT id FROM services WHERE service = ?) AND uid = ? AND replaced_at IS NULL";

    pub const RETIRE_USER: &str = "UPDATE users SET generation = ?, replaced_at = ? \
        WHERE service = (SELECT id FROM services WHERE service = ?) AND email = ? AND replaced_at IS NULL";

    pub const UPDATE_USER_GENERATION: &str = "UPDATE users SET generation = COALESCE(?, generation), \
        keys_changed_at = COALESCE(?, keys_changed_at) \
        WHERE service = (SELECT id FROM services WHERE service = ?) AND email = ? \
        AND generation <= COALESCE(?, generation) \
        AND COALESCE(keys_changed_at, 0) <= COALESCE(?, keys_changed_at, 0) AND replaced_at IS NULL";

    pub const INSERT_NODE: &str =
        "INSERT INTO nodes (service, node, available, current_load, capacity, downed, backoff) \
        VALUES (?, ?, ?, ?, ?, ?, ?)";

    pub const INIT_NODE: &str =
        "INSERT IGNORE INTO nodes (service, node, available, current_load, capacity, downed, backoff) \
        VALUES (?, ?, ?, 0, ?, 0, 0)";

    pub const LIST_NODES: &str = "SELECT COALESCE(services.service, ''), nodes.id, nodes.node, nodes.available, \
        nodes.current_load, nodes.capacity, nodes.downed, nodes.backoff \
        FROM nodes LEFT OUTER JOIN services ON nodes.service = services.id \
        WHERE (? IS NULL OR services.service = ?) ORDER BY nodes.id";

    pub const INSERT_SERVICE: &str = "INSERT INTO services (service, pattern) VALUES (?, ?)";
}

/// Runs an `INSERT` and reads `LAST_INSERT_ID()` from the same connection.
async fn insert_id<'q>(
    q: sqlx::query::Query<'q, MySql, MySqlArguments>,
    conn: &mut sqlx::MySqlConnection,
) -> crate::sync::Result<i64> {
    let done = q.execute(conn).await?;
    i64::try_from(done.last_insert_id()).map_err(|_| StoreError::Backend("insert id out of range".into()))
}

crate::sql_backend::sync_store!(store: MySqlStore, db: MySql, row: MySqlRow, conn: sqlx::MySqlConnection);
