//! Tools the `llm` agent offers a model (reference: docs/tools.md). A step declares them in
//! its `with.tools`; each has a name, a description, a JSON Schema of its arguments and what
//! calling it does:
//!
//! ```yaml
//! tools:
//!   - name: weather
//!     description: The weather in a city today
//!     parameters: { type: object, properties: { city: { type: string } }, required: [city] }
//!     http:
//!       method: GET
//!       url: "https://api.example.com/weather/{city}"   # `{arg}` filled, percent-encoded
//!       headers: { Authorization: "Bearer ${{ secrets.WEATHER_KEY }}" }
//!       allow_hosts: [api.example.com]                 # default: the URL's own host
//!       max_response_bytes: 65536
//!       timeout: 10s
//! ```
//!
//! A call the model asks for is checked against the schema before anything is sent; an HTTP
//! call goes only to an allowed host, over http or https, follows no redirect, and reads at
//! most `max_response_bytes` of the answer. What goes wrong in a call (bad arguments, a host not
//! allowed, an HTTP error, a timeout) is told to the model as the call's result, so it can
//! correct itself; the attempt fails only when the declarations themselves are wrong.

use std::sync::Arc;
use std::time::Duration;

use mesh_agent_sdk::AgentError;
use mesh_agent_sdk::llm::ToolSpec;
use mesh_workflow::JsonSchema;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::{Map, Value, json};

use crate::mcp;

/// Most tools a step may declare.
pub const MAX_TOOLS: usize = 32;
/// The response cap when a tool gives none, and the most one may give.
const DEFAULT_RESPONSE_BYTES: usize = 64 * 1024;
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// A call's time limit when a tool gives none (the step's deadline bounds it too).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A declared tool, checked.
#[derive(Debug)]
pub struct Tool {
    pub spec: ToolSpec,
    /// The arguments' schema, checked before a call (an MCP server's may not compile here:
    /// then the server checks them).
    schema: Option<JsonSchema>,
    kind: Kind,
    /// `approval: true`: each call waits for a person's decision first.
    pub approval: bool,
}

#[derive(Debug)]
enum Kind {
    Http(HttpTool),
    /// A skill of the mesh, called as a child task of the run.
    Skill(String),
    /// Runs the model's code in the node's sandbox.
    Code {
        language: crate::sandbox::Language,
        limits: crate::sandbox::Limits,
    },
    /// Sends the model's text as a message (docs/messages.md): to an agent by name, or to a
    /// topic.
    Message {
        to: Option<String>,
        topic: Option<String>,
    },
    /// The tool `remote` of an MCP server's session.
    Mcp {
        session: Arc<mcp::Session>,
        remote: String,
    },
}

/// A step's tools as declared: its own, and the MCP servers whose tools it takes.
#[derive(Debug, Default)]
pub struct Declared {
    pub tools: Vec<Tool>,
    mcp: Vec<McpUse>,
}

/// `- mcp: NAME` or `- mcp: { server: NAME, tools: [..] }`.
#[derive(Debug)]
struct McpUse {
    path: String,
    server: String,
    only: Option<Vec<String>>,
    /// `approval: true`: every tool of the server waits for a person's decision.
    approval: bool,
}

/// The tools of one attempt, MCP sessions open; [`Toolbox::close`] ends them.
#[derive(Debug)]
pub struct Toolbox {
    pub tools: Vec<Tool>,
    sessions: Vec<Arc<mcp::Session>>,
}

#[derive(Debug)]
struct HttpTool {
    method: reqwest::Method,
    url: String,
    headers: Vec<(reqwest::header::HeaderName, reqwest::header::HeaderValue)>,
    allow_hosts: Vec<String>,
    max_response_bytes: usize,
    timeout: Duration,
}

/// What a call gave back for the model, and whether it went wrong.
#[derive(Debug, PartialEq)]
pub struct Outcome {
    pub ok: bool,
    pub text: String,
}

impl Outcome {
    pub fn ok(text: String) -> Self {
        Outcome { ok: true, text }
    }

    pub fn error(text: impl Into<String>) -> Self {
        Outcome {
            ok: false,
            text: text.into(),
        }
    }
}

fn bad(path: &str, why: impl std::fmt::Display) -> AgentError {
    AgentError::bad_input(format!("with.{path}: {why}"))
}

/// Refuses a field of `obj` (the map at `with.PATH`; `with` itself when `path` is empty) that
/// is not one of `known`, naming it and the known ones.
pub fn only_known(obj: &Map<String, Value>, known: &[&str], path: &str) -> Result<(), AgentError> {
    match obj.keys().find(|k| !known.contains(&k.as_str())) {
        None => Ok(()),
        Some(unknown) => Err(bad(
            &if path.is_empty() {
                unknown.clone()
            } else {
                format!("{path}.{unknown}")
            },
            format!("unknown field (known: {})", known.join(", ")),
        )),
    }
}

