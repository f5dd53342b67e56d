//! `SyncStore` for PostgreSQL: its SQL; the implementation is [`crate::sql_backend`]'s. INTEGER
//! columns are read as BIGINT (`::BIGINT`) so one Rust type serves every backend.

use sqlx::postgres::{PgArguments, PgRow};
use sqlx::Postgres;

use super::PgStore;

mod sql {
    pub const EXISTING_TABLES: &str = "SELECT table_name::TEXT FROM information_schema.tables \
        WHERE table_schema = current_schema() \
        AND table_name IN ('services', 'nodes', 'users', '__diesel_schema_migrations')";

    pub const APPLIED_VERSIONS: &str = "SELECT version::TEXT FROM __diesel_schema_migrations";

    pub const RECORD_VERSION: &str = "INSERT INTO __diesel_schema_migrations (version) VALUES ($1)";

    pub const SERVICE_ID: &str = "SELECT id::BIGINT FROM services WHERE service = $1";

    pub const USER_ROWS: &str =
        "SELECT users.uid, nodes.id, nodes.node::TEXT, users.generation, users.keys_changed_at, \
        users.client_state::TEXT, users.created_at, users.replaced_at \
        FROM users LEFT OUTER JOIN nodes ON users.nodeid = nodes.id \
        WHERE users.email = $1 AND users.service = (SELECT id FROM services WHERE service = $2) \
        ORDER BY users.created_at DESC, users.uid DESC LIMIT 20";

    pub const LOCK_USER: &str = "SELECT uid FROM users WHERE email = $1 AND service = $2 FOR UPDATE";

    pub const LOCK_NODES: &str = "SELECT id, node::TEXT, available::BIGINT, current_load::BIGINT, capacity::BIGINT, \
        downed::BIGINT, backoff::BIGINT FROM nodes WHERE service = $1 ORDER BY id FOR UPDATE";

    pub const RELEASE: &str = "UPDATE nodes SET available = $1 WHERE id = $2";

    pub const ADD_USER_TO_NODE: &str =
        "UPDATE nodes SET current_load = current_load + 1, available = GREATEST(available - 1, 0) WHERE id = $1";

    pub const POST_USER: &str = "INSERT INTO users \
        (service, email, generation, client_state, created_at, nodeid, keys_changed_at, replaced_at) \
        VALUES ($1, $2, $3, $4, $5, $6, $7, NULL) RETURNING uid";

    pub const PUT_USER: &str = "UPDATE users SET generation = $1, keys_changed_at = $2 \
        WHERE service = $3 AND email = $4 AND generation <= $5 \
        AND COALESCE(keys_changed_at, 0) <= COALESCE($6, keys_changed_at, 0) AND replaced_at IS NULL";

    pub const REPLACE_OTHERS: &str = "UPDATE users SET replaced_at = $1 \
        WHERE service = $2 AND email = $3 AND replaced_at IS NULL AND uid <> $4";

    pub const REPLACE_USER: &str = "UPDATE users SET replaced_at = $1 \
        WHERE service = (SELECT id FROM services WHERE service = $2) AND uid = $3 AND replaced_at IS NULL";

    pub const RETIRE_USER: &str = "UPDATE users SET generation = $1, replaced_at = $2 \
        WHERE service = (SELECT id FROM services WHERE service = $3) AND email = $4 AND replaced_at IS NULL";

    pub const UPDATE_USER_GENERATION: &str = "UPDATE users SET generation = COALESCE($1, generation), \
        keys_changed_at = COALESCE($2, keys_changed_at) \
        WHERE service = (SELECT id FROM services WHERE service = $3) AND email = $4 \
        AND generation <= COALESCE($5, generation) \
        AND COALESCE(keys_changed_at, 0) <= COALESCE($6, keys_changed_at, 0) AND replaced_at IS NULL";

    pub const INSERT_NODE: &str =
        "INSERT INTO nodes (service, node, available, current_load, capacity, downed, backoff) \
        VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id";

    pub const INIT_NODE: &str =
        "INSERT INTO nodes (service, node, available, current_load, capacity, downed, backoff) \
        VALUES ($1, $2, $3, 0, $4, 0, 0) ON CONFLICT (service, node) DO NOTHING";

    pub const LIST_NODES: &str = "SELECT COALESCE(services.service, '')::TEXT, nodes.id, nodes.node::TEXT, \
        nodes.available::BIGINT, nodes.current_load::BIGINT, nodes.capacity::BIGINT, nodes.downed::BIGINT, \
        nodes.backoff::BIGINT \
        FROM nodes LEFT OUTER JOIN services ON nodes.service = services.id \
        WHERE ($1::TEXT IS NULL OR services.service = $2) ORDER BY nodes.id";

    pub const INSERT_SERVICE: &str = "INSERT INTO services (service, pattern) VALUES ($1, $2)";
}

/// Runs an `INSERT … RETURNING id`.
async fn insert_id<'q>(
    q: sqlx::query::Query<'q, Postgres, PgArguments>,
    conn: &mut sqlx::PgConnection,
) -> crate::sync::Result<i64> {
    Ok(q.fetch_one(conn).await?.try_get(0)?)
}

crate::sql_backend::sync_store!(store: PgStore, db: Postgres, row: PgRow, conn: sqlx::PgConnection);
