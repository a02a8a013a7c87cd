//! Expressions: CEL, compiled once when a workflow is validated and evaluated against JSON
//! bindings. A template is a JSON value whose strings may hold `${{ … }}`: a string that is
//! one expression and nothing else takes the expression's value (a list stays a list);
//! a string that mixes text and expressions becomes text.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, OnceLock};

use cel::common::ast::{EntryExpr, Expr as Ast, IdedExpr, LiteralValue};
use cel::{Context, Env, Program};
use serde_json::{Map, Value};

/// Variables an expression may name, wherever it is written.
pub const VARIABLES: [&str; 6] = ["inputs", "steps", "item", "index", "iteration", "output"];

fn env() -> &'static Arc<Env> {
    static ENV: OnceLock<Arc<Env>> = OnceLock::new();
    ENV.get_or_init(|| Arc::new(Env::stdlib()))
}

/// Expressions compiled lately on this thread, by source: workflows repeat expressions
/// (`${{ inputs.topic }}` in every step, every goal of one workflow), and parsing is most of
/// a validation's cost. Only short sources are kept, and the cache is emptied when full.
const CACHED_EXPRESSIONS: usize = 256;
const CACHED_SOURCE_BYTES: usize = 256;

thread_local! {
    static COMPILED: RefCell<HashMap<String, Expr>> = RefCell::new(HashMap::new());
}

/// A compiled CEL expression and what it names.
#[derive(Clone)]
pub struct Expr {
    source: String,
    program: Arc<Program>,
    /// Free variables, e.g. `inputs`, `item`.
    pub variables: BTreeSet<String>,
    /// Steps named as `steps.<id>`.
    pub steps: BTreeSet<String>,
    /// For each free variable, the fields it is read by (`inputs.topic`, `inputs['a b']`),
    /// or `None` where it is used whole: only those fields are handed to CEL.
    fields: BTreeMap<String, Option<BTreeSet<String>>>,
    /// Long or nested enough to be parsed and evaluated on a stack of its own.
    deep: bool,
}

impl std::fmt::Debug for Expr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Expr({:?})", self.source)
    }
}

impl PartialEq for Expr {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Expr {
    /// Compiles CEL source (without `${{ }}`).
    pub fn compile(source: &str) -> Result<Self, String> {
        if source.len() > CACHED_SOURCE_BYTES {
            return Self::compile_uncached(source);
        }
        if let Some(hit) = COMPILED.with_borrow(|c| c.get(source).cloned()) {
            return Ok(hit);
        }
        let expr = Self::compile_uncached(source)?;
        COMPILED.with_borrow_mut(|c| {
            if c.len() >= CACHED_EXPRESSIONS {
                c.clear();
            }
            c.insert(source.to_owned(), expr.clone());
        });
        Ok(expr)
    }

    fn compile_uncached(source: &str) -> Result<Self, String> {
        let deep = check_shape(source)?;
        let (program, refs) = on_enough_stack(deep, || {
            let program = env().compile(source).map_err(|e| {
                let text = e.to_string();
                format!("does not compile: {}", text.trim())
            })?;
            let mut refs = Refs::default();
            refs.walk(program.expression(), &mut Vec::new());
            if let Some(unknown) = refs.calls.iter().find(|c| !function_known(c)) {
                return Err(format!(
                    "calls `{}`, which is not a function of this expression language",
                    unknown.name
                ));
            }
            Ok::<_, String>((program, refs))
        })?;
        Ok(Self {
            source: source.trim().to_owned(),
            program: Arc::new(program),
            variables: refs.variables,
            steps: refs.steps,
            fields: refs.fields,
            deep,
        })
    }