/// Refuses fields beside the one that says what `item` is (`code`, `message`, `mcp`).
fn alone(path: &str, item: &Value, entry: &str) -> Result<(), AgentError> {
    if item.as_object().is_some_and(|o| o.len() > 1) {
        return Err(bad(path, format!("{entry} has no other field")));
    }
    Ok(())
}

/// `approval` of a declaration at `path`: absent or a boolean.
fn read_approval(obj: &Map<String, Value>, path: &str) -> Result<bool, AgentError> {
    match obj.get("approval") {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(bad(&format!("{path}.approval"), "must be true or false")),
    }
}

/// Reads `with.tools`: a list of declarations, each checked with the path of what is wrong.
pub fn read_tools(value: Option<&Value>) -> Result<Declared, AgentError> {
    let list = match value {
        None | Some(Value::Null) => return Ok(Declared::default()),
        Some(Value::Array(list)) => list,
        Some(_) => return Err(bad("tools", "must be a list of tools")),
    };
    if list.len() > MAX_TOOLS {
        return Err(bad(
            "tools",
            format!("{} tools, the limit is {MAX_TOOLS}", list.len()),
        ));
    }
    let mut tools: Vec<Tool> = Vec::with_capacity(list.len());
    let mut mcp = Vec::new();
    for (i, item) in list.iter().enumerate() {
        let path = format!("tools[{i}]");
        // The tool, where its name comes from, and what to say when the name is taken.
        let (tool, named_at, hint) = if let Some(server) = item.get("mcp") {
            mcp.push(read_mcp(&path, item, server)?);
            continue;
        } else if let Some(skill) = item.get("skill") {
            (
                read_skill(&path, item, skill)?,
                path.clone(),
                ": give one a `name`",
            )
        } else if let Some(message) = item.get("message") {
            (
                read_message(&path, item, message)?,
                format!("{path}.message"),
                ": give one a `name`",
            )
        } else if let Some(code) = item.get("code") {
            (
                read_code(&path, item, code)?,
                format!("{path}.code"),
                ": give one a `name`",
            )
        } else {
            (read_tool(&path, item)?, format!("{path}.name"), "")
        };
        if let Some(j) = tools.iter().position(|t| t.spec.name == tool.spec.name) {
            return Err(bad(
                &named_at,
                format!("`{}` is already tools[{j}]{hint}", tool.spec.name),
            ));
        }
        tools.push(tool);
    }
    Ok(Declared { tools, mcp })
}

/// `- skill: summarize` with, optionally, `name`, `description` and `parameters` (a JSON
/// Schema of what the skill takes as `with`; any object when absent): the model calls a skill
/// of the mesh, which the coordinator runs as a child task of the run.
fn read_skill(path: &str, item: &Value, skill: &Value) -> Result<Tool, AgentError> {
    let obj = item.as_object().expect("an entry with `skill` is a map");
    const KNOWN: [&str; 5] = ["skill", "name", "description", "parameters", "approval"];
    only_known(obj, &KNOWN, path)?;
    let approval = read_approval(obj, path)?;
    let skill = skill
        .as_str()
        .filter(|s| {
            !s.is_empty()
                && s.len() <= 128
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        })
        .ok_or_else(|| bad(&format!("{path}.skill"), "a skill's name"))?;
    let name = match obj.get("name") {
        None | Some(Value::Null) => skill.replace('.', "_"),
        Some(Value::String(n)) => n.clone(),
        Some(_) => return Err(bad(&format!("{path}.name"), "must be a string")),
    };
    let description = obj
        .get("description")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| {
            format!("Runs the mesh's skill `{skill}` with these arguments as its input.")
        });
    let parameters = match obj.get("parameters") {
        None | Some(Value::Null) => json!({ "type": "object" }),
        Some(p @ Value::Object(_)) => p.clone(),
        Some(_) => {
            return Err(bad(
                &format!("{path}.parameters"),
                "must be a JSON Schema (a map)",
            ));
        }
    };
    let schema =
        JsonSchema::compile(&parameters).map_err(|e| bad(&format!("{path}.parameters"), e))?;
    Ok(Tool {
        spec: ToolSpec {
            name,
            description,
            parameters,
        },
        schema: Some(schema),
        kind: Kind::Skill(skill.to_owned()),
        approval,
    })
}

