//! Group commit for SQLite writes: one thread owns the write connection and runs the calls
//! queued for it in batches — each call inside its own savepoint, one `COMMIT` per batch, and
//! only then the answers. Under load one commit (one WAL append) carries many calls; alone, a
//! call commits at once. A call that fails, or whose caller gave up meanwhile, is rolled back to
//! its savepoint without touching the others. Under load, with few calls queued, the writer
//! waits a little ([`GATHER`] at most) for more before it begins a batch, so that a commit
//! carries several calls rather than one.
//!
//! Checkpoints (copying the WAL back into the database, with an fsync) run on a second
//! connection on a thread of their own, so the writer does not stop for them; the writer only
//! finishes one now and then so that the log can start over (see [`WAL_RESTART_FRAMES`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::caller::Waiting;
use crate::StoreError;

// The measurements behind these values: bench/results/tuning-notes.md.

/// Most calls committed together when a commit waits for no fsync (`synchronous = NORMAL`, the
/// default). Capped so that under load two or more batches are on their way at once: the writer
/// runs one while the callers of the last get their answers and send their next calls. Uncapped,
/// one batch held most of the waiting requests and the rest of the pipeline idled meanwhile.
const MAX_BATCH: usize = 32;
/// Most calls committed together when each commit is fsynced (`synchronous = FULL`): there a
/// larger batch shares one fsync, which on a slow disk is worth more than the overlap.
const MAX_BATCH_SYNCED: usize = 512;
/// Page cache of the writer, KiB (negative `cache_size`). Larger is not better: SQLite walks the
/// whole cache's hash table at the end of a write transaction that grew the file.
const CACHE_KIB: i64 = 8_192;
/// How often the checkpointer looks at the WAL.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);
/// WAL frames (pages) past which the writer finishes a checkpoint itself. Under a steady stream
/// of commits the background checkpoints never catch the last frame, and SQLite only restarts
/// the log from its beginning once every frame is back in the database: without this the WAL
/// would grow for as long as the load lasts.
const WAL_RESTART_FRAMES: i64 = 16_384;

/// A batch that starts within this long of the previous one's end counts as under load.
const BUSY_GAP: Duration = Duration::from_millis(1);
/// Under load, the longest the writer waits for more calls before it begins a batch: a commit
/// costs several WAL pages whether it carries one call or twenty. An idle writer never waits.
const GATHER: Duration = Duration::from_millis(1);
/// How often the writer looks at its queue while it gathers.
const GATHER_STEP: Duration = Duration::from_micros(100);
/// The wait ends as soon as this many calls are queued: a batch that size is large enough, and
/// waiting longer only idles the writer.
const GATHER_BELOW: usize = 16;
// A cap below the threshold would make every batch under load wait the whole `GATHER`.
const _: () = assert!(GATHER_BELOW <= MAX_BATCH);

/// Told about each batch's transaction, on the writer thread.
pub(crate) trait BatchObserver: Send {
    /// The batch's transaction has begun: the write lock is held.
    fn begun(&mut self);
    /// A call is about to run in the batch.
    fn call_started(&mut self);
    /// The call that last started was rolled back to its savepoint.
    fn call_undone(&mut self);
    /// `COMMIT` is about to run.
    fn committing(&mut self);
    /// The batch ended: committed, or rolled back (`false`).
    fn ended(&mut self, committed: bool);
}

/// Hands a finished call its answer once the batch's commit outcome is known.
type Deliver = Box<dyn FnOnce(Option<StoreError>) + Send>;
/// What a queued call does: runs on the writer's connection (`None`: the transaction could not
/// start), says whether it must be rolled back, and how to answer.
type Run = Box<dyn FnOnce(Option<&mut Connection>) -> (bool, Deliver) + Send>;

/// A queued call.
struct Job {
    /// Whether the call runs inside a savepoint of its own (see [`GroupWriter::call_atomic`]).
    savepoint: bool,
    run: Run,
}

