//! The one tower stack in front of every service, outermost first.
//!
//! | layer | why here |
//! |---|---|
//! | request id | first, so every later log line of the request carries it, and the reply echoes it |
//! | readiness gate | business RPCs fail fast with UNAVAILABLE while the database is unreachable or the server drains, instead of waiting on dead connections; health and reflection pass |
//! | load shedding | at most `VITALS_MAX_CONCURRENT_REQUESTS` business RPCs in flight; past that RESOURCE_EXHAUSTED at once rather than a queue that hides overload |
//! | status normalisation | tonic reports an oversized message as OUT_OF_RANGE and an undecodable one as INTERNAL; clients get RESOURCE_EXHAUSTED and INVALID_ARGUMENT, the codes of their mistake |
//!
//! Deadlines are tonic's own `timeout` (it honours `grpc-timeout` and caps it
//! with `VITALS_REQUEST_TIMEOUT_MS`); it bounds the handler, so streams are
//! bounded by their own rules once they are open.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use futures::future::BoxFuture;
use http::{HeaderValue, Request, Response};
use tokio::sync::Semaphore;
use tonic::{Code, Status, body::Body};
use tower::{Layer, Service};
use tracing::Instrument;

use crate::error::Error;

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
}

impl Edge {
    /// An edge admitting `max_concurrent` business RPCs, not yet ready.
    pub fn new(max_concurrent: u32) -> Arc<Self> {
        Arc::new(Edge {
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            in_flight: Arc::new(Semaphore::new(usize::try_from(max_concurrent).unwrap_or(1024))),
        })
    }

    /// Records whether both pools answer.
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

    fn admit(&self) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, Status> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(Error::ShuttingDown.into());
        }
        if !self.is_ready() {
            return Err(Error::DatabaseUnavailable(None).into());
        }
        match self.in_flight.clone().try_acquire_owned() {
            Ok(permit) => Ok(Some(permit)),
            Err(_) => Err(overloaded()),
        }
    }
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
    let message = headers.get("grpc-message").and_then(|v| v.to_str().ok()).unwrap_or("");
    let replacement = match code.map(Code::from) {
        Some(Code::OutOfRange) if message.contains("message length too large") => Some((
            Code::ResourceExhausted,
            "request message larger than the server accepts",
        )),
        Some(Code::Internal) if message.contains("decode") => Some((
            Code::InvalidArgument,
            "request message is not a valid protobuf encoding",
        )),
        _ => None,
    };
    if let Some((code, message)) = replacement {
        headers.insert("grpc-status", HeaderValue::from(code as i32));
        headers.insert("grpc-message", HeaderValue::from_static(message));
        headers.remove("grpc-status-details-bin");
    }
}

impl<S, B> Service<Request<B>> for EdgeService<S>
where
    S: Service<Request<B>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // The ready clone serves this call; the fresh clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let id = request_id(&req);
        let path = req.uri().path().to_owned();
        let span = tracing::info_span!("rpc", request_id = %id, path = %path);
        let header = HeaderValue::from_str(&id).ok();
        let business = path.starts_with(BUSINESS_PREFIX);
        let permit = if business {
            match self.edge.admit() {
                Ok(permit) => permit,
                Err(status) => {
                    let _entered = span.enter();
                    tracing::debug!(code = ?status.code(), "request refused at the edge");
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
                let mut response = inner.call(req).await?;
                drop(permit);
                normalise(response.headers_mut());
                if let Some(h) = header {
                    response.headers_mut().insert(REQUEST_ID_HEADER, h);
                }
                Ok(response)
            }
            .instrument(span),
        )
    }
}
