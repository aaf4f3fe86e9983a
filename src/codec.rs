//! The protobuf codec of vitals' gRPC services and clients: prost's, with
//! small initial buffers for WithLock and WatchTransitions, and bytes that
//! are not a message refused as the client's mistake.
//!
//! prost's decoder reports a message it cannot decode as INTERNAL with the
//! decode error's text. Ours decodes with prost and turns its
//! `prost::DecodeError` into INVALID_ARGUMENT / MALFORMED_REQUEST with an
//! ErrorInfo, where the error is still a type. (Clients generated with this
//! codec, the tests' and the load generator's, would report a reply they
//! cannot decode the same way; vitals' replies are prost's own encoding.)
//!
//! EvaluateHealth takes at most 100 statuses. A request message of
//! `VITALS_MAX_REQUEST_BYTES` could hold tens of thousands (one byte each,
//! four once decoded), so the decoder counts them in the encoded bytes and
//! refuses a request with more (INVALID_ARGUMENT on `statuses`, as the
//! handler would) before decoding any.
//!
//! tonic gives every stream an 8 KiB encode and an 8 KiB decode buffer up
//! front. WithLock's messages are a few dozen bytes, a transition a few
//! hundred, and a replica holds thousands of WithLock and WatchTransitions
//! streams at once: with the default, the two buffers were most of what a
//! held lock or an idle watcher cost in memory. Every other RPC keeps
//! tonic's default: a unary request lives for microseconds, and a smaller
//! buffer would only be grown (and its bytes copied) for every larger
//! message. Buffers grow to fit any message up to `VITALS_MAX_REQUEST_BYTES`.

use std::{any::TypeId, marker::PhantomData};

use prost::Message;
use tonic::{
    Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
};
use tonic_prost::ProstCodec;

use crate::error::Error;

/// Initial size of a WithLock or WatchTransitions stream's encode and decode buffer.
const LOCK_STREAM_BUFFER: usize = 256;
/// tonic's default: how much a stream encodes before it yields.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// [`ProstCodec`] with `LOCK_STREAM_BUFFER`-byte buffers for WithLock and WatchTransitions.
#[derive(Debug, Clone, Copy)]
pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        SmallBufferCodec(PhantomData)
    }
}

/// The buffers of a stream that encodes `T` and decodes `U`.
fn settings<T: 'static, U: 'static>() -> BufferSettings {
    let long_lived_stream = [TypeId::of::<T>(), TypeId::of::<U>()].iter().any(|t| {
        *t == TypeId::of::<crate::proto::WithLockRequest>()
            || *t == TypeId::of::<crate::proto::WithLockResponse>()
            || *t == TypeId::of::<crate::proto::WatchTransitionsRequest>()
            || *t == TypeId::of::<crate::proto::WatchTransitionsResponse>()
    });
    if long_lived_stream {
        BufferSettings::new(LOCK_STREAM_BUFFER, YIELD_THRESHOLD)
    } else {
        BufferSettings::default()
    }
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = ProtobufDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings::<T, U>())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProtobufDecoder {
            settings: settings::<T, U>(),
            decodes: PhantomData,
        }
    }
}

/// Decodes a `U` with prost; bytes that are not one are MALFORMED_REQUEST.
#[derive(Debug)]
pub struct ProtobufDecoder<U> {
    settings: BufferSettings,
    decodes: PhantomData<U>,
}

impl<U: Message + Default + 'static> Decoder for ProtobufDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        if TypeId::of::<U>() == TypeId::of::<crate::proto::EvaluateHealthRequest>() {
            use bytes::Buf;
            // The message is whole in the buffer; a chunk that is not all of
            // it (never, with tonic's contiguous buffer) is left to the
            // handler's own check.
            if buf.chunk().len() == buf.remaining()
                && statuses_in(buf.chunk()).is_some_and(|n| n > crate::domain::MAX_RUNS_CONSIDERED)
            {
                return Err(Error::invalid(
                    "statuses",
                    format!("at most {} statuses are evaluated", crate::domain::MAX_RUNS_CONSIDERED),
                )
                .into());
            }
        }
        match U::decode(buf) {
            Ok(message) => Ok(Some(message)),
            Err(err) => {
                tracing::debug!(error = %err, "request message not decodable");
                Err(Error::MalformedRequest("request message is not a valid protobuf encoding").into())
            }
        }
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.settings
    }
}

