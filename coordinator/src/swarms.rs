//! Accepts goals: [`submit`] stores each goal and its run (durably, before answering) and
//! starts a `Swarm` for it under the `SwarmSupervisor`. At start-up the supervisor resumes
//! every unfinished run found in the store.
//! Child of `CoordinatorRoot`; parent of every `Swarm`.
//!
//! Invariant: a goal is acknowledged only after the store has committed it.

use mesh_proto::domain::*;
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::metrics as m;
use crate::run::{Begin, NewStart, RunDeps, RunMachine, RunMsg};
use crate::store::{NewRun, Store, StoredGoal, now_ms};
use crate::swarm::{Swarm, SwarmArgs};
use mesh_workflow::{Limits, StepDef, Workflow, WorkflowDef};

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

/// The skill of agents that turn an objective into a workflow.
pub const PLAN_SKILL: &str = "plan";
/// The id of a text goal's first step, the planner's.
pub const PLANNER_STEP: &str = "planner";

/// Turns a submitted goal into what is stored: its workflow (given as text, or as plain
/// `steps`) parsed and validated, its inputs checked and defaulted. Nothing is stored when
/// anything is wrong, and the error names the field. Returns the validated workflow too, for
/// the run's machine.
pub fn prepare(goal: GoalSpec, limits: &Limits, store: &Store) -> Result<(StoredGoal, Workflow)> {
    let request_digest = goal.idempotency_key.as_ref().map(|_| request_digest(&goal));
    let def = match (&goal.workflow, &goal.workflow_ref) {
        (Some(text), _) => mesh_workflow::parse(text, limits)?,
        // The definition is copied into the goal: the run stays on this version.
        (None, Some(reference)) => {
            let (name, version) = mesh_proto::convert::parse_workflow_ref(reference)?;
            let record = store.workflow(&name, version)?;
            mesh_workflow::parse(&record.definition, limits)?
        }
        // A text goal: an agent with the `plan` skill writes the workflow.
        (None, None) if goal.steps.is_empty() => {
            let def = WorkflowDef {
                description: goal.objective.clone(),
                steps: vec![StepDef {
                    id: PLANNER_STEP.to_owned(),
                    uses: Some(PLAN_SKILL.to_owned()),
                    with: serde_json::json!({ "objective": goal.objective }),
                    ..StepDef::default()
                }],
                ..WorkflowDef::default()
            };
            let workflow = mesh_workflow::validate(def, limits)?;
            let goal = StoredGoal {
                workflow: workflow.def.clone(),
                objective: goal.objective,
                inputs: goal.inputs,
                idempotency_key: goal.idempotency_key,
                planned: true,
                request_digest,
            };
            return Ok((goal, workflow));
        }
        (None, None) => WorkflowDef {
            steps: goal
                .steps
                .iter()
                .map(|s| StepDef {
                    id: s.id.0.clone(),
                    uses: Some(s.uses.clone()),
                    with: s.with.clone(),
                    needs: s.needs.iter().map(|n| n.0.clone()).collect(),
                    ..StepDef::default()
                })
                .collect(),
            ..WorkflowDef::default()
        },
    };
    let workflow = mesh_workflow::validate(def, limits)?;
    check_sub_workflows(&workflow, limits, store)?;
    let inputs = workflow.bind_inputs(&goal.inputs)?;
    let objective = if goal.objective.is_empty() {
        workflow.def.description.clone()
    } else {
        goal.objective
    };
    let goal = StoredGoal {
        objective,
        inputs,
        workflow: workflow.def.clone(),
        idempotency_key: goal.idempotency_key,
        planned: false,
        request_digest,
    };
    Ok((goal, workflow))
}

/// A stable digest of a goal as submitted (64-bit FNV-1a over its JSON, whose object keys
/// are sorted): equal for a retried request, different for another goal.
pub fn request_digest(goal: &GoalSpec) -> String {
    use std::hash::Hasher;
    let mut h = fnv::FnvHasher::default();
    h.write(&serde_json::to_vec(goal).unwrap_or_default());
    format!("{:016x}", h.finish())
}

/// Every sub-workflow the workflow names must be registered (and valid, and not nested
/// too deep).
pub fn check_sub_workflows(workflow: &Workflow, limits: &Limits, store: &Store) -> Result<()> {
    let resolve = |name: &str, version: u32| {
        let record = store.workflow(name, Some(version)).ok()?;
        mesh_workflow::parse(&record.definition, limits).ok()
    };
    mesh_workflow::check_sub_workflows(workflow, limits, &resolve)?;
    Ok(())
}

