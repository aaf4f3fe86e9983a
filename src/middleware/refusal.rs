//! Refusing a request before any handler ran, as the gate and the limit do:
//! the reply is the error's status, and the request's body is still read.

use std::time::Duration;

use futures::future::{Either, Ready, ready};
use http::{Request, Response};
use tonic::{Status, body::Body};

use crate::error::Error;

/// The future of a layer that may refuse: a ready refusal, or the inner
/// service's future `F`.
pub(super) type Refusable<F, E> = Either<Ready<Result<Response<Body>, E>>, F>;

/// Answers `request` with `why`'s status and drains its body.
pub(super) fn refuse<B, F, E>(request: Request<B>, why: Error) -> Refusable<F, E>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    let status = Status::from(why);
    tracing::debug!(code = ?status.code(), "request refused at the edge");
    drain(request.into_body());
    Either::Left(ready(Ok(status.into_http())))
}

/// How long the body of a refused request is read after the refusal.
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use bytes::Bytes;
    use tonic::Code;

    use super::*;
    use crate::middleware::testing::{self, ChannelBody};

    #[tokio::test]
    async fn a_refused_requests_body_is_read_to_its_end_after_the_reply() {
        // Room for one frame: a second send completes only once the first
        // was read.
        let (frames, body) = tokio::sync::mpsc::channel(1);
        let request = Request::post(testing::SUBMIT_RUN).body(ChannelBody(body)).unwrap();
        let refused: Refusable<Ready<Result<Response<Body>, ()>>, ()> = refuse(request, Error::Overloaded);
        let response = refused.await.unwrap();
        assert_eq!(
            testing::outcome(&response),
            (Code::ResourceExhausted, Some("OVERLOADED".into()))
        );
        let bound = Duration::from_secs(10);
        for frame in ["a", "b", "c"] {
            tokio::time::timeout(bound, frames.send(Bytes::from(frame)))
                .await
                .expect("the refused body is being read")
                .expect("the body is still held, not dropped");
        }
        drop(frames);
    }
}
