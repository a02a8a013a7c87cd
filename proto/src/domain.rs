//! Domain types shared by the coordinator, the SDK and the CLI. No prost type appears here.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_owned())
            }
        }
    };
}

id_type!(
    /// A worker node's stable name.
    NodeId
);
id_type!(
    /// A goal, as stored.
    GoalId
);
id_type!(
    /// One run of a goal's steps.
    RunId
);
id_type!(
    /// A step's id, unique within its run.
    StepId
);

/// An agent hosted on a node: agent names are unique per node.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AgentKey {
    pub node: NodeId,
    pub agent: String,
}

impl fmt::Display for AgentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.node, self.agent)
    }
}

/// Identifies one attempt of one step. Only a result carrying the step's current token is
/// accepted; every other one is stale.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FencingToken {
    pub run_id: RunId,
    pub step_id: StepId,
    pub attempt: u32,
    /// The coordinator incarnation that issued the attempt.
    pub epoch: u64,
    /// Which task of the step: a `foreach` element or a `loop` iteration; 0 otherwise.
    #[serde(default)]
    pub index: u32,
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}[{}]#{}@{}",
            self.run_id, self.step_id, self.index, self.attempt, self.epoch
        )
    }
}

/// What an agent can do, declared by its author.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SkillSpec {
    pub name: String,
    pub description: String,
    pub input_schema: Option<Value>,
    pub output_schema: Option<Value>,
}

impl SkillSpec {
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            description: String::new(),
            input_schema: None,
            output_schema: None,
        }
    }
}

/// An agent's description, in the spirit of A2A agent cards.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentCard {
    pub name: String,
    pub version: String,
    pub description: String,
    pub skills: Vec<SkillSpec>,
    pub labels: BTreeMap<String, String>,
    pub max_concurrency: u32,
    /// It takes messages sent to it by name.
    #[serde(default)]
    pub inbox: bool,
    /// Topics it subscribes to.
    #[serde(default)]
    pub topics: Vec<String>,
}

impl AgentCard {
    /// A card with one slot and no skills yet; add them with [`AgentCard::skill`].
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            version: "0.1.0".to_owned(),
            description: String::new(),
            skills: Vec::new(),
            labels: BTreeMap::new(),
            max_concurrency: 1,
            inbox: false,
            topics: Vec::new(),
        }
    }

    /// It takes messages sent to it by name (its handler's `on_message`).
    pub fn inbox(mut self) -> Self {
        self.inbox = true;
        self
    }

    /// It subscribes to `topic` (and takes messages).
    pub fn subscribe(mut self, topic: &str) -> Self {
        self.topics.push(topic.to_owned());
        self
    }

    /// Whether messages may be delivered to it.
    pub fn takes_messages(&self) -> bool {
        self.inbox || !self.topics.is_empty()
    }

    pub fn skill(mut self, name: &str) -> Self {
        self.skills.push(SkillSpec::named(name));
        self
    }

    pub fn skill_spec(mut self, skill: SkillSpec) -> Self {
        self.skills.push(skill);
        self
    }

    pub fn max_concurrency(mut self, n: u32) -> Self {
        self.max_concurrency = n;
        self
    }

    pub fn version(mut self, version: &str) -> Self {
        self.version = version.to_owned();
        self
    }

    pub fn description(mut self, description: &str) -> Self {
        self.description = description.to_owned();
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_owned(), value.to_owned());
        self
    }

    pub fn has_skill(&self, skill: &str) -> bool {
        self.skills.iter().any(|s| s.name == skill)
    }
}

/// The first frame of a node's stream.
#[derive(Clone, Debug, PartialEq)]
pub struct Registration {
    pub node_name: String,
    pub labels: BTreeMap<String, String>,
    pub agents: Vec<AgentCard>,
}

/// The coordinator's answer to a registration.
#[derive(Clone, Debug, PartialEq)]
pub struct Registered {
    pub node_id: NodeId,
    pub instance: u64,
    pub heartbeat_every_ms: u64,
    pub lease_ms: u64,
}

/// An agent's failure, as reported in a task result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskError {
    pub code: String,
    pub message: String,
    pub retryable: bool,
}

