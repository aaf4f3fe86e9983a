//! The request's message framing, read as it streams in: each gRPC message
//! is a compression flag, a 4-byte big-endian length, then that many bytes.
//!
//! A message whose declared length exceeds `VITALS_MAX_REQUEST_BYTES` is
//! refused with RESOURCE_EXHAUSTED / REQUEST_TOO_LARGE as soon as its length
//! arrives, before its bytes are buffered; a body that ends inside a message
//! is refused with INVALID_ARGUMENT / MALFORMED_REQUEST. Both are client
//! mistakes, and tonic would report them as OUT_OF_RANGE and INTERNAL with
//! no ErrorInfo.
//!
//! The refusal is an error of the request body whose type is [`Status`]:
//! tonic's decoder hands a body error that is a `Status` to the handler, or
//! to the client as the RPC's status, as it is (its `Status::from_error`
//! downcasts). So the client hears our status, not one rewritten from
//! tonic's message text. tonic's own limit (`max_decoding_message_size`) is
//! set to the same size on every service and is never reached first.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http::Request;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::Status;
use tower::{Layer, Service};

use crate::error::Error;

/// What a body's error is boxed as, for tonic to downcast.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Bytes before a message: the compression flag and the length.
const PREFIX: u8 = 5;

/// Installs [`Framing`].
#[derive(Debug, Clone)]
pub struct FramingLayer {
    max_message_bytes: usize,
}

impl FramingLayer {
    /// Request messages may declare up to `max_message_bytes`.
    pub fn new(max_message_bytes: usize) -> Self {
        FramingLayer { max_message_bytes }
    }
}

impl<S> Layer<S> for FramingLayer {
    type Service = Framing<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Framing {
            inner,
            max_message_bytes: self.max_message_bytes,
        }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Framing<S> {
    inner: S,
    max_message_bytes: usize,
}

impl<S, B> Service<Request<B>> for Framing<S>
where
    S: Service<Request<FramedBody<B>>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let max = self.max_message_bytes;
        self.inner.call(request.map(|body| FramedBody::new(body, max)))
    }
}

/// Where a body is in its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cursor {
    /// In a message's prefix, `read` bytes into it; `length` holds the
    /// length bytes read so far.
    Prefix { read: u8, length: u32 },
    /// In a message, with `left` bytes of it to come.
    Message { left: usize },
}

impl Cursor {
    const START: Cursor = Cursor::Prefix { read: 0, length: 0 };

    /// Moves past `data`. A message declaring more than `max` bytes stops
    /// it: `Err` with the declared length.
    fn advance(&mut self, mut data: &[u8], max: usize) -> Result<(), usize> {
        while !data.is_empty() {
            match self {
                Cursor::Message { left } => {
                    let taken = (*left).min(data.len());
                    data = &data[taken..];
                    *left -= taken;
                    if *left == 0 {
                        *self = Cursor::START;
                    }
                }
                Cursor::Prefix { read, length } => {
                    let taken = usize::from(PREFIX - *read).min(data.len());
                    for &byte in &data[..taken] {
                        // Byte 0 is the compression flag, which tonic checks.
                        if *read > 0 {
                            *length = *length << 8 | u32::from(byte);
                        }
                        *read += 1;
                    }
                    data = &data[taken..];
                    if *read == PREFIX {
                        let declared = usize::try_from(*length).unwrap_or(usize::MAX);
                        if declared > max {
                            return Err(declared);
                        }
                        *self = if declared == 0 {
                            Cursor::START
                        } else {
                            Cursor::Message { left: declared }
                        };
                    }
                }
            }
        }
        Ok(())
    }
}

pin_project! {
    /// A request body read through its message framing (see the module docs).
    #[derive(Debug)]
    pub struct FramedBody<B> {
        #[pin]
        inner: B,
        max: usize,
        cursor: Cursor,
        // Set once the body has failed: nothing more is read from it.
        failed: bool,
    }
}

impl<B> FramedBody<B> {
    /// `inner`, whose messages may declare up to `max` bytes.
    pub fn new(inner: B, max: usize) -> Self {
        FramedBody {
            inner,
            max,
            cursor: Cursor::START,
            failed: false,
        }
    }
}

