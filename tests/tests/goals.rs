//! Goals through real processes: a coordinator and a node on loopback.

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;
use mesh_agent_sdk::{RunEvent, RunState, StepState};
use mesh_tests::{Mesh, Timings, goal};
use serde_json::json;

const AGENTS: &str = mesh_tests::ECHO_AND_SLEEP;

#[tokio::test]
async fn five_steps_with_two_parallel_branches_complete_with_the_right_outputs() {
    let mut mesh = Mesh::start(Timings::default()).await;
    mesh.start_node("n1", AGENTS).await;
    let client = mesh.client().await;
    //   a ─┬─ b ─ d ─┐
    //      └─ c ─────┴─ e
    let g = goal(
        "five steps",
        &[
            ("a", "echo", json!({ "n": 1 }), &[]),
            ("b", "sleep", json!({ "ms": 400 }), &["a"]),
            ("c", "sleep", json!({ "ms": 400 }), &["a"]),
            ("d", "echo", json!({ "n": 4 }), &["b"]),
            ("e", "echo", json!({ "n": 5 }), &["c", "d"]),
        ],
    );
    let run = client.submit(g).await.unwrap();
    assert!(run.created);

    // Follow the run: b and c must be running at the same time.
    let mut events = Box::pin(client.watch(&run.run_id).await.unwrap());
    let mut running = HashSet::new();
    let mut overlapped = false;
    let mut progress = HashSet::new();
    let finished = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(event) = events.next().await {
            match event.unwrap() {
                RunEvent::Step(s) => {
                    match s.state {
                        StepState::Running => running.insert(s.id.0.clone()),
                        _ => running.remove(s.id.as_str()),
                    };
                    overlapped |= running.contains("b") && running.contains("c");
                }
                RunEvent::Progress { step, fraction, .. } => {
                    assert_eq!(fraction, Some(0.5), "the sleep agent reports half-way");
                    progress.insert(step.0);
                }
                RunEvent::Finished { state, .. } => return state,
                RunEvent::Delta { step, .. } => {
                    panic!("step {step}: no built-in agent here streams text")
                }
                RunEvent::Snapshot(view) => {
                    running = view
                        .steps
                        .iter()
                        .filter(|s| s.state == StepState::Running)
                        .map(|s| s.id.0.clone())
                        .collect();
                    overlapped |= running.contains("b") && running.contains("c");
                }
            }
        }
        panic!("watch ended without a Finished event");
    })
    .await
    .expect("run finished in time");
    assert_eq!(finished, RunState::Succeeded);
    assert!(overlapped, "the branches b and c ran in parallel");
    assert_eq!(
        progress,
        HashSet::from(["b".to_owned(), "c".to_owned()]),
        "watchers see the sleeps' progress"
    );

    let view = client.get_run(&run.run_id).await.unwrap();
    assert_eq!(view.state, RunState::Succeeded);
    assert!(
        view.steps
            .iter()
            .all(|s| s.state == StepState::Succeeded && s.attempt == 1)
    );
    // The run's output is the output of its only final step, e; e saw the outputs of c and d.
    let out = view.output.expect("run output");
    let e = &out["e"];
    assert_eq!(out.as_object().unwrap().len(), 1, "{out}");
    assert_eq!(e["with"], json!({ "n": 5 }));
    assert_eq!(e["needs"]["c"]["slept_ms"], 400);
    assert_eq!(e["needs"]["d"]["with"], json!({ "n": 4 }));
    assert_eq!(e["needs"]["d"]["needs"]["b"]["slept_ms"], 400);
    // The swarm records the agents it picked for each skill.
    let skills: HashSet<_> = view.swarm.iter().map(|m| m.skill.as_str()).collect();
    assert_eq!(skills, HashSet::from(["echo", "sleep"]));
    assert!(view.swarm.iter().all(|m| m.agent.node.as_str() == "n1"));
}