impl TaskError {
    pub fn new(code: &str, message: impl Into<String>, retryable: bool) -> Self {
        Self {
            code: code.to_owned(),
            message: message.into(),
            retryable,
        }
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

pub type TaskOutcome = Result<Value, TaskError>;

/// One attempt handed to an agent.
#[derive(Clone, Debug, PartialEq)]
pub struct Task {
    pub token: FencingToken,
    pub agent: String,
    pub skill: String,
    pub input: Value,
    pub deadline_ms: u64,
    pub idempotency_key: String,
    /// The secrets the input names, for this attempt only (see [`crate::secrets`]).
    pub secrets: crate::secrets::Secrets,
    /// W3C trace context of the dispatch that sent it (empty with tracing off).
    pub traceparent: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TaskResult {
    pub token: FencingToken,
    pub outcome: TaskOutcome,
    /// Model calls the attempt made, failed attempts too.
    pub usage: Vec<ModelUsage>,
    /// How long the agent worked on it, by the node's clock (0: not measured).
    pub elapsed_ms: u64,
}

impl TaskResult {
    /// A result that used no model.
    pub fn new(token: FencingToken, outcome: TaskOutcome) -> Self {
        TaskResult {
            token,
            outcome,
            usage: Vec::new(),
            elapsed_ms: 0,
        }
    }
}

/// What calls to one model cost.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelUsage {
    pub provider: String,
    pub model: String,
    pub calls: u32,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// `None` when the model's price is unknown: unknown, not zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
}

/// Usage summed over a step or a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageTotal {
    pub calls: u32,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// USD of the priced calls.
    pub cost_usd: f64,
    /// Calls whose price is unknown (their cost is not in `cost_usd`).
    pub unpriced_calls: u32,
}

impl UsageTotal {
    pub fn add(&mut self, u: &ModelUsage) {
        self.calls = self.calls.saturating_add(u.calls);
        self.input_tokens = self.input_tokens.saturating_add(u.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(u.output_tokens);
        match u.cost_usd {
            Some(c) if c.is_finite() && c >= 0.0 => self.cost_usd += c,
            _ => self.unpriced_calls = self.unpriced_calls.saturating_add(u.calls),
        }
    }

    pub fn merge(&mut self, other: &UsageTotal) {
        self.calls = self.calls.saturating_add(other.calls);
        self.input_tokens = self.input_tokens.saturating_add(other.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(other.output_tokens);
        self.cost_usd += other.cost_usd;
        self.unpriced_calls = self.unpriced_calls.saturating_add(other.unpriced_calls);
    }

    pub fn is_empty(&self) -> bool {
        self.calls == 0
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct TaskProgress {
    pub token: FencingToken,
    pub message: String,
    pub fraction: Option<f64>,
}

/// Text an agent produced so far during an attempt (a model's tokens); not journaled.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskDelta {
    pub token: FencingToken,
    pub text: String,
    /// The attempt's text so far is void (a fallback model starts again).
    pub restart: bool,
}

/// An attempt calls a skill of the mesh; answered by [`ToNode::SkillResult`].
#[derive(Clone, Debug, PartialEq)]
pub struct SkillCall {
    /// The calling attempt.
    pub token: FencingToken,
    pub call_id: String,
    pub skill: String,
    pub input: Value,
}

/// An attempt's tool call waits for a person; answered by [`ToNode::ToolDecision`].
#[derive(Clone, Debug, PartialEq)]
pub struct ToolApproval {
    /// The calling attempt.
    pub token: FencingToken,
    pub call_id: String,
    pub tool: String,
    pub arguments: Value,
}

/// A tool call an attempt made on its node, once it returned.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolUsed {
    pub token: FencingToken,
    pub call_id: String,
    pub tool: String,
    pub arguments: Value,
    pub ok: bool,
    /// The start of the tool's answer, at most [`MAX_TOOL_RESULT_BYTES`].
    pub result: String,
    pub elapsed_ms: u64,
}

/// How much of a tool's answer travels to the journal.
pub const MAX_TOOL_RESULT_BYTES: usize = 4 * 1024;

/// Where a message goes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Recipient {
    /// The agent of that name (one instance of it, on any node).
    Agent(String),
    /// Every agent subscribed to the topic (one instance of each).
    Topic(String),
    /// Every agent of the swarm of the run of this attempt, the sender aside.
    SwarmOf(FencingToken),
}

/// A message an agent sends; answered by [`ToNode::MessageSent`].
#[derive(Clone, Debug, PartialEq)]
pub struct SendMessage {
    pub message_id: String,
    pub from_agent: String,
    /// Empty: the node's only namespace.
    pub namespace: String,
    pub to: Recipient,
    pub priority: u8,
    pub payload: Value,
}

/// A message as delivered to an agent.
#[derive(Clone, Debug, PartialEq)]
pub struct Delivered {
    pub delivery: u64,
    pub agent: String,
    pub message_id: String,
    pub from_agent: String,
    /// The topic it was published to, `swarm:RUN` for a broadcast, empty when sent by name.
    pub topic: String,
    pub priority: u8,
    pub payload: Value,
    pub namespace: String,
    pub sent_at_ms: i64,
    pub attempt: u32,
}

/// The highest message priority.
pub const MAX_PRIORITY: u8 = 9;

/// A person's decision on a tool call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolDecision {
    pub approved: bool,
    pub comment: String,
    pub by: String,
}

/// Whether the coordinator took a task result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckCode {
    Accepted,
    /// The token is not the step's current one.
    Stale,
}

