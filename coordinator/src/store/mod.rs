//! The store boundary: what the coordinator keeps durably (goals, runs, the append-only
//! journal of every run, the members of each swarm, versioned workflows), behind one trait,
//! [`Backend`], so that every backend answers the same contract and passes the same suite
//! (`conformance`, run against each backend).
//!
//! The journal is the record: a run is rebuilt by replaying it (`run::RunMachine::replay`).
//! A backend keeps each run's state and times for listing in step with its journal.
//!
//! Backends: [`SqliteStore`] (embedded, the default) and [`PostgresStore`] (a server several
//! coordinators share). [`Store`] is the one the coordinator
//! holds: an enum over the backends, so that choosing one is a value, not a type parameter
//! threaded through every actor.
//!
//! Invariants every backend keeps: a run's state changes only through [`Backend::record`];
//! a write is acknowledged only once it is durable; a journal entry is written once (a second
//! write of `(run, seq)` fails and changes nothing); one idempotency key has one run, however
//! many submissions race; a workflow version never changes.

use std::future::Future;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use mesh_proto::domain::*;
use mesh_workflow::WorkflowDef;

use crate::auth::{AuditEntry, AuditPage, AuditQuery, TokenRecord};
use crate::error::Result;
use crate::memory::{MemoryEntry, MemoryPage, NewMemory};
use crate::postbox::{MessageKey, StoredMessage};
use crate::secrets::SealedSecret;
use crate::tools::ToolRecord;

mod postgres;
mod sqlite;
mod write;
pub use postgres::{Leader, PostgresStore, redact};
pub use sqlite::SqliteStore;
use write::{WriteOp, Writer};

#[cfg(test)]
pub(crate) mod conformance;

pub use crate::journal::{JournalEvent, StoredGoal};

/// Everything needed to rebuild a run: its goal and its journal.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredRun {
    pub run_id: RunId,
    pub goal_id: GoalId,
    pub goal: StoredGoal,
    pub state: RunState,
    pub events: Vec<JournalEvent>,
    pub swarm: Vec<SwarmMember>,
    pub next_seq: u64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// A goal to store with its run: ids chosen by the caller, the time of submission, and the
/// run's first decisions, journaled in the same write so that its first steps need no write
/// of their own.
#[derive(Clone, Debug)]
pub struct NewRun {
    pub goal: StoredGoal,
    pub goal_id: GoalId,
    pub run_id: RunId,
    pub at_ms: i64,
    pub events: Vec<JournalEvent>,
}

impl NewRun {
    /// Fresh ids for a goal and its run (time-ordered, so the journal's keys append).
    pub fn ids() -> (GoalId, RunId) {
        (
            GoalId(format!("goal-{}", uuid::Uuid::now_v7().simple())),
            RunId(format!("run-{}", uuid::Uuid::now_v7().simple())),
        )
    }
}

/// A workflow version to register: its text as given, and its validated definition.
#[derive(Clone, Debug)]
pub struct NewWorkflow {
    pub source: String,
    pub def: WorkflowDef,
}

/// One page of workflows and the token of the next (`name@version` of the last one).
pub type WorkflowPage = (Vec<WorkflowRecord>, Option<String>);

