//! Picks an agent for every attempt and owns the attempts in flight: it sends tasks down
//! node streams, fences results by token, and hands attempts back to their run when their
//! node or agent is lost, when they time out, or when no agent can take them.
//! Child of `CoordinatorRoot`.
//!
//! Invariant: at most one attempt per step is in flight, the one whose token the run issued
//! last; any result with another token is stale.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use dashmap::DashMap;
use mesh_proto::domain::*;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde_json::Value;
use tokio::sync::mpsc::error::TrySendError;
use tracing::{debug, info, warn};

use crate::config::DispatchConfig;
use crate::metrics as m;
use crate::node_link::{NodeTx, Outbound, Report, ResultAck};
use crate::postbox::{Admit, Outgoing, Postbox, StoredMessage};
use crate::run::RunMsg;
use crate::store::Backend;
use mesh_workflow::JsonSchema;

/// In-flight attempts and circuit state per agent, written by the dispatcher alone and read
/// by views.
#[derive(Clone, Debug, Default)]
pub struct LoadBoard(Arc<DashMap<AgentKey, (u32, &'static str)>>);

impl LoadBoard {
    pub fn in_flight(&self, key: &AgentKey) -> u32 {
        self.0.get(key).map(|v| v.0).unwrap_or(0)
    }

    /// `closed`, `open` or `half_open`.
    pub fn circuit(&self, key: &AgentKey) -> &'static str {
        self.0.get(key).map(|v| v.1).unwrap_or("closed")
    }

    fn set(&self, key: &AgentKey, n: u32) {
        self.0.entry(key.clone()).or_insert((0, "closed")).0 = n;
    }

    fn set_circuit(&self, key: &AgentKey, circuit: &Circuit) {
        self.0.entry(key.clone()).or_insert((0, "closed")).1 = circuit.name();
    }

    fn forget(&self, key: &AgentKey) {
        self.0.remove(key);
    }

    /// A new slot: nothing in flight, circuit closed (whatever an earlier instance left).
    fn reset(&self, key: &AgentKey) {
        self.0.insert(key.clone(), (0, "closed"));
    }
}

/// Steps waiting for an agent, by what they wait for (`skill NAME` or `agent NAME`),
/// written by the dispatcher and read by `SubmitGoal`, which refuses a goal whose skill's
/// queue is full rather than growing it.
#[derive(Clone, Debug, Default)]
pub struct QueueBoard(Arc<DashMap<String, usize>>);

impl QueueBoard {
    /// Steps waiting for an agent with this skill.
    pub fn waiting_for_skill(&self, skill: &str) -> usize {
        self.0.get(&skill_key(skill)).map(|v| *v).unwrap_or(0)
    }

    fn publish(&self, counts: &HashMap<String, usize>) {
        self.0.retain(|k, _| counts.contains_key(k));
        for (k, &n) in counts {
            self.0.insert(k.clone(), n);
        }
    }
}

fn skill_key(skill: &str) -> String {
    format!("skill {skill}")
}

/// An agent's circuit breaker. After `circuit_failures` failed attempts in a row it opens and
/// the agent gets nothing; after the cool-down one probe attempt decides between closed and
/// open again. Failures the agent blames on its input (`bad_input`) do not count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Circuit {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

impl Circuit {
    pub fn name(&self) -> &'static str {
        match self {
            Circuit::Closed { .. } => "closed",
            Circuit::Open { .. } => "open",
            Circuit::HalfOpen { .. } => "half_open",
        }
    }

    /// Whether the agent may get an attempt now.
    fn admits(&self, now: Instant) -> bool {
        match *self {
            Circuit::Closed { .. } => true,
            Circuit::Open { until } => now >= until,
            Circuit::HalfOpen { probing } => !probing,
        }
    }

    /// The state after an attempt's outcome (`failed`: a failure that counts).
    pub fn after(self, failed: bool, threshold: u32, cool_down: Duration, now: Instant) -> Circuit {
        match (self, failed) {
            (Circuit::Open { .. }, _) => self,
            (_, false) => Circuit::Closed { failures: 0 },
            (Circuit::HalfOpen { .. }, true) => Circuit::Open {
                until: now + cool_down,
            },
            (Circuit::Closed { failures }, true) if threshold > 0 && failures + 1 >= threshold => {
                Circuit::Open {
                    until: now + cool_down,
                }
            }
            (Circuit::Closed { failures }, true) => Circuit::Closed {
                failures: failures + 1,
            },
        }
    }
}

/// Whether an attempt's outcome counts against its agent's circuit.
pub fn counts_against_agent(outcome: &TaskOutcome) -> bool {
    matches!(outcome, Err(e) if e.code != "bad_input")
}

/// A step attempt the run wants dispatched.
#[derive(Clone, Debug)]
pub struct DispatchRequest<R = ActorRef<RunMsg>> {
    pub token: FencingToken,
    pub skill: String,
    /// The agent of this name, whatever its skills (a step's `agent:`), instead of `skill`.
    pub agent: Option<String>,
    pub input: Value,
    pub idempotency_key: String,
    /// The step's own limit on an attempt; the configured `attempt_timeout` otherwise.
    pub timeout: Option<Duration>,
    /// Labels the agent must have (its card's, which include its node's).
    pub labels: BTreeMap<String, String>,
    /// The secrets the input names, for the task only (never logged: `Debug` hides them).
    pub secrets: mesh_proto::secrets::Secrets,
    /// W3C trace context of the step attempt's span (`None` with tracing off).
    pub traceparent: Option<String>,
    pub run: R,
    pub ready_at: Instant,
}

/// The span of sending an attempt to `agent`, child of the attempt's span `parent`: its
/// trace context travels in the task, so that the agent's span is its child.
fn dispatch_span(parent: &str, agent: &AgentKey, ready_at: Instant) -> String {
    let span = tracing::info_span!(
        "dispatch",
        agent = %agent,
        queued_ms = ready_at.elapsed().as_millis() as u64,
    );
    mesh_proto::trace_context::set_parent(&span, parent);
    mesh_proto::trace_context::traceparent_of(&span).unwrap_or_default()
}

impl<R> DispatchRequest<R> {
    /// Whether an agent with this card can take the request.
    pub fn wants(&self, card: &AgentCard) -> bool {
        let able = match &self.agent {
            Some(name) => card.name == *name,
            None => card.has_skill(&self.skill),
        };
        able && mesh_proto::domain::labels_match(&card.labels, &self.labels)
    }

    /// What the request asks of an agent (its queue and its labels): requests with the same
    /// signature can go to the same agents.
    pub fn signature(&self) -> String {
        if self.labels.is_empty() {
            return self.queue();
        }
        format!("{}\u{0}{:?}", self.queue(), self.labels)
    }

    /// What the request waits for, for messages.
    pub fn wanted(&self) -> String {
        let who = match &self.agent {
            Some(name) => format!("agent `{name}`"),
            None => format!("skill `{}`", self.skill),
        };
        if self.labels.is_empty() {
            return who;
        }
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!("{who} with labels {}", labels.join(", "))
    }

    /// The queue the request waits in.
    fn queue(&self) -> String {
        match &self.agent {
            Some(name) => format!("agent {name}"),
            None => skill_key(&self.skill),
        }
    }
}

