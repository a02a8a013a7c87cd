//! A network partition between real processes: a node in a network namespace of its own,
//! joined to the coordinator by a veth pair, is cut off for three leases (its end of the
//! link set down: packets vanish, no connection is reset), then healed. Its work must be
//! re-dispatched, its late results rejected, and it must come back as a new instance, with
//! exactly one accepted result per step.
//!
//! Needs root (to create the namespace); elsewhere it says so and passes without running.

use std::time::{Duration, Instant};

use mesh_agent_sdk::{Health, RunState};
use mesh_tests::netns::{HostAddress, Netns};
use mesh_tests::{Mesh, Timings, goal, wait_assigned, wait_for};
use serde_json::json;

const SLEEPER: &str = "[[agents]]\nkind = \"sleep\"\nmax_concurrency = 8\n";

#[tokio::test]
async fn a_partitioned_node_loses_its_work_has_its_late_results_rejected_and_returns_as_a_new_instance()
 {
    let (host, netns) = match HostAddress::create().and_then(|h| Ok((h, Netns::create(0)?))) {
        Ok(both) => both,
        Err(why) => {
            eprintln!(
                "SKIPPED: a network namespace test needs root and iproute2 ({why}); \
                 run it as root to partition a node for real"
            );
            return;
        }
    };
    let timings = Timings {
        lease_ms: 1000,
        heartbeat_ms: 200,
        sweep_ms: 100,
        ..Timings::default()
    };
    let lease = Duration::from_millis(timings.lease_ms);
    let mut mesh = Mesh::start_on(&host.ip, timings).await;
    let far_instance = mesh
        .start_node_in("far", SLEEPER, None, Some(&netns.name))
        .await;
    let client = mesh.client().await;

    // Work that only the far node can take, long enough to be in flight at the cut.
    let mut runs = Vec::new();
    for i in 0..4 {
        let g = goal(
            &format!("partition {i}"),
            &[("nap", "sleep", json!({ "ms": 1500 }), &[])],
        );
        let run = client.submit(g).await.unwrap().run_id;
        wait_assigned(&client, &run).await;
        runs.push(run);
    }
    mesh.start_node("near", SLEEPER).await;

    let cut_at = Instant::now();
    netns.cut();
    wait_for("the far node declared dead", 3 * lease, || async {
        let v = mesh.node_view("far").await?;
        (v.health == Health::Dead).then_some(())
    })
    .await;
    let detected = cut_at.elapsed();
    // Every run finishes on the near node while the far one is still cut off.
    for run in &runs {
        let view = tokio::time::timeout(Duration::from_secs(10), client.wait(run))
            .await
            .expect("finishes elsewhere")
            .unwrap();
        assert_eq!(view.state, RunState::Succeeded, "{:?}", view.error);
        assert_eq!(view.steps[0].agent.as_ref().unwrap().node.as_str(), "near");
    }
    let elapsed = cut_at.elapsed();
    if elapsed < 3 * lease {
        tokio::time::sleep(3 * lease - elapsed).await;
    }
    netns.heal();

    // Back as a new instance; its late results (the sleeps it finished while cut off) are
    // answered stale.
    let back = wait_for(
        "the far node registered again",
        Duration::from_secs(20),
        || async {
            let v = mesh.node_view("far").await?;
            (v.health == Health::Healthy && v.instance != far_instance).then_some(v.instance)
        },
    )
    .await;
    assert_ne!(back, far_instance);
    let stale = wait_for("late results rejected", Duration::from_secs(10), || async {
        let n = mesh.metric("mesh_dispatch_stale_results_total");
        (n >= 1.0).then_some(n)
    })
    .await;
    let accepted = mesh.accepted_results();
    for run in &runs {
        assert_eq!(
            accepted.get(&(run.0.clone(), "nap".to_owned())),
            Some(&1),
            "exactly one accepted result for {run}"
        );
    }
    let far_ran = mesh.executions("far").len();
    eprintln!(
        "partition: far node dead {} ms after the cut; {far_ran} of 4 sleeps ran on it; \
         {stale} late results rejected after healing; back as instance {back}",
        detected.as_millis()
    );
    assert_eq!(
        far_ran, 4,
        "the far node ran its attempts (and its results came late)"
    );
}
