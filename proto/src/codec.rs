//! The codec of every mesh service: prost, except that a message that does not decode is
//! the sender's fault. tonic-prost answers `INTERNAL` for it; a mesh server answers
//! `INVALID_ARGUMENT` with what is wrong (`malformed message: invalid wire type value: 6`),
//! as for any other bad input.

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

const PROST_PREFIX: &str = "failed to decode Protobuf message: ";

pub struct MeshCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for MeshCodec<T, U> {
    fn default() -> Self {
        Self(ProstCodec::default())
    }
}

impl<T, U> Codec for MeshCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = MeshDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        MeshDecoder(self.0.decoder())
    }
}

pub struct MeshDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for MeshDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|s| {
            let what = s
                .message()
                .strip_prefix(PROST_PREFIX)
                .unwrap_or(s.message());
            Status::invalid_argument(format!("malformed message: {what}"))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