/// `- code: { language: python, name: run_python, timeout: 10s, memory_mb: 256, … }`: the
/// model writes code, the node runs it in its sandbox.
fn read_code(path: &str, item: &Value, code: &Value) -> Result<Tool, AgentError> {
    alone(path, item, "a `code` entry")?;
    let here = format!("{path}.code");
    let obj = code
        .as_object()
        .ok_or_else(|| bad(&here, "a map with `language` (python or shell) and limits"))?;
    const KNOWN: [&str; 9] = [
        "language",
        "name",
        "timeout",
        "memory_mb",
        "processes",
        "output_bytes",
        "disk_mb",
        "description",
        "approval",
    ];
    only_known(obj, &KNOWN, &here)?;
    let approval = read_approval(obj, &here)?;
    let (language, limits) = crate::code::read_language_and_limits(obj, &format!("with.{here}"))?;
    let name = match obj.get("name") {
        None | Some(Value::Null) => format!("run_{}", language.as_str()),
        Some(Value::String(n)) => n.clone(),
        Some(_) => return Err(bad(&format!("{here}.name"), "must be a string")),
    };
    let what = match language {
        crate::sandbox::Language::Python => "Python 3 code (run with python3 -c)",
        crate::sandbox::Language::Shell => "a POSIX shell script (run with sh -c)",
    };
    let description = obj
        .get("description")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| {
            format!(
                "Runs {what} in a sandbox with no network and a fresh, empty working \
                 directory; at most {} s. Returns exit_code, stdout and stderr: print what \
                 you need to read.",
                limits.timeout.as_secs()
            )
        });
    let parameters = json!({
        "type": "object",
        "properties": {
            "code": { "type": "string", "description": "The code to run." },
            "stdin": { "type": "string", "description": "Its standard input." }
        },
        "required": ["code"]
    });
    Ok(Tool {
        spec: ToolSpec {
            name,
            description,
            parameters: parameters.clone(),
        },
        schema: Some(JsonSchema::compile(&parameters).map_err(|e| bad(&here, e))?),
        kind: Kind::Code { language, limits },
        approval,
    })
}

/// `- message: { to: writer }` or `{ topic: drafts }`, with `name`, `description` and
/// `approval`: the model sends a text as a message (docs/messages.md).
fn read_message(path: &str, item: &Value, message: &Value) -> Result<Tool, AgentError> {
    alone(path, item, "a `message` entry")?;
    let here = format!("{path}.message");
    let obj = message
        .as_object()
        .ok_or_else(|| bad(&here, "a map with `to` (an agent) or `topic`"))?;
    only_known(
        obj,
        &["to", "topic", "name", "description", "approval"],
        &here,
    )?;
    let target = |field: &str| -> Result<Option<String>, AgentError> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(t))
                if !t.is_empty()
                    && t.len() <= 128
                    && t.chars().all(|c| {
                        c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':')
                    }) =>
            {
                Ok(Some(t.clone()))
            }
            Some(_) => Err(bad(
                &format!("{here}.{field}"),
                "a name of letters, digits, `_`, `-`, `.` or `:`",
            )),
        }
    };
    let (to, topic) = (target("to")?, target("topic")?);
    let (default_name, description) = match (&to, &topic) {
        (Some(to), None) => (
            format!("message_{to}"),
            format!("Sends a message to the agent `{to}`."),
        ),
        (None, Some(topic)) => (
            format!("publish_{topic}"),
            format!("Publishes a message to the agents subscribed to `{topic}`."),
        ),
        _ => return Err(bad(&here, "give `to` (an agent) or `topic`, one of them")),
    };
    let name = match obj.get("name") {
        None | Some(Value::Null) => default_name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect(),
        Some(Value::String(n)) => n.clone(),
        Some(_) => return Err(bad(&format!("{here}.name"), "must be a string")),
    };
    let description = match obj.get("description") {
        Some(Value::String(d)) => d.clone(),
        _ => description,
    };
    let parameters = json!({
        "type": "object",
        "properties": { "text": { "type": "string", "description": "What to say." } },
        "required": ["text"]
    });
    Ok(Tool {
        spec: ToolSpec {
            name,
            description,
            parameters: parameters.clone(),
        },
        schema: Some(JsonSchema::compile(&parameters).map_err(|e| bad(&here, e))?),
        kind: Kind::Message { to, topic },
        approval: read_approval(obj, &here)?,
    })
}

