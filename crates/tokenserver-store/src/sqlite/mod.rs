//! SQLite backend: the embedded default. Mozilla's node-assignment schema (and the session
//! table) in one file.
//!
//! Every write runs on a group-commit writer ([`group`]) that owns the write connection: calls
//! are batched into one transaction, each in its own savepoint, and a caller that goes away
//! cannot cut a statement short (the writer's task finishes it and rolls the call back). Every
//! read-modify-write is therefore serialized within this process and takes SQLite's write lock
//! (`BEGIN IMMEDIATE`) against other processes, such as the CLI.
//!
//! Reads run inline on the calling thread through a small pool of read-only connections in WAL
//! mode (readers never wait for the writer): an indexed lookup answered from the page cache takes
//! microseconds, less than a hop to another thread and back. An in-memory database
//! (`sqlite::memory:`) exists once per connection, so there every call, reads included, goes to
//! its writer.

pub mod access;
pub(crate) mod group;
pub mod session;
mod sync;
mod wal_cache;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::Connection;

use crate::sql::migrate::Migration;
use crate::StoreError;

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
/// How long a write waits for SQLite's lock (another process, e.g. the CLI, writing).
const WRITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a writer waiting for that lock tries again. SQLite's own handler sleeps 1, 2, 5, …
/// then 100 ms between tries, and a writer kept waiting by another busy process (a second web
/// head on the file) slept through the short gaps between that process's batches: creates split
/// over two heads had a p99 of 22 ms and a maximum of 433 ms (bench/results/access-two-heads.md).
const WRITE_BUSY_STEP: Duration = Duration::from_micros(250);

thread_local! {
    /// When the write now waiting on this thread first found the lock taken.
    static BUSY_SINCE: std::cell::Cell<Option<std::time::Instant>> = const { std::cell::Cell::new(None) };
}

/// The writers' busy handler (`tries`: how many times SQLite has called it for this wait): try
/// again every [`WRITE_BUSY_STEP`] until [`WRITE_BUSY_TIMEOUT`] has passed.
fn wait_for_write_lock(tries: i32) -> bool {
    let now = std::time::Instant::now();
    let since = BUSY_SINCE.with(|cell| match cell.get() {
        Some(since) if tries > 0 => since,
        _ => {
            cell.set(Some(now));
            now
        }
    });
    if now.duration_since(since) >= WRITE_BUSY_TIMEOUT {
        return false;
    }
    std::thread::sleep(WRITE_BUSY_STEP);
    true
}

/// How durable a commit is (`PRAGMA synchronous` of the writers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// `NORMAL` (the default): in WAL mode a commit survives a crash of the process; a power cut
    /// or an OS crash may lose the last commits (never corrupts the file).
    #[default]
    Normal,
    /// `FULL`: every commit is on disk before it is answered (an fsync per batch).
    Full,
}

impl Durability {
    fn pragma(self) -> &'static str {
        match self {
            Durability::Normal => "NORMAL",
            Durability::Full => "FULL",
        }
    }
}

pub(crate) fn rusqlite_error(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode::{ConstraintViolation, DatabaseBusy, DatabaseLocked};
    match &e {
        rusqlite::Error::SqliteFailure(f, _) => match f.code {
            DatabaseBusy | DatabaseLocked => StoreError::Unavailable(e.to_string()),
            // SQLITE_CONSTRAINT_UNIQUE, SQLITE_CONSTRAINT_PRIMARYKEY.
            ConstraintViolation if matches!(f.extended_code, 2067 | 1555) => StoreError::AlreadyExists(e.to_string()),
            _ => StoreError::Backend(e.to_string()),
        },
        _ => StoreError::Backend(e.to_string()),
    }
}

/// The database file a `sqlite:` URL names (any spelling sqlx accepts: `sqlite://path`,
/// `sqlite:path`, with query options); `None` for an in-memory database.
pub fn database_file(url: &str) -> Result<Option<PathBuf>, StoreError> {
    if url.contains(":memory:") || url.contains("mode=memory") {
        return Ok(None);
    }
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)
        .map_err(|err| StoreError::Config(format!("invalid SQLite URL: {err}")))?;
    Ok(Some(options.get_filename().to_path_buf()))
}

/// Creates the database file, readable by its owner only, unless it exists: it holds the
/// generated secrets, and SQLite gives its `-wal` and `-shm` files the database file's mode.
fn create_private(path: &Path) -> Result<(), StoreError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StoreError::Config(format!("cannot create the SQLite database {}: {e}", path.display()))),
    }
}

/// A read-write connection of a writer (or its checkpointer) to `file`, or to a new
/// in-memory database.
pub(crate) fn writer_connection(file: Option<&Path>, durability: Durability) -> Result<Connection, StoreError> {
    if let Some(path) = file {
        create_private(path)?;
    }
    let conn = match file {
        None => Connection::open_in_memory().map_err(rusqlite_error)?,
        Some(path) => Connection::open(path)
            .map_err(|err| StoreError::Config(format!("cannot open the SQLite database {}: {err}", path.display())))?,
    };
    conn.busy_handler(Some(wait_for_write_lock)).map_err(rusqlite_error)?;
    if file.is_some() {
        conn.pragma_update(None, "journal_mode", "WAL").map_err(rusqlite_error)?;
    }
    conn.pragma_update(None, "synchronous", durability.pragma()).map_err(rusqlite_error)?;
    Ok(conn)
}

