//! Hostile input against a real coordinator: 10,000 malformed or hostile requests to every
//! method of every service — random bytes, truncated messages, valid protobuf with invalid
//! fields, unknown enum values, absurd numbers, deeply nested values, oversized messages —
//! plus hostile node streams. Every answer must carry a status from the expected set, the
//! coordinator must stay up, and its memory must come back near where it started.
//!
//! Seeded: the seed is printed, and `MESH_HOSTILE_SEED=N` replays a run.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{StreamExt, stream};
use mesh_proto::pb;
use mesh_tests::raw::{Raw, node_stream};
use mesh_tests::{Mesh, Timings, rss_kib};
use prost::Message;
use tonic::client::Grpc;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Unary methods, and whether a request that happens to decode to a valid one may be
/// answered OK (lists and `Validate`, whose answer carries the problems).
const UNARY: &[(&str, bool)] = &[
    ("/mesh.v1.GoalService/SubmitGoal", false),
    ("/mesh.v1.GoalService/GetRun", false),
    ("/mesh.v1.GoalService/CancelRun", false),
    ("/mesh.v1.GoalService/ListRuns", true),
    ("/mesh.v1.GoalService/Approve", false),
    ("/mesh.v1.GoalService/Reject", false),
    ("/mesh.v1.GoalService/Signal", false),
    ("/mesh.v1.GoalService/RetryRun", false),
    ("/mesh.v1.GoalService/SkipStep", false),
    ("/mesh.v1.GoalService/RaiseBudget", false),
    ("/mesh.v1.GoalService/GetOutput", false),
    ("/mesh.v1.GoalService/GetRunTrace", false),
    ("/mesh.v1.WorkflowService/Profile", false),
    ("/mesh.v1.WorkflowService/Register", false),
    ("/mesh.v1.WorkflowService/Get", false),
    ("/mesh.v1.WorkflowService/List", true),
    ("/mesh.v1.WorkflowService/Validate", true),
    ("/mesh.v1.RegistryService/ListNodes", true),
    ("/mesh.v1.RegistryService/ListAgents", true),
    ("/mesh.v1.RegistryService/DrainNode", false),
];

/// What a hostile request may be answered with.
const EXPECTED: &[Code] = &[
    Code::InvalidArgument,
    Code::NotFound,
    Code::FailedPrecondition,
    Code::ResourceExhausted,
    Code::AlreadyExists,
];

fn random_bytes(rng: &mut fastrand::Rng, max: usize) -> Vec<u8> {
    let n = rng.usize(0..=max);
    (0..n).map(|_| rng.u8(..)).collect()
}

/// A budget with any limits, sane or not.
fn budget(rng: &mut fastrand::Rng) -> pb::Budget {
    pb::Budget {
        max_tokens: rng.bool().then(|| rng.u64(..)),
        max_cost_usd: rng.bool().then(|| f64::from_bits(rng.u64(..))),
        on_exceed: random_text(rng),
    }
}

fn random_text(rng: &mut fastrand::Rng) -> String {
    const PIECES: &[&str] = &[
        "",
        "a",
        "run-1",
        "../../etc",
        "ünïcödé",
        "\u{0}",
        " ",
        "x@0",
        "name@1",
        "greet@99",
        "${{",
        "}}",
        "%s%n",
        "'; DROP TABLE runs; --",
        "\u{202e}",
    ];
    match rng.u8(0..4) {
        0 => PIECES[rng.usize(..PIECES.len())].to_owned(),
        1 => "z".repeat(rng.usize(0..300)),
        2 => String::from_utf8_lossy(&random_bytes(rng, 64)).into_owned(),
        _ => format!("run-{:032x}", rng.u128(..)),
    }
}

