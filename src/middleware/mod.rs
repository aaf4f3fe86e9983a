//! The one tower stack in front of every service, built by
//! [`EdgeLayer`]'s `layer` in one place, outermost first:
//!
//! | layer | why here |
//! |---|---|
//! | [request id](request_id) | outermost, so every later layer, the handler and their log lines run in the request's span, and every reply, a refusal too, echoes `x-request-id`; a client's W3C `traceparent` makes that span a child of the client's (when traces are exported) |
//! | [metrics] | outside every layer that refuses, so the gate's, the limit's, the deadline's and the framing's refusals are counted with the handlers' statuses: `grpc_server_*` per method and code, `vitals_errors_total` per ErrorInfo reason |
//! | [auth] | after the request id and the metrics, so a refusal is logged, counted and answered with the request id, and before anything else: a caller without credentials learns nothing of the database's state or the server's load, and takes no slot. With `VITALS_AUTH_FILE`, a business RPC without a known principal is refused with UNAUTHENTICATED, one whose principal lacks the RPC's scope with PERMISSION_DENIED; the handlers get the principal's [`Access`](crate::auth::Access) and check its namespaces |
//! | [readiness gate](readiness) | business RPCs fail fast with UNAVAILABLE while the database is unreachable or the server drains, instead of waiting on dead connections; before the limit, so a refused RPC never holds a slot; health and reflection pass |
//! | [in-flight limit](in_flight) | at most `VITALS_MAX_CONCURRENT_REQUESTS` business RPCs in flight (streams excepted: the lock manager's `VITALS_MAX_LOCKS` bounds WithLock, the feed's `VITALS_MAX_WATCHERS` WatchTransitions); past that RESOURCE_EXHAUSTED at once rather than a queue that hides overload |
//! | [deadline] | unary business RPCs end with DEADLINE_EXCEEDED at the client's `grpc-timeout` or `VITALS_REQUEST_TIMEOUT_MS`, whichever is sooner; inside the limit, so a timed-out RPC frees its slot. The deadline is also handed to the handler ([`RequestDeadline`]), which ends its wait for a system's lock before it with SYSTEM_BUSY |
//! | [message framing](framing) | innermost, so only RPCs that run pay for it: a request message whose declared length exceeds `VITALS_MAX_REQUEST_BYTES` is refused with RESOURCE_EXHAUSTED as soon as its length prefix arrives, a body that ends inside a message with INVALID_ARGUMENT, each with an ErrorInfo |
//!
//! A message that is framed well but is not protobuf is refused with
//! INVALID_ARGUMENT / MALFORMED_REQUEST by the codec that decodes it
//! ([`crate::codec`]), where the decode error is a type rather than text.
//! Refusals are our statuses from the start, so no layer rewrites tonic's
//! statuses after the fact. (grpc.health.v1 and reflection decode with
//! tonic's own codec: bytes sent to them that are not protobuf get tonic's
//! INTERNAL. Their clients are probes and tools sending what they generate;
//! telling that INTERNAL from a real one would take its message text.)
//!
//! A request refused by the gate or the limit has its body read to the end
//! in the background (`refusal.rs`): left unread, the refusals of an outage
//! make h2 tear the client's whole connection down.
//!
//! Streaming RPCs (WatchTransitions, WithLock) are bounded by their own rules
//! (a watch ends when its client goes away, which the server's HTTP/2
//! keep-alive pings detect, or when it falls behind; the lock lease and
//! wait), not by the unary deadline.
//!
//! # Why not tower's own `limit`, `load_shed` and `timeout`
//! - `ConcurrencyLimit` takes its permit in `poll_ready`, before the request
//!   and its path exist, so it cannot leave health, reflection and the
//!   streams out; routing those around it needs a router that polls every
//!   branch ready, which would take a permit for them all the same.
//! - `LoadShed` refuses by dropping the request and failing with
//!   `Overloaded`: the body goes unread (see above), and the error
//!   becomes tonic's RESOURCE_EXHAUSTED without an ErrorInfo.
//! - `Timeout` has one duration per layer, while ours is per request (the
//!   client's `grpc-timeout` when sooner), must skip streams, must reach the
//!   handler as [`RequestDeadline`], and must answer DEADLINE_EXCEEDED with
//!   an ErrorInfo rather than fail with a boxed `Elapsed`.
//!
//! So the limit and the deadline are small layers of their own, and tower
//! contributes the `Layer`/`Service` traits and `ServiceBuilder`.
//!
//! # Cost
//! The stack is on every request. No layer clones the inner service, boxes
//! a future or wraps the reply's body: each layer's future is a named type.
//! The stack's only allocations for a request that runs are a generated
//! request id (when the client sent none) and the auth layer's `Access` and
//! the deadline's request extensions; the request body's wrapper is boxed by
//! tonic's router in place of the body it wraps. The metrics layer wraps the
//! reply's body in a named type (to see the trailers' status), without
//! boxing it.

