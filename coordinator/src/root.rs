//! The coordinator's root supervisor.
//!
//! ```text
//! CoordinatorRoot
//!  ├─ Dispatcher                 agent choice, in-flight attempts, fencing
//!  ├─ Registry                   nodes, agents, heartbeats, leases
//!  ├─ SwarmSupervisor
//!  │   └─ Swarm (one per goal)
//!  │       └─ Run (one per run)
//!  └─ NodeSession (one per connected node)
//! ```
//!
//! A failed singleton is restarted with the same arguments and its new reference is put in
//! its [`Slot`]; then the others are told what it forgot: a new dispatcher gets every live
//! node replayed and every run re-dispatches its in-flight steps; a new registry makes the
//! dispatcher drop its nodes (they register again, their heartbeats being unknown); a new
//! swarm supervisor resumes the unfinished runs that are not live. A failed session is
//! logged: its node reconnects.

use std::time::Duration;

use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent,
};
use tracing::{error, info};

use crate::config::CoordinatorConfig;
use crate::directory::RunDirectory;
use crate::dispatcher::{Dispatcher, DispatcherArgs, DispatcherMsg, LoadBoard, QueueBoard};
use crate::metrics as m;
use crate::registry::{Registry, RegistryArgs, RegistryMsg};
use crate::run::{RetryPolicy, RunDeps};
use crate::slot::Slot;
use crate::store::Store;
use crate::swarms::{SwarmSupervisor, SwarmsMsg};

/// What gRPC adapters and sessions need to reach the actors.
#[derive(Clone, Debug)]
pub struct Handles {
    pub root: ActorCell,
    pub registry: Slot<RegistryMsg>,
    pub dispatcher: Slot<DispatcherMsg>,
    pub swarms: Slot<SwarmsMsg>,
    pub store: Store,
    pub directory: RunDirectory,
    /// What runs are started with; `swarms::submit` needs it.
    pub deps: RunDeps,
    pub config: CoordinatorConfig,
    pub epoch: u64,
}

pub enum RootMsg {
    Handles(RpcReplyPort<Handles>),
}

pub struct CoordinatorRoot;

pub struct RootArgs {
    pub config: CoordinatorConfig,
    pub store: Store,
    pub epoch: u64,
    pub readiness: crate::readiness::Readiness,
    pub secrets: crate::secrets::Vault,
    pub tools: crate::tools::ToolRegistry,
}

pub struct RootState {
    handles: Handles,
    load: LoadBoard,
    deps: RunDeps,
    ids: [ActorId; 3],
    /// When the dispatcher, registry or swarm supervisor were restarted, within the window.
    restarts: Vec<std::time::Instant>,
}

/// Restarts of the root's children allowed within [`RESTART_WINDOW`]; past it the root
/// fails, and the coordinator exits non-zero so that its own supervisor (systemd,
/// Kubernetes) restarts the process.
pub const RESTART_BUDGET: usize = 5;
pub const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// How long a new swarm supervisor waits for the runs stopped with the old one.
const KILLED_RUNS_WAIT: Duration = Duration::from_secs(5);

async fn spawn_dispatcher(
    root: ActorCell,
    config: &CoordinatorConfig,
    load: &LoadBoard,
    queues: &QueueBoard,
    store: &Store,
) -> Result<ActorRef<DispatcherMsg>, ActorProcessingErr> {
    let args = DispatcherArgs {
        config: config.dispatch.clone(),
        load: load.clone(),
        queues: queues.clone(),
        store: store.clone(),
    };
    Ok(Actor::spawn_linked(None, Dispatcher, args, root).await?.0)
}

async fn spawn_registry(
    root: ActorCell,
    config: &CoordinatorConfig,
    epoch: u64,
    dispatcher: &Slot<DispatcherMsg>,
    load: &LoadBoard,
) -> Result<ActorRef<RegistryMsg>, ActorProcessingErr> {
    let args = RegistryArgs {
        config: config.registry.clone(),
        epoch,
        dispatcher: dispatcher.clone(),
        load: load.clone(),
    };
    Ok(Actor::spawn_linked(None, Registry, args, root).await?.0)
}

async fn spawn_swarms(
    root: ActorCell,
    deps: &RunDeps,
) -> Result<ActorRef<SwarmsMsg>, ActorProcessingErr> {
    Ok(
        Actor::spawn_linked(None, SwarmSupervisor, deps.clone(), root)
            .await?
            .0,
    )
}

