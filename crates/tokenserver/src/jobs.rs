//! Background jobs of `serve`: the periodic purges of expired sessions and access tokens, and of
//! old Sync records.

use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokenserver_store::StoreError;

use crate::config::PurgeConfig;
use crate::ops::purge::{PurgeOptions, Purger};

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

/// Runs a Sync purge pass (see [`crate::ops::purge`]) every `cfg.interval` ±30%, until `purger`
/// is dropped. The jitter keeps several web heads from purging in step.
pub fn spawn_sync_purge(purger: &Arc<Purger>, cfg: &PurgeConfig) {
    let owner: Weak<Purger> = Arc::downgrade(purger);
    let opts = PurgeOptions {
        grace_period: cfg.grace_period,
        batch_size: i64::from(cfg.batch_size),
        max_records: cfg.max_records,
        request_timeout: cfg.request_timeout,
        ..PurgeOptions::default()
    };
    let interval = cfg.interval;
    tokio::spawn(async move {
        loop {
            let factor = rand::random_range(0.7..=1.3);
            tokio::time::sleep(interval.mul_f64(factor)).await;
            let Some(purger) = owner.upgrade() else { return };
            match purger.run(&opts, |_| {}).await {
                Ok(r) => tracing::info!(
                    examined = r.examined,
                    deleted = r.deleted,
                    data_deleted = r.data_deleted,
                    skipped_downed = r.skipped_downed,
                    failed = r.failed,
                    "purge of old Sync records done"
                ),
                Err(e) => tracing::error!(error = %e, "purge of old Sync records failed"),
            }
        }
    });
}
