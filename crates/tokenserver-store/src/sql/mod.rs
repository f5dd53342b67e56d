//! What the SQL backends (SQLite, PostgreSQL, MySQL) share: the Sync transactions written once
//! over [`tx::SyncTx`], the migration bookkeeping, and the SQL each backend must provide
//! ([`SyncSql`]); and what the network ones (PostgreSQL, MySQL) share besides: the sqlx
//! implementation of the Sync store ([`sync`]), the allocation queue and the request path's read
//! pool.

pub(crate) mod alloc_queue;
pub(crate) mod migrate;
pub(crate) mod read_pool;
pub(crate) mod sync;
pub(crate) mod tx;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use tokenserver_core::sync::users::UserRow;

use crate::PoolSettings;

/// A user whose rows a request reads: (service name, email).
pub(crate) type UserKey = (String, String);

/// Users' rows reads one statement carries at most (PostgreSQL and MySQL alike).
pub(crate) const ROWS_BATCH: usize = 64;
/// Rows-read statements out at once (the calls arriving meanwhile queue for the next one): two,
/// not four, costs PostgreSQL half the CPU a read (bench/results/postgres-in-flight-ab.md), and
/// with one join per batch MariaDB 18-21 µs a request against 29-32 for four of up to 16
/// (bench/results/mysql-rows-json-table-ab.md); the second only once the first has been out
/// [`READ_STALL`].
pub(crate) const ROWS_IN_FLIGHT: usize = 2;

/// The network backends' batched statements that commit (PostgreSQL's session rotations and
/// creations and access-token creations, MySQL's access-token creations) go one at a time, so
/// that one commit, one log flush, carries every call waiting; a second goes out beside the first
/// only once the first has been out this long (held by a row lock or a slow flush). PostgreSQL's
/// live rotations against two statements at once: +23%, its CPU a rotation -25%
/// (bench/results/host-2026-12-07-o.md); MariaDB's creates: bench/results/host-2026-12-07-p.md.
pub(crate) const COMMIT_STALL: Duration = Duration::from_millis(5);
/// The request path's batched reads (Sync's users' rows, access tokens' `authorize`, PostgreSQL's
/// session loads) go one statement at a time as well, a second beside the first only once the
/// first has been out this long: fuller statements, a quarter to a half less of the database's
/// CPU a request on PostgreSQL and MariaDB (bench/results/host-2026-12-07-p.md); for session
/// loads 37% fewer statements at the same rate (host-2026-12-07-q.md).
pub(crate) const READ_STALL: Duration = Duration::from_millis(2);

/// The rows of a batch read, `(position in the batch, row)` in position order, dealt back to
/// the batch's `asked` calls (a position past them, padding, is dropped).
pub(crate) fn deal_rows(asked: usize, rows: Vec<(i64, UserRow)>) -> Vec<Vec<UserRow>> {
    let mut out: Vec<Vec<UserRow>> = (0..asked).map(|_| Vec::new()).collect();
    for (at, row) in rows {
        if let Some(rows) = usize::try_from(at).ok().and_then(|at| out.get_mut(at)) {
            rows.push(row);
        }
    }
    out
}

