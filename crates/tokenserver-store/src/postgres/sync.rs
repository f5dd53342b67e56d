//! `SyncStore` for PostgreSQL: its SQL; the implementation is [`crate::sql::sync`]'s. INTEGER
//! columns are read as BIGINT (`::BIGINT`) so one Rust type serves every backend.

use sqlx::postgres::PgArguments;
use sqlx::{Postgres, Row};
use tokenserver_core::sync::users::UserRow;

use crate::sql::read_pool::{read, ReadPool};
use crate::sql::UserKey;
use crate::StoreError;

/// PostgreSQL's statements for the shared Sync store.
pub(crate) struct PgSql;

impl crate::sql::SyncSql for PgSql {
    const EXISTING_TABLES: &'static str = "SELECT table_name::TEXT FROM information_schema.tables \
        WHERE table_schema = current_schema() \
        AND table_name IN ('services', 'nodes', 'users', '__diesel_schema_migrations')";

    const APPLIED_VERSIONS: &'static str = "SELECT version::TEXT FROM __diesel_schema_migrations";

    const RECORD_VERSION: &'static str = "INSERT INTO __diesel_schema_migrations (version) VALUES ($1)";

    const SERVICE_ID: &'static str = "SELECT id::BIGINT FROM services WHERE service = $1";
    /// Every statement of an allocation looks its rows up by an index, and PostgreSQL keeps a
    /// statement's generic plan until the table is analyzed again: planned on a `users` table
    /// analyzed while small, the users' lock and read were a sequential scan per email, kept as
    /// the table grew (when autovacuum is off, for good), and run with the service's nodes
    /// locked. Sequential scans off in the transaction keeps them index lookups; the setting
    /// rides in the `BEGIN`'s message, so it costs no round trip.
    const ALLOCATION_BEGIN: Option<&'static str> = Some("BEGIN; SET LOCAL enable_seqscan = off");

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

