//! Sandboxed code (docs/tools.md): the `code` agent of a real node runs Python and shell in
//! bubblewrap with limits, and code that tries to get out fails: the network, files outside
//! its directory, a fork bomb, memory, time, output. Needs `bwrap` (Debian's bubblewrap,
//! installed by `.ci/run`).

use std::time::{Duration, Instant};

use mesh_agent_sdk::{RunState, RunView};
use mesh_tests::fake_llm::{FakeLlm, Wire};
use mesh_tests::{Mesh, Timings, workflow_goal};
use serde_json::{Value, json};

async fn code_mesh() -> Mesh {
    let mut mesh = Mesh::start(Timings::default()).await;
    mesh.start_node("n1", "[[agents]]\nkind = \"code\"\nmax_concurrency = 4\n")
        .await;
    mesh
}

async fn run_code(mesh: &Mesh, with: Value) -> RunView {
    let client = mesh.client().await;
    let text = json!({ "steps": [{ "id": "run", "uses": "code", "with": with,
        "retry": { "max_attempts": 1 } }] })
    .to_string();
    let run = client
        .submit(workflow_goal(&text, json!({})))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(60), client.wait(&run.run_id))
        .await
        .expect("the run finishes")
        .unwrap()
}

async fn python(mesh: &Mesh, code: &str, limits: Value) -> RunView {
    let mut with = json!({ "language": "python", "code": code });
    with.as_object_mut()
        .unwrap()
        .extend(limits.as_object().unwrap().clone());
    run_code(mesh, with).await
}

