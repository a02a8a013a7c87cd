//! One actor per run. It holds the run's [`RunMachine`], journals every change the machine
//! decides before acting on it, then acts: dispatching attempts, arming timers (retries,
//! waits, the run's deadline), telling watchers. A restarted run replays its journal:
//! completed steps stay completed, tasks that were in flight get a new attempt, waits and
//! the deadline are armed again for the time they have left.
//! Child of its `Swarm`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use mesh_proto::domain::*;
use mesh_proto::secrets::Secrets;
use mesh_workflow::{Action, Limits, Target};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde_json::Value;
use tokio::sync::{SetOnce, broadcast};
use tracing::{debug, info, warn};

use crate::directory::RunDirectory;
use crate::dispatcher::{DispatchRequest, DispatcherMsg, QueueBoard};
use crate::error::{Error, Result};
use crate::intake::Admission;
use crate::machine::BudgetRaise;
pub use crate::machine::{Decision, RetryPolicy, RunMachine};
use crate::metrics as m;
use crate::node_link::{Report, ResultAck};
use crate::slot::Slot;
use crate::store::{Backend, JournalEvent, Store, StoredRun, now_ms};
use crate::swarm::SwarmMsg;
use crate::swarms::SwarmsMsg;

/// Events a watcher may fall behind by before its watch ends.
const WATCH_BUFFER: usize = 256;

/// The text a running attempt has streamed that is kept for watchers who come later, per
/// attempt; past it they see the rest as it comes, not what came before.
const MAX_STREAMED_BYTES: usize = 256 * 1024;

/// What a watcher of a live run gets: the run as it is, the text its running attempts have
/// streamed so far (as deltas that restart each attempt's text), and every event after.
pub struct Subscription {
    pub view: RunView,
    pub streamed: Vec<RunEvent>,
    pub events: broadcast::Receiver<Arc<RunEvent>>,
}

pub enum RunMsg {
    /// Sent to itself once started: re-dispatch what was in flight, then make progress.
    Start,
    /// Panics: for the tests of the restart paths.
    #[cfg(test)]
    Crash,
    Assigned {
        token: FencingToken,
        agent: AgentKey,
    },
    /// A result that passed the dispatcher's fence; acknowledged on `ack` once journaled.
    Result {
        result: TaskResult,
        ack: ResultAck,
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
        index: u32,
        attempt: u32,
    },
    /// Sent to itself when a wait (approval, signal) may have timed out.
    WaitExpired(StepId),
    /// Sent to itself when the run's deadline passes.
    DeadlinePassed,
    /// The dispatcher restarted and forgot the in-flight attempts.
    Redispatch,
    /// Progress of the current attempt of a step, for watchers.
    Report(Report),
    /// The current attempt of a step calls a skill; answered on `reply`, its node's stream.
    SkillCall {
        call: SkillCall,
        reply: crate::node_link::NodeTx,
    },
    /// The current attempt of a step asks a person to approve a tool call; the decision is
    /// answered on `reply`, its node's stream.
    ToolApproval {
        ask: ToolApproval,
        reply: crate::node_link::NodeTx,
    },
    Cancel {
        reason: String,
        reply: RpcReplyPort<Result<RunView>>,
    },
    /// Approve (or reject) a step awaiting approval.
    Decide {
        step: StepId,
        approved: bool,
        comment: String,
        by: String,
        reply: RpcReplyPort<Result<RunView>>,
    },
    Signal {
        name: String,
        payload: Value,
        reply: RpcReplyPort<Result<RunView>>,
    },
    /// Run a failed or parked step again, with its dependents.
    RetryFrom {
        step: StepId,
        reply: RpcReplyPort<Result<RunView>>,
    },
    /// Skip a parked step.
    Skip {
        step: StepId,
        comment: String,
        reply: RpcReplyPort<Result<RunView>>,
    },
    /// Raise the run's budget.
    RaiseBudget {
        raise: BudgetRaise,
        reply: RpcReplyPort<Result<RunView>>,
    },
    /// A sub-workflow task's child run was created (or found again).
    ChildStarted(RunId),
    /// A sub-workflow task's child run ended: its output, or why it failed.
    ChildFinished {
        token: FencingToken,
        outcome: TaskOutcome,
    },
    View(RpcReplyPort<RunView>),
    /// The names of the agents of the run's swarm so far (a broadcast's recipients).
    SwarmAgents(RpcReplyPort<Vec<String>>),
    Subscribe(RpcReplyPort<Subscription>),
}

pub struct Run;

/// How long a sub-workflow's start waits for the swarm supervisor at start-up.
const SUPERVISOR_WAIT: Duration = Duration::from_secs(5);

/// What a run needs from the rest of the coordinator.
#[derive(Clone, Debug)]
pub struct RunDeps {
    pub store: Store,
    pub dispatcher: Slot<DispatcherMsg>,
    pub directory: RunDirectory,
    pub epoch: u64,
    pub policy: RetryPolicy,
    pub limits: Limits,
    /// The swarm supervisor, for starting sub-workflows' child runs; set once it exists.
    pub supervisor: Arc<SetOnce<Slot<SwarmsMsg>>>,
    /// Steps waiting for an agent, by skill; `swarms::submit` refuses goals whose skill's
    /// queue is full.
    pub queues: QueueBoard,
    /// Told when the runs found at start-up are resumed.
    pub readiness: crate::readiness::Readiness,
    /// The namespaces' secrets, opened for the tasks whose input names them.
    pub secrets: crate::secrets::Vault,
    /// The namespaces' registered tools, put in place of a step's references to them.
    pub tools: crate::tools::ToolRegistry,
}

pub struct RunArgs {
    pub run_id: RunId,
    pub swarm: ActorRef<SwarmMsg>,
    pub deps: RunDeps,
    pub begin: Begin,
}

