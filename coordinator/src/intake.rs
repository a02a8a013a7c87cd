//! Goal intake, in one place: what kind of goal arrived (decided once, by
//! `GoalSpec::kind`), whether its idempotency key is known (looked up once before the
//! store's own check), the planner a text goal needs, admission, validation into what is
//! stored, the store's write and the start of the run; and the retry of a finished run. The
//! gRPC adapter only converts the wire shape, calls [`Intake`] and maps the error.
//!
//! Invariant: a goal is acknowledged only after the store has committed it, and a goal
//! handed to the store is written and its run started whatever happens to the caller.

use std::collections::HashMap;
use std::time::Duration;

use mesh_proto::domain::*;
use ractor::ActorRef;
use tracing::{info, warn};

use crate::error::{Error, Result, call_result};
use crate::registry::RegistryMsg;
use crate::run::{self, Begin, NewStart, RunDeps, RunMachine};
use crate::store::{Backend, NewRun, Store, StoredGoal, now_ms};
use crate::swarms::{SwarmsMsg, start_swarm};
use mesh_workflow::{Action, Limits, StepDef, Target, Workflow, WorkflowDef};

/// How long the planner lookup may take.
const REGISTRY_TIMEOUT: Duration = Duration::from_secs(5);

/// What accepting goals needs: the runs' dependencies, where runs are supervised, the
/// registry (for a text goal's planner) and the admission bounds.
#[derive(Clone, Debug)]
pub struct Intake {
    pub deps: RunDeps,
    pub supervisor: ActorRef<SwarmsMsg>,
    pub registry: ActorRef<RegistryMsg>,
    pub admission: Admission,
    /// The namespaces' quotas, for new submissions (`None`: none).
    pub quotas: Option<std::sync::Arc<crate::quotas::Quotas>>,
}

impl Intake {
    /// A goal submitted: stored and started (or found again by its idempotency key), or
    /// refused with nothing stored.
    pub async fn accept(&self, goal: GoalSpec) -> Result<RunRef> {
        // One look at the key: a retried submission finds its run even if the planner has
        // left or the mesh is full meanwhile. The store checks again, in its transaction.
        let known = match &goal.idempotency_key {
            Some(key) => {
                let key = stored_key(&goal.namespace, key);
                self.deps.store.knows_idempotency_key(&key).await?
            }
            None => false,
        };
        if !known && let Some(quotas) = &self.quotas {
            quotas.admit(
                &goal.namespace,
                self.deps.directory.live_in(&goal.namespace),
            )?;
        }
        if goal.kind() == GoalKind::Text && !known {
            self.require_planner().await?;
        }
        let admission = if known {
            Admission::OPEN
        } else {
            self.admission
        };
        submit(&self.deps, &self.supervisor, goal, admission).await
    }

    /// A text goal needs a live agent with the `plan` skill to write its workflow.
    async fn require_planner(&self) -> Result<()> {
        let skill = Some(PLAN_SKILL.to_owned());
        let agents = call_result(
            "registry",
            self.registry
                .call(
                    |reply| RegistryMsg::ListAgents(skill, reply),
                    Some(REGISTRY_TIMEOUT),
                )
                .await,
        )?;
        if agents.iter().any(|a| a.health == Health::Healthy) {
            Ok(())
        } else {
            Err(Error::FailedPrecondition(format!(
                "a goal with only an objective needs an agent with the `{PLAN_SKILL}` skill to write its workflow, and none is registered; give `steps`, `workflow` or `workflow_ref`, or start a planner (agent-sdk/examples/planner.rs)"
            )))
        }
    }

    /// Runs a finished (failed) run again from `step`: the retry is journaled, then the run
    /// starts and replays to there.
    pub async fn retry_finished(&self, id: &RunId, step: &StepId) -> Result<()> {
        let deps = &self.deps;
        let (mut machine, stored) = run::load(deps, id).await?;
        let events = machine.at(now_ms()).on_retry_from(step)?;
        deps.store
            .record(id, stored.next_seq, events)
            .await
            .map_err(|_| {
                Error::FailedPrecondition(format!(
                    "run `{id}` changed meanwhile (another retry?); get it and try again"
                ))
            })?;
        info!(run_id = %id, %step, "failed run retried");
        start_swarm(
            deps,
            &self.supervisor,
            stored.goal_id,
            id.clone(),
            Begin::Load,
        )
        .await
    }
}

/// The skill of agents that turn an objective into a workflow.
pub const PLAN_SKILL: &str = "plan";
/// The id of a text goal's first step, the planner's.
pub const PLANNER_STEP: &str = "planner";