/// Frames a node sends on its stream.
#[derive(Clone, Debug, PartialEq)]
pub enum FromNode {
    Register(Registration),
    Heartbeat {
        instance: u64,
    },
    Result(TaskResult),
    Progress(TaskProgress),
    Delta(TaskDelta),
    Draining,
    AgentDown {
        agent: String,
        reason: String,
    },
    SkillCall(SkillCall),
    ToolApproval(ToolApproval),
    ToolUsed(ToolUsed),
    SendMessage(SendMessage),
    /// A delivery handled (`Ok`) or failed in the handler.
    MessageAck {
        delivery: u64,
        outcome: Result<(), TaskError>,
    },
}

/// Frames the coordinator sends on a node's stream.
#[derive(Clone, Debug, PartialEq)]
pub enum ToNode {
    Registered(Registered),
    Task(Task),
    Cancel {
        token: FencingToken,
        reason: String,
    },
    Drain {
        reason: String,
    },
    ResultAck {
        token: FencingToken,
        code: AckCode,
        message: String,
    },
    /// The answer to the attempt `token`'s call `call_id`.
    SkillResult {
        token: FencingToken,
        call_id: String,
        outcome: Result<Value, TaskError>,
    },
    /// A person's decision on the attempt `token`'s tool call `call_id`.
    ToolDecision {
        token: FencingToken,
        call_id: String,
        decision: ToolDecision,
    },
    /// The answer to a sent message: how many agents will get it, or why it was refused.
    MessageSent {
        message_id: String,
        outcome: Result<u32, TaskError>,
    },
    Deliver(Delivered),
}

/// The namespace of everything given without one.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The label the coordinator puts on every node and agent card: the namespaces the node's
/// stream was opened in, sorted and comma-separated (whatever the node says). A run's
/// attempts go only to agents whose label lists the run's namespace.
pub const NAMESPACE_LABEL: &str = "mesh.namespace";

/// Whether a label set's [`NAMESPACE_LABEL`] lists `namespace`.
pub fn serves_namespace(labels: &BTreeMap<String, String>, namespace: &str) -> bool {
    labels
        .get(NAMESPACE_LABEL)
        .is_some_and(|list| list.split(',').any(|ns| ns == namespace))
}

/// Whether `labels` has every label `wanted` asks for; the namespace label by membership.
pub fn labels_match(labels: &BTreeMap<String, String>, wanted: &BTreeMap<String, String>) -> bool {
    wanted.iter().all(|(k, v)| match k.as_str() {
        NAMESPACE_LABEL => serves_namespace(labels, v),
        _ => labels.get(k) == Some(v),
    })
}

/// The tenant unit: every goal, run, workflow and node belongs to one. Its rule is
/// [`crate::convert::check_id`]'s.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Namespace(pub String);

impl Default for Namespace {
    fn default() -> Self {
        Namespace(DEFAULT_NAMESPACE.to_owned())
    }
}

impl Namespace {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_default(&self) -> bool {
        self.0 == DEFAULT_NAMESPACE
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a run may spend on model calls: a workflow's `budget`, a goal's, or one an operator
/// raised. Checked before each `llm` step is dispatched.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// Tokens in and out, over every call of the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    /// USD of the priced calls of the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_usd: Option<f64>,
    #[serde(default)]
    pub on_exceed: OnExceed,
}

/// What happens to a run at its budget.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnExceed {
    /// The step that would exceed it fails (and with it the run, unless the step says
    /// otherwise); nothing more is dispatched.
    #[default]
    Fail,
    /// The step that would exceed it is parked; the run goes on once an operator raises
    /// the budget (`RaiseBudget`), or the step is retried or skipped.
    Park,
}

impl OnExceed {
    pub fn as_str(self) -> &'static str {
        match self {
            OnExceed::Fail => "fail",
            OnExceed::Park => "park",
        }
    }
}