/// A valid protobuf message with invalid or hostile field values, for `path`.
fn hostile_message(rng: &mut fastrand::Rng, path: &str) -> Vec<u8> {
    let nested = |rng: &mut fastrand::Rng| {
        let depth = rng.usize(100..20_000);
        format!("{}{}", "[".repeat(depth), "]".repeat(depth))
    };
    let json = |rng: &mut fastrand::Rng| match rng.u8(0..5) {
        0 => nested(rng),
        1 => "{not json".to_owned(),
        2 => format!("{}", u64::MAX),
        3 => format!("{{\"a\": \"{}\"}}", "x".repeat(rng.usize(0..10_000))),
        _ => random_text(rng),
    };
    let workflow = |rng: &mut fastrand::Rng| match rng.u8(0..5) {
        0 => format!(
            "steps:\n  - {{id: a, uses: echo, when: \"${{{{ {}1{} }}}}\"}}\n",
            "(".repeat(rng.usize(10..500)),
            ")".repeat(rng.usize(10..500))
        ),
        1 => "steps:\n  - &a [*a, *a]\n".to_owned(),
        2 => format!("name: w\nversion: {}\nsteps: []\n", rng.u64(..)),
        3 => format!(
            "steps:\n  - {{id: a, uses: echo, foreach: '${{{{ {} }}}}'}}\n",
            "1 + ".repeat(rng.usize(1..400)) + "1"
        ),
        _ => random_text(rng),
    };
    match path.rsplit('/').next().unwrap() {
        "SubmitGoal" => pb::SubmitGoalRequest {
            objective: random_text(rng),
            inputs_json: json(rng),
            steps: (0..rng.usize(0..4))
                .map(|_| pb::StepSpec {
                    id: random_text(rng),
                    uses: random_text(rng),
                    with_json: json(rng),
                    needs: vec![random_text(rng)],
                })
                .collect(),
            idempotency_key: random_text(rng),
            workflow: if rng.bool() {
                workflow(rng)
            } else {
                String::new()
            },
            workflow_ref: if rng.bool() {
                random_text(rng)
            } else {
                String::new()
            },
            budget: rng.bool().then(|| budget(rng)),
        }
        .encode_to_vec(),
        "GetRun" => pb::GetRunRequest {
            run_id: random_text(rng),
        }
        .encode_to_vec(),
        "CancelRun" => pb::CancelRunRequest {
            run_id: random_text(rng),
            reason: "x".repeat(rng.usize(0..100_000)),
        }
        .encode_to_vec(),
        "ListRuns" => pb::ListRunsRequest {
            state: rng.i32(..),
            page_size: rng.u32(..),
            page_token: random_text(rng),
        }
        .encode_to_vec(),
        "Approve" | "Reject" => pb::DecideRequest {
            run_id: random_text(rng),
            step_id: random_text(rng),
            comment: "c".repeat(rng.usize(0..10_000)),
            by: random_text(rng),
        }
        .encode_to_vec(),
        "Signal" => pb::SignalRequest {
            run_id: random_text(rng),
            name: random_text(rng),
            payload_json: json(rng),
        }
        .encode_to_vec(),
        "RetryRun" => pb::RetryRunRequest {
            run_id: random_text(rng),
            from_step: random_text(rng),
        }
        .encode_to_vec(),
        "SkipStep" => pb::SkipStepRequest {
            run_id: random_text(rng),
            step_id: random_text(rng),
            comment: random_text(rng),
        }
        .encode_to_vec(),
        "RaiseBudget" => pb::RaiseBudgetRequest {
            run_id: random_text(rng),
            budget: rng.bool().then(|| budget(rng)),
            comment: random_text(rng),
        }
        .encode_to_vec(),
        "Register" | "Validate" => pb::RegisterWorkflowRequest {
            definition: workflow(rng),
        }
        .encode_to_vec(),
        "Get" => pb::GetWorkflowRequest {
            name: random_text(rng),
            version: rng.u32(..),
        }
        .encode_to_vec(),
        "List" => pb::ListWorkflowsRequest {
            name: random_text(rng),
            page_size: rng.u32(..),
            page_token: random_text(rng),
        }
        .encode_to_vec(),
        "ListAgents" => pb::ListAgentsRequest {
            skill: random_text(rng),
        }
        .encode_to_vec(),
        "DrainNode" => pb::DrainNodeRequest {
            node_id: random_text(rng),
            reason: random_text(rng),
        }
        .encode_to_vec(),
        "GetRunTrace" => pb::GetRunTraceRequest {
            run_id: random_text(rng),
        }
        .encode_to_vec(),
        "Profile" => pb::ProfileWorkflowRequest {
            name: random_text(rng),
            version: rng.u32(..),
            runs: rng.u32(..),
        }
        .encode_to_vec(),
        _ => random_bytes(rng, 256),
    }
}

/// One hostile request for `path`, and what kind it is.
fn request(rng: &mut fastrand::Rng, path: &str) -> (&'static str, Vec<u8>) {
    match rng.u8(0..100) {
        0..=29 => ("random bytes", random_bytes(rng, 2048)),
        30..=44 => {
            let mut whole = hostile_message(rng, path);
            let cut = rng.usize(0..=whole.len());
            whole.truncate(cut);
            ("truncated", whole)
        }
        45..=98 => ("hostile fields", hostile_message(rng, path)),
        _ => ("oversized", vec![b'x'; 5 << 20]),
    }
}

