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

use std::ops::{Deref, DerefMut};

use deadpool::managed::{self, Metrics, Object, PoolError, RecycleError, RecycleResult};
use sqlx::Connection;

use crate::{PoolSettings, StoreError};

/// A pooled connection, and whether its last read finished cleanly.
struct Pooled<C> {
    conn: C,
    clean: bool,
}

/// Opens connections with the store's options; closes unclean ones and pings idle ones before
/// reuse.
struct Connector<C: Connection> {
    options: C::Options,
}

impl<C: Connection> managed::Manager for Connector<C> {
    type Type = Pooled<C>;
    type Error = sqlx::Error;

    async fn create(&self) -> Result<Pooled<C>, sqlx::Error> {
        Ok(Pooled { conn: C::connect_with(&self.options).await?, clean: true })
    }

    async fn recycle(&self, pooled: &mut Pooled<C>, metrics: &Metrics) -> RecycleResult<sqlx::Error> {
        if !pooled.clean {
            // Dropped by deadpool, which then takes another connection or opens one.
            return Err(RecycleError::message("read did not finish"));
        }
        if metrics.last_used() > crate::sql::PING_IF_IDLE_FOR {
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
        let pool = managed::Pool::builder(Connector { options })
            .max_size(settings.max_size.max(1) as usize)
            .wait_timeout(timeout)
            .create_timeout(timeout)
            .recycle_timeout(timeout)
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Config(format!("read pool: {e}")))?;
        Ok(Self { pool })
    }

    /// A connection for one read. Call [`Lease::keep`] once the read has succeeded; a lease
    /// dropped without it leaves its connection to be closed.
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
        let mut lease = self.get().await?;
        lease.ping().await?;
        lease.keep();
        Ok(())
    }
}

/// A connection lent for one read.
pub(crate) struct Lease<C: Connection>(Object<Connector<C>>);

impl<C: Connection> Lease<C> {
    /// The read finished cleanly: the connection can serve the next one as it is.
    pub(crate) fn keep(mut self) {
        self.0.clean = true;
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
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut *lease).await.expect("query");
        lease.keep();
        pid
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
