//! Defects a foreign client and a hostile one found, each proved fixed through real
//! processes: expression cost, submissions cut short, depth, result volume, node streams,
//! idempotency keys, and one round trip for submit-and-wait.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use futures::StreamExt;
use mesh_agent_sdk::{GoalClient, RpcCode, RunEvent, RunState, StepState};
use mesh_proto::pb;
use mesh_tests::raw::{node_stream, node_stream_held};
use mesh_tests::{ECHO_AND_SLEEP, Mesh, Timings, goal, workflow_goal};
use prost::Message;
use serde_json::json;
use tonic::Code;
use tonic::transport::Channel;

async fn finish(client: &GoalClient, run: &mesh_agent_sdk::RunId) -> mesh_agent_sdk::RunView {
    tokio::time::timeout(Duration::from_secs(60), client.wait(run))
        .await
        .expect("the run finishes in time")
        .expect("the watch ends with the run's end")
}

/// `GET /healthz` on the coordinator's HTTP port: the status line, within `limit`.
fn healthz(port: u16, limit: Duration) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(limit)).ok()?;
    write!(s, "GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.lines().next().map(str::to_owned)
}

const FOUR_NESTED: &str = "inputs.l.exists(a, inputs.l.exists(b, inputs.l.exists(c, inputs.l.exists(d, a + b + c + d < 0))))";

/// Before: 12–15 s of SubmitGoal and stalled health checks. After: the step fails at once,
/// naming the step, the field and the bound.
#[tokio::test]
async fn an_expensive_expression_fails_its_step_at_once_naming_step_and_field() {
    let mut mesh = Mesh::start(Timings::default()).await;
    mesh.start_node("n1", ECHO_AND_SLEEP).await;
    let client = mesh.client().await;
    let yaml = format!(
        "steps:\n  - id: a\n    uses: echo\n    with:\n      x: \"${{{{ {FOUR_NESTED} }}}}\"\n"
    );
    let started = Instant::now();
    let run = client
        .submit(workflow_goal(
            &yaml,
            json!({ "l": (0..60).collect::<Vec<_>>() }),
        ))
        .await
        .unwrap();
    let view = finish(&client, &run.run_id).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(view.state, RunState::Failed);
    let step = &view.steps[0];
    assert_eq!(step.state, StepState::Failed);
    let error = step.error.clone().unwrap_or_default();
    assert!(error.contains("with.x"), "{error}");
    assert!(error.contains("evaluation steps"), "{error}");
    assert!(error.contains("the limit is"), "{error}");
}

/// Expressions just under the bound, in three goals at once on a two-core machine: the
/// coordinator's health keeps answering while they evaluate.
#[tokio::test]
async fn health_answers_while_long_expressions_evaluate() {
    let mut mesh = Mesh::start(Timings::default()).await;
    mesh.start_node("n1", ECHO_AND_SLEEP).await;
    let client = mesh.client().await;
    let heavy = "inputs.l.map(a, inputs.l.filter(b, b < a).size())";
    let yaml = format!(
        "steps:\n  - id: a\n    uses: echo\n    with:\n{}",
        (0..3)
            .map(|i| format!("      x{i}: \"${{{{ {heavy} }}}}\"\n"))
            .collect::<String>()
    );
    let inputs = json!({ "l": (0..500).collect::<Vec<_>>() });
    let submits: Vec<_> = (0..3)
        .map(|_| {
            let (client, g) = (client.clone(), workflow_goal(&yaml, inputs.clone()));
            tokio::spawn(async move { client.submit(g).await })
        })
        .collect();
    let port = mesh.http_port;
    let probes = tokio::task::spawn_blocking(move || {
        let mut slowest = Duration::ZERO;
        let mut answered = 0;
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            let t = Instant::now();
            let line = healthz(port, Duration::from_secs(2));
            slowest = slowest.max(t.elapsed());
            assert!(line.is_some_and(|l| l.contains("200")), "health answered");
            answered += 1;
            std::thread::sleep(Duration::from_millis(50));
        }
        (answered, slowest)
    })
    .await
    .unwrap();
    eprintln!("health answered {} times, slowest {:?}", probes.0, probes.1);
    assert!(
        probes.1 < Duration::from_secs(1),
        "slowest health answer {:?}",
        probes.1
    );
    for s in submits {
        let run = s.await.unwrap().unwrap();
        let view = finish(&client, &run.run_id).await;
        assert_eq!(view.state, RunState::Succeeded, "{:?}", view.error);
    }
}

