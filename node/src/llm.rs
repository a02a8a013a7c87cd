//! The built-in `llm` agent: a step calls a model by naming it, configured, not coded.
//!
//! ```yaml
//! - id: draft
//!   uses: llm
//!   with:
//!     model: openai/gpt-4o-mini        # or models: [openai/gpt-4o-mini, ollama/llama3.2]
//!     system: "You are a careful editor."
//!     prompt: "Write three sentences about ${{ inputs.topic }}"
//!     max_tokens: 400
//!     temperature: 0.2
//!     api_key: ${{ secrets.OPENAI_API_KEY }}   # optional: a namespace secret, else the node's key
//! ```
//!
//! Its output: `text`, `provider`, `model`, `usage` (`input_tokens`, `output_tokens`),
//! `cost_usd` (null when the model's price is unknown), `finish_reason`, and `fallbacks`, the
//! models of a chain that failed before the one that answered, each with why.

use std::sync::Arc;
use std::time::Duration;

use mesh_agent_sdk::llm::{
    ChatModel, ChatReply, ChatRequest, DeltaBuffer, FallbackError, LlmError, Message, ModelRef,
    Prices, RetryPolicy, Streamed, ToolCall, Usage, chat_with_fallback, parse_models,
};
use mesh_agent_sdk::{Agent, AgentCard, AgentError, Context, ModelUsage};
use mesh_workflow::JsonSchema;
use serde_json::{Value, json};

use crate::builtins::ExecutionLog;
use crate::tools::{self, Declared, Tool};

/// Most output tokens a step may ask for.
const MAX_TOKENS: u64 = 1_000_000;
/// Most models in a fallback chain.
const MAX_CHAIN: usize = 8;
/// Text goes to watchers at most this often per attempt…
const DELTA_EVERY: Duration = Duration::from_millis(50);
/// …or when this much is held.
const DELTA_MAX_BYTES: usize = 16 * 1024;

pub struct LlmAgent {
    pub card: AgentCard,
    pub models: Arc<dyn ChatModel>,
    pub prices: Prices,
    pub retry: RetryPolicy,
    pub log: ExecutionLog,
    /// The client of HTTP tools.
    pub http: reqwest::Client,
    /// The node's MCP servers, which steps name.
    pub mcp: Arc<crate::mcp::Servers>,
    /// Where `code` tools run.
    pub sandbox: crate::sandbox::Sandbox,
    /// Messages sent to this agent, until a step with `inbox` takes them.
    pub inbox: Arc<Inbox>,
}

/// The messages an `llm` agent received (docs/messages.md), held on its node until a step
/// with `with.inbox` puts them before its prompt.
#[derive(Debug, Default)]
pub struct Inbox {
    held: std::sync::Mutex<std::collections::VecDeque<mesh_agent_sdk::Message>>,
    arrived: tokio::sync::Notify,
}

/// Most messages an `llm` agent holds; past it, a delivery fails and the coordinator holds the
/// message (and delivers it again later).
const INBOX: usize = 256;
/// The longest `with.inbox.wait`.
const MAX_INBOX_WAIT: Duration = Duration::from_secs(300);

impl Inbox {
    fn take(&self) -> Vec<mesh_agent_sdk::Message> {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect()
    }

    /// What the agent received so far; when nothing yet, what comes within `wait`.
    async fn take_within(&self, wait: Duration) -> Vec<mesh_agent_sdk::Message> {
        let until = tokio::time::Instant::now() + wait;
        loop {
            let arrived = self.arrived.notified();
            let got = self.take();
            if !got.is_empty() || tokio::time::Instant::now() >= until {
                return got;
            }
            let _ = tokio::time::timeout_at(until, arrived).await;
        }
    }
}

/// The messages a step read, before its prompt.
fn with_messages(prompt: &str, messages: &[mesh_agent_sdk::Message]) -> String {
    let mut text = String::from("Messages you received:\n");
    for m in messages {
        let body = match &m.payload["text"] {
            Value::String(t) => t.clone(),
            _ => m.payload.to_string(),
        };
        text.push_str(&format!("- from {}: {body}\n", m.from));
    }
    format!("{text}\n{prompt}")
}

