//! The [`Agent`] trait and what a handler sees.

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_proto::domain::{
    FencingToken, MAX_TOOL_RESULT_BYTES, ModelUsage, TaskError, TaskResult, ToolDecision,
};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::messages::{Mail, Message};

pub use mesh_proto::domain::AgentCard;

/// An agent: a card that says what it can do, and a handler.
///
/// `handle` runs once per attempt. An attempt may be delivered more than once (after a node
/// is lost, for instance), so side effects should be keyed by [`Context::idempotency_key`],
/// which is stable across the attempts of one step.
pub trait Agent: Send + Sync + 'static {
    fn card(&self) -> AgentCard;

    fn handle(
        &self,
        ctx: Context,
        input: Value,
    ) -> impl Future<Output = Result<Value, AgentError>> + Send;

    /// A message for this agent (docs/messages.md), when its card takes messages
    /// ([`AgentCard::inbox`], [`AgentCard::subscribe`]); `mail` sends from this agent. `Ok`
    /// acknowledges it; an error has it delivered again later, a few times at most. At least
    /// once: after a node is lost a message may come again (the same [`Message::id`]).
    fn on_message(
        &self,
        mail: Mail,
        message: Message,
    ) -> impl Future<Output = Result<(), AgentError>> + Send {
        let _ = (mail, message);
        async {
            Err(AgentError::fatal(
                "no_handler",
                "this agent has no on_message handler",
            ))
        }
    }
}

/// An agent's failure. Retryable errors are tried again by the coordinator (up to its cap);
/// the others fail the step at once.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct AgentError {
    pub code: String,
    pub message: String,
    pub retryable: bool,
}

impl AgentError {
    /// A transient failure: worth another attempt.
    pub fn retryable(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.to_owned(),
            message: message.into(),
            retryable: true,
        }
    }

    /// A failure another attempt would not fix.
    pub fn fatal(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.to_owned(),
            message: message.into(),
            retryable: false,
        }
    }

    /// The input is wrong: the caller's fault, never retried.
    pub fn bad_input(message: impl Into<String>) -> Self {
        Self::fatal("bad_input", message)
    }
}

impl From<AgentError> for TaskError {
    fn from(e: AgentError) -> Self {
        TaskError {
            code: e.code,
            message: e.message,
            retryable: e.retryable,
        }
    }
}

/// A progress report from a handler.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    pub message: String,
    pub fraction: Option<f64>,
}

/// What a handler reports during an attempt, on its way to the coordinator's watchers.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Report {
    Progress(Progress),
    /// Text produced so far; `restart` voids what came before.
    Delta {
        text: String,
        restart: bool,
    },
    /// A skill of the mesh called by the attempt; its answer goes to `reply`.
    SkillCall {
        call_id: String,
        skill: String,
        input: Value,
        reply: SkillReply,
    },
    /// A tool call of the attempt that waits for a person; the decision goes to `reply` as
    /// `{approved, comment, by}`.
    ToolApproval {
        call_id: String,
        tool: String,
        arguments: Value,
        reply: SkillReply,
    },
    /// A tool call the attempt made, once it returned: journaled by the run.
    ToolUsed {
        call_id: String,
        tool: String,
        arguments: Value,
        ok: bool,
        result: String,
        elapsed_ms: u64,
    },
    /// The attempt's result, after every report of the attempt (same channel, so that a
    /// watcher gets the last text before the step ends); never dropped.
    Result(TaskResult),
}

/// A skill call's answer: the child task's output, or why there is none.
pub type SkillOutcome = Result<Value, TaskError>;

/// Where the answer to a skill call goes (once).
#[derive(Clone)]
pub(crate) struct SkillReply(Arc<Mutex<Option<oneshot::Sender<SkillOutcome>>>>);

impl SkillReply {
    /// Whether nobody waits for the answer any more (the attempt ended).
    pub(crate) fn abandoned(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_none_or(|tx| tx.is_closed())
    }

    pub(crate) fn send(&self, outcome: SkillOutcome) {
        if let Some(tx) = self.0.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = tx.send(outcome);
        }
    }
}

impl std::fmt::Debug for SkillReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SkillReply")
    }
}

impl PartialEq for SkillReply {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// A tool call an attempt made, for [`Context::tool_used`].
#[derive(Clone, Copy, Debug)]
pub struct UsedTool<'a> {
    /// From [`Context::new_call_id`]; the one its approval was asked with, if it was.
    pub call_id: &'a str,
    pub tool: &'a str,
    pub arguments: &'a Value,
    pub ok: bool,
    pub result: &'a str,
    pub elapsed_ms: u64,
}

