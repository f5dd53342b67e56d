//! Caches for the request path that are exact across processes: users' rows (Sync) and
//! access tokens, each a [`WalCache`].
//!
//! Every commit to a WAL-mode database, by any connection of any process, rewrites the
//! WAL-index header at the start of the database's `-shm` file (its change counter, frame count
//! and checksums move; <https://www.sqlite.org/walformat.html>, "the WAL-index header"). A
//! cache remembers the header it was filled under and empties itself as soon as the header
//! differs, so an answer from it is one a read of the database would have given at that moment.
//! Checking costs one 48-byte `pread` of a page the kernel holds in memory ([`WalIndex`]), far
//! less than the query it replaces (a read transaction, its locks and an index descent;
//! bench/results/tuning-notes.md, bench/results/access-sqlite.md).
//!
//! The header is read before the database: entries read afterwards are at least as new as that
//! header, so filing them under it can only make a later check discard them early, never serve
//! them late.
//!
//! Commits by this process's own writer do not empty the caches: the writer tells each cache
//! which keys each batch touched and their values as its transaction left them
//! ([`WalCache::touch`]), and once the batch has committed the cache files those values (drops
//! the key, for a call that was rolled back) and moves on to the new header ([`CommitWatch`]).
//! That is exact only if nothing else committed between the header the cache holds and the new
//! one. The writer reads the header right after `BEGIN IMMEDIATE` (it holds the write lock from
//! then until `COMMIT`, so nobody else can commit in between) and again after `COMMIT`; the
//! header's change counter (`iChange`, bumped once by every commit and by nothing else) must have
//! moved by exactly one — a commit by anyone else in between would have moved it again — and the
//! cache must still hold the first header. Otherwise the cache is left to the next reader, which
//! sees a header it does not hold and empties it.

use foldhash::{HashMap, HashMapExt};
use std::borrow::Borrow;
use std::fs::File;
use std::hash::Hash;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokenserver_core::access::Grant;
use tokenserver_core::sync::users::UserRow;

/// Bytes of the WAL-index header compared (its first copy).
const HEADER_BYTES: usize = 48;
/// Keys a cache keeps; it starts over when full (it refills at the read rate).
const MAX_ENTRIES: usize = 100_000;

/// A WAL-index header as read (all zero before the first commit).
pub(crate) type Header = [u8; HEADER_BYTES];

/// Users' rows by (service, email).
pub(crate) type RowCache = WalCache<String, Arc<[UserRow]>>;
/// Access tokens by (service, SHA-256 of the token): what they grant and when they were created.
pub(crate) type TokenCache = WalCache<[u8; 32], Arc<(Grant, u64)>>;

/// The change counter of a WAL-index header (`iChange`, native byte order, bytes 8–11).
fn change_counter(header: &Header) -> u32 {
    u32::from_ne_bytes([header[8], header[9], header[10], header[11]])
}

/// The `-shm` file of a WAL-mode database, whose header says whether anything has committed.
pub(crate) struct WalIndex {
    shm: File,
}

impl WalIndex {
    /// The index of the WAL-mode database at `db` (which must be open in WAL mode, so that the
    /// file exists). `None` when it cannot be opened: reads then always query.
    pub(crate) fn open(db: &Path) -> Option<Self> {
        let mut shm = db.as_os_str().to_owned();
        shm.push("-shm");
        match File::open(&shm) {
            Ok(shm) => Some(Self { shm }),
            Err(err) => {
                tracing::warn!(error = %err, "no WAL index to watch: the request-path caches are off");
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
}

struct Filled<K, V> {
    header: Header,
    /// The writer is committing: a reader that sees a new header meanwhile treats it as a miss
    /// and leaves the cache for the writer to account for.
    committing: bool,
    /// Service → key → value (nested so that a lookup borrows the service it is given).
    values: HashMap<String, HashMap<K, V>>,
    entries: usize,
}

impl<K, V> Filled<K, V> {
    fn clear(&mut self, header: Header) {
        self.values.clear();
        self.entries = 0;
        self.header = header;
    }
}

/// A key the writer's current batch changes, and its value once the call commits (`None`:
/// unknown, drop the key).
type Touched<K, V> = (String, K, Option<V>);

/// Values read from the database, valid while the WAL-index header is unchanged.
pub(crate) struct WalCache<K, V> {
    index: Arc<WalIndex>,
    filled: Mutex<Filled<K, V>>,
    /// Keys the writer's current batch changes and their values after the change.
    touched: Mutex<Vec<Touched<K, V>>>,
    /// The writer's current batch may change any key's value.
    touched_all: AtomicBool,
}

impl<K, V> std::fmt::Debug for WalCache<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalCache").finish_non_exhaustive()
    }
}

impl<K: Eq + Hash + Send, V: Clone + Send> WalCache<K, V> {
    /// An empty cache checked against `index`.
    pub(crate) fn new(index: Arc<WalIndex>) -> Self {
        Self {
            index,
            filled: Mutex::new(Filled {
                header: [0; HEADER_BYTES],
                committing: false,
                values: HashMap::new(),
                entries: 0,
            }),
            touched: Mutex::new(Vec::new()),
            touched_all: AtomicBool::new(false),
        }
    }