/// Cuts a page read with one row more than `size`: the extra row, when there is one, says
/// that a next page exists, which starts after the key of the page's last row.
pub(crate) fn cut_page<T, K>(rows: &mut Vec<T>, size: u32, key: impl Fn(&T) -> K) -> Option<K> {
    if rows.len() <= size as usize {
        return None;
    }
    rows.truncate(size as usize);
    rows.last().map(key)
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// What the coordinator asks of a store. Writes are durable when their future resolves Ok.
///
/// Every write goes through the backend's [`Writer`] (one writer committing in groups, see
/// `write`): a backend answers reads and hands out its writer; the writes are the same for all.
pub trait Backend: Clone + Send + Sync + 'static {
    /// Where this backend's writes queue.
    fn writer(&self) -> &Writer;

    /// Increments and returns the coordinator epoch; called once per start.
    fn bump_epoch(&self) -> impl Future<Output = Result<u64>> + Send {
        async { self.writer().send(WriteOp::BumpEpoch).await? }
    }

    /// Stores a new goal and its run (journal entry 0 is `RunCreated`, then the run's first
    /// decisions), or returns the run of an earlier goal with the same idempotency key
    /// (`created: false`); the same key with another request digest is `AlreadyExists`.
    fn submit(&self, new: NewRun) -> impl Future<Output = Result<RunRef>> + Send {
        async {
            self.writer()
                .send(|reply| WriteOp::Submit(Box::new(new), reply))
                .await?
        }
    }

    /// Appends `events` as entries `seq..` of the run's journal, all or none; hands the
    /// events back.
    fn record(
        &self,
        run_id: &RunId,
        seq: u64,
        events: Vec<JournalEvent>,
    ) -> impl Future<Output = Result<Vec<JournalEvent>>> + Send {
        async move {
            let run_id = run_id.clone();
            let (events, result) = self
                .writer()
                .send(|reply| WriteOp::Record {
                    run_id,
                    seq,
                    events,
                    reply,
                })
                .await?;
            result.map(|()| events)
        }
    }

    /// Writes something that does not matter and commits, to learn whether the store can
    /// be written (a full disk, a read-only file system, a lost server).
    fn probe(&self) -> impl Future<Output = Result<()>> + Send {
        async { self.writer().send(WriteOp::Probe).await? }
    }

    /// Records that the swarm of `goal_id` uses `member`; idempotent.
    fn add_swarm_member(
        &self,
        goal_id: &GoalId,
        member: &SwarmMember,
    ) -> impl Future<Output = Result<()>> + Send {
        let (goal_id, member) = (goal_id.clone(), member.clone());
        async {
            self.writer()
                .send(|reply| WriteOp::AddMember(goal_id, member, reply))
                .await?
        }
    }

    /// Registers a workflow version; `false` when this exact content was registered before.
    /// Other content under a taken version is `AlreadyExists`.
    fn register_workflow(
        &self,
        new: NewWorkflow,
    ) -> impl Future<Output = Result<(WorkflowRecord, bool)>> + Send {
        async {
            self.writer()
                .send(|reply| WriteOp::Register(Box::new(new), reply))
                .await?
        }
    }

    /// A workflow version, or its newest version when `version` is `None`;
    /// `WorkflowNotFound` naming `name[@version]` when there is none.
    fn workflow(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> impl Future<Output = Result<WorkflowRecord>> + Send;

    /// Workflows by name, then version, newest first; `after` is the last `name@version` of
    /// the previous page.
    fn list_workflows(
        &self,
        namespace: &Namespace,
        name: Option<&str>,
        page_size: u32,
        after: Option<(String, u32)>,
    ) -> impl Future<Output = Result<WorkflowPage>> + Send;

    /// Whether a goal with this idempotency key is stored.
    fn knows_idempotency_key(&self, key: &str) -> impl Future<Output = Result<bool>> + Send;

    /// Runs not finished yet, oldest first.
    fn unfinished_runs(&self) -> impl Future<Output = Result<Vec<RunId>>> + Send;

    /// When each entry of a run's journal was written (Unix ms), in journal order.
    fn journal_times(&self, run_id: &RunId) -> impl Future<Output = Result<Vec<i64>>> + Send;

    /// The newest finished runs of a namespace whose goal's workflow is named one of `names`
    /// (and is `version`, when given), newest first, at most `limit`.
    fn runs_of_workflow(
        &self,
        namespace: &Namespace,
        names: &[String],
        version: Option<u32>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<RunId>>> + Send;

    /// A run and its whole journal, for replaying it; `RunNotFound` when there is none.
    fn load_run(&self, run_id: &RunId) -> impl Future<Output = Result<StoredRun>> + Send;

    /// One page of runs, newest first.
    fn list_runs(&self, query: &ListRunsQuery) -> impl Future<Output = Result<RunPage>> + Send;

    /// Stores a new token, or a token's revocation.
    fn put_token(&self, token: TokenRecord) -> impl Future<Output = Result<()>> + Send {
        async {
            self.writer()
                .send(|reply| WriteOp::PutToken(Box::new(token), reply))
                .await?
        }
    }

    /// Every token, newest first (hashes, never secrets).
    fn tokens(&self) -> impl Future<Output = Result<Vec<TokenRecord>>> + Send;

    /// Stores a sealed secret, replacing the namespace's earlier one of that name.
    fn put_secret(&self, secret: SealedSecret) -> impl Future<Output = Result<()>> + Send {
        async {
            self.writer()
                .send(|reply| WriteOp::PutSecret(Box::new(secret), reply))
                .await?
        }
    }

    /// Deletes a secret; deleting one that is not there is not an error.
    fn delete_secret(
        &self,
        namespace: &str,
        name: &str,
    ) -> impl Future<Output = Result<()>> + Send {
        let (namespace, name) = (namespace.to_owned(), name.to_owned());
        async {
            self.writer()
                .send(|reply| WriteOp::DeleteSecret(namespace, name, reply))
                .await?
        }
    }

    /// Every secret, sealed.
    fn secrets(&self) -> impl Future<Output = Result<Vec<SealedSecret>>> + Send;

    /// Keeps messages taken by the postbox until they are acknowledged (one per recipient).
    fn put_messages(
        &self,
        messages: Vec<StoredMessage>,
    ) -> impl Future<Output = Result<()>> + Send {
        async {
            self.writer()
                .send(|reply| WriteOp::PutMessages(messages, reply))
                .await?
        }
    }

    /// Forgets an acknowledged (or dropped) message.
    fn delete_message(&self, key: MessageKey) -> impl Future<Output = Result<()>> + Send {
        async {
            self.writer()
                .send(|reply| WriteOp::DeleteMessage(key, reply))
                .await?
        }
    }

    /// Every message kept, oldest first.
    fn messages(&self) -> impl Future<Output = Result<Vec<StoredMessage>>> + Send;

    /// Registers a tool in its namespace, replacing the earlier one of that name.
    fn put_tool(&self, tool: ToolRecord) -> impl Future<Output = Result<()>> + Send {
        async {
            self.writer()
                .send(|reply| WriteOp::PutTool(Box::new(tool), reply))
                .await?
        }
    }

    /// Deletes a registered tool; deleting one that is not there is not an error.
    fn delete_tool(&self, namespace: &str, name: &str) -> impl Future<Output = Result<()>> + Send {
        let (namespace, name) = (namespace.to_owned(), name.to_owned());
        async {
            self.writer()
                .send(|reply| WriteOp::DeleteTool(namespace, name, reply))
                .await?
        }
    }

    /// Every registered tool.
    fn tools(&self) -> impl Future<Output = Result<Vec<ToolRecord>>> + Send;

    /// Appends a memory entry put through the API.
    fn put_memory(&self, new: NewMemory) -> impl Future<Output = Result<()>> + Send {
        async {
            self.writer()
                .send(|reply| WriteOp::PutMemory(Box::new(new), reply))
                .await?
        }
    }

    /// Deletes every entry of a key; deleting a key that is not there is not an error.
    fn delete_memory(
        &self,
        namespace: &str,
        scope: &str,
        key: &str,
    ) -> impl Future<Output = Result<()>> + Send {
        let (n, s, k) = (namespace.to_owned(), scope.to_owned(), key.to_owned());
        async {
            self.writer()
                .send(|reply| WriteOp::DeleteMemory(n, s, k, reply))
                .await?
        }
    }

    /// The newest `last` entries of a key not expired, oldest first.
    fn memory(
        &self,
        namespace: &str,
        scope: &str,
        key: &str,
        last: u32,
    ) -> impl Future<Output = Result<Vec<MemoryEntry>>> + Send;

    /// One page of a namespace's keys (of one scope, when given), by scope then key.
    fn list_memory(
        &self,
        namespace: &str,
        scope: Option<&str>,
        page_size: u32,
        after: Option<(String, String)>,
    ) -> impl Future<Output = Result<MemoryPage>> + Send;

    /// Appends rows to the audit log (append-only: nothing updates or deletes them).
    fn append_audit(&self, rows: Vec<AuditEntry>) -> impl Future<Output = Result<()>> + Send {
        async {
            self.writer()
                .send(|reply| WriteOp::Audit(rows, reply))
                .await?
        }
    }

    /// One page of the audit log, newest first.
    fn list_audit(&self, query: &AuditQuery) -> impl Future<Output = Result<AuditPage>> + Send;
}

/// The store the coordinator holds: one of the backends.
#[derive(Clone, Debug)]
pub enum Store {
    Sqlite(SqliteStore),
    Postgres(PostgresStore),
}

impl Store {
    /// The store the configuration names: PostgreSQL at `store`, or the embedded store in
    /// `data_dir`.
    pub async fn from_config(config: &crate::config::CoordinatorConfig) -> Result<Self> {
        match &config.store {
            None => Self::open(&config.data_dir),
            Some(url) if url.0.starts_with("postgres://") || url.0.starts_with("postgresql://") => {
                let lease = config.cluster.lease;
                Ok(Store::Postgres(
                    PostgresStore::connect(&url.0, lease).await?,
                ))
            }
            Some(url) => Err(crate::error::Error::Fatal(format!(
                "store: `{url}` is not a store this build knows; give postgres://USER@HOST/DATABASE, or no store for the embedded one"
            ))),
        }
    }

    /// The embedded store in `dir` (`<dir>/mesh.db`), created when absent.
    pub fn open(dir: &Path) -> Result<Self> {
        Ok(Store::Sqlite(SqliteStore::open(dir)?))
    }

    /// The store at `dir` as it is when its writer has died: reads work, every write fails.
    #[cfg(test)]
    pub(crate) fn without_writer(dir: &Path) -> Result<Self> {
        Ok(Store::Sqlite(SqliteStore::without_writer(dir)?))
    }
}

/// Forwards a call to the backend the store holds.
macro_rules! on_backend {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            Store::Sqlite($s) => $call,
            Store::Postgres($s) => $call,
        }
    };
}

