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

use std::future::Future;
use std::sync::Arc;

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
        let (jobs, rx) = mpsc::channel(QUEUE_DEPTH);
        tokio::spawn(dispatch(name, max_batch.max(1), in_flight.max(1), rx, run));
        Self { jobs }
    }

    /// Queues `job` and waits for its answer.
    pub(crate) async fn call(&self, job: J) -> Result<R, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.jobs.send((job, reply)).await.map_err(|_| StoreError::Backend("the batch queue has stopped".into()))?;
        answer.await.map_err(|_| StoreError::Backend("a batch task failed".into()))?
    }
}

async fn dispatch<J, R, F, Fut>(
    name: &'static str,
    max_batch: usize,
    in_flight: usize,
    mut rx: mpsc::Receiver<(J, Reply<R>)>,
    run: F,
) where
    J: Send + 'static,
    R: Send + 'static,
    F: Fn(Vec<J>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<Result<R, StoreError>>, StoreError>> + Send + 'static,
{
    let calls = metrics::histogram!("tokenserver_store_batch_calls", "kind" => name);
    let slots = Arc::new(Semaphore::new(in_flight));
    let mut queued = Vec::with_capacity(max_batch);
    loop {
        // A free run slot first: while every slot is taken, calls gather in the queue.
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        if rx.recv_many(&mut queued, max_batch).await == 0 {
            return;
        }
        let (jobs, replies): (Vec<J>, Vec<Reply<R>>) = queued.drain(..).filter(|(_, reply)| !reply.is_closed()).unzip();
        if jobs.is_empty() {
            continue;
        }
        calls.record(jobs.len() as f64);
        let work = run(jobs);
        tokio::spawn(async move {
            let answers = work.await;
            drop(slot);
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
