//! Several coordinators on one PostgreSQL store, one leader (docs/operations.md).
//!
//! A coordinator on PostgreSQL starts as a **standby**: it listens on its ports, answers gRPC
//! health `NOT_SERVING` and `/healthz` 503, and every other call `UNAVAILABLE` naming the
//! leader's address, so that clients and nodes given several addresses move on to the
//! leader. Meanwhile it tries to take the lease row ([`PostgresStore::try_lead`]) a few times
//! per lease. Once it holds it, the lease's epoch is its coordinator epoch, the standby
//! answers stop, and it starts as a leader on the same ports (their sockets are kept).
//!
//! A leader renews its lease three times per lease; when a renewal finds another epoch in
//! the row, or no renewal succeeds for a whole lease, it is **deposed**: the coordinator
//! stops with an error, so that its supervisor restarts it as a standby. Its writes are
//! refused by the store from the moment its lease lapses (every group of writes checks it).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};
use tonic::codegen::http;
use tower::{Layer, Service};
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::store::PostgresStore;

/// Leadership among the coordinators that share a PostgreSQL store (`[cluster]`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// How long a leader's lease lasts without renewal: a standby takes over within it (plus
    /// up to a fifth of it) after the leader dies or stops renewing.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// Where clients reach this coordinator, told by standbys to those that call them
    /// (default: `http://` or `https://` and the gRPC listen address).
    pub advertise: Option<String>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(5),
            advertise: None,
        }
    }
}

/// The lease holder's name: its address, a space, and an id of this process's start.
pub fn holder(advertise: &str) -> String {
    format!("{advertise} {}", uuid::Uuid::now_v7().simple())
}

/// The address in a holder's name.
fn address(holder: &str) -> &str {
    holder.split(' ').next().unwrap_or(holder)
}

/// Serves as a standby on `grpc` and `http` until the lease is taken; returns its epoch.
pub async fn lead(
    store: &PostgresStore,
    holder: &str,
    lease: Duration,
    grpc: std::net::TcpListener,
    http: std::net::TcpListener,
    tls: Option<tonic::transport::ServerTlsConfig>,
) -> Result<u64> {
    if let Some(epoch) = store.try_lead(holder, lease).await? {
        return Ok(epoch);
    }
    let known = |leader: Option<crate::store::Leader>| match leader {
        Some(l) => format!("the leader is {} (epoch {})", address(&l.holder), l.epoch),
        None => "the leader is not known yet".to_owned(),
    };
    let (said, says) = watch::channel(known(store.leader().await.ok().flatten()));
    let (stop, stopped) = oneshot::channel::<()>();
    let servers = tokio::spawn(serve_standby(grpc, http, tls, says, stopped));
    info!(lease = ?lease, "standby: another coordinator leads; waiting for its lease");
    let every = (lease / 5).max(Duration::from_millis(100));
    let epoch = loop {
        tokio::time::sleep(every).await;
        match store.try_lead(holder, lease).await {
            Ok(Some(epoch)) => break epoch,
            Ok(None) => {}
            Err(e) => warn!(error = %e, "standby: cannot take the lease"),
        }
        match store.leader().await {
            Ok(leader) => drop(said.send(known(leader))),
            Err(e) => warn!(error = %e, "standby: cannot read the lease"),
        }
    };
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), servers).await;
    Ok(epoch)
}

/// Renews the lease of `epoch` until it is lost; the answer says why it was.
pub fn keep(
    store: PostgresStore,
    holder: String,
    epoch: u64,
    lease: Duration,
) -> oneshot::Receiver<String> {
    let (deposed, said) = oneshot::channel();
    tokio::spawn(async move {
        let every = lease / 3;
        let mut renewed = Instant::now();
        let why = loop {
            tokio::time::sleep(every).await;
            match tokio::time::timeout(every, store.renew(&holder, epoch, lease)).await {
                Ok(Ok(true)) => renewed = Instant::now(),
                Ok(Ok(false)) => {
                    break format!(
                        "the lease of epoch {epoch} is gone (another coordinator took it, or it lapsed)"
                    );
                }
                Ok(Err(e)) => warn!(error = %e, "cannot renew the lease"),
                Err(_) => warn!("renewing the lease took longer than {every:?}"),
            }
            if renewed.elapsed() >= lease {
                break format!("the lease of epoch {epoch} could not be renewed for {lease:?}");
            }
        };
        let _ = deposed.send(why);
    });
    said
}

/// The standby's answers on both ports, until `stop`.
async fn serve_standby(
    grpc: std::net::TcpListener,
    http: std::net::TcpListener,
    tls: Option<tonic::transport::ServerTlsConfig>,
    says: watch::Receiver<String>,
    stop: oneshot::Receiver<()>,
) {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let (stop_grpc, grpc_stopped) = oneshot::channel::<()>();
    let (stop_http, http_stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = stop.await;
        let _ = stop_grpc.send(());
        let _ = stop_http.send(());
    });
    let http_says = says.clone();
    let router = axum::Router::new()
        .route("/livez", axum::routing::get(crate::http::live))
        .route(
            "/healthz",
            axum::routing::get(move || {
                let now = http_says.borrow().clone();
                async move {
                    (
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        format!("standby: {now}\n"),
                    )
                }
            }),
        );
    let http = async move {
        let Ok(listener) = tokio::net::TcpListener::from_std(http) else {
            return;
        };
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = http_stopped.await;
            })
            .await;
    };
    let grpc = async move {
        let Ok(listener) = tokio::net::TcpListener::from_std(grpc) else {
            return;
        };
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            match server.tls_config(tls) {
                Ok(s) => server = s,
                Err(e) => {
                    warn!(error = %e, "standby: TLS refused");
                    return;
                }
            }
        }
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let _ = server
            .layer(StandbyLayer { says })
            .add_service(health)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = grpc_stopped.await;
            })
            .await;
    };
    tokio::join!(http, grpc);
}

/// Answers every call but health `UNAVAILABLE`, naming the leader.
#[derive(Clone)]
struct StandbyLayer {
    says: watch::Receiver<String>,
}

impl<S> Layer<S> for StandbyLayer {
    type Service = Standby<S>;
    fn layer(&self, inner: S) -> Standby<S> {
        Standby {
            inner,
            says: self.says.clone(),
        }
    }
}

#[derive(Clone)]
struct Standby<S> {
    inner: S,
    says: watch::Receiver<String>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> Service<http::Request<B>> for Standby<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>, Error = Infallible>,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = Infallible;
    type Future = BoxFuture<std::result::Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path().starts_with("/grpc.health.v1.Health/") {
            let answer = self.inner.call(request);
            return Box::pin(answer);
        }
        let status = tonic::Status::unavailable(format!(
            "this coordinator is a standby: {}",
            self.says.borrow().as_str()
        ));
        Box::pin(std::future::ready(Ok(status.into_http())))
    }
}

/// A coordinator that will not lead: its configuration asks for what leadership needs.
pub fn check(config: &crate::config::CoordinatorConfig) -> Result<()> {
    if config.cluster.lease < Duration::from_millis(300) {
        return Err(Error::Fatal(format!(
            "cluster.lease: {:?} is too short to renew; give at least 300ms",
            config.cluster.lease
        )));
    }
    Ok(())
}