/// The statements of the Sync store, one per step, with the same bind order on every backend
/// (PostgreSQL repeats a value as `$5` rather than reusing `$1`). A backend implements this on a
/// marker type; the compiler then holds it to the whole list.
pub(crate) trait SyncSql {
    /// Names of `services`, `nodes`, `users` and `__diesel_schema_migrations` that exist.
    const EXISTING_TABLES: &'static str;
    /// Versions in the bookkeeping table.
    const APPLIED_VERSIONS: &'static str;
    /// Records a version (`$1`).
    const RECORD_VERSION: &'static str;
    /// `services.id` of a name.
    const SERVICE_ID: &'static str;
    /// What begins an allocation's transaction; `None`: the driver's `BEGIN`. MariaDB plans a
    /// prepared statement at each execution, so only PostgreSQL, which keeps plans, sets one.
    const ALLOCATION_BEGIN: Option<&'static str> = None;
    /// A user's rows joined with their node (email, service), newest first, at most 20.
    const USER_ROWS: &'static str;
    /// Locks a user's rows (email, service id); `None` where writes are serialized already.
    const LOCK_USER: Option<&'static str>;
    /// The service's nodes by id (service id), locked where rows are locked.
    const LOCK_NODES: &'static str;
    /// Sets a node's `available` (available, id).
    const RELEASE: &'static str;
    /// `current_load + n`, `available - n` floored at 0 (n, n, id).
    const ADD_USERS_TO_NODE: &'static str;
    /// Inserts a user row (service id, email, generation, client state, created at, node id,
    /// keys changed at).
    const POST_USER: &'static str;
    /// Mozilla's guarded `put_user` (generation, kca, service id, email, generation, kca).
    const PUT_USER: &'static str;
    /// Marks a user's other live rows replaced (now, service id, email, uid kept).
    const REPLACE_OTHERS: &'static str;
    /// Marks one row replaced if live (replaced at, service name, uid).
    const REPLACE_USER: &'static str;
    /// FxA delete-user (max generation, now, service name, email).
    const RETIRE_USER: &'static str;
    /// FxA password-change, never lowering (generation, kca, service name, email, generation,
    /// kca).
    const UPDATE_USER_GENERATION: &'static str;
    /// Inserts a node (service id, node, available, load, capacity, downed, backoff).
    const INSERT_NODE: &'static str;
    /// Inserts a node unless one with that URL exists (service id, node, available, capacity).
    const INIT_NODE: &'static str;
    /// Every node with its service name, optionally of one service (name, name).
    const LIST_NODES: &'static str;
    /// Inserts a service (name, pattern).
    const INSERT_SERVICE: &'static str;
    /// A node's id (service name, node URL).
    const NODE_ID: &'static str;
    /// Sets the given columns, keeps the others (capacity, available, load, downed, backoff, id;
    /// each nullable).
    const UPDATE_NODE: &'static str;
    /// Marks a node's live users replaced (now, node id).
    const UNASSIGN_NODE: &'static str;
    /// Deletes a node (id).
    const DELETE_NODE: &'static str;
    /// Live users per node id.
    const NODE_USERS: &'static str;
    /// The email of a row (service name, uid).
    const USER_EMAIL: &'static str;
    /// Email and node id of a row (service id, uid).
    const RECORD_OF: &'static str;
    /// Frees one slot on a node (id).
    const FREE_SLOT: &'static str;
    /// Deletes a row (service id, uid).
    const DELETE_USER: &'static str;
    /// Mozilla's `count_users` (created before, service name or NULL, service name).
    const COUNT_USERS: &'static str;
    /// A page of replaced rows, oldest first (service name, replaced before, cursor replaced_at
    /// twice, cursor uid, uid above, uid below, limit): uid, email, generation, kca, client
    /// state, node URL or NULL, downed (0 when no node), created_at, replaced_at.
    const OLD_RECORDS: &'static str;
    /// Re-stamps a replaced row (now, service name, uid).
    const BUMP_REPLACED: &'static str;
    /// Creates `tokenserver_buckets` if missing.
    const CREATE_BUCKETS: &'static str;
    /// A bucket's node (service id, bucket).
    const BUCKET_NODE: &'static str;
    /// Inserts or replaces a bucket's node (service id, bucket, node id).
    const SET_BUCKET_NODE: &'static str;
    /// (bucket, node URL or NULL) of a service (service name), by bucket.
    const LIST_BUCKETS: &'static str;
    /// (uid, email, node id) of a service's live rows (service id).
    const LIVE_ROWS: &'static str;
    /// Marks one live row replaced (now, service id, uid).
    const REPLACE_UID: &'static str;
}

