//! The request path's read connections (PostgreSQL, MySQL), pooled by deadpool rather than sqlx.
//!
//! sqlx 0.8 pings every connection it takes back into its pool (`PoolConnection::return_to_pool`,
//! to catch one left mid-query by a cancelled future): a second round trip to the database per
//! request (its cost: bench/results/tuning-notes.md). Here a connection
//! goes back to the pool without a round trip, marked clean if its read finished; one whose read
//! failed, or was dropped mid-query (a request timeout), is closed when the pool next looks at
//! it, since its protocol state is unknown. (A read holds no locks, so it may wait until then; a
//! write transaction could not.) As with the sqlx pool ([`crate::sql::network_pool`]), only a
//! connection idle for more than [`crate::sql::PING_IF_IDLE_FOR`] is pinged before use, so that one
//! killed by an outage is found and replaced.
//!
//! A connection cut more recently than that (the database restarted, a network cut, a killed
//! session) is found by the call that next uses it. When one is found that way, every connection
//! taken from the pool before that moment is pinged before its next use (the same event likely cut
//! them too), and a read ([`read!`]) that met the cut runs once more on a connection
//! that answered since: a restart shorter than a second costs no read an error. A write is not
//! run again: its connection may have failed after the database committed it.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use deadpool::managed::{self, Metrics, Object, PoolError, RecycleError, RecycleResult};
use sqlx::Connection;

use crate::sql::{connection_lost, LossMark};
use crate::{PoolSettings, StoreError};

/// `Result<T, StoreError>` of a read on a connection of `$pool` (a [`ReadPool`]): `$read` is an
/// expression on the connection `$conn` (`&mut C`) giving `Result<T, sqlx::Error>`, which must
/// change nothing, since it may run twice: when the connection, taken from the pool rather than
/// just opened, turns out to have been cut, the read runs once more on one that answers (the loss
/// has every connection taken before it pinged first). A macro rather than a method taking a
/// closure: the closure's future would borrow the connection for any lifetime, and the batch
/// tasks that run reads must be `Send`, which the compiler cannot show for that today.
macro_rules! read {
    ($pool:expr, |$conn:ident| $read:expr) => {{
        let pool = &$pool;
        let mut may_retry = true;
        loop {
            let mut lease = match pool.get().await {
                Ok(lease) => lease,
                Err(e) => break Err(e),
            };
            let result = {
                let $conn = &mut *lease;
                $read
            };
            match lease.finish_read(result, may_retry) {
                Some(done) => break done,
                None => may_retry = false,
            }
        }
    }};
}
pub(crate) use read;

/// A pooled connection, whether its last read finished cleanly, and its pool's loss mark.
struct Pooled<C> {
    conn: C,
    clean: bool,
    lost: Arc<LossMark>,
}

/// Opens connections with the store's options; closes unclean ones and pings idle ones before
/// reuse.
struct Connector<C: Connection> {
    options: C::Options,
    lost: Arc<LossMark>,
}

impl<C: Connection> managed::Manager for Connector<C> {
    type Type = Pooled<C>;
    type Error = sqlx::Error;

    async fn create(&self) -> Result<Pooled<C>, sqlx::Error> {
        Ok(Pooled { conn: C::connect_with(&self.options).await?, clean: true, lost: self.lost.clone() })
    }

    async fn recycle(&self, pooled: &mut Pooled<C>, metrics: &Metrics) -> RecycleResult<sqlx::Error> {
        if !pooled.clean {
            // Dropped by deadpool, which then takes another connection or opens one.
            return Err(RecycleError::message("read did not finish"));
        }
        // `recycled` is when it was last taken from the pool (before this time).
        let taken = metrics.recycled.unwrap_or(metrics.created);
        if metrics.last_used() > crate::sql::PING_IF_IDLE_FOR || self.lost.suspects(taken) {
            pooled.conn.ping().await?;
        }
        Ok(())
    }
}

/// A pool of read connections.
pub(crate) struct ReadPool<C: Connection> {
    pool: managed::Pool<Connector<C>>,
}

impl<C: Connection> std::fmt::Debug for ReadPool<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = self.pool.status();
        f.debug_struct("ReadPool").field("size", &status.size).field("available", &status.available).finish()
    }
}

impl<C: Connection> Clone for ReadPool<C> {
    fn clone(&self) -> Self {
        Self { pool: self.pool.clone() }
    }
}

