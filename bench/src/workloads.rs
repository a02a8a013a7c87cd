//! The mesh workloads of `mesh bench`. Each starts its own processes and returns its figures.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt;
use mesh_agent_sdk::{GoalClient, GoalSpec, RunEvent, RunId, RunState, StepSpec};
use mesh_proto::domain::{FromNode, Registration, TaskResult, ToNode};
use mesh_proto::pb;
use mesh_proto::pb::node_service_client::NodeServiceClient;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

use super::cluster::{Cluster, Deadline, cpu_time, peak_rss_mib, rss_mib, wait_until};
use super::stats::{Figure, latency_figures, percentile};
use super::{Sizes, progress};

const PAYLOAD_BYTES: usize = 100;

fn echo_agents(names: &[&str], max: u32) -> String {
    names
        .iter()
        .map(|n| format!("[[agents]]\nkind = \"echo\"\nname = \"{n}\"\nskills = [\"echo\"]\nmax_concurrency = {max}\n"))
        .collect()
}

fn sleep_agent(max: u32) -> String {
    format!("[[agents]]\nkind = \"sleep\"\nmax_concurrency = {max}\n")
}

fn step(id: &str, uses: &str, with: Value, needs: &[String]) -> StepSpec {
    StepSpec {
        id: id.into(),
        uses: uses.to_owned(),
        with,
        needs: needs.iter().map(|n| n.as_str().into()).collect(),
    }
}

fn goal(objective: &str, steps: Vec<StepSpec>) -> GoalSpec {
    GoalSpec {
        objective: objective.to_owned(),
        inputs: json!({}),
        steps,
        idempotency_key: None,
        workflow: None,
        workflow_ref: None,
        budget: None,
        namespace: Default::default(),
    }
}

fn echo_goal() -> GoalSpec {
    goal(
        "bench echo",
        vec![step(
            "e",
            "echo",
            json!({ "p": "x".repeat(PAYLOAD_BYTES) }),
            &[],
        )],
    )
}

fn chain_goal(len: usize) -> GoalSpec {
    let steps = (0..len)
        .map(|i| {
            let needs = if i == 0 {
                vec![]
            } else {
                vec![format!("s{}", i - 1)]
            };
            step(&format!("s{i}"), "echo", json!({ "i": i }), &needs)
        })
        .collect();
    goal("bench chain", steps)
}

/// Waits for the run's `Finished` event.
async fn finished(client: &GoalClient, run: &RunId) -> Result<RunState> {
    let mut events = Box::pin(client.watch(run).await?);
    let mut finished = None;
    // Read to the end of the stream (it ends right after `Finished`): dropping it early
    // would reset the HTTP/2 stream, and too many resets make h2 close the connection.
    while let Some(event) = events.next().await {
        if let RunEvent::Finished { state, .. } = event? {
            finished = Some(state);
        }
    }
    finished.with_context(|| format!("watch of {run} ended without a Finished event"))
}

/// How a client submits a goal and waits for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Calls {
    /// `SubmitAndWatch`: one round trip.
    One,
    /// `SubmitGoal`, then `WatchRun`.
    Two,
}

/// Submits a goal and waits until it succeeds; returns the round trip.
async fn round_trip(client: &GoalClient, goal: GoalSpec, calls: Calls) -> Result<Duration> {
    let started = Instant::now();
    let (run, state) = match calls {
        Calls::One => match client.submit_and_wait(goal).await? {
            (run, RunEvent::Finished { state, .. }) => (run, state),
            (run, other) => bail!("run {} ended with {other:?}", run.run_id),
        },
        Calls::Two => {
            let run = client.submit(goal).await?;
            let state = finished(client, &run.run_id).await?;
            (run, state)
        }
    };
    ensure!(state == RunState::Succeeded, "run {} {state}", run.run_id);
    Ok(started.elapsed())
}

/// `n` goals with `in_flight` at a time; returns every round trip and the wall time.
async fn load(
    client: &GoalClient,
    label: &str,
    n: usize,
    in_flight: usize,
    make: fn() -> GoalSpec,
) -> Result<(Vec<Duration>, Duration)> {
    load_with(client, label, n, in_flight, make, Calls::One).await
}

async fn load_with(
    client: &GoalClient,
    label: &str,
    n: usize,
    in_flight: usize,
    make: fn() -> GoalSpec,
    calls: Calls,
) -> Result<(Vec<Duration>, Duration)> {
    let bar = progress(label, n as u64);
    let started = Instant::now();
    let samples = futures::stream::iter(0..n)
        .map(|_| {
            let (client, bar) = (client.clone(), bar.clone());
            async move {
                let d = round_trip(&client, make(), calls).await;
                bar.inc(1);
                d
            }
        })
        .buffer_unordered(in_flight)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    bar.finish_and_clear();
    Ok((samples, started.elapsed()))
}

/// w1: echo goals one at a time.
pub async fn w1(sizes: &Sizes) -> Result<Vec<Figure>> {
    let cluster = Cluster::with_nodes("", &[("n1", &echo_agents(&["echo"], 64))]).await?;
    let client = cluster.client().await?;
    load(&client, "w1 warm-up", sizes.warmup, 1, echo_goal).await?;
    let (samples, wall) = load(&client, "w1", sizes.sequential, 1, echo_goal).await?;
    let mut figures = latency_figures(samples, wall, "steps/s");
    figures.extend(two_call_figures(&client, "w1, submit + watch", sizes.sequential, 1).await?);
    Ok(figures)
}

/// The same load through `SubmitGoal` + `WatchRun`, for comparison with one call.
async fn two_call_figures(
    client: &GoalClient,
    label: &str,
    n: usize,
    in_flight: usize,
) -> Result<Vec<Figure>> {
    let (samples, wall) = load_with(client, label, n, in_flight, echo_goal, Calls::Two).await?;
    let names = [
        "steps/s, submit + watch",
        "p50, submit + watch",
        "p99, submit + watch",
    ];
    Ok(latency_figures(samples, wall, "steps/s")
        .into_iter()
        .zip(names)
        .map(|(f, name)| Figure { name, ..f })
        .collect())
}

