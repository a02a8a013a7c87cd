//! Faults between real processes: nodes killed, paused, panicking and drained; the
//! coordinator killed and restarted on its data directory.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mesh_agent_sdk::{Health, RunId, RunState, StepState};
use mesh_tests::{Mesh, Timings, free_port, goal, metric_at, wait_assigned, wait_for};
use serde_json::json;

fn sleepers(max: u32) -> String {
    format!(
        "[[agents]]\nkind = \"sleep\"\nmax_concurrency = {max}\n[[agents]]\nkind = \"echo\"\nmax_concurrency = {max}\n"
    )
}

/// Waits for every run to finish; returns their final views.
async fn wait_all(mesh: &Mesh, runs: &[RunId], timeout: Duration) -> Vec<mesh_agent_sdk::RunView> {
    let client = mesh.client().await;
    let mut views = Vec::new();
    for run in runs {
        let view = tokio::time::timeout(timeout, client.wait(run))
            .await
            .unwrap_or_else(|_| panic!("run {run} did not finish within {timeout:?}"))
            .unwrap();
        views.push(view);
    }
    views
}

fn assert_one_accepted_result_per_step(mesh: &Mesh) {
    for ((run, step), n) in mesh.accepted_results() {
        assert_eq!(n, 1, "step {run}/{step} has {n} accepted results");
    }
}

#[tokio::test]
async fn killing_a_node_moves_its_in_flight_work_to_the_other() {
    let started = Instant::now();
    let timings = Timings::default();
    let mut mesh = Mesh::start(timings.clone()).await;
    mesh.start_node("a", &sleepers(20)).await;
    mesh.start_node("b", &sleepers(20)).await;
    let client = mesh.client().await;
    let mut runs = Vec::new();
    for i in 0..20 {
        let g = goal(
            &format!("failover {i}"),
            &[
                ("nap", "sleep", json!({ "ms": 1500 }), &[]),
                ("done", "echo", json!({}), &["nap"]),
            ],
        );
        runs.push(client.submit(g).await.unwrap().run_id);
    }
    // Every run's sleep is on a node, some of them on `a`.
    let on_a = wait_for(
        "all 20 sleeps to be dispatched",
        Duration::from_secs(10),
        || async {
            let mut on_a = 0;
            for run in &runs {
                let view = client.get_run(run).await.ok()?;
                let agent = view.steps[0].agent.as_ref()?;
                on_a += usize::from(agent.node.as_str() == "a");
            }
            Some(on_a)
        },
    )
    .await;
    assert!(
        on_a > 0,
        "least-loaded dispatch spreads the sleeps over both nodes"
    );

    let killed = Instant::now();
    mesh.node("a").kill9();
    wait_for("node a to be dead", Duration::from_secs(10), || async {
        mesh.node_view("a")
            .await
            .filter(|n| n.health == Health::Dead)
            .map(|_| ())
    })
    .await;
    let to_dead = killed.elapsed();
    let bound = Duration::from_millis(timings.lease_ms + timings.sweep_ms);
    assert!(
        to_dead <= bound,
        "node marked dead after {to_dead:?}, bound is lease + sweep = {bound:?}"
    );

    let views = wait_all(&mesh, &runs, Duration::from_secs(30)).await;
    for view in &views {
        assert_eq!(view.state, RunState::Succeeded, "{view:?}");
        assert_eq!(
            view.steps[0].agent.as_ref().unwrap().node.as_str(),
            "b",
            "the accepted attempt ran on b"
        );
    }
    let moved = views.iter().filter(|v| v.steps[0].attempt > 1).count();
    assert_eq!(
        moved, on_a,
        "exactly the sleeps that were on `a` got a new attempt"
    );
    assert_one_accepted_result_per_step(&mesh);
    assert!(mesh.metric("mesh_dispatch_redispatched_attempts_total") >= on_a as f64);
    eprintln!(
        "failover: {on_a} of 20 sleeps were on the killed node; kill -9 -> dead {} ms; test wall time {} ms",
        to_dead.as_millis(),
        started.elapsed().as_millis()
    );
}

