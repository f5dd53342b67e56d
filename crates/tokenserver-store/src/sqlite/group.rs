//! Group commit for SQLite writes: one write connection (the writer's [`Core`]) runs the calls
//! queued for it in batches — each call inside its own savepoint, one `COMMIT` per batch, and
//! only then the answers. Under load one commit (one WAL append) carries many calls; alone, a
//! call commits at once. A call that fails, or whose caller gave up meanwhile, is rolled back to
//! its savepoint without touching the others.
//!
//! No thread of its own runs the batches. The call that finds the writer idle spawns a task
//! ([`lead`]) that takes the core and runs batch after batch until no call waits, then gives the
//! core back. A batch of short calls ([`Span::Short`]: one request's rows) runs right there on
//! the request worker, so neither the call nor its answer crosses to another thread, and between
//! batches the task yields, letting that worker serve the requests whose calls make up the next
//! batch (under load, with few calls queued, it yields a few times while more arrive, so that a
//! commit carries several calls rather than one). A batch holding a call that may run long
//! ([`Span::Long`]: bulk deletes, a whole node, the schema), or whose commit waits for an fsync,
//! runs on a blocking thread instead, so that it never holds up a request worker. The task is
//! not any caller's future: a caller going away cannot stop a batch.
//!
//! Checkpoints (copying the WAL back into the database, with an fsync) run on a second
//! connection on a thread of their own, so the writer does not stop for them; the writer only
//! finishes one now and then, on a blocking thread, so that the log can start over (see
//! [`WAL_RESTART_FRAMES`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

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
/// Under load, how many times the writer yields its worker while fewer than [`GATHER_BELOW`]
/// calls wait, before it begins a batch: a commit costs several WAL pages whether it carries one
/// call or twenty. An idle writer never waits.
const GATHER_YIELDS: usize = 8;
/// The wait ends as soon as this many calls are queued: a batch that size is large enough, and
/// waiting longer only idles the writer.
const GATHER_BELOW: usize = 16;
// A cap below the threshold would make every batch under load wait out every yield.
const _: () = assert!(GATHER_BELOW <= MAX_BATCH);

/// Told about each batch's transaction, where the batch runs.
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

/// How long a call may hold the writer, which decides where its batch may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Span {
    /// One request's worth of rows (a token, a session step, a user): its batch may run on the
    /// request worker that leads it, with no hand-over to another thread.
    Short,
    /// Possibly long (bulk deletes, a whole node, the schema, a count of a table): its batch runs
    /// on a blocking thread, so that it never holds up a request worker.
    Long,
}

/// A queued call.
struct Job {
    /// Whether the call runs inside a savepoint of its own (see [`GroupWriter::call_atomic`]).
    savepoint: bool,
    span: Span,
    run: Run,
}

/// A group-commit writer: its queue and its core (cheap to clone).
#[derive(Debug, Clone)]
pub(crate) struct GroupWriter {
    shared: Arc<Shared>,
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

/// Whether each commit of `conn` is fsynced (`synchronous` FULL or EXTRA).
fn commits_fsynced(conn: &Connection) -> bool {
    matches!(conn.pragma_query_value(None, "synchronous", |r| r.get::<_, i64>(0)), Ok(level) if level >= 2)
}

/// The writer's connection and what goes with it, held by whichever task is running batches.
struct Core {
    conn: Connection,
    observer: Option<Box<dyn BatchObserver>>,
    /// Whether each commit is fsynced: then a batch runs on a blocking thread, not a worker, and
    /// carries up to [`MAX_BATCH_SYNCED`] calls rather than [`MAX_BATCH`].
    synced: bool,
    wal_full: Arc<AtomicBool>,
    last_end: Option<Instant>,
    batch_calls: metrics::Histogram,
    batch_seconds: metrics::Histogram,
    restart_seconds: metrics::Histogram,
    /// Dropped with the core: the checkpointer thread then stops.
    _checkpointer: mpsc::Sender<()>,
}

impl Core {
    /// Most calls in one batch.
    fn max(&self) -> usize {
        if self.synced {
            MAX_BATCH_SYNCED
        } else {
            MAX_BATCH
        }
    }

    /// Under load: the last batch ended moments ago.
    fn busy(&self) -> bool {
        self.last_end.is_some_and(|t| t.elapsed() < BUSY_GAP)
    }