    const ADD_USERS_TO_NODE: &'static str =
        "UPDATE nodes SET current_load = current_load + $1, available = GREATEST(available - $2, 0) WHERE id = $3";

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

/// Many users' rows in one statement: each asked (service, email) in `unnest` order, with its
/// position first, then the columns of [`PgSql`]'s `USER_ROWS` (the same rows, the same order, the
/// same limit of 20 per user, by an index lookup per user).
pub(super) const USER_ROWS_MANY: &str = "SELECT q.i, users.uid, nodes.id, nodes.node::TEXT, users.generation, \
    users.keys_changed_at, users.client_state::TEXT, users.created_at, users.replaced_at \
    FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS q(service, email, i) \
    CROSS JOIN LATERAL ( \
        SELECT u.uid, u.nodeid, u.generation, u.keys_changed_at, u.client_state, u.created_at, u.replaced_at \
        FROM users u \
        WHERE u.email = q.email AND u.service = (SELECT id FROM services WHERE service = q.service) \
        ORDER BY u.created_at DESC, u.uid DESC LIMIT 20 \
    ) users \
    LEFT OUTER JOIN nodes ON users.nodeid = nodes.id \
    ORDER BY q.i, users.created_at DESC, users.uid DESC";

/// The rows of each of `keys` ((service, email)), in order, in one statement.
async fn users_rows_on(conn: &mut sqlx::PgConnection, keys: &[(&str, &str)]) -> Result<Vec<Vec<UserRow>>, sqlx::Error> {
    let services: Vec<&str> = keys.iter().map(|(s, _)| *s).collect();
    let emails: Vec<&str> = keys.iter().map(|(_, e)| *e).collect();
    let found = sqlx::query(USER_ROWS_MANY).bind(&services).bind(&emails).fetch_all(conn).await?;
    // WITH ORDINALITY counts from 1.
    let rows = found
        .iter()
        .map(|r| Ok((r.try_get::<i64, _>(0)? - 1, stamped::user_row_at(r, 1)?)))
        .collect::<std::result::Result<Vec<_>, sqlx::Error>>()?;
    Ok(crate::sql::deal_rows(keys.len(), rows))
}

/// The rows of each of `keys`, in one statement ([`crate::batch::Batcher`]'s run).
pub(crate) async fn rows_many(
    reads: ReadPool<sqlx::PgConnection>,
    keys: Vec<UserKey>,
) -> Result<Vec<Result<Vec<UserRow>, StoreError>>, StoreError> {
    let asked: Vec<(&str, &str)> = keys.iter().map(|(s, e)| (s.as_str(), e.as_str())).collect();
    let rows = read!(reads, |c| users_rows_on(c, &asked).await)?;
    Ok(rows.into_iter().map(Ok).collect())
}

/// A batch's users' rows inside its transaction (the set-based allocation step).
pub(crate) async fn users_rows(
    conn: &mut sqlx::PgConnection,
    keys: &[(&str, &str)],
) -> crate::sync::Result<Vec<Vec<UserRow>>> {
    Ok(users_rows_on(conn, keys).await?)
}

/// Locks the rows of each of `$2` (emails, in the order given) of service `$1`, an index lookup
/// per email. A lateral lookup rather than `email = ANY($2)`: PostgreSQL keeps a statement's
/// generic plan until the table is analyzed again, and `ANY` planned on a table of a thousand
/// users is a sequential scan, kept while the table grew (without autovacuum, for good): 3-5 ms
/// a batch at 40k users, with the nodes locked; new users ran at 3.9k-6.6k/s against
/// 12.6k-13.7k/s with this form (bench/results/postgres-new-users-lock-ab.md).
const LOCK_USERS: &str = "SELECT u.uid FROM unnest($2::text[]) AS q(email) \
    CROSS JOIN LATERAL (SELECT uid FROM users WHERE email = q.email AND service = $1 FOR UPDATE) u";

/// Locks the rows of every one of `emails` in one statement.
pub(crate) async fn lock_users(
    conn: &mut sqlx::PgConnection,
    service_id: i64,
    emails: &[&str],
) -> crate::sync::Result<()> {
    sqlx::query(LOCK_USERS).bind(service_id).bind(emails).fetch_all(conn).await?;
    Ok(())
}

/// Inserts rows in one statement; their uids in order (matched by email, which the rows of one
/// batch never share: a second allocation of a user in a batch is a conflict).
pub(crate) async fn insert_users(
    conn: &mut sqlx::PgConnection,
    users: &[crate::sql::tx::NewUser<'_>],
) -> crate::sync::Result<Vec<i64>> {
    if users.is_empty() {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(
        "INSERT INTO users (service, email, generation, client_state, created_at, nodeid, keys_changed_at) \
         SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::text[], $5::bigint[], $6::bigint[], \
                              $7::bigint[]) \
         RETURNING uid, email",
    )
    .bind(users.iter().map(|u| u.service_id).collect::<Vec<_>>())
    .bind(users.iter().map(|u| u.email).collect::<Vec<_>>())
    .bind(users.iter().map(|u| u.generation).collect::<Vec<_>>())
    .bind(users.iter().map(|u| u.client_state).collect::<Vec<_>>())
    .bind(users.iter().map(|u| u.created_at).collect::<Vec<_>>())
    .bind(users.iter().map(|u| u.node_id).collect::<Vec<_>>())
    .bind(users.iter().map(|u| u.keys_changed_at).collect::<Vec<_>>())
    .fetch_all(conn)
    .await?;
    let mut uids: std::collections::HashMap<String, i64> = std::collections::HashMap::with_capacity(rows.len());
    for r in &rows {
        uids.insert(r.try_get(1)?, r.try_get(0)?);
    }
    users
        .iter()
        .map(|u| uids.get(u.email).copied().ok_or_else(|| StoreError::Backend(format!("no uid for {}", u.email))))
        .collect()
}

crate::sql::sync::sync_store!(
    store: crate::postgres::PgStore, sql: crate::postgres::sync::PgSql, insert_id: crate::postgres::sync::insert_id,
    lock_users: crate::postgres::sync::lock_users, users_rows: crate::postgres::sync::users_rows,
    insert_users: crate::postgres::sync::insert_users,
    db: sqlx::Postgres, row: sqlx::postgres::PgRow, conn: sqlx::PgConnection,
);

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Connection;

    /// The plan PostgreSQL keeps for the users' lock once it stops planning each call: made on a
    /// table of a thousand analyzed users, it must look each email up in the index, since the
    /// table may grow a hundredfold before anything makes it plan again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_users_lock_kept_from_a_small_table_looks_each_email_up_in_the_index() {
        let Some(db) = crate::testing::fresh(crate::Backend::Postgres).await else { return };
        let store = crate::postgres::PgStore::open(&db.url, &crate::PoolSettings::default())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        crate::SyncStore::migrate(&store).await.unwrap_or_else(|e| panic!("{e}"));
        let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap_or_else(|e| panic!("{e}"));
        sqlx::raw_sql(
            "INSERT INTO users (service, email, generation, client_state, created_at, nodeid) \
             SELECT 1, 'user' || i || '@example.com', 0, '', 0, 1 FROM generate_series(1, 1000) AS i; \
             ANALYZE users; \
             SET plan_cache_mode = force_generic_plan",
        )
        .execute(&mut c)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let plan = crate::testing::prepared_plan(
            &mut c,
            "lock_users",
            "bigint, text[]",
            LOCK_USERS,
            "1, '{user1@example.com,x}'",
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(plan.contains("Index Scan using lookup_idx on users"), "{plan}");
        assert!(!plan.contains("Seq Scan on users"), "{plan}");

        // It locks the rows of the emails that have one, and only those.
        let mut tx = c.begin().await.unwrap_or_else(|e| panic!("{e}"));
        let locked: Vec<i64> = sqlx::query_scalar(LOCK_USERS)
            .bind(1_i64)
            .bind(["user7@example.com", "nobody@example.com", "user3@example.com"])
            .fetch_all(&mut *tx)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut other = sqlx::PgConnection::connect(&db.url).await.unwrap_or_else(|e| panic!("{e}"));
        let free: Vec<String> = sqlx::query_scalar(
            "SELECT email::TEXT FROM users WHERE email IN ('user7@example.com', 'user3@example.com', 'user5@example.com') \
             ORDER BY email FOR UPDATE SKIP LOCKED",
        )
        .fetch_all(&mut other)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(locked.len(), 2);
        assert_eq!(free, ["user5@example.com"]);
        tx.rollback().await.unwrap_or_else(|e| panic!("{e}"));
        drop((c, other, store));
        db.drop_now().await;
    }

    /// The users' lock and read that allocations run are kept as index lookups even when
    /// PostgreSQL keeps plans made on a `users` table analyzed while small, which otherwise scan
    /// the table for each email; the setting that does it ends with each allocation.
    ///
    /// The test reads the kept plans with `EXPLAIN EXECUTE` outside any allocation, so a plan
    /// invalidated in between (the catalog churn of the other tests running at once can reset a
    /// connection's caches) is planned afresh there, with sequential scans on, and shows what no
    /// allocation runs. Each round therefore starts on a new connection, and the test fails only
    /// when no round shows index plans; without the setting, every round shows scans.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn allocations_keep_index_plans_made_on_a_table_analyzed_while_small() {
        use crate::sync::{Allocate, NewNode};
        use crate::SyncStore;
        let Some(db) = crate::testing::fresh(crate::Backend::Postgres).await else { return };
        // One connection, planning every statement once for good (a generic plan): one more
        // setting at the end of the test database's `options`.
        assert!(db.url.contains("options=-c%20search_path"), "{}", db.url);
        let url = format!("{}%20-c%20plan_cache_mode%3Dforce_generic_plan", db.url);
        let one = crate::PoolSettings { max_size: 1, ..crate::PoolSettings::default() };
        let mut last = Vec::new();
        for round in 0..3 {
            let store = crate::postgres::PgStore::open(&url, &one).await.unwrap_or_else(|e| panic!("{e}"));
            if round == 0 {
                store.migrate().await.unwrap_or_else(|e| panic!("{e}"));
                // Autovacuum off for the table: the inserts' counts reach the statistics after
                // the ANALYZE, so an autovacuum worker would analyze `users` again at a moment of
                // its own, and that too invalidates the kept plans.
                sqlx::raw_sql(
                    "ALTER TABLE users SET (autovacuum_enabled = false); \
                     INSERT INTO users (service, email, generation, client_state, created_at, nodeid) \
                     SELECT 1, 'user' || i || '@example.com', 0, '', 0, 1 FROM generate_series(1, 100) AS i; \
                     ANALYZE users",
                )
                .execute(&store.pool)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
                let node = NewNode {
                    service: "sync-1.5",
                    node: "https://n1",
                    capacity: 1000,
                    available: 1000,
                    current_load: 0,
                    downed: false,
                    backoff: false,
                };
                store.add_node(&node).await.unwrap_or_else(|e| panic!("{e}"));
            }
            for n in 1..=2 {
                let email = format!("new{round}-{n}@example.com");
                let new = Allocate {
                    service: "sync-1.5",
                    email: &email,
                    generation: 1,
                    client_state: "",
                    keys_changed_at: None,
                    expected_current: None,
                    now_ms: 1_000,
                    release_rate: 0.1,
                    bucket: None,
                };
                store.allocate_user(&new).await.unwrap_or_else(|e| panic!("{e}"));
            }
            // The plans the connection keeps for the statements the allocations prepared.
            let mut c = store.pool.acquire().await.unwrap_or_else(|e| panic!("{e}"));
            let mut kept = Vec::new();
            for (sql, args) in
                [(LOCK_USERS, "1, '{user1@example.com}'"), (USER_ROWS_MANY, "'{sync-1.5}', '{user1@example.com}'")]
            {
                let name: String = sqlx::query_scalar("SELECT name FROM pg_prepared_statements WHERE statement = $1")
                    .bind(sql)
                    .fetch_one(&mut *c)
                    .await
                    .unwrap_or_else(|e| panic!("not prepared by an allocation: {e}\n{sql}"));
                kept.push(crate::testing::kept_plan(&mut c, &name, args).await.unwrap_or_else(|e| panic!("{e}")));
            }
            let after: String =
                sqlx::query_scalar("SHOW enable_seqscan").fetch_one(&mut *c).await.unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(after, "on");
            drop((c, store));
            let indexed =
                |plan: &String| plan.contains("using lookup_idx on users") && !plan.contains("Seq Scan on users");
            if kept.iter().all(indexed) {
                db.drop_now().await;
                return;
            }
            last = kept;
        }
        panic!("no round kept index plans; the last round's:\n{}", last.join("\n\n"));
    }
}