#[tokio::test]
async fn an_idempotency_key_returns_the_existing_run_and_runs_list_in_pages() {
    let mut mesh = Mesh::start(Timings::default()).await;
    mesh.start_node("n1", AGENTS).await;
    let client = mesh.client().await;
    let mut g = goal("keyed", &[("a", "echo", json!({}), &[])]);
    g.idempotency_key = Some("order-42".into());
    let first = client.submit(g.clone()).await.unwrap();
    let again = client.submit(g).await.unwrap();
    assert!(first.created);
    assert!(!again.created);
    assert_eq!(first.run_id, again.run_id);

    for i in 0..4 {
        client
            .submit(goal(&format!("g{i}"), &[("a", "echo", json!({}), &[])]))
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut token = None;
    loop {
        let page = client.list_runs(None, 2, token).await.unwrap();
        assert!(page.runs.len() <= 2);
        seen.extend(page.runs.into_iter().map(|r| r.run_id));
        token = page.next_page_token;
        if token.is_none() {
            break;
        }
    }
    assert_eq!(seen.len(), 5, "every run listed once");
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 5);
    let view = client.wait(&first.run_id).await.unwrap();
    assert_eq!(view.state, RunState::Succeeded);
    let done = client
        .list_runs(Some(RunState::Succeeded), 100, None)
        .await
        .unwrap();
    assert!(done.runs.iter().any(|r| r.run_id == first.run_id));
}

#[tokio::test]
async fn a_step_no_agent_can_take_fails_after_the_unschedulable_timeout() {
    let timings = Timings {
        unschedulable_ms: 500,
        ..Timings::default()
    };
    let mut mesh = Mesh::start(timings).await;
    mesh.start_node("n1", AGENTS).await;
    let client = mesh.client().await;
    let run = client
        .submit(goal(
            "no such skill",
            &[
                ("a", "echo", json!({}), &[]),
                ("t", "translate", json!({}), &["a"]),
            ],
        ))
        .await
        .unwrap();
    let view = tokio::time::timeout(Duration::from_secs(20), client.wait(&run.run_id))
        .await
        .expect("run finished in time")
        .unwrap();
    assert_eq!(view.state, RunState::Failed);
    let error = view.error.unwrap();
    assert!(
        error.contains("`translate`"),
        "the reason names the skill: {error}"
    );
    assert_eq!(view.steps[0].state, StepState::Succeeded);
    assert_eq!(view.steps[1].state, StepState::Failed);
}

#[tokio::test]
async fn cancelling_a_run_cancels_its_attempt_on_the_node() {
    let mut mesh = Mesh::start(Timings::default()).await;
    mesh.start_node("n1", AGENTS).await;
    let client = mesh.client().await;
    let run = client
        .submit(goal(
            "long",
            &[
                ("s", "sleep", json!({ "ms": 60000 }), &[]),
                ("after", "echo", json!({}), &["s"]),
            ],
        ))
        .await
        .unwrap();
    mesh_tests::wait_assigned(&client, &run.run_id).await;
    let view = client
        .cancel_run(&run.run_id, "no longer needed")
        .await
        .unwrap();
    assert_eq!(view.state, RunState::Cancelled);
    assert_eq!(view.steps[0].state, StepState::Cancelled);
    assert_eq!(view.steps[1].state, StepState::Skipped);
    // The node's sleep sees the cancellation and frees its slot.
    mesh_tests::wait_for(
        "n1 to have nothing in flight",
        Duration::from_secs(10),
        || async {
            let n = mesh.node_view("n1").await?;
            (n.in_flight == 0).then_some(())
        },
    )
    .await;
    let err = client.cancel_run(&run.run_id, "again").await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(mesh_agent_sdk::RpcCode::FailedPrecondition),
        "{err}"
    );
}

#[tokio::test]
async fn a_hundred_concurrent_submissions_with_one_key_create_exactly_one_run() {
    let mut mesh = Mesh::start(Timings::default()).await;
    mesh.start_node("n1", AGENTS).await;
    let client = mesh.client().await;
    let mut g = goal("once", &[("a", "echo", json!({}), &[])]);
    g.idempotency_key = Some("pay-invoice-7".into());
    let calls: Vec<_> = (0..100)
        .map(|_| {
            let (client, g) = (client.clone(), g.clone());
            tokio::spawn(async move { client.submit(g).await.unwrap() })
        })
        .collect();
    let mut runs = HashSet::new();
    let mut created = 0;
    for call in calls {
        let r = call.await.unwrap();
        created += usize::from(r.created);
        runs.insert(r.run_id);
    }
    assert_eq!(created, 1, "exactly one call created the run");
    assert_eq!(runs.len(), 1, "every caller got the same run");
    let run = runs.into_iter().next().unwrap();
    assert_eq!(client.wait(&run).await.unwrap().state, RunState::Succeeded);
    let all = client.list_runs(None, 1000, None).await.unwrap();
    assert_eq!(all.runs.len(), 1, "nothing else was stored");
    let executed: u32 = mesh.executions("n1").values().sum();
    assert_eq!(executed, 1, "the step ran once");
}