#[tokio::test]
async fn ten_thousand_hostile_requests_get_precise_errors_and_leave_the_coordinator_whole() {
    let seed = mesh_tests::env_u64("MESH_HOSTILE_SEED", 20_261_122);
    eprintln!("hostile requests: seed {seed} (replay with MESH_HOSTILE_SEED={seed})");
    let mut mesh = Mesh::start(Timings::default()).await;
    mesh.start_node("n1", "[[agents]]\nkind = \"echo\"\nmax_concurrency = 4\n")
        .await;
    let channel = Channel::from_shared(mesh.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let pid = mesh.coordinator.as_ref().unwrap().pid();
    let mut rng = fastrand::Rng::with_seed(seed);

    // Warm-up, so that the baseline includes what a working coordinator keeps anyway.
    let plan = |rng: &mut fastrand::Rng, n: usize| -> Vec<(usize, &'static str, Vec<u8>)> {
        (0..n)
            .map(|_| {
                let m = rng.usize(..UNARY.len());
                let (kind, body) = request(rng, UNARY[m].0);
                (m, kind, body)
            })
            .collect()
    };
    let warm = plan(&mut rng, 500);
    send_all(&channel, warm).await;
    let baseline = rss_kib(pid);

    let requests = plan(&mut rng, 10_000);
    let outcomes = send_all(&channel, requests).await;
    let mut codes: BTreeMap<String, usize> = BTreeMap::new();
    let mut unexpected = Vec::new();
    for (m, kind, result) in &outcomes {
        let (path, ok_allowed) = UNARY[*m];
        let code = match result {
            Ok(()) => Code::Ok,
            Err(s) => s.code(),
        };
        *codes.entry(format!("{code:?}")).or_default() += 1;
        let fine = EXPECTED.contains(&code) || (code == Code::Ok && ok_allowed);
        // gRPC's code for a message over the size limit.
        let fine = fine && (*kind != "oversized" || code == Code::ResourceExhausted);
        if !fine {
            unexpected.push(format!("{path} ({kind}): {result:?}"));
        }
    }

    // Hostile node streams: no register first, garbage frames, a register with nonsense.
    let mut stream_codes: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..200 {
        let frames: Vec<Vec<u8>> = (0..rng.usize(1..5))
            .map(|_| match rng.u8(0..3) {
                0 => random_bytes(&mut rng, 512),
                1 => pb::NodeFrame {
                    kind: Some(pb::node_frame::Kind::Heartbeat(pb::Heartbeat {
                        instance: rng.u64(..),
                    })),
                }
                .encode_to_vec(),
                _ => pb::NodeFrame {
                    kind: Some(pb::node_frame::Kind::Register(pb::Register {
                        node_name: random_text(&mut rng),
                        labels: Default::default(),
                        agents: vec![pb::AgentCard {
                            name: random_text(&mut rng),
                            max_concurrency: rng.u32(..),
                            ..Default::default()
                        }],
                    })),
                }
                .encode_to_vec(),
            })
            .collect();
        let code = node_stream(&channel, frames).await;
        *stream_codes.entry(format!("{code:?}")).or_default() += 1;
    }

    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(pid);
    eprintln!(
        "hostile requests: {} unary answered {codes:?}; 200 node streams ended {stream_codes:?}; \
         coordinator RSS {} KiB after warm-up, {} KiB after",
        outcomes.len(),
        baseline,
        after
    );
    assert!(
        unexpected.is_empty(),
        "{} unexpected answers, first: {:?}",
        unexpected.len(),
        &unexpected[..unexpected.len().min(5)]
    );
    assert_eq!(outcomes.len(), 10_000);
    // A stream that registers a valid-looking node and then closes ends OK; every other
    // ending is a precise refusal.
    let stream_expected = [
        "FailedPrecondition",
        "InvalidArgument",
        "ResourceExhausted",
        "Ok",
    ];
    assert!(
        stream_codes
            .keys()
            .all(|c| stream_expected.contains(&c.as_str())),
        "node streams ended {stream_codes:?}"
    );
    assert!(
        mesh.coordinator.as_mut().unwrap().is_running(),
        "the coordinator is still running"
    );
    assert!(
        after <= baseline + 48 * 1024,
        "memory grew from {baseline} KiB to {after} KiB"
    );
    // And it still works.
    let client = mesh.client().await;
    let run = client
        .submit(mesh_tests::goal(
            "after",
            &[("a", "echo", serde_json::json!({}), &[])],
        ))
        .await
        .unwrap();
    let view = client.wait(&run.run_id).await.unwrap();
    assert_eq!(view.state, mesh_agent_sdk::RunState::Succeeded);
}

/// Sends every request, 16 at a time; returns (method, kind, outcome) for each.
async fn send_all(
    channel: &Channel,
    requests: Vec<(usize, &'static str, Vec<u8>)>,
) -> Vec<(usize, &'static str, Result<(), Status>)> {
    stream::iter(requests)
        .map(|(m, kind, body)| {
            let mut grpc = Grpc::new(channel.clone());
            async move {
                let path = tonic::codegen::http::uri::PathAndQuery::from_static(UNARY[m].0);
                let result = async {
                    grpc.ready()
                        .await
                        .map_err(|e| Status::unavailable(e.to_string()))?;
                    let mut req = tonic::Request::new(body);
                    req.set_timeout(Duration::from_secs(10));
                    grpc.unary(req, path, Raw).await.map(|_| ())
                }
                .await;
                (m, kind, result)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await
}

/// Goals that are well formed but costly, as a hostile client would send them: expressions
/// that would take minutes, inputs nested past the limit, fan-outs that copy their input
/// into every task, and node streams of garbage. Each is answered precisely and in bounded
/// time, and the coordinator stays up within bounded memory.
#[tokio::test]
async fn costly_goals_are_bounded_and_answered_precisely() {
    use mesh_agent_sdk::{GoalSpec, RpcCode, RunState};
    let mut mesh = Mesh::start(Timings::default()).await;
    mesh.start_node("n1", "[[agents]]\nkind = \"echo\"\nmax_concurrency = 64\n")
        .await;
    let client = mesh.client().await;
    let channel = Channel::from_shared(mesh.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let pid = mesh.coordinator.as_ref().unwrap().pid();
    let before = rss_kib(pid);
    let workflow = mesh_tests::workflow_goal;
    let mut runs = Vec::new();
    for i in 0..20 {
        // Four nested comprehensions over 40..80 elements: millions of steps each.
        let n = 40 + i * 2;
        let yaml = "steps:\n  - id: a\n    uses: echo\n    with: {x: \"${{ inputs.l.exists(a, inputs.l.exists(b, inputs.l.exists(c, inputs.l.all(d, a + b + c + d >= 0)))) }}\"}\n";
        let run = client
            .submit(workflow(
                yaml,
                serde_json::json!({ "l": (0..n).collect::<Vec<_>>() }),
            ))
            .await
            .unwrap();
        runs.push((run.run_id, "evaluation steps"));
        // Inputs nested past the limit.
        let depth = 33 + i * 4;
        let deep: serde_json::Value =
            serde_json::from_str(&format!("{}1{}", "[".repeat(depth), "]".repeat(depth))).unwrap();
        let err = client
            .submit(GoalSpec {
                inputs: serde_json::json!({ "d": deep }),
                ..mesh_tests::goal("deep", &[("a", "echo", serde_json::json!({}), &[])])
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(RpcCode::InvalidArgument), "{err}");
        assert!(err.to_string().contains("inputs_json"), "{err}");
    }
    // Fan-outs that hand their whole 5 KB input to each of 1,000 tasks.
    for _ in 0..4 {
        let yaml = "steps:\n  - id: fan\n    uses: echo\n    foreach: \"${{ inputs.xs }}\"\n    parallel: 256\n    with: {all: \"${{ inputs.blob }}\", i: \"${{ item }}\"}\n";
        let inputs =
            serde_json::json!({ "blob": "b".repeat(5000), "xs": (0..1000).collect::<Vec<_>>() });
        let run = client.submit(workflow(yaml, inputs)).await.unwrap();
        runs.push((run.run_id, ""));
    }
    // Garbage on node streams.
    for i in 0..50u8 {
        let code = node_stream(&channel, vec![vec![0xff - i; 16 + usize::from(i) * 8]]).await;
        assert_eq!(code, Code::InvalidArgument);
    }
    for (run, error) in runs {
        let view = tokio::time::timeout(Duration::from_secs(120), client.wait(&run))
            .await
            .expect("every run ends in time")
            .unwrap();
        if error.is_empty() {
            assert_eq!(view.state, RunState::Succeeded, "{:?}", view.error);
            // 1,000 outputs of 5 KB: read in pages, never in a response over the limit.
            let output = client.output(&run, Some("fan")).await.unwrap();
            assert_eq!(output.as_array().map(Vec::len), Some(1000));
        } else {
            assert_eq!(view.state, RunState::Failed);
            let e = view.steps[0].error.clone().unwrap_or_default();
            assert!(e.contains(error) && e.contains("with.x"), "{e}");
        }
    }
    let after = rss_kib(pid);
    eprintln!("costly goals: coordinator RSS {before} KiB before, {after} KiB after");
    assert!(mesh.coordinator.as_mut().unwrap().is_running());
    assert!(
        after <= before + 128 * 1024,
        "memory grew from {before} KiB to {after} KiB"
    );
}

/// The hostile run again, on a coordinator with authentication on and with bad credentials:
/// none, malformed, forged, revoked, nonsense namespaces. Every request is refused before
/// its handler, precisely (UNAUTHENTICATED, or INVALID_ARGUMENT for the namespace header); a
/// reader's token on a write is PERMISSION_DENIED; the coordinator stays up and works for a
/// valid token.
#[tokio::test]
async fn hostile_requests_with_bad_credentials_are_refused_precisely() {
    let seed = mesh_tests::env_u64("MESH_HOSTILE_SEED", 20_261_207);
    eprintln!("hostile credentials: seed {seed} (replay with MESH_HOSTILE_SEED={seed})");
    let timings = Timings {
        coordinator_extra: "[auth]\nenabled = true\n".into(),
        ..Timings::default()
    };
    let mesh = Mesh::start(timings).await;
    let admin = mesh.client().await;
    let reader = admin
        .create_token("reader", "default", "read", None)
        .await
        .unwrap();
    let revoked = admin
        .create_token("old", "default", "write", None)
        .await
        .unwrap();
    admin
        .revoke_token(&revoked.token.unwrap().token_id)
        .await
        .unwrap();
    let channel = Channel::from_shared(mesh.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut codes: BTreeMap<String, usize> = BTreeMap::new();
    let mut unexpected = Vec::new();
    let requests: Vec<_> = (0..2_000)
        .map(|_| {
            let (credential, header, namespace, expected): (
                &str,
                Option<String>,
                Option<String>,
                Code,
            ) = match rng.u8(0..5) {
                0 => ("none", None, None, Code::Unauthenticated),
                1 => (
                    "malformed",
                    Some(format!("Basic {}", random_text(&mut rng))),
                    None,
                    Code::Unauthenticated,
                ),
                2 => (
                    "forged",
                    Some(format!("Bearer mesh_{}", rng.u64(..))),
                    None,
                    Code::Unauthenticated,
                ),
                3 => (
                    "revoked",
                    Some(format!("Bearer {}", revoked.secret)),
                    None,
                    Code::Unauthenticated,
                ),
                _ => (
                    "bad namespace",
                    Some(format!("Bearer {}", reader.secret)),
                    Some(format!("no such {}", rng.u32(..))),
                    Code::InvalidArgument,
                ),
            };
            let m = rng.usize(..UNARY.len());
            let (_, body) = request(&mut rng, UNARY[m].0);
            (m, credential, header, namespace, expected, body)
        })
        .collect();
    let outcomes: Vec<_> = stream::iter(requests)
        .map(|(m, credential, header, namespace, expected, body)| {
            let mut grpc = Grpc::new(channel.clone());
            async move {
                let path = tonic::codegen::http::uri::PathAndQuery::from_static(UNARY[m].0);
                grpc.ready().await.unwrap();
                let mut req = tonic::Request::new(body);
                req.set_timeout(Duration::from_secs(10));
                if let Some(h) = &header
                    && let Ok(v) = h.parse()
                {
                    req.metadata_mut().insert("authorization", v);
                }
                if let Some(ns) = &namespace {
                    req.metadata_mut()
                        .insert("mesh-namespace", ns.parse().unwrap());
                }
                let code = match grpc.unary(req, path, Raw).await {
                    Ok(_) => Code::Ok,
                    Err(s) => s.code(),
                };
                (m, credential, expected, code)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    for (m, credential, expected, code) in outcomes {
        *codes.entry(format!("{credential}: {code:?}")).or_default() += 1;
        if code != expected {
            unexpected.push(format!("{} with {credential}: {code:?}", UNARY[m].0));
        }
    }
    // A reader's token on every writing method: PERMISSION_DENIED, whatever the body.
    let reader_client = mesh_agent_sdk::GoalClient::connect(&mesh.url())
        .await
        .unwrap()
        .with_token(&reader.secret)
        .unwrap();
    let e = reader_client
        .submit(mesh_tests::goal(
            "no",
            &[("a", "echo", serde_json::json!({}), &[])],
        ))
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Some(mesh_agent_sdk::RpcCode::PermissionDenied),
        "{e}"
    );
    eprintln!("codes: {codes:?}");
    assert!(
        unexpected.is_empty(),
        "{} unexpected: {:?}",
        unexpected.len(),
        &unexpected[..unexpected.len().min(10)]
    );
    // Still up, and working for a valid token.
    assert!(admin.nodes().await.is_ok());
}
