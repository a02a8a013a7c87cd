//! OpenTelemetry across processes: a client's trace context is accepted, and a run whose
//! steps cross two nodes is one connected trace at an OTLP receiver, parent links right.

use std::collections::HashMap;
use std::time::Duration;

use mesh_proto::pb;
use mesh_proto::pb::goal_service_client::GoalServiceClient;
use mesh_tests::otlp::{Receiver, Span};
use mesh_tests::{Mesh, Timings, wait_for};
use tonic::Request;

#[tokio::test]
async fn a_run_across_two_nodes_is_one_connected_trace() {
    // The receiver, on a free loopback port, for the three processes.
    let receiver = Receiver::start(true).await.unwrap();
    let env = vec![
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
            receiver.endpoint(),
        ),
        ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "100".to_owned()),
        ("MESH_LOG_FORMAT".to_owned(), "json".to_owned()),
    ];
    let mut mesh = Mesh::start(Timings {
        env,
        ..Timings::default()
    })
    .await;
    // `echo` lives on n1 only, `sleep` on n2 only: the run crosses both.
    mesh.start_node("n1", "[[agents]]\nkind = \"echo\"\n").await;
    mesh.start_node("n2", "[[agents]]\nkind = \"sleep\"\n")
        .await;

    // The client's own span: the mesh's spans continue its trace.
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let channel = tonic::transport::Channel::from_shared(mesh.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut goals = GoalServiceClient::new(channel);
    let step = |id: &str, uses: &str, with: &str, needs: &[&str]| pb::StepSpec {
        id: id.into(),
        uses: uses.into(),
        with_json: with.into(),
        needs: needs.iter().map(|s| s.to_string()).collect(),
    };
    let mut request = Request::new(pb::SubmitGoalRequest {
        objective: "traced".into(),
        steps: vec![
            step("a", "echo", "{\"x\": 1}", &[]),
            step("b", "sleep", "{\"ms\": 20}", &["a"]),
            step("c", "echo", "{\"y\": 2}", &["b"]),
        ],
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{client_trace}-{client_span}-01")
            .parse()
            .unwrap(),
    );
    let run = goals
        .submit_goal(request)
        .await
        .unwrap()
        .into_inner()
        .run_id;

    // Every span of the run reaches the receiver once the run is over.
    let spans = wait_for("the run's spans", Duration::from_secs(30), || async {
        let spans = receiver.spans();
        let handled = spans.iter().filter(|s| s.name == "agent.handle").count();
        let run_ended = spans.iter().any(|s| s.name == "run");
        (handled >= 3 && run_ended).then_some(spans)
    })
    .await;
    drop(receiver);

    let ours: Vec<&Span> = spans
        .iter()
        .filter(|s| s.trace_id == client_trace)
        .collect();
    let by_id: HashMap<&str, &Span> = ours.iter().map(|s| (s.span_id.as_str(), *s)).collect();
    let parent_of = |s: &Span| by_id.get(s.parent.as_str()).copied();
    let named =
        |name: &str| -> Vec<&Span> { ours.iter().copied().filter(|s| s.name == name).collect() };
    let names: Vec<&str> = ours.iter().map(|s| s.name.as_str()).collect();

    // submit: the server span of the call is the child of the client's span.
    let rpc = named("mesh.v1.GoalService/SubmitGoal");
    assert_eq!(
        rpc.len(),
        1,
        "one server span for the submission: {names:?}"
    );
    assert_eq!(
        rpc[0].parent, client_span,
        "the client's span is its parent"
    );
    assert_eq!(rpc[0].service, "mesh-coordinator");
    let coordinator = rpc[0].pid.clone();
    assert!(!coordinator.is_empty(), "spans name their process");

    // run: under the submission, and naming the run.
    let runs = named("run");
    assert_eq!(runs.len(), 1, "{names:?}");
    let run_span = runs[0];
    assert_eq!(run_span.attributes["run_id"], run);
    assert_eq!(run_span.attributes["state"], "succeeded");
    assert_eq!(
        run_span.parent, rpc[0].span_id,
        "the submission's call is the run's parent"
    );

    // step attempt → dispatch → agent handler, for each of the three steps.
    let mut agent_pids = HashMap::new();
    for (id, skill) in [("a", "echo"), ("b", "sleep"), ("c", "echo")] {
        let attempt = named("step")
            .into_iter()
            .find(|s| s.attributes["step_id"] == id)
            .unwrap_or_else(|| panic!("a span for step {id}: {names:?}"));
        assert_eq!(
            attempt.parent, run_span.span_id,
            "step {id} is the run's child"
        );
        assert_eq!(attempt.attributes["skill"], skill);
        let dispatch = named("dispatch")
            .into_iter()
            .find(|s| s.parent == attempt.span_id)
            .unwrap_or_else(|| panic!("a dispatch of step {id}: {names:?}"));
        let handled = named("agent.handle")
            .into_iter()
            .find(|s| s.attributes["step_id"] == id)
            .unwrap_or_else(|| panic!("the handler of step {id}: {names:?}"));
        assert_eq!(
            handled.parent, dispatch.span_id,
            "step {id}'s handler is its dispatch's child"
        );
        assert_eq!(handled.attributes["run_id"], run);
        assert_eq!(handled.service, "mesh-node");
        assert_ne!(
            handled.pid, coordinator,
            "step {id} ran in a node's process"
        );
        assert_eq!(attempt.pid, coordinator);
        agent_pids.insert(id, handled.pid.clone());
    }
    assert_ne!(
        agent_pids["a"], agent_pids["b"],
        "the run crossed two nodes"
    );
    assert_eq!(agent_pids["a"], agent_pids["c"]);

    // Connected: every span of the trace has its parent in it, but the submission's.
    for s in &ours {
        if s.span_id != rpc[0].span_id {
            assert!(
                parent_of(s).is_some(),
                "span {} has a parent outside the trace: {names:?}",
                s.name
            );
        }
    }

    // The logs are JSON, and what the run logged carries its id and its trace id.
    let log = mesh.coordinator.as_ref().unwrap().log_text();
    let finished = log
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|line| line["message"] == "run finished")
        .unwrap_or_else(|| panic!("a JSON line for the run's end in:\n{log}"));
    let span = &finished["spans"][0];
    assert_eq!(span["name"], "run", "{finished}");
    assert_eq!(span["run_id"], run.as_str(), "{finished}");
    assert_eq!(span["trace_id"], client_trace, "{finished}");
    drop(mesh);
}
