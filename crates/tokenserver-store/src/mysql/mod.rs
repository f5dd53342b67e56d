//! MySQL / MariaDB backend: Mozilla's MySQL schema (`tokenserver-mysql`), reached by replaying
//! Mozilla's nine migrations with the same diesel version strings, so a database at any of
//! Mozilla's migration levels upgrades exactly as Mozilla's server would upgrade it.
//!
//! Atomicity: connections run READ COMMITTED; every write transaction locks the service's `nodes`
//! rows, then the user's `users` rows, with `SELECT … FOR UPDATE`. Migrations run under
//! `GET_LOCK`. Only SQL that MariaDB 10.6+ and MySQL 8 both accept is used.

pub mod access;
pub(crate) mod sync;

use std::str::FromStr;

use sqlx::mysql::MySqlConnectOptions;
use sqlx::{Executor, MySqlPool};

use tokenserver_core::sync::users::UserRow;

use crate::batch::Batcher;
use crate::sql::alloc_queue::AllocationQueue;
use crate::sql::migrate::Migration;
use crate::sql::read_pool::ReadPool;
use crate::sql::{UserKey, READ_STALL, ROWS_BATCH, ROWS_IN_FLIGHT};
use crate::sync::MigrationReport;
use crate::{PoolSettings, StoreError};

/// Mozilla's MySQL migrations, in order (directory → diesel version).
const MIGRATIONS: &[Migration] = &[
    // 2021-07-16-001122_init
    Migration {
        version: "20210716001122",
        sql: r#"
CREATE TABLE IF NOT EXISTS services (
    id int NOT NULL AUTO_INCREMENT,
    service varchar(30) DEFAULT NULL,
    pattern varchar(128) DEFAULT NULL,
    PRIMARY KEY (id),
    UNIQUE KEY service (service)
);
CREATE TABLE IF NOT EXISTS nodes (
    id bigint NOT NULL AUTO_INCREMENT,
    service int NOT NULL,
    node varchar(64) NOT NULL,
    available int NOT NULL DEFAULT '0',
    current_load int NOT NULL DEFAULT '0',
    capacity int NOT NULL DEFAULT '0',
    downed int NOT NULL DEFAULT '0',
    backoff int NOT NULL DEFAULT '0',
    PRIMARY KEY (id),
    KEY service (service),
    CONSTRAINT nodes_ibfk_1 FOREIGN KEY (service) REFERENCES services (id)
);
CREATE TABLE IF NOT EXISTS users (
    uid bigint NOT NULL AUTO_INCREMENT,
    service int NOT NULL,
    email varchar(255) NOT NULL,
    generation bigint NOT NULL,
    client_state varchar(32) NOT NULL,
    created_at bigint NOT NULL,
    replaced_at bigint DEFAULT NULL,
    nodeid bigint NOT NULL,
    keys_changed_at bigint DEFAULT NULL,
    PRIMARY KEY (uid),
    KEY nodeid (nodeid),
    CONSTRAINT users_ibfk_1 FOREIGN KEY (nodeid) REFERENCES nodes (id)
) ENGINE=InnoDB AUTO_INCREMENT=4 DEFAULT CHARSET=utf8
"#,
    },
    // 2021-08-03-234845_populate_services
    Migration {
        version: "20210803234845",
        sql: "INSERT IGNORE INTO services (id, service, pattern) VALUES \
              (1, 'sync-1.1', '{node}/1.1/{uid}'), (2, 'sync-1.5', '{node}/1.5/{uid}')",
    },
    // 2021-09-30-142643_remove_foreign_key_constraints
    Migration {
        version: "20210930142643",
        sql: "ALTER TABLE nodes DROP FOREIGN KEY nodes_ibfk_1; ALTER TABLE users DROP FOREIGN KEY users_ibfk_1",
    },
    // 2021-09-30-142654_remove_node_defaults
    Migration {
        version: "20210930142654",
        sql: "ALTER TABLE nodes ALTER COLUMN available DROP DEFAULT, ALTER COLUMN current_load DROP DEFAULT, \
              ALTER COLUMN capacity DROP DEFAULT, ALTER COLUMN downed DROP DEFAULT, ALTER COLUMN backoff DROP DEFAULT",
    },
    // 2021-09-30-142746_add_indexes
    Migration {
        version: "20210930142746",
        sql: "CREATE UNIQUE INDEX unique_idx ON nodes (service, node); \
              CREATE INDEX lookup_idx ON users (email, service, created_at); \
              CREATE INDEX replaced_at_idx ON users (service, replaced_at); \
              CREATE INDEX node_idx ON users (nodeid)",
    },
    // 2021-09-30-144043_remove_nodes_service_key
    Migration { version: "20210930144043", sql: "ALTER TABLE nodes DROP KEY service" },
    // 2021-09-30-144225_remove_users_nodeid_key
    Migration { version: "20210930144225", sql: "ALTER TABLE users DROP KEY nodeid" },
    // 2021-12-22-160451_remove_services
    Migration { version: "20211222160451", sql: "DELETE FROM services WHERE id = 1 OR id = 2" },
    // 2026-02-26-185317-0000_add_sync15_service
    Migration {
        version: "202602261853170000",
        sql: "INSERT IGNORE INTO services (service, pattern) VALUES ('sync-1.5', '{node}/1.5/{uid}')",
    },
];