/// Where a run actor starts from.
pub enum Begin {
    /// The store: a run restarted after a crash, or retried after it finished.
    Load,
    /// The run as stored, loaded by the caller (resume at start-up).
    Stored(Box<StoredRun>),
    /// A run just submitted: its machine and its first decisions, journaled with the goal,
    /// whose effects (dispatching its first steps) are still to be done.
    New(Box<NewStart>),
}

pub struct NewStart {
    pub machine: RunMachine,
    pub events: Vec<JournalEvent>,
    pub created_at_ms: i64,
    /// Trace context of the submission, the parent of the run's span (tracing on only).
    pub traceparent: Option<String>,
}

/// A run actor's state as it begins, from wherever it begins.
struct Begun {
    machine: RunMachine,
    next_seq: u64,
    created_at_ms: i64,
    updated_at_ms: i64,
    picked: HashSet<(String, AgentKey)>,
    first: Option<Vec<JournalEvent>>,
}

async fn begin(deps: &RunDeps, run_id: &RunId, begin: Begin) -> Result<Begun> {
    let stored = |(machine, stored): (RunMachine, StoredRun)| Begun {
        machine,
        next_seq: stored.next_seq,
        created_at_ms: stored.created_at_ms,
        updated_at_ms: stored.updated_at_ms,
        picked: (stored.swarm.into_iter())
            .map(|m| (m.skill, m.agent))
            .collect(),
        first: None,
    };
    Ok(match begin {
        Begin::Load => stored(load(deps, run_id).await?),
        Begin::Stored(run) => stored(rebuild(deps, *run)?),
        // Journaled with the goal: `run_created`, then the first decisions.
        Begin::New(new) => Begun {
            machine: new.machine,
            next_seq: 1 + new.events.len() as u64,
            created_at_ms: new.created_at_ms,
            updated_at_ms: new.created_at_ms,
            picked: HashSet::new(),
            first: Some(new.events),
        },
    })
}

/// Rebuilds a run from the store: its machine, replayed from the journal.
pub async fn load(deps: &RunDeps, run_id: &RunId) -> Result<(RunMachine, StoredRun)> {
    rebuild(deps, deps.store.load_run(run_id).await?)
}

/// A run's machine, replayed from its stored journal.
fn rebuild(deps: &RunDeps, mut stored: StoredRun) -> Result<(RunMachine, StoredRun)> {
    let events = std::mem::take(&mut stored.events);
    let machine = RunMachine::new(
        stored.run_id.clone(),
        stored.goal_id.clone(),
        stored.goal.clone(),
        deps.epoch,
        deps.policy.clone(),
        deps.limits.clone(),
    )?
    .replay(&events);
    Ok((machine, stored))
}

/// The view of a run that is not live (finished, or waiting to be resumed): kept in
/// memory for a run that finished lately, else replayed from the store.
pub async fn stored_view(deps: &RunDeps, run_id: &RunId) -> Result<RunView> {
    if let Some(view) = deps.directory.finished(run_id) {
        return Ok(view);
    }
    let (machine, stored) = load(deps, run_id).await?;
    Ok(view(
        &machine,
        stored.swarm,
        stored.created_at_ms,
        stored.updated_at_ms,
    ))
}

fn view(
    m: &RunMachine,
    swarm: Vec<SwarmMember>,
    created_at_ms: i64,
    updated_at_ms: i64,
) -> RunView {
    RunView {
        run_id: m.run_id().clone(),
        goal_id: m.goal_id().clone(),
        objective: m.objective().to_owned(),
        state: m.state(),
        steps: m.step_views(),
        output: m.output().cloned(),
        error: m.error().map(str::to_owned),
        swarm,
        created_at_ms,
        updated_at_ms,
        output_elided_bytes: None,
        usage: m.usage(),
        budget: m.budget().cloned(),
        namespace: m.namespace().clone(),
    }
}

pub struct RunActorState {
    machine: RunMachine,
    next_seq: u64,
    deps: RunDeps,
    swarm: ActorRef<SwarmMsg>,
    /// Watchers' channel, made on the first watch: a broadcast channel allocates its whole
    /// buffer up front, which most runs (never watched) should not pay for. Events travel
    /// behind an `Arc`, so that the buffer is slots of a pointer, not of an event.
    watchers: Option<broadcast::Sender<Arc<RunEvent>>>,
    /// A new run's first decisions, journaled with its goal; their effects wait for `Start`.
    first: Option<Vec<JournalEvent>>,
    picked: HashSet<(String, AgentKey)>,
    /// Child runs of sub-workflow tasks, and the tasks that wait for them.
    children: Vec<RunId>,
    child_waits: Vec<tokio::task::AbortHandle>,
    created_at_ms: i64,
    /// When this run last wrote to its journal (Unix ms).
    updated_at_ms: i64,
    started: Instant,
    /// The secrets handed to attempts in flight, to scrub from what they send back.
    secrets: HashMap<FencingToken, Secrets>,
    /// The run's span and its attempts' spans in flight: made only when spans are exported
    /// (`Span::none()` and empty otherwise; see `mesh_proto::trace_context`).
    span: tracing::Span,
    attempt_spans: HashMap<FencingToken, tracing::Span>,
    /// The text each running attempt has streamed so far (scrubbed, at most
    /// `MAX_STREAMED_BYTES`), for watchers who come in the middle.
    streamed: HashMap<FencingToken, String>,
    /// Skill calls in flight, by their child task's token.
    skill_calls: HashMap<FencingToken, PendingSkillCall>,
    /// Where the decision on a tool call waiting for approval goes: the asking attempt and
    /// its node's stream, by (step, task, attempt, call id). Gone after a restart: the node
    /// lost its stream too, and its attempt asks again.
    tool_replies: HashMap<(StepId, u32, u32, String), (FencingToken, crate::node_link::NodeTx)>,
}

/// A skill call an attempt made, running as a child task.
#[derive(Debug)]
struct PendingSkillCall {
    caller: FencingToken,
    call_id: String,
    reply: crate::node_link::NodeTx,
    started: Instant,
}