/// A step's `with`, checked.
struct Call {
    chain: Vec<ModelRef>,
    request: ChatRequest,
    /// `response_schema`: the answer must be JSON matching it.
    schema: Option<(Value, JsonSchema)>,
    /// `tools`, offered to the model once opened, and `max_turns`, the most model calls of the
    /// attempt.
    declared: Declared,
    max_turns: u32,
    /// `inbox`: the messages received are put before the prompt; when none has come yet,
    /// the step waits for one this long.
    inbox: Option<Duration>,
}

/// One tool call done: what the model is told, and what the step's output records.
struct Called {
    for_model: String,
    journaled: Value,
}

/// Most model calls an attempt with tools makes when `max_turns` is not given, and the most
/// it may give.
const DEFAULT_MAX_TURNS: u32 = 8;
const MAX_TURNS: u32 = 64;
/// How much of a tool's answer the step's output keeps (the model gets all of it).
const RESULT_IN_OUTPUT: usize = 4 * 1024;

impl LlmAgent {
    /// Runs the call the model `asked` for (an unknown tool or bad arguments are told to the
    /// model), reporting it as progress; fails only when the attempt is cancelled meanwhile.
    async fn call_tool(
        &self,
        ctx: &Context,
        tools: &[Tool],
        asked: &ToolCall,
        turn: u32,
    ) -> Result<Called, AgentError> {
        ctx.progress(format!("turn {turn}: calling tool `{}`", asked.name), None);
        let began = std::time::Instant::now();
        let outcome = match tools.iter().find(|t| t.spec.name == asked.name) {
            None => tools::Outcome {
                ok: false,
                text: format!(
                    "there is no tool named `{}` (tools: {})",
                    asked.name,
                    tools
                        .iter()
                        .map(|t| t.spec.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            },
            Some(tool) => {
                let left = ctx
                    .deadline()
                    .saturating_duration_since(tokio::time::Instant::now());
                tokio::select! {
                    o = tool.call(ctx, &self.http, &self.sandbox, &asked.arguments, left) => o?,
                    _ = ctx.cancelled() => return Err(AgentError::fatal("cancelled", "the attempt was cancelled during a tool call")),
                }
            }
        };
        let kept = match outcome.text.char_indices().nth(RESULT_IN_OUTPUT) {
            Some((i, _)) => format!("{}…", &outcome.text[..i]),
            None => outcome.text.clone(),
        };
        let journaled = json!({
            "turn": turn,
            "tool": asked.name,
            "arguments": asked.arguments,
            "ok": outcome.ok,
            "result": kept,
            "elapsed_ms": began.elapsed().as_millis() as u64,
        });
        let for_model = if outcome.ok {
            outcome.text
        } else {
            format!("error: {}", outcome.text)
        };
        Ok(Called {
            for_model,
            journaled,
        })
    }
}

impl std::fmt::Debug for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Call")
            .field("chain", &self.chain)
            .field("request", &self.request)
            .field("schema", &self.schema.as_ref().map(|s| &s.0))
            .finish()
    }
}

/// The answer as JSON matching `schema`, or what is wrong with it.
fn check_answer(text: &str, schema: &JsonSchema) -> Result<Value, String> {
    let value: Value =
        serde_json::from_str(unfenced(text)).map_err(|e| format!("the answer is not JSON: {e}"))?;
    match schema.first_problem(&value) {
        None => Ok(value),
        Some((path, problem)) => Err(format!("json{path}: {problem}")),
    }
}

fn bad(field: &str, why: impl std::fmt::Display) -> AgentError {
    AgentError::bad_input(format!("with.{field}: {why}"))
}