/// Stores a goal and its run (durable when this returns) and starts its swarm; a goal whose
/// idempotency key is known returns the existing run instead. Submissions run side by side:
/// the store commits them in groups, and spawning happens on the caller's task.
///
/// Past `max_active_runs` live runs a new goal is refused with `ResourceExhausted` before
/// anything is stored (concurrent submissions may overshoot by their number).
pub async fn submit(
    deps: &RunDeps,
    supervisor: &ActorRef<SwarmsMsg>,
    goal: GoalSpec,
    admission: Admission,
) -> Result<RunRef> {
    let (goal, workflow) = prepare(goal, &deps.limits, &deps.store)?;
    if let Some(full) = admission.refuses(deps, &goal) {
        // A retried submission still finds the run it created.
        let known = match &goal.idempotency_key {
            Some(key) => deps.store.knows_idempotency_key(key)?,
            None => false,
        };
        if !known {
            return Err(full);
        }
    }
    // The run's first decisions are made now and journaled with the goal: its first steps
    // start without a write of their own.
    let (goal_id, run_id) = NewRun::ids();
    let steps = goal.workflow.steps.len();
    // The machine keeps the validated workflow; the goal's own copy goes to the store.
    let for_machine = StoredGoal {
        objective: goal.objective.clone(),
        inputs: goal.inputs.clone(),
        workflow: WorkflowDef::default(),
        idempotency_key: None,
        planned: goal.planned,
        request_digest: None,
    };
    let mut machine = RunMachine::validated(
        run_id.clone(),
        goal_id.clone(),
        for_machine,
        workflow,
        deps.epoch,
        deps.policy.clone(),
        deps.limits.clone(),
    );
    let at_ms = now_ms();
    let events = machine.at(at_ms).advance();
    let new = NewRun {
        goal,
        goal_id,
        run_id,
        at_ms,
        events: events.clone(),
    };
    // From here on the goal is handed to the store: the write and the start of its swarm
    // happen on a task of their own, so that a caller that goes away (a client's deadline,
    // a dropped connection) cannot leave a stored run without its actor. What a caller is
    // told is then either the run, or an error for which nothing was stored.
    let (deps, supervisor) = (deps.clone(), supervisor.clone());
    let durable = tokio::spawn(async move {
        let run = deps.store.submit(new).await?;
        if run.created {
            info!(run_id = %run.run_id, goal_id = %run.goal_id, steps, "goal accepted");
            let (goal_id, run_id) = (run.goal_id.clone(), run.run_id.clone());
            let begin = Begin::New(Box::new(NewStart {
                machine,
                events,
                created_at_ms: at_ms,
            }));
            if let Err(e) = start_swarm(&deps, &supervisor, goal_id, run_id, begin).await {
                // The goal is durable: the next resume starts it.
                warn!(run_id = %run.run_id, error = %e, "could not start the swarm; the run waits for the next resume");
            }
        }
        Ok(run)
    });
    durable
        .await
        .map_err(|_| Error::Unavailable("the store writer"))?
}

/// Bounds on accepting new goals: past them `SubmitGoal` answers RESOURCE_EXHAUSTED (with a
/// retry hint) instead of growing memory.
#[derive(Clone, Copy, Debug)]
pub struct Admission {
    pub max_active_runs: usize,
    pub max_pending_per_skill: usize,
}

impl Admission {
    /// No bound: for child runs of work already accepted.
    pub const OPEN: Admission = Admission {
        max_active_runs: usize::MAX,
        max_pending_per_skill: usize::MAX,
    };

    fn refuses(&self, deps: &RunDeps, goal: &StoredGoal) -> Option<Error> {
        let active = deps.directory.len();
        if active >= self.max_active_runs {
            return Some(Error::ResourceExhausted(format!(
                "{active} runs in progress, the limit (max_active_runs) is {}; retry in a few seconds",
                self.max_active_runs
            )));
        }
        goal.workflow
            .steps
            .iter()
            .filter_map(|s| s.uses.as_deref())
            .find_map(|skill| {
                let waiting = deps.queues.waiting_for_skill(skill);
                (waiting >= self.max_pending_per_skill).then(|| {
                    Error::ResourceExhausted(format!(
                        "{waiting} steps already wait for an agent with skill `{skill}` (max_pending_per_skill is {}); retry in a few seconds",
                        self.max_pending_per_skill
                    ))
                })
            })
    }
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

#[cfg(test)]
mod tests {
    /// A client meets one number per limit, whether its goal comes as `steps`, a workflow
    /// or a registered workflow.
    #[test]
    fn one_number_per_limit_across_paths() {
        use mesh_proto::convert::{MAX_JSON_BYTES, MAX_JSON_DEPTH, MAX_STEPS};
        let limits = mesh_workflow::Limits::default();
        assert_eq!(limits.max_steps, MAX_STEPS);
        assert_eq!(limits.max_depth, MAX_JSON_DEPTH);
        assert_eq!(limits.max_bytes, MAX_JSON_BYTES);
    }
}