pub enum DispatcherMsg {
    NodeUp {
        node: NodeId,
        instance: u64,
        agents: Vec<AgentCard>,
        tx: NodeTx,
    },
    NodeDown {
        node: NodeId,
        instance: u64,
    },
    /// Suspect and draining nodes get no new work; recovered ones do again.
    NodeDispatchable {
        node: NodeId,
        instance: u64,
        dispatchable: bool,
    },
    AgentDown {
        node: NodeId,
        instance: u64,
        agent: String,
    },
    /// Forget every node (after the registry restarted; nodes register again).
    ResetNodes,
    Dispatch(DispatchRequest),
    Result {
        node: NodeId,
        instance: u64,
        result: TaskResult,
        tx: NodeTx,
    },
    /// Progress or text an agent reported; passed to the run if the attempt is current.
    Report {
        node: NodeId,
        instance: u64,
        report: Report,
    },
    /// An agent sends a message (docs/messages.md); answered on `tx`.
    Message {
        node: NodeId,
        instance: u64,
        send: SendMessage,
        tx: NodeTx,
    },
    /// A message to a swarm, its recipients found by the run.
    Post {
        out: Outgoing,
        tx: NodeTx,
    },
    /// The store kept a message taken (`Ok`), or failed to: answer its sender.
    Kept {
        rows: Vec<StoredMessage>,
        message_id: String,
        tx: NodeTx,
        stored: Result<(), String>,
    },
    /// A node answered a delivery.
    MessageAck {
        node: NodeId,
        instance: u64,
        delivery: u64,
        outcome: Result<(), TaskError>,
    },
    /// Drop the run's pending attempts and cancel its in-flight ones.
    CancelRun {
        run_id: RunId,
        reason: String,
    },
    /// Sent to itself every 100 ms: unschedulable steps and attempt timeouts.
    Sweep,
    /// Panics, for the tests of the restart paths.
    #[cfg(test)]
    Crash,
}

/// A skill's input and output JSON Schemas, compiled when its agent registered.
#[derive(Clone, Debug, Default)]
pub struct SkillSchemas(HashMap<String, (Option<JsonSchema>, Option<JsonSchema>)>);

impl SkillSchemas {
    fn of(card: &AgentCard) -> Self {
        let compile = |skill: &str, which: &str, schema: &Option<Value>| {
            schema.as_ref().and_then(|s| match JsonSchema::compile(s) {
                Ok(v) => Some(v),
                Err(e) => {
                    warn!(agent = %card.name, skill, which, error = %e, "skill schema ignored: not a valid JSON Schema");
                    None
                }
            })
        };
        Self(
            card.skills
                .iter()
                .filter(|s| s.input_schema.is_some() || s.output_schema.is_some())
                .map(|s| {
                    let input = compile(&s.name, "input", &s.input_schema);
                    let output = compile(&s.name, "output", &s.output_schema);
                    (s.name.clone(), (input, output))
                })
                .collect(),
        )
    }

    /// Why `input` cannot go to this agent's `skill`, if it cannot.
    pub fn refuse_input(&self, skill: &str, input: &Value) -> Option<TaskError> {
        let (schema, _) = self.0.get(skill)?;
        let (path, why) = schema.as_ref()?.first_problem(input)?;
        Some(TaskError::new(
            "bad_input",
            format!("input{path} does not match the input schema of skill `{skill}`: {why}"),
            false,
        ))
    }

    /// Why `output` from this agent's `skill` is refused, if it is.
    pub fn refuse_output(&self, skill: &str, output: &Value) -> Option<TaskError> {
        let (_, schema) = self.0.get(skill)?;
        let (path, why) = schema.as_ref()?.first_problem(output)?;
        Some(TaskError::new(
            "bad_output",
            format!("output{path} does not match the output schema of skill `{skill}`: {why}"),
            false,
        ))
    }
}

#[derive(Debug)]
pub struct AgentSlot {
    pub key: AgentKey,
    pub instance: u64,
    pub card: AgentCard,
    pub schemas: Arc<SkillSchemas>,
    pub in_flight: u32,
    pub dispatchable: bool,
    pub circuit: Circuit,
    pub tx: NodeTx,
}

impl AgentSlot {
    fn free(&self, now: Instant) -> bool {
        self.dispatchable && self.in_flight < self.card.max_concurrency && self.circuit.admits(now)
    }
}

#[derive(Clone, Debug)]
pub struct InFlight<R> {
    pub token: FencingToken,
    pub agent: AgentKey,
    pub instance: u64,
    /// The skill asked for (empty for a step that names its agent), and the schemas of the
    /// agent it went to: its output is checked against them.
    pub skill: String,
    pub schemas: Arc<SkillSchemas>,
    pub run: R,
    pub sent_at: Instant,
    /// How long the attempt may take before it is cancelled and failed.
    pub timeout: Duration,
    pub tx: NodeTx,
}

/// An attempt in flight is known by its run, step and task (a `foreach` step runs many
/// tasks at once); a newer attempt of the same task replaces the older one.
pub type TaskKey = (RunId, StepId, u32);

fn task_key(token: &FencingToken) -> TaskKey {
    (token.run_id.clone(), token.step_id.clone(), token.index)
}

/// Why a result was not accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stale {
    /// No attempt of that step is in flight.
    NotInFlight,
    /// Another attempt of the step is current.
    Superseded { current: FencingToken },
    /// The result came from a node that was not given the attempt.
    WrongNode,
}

impl std::fmt::Display for Stale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stale::NotInFlight => f.write_str("no attempt of this step is in flight"),
            Stale::Superseded { current } => write!(f, "superseded by attempt {current}"),
            Stale::WrongNode => f.write_str("the attempt was not given to this node"),
        }
    }
}

/// The dispatcher's decisions, free of any actor runtime. `R` is how to reach the run.
#[derive(Debug)]
pub struct DispatchState<R> {
    /// The agents; change it through `node_up` and `remove_agents` only, which keep the two
    /// indexes below in step.
    pub agents: Vec<AgentSlot>,
    /// The agents a request could go to, by its [`DispatchRequest::signature`]: found once
    /// per set of agents, not at every dispatch (a thousand nodes have ten thousand agents).
    /// At most [`MAX_SIGNATURES`] of them: past it the cache starts again.
    candidates: HashMap<String, Arc<[usize]>>,
    /// Where each agent is in `agents` (one instance of an agent at a time: `node_up` drops a
    /// node's earlier agents).
    slots: HashMap<AgentKey, usize>,
    pub in_flight: HashMap<TaskKey, InFlight<R>>,
    pub pending: VecDeque<DispatchRequest<R>>,
    rr: usize,
    load: LoadBoard,
    /// Requests waiting, by queue (`skill NAME`, `agent NAME`), mirrored on `queues`.
    waiting: HashMap<String, usize>,
    queues: QueueBoard,
    /// Most requests waiting for one skill (or one named agent).
    pub max_pending_per_skill: usize,
}

/// Most request signatures whose candidates the dispatcher keeps (labels come from goals, so
/// their variety is the clients').
const MAX_SIGNATURES: usize = 4_096;

/// What happened to a dispatch attempt.
pub enum Sent<R> {
    Sent(AgentKey),
    /// No agent is free now: queued.
    Queued,
    /// The queue is full: the request is handed back.
    Refused(DispatchRequest<R>),
    /// The queue of its skill is full: the request is handed back.
    RefusedForSkill(DispatchRequest<R>),
    /// The input does not match the skill's input schema: the attempt fails, not retried.
    Invalid(DispatchRequest<R>, TaskError),
}

/// What `drain_pending` sent (run, token, agent) and refused for its input (run, token, why).
pub type Drained<R> = (
    Vec<(R, FencingToken, AgentKey)>,
    Vec<(R, FencingToken, TaskError)>,
);

/// Why `try_send` did not send.
enum Unsent<R> {
    /// No agent is free (or its stream is full): the request is handed back.
    NoAgent(DispatchRequest<R>),
    /// The picked agent's skill refuses the input.
    Invalid(DispatchRequest<R>, TaskError),
}

impl<R: Clone> DispatchState<R> {
    pub fn new(load: LoadBoard) -> Self {
        Self::with_queues(load, QueueBoard::default())
    }

