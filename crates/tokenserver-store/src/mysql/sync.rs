//! `SyncStore` for MySQL and MariaDB: its SQL; the implementation is [`crate::sql::sync`]'s.

use std::sync::atomic::{AtomicBool, Ordering};

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

/// Users a `UNION ALL` statement ([`user_rows_many`]) carries at most. MariaDB plans each branch
/// at every execution, so a long one costs far more per user than the join.
const UNION_BATCH: usize = 16;
/// Batch sizes a `UNION ALL` read is padded to: each is one statement text, prepared once per
/// connection (a size per number of calls would prepare up to [`UNION_BATCH`]).
const ROWS_SIZES: [usize; 5] = [1, 2, 4, 8, UNION_BATCH];

/// `n` users' rows in one statement: [`MySqlSql`]'s `USER_ROWS` once per user with its position
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

/// The rows of each of `keys`, in order, in `UNION ALL` statements of at most [`UNION_BATCH`].
async fn union_rows(conn: &mut sqlx::MySqlConnection, keys: &[(&str, &str)]) -> Result<Vec<Vec<UserRow>>, sqlx::Error> {
    let mut all = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(UNION_BATCH) {
        all.extend(users_rows_on(&mut *conn, chunk).await?);
    }
    Ok(all)
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

/// How `users.email` and `services.service` are declared: the request path's batch read gives
/// its keys the same types, so that they compare exactly as a parameter compared with the
/// column does (its character set and collation) and the lookups use the columns' indexes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyColumns {
    email: ColumnType,
    service: ColumnType,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ColumnType {
    chars: u32,
    charset: String,
    collation: String,
}

impl ColumnType {
    /// `VARCHAR(n) CHARACTER SET … COLLATE …`; `None` for a name that is not a plain identifier
    /// (they come from the server, but are written into SQL).
    fn sql(&self) -> Option<String> {
        let plain = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        (plain(&self.charset) && plain(&self.collation))
            .then(|| format!("VARCHAR({}) CHARACTER SET {} COLLATE {}", self.chars, self.charset, self.collation))
    }

    /// Whether `value` reaches the statement unchanged: no longer than the column, and written
    /// in characters its character set holds (any other value is read the plain way, which
    /// compares it as MySQL always has).
    fn fits(&self, value: &str) -> bool {
        let holds = match self.charset.as_str() {
            "utf8mb4" => true,
            "utf8mb3" | "utf8" => value.chars().all(|c| u32::from(c) <= 0xFFFF),
            _ => value.is_ascii(),
        };
        holds && u32::try_from(value.chars().count()).is_ok_and(|n| n <= self.chars)
    }
}

impl KeyColumns {
    /// Reads the two columns' declarations from the schema; `None` if either is not a
    /// character column.
    pub(crate) async fn read(conn: &mut sqlx::MySqlConnection) -> Result<Option<Self>, sqlx::Error> {
        let found = sqlx::query(
            "SELECT CAST(table_name AS CHAR), CAST(character_maximum_length AS SIGNED), \
             CAST(character_set_name AS CHAR), CAST(collation_name AS CHAR) \
             FROM information_schema.columns WHERE table_schema = DATABASE() \
             AND ((table_name = 'users' AND column_name = 'email') \
             OR (table_name = 'services' AND column_name = 'service'))",
        )
        .fetch_all(conn)
        .await?;
        let mut email = None;
        let mut service = None;
        for r in &found {
            let table: String = r.try_get(0)?;
            let (chars, charset, collation): (Option<i64>, Option<String>, Option<String>) =
                (r.try_get(1)?, r.try_get(2)?, r.try_get(3)?);
            let (Some(chars), Some(charset), Some(collation)) = (chars, charset, collation) else { continue };
            let Ok(chars) = u32::try_from(chars) else { continue };
            let column = ColumnType { chars, charset, collation };
            match table.as_str() {
                "users" => email = Some(column),
                _ => service = Some(column),
            }
        }
        Ok(email.zip(service).map(|(email, service)| Self { email, service }))
    }

    /// These columns and their batch statement, if the server runs it: a server that cannot
    /// (no `JSON_TABLE`) refuses it now, once, and its reads keep the `UNION ALL` statements.
    async fn checked(self, conn: &mut sqlx::MySqlConnection) -> Result<Option<(Self, String)>, sqlx::Error> {
        let Some(sql) = self.statement() else { return Ok(None) };
        match sqlx::query(sql.as_str()).bind("[]").fetch_all(conn).await {
            Ok(_) => Ok(Some((self, sql))),
            Err(sqlx::Error::Database(err)) if refused(err.as_ref()) => {
                tracing::warn!(error = %err, "users' rows are read one UNION ALL branch per user");
                Ok(None)
            }
            // Anything else (a timeout, a lost connection) fails this read only; the next asks again.
            Err(err) => Err(err),
        }
    }

    /// The batch read: the keys arrive as one JSON array of `[service, email]` pairs, which
    /// `JSON_TABLE` turns into rows typed as the columns are. MariaDB plans a statement at every
    /// execution, and plans each branch of a `UNION ALL` on its own: one join costs it a third
    /// to a quarter of the CPU per user of [`user_rows_many`]'s branches for 8 to 16 users
    /// (bench/results/mysql-rows-json-table-ab.md).
    fn statement(&self) -> Option<String> {
        Some(format!(
            "SELECT CAST(k.i AS SIGNED), users.uid, nodes.id, nodes.node, users.generation, users.keys_changed_at, \
             users.client_state, users.created_at, users.replaced_at \
             FROM JSON_TABLE(?, '$[*]' COLUMNS (i FOR ORDINALITY, service {} PATH '$[0]', email {} PATH '$[1]')) AS k \
             JOIN services ON services.service = k.service \
             JOIN users ON users.email = k.email AND users.service = services.id \
             LEFT OUTER JOIN nodes ON users.nodeid = nodes.id",
            self.service.sql()?,
            self.email.sql()?
        ))
    }
}

/// Error numbers by which a server says it cannot run the join at all, as opposed to failing one
/// read: a syntax error (no `JSON_TABLE`), an unknown character set, a feature not supported, a
/// collation not valid for the set, an unknown collation, an unknown function (two spellings).
const REFUSED: [u16; 7] = [1064, 1115, 1235, 1253, 1273, 1305, 1630];

/// Whether `err` is one of [`REFUSED`].
fn refused(err: &dyn sqlx::error::DatabaseError) -> bool {
    err.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>().is_some_and(|e| REFUSED.contains(&e.number()))
}

/// The request path's users' rows reads: the batch statement, made once the columns' types are
/// known (the store connects lazily, so not before its first read).
#[derive(Debug, Default)]
pub(crate) struct RowsReader {
    /// `None` inside: the server refused the join, and reads use [`user_rows_many`].
    joined: tokio::sync::OnceCell<Option<(KeyColumns, String)>>,
}

impl RowsReader {
    /// The batch statement, worked out at the first read that finds both columns: until the
    /// schema exists (`run_migrations = false`, the operator migrating later) nothing is kept,
    /// so the join is used as soon as it can be.
    async fn joined(&self, conn: &mut sqlx::MySqlConnection) -> Result<Option<&(KeyColumns, String)>, sqlx::Error> {
        if let Some(joined) = self.joined.get() {
            return Ok(joined.as_ref());
        }
        let Some(columns) = KeyColumns::read(&mut *conn).await? else { return Ok(None) };
        let checked = columns.checked(conn).await?;
        // Another batch may have got there first; both found the same.
        let _ = self.joined.set(checked);
        Ok(self.joined.get().and_then(Option::as_ref))
    }

    /// The rows of each of `keys`, in order: two or more in one join; one alone, or keys the join
    /// could not pass unchanged, as [`union_rows`] reads them.
    async fn rows(
        &self,
        conn: &mut sqlx::MySqlConnection,
        keys: &[(&str, &str)],
    ) -> Result<Vec<Vec<UserRow>>, sqlx::Error> {
        if keys.len() < 2 {
            return union_rows(conn, keys).await;
        }
        let Some((columns, sql)) = self.joined(&mut *conn).await? else { return union_rows(conn, keys).await };
        if !keys.iter().all(|(service, email)| columns.service.fits(service) && columns.email.fits(email)) {
            return union_rows(conn, keys).await;
        }
        let pairs: Vec<[&str; 2]> = keys.iter().map(|(service, email)| [*service, *email]).collect();
        let json = serde_json::to_string(&pairs).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
        let found = sqlx::query(sql.as_str()).bind(json).fetch_all(conn).await?;
        let rows = found
            .iter()
            // Ordinality counts from 1.
            .map(|r| Ok((r.try_get::<i64, _>(0)? - 1, stamped::user_row_at(r, 1)?)))
            .collect::<std::result::Result<Vec<_>, sqlx::Error>>()?;
        let mut dealt = crate::sql::deal_rows(keys.len(), rows);
        for rows in &mut dealt {
            newest_first(rows);
        }
        Ok(dealt)
    }
}

/// A user's rows as [`MySqlSql`]'s `USER_ROWS` orders and bounds them: newest first, at most 20.
fn newest_first(rows: &mut Vec<UserRow>) {
    rows.sort_unstable_by_key(|r| std::cmp::Reverse((r.created_at, r.uid)));
    rows.truncate(20);
}

/// The rows of each of `keys`, in one statement ([`crate::batch::Batcher`]'s run).
pub(crate) async fn rows_many(
    reads: ReadPool<sqlx::MySqlConnection>,
    reader: std::sync::Arc<RowsReader>,
    keys: Vec<UserKey>,
) -> Result<Vec<Result<Vec<UserRow>, StoreError>>, StoreError> {
    let asked: Vec<(&str, &str)> = keys.iter().map(|(s, e)| (s.as_str(), e.as_str())).collect();
    let rows = read!(reads, |c| reader.rows(c, &asked).await)?;
    Ok(rows.into_iter().map(Ok).collect())
}

/// A batch's users' rows inside its transaction (the set-based allocation step), in statements
/// of at most [`UNION_BATCH`] users.
pub(crate) async fn users_rows(
    conn: &mut sqlx::MySqlConnection,
    keys: &[(&str, &str)],
) -> crate::sync::Result<Vec<Vec<UserRow>>> {
    Ok(union_rows(conn, keys).await?)
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

/// Whether a server this process uses refused `INSERT … RETURNING` (MySQL has none, MariaDB only
/// from 10.5): new users then go in one statement each ([`insert_each`]). Process-wide, because a
/// batch's steps see only their connection; another, newer server in the same process would then
/// take the slower path too, with the same rows.
static NO_RETURNING: AtomicBool = AtomicBool::new(false);

/// Users one `INSERT … RETURNING` carries: a batch goes in pieces of these sizes, largest first,
/// so that each connection prepares at most six statement texts.
const INSERT_SIZES: [usize; 6] = [32, 16, 8, 4, 2, 1];

/// Inserts a batch's new users; their uids in order. In as few statements as the server allows:
/// each of them runs while the batch holds its nodes' and users' locks, and one statement a user
/// (one round trip each) made those transactions, not the database's CPU, what limited new users
/// on MariaDB (`bench/results/host-2026-12-07-x.md`).
pub(crate) async fn insert_users(
    conn: &mut sqlx::MySqlConnection,
    users: &[crate::sql::tx::NewUser<'_>],
) -> crate::sync::Result<Vec<i64>> {
    if !NO_RETURNING.load(Ordering::Relaxed) {
        match insert_returning(conn, users).await {
            Ok(uids) => return Ok(uids),
            // Only the first statement can meet this (they all have the same syntax), so no row
            // went in: the batch is inserted again the other way.
            Err(sqlx::Error::Database(err)) if unsupported_syntax(&*err) => {
                if !NO_RETURNING.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %err, "new Sync users are inserted one statement each (no INSERT … RETURNING)");
                }
            }
            Err(err) => return Err(err.into()),
        }
    }
    insert_each(conn, users).await
}

/// `ER_PARSE_ERROR`: the server does not know `RETURNING`.
fn unsupported_syntax(err: &dyn sqlx::error::DatabaseError) -> bool {
    err.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>().is_some_and(|e| e.number() == 1064)
}

/// `INSERT … RETURNING` of `n` users.
fn insert_returning_sql(n: usize) -> String {
    let rows = vec!["(?, ?, ?, ?, ?, ?, ?, NULL)"; n].join(", ");
    format!(
        "INSERT INTO users \
         (service, email, generation, client_state, created_at, nodeid, keys_changed_at, replaced_at) \
         VALUES {rows} RETURNING uid"
    )
}

/// `u`'s seven values, in the order of [`insert_returning_sql`]'s and `POST_USER`'s columns.
fn bind_user<'q>(
    query: sqlx::query::Query<'q, MySql, MySqlArguments>,
    u: &crate::sql::tx::NewUser<'q>,
) -> sqlx::query::Query<'q, MySql, MySqlArguments> {
    query
        .bind(u.service_id)
        .bind(u.email)
        .bind(u.generation)
        .bind(u.client_state)
        .bind(u.created_at)
        .bind(u.node_id)
        .bind(u.keys_changed_at)
}