/// Most skill calls of a run in flight at once.
const MAX_SKILL_CALLS: usize = 64;

/// The span of a run, child of its submission's when it has one; `Span::none()` with tracing
/// off, so that nothing is made.
fn run_span(machine: &RunMachine, parent: Option<&str>) -> tracing::Span {
    if !mesh_proto::trace_context::enabled() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        parent: None,
        "run",
        run_id = %machine.run_id(),
        namespace = %machine.namespace(),
        state = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    if let Some(parent) = parent {
        mesh_proto::trace_context::set_parent(&span, parent);
    }
    if let Some(id) = mesh_proto::trace_context::trace_id(&span) {
        span.record("trace_id", id);
    }
    span
}

impl RunActorState {
    /// A span for the attempt `token` of a step, child of the run's; its trace context, for
    /// the dispatch (`None` with tracing off).
    fn attempt_span(&mut self, token: &FencingToken, skill: &str) -> Option<String> {
        if self.span.is_none() {
            return None;
        }
        let span = tracing::info_span!(
            parent: &self.span,
            "step",
            run_id = %token.run_id,
            step_id = %token.step_id,
            index = token.index,
            attempt = token.attempt,
            skill,
            error = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let traceparent = mesh_proto::trace_context::traceparent_of(&span);
        self.attempt_spans.insert(token.clone(), span);
        traceparent
    }

    /// Whether `token` is its task's current attempt (what it reports is shown).
    fn is_current(&self, token: &FencingToken) -> bool {
        self.machine.position(&token.step_id).is_some_and(|i| {
            self.machine.steps()[i]
                .tasks
                .get(token.index as usize)
                .is_some_and(|t| t.attempt == token.attempt)
        })
    }

    /// Forgets the text the attempt `token` streamed, and ends its span, marked failed with
    /// `error`.
    fn attempt_ended(&mut self, token: &FencingToken, error: Option<&str>) {
        self.streamed.remove(token);
        if let Some(span) = self.attempt_spans.remove(token)
            && let Some(error) = error
        {
            span.record("error", error);
            span.record("otel.status_code", "ERROR");
        }
    }

    /// The run as clients see it, from memory: it equals the store's view because every
    /// change is journaled before anyone can ask.
    fn view(&self) -> RunView {
        let mut swarm: Vec<SwarmMember> = self
            .picked
            .iter()
            .map(|(skill, agent)| SwarmMember {
                skill: skill.clone(),
                agent: agent.clone(),
            })
            .collect();
        swarm.sort_by(|a, b| (&a.skill, &a.agent).cmp(&(&b.skill, &b.agent)));
        view(&self.machine, swarm, self.created_at_ms, self.updated_at_ms)
    }

    fn publish(&self, event: RunEvent) {
        if let Some(tx) = &self.watchers {
            let _ = tx.send(Arc::new(event));
        }
    }

    /// Journals the events the machine decided (one write, committed with other runs'
    /// writes), then performs their effects. If the write fails the actor fails and is
    /// rebuilt from the journal, which never held these events.
    async fn commit(&mut self, myself: &ActorRef<RunMsg>, events: Vec<JournalEvent>) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let n = events.len() as u64;
        let written = self
            .deps
            .store
            .record(self.machine.run_id(), self.next_seq, events)
            .await?;
        self.next_seq += n;
        self.updated_at_ms = now_ms();
        self.committed(myself, &written);
        Ok(())
    }

    /// What follows a decision once it is journaled: its effects, and watchers told.
    fn committed(&mut self, myself: &ActorRef<RunMsg>, written: &[JournalEvent]) {
        let mut changed: Vec<usize> = Vec::new();
        for event in written {
            self.effect(myself, event);
            if let Some(i) = event.step().and_then(|s| self.machine.position(s))
                && changed.last() != Some(&i)
            {
                changed.push(i);
            }
        }
        if self.watchers.is_some() {
            changed.dedup();
            for i in changed {
                self.publish(RunEvent::Step(self.machine.step_view(i)));
            }
            if let Some(JournalEvent::RunFinished {
                state,
                output,
                error,
            }) = written.last()
            {
                self.publish(RunEvent::Finished {
                    state: *state,
                    output: output.clone(),
                    error: error.clone(),
                    output_elided_bytes: None,
                });
            }
        }
    }

    /// An attempt's skill call: refused (answered at once) when the caller is no longer
    /// current, is itself a skill call, or the run has too many in flight; else journaled and
    /// dispatched as a child task `STEP~CALL_ID` of the run, in its namespace, fenced like any.
    async fn skill_call(
        &mut self,
        myself: &ActorRef<RunMsg>,
        call: SkillCall,
        reply: crate::node_link::NodeTx,
    ) -> Result<()> {
        let refuse = |why: String| {
            let _ = reply.try_send(crate::node_link::Outbound::Frame(ToNode::SkillResult {
                token: call.token.clone(),
                call_id: call.call_id.clone(),
                outcome: Err(TaskError::new("skill_call_refused", why, false)),
            }));
        };
        let caller = &call.token;
        if caller
            .step_id
            .0
            .contains(mesh_proto::convert::SKILL_CALL_MARK)
        {
            refuse("a skill called as a tool cannot call skills itself".into());
            return Ok(());
        }
        if !self.is_current(caller) || self.machine.state().is_terminal() {
            refuse("the calling attempt is no longer current".into());
            return Ok(());
        }
        if self.skill_calls.len() >= MAX_SKILL_CALLS {
            refuse(format!(
                "the run has {MAX_SKILL_CALLS} skill calls in flight, its limit"
            ));
            return Ok(());
        }
        let child = FencingToken {
            step_id: StepId(format!(
                "{}{}{}",
                caller.step_id,
                mesh_proto::convert::SKILL_CALL_MARK,
                call.call_id
            )),
            ..caller.clone()
        };
        if self.skill_calls.contains_key(&child) {
            refuse(format!("call `{}` was made already", call.call_id));
            return Ok(());
        }
        self.commit(
            myself,
            vec![JournalEvent::SkillCalled {
                step: caller.step_id.clone(),
                index: caller.index,
                attempt: caller.attempt,
                call_id: call.call_id.clone(),
                skill: call.skill.clone(),
                input: call.input.clone(),
            }],
        )
        .await?;
        let namespace = self.machine.namespace().to_string();
        self.deps
            .dispatcher
            .cast(DispatcherMsg::Dispatch(DispatchRequest {
                skill: call.skill.clone(),
                agent: None,
                input: serde_json::json!({ "with": call.input, "needs": {} }),
                idempotency_key: format!(
                    "{}/{}/{}/{}",
                    self.machine.run_id(),
                    child.step_id,
                    child.index,
                    child.attempt
                ),
                timeout: None,
                labels: [(NAMESPACE_LABEL.to_owned(), namespace)].into(),
                token: child.clone(),
                secrets: Secrets::new(),
                traceparent: None,
                run: myself.clone(),
                ready_at: Instant::now(),
            }));
        self.skill_calls.insert(
            child,
            PendingSkillCall {
                caller: call.token,
                call_id: call.call_id,
                reply,
                started: Instant::now(),
            },
        );
        Ok(())
    }

