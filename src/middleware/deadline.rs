//! The deadline of unary business RPCs: the client's `grpc-timeout` or
//! `VITALS_REQUEST_TIMEOUT_MS`, whichever is sooner. Past it the RPC ends
//! with DEADLINE_EXCEEDED (ErrorInfo `deadline_ms`) and its handler is
//! dropped, so a request stuck on the database cannot outlive its client's
//! patience nor hold its slot forever.
//!
//! The deadline is also handed to the handler as a request extension
//! ([`RequestDeadline`]): a handler that waits (for a system's lock) ends its
//! wait in time to answer with its own, retryable status.
//!
//! Streams are not bounded here: WatchTransitions lasts as long as its
//! client, WithLock as its lease and lock wait. tower's `Timeout` does not
//! fit; the module docs of [`crate::middleware`] say why.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tonic::{Status, body::Body};
use tower::{Layer, Service};

use super::Rpc;
use crate::error::Error;

/// When a unary business RPC's deadline passes, in the request's extensions
/// for its handler: a handler that waits (for a system's lock) ends its wait
/// in time to answer with its own, retryable status instead of being cut off
/// by this layer's DEADLINE_EXCEEDED.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestDeadline(pub Instant);

impl RequestDeadline {
    /// The deadline this layer set on `request`, if it bounds the RPC.
    pub fn of<T>(request: &tonic::Request<T>) -> Option<Instant> {
        request.extensions().get::<RequestDeadline>().map(|d| d.0)
    }
}

/// Installs [`Deadline`].
#[derive(Debug, Clone)]
pub struct DeadlineLayer {
    longest: Duration,
}

impl DeadlineLayer {
    /// Unary business RPCs end after `longest` at the latest.
    pub fn new(longest: Duration) -> Self {
        DeadlineLayer { longest }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadline {
            inner,
            longest: self.longest,
        }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
    longest: Duration,
}

/// Parses a `grpc-timeout` header value: up to 8 digits and a unit.
fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n.checked_mul(3600)?),
        b'M' => Duration::from_secs(n.checked_mul(60)?),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

impl<S, B> Service<Request<B>> for Deadline<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = DeadlineFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        if Rpc::of(&request) != Rpc::Unary {
            return DeadlineFuture {
                inner: self.inner.call(request),
                expiry: None,
                after: Duration::ZERO,
            };
        }
        let asked = request
            .headers()
            .get("grpc-timeout")
            .and_then(|v| parse_grpc_timeout(v.as_bytes()));
        let after = asked.map_or(self.longest, |asked| asked.min(self.longest));
        let at = Instant::now() + after;
        request.extensions_mut().insert(RequestDeadline(at));
        DeadlineFuture {
            inner: self.inner.call(request),
            expiry: Some(tokio::time::sleep_until(at)),
            after,
        }
    }
}

pin_project! {
    /// The inner future, or DEADLINE_EXCEEDED once `expiry` has passed.
    #[derive(Debug)]
    pub struct DeadlineFuture<F> {
        #[pin]
        inner: F,
        #[pin]
        expiry: Option<Sleep>,
        after: Duration,
    }
}