fn read_mcp(path: &str, item: &Value, server: &Value) -> Result<McpUse, AgentError> {
    alone(path, item, "an `mcp` entry")?;
    let here = format!("{path}.mcp");
    let mut approval = false;
    let (server, only) = match server {
        Value::String(name) => (name.clone(), None),
        Value::Object(obj) => {
            only_known(obj, &["server", "tools", "approval"], &here)?;
            approval = read_approval(obj, &here)?;
            let name = obj
                .get("server")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(&format!("{here}.server"), "required, a server's name"))?;
            let only = match obj.get("tools") {
                None | Some(Value::Null) => None,
                Some(Value::Array(list)) => Some(
                    list.iter()
                        .enumerate()
                        .map(|(i, t)| {
                            t.as_str().map(str::to_owned).ok_or_else(|| {
                                bad(&format!("{here}.tools[{i}]"), "must be a tool's name")
                            })
                        })
                        .collect::<Result<_, _>>()?,
                ),
                Some(_) => return Err(bad(&format!("{here}.tools"), "must be a list of names")),
            };
            (name.to_owned(), only)
        }
        _ => {
            return Err(bad(
                &here,
                "a server's name, or a map with `server` and `tools`",
            ));
        }
    };
    Ok(McpUse {
        path: here,
        server,
        only,
        approval,
    })
}

impl Declared {
    /// Opens the MCP servers the step names (from the node's `servers`) and adds their tools;
    /// a server the node does not have is refused naming it, one that does not answer fails
    /// the attempt (retryable).
    pub async fn open(self, servers: &mcp::Servers, left: Duration) -> Result<Toolbox, AgentError> {
        let mut tools = self.tools;
        let mut sessions = Vec::new();
        for use_ in self.mcp {
            let Some(config) = servers.get(&use_.server) else {
                let names: Vec<&str> = servers.keys().map(String::as_str).collect();
                return Err(bad(
                    &use_.path,
                    format!(
                        "this node has no MCP server `{}` (it has: {})",
                        use_.server,
                        if names.is_empty() {
                            "none".to_owned()
                        } else {
                            names.join(", ")
                        }
                    ),
                ));
            };
            let (session, listed) =
                mcp::connect(&use_.server, config, left)
                    .await
                    .map_err(|e| {
                        AgentError::retryable(
                            "mcp_unavailable",
                            format!("MCP server `{}`: {e}", use_.server),
                        )
                    })?;
            let session = Arc::new(session);
            if let Some(only) = &use_.only
                && let Some(missing) = only.iter().find(|n| !listed.iter().any(|t| t.name == **n))
            {
                return Err(bad(
                    &use_.path,
                    format!("MCP server `{}` has no tool `{missing}`", use_.server),
                ));
            }
            for t in listed {
                if use_
                    .only
                    .as_ref()
                    .is_some_and(|o| !o.iter().any(|n| *n == t.name))
                {
                    continue;
                }
                if tools.iter().any(|have| have.spec.name == t.name) {
                    return Err(bad(
                        &use_.path,
                        format!(
                            "MCP server `{}` has a tool `{}`, a name taken already",
                            use_.server, t.name
                        ),
                    ));
                }
                let parameters = Value::Object((*t.input_schema).clone());
                tools.push(Tool {
                    spec: ToolSpec {
                        name: t.name.to_string(),
                        description: t.description.as_deref().unwrap_or_default().to_owned(),
                        parameters: parameters.clone(),
                    },
                    schema: JsonSchema::compile(&parameters).ok(),
                    kind: Kind::Mcp {
                        session: session.clone(),
                        remote: t.name.to_string(),
                    },
                    approval: use_.approval,
                });
            }
            sessions.push(session);
        }
        if tools.len() > MAX_TOOLS {
            return Err(bad(
                "tools",
                format!(
                    "{} tools with the MCP servers', the limit is {MAX_TOOLS}",
                    tools.len()
                ),
            ));
        }
        Ok(Toolbox { tools, sessions })
    }
}

impl Toolbox {
    /// Ends the attempt's MCP sessions.
    pub async fn close(self) {
        drop(self.tools);
        for session in self.sessions {
            if let Ok(session) = Arc::try_unwrap(session) {
                session.close().await;
            }
        }
    }
}

fn read_tool(path: &str, item: &Value) -> Result<Tool, AgentError> {
    let obj = item.as_object().ok_or_else(|| {
        bad(
            path,
            "must be a map with name, description, parameters and http",
        )
    })?;
    const KNOWN: [&str; 5] = ["name", "description", "parameters", "http", "approval"];
    only_known(obj, &KNOWN, path)?;
    let approval = read_approval(obj, path)?;
    let name = obj
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| bad(&format!("{path}.name"), "required, a string"))?;
    // What every provider accepts as a function name.
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !valid {
        return Err(bad(
            &format!("{path}.name"),
            format!("`{name}`: 1 to 64 letters, digits, `_` or `-`"),
        ));
    }
    let description = match obj.get("description") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(bad(&format!("{path}.description"), "must be a string")),
    };
    let parameters = match obj.get("parameters") {
        None | Some(Value::Null) => json!({ "type": "object", "properties": {} }),
        Some(p @ Value::Object(_)) => p.clone(),
        Some(_) => {
            return Err(bad(
                &format!("{path}.parameters"),
                "must be a JSON Schema (a map)",
            ));
        }
    };
    if parameters.get("type").and_then(Value::as_str) != Some("object") {
        return Err(bad(
            &format!("{path}.parameters.type"),
            "must be `object`: a tool takes named arguments",
        ));
    }
    let schema =
        Some(JsonSchema::compile(&parameters).map_err(|e| bad(&format!("{path}.parameters"), e))?);
    let kind = match obj.get("http") {
        Some(http) => Kind::Http(read_http(&format!("{path}.http"), http)?),
        None => return Err(bad(path, "say what the tool does: `http`")),
    };
    Ok(Tool {
        spec: ToolSpec {
            name: name.to_owned(),
            description,
            parameters,
        },
        schema,
        kind,
        approval,
    })
}

