//! The document a user writes, as serde reads it. Nothing here is checked beyond its shape;
//! [`crate::validate`] turns a [`WorkflowDef`] into a [`crate::Workflow`] or says what is wrong.

use std::collections::BTreeMap;
use std::time::Duration;

pub use mesh_proto::domain::{Budget, OnExceed};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A workflow definition, in YAML or JSON.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowDef {
    /// Registered name; empty for a workflow sent inline with a goal.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Version of `name`; versions are immutable once registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Inputs by name: a type name (`string`) or a JSON Schema object
    /// (`{type: string, default: x, description: ...}`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub inputs: BTreeMap<String, Value>,
    pub steps: Vec<StepDef>,
    /// The run's output by name, templated; without it the output is every leaf step's output.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub outputs: BTreeMap<String, Value>,
    /// The whole run's time limit, from its creation.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub deadline: Option<Duration>,
    /// What the run may spend on model calls; checked before each `llm` step is dispatched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
}

/// One step. Exactly one of `uses`, `agent`, `workflow`, `approval` and `wait_for` says
/// what it does.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepDef {
    pub id: String,
    /// The skill an agent must have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses: Option<String>,
    /// A named agent (on whichever node hosts it), instead of a skill.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// A registered workflow, `NAME@VERSION`, run as a child run per task: a group of steps
    /// that can be looped or fanned out. `with` gives its inputs; its output is the task's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    /// Input of the task, templated with `${{ … }}`.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub with: Value,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needs: Vec<String>,
    /// Labels the agent must have (its own, or its node's): `{ region: eu, gpu: "true" }`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Run the step only when this is true; otherwise it is skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// Fan out: one task per element of this list, outputs gathered in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub foreach: Option<String>,
    /// At most this many `foreach` tasks at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel: Option<u32>,
    /// Repeat the task until a condition holds.
    #[serde(default, rename = "loop", skip_serializing_if = "Option::is_none")]
    pub loop_: Option<LoopDef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryDef>,
    /// Limit on one attempt, from dispatch to result.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "OnFailure::is_default")]
    pub on_failure: OnFailure,
    /// Wait for a person to approve or reject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalDef>,
    /// Wait for a named signal sent to the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_for: Option<WaitForDef>,
    /// Memory that outlives the run: loaded into the task's input, saved from its output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryDef>,
}

/// `memory: { scope, key, last, save, ttl }` on a task step (docs/memory.md).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryDef {
    /// Whose memory: `workflow` (the registered workflow's, across its runs), `agent` (the
    /// step's skill's or agent's, across workflows) or `swarm` (the goal's team's).
    pub scope: MemoryScope,
    /// The entry list's key in that scope, templated (`${{ inputs.user }}`).
    pub key: String,
    /// How many of the newest entries the task gets (0: none).
    #[serde(default = "default_memory_last")]
    pub last: u32,
    /// Whether the task's output (its `remember` field when it has one) is saved.
    #[serde(default = "default_true")]
    pub save: bool,
    /// How long a saved entry is kept; forever when absent.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub ttl: Option<Duration>,
}

fn default_memory_last() -> u32 {
    10
}

fn default_true() -> bool {
    true
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryScope {
    Workflow,
    Agent,
    Swarm,
}

impl MemoryScope {
    pub fn as_str(self) -> &'static str {
        match self {
            MemoryScope::Workflow => "workflow",
            MemoryScope::Agent => "agent",
            MemoryScope::Swarm => "swarm",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoopDef {
    /// Checked after each iteration; sees `output` and `iteration`.
    pub until: String,
    /// Required: the loop fails once this many iterations ran without `until` holding.
    pub max_iterations: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryDef {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Wait before the first retry.
    #[serde(default = "default_backoff", with = "humantime_serde")]
    pub backoff: Duration,
    /// Each further wait is the previous one times this.
    #[serde(default = "default_multiplier")]
    pub multiplier: f64,
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Each wait is shortened by a random fraction of up to this much (0 to 1).
    #[serde(default)]
    pub jitter: f64,
    /// Error codes that are never retried.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub non_retryable: Vec<String>,
}

fn default_backoff() -> Duration {
    Duration::from_secs(1)
}

fn default_multiplier() -> f64 {
    2.0
}

fn default_max_backoff() -> Duration {
    Duration::from_secs(60)
}

/// What a failed step does to its run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// The run fails.
    #[default]
    Fail,
    /// The step stays failed and the run goes on; dependents run.
    Continue,
    /// The step waits, `parked`, for an operator: `retry` runs it (and what depends on it)
    /// again, `skip` lets its dependents go on without it. The run stays running meanwhile.
    Park,
}

impl OnFailure {
    fn is_default(&self) -> bool {
        *self == OnFailure::Fail
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalDef {
    /// What the person is asked, templated.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Without a decision by then, the step fails with `approval_timeout`.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitForDef {
    pub signal: String,
    /// Without the signal by then, the step fails with `signal_timeout`.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
}
