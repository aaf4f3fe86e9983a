//! The request id and the request's tracing span.
//!
//! A request id ties a client's report to our log lines: the client's own
//! `x-request-id` when it is usable, or a generated UUID, is a field of the
//! span every later layer and the handler run in, and is echoed on the reply.
//!
//! That span is also the RPC's span in a trace: when spans are exported, a
//! client's `traceparent` makes it the child of the client's span (see
//! [`crate::telemetry::trace`]).

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
};

use http::{HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};
use tracing::{Instrument, instrument::Instrumented};

/// Header carrying the request id, in and out.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The longest client request id kept; a longer one is replaced.
const MAX_CLIENT_ID: usize = 128;

/// Installs [`RequestId`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestIdLayer {
    traces: bool,
}

impl RequestIdLayer {
    /// `traces`: spans are exported, so a client's `traceparent` is read.
    pub fn new(traces: bool) -> Self {
        RequestIdLayer { traces }
    }
}

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestId<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestId {
            inner,
            traces: self.traces,
        }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct RequestId<S> {
    inner: S,
    /// Whether spans are exported (see [`crate::telemetry::trace`]).
    traces: bool,
}

/// The client's request id, when it is 1 to [`MAX_CLIENT_ID`] visible ASCII
/// characters (a header value may also hold spaces and opaque bytes, which
/// would make a log line ambiguous), or else a fresh UUID.
fn request_id<B>(request: &Request<B>) -> Option<HeaderValue> {
    let usable = |v: &&HeaderValue| {
        let bytes = v.as_bytes();
        !bytes.is_empty() && bytes.len() <= MAX_CLIENT_ID && bytes.iter().all(u8::is_ascii_graphic)
    };
    match request.headers().get(REQUEST_ID_HEADER).filter(usable) {
        Some(id) => Some(id.clone()),
        None => {
            let mut text = [0; uuid::fmt::Hyphenated::LENGTH];
            let text = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text);
            HeaderValue::from_str(text).ok()
        }
    }
}

impl<S, B, ResBody> Service<Request<B>> for RequestId<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = RequestIdFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let id = request_id(&request);
        // The empty fields are filled only when spans are exported, so log
        // lines look the same without traces.
        let span = tracing::info_span!(
            "rpc",
            request_id = id.as_ref().and_then(|id| id.to_str().ok()).unwrap_or_default(),
            path = request.uri().path(),
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
            "otel.name" = tracing::field::Empty,
            "otel.kind" = tracing::field::Empty,
            "rpc.system" = tracing::field::Empty,
            "rpc.service" = tracing::field::Empty,
            "rpc.method" = tracing::field::Empty,
            // Recorded by the auth layer once it knows who calls.
            principal = tracing::field::Empty,
        );
        if self.traces {
            crate::telemetry::trace::continue_trace(&span, request.headers(), request.uri().path());
        }
        // The inner layers' refusals happen in `call`, and log in the span too.
        let inner = span.in_scope(|| self.inner.call(request));
        RequestIdFuture {
            inner: inner.instrument(span),
            id,
        }
    }
}

pin_project! {
    /// [`RequestId`]'s future: the inner one in the request's span, then the
    /// id on the reply.
    #[derive(Debug)]
    pub struct RequestIdFuture<F> {
        #[pin]
        inner: Instrumented<F>,
        id: Option<HeaderValue>,
    }
}

impl<F, ResBody, E> Future for RequestIdFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut output = ready!(this.inner.poll(cx));
        if let (Ok(response), Some(id)) = (&mut output, this.id.take()) {
            response.headers_mut().insert(REQUEST_ID_HEADER, id);
        }
        Poll::Ready(output)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::convert::Infallible;

    use tonic::body::Body;
    use tower::{ServiceExt, service_fn};

    use super::*;
    use crate::middleware::testing::{self, SUBMIT_RUN};

    async fn echoed(request: Request<Body>) -> String {
        let (inner, _) = testing::answering();
        let response = RequestIdLayer::default().layer(inner).oneshot(request).await.unwrap();
        response.headers()[REQUEST_ID_HEADER].to_str().unwrap().to_owned()
    }

    fn with_id(id: &[u8]) -> Request<Body> {
        let mut request = testing::request(SUBMIT_RUN);
        request
            .headers_mut()
            .insert(REQUEST_ID_HEADER, HeaderValue::from_bytes(id).unwrap());
        request
    }

    #[tokio::test]
    async fn a_usable_client_request_id_is_echoed() {
        assert_eq!(echoed(with_id(b"req-123")).await, "req-123");
        let longest = "x".repeat(MAX_CLIENT_ID);
        assert_eq!(echoed(with_id(longest.as_bytes())).await, longest);
    }

    #[tokio::test]
    async fn a_missing_or_unusable_request_id_is_replaced_by_a_fresh_uuid() {
        let too_long = "x".repeat(MAX_CLIENT_ID + 1);
        let mut seen = std::collections::HashSet::new();
        for request in [
            testing::request(SUBMIT_RUN),
            with_id(b""),
            with_id(b"has space"),
            with_id(b"tab\there"),
            with_id(too_long.as_bytes()),
            with_id(&[b'a', 0xe9]),
        ] {
            let id = echoed(request).await;
            let uuid = uuid::Uuid::parse_str(&id).expect("a generated UUID");
            assert_eq!(uuid.get_version(), Some(uuid::Version::Random));
            assert_eq!(id, uuid.hyphenated().to_string(), "lowercase and hyphenated");
            assert!(seen.insert(id), "a fresh id per request");
        }
    }

    #[tokio::test]
    async fn an_inner_refusal_carries_the_id_too() {
        let refusing =
            service_fn(|_: Request<Body>| async { Ok::<_, Infallible>(tonic::Status::unavailable("no").into_http()) });
        let response = RequestIdLayer::default()
            .layer(refusing)
            .oneshot(with_id(b"req-err"))
            .await
            .unwrap();
        assert_eq!(response.headers()[REQUEST_ID_HEADER], "req-err");
        assert_eq!(testing::outcome(&response).0, tonic::Code::Unavailable);
    }

    #[tokio::test]
    async fn the_inner_call_and_its_future_run_in_the_request_span() {
        let _subscriber = tracing::subscriber::set_default(tracing_subscriber::registry());
        let span_name = || tracing::Span::current().metadata().map(|m| m.name());
        let inner = service_fn(move |_: Request<Body>| {
            let in_call = span_name();
            async move {
                assert_eq!(in_call, Some("rpc"), "the inner call");
                assert_eq!(span_name(), Some("rpc"), "the inner future");
                Ok::<_, Infallible>(testing::ok())
            }
        });
        let response = RequestIdLayer::default()
            .layer(inner)
            .oneshot(with_id(b"req-span"))
            .await
            .unwrap();
        assert_eq!(response.headers()[REQUEST_ID_HEADER], "req-span");
        assert_eq!(span_name(), None, "the span ends with the request");
    }
}
