//! One actor per run: a state machine over the run's steps. Every change is written to the
//! run's journal before it takes effect; effects (dispatching an attempt, telling watchers)
//! follow. A restarted run loads its steps from the store: completed steps stay completed,
//! steps that were in flight get a new attempt.
//! Child of its `Swarm`.
//!
//! Invariant: a step accepts exactly one result, the one carrying its current fencing token.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;

use mesh_proto::domain::*;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde_json::{Map, Value, json};
use tokio::sync::broadcast;
use tracing::{debug, info, warn};

use crate::config::DispatchConfig;
use crate::dispatcher::{DispatchRequest, DispatcherMsg};
use crate::error::{Error, Result};
use crate::metrics as m;
use crate::node_session::{NodeTx, Outbound};
use crate::slot::Slot;
use crate::store::{JournalEvent, Store, StoredRun};
use crate::swarm::{RunDirectory, SwarmMsg};

/// Events a watcher may fall behind by before its watch ends.
const WATCH_BUFFER: usize = 256;

pub enum RunMsg {
    /// Sent to itself once started: re-dispatch what was in flight, then make progress.
    Start,
    Assigned {
        token: FencingToken,
        agent: AgentKey,
    },
    /// A result that passed the dispatcher's fence; acknowledged on `ack` once journaled.
    Result {
        result: TaskResult,
        ack: NodeTx,
    },
    /// The attempt's node or agent went away; dispatch a new attempt at once.
    AttemptLost {
        token: FencingToken,
        reason: String,
    },
    /// The attempt could not run (timeout, unschedulable, queue full).
    AttemptFailed {
        token: FencingToken,
        error: TaskError,
    },
    /// Sent to itself when a retry's backoff has passed.
    Retry {
        step: StepId,
        attempt: u32,
    },
    /// The dispatcher restarted and forgot the in-flight attempts.
    Redispatch,
    /// Progress of the current attempt of a step, for watchers.
    Progress(TaskProgress),
    Cancel {
        reason: String,
        reply: RpcReplyPort<Result<RunView>>,
    },
    Subscribe(RpcReplyPort<(RunView, broadcast::Receiver<RunEvent>)>),
}