    /// Compiles a field that must be exactly one `${{ … }}` (or bare CEL).
    pub fn compile_field(text: &str) -> Result<Self, String> {
        match split(text)?.as_slice() {
            [Part::Expr(source)] => Self::compile(source),
            [Part::Text(source)] => Self::compile(source),
            _ => Err("must be one expression, `${{ … }}`, with no text around it".to_owned()),
        }
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates against `bindings` (variable name → JSON value).
    /// Refuses, before it starts, an evaluation whose cost bound ([`Expr::cost`]) is over
    /// [`MAX_EVAL_COST`].
    pub fn eval(&self, bindings: &dyn Bindings) -> Result<Value, String> {
        let cost = self.cost(bindings);
        if cost > MAX_EVAL_COST {
            return Err(format!(
                "`{}`: could take up to {cost} evaluation steps over these values, the limit is {MAX_EVAL_COST}; nest fewer `all`/`exists`/`map`/`filter` over large lists",
                self.source
            ));
        }
        let mut ctx = Context::with_env(Arc::clone(env()));
        for name in &self.variables {
            if let Some(value) = bindings.value(name) {
                ctx.add_variable_from_value(name.as_str(), self.to_cel_used(name, value));
            }
        }
        let run = || on_enough_stack(self.deep, || self.program.execute(&ctx));
        let value = if cost > OFFLOAD_COST {
            off_the_runtime(run)
        } else {
            run()
        }
        .map_err(|e| format!("`{}`: {e}", self.source))?;
        value
            .json()
            .map_err(|e| format!("`{}`: result is not JSON: {e:?}", self.source))
    }

    /// An upper bound on the steps evaluating this expression over `bindings` takes, and on
    /// the size of every value it builds on the way: each comprehension (`all`, `exists`,
    /// `map`, `filter`, …) multiplies the cost of its body by the size of its range, and a
    /// range is never larger than the values it is made of. Linear in the expression and
    /// in the bindings it reads.
    pub fn cost(&self, bindings: &dyn Bindings) -> u64 {
        let mut scope = Scope {
            bindings,
            vars: Vec::new(),
        };
        on_enough_stack(self.deep, || scope.bound(self.program.expression()).cost)
    }

    /// `value` as CEL, with only the fields this expression reads when it reads fields of
    /// an object: a run's inputs are not converted whole for `inputs.topic`.
    fn to_cel_used(&self, name: &str, value: &Value) -> cel::Value {
        match (self.fields.get(name), value) {
            (Some(Some(used)), Value::Object(o)) => {
                let map: HashMap<String, cel::Value> = used
                    .iter()
                    .filter_map(|k| o.get(k).map(|v| (k.clone(), to_cel(v))))
                    .collect();
                cel::Value::Map(map.into())
            }
            _ => to_cel(value),
        }
    }

    /// Evaluates a condition: it must give a boolean.
    pub fn eval_bool(&self, bindings: &dyn Bindings) -> Result<bool, String> {
        match self.eval(bindings)? {
            Value::Bool(b) => Ok(b),
            other => Err(format!(
                "`{}` gave {}, not a boolean",
                self.source,
                kind(&other)
            )),
        }
    }
}

/// The values expressions read, by variable name.
pub trait Bindings {
    fn value(&self, name: &str) -> Option<&Value>;
}

impl Bindings for Map<String, Value> {
    fn value(&self, name: &str) -> Option<&Value> {
        self.get(name)
    }
}

/// A run's bindings: its inputs borrowed (never copied per evaluation), the rest owned.
#[derive(Debug)]
pub struct RunBindings<'a> {
    pub inputs: &'a Value,
    pub rest: Map<String, Value>,
}

impl Bindings for RunBindings<'_> {
    fn value(&self, name: &str) -> Option<&Value> {
        match name {
            "inputs" => Some(self.inputs),
            _ => self.rest.get(name),
        }
    }
}

/// JSON to CEL. Whole numbers become `int` (CEL's `1 + 1` is `int + int`); others `double`.
fn to_cel(v: &Value) -> cel::Value {
    match v {
        Value::Null => cel::Value::Null,
        Value::Bool(b) => cel::Value::Bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => cel::Value::Int(i),
            (None, Some(u)) => cel::Value::UInt(u),
            _ => cel::Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => cel::Value::String(Arc::new(s.clone())),
        Value::Array(a) => cel::Value::List(Arc::new(a.iter().map(to_cel).collect())),
        Value::Object(o) => {
            let map: HashMap<String, cel::Value> =
                o.iter().map(|(k, v)| (k.clone(), to_cel(v))).collect();
            cel::Value::Map(map.into())
        }
    }
}

/// Longest expression accepted, in bytes.
pub const MAX_EXPRESSION_BYTES: usize = 1024;
/// Deepest nesting of `(`, `[` and `{` accepted.
pub const MAX_EXPRESSION_NESTING: usize = 16;
/// Longest run of prefix operators (`!`, `-`) accepted.
pub const MAX_PREFIX_RUN: usize = 4;

/// Stack for parsing and evaluating a deep expression. The CEL parser recurses through
/// every precedence rule for each bracket level (about 180 KiB a level in a debug build,
/// 20 KiB in release), and the evaluator once per operator; a 2 MiB thread stack (tokio's
/// workers) does not hold the worst expression the limits allow.
const DEEP_STACK: usize = 64 << 20;
/// Below this much stack left, even a shallow expression moves to a stack of its own.
const RED_ZONE: usize = 1 << 20;

/// Runs `f` where a deep expression cannot overflow the stack: a shallow one in place (if
/// a comfortable margin is left), a deep one always on a fresh stack (mapped on demand:
/// only the pages it touches cost memory).
fn on_enough_stack<T>(deep: bool, f: impl FnOnce() -> T) -> T {
    if deep {
        stacker::grow(DEEP_STACK, f)
    } else {
        stacker::maybe_grow(RED_ZONE, DEEP_STACK, f)
    }
}

/// Refuses expressions whose shape alone could exhaust any stack (found by fuzzing: a
/// few dozen `(` crashed the process that parsed them), and tells whether an accepted one
/// is deep enough to need a stack of its own.
fn check_shape(source: &str) -> Result<bool, String> {
    if source.len() > MAX_EXPRESSION_BYTES {
        return Err(format!(
            "is {} bytes, the limit is {MAX_EXPRESSION_BYTES}",
            source.len()
        ));
    }
    let (mut depth, mut deepest, mut prefix_run, mut longest_run) =
        (0usize, 0usize, 0usize, 0usize);
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in source.chars() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '\'' | '"' => quote = Some(c),
            '(' | '[' | '{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        if c == '!' || c == '-' {
            prefix_run += 1;
            longest_run = longest_run.max(prefix_run);
        } else if !c.is_whitespace() {
            prefix_run = 0;
        }
    }
    if deepest > MAX_EXPRESSION_NESTING {
        return Err(format!(
            "nests brackets {deepest} deep, the limit is {MAX_EXPRESSION_NESTING}"
        ));
    }
    if longest_run > MAX_PREFIX_RUN {
        return Err(format!(
            "has {longest_run} `!`/`-` in a row, the limit is {MAX_PREFIX_RUN}"
        ));
    }
    Ok(deepest > 2 || source.len() > 96)
}

pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Most evaluation steps one expression may take over the values it is given (see
/// [`Expr::cost`]). A step is 20–25 ns in a release build (`inputs.l.map(x, x * 2)` over
/// 10,000 elements bounds at 130,003 and takes 2.6 ms), so the worst accepted expression
/// takes about 0.1 s.
pub const MAX_EVAL_COST: u64 = 5_000_000;

/// Above this cost bound (about a millisecond), an evaluation on a tokio worker thread
/// hands the worker's other tasks (health checks, other calls) to another thread first.
const OFFLOAD_COST: u64 = 50_000;

/// Runs `f`, which may take a while, where it does not hold up a tokio runtime's other
/// tasks: on a worker of a multi-threaded runtime, the worker's queue moves to another
/// thread while `f` runs (`block_in_place`); anywhere else `f` just runs.
fn off_the_runtime<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Size of a JSON value for [`Expr::cost`]: its nodes, and a string's bytes in 64s.
fn value_size(v: &Value) -> u64 {
    match v {
        Value::String(s) => 1 + s.len() as u64 / 64,
        Value::Array(a) => a.iter().fold(1u64, |n, x| n.saturating_add(value_size(x))),
        Value::Object(o) => o.iter().fold(1u64, |n, (k, x)| {
            n.saturating_add(value_size(x))
                .saturating_add(1 + k.len() as u64 / 64)
        }),
        _ => 1,
    }
}

/// Bounds on one sub-expression: steps to evaluate it, size of its value, how many
/// elements iterating it yields, and the size of one of them.
#[derive(Clone, Copy)]
struct Bound {
    cost: u64,
    size: u64,
    len: u64,
    elem: u64,
}

impl Bound {
    /// A value of `size` whose shape is unknown: any part of it may be iterated.
    fn opaque(cost: u64, size: u64) -> Self {
        Bound {
            cost,
            size,
            len: size,
            elem: size,
        }
    }

    /// A value read from the bindings: its shape is known exactly.
    fn of_value(cost: u64, v: &Value) -> Self {
        let (len, elem) = match v {
            Value::Array(a) => (a.len() as u64, a.iter().map(value_size).max().unwrap_or(0)),
            Value::Object(o) => (
                o.len() as u64,
                o.keys().map(|k| 1 + k.len() as u64 / 64).max().unwrap_or(0),
            ),
            _ => (0, 0),
        };
        Bound {
            cost,
            size: value_size(v),
            len,
            elem,
        }
    }
}

/// The bindings an expression reads, and the comprehension variables in scope over them.
struct Scope<'b> {
    bindings: &'b dyn Bindings,
    vars: Vec<(String, Bound)>,
}