/// The queue of a group-commit writer thread (cheap to clone).
#[derive(Debug, Clone)]
pub(crate) struct GroupWriter {
    jobs: mpsc::Sender<Job>,
}

/// Runs one of the writer's transaction-control statements (prepared once).
fn control(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

fn checkpoint(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(1))
}

/// Checkpoints every [`CHECKPOINT_EVERY`] until the writer stops (a passive checkpoint never
/// blocks the writer); asks the writer to finish one when the log has grown long.
fn checkpoint_loop(conn: Connection, stop: mpsc::Receiver<()>, wal_full: Arc<AtomicBool>) {
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY) {
        match checkpoint(&conn) {
            Ok(frames) if frames > WAL_RESTART_FRAMES => wal_full.store(true, Ordering::Relaxed),
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "SQLite checkpoint failed"),
        }
    }
}

/// The most calls one commit of `conn` carries: [`MAX_BATCH_SYNCED`] if its commits are fsynced
/// (`synchronous` FULL or EXTRA), else [`MAX_BATCH`].
fn max_batch(conn: &Connection) -> usize {
    match conn.pragma_query_value(None, "synchronous", |r| r.get::<_, i64>(0)) {
        Ok(level) if level >= 2 => MAX_BATCH_SYNCED,
        _ => MAX_BATCH,
    }
}