/// w2: echo goals, 64 in flight, two nodes.
pub async fn w2(sizes: &Sizes) -> Result<Vec<Figure>> {
    let agents = echo_agents(&["echo"], 64);
    let cluster = Cluster::with_nodes("", &[("n1", &agents), ("n2", &agents)]).await?;
    let client = cluster.client().await?;
    load(&client, "w2 warm-up", sizes.warmup, 64, echo_goal).await?;
    let (samples, wall) = load(&client, "w2", sizes.parallel, 64, echo_goal).await?;
    let mut figures = latency_figures(samples, wall, "steps/s");
    figures.extend(two_call_figures(&client, "w2, submit + watch", sizes.parallel, 64).await?);
    Ok(figures)
}

/// w2 with OpenTelemetry on: the coordinator and both nodes export every span over OTLP/gRPC
/// to a receiver in this process, which counts them. The cost of tracing.
pub async fn w2_traced(sizes: &Sizes) -> Result<Vec<Figure>> {
    let sink = mesh_harness::otlp::Receiver::start(false).await?;
    let env = vec![("OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(), sink.endpoint())];
    let mut cluster = Cluster::with_env("", env).await?;
    let agents = echo_agents(&["echo"], 64);
    cluster.spawn_node("n1", &agents)?;
    cluster.spawn_node("n2", &agents)?;
    cluster.wait_nodes(2).await?;
    let client = cluster.client().await?;
    load(&client, "w2-traced warm-up", sizes.warmup, 64, echo_goal).await?;
    let before = sink.count();
    let (samples, wall) = load(&client, "w2-traced", sizes.parallel, 64, echo_goal).await?;
    let mut figures = latency_figures(samples, wall, "steps/s");
    // Spans still buffered go out within the batch delay (5 s by default): wait until none
    // has come for longer than that. A span the exporter's queue dropped never comes.
    let (mut seen, mut quiet_since, began) = (sink.count(), Instant::now(), Instant::now());
    while quiet_since.elapsed() < Duration::from_secs(6)
        && began.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if sink.count() != seen {
            (seen, quiet_since) = (sink.count(), Instant::now());
        }
    }
    let exported = seen - before;
    ensure!(exported > 0, "no span reached the OTLP receiver");
    figures.push(Figure::new(
        "spans received per goal",
        exported as f64 / sizes.parallel as f64,
        "",
    ));
    Ok(figures)
}

/// The dashboard's page of a run of 1,000 steps, finished: each request renders the page from
/// the run's view and trace, as a person opening it would.
pub async fn dashboard(sizes: &Sizes) -> Result<Vec<Figure>> {
    const STEPS: usize = 1_000;
    let agents = echo_agents(&["echo"], 64);
    let cluster = Cluster::with_nodes("", &[("n1", &agents)]).await?;
    let client = cluster.client().await?;
    let steps = (0..STEPS)
        .map(|i| step(&format!("s{i}"), "echo", json!({ "i": i }), &[]))
        .collect();
    let run = client.submit(goal("bench dashboard", steps)).await?.run_id;
    let deadline = Deadline::new("the 1,000-step run to finish", Duration::from_secs(120));
    while !client.get_run(&run).await?.state.is_terminal() {
        deadline.tick().await?;
    }
    mesh_agent_sdk::llm::install_crypto_provider();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let url = format!("http://127.0.0.1:{}/ui/runs/{run}", cluster.http);
    let get = async || -> Result<usize> {
        let page = http.get(&url).send().await?.error_for_status()?;
        Ok(page.bytes().await?.len())
    };
    let bytes = get().await?;
    ensure!(
        bytes > STEPS * 50,
        "the run page ({bytes} bytes) does not list its {STEPS} steps"
    );
    for _ in 0..5 {
        get().await?;
    }
    let n = sizes.sequential.clamp(20, 200);
    let began = Instant::now();
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let at = Instant::now();
        get().await?;
        samples.push(at.elapsed());
    }
    let figures = latency_figures(samples, began.elapsed(), "pages/s");
    let names = [
        "pages/s, run page of 1,000 steps",
        "p50, run page of 1,000 steps",
        "p99, run page of 1,000 steps",
    ];
    let mut figures: Vec<Figure> = figures
        .into_iter()
        .zip(names)
        .map(|(f, name)| Figure { name, ..f })
        .collect();
    figures.push(Figure::new("page size", bytes as f64 / 1024.0, "KiB"));
    Ok(figures)
}

/// w1 and w2 on a cluster with mutual TLS and tokens: the cost of security.
async fn secured(sizes: &Sizes, nodes: &[&str], n: usize, in_flight: usize) -> Result<Vec<Figure>> {
    let mut cluster = Cluster::secured("").await?;
    let agents = echo_agents(&["echo"], 64);
    for node in nodes {
        cluster.spawn_node(node, &agents)?;
    }
    cluster.wait_nodes(nodes.len()).await?;
    let client = cluster.client().await?;
    load(
        &client,
        "secure warm-up",
        sizes.warmup,
        in_flight,
        echo_goal,
    )
    .await?;
    let (samples, wall) = load(&client, "secure", n, in_flight, echo_goal).await?;
    Ok(latency_figures(samples, wall, "steps/s"))
}

/// w1 with mutual TLS and tokens.
pub async fn w1_secure(sizes: &Sizes) -> Result<Vec<Figure>> {
    secured(sizes, &["n1"], sizes.sequential, 1).await
}

/// w2 with mutual TLS and tokens.
pub async fn w2_secure(sizes: &Sizes) -> Result<Vec<Figure>> {
    secured(sizes, &["n1", "n2"], sizes.parallel, 64).await
}

/// w3: echo goals over 8 echo agents on two nodes, 64 in flight.
pub async fn w3(sizes: &Sizes) -> Result<Vec<Figure>> {
    let agents = echo_agents(&["echo-1", "echo-2", "echo-3", "echo-4"], 16);
    let cluster = Cluster::with_nodes("", &[("n1", &agents), ("n2", &agents)]).await?;
    let client = cluster.client().await?;
    load(&client, "w3 warm-up", sizes.warmup, 64, echo_goal).await?;
    let (samples, wall) = load(&client, "w3", sizes.spread, 64, echo_goal).await?;
    let views = client.agents(Some("echo")).await?;
    ensure!(
        views.len() == 8,
        "expected 8 echo agents, found {}",
        views.len()
    );
    Ok(latency_figures(samples, wall, "steps/s"))
}