    /// An attempt's tool call waits for a person: journaled (its arguments scrubbed of the
    /// attempt's secrets) and shown as the step awaiting approval; refused (answered at once,
    /// as rejected) when the attempt is no longer current or waits for another decision.
    async fn tool_approval(
        &mut self,
        myself: &ActorRef<RunMsg>,
        ask: ToolApproval,
        reply: crate::node_link::NodeTx,
    ) -> Result<()> {
        let mut arguments = ask.arguments;
        if let Some(secrets) = self.secrets.get(&ask.token) {
            mesh_proto::secrets::scrub(&mut arguments, secrets);
        }
        let Some(events) =
            self.machine
                .on_tool_approval(&ask.token, &ask.call_id, &ask.tool, arguments)
        else {
            let _ = reply.try_send(crate::node_link::Outbound::Frame(ToNode::ToolDecision {
                token: ask.token,
                call_id: ask.call_id,
                decision: ToolDecision {
                    approved: false,
                    comment: "the attempt is no longer current, or already waits for a \
                              decision on another call"
                        .into(),
                    by: "agentmesh".into(),
                },
            }));
            return Ok(());
        };
        // Decisions of attempts that ended meanwhile would go nowhere.
        let machine = &self.machine;
        self.tool_replies.retain(|(step, index, attempt, _), _| {
            machine.position(step).is_some_and(|i| {
                machine
                    .asking(i)
                    .is_some_and(|(k, a)| k == *index && a.attempt == *attempt)
            })
        });
        let t = &ask.token;
        self.tool_replies.insert(
            (t.step_id.clone(), t.index, t.attempt, ask.call_id),
            (ask.token.clone(), reply),
        );
        self.commit(myself, events).await
    }

    /// A tool call the current attempt made, journaled (scrubbed of its secrets).
    async fn tool_used(&mut self, myself: &ActorRef<RunMsg>, used: ToolUsed) -> Result<()> {
        if !self.is_current(&used.token) || self.machine.state().is_terminal() {
            return Ok(());
        }
        let (mut arguments, mut result) = (used.arguments, used.result);
        if let Some(secrets) = self.secrets.get(&used.token) {
            mesh_proto::secrets::scrub(&mut arguments, secrets);
            result = mesh_proto::secrets::scrub_text(&result, secrets);
        }
        let t = used.token;
        self.commit(
            myself,
            vec![JournalEvent::ToolUsed {
                step: t.step_id,
                index: t.index,
                attempt: t.attempt,
                call_id: used.call_id,
                tool: used.tool,
                arguments,
                ok: used.ok,
                result,
                elapsed_ms: used.elapsed_ms,
            }],
        )
        .await
    }

    /// A skill call's child task ended: journaled, and answered to the caller (which may be
    /// gone: its node then drops the answer).
    async fn skill_returned(
        &mut self,
        myself: &ActorRef<RunMsg>,
        child: &FencingToken,
        outcome: std::result::Result<Value, TaskError>,
        agent: Option<AgentKey>,
        elapsed_ms: u64,
    ) -> Result<()> {
        let Some(pending) = self.skill_calls.remove(child) else {
            return Ok(());
        };
        let elapsed_ms = if elapsed_ms > 0 {
            elapsed_ms
        } else {
            pending.started.elapsed().as_millis() as u64
        };
        self.commit(
            myself,
            vec![JournalEvent::SkillReturned {
                step: pending.caller.step_id.clone(),
                index: pending.caller.index,
                attempt: pending.caller.attempt,
                call_id: pending.call_id.clone(),
                outcome: outcome.clone(),
                agent,
                elapsed_ms,
            }],
        )
        .await?;
        let _ = pending
            .reply
            .try_send(crate::node_link::Outbound::Frame(ToNode::SkillResult {
                token: pending.caller,
                call_id: pending.call_id,
                outcome,
            }));
        Ok(())
    }

    /// Loads the newest entries of the task's memory into its input (`memory: { scope, key,
    /// entries }`) off the actor, then dispatches it; a store that cannot be read fails the
    /// attempt, retryably.
    fn dispatch_with_memory(
        &self,
        myself: &ActorRef<RunMsg>,
        mut request: DispatcherMsg,
        memory: crate::machine::MemoryRef,
    ) {
        let (store, dispatcher, myself) = (
            self.deps.store.clone(),
            self.deps.dispatcher.clone(),
            myself.clone(),
        );
        let namespace = self.machine.namespace().to_string();
        tokio::spawn(async move {
            let DispatcherMsg::Dispatch(r) = &mut request else {
                return;
            };
            match store
                .memory(&namespace, &memory.scope, &memory.key, memory.last)
                .await
            {
                Ok(entries) => {
                    let entries: Vec<Value> = entries
                        .into_iter()
                        .map(|e| {
                            serde_json::json!({ "value": e.value, "run_id": e.run_id,
                                "step_id": e.step_id, "at_ms": e.at_ms })
                        })
                        .collect();
                    if let Some(input) = r.input.as_object_mut() {
                        input.insert(
                            "memory".into(),
                            serde_json::json!({ "scope": memory.scope, "key": memory.key,
                                "entries": entries }),
                        );
                    }
                    dispatcher.cast(request);
                }
                Err(e) => {
                    let _ = myself.cast(RunMsg::AttemptFailed {
                        token: r.token.clone(),
                        error: TaskError::new(
                            "memory",
                            format!("reading memory failed: {e}"),
                            true,
                        ),
                    });
                }
            }
        });
    }

