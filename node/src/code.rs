//! The `code` agent: a step runs Python or shell in the node's sandbox (`sandbox.rs`).
//!
//! ```yaml
//! - id: count
//!   uses: code
//!   with:
//!     language: python            # or shell
//!     code: "print(len(open(0).read().split()))"
//!     stdin: "${{ steps.draft.output.text }}"
//!     timeout: 5s                 # and memory_mb, processes, output_bytes, disk_mb
//! ```
//!
//! Its output: `exit_code`, `stdout`, `stderr`, `limit` (`time` or `output` when one ended the
//! run, else null) and `elapsed_ms`. A run that exits non-zero or passes a limit fails the
//! attempt for good (`exit_code`, `time_limit`, `output_limit`) with the end of its stderr.

use mesh_agent_sdk::{Agent, AgentCard, AgentError, Context};
use serde_json::{Map, Value};

use crate::builtins::ExecutionLog;
use crate::sandbox::{Language, Limits, RunResult, Sandbox, Stopped, read_limits};

pub struct CodeAgent {
    pub card: AgentCard,
    pub sandbox: Sandbox,
    pub log: ExecutionLog,
}

/// `language` and the limits of a `with` (the agent's) or of a `code` tool's declaration.
pub fn read_language_and_limits(
    obj: &Map<String, Value>,
    path: &str,
) -> Result<(Language, Limits), AgentError> {
    let language = match obj.get("language") {
        Some(Value::String(l)) => Language::parse(l).ok_or_else(|| {
            AgentError::bad_input(format!("{path}.language: `{l}`: python or shell"))
        })?,
        _ => {
            return Err(AgentError::bad_input(format!(
                "{path}.language: required, python or shell"
            )));
        }
    };
    let limits = read_limits(obj, path).map_err(AgentError::bad_input)?;
    Ok((language, limits))
}

/// The last `n` characters of `text`, for an error message.
fn tail(text: &str, n: usize) -> &str {
    let count = text.chars().count();
    match text.char_indices().nth(count.saturating_sub(n)) {
        Some((i, _)) => &text[i..],
        None => text,
    }
}

/// The error of a run that did not end well; `None` when it exited 0 within its limits.
pub fn failure(result: &RunResult, limits: &Limits) -> Option<AgentError> {
    let why = tail(result.stderr.trim_end(), 500);
    match result.stopped {
        Some(Stopped::Time) => Some(AgentError::fatal(
            "time_limit",
            format!("the code ran past its time limit ({:?})", limits.timeout),
        )),
        Some(Stopped::Output) => Some(AgentError::fatal(
            "output_limit",
            format!(
                "the code wrote more than its output limit ({} bytes)",
                limits.output_bytes
            ),
        )),
        None if result.exit_code != 0 => Some(AgentError::fatal(
            "exit_code",
            format!("the code exited with {}: {why}", result.exit_code),
        )),
        None => None,
    }
}

impl Agent for CodeAgent {
    fn card(&self) -> AgentCard {
        self.card.clone()
    }

    async fn handle(&self, ctx: Context, input: Value) -> Result<Value, AgentError> {
        self.log.record(&self.card.name, &ctx);
        let Some(obj) = input["with"].as_object() else {
            return Err(AgentError::bad_input(
                "with: a code step needs `language` and `code`",
            ));
        };
        const KNOWN: [&str; 8] = [
            "language",
            "code",
            "stdin",
            "timeout",
            "memory_mb",
            "processes",
            "output_bytes",
            "disk_mb",
        ];
        crate::tools::only_known(obj, &KNOWN, "")?;
        let (language, limits) = read_language_and_limits(obj, "with")?;
        let code = obj
            .get("code")
            .and_then(Value::as_str)
            .ok_or_else(|| AgentError::bad_input("with.code: required, a string"))?;
        let stdin = match obj.get("stdin") {
            None | Some(Value::Null) => "",
            Some(Value::String(s)) => s.as_str(),
            Some(_) => return Err(AgentError::bad_input("with.stdin: must be a string")),
        };
        let result = tokio::select! {
            r = self.sandbox.run(language, code, stdin, limits) => r,
            _ = ctx.cancelled() => return Err(AgentError::fatal("cancelled", "the run was cancelled")),
        }
        .map_err(|e| AgentError::retryable("sandbox_unavailable", e))?;
        match failure(&result, &limits) {
            Some(e) => Err(e),
            None => Ok(result.to_json()),
        }
    }
}
