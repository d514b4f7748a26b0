//! gRPC calls with request bodies encoded beforehand: bytes that may be
//! valid protobuf or deliberately not (the bad-input tests), or encoded
//! once and sent many times (the load tests, whose generator should spend
//! its CPU on sending rather than on protobuf).

use std::marker::PhantomData;

use bytes::{Buf as _, BufMut as _, Bytes};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// Sends a request body as given and decodes the answer as `M`. `M` may
/// be a partial message (only the fields the caller reads): protobuf
/// skips the rest.
pub struct RawCodec<M>(PhantomData<M>);

impl<M> Default for RawCodec<M> {
    fn default() -> Self {
        RawCodec(PhantomData)
    }
}

impl<M: prost::Message + Default + Send + 'static> Codec for RawCodec<M> {
    type Encode = Bytes;
    type Decode = M;
    type Encoder = RawEncoder;
    type Decoder = MessageDecoder<M>;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> MessageDecoder<M> {
        MessageDecoder(PhantomData)
    }
}

/// Copies the body into the frame.
pub struct RawEncoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

/// Decodes an answer in place.
pub struct MessageDecoder<M>(PhantomData<M>);

impl<M: prost::Message + Default> Decoder for MessageDecoder<M> {
    type Item = M;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<M>, tonic::Status> {
        let message =
            M::decode(&mut *src).map_err(|e| tonic::Status::internal(format!("decode: {e}")))?;
        src.advance(src.remaining());
        Ok(Some(message))
    }
}
