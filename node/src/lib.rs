//! The stock worker node: the SDK's node runtime hosting built-in agents configured from a
//! TOML file, plus `/metrics` on an HTTP port.
//!
//! Built-in agents, useful for demos, tests and benchmarks:
//! - `echo`: returns its input;
//! - `sleep`: waits `with.ms` milliseconds (cancellable), then returns;
//! - `flaky`: fails the first `fail_first` attempts of every step (with a retryable error,
//!   or by panicking with `mode = "panic"`), then echoes.

mod builtins;
mod config;

use std::future::Future;

use mesh_agent_sdk::NodeRuntime;
use metrics_exporter_prometheus::PrometheusHandle;
use tracing::{info, warn};

pub use builtins::ExecutionLog;
pub use config::{AgentConfig, BuiltinKind, FlakyMode, NodeConfig};

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
    let mut builder = NodeRuntime::builder().config(config.runtime_config());
    for agent in &config.agents {
        builder = builtins::add(builder, agent, log.clone());
    }
    let runtime = builder.build()?;
    if let Some(addr) = config.http_listen {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        info!(http = %listener.local_addr()?, "node metrics listening");
        let app = axum::Router::new().route(
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