impl Scope<'_> {
    fn shadowed(&self, name: &str) -> bool {
        self.vars.iter().any(|(n, _)| n == name)
    }

    /// The value a path of names and constant keys into the bindings reads, if any.
    fn path(&self, e: &IdedExpr) -> Option<&Value> {
        match &e.expr {
            Ast::Ident(name) if !self.shadowed(name) => self.bindings.value(name),
            Ast::Select(s) if !s.test => self.path(&s.operand)?.get(&s.field),
            Ast::Call(c)
                if c.func_name == cel::common::ast::operators::INDEX && c.target.is_none() =>
            {
                let [target, key] = c.args.as_slice() else {
                    return None;
                };
                let v = self.path(target)?;
                match &key.expr {
                    Ast::Literal(LiteralValue::String(k)) => v.get(k.inner()),
                    Ast::Literal(LiteralValue::Int(i)) => v.get(usize::try_from(*i.inner()).ok()?),
                    _ => None,
                }
            }
            _ => None,
        }
    }

    fn bound(&mut self, e: &IdedExpr) -> Bound {
        use cel::common::ast::operators as op;
        if let Some(v) = self.path(e) {
            return Bound::of_value(1, v);
        }
        match &e.expr {
            Ast::Unspecified | Ast::Literal(_) => {
                let size = match &e.expr {
                    Ast::Literal(LiteralValue::String(s)) => 1 + s.inner().len() as u64 / 64,
                    _ => 1,
                };
                Bound::opaque(1, size)
            }
            Ast::Ident(name) => match self.vars.iter().rev().find(|(n, _)| n == name) {
                Some((_, b)) => Bound { cost: 1, ..*b },
                None => Bound::opaque(1, 1),
            },
            Ast::Select(s) => {
                let b = self.bound(&s.operand);
                Bound::opaque(b.cost.saturating_add(1), b.elem.max(1))
            }
            Ast::Call(c) => {
                let args: Vec<Bound> = c
                    .target
                    .iter()
                    .map(|t| &**t)
                    .chain(c.args.iter())
                    .map(|a| self.bound(a))
                    .collect();
                let cost = args.iter().fold(1u64, |n, b| n.saturating_add(b.cost));
                let sum =
                    |f: fn(&Bound) -> u64| args.iter().fold(0u64, |n, b| n.saturating_add(f(b)));
                let name = c.func_name.as_str();
                match name {
                    // Logic: no work proportional to the operands' size.
                    _ if name == op::LOGICAL_AND
                        || name == op::LOGICAL_OR
                        || name == op::LOGICAL_NOT
                        || name == op::NOT_STRICTLY_FALSE
                        || name == op::NEGATE
                        || name == "size" =>
                    {
                        Bound::opaque(cost, 1)
                    }
                    // One element of a list or map.
                    _ if name == op::INDEX || name == op::OPT_INDEX => {
                        let elem = args.first().map_or(1, |b| b.elem).max(1);
                        Bound::opaque(cost, elem)
                    }
                    _ if name == op::CONDITIONAL => {
                        let max =
                            |f: fn(&Bound) -> u64| args.iter().skip(1).map(f).max().unwrap_or(1);
                        Bound {
                            cost,
                            size: max(|b| b.size),
                            len: max(|b| b.len),
                            elem: max(|b| b.elem),
                        }
                    }
                    // `+` concatenates: as long as both operands, and copies them.
                    _ if name == op::ADD => Bound {
                        cost: cost.saturating_add(sum(|b| b.size)),
                        size: sum(|b| b.size).max(1),
                        len: sum(|b| b.len),
                        elem: args.iter().map(|b| b.elem).max().unwrap_or(1),
                    },
                    // Anything else may read, compare or build from all of its operands
                    // (`==` compares, `in` scans, `matches` reads the text).
                    _ => {
                        Bound::opaque(cost.saturating_add(sum(|b| b.size)), sum(|b| b.size).max(1))
                    }
                }
            }
            Ast::List(l) => {
                let items: Vec<Bound> = l.elements.iter().map(|x| self.bound(x)).collect();
                Bound {
                    cost: items.iter().fold(1u64, |n, b| n.saturating_add(b.cost)),
                    size: items.iter().fold(1u64, |n, b| n.saturating_add(b.size)),
                    len: items.len() as u64,
                    elem: items.iter().map(|b| b.size).max().unwrap_or(0),
                }
            }
            Ast::Map(m) => self.entries(&m.entries),
            Ast::Struct(s) => self.entries(&s.entries),
            Ast::Comprehension(c) => {
                let range = self.bound(&c.iter_range);
                let init = self.bound(&c.accu_init);
                let n = range.len;
                let before = self.vars.len();
                let item = Bound::opaque(1, range.elem);
                self.vars.push((c.iter_var.clone(), item));
                if let Some(v) = &c.iter_var2 {
                    self.vars.push((v.clone(), item));
                }
                // The accumulator grows by at most one step's value per element. The step
                // is walked once (a second walk per level would be exponential in the
                // nesting); its reads of the accumulator are cheap in every macro.
                self.vars.push((c.accu_var.clone(), init));
                let step = self.bound(&c.loop_step);
                let accu = Bound {
                    cost: 1,
                    size: init.size.saturating_add(n.saturating_mul(step.size)),
                    len: init.len.saturating_add(n),
                    elem: init.elem.max(step.size),
                };
                self.vars.last_mut().expect("pushed").1 = accu;
                let cond = self.bound(&c.loop_cond);
                let result = self.bound(&c.result);
                self.vars.truncate(before);
                Bound {
                    cost: range
                        .cost
                        .saturating_add(init.cost)
                        .saturating_add(n.saturating_mul(cond.cost.saturating_add(step.cost)))
                        .saturating_add(result.cost),
                    ..result
                }
            }
        }
    }

    fn entries(&mut self, entries: &[cel::common::ast::IdedEntryExpr]) -> Bound {
        let mut total = Bound::opaque(1, 1);
        total.len = entries.len() as u64;
        for entry in entries {
            let parts = match &entry.expr {
                EntryExpr::StructField(f) => vec![self.bound(&f.value)],
                EntryExpr::MapEntry(m) => vec![self.bound(&m.key), self.bound(&m.value)],
            };
            for b in parts {
                total.cost = total.cost.saturating_add(b.cost);
                total.size = total.size.saturating_add(b.size);
                total.elem = total.elem.max(b.size);
            }
        }
        total
    }
}

/// Whether the expression language has the function a call names: the call is tried once
/// with `null` arguments, and only "undeclared" means no (a wrong argument type or count
/// means the function exists). Answers are kept for the process's life.
fn function_known(call: &Call) -> bool {
    static KNOWN: OnceLock<std::sync::Mutex<HashMap<String, bool>>> = OnceLock::new();
    let nulls = vec!["null"; call.arity].join(", ");
    let probe = match &call.target {
        None => format!("{}({nulls})", call.name),
        Some(target) => format!(
            "{}.{}({nulls})",
            target.as_deref().unwrap_or("null"),
            call.name
        ),
    };
    let known = KNOWN.get_or_init(Default::default);
    if let Some(&hit) = known.lock().expect("not poisoned").get(&probe) {
        return hit;
    }
    let answer = match env().compile(&probe) {
        // A name that does not even parse as a call is not a function either.
        Err(_) => false,
        Ok(program) => {
            let ctx = Context::with_env(Arc::clone(env()));
            !matches!(
                program.execute(&ctx),
                Err(cel::ExecutionError::UndeclaredReference(name))
                    if *name == call.name
                        || call.target.as_ref().and_then(|t| t.as_deref()).is_some_and(
                            |t| *name == format!("{t}.{}", call.name) || *name == t
                        )
            )
        }
    };
    let mut map = known.lock().expect("not poisoned");
    if map.len() < 4096 {
        map.insert(probe, answer);
    }
    answer
}

