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
use crate::store::Backend;
use crate::swarm::{Swarm, SwarmArgs};

/// A swarm's actor name is this, its run's id, `#` and a number: a failed swarm's run is
/// found by it.
const SWARM_PREFIX: &str = "swarm/";

/// How long a failed swarm's run has to stop before it is resumed under a new swarm.
const CHILD_STOP: std::time::Duration = std::time::Duration::from_secs(5);

pub enum SwarmsMsg {
    /// Start runs that are unfinished in the store and not live (at start-up and after a restart).
    Resume,
    /// The dispatcher lost its in-flight attempts: every live run dispatches again.
    RedispatchAll,
    /// Panics: for the tests of the restart paths.
    #[cfg(test)]
    Crash,
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
    // Unique, so that a new swarm never waits for a failed one's name to be released.
    static SPAWNED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SPAWNED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!("{SWARM_PREFIX}{}#{n}", args.run_id);
    Actor::spawn_linked(Some(name), Swarm, args, supervisor.get_cell())
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
                let runs = st.deps.store.unfinished_runs().await?;
                let mut resumed = 0;
                for run_id in runs {
                    if st.deps.directory.is_live(&run_id) {
                        continue;
                    }
                    // Not live, so nothing changes it before its run starts from this.
                    let stored = st.deps.store.load_run(&run_id).await?;
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
            #[cfg(test)]
            SwarmsMsg::Crash => panic!("swarm supervisor crashed on purpose (a test)"),
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
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // A swarm restarts its own run. A failed swarm leaves its run without a supervisor:
        // the run is stopped (it retires from the directory) and resumed at once under a new
        // swarm, without waiting for the coordinator's next start.
        if let SupervisionEvent::ActorFailed(swarm, err) = evt {
            metrics::counter!(m::ACTOR_RESTARTS, "actor" => "swarm").increment(1);
            warn!(error = %err, "swarm failed; its run is resumed under a new one");
            // The failed swarm's run is found by the swarm's name. It may be stopped already
            // (killed with its parent, so it did not retire): it is stopped if need be, and
            // its directory entry goes either way.
            let run_id = swarm.get_name().and_then(|n| {
                let (id, _) = n.strip_prefix(SWARM_PREFIX)?.split_once('#')?;
                Some(RunId(id.to_owned()))
            });
            if let Some(id) = run_id
                && let Some(run) = st.deps.directory.get(&id)
            {
                let _ = run
                    .stop_and_wait(Some("its swarm failed".into()), Some(CHILD_STOP))
                    .await;
                st.deps.directory.forget(&id, run.get_id());
            }
            myself.cast(SwarmsMsg::Resume)?;
        }
        Ok(())
    }
}
