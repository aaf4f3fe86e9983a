//! The one tower stack in front of every service, outermost first.
//!
//! | layer | why here |
//! |---|---|
//! | request id | first, so every later log line of the request carries it, and the reply echoes it |
//! | readiness gate | business RPCs fail fast with UNAVAILABLE while the database is unreachable or the server drains, instead of waiting on dead connections; health and reflection pass |
//! | load shedding | at most `VITALS_MAX_CONCURRENT_REQUESTS` business RPCs in flight (streams excepted: the lock manager's `VITALS_MAX_LOCKS` bounds WithLock, the feed's `VITALS_MAX_WATCHERS` WatchTransitions); past that RESOURCE_EXHAUSTED at once rather than a queue that hides overload |
//! | deadline | unary business RPCs end with DEADLINE_EXCEEDED at the client's `grpc-timeout` or `VITALS_REQUEST_TIMEOUT_MS`, whichever is sooner; inside the shedding so a timed-out request frees its slot. The deadline is also handed to the handler ([`RequestDeadline`]), which ends its wait for a system's lock before it with SYSTEM_BUSY |
//! | status normalisation | tonic reports an oversized message as OUT_OF_RANGE and an undecodable one as INTERNAL; clients get RESOURCE_EXHAUSTED and INVALID_ARGUMENT, the codes of their mistake, with an ErrorInfo like every other error |
//!
//! A request refused by the gate or the shedding has its body read to the
//! end in the background (`drain`): left unread, the refusals of an outage
//! make h2 tear the client's whole connection down.
//!
//! Streaming RPCs (WatchTransitions, WithLock) are bounded by their own rules
//! (a watch ends when its client goes away, which the server's HTTP/2
//! keep-alive pings detect, or when it falls behind; the lock lease and
//! wait), not by the unary deadline.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures::future::BoxFuture;
use http::{HeaderValue, Request, Response};
use tokio::sync::Semaphore;
use tonic::{Code, Status, body::Body};
use tower::{Layer, Service};
use tracing::Instrument;

use crate::error::Error;

/// When a unary business RPC's deadline passes, in the request's extensions
/// for its handler: a handler that waits (for a system's lock) ends its wait
/// in time to answer with its own, retryable status instead of being cut off
/// by this layer's DEADLINE_EXCEEDED.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestDeadline(pub tokio::time::Instant);

impl RequestDeadline {
    /// The deadline this layer set on `request`, if it bounds the RPC.
    pub fn of<T>(request: &tonic::Request<T>) -> Option<tokio::time::Instant> {
        request.extensions().get::<RequestDeadline>().map(|d| d.0)
    }
}

/// Header carrying the request id, in and out.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Paths of the services the gate and the limit apply to.
const BUSINESS_PREFIX: &str = "/vitals.v1.";

/// Shared state of the edge: readiness and the in-flight budget.
#[derive(Debug)]
pub struct Edge {
    ready: AtomicBool,
    draining: AtomicBool,
    in_flight: Arc<Semaphore>,
    default_deadline: Duration,
}

impl Edge {
    /// An edge admitting `max_concurrent` business RPCs, each unary one
    /// bounded by `default_deadline` at most; not yet ready.
    pub fn new(max_concurrent: u32, default_deadline: Duration) -> Arc<Self> {
        Arc::new(Edge {
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            in_flight: Arc::new(Semaphore::new(usize::try_from(max_concurrent).unwrap_or(1024))),
            default_deadline,
        })
    }

    /// Records whether the database answers (the readiness check's verdict).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Whether business RPCs are admitted.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// From now on business RPCs are refused with SHUTTING_DOWN.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Admits a business RPC. `metered`: it takes a place in the in-flight
    /// budget (streams have their own: `VITALS_MAX_LOCKS`, `VITALS_MAX_WATCHERS`).
    fn admit(&self, metered: bool) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, Status> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(Error::ShuttingDown.into());
        }
        if !self.is_ready() {
            return Err(Error::DatabaseUnavailable(None).into());
        }
        if !metered {
            return Ok(None);
        }
        match self.in_flight.clone().try_acquire_owned() {
            Ok(permit) => Ok(Some(permit)),
            Err(_) => Err(overloaded()),
        }
    }
}