impl<C: Connection> ReadPool<C> {
    /// A pool of up to `settings.max_size` connections, opened on first use (so that the server
    /// starts while the database is down); waiting for one, or opening one, gives up after
    /// `settings.connection_timeout`.
    pub(crate) fn new(options: C::Options, settings: &PoolSettings) -> Result<Self, StoreError> {
        let timeout = Some(settings.connection_timeout);
        let pool = managed::Pool::builder(Connector { options, lost: Arc::new(LossMark::new()) })
            .max_size(settings.max_size.max(1) as usize)
            .wait_timeout(timeout)
            .create_timeout(timeout)
            .recycle_timeout(timeout)
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Config(format!("read pool: {e}")))?;
        Ok(Self { pool })
    }

    /// A connection for one call. Pass the call's result to [`Lease::finish`]; a lease dropped
    /// without it leaves its connection to be closed.
    pub(crate) async fn get(&self) -> Result<Lease<C>, StoreError> {
        match self.pool.get().await {
            Ok(mut conn) => {
                conn.clean = false;
                Ok(Lease(conn))
            }
            Err(PoolError::Backend(e)) => Err(e.into()),
            Err(e) => Err(StoreError::Unavailable(format!("read pool: {e}"))),
        }
    }

    /// A round trip on a connection of the pool (the health check).
    pub(crate) async fn probe(&self) -> Result<(), StoreError> {
        read!(self, |c| c.ping().await)
    }
}

/// A connection lent for one call.
pub(crate) struct Lease<C: Connection>(Object<Connector<C>>);

impl<C: Connection> Lease<C> {
    /// A read's result, or `None` when it should run again on another connection: it found this
    /// one cut, the connection was taken from the pool rather than just opened, and `may_retry`
    /// (the read has not run again already).
    pub(crate) fn finish_read<T>(
        self,
        result: Result<T, sqlx::Error>,
        may_retry: bool,
    ) -> Option<Result<T, StoreError>> {
        let reused = Object::metrics(&self.0).recycle_count > 0;
        let retry = may_retry && reused && matches!(&result, Err(e) if connection_lost(e));
        let done = self.finish(result);
        (!retry).then_some(done)
    }

    /// The call's result. A call that finished cleanly leaves the connection to serve the next
    /// one as it is; one that found the connection cut has the pool's other connections checked
    /// before their next use.
    pub(crate) fn finish<T>(mut self, result: Result<T, sqlx::Error>) -> Result<T, StoreError> {
        match result {
            Ok(v) => {
                self.0.clean = true;
                Ok(v)
            }
            Err(e) => {
                if connection_lost(&e) {
                    self.0.lost.set();
                }
                Err(e.into())
            }
        }
    }
}

impl<C: Connection> Deref for Lease<C> {
    type Target = C;

    fn deref(&self) -> &C {
        &self.0.conn
    }
}

impl<C: Connection> DerefMut for Lease<C> {
    fn deref_mut(&mut self) -> &mut C {
        &mut self.0.conn
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;
    use std::time::Duration;

    use sqlx::postgres::PgConnectOptions;
    use sqlx::PgConnection;

    use super::*;

    fn pg_pool(max_size: u32) -> Option<ReadPool<PgConnection>> {
        let Ok(url) = std::env::var("TOKENSERVER_TEST_POSTGRES_URL") else {
            eprintln!("TOKENSERVER_TEST_POSTGRES_URL unset: skipped");
            return None;
        };
        let options = PgConnectOptions::from_str(&url).expect("test URL");
        let settings = PoolSettings { max_size, connection_timeout: Duration::from_secs(5), ..Default::default() };
        Some(ReadPool::new(options, &settings).expect("pool"))
    }

    async fn backend_pid(pool: &ReadPool<PgConnection>) -> i32 {
        let mut lease = pool.get().await.expect("lease");
        let pid = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut *lease).await;
        lease.finish(pid).expect("query")
    }

    #[tokio::test]
    async fn a_kept_connection_is_reused() {
        let Some(pool) = pg_pool(1) else { return };
        let first = backend_pid(&pool).await;
        assert_eq!(backend_pid(&pool).await, first);
        assert_eq!(pool.pool.status().size, 1);
    }

    #[tokio::test]
    async fn a_read_dropped_mid_query_is_not_reused() {
        let Some(pool) = pg_pool(1) else { return };
        let first = backend_pid(&pool).await;
        let mut lease = pool.get().await.expect("lease");
        let slow = sqlx::query("SELECT pg_sleep(5)").execute(&mut *lease);
        assert!(tokio::time::timeout(Duration::from_millis(100), slow).await.is_err());
        drop(lease);
        // The next read gets a fresh connection, not one with a query still running on it.
        let second = backend_pid(&pool).await;
        assert_ne!(second, first);
        assert_eq!(pool.pool.status().size, 1);
    }

