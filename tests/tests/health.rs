//! Health that means something: `/healthz` (and `grpc.health.v1`) answer NOT_SERVING while
//! the coordinator is starting (resuming the runs in its store) and while it drains; the
//! store probe's side is proved in `coordinator/src/lib.rs`.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use futures::StreamExt;
use mesh_tests::{Mesh, Timings, goal};
use serde_json::json;

/// `GET /healthz`: the status code and body, or None when nothing answers.
fn healthz(port: u16) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    Some((code, body))
}

/// Before: a restarted coordinator answered `ok` while it was still resuming thousands of
/// runs. After: 503 `starting` until they are resumed, then 200.
#[tokio::test]
async fn health_is_not_serving_while_the_coordinator_resumes_its_runs() {
    let sleepers = "[[agents]]\nkind = \"sleep\"\nmax_concurrency = 4000\n";
    let mut mesh = Mesh::start(Timings::default()).await;
    mesh.start_node("n1", sleepers).await;
    let client = mesh.client().await;
    futures::stream::iter(0..2000)
        .map(|_| {
            let client = client.clone();
            async move {
                let g = goal("held", &[("nap", "sleep", json!({ "ms": 600_000 }), &[])]);
                client.submit(g).await.unwrap();
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<()>>()
        .await;
    mesh.coordinator.as_mut().unwrap().kill9();
    let port = mesh.http_port;
    let seen = std::thread::spawn(move || {
        let until = Instant::now() + Duration::from_secs(60);
        let mut seen: Vec<(u16, String)> = Vec::new();
        while Instant::now() < until {
            if let Some(answer) = healthz(port) {
                let ready = answer.0 == 200;
                if seen.last() != Some(&answer) {
                    seen.push(answer);
                }
                if ready {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        seen
    });
    mesh.start_coordinator().await;
    let seen = seen.join().unwrap();
    eprintln!("health while restarting: {seen:?}");
    assert_eq!(seen.last().map(|s| s.0), Some(200), "ready in the end");
    assert!(
        seen.iter()
            .any(|(code, body)| *code == 503 && body.contains("starting")),
        "not ready while resuming: {seen:?}"
    );
}

/// Before: health said SERVING until the process was gone. After: on SIGTERM it says
/// NOT_SERVING (503 `draining`, gRPC NOT_SERVING) for `shutdown_grace`, then exits cleanly.
#[tokio::test]
async fn health_is_not_serving_while_the_coordinator_drains() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let timings = Timings {
        coordinator_extra: "shutdown_grace = \"2s\"\n".into(),
        ..Timings::default()
    };
    let mut mesh = Mesh::start(timings).await;
    let channel = tonic::transport::Channel::from_shared(mesh.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic_health::pb::health_client::HealthClient::new(channel);
    let check = tonic_health::pb::HealthCheckRequest {
        service: "mesh.v1.GoalService".into(),
    };
    let status = grpc.check(check.clone()).await.unwrap().into_inner().status;
    assert_eq!(status, ServingStatus::Serving as i32);
    assert_eq!(healthz(mesh.http_port).map(|a| a.0), Some(200));

    mesh.coordinator.as_ref().unwrap().signal("TERM").unwrap();
    let port = mesh.http_port;
    let answer = mesh_tests::wait_for(
        "/healthz to say draining",
        Duration::from_secs(2),
        || async move { healthz(port).filter(|(code, _)| *code == 503) },
    )
    .await;
    assert!(answer.1.contains("draining"), "{answer:?}");
    let status = mesh_tests::wait_for(
        "gRPC health to say NOT_SERVING",
        Duration::from_secs(2),
        || {
            let (mut grpc, check) = (grpc.clone(), check.clone());
            async move {
                let status = grpc.check(check).await.ok()?.into_inner().status;
                (status == ServingStatus::NotServing as i32).then_some(status)
            }
        },
    )
    .await;
    assert_eq!(status, ServingStatus::NotServing as i32);
    let exit = mesh
        .coordinator
        .as_mut()
        .unwrap()
        .wait_exit(Duration::from_secs(20))
        .await
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}
