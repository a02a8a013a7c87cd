//! The node runtime: hosts agents and keeps them connected to the coordinator.
//!
//! ```text
//! NodeRoot (supervisor)
//!  ├─ Connection        stream, registration, heartbeats, reconnects, result buffer
//!  └─ AgentActor × N    one per hosted agent; restarted after a panic within a budget
//! ```

mod agent_actor;
mod connection;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use mesh_proto::convert::check_id;
use mesh_proto::domain::{AgentCard, FencingToken};
use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SpawnErr, SupervisionEvent};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::agent::{Agent, Progress};
use crate::error::{Error, Result};
use crate::metrics as m;
use agent_actor::{AgentActor, AgentArgs, AgentMsg};
use connection::{ConnArgs, ConnMsg, Connection};

/// How a node runtime connects and behaves.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Coordinator gRPC address, e.g. `http://127.0.0.1:7700`.
    pub coordinator: String,
    /// This node's stable name (its node id).
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Deadline for opening the stream.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
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
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            coordinator: "http://127.0.0.1:7700".into(),
            name: "node".into(),
            labels: BTreeMap::new(),
            connect_timeout: Duration::from_secs(5),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            drain_grace: Duration::from_secs(30),
            restart_budget: 5,
            restart_window: Duration::from_secs(30),
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
        progress: mpsc::Sender<(FencingToken, Progress)>,
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
        progress: mpsc::Sender<(FencingToken, Progress)>,
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

/// Builds a [`NodeRuntime`].
#[derive(Default)]
pub struct NodeRuntimeBuilder {
    config: RuntimeConfig,
    agents: Vec<Arc<dyn Hosted>>,
}

impl NodeRuntimeBuilder {
    pub fn config(mut self, config: RuntimeConfig) -> Self {
        self.config = config;
        self
    }

    pub fn coordinator(mut self, url: impl Into<String>) -> Self {
        self.config.coordinator = url.into();
        self
    }

    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.config.name = name.into();
        self
    }

    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.labels.insert(key.into(), value.into());
        self
    }

    pub fn drain_grace(mut self, grace: Duration) -> Self {
        self.config.drain_grace = grace;
        self
    }

    pub fn agent<A: Agent>(mut self, agent: A) -> Self {
        self.agents.push(Arc::new(HostedAgent(Arc::new(agent))));
        self
    }

    /// Checks the configuration and every agent card.
    pub fn build(self) -> Result<NodeRuntime> {
        check_id("name", &self.config.name).map_err(|e| Error::Config(e.to_string()))?;
        crate::client::check_coordinator_url(&self.config.coordinator)
            .map_err(|e| Error::Config(format!("coordinator: {e}")))?;
        if self.agents.is_empty() {
            return Err(Error::Config(
                "agents: a node needs at least one agent".into(),
            ));
        }
        let mut seen = HashMap::new();
        for (i, agent) in self.agents.iter().enumerate() {
            let card = agent.card();
            check_id(&format!("agents[{i}].name"), &card.name)
                .map_err(|e| Error::Config(e.to_string()))?;
            if card.skills.is_empty() {
                return Err(Error::Config(format!(
                    "agents[{i}].skills: agent `{}` has no skill",
                    card.name
                )));
            }
            if card.max_concurrency == 0 {
                return Err(Error::Config(format!(
                    "agents[{i}].max_concurrency: must be at least 1"
                )));
            }
            if let Some(first) = seen.insert(card.name.clone(), i) {
                return Err(Error::Config(format!(
                    "agents[{i}].name: `{}` already used by agents[{first}]",
                    card.name
                )));
            }
        }
        Ok(NodeRuntime {
            config: self.config,
            agents: self.agents,
        })
    }
}

/// Hosts agents on this node until told to stop.
pub struct NodeRuntime {
    config: RuntimeConfig,
    agents: Vec<Arc<dyn Hosted>>,
}

impl std::fmt::Debug for NodeRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeRuntime")
            .field("config", &self.config)
            .field("agents", &self.agents.len())
            .finish()
    }
}

impl NodeRuntime {
    pub fn builder() -> NodeRuntimeBuilder {
        NodeRuntimeBuilder::default()
    }

    /// Runs until `shutdown` resolves (or the coordinator asks the node to drain), then
    /// drains: in-flight attempts finish (up to `drain_grace`), no new ones are taken, and the
    /// node leaves cleanly.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        crate::metrics::describe();
        let grace = self.config.drain_grace;
        let (finished_tx, mut finished_rx) = watch::channel(false);
        let args = RootArgs {
            config: self.config,
            agents: self.agents,
            finished: finished_tx,
        };
        let (root, root_handle) = Actor::spawn(None, NodeRoot, args)
            .await
            .map_err(|e| Error::Runtime(format!("could not start the node: {e}")))?;
        let conn = ractor::call_t!(root, RootMsg::Connection, 5_000)
            .map_err(|e| Error::Runtime(format!("node root did not answer: {e}")))?;
        tokio::select! {
            _ = shutdown => info!("shutdown requested"),
            _ = finished_rx.wait_for(|done| *done) => info!("drained at the coordinator's request"),
        }
        let drained = conn
            .call(|reply| ConnMsg::Drain(Some(reply)), Some(grace))
            .await;
        if !matches!(drained, Ok(ractor::rpc::CallResult::Success(()))) && !*finished_rx.borrow() {
            warn!(
                grace_ms = grace.as_millis() as u64,
                "drain grace period over; leaving with attempts in flight"
            );
        }
        root.stop(Some("shutdown".into()));
        let _ = root_handle.await;
        Ok(())
    }
}

