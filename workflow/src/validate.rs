//! From a [`WorkflowDef`] to a [`Workflow`]: every check runs before anything executes, and
//! each problem names the path of its field (`steps[3].loop.until`). Expressions are compiled
//! here, once.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::def::*;
use crate::expr::{Expr, Template};

/// Bounds on what a definition may ask for.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Size of the document's text.
    pub max_bytes: usize,
    pub max_steps: usize,
    /// Nesting of JSON values (`with`, `inputs`, `outputs`).
    pub max_depth: usize,
    /// Most `foreach` tasks at once, per step.
    pub max_parallel: u32,
    /// Most elements a `foreach` may fan out over (checked when it runs).
    pub max_items: usize,
    /// Sum of every loop's `max_iterations`.
    pub max_total_iterations: u64,
    pub max_attempts: u32,
    /// Sub-workflows within sub-workflows.
    pub max_nesting: usize,
    /// Bytes of agent output (as JSON) a run keeps in all; past it the step whose result
    /// would cross it fails.
    pub max_run_output_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: 1 << 20,
            max_steps: 10_000,
            max_depth: 32,
            max_parallel: 256,
            max_items: 10_000,
            max_total_iterations: 100_000,
            max_attempts: 100,
            max_nesting: 4,
            max_run_output_bytes: 64 << 20,
        }
    }
}

/// One thing wrong with a definition, and where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl Problem {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Everything wrong with a definition (the first [`MAX_PROBLEMS`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid(pub Vec<Problem>);

pub const MAX_PROBLEMS: usize = 20;

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Invalid {}

impl From<Problem> for Invalid {
    fn from(p: Problem) -> Self {
        Invalid(vec![p])
    }
}

/// Who runs a step's tasks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// An agent with this skill.
    Skill(String),
    /// The agent of this name.
    Agent(String),
    /// A child run of this registered workflow.
    Workflow { name: String, version: u32 },
}

/// What a step does.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Tasks, one per `foreach` element or `loop` iteration (one otherwise).
    Task(Target),
    /// Wait for a person's decision.
    Approval {
        message: Template,
        timeout: Option<Duration>,
    },
    /// Wait for a named signal.
    Signal {
        name: String,
        timeout: Option<Duration>,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Foreach {
    pub items: Expr,
    pub parallel: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Loop {
    pub until: Expr,
    pub max_iterations: u32,
}

/// A validated step, its expressions compiled, its needs as indices.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub id: String,
    pub action: Action,
    pub with: Template,
    pub needs: Vec<usize>,
    pub when: Option<Expr>,
    pub foreach: Option<Foreach>,
    pub repeat: Option<Loop>,
    pub retry: Option<RetryDef>,
    pub timeout: Option<Duration>,
    pub on_failure: OnFailure,
    /// Labels the agent must have (its own or its node's).
    pub labels: BTreeMap<String, String>,
    pub memory: Option<Memory>,
}

/// A step's memory, checked: its key compiled.
#[derive(Clone, Debug, PartialEq)]
pub struct Memory {
    pub scope: MemoryScope,
    pub key: Template,
    pub last: u32,
    pub save: bool,
    pub ttl: Option<Duration>,
}

/// Most entries a task may load, and the longest a saved entry may be kept.
pub const MAX_MEMORY_LAST: u32 = 100;
pub const MAX_MEMORY_TTL: Duration = Duration::from_secs(3 * 365 * 24 * 3600);

impl Step {
    pub fn skill(&self) -> &str {
        match &self.action {
            Action::Task(Target::Skill(skill)) => skill,
            Action::Task(Target::Agent(name)) => name,
            Action::Task(Target::Workflow { name, .. }) => name,
            Action::Approval { .. } => "approval",
            Action::Signal { .. } => "signal",
        }
    }

    /// Every expression of the step, for finding the steps it reads.
    pub fn exprs(&self) -> Vec<&Expr> {
        let mut out = self.with.exprs();
        out.extend(self.memory.iter().flat_map(|m| m.key.exprs()));
        out.extend(self.when.iter());
        out.extend(self.foreach.iter().map(|f| &f.items));
        out.extend(self.repeat.iter().map(|l| &l.until));
        if let Action::Approval { message, .. } = &self.action {
            out.extend(message.exprs());
        }
        out
    }
}

/// A workflow ready to run.
#[derive(Clone, Debug)]
pub struct Workflow {
    pub def: WorkflowDef,
    pub steps: Vec<Step>,
    pub outputs: Vec<(String, Template)>,
    index: HashMap<String, usize>,
    /// The inputs declared with a JSON Schema object, compiled.
    input_schemas: HashMap<String, JsonSchema>,
}

impl Workflow {
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }

    /// Checks a run's inputs against the declared ones and fills in defaults. A workflow
    /// that declares no inputs takes any object.
    pub fn bind_inputs(&self, inputs: &Value) -> Result<Value, Invalid> {
        let Value::Object(given) = inputs else {
            return Err(Problem::new("inputs", "must be an object").into());
        };
        if self.def.inputs.is_empty() {
            return Ok(inputs.clone());
        }
        let mut out = Map::new();
        let mut problems = Vec::new();
        for name in given.keys() {
            if !self.def.inputs.contains_key(name) {
                let known: Vec<&str> = self.def.inputs.keys().map(String::as_str).collect();
                problems.push(Problem::new(
                    format!("inputs.{name}"),
                    format!(
                        "not an input of this workflow (it takes: {})",
                        known.join(", ")
                    ),
                ));
            }
        }
        for (name, decl) in &self.def.inputs {
            let ty = input_type(decl);
            let value = match (given.get(name), decl.get("default")) {
                (Some(v), _) => v.clone(),
                (None, Some(d)) => d.clone(),
                (None, None) => {
                    problems.push(Problem::new(format!("inputs.{name}"), "required"));
                    continue;
                }
            };
            if let Some(ty) = ty
                && !has_type(&value, ty)
            {
                problems.push(Problem::new(
                    format!("inputs.{name}"),
                    format!("expected {ty}, got {}", crate::expr::kind(&value)),
                ));
            } else if let Some(schema) = self.input_schemas.get(name) {
                for e in schema.0.iter_errors(&value) {
                    let at = pointer_to_path(&e.instance_path().to_string());
                    problems.push(Problem::new(format!("inputs.{name}{at}"), e.to_string()));
                }
            }
            out.insert(name.clone(), value);
        }
        if problems.is_empty() {
            Ok(Value::Object(out))
        } else {
            Err(Invalid(problems))
        }
    }
}