impl std::str::FromStr for OnExceed {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "fail" => Ok(OnExceed::Fail),
            "park" => Ok(OnExceed::Park),
            other => Err(format!("must be `fail` or `park`, not `{other}`")),
        }
    }
}

impl Budget {
    /// The first problem of a budget, as (field under `budget`, what is wrong).
    pub fn problem(&self) -> Option<(&'static str, &'static str)> {
        if self.max_tokens.is_none() && self.max_cost_usd.is_none() {
            return Some(("", "give max_tokens, max_cost_usd or both"));
        }
        if self.max_tokens == Some(0) {
            return Some((".max_tokens", "must be at least 1"));
        }
        if let Some(usd) = self.max_cost_usd
            && !(usd.is_finite() && usd > 0.0)
        {
            return Some((".max_cost_usd", "must be a number of USD above 0"));
        }
        None
    }

    /// Why the spend `used` has reached this budget, naming the limit and the spend.
    pub fn reached(&self, used: &UsageTotal) -> Option<String> {
        let tokens = used.input_tokens.saturating_add(used.output_tokens);
        if let Some(max) = self.max_tokens
            && tokens >= max
        {
            return Some(format!(
                "budget: the run has used {tokens} tokens, its max_tokens is {max}"
            ));
        }
        if let Some(max) = self.max_cost_usd
            && used.cost_usd >= max
        {
            return Some(format!(
                "budget: the run has spent ${:.6}, its max_cost_usd is ${max}",
                used.cost_usd
            ));
        }
        None
    }
}

/// One step of a goal's inline workflow.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepSpec {
    pub id: StepId,
    pub uses: String,
    #[serde(default)]
    pub with: Value,
    #[serde(default)]
    pub needs: Vec<StepId>,
}

/// A validated goal.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GoalSpec {
    pub objective: String,
    pub inputs: Value,
    pub steps: Vec<StepSpec>,
    /// A workflow definition (YAML or JSON text), given instead of `steps`; the
    /// coordinator validates it.
    #[serde(default)]
    pub workflow: Option<String>,
    /// A registered workflow, `NAME@VERSION` or `NAME` (its newest version).
    #[serde(default)]
    pub workflow_ref: Option<String>,
    pub idempotency_key: Option<String>,
    /// The goal's budget for model calls; replaces its workflow's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
    /// Where the goal and its run belong: the namespace of the call that submitted it.
    #[serde(default)]
    pub namespace: Namespace,
}

/// What a goal gives to run: decided in one place, [`GoalSpec::kind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GoalKind {
    /// Plain `steps`.
    Steps,
    /// A workflow definition's text.
    Workflow,
    /// A registered workflow, `NAME@VERSION`.
    Registered,
    /// Only an objective: an agent with the `plan` skill writes the workflow.
    Text,
}

impl GoalSpec {
    /// What the goal gives to run (a valid goal gives exactly one of these).
    pub fn kind(&self) -> GoalKind {
        if self.workflow_ref.is_some() {
            GoalKind::Registered
        } else if self.workflow.is_some() {
            GoalKind::Workflow
        } else if !self.steps.is_empty() {
            GoalKind::Steps
        } else {
            GoalKind::Text
        }
    }
}

/// A registered workflow version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkflowRecord {
    pub name: String,
    pub version: u32,
    pub description: String,
    /// The definition's text as registered.
    pub definition: String,
    pub steps: u32,
    pub created_at_ms: i64,
}

/// Reference to the run a submission created or found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunRef {
    pub goal_id: GoalId,
    pub run_id: RunId,
    pub created: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl RunState {
    pub fn is_terminal(self) -> bool {
        !matches!(self, RunState::Running)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "running" => RunState::Running,
            "succeeded" => RunState::Succeeded,
            "failed" => RunState::Failed,
            "cancelled" => RunState::Cancelled,
            _ => return None,
        })
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    #[default]
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Skipped,
    /// Waiting for a signal.
    Waiting,
    AwaitingApproval,
    /// Failed with `on_failure: park`: waits for an operator to retry or skip it.
    Parked,
}

impl StepState {
    pub fn is_terminal(self) -> bool {
        !matches!(
            self,
            StepState::Pending
                | StepState::Running
                | StepState::Waiting
                | StepState::AwaitingApproval
                | StepState::Parked
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Pending => "pending",
            StepState::Running => "running",
            StepState::Succeeded => "succeeded",
            StepState::Failed => "failed",
            StepState::Cancelled => "cancelled",
            StepState::Skipped => "skipped",
            StepState::Waiting => "waiting",
            StepState::AwaitingApproval => "awaiting_approval",
            StepState::Parked => "parked",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => StepState::Pending,
            "running" => StepState::Running,
            "succeeded" => StepState::Succeeded,
            "failed" => StepState::Failed,
            "cancelled" => StepState::Cancelled,
            "skipped" => StepState::Skipped,
            "waiting" => StepState::Waiting,
            "awaiting_approval" => StepState::AwaitingApproval,
            "parked" => StepState::Parked,
            _ => return None,
        })
    }
}