    /// The header now; `None` if it could not be read (treated as a change).
    pub(crate) fn header(&self) -> Option<Header> {
        self.index.header()
    }

    /// The value cached for `key` of `service` under `header`, emptying the cache if it was
    /// filled under another header.
    pub(crate) fn get<Q>(&self, header: &Header, service: &str, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        let mut filled = self.filled.lock();
        if filled.header != *header {
            if !filled.committing {
                filled.clear(*header);
            }
            return None;
        }
        filled.values.get(service)?.get(key).cloned()
    }

    /// Files `value`, read after `header` was, under it (dropped if the header moved on since).
    pub(crate) fn put(&self, header: &Header, service: &str, key: K, value: V) {
        let mut filled = self.filled.lock();
        if filled.header != *header {
            return;
        }
        if filled.entries >= MAX_ENTRIES {
            filled.clear(*header);
        }
        let keys = match filled.values.get_mut(service) {
            Some(keys) => keys,
            None => filled.values.entry(service.to_string()).or_default(),
        };
        if keys.insert(key, value).is_none() {
            filled.entries += 1;
        }
    }

    /// Notes that the writer's current call changes `key` of `service`, whose value is `value`
    /// once it commits (`None`: gone, or not known). Called by the writer, inside the batch.
    pub(crate) fn touch(&self, service: &str, key: K, value: Option<V>) {
        self.touched.lock().push((service.to_string(), key, value));
    }

    /// Notes that the writer's current call may change any key: once its batch commits, the
    /// cache starts empty under the new header.
    pub(crate) fn touch_all(&self) {
        self.touched_all.store(true, Ordering::Relaxed);
    }
}

/// What the [`CommitWatch`] needs of a cache, whatever it holds.
pub(crate) trait Watched: Send + Sync {
    /// How many touches the current batch has noted.
    fn touches(&self) -> usize;
    /// Forgets the values of the touches from `from` on (their call was rolled back): those
    /// keys are dropped instead.
    fn forget_values_from(&self, from: usize);
    /// The writer is about to commit its batch.
    fn committing(&self);
    /// The writer's batch, begun under `before`, ended (`after`: the header read after a
    /// successful `COMMIT`). Files the touched keys' values (drops those without) and moves to
    /// `after` when the batch's commit is the only one in between; otherwise leaves the cache for
    /// the next reader to empty.
    fn batch_ended(&self, before: Option<Header>, after: Option<Header>);
}

impl<K: Eq + Hash + Send, V: Clone + Send> Watched for WalCache<K, V> {
    fn touches(&self) -> usize {
        self.touched.lock().len()
    }

    fn forget_values_from(&self, from: usize) {
        for touched in self.touched.lock().iter_mut().skip(from) {
            touched.2 = None;
        }
    }

    fn committing(&self) {
        self.filled.lock().committing = true;
    }