const TYPES: [&str; 6] = ["string", "number", "integer", "boolean", "object", "array"];

/// A JSON Schema, compiled once: a workflow input's, or a skill's input or output.
#[derive(Clone)]
pub struct JsonSchema(Arc<jsonschema::Validator>);

impl std::fmt::Debug for JsonSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JsonSchema")
    }
}

impl JsonSchema {
    pub fn compile(schema: &Value) -> Result<Self, String> {
        jsonschema::validator_for(schema)
            .map(|v| Self(Arc::new(v)))
            .map_err(|e| e.to_string())
    }

    /// The first place where `value` does not match: its path (`.with.text`, empty for
    /// the whole value) and what is wrong.
    pub fn first_problem(&self, value: &Value) -> Option<(String, String)> {
        self.0.iter_errors(value).next().map(|e| {
            (
                pointer_to_path(&e.instance_path().to_string()),
                e.to_string(),
            )
        })
    }
}

/// `/xs/0/name` → `.xs[0].name`.
fn pointer_to_path(pointer: &str) -> String {
    pointer
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| match s.parse::<usize>() {
            Ok(i) => format!("[{i}]"),
            Err(_) => format!(".{}", s.replace("~1", "/").replace("~0", "~")),
        })
        .collect()
}

fn input_type(decl: &Value) -> Option<&str> {
    match decl {
        Value::String(t) => Some(t),
        Value::Object(o) => o.get("type").and_then(Value::as_str),
        _ => None,
    }
}

fn has_type(v: &Value, ty: &str) -> bool {
    match ty {
        "string" => v.is_string(),
        "number" => v.is_number(),
        "integer" => v.is_i64() || v.is_u64(),
        "boolean" => v.is_boolean(),
        "object" => v.is_object(),
        "array" => v.is_array(),
        _ => true,
    }
}

/// `NAME@VERSION`, the version a whole number from 1.
pub fn parse_reference(reference: &str) -> Option<(String, u32)> {
    let (name, version) = reference.split_once('@')?;
    let version = version.parse::<u32>().ok().filter(|&v| v > 0)?;
    valid_id(name).then(|| (name.to_owned(), version))
}

/// Checks that every sub-workflow a workflow names (and every one they name, down to
/// `max_nesting`) is registered and valid; `resolve` finds a registered definition.
pub fn check_sub_workflows(
    workflow: &Workflow,
    limits: &Limits,
    resolve: &dyn Fn(&str, u32) -> Option<WorkflowDef>,
) -> Result<(), Invalid> {
    fn walk(
        w: &Workflow,
        limits: &Limits,
        resolve: &dyn Fn(&str, u32) -> Option<WorkflowDef>,
        depth: usize,
        prefix: &str,
        problems: &mut Vec<Problem>,
    ) {
        for (i, step) in w.steps.iter().enumerate() {
            let Action::Task(Target::Workflow { name, version }) = &step.action else {
                continue;
            };
            let path = format!("{prefix}steps[{i}].workflow");
            if depth >= limits.max_nesting {
                problems.push(Problem::new(
                    path,
                    format!(
                        "sub-workflows nest deeper than {} levels",
                        limits.max_nesting
                    ),
                ));
                continue;
            }
            match resolve(name, *version) {
                None => problems.push(Problem::new(
                    path,
                    format!("`{name}@{version}` is not registered"),
                )),
                Some(def) => match validate(def, limits) {
                    Ok(child) => walk(
                        &child,
                        limits,
                        resolve,
                        depth + 1,
                        &format!("{path}({name}@{version})."),
                        problems,
                    ),
                    Err(Invalid(ps)) => problems.extend(ps.into_iter().map(|p| {
                        Problem::new(format!("{path}({name}@{version}).{}", p.path), p.message)
                    })),
                },
            }
        }
    }
    let mut problems = Vec::new();
    walk(workflow, limits, resolve, 0, "", &mut problems);
    problems.truncate(MAX_PROBLEMS);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Invalid(problems))
    }
}