/// Names an expression uses, found by walking its syntax tree; variables bound by macros
/// (`list.map(x, …)`) are not free.
#[derive(Default)]
struct Refs {
    variables: BTreeSet<String>,
    steps: BTreeSet<String>,
    /// Functions called by name, as probes that resolve them (see [`function_known`]).
    calls: BTreeSet<Call>,
    fields: BTreeMap<String, Option<BTreeSet<String>>>,
}

/// A call an expression makes, enough to resolve its function without its arguments.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Call {
    name: String,
    arity: usize,
    /// `x.f()`: the target, when it is a name that may be a namespace (`optional.of`).
    target: Option<Option<String>>,
}

impl Refs {
    /// A free variable read by one field (`Some`) or whole (`None`).
    fn read(&mut self, root: &str, field: Option<&str>) {
        self.variables.insert(root.to_owned());
        let entry = self
            .fields
            .entry(root.to_owned())
            .or_insert_with(|| Some(BTreeSet::new()));
        match (entry, field) {
            (Some(set), Some(f)) => {
                set.insert(f.to_owned());
            }
            (entry, _) => *entry = None,
        }
    }

    fn walk(&mut self, e: &IdedExpr, bound: &mut Vec<String>) {
        match &e.expr {
            Ast::Unspecified | Ast::Literal(_) => {}
            Ast::Ident(name) => {
                if !bound.contains(name) {
                    self.read(name, None);
                }
            }
            Ast::Select(s) => match &s.operand.expr {
                Ast::Ident(root) if !bound.contains(root) => {
                    if root == "steps" {
                        self.steps.insert(s.field.clone());
                    }
                    self.read(root, Some(&s.field));
                }
                _ => self.walk(&s.operand, bound),
            },
            Ast::Call(c) => {
                // `steps['sign-off']`: ids that are not CEL identifiers.
                if c.func_name == cel::common::ast::operators::INDEX
                    && c.target.is_none()
                    && let [target, key] = c.args.as_slice()
                    && let Ast::Ident(root) = &target.expr
                    && let Ast::Literal(LiteralValue::String(id)) = &key.expr
                    && !bound.contains(root)
                {
                    if root == "steps" {
                        self.steps.insert(id.inner().to_owned());
                    }
                    self.read(root, Some(id.inner()));
                    return;
                }
                if !c.func_name.starts_with('_') && !c.func_name.starts_with('@') {
                    let target = c.target.as_ref().map(|t| match &t.expr {
                        Ast::Ident(name)
                            if !bound.contains(name) && !VARIABLES.contains(&name.as_str()) =>
                        {
                            Some(name.clone())
                        }
                        _ => None,
                    });
                    self.calls.insert(Call {
                        name: c.func_name.clone(),
                        arity: c.args.len(),
                        target,
                    });
                }
                if let Some(t) = &c.target {
                    self.walk(t, bound);
                }
                for a in &c.args {
                    self.walk(a, bound);
                }
            }
            Ast::List(l) => {
                for x in &l.elements {
                    self.walk(x, bound);
                }
            }
            Ast::Map(m) => self.entries(&m.entries, bound),
            Ast::Struct(s) => self.entries(&s.entries, bound),
            Ast::Comprehension(c) => {
                self.walk(&c.iter_range, bound);
                self.walk(&c.accu_init, bound);
                let before = bound.len();
                bound.push(c.iter_var.clone());
                if let Some(v) = &c.iter_var2 {
                    bound.push(v.clone());
                }
                bound.push(c.accu_var.clone());
                self.walk(&c.loop_cond, bound);
                self.walk(&c.loop_step, bound);
                self.walk(&c.result, bound);
                bound.truncate(before);
            }
        }
    }

    fn entries(&mut self, entries: &[cel::common::ast::IdedEntryExpr], bound: &mut Vec<String>) {
        for entry in entries {
            match &entry.expr {
                EntryExpr::StructField(f) => self.walk(&f.value, bound),
                EntryExpr::MapEntry(m) => {
                    self.walk(&m.key, bound);
                    self.walk(&m.value, bound);
                }
            }
        }
    }
}

#[derive(Debug, PartialEq)]
enum Part<'a> {
    Text(&'a str),
    Expr(&'a str),
}

/// Splits text at its `${{ … }}`. The closing `}}` is the first one outside string
/// literals and map braces, so `${{ {'a': {'b': 1}} }}` is one expression.
fn split(text: &str) -> Result<Vec<Part<'_>>, String> {
    let mut parts = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("${{") {
        if start > 0 {
            parts.push(Part::Text(&rest[..start]));
        }
        let body = &rest[start + 3..];
        let end = closing(body).ok_or_else(|| "`${{` without its closing `}}`".to_owned())?;
        let inner = &body[..end];
        if mesh_proto::secrets::reference(inner).is_some() {
            // A secret stays as written: its value is put in on the node, never here.
            parts.push(Part::Text(&rest[start..start + 3 + end + 2]));
        } else if inner.trim_start().starts_with("secrets") {
            return Err(format!(
                "`{}`: a secret is named alone, as `${{{{ secrets.NAME }}}}` (NAME: letters, digits, `_`)",
                inner.trim()
            ));
        } else {
            parts.push(Part::Expr(inner));
        }
        rest = &body[end + 2..];
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest));
    }
    Ok(parts)
}

