//! `mesh`: run a local mesh, a coordinator or a node; submit goals, watch runs, list nodes.

mod access;
mod bench;
mod certs;
mod client;
mod dev;
mod goalfile;
mod output;
mod trace;
mod workflows;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use mesh_coordinator::CoordinatorConfig;
use mesh_node::NodeConfig;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

#[derive(Parser)]
#[command(
    name = "mesh",
    version,
    about = "agentmesh: a distributed, actor-based mesh for AI agents"
)]
struct Cli {
    /// Coordinator gRPC address, for client commands.
    #[arg(
        long,
        global = true,
        env = "MESH_COORDINATOR",
        default_value = "http://127.0.0.1:7700"
    )]
    coordinator: String,
    /// Output format of client commands.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// API token for a coordinator with authentication on (`mesh token create`); a worker
    /// token for `mesh node`.
    #[arg(long, global = true, env = "MESH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The namespace client commands act in.
    #[arg(long, global = true, env = "MESH_NAMESPACE", default_value = "default")]
    namespace: String,
    /// The CA that signed an https:// coordinator's certificate (PEM).
    #[arg(long, global = true, env = "MESH_CA")]
    ca: Option<PathBuf>,
    /// A client certificate for mutual TLS (PEM), with --key.
    #[arg(long, global = true, env = "MESH_CERT", requires = "key")]
    cert: Option<PathBuf>,
    #[arg(long, global = true, env = "MESH_KEY", requires = "cert")]
    key: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Write a development CA and certificates for the coordinator, nodes and a client into
    /// DIR (not for production: the CA's key is there too).
    Dev {
        dir: PathBuf,
        /// A name the coordinator is reached by (repeat; default localhost and 127.0.0.1).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// A node's name: its certificate is for that name (repeat; default node-1).
        #[arg(long = "node")]
        nodes: Vec<String>,
    },
}

/// Where client commands go, and as whom.
pub struct Target {
    pub url: String,
    token: Option<String>,
    namespace: String,
    tls: mesh_agent_sdk::TlsFiles,
}

impl Target {
    /// A client of the coordinator, with the token and namespace.
    pub async fn connect(&self) -> Result<mesh_agent_sdk::GoalClient> {
        let mut client = mesh_agent_sdk::GoalClient::connect_with(&self.url, &self.tls)
            .await?
            .with_namespace(&self.namespace)?;
        if let Some(token) = self.token.as_deref().filter(|t| !t.trim().is_empty()) {
            client = client.with_token(token)?;
        }
        Ok(client)
    }

    /// A client acting in `namespace` rather than the global one.
    pub async fn connect_in(&self, namespace: &str) -> Result<mesh_agent_sdk::GoalClient> {
        Ok(self.connect().await?.with_namespace(namespace)?)
    }
}

/// A token from a file (its first line).
fn read_token(path: &std::path::Path) -> Result<mesh_agent_sdk::llm::Secret> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the token file {}", path.display()))?;
    let token = text.lines().next().unwrap_or_default().trim();
    if token.is_empty() {
        bail!("the token file {} is empty", path.display());
    }
    Ok(mesh_agent_sdk::llm::Secret::new(token))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum NodeAction {
    /// Stop new dispatch to a node and have it leave once its in-flight attempts finish.
    Drain {
        node: String,
        #[arg(long, default_value = "drain requested from the CLI")]
        reason: String,
    },
}

