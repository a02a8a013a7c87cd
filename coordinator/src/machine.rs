//! A run's decisions, free of any actor runtime: which steps start, what a result or a
//! failure leads to, when the run ends. Every change is a [`JournalEvent`]; [`RunMachine::apply`]
//! is the only code that changes the state, both when a decision is made and when a run is
//! rebuilt from its journal ([`RunMachine::replay`]), so the two cannot disagree.
//!
//! Decision methods apply the events they make as they go (a `foreach` must be expanded
//! before its tasks start) and return them; the `Run` actor journals them before it acts on
//! them, and fails (to be rebuilt from the journal) if it cannot.
//!
//! Invariant: a task accepts exactly one result, the one carrying its current fencing token.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use mesh_proto::FieldError;
use mesh_proto::domain::*;
use mesh_workflow::validate::{Action, Step};
use mesh_workflow::{Limits, MemoryScope, OnFailure, RunBindings, Workflow, WorkflowDef};
use serde_json::{Map, Value, json};

use crate::config::DispatchConfig;
use crate::error::{Error, Result};
use crate::journal::{JournalEvent, StoredGoal};

/// How a step's failed attempts are retried.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Failed attempts before the step fails.
    pub max_attempts: u32,
    /// Attempts of any kind (failed or lost with their node) before the step fails.
    pub max_total_attempts: u32,
    pub backoff: Duration,
    pub multiplier: f64,
    pub max_backoff: Duration,
    /// Each wait is shortened by a random fraction of up to this much.
    pub jitter: f64,
    pub non_retryable: Vec<String>,
}

impl RetryPolicy {
    pub fn from_config(c: &DispatchConfig) -> Self {
        Self {
            max_attempts: c.max_attempts.max(1),
            max_total_attempts: c.max_total_attempts.max(1),
            backoff: c.retry_backoff,
            multiplier: 2.0,
            max_backoff: c.max_retry_backoff,
            jitter: 0.0,
            non_retryable: Vec::new(),
        }
    }

    /// A step's own `retry`, over the coordinator's defaults.
    fn for_step(&self, step: &Step) -> Self {
        match &step.retry {
            None => self.clone(),
            Some(r) => Self {
                max_attempts: r.max_attempts,
                max_total_attempts: self.max_total_attempts.max(r.max_attempts),
                backoff: r.backoff,
                multiplier: r.multiplier,
                max_backoff: r.max_backoff,
                jitter: r.jitter,
                non_retryable: r.non_retryable.clone(),
            },
        }
    }

    /// Wait before the retry that follows the `failures`-th failure, before jitter.
    pub fn backoff(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(64) as i32;
        let secs = self.backoff.as_secs_f64() * self.multiplier.powi(exp);
        if !secs.is_finite() || secs >= self.max_backoff.as_secs_f64() {
            self.max_backoff
        } else {
            Duration::from_secs_f64(secs)
        }
    }
}

/// A wait shortened by up to `jitter` of itself; `random` is uniform in `0..1`.
pub fn jittered(delay: Duration, jitter: f64, random: f64) -> Duration {
    delay.mul_f64(1.0 - jitter.clamp(0.0, 1.0) * random.clamp(0.0, 1.0))
}

/// The skill of the built-in model agent: the steps a budget applies to.
pub const LLM_SKILL: &str = "llm";

/// How a step skipped because its run ended says so; a retried run runs such steps again.
const RUN_ENDED: &str = "the run ended: ";

/// One task of a step: the only one of a plain step, one per `foreach` element, one per
/// `loop` iteration.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Task {
    pub state: StepState,
    pub attempt: u32,
    /// How often an operator reset the task's step (`RetryRun`); with `failures`, tells a
    /// sub-workflow task's runs apart.
    pub resets: u32,
    pub epoch: u64,
    pub failures: u32,
    pub agent: Option<AgentKey>,
    pub output: Option<Value>,
    pub error: Option<String>,
    /// A tool call of the attempt `asking.attempt` that waits for a person.
    pub asking: Option<ToolAsk>,
}

/// A tool call that waits for a person's decision, with its exact arguments.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolAsk {
    pub attempt: u32,
    pub call_id: String,
    pub tool: String,
    pub arguments: Value,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepRt {
    pub state: StepState,
    pub tasks: Vec<Task>,
    /// A `foreach` step's elements, once evaluated.
    pub items: Option<Vec<Value>>,
    pub output: Option<Value>,
    pub error: Option<String>,
    /// What a waiting step waits for, or why a step was skipped.
    pub detail: Option<String>,
    /// When a wait times out (Unix ms).
    pub until_ms: Option<i64>,
    /// Parked at the run's budget (`on_exceed: park`): the task a raise starts.
    pub held: Option<u32>,
}

/// A retry to schedule after a failed attempt.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryAfter {
    pub step: StepId,
    pub index: u32,
    pub attempt: u32,
    pub delay: Duration,
    pub jitter: f64,
}

/// An operator's raise of a run's budget: a limit left out keeps its value, and so does
/// `on_exceed`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BudgetRaise {
    pub max_tokens: Option<u64>,
    pub max_cost_usd: Option<f64>,
    pub on_exceed: Option<OnExceed>,
    pub comment: String,
}

/// What a result or failure leads to.
#[derive(Debug, Default, PartialEq)]
pub struct Decision {
    pub events: Vec<JournalEvent>,
    pub retry_after: Option<RetryAfter>,
}

impl From<Vec<JournalEvent>> for Decision {
    fn from(events: Vec<JournalEvent>) -> Self {
        Self {
            events,
            retry_after: None,
        }
    }
}

/// Where a task's memory is kept, and how many entries it loads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryRef {
    pub scope: String,
    pub key: String,
    pub last: u32,
}

/// The largest memory entry saved; a bigger output is remembered by its size only.
pub const MAX_MEMORY_VALUE_BYTES: usize = 64 * 1024;

#[derive(Debug)]
pub struct RunMachine {
    run_id: RunId,
    goal_id: GoalId,
    objective: String,
    inputs: Value,
    workflow: Arc<Workflow>,
    epoch: u64,
    state: RunState,
    steps: Vec<StepRt>,
    output: Option<Value>,
    error: Option<String>,
    /// Signals received, by name (the latest payload).
    signals: BTreeMap<String, Value>,
    /// A text goal whose planner has not answered yet: the success of step 0 is a workflow.
    planning: bool,
    policy: RetryPolicy,
    limits: Limits,
    /// Bytes of task output (as JSON) the run keeps, against `limits.max_run_output_bytes`.
    retained_bytes: u64,
    /// Model calls of every attempt, by step; kept across retries of a step (they were paid).
    usage: BTreeMap<StepId, UsageTotal>,
    /// What the run may spend: the goal's budget, else its workflow's, as last raised.
    budget: Option<Budget>,
    namespace: Namespace,
    /// Inputs rendered when their attempt started, until it is dispatched: an input's
    /// expressions are evaluated once, not again for the dispatch. Not journaled.
    rendered: HashMap<(usize, u32), Value>,
    /// The time (Unix ms) the caller gave with [`RunMachine::at`]: the machine reads no
    /// clock, so that its decisions depend only on what it is told.
    now_ms: i64,
}

/// Length of a value's JSON text, without building it.
pub fn json_bytes(v: &Value) -> u64 {
    struct Count(u64);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len() as u64;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut n = Count(0);
    let _ = serde_json::to_writer(&mut n, v);
    n.0
}

impl RunMachine {
    /// A machine for a stored goal, before any journal entry.
    pub fn new(
        run_id: RunId,
        goal_id: GoalId,
        mut goal: StoredGoal,
        epoch: u64,
        policy: RetryPolicy,
        limits: Limits,
    ) -> Result<Self> {
        let workflow = mesh_workflow::validate(std::mem::take(&mut goal.workflow), &limits)
            .map_err(|e| Error::Corrupt(format!("workflow of run {run_id}: {e}")))?;
        Ok(Self::validated(
            run_id, goal_id, goal, workflow, epoch, policy, limits,
        ))
    }

    /// A machine for a goal whose workflow the caller has just validated as `workflow` (the
    /// goal's own copy is not read): a submission does not validate it twice.
    pub fn validated(
        run_id: RunId,
        goal_id: GoalId,
        goal: StoredGoal,
        workflow: Workflow,
        epoch: u64,
        policy: RetryPolicy,
        limits: Limits,
    ) -> Self {
        let steps = vec![StepRt::default(); workflow.steps.len()];
        let budget = goal.budget.or_else(|| workflow.def.budget.clone());
        Self {
            run_id,
            goal_id,
            objective: goal.objective,
            inputs: goal.inputs,
            workflow: Arc::new(workflow),
            epoch,
            state: RunState::Running,
            steps,
            output: None,
            error: None,
            signals: BTreeMap::new(),
            planning: goal.planned,
            budget,
            namespace: goal.namespace,
            policy,
            limits,
            retained_bytes: 0,
            usage: BTreeMap::new(),
            rendered: HashMap::new(),
            now_ms: 0,
        }
    }

    /// Rebuilds a run from its journal.
    pub fn replay(mut self, events: &[JournalEvent]) -> Self {
        for e in events {
            self.apply(e);
        }
        self
    }

    fn index_of(&self, id: &StepId) -> Option<usize> {
        self.workflow.index_of(id.as_str())
    }

    pub fn step(&self, id: &StepId) -> Option<&StepRt> {
        self.index_of(id).map(|i| &self.steps[i])
    }

    pub fn spec(&self, i: usize) -> &Step {
        &self.workflow.steps[i]
    }

    fn id(&self, i: usize) -> StepId {
        StepId(self.workflow.steps[i].id.clone())
    }

    pub fn token(&self, i: usize, index: u32) -> FencingToken {
        let task = &self.steps[i].tasks[index as usize];
        FencingToken {
            run_id: self.run_id.clone(),
            step_id: self.id(i),
            attempt: task.attempt,
            epoch: task.epoch,
            index,
        }
    }

    /// The step and task this token is current for.
    fn current(&self, token: &FencingToken) -> Option<(usize, u32)> {
        let i = self.index_of(&token.step_id)?;
        let s = &self.steps[i];
        let t = s.tasks.get(token.index as usize)?;
        (s.state == StepState::Running
            && t.state == StepState::Running
            && t.attempt == token.attempt
            && t.epoch == token.epoch)
            .then_some((i, token.index))
    }

    fn emit(&mut self, out: &mut Vec<JournalEvent>, event: JournalEvent) {
        self.apply(&event);
        out.push(event);
    }

    // ------------------------------------------------------------ expressions