/// How a step's failures are retried.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub max_total_attempts: u32,
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl RetryPolicy {
    pub fn from_config(c: &DispatchConfig) -> Self {
        Self {
            max_attempts: c.max_attempts.max(1),
            max_total_attempts: c.max_total_attempts.max(1),
            backoff: c.retry_backoff,
            max_backoff: c.max_retry_backoff,
        }
    }

    /// Wait before the retry that follows the `failures`-th failure.
    pub fn backoff(&self, failures: u32) -> Duration {
        let factor = 1u32
            .checked_shl(failures.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.backoff.saturating_mul(factor).min(self.max_backoff)
    }
}

#[derive(Clone, Debug)]
pub struct StepRt {
    pub spec: StepSpec,
    pub state: StepState,
    pub attempt: u32,
    pub epoch: u64,
    pub failures: u32,
    pub agent: Option<AgentKey>,
    pub output: Option<Value>,
    pub error: Option<String>,
}

/// What a result or failure leads to.
#[derive(Debug, Default, PartialEq)]
pub struct Decision {
    pub events: Vec<JournalEvent>,
    /// Retry this step's attempt after the delay.
    pub retry_after: Option<(StepId, u32, Duration)>,
}

/// The run's decisions, free of any actor runtime.
#[derive(Debug)]
pub struct RunMachine {
    pub run_id: RunId,
    pub goal_id: GoalId,
    pub goal: GoalSpec,
    pub epoch: u64,
    pub state: RunState,
    pub steps: Vec<StepRt>,
    index: HashMap<StepId, usize>,
    pub output: Option<Value>,
    pub error: Option<String>,
    policy: RetryPolicy,
}

impl RunMachine {
    pub fn from_stored(stored: StoredRun, epoch: u64, policy: RetryPolicy) -> Result<Self> {
        if stored.steps.len() != stored.goal.steps.len() {
            return Err(Error::Corrupt(format!(
                "run {} has mismatched steps",
                stored.run_id
            )));
        }
        let steps: Vec<StepRt> = stored
            .goal
            .steps
            .iter()
            .zip(stored.steps)
            .map(|(spec, s)| StepRt {
                spec: spec.clone(),
                state: s.state,
                attempt: s.attempt,
                epoch: 0,
                failures: s.failures,
                agent: s.agent,
                output: s.output,
                error: s.error,
            })
            .collect();
        let index = steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.spec.id.clone(), i))
            .collect();
        Ok(Self {
            run_id: stored.run_id,
            goal_id: stored.goal_id,
            goal: stored.goal,
            epoch,
            state: stored.state,
            steps,
            index,
            output: None,
            error: None,
            policy,
        })
    }

    pub fn step(&self, id: &StepId) -> Option<&StepRt> {
        self.index.get(id).map(|&i| &self.steps[i])
    }

    pub fn token(&self, step: &StepRt) -> FencingToken {
        FencingToken {
            run_id: self.run_id.clone(),
            step_id: step.spec.id.clone(),
            attempt: step.attempt,
            epoch: step.epoch,
        }
    }

    /// The running step this token is current for.
    fn current(&self, token: &FencingToken) -> Option<&StepRt> {
        self.step(&token.step_id).filter(|s| {
            s.state == StepState::Running && s.attempt == token.attempt && s.epoch == token.epoch
        })
    }

    fn started(&self, step: &StepRt) -> JournalEvent {
        JournalEvent::StepStarted {
            step: step.spec.id.clone(),
            attempt: step.attempt + 1,
            epoch: self.epoch,
        }
    }

    /// New attempts for every step that was in flight (after a restart).
    pub fn restart_running(&self) -> Vec<JournalEvent> {
        if self.state.is_terminal() {
            return Vec::new();
        }
        self.steps
            .iter()
            .filter(|s| s.state == StepState::Running)
            .map(|s| self.started(s))
            .collect()
    }

    /// The events that move the run forward from its current state.
    pub fn next(&self) -> Vec<JournalEvent> {
        if self.state.is_terminal() {
            return Vec::new();
        }
        if let Some(failed) = self.steps.iter().find(|s| s.state == StepState::Failed) {
            let error = format!(
                "step `{}` failed: {}",
                failed.spec.id,
                failed.error.as_deref().unwrap_or("unknown error")
            );
            return self.finish(RunState::Failed, None, Some(error));
        }
        let ready: Vec<JournalEvent> = self
            .steps
            .iter()
            .filter(|s| s.state == StepState::Pending && self.needs_met(s))
            .map(|s| self.started(s))
            .collect();
        if !ready.is_empty() {
            return ready;
        }
        if self.steps.iter().all(|s| s.state == StepState::Succeeded) {
            return self.finish(RunState::Succeeded, Some(self.final_output()), None);
        }
        Vec::new()
    }

    fn needs_met(&self, step: &StepRt) -> bool {
        step.spec.needs.iter().all(|n| {
            self.step(n)
                .is_some_and(|s| s.state == StepState::Succeeded)
        })
    }

    /// Outputs of the steps no other step needs, by step id.
    pub fn final_output(&self) -> Value {
        let needed: HashSet<&StepId> = self
            .steps
            .iter()
            .flat_map(|s| s.spec.needs.iter())
            .collect();
        let out: Map<String, Value> = self
            .steps
            .iter()
            .filter(|s| !needed.contains(&s.spec.id))
            .map(|s| (s.spec.id.0.clone(), s.output.clone().unwrap_or(Value::Null)))
            .collect();
        Value::Object(out)
    }

    /// The task input of a step: its `with`, the goal's inputs and the outputs of its needs.
    pub fn task_input(&self, step: &StepRt) -> Value {
        let needs: Map<String, Value> = step
            .spec
            .needs
            .iter()
            .filter_map(|n| {
                self.step(n)
                    .map(|s| (n.0.clone(), s.output.clone().unwrap_or(Value::Null)))
            })
            .collect();
        json!({ "with": step.spec.with, "inputs": self.goal.inputs, "needs": needs })
    }

    /// Ends the run: running steps are cancelled, pending ones skipped.
    pub fn finish(
        &self,
        state: RunState,
        output: Option<Value>,
        error: Option<String>,
    ) -> Vec<JournalEvent> {
        let mut events: Vec<JournalEvent> = self
            .steps
            .iter()
            .filter_map(|s| match s.state {
                StepState::Running => Some(JournalEvent::StepCancelled {
                    step: s.spec.id.clone(),
                }),
                StepState::Pending => Some(JournalEvent::StepSkipped {
                    step: s.spec.id.clone(),
                }),
                _ => None,
            })
            .collect();
        events.push(JournalEvent::RunFinished {
            state,
            output,
            error,
        });
        events
    }

    pub fn on_result(&self, result: &TaskResult) -> Option<Decision> {
        let step = self.current(&result.token)?;
        Some(match &result.outcome {
            Ok(output) => Decision {
                events: vec![JournalEvent::StepSucceeded {
                    step: step.spec.id.clone(),
                    attempt: step.attempt,
                    output: output.clone(),
                }],
                retry_after: None,
            },
            Err(error) => self.failure(step, error.clone()),
        })
    }

    pub fn on_failed(&self, token: &FencingToken, error: TaskError) -> Option<Decision> {
        let step = self.current(token)?;
        Some(self.failure(step, error))
    }

    fn failure(&self, step: &StepRt, error: TaskError) -> Decision {
        let failures = step.failures + 1;
        let id = step.spec.id.clone();
        let mut events = vec![JournalEvent::StepAttemptFailed {
            step: id.clone(),
            attempt: step.attempt,
            error: error.clone(),
        }];
        let exhausted =
            failures >= self.policy.max_attempts || step.attempt >= self.policy.max_total_attempts;
        if !error.retryable || exhausted {
            let why = if error.retryable {
                format!("{error} (after {failures} failed attempts)")
            } else {
                error.to_string()
            };
            events.push(JournalEvent::StepFailed {
                step: id,
                error: why,
            });
            return Decision {
                events,
                retry_after: None,
            };
        }
        Decision {
            events,
            retry_after: Some((id, step.attempt, self.policy.backoff(failures))),
        }
    }

    /// The attempt's node went away: a new attempt at once, within the cap on attempts.
    pub fn on_lost(&self, token: &FencingToken, reason: &str) -> Option<Vec<JournalEvent>> {
        let step = self.current(token)?;
        if step.attempt >= self.policy.max_total_attempts {
            return Some(vec![JournalEvent::StepFailed {
                step: step.spec.id.clone(),
                error: format!("{} attempts lost or failed; last: {reason}", step.attempt),
            }]);
        }
        Some(vec![self.started(step)])
    }

    /// A retry whose backoff passed; nothing if the step moved on meanwhile.
    pub fn on_retry(&self, id: &StepId, attempt: u32) -> Vec<JournalEvent> {
        match self.step(id) {
            Some(s)
                if s.state == StepState::Running
                    && s.attempt == attempt
                    && !self.state.is_terminal() =>
            {
                vec![self.started(s)]
            }
            _ => Vec::new(),
        }
    }

    pub fn on_assigned(&self, token: &FencingToken, agent: &AgentKey) -> Option<JournalEvent> {
        let step = self.current(token)?;
        Some(JournalEvent::StepAssigned {
            step: step.spec.id.clone(),
            attempt: step.attempt,
            agent: agent.clone(),
        })
    }

    pub fn apply(&mut self, event: &JournalEvent) {
        let at = |m: &mut Self, id: &StepId| m.index.get(id).copied();
        match event {
            JournalEvent::RunCreated => {}
            JournalEvent::StepStarted {
                step,
                attempt,
                epoch,
            } => {
                if let Some(i) = at(self, step) {
                    let s = &mut self.steps[i];
                    s.state = StepState::Running;
                    s.attempt = *attempt;
                    s.epoch = *epoch;
                    s.agent = None;
                }
            }
            JournalEvent::StepAssigned { step, agent, .. } => {
                if let Some(i) = at(self, step) {
                    self.steps[i].agent = Some(agent.clone());
                }
            }
            JournalEvent::StepSucceeded { step, output, .. } => {
                if let Some(i) = at(self, step) {
                    let s = &mut self.steps[i];
                    s.state = StepState::Succeeded;
                    s.output = Some(output.clone());
                    s.error = None;
                }
            }
            JournalEvent::StepAttemptFailed { step, error, .. } => {
                if let Some(i) = at(self, step) {
                    let s = &mut self.steps[i];
                    s.failures += 1;
                    s.error = Some(error.to_string());
                }
            }
            JournalEvent::StepFailed { step, error } => {
                if let Some(i) = at(self, step) {
                    let s = &mut self.steps[i];
                    s.state = StepState::Failed;
                    s.error = Some(error.clone());
                }
            }
            JournalEvent::StepCancelled { step } => {
                if let Some(i) = at(self, step) {
                    self.steps[i].state = StepState::Cancelled;
                }
            }
            JournalEvent::StepSkipped { step } => {
                if let Some(i) = at(self, step) {
                    self.steps[i].state = StepState::Skipped;
                }
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

    pub fn step_view(&self, s: &StepRt) -> StepView {
        StepView {
            id: s.spec.id.clone(),
            uses: s.spec.uses.clone(),
            state: s.state,
            attempt: s.attempt,
            agent: s.agent.clone(),
            output: s.output.clone(),
            error: s.error.clone(),
        }
    }
}

pub struct Run;

/// What a run needs from the rest of the coordinator.
#[derive(Clone, Debug)]
pub struct RunDeps {
    pub store: Store,
    pub dispatcher: Slot<DispatcherMsg>,
    pub directory: RunDirectory,
    pub epoch: u64,
    pub policy: RetryPolicy,
}

pub struct RunArgs {
    pub run_id: RunId,
    pub swarm: ActorRef<SwarmMsg>,
    pub deps: RunDeps,
}

pub struct RunActorState {
    machine: RunMachine,
    next_seq: u64,
    deps: RunDeps,
    swarm: ActorRef<SwarmMsg>,
    /// Watchers' channel, made on the first watch: a broadcast channel allocates its whole
    /// buffer up front, which most runs (never watched) should not pay for.
    watchers: Option<broadcast::Sender<RunEvent>>,
    picked: HashSet<(String, AgentKey)>,
    created_at_ms: i64,
    /// When this run last wrote to its journal (Unix ms).
    updated_at_ms: i64,
    started: Instant,
}

impl RunActorState {
    /// The run as clients see it, from memory: it equals the store's view because every
    /// change is journaled before it is applied here.
    fn view(&self) -> RunView {
        let m = &self.machine;
        let mut swarm: Vec<SwarmMember> = self
            .picked
            .iter()
            .map(|(skill, agent)| SwarmMember {
                skill: skill.clone(),
                agent: agent.clone(),
            })
            .collect();
        swarm.sort_by(|a, b| (&a.skill, &a.agent).cmp(&(&b.skill, &b.agent)));
        RunView {
            run_id: m.run_id.clone(),
            goal_id: m.goal_id.clone(),
            objective: m.goal.objective.clone(),
            state: m.state,
            steps: m.steps.iter().map(|s| m.step_view(s)).collect(),
            output: m.output.clone(),
            error: m.error.clone(),
            swarm,
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
        }
    }

    fn publish(&self, event: RunEvent) {
        if let Some(tx) = &self.watchers {
            let _ = tx.send(event);
        }
    }

    /// Journals the events (one write, committed with other runs' writes), applies them,
    /// performs their effects, then keeps moving the run forward until it has nothing more
    /// to do.
    async fn commit(
        &mut self,
        myself: &ActorRef<RunMsg>,
        mut events: Vec<JournalEvent>,
    ) -> Result<()> {
        loop {
            if !events.is_empty() {
                let n = events.len() as u64;
                let written = self
                    .deps
                    .store
                    .record(&self.machine.run_id, self.next_seq, events)
                    .await?;
                self.next_seq += n;
                self.updated_at_ms = crate::store::now_ms();
                for event in &written {
                    self.machine.apply(event);
                    self.effect(myself, event);
                }
            }
            events = self.machine.next();
            if events.is_empty() {
                return Ok(());
            }
        }
    }

    fn effect(&mut self, myself: &ActorRef<RunMsg>, event: &JournalEvent) {
        let publish_step = |st: &Self, id: &StepId| {
            if let Some(s) = st.machine.step(id) {
                st.publish(RunEvent::Step(st.machine.step_view(s)));
            }
        };
        match event {
            JournalEvent::RunCreated => {}
            JournalEvent::StepStarted { step, .. } => {
                let Some(s) = self.machine.step(step) else {
                    return;
                };
                let token = self.machine.token(s);
                debug!(%token, skill = %s.spec.uses, "dispatching attempt");
                self.deps
                    .dispatcher
                    .cast(DispatcherMsg::Dispatch(DispatchRequest {
                        skill: s.spec.uses.clone(),
                        input: self.machine.task_input(s),
                        idempotency_key: format!("{}/{}", self.machine.run_id, s.spec.id),
                        token,
                        run: myself.clone(),
                        ready_at: Instant::now(),
                    }));
                publish_step(self, step);
            }
            JournalEvent::StepAssigned { step, .. }
            | JournalEvent::StepSucceeded { step, .. }
            | JournalEvent::StepAttemptFailed { step, .. }
            | JournalEvent::StepFailed { step, .. }
            | JournalEvent::StepCancelled { step }
            | JournalEvent::StepSkipped { step } => publish_step(self, step),
            JournalEvent::RunFinished {
                state,
                output,
                error,
            } => {
                info!(run_id = %self.machine.run_id, %state, elapsed_ms = self.started.elapsed().as_millis() as u64, "run finished");
                metrics::counter!(m::RUNS_FINISHED, "state" => state.as_str()).increment(1);
                self.deps.dispatcher.cast(DispatcherMsg::CancelRun {
                    run_id: self.machine.run_id.clone(),
                    reason: format!("run {state}"),
                });
                self.publish(RunEvent::Finished {
                    state: *state,
                    output: output.clone(),
                    error: error.clone(),
                });
                myself.stop(Some(state.as_str().to_owned()));
            }
        }
    }
}

impl Actor for Run {
    type Msg = RunMsg;
    type State = RunActorState;
    type Arguments = RunArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: RunArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let stored = args.deps.store.load_run(&args.run_id)?;
        let next_seq = stored.next_seq;
        let created_at_ms = stored.created_at_ms;
        let picked = stored
            .swarm
            .iter()
            .map(|m| (m.skill.clone(), m.agent.clone()))
            .collect();
        let machine = RunMachine::from_stored(stored, args.deps.epoch, args.deps.policy.clone())?;
        args.deps
            .directory
            .insert(machine.run_id.clone(), myself.clone());
        metrics::gauge!(m::RUNS_ACTIVE).increment(1.0);
        myself.cast(RunMsg::Start)?;
        Ok(RunActorState {
            machine,
            next_seq,
            deps: args.deps,
            swarm: args.swarm,
            watchers: None,
            picked,
            created_at_ms,
            updated_at_ms: created_at_ms,
            started: Instant::now(),
        })
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Self::Msg>,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        st.deps.directory.remove_if(&st.machine.run_id, &myself);
        metrics::gauge!(m::RUNS_ACTIVE).decrement(1.0);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RunMsg::Start | RunMsg::Redispatch => {
                let events = st.machine.restart_running();
                st.commit(&myself, events).await?;
            }
            RunMsg::Assigned { token, agent } => {
                if let Some(event) = st.machine.on_assigned(&token, &agent) {
                    let skill = st
                        .machine
                        .step(&token.step_id)
                        .map(|s| s.spec.uses.clone())
                        .unwrap_or_default();
                    if st.picked.insert((skill.clone(), agent.clone())) {
                        let _ = st
                            .swarm
                            .cast(SwarmMsg::Member(SwarmMember { skill, agent }));
                    }
                    st.commit(&myself, vec![event]).await?;
                }
            }
            RunMsg::Result { result, ack } => {
                let token = result.token.clone();
                let (code, message) = match st.machine.on_result(&result) {
                    Some(decision) => {
                        apply_decision(st, &myself, decision).await?;
                        (AckCode::Accepted, String::new())
                    }
                    None => {
                        warn!(%token, "result for an attempt that is no longer current rejected");
                        metrics::counter!(m::STALE_RESULTS).increment(1);
                        (
                            AckCode::Stale,
                            "stale fencing token: the step moved on".to_owned(),
                        )
                    }
                };
                let _ = ack.try_send(Outbound::Frame(ToNode::ResultAck {
                    token,
                    code,
                    message,
                }));
            }
            RunMsg::AttemptFailed { token, error } => {
                if let Some(decision) = st.machine.on_failed(&token, error) {
                    apply_decision(st, &myself, decision).await?;
                }
            }
            RunMsg::AttemptLost { token, reason } => {
                if let Some(events) = st.machine.on_lost(&token, &reason) {
                    st.commit(&myself, events).await?;
                }
            }
            RunMsg::Retry { step, attempt } => {
                let events = st.machine.on_retry(&step, attempt);
                st.commit(&myself, events).await?;
            }
            RunMsg::Cancel { reason, reply } => {
                let events = st.machine.finish(
                    RunState::Cancelled,
                    None,
                    Some(format!("cancelled: {reason}")),
                );
                let result = match st.commit(&myself, events).await {
                    Ok(()) => Ok(st.view()),
                    Err(e) => Err(e),
                };
                let _ = reply.send(result);
            }
            RunMsg::Progress(p) => {
                if st
                    .machine
                    .step(&p.token.step_id)
                    .is_some_and(|s| s.attempt == p.token.attempt)
                {
                    st.publish(RunEvent::Progress {
                        step: p.token.step_id,
                        attempt: p.token.attempt,
                        message: p.message,
                        fraction: p.fraction,
                    });
                }
            }
            RunMsg::Subscribe(reply) => {
                let view = st.view();
                let rx = st
                    .watchers
                    .get_or_insert_with(|| broadcast::channel(WATCH_BUFFER).0)
                    .subscribe();
                let _ = reply.send((view, rx));
            }
        }
        Ok(())
    }
}

