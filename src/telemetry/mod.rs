//! What vitals tells its operators: log lines (set up here: `RUST_LOG`-style
//! filtering, text or JSON lines), Prometheus [`metrics`] served by the
//! [`endpoint`], and [`trace`]s.
//!
//! # Layout
//! - [`metrics`]: every series of a server, registered once, and the
//!   handles the parts of vitals update.
//! - [`endpoint`]: `GET /metrics` on `VITALS_METRICS_ADDR`.
//! - [`trace`]: spans over OTLP, and a client's W3C `traceparent` continued.

pub mod endpoint;
pub mod metrics;
pub mod trace;

use tracing_subscriber::{EnvFilter, Layer, fmt, layer::SubscriberExt, util::SubscriberInitExt};

use crate::config::{Config, LogFormat};

/// What [`init`] set up that must be flushed at exit.
#[derive(Debug)]
#[must_use = "dropping the telemetry without shutting it down loses the last spans"]
pub struct Telemetry {
    traces: Option<trace::Exporter>,
}

impl Telemetry {
    /// Sends the spans not exported yet (bounded; see [`trace::Exporter`]).
    pub async fn shutdown(self) {
        if let Some(traces) = self.traces {
            traces.shutdown().await;
        }
    }
}

/// Installs the global subscriber: log lines (lowercase, with structured
/// fields) filtered by `RUST_LOG`, and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is
/// set, spans exported over OTLP with a filter of their own (so traces do not
/// depend on the log level, and vitals' debug-level child spans cost nothing
/// without an exporter: no layer asks for them).
pub fn init(config: &Config) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    // Colours only for a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = match config.log_format {
        LogFormat::Text => fmt::layer().with_writer(std::io::stderr).with_ansi(ansi).boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .boxed(),
    }
    .with_filter(filter);
    let logged = tracing_subscriber::registry().with(logs);
    let (exporter, spans) = match config.otlp_endpoint().map(trace::Exporter::start) {
        Some(Ok((exporter, layer))) => (Some(exporter), Some(layer)),
        Some(Err(err)) => {
            eprintln!("vitals: traces are not exported: {err}");
            (None, None)
        }
        None => (None, None),
    };
    // A second init (tests) keeps the first subscriber.
    let _ = logged.with(spans).try_init();
    if let Some(endpoint) = config.otlp_endpoint().filter(|_| exporter.is_some()) {
        tracing::info!(endpoint, "exporting spans over OTLP");
    }
    Telemetry { traces: exporter }
}
