//! The `SwarmSupervisor`: parent of every `Swarm`, which [`start_swarm`] starts for a stored
//! goal (`intake.rs` accepts goals). At start-up the supervisor resumes every unfinished run
//! found in the store.
//! Child of `CoordinatorRoot`; parent of every `Swarm`.

use mesh_proto::domain::*;
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::metrics as m;
use crate::run::{Begin, RunDeps, RunMsg};
use crate::swarm::{Swarm, SwarmArgs};

pub enum SwarmsMsg {
    /// Start runs that are unfinished in the store and not live (at start-up and after a restart).
    Resume,
    /// The dispatcher lost its in-flight attempts: every live run dispatches again.
    RedispatchAll,
}

/// Starts the swarm of a stored goal under `supervisor`; its run starts from `begin`.
pub async fn start_swarm(
    deps: &RunDeps,
    supervisor: &ActorRef<SwarmsMsg>,
    goal_id: GoalId,
    run_id: RunId,
    begin: Begin,
) -> Result<()> {
    let args = SwarmArgs {
        goal_id,
        run_id,
        deps: deps.clone(),
        begin,
    };
    Actor::spawn_linked(None, Swarm, args, supervisor.get_cell())
        .await
        .map_err(|_| Error::Unavailable("swarm"))?;
    Ok(())
}

pub struct SwarmSupervisor;

pub struct SwarmsState {
    deps: RunDeps,
}

impl Actor for SwarmSupervisor {
    type Msg = SwarmsMsg;
    type State = SwarmsState;
    type Arguments = RunDeps;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        deps: RunDeps,
    ) -> Result<Self::State, ActorProcessingErr> {
        myself.cast(SwarmsMsg::Resume)?;
        Ok(SwarmsState { deps })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SwarmsMsg::Resume => {
                let runs = st.deps.store.unfinished_runs()?;
                let mut resumed = 0;
                for run_id in runs {
                    if st.deps.directory.contains(&run_id) {
                        continue;
                    }
                    // Not live, so nothing changes it before its run starts from this.
                    let stored = st.deps.store.load_run(&run_id)?;
                    let goal_id = stored.goal_id.clone();
                    start_swarm(
                        &st.deps,
                        &myself,
                        goal_id,
                        run_id,
                        Begin::Stored(Box::new(stored)),
                    )
                    .await?;
                    resumed += 1;
                }
                if resumed > 0 {
                    info!(resumed, "unfinished runs resumed");
                }
                st.deps.readiness.started();
            }
            SwarmsMsg::RedispatchAll => {
                for run in st.deps.directory.all() {
                    let _ = run.cast(RunMsg::Redispatch);
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        _st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // A swarm restarts its own run; a swarm itself only fails on a store error, and its
        // run is then picked up again by the next `Resume`.
        if let SupervisionEvent::ActorFailed(_, err) = evt {
            metrics::counter!(m::ACTOR_RESTARTS, "actor" => "swarm").increment(1);
            warn!(error = %err, "swarm failed");
        }
        Ok(())
    }
}