#[derive(Subcommand)]
enum Command {
    /// A coordinator and two nodes with the built-in agents, in one process, on the embedded store.
    Dev(dev::DevArgs),
    /// Run a coordinator.
    Coordinator {
        /// TOML configuration file (see deploy/coordinator.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// gRPC address; loopback unless told otherwise.
        #[arg(long, env = "MESH_LISTEN")]
        listen: Option<SocketAddr>,
        /// HTTP address for /metrics and /healthz.
        #[arg(long, env = "MESH_HTTP_LISTEN")]
        http_listen: Option<SocketAddr>,
        /// Directory of the embedded store.
        #[arg(long, env = "MESH_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// The store: postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE, or none for the
        /// embedded SQLite store in the data directory.
        #[arg(long, env = "MESH_STORE", hide_env_values = true)]
        store: Option<String>,
        /// Where clients reach this coordinator, which standbys name to those that call them
        /// (`[cluster] advertise`; on Kubernetes, the pod's IP).
        #[arg(long, env = "MESH_ADVERTISE")]
        advertise: Option<String>,
        /// Listen beyond loopback without TLS and authentication (a trusted network only;
        /// warned at every start).
        #[arg(long)]
        insecure: bool,
    },
    /// Run a worker node with built-in agents (or `mesh node drain NODE`).
    #[command(args_conflicts_with_subcommands = true)]
    Node {
        #[command(subcommand)]
        action: Option<NodeAction>,
        /// TOML configuration file (see deploy/node.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Node name; overrides the file.
        #[arg(long, env = "MESH_NODE_NAME")]
        name: Option<String>,
    },
    /// Submit goals.
    Goal {
        #[command(subcommand)]
        command: client::GoalCommand,
    },
    /// Register, read, list and validate workflow definitions.
    Workflow {
        #[command(subcommand)]
        command: workflows::WorkflowCommand,
    },
    /// Read, watch, cancel and list runs.
    Run {
        #[command(subcommand)]
        command: client::RunCommand,
    },
    /// Nodes known to the coordinator, with their health.
    Nodes,
    /// Load generator: runs workloads against meshes it starts (see BENCHMARKS.md).
    Bench(bench::BenchArgs),
    /// The baseline's bare echo server (started by `mesh bench baseline`).
    #[command(hide = true)]
    BenchEchoServer {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// The baseline's relay (started by `mesh bench baseline`).
    #[command(hide = true)]
    BenchRelay {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        upstream: String,
    },
    /// Certificates for mutual TLS.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// API tokens for a coordinator with authentication on.
    Token {
        #[command(subcommand)]
        command: access::TokenCommand,
    },
    /// Secrets of a namespace, for workflows to name as `${{ secrets.NAME }}`.
    Secret {
        #[command(subcommand)]
        command: access::SecretCommand,
    },
    /// Tools registered once per namespace (docs/tools.md), in the namespace of `--namespace`.
    Tool {
        #[command(subcommand)]
        command: access::ToolCommand,
    },
    /// Memory that outlives runs (docs/memory.md), in the namespace of `--namespace`.
    Memory {
        #[command(subcommand)]
        command: access::MemoryCommand,
    },
    /// The audit log: authorization decisions and state-changing calls.
    Audit {
        #[command(subcommand)]
        command: access::AuditCommand,
    },
    /// Agents known to the coordinator.
    Agents {
        /// Only agents with this skill.
        #[arg(long)]
        skill: Option<String>,
    },
}

/// genai warns of every OpenAI stream's last chunk (usage, with no choice in it, as the
/// protocol sends it): not a problem, so not in the log unless asked for.
const QUIET: &str = "genai::adapter::adapters::openai::streamer=error";

/// Logs (and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans) of this process, under the
/// service name `service` (docs/observability.md); keep the answer until the process ends.
fn init_tracing(default: &str, service: &str) -> mesh_agent_sdk::telemetry::Telemetry {
    mesh_agent_sdk::telemetry::init(&format!("{default},{QUIET}"), service)
}

/// Installs the process-wide Prometheus recorder and keeps it tidy.
fn prometheus() -> Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn read_toml<T: serde::de::DeserializeOwned + Default>(path: Option<&PathBuf>) -> Result<T> {
    match path {
        None => Ok(T::default()),
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("{}: invalid configuration", p.display()))
        }
    }
}