/// Turns a submitted goal into what is stored: its workflow (given as text, or as plain
/// `steps`) parsed and validated, its inputs checked and defaulted. Nothing is stored when
/// anything is wrong, and the error names the field. Returns the validated workflow too, for
/// the run's machine.
pub async fn prepare(
    goal: GoalSpec,
    limits: &Limits,
    store: &Store,
) -> Result<(StoredGoal, Workflow)> {
    let request_digest = goal.idempotency_key.as_ref().map(|_| request_digest(&goal));
    let def = match (&goal.workflow, &goal.workflow_ref) {
        (Some(text), _) => mesh_workflow::parse(text, limits)?,
        // The definition is copied into the goal: the run stays on this version.
        (None, Some(reference)) => {
            let (name, version) = mesh_proto::convert::parse_workflow_ref(reference)?;
            let record = namespaced_workflow(store, &goal.namespace, &name, version).await?;
            mesh_workflow::parse(&record.definition, limits)?
        }
        // A text goal: an agent with the `plan` skill writes the workflow.
        (None, None) if goal.kind() == GoalKind::Text => {
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
                idempotency_key: goal
                    .idempotency_key
                    .map(|k| stored_key(&goal.namespace, &k)),
                planned: true,
                request_digest,
                budget: goal.budget,
                namespace: goal.namespace,
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
    check_sub_workflows(&workflow, limits, store, &goal.namespace).await?;
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
        idempotency_key: goal
            .idempotency_key
            .map(|k| stored_key(&goal.namespace, &k)),
        planned: false,
        request_digest,
        budget: goal.budget,
        namespace: goal.namespace,
    };
    Ok((goal, workflow))
}

/// An idempotency key as stored: a namespace's own, so that one namespace can neither find
/// nor block another's runs by their keys. The default namespace's keys are stored as given
/// (as before namespaces); others after the namespace and a separator no key can contain
/// (keys are printable ASCII).
pub fn stored_key(namespace: &Namespace, key: &str) -> String {
    if namespace.is_default() {
        key.to_owned()
    } else {
        format!("{namespace}\u{1f}{key}")
    }
}

/// A registered workflow's name as stored: a namespace's own, as keys are ([`stored_key`]),
/// so that one namespace can neither read nor shadow another's workflows.
pub fn stored_name(namespace: &Namespace, name: &str) -> String {
    stored_key(namespace, name)
}

/// The name a namespace knows a stored workflow by.
pub fn plain_name(stored: &str) -> &str {
    stored
        .rsplit_once('\u{1f}')
        .map_or(stored, |(_, name)| name)
}

/// An error of the store about a namespace's workflow, in the namespace's words.
pub fn in_namespace_words(e: Error, namespace: &Namespace) -> Error {
    let prefix = format!("{namespace}\u{1f}");
    match e {
        Error::WorkflowNotFound(n) => Error::WorkflowNotFound(n.replace(&prefix, "")),
        Error::AlreadyExists(m) => Error::AlreadyExists(m.replace(&prefix, "")),
        other => other,
    }
}

/// A namespace's registered workflow, `NAME@VERSION` or its newest version.
pub async fn namespaced_workflow(
    store: &Store,
    namespace: &Namespace,
    name: &str,
    version: Option<u32>,
) -> Result<WorkflowRecord> {
    let mut record = store
        .workflow(&stored_name(namespace, name), version)
        .await
        .map_err(|e| in_namespace_words(e, namespace))?;
    record.name = plain_name(&record.name).to_owned();
    Ok(record)
}

/// A stable digest of a goal as submitted (64-bit FNV-1a over its JSON with every object's
/// keys sorted): equal for a retried request, whatever order its keys came in, and different
/// for another goal.
pub fn request_digest(goal: &GoalSpec) -> String {
    use std::hash::Hasher;
    let value = serde_json::to_value(goal).unwrap_or_default();
    let mut h = fnv::FnvHasher::default();
    h.write(&serde_json::to_vec(&sorted(value)).unwrap_or_default());
    format!("{:016x}", h.finish())
}

/// `value` with every object's keys in order (serde_json may keep insertion order).
fn sorted(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
        other => other,
    }
}