impl Backend for Store {
    fn writer(&self) -> &Writer {
        on_backend!(self, s => s.writer())
    }
    async fn workflow(&self, name: &str, version: Option<u32>) -> Result<WorkflowRecord> {
        on_backend!(self, s => s.workflow(name, version).await)
    }
    async fn list_workflows(
        &self,
        namespace: &Namespace,
        name: Option<&str>,
        page_size: u32,
        after: Option<(String, u32)>,
    ) -> Result<WorkflowPage> {
        on_backend!(self, s => s.list_workflows(namespace, name, page_size, after).await)
    }
    async fn knows_idempotency_key(&self, key: &str) -> Result<bool> {
        on_backend!(self, s => s.knows_idempotency_key(key).await)
    }
    async fn unfinished_runs(&self) -> Result<Vec<RunId>> {
        on_backend!(self, s => s.unfinished_runs().await)
    }
    async fn journal_times(&self, run_id: &RunId) -> Result<Vec<i64>> {
        on_backend!(self, s => s.journal_times(run_id).await)
    }
    async fn runs_of_workflow(
        &self,
        namespace: &Namespace,
        names: &[String],
        version: Option<u32>,
        limit: u32,
    ) -> Result<Vec<RunId>> {
        on_backend!(self, s => s.runs_of_workflow(namespace, names, version, limit).await)
    }
    async fn load_run(&self, run_id: &RunId) -> Result<StoredRun> {
        on_backend!(self, s => s.load_run(run_id).await)
    }
    async fn list_runs(&self, query: &ListRunsQuery) -> Result<RunPage> {
        on_backend!(self, s => s.list_runs(query).await)
    }
    async fn tokens(&self) -> Result<Vec<TokenRecord>> {
        on_backend!(self, s => s.tokens().await)
    }
    async fn secrets(&self) -> Result<Vec<SealedSecret>> {
        on_backend!(self, s => s.secrets().await)
    }
    async fn messages(&self) -> Result<Vec<StoredMessage>> {
        on_backend!(self, s => s.messages().await)
    }
    async fn tools(&self) -> Result<Vec<ToolRecord>> {
        on_backend!(self, s => s.tools().await)
    }

    async fn memory(
        &self,
        namespace: &str,
        scope: &str,
        key: &str,
        last: u32,
    ) -> Result<Vec<MemoryEntry>> {
        on_backend!(self, s => s.memory(namespace, scope, key, last).await)
    }
    async fn list_memory(
        &self,
        namespace: &str,
        scope: Option<&str>,
        page_size: u32,
        after: Option<(String, String)>,
    ) -> Result<MemoryPage> {
        on_backend!(self, s => s.list_memory(namespace, scope, page_size, after).await)
    }
    async fn list_audit(&self, query: &AuditQuery) -> Result<AuditPage> {
        on_backend!(self, s => s.list_audit(query).await)
    }
}
