//! Group allocation for the network SQL backends (PostgreSQL, MySQL).
//!
//! Every allocation locks its service's `nodes` rows until it commits, so allocations run one at
//! a time however many connections there are, each paying a durable commit while it holds that
//! lock. This queue hands them to one task that runs every allocation waiting at that moment in a
//! single transaction: the node lock is taken once per batch and the batch commits once, and
//! only then does any caller get its answer. Inside it the batch is set-based
//! ([`crate::sql::tx::allocate_batch`]): its users are locked and read in one statement each,
//! decided in memory, inserted together and counted on their nodes with one update per node, so
//! the node lock is held for a few statements rather than four per user.
//!
//! A call that conflicts ([`crate::StoreError::Conflict`]) has written nothing and is answered as such.
//! Any other failure may have left writes behind (a capacity release before `NoNodeAvailable`, a
//! database error), so the whole batch is rolled back and its calls run again one transaction
//! each, exactly as without the queue. So is a batch one of whose callers goes away (the request
//! timed out, the client left) before it commits: the batch's transaction sees it before its
//! next statement ([`crate::caller`]), so an abandoned allocation leaves nothing behind, and no
//! statement is ever cut short.

use async_trait::async_trait;
use tokenserver_core::sync::users::UserRow;
use tokio::sync::{mpsc, oneshot};

use crate::caller::{Caller, Waiting};
use crate::sync::{Allocate, OwnedAllocate, Result};
#[cfg(test)]
use crate::StoreError;

/// Most allocations in one transaction (keeps the node lock's hold time bounded).
const MAX_BATCH: usize = 64;
/// Allocations waiting for the queue's task at most; callers beyond wait to enqueue.
const QUEUE_DEPTH: usize = 1024;

/// What the queue's task runs allocations with.
#[async_trait]
pub(crate) trait BatchAllocator: Send + Sync + 'static {
    /// All of `reqs` in one transaction, committed when the outer result is `Ok`; an outer `Err`
    /// means it was rolled back (`Abandoned` when one of `callers` went away first). Calls are
    /// run in the order given.
    async fn allocate_batch(&self, reqs: Vec<OwnedAllocate>, callers: Caller) -> Result<Vec<Result<UserRow>>>;
    /// One allocation in its own transaction, rolled back if `caller` goes away first.
    async fn allocate_one(&self, req: OwnedAllocate, caller: Caller) -> Result<UserRow>;
}

type Reply = oneshot::Sender<Result<UserRow>>;
type Job = (OwnedAllocate, Caller, Reply);

/// One call in its own transaction, unless its caller has already gone.
async fn run_alone(allocator: &impl BatchAllocator, req: OwnedAllocate, caller: Caller, reply: Reply) {
    if caller.gone() {
        return;
    }
    let result = allocator.allocate_one(req, caller).await;
    let _ = reply.send(result);
}

/// The sending side; the task ends when the last clone is dropped.
#[derive(Debug, Clone)]
pub(crate) struct AllocationQueue {
    jobs: mpsc::Sender<Job>,
}

impl AllocationQueue {
    /// Starts the queue's task on the current Tokio runtime.
    pub(crate) fn start(allocator: impl BatchAllocator) -> Self {
        let (jobs, rx) = mpsc::channel(QUEUE_DEPTH);
        let task = tokio::spawn(run(allocator, rx));
        tokio::spawn(async move {
            if let Err(err) = task.await {
                if err.is_panic() {
                    tracing::error!("the allocation task panicked: allocations now run one transaction each");
                }
            }
        });
        Self { jobs }
    }

    /// Queues `req` and waits for its committed result; `None` when the queue's task has stopped
    /// (it panicked), and the caller should allocate on its own. Even if the task stopped after
    /// committing this call's batch, allocating again is safe: the allocation re-reads the
    /// user's rows and finds the one it expected gone (a conflict, which the caller retries).
    pub(crate) async fn allocate(&self, req: &Allocate<'_>) -> Option<Result<UserRow>> {
        let (reply, answer) = oneshot::channel();
        let (waiting, caller) = Waiting::start();
        self.jobs.send((OwnedAllocate::new(req), caller, reply)).await.ok()?;
        let out = answer.await.ok();
        drop(waiting);
        out
    }
}

