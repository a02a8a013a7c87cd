//! The built-in agents.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_agent_sdk::{Agent, AgentCard, AgentError, Context, NodeRuntimeBuilder};
use serde_json::{Value, json};

use crate::config::{AgentConfig, BuiltinKind, FlakyMode};
use crate::llm::{LlmAgent, LlmPlanner};
use mesh_agent_sdk::llm::{ChatModel, Prices, RetryPolicy};

/// Appends one JSON line per attempt started, when configured.
#[derive(Clone, Debug, Default)]
pub struct ExecutionLog(Option<Arc<Mutex<File>>>);

impl ExecutionLog {
    pub fn open(path: Option<&Path>) -> std::io::Result<Self> {
        Ok(Self(match path {
            Some(p) => Some(Arc::new(Mutex::new(
                OpenOptions::new().create(true).append(true).open(p)?,
            ))),
            None => None,
        }))
    }

    pub(crate) fn record(&self, agent: &str, ctx: &Context) {
        if let Some(file) = &self.0 {
            let line = json!({
                "agent": agent,
                "run_id": ctx.run_id(),
                "step_id": ctx.step_id(),
                "index": ctx.token().index,
                "attempt": ctx.attempt(),
                "epoch": ctx.token().epoch,
            });
            let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
            let _ = writeln!(f, "{line}");
        }
    }
}

struct Builtin {
    card: AgentCard,
    config: AgentConfig,
    log: ExecutionLog,
}

impl Agent for Builtin {
    fn card(&self) -> AgentCard {
        self.card.clone()
    }

    async fn handle(&self, ctx: Context, input: Value) -> Result<Value, AgentError> {
        self.log.record(&self.card.name, &ctx);
        match self.config.kind {
            BuiltinKind::Echo => Ok(input),
            BuiltinKind::Sleep => {
                let ms = input["with"]["ms"].as_u64().ok_or_else(|| {
                    AgentError::bad_input("with.ms must be a whole number of milliseconds")
                })?;
                // Half-way, report progress (a long job shows it).
                let half = Duration::from_millis(ms / 2);
                tokio::select! {
                    _ = async {
                        tokio::time::sleep(half).await;
                        ctx.progress(format!("slept {} of {ms} ms", ms / 2), Some(0.5));
                        tokio::time::sleep(Duration::from_millis(ms) - half).await;
                    } => Ok(json!({ "slept_ms": ms, "with": input["with"] })),
                    _ = ctx.cancelled() => Err(AgentError::fatal("cancelled", "sleep cancelled")),
                }
            }
            BuiltinKind::Flaky => {
                if ctx.attempt() <= self.config.fail_first {
                    let why = format!(
                        "attempt {} of step {} fails on purpose",
                        ctx.attempt(),
                        ctx.step_id()
                    );
                    match self.config.mode {
                        FlakyMode::Error => return Err(AgentError::retryable("flaky", why)),
                        FlakyMode::Panic => panic!("{why}"),
                    }
                }
                Ok(json!({ "attempt": ctx.attempt(), "input": input }))
            }
            // Hosted as `LlmAgent` (see `add`).
            BuiltinKind::Llm | BuiltinKind::LlmPlanner | BuiltinKind::Code => Err(
                AgentError::fatal("internal", "model agents are hosted apart"),
            ),
        }
    }
}

pub fn add(
    builder: NodeRuntimeBuilder,
    config: &AgentConfig,
    llm: &LlmSetup,
    log: ExecutionLog,
) -> NodeRuntimeBuilder {
    let mut card = AgentCard::new(&config.name())
        .description(match config.kind {
            BuiltinKind::Echo => "returns its input",
            BuiltinKind::Sleep => "waits with.ms milliseconds",
            BuiltinKind::Flaky => "fails its first attempts of each step, then echoes",
            BuiltinKind::Llm => "calls a language model: with.model (or models), prompt, system",
            BuiltinKind::LlmPlanner => "a language model writes a text goal's workflow",
            BuiltinKind::Code => "runs with.code (python or shell) in a sandbox",
        })
        .max_concurrency(config.max_concurrency);
    for skill in config.skills() {
        card = card.skill(&skill);
    }
    if config.kind == BuiltinKind::LlmPlanner {
        return builder.agent(LlmPlanner {
            card,
            models: llm.models.clone(),
            chain: mesh_agent_sdk::llm::parse_models(&config.models).unwrap_or_default(),
            prices: llm.prices.clone(),
            log,
        });
    }
    if config.kind == BuiltinKind::Code {
        return builder.agent(crate::code::CodeAgent {
            card,
            sandbox: llm.sandbox.clone(),
            log,
        });
    }
    if config.kind == BuiltinKind::Llm {
        return builder.agent(LlmAgent {
            card: card.inbox(),
            inbox: Arc::default(),
            models: llm.models.clone(),
            prices: llm.prices.clone(),
            retry: RetryPolicy::default(),
            log,
            http: crate::tools::http_client(),
            mcp: llm.mcp.clone(),
            sandbox: llm.sandbox.clone(),
        });
    }
    builder.agent(Builtin {
        card,
        config: config.clone(),
        log,
    })
}

/// What every `llm` agent of a node shares: its providers and prices, and the MCP servers
/// its steps may use.
#[derive(Clone)]
pub struct LlmSetup {
    pub models: Arc<dyn ChatModel>,
    pub prices: Prices,
    pub mcp: Arc<crate::mcp::Servers>,
    pub sandbox: crate::sandbox::Sandbox,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(kind: BuiltinKind, mode: FlakyMode) -> Builtin {
        let mut config = AgentConfig::of(kind);
        config.mode = mode;
        config.fail_first = 2;
        Builtin {
            card: AgentCard::new(kind.as_str()).skill(kind.as_str()),
            config,
            log: ExecutionLog::default(),
        }
    }

    #[tokio::test]
    async fn echo_returns_its_input() {
        let input = json!({ "with": { "x": 1 } });
        let out = agent(BuiltinKind::Echo, FlakyMode::Error)
            .handle(Context::for_test("r", "s", 1), input.clone())
            .await;
        assert_eq!(out.unwrap(), input);
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_needs_ms() {
        let a = agent(BuiltinKind::Sleep, FlakyMode::Error);
        let err = a
            .handle(Context::for_test("r", "s", 1), json!({ "with": {} }))
            .await
            .unwrap_err();
        assert_eq!(err.code, "bad_input");
        assert!(!err.retryable);
        let out = a
            .handle(
                Context::for_test("r", "s", 1),
                json!({ "with": { "ms": 50 } }),
            )
            .await
            .unwrap();
        assert_eq!(out["slept_ms"], 50);
    }

    #[tokio::test]
    async fn flaky_fails_its_first_attempts() {
        let a = agent(BuiltinKind::Flaky, FlakyMode::Error);
        for attempt in 1..=2 {
            let err = a
                .handle(Context::for_test("r", "s", attempt), json!({}))
                .await
                .unwrap_err();
            assert!(err.retryable);
        }
        let ok = a
            .handle(Context::for_test("r", "s", 3), json!({}))
            .await
            .unwrap();
        assert_eq!(ok["attempt"], 3);
    }

    #[test]
    fn execution_log_appends_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exec.jsonl");
        let log = ExecutionLog::open(Some(&path)).unwrap();
        log.record("echo", &Context::for_test("r1", "a", 1));
        log.record("echo", &Context::for_test("r1", "a", 2));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(text.contains("\"step_id\":\"a\""));
    }
}
