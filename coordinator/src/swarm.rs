//! One actor per goal: the team of agents assembled for it. It records which agent was
//! picked for each skill and supervises the goal's run: a run that crashes is restarted from
//! the store, within a restart budget; past it the run is failed.
//! Child of `SwarmSupervisor`; parent of `Run`.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use mesh_proto::domain::*;
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use tracing::{error, warn};

use crate::metrics as m;
use crate::run::{Begin, Run, RunArgs, RunDeps};
use crate::store::{Backend, JournalEvent};

/// Restarts of a run allowed within [`RESTART_WINDOW`].
const RESTART_BUDGET: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(30);

pub enum SwarmMsg {
    /// The run handed a step to this agent.
    Member(SwarmMember),
    /// Panics: for the tests of the restart paths.
    #[cfg(test)]
    Crash,
}

pub struct Swarm;

pub struct SwarmArgs {
    pub goal_id: GoalId,
    pub run_id: RunId,
    pub deps: RunDeps,
    /// Where the run starts the first time; restarts read the store.
    pub begin: Begin,
}

pub struct SwarmState {
    goal_id: GoalId,
    run_id: RunId,
    deps: RunDeps,
    begin: Option<Begin>,
    members: HashSet<SwarmMember>,
    restarts: Vec<Instant>,
}

impl SwarmState {
    async fn spawn_run(&mut self, myself: &ActorRef<SwarmMsg>) -> Result<(), ActorProcessingErr> {
        let args = RunArgs {
            run_id: self.run_id.clone(),
            swarm: myself.clone(),
            deps: self.deps.clone(),
            begin: self.begin.take().unwrap_or(Begin::Load),
        };
        Actor::spawn_linked(None, Run, args, myself.get_cell()).await?;
        Ok(())
    }

    /// Records the run as failed after its restart budget is spent.
    async fn give_up(&self, reason: &str) {
        let event = JournalEvent::RunFinished {
            state: RunState::Failed,
            output: None,
            error: Some(format!(
                "run crashed {RESTART_BUDGET} times in {RESTART_WINDOW:?}: {reason}"
            )),
        };
        let result = match self.deps.store.load_run(&self.run_id).await {
            Ok(stored) => self
                .deps
                .store
                .record(&self.run_id, stored.next_seq, vec![event])
                .await
                .map(drop),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            error!(run_id = %self.run_id, error = %e, "could not record the failed run");
        }
    }
}

impl Actor for Swarm {
    type Msg = SwarmMsg;
    type State = SwarmState;
    type Arguments = SwarmArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SwarmArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut st = SwarmState {
            goal_id: args.goal_id,
            run_id: args.run_id,
            deps: args.deps,
            begin: Some(args.begin),
            members: HashSet::new(),
            restarts: Vec::new(),
        };
        st.spawn_run(&myself).await?;
        Ok(st)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SwarmMsg::Member(member) => {
                if st.members.insert(member.clone()) {
                    st.deps.store.add_swarm_member(&st.goal_id, &member).await?;
                }
            }
            #[cfg(test)]
            SwarmMsg::Crash => panic!("swarm crashed on purpose (a test)"),
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
            SupervisionEvent::ActorTerminated(..) => myself.stop(None),
            SupervisionEvent::ActorFailed(run, err) => {
                // A failed run did not retire itself: until it is restarted (or given up)
                // it is not live, and must not be taken for live.
                st.deps.directory.forget(&st.run_id, run.get_id());
                let now = Instant::now();
                st.restarts
                    .retain(|t| now.duration_since(*t) < RESTART_WINDOW);
                metrics::counter!(m::ACTOR_RESTARTS, "actor" => "run").increment(1);
                if st.restarts.len() >= RESTART_BUDGET {
                    error!(run_id = %st.run_id, error = %err, "run exhausted its restart budget; failing it");
                    st.give_up(&err.to_string()).await;
                    myself.stop(None);
                } else {
                    warn!(run_id = %st.run_id, error = %err, "run crashed; restarting it from the store");
                    st.restarts.push(now);
                    st.spawn_run(&myself).await?;
                }
            }
            SupervisionEvent::ActorStarted(_) | SupervisionEvent::ProcessGroupChanged(_) => {}
        }
        Ok(())
    }
}