    /// Journals an operator's decision (approve, signal, retry, skip) and answers with the
    /// run as it is then; a decision the machine refused is answered with its error.
    async fn commit_and_view(
        &mut self,
        myself: &ActorRef<RunMsg>,
        decided: Result<Vec<JournalEvent>>,
    ) -> Result<RunView> {
        self.commit(myself, decided?).await?;
        Ok(self.view())
    }

    fn effect(&mut self, myself: &ActorRef<RunMsg>, event: &JournalEvent) {
        match event {
            JournalEvent::StepStarted {
                step,
                index,
                attempt,
                ..
            } => {
                let Some(i) = self.machine.position(step) else {
                    return;
                };
                // Only the newest attempt is dispatched: a later event of this batch may
                // already have ended the task.
                let current = self.machine.steps()[i]
                    .tasks
                    .get(*index as usize)
                    .is_some_and(|t| t.attempt == *attempt && t.state == StepState::Running);
                if !current {
                    return;
                }
                let token = self.machine.token(i, *index);
                let spec = self.machine.spec(i).clone();
                let input = match self.machine.take_task_input(i, *index) {
                    Ok(mut input) => {
                        // Registered tools before the secrets: theirs are opened too.
                        let namespace = self.machine.namespace().as_str();
                        if let Err(e) = self.deps.tools.resolve(namespace, &mut input) {
                            let _ = myself.cast(RunMsg::AttemptFailed {
                                token,
                                error: TaskError::new("bad_input", e, false),
                            });
                            return;
                        }
                        input
                    }
                    Err(e) => {
                        let _ = myself.cast(RunMsg::AttemptFailed {
                            token,
                            error: TaskError::new("input", e, false),
                        });
                        return;
                    }
                };
                let (skill, agent) = match &spec.action {
                    Action::Task(Target::Skill(skill)) => (skill.clone(), None),
                    Action::Task(Target::Agent(name)) => (String::new(), Some(name.clone())),
                    Action::Task(Target::Workflow { name, version }) => {
                        let child = format!("{name}@{version}");
                        return self.start_child(myself, i, token, input, child);
                    }
                    Action::Approval { .. } | Action::Signal { .. } => return,
                };
                // The secrets the input names, opened for this attempt only; the input
                // keeps their placeholders (docs/security.md).
                let names = mesh_proto::secrets::references(&input);
                let secrets = if names.is_empty() {
                    Secrets::new()
                } else {
                    match self
                        .deps
                        .secrets
                        .open(self.machine.namespace().as_str(), &names)
                    {
                        Ok(secrets) => secrets,
                        Err(why) => {
                            let _ = myself.cast(RunMsg::AttemptFailed {
                                token,
                                error: TaskError::new("secret", why, false),
                            });
                            return;
                        }
                    }
                };
                // The step's memory, to load before the task goes (docs/memory.md).
                let memory = match self.machine.memory_of(i, *index) {
                    Some(Ok(m)) if m.last > 0 => Some(m),
                    Some(Ok(_)) | None => None,
                    Some(Err(e)) => {
                        let _ = myself.cast(RunMsg::AttemptFailed {
                            token,
                            error: TaskError::new("input", e, false),
                        });
                        return;
                    }
                };
                debug!(%token, skill = %spec.skill(), "dispatching attempt");
                let traceparent = self.attempt_span(&token, spec.skill());
                let request = DispatcherMsg::Dispatch(DispatchRequest {
                    skill,
                    agent,
                    input,
                    idempotency_key: format!("{}/{}/{}", self.machine.run_id(), step, index),
                    timeout: spec.timeout,
                    // Only agents of the run's namespace; a step cannot name another.
                    labels: {
                        let mut labels = spec.labels.clone();
                        labels.insert(
                            NAMESPACE_LABEL.to_owned(),
                            self.machine.namespace().to_string(),
                        );
                        labels
                    },
                    token: token.clone(),
                    secrets: secrets.clone(),
                    traceparent,
                    run: myself.clone(),
                    ready_at: Instant::now(),
                });
                match memory {
                    None => self.deps.dispatcher.cast(request),
                    Some(memory) => self.dispatch_with_memory(myself, request, memory),
                }
                if !secrets.is_empty() {
                    self.secrets.insert(token, secrets);
                }
            }
            JournalEvent::StepWaiting {
                step,
                until_ms: Some(until),
                ..
            } => self.arm_wait(myself, step.clone(), *until),
            JournalEvent::StepParked { .. } => metrics::counter!(m::STEPS_PARKED).increment(1),
            JournalEvent::ToolApprovalDecided {
                step,
                index,
                attempt,
                call_id,
                approved,
                comment,
                by,
            } => {
                let key = (step.clone(), *index, *attempt, call_id.clone());
                if let Some((token, tx)) = self.tool_replies.remove(&key) {
                    let _ = tx.try_send(crate::node_link::Outbound::Frame(ToNode::ToolDecision {
                        token,
                        call_id: call_id.clone(),
                        decision: ToolDecision {
                            approved: *approved,
                            comment: comment.clone(),
                            by: by.clone(),
                        },
                    }));
                }
            }
            JournalEvent::RunFinished { state, .. } => {
                let span = std::mem::replace(&mut self.span, tracing::Span::none());
                span.record("state", state.as_str());
                self.attempt_spans.clear();
                self.streamed.clear();
                span.in_scope(|| info!(run_id = %self.machine.run_id(), %state, elapsed_ms = self.started.elapsed().as_millis() as u64, "run finished"));
                metrics::counter!(m::RUNS_FINISHED, "state" => state.as_str()).increment(1);
                self.deps.dispatcher.cast(DispatcherMsg::CancelRun {
                    run_id: self.machine.run_id().clone(),
                    reason: format!("run {state}"),
                });
            }
            _ => {}
        }
    }