/// Reads a definition from YAML or JSON text (JSON when it starts with `{`). Unknown
/// fields and wrong types are problems with their path.
pub fn parse(text: &str, limits: &Limits) -> Result<WorkflowDef, Invalid> {
    if text.len() > limits.max_bytes {
        return Err(Problem::new(
            "",
            format!(
                "the document is {} bytes, over the limit of {}",
                text.len(),
                limits.max_bytes
            ),
        )
        .into());
    }
    let value: Value = if text.trim_start().starts_with('{') {
        serde_json::from_str(text).map_err(|e| Problem::new("", format!("not valid JSON: {e}")))?
    } else {
        // YAML 1.2 booleans only: `y`, `no` and `on` stay strings.
        let mut options = serde_saphyr::Options::default();
        options.strict_booleans = true;
        serde_saphyr::from_str_with_options(text, options)
            .map_err(|e| Problem::new("", format!("not valid YAML: {e}")))?
    };
    from_value(value)
}

/// Reads a definition from a JSON value.
pub fn from_value(value: Value) -> Result<WorkflowDef, Invalid> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        Invalid(vec![Problem::new(path, e.into_inner().to_string())])
    })
}

/// Parses and validates in one go.
pub fn load(text: &str, limits: &Limits) -> Result<Workflow, Invalid> {
    validate(parse(text, limits)?, limits)
}

/// The one rule for ids and names, the wire's (`mesh_proto::convert::check_id`): step ids,
/// signal names and workflow names alike, so that what can be registered can be named.
fn valid_id(id: &str) -> bool {
    mesh_proto::convert::check_id("", id).is_ok()
}

fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

struct Checker<'a> {
    limits: &'a Limits,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn problem(&mut self, path: impl Into<String>, message: impl Into<String>) {
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(Problem::new(path, message));
        }
    }

    fn value(&mut self, path: &str, v: &Value) -> Option<Template> {
        if depth(v) > self.limits.max_depth {
            self.problem(
                path,
                format!("nested deeper than {} levels", self.limits.max_depth),
            );
            return None;
        }
        match Template::compile(v) {
            Ok(t) => Some(t),
            Err((suffix, e)) => {
                self.problem(format!("{path}{suffix}"), e);
                None
            }
        }
    }

    fn expr(&mut self, path: &str, text: &str, known: &[&str]) -> Option<Expr> {
        match Expr::compile_field(text) {
            Ok(e) => {
                self.variables(path, &e, known);
                Some(e)
            }
            Err(e) => {
                self.problem(path, e);
                None
            }
        }
    }

    fn variables(&mut self, path: &str, e: &Expr, known: &[&str]) {
        for v in &e.variables {
            if !known.contains(&v.as_str()) {
                self.problem(
                    path,
                    format!("`{v}` is not known here (known: {})", known.join(", ")),
                );
            }
        }
    }

    fn duration(&mut self, path: &str, d: Option<Duration>) {
        if d.is_some_and(|d| d.is_zero()) {
            self.problem(path, "must be longer than zero");
        }
    }
}