fn read_http(path: &str, value: &Value) -> Result<HttpTool, AgentError> {
    let obj = value
        .as_object()
        .ok_or_else(|| bad(path, "must be a map"))?;
    const KNOWN: [&str; 6] = [
        "method",
        "url",
        "headers",
        "allow_hosts",
        "max_response_bytes",
        "timeout",
    ];
    only_known(obj, &KNOWN, path)?;
    let method = match obj.get("method") {
        None | Some(Value::Null) => reqwest::Method::GET,
        Some(Value::String(m)) => match m.to_ascii_uppercase().as_str() {
            "GET" => reqwest::Method::GET,
            "POST" => reqwest::Method::POST,
            "PUT" => reqwest::Method::PUT,
            "PATCH" => reqwest::Method::PATCH,
            "DELETE" => reqwest::Method::DELETE,
            _ => {
                return Err(bad(
                    &format!("{path}.method"),
                    format!("`{m}`: one of GET, POST, PUT, PATCH, DELETE"),
                ));
            }
        },
        Some(_) => return Err(bad(&format!("{path}.method"), "must be a string")),
    };
    let url = obj
        .get("url")
        .and_then(Value::as_str)
        .ok_or_else(|| bad(&format!("{path}.url"), "required, a string"))?
        .to_owned();
    // The template must be a URL once its placeholders are filled.
    let sample = fill(&url, &Map::new(), true)
        .and_then(|u| reqwest::Url::parse(&u).map_err(|e| e.to_string()))
        .map_err(|e| bad(&format!("{path}.url"), format!("`{url}`: {e}")))?;
    if !matches!(sample.scheme(), "http" | "https") {
        return Err(bad(&format!("{path}.url"), "must be http or https"));
    }
    let mut headers = Vec::new();
    match obj.get("headers") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (k, v) in map {
                let here = format!("{path}.headers.{k}");
                let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
                    .map_err(|_| bad(&here, "not a header name"))?;
                let text = v.as_str().ok_or_else(|| bad(&here, "must be a string"))?;
                // The value may be a secret: never quoted in an error.
                let mut value = reqwest::header::HeaderValue::from_str(text)
                    .map_err(|_| bad(&here, "not a valid header value"))?;
                value.set_sensitive(true);
                headers.push((name, value));
            }
        }
        Some(_) => return Err(bad(&format!("{path}.headers"), "must be a map")),
    }
    let allow_hosts = match obj.get("allow_hosts") {
        None | Some(Value::Null) => {
            if url
                .split("://")
                .nth(1)
                .unwrap_or_default()
                .split('/')
                .next()
                .unwrap_or_default()
                .contains('{')
            {
                return Err(bad(
                    &format!("{path}.allow_hosts"),
                    "required when the URL's host has a placeholder",
                ));
            }
            vec![sample.host_str().unwrap_or_default().to_ascii_lowercase()]
        }
        Some(Value::Array(list)) if !list.is_empty() => list
            .iter()
            .enumerate()
            .map(|(i, h)| {
                h.as_str()
                    .filter(|h| !h.is_empty())
                    .map(str::to_ascii_lowercase)
                    .ok_or_else(|| bad(&format!("{path}.allow_hosts[{i}]"), "must be a host name"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(bad(
                &format!("{path}.allow_hosts"),
                "must be a list of host names (`*.example.com` allows its subdomains)",
            ));
        }
    };
    let max_response_bytes = match obj.get("max_response_bytes") {
        None | Some(Value::Null) => DEFAULT_RESPONSE_BYTES,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=MAX_RESPONSE_BYTES as u64).contains(&n) => n as usize,
            _ => {
                return Err(bad(
                    &format!("{path}.max_response_bytes"),
                    format!("must be a whole number from 1 to {MAX_RESPONSE_BYTES}"),
                ));
            }
        },
    };
    let timeout = match obj.get("timeout") {
        None | Some(Value::Null) => DEFAULT_TIMEOUT,
        Some(Value::String(t)) => humantime::parse_duration(t)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                bad(
                    &format!("{path}.timeout"),
                    format!("`{t}` is not a duration like 10s"),
                )
            })?,
        Some(_) => {
            return Err(bad(
                &format!("{path}.timeout"),
                "must be a duration like 10s",
            ));
        }
    };
    Ok(HttpTool {
        method,
        url,
        headers,
        allow_hosts,
        max_response_bytes,
        timeout,
    })
}

