//! `SyncStore` for MySQL and MariaDB: its SQL; the implementation is [`crate::sql::sync`]'s.

use sqlx::mysql::MySqlArguments;
use sqlx::MySql;

use crate::StoreError;

/// MySQL's and MariaDB's statements for the shared Sync store.
pub(crate) struct MySqlSql;

impl crate::sql::SyncSql for MySqlSql {
    const EXISTING_TABLES: &'static str = "SELECT CAST(table_name AS CHAR) FROM information_schema.tables \
        WHERE table_schema = DATABASE() \
        AND table_name IN ('services', 'nodes', 'users', '__diesel_schema_migrations')";

    const APPLIED_VERSIONS: &'static str = "SELECT CAST(version AS CHAR) FROM __diesel_schema_migrations";

    const RECORD_VERSION: &'static str = "INSERT INTO __diesel_schema_migrations (version) VALUES (?)";

    const SERVICE_ID: &'static str = "SELECT id FROM services WHERE service = ?";

    const USER_ROWS: &'static str = "SELECT users.uid, nodes.id, nodes.node, users.generation, users.keys_changed_at, \
        users.client_state, users.created_at, users.replaced_at \
        FROM users LEFT OUTER JOIN nodes ON users.nodeid = nodes.id \
        WHERE users.email = ? AND users.service = (SELECT id FROM services WHERE service = ?) \
        ORDER BY users.created_at DESC, users.uid DESC LIMIT 20";

    const LOCK_USER: Option<&'static str> = Some("SELECT uid FROM users WHERE email = ? AND service = ? FOR UPDATE");

    const LOCK_NODES: &'static str = "SELECT id, node, available, current_load, capacity, downed, backoff \
        FROM nodes WHERE service = ? ORDER BY id FOR UPDATE";

    const RELEASE: &'static str = "UPDATE nodes SET available = ? WHERE id = ?";

    const ADD_USER_TO_NODE: &'static str =
        "UPDATE nodes SET current_load = current_load + 1, available = GREATEST(available - 1, 0) WHERE id = ?";

    const POST_USER: &'static str = "INSERT INTO users \
        (service, email, generation, client_state, created_at, nodeid, keys_changed_at, replaced_at) \
        VALUES (?, ?, ?, ?, ?, ?, ?, NULL)";

    const PUT_USER: &'static str = "UPDATE users SET generation = ?, keys_changed_at = ? \
        WHERE service = ? AND email = ? AND generation <= ? \
        AND COALESCE(keys_changed_at, 0) <= COALESCE(?, keys_changed_at, 0) AND replaced_at IS NULL";

    const REPLACE_OTHERS: &'static str = "UPDATE users SET replaced_at = ? \
        WHERE service = ? AND email = ? AND replaced_at IS NULL AND uid <> ?";

    const REPLACE_USER: &'static str = "UPDATE users SET replaced_at = ? \
        WHERE service = (SELECT id FROM services WHERE service = ?) AND uid = ? AND replaced_at IS NULL";

    const RETIRE_USER: &'static str = "UPDATE users SET generation = ?, replaced_at = ? \
        WHERE service = (SELECT id FROM services WHERE service = ?) AND email = ? AND replaced_at IS NULL";

    const UPDATE_USER_GENERATION: &'static str = "UPDATE users SET generation = COALESCE(?, generation), \
        keys_changed_at = COALESCE(?, keys_changed_at) \
        WHERE service = (SELECT id FROM services WHERE service = ?) AND email = ? \
        AND generation <= COALESCE(?, generation) \
        AND COALESCE(keys_changed_at, 0) <= COALESCE(?, keys_changed_at, 0) AND replaced_at IS NULL";

    const INSERT_NODE: &'static str =
        "INSERT INTO nodes (service, node, available, current_load, capacity, downed, backoff) \
        VALUES (?, ?, ?, ?, ?, ?, ?)";

    const INIT_NODE: &'static str =
        "INSERT IGNORE INTO nodes (service, node, available, current_load, capacity, downed, backoff) \
        VALUES (?, ?, ?, 0, ?, 0, 0)";

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
        (service INT NOT NULL, bucket BIGINT NOT NULL, node BIGINT NOT NULL, PRIMARY KEY (service, bucket))";
    const SET_BUCKET_NODE: &'static str = "INSERT INTO tokenserver_buckets (service, bucket, node) VALUES (?, ?, ?) \
        ON DUPLICATE KEY UPDATE node = VALUES(node)";
    // `available` first: MySQL assigns left to right, so the second sees the first's result.
    const FREE_SLOT: &'static str = "UPDATE nodes SET available = available + \
        (CASE WHEN available + GREATEST(current_load - 1, 0) < capacity THEN 1 ELSE 0 END), \
        current_load = GREATEST(current_load - 1, 0) WHERE id = ?";
}

/// Runs an `INSERT` and reads `LAST_INSERT_ID()` from the same connection.
pub(crate) async fn insert_id<'q>(
    q: sqlx::query::Query<'q, MySql, MySqlArguments>,
    conn: &mut sqlx::MySqlConnection,
) -> crate::sync::Result<i64> {
    let done = q.execute(conn).await?;
    i64::try_from(done.last_insert_id()).map_err(|_| StoreError::Backend("insert id out of range".into()))
}

crate::sql::sync::sync_store!(
    store: crate::mysql::MySqlStore, sql: crate::mysql::sync::MySqlSql, insert_id: crate::mysql::sync::insert_id,
    db: sqlx::MySql, row: sqlx::mysql::MySqlRow, conn: sqlx::MySqlConnection,
);
