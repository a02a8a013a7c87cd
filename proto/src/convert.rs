//! Conversions between [`crate::pb`] and [`crate::domain`].
//!
//! Everything that comes off the wire goes through a `TryFrom` that checks it and, when it
//! is wrong, names the offending field (`steps[2].needs[0]`).

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

use crate::domain::*;
use crate::pb;

/// Most steps one goal may carry, whether as `steps`, a `workflow` or a `workflow_ref`
/// (the workflow language's `max_steps` is the same).
pub const MAX_STEPS: usize = 10_000;
/// Largest JSON document accepted in one field.
pub const MAX_JSON_BYTES: usize = 1024 * 1024;
/// Longest id (step, run, node, agent name).
pub const MAX_ID_LEN: usize = 128;
/// Deepest nesting of a JSON value the coordinator accepts: goal inputs, a step's `with`,
/// a signal's payload, an agent's output. The workflow language's `max_depth` is the same.
pub const MAX_JSON_DEPTH: usize = 32;
/// Longest idempotency key, in bytes; any printable ASCII is allowed.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// A field of a request that is missing or wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

type Result<T, E = FieldError> = std::result::Result<T, E>;

/// Checks an id: 1..=128 characters from `[A-Za-z0-9_.:-]`.
pub fn check_id(field: &str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if value.len() > MAX_ID_LEN {
        return Err(FieldError::new(
            field,
            format!("is {} bytes long, the limit is {MAX_ID_LEN}", value.len()),
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':')))
    {
        return Err(FieldError::new(
            field,
            format!("contains {c:?}; use letters, digits, '_', '-', '.' or ':'"),
        ));
    }
    Ok(())
}

/// Checks a call id of an attempt (skill calls, tool approvals): 1 to 64 letters, digits, `_`
/// or `-`.
pub fn check_call_id(field: &str, value: &str) -> Result<()> {
    let valid = !value.is_empty()
        && value.len() <= 64
        && value
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-');
    if valid {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            "1 to 64 letters, digits, `_` or `-`",
        ))
    }
}

/// Checks a tool's name as a model sees it: 1 to 128 bytes, no control characters (MCP
/// servers name their tools more freely than ids allow).
pub fn check_tool_name(field: &str, value: &str) -> Result<()> {
    if value.is_empty() || value.len() > MAX_ID_LEN || value.chars().any(char::is_control) {
        return Err(FieldError::new(
            field,
            format!("1 to {MAX_ID_LEN} bytes without control characters"),
        ));
    }
    Ok(())
}

/// Most topics one agent subscribes to.
pub const MAX_TOPICS: usize = 32;
/// Largest message payload, as JSON.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// An agent's error from the wire, its code and message cut to their limits.
fn task_error_from_pb(e: pb::TaskError) -> TaskError {
    TaskError {
        code: truncated(e.code, MAX_ID_LEN),
        message: truncated(e.message, MAX_ERROR_MESSAGE),
        retryable: e.retryable,
    }
}

fn task_error_to_pb(e: TaskError) -> pb::TaskError {
    pb::TaskError {
        code: e.code,
        message: e.message,
        retryable: e.retryable,
    }
}

/// A message's payload: JSON of at most [`MAX_MESSAGE_BYTES`].
fn message_payload(field: &str, json: &str) -> Result<Value> {
    if json.len() > MAX_MESSAGE_BYTES {
        return Err(FieldError::new(
            field,
            format!("is {} bytes, the limit is {MAX_MESSAGE_BYTES}", json.len()),
        ));
    }
    parse_json_deep(field, json, Value::Null)
}

/// Longest error message from an agent that is kept; a longer one is cut.
pub const MAX_ERROR_MESSAGE: usize = 4096;
/// Most text in one delta frame; agents coalesce deltas well below it.
pub const MAX_DELTA_BYTES: usize = 64 * 1024;

/// `text` cut to at most `max` bytes (on a character boundary), saying so.
pub fn truncated(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str(" … (truncated)");
    }
    text
}

/// Checks an idempotency key: 1..=255 bytes of printable ASCII (so base64 keys and
/// `tenant/order-42` are fine).
pub fn check_idempotency_key(field: &str, key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if key.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err(FieldError::new(
            field,
            format!(
                "is {} bytes long, the limit is {MAX_IDEMPOTENCY_KEY_LEN}",
                key.len()
            ),
        ));
    }
    if let Some(c) = key.chars().find(|c| !matches!(c, ' '..='~')) {
        return Err(FieldError::new(
            field,
            format!("contains {c:?}; use printable ASCII"),
        ));
    }
    Ok(())
}

/// Parses JSON text that the coordinator accepts; empty text is `default`. Refused: more
/// than [`MAX_JSON_BYTES`], or nested deeper than [`MAX_JSON_DEPTH`].
pub fn parse_json(field: &str, text: &str, default: Value) -> Result<Value> {
    let value = parse_json_deep(field, text, default)?;
    let depth = json_depth(&value);
    if depth > MAX_JSON_DEPTH {
        return Err(FieldError::new(
            field,
            format!("is nested {depth} levels deep, the limit is {MAX_JSON_DEPTH}"),
        ));
    }
    Ok(value)
}

/// Parses JSON text without the depth limit (serde_json still stops at 128 levels): for
/// what the coordinator made itself from values it had checked, such as a task's input.
pub fn parse_json_deep(field: &str, text: &str, default: Value) -> Result<Value> {
    if text.is_empty() {
        return Ok(default);
    }
    if text.len() > MAX_JSON_BYTES {
        return Err(FieldError::new(
            field,
            format!("is {} bytes, the limit is {MAX_JSON_BYTES}", text.len()),
        ));
    }
    serde_json::from_str(text).map_err(|e| FieldError::new(field, format!("invalid JSON: {e}")))
}

/// Levels of nesting of a JSON value: a scalar is 0, `[]` and `{}` are 1.
pub fn json_depth(value: &Value) -> usize {
    // Iterative: the value may come from anywhere, and is at most 128 levels deep anyway.
    let mut deepest = 0;
    let mut todo = vec![(value, 0usize)];
    while let Some((v, depth)) = todo.pop() {
        match v {
            Value::Array(a) => {
                deepest = deepest.max(depth + 1);
                todo.extend(a.iter().map(|x| (x, depth + 1)));
            }
            Value::Object(o) => {
                deepest = deepest.max(depth + 1);
                todo.extend(o.values().map(|x| (x, depth + 1)));
            }
            _ => {}
        }
    }
    deepest
}

/// The fencing token of a task frame, if it has a readable one: a node that cannot read
/// the rest of the task still answers for that attempt.
pub fn task_token(frame: &pb::CoordinatorFrame) -> Option<FencingToken> {
    match &frame.kind {
        Some(pb::coordinator_frame::Kind::Task(t)) => FencingToken::try_from(t.token.clone()).ok(),
        _ => None,
    }
}

fn to_json(value: &Value) -> String {
    value.to_string()
}

fn opt_json(value: &Option<Value>) -> String {
    value.as_ref().map(to_json).unwrap_or_default()
}

/// `NAME@VERSION` or `NAME`: the name and, when given, the version.
pub fn parse_workflow_ref(reference: &str) -> Result<(String, Option<u32>)> {
    let (name, version) = match reference.split_once('@') {
        Some((name, v)) => {
            let v = v.parse::<u32>().ok().filter(|&v| v > 0).ok_or_else(|| {
                FieldError::new(
                    "workflow_ref",
                    format!("`{reference}`: the version must be a whole number from 1"),
                )
            })?;
            (name, Some(v))
        }
        None => (reference, None),
    };
    check_id("workflow_ref", name)?;
    Ok((name.to_owned(), version))
}