#[tokio::test]
async fn killing_the_coordinator_mid_run_resumes_every_run_without_rerunning_completed_steps() {
    let mut mesh = Mesh::start(Timings::default()).await;
    mesh.start_node("n1", &sleepers(16)).await;
    let client = mesh.client().await;
    let mut runs = Vec::new();
    for i in 0..8 {
        let g = goal(
            &format!("chain {i}"),
            &[
                ("s1", "sleep", json!({ "ms": 300 }), &[]),
                ("s2", "sleep", json!({ "ms": 300 }), &["s1"]),
                ("s3", "sleep", json!({ "ms": 300 }), &["s2"]),
                ("s4", "echo", json!({}), &["s3"]),
            ],
        );
        runs.push(client.submit(g).await.unwrap().run_id);
    }
    // Wait until every run has completed its first step and not yet its last.
    let completed: HashMap<(String, String), ()> =
        wait_for("runs to be mid-way", Duration::from_secs(10), || async {
            let mut done = HashMap::new();
            for run in &runs {
                let view = client.get_run(run).await.ok()?;
                if view.steps[0].state != StepState::Succeeded {
                    return None;
                }
                for s in view
                    .steps
                    .iter()
                    .filter(|s| s.state == StepState::Succeeded)
                {
                    done.insert((run.0.clone(), s.id.0.clone()), ());
                }
            }
            Some(done)
        })
        .await;

    mesh.coordinator.as_mut().unwrap().kill9();
    tokio::time::sleep(Duration::from_millis(300)).await;
    mesh.start_coordinator().await;

    let views = wait_all(&mesh, &runs, Duration::from_secs(30)).await;
    assert!(
        views.iter().all(|v| v.state == RunState::Succeeded),
        "{views:?}"
    );
    let executions = mesh.executions("n1");
    for key in completed.keys() {
        assert_eq!(
            executions.get(key),
            Some(&1),
            "completed step {key:?} executed again"
        );
    }
    for view in &views {
        for step in &view.steps {
            let key = (view.run_id.0.clone(), step.id.0.clone());
            assert!(
                executions.get(&key).copied().unwrap_or(0) >= 1,
                "step {key:?} never executed"
            );
        }
    }
    assert_one_accepted_result_per_step(&mesh);
    eprintln!(
        "coordinator restart: {} steps were complete before kill -9; none ran again",
        completed.len()
    );
}

#[tokio::test]
async fn a_paused_node_loses_its_lease_and_its_late_result_is_rejected() {
    let timings = Timings::default();
    let mut mesh = Mesh::start(timings.clone()).await;
    let first_instance = mesh.start_node("n1", &sleepers(4)).await;
    let client = mesh.client().await;
    let run = client
        .submit(goal(
            "paused",
            &[("nap", "sleep", json!({ "ms": 2500 }), &[])],
        ))
        .await
        .unwrap()
        .run_id;
    wait_assigned(&client, &run).await;

    let stopped = Instant::now();
    mesh.node("n1").signal("STOP").unwrap();
    wait_for("n1 to be dead", Duration::from_secs(10), || async {
        mesh.node_view("n1")
            .await
            .filter(|n| n.health == Health::Dead)
            .map(|_| ())
    })
    .await;
    let to_dead = stopped.elapsed();
    // The last heartbeat came at most one interval before the pause.
    let earliest = Duration::from_millis(timings.lease_ms - timings.heartbeat_ms);
    assert!(
        to_dead >= earliest,
        "dead only once the lease ran out: {to_dead:?}"
    );
    assert!(
        to_dead <= Duration::from_millis(timings.lease_ms + timings.sweep_ms + 200),
        "dead after {to_dead:?}"
    );
    mesh.node("n1").signal("CONT").unwrap();

    // The node registers again as a new instance and the step runs there as attempt 2.
    let view = tokio::time::timeout(Duration::from_secs(20), client.wait(&run))
        .await
        .expect("run finished")
        .unwrap();
    assert_eq!(view.state, RunState::Succeeded);
    assert!(
        view.steps[0].attempt >= 2,
        "re-dispatched after the lease expired"
    );
    let node = mesh.wait_healthy("n1").await;
    assert!(
        node.instance > first_instance,
        "a dead instance comes back only as a new one"
    );
    // Attempt 1 finished on the node after it resumed: its result was rejected as stale.
    wait_for(
        "the stale result to be rejected",
        Duration::from_secs(10),
        || async { (mesh.metric("mesh_dispatch_stale_results_total") >= 1.0).then_some(()) },
    )
    .await;
    assert!(
        mesh.node("n1")
            .log_text()
            .contains("result rejected by the coordinator")
    );
    assert_one_accepted_result_per_step(&mesh);
    eprintln!(
        "SIGSTOP -> dead {} ms (lease {} ms, sweep {} ms)",
        to_dead.as_millis(),
        timings.lease_ms,
        timings.sweep_ms
    );
}

