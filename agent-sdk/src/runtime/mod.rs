//! The node runtime: hosts agents and keeps them connected to the coordinator.
//!
//! ```text
//! NodeRoot (supervisor)            root.rs
//!  ├─ Connection        stream, registration, heartbeats, reconnects (connection.rs);
//!  │                    its decisions on attempts and results in a plain `Ledger` (ledger.rs)
//!  └─ AgentActor × N    one per hosted agent; restarted after a panic within a budget
//! ```
//!
//! The public face, `NodeRuntime` and its builder, is in `builder.rs`.

mod agent_actor;
mod builder;
pub(crate) mod connection;
mod ledger;
mod root;

pub use builder::{NodeRuntime, NodeRuntimeBuilder};

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use mesh_proto::domain::{AgentCard, FencingToken};
use ractor::{Actor, ActorCell, ActorRef, SpawnErr};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::agent::{Agent, Report};
use agent_actor::{AgentActor, AgentArgs, AgentMsg};
use connection::ConnMsg;

/// How a node runtime connects and behaves.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Coordinator gRPC address, e.g. `http://127.0.0.1:7700`; several, comma-separated,
    /// when coordinators share a PostgreSQL store (tried in turn until the leader takes the
    /// stream).
    pub coordinator: String,
    /// This node's stable name (its node id).
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Deadline for opening the stream.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long the coordinator may leave the connection's HTTP/2 pings (one every fifth of
    /// it) unanswered before the node drops the stream and tries the next address: a paused
    /// or cut-off coordinator is left within it, as a dead one at once.
    #[serde(with = "humantime_serde")]
    pub coordinator_silence: Duration,
    /// First reconnect delay; doubled up to `reconnect_max`, with jitter.
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// How long a drain waits for in-flight attempts before leaving anyway.
    #[serde(with = "humantime_serde")]
    pub drain_grace: Duration,
    /// Restarts of one agent allowed within `restart_window`; past it the agent is reported down.
    pub restart_budget: u32,
    #[serde(with = "humantime_serde")]
    pub restart_window: Duration,
    /// A `worker` token for a coordinator with authentication on (`MESH_TOKEN` for the stock
    /// node); sent as `authorization: Bearer …` when the stream opens.
    #[serde(skip_serializing)]
    pub token: Option<crate::llm::Secret>,
    /// The namespaces this node serves (`mesh-namespace: a,b` when the stream opens; its
    /// token must hold the `worker` role in each): it gets the tasks of their runs only.
    /// `default` when empty.
    pub namespaces: Vec<String>,
    /// TLS to an `https://` coordinator: its CA, and this node's certificate and key (a
    /// coordinator with a client CA requires them; the certificate must be for `name`).
    pub tls: crate::client::TlsFiles,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            coordinator: "http://127.0.0.1:7700".into(),
            name: "node".into(),
            labels: BTreeMap::new(),
            connect_timeout: Duration::from_secs(5),
            coordinator_silence: Duration::from_secs(5),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            drain_grace: Duration::from_secs(30),
            restart_budget: 5,
            restart_window: Duration::from_secs(30),
            token: None,
            namespaces: Vec::new(),
            tls: crate::client::TlsFiles::default(),
        }
    }
}

/// Where an agent stands, as the connection sees it.
#[derive(Clone)]
pub(crate) enum AgentSlot {
    Live(ActorRef<AgentMsg>),
    /// Its actor failed and is being restarted: hold its attempts.
    Restarting,
    /// Down (restart budget spent) or never hosted here.
    Absent,
}

/// Agent actors by agent name; written by `NodeRoot`, read by the connection.
#[derive(Clone, Default)]
pub(crate) struct AgentTable(Arc<RwLock<HashMap<String, AgentSlot>>>);

impl AgentTable {
    fn get(&self, name: &str) -> AgentSlot {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .unwrap_or(AgentSlot::Absent)
    }

    fn set(&self, name: &str, slot: AgentSlot) {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), slot);
    }
}

type SpawnFuture = Pin<Box<dyn Future<Output = Result<ActorRef<AgentMsg>, SpawnErr>> + Send>>;

/// An agent of any type, ready to be spawned as many times as it is restarted.
trait Hosted: Send + Sync + 'static {
    fn card(&self) -> AgentCard;
    fn spawn(
        &self,
        conn: ActorRef<ConnMsg>,
        progress: mpsc::Sender<(FencingToken, Report)>,
        supervisor: ActorCell,
    ) -> SpawnFuture;
}

struct HostedAgent<A>(Arc<A>);

impl<A: Agent> Hosted for HostedAgent<A> {
    fn card(&self) -> AgentCard {
        self.0.card()
    }

    fn spawn(
        &self,
        conn: ActorRef<ConnMsg>,
        progress: mpsc::Sender<(FencingToken, Report)>,
        supervisor: ActorCell,
    ) -> SpawnFuture {
        let args = AgentArgs {
            agent: self.0.clone(),
            card: self.0.card(),
            conn,
            progress,
        };
        Box::pin(async move {
            Ok(
                Actor::spawn_linked(None, AgentActor::<A>::default(), args, supervisor)
                    .await?
                    .0,
            )
        })
    }
}
