//! The coordinator's side of a node stream, as the rest of the coordinator sees it: the
//! frames that go down it and the bounded channel they go through. Only the node session,
//! the registry and the dispatcher (which own streams) write frames; a run answers a result
//! through a [`ResultAck`], without knowing the wire.

use mesh_proto::domain::{
    AckCode, FencingToken, SkillCall, TaskDelta, TaskProgress, ToNode, ToolApproval, ToolUsed,
};
use tokio::sync::mpsc;

/// What goes down a node's stream.
// Frames are the hot path and `Close` is sent once per stream: boxing the frame would cost an
// allocation per task to save bytes on a message that is rarely the other variant.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Outbound {
    Frame(ToNode),
    /// End the stream with this status.
    Close(tonic::Code, String),
}

pub type NodeTx = mpsc::Sender<Outbound>;

/// What an agent reports during an attempt: passed on only while the attempt is current.
#[derive(Clone, Debug, PartialEq)]
pub enum Report {
    Progress(TaskProgress),
    /// Text produced so far (a model's tokens, coalesced by the node).
    Delta(TaskDelta),
    /// The attempt calls a skill (journaled by its run, which answers on the node's stream).
    SkillCall(SkillCall),
    /// A tool call waits for a person (journaled by its run, which answers on the stream).
    ToolApproval(ToolApproval),
    /// A tool call the attempt made (journaled by its run).
    ToolUsed(ToolUsed),
}

impl Report {
    pub fn token(&self) -> &FencingToken {
        match self {
            Report::Progress(p) => &p.token,
            Report::Delta(d) => &d.token,
            Report::SkillCall(c) => &c.token,
            Report::ToolApproval(a) => &a.token,
            Report::ToolUsed(u) => &u.token,
        }
    }
}

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
