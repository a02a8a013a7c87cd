//! The agentmesh coordinator: registry, dispatcher, swarms and runs as supervised ractor
//! actors, a durable SQLite store, and thin gRPC adapters over them.
//!
//! Start one with [`start`] (returns once it listens) or [`run`] (until a shutdown signal).
//! See `root.rs` for the supervision tree and ARCHITECTURE.md for the whole picture.

pub mod config;
pub mod directory;
pub mod dispatcher;
pub mod error;
pub mod grpc;
mod http;
pub mod machine;
pub mod metrics;
pub mod node_session;
pub mod registry;
pub mod root;
pub mod run;
mod slot;
pub mod store;
pub mod swarm;
pub mod swarms;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use mesh_proto::pb;
use metrics_exporter_prometheus::PrometheusHandle;
use ractor::{Actor, ActorRef};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{info, warn};

pub use config::CoordinatorConfig;
pub use error::{Error, Result};
use root::{CoordinatorRoot, Handles, RootArgs, RootMsg};
use store::Store;

/// A running coordinator.
#[derive(Debug)]
pub struct Coordinator {
    /// Where gRPC is served (the real port when the config asked for port 0).
    pub grpc_addr: SocketAddr,
    /// Where `/metrics` and `/healthz` are served.
    pub http_addr: SocketAddr,
    pub epoch: u64,
    root: ActorRef<RootMsg>,
    stop: Option<oneshot::Sender<()>>,
    servers: Vec<JoinHandle<()>>,
}

impl Coordinator {
    /// Stops serving, then stops the actors. Runs in flight stay in the store and resume
    /// at the next start.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        for server in self.servers.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
        }
        self.root.stop(Some("shutdown".into()));
        info!("coordinator stopped");
    }
}

/// Opens the store, starts the actors and both listeners; returns once they listen.
pub async fn start(
    config: CoordinatorConfig,
    prometheus: Option<PrometheusHandle>,
) -> Result<Coordinator> {
    crate::metrics::describe();
    if !config.listen.ip().is_loopback() {
        warn!(listen = %config.listen, "listening beyond loopback without TLS or tokens; anyone who reaches this address can use the mesh");
    }
    let store = Store::open(&config.data_dir)?;
    let epoch = store.bump_epoch().await?;
    let grpc_listener = TcpListener::bind(config.listen).await?;
    let http_listener = TcpListener::bind(config.http_listen).await?;
    let grpc_addr = grpc_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;

    let args = RootArgs {
        config: config.clone(),
        store,
        epoch,
    };
    let (root, _) = Actor::spawn(None, CoordinatorRoot, args)
        .await
        .map_err(|_| Error::Unavailable("coordinator root"))?;
    let handles: Handles = error::call_result(
        "coordinator root",
        root.call(RootMsg::Handles, Some(Duration::from_secs(5)))
            .await,
    )?;

    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (grpc_stop_tx, grpc_stop_rx) = oneshot::channel::<()>();
    let (http_stop_tx, http_stop_rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = stop_rx.await;
        let _ = grpc_stop_tx.send(());
        let _ = http_stop_tx.send(());
    });

    let grpc = tokio::spawn(serve_grpc(handles, grpc_listener, async move {
        let _ = grpc_stop_rx.await;
    }));
    let http = tokio::spawn(async move {
        let result = axum::serve(http_listener, http::router(prometheus))
            .with_graceful_shutdown(async move {
                let _ = http_stop_rx.await;
            })
            .await;
        if let Err(e) = result {
            warn!(error = %e, "HTTP server failed");
        }
    });
    info!(%grpc_addr, %http_addr, epoch, "coordinator listening");
    Ok(Coordinator {
        grpc_addr,
        http_addr,
        epoch,
        root,
        stop: Some(stop_tx),
        servers: vec![grpc, http],
    })
}

/// Runs a coordinator until `shutdown` resolves.
pub async fn run(
    config: CoordinatorConfig,
    prometheus: Option<PrometheusHandle>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let coordinator = start(config, prometheus).await?;
    shutdown.await;
    coordinator.stop().await;
    Ok(())
}

async fn serve_grpc(
    handles: Handles,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    use pb::goal_service_server::GoalServiceServer;
    use pb::node_service_server::NodeServiceServer;
    use pb::registry_service_server::RegistryServiceServer;
    use pb::workflow_service_server::WorkflowServiceServer;

    let max = grpc::MAX_MESSAGE_BYTES;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<GoalServiceServer<grpc::GoalApi>>()
        .await;
    health_reporter
        .set_serving::<NodeServiceServer<grpc::NodeApi>>()
        .await;
    health_reporter
        .set_serving::<RegistryServiceServer<grpc::RegistryApi>>()
        .await;
    health_reporter
        .set_serving::<WorkflowServiceServer<grpc::WorkflowApi>>()
        .await;
    // Reflection in both versions: grpcurl and most tools speak v1, Python's
    // grpcio-reflection only v1alpha.
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(mesh_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let (reflection, reflection_alpha) = match (builder().build_v1(), builder().build_v1alpha()) {
        (Ok(v1), Ok(v1alpha)) => (Some(v1), Some(v1alpha)),
        (Err(e), _) | (_, Err(e)) => {
            warn!(error = %e, "reflection disabled");
            (None, None)
        }
    };
    // Socket options set on the builder apply only to listeners tonic binds itself.
    let incoming = tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(30)));
    let result = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .max_concurrent_streams(Some(1024))
        .layer(grpc::CallLimitsLayer {
            deadline: handles.config.request_deadline,
        })
        .add_service(health_service)
        .add_optional_service(reflection)
        .add_optional_service(reflection_alpha)
        .add_service(
            NodeServiceServer::new(grpc::NodeApi::new(handles.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            GoalServiceServer::new(grpc::GoalApi {
                handles: handles.clone(),
            })
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
        )
        .add_service(
            WorkflowServiceServer::new(grpc::WorkflowApi {
                handles: handles.clone(),
            })
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
        )
        .add_service(
            RegistryServiceServer::new(grpc::RegistryApi { handles })
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    if let Err(e) = result {
        warn!(error = %e, "gRPC server failed");
    }
}