/// Checks a definition and compiles its expressions.
pub fn validate(def: WorkflowDef, limits: &Limits) -> Result<Workflow, Invalid> {
    let mut c = Checker {
        limits,
        problems: Vec::new(),
    };
    if def.steps.is_empty() {
        c.problem("steps", "a workflow needs at least one step");
    }
    if def.steps.len() > limits.max_steps {
        return Err(Problem::new(
            "steps",
            format!(
                "{} steps, over the limit of {}",
                def.steps.len(),
                limits.max_steps
            ),
        )
        .into());
    }
    let mut input_schemas = HashMap::new();
    for (name, decl) in &def.inputs {
        let path = format!("inputs.{name}");
        match (decl, input_type(decl)) {
            (_, Some(ty)) if !TYPES.contains(&ty) => c.problem(
                path,
                format!("unknown type `{ty}` (one of: {})", TYPES.join(", ")),
            ),
            (Value::String(_), _) => {}
            (Value::Object(_), _) => match jsonschema::validator_for(decl) {
                Ok(v) => {
                    input_schemas.insert(name.clone(), JsonSchema(Arc::new(v)));
                }
                Err(e) => c.problem(path, format!("not a valid JSON Schema: {e}")),
            },
            _ => c.problem(path, "must be a type name or a JSON Schema object"),
        }
    }
    c.duration("deadline", def.deadline);
    if let Some((field, why)) = def.budget.as_ref().and_then(Budget::problem) {
        c.problem(format!("budget{field}"), why);
    }

    let mut index = HashMap::with_capacity(def.steps.len());
    for (i, s) in def.steps.iter().enumerate() {
        if !valid_id(&s.id) {
            c.problem(
                format!("steps[{i}].id"),
                format!(
                    "`{}` is not a valid id (1 to 128 letters, digits, `_`, `-`, `.` or `:`)",
                    s.id
                ),
            );
        } else if let Some(first) = index.insert(s.id.clone(), i) {
            c.problem(
                format!("steps[{i}].id"),
                format!("duplicate id `{}` (first at steps[{first}])", s.id),
            );
            index.insert(s.id.clone(), first);
        }
    }

    let mut total_iterations: u64 = 0;
    let mut steps = Vec::with_capacity(def.steps.len());
    for (i, s) in def.steps.iter().enumerate() {
        let at = |field: &str| format!("steps[{i}].{field}");
        let mut needs = Vec::with_capacity(s.needs.len());
        for (k, n) in s.needs.iter().enumerate() {
            match index.get(n) {
                Some(&j) if j == i => {
                    c.problem(at(&format!("needs[{k}]")), "a step cannot need itself")
                }
                Some(&j) => needs.push(j),
                None => c.problem(at(&format!("needs[{k}]")), format!("unknown step `{n}`")),
            }
        }
        let kinds = [
            s.uses.is_some(),
            s.agent.is_some(),
            s.workflow.is_some(),
            s.approval.is_some(),
            s.wait_for.is_some(),
        ];
        let action = match (
            kinds.iter().filter(|&&k| k).count(),
            &s.approval,
            &s.wait_for,
        ) {
            (1, None, None) => {
                let target = if let Some(skill) = &s.uses {
                    if skill.trim().is_empty() {
                        c.problem(at("uses"), "must name a skill");
                    }
                    Target::Skill(skill.clone())
                } else if let Some(agent) = &s.agent {
                    if agent.trim().is_empty() {
                        c.problem(at("agent"), "must name an agent");
                    }
                    Target::Agent(agent.clone())
                } else {
                    let reference = s.workflow.as_deref().unwrap_or_default();
                    match parse_reference(reference) {
                        Some((name, version)) => Target::Workflow { name, version },
                        None => {
                            c.problem(at("workflow"), format!("`{reference}` is not NAME@VERSION"));
                            Target::Skill(String::new())
                        }
                    }
                };
                Action::Task(target)
            }
            (1, Some(a), None) => {
                c.duration(&at("approval.timeout"), a.timeout);
                let message = c
                    .value(&at("approval.message"), &Value::String(a.message.clone()))
                    .unwrap_or(Template::Literal(Value::Null));
                for e in message.exprs() {
                    c.variables(&at("approval.message"), e, &["inputs", "steps"]);
                }
                Action::Approval {
                    message,
                    timeout: a.timeout,
                }
            }
            (1, None, Some(w)) => {
                if !valid_id(&w.signal) {
                    c.problem(
                        at("wait_for.signal"),
                        "must be a name of letters, digits, `_`, `-`, `.` or `:`",
                    );
                }
                c.duration(&at("wait_for.timeout"), w.timeout);
                Action::Signal {
                    name: w.signal.clone(),
                    timeout: w.timeout,
                }
            }
            _ => {
                c.problem(
                    format!("steps[{i}]"),
                    "needs exactly one of `uses`, `agent`, `workflow`, `approval` and `wait_for`",
                );
                Action::Task(Target::Skill(String::new()))
            }
        };
        let is_task = matches!(action, Action::Task(_));
        if !s.labels.is_empty() && matches!(action, Action::Task(Target::Workflow { .. })) {
            c.problem(
                at("labels"),
                "a sub-workflow step runs no task of its own: put labels on its steps",
            );
        }
        if s.timeout.is_some() && matches!(action, Action::Task(Target::Workflow { .. })) {
            c.problem(
                at("timeout"),
                "a sub-workflow step has no attempt timeout: give the sub-workflow a `deadline`",
            );
        }
        for (field, set) in [
            ("with", !s.with.is_null()),
            ("foreach", s.foreach.is_some()),
            ("loop", s.loop_.is_some()),
            ("retry", s.retry.is_some()),
            ("timeout", s.timeout.is_some()),
            ("labels", !s.labels.is_empty()),
        ] {
            if set && !is_task {
                c.problem(
                    at(field),
                    "only a step with `uses`, `agent` or `workflow` can have this",
                );
            }
        }
        for (k, v) in &s.labels {
            if !valid_id(k) {
                c.problem(at("labels"), format!("`{k}` is not a valid label name"));
            }
            if v.is_empty() || v.len() > 128 {
                c.problem(at(&format!("labels.{k}")), "must be 1 to 128 bytes");
            }
        }
        if s.foreach.is_some() && s.loop_.is_some() {
            c.problem(
                at("loop"),
                "`loop` and `foreach` cannot be on the same step",
            );
        }
        let when = s
            .when
            .as_deref()
            .and_then(|w| c.expr(&at("when"), w, &["inputs", "steps"]));
        let foreach = match (&s.foreach, s.parallel) {
            (Some(items), parallel) => {
                let parallel = parallel.unwrap_or(limits.max_parallel);
                if parallel == 0 || parallel > limits.max_parallel {
                    c.problem(
                        at("parallel"),
                        format!("must be 1 to {}", limits.max_parallel),
                    );
                }
                c.expr(&at("foreach"), items, &["inputs", "steps"])
                    .map(|items| Foreach { items, parallel })
            }
            (None, Some(_)) => {
                c.problem(at("parallel"), "only with `foreach`");
                None
            }
            (None, None) => None,
        };
        let repeat = match &s.loop_ {
            Some(l) => {
                let until = c.expr(
                    &at("loop.until"),
                    &l.until,
                    &["inputs", "steps", "output", "iteration"],
                );
                match l.max_iterations {
                    None => {
                        c.problem(at("loop.max_iterations"), "required: a loop needs a cap");
                        None
                    }
                    Some(0) => {
                        c.problem(at("loop.max_iterations"), "must be at least 1");
                        None
                    }
                    Some(n) => {
                        total_iterations += u64::from(n);
                        if total_iterations > limits.max_total_iterations {
                            c.problem(
                                at("loop.max_iterations"),
                                format!(
                                    "the loops' iterations add up to {total_iterations}, over the limit of {}",
                                    limits.max_total_iterations
                                ),
                            );
                        }
                        until.map(|until| Loop {
                            until,
                            max_iterations: n,
                        })
                    }
                }
            }
            None => None,
        };
        if let Some(r) = &s.retry {
            if r.max_attempts == 0 || r.max_attempts > limits.max_attempts {
                c.problem(
                    at("retry.max_attempts"),
                    format!("must be 1 to {}", limits.max_attempts),
                );
            }
            if !(r.multiplier.is_finite() && r.multiplier >= 1.0) {
                c.problem(at("retry.multiplier"), "must be a number of at least 1");
            }
            if !(0.0..=1.0).contains(&r.jitter) {
                c.problem(at("retry.jitter"), "must be between 0 and 1");
            }
            if r.max_backoff < r.backoff {
                c.problem(
                    at("retry.max_backoff"),
                    "must not be shorter than `backoff`",
                );
            }
        }
        c.duration(&at("timeout"), s.timeout);
        let mut known = vec!["inputs", "steps"];
        if foreach.is_some() {
            known.extend(["item", "index"]);
        }
        if repeat.is_some() {
            known.extend(["iteration", "output"]);
        }
        let with = c
            .value(&at("with"), &s.with)
            .unwrap_or(Template::Literal(Value::Null));
        for e in with.exprs() {
            c.variables(&at("with"), e, &known);
        }
        let memory = s.memory.as_ref().and_then(|m| {
            if !is_task || matches!(action, Action::Task(Target::Workflow { .. })) {
                c.problem(
                    at("memory"),
                    "only a step with `uses` or `agent` has memory",
                );
            }
            if m.scope == MemoryScope::Workflow && def.name.is_empty() {
                c.problem(
                    at("memory.scope"),
                    "`workflow` memory belongs to a named workflow: register it, or give it a `name`",
                );
            }
            if m.last > MAX_MEMORY_LAST {
                c.problem(at("memory.last"), format!("must be 0 to {MAX_MEMORY_LAST}"));
            }
            if m.ttl.is_some_and(|t| t.is_zero() || t > MAX_MEMORY_TTL) {
                c.problem(at("memory.ttl"), "must be above 0 and at most 3 years");
            }
            if m.key.is_empty() || m.key.len() > 256 {
                c.problem(at("memory.key"), "must be 1 to 256 bytes");
            }
            let key = c.value(&at("memory.key"), &Value::String(m.key.clone()))?;
            for e in key.exprs() {
                c.variables(&at("memory.key"), e, &known);
            }
            Some(Memory {
                scope: m.scope,
                key,
                last: m.last,
                save: m.save,
                ttl: m.ttl,
            })
        });
        steps.push(Step {
            id: s.id.clone(),
            action,
            with,
            needs,
            when,
            foreach,
            repeat,
            retry: s.retry.clone(),
            timeout: s.timeout,
            on_failure: s.on_failure,
            labels: s.labels.clone(),
            memory,
        });
    }

    // Every step is in `steps` (with the needs that name known steps), so a cycle is
    // reported beside whatever else is wrong.
    if let Some(p) = find_cycle(&steps) {
        c.problems.push(p);
    }
    if c.problems.is_empty() {
        check_step_references(&mut c, &steps, &index);
    }
    let mut outputs = Vec::with_capacity(def.outputs.len());
    for (name, v) in &def.outputs {
        let path = format!("outputs.{name}");
        if let Some(t) = c.value(&path, v) {
            for e in t.exprs() {
                c.variables(&path, e, &["inputs", "steps"]);
                for s in &e.steps {
                    if !index.contains_key(s) {
                        c.problem(&path, format!("`steps.{s}` names no step"));
                    }
                }
            }
            outputs.push((name.clone(), t));
        }
    }
    if !c.problems.is_empty() {
        return Err(Invalid(c.problems));
    }
    Ok(Workflow {
        def,
        steps,
        outputs,
        index,
        input_schemas,
    })
}