    fn batch_ended(&self, before: Option<Header>, after: Option<Header>) {
        let touched = std::mem::take(&mut *self.touched.lock());
        let all = self.touched_all.swap(false, Ordering::Relaxed);
        let mut filled = self.filled.lock();
        filled.committing = false;
        let (Some(before), Some(after)) = (before, after) else { return };
        if all {
            // Values read under `before` and filed later are refused by `put` (header moved on).
            filled.clear(after);
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
        // In call order: a later call's value (or drop) for the same key wins.
        for (service, key, value) in touched {
            let removed = filled.values.get_mut(&service).and_then(|keys| keys.remove(&key)).is_some();
            if removed {
                filled.entries -= 1;
            }
            if let Some(value) = value {
                if filled.entries < MAX_ENTRIES {
                    filled.values.entry(service).or_default().insert(key, value);
                    filled.entries += 1;
                }
            }
        }
        filled.header = after;
    }
}

/// Keeps the [`WalCache`]s of one database in step with its writer's batches (see the module
/// documentation).
pub(crate) struct CommitWatch {
    index: Arc<WalIndex>,
    caches: Vec<Arc<dyn Watched>>,
    before: Option<Header>,
    /// Each cache's touches noted before the current call started.
    call_from: Vec<usize>,
}

impl CommitWatch {
    /// Watches the batches of the writer that calls [`WalCache::touch`] on `caches`, all of
    /// them checked against `index`.
    pub(crate) fn new(index: Arc<WalIndex>, caches: Vec<Arc<dyn Watched>>) -> Self {
        let call_from = vec![0; caches.len()];
        Self { index, caches, before: None, call_from }
    }
}

impl Drop for CommitWatch {
    /// A writer that stops (or unwinds) between `COMMIT` and its accounting must not leave a
    /// cache believing a commit is under way: readers would then never empty it.
    fn drop(&mut self) {
        for cache in &self.caches {
            cache.batch_ended(None, None);
        }
    }
}

impl super::group::BatchObserver for CommitWatch {
    fn begun(&mut self) {
        self.before = self.index.header();
    }

    fn call_started(&mut self) {
        for (from, cache) in self.call_from.iter_mut().zip(&self.caches) {
            *from = cache.touches();
        }
    }

    fn call_undone(&mut self) {
        for (from, cache) in self.call_from.iter().zip(&self.caches) {
            cache.forget_values_from(*from);
        }
    }

    fn committing(&mut self) {
        for cache in &self.caches {
            cache.committing();
        }
    }