impl GoalSpec {
    /// Checks the step graph: ids, skills, dangling `needs`, cycles and limits.
    pub fn validate(&self) -> Result<()> {
        if !self.inputs.is_object() {
            return Err(FieldError::new("inputs", "must be a JSON object"));
        }
        if let Some(key) = &self.idempotency_key {
            check_idempotency_key("idempotency_key", key)?;
        }
        let given = usize::from(!self.steps.is_empty())
            + usize::from(self.workflow.is_some())
            + usize::from(self.workflow_ref.is_some());
        if given > 1 {
            return Err(FieldError::new(
                "workflow",
                "give one of `steps`, `workflow` and `workflow_ref`",
            ));
        }
        if let Some(reference) = &self.workflow_ref {
            parse_workflow_ref(reference)?;
            return Ok(());
        }
        if let Some(workflow) = &self.workflow {
            if workflow.len() > MAX_JSON_BYTES {
                return Err(FieldError::new(
                    "workflow",
                    format!("is {} bytes, the limit is {MAX_JSON_BYTES}", workflow.len()),
                ));
            }
            return Ok(());
        }
        if self.steps.is_empty() {
            if self.objective.trim().is_empty() {
                return Err(FieldError::new(
                    "steps",
                    "a goal needs steps, a workflow, a workflow_ref, or an objective for a planner",
                ));
            }
            // A text goal: a planner agent writes its workflow.
            return Ok(());
        }
        if self.steps.len() > MAX_STEPS {
            return Err(FieldError::new(
                "steps",
                format!("has {} steps, the limit is {MAX_STEPS}", self.steps.len()),
            ));
        }
        let mut index: HashMap<&StepId, usize> = HashMap::with_capacity(self.steps.len());
        for (i, step) in self.steps.iter().enumerate() {
            check_id(&format!("steps[{i}].id"), step.id.as_str())?;
            check_id(&format!("steps[{i}].uses"), &step.uses)?;
            if let Some(first) = index.insert(&step.id, i) {
                return Err(FieldError::new(
                    format!("steps[{i}].id"),
                    format!("duplicate id `{}`, first used by steps[{first}]", step.id),
                ));
            }
        }
        for (i, step) in self.steps.iter().enumerate() {
            for (j, need) in step.needs.iter().enumerate() {
                if !index.contains_key(need) {
                    return Err(FieldError::new(
                        format!("steps[{i}].needs[{j}]"),
                        format!("unknown step `{need}`"),
                    ));
                }
                if need == &step.id {
                    return Err(FieldError::new(
                        format!("steps[{i}].needs[{j}]"),
                        "a step cannot need itself",
                    ));
                }
            }
        }
        if let Some(i) = first_step_in_cycle(&self.steps, &index) {
            return Err(FieldError::new(
                format!("steps[{i}].needs"),
                format!("step `{}` is part of a dependency cycle", self.steps[i].id),
            ));
        }
        Ok(())
    }
}

/// Kahn's algorithm; returns the index of a step that never becomes ready.
fn first_step_in_cycle(steps: &[StepSpec], index: &HashMap<&StepId, usize>) -> Option<usize> {
    let mut missing: Vec<usize> = steps.iter().map(|s| s.needs.len()).collect();
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); steps.len()];
    for (i, step) in steps.iter().enumerate() {
        for need in &step.needs {
            dependents[index[need]].push(i);
        }
    }
    let mut ready: Vec<usize> = (0..steps.len()).filter(|&i| missing[i] == 0).collect();
    let mut done = 0;
    while let Some(i) = ready.pop() {
        done += 1;
        for &d in &dependents[i] {
            missing[d] -= 1;
            if missing[d] == 0 {
                ready.push(d);
            }
        }
    }
    (done < steps.len()).then(|| missing.iter().position(|&m| m > 0))?
}

impl TryFrom<pb::SubmitGoalRequest> for GoalSpec {
    type Error = FieldError;

