//! Expressions: CEL, compiled once when a workflow is validated and evaluated against JSON
//! bindings. A template is a JSON value whose strings may hold `${{ … }}`: a string that is
//! one expression and nothing else takes the expression's value (a list stays a list);
//! a string that mixes text and expressions becomes text.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
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
            Ok::<_, String>((program, refs))
        })?;
        Ok(Self {
            source: source.trim().to_owned(),
            program: Arc::new(program),
            variables: refs.variables,
            steps: refs.steps,
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
    pub fn eval(&self, bindings: &Map<String, Value>) -> Result<Value, String> {
        let mut ctx = Context::with_env(Arc::clone(env()));
        for (name, value) in bindings {
            if self.variables.contains(name) {
                ctx.add_variable_from_value(name.as_str(), to_cel(value));
            }
        }
        let value = on_enough_stack(self.deep, || self.program.execute(&ctx))
            .map_err(|e| format!("`{}`: {e}", self.source))?;
        value
            .json()
            .map_err(|e| format!("`{}`: result is not JSON: {e:?}", self.source))
    }

    /// Evaluates a condition: it must give a boolean.
    pub fn eval_bool(&self, bindings: &Map<String, Value>) -> Result<bool, String> {
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

/// Names an expression uses, found by walking its syntax tree; variables bound by macros
/// (`list.map(x, …)`) are not free.
#[derive(Default)]
struct Refs {
    variables: BTreeSet<String>,
    steps: BTreeSet<String>,
}

impl Refs {
    fn walk(&mut self, e: &IdedExpr, bound: &mut Vec<String>) {
        match &e.expr {
            Ast::Unspecified | Ast::Literal(_) => {}
            Ast::Ident(name) => {
                if !bound.contains(name) {
                    self.variables.insert(name.clone());
                }
            }
            Ast::Select(s) => {
                if let Ast::Ident(root) = &s.operand.expr
                    && root == "steps"
                    && !bound.iter().any(|b| b == "steps")
                {
                    self.steps.insert(s.field.clone());
                }
                self.walk(&s.operand, bound);
            }
            Ast::Call(c) => {
                // `steps['sign-off']`: ids that are not CEL identifiers.
                if c.func_name == cel::common::ast::operators::INDEX
                    && let [target, key] = c.args.as_slice()
                    && matches!(&target.expr, Ast::Ident(root) if root == "steps")
                    && let Ast::Literal(LiteralValue::String(id)) = &key.expr
                    && !bound.iter().any(|b| b == "steps")
                {
                    self.steps.insert(id.inner().to_owned());
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
        parts.push(Part::Expr(&body[..end]));
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

    pub fn render(&self, bindings: &Map<String, Value>) -> Result<Value, String> {
        Ok(match self {
            Template::Literal(v) => v.clone(),
            Template::Expr(e) => e.eval(bindings)?,
            Template::Text(pieces) => {
                let mut s = String::new();
                for p in pieces {
                    match p {
                        Piece::Text(t) => s.push_str(t),
                        Piece::Expr(e) => match e.eval(bindings)? {
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
                    .map(|t| t.render(bindings))
                    .collect::<Result<_, _>>()?,
            ),
            Template::Object(fields) => Value::Object(
                fields
                    .iter()
                    .map(|(k, t)| t.render(bindings).map(|v| (k.clone(), v)))
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