    fn ended(&mut self, committed: bool) {
        let after = if committed { self.index.header() } else { None };
        let before = self.before.take();
        for cache in &self.caches {
            cache.batch_ended(before, after);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(uid: i64) -> UserRow {
        crate::test_row(uid)
    }

    use crate::sqlite::tests::Dir;

    fn open_rows(db: &Path) -> Option<RowCache> {
        WalIndex::open(db).map(|index| RowCache::new(Arc::new(index)))
    }

    fn cache(name: &str) -> (Dir, RowCache) {
        let dir = Dir::new(&format!("row-cache-{name}"));
        std::fs::write(dir.path().join("t.db-shm"), [0u8; 64]).unwrap();
        let cache = open_rows(&dir.path().join("t.db")).unwrap();
        (dir, cache)
    }

    #[test]
    fn rows_are_served_only_under_the_header_they_were_read_after() {
        let (_dir, cache) = cache("serve");
        let h1 = [1u8; HEADER_BYTES];
        let h2 = [2u8; HEADER_BYTES];
        assert!(cache.get(&h1, "s", "a").is_none());
        cache.put(&h1, "s", "a".to_string(), Arc::from(vec![row(7)]));
        assert_eq!(cache.get(&h1, "s", "a").unwrap()[0].uid, 7);
        assert!(cache.get(&h1, "s", "b").is_none());
        assert!(cache.get(&h1, "t", "a").is_none());
        // A commit anywhere: everything goes.
        assert!(cache.get(&h2, "s", "a").is_none());
        // Rows read after h1 but filed once h2 is current are dropped.
        cache.put(&h1, "s", "b".to_string(), Arc::from(vec![row(9)]));
        assert!(cache.get(&h2, "s", "b").is_none());
        cache.put(&h2, "s", "a".to_string(), Arc::from(vec![row(8)]));
        assert_eq!(cache.get(&h2, "s", "a").unwrap()[0].uid, 8);
    }

    #[test]
    fn the_header_is_read_from_the_shm_file() {
        let (dir, cache) = cache("header");
        assert_eq!(cache.header(), Some([0u8; HEADER_BYTES]));
        let mut bytes = [0u8; 64];
        bytes[8] = 5;
        std::fs::write(dir.path().join("t.db-shm"), bytes).unwrap();
        assert_eq!(cache.header().unwrap()[8], 5);
        assert!(open_rows(&dir.path().join("missing.db")).is_none());
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
        let cache = open_rows(&db).unwrap();
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

    /// A writer batch on `db` through `watch` whose one call runs `touch`; `foreign` runs after
    /// `COMMIT` and before the watch hears of it.
    fn batch(writer: &rusqlite::Connection, watch: &mut CommitWatch, touch: impl FnOnce(), foreign: impl FnOnce()) {
        use crate::sqlite::group::BatchObserver;
        writer.execute_batch("BEGIN IMMEDIATE").unwrap();
        watch.begun();
        watch.call_started();
        touch();
        writer.execute("UPDATE t SET v = v + 1", []).unwrap();
        watch.committing();
        writer.execute_batch("COMMIT").unwrap();
        foreign();
        watch.ended(true);
    }

    /// Adopts the current header and files one row (uid) per user under it.
    fn seed(cache: &RowCache, users: &[(&str, i64)]) -> Header {
        let header = cache.header().unwrap();
        assert!(cache.get(&header, "s", "none").is_none());
        for (email, uid) in users {
            cache.put(&header, "s", email.to_string(), Arc::from(vec![row(*uid)]));
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
        let cache = Arc::new(open_rows(&db).unwrap());
        (dir, db, writer, cache)
    }

    #[test]
    fn the_writers_own_commit_drops_only_the_users_it_touched() {
        let (_dir, _db, writer, cache) = real_db("own");
        let mut watch = CommitWatch::new(cache.index.clone(), vec![cache.clone()]);
        let h1 = seed(&cache, &[("a", 1), ("b", 2)]);
        batch(&writer, &mut watch, || cache.touch("s", "a".to_string(), None), || {});
        let h2 = cache.header().unwrap();
        assert_ne!(h2, h1);
        assert!(cache.get(&h2, "s", "a").is_none(), "the touched user is read again");
        assert_eq!(cache.get(&h2, "s", "b").unwrap()[0].uid, 2, "the others stay");
        // Rows read before the batch and filed after it are dropped.
        cache.put(&h1, "s", "a".to_string(), Arc::from(vec![row(1)]));
        assert!(cache.get(&h2, "s", "a").is_none());
    }

    #[test]
    fn a_commit_by_anyone_else_during_the_batch_empties_the_cache() {
        let (_dir, db, writer, cache) = real_db("foreign");
        let other = rusqlite::Connection::open(&db).unwrap();
        let mut watch = CommitWatch::new(cache.index.clone(), vec![cache.clone()]);
        seed(&cache, &[("b", 2)]);
        // Another connection commits between the writer's COMMIT and its look at the header.
        batch(
            &writer,
            &mut watch,
            || cache.touch("s", "a".to_string(), None),
            || {
                other.execute("UPDATE t SET v = 100", []).unwrap();
            },
        );
        let h3 = cache.header().unwrap();
        assert!(cache.get(&h3, "s", "b").is_none(), "user b may have changed: not served");
        // And a commit by someone else between two batches is never taken for the writer's.
        cache.put(&h3, "s", "b".to_string(), Arc::from(vec![row(2)]));
        other.execute("UPDATE t SET v = 200", []).unwrap();
        batch(&writer, &mut watch, || cache.touch("s", "a".to_string(), None), || {});
        assert!(cache.get(&cache.header().unwrap(), "s", "b").is_none());
    }

    #[test]
    fn a_reader_during_the_commit_leaves_the_cache_to_the_writer() {
        let (_dir, _db, writer, cache) = real_db("during");
        let mut watch = CommitWatch::new(cache.index.clone(), vec![cache.clone()]);
        seed(&cache, &[("b", 2)]);
        let reader = cache.clone();
        batch(
            &writer,
            &mut watch,
            || cache.touch("s", "a".to_string(), None),
            || {
                // Between COMMIT and the writer's accounting: a miss, not an emptied cache.
                let now = reader.header().unwrap();
                assert!(reader.get(&now, "s", "b").is_none());
                reader.put(&now, "s", "c".to_string(), Arc::from(vec![row(3)]));
            },
        );
        let h2 = cache.header().unwrap();
        assert_eq!(cache.get(&h2, "s", "b").unwrap()[0].uid, 2);
        assert!(cache.get(&h2, "s", "c").is_none(), "nothing filed under a header the cache did not hold");
    }

    #[test]
    fn a_rolled_back_batch_leaves_the_cache_as_it_was() {
        use crate::sqlite::group::BatchObserver;
        let (_dir, _db, writer, cache) = real_db("rollback");
        let mut watch = CommitWatch::new(cache.index.clone(), vec![cache.clone()]);
        let h1 = seed(&cache, &[("a", 1)]);
        writer.execute_batch("BEGIN IMMEDIATE").unwrap();
        watch.begun();
        watch.call_started();
        cache.touch("s", "a".to_string(), None);
        writer.execute("UPDATE t SET v = 7", []).unwrap();
        watch.committing();
        writer.execute_batch("ROLLBACK").unwrap();
        watch.ended(false);
        assert_eq!(cache.header().unwrap(), h1);
        assert_eq!(cache.get(&h1, "s", "a").unwrap()[0].uid, 1);
        assert!(cache.touched.lock().is_empty());
    }

    #[test]
    fn the_writers_rows_are_filed_unless_their_call_was_rolled_back() {
        use crate::sqlite::group::BatchObserver;
        let (_dir, _db, writer, cache) = real_db("filed");
        let mut watch = CommitWatch::new(cache.index.clone(), vec![cache.clone()]);
        seed(&cache, &[("b", 2), ("c", 3)]);
        writer.execute_batch("BEGIN IMMEDIATE").unwrap();
        watch.begun();
        // Call 1 changes a (kept); call 2 changes b and c, then is rolled back; call 3 changes c
        // again (kept).
        watch.call_started();
        cache.touch("s", "a".to_string(), Some(Arc::from(vec![row(10)])));
        watch.call_started();
        cache.touch("s", "b".to_string(), Some(Arc::from(vec![row(20)])));
        cache.touch("s", "c".to_string(), Some(Arc::from(vec![row(30)])));
        watch.call_undone();
        watch.call_started();
        cache.touch("s", "c".to_string(), Some(Arc::from(vec![row(31)])));
        writer.execute("UPDATE t SET v = v + 1", []).unwrap();
        watch.committing();
        writer.execute_batch("COMMIT").unwrap();
        watch.ended(true);
        let h2 = cache.header().unwrap();
        assert_eq!(cache.get(&h2, "s", "a").unwrap()[0].uid, 10);
        assert!(cache.get(&h2, "s", "b").is_none(), "a rolled-back call's rows are not filed");
        assert_eq!(cache.get(&h2, "s", "c").unwrap()[0].uid, 31, "the last call wins");
    }

    #[test]
    fn a_batch_that_may_change_every_user_empties_the_cache() {
        let (_dir, _db, writer, cache) = real_db("all");
        let mut watch = CommitWatch::new(cache.index.clone(), vec![cache.clone()]);
        let h1 = seed(&cache, &[("a", 1), ("b", 2)]);
        batch(&writer, &mut watch, || cache.touch("s", "a".to_string(), None), || {});
        let h2 = cache.header().unwrap();
        assert_eq!(cache.get(&h2, "s", "b").unwrap()[0].uid, 2);
        cache.touch_all();
        batch(&writer, &mut watch, || cache.touch("s", "a".to_string(), None), || {});
        let h3 = cache.header().unwrap();
        assert!(cache.get(&h3, "s", "b").is_none(), "b's rows may have changed");
        // Rows read before the batch are not filed under the new header.
        cache.put(&h1, "s", "b".to_string(), Arc::from(vec![row(2)]));
        cache.put(&h2, "s", "b".to_string(), Arc::from(vec![row(2)]));
        assert!(cache.get(&h3, "s", "b").is_none());
        assert!(!cache.touched_all.load(std::sync::atomic::Ordering::Relaxed), "one batch only");
    }

    #[test]
    fn a_writer_gone_mid_commit_leaves_the_cache_to_its_readers() {
        use crate::sqlite::group::BatchObserver;
        let (_dir, _db, writer, cache) = real_db("gone");
        let mut watch = CommitWatch::new(cache.index.clone(), vec![cache.clone()]);
        seed(&cache, &[("b", 2)]);
        writer.execute_batch("BEGIN IMMEDIATE").unwrap();
        watch.begun();
        writer.execute("UPDATE t SET v = 9", []).unwrap();
        watch.committing();
        writer.execute_batch("COMMIT").unwrap();
        drop(watch);
        let now = cache.header().unwrap();
        assert!(cache.get(&now, "s", "b").is_none());
        assert!(!cache.filled.lock().committing);
        assert_eq!(cache.filled.lock().header, now, "the reader adopted the new header");
    }
}
