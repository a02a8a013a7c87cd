//! What both backends share about writes: one writer that commits waiting writes in groups
//! (up to [`MAX_GROUP`]), each write applied in its own savepoint, every caller answered once
//! the group's commit is known. A caller's write is durable when its answer comes.

use tokio::sync::{mpsc, oneshot};

use mesh_proto::domain::*;

use super::{JournalEvent, NewRun, NewWorkflow};
use crate::auth::{AuditEntry, TokenRecord};
use crate::error::{Error, Result};
use crate::memory::NewMemory;
use crate::postbox::{MessageKey, StoredMessage};
use crate::secrets::SealedSecret;
use crate::tools::ToolRecord;

/// Writes waiting for the writer; past it callers wait (backpressure).
const WRITE_QUEUE: usize = 4096;
/// Most writes committed together.
pub const MAX_GROUP: usize = 512;

/// A write for the writer, with where to send its answer.
pub(crate) enum WriteOp {
    BumpEpoch(oneshot::Sender<Result<u64>>),
    Submit(Box<NewRun>, oneshot::Sender<Result<RunRef>>),
    Record {
        run_id: RunId,
        seq: u64,
        events: Vec<JournalEvent>,
        reply: RecordReply,
    },
    AddMember(GoalId, SwarmMember, oneshot::Sender<Result<()>>),
    /// A write of nothing that matters, to learn whether the store can be written.
    Probe(oneshot::Sender<Result<()>>),
    Register(
        Box<NewWorkflow>,
        oneshot::Sender<Result<(WorkflowRecord, bool)>>,
    ),
    PutToken(Box<TokenRecord>, oneshot::Sender<Result<()>>),
    PutSecret(Box<SealedSecret>, oneshot::Sender<Result<()>>),
    DeleteSecret(String, String, oneshot::Sender<Result<()>>),
    PutTool(Box<ToolRecord>, oneshot::Sender<Result<()>>),
    PutMessages(Vec<StoredMessage>, oneshot::Sender<Result<()>>),
    DeleteMessage(MessageKey, oneshot::Sender<Result<()>>),
    DeleteTool(String, String, oneshot::Sender<Result<()>>),
    Audit(Vec<AuditEntry>, oneshot::Sender<Result<()>>),
    PutMemory(Box<NewMemory>, oneshot::Sender<Result<()>>),
    /// Namespace, scope, key.
    DeleteMemory(String, String, String, oneshot::Sender<Result<()>>),
}

/// A write applied inside the group's transaction, waiting for the commit to answer.
pub(crate) enum Applied {
    Epoch(oneshot::Sender<Result<u64>>, Result<u64>),
    Submit(oneshot::Sender<Result<RunRef>>, Result<RunRef>),
    Record(
        oneshot::Sender<(Vec<JournalEvent>, Result<()>)>,
        Vec<JournalEvent>,
        Result<()>,
    ),
    Member(oneshot::Sender<Result<()>>, Result<()>),
    Probe(oneshot::Sender<Result<()>>, Result<()>),
    Register(
        oneshot::Sender<Result<(WorkflowRecord, bool)>>,
        Result<(WorkflowRecord, bool)>,
    ),
}

/// Why a whole group of writes failed, told to each of its writes: a lost lease keeps its kind
/// (callers see `UNAVAILABLE`: another coordinator leads), anything else is the store's.
#[derive(Clone, Debug)]
pub(crate) enum GroupError {
    Deposed(u64),
    Commit(String),
}

impl GroupError {
    fn error(&self) -> Error {
        match self {
            GroupError::Deposed(epoch) => Error::Deposed(*epoch),
            GroupError::Commit(why) => Error::Commit(why.clone()),
        }
    }
}

impl From<Error> for GroupError {
    fn from(e: Error) -> Self {
        match e {
            Error::Deposed(epoch) => GroupError::Deposed(epoch),
            other => GroupError::Commit(other.to_string()),
        }
    }
}

impl Applied {
    pub(crate) fn from_failed(op: WriteOp, why: &GroupError) -> Applied {
        fn err<T>(why: &GroupError) -> Result<T> {
            Err(why.error())
        }
        match op {
            WriteOp::BumpEpoch(reply) => Applied::Epoch(reply, err(why)),
            WriteOp::Submit(_, reply) => Applied::Submit(reply, err(why)),
            WriteOp::Record { events, reply, .. } => Applied::Record(reply, events, err(why)),
            WriteOp::AddMember(_, _, reply) => Applied::Member(reply, err(why)),
            WriteOp::Probe(reply) => Applied::Probe(reply, err(why)),
            WriteOp::Register(_, reply) => Applied::Register(reply, err(why)),
            WriteOp::PutToken(_, reply)
            | WriteOp::PutSecret(_, reply)
            | WriteOp::DeleteSecret(_, _, reply)
            | WriteOp::PutTool(_, reply)
            | WriteOp::PutMessages(_, reply)
            | WriteOp::DeleteMessage(_, reply)
            | WriteOp::DeleteTool(_, _, reply)
            | WriteOp::PutMemory(_, reply)
            | WriteOp::DeleteMemory(_, _, _, reply)
            | WriteOp::Audit(_, reply) => Applied::Probe(reply, err(why)),
        }
    }

    /// Sends the result; a failure of the whole group replaces every success.
    pub(crate) fn answer(self, commit_error: Option<&GroupError>) {
        fn or_commit<T>(r: Result<T>, e: Option<&GroupError>) -> Result<T> {
            match e {
                Some(e) => Err(e.error()),
                None => r,
            }
        }
        match self {
            Applied::Epoch(reply, r) => drop(reply.send(or_commit(r, commit_error))),
            Applied::Submit(reply, r) => drop(reply.send(or_commit(r, commit_error))),
            Applied::Record(reply, events, r) => {
                drop(reply.send((events, or_commit(r, commit_error))))
            }
            Applied::Member(reply, r) | Applied::Probe(reply, r) => {
                drop(reply.send(or_commit(r, commit_error)))
            }
            Applied::Register(reply, r) => drop(reply.send(or_commit(r, commit_error))),
        }
    }
}

fn writer_gone() -> Error {
    Error::Unavailable("store writer")
}

/// Where the answer to a `WriteOp::Record` goes: the events back, and the result.
pub(crate) type RecordReply = oneshot::Sender<(Vec<JournalEvent>, Result<()>)>;

/// Where a backend's writes queue for its writer.
#[derive(Clone)]
pub struct Writer(pub(crate) mpsc::Sender<WriteOp>);

impl Writer {
    /// A queue for a new writer, which takes its writes from the receiver.
    pub(crate) fn new() -> (Writer, mpsc::Receiver<WriteOp>) {
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        (Writer(tx), rx)
    }

    /// Hands `op` to the writer and waits for its answer.
    pub(crate) async fn send<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<T>) -> WriteOp,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.0.send(op(tx)).await.map_err(|_| writer_gone())?;
        rx.await.map_err(|_| writer_gone())
    }
}