fn closing(body: &str) -> Option<usize> {
    let bytes = body.as_bytes();
    let mut depth = 0usize;
    let mut quote: Option<u8> = None;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match quote {
            Some(q) => {
                if b == b'\\' {
                    i += 1;
                } else if b == q {
                    quote = None;
                }
            }
            None => match b {
                b'\'' | b'"' => quote = Some(b),
                b'{' => depth += 1,
                b'}' if depth == 0 && bytes.get(i + 1) == Some(&b'}') => return Some(i),
                b'}' => depth = depth.saturating_sub(1),
                _ => {}
            },
        }
        i += 1;
    }
    None
}

/// A JSON value with compiled expressions in its strings.
#[derive(Clone, Debug, PartialEq)]
pub enum Template {
    /// No expression anywhere below.
    Literal(Value),
    /// A string that is one expression: takes its value.
    Expr(Expr),
    /// Text with expressions in it: becomes text.
    Text(Vec<Piece>),
    List(Vec<Template>),
    Object(Vec<(String, Template)>),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Piece {
    Text(String),
    Expr(Expr),
}

/// Where in a template an error is: a suffix such as `.query` or `[2]`.
pub type TemplateError = (String, String);

impl Template {
    pub fn compile(value: &Value) -> Result<Self, TemplateError> {
        let t = match value {
            Value::String(s) if s.contains("${{") => {
                let parts = split(s).map_err(|e| (String::new(), e))?;
                match parts.as_slice() {
                    [Part::Expr(src)] => {
                        Template::Expr(Expr::compile(src).map_err(|e| (String::new(), e))?)
                    }
                    _ => Template::Text(
                        parts
                            .into_iter()
                            .map(|p| match p {
                                Part::Text(t) => Ok(Piece::Text(t.to_owned())),
                                Part::Expr(src) => Expr::compile(src).map(Piece::Expr),
                            })
                            .collect::<Result<_, _>>()
                            .map_err(|e| (String::new(), e))?,
                    ),
                }
            }
            Value::Array(items) => {
                let items = items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| Template::compile(v).map_err(|(p, e)| (format!("[{i}]{p}"), e)))
                    .collect::<Result<Vec<_>, _>>()?;
                if items.iter().all(|t| matches!(t, Template::Literal(_))) {
                    Template::Literal(value.clone())
                } else {
                    Template::List(items)
                }
            }
            Value::Object(map) => {
                let fields = map
                    .iter()
                    .map(|(k, v)| {
                        Template::compile(v)
                            .map(|t| (k.clone(), t))
                            .map_err(|(p, e)| (format!(".{k}{p}"), e))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                if fields
                    .iter()
                    .all(|(_, t)| matches!(t, Template::Literal(_)))
                {
                    Template::Literal(value.clone())
                } else {
                    Template::Object(fields)
                }
            }
            other => Template::Literal(other.clone()),
        };
        Ok(t)
    }

    /// Every expression in the template.
    pub fn exprs(&self) -> Vec<&Expr> {
        let mut out = Vec::new();
        self.collect(&mut out);
        out
    }

    fn collect<'a>(&'a self, out: &mut Vec<&'a Expr>) {
        match self {
            Template::Literal(_) => {}
            Template::Expr(e) => out.push(e),
            Template::Text(pieces) => out.extend(pieces.iter().filter_map(|p| match p {
                Piece::Expr(e) => Some(e),
                Piece::Text(_) => None,
            })),
            Template::List(items) => items.iter().for_each(|t| t.collect(out)),
            Template::Object(fields) => fields.iter().for_each(|(_, t)| t.collect(out)),
        }
    }

    /// Renders the template; an error names where in it the failing expression is
    /// (`.query: …`, `[2]: …`).
    pub fn render(&self, bindings: &dyn Bindings) -> Result<Value, String> {
        self.render_at(bindings).map_err(|(path, e)| {
            if path.is_empty() {
                e
            } else {
                format!("{path}: {e}")
            }
        })
    }

