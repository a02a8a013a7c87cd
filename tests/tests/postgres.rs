//! The coordinator on the PostgreSQL store, through real processes: a server of the test's
//! own (`initdb`, `pg_ctl` in a temporary directory), a coordinator told `store =
//! "postgres://…"`, a node, and goals whose runs survive the coordinator's kill -9.

use std::collections::HashMap;
use std::time::Duration;

use mesh_agent_sdk::{RunState, StepState};
use mesh_harness::postgres::{Durability, Server};
use mesh_tests::{Mesh, Timings, goal, wait_for};
use serde_json::json;

/// Rows of a query on the store's database.
async fn query(url: &str, sql: &str) -> Vec<tokio_postgres::Row> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to the test's PostgreSQL");
    tokio::spawn(conn);
    client.query(sql, &[]).await.expect("a query of the store")
}

#[tokio::test]
async fn runs_on_postgresql_survive_a_coordinator_kill_and_each_step_is_accepted_once() {
    let pg = Server::start(Durability::Full).expect("a PostgreSQL server");
    pg.create_db("mesh").unwrap();
    let url = pg.url("mesh");
    let timings = Timings {
        coordinator_extra: format!("store = \"{url}\""),
        ..Timings::default()
    };
    let mut mesh = Mesh::start(timings).await;
    mesh.start_node(
        "n1",
        "[[agents]]\nkind = \"sleep\"\nmax_concurrency = 16\n[[agents]]\nkind = \"echo\"\nmax_concurrency = 16\n",
    )
    .await;
    let client = mesh.client().await;
    let mut runs = Vec::new();
    for i in 0..6 {
        let g = goal(
            &format!("chain {i}"),
            &[
                ("s1", "sleep", json!({ "ms": 300 }), &[]),
                ("s2", "sleep", json!({ "ms": 300 }), &["s1"]),
                ("s3", "echo", json!({ "i": i }), &["s2"]),
            ],
        );
        runs.push(client.submit(g).await.unwrap().run_id);
    }
    wait_for(
        "every run to finish its first step",
        Duration::from_secs(10),
        || async {
            for run in &runs {
                let view = client.get_run(run).await.ok()?;
                (view.steps[0].state == StepState::Succeeded).then_some(())?;
            }
            Some(())
        },
    )
    .await;

    mesh.coordinator.as_mut().unwrap().kill9();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let restarted = std::time::Instant::now();
    mesh.start_coordinator().await;
    // A standby until the lease of the killed one lapses (5 s by default).
    let took = serving_after(&mesh.own_url(), restarted).await;
    assert!(took < Duration::from_secs(7), "took {took:?}");

    let client = mesh.client().await;
    for run in &runs {
        let view = tokio::time::timeout(Duration::from_secs(30), client.wait(run))
            .await
            .expect("the run finishes after the restart")
            .unwrap();
        assert_eq!(view.state, RunState::Succeeded, "{view:?}");
        let i = runs.iter().position(|r| r == run).unwrap();
        assert_eq!(
            view.steps[2].output.as_ref().unwrap()["with"],
            json!({ "i": i })
        );
    }
    // The state is in PostgreSQL, not in a file beside the coordinator.
    assert!(!mesh.db_path().exists(), "an SQLite store was made");
    assert_accepted_once(&url, runs.len() * 3).await;
    let epoch = query(&url, "SELECT value FROM meta WHERE key = 'epoch'").await;
    assert_eq!(
        epoch[0].get::<_, String>(0),
        "2",
        "one epoch per coordinator start"
    );
}