    fn try_from(req: pb::SubmitGoalRequest) -> Result<Self> {
        let inputs = parse_json(
            "inputs_json",
            &req.inputs_json,
            Value::Object(Default::default()),
        )?;
        if req.steps.len() > MAX_STEPS {
            return Err(FieldError::new(
                "steps",
                format!("has {} steps, the limit is {MAX_STEPS}", req.steps.len()),
            ));
        }
        let steps = req
            .steps
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                Ok(StepSpec {
                    id: StepId(s.id),
                    uses: s.uses,
                    with: parse_json(
                        &format!("steps[{i}].with_json"),
                        &s.with_json,
                        Value::Object(Default::default()),
                    )?,
                    needs: s.needs.into_iter().map(StepId).collect(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let goal = GoalSpec {
            objective: req.objective,
            inputs,
            steps,
            workflow: (!req.workflow.is_empty()).then_some(req.workflow),
            workflow_ref: (!req.workflow_ref.is_empty()).then_some(req.workflow_ref),
            idempotency_key: (!req.idempotency_key.is_empty()).then_some(req.idempotency_key),
            budget: req.budget.map(|b| budget("budget", b)).transpose()?,
            namespace: Default::default(),
        };
        goal.validate()?;
        Ok(goal)
    }
}

impl From<GoalSpec> for pb::SubmitGoalRequest {
    fn from(g: GoalSpec) -> Self {
        pb::SubmitGoalRequest {
            objective: g.objective,
            inputs_json: to_json(&g.inputs),
            steps: g
                .steps
                .into_iter()
                .map(|s| pb::StepSpec {
                    id: s.id.0,
                    uses: s.uses,
                    with_json: if s.with.is_null() {
                        String::new()
                    } else {
                        to_json(&s.with)
                    },
                    needs: s.needs.into_iter().map(|n| n.0).collect(),
                })
                .collect(),
            idempotency_key: g.idempotency_key.unwrap_or_default(),
            workflow: g.workflow.unwrap_or_default(),
            workflow_ref: g.workflow_ref.unwrap_or_default(),
            budget: g.budget.map(Into::into),
        }
    }
}

/// Parses and checks a run id field.
pub fn run_id(field: &str, value: String) -> Result<RunId> {
    check_id(field, &value)?;
    Ok(RunId(value))
}

// ---------------------------------------------------------------- tokens and cards

/// What joins a step's id and a skill call's in the token of the call's child task.
pub const SKILL_CALL_MARK: char = '~';

impl TryFrom<Option<pb::FencingToken>> for FencingToken {
    type Error = FieldError;

    fn try_from(t: Option<pb::FencingToken>) -> Result<Self> {
        let t = t.ok_or_else(|| FieldError::new("token", "missing"))?;
        check_id("token.run_id", &t.run_id)?;
        // `STEP~CALL` is the child task of a skill call an attempt of STEP made: `~` is in
        // no workflow's step id, so the two never meet.
        match t.step_id.split_once(SKILL_CALL_MARK) {
            Some((step, call)) => {
                check_id("token.step_id", step)?;
                check_id("token.step_id", call)?;
            }
            None => check_id("token.step_id", &t.step_id)?,
        }
        if t.attempt == 0 {
            return Err(FieldError::new("token.attempt", "attempts count from 1"));
        }
        Ok(FencingToken {
            run_id: RunId(t.run_id),
            step_id: StepId(t.step_id),
            attempt: t.attempt,
            epoch: t.epoch,
            index: t.index,
        })
    }
}

impl From<FencingToken> for pb::FencingToken {
    fn from(t: FencingToken) -> Self {
        pb::FencingToken {
            run_id: t.run_id.0,
            step_id: t.step_id.0,
            attempt: t.attempt,
            epoch: t.epoch,
            index: t.index,
        }
    }
}

fn schema(field: &str, text: &str) -> Result<Option<Value>> {
    Ok(if text.is_empty() {
        None
    } else {
        Some(parse_json(field, text, Value::Null)?)
    })
}

fn card_from_pb(i: usize, c: pb::AgentCard) -> Result<AgentCard> {
    let at = |f: &str| format!("register.agents[{i}].{f}");
    check_id(&at("name"), &c.name)?;
    if c.max_concurrency == 0 {
        return Err(FieldError::new(at("max_concurrency"), "must be at least 1"));
    }
    if c.skills.is_empty() {
        return Err(FieldError::new(
            at("skills"),
            "an agent needs at least one skill",
        ));
    }
    let skills = c
        .skills
        .into_iter()
        .enumerate()
        .map(|(j, s)| {
            check_id(&at(&format!("skills[{j}].name")), &s.name)?;
            Ok(SkillSpec {
                input_schema: schema(
                    &at(&format!("skills[{j}].input_schema_json")),
                    &s.input_schema_json,
                )?,
                output_schema: schema(
                    &at(&format!("skills[{j}].output_schema_json")),
                    &s.output_schema_json,
                )?,
                name: s.name,
                description: s.description,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if c.topics.len() > MAX_TOPICS {
        return Err(FieldError::new(
            at("topics"),
            format!("{} topics, the limit is {MAX_TOPICS}", c.topics.len()),
        ));
    }
    for (j, t) in c.topics.iter().enumerate() {
        check_id(&at(&format!("topics[{j}]")), t)?;
    }
    Ok(AgentCard {
        name: c.name,
        version: c.version,
        description: c.description,
        skills,
        labels: c.labels.into_iter().collect(),
        max_concurrency: c.max_concurrency,
        inbox: c.inbox,
        topics: c.topics,
    })
}

impl From<AgentCard> for pb::AgentCard {
    fn from(c: AgentCard) -> Self {
        pb::AgentCard {
            name: c.name,
            version: c.version,
            description: c.description,
            skills: c.skills.into_iter().map(Into::into).collect(),
            labels: c.labels.into_iter().collect(),
            max_concurrency: c.max_concurrency,
            inbox: c.inbox,
            topics: c.topics,
        }
    }
}

impl From<SkillSpec> for pb::Skill {
    fn from(s: SkillSpec) -> Self {
        pb::Skill {
            name: s.name,
            description: s.description,
            input_schema_json: opt_json(&s.input_schema),
            output_schema_json: opt_json(&s.output_schema),
        }
    }
}

/// A skill as the coordinator describes it (checked when its agent registered).
impl From<pb::Skill> for SkillSpec {
    fn from(s: pb::Skill) -> Self {
        SkillSpec {
            name: s.name,
            description: s.description,
            input_schema: opt_value(&s.input_schema_json),
            output_schema: opt_value(&s.output_schema_json),
        }
    }
}

// ---------------------------------------------------------------- node frames

impl TryFrom<pb::NodeFrame> for FromNode {
    type Error = FieldError;

    fn try_from(f: pb::NodeFrame) -> Result<Self> {
        use pb::node_frame::Kind;
        Ok(
            match f.kind.ok_or_else(|| FieldError::new("kind", "missing"))? {
                Kind::Register(r) => {
                    check_id("register.node_name", &r.node_name)?;
                    let mut seen = BTreeMap::new();
                    let agents = r
                        .agents
                        .into_iter()
                        .enumerate()
                        .map(|(i, c)| {
                            let card = card_from_pb(i, c)?;
                            if let Some(first) = seen.insert(card.name.clone(), i) {
                                return Err(FieldError::new(
                                    format!("register.agents[{i}].name"),
                                    format!(
                                        "duplicate agent `{}`, first at agents[{first}]",
                                        card.name
                                    ),
                                ));
                            }
                            Ok(card)
                        })
                        .collect::<Result<Vec<_>>>()?;
                    FromNode::Register(Registration {
                        node_name: r.node_name,
                        labels: r.labels.into_iter().collect(),
                        agents,
                    })
                }
                Kind::Heartbeat(h) => FromNode::Heartbeat {
                    instance: h.instance,
                },
                Kind::Result(r) => {
                    use pb::task_result::Outcome;
                    let token = FencingToken::try_from(r.token)?;
                    let outcome = match r
                        .outcome
                        .ok_or_else(|| FieldError::new("result.outcome", "missing"))?
                    {
                        // An output the coordinator cannot keep fails its attempt for
                        // good (the agent would answer the same again); the stream goes on.
                        Outcome::OutputJson(text) => {
                            parse_json("result.output_json", &text, Value::Null)
                                .map_err(|e| TaskError::new("bad_output", e.to_string(), false))
                        }
                        Outcome::Error(e) => Err(task_error_from_pb(e)),
                    };
                    // Usage the coordinator cannot account for fails its attempt for good,
                    // like an output it cannot keep; the stream goes on (closing it would
                    // only bring the same result back after the node reconnects).
                    let usage = if r.usage.len() > MAX_USAGE_ENTRIES {
                        Err(FieldError::new(
                            "result.usage",
                            format!(
                                "{} entries, the limit is {MAX_USAGE_ENTRIES}",
                                r.usage.len()
                            ),
                        ))
                    } else {
                        r.usage
                            .into_iter()
                            .enumerate()
                            .map(|(i, u)| model_usage(i, u))
                            .collect::<Result<Vec<_>>>()
                    };
                    match usage {
                        Ok(usage) => FromNode::Result(TaskResult {
                            token,
                            outcome,
                            usage,
                            elapsed_ms: r.elapsed_ms,
                        }),
                        Err(e) => FromNode::Result(TaskResult::new(
                            token,
                            Err(TaskError::new("bad_usage", e.to_string(), false)),
                        )),
                    }
                }
                Kind::Progress(p) => FromNode::Progress(TaskProgress {
                    token: FencingToken::try_from(p.token)?,
                    message: p.message,
                    fraction: (p.fraction >= 0.0).then_some(p.fraction.min(1.0)),
                }),
                Kind::Delta(d) => FromNode::Delta(TaskDelta {
                    token: FencingToken::try_from(d.token)?,
                    text: truncated(d.text, MAX_DELTA_BYTES),
                    restart: d.restart,
                }),
                Kind::SkillCall(c) => {
                    check_call_id("skill_call.call_id", &c.call_id)?;
                    check_id("skill_call.skill", &c.skill)?;
                    FromNode::SkillCall(SkillCall {
                        token: FencingToken::try_from(c.token)?,
                        call_id: c.call_id,
                        skill: c.skill,
                        input: parse_json_deep(
                            "skill_call.input_json",
                            &c.input_json,
                            Value::Null,
                        )?,
                    })
                }
                Kind::ToolApproval(a) => {
                    check_call_id("tool_approval.call_id", &a.call_id)?;
                    check_tool_name("tool_approval.tool", &a.tool)?;
                    FromNode::ToolApproval(ToolApproval {
                        token: FencingToken::try_from(a.token)?,
                        call_id: a.call_id,
                        tool: a.tool,
                        arguments: parse_json_deep(
                            "tool_approval.arguments_json",
                            &a.arguments_json,
                            Value::Null,
                        )?,
                    })
                }
                Kind::ToolUsed(u) => {
                    check_call_id("tool_used.call_id", &u.call_id)?;
                    check_tool_name("tool_used.tool", &u.tool)?;
                    FromNode::ToolUsed(ToolUsed {
                        token: FencingToken::try_from(u.token)?,
                        call_id: u.call_id,
                        tool: u.tool,
                        arguments: parse_json_deep(
                            "tool_used.arguments_json",
                            &u.arguments_json,
                            Value::Null,
                        )?,
                        ok: u.ok,
                        result: truncated(u.result, MAX_TOOL_RESULT_BYTES),
                        elapsed_ms: u.elapsed_ms,
                    })
                }
                Kind::SendMessage(m) => {
                    use pb::send_message::To;
                    check_call_id("send_message.message_id", &m.message_id)?;
                    check_id("send_message.from_agent", &m.from_agent)?;
                    if !m.namespace.is_empty() {
                        check_id("send_message.namespace", &m.namespace)?;
                    }
                    let to = match m.to {
                        Some(To::Agent(a)) => {
                            check_id("send_message.agent", &a)?;
                            Recipient::Agent(a)
                        }
                        Some(To::Topic(t)) => {
                            check_id("send_message.topic", &t)?;
                            Recipient::Topic(t)
                        }
                        Some(To::SwarmOf(t)) => {
                            Recipient::SwarmOf(FencingToken::try_from(Some(t))?)
                        }
                        None => {
                            return Err(FieldError::new(
                                "send_message.to",
                                "missing: an agent, a topic or a swarm",
                            ));
                        }
                    };
                    if m.priority > u32::from(MAX_PRIORITY) {
                        return Err(FieldError::new(
                            "send_message.priority",
                            format!("{} is over {MAX_PRIORITY}", m.priority),
                        ));
                    }
                    FromNode::SendMessage(SendMessage {
                        payload: message_payload("send_message.payload_json", &m.payload_json)?,
                        message_id: m.message_id,
                        from_agent: m.from_agent,
                        namespace: m.namespace,
                        to,
                        priority: m.priority as u8,
                    })
                }
                Kind::MessageAck(a) => FromNode::MessageAck {
                    delivery: a.delivery,
                    outcome: match a.error {
                        None => Ok(()),
                        Some(e) => Err(task_error_from_pb(e)),
                    },
                },
                Kind::Draining(_) => FromNode::Draining,
                Kind::AgentDown(a) => FromNode::AgentDown {
                    agent: a.agent,
                    reason: a.reason,
                },
            },
        )
    }
}

impl From<FromNode> for pb::NodeFrame {
    fn from(f: FromNode) -> Self {
        use pb::node_frame::Kind;
        let kind = match f {
            FromNode::Register(r) => Kind::Register(pb::Register {
                node_name: r.node_name,
                labels: r.labels.into_iter().collect(),
                agents: r.agents.into_iter().map(Into::into).collect(),
            }),
            FromNode::Heartbeat { instance } => Kind::Heartbeat(pb::Heartbeat { instance }),
            FromNode::Result(r) => Kind::Result(pb::TaskResult {
                token: Some(r.token.into()),
                outcome: Some(match r.outcome {
                    Ok(v) => pb::task_result::Outcome::OutputJson(to_json(&v)),
                    Err(e) => pb::task_result::Outcome::Error(task_error_to_pb(e)),
                }),
                usage: r.usage.into_iter().map(Into::into).collect(),
                elapsed_ms: r.elapsed_ms,
            }),
            FromNode::Progress(p) => Kind::Progress(pb::TaskProgress {
                token: Some(p.token.into()),
                message: p.message,
                fraction: p.fraction.unwrap_or(-1.0),
            }),
            FromNode::Delta(d) => Kind::Delta(pb::TaskDelta {
                token: Some(d.token.into()),
                text: d.text,
                restart: d.restart,
            }),
            FromNode::SkillCall(c) => Kind::SkillCall(pb::SkillCall {
                token: Some(c.token.into()),
                call_id: c.call_id,
                skill: c.skill,
                input_json: to_json(&c.input),
            }),
            FromNode::ToolApproval(a) => Kind::ToolApproval(pb::ToolApproval {
                token: Some(a.token.into()),
                call_id: a.call_id,
                tool: a.tool,
                arguments_json: to_json(&a.arguments),
            }),
            FromNode::ToolUsed(u) => Kind::ToolUsed(pb::ToolUsed {
                token: Some(u.token.into()),
                call_id: u.call_id,
                tool: u.tool,
                arguments_json: to_json(&u.arguments),
                ok: u.ok,
                result: u.result,
                elapsed_ms: u.elapsed_ms,
            }),
            FromNode::SendMessage(m) => Kind::SendMessage(pb::SendMessage {
                message_id: m.message_id,
                from_agent: m.from_agent,
                namespace: m.namespace,
                to: Some(match m.to {
                    Recipient::Agent(a) => pb::send_message::To::Agent(a),
                    Recipient::Topic(t) => pb::send_message::To::Topic(t),
                    Recipient::SwarmOf(t) => pb::send_message::To::SwarmOf(t.into()),
                }),
                priority: m.priority.into(),
                payload_json: to_json(&m.payload),
            }),
            FromNode::MessageAck { delivery, outcome } => Kind::MessageAck(pb::MessageAck {
                delivery,
                error: outcome.err().map(task_error_to_pb),
            }),
            FromNode::Draining => Kind::Draining(pb::Draining {}),
            FromNode::AgentDown { agent, reason } => {
                Kind::AgentDown(pb::AgentDown { agent, reason })
            }
        };
        pb::NodeFrame { kind: Some(kind) }
    }
}

/// gRPC status code numbers used in [`pb::ResultAck`].
const CODE_OK: i32 = 0;
const CODE_FAILED_PRECONDITION: i32 = 9;

impl From<ToNode> for pb::CoordinatorFrame {
    fn from(f: ToNode) -> Self {
        use pb::coordinator_frame::Kind;
        let kind = match f {
            ToNode::Registered(r) => Kind::Registered(pb::Registered {
                node_id: r.node_id.0,
                instance: r.instance,
                heartbeat_every_ms: r.heartbeat_every_ms,
                lease_ms: r.lease_ms,
            }),
            ToNode::Task(t) => Kind::Task(pb::Task {
                token: Some(t.token.into()),
                agent: t.agent,
                skill: t.skill,
                input_json: to_json(&t.input),
                deadline_ms: t.deadline_ms,
                idempotency_key: t.idempotency_key,
                secrets: t
                    .secrets
                    .into_iter()
                    .map(|(k, v)| (k, v.expose().to_owned()))
                    .collect(),
                traceparent: t.traceparent,
            }),
            ToNode::Cancel { token, reason } => Kind::Cancel(pb::CancelTask {
                token: Some(token.into()),
                reason,
            }),
            ToNode::Drain { reason } => Kind::Drain(pb::Drain { reason }),
            ToNode::ResultAck {
                token,
                code,
                message,
            } => Kind::ResultAck(pb::ResultAck {
                token: Some(token.into()),
                code: match code {
                    AckCode::Accepted => CODE_OK,
                    AckCode::Stale => CODE_FAILED_PRECONDITION,
                },
                message,
            }),
            ToNode::SkillResult {
                token,
                call_id,
                outcome,
            } => Kind::SkillResult(pb::SkillCallResult {
                token: Some(token.into()),
                call_id,
                outcome: Some(match outcome {
                    Ok(v) => pb::skill_call_result::Outcome::OutputJson(to_json(&v)),
                    Err(e) => pb::skill_call_result::Outcome::Error(task_error_to_pb(e)),
                }),
            }),
            ToNode::ToolDecision {
                token,
                call_id,
                decision,
            } => Kind::ToolDecision(pb::ToolDecision {
                token: Some(token.into()),
                call_id,
                approved: decision.approved,
                comment: decision.comment,
                by: decision.by,
            }),
            ToNode::MessageSent {
                message_id,
                outcome,
            } => Kind::MessageSent(match outcome {
                Ok(recipients) => pb::MessageSent {
                    message_id,
                    recipients,
                    error: None,
                },
                Err(e) => pb::MessageSent {
                    message_id,
                    recipients: 0,
                    error: Some(task_error_to_pb(e)),
                },
            }),
            ToNode::Deliver(d) => Kind::Deliver(pb::DeliverMessage {
                delivery: d.delivery,
                agent: d.agent,
                message_id: d.message_id,
                from_agent: d.from_agent,
                topic: d.topic,
                priority: d.priority.into(),
                payload_json: to_json(&d.payload),
                namespace: d.namespace,
                sent_at_ms: d.sent_at_ms,
                attempt: d.attempt,
            }),
        };
        pb::CoordinatorFrame { kind: Some(kind) }
    }
}

impl TryFrom<pb::CoordinatorFrame> for ToNode {
    type Error = FieldError;

    fn try_from(f: pb::CoordinatorFrame) -> Result<Self> {
        use pb::coordinator_frame::Kind;
        Ok(
            match f.kind.ok_or_else(|| FieldError::new("kind", "missing"))? {
                Kind::Registered(r) => ToNode::Registered(Registered {
                    node_id: NodeId(r.node_id),
                    instance: r.instance,
                    heartbeat_every_ms: r.heartbeat_every_ms,
                    lease_ms: r.lease_ms,
                }),
                Kind::Task(t) => ToNode::Task(Task {
                    token: FencingToken::try_from(t.token)?,
                    agent: t.agent,
                    skill: t.skill,
                    input: parse_json_deep("task.input_json", &t.input_json, Value::Null)?,
                    deadline_ms: t.deadline_ms,
                    idempotency_key: t.idempotency_key,
                    secrets: t
                        .secrets
                        .into_iter()
                        .map(|(k, v)| (k, crate::secrets::SecretValue::new(v)))
                        .collect(),
                    traceparent: t.traceparent,
                }),
                Kind::Cancel(c) => ToNode::Cancel {
                    token: FencingToken::try_from(c.token)?,
                    reason: c.reason,
                },
                Kind::Drain(d) => ToNode::Drain { reason: d.reason },
                Kind::ResultAck(a) => ToNode::ResultAck {
                    token: FencingToken::try_from(a.token)?,
                    code: if a.code == CODE_OK {
                        AckCode::Accepted
                    } else {
                        AckCode::Stale
                    },
                    message: a.message,
                },
                Kind::SkillResult(r) => {
                    ToNode::SkillResult {
                        token: FencingToken::try_from(r.token)?,
                        call_id: r.call_id,
                        outcome: match r.outcome {
                            Some(pb::skill_call_result::Outcome::OutputJson(j)) => Ok(
                                parse_json_deep("skill_result.output_json", &j, Value::Null)?,
                            ),
                            Some(pb::skill_call_result::Outcome::Error(e)) => {
                                Err(TaskError::new(&e.code, e.message, e.retryable))
                            }
                            None => return Err(FieldError::new("skill_result.outcome", "missing")),
                        },
                    }
                }
                Kind::MessageSent(m) => ToNode::MessageSent {
                    message_id: m.message_id,
                    outcome: match m.error {
                        None => Ok(m.recipients),
                        Some(e) => Err(task_error_from_pb(e)),
                    },
                },
                Kind::Deliver(d) => ToNode::Deliver(Delivered {
                    delivery: d.delivery,
                    agent: d.agent,
                    message_id: d.message_id,
                    from_agent: d.from_agent,
                    topic: d.topic,
                    priority: d.priority.min(u32::from(MAX_PRIORITY)) as u8,
                    payload: parse_json_deep("deliver.payload_json", &d.payload_json, Value::Null)?,
                    namespace: d.namespace,
                    sent_at_ms: d.sent_at_ms,
                    attempt: d.attempt,
                }),
                Kind::ToolDecision(d) => ToNode::ToolDecision {
                    token: FencingToken::try_from(d.token)?,
                    call_id: d.call_id,
                    decision: ToolDecision {
                        approved: d.approved,
                        comment: d.comment,
                        by: d.by,
                    },
                },
            },
        )
    }
}

// ---------------------------------------------------------------- runs

impl From<RunState> for pb::RunState {
    fn from(s: RunState) -> Self {
        match s {
            RunState::Running => pb::RunState::Running,
            RunState::Succeeded => pb::RunState::Succeeded,
            RunState::Failed => pb::RunState::Failed,
            RunState::Cancelled => pb::RunState::Cancelled,
        }
    }
}

/// Reads a run state from the wire; `UNSPECIFIED` is `None`.
pub fn run_state_from_pb(field: &str, value: i32) -> Result<Option<RunState>> {
    match pb::RunState::try_from(value) {
        Ok(pb::RunState::Unspecified) => Ok(None),
        Ok(pb::RunState::Running) => Ok(Some(RunState::Running)),
        Ok(pb::RunState::Succeeded) => Ok(Some(RunState::Succeeded)),
        Ok(pb::RunState::Failed) => Ok(Some(RunState::Failed)),
        Ok(pb::RunState::Cancelled) => Ok(Some(RunState::Cancelled)),
        Err(_) => Err(FieldError::new(field, format!("unknown run state {value}"))),
    }
}

impl From<StepState> for pb::StepState {
    fn from(s: StepState) -> Self {
        match s {
            StepState::Pending => pb::StepState::Pending,
            StepState::Running => pb::StepState::Running,
            StepState::Succeeded => pb::StepState::Succeeded,
            StepState::Failed => pb::StepState::Failed,
            StepState::Cancelled => pb::StepState::Cancelled,
            StepState::Skipped => pb::StepState::Skipped,
            StepState::Waiting => pb::StepState::Waiting,
            StepState::AwaitingApproval => pb::StepState::AwaitingApproval,
            StepState::Parked => pb::StepState::Parked,
        }
    }
}

fn step_state_from_pb(value: i32) -> StepState {
    match pb::StepState::try_from(value) {
        Ok(pb::StepState::Running) => StepState::Running,
        Ok(pb::StepState::Succeeded) => StepState::Succeeded,
        Ok(pb::StepState::Failed) => StepState::Failed,
        Ok(pb::StepState::Cancelled) => StepState::Cancelled,
        Ok(pb::StepState::Skipped) => StepState::Skipped,
        Ok(pb::StepState::Waiting) => StepState::Waiting,
        Ok(pb::StepState::AwaitingApproval) => StepState::AwaitingApproval,
        Ok(pb::StepState::Parked) => StepState::Parked,
        Ok(pb::StepState::Pending | pb::StepState::Unspecified) | Err(_) => StepState::Pending,
    }
}

fn opt_str(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn opt_value(s: &str) -> Option<Value> {
    if s.is_empty() {
        None
    } else {
        serde_json::from_str(s).ok()
    }
}

impl From<StepView> for pb::Step {
    fn from(s: StepView) -> Self {
        let (agent, node_id) = s.agent.map(|a| (a.agent, a.node.0)).unwrap_or_default();
        pb::Step {
            id: s.id.0,
            uses: s.uses,
            state: pb::StepState::from(s.state) as i32,
            attempt: s.attempt,
            agent,
            node_id,
            output_json: opt_json(&s.output),
            error: s.error.unwrap_or_default(),
            items_done: s.items_done,
            items_total: s.items_total,
            iteration: s.iteration,
            detail: s.detail.unwrap_or_default(),
            output_elided_bytes: s.output_elided_bytes.unwrap_or(0),
            usage: Some(s.usage.into()),
        }
    }
}

impl From<UsageTotal> for pb::UsageTotal {
    fn from(u: UsageTotal) -> Self {
        pb::UsageTotal {
            calls: u.calls,
            input_tokens: u.input_tokens,
            output_tokens: u.output_tokens,
            cost_usd: u.cost_usd,
            unpriced_calls: u.unpriced_calls,
        }
    }
}

impl From<pb::UsageTotal> for UsageTotal {
    fn from(u: pb::UsageTotal) -> Self {
        UsageTotal {
            calls: u.calls,
            input_tokens: u.input_tokens,
            output_tokens: u.output_tokens,
            cost_usd: u.cost_usd,
            unpriced_calls: u.unpriced_calls,
        }
    }
}

/// Most model entries one result may carry.
pub const MAX_USAGE_ENTRIES: usize = 16;

impl From<ModelUsage> for pb::ModelUsage {
    fn from(u: ModelUsage) -> Self {
        pb::ModelUsage {
            provider: u.provider,
            model: u.model,
            calls: u.calls,
            input_tokens: u.input_tokens,
            output_tokens: u.output_tokens,
            cost_usd: u.cost_usd.unwrap_or(0.0),
            priced: u.cost_usd.is_some(),
        }
    }
}

/// A node's usage report, checked: names bounded, a cost a finite number of USD, 0 or more.
fn model_usage(i: usize, u: pb::ModelUsage) -> Result<ModelUsage> {
    let field = |name: &str| format!("result.usage[{i}].{name}");
    if !(u.cost_usd.is_finite() && u.cost_usd >= 0.0) {
        return Err(FieldError::new(
            field("cost_usd"),
            "must be a number of USD, 0 or more",
        ));
    }
    Ok(ModelUsage {
        provider: truncated(u.provider, MAX_ID_LEN),
        model: truncated(u.model, 256),
        calls: u.calls,
        input_tokens: u.input_tokens,
        output_tokens: u.output_tokens,
        cost_usd: u.priced.then_some(u.cost_usd),
    })
}

impl From<pb::Step> for StepView {
    fn from(s: pb::Step) -> Self {
        StepView {
            agent: (!s.agent.is_empty()).then_some(AgentKey {
                node: NodeId(s.node_id),
                agent: s.agent,
            }),
            output: opt_value(&s.output_json),
            id: StepId(s.id),
            uses: s.uses,
            state: step_state_from_pb(s.state),
            attempt: s.attempt,
            error: opt_str(s.error),
            items_done: s.items_done,
            items_total: s.items_total,
            iteration: s.iteration,
            detail: opt_str(s.detail),
            output_elided_bytes: (s.output_elided_bytes > 0).then_some(s.output_elided_bytes),
            usage: s.usage.map(Into::into).unwrap_or_default(),
        }
    }
}

fn run_state_or_running(value: i32) -> RunState {
    run_state_from_pb("state", value)
        .ok()
        .flatten()
        .unwrap_or(RunState::Running)
}

impl From<RunView> for pb::Run {
    fn from(r: RunView) -> Self {
        pb::Run {
            run_id: r.run_id.0,
            goal_id: r.goal_id.0,
            objective: r.objective,
            state: pb::RunState::from(r.state) as i32,
            steps: r.steps.into_iter().map(Into::into).collect(),
            output_json: opt_json(&r.output),
            error: r.error.unwrap_or_default(),
            swarm: r
                .swarm
                .into_iter()
                .map(|m| pb::SwarmMember {
                    skill: m.skill,
                    agent: m.agent.agent,
                    node_id: m.agent.node.0,
                })
                .collect(),
            created_at_ms: r.created_at_ms,
            updated_at_ms: r.updated_at_ms,
            output_elided_bytes: r.output_elided_bytes.unwrap_or(0),
            usage: Some(r.usage.into()),
            budget: r.budget.map(Into::into),
            namespace: r.namespace.0,
        }
    }
}

impl From<pb::Run> for RunView {
    fn from(r: pb::Run) -> Self {
        RunView {
            state: run_state_or_running(r.state),
            output: opt_value(&r.output_json),
            run_id: RunId(r.run_id),
            goal_id: GoalId(r.goal_id),
            objective: r.objective,
            steps: r.steps.into_iter().map(Into::into).collect(),
            error: opt_str(r.error),
            swarm: r
                .swarm
                .into_iter()
                .map(|m| SwarmMember {
                    skill: m.skill,
                    agent: AgentKey {
                        node: NodeId(m.node_id),
                        agent: m.agent,
                    },
                })
                .collect(),
            created_at_ms: r.created_at_ms,
            updated_at_ms: r.updated_at_ms,
            output_elided_bytes: (r.output_elided_bytes > 0).then_some(r.output_elided_bytes),
            usage: r.usage.map(Into::into).unwrap_or_default(),
            budget: r.budget.and_then(|b| budget("budget", b).ok()),
            namespace: namespace_or_default(r.namespace),
        }
    }
}

/// A namespace from the wire; empty is the default one.
fn namespace_or_default(ns: String) -> Namespace {
    if ns.is_empty() {
        Namespace::default()
    } else {
        Namespace(ns)
    }
}

impl From<Budget> for pb::Budget {
    fn from(b: Budget) -> Self {
        pb::Budget {
            max_tokens: b.max_tokens,
            max_cost_usd: b.max_cost_usd,
            on_exceed: b.on_exceed.as_str().to_owned(),
        }
    }
}

/// A budget from the wire, checked; `field` names it in errors.
pub fn budget(field: &str, b: pb::Budget) -> Result<Budget> {
    let on_exceed = if b.on_exceed.is_empty() {
        OnExceed::default()
    } else {
        b.on_exceed
            .parse()
            .map_err(|e| FieldError::new(format!("{field}.on_exceed"), e))?
    };
    let budget = Budget {
        max_tokens: b.max_tokens,
        max_cost_usd: b.max_cost_usd,
        on_exceed,
    };
    match budget.problem() {
        Some((sub, why)) => Err(FieldError::new(format!("{field}{sub}"), why)),
        None => Ok(budget),
    }
}

impl From<RunSummary> for pb::RunSummary {
    fn from(r: RunSummary) -> Self {
        pb::RunSummary {
            run_id: r.run_id.0,
            goal_id: r.goal_id.0,
            objective: r.objective,
            state: pb::RunState::from(r.state) as i32,
            created_at_ms: r.created_at_ms,
            updated_at_ms: r.updated_at_ms,
            namespace: r.namespace.0,
        }
    }
}

impl From<pb::RunSummary> for RunSummary {
    fn from(r: pb::RunSummary) -> Self {
        RunSummary {
            state: run_state_or_running(r.state),
            run_id: RunId(r.run_id),
            goal_id: GoalId(r.goal_id),
            objective: r.objective,
            created_at_ms: r.created_at_ms,
            updated_at_ms: r.updated_at_ms,
            namespace: namespace_or_default(r.namespace),
        }
    }
}

impl From<WorkflowRecord> for pb::Workflow {
    fn from(w: WorkflowRecord) -> Self {
        pb::Workflow {
            name: w.name,
            version: w.version,
            description: w.description,
            definition: w.definition,
            created_at_ms: w.created_at_ms,
            steps: w.steps,
            created: false,
        }
    }
}

impl From<pb::Workflow> for WorkflowRecord {
    fn from(w: pb::Workflow) -> Self {
        WorkflowRecord {
            name: w.name,
            version: w.version,
            description: w.description,
            definition: w.definition,
            steps: w.steps,
            created_at_ms: w.created_at_ms,
        }
    }
}

impl TryFrom<pb::ListRunsRequest> for ListRunsQuery {
    type Error = FieldError;

    fn try_from(r: pb::ListRunsRequest) -> Result<Self> {
        let page_size = match r.page_size {
            0 => 100,
            n @ 1..=1000 => n,
            n => {
                return Err(FieldError::new(
                    "page_size",
                    format!("{n} is over the limit of 1000"),
                ));
            }
        };
        Ok(ListRunsQuery {
            // The call's namespace, set by the coordinator.
            namespace: Namespace::default(),
            state: run_state_from_pb("state", r.state)?,
            page_size,
            page_token: if r.page_token.is_empty() {
                None
            } else {
                Some(run_id("page_token", r.page_token)?)
            },
        })
    }
}

impl From<RunEvent> for pb::RunEvent {
    fn from(e: RunEvent) -> Self {
        use pb::run_event::Kind;
        let kind = match e {
            RunEvent::Snapshot(r) => Kind::Snapshot(r.into()),
            RunEvent::Step(s) => Kind::Step(pb::StepChanged {
                step: Some(s.into()),
            }),
            RunEvent::Progress {
                step,
                attempt,
                message,
                fraction,
            } => Kind::Progress(pb::StepProgress {
                step_id: step.0,
                attempt,
                message,
                fraction: fraction.unwrap_or(-1.0),
            }),
            RunEvent::Delta {
                step,
                index,
                attempt,
                text,
                restart,
            } => Kind::Delta(pb::StepDelta {
                step_id: step.0,
                attempt,
                index,
                text,
                restart,
            }),
            RunEvent::Finished {
                state,
                output,
                error,
                output_elided_bytes,
            } => Kind::Finished(pb::RunFinished {
                state: pb::RunState::from(state) as i32,
                output_json: opt_json(&output),
                error: error.unwrap_or_default(),
                output_elided_bytes: output_elided_bytes.unwrap_or(0),
            }),
        };
        pb::RunEvent { kind: Some(kind) }
    }
}

impl TryFrom<pb::RunEvent> for RunEvent {
    type Error = FieldError;

    fn try_from(e: pb::RunEvent) -> Result<Self> {
        use pb::run_event::Kind;
        Ok(
            match e.kind.ok_or_else(|| FieldError::new("kind", "missing"))? {
                Kind::Snapshot(r) => RunEvent::Snapshot(r.into()),
                Kind::Step(s) => RunEvent::Step(
                    s.step
                        .ok_or_else(|| FieldError::new("step.step", "missing"))?
                        .into(),
                ),
                Kind::Progress(p) => RunEvent::Progress {
                    step: StepId(p.step_id),
                    attempt: p.attempt,
                    message: p.message,
                    fraction: (p.fraction >= 0.0).then_some(p.fraction.min(1.0)),
                },
                Kind::Delta(d) => RunEvent::Delta {
                    step: StepId(d.step_id),
                    index: d.index,
                    attempt: d.attempt,
                    text: d.text,
                    restart: d.restart,
                },
                Kind::Finished(f) => RunEvent::Finished {
                    state: run_state_or_running(f.state),
                    output: opt_value(&f.output_json),
                    error: opt_str(f.error),
                    output_elided_bytes: (f.output_elided_bytes > 0)
                        .then_some(f.output_elided_bytes),
                },
            },
        )
    }
}

// ---------------------------------------------------------------- registry views

impl From<Health> for pb::Health {
    fn from(h: Health) -> Self {
        match h {
            Health::Healthy => pb::Health::Healthy,
            Health::Suspect => pb::Health::Suspect,
            Health::Dead => pb::Health::Dead,
            Health::Draining => pb::Health::Draining,
        }
    }
}

fn health_from_pb(value: i32) -> Health {
    match pb::Health::try_from(value) {
        Ok(pb::Health::Healthy) => Health::Healthy,
        Ok(pb::Health::Suspect) => Health::Suspect,
        Ok(pb::Health::Draining) => Health::Draining,
        Ok(pb::Health::Dead | pb::Health::Unspecified) | Err(_) => Health::Dead,
    }
}

impl From<NodeView> for pb::NodeView {
    fn from(n: NodeView) -> Self {
        pb::NodeView {
            node_id: n.node_id.0,
            instance: n.instance,
            health: pb::Health::from(n.health) as i32,
            heartbeat_age_ms: n.heartbeat_age_ms,
            labels: n.labels.into_iter().collect(),
            agents: n.agents,
            in_flight: n.in_flight,
        }
    }
}

impl From<pb::NodeView> for NodeView {
    fn from(n: pb::NodeView) -> Self {
        NodeView {
            node_id: NodeId(n.node_id),
            instance: n.instance,
            health: health_from_pb(n.health),
            heartbeat_age_ms: n.heartbeat_age_ms,
            labels: n.labels.into_iter().collect(),
            agents: n.agents,
            in_flight: n.in_flight,
        }
    }
}

impl From<AgentView> for pb::AgentView {
    fn from(a: AgentView) -> Self {
        pb::AgentView {
            node_id: a.node_id.0,
            instance: a.instance,
            name: a.name,
            version: a.version,
            skills: a.skills,
            health: pb::Health::from(a.health) as i32,
            heartbeat_age_ms: a.heartbeat_age_ms,
            in_flight: a.in_flight,
            max_concurrency: a.max_concurrency,
            circuit: a.circuit,
            description: a.description,
            skill_specs: a.skill_specs.into_iter().map(Into::into).collect(),
            labels: a.labels.into_iter().collect(),
        }
    }
}

impl From<pb::AgentView> for AgentView {
    fn from(a: pb::AgentView) -> Self {
        AgentView {
            node_id: NodeId(a.node_id),
            instance: a.instance,
            name: a.name,
            version: a.version,
            skills: a.skills,
            health: health_from_pb(a.health),
            heartbeat_age_ms: a.heartbeat_age_ms,
            in_flight: a.in_flight,
            max_concurrency: a.max_concurrency,
            circuit: a.circuit,
            description: a.description,
            skill_specs: a.skill_specs.into_iter().map(Into::into).collect(),
            labels: a.labels.into_iter().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(id: &str, needs: &[&str]) -> pb::StepSpec {
        pb::StepSpec {
            id: id.into(),
            uses: "echo".into(),
            with_json: String::new(),
            needs: needs.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn goal(steps: Vec<pb::StepSpec>) -> pb::SubmitGoalRequest {
        pb::SubmitGoalRequest {
            objective: "test".into(),
            steps,
            ..Default::default()
        }
    }

    fn field_of(req: pb::SubmitGoalRequest) -> String {
        GoalSpec::try_from(req).unwrap_err().field
    }

    #[test]
    fn accepts_a_diamond() {
        let g = GoalSpec::try_from(goal(vec![
            step("a", &[]),
            step("b", &["a"]),
            step("c", &["a"]),
            step("d", &["b", "c"]),
        ]))
        .unwrap();
        assert_eq!(g.steps.len(), 4);
        assert_eq!(g.steps[0].with, serde_json::json!({}));
    }

    #[test]
    fn names_the_offending_field() {
        let mut empty = goal(vec![]);
        empty.objective = "  ".into();
        assert_eq!(field_of(empty), "steps", "no steps, workflow or objective");
        let text = GoalSpec::try_from(goal(vec![])).unwrap();
        assert!(
            text.steps.is_empty(),
            "an objective alone is a goal for a planner"
        );
        let mut both = goal(vec![step("a", &[])]);
        both.workflow = "steps: []".into();
        assert_eq!(field_of(both), "workflow");
        let mut bad_ref = goal(vec![]);
        bad_ref.workflow_ref = "brief@0".into();
        assert_eq!(field_of(bad_ref), "workflow_ref");
        let mut good_ref = goal(vec![]);
        good_ref.workflow_ref = "brief@3".into();
        assert_eq!(
            GoalSpec::try_from(good_ref)
                .unwrap()
                .workflow_ref
                .as_deref(),
            Some("brief@3")
        );
        assert_eq!(field_of(goal(vec![step("", &[])])), "steps[0].id");
        assert_eq!(
            field_of(goal(vec![step("a", &[]), step("a", &[])])),
            "steps[1].id"
        );
        assert_eq!(
            field_of(goal(vec![step("a", &["zz"])])),
            "steps[0].needs[0]"
        );
        let mut bad = step("a", &[]);
        bad.with_json = "{nope".into();
        assert_eq!(field_of(goal(vec![bad])), "steps[0].with_json");
        let mut no_skill = step("a", &[]);
        no_skill.uses.clear();
        assert_eq!(field_of(goal(vec![no_skill])), "steps[0].uses");
        let mut req = goal(vec![step("a", &[])]);
        req.inputs_json = "[1]".into();
        assert_eq!(field_of(req), "inputs");
    }

    #[test]
    fn finds_cycles() {
        let err = GoalSpec::try_from(goal(vec![
            step("a", &["c"]),
            step("b", &["a"]),
            step("c", &["b"]),
            step("d", &[]),
        ]))
        .unwrap_err();
        assert_eq!(err.field, "steps[0].needs");
        assert!(err.reason.contains("cycle"), "{err}");
    }

    /// Usage a coordinator cannot account for (a negative or non-finite cost, too many
    /// entries) fails the attempt for good, naming the field; the frame is not refused.
    #[test]
    fn bad_usage_fails_its_attempt_naming_the_field() {
        let token = FencingToken {
            run_id: "r1".into(),
            step_id: "s1".into(),
            attempt: 1,
            epoch: 1,
            index: 0,
        };
        let frame = |usage: Vec<pb::ModelUsage>| pb::NodeFrame {
            kind: Some(pb::node_frame::Kind::Result(pb::TaskResult {
                token: Some(token.clone().into()),
                outcome: Some(pb::task_result::Outcome::OutputJson("1".into())),
                usage,
                elapsed_ms: 0,
            })),
        };
        let entry = |cost: f64| pb::ModelUsage {
            provider: "openai".into(),
            model: "m".into(),
            calls: 1,
            input_tokens: 1,
            output_tokens: 1,
            cost_usd: cost,
            priced: true,
        };
        for (usage, field) in [
            (vec![entry(0.1), entry(-1.0)], "result.usage[1].cost_usd"),
            (vec![entry(f64::NAN)], "result.usage[0].cost_usd"),
            (vec![entry(0.0); MAX_USAGE_ENTRIES + 1], "result.usage"),
        ] {
            let Ok(FromNode::Result(r)) = FromNode::try_from(frame(usage)) else {
                panic!("a result")
            };
            let Err(e) = r.outcome else { panic!("failed") };
            assert_eq!((e.code.as_str(), e.retryable), ("bad_usage", false));
            assert!(e.message.starts_with(field), "{}", e.message);
            assert!(r.usage.is_empty());
        }
    }

    /// A skill call and its answer survive the wire; a child's token `STEP~CALL` is read, a
    /// bad call id or a second `~` is refused naming the field.
    #[test]
    fn skill_calls_round_trip_and_their_tokens_are_checked() {
        let token = FencingToken {
            run_id: "r1".into(),
            step_id: "ask".into(),
            attempt: 1,
            epoch: 2,
            index: 0,
        };
        let call = FromNode::SkillCall(SkillCall {
            token: token.clone(),
            call_id: "call-1".into(),
            skill: "echo".into(),
            input: serde_json::json!({ "text": "hi" }),
        });
        let back = FromNode::try_from(pb::NodeFrame::from(call.clone())).unwrap();
        assert_eq!(back, call);
        for outcome in [
            Ok(serde_json::json!({ "x": 1 })),
            Err(TaskError::new("e", "no", true)),
        ] {
            let answer = ToNode::SkillResult {
                token: FencingToken {
                    step_id: "ask~call-1".into(),
                    ..token.clone()
                },
                call_id: "call-1".into(),
                outcome,
            };
            let back = ToNode::try_from(pb::CoordinatorFrame::from(answer.clone())).unwrap();
            assert_eq!(back, answer);
        }
        let mut bad = pb::NodeFrame::from(call);
        if let Some(pb::node_frame::Kind::SkillCall(c)) = &mut bad.kind {
            c.call_id = "no spaces".into();
        }
        let e = FromNode::try_from(bad.clone()).unwrap_err();
        assert!(e.to_string().contains("skill_call.call_id"), "{e}");
        if let Some(pb::node_frame::Kind::SkillCall(c)) = &mut bad.kind {
            c.call_id = "call-1".into();
            c.token.as_mut().unwrap().step_id = "a~b~c".into();
        }
        let e = FromNode::try_from(bad).unwrap_err();
        assert!(e.to_string().contains("token.step_id"), "{e}");
    }

    #[test]
    fn tool_approvals_and_calls_round_trip_and_are_checked() {
        let token = FencingToken {
            run_id: "r1".into(),
            step_id: "ask".into(),
            attempt: 1,
            epoch: 2,
            index: 0,
        };
        let ask = FromNode::ToolApproval(ToolApproval {
            token: token.clone(),
            call_id: "call-1".into(),
            tool: "refund".into(),
            arguments: serde_json::json!({ "order": "A-17" }),
        });
        assert_eq!(
            FromNode::try_from(pb::NodeFrame::from(ask.clone())).unwrap(),
            ask
        );
        let decision = ToNode::ToolDecision {
            token: token.clone(),
            call_id: "call-1".into(),
            decision: ToolDecision {
                approved: false,
                comment: "too much".into(),
                by: "ana".into(),
            },
        };
        assert_eq!(
            ToNode::try_from(pb::CoordinatorFrame::from(decision.clone())).unwrap(),
            decision
        );
        let used = FromNode::ToolUsed(ToolUsed {
            token,
            call_id: "call-2".into(),
            tool: "weather".into(),
            arguments: serde_json::json!({ "city": "Lyon" }),
            ok: true,
            result: "sunny".into(),
            elapsed_ms: 84,
        });
        assert_eq!(
            FromNode::try_from(pb::NodeFrame::from(used.clone())).unwrap(),
            used
        );
        // A result over 4 KiB is cut, a control character in a tool's name refused.
        let mut frame = pb::NodeFrame::from(used);
        if let Some(pb::node_frame::Kind::ToolUsed(u)) = &mut frame.kind {
            u.result = "x".repeat(10_000);
        }
        let FromNode::ToolUsed(cut) = FromNode::try_from(frame.clone()).unwrap() else {
            panic!("a tool call")
        };
        assert!(cut.result.len() < 4_200 && cut.result.ends_with("(truncated)"));
        if let Some(pb::node_frame::Kind::ToolUsed(u)) = &mut frame.kind {
            u.tool = "bad\nname".into();
        }
        let e = FromNode::try_from(frame).unwrap_err();
        assert!(e.to_string().contains("tool_used.tool"), "{e}");
        let mut frame = pb::NodeFrame::from(ask);
        if let Some(pb::node_frame::Kind::ToolApproval(a)) = &mut frame.kind {
            a.call_id = String::new();
        }
        let e = FromNode::try_from(frame).unwrap_err();
        assert!(e.to_string().contains("tool_approval.call_id"), "{e}");
    }

    #[test]
    fn frames_round_trip() {
        let token = FencingToken {
            run_id: "r1".into(),
            step_id: "s1".into(),
            attempt: 2,
            epoch: 7,
            index: 3,
        };
        let frame = FromNode::Result(TaskResult {
            token: token.clone(),
            outcome: Err(TaskError {
                code: "boom".into(),
                message: "it broke".into(),
                retryable: true,
            }),
            elapsed_ms: 1_234,
            // A failed attempt's calls travel too, priced or not.
            usage: vec![
                ModelUsage {
                    provider: "openai".into(),
                    model: "gpt-4o-mini".into(),
                    calls: 1,
                    input_tokens: 10,
                    output_tokens: 5,
                    cost_usd: Some(0.25),
                },
                ModelUsage {
                    provider: "ollama".into(),
                    model: "llama3.2".into(),
                    calls: 2,
                    input_tokens: 7,
                    output_tokens: 3,
                    cost_usd: None,
                },
            ],
        });
        assert_eq!(
            FromNode::try_from(pb::NodeFrame::from(frame.clone())).unwrap(),
            frame
        );
        let ack = ToNode::ResultAck {
            token,
            code: AckCode::Stale,
            message: "stale".into(),
        };
        assert_eq!(
            ToNode::try_from(pb::CoordinatorFrame::from(ack.clone())).unwrap(),
            ack
        );
    }

    #[test]
    fn rejects_a_token_without_attempt() {
        let err = FencingToken::try_from(Some(pb::FencingToken {
            run_id: "r".into(),
            step_id: "s".into(),
            attempt: 0,
            epoch: 1,
            index: 0,
        }))
        .unwrap_err();
        assert_eq!(err.field, "token.attempt");
    }
}