impl<B> Body for FramedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if *this.failed {
            return Poll::Ready(None);
        }
        let refusal = match ready!(this.inner.poll_frame(cx)) {
            Some(Ok(frame)) => match frame.data_ref().map(|data| this.cursor.advance(data, *this.max)) {
                Some(Err(declared)) => {
                    tracing::debug!(declared, max = *this.max, "request message larger than the limit");
                    Error::RequestTooLarge
                }
                Some(Ok(())) | None => return Poll::Ready(Some(Ok(frame))),
            },
            Some(Err(err)) => return Poll::Ready(Some(Err(err.into()))),
            None if *this.cursor == Cursor::START => return Poll::Ready(None),
            None => Error::MalformedRequest("the request ends inside a message"),
        };
        *this.failed = true;
        Poll::Ready(Some(Err(Box::new(Status::from(refusal)))))
    }

    fn is_end_stream(&self) -> bool {
        // A body that ends inside a message still has its refusal to yield.
        self.failed || (self.inner.is_end_stream() && self.cursor == Cursor::START)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::VecDeque;

    use tonic::{Code, codec::Codec};
    use tonic_types::StatusExt;

    use super::*;
    use crate::{codec::SmallBufferCodec, proto};

    /// A body of the given frames, then its end.
    struct Frames(VecDeque<Result<Bytes, &'static str>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop_front().map(|f| f.map(Frame::data).map_err(Into::into)))
        }

        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }
    }

    fn framed(chunks: &[&[u8]], max: usize) -> FramedBody<Frames> {
        let frames = chunks.iter().map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        FramedBody::new(Frames(frames), max)
    }

    /// A gRPC message: flag 0, the length, `payload`.
    fn message(payload: &[u8]) -> Vec<u8> {
        let mut framed = vec![0];
        framed.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        framed.extend_from_slice(payload);
        framed
    }

    /// Reads `body` to its end: the data it yielded, and the error it ended
    /// with, if any.
    async fn read(mut body: FramedBody<Frames>) -> (Vec<u8>, Option<BoxError>) {
        let mut data = Vec::new();
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            match frame {
                Ok(frame) => data.extend_from_slice(&frame.into_data().unwrap()),
                Err(err) => {
                    assert!(body.is_end_stream(), "nothing after the error");
                    return (data, Some(err));
                }
            }
        }
        (data, None)
    }

    fn refusal(err: Option<BoxError>) -> (Code, String) {
        let status = err.expect("an error").downcast::<Status>().expect("a Status");
        let info = status.get_details_error_info().expect("an ErrorInfo");
        (status.code(), info.reason)
    }

    #[tokio::test]
    async fn messages_within_the_limit_pass_unchanged_however_the_frames_split_them() {
        let stream = [message(b"first"), message(b""), message(&[7; 64])].concat();
        for cut in 0..=stream.len() {
            for second_cut in cut..=stream.len() {
                let chunks = [&stream[..cut], &stream[cut..second_cut], &stream[second_cut..]];
                let (data, err) = read(framed(&chunks, 64)).await;
                assert!(err.is_none(), "cut at {cut} and {second_cut}: {err:?}");
                assert_eq!(data, stream);
            }
        }
    }

    #[tokio::test]
    async fn a_message_declaring_more_than_the_limit_is_refused_when_its_length_arrives() {
        let stream = [message(b"ok"), message(&[1; 65])].concat();
        // The second message's prefix ends at byte 12: its payload is never read.
        let (data, err) = read(framed(&[&stream[..9], &stream[9..12], &stream[12..]], 64)).await;
        assert_eq!(data, stream[..9]);
        assert_eq!(refusal(err), (Code::ResourceExhausted, "REQUEST_TOO_LARGE".into()));
        // The largest length a prefix can declare.
        let (_, err) = read(framed(&[&[0, 0xff, 0xff, 0xff, 0xff]], 64)).await;
        assert_eq!(refusal(err), (Code::ResourceExhausted, "REQUEST_TOO_LARGE".into()));
    }

    #[tokio::test]
    async fn a_body_that_ends_inside_a_message_is_malformed() {
        let whole = message(b"payload");
        for end in 1..whole.len() {
            let (_, err) = read(framed(&[&whole[..end]], 64)).await;
            assert_eq!(
                refusal(err),
                (Code::InvalidArgument, "MALFORMED_REQUEST".into()),
                "ending at {end}"
            );
        }
        let (data, err) = read(framed(&[], 64)).await;
        assert!(
            data.is_empty() && err.is_none(),
            "an empty body is no message, not a broken one"
        );
    }

    #[tokio::test]
    async fn errors_of_the_body_itself_pass_unchanged() {
        let frames = VecDeque::from([Ok(Bytes::from(message(b"x"))), Err("connection reset")]);
        let (_, err) = read(FramedBody::new(Frames(frames), 64)).await;
        assert_eq!(err.unwrap().to_string(), "connection reset");
    }

    /// tonic's decoder must hand the body's status on as it is, or clients
    /// would hear something else than our refusal: this fails if it stops
    /// doing so.
    #[tokio::test]
    async fn tonics_decoder_reports_the_bodys_refusal_as_it_is() {
        let stream = message(&[1; 65]);
        let body = framed(&[&stream], 64);
        let decoder =
            SmallBufferCodec::<proto::EvaluateHealthResponse, proto::EvaluateHealthRequest>::default().decoder();
        // tonic's own limit, set as the server sets it, is not what answers.
        let mut requests = tonic::Streaming::new_request(decoder, body, None, Some(64));
        let status = requests.message().await.expect_err("refused");
        assert_eq!(status.code(), Code::ResourceExhausted);
        let info = status.get_details_error_info().expect("our ErrorInfo");
        assert_eq!(info.reason, "REQUEST_TOO_LARGE");
    }
}