#[tokio::test]
async fn past_max_active_runs_a_submission_is_refused_with_a_retry_hint() {
    let timings = Timings {
        max_active_runs: 3,
        ..Timings::default()
    };
    let mut mesh = Mesh::start(timings).await;
    mesh.start_node("n1", AGENTS).await;
    let client = mesh.client().await;
    let long = || goal("long", &[("s", "sleep", json!({ "ms": 60000 }), &[])]);
    let mut runs = Vec::new();
    for _ in 0..3 {
        runs.push(client.submit(long()).await.unwrap().run_id);
    }
    let err = client.submit(long()).await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(mesh_agent_sdk::RpcCode::ResourceExhausted),
        "{err}"
    );
    assert!(err.to_string().contains("max_active_runs"), "{err}");
    // Raw gRPC clients get the hint as metadata too.
    let channel = tonic::transport::Channel::from_shared(mesh.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut raw = mesh_proto::pb::goal_service_client::GoalServiceClient::new(channel);
    let status = raw
        .submit_goal(mesh_proto::pb::SubmitGoalRequest::from(long()))
        .await
        .unwrap_err();
    assert_eq!(status.metadata().get("retry-after-ms").unwrap(), "1000");
    assert_eq!(
        client.list_runs(None, 100, None).await.unwrap().runs.len(),
        3,
        "nothing refused was stored"
    );
    // Room again once a run ends.
    client.cancel_run(&runs[0], "make room").await.unwrap();
    mesh_tests::wait_for("a slot to free", Duration::from_secs(10), || async {
        client.submit(long()).await.ok().map(|_| ())
    })
    .await;
}

#[tokio::test]
async fn past_max_pending_per_skill_goals_for_that_skill_are_refused_and_others_accepted() {
    let timings = Timings {
        max_pending_per_skill: 2,
        unschedulable_ms: 30_000,
        ..Timings::default()
    };
    let mut mesh = Mesh::start(timings).await;
    mesh.start_node("n1", AGENTS).await;
    let client = mesh.client().await;
    // Nobody has `translate`: its steps wait in its queue.
    let waiting = || goal("waits", &[("t", "translate", json!({}), &[])]);
    for _ in 0..2 {
        client.submit(waiting()).await.unwrap();
    }
    mesh_tests::wait_for("two steps queued", Duration::from_secs(10), || async {
        (mesh.metric("mesh_dispatch_pending_steps") >= 2.0).then_some(())
    })
    .await;
    let err = client.submit(waiting()).await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(mesh_agent_sdk::RpcCode::ResourceExhausted),
        "{err}"
    );
    assert!(
        err.to_string().contains(
            "2 steps already wait for an agent with skill `translate` (max_pending_per_skill is 2)"
        ),
        "{err}"
    );
    // Other skills are not held up by a full queue.
    let run = client
        .submit(goal("echoes", &[("e", "echo", json!({}), &[])]))
        .await
        .unwrap();
    assert_eq!(
        client.wait(&run.run_id).await.unwrap().state,
        RunState::Succeeded
    );
    assert_eq!(
        client.list_runs(None, 100, None).await.unwrap().runs.len(),
        3,
        "nothing refused was stored"
    );
}

/// An SDK node in this process hosting `agent`; send on the first to stop it, then await
/// the second.
fn sdk_node(
    mesh: &Mesh,
    name: &str,
    agent: impl mesh_agent_sdk::Agent,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), mesh_agent_sdk::Error>>,
) {
    let node = mesh_agent_sdk::NodeRuntime::builder()
        .coordinator(mesh.url())
        .name(name)
        .agent(agent)
        .build()
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(node.run_until(async move {
        let _ = stopped.await;
    }));
    (stop, running)
}