/// Connections idle longer than this are pinged before use: after an outage they are found dead
/// and replaced, while under load (connections never idle that long) no request pays a ping.
pub(crate) const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// Whether `e` says the connection itself is gone (rather than the statement failing on a live
/// one): an I/O or protocol failure, or the server ending the session (PostgreSQL's
/// administrator, crash or startup shutdown; the connection-exception class; MariaDB's killed
/// session, MySQL's idle timeout).
pub(crate) fn connection_lost(e: &sqlx::Error) -> bool {
    use crate::error::{mysql_number, MYSQL_CLIENT_TIMED_OUT, MYSQL_CONNECTION_KILLED};
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => {
            matches!(db.code().as_deref(), Some(c) if matches!(c, "57P01" | "57P02" | "57P03") || c.starts_with("08"))
                || matches!(mysql_number(db.as_ref()), Some(MYSQL_CONNECTION_KILLED | MYSQL_CLIENT_TIMED_OUT))
        }
        _ => false,
    }
}

/// When a pool's connection was last found cut (the database restarted, a network cut), as
/// nanoseconds after `base` (0: never): connections put back before that may have been cut by
/// the same event, so they are pinged before their next use.
#[derive(Debug)]
pub(crate) struct LossMark {
    base: Instant,
    nanos: AtomicU64,
}

impl LossMark {
    pub(crate) fn new() -> Self {
        Self { base: Instant::now(), nanos: AtomicU64::new(0) }
    }

    /// A connection was found cut now.
    pub(crate) fn set(&self) {
        let now = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX).max(1);
        self.nanos.fetch_max(now, Ordering::Relaxed);
    }

    /// Whether a connection last used at `at` may have been cut by the event last found.
    pub(crate) fn suspects(&self, at: Instant) -> bool {
        match self.nanos.load(Ordering::Relaxed) {
            0 => false,
            n => at < self.base + Duration::from_nanos(n),
        }
    }

    /// [`Self::suspects`] for a connection idle for `idle_for` until now (reads the clock only
    /// once a loss was found).
    pub(crate) fn suspects_idle(&self, idle_for: Duration) -> bool {
        self.nanos.load(Ordering::Relaxed) != 0
            && Instant::now().checked_sub(idle_for).is_none_or(|at| self.suspects(at))
    }
}

/// The loss mark of the sqlx pools ([`network_pool`]), one for the process: set when a
/// transaction's `BEGIN` ([`crate::caller::transaction`]), a [`pool_read`] or a [`pool_write`]
/// finds its connection cut. A loss on one database's pool costs the others a ping per idle
/// connection, once.
pub(crate) static SQLX_POOLS_LOST: LazyLock<LossMark> = LazyLock::new(LossMark::new);

/// A read on a sqlx pool ([`network_pool`]; `read` must change nothing): if its connection turns
/// out to have been cut, the loss is marked and the read runs once more, on a connection pinged
/// first or newly opened.
pub(crate) async fn pool_read<T, F, Fut>(mut read: F) -> Result<T, crate::StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    match read().await {
        Err(e) if connection_lost(&e) => {
            SQLX_POOLS_LOST.set();
            Ok(read().await?)
        }
        other => Ok(other?),
    }
}