#[tokio::test]
async fn a_panicking_agent_is_restarted_and_its_attempt_retried() {
    let mut mesh = Mesh::start(Timings::default()).await;
    let http = free_port();
    let agents = "[[agents]]\nkind = \"flaky\"\nname = \"crashy\"\nmode = \"panic\"\nfail_first = 1\nmax_concurrency = 4\n";
    mesh.start_node_with("n1", agents, Some(http)).await;
    let client = mesh.client().await;
    let run = client
        .submit(goal("panic", &[("p", "flaky", json!({}), &[])]))
        .await
        .unwrap()
        .run_id;
    let view = tokio::time::timeout(Duration::from_secs(20), client.wait(&run))
        .await
        .expect("run finished")
        .unwrap();
    assert_eq!(view.state, RunState::Succeeded, "{view:?}");
    assert_eq!(view.steps[0].attempt, 2);
    assert_eq!(view.output.unwrap()["p"]["attempt"], 2);
    assert!(
        mesh.node("n1").is_running(),
        "the node process survived the panic"
    );
    assert_eq!(metric_at(http, "mesh_node_agent_restarts_total"), 1.0);
    assert_eq!(mesh.node_view("n1").await.unwrap().health, Health::Healthy);
    // And the restarted agent keeps working.
    let again = client
        .submit(goal("after", &[("p", "flaky", json!({}), &[])]))
        .await
        .unwrap()
        .run_id;
    let view = tokio::time::timeout(Duration::from_secs(20), client.wait(&again))
        .await
        .expect("run finished")
        .unwrap();
    assert_eq!(view.state, RunState::Succeeded);
}