fn read_call(with: &Value) -> Result<Call, AgentError> {
    let Some(obj) = with.as_object() else {
        return Err(AgentError::bad_input(
            "with: an llm step needs `model` (or `models`) and `prompt`",
        ));
    };
    const KNOWN: [&str; 11] = [
        "model",
        "models",
        "system",
        "prompt",
        "max_tokens",
        "temperature",
        "response_schema",
        "api_key",
        "tools",
        "max_turns",
        "inbox",
    ];
    tools::only_known(obj, &KNOWN, "")?;
    let names: Vec<String> = match (obj.get("model"), obj.get("models")) {
        (Some(_), Some(_)) => return Err(bad("models", "give `model` or `models`, not both")),
        (Some(Value::String(m)), None) => vec![m.clone()],
        (Some(_), None) => return Err(bad("model", "must be a string, `provider/model`")),
        (None, Some(Value::Array(list))) => list
            .iter()
            .enumerate()
            .map(|(i, m)| {
                m.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| bad(&format!("models[{i}]"), "must be a string"))
            })
            .collect::<Result<_, _>>()?,
        (None, Some(_)) => return Err(bad("models", "must be a list of `provider/model`")),
        (None, None) => {
            return Err(bad(
                "model",
                "required (`provider/model`, e.g. openai/gpt-4o-mini)",
            ));
        }
    };
    if names.len() > MAX_CHAIN {
        return Err(bad(
            "models",
            format!("{} models, the limit is {MAX_CHAIN}", names.len()),
        ));
    }
    let field = if obj.contains_key("models") {
        "models"
    } else {
        "model"
    };
    let chain = parse_models(&names).map_err(|e| {
        let e = e
            .strip_prefix("[0]: ")
            .filter(|_| field == "model")
            .unwrap_or(&e)
            .to_owned();
        bad(field, e)
    })?;
    let text = |name: &str| -> Result<Option<String>, AgentError> {
        match obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(bad(name, "must be a string")),
        }
    };
    let prompt = text("prompt")?.ok_or_else(|| bad("prompt", "required"))?;
    let max_tokens = match obj.get("max_tokens") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=MAX_TOKENS).contains(&n) => Some(n as u32),
            _ => {
                return Err(bad(
                    "max_tokens",
                    format!("must be a whole number from 1 to {MAX_TOKENS}"),
                ));
            }
        },
    };
    let temperature = match obj.get("temperature") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_f64() {
            Some(t) if (0.0..=2.0).contains(&t) => Some(t),
            _ => return Err(bad("temperature", "must be a number from 0 to 2")),
        },
    };
    let schema = match obj.get("response_schema") {
        None | Some(Value::Null) => None,
        Some(s) => Some((
            s.clone(),
            JsonSchema::compile(s).map_err(|e| bad("response_schema", e))?,
        )),
    };
    let api_key = text("api_key")?
        .filter(|k| !k.is_empty())
        .map(mesh_agent_sdk::llm::Secret::new);
    let system = text("system")?;
    let system = match &schema {
        Some((s, _)) => Some(format!(
            "{}Answer with JSON only, matching this JSON Schema: {s}",
            system.map(|t| format!("{t}\n\n")).unwrap_or_default()
        )),
        None => system,
    };
    let declared = tools::read_tools(obj.get("tools"))?;
    let max_turns = match obj.get("max_turns") {
        None | Some(Value::Null) => DEFAULT_MAX_TURNS,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=u64::from(MAX_TURNS)).contains(&n) => n as u32,
            _ => {
                return Err(bad(
                    "max_turns",
                    format!("must be a whole number from 1 to {MAX_TURNS}"),
                ));
            }
        },
    };
    let inbox = match obj.get("inbox") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => None,
        Some(Value::Bool(true)) => Some(Duration::ZERO),
        Some(Value::Object(o)) => {
            tools::only_known(o, &["wait"], "inbox")?;
            let wait = match o.get("wait") {
                None => Duration::ZERO,
                Some(Value::String(w)) => humantime::parse_duration(w)
                    .ok()
                    .filter(|w| *w <= MAX_INBOX_WAIT)
                    .ok_or_else(|| bad("inbox.wait", "a duration up to 5m, like `10s`"))?,
                Some(_) => return Err(bad("inbox.wait", "a duration up to 5m, like `10s`")),
            };
            Some(wait)
        }
        Some(_) => return Err(bad("inbox", "true, or a map with `wait`")),
    };
    Ok(Call {
        inbox,
        chain,
        schema,
        request: ChatRequest {
            system,
            messages: vec![Message::user(prompt)],
            tools: Vec::new(),
            max_tokens,
            temperature,
            timeout: None,
            api_key,
        },
        declared,
        max_turns,
    })
}

