//! The protobuf codec of vitals' gRPC services and clients: prost's, with
//! small initial buffers for WithLock and WatchTransitions.
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
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::ProstCodec;

/// Initial size of a WithLock or WatchTransitions stream's encode and decode buffer.
const LOCK_STREAM_BUFFER: usize = 256;
/// tonic's default: how much a stream encodes before it yields.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// [`ProstCodec`] with [`LOCK_STREAM_BUFFER`]-byte buffers for WithLock and WatchTransitions.
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
    type Decoder = <ProstCodec<T, U> as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings::<T, U>())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings::<T, U>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto;

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
