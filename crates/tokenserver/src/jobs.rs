//! Background jobs of `serve`: the periodic purges of expired sessions and access tokens.

use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokenserver_store::StoreError;

/// Every `every`, runs `purge` on what `owner` still points to, until it is dropped. `what`
/// names the records in logs and in the metric `tokenserver_<what>_purged_total`.
pub fn spawn_purge<T, F, Fut>(owner: &Arc<T>, every: Duration, what: &'static str, purge: F)
where
    T: Send + Sync + 'static,
    F: Fn(Arc<T>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<u64, StoreError>> + Send,
{
    let owner: Weak<T> = Arc::downgrade(owner);
    let purged = metrics::counter!(format!("tokenserver_{what}_purged_total"));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(target) = owner.upgrade() else { return };
            match purge(target).await {
                Ok(0) => tracing::trace!(what, "PURGED: nothing"),
                Ok(n) => {
                    purged.increment(n);
                    tracing::debug!(what, purged = n, "PURGED: expired records removed");
                }
                Err(e) => tracing::error!(what, error = %e, "PURGE failed"),
            }
        }
    });
}