    /// Renders the template; an error is where in it (a suffix such as `.query`) and what.
    pub fn render_at(&self, bindings: &dyn Bindings) -> Result<Value, TemplateError> {
        let here = |e| (String::new(), e);
        Ok(match self {
            Template::Literal(v) => v.clone(),
            Template::Expr(e) => e.eval(bindings).map_err(here)?,
            Template::Text(pieces) => {
                let mut s = String::new();
                for p in pieces {
                    match p {
                        Piece::Text(t) => s.push_str(t),
                        Piece::Expr(e) => match e.eval(bindings).map_err(here)? {
                            Value::String(v) => s.push_str(&v),
                            other => s.push_str(&other.to_string()),
                        },
                    }
                }
                Value::String(s)
            }
            Template::List(items) => Value::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, t)| {
                        t.render_at(bindings)
                            .map_err(|(p, e)| (format!("[{i}]{p}"), e))
                    })
                    .collect::<Result<_, _>>()?,
            ),
            Template::Object(fields) => Value::Object(
                fields
                    .iter()
                    .map(|(k, t)| {
                        t.render_at(bindings)
                            .map(|v| (k.clone(), v))
                            .map_err(|(p, e)| (format!(".{k}{p}"), e))
                    })
                    .collect::<Result<_, _>>()?,
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_repeated_expression_is_parsed_once_and_a_long_one_every_time() {
        let a = Expr::compile("inputs.topic + ' (cached)'").unwrap();
        let b = Expr::compile("inputs.topic + ' (cached)'").unwrap();
        assert!(Arc::ptr_eq(&a.program, &b.program));
        let out = b.eval(&bindings(json!({ "inputs": { "topic": "x" } })));
        assert_eq!(out.unwrap(), json!("x (cached)"));
        // A failed compilation is not kept: it fails again with its reason.
        assert!(Expr::compile("inputs.(").is_err());
        assert!(
            Expr::compile("inputs.(")
                .unwrap_err()
                .contains("does not compile")
        );
        let long = format!("inputs.topic + '{}'", "y".repeat(CACHED_SOURCE_BYTES));
        let (c, d) = (Expr::compile(&long).unwrap(), Expr::compile(&long).unwrap());
        assert!(!Arc::ptr_eq(&c.program, &d.program));
        // Full: emptied, then filled again.
        for i in 0..CACHED_EXPRESSIONS + 1 {
            Expr::compile(&format!("{i} + 1")).unwrap();
        }
        assert!(COMPILED.with_borrow(|c| c.len()) <= CACHED_EXPRESSIONS);
    }

    fn bindings(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn finds_free_variables_and_named_steps() {
        let e = Expr::compile(
            "steps.review.output.verdict == 'accept' && steps['sign-off'].state == 'succeeded' \
             && inputs.items.all(x, x > index)",
        )
        .unwrap();
        assert_eq!(
            e.variables.iter().map(String::as_str).collect::<Vec<_>>(),
            ["index", "inputs", "steps"]
        );
        assert_eq!(
            e.steps.iter().map(String::as_str).collect::<Vec<_>>(),
            ["review", "sign-off"]
        );
    }

    #[test]
    fn a_whole_string_expression_keeps_its_type_and_text_interpolates() {
        let t = Template::compile(&json!({
            "list": "${{ inputs.xs }}",
            "text": "item ${{ index + 1 }} of ${{ size(inputs.xs) }}: ${{ item }}",
            "nested": "${{ {'a': {'b': 1}} }}",
            "plain": [1, "two"],
        }))
        .unwrap();
        let out = t
            .render(&bindings(
                json!({ "inputs": { "xs": [3, 4] }, "index": 0, "item": "x" }),
            ))
            .unwrap();
        assert_eq!(
            out,
            json!({ "list": [3, 4], "text": "item 1 of 2: x", "nested": { "a": { "b": 1 } }, "plain": [1, "two"] })
        );
    }

    /// The worst shapes the limits let through compile, evaluate and walk on a thread with
    /// the default 2 MiB stack (tokio's workers have as much), in a debug build.
    #[test]
    fn the_deepest_accepted_expressions_fit_a_small_stack() {
        let nested = format!(
            "{}1{}",
            "(".repeat(MAX_EXPRESSION_NESTING),
            ")".repeat(MAX_EXPRESSION_NESTING)
        );
        let lists = format!(
            "size({}1{}) + 1",
            "[".repeat(MAX_EXPRESSION_NESTING - 1),
            "]".repeat(MAX_EXPRESSION_NESTING - 1)
        );
        let chain = vec!["1"; MAX_EXPRESSION_BYTES / 4].join(" + ");
        let members = format!("inputs{}", ".a".repeat(MAX_EXPRESSION_BYTES / 2 - 4));
        let prefix = format!("{}true", "!".repeat(MAX_PREFIX_RUN));
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                for source in [nested, lists, chain, members, prefix] {
                    assert!(source.len() <= MAX_EXPRESSION_BYTES, "{}", source.len());
                    let e = Expr::compile(&source).unwrap();
                    let _ = e.eval(&Map::new());
                }
            })
            .unwrap()
            .join()
            .expect("no stack overflow");
        assert!(
            Expr::compile(&"(".repeat(40))
                .unwrap_err()
                .contains("nests brackets 40 deep")
        );
        assert!(
            Expr::compile(&"!".repeat(9))
                .unwrap_err()
                .contains("`!`/`-` in a row")
        );
        assert!(
            Expr::compile(&"1+".repeat(600))
                .unwrap_err()
                .contains("the limit is 1024")
        );
        // Brackets inside string literals do not count.
        Expr::compile(&format!("'{}' == ''", "(".repeat(40))).unwrap();
    }

