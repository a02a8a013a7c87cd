//! The agentmesh coordinator: registry, dispatcher, swarms and runs as supervised ractor
//! actors, a durable SQLite store, and thin gRPC adapters over them.
//!
//! Start one with [`start`] (returns once it listens) or [`run`] (until a shutdown signal).
//! See `root.rs` for the supervision tree and ARCHITECTURE.md for the whole picture.

pub mod auth;
pub mod config;
mod dashboard;
pub mod directory;
pub mod dispatcher;
pub mod error;
pub mod grpc;
mod http;
pub mod intake;
pub mod journal;
pub mod jwt;
pub mod leadership;
pub mod machine;
pub mod memory;
pub mod metrics;
pub mod node_link;
pub mod node_session;
pub mod postbox;
pub mod quotas;
pub mod readiness;
pub mod registry;
pub mod root;
pub mod run;
pub mod secrets;
mod slot;
pub mod store;
pub mod swarm;
pub mod swarms;
pub mod tools;
pub mod trace;

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
use readiness::Readiness;
use root::{CoordinatorRoot, Handles, RootArgs, RootMsg};
use store::{Backend, Store};

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
    readiness: Readiness,
    shutdown_grace: Duration,
    /// Ends when the root actor does: on `stop`, or when it failed past its restart budget.
    root_done: JoinHandle<()>,
    /// On PostgreSQL: says why, when this coordinator has lost its lease.
    deposed: Option<oneshot::Receiver<String>>,
    /// On PostgreSQL: the lease this coordinator holds (store, holder, epoch), given up when it
    /// stops, so that a standby takes over at its next try instead of after the lease.
    lease: Option<(crate::store::PostgresStore, String, u64)>,
    /// The actors and the store, for the tests of the restart paths.
    #[cfg(test)]
    handles: Handles,
}

impl Coordinator {
    /// Serves until `shutdown` resolves, then stops. An error when the coordinator's actors
    /// failed past their restart budget (see `root.rs`): it stops then, so that whatever
    /// supervises the process restarts it.
    pub async fn serve_until(mut self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let mut deposed = self.deposed.take();
        let lost = async {
            match deposed.as_mut() {
                Some(said) => said
                    .await
                    .unwrap_or_else(|_| "the lease keeper ended".into()),
                None => std::future::pending().await,
            }
        };
        let failed = tokio::select! {
            () = shutdown => None,
            _ = &mut self.root_done => Some(
                "the coordinator's actors failed past their restart budget; exiting so that the process is restarted".to_owned(),
            ),
            why = lost => Some(format!(
                "deposed: {why}; exiting so that the process is restarted as a standby"
            )),
        };
        self.stop().await;
        match failed {
            Some(why) => Err(Error::Fatal(why)),
            None => Ok(()),
        }
    }

