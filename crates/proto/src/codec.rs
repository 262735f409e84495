//! The gRPC codec of every generated client and server: prost's, except
//! that a message's exact encoded length is reserved before it is encoded.
//!
//! Why: prost writes a message field by field, and tonic's encode buffer
//! (`BytesMut`) grows by exactly what each write needs. A replicated
//! block's data filled the buffer to the byte, so the next field's one-byte
//! key reallocated it — copying the block a second time. That second copy
//! was 4 % of a sending agent's CPU in an initial sync (benches/RESULTS.md,
//! issue 16 "Session 16"). One reservation of the whole message leaves
//! room for every field.
//!
//! Decoding is prost's own ([`ProstDecoder`]), with tonic's buffer settings.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
use tonic_prost::ProstDecoder;

/// [`tonic_prost::ProstCodec`] with [`ExactEncoder`].
#[derive(Debug, Clone, Copy)]
pub struct ExactCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for ExactCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for ExactCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ExactEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ExactEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::default())
    }
}

/// Encodes a prost message after reserving its whole encoded length.
#[derive(Debug, Clone, Copy)]
pub struct ExactEncoder<T>(PhantomData<T>);

impl<T: Message> Encoder for ExactEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        item.encode(buf)
            .map_err(|e| Status::internal(format!("encoding a message: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}