    #[tokio::test]
    async fn a_lease_not_kept_is_not_reused() {
        let Some(pool) = pg_pool(2) else { return };
        let first = backend_pid(&pool).await;
        drop(pool.get().await.expect("lease"));
        assert_ne!(backend_pid(&pool).await, first);
        assert_eq!(pool.pool.status().size, 1);
    }

    /// A database whose sessions a test can end from outside, as a restart or a network cut would.
    trait Killable: Connection {
        const URL_VAR: &'static str;
        const SESSION_ID: &'static str;
        const KILL: &'static str;
        const GONE: &'static str;
    }

    impl Killable for PgConnection {
        const URL_VAR: &'static str = "TOKENSERVER_TEST_POSTGRES_URL";
        const SESSION_ID: &'static str = "SELECT CAST(pg_backend_pid() AS BIGINT)";
        const KILL: &'static str = "SELECT pg_terminate_backend(CAST($1 AS INTEGER))";
        const GONE: &'static str = "SELECT COUNT(*) FROM pg_stat_activity WHERE pid = CAST($1 AS INTEGER)";
    }

    impl Killable for sqlx::MySqlConnection {
        const URL_VAR: &'static str = "TOKENSERVER_TEST_MYSQL_URL";
        const SESSION_ID: &'static str = "SELECT CAST(CONNECTION_ID() AS SIGNED)";
        const KILL: &'static str = "KILL CONNECTION ?";
        const GONE: &'static str = "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = ?";
    }

    /// Counts the attempts of a read of the connection's session id.
    async fn session_id<C>(pool: &ReadPool<C>, attempts: &mut usize) -> Result<i64, StoreError>
    where
        C: Killable,
        for<'c> &'c mut C: sqlx::Executor<'c, Database = C::Database>,
        i64: sqlx::Type<C::Database> + for<'r> sqlx::Decode<'r, C::Database>,
        (i64,): for<'r> sqlx::FromRow<'r, <C::Database as sqlx::Database>::Row>,
        for<'q> <C::Database as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, C::Database>,
    {
        read!(pool, |c| {
            *attempts += 1;
            sqlx::query_scalar::<_, i64>(C::SESSION_ID).fetch_one(c).await
        })
    }

    /// Two pooled connections, both ended by the database since their last use; then two reads.
    async fn reads_survive_connections_cut_since_their_last_use<C>()
    where
        C: Killable,
        C::Options: FromStr,
        <C::Options as FromStr>::Err: std::fmt::Debug,
        for<'c> &'c mut C: sqlx::Executor<'c, Database = C::Database>,
        i64: sqlx::Type<C::Database> + for<'r> sqlx::Decode<'r, C::Database> + for<'q> sqlx::Encode<'q, C::Database>,
        (i64,): for<'r> sqlx::FromRow<'r, <C::Database as sqlx::Database>::Row>,
        for<'q> <C::Database as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, C::Database>,
    {
        let Ok(url) = std::env::var(C::URL_VAR) else {
            eprintln!("{} unset: skipped", C::URL_VAR);
            return;
        };
        let settings = PoolSettings { max_size: 2, connection_timeout: Duration::from_secs(5), ..Default::default() };
        let pool = ReadPool::<C>::new(C::Options::from_str(&url).expect("test URL"), &settings).expect("pool");
        // Two connections open at once, then back in the pool.
        let (mut a, mut b) = (pool.get().await.expect("lease"), pool.get().await.expect("lease"));
        let old = [
            sqlx::query_scalar::<_, i64>(C::SESSION_ID).fetch_one(&mut *a).await.expect("id"),
            sqlx::query_scalar::<_, i64>(C::SESSION_ID).fetch_one(&mut *b).await.expect("id"),
        ];
        let _ = (a.finish(Ok::<_, sqlx::Error>(())), b.finish(Ok::<_, sqlx::Error>(())));
        assert_eq!(pool.pool.status().available, 2);

        let mut admin = C::connect(&url).await.expect("admin connection");
        for id in &old {
            sqlx::query(C::KILL).bind(*id).execute(&mut admin).await.expect("kill");
        }
        for id in &old {
            while sqlx::query_scalar::<_, i64>(C::GONE).bind(*id).fetch_one(&mut admin).await.expect("gone") > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }

        // The first read meets a cut connection and runs again on a new one.
        let mut attempts = 0;
        let id = session_id(&pool, &mut attempts).await.expect("first read");
        assert_eq!(attempts, 2);
        assert!(!old.contains(&id), "{id} is a killed session");
        // The other cut connection, taken from the pool before the loss was found, was pinged
        // first and replaced: this read runs once.
        let mut attempts = 0;
        session_id(&pool, &mut attempts).await.expect("second read");
        assert_eq!(attempts, 1);

        // A statement that fails on a live connection is not run again.
        let mut attempts = 0;
        let failed = read!(pool, |c| {
            attempts += 1;
            sqlx::query("SELECT no_such_column FROM no_such_table").execute(c).await
        });
        assert!(matches!(failed, Err(StoreError::Backend(_))), "{:?}", failed.map(|_| ()));
        assert_eq!(attempts, 1);
    }