/// How many values of field 1 (EvaluateHealthRequest's `statuses`, packed or
/// not) an encoded message holds, without decoding it; `None` when the
/// bytes are not protobuf (prost then says so).
fn statuses_in(mut bytes: &[u8]) -> Option<usize> {
    use prost::encoding::decode_varint;
    let mut count = 0_usize;
    while !bytes.is_empty() {
        let key = decode_varint(&mut bytes).ok()?;
        let statuses = key >> 3 == 1;
        match key & 7 {
            0 => {
                decode_varint(&mut bytes).ok()?;
                count += usize::from(statuses);
            }
            1 => bytes = bytes.get(8..)?,
            2 => {
                let len = usize::try_from(decode_varint(&mut bytes).ok()?).ok()?;
                let (mut value, rest) = bytes.split_at_checked(len)?;
                if statuses {
                    while !value.is_empty() {
                        decode_varint(&mut value).ok()?;
                        count += 1;
                    }
                }
                bytes = rest;
            }
            5 => bytes = bytes.get(4..)?,
            _ => return None,
        }
    }
    Some(count)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use bytes::Bytes;
    use tonic::Code;
    use tonic_types::StatusExt;

    use super::*;
    use crate::proto;

    /// A body of one frame.
    struct Once(Option<Bytes>);

    impl http_body::Body for Once {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            std::task::Poll::Ready(self.0.take().map(|data| Ok(http_body::Frame::data(data))))
        }
    }

    /// Decodes `payload` as one request message the way the server does.
    async fn decode_request(payload: &[u8]) -> Result<proto::GetSystemHealthRequest, Status> {
        let mut framed = vec![0];
        framed.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        framed.extend_from_slice(payload);
        let body = Once(Some(Bytes::from(framed)));
        let decoder = SmallBufferCodec::<proto::SystemHealth, proto::GetSystemHealthRequest>::default().decoder();
        let mut requests = tonic::Streaming::new_request(decoder, body, None, None);
        requests.message().await.map(|m| m.expect("a message"))
    }

    #[tokio::test]
    async fn bytes_that_are_not_the_message_are_malformed_request_with_an_error_info() {
        // system_id (field 1, length-delimited) = 0xff 0xfe: not UTF-8.
        let status = decode_request(&[0x0a, 2, 0xff, 0xfe]).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        let info = status.get_details_error_info().expect("an ErrorInfo");
        assert_eq!(
            (info.reason.as_str(), info.domain.as_str()),
            ("MALFORMED_REQUEST", "vitals.dev")
        );
        // A length running past the end.
        let status = decode_request(&[0x0a, 9, b'a']).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        let request = decode_request(&[0x0a, 1, b'a']).await.unwrap();
        assert_eq!(request.system_id, "a");
    }

    /// Decodes `request` as EvaluateHealth's server does.
    async fn decode_evaluate(request: &proto::EvaluateHealthRequest) -> Result<proto::EvaluateHealthRequest, Status> {
        let payload = request.encode_to_vec();
        let mut framed = vec![0];
        framed.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        framed.extend_from_slice(&payload);
        let body = Once(Some(Bytes::from(framed)));
        let decoder =
            SmallBufferCodec::<proto::EvaluateHealthResponse, proto::EvaluateHealthRequest>::default().decoder();
        let mut requests = tonic::Streaming::new_request(decoder, body, None, None);
        requests.message().await.map(|m| m.expect("a message"))
    }

    #[tokio::test]
    async fn more_than_100_statuses_are_refused_before_they_are_decoded() {
        let with = |n: usize| proto::EvaluateHealthRequest {
            statuses: vec![proto::HealthStatus::Unhealthy as i32; n],
            thresholds: None,
        };
        assert_eq!(decode_evaluate(&with(100)).await.unwrap().statuses.len(), 100);
        for n in [101, 60_000] {
            let status = decode_evaluate(&with(n)).await.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument);
            let bad = status.get_details_bad_request().expect("a BadRequest");
            assert_eq!(bad.field_violations[0].field, "statuses");
        }
        // Unpacked statuses (field 1, varint, one key each) count the same.
        let unpacked: Vec<u8> = std::iter::repeat_n([0x08, 0x03], 101).flatten().collect();
        assert_eq!(statuses_in(&unpacked), Some(101));
        assert_eq!(statuses_in(&[0x08]), None, "a key without its value");
    }

    /// BufferSettings has no PartialEq; its Debug shows both fields.
    fn shown(settings: BufferSettings) -> String {
        format!("{settings:?}")
    }

    #[test]
    fn only_withlock_and_watch_streams_get_small_buffers() {
        let small = shown(BufferSettings::new(LOCK_STREAM_BUFFER, YIELD_THRESHOLD));
        assert_eq!(
            shown(settings::<proto::WithLockResponse, proto::WithLockRequest>()),
            small
        );
        assert_eq!(
            shown(settings::<proto::WithLockRequest, proto::WithLockResponse>()),
            small
        );
        assert_eq!(
            shown(settings::<
                proto::WatchTransitionsResponse,
                proto::WatchTransitionsRequest,
            >()),
            small
        );
        assert_eq!(
            shown(settings::<proto::EvaluateHealthResponse, proto::EvaluateHealthRequest>()),
            shown(BufferSettings::default())
        );
        assert_ne!(small, shown(BufferSettings::default()));
    }
}