    /// Four nested `exists` over 60 elements (60⁴ ≈ 13 million steps) stalled a coordinator
    /// for 12–15 s; it is now refused before it starts, while the same shape over a few
    /// elements and the expressions workflows are made of still run.
    #[test]
    fn an_expensive_evaluation_is_refused_before_it_starts() {
        let source = "inputs.l.exists(a, inputs.l.exists(b, inputs.l.exists(c, inputs.l.exists(d, a + b + c + d < 0))))";
        let e = Expr::compile(source).unwrap();
        let wide = bindings(json!({ "inputs": { "l": (0..60).collect::<Vec<_>>() } }));
        let started = std::time::Instant::now();
        let err = e.eval(&wide).unwrap_err();
        assert!(
            started.elapsed() < std::time::Duration::from_secs(1),
            "refused at once"
        );
        assert!(err.contains("evaluation steps"), "{err}");
        assert!(
            err.contains(&format!("the limit is {MAX_EVAL_COST}")),
            "{err}"
        );
        let narrow = bindings(json!({ "inputs": { "l": [1, 2, 3] } }));
        assert_eq!(e.eval(&narrow).unwrap(), json!(false));
        assert!(e.cost(&narrow) < 100_000, "{}", e.cost(&narrow));

        // Concatenation inside a comprehension's range is counted, not hidden.
        let doubled = Expr::compile("(inputs.l + inputs.l + inputs.l).all(a, (inputs.l + inputs.l).all(b, (inputs.l + inputs.l).all(c, a != b + c + 1000)))").unwrap();
        let l = bindings(json!({ "inputs": { "l": (0..40).collect::<Vec<_>>() } }));
        assert!(doubled.cost(&l) > 120 * 80 * 80, "{}", doubled.cost(&l));

        // What workflows are made of costs little even over a 10,000-element list.
        let items = bindings(json!({
            "inputs": { "xs": (0..10_000).collect::<Vec<_>>(), "topic": "t" },
            "steps": { "a": { "output": { "score": 0.9 }, "state": "succeeded" } },
        }));
        for ok in [
            "inputs.topic",
            "steps.a.output.score >= 0.8",
            "inputs.xs.map(x, x * 2)",
            "inputs.xs.filter(x, x % 2 == 0).size() > 3",
            "size(inputs.xs) > 0 && inputs.xs.exists(x, x == 9999)",
        ] {
            let e = Expr::compile(ok).unwrap();
            assert!(
                e.cost(&items) < MAX_EVAL_COST / 10,
                "{ok}: {}",
                e.cost(&items)
            );
            e.eval(&items).unwrap();
        }
    }

    /// Only the fields an expression reads reach CEL; reading a variable whole still sees
    /// all of it.
    #[test]
    fn only_the_fields_read_are_converted_and_the_answers_stay_the_same() {
        let inputs = json!({ "topic": "t", "a b": 2, "xs": (0..10_000).collect::<Vec<_>>() });
        let b = RunBindings {
            inputs: &inputs,
            rest: Map::new(),
        };
        for (source, want) in [
            ("inputs.topic + '!'", json!("t!")),
            ("inputs['a b'] + 1", json!(3)),
            ("has(inputs.missing) || has(inputs.topic)", json!(true)),
            ("size(inputs)", json!(3)),
            ("size(inputs.xs) + size(inputs)", json!(10_003)),
        ] {
            assert_eq!(
                Expr::compile(source).unwrap().eval(&b).unwrap(),
                want,
                "{source}"
            );
        }
        let e = Expr::compile("inputs.topic + string(inputs['a b'])").unwrap();
        let fields = e.fields.get("inputs").cloned().flatten().unwrap();
        assert_eq!(fields.into_iter().collect::<Vec<_>>(), ["a b", "topic"]);
        let whole = Expr::compile("size(inputs) + size(inputs.xs)").unwrap();
        assert_eq!(whole.fields.get("inputs"), Some(&None));
    }

    #[test]
    fn unknown_functions_are_refused_when_compiled() {
        for bad in ["nosuchfn(1)", "inputs.s.nosuchmethod()", "nosuch.ns(1)"] {
            let err = Expr::compile(bad).unwrap_err();
            assert!(err.contains("not a function"), "{bad}: {err}");
        }
        assert!(
            Expr::compile("nosuchfn(1)")
                .unwrap_err()
                .contains("`nosuchfn`")
        );
        // What the language has compiles, and runs.
        let b = bindings(json!({ "inputs": { "s": "abc-42", "xs": [1, 2] } }));
        for (ok, want) in [
            ("inputs.s.matches('^[a-z]+-[0-9]+$')", json!(true)),
            ("size(inputs.xs) + inputs.xs.size()", json!(4)),
            (
                "inputs.s.startsWith('abc') && inputs.s.contains('-')",
                json!(true),
            ),
            ("string(int('7')) + string(double(2))", json!("72")),
            ("has(inputs.s) && inputs.xs.all(x, x > 0)", json!(true)),
            ("type(inputs.s) == string", json!(true)),
        ] {
            let e = Expr::compile(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(e.eval(&b).unwrap(), want, "{ok}");
        }
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert!(
            Expr::compile("1 +")
                .unwrap_err()
                .contains("does not compile")
        );
        let (path, err) = Template::compile(&json!({ "q": ["ok", "${{ a. }}"] })).unwrap_err();
        assert_eq!(path, ".q[1]");
        assert!(err.contains("does not compile"), "{err}");
        assert!(
            Template::compile(&json!("${{ open"))
                .unwrap_err()
                .1
                .contains("closing")
        );
        let cond = Expr::compile_field("${{ 'yes' }}").unwrap();
        assert!(
            cond.eval_bool(&Map::new())
                .unwrap_err()
                .contains("not a boolean")
        );
        assert!(Expr::compile_field("x ${{ true }}").is_err());
    }
}