async fn apply_decision(
    st: &mut RunActorState,
    myself: &ActorRef<RunMsg>,
    decision: Decision,
) -> Result<()> {
    st.commit(myself, decision.events).await?;
    if let Some((step, attempt, delay)) = decision.retry_after {
        debug!(%step, attempt, delay_ms = delay.as_millis() as u64, "retrying after backoff");
        myself.send_after(delay, move || RunMsg::Retry { step, attempt });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str, needs: &[&str]) -> StepSpec {
        StepSpec {
            id: id.into(),
            uses: "echo".into(),
            with: json!({ "id": id }),
            needs: needs.iter().map(|&n| n.into()).collect(),
        }
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            max_total_attempts: 5,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(250),
        }
    }

    fn machine(steps: Vec<StepSpec>) -> RunMachine {
        let goal = GoalSpec {
            objective: "t".into(),
            inputs: json!({}),
            steps,
            idempotency_key: None,
        };
        let stored = StoredRun::fresh("r1".into(), "g1".into(), goal);
        RunMachine::from_stored(stored, 1, policy()).unwrap()
    }

    fn apply_all(m: &mut RunMachine, events: &[JournalEvent]) {
        for e in events {
            m.apply(e);
        }
    }

    fn started_ids(events: &[JournalEvent]) -> Vec<String> {
        events
            .iter()
            .filter_map(|e| match e {
                JournalEvent::StepStarted { step, .. } => Some(step.0.clone()),
                _ => None,
            })
            .collect()
    }

    fn succeed(m: &mut RunMachine, id: &str) {
        let token = m.token(m.step(&id.into()).unwrap());
        let d = m
            .on_result(&TaskResult {
                token,
                outcome: Ok(json!({ "done": id })),
            })
            .unwrap();
        apply_all(m, &d.events);
    }

    #[test]
    fn runs_parallel_branches_and_gathers_final_outputs() {
        let mut m = machine(vec![
            spec("a", &[]),
            spec("b", &["a"]),
            spec("c", &["a"]),
            spec("d", &["b"]),
            spec("e", &["c", "d"]),
        ]);
        let e = m.next();
        assert_eq!(started_ids(&e), ["a"]);
        apply_all(&mut m, &e);
        succeed(&mut m, "a");
        let e = m.next();
        assert_eq!(started_ids(&e), ["b", "c"], "b and c run in parallel");
        apply_all(&mut m, &e);
        let input = m.task_input(m.step(&"b".into()).unwrap());
        assert_eq!(input["needs"]["a"], json!({ "done": "a" }));
        succeed(&mut m, "c");
        assert!(m.next().is_empty(), "e waits for d, d for b");
        succeed(&mut m, "b");
        let e = m.next();
        assert_eq!(started_ids(&e), ["d"]);
        apply_all(&mut m, &e);
        succeed(&mut m, "d");
        let e = m.next();
        apply_all(&mut m, &e);
        succeed(&mut m, "e");
        let e = m.next();
        assert_eq!(
            e,
            vec![JournalEvent::RunFinished {
                state: RunState::Succeeded,
                output: Some(json!({ "e": { "done": "e" } })),
                error: None
            }]
        );
    }

    #[test]
    fn accepts_exactly_one_result_per_step() {
        let mut m = machine(vec![spec("a", &[])]);
        let e = m.next();
        apply_all(&mut m, &e);
        let first = m.token(m.step(&"a".into()).unwrap());
        // The node died: attempt 2 replaces attempt 1.
        let lost = m.on_lost(&first, "node lost").unwrap();
        apply_all(&mut m, &lost);
        let second = m.token(m.step(&"a".into()).unwrap());
        assert_eq!(second.attempt, 2);
        assert!(
            m.on_result(&TaskResult {
                token: first,
                outcome: Ok(json!(1))
            })
            .is_none()
        );
        let d = m
            .on_result(&TaskResult {
                token: second.clone(),
                outcome: Ok(json!(2)),
            })
            .unwrap();
        apply_all(&mut m, &d.events);
        assert!(
            m.on_result(&TaskResult {
                token: second,
                outcome: Ok(json!(3))
            })
            .is_none()
        );
        assert_eq!(m.step(&"a".into()).unwrap().output, Some(json!(2)));
    }

    #[test]
    fn retries_with_capped_backoff_then_fails_the_run() {
        let mut m = machine(vec![spec("a", &[]), spec("b", &["a"])]);
        let e = m.next();
        apply_all(&mut m, &e);
        let err = TaskError {
            code: "flaky".into(),
            message: "try again".into(),
            retryable: true,
        };
        let mut delays = Vec::new();
        for _ in 0..2 {
            let token = m.token(m.step(&"a".into()).unwrap());
            let d = m
                .on_result(&TaskResult {
                    token: token.clone(),
                    outcome: Err(err.clone()),
                })
                .unwrap();
            apply_all(&mut m, &d.events);
            let (step, attempt, delay) = d.retry_after.unwrap();
            delays.push(delay);
            let e = m.on_retry(&step, attempt);
            assert_eq!(started_ids(&e), ["a"]);
            apply_all(&mut m, &e);
        }
        assert_eq!(
            delays,
            [Duration::from_millis(100), Duration::from_millis(200)]
        );
        let token = m.token(m.step(&"a".into()).unwrap());
        let d = m
            .on_result(&TaskResult {
                token,
                outcome: Err(err),
            })
            .unwrap();
        assert!(
            d.retry_after.is_none(),
            "third failure exhausts max_attempts"
        );
        apply_all(&mut m, &d.events);
        let e = m.next();
        assert!(matches!(
            e.last(),
            Some(JournalEvent::RunFinished {
                state: RunState::Failed,
                ..
            })
        ));
        assert!(e.contains(&JournalEvent::StepSkipped { step: "b".into() }));
        assert_eq!(policy().backoff(10), Duration::from_millis(250));
    }

    #[test]
    fn a_non_retryable_error_fails_at_once() {
        let mut m = machine(vec![spec("a", &[])]);
        let e = m.next();
        apply_all(&mut m, &e);
        let token = m.token(m.step(&"a".into()).unwrap());
        let err = TaskError {
            code: "bad_input".into(),
            message: "no".into(),
            retryable: false,
        };
        let d = m.on_failed(&token, err).unwrap();
        assert!(d.retry_after.is_none());
        assert!(matches!(
            d.events.last(),
            Some(JournalEvent::StepFailed { .. })
        ));
    }

    #[test]
    fn a_restart_gives_in_flight_steps_a_new_attempt_and_keeps_completed_ones() {
        let mut m = machine(vec![spec("a", &[]), spec("b", &["a"])]);
        let e = m.next();
        apply_all(&mut m, &e);
        succeed(&mut m, "a");
        let e = m.next();
        apply_all(&mut m, &e);
        // Restart: a new epoch, state as stored.
        m.epoch = 2;
        let e = m.restart_running();
        assert_eq!(
            e,
            vec![JournalEvent::StepStarted {
                step: "b".into(),
                attempt: 2,
                epoch: 2
            }]
        );
        assert_eq!(m.step(&"a".into()).unwrap().state, StepState::Succeeded);
    }

    #[test]
    fn lost_attempts_are_capped() {
        let mut m = machine(vec![spec("a", &[])]);
        let e = m.next();
        apply_all(&mut m, &e);
        for _ in 0..4 {
            let token = m.token(m.step(&"a".into()).unwrap());
            let e = m.on_lost(&token, "node lost").unwrap();
            apply_all(&mut m, &e);
        }
        let token = m.token(m.step(&"a".into()).unwrap());
        assert_eq!(token.attempt, 5);
        let e = m.on_lost(&token, "node lost").unwrap();
        assert!(matches!(e[0], JournalEvent::StepFailed { .. }));
    }
}