#[tokio::test]
async fn a_coordinator_refuses_a_store_it_cannot_reach_or_read_and_names_it_without_the_password() {
    let pg = Server::start(Durability::Relaxed).expect("a PostgreSQL server");
    pg.create_db("newer").unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A database written by a newer build.
    let newer = pg.url("newer");
    let first = mesh_tests::spawn_mesh(
        "migrate",
        dir.path(),
        &[
            "coordinator",
            "--store",
            &newer,
            "--listen",
            &format!("127.0.0.1:{}", mesh_tests::free_port()),
            "--http-listen",
            &format!("127.0.0.1:{}", mesh_tests::free_port()),
        ],
    );
    wait_for(
        "the layout to be written",
        Duration::from_secs(20),
        || async {
            let (client, conn) = tokio_postgres::connect(&newer, tokio_postgres::NoTls)
                .await
                .ok()?;
            tokio::spawn(conn);
            client
                .query_opt("SELECT 1 FROM meta WHERE key = 'schema'", &[])
                .await
                .ok()?
        },
    )
    .await;
    drop(first);
    query(&newer, "UPDATE meta SET value = '99' WHERE key = 'schema'").await;
    let cases = [
        (newer.clone(), "has layout 99"),
        (
            format!("postgres://mesh:hunter2@127.0.0.1:{}/nothere", pg.port),
            "PostgreSQL",
        ),
        (
            "mysql://mesh:hunter2@127.0.0.1/x".to_owned(),
            "is not a store this build knows",
        ),
    ];
    for (url, says) in cases {
        let out = std::process::Command::new(mesh_tests::mesh_bin())
            .args(["coordinator", "--store", &url])
            .args([
                "--listen",
                &format!("127.0.0.1:{}", mesh_tests::free_port()),
            ])
            .args([
                "--http-listen",
                &format!("127.0.0.1:{}", mesh_tests::free_port()),
            ])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{url}: started");
        assert!(text.contains(says), "{url}: {text}");
        assert!(
            !text.contains("hunter2"),
            "{url}: the password is shown: {text}"
        );
    }
}

/// Two coordinators on one PostgreSQL store (lease 2 s), a node given both addresses.
async fn pair(pg: &Server) -> (Mesh, Mesh, String) {
    pair_with_lease(pg, "2s").await
}

async fn pair_with_lease(pg: &Server, lease: &str) -> (Mesh, Mesh, String) {
    pg.create_db("mesh").unwrap();
    let url = pg.url("mesh");
    let timings = Timings {
        coordinator_extra: format!("store = \"{url}\"\n[cluster]\nlease = \"{lease}\"\n"),
        // Nodes left on a paused leader leave it within their coordinator_silence (5 s):
        // the steps of the runs the new leader resumed wait for them meanwhile.
        unschedulable_ms: 20_000,
        ..Timings::default()
    };
    let mut leader = Mesh::start(timings.clone()).await;
    let standby = Mesh::start(timings).await;
    leader.others = vec![standby.own_url()];
    let sleepers = "[[agents]]\nkind = \"sleep\"\nmax_concurrency = 64\n[[agents]]\nkind = \"echo\"\nmax_concurrency = 64\n";
    leader.start_node("n1", sleepers).await;
    (leader, standby, url)
}

/// Submits `n` chains (sleep 200 ms, then echo); their runs.
async fn submit_chains(mesh: &Mesh, n: usize) -> Vec<mesh_agent_sdk::RunId> {
    let client = mesh.client().await;
    let mut runs = Vec::new();
    for i in 0..n {
        let g = goal(
            &format!("chain {i}"),
            &[
                ("s1", "sleep", json!({ "ms": 200 }), &[]),
                ("s2", "echo", json!({ "i": i }), &["s1"]),
            ],
        );
        runs.push(client.submit(g).await.unwrap().run_id);
    }
    runs
}

/// How long until the coordinator at `url` serves (its health says so).
async fn serving_after(url: &str, since: std::time::Instant) -> Duration {
    wait_for("the standby to lead", Duration::from_secs(20), || async {
        let client = mesh_agent_sdk::GoalClient::connect(url).await.ok()?;
        client.nodes().await.ok().map(|_| since.elapsed())
    })
    .await
}

/// Every run succeeded, and each of its steps was accepted once, as the store says.
async fn assert_each_step_accepted_once(mesh: &Mesh, url: &str, runs: &[mesh_agent_sdk::RunId]) {
    let client = mesh.client().await;
    for run in runs {
        let view = tokio::time::timeout(Duration::from_secs(60), client.wait(run))
            .await
            .expect("the run finishes after the failover")
            .unwrap();
        assert_eq!(view.state, RunState::Succeeded, "{view:?}");
    }
    assert_accepted_once(url, runs.len() * 2).await;
}