/// `template` with each `{name}` replaced by the argument `name`, percent-encoded; the names it
/// used are taken out of `args`. With `sample`, placeholders become `x` (to check the shape).
fn fill(template: &str, args: &Map<String, Value>, sample: bool) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| "a `{` without its `}`".to_owned())?;
        let name = &after[..close];
        if sample {
            out.push('x');
        } else {
            let value = match args.get(name) {
                Some(Value::String(s)) => s.clone(),
                Some(v @ (Value::Number(_) | Value::Bool(_))) => v.to_string(),
                Some(_) => return Err(format!("argument `{name}` must be a string or a number")),
                None => return Err(format!("argument `{name}` is missing")),
            };
            out.extend(utf8_percent_encode(&value, NON_ALPHANUMERIC));
        }
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Placeholder names of a URL template.
fn placeholders(template: &str) -> Vec<&str> {
    template
        .split('{')
        .skip(1)
        .filter_map(|p| p.split_once('}').map(|(name, _)| name))
        .collect()
}

fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let host = host.to_ascii_lowercase();
    allowed.iter().any(|a| match a.strip_prefix("*.") {
        Some(parent) => host.ends_with(&format!(".{parent}")),
        None => host == *a,
    })
}

impl Tool {
    /// Calls the tool with the model's `arguments`, within `left`, once a person approved it
    /// when the tool asks for approval; what went wrong in the call, a rejection included, is
    /// the outcome's text, for the model. Fails only when no decision could be had (the
    /// attempt's deadline, its cancellation, the coordinator lost). A call made here (not a
    /// skill: the coordinator journals those) is told to the run for its journal.
    pub async fn call(
        &self,
        ctx: &mesh_agent_sdk::Context,
        http: &reqwest::Client,
        sandbox: &crate::sandbox::Sandbox,
        arguments: &Value,
        left: Duration,
    ) -> Result<Outcome, AgentError> {
        if let Some((at, problem)) = self
            .schema
            .as_ref()
            .and_then(|s| s.first_problem(arguments))
        {
            return Ok(Outcome::error(format!(
                "invalid arguments: {at}: {problem}"
            )));
        }
        let call_id = ctx.new_call_id();
        if self.approval {
            let decision = ctx
                .ask_approval(&call_id, &self.spec.name, arguments.clone())
                .await
                .map_err(|e| AgentError {
                    code: e.code,
                    message: format!(
                        "tool `{}` waited for approval: {}",
                        self.spec.name, e.message
                    ),
                    retryable: e.retryable,
                })?;
            if !decision.approved {
                let why = if decision.comment.is_empty() {
                    String::new()
                } else {
                    format!(": {}", decision.comment)
                };
                return Ok(Outcome::error(format!(
                    "the call was rejected by {}{why}; it did not run",
                    if decision.by.is_empty() {
                        "a person"
                    } else {
                        &decision.by
                    }
                )));
            }
        }
        let began = std::time::Instant::now();
        let outcome = self
            .run(ctx, &call_id, http, sandbox, arguments, left)
            .await;
        if !matches!(self.kind, Kind::Skill(_)) {
            ctx.tool_used(mesh_agent_sdk::UsedTool {
                call_id: &call_id,
                tool: &self.spec.name,
                arguments,
                ok: outcome.ok,
                result: &outcome.text,
                elapsed_ms: began.elapsed().as_millis() as u64,
            });
        }
        Ok(outcome)
    }

    async fn run(
        &self,
        ctx: &mesh_agent_sdk::Context,
        call_id: &str,
        http: &reqwest::Client,
        sandbox: &crate::sandbox::Sandbox,
        arguments: &Value,
        left: Duration,
    ) -> Outcome {
        match &self.kind {
            Kind::Http(tool) => tool.call(http, arguments, left).await,
            Kind::Mcp { session, remote } => session.call(remote, arguments, left).await,
            Kind::Skill(skill) => {
                match ctx.call_skill_as(call_id, skill, arguments.clone()).await {
                    Ok(output) => Outcome::ok(output.to_string()),
                    Err(e) => Outcome::error(format!("{}: {}", e.code, e.message)),
                }
            }
            Kind::Message { to, topic } => {
                let payload = json!({ "text": arguments["text"] });
                let mail = ctx.mail();
                let sent = match (to, topic) {
                    (Some(to), _) => mail.send(to, payload).await,
                    (None, Some(topic)) => mail.publish(topic, payload).await,
                    (None, None) => unreachable!("read_message gives one"),
                };
                match sent {
                    Ok(n) => Outcome::ok(format!("sent to {n} agent(s)")),
                    Err(e) => Outcome::error(format!("{}: {}", e.code, e.message)),
                }
            }
            Kind::Code { language, limits } => {
                let code = arguments["code"].as_str().unwrap_or_default();
                let stdin = arguments["stdin"].as_str().unwrap_or_default();
                let limits = crate::sandbox::Limits {
                    timeout: limits.timeout.min(left),
                    ..*limits
                };
                match sandbox.run(*language, code, stdin, limits).await {
                    Ok(result) => Outcome {
                        ok: crate::code::failure(&result, &limits).is_none(),
                        text: result.to_json().to_string(),
                    },
                    Err(e) => Outcome::error(e),
                }
            }
        }
    }
}

