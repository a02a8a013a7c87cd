//! Workflows through real processes: every file of `examples/workflows/` on a coordinator
//! and a node with the built-in agents, approvals and signals sent with the `mesh` CLI, bad
//! definitions refused with their paths, and a coordinator killed with `kill -9` in the
//! middle of a loop, a fan-out and an approval wait.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use mesh_agent_sdk::{
    ClientError, GoalClient, GoalSpec, RpcCode, RunId, RunState, RunView, StepState,
};
use mesh_tests::{Mesh, Timings, mesh_bin, wait_for, workflow_goal};
use serde_json::{Value, json};

const AGENTS: &str = r#"
[[agents]]
kind = "echo"
max_concurrency = 16
[[agents]]
kind = "sleep"
max_concurrency = 16
[[agents]]
kind = "flaky"
max_concurrency = 4
"#;

fn example_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/workflows")
        .join(name)
}

fn example(name: &str) -> String {
    let path = example_path(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

async fn run_to_end(client: &GoalClient, text: &str, inputs: Value) -> RunView {
    let run = client.submit(workflow_goal(text, inputs)).await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), client.wait(&run.run_id))
        .await
        .expect("the run finishes within 30 s")
        .unwrap()
}

fn step<'a>(view: &'a RunView, id: &str) -> &'a mesh_agent_sdk::StepView {
    view.steps.iter().find(|s| s.id.as_str() == id).unwrap()
}

async fn wait_step(client: &GoalClient, run: &RunId, id: &str, state: StepState) -> RunView {
    wait_for(
        &format!("step {id} {state}"),
        Duration::from_secs(20),
        || async {
            let view = client.get_run(run).await.ok()?;
            (step(&view, id).state == state).then_some(view)
        },
    )
    .await
}