/// Every sub-workflow the workflow names must be registered (and valid, and not nested
/// too deep). The definitions are fetched first, level by level (at most `max_nesting`
/// levels, each reference once), then checked by the workflow crate's one rule.
pub async fn check_sub_workflows(
    workflow: &Workflow,
    limits: &Limits,
    store: &Store,
    namespace: &Namespace,
) -> Result<()> {
    let mut found: HashMap<(String, u32), WorkflowDef> = HashMap::new();
    let mut level = vec![workflow.clone()];
    for _ in 0..limits.max_nesting {
        let mut next = Vec::new();
        for w in &level {
            for step in &w.steps {
                let Action::Task(Target::Workflow { name, version }) = &step.action else {
                    continue;
                };
                let key = (name.clone(), *version);
                if found.contains_key(&key) {
                    continue;
                }
                let Ok(record) = namespaced_workflow(store, namespace, name, Some(*version)).await
                else {
                    continue;
                };
                let Ok(def) = mesh_workflow::parse(&record.definition, limits) else {
                    continue;
                };
                if let Ok(child) = mesh_workflow::validate(def.clone(), limits) {
                    next.push(child);
                }
                found.insert(key, def);
            }
        }
        if next.is_empty() {
            break;
        }
        level = next;
    }
    let resolve = |name: &str, version: u32| found.get(&(name.to_owned(), version)).cloned();
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
    let (goal, workflow) = prepare(goal, &deps.limits, &deps.store).await?;
    // A retried submission of a known key comes with `Admission::OPEN` (see `accept`).
    if let Some(full) = admission.refuses(deps, &goal) {
        return Err(full);
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
        budget: goal.budget.clone(),
        namespace: goal.namespace.clone(),
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
    // The submission's span is the run's parent (tracing on only).
    let traceparent = mesh_proto::trace_context::traceparent_of(&tracing::Span::current());
    let durable = tokio::spawn(async move {
        let run = deps.store.submit(new).await?;
        if run.created {
            info!(run_id = %run.run_id, goal_id = %run.goal_id, steps, "goal accepted");
            let (goal_id, run_id) = (run.goal_id.clone(), run.run_id.clone());
            let begin = Begin::New(Box::new(NewStart {
                machine,
                events,
                created_at_ms: at_ms,
                traceparent,
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn goal() -> GoalSpec {
        GoalSpec {
            objective: String::new(),
            inputs: json!({}),
            steps: Vec::new(),
            workflow: None,
            workflow_ref: None,
            idempotency_key: None,
            budget: None,
            namespace: Default::default(),
        }
    }

    /// Every kind of goal becomes one validated workflow, and what is stored says which it
    /// was: the kind is decided once (`GoalSpec::kind`), here and in the wire's checks.
    #[tokio::test]
    async fn every_kind_of_goal_is_prepared_into_a_validated_workflow() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let limits = Limits::default();
        let text = "name: greet\nversion: 1\nsteps:\n  - {id: hi, uses: echo}\n";
        let def = mesh_workflow::load(text, &limits).unwrap().def;
        store
            .register_workflow(crate::store::NewWorkflow {
                source: text.into(),
                def,
            })
            .await
            .unwrap();

        let steps = GoalSpec {
            steps: vec![StepSpec {
                id: "a".into(),
                uses: "echo".into(),
                with: json!({}),
                needs: vec![],
            }],
            ..goal()
        };
        let workflow = GoalSpec {
            workflow: Some("steps:\n  - {id: w, uses: echo}\n".into()),
            ..goal()
        };
        let registered = GoalSpec {
            workflow_ref: Some("greet@1".into()),
            ..goal()
        };
        let objective = GoalSpec {
            objective: "write a poem".into(),
            ..goal()
        };
        for (g, kind, first, planned) in [
            (steps, GoalKind::Steps, "a", false),
            (workflow, GoalKind::Workflow, "w", false),
            (registered, GoalKind::Registered, "hi", false),
            (objective, GoalKind::Text, PLANNER_STEP, true),
        ] {
            assert_eq!(g.kind(), kind);
            let (stored, validated) = prepare(g, &limits, &store).await.unwrap();
            assert_eq!(validated.steps[0].id, first, "{kind:?}");
            assert_eq!(stored.planned, planned, "{kind:?}");
        }
        let missing = GoalSpec {
            workflow_ref: Some("nope@1".into()),
            ..goal()
        };
        assert!(matches!(
            prepare(missing, &limits, &store).await,
            Err(Error::WorkflowNotFound(_))
        ));
    }

    /// A retried request has the same digest; any other goal under the same key another.
    #[test]
    fn the_request_digest_tells_a_retry_from_another_goal() {
        let a = GoalSpec {
            objective: "x".into(),
            inputs: json!({ "b": 1, "a": [1, 2] }),
            idempotency_key: Some("k".into()),
            ..goal()
        };
        let same = GoalSpec {
            inputs: json!({ "a": [1, 2], "b": 1 }),
            ..a.clone()
        };
        let other = GoalSpec {
            inputs: json!({ "a": [1, 2], "b": 2 }),
            ..a.clone()
        };
        assert_eq!(request_digest(&a), request_digest(&same));
        assert_ne!(request_digest(&a), request_digest(&other));
        assert_eq!(request_digest(&a).len(), 16);
    }

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
