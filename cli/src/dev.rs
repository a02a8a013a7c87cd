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
    /// The whole local mesh with mutual TLS and tokens: certificates in DATA_DIR/certs, a
    /// cluster admin token in DATA_DIR/admin.token (docs/security.md).
    #[arg(long)]
    secure: bool,
}

pub async fn run(args: DevArgs, prometheus: PrometheusHandle) -> Result<()> {
    let started = Instant::now();
    let mut config = CoordinatorConfig {
        listen: args.listen,
        http_listen: args.http_listen,
        data_dir: args.data_dir.clone(),
        ..CoordinatorConfig::default()
    };
    // Secrets work out of the box: a key of the local mesh's own, beside its store.
    std::fs::create_dir_all(&args.data_dir)?;
    let key = args.data_dir.join("secrets.key");
    mesh_coordinator::secrets::ensure_key_file(&key)?;
    config.secrets.key_file = Some(key);
    let certs = args.data_dir.join("certs");
    let node_names = ["node-1", "node-2"];
    if args.secure {
        if !certs.join("ca.pem").exists() {
            let hosts = ["localhost".to_owned(), args.listen.ip().to_string()];
            let nodes = node_names.map(str::to_owned);
            crate::certs::dev(&certs, &hosts, &nodes)?;
        }
        config.auth.enabled = true;
        config.tls = mesh_coordinator::config::TlsConfig {
            cert_file: Some(certs.join("coordinator.pem")),
            key_file: Some(certs.join("coordinator.key")),
            client_ca_file: Some(certs.join("ca.pem")),
        };
    }
    let coordinator = mesh_coordinator::start(config, Some(prometheus))
        .await
        .with_context(|| format!("starting the coordinator on {}", args.listen))?;
    let scheme = if args.secure { "https" } else { "http" };
    let url = format!("{scheme}://{}", coordinator.grpc_addr);
    // Secured: the admin token the coordinator wrote, and a worker token for the nodes.
    let client_tls = mesh_agent_sdk::TlsFiles {
        ca_file: args.secure.then(|| certs.join("ca.pem")),
        ..Default::default()
    };
    let admin_file = args.data_dir.join(mesh_coordinator::ADMIN_TOKEN_FILE);
    let (admin, worker) = if args.secure {
        let admin = std::fs::read_to_string(&admin_file)
            .with_context(|| format!("cannot read {}", admin_file.display()))?
            .trim()
            .to_owned();
        let client = GoalClient::connect_with(&url, &client_tls)
            .await?
            .with_token(&admin)?;
        let worker = client
            .create_token(
                "dev-nodes",
                "default",
                "worker",
                Some(Duration::from_secs(86_400)),
            )
            .await?
            .secret;
        (Some(admin), Some(worker))
    } else {
        (None, None)
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut nodes = Vec::new();
    // With a model provider in the environment, node-1 hosts the `llm` agent too.
    let providers = mesh_agent_sdk::llm::LlmConfig::from_env().configured();
    for name in node_names {
        let mut cfg = NodeConfig {
            coordinator: url.clone(),
            name: name.into(),
            token: worker.clone().map(mesh_agent_sdk::llm::Secret::new),
            ..NodeConfig::default()
        };
        if args.secure {
            cfg.tls = mesh_agent_sdk::TlsFiles {
                ca_file: Some(certs.join("ca.pem")),
                cert_file: Some(certs.join(format!("{name}.pem"))),
                key_file: Some(certs.join(format!("{name}.key"))),
            };
        }
        if name == "node-1" && !providers.is_empty() {
            cfg.agents.push(AgentConfig::of(BuiltinKind::Llm));
            // The team of examples/workflows/llm-team.yaml, which message one another.
            for role in ["researcher", "writer", "critic"] {
                let mut agent = AgentConfig::of(BuiltinKind::Llm);
                agent.name = Some(role.to_owned());
                cfg.agents.push(agent);
            }
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
    if args.secure {
        println!(
            "mesh dev: secured with mutual TLS and tokens; for client commands:\n  export MESH_COORDINATOR={url} MESH_CA={} MESH_TOKEN=$(cat {})",
            certs.join("ca.pem").display(),
            admin_file.display()
        );
    }
    if providers.is_empty() {
        println!(
            "mesh dev: no model provider found; set OPENAI_API_KEY, ANTHROPIC_API_KEY, GEMINI_API_KEY or OLLAMA_HOST (see docs/llm.md) for the `llm` agent"
        );
    } else {
        let names: Vec<&str> = providers.iter().map(|p| p.as_str()).collect();
        println!(
            "mesh dev: node-1 hosts the `llm` agent and its team (researcher, writer, critic); providers found: {}",
            names.join(", ")
        );
    }

    let outcome = if args.demo {
        demo(
            &url,
            &client_tls,
            admin.as_deref(),
            args.goal.as_deref(),
            started,
        )
        .await
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

async fn demo(
    url: &str,
    tls: &mesh_agent_sdk::TlsFiles,
    token: Option<&str>,
    goal: Option<&std::path::Path>,
    started: Instant,
) -> Result<()> {
    let (name, text) = match goal {
        Some(path) => crate::goalfile::read(path)?,
        None => (
            "examples/goals/hello.yaml".to_owned(),
            SAMPLE_GOAL.to_owned(),
        ),
    };
    let goal = crate::goalfile::goal(&name, &text, serde_json::json!({}), None)?;
    let mut client = GoalClient::connect_with(url, tls).await?;
    if let Some(token) = token {
        client = client.with_token(token)?;
    }
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
