//! `mesh.v1.NodeService`: one bidirectional stream per node, handed to a `NodeSession`.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use mesh_proto::domain::FromNode;
use mesh_proto::pb;
use ractor::Actor;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::node_session::{NodeSession, NodeSessionArgs, NodeSessionMsg, Outbound};
use crate::root::Handles;

#[derive(Clone, Debug)]
pub struct NodeApi {
    pub handles: Handles,
}

type FrameStream = Pin<Box<dyn Stream<Item = Result<pb::CoordinatorFrame, Status>> + Send>>;

#[tonic::async_trait]
impl pb::node_service_server::NodeService for NodeApi {
    type ConnectStream = FrameStream;

    async fn connect(
        &self,
        request: Request<Streaming<pb::NodeFrame>>,
    ) -> Result<Response<FrameStream>, Status> {
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
        };
        let (session, _) = Actor::spawn_linked(None, NodeSession, args, self.handles.root.clone())
            .await
            .map_err(|e| Status::unavailable(format!("could not start a node session: {e}")))?;
        tokio::spawn(async move {
            let why = loop {
                match inbound.message().await {
                    Ok(Some(frame)) => match FromNode::try_from(frame) {
                        Ok(frame) => {
                            if session.cast(NodeSessionMsg::Frame(frame)).is_err() {
                                break "session stopped".to_owned();
                            }
                        }
                        Err(e) => {
                            let _ =
                                session.cast(NodeSessionMsg::Close(format!("invalid frame: {e}")));
                            return;
                        }
                    },
                    Ok(None) => break "node closed the stream".to_owned(),
                    Err(status) => break format!("stream error: {}", status.message()),
                }
            };
            let _ = session.cast(NodeSessionMsg::Closed(why));
        });
        // A `Close` ends the stream with FAILED_PRECONDITION; nothing is sent after it.
        let outbound = ReceiverStream::new(rx).scan(false, |done, item| {
            if *done {
                return std::future::ready(None);
            }
            let out = match item {
                Outbound::Frame(frame) => Ok(pb::CoordinatorFrame::from(frame)),
                Outbound::Close(reason) => {
                    *done = true;
                    Err(Status::failed_precondition(reason))
                }
            };
            std::future::ready(Some(out))
        });
        Ok(Response::new(Box::pin(outbound)))
    }
}
