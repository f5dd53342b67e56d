//! `SyncStore` for PostgreSQL: its SQL; the implementation is [`crate::sql::sync`]'s. INTEGER
//! columns are read as BIGINT (`::BIGINT`) so one Rust type serves every backend.

use sqlx::postgres::PgArguments;
use sqlx::{Postgres, Row};

/// PostgreSQL's statements for the shared Sync store.
pub(crate) struct PgSql;

impl crate::sql::SyncSql for PgSql {
    const EXISTING_TABLES: &'static str = "SELECT table_name::TEXT FROM information_schema.tables \
        WHERE table_schema = current_schema() \
        AND table_name IN ('services', 'nodes', 'users', '__diesel_schema_migrations')";

    const APPLIED_VERSIONS: &'static str = "SELECT version::TEXT FROM __diesel_schema_migrations";

    const RECORD_VERSION: &'static str = "INSERT INTO __diesel_schema_migrations (version) VALUES ($1)";

    const SERVICE_ID: &'static str = "SELECT id::BIGINT FROM services WHERE service = $1";

    const USER_ROWS: &'static str =
        "SELECT users.uid, nodes.id, nodes.node::TEXT, users.generation, users.keys_changed_at, \
        users.client_state::TEXT, users.created_at, users.replaced_at \
        FROM users LEFT OUTER JOIN nodes ON users.nodeid = nodes.id \
        WHERE users.email = $1 AND users.service = (SELECT id FROM services WHERE service = $2) \
        ORDER BY users.created_at DESC, users.uid DESC LIMIT 20";

    const LOCK_USER: Option<&'static str> = Some("SELECT uid FROM users WHERE email = $1 AND service = $2 FOR UPDATE");

    const LOCK_NODES: &'static str =
        "SELECT id, node::TEXT, available::BIGINT, current_load::BIGINT, capacity::BIGINT, \
        downed::BIGINT, backoff::BIGINT FROM nodes WHERE service = $1 ORDER BY id FOR UPDATE";

    const RELEASE: &'static str = "UPDATE nodes SET available = $1 WHERE id = $2";

    const ADD_USER_TO_NODE: &'static str =
        "UPDATE nodes SET current_load = current_load + 1, available = GREATEST(available - 1, 0) WHERE id = $1";

    const POST_USER: &'static str = "INSERT INTO users \
        (service, email, generation, client_state, created_at, nodeid, keys_changed_at, replaced_at) \
        VALUES ($1, $2, $3, $4, $5, $6, $7, NULL) RETURNING uid";

    const PUT_USER: &'static str = "UPDATE users SET generation = $1, keys_changed_at = $2 \
        WHERE service = $3 AND email = $4 AND generation <= $5 \
        AND COALESCE(keys_changed_at, 0) <= COALESCE($6, keys_changed_at, 0) AND replaced_at IS NULL";

    const REPLACE_OTHERS: &'static str = "UPDATE users SET replaced_at = $1 \
        WHERE service = $2 AND email = $3 AND replaced_at IS NULL AND uid <> $4";

    const REPLACE_USER: &'static str = "UPDATE users SET replaced_at = $1 \
        WHERE service = (SELECT id FROM services WHERE service = $2) AND uid = $3 AND replaced_at IS NULL";

    const RETIRE_USER: &'static str = "UPDATE users SET generation = $1, replaced_at = $2 \
        WHERE service = (SELECT id FROM services WHERE service = $3) AND email = $4 AND replaced_at IS NULL";

    const UPDATE_USER_GENERATION: &'static str = "UPDATE users SET generation = COALESCE($1, generation), \
        keys_changed_at = COALESCE($2, keys_changed_at) \
        WHERE service = (SELECT id FROM services WHERE service = $3) AND email = $4 \
        AND generation <= COALESCE($5, generation) \
        AND COALESCE(keys_changed_at, 0) <= COALESCE($6, keys_changed_at, 0) AND replaced_at IS NULL";

    const INSERT_NODE: &'static str =
        "INSERT INTO nodes (service, node, available, current_load, capacity, downed, backoff) \
        VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id";

    const INIT_NODE: &'static str =
        "INSERT INTO nodes (service, node, available, current_load, capacity, downed, backoff) \
        VALUES ($1, $2, $3, 0, $4, 0, 0) ON CONFLICT (service, node) DO NOTHING";

    const LIST_NODES: &'static str = "SELECT COALESCE(services.service, '')::TEXT, nodes.id, nodes.node::TEXT, \
        nodes.available::BIGINT, nodes.current_load::BIGINT, nodes.capacity::BIGINT, nodes.downed::BIGINT, \
        nodes.backoff::BIGINT \
        FROM nodes LEFT OUTER JOIN services ON nodes.service = services.id \
        WHERE ($1::TEXT IS NULL OR services.service = $2) ORDER BY nodes.id";

    const INSERT_SERVICE: &'static str = "INSERT INTO services (service, pattern) VALUES ($1, $2)";

