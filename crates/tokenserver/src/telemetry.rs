//! Logging and the metrics recorder. Logs: JSON lines by default, human-readable with `human_logs`; level from `RUST_LOG`.
//! Lines are written by a background thread (a request never waits on a `write` to stderr).
//! Secrets never reach a log line: they are `Secret<T>` and bearer tokens are never logged.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber (once; later calls are ignored). Keep the guard alive until
/// exit: dropping it flushes the pending lines.
pub fn init_logging(human: bool) -> Option<WorkerGuard> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    let installed = if human { builder.try_init() } else { builder.json().flatten_event(true).try_init() };
    installed.ok().map(|()| guard)
}

/// The process-wide Prometheus recorder (installed on first use).
pub fn metrics_handle() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE.get_or_init(|| PrometheusBuilder::new().install_recorder().ok()).clone()
}