impl<F, E> Future for DeadlineFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(output) = this.inner.poll(cx) {
            return Poll::Ready(output);
        }
        let Some(expiry) = this.expiry.as_pin_mut() else {
            return Poll::Pending;
        };
        ready!(expiry.poll(cx));
        tracing::debug!(after = ?this.after, "deadline exceeded");
        Poll::Ready(Ok(
            Status::from(Error::DeadlineExceeded { after: *this.after }).into_http()
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::convert::Infallible;

    use tonic::Code;
    use tower::{ServiceExt, service_fn};

    use super::*;
    use crate::middleware::{
        LOCK_STREAM_PATH, WATCH_PATH,
        testing::{self, HEALTH_CHECK, SUBMIT_RUN},
    };

    #[test]
    fn grpc_timeouts_parse_in_every_unit_and_garbage_is_ignored() {
        assert_eq!(parse_grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout(b"2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout(b"3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout(b"250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout(b"7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout(b"9n"), Some(Duration::from_nanos(9)));
        assert_eq!(
            parse_grpc_timeout(b"99999999H"),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
        for bad in ["", "m", "123456789m", "10x", "-1S", "+1S", "1.5S", " 1S", "1 S", "٣S"] {
            assert_eq!(parse_grpc_timeout(bad.as_bytes()), None, "{bad}");
        }
    }

    /// A handler that never answers and reports the deadline it was given.
    fn stuck(
        seen: tokio::sync::mpsc::UnboundedSender<Option<Instant>>,
    ) -> impl Service<Request<Body>, Response = Response<Body>, Error = Infallible> {
        service_fn(move |request: Request<Body>| {
            let deadline = request.extensions().get::<RequestDeadline>().map(|d| d.0);
            seen.send(deadline).unwrap();
            futures::future::pending()
        })
    }

    fn with_timeout(path: &str, grpc_timeout: &'static str) -> Request<Body> {
        let mut request = testing::request(path);
        request
            .headers_mut()
            .insert("grpc-timeout", http::HeaderValue::from_static(grpc_timeout));
        request
    }

    /// Runs `request` through a deadline of `longest` over a stuck handler,
    /// on the paused clock: the reply, when it came, and the deadline the
    /// handler was given (from the start).
    async fn run(longest: Duration, request: Request<Body>) -> (Response<Body>, Duration, Option<Duration>) {
        let (seen, mut deadlines) = tokio::sync::mpsc::unbounded_channel();
        let started = Instant::now();
        let response = DeadlineLayer::new(longest)
            .layer(stuck(seen))
            .oneshot(request)
            .await
            .unwrap();
        let handed = deadlines.recv().await.expect("the handler was called");
        (response, started.elapsed(), handed.map(|at| at - started))
    }

    #[tokio::test(start_paused = true)]
    async fn a_unary_rpc_ends_with_deadline_exceeded_at_the_server_deadline() {
        let longest = Duration::from_millis(300);
        let (response, took, handed) = run(longest, testing::request(SUBMIT_RUN)).await;
        assert_eq!(
            testing::outcome(&response),
            (Code::DeadlineExceeded, Some("DEADLINE_EXCEEDED".into()))
        );
        assert_eq!(testing::metadata(&response)["deadline_ms"], "300");
        assert_eq!(took, longest);
        assert_eq!(handed, Some(longest), "the handler knows the deadline");
    }

    #[tokio::test(start_paused = true)]
    async fn the_clients_grpc_timeout_wins_when_it_is_sooner_and_only_then() {
        let longest = Duration::from_millis(300);
        let (response, took, handed) = run(longest, with_timeout(SUBMIT_RUN, "100m")).await;
        assert_eq!(testing::metadata(&response)["deadline_ms"], "100");
        assert_eq!(
            (took, handed),
            (Duration::from_millis(100), Some(Duration::from_millis(100)))
        );

        let (response, took, handed) = run(longest, with_timeout(SUBMIT_RUN, "1S")).await;
        assert_eq!(testing::metadata(&response)["deadline_ms"], "300");
        assert_eq!((took, handed), (longest, Some(longest)));

        let (_, took, _) = run(longest, with_timeout(SUBMIT_RUN, "soon")).await;
        assert_eq!(took, longest, "an unreadable grpc-timeout is ignored");
    }

    #[tokio::test(start_paused = true)]
    async fn streams_and_health_get_no_deadline() {
        for path in [LOCK_STREAM_PATH, WATCH_PATH, HEALTH_CHECK] {
            let (seen, mut deadlines) = tokio::sync::mpsc::unbounded_channel();
            let call = DeadlineLayer::new(Duration::from_millis(300))
                .layer(stuck(seen))
                .oneshot(with_timeout(path, "100m"));
            // The paused clock runs ahead to the hour at once, unless a
            // deadline answers first.
            let outlived = tokio::time::timeout(Duration::from_secs(3600), call).await;
            assert!(outlived.is_err(), "{path} was cut off");
            assert_eq!(deadlines.recv().await, Some(None), "{path} was handed a deadline");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_handler_answering_in_time_is_not_cut_off() {
        let (inner, calls) = testing::answering();
        let response = DeadlineLayer::new(Duration::from_millis(300))
            .layer(inner)
            .oneshot(testing::request(SUBMIT_RUN))
            .await
            .unwrap();
        assert_eq!(testing::outcome(&response), (Code::Ok, None));
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