/// A write on a sqlx pool: not run again, since its connection may have failed after the database
/// committed it, but a cut connection marks the loss, so the pool's next calls get checked ones.
pub(crate) async fn pool_write<T>(
    write: impl std::future::Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, crate::StoreError> {
    let out = write.await;
    if matches!(&out, Err(e) if connection_lost(e)) {
        SQLX_POOLS_LOST.set();
    }
    Ok(out?)
}

/// Pool options for a networked database (PostgreSQL, MySQL): sized and timed by `settings`,
/// pinging only connections that sat idle (sqlx's default pings before every acquire, a round
/// trip per request) or that were put back before a connection was last found cut.
pub(crate) fn network_pool<DB: sqlx::Database>(settings: &PoolSettings) -> sqlx::pool::PoolOptions<DB> {
    sqlx::pool::PoolOptions::<DB>::new()
        .max_connections(settings.max_size)
        .acquire_timeout(settings.connection_timeout)
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for > PING_IF_IDLE_FOR || SQLX_POOLS_LOST.suspects_idle(meta.idle_for) {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
}

/// Node-operation statements written alike for the `?`-placeholder dialects (SQLite, MySQL);
/// PostgreSQL numbers its parameters and casts, so it writes its own.
pub(crate) mod qmark {
    pub(crate) const NODE_ID: &str = "SELECT nodes.id FROM nodes JOIN services ON nodes.service = services.id \
        WHERE services.service = ? AND nodes.node = ?";

    pub(crate) const UPDATE_NODE: &str = "UPDATE nodes SET capacity = COALESCE(?, capacity), \
        available = COALESCE(?, available), current_load = COALESCE(?, current_load), \
        downed = COALESCE(?, downed), backoff = COALESCE(?, backoff) WHERE id = ?";

    pub(crate) const UNASSIGN_NODE: &str = "UPDATE users SET replaced_at = ? WHERE nodeid = ? AND replaced_at IS NULL";

    pub(crate) const DELETE_NODE: &str = "DELETE FROM nodes WHERE id = ?";

    pub(crate) const USER_EMAIL: &str =
        "SELECT email FROM users WHERE service = (SELECT id FROM services WHERE service = ?) AND uid = ?";

    pub(crate) const RECORD_OF: &str = "SELECT email, nodeid FROM users WHERE service = ? AND uid = ?";

    pub(crate) const DELETE_USER: &str = "DELETE FROM users WHERE service = ? AND uid = ?";

    pub(crate) const COUNT_USERS: &str = "SELECT COUNT(*) FROM users WHERE replaced_at IS NULL AND created_at <= ? \
        AND (? IS NULL OR service = (SELECT id FROM services WHERE service = ?))";

    // Node columns through rowid subqueries, as `USER_ROWS` on SQLite: a lookup per row whatever
    // the planner's statistics; the range itself is `replaced_at_idx (service, replaced_at)`.
    pub(crate) const OLD_RECORDS: &str = "SELECT users.uid, users.email, users.generation, users.keys_changed_at, \
        users.client_state, (SELECT node FROM nodes WHERE id = users.nodeid), \
        COALESCE((SELECT downed FROM nodes WHERE id = users.nodeid), 0), users.created_at, users.replaced_at \
        FROM users WHERE users.service = (SELECT id FROM services WHERE service = ?) \
        AND users.replaced_at IS NOT NULL AND users.replaced_at < ? \
        AND (users.replaced_at > ? OR (users.replaced_at = ? AND users.uid > ?)) \
        AND users.uid > ? AND users.uid < ? ORDER BY users.replaced_at, users.uid LIMIT ?";

    pub(crate) const BUMP_REPLACED: &str = "UPDATE users SET replaced_at = ? \
        WHERE service = (SELECT id FROM services WHERE service = ?) AND uid = ? AND replaced_at IS NOT NULL";

    pub(crate) const BUCKET_NODE: &str = "SELECT node FROM tokenserver_buckets WHERE service = ? AND bucket = ?";

    pub(crate) const LIST_BUCKETS: &str = "SELECT tokenserver_buckets.bucket, nodes.node FROM tokenserver_buckets \
        JOIN services ON services.id = tokenserver_buckets.service \
        LEFT OUTER JOIN nodes ON nodes.id = tokenserver_buckets.node \
        WHERE services.service = ? ORDER BY tokenserver_buckets.bucket";

    pub(crate) const LIVE_ROWS: &str = "SELECT uid, email, nodeid FROM users WHERE service = ? AND replaced_at IS NULL";

    pub(crate) const REPLACE_UID: &str =
        "UPDATE users SET replaced_at = ? WHERE service = ? AND uid = ? AND replaced_at IS NULL";

    pub(crate) const NODE_USERS: &str = "SELECT nodeid, COUNT(*) FROM users \
        WHERE replaced_at IS NULL AND nodeid IS NOT NULL GROUP BY nodeid ORDER BY nodeid";
}