impl HttpTool {
    async fn call(&self, http: &reqwest::Client, arguments: &Value, left: Duration) -> Outcome {
        let empty = Map::new();
        let args = arguments.as_object().unwrap_or(&empty);
        let url = match fill(&self.url, args, false)
            .and_then(|u| reqwest::Url::parse(&u).map_err(|e| format!("the URL is not valid: {e}")))
        {
            Ok(u) => u,
            Err(e) => return Outcome::error(e),
        };
        let host = url.host_str().unwrap_or_default();
        if !matches!(url.scheme(), "http" | "https") || !host_allowed(host, &self.allow_hosts) {
            return Outcome::error(format!(
                "host `{host}` is not allowed (allowed: {})",
                self.allow_hosts.join(", ")
            ));
        }
        // Arguments not in the URL: the query of a GET or DELETE, the JSON body otherwise.
        let used = placeholders(&self.url);
        let rest: Map<String, Value> = args
            .iter()
            .filter(|(k, _)| !used.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut url = url;
        let has_body = !matches!(self.method, reqwest::Method::GET | reqwest::Method::DELETE);
        if !has_body && !rest.is_empty() {
            let mut query = url.query_pairs_mut();
            for (k, v) in &rest {
                match v {
                    Value::String(s) => query.append_pair(k, s),
                    other => query.append_pair(k, &other.to_string()),
                };
            }
        }
        let mut request = http
            .request(self.method.clone(), url)
            .timeout(self.timeout.min(left));
        for (k, v) in &self.headers {
            request = request.header(k, v.clone());
        }
        if has_body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(Value::Object(rest).to_string());
        }
        let mut response = match request.send().await {
            Ok(r) => r,
            Err(e) if e.is_timeout() => return Outcome::error("the call timed out"),
            Err(e) => return Outcome::error(format!("the call failed: {}", e.without_url())),
        };
        let status = response.status();
        let mut body = Vec::new();
        let mut cut = false;
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    let room = self.max_response_bytes - body.len();
                    if chunk.len() > room {
                        body.extend_from_slice(&chunk[..room]);
                        cut = true;
                        break;
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) if e.is_timeout() => return Outcome::error("the call timed out"),
                Err(e) => {
                    return Outcome::error(format!(
                        "reading the answer failed: {}",
                        e.without_url()
                    ));
                }
            }
        }
        let mut text = String::from_utf8_lossy(&body).into_owned();
        if cut {
            text.push_str(&format!(
                "\n[answer cut at {} bytes]",
                self.max_response_bytes
            ));
        }
        if status.is_success() {
            Outcome::ok(text)
        } else {
            Outcome::error(format!("HTTP {}: {text}", status.as_u16()))
        }
    }
}