    /// The sqlx pools' side: three pooled connections ended by the database; a transaction's
    /// `BEGIN` finds one cut and tries once more, on a connection pinged first (the others, put
    /// back before the loss was found, are pinged and replaced), so it and the next succeed.
    macro_rules! transactions_survive_connections_cut_since_their_last_use {
        ($name:ident, $conn:ty, $db:ty) => {
            #[tokio::test]
            async fn $name() {
                let Ok(url) = std::env::var(<$conn as Killable>::URL_VAR) else {
                    eprintln!("{} unset: skipped", <$conn as Killable>::URL_VAR);
                    return;
                };
                let settings =
                    PoolSettings { max_size: 3, connection_timeout: Duration::from_secs(5), ..Default::default() };
                let pool = crate::sql::network_pool::<$db>(&settings).connect(&url).await.expect("pool");
                let mut held = Vec::new();
                for _ in 0..3 {
                    held.push(pool.acquire().await.expect("connection"));
                }
                let mut old = Vec::new();
                for conn in &mut held {
                    let id: i64 =
                        sqlx::query_scalar(<$conn as Killable>::SESSION_ID).fetch_one(&mut **conn).await.expect("id");
                    old.push(id);
                }
                drop(held);
                let mut admin = <$conn>::connect(&url).await.expect("admin connection");
                for id in &old {
                    sqlx::query(<$conn as Killable>::KILL).bind(*id).execute(&mut admin).await.expect("kill");
                }
                for id in &old {
                    loop {
                        let left: i64 = sqlx::query_scalar(<$conn as Killable>::GONE)
                            .bind(*id)
                            .fetch_one(&mut admin)
                            .await
                            .expect("gone");
                        if left == 0 {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                for _ in 0..2 {
                    let id: i64 = crate::caller::transaction(&pool, crate::caller::Caller::default(), |tx, _| {
                        Box::pin(async move {
                            Ok(sqlx::query_scalar(<$conn as Killable>::SESSION_ID).fetch_one(&mut **tx).await?)
                        })
                    })
                    .await
                    .expect("transaction");
                    assert!(!old.contains(&id), "{id} is a killed session");
                }
            }
        };
    }

    transactions_survive_connections_cut_since_their_last_use!(
        postgres_transactions_survive_connections_cut_since_their_last_use,
        PgConnection,
        sqlx::Postgres
    );
    transactions_survive_connections_cut_since_their_last_use!(
        mysql_transactions_survive_connections_cut_since_their_last_use,
        sqlx::MySqlConnection,
        sqlx::MySql
    );

    #[tokio::test]
    async fn postgres_reads_survive_connections_cut_since_their_last_use() {
        reads_survive_connections_cut_since_their_last_use::<PgConnection>().await;
    }

    #[tokio::test]
    async fn mysql_reads_survive_connections_cut_since_their_last_use() {
        reads_survive_connections_cut_since_their_last_use::<sqlx::MySqlConnection>().await;
    }

    #[tokio::test]
    async fn an_unreachable_database_is_unavailable() {
        let options = PgConnectOptions::new().host("127.0.0.1").port(1).username("nobody");
        let settings = PoolSettings { max_size: 1, connection_timeout: Duration::from_secs(2), ..Default::default() };
        let pool = ReadPool::<PgConnection>::new(options, &settings).expect("pool");
        match pool.get().await {
            Err(StoreError::Unavailable(_)) => {}
            other => panic!("expected Unavailable, got {:?}", other.map(|_| ())),
        }
    }
}