/// w4: from launching the processes to the first completed goal.
pub async fn w4(_sizes: &Sizes) -> Result<Vec<Figure>> {
    let started = Instant::now();
    let mut cluster = Cluster::coordinator("").await?;
    let agents = echo_agents(&["echo"], 8);
    cluster.spawn_node("n1", &agents)?;
    cluster.spawn_node("n2", &agents)?;
    let client = cluster.client().await?;
    // Submitted at once: the step waits in the dispatcher until a node registers.
    round_trip(&client, echo_goal(), Calls::One).await?;
    Ok(vec![Figure::new(
        "cold start",
        started.elapsed().as_secs_f64() * 1e3,
        "ms",
    )])
}

/// durable: chains of 10 journaled echo steps: one chain at a time (the per-step cost of a
/// journaled transition, dispatch and round trip included), then 32 at a time (throughput).
pub async fn durable(sizes: &Sizes) -> Result<Vec<Figure>> {
    const CHAIN: usize = 10;
    let agents = echo_agents(&["echo"], 64);
    let cluster = Cluster::with_nodes("", &[("n1", &agents), ("n2", &agents)]).await?;
    let client = cluster.client().await?;
    let (mut alone, _) = load(
        &client,
        "durable, one chain",
        sizes.durable_runs / 10,
        1,
        || chain_goal(CHAIN),
    )
    .await?;
    alone.sort_unstable();
    let per_step = percentile(&alone, 50.0) / CHAIN as u32;
    let (_, wall) = load(
        &client,
        "durable, 32 chains",
        sizes.durable_runs,
        32,
        || chain_goal(CHAIN),
    )
    .await?;
    Ok(vec![
        Figure::new(
            "step transitions/s",
            (sizes.durable_runs * CHAIN) as f64 / wall.as_secs_f64(),
            "/s",
        ),
        Figure::new(
            "p50 per step, one chain",
            per_step.as_secs_f64() * 1e6,
            "µs",
        ),
    ])
}

/// fanout: one goal with a 5 KB input fanned out over `fan_out` elements (10,000, the most
/// a `foreach` may have) through `echo`, each task's `with` carrying the 5 KB: the
/// coordinator's peak memory, and the time to the end of the run.
pub async fn fanout(sizes: &Sizes) -> Result<Vec<Figure>> {
    let agents = echo_agents(&["echo"], 64);
    let cluster = Cluster::with_nodes("", &[("n1", &agents), ("n2", &agents)]).await?;
    let client = cluster.client().await?;
    let pid = cluster.coordinator.pid();
    let before = peak_rss_mib(pid)?;
    let yaml = "inputs: { blob: string, xs: array }\nsteps:\n  - id: fan\n    uses: echo\n    foreach: \"${{ inputs.xs }}\"\n    parallel: 256\n    with: { blob: \"${{ inputs.blob }}\", i: \"${{ item }}\" }\n";
    let goal = GoalSpec {
        objective: "bench fan-out".into(),
        inputs: json!({ "blob": "b".repeat(5000), "xs": (0..sizes.fan_out).collect::<Vec<_>>() }),
        steps: Vec::new(),
        workflow: Some(yaml.to_owned()),
        workflow_ref: None,
        idempotency_key: None,
        budget: None,
        namespace: Default::default(),
    };
    let started = Instant::now();
    let elapsed = round_trip(&client, goal, Calls::One).await?;
    let wall = started.elapsed().max(elapsed);
    let peak = peak_rss_mib(pid)?;
    Ok(vec![
        Figure::new("coordinator peak RSS", peak, "MiB"),
        Figure::new("coordinator peak RSS before", before, "MiB"),
        Figure::new("run time", wall.as_secs_f64() * 1e3, "ms"),
    ])
}