/// Runs the `mesh` CLI against the mesh; returns its stdout.
fn cli(mesh: &Mesh, args: &[&str]) -> String {
    let out = Command::new(mesh_bin())
        .args(["--coordinator", &mesh.url()])
        .args(args)
        .output()
        .expect("run mesh");
    assert!(
        out.status.success(),
        "mesh {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn every_example_workflow_runs_with_the_built_in_agents() {
    let mut mesh = Mesh::start(Timings::default()).await;
    mesh.start_node("n1", AGENTS).await;
    let client = mesh.client().await;

    let view = run_to_end(&client, &example("review-loop.yaml"), json!({})).await;
    assert_eq!(view.state, RunState::Succeeded, "{:?}", view.error);
    let out = view.output.clone().unwrap();
    assert_eq!(
        out["rounds"],
        json!(3),
        "0.3, 0.6, 0.9: three rounds to pass 0.8"
    );
    assert!(out["score"].as_f64().unwrap() > 0.8);
    assert_eq!(step(&view, "review").iteration, 3);

    let view = run_to_end(&client, &example("research-fanout.yaml"), json!({})).await;
    assert_eq!(view.state, RunState::Succeeded, "{:?}", view.error);
    assert_eq!(
        view.output.clone().unwrap()["summary"],
        json!({ "count": 4, "topics": ["actors", "leases", "fencing tokens", "group commit"] }),
        "results are gathered in the order of the items"
    );
    let research = step(&view, "research");
    assert_eq!((research.items_done, research.items_total), (4, 4));

    let view = run_to_end(
        &client,
        &example("classify-branch.yaml"),
        json!({ "text": "a refund please" }),
    )
    .await;
    assert_eq!(view.output.clone().unwrap()["routed_to"], json!("billing"));
    assert_eq!(step(&view, "general").state, StepState::Skipped);
    let view = run_to_end(
        &client,
        &example("classify-branch.yaml"),
        json!({ "text": "hello" }),
    )
    .await;
    assert_eq!(view.output.clone().unwrap()["routed_to"], json!("general"));
    assert_eq!(step(&view, "billing").state, StepState::Skipped);

    let view = run_to_end(&client, &example("flaky-retries.yaml"), json!({})).await;
    assert_eq!(view.state, RunState::Succeeded, "{:?}", view.error);
    assert_eq!(
        step(&view, "call-model").attempt,
        2,
        "one retry after the failure"
    );
    assert_eq!(step(&view, "optional-enrichment").state, StepState::Failed);
    assert_eq!(
        step(&view, "report").output.as_ref().unwrap()["with"],
        json!({ "attempts": 2, "enrichment": "failed" })
    );

    // A sub-workflow fanned out: registered first, each element a child run.
    let child = example_path("draft-and-review.yaml");
    cli(&mesh, &["workflow", "register", child.to_str().unwrap()]);
    let view = run_to_end(&client, &example("sub-workflow-fanout.yaml"), json!({})).await;
    assert_eq!(view.state, RunState::Succeeded, "{:?}", view.error);
    assert_eq!(
        view.output.clone().unwrap()["report"],
        json!({
            "texts": ["About intro", "About design", "About results", "About outlook"],
            "all_ok": true
        })
    );
    assert_eq!(step(&view, "report").agent.as_ref().unwrap().agent, "echo");
    let children = client
        .list_runs(None, 50, None)
        .await
        .unwrap()
        .runs
        .into_iter()
        .filter(|r| r.objective.contains(view.run_id.as_str()))
        .count();
    assert_eq!(children, 4, "one child run per section");

    // An approval, given with the CLI.
    let run = client
        .submit(workflow_goal(&example("approval-gate.yaml"), json!({})))
        .await
        .unwrap();
    let view = wait_step(
        &client,
        &run.run_id,
        "sign-off",
        StepState::AwaitingApproval,
    )
    .await;
    assert_eq!(
        step(&view, "sign-off").detail.as_deref(),
        Some("Publish 'Release notes'?")
    );
    assert_eq!(step(&view, "publish").state, StepState::Pending);
    cli(
        &mesh,
        &[
            "run",
            "approve",
            run.run_id.as_str(),
            "sign-off",
            "--comment",
            "ship it",
            "--by",
            "tester",
        ],
    );
    let view = client.wait(&run.run_id).await.unwrap();
    assert_eq!(view.state, RunState::Succeeded);
    assert_eq!(
        step(&view, "publish").output.as_ref().unwrap()["with"],
        json!({ "approved_by": "tester" })
    );

    // A rejection fails the run and says who and why.
    let run = client
        .submit(workflow_goal(&example("approval-gate.yaml"), json!({})))
        .await
        .unwrap();
    wait_step(
        &client,
        &run.run_id,
        "sign-off",
        StepState::AwaitingApproval,
    )
    .await;
    cli(
        &mesh,
        &[
            "run",
            "reject",
            run.run_id.as_str(),
            "sign-off",
            "--comment",
            "not yet",
            "--by",
            "qa",
        ],
    );
    let view = client.wait(&run.run_id).await.unwrap();
    assert_eq!(view.state, RunState::Failed);
    assert!(view.error.unwrap().contains("rejected by qa: not yet"));

    // A signal, sent with the CLI.
    let run = client
        .submit(workflow_goal(&example("wait-for-signal.yaml"), json!({})))
        .await
        .unwrap();
    wait_step(&client, &run.run_id, "wait", StepState::Waiting).await;
    cli(
        &mesh,
        &[
            "run",
            "signal",
            run.run_id.as_str(),
            "go",
            "--payload",
            r#"{"ticket": 7}"#,
        ],
    );
    let view = client.wait(&run.run_id).await.unwrap();
    assert_eq!(view.state, RunState::Succeeded);
    assert_eq!(
        step(&view, "finish").output.as_ref().unwrap()["with"],
        json!({ "ticket": 7 })
    );
    // A finished run takes no more signals.
    let err = client
        .signal(&run.run_id, "go", &json!(1))
        .await
        .unwrap_err();
    assert!(err.code() == Some(RpcCode::FailedPrecondition), "{err}");
}

#[tokio::test]
async fn invalid_workflows_are_refused_with_the_path_of_each_problem() {
    let mesh = Mesh::start(Timings::default()).await;
    let client = mesh.client().await;
    let cases = [
        (
            "steps:\n  - {id: a, uses: echo, loop: {until: 'true'}}\n",
            "steps[0].loop.max_iterations: required",
        ),
        (
            "steps:\n  - {id: a, uses: echo, with: {q: '${{ steps.nope.output }}'}}\n",
            "steps[0]: `steps.nope` names no step",
        ),
        (
            "steps:\n  - {id: a, uses: echo, timeout: forever}\n",
            "steps[0].timeout",
        ),
        (
            "inputs: {n: integer}\nsteps:\n  - {id: a, uses: echo}\n",
            "inputs.n: required",
        ),
    ];
    for (text, want) in cases {
        let err = client
            .submit(workflow_goal(text, json!({})))
            .await
            .unwrap_err();
        match &err {
            ClientError::Rpc { code, message } => {
                assert_eq!(*code, RpcCode::InvalidArgument, "{text}");
                assert!(message.contains(want), "{text}: {message}");
            }
            other => panic!("{text}: {other}"),
        }
    }
    // Nothing was stored.
    assert!(
        client
            .list_runs(None, 10, None)
            .await
            .unwrap()
            .runs
            .is_empty()
    );
    // Deciding a step that does not await approval says so.
    let run = client
        .submit(workflow_goal(
            "steps:\n  - {id: a, uses: nobody-has-this}\n",
            json!({}),
        ))
        .await
        .unwrap();
    let err = client
        .decide(&run.run_id, "a", true, "", "")
        .await
        .unwrap_err();
    match &err {
        ClientError::Rpc { code, message } => {
            assert_eq!(*code, RpcCode::FailedPrecondition);
            assert!(message.contains("does not await approval"), "{message}");
        }
        other => panic!("{other}"),
    }
}

#[tokio::test]
async fn a_coordinator_killed_mid_loop_mid_fan_out_and_mid_approval_resumes_without_rerunning_done_work()
 {
    let mut mesh = Mesh::start(Timings::default()).await;
    mesh.start_node("n1", AGENTS).await;
    let client = mesh.client().await;
    let text = r#"
steps:
  - id: gate
    approval: { message: "go on?", timeout: 1h }
  - id: fan
    uses: sleep
    foreach: "${{ [0, 1, 2, 3, 4, 5, 6, 7] }}"
    parallel: 2
    with: { ms: 300, item: "${{ item }}" }
  - id: loop
    uses: sleep
    with: { ms: 300, round: "${{ iteration }}" }
    loop: { until: "${{ output.with.round >= 5 }}", max_iterations: 10 }
  - id: after
    uses: echo
    needs: [gate, fan, loop]
"#;
    let run = client
        .submit(workflow_goal(text, json!({})))
        .await
        .unwrap()
        .run_id;
    // Kill the coordinator once some of the fan-out and some iterations are done.
    let before = wait_for("some work done", Duration::from_secs(20), || async {
        let view = client.get_run(&run).await.ok()?;
        let (fan, lp) = (step(&view, "fan"), step(&view, "loop"));
        (fan.items_done >= 2 && lp.iteration >= 2).then_some(view)
    })
    .await;
    assert_eq!(step(&before, "gate").state, StepState::AwaitingApproval);
    mesh.coordinator.as_mut().unwrap().kill9();
    mesh.start_coordinator().await;
    let client = mesh.client().await;
    let view = wait_step(&client, &run, "gate", StepState::AwaitingApproval).await;
    assert_eq!(
        view.state,
        RunState::Running,
        "still waiting for its approval"
    );
    client
        .decide(&run, "gate", true, "after the restart", "ops")
        .await
        .unwrap();
    let view = tokio::time::timeout(Duration::from_secs(30), client.wait(&run))
        .await
        .expect("finishes")
        .unwrap();
    assert_eq!(view.state, RunState::Succeeded, "{:?}", view.error);
    assert_eq!(step(&view, "loop").iteration, 6);
    assert_eq!(
        step(&view, "fan")
            .output
            .as_ref()
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        8
    );

    // Exactly one accepted result per task; every task that had finished before the kill
    // ran exactly once.
    let accepted = mesh.accepted_tasks();
    let executions = mesh.task_executions("n1");
    for k in 0..8u32 {
        let key = (run.0.clone(), "fan".to_owned(), k);
        assert_eq!(accepted.get(&key), Some(&1), "fan[{k}]");
    }
    for k in 0..6u32 {
        let key = (run.0.clone(), "loop".to_owned(), k);
        assert_eq!(accepted.get(&key), Some(&1), "loop[{k}]");
    }
    // The loop's iterations before the last one seen had finished; fan-out tasks that
    // had finished are never run again, so at most the two in flight ran twice.
    let loop_done = step(&before, "loop").iteration - 1;
    for k in 0..loop_done {
        let key = (run.0.clone(), "loop".to_owned(), k);
        assert_eq!(
            executions.get(&key),
            Some(&1),
            "loop[{k}] finished before the kill"
        );
    }
    let fan_runs: u32 = executions
        .iter()
        .filter(|((r, s, _), _)| r == &run.0 && s == "fan")
        .map(|(_, n)| n)
        .sum();
    assert!(
        (8..=10).contains(&fan_runs),
        "8 tasks, at most 2 in flight at the kill: {fan_runs} executions"
    );
}

#[tokio::test]
async fn registered_workflows_are_versioned_and_runs_stay_on_their_version() {
    let mut mesh = Mesh::start(Timings::default()).await;
    mesh.start_node("n1", AGENTS).await;
    let client = mesh.client().await;
    let v1 = "name: greet\nversion: 1\nsteps:\n  - {id: hi, uses: echo, with: {v: 1}}\n";
    let v2 = "name: greet\nversion: 2\nsteps:\n  - {id: hi, uses: echo, with: {v: 2}}\n";
    let (w, created) = client.register_workflow(v1).await.unwrap();
    assert!(created);
    assert_eq!((w.name.as_str(), w.version, w.steps), ("greet", 1, 1));
    // The same content again is fine; other content under a taken version is not.
    assert!(!client.register_workflow(v1).await.unwrap().1);
    let err = client
        .register_workflow(&v1.replace("{v: 1}", "{v: 9}"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(RpcCode::AlreadyExists), "{err}");
    let err = client
        .register_workflow("steps:\n  - {id: a, uses: echo}\n")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("definition.name"), "{err}");

    // A run of `greet` (newest, 1 at the time) stays on version 1 after version 2 arrives.
    let mut goal = workflow_goal("", json!({}));
    goal.workflow = None;
    goal.workflow_ref = Some("greet".into());
    let first = client.submit(goal.clone()).await.unwrap();
    client.register_workflow(v2).await.unwrap();
    let second = client.submit(goal).await.unwrap();
    let out = |v: RunView| step(&v, "hi").output.clone().unwrap()["with"]["v"].clone();
    assert_eq!(out(client.wait(&first.run_id).await.unwrap()), json!(1));
    assert_eq!(out(client.wait(&second.run_id).await.unwrap()), json!(2));

    // Read and list, with the CLI too.
    assert_eq!(
        client
            .get_workflow("greet", Some(1))
            .await
            .unwrap()
            .definition,
        v1
    );
    assert_eq!(client.get_workflow("greet", None).await.unwrap().version, 2);
    let err = client.get_workflow("greet", Some(7)).await.unwrap_err();
    assert_eq!(err.code(), Some(RpcCode::NotFound));
    let (page, next) = client.list_workflows(None, 1, None).await.unwrap();
    assert_eq!((page[0].version, next.as_deref()), (2, Some("greet@2")));
    let (page, next) = client.list_workflows(None, 1, next).await.unwrap();
    assert_eq!((page[0].version, next), (1, None));
    let listed = cli(&mesh, &["workflow", "ls"]);
    assert!(
        listed.contains("greet") && listed.lines().count() == 3,
        "{listed}"
    );
    let problems = client
        .validate_workflow("steps:\n  - {id: a, uses: x, loop: {until: 'true'}}\n")
        .await
        .unwrap();
    assert_eq!(problems[0].path, "steps[0].loop.max_iterations");
    // An unknown workflow is named in the error.
    let mut unknown = workflow_goal("", json!({}));
    unknown.workflow = None;
    unknown.workflow_ref = Some("nope@1".into());
    let err = client.submit(unknown).await.unwrap_err();
    assert!(
        err.to_string().contains("`nope@1` is not registered"),
        "{err}"
    );
}

#[tokio::test]
async fn a_text_goal_is_planned_by_the_planner_agent_or_refused_without_one() {
    let mut mesh = Mesh::start(Timings::default()).await;
    mesh.start_node("n1", AGENTS).await;
    let client = mesh.client().await;
    let text_goal = |objective: &str| GoalSpec {
        objective: objective.to_owned(),
        inputs: json!({}),
        steps: Vec::new(),
        workflow: None,
        workflow_ref: None,
        idempotency_key: None,
        budget: None,
        namespace: Default::default(),
    };
    let err = client
        .submit(text_goal("compare a and b"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(RpcCode::FailedPrecondition));
    assert!(err.to_string().contains("`plan` skill"), "{err}");

    let url = mesh.url();
    let _planner = mesh_tests::Proc::spawn(
        &mesh_tests::example_bin("planner"),
        "planner",
        mesh.dir.path(),
        &[],
        &[
            ("MESH_COORDINATOR", &url),
            ("MESH_NODE_NAME", "planner-node"),
        ],
    )
    .expect("spawn the planner");
    mesh.wait_healthy("planner-node").await;
    let run = client
        .submit(text_goal("compare actors, leases and fencing tokens"))
        .await
        .unwrap();
    let view = tokio::time::timeout(Duration::from_secs(30), client.wait(&run.run_id))
        .await
        .expect("finishes")
        .unwrap();
    assert_eq!(view.state, RunState::Succeeded, "{:?}", view.error);
    let ids: Vec<&str> = view.steps.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(
        ids,
        ["planner", "research", "summary"],
        "the plan is recorded with the run"
    );
    assert_eq!(
        view.output.unwrap()["summary"],
        json!({ "topics": ["actors", "leases", "fencing tokens"] })
    );
}

#[tokio::test]
async fn parked_steps_wait_for_an_operator_and_failed_runs_retry_from_a_step() {
    let mut mesh = Mesh::start(Timings::default()).await;
    mesh.start_node("n1", AGENTS).await;
    let client = mesh.client().await;
    // `flaky` fails the first attempt of each task; with one attempt allowed it fails once.
    let parked = r#"
steps:
  - { id: fetch, uses: echo, with: { n: 1 } }
  - { id: call, uses: flaky, needs: [fetch], retry: { max_attempts: 1 }, on_failure: park }
  - { id: report, uses: echo, needs: [call] }
"#;
    let run = client
        .submit(workflow_goal(parked, json!({})))
        .await
        .unwrap()
        .run_id;
    let view = wait_step(&client, &run, "call", StepState::Parked).await;
    assert_eq!(view.state, RunState::Running);
    assert_eq!(step(&view, "report").state, StepState::Pending);
    cli(&mesh, &["run", "retry", run.as_str(), "--from", "call"]);
    let view = client.wait(&run).await.unwrap();
    assert_eq!(view.state, RunState::Succeeded, "{:?}", view.error);
    assert_eq!(step(&view, "call").attempt, 2);

    // Skip instead of retry.
    let run = client
        .submit(workflow_goal(parked, json!({})))
        .await
        .unwrap()
        .run_id;
    wait_step(&client, &run, "call", StepState::Parked).await;
    cli(
        &mesh,
        &[
            "run",
            "skip",
            run.as_str(),
            "call",
            "--comment",
            "not needed",
        ],
    );
    let view = client.wait(&run).await.unwrap();
    assert_eq!(view.state, RunState::Succeeded);
    assert_eq!(step(&view, "call").state, StepState::Skipped);

    // A failed run retried from its failed step: fetch is not run again.
    let failing = parked.replace(", on_failure: park", "");
    let run = client
        .submit(workflow_goal(&failing, json!({})))
        .await
        .unwrap()
        .run_id;
    let view = client.wait(&run).await.unwrap();
    assert_eq!(view.state, RunState::Failed);
    let view = client.retry_run(&run, "call").await.unwrap();
    assert_eq!(view.state, RunState::Running);
    let view = tokio::time::timeout(Duration::from_secs(20), client.wait(&run))
        .await
        .expect("finishes")
        .unwrap();
    assert_eq!(view.state, RunState::Succeeded, "{:?}", view.error);
    let fetches = mesh
        .task_executions("n1")
        .iter()
        .filter(|((r, s, _), _)| r == &run.0 && s == "fetch")
        .map(|(_, n)| *n)
        .sum::<u32>();
    assert_eq!(
        fetches, 1,
        "the step before the retried one kept its result"
    );
    let err = client.retry_run(&run, "call").await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(RpcCode::FailedPrecondition),
        "a succeeded run: {err}"
    );
}

/// Before: registration allowed `.` and `:` in names (the wire's rule) while a step's
/// `workflow:` reference refused them (the workflow language's), so `team.review` could be
/// registered and never used. One rule now holds for both.
#[tokio::test]
async fn a_workflow_registered_as_a_dotted_name_runs_as_a_sub_workflow() {
    let mut mesh = Mesh::start(Timings::default()).await;
    mesh.start_node("n1", AGENTS).await;
    let client = mesh.client().await;
    let review = "name: team.review\nversion: 1\ninputs: {doc: string}\nsteps:\n  - {id: check.1, uses: echo, with: {doc: '${{ inputs.doc }}'}}\noutputs: {seen: \"${{ steps['check.1'].output.with.doc }}\"}\n";
    client.register_workflow(review).await.unwrap();
    let parent = "steps:\n  - {id: review, workflow: team.review@1, with: {doc: draft}}\noutputs: {seen: '${{ steps.review.output.seen }}'}\n";
    let view = run_to_end(&client, parent, json!({})).await;
    assert_eq!(view.state, RunState::Succeeded, "{:?}", view.error);
    assert_eq!(view.output, Some(json!({ "seen": "draft" })));
}

/// Before: labels travelled and nothing placed work by them. After: a step asks for labels
/// and runs only on an agent whose node (or card) has them; one that nobody has fails as
/// unschedulable, naming the labels.
#[tokio::test]
async fn a_step_runs_only_where_its_labels_are() {
    let mut mesh = Mesh::start(Timings::default()).await;
    mesh.start_node("plain", AGENTS).await;
    mesh.start_node("eu", &format!("[labels]\nregion = \"eu\"\n{AGENTS}"))
        .await;
    let client = mesh.client().await;
    let yaml = "steps:\n  - {id: here, uses: echo, foreach: '${{ [1, 2, 3, 4, 5, 6] }}', labels: {region: eu}}\n";
    let view = run_to_end(&client, yaml, json!({})).await;
    assert_eq!(view.state, RunState::Succeeded, "{:?}", view.error);
    let placed = mesh.task_executions("eu").len();
    assert_eq!(placed, 6, "every task on the labelled node");
    assert!(mesh.task_executions("plain").is_empty());

    let yaml = "steps:\n  - {id: nowhere, uses: echo, labels: {gpu: 'true'}}\n";
    let view = run_to_end(&client, yaml, json!({})).await;
    assert_eq!(view.state, RunState::Failed);
    let error = step(&view, "nowhere").error.clone().unwrap_or_default();
    assert!(
        error.contains("unschedulable") && error.contains("gpu=true"),
        "{error}"
    );
}

/// A finished run's trace has every step and attempt with where and when it ran and how it
/// ended, and its critical path; `mesh run trace` draws it, `mesh workflow profile` sums a
/// registered workflow's steps over its runs. Unknown runs and workflows are NOT_FOUND.
#[tokio::test]
async fn a_run_is_traced_step_by_step_and_a_workflow_profiled_over_its_runs() {
    let mut mesh = Mesh::start(Timings::default()).await;
    mesh.start_node("n1", AGENTS).await;
    let client = mesh.client().await;
    let flow = "name: traced\nversion: 1\nsteps:\n  - {id: fetch, uses: echo}\n  - {id: slow, uses: sleep, needs: [fetch], with: {ms: 300}}\n  - {id: quick, uses: echo, needs: [fetch]}\n  - {id: shaky, uses: flaky, needs: [quick]}\n";
    client.register_workflow(flow).await.unwrap();
    let mut runs = Vec::new();
    for _ in 0..3 {
        let mut goal = workflow_goal("", json!({}));
        goal.workflow = None;
        goal.workflow_ref = Some("traced@1".into());
        let run = client.submit(goal).await.unwrap();
        let view = client.wait(&run.run_id).await.unwrap();
        assert_eq!(view.state, RunState::Succeeded, "{view:?}");
        runs.push(run.run_id);
    }

    let trace = client.trace(&runs[0]).await.unwrap();
    assert_eq!(
        (trace.workflow.as_str(), trace.state.as_str()),
        ("traced@1", "succeeded")
    );
    assert!(
        trace.finished_at_ms >= trace.created_at_ms + 300,
        "{trace:?}"
    );
    let step = |id: &str| trace.steps.iter().find(|s| s.step_id == id).unwrap();
    let slow = &step("slow").attempts[0];
    assert_eq!(
        (slow.node.as_str(), slow.outcome.as_str()),
        ("n1", "succeeded")
    );
    assert!(slow.queued_at_ms <= slow.started_at_ms, "{slow:?}");
    assert!(slow.finished_at_ms - slow.started_at_ms >= 300, "{slow:?}");
    let shaky = &step("shaky").attempts;
    assert_eq!(shaky.len(), 2, "a failure, then success: {shaky:?}");
    assert_eq!(
        (shaky[0].outcome.as_str(), shaky[0].error_code.as_str()),
        ("failed", "flaky")
    );
    assert!(shaky[0].retryable && shaky[1].outcome == "succeeded");
    // The retry waited its backoff: queued after the failure.
    assert!(
        shaky[1].queued_at_ms >= shaky[0].finished_at_ms,
        "{shaky:?}"
    );
    // The critical path runs from `fetch` to whichever branch ended last.
    let last = trace.steps.iter().max_by_key(|s| s.finished_at_ms).unwrap();
    assert_eq!(
        trace.critical_path.first().map(String::as_str),
        Some("fetch")
    );
    assert_eq!(trace.critical_path.last(), Some(&last.step_id));
    for s in &trace.steps {
        assert_eq!(
            s.critical,
            trace.critical_path.contains(&s.step_id),
            "{}",
            s.step_id
        );
    }

    // The CLI draws it.
    let drawn = cli(&mesh, &["run", "trace", runs[0].as_str(), "--width", "40"]);
    assert!(drawn.contains("critical path (*): fetch → "), "{drawn}");
    assert!(
        drawn
            .lines()
            .any(|l| l.starts_with("*") && l.contains("fetch")),
        "{drawn}"
    );
    assert!(
        drawn.contains("flaky: attempt 1 of step shaky fails on purpose"),
        "{drawn}"
    );
    assert!(drawn.contains('█') && drawn.contains('x'), "{drawn}");

    // The profile over the three runs.
    let profile = client.profile("traced", Some(1), 10).await.unwrap();
    assert_eq!((profile.workflow.as_str(), profile.runs), ("traced@1", 3));
    let p = |id: &str| profile.steps.iter().find(|s| s.step_id == id).unwrap();
    assert_eq!(p("slow").runs, 3);
    assert!(p("slow").p50_ms >= 300 && p("slow").p95_ms >= p("slow").p50_ms);
    assert_eq!(
        p("shaky").failure_rate,
        0.0,
        "it succeeded in the end every time"
    );
    let table = cli(&mesh, &["workflow", "profile", "traced"]);
    assert!(table.contains("traced over its last 3 runs"), "{table}");
    for id in ["fetch", "slow", "quick", "shaky"] {
        assert!(table.contains(id), "{table}");
    }

    let err = client.trace(&RunId("run-nope".into())).await.unwrap_err();
    assert_eq!(err.code(), Some(RpcCode::NotFound), "{err}");
    let err = client.profile("nope", None, 0).await.unwrap_err();
    assert_eq!(err.code(), Some(RpcCode::NotFound), "{err}");
    assert!(
        err.to_string().contains("`nope` has no finished run"),
        "{err}"
    );
}