    pub fn with_queues(load: LoadBoard, queues: QueueBoard) -> Self {
        // A new dispatcher has nothing queued, whatever an earlier one published.
        queues.0.clear();
        Self {
            agents: Vec::new(),
            candidates: HashMap::new(),
            slots: HashMap::new(),
            in_flight: HashMap::new(),
            pending: VecDeque::new(),
            rr: 0,
            load,
            waiting: HashMap::new(),
            queues,
            max_pending_per_skill: usize::MAX,
        }
    }

    /// Counts the waiting requests by queue again, after the queue was rebuilt.
    fn recount(&mut self) {
        self.waiting.clear();
        for req in &self.pending {
            *self.waiting.entry(req.queue()).or_default() += 1;
        }
        self.queues.publish(&self.waiting);
    }

    /// Least loaded free agent of those `wants` takes (`signature` names that set); round
    /// robin among equals: the scan starts one further each time, and an idle agent ends it.
    pub fn pick(
        &mut self,
        signature: &str,
        wants: impl Fn(&AgentCard) -> bool,
        now: Instant,
    ) -> Option<usize> {
        let candidates = match self.candidates.get(signature) {
            Some(c) => c.clone(),
            None => {
                let found: Arc<[usize]> = (0..self.agents.len())
                    .filter(|&i| wants(&self.agents[i].card))
                    .collect();
                if self.candidates.len() >= MAX_SIGNATURES {
                    self.candidates.clear();
                }
                self.candidates.insert(signature.to_owned(), found.clone());
                found
            }
        };
        if candidates.is_empty() {
            return None;
        }
        self.rr = self.rr.wrapping_add(1);
        let start = self.rr % candidates.len();
        let mut best: Option<(u32, usize)> = None;
        for &i in candidates[start..].iter().chain(&candidates[..start]) {
            let a = &self.agents[i];
            if !a.free(now) {
                continue;
            }
            if a.in_flight == 0 {
                return Some(i);
            }
            if best.is_none_or(|(load, _)| a.in_flight < load) {
                best = Some((a.in_flight, i));
            }
        }
        best.map(|(_, i)| i)
    }

    /// The agents changed: the indexes are made again (candidates lazily, at the next pick).
    fn reindex(&mut self) {
        self.candidates.clear();
        self.slots = self
            .agents
            .iter()
            .enumerate()
            .map(|(i, a)| (a.key.clone(), i))
            .collect();
    }

    /// Moves the agent's circuit after an attempt's outcome; returns the new state when it
    /// changed between closed, open and half-open.
    pub fn record_outcome(
        &mut self,
        agent: &AgentKey,
        instance: u64,
        failed: bool,
        threshold: u32,
        cool_down: Duration,
        now: Instant,
    ) -> Option<Circuit> {
        let slot = self
            .agents
            .iter_mut()
            .find(|a| &a.key == agent && a.instance == instance)?;
        let before = slot.circuit;
        slot.circuit = before.after(failed, threshold, cool_down, now);
        self.load.set_circuit(agent, &slot.circuit);
        (before.name() != slot.circuit.name()).then_some(slot.circuit)
    }

    /// Agents whose circuit is not closed.
    pub fn open_circuits(&self) -> usize {
        self.agents
            .iter()
            .filter(|a| !matches!(a.circuit, Circuit::Closed { .. }))
            .count()
    }

    /// Whether any registered agent has the skill, free or not.
    pub fn skill_known(&self, skill: &str) -> bool {
        self.agents.iter().any(|a| a.card.has_skill(skill))
    }

    fn set_load(&mut self, i: usize, delta: i32) {
        let a = &mut self.agents[i];
        a.in_flight = a.in_flight.saturating_add_signed(delta);
        self.load.set(&a.key, a.in_flight);
    }

    fn release(&mut self, agent: &AgentKey, instance: u64) {
        if let Some(&i) = self.slots.get(agent)
            && self.agents[i].instance == instance
        {
            self.set_load(i, -1);
        }
    }

    /// Sends the request to a free agent, or queues it (up to `max_pending`).
    pub fn dispatch(
        &mut self,
        req: DispatchRequest<R>,
        deadline_ms: u64,
        max_pending: usize,
        now: Instant,
    ) -> Sent<R> {
        match self.try_send(req, deadline_ms, now) {
            Ok(agent) => Sent::Sent(agent),
            Err(Unsent::Invalid(req, error)) => Sent::Invalid(req, error),
            Err(Unsent::NoAgent(req)) if self.pending.len() >= max_pending => Sent::Refused(req),
            Err(Unsent::NoAgent(req)) => {
                let queue = req.queue();
                let waiting = self.waiting.get(&queue).copied().unwrap_or(0);
                if waiting >= self.max_pending_per_skill {
                    return Sent::RefusedForSkill(req);
                }
                self.waiting.insert(queue.clone(), waiting + 1);
                self.queues.0.insert(queue, waiting + 1);
                self.pending.push_back(req);
                Sent::Queued
            }
        }
    }