/// [`insert_users`] with `INSERT … RETURNING` (MariaDB 10.5+), in pieces of [`INSERT_SIZES`].
/// MariaDB inserts the rows in the order of `VALUES`, each taking the next uid, and returns them
/// as it inserts them: a piece's uids must rise, or the answer is not trusted.
async fn insert_returning(
    conn: &mut sqlx::MySqlConnection,
    users: &[crate::sql::tx::NewUser<'_>],
) -> Result<Vec<i64>, sqlx::Error> {
    let mut uids = Vec::with_capacity(users.len());
    let mut rest = users;
    while !rest.is_empty() {
        let n = INSERT_SIZES.into_iter().find(|&size| size <= rest.len()).unwrap_or(1);
        let (piece, tail) = rest.split_at(n);
        let sql = insert_returning_sql(n);
        let mut query = sqlx::query(&sql);
        for u in piece {
            query = bind_user(query, u);
        }
        let rows = query.fetch_all(&mut *conn).await?;
        if rows.len() != piece.len() {
            return Err(sqlx::Error::Protocol(format!("{} users inserted, {} returned", piece.len(), rows.len())));
        }
        let first = uids.len();
        for row in &rows {
            uids.push(row.try_get::<i64, _>(0)?);
        }
        if !uids[first..].is_sorted_by(|a, b| a < b) {
            return Err(sqlx::Error::Protocol("inserted users' uids returned out of order".into()));
        }
        rest = tail;
    }
    Ok(uids)
}

/// [`insert_users`] one statement each (`LAST_INSERT_ID()` names one row), for a server without
/// `RETURNING`.
async fn insert_each(
    conn: &mut sqlx::MySqlConnection,
    users: &[crate::sql::tx::NewUser<'_>],
) -> crate::sync::Result<Vec<i64>> {
    use crate::sql::SyncSql;
    let mut uids = Vec::with_capacity(users.len());
    for u in users {
        let q = bind_user(sqlx::query(MySqlSql::POST_USER), u);
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

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Connection;

    /// Creates the store's schema in the database at `url`.
    async fn migrate(url: &str) {
        let store = crate::mysql::MySqlStore::open(url, &crate::PoolSettings::default())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        crate::SyncStore::migrate(&store).await.unwrap_or_else(|e| panic!("{e}"));
    }

    /// The request path's batch read answers every key exactly as the one-user query does: emails
    /// compared in the column's collation (a key differing only in case finds the row), a key
    /// twice, keys of two services, a user of 25 rows (the newest 20, ties broken by uid), keys
    /// that name nobody; and a batch holding a key the join cannot pass unchanged (longer than the
    /// column) is read the plain way, with the same answers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_read_answers_each_user_as_the_one_user_query() {
        let Some(db) = crate::testing::fresh(crate::Backend::MySql).await else { return };
        migrate(&db.url).await;
        let mut c = sqlx::MySqlConnection::connect(&db.url).await.unwrap_or_else(|e| panic!("{e}"));
        let setup = "INSERT INTO services (service, pattern) VALUES ('other-1.0', '{node}/1.0/{uid}'); \
            INSERT INTO nodes (service, node, available, current_load, capacity, downed, backoff) \
              SELECT id, 'https://n1', 10, 0, 10, 0, 0 FROM services; \
            INSERT INTO users (service, email, generation, client_state, created_at, nodeid, keys_changed_at) \
              SELECT s.id, 'Mixed@Example.com', 1, 'aa', 5, n.id, NULL FROM services s JOIN nodes n ON n.service = s.id; \
            INSERT INTO users (service, email, generation, client_state, created_at, nodeid, keys_changed_at) \
              SELECT s.id, 'other@example.com', 2, 'bb', 6, 999, 3 FROM services s WHERE s.service = 'other-1.0'";
        sqlx::raw_sql(setup).execute(&mut c).await.unwrap_or_else(|e| panic!("{e}"));
        // 25 rows of one user, in pairs that share a creation time.
        for i in 0..25 {
            sqlx::query(
                "INSERT INTO users (service, email, generation, client_state, created_at, nodeid, replaced_at) \
                 SELECT id, 'many@example.com', ?, 'cc', ?, 1, ? FROM services WHERE service = 'sync-1.5'",
            )
            .bind(i)
            .bind(100 + i / 2)
            .bind((i < 24).then_some(500))
            .execute(&mut c)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        }
        let columns = KeyColumns::read(&mut c).await.unwrap_or_else(|e| panic!("{e}"));
        let columns = columns.unwrap_or_else(|| panic!("users.email and services.service are character columns"));
        assert!(columns.statement().is_some(), "{columns:?}");
        // A statement the server refuses leaves the reads to the `UNION ALL` statements.
        let mut refused = columns.clone();
        refused.email.collation = "no_such_collation".into();
        assert_eq!(refused.checked(&mut c).await.unwrap_or_else(|e| panic!("{e}")), None);
        let checked = columns.clone().checked(&mut c).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(checked.map(|(c, _)| c).as_ref(), Some(&columns));
        let long = format!("{}@example.com", "x".repeat(300));
        // A character `utf8mb3` lacks goes the plain way, which MariaDB refuses as it always has
        // ("illegal mix of collations"), rather than reaching the join as `?`.
        assert!(!columns.email.fits("\u{1F600}@example.com") && columns.email.fits("\u{E9}@example.com"));
        // A full batch, and the same with a key too long for the join (read in `UNION ALL`
        // statements of 16).
        let names = ["mixed@example.com", "MANY@example.com", "other@example.com", "nobody@example.com"];
        let full: Vec<(&str, &str)> =
            (0..crate::sql::ROWS_BATCH).map(|i| (["sync-1.5", "other-1.0"][i % 2], names[i % names.len()])).collect();
        let mut with_long = full.clone();
        with_long[40] = ("sync-1.5", long.as_str());
        let batches: [&[(&str, &str)]; 4] = [
            &[
                ("sync-1.5", "mixed@example.com"),
                ("sync-1.5", "MIXED@EXAMPLE.COM"),
                ("other-1.0", "Mixed@Example.com"),
                ("other-1.0", "other@example.com"),
                ("sync-1.5", "other@example.com"),
                ("sync-1.5", "many@example.com"),
                ("no-such-1.0", "mixed@example.com"),
                ("sync-1.5", "mixed@example.com"),
                ("sync-1.5", "nobody@example.com"),
            ],
            &[("sync-1.5", "many@example.com"), ("sync-1.5", long.as_str())],
            &full,
            &with_long,
        ];
        let reader = RowsReader::default();
        assert!(reader.joined.get().is_none());
        for keys in batches {
            let batch = reader.rows(&mut c, keys).await.unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(batch.len(), keys.len());
            for (key, got) in keys.iter().zip(&batch) {
                let alone = users_rows_on(&mut c, &[*key]).await.unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(got, &alone[0], "{key:?}");
            }
        }
        assert!(reader.joined.get().is_some_and(Option::is_some), "the batches went through the join");
        let first = reader.rows(&mut c, batches[0]).await.unwrap_or_else(|e| panic!("{e}"));
        let counts: Vec<usize> = first.iter().map(Vec::len).collect();
        assert_eq!(counts, [1, 1, 1, 1, 0, 20, 0, 1, 0]);
        let many: Vec<(i64, i64)> = first[5].iter().map(|r| (r.created_at, r.generation)).collect();
        assert_eq!(many[..3], [(112, 24), (111, 23), (111, 22)], "newest first, then the higher uid");
        assert_eq!(first[3][0].node_id, None, "a row whose node is gone still comes back");
        drop(c);
        db.drop_now().await;
    }

    /// A batch's new users go in with `RETURNING` in pieces of 32, 16, … (37 = 32 + 4 + 1), each
    /// answered with its own uid; the one-statement-each path answers alike; and a statement the
    /// server cannot parse is told apart from other errors (the way back to that path).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn new_users_go_in_together_each_with_its_uid() {
        let Some(db) = crate::testing::fresh(crate::Backend::MySql).await else { return };
        migrate(&db.url).await;
        let mut c = sqlx::MySqlConnection::connect(&db.url).await.unwrap_or_else(|e| panic!("{e}"));
        let service: i64 = sqlx::query_scalar("SELECT id FROM services WHERE service = 'sync-1.5'")
            .fetch_one(&mut c)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let emails: Vec<String> = (0..40).map(|i| format!("new-{i}@example.com")).collect();
        let user = |i: usize| crate::sql::tx::NewUser {
            service_id: service,
            email: &emails[i],
            generation: i as i64,
            client_state: "aa",
            created_at: 1_000 + i as i64,
            node_id: 7,
            keys_changed_at: i.is_multiple_of(2).then_some(i as i64),
        };
        let together: Vec<_> = (0..37).map(user).collect();
        let version: String =
            sqlx::query_scalar("SELECT VERSION()").fetch_one(&mut c).await.unwrap_or_else(|e| panic!("{e}"));
        let uids = match insert_returning(&mut c, &together).await {
            Ok(uids) => uids,
            // MySQL has no `RETURNING`; MariaDB (10.5+, the one CI runs) must take it.
            Err(sqlx::Error::Database(e)) if unsupported_syntax(&*e) && !version.contains("MariaDB") => {
                insert_each(&mut c, &together).await.unwrap_or_else(|e| panic!("{e}"))
            }
            Err(e) => panic!("{version}: {e}"),
        };
        let each: Vec<_> = (37..40).map(user).collect();
        let more = insert_each(&mut c, &each).await.unwrap_or_else(|e| panic!("{e}"));
        let rows: Vec<(i64, String, i64, i64, Option<i64>)> =
            sqlx::query_as("SELECT uid, email, generation, created_at, keys_changed_at FROM users ORDER BY uid")
                .fetch_all(&mut c)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(rows.len(), 40);
        for (i, uid) in uids.iter().chain(&more).enumerate() {
            let row = rows.iter().find(|r| r.0 == *uid).unwrap_or_else(|| panic!("no row {uid}"));
            let want = (*uid, emails[i].clone(), i as i64, 1_000 + i as i64, i.is_multiple_of(2).then_some(i as i64));
            assert_eq!(*row, want, "user {i}");
        }
        let err = sqlx::query("INSERT INTO users (service) VALUES (1) RETURNNG uid")
            .execute(&mut c)
            .await
            .err()
            .unwrap_or_else(|| panic!("a misspelt statement ran"));
        assert!(matches!(&err, sqlx::Error::Database(e) if unsupported_syntax(&**e)), "{err}");
        let err = sqlx::query("INSERT INTO no_such_table (a) VALUES (1)")
            .execute(&mut c)
            .await
            .err()
            .unwrap_or_else(|| panic!("an insert into no table ran"));
        assert!(!matches!(&err, sqlx::Error::Database(e) if unsupported_syntax(&**e)), "{err}");
        drop(c);
        db.drop_now().await;
    }

    /// A store started before its schema exists reads through the join once the schema is there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_join_is_taken_up_once_the_schema_exists() {
        let Some(db) = crate::testing::fresh(crate::Backend::MySql).await else { return };
        let mut c = sqlx::MySqlConnection::connect(&db.url).await.unwrap_or_else(|e| panic!("{e}"));
        let reader = RowsReader::default();
        let keys = [("sync-1.5", "a@example.com"), ("sync-1.5", "b@example.com")];
        assert!(reader.rows(&mut c, &keys).await.is_err(), "no users table yet");
        assert!(reader.joined.get().is_none(), "nothing kept before the schema exists");
        migrate(&db.url).await;
        let rows = reader.rows(&mut c, &keys).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(rows, [Vec::new(), Vec::new()]);
        assert!(reader.joined.get().is_some_and(Option::is_some));
        drop(c);
        db.drop_now().await;
    }
}