/// Moves the calls already queued into `batch`, up to `max`.
fn take_waiting(jobs: &mpsc::Receiver<Job>, batch: &mut Vec<Job>, max: usize) {
    while batch.len() < max {
        match jobs.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
}

/// Waits, in steps of [`GATHER_STEP`], until [`GATHER_BELOW`] calls are in `batch` or
/// [`GATHER`] has passed. Sleeping rather than blocking on the queue keeps senders from waking
/// the writer once per call.
fn gather(jobs: &mpsc::Receiver<Job>, batch: &mut Vec<Job>, max: usize) {
    let started = std::time::Instant::now();
    while batch.len() < GATHER_BELOW && started.elapsed() < GATHER {
        std::thread::sleep(GATHER_STEP);
        take_waiting(jobs, batch, max);
    }
}

fn writer_loop(
    name: &str,
    mut conn: Connection,
    jobs: mpsc::Receiver<Job>,
    wal_full: &AtomicBool,
    mut observer: Option<Box<dyn BatchObserver>>,
) {
    let batch_calls = metrics::histogram!("tokenserver_sqlite_batch_calls", "writer" => name.to_owned());
    let batch_seconds = metrics::histogram!("tokenserver_sqlite_batch_seconds", "writer" => name.to_owned());
    let restart_seconds =
        metrics::histogram!("tokenserver_sqlite_restart_checkpoint_seconds", "writer" => name.to_owned());
    let max = max_batch(&conn);
    let mut last_end = None;
    while let Ok(first) = jobs.recv() {
        if wal_full.swap(false, Ordering::Relaxed) {
            // No write is under way, so this completes (the background checkpoints did most of
            // the copying) and the next transaction starts the log afresh.
            let started = std::time::Instant::now();
            if let Err(err) = checkpoint(&conn) {
                tracing::warn!(error = %err, "SQLite checkpoint failed");
            }
            restart_seconds.record(started.elapsed().as_secs_f64());
        }
        let mut batch = vec![first];
        take_waiting(&jobs, &mut batch, max);
        // Under load (the last batch ended moments ago) and with few calls waiting, wait briefly
        // for more: a commit costs several WAL pages whether it carries one call or twenty.
        if batch.len() < GATHER_BELOW && last_end.is_some_and(|t: std::time::Instant| t.elapsed() < BUSY_GAP) {
            gather(&jobs, &mut batch, max);
        }
        let started = std::time::Instant::now();
        if let Err(err) = control(&conn, "BEGIN IMMEDIATE") {
            let msg = err.to_string();
            for job in batch {
                let (_, deliver) = (job.run)(None);
                deliver(Some(StoreError::Unavailable(msg.clone())));
            }
            let _ = conn.execute_batch("ROLLBACK");
            continue;
        }
        if let Some(o) = observer.as_mut() {
            o.begun();
        }
        batch_calls.record(batch.len() as f64);
        let mut answers = Vec::with_capacity(batch.len());
        for job in batch {
            let ok = job.savepoint && control(&conn, "SAVEPOINT call").is_ok();
            if let Some(o) = observer.as_mut() {
                o.call_started();
            }
            let (undo, deliver) = (job.run)(Some(&mut conn));
            if ok {
                if undo {
                    let _ = control(&conn, "ROLLBACK TO call");
                    if let Some(o) = observer.as_mut() {
                        o.call_undone();
                    }
                }
                let _ = control(&conn, "RELEASE call");
            }
            answers.push(deliver);
        }
        if let Some(o) = observer.as_mut() {
            o.committing();
        }
        let commit = control(&conn, "COMMIT").err().map(|err| err.to_string());
        if commit.is_some() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        if let Some(o) = observer.as_mut() {
            o.ended(commit.is_none());
        }
        batch_seconds.record(started.elapsed().as_secs_f64());
        last_end = Some(std::time::Instant::now());
        for deliver in answers {
            deliver(commit.as_ref().map(|m| StoreError::Unavailable(m.clone())));
        }
    }
}

impl GroupWriter {
    /// Starts the writer thread `name` on `conn`; for a database file (`checkpoints`: a second
    /// connection to it) also the checkpointer, and turns off `conn`'s own automatic checkpoints.
    /// `observer`, if any, hears of each batch's transaction.
    pub(crate) fn start(
        name: &str,
        conn: Connection,
        checkpoints: Option<Connection>,
        observer: Option<Box<dyn BatchObserver>>,
    ) -> Result<Self, StoreError> {
        let spawn_err = |err: std::io::Error| StoreError::Backend(format!("cannot start the {name} thread: {err}"));
        conn.pragma_update(None, "cache_size", -CACHE_KIB).map_err(super::rusqlite_error)?;
        // Savepoint journals stay in memory.
        conn.pragma_update(None, "temp_store", "MEMORY").map_err(super::rusqlite_error)?;
        let (tx, rx) = mpsc::channel::<Job>();
        // The checkpointer stops when the writer does (its `stop` sender is dropped).
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let wal_full = Arc::new(AtomicBool::new(false));
        if let Some(cp) = checkpoints {
            conn.pragma_update(None, "wal_autocheckpoint", 0).map_err(super::rusqlite_error)?;
            // The WAL file is cut back after each restart so that a burst does not leave it large.
            conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024).map_err(super::rusqlite_error)?;
            let wal_full = wal_full.clone();
            std::thread::Builder::new()
                .name(format!("{name}-checkpoint"))
                .spawn(move || checkpoint_loop(cp, stop_rx, wal_full))
                .map_err(spawn_err)?;
        }
        let thread_name = name.to_owned();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                writer_loop(&thread_name, conn, rx, &wal_full, observer);
                drop(stop_tx);
            })
            .map_err(spawn_err)?;
        Ok(Self { jobs: tx })
    }

    /// Runs `f` on the writer inside the next batch's transaction, in a savepoint of its own. Its
    /// changes are kept if it succeeds and its caller is still waiting at that point; the answer
    /// comes after `COMMIT`.
    pub(crate) async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.queue(true, f).await
    }

    /// [`Self::call`] for a call whose changes are atomic by themselves: one statement, or
    /// statements each of which runs only when those before it changed nothing, so that a call
    /// that fails has changed nothing. It runs without a savepoint (two statements and a copy of
    /// each page it changes less: bench/results/access-sqlite.md). It is skipped if its caller
    /// has gone before it runs; a caller gone once it has run keeps its change, as a client whose
    /// answer is lost on the way back does.
    pub(crate) async fn call_atomic<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.queue(false, f).await
    }

    async fn queue<T: Send + 'static>(
        &self,
        savepoint: bool,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        // The job runs on the writer thread whatever becomes of this future (see `crate::caller`).
        let (waiting, caller) = Waiting::start();
        let run: Run = Box::new(move |conn| {
            let out = match conn {
                _ if caller.gone() => Err(StoreError::Abandoned),
                Some(conn) => f(conn),
                None => Err(StoreError::Unavailable("the transaction could not start".into())),
            };
            let undo = savepoint && (out.is_err() || caller.gone());
            let deliver: Deliver = Box::new(move |commit_error| {
                let _ = tx.send(match commit_error {
                    Some(err) => Err(err),
                    None => out,
                });
            });
            (undo, deliver)
        });
        let job = Job { savepoint, run };
        self.jobs.send(job).map_err(|_| StoreError::Unavailable("the SQLite writer stopped".into()))?;
        let out = rx.await.map_err(|_| StoreError::Unavailable("the SQLite writer stopped".into()))?;
        drop(waiting);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer() -> GroupWriter {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (k INTEGER PRIMARY KEY)").unwrap();
        GroupWriter::start("test-writer", conn, None, None).unwrap()
    }

    async fn keys(w: &GroupWriter) -> Vec<i64> {
        w.call(|c| {
            let mut s = c.prepare("SELECT k FROM t ORDER BY k").map_err(crate::sqlite::rusqlite_error)?;
            let rows = s.query_map([], |r| r.get(0)).map_err(crate::sqlite::rusqlite_error)?;
            rows.collect::<rusqlite::Result<Vec<i64>>>().map_err(crate::sqlite::rusqlite_error)
        })
        .await
        .unwrap()
    }

    fn insert(k: i64, then_fail: bool) -> impl FnOnce(&mut Connection) -> Result<(), StoreError> + Send + 'static {
        move |c| {
            c.execute("INSERT INTO t (k) VALUES (?1)", [k]).map_err(crate::sqlite::rusqlite_error)?;
            if then_fail {
                return Err(StoreError::Conflict);
            }
            Ok(())
        }
    }

    /// Occupies the writer with a call that runs until the returned sender sends; returns once
    /// that call has started, so that the calls sent next wait in the queue.
    async fn hold(w: &GroupWriter) -> (tokio::task::JoinHandle<Result<(), StoreError>>, std::sync::mpsc::Sender<()>) {
        let (entered_tx, entered_rx) = std::sync::mpsc::channel::<()>();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let blocker = {
            let w = w.clone();
            tokio::spawn(async move {
                w.call(move |_| {
                    let _ = entered_tx.send(());
                    let _ = release_rx.recv();
                    Ok(())
                })
                .await
            })
        };
        tokio::task::spawn_blocking(move || entered_rx.recv()).await.unwrap().unwrap();
        (blocker, release_tx)
    }

    #[tokio::test]
    async fn concurrent_calls_commit_and_a_failed_call_leaves_nothing() {
        let w = writer();
        let calls = (0..64i64).map(|k| {
            let w = w.clone();
            tokio::spawn(async move { w.call(insert(k, k % 8 == 0)).await })
        });
        let outcomes = futures::future::join_all(calls).await;
        for (k, out) in outcomes.into_iter().enumerate() {
            let out = out.unwrap();
            assert_eq!(out.is_err(), k % 8 == 0, "call {k}: {out:?}");
        }
        let want: Vec<i64> = (0..64).filter(|k| k % 8 != 0).collect();
        assert_eq!(keys(&w).await, want);
    }

    #[tokio::test]
    async fn atomic_calls_share_batches_with_the_others_and_a_failed_one_changes_nothing() {
        let w = writer();
        // Even keys by savepoint calls, odd keys by atomic ones; every key twice: one of each
        // pair fails on the primary key (a single statement: nothing of it stays).
        let calls = (0..128i64).map(|i| {
            let (w, k) = (w.clone(), i % 64);
            tokio::spawn(async move {
                if k % 2 == 0 {
                    w.call(insert(k, false)).await
                } else {
                    w.call_atomic(insert(k, false)).await
                }
            })
        });
        let outcomes: Vec<_> = futures::future::join_all(calls).await.into_iter().map(|o| o.unwrap()).collect();
        assert_eq!(outcomes.iter().filter(|o| o.is_ok()).count(), 64);
        assert!(outcomes.iter().filter_map(|o| o.as_ref().err()).all(|e| matches!(e, StoreError::AlreadyExists(_))));
        assert_eq!(keys(&w).await, (0..64).collect::<Vec<i64>>());
    }

    #[tokio::test]
    async fn an_atomic_call_whose_caller_left_before_it_ran_is_skipped() {
        let w = writer();
        let (blocker, release_tx) = hold(&w).await;
        let mut abandoned = Box::pin(w.call_atomic(insert(1, false)));
        assert!(futures::poll!(abandoned.as_mut()).is_pending());
        drop(abandoned);
        release_tx.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        w.call_atomic(insert(2, false)).await.unwrap();
        assert_eq!(keys(&w).await, vec![2]);
    }

    /// Counts each batch's calls.
    struct BatchSizes(std::sync::Arc<std::sync::Mutex<Vec<usize>>>, usize);

    impl BatchObserver for BatchSizes {
        fn begun(&mut self) {
            self.1 = 0;
        }
        fn call_started(&mut self) {
            self.1 += 1;
        }
        fn call_undone(&mut self) {}
        fn committing(&mut self) {}
        fn ended(&mut self, _committed: bool) {
            self.0.lock().unwrap().push(self.1);
        }
    }

    /// The sizes of the batches that carry 100 calls queued while the writer was busy.
    async fn batches_of_100_queued(synchronous: &str) -> Vec<usize> {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(&format!("PRAGMA synchronous = {synchronous}; CREATE TABLE t (k INTEGER PRIMARY KEY)"))
            .unwrap();
        let sizes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let w = GroupWriter::start("test-writer", conn, None, Some(Box::new(BatchSizes(sizes.clone(), 0)))).unwrap();
        let (blocker, release_tx) = hold(&w).await;
        let mut calls: Vec<_> = (0..100).map(|k| Box::pin(w.call_atomic(insert(k, false)))).collect();
        for call in &mut calls {
            // The first poll queues the call.
            assert!(futures::poll!(call.as_mut()).is_pending());
        }
        release_tx.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        for out in futures::future::join_all(calls).await {
            out.unwrap();
        }
        assert_eq!(keys(&w).await, (0..100).collect::<Vec<i64>>());
        let sizes = sizes.lock().unwrap().clone();
        // The blocker's batch first, the read of `keys` last.
        sizes[1..sizes.len() - 1].to_vec()
    }

    #[tokio::test]
    async fn without_an_fsync_per_commit_a_batch_carries_at_most_max_batch_calls() {
        assert_eq!(batches_of_100_queued("NORMAL").await, vec![MAX_BATCH, MAX_BATCH, MAX_BATCH, 100 - 3 * MAX_BATCH]);
    }

    #[tokio::test]
    async fn with_an_fsync_per_commit_the_calls_waiting_share_one_batch() {
        assert_eq!(batches_of_100_queued("FULL").await, vec![100]);
    }

    #[tokio::test]
    async fn an_abandoned_call_is_rolled_back() {
        let w = writer();
        // Hold the writer so the next call waits in the queue, then drop that call's future.
        let (blocker, release_tx) = hold(&w).await;
        let abandoned = w.call(insert(1, false));
        let mut abandoned = Box::pin(abandoned);
        // Queue it (first poll sends the job), then give up on it.
        assert!(futures::poll!(abandoned.as_mut()).is_pending());
        drop(abandoned);
        release_tx.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        w.call(insert(2, false)).await.unwrap();
        assert_eq!(keys(&w).await, vec![2]);
    }
}
