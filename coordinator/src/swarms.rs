//! Accepts goals: stores each goal and its run (durably, before answering), then starts a
//! `Swarm` for it. At start-up it resumes every unfinished run found in the store.
//! Child of `CoordinatorRoot`; parent of every `Swarm`.
//!
//! Invariant: a goal is acknowledged only after the store has committed it.

use mesh_proto::domain::*;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tracing::{info, warn};

use crate::error::Result;
use crate::metrics as m;
use crate::run::{RunDeps, RunMsg};
use crate::swarm::{Swarm, SwarmArgs};

pub enum SwarmsMsg {
    Submit(GoalSpec, RpcReplyPort<Result<RunRef>>),
    /// Start runs that are unfinished in the store and not live (at start-up and after a restart).
    Resume,
    /// The dispatcher lost its in-flight attempts: every live run dispatches again.
    RedispatchAll,
}

pub struct SwarmSupervisor;

pub struct SwarmsState {
    deps: RunDeps,
}

impl SwarmsState {
    async fn start(
        &self,
        myself: &ActorRef<SwarmsMsg>,
        goal_id: GoalId,
        run_id: RunId,
    ) -> Result<(), ActorProcessingErr> {
        let args = SwarmArgs {
            goal_id,
            run_id,
            deps: self.deps.clone(),
        };
        Actor::spawn_linked(None, Swarm, args, myself.get_cell()).await?;
        Ok(())
    }
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
            SwarmsMsg::Submit(goal, reply) => match st.deps.store.submit(&goal) {
                Ok(run) => {
                    if run.created {
                        info!(run_id = %run.run_id, goal_id = %run.goal_id, steps = goal.steps.len(), "goal accepted");
                        st.start(&myself, run.goal_id.clone(), run.run_id.clone())
                            .await?;
                    }
                    let _ = reply.send(Ok(run));
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            SwarmsMsg::Resume => {
                let runs = st.deps.store.unfinished_runs()?;
                let mut resumed = 0;
                for run_id in runs {
                    if st.deps.directory.contains(&run_id) {
                        continue;
                    }
                    let stored = st.deps.store.load_run(&run_id)?;
                    st.start(&myself, stored.goal_id, run_id).await?;
                    resumed += 1;
                }
                if resumed > 0 {
                    info!(resumed, "unfinished runs resumed");
                }
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