/// Puts a step's memory (docs/memory.md) before its prompt: entries saved by earlier `llm`
/// steps (`{prompt, text}`) as the exchanges they were, any other value in the system prompt.
fn remember(request: &mut ChatRequest, entries: &Value) {
    let Some(entries) = entries.as_array().filter(|e| !e.is_empty()) else {
        return;
    };
    let mut exchanges = Vec::new();
    let mut facts = Vec::new();
    for entry in entries {
        let value = &entry["value"];
        match (value["prompt"].as_str(), value["text"].as_str()) {
            (Some(prompt), Some(text)) => {
                exchanges.push(Message::user(prompt));
                exchanges.push(Message::assistant(text));
            }
            _ => facts.push(format!("- {value}")),
        }
    }
    if !facts.is_empty() {
        let known = format!("What you remember:\n{}", facts.join("\n"));
        request.system = Some(match request.system.take() {
            Some(s) => format!("{s}\n\n{known}"),
            None => known,
        });
    }
    exchanges.append(&mut request.messages);
    request.messages = exchanges;
}

/// The agent's error for a chain that did not answer: retryable when the last failure was
/// transient (the step's retry policy decides), not when the request or the key is wrong.
fn failure(e: &FallbackError) -> AgentError {
    let message = e.to_string();
    match e.last() {
        Some(last) if last.falls_back() => AgentError::retryable(last.code(), message),
        Some(last) => AgentError::fatal(last.code(), message),
        None => AgentError::fatal("no_model", "no model was asked"),
    }
}

/// Records an answered call's usage and cost with the attempt (journaled with its result,
/// summed by the coordinator) and in the node's metrics; returns them.
fn account(ctx: &Context, prices: &Prices, reply: &ChatReply) -> (Usage, Option<f64>) {
    let usage = reply.usage.unwrap_or_default();
    let cost = reply.usage.and_then(|u| prices.cost(&reply.model, u));
    ctx.record_usage(ModelUsage {
        provider: reply.model.provider.as_str().to_owned(),
        model: reply.model.model.clone(),
        calls: 1,
        input_tokens: usage.input_tokens,
        output_tokens: usage.output_tokens,
        cost_usd: cost,
    });
    mesh_agent_sdk::metrics::record_llm_call(
        reply.model.provider.as_str(),
        &reply.model.model,
        usage.input_tokens,
        usage.output_tokens,
        cost,
    );
    (usage, cost)
}

fn failed_json(error: &LlmError) -> Value {
    json!({ "code": error.code(), "message": error.to_string() })
}

impl Agent for LlmAgent {
    fn card(&self) -> AgentCard {
        self.card.clone()
    }

    async fn on_message(
        &self,
        _mail: mesh_agent_sdk::Mail,
        message: mesh_agent_sdk::Message,
    ) -> Result<(), AgentError> {
        let mut held = self.inbox.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.len() >= INBOX {
            return Err(AgentError::retryable(
                "inbox_full",
                format!(
                    "agent `{}` holds {INBOX} messages no step took",
                    self.card.name
                ),
            ));
        }
        held.push_back(message);
        drop(held);
        self.inbox.arrived.notify_waiters();
        Ok(())
    }

    async fn handle(&self, ctx: Context, input: Value) -> Result<Value, AgentError> {
        self.log.record(&self.card.name, &ctx);
        let mut call = read_call(&input["with"])?;
        if let Some(wait) = call.inbox {
            let messages = tokio::select! {
                m = self.inbox.take_within(wait) => m,
                _ = ctx.cancelled() => return Err(AgentError::fatal("cancelled", "the attempt was cancelled")),
            };
            if !messages.is_empty()
                && let Some(first) = call.request.messages.first_mut()
            {
                first.text = with_messages(&first.text, &messages);
            }
        }
        remember(&mut call.request, &input["memory"]["entries"]);
        let left = ctx
            .deadline()
            .saturating_duration_since(tokio::time::Instant::now());
        let toolbox = std::mem::take(&mut call.declared)
            .open(&self.mcp, left)
            .await?;
        call.request.tools = toolbox.tools.iter().map(|t| t.spec.clone()).collect();
        let answer = self.converse(&ctx, call, &toolbox.tools).await;
        toolbox.close().await;
        answer
    }
}