    /// Values an expression of step `i` may read: inputs, and the steps it names.
    fn bindings(&self, named: impl IntoIterator<Item = String>) -> RunBindings<'_> {
        let mut steps = Map::new();
        for id in named {
            if let Some(j) = self.workflow.index_of(&id) {
                let s = &self.steps[j];
                steps.insert(
                    id,
                    json!({ "output": s.output.clone().unwrap_or(Value::Null), "state": s.state.as_str() }),
                );
            }
        }
        let mut rest = Map::new();
        rest.insert("steps".into(), Value::Object(steps));
        RunBindings {
            inputs: &self.inputs,
            rest,
        }
    }

    fn step_bindings(&self, i: usize) -> RunBindings<'_> {
        let named: Vec<String> = self
            .spec(i)
            .exprs()
            .iter()
            .flat_map(|e| e.steps.iter().cloned())
            .collect();
        self.bindings(named)
    }

    /// The input of task `index` of step `i`: its rendered `with`, the outputs of its needs,
    /// and `item`/`index` or `iteration` where they apply. The run's inputs reach a task
    /// only through its `with` (`${{ inputs.topic }}`): a task carries what its step asks
    /// for, so a fan-out does not copy every input into each of its tasks.
    pub fn task_input(&self, i: usize, index: u32) -> std::result::Result<Value, String> {
        let spec = self.spec(i);
        let mut b = self.step_bindings(i);
        let mut extra = Map::new();
        if spec.foreach.is_some() {
            let item = self
                .items(i)
                .get(index as usize)
                .cloned()
                .unwrap_or(Value::Null);
            b.rest.insert("item".into(), item.clone());
            b.rest.insert("index".into(), json!(index));
            extra.insert("item".into(), item);
            extra.insert("index".into(), json!(index));
        }
        if spec.repeat.is_some() {
            let previous = index
                .checked_sub(1)
                .and_then(|p| self.steps[i].tasks.get(p as usize))
                .and_then(|t| t.output.clone())
                .unwrap_or(Value::Null);
            b.rest.insert("iteration".into(), json!(index));
            b.rest.insert("output".into(), previous);
            extra.insert("iteration".into(), json!(index));
        }
        let with = spec
            .with
            .render_at(&b)
            .map_err(|(path, e)| format!("with{path}: {e}"))?;
        let needs: Map<String, Value> = spec
            .needs
            .iter()
            .map(|&j| {
                (
                    self.workflow.steps[j].id.clone(),
                    self.steps[j].output.clone().unwrap_or(Value::Null),
                )
            })
            .collect();
        let mut input = Map::new();
        input.insert("with".into(), if with.is_null() { json!({}) } else { with });
        input.insert("needs".into(), Value::Object(needs));
        input.extend(extra);
        Ok(Value::Object(input))
    }

    pub fn run_id(&self) -> &RunId {
        &self.run_id
    }

    pub fn goal_id(&self) -> &GoalId {
        &self.goal_id
    }

    pub fn objective(&self) -> &str {
        &self.objective
    }

    pub fn state(&self) -> RunState {
        self.state
    }

    pub fn output(&self) -> Option<&Value> {
        self.output.as_ref()
    }

    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// The steps' state, read-only: only `apply` changes it.
    pub fn steps(&self) -> &[StepRt] {
        &self.steps
    }

    /// The run's own deadline, counted from its creation.
    pub fn deadline(&self) -> Option<Duration> {
        self.workflow.def.deadline
    }

    /// Tells the machine the time (Unix ms) for the decisions that follow: when a wait
    /// times out is counted from it.
    pub fn at(&mut self, now_ms: i64) -> &mut Self {
        self.now_ms = now_ms;
        self
    }

    /// The input to dispatch for task `index` of step `i`: the one rendered when its
    /// attempt started, or (after a replay) rendered now.
    pub fn take_task_input(&mut self, i: usize, index: u32) -> std::result::Result<Value, String> {
        match self.rendered.remove(&(i, index)) {
            Some(input) => Ok(input),
            None => self.task_input(i, index),
        }
    }

    fn items(&self, i: usize) -> &[Value] {
        self.steps[i].items.as_deref().unwrap_or(&[])
    }

    // ------------------------------------------------------------ moving forward

    /// A need is met when the needed step succeeded, was skipped, or failed with
    /// `on_failure: continue`.
    fn done_for_dependents(&self, j: usize) -> bool {
        match self.steps[j].state {
            StepState::Succeeded | StepState::Skipped => true,
            StepState::Failed => self.spec(j).on_failure == OnFailure::Continue,
            _ => false,
        }
    }

    /// Starts whatever can start, and ends the run when nothing is left to do.
    pub fn advance(&mut self) -> Vec<JournalEvent> {
        let mut out = Vec::new();
        self.advance_into(&mut out);
        out
    }

    fn advance_into(&mut self, out: &mut Vec<JournalEvent>) {
        if self.state.is_terminal() {
            return;
        }
        loop {
            if let Some(i) = (0..self.steps.len()).find(|&i| {
                self.steps[i].state == StepState::Failed
                    && self.spec(i).on_failure == OnFailure::Fail
            }) {
                let error = format!(
                    "step `{}` failed: {}",
                    self.spec(i).id,
                    self.steps[i].error.as_deref().unwrap_or("unknown error")
                );
                self.finish_into(out, RunState::Failed, None, Some(error));
                return;
            }
            let before = out.len();
            for i in 0..self.steps.len() {
                match self.steps[i].state {
                    StepState::Pending
                        if self
                            .spec(i)
                            .needs
                            .iter()
                            .all(|&j| self.done_for_dependents(j)) =>
                    {
                        self.begin(i, out)
                    }
                    StepState::Running if self.spec(i).foreach.is_some() => self.fill(i, out),
                    _ => {}
                }
            }
            if out.len() == before {
                break;
            }
        }
        if self.steps.iter().all(|s| s.state.is_terminal()) {
            match self.final_output() {
                Ok(output) => self.finish_into(out, RunState::Succeeded, Some(output), None),
                Err(e) => self.finish_into(out, RunState::Failed, None, Some(e)),
            }
        }
    }

    /// The step failed for good: `failed`, or `parked` when it says `on_failure: park`.
    fn fail_step(&mut self, i: usize, out: &mut Vec<JournalEvent>, error: String) {
        let step = self.id(i);
        let event = match self.spec(i).on_failure {
            OnFailure::Park => JournalEvent::StepParked {
                step,
                error,
                held: None,
            },
            OnFailure::Fail | OnFailure::Continue => JournalEvent::StepFailed { step, error },
        };
        self.emit(out, event);
    }

    /// An operator skips a parked step: its dependents go on without it.
    pub fn on_skip(&mut self, id: &StepId, comment: &str) -> Result<Vec<JournalEvent>> {
        let i = self.known_step(id)?;
        let state = self.steps[i].state;
        if state != StepState::Parked {
            return Err(Error::FailedPrecondition(format!(
                "step `{id}` is not parked (it is {state}); only a parked step can be skipped"
            )));
        }
        let mut out = Vec::new();
        let reason = if comment.is_empty() {
            "skipped by an operator".to_owned()
        } else {
            format!("skipped by an operator: {comment}")
        };
        self.emit(
            &mut out,
            JournalEvent::StepSkipped {
                step: id.clone(),
                reason,
            },
        );
        self.advance_into(&mut out);
        Ok(out)
    }

    /// An operator runs step `id` again, with every step that depends on it; every other
    /// result is kept. A failed run runs again from there, and steps its failure cut short
    /// (cancelled, or skipped because the run ended) run too.
    pub fn on_retry_from(&mut self, id: &StepId) -> Result<Vec<JournalEvent>> {
        let i = self.known_step(id)?;
        let state = self.steps[i].state;
        match (self.state, state) {
            (RunState::Running, StepState::Parked | StepState::Failed)
            | (RunState::Failed, StepState::Failed | StepState::Parked) => {}
            (RunState::Running | RunState::Failed, s) => {
                return Err(Error::FailedPrecondition(format!(
                    "step `{id}` is {s}; only a failed or parked step can be retried"
                )));
            }
            (run, _) => {
                return Err(Error::FailedPrecondition(format!(
                    "run {} {run}; only a running or failed run can be retried",
                    self.run_id
                )));
            }
        }
        let mut reset = vec![false; self.steps.len()];
        reset[i] = true;
        // Steps come in an order where needs may follow; iterate to a fixed point.
        let mut changed = true;
        while changed {
            changed = false;
            for j in 0..self.steps.len() {
                if !reset[j] && self.spec(j).needs.iter().any(|&n| reset[n]) {
                    reset[j] = true;
                    changed = true;
                }
            }
        }
        let mut out = Vec::new();
        if self.state == RunState::Failed {
            self.emit(&mut out, JournalEvent::RunResumed);
            for (j, r) in reset.iter_mut().enumerate() {
                let s = &self.steps[j];
                let cut_short = s.state == StepState::Cancelled
                    || (s.state == StepState::Skipped
                        && s.detail
                            .as_deref()
                            .is_some_and(|d| d.starts_with(RUN_ENDED)));
                *r |= cut_short;
            }
        }
        for (j, r) in reset.into_iter().enumerate() {
            if r && self.steps[j].state != StepState::Pending {
                let step = self.id(j);
                self.emit(&mut out, JournalEvent::StepReset { step });
            }
        }
        self.advance_into(&mut out);
        Ok(out)
    }

    fn known_step(&self, id: &StepId) -> Result<usize> {
        self.index_of(id)
            .ok_or_else(|| Error::StepNotFound(format!("run has no step `{id}`")))
    }

    /// A step whose needs are met: its condition, then its action.
    fn begin(&mut self, i: usize, out: &mut Vec<JournalEvent>) {
        let step = self.id(i);
        let spec = self.workflow.steps[i].clone();
        if let Some(when) = &spec.when {
            match when.eval_bool(&self.step_bindings(i)) {
                Ok(true) => {}
                Ok(false) => {
                    let reason = format!("`when` was false: {}", when.source());
                    return self.emit(out, JournalEvent::StepSkipped { step, reason });
                }
                Err(e) => return self.fail_step(i, out, format!("when: {e}")),
            }
        }
        match &spec.action {
            Action::Task { .. } => match &spec.foreach {
                Some(f) => {
                    let items = match f.items.eval(&self.step_bindings(i)) {
                        Ok(Value::Array(items)) => items,
                        Ok(other) => {
                            let e = format!(
                                "foreach: `{}` gave {}, not a list",
                                f.items.source(),
                                mesh_workflow::expr::kind(&other)
                            );
                            return self.fail_step(i, out, e);
                        }
                        Err(e) => return self.fail_step(i, out, format!("foreach: {e}")),
                    };
                    if items.len() > self.limits.max_items {
                        let e = format!(
                            "foreach: {} items, over the limit of {}",
                            items.len(),
                            self.limits.max_items
                        );
                        return self.fail_step(i, out, e);
                    }
                    let empty = items.is_empty();
                    self.emit(
                        out,
                        JournalEvent::StepExpanded {
                            step: step.clone(),
                            items,
                        },
                    );
                    if empty {
                        let output = json!([]);
                        return self.emit(out, JournalEvent::StepSucceeded { step, output });
                    }
                    self.fill(i, out);
                }
                None => self.start(i, 0, out),
            },
            Action::Approval { message, timeout } => {
                let detail = match message.render(&self.step_bindings(i)) {
                    Ok(Value::String(m)) if !m.is_empty() => m,
                    Ok(_) => "approval".to_owned(),
                    Err(e) => return self.fail_step(i, out, format!("approval.message: {e}")),
                };
                let until_ms = timeout.map(|t| self.now_ms + t.as_millis() as i64);
                self.emit(
                    out,
                    JournalEvent::StepWaiting {
                        step,
                        until_ms,
                        detail,
                    },
                );
            }
            Action::Signal { name, timeout } => match self.signals.get(name) {
                Some(payload) => {
                    let output = payload.clone();
                    self.emit(out, JournalEvent::StepSucceeded { step, output });
                }
                None => {
                    let until_ms = timeout.map(|t| self.now_ms + t.as_millis() as i64);
                    let detail = format!("signal `{name}`");
                    self.emit(
                        out,
                        JournalEvent::StepWaiting {
                            step,
                            until_ms,
                            detail,
                        },
                    );
                }
            },
        }
    }

    /// A new attempt of task `index`, if its input renders and the run's budget allows it.
    fn start(&mut self, i: usize, index: u32, out: &mut Vec<JournalEvent>) {
        let llm = self.spec(i).skill() == LLM_SKILL;
        if llm && let Some(why) = self.over_budget() {
            return match self.budget.as_ref().map(|b| b.on_exceed) {
                Some(OnExceed::Park) => self.emit(
                    out,
                    JournalEvent::StepParked {
                        step: self.id(i),
                        error: why,
                        held: Some(index),
                    },
                ),
                Some(OnExceed::Fail) | None => self.fail_step(i, out, why),
            };
        }
        // A step whose input cannot be made fails, rather than each attempt.
        match self.task_input(i, index) {
            Ok(mut input) => {
                if llm {
                    self.cap_tokens(&mut input);
                }
                self.rendered.insert((i, index), input);
            }
            Err(e) => return self.fail_step(i, out, e),
        }
        let attempt = self.steps[i]
            .tasks
            .get(index as usize)
            .map_or(0, |t| t.attempt)
            + 1;
        let event = JournalEvent::StepStarted {
            step: self.id(i),
            index,
            attempt,
            epoch: self.epoch,
        };
        self.emit(out, event);
    }

    /// Starts pending `foreach` tasks up to `parallel` at once.
    fn fill(&mut self, i: usize, out: &mut Vec<JournalEvent>) {
        let Some(parallel) = self.spec(i).foreach.as_ref().map(|f| f.parallel as usize) else {
            return;
        };
        let tasks = &self.steps[i].tasks;
        let running = tasks
            .iter()
            .filter(|t| t.state == StepState::Running)
            .count();
        let pending: Vec<u32> = tasks
            .iter()
            .enumerate()
            .filter(|(_, t)| t.state == StepState::Pending)
            .map(|(k, _)| k as u32)
            .take(parallel.saturating_sub(running))
            .collect();
        for k in pending {
            // Starting a task may fail the step (its input does not render).
            if self.steps[i].state != StepState::Running {
                break;
            }
            self.start(i, k, out);
        }
    }

    pub fn on_result(&mut self, result: &TaskResult) -> Option<Decision> {
        let (i, index) = self.current(&result.token)?;
        // What the attempt spent is journaled with its result, whatever the result.
        let spent = (!result.usage.is_empty()).then(|| JournalEvent::UsageRecorded {
            step: self.id(i),
            index,
            attempt: result.token.attempt,
            usage: result.usage.clone(),
        });
        if let Some(event) = &spent {
            self.apply(event);
        }
        let mut decision = self.decide_result(i, index, result);
        // The agent's own measure of the attempt goes with its result, for traces.
        let id = self.id(i);
        for event in &mut decision.events {
            if let JournalEvent::TaskSucceeded {
                step,
                index: at,
                attempt,
                elapsed_ms,
                ..
            }
            | JournalEvent::TaskFailed {
                step,
                index: at,
                attempt,
                elapsed_ms,
                ..
            } = event
                && *step == id
                && *at == index
                && *attempt == result.token.attempt
            {
                *elapsed_ms = result.elapsed_ms;
            }
        }
        // A remembered step's output is saved with the result that accepted it.
        let saved = decision.events.iter().position(|e| {
            matches!(e, JournalEvent::TaskSucceeded { step, index: at, attempt, .. }
                if *step == id && *at == index && *attempt == result.token.attempt)
        });
        if let Some(at) = saved
            && let Some(event) = self.memory_saved(i, index, &decision.events[at])
        {
            decision.events.insert(at + 1, event);
        }
        if let Some(event) = spent {
            decision.events.insert(0, event);
        }
        Some(decision)
    }

    /// Where step `i`'s task `index` keeps its memory: the scope (`workflow:NAME`,
    /// `agent:SKILL`, `swarm:GOAL`), the rendered key, and how many entries it loads; `None`
    /// for a step without memory.
    pub fn memory_of(
        &self,
        i: usize,
        index: u32,
    ) -> Option<std::result::Result<MemoryRef, String>> {
        let memory = self.spec(i).memory.as_ref()?;
        let scope = match memory.scope {
            MemoryScope::Workflow => format!("workflow:{}", self.workflow.def.name),
            MemoryScope::Agent => format!("agent:{}", self.spec(i).skill()),
            MemoryScope::Swarm => format!("swarm:{}", self.goal_id),
        };
        let mut b = self.step_bindings(i);
        if self.spec(i).foreach.is_some() {
            let item = self
                .items(i)
                .get(index as usize)
                .cloned()
                .unwrap_or(Value::Null);
            b.rest.insert("item".into(), item);
            b.rest.insert("index".into(), json!(index));
        }
        Some(match memory.key.render(&b) {
            Ok(Value::String(key)) if !key.is_empty() && key.len() <= 256 => Ok(MemoryRef {
                scope,
                key,
                last: memory.last,
            }),
            Ok(other) => Err(format!(
                "memory.key: must render to a text of 1 to 256 bytes, not {other}"
            )),
            Err(e) => Err(format!("memory.key: {e}")),
        })
    }

    /// The memory entry a successful task saves: its output's `remember` when it has one,
    /// else its output (a marker with the size when that is over `MAX_MEMORY_VALUE_BYTES`).
    fn memory_saved(&self, i: usize, index: u32, succeeded: &JournalEvent) -> Option<JournalEvent> {
        let memory = self.spec(i).memory.as_ref().filter(|m| m.save)?;
        let JournalEvent::TaskSucceeded { output, .. } = succeeded else {
            return None;
        };
        let target = self.memory_of(i, index)?.ok()?;
        let mut value = output
            .get("remember")
            .cloned()
            .unwrap_or_else(|| output.clone());
        let size = serde_json::to_vec(&value).map_or(0, |v| v.len());
        if size > MAX_MEMORY_VALUE_BYTES {
            value = json!({ "elided_bytes": size });
        }
        Some(JournalEvent::MemorySaved {
            step: self.id(i),
            index,
            scope: target.scope,
            key: target.key,
            value,
            ttl_ms: memory.ttl.map_or(0, |t| t.as_millis() as u64),
        })
    }

    /// Why the run may not start another model call: the budget it reached, and its spend.
    fn over_budget(&self) -> Option<String> {
        self.budget.as_ref()?.reached(&self.usage())
    }

    /// The namespace the run belongs to.
    pub fn namespace(&self) -> &Namespace {
        &self.namespace
    }

    /// The run's budget, as last raised.
    pub fn budget(&self) -> Option<&Budget> {
        self.budget.as_ref()
    }

    /// An operator raises the run's budget: each limit given must be at least the one it
    /// replaces. Steps held at the old budget go on if the new one allows.
    pub fn on_raise_budget(&mut self, raise: BudgetRaise) -> Result<Vec<JournalEvent>> {
        if self.state.is_terminal() {
            return Err(Error::FailedPrecondition(format!(
                "run {} {}; only a running run's budget can be raised",
                self.run_id, self.state
            )));
        }
        let old = self.budget.clone().unwrap_or_default();
        let lower = |field: &str, new: String, was: String| {
            Error::InvalidArgument(FieldError::new(
                format!("budget.{field}"),
                format!("{new} is below the run's {was}; a raise cannot lower a limit"),
            ))
        };
        if let (Some(new), Some(was)) = (raise.max_tokens, old.max_tokens)
            && new < was
        {
            return Err(lower("max_tokens", new.to_string(), was.to_string()));
        }
        if let (Some(new), Some(was)) = (raise.max_cost_usd, old.max_cost_usd)
            && new < was
        {
            return Err(lower("max_cost_usd", format!("${new}"), format!("${was}")));
        }
        let budget = Budget {
            max_tokens: raise.max_tokens.or(old.max_tokens),
            max_cost_usd: raise.max_cost_usd.or(old.max_cost_usd),
            on_exceed: raise.on_exceed.unwrap_or(old.on_exceed),
        };
        if let Some((field, why)) = budget.problem() {
            return Err(Error::InvalidArgument(FieldError::new(
                format!("budget{field}"),
                why,
            )));
        }
        let mut out = Vec::new();
        self.emit(
            &mut out,
            JournalEvent::BudgetRaised {
                budget,
                comment: raise.comment,
            },
        );
        if self.over_budget().is_some() {
            return Ok(out);
        }
        // Steps held at the old budget go on where they stopped.
        for i in 0..self.steps.len() {
            let Some(index) = self.steps[i]
                .held
                .filter(|_| self.steps[i].state == StepState::Parked)
            else {
                continue;
            };
            self.emit(&mut out, JournalEvent::StepResumed { step: self.id(i) });
            self.start(i, index, &mut out);
            self.fill(i, &mut out);
        }
        Ok(out)
    }

    /// Caps an `llm` task's `with.max_tokens` by what is left of the run's token budget, so
    /// that one call cannot overshoot by more than its own answer.
    fn cap_tokens(&self, input: &mut Value) {
        let Some(max) = self.budget.as_ref().and_then(|b| b.max_tokens) else {
            return;
        };
        let spent = self.usage();
        let left = max.saturating_sub(spent.input_tokens.saturating_add(spent.output_tokens));
        if let Some(with) = input.get_mut("with").and_then(Value::as_object_mut) {
            let asked = with.get("max_tokens").and_then(Value::as_u64);
            let capped = asked.map_or(left, |a| a.min(left)).max(1);
            with.insert("max_tokens".into(), json!(capped));
        }
    }

    /// Model calls of step `i`, summed over its attempts.
    pub fn step_usage(&self, i: usize) -> UsageTotal {
        self.usage.get(&self.id(i)).copied().unwrap_or_default()
    }

    /// Model calls of the whole run.
    pub fn usage(&self) -> UsageTotal {
        let mut total = UsageTotal::default();
        for u in self.usage.values() {
            total.merge(u);
        }
        total
    }

    fn decide_result(&mut self, i: usize, index: u32, result: &TaskResult) -> Decision {
        match &result.outcome {
            Ok(output) if !(self.planning && i == 0) && self.over_output_limit(output) => {
                let error = TaskError::new(
                    "run_output_limit",
                    format!(
                        "this output ({} bytes) would bring the run's outputs to more than {} bytes (max_run_output_bytes)",
                        json_bytes(output),
                        self.limits.max_run_output_bytes
                    ),
                    false,
                );
                self.failure(i, index, error)
            }
            Ok(output) => {
                let mut out = Vec::new();
                self.succeeded(i, index, output.clone(), &mut out);
                self.advance_into(&mut out);
                out.into()
            }
            Err(error) => self.failure(i, index, error.clone()),
        }
    }

    fn over_output_limit(&self, output: &Value) -> bool {
        self.retained_bytes.saturating_add(json_bytes(output)) > self.limits.max_run_output_bytes
    }

    fn succeeded(&mut self, i: usize, index: u32, output: Value, out: &mut Vec<JournalEvent>) {
        if self.planning && i == 0 {
            return self.planned(output, out);
        }
        let step = self.id(i);
        let task = &self.steps[i].tasks[index as usize];
        let (attempt, agent) = (task.attempt, task.agent.clone());
        self.emit(
            out,
            JournalEvent::TaskSucceeded {
                step: step.clone(),
                index,
                attempt,
                output: output.clone(),
                agent,
                elapsed_ms: 0,
            },
        );
        let spec = self.workflow.steps[i].clone();
        if spec.foreach.is_some() {
            let tasks = &self.steps[i].tasks;
            if tasks.iter().all(|t| t.state == StepState::Succeeded) {
                let output = Value::Array(
                    tasks
                        .iter()
                        .map(|t| t.output.clone().unwrap_or(Value::Null))
                        .collect(),
                );
                self.emit(out, JournalEvent::StepSucceeded { step, output });
            } else {
                self.fill(i, out);
            }
        } else if let Some(l) = &spec.repeat {
            let mut b = self.step_bindings(i);
            b.rest.insert("output".into(), output.clone());
            b.rest.insert("iteration".into(), json!(index));
            match l.until.eval_bool(&b) {
                Ok(true) => self.emit(out, JournalEvent::StepSucceeded { step, output }),
                Ok(false) if index + 1 < l.max_iterations => self.start(i, index + 1, out),
                Ok(false) => self.fail_step(
                    i,
                    out,
                    format!(
                        "loop: `{}` still false after {} iterations (max_iterations)",
                        l.until.source(),
                        l.max_iterations
                    ),
                ),
                Err(e) => self.fail_step(i, out, format!("loop.until: {e}")),
            }
        } else {
            self.emit(out, JournalEvent::StepSucceeded { step, output });
        }
    }

    /// The planner answered: its workflow (a definition as an object or as YAML/JSON text,
    /// alone or under `workflow`) is validated like any other, then its steps follow.
    fn planned(&mut self, output: Value, out: &mut Vec<JournalEvent>) {
        let step = self.id(0);
        let task = &self.steps[0].tasks[0];
        let (attempt, agent) = (task.attempt, task.agent.clone());
        self.emit(
            out,
            JournalEvent::TaskSucceeded {
                step: step.clone(),
                index: 0,
                attempt,
                output: output.clone(),
                agent,
                elapsed_ms: 0,
            },
        );
        match self.plan(&output) {
            Ok((workflow, inputs)) => {
                self.emit(out, JournalEvent::StepSucceeded { step, output });
                self.emit(out, JournalEvent::WorkflowPlanned { workflow, inputs });
            }
            Err(e) => self.fail_step(0, out, format!("the planner's workflow is invalid: {e}")),
        }
    }

    fn plan(&self, output: &Value) -> std::result::Result<(WorkflowDef, Value), String> {
        let answer = output.get("workflow").unwrap_or(output);
        let def = match answer {
            Value::String(text) => mesh_workflow::parse(text, &self.limits),
            other => mesh_workflow::validate::from_value(other.clone()),
        }
        .map_err(|e| e.to_string())?;
        // Checked alone first, so that problems name the planner's own paths.
        mesh_workflow::validate(def.clone(), &self.limits).map_err(|e| e.to_string())?;
        let mut combined = def;
        combined.steps.insert(0, self.workflow.def.steps[0].clone());
        combined.description = self.workflow.def.description.clone();
        let workflow =
            mesh_workflow::validate(combined, &self.limits).map_err(|e| e.to_string())?;
        let inputs = workflow
            .bind_inputs(&self.inputs)
            .map_err(|e| e.to_string())?;
        Ok((workflow.def, inputs))
    }

    pub fn on_failed(&mut self, token: &FencingToken, error: TaskError) -> Option<Decision> {
        let (i, index) = self.current(token)?;
        Some(self.failure(i, index, error))
    }

    fn failure(&mut self, i: usize, index: u32, error: TaskError) -> Decision {
        let policy = self.policy.for_step(self.spec(i));
        let step = self.id(i);
        let task = &self.steps[i].tasks[index as usize];
        let (attempt, failures, agent) = (task.attempt, task.failures + 1, task.agent.clone());
        let mut out = Vec::new();
        self.emit(
            &mut out,
            JournalEvent::TaskFailed {
                step: step.clone(),
                index,
                attempt,
                error: error.clone(),
                agent,
                elapsed_ms: 0,
            },
        );
        let retryable = error.retryable && !policy.non_retryable.contains(&error.code);
        let exhausted = failures >= policy.max_attempts || attempt >= policy.max_total_attempts;
        if !retryable || exhausted {
            let why = if retryable {
                format!("{error} (after {failures} failed attempts)")
            } else {
                error.to_string()
            };
            let why = match self.spec(i).foreach {
                Some(_) => format!("item {index}: {why}"),
                None => why,
            };
            self.fail_step(i, &mut out, why);
            self.advance_into(&mut out);
            return out.into();
        }
        Decision {
            events: out,
            retry_after: Some(RetryAfter {
                step,
                index,
                attempt,
                delay: policy.backoff(failures),
                jitter: policy.jitter,
            }),
        }
    }

    /// The attempt's node went away: a new attempt at once, within the cap on attempts.
    pub fn on_lost(&mut self, token: &FencingToken, reason: &str) -> Option<Vec<JournalEvent>> {
        let (i, index) = self.current(token)?;
        let policy = self.policy.for_step(self.spec(i));
        let mut out = Vec::new();
        if token.attempt >= policy.max_total_attempts {
            let e = format!("{} attempts lost or failed; last: {reason}", token.attempt);
            self.fail_step(i, &mut out, e);
            self.advance_into(&mut out);
        } else {
            self.start(i, index, &mut out);
        }
        Some(out)
    }

    /// A retry whose backoff passed; nothing if the task moved on meanwhile.
    pub fn on_retry(&mut self, id: &StepId, index: u32, attempt: u32) -> Vec<JournalEvent> {
        let token = FencingToken {
            run_id: self.run_id.clone(),
            step_id: id.clone(),
            attempt,
            index,
            epoch: self.epoch,
        };
        let mut out = Vec::new();
        if let Some((i, index)) = self.current(&token).filter(|_| !self.state.is_terminal()) {
            self.start(i, index, &mut out);
        }
        out
    }

    /// The dispatcher handed a current attempt to `agent`: remembered for the run's view and
    /// named by the attempt's result, not journaled on its own (the assignment has already
    /// taken effect, and one in flight is redone after a restart). False for a stale token.
    pub fn on_assigned(&mut self, token: &FencingToken, agent: &AgentKey) -> bool {
        match self.current(token) {
            Some((i, index)) => {
                self.steps[i].tasks[index as usize].agent = Some(agent.clone());
                true
            }
            None => false,
        }
    }

    /// New attempts for every task that was in flight (after a restart), then onwards.
    pub fn restart_running(&mut self) -> Vec<JournalEvent> {
        let mut out = Vec::new();
        if self.state.is_terminal() {
            return out;
        }
        for i in 0..self.steps.len() {
            if self.steps[i].state != StepState::Running {
                continue;
            }
            let running: Vec<u32> = (self.steps[i].tasks.iter().enumerate())
                .filter(|(_, t)| t.state == StepState::Running)
                .map(|(k, _)| k as u32)
                .collect();
            for k in running {
                self.start(i, k, &mut out);
            }
        }
        self.advance_into(&mut out);
        out
    }

    /// A person approved or rejected step `id`.
    pub fn on_decision(
        &mut self,
        id: &StepId,
        approved: bool,
        comment: &str,
        by: &str,
    ) -> Result<Vec<JournalEvent>> {
        let i = self.known_step(id)?;
        if let Some((index, ask)) = self.asking(i) {
            let event = JournalEvent::ToolApprovalDecided {
                step: id.clone(),
                index,
                attempt: ask.attempt,
                call_id: ask.call_id.clone(),
                approved,
                comment: comment.to_owned(),
                by: by.to_owned(),
            };
            let mut out = Vec::new();
            self.emit(&mut out, event);
            return Ok(out);
        }
        let state = self.steps[i].state;
        if state != StepState::AwaitingApproval {
            return Err(Error::FailedPrecondition(format!(
                "step `{id}` does not await approval (it is {state})"
            )));
        }
        let mut out = Vec::new();
        if approved {
            let output = json!({ "approved": true, "comment": comment, "by": by });
            self.emit(
                &mut out,
                JournalEvent::StepSucceeded {
                    step: id.clone(),
                    output,
                },
            );
        } else {
            let who = if by.is_empty() {
                String::new()
            } else {
                format!(" by {by}")
            };
            self.fail_step(i, &mut out, format!("rejected{who}: {comment}"));
        }
        self.advance_into(&mut out);
        Ok(out)
    }

    /// The attempt `token` asks a person to approve its tool call: journaled and shown, when
    /// the attempt is current and has no other call waiting; `None` (refused) otherwise.
    pub fn on_tool_approval(
        &mut self,
        token: &FencingToken,
        call_id: &str,
        tool: &str,
        arguments: Value,
    ) -> Option<Vec<JournalEvent>> {
        let (i, index) = self.current(token)?;
        let t = &self.steps[i].tasks[index as usize];
        if t.asking.as_ref().is_some_and(|a| a.attempt == t.attempt) {
            return None;
        }
        let mut out = Vec::new();
        self.emit(
            &mut out,
            JournalEvent::ToolApprovalAsked {
                step: token.step_id.clone(),
                index,
                attempt: token.attempt,
                call_id: call_id.to_owned(),
                tool: tool.to_owned(),
                arguments,
            },
        );
        Some(out)
    }

    /// The first task of step `i` whose current attempt waits for a decision on a tool call.
    pub fn asking(&self, i: usize) -> Option<(u32, &ToolAsk)> {
        let s = &self.steps[i];
        if s.state != StepState::Running {
            return None;
        }
        s.tasks.iter().enumerate().find_map(|(k, t)| {
            t.asking
                .as_ref()
                .filter(|a| t.state == StepState::Running && a.attempt == t.attempt)
                .map(|a| (k as u32, a))
        })
    }

    /// A signal: kept, and given to every step waiting for it.
    pub fn on_signal(&mut self, name: &str, payload: Value) -> Vec<JournalEvent> {
        let mut out = Vec::new();
        if self.state.is_terminal() {
            return out;
        }
        self.emit(
            &mut out,
            JournalEvent::SignalReceived {
                name: name.to_owned(),
                payload: payload.clone(),
            },
        );
        for i in 0..self.steps.len() {
            let waits = matches!(&self.spec(i).action, Action::Signal { name: n, .. } if n == name);
            if waits && self.steps[i].state == StepState::Waiting {
                let step = self.id(i);
                let output = payload.clone();
                self.emit(&mut out, JournalEvent::StepSucceeded { step, output });
            }
        }
        self.advance_into(&mut out);
        out
    }

    /// A wait's timer fired: the step fails if it still waits and its time is up.
    pub fn on_wait_expired(&mut self, id: &StepId, now_ms: i64) -> Vec<JournalEvent> {
        let mut out = Vec::new();
        let Some(i) = self.index_of(id) else {
            return out;
        };
        let s = &self.steps[i];
        let waiting = matches!(s.state, StepState::Waiting | StepState::AwaitingApproval);
        if !waiting || s.until_ms.is_none_or(|u| u > now_ms) {
            return out;
        }
        let e = match &self.spec(i).action {
            Action::Approval { timeout, .. } => format!(
                "approval_timeout: no decision within {}",
                humantime::format_duration(timeout.unwrap_or_default())
            ),
            Action::Signal { name, timeout } => format!(
                "signal_timeout: no signal `{name}` within {}",
                humantime::format_duration(timeout.unwrap_or_default())
            ),
            Action::Task { .. } => return out,
        };
        self.fail_step(i, &mut out, e);
        self.advance_into(&mut out);
        out
    }

    /// The run's `deadline` passed.
    pub fn on_deadline(&mut self) -> Vec<JournalEvent> {
        let mut out = Vec::new();
        if !self.state.is_terminal() {
            let d = self.workflow.def.deadline.unwrap_or_default();
            let e = format!("deadline of {} exceeded", humantime::format_duration(d));
            self.finish_into(&mut out, RunState::Failed, None, Some(e));
        }
        out
    }

    /// The run's output: the workflow's `outputs`, or else every leaf step's output.
    fn final_output(&self) -> std::result::Result<Value, String> {
        if self.workflow.outputs.is_empty() {
            let mut needed = vec![false; self.steps.len()];
            for s in &self.workflow.steps {
                for &j in &s.needs {
                    needed[j] = true;
                }
            }
            return Ok(Value::Object(
                (0..self.steps.len())
                    .filter(|&i| !needed[i])
                    .map(|i| {
                        let out = self.steps[i].output.clone().unwrap_or(Value::Null);
                        (self.spec(i).id.clone(), out)
                    })
                    .collect(),
            ));
        }
        let named: Vec<String> = self
            .workflow
            .outputs
            .iter()
            .flat_map(|(_, t)| t.exprs())
            .flat_map(|e| e.steps.iter().cloned())
            .collect();
        let b = self.bindings(named);
        let mut out = Map::new();
        for (name, t) in &self.workflow.outputs {
            let v = t.render(&b).map_err(|e| format!("outputs.{name}: {e}"))?;
            out.insert(name.clone(), v);
        }
        Ok(Value::Object(out))
    }

    /// Ends the run: running steps are cancelled, the others that have not finished skipped.
    pub fn finish(
        &mut self,
        state: RunState,
        output: Option<Value>,
        error: Option<String>,
    ) -> Vec<JournalEvent> {
        let mut out = Vec::new();
        if !self.state.is_terminal() {
            self.finish_into(&mut out, state, output, error);
        }
        out
    }

    fn finish_into(
        &mut self,
        out: &mut Vec<JournalEvent>,
        state: RunState,
        output: Option<Value>,
        error: Option<String>,
    ) {
        for i in 0..self.steps.len() {
            let step = self.id(i);
            match self.steps[i].state {
                StepState::Running => self.emit(out, JournalEvent::StepCancelled { step }),
                StepState::Pending
                | StepState::Waiting
                | StepState::AwaitingApproval
                | StepState::Parked => {
                    let reason = format!("{RUN_ENDED}{state}");
                    self.emit(out, JournalEvent::StepSkipped { step, reason })
                }
                _ => {}
            }
        }
        self.emit(
            out,
            JournalEvent::RunFinished {
                state,
                output,
                error,
            },
        );
    }

    // ------------------------------------------------------------ state

    /// The only place state changes.
    pub fn apply(&mut self, event: &JournalEvent) {
        let at = |m: &Self, id: &StepId| m.index_of(id);
        match event {
            JournalEvent::RunCreated => {}
            JournalEvent::StepExpanded { step, items } => {
                if let Some(i) = at(self, step) {
                    let s = &mut self.steps[i];
                    s.state = StepState::Running;
                    // Attempt numbers survive a retry of the step: tokens stay unique.
                    let tasks = (0..items.len())
                        .map(|k| Task {
                            attempt: s.tasks.get(k).map_or(0, |t| t.attempt),
                            resets: s.tasks.get(k).map_or(0, |t| t.resets),
                            ..Task::default()
                        })
                        .collect();
                    s.tasks = tasks;
                    s.items = Some(items.clone());
                }
            }
            JournalEvent::StepStarted {
                step,
                index,
                attempt,
                epoch,
            } => {
                if let Some(i) = at(self, step) {
                    let s = &mut self.steps[i];
                    s.state = StepState::Running;
                    let k = *index as usize;
                    if s.tasks.len() <= k {
                        s.tasks.resize(k + 1, Task::default());
                    }
                    let t = &mut s.tasks[k];
                    t.state = StepState::Running;
                    t.attempt = *attempt;
                    t.epoch = *epoch;
                    t.agent = None;
                }
            }
            JournalEvent::StepAssigned {
                step, index, agent, ..
            } => {
                if let Some(t) = self.task_mut(step, *index) {
                    t.agent = Some(agent.clone());
                }
            }
            JournalEvent::TaskSucceeded {
                step,
                index,
                output,
                agent,
                ..
            } => {
                let mut retained = self.retained_bytes.saturating_add(json_bytes(output));
                if let Some(t) = self.task_mut(step, *index) {
                    // A task run again (`retry --from`) replaces what it kept.
                    if let Some(old) = &t.output {
                        retained = retained.saturating_sub(json_bytes(old));
                    }
                    t.state = StepState::Succeeded;
                    t.output = Some(output.clone());
                    t.error = None;
                    if agent.is_some() {
                        t.agent = agent.clone();
                    }
                }
                self.retained_bytes = retained;
            }
            JournalEvent::ToolApprovalAsked {
                step,
                index,
                attempt,
                call_id,
                tool,
                arguments,
            } => {
                if let Some(t) = self.task_mut(step, *index) {
                    t.asking = Some(ToolAsk {
                        attempt: *attempt,
                        call_id: call_id.clone(),
                        tool: tool.clone(),
                        arguments: arguments.clone(),
                    });
                }
            }
            JournalEvent::ToolApprovalDecided {
                step,
                index,
                call_id,
                ..
            } => {
                if let Some(t) = self.task_mut(step, *index)
                    && t.asking.as_ref().is_some_and(|a| a.call_id == *call_id)
                {
                    t.asking = None;
                }
            }
            // Kept by the store, not by the run; a skill or tool call is its caller's business.
            JournalEvent::MemorySaved { .. }
            | JournalEvent::SkillCalled { .. }
            | JournalEvent::SkillReturned { .. }
            | JournalEvent::ToolUsed { .. } => {}
            JournalEvent::UsageRecorded { step, usage, .. } => {
                let total = self.usage.entry(step.clone()).or_default();
                for u in usage {
                    total.add(u);
                }
            }
            JournalEvent::TaskFailed {
                step,
                index,
                error,
                agent,
                ..
            } => {
                if let Some(t) = self.task_mut(step, *index) {
                    t.failures += 1;
                    t.error = Some(error.to_string());
                    if agent.is_some() {
                        t.agent = agent.clone();
                    }
                }
            }
            JournalEvent::StepWaiting {
                step,
                until_ms,
                detail,
            } => {
                if let Some(i) = at(self, step) {
                    let approval = matches!(self.spec(i).action, Action::Approval { .. });
                    let s = &mut self.steps[i];
                    s.state = if approval {
                        StepState::AwaitingApproval
                    } else {
                        StepState::Waiting
                    };
                    s.until_ms = *until_ms;
                    s.detail = Some(detail.clone());
                }
            }
            JournalEvent::WorkflowPlanned { workflow, inputs } => {
                // Validated before it was journaled; validation is deterministic.
                if let Ok(w) = mesh_workflow::validate(workflow.clone(), &self.limits) {
                    self.steps.resize(w.steps.len(), StepRt::default());
                    if self.budget.is_none() {
                        self.budget = w.def.budget.clone();
                    }
                    self.workflow = Arc::new(w);
                    self.inputs = inputs.clone();
                    self.planning = false;
                }
            }
            JournalEvent::SignalReceived { name, payload } => {
                self.signals.insert(name.clone(), payload.clone());
            }
            JournalEvent::StepSucceeded { step, output } => {
                self.end_step(step, StepState::Succeeded, |s| {
                    s.output = Some(output.clone());
                    s.error = None;
                });
            }
            JournalEvent::StepFailed { step, error } => {
                self.end_step(step, StepState::Failed, |s| s.error = Some(error.clone()));
            }
            JournalEvent::StepSkipped { step, reason } => {
                self.end_step(step, StepState::Skipped, |s| {
                    s.detail = Some(reason.clone())
                });
            }
            JournalEvent::StepCancelled { step } => {
                self.end_step(step, StepState::Cancelled, |_| {});
            }
            JournalEvent::StepParked { step, error, held } => {
                self.end_step(step, StepState::Parked, |s| {
                    s.error = Some(error.clone());
                    s.held = *held;
                });
            }
            JournalEvent::StepResumed { step } => {
                if let Some(i) = at(self, step) {
                    let s = &mut self.steps[i];
                    s.state = StepState::Running;
                    s.error = None;
                    s.held = None;
                    for t in &mut s.tasks {
                        if t.state == StepState::Cancelled {
                            t.state = StepState::Pending;
                        }
                    }
                }
            }
            JournalEvent::BudgetRaised { budget, .. } => {
                self.budget = Some(budget.clone());
            }
            JournalEvent::StepReset { step } => {
                if let Some(i) = at(self, step) {
                    let s = &mut self.steps[i];
                    s.state = StepState::Pending;
                    s.output = None;
                    s.error = None;
                    s.detail = None;
                    s.until_ms = None;
                    s.items = None;
                    s.held = None;
                    for t in &mut s.tasks {
                        *t = Task {
                            attempt: t.attempt,
                            resets: t.resets + 1,
                            ..Task::default()
                        };
                    }
                }
            }
            JournalEvent::RunResumed => {
                self.state = RunState::Running;
                self.output = None;
                self.error = None;
            }
            JournalEvent::RunFinished {
                state,
                output,
                error,
            } => {
                self.state = *state;
                self.output = output.clone();
                self.error = error.clone();
            }
        }
    }

    fn task_mut(&mut self, step: &StepId, index: u32) -> Option<&mut Task> {
        let i = self.index_of(step)?;
        self.steps[i].tasks.get_mut(index as usize)
    }

    /// A step ends: tasks still running are cancelled (their results will be stale).
    fn end_step(&mut self, step: &StepId, state: StepState, f: impl FnOnce(&mut StepRt)) {
        if let Some(i) = self.index_of(step) {
            let s = &mut self.steps[i];
            s.state = state;
            s.until_ms = None;
            for t in &mut s.tasks {
                if t.state == StepState::Running {
                    t.state = StepState::Cancelled;
                }
            }
            f(s);
        }
    }

    // ------------------------------------------------------------ views

    pub fn step_view(&self, i: usize) -> StepView {
        let s = &self.steps[i];
        let spec = self.spec(i);
        let last = s.tasks.iter().rev().find(|t| t.attempt > 0);
        let foreach = spec.foreach.is_some();
        // A running step whose attempt waits for a decision on a tool call shows as awaiting
        // approval, with the call's exact arguments.
        let asking = self.asking(i).map(|(_, a)| {
            format!(
                "tool `{}` waits for approval, with arguments {}",
                a.tool, a.arguments
            )
        });
        StepView {
            id: self.id(i),
            uses: spec.skill().to_owned(),
            state: if asking.is_some() {
                StepState::AwaitingApproval
            } else {
                s.state
            },
            attempt: last.map_or(0, |t| t.attempt),
            agent: last.and_then(|t| t.agent.clone()),
            output: s.output.clone(),
            error: s
                .error
                .clone()
                .or_else(|| last.and_then(|t| t.error.clone())),
            items_done: if foreach && s.items.is_some() {
                s.tasks.iter().filter(|t| t.state.is_terminal()).count() as u32
            } else {
                0
            },
            items_total: s.items.as_ref().map_or(0, |items| items.len() as u32),
            iteration: if spec.repeat.is_some() {
                s.tasks
                    .iter()
                    .filter(|t| t.state != StepState::Pending)
                    .count() as u32
            } else {
                0
            },
            detail: asking.or_else(|| s.detail.clone()),
            output_elided_bytes: None,
            usage: self.step_usage(i),
        }
    }

    pub fn step_views(&self) -> Vec<StepView> {
        (0..self.steps.len()).map(|i| self.step_view(i)).collect()
    }

    /// Index of a step, for callers holding an event.
    pub fn position(&self, id: &StepId) -> Option<usize> {
        self.index_of(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::StoredGoal;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            max_total_attempts: 5,
            backoff: Duration::from_millis(100),
            multiplier: 2.0,
            max_backoff: Duration::from_millis(250),
            jitter: 0.0,
            non_retryable: Vec::new(),
        }
    }

    fn machine(yaml: &str, inputs: Value) -> RunMachine {
        let workflow = mesh_workflow::load(yaml, &Limits::default()).unwrap();
        let inputs = workflow.bind_inputs(&inputs).unwrap();
        let goal = StoredGoal {
            request_digest: None,
            objective: "t".into(),
            inputs,
            workflow: workflow.def,
            idempotency_key: None,
            planned: false,
            budget: None,
            namespace: Default::default(),
        };
        RunMachine::new(
            "r1".into(),
            "g1".into(),
            goal,
            1,
            policy(),
            Limits::default(),
        )
        .unwrap()
    }

    /// (step, index) of every attempt started by these events.
    fn started(events: &[JournalEvent]) -> Vec<(String, u32)> {
        events
            .iter()
            .filter_map(|e| match e {
                JournalEvent::StepStarted { step, index, .. } => Some((step.0.clone(), *index)),
                _ => None,
            })
            .collect()
    }

    fn finished(events: &[JournalEvent]) -> Option<(RunState, Option<Value>, Option<String>)> {
        events.iter().find_map(|e| match e {
            JournalEvent::RunFinished {
                state,
                output,
                error,
            } => Some((*state, output.clone(), error.clone())),
            _ => None,
        })
    }

    fn token(m: &RunMachine, step: &str, index: u32) -> FencingToken {
        m.token(m.position(&step.into()).unwrap(), index)
    }

    fn ok(m: &mut RunMachine, step: &str, index: u32, output: Value) -> Vec<JournalEvent> {
        let token = token(m, step, index);
        m.on_result(&TaskResult::new(token, Ok(output)))
            .expect("current token")
            .events
    }

    fn state(m: &RunMachine, step: &str) -> StepState {
        m.step(&step.into()).unwrap().state
    }

    /// A tool call waiting for approval: the running step shows as awaiting approval with the
    /// exact arguments, survives a replay, is decided once (by the approve of the step), and
    /// is forgotten when its attempt ends; a second ask while one waits, or from a stale
    /// attempt, is refused.
    #[test]
    fn a_tool_call_waits_for_a_decision_on_its_running_step() {
        let yaml = "steps:\n  - {id: ask, uses: llm}\n";
        let mut m = machine(yaml, json!({}));
        let mut journal = m.advance();
        let t = token(&m, "ask", 0);
        let args = json!({ "city": "Lyon" });
        journal.extend(
            m.on_tool_approval(&t, "call-1", "weather", args.clone())
                .unwrap(),
        );
        let view = m.step_view(0);
        assert_eq!(view.state, StepState::AwaitingApproval);
        assert_eq!(
            view.detail.as_deref(),
            Some(r#"tool `weather` waits for approval, with arguments {"city":"Lyon"}"#)
        );
        assert_eq!(
            state(&m, "ask"),
            StepState::Running,
            "the attempt still runs"
        );
        assert!(
            m.on_tool_approval(&t, "call-2", "weather", args.clone())
                .is_none(),
            "one call waits at a time"
        );
        let stale = FencingToken {
            attempt: t.attempt + 1,
            ..t.clone()
        };
        assert!(
            m.on_tool_approval(&stale, "call-3", "weather", args.clone())
                .is_none()
        );

        let mut again = machine(yaml, json!({})).replay(&journal);
        assert_eq!(again.step_view(0), m.step_view(0), "replayed");
        let e = again
            .on_decision(&"ask".into(), false, "no", "ana")
            .unwrap();
        assert!(matches!(
            &e[..],
            [JournalEvent::ToolApprovalDecided { approved: false, call_id, by, .. }]
                if call_id == "call-1" && by == "ana"
        ));
        assert_eq!(again.step_view(0).state, StepState::Running);
        assert_eq!(again.step_view(0).detail, None);
        let err = again.on_decision(&"ask".into(), true, "", "").unwrap_err();
        assert!(
            err.to_string()
                .contains("does not await approval (it is running)")
        );

        // The attempt ends while its call waits: nothing waits any more.
        ok(&mut m, "ask", 0, json!("done"));
        assert_eq!(m.step_view(0).state, StepState::Succeeded);
        assert!(m.asking(0).is_none());
    }

    /// A step with memory: its key rendered from the inputs, its scope named; its accepted
    /// output's `remember` (or the output) saved right after the result, with the TTL; a step
    /// with `save: false` saves nothing.
    #[test]
    fn a_remembered_step_saves_its_output_with_its_result() {
        let yaml = "name: chat
version: 1
inputs: { user: string }
steps:
  - id: a
    uses: llm
    memory: { scope: workflow, key: 'u-${{ inputs.user }}', ttl: 1h }
  - id: b
    uses: echo
    needs: [a]
    memory: { scope: agent, key: k, save: false }
";
        let mut m = machine(yaml, json!({ "user": "ann" }));
        m.advance();
        let a = m.position(&"a".into()).unwrap();
        assert_eq!(
            m.memory_of(a, 0),
            Some(Ok(MemoryRef {
                scope: "workflow:chat".into(),
                key: "u-ann".into(),
                last: 10,
            }))
        );
        let e = ok(
            &mut m,
            "a",
            0,
            json!({ "text": "hi", "remember": { "prompt": "p", "text": "hi" } }),
        );
        let at = e
            .iter()
            .position(|e| matches!(e, JournalEvent::TaskSucceeded { .. }))
            .unwrap();
        assert_eq!(
            e[at + 1],
            JournalEvent::MemorySaved {
                step: "a".into(),
                index: 0,
                scope: "workflow:chat".into(),
                key: "u-ann".into(),
                value: json!({ "prompt": "p", "text": "hi" }),
                ttl_ms: 3_600_000,
            }
        );
        let e = ok(&mut m, "b", 0, json!({ "x": 1 }));
        assert!(
            !e.iter()
                .any(|e| matches!(e, JournalEvent::MemorySaved { .. }))
        );
        let b = m.position(&"b".into()).unwrap();
        assert_eq!(m.memory_of(b, 0).unwrap().unwrap().scope, "agent:echo");
    }

    /// A cost budget: each `llm` result's spend is journaled; once the run has spent its
    /// `max_cost_usd`, the next `llm` attempt is not started and the run fails naming both.
    /// Steps that call no model are not held back.
    #[test]
    fn a_cost_budget_stops_the_next_model_call() {
        let mut m = machine(
            "budget: { max_cost_usd: 0.01 }\nsteps:\n  - {id: a, uses: llm}\n  - {id: b, uses: llm, needs: [a]}\n  - {id: c, uses: echo, needs: [a]}\n  - {id: d, uses: llm, needs: [b]}\n",
            json!({}),
        );
        assert_eq!(started(&m.advance()), [("a".into(), 0)]);
        let spend = |m: &mut RunMachine, step: &str, usd: f64| {
            let result = TaskResult {
                token: token(m, step, 0),
                outcome: Ok(json!("ok")),
                elapsed_ms: 0,
                usage: vec![ModelUsage {
                    provider: "openai".into(),
                    model: "gpt-4o-mini".into(),
                    calls: 1,
                    input_tokens: 10,
                    output_tokens: 10,
                    cost_usd: Some(usd),
                }],
            };
            m.on_result(&result).unwrap().events
        };
        let e = spend(&mut m, "a", 0.006);
        assert!(
            matches!(e[0], JournalEvent::UsageRecorded { .. }),
            "journaled first"
        );
        assert_eq!(started(&e), [("b".into(), 0), ("c".into(), 0)]);
        let e = spend(&mut m, "b", 0.006);
        assert!(started(&e).is_empty(), "d would exceed the budget");
        let (state, _, error) = finished(&e).expect("the run ends");
        assert_eq!(state, RunState::Failed);
        assert!(
            error
                .unwrap()
                .contains("budget: the run has spent $0.012000, its max_cost_usd is $0.01"),
        );
        assert_eq!(m.usage().calls, 2);
        assert!((m.usage().cost_usd - 0.012).abs() < 1e-12);
    }

    /// `on_exceed: park`: the task that would exceed the budget is not started; the step is
    /// parked (its sibling in flight cancelled) and the run keeps running. A raise is
    /// journaled and the step goes on where it stopped: the held task and the cancelled one
    /// start, the finished one is kept. A lower limit is refused; replay gives the same run.
    #[test]
    fn a_parked_budget_goes_on_where_it_stopped_once_raised() {
        let yaml = "budget: { max_tokens: 15, on_exceed: park }
steps:
  - id: s
    uses: llm
    foreach: '${{ [1, 2, 3] }}'
    parallel: 2
";
        let mut m = machine(yaml, json!({}));
        let mut journal = m.advance();
        assert_eq!(started(&journal), [("s".into(), 0), ("s".into(), 1)]);
        let result = TaskResult {
            token: token(&m, "s", 0),
            outcome: Ok(json!("one")),
            elapsed_ms: 7,
            usage: vec![ModelUsage {
                provider: "ollama".into(),
                model: "m".into(),
                calls: 1,
                input_tokens: 10,
                output_tokens: 10,
                cost_usd: None,
            }],
        };
        let e = m.on_result(&result).unwrap().events;
        assert!(started(&e).is_empty(), "task 2 would exceed the budget");
        assert!(matches!(
            e.last(),
            Some(JournalEvent::StepParked { held: Some(2), error, .. })
                if error.contains("budget: the run has used 20 tokens, its max_tokens is 15")
        ));
        assert_eq!(state(&m, "s"), StepState::Parked);
        assert_eq!(m.state(), RunState::Running, "a parked step keeps the run");
        journal.extend(e);

        let lower = BudgetRaise {
            max_tokens: Some(10),
            ..BudgetRaise::default()
        };
        let err = m.on_raise_budget(lower).unwrap_err().to_string();
        assert!(
            err.contains("budget.max_tokens: 10 is below the run's 15"),
            "{err}"
        );
        let raise = BudgetRaise {
            max_tokens: Some(100),
            comment: "worth it".into(),
            ..BudgetRaise::default()
        };
        let e = m.on_raise_budget(raise).unwrap();
        assert!(matches!(
            &e[0],
            JournalEvent::BudgetRaised { budget, comment }
                if budget.max_tokens == Some(100) && budget.on_exceed == OnExceed::Park && comment == "worth it"
        ));
        assert_eq!(started(&e), [("s".into(), 2), ("s".into(), 1)]);
        journal.extend(e);
        journal.extend(ok(&mut m, "s", 1, json!("two")));
        journal.extend(ok(&mut m, "s", 2, json!("three")));
        assert_eq!(m.state(), RunState::Succeeded);
        assert_eq!(m.output(), Some(&json!({"s": ["one", "two", "three"]})));

        let again = machine(yaml, json!({})).replay(&journal);
        assert_eq!(again.steps, m.steps);
        assert_eq!(again.budget(), m.budget());
        assert_eq!(again.usage(), m.usage());
    }

    #[test]
    fn runs_parallel_branches_and_gathers_leaf_outputs() {
        let mut m = machine(
            "steps:\n  - {id: a, uses: echo}\n  - {id: b, uses: echo, needs: [a]}\n  - {id: c, uses: echo, needs: [a]}\n  - {id: d, uses: echo, needs: [b, c]}\n",
            json!({}),
        );
        assert_eq!(started(&m.advance()), [("a".into(), 0)]);
        let e = ok(&mut m, "a", 0, json!(1));
        assert_eq!(started(&e), [("b".into(), 0), ("c".into(), 0)]);
        let input = m.task_input(m.position(&"b".into()).unwrap(), 0).unwrap();
        assert_eq!(input["needs"]["a"], json!(1));
        assert!(
            started(&ok(&mut m, "b", 0, json!(2))).is_empty(),
            "d waits for c"
        );
        assert_eq!(started(&ok(&mut m, "c", 0, json!(3))), [("d".into(), 0)]);
        let e = ok(&mut m, "d", 0, json!(4));
        assert_eq!(
            finished(&e),
            Some((RunState::Succeeded, Some(json!({ "d": 4 })), None))
        );
    }

    #[test]
    fn when_skips_a_branch_and_dependents_still_run() {
        let yaml = "steps:\n  - {id: classify, uses: echo}\n  - {id: yes, uses: echo, needs: [classify], when: \"${{ steps.classify.output.label == 'a' }}\"}\n  - {id: no, uses: echo, needs: [classify], when: \"${{ steps.classify.output.label != 'a' }}\"}\n  - {id: after, uses: echo, needs: [yes, no]}\n";
        let mut m = machine(yaml, json!({}));
        m.advance();
        let e = ok(&mut m, "classify", 0, json!({ "label": "b" }));
        assert_eq!(started(&e), [("no".into(), 0)]);
        assert_eq!(state(&m, "yes"), StepState::Skipped);
        let e = ok(&mut m, "no", 0, json!("handled"));
        assert_eq!(started(&e), [("after".into(), 0)]);
    }

    #[test]
    fn foreach_keeps_parallel_tasks_in_flight_and_gathers_in_order() {
        let yaml = "inputs: {xs: array}\nsteps:\n  - {id: fan, uses: echo, foreach: '${{ inputs.xs }}', parallel: 2, with: {x: '${{ item }}', i: '${{ index }}'}}\n";
        let mut m = machine(yaml, json!({ "xs": ["a", "b", "c", "d", "e"] }));
        let e = m.advance();
        assert_eq!(started(&e), [("fan".into(), 0), ("fan".into(), 1)]);
        let input = m.task_input(0, 1).unwrap();
        assert_eq!(
            (input["with"].clone(), input["item"].clone()),
            (json!({ "x": "b", "i": 1 }), json!("b"))
        );
        // Out of order: task 1 finishes first and frees a slot for task 2.
        assert_eq!(
            started(&ok(&mut m, "fan", 1, json!("B"))),
            [("fan".into(), 2)]
        );
        assert_eq!(
            started(&ok(&mut m, "fan", 0, json!("A"))),
            [("fan".into(), 3)]
        );
        assert_eq!(m.step_view(0).items_done, 2);
        assert_eq!(m.step_view(0).items_total, 5);
        assert_eq!(
            started(&ok(&mut m, "fan", 3, json!("D"))),
            [("fan".into(), 4)]
        );
        ok(&mut m, "fan", 4, json!("E"));
        let e = ok(&mut m, "fan", 2, json!("C"));
        assert_eq!(
            finished(&e).unwrap().1,
            Some(json!({ "fan": ["A", "B", "C", "D", "E"] }))
        );
    }

    #[test]
    fn a_failed_item_fails_the_step_and_stale_siblings_are_fenced() {
        let yaml = "steps:\n  - {id: fan, uses: echo, foreach: '${{ [1, 2] }}', retry: {max_attempts: 1}}\n";
        let mut m = machine(yaml, json!({}));
        m.advance();
        let sibling = token(&m, "fan", 1);
        let t0 = token(&m, "fan", 0);
        let d = m
            .on_result(&TaskResult::new(
                t0,
                Err(TaskError::new("boom", "no", true)),
            ))
            .unwrap();
        let (state, _, error) = finished(&d.events).unwrap();
        assert_eq!(state, RunState::Failed);
        assert!(error.unwrap().contains("item 0: boom: no"));
        assert!(
            m.on_result(&TaskResult::new(sibling, Ok(json!(2))))
                .is_none()
        );
    }

    #[test]
    fn a_loop_repeats_until_its_condition_holds_and_sees_the_previous_output() {
        let yaml = "steps:\n  - id: review\n    uses: echo\n    with: {round: '${{ iteration }}', last: '${{ output }}'}\n    loop: {until: '${{ output.score >= 2 }}', max_iterations: 5}\n";
        let mut m = machine(yaml, json!({}));
        assert_eq!(started(&m.advance()), [("review".into(), 0)]);
        assert_eq!(
            started(&ok(&mut m, "review", 0, json!({ "score": 0 }))),
            [("review".into(), 1)]
        );
        let input = m.task_input(0, 1).unwrap();
        assert_eq!(input["with"], json!({ "round": 1, "last": { "score": 0 } }));
        ok(&mut m, "review", 1, json!({ "score": 1 }));
        let e = ok(&mut m, "review", 2, json!({ "score": 2 }));
        assert_eq!(
            finished(&e).unwrap().1,
            Some(json!({ "review": { "score": 2 } }))
        );
        assert_eq!(m.step_view(0).iteration, 3);
    }

    #[test]
    fn a_loop_that_never_converges_fails_at_its_cap() {
        let yaml = "steps:\n  - {id: l, uses: echo, loop: {until: 'false', max_iterations: 2}}\n";
        let mut m = machine(yaml, json!({}));
        m.advance();
        ok(&mut m, "l", 0, json!(0));
        let e = ok(&mut m, "l", 1, json!(1));
        let error = finished(&e).unwrap().2.unwrap();
        assert!(error.contains("still false after 2 iterations"), "{error}");
    }

    #[test]
    fn retries_follow_the_step_policy_and_skip_non_retryable_codes() {
        let yaml = "steps:\n  - {id: a, uses: flaky, retry: {max_attempts: 4, backoff: 1s, multiplier: 3, max_backoff: 5s, non_retryable: [bad_prompt]}}\n";
        let mut m = machine(yaml, json!({}));
        m.advance();
        let mut delays = Vec::new();
        for _ in 0..3 {
            let token = token(&m, "a", 0);
            let d = m
                .on_failed(&token, TaskError::new("flaky", "again", true))
                .unwrap();
            let r = d.retry_after.expect("retried");
            delays.push(r.delay);
            assert_eq!(
                started(&m.on_retry(&r.step, r.index, r.attempt)),
                [("a".into(), 0)]
            );
        }
        assert_eq!(
            delays,
            [
                Duration::from_secs(1),
                Duration::from_secs(3),
                Duration::from_secs(5)
            ]
        );
        let token = token(&m, "a", 0);
        let d = m
            .on_failed(&token, TaskError::new("bad_prompt", "no", true))
            .unwrap();
        assert!(
            d.retry_after.is_none(),
            "a non_retryable code is not retried"
        );
        assert_eq!(finished(&d.events).unwrap().0, RunState::Failed);
        assert_eq!(
            jittered(Duration::from_secs(10), 0.1, 1.0),
            Duration::from_secs(9)
        );
    }

    #[test]
    fn on_failure_continue_lets_the_run_go_on() {
        let yaml = "steps:\n  - {id: a, uses: x, on_failure: continue}\n  - {id: b, uses: x, needs: [a], with: {s: '${{ steps.a.state }}'}}\n";
        let mut m = machine(yaml, json!({}));
        m.advance();
        let token = token(&m, "a", 0);
        let d = m
            .on_failed(&token, TaskError::new("bad_input", "no", false))
            .unwrap();
        assert_eq!(started(&d.events), [("b".into(), 0)]);
        assert_eq!(
            m.task_input(1, 0).unwrap()["with"],
            json!({ "s": "failed" })
        );
        let e = ok(&mut m, "b", 0, json!("done"));
        assert_eq!(finished(&e).unwrap().0, RunState::Succeeded);
    }

    #[test]
    fn approvals_wait_for_a_decision_and_time_out() {
        let yaml = "steps:\n  - {id: gate, approval: {message: 'ship ${{ inputs.v }}?', timeout: 1h}}\n  - {id: ship, uses: echo, needs: [gate]}\n";
        // The machine reads no clock: the time is what it is told.
        let t0 = 1_700_000_000_000;
        let mut m = machine(yaml, json!({ "v": 2 }));
        m.at(t0).advance();
        assert_eq!(state(&m, "gate"), StepState::AwaitingApproval);
        assert_eq!(m.step_view(0).detail.as_deref(), Some("ship 2?"));
        let err = m.on_decision(&"ship".into(), true, "", "").unwrap_err();
        assert!(
            err.to_string()
                .contains("does not await approval (it is pending)")
        );
        // Too early: the timer fired before the wait's end (a clock step): nothing happens.
        assert!(m.on_wait_expired(&"gate".into(), t0 + 3_599_999).is_empty());
        let e = m.on_decision(&"gate".into(), true, "fine", "ana").unwrap();
        assert_eq!(started(&e), [("ship".into(), 0)]);
        assert_eq!(
            m.step(&"gate".into()).unwrap().output,
            Some(json!({ "approved": true, "comment": "fine", "by": "ana" }))
        );

        let mut m = machine(yaml, json!({ "v": 3 }));
        m.at(t0).advance();
        let e = m.on_wait_expired(&"gate".into(), t0 + 3_600_000);
        assert!(
            finished(&e)
                .unwrap()
                .2
                .unwrap()
                .contains("approval_timeout: no decision within 1h")
        );

        let mut m = machine(yaml, json!({ "v": 4 }));
        m.advance();
        let e = m
            .on_decision(&"gate".into(), false, "not now", "bo")
            .unwrap();
        assert!(
            finished(&e)
                .unwrap()
                .2
                .unwrap()
                .contains("rejected by bo: not now")
        );
    }

    #[test]
    fn signals_complete_waiting_steps_and_are_kept_for_later_ones() {
        let yaml =
            "steps:\n  - {id: a, uses: echo}\n  - {id: w, needs: [a], wait_for: {signal: go}}\n";
        let mut m = machine(yaml, json!({}));
        m.advance();
        // Sent before anyone waits: kept.
        assert!(started(&m.on_signal("go", json!({ "n": 1 }))).is_empty());
        let e = ok(&mut m, "a", 0, json!(0));
        assert_eq!(finished(&e).unwrap().1, Some(json!({ "w": { "n": 1 } })));

        let mut m = machine(yaml, json!({}));
        m.advance();
        ok(&mut m, "a", 0, json!(0));
        assert_eq!(state(&m, "w"), StepState::Waiting);
        let e = m.on_signal("go", json!(7));
        assert_eq!(finished(&e).unwrap().0, RunState::Succeeded);
    }

    #[test]
    fn replaying_the_journal_rebuilds_the_run_mid_loop_mid_fan_out_and_mid_wait() {
        let yaml = "steps:\n  - {id: fan, uses: echo, foreach: '${{ [1, 2, 3] }}', parallel: 2}\n  - {id: l, uses: echo, loop: {until: 'output > 1', max_iterations: 5}}\n  - {id: gate, approval: {}}\n";
        let mut m = machine(yaml, json!({}));
        let mut journal = m.advance();
        journal.extend(ok(&mut m, "fan", 0, json!("x")));
        journal.extend(ok(&mut m, "l", 0, json!(0)));
        assert_eq!(state(&m, "gate"), StepState::AwaitingApproval);
        // A coordinator restart: a new epoch, the state from the journal alone.
        let mut again = machine(yaml, json!({}));
        again.epoch = 2;
        let mut again = again.replay(&journal);
        assert_eq!(again.steps, m.steps);
        let e = again.restart_running();
        assert_eq!(
            started(&e),
            [("fan".into(), 1), ("fan".into(), 2), ("l".into(), 1)],
            "in-flight tasks get new attempts; task 0 and iteration 0 are not run again"
        );
        assert!(
            e.iter()
                .all(|e| !matches!(e, JournalEvent::StepStarted { epoch, .. } if *epoch != 2))
        );
        assert_eq!(state(&again, "gate"), StepState::AwaitingApproval);
    }

    #[test]
    fn an_assignment_is_not_journaled_but_the_result_names_its_agent() {
        let yaml = "steps:\n  - {id: a, uses: echo}\n  - {id: b, uses: echo, needs: [a]}\n";
        let mut m = machine(yaml, json!({}));
        let mut journal = m.advance();
        let agent = AgentKey {
            node: "n1".into(),
            agent: "echo-1".into(),
        };
        let first = token(&m, "a", 0);
        assert!(m.on_assigned(&first, &agent));
        assert_eq!(
            m.step(&"a".into()).unwrap().tasks[0].agent,
            Some(agent.clone())
        );
        let stale = FencingToken {
            attempt: first.attempt + 1,
            ..first.clone()
        };
        assert!(
            !m.on_assigned(&stale, &agent),
            "a stale token changes nothing"
        );
        let events = ok(&mut m, "a", 0, json!("A"));
        assert!(matches!(
            &events[0],
            JournalEvent::TaskSucceeded { agent: Some(a), .. } if *a == agent
        ));
        journal.extend(events);
        // After a restart the finished step still shows who ran it.
        let again = machine(yaml, json!({})).replay(&journal);
        assert_eq!(again.step(&"a".into()).unwrap().tasks[0].agent, Some(agent));
        assert_eq!(again.steps, m.steps);
    }

    #[test]
    fn accepts_exactly_one_result_per_step() {
        let yaml = "steps:\n  - {id: a, uses: echo}\n  - {id: b, uses: echo, needs: [a]}\n";
        let mut m = machine(yaml, json!({}));
        m.advance();
        let first = token(&m, "a", 0);
        let lost = m.on_lost(&first, "node n1 died").unwrap();
        assert_eq!(started(&lost), [("a".into(), 0)], "a new attempt");
        let second = token(&m, "a", 0);
        assert_eq!(second.attempt, first.attempt + 1);
        // The fenced-off attempt's late result is refused; the current one is accepted once.
        let late = TaskResult::new(first, Ok(json!("late")));
        assert!(m.on_result(&late).is_none());
        let current = TaskResult::new(second, Ok(json!("A")));
        assert!(m.on_result(&current).is_some());
        assert!(m.on_result(&current).is_none(), "a duplicate is refused");
        assert_eq!(m.step(&"a".into()).unwrap().output, Some(json!("A")));
    }

    #[test]
    fn lost_attempts_are_capped() {
        let mut m = machine("steps:\n  - {id: a, uses: echo}\n", json!({}));
        m.advance();
        // max_total_attempts is 5: four losses start new attempts, the fifth fails the step.
        for _ in 0..4 {
            let lost = m.on_lost(&token(&m, "a", 0), "node died").unwrap();
            assert_eq!(started(&lost).len(), 1);
        }
        let last = m.on_lost(&token(&m, "a", 0), "node died").unwrap();
        let (state, _, error) = finished(&last).expect("the run ends");
        assert_eq!(state, RunState::Failed);
        assert!(
            error
                .unwrap()
                .contains("5 attempts lost or failed; last: node died"),
            "names the cap and the last reason"
        );
    }

    #[test]
    fn an_expression_error_fails_the_step_with_its_reason() {
        let yaml = "steps:\n  - {id: a, uses: echo, foreach: '${{ inputs.missing }}'}\n";
        let mut m = machine(yaml, json!({}));
        let (state, _, error) = finished(&m.advance()).unwrap();
        assert_eq!(state, RunState::Failed);
        assert!(error.unwrap().contains("foreach:"), "names the field");
    }

    #[test]
    fn a_parked_step_holds_its_dependents_until_retried_or_skipped() {
        let yaml = "steps:\n  - {id: a, uses: x}\n  - {id: b, uses: x, on_failure: park, retry: {max_attempts: 1}}\n  - {id: c, uses: x, needs: [a, b]}\n";
        let mut m = machine(yaml, json!({}));
        m.advance();
        ok(&mut m, "a", 0, json!("A"));
        let first = token(&m, "b", 0);
        let d = m
            .on_failed(&first, TaskError::new("boom", "no", true))
            .unwrap();
        assert!(
            finished(&d.events).is_none(),
            "a parked step keeps the run running"
        );
        assert_eq!(state(&m, "b"), StepState::Parked);
        assert_eq!(state(&m, "c"), StepState::Pending);
        // Retry: b runs again with a new attempt number (never a token twice); a is kept.
        let e = m.on_retry_from(&"b".into()).unwrap();
        assert_eq!(started(&e), [("b".into(), 0)]);
        assert_eq!(token(&m, "b", 0).attempt, 2);
        assert_eq!(state(&m, "a"), StepState::Succeeded);
        let second = token(&m, "b", 0);
        m.on_failed(&second, TaskError::new("boom", "again", true))
            .unwrap();
        // Skip: c goes on without b.
        let e = m.on_skip(&"b".into(), "not needed").unwrap();
        assert_eq!(started(&e), [("c".into(), 0)]);
        assert!(
            m.on_skip(&"a".into(), "")
                .unwrap_err()
                .to_string()
                .contains("is not parked")
        );
    }

    #[test]
    fn retrying_a_failed_run_keeps_earlier_results_and_reruns_what_was_cut_short() {
        let yaml = "steps:\n  - {id: a, uses: x}\n  - {id: b, uses: x, needs: [a], retry: {max_attempts: 1}}\n  - {id: c, uses: x, needs: [a]}\n  - {id: d, uses: x, needs: [b, c]}\n";
        let mut m = machine(yaml, json!({}));
        m.advance();
        ok(&mut m, "a", 0, json!("A"));
        let token = token(&m, "b", 0);
        let d = m
            .on_failed(&token, TaskError::new("boom", "no", true))
            .unwrap();
        assert_eq!(finished(&d.events).unwrap().0, RunState::Failed);
        assert_eq!(
            state(&m, "c"),
            StepState::Cancelled,
            "c was running when b failed"
        );
        let e = m.on_retry_from(&"b".into()).unwrap();
        assert_eq!(e[0], JournalEvent::RunResumed);
        assert_eq!(started(&e), [("b".into(), 0), ("c".into(), 0)]);
        assert_eq!(m.state, RunState::Running);
        assert_eq!(
            m.step(&"a".into()).unwrap().output,
            Some(json!("A")),
            "a is not run again"
        );
        ok(&mut m, "b", 0, json!("B"));
        ok(&mut m, "c", 0, json!("C"));
        let e = ok(&mut m, "d", 0, json!("D"));
        assert_eq!(finished(&e).unwrap().0, RunState::Succeeded);
        let err = m.on_retry_from(&"a".into()).unwrap_err().to_string();
        assert!(
            err.contains("only a running or failed run can be retried"),
            "{err}"
        );
    }

    #[test]
    fn a_planner_answer_becomes_the_workflow_that_runs_next() {
        let goal = StoredGoal {
            request_digest: None,
            objective: "say hi".into(),
            inputs: json!({}),
            workflow: serde_json::from_value(json!({
                "steps": [{ "id": "planner", "uses": "plan", "with": { "objective": "say hi" } }]
            }))
            .unwrap(),
            idempotency_key: None,
            planned: true,
            budget: None,
            namespace: Default::default(),
        };
        let mut m = RunMachine::new(
            "r".into(),
            "g".into(),
            goal.clone(),
            1,
            policy(),
            Limits::default(),
        )
        .unwrap();
        let mut journal = m.advance();
        let plan = json!({ "workflow": "steps:\n  - {id: hi, uses: echo, with: {q: '${{ inputs.who }}'}}\ninputs: {who: {type: string, default: you}}\n" });
        let e = ok(&mut m, "planner", 0, plan);
        assert!(
            e.iter()
                .any(|e| matches!(e, JournalEvent::WorkflowPlanned { .. }))
        );
        assert_eq!(started(&e), [("hi".into(), 0)]);
        assert_eq!(m.task_input(1, 0).unwrap()["with"], json!({ "q": "you" }));
        journal.extend(e);
        // The plan is in the journal: a replay runs the same workflow.
        let again = RunMachine::new(
            "r".into(),
            "g".into(),
            goal.clone(),
            2,
            policy(),
            Limits::default(),
        )
        .unwrap()
        .replay(&journal);
        assert_eq!(again.steps.len(), 2);
        assert_eq!(again.step_view(1).id.as_str(), "hi");

        // An invalid plan fails the run and says why.
        let mut m =
            RunMachine::new("r".into(), "g".into(), goal, 1, policy(), Limits::default()).unwrap();
        m.advance();
        let e = ok(
            &mut m,
            "planner",
            0,
            json!({ "steps": [{ "id": "x", "uses": "echo", "needs": ["y"] }] }),
        );
        let error = finished(&e).unwrap().2.unwrap();
        assert!(
            error
                .contains("the planner's workflow is invalid: steps[0].needs[0]: unknown step `y`"),
            "{error}"
        );
    }

    /// The retry schedule as a run lives it: each failure's backoff slept on tokio's
    /// (paused) clock before the retry, jitter included.
    #[tokio::test(start_paused = true)]
    async fn retries_wait_their_backoff_on_the_clock() {
        let yaml = "steps:\n  - {id: a, uses: flaky, retry: {max_attempts: 5, backoff: 2s, multiplier: 2, max_backoff: 5s, jitter: 0.5}}\n";
        let mut m = machine(yaml, json!({}));
        m.advance();
        let clock = tokio::time::Instant::now();
        let randoms = [0.0, 1.0, 0.5];
        for random in randoms {
            let token = token(&m, "a", 0);
            let d = m
                .on_failed(&token, TaskError::new("flaky", "again", true))
                .unwrap();
            let r = d.retry_after.unwrap();
            tokio::time::sleep(jittered(r.delay, r.jitter, random)).await;
            assert_eq!(started(&m.on_retry(&r.step, r.index, r.attempt)).len(), 1);
        }
        // 2 s (no jitter drawn) + 4 s halved (jitter 0.5 fully drawn) + 5 s (capped) less a quarter.
        assert_eq!(
            clock.elapsed(),
            Duration::from_millis(2_000 + 2_000 + 3_750)
        );
        let e = ok(&mut m, "a", 0, json!("done"));
        assert_eq!(finished(&e).unwrap().0, RunState::Succeeded);
        assert_eq!(token(&m, "a", 0).attempt, 4);
    }
}
