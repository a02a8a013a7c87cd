//! A soak run: a steady rate of goals against a coordinator and two nodes for a long time,
//! a fault now and then (a node killed and restarted, or paused past its lease), RSS and
//! open descriptors of every process printed at each sample. After warm-up the
//! coordinator's memory and descriptors must stay flat, and every goal must complete.
//!
//! Two minutes in every test run; `cargo test -p mesh-tests --test soak -- --ignored` runs
//! 30 minutes with a fault every minute (`MESH_SOAK_SECS` to change it).

use std::time::{Duration, Instant};

use mesh_agent_sdk::{GoalClient, RunId, RunState};
use mesh_tests::{Mesh, Timings, goal, rss_kib, wait_for};
use serde_json::json;

const AGENTS: &str = mesh_tests::ECHO_AND_SLEEP;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// (RSS KiB, descriptors) of the coordinator at one sample.
type Sample = (u64, usize);

async fn soak(total: Duration, fault_every: Duration, sample_every: Duration, warm_up: Duration) {
    let timings = Timings {
        lease_ms: 1000,
        heartbeat_ms: 200,
        sweep_ms: 100,
        ..Timings::default()
    };
    let mut mesh = Mesh::start(timings).await;
    mesh.start_node("n1", AGENTS).await;
    mesh.start_node("n2", AGENTS).await;
    let client = mesh.client().await;
    let coordinator = mesh.coordinator.as_ref().unwrap().pid();

    let started = Instant::now();
    let (mut next_fault, mut next_sample) = (fault_every, Duration::ZERO);
    let mut runs: Vec<RunId> = Vec::new();
    let mut samples: Vec<(Duration, Sample)> = Vec::new();
    let mut faults = 0u32;
    while started.elapsed() < total {
        let g = goal(
            "soak",
            &[
                ("a", "echo", json!({ "n": runs.len() }), &[]),
                ("b", "sleep", json!({ "ms": 50 }), &["a"]),
            ],
        );
        runs.push(client.submit(g).await.unwrap().run_id);
        if started.elapsed() >= next_sample {
            let line: Vec<String> = std::iter::once(("coordinator", coordinator))
                .chain(mesh.nodes.iter().map(|(n, p)| (n.as_str(), p.pid())))
                .map(|(name, pid)| format!("{name} {} KiB {} fds", rss_kib(pid), open_fds(pid)))
                .collect();
            eprintln!(
                "soak: {:>4} s, {} goals: {}",
                started.elapsed().as_secs(),
                runs.len(),
                line.join(", ")
            );
            samples.push((
                started.elapsed(),
                (rss_kib(coordinator), open_fds(coordinator)),
            ));
            next_sample += sample_every;
        }
        if started.elapsed() >= next_fault {
            faults += 1;
            if faults % 2 == 1 {
                mesh.node("n2").kill9();
                mesh.start_node("n2", AGENTS).await;
            } else {
                mesh.node("n1").signal("STOP").unwrap();
                tokio::time::sleep(Duration::from_millis(1500)).await;
                mesh.node("n1").signal("CONT").unwrap();
            }
            next_fault += fault_every;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    finish_all(&client, &runs).await;
    let end = (rss_kib(coordinator), open_fds(coordinator));
    let after_warm_up: Vec<Sample> = samples
        .iter()
        .filter(|(at, _)| *at >= warm_up)
        .map(|(_, s)| *s)
        .collect();
    let first = *after_warm_up.first().expect("samples after warm-up");
    eprintln!(
        "soak: {} goals, {faults} faults; coordinator after warm-up {} KiB / {} fds, at the end {} KiB / {} fds",
        runs.len(),
        first.0,
        first.1,
        end.0,
        end.1
    );
    assert!(
        end.0 <= first.0 + 24 * 1024,
        "coordinator memory grew from {} KiB to {} KiB",
        first.0,
        end.0
    );
    assert!(
        end.1 <= first.1 + 16,
        "coordinator descriptors grew from {} to {}",
        first.1,
        end.1
    );
}

/// Every run finishes, and succeeds.
async fn finish_all(client: &GoalClient, runs: &[RunId]) {
    wait_for(
        "every soak run finished",
        Duration::from_secs(60),
        || async {
            let page = client
                .list_runs(Some(RunState::Running), 1, None)
                .await
                .ok()?;
            page.runs.is_empty().then_some(())
        },
    )
    .await;
    for run in runs.iter().step_by(5) {
        let view = client.get_run(run).await.unwrap();
        assert_eq!(view.state, RunState::Succeeded, "{run}: {:?}", view.error);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_short() {
    soak(
        Duration::from_secs(120),
        Duration::from_secs(30),
        Duration::from_secs(15),
        Duration::from_secs(30),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "thirty minutes; run with -- --ignored"]
async fn soak_long() {
    let secs = mesh_tests::env_u64("MESH_SOAK_SECS", 1800);
    soak(
        Duration::from_secs(secs),
        Duration::from_secs(60),
        Duration::from_secs(60),
        Duration::from_secs(300.min(secs / 4)),
    )
    .await;
}