/// `req` through `queue` when the store has one and its task runs; otherwise (the queue's own
/// copy of the store, or a task that stopped) in a transaction of its own through `store`.
pub(crate) async fn allocate_via(
    queue: Option<&AllocationQueue>,
    store: &impl BatchAllocator,
    req: &Allocate<'_>,
) -> Result<UserRow> {
    if let Some(queue) = queue {
        if let Some(answer) = queue.allocate(req).await {
            return answer;
        }
    }
    let (waiting, caller) = Waiting::start();
    let out = store.allocate_one(OwnedAllocate::new(req), caller).await;
    drop(waiting);
    out
}

async fn run(allocator: impl BatchAllocator, mut rx: mpsc::Receiver<Job>) {
    let batch_calls = metrics::histogram!("tokenserver_allocation_batch_calls");
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // A caller that has gone away (its client disconnected) needs no allocation.
        batch.retain(|(_, caller, _): &Job| !caller.gone());
        // One lock order for every batch, in every process: services' nodes by name.
        batch.sort_by(|a: &Job, b: &Job| a.0.service().cmp(b.0.service()));
        if batch.is_empty() {
            continue;
        }
        batch_calls.record(batch.len() as f64);
        let reqs: Vec<OwnedAllocate> = batch.iter().map(|job| job.0.clone()).collect();
        let callers = Caller::any(batch.iter().map(|job| &job.1));
        match allocator.allocate_batch(reqs, callers).await {
            Ok(results) => {
                for ((_, _, reply), result) in batch.drain(..).zip(results) {
                    let _ = reply.send(result);
                }
            }
            Err(err) => {
                tracing::debug!(error = %err, calls = batch.len(), "allocation batch rolled back; running its calls one by one");
                for (req, caller, reply) in batch.drain(..) {
                    run_alone(&allocator, req, caller, reply).await;
                }
            }
        }
    }
}

