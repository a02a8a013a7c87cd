//! Authentication, roles and the audit log through real processes: a coordinator with
//! `[auth] enabled = true`, tokens made with the `mesh` CLI, nodes with worker tokens.

use std::time::Duration;

use mesh_agent_sdk::{GoalClient, RpcCode, RunState};
use mesh_tests::raw::Raw;
use mesh_tests::{Mesh, Timings, goal};
use serde_json::{Value, json};
use tonic::Code;
use tonic::client::Grpc;
use tonic::transport::Channel;

/// What each method asks of its caller, written here apart from the coordinator's own
/// table: the matrix checks the coordinator against it, and every method of every mesh
/// service must be in it (so that a new RPC without a rule fails this test).
const NEEDS: &[(&str, &str)] = &[
    ("/mesh.v1.NodeService/Connect", "worker"),
    ("/mesh.v1.GoalService/SubmitGoal", "write"),
    ("/mesh.v1.GoalService/SubmitAndWatch", "write"),
    ("/mesh.v1.GoalService/GetRun", "read"),
    ("/mesh.v1.GoalService/WatchRun", "read"),
    ("/mesh.v1.GoalService/CancelRun", "write"),
    ("/mesh.v1.GoalService/ListRuns", "read"),
    ("/mesh.v1.GoalService/Approve", "write"),
    ("/mesh.v1.GoalService/Reject", "write"),
    ("/mesh.v1.GoalService/Signal", "write"),
    ("/mesh.v1.GoalService/RetryRun", "write"),
    ("/mesh.v1.GoalService/SkipStep", "write"),
    ("/mesh.v1.GoalService/RaiseBudget", "write"),
    ("/mesh.v1.GoalService/GetOutput", "read"),
    ("/mesh.v1.GoalService/GetRunTrace", "read"),
    ("/mesh.v1.WorkflowService/Register", "write"),
    ("/mesh.v1.WorkflowService/Get", "read"),
    ("/mesh.v1.WorkflowService/List", "read"),
    ("/mesh.v1.WorkflowService/Validate", "read"),
    ("/mesh.v1.WorkflowService/Profile", "read"),
    ("/mesh.v1.RegistryService/ListNodes", "read"),
    ("/mesh.v1.RegistryService/ListAgents", "read"),
    ("/mesh.v1.RegistryService/DrainNode", "admin"),
    ("/mesh.v1.AuthService/CreateToken", "admin"),
    ("/mesh.v1.AuthService/ListTokens", "admin"),
    ("/mesh.v1.AuthService/RevokeToken", "admin"),
    ("/mesh.v1.AuthService/ListAudit", "admin"),
    ("/mesh.v1.SecretService/SetSecret", "admin"),
    ("/mesh.v1.SecretService/ListSecrets", "admin"),
    ("/mesh.v1.SecretService/DeleteSecret", "admin"),
    ("/mesh.v1.ToolService/PutTool", "write"),
    ("/mesh.v1.ToolService/GetTool", "read"),
    ("/mesh.v1.ToolService/ListTools", "read"),
    ("/mesh.v1.ToolService/DeleteTool", "write"),
    ("/mesh.v1.MemoryService/ListMemory", "read"),
    ("/mesh.v1.MemoryService/GetMemory", "read"),
    ("/mesh.v1.MemoryService/PutMemory", "write"),
    ("/mesh.v1.MemoryService/DeleteMemory", "write"),
];

/// Which roles of a namespace cover a need in it.
fn covers(role: &str, need: &str) -> bool {
    match need {
        "read" => ["read", "write", "admin"].contains(&role),
        "write" => ["write", "admin"].contains(&role),
        "worker" => ["worker", "admin"].contains(&role),
        "admin" => role == "admin",
        _ => false,
    }
}

async fn secured() -> Mesh {
    let timings = Timings {
        coordinator_extra: "[auth]\nenabled = true\n".into(),
        ..Timings::default()
    };
    Mesh::start(timings).await
}

