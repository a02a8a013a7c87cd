//! Write agents for agentmesh.
//!
//! - [`Agent`]: what an agent author implements: a card (name, skills, max concurrency)
//!   and `handle(ctx, input)`.
//! - [`NodeRuntime`]: hosts agents on a node. It registers with the coordinator, heartbeats
//!   on the same stream that carries tasks, reconnects with capped exponential backoff and
//!   jitter, registers again after a coordinator restart, runs every agent in a supervised
//!   actor (restarted after a panic, within a restart budget), honours max concurrency, and
//!   drains on shutdown.
//! - [`GoalClient`]: submit goals and watch runs.
//! - [`llm`]: call language models (OpenAI, Anthropic, Gemini, Ollama) by `provider/model`,
//!   with fallback chains, usage and cost.
//!
//! No tonic or prost type appears in this API; JSON values are `serde_json::Value`.
//!
//! ```no_run
//! use mesh_agent_sdk::{Agent, AgentCard, AgentError, Context, NodeRuntime};
//! use serde_json::Value;
//!
//! struct Upper;
//!
//! impl Agent for Upper {
//!     fn card(&self) -> AgentCard {
//!         AgentCard::new("upper").skill("uppercase").max_concurrency(8)
//!     }
//!     async fn handle(&self, _ctx: Context, input: Value) -> Result<Value, AgentError> {
//!         let text = input["with"]["text"].as_str().ok_or_else(|| AgentError::bad_input("with.text must be a string"))?;
//!         Ok(Value::String(text.to_uppercase()))
//!     }
//! }
//!
//! # async fn run() -> Result<(), mesh_agent_sdk::Error> {
//! NodeRuntime::builder()
//!     .coordinator("http://127.0.0.1:7700")
//!     .name("upper-node")
//!     .agent(Upper)
//!     .build()?
//!     .run_until(async { tokio::signal::ctrl_c().await.ok(); })
//!     .await
//! # }
//! ```

mod agent;
mod client;
mod error;
pub mod llm;
pub mod messages;
pub mod metrics;
mod runtime;
pub mod telemetry;

pub use agent::{Agent, AgentCard, AgentError, Context, Progress, UsedTool};
pub use client::{
    ClientError, GoalClient, RpcCode, TlsFiles, WorkflowProblem, check_coordinator_url,
};
pub use error::{Error, Result};
pub use mesh_proto::domain::{
    AgentKey, AgentView, Budget, FencingToken, GoalSpec, Health, ModelUsage, NodeView, OnExceed,
    RunEvent, RunId, RunPage, RunRef, RunState, RunSummary, RunView, SkillSpec, StepId, StepSpec,
    StepState, StepView, SwarmMember, ToolDecision, UsageTotal, WorkflowRecord,
};
pub use messages::{Mail, Message};
pub use runtime::{NodeRuntime, NodeRuntimeBuilder, RuntimeConfig};