use std::{sync::Arc, time::Duration};

use tokio::sync::Semaphore;
use tower::{Layer, ServiceBuilder};

use crate::{config::Config, telemetry::metrics::GrpcMetrics};

pub mod auth;
pub mod deadline;
pub mod framing;
pub mod in_flight;
pub mod metrics;
pub mod readiness;
mod refusal;
pub mod request_id;

pub use deadline::RequestDeadline;
pub use readiness::Readiness;
pub use request_id::REQUEST_ID_HEADER;

/// The whole stack over the server's routes `S`, outermost first.
pub type Edge<S> = request_id::RequestId<
    metrics::GrpcMetricsService<
        auth::AuthGate<readiness::ReadinessGate<in_flight::InFlightLimit<deadline::Deadline<framing::Framing<S>>>>>,
    >,
>;

/// Installs the stack (see the module docs) around the server's routes.
#[derive(Debug, Clone)]
pub struct EdgeLayer {
    /// The principals requests are checked against; `None` without an
    /// auth file.
    authenticator: Option<Arc<auth::Authenticator>>,
    /// The gate's state, which the readiness probe and shutdown update.
    readiness: Arc<Readiness>,
    /// The in-flight budget, one for the whole server: every connection's
    /// clone of the stack shares it.
    in_flight: Arc<Semaphore>,
    /// `VITALS_REQUEST_TIMEOUT_MS`.
    request_timeout: Duration,
    /// `VITALS_MAX_REQUEST_BYTES`.
    max_message_bytes: usize,
    /// The server's gRPC series.
    metrics: Arc<GrpcMetrics>,
    /// Whether spans are exported, so that a client's `traceparent` is read.
    traces: bool,
}

impl EdgeLayer {
    /// The stack `config` describes, gated by `readiness`, counting into
    /// `metrics`, checking credentials against `authenticator` when there is
    /// one.
    pub fn new(
        config: &Config,
        readiness: Arc<Readiness>,
        metrics: Arc<GrpcMetrics>,
        authenticator: Option<Arc<auth::Authenticator>>,
    ) -> Self {
        EdgeLayer {
            authenticator,
            metrics,
            traces: config.otlp_endpoint().is_some(),
            readiness,
            in_flight: in_flight::budget(config.max_concurrent_requests),
            request_timeout: config.request_timeout(),
            max_message_bytes: config.max_request_size(),
        }
    }
}

impl<S> Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, routes: S) -> Self::Service {
        ServiceBuilder::new()
            .layer(request_id::RequestIdLayer::new(self.traces))
            .layer(metrics::GrpcMetricsLayer::new(self.metrics.clone()))
            .layer(auth::AuthLayer::new(self.authenticator.clone()))
            .layer(readiness::ReadinessLayer::new(self.readiness.clone()))
            .layer(in_flight::InFlightLimitLayer::new(self.in_flight.clone()))
            .layer(deadline::DeadlineLayer::new(self.request_timeout))
            .layer(framing::FramingLayer::new(self.max_message_bytes))
            .service(routes)
    }
}

/// Paths of our own services, which the gate and the limit apply to.
const BUSINESS_PREFIX: &str = "/vitals.v1.";

/// WithLock: a held or awaited lock, a long-lived stream bounded by the
/// lock manager's own budget (`VITALS_MAX_LOCKS`).
const LOCK_STREAM_PATH: &str = "/vitals.v1.LockService/WithLock";

/// WatchTransitions: a long-lived stream bounded by the feed's own budget
/// (`VITALS_MAX_WATCHERS`).
const WATCH_PATH: &str = "/vitals.v1.HealthCheckService/WatchTransitions";

/// What the layers need to know of an RPC, read from its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rpc {
    /// grpc.health.v1 and reflection: outside the gate, the limit and the
    /// deadline, so probes and tools answer under overload and while the
    /// database is down.
    Infrastructure,
    /// A unary RPC of ours (or an unknown method under our package, which
    /// tonic answers UNIMPLEMENTED).
    Unary,
    /// WatchTransitions.
    Watch,
    /// WithLock.
    WithLock,
}

