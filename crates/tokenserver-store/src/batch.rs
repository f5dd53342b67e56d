//! One statement (or one pipeline) for many concurrent calls: the network stores' hot paths.
//!
//! A round trip to PostgreSQL or Redis costs the database a wake-up, a parse and a commit, and
//! costs us a pooled connection, a task and a driver future, whether it carries one row or a
//! hundred. A [`Batcher`] queues the calls of one kind (load a session record, compare-and-set a
//! rotation) and hands every call waiting at that moment to one run of its statement, with up to
//! `in_flight` runs at once. Alone, a call runs at once; under load the calls that arrive while
//! the runs are out queue up and leave together in the next one, so a run carries more calls the
//! busier the store is, with no timer.
//!
//! Each run executes on a task of its own, so a caller that goes away never cuts a statement short
//! ([`crate::caller`]); a call whose caller has gone before its run starts is left out of it.
//!
//! A queue can also send one run at a time and let a second go out beside it only once the first
//! has been out for a while ([`Batcher::start_staggered`]): one run carries every call waiting,
//! which matters where each run is a commit (a log flush) or has a fixed cost large against its
//! calls' (a read's parse, plan and round trip), while a run stalled on a row lock or a slow flush
//! does not hold up every call of its kind.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::StoreError;

/// Calls waiting for a run at most; callers beyond wait to enqueue.
const QUEUE_DEPTH: usize = 4096;

type Reply<R> = oneshot::Sender<Result<R, StoreError>>;

/// The queue of one kind of call (cheap to clone; the task ends with the last clone).
pub(crate) struct Batcher<J, R> {
    jobs: mpsc::Sender<(J, Reply<R>)>,
}

impl<J, R> Clone for Batcher<J, R> {
    fn clone(&self) -> Self {
        Self { jobs: self.jobs.clone() }
    }
}

impl<J, R> std::fmt::Debug for Batcher<J, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").finish_non_exhaustive()
    }
}

