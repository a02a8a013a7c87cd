//! What a run's journal holds, shared by the run machine and every store: the events
//! (`JournalEvent`) and the goal as stored (`StoredGoal`). A leaf: it knows no store.

use mesh_proto::domain::*;
use mesh_workflow::WorkflowDef;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One entry of a run's journal. `index` names the task of a step: a `foreach` element or a
/// `loop` iteration (0 for a plain step).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JournalEvent {
    RunCreated,
    /// A `foreach` was evaluated: one task per item.
    StepExpanded {
        step: StepId,
        items: Vec<Value>,
    },
    /// A new attempt of a task is about to be dispatched.
    StepStarted {
        step: StepId,
        index: u32,
        attempt: u32,
        epoch: u64,
    },
    /// The dispatcher handed the attempt to an agent. No longer written (a result names its
    /// agent, and an assignment in flight is redone after a restart anyway); replayed from
    /// journals that have it.
    StepAssigned {
        step: StepId,
        index: u32,
        attempt: u32,
        agent: AgentKey,
    },
    /// The one accepted result of a task.
    TaskSucceeded {
        step: StepId,
        index: u32,
        attempt: u32,
        output: Value,
        /// The agent that produced it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        agent: Option<AgentKey>,
        /// How long the agent worked on it (0: not measured), for traces.
        #[serde(default, skip_serializing_if = "is_zero")]
        elapsed_ms: u64,
    },
    /// An attempt failed; another may follow.
    TaskFailed {
        step: StepId,
        index: u32,
        attempt: u32,
        error: TaskError,
        /// The agent the attempt ran on, when it got that far.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        agent: Option<AgentKey>,
        /// How long the agent worked on it (0: not measured or never ran), for traces.
        #[serde(default, skip_serializing_if = "is_zero")]
        elapsed_ms: u64,
    },
    /// The step waits for a person or a signal, until `until_ms` (Unix ms) at most.
    StepWaiting {
        step: StepId,
        until_ms: Option<i64>,
        detail: String,
    },
    /// The planner's workflow, validated, with the run's inputs bound to it; its steps follow
    /// the planner step.
    WorkflowPlanned {
        workflow: WorkflowDef,
        inputs: Value,
    },
    /// A signal sent to the run, kept for every step that waits for it.
    SignalReceived {
        name: String,
        payload: Value,
    },
    StepSucceeded {
        step: StepId,
        output: Value,
    },
    StepFailed {
        step: StepId,
        error: String,
    },
    StepSkipped {
        step: StepId,
        reason: String,
    },
    StepCancelled {
        step: StepId,
    },
    /// Failed with `on_failure: park`, or held at the run's budget (`on_exceed: park`).
    StepParked {
        step: StepId,
        error: String,
        /// Held at the budget: the task that was not started, which a raise starts.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        held: Option<u32>,
    },
    /// A step held at the budget goes on: back to running, the tasks its parking cancelled
    /// pending again.
    StepResumed {
        step: StepId,
    },
    /// An operator raised the run's budget; steps held at the old one go on if it allows.
    BudgetRaised {
        budget: Budget,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        comment: String,
    },
    /// An operator asked to run the step again: back to pending, results dropped, attempt
    /// numbers kept (so that no fencing token is ever issued twice).
    StepReset {
        step: StepId,
    },
    /// Model calls an attempt made, journaled with its result (failed attempts too: they
    /// were paid for).
    UsageRecorded {
        step: StepId,
        index: u32,
        attempt: u32,
        usage: Vec<ModelUsage>,
    },
    /// A task's output saved to memory (docs/memory.md): written to the memory table in the
    /// same transaction as this entry, so an accepted result is remembered exactly once.
    MemorySaved {
        step: StepId,
        index: u32,
        /// `workflow:NAME`, `agent:SKILL` or `swarm:GOAL`.
        scope: String,
        key: String,
        value: Value,
        /// How long the entry is kept (0: forever).
        #[serde(default, skip_serializing_if = "is_zero")]
        ttl_ms: u64,
    },
    /// An attempt called a skill (a model's tool): a child task of the run, `step~call_id`.
    SkillCalled {
        step: StepId,
        index: u32,
        attempt: u32,
        call_id: String,
        skill: String,
        input: Value,
    },
    /// What the child task of a skill call gave back to its caller.
    SkillReturned {
        step: StepId,
        index: u32,
        attempt: u32,
        call_id: String,
        outcome: std::result::Result<Value, TaskError>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        agent: Option<AgentKey>,
        #[serde(default, skip_serializing_if = "is_zero")]
        elapsed_ms: u64,
    },
    /// An attempt's tool call waits for a person (`approval: true` on the tool).
    ToolApprovalAsked {
        step: StepId,
        index: u32,
        attempt: u32,
        call_id: String,
        tool: String,
        arguments: Value,
    },
    /// A person approved or rejected it.
    ToolApprovalDecided {
        step: StepId,
        index: u32,
        attempt: u32,
        call_id: String,
        approved: bool,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        comment: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        by: String,
    },
    /// A tool call an attempt made on its node (HTTP, MCP, code), once it returned.
    ToolUsed {
        step: StepId,
        index: u32,
        attempt: u32,
        call_id: String,
        tool: String,
        arguments: Value,
        ok: bool,
        /// The start of the tool's answer (at most 4 KiB).
        result: String,
        #[serde(default, skip_serializing_if = "is_zero")]
        elapsed_ms: u64,
    },
    /// A failed run runs again (after `StepReset`s).
    RunResumed,
    RunFinished {
        state: RunState,
        output: Option<Value>,
        error: Option<String>,
    },
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl JournalEvent {
    pub fn kind(&self) -> &'static str {
        match self {
            JournalEvent::RunCreated => "run_created",
            JournalEvent::StepExpanded { .. } => "step_expanded",
            JournalEvent::StepStarted { .. } => "step_started",
            JournalEvent::StepAssigned { .. } => "step_assigned",
            JournalEvent::TaskSucceeded { .. } => "task_succeeded",
            JournalEvent::TaskFailed { .. } => "task_failed",
            JournalEvent::StepWaiting { .. } => "step_waiting",
            JournalEvent::SignalReceived { .. } => "signal_received",
            JournalEvent::WorkflowPlanned { .. } => "workflow_planned",
            JournalEvent::StepSucceeded { .. } => "step_succeeded",
            JournalEvent::StepFailed { .. } => "step_failed",
            JournalEvent::StepSkipped { .. } => "step_skipped",
            JournalEvent::StepCancelled { .. } => "step_cancelled",
            JournalEvent::StepParked { .. } => "step_parked",
            JournalEvent::BudgetRaised { .. } => "budget_raised",
            JournalEvent::StepResumed { .. } => "step_resumed",
            JournalEvent::StepReset { .. } => "step_reset",
            JournalEvent::UsageRecorded { .. } => "usage_recorded",
            JournalEvent::MemorySaved { .. } => "memory_saved",
            JournalEvent::SkillCalled { .. } => "skill_called",
            JournalEvent::SkillReturned { .. } => "skill_returned",
            JournalEvent::ToolApprovalAsked { .. } => "tool_approval_asked",
            JournalEvent::ToolApprovalDecided { .. } => "tool_approval_decided",
            JournalEvent::ToolUsed { .. } => "tool_used",
            JournalEvent::RunResumed => "run_resumed",
            JournalEvent::RunFinished { .. } => "run_finished",
        }
    }

    pub fn step(&self) -> Option<&StepId> {
        match self {
            JournalEvent::RunCreated
            | JournalEvent::SignalReceived { .. }
            | JournalEvent::WorkflowPlanned { .. }
            | JournalEvent::BudgetRaised { .. }
            | JournalEvent::RunResumed
            | JournalEvent::RunFinished { .. } => None,
            JournalEvent::StepExpanded { step, .. }
            | JournalEvent::StepStarted { step, .. }
            | JournalEvent::StepAssigned { step, .. }
            | JournalEvent::TaskSucceeded { step, .. }
            | JournalEvent::TaskFailed { step, .. }
            | JournalEvent::StepWaiting { step, .. }
            | JournalEvent::StepSucceeded { step, .. }
            | JournalEvent::StepFailed { step, .. }
            | JournalEvent::StepSkipped { step, .. }
            | JournalEvent::StepCancelled { step }
            | JournalEvent::StepParked { step, .. }
            | JournalEvent::StepResumed { step }
            | JournalEvent::StepReset { step }
            | JournalEvent::UsageRecorded { step, .. }
            | JournalEvent::MemorySaved { step, .. }
            | JournalEvent::SkillCalled { step, .. }
            | JournalEvent::SkillReturned { step, .. }
            | JournalEvent::ToolApprovalAsked { step, .. }
            | JournalEvent::ToolApprovalDecided { step, .. }
            | JournalEvent::ToolUsed { step, .. } => Some(step),
        }
    }
}

/// A goal as stored: its workflow validated, its inputs checked and defaulted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredGoal {
    pub objective: String,
    pub inputs: Value,
    pub workflow: WorkflowDef,
    pub idempotency_key: Option<String>,
    /// A text goal: its workflow is one `plan` step, whose output is the workflow that
    /// runs next.
    #[serde(default)]
    pub planned: bool,
    /// A digest of the request as submitted (see `intake::request_digest`): the same
    /// idempotency key with another request is refused. Absent in goals stored before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_digest: Option<String>,
    /// The goal's own budget, which replaces its workflow's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
    /// The goal's namespace (`default` for goals stored before namespaces).
    #[serde(default)]
    pub namespace: Namespace,
}
