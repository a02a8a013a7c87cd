//! `mesh dev`: a coordinator and two nodes in one process, on the embedded store.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use mesh_agent_sdk::GoalClient;
use mesh_coordinator::CoordinatorConfig;
use mesh_node::{AgentConfig, BuiltinKind, NodeConfig};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::watch;

use crate::Output;

const SAMPLE_GOAL: &str = include_str!("../../examples/goals/hello.yaml");

#[derive(Args)]
pub struct DevArgs {
    /// gRPC address; loopback unless told otherwise.
    #[arg(long, default_value = "127.0.0.1:7700")]
    listen: SocketAddr,
    /// HTTP address for /metrics and /healthz.
    #[arg(long, default_value = "127.0.0.1:7701")]
    http_listen: SocketAddr,
    /// Directory of the embedded store.
    #[arg(long, default_value = ".mesh/dev")]
    data_dir: PathBuf,
    /// Run the sample goal (or --goal FILE) to completion, print it, and exit.
    #[arg(long)]
    pub demo: bool,
    /// Goal file for --demo.
    #[arg(long)]
    goal: Option<PathBuf>,
}

pub async fn run(args: DevArgs, prometheus: PrometheusHandle) -> Result<()> {
    let started = Instant::now();
    let config = CoordinatorConfig {
        listen: args.listen,
        http_listen: args.http_listen,
        data_dir: args.data_dir.clone(),
        ..CoordinatorConfig::default()
    };
    let coordinator = mesh_coordinator::start(config, Some(prometheus))
        .await
        .with_context(|| format!("starting the coordinator on {}", args.listen))?;
    let url = format!("http://{}", coordinator.grpc_addr);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut nodes = Vec::new();
    // With a model provider in the environment, node-1 hosts the `llm` agent too.
    let providers = mesh_agent_sdk::llm::LlmConfig::from_env().configured();
    for name in ["node-1", "node-2"] {
        let mut cfg = NodeConfig {
            coordinator: url.clone(),
            name: name.into(),
            ..NodeConfig::default()
        };
        if name == "node-1" && !providers.is_empty() {
            cfg.agents.push(AgentConfig::of(BuiltinKind::Llm));
        }
        let mut stop = stop_rx.clone();
        nodes.push(tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = mesh_node::run(cfg, None, shutdown).await {
                tracing::error!(error = %e, "dev node failed");
            }
        }));
    }
    println!(
        "mesh dev: coordinator grpc {url}  http http://{}  store {}",
        coordinator.http_addr,
        args.data_dir.display()
    );
    println!("mesh dev: nodes node-1, node-2 with agents echo, sleep, flaky");
    if providers.is_empty() {
        println!(
            "mesh dev: no model provider found; set OPENAI_API_KEY, ANTHROPIC_API_KEY, GEMINI_API_KEY or OLLAMA_HOST (see docs/llm.md) for the `llm` agent"
        );
    } else {
        let names: Vec<&str> = providers.iter().map(|p| p.as_str()).collect();
        println!(
            "mesh dev: node-1 hosts the `llm` agent; providers found: {}",
            names.join(", ")
        );
    }

    let outcome = if args.demo {
        demo(&url, args.goal.as_deref(), started).await
    } else {
        println!(
            "mesh dev: ready; try `mesh goal submit examples/goals/hello.yaml --watch` (Ctrl-C stops)"
        );
        crate::shutdown_signal().await;
        Ok(())
    };
    let _ = stop_tx.send(true);
    for node in nodes {
        let _ = tokio::time::timeout(Duration::from_secs(10), node).await;
    }
    coordinator.stop().await;
    outcome
}

async fn demo(url: &str, goal: Option<&std::path::Path>, started: Instant) -> Result<()> {
    let (name, text) = match goal {
        Some(path) => crate::goalfile::read(path)?,
        None => (
            "examples/goals/hello.yaml".to_owned(),
            SAMPLE_GOAL.to_owned(),
        ),
    };
    let goal = crate::goalfile::goal(&name, &text, serde_json::json!({}), None)?;
    let client = GoalClient::connect(url).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while client
        .nodes()
        .await?
        .iter()
        .filter(|n| n.health == mesh_agent_sdk::Health::Healthy)
        .count()
        < 2
    {
        if Instant::now() > deadline {
            bail!("the dev nodes did not register within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let run = client.submit(goal).await?;
    println!("mesh dev: submitted run {}", run.run_id);
    let result = crate::client::watch_run(&client, &run.run_id, Output::Table).await;
    println!(
        "mesh dev: start to goal finished in {} ms",
        started.elapsed().as_millis()
    );
    result
}
