//! Traces: vitals' `tracing` spans exported over OTLP/gRPC when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, so a slow request shows where its
//! time went (the RPC, its wait for a lock, its work transaction and the
//! statements in it) inside the trace of the client that sent it.
//!
//! Unset, nothing here runs: no exporter, no span layer, and the child spans
//! (at debug level) are disabled at their call sites, which is what keeps
//! them free on the lock grant path.
//!
//! A client's W3C `traceparent` (and `tracestate`) header makes the RPC's
//! span a child of the client's span ([`continue_trace`], called by the
//! request-id layer, which creates the RPC's span). The RPC span's trace and
//! span ids are also fields of that span, so every log line of the request
//! carries them (in JSON lines, under `span`), which joins logs to traces.

use std::time::Duration;

use http::HeaderMap;
use opentelemetry::{
    KeyValue,
    propagation::{Extractor, TextMapPropagator},
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing::Subscriber;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{EnvFilter, Layer, registry::LookupSpan};

/// Which spans and events are exported: vitals' own down to debug (the
/// child spans), the statements sqlx logs (as events of the span they ran
/// in), and nothing of the crates that carry the export itself, whose spans
/// would otherwise be exported by the export, and so on.
const SPAN_FILTER: &str = "info,vitals=debug,sqlx=warn,sqlx::query=debug,h2=off,hyper=off,hyper_util=off,\
                           tonic=off,tower=off,opentelemetry=off,opentelemetry_sdk=off,opentelemetry_otlp=off";

/// How long exiting waits for the last spans to be sent.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(5);

/// Why spans cannot be exported.
#[derive(Debug, thiserror::Error)]
#[error("OTEL_EXPORTER_OTLP_ENDPOINT: {0}")]
pub struct ExportError(#[from] opentelemetry_otlp::ExporterBuildError);

/// The OTLP exporter: spans are batched and sent in the background (every
/// `OTEL_BSP_SCHEDULE_DELAY` ms, 5 s by default); [`Exporter::shutdown`]
/// sends what is left.
#[derive(Debug)]
pub struct Exporter {
    provider: SdkTracerProvider,
}

impl Exporter {
    /// Starts exporting to `endpoint` (`http://host:4317`) and returns the
    /// layer that hands spans to it. Must run inside the Tokio runtime: the
    /// gRPC channel lives there.
    pub fn start<S>(endpoint: &str) -> Result<(Exporter, impl Layer<S> + Send + Sync + 'static), ExportError>
    where
        S: Subscriber + for<'span> LookupSpan<'span> + Send + Sync,
    {
        let exporter = SpanExporter::builder().with_tonic().with_endpoint(endpoint).build()?;
        let mut resource = Resource::builder();
        // OTEL_SERVICE_NAME, when set, names the service; the SDK reads it.
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name("vitals");
        }
        let resource = resource
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        let layer = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("vitals"))
            .with_filter(EnvFilter::new(SPAN_FILTER));
        Ok((Exporter { provider }, layer))
    }

    /// Sends the spans not exported yet, waiting at most `SHUTDOWN_LIMIT`.
    pub async fn shutdown(self) {
        let provider = self.provider;
        // The SDK blocks while it flushes; the runtime must stay free to
        // carry the gRPC request.
        let flushed = tokio::task::spawn_blocking(move || provider.shutdown());
        match tokio::time::timeout(SHUTDOWN_LIMIT, flushed).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(err))) => eprintln!("vitals: the last spans were not exported: {err}"),
            Ok(Err(_)) | Err(_) => eprintln!("vitals: the last spans were not exported in time"),
        }
    }
}

/// Reads W3C trace context from request headers.
struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Makes `span`, the RPC's span, a server span named after the method, the
/// child of the client's span when `headers` carry a `traceparent`, and
/// records its trace and span ids as its fields (for the log lines).
pub fn continue_trace(span: &tracing::Span, headers: &HeaderMap, path: &str) {
    let parent = TraceContextPropagator::new().extract(&Headers(headers));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
    let method = path.strip_prefix('/').unwrap_or(path);
    span.record("otel.name", method);
    span.record("otel.kind", "server");
    span.record("rpc.system", "grpc");
    if let Some((service, name)) = method.split_once('/') {
        span.record("rpc.service", service);
        span.record("rpc.method", name);
    }
    let context = span.context();
    let own = context.span().span_context().clone();
    if own.is_valid() {
        span.record("trace_id", tracing::field::display(own.trace_id()));
        span.record("span_id", tracing::field::display(own.span_id()));
    }
}