    /// A sub-workflow task: its child run is submitted like any goal (idempotently: after a
    /// restart the same child is found again, not started twice) and watched until it ends.
    fn start_child(
        &mut self,
        myself: &ActorRef<RunMsg>,
        i: usize,
        token: FencingToken,
        input: Value,
        reference: String,
    ) {
        let task = &self.machine.steps()[i].tasks[token.index as usize];
        let key = format!(
            "sub:{}:{}:{}:{}.{}",
            self.machine.run_id(),
            token.step_id,
            token.index,
            task.resets,
            task.failures
        );
        let retryable = self.machine.spec(i).retry.is_some();
        let goal = GoalSpec {
            objective: format!(
                "{reference}, for {}/{}[{}]",
                self.machine.run_id(),
                token.step_id,
                token.index
            ),
            inputs: match input.get("with") {
                Some(Value::Object(with)) => Value::Object(with.clone()),
                _ => Value::Object(Default::default()),
            },
            steps: Vec::new(),
            workflow: None,
            workflow_ref: Some(reference.clone()),
            idempotency_key: Some(key),
            budget: None,
            // A child run belongs where its parent does.
            namespace: self.machine.namespace().clone(),
        };
        let (deps, parent) = (self.deps.clone(), myself.clone());
        debug!(%token, %reference, "starting a sub-workflow");
        let wait = tokio::spawn(async move {
            // At start-up, resumed runs may get here before the supervisor is published:
            // wait for it to be (a bounded wait, as every wait).
            let supervisor = tokio::time::timeout(SUPERVISOR_WAIT, deps.supervisor.wait())
                .await
                .ok()
                .map(Slot::get);
            let submitted = match &supervisor {
                Some(s) => crate::intake::submit(&deps, s, goal, Admission::OPEN).await,
                None => Err(Error::Unavailable("the swarm supervisor")),
            };
            let outcome = match submitted {
                Err(e) => Err(TaskError::new(
                    "sub_workflow",
                    format!("cannot start {reference}: {e}"),
                    false,
                )),
                Ok(child) => {
                    let _ = parent.cast(RunMsg::ChildStarted(child.run_id.clone()));
                    match wait_until_finished(&deps, &child.run_id).await {
                        Ok(view) if view.state == RunState::Succeeded => {
                            Ok(view.output.unwrap_or(Value::Null))
                        }
                        Ok(view) => Err(TaskError::new(
                            "sub_workflow_failed",
                            format!(
                                "{reference} (run {}) {}: {}",
                                child.run_id,
                                view.state,
                                view.error.unwrap_or_default()
                            ),
                            retryable,
                        )),
                        Err(e) => Err(TaskError::new("sub_workflow", e.to_string(), true)),
                    }
                }
            };
            let _ = parent.cast(RunMsg::ChildFinished { token, outcome });
        });
        self.child_waits.push(wait.abort_handle());
    }

    fn arm_wait(&self, myself: &ActorRef<RunMsg>, step: StepId, until_ms: i64) {
        let left = Duration::from_millis(until_ms.saturating_sub(now_ms()).max(0) as u64);
        myself.send_after(left, move || RunMsg::WaitExpired(step));
    }

    /// After a restart: waits and the deadline get timers for the time they have left.
    fn arm_timers(&self, myself: &ActorRef<RunMsg>) {
        for (i, s) in self.machine.steps().iter().enumerate() {
            if let Some(until) = s.until_ms
                && matches!(s.state, StepState::Waiting | StepState::AwaitingApproval)
            {
                self.arm_wait(myself, StepId(self.machine.spec(i).id.clone()), until);
            }
        }
        self.arm_deadline(myself);
    }