fn stdout(view: &RunView) -> String {
    assert_eq!(view.state, RunState::Succeeded, "{view:?}");
    view.steps[0].output.as_ref().unwrap()["stdout"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn error(view: &RunView) -> String {
    assert_eq!(view.state, RunState::Failed, "{view:?}");
    view.steps[0].error.clone().unwrap_or_default()
}

/// Python and shell run, with stdin; a non-zero exit fails the step with the end of stderr;
/// each run starts in a fresh, empty directory.
#[tokio::test]
async fn code_runs_in_a_fresh_directory_and_a_failure_says_why() {
    let mesh = code_mesh().await;
    let view = run_code(
        &mesh,
        json!({ "language": "python", "stdin": "three little words",
            "code": "import sys, os\nprint(len(sys.stdin.read().split()), os.getcwd(), os.listdir('.'))\nopen('left-behind', 'w').write('x')" }),
    )
    .await;
    assert_eq!(stdout(&view), "3 /work []\n");
    let out = view.steps[0].output.clone().unwrap();
    assert_eq!(out["exit_code"], 0);
    assert_eq!(out["limit"], Value::Null);
    // The next run does not see what the last one wrote.
    let view = python(&mesh, "import os; print(os.listdir('.'))", json!({})).await;
    assert_eq!(stdout(&view), "[]\n");
    let view = run_code(
        &mesh,
        json!({ "language": "shell", "code": "echo working; echo 'no such thing' >&2; exit 3" }),
    )
    .await;
    let e = error(&view);
    assert!(
        e.contains("exited with 3") && e.contains("no such thing"),
        "{e}"
    );
    let view = run_code(&mesh, json!({ "language": "ruby", "code": "puts 1" })).await;
    assert!(error(&view).contains("with.language: `ruby`: python or shell"));
}

/// Code that tries to get out fails: no network (not even the host's loopback, where a
/// listener waits and gets nothing), no file outside its directory (a file next to the
/// node's, `/etc/passwd`), no writing to `/usr`, no new user namespace.
#[tokio::test]
async fn code_cannot_reach_the_network_or_files_outside_its_directory() {
    let mesh = code_mesh().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let secret_dir = tempfile::tempdir().unwrap();
    let secret = secret_dir.path().join("secret.txt");
    std::fs::write(&secret, "the node's secret").unwrap();
    let code = format!(
        r#"
import os, socket
def attempt(what, f):
    try:
        f()
        print(what, "REACHED")
    except Exception as e:
        print(what, "blocked", type(e).__name__)
attempt("loopback", lambda: socket.create_connection(("127.0.0.1", {port}), timeout=2))
attempt("internet", lambda: socket.create_connection(("1.1.1.1", 443), timeout=2))
attempt("dns", lambda: socket.getaddrinfo("crates.io", 443))
attempt("secret", lambda: open({secret:?}).read())
attempt("passwd", lambda: open("/etc/passwd").read())
attempt("usr", lambda: open("/usr/escape", "w").write("x"))
attempt("userns", lambda: os.unshare(os.CLONE_NEWUSER))
print("root", sorted(os.listdir("/")))
print("uid", os.getuid())
"#,
        secret = secret.display().to_string(),
    );
    let view = python(&mesh, &code, json!({})).await;
    let out = stdout(&view);
    for what in [
        "loopback", "internet", "dns", "secret", "passwd", "usr", "userns",
    ] {
        assert!(
            out.contains(&format!("{what} blocked")),
            "{what} was not blocked:\n{out}"
        );
    }
    assert!(!out.contains("REACHED"), "{out}");
    assert!(
        out.contains("root ['bin', 'dev', 'lib', 'lib64', 'proc', 'usr', 'work']"),
        "{out}"
    );
    assert!(!out.contains("uid 0\n"), "the code is not root: {out}");
    // Nothing knocked on the host's loopback.
    let knocked = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
    assert!(knocked.is_err(), "the sandbox reached the host's loopback");
}

/// The limits hold: a fork bomb stops at the process limit and the run at its time limit,
/// memory past the limit is refused, a loop is stopped at its time limit, output past its cap
/// is cut; the node carries on.
#[tokio::test]
async fn a_fork_bomb_memory_time_and_output_stop_at_their_limits() {
    let mesh = code_mesh().await;

    let forks = r#"
import os, time
n = 0
while True:
    try:
        pid = os.fork()
    except OSError as e:
        print(n, type(e).__name__)
        break
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    n += 1
"#;
    let view = python(&mesh, forks, json!({ "processes": 16, "timeout": "5s" })).await;
    let out = stdout(&view);
    let n: u32 = out.split_whitespace().next().unwrap().parse().unwrap();
    assert!(n < 16, "{n} processes forked under a limit of 16: {out}");
    assert!(
        out.contains("BlockingIOError") || out.contains("OSError"),
        "{out}"
    );

    let began = Instant::now();
    let view = run_code(
        &mesh,
        json!({ "language": "shell", "code": "bomb() { bomb | bomb & }; bomb; sleep 60",
            "processes": 16, "timeout": "3s" }),
    )
    .await;
    let e = error(&view);
    assert!(e.contains("time limit"), "{e}");
    assert!(
        began.elapsed() < Duration::from_secs(15),
        "{:?}",
        began.elapsed()
    );

    let view = python(
        &mesh,
        "b = bytearray(1 << 30)\nprint(len(b))",
        json!({ "memory_mb": 128 }),
    )
    .await;
    let e = error(&view);
    assert!(e.contains("MemoryError"), "{e}");

    let began = Instant::now();
    let view = python(&mesh, "while True:\n    pass", json!({ "timeout": "2s" })).await;
    let e = error(&view);
    assert!(e.contains("time limit"), "{e}");
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "{:?}",
        began.elapsed()
    );

    let view = python(
        &mesh,
        "import sys\nsys.stdout.write('y' * 1000000)",
        json!({ "output_bytes": 1000 }),
    )
    .await;
    let e = error(&view);
    assert!(e.contains("output limit (1000 bytes)"), "{e}");

    // The node is still fine.
    let view = python(&mesh, "print('still here')", json!({})).await;
    assert_eq!(stdout(&view), "still here\n");
}

/// A model writes code as a tool call; the node runs it in the sandbox and gives the model its
/// output.
#[tokio::test]
async fn a_model_runs_code_through_the_code_tool() {
    let fake = FakeLlm::start("sk-test-sandbox-0123456789").await;
    let mut mesh = Mesh::start(Timings::default()).await;
    let node = format!(
        "[[agents]]\nkind = \"llm\"\n\n[llm.openai]\nbase_url = \"{}\"\napi_key = \"sk-test-sandbox-0123456789\"\n",
        fake.base_url(Wire::OpenAi)
    );
    mesh.start_node("n1", &node).await;
    fake.knobs()
        .call_tools(&[("run_python", json!({ "code": "print(sum(range(101)))" }))]);
    let client = mesh.client().await;
    let text = json!({ "steps": [{ "id": "ask", "uses": "llm", "with": {
        "model": "openai/coder", "prompt": "add 0..100",
        "tools": [{ "code": { "language": "python", "timeout": "5s" } }] } }] })
    .to_string();
    let view = mesh_tests::run_workflow(&client, &text, json!({})).await;
    assert_eq!(view.state, RunState::Succeeded, "{view:?}");
    let out = view.steps[0].output.clone().unwrap();
    let call = &out["tool_calls"][0];
    assert_eq!(call["tool"], "run_python");
    assert_eq!(call["ok"], true);
    let result: Value = serde_json::from_str(call["result"].as_str().unwrap()).unwrap();
    assert_eq!(result["stdout"], "5050\n");
    assert_eq!(result["exit_code"], 0);
    assert!(
        out["text"].as_str().unwrap().contains("5050"),
        "the model got the output: {out}"
    );
}
