//! SQLite backend: the embedded default. Mozilla's node-assignment schema in one file.
//!
//! Reads go through a pool of connections in WAL mode; writes go through a single connection,
//! each in a `BEGIN IMMEDIATE` transaction, so every read-modify-write is serialized within
//! this process and takes SQLite's write lock up front against other processes (the CLI).

mod sync;

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;

use crate::migrate::Migration;
use crate::sync::MigrationReport;
use crate::{PoolSettings, StoreError};

/// Schema migrations. Versions follow diesel's naming so the bookkeeping table looks like
/// Mozilla's on every backend; the schema itself mirrors Mozilla's PostgreSQL one.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: "20250902195720",
        sql: r#"
CREATE TABLE IF NOT EXISTS services (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    service VARCHAR(30) UNIQUE,
    pattern VARCHAR(128)
);
CREATE TABLE IF NOT EXISTS nodes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    service INTEGER NOT NULL,
    node VARCHAR(64) NOT NULL,
    available INTEGER NOT NULL,
    current_load INTEGER NOT NULL,
    capacity INTEGER NOT NULL,
    downed INTEGER NOT NULL,
    backoff INTEGER NOT NULL,
    CONSTRAINT unique_idx UNIQUE (service, node)
);
CREATE TABLE IF NOT EXISTS users (
    uid INTEGER PRIMARY KEY AUTOINCREMENT,
    service INTEGER NOT NULL,
    email VARCHAR(255) NOT NULL,
    generation BIGINT NOT NULL,
    client_state VARCHAR(32) NOT NULL,
    created_at BIGINT NOT NULL,
    replaced_at BIGINT,
    nodeid BIGINT NOT NULL,
    keys_changed_at BIGINT
);
CREATE INDEX IF NOT EXISTS lookup_idx ON users (email, service, created_at);
CREATE INDEX IF NOT EXISTS replaced_at_idx ON users (service, replaced_at);
CREATE INDEX IF NOT EXISTS node_idx ON users (nodeid);
INSERT OR IGNORE INTO services (service, pattern) VALUES ('sync-1.5', '{node}/1.5/{uid}');
"#,
    },
    Migration {
        version: "20261123000001",
        sql: r#"
CREATE TABLE IF NOT EXISTS tokenserver_meta (
    name VARCHAR(64) PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
"#,
    },
];

/// The SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    read: SqlitePool,
    write: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `url` (`sqlite://path`, `sqlite:path` or
    /// `sqlite::memory:`).
    pub async fn open(url: &str, pool: &PoolSettings) -> Result<Self, StoreError> {
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Config(format!("invalid SQLite URL: {e}")))?
            .create_if_missing(true)
            .journal_mode(if in_memory { SqliteJournalMode::Memory } else { SqliteJournalMode::Wal })
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(false);
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(pool.connection_timeout)
            .connect_with(options.clone())
            .await?;
        // An in-memory database exists once per connection: share the writer.
        let read = if in_memory {
            write.clone()
        } else {
            SqlitePoolOptions::new()
                .max_connections(pool.max_size.max(1))
                .acquire_timeout(pool.connection_timeout)
                .connect_with(options.read_only(true))
                .await?
        };
        Ok(Self { read, write })
    }

    async fn run_migrations(&self) -> Result<MigrationReport, StoreError> {
        let mut tx = self.write.begin_with("BEGIN IMMEDIATE").await?;
        let report = sync::apply_migrations(&mut tx, MIGRATIONS).await?;
        tx.commit().await?;
        Ok(report)
    }
}