    const NODE_ID: &'static str = "SELECT nodes.id::BIGINT FROM nodes JOIN services ON nodes.service = services.id \
        WHERE services.service = $1 AND nodes.node = $2";

    const UPDATE_NODE: &'static str = "UPDATE nodes SET capacity = COALESCE($1, capacity), \
        available = COALESCE($2, available), current_load = COALESCE($3, current_load), \
        downed = COALESCE($4, downed), backoff = COALESCE($5, backoff) WHERE id = $6";

    const UNASSIGN_NODE: &'static str = "UPDATE users SET replaced_at = $1 WHERE nodeid = $2 AND replaced_at IS NULL";

    const DELETE_NODE: &'static str = "DELETE FROM nodes WHERE id = $1";

    const NODE_USERS: &'static str = "SELECT nodeid::BIGINT, COUNT(*)::BIGINT FROM users \
        WHERE replaced_at IS NULL AND nodeid IS NOT NULL GROUP BY nodeid ORDER BY nodeid";

    const USER_EMAIL: &'static str =
        "SELECT email::TEXT FROM users WHERE service = (SELECT id FROM services WHERE service = $1) AND uid = $2";

    const RECORD_OF: &'static str = "SELECT email::TEXT, nodeid FROM users WHERE service = $1 AND uid = $2";

    const FREE_SLOT: &'static str = "UPDATE nodes SET available = available + \
        (CASE WHEN available + GREATEST(current_load - 1, 0) < capacity THEN 1 ELSE 0 END), \
        current_load = GREATEST(current_load - 1, 0) WHERE id = $1";

    const DELETE_USER: &'static str = "DELETE FROM users WHERE service = $1 AND uid = $2";

    const COUNT_USERS: &'static str = "SELECT COUNT(*)::BIGINT FROM users \
        WHERE replaced_at IS NULL AND created_at <= $1 \
        AND ($2::TEXT IS NULL OR service = (SELECT id FROM services WHERE service = $3))";

    const OLD_RECORDS: &'static str = "SELECT users.uid, users.email::TEXT, users.generation, \
        users.keys_changed_at, users.client_state::TEXT, nodes.node::TEXT, COALESCE(nodes.downed, 0)::BIGINT, \
        users.created_at, users.replaced_at \
        FROM users LEFT OUTER JOIN nodes ON users.nodeid = nodes.id \
        WHERE users.service = (SELECT id FROM services WHERE service = $1) \
        AND users.replaced_at IS NOT NULL AND users.replaced_at < $2 \
        AND (users.replaced_at > $3 OR (users.replaced_at = $4 AND users.uid > $5)) \
        AND users.uid > $6 AND users.uid < $7 ORDER BY users.replaced_at, users.uid LIMIT $8";

    const BUMP_REPLACED: &'static str = "UPDATE users SET replaced_at = $1 \
        WHERE service = (SELECT id FROM services WHERE service = $2) AND uid = $3 AND replaced_at IS NOT NULL";

    const CREATE_BUCKETS: &'static str = "CREATE TABLE IF NOT EXISTS tokenserver_buckets \
        (service BIGINT NOT NULL, bucket BIGINT NOT NULL, node BIGINT NOT NULL, PRIMARY KEY (service, bucket))";

    const BUCKET_NODE: &'static str = "SELECT node FROM tokenserver_buckets WHERE service = $1 AND bucket = $2";

    const SET_BUCKET_NODE: &'static str =
        "INSERT INTO tokenserver_buckets (service, bucket, node) VALUES ($1, $2, $3) \
        ON CONFLICT (service, bucket) DO UPDATE SET node = EXCLUDED.node";

    const LIST_BUCKETS: &'static str = "SELECT tokenserver_buckets.bucket, nodes.node::TEXT FROM tokenserver_buckets \
        JOIN services ON services.id = tokenserver_buckets.service \
        LEFT OUTER JOIN nodes ON nodes.id = tokenserver_buckets.node \
        WHERE services.service = $1 ORDER BY tokenserver_buckets.bucket";

    const LIVE_ROWS: &'static str =
        "SELECT uid, email::TEXT, nodeid FROM users WHERE service = $1 AND replaced_at IS NULL";

    const REPLACE_UID: &'static str =
        "UPDATE users SET replaced_at = $1 WHERE service = $2 AND uid = $3 AND replaced_at IS NULL";
}

/// Runs an `INSERT … RETURNING id`.
pub(crate) async fn insert_id<'q>(
    q: sqlx::query::Query<'q, Postgres, PgArguments>,
    conn: &mut sqlx::PgConnection,
) -> crate::sync::Result<i64> {
    Ok(q.fetch_one(conn).await?.try_get(0)?)
}

crate::sql::sync::sync_store!(
    store: crate::postgres::PgStore, sql: crate::postgres::sync::PgSql, insert_id: crate::postgres::sync::insert_id,
    db: sqlx::Postgres, row: sqlx::postgres::PgRow, conn: sqlx::PgConnection,
);
