//! SQLite backend: the embedded default. Mozilla's node-assignment schema in one file.
//!
//! Writes go through a single sqlx connection, each in a `BEGIN IMMEDIATE` transaction, so every
//! read-modify-write is serialized within this process and takes SQLite's write lock up front
//! against other processes (the CLI).
//!
//! The request path's one read (a user's rows) runs inline on the calling thread through a small
//! pool of read-only `rusqlite` connections in WAL mode (readers never wait for the writer):
//! an indexed lookup answered from the page cache takes microseconds, while a hop to sqlx's
//! per-connection worker thread and back costs more than the query on a 2-core machine.

pub(crate) mod group;
mod row_cache;
mod sync;
mod write;

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

/// How long an inline read may wait on a lock (only WAL recovery or a checkpoint can make it).
const READ_BUSY_TIMEOUT: Duration = Duration::from_millis(100);

/// Read-only connections used inline, at most `max_idle` kept.
struct ReadConns {
    path: std::path::PathBuf,
    idle: std::sync::Mutex<Vec<rusqlite::Connection>>,
    max_idle: usize,
}

impl std::fmt::Debug for ReadConns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadConns").field("path", &self.path).finish_non_exhaustive()
    }
}

pub(super) fn rusqlite_error(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode::{DatabaseBusy, DatabaseLocked};
    match e.sqlite_error_code() {
        Some(DatabaseBusy | DatabaseLocked) => StoreError::Unavailable(e.to_string()),
        _ => StoreError::Backend(e.to_string()),
    }
}

impl ReadConns {
    fn open(&self) -> rusqlite::Result<rusqlite::Connection> {
        use rusqlite::OpenFlags;
        let conn = rusqlite::Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(READ_BUSY_TIMEOUT)?;
        // No memory map: SQLite unmaps it at the start of every read transaction that follows a
        // commit, and under a steady stream of writes the munmap (a TLB shootdown on every core)
        // and the page faults after it cost more than reading the few pages with pread.
        conn.pragma_update(None, "mmap_size", 0)?;
        Ok(conn)
    }

    /// Runs `f` on an idle connection (or a new one) and returns the connection to the pool.
    fn with<T>(&self, f: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let pooled = match self.idle.lock() {
            Ok(mut idle) => idle.pop(),
            Err(poisoned) => poisoned.into_inner().pop(),
        };
        let conn = match pooled {
            Some(c) => c,
            None => self.open().map_err(rusqlite_error)?,
        };
        let out = f(&conn).map_err(rusqlite_error);
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < self.max_idle {
                idle.push(conn);
            }
        }
        out
    }
}

/// The SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    read: SqlitePool,
    write: SqlitePool,
    /// Inline readers; `None` for an in-memory database (one per connection: reads use sqlx).
    inline: Option<std::sync::Arc<ReadConns>>,
    /// The request path's writer; `None` for an in-memory database (writes use sqlx).
    writer: Option<std::sync::Arc<write::Writer>>,
    /// Users' rows as last read, for a file database (see [`row_cache`]).
    rows: Option<std::sync::Arc<row_cache::RowCache>>,
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
        // A local file cannot drop a connection: no ping before each acquire (sqlx's default, an
        // extra round trip to the connection's worker thread per query).
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .acquire_timeout(pool.connection_timeout)
            .connect_with(options.clone())
            .await?;
        let options_for_reads = options.clone();
        // An in-memory database exists once per connection: share the writer.
        let read = if in_memory {
            write.clone()
        } else {
            SqlitePoolOptions::new()
                .max_connections(pool.max_size.max(1))
                .test_before_acquire(false)
                .acquire_timeout(pool.connection_timeout)
                .connect_with(options_for_reads.clone().read_only(true))
                .await?
        };
        let inline = (!in_memory).then(|| {
            std::sync::Arc::new(ReadConns {
                path: options_for_reads.get_filename().to_path_buf(),
                idle: std::sync::Mutex::new(Vec::new()),
                max_idle: pool.max_size.max(1) as usize,
            })
        });
        // Opened after the WAL-mode connections above, which create the `-shm` file.
        let rows = if in_memory {
            None
        } else {
            row_cache::RowCache::open(options_for_reads.get_filename()).map(std::sync::Arc::new)
        };
        let writer = if in_memory {
            None
        } else {
            let path = options_for_reads.get_filename().to_path_buf();
            let rows = rows.clone();
            let writer = tokio::task::spawn_blocking(move || write::Writer::open(&path, rows))
                .await
                .map_err(|err| StoreError::Backend(format!("open task failed: {err}")))??;
            Some(std::sync::Arc::new(writer))
        };
        Ok(Self { read, write, inline, writer, rows })
    }

    async fn run_migrations(&self) -> Result<MigrationReport, StoreError> {
        let mut tx = self.write.begin_with("BEGIN IMMEDIATE").await?;
        let report = sync::apply_migrations(&mut tx, MIGRATIONS).await?;
        tx.commit().await?;
        Ok(report)
    }
}