/// The HTTP client of tool calls: no redirects (an allowed host cannot send a call elsewhere),
/// no proxy from the environment, rustls on ring.
pub fn http_client() -> reqwest::Client {
    mesh_agent_sdk::llm::install_crypto_provider();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .expect("an HTTP client with no options that can fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools(v: Value) -> Result<Declared, String> {
        read_tools(Some(&v)).map_err(|e| e.to_string())
    }

    #[test]
    fn declarations_are_checked_and_errors_name_the_field() {
        let ok = tools(json!([{ "name": "w", "parameters": { "type": "object" },
            "http": { "url": "https://api.example.com/w/{city}" } }]))
        .unwrap();
        let Kind::Http(h) = &ok.tools[0].kind else {
            panic!("an HTTP tool")
        };
        assert_eq!(h.allow_hosts, ["api.example.com"]);
        assert!(!ok.tools[0].approval, "no approval unless asked");
        let asked = tools(json!([
            { "name": "w", "approval": true, "http": { "url": "http://a/" } },
            { "skill": "echo", "approval": true },
            { "code": { "language": "shell", "approval": true } },
            { "mcp": { "server": "git", "approval": true } }
        ]))
        .unwrap();
        assert!(asked.tools.iter().all(|t| t.approval), "{asked:?}");
        let sends = tools(
            json!([{ "message": { "to": "writer" } }, { "message": { "topic": "news.v1" } }]),
        )
        .unwrap();
        let names: Vec<&str> = sends.tools.iter().map(|t| t.spec.name.as_str()).collect();
        assert_eq!(names, ["message_writer", "publish_news_v1"]);
        assert!(asked.mcp[0].approval);
        for (bad, field) in [
            (json!({ "name": "w" }), "tools[0]"),
            (
                json!({ "name": "w w", "http": { "url": "http://a/" } }),
                "tools[0].name",
            ),
            (
                json!({ "name": "w", "http": { "url": "ftp://a/" } }),
                "tools[0].http.url",
            ),
            (
                json!({ "name": "w", "http": { "url": "http://a/", "verb": "GET" } }),
                "tools[0].http.verb",
            ),
            (
                json!({ "name": "w", "http": { "url": "http://{h}/" } }),
                "tools[0].http.allow_hosts",
            ),
            (
                json!({ "name": "w", "http": { "url": "http://a/", "method": "TRACE" } }),
                "tools[0].http.method",
            ),
            (
                json!({ "name": "w", "http": { "url": "http://a/", "max_response_bytes": 0 } }),
                "tools[0].http.max_response_bytes",
            ),
            (
                json!({ "name": "w", "parameters": { "type": "string" }, "http": { "url": "http://a/" } }),
                "tools[0].parameters.type",
            ),
            (
                json!({ "name": "w", "approval": "yes", "http": { "url": "http://a/" } }),
                "tools[0].approval",
            ),
            (
                json!({ "code": { "language": "python", "approval": 1 } }),
                "tools[0].code.approval",
            ),
            (
                json!({ "message": { "to": "a", "topic": "b" } }),
                "tools[0].message",
            ),
            (json!({ "message": { "to": "a b" } }), "tools[0].message.to"),
            (
                json!({ "message": { "to": "a", "cc": "b" } }),
                "tools[0].message.cc",
            ),
        ] {
            let e = tools(json!([bad])).unwrap_err();
            assert!(e.contains(&format!("with.{field}:")), "{field}: {e}");
        }
        let e = tools(json!([
            { "name": "w", "http": { "url": "http://a/" } },
            { "name": "w", "http": { "url": "http://b/" } }
        ]))
        .unwrap_err();
        assert!(e.contains("tools[1].name") && e.contains("tools[0]"), "{e}");
    }

    #[test]
    fn mcp_entries_name_a_server_and_may_pick_its_tools() {
        let d =
            tools(json!([{ "mcp": "files" }, { "mcp": { "server": "git", "tools": ["log"] } }]))
                .unwrap();
        assert_eq!(d.mcp.len(), 2);
        assert_eq!(d.mcp[1].server, "git");
        assert_eq!(d.mcp[1].only.as_deref(), Some(&["log".to_owned()][..]));
        for (bad, field) in [
            (json!({ "mcp": 3 }), "tools[0].mcp"),
            (json!({ "mcp": "files", "name": "x" }), "tools[0]"),
            (
                json!({ "mcp": { "server": "git", "only": [] } }),
                "tools[0].mcp.only",
            ),
            (
                json!({ "mcp": { "tools": ["log"] } }),
                "tools[0].mcp.server",
            ),
            (
                json!({ "mcp": { "server": "git", "tools": [1] } }),
                "tools[0].mcp.tools[0]",
            ),
        ] {
            let e = tools(json!([bad])).unwrap_err();
            assert!(e.contains(&format!("with.{field}:")), "{field}: {e}");
        }
    }

    #[test]
    fn placeholders_are_filled_percent_encoded_and_hosts_matched() {
        let args = json!({ "city": "São Paulo/x", "n": 3 });
        let args = args.as_object().unwrap();
        assert_eq!(
            fill("https://a/w/{city}?n={n}", args, false).unwrap(),
            "https://a/w/S%C3%A3o%20Paulo%2Fx?n=3"
        );
        assert!(
            fill("https://a/{missing}", args, false)
                .unwrap_err()
                .contains("missing")
        );
        assert_eq!(placeholders("https://a/{x}/{y}"), ["x", "y"]);
        let allowed = vec!["api.example.com".to_owned(), "*.internal".to_owned()];
        assert!(host_allowed("API.example.com", &allowed));
        assert!(host_allowed("db.internal", &allowed));
        assert!(!host_allowed("internal", &allowed));
        assert!(!host_allowed("example.com", &allowed));
        assert!(!host_allowed("api.example.com.evil.net", &allowed));
    }
}