/// Rewrites the `unix_socket=` spelling some deployments use into sqlx's `socket=`.
pub(crate) fn normalise_url(url: &str) -> String {
    url.replacen("unix_socket=", "socket=", 1)
}

/// The MySQL store.
#[derive(Debug, Clone)]
pub struct MySqlStore {
    pool: MySqlPool,
    /// The request path's reads ([`crate::sql::read_pool`]): single autocommit `SELECT`s, for which
    /// the write pool's READ COMMITTED makes no difference.
    reads: ReadPool<sqlx::MySqlConnection>,
    /// Users' rows reads, one statement for those waiting at that moment
    /// ([`sync::rows_many`]).
    user_reads: Batcher<UserKey, Vec<UserRow>>,
    /// Allocations go through one task that batches them ([`crate::sql::alloc_queue`]); `None` in
    /// that task's own copy of the store.
    allocations: Option<AllocationQueue>,
}

impl MySqlStore {
    /// Connects lazily (the server starts while the database is down and recovers by itself).
    pub async fn open(url: &str, pool: &PoolSettings) -> Result<Self, StoreError> {
        let options = MySqlConnectOptions::from_str(&normalise_url(url))
            .map_err(|e| StoreError::Config(format!("invalid MySQL URL: {e}")))?;
        let reads = ReadPool::new(options.clone(), pool)?;
        let pool = crate::sql::network_pool::<sqlx::MySql>(pool)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED").await?;
                    Ok(())
                })
            })
            .connect_lazy_with(options);
        let for_rows = reads.clone();
        let reader = std::sync::Arc::new(sync::RowsReader::default());
        let user_reads = Batcher::start_staggered("user_rows", ROWS_BATCH, ROWS_IN_FLIGHT, READ_STALL, move |keys| {
            sync::rows_many(for_rows.clone(), reader.clone(), keys)
        });
        let store = Self { pool, reads, user_reads, allocations: None };
        let queue = AllocationQueue::start(store.clone());
        Ok(Self { allocations: Some(queue), ..store })
    }

    async fn run_migrations(&self) -> Result<MigrationReport, StoreError> {
        // DDL commits implicitly in MySQL: a named lock, not a transaction, keeps two processes
        // from migrating at once.
        let mut conn = self.pool.acquire().await?;
        let locked: Option<i64> =
            sqlx::query_scalar("SELECT GET_LOCK('tokenserver_migrations', 60)").fetch_one(&mut *conn).await?;
        if locked != Some(1) {
            return Err(StoreError::Unavailable("could not take the migration lock".into()));
        }
        let result = sync::stamped::apply_migrations(&mut conn, MIGRATIONS).await;
        let _ = sqlx::query("SELECT RELEASE_LOCK('tokenserver_migrations')").execute(&mut *conn).await;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_socket_spellings_are_accepted() {
        let a = normalise_url("mysql://u@localhost/db?unix_socket=/run/mysqld/mysqld.sock");
        assert_eq!(a, "mysql://u@localhost/db?socket=/run/mysqld/mysqld.sock");
        assert!(MySqlConnectOptions::from_str(&a).is_ok());
        let b = normalise_url("mysql://u@localhost/db?socket=%2Fvar%2Flib%2Fmysql%2Fmysql.sock");
        assert!(MySqlConnectOptions::from_str(&b).is_ok());
    }
}

#[cfg(test)]
mod batch_tests {
    use super::*;
    use crate::SyncStore;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_of_allocations_is_what_its_calls_one_by_one_would_be() {
        let Some(db) = crate::testing::fresh(crate::Backend::MySql).await else { return };
        let store = MySqlStore::open(&db.url, &PoolSettings::default()).await.unwrap_or_else(|e| panic!("{e}"));
        store.migrate().await.unwrap_or_else(|e| panic!("{e}"));
        crate::sql::alloc_queue::batch_case(&store).await;
        drop(store);
        db.drop_now().await;
    }
}