impl LlmAgent {
    /// The attempt's conversation: model calls and the tool calls they ask for, in turns, then
    /// the answer (checked against `response_schema` when the step gives one).
    async fn converse(
        &self,
        ctx: &Context,
        mut call: Call,
        tools: &[Tool],
    ) -> Result<Value, AgentError> {
        let ctx = ctx.clone();
        // Text reaches the run's watchers as it comes, at most every 50 ms per attempt.
        let mut buffer = DeltaBuffer::new(DELTA_EVERY, DELTA_MAX_BYTES);
        let mut usage = Usage::default();
        let mut cost = Some(0.0);
        let mut transcript = Vec::new();
        let mut turn = 0;
        let fallen = loop {
            turn += 1;
            let left = ctx
                .deadline()
                .saturating_duration_since(tokio::time::Instant::now());
            call.request.timeout = Some(left.max(Duration::from_millis(1)));
            let outcome = {
                let mut hear = |heard: Streamed| match heard {
                    Streamed::Delta(text) => {
                        if let Some(out) = buffer.push(&text, std::time::Instant::now()) {
                            ctx.delta(out);
                        }
                    }
                    Streamed::Restart { .. } => {
                        buffer.clear();
                        ctx.delta_restart("");
                    }
                };
                tokio::select! {
                    r = chat_with_fallback(self.models.as_ref(), &call.chain, &call.request, self.retry, &mut hear) => r,
                    _ = ctx.cancelled() => return Err(AgentError::fatal("cancelled", "the call was cancelled")),
                }
            };
            if let Some(rest) = buffer.flush() {
                ctx.delta(rest);
            }
            let fallen = outcome.map_err(|e| failure(&e))?;
            let (u, c) = account(&ctx, &self.prices, &fallen.reply);
            usage += u;
            cost = cost.zip(c).map(|(a, b)| a + b);
            if fallen.reply.tool_calls.is_empty() {
                break fallen;
            }
            if turn >= call.max_turns {
                return Err(AgentError::fatal(
                    "max_turns",
                    format!(
                        "the model still asked for tools after {turn} turns (with.max_turns: {})",
                        call.max_turns
                    ),
                ));
            }
            let reply = fallen.reply;
            call.request.messages.push(Message::assistant_calls(
                reply.text.clone(),
                reply.tool_calls.clone(),
            ));
            for asked in &reply.tool_calls {
                let entry = self.call_tool(&ctx, tools, asked, turn).await?;
                call.request
                    .messages
                    .push(Message::tool_result(asked.id.clone(), entry.for_model));
                transcript.push(entry.journaled);
            }
        };
        let reply = &fallen.reply;
        let mut text = reply.text.clone();
        let mut parsed = None;
        if let Some((_, schema)) = &call.schema {
            // Checked, and asked again once with what is wrong.
            let answer = match check_answer(&text, schema) {
                Ok(v) => Ok(v),
                Err(problem) => {
                    let mut again = call.request.clone();
                    again.messages.push(Message::assistant(text.clone()));
                    again.messages.push(Message::user(format!(
                        "That answer is invalid: {problem}. Answer again with corrected JSON only."
                    )));
                    let second = chat_with_fallback(
                        self.models.as_ref(),
                        &call.chain,
                        &again,
                        self.retry,
                        &mut |_| {},
                    )
                    .await
                    .map_err(|e| failure(&e))?;
                    let (u, c) = account(&ctx, &self.prices, &second.reply);
                    usage += u;
                    cost = cost.zip(c).map(|(a, b)| a + b);
                    text = second.reply.text.clone();
                    ctx.delta_restart(text.clone());
                    check_answer(&text, schema)
                }
            };
            parsed = Some(answer.map_err(|p| {
                AgentError::fatal(
                    "invalid_answer",
                    format!(
                        "the answer still does not match response_schema after one correction: {p}"
                    ),
                )
            })?);
        }
        let prompt = call
            .request
            .messages
            .iter()
            .rev()
            .find(|m| m.role == mesh_agent_sdk::llm::Role::User && m.tool_call_id.is_none())
            .map(|m| m.text.clone())
            .unwrap_or_default();
        Ok(json!({
            "json": parsed,
            "text": text,
            // What a step with `memory` saves: this exchange, for the next run's prompt.
            "remember": { "prompt": prompt, "text": text },
            "provider": reply.model.provider.as_str(),
            "model": reply.model.model,
            "usage": { "input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens },
            "usage_reported": reply.usage.is_some(),
            "cost_usd": cost,
            "finish_reason": reply.finish_reason,
            "turns": turn,
            "tool_calls": transcript,
            "rate_limited": fallen.rate_limited,
            "fallbacks": fallen.earlier.iter().map(|a| json!({
                "model": a.model.to_string(),
                "error": failed_json(&a.error),
                "rate_limited": a.rate_limited,
            })).collect::<Vec<_>>(),
        }))
    }
}

/// How the planner asks for a workflow.
const PLANNER_SYSTEM: &str = "You turn an objective into a workflow for an agent mesh. Answer \
with one JSON object and nothing else: {\"steps\": [{\"id\": \"...\", \"uses\": \"SKILL\", \
\"with\": {...}, \"needs\": [\"earlier step id\"]}]}. Ids are letters, digits, `_` or `-`. \
Use the skill `llm` for thinking and writing steps, with `with: {\"model\": \"MODEL\", \
\"prompt\": \"...\"}`; a prompt may read an earlier step's text as ${{ steps.ID.output.text }}.";

/// Serves `plan`: a model writes a text goal's workflow. The answer is checked as the
/// coordinator will check it; an invalid one is asked again once with the problems, then
/// fails for good naming them.
pub struct LlmPlanner {
    pub card: AgentCard,
    pub models: Arc<dyn ChatModel>,
    pub chain: Vec<ModelRef>,
    pub prices: Prices,
    pub log: ExecutionLog,
}

/// The JSON of an answer, without the Markdown fence a model may put around it.
fn unfenced(text: &str) -> &str {
    let t = text.trim();
    let t = t
        .strip_prefix("```json")
        .or_else(|| t.strip_prefix("```"))
        .unwrap_or(t);
    t.strip_suffix("```").unwrap_or(t).trim()
}

/// Whether `text` is a workflow the coordinator will take; the problems when not.
fn check_plan(text: &str) -> Result<(), String> {
    let limits = mesh_workflow::Limits::default();
    let def = mesh_workflow::parse(unfenced(text), &limits).map_err(|e| e.to_string())?;
    mesh_workflow::validate(def, &limits)
        .map(drop)
        .map_err(|e| e.to_string())
}

impl LlmPlanner {
    async fn ask(&self, ctx: &Context, request: &ChatRequest) -> Result<String, AgentError> {
        let fallen = chat_with_fallback(
            self.models.as_ref(),
            &self.chain,
            request,
            RetryPolicy::default(),
            &mut |_| {},
        )
        .await
        .map_err(|e| failure(&e))?;
        account(ctx, &self.prices, &fallen.reply);
        Ok(fallen.reply.text)
    }
}

impl Agent for LlmPlanner {
    fn card(&self) -> AgentCard {
        self.card.clone()
    }

