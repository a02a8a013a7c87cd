//! Malformed requests get INVALID_ARGUMENT naming the field; unknown runs NOT_FOUND.

use mesh_proto::pb;
use mesh_proto::pb::goal_service_client::GoalServiceClient;
use mesh_proto::pb::node_service_client::NodeServiceClient;
use mesh_tests::{Mesh, Timings};
use tonic::Code;
use tonic::transport::Channel;

async fn goals(mesh: &Mesh) -> GoalServiceClient<Channel> {
    let channel = Channel::from_shared(mesh.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    GoalServiceClient::new(channel)
}

fn step(id: &str, uses: &str, needs: &[&str]) -> pb::StepSpec {
    pb::StepSpec {
        id: id.into(),
        uses: uses.into(),
        with_json: String::new(),
        needs: needs.iter().map(|s| s.to_string()).collect(),
    }
}

fn submit(steps: Vec<pb::StepSpec>) -> pb::SubmitGoalRequest {
    pb::SubmitGoalRequest {
        objective: "bad".into(),
        steps,
        ..Default::default()
    }
}

#[tokio::test]
async fn malformed_goals_get_invalid_argument_naming_the_field() {
    let mesh = Mesh::start(Timings::default()).await;
    let mut client = goals(&mesh).await;
    let mut bad_with = step("a", "echo", &[]);
    bad_with.with_json = "{not json".into();
    let cases = vec![
        // No steps, no workflow and no objective (an objective alone is a text goal).
        (
            pb::SubmitGoalRequest {
                objective: String::new(),
                ..submit(vec![])
            },
            "steps",
        ),
        (submit(vec![step("", "echo", &[])]), "steps[0].id"),
        (submit(vec![step("a", "", &[])]), "steps[0].uses"),
        (
            submit(vec![step("a", "echo", &[]), step("a", "echo", &[])]),
            "steps[1].id",
        ),
        (
            submit(vec![step("a", "echo", &["ghost"])]),
            "steps[0].needs[0]",
        ),
        (
            submit(vec![step("a", "echo", &["b"]), step("b", "echo", &["a"])]),
            "steps[0].needs",
        ),
        (submit(vec![bad_with]), "steps[0].with_json"),
        (
            pb::SubmitGoalRequest {
                inputs_json: "[1, 2]".into(),
                ..submit(vec![step("a", "echo", &[])])
            },
            "inputs",
        ),
        (
            pb::SubmitGoalRequest {
                idempotency_key: "a bell \u{7} is not printable".into(),
                ..submit(vec![step("a", "echo", &[])])
            },
            "idempotency_key",
        ),
        (
            pb::SubmitGoalRequest {
                idempotency_key: "k".repeat(256),
                ..submit(vec![step("a", "echo", &[])])
            },
            "idempotency_key",
        ),
        // Inputs deeper than the one depth limit (32), which the stock node can read.
        (
            pb::SubmitGoalRequest {
                inputs_json: format!("{{\"x\": {}1{}}}", "[".repeat(126), "]".repeat(126)),
                ..submit(vec![step("a", "echo", &[])])
            },
            "inputs_json",
        ),
        (
            submit(vec![pb::StepSpec {
                with_json: format!("{{\"x\": {}1{}}}", "[".repeat(40), "]".repeat(40)),
                ..step("a", "echo", &[])
            }]),
            "steps[0].with_json",
        ),
    ];
    for (req, field) in cases {
        let status = client.submit_goal(req).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            status.message().starts_with(&format!("{field}:")),
            "expected `{field}` in {:?}",
            status.message()
        );
    }
    // Oversized documents are refused before they are decoded.
    let mut huge = step("a", "echo", &[]);
    huge.with_json = format!("\"{}\"", "x".repeat(5 * 1024 * 1024));
    let status = client.submit_goal(submit(vec![huge])).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("the limit is: 4194304 bytes"),
        "names the limit: {status:?}"
    );
    // Nothing was stored.
    let page = client
        .list_runs(pb::ListRunsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(page.runs.is_empty());
}