enum RootMsg {
    Connection(ractor::RpcReplyPort<ActorRef<ConnMsg>>),
    /// Sent to itself once an agent's restart backoff has passed.
    Respawn(usize),
}

struct NodeRoot;

struct RootArgs {
    config: RuntimeConfig,
    agents: Vec<Arc<dyn Hosted>>,
    finished: watch::Sender<bool>,
}

struct RootState {
    config: RuntimeConfig,
    agents: Vec<Arc<dyn Hosted>>,
    names: Vec<String>,
    table: AgentTable,
    conn: ActorRef<ConnMsg>,
    progress: mpsc::Sender<(FencingToken, Progress)>,
    /// Actor id of each live agent actor, by agent index.
    ids: HashMap<ActorId, usize>,
    restarts: Vec<Vec<Instant>>,
}

impl RootState {
    async fn spawn_agent(
        &mut self,
        myself: &ActorRef<RootMsg>,
        i: usize,
    ) -> Result<(), ActorProcessingErr> {
        let agent = self.agents[i]
            .spawn(self.conn.clone(), self.progress.clone(), myself.get_cell())
            .await?;
        self.ids.insert(agent.get_id(), i);
        self.table.set(&self.names[i], AgentSlot::Live(agent));
        let _ = self.conn.cast(ConnMsg::AgentBack(self.names[i].clone()));
        Ok(())
    }
}

impl Actor for NodeRoot {
    type Msg = RootMsg;
    type State = RootState;
    type Arguments = RootArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: RootArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let table = AgentTable::default();
        let cards: Vec<AgentCard> = args.agents.iter().map(|a| a.card()).collect();
        let names = cards.iter().map(|c| c.name.clone()).collect();
        let conn_args = ConnArgs {
            config: args.config.clone(),
            cards,
            agents: table.clone(),
            finished: args.finished,
        };
        let (conn, _) = Actor::spawn_linked(None, Connection, conn_args, myself.get_cell()).await?;
        // Progress reports go through one bounded channel to the connection.
        let (progress, mut progress_rx) = mpsc::channel::<(FencingToken, Progress)>(256);
        let conn_for_progress = conn.clone();
        tokio::spawn(async move {
            while let Some((token, p)) = progress_rx.recv().await {
                if conn_for_progress.cast(ConnMsg::Progress(token, p)).is_err() {
                    break;
                }
            }
        });
        let n = args.agents.len();
        let mut st = RootState {
            config: args.config,
            agents: args.agents,
            names,
            table,
            conn,
            progress,
            ids: HashMap::new(),
            restarts: vec![Vec::new(); n],
        };
        for i in 0..n {
            st.spawn_agent(&myself, i).await?;
        }
        Ok(st)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RootMsg::Connection(reply) => {
                let _ = reply.send(st.conn.clone());
            }
            RootMsg::Respawn(i) => {
                info!(agent = %st.names[i], "restarting agent");
                st.spawn_agent(&myself, i).await?;
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorFailed(cell, err) => {
                let Some(i) = st.ids.remove(&cell.get_id()) else {
                    // The connection failed: without it the node cannot work.
                    error!(error = %err, "connection actor failed; stopping the node");
                    myself.stop(Some("connection failed".into()));
                    return Ok(());
                };
                let name = st.names[i].clone();
                st.table.set(&name, AgentSlot::Restarting);
                metrics::counter!(m::AGENT_RESTARTS, "agent" => name.clone()).increment(1);
                let now = Instant::now();
                let window = st.config.restart_window;
                let history = &mut st.restarts[i];
                history.retain(|t| now.duration_since(*t) < window);
                if history.len() as u32 >= st.config.restart_budget {
                    error!(agent = %name, restarts = history.len(), "agent exhausted its restart budget; reporting it down");
                    st.table.set(&name, AgentSlot::Absent);
                    let _ = st.conn.cast(ConnMsg::AgentDown {
                        agent: name,
                        reason: format!(
                            "restarted {} times within {window:?}; last: {err}",
                            history.len()
                        ),
                    });
                    return Ok(());
                }
                history.push(now);
                let delay =
                    Duration::from_millis(100).saturating_mul(1 << (history.len() - 1).min(6));
                warn!(agent = %name, error = %err, delay_ms = delay.as_millis() as u64, "agent failed; restarting after backoff");
                myself.send_after(delay, move || RootMsg::Respawn(i));
            }
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                if cell.get_id() == st.conn.get_id() {
                    myself.stop(Some("connection finished".into()));
                }
            }
            SupervisionEvent::ActorStarted(_) | SupervisionEvent::ProcessGroupChanged(_) => {}
        }
        Ok(())
    }
}
