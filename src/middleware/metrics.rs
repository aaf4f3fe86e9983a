//! gRPC server metrics, named and labelled as go-grpc-prometheus names them
//! (`grpc_server_started_total`, `grpc_server_handled_total`,
//! `grpc_server_handling_seconds`), so dashboards and alerts written for Go
//! and Java gRPC servers read vitals alike; and `vitals_errors_total` by the
//! ErrorInfo reason of every error status sent.
//!
//! Counted from what leaves the server, not from where statuses are built:
//! a status is built in a handler, in a layer that refuses (the gate, the
//! limit, the deadline, the framing), in a stream's poll or in a task a
//! handler spawned, but every one of them is sent through here, once. The
//! status is in the reply's headers (a refusal, a unary error: trailers-only)
//! or in its trailers (everything else), so the reply's body is wrapped to
//! see them. A reply whose body is dropped before its trailers (the client
//! cancelled or went away) counts as `Canceled`.
//!
//! Cost of a request: a lookup of its path, two clock reads, three atomic
//! updates, and a clone of the table's `Arc`. Only an error reply decodes
//! its details, for the reason.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use http::{HeaderMap, Request, Response};
use pin_project_lite::pin_project;
use tonic::{Code, Status};
use tonic_types::StatusExt;
use tower::{Layer, Service};

use crate::{
    error::ERROR_DOMAIN,
    telemetry::metrics::{GrpcMetrics, RpcCall},
};

/// Installs [`GrpcMetricsService`].
#[derive(Debug, Clone)]
pub struct GrpcMetricsLayer {
    metrics: Arc<GrpcMetrics>,
}

impl GrpcMetricsLayer {
    /// Counts into `metrics`.
    pub fn new(metrics: Arc<GrpcMetrics>) -> Self {
        GrpcMetricsLayer { metrics }
    }
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: Arc<GrpcMetrics>,
}

impl<S, B, ResBody> Service<Request<B>> for GrpcMetricsService<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
{
    type Response = Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = MeteredFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let call = self.metrics.start(request.uri().path());
        MeteredFuture {
            inner: self.inner.call(request),
            tally: Some(Tally {
                metrics: self.metrics.clone(),
                call,
                done: false,
            }),
        }
    }
}

/// One RPC's figures until its status is known. Dropped before that, the
/// RPC counts as cancelled.
#[derive(Debug)]
struct Tally {
    metrics: Arc<GrpcMetrics>,
    call: RpcCall,
    done: bool,
}

impl Tally {
    /// The RPC ended with the status in `headers` (the reply's headers or
    /// trailers; none there: `Unknown`).
    fn finish_with(&mut self, headers: &HeaderMap) {
        let code = grpc_code(headers).unwrap_or(Code::Unknown);
        if !self.done
            && code != Code::Ok
            && let Some(status) = Status::from_header_map(headers)
            && let Some(info) = status.get_details_error_info()
            && info.domain == ERROR_DOMAIN
        {
            self.metrics.error(&info.reason);
        }
        self.finish(code);
    }

    fn finish(&mut self, code: Code) {
        if !self.done {
            self.done = true;
            self.metrics.finish(self.call, code);
        }
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
    }
}

/// The code of a `grpc-status` header, if there is one.
fn grpc_code(headers: &HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?;
    let number: i32 = value.to_str().ok()?.parse().ok()?;
    Some(Code::from(number))
}

pin_project! {
    /// The inner future; its reply's body wrapped to see the trailers.
    #[derive(Debug)]
    pub struct MeteredFuture<F> {
        #[pin]
        inner: F,
        tally: Option<Tally>,
    }
}

impl<F, ResBody, E> Future for MeteredFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = Result<Response<MeteredBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let output = ready!(this.inner.poll(cx));
        let Some(mut tally) = this.tally.take() else {
            // Polled after it was ready: nothing left to count.
            return Poll::Ready(output.map(|response| response.map(|inner| MeteredBody { inner, tally: None })));
        };
        Poll::Ready(match output {
            Ok(response) => {
                // Trailers-only (a refusal, a unary error): the status is
                // here; otherwise it comes in the body's trailers.
                let tally = match grpc_code(response.headers()) {
                    Some(_) => {
                        tally.finish_with(response.headers());
                        None
                    }
                    None => Some(tally),
                };
                Ok(response.map(|inner| MeteredBody { inner, tally }))
            }
            Err(err) => {
                tally.finish(Code::Unknown);
                Err(err)
            }
        })
    }
}

pin_project! {
    /// A reply body that counts its RPC when the trailers pass.
    #[derive(Debug)]
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        tally: Option<Tally>,
    }
}

impl<B: http_body::Body> http_body::Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(mut tally) = this.tally.take()
                {
                    tally.finish_with(trailers);
                }
            }
            // The body failed, or ended without trailers: no status was sent.
            Some(Err(_)) | None => {
                if let Some(mut tally) = this.tally.take() {
                    tally.finish(Code::Unknown);
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
