//! What vitals tells its operators: log lines (set up here: `RUST_LOG`-style
//! filtering, text or JSON lines), Prometheus [`metrics`] served by the
//! [`endpoint`], and traces.
//!
//! # Layout
//! - [`metrics`]: every series of a server, registered once, and the
//!   handles the parts of vitals update.
//! - [`endpoint`]: `GET /metrics` on `VITALS_METRICS_ADDR`.

pub mod endpoint;
pub mod metrics;

use tracing_subscriber::{EnvFilter, fmt};

use crate::config::LogFormat;

/// Installs the global subscriber. Lines are lowercase with structured fields.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    // Colours only for a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    // A second init (tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
