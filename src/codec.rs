//! The protobuf codec of vitals' gRPC services and clients: prost's, with
//! small initial buffers.
//!
//! tonic gives every stream an 8 KiB encode and an 8 KiB decode buffer up
//! front. vitals' messages are a few dozen bytes, and a replica holds
//! thousands of WithLock streams at once: with the default, the two buffers
//! were most of what a held lock cost in memory. The buffers still grow to
//! fit any message up to `VITALS_MAX_REQUEST_BYTES`.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::ProstCodec;

/// Initial size of each stream's encode and decode buffer.
const INITIAL_BUFFER: usize = 256;
/// tonic's default: how much a stream encodes before it yields.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// [`ProstCodec`] with [`INITIAL_BUFFER`]-byte buffers.
#[derive(Debug, Clone, Copy)]
pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        SmallBufferCodec(PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(INITIAL_BUFFER, YIELD_THRESHOLD)
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
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}
