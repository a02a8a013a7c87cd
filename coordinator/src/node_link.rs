//! The coordinator's side of a node stream, as the rest of the coordinator sees it: the
//! frames that go down it and the bounded channel they go through. Only the node session,
//! the registry and the dispatcher (which own streams) write frames; a run answers a result
//! through a [`ResultAck`], without knowing the wire.

use mesh_proto::domain::{AckCode, FencingToken, ToNode};
use tokio::sync::mpsc;

/// What goes down a node's stream.
#[derive(Debug)]
pub enum Outbound {
    Frame(ToNode),
    /// End the stream with this status.
    Close(tonic::Code, String),
}

pub type NodeTx = mpsc::Sender<Outbound>;

/// Where a run answers one result: accepted once journaled, or stale. Dropping it sends
/// nothing (the node sends the result again after a reconnect).
#[derive(Debug)]
pub struct ResultAck {
    tx: NodeTx,
    token: FencingToken,
}

impl ResultAck {
    pub fn new(tx: NodeTx, token: FencingToken) -> Self {
        Self { tx, token }
    }

    pub fn send(self, code: AckCode, message: String) {
        let _ = self.tx.try_send(Outbound::Frame(ToNode::ResultAck {
            token: self.token,
            code,
            message,
        }));
    }
}