/// Every process of the mesh (coordinator, node, the CLI itself) allocates with mimalloc:
/// under load the coordinator spent about a fifth of its time in glibc's malloc and free.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// One line per error (with its causes) and a non-zero exit; never a backtrace, whatever
/// `RUST_BACKTRACE` says: a backtrace is for bugs, and a panic still prints one.
#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let target = Target {
        url: cli.coordinator.clone(),
        token: cli.token.clone(),
        namespace: cli.namespace.clone(),
        tls: mesh_agent_sdk::TlsFiles {
            ca_file: cli.ca.clone(),
            cert_file: cli.cert.clone(),
            key_file: cli.key.clone(),
        },
    };
    match cli.command {
        Command::Dev(args) => {
            let _telemetry = init_tracing(
                if args.demo {
                    "warn"
                } else {
                    "info,ractor=warn"
                },
                "mesh-dev",
            );
            dev::run(args, prometheus()?).await
        }
        Command::Coordinator {
            config,
            listen,
            http_listen,
            data_dir,
            store,
            advertise,
            insecure,
        } => {
            let _telemetry = init_tracing("info,ractor=warn", "mesh-coordinator");
            let mut cfg: CoordinatorConfig = read_toml(config.as_ref())?;
            cfg.insecure |= insecure;
            cfg.listen = listen.unwrap_or(cfg.listen);
            cfg.http_listen = http_listen.unwrap_or(cfg.http_listen);
            cfg.data_dir = data_dir.unwrap_or(cfg.data_dir);
            cfg.store = store.map(mesh_coordinator::config::StoreUrl).or(cfg.store);
            cfg.cluster.advertise = advertise.or(cfg.cluster.advertise);
            mesh_coordinator::run(cfg, Some(prometheus()?), shutdown_signal()).await?;
            Ok(())
        }
        Command::Node {
            action: Some(NodeAction::Drain { node, reason }),
            ..
        } => {
            let _telemetry = init_tracing("warn", "mesh-cli");
            client::drain(&target, cli.output, &node, &reason).await
        }
        Command::Node {
            action: None,
            config,
            name,
        } => {
            let _telemetry = init_tracing("info,ractor=warn", "mesh-node");
            let mut cfg = match &config {
                Some(p) => NodeConfig::from_file(p)?,
                None => NodeConfig::default(),
            };
            if let Ok(url) = std::env::var("MESH_COORDINATOR") {
                cfg.coordinator = url;
            }
            cfg.name = name.unwrap_or(cfg.name);
            cfg.token = match &cfg.token_file {
                Some(path) => Some(read_token(path)?),
                None => cli.token.clone().map(mesh_agent_sdk::llm::Secret::new),
            };
            if cfg.namespaces.is_empty() {
                cfg.namespaces = vec![cli.namespace.clone()];
            }
            mesh_node::run(cfg, Some(prometheus()?), shutdown_signal()).await?;
            Ok(())
        }
        Command::Goal { command } => {
            let _telemetry = init_tracing("warn", "mesh-cli");
            client::goal(&target, cli.output, command).await
        }
        Command::Workflow { command } => {
            let _telemetry = init_tracing("warn", "mesh-cli");
            workflows::workflow(&target, cli.output, command).await
        }
        Command::Run { command } => {
            let _telemetry = init_tracing("warn", "mesh-cli");
            client::run(&target, cli.output, command).await
        }
        Command::Nodes => {
            let _telemetry = init_tracing("warn", "mesh-cli");
            client::nodes(&target, cli.output).await
        }
        Command::Bench(args) => {
            let _telemetry = init_tracing("warn", "mesh-cli");
            bench::run(args, cli.output).await
        }
        Command::BenchEchoServer { listen } => bench::serve_echo(listen, shutdown_signal()).await,
        Command::BenchRelay { listen, upstream } => {
            bench::serve_relay(listen, upstream, shutdown_signal()).await
        }
        Command::Certs {
            command: CertsCommand::Dev { dir, hosts, nodes },
        } => {
            let hosts = if hosts.is_empty() {
                vec!["localhost".to_owned(), "127.0.0.1".to_owned()]
            } else {
                hosts
            };
            let nodes = if nodes.is_empty() {
                vec!["node-1".to_owned()]
            } else {
                nodes
            };
            certs::dev(&dir, &hosts, &nodes)
        }
        Command::Token { command } => {
            let _telemetry = init_tracing("warn", "mesh-cli");
            access::token(&target, cli.output, command).await
        }
        Command::Secret { command } => {
            let _telemetry = init_tracing("warn", "mesh-cli");
            access::secret(&target, cli.output, command).await
        }
        Command::Memory { command } => {
            let _telemetry = init_tracing("warn", "mesh-cli");
            access::memory(&target, cli.output, command).await
        }
        Command::Tool { command } => {
            let _telemetry = init_tracing("warn", "mesh-cli");
            access::tool(&target, cli.output, command).await
        }
        Command::Audit { command } => {
            let _telemetry = init_tracing("warn", "mesh-cli");
            access::audit(&target, cli.output, command).await
        }
        Command::Agents { skill } => {
            let _telemetry = init_tracing("warn", "mesh-cli");
            client::agents(&target, cli.output, skill.as_deref()).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The annotated configurations in `deploy/` are what the binary reads: every key known,
    /// every node valid.
    #[test]
    fn the_deploy_configurations_parse() {
        let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        let mut seen = 0;
        let files = std::fs::read_dir(&deploy)
            .unwrap()
            .chain(std::fs::read_dir(deploy.join("kubernetes")).unwrap());
        for entry in files {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with("coordinator") && name.ends_with(".toml") {
                let cfg: CoordinatorConfig = read_toml(Some(&path)).unwrap();
                if name.contains("secure") || path.parent().unwrap().ends_with("kubernetes") {
                    assert!(cfg.auth.enabled && cfg.tls.enabled(), "{}", path.display());
                }
                seen += 1;
            } else if name.starts_with("node") && name.ends_with(".toml") {
                let cfg = NodeConfig::from_file(&path).unwrap();
                cfg.validate().unwrap();
                seen += 1;
            }
        }
        assert!(seen >= 6, "{seen} configurations");
    }
}