    fn arm_deadline(&self, myself: &ActorRef<RunMsg>) {
        if let Some(deadline) = self.machine.deadline() {
            let at = self.created_at_ms + deadline.as_millis() as i64;
            let left = Duration::from_millis(at.saturating_sub(now_ms()).max(0) as u64);
            myself.send_after(left, || RunMsg::DeadlinePassed);
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
        let parent = match &args.begin {
            Begin::New(new) => new.traceparent.clone(),
            Begin::Load | Begin::Stored(_) => None,
        };
        let Begun {
            machine,
            next_seq,
            created_at_ms,
            updated_at_ms,
            picked,
            first,
        } = begin(&args.deps, &args.run_id, args.begin).await?;
        let span = run_span(&machine, parent.as_deref());
        args.deps.directory.insert(
            machine.run_id().clone(),
            myself.clone(),
            machine.namespace().clone(),
        );
        metrics::gauge!(m::RUNS_ACTIVE).increment(1.0);
        myself.cast(RunMsg::Start)?;
        Ok(RunActorState {
            machine,
            next_seq,
            deps: args.deps,
            swarm: args.swarm,
            watchers: None,
            picked,
            children: Vec::new(),
            child_waits: Vec::new(),
            created_at_ms,
            updated_at_ms,
            started: Instant::now(),
            first,
            secrets: HashMap::new(),
            span,
            attempt_spans: HashMap::new(),
            streamed: HashMap::new(),
            skill_calls: HashMap::new(),
            tool_replies: HashMap::new(),
        })
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Self::Msg>,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let finished = st.machine.state().is_terminal().then(|| st.view());
        st.deps
            .directory
            .retire(st.machine.run_id(), &myself, finished);
        metrics::gauge!(m::RUNS_ACTIVE).decrement(1.0);
        for wait in st.child_waits.drain(..) {
            wait.abort();
        }
        // A run that failed or was cancelled takes its sub-workflows with it.
        if matches!(st.machine.state(), RunState::Failed | RunState::Cancelled) {
            for child in &st.children {
                if let Some(run) = st.deps.directory.get(child) {
                    let (reply, _) = ractor::concurrency::oneshot();
                    let _ = run.cast(RunMsg::Cancel {
                        reason: format!(
                            "its parent run {} {}",
                            st.machine.run_id(),
                            st.machine.state()
                        ),
                        reply: reply.into(),
                    });
                }
            }
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // The run's logs are written in its span, so they carry its fields and trace id; the
        // messages themselves are not (entering a span on each costs the exporting process
        // more than its logs gain).
        on_message(myself, msg, st).await
    }
}

/// A run actor's answer to one message.
async fn on_message(
    myself: ActorRef<RunMsg>,
    msg: RunMsg,
    st: &mut RunActorState,
) -> Result<(), ActorProcessingErr> {
    // The machine reads no clock: every message's decisions are made at this time.
    let now = now_ms();
    st.machine.at(now);
    match msg {
        RunMsg::Start => match st.first.take() {
            // A new run: its first decisions are journaled already.
            Some(events) => {
                st.arm_deadline(&myself);
                st.committed(&myself, &events);
            }
            None => {
                st.arm_timers(&myself);
                let events = st.machine.restart_running();
                st.commit(&myself, events).await?;
            }
        },
        RunMsg::Redispatch => {
            let events = st.machine.restart_running();
            st.commit(&myself, events).await?;
        }
        RunMsg::Assigned { token, agent } => {
            if st.machine.on_assigned(&token, &agent)
                && let Some(i) = st.machine.position(&token.step_id)
            {
                let skill = st.machine.spec(i).skill().to_owned();
                if st.picked.insert((skill.clone(), agent.clone())) {
                    let _ = st
                        .swarm
                        .cast(SwarmMsg::Member(SwarmMember { skill, agent }));
                }
                if st.watchers.is_some() {
                    st.publish(RunEvent::Step(st.machine.step_view(i)));
                }
            }
        }
        RunMsg::SkillCall { call, reply } => st.skill_call(&myself, call, reply).await?,
        RunMsg::ToolApproval { ask, reply } => st.tool_approval(&myself, ask, reply).await?,
        RunMsg::Result { result, ack } if st.skill_calls.contains_key(&result.token) => {
            let agent = None;
            st.skill_returned(
                &myself,
                &result.token,
                result.outcome.clone(),
                agent,
                result.elapsed_ms,
            )
            .await?;
            ack.send(AckCode::Accepted, String::new());
        }
        RunMsg::AttemptFailed { token, error } if st.skill_calls.contains_key(&token) => {
            st.skill_returned(&myself, &token, Err(error), None, 0)
                .await?;
        }
        RunMsg::AttemptLost { token, reason } if st.skill_calls.contains_key(&token) => {
            let error = TaskError::new(
                "lost",
                format!("the skill's agent was lost: {reason}"),
                true,
            );
            st.skill_returned(&myself, &token, Err(error), None, 0)
                .await?;
        }
        RunMsg::Result { mut result, ack } => {
            st.attempt_ended(
                &result.token,
                result.outcome.as_ref().err().map(|e| e.message.as_str()),
            );
            if let Some(secrets) = st.secrets.remove(&result.token) {
                match &mut result.outcome {
                    Ok(output) => mesh_proto::secrets::scrub(output, &secrets),
                    Err(e) => e.message = mesh_proto::secrets::scrub_text(&e.message, &secrets),
                }
            }
            let token = &result.token;
            let (code, message) = match st.machine.on_result(&result) {
                Some(decision) => {
                    apply_decision(st, &myself, decision).await?;
                    (AckCode::Accepted, String::new())
                }
                None => {
                    st.span.in_scope(|| warn!(%token, "result for an attempt that is no longer current rejected"));
                    metrics::counter!(m::STALE_RESULTS).increment(1);
                    (
                        AckCode::Stale,
                        "stale fencing token: the step moved on".to_owned(),
                    )
                }
            };
            ack.send(code, message);
        }
        RunMsg::AttemptFailed { token, error } => {
            st.attempt_ended(&token, Some(&error.message));
            st.secrets.remove(&token);
            if let Some(decision) = st.machine.on_failed(&token, error) {
                apply_decision(st, &myself, decision).await?;
            }
        }
        RunMsg::AttemptLost { token, reason } => {
            st.attempt_ended(&token, Some(&reason));
            st.secrets.remove(&token);
            if let Some(events) = st.machine.on_lost(&token, &reason) {
                st.commit(&myself, events).await?;
            }
        }
        RunMsg::Retry {
            step,
            index,
            attempt,
        } => {
            let events = st.machine.on_retry(&step, index, attempt);
            st.commit(&myself, events).await?;
        }
        RunMsg::WaitExpired(step) => {
            let events = st.machine.on_wait_expired(&step, now);
            st.commit(&myself, events).await?;
        }
        #[cfg(test)]
        RunMsg::Crash => panic!("run crashed on purpose (a test)"),
        RunMsg::DeadlinePassed => {
            let events = st.machine.on_deadline();
            st.commit(&myself, events).await?;
        }
        RunMsg::Cancel { reason, reply } => {
            let events = st.machine.finish(
                RunState::Cancelled,
                None,
                Some(format!("cancelled: {reason}")),
            );
            let _ = reply.send(st.commit_and_view(&myself, Ok(events)).await);
        }
        RunMsg::Decide {
            step,
            approved,
            comment,
            by,
            reply,
        } => {
            let decided = st.machine.on_decision(&step, approved, &comment, &by);
            if decided.is_ok() {
                st.span.in_scope(
                    || info!(run_id = %st.machine.run_id(), %step, approved, "approval decided"),
                );
            }
            let _ = reply.send(st.commit_and_view(&myself, decided).await);
        }
        RunMsg::Signal {
            name,
            payload,
            reply,
        } => {
            let decided = if st.machine.state().is_terminal() {
                Err(Error::FailedPrecondition(format!(
                    "run {} is {}",
                    st.machine.run_id(),
                    st.machine.state()
                )))
            } else {
                Ok(st.machine.on_signal(&name, payload))
            };
            let _ = reply.send(st.commit_and_view(&myself, decided).await);
        }
        RunMsg::Report(report) => {
            if st.is_current(report.token()) {
                let event = match report {
                    Report::Progress(p) => RunEvent::Progress {
                        step: p.token.step_id,
                        attempt: p.token.attempt,
                        message: p.message,
                        fraction: p.fraction,
                    },
                    // Sent to the run as `RunMsg::SkillCall` (`ToolApproval`) by the dispatcher.
                    Report::SkillCall(_) | Report::ToolApproval(_) => return Ok(()),
                    Report::ToolUsed(used) => return Ok(st.tool_used(&myself, used).await?),
                    Report::Delta(d) => {
                        let text = match st.secrets.get(&d.token) {
                            Some(secrets) => mesh_proto::secrets::scrub_text(&d.text, secrets),
                            None => d.text,
                        };
                        let kept = st.streamed.entry(d.token.clone()).or_default();
                        if d.restart {
                            kept.clear();
                        }
                        if kept.len() + text.len() <= MAX_STREAMED_BYTES {
                            kept.push_str(&text);
                        }
                        RunEvent::Delta {
                            text,
                            step: d.token.step_id,
                            index: d.token.index,
                            attempt: d.token.attempt,
                            restart: d.restart,
                        }
                    }
                };
                st.publish(event);
            }
        }
        RunMsg::RetryFrom { step, reply } => {
            let decided = st.machine.on_retry_from(&step);
            if decided.is_ok() {
                st.span.in_scope(
                    || info!(run_id = %st.machine.run_id(), %step, "retrying from a step"),
                );
            }
            let _ = reply.send(st.commit_and_view(&myself, decided).await);
        }
        RunMsg::Skip {
            step,
            comment,
            reply,
        } => {
            let decided = st.machine.on_skip(&step, &comment);
            let _ = reply.send(st.commit_and_view(&myself, decided).await);
        }
        RunMsg::RaiseBudget { raise, reply } => {
            let decided = st.machine.on_raise_budget(raise);
            if decided.is_ok() {
                st.span
                    .in_scope(|| info!(run_id = %st.machine.run_id(), "budget raised"));
            }
            let _ = reply.send(st.commit_and_view(&myself, decided).await);
        }
        RunMsg::ChildStarted(child) => {
            if !st.children.contains(&child) {
                st.children.push(child);
            }
        }
        RunMsg::ChildFinished { token, outcome } => {
            let result = TaskResult::new(token, outcome);
            if let Some(decision) = st.machine.on_result(&result) {
                apply_decision(st, &myself, decision).await?;
            }
        }
        RunMsg::View(reply) => {
            let _ = reply.send(st.view());
        }
        RunMsg::SwarmAgents(reply) => {
            let mut names: Vec<String> = st.picked.iter().map(|(_, a)| a.agent.clone()).collect();
            names.sort();
            names.dedup();
            let _ = reply.send(names);
        }
        RunMsg::Subscribe(reply) => {
            let view = st.view();
            let events = st
                .watchers
                .get_or_insert_with(|| broadcast::channel(WATCH_BUFFER).0)
                .subscribe();
            let streamed = (st.streamed.iter())
                .filter(|(token, text)| !text.is_empty() && st.is_current(token))
                .map(|(token, text)| RunEvent::Delta {
                    step: token.step_id.clone(),
                    index: token.index,
                    attempt: token.attempt,
                    text: text.clone(),
                    restart: true,
                })
                .collect();
            let _ = reply.send(Subscription {
                view,
                streamed,
                events,
            });
        }
    }
    if st.machine.state().is_terminal() {
        myself.stop(Some(st.machine.state().as_str().to_owned()));
    }
    Ok(())
}

/// Waits for a run to end: from its live actor's events, or from the store once it is not
/// live. A run that is being resumed is polled until it is live again.
pub async fn wait_until_finished(deps: &RunDeps, id: &RunId) -> Result<RunView> {
    let changes = deps.directory.changes();
    loop {
        // Interest in the next change is taken before looking, so none is missed.
        let changed = changes.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if let Some(run) = deps.directory.get(id)
            && let Ok(ractor::rpc::CallResult::Success(Subscription {
                view,
                events: mut rx,
                ..
            })) = run
                .call(RunMsg::Subscribe, Some(Duration::from_secs(5)))
                .await
        {
            if view.state.is_terminal() {
                return Ok(view);
            }
            loop {
                match rx.recv().await {
                    Ok(e) if matches!(*e, RunEvent::Finished { .. }) => break,
                    Err(broadcast::error::RecvError::Closed) => break,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                }
            }
        }
        let view = stored_view(deps, id).await?;
        if view.state.is_terminal() {
            return Ok(view);
        }
        // Unfinished and not live: it is being resumed; it comes live through the directory.
        changed.await;
    }
}

async fn apply_decision(
    st: &mut RunActorState,
    myself: &ActorRef<RunMsg>,
    decision: Decision,
) -> Result<()> {
    st.commit(myself, decision.events).await?;
    if let Some(r) = decision.retry_after {
        let delay = crate::machine::jittered(r.delay, r.jitter, fastrand::f64());
        debug!(step = %r.step, index = r.index, attempt = r.attempt, delay_ms = delay.as_millis() as u64, "retrying after backoff");
        let (step, index, attempt) = (r.step, r.index, r.attempt);
        myself.send_after(delay, move || RunMsg::Retry {
            step,
            index,
            attempt,
        });
    }
    Ok(())
}