impl Actor for CoordinatorRoot {
    type Msg = RootMsg;
    type State = RootState;
    type Arguments = RootArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: RootArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let root = myself.get_cell();
        let load = LoadBoard::default();
        let queues = QueueBoard::default();
        let dispatcher = Slot::new(
            spawn_dispatcher(root.clone(), &args.config, &load, &queues, &args.store).await?,
        );
        let registry = Slot::new(
            spawn_registry(root.clone(), &args.config, args.epoch, &dispatcher, &load).await?,
        );
        let directory = RunDirectory::default();
        let deps = RunDeps {
            readiness: args.readiness.clone(),
            store: args.store.clone(),
            dispatcher: dispatcher.clone(),
            directory: directory.clone(),
            epoch: args.epoch,
            policy: RetryPolicy::from_config(&args.config.dispatch),
            limits: mesh_workflow::Limits {
                max_run_output_bytes: args.config.dispatch.max_run_output_bytes,
                ..mesh_workflow::Limits::default()
            },
            supervisor: Default::default(),
            queues,
            secrets: args.secrets.clone(),
            tools: args.tools.clone(),
        };
        let swarms = Slot::new(spawn_swarms(root.clone(), &deps).await?);
        let _ = deps.supervisor.set(swarms.clone());
        let ids = [
            dispatcher.get().get_id(),
            registry.get().get_id(),
            swarms.get().get_id(),
        ];
        info!(epoch = args.epoch, "coordinator started");
        Ok(RootState {
            handles: Handles {
                root,
                registry,
                dispatcher,
                swarms,
                store: args.store,
                directory,
                deps: deps.clone(),
                config: args.config,
                epoch: args.epoch,
            },
            load,
            deps,
            ids,
            restarts: Vec::new(),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RootMsg::Handles(reply) => {
                let _ = reply.send(st.handles.clone());
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
        let SupervisionEvent::ActorFailed(cell, err) = evt else {
            return Ok(());
        };
        let root = myself.get_cell();
        let id = cell.get_id();
        if st.ids.contains(&id) {
            let now = std::time::Instant::now();
            st.restarts
                .retain(|t| now.duration_since(*t) < RESTART_WINDOW);
            if st.restarts.len() >= RESTART_BUDGET {
                error!(error = %err, "the coordinator's actors failed {RESTART_BUDGET} times in {RESTART_WINDOW:?}; stopping");
                return Err(format!(
                    "the coordinator's actors failed {RESTART_BUDGET} times in {RESTART_WINDOW:?} (last: {err})"
                )
                .into());
            }
            st.restarts.push(now);
        }
        let h = &st.handles;
        if id == st.ids[0] {
            error!(error = %err, "dispatcher failed; restarting it");
            metrics::counter!(m::ACTOR_RESTARTS, "actor" => "dispatcher").increment(1);
            let new = spawn_dispatcher(root, &h.config, &st.load, &st.deps.queues, &st.deps.store)
                .await?;
            st.ids[0] = new.get_id();
            h.dispatcher.set(new);
            h.registry.cast(RegistryMsg::Replay);
            h.swarms.cast(SwarmsMsg::RedispatchAll);
        } else if id == st.ids[1] {
            error!(error = %err, "registry failed; restarting it");
            metrics::counter!(m::ACTOR_RESTARTS, "actor" => "registry").increment(1);
            let new = spawn_registry(root, &h.config, h.epoch, &h.dispatcher, &st.load).await?;
            st.ids[1] = new.get_id();
            h.registry.set(new);
            h.dispatcher.cast(DispatcherMsg::ResetNodes);
        } else if id == st.ids[2] {
            error!(error = %err, "swarm supervisor failed; restarting it");
            metrics::counter!(m::ACTOR_RESTARTS, "actor" => "swarms").increment(1);
            // Its swarms and runs were stopped with it (without retiring): wait for them to be
            // gone, so that the new supervisor's Resume finds every run not live.
            let stopping: Vec<ActorCell> = st
                .deps
                .directory
                .all()
                .iter()
                .map(|run| run.get_cell())
                .collect();
            let _ = tokio::time::timeout(
                KILLED_RUNS_WAIT,
                futures::future::join_all(stopping.iter().map(|run| run.wait(None))),
            )
            .await;
            let new = spawn_swarms(root, &st.deps).await?;
            st.ids[2] = new.get_id();
            h.swarms.set(new);
        } else {
            metrics::counter!(m::ACTOR_RESTARTS, "actor" => "node_session").increment(1);
            error!(error = %err, "node session failed; its node will reconnect");
        }
        Ok(())
    }
}