/// Read-only connections used inline, at most `max_idle` kept.
pub(crate) struct ReadConns {
    path: PathBuf,
    idle: std::sync::Mutex<Vec<Connection>>,
    max_idle: usize,
}

impl std::fmt::Debug for ReadConns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadConns").field("path", &self.path).finish_non_exhaustive()
    }
}

impl ReadConns {
    pub(crate) fn new(path: PathBuf, max_idle: usize) -> Self {
        Self { path, idle: std::sync::Mutex::new(Vec::new()), max_idle: max_idle.max(1) }
    }

    fn open(&self) -> rusqlite::Result<Connection> {
        use rusqlite::OpenFlags;
        let conn = Connection::open_with_flags(
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
    pub(crate) fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
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

/// The SQLite Sync store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// Every write, and every read of an in-memory database.
    writer: group::GroupWriter,
    /// Inline readers of a file database.
    reads: Option<Arc<ReadConns>>,
    /// Users' rows as last read, for a file database (see [`wal_cache`]).
    rows: Option<Arc<wal_cache::RowCache>>,
    /// Access tokens as last read, for a file database.
    tokens: Option<Arc<wal_cache::TokenCache>>,
}

/// What [`backup`] copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupReport {
    /// Database pages copied.
    pub pages: i32,
    /// Bytes written.
    pub bytes: u64,
}

/// Copies the database `url` names into a new file `dest` with SQLite's online backup API: a
/// consistent snapshot while servers keep writing (the copy restarts on a write, in steps of
/// `PAGES_PER_STEP` with a pause between, so writers are never held up for long). `dest` is
/// created readable by its owner only and must not exist.
pub fn backup(url: &str, dest: &Path, progress: &mut dyn FnMut(i32, i32)) -> Result<BackupReport, StoreError> {
    const PAGES_PER_STEP: i32 = 1024;
    let Some(source) = database_file(url)? else {
        return Err(StoreError::Config("an in-memory database has nothing to back up".into()));
    };
    if !source.exists() {
        return Err(StoreError::Config(format!("no database at {}", source.display())));
    }
    if dest.exists() {
        return Err(StoreError::Config(format!("{} exists: give a new file", dest.display())));
    }
    let from =
        Connection::open_with_flags(&source, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(rusqlite_error)?;
    from.busy_timeout(WRITE_BUSY_TIMEOUT).map_err(rusqlite_error)?;
    create_private(dest)?;
    let mut to = Connection::open(dest).map_err(rusqlite_error)?;
    let copy = rusqlite::backup::Backup::new(&from, &mut to).map_err(rusqlite_error)?;
    loop {
        use rusqlite::backup::StepResult;
        let step = copy.step(PAGES_PER_STEP).map_err(rusqlite_error)?;
        let p = copy.progress();
        progress(p.pagecount - p.remaining, p.pagecount);
        match step {
            StepResult::Done => break,
            StepResult::More => std::thread::sleep(Duration::from_millis(5)),
            // A writer holds the lock: wait for it rather than fail.
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    let pages = copy.progress().pagecount;
    drop(copy);
    // The copy is a rollback-journal file until opened by a server (which switches it to WAL):
    // check it reads back whole.
    let ok: String = to.query_row("PRAGMA quick_check", [], |r| r.get(0)).map_err(rusqlite_error)?;
    if ok != "ok" {
        return Err(StoreError::Backend(format!("the copy failed its integrity check: {ok}")));
    }
    drop(to);
    let bytes = std::fs::metadata(dest).map(|m| m.len()).unwrap_or(0);
    Ok(BackupReport { pages, bytes })
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `url` (`sqlite://path`, `sqlite:path` or
    /// `sqlite::memory:`) and starts its writer (`writer`: its name in metrics and thread names);
    /// `max_readers` inline read connections are kept. Creates no table: see
    /// [`crate::SyncStore::migrate`] and [`session::SqliteSessions::on`].
    pub async fn open(url: &str, writer: &str, max_readers: usize, durability: Durability) -> Result<Self, StoreError> {
        let file = database_file(url)?;
        let name = writer.to_string();
        tokio::task::spawn_blocking(move || Self::open_blocking(file, &name, max_readers, durability))
            .await
            .map_err(|err| StoreError::Backend(format!("open task failed: {err}")))?
    }

    fn open_blocking(
        file: Option<PathBuf>,
        name: &str,
        max_readers: usize,
        durability: Durability,
    ) -> Result<Self, StoreError> {
        let Some(path) = file else {
            let conn = writer_connection(None, durability)?;
            let writer = group::GroupWriter::start(name, conn, None, None)?;
            return Ok(Self { writer, reads: None, rows: None, tokens: None });
        };
        let conn = writer_connection(Some(&path), durability)?;
        let checkpoints = writer_connection(Some(&path), durability)?;
        // Opened after a WAL-mode connection, which creates the `-shm` file it watches.
        let index = wal_cache::WalIndex::open(&path).map(Arc::new);
        let rows = index.clone().map(|index| Arc::new(wal_cache::RowCache::new(index)));
        let tokens = index.clone().map(|index| Arc::new(wal_cache::TokenCache::new(index)));
        let watch = match (&index, &rows, &tokens) {
            (Some(index), Some(rows), Some(tokens)) => {
                let caches: Vec<Arc<dyn wal_cache::Watched>> = vec![rows.clone(), tokens.clone()];
                Some(Box::new(wal_cache::CommitWatch::new(index.clone(), caches)) as Box<dyn group::BatchObserver>)
            }
            _ => None,
        };
        let writer = group::GroupWriter::start(name, conn, Some(checkpoints), watch)?;
        Ok(Self { writer, reads: Some(Arc::new(ReadConns::new(path, max_readers))), rows, tokens })
    }

    /// The database's writer.
    pub(crate) fn writer(&self) -> &group::GroupWriter {
        &self.writer
    }

    /// The inline readers of a file database (`None` in memory: reads go to the writer).
    pub(crate) fn readers(&self) -> Option<Arc<ReadConns>> {
        self.reads.clone()
    }

    /// The access-token cache of a file database (`None` in memory).
    pub(crate) fn token_cache(&self) -> Option<Arc<wal_cache::TokenCache>> {
        self.tokens.clone()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A directory of its own under the system's temporary one, removed on drop.
    pub(crate) struct Dir(PathBuf);

    impl Dir {
        pub(crate) fn new(name: &str) -> Self {
            let dir = Self(std::env::temp_dir().join(format!("tokenserver-{}-{name}", std::process::id())));
            std::fs::create_dir_all(&dir.0).unwrap();
            dir
        }

        pub(crate) fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn rows(conn: &Connection) -> i64 {
        conn.query_row("SELECT count(*) FROM t", [], |r| r.get(0)).unwrap()
    }

    /// Two writer connections to a new file holding table `t`: the other one, then the writer.
    fn two_writers(dir: &Dir) -> (Connection, Connection) {
        let path = dir.path().join("t.db");
        let other = writer_connection(Some(&path), Durability::Normal).unwrap();
        other.execute_batch("CREATE TABLE t (x INTEGER)").unwrap();
        (other, writer_connection(Some(&path), Durability::Normal).unwrap())
    }

    /// Another connection (another process, for SQLite) holds the write lock: a writer waits
    /// for it, then writes, as often as it is made to wait.
    #[test]
    fn a_writer_waits_for_the_lock_another_connection_holds() {
        let dir = Dir::new("busy-wait");
        let (other, writer) = two_writers(&dir);
        let writer = std::thread::scope(|s| {
            let mut writer = writer;
            for round in 0..3 {
                other.execute_batch("BEGIN IMMEDIATE; INSERT INTO t VALUES (0)").unwrap();
                let waiting = s.spawn(move || {
                    writer.execute_batch("BEGIN IMMEDIATE; INSERT INTO t VALUES (1); COMMIT").map(|()| writer)
                });
                std::thread::sleep(Duration::from_millis(100));
                assert!(!waiting.is_finished(), "round {round}: the writer did not wait");
                other.execute_batch("COMMIT").unwrap();
                writer = waiting.join().unwrap().unwrap_or_else(|e| panic!("round {round}: {e}"));
            }
            writer
        });
        assert_eq!((rows(&writer), rows(&other)), (6, 6));
    }

    /// A lock held past [`WRITE_BUSY_TIMEOUT`]: the write gives up with "busy" (the store answers
    /// `Unavailable`), and the next wait on the same thread starts its own clock.
    #[test]
    fn a_writer_gives_up_on_a_lock_held_past_the_timeout() {
        let dir = Dir::new("busy-timeout");
        let (other, writer) = two_writers(&dir);
        other.execute_batch("BEGIN IMMEDIATE; INSERT INTO t VALUES (0)").unwrap();
        let started = std::time::Instant::now();
        let err = writer.execute_batch("BEGIN IMMEDIATE").unwrap_err();
        assert!(started.elapsed() >= WRITE_BUSY_TIMEOUT, "gave up after {:?}", started.elapsed());
        assert!(matches!(rusqlite_error(err), StoreError::Unavailable(_)));
        other.execute_batch("COMMIT; BEGIN IMMEDIATE").unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            other.execute_batch("COMMIT").unwrap();
        });
        writer.execute_batch("BEGIN IMMEDIATE; INSERT INTO t VALUES (1); COMMIT").unwrap();
        release.join().unwrap();
        assert_eq!(rows(&writer), 2);
    }
}