#[tokio::test]
async fn unknown_runs_are_not_found_and_bad_ids_invalid() {
    let mesh = Mesh::start(Timings::default()).await;
    let mut client = goals(&mesh).await;
    let status = client
        .get_run(pb::GetRunRequest {
            run_id: "run-nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("run-nope"), "{status:?}");
    let status = client
        .get_run(pb::GetRunRequest {
            run_id: "no/such id".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("run_id:"), "{status:?}");
    let status = client
        .cancel_run(pb::CancelRunRequest {
            run_id: "run-nope".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = client
        .watch_run(pb::WatchRunRequest {
            run_id: "run-nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = client
        .list_runs(pb::ListRunsRequest {
            page_size: 5000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("page_size:"), "{status:?}");
    let status = client
        .list_runs(pb::ListRunsRequest {
            state: 42,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("state:"), "{status:?}");
}

#[tokio::test]
async fn a_node_stream_must_start_with_register() {
    let mesh = Mesh::start(Timings::default()).await;
    let channel = Channel::from_shared(mesh.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut nodes = NodeServiceClient::new(channel);
    let heartbeat = pb::NodeFrame {
        kind: Some(pb::node_frame::Kind::Heartbeat(pb::Heartbeat {
            instance: 7,
        })),
    };
    let frames = tokio_stream::iter(vec![heartbeat]);
    let mut inbound = nodes.connect(frames).await.unwrap().into_inner();
    let status = tokio::time::timeout(std::time::Duration::from_secs(10), inbound.message())
        .await
        .expect("answer in time")
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("register"), "{status:?}");

    // A registration whose card is invalid names the field.
    let channel = Channel::from_shared(mesh.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut nodes = NodeServiceClient::new(channel);
    let register = pb::NodeFrame {
        kind: Some(pb::node_frame::Kind::Register(pb::Register {
            node_name: "n1".into(),
            labels: Default::default(),
            agents: vec![pb::AgentCard {
                name: "a".into(),
                max_concurrency: 0,
                skills: vec![pb::Skill {
                    name: "echo".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        })),
    };
    let mut inbound = nodes
        .connect(tokio_stream::iter(vec![register]))
        .await
        .unwrap()
        .into_inner();
    let status = tokio::time::timeout(std::time::Duration::from_secs(10), inbound.message())
        .await
        .expect("answer in time")
        .unwrap_err();
    // The same fault as in a unary call, the same code.
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status
            .message()
            .contains("register.agents[0].max_concurrency"),
        "{status:?}"
    );
}

/// Before: an `https://` address was tried (and a node retried it for ever), and an error
/// printed a Rust backtrace when `RUST_BACKTRACE` was set. After: one clear line, exit 1;
/// an `https://` address without the CA that signed the coordinator is refused at start.
#[test]
fn cli_errors_are_one_line_and_https_is_refused_at_start() {
    use std::process::Command;
    let mesh = mesh_tests::mesh_bin();
    let dir = tempfile::tempdir().unwrap();
    let node_config = dir.path().join("node.toml");
    std::fs::write(
        &node_config,
        format!(
            "coordinator = \"https://127.0.0.1:1\"\nname = \"n1\"\n{}",
            mesh_tests::ECHO_AND_SLEEP
        ),
    )
    .unwrap();
    let node_config = node_config.to_str().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (
            &["--coordinator", "https://127.0.0.1:1", "nodes"],
            "needs the CA that signed its certificate",
        ),
        (
            &["--coordinator", "ftp://127.0.0.1:1", "nodes"],
            "must start with http://",
        ),
        (
            &["--coordinator", "http://127.0.0.1:1", "nodes"],
            "127.0.0.1:1",
        ),
        (
            &["node", "--config", node_config],
            "needs the CA that signed its certificate",
        ),
    ];
    for (args, says) in cases {
        let started = std::time::Instant::now();
        let out = Command::new(&mesh)
            .args(args)
            .env("RUST_BACKTRACE", "full")
            .env("MESH_LOG", "off")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{args:?}"
        );
        assert!(err.starts_with("error: "), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!err.to_lowercase().contains("backtrace"), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    }
}
