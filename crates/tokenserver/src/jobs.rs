//! Background jobs of `serve`: the periodic purges of expired sessions and access tokens, and of
//! old Sync records.

use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::watch;

use tokenserver_store::StoreError;

use crate::config::PurgeConfig;
use crate::ops::purge::{PurgeOptions, Purger};

/// The background jobs of one server, stopped together at shutdown.
#[derive(Debug)]
pub struct Jobs {
    stop: watch::Sender<bool>,
    running: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Default for Jobs {
    fn default() -> Self {
        Self { stop: watch::Sender::new(false), running: std::sync::Mutex::new(Vec::new()) }
    }
}

impl Jobs {
    /// Runs `job` until it returns or [`Jobs::stop`] is called. Stopping drops it where it
    /// waits: every store call it makes is atomic on its own (`tokenserver_store::caller`), so
    /// a job cut short leaves whole rows.
    pub fn spawn(&self, job: impl Future<Output = ()> + Send + 'static) {
        let mut stop = self.stop.subscribe();
        let handle = tokio::spawn(async move {
            tokio::select! {
                () = job => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        });
        if let Ok(mut running) = self.running.lock() {
            running.push(handle);
        }
    }

    /// Stops every job and waits until each has.
    pub async fn stop(&self) {
        let _ = self.stop.send(true);
        let handles = self.running.lock().map(|mut r| std::mem::take(&mut *r)).unwrap_or_default();
        for handle in handles {
            let _ = handle.await;
        }
    }
}

/// Every `every`, runs `purge` on what `owner` still points to, until it is dropped. `what`
/// names the records in logs and in the metric `tokenserver_<what>_purged_total`.
pub fn spawn_purge<T, F, Fut>(jobs: &Jobs, owner: &Arc<T>, every: Duration, what: &'static str, purge: F)
where
    T: Send + Sync + 'static,
    F: Fn(Arc<T>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<u64, StoreError>> + Send,
{
    let owner: Weak<T> = Arc::downgrade(owner);
    let purged = metrics::counter!(format!("tokenserver_{what}_purged_total"));
    jobs.spawn(async move {
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
pub fn spawn_sync_purge(jobs: &Jobs, purger: &Arc<Purger>, cfg: &PurgeConfig) {
    let owner: Weak<Purger> = Arc::downgrade(purger);
    let opts = PurgeOptions {
        grace_period: cfg.grace_period,
        batch_size: i64::from(cfg.batch_size),
        max_records: cfg.max_records,
        request_timeout: cfg.request_timeout,
        ..PurgeOptions::default()
    };
    let interval = cfg.interval;
    jobs.spawn(async move {
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