/// The agents with `skill`, once at least one has registered.
async fn registered(
    client: &mesh_agent_sdk::GoalClient,
    skill: &str,
) -> Vec<mesh_agent_sdk::AgentView> {
    mesh_tests::wait_for("the agent to register", Duration::from_secs(10), || {
        let client = client.clone();
        async move {
            let agents = client.agents(Some(skill)).await.ok()?;
            (!agents.is_empty()).then_some(agents)
        }
    })
    .await
}

struct Described;

impl mesh_agent_sdk::Agent for Described {
    fn card(&self) -> mesh_agent_sdk::AgentCard {
        mesh_agent_sdk::AgentCard::new("described")
            .description("answers in French")
            .label("lang", "fr")
            .skill_spec(mesh_agent_sdk::SkillSpec {
                name: "translate".into(),
                description: "English to French".into(),
                input_schema: Some(json!({ "type": "object", "required": ["with"] })),
                output_schema: Some(json!({ "type": "string" })),
            })
    }

    async fn handle(
        &self,
        _ctx: mesh_agent_sdk::Context,
        _input: serde_json::Value,
    ) -> Result<serde_json::Value, mesh_agent_sdk::AgentError> {
        Ok(json!("bonjour"))
    }
}

/// Before: ListAgents dropped what a card says beyond skill names. After: descriptions,
/// skill schemas and labels come back, and `mesh agents --output json` shows them.
#[tokio::test]
async fn agents_are_listed_with_their_card() {
    let mesh = Mesh::start(Timings::default()).await;
    let (stop, running) = sdk_node(&mesh, "card-node", Described);
    let client = mesh.client().await;
    let agents = registered(&client, "translate").await;
    let a = &agents[0];
    assert_eq!(a.description, "answers in French");
    assert_eq!(a.labels.get("lang").map(String::as_str), Some("fr"));
    assert_eq!(a.skill_specs[0].description, "English to French");
    assert_eq!(
        a.skill_specs[0].input_schema,
        Some(json!({ "type": "object", "required": ["with"] }))
    );
    let out = std::process::Command::new(mesh_tests::mesh_bin())
        .args(["--coordinator", &mesh.url(), "--output", "json", "agents"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed[0]["description"], "answers in French");
    assert_eq!(
        listed[0]["skill_specs"][0]["output_schema"],
        json!({ "type": "string" })
    );
    let _ = stop.send(());
    running.await.unwrap().unwrap();
}

static STRICT_CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

struct Strict;

impl mesh_agent_sdk::Agent for Strict {
    fn card(&self) -> mesh_agent_sdk::AgentCard {
        mesh_agent_sdk::AgentCard::new("strict").skill_spec(mesh_agent_sdk::SkillSpec {
            name: "strict".into(),
            description: "answers with.answer".into(),
            input_schema: Some(json!({
                "type": "object",
                "properties": { "with": { "type": "object", "required": ["text"],
                    "properties": { "text": { "type": "string" } } } },
            })),
            output_schema: Some(json!({ "type": "string" })),
        })
    }

    async fn handle(
        &self,
        _ctx: mesh_agent_sdk::Context,
        input: serde_json::Value,
    ) -> Result<serde_json::Value, mesh_agent_sdk::AgentError> {
        STRICT_CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(input["with"]["answer"].clone())
    }
}

/// Before: skill schemas travelled and nothing checked them. After: an input that does not
/// match is refused before dispatch, and an output that does not match fails its attempt;
/// neither is retried, and both name the path.
#[tokio::test]
async fn skill_schemas_are_checked_before_dispatch_and_on_results() {
    let mesh = Mesh::start(Timings::default()).await;
    let (stop, running) = sdk_node(&mesh, "strict-node", Strict);
    let client = mesh.client().await;
    registered(&client, "strict").await;
    let run = |with: serde_json::Value| {
        let client = client.clone();
        async move {
            let run = client
                .submit(goal("strict", &[("a", "strict", with, &[])]))
                .await
                .unwrap();
            tokio::time::timeout(Duration::from_secs(20), client.wait(&run.run_id))
                .await
                .unwrap()
                .unwrap()
        }
    };
    let view = run(json!({ "text": 7, "answer": "x" })).await;
    assert_eq!(view.state, RunState::Failed);
    let error = view.steps[0].error.clone().unwrap_or_default();
    assert!(
        error.contains("bad_input") && error.contains("input.with.text"),
        "{error}"
    );
    assert_eq!(
        STRICT_CALLS.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "never sent"
    );

    let view = run(json!({ "text": "hi", "answer": { "not": "a string" } })).await;
    assert_eq!(view.state, RunState::Failed);
    let error = view.steps[0].error.clone().unwrap_or_default();
    assert!(
        error.contains("bad_output") && error.contains("output schema"),
        "{error}"
    );
    assert_eq!(view.steps[0].attempt, 1, "not retried");

    let view = run(json!({ "text": "hi", "answer": "salut" })).await;
    assert_eq!(view.state, RunState::Succeeded, "{:?}", view.error);
    let _ = stop.send(());
    running.await.unwrap().unwrap();
}

/// Panics on every attempt, counting them.
struct Boom(std::sync::Arc<std::sync::atomic::AtomicU32>);

impl mesh_agent_sdk::Agent for Boom {
    fn card(&self) -> mesh_agent_sdk::AgentCard {
        mesh_agent_sdk::AgentCard::new("boom").skill("work")
    }

    async fn handle(
        &self,
        _ctx: mesh_agent_sdk::Context,
        _input: serde_json::Value,
    ) -> Result<serde_json::Value, mesh_agent_sdk::AgentError> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        panic!("boom");
    }
}