impl fmt::Display for StepState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A step as clients see it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepView {
    pub id: StepId,
    pub uses: String,
    pub state: StepState,
    pub attempt: u32,
    pub agent: Option<AgentKey>,
    pub output: Option<Value>,
    pub error: Option<String>,
    /// `foreach`: tasks finished, and in all.
    #[serde(default)]
    pub items_done: u32,
    #[serde(default)]
    pub items_total: u32,
    /// `loop`: iterations started.
    #[serde(default)]
    pub iteration: u32,
    /// What a waiting step waits for.
    #[serde(default)]
    pub detail: Option<String>,
    /// Set (to the output's size in bytes) when a client received the view without the
    /// output, which was too large to travel inline: read it with `GetOutput`.
    #[serde(default)]
    pub output_elided_bytes: Option<u64>,
    /// Model calls of every attempt of the step.
    #[serde(default)]
    pub usage: UsageTotal,
}

/// The agent a swarm picked for a skill.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SwarmMember {
    pub skill: String,
    pub agent: AgentKey,
}

/// A run as clients see it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunView {
    pub run_id: RunId,
    pub goal_id: GoalId,
    pub objective: String,
    pub state: RunState,
    pub steps: Vec<StepView>,
    pub output: Option<Value>,
    pub error: Option<String>,
    pub swarm: Vec<SwarmMember>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// As [`StepView::output_elided_bytes`], for the run's output.
    #[serde(default)]
    pub output_elided_bytes: Option<u64>,
    /// Model calls of every step.
    #[serde(default)]
    pub usage: UsageTotal,
    /// The run's budget for model calls, as last raised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
    #[serde(default)]
    pub namespace: Namespace,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    pub run_id: RunId,
    pub goal_id: GoalId,
    pub objective: String,
    pub state: RunState,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    #[serde(default)]
    pub namespace: Namespace,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RunPage {
    pub runs: Vec<RunSummary>,
    pub next_page_token: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ListRunsQuery {
    /// Only the runs of this namespace.
    pub namespace: Namespace,
    pub state: Option<RunState>,
    pub page_size: u32,
    pub page_token: Option<RunId>,
}

/// What a run watcher sees.
#[derive(Clone, Debug, PartialEq)]
pub enum RunEvent {
    Snapshot(RunView),
    Step(StepView),
    /// What the agent running a step reported; not journaled.
    Progress {
        step: StepId,
        attempt: u32,
        message: String,
        fraction: Option<f64>,
    },
    /// Text the agent running a step produced (a model's tokens, coalesced); not journaled.
    Delta {
        step: StepId,
        index: u32,
        attempt: u32,
        text: String,
        /// The step's text so far is void; `text` starts anew.
        restart: bool,
    },
    Finished {
        state: RunState,
        output: Option<Value>,
        error: Option<String>,
        /// Set (to its size in bytes) when the output was too large to travel inline: read
        /// it with `GetOutput`.
        output_elided_bytes: Option<u64>,
    },
}

/// A page of an output's JSON text.
#[derive(Clone, Debug, PartialEq)]
pub struct OutputPage {
    pub chunk: Vec<u8>,
    pub offset: u64,
    pub total_bytes: u64,
    pub done: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Healthy,
    Suspect,
    Dead,
    Draining,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Suspect => "suspect",
            Health::Dead => "dead",
            Health::Draining => "draining",
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    pub node_id: NodeId,
    pub instance: u64,
    pub health: Health,
    pub heartbeat_age_ms: u64,
    pub labels: BTreeMap<String, String>,
    pub agents: u32,
    pub in_flight: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentView {
    pub node_id: NodeId,
    pub instance: u64,
    pub name: String,
    pub version: String,
    pub skills: Vec<String>,
    pub health: Health,
    pub heartbeat_age_ms: u64,
    pub in_flight: u32,
    pub max_concurrency: u32,
    /// Circuit breaker: `closed`, `open` or `half_open`.
    pub circuit: String,
    /// From the agent's card.
    #[serde(default)]
    pub description: String,
    /// Each skill with its description and JSON Schemas.
    #[serde(default)]
    pub skill_specs: Vec<SkillSpec>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}
