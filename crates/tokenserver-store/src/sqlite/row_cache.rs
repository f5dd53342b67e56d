//! A cache of users' rows for the request path that is exact across processes.
//!
//! Every commit to a WAL-mode database, by any connection of any process, rewrites the
//! WAL-index header at the start of the database's `-shm` file (its change counter, frame count
//! and checksums move; <https://www.sqlite.org/walformat.html>, "the WAL-index header"). The
//! cache remembers the header it was filled under and empties itself as soon as the header
//! differs, so an answer from it is one a read of the database would have given at that moment.
//! Checking costs one 48-byte `pread` of a page the kernel holds in memory, where the query it
//! replaces (a read transaction, three index lookups) cost ~15 µs per request.
//!
//! The header is read before the database: rows read afterwards are at least as new as that
//! header, so filing them under it can only make a later check discard them early, never serve
//! them late.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;
use tokenserver_core::sync::users::UserRow;

/// Bytes of the WAL-index header compared (its first copy).
const HEADER_BYTES: usize = 48;
/// Users whose rows are kept; the cache starts over when full (it refills at the read rate).
const MAX_ENTRIES: usize = 100_000;

/// A WAL-index header as read (all zero before the first commit).
pub(crate) type Header = [u8; HEADER_BYTES];

struct Filled {
    header: Header,
    /// Service → email → rows (nested so that a lookup borrows the strings it is given).
    rows: HashMap<String, HashMap<String, Arc<[UserRow]>>>,
    entries: usize,
}

/// The rows of recently seen users, valid while the WAL-index header is unchanged.
pub(crate) struct RowCache {
    shm: File,
    filled: Mutex<Filled>,
}

impl std::fmt::Debug for RowCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowCache").finish_non_exhaustive()
    }
}

impl RowCache {
    /// Watches the `-shm` file of the WAL-mode database at `db` (which must be open in WAL mode,
    /// so that the file exists). `None` when it cannot be opened: reads then always query.
    pub(crate) fn open(db: &Path) -> Option<Self> {
        let mut shm = db.as_os_str().to_owned();
        shm.push("-shm");
        match File::open(&shm) {
            Ok(shm) => Some(Self {
                shm,
                filled: Mutex::new(Filled { header: [0; HEADER_BYTES], rows: HashMap::new(), entries: 0 }),
            }),
            Err(err) => {
                tracing::warn!(error = %err, "no WAL index to watch: the user-row cache is off");
                None
            }
        }
    }

    /// The header now; `None` if it could not be read (treated as a change).
    pub(crate) fn header(&self) -> Option<Header> {
        let mut header = [0u8; HEADER_BYTES];
        self.shm.read_exact_at(&mut header, 0).ok()?;
        Some(header)
    }

    /// The rows cached for `key` under `header`, emptying the cache if it was filled under
    /// another header.
    pub(crate) fn get(&self, header: &Header, key: (&str, &str)) -> Option<Arc<[UserRow]>> {
        let mut filled = self.filled.lock();
        if filled.header != *header {
            filled.rows.clear();
            filled.entries = 0;
            filled.header = *header;
            return None;
        }
        filled.rows.get(key.0)?.get(key.1).cloned()
    }

    /// Files `rows`, read after `header` was, under it (dropped if the header moved on since).
    pub(crate) fn put(&self, header: &Header, key: (&str, &str), rows: Arc<[UserRow]>) {
        let mut filled = self.filled.lock();
        if filled.header != *header {
            return;
        }
        if filled.entries >= MAX_ENTRIES {
            filled.rows.clear();
            filled.entries = 0;
        }
        let service = filled.rows.entry(key.0.to_string()).or_default();
        if service.insert(key.1.to_string(), rows).is_none() {
            filled.entries += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(uid: i64) -> UserRow {
        UserRow {
            uid,
            node_id: Some(1),
            node: Some("https://n".into()),
            generation: 0,
            keys_changed_at: None,
            client_state: String::new(),
            created_at: 0,
            replaced_at: None,
        }
    }

    /// A directory of its own holding `t.db-shm` (all zero), removed on drop.
    struct Dir(std::path::PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    impl Dir {
        fn path(&self) -> &Path {
            &self.0
        }
    }

    fn cache(name: &str) -> (Dir, RowCache) {
        let dir = Dir(std::env::temp_dir().join(format!("tokenserver-row-cache-{}-{name}", std::process::id())));
        std::fs::create_dir_all(dir.path()).unwrap();
        std::fs::write(dir.path().join("t.db-shm"), [0u8; 64]).unwrap();
        let cache = RowCache::open(&dir.path().join("t.db")).unwrap();
        (dir, cache)
    }

    #[test]
    fn rows_are_served_only_under_the_header_they_were_read_after() {
        let (_dir, cache) = cache("serve");
        let h1 = [1u8; HEADER_BYTES];
        let h2 = [2u8; HEADER_BYTES];
        assert!(cache.get(&h1, ("s", "a")).is_none());
        cache.put(&h1, ("s", "a"), Arc::from(vec![row(7)]));
        assert_eq!(cache.get(&h1, ("s", "a")).unwrap()[0].uid, 7);
        assert!(cache.get(&h1, ("s", "b")).is_none());
        assert!(cache.get(&h1, ("t", "a")).is_none());
        // A commit anywhere: everything goes.
        assert!(cache.get(&h2, ("s", "a")).is_none());
        // Rows read after h1 but filed once h2 is current are dropped.
        cache.put(&h1, ("s", "b"), Arc::from(vec![row(9)]));
        assert!(cache.get(&h2, ("s", "b")).is_none());
        cache.put(&h2, ("s", "a"), Arc::from(vec![row(8)]));
        assert_eq!(cache.get(&h2, ("s", "a")).unwrap()[0].uid, 8);
    }

    #[test]
    fn the_header_is_read_from_the_shm_file() {
        let (dir, cache) = cache("header");
        assert_eq!(cache.header(), Some([0u8; HEADER_BYTES]));
        let mut bytes = [0u8; 64];
        bytes[8] = 5;
        std::fs::write(dir.path().join("t.db-shm"), bytes).unwrap();
        assert_eq!(cache.header().unwrap()[8], 5);
        assert!(RowCache::open(&dir.path().join("missing.db")).is_none());
    }

    /// On a real WAL database: reads leave the header alone, every commit (from any connection)
    /// and a checkpoint that restarts the log change it.
    #[test]
    fn a_real_header_moves_with_commits_only() {
        let (dir, _) = cache("real");
        let db = dir.path().join("real.db");
        let writer = rusqlite::Connection::open(&db).unwrap();
        writer.pragma_update(None, "journal_mode", "WAL").unwrap();
        writer.execute_batch("CREATE TABLE t (k INTEGER PRIMARY KEY, v INTEGER)").unwrap();
        let other = rusqlite::Connection::open(&db).unwrap();
        let cache = RowCache::open(&db).unwrap();
        let h1 = cache.header().unwrap();
        let n: i64 = other.query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0)).unwrap();
        assert_eq!((n, cache.header().unwrap()), (0, h1));
        other.execute("INSERT INTO t (v) VALUES (1)", []).unwrap();
        let h2 = cache.header().unwrap();
        assert_ne!(h2, h1);
        writer.execute("UPDATE t SET v = 2", []).unwrap();
        let h3 = cache.header().unwrap();
        assert_ne!(h3, h2);
        writer.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).unwrap();
        writer.execute("UPDATE t SET v = 3", []).unwrap();
        let h4 = cache.header().unwrap();
        assert!(h4 != h3 && h4 != h2 && h4 != h1);
        assert_eq!(cache.header().unwrap(), h4);
    }
}