    // The request goes back to the caller unboxed: this is the hot path and boxing would
    // allocate on every miss.
    #[allow(clippy::result_large_err)]
    fn try_send(
        &mut self,
        req: DispatchRequest<R>,
        deadline_ms: u64,
        now: Instant,
    ) -> Result<AgentKey, Unsent<R>> {
        // A newer attempt of the same task replaces the old one.
        let step_key = task_key(&req.token);
        if let Some(old) = self.in_flight.remove(&step_key) {
            self.release(&old.agent, old.instance);
        }
        let Some(i) = self.pick(&req.signature(), |card| req.wants(card), now) else {
            return Err(Unsent::NoAgent(req));
        };
        let slot = &self.agents[i];
        if let Some(error) = slot.schemas.refuse_input(&req.skill, &req.input) {
            return Err(Unsent::Invalid(req, error));
        }
        let task = Task {
            token: req.token.clone(),
            agent: slot.card.name.clone(),
            skill: req.skill.clone(),
            input: req.input.clone(),
            deadline_ms: req.timeout.map_or(deadline_ms, |t| t.as_millis() as u64),
            idempotency_key: req.idempotency_key.clone(),
            secrets: req.secrets.clone(),
            traceparent: req
                .traceparent
                .as_deref()
                .map(|parent| dispatch_span(parent, &slot.key, req.ready_at))
                .unwrap_or_default(),
        };
        match slot.tx.try_send(Outbound::Frame(ToNode::Task(task))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Closed(_)) => {
                debug!(agent = %slot.key, "node stream full or closed; step stays queued");
                return Err(Unsent::NoAgent(req));
            }
        }
        let agent = slot.key.clone();
        let inflight = InFlight {
            token: req.token,
            agent: agent.clone(),
            instance: slot.instance,
            skill: req.skill,
            schemas: Arc::clone(&slot.schemas),
            run: req.run,
            sent_at: now,
            timeout: req.timeout.unwrap_or(Duration::from_millis(deadline_ms)),
            tx: slot.tx.clone(),
        };
        self.in_flight.insert(step_key, inflight);
        self.set_load(i, 1);
        if !matches!(self.agents[i].circuit, Circuit::Closed { .. }) {
            // The cool-down is over: this attempt is the probe.
            self.agents[i].circuit = Circuit::HalfOpen { probing: true };
            self.load.set_circuit(&agent, &self.agents[i].circuit);
        }
        metrics::histogram!(m::DISPATCH_LATENCY)
            .record(now.saturating_duration_since(req.ready_at).as_secs_f64());
        Ok(agent)
    }

    /// Dispatches queued requests while agents are free; returns what was sent, and the
    /// attempts refused for their input.
    pub fn drain_pending(&mut self, deadline_ms: u64, now: Instant) -> Drained<R> {
        let mut sent = Vec::new();
        let mut refused = Vec::new();
        let mut keep = VecDeque::with_capacity(self.pending.len());
        while let Some(req) = self.pending.pop_front() {
            if !self.agents.iter().any(|a| a.free(now)) {
                keep.push_back(req);
                keep.extend(self.pending.drain(..));
                break;
            }
            let (run, token) = (req.run.clone(), req.token.clone());
            match self.try_send(req, deadline_ms, now) {
                Ok(agent) => sent.push((run, token, agent)),
                Err(Unsent::NoAgent(req)) => keep.push_back(req),
                Err(Unsent::Invalid(_, error)) => refused.push((run, token, error)),
            }
        }
        self.pending = keep;
        if !sent.is_empty() || !refused.is_empty() {
            self.recount();
        }
        (sent, refused)
    }

    /// Checks a result's token; on success the attempt leaves the in-flight set.
    pub fn accept(
        &mut self,
        node: &NodeId,
        instance: u64,
        token: &FencingToken,
    ) -> Result<InFlight<R>, Stale> {
        let key = task_key(token);
        let current = self.in_flight.get(&key).ok_or(Stale::NotInFlight)?;
        if &current.token != token {
            return Err(Stale::Superseded {
                current: current.token.clone(),
            });
        }
        if &current.agent.node != node || current.instance != instance {
            return Err(Stale::WrongNode);
        }
        let inflight = self.in_flight.remove(&key).expect("checked above");
        self.release(&inflight.agent, inflight.instance);
        Ok(inflight)
    }

    pub fn node_up(&mut self, node: &NodeId, instance: u64, agents: Vec<AgentCard>, tx: NodeTx) {
        self.agents.retain(|a| &a.key.node != node);
        for card in agents {
            let key = AgentKey {
                node: node.clone(),
                agent: card.name.clone(),
            };
            self.load.reset(&key);
            self.agents.push(AgentSlot {
                key,
                instance,
                schemas: Arc::new(SkillSchemas::of(&card)),
                card,
                in_flight: 0,
                dispatchable: true,
                circuit: Circuit::Closed { failures: 0 },
                tx: tx.clone(),
            });
        }
        self.reindex();
    }

    /// Removes the agents matching `lost`; returns their in-flight attempts.
    fn remove_agents(&mut self, lost: impl Fn(&AgentSlot) -> bool) -> Vec<InFlight<R>> {
        let gone: Vec<(AgentKey, u64)> = self
            .agents
            .iter()
            .filter(|a| lost(a))
            .map(|a| (a.key.clone(), a.instance))
            .collect();
        self.agents.retain(|a| !lost(a));
        self.reindex();
        for (key, _) in &gone {
            self.load.forget(key);
        }
        let keys: Vec<_> = self
            .in_flight
            .iter()
            .filter(|(_, f)| gone.iter().any(|(k, i)| k == &f.agent && *i == f.instance))
            .map(|(k, _)| k.clone())
            .collect();
        keys.into_iter()
            .filter_map(|k| self.in_flight.remove(&k))
            .collect()
    }

    pub fn node_down(&mut self, node: &NodeId, instance: u64) -> Vec<InFlight<R>> {
        self.remove_agents(|a| &a.key.node == node && a.instance == instance)
    }

    pub fn agent_down(&mut self, node: &NodeId, instance: u64, agent: &str) -> Vec<InFlight<R>> {
        self.remove_agents(|a| {
            &a.key.node == node && a.instance == instance && a.key.agent == agent
        })
    }

    pub fn reset_nodes(&mut self) -> Vec<InFlight<R>> {
        self.remove_agents(|_| true)
    }

    pub fn set_dispatchable(&mut self, node: &NodeId, instance: u64, dispatchable: bool) {
        for a in self
            .agents
            .iter_mut()
            .filter(|a| &a.key.node == node && a.instance == instance)
        {
            a.dispatchable = dispatchable;
        }
    }

    /// Removes the run's queued and in-flight attempts; returns the in-flight ones.
    pub fn cancel_run(&mut self, run_id: &RunId) -> Vec<InFlight<R>> {
        let before = self.pending.len();
        self.pending.retain(|p| &p.token.run_id != run_id);
        if self.pending.len() != before {
            self.recount();
        }
        let keys: Vec<_> = self
            .in_flight
            .keys()
            .filter(|(r, _, _)| r == run_id)
            .cloned()
            .collect();
        let removed: Vec<_> = keys
            .into_iter()
            .filter_map(|k| self.in_flight.remove(&k))
            .collect();
        for f in &removed {
            self.release(&f.agent, f.instance);
        }
        removed
    }

    /// Queued requests whose skill no agent has had for `unschedulable`, and in-flight
    /// attempts older than their timeout; both leave the dispatcher.
    pub fn sweep(
        &mut self,
        now: Instant,
        unschedulable: Duration,
    ) -> (Vec<DispatchRequest<R>>, Vec<InFlight<R>>) {
        let mut expired = Vec::new();
        let mut keep = VecDeque::with_capacity(self.pending.len());
        for req in self.pending.drain(..) {
            if now.saturating_duration_since(req.ready_at) >= unschedulable
                && !self.agents.iter().any(|a| req.wants(&a.card))
            {
                expired.push(req);
            } else {
                keep.push_back(req);
            }
        }
        self.pending = keep;
        if !expired.is_empty() {
            self.recount();
        }
        let late: Vec<_> = self
            .in_flight
            .iter()
            .filter(|(_, f)| now.saturating_duration_since(f.sent_at) >= f.timeout)
            .map(|(k, _)| k.clone())
            .collect();
        let timed_out: Vec<_> = late
            .into_iter()
            .filter_map(|k| self.in_flight.remove(&k))
            .collect();
        for f in &timed_out {
            self.release(&f.agent, f.instance);
        }
        (expired, timed_out)
    }

    fn publish_gauges(&self) {
        metrics::gauge!(m::OPEN_CIRCUITS).set(self.open_circuits() as f64);
        metrics::gauge!(m::DISPATCH_PENDING).set(self.pending.len() as f64);
        metrics::gauge!(m::DISPATCH_IN_FLIGHT).set(self.in_flight.len() as f64);
    }
}

pub struct Dispatcher;

pub struct DispatcherArgs {
    pub config: DispatchConfig,
    pub load: LoadBoard,
    pub queues: QueueBoard,
    /// Where messages between agents are kept until acknowledged.
    pub store: crate::store::Store,
}

pub struct DispatcherActorState {
    core: DispatchState<ActorRef<RunMsg>>,
    config: DispatchConfig,
    /// Messages between agents, which travel on the same streams.
    postbox: Postbox,
    store: crate::store::Store,
}

impl DispatcherActorState {
    /// Moves the circuit of the attempt's agent after its outcome.
    fn circuit(&mut self, attempt: &InFlight<ActorRef<RunMsg>>, failed: bool, now: Instant) {
        let (threshold, cool_down) = (self.config.circuit_failures, self.config.circuit_cool_down);
        if let Some(state) = self.core.record_outcome(
            &attempt.agent,
            attempt.instance,
            failed,
            threshold,
            cool_down,
            now,
        ) {
            warn!(agent = %attempt.agent, circuit = state.name(), "agent circuit changed");
            // At once, not at the next tick: the gauge says what the registry says.
            self.core.publish_gauges();
        }
    }

    fn deadline_ms(&self) -> u64 {
        self.config.attempt_timeout.as_millis() as u64
    }

    fn hand_back(&self, lost: Vec<InFlight<ActorRef<RunMsg>>>, reason: &str) {
        for f in lost {
            info!(token = %f.token, agent = %f.agent, reason, "attempt lost; handing back to its run");
            metrics::counter!(m::ATTEMPTS_REDISPATCHED).increment(1);
            let _ = f.run.cast(RunMsg::AttemptLost {
                token: f.token,
                reason: reason.to_owned(),
            });
        }
    }

