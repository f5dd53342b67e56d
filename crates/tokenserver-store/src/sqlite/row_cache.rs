//! A cache of users' rows for the request path that is exact across processes.
//!
//! Every commit to a WAL-mode database, by any connection of any process, rewrites the
//! WAL-index header at the start of the database's `-shm` file (its change counter, frame count
//! and checksums move; <https://www.sqlite.org/walformat.html>, "the WAL-index header"). The
//! cache remembers the header it was filled under and empties itself as soon as the header
//! differs, so an answer from it is one a read of the database would have given at that moment.
//! Checking costs one 48-byte `pread` of a page the kernel holds in memory, far less than the query
//! it replaces (a read transaction, three index lookups; bench/results/tuning-notes.md).
//!
//! The header is read before the database: rows read afterwards are at least as new as that
//! header, so filing them under it can only make a later check discard them early, never serve
//! them late.
//!
//! Commits by this process's own request-path writer do not empty the cache: the writer tells
//! it which users each batch touched and their rows as its transaction left them
//! ([`RowCache::touch`]), and once the batch has committed the cache files those rows (drops the
//! user, for a call that was rolled back) and moves on to the new header ([`CommitWatch`]). That is exact
//! only if nothing else committed between the header the cache holds and the new one. The
//! writer reads the header right after `BEGIN IMMEDIATE` (it holds the write lock from then until
//! `COMMIT`, so nobody else can commit in between) and again after `COMMIT`; the header's change
//! counter (`iChange`, bumped once by every commit and by nothing else) must have moved by
//! exactly one — a commit by anyone else in between would have moved it again — and the cache
//! must still hold the first header. Otherwise the cache is left to the next reader, which sees
//! a header it does not hold and empties it.

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
    /// The writer is committing: a reader that sees a new header meanwhile treats it as a miss
    /// and leaves the cache for the writer to account for.
    committing: bool,
    /// Service → email → rows (nested so that a lookup borrows the strings it is given).
    rows: HashMap<String, HashMap<String, Arc<[UserRow]>>>,
    entries: usize,
}

/// The rows of recently seen users, valid while the WAL-index header is unchanged.
pub(crate) struct RowCache {
    shm: File,
    filled: Mutex<Filled>,
    /// Users the writer's current batch changes (service, email) and their rows after the
    /// change (`None`: unknown, drop the user).
    touched: Mutex<Vec<Touched>>,
    /// The writer's current batch may change any user's rows (node or schema changes).
    touched_all: std::sync::atomic::AtomicBool,
}

/// A user a writer batch changed, and the rows its call left (`None`: drop the user).
type Touched = (String, String, Option<Arc<[UserRow]>>);

