//! `SyncStore` for MySQL and MariaDB: its SQL; the implementation is [`crate::sql::sync`]'s.

use sqlx::mysql::MySqlArguments;
use sqlx::{MySql, Row};
use tokenserver_core::sync::users::UserRow;

use crate::sql::read_pool::{read, ReadPool};
use crate::sql::UserKey;
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

    const ADD_USERS_TO_NODE: &'static str =
        "UPDATE nodes SET current_load = current_load + ?, available = GREATEST(available - ?, 0) WHERE id = ?";

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

/// Users' rows reads one statement carries at most. MariaDB plans each `UNION ALL` branch on
/// every execution, so a long statement holds the next calls back: smaller batches, more of them
/// out at once than on PostgreSQL.
pub(crate) const ROWS_BATCH: usize = 16;
/// Rows-read statements out at once: four, not eight, cut the p99 by a quarter at the same rate
/// (bench/results/postgres-in-flight-ab.md, MariaDB section).
pub(crate) const ROWS_IN_FLIGHT: usize = 4;
/// Batch sizes a rows read is padded to: each is one statement text, prepared once per
/// connection (a size per number of calls would prepare up to [`ROWS_BATCH`]).
const ROWS_SIZES: [usize; 5] = [1, 2, 4, 8, ROWS_BATCH];

/// `n` users' rows in one statement: [`MySqlSql::USER_ROWS`] once per user with its position
/// first, joined by `UNION ALL`. Each branch is that query exactly, so emails compare as they
/// do there (the column's collation), and each user gets at most its 20 newest rows.
fn user_rows_many(n: usize) -> String {
    let branch = |i: usize| {
        format!(
            "(SELECT {i}, users.uid, nodes.id, nodes.node, users.generation, users.keys_changed_at, \
             users.client_state, users.created_at, users.replaced_at \
             FROM users LEFT OUTER JOIN nodes ON users.nodeid = nodes.id \
             WHERE users.email = ? AND users.service = (SELECT id FROM services WHERE service = ?) \
             ORDER BY users.created_at DESC, users.uid DESC LIMIT 20)"
        )
    };
    (0..n).map(branch).collect::<Vec<_>>().join(" UNION ALL ")
}

/// The rows of each of `keys` ((service, email)), in order, in one statement; the statement is
/// padded to the next of [`ROWS_SIZES`] with the last key, whose extra answers are dropped.
async fn users_rows_on(
    conn: &mut sqlx::MySqlConnection,
    keys: &[(&str, &str)],
) -> Result<Vec<Vec<UserRow>>, sqlx::Error> {
    let Some(last) = keys.last() else { return Ok(Vec::new()) };
    let size = ROWS_SIZES.iter().copied().find(|s| *s >= keys.len()).unwrap_or(keys.len());
    let sql = user_rows_many(size);
    let mut query = sqlx::query(&sql);
    for (service, email) in keys.iter().chain(std::iter::repeat(last)).take(size) {
        query = query.bind(*email).bind(*service);
    }
    let found = query.fetch_all(conn).await?;
    let rows = found
        .iter()
        .map(|r| Ok((r.try_get::<i64, _>(0)?, stamped::user_row_at(r, 1)?)))
        .collect::<std::result::Result<Vec<_>, sqlx::Error>>()?;
    Ok(crate::sql::deal_rows(keys.len(), rows))
}

/// The rows of each of `keys`, in one statement ([`crate::batch::Batcher`]'s run).
pub(crate) async fn rows_many(
    reads: ReadPool<sqlx::MySqlConnection>,
    keys: Vec<UserKey>,
) -> Result<Vec<Result<Vec<UserRow>, StoreError>>, StoreError> {
    let asked: Vec<(&str, &str)> = keys.iter().map(|(s, e)| (s.as_str(), e.as_str())).collect();
    let rows = read!(reads, |c| users_rows_on(c, &asked).await)?;
    Ok(rows.into_iter().map(Ok).collect())
}

/// A batch's users' rows inside its transaction (the set-based allocation step), in statements
/// of at most [`ROWS_BATCH`] users.
pub(crate) async fn users_rows(
    conn: &mut sqlx::MySqlConnection,
    keys: &[(&str, &str)],
) -> crate::sync::Result<Vec<Vec<UserRow>>> {
    let mut all = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(ROWS_BATCH) {
        all.extend(users_rows_on(&mut *conn, chunk).await?);
    }
    Ok(all)
}

/// Locks the rows of every one of `emails` (and, MySQL's way, the gaps where they would go) in
/// one statement.
pub(crate) async fn lock_users(
    conn: &mut sqlx::MySqlConnection,
    service_id: i64,
    emails: &[&str],
) -> crate::sync::Result<()> {
    if emails.is_empty() {
        return Ok(());
    }
    let marks = vec!["?"; emails.len()].join(", ");
    let sql = format!("SELECT uid FROM users WHERE email IN ({marks}) AND service = ? FOR UPDATE");
    let mut query = sqlx::query(&sql);
    for email in emails {
        query = query.bind(*email);
    }
    query.bind(service_id).fetch_all(conn).await?;
    Ok(())
}

/// Inserts rows one statement each (`LAST_INSERT_ID()` names one row); their uids in order.
pub(crate) async fn insert_users(
    conn: &mut sqlx::MySqlConnection,
    users: &[crate::sql::tx::NewUser<'_>],
) -> crate::sync::Result<Vec<i64>> {
    use crate::sql::SyncSql;
    let mut uids = Vec::with_capacity(users.len());
    for u in users {
        let q = sqlx::query(MySqlSql::POST_USER)
            .bind(u.service_id)
            .bind(u.email)
            .bind(u.generation)
            .bind(u.client_state)
            .bind(u.created_at)
            .bind(u.node_id)
            .bind(u.keys_changed_at);
        uids.push(insert_id(q, &mut *conn).await?);
    }
    Ok(uids)
}

crate::sql::sync::sync_store!(
    store: crate::mysql::MySqlStore, sql: crate::mysql::sync::MySqlSql, insert_id: crate::mysql::sync::insert_id,
    lock_users: crate::mysql::sync::lock_users, users_rows: crate::mysql::sync::users_rows,
    insert_users: crate::mysql::sync::insert_users,
    db: sqlx::MySql, row: sqlx::mysql::MySqlRow, conn: sqlx::MySqlConnection,
);