    /// Sends what the postbox can deliver now (a frame that does not fit the node's queue
    /// stays in flight and goes out again after its timeout), and has the store forget what
    /// was acknowledged or dropped (a delete lost only means a delivery again after a restart).
    fn deliver(&mut self, now: Instant) {
        for (tx, frame) in self.postbox.pump(now) {
            metrics::counter!(m::MESSAGES, "outcome" => "delivered").increment(1);
            let _ = tx.try_send(Outbound::Frame(frame));
        }
        let dropped = std::mem::take(&mut self.postbox.dropped);
        if dropped > 0 {
            metrics::counter!(m::MESSAGES_DROPPED).increment(dropped);
        }
        let forgotten = self.postbox.forgotten();
        if !forgotten.is_empty() {
            let store = self.store.clone();
            tokio::spawn(async move {
                for key in forgotten {
                    if let Err(e) = store.delete_message(key).await {
                        warn!(error = %e, "a delivered message could not be forgotten");
                    }
                }
            });
        }
    }

    /// Takes a message for its recipients: kept by the store first, then answered (in
    /// `Kept`); a refusal or a message seen before is answered at once.
    fn post(&mut self, out: Outgoing, tx: &NodeTx, myself: &ActorRef<DispatcherMsg>) {
        let message_id = out.message_id.clone();
        let answer = |outcome: Result<u32, TaskError>| {
            let _ = tx.try_send(Outbound::Frame(ToNode::MessageSent {
                message_id: message_id.clone(),
                outcome,
            }));
        };
        match self.postbox.admit(&out, crate::store::now_ms()) {
            Admit::Seen(n) => answer(Ok(n)),
            Admit::Refused(e) => {
                metrics::counter!(m::MESSAGES, "outcome" => "refused").increment(1);
                answer(Err(e));
            }
            Admit::Store(rows) if rows.is_empty() => answer(Ok(0)),
            Admit::Store(rows) => {
                let (store, myself, tx) = (self.store.clone(), myself.clone(), tx.clone());
                tokio::spawn(async move {
                    let stored = store
                        .put_messages(rows.clone())
                        .await
                        .map_err(|e| e.to_string());
                    let _ = myself.cast(DispatcherMsg::Kept {
                        rows,
                        message_id: out.message_id,
                        tx,
                        stored,
                    });
                });
            }
        }
    }

    fn pump(&mut self) {
        if self.core.pending.is_empty() {
            return;
        }
        let deadline = self.deadline_ms();
        let (sent, refused) = self.core.drain_pending(deadline, Instant::now());
        for (run, token, agent) in sent {
            let _ = run.cast(RunMsg::Assigned { token, agent });
        }
        for (run, token, error) in refused {
            let _ = run.cast(RunMsg::AttemptFailed { token, error });
        }
    }
}

