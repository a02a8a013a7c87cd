//! gRPC with hand-made message bytes: for hostile input, and for frames no client would
//! send.

use std::time::Duration;

use bytes::{Buf, BufMut};
use futures::{StreamExt, stream};
use tonic::client::Grpc;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Sends and receives raw message bytes: the requests are made by hand.
#[derive(Clone, Copy, Debug, Default)]
pub struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let n = buf.remaining();
        Ok(Some(buf.copy_to_bytes(n).to_vec()))
    }
}

/// Opens a node stream, sends `frames` (and keeps it open `hold` longer), and returns how
/// the coordinator ended it: the status code, `Ok` for a clean end, `DeadlineExceeded` when
/// nothing came within 10 s.
pub async fn node_stream_held(channel: &Channel, frames: Vec<Vec<u8>>, hold: Duration) -> Code {
    let mut grpc = Grpc::new(channel.clone());
    if grpc.ready().await.is_err() {
        return Code::Unavailable;
    }
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/mesh.v1.NodeService/Connect");
    let outbound = stream::iter(frames)
        .chain(stream::once(tokio::time::sleep(hold)).filter_map(|()| std::future::ready(None)));
    let req = tonic::Request::new(outbound);
    match grpc.streaming(req, path, Raw).await {
        Err(s) => s.code(),
        Ok(resp) => {
            let mut inbound = resp.into_inner();
            loop {
                match tokio::time::timeout(Duration::from_secs(10), inbound.next()).await {
                    Ok(Some(Ok(_))) => {}
                    Ok(Some(Err(s))) => return s.code(),
                    Ok(None) => return Code::Ok,
                    Err(_) => return Code::DeadlineExceeded,
                }
            }
        }
    }
}

/// Opens a node stream, sends `frames`, and returns how the coordinator ended it.
pub async fn node_stream(channel: &Channel, frames: Vec<Vec<u8>>) -> Code {
    node_stream_held(channel, frames, Duration::ZERO).await
}