/// How long the body of a request refused at the edge is read after the
/// refusal (see [`drain`]).
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// Reads and discards the body of a request refused before any handler ran,
/// in the background, until it ends or [`DRAIN_LIMIT`] passes.
///
/// The refusal answers on the request's headers, so its DATA frames may
/// arrive after the body was dropped. h2 charges every small DATA frame
/// against a per-connection budget (512 KiB with hyper's 1 MiB connection
/// window) and refunds the charge when the frame is read, but not for a frame
/// that arrives for a dropped body on a stream h2 has reset and still
/// remembers (the last 50 streams, for a second; h2 0.4.20). Refused unary
/// calls whose one-frame bodies arrive after their refusal exhaust it in
/// about 45 s of refusals at 50 a second or more, as during a database
/// outage under load; a refused streaming call's messages much sooner. h2
/// then ends the client's whole connection with GOAWAY ENHANCE_YOUR_CALM,
/// failing every call on it with a transport error instead of the refusal's
/// status. Holding the body until the client ends it keeps its frames read
/// and refunded.
fn drain<B>(body: B)
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    tokio::spawn(async move {
        let mut body = std::pin::pin!(body);
        let read_all =
            async { while let Some(Ok(_)) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {} };
        let _ = tokio::time::timeout(DRAIN_LIMIT, read_all).await;
    });
}

/// Paths of streaming RPCs, which the unary deadline does not bound and which
/// take no place among the in-flight RPCs: a held or awaited lock and a watch
/// are long-lived streams bounded by their own budgets (`VITALS_MAX_LOCKS`,
/// `VITALS_MAX_WATCHERS`); a few thousand of them would otherwise shed every
/// other client's calls.
const STREAMING_PATHS: [&str; 2] = [
    "/vitals.v1.HealthCheckService/WatchTransitions",
    "/vitals.v1.LockService/WithLock",
];

/// Parses a `grpc-timeout` header value: up to 8 digits and a unit.
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at_checked(value.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn deadline_exceeded(after: Duration) -> Status {
    use tonic_types::{ErrorDetails, StatusExt};
    let details = ErrorDetails::with_error_info(
        "DEADLINE_EXCEEDED",
        crate::error::ERROR_DOMAIN,
        std::collections::HashMap::from([("deadline_ms".to_owned(), after.as_millis().to_string())]),
    );
    Status::with_error_details(Code::DeadlineExceeded, "deadline exceeded", details)
}

fn overloaded() -> Status {
    use tonic_types::{ErrorDetails, StatusExt};
    let details = ErrorDetails::with_error_info(
        "OVERLOADED",
        crate::error::ERROR_DOMAIN,
        std::collections::HashMap::new(),
    );
    Status::with_error_details(
        Code::ResourceExhausted,
        "too many requests in flight, retry later",
        details,
    )
}

/// Installs [`EdgeService`] around the server's routes.
#[derive(Debug, Clone)]
pub struct EdgeLayer {
    edge: Arc<Edge>,
}

impl EdgeLayer {
    /// The layer over `edge`.
    pub fn new(edge: Arc<Edge>) -> Self {
        EdgeLayer { edge }
    }
}

impl<S> Layer<S> for EdgeLayer {
    type Service = EdgeService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        EdgeService {
            inner,
            edge: self.edge.clone(),
        }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct EdgeService<S> {
    inner: S,
    edge: Arc<Edge>,
}

fn request_id<B>(req: &Request<B>) -> String {
    req.headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.chars().all(|c| c.is_ascii_graphic()))
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned)
}