struct Steady;

impl mesh_agent_sdk::Agent for Steady {
    fn card(&self) -> mesh_agent_sdk::AgentCard {
        mesh_agent_sdk::AgentCard::new("steady").skill("work")
    }

    async fn handle(
        &self,
        _ctx: mesh_agent_sdk::Context,
        _input: serde_json::Value,
    ) -> Result<serde_json::Value, mesh_agent_sdk::AgentError> {
        Ok(json!({ "by": "steady" }))
    }
}

/// Supervision on the node: an agent that keeps panicking is restarted by its node within
/// its budget (one restart here); past it the node reports it down, the coordinator stops
/// offering it work, and the step's next attempt goes to another agent with the skill.
#[tokio::test]
async fn an_agent_past_its_restart_budget_is_reported_down_and_its_work_goes_elsewhere() {
    let mesh = Mesh::start(Timings::default()).await;
    let client = mesh.client().await;
    let panics = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let config = mesh_agent_sdk::RuntimeConfig {
        coordinator: mesh.url(),
        name: "fragile".into(),
        restart_budget: 1,
        restart_window: Duration::from_secs(60),
        ..Default::default()
    };
    let fragile = mesh_agent_sdk::NodeRuntime::builder()
        .config(config)
        .agent(Boom(panics.clone()))
        .build()
        .unwrap();
    let (stop_fragile, stopped) = tokio::sync::oneshot::channel::<()>();
    let fragile = tokio::spawn(fragile.run_until(async move {
        let _ = stopped.await;
    }));
    registered(&client, "work").await;
    let text = "steps:\n  - id: crash\n    uses: work\n    retry: { max_attempts: 10, backoff: 100ms, max_backoff: 200ms }\n";
    let run = client
        .submit(mesh_tests::workflow_goal(text, json!({})))
        .await
        .unwrap();
    // Two panics: the first is restarted, the second is past the budget.
    mesh_tests::wait_for(
        "the agent to be reported down",
        Duration::from_secs(20),
        || {
            let client = client.clone();
            async move {
                let agents = client.agents(Some("work")).await.ok()?;
                agents.is_empty().then_some(())
            }
        },
    )
    .await;
    assert_eq!(panics.load(std::sync::atomic::Ordering::SeqCst), 2);
    let view = client.get_run(&run.run_id).await.unwrap();
    assert_eq!(view.state, RunState::Running, "the step waits for an agent");
    // Another agent with the skill takes the step's next attempt.
    let (stop_steady, steady) = sdk_node(&mesh, "steady-node", Steady);
    let done = tokio::time::timeout(Duration::from_secs(20), client.wait(&run.run_id))
        .await
        .expect("the run finishes once another agent is there")
        .unwrap();
    assert_eq!(done.state, RunState::Succeeded, "{done:?}");
    assert_eq!(done.output, Some(json!({ "crash": { "by": "steady" } })));
    assert_eq!(
        panics.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "nothing more was sent to the agent that is down"
    );
    for (stop, node) in [(stop_fragile, fragile), (stop_steady, steady)] {
        let _ = stop.send(());
        node.await.unwrap().unwrap();
    }
}