    async fn handle(&self, ctx: Context, input: Value) -> Result<Value, AgentError> {
        self.log.record(&self.card.name, &ctx);
        let objective = input["with"]["objective"]
            .as_str()
            .ok_or_else(|| AgentError::bad_input("with.objective: required, a string"))?;
        let model = self
            .chain
            .first()
            .map(ToString::to_string)
            .unwrap_or_default();
        let left = ctx
            .deadline()
            .saturating_duration_since(tokio::time::Instant::now());
        let mut request = ChatRequest {
            system: Some(PLANNER_SYSTEM.replace("MODEL", &model)),
            messages: vec![Message::user(objective)],
            tools: Vec::new(),
            max_tokens: Some(4096),
            temperature: Some(0.0),
            timeout: Some(left.max(Duration::from_millis(1))),
            api_key: None,
        };
        let first = self.ask(&ctx, &request).await?;
        let problems = match check_plan(&first) {
            Ok(()) => return Ok(json!({ "workflow": unfenced(&first) })),
            Err(p) => p,
        };
        request.messages.push(Message::assistant(first));
        request.messages.push(Message::user(format!(
            "That workflow is invalid: {problems}. Answer again with the corrected JSON only."
        )));
        let second = self.ask(&ctx, &request).await?;
        match check_plan(&second) {
            Ok(()) => Ok(json!({ "workflow": unfenced(&second) })),
            Err(p) => Err(AgentError::fatal(
                "invalid_plan",
                format!("the model's workflow is still invalid after one correction: {p}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_agent_sdk::llm::Provider;

    #[test]
    fn a_step_names_its_model_and_prompt_and_bad_fields_are_named() {
        let call = read_call(&json!({
            "model": "openai/gpt-4o-mini", "system": "terse", "prompt": "hi",
            "max_tokens": 400, "temperature": 0.2,
        }))
        .unwrap();
        assert_eq!(call.chain.len(), 1);
        assert_eq!(call.chain[0].provider, Provider::OpenAi);
        assert_eq!(call.request.system.as_deref(), Some("terse"));
        assert_eq!(call.request.messages, vec![Message::user("hi")]);
        assert_eq!(call.request.max_tokens, Some(400));
        let chain =
            read_call(&json!({ "models": ["ollama/a", "anthropic/b"], "prompt": "x" })).unwrap();
        assert_eq!(chain.chain.len(), 2);
        let err = |with: Value| read_call(&with).unwrap_err().message;
        assert_eq!(
            err(json!({ "prompt": "x" })),
            "with.model: required (`provider/model`, e.g. openai/gpt-4o-mini)"
        );
        assert!(
            err(json!({ "model": "gpt-4o", "prompt": "x" }))
                .starts_with("with.model: `gpt-4o` is not `provider/model`")
        );
        assert!(
            err(json!({ "models": ["ollama/a", 3], "prompt": "x" }))
                .starts_with("with.models[1]: must be a string")
        );
        assert!(
            err(json!({ "models": ["ollama/a", "azure/b"], "prompt": "x" }))
                .starts_with("with.models: [1]: `azure` is not a provider")
        );
        assert_eq!(err(json!({ "model": "ollama/a" })), "with.prompt: required");
        assert!(
            err(json!({ "model": "ollama/a", "prompt": "x", "max_tokens": 0 }))
                .starts_with("with.max_tokens:")
        );
        assert!(
            err(json!({ "model": "ollama/a", "prompt": "x", "temperature": 3 }))
                .starts_with("with.temperature:")
        );
        assert!(
            err(json!({ "model": "ollama/a", "prompt": "x", "promt": "y" }))
                .starts_with("with.promt: unknown field")
        );
        assert!(
            err(json!({ "model": "ollama/a", "models": [], "prompt": "x" })).contains("not both")
        );
    }

    #[test]
    fn a_chain_that_ends_on_a_transient_failure_is_retryable_and_on_a_key_is_not() {
        let attempt = |error: LlmError| mesh_agent_sdk::llm::Attempted {
            model: ModelRef::parse("ollama/a").unwrap(),
            error,
            rate_limited: 0,
        };
        let transient = FallbackError {
            attempts: vec![attempt(LlmError::Unavailable {
                model: "ollama/a".into(),
                message: "HTTP 500".into(),
            })],
        };
        let e = failure(&transient);
        assert!(e.retryable);
        assert_eq!(e.code, "unavailable");
        let key = FallbackError {
            attempts: vec![attempt(LlmError::Auth {
                model: "ollama/a".into(),
                message: "HTTP 401".into(),
            })],
        };
        let e = failure(&key);
        assert!(!e.retryable);
        assert_eq!(e.code, "auth");
    }
}