/// The store's journal holds `steps` accepted results, one per step.
async fn assert_accepted_once(url: &str, steps: usize) {
    let accepted: HashMap<(String, String), i64> = query(
        url,
        "SELECT run_id, step_id, COUNT(*) FROM journal WHERE kind = 'step_succeeded'
         GROUP BY run_id, step_id",
    )
    .await
    .iter()
    .map(|r| ((r.get(0), r.get(1)), r.get(2)))
    .collect();
    assert_eq!(accepted.len(), steps, "steps accepted");
    let twice: Vec<_> = accepted.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "steps accepted more than once: {twice:?}");
}

#[tokio::test]
async fn killing_the_leader_with_100_runs_in_flight_a_standby_leads_and_every_goal_completes_once()
{
    let pg = Server::start(Durability::Relaxed).expect("a PostgreSQL server");
    let (mut leader, standby, url) = pair(&pg).await;
    let runs = submit_chains(&leader, 100).await;
    // The probes: both are live; only the leader says it serves.
    let probe = |m: &Mesh, path| mesh_tests::http_status(m.http_port, path);
    assert_eq!(probe(&leader, "/livez"), Some(200));
    assert_eq!(probe(&leader, "/healthz"), Some(200));
    assert_eq!(probe(&standby, "/livez"), Some(200));
    assert_eq!(probe(&standby, "/healthz"), Some(503));

    let killed = std::time::Instant::now();
    leader.coordinator.as_mut().unwrap().kill9();
    let took = serving_after(&standby.own_url(), killed).await;
    eprintln!("kill -9 of the leader: the standby served after {took:?}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let epochs = query(&url, "SELECT epoch FROM leader").await;
    assert_eq!(
        epochs[0].get::<_, i64>(0),
        2,
        "the standby leads with the next epoch"
    );
    assert_each_step_accepted_once(&leader, &url, &runs).await;
}

#[tokio::test]
async fn a_leader_paused_past_its_lease_steps_down_when_it_wakes_and_its_writes_are_refused() {
    let pg = Server::start(Durability::Relaxed).expect("a PostgreSQL server");
    let (mut leader, standby, url) = pair(&pg).await;
    let runs = submit_chains(&leader, 20).await;

    let paused = std::time::Instant::now();
    leader.coordinator.as_mut().unwrap().signal("STOP").unwrap();
    let took = serving_after(&standby.own_url(), paused).await;
    eprintln!("SIGSTOP of the leader: the standby served after {took:?}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    leader.coordinator.as_mut().unwrap().signal("CONT").unwrap();
    // Awake, it finds its lease taken and stops, saying so.
    let old = leader.coordinator.as_mut().unwrap();
    let status = old
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("the deposed leader exits");
    assert!(!status.success(), "{status:?}");
    let log = old.log_text();
    assert!(log.contains("deposed"), "{log}");
    assert_each_step_accepted_once(&leader, &url, &runs).await;
    let epochs = query(&url, "SELECT epoch FROM leader").await;
    assert_eq!(epochs[0].get::<_, i64>(0), 2);
}

/// A leader stopped with SIGTERM (a rolling update) gives its lease up: the standby leads at
/// its next try, long before the 20 s lease would lapse, and the runs go on there.
#[tokio::test]
async fn a_leader_stopped_gives_its_lease_up_and_the_standby_leads_before_the_lease_lapses() {
    let pg = Server::start(Durability::Relaxed).expect("a PostgreSQL server");
    let (mut leader, standby, url) = pair_with_lease(&pg, "20s").await;
    let runs = submit_chains(&leader, 20).await;
    let stopped = std::time::Instant::now();
    let old = leader.coordinator.as_mut().unwrap();
    old.signal("TERM").unwrap();
    let status = old
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("the leader exits on SIGTERM");
    assert!(status.success(), "{status:?}: {}", old.log_text());
    assert!(
        old.log_text().contains("lease given up"),
        "{}",
        old.log_text()
    );
    let took = serving_after(&standby.own_url(), stopped).await;
    eprintln!("SIGTERM of the leader: the standby served after {took:?}");
    assert!(
        took < Duration::from_secs(15),
        "the standby waited for the lease to lapse: {took:?}"
    );
    assert_each_step_accepted_once(&leader, &url, &runs).await;
}
