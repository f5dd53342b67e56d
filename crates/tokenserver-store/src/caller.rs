//! Writes that a caller going away cannot cut short.
//!
//! A request's future is dropped wherever it is when its client disconnects or its database
//! timeout fires. A database driver's future dropped in the middle of a statement or of `BEGIN`
//! can leave its connection in a state nobody owns (sqlx 0.8 on SQLite: a transaction begun and
//! never ended, holding the write lock until restart). So a write never runs in the caller's
//! future: it runs on a task of its own ([`detached`], the SQLite writer's task), which
//! always completes each statement, and looks at the caller between statements through a
//! [`Caller`]. Once the caller is gone the write stops at the next step and rolls back; a write
//! that reached its commit stays committed (as with any client that leaves after sending).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::StoreError;

/// Tells a write whether its caller (or, for a batch, every one of its callers) still waits.
#[derive(Debug, Clone, Default)]
pub(crate) struct Caller {
    gone: Arc<[Arc<AtomicBool>]>,
}

/// Held by the caller while it waits; dropping it (the caller's future went away, or the answer
/// arrived) tells the write.
#[derive(Debug)]
pub(crate) struct Waiting(Arc<AtomicBool>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl Waiting {
    /// A caller that waits until the returned guard is dropped.
    pub(crate) fn start() -> (Waiting, Caller) {
        let flag = Arc::new(AtomicBool::new(false));
        (Waiting(flag.clone()), Caller { gone: Arc::new([flag]) })
    }
}

impl Caller {
    /// The callers of a batch: gone as soon as any one of them is.
    pub(crate) fn any<'a>(callers: impl IntoIterator<Item = &'a Caller>) -> Caller {
        Caller { gone: callers.into_iter().flat_map(|c| c.gone.iter().cloned()).collect() }
    }

    /// True once the caller stopped waiting.
    pub(crate) fn gone(&self) -> bool {
        self.gone.iter().any(|flag| flag.load(Ordering::Relaxed))
    }

    /// `Err(Abandoned)` once the caller stopped waiting: the write's next step is a rollback.
    pub(crate) fn check(&self) -> Result<(), StoreError> {
        if self.gone() {
            return Err(StoreError::Abandoned);
        }
        Ok(())
    }
}

/// Runs `work` on a task of its own and waits for its answer. Dropping the returned future does
/// not stop the task; `work` learns of it through its [`Caller`].
pub(crate) async fn detached<T, Fut>(work: impl FnOnce(Caller) -> Fut) -> Result<T, StoreError>
where
    T: Send + 'static,
    Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
{
    let (waiting, caller) = Waiting::start();
    let task = tokio::spawn(work(caller));
    let out = task.await;
    drop(waiting);
    match out {
        Ok(result) => result,
        Err(err) => Err(StoreError::Backend(format!("write task failed: {err}"))),
    }
}

/// The steps of a write transaction, borrowing it.
pub(crate) type Steps<'t, T> = std::pin::Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 't>>;

/// A sqlx transaction run on a detached task: begun, handed to `steps` with the caller, committed
/// if they succeed and the caller still waits, rolled back (awaited, on the task) otherwise.
/// `also` names callers beyond this future (a batch's); `Caller::default()` for none.
pub(crate) async fn transaction<DB, T, F>(pool: &sqlx::Pool<DB>, also: Caller, steps: F) -> Result<T, StoreError>
where
    DB: sqlx::Database,
    T: Send + 'static,
    F: for<'t> FnOnce(&'t mut sqlx::Transaction<'static, DB>, &'t Caller) -> Steps<'t, T> + Send + 'static,
{
    transaction_with(pool, None, also, steps).await
}

/// [`transaction`] begun by `begin` (sent as one simple query, so settings local to the
/// transaction cost no round trip of their own) instead of the driver's `BEGIN` when given.
pub(crate) async fn transaction_with<DB, T, F>(
    pool: &sqlx::Pool<DB>,
    begin: Option<&'static str>,
    also: Caller,
    steps: F,
) -> Result<T, StoreError>
where
    DB: sqlx::Database,
    T: Send + 'static,
    F: for<'t> FnOnce(&'t mut sqlx::Transaction<'static, DB>, &'t Caller) -> Steps<'t, T> + Send + 'static,
{
    let pool = pool.clone();
    detached(move |own| async move {
        let caller = Caller::any([&own, &also]);
        caller.check()?;
        let open = || async {
            match begin {
                Some(statement) => pool.begin_with(statement).await,
                None => pool.begin().await,
            }
        };
        let mut tx = match open().await {
            // A pooled connection that died with the database (an outage, a restart) fails its
            // BEGIN and is closed; nothing was done, so the next connection may try. Those put
            // back before now may have died with it: they are pinged before their next use.
            Err(e) if crate::sql::connection_lost(&e) => {
                crate::sql::SQLX_POOLS_LOST.set();
                open().await?
            }
            other => other?,
        };
        let out = steps(&mut tx, &caller).await.and_then(|v| caller.check().map(|()| v));
        match out {
            Ok(v) => {
                tx.commit().await?;
                Ok(v)
            }
            Err(err) => {
                if let Err(rollback) = tx.rollback().await {
                    tracing::warn!(error = %rollback, "rollback failed; the connection is closed");
                }
                Err(err)
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_dropped_caller_is_seen_by_the_work_which_still_runs_to_its_end() {
        let (seen_tx, seen_rx) = tokio::sync::oneshot::channel();
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let call = detached(move |caller| async move {
            let _ = go_rx.await;
            let _ = seen_tx.send(caller.gone());
            caller.check()
        });
        let mut call = Box::pin(call);
        assert!(futures::poll!(call.as_mut()).is_pending());
        drop(call);
        let _ = go_tx.send(());
        assert!(seen_rx.await.unwrap(), "the work saw its caller gone");
    }

    #[tokio::test]
    async fn a_batch_is_gone_when_any_caller_is() {
        let (a_wait, a) = Waiting::start();
        let (_b_wait, b) = Waiting::start();
        let both = Caller::any([&a, &b]);
        assert!(!both.gone());
        drop(a_wait);
        assert!(both.gone() && a.gone() && !b.gone());
        assert!(matches!(both.check(), Err(StoreError::Abandoned)));
        assert!(Caller::default().check().is_ok(), "a caller-less write never counts as abandoned");
    }
}