/// Before: a client whose deadline passed got DEADLINE_EXCEEDED while its goal was stored
/// and its run stayed RUNNING with no actor. After: whatever the client was told, the goal
/// submitted again under its key runs to its end.
#[tokio::test]
async fn a_submission_cut_short_by_its_deadline_is_absent_or_runs_to_its_end() {
    let mut mesh = Mesh::start(Timings::default()).await;
    mesh.start_node("n1", ECHO_AND_SLEEP).await;
    let client = mesh.client().await;
    let yaml = "inputs: { l: array }\nsteps:\n  - id: a\n    uses: echo\n    with:\n      x: \"${{ inputs.l.map(a, inputs.l.filter(b, b < a).size()) }}\"\n";
    let channel = Channel::from_shared(mesh.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut goals = pb::goal_service_client::GoalServiceClient::new(channel);
    let mut told = Vec::new();
    for i in 0..3 {
        let mut g = workflow_goal(yaml, json!({ "l": (0..500).collect::<Vec<_>>() }));
        g.idempotency_key = Some(format!("cut-short-{i}"));
        let mut req = tonic::Request::new(pb::SubmitGoalRequest::from(g.clone()));
        req.set_timeout(Duration::from_millis(50 + 100 * i));
        told.push(goals.submit_goal(req).await.map(|r| r.into_inner().run_id));
        // Again, with time: the same run if the first was kept, a new one if not.
        let run = client.submit(g).await.unwrap();
        if let Ok(id) = &told[i as usize] {
            assert_eq!(
                &run.run_id.0, id,
                "an acknowledged goal is the one found again"
            );
            assert!(!run.created);
        }
        let view = finish(&client, &run.run_id).await;
        assert_eq!(view.state, RunState::Succeeded, "{:?}", view.error);
    }
    eprintln!("first answers: {told:?}");
    // The client's own timer (CANCELLED) or the server's (DEADLINE_EXCEEDED).
    assert!(
        told.iter().any(|t| t
            .as_ref()
            .is_err_and(|s| matches!(s.code(), Code::DeadlineExceeded | Code::Cancelled))),
        "a deadline was hit at least once: {told:?}"
    );
}

/// Before: every task carried the run's whole inputs, so a 1,000-wide fan-out of a 5 KB
/// goal made a run GetRun could not return. After: a task carries what its step asks
/// for, and a run's view fits a message whatever its outputs; large ones come in pages.
#[tokio::test]
async fn a_wide_fan_out_stays_small_and_its_run_can_always_be_read() {
    let mut mesh = Mesh::start(Timings::default()).await;
    mesh.start_node("n1", ECHO_AND_SLEEP).await;
    let client = mesh.client().await;
    let yaml = "inputs: { blob: string, pad: string, xs: array }\nsteps:\n  - id: fan\n    uses: echo\n    foreach: \"${{ inputs.xs }}\"\n    parallel: 64\n    with: { i: \"${{ item }}\", pad: \"${{ inputs.pad }}\" }\n";
    let inputs = json!({
        "blob": "b".repeat(5000),
        "pad": "p".repeat(300),
        "xs": (0..2000).collect::<Vec<_>>(),
    });
    let run = client.submit(workflow_goal(yaml, inputs)).await.unwrap();
    let view = finish(&client, &run.run_id).await;
    assert_eq!(view.state, RunState::Succeeded, "{:?}", view.error);
    let fan = &view.steps[0];
    // 2,000 outputs of ~350 bytes: too many to travel inline.
    let elided = fan
        .output_elided_bytes
        .expect("the fan-out's output is elided");
    assert!(fan.output.is_none());
    let output = client.output(&run.run_id, Some("fan")).await.unwrap();
    assert_eq!(serde_json::to_vec(&output).unwrap().len() as u64, elided);
    let items = output.as_array().unwrap();
    assert_eq!(items.len(), 2000);
    for (i, item) in items.iter().enumerate() {
        assert_eq!(item["with"]["i"], json!(i));
        assert!(
            item.get("inputs").is_none(),
            "a task does not carry the inputs"
        );
    }
    // The run's own output (the workflow declares none) and an unknown step.
    let err = client.output(&run.run_id, Some("nope")).await.unwrap_err();
    assert_eq!(err.code(), Some(RpcCode::NotFound), "{err}");
}

/// One output over `max_result_bytes` fails its attempt, not retried; a run whose outputs
/// would pass `max_run_output_bytes` fails, naming the limit.
#[tokio::test]
async fn outputs_over_their_limits_fail_clearly() {
    let timings = Timings {
        dispatch_extra: "max_result_bytes = 65536\nmax_run_output_bytes = 300000\n".into(),
        ..Timings::default()
    };
    let mut mesh = Mesh::start(timings).await;
    mesh.start_node("n1", ECHO_AND_SLEEP).await;
    let client = mesh.client().await;

    let big = goal(
        "big",
        &[("a", "echo", json!({ "pad": "x".repeat(100_000) }), &[])],
    );
    let run = client.submit(big).await.unwrap();
    let view = finish(&client, &run.run_id).await;
    assert_eq!(view.state, RunState::Failed);
    let error = view.steps[0].error.clone().unwrap_or_default();
    assert!(
        error.contains("max_result_bytes") && error.contains("65536"),
        "{error}"
    );
    assert_eq!(view.steps[0].attempt, 1, "not retried");

    let yaml = "inputs: { pad: string, xs: array }\nsteps:\n  - id: fan\n    uses: echo\n    foreach: \"${{ inputs.xs }}\"\n    with: { pad: \"${{ inputs.pad }}\" }\n";
    let inputs = json!({ "pad": "p".repeat(5000), "xs": (0..100).collect::<Vec<_>>() });
    let run = client.submit(workflow_goal(yaml, inputs)).await.unwrap();
    let view = finish(&client, &run.run_id).await;
    assert_eq!(view.state, RunState::Failed);
    let error = view.steps[0].error.clone().unwrap_or_default();
    assert!(error.contains("max_run_output_bytes"), "{error}");
}

/// Before: garbage or a 5 MiB frame ended the stream OK, and silent streams stayed open.
#[tokio::test]
async fn node_streams_end_with_the_codes_unary_calls_get() {
    let timings = Timings {
        registry_extra: "register_within = \"1s\"\nmax_unregistered_streams = 4\n".into(),
        ..Timings::default()
    };
    let mesh = Mesh::start(timings).await;
    let channel = Channel::from_shared(mesh.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    // Bytes that are no protobuf message.
    assert_eq!(
        node_stream(&channel, vec![vec![0xff; 64]]).await,
        Code::InvalidArgument
    );
    // A frame over the message limit.
    let huge = pb::NodeFrame {
        kind: Some(pb::node_frame::Kind::Register(pb::Register {
            node_name: "n".repeat(5 << 20),
            ..Default::default()
        })),
    }
    .encode_to_vec();
    assert_eq!(
        node_stream(&channel, vec![huge]).await,
        Code::ResourceExhausted
    );
    // Silence: the stream is ended once `register_within` has passed.
    let started = Instant::now();
    let code = node_stream_held(&channel, vec![], Duration::from_secs(8)).await;
    assert_eq!(code, Code::DeadlineExceeded);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // At most four streams wait for their `register` at once.
    let silent: Vec<_> = (0..4)
        .map(|_| {
            let channel = channel.clone();
            tokio::spawn(
                async move { node_stream_held(&channel, vec![], Duration::from_secs(3)).await },
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(node_stream(&channel, vec![]).await, Code::ResourceExhausted);
    for s in silent {
        assert_eq!(s.await.unwrap(), Code::DeadlineExceeded);
    }
    // Once they are gone, a node registers as usual.
    let register = pb::NodeFrame {
        kind: Some(pb::node_frame::Kind::Register(pb::Register {
            node_name: "late".into(),
            ..Default::default()
        })),
    }
    .encode_to_vec();
    assert_eq!(node_stream(&channel, vec![register]).await, Code::Ok);
}

/// Keys may be any printable ASCII; a key used for another goal is refused.
#[tokio::test]
async fn idempotency_keys_are_printable_ascii_and_bound_to_their_goal() {
    let mut mesh = Mesh::start(Timings::default()).await;
    mesh.start_node("n1", ECHO_AND_SLEEP).await;
    let client = mesh.client().await;
    for key in ["dGVzdCBrZXk+/w==", "tenant/order-42", "a b@c#d+e=f"] {
        let mut g = goal("keyed", &[("a", "echo", json!({ "k": key }), &[])]);
        g.idempotency_key = Some(key.to_owned());
        let first = client.submit(g.clone()).await.unwrap();
        assert!(first.created, "{key}");
        let again = client.submit(g.clone()).await.unwrap();
        assert_eq!((again.run_id, again.created), (first.run_id.clone(), false));
        let mut other = goal("another", &[("a", "echo", json!({ "k": "other" }), &[])]);
        other.idempotency_key = Some(key.to_owned());
        let err = client.submit(other).await.unwrap_err();
        assert_eq!(err.code(), Some(RpcCode::AlreadyExists), "{err}");
        assert!(err.to_string().contains(key), "{err}");
        assert!(err.to_string().contains(&first.run_id.0), "{err}");
    }
}

#[tokio::test]
async fn approving_an_unknown_step_is_not_found() {
    let mut mesh = Mesh::start(Timings::default()).await;
    mesh.start_node("n1", ECHO_AND_SLEEP).await;
    let client = mesh.client().await;
    let yaml = "steps:\n  - id: gate\n    approval: { message: ok? }\n";
    let run = client.submit(workflow_goal(yaml, json!({}))).await.unwrap();
    let err = client
        .decide(&run.run_id, "no-such-step", true, "", "")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(RpcCode::NotFound), "{err}");
    assert!(err.to_string().contains("no-such-step"), "{err}");
    client.cancel_run(&run.run_id, "done").await.unwrap();
}

/// Python's grpcio-reflection speaks only v1alpha.
#[tokio::test]
async fn reflection_answers_in_v1_and_v1alpha() {
    use tonic_reflection::pb::{v1, v1alpha};
    let mesh = Mesh::start(Timings::default()).await;
    let channel = Channel::from_shared(mesh.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut alpha = v1alpha::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut answers = alpha
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.next().await.unwrap().unwrap();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        answer.message_response
    else {
        panic!("not a list of services: {answer:?}");
    };
    assert!(
        list.service.iter().any(|s| s.name == "mesh.v1.GoalService"),
        "{list:?}"
    );

    let mut v1 = v1::server_reflection_client::ServerReflectionClient::new(channel);
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut answers = v1
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    assert!(answers.next().await.unwrap().is_ok());
}

/// One call submits and follows the run to its end; a refusal is a status, with no
/// acknowledgement; a repeat under the same key follows the same run.
#[tokio::test]
async fn submit_and_watch_acknowledges_then_streams_the_run_to_its_end() {
    let mut mesh = Mesh::start(Timings::default()).await;
    mesh.start_node("n1", ECHO_AND_SLEEP).await;
    let client = mesh.client().await;
    let mut g = goal(
        "one call",
        &[
            ("a", "echo", json!({ "n": 1 }), &[]),
            ("b", "sleep", json!({ "ms": 200 }), &["a"]),
        ],
    );
    g.idempotency_key = Some("one-call".into());
    let (run, events) = client.submit_and_watch(g.clone()).await.unwrap();
    assert!(run.created);
    let events: Vec<RunEvent> = events.map(|e| e.unwrap()).collect().await;
    assert!(matches!(events.first(), Some(RunEvent::Snapshot(v)) if v.run_id == run.run_id));
    let Some(RunEvent::Finished { state, .. }) = events.last() else {
        panic!("the last event is the run's end: {events:?}");
    };
    assert_eq!(*state, RunState::Succeeded);

    let (again, finished) = client.submit_and_wait(g).await.unwrap();
    assert_eq!((again.run_id, again.created), (run.run_id, false));
    assert!(matches!(
        finished,
        RunEvent::Finished {
            state: RunState::Succeeded,
            ..
        }
    ));

    let bad = goal("bad", &[("a", "echo", json!({}), &["ghost"])]);
    let err = client.submit_and_wait(bad).await.unwrap_err();
    assert_eq!(err.code(), Some(RpcCode::InvalidArgument), "{err}");
    assert!(err.to_string().contains("steps[0].needs[0]"), "{err}");
}

/// A coordinator of the test's own that sends the stock node a task it cannot read.
struct UnreadableTask {
    seen: tokio::sync::mpsc::Sender<pb::NodeFrame>,
}

type Frames = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<pb::CoordinatorFrame, tonic::Status>> + Send>,
>;

#[tonic::async_trait]
impl pb::node_service_server::NodeService for UnreadableTask {
    type ConnectStream = Frames;

    async fn connect(
        &self,
        request: tonic::Request<tonic::Streaming<pb::NodeFrame>>,
    ) -> Result<tonic::Response<Frames>, tonic::Status> {
        use pb::coordinator_frame::Kind;
        let mut inbound = request.into_inner();
        let seen = self.seen.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            while let Ok(Some(frame)) = inbound.message().await {
                if let Some(pb::node_frame::Kind::Register(r)) = &frame.kind {
                    let frames = [
                        Kind::Registered(pb::Registered {
                            node_id: r.node_name.clone(),
                            instance: 1,
                            heartbeat_every_ms: 1000,
                            lease_ms: 5000,
                        }),
                        Kind::Task(pb::Task {
                            token: Some(pb::FencingToken {
                                run_id: "run-1".into(),
                                step_id: "a".into(),
                                attempt: 1,
                                epoch: 1,
                                index: 0,
                            }),
                            agent: r.agents[0].name.clone(),
                            skill: "echo".into(),
                            input_json: "{not json".into(),
                            deadline_ms: 60_000,
                            idempotency_key: "run-1/a/0".into(),
                            secrets: Default::default(),
                            traceparent: String::new(),
                        }),
                    ];
                    for kind in frames {
                        let _ = tx.send(Ok(pb::CoordinatorFrame { kind: Some(kind) })).await;
                    }
                }
                if seen.send(frame).await.is_err() {
                    break;
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// Before: the stock node dropped a task it could not parse, and the attempt held a slot
/// until its timeout, three times over. After: it answers at once, not to be retried.
#[tokio::test]
async fn a_node_that_cannot_read_a_task_fails_its_attempt_at_once() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen, mut frames) = tokio::sync::mpsc::channel(64);
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::node_service_server::NodeServiceServer::new(
                UnreadableTask { seen },
            ))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!("coordinator = \"http://{addr}\"\nname = \"n1\"\n{ECHO_AND_SLEEP}"),
    )
    .unwrap();
    let _node = mesh_tests::spawn_mesh(
        "n1",
        dir.path(),
        &["node", "--config", config.to_str().unwrap()],
    );
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(frame) = frames.recv().await {
            if let Some(pb::node_frame::Kind::Result(r)) = frame.kind {
                return r;
            }
        }
        panic!("the node closed its stream without answering");
    })
    .await
    .expect("the node answers for the attempt");
    eprintln!("answered after {:?}: {result:?}", started.elapsed());
    assert_eq!(result.token.unwrap().step_id, "a");
    let Some(pb::task_result::Outcome::Error(e)) = result.outcome else {
        panic!("a failure, not an output");
    };
    assert_eq!(e.code, "bad_input");
    assert!(!e.retryable);
    assert!(e.message.contains("task.input_json"), "{}", e.message);
    server.abort();
}