/// A step may read only the steps it needs, directly or through other needs: those are
/// the ones sure to have finished.
fn check_step_references(c: &mut Checker, steps: &[Step], index: &HashMap<String, usize>) {
    for (i, step) in steps.iter().enumerate() {
        let named: Vec<String> = step
            .exprs()
            .iter()
            .flat_map(|e| e.steps.iter().cloned())
            .collect();
        if named.is_empty() {
            continue;
        }
        let mut ancestors: Option<Vec<bool>> = None;
        for s in named {
            match index.get(&s) {
                None => c.problem(format!("steps[{i}]"), format!("`steps.{s}` names no step")),
                // A direct need is the common case; walk the graph only for the others.
                Some(j) if step.needs.contains(j) => {}
                Some(&j) if !ancestors.get_or_insert_with(|| self::ancestors(steps, i))[j] => c
                    .problem(
                        format!("steps[{i}]"),
                        format!("reads `steps.{s}`, which is not among its needs"),
                    ),
                Some(_) => {}
            }
        }
    }
}

fn ancestors(steps: &[Step], of: usize) -> Vec<bool> {
    let mut seen = vec![false; steps.len()];
    let mut stack: Vec<usize> = steps[of].needs.clone();
    while let Some(j) = stack.pop() {
        if !seen[j] {
            seen[j] = true;
            stack.extend(&steps[j].needs);
        }
    }
    seen
}