    /// Finishes a checkpoint, the checkpointer having found the log long. No write is under way,
    /// so this completes (the background checkpoints did most of the copying) and the next
    /// transaction starts the log afresh.
    fn restart_log(&mut self) {
        self.wal_full.store(false, Ordering::Relaxed);
        let started = Instant::now();
        if let Err(err) = checkpoint(&self.conn) {
            tracing::warn!(error = %err, "SQLite checkpoint failed");
        }
        self.restart_seconds.record(started.elapsed().as_secs_f64());
    }

    /// Runs `batch` in one transaction, each call in its savepoint if it asked for one, commits,
    /// and only then answers every call.
    fn run_batch(&mut self, batch: Vec<Job>) {
        let conn = &mut self.conn;
        let started = Instant::now();
        if let Err(err) = control(conn, "BEGIN IMMEDIATE") {
            let msg = err.to_string();
            for job in batch {
                let (_, deliver) = (job.run)(None);
                deliver(Some(StoreError::Unavailable(msg.clone())));
            }
            let _ = conn.execute_batch("ROLLBACK");
            return;
        }
        if let Some(o) = self.observer.as_mut() {
            o.begun();
        }
        self.batch_calls.record(batch.len() as f64);
        let mut answers = Vec::with_capacity(batch.len());
        for job in batch {
            let ok = job.savepoint && control(conn, "SAVEPOINT call").is_ok();
            if let Some(o) = self.observer.as_mut() {
                o.call_started();
            }
            let (undo, deliver) = (job.run)(Some(conn));
            if ok {
                if undo {
                    let _ = control(conn, "ROLLBACK TO call");
                    if let Some(o) = self.observer.as_mut() {
                        o.call_undone();
                    }
                }
                let _ = control(conn, "RELEASE call");
            }
            answers.push(deliver);
        }
        if let Some(o) = self.observer.as_mut() {
            o.committing();
        }
        let commit = control(conn, "COMMIT").err().map(|err| err.to_string());
        if commit.is_some() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        if let Some(o) = self.observer.as_mut() {
            o.ended(commit.is_none());
        }
        self.batch_seconds.record(started.elapsed().as_secs_f64());
        self.last_end = Some(Instant::now());
        for deliver in answers {
            deliver(commit.as_ref().map(|m| StoreError::Unavailable(m.clone())));
        }
    }
}

/// The calls waiting for the writer, and its core while no task runs batches.
struct Queue {
    jobs: VecDeque<Job>,
    /// `None` while a task runs batches (it holds the core), and for good once that task died.
    core: Option<Core>,
    /// The task running batches died (a panic, or its runtime shut down): calls fail at once.
    stopped: bool,
}

struct Shared {
    queue: Mutex<Queue>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("waiting", &self.waiting()).finish_non_exhaustive()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Only queue operations run under the lock, and they do not panic.
        self.queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn waiting(&self) -> usize {
        self.lock().jobs.len()
    }
}

/// The task running batches, from the call that found the writer idle until it finds no call
/// waiting (and gives the core back). Ending any other way (a panic in a call, its runtime
/// shutting down) stops the writer: the calls waiting are dropped, so that their callers hear the
/// writer stopped, and later calls fail at once.
struct Leader {
    shared: Arc<Shared>,
    /// The core went back to the queue.
    done: bool,
}

impl Drop for Leader {
    fn drop(&mut self) {
        if !self.done {
            let mut queue = self.shared.lock();
            queue.stopped = true;
            queue.jobs.clear();
        }
    }
}

/// Runs `f` on `core` on a blocking thread; `None` if it panicked (the core is lost).
async fn blocking(mut core: Core, f: impl FnOnce(&mut Core) + Send + 'static) -> Option<Core> {
    tokio::task::spawn_blocking(move || {
        f(&mut core);
        core
    })
    .await
    .ok()
}

/// Runs batches until no call waits. Between batches the task yields, so that the worker it runs
/// on serves the requests whose calls make up the next batch; under load, with fewer than
/// [`GATHER_BELOW`] calls waiting, it yields up to [`GATHER_YIELDS`] times while more arrive.
async fn lead(mut leader: Leader, mut core: Core) {
    loop {
        if core.wal_full.load(Ordering::Relaxed) {
            // Rare, and it fsyncs the database: off the request workers.
            let Some(back) = blocking(core, Core::restart_log).await else { return };
            core = back;
        }
        if core.busy() {
            for _ in 0..GATHER_YIELDS {
                if leader.shared.waiting() >= GATHER_BELOW {
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
        let batch = {
            let mut queue = leader.shared.lock();
            if queue.jobs.is_empty() {
                queue.core = Some(core);
                leader.done = true;
                return;
            }
            let n = queue.jobs.len().min(core.max());
            queue.jobs.drain(..n).collect::<Vec<_>>()
        };
        if core.synced || batch.iter().any(|job| job.span == Span::Long) {
            // A commit that waits for an fsync, or a call that may run long: not on a request
            // worker.
            let Some(back) = blocking(core, move |core| core.run_batch(batch)).await else { return };
            core = back;
        } else {
            core.run_batch(batch);
        }
        tokio::task::yield_now().await;
    }
}

impl GroupWriter {
    /// Makes the writer `name` of `conn`; for a database file (`checkpoints`: a second
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
        // The checkpointer stops when the writer's core is dropped (it holds the `stop` sender).
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
        let core = Core {
            synced: commits_fsynced(&conn),
            conn,
            observer,
            wal_full,
            last_end: None,
            batch_calls: metrics::histogram!("tokenserver_sqlite_batch_calls", "writer" => name.to_owned()),
            batch_seconds: metrics::histogram!("tokenserver_sqlite_batch_seconds", "writer" => name.to_owned()),
            restart_seconds: metrics::histogram!(
                "tokenserver_sqlite_restart_checkpoint_seconds",
                "writer" => name.to_owned()
            ),
            _checkpointer: stop_tx,
        };
        let queue = Queue { jobs: VecDeque::new(), core: Some(core), stopped: false };
        Ok(Self { shared: Arc::new(Shared { queue: Mutex::new(queue) }) })
    }

    /// Runs `f` on the writer inside the next batch's transaction, in a savepoint of its own. Its
    /// changes are kept if it succeeds and its caller is still waiting at that point; the answer
    /// comes after `COMMIT`. `span` says whether its batch may run on a request worker. Needs a
    /// tokio runtime (the writer's task runs on it).
    pub(crate) async fn call<T: Send + 'static>(
        &self,
        span: Span,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.queue(true, span, f).await
    }

    /// [`Self::call`] for a call whose changes are atomic by themselves: one statement, or
    /// statements each of which runs only when those before it changed nothing, so that a call
    /// that fails has changed nothing. It runs without a savepoint (two statements and a copy of
    /// each page it changes less: bench/results/access-sqlite.md). It is skipped if its caller
    /// has gone before it runs; a caller gone once it has run keeps its change, as a client whose
    /// answer is lost on the way back does.
    pub(crate) async fn call_atomic<T: Send + 'static>(
        &self,
        span: Span,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.queue(false, span, f).await
    }

    async fn queue<T: Send + 'static>(
        &self,
        savepoint: bool,
        span: Span,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        // The job runs in a batch whatever becomes of this future (see `crate::caller`).
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
        let job = Job { savepoint, span, run };
        let stopped = || StoreError::Unavailable("the SQLite writer stopped".into());
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| StoreError::Unavailable("the SQLite writer needs a tokio runtime".into()))?;
        let idle_core = {
            let mut queue = self.shared.lock();
            if queue.stopped {
                return Err(stopped());
            }
            queue.jobs.push_back(job);
            queue.core.take()
        };
        if let Some(core) = idle_core {
            // No task is running batches: start one. It is not this future, so that the caller
            // going away cannot stop it.
            let leader = Leader { shared: self.shared.clone(), done: false };
            drop(runtime.spawn(lead(leader, core)));
        }
        let out = rx.await.map_err(|_| stopped())?;
        drop(waiting);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer() -> GroupWriter {
        let conn = Connection::open_in_memory().unwrap();
        // As the stores open it (`Durability::Normal`): no fsync per commit.
        conn.execute_batch("PRAGMA synchronous = NORMAL; CREATE TABLE t (k INTEGER PRIMARY KEY)").unwrap();
        GroupWriter::start("test-writer", conn, None, None).unwrap()
    }

