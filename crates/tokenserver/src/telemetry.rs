//! Logging and the metrics recorder. Logs: JSON lines by default, human-readable with `human_logs`; level from `RUST_LOG`.
//! Lines are written by a background thread (a request never waits on a `write` to stderr).
//! Secrets never reach a log line: they are `Secret<T>` and bearer tokens are never logged.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing::{Event, Subscriber};
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber (once; later calls are ignored). Keep the guard alive until
/// exit: dropping it flushes the pending lines.
pub fn init_logging(human: bool) -> Option<WorkerGuard> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    // Colours only for a terminal: a file, a pipe or journald would get the escape codes verbatim.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_ansi(ansi);
    let installed = if human {
        builder.event_format(WithRequestId(format::Format::default())).try_init()
    } else {
        builder.json().event_format(WithRequestId(format::Format::default().json().flatten_event(true))).try_init()
    };
    installed.ok().map(|()| guard)
}

/// An event format that names the request being served ([`crate::http::observe`]): a JSON line
/// gets `"rid"` as its first member, a human line starts with `rid=…`.
struct WithRequestId<F>(F);

impl<S, N> FormatEvent<S, N> for WithRequestId<format::Format<format::Json>>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    format::Format<format::Json>: FormatEvent<S, N>,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        let Some(rid) = crate::http::observe::current_request_id() else {
            return self.0.format_event(ctx, writer, event);
        };
        // The id is plain ([A-Za-z0-9._-], checked where it is taken): no escaping needed.
        let mut line = String::with_capacity(256);
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => write!(writer, "{{\"rid\":\"{rid}\",{rest}"),
            None => writer.write_str(&line),
        }
    }
}

impl<S, N> FormatEvent<S, N> for WithRequestId<format::Format<format::Full>>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    format::Format<format::Full>: FormatEvent<S, N>,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        if let Some(rid) = crate::http::observe::current_request_id() {
            write!(writer, "rid={rid} ")?;
        }
        self.0.format_event(ctx, writer, event)
    }
}

/// The process-wide Prometheus recorder (installed on first use).
pub fn metrics_handle() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(crate::http::observe::DURATION_METRIC.to_string()),
                    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
                )
                .unwrap_or_else(|_| PrometheusBuilder::new());
            builder.install_recorder().ok()
        })
        .clone()
}

/// A family's `{metric}{op, outcome}` counters, registered once: building a labelled key per call
/// allocated on every request, and registering up front shows every series, at 0, from the start.
pub struct OpCounters(foldhash::HashMap<(&'static str, &'static str), metrics::Counter>);

impl OpCounters {
    /// Registers `metric` for every `(op, outcomes)` pair.
    pub fn register(metric: &'static str, outcomes: &[(&'static str, &[&'static str])]) -> Self {
        // The recorder must be in place before handles are taken (a handle taken earlier counts nothing).
        let _ = metrics_handle();
        let mut map = foldhash::HashMap::default();
        for (op, outcomes) in outcomes {
            for outcome in *outcomes {
                map.insert((*op, *outcome), metrics::counter!(metric, "op" => *op, "outcome" => *outcome));
            }
        }
        Self(map)
    }

    /// Counts one `op` that ended in `outcome` (a pair not registered is not counted).
    pub fn count(&self, op: &'static str, outcome: &'static str) {
        if let Some(counter) = self.0.get(&(op, outcome)) {
            counter.increment(1);
        }
    }
}

impl std::fmt::Debug for OpCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpCounters").field("series", &self.0.len()).finish()
    }
}
