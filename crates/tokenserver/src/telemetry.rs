//! Logging: JSON lines by default, human-readable with `human_logs`; level from `RUST_LOG`.
//! Secrets never reach a log line: they are `Secret<T>` and bearer tokens are never logged.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber (once; later calls are ignored).
pub fn init_logging(human: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if human { builder.try_init() } else { builder.json().flatten_event(true).try_init() };
}