    async fn keys(w: &GroupWriter) -> Vec<i64> {
        w.call(Span::Short, |c| {
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
                w.call(Span::Short, move |_| {
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
            tokio::spawn(async move { w.call(Span::Short, insert(k, k % 8 == 0)).await })
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
                    w.call(Span::Short, insert(k, false)).await
                } else {
                    w.call_atomic(Span::Short, insert(k, false)).await
                }
            })
        });
        let outcomes: Vec<_> = futures::future::join_all(calls).await.into_iter().map(|o| o.unwrap()).collect();
        assert_eq!(outcomes.iter().filter(|o| o.is_ok()).count(), 64);
        assert!(outcomes.iter().filter_map(|o| o.as_ref().err()).all(|e| matches!(e, StoreError::AlreadyExists(_))));
        assert_eq!(keys(&w).await, (0..64).collect::<Vec<i64>>());
    }

    // A call that holds the writer blocks the worker it runs on: the test needs another.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_atomic_call_whose_caller_left_before_it_ran_is_skipped() {
        let w = writer();
        let (blocker, release_tx) = hold(&w).await;
        let mut abandoned = Box::pin(w.call_atomic(Span::Short, insert(1, false)));
        assert!(futures::poll!(abandoned.as_mut()).is_pending());
        drop(abandoned);
        release_tx.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        w.call_atomic(Span::Short, insert(2, false)).await.unwrap();
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
        let mut calls: Vec<_> = (0..100).map(|k| Box::pin(w.call_atomic(Span::Short, insert(k, false)))).collect();
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

    // A call that holds the writer blocks the worker it runs on: the test needs another.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_an_fsync_per_commit_a_batch_carries_at_most_max_batch_calls() {
        assert_eq!(batches_of_100_queued("NORMAL").await, vec![MAX_BATCH, MAX_BATCH, MAX_BATCH, 100 - 3 * MAX_BATCH]);
    }

    // A call that holds the writer blocks the worker it runs on: the test needs another.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_an_fsync_per_commit_the_calls_waiting_share_one_batch() {
        assert_eq!(batches_of_100_queued("FULL").await, vec![100]);
    }

    // A call that holds the writer blocks the worker it runs on: the test needs another.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_abandoned_call_is_rolled_back() {
        let w = writer();
        // Hold the writer so the next call waits in the queue, then drop that call's future.
        let (blocker, release_tx) = hold(&w).await;
        let abandoned = w.call(Span::Short, insert(1, false));
        let mut abandoned = Box::pin(abandoned);
        // Queue it (first poll sends the job), then give up on it.
        assert!(futures::poll!(abandoned.as_mut()).is_pending());
        drop(abandoned);
        release_tx.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        w.call(Span::Short, insert(2, false)).await.unwrap();
        assert_eq!(keys(&w).await, vec![2]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_that_panics_stops_the_writer_and_every_caller_hears_so() {
        let w = writer();
        let (blocker, release_tx) = hold(&w).await;
        let mut others: Vec<_> = (0..4).map(|k| Box::pin(w.call(Span::Short, insert(k, false)))).collect();
        for call in &mut others {
            assert!(futures::poll!(call.as_mut()).is_pending());
        }
        let mut panics = Box::pin(w.call(Span::Short, |_| -> Result<(), StoreError> { panic!("a bug in a call") }));
        assert!(futures::poll!(panics.as_mut()).is_pending());
        release_tx.send(()).unwrap();
        // The blocker's batch committed before the panic.
        blocker.await.unwrap().unwrap();
        let stopped =
            |out: Result<(), StoreError>| matches!(out, Err(StoreError::Unavailable(m)) if m.contains("stopped"));
        assert!(stopped(panics.await));
        for out in futures::future::join_all(others).await {
            assert!(stopped(out));
        }
        assert!(stopped(w.call(Span::Short, insert(9, false)).await));
    }

    #[tokio::test]
    async fn a_short_call_runs_on_the_calling_worker_and_a_long_one_on_another_thread() {
        let w = writer();
        let here = std::thread::current().id();
        let on = |span| {
            let w = w.clone();
            async move { w.call(span, |_| Ok(std::thread::current().id())).await.unwrap() }
        };
        assert_eq!(on(Span::Short).await, here);
        assert_ne!(on(Span::Long).await, here);
    }

    /// On a runtime of one thread, a long call that waits for a task of that runtime completes:
    /// it does not hold the runtime's only worker.
    #[tokio::test]
    async fn a_long_call_leaves_the_request_workers_free() {
        let w = writer();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        // Held on the worker, it would wait out the timeout and fail.
        let long = w.call(Span::Long, move |_| {
            rx.recv_timeout(Duration::from_secs(10)).map_err(|_| StoreError::Unavailable("never signalled".into()))
        });
        let other = async move {
            tokio::task::yield_now().await;
            tx.send(()).unwrap();
        };
        let (out, ()) = tokio::join!(long, other);
        out.unwrap();
    }
}