/// runs: many runs held in flight at once, each waiting on `sleep`: coordinator memory.
pub async fn runs(sizes: &Sizes) -> Result<Vec<Figure>> {
    let n = sizes.held_runs;
    let cluster = Cluster::with_nodes("", &[("n1", &sleep_agent(n as u32 + 16))]).await?;
    let client = cluster.client().await?;
    let pid = cluster.coordinator.pid();
    let before = rss_mib(pid)?;
    let bar = progress("runs submitted", n as u64);
    futures::stream::iter(0..n)
        .map(|_| {
            let (client, bar) = (client.clone(), bar.clone());
            async move {
                let g = goal(
                    "held",
                    vec![step("nap", "sleep", json!({ "ms": 600_000 }), &[])],
                );
                let r = client.submit(g).await;
                bar.inc(1);
                r
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    bar.finish_and_clear();
    wait_until(
        "every run's sleep to be on the node",
        Duration::from_secs(120),
        || {
            let client = client.clone();
            async move {
                let nodes = client.nodes().await.unwrap_or_default();
                nodes.iter().map(|v| v.in_flight as usize).sum::<usize>() >= n
            }
        },
    )
    .await?;
    let rss = rss_mib(pid)?;
    Ok(vec![
        Figure::new("runs in flight", n as f64, ""),
        Figure::new("coordinator RSS", rss, "MiB"),
        Figure::new(
            "RSS per run",
            (rss - before).max(0.0) * 1024.0 / n as f64,
            "KiB",
        ),
    ])
}

/// One simulated node: registers `agents` agents and heartbeats at the coordinator's interval;
/// it answers each task at once with its input (an echo), as a real node's agent would.
async fn sim_node(
    channel: tonic::transport::Channel,
    name: String,
    agents: usize,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<()> {
    let cards: Vec<_> = (0..agents)
        .map(|i| {
            mesh_agent_sdk::AgentCard::new(&format!("a{i}"))
                .skill("echo")
                .max_concurrency(4)
        })
        .collect();
    // The coordinator bounds the streams not yet registered (max_unregistered_streams): a
    // thousand opened at once are partly refused RESOURCE_EXHAUSTED, and, as real nodes do,
    // try again after a pause (40 times at most).
    let mut attempt = 0;
    let (tx, mut inbound, registered) = loop {
        attempt += 1;
        let (tx, rx) = mpsc::channel::<pb::NodeFrame>(16);
        tx.send(
            FromNode::Register(Registration {
                node_name: name.clone(),
                labels: Default::default(),
                agents: cards.clone(),
            })
            .into(),
        )
        .await?;
        let opened = NodeServiceClient::new(channel.clone())
            .connect(ReceiverStream::new(rx))
            .await;
        let first = match opened {
            Ok(response) => {
                let mut inbound = response.into_inner();
                inbound.message().await.map(|frame| (inbound, frame))
            }
            Err(status) => Err(status),
        };
        match first {
            Ok((inbound, Some(frame))) => {
                let ToNode::Registered(registered) = ToNode::try_from(frame)? else {
                    bail!("first frame was not `registered`");
                };
                break (tx, inbound, registered);
            }
            Ok((_, None)) => bail!("stream ended before registration"),
            Err(status) if status.code() == tonic::Code::ResourceExhausted && attempt < 40 => {
                tokio::time::sleep(Duration::from_millis(fastrand::u64(50..250))).await;
            }
            Err(status) => return Err(status.into()),
        }
    };
    let mut tick = tokio::time::interval(Duration::from_millis(registered.heartbeat_every_ms));
    let mut stop = stop;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                tx.send(FromNode::Heartbeat { instance: registered.instance }.into()).await?;
            }
            frame = inbound.message() => {
                let Some(frame) = frame? else {
                    bail!("the coordinator closed the stream");
                };
                if let Ok(ToNode::Task(task)) = ToNode::try_from(frame) {
                    let result = TaskResult::new(task.token, Ok(task.input));
                    tx.send(FromNode::Result(result).into()).await?;
                }
            }
            _ = stop.changed() => return Ok(()),
        }
    }
}

/// Starts `n` simulated nodes × 10 agents on `cluster`'s coordinator (a few hundred streams per
/// connection, under the server's stream limit) and waits until every one is registered.
async fn sim_nodes(
    cluster: &Cluster,
    client: &GoalClient,
    n: usize,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Result<Vec<tokio::task::JoinHandle<Result<()>>>> {
    let mut tasks = Vec::new();
    let mut channel = None;
    for i in 0..n {
        if i % 250 == 0 {
            channel = Some(
                Endpoint::from_shared(cluster.url.clone())?
                    .connect()
                    .await?,
            );
        }
        let ch = channel.clone().expect("made above");
        tasks.push(tokio::spawn(sim_node(
            ch,
            format!("sim-{i}"),
            10,
            stop.clone(),
        )));
    }
    let deadline = Deadline::new("every simulated node to register", Duration::from_secs(60));
    loop {
        // A simulated node that ended has failed: say why rather than wait out the deadline.
        if let Some(i) = tasks.iter().position(|t| t.is_finished()) {
            let why = match tasks.swap_remove(i).await {
                Ok(Ok(())) => "it ended".to_owned(),
                Ok(Err(e)) => format!("{e:#}"),
                Err(e) => e.to_string(),
            };
            bail!("a simulated node failed while {n} registered: {why}");
        }
        match client.nodes().await {
            Ok(nodes) if nodes.len() >= n => return Ok(tasks),
            _ => deadline.tick().await?,
        }
    }
}

/// scale: for each node count, a fresh coordinator and that many simulated nodes × 10 agents
/// in this process, serving echo tasks: the coordinator's CPU while only heartbeats flow, then
/// the goals per second it dispatches with 256 in flight, and its memory.
pub async fn scale(sizes: &Sizes) -> Result<Vec<Figure>> {
    let mut figures = Vec::new();
    for &n in sizes.scale_nodes {
        let cluster = Cluster::coordinator("").await?;
        let client = cluster.client().await?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let tasks = sim_nodes(&cluster, &client, n, &stop_rx).await?;
        let pid = cluster.coordinator.pid();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (cpu0, t0) = (cpu_time(pid)?, Instant::now());
        tokio::time::sleep(Duration::from_secs(sizes.sim_seconds.min(5))).await;
        let idle = (cpu_time(pid)? - cpu0).as_secs_f64() / t0.elapsed().as_secs_f64();
        let label = format!("scale, {n} nodes");
        load(&client, &label, sizes.warmup, 64, echo_goal).await?;
        let (samples, wall) = load(&client, &label, sizes.scale_goals, 256, echo_goal).await?;
        let rate = samples.len() as f64 / wall.as_secs_f64();
        let rss = rss_mib(pid)?;
        let _ = stop_tx.send(true);
        for t in tasks {
            t.await??;
        }
        // Figure names are static: a handful per run, leaked once.
        let name = |what: &str| -> &'static str { Box::leak(format!("{what}, {n} nodes").into()) };
        figures.push(Figure::new(name("steps/s"), rate, "/s"));
        figures.push(Figure::new(name("heartbeat CPU"), idle, "cores"));
        figures.push(Figure::new(name("coordinator RSS"), rss, "MiB"));
    }
    Ok(figures)
}

/// registry: simulated nodes × 10 agents heartbeating at 1 Hz: coordinator CPU share.
pub async fn registry(sizes: &Sizes) -> Result<Vec<Figure>> {
    let cluster = Cluster::coordinator("").await?;
    let client = cluster.client().await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let n = sizes.sim_nodes;
    let tasks = sim_nodes(&cluster, &client, n, &stop_rx).await?;
    let pid = cluster.coordinator.pid();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (cpu0, t0) = (cpu_time(pid)?, Instant::now());
    let bar = progress("registry window (s)", sizes.sim_seconds);
    for _ in 0..sizes.sim_seconds {
        tokio::time::sleep(Duration::from_secs(1)).await;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let share = (cpu_time(pid)? - cpu0).as_secs_f64() / t0.elapsed().as_secs_f64();
    let healthy = client
        .nodes()
        .await?
        .iter()
        .filter(|v| v.health == mesh_agent_sdk::Health::Healthy)
        .count();
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    ensure!(
        healthy == n,
        "{healthy} of {n} simulated nodes healthy at the end"
    );
    Ok(vec![
        Figure::new("nodes", n as f64, ""),
        Figure::new("agents", (n * 10) as f64, ""),
        Figure::new("coordinator CPU", share, "cores"),
    ])
}

/// A coordinator of `leader_failover`: its process, its addresses and its configuration file.
struct Coord {
    proc: Option<super::cluster::Proc>,
    url: String,
    http: u16,
    config: std::path::PathBuf,
}

impl Coord {
    fn new(dir: &std::path::Path, name: &str, store: &str) -> Result<Coord> {
        let (grpc, http) = (super::cluster::free_port()?, super::cluster::free_port()?);
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{grpc}\"\nhttp_listen = \"127.0.0.1:{http}\"\ndata_dir = \"{}\"\nstore = \"{store}\"\n",
                dir.join(name).display()
            ),
        )?;
        Ok(Coord {
            proc: None,
            url: format!("http://127.0.0.1:{grpc}"),
            http,
            config,
        })
    }

    fn start(&mut self, dir: &std::path::Path, name: &str) -> Result<()> {
        let config = self.config.to_string_lossy().into_owned();
        self.proc = Some(super::cluster::spawn(
            dir,
            name,
            &["coordinator", "--config", &config],
        )?);
        Ok(())
    }

    fn proc(&mut self) -> Result<&mut super::cluster::Proc> {
        self.proc.as_mut().context("the coordinator is not running")
    }

    /// Whether it serves: its health says SERVING and a call succeeds.
    async fn serves(&self) -> bool {
        match GoalClient::connect(&self.url).await {
            Ok(c) => c.nodes().await.is_ok(),
            Err(_) => false,
        }
    }

    /// Whether it answers its liveness probe (a standby does).
    async fn live(&self, http: &reqwest::Client) -> bool {
        let url = format!("http://127.0.0.1:{}/livez", self.http);
        http.get(url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    }
}

/// leader-failover: two coordinators on one PostgreSQL store with the default lease (5 s), a
/// node given both addresses, `failover_runs` runs in flight. kill -9 the leader: the time
/// until the standby serves, then every run must succeed. Then, the killed one back as a
/// standby, SIGSTOP the new leader: the time until the other serves; woken, the paused one
/// must exit (deposed). Last, the paused one back as a standby, SIGTERM the leader (a rolling
/// update; it gives its lease up): the time until the other serves.
pub async fn leader_failover(sizes: &Sizes) -> Result<Vec<Figure>> {
    let pg = tokio::task::spawn_blocking(|| {
        let server =
            mesh_harness::postgres::Server::start(mesh_harness::postgres::Durability::Full)?;
        server.create_db("mesh")?;
        Ok::<_, std::io::Error>(server)
    })
    .await??;
    let dir = tempfile::tempdir()?;
    let store = pg.url("mesh");
    let mut a = Coord::new(dir.path(), "a", &store)?;
    let mut b = Coord::new(dir.path(), "b", &store)?;
    mesh_agent_sdk::llm::install_crypto_provider();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    a.start(dir.path(), "a")?;
    wait_until("coordinator a to lead", Duration::from_secs(30), || {
        a.serves()
    })
    .await?;
    b.start(dir.path(), "b")?;
    wait_until("coordinator b to stand by", Duration::from_secs(30), || {
        b.live(&http)
    })
    .await?;
    let node = dir.path().join("n1.toml");
    std::fs::write(
        &node,
        format!(
            "coordinator = \"{},{}\"\nname = \"n1\"\nreconnect_min = \"20ms\"\nreconnect_max = \"200ms\"\n{}",
            a.url,
            b.url,
            sleep_agent(400)
        ),
    )?;
    let _node = super::cluster::spawn(
        dir.path(),
        "n1",
        &["node", "--config", &node.to_string_lossy()],
    )?;
    let client = GoalClient::connect(&a.url).await?;
    wait_until("the node on the leader", Duration::from_secs(30), || {
        let client = client.clone();
        async move { client.nodes().await.is_ok_and(|n| !n.is_empty()) }
    })
    .await?;
    let runs = submit_naps(&client, "leader failover", sizes.failover_runs, 2_000).await?;

    let killed = Instant::now();
    a.proc()?.kill9();
    wait_until("b to serve", Duration::from_secs(30), || b.serves()).await?;
    let after_kill = killed.elapsed();
    let client = GoalClient::connect(&b.url).await?;
    let deadline = Deadline::new("every run to succeed on b", Duration::from_secs(90));
    for run in &runs {
        loop {
            let view = client.get_run(run).await?;
            if view.state.is_terminal() {
                ensure!(
                    view.state == RunState::Succeeded,
                    "{run}: {:?} after the failover",
                    view.state
                );
                break;
            }
            deadline.tick().await?;
        }
    }

    a.start(dir.path(), "a-again")?;
    wait_until("a to stand by", Duration::from_secs(30), || a.live(&http)).await?;
    let paused = Instant::now();
    b.proc()?.signal("STOP")?;
    wait_until("a to serve", Duration::from_secs(30), || a.serves()).await?;
    let after_pause = paused.elapsed();
    b.proc()?.signal("CONT")?;
    let woke = b.proc()?.wait_exit(Duration::from_secs(20)).await;
    ensure!(
        woke.is_ok(),
        "the paused leader went on after waking, its lease taken"
    );

    // A rolling update: b back as a standby, SIGTERM to the leader a, which gives its lease up.
    b.start(dir.path(), "b-again")?;
    wait_until("b to stand by", Duration::from_secs(30), || b.live(&http)).await?;
    let stopped = Instant::now();
    a.proc()?.signal("TERM")?;
    wait_until("b to serve", Duration::from_secs(30), || b.serves()).await?;
    let after_term = stopped.elapsed();
    Ok(vec![
        Figure::new("runs in flight", runs.len() as f64, ""),
        Figure::new(
            "kill -9 to the standby serving",
            after_kill.as_secs_f64() * 1e3,
            "ms",
        ),
        Figure::new(
            "SIGSTOP to the standby serving",
            after_pause.as_secs_f64() * 1e3,
            "ms",
        ),
        Figure::new(
            "SIGTERM to the standby serving",
            after_term.as_secs_f64() * 1e3,
            "ms",
        ),
    ])
}

/// Submits `n` goals of one `sleep` step of `ms`; their runs.
async fn submit_naps(
    client: &GoalClient,
    objective: &str,
    n: usize,
    ms: u64,
) -> Result<Vec<RunId>> {
    let mut runs = Vec::new();
    for _ in 0..n {
        let g = goal(
            objective,
            vec![step("nap", "sleep", json!({ "ms": ms }), &[])],
        );
        runs.push(client.submit(g).await?.run_id);
    }
    Ok(runs)
}

/// failover: kill -9 a node with work in flight; time until all of it is on the other node.
pub async fn failover(sizes: &Sizes) -> Result<Vec<Figure>> {
    let agents = sleep_agent(400);
    let mut cluster = Cluster::with_nodes("", &[("a", &agents), ("b", &agents)]).await?;
    let client = cluster.client().await?;
    let runs = submit_naps(&client, "failover", sizes.failover_runs, 30_000).await?;
    let deadline = Deadline::new("every sleep to be dispatched", Duration::from_secs(60));
    let on_a = 'poll: loop {
        let mut on_a = Vec::new();
        for run in &runs {
            let view = client.get_run(run).await?;
            match &view.steps[0].agent {
                Some(agent) if agent.node.as_str() == "a" => on_a.push(run.clone()),
                Some(_) => {}
                None => {
                    deadline.tick().await?;
                    continue 'poll;
                }
            }
        }
        break on_a;
    };
    ensure!(!on_a.is_empty(), "no work landed on node a");
    let killed = Instant::now();
    cluster.node("a").context("node a")?.kill9();
    let mut moved = HashSet::new();
    let deadline = Deadline::new(
        "every attempt of node a to be on node b",
        Duration::from_secs(60),
    );
    while moved.len() < on_a.len() {
        for run in &on_a {
            if moved.contains(run) {
                continue;
            }
            let view = client.get_run(run).await?;
            if view.steps[0]
                .agent
                .as_ref()
                .is_some_and(|a| a.node.as_str() == "b")
            {
                moved.insert(run.clone());
            }
        }
        if moved.len() < on_a.len() {
            deadline.tick().await?;
        }
    }
    let redispatched = killed.elapsed();
    Ok(vec![
        Figure::new("attempts moved", on_a.len() as f64, ""),
        Figure::new(
            "kill -9 to all re-dispatched",
            redispatched.as_secs_f64() * 1e3,
            "ms",
        ),
    ])
}

/// The key the `llm` workload's fake provider expects.
const LLM_KEY: &str = "sk-bench-0123456789abcdef";
/// The fake answers `answer:` and these words, one word per chunk and per output token.
const LLM_PROMPT: &str = "the mesh keeps every accepted goal durable and runs each step \
    on an agent that serves its skill with fencing tokens so that a late result never \
    overwrites a newer attempt of that same step";
const LLM_MAX_TOKENS: u32 = 64;

fn llm_goal() -> GoalSpec {
    let with =
        json!({ "model": "openai/bench", "prompt": LLM_PROMPT, "max_tokens": LLM_MAX_TOKENS });
    goal("bench llm", vec![step("ask", "llm", with, &[])])
}

/// A goal whose answer streams for about a second: 400 words, one chunk each.
fn llm_stream_goal() -> GoalSpec {
    let prompt = vec!["token"; 400].join(" ");
    let with = json!({ "model": "openai/bench", "prompt": prompt, "max_tokens": 1000 });
    goal("bench llm stream", vec![step("ask", "llm", with, &[])])
}

/// llm: the `llm` agent against a fake OpenAI-compatible provider on loopback (the one the
/// tests use), through the SDK's real client code (genai). The mesh's overhead on one call is
/// a goal of one `llm` step minus the same streaming call made directly from this process;
/// then tokens/s with 64 calls in flight, and deltas delivered to 64 watchers of streaming
/// steps.
pub async fn llm(sizes: &Sizes) -> Result<Vec<Figure>> {
    use mesh_agent_sdk::llm::{
        ChatModel, ChatRequest, LlmConfig, Message, ModelRef, Models, ProviderConfig, Secret,
    };
    use mesh_harness::fake_llm::{FakeLlm, Wire};

    let fake = FakeLlm::start(LLM_KEY).await;
    let base_url = fake.base_url(Wire::OpenAi);
    // Direct: the same streaming call, read to its end, as the agent makes it.
    let models = Models::new(LlmConfig {
        openai: ProviderConfig {
            base_url: Some(base_url.clone()),
            api_key: Some(Secret::new(LLM_KEY)),
        },
        ..LlmConfig::default()
    })?;
    let model = ModelRef::parse("openai/bench").map_err(anyhow::Error::msg)?;
    let request = ChatRequest {
        messages: vec![Message::user(LLM_PROMPT)],
        max_tokens: Some(LLM_MAX_TOKENS),
        timeout: Some(Duration::from_secs(30)),
        ..ChatRequest::default()
    };
    let tokens = FakeLlm::answer_to(LLM_PROMPT).split_whitespace().count() as u64;
    let mut direct = Vec::with_capacity(sizes.sequential);
    for i in 0..sizes.warmup + sizes.sequential {
        let started = Instant::now();
        let reply = models.chat(&model, &request).await?;
        ensure!(
            reply.usage.map(|u| u.output_tokens) == Some(tokens),
            "the fake answered {:?}",
            reply.usage
        );
        if i >= sizes.warmup {
            direct.push(started.elapsed());
        }
    }

    let node = format!(
        "[[agents]]\nkind = \"llm\"\nmax_concurrency = 64\n\n[llm.openai]\nbase_url = \"{base_url}\"\napi_key = \"{LLM_KEY}\"\n"
    );
    let cluster = Cluster::with_nodes("", &[("n1", &node)]).await?;
    let client = cluster.client().await?;
    load(&client, "llm warm-up", sizes.warmup, 1, llm_goal).await?;
    let (through, wall) = load(&client, "llm one at a time", sizes.sequential, 1, llm_goal).await?;
    let mut figures: Vec<Figure> = latency_figures(through.clone(), wall, "calls/s")
        .into_iter()
        .zip([
            "calls/s through the mesh",
            "p50 through the mesh",
            "p99 through the mesh",
        ])
        .map(|(f, name)| Figure { name, ..f })
        .collect();
    let (mut direct, mut through) = (direct, through);
    direct.sort_unstable();
    through.sort_unstable();
    for (name, p) in [("added p50", 50.0), ("added p99", 99.0)] {
        let added = percentile(&through, p).as_secs_f64() - percentile(&direct, p).as_secs_f64();
        figures.push(Figure::new(name, added * 1e6, "µs"));
    }
    figures.push(Figure::new(
        "direct p50",
        percentile(&direct, 50.0).as_secs_f64() * 1e6,
        "µs",
    ));

    // Throughput: 64 calls in flight, each answering `tokens` output tokens (checked above).
    let (_, wall) = load(
        &client,
        "llm 64 in flight",
        sizes.parallel / 10,
        64,
        llm_goal,
    )
    .await?;
    let calls = (sizes.parallel / 10) as f64;
    figures.push(Figure::new(
        "output tokens/s, 64 in flight",
        calls * tokens as f64 / wall.as_secs_f64(),
        "/s",
    ));

    // Deltas: 64 watched steps, each streaming 401 chunks 2 ms apart.
    fake.knobs()
        .chunk_delay_ms
        .store(2, std::sync::atomic::Ordering::SeqCst);
    let answer = FakeLlm::answer_to(&vec!["token"; 400].join(" "));
    let started = Instant::now();
    let watched = futures::stream::iter(0..64)
        .map(|_| {
            let client = client.clone();
            let answer = answer.clone();
            async move {
                let (run, mut events) = client.submit_and_watch(llm_stream_goal()).await?;
                let (mut deltas, mut text) = (0u64, String::new());
                let mut state = None;
                while let Some(event) = events.next().await {
                    match event? {
                        RunEvent::Delta {
                            text: t, restart, ..
                        } => {
                            if restart {
                                text.clear();
                            }
                            text.push_str(&t);
                            deltas += 1;
                        }
                        RunEvent::Finished { state: s, .. } => state = Some(s),
                        _ => {}
                    }
                }
                ensure!(
                    state == Some(RunState::Succeeded),
                    "run {} {state:?}",
                    run.run_id
                );
                ensure!(
                    text == answer,
                    "run {}: the deltas did not make the answer",
                    run.run_id
                );
                Ok::<_, anyhow::Error>(deltas)
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<u64>>>()?;
    let wall = started.elapsed().as_secs_f64();
    let deltas: u64 = watched.iter().sum();
    figures.push(Figure::new(
        "deltas/s to 64 watchers",
        deltas as f64 / wall,
        "/s",
    ));
    figures.push(Figure::new(
        "text bytes/s to 64 watchers",
        (answer.len() * 64) as f64 / wall,
        "/s",
    ));
    Ok(figures)
}

/// An agent of this process that calls the skill `echo` through the coordinator (as a model's
/// tool call does) and answers with its output.
struct Caller;

impl mesh_agent_sdk::Agent for Caller {
    fn card(&self) -> mesh_agent_sdk::AgentCard {
        mesh_agent_sdk::AgentCard::new("caller")
            .skill("call-echo")
            .max_concurrency(64)
    }

    async fn handle(
        &self,
        ctx: mesh_agent_sdk::Context,
        input: Value,
    ) -> Result<Value, mesh_agent_sdk::AgentError> {
        ctx.call_skill("echo", input["with"].clone())
            .await
            .map_err(|e| mesh_agent_sdk::AgentError::retryable(&e.code, e.message))
    }
}

fn call_echo_goal() -> GoalSpec {
    goal(
        "bench skill call",
        vec![step(
            "c",
            "call-echo",
            json!({ "p": "x".repeat(PAYLOAD_BYTES) }),
            &[],
        )],
    )
}

/// skill-call: one at a time, an `echo` step, then a step whose agent calls `echo` as a skill
/// (journaled, dispatched as a child task, answered on the caller's stream): what a skill
/// called as a tool adds to a step.
pub async fn skill_call(sizes: &Sizes) -> Result<Vec<Figure>> {
    let cluster = Cluster::with_nodes("", &[("n1", &echo_agents(&["echo"], 64))]).await?;
    let runtime = mesh_agent_sdk::NodeRuntime::builder()
        .coordinator(cluster.url.clone())
        .name("caller-node")
        .agent(Caller)
        .build()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let node = tokio::spawn(runtime.run_until(async move {
        let _ = stopped.await;
    }));
    cluster.wait_nodes(2).await?;
    let client = cluster.client().await?;
    load(
        &client,
        "skill-call warm-up",
        sizes.warmup,
        1,
        call_echo_goal,
    )
    .await?;
    let (direct, _) = load(&client, "echo step", sizes.sequential, 1, echo_goal).await?;
    let (called, _) = load(
        &client,
        "step calling echo",
        sizes.sequential,
        1,
        call_echo_goal,
    )
    .await?;
    let p50 = |mut s: Vec<Duration>| {
        s.sort_unstable();
        crate::stats::percentile(&s, 50.0).as_secs_f64() * 1e6
    };
    let (direct, called) = (p50(direct), p50(called));
    let _ = stop.send(());
    let _ = node.await;
    Ok(vec![
        Figure::new("p50, echo step", direct, "µs"),
        Figure::new("p50, step calling echo", called, "µs"),
        Figure::new("added by the skill call, p50", called - direct, "µs"),
    ])
}

/// What the `sink` of the messages workload received: when each message was sent (ns since the
/// workload began, in its payload) and when it arrived.
#[derive(Default)]
struct Sink {
    began: Option<std::time::Instant>,
    latencies: std::sync::Mutex<Vec<Duration>>,
    arrived: tokio::sync::Notify,
}

struct SinkAgent(std::sync::Arc<Sink>);

impl mesh_agent_sdk::Agent for SinkAgent {
    fn card(&self) -> mesh_agent_sdk::AgentCard {
        mesh_agent_sdk::AgentCard::new("sink")
            .skill("sink.noop")
            .inbox()
    }

    async fn handle(
        &self,
        _ctx: mesh_agent_sdk::Context,
        _input: Value,
    ) -> Result<Value, mesh_agent_sdk::AgentError> {
        Ok(Value::Null)
    }

    async fn on_message(
        &self,
        _mail: mesh_agent_sdk::Mail,
        message: mesh_agent_sdk::Message,
    ) -> Result<(), mesh_agent_sdk::AgentError> {
        let began = self.0.began.expect("set before the runtime starts");
        let sent = Duration::from_nanos(message.payload["t"].as_u64().unwrap_or_default());
        let latency = began.elapsed().saturating_sub(sent);
        self.0.latencies.lock().unwrap().push(latency);
        self.0.arrived.notify_one();
        Ok(())
    }
}

/// Sends `with.count` messages to `sink`, `with.in_flight` sends at a time (each waits for
/// the coordinator's answer, and sends again a little later when the mailbox is full),
/// stamped with the time since the workload began.
struct Blaster {
    name: String,
    began: std::time::Instant,
}

impl mesh_agent_sdk::Agent for Blaster {
    fn card(&self) -> mesh_agent_sdk::AgentCard {
        mesh_agent_sdk::AgentCard::new(&self.name)
            .skill(&self.name)
            .max_concurrency(4)
    }

    async fn handle(
        &self,
        ctx: mesh_agent_sdk::Context,
        input: Value,
    ) -> Result<Value, mesh_agent_sdk::AgentError> {
        let count = input["with"]["count"].as_u64().unwrap_or(1);
        let in_flight = input["with"]["in_flight"].as_u64().unwrap_or(1) as usize;
        let mail = ctx.mail();
        let began = self.began;
        let refused = futures::stream::iter(0..count)
            .map(|_| {
                let mail = mail.clone();
                async move {
                    let t = began.elapsed().as_nanos() as u64;
                    // A full mailbox is backpressure: the sender waits and sends again.
                    loop {
                        match mail.send("sink", json!({ "t": t })).await {
                            Err(e) if e.retryable => {
                                tokio::time::sleep(Duration::from_millis(2)).await
                            }
                            sent => break sent,
                        }
                    }
                }
            })
            .buffer_unordered(in_flight)
            .filter_map(|sent| std::future::ready(sent.err()))
            .next()
            .await;
        match refused {
            None => Ok(json!({ "sent": count })),
            Some(e) => Err(mesh_agent_sdk::AgentError::fatal(&e.code, e.message)),
        }
    }
}

/// messages: `sink` takes messages on one node; the blasters send from another. One at a
/// time (one sender, the next sent once the last arrived): the latency from send to handler,
/// p50 and p99. Then 8 senders with 32 sends in flight each: messages per second, from the
/// first send to the last arrival.
pub async fn messages(sizes: &Sizes) -> Result<Vec<Figure>> {
    const SENDERS: usize = 8;
    let cluster = Cluster::with_nodes("", &[]).await?;
    let began = std::time::Instant::now();
    let sink = std::sync::Arc::new(Sink {
        began: Some(began),
        ..Sink::default()
    });
    let receiver = mesh_agent_sdk::NodeRuntime::builder()
        .coordinator(cluster.url.clone())
        .name("sink-node")
        .agent(SinkAgent(sink.clone()))
        .build()?;
    let mut senders = mesh_agent_sdk::NodeRuntime::builder()
        .coordinator(cluster.url.clone())
        .name("blaster-node");
    for i in 0..SENDERS {
        senders = senders.agent(Blaster {
            name: format!("blaster-{i}"),
            began,
        });
    }
    let senders = senders.build()?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut nodes = Vec::new();
    for runtime in [receiver, senders] {
        let mut stopped = stopped.clone();
        nodes.push(tokio::spawn(runtime.run_until(async move {
            let _ = stopped.wait_for(|s| *s).await;
        })));
    }
    cluster.wait_nodes(2).await?;
    let client = cluster.client().await?;
    let send = |skill: String, count: usize, in_flight: usize| {
        goal(
            "bench messages",
            vec![step(
                "b",
                &skill,
                json!({ "count": count, "in_flight": in_flight }),
                &[],
            )],
        )
    };
    // One at a time: each message waits for the one before to arrive.
    client
        .submit_and_wait(send("blaster-0".into(), sizes.warmup, 1))
        .await?;
    let warm = sizes.warmup;
    wait_until("the warm-up messages", Duration::from_secs(60), || {
        let n = sink.latencies.lock().unwrap().len();
        async move { n >= warm }
    })
    .await?;
    sink.latencies.lock().unwrap().clear();
    let bar = progress("one message at a time", sizes.sequential as u64);
    for _ in 0..sizes.sequential {
        let arrived = sink.arrived.notified();
        client.submit(send("blaster-0".into(), 1, 1)).await?;
        tokio::time::timeout(Duration::from_secs(10), arrived)
            .await
            .map_err(|_| anyhow::anyhow!("a message did not arrive within 10 s"))?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let mut one: Vec<Duration> = std::mem::take(&mut *sink.latencies.lock().unwrap());
    one.sort_unstable();
    // Throughput: every sender at once.
    let per_sender = sizes.parallel / SENDERS;
    let total = per_sender * SENDERS;
    let start = std::time::Instant::now();
    for i in 0..SENDERS {
        client
            .submit(send(format!("blaster-{i}"), per_sender, 32))
            .await?;
    }
    wait_until("every message to arrive", Duration::from_secs(300), || {
        let n = sink.latencies.lock().unwrap().len();
        async move { n >= total }
    })
    .await?;
    let took = start.elapsed();
    let mut many: Vec<Duration> = std::mem::take(&mut *sink.latencies.lock().unwrap());
    many.sort_unstable();
    let _ = stop.send(true);
    for node in nodes {
        let _ = node.await;
    }
    let us = |s: &[Duration], p: f64| percentile(s, p).as_secs_f64() * 1e6;
    Ok(vec![
        Figure::new("p50, one at a time", us(&one, 50.0), "µs"),
        Figure::new("p99, one at a time", us(&one, 99.0), "µs"),
        Figure::new(
            "messages/s, 8 senders × 32 in flight",
            total as f64 / took.as_secs_f64(),
            "/s",
        ),
        Figure::new("p50 under that load", us(&many, 50.0), "µs"),
    ])
}