#[tokio::test]
async fn sigterm_drains_a_node_its_work_finishes_and_it_leaves_cleanly() {
    let mut mesh = Mesh::start(Timings::default()).await;
    mesh.start_node("n1", &sleepers(4)).await;
    let client = mesh.client().await;
    let run = client
        .submit(goal(
            "drain",
            &[("nap", "sleep", json!({ "ms": 800 }), &[])],
        ))
        .await
        .unwrap()
        .run_id;
    wait_assigned(&client, &run).await;
    mesh.node("n1").signal("TERM").unwrap();
    let status = mesh
        .node("n1")
        .wait_exit(Duration::from_secs(20))
        .await
        .unwrap();
    assert!(status.success(), "node exited with {status}");
    let view = client.get_run(&run).await.unwrap();
    assert_eq!(view.state, RunState::Succeeded);
    assert_eq!(
        view.steps[0].attempt, 1,
        "the in-flight attempt finished; nothing was re-dispatched"
    );
    wait_for("n1 to be forgotten", Duration::from_secs(5), || async {
        let nodes = client.nodes().await.ok()?;
        nodes
            .iter()
            .all(|n| n.node_id.as_str() != "n1")
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_operator_drain_lets_in_flight_work_finish_and_sends_new_work_elsewhere() {
    let mut mesh = Mesh::start(Timings::default()).await;
    mesh.start_node("a", &sleepers(4)).await;
    mesh.start_node("b", &sleepers(4)).await;
    let client = mesh.client().await;
    let first = client
        .submit(goal(
            "drained",
            &[("nap", "sleep", json!({ "ms": 800 }), &[])],
        ))
        .await
        .unwrap()
        .run_id;
    wait_assigned(&client, &first).await;
    let holder = client.get_run(&first).await.unwrap().steps[0]
        .agent
        .clone()
        .unwrap()
        .node;
    let other = if holder.as_str() == "a" { "b" } else { "a" };

    let out = std::process::Command::new(mesh_tests::mesh_bin())
        .args([
            "--coordinator",
            &mesh.url(),
            "node",
            "drain",
            holder.as_str(),
        ])
        .output()
        .expect("mesh node drain");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("draining"));

    // New work goes to the other node while the drained one finishes.
    let second = client
        .submit(goal(
            "after drain",
            &[("nap", "sleep", json!({ "ms": 10 }), &[])],
        ))
        .await
        .unwrap()
        .run_id;
    let view = tokio::time::timeout(Duration::from_secs(20), client.wait(&second))
        .await
        .expect("run finished")
        .unwrap();
    assert_eq!(view.steps[0].agent.as_ref().unwrap().node.as_str(), other);

    let status = mesh
        .node(holder.as_str())
        .wait_exit(Duration::from_secs(20))
        .await
        .unwrap();
    assert!(status.success(), "drained node exited with {status}");
    let view = client.get_run(&first).await.unwrap();
    assert_eq!(view.state, RunState::Succeeded);
    assert_eq!(
        view.steps[0].attempt, 1,
        "the in-flight attempt finished where it was"
    );
    wait_for(
        "the drained node to be forgotten",
        Duration::from_secs(5),
        || async {
            let nodes = client.nodes().await.ok()?;
            nodes.iter().all(|n| n.node_id != holder).then_some(())
        },
    )
    .await;

    // Draining a node that is not live is NOT_FOUND.
    let err = client.drain_node("ghost", "").await.unwrap_err();
    assert_eq!(err.code(), Some(mesh_agent_sdk::RpcCode::NotFound), "{err}");
}

#[tokio::test]
async fn an_agent_that_keeps_failing_is_cut_out_by_its_circuit_breaker() {
    let timings = Timings {
        circuit_failures: 2,
        circuit_cool_down_ms: 60_000,
        ..Timings::default()
    };
    let mut mesh = Mesh::start(timings).await;
    let agents = "[[agents]]\nkind = \"flaky\"\nname = \"broken\"\nskills = [\"work\"]\nfail_first = 1000\n\
                  [[agents]]\nkind = \"echo\"\nname = \"fine\"\nskills = [\"work\"]\n";
    mesh.start_node("n1", agents).await;
    let client = mesh.client().await;
    let submit_batch = |label: &'static str| {
        let client = client.clone();
        async move {
            let mut runs = Vec::new();
            for i in 0..10 {
                let g = goal(&format!("{label} {i}"), &[("w", "work", json!({}), &[])]);
                runs.push(client.submit(g).await.unwrap().run_id);
            }
            for run in &runs {
                let view = tokio::time::timeout(Duration::from_secs(20), client.wait(run))
                    .await
                    .expect("run finished")
                    .unwrap();
                assert_eq!(view.state, RunState::Succeeded, "{view:?}");
                assert_eq!(view.steps[0].agent.as_ref().unwrap().agent, "fine");
            }
        }
    };
    submit_batch("first").await;
    let broken = |mesh: &Mesh| -> u32 {
        let text = std::fs::read_to_string(mesh.exec_log("n1")).unwrap_or_default();
        text.lines()
            .filter(|l| l.contains("\"agent\":\"broken\""))
            .count() as u32
    };
    let failed_before = broken(&mesh);
    assert!(
        failed_before >= 2,
        "the broken agent failed at least twice before its circuit opened"
    );
    let views = client.agents(Some("work")).await.unwrap();
    let circuit = |name: &str| {
        views
            .iter()
            .find(|a| a.name == name)
            .unwrap()
            .circuit
            .clone()
    };
    assert_eq!(circuit("broken"), "open");
    assert_eq!(circuit("fine"), "closed");
    assert_eq!(mesh.metric("mesh_dispatch_open_circuits"), 1.0);
    // While open, the broken agent gets nothing.
    submit_batch("second").await;
    assert_eq!(
        broken(&mesh),
        failed_before,
        "no attempt reached the open circuit"
    );
}