/// Runs the `mesh` CLI with `token`; returns (success, stdout, stderr).
async fn cli(mesh: &Mesh, token: &str, args: &[&str]) -> (bool, String, String) {
    let mut all = vec!["--coordinator".to_owned(), mesh.url()];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    let token = token.to_owned();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(mesh_tests::mesh_bin())
            .args(&all)
            .env("MESH_TOKEN", token)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A token made by the cluster admin with the CLI.
async fn token(mesh: &Mesh, namespace: &str, role: &str, extra: &[&str]) -> String {
    let admin = mesh.admin_token.clone().expect("the admin token file");
    let mut args = vec![
        "token",
        "create",
        "--for-namespace",
        namespace,
        "--role",
        role,
    ];
    args.extend(extra);
    let (ok, out, err) = cli(mesh, &admin, &args).await;
    assert!(ok, "{err}");
    out.trim().to_owned()
}

/// A client acting in `namespace` with a new token of `role` there.
async fn member(mesh: &Mesh, namespace: &str, role: &str) -> GoalClient {
    let secret = token(mesh, namespace, role, &["--name", namespace]).await;
    GoalClient::connect(&mesh.url())
        .await
        .unwrap()
        .with_token(&secret)
        .unwrap()
        .with_namespace(namespace)
        .unwrap()
}

/// A raw call of `path` with an empty message, in `namespace`, with `token`.
async fn call(channel: &Channel, path: &'static str, namespace: &str, token: Option<&str>) -> Code {
    let mut grpc = Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let mut req = tonic::Request::new(Vec::new());
    req.set_timeout(Duration::from_secs(5));
    req.metadata_mut()
        .insert("mesh-namespace", namespace.parse().unwrap());
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    match grpc.unary(req, path, Raw).await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// Every RPC × every role × its own namespace and another: a role that covers the method's
/// need in the call's namespace gets past the guard (whatever the handler then says of an
/// empty request), any other gets PERMISSION_DENIED; the cluster admin gets past everywhere;
/// no token at all is UNAUTHENTICATED. The table covers every method the coordinator's
/// descriptor declares.
#[tokio::test]
async fn every_rpc_answers_each_role_as_the_table_says() {
    let mesh = secured().await;
    // The table covers every mesh method of the descriptor set.
    let declared = mesh_proto::declared_methods();
    for m in declared.iter().filter(|m| m.starts_with("/mesh.v1.")) {
        assert!(
            NEEDS.iter().any(|(p, _)| p == m),
            "{m} is not in the test's table"
        );
    }
    let mut tokens = Vec::new();
    for role in ["read", "write", "worker", "admin"] {
        tokens.push((role, token(&mesh, "team-a", role, &["--name", role]).await));
    }
    let admin = mesh.admin_token.clone().unwrap();
    let channel = Channel::from_shared(mesh.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut checked = 0;
    for (path, need) in NEEDS {
        for (role, secret) in &tokens {
            for namespace in ["team-a", "team-b"] {
                let code = call(&channel, path, namespace, Some(secret)).await;
                let allowed = namespace == "team-a" && covers(role, need);
                if allowed {
                    assert!(
                        ![Code::PermissionDenied, Code::Unauthenticated].contains(&code),
                        "{role} in {namespace} calling {path}: {code:?}"
                    );
                } else {
                    assert_eq!(
                        code,
                        Code::PermissionDenied,
                        "{role} in {namespace} calling {path}"
                    );
                }
                checked += 1;
            }
        }
        let code = call(&channel, path, "team-b", Some(&admin)).await;
        assert!(
            ![Code::PermissionDenied, Code::Unauthenticated].contains(&code),
            "the cluster admin calling {path}: {code:?}"
        );
        assert_eq!(
            call(&channel, path, "team-a", None).await,
            Code::Unauthenticated,
            "no token calling {path}"
        );
        checked += 2;
    }
    assert_eq!(checked, NEEDS.len() * 10);
    // Health stays open: a probe needs no token.
    let health = call(&channel, "/grpc.health.v1.Health/Check", "default", None).await;
    assert_eq!(health, Code::Ok);
}

/// Missing, malformed, forged, expired and revoked tokens are UNAUTHENTICATED, each naming
/// what is wrong and none naming the secret; a worker token cannot submit; approvals are
/// recorded under the caller's token; the audit log has every denial and each state-changing
/// call with its actor and resource; the store holds only hashes.
#[tokio::test]
async fn bad_tokens_are_refused_naming_why_and_everything_is_audited() {
    let mut mesh = secured().await;
    let admin = mesh.admin_token.clone().expect("the admin token file");
    let mode = std::fs::metadata(mesh.dir.path().join("data/admin.token"))
        .unwrap()
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    let writer = token(&mesh, "default", "write", &["--name", "ci"]).await;
    let short = token(&mesh, "default", "read", &["--ttl", "1s"]).await;
    let revoked = token(&mesh, "default", "read", &["--name", "old"]).await;
    let (ok, listed, err) = cli(&mesh, &admin, &["--output", "json", "token", "ls"]).await;
    assert!(ok, "{err}");
    let listed: Value = serde_json::from_str(&listed).unwrap();
    let old = listed["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "old")
        .unwrap()["token_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (ok, _, err) = cli(&mesh, &admin, &["token", "revoke", &old]).await;
    assert!(ok, "{err}");
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let plain = GoalClient::connect(&mesh.url()).await.unwrap();
    let refused = |client: GoalClient| async move {
        let e = client.nodes().await.unwrap_err();
        assert_eq!(e.code(), Some(RpcCode::Unauthenticated), "{e}");
        e.to_string()
    };
    assert!(refused(plain.clone()).await.contains("no token"));
    for (secret, why) in [
        (
            "mesh_forged0000000000000000000000000000000000000",
            "unknown token",
        ),
        (short.as_str(), "has expired"),
        (revoked.as_str(), "has been revoked"),
    ] {
        let message = refused(plain.clone().with_token(secret).unwrap()).await;
        assert!(message.contains(why), "{message}");
        assert!(!message.contains(secret), "the secret in {message}");
    }

    // A worker token opens the node stream and nothing else.
    mesh.worker_token = Some(token(&mesh, "default", "worker", &["--name", "node"]).await);
    mesh.start_node("n1", "[[agents]]\nkind = \"echo\"\n").await;
    let worker = plain
        .clone()
        .with_token(mesh.worker_token.as_ref().unwrap())
        .unwrap();
    let e = worker
        .submit(goal("no", &[("a", "echo", json!({}), &[])]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(RpcCode::PermissionDenied), "{e}");
    assert!(e.to_string().contains("needs the write role"), "{e}");

    // A writer runs a goal; an approval is recorded under its token, not the name it gives.
    let client = plain.clone().with_token(&writer).unwrap();
    let run = client
        .submit(goal("secured", &[("a", "echo", json!({"x": 1}), &[])]))
        .await
        .unwrap();
    let view = client.wait(&run.run_id).await.unwrap();
    assert_eq!(view.state, RunState::Succeeded);
    let approval = mesh_tests::workflow_goal(
        "steps:\n  - { id: gate, approval: { message: ok? } }\n",
        json!({}),
    );
    let gated = client.submit(approval).await.unwrap();
    mesh_tests::wait_for("the gate", Duration::from_secs(10), || async {
        let v = client.get_run(&gated.run_id).await.ok()?;
        (v.steps[0].state == mesh_agent_sdk::StepState::AwaitingApproval).then_some(())
    })
    .await;
    let decided = client
        .decide(&gated.run_id, "gate", true, "fine", "mallory")
        .await
        .unwrap();
    let by = decided.steps[0].output.as_ref().unwrap()["by"].clone();
    assert!(by.as_str().unwrap().starts_with("token:ci ("), "{by}");

    // The audit log: denials with their reasons, allowed writes with actor and resource.
    let audit = mesh_tests::wait_for("the audit rows", Duration::from_secs(10), || async {
        let (ok, out, _) = cli(
            &mesh,
            &admin,
            &["--output", "json", "audit", "ls", "--limit", "200"],
        )
        .await;
        let rows: Value = serde_json::from_str(&out).ok()?;
        let rows = rows["rows"].as_array()?.clone();
        let submitted = rows.iter().any(|r| {
            r["method"] == "/mesh.v1.GoalService/SubmitGoal"
                && r["decision"] == "allowed"
                && r["resource"] == format!("run {}", run.run_id)
        });
        (ok && submitted).then_some(rows)
    })
    .await;
    let denied: Vec<&Value> = audit.iter().filter(|r| r["decision"] == "denied").collect();
    for why in [
        "no token",
        "unknown token",
        "has expired",
        "has been revoked",
        "needs the write role",
    ] {
        assert!(
            denied
                .iter()
                .any(|r| r["reason"].as_str().unwrap().contains(why)),
            "no denial for {why}: {denied:?}"
        );
    }
    assert!(
        audit
            .iter()
            .all(|r| !r["peer"].as_str().unwrap().is_empty())
    );
    let approved = audit
        .iter()
        .find(|r| r["method"] == "/mesh.v1.GoalService/Approve")
        .expect("the approval's row");
    assert!(
        approved["actor"]
            .as_str()
            .unwrap()
            .starts_with("token:ci (")
    );
    assert_eq!(
        approved["resource"],
        format!("run {} step gate", gated.run_id)
    );

    // No secret anywhere the coordinator writes.
    let store = std::fs::read(mesh.db_path()).unwrap();
    let logs: Vec<u8> = std::fs::read_dir(mesh.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
        .flat_map(|e| std::fs::read(e.path()).unwrap())
        .collect();
    for secret in [&admin, &writer, &short, &revoked] {
        for (what, bytes) in [("store", &store), ("logs", &logs)] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "a secret in the {what}"
            );
        }
    }
    // A node without a token cannot connect.
    mesh.worker_token = None;
    mesh.spawn_node_in("n2", "[[agents]]\nkind = \"echo\"\n", None, None);
    let log = mesh_tests::wait_for(
        "the refusal in n2's log",
        Duration::from_secs(10),
        || async {
            let text = std::fs::read_to_string(mesh.dir.path().join("n2.log")).ok()?;
            text.contains("no token").then_some(text)
        },
    )
    .await;
    assert!(log.contains("stream refused"), "{log}");
    assert!(
        mesh.node("n2").is_running(),
        "it keeps trying, with backoff"
    );
    let nodes = client.nodes().await.unwrap();
    assert!(nodes.iter().all(|n| n.node_id.as_str() != "n2"));
}

/// A run belongs to the namespace it was submitted in: another namespace's callers cannot
/// get, watch, list or act on it (`NOT_FOUND`, as for a run that never was), its idempotency
/// key is its namespace's own, and a cluster admin sees it by naming its namespace.
#[tokio::test]
async fn a_namespace_sees_and_acts_on_its_own_runs_only() {
    let mesh = secured().await;
    let team_a = member(&mesh, "team-a", "write").await;
    let team_b = member(&mesh, "team-b", "admin").await;
    let gate = "steps:\n  - { id: gate, approval: { message: ok? } }\n";
    let mut goal_a = mesh_tests::workflow_goal(gate, json!({}));
    goal_a.idempotency_key = Some("nightly".into());
    let run = team_a.submit(goal_a.clone()).await.unwrap();
    let view = team_a.get_run(&run.run_id).await.unwrap();
    assert_eq!(view.namespace.as_str(), "team-a");

    let not_found = |e: mesh_agent_sdk::ClientError| {
        assert_eq!(e.code(), Some(RpcCode::NotFound), "{e}");
        assert!(e.to_string().contains("not found"), "{e}");
    };
    not_found(team_b.get_run(&run.run_id).await.unwrap_err());
    not_found(
        team_b
            .cancel_run(&run.run_id, "mine now")
            .await
            .unwrap_err(),
    );
    not_found(
        team_b
            .decide(&run.run_id, "gate", true, "", "")
            .await
            .unwrap_err(),
    );
    not_found(
        team_b
            .signal(&run.run_id, "go", &json!(null))
            .await
            .err()
            .unwrap(),
    );
    match team_b.watch(&run.run_id).await {
        Ok(_) => panic!("team-b watched team-a's run"),
        Err(e) => not_found(e),
    }
    assert!(
        team_b
            .list_runs(None, 100, None)
            .await
            .unwrap()
            .runs
            .is_empty()
    );
    let listed = team_a.list_runs(None, 100, None).await.unwrap();
    assert_eq!(listed.runs.len(), 1);
    assert_eq!(listed.runs[0].run_id, run.run_id);

    // The same key in another namespace is another goal, not team-a's run.
    let mut goal_b = goal_a.clone();
    goal_b.objective = "b's own".into();
    let run_b = team_b.submit(goal_b).await.unwrap();
    assert!(run_b.created);
    assert_ne!(run_b.run_id, run.run_id);
    let again = team_a.submit(goal_a).await.unwrap();
    assert!(!again.created);
    assert_eq!(again.run_id, run.run_id);

    // The cluster admin acts in a namespace by naming it.
    let admin = mesh.client().await.with_namespace("team-a").unwrap();
    let decided = admin
        .decide(&run.run_id, "gate", true, "ok", "")
        .await
        .unwrap();
    assert_eq!(decided.state, RunState::Succeeded);
    not_found(mesh.client().await.get_run(&run.run_id).await.unwrap_err());
}

/// A node serves the namespace its stream was opened in: it gets that namespace's tasks and
/// no other's (a run of another namespace finds no agent, whatever labels its step names),
/// its namespace's callers alone list it, and another namespace cannot take over its name.
#[tokio::test]
async fn a_node_serves_its_own_namespace_only() {
    let mut mesh = secured().await;
    mesh.worker_token = Some(token(&mesh, "team-a", "worker", &["--name", "a-node"]).await);
    mesh.spawn_node_in(
        "a1",
        "namespaces = [\"team-a\"]\n[[agents]]\nkind = \"echo\"\n",
        None,
        None,
    );
    mesh.wait_healthy("a1").await;
    let team_a = member(&mesh, "team-a", "write").await;
    let team_b = member(&mesh, "team-b", "write").await;

    let run = team_a
        .submit(goal("a's", &[("e", "echo", json!({"x": 1}), &[])]))
        .await
        .unwrap();
    let view = team_a.wait(&run.run_id).await.unwrap();
    assert_eq!(view.state, RunState::Succeeded);
    assert_eq!(view.steps[0].agent.as_ref().unwrap().node.as_str(), "a1");

    // team-b's run of the same skill, even naming team-a's label, finds no agent.
    let escape = "steps:\n  - { id: e, uses: echo, labels: { mesh.namespace: team-a } }\n";
    let run_b = team_b
        .submit(mesh_tests::workflow_goal(escape, json!({})))
        .await
        .unwrap();
    let view = tokio::time::timeout(Duration::from_secs(20), team_b.wait(&run_b.run_id))
        .await
        .expect("the run ends")
        .unwrap();
    assert_eq!(view.state, RunState::Failed, "{view:?}");
    let error = view.steps[0].error.clone().unwrap_or_default();
    assert!(error.contains("mesh.namespace=team-b"), "{error}");
    let ran = std::fs::read_to_string(mesh.exec_log("a1")).unwrap_or_default();
    assert_eq!(ran.lines().count(), 1, "a1 ran team-a's task only: {ran}");

    // Lists: team-a sees its node, team-b none.
    let names = |nodes: Vec<mesh_agent_sdk::NodeView>| -> Vec<String> {
        nodes.into_iter().map(|n| n.node_id.0).collect()
    };
    assert_eq!(names(team_a.nodes().await.unwrap()), ["a1"]);
    assert!(team_b.nodes().await.unwrap().is_empty());
    assert!(team_b.agents(None).await.unwrap().is_empty());

    // A team-b worker cannot take over `a1`.
    let b_worker = token(&mesh, "team-b", "worker", &["--name", "b-node"]).await;
    let config = mesh.dir.path().join("impostor.toml");
    std::fs::write(
        &config,
        format!(
            "coordinator = \"{}\"\nname = \"a1\"\nnamespaces = [\"team-b\"]\nreconnect_min = \"50ms\"\nreconnect_max = \"200ms\"\n[[agents]]\nkind = \"echo\"\n",
            mesh.url()
        ),
    )
    .unwrap();
    let impostor = mesh_harness::Proc::spawn(
        &mesh_tests::mesh_bin(),
        "impostor",
        mesh.dir.path(),
        &["node", "--config", config.to_str().unwrap()],
        &[("MESH_TOKEN", b_worker.as_str())],
    )
    .unwrap();
    mesh_tests::wait_for("the impostor refused", Duration::from_secs(10), || async {
        let log = std::fs::read_to_string(mesh.dir.path().join("impostor.log")).ok()?;
        log.contains("is live in another namespace").then_some(())
    })
    .await;
    drop(impostor);
    let still = team_a
        .submit(goal("a's again", &[("e", "echo", json!({}), &[])]))
        .await
        .unwrap();
    assert_eq!(
        team_a.wait(&still.run_id).await.unwrap().state,
        RunState::Succeeded
    );

    // A namespace's admin drains its own node; another namespace's admin does not find it.
    let b_admin = member(&mesh, "team-b", "admin").await;
    let err = b_admin.drain_node("a1", "not yours").await.unwrap_err();
    assert_eq!(err.code(), Some(RpcCode::NotFound), "{err}");
    let a_admin = member(&mesh, "team-a", "admin").await;
    let drained = a_admin.drain_node("a1", "maintenance").await.unwrap();
    assert_eq!(drained.node_id.as_str(), "a1");
}

/// `mesh certs dev` writes a CA and certificates. A coordinator with TLS and a client CA
/// takes node streams only with a certificate it signed, for the node's own name; clients
/// reach it over https with the CA and a token; plain http and another CA are refused.
#[tokio::test]
async fn nodes_need_a_certificate_for_their_name_and_clients_the_ca() {
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path().to_str().unwrap().to_owned();
    let out = std::process::Command::new(mesh_tests::mesh_bin())
        .args(["certs", "dev", &dir, "--node", "n1", "--node", "n2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = std::fs::metadata(certs.path().join("n1.key"))
        .unwrap()
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    let timings = Timings {
        coordinator_extra: "[auth]\nenabled = true\n".into(),
        certs: Some(certs.path().to_owned()),
        ..Timings::default()
    };
    let mut mesh = Mesh::start(timings).await;
    assert!(mesh.url().starts_with("https://"));
    mesh.worker_token = Some(token_over_tls(&mesh, "worker").await);
    mesh.start_node("n1", "[[agents]]\nkind = \"echo\"\n").await;
    let client = mesh.client().await;
    let run = client
        .submit(goal("over tls", &[("e", "echo", json!({"x": 1}), &[])]))
        .await
        .unwrap();
    assert_eq!(
        client.wait(&run.run_id).await.unwrap().state,
        RunState::Succeeded
    );

    // n1's certificate under another name is refused.
    let impostor = |name: &str, tls: &str| {
        format!(
            "coordinator = \"{}\"\nname = \"{name}\"\nreconnect_min = \"50ms\"\nreconnect_max = \"200ms\"\n[[agents]]\nkind = \"echo\"\n[tls]\n{tls}",
            mesh.url()
        )
    };
    let refused = |file: &'static str, config: String, says: &'static str| {
        let path = mesh.dir.path().join(format!("{file}.toml"));
        std::fs::write(&path, config).unwrap();
        let proc = mesh_harness::Proc::spawn(
            &mesh_tests::mesh_bin(),
            file,
            mesh.dir.path(),
            &["node", "--config", path.to_str().unwrap()],
            &[("MESH_TOKEN", mesh.worker_token.as_deref().unwrap())],
        )
        .unwrap();
        let log = mesh.dir.path().join(format!("{file}.log"));
        async move {
            mesh_tests::wait_for(says, Duration::from_secs(10), || async {
                std::fs::read_to_string(&log)
                    .ok()
                    .filter(|l| l.contains(says))
                    .map(|_| ())
            })
            .await;
            drop(proc);
        }
    };
    refused(
        "wrong-name",
        impostor(
            "n2",
            &format!("ca_file = \"{dir}/ca.pem\"\ncert_file = \"{dir}/n1.pem\"\nkey_file = \"{dir}/n1.key\"\n"),
        ),
        "the client certificate is not for node `n2`",
    )
    .await;
    refused(
        "no-cert",
        impostor("n2", &format!("ca_file = \"{dir}/ca.pem\"\n")),
        "needs a client certificate",
    )
    .await;
    let names: Vec<String> = client
        .nodes()
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.node_id.0)
        .collect();
    assert_eq!(names, ["n1"]);

    // Plain http to the TLS port, or a CA that did not sign the coordinator: no answer.
    let plain = format!("http://127.0.0.1:{}", mesh.grpc_port);
    let answered = match GoalClient::connect(&plain).await {
        Ok(c) => c.nodes().await.is_ok(),
        Err(_) => false,
    };
    assert!(!answered, "plain http answered");
    let other = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(mesh_tests::mesh_bin())
        .args(["certs", "dev", other.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(status.status.success());
    let foreign = mesh_agent_sdk::TlsFiles {
        ca_file: Some(other.path().join("ca.pem")),
        ..Default::default()
    };
    let answered = match GoalClient::connect_with(&mesh.url(), &foreign).await {
        Ok(c) => c.nodes().await.is_ok(),
        Err(_) => false,
    };
    assert!(!answered, "a foreign CA was trusted");
}

/// A token of `role` in `default`, made by the cluster admin over https with the CLI.
async fn token_over_tls(mesh: &Mesh, role: &str) -> String {
    let admin = mesh.admin_token.clone().unwrap();
    let ca = mesh.client_tls().ca_file.unwrap();
    let mut all = vec!["--coordinator".to_owned(), mesh.url(), "--ca".to_owned()];
    all.push(ca.to_str().unwrap().to_owned());
    all.extend(["token", "create", "--role", role].map(str::to_owned));
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(mesh_tests::mesh_bin())
            .args(&all)
            .env("MESH_TOKEN", admin)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Secure by default: told to listen beyond loopback without TLS and authentication, the
/// coordinator refuses to start, naming what is missing; with `--insecure` it starts and
/// warns; with both it starts quietly.
#[tokio::test]
async fn beyond_loopback_the_coordinator_needs_tls_and_tokens_or_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let args = |data: &str| {
        vec![
            "coordinator".to_owned(),
            "--listen".to_owned(),
            format!("0.0.0.0:{}", mesh_tests::free_port()),
            "--http-listen".to_owned(),
            format!("127.0.0.1:{}", mesh_tests::free_port()),
            "--data-dir".to_owned(),
            dir.path().join(data).to_str().unwrap().to_owned(),
        ]
    };
    let refused = std::process::Command::new(mesh_tests::mesh_bin())
        .args(args("a"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{err}");
    assert!(
        err.contains("beyond loopback the coordinator needs [tls] and [auth] enabled = true"),
        "{err}"
    );
    assert!(err.contains("--insecure"), "{err}");

    let mut insecure = args("b");
    insecure.push("--insecure".to_owned());
    let refs: Vec<&str> = insecure.iter().map(String::as_str).collect();
    let proc =
        mesh_harness::Proc::spawn(&mesh_tests::mesh_bin(), "insecure", dir.path(), &refs, &[])
            .unwrap();
    mesh_tests::wait_for("the warning", Duration::from_secs(10), || async {
        let log = std::fs::read_to_string(dir.path().join("insecure.log")).ok()?;
        log.contains("without TLS or tokens (--insecure)")
            .then_some(())
    })
    .await;
    drop(proc);
}

/// `mesh dev --secure` runs the whole local mesh with mutual TLS and tokens: certificates and
/// a cluster admin token in its data directory, nodes with their certificates and a worker
/// token, and the sample goal runs to the end; it prints how to use it, never the token.
#[tokio::test]
async fn mesh_dev_secure_runs_the_sample_goal_over_mutual_tls_with_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (grpc, http) = (mesh_tests::free_port(), mesh_tests::free_port());
    let out = tokio::task::spawn_blocking({
        let data = data.clone();
        move || {
            std::process::Command::new(mesh_tests::mesh_bin())
                .args(["dev", "--secure", "--demo"])
                .args(["--listen", &format!("127.0.0.1:{grpc}")])
                .args(["--http-listen", &format!("127.0.0.1:{http}")])
                .args(["--data-dir", data.to_str().unwrap()])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("succeeded"), "{stdout}");
    assert!(
        stdout.contains(&format!("export MESH_COORDINATOR=https://127.0.0.1:{grpc}")),
        "{stdout}"
    );
    let admin = std::fs::read_to_string(data.join("admin.token")).unwrap();
    assert!(!stdout.contains(admin.trim()) && !stderr.contains(admin.trim()));
    for file in ["ca.pem", "coordinator.pem", "node-1.pem", "node-2.key"] {
        assert!(data.join("certs").join(file).exists(), "{file}");
    }
}

/// Registered workflows are each namespace's own: another namespace neither reads nor lists
/// them, registers the same name and version with other content without a clash, and a
/// goal naming the workflow runs its own namespace's definition.
#[tokio::test]
async fn registered_workflows_are_each_namespaces_own() {
    let mut mesh = secured().await;
    mesh.worker_token = Some(token(&mesh, "team-a", "worker", &["--name", "a-node"]).await);
    mesh.start_node(
        "n1",
        "namespaces = [\"team-a\"]\n[[agents]]\nkind = \"echo\"\n",
    )
    .await;
    let team_a = member(&mesh, "team-a", "write").await;
    let team_b = member(&mesh, "team-b", "write").await;
    let def = |who: &str| {
        format!(
            "name: review\nversion: 1\nsteps:\n  - {{ id: s, uses: echo, with: {{ by: {who} }} }}\noutputs:\n  by: \"${{{{ steps.s.output.with.by }}}}\"\n"
        )
    };
    let (record, created) = team_a.register_workflow(&def("a")).await.unwrap();
    assert!(created);
    assert_eq!(record.name, "review");
    let e = team_b.get_workflow("review", None).await.unwrap_err();
    assert_eq!(e.code(), Some(RpcCode::NotFound), "{e}");
    assert!(e.to_string().contains("`review"), "{e}");
    assert!(!e.to_string().contains('\u{1f}'), "{e}");
    assert!(
        team_b
            .list_workflows(None, 100, None)
            .await
            .unwrap()
            .0
            .is_empty()
    );
    let (theirs, created) = team_b.register_workflow(&def("b")).await.unwrap();
    assert!(created, "no clash with team-a's review@1");
    assert_eq!(theirs.name, "review");
    let listed = team_a.list_workflows(None, 100, None).await.unwrap().0;
    assert_eq!(listed.len(), 1);
    assert!(listed[0].definition.contains("by: a"));

    let mut goal = mesh_tests::workflow_goal("steps: []", json!({}));
    goal.workflow = None;
    goal.workflow_ref = Some("review".into());
    let run = team_a.submit(goal).await.unwrap();
    let view = team_a.wait(&run.run_id).await.unwrap();
    assert_eq!(view.state, RunState::Succeeded, "{view:?}");
    assert_eq!(view.output.unwrap()["by"], "a");
}

/// Quotas per namespace: past its runs in progress or its submissions per second a
/// namespace is refused with RESOURCE_EXHAUSTED naming the quota and when to retry; other
/// namespaces go on, and a retried submission of a known key is not counted.
#[tokio::test]
async fn namespaces_are_held_to_their_quotas() {
    let timings = Timings {
        coordinator_extra: "[auth]\nenabled = true\n[quotas.default]\nsubmissions_per_second = 3\n[quotas.namespaces.small]\nmax_active_runs = 1\n".into(),
        ..Timings::default()
    };
    let mesh = Mesh::start(timings).await;
    let small = member(&mesh, "small", "write").await;
    let busy = member(&mesh, "busy", "write").await;
    let gate = || {
        let mut g = mesh_tests::workflow_goal(
            "steps:\n  - { id: gate, approval: { message: ok? } }\n",
            json!({}),
        );
        g.idempotency_key = Some("first".into());
        g
    };
    let held = small.submit(gate()).await.unwrap();
    let again = small.submit(gate()).await.unwrap();
    assert_eq!(again.run_id, held.run_id, "a known key is not counted");
    let mut other = gate();
    other.idempotency_key = None;
    let e = small.submit(other).await.unwrap_err();
    assert_eq!(e.code(), Some(RpcCode::ResourceExhausted), "{e}");
    assert!(
        e.to_string().contains(
            "namespace `small` has 1 runs in progress, its quota (max_active_runs) is 1; retry in"
        ),
        "{e}"
    );
    // `busy` has the default quota: 3 at once, then a wait.
    let mut refused = None;
    for i in 0..20 {
        let mut g = gate();
        g.idempotency_key = Some(format!("b{i}"));
        if let Err(e) = busy.submit(g).await {
            refused = Some(e);
            break;
        }
    }
    let e = refused.expect("past 3 submissions in a second, one is refused");
    assert_eq!(e.code(), Some(RpcCode::ResourceExhausted), "{e}");
    assert!(
        e.to_string()
            .contains("over its quota of 3 submissions per second"),
        "{e}"
    );
}

/// Runs the `mesh` CLI with `token` and `stdin`; returns (success, stdout, stderr).
async fn cli_in(mesh: &Mesh, token: &str, args: &[&str], stdin: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut all = vec!["--coordinator".to_owned(), mesh.url()];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    let (token, stdin) = (token.to_owned(), stdin.to_owned());
    let out = tokio::task::spawn_blocking(move || {
        let mut child = std::process::Command::new(mesh_tests::mesh_bin())
            .args(&all)
            .env("MESH_TOKEN", token)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The audit rows of `method` in `namespace`, as JSON, read by `admin` with the CLI.
async fn audit_of(mesh: &Mesh, admin: &str, namespace: &str, method: &str) -> String {
    let args = [
        "--namespace",
        namespace,
        "--output",
        "json",
        "audit",
        "ls",
        "--method",
        method,
    ];
    let (ok, audit, err) = cli(mesh, admin, &args).await;
    assert!(ok, "{err}");
    audit
}

/// Every file under `dir`, whose bytes hold `needle`.
fn files_holding(dir: &std::path::Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                todo.push(path);
            } else if let Ok(bytes) = std::fs::read(&path)
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

/// A namespace's secret, set with `mesh secret set` from stdin, reaches the model provider as
/// the key of the step that names it (`api_key: ${{ secrets.… }}`), and nowhere else: not the
/// store, not a log of any process, not the run's view or any answer, not an agent's output
/// (an echo of it comes back as its placeholder). A secret that is not set fails its step for
/// good, naming it; another namespace's secret of the same name is not it.
#[tokio::test]
async fn a_secret_reaches_the_provider_and_nowhere_else() {
    use mesh_tests::fake_llm::{FakeLlm, Wire};
    const VALUE: &str = "sk-secret-7c1d9e0f3a2b4c5d6e7f8091";
    let fake = FakeLlm::start(VALUE).await;
    let keys = tempfile::tempdir().unwrap();
    let key_file = keys.path().join("secrets.key");
    let (ok, _, err) = {
        let out = std::process::Command::new(mesh_tests::mesh_bin())
            .args(["secret", "key", key_file.to_str().unwrap()])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::new(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert!(ok, "{err}");
    let mut mesh = Mesh::start(Timings {
        coordinator_extra: format!(
            "[auth]\nenabled = true\n[secrets]\nkey_file = \"{}\"\n",
            key_file.display()
        ),
        ..Timings::default()
    })
    .await;
    mesh.worker_token = Some(token(&mesh, "team-a", "worker", &["--name", "a-node"]).await);
    // The node has no key of its own for the provider.
    mesh.spawn_node_in(
        "a1",
        &format!(
            "namespaces = [\"team-a\"]\n[[agents]]\nkind = \"llm\"\n[[agents]]\nkind = \"echo\"\n[llm.openai]\nbase_url = \"{}\"\n",
            fake.base_url(Wire::OpenAi)
        ),
        None,
        None,
    );
    mesh.wait_healthy("a1").await;
    let admin = mesh.admin_token.clone().unwrap();
    let (ok, _, err) = cli_in(
        &mesh,
        &admin,
        &["secret", "set", "team-a", "OPENAI_KEY"],
        &format!("{VALUE}\n"),
    )
    .await;
    assert!(ok, "{err}");
    // team-b has a secret of the same name, with another value.
    let (ok, _, err) = cli_in(
        &mesh,
        &admin,
        &["secret", "set", "team-b", "OPENAI_KEY"],
        "not-the-key",
    )
    .await;
    assert!(ok, "{err}");
    let (ok, listed, err) = cli(
        &mesh,
        &admin,
        &["--output", "json", "secret", "ls", "team-a"],
    )
    .await;
    assert!(ok, "{err}");
    let listed: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["secrets"][0]["name"], "OPENAI_KEY", "{listed}");

    let team_a = member(&mesh, "team-a", "write").await;
    let flow = r#"
steps:
  - id: ask
    uses: llm
    with:
      model: openai/gpt-4o-mini
      prompt: "Say hello"
      api_key: "${{ secrets.OPENAI_KEY }}"
  - id: leak
    uses: echo
    with: { header: "Bearer ${{ secrets.OPENAI_KEY }}" }
"#;
    let run = team_a
        .submit(mesh_tests::workflow_goal(flow, json!({})))
        .await
        .unwrap();
    let view = tokio::time::timeout(Duration::from_secs(30), team_a.wait(&run.run_id))
        .await
        .expect("the run ends")
        .unwrap();
    assert_eq!(view.state, RunState::Succeeded, "{view:?}");
    let answer = view.steps[0].output.clone().unwrap();
    assert!(
        answer["text"].as_str().is_some_and(|t| !t.is_empty()),
        "{answer}"
    );
    let echoed = view.steps[1].output.clone().unwrap().to_string();
    assert!(
        echoed.contains("Bearer ${{ secrets.OPENAI_KEY }}"),
        "the echo comes back as the placeholder: {echoed}"
    );

    // Not set: the step fails for good, naming the secret and the namespace.
    let missing = "steps:\n  - { id: m, uses: echo, with: { k: \"${{ secrets.NOPE }}\" } }\n";
    let run = team_a
        .submit(mesh_tests::workflow_goal(missing, json!({})))
        .await
        .unwrap();
    let failed = team_a.wait(&run.run_id).await.unwrap();
    assert_eq!(failed.state, RunState::Failed);
    let error = failed.steps[0].error.clone().unwrap_or_default();
    assert!(
        error.contains("secret `NOPE` is not set in namespace `team-a`"),
        "{error}"
    );
    assert_eq!(failed.steps[0].attempt, 1, "not retried");
    // A bad reference is refused at submission, naming the rule.
    let bad = "steps:\n  - { id: m, uses: echo, with: { k: \"${{ secrets.A + 'x' }}\" } }\n";
    let err = team_a
        .submit(mesh_tests::workflow_goal(bad, json!({})))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(RpcCode::InvalidArgument), "{err}");
    assert!(err.to_string().contains("a secret is named alone"), "{err}");

    // Every answer a client got, every file of the mesh (stores, logs of every process).
    let answers = format!("{view:?} {failed:?} {listed}");
    assert!(!answers.contains(VALUE));
    let run_json = cli(
        &mesh,
        &admin,
        &[
            "--namespace",
            "team-a",
            "--output",
            "json",
            "run",
            "get",
            run.run_id.as_str(),
        ],
    )
    .await
    .1;
    assert!(!run_json.contains(VALUE));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let holding = files_holding(mesh.dir.path(), VALUE.as_bytes());
    assert!(holding.is_empty(), "the secret is in {holding:?}");
    // The audit names who set it, not its value.
    let audit = audit_of(&mesh, &admin, "team-a", "/mesh.v1.SecretService/SetSecret").await;
    assert!(
        audit.contains("secret/OPENAI_KEY") && audit.contains("bootstrap"),
        "{audit}"
    );

    // Deleted, it is gone: a write token may not delete it, the admin may.
    let (ok, _, err) = cli(
        &mesh,
        &token(&mesh, "team-a", "write", &[]).await,
        &["secret", "rm", "team-a", "OPENAI_KEY"],
    )
    .await;
    assert!(!ok && err.contains("admin"), "{err}");
    let (ok, _, err) = cli(&mesh, &admin, &["secret", "rm", "team-a", "OPENAI_KEY"]).await;
    assert!(ok, "{err}");
    let (ok, _, err) = cli(&mesh, &admin, &["secret", "rm", "team-a", "OPENAI_KEY"]).await;
    assert!(
        !ok && err.contains("not set in namespace `team-a`"),
        "{err}"
    );
}

/// JWTs of an outside issuer (`[auth.jwt]`): their `permissions` claim's `namespace:role`
/// entries are the caller's roles, as Temporal's claim mapper reads them. A worker JWT for two
/// namespaces lets one node serve both; a node asking for a namespace its token lacks is
/// refused naming it. Expired, wrong-audience, wrong-issuer, foreign-key and symmetric tokens
/// are UNAUTHENTICATED, each naming why; the audit log names the JWT's subject.
#[tokio::test]
async fn jwts_of_an_outside_issuer_grant_their_namespace_roles() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    let keys = tempfile::tempdir().unwrap();
    let issuer = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let stranger = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let public = keys.path().join("issuer.pem");
    std::fs::write(&public, issuer.public_key_pem()).unwrap();
    let mut mesh = Mesh::start(Timings {
        coordinator_extra: format!(
            "[auth]\nenabled = true\n[auth.jwt]\nissuer = \"https://id.example.test\"\naudience = \"agentmesh\"\npublic_key_files = [\"{}\"]\nalgorithms = [\"ES256\"]\n",
            public.display()
        ),
        ..Timings::default()
    })
    .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = |sub: &str, permissions: &[&str]| {
        json!({
            "iss": "https://id.example.test", "aud": "agentmesh", "sub": sub,
            "exp": now + 600, "permissions": permissions,
        })
    };
    let sign = |claims: &Value, key: &rcgen::KeyPair| {
        let key = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
        encode(&Header::new(Algorithm::ES256), claims, &key).unwrap()
    };
    let url = mesh.url();
    let as_member = |token: String, namespace: &'static str| {
        let url = url.clone();
        async move {
            GoalClient::connect(&url)
                .await
                .unwrap()
                .with_token(&token)
                .unwrap()
                .with_namespace(namespace)
                .unwrap()
        }
    };

    // One node serves team-a and team-b with one worker JWT.
    let worker = sign(
        &claims("node-ab", &["team-a:worker", "team-b:worker"]),
        &issuer,
    );
    mesh.worker_token = Some(worker);
    mesh.spawn_node_in(
        "ab",
        "namespaces = [\"team-a\", \"team-b\"]\n[[agents]]\nkind = \"echo\"\n",
        None,
        None,
    );
    mesh.wait_healthy("ab").await;
    let alice = sign(&claims("alice", &["team-a:write"]), &issuer);
    let bob = sign(&claims("bob", &["team-b:write", "team-c:read"]), &issuer);
    for (token, namespace) in [(alice.clone(), "team-a"), (bob.clone(), "team-b")] {
        let client = as_member(token, namespace).await;
        let run = client
            .submit(goal(namespace, &[("e", "echo", json!({}), &[])]))
            .await
            .unwrap();
        let view = client.wait(&run.run_id).await.unwrap();
        assert_eq!(view.state, RunState::Succeeded, "{namespace}: {view:?}");
        assert_eq!(view.steps[0].agent.as_ref().unwrap().node.as_str(), "ab");
    }
    let err = as_member(alice.clone(), "team-b")
        .await
        .submit(goal("b", &[("e", "echo", json!({}), &[])]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(RpcCode::PermissionDenied), "{err}");
    assert!(err.to_string().contains("jwt:alice"), "{err}");

    // A node of two namespaces is drained only by an admin of both.
    let a_admin = as_member(sign(&claims("carol", &["team-a:admin"]), &issuer), "team-a").await;
    let err = a_admin.drain_node("ab", "mine?").await.unwrap_err();
    assert_eq!(err.code(), Some(RpcCode::PermissionDenied), "{err}");
    assert!(
        err.to_string().contains("serves namespace `team-b` too"),
        "{err}"
    );

    // Refused, each naming why.
    let mut expired = claims("alice", &["team-a:write"]);
    expired["exp"] = json!(now - 600);
    let mut audience = claims("alice", &["team-a:write"]);
    audience["aud"] = json!("another-service");
    let mut issued_elsewhere = claims("alice", &["team-a:write"]);
    issued_elsewhere["iss"] = json!("https://evil.example.test");
    let symmetric = encode(
        &Header::new(Algorithm::HS256),
        &claims("alice", &["team-a:write"]),
        &EncodingKey::from_secret(b"guessable").unwrap(),
    )
    .unwrap();
    let cases = [
        (sign(&expired, &issuer), "expired"),
        (sign(&audience, &issuer), "audience is not `agentmesh`"),
        (sign(&issued_elsewhere, &issuer), "issuer is not"),
        (
            sign(&claims("alice", &["team-a:write"]), &stranger),
            "signature does not verify",
        ),
        (symmetric, "algorithm"),
        ("not.a.jwt".to_owned(), "not a well-formed JWT"),
    ];
    for (token, why) in cases {
        let err = as_member(token, "team-a").await.nodes().await.unwrap_err();
        assert_eq!(err.code(), Some(RpcCode::Unauthenticated), "{why}: {err}");
        assert!(err.to_string().contains(why), "{why}: {err}");
    }

    // A node asking for a namespace its token does not grant is refused, naming it.
    let config = mesh.dir.path().join("greedy.toml");
    std::fs::write(
        &config,
        format!(
            "coordinator = \"{}\"\nname = \"greedy\"\nnamespaces = [\"team-a\", \"team-c\"]\nreconnect_min = \"50ms\"\nreconnect_max = \"200ms\"\n[[agents]]\nkind = \"echo\"\n",
            mesh.url()
        ),
    )
    .unwrap();
    let worker_ab = mesh.worker_token.clone().unwrap();
    let greedy = mesh_harness::Proc::spawn(
        &mesh_tests::mesh_bin(),
        "greedy",
        mesh.dir.path(),
        &["node", "--config", config.to_str().unwrap()],
        &[("MESH_TOKEN", worker_ab.as_str())],
    )
    .unwrap();
    mesh_tests::wait_for(
        "the greedy node refused",
        Duration::from_secs(10),
        || async {
            let log = std::fs::read_to_string(mesh.dir.path().join("greedy.log")).ok()?;
            log.contains("in namespace `team-c`").then_some(())
        },
    )
    .await;
    drop(greedy);

    // The audit log names the JWT's subject.
    let admin = mesh.admin_token.clone().unwrap();
    let audit = audit_of(&mesh, &admin, "team-a", "/mesh.v1.GoalService/SubmitGoal").await;
    assert!(audit.contains("jwt:alice"), "{audit}");
}
