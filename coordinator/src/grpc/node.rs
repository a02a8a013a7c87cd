//! `mesh.v1.NodeService`: one bidirectional stream per node, handed to a `NodeSession`.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use mesh_proto::domain::FromNode;
use mesh_proto::pb;
use ractor::Actor;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::node_link::Outbound;
use crate::node_session::{NodeSession, NodeSessionArgs, NodeSessionMsg};
use crate::root::Handles;

#[derive(Clone, Debug)]
pub struct NodeApi {
    pub handles: Handles,
    /// Streams that have not registered yet hold one permit each.
    pub unregistered: Arc<Semaphore>,
}

impl NodeApi {
    pub fn new(handles: Handles) -> Self {
        let bound = handles.config.registry.max_unregistered_streams;
        Self {
            handles,
            unregistered: Arc::new(Semaphore::new(bound)),
        }
    }
}

type FrameStream = Pin<Box<dyn Stream<Item = Result<pb::CoordinatorFrame, Status>> + Send>>;

/// How a broken inbound stream ends ours: the codes a unary call would get for the same
/// fault (bytes that are not a frame are INVALID_ARGUMENT, an oversized frame
/// RESOURCE_EXHAUSTED). `None`: the peer went away, nobody is left to tell.
fn inbound_fault(status: &Status) -> Option<(Code, String)> {
    match status.code() {
        Code::Cancelled | Code::Unavailable | Code::Unknown => None,
        Code::OutOfRange | Code::ResourceExhausted => Some((
            Code::ResourceExhausted,
            format!("a node frame was refused: {}", status.message()),
        )),
        _ => Some((
            Code::InvalidArgument,
            format!("a node frame could not be read: {}", status.message()),
        )),
    }
}

/// A result whose output is over `max` bytes becomes a failure of its attempt, not retried.
fn cap_result(mut frame: pb::NodeFrame, max: usize) -> pb::NodeFrame {
    use pb::task_result::Outcome;
    if let Some(pb::node_frame::Kind::Result(r)) = &mut frame.kind
        && let Some(Outcome::OutputJson(text)) = &r.outcome
        && text.len() > max
    {
        r.outcome = Some(Outcome::Error(pb::TaskError {
            code: "output_too_large".to_owned(),
            message: format!(
                "the output is {} bytes, the limit (max_result_bytes) is {max}",
                text.len()
            ),
            retryable: false,
        }));
    }
    frame
}

#[tonic::async_trait]
impl pb::node_service_server::NodeService for NodeApi {
    type ConnectStream = FrameStream;

    async fn connect(
        &self,
        request: Request<Streaming<pb::NodeFrame>>,
    ) -> Result<Response<FrameStream>, Status> {
        let caller = super::Caller::of(&request)?;
        let (namespaces, certificate) = (caller.namespaces, caller.certificate);
        let bound = self.handles.config.registry.max_unregistered_streams;
        let permit = Arc::clone(&self.unregistered)
            .try_acquire_owned()
            .map_err(|_| {
                Status::resource_exhausted(format!(
                    "{bound} node streams are open without having registered (max_unregistered_streams); register promptly, or retry later"
                ))
            })?;
        let register_within = self.handles.config.registry.register_within;
        let max_result = self
            .handles
            .config
            .dispatch
            .max_result_bytes
            .min(mesh_proto::convert::MAX_JSON_BYTES);
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(self.handles.config.dispatch.node_queue);
        let args = NodeSessionArgs {
            registry: self.handles.registry.clone(),
            dispatcher: self.handles.dispatcher.clone(),
            tx,
            peer,
            namespaces,
            certificate,
        };
        let (session, _) = Actor::spawn_linked(None, NodeSession, args, self.handles.root.clone())
            .await
            .map_err(|e| Status::unavailable(format!("could not start a node session: {e}")))?;
        tokio::spawn(async move {
            // The first frame must come in time; until it has, the stream holds a permit.
            let mut permit = Some(permit);
            let why = loop {
                let next = if permit.is_some() {
                    match tokio::time::timeout(register_within, inbound.message()).await {
                        Ok(next) => next,
                        Err(_) => {
                            let _ = session.cast(NodeSessionMsg::Close(
                                Code::DeadlineExceeded,
                                format!(
                                    "no `register` frame within {} of opening the stream",
                                    humantime::format_duration(register_within)
                                ),
                            ));
                            return;
                        }
                    }
                } else {
                    inbound.message().await
                };
                permit = None;
                match next {
                    Ok(Some(frame)) => match FromNode::try_from(cap_result(frame, max_result)) {
                        Ok(frame) => {
                            if session.cast(NodeSessionMsg::Frame(frame)).is_err() {
                                break "session stopped".to_owned();
                            }
                        }
                        Err(e) => {
                            let _ = session.cast(NodeSessionMsg::Close(
                                Code::InvalidArgument,
                                format!("invalid frame: {e}"),
                            ));
                            return;
                        }
                    },
                    Ok(None) => break "node closed the stream".to_owned(),
                    Err(status) => {
                        if let Some((code, reason)) = inbound_fault(&status) {
                            let _ = session.cast(NodeSessionMsg::Close(code, reason));
                            return;
                        }
                        break format!("stream error: {}", status.message());
                    }
                }
            };
            let _ = session.cast(NodeSessionMsg::Closed(why));
        });
        // A `Close` ends the stream with its status; nothing is sent after it.
        let outbound = ReceiverStream::new(rx).scan(false, |done, item| {
            if *done {
                return std::future::ready(None);
            }
            let out = match item {
                Outbound::Frame(frame) => Ok(pb::CoordinatorFrame::from(frame)),
                Outbound::Close(code, reason) => {
                    *done = true;
                    Err(Status::new(code, reason))
                }
            };
            std::future::ready(Some(out))
        });
        Ok(Response::new(Box::pin(outbound)))
    }
}
