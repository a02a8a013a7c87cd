//! The stock worker node: the SDK's node runtime hosting built-in agents configured from a
//! TOML file, plus `/metrics` on an HTTP port.
//!
//! Built-in agents, useful for demos, tests and benchmarks:
//! - `echo`: returns its input;
//! - `sleep`: waits `with.ms` milliseconds (cancellable), then returns;
//! - `flaky`: fails the first `fail_first` attempts of every step (with a retryable error,
//!   or by panicking with `mode = "panic"`), then echoes;
//! - `llm`: calls a language model on OpenAI, Anthropic, Gemini or Ollama (`docs/llm.md`).

mod builtins;
mod code;
mod config;
mod llm;
mod mcp;
mod sandbox;
mod tools;

use std::future::Future;

use std::sync::Arc;

use mesh_agent_sdk::NodeRuntime;
use mesh_agent_sdk::llm::{Limited, LlmConfig, Models};
use metrics_exporter_prometheus::PrometheusHandle;
use tracing::{info, warn};

pub use builtins::ExecutionLog;
pub use config::{AgentConfig, BuiltinKind, FlakyMode, NodeConfig, NodeLlmConfig, PriceConfig};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config: {0}")]
    Config(String),
    #[error(transparent)]
    Sdk(#[from] mesh_agent_sdk::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Runs the node until `shutdown` resolves, then drains.
pub async fn run(
    config: NodeConfig,
    prometheus: Option<PrometheusHandle>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    config.validate()?;
    let log = ExecutionLog::open(config.execution_log.as_deref())?;
    let providers = LlmConfig::from_env().overridden_by(&config.llm.providers());
    let llm = builtins::LlmSetup {
        models: Arc::new(Limited::new(
            Arc::new(Models::new(providers).map_err(|e| Error::Config(e.to_string()))?),
            &config.llm.limits()?,
        )),
        prices: config.llm.prices()?,
        mcp: Arc::new(config.mcp.clone()),
        sandbox: sandbox::Sandbox::new(config.sandbox.clone()),
    };
    let mut builder = NodeRuntime::builder().config(config.runtime_config());
    for agent in &config.agents {
        builder = builtins::add(builder, agent, &llm, log.clone());
    }
    let runtime = builder.build()?;
    if let Some(addr) = config.http_listen {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        info!(http = %listener.local_addr()?, "node metrics listening");
        // `/livez` for liveness probes: the process answers (it reconnects on its own).
        let app = axum::Router::new()
            .route("/livez", axum::routing::get(|| async { "alive\n" }))
            .route(
                "/metrics",
                axum::routing::get(move || {
                    let text = prometheus
                        .as_ref()
                        .map(PrometheusHandle::render)
                        .unwrap_or_default();
                    async move { text }
                }),
            );
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                warn!(error = %e, "node metrics server failed");
            }
        });
    }
    info!(node = %config.name, coordinator = %config.coordinator, agents = config.agents.len(), "node starting");
    runtime.run_until(shutdown).await?;
    Ok(())
}