/// One batch as a network store runs it ([`crate::sql::tx::allocate_batch`]): every answer is
/// the one the calls would get one after another, and the rows and node counters are what those
/// calls would leave. `store` is migrated and empty.
#[cfg(test)]
pub(crate) async fn batch_case<S: BatchAllocator + crate::SyncStore>(store: &S) {
    use crate::sync::{Allocate, NewNode, NodeChange};
    const SVC: &str = "sync-1.5";
    let node = |url: &'static str| NewNode {
        service: SVC,
        node: url,
        capacity: 100,
        available: 10,
        current_load: 0,
        downed: false,
        backoff: false,
    };
    store.add_node(&node("https://n1")).await.unwrap_or_else(|e| panic!("{e}"));
    let new = |email: &'static str, expected: Option<i64>| Allocate {
        service: SVC,
        email,
        generation: 3,
        client_state: "aaaa",
        keys_changed_at: Some(3),
        expected_current: expected,
        now_ms: 1_000,
        release_rate: 0.1,
        bucket: None,
    };
    let old = store.allocate_user(&new("old@x", None)).await.unwrap_or_else(|e| panic!("{e}"));
    // A user whose node was taken down and unassigned needs a new one: its allocation names its
    // current row.
    store.add_node(&node("https://n2")).await.unwrap_or_else(|e| panic!("{e}"));
    let down = NodeChange { downed: Some(true), ..Default::default() };
    store.update_node(SVC, "https://n1", &down).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(store.unassign_node(SVC, "https://n1", 500).await.ok(), Some(1));
    let batch = [
        new("a@x", None),
        new("a@x", None),
        new("old@x", None),
        new("old@x", Some(old.uid + 1000)),
        new("old@x", Some(old.uid)),
        new("b@x", None),
    ];
    let reqs: Vec<OwnedAllocate> = batch.iter().map(OwnedAllocate::new).collect();
    let answers = store.allocate_batch(reqs, Caller::default()).await.unwrap_or_else(|e| panic!("{e}"));
    let kinds: Vec<&str> = answers
        .iter()
        .map(|a| match a {
            Ok(_) => "ok",
            Err(StoreError::Conflict) => "conflict",
            Err(_) => "other",
        })
        .collect();
    assert_eq!(kinds, ["ok", "conflict", "conflict", "conflict", "ok", "ok"], "{answers:?}");
    let made: Vec<&UserRow> = answers.iter().filter_map(|a| a.as_ref().ok()).collect();
    for (row, email) in made.iter().zip(["a@x", "old@x", "b@x"]) {
        let stored = store.user_rows(SVC, email).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&stored[0], *row, "{email}: the answer is the stored row");
        assert_eq!(row.node.as_deref(), Some("https://n2"), "{email}: on the node that is up");
    }
    let uids: std::collections::HashSet<i64> = made.iter().map(|r| r.uid).chain([old.uid]).collect();
    assert_eq!(uids.len(), 4, "distinct uids");
    let nodes = store.list_nodes(Some(SVC)).await.unwrap_or_else(|e| panic!("{e}"));
    let n2 = nodes.iter().find(|n| n.state.node == "https://n2").map(|n| &n.state);
    assert_eq!(n2.map(|n| (n.current_load, n.available)), Some((3, 7)), "three users, one update");
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;
    use crate::StoreError;

    /// Records what it was asked to do. The first batch waits for `release` so that later calls
    /// pile up behind it; `fail_batches` makes every batch fail as a whole.
    #[derive(Default)]
    struct Recorder {
        batches: Mutex<Vec<Vec<String>>>,
        singles: Mutex<Vec<String>>,
        release: tokio::sync::Notify,
        fail_batches: bool,
    }

    fn row(uid: i64) -> UserRow {
        crate::test_row(uid)
    }

    /// `conflict@…` conflicts; anything else gets the uid of its position in its batch.
    fn answer(email: &str, uid: i64) -> Result<UserRow> {
        if email.starts_with("conflict") {
            Err(StoreError::Conflict)
        } else {
            Ok(row(uid))
        }
    }

    #[async_trait]
    impl BatchAllocator for Arc<Recorder> {
        async fn allocate_batch(&self, reqs: Vec<OwnedAllocate>, callers: Caller) -> Result<Vec<Result<UserRow>>> {
            let first = {
                let mut batches = self.batches.lock().unwrap();
                batches.push(reqs.iter().map(|r| r.borrow().email.to_owned()).collect());
                batches.len() == 1
            };
            if first {
                self.release.notified().await;
            }
            if self.fail_batches {
                return Err(StoreError::NoNodeAvailable);
            }
            // As a real transaction does before its commit.
            callers.check()?;
            Ok(reqs.iter().enumerate().map(|(i, r)| answer(r.borrow().email, i as i64)).collect())
        }

        async fn allocate_one(&self, req: OwnedAllocate, caller: Caller) -> Result<UserRow> {
            let email = req.borrow().email.to_owned();
            self.singles.lock().unwrap().push(email.clone());
            caller.check()?;
            answer(&email, 100)
        }
    }

    fn req(email: &str) -> Allocate<'_> {
        Allocate {
            service: "sync-1.5",
            email,
            generation: 1,
            client_state: "",
            keys_changed_at: None,
            expected_current: None,
            now_ms: 1,
            release_rate: 0.1,
            bucket: None,
        }
    }

    /// One call through a running queue.
    async fn alloc(queue: &AllocationQueue, email: &str) -> Result<UserRow> {
        queue.allocate(&req(email)).await.expect("the queue's task is running")
    }

    /// Starts `emails` as concurrent calls while the first batch (`first`) is held open.
    async fn pile_up(rec: &Arc<Recorder>, first: &str, emails: &[&str]) -> Vec<Result<UserRow>> {
        let queue = AllocationQueue::start(rec.clone());
        let held = {
            let queue = queue.clone();
            let first = first.to_owned();
            tokio::spawn(async move { alloc(&queue, &first).await })
        };
        while rec.batches.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let calls: Vec<_> = emails
            .iter()
            .map(|e| {
                let (queue, e) = (queue.clone(), e.to_string());
                tokio::spawn(async move { alloc(&queue, &e).await })
            })
            .collect();
        // Let every call reach the queue before the held batch ends.
        tokio::time::sleep(Duration::from_millis(50)).await;
        rec.release.notify_one();
        held.await.unwrap().unwrap();
        let mut out = Vec::new();
        for c in calls {
            out.push(c.await.unwrap());
        }
        out
    }

    // Single-threaded runtimes: tasks run in the order they were woken, so calls reach the queue
    // in the order they were spawned.
    #[tokio::test]
    async fn calls_waiting_behind_a_batch_share_the_next_one() {
        let rec = Arc::new(Recorder::default());
        let results = pile_up(&rec, "first@x", &["a@x", "conflict@x", "b@x"]).await;
        let batches = rec.batches.lock().unwrap().clone();
        assert_eq!(batches, vec![vec!["first@x".to_string()], vec!["a@x".into(), "conflict@x".into(), "b@x".into()]]);
        // Answers follow each call, whatever its place in the batch.
        assert_eq!(results[0].as_ref().unwrap().uid, 0);
        assert!(matches!(results[1], Err(StoreError::Conflict)), "{:?}", results[1]);
        assert_eq!(results[2].as_ref().unwrap().uid, 2);
        assert!(rec.singles.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_failed_batch_runs_each_call_alone() {
        let rec = Arc::new(Recorder { fail_batches: true, ..Default::default() });
        rec.release.notify_one();
        let queue = AllocationQueue::start(rec.clone());
        // On this single-threaded runtime all three are queued before the task runs.
        let calls: Vec<_> = ["a@x", "conflict@x", "b@x"]
            .into_iter()
            .map(|email| {
                let queue = queue.clone();
                tokio::spawn(async move { alloc(&queue, email).await })
            })
            .collect();
        let mut results = Vec::new();
        for c in calls {
            results.push(c.await.unwrap());
        }
        assert_eq!(results[0].as_ref().unwrap().uid, 100);
        assert!(matches!(results[1], Err(StoreError::Conflict)), "{:?}", results[1]);
        assert_eq!(results[2].as_ref().unwrap().uid, 100);
        assert_eq!(*rec.batches.lock().unwrap(), vec![vec!["a@x".to_string(), "conflict@x".into(), "b@x".into()]]);
        assert_eq!(*rec.singles.lock().unwrap(), ["a@x", "conflict@x", "b@x"]);
    }

    #[tokio::test]
    async fn a_caller_leaving_mid_batch_rolls_the_batch_back() {
        let rec = Arc::new(Recorder::default());
        let queue = AllocationQueue::start(rec.clone());
        // On this single-threaded runtime both calls are queued before the task runs.
        let spawn = |email: &'static str| {
            let queue = queue.clone();
            tokio::spawn(async move { alloc(&queue, email).await })
        };
        let (leaves, stays) = (spawn("leaves@x"), spawn("stays@x"));
        while rec.batches.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        leaves.abort();
        let _ = leaves.await;
        // The held batch goes on, finds a caller gone before it commits, and rolls back.
        rec.release.notify_one();
        assert_eq!(stays.await.unwrap().unwrap().uid, 100, "answered by its own transaction");
        assert_eq!(*rec.batches.lock().unwrap(), vec![vec!["leaves@x".to_string(), "stays@x".into()]]);
        assert_eq!(*rec.singles.lock().unwrap(), ["stays@x"]);
    }

    #[tokio::test]
    async fn callers_that_went_away_are_skipped() {
        let rec = Arc::new(Recorder::default());
        let queue = AllocationQueue::start(rec.clone());
        let held = {
            let queue = queue.clone();
            tokio::spawn(async move { alloc(&queue, "first@x").await })
        };
        while rec.batches.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let gone = {
            let queue = queue.clone();
            tokio::spawn(async move { alloc(&queue, "gone@x").await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        gone.abort();
        let _ = gone.await;
        let stays = {
            let queue = queue.clone();
            tokio::spawn(async move { alloc(&queue, "stays@x").await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        rec.release.notify_one();
        held.await.unwrap().unwrap();
        stays.await.unwrap().unwrap();
        let batches = rec.batches.lock().unwrap().clone();
        assert_eq!(batches, vec![vec!["first@x".to_string()], vec!["stays@x".into()]]);
    }

    struct Panics;

    #[async_trait]
    impl BatchAllocator for Panics {
        async fn allocate_batch(&self, _: Vec<OwnedAllocate>, _: Caller) -> Result<Vec<Result<UserRow>>> {
            panic!("allocator bug");
        }

        async fn allocate_one(&self, _: OwnedAllocate, _: Caller) -> Result<UserRow> {
            panic!("allocator bug");
        }
    }

    #[tokio::test]
    async fn a_stopped_task_sends_callers_back_to_allocate_alone() {
        let queue = AllocationQueue::start(Panics);
        // The call the task panicked on, and every call after it, is told so (not left waiting
        // and not answered 503), so that the store allocates it itself.
        assert!(queue.allocate(&req("first@x")).await.is_none());
        assert!(queue.allocate(&req("later@x")).await.is_none());
        let store = Arc::new(Recorder::default());
        assert_eq!(allocate_via(Some(&queue), &store, &req("alone@x")).await.unwrap().uid, 100);
        assert_eq!(*store.singles.lock().unwrap(), ["alone@x"]);
    }

    #[tokio::test]
    async fn without_a_queue_calls_allocate_alone() {
        let store = Arc::new(Recorder::default());
        assert_eq!(allocate_via(None, &store, &req("alone@x")).await.unwrap().uid, 100);
        assert_eq!(*store.singles.lock().unwrap(), ["alone@x"]);
        assert!(store.batches.lock().unwrap().is_empty());
    }
}