/// Rewrites tonic's codes for client mistakes in the message framing.
fn normalise(headers: &mut http::HeaderMap) {
    let code = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok());
    // grpc-message is percent-encoded on the wire.
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .replace("%20", " ");
    let replacement = match code.map(Code::from) {
        Some(Code::OutOfRange) if message.contains("message length too large") => Some((
            Code::ResourceExhausted,
            "request message larger than the server accepts",
            "REQUEST_TOO_LARGE",
        )),
        Some(Code::Internal) if message.contains("decode") => Some((
            Code::InvalidArgument,
            "request message is not a valid protobuf encoding",
            "MALFORMED_REQUEST",
        )),
        _ => None,
    };
    if let Some((code, message, reason)) = replacement {
        use tonic_types::{ErrorDetails, StatusExt};
        // The same ErrorInfo as every other error, in place of tonic's status.
        let details =
            ErrorDetails::with_error_info(reason, crate::error::ERROR_DOMAIN, std::collections::HashMap::new());
        let status = Status::with_error_details(code, message, details);
        for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
            headers.remove(name);
        }
        if status.add_header(headers).is_err() {
            // Only invalid header values fail, and these are fixed ASCII.
            headers.insert("grpc-status", HeaderValue::from(code as i32));
            headers.insert("grpc-message", HeaderValue::from_static(message));
        }
    }
}

/// A response body whose trailers pass through [`normalise`].
struct NormaliseTrailers {
    inner: Body,
}

impl http_body::Body for NormaliseTrailers {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_trailers() {
                    Ok(mut trailers) => {
                        normalise(&mut trailers);
                        http_body::Frame::trailers(trailers)
                    }
                    Err(frame) => frame,
                };
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<S, B> Service<Request<B>> for EdgeService<S>
where
    S: Service<Request<B>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        // The ready clone serves this call; the fresh clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let id = request_id(&req);
        let path = req.uri().path().to_owned();
        let span = tracing::info_span!("rpc", request_id = %id, path = %path);
        let header = HeaderValue::from_str(&id).ok();
        let business = path.starts_with(BUSINESS_PREFIX);
        let streaming = STREAMING_PATHS.contains(&path.as_str());
        let deadline = (business && !streaming).then(|| {
            let asked = req
                .headers()
                .get("grpc-timeout")
                .and_then(|v| v.to_str().ok())
                .and_then(parse_grpc_timeout);
            let after = asked.map_or(self.edge.default_deadline, |d| d.min(self.edge.default_deadline));
            (after, tokio::time::Instant::now() + after)
        });
        if let Some((_, at)) = deadline {
            req.extensions_mut().insert(RequestDeadline(at));
        }
        let permit = if business {
            match self.edge.admit(!streaming) {
                Ok(permit) => permit,
                Err(status) => {
                    let _entered = span.enter();
                    tracing::debug!(code = ?status.code(), "request refused at the edge");
                    drain(req.into_body());
                    let mut response: Response<Body> = status.into_http();
                    if let Some(h) = header {
                        response.headers_mut().insert(REQUEST_ID_HEADER, h);
                    }
                    return Box::pin(async move { Ok(response) });
                }
            }
        } else {
            None
        };
        Box::pin(
            async move {
                let call = inner.call(req);
                let mut response = match deadline {
                    None => call.await?,
                    Some((after, at)) => match tokio::time::timeout_at(at, call).await {
                        Ok(response) => response?,
                        Err(_) => {
                            tracing::debug!(?after, "deadline exceeded");
                            deadline_exceeded(after).into_http()
                        }
                    },
                };
                drop(permit);
                normalise(response.headers_mut());
                // Errors raised while the request streams in (an oversized
                // message) arrive in the trailers, so those are normalised too.
                let mut response = response.map(|body| Body::new(NormaliseTrailers { inner: body }));
                if let Some(h) = header {
                    response.headers_mut().insert(REQUEST_ID_HEADER, h);
                }
                Ok(response)
            }
            .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit_and_garbage_is_ignored() {
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("9n"), Some(Duration::from_nanos(9)));
        for bad in ["", "m", "123456789m", "10x", "-1S", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }
}