/// What a handler knows about its attempt.
#[derive(Clone, Debug)]
pub struct Context {
    pub(crate) token: FencingToken,
    pub(crate) skill: String,
    pub(crate) idempotency_key: String,
    pub(crate) deadline: Instant,
    pub(crate) cancel: CancellationToken,
    pub(crate) progress: Option<mpsc::Sender<(FencingToken, Report)>>,
    /// Model calls of this attempt, sent with its result.
    pub(crate) usage: Arc<Mutex<Vec<ModelUsage>>>,
    /// Skill calls made so far, for their ids.
    pub(crate) calls: Arc<AtomicU32>,
    /// Where messages go from.
    pub(crate) mail: Mail,
}

impl Context {
    /// A context for calling a handler directly, in tests.
    pub fn for_test(run: &str, step: &str, attempt: u32) -> Self {
        Self {
            token: FencingToken {
                run_id: run.into(),
                step_id: step.into(),
                attempt,
                epoch: 1,
                index: 0,
            },
            skill: String::new(),
            idempotency_key: format!("{run}/{step}"),
            deadline: Instant::now() + Duration::from_secs(60),
            cancel: CancellationToken::new(),
            progress: None,
            usage: Arc::default(),
            calls: Arc::default(),
            mail: Mail::new("", None, None),
        }
    }

    /// Sends messages from this attempt's agent (docs/messages.md): `ctx.mail().send("critic",
    /// json!(..))`, `.publish(topic, ..)`, `.broadcast(..)` to the run's swarm.
    pub fn mail(&self) -> Mail {
        self.mail.clone()
    }

    /// The attempt's fencing token.
    pub fn token(&self) -> &FencingToken {
        &self.token
    }

    /// 1 for the first attempt of the step.
    pub fn attempt(&self) -> u32 {
        self.token.attempt
    }

    pub fn run_id(&self) -> &str {
        self.token.run_id.as_str()
    }

    pub fn step_id(&self) -> &str {
        self.token.step_id.as_str()
    }

    /// The skill this attempt was dispatched for.
    pub fn skill(&self) -> &str {
        &self.skill
    }

    /// Stable across the attempts of one step: key side effects by it.
    pub fn idempotency_key(&self) -> &str {
        &self.idempotency_key
    }