impl Rpc {
    fn of<B>(request: &http::Request<B>) -> Rpc {
        Rpc::of_path(request.uri().path())
    }

    fn of_path(path: &str) -> Rpc {
        match path {
            LOCK_STREAM_PATH => Rpc::WithLock,
            WATCH_PATH => Rpc::Watch,
            _ if path.starts_with(BUSINESS_PREFIX) => Rpc::Unary,
            _ => Rpc::Infrastructure,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod testing {
    //! Requests, stub services and readers of refusals for the layers' tests.

    use std::{
        convert::Infallible,
        pin::Pin,
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        task::{Context, Poll},
    };

    use bytes::Bytes;
    use http::{Request, Response};
    use tonic::{Code, Status, body::Body};
    use tonic_types::StatusExt;
    use tower::{Service, service_fn};

    pub(super) const SUBMIT_RUN: &str = "/vitals.v1.HealthCheckService/SubmitRun";
    pub(super) const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
    pub(super) const REFLECTION_V1: &str = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
    pub(super) const REFLECTION_V1ALPHA: &str = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";

    /// A request for `path` with an empty body.
    pub(super) fn request(path: &str) -> Request<Body> {
        Request::post(path).body(Body::empty()).unwrap()
    }

    /// A service answering OK at once, and how many calls reached it.
    pub(super) fn answering() -> (
        impl Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone,
        Arc<AtomicUsize>,
    ) {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let service = service_fn(move |_: Request<Body>| {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, Infallible>(ok()) }
        });
        (service, calls)
    }

    /// A reply with `grpc-status: 0`.
    pub(super) fn ok() -> Response<Body> {
        let mut response = Response::new(Body::empty());
        response
            .headers_mut()
            .insert("grpc-status", http::HeaderValue::from_static("0"));
        response
    }

    /// The code and `ErrorInfo.reason` of a trailers-only reply; `OK` and
    /// no reason for a reply that passed.
    pub(super) fn outcome(response: &Response<Body>) -> (Code, Option<String>) {
        let status = Status::from_header_map(response.headers()).expect("a grpc-status");
        let reason = status.get_details_error_info().map(|info| {
            assert_eq!(info.domain, crate::error::ERROR_DOMAIN);
            info.reason
        });
        (status.code(), reason)
    }

    /// The `ErrorInfo.metadata` of a trailers-only reply.
    pub(super) fn metadata(response: &Response<Body>) -> std::collections::HashMap<String, String> {
        let status = Status::from_header_map(response.headers()).expect("a grpc-status");
        status.get_details_error_info().expect("an ErrorInfo").metadata
    }

    /// A request body the test feeds frame by frame; it ends when the
    /// sender is dropped.
    pub(super) struct ChannelBody(pub(super) tokio::sync::mpsc::Receiver<Bytes>);

    impl http_body::Body for ChannelBody {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
            self.0
                .poll_recv(cx)
                .map(|data| data.map(|d| Ok(http_body::Frame::data(d))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{health_check_service_server, lock_service_server};

    #[test]
    fn the_stream_paths_are_the_generated_services_methods() {
        assert_eq!(
            LOCK_STREAM_PATH,
            format!("/{}/WithLock", lock_service_server::SERVICE_NAME)
        );
        assert_eq!(
            WATCH_PATH,
            format!("/{}/WatchTransitions", health_check_service_server::SERVICE_NAME)
        );
        for name in [
            lock_service_server::SERVICE_NAME,
            health_check_service_server::SERVICE_NAME,
        ] {
            assert!(format!("/{name}/").starts_with(BUSINESS_PREFIX), "{name}");
        }
    }

    #[test]
    fn paths_are_classified_for_the_layers() {
        assert_eq!(Rpc::of_path(testing::SUBMIT_RUN), Rpc::Unary);
        assert_eq!(Rpc::of_path("/vitals.v1.HealthCheckService/NoSuchMethod"), Rpc::Unary);
        assert_eq!(Rpc::of_path(LOCK_STREAM_PATH), Rpc::WithLock);
        assert_eq!(Rpc::of_path(WATCH_PATH), Rpc::Watch);
        for path in [
            testing::HEALTH_CHECK,
            "/grpc.health.v1.Health/Watch",
            testing::REFLECTION_V1,
            testing::REFLECTION_V1ALPHA,
            "/vitals.v2.HealthCheckService/SubmitRun",
            "/",
        ] {
            assert_eq!(Rpc::of_path(path), Rpc::Infrastructure, "{path}");
        }
    }
}