/// The change counter of a WAL-index header (`iChange`, native byte order, bytes 8–11).
fn change_counter(header: &Header) -> u32 {
    u32::from_ne_bytes([header[8], header[9], header[10], header[11]])
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
                filled: Mutex::new(Filled {
                    header: [0; HEADER_BYTES],
                    committing: false,
                    rows: HashMap::new(),
                    entries: 0,
                }),
                touched: Mutex::new(Vec::new()),
                touched_all: std::sync::atomic::AtomicBool::new(false),
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
            if !filled.committing {
                filled.rows.clear();
                filled.entries = 0;
                filled.header = *header;
            }
            return None;
        }
        filled.rows.get(key.0)?.get(key.1).cloned()
    }

    /// Notes that the writer's current call changes `key`'s rows, which are `rows` once it
    /// commits (`None` when not known). Called on the writer thread, inside the batch.
    pub(crate) fn touch(&self, key: (&str, &str), rows: Option<Arc<[UserRow]>>) {
        self.touched.lock().push((key.0.to_string(), key.1.to_string(), rows));
    }

    /// Notes that the writer's current call may change any user's rows: once its batch commits,
    /// the cache starts empty under the new header.
    pub(crate) fn touch_all(&self) {
        self.touched_all.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// How many touches the current batch has noted.
    fn touches(&self) -> usize {
        self.touched.lock().len()
    }

    /// Forgets the rows of the touches from `from` on (their call was rolled back): those users
    /// are dropped instead.
    fn forget_rows_from(&self, from: usize) {
        for touched in self.touched.lock().iter_mut().skip(from) {
            touched.2 = None;
        }
    }

    /// The writer is about to commit its batch.
    fn committing(&self) {
        self.filled.lock().committing = true;
    }

    /// The writer's batch, begun under `before`, ended (`after`: the header read after a
    /// successful `COMMIT`). Files the touched users' rows (drops those without) and moves to
    /// `after` when the batch's commit is the only one in between; otherwise leaves the cache for
    /// the next reader to empty.
    fn batch_ended(&self, before: Option<Header>, after: Option<Header>) {
        let touched = std::mem::take(&mut *self.touched.lock());
        let all = self.touched_all.swap(false, std::sync::atomic::Ordering::Relaxed);
        let mut filled = self.filled.lock();
        filled.committing = false;
        let (Some(before), Some(after)) = (before, after) else { return };
        if all {
            // Rows read under `before` and filed later are refused by `put` (header moved on).
            filled.rows.clear();
            filled.entries = 0;
            filled.header = after;
            return;
        }
        if filled.header != before || before == after {
            // Either the cache is not at the batch's start (the next reader sorts it out), or
            // nothing was written.
            return;
        }
        if change_counter(&after) != change_counter(&before).wrapping_add(1) {
            return;
        }
        // In call order: a later call's rows (or drop) for the same user wins.
        for (service, email, rows) in touched {
            let removed = filled.rows.get_mut(&service).and_then(|emails| emails.remove(&email)).is_some();
            if removed {
                filled.entries -= 1;
            }
            if let Some(rows) = rows {
                if filled.entries < MAX_ENTRIES {
                    filled.rows.entry(service).or_default().insert(email, rows);
                    filled.entries += 1;
                }
            }
        }
        filled.header = after;
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

/// Keeps a [`RowCache`] in step with the request-path writer's batches (see the module
/// documentation).
pub(crate) struct CommitWatch {
    cache: Arc<RowCache>,
    before: Option<Header>,
    /// Touches noted before the current call started.
    call_from: usize,
}

impl CommitWatch {
    /// Watches the batches of the writer that calls [`RowCache::touch`] on `cache`.
    pub(crate) fn new(cache: Arc<RowCache>) -> Self {
        Self { cache, before: None, call_from: 0 }
    }
}

impl Drop for CommitWatch {
    /// A writer that stops (or unwinds) between `COMMIT` and its accounting must not leave the
    /// cache believing a commit is under way: readers would then never empty it.
    fn drop(&mut self) {
        self.cache.batch_ended(None, None);
    }
}

impl super::group::BatchObserver for CommitWatch {
    fn begun(&mut self) {
        self.before = self.cache.header();
    }

    fn call_started(&mut self) {
        self.call_from = self.cache.touches();
    }

    fn call_undone(&mut self) {
        self.cache.forget_rows_from(self.call_from);
    }

    fn committing(&mut self) {
        self.cache.committing();
    }

    fn ended(&mut self, committed: bool) {
        let after = if committed { self.cache.header() } else { None };
        self.cache.batch_ended(self.before.take(), after);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(uid: i64) -> UserRow {
        crate::test_row(uid)
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

    /// A writer batch on `db` through `watch`, touching `key`; `foreign` runs after `COMMIT`
    /// and before the watch hears of it.
    fn batch(writer: &rusqlite::Connection, watch: &mut CommitWatch, key: (&str, &str), foreign: impl FnOnce()) {
        use crate::sqlite::group::BatchObserver;
        writer.execute_batch("BEGIN IMMEDIATE").unwrap();
        watch.begun();
        watch.call_started();
        watch.cache.touch(key, None);
        writer.execute("UPDATE t SET v = v + 1", []).unwrap();
        watch.committing();
        writer.execute_batch("COMMIT").unwrap();
        foreign();
        watch.ended(true);
    }

    /// Adopts the current header and files one row (uid) per user under it.
    fn seed(cache: &RowCache, users: &[(&str, i64)]) -> Header {
        let header = cache.header().unwrap();
        assert!(cache.get(&header, ("s", "none")).is_none());
        for (email, uid) in users {
            cache.put(&header, ("s", email), Arc::from(vec![row(*uid)]));
        }
        header
    }

    fn real_db(name: &str) -> (Dir, std::path::PathBuf, rusqlite::Connection, Arc<RowCache>) {
        let (dir, _) = cache(name);
        let db = dir.path().join("real.db");
        let writer = rusqlite::Connection::open(&db).unwrap();
        writer.pragma_update(None, "journal_mode", "WAL").unwrap();
        writer
            .execute_batch("CREATE TABLE t (k INTEGER PRIMARY KEY, v INTEGER); INSERT INTO t (v) VALUES (0)")
            .unwrap();
        let cache = Arc::new(RowCache::open(&db).unwrap());
        (dir, db, writer, cache)
    }

    #[test]
    fn the_writers_own_commit_drops_only_the_users_it_touched() {
        let (_dir, _db, writer, cache) = real_db("own");
        let mut watch = CommitWatch::new(cache.clone());
        let h1 = seed(&cache, &[("a", 1), ("b", 2)]);
        batch(&writer, &mut watch, ("s", "a"), || {});
        let h2 = cache.header().unwrap();
        assert_ne!(h2, h1);
        assert!(cache.get(&h2, ("s", "a")).is_none(), "the touched user is read again");
        assert_eq!(cache.get(&h2, ("s", "b")).unwrap()[0].uid, 2, "the others stay");
        // Rows read before the batch and filed after it are dropped.
        cache.put(&h1, ("s", "a"), Arc::from(vec![row(1)]));
        assert!(cache.get(&h2, ("s", "a")).is_none());
    }

    #[test]
    fn a_commit_by_anyone_else_during_the_batch_empties_the_cache() {
        let (_dir, db, writer, cache) = real_db("foreign");
        let other = rusqlite::Connection::open(&db).unwrap();
        let mut watch = CommitWatch::new(cache.clone());
        seed(&cache, &[("b", 2)]);
        // Another connection commits between the writer's COMMIT and its look at the header.
        batch(&writer, &mut watch, ("s", "a"), || {
            other.execute("UPDATE t SET v = 100", []).unwrap();
        });
        let h3 = cache.header().unwrap();
        assert!(cache.get(&h3, ("s", "b")).is_none(), "user b may have changed: not served");
        // And a commit by someone else between two batches is never taken for the writer's.
        cache.put(&h3, ("s", "b"), Arc::from(vec![row(2)]));
        other.execute("UPDATE t SET v = 200", []).unwrap();
        batch(&writer, &mut watch, ("s", "a"), || {});
        assert!(cache.get(&cache.header().unwrap(), ("s", "b")).is_none());
    }

    #[test]
    fn a_reader_during_the_commit_leaves_the_cache_to_the_writer() {
        let (_dir, _db, writer, cache) = real_db("during");
        let mut watch = CommitWatch::new(cache.clone());
        seed(&cache, &[("b", 2)]);
        let reader = cache.clone();
        batch(&writer, &mut watch, ("s", "a"), || {
            // Between COMMIT and the writer's accounting: a miss, not an emptied cache.
            let now = reader.header().unwrap();
            assert!(reader.get(&now, ("s", "b")).is_none());
            reader.put(&now, ("s", "c"), Arc::from(vec![row(3)]));
        });
        let h2 = cache.header().unwrap();
        assert_eq!(cache.get(&h2, ("s", "b")).unwrap()[0].uid, 2);
        assert!(cache.get(&h2, ("s", "c")).is_none(), "nothing filed under a header the cache did not hold");
    }

    #[test]
    fn a_rolled_back_batch_leaves_the_cache_as_it_was() {
        use crate::sqlite::group::BatchObserver;
        let (_dir, _db, writer, cache) = real_db("rollback");
        let mut watch = CommitWatch::new(cache.clone());
        let h1 = seed(&cache, &[("a", 1)]);
        writer.execute_batch("BEGIN IMMEDIATE").unwrap();
        watch.begun();
        watch.call_started();
        cache.touch(("s", "a"), None);
        writer.execute("UPDATE t SET v = 7", []).unwrap();
        watch.committing();
        writer.execute_batch("ROLLBACK").unwrap();
        watch.ended(false);
        assert_eq!(cache.header().unwrap(), h1);
        assert_eq!(cache.get(&h1, ("s", "a")).unwrap()[0].uid, 1);
        assert!(cache.touched.lock().is_empty());
    }

    #[test]
    fn the_writers_rows_are_filed_unless_their_call_was_rolled_back() {
        use crate::sqlite::group::BatchObserver;
        let (_dir, _db, writer, cache) = real_db("filed");
        let mut watch = CommitWatch::new(cache.clone());
        seed(&cache, &[("b", 2), ("c", 3)]);
        writer.execute_batch("BEGIN IMMEDIATE").unwrap();
        watch.begun();
        // Call 1 changes a (kept); call 2 changes b and c, then is rolled back; call 3 changes c
        // again (kept).
        watch.call_started();
        cache.touch(("s", "a"), Some(Arc::from(vec![row(10)])));
        watch.call_started();
        cache.touch(("s", "b"), Some(Arc::from(vec![row(20)])));
        cache.touch(("s", "c"), Some(Arc::from(vec![row(30)])));
        watch.call_undone();
        watch.call_started();
        cache.touch(("s", "c"), Some(Arc::from(vec![row(31)])));
        writer.execute("UPDATE t SET v = v + 1", []).unwrap();
        watch.committing();
        writer.execute_batch("COMMIT").unwrap();
        watch.ended(true);
        let h2 = cache.header().unwrap();
        assert_eq!(cache.get(&h2, ("s", "a")).unwrap()[0].uid, 10);
        assert!(cache.get(&h2, ("s", "b")).is_none(), "a rolled-back call's rows are not filed");
        assert_eq!(cache.get(&h2, ("s", "c")).unwrap()[0].uid, 31, "the last call wins");
    }

    #[test]
    fn a_batch_that_may_change_every_user_empties_the_cache() {
        let (_dir, _db, writer, cache) = real_db("all");
        let mut watch = CommitWatch::new(cache.clone());
        let h1 = seed(&cache, &[("a", 1), ("b", 2)]);
        batch(&writer, &mut watch, ("s", "a"), || {});
        let h2 = cache.header().unwrap();
        assert_eq!(cache.get(&h2, ("s", "b")).unwrap()[0].uid, 2);
        cache.touch_all();
        batch(&writer, &mut watch, ("s", "a"), || {});
        let h3 = cache.header().unwrap();
        assert!(cache.get(&h3, ("s", "b")).is_none(), "b's rows may have changed");
        // Rows read before the batch are not filed under the new header.
        cache.put(&h1, ("s", "b"), Arc::from(vec![row(2)]));
        cache.put(&h2, ("s", "b"), Arc::from(vec![row(2)]));
        assert!(cache.get(&h3, ("s", "b")).is_none());
        assert!(!cache.touched_all.load(std::sync::atomic::Ordering::Relaxed), "one batch only");
    }

    #[test]
    fn a_writer_gone_mid_commit_leaves_the_cache_to_its_readers() {
        use crate::sqlite::group::BatchObserver;
        let (_dir, _db, writer, cache) = real_db("gone");
        let mut watch = CommitWatch::new(cache.clone());
        seed(&cache, &[("b", 2)]);
        writer.execute_batch("BEGIN IMMEDIATE").unwrap();
        watch.begun();
        writer.execute("UPDATE t SET v = 9", []).unwrap();
        watch.committing();
        writer.execute_batch("COMMIT").unwrap();
        drop(watch);
        let now = cache.header().unwrap();
        assert!(cache.get(&now, ("s", "b")).is_none());
        assert!(!cache.filled.lock().committing);
        assert_eq!(cache.filled.lock().header, now, "the reader adopted the new header");
    }
}