    /// When the coordinator stops waiting for this attempt.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Resolves when the attempt is cancelled (run cancelled, attempt timed out, node draining
    /// past its grace period).
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await
    }

    /// Reports progress to the coordinator; dropped if the stream is busy.
    pub fn progress(&self, message: impl Into<String>, fraction: Option<f64>) {
        self.report(Report::Progress(Progress {
            message: message.into(),
            fraction,
        }));
    }

    /// Streams text the attempt produced (a model's tokens) to the run's watchers; dropped if
    /// the stream is busy (the result carries the whole text). Coalesce before calling: a
    /// frame per token is wasteful (`llm::DeltaBuffer` does it).
    pub fn delta(&self, text: impl Into<String>) {
        self.report(Report::Delta {
            text: text.into(),
            restart: false,
        });
    }

    /// As [`delta`](Self::delta), but what was streamed before is void (another model starts
    /// again): watchers drop it and start over with `text`.
    pub fn delta_restart(&self, text: impl Into<String>) {
        self.report(Report::Delta {
            text: text.into(),
            restart: true,
        });
    }

    /// Records a model call this attempt made (usage and cost): it travels with the
    /// attempt's result, failed or not, and the coordinator sums it per step and run. Calls
    /// to the same model are added up.
    pub fn record_usage(&self, usage: ModelUsage) {
        let mut all = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        match all
            .iter_mut()
            .find(|u| u.provider == usage.provider && u.model == usage.model)
        {
            Some(u) => {
                u.calls += usage.calls;
                u.input_tokens += usage.input_tokens;
                u.output_tokens += usage.output_tokens;
                u.cost_usd = match (u.cost_usd, usage.cost_usd) {
                    (Some(a), Some(b)) => Some(a + b),
                    _ => None,
                };
            }
            None => all.push(usage),
        }
    }

    /// Calls a skill of the mesh, as a model's tool does (docs/tools.md): the coordinator
    /// journals the call and dispatches it as a child task of this attempt's run, to an agent
    /// of the run's namespace with the skill; this waits for its output, until the attempt's
    /// deadline or its cancellation. A skill called this way cannot call skills itself.
    pub async fn call_skill(&self, skill: &str, input: Value) -> SkillOutcome {
        self.call_skill_as(&self.next_call_id(), skill, input).await
    }

    /// As [`call_skill`](Self::call_skill), under `call_id` (from
    /// [`new_call_id`](Self::new_call_id)): the id its approval was asked with, say.
    pub async fn call_skill_as(&self, call_id: &str, skill: &str, input: Value) -> SkillOutcome {
        let call_id = call_id.to_owned();
        self.ask(
            |reply| Report::SkillCall {
                call_id,
                skill: skill.to_owned(),
                input,
                reply,
            },
            &format!("skill `{skill}` did not answer"),
        )
        .await
    }

    /// Asks a person to approve the tool call `tool(arguments)` (a tool with `approval:
    /// true`, docs/tools.md): the run journals the request and shows the step awaiting
    /// approval with these exact arguments until someone approves or rejects it with the
    /// run's `Approve`/`Reject` (`mesh run approve|reject`), the attempt's deadline passes or
    /// it is cancelled.
    /// `call_id` names the call in the run's journal: one of [`new_call_id`](Self::new_call_id),
    /// given again to [`tool_used`](Self::tool_used) once the call is made.
    pub async fn ask_approval(
        &self,
        call_id: &str,
        tool: &str,
        arguments: Value,
    ) -> Result<ToolDecision, TaskError> {
        let call_id = call_id.to_owned();
        let answer = self
            .ask(
                |reply| Report::ToolApproval {
                    call_id,
                    tool: tool.to_owned(),
                    arguments,
                    reply,
                },
                &format!("tool `{tool}` was not decided on"),
            )
            .await?;
        let field = |k: &str| answer.get(k).and_then(Value::as_str).unwrap_or_default();
        Ok(ToolDecision {
            approved: answer.get("approved").and_then(Value::as_bool) == Some(true),
            comment: field("comment").to_owned(),
            by: field("by").to_owned(),
        })
    }

    /// Tells the run about a tool call this attempt made (not a skill call: those are
    /// journaled by the coordinator), once it returned; the run journals it. `result` is cut
    /// to its first 4 KiB. Dropped if the stream is busy, like progress.
    pub fn tool_used(&self, used: UsedTool<'_>) {
        let mut result = used.result.to_owned();
        if result.len() > MAX_TOOL_RESULT_BYTES {
            result = mesh_proto::convert::truncated(result, MAX_TOOL_RESULT_BYTES);
        }
        self.report(Report::ToolUsed {
            call_id: used.call_id.to_owned(),
            tool: used.tool.to_owned(),
            arguments: used.arguments.clone(),
            ok: used.ok,
            result,
            elapsed_ms: used.elapsed_ms,
        });
    }

    /// A new id for a call of this attempt, unique within it: `call-N`.
    pub fn new_call_id(&self) -> String {
        self.next_call_id()
    }

    fn next_call_id(&self) -> String {
        format!("call-{}", self.calls.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// Sends a report that the coordinator answers, and waits for the answer until the
    /// attempt's deadline or its cancellation.
    async fn ask(&self, report: impl FnOnce(SkillReply) -> Report, late: &str) -> SkillOutcome {
        let Some(tx) = &self.progress else {
            return Err(TaskError::new(
                "no_coordinator",
                "this attempt is not connected to a coordinator",
                false,
            ));
        };
        let (reply, answer) = oneshot::channel();
        let report = report(SkillReply(Arc::new(Mutex::new(Some(reply)))));
        let lost = || {
            TaskError::new(
                "connection_lost",
                "the node lost the coordinator before the call's answer",
                true,
            )
        };
        if tx.send((self.token.clone(), report)).await.is_err() {
            return Err(lost());
        }
        tokio::select! {
            outcome = answer => outcome.unwrap_or_else(|_| Err(lost())),
            _ = self.cancel.cancelled() => Err(TaskError::new("cancelled", "the attempt was cancelled while it waited", false)),
            _ = tokio::time::sleep_until(self.deadline) => Err(TaskError::new("timeout", format!("{late} before the attempt's deadline"), true)),
        }
    }

    /// What [`record_usage`](Self::record_usage) collected so far.
    pub fn usage(&self) -> Vec<ModelUsage> {
        self.usage.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn report(&self, report: Report) {
        if let Some(tx) = &self.progress {
            let _ = tx.try_send((self.token.clone(), report));
        }
    }
}