impl Actor for Dispatcher {
    type Msg = DispatcherMsg;
    type State = DispatcherActorState;
    type Arguments = DispatcherArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: DispatcherArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        myself.send_interval(Duration::from_millis(100), || DispatcherMsg::Sweep);
        Ok(DispatcherActorState {
            core: {
                let mut core = DispatchState::with_queues(args.load, args.queues);
                core.max_pending_per_skill = args.config.max_pending_per_skill;
                core
            },
            config: args.config,
            postbox: {
                // Messages kept by the store before a restart go back in their mailboxes.
                let mut postbox = Postbox::default();
                postbox.restore(args.store.messages().await?);
                postbox
            },
            store: args.store,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let now = Instant::now();
        match msg {
            DispatcherMsg::NodeUp {
                node,
                instance,
                agents,
                tx,
            } => {
                st.postbox.node_up(&node, instance, &agents, tx.clone());
                st.core.node_up(&node, instance, agents, tx);
                st.pump();
                st.deliver(now);
            }
            DispatcherMsg::NodeDown { node, instance } => {
                let lost = st.core.node_down(&node, instance);
                st.hand_back(lost, "node lost");
                st.postbox.node_down(&node, instance);
                st.deliver(now);
            }
            DispatcherMsg::NodeDispatchable {
                node,
                instance,
                dispatchable,
            } => {
                st.core.set_dispatchable(&node, instance, dispatchable);
                if dispatchable {
                    st.pump();
                }
            }
            DispatcherMsg::AgentDown {
                node,
                instance,
                agent,
            } => {
                let lost = st.core.agent_down(&node, instance, &agent);
                st.hand_back(lost, "agent down");
                st.postbox.agent_down(&node, instance, &agent);
                st.deliver(now);
            }
            #[cfg(test)]
            DispatcherMsg::Crash => panic!("dispatcher crashed on purpose (a test)"),
            DispatcherMsg::ResetNodes => {
                let lost = st.core.reset_nodes();
                st.hand_back(lost, "registry restarted");
                st.postbox.reset_nodes();
            }
            DispatcherMsg::Message {
                node,
                instance,
                send,
                tx,
            } => {
                let refuse = |error: TaskError| {
                    metrics::counter!(m::MESSAGES, "outcome" => "refused").increment(1);
                    let _ = tx.try_send(Outbound::Frame(ToNode::MessageSent {
                        message_id: send.message_id.clone(),
                        outcome: Err(error),
                    }));
                };
                let namespace = match st.postbox.sender_namespace(
                    &node,
                    instance,
                    &send.from_agent,
                    &send.namespace,
                ) {
                    Ok(ns) => ns,
                    Err(e) => {
                        refuse(e);
                        return Ok(());
                    }
                };
                let out = |topic: String, recipients: Vec<String>| Outgoing {
                    namespace: namespace.clone(),
                    message_id: send.message_id.clone(),
                    from: send.from_agent.clone(),
                    topic,
                    priority: send.priority,
                    payload: send.payload.clone(),
                    recipients,
                };
                match &send.to {
                    Recipient::Agent(agent) => {
                        match st.postbox.recipients_of_agent(&namespace, agent) {
                            Ok(r) => st.post(out(String::new(), r), &tx, &myself),
                            Err(e) => refuse(e),
                        }
                    }
                    Recipient::Topic(topic) => {
                        let r = st.postbox.subscribers(&namespace, topic);
                        st.post(out(topic.clone(), r), &tx, &myself);
                    }
                    Recipient::SwarmOf(token) => match st.core.in_flight.get(&task_key(token)) {
                        Some(f)
                            if f.token == *token
                                && f.agent.node == node
                                && f.instance == instance =>
                        {
                            // The run knows its swarm; the answer comes back as `Post`.
                            let (run, myself) = (f.run.clone(), myself.clone());
                            let topic = format!("swarm:{}", token.run_id);
                            let mut out = out(topic, Vec::new());
                            tokio::spawn(async move {
                                let asked = run
                                    .call(RunMsg::SwarmAgents, Some(Duration::from_secs(5)))
                                    .await;
                                if let Ok(ractor::rpc::CallResult::Success(names)) = asked {
                                    out.recipients =
                                        names.into_iter().filter(|n| *n != out.from).collect();
                                    let _ = myself.cast(DispatcherMsg::Post { out, tx });
                                } else {
                                    let _ = tx.try_send(Outbound::Frame(ToNode::MessageSent {
                                        message_id: out.message_id,
                                        outcome: Err(TaskError::new(
                                            "unavailable",
                                            "the run did not say who its swarm is; send again",
                                            true,
                                        )),
                                    }));
                                }
                            });
                        }
                        _ => refuse(TaskError::new(
                            "bad_message",
                            "send_message.swarm_of: not an attempt in flight on this node",
                            false,
                        )),
                    },
                }
            }
            DispatcherMsg::Post { mut out, tx } => {
                // Only the swarm's agents that take messages: a mailbox for one that does
                // not would fill and never empty.
                out.recipients = st.postbox.taking_messages(&out.namespace, out.recipients);
                st.post(out, &tx, &myself)
            }
            DispatcherMsg::Kept {
                rows,
                message_id,
                tx,
                stored,
            } => {
                let outcome = match stored {
                    Ok(()) => {
                        metrics::counter!(m::MESSAGES, "outcome" => "taken").increment(1);
                        let n = rows.len() as u32;
                        st.postbox.commit(rows);
                        st.deliver(now);
                        Ok(n)
                    }
                    Err(why) => {
                        warn!(%why, "a message could not be kept; its sender is told");
                        st.postbox.abort(&rows);
                        Err(TaskError::new(
                            "unavailable",
                            "the coordinator could not keep the message; send it again",
                            true,
                        ))
                    }
                };
                let _ = tx.try_send(Outbound::Frame(ToNode::MessageSent {
                    message_id,
                    outcome,
                }));
            }
            DispatcherMsg::MessageAck {
                node,
                instance,
                delivery,
                outcome,
            } => {
                st.postbox.ack(&node, instance, delivery, outcome, now);
                st.deliver(now);
            }
            DispatcherMsg::Dispatch(req) => {
                let deadline = st.deadline_ms();
                let (run, token) = (req.run.clone(), req.token.clone());
                match st.core.dispatch(req, deadline, st.config.max_pending, now) {
                    Sent::Sent(agent) => {
                        let _ = run.cast(RunMsg::Assigned { token, agent });
                    }
                    Sent::Queued => debug!(%token, "no free agent; step queued"),
                    Sent::Invalid(req, error) => {
                        debug!(token = %req.token, %error, "input refused by the skill's schema");
                        let _ = run.cast(RunMsg::AttemptFailed { token, error });
                    }
                    Sent::RefusedForSkill(req) => {
                        warn!(token = %req.token, wanted = %req.wanted(), "queue of the skill full");
                        let _ = run.cast(RunMsg::AttemptFailed {
                            token,
                            error: TaskError::new(
                                "queue_full",
                                format!(
                                    "{} steps already wait for {} (max_pending_per_skill)",
                                    st.config.max_pending_per_skill,
                                    req.wanted()
                                ),
                                true,
                            ),
                        });
                    }
                    Sent::Refused(req) => {
                        warn!(token = %req.token, "dispatch queue full");
                        let _ = run.cast(RunMsg::AttemptFailed {
                            token,
                            error: TaskError::new(
                                "queue_full",
                                format!(
                                    "{} steps already wait for an agent (max_pending)",
                                    st.config.max_pending
                                ),
                                true,
                            ),
                        });
                    }
                }
            }
            DispatcherMsg::Result {
                node,
                instance,
                result,
                tx,
            } => {
                let token = result.token.clone();
                match st.core.accept(&node, instance, &token) {
                    Ok(inflight) => {
                        let mut result = result;
                        if let Ok(output) = &result.outcome
                            && let Some(error) =
                                inflight.schemas.refuse_output(&inflight.skill, output)
                        {
                            result.outcome = Err(error);
                        }
                        let outcome = if result.outcome.is_ok() {
                            "ok"
                        } else {
                            "error"
                        };
                        metrics::counter!(m::STEP_OUTCOMES, "outcome" => outcome).increment(1);
                        metrics::histogram!(m::STEP_DURATION).record(
                            now.saturating_duration_since(inflight.sent_at)
                                .as_secs_f64(),
                        );
                        st.circuit(&inflight, counts_against_agent(&result.outcome), now);
                        // The run acknowledges once the result is journaled.
                        let ack = ResultAck::new(tx, result.token.clone());
                        let _ = inflight.run.cast(RunMsg::Result { result, ack });
                        st.pump();
                    }
                    Err(stale) => {
                        warn!(%token, %node, instance, reason = %stale, "stale result rejected");
                        metrics::counter!(m::STALE_RESULTS).increment(1);
                        let _ = tx.try_send(Outbound::Frame(ToNode::ResultAck {
                            token,
                            code: AckCode::Stale,
                            message: format!("stale fencing token: {stale}"),
                        }));
                    }
                }
            }
            DispatcherMsg::Report {
                node,
                instance,
                report,
            } => match st.core.in_flight.get(&task_key(report.token())) {
                Some(f)
                    if f.token == *report.token()
                        && f.agent.node == node
                        && f.instance == instance =>
                {
                    let _ = f.run.cast(match report {
                        // The run answers on the caller's stream.
                        Report::SkillCall(call) => RunMsg::SkillCall {
                            call,
                            reply: f.tx.clone(),
                        },
                        Report::ToolApproval(ask) => RunMsg::ToolApproval {
                            ask,
                            reply: f.tx.clone(),
                        },
                        other => RunMsg::Report(other),
                    });
                }
                _ => {
                    debug!(token = %report.token(), "report for an attempt that is not current dropped")
                }
            },
            DispatcherMsg::CancelRun { run_id, reason } => {
                for f in st.core.cancel_run(&run_id) {
                    let _ = f.tx.try_send(Outbound::Frame(ToNode::Cancel {
                        token: f.token,
                        reason: reason.clone(),
                    }));
                }
                st.pump();
            }
            DispatcherMsg::Sweep => {
                st.postbox.sweep(now);
                st.deliver(now);
                let (unschedulable, timed_out) =
                    st.core.sweep(now, st.config.unschedulable_timeout);
                for req in unschedulable {
                    let wanted = req.wanted();
                    warn!(token = %req.token, %wanted, "no agent can take the step; unschedulable");
                    let _ = req.run.cast(RunMsg::AttemptFailed {
                        token: req.token,
                        error: TaskError::new(
                            "unschedulable",
                            format!(
                                "no registered agent has {wanted} (waited {})",
                                humantime::format_duration(st.config.unschedulable_timeout)
                            ),
                            false,
                        ),
                    });
                }
                for f in timed_out {
                    warn!(token = %f.token, agent = %f.agent, "attempt timed out");
                    st.circuit(&f, true, now);
                    let _ = f.tx.try_send(Outbound::Frame(ToNode::Cancel {
                        token: f.token.clone(),
                        reason: "attempt timed out".into(),
                    }));
                    let _ = f.run.cast(RunMsg::AttemptFailed {
                        token: f.token,
                        error: TaskError::new(
                            "timeout",
                            format!("no result within {}", humantime::format_duration(f.timeout)),
                            true,
                        ),
                    });
                }
                st.pump();
                st.core.publish_gauges();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tokio::sync::mpsc;

    fn card(name: &str, skill: &str, max: u32) -> AgentCard {
        AgentCard {
            name: name.into(),
            version: "1".into(),
            description: String::new(),
            skills: vec![SkillSpec::named(skill)],
            labels: Default::default(),
            max_concurrency: max,
            inbox: false,
            topics: Vec::new(),
        }
    }

    fn req(step: &str, attempt: u32, skill: &str) -> DispatchRequest<u32> {
        DispatchRequest {
            token: FencingToken {
                run_id: "r".into(),
                step_id: step.into(),
                attempt,
                epoch: 1,
                index: 0,
            },
            skill: skill.into(),
            agent: None,
            input: json!({}),
            idempotency_key: format!("r/{step}"),
            timeout: None,
            labels: BTreeMap::new(),
            secrets: Default::default(),
            traceparent: None,
            run: 0,
            ready_at: Instant::now(),
        }
    }

    fn state_with(
        nodes: &[(&str, Vec<AgentCard>)],
    ) -> (DispatchState<u32>, Vec<mpsc::Receiver<Outbound>>) {
        let mut st = DispatchState::new(LoadBoard::default());
        let mut rxs = Vec::new();
        for (i, (node, cards)) in nodes.iter().enumerate() {
            let (tx, rx) = mpsc::channel(16);
            st.node_up(&NodeId::from(*node), i as u64 + 1, cards.clone(), tx);
            rxs.push(rx);
        }
        (st, rxs)
    }

    fn sent_to(s: Sent<u32>) -> String {
        match s {
            Sent::Sent(a) => a.to_string(),
            Sent::Queued => "queued".into(),
            Sent::Refused(_) => "refused".into(),
            Sent::RefusedForSkill(_) => "refused for its skill".into(),
            Sent::Invalid(_, e) => format!("invalid: {e}"),
        }
    }

    /// A step's labels place it only on agents that have them, their own or their node's
    /// (merged in by the registry); one that nobody has says which labels are missing.
    #[test]
    fn labels_place_a_step_only_where_they_are() {
        let mut eu = card("e", "echo", 4);
        eu.labels.insert("region".into(), "eu".into());
        let (mut st, _rx) = state_with(&[("n1", vec![card("e", "echo", 4)]), ("n2", vec![eu])]);
        let now = Instant::now();
        for step in ["a", "b", "c"] {
            let mut r = req(step, 1, "echo");
            r.labels.insert("region".into(), "eu".into());
            assert_eq!(sent_to(st.dispatch(r, 1000, 10, now)), "n2/e");
        }
        let mut gpu = req("d", 1, "echo");
        gpu.labels.insert("gpu".into(), "true".into());
        assert_eq!(gpu.wanted(), "skill `echo` with labels gpu=true");
        assert_eq!(sent_to(st.dispatch(gpu, 1000, 10, now)), "queued");
        let (unschedulable, _) = st.sweep(now + Duration::from_secs(60), Duration::from_secs(30));
        assert_eq!(unschedulable.len(), 1);
    }

    /// A skill's input schema is checked before anything is sent, its output schema when
    /// the result comes back; both name the path.
    #[test]
    fn skill_schemas_refuse_inputs_and_outputs_naming_the_path() {
        let mut typed = card("t", "translate", 4);
        typed.skills[0].input_schema = Some(json!({
            "type": "object",
            "properties": { "with": { "type": "object", "required": ["text"] } },
        }));
        typed.skills[0].output_schema = Some(json!({ "type": "string" }));
        let (mut st, mut rxs) = state_with(&[("n1", vec![typed])]);
        let now = Instant::now();
        let mut bad = req("b", 1, "translate");
        bad.input = json!({ "with": { "txt": "hi" } });
        let refused = sent_to(st.dispatch(bad, 1000, 10, now));
        assert!(
            refused.starts_with("invalid: bad_input: input.with does not match"),
            "{refused}"
        );
        assert!(
            refused.contains("\"text\" is a required property"),
            "{refused}"
        );
        assert!(rxs[0].try_recv().is_err(), "nothing was sent");
        let mut good = req("c", 1, "translate");
        good.input = json!({ "with": { "text": "hi" } });
        assert_eq!(sent_to(st.dispatch(good, 1000, 10, now)), "n1/t");
        let inflight = st
            .accept(&"n1".into(), 1, &req("c", 1, "translate").token)
            .unwrap();
        let refused = inflight
            .schemas
            .refuse_output(&inflight.skill, &json!({ "fr": 1 }));
        let refused = refused.expect("an object is not a string").to_string();
        assert!(
            refused.starts_with("bad_output: output does not match"),
            "{refused}"
        );
        assert!(
            inflight
                .schemas
                .refuse_output(&inflight.skill, &json!("salut"))
                .is_none()
        );
    }

    #[test]
    fn least_loaded_first_and_round_robin_among_equals() {
        let (mut st, _rx) = state_with(&[
            ("n1", vec![card("e", "echo", 4)]),
            ("n2", vec![card("e", "echo", 4)]),
        ]);
        let now = Instant::now();
        let a = sent_to(st.dispatch(req("a", 1, "echo"), 1000, 10, now));
        let b = sent_to(st.dispatch(req("b", 1, "echo"), 1000, 10, now));
        assert_ne!(a, b, "second task goes to the other, less loaded agent");
        let c = sent_to(st.dispatch(req("c", 1, "echo"), 1000, 10, now));
        let d = sent_to(st.dispatch(req("d", 1, "echo"), 1000, 10, now));
        assert_ne!(c, d);
    }

    #[test]
    fn honours_max_concurrency_and_queues_with_a_bound() {
        let (mut st, _rx) = state_with(&[("n1", vec![card("e", "echo", 1)])]);
        let now = Instant::now();
        assert_eq!(
            sent_to(st.dispatch(req("a", 1, "echo"), 1000, 1, now)),
            "n1/e"
        );
        assert_eq!(
            sent_to(st.dispatch(req("b", 1, "echo"), 1000, 1, now)),
            "queued"
        );
        assert_eq!(
            sent_to(st.dispatch(req("c", 1, "echo"), 1000, 1, now)),
            "refused"
        );
        // The result of `a` frees the slot and `b` goes out.
        let token = req("a", 1, "echo").token;
        st.accept(&"n1".into(), 1, &token).unwrap();
        let (sent, _) = st.drain_pending(1000, now);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].1.step_id, StepId::from("b"));
    }

    #[test]
    fn fences_stale_results() {
        let (mut st, _rx) = state_with(&[
            ("n1", vec![card("e", "echo", 4)]),
            ("n2", vec![card("e", "echo", 4)]),
        ]);
        let now = Instant::now();
        st.dispatch(req("a", 1, "echo"), 1000, 10, now);
        let first = req("a", 1, "echo").token;
        // The run re-dispatched attempt 2; attempt 1 is now stale.
        st.dispatch(req("a", 2, "echo"), 1000, 10, now);
        let holder = st.in_flight.values().next().unwrap().agent.node.clone();
        let inst = st.in_flight.values().next().unwrap().instance;
        assert!(matches!(
            st.accept(&holder, inst, &first),
            Err(Stale::Superseded { .. })
        ));
        let second = req("a", 2, "echo").token;
        let other: NodeId = if holder.as_str() == "n1" {
            "n2".into()
        } else {
            "n1".into()
        };
        assert_eq!(st.accept(&other, 9, &second).unwrap_err(), Stale::WrongNode);
        assert!(st.accept(&holder, inst, &second).is_ok());
        assert_eq!(
            st.accept(&holder, inst, &second).unwrap_err(),
            Stale::NotInFlight
        );
    }

    #[test]
    fn agents_that_come_and_go_are_found_and_forgotten_by_the_indexes() {
        let (mut st, _rx) = state_with(&[
            ("n1", vec![card("e", "echo", 1)]),
            ("n2", vec![card("e", "echo", 1)]),
        ]);
        let now = Instant::now();
        let a = sent_to(st.dispatch(req("a", 1, "echo"), 1000, 10, now));
        assert!(a.starts_with("n1") || a.starts_with("n2"), "{a}");
        // The node that took `a` leaves; its slot is gone from the indexes.
        let (gone, other) = if a.starts_with("n1") {
            ("n1", "n2")
        } else {
            ("n2", "n1")
        };
        let instance = if gone == "n1" { 1 } else { 2 };
        assert_eq!(st.node_down(&gone.into(), instance).len(), 1);
        let b = sent_to(st.dispatch(req("b", 1, "echo"), 1000, 10, now));
        assert!(b.starts_with(other), "{b}");
        // The other is full (max 1): a newcomer takes the next, then finishing `b` frees it.
        let (tx, _rx3) = mpsc::channel(16);
        st.node_up(&"n3".into(), 3, vec![card("e", "echo", 1)], tx);
        let c = sent_to(st.dispatch(req("c", 1, "echo"), 1000, 10, now));
        assert!(c.starts_with("n3"), "{c}");
        assert_eq!(
            sent_to(st.dispatch(req("d", 1, "echo"), 1000, 10, now)),
            "queued"
        );
        let token = st
            .in_flight
            .values()
            .find(|f| f.token.step_id.as_str() == "b")
            .unwrap()
            .token
            .clone();
        let n = if other == "n1" { 1 } else { 2 };
        st.accept(&other.into(), n, &token).unwrap();
        let (sent, _) = st.drain_pending(1000, now);
        assert_eq!(sent.len(), 1);
        assert!(sent[0].2.to_string().starts_with(other), "{sent:?}");
    }

    #[test]
    fn the_candidates_kept_are_bounded_whatever_labels_goals_ask() {
        let (mut st, _rx) = state_with(&[("n1", vec![card("e", "echo", 4)])]);
        let now = Instant::now();
        for i in 0..MAX_SIGNATURES + 10 {
            let found = st.pick(&format!("skill echo\u{0}zone={i}"), |_| true, now);
            assert_eq!(found, Some(0));
            assert!(
                st.candidates.len() <= MAX_SIGNATURES,
                "{}",
                st.candidates.len()
            );
        }
    }

    #[test]
    fn a_dead_node_hands_back_its_attempts() {
        let (mut st, _rx) = state_with(&[("n1", vec![card("e", "echo", 4)])]);
        let now = Instant::now();
        st.dispatch(req("a", 1, "echo"), 1000, 10, now);
        st.dispatch(req("b", 1, "echo"), 1000, 10, now);
        let lost = st.node_down(&"n1".into(), 1);
        assert_eq!(lost.len(), 2);
        assert!(st.in_flight.is_empty());
        assert!(!st.skill_known("echo"));
    }

    #[test]
    fn suspect_agents_get_nothing() {
        let (mut st, _rx) = state_with(&[("n1", vec![card("e", "echo", 4)])]);
        st.set_dispatchable(&"n1".into(), 1, false);
        assert_eq!(
            sent_to(st.dispatch(req("a", 1, "echo"), 1000, 10, Instant::now())),
            "queued"
        );
        st.set_dispatchable(&"n1".into(), 1, true);
        assert_eq!(st.drain_pending(1000, Instant::now()).0.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_skills_expire_after_the_timeout() {
        let (mut st, _rx) = state_with(&[("n1", vec![card("e", "echo", 4)])]);
        st.dispatch(req("a", 1, "translate"), 1000, 10, Instant::now());
        let (expired, _) = st.sweep(Instant::now(), Duration::from_secs(5));
        assert!(expired.is_empty());
        tokio::time::advance(Duration::from_secs(5)).await;
        let (expired, _) = st.sweep(Instant::now(), Duration::from_secs(5));
        assert_eq!(expired.len(), 1);
        assert!(st.pending.is_empty());
    }

    #[tokio::test]
    async fn a_full_skill_queue_refuses_only_that_skill() {
        let (mut st, _rx) = state_with(&[("n1", vec![card("e", "echo", 1)])]);
        st.max_pending_per_skill = 2;
        let now = Instant::now();
        for i in 0..2 {
            let sent = st.dispatch(req(&format!("t{i}"), 1, "translate"), 1000, 100, now);
            assert!(matches!(sent, Sent::Queued));
        }
        let sent = st.dispatch(req("t2", 1, "translate"), 1000, 100, now);
        assert!(matches!(sent, Sent::RefusedForSkill(_)));
        assert_eq!(st.queues.waiting_for_skill("translate"), 2);
        // Another skill still queues (the only echo agent is busy with the first).
        assert!(matches!(
            st.dispatch(req("e0", 1, "echo"), 1000, 100, now),
            Sent::Sent(_)
        ));
        assert!(matches!(
            st.dispatch(req("e1", 1, "echo"), 1000, 100, now),
            Sent::Queued
        ));
        assert_eq!(st.queues.waiting_for_skill("echo"), 1);
        st.cancel_run(&"r".into());
        assert_eq!(st.queues.waiting_for_skill("translate"), 0);
        assert_eq!(st.queues.waiting_for_skill("echo"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_step_timeout_overrides_the_configured_one() {
        let (mut st, _rx) = state_with(&[("n1", vec![card("e", "echo", 4)])]);
        let mut short = req("a", 1, "echo");
        short.timeout = Some(Duration::from_secs(2));
        st.dispatch(short, 60_000, 10, Instant::now());
        st.dispatch(req("b", 1, "echo"), 60_000, 10, Instant::now());
        tokio::time::advance(Duration::from_secs(2)).await;
        let (_, timed_out) = st.sweep(Instant::now(), Duration::from_secs(5));
        let ids: Vec<&str> = timed_out.iter().map(|f| f.token.step_id.as_str()).collect();
        assert_eq!(ids, ["a"], "b keeps the configured 60 s");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_agent_is_left_out_until_a_probe_succeeds() {
        let (mut st, _rx) =
            state_with(&[("n1", vec![card("bad", "echo", 4), card("good", "echo", 4)])]);
        let bad = AgentKey {
            node: "n1".into(),
            agent: "bad".into(),
        };
        let cool = Duration::from_secs(10);
        assert_eq!(
            st.record_outcome(&bad, 1, true, 2, cool, Instant::now()),
            None
        );
        let opened = st.record_outcome(&bad, 1, true, 2, cool, Instant::now());
        assert!(matches!(opened, Some(Circuit::Open { .. })), "{opened:?}");
        assert_eq!(st.load.circuit(&bad), "open");
        for i in 0..4 {
            let to =
                sent_to(st.dispatch(req(&format!("s{i}"), 1, "echo"), 1000, 10, Instant::now()));
            assert_eq!(to, "n1/good", "an open circuit gets nothing");
        }
        assert_eq!(
            sent_to(st.dispatch(req("w", 1, "echo"), 1000, 10, Instant::now())),
            "queued"
        );
        // After the cool-down exactly one probe goes through.
        tokio::time::advance(cool).await;
        let (probe, _) = st.drain_pending(1000, Instant::now());
        assert_eq!(probe.len(), 1);
        assert_eq!(probe[0].2, bad);
        assert_eq!(
            sent_to(st.dispatch(req("x", 1, "echo"), 1000, 10, Instant::now())),
            "queued"
        );
        // A failed probe opens it again; a good one closes it.
        let again = st.record_outcome(&bad, 1, true, 2, cool, Instant::now());
        assert!(matches!(again, Some(Circuit::Open { .. })), "{again:?}");
        tokio::time::advance(cool).await;
        assert_eq!(st.drain_pending(1000, Instant::now()).0.len(), 1);
        let closed = st.record_outcome(&bad, 1, false, 2, cool, Instant::now());
        assert_eq!(closed, Some(Circuit::Closed { failures: 0 }));
    }

    #[test]
    fn the_callers_fault_does_not_count_against_an_agent() {
        let err = |code: &str| -> TaskOutcome {
            Err(TaskError {
                code: code.into(),
                message: String::new(),
                retryable: false,
            })
        };
        assert!(!counts_against_agent(&err("bad_input")));
        assert!(counts_against_agent(&err("flaky")));
        assert!(!counts_against_agent(&Ok(json!(1))));
        // A threshold of 0 never opens.
        let c =
            Circuit::Closed { failures: 0 }.after(true, 0, Duration::from_secs(1), Instant::now());
        assert_eq!(c, Circuit::Closed { failures: 1 });
    }

    #[test]
    fn a_new_instance_starts_with_a_closed_circuit_and_nothing_in_flight() {
        let (mut st, _rx) = state_with(&[("n1", vec![card("e", "echo", 4)])]);
        let key = AgentKey {
            node: "n1".into(),
            agent: "e".into(),
        };
        st.dispatch(req("a", 1, "echo"), 1000, 10, Instant::now());
        st.record_outcome(&key, 1, true, 1, Duration::from_secs(60), Instant::now());
        assert_eq!(
            (st.load.in_flight(&key), st.load.circuit(&key)),
            (1, "open")
        );
        // The node registers again (as after a dispatcher restart, without a NodeDown first).
        let (tx, _rx2) = mpsc::channel(16);
        st.node_up(&"n1".into(), 2, vec![card("e", "echo", 4)], tx);
        assert_eq!(
            (st.load.in_flight(&key), st.load.circuit(&key)),
            (0, "closed")
        );
    }
}