impl<J: Send + 'static, R: Send + 'static> Batcher<J, R> {
    /// Starts the queue's task on the current Tokio runtime. `run` answers a batch of at most
    /// `max_batch` calls, one answer per call in their order; an `Err` is every call's answer.
    pub(crate) fn start<F, Fut>(name: &'static str, max_batch: usize, in_flight: usize, run: F) -> Self
    where
        F: Fn(Vec<J>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<Result<R, StoreError>>, StoreError>> + Send + 'static,
    {
        let in_flight = in_flight.max(1);
        Self::spawn(name, max_batch, Flights { eager: in_flight, most: in_flight, stall: None }, run)
    }

    /// As [`Self::start`], but one run goes out at a time: the next starts when it is answered
    /// or, if it has been out for `stall`, beside it, up to `most` runs out at once.
    pub(crate) fn start_staggered<F, Fut>(
        name: &'static str,
        max_batch: usize,
        most: usize,
        stall: Duration,
        run: F,
    ) -> Self
    where
        F: Fn(Vec<J>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<Result<R, StoreError>>, StoreError>> + Send + 'static,
    {
        Self::spawn(name, max_batch, Flights { eager: 1, most: most.max(1), stall: Some(stall) }, run)
    }

    fn spawn<F, Fut>(name: &'static str, max_batch: usize, flights: Flights, run: F) -> Self
    where
        F: Fn(Vec<J>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<Result<R, StoreError>>, StoreError>> + Send + 'static,
    {
        let (jobs, rx) = mpsc::channel(QUEUE_DEPTH);
        tokio::spawn(dispatch(name, max_batch.max(1), flights, rx, run));
        Self { jobs }
    }

    /// Queues `job` and waits for its answer.
    pub(crate) async fn call(&self, job: J) -> Result<R, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.jobs.send((job, reply)).await.map_err(|_| StoreError::Backend("the batch queue has stopped".into()))?;
        answer.await.map_err(|_| StoreError::Backend("a batch task failed".into()))?
    }
}

/// How many runs may be out at once: `eager` as soon as calls wait, up to `most` when the runs
/// out have been out for `stall` each.
#[derive(Debug, Clone, Copy)]
struct Flights {
    eager: usize,
    most: usize,
    stall: Option<Duration>,
}

async fn dispatch<J, R, F, Fut>(
    name: &'static str,
    max_batch: usize,
    flights: Flights,
    mut rx: mpsc::Receiver<(J, Reply<R>)>,
    run: F,
) where
    J: Send + 'static,
    R: Send + 'static,
    F: Fn(Vec<J>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<Result<R, StoreError>>, StoreError>> + Send + 'static,
{
    let calls = metrics::histogram!("tokenserver_store_batch_calls", "kind" => name);
    // A run holds one of `most` slots until it is answered, and one of `eager` until then or
    // until it has been out for `stall`, whichever comes first.
    let most = Arc::new(Semaphore::new(flights.most));
    let eager = Arc::new(Semaphore::new(flights.eager));
    let mut queued = Vec::with_capacity(max_batch);
    loop {
        // Free slots first: while they are taken, calls gather in the queue.
        let Ok(slot) = most.clone().acquire_owned().await else { return };
        let Ok(eager_slot) = eager.clone().acquire_owned().await else { return };
        if rx.recv_many(&mut queued, max_batch).await == 0 {
            return;
        }
        let (jobs, replies): (Vec<J>, Vec<Reply<R>>) = queued.drain(..).filter(|(_, reply)| !reply.is_closed()).unzip();
        if jobs.is_empty() {
            continue;
        }
        calls.record(jobs.len() as f64);
        let work = run(jobs);
        let stall = flights.stall;
        tokio::spawn(async move {
            let mut eager_slot = Some(eager_slot);
            let answers = match stall {
                None => work.await,
                Some(stall) => {
                    tokio::pin!(work);
                    tokio::select! {
                        answers = &mut work => answers,
                        () = tokio::time::sleep(stall) => {
                            eager_slot = None;
                            work.await
                        }
                    }
                }
            };
            drop((eager_slot, slot));
            deliver(answers, replies);
        });
    }
}

/// For each of `keys`, whether it is the first with its value: a statement that changes rows
/// may touch each row once, so of two calls on one key in a batch only the first is sent.
pub(crate) fn first_of_each<K: Eq + std::hash::Hash>(keys: impl ExactSizeIterator<Item = K>) -> Vec<bool> {
    let mut seen = std::collections::HashSet::with_capacity(keys.len());
    keys.map(|k| seen.insert(k)).collect()
}

fn deliver<R>(answers: Result<Vec<Result<R, StoreError>>, StoreError>, replies: Vec<Reply<R>>) {
    match answers {
        Ok(answers) => {
            let given = answers.len();
            let wanted = replies.len();
            let mut answers = answers.into_iter();
            for reply in replies {
                let answer = answers
                    .next()
                    .unwrap_or_else(|| Err(StoreError::Backend(format!("a batch answered {given} of {wanted} calls"))));
                let _ = reply.send(answer);
            }
        }
        Err(err) => {
            for reply in replies {
                let _ = reply.send(Err(err.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn calls_arriving_while_a_run_is_out_leave_together() {
        let runs = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = runs.clone();
        let batcher = Batcher::start("test", 100, 1, move |jobs: Vec<u32>| {
            seen.lock().expect("lock").push(jobs.len());
            async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(jobs.into_iter().map(|j| Ok(j * 2)).collect())
            }
        });
        let first = tokio::spawn({
            let b = batcher.clone();
            async move { b.call(1).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let rest: Vec<_> = (2..=20)
            .map(|j| {
                let b = batcher.clone();
                tokio::spawn(async move { b.call(j).await })
            })
            .collect();
        assert_eq!(first.await.expect("join").expect("answer"), 2);
        for (j, task) in (2..=20).zip(rest) {
            assert_eq!(task.await.expect("join").expect("answer"), j * 2);
        }
        // The first call ran alone; the 19 that queued behind it shared the next run.
        assert_eq!(*runs.lock().expect("lock"), vec![1, 19]);
    }

    /// Starts `call(job)` on a task of its own.
    fn call_later(batcher: &Batcher<u32, u32>, job: u32) -> tokio::task::JoinHandle<Result<u32, StoreError>> {
        let b = batcher.clone();
        tokio::spawn(async move { b.call(job).await })
    }

    #[tokio::test(start_paused = true)]
    async fn staggered_runs_go_one_at_a_time_while_each_is_answered_within_the_stall() {
        let runs = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = runs.clone();
        let batcher = Batcher::start_staggered("test", 100, 2, Duration::from_millis(200), move |jobs: Vec<u32>| {
            seen.lock().expect("lock").push((jobs.len(), tokio::time::Instant::now()));
            async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(jobs.into_iter().map(|j| Ok(j * 2)).collect())
            }
        });
        let t0 = tokio::time::Instant::now();
        let first = call_later(&batcher, 1);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let rest: Vec<_> = (2..=20).map(|j| call_later(&batcher, j)).collect();
        assert_eq!(first.await.expect("join").expect("answer"), 2);
        for (j, task) in (2..=20).zip(rest) {
            assert_eq!(task.await.expect("join").expect("answer"), j * 2);
        }
        // Two runs could have been out at once, but the first was answered within the stall: the
        // 19 waited for it (50 ms) rather than going out beside it (at 10 ms).
        let runs = runs.lock().expect("lock");
        assert_eq!(runs.iter().map(|r| r.0).collect::<Vec<_>>(), vec![1, 19]);
        assert_eq!(runs[1].1 - t0, Duration::from_millis(50));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_run_lets_the_next_go_beside_it_up_to_the_most_out() {
        const STALL: Duration = Duration::from_millis(20);
        let started = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = started.clone();
        let gates = [Arc::new(tokio::sync::Notify::new()), Arc::new(tokio::sync::Notify::new())];
        let held = gates.clone();
        let batcher = Batcher::start_staggered("test", 10, 2, STALL, move |jobs: Vec<u32>| {
            seen.lock().expect("lock").push((jobs.clone(), tokio::time::Instant::now()));
            let gate = jobs.first().and_then(|&j| held.get(j as usize - 1)).cloned();
            async move {
                if let Some(gate) = gate {
                    gate.notified().await;
                }
                Ok(jobs.into_iter().map(Ok).collect())
            }
        });
        let t0 = tokio::time::Instant::now();
        let one = call_later(&batcher, 1);
        tokio::time::sleep(Duration::from_millis(1)).await;
        let two = call_later(&batcher, 2);
        // Run 1 is held: run 2 goes out once run 1 has been out for the stall, not before.
        tokio::time::sleep(10 * STALL).await;
        let three = call_later(&batcher, 3);
        // Runs 1 and 2 are both held: a third may not go out beside them, however long they stall.
        tokio::time::sleep(10 * STALL).await;
        {
            let started = started.lock().expect("lock");
            let runs: Vec<_> = started.iter().map(|(jobs, _)| jobs.clone()).collect();
            assert_eq!(runs, vec![vec![1], vec![2]]);
            assert!(started[1].1 - t0 >= STALL, "run 2 started {:?} after run 1", started[1].1 - t0);
        }
        gates[0].notify_one();
        assert_eq!(one.await.expect("join").expect("answer"), 1);
        assert_eq!(three.await.expect("join").expect("answer"), 3);
        assert!(!two.is_finished());
        gates[1].notify_one();
        assert_eq!(two.await.expect("join").expect("answer"), 2);
    }

    #[tokio::test]
    async fn a_failed_run_fails_each_of_its_calls_and_a_short_answer_is_an_error() {
        let batcher = Batcher::start("test", 10, 2, |jobs: Vec<u32>| async move {
            if jobs.contains(&0) {
                return Err(StoreError::Unavailable("down".into()));
            }
            Ok(jobs.into_iter().skip(1).map(Ok).collect())
        });
        assert!(matches!(batcher.call(0).await, Err(StoreError::Unavailable(m)) if m == "down"));
        assert!(matches!(batcher.call(5).await, Err(StoreError::Backend(_))));
    }

    #[tokio::test]
    async fn a_caller_gone_before_its_run_is_left_out() {
        let ran = Arc::new(AtomicUsize::new(0));
        let counted = ran.clone();
        let gate = Arc::new(tokio::sync::Notify::new());
        let open = gate.clone();
        let batcher = Batcher::start("test", 10, 1, move |jobs: Vec<u32>| {
            counted.fetch_add(jobs.len(), Ordering::SeqCst);
            let open = open.clone();
            async move {
                if jobs == [1] {
                    open.notified().await;
                }
                Ok(jobs.into_iter().map(Ok).collect())
            }
        });
        let blocker = tokio::spawn({
            let b = batcher.clone();
            async move { b.call(1).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        // Queued behind the blocked run, then abandoned.
        let gone = tokio::time::timeout(Duration::from_millis(20), batcher.call(2)).await;
        assert!(gone.is_err());
        gate.notify_one();
        assert_eq!(blocker.await.expect("join").expect("answer"), 1);
        assert_eq!(batcher.call(3).await.expect("answer"), 3);
        assert_eq!(ran.load(Ordering::SeqCst), 2, "call 2 never ran");
    }
}