    /// Stops serving, then stops the actors. Runs in flight stay in the store and resume
    /// at the next start.
    pub async fn stop(mut self) {
        // Health says NOT_SERVING first (at once for /healthz, within a tick for gRPC), and
        // for `shutdown_grace` everything else is still served.
        self.readiness.draining();
        if !self.shutdown_grace.is_zero() {
            info!(grace = ?self.shutdown_grace, "draining: health is NOT_SERVING");
            tokio::time::sleep(self.shutdown_grace).await;
        }
        // The lease goes first: from then on this coordinator's writes are refused (the fence
        // wants an unexpired lease), so whatever is still in flight cannot clash with the
        // standby that takes over at its next try; its callers get UNAVAILABLE and go there.
        if let Some((pg, holder, epoch)) = self.lease.take() {
            match tokio::time::timeout(Duration::from_secs(2), pg.resign(&holder, epoch)).await {
                Ok(Ok(true)) => info!(epoch, "lease given up: a standby takes over now"),
                Ok(Ok(false)) => {}
                Ok(Err(e)) => warn!(error = %e, "cannot give the lease up; it lapses on its own"),
                Err(_) => warn!("giving the lease up timed out; it lapses on its own"),
            }
        }
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
    check_exposure(&config)?;
    let store = Store::from_config(&config).await?;
    let tls = server_tls(&config.tls)?;
    let grpc_listener = TcpListener::bind(config.listen).await?.into_std()?;
    let http_listener = TcpListener::bind(config.http_listen).await?.into_std()?;
    // On PostgreSQL, a standby on these ports until this coordinator leads.
    let (epoch, deposed) = match &store {
        Store::Postgres(pg) => {
            leadership::check(&config)?;
            let scheme = if tls.is_some() { "https" } else { "http" };
            let advertise = match &config.cluster.advertise {
                Some(a) => a.clone(),
                None => format!("{scheme}://{}", grpc_listener.local_addr()?),
            };
            let holder = leadership::holder(&advertise);
            let lease = config.cluster.lease;
            let epoch = leadership::lead(
                pg,
                &holder,
                lease,
                grpc_listener.try_clone()?,
                http_listener.try_clone()?,
                tls.clone(),
            )
            .await?;
            info!(epoch, %advertise, "leading: this coordinator holds the store's lease");
            let deposed = leadership::keep(pg.clone(), holder.clone(), epoch, lease);
            (epoch, Some((deposed, (pg.clone(), holder, epoch))))
        }
        Store::Sqlite(_) => (store.bump_epoch().await?, None),
    };
    let (deposed, lease) = deposed.unzip();
    let jwt = match &config.auth.jwt {
        None => None,
        Some(_) if !config.auth.enabled => {
            return Err(Error::Fatal(
                "auth.jwt is set but auth.enabled is not: JWTs would not be asked for".into(),
            ));
        }
        Some(jwt) => Some(jwt::JwtVerifier::new(jwt).map_err(|e| Error::Fatal(e.to_string()))?),
    };
    let (guard, bootstrap) = grpc::Guard::start(
        &store,
        config.auth.enabled,
        config.tls.client_ca_file.is_some(),
        jwt,
    )
    .await?;
    if let Some(secret) = bootstrap {
        let path = config.data_dir.join(ADMIN_TOKEN_FILE);
        write_secret(&path, &secret)?;
        info!(path = %path.display(), "no cluster admin token yet: one was made, in this file (readable by its owner only)");
    }
    let grpc_listener = TcpListener::from_std(grpc_listener)?;
    let http_listener = TcpListener::from_std(http_listener)?;
    let grpc_addr = grpc_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;

    let readiness = Readiness::starting();
    let secrets = secrets::Vault::load(store.clone(), secrets::load_key(&config.secrets)?).await?;
    let tools = tools::ToolRegistry::load(store.clone()).await?;
    let args = RootArgs {
        config: config.clone(),
        store,
        epoch,
        readiness: readiness.clone(),
        secrets,
        tools,
    };
    let (root, root_done) = Actor::spawn(None, CoordinatorRoot, args)
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

    #[cfg(test)]
    let kept = handles.clone();
    let board = dashboard::Dashboard {
        guard: guard.clone(),
        goals: std::sync::Arc::new(grpc::GoalApi {
            quotas: std::sync::Arc::new(quotas::Quotas::new(handles.config.quotas.clone())),
            handles: handles.clone(),
        }),
        workflows: std::sync::Arc::new(grpc::WorkflowApi {
            handles: handles.clone(),
        }),
        registry: std::sync::Arc::new(grpc::RegistryApi {
            handles: handles.clone(),
        }),
    };
    let grpc = tokio::spawn(serve_grpc(
        handles,
        guard,
        tls,
        readiness.clone(),
        grpc_listener,
        async move {
            let _ = grpc_stop_rx.await;
        },
    ));
    let router = http::router(prometheus, readiness.clone()).merge(dashboard::routes(board));
    let http = tokio::spawn(async move {
        let result = axum::serve(
            http_listener,
            router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
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
        readiness,
        shutdown_grace: config.shutdown_grace,
        root_done,
        deposed,
        lease,
        #[cfg(test)]
        handles: kept,
    })
}

/// Secure by default: a coordinator that listens beyond loopback needs TLS and
/// authentication, unless told `insecure` (then it warns at every start).
fn check_exposure(config: &CoordinatorConfig) -> Result<()> {
    if config.listen.ip().is_loopback() {
        return Ok(());
    }
    let missing: Vec<&str> = [
        (!config.tls.enabled()).then_some("[tls]"),
        (!config.auth.enabled).then_some("[auth] enabled = true"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if config.insecure {
        warn!(listen = %config.listen, missing = %missing.join(" and "), "listening beyond loopback without TLS or tokens (--insecure): anyone who reaches this address can use the mesh");
        return Ok(());
    }
    Err(Error::Fatal(format!(
        "listen = {}: beyond loopback the coordinator needs {} (docs/security.md); give --insecure to run without on a trusted network",
        config.listen,
        missing.join(" and ")
    )))
}

/// The server's TLS from its files, read and checked now so that a bad file stops the start.
fn server_tls(
    config: &crate::config::TlsConfig,
) -> Result<Option<tonic::transport::ServerTlsConfig>> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    if !config.enabled() {
        if config.client_ca_file.is_some() {
            return Err(Error::Fatal(
                "tls.client_ca_file needs tls.cert_file and tls.key_file".into(),
            ));
        }
        return Ok(None);
    }
    let read = |field: &str, path: &Option<std::path::PathBuf>| -> Result<Vec<u8>> {
        let path = path
            .as_ref()
            .ok_or_else(|| Error::Fatal(format!("tls.{field} is missing")))?;
        std::fs::read(path)
            .map_err(|e| Error::Fatal(format!("tls.{field}: cannot read {}: {e}", path.display())))
    };
    let identity = Identity::from_pem(
        read("cert_file", &config.cert_file)?,
        read("key_file", &config.key_file)?,
    );
    let mut tls = ServerTlsConfig::new().identity(identity);
    if config.client_ca_file.is_some() {
        let ca = read("client_ca_file", &config.client_ca_file)?;
        tls = tls
            .client_ca_root(Certificate::from_pem(ca))
            .client_auth_optional(true);
    }
    Ok(Some(tls))
}

/// The file in the data directory that holds the first cluster admin token.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Writes a secret to a new file only its owner can read.
pub(crate) fn write_secret(path: &std::path::Path, secret: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(secret.as_bytes())?;
    file.write_all(b"\n")?;
    Ok(())
}

/// Runs a coordinator until `shutdown` resolves.
pub async fn run(
    config: CoordinatorConfig,
    prometheus: Option<PrometheusHandle>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    start(config, prometheus).await?.serve_until(shutdown).await
}

async fn serve_grpc(
    handles: Handles,
    guard: grpc::Guard,
    tls: Option<tonic::transport::ServerTlsConfig>,
    readiness: Readiness,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    use pb::auth_service_server::AuthServiceServer;
    use pb::goal_service_server::GoalServiceServer;
    use pb::memory_service_server::MemoryServiceServer;
    use pb::node_service_server::NodeServiceServer;
    use pb::registry_service_server::RegistryServiceServer;
    use pb::secret_service_server::SecretServiceServer;
    use pb::tool_service_server::ToolServiceServer;
    use pb::workflow_service_server::WorkflowServiceServer;

    let max = grpc::MAX_MESSAGE_BYTES;
    let auth = AuthServiceServer::new(grpc::AuthApi {
        guard: guard.clone(),
        store: handles.store.clone(),
    });
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let health = tokio::spawn(follow_readiness(
        health_reporter,
        readiness,
        handles.store.clone(),
        handles.config.store_probe_every,
    ));
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
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = match server.tls_config(tls) {
            Ok(server) => server,
            Err(e) => {
                warn!(error = %e, "TLS configuration refused; not serving gRPC");
                return;
            }
        };
    }
    let result = server
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .max_concurrent_streams(Some(1024))
        .layer(grpc::CallLimitsLayer {
            deadline: handles.config.request_deadline,
        })
        .layer(grpc::GuardLayer { guard })
        .add_service(health_service)
        .add_service(auth)
        .add_service(SecretServiceServer::new(grpc::SecretApi {
            vault: handles.deps.secrets.clone(),
        }))
        .add_service(MemoryServiceServer::new(grpc::MemoryApi {
            store: handles.deps.store.clone(),
        }))
        .add_service(ToolServiceServer::new(grpc::ToolApi {
            tools: handles.deps.tools.clone(),
        }))
        .add_optional_service(reflection)
        .add_optional_service(reflection_alpha)
        .add_service(
            NodeServiceServer::new(grpc::NodeApi::new(handles.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            GoalServiceServer::new(grpc::GoalApi {
                quotas: std::sync::Arc::new(quotas::Quotas::new(handles.config.quotas.clone())),
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
    health.abort();
    if let Err(e) = result {
        warn!(error = %e, "gRPC server failed");
    }
}

/// How often `grpc.health.v1` catches up with the coordinator's readiness.
const HEALTH_TICK: Duration = Duration::from_millis(200);

/// Keeps `grpc.health.v1` in step with [`Readiness`] (every service and the server as a
/// whole: SERVING or NOT_SERVING), and probes the store with a write every `probe_every`.
async fn follow_readiness(
    reporter: tonic_health::server::HealthReporter,
    readiness: Readiness,
    store: Store,
    probe_every: Duration,
) {
    use pb::goal_service_server::GoalServiceServer;
    use pb::node_service_server::NodeServiceServer;
    use pb::registry_service_server::RegistryServiceServer;
    use pb::workflow_service_server::WorkflowServiceServer;
    use tonic_health::ServingStatus;

    let services = [
        "",
        <GoalServiceServer<grpc::GoalApi> as tonic::server::NamedService>::NAME,
        <NodeServiceServer<grpc::NodeApi> as tonic::server::NamedService>::NAME,
        <RegistryServiceServer<grpc::RegistryApi> as tonic::server::NamedService>::NAME,
        <WorkflowServiceServer<grpc::WorkflowApi> as tonic::server::NamedService>::NAME,
    ];
    let mut published = None;
    let mut next_probe = tokio::time::Instant::now();
    loop {
        if tokio::time::Instant::now() >= next_probe {
            next_probe += probe_every;
            let ok = matches!(
                tokio::time::timeout(probe_every.max(HEALTH_TICK), store.probe()).await,
                Ok(Ok(()))
            );
            if !ok {
                warn!("the store cannot be written; health is NOT_SERVING");
            }
            readiness.store_writable(ok);
        }
        let status = match readiness.check() {
            Ok(()) => ServingStatus::Serving,
            Err(_) => ServingStatus::NotServing,
        };
        if published != Some(status) {
            for service in services {
                reporter.set_service_status(service, status).await;
            }
            published = Some(status);
        }
        tokio::time::sleep(HEALTH_TICK).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_health::pb::health_check_response::ServingStatus as Status;
    use tonic_health::pb::health_server::Health;

    async fn serving(service: &tonic_health::server::HealthService) -> Status {
        let req = tonic::Request::new(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        });
        let answer = service.check(req).await.unwrap().into_inner();
        Status::try_from(answer.status).unwrap()
    }

    /// gRPC health follows readiness: NOT_SERVING while starting, SERVING once started,
    /// NOT_SERVING when the store cannot be written (its writer is gone) and when draining.
    #[tokio::test]
    async fn grpc_health_follows_readiness_and_the_store_probe() {
        let dir = tempfile::tempdir().unwrap();
        let every = Duration::from_millis(20);
        let settle = || tokio::time::sleep(HEALTH_TICK * 3);

        let reporter = tonic_health::server::HealthReporter::new();
        let service = tonic_health::server::HealthService::from_health_reporter(reporter.clone());
        let readiness = Readiness::starting();
        let store = Store::open(&dir.path().join("ok")).unwrap();
        let task = tokio::spawn(follow_readiness(reporter, readiness.clone(), store, every));
        settle().await;
        assert_eq!(serving(&service).await, Status::NotServing);
        readiness.started();
        settle().await;
        assert_eq!(serving(&service).await, Status::Serving);
        readiness.draining();
        settle().await;
        assert_eq!(serving(&service).await, Status::NotServing);
        task.abort();

        let reporter = tonic_health::server::HealthReporter::new();
        let service = tonic_health::server::HealthService::from_health_reporter(reporter.clone());
        let readiness = Readiness::ready();
        let broken = Store::without_writer(&dir.path().join("broken")).unwrap();
        let task = tokio::spawn(follow_readiness(reporter, readiness.clone(), broken, every));
        settle().await;
        assert_eq!(readiness.check(), Err(readiness::NotReady::StoreUnwritable));
        assert_eq!(serving(&service).await, Status::NotServing);
        task.abort();
    }

    /// A coordinator in this process on free loopback ports, its store in `dir`; steps
    /// nobody can take wait for an hour.
    async fn coordinator(dir: &std::path::Path) -> Coordinator {
        let mut config = CoordinatorConfig {
            listen: ([127, 0, 0, 1], 0).into(),
            http_listen: ([127, 0, 0, 1], 0).into(),
            data_dir: dir.to_owned(),
            ..CoordinatorConfig::default()
        };
        config.dispatch.unschedulable_timeout = Duration::from_secs(3600);
        start(config, None).await.unwrap()
    }

    /// A goal of one step no agent can take: its run stays running (an hour's
    /// `unschedulable_timeout`).
    fn held_goal(objective: &str) -> mesh_proto::domain::GoalSpec {
        mesh_proto::domain::GoalSpec {
            objective: objective.to_owned(),
            inputs: serde_json::json!({}),
            steps: vec![mesh_proto::domain::StepSpec {
                id: "a".into(),
                uses: "nobody-has-this".into(),
                with: serde_json::json!({}),
                needs: vec![],
            }],
            workflow: None,
            workflow_ref: None,
            idempotency_key: None,
            budget: None,
            namespace: Default::default(),
        }
    }

    /// Waits (bounded) until the run's live actor is something other than `old`: another
    /// actor, or none. Returns it.
    async fn live_other_than(
        c: &Coordinator,
        id: &mesh_proto::domain::RunId,
        old: Option<ractor::ActorId>,
    ) -> Option<ActorRef<run::RunMsg>> {
        let directory = &c.handles.directory;
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let now = directory.get(id);
                if now.as_ref().map(|r| r.get_id()) != old {
                    return now;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the run's actor changed in time")
    }

    /// A run that panics is restarted by its swarm and resumes from its journal; past its
    /// restart budget (5 in 30 s) its run fails with the reason and leaves nothing behind:
    /// before, its dead actor stayed in the run directory, answered "being resumed; try
    /// again", was skipped by Resume and counted against `max_active_runs`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_crashing_run_is_restarted_and_past_its_budget_fails_and_leaves_nothing() {
        use mesh_proto::domain::RunState;
        let dir = tempfile::tempdir().unwrap();
        let c = coordinator(dir.path()).await;
        let goal = held_goal("crash");
        let h = &c.handles;
        let run = intake::submit(&h.deps, &h.swarms.get(), goal, intake::Admission::OPEN)
            .await
            .unwrap();
        let id = run.run_id;
        let mut actor = live_other_than(&c, &id, None).await.expect("live");
        // Within the budget: each crash is followed by a new actor, the run still running.
        for _ in 0..5 {
            let _ = actor.cast(run::RunMsg::Crash);
            actor = live_again(&c, &id, actor.get_id()).await;
            let view = run::stored_view(&h.deps, &id).await.unwrap();
            assert_eq!(view.state, RunState::Running);
        }
        // Past it: failed, with the reason, and gone from the directory.
        let _ = actor.cast(run::RunMsg::Crash);
        assert!(
            live_other_than(&c, &id, Some(actor.get_id()))
                .await
                .is_none()
        );
        assert!(!h.directory.contains(&id));
        assert_eq!(
            h.directory.len(),
            0,
            "nothing counts against max_active_runs"
        );
        let view = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let view = run::stored_view(&h.deps, &id).await.unwrap();
                if view.state.is_terminal() {
                    return view;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the run is failed in time");
        assert_eq!(view.state, RunState::Failed);
        let error = view.error.unwrap_or_default();
        assert!(error.contains("run crashed 5 times"), "{error}");
        c.stop().await;
    }

    /// Waits (bounded) until the run has a live actor other than `old`.
    async fn live_again(
        c: &Coordinator,
        id: &mesh_proto::domain::RunId,
        old: ractor::ActorId,
    ) -> ActorRef<run::RunMsg> {
        let directory = &c.handles.directory;
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(now) = directory.get(id).filter(|r| r.get_id() != old) {
                    return now;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the run is live again in time")
    }

    /// A failed swarm leaves its run without a supervisor: the run is stopped and resumed
    /// at once under a new swarm, which supervises it (a crash of the run is restarted).
    /// Before, the run was picked up only at the coordinator's next start.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_swarm_has_its_run_resumed_under_a_new_one() {
        use mesh_proto::domain::RunState;
        let dir = tempfile::tempdir().unwrap();
        let c = coordinator(dir.path()).await;
        let goal = held_goal("swarm");
        let h = &c.handles;
        let id = intake::submit(&h.deps, &h.swarms.get(), goal, intake::Admission::OPEN)
            .await
            .unwrap()
            .run_id;
        let first = live_other_than(&c, &id, None).await.expect("live");
        let swarms = h.swarms.get().get_children();
        assert_eq!(swarms.len(), 1);
        swarms[0].send_message(swarm::SwarmMsg::Crash).unwrap();
        let second = live_again(&c, &id, first.get_id()).await;
        assert_eq!(
            run::stored_view(&h.deps, &id).await.unwrap().state,
            RunState::Running
        );
        let _ = second.cast(run::RunMsg::Crash);
        live_again(&c, &id, second.get_id()).await;
        assert_eq!(h.directory.len(), 1);
        c.stop().await;
    }

    /// The root restarts a failed swarm supervisor, whose swarms and runs die with it: the
    /// new supervisor resumes every unfinished run (their dead actors are not taken for
    /// live), each under a new swarm.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_swarm_supervisor_is_restarted_and_resumes_every_run() {
        use mesh_proto::domain::RunState;
        let dir = tempfile::tempdir().unwrap();
        let c = coordinator(dir.path()).await;
        let h = &c.handles;
        let mut runs = Vec::new();
        for i in 0..3 {
            let goal = held_goal(&format!("held {i}"));
            let id = intake::submit(&h.deps, &h.swarms.get(), goal, intake::Admission::OPEN)
                .await
                .unwrap()
                .run_id;
            let actor = live_other_than(&c, &id, None).await.expect("live");
            runs.push((id, actor.get_id()));
        }
        let old = h.swarms.get();
        old.cast(swarms::SwarmsMsg::Crash).unwrap();
        for (id, first) in &runs {
            let again = live_again(&c, id, *first).await;
            // A new actor: starting or running, not one of those stopped with the old tree.
            assert_ne!(again.get_status(), ractor::ActorStatus::Stopped);
            assert_eq!(
                run::stored_view(&h.deps, id).await.unwrap().state,
                RunState::Running
            );
        }
        assert_ne!(h.swarms.get().get_id(), old.get_id(), "a new supervisor");
        assert_eq!(h.directory.len(), 3);
        c.stop().await;
    }

    /// The root restarts a failed registry (dispatcher, swarm supervisor alike) within its
    /// budget; past it the coordinator stops with an error, which makes `mesh coordinator`
    /// exit non-zero so that systemd or Kubernetes restarts it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn past_its_restart_budget_the_coordinator_stops_with_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let c = coordinator(dir.path()).await;
        let registry = c.handles.registry.clone();
        let crash = |registry: &slot::Slot<registry::RegistryMsg>| {
            let old = registry.get();
            let _ = old.cast(registry::RegistryMsg::Crash);
            old.get_id()
        };
        for _ in 0..root::RESTART_BUDGET {
            let old = crash(&registry);
            tokio::time::timeout(Duration::from_secs(5), async {
                while registry.get().get_id() == old {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .expect("a new registry within the budget");
        }
        assert!(
            !c.root_done.is_finished(),
            "still running within the budget"
        );
        crash(&registry);
        let ended = tokio::time::timeout(
            Duration::from_secs(20),
            c.serve_until(std::future::pending()),
        )
        .await
        .expect("stops in time");
        assert!(matches!(ended, Err(Error::Fatal(_))), "{ended:?}");
    }

    /// Answers once `open` is true, counting its calls.
    struct Gate {
        calls: std::sync::Arc<std::sync::atomic::AtomicU32>,
        open: tokio::sync::watch::Receiver<bool>,
    }

    impl mesh_agent_sdk::Agent for Gate {
        fn card(&self) -> mesh_agent_sdk::AgentCard {
            mesh_agent_sdk::AgentCard::new("gate").skill("gate")
        }

        async fn handle(
            &self,
            _ctx: mesh_agent_sdk::Context,
            _input: serde_json::Value,
        ) -> Result<serde_json::Value, mesh_agent_sdk::AgentError> {
            self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut open = self.open.clone();
            let _ = open.wait_for(|o| *o).await;
            Ok(serde_json::json!({ "through": true }))
        }
    }

    #[derive(Clone, Copy, Debug)]
    enum Crashes {
        Dispatcher,
        Registry,
    }

    /// A step in flight on a real node (an SDK node in this process, over gRPC) while the
    /// dispatcher or the registry fails: the root restarts it, the new one learns the nodes
    /// again, the step's attempt is dispatched again, and the run succeeds.
    async fn a_run_in_flight_finishes_across_a_restart_of(which: Crashes) {
        use mesh_proto::domain::RunState;
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let c = coordinator(dir.path()).await;
        let url = format!("http://{}", c.grpc_addr);
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let (open, open_rx) = tokio::sync::watch::channel(false);
        let node = mesh_agent_sdk::NodeRuntime::builder()
            .coordinator(url.clone())
            .name("gate-node")
            .agent(Gate {
                calls: calls.clone(),
                open: open_rx,
            })
            .build()
            .unwrap();
        let (stop_node, stopped) = oneshot::channel::<()>();
        let node = tokio::spawn(node.run_until(async move {
            let _ = stopped.await;
        }));
        let client = mesh_agent_sdk::GoalClient::connect(&url).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), async {
            while client.agents(Some("gate")).await.unwrap().is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the node registers");
        let mut goal = held_goal("through the gate");
        goal.steps[0].uses = "gate".into();
        let run = client.submit(goal).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), async {
            while calls.load(Ordering::SeqCst) == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the attempt reaches the agent");
        let changed = |old: ractor::ActorId| {
            let h = &c.handles;
            let now = match which {
                Crashes::Dispatcher => h.dispatcher.get().get_id(),
                Crashes::Registry => h.registry.get().get_id(),
            };
            now != old
        };
        let old = match which {
            Crashes::Dispatcher => {
                let old = c.handles.dispatcher.get();
                let _ = old.cast(dispatcher::DispatcherMsg::Crash);
                old.get_id()
            }
            Crashes::Registry => {
                let old = c.handles.registry.get();
                let _ = old.cast(registry::RegistryMsg::Crash);
                old.get_id()
            }
        };
        tokio::time::timeout(Duration::from_secs(10), async {
            while !changed(old) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("a new {which:?} in time"));
        open.send(true).unwrap();
        let done = tokio::time::timeout(Duration::from_secs(30), client.wait(&run.run_id))
            .await
            .unwrap_or_else(|_| panic!("the run finishes after the {which:?} restarted"))
            .unwrap();
        assert_eq!(done.state, RunState::Succeeded, "{done:?}");
        assert_eq!(
            done.steps[0].output,
            Some(serde_json::json!({ "through": true }))
        );
        let _ = stop_node.send(());
        node.await.unwrap().unwrap();
        c.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_in_flight_finishes_across_a_dispatcher_restart() {
        a_run_in_flight_finishes_across_a_restart_of(Crashes::Dispatcher).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_in_flight_finishes_across_a_registry_restart() {
        a_run_in_flight_finishes_across_a_restart_of(Crashes::Registry).await;
    }
}
