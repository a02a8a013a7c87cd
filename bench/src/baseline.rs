//! `baseline`: a bare tonic echo relay (client → relay → server, separate processes), so
//! that every figure can be read as a ratio to what the transport alone costs here.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Result;
use futures::StreamExt;
use mesh_proto::bench_pb::echo_client::EchoClient;
use mesh_proto::bench_pb::echo_server::{Echo, EchoServer};
use mesh_proto::bench_pb::{EchoReply, EchoRequest};
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Request, Response, Status};

use super::cluster::{Deadline, free_port, spawn};
use super::stats::{Figure, latency_figures};
use super::{Sizes, progress};

struct EchoService;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn call(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        Ok(Response::new(EchoReply {
            payload: request.into_inner().payload,
        }))
    }
}

struct RelayService {
    upstream: EchoClient<Channel>,
}

#[tonic::async_trait]
impl Echo for RelayService {
    async fn call(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        self.upstream.clone().call(request.into_inner()).await
    }
}

async fn channel(url: &str) -> Result<Channel> {
    Ok(Endpoint::from_shared(url.to_owned())?
        .tcp_nodelay(true)
        .connect()
        .await?)
}

/// `mesh bench-echo-server`: the baseline's server process, until `shutdown` resolves.
pub async fn serve_echo(
    listen: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    Server::builder()
        .tcp_nodelay(true)
        .add_service(EchoServer::new(EchoService))
        .serve_with_shutdown(listen, shutdown)
        .await?;
    Ok(())
}

/// `mesh bench-relay`: the baseline's relay process, until `shutdown` resolves.
pub async fn serve_relay(
    listen: SocketAddr,
    upstream: String,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    // Lazy: the server may still be starting; the first call connects.
    let upstream = EchoClient::new(
        Endpoint::from_shared(upstream)?
            .tcp_nodelay(true)
            .connect_lazy(),
    );
    Server::builder()
        .tcp_nodelay(true)
        .add_service(EchoServer::new(RelayService { upstream }))
        .serve_with_shutdown(listen, shutdown)
        .await?;
    Ok(())
}

async fn call(client: &EchoClient<Channel>, payload: &[u8]) -> Result<Duration> {
    let started = Instant::now();
    client
        .clone()
        .call(EchoRequest {
            payload: payload.to_vec(),
        })
        .await?;
    Ok(started.elapsed())
}

pub async fn run(sizes: &Sizes) -> Result<Vec<Figure>> {
    let dir = tempfile::tempdir()?;
    let (server_port, relay_port) = (free_port()?, free_port()?);
    let server_addr = format!("127.0.0.1:{server_port}");
    let relay_addr = format!("127.0.0.1:{relay_port}");
    let _server = spawn(
        dir.path(),
        "echo-server",
        &["bench-echo-server", "--listen", &server_addr],
    )?;
    let _relay = spawn(
        dir.path(),
        "relay",
        &[
            "bench-relay",
            "--listen",
            &relay_addr,
            "--upstream",
            &format!("http://{server_addr}"),
        ],
    )?;
    let url = format!("http://{relay_addr}");
    let payload = vec![b'x'; 100];
    let deadline = Deadline::new("the relay", Duration::from_secs(20));
    let client = loop {
        if let Ok(ch) = channel(&url).await {
            let c = EchoClient::new(ch);
            if call(&c, &payload).await.is_ok() {
                break c;
            }
        }
        deadline.tick().await?;
    };

    for _ in 0..sizes.warmup {
        call(&client, &payload).await?;
    }
    let bar = progress("baseline sequential", sizes.sequential as u64);
    let mut samples = Vec::with_capacity(sizes.sequential);
    let started = Instant::now();
    for _ in 0..sizes.sequential {
        samples.push(call(&client, &payload).await?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let mut figures = latency_figures(samples, started.elapsed(), "sequential rate");
    for f in &mut figures {
        f.name = match f.name {
            "p50" => "sequential p50",
            "p99" => "sequential p99",
            other => other,
        };
    }

    let bar = progress("baseline 64 in flight", sizes.parallel as u64);
    let started = Instant::now();
    let samples: Vec<Duration> = futures::stream::iter(0..sizes.parallel)
        .map(|_| {
            let (client, payload, bar) = (client.clone(), payload.clone(), bar.clone());
            async move {
                let d = call(&client, &payload).await;
                bar.inc(1);
                d
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    bar.finish_and_clear();
    for f in latency_figures(samples, started.elapsed(), "64 in flight rate") {
        figures.push(Figure {
            name: match f.name {
                "p50" => "64 in flight p50",
                "p99" => "64 in flight p99",
                other => other,
            },
            ..f
        });
    }
    Ok(figures)
}