/// Kahn's algorithm; on a cycle, names the steps on it.
fn find_cycle(steps: &[Step]) -> Option<Problem> {
    let mut indegree: Vec<usize> = steps.iter().map(|s| s.needs.len()).collect();
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); steps.len()];
    for (i, s) in steps.iter().enumerate() {
        for &n in &s.needs {
            dependents[n].push(i);
        }
    }
    let mut ready: Vec<usize> = (0..steps.len()).filter(|&i| indegree[i] == 0).collect();
    let mut done = 0;
    while let Some(i) = ready.pop() {
        done += 1;
        for &d in &dependents[i] {
            indegree[d] -= 1;
            if indegree[d] == 0 {
                ready.push(d);
            }
        }
    }
    if done == steps.len() {
        return None;
    }
    // Walk needs among the steps left until one repeats: that is a cycle.
    let start = (0..steps.len()).find(|&i| indegree[i] > 0)?;
    let mut path = vec![start];
    let mut at = start;
    loop {
        at = *steps[at].needs.iter().find(|&&n| indegree[n] > 0)?;
        if let Some(pos) = path.iter().position(|&p| p == at) {
            let mut names: Vec<&str> = path[pos..].iter().map(|&p| steps[p].id.as_str()).collect();
            names.push(&steps[at].id);
            return Some(Problem::new(
                format!("steps[{}].needs", path[pos]),
                format!("cycle: {}", names.join(" → ")),
            ));
        }
        path.push(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Instant;

    fn problems(yaml: &str) -> Vec<String> {
        match load(yaml, &Limits::default()) {
            Ok(_) => Vec::new(),
            Err(Invalid(ps)) => ps.iter().map(|p| p.to_string()).collect(),
        }
    }

    /// Before: a cycle was reported only when nothing else was wrong.
    #[test]
    fn a_cycle_is_reported_beside_other_problems() {
        let p = problems(
            "steps:\n  - {id: a, uses: x, needs: [b]}\n  - {id: b, uses: x, needs: [a], with: {q: '${{ 1 + }}'}}\n",
        );
        assert!(p.iter().any(|m| m.contains("cycle: a → b → a")), "{p:?}");
        assert!(
            p.iter()
                .any(|m| m.contains("steps[1].with.q: does not compile")),
            "{p:?}"
        );
    }

    #[test]
    fn accepts_the_design_sketch() {
        let w = load(
            r#"
name: market-brief
version: 3
inputs: { topic: string, publish: { type: boolean, default: false } }
steps:
  - id: plan
    uses: plan
    with: { topic: "${{ inputs.topic }}" }
  - id: research
    needs: [plan]
    foreach: "${{ steps.plan.output.sections }}"
    parallel: 4
    uses: research
    with: { section: "${{ item }}", n: "${{ index }}" }
    retry: { max_attempts: 3, backoff: 1s, max_backoff: 30s }
    timeout: 2m
  - id: review
    needs: [research]
    uses: review
    loop: { until: "${{ output.verdict == 'accept' }}", max_iterations: 3 }
  - id: sign-off
    needs: [review]
    when: "${{ inputs.publish }}"
    approval: { timeout: 24h }
outputs: { brief: "${{ steps.review.output.text }}" }
"#,
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(w.steps.len(), 4);
        assert_eq!(w.steps[1].foreach.as_ref().unwrap().parallel, 4);
        assert_eq!(w.steps[1].timeout, Some(Duration::from_secs(120)));
        assert_eq!(
            w.bind_inputs(&json!({ "topic": "rust" })).unwrap(),
            json!({ "topic": "rust", "publish": false })
        );
        // Inputs declared with a JSON Schema are checked against all of it.
        let typed = load(
            "inputs:\n  level: { type: string, enum: [low, high], default: low }\n  tags: { type: array, items: { type: string }, maxItems: 2 }\nsteps:\n  - {id: a, uses: x}\n",
            &Limits::default(),
        )
        .unwrap();
        let err = typed
            .bind_inputs(&json!({ "level": "mid", "tags": ["a", 2] }))
            .unwrap_err()
            .to_string();
        assert!(err.contains("inputs.level: \"mid\" is not one of"), "{err}");
        assert!(
            err.contains("inputs.tags[1]: 2 is not of type \"string\""),
            "{err}"
        );
        let err = load(
            "inputs: {n: {type: 7}}\nsteps:\n  - {id: a, uses: x}\n",
            &Limits::default(),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("inputs.n: not a valid JSON Schema"),
            "{err}"
        );
        let err = w
            .bind_inputs(&json!({ "topic": 3, "extra": 1 }))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "inputs.extra: not an input of this workflow (it takes: publish, topic); \
             inputs.topic: expected string, got a number"
        );
    }

    #[test]
    fn every_problem_has_its_path() {
        let cases: &[(&str, &str)] = &[
            (
                "steps:\n  - id: a\n    uses: x\n    bogus: 1\n",
                "steps[0].bogus: unknown field `bogus`",
            ),
            (
                "steps:\n  - {id: a, uses: x}\n  - {id: a, uses: y}\n",
                "steps[1].id: duplicate id `a` (first at steps[0])",
            ),
            (
                "steps:\n  - {id: a, uses: x, needs: [b]}\n",
                "steps[0].needs[0]: unknown step `b`",
            ),
            (
                "steps:\n  - {id: a, uses: x, needs: [b]}\n  - {id: b, uses: x, needs: [a]}\n",
                "steps[0].needs: cycle: a → b → a",
            ),
            (
                "steps:\n  - {id: a, uses: x, loop: {until: 'true'}}\n",
                "steps[0].loop.max_iterations: required: a loop needs a cap",
            ),
            (
                "steps:\n  - {id: a, uses: x, loop: {until: '${{ output. }}', max_iterations: 2}}\n",
                "steps[0].loop.until: does not compile",
            ),
            (
                "steps:\n  - {id: a, uses: x}\n  - {id: b, uses: x, when: '${{ steps.a.output }}'}\n",
                "steps[1]: reads `steps.a`, which is not among its needs",
            ),
            (
                "steps:\n  - {id: a, uses: x, when: '${{ steps.zz.output }}'}\n",
                "steps[0]: `steps.zz` names no step",
            ),
            (
                "steps:\n  - {id: a, uses: x, with: {q: '${{ item }}'}}\n",
                "steps[0].with: `item` is not known here (known: inputs, steps)",
            ),
            (
                "steps:\n  - {id: a, uses: x, with: {q: ['${{ 1 + }}']}}\n",
                "steps[0].with.q[0]: does not compile",
            ),
            (
                "steps:\n  - {id: a, uses: x, with: {q: '${{ nosuchfn(1) }}'}}\n",
                "steps[0].with.q: calls `nosuchfn`, which is not a function",
            ),
            (
                "steps:\n  - {id: a, uses: x, when: '${{ inputs.s.nosuchmethod() }}'}\n",
                "steps[0].when: calls `nosuchmethod`, which is not a function",
            ),
            (
                "steps:\n  - {id: a, uses: x, approval: {}}\n",
                "steps[0]: needs exactly one of `uses`, `agent`, `workflow`, `approval` and `wait_for`",
            ),
            (
                "steps:\n  - {id: a, approval: {}, retry: {max_attempts: 2}}\n",
                "steps[0].retry: only a step with `uses`, `agent` or `workflow` can have this",
            ),
            (
                "steps:\n  - {id: a, uses: x, retry: {max_attempts: 0}}\n",
                "steps[0].retry.max_attempts: must be 1 to 100",
            ),
            (
                "steps:\n  - {id: a, approval: {}, labels: {gpu: 'true'}}\n",
                "steps[0].labels: only a step with `uses`, `agent` or `workflow` can have this",
            ),
            (
                "steps:\n  - {id: a, uses: x, labels: {'a b': x}}\n",
                "steps[0].labels: `a b` is not a valid label name",
            ),
            (
                "steps:\n  - {id: a, uses: x, timeout: soon}\n",
                "steps[0].timeout: ",
            ),
            (
                "steps:\n  - {id: a, uses: x, parallel: 3}\n",
                "steps[0].parallel: only with `foreach`",
            ),
            (
                "steps:\n  - {id: 'a b', uses: x}\n",
                "steps[0].id: `a b` is not a valid id",
            ),
            (
                "inputs: {n: quantity}\nsteps:\n  - {id: a, uses: x}\n",
                "inputs.n: unknown type `quantity`",
            ),
            ("steps: []\n", "steps: a workflow needs at least one step"),
            (
                "steps:\n  - {id: a, uses: x}\noutputs: {r: '${{ steps.b.output }}'}\n",
                "outputs.r: `steps.b` names no step",
            ),
            (
                "{\"steps\": [{\"id\": \"a\", \"uses\": \"x\", \"on_failure\": \"maybe\"}]}",
                "steps[0].on_failure: unknown variant `maybe`",
            ),
        ];
        for (doc, want) in cases {
            let got = problems(doc);
            assert!(
                got.iter().any(|p| p.starts_with(want)),
                "for {doc:?}\n wanted a problem starting with {want:?}\n got {got:?}"
            );
        }
    }

    #[test]
    fn limits_hold() {
        let big = "x".repeat(Limits::default().max_bytes + 1);
        assert!(problems(&big)[0].contains("over the limit"));
        let limits = Limits {
            max_total_iterations: 5,
            ..Limits::default()
        };
        let doc = "steps:\n  - {id: a, uses: x, loop: {until: 'true', max_iterations: 3}}\n  - {id: b, uses: x, loop: {until: 'true', max_iterations: 3}}\n";
        let err = load(doc, &limits).unwrap_err();
        assert!(
            err.to_string()
                .contains("steps[1].loop.max_iterations: the loops' iterations add up to 6"),
            "{err}"
        );
        let deep = format!(
            "steps:\n  - id: a\n    uses: x\n    with: {}1{}\n",
            "[".repeat(40),
            "]".repeat(40)
        );
        assert!(problems(&deep)[0].starts_with("steps[0].with: nested deeper than 32 levels"));
    }

    #[test]
    fn a_ten_thousand_step_chain_validates_quickly() {
        let steps: Vec<Value> = (0..10_000)
            .map(|i| {
                let mut s = json!({ "id": format!("s{i}"), "uses": "echo", "with": { "n": "${{ inputs.n }}" } });
                if i > 0 {
                    s["needs"] = json!([format!("s{}", i - 1)]);
                }
                s
            })
            .collect();
        let text = serde_json::to_string(&json!({ "steps": steps })).unwrap();
        let started = Instant::now();
        let w = load(&text, &Limits::default()).unwrap();
        assert_eq!(w.steps.len(), 10_000);
        // Not a timing assertion: `cargo bench -p mesh-coordinator` measures it.
        eprintln!("10,000 steps validated in {:?}", started.elapsed());
    }

    #[test]
    fn sub_workflows_must_be_registered_valid_and_not_too_deep() {
        let parent = load(
            "steps:\n  - {id: a, workflow: child@1, foreach: '${{ [1, 2] }}', with: {n: '${{ item }}'}}\n  - {id: b, agent: reviewer, needs: [a]}\n",
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(
            parent.steps[0].action,
            Action::Task(Target::Workflow {
                name: "child".into(),
                version: 1
            })
        );
        assert_eq!(
            parent.steps[1].action,
            Action::Task(Target::Agent("reviewer".into()))
        );
        let child: WorkflowDef =
            parse("steps:\n  - {id: c, uses: echo}\n", &Limits::default()).unwrap();
        let known = |name: &str, v: u32| (name == "child" && v == 1).then(|| child.clone());
        check_sub_workflows(&parent, &Limits::default(), &known).unwrap();
        let none = |_: &str, _: u32| None;
        let err = check_sub_workflows(&parent, &Limits::default(), &none).unwrap_err();
        assert_eq!(
            err.to_string(),
            "steps[0].workflow: `child@1` is not registered"
        );
        // A workflow that names itself nests without end: the depth limit stops it.
        let selfish: WorkflowDef = parse(
            "steps:\n  - {id: again, workflow: child@1}\n",
            &Limits::default(),
        )
        .unwrap();
        let loops = |_: &str, _: u32| Some(selfish.clone());
        let err = check_sub_workflows(&parent, &Limits::default(), &loops).unwrap_err();
        assert!(
            err.to_string().contains("nest deeper than 4 levels"),
            "{err}"
        );
        let problems = |doc: &str| load(doc, &Limits::default()).unwrap_err().to_string();
        assert!(
            problems("steps:\n  - {id: a, workflow: child}\n")
                .contains("steps[0].workflow: `child` is not NAME@VERSION")
        );
        assert!(
            problems("steps:\n  - {id: a, workflow: c@1, timeout: 1s}\n")
                .contains("steps[0].timeout: a sub-workflow step has no attempt timeout")
        );
    }
}
