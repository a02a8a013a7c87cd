//! Tools of the `llm` agent (docs/tools.md), through real processes: the fake provider asks for
//! tool calls in each provider's real streaming format, the node calls a real HTTP server on
//! loopback, and the model gets the result back in its next call.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::routing::get;
use mesh_agent_sdk::{RunState, RunView};
use mesh_tests::fake_llm::{FakeLlm, Wire};
use mesh_tests::{Mesh, Timings, workflow_goal};
use serde_json::{Value, json};

const KEY: &str = "sk-test-5f1e2d3c4b5a69788796a5b4";
const TOOL_TOKEN: &str = "tool-token-9a8b7c6d5e4f";

/// What the weather server was asked: path, query and `authorization` header.
type Asked = Arc<Mutex<Vec<(String, String, String)>>>;

/// A weather server on loopback: `GET /weather/{city}` answers `sunny in CITY` to a caller with
/// the right token, 401 otherwise; `/big` answers 100 KiB.
async fn weather_server() -> (std::net::SocketAddr, Asked, tokio::task::JoinHandle<()>) {
    let asked: Asked = Arc::default();
    async fn weather(
        State(asked): State<Asked>,
        Path(city): Path<String>,
        RawQuery(query): RawQuery,
        headers: HeaderMap,
    ) -> (axum::http::StatusCode, String) {
        let auth = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        asked.lock().unwrap().push((
            format!("/weather/{city}"),
            query.unwrap_or_default(),
            auth.clone(),
        ));
        if auth != format!("Bearer {TOOL_TOKEN}") {
            return (axum::http::StatusCode::UNAUTHORIZED, "no".into());
        }
        (axum::http::StatusCode::OK, format!("sunny in {city}"))
    }
    let app = Router::new()
        .route("/weather/{city}", get(weather))
        .route("/big", get(|| async { "x".repeat(100 * 1024) }))
        .with_state(asked.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, asked, server)
}

fn llm_node(fake: &FakeLlm) -> String {
    format!(
        r#"
[[agents]]
kind = "llm"
max_concurrency = 8

[llm.openai]
base_url = "{openai}"
api_key = "{KEY}"

[llm.anthropic]
base_url = "{anthropic}"
api_key = "{KEY}"
"#,
        openai = fake.base_url(Wire::OpenAi),
        anthropic = fake.base_url(Wire::Anthropic),
    )
}

fn weather_tool(addr: std::net::SocketAddr) -> Value {
    json!({
        "name": "weather",
        "description": "Today's weather in a city",
        "parameters": {
            "type": "object",
            "properties": { "city": { "type": "string" }, "units": { "type": "string" } },
            "required": ["city"]
        },
        "http": {
            "url": format!("http://{addr}/weather/{{city}}"),
            "headers": { "Authorization": format!("Bearer {TOOL_TOKEN}") },
        }
    })
}

async fn run_step(mesh: &Mesh, with: Value) -> RunView {
    let client = mesh.client().await;
    let text = json!({ "steps": [{ "id": "ask", "uses": "llm", "with": with }] }).to_string();
    let run = client
        .submit(workflow_goal(&text, json!({})))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), client.wait(&run.run_id))
        .await
        .expect("the run finishes")
        .unwrap()
}

async fn mesh_with(fake: &FakeLlm) -> Mesh {
    let mut mesh = Mesh::start(Timings::default()).await;
    mesh.start_node("n1", &llm_node(fake)).await;
    mesh
}

/// On OpenAI's and Anthropic's wires: the model asks for the weather, the node calls the
/// server (placeholder filled and percent-encoded, the other argument in the query, the header
/// sent), the model is given the answer and answers with it; the step's output lists the call,
/// and the usage counts both model calls.
#[tokio::test]
async fn a_model_calls_an_http_tool_and_answers_with_its_result() {
    let fake = FakeLlm::start(KEY).await;
    let (addr, asked, _server) = weather_server().await;
    let mesh = mesh_with(&fake).await;
    for model in ["openai/tool-model", "anthropic/tool-model"] {
        asked.lock().unwrap().clear();
        let before = fake.seen().len();
        fake.knobs()
            .call_tools(&[("weather", json!({ "city": "São Paulo", "units": "metric" }))]);
        let view = run_step(
            &mesh,
            json!({ "model": model, "prompt": "weather in Sao Paulo?", "tools": [weather_tool(addr)] }),
        )
        .await;
        assert_eq!(view.state, RunState::Succeeded, "{model}: {view:?}");
        let out = view.steps[0].output.clone().unwrap();
        assert_eq!(
            out["text"], "answer: tool said sunny in São Paulo",
            "{model}: {out}"
        );
        assert_eq!(out["turns"], 2, "{model}");
        assert_eq!(out["finish_reason"], "stop", "{model}");
        let calls = out["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 1, "{model}: {out}");
        assert_eq!(calls[0]["tool"], "weather");
        assert_eq!(calls[0]["turn"], 1);
        assert_eq!(calls[0]["ok"], true);
        assert_eq!(calls[0]["result"], "sunny in São Paulo");
        assert_eq!(
            calls[0]["arguments"],
            json!({ "city": "São Paulo", "units": "metric" })
        );
        let asked = asked.lock().unwrap().clone();
        assert_eq!(
            asked,
            [(
                "/weather/São Paulo".to_owned(),
                "units=metric".to_owned(),
                format!("Bearer {TOOL_TOKEN}")
            )],
            "{model}"
        );
        // Two model calls: the first offered the tool, the second carried its result.
        let seen = &fake.seen()[before..];
        assert_eq!(seen.len(), 2, "{model}");
        assert!(seen[0].body["tools"].to_string().contains("weather"));
        assert!(
            seen[1].body.to_string().contains("sunny in São Paulo"),
            "{model}: the result went back to the model: {}",
            seen[1].body
        );
        let usage = &out["usage"];
        assert!(
            usage["output_tokens"].as_u64().unwrap() > 5,
            "{model}: both calls counted: {usage}"
        );
    }
}

/// What goes wrong in a call is told to the model, which carries on: a host not allowed (no
/// request is made), arguments that break the schema, a tool that does not exist, an answer
/// over the cap (cut), and an HTTP error.
#[tokio::test]
async fn a_bad_call_is_told_to_the_model_and_nothing_unallowed_is_sent() {
    let fake = FakeLlm::start(KEY).await;
    let (addr, asked, _server) = weather_server().await;
    let mesh = mesh_with(&fake).await;
    let port = addr.port();
    let anywhere = json!({
        "name": "fetch",
        "parameters": { "type": "object", "properties": { "host": { "type": "string" },
            "path": { "type": "string" } }, "required": ["host", "path"] },
        "http": { "url": format!("http://{{host}}:{port}/{{path}}"), "allow_hosts": ["127.0.0.1"],
            "max_response_bytes": 1000 }
    });
    fake.knobs().call_tools(&[
        ("fetch", json!({ "host": "127.0.0.2", "path": "big" })),
        ("weather", json!({ "town": "Paris" })),
        ("teleport", json!({})),
        ("fetch", json!({ "host": "127.0.0.1", "path": "big" })),
    ]);
    let mut no_token = weather_tool(addr);
    no_token["name"] = json!("weather_anonymous");
    no_token["http"]["headers"] = json!({});
    fake.knobs()
        .call_tools(&[("weather_anonymous", json!({ "city": "Oslo" }))]);
    let view = run_step(
        &mesh,
        json!({ "model": "openai/tool-model", "prompt": "go", "max_turns": 3,
            "tools": [weather_tool(addr), anywhere, no_token] }),
    )
    .await;
    assert_eq!(view.state, RunState::Succeeded, "{view:?}");
    let out = view.steps[0].output.clone().unwrap();
    let calls = out["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 5, "{out}");
    let result = |i: usize| calls[i]["result"].as_str().unwrap().to_owned();
    assert_eq!(calls[0]["ok"], false);
    assert!(
        result(0).contains("host `127.0.0.2` is not allowed"),
        "{}",
        result(0)
    );
    assert_eq!(calls[1]["ok"], false);
    assert!(
        result(1).contains("invalid arguments") && result(1).contains("city"),
        "{}",
        result(1)
    );
    assert!(
        result(2).contains("no tool named `teleport`"),
        "{}",
        result(2)
    );
    assert_eq!(calls[3]["ok"], true);
    assert!(
        result(3).starts_with(&"x".repeat(1000))
            && result(3).ends_with("[answer cut at 1000 bytes]"),
        "{}",
        result(3)
    );
    assert_eq!(calls[4]["ok"], false);
    assert!(result(4).starts_with("HTTP 401"), "{}", result(4));
    assert_eq!(calls[4]["turn"], 2);
    // Only the anonymous weather call reached the server; the host not allowed got nothing.
    let asked = asked.lock().unwrap().clone();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(asked[0].0, "/weather/Oslo");
    assert_eq!(out["turns"], 3);
}

/// A model that keeps asking for tools is stopped at `max_turns`: the attempt fails for good,
/// naming the field; a bad declaration is refused before any call, naming its path.
#[tokio::test]
async fn the_tool_loop_is_bounded_and_bad_declarations_are_refused() {
    let fake = FakeLlm::start(KEY).await;
    let (addr, _asked, _server) = weather_server().await;
    let mesh = mesh_with(&fake).await;
    for _ in 0..3 {
        fake.knobs()
            .call_tools(&[("weather", json!({ "city": "Lima" }))]);
    }
    let view = run_step(
        &mesh,
        json!({ "model": "openai/tool-model", "prompt": "loop", "max_turns": 2,
            "tools": [weather_tool(addr)] }),
    )
    .await;
    assert_eq!(view.state, RunState::Failed, "{view:?}");
    let error = view.steps[0].error.clone().unwrap_or_default();
    assert!(
        error.contains("after 2 turns") && error.contains("with.max_turns: 2"),
        "{error}"
    );
    assert_eq!(view.steps[0].attempt, 1, "not retried: {view:?}");

    let before = fake.seen().len();
    let mut bad = weather_tool(addr);
    bad["http"]["url"] = json!("file:///etc/passwd");
    let view = run_step(
        &mesh,
        json!({ "model": "openai/tool-model", "prompt": "x", "tools": [bad] }),
    )
    .await;
    assert_eq!(view.state, RunState::Failed);
    let error = view.steps[0].error.clone().unwrap_or_default();
    assert!(error.contains("with.tools[0].http.url"), "{error}");
    assert_eq!(fake.seen().len(), before, "no model call was made");
}

/// The Python with the official MCP SDK that `scripts/check` installs (`target/py`), or
/// `$MESH_TEST_PYTHON`.
fn python() -> String {
    if let Ok(p) = std::env::var("MESH_TEST_PYTHON") {
        return p;
    }
    let local = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/py/bin/python");
    assert!(
        std::path::Path::new(local).exists(),
        "no Python with the MCP SDK: run scripts/check, or set MESH_TEST_PYTHON to a python \
         with `mcp==2.3.0` installed"
    );
    local.to_owned()
}

const MCP_SERVER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/mcp/server.py");

/// The MCP server over streamable HTTP on a free port, killed on drop.
struct HttpMcp {
    child: std::process::Child,
    port: u16,
}

impl Drop for HttpMcp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn http_mcp() -> HttpMcp {
    let port = mesh_tests::free_port();
    let child = std::process::Command::new(python())
        .args([MCP_SERVER, "http", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the MCP server");
    let server = HttpMcp { child, port };
    mesh_tests::wait_for(
        "the MCP server to listen",
        Duration::from_secs(20),
        || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
        },
    )
    .await;
    server
}

/// A step uses an MCP server's tools, over stdio (a child process the node starts with a
/// clean environment) and over streamable HTTP: the tools are listed and offered to the model,
/// calls go to the server and their results (errors included) back to the model.
#[tokio::test]
async fn a_model_uses_the_tools_of_an_mcp_server_over_stdio_and_http() {
    let fake = FakeLlm::start(KEY).await;
    let http = http_mcp().await;
    let node = format!(
        r#"{}
[mcp.notes]
command = ["{py}", "{MCP_SERVER}", "stdio"]
env = {{ NOTES_MODE = "test" }}

[mcp.notes_http]
url = "http://127.0.0.1:{port}/mcp"
"#,
        llm_node(&fake),
        py = python(),
        port = http.port,
    );
    let mut mesh = Mesh::start(Timings::default()).await;
    mesh.start_node("n1", &node).await;
    for server in ["notes", "notes_http"] {
        let before = fake.seen().len();
        fake.knobs().call_tools(&[
            ("add", json!({ "a": 2, "b": 3 })),
            ("shout", json!({ "text": "quiet please" })),
        ]);
        fake.knobs().call_tools(&[
            ("refuse", json!({ "reason": "not today" })),
            ("environment", json!({})),
        ]);
        let view = run_step(
            &mesh,
            json!({ "model": "openai/tool-model", "prompt": "use your tools",
                "tools": [{ "mcp": server }] }),
        )
        .await;
        assert_eq!(view.state, RunState::Succeeded, "{server}: {view:?}");
        let out = view.steps[0].output.clone().unwrap();
        let calls = out["tool_calls"].as_array().unwrap();
        let results: Vec<(&str, bool, &str)> = calls
            .iter()
            .map(|c| {
                (
                    c["tool"].as_str().unwrap(),
                    c["ok"].as_bool().unwrap(),
                    c["result"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(results[0], ("add", true, "5"), "{server}: {out}");
        assert_eq!(results[1], ("shout", true, "QUIET PLEASE"), "{server}");
        assert_eq!((results[2].0, results[2].1), ("refuse", false), "{server}");
        assert!(
            results[2].2.contains("not today"),
            "{server}: {}",
            results[2].2
        );
        assert_eq!(out["turns"], 3, "{server}");
        // The server's tools were offered to the model, with their schemas.
        let offered = fake.seen()[before].body["tools"].to_string();
        for tool in ["add", "shout", "refuse", "environment"] {
            assert!(offered.contains(tool), "{server}: {offered}");
        }
        if server == "notes" {
            let vars: Vec<&str> = results[3].2.split_whitespace().collect();
            assert!(vars.contains(&"NOTES_MODE"), "{vars:?}");
            for var in &vars {
                assert!(
                    ["HOME", "PATH", "NOTES_MODE", "LC_CTYPE"].contains(var),
                    "the stdio server got `{var}` from the node: {vars:?}"
                );
            }
        }
    }
    // A step that names a server the node does not have is refused, naming what it has.
    let view = run_step(
        &mesh,
        json!({ "model": "openai/tool-model", "prompt": "x", "tools": [{ "mcp": "files" }] }),
    )
    .await;
    assert_eq!(view.state, RunState::Failed);
    let error = view.steps[0].error.clone().unwrap_or_default();
    assert!(
        error.contains("with.tools[0].mcp") && error.contains("it has: notes, notes_http"),
        "{error}"
    );
}

/// A model calls a skill of the mesh as a tool: the call crosses from the llm agent's node to
/// the coordinator, which journals it and dispatches a child task to the agent with the skill
/// on another node, then gives its output back to the model. A skill called as a tool cannot
/// call skills itself, and the model is told so.
#[tokio::test]
async fn a_model_calls_a_skill_of_the_mesh_as_a_tool() {
    let fake = FakeLlm::start(KEY).await;
    let mut mesh = Mesh::start(Timings::default()).await;
    mesh.start_node("n1", &llm_node(&fake)).await;
    mesh.start_node("n2", "[[agents]]\nkind = \"echo\"\n").await;
    fake.knobs()
        .call_tools(&[("echo", json!({ "text": "through the mesh" }))]);
    let client = mesh.client().await;
    let text = json!({ "steps": [{ "id": "ask", "uses": "llm", "with": {
        "model": "openai/tool-model", "prompt": "echo something",
        "tools": [{ "skill": "echo", "parameters": { "type": "object",
            "properties": { "text": { "type": "string" } }, "required": ["text"] } }] } }] })
    .to_string();
    let view = mesh_tests::run_workflow(&client, &text, json!({})).await;
    assert_eq!(view.state, RunState::Succeeded, "{view:?}");
    let out = view.steps[0].output.clone().unwrap();
    let call = &out["tool_calls"][0];
    assert_eq!(call["tool"], "echo");
    assert_eq!(call["ok"], true, "{out}");
    let echoed: Value = serde_json::from_str(call["result"].as_str().unwrap()).unwrap();
    assert_eq!(echoed["with"], json!({ "text": "through the mesh" }));

    // Journaled like a step: the call, then what came back.
    let journal = mesh.journal(&view.run_id);
    let called = journal
        .iter()
        .find(|(k, _)| k == "skill_called")
        .expect("the call is journaled");
    assert_eq!(called.1["skill"], "echo");
    assert_eq!(called.1["input"], json!({ "text": "through the mesh" }));
    assert_eq!(called.1["step"], "ask");
    let returned = journal
        .iter()
        .find(|(k, _)| k == "skill_returned")
        .expect("its answer is journaled");
    assert_eq!(returned.1["call_id"], called.1["call_id"]);
    let outcome = &returned.1["outcome"]["Ok"];
    assert_eq!(outcome["with"], json!({ "text": "through the mesh" }));
    let at = |kind: &str| journal.iter().position(|(k, _)| k == kind).unwrap();
    assert!(at("skill_called") < at("skill_returned"));
    assert!(at("skill_returned") < at("task_succeeded"));

    // A skill called as a tool (here the llm agent itself) cannot call skills in turn: its
    // model is told so, and answers with what it was told.
    fake.knobs().call_tools(&[(
        "llm",
        json!({ "model": "openai/tool-model", "prompt": "inner",
            "tools": [{ "skill": "echo" }] }),
    )]);
    fake.knobs()
        .call_tools(&[("echo", json!({ "text": "deeper" }))]);
    let text = json!({ "steps": [{ "id": "outer", "uses": "llm", "with": {
        "model": "openai/tool-model", "prompt": "go deep",
        "tools": [{ "skill": "llm" }] } }] })
    .to_string();
    let view = mesh_tests::run_workflow(&client, &text, json!({})).await;
    assert_eq!(view.state, RunState::Succeeded, "{view:?}");
    let out = view.steps[0].output.clone().unwrap();
    let inner: Value =
        serde_json::from_str(out["tool_calls"][0]["result"].as_str().unwrap()).unwrap();
    let inner_call = &inner["tool_calls"][0];
    assert_eq!(inner_call["ok"], false, "{inner}");
    assert!(
        inner_call["result"]
            .as_str()
            .unwrap()
            .contains("cannot call skills"),
        "{inner}"
    );
}

/// A tool with `approval: true`: the run waits, showing the step awaiting approval with the
/// call's exact arguments, and nothing is sent; approved, the call is made and its result goes
/// to the model; rejected, nothing is sent and the model is told who rejected it and why.
/// Each request, decision and call is journaled and in the run's trace.
#[tokio::test]
async fn a_tool_that_needs_approval_waits_for_a_person() {
    let fake = FakeLlm::start(KEY).await;
    let (addr, asked, _server) = weather_server().await;
    let mesh = mesh_with(&fake).await;
    let client = mesh.client().await;
    let mut tool = weather_tool(addr);
    tool["approval"] = json!(true);
    let text = json!({ "steps": [{ "id": "ask", "uses": "llm", "timeout": "60s", "with": {
        "model": "openai/tool-model", "prompt": "weather in Lyon?", "tools": [tool] } }] })
    .to_string();
    for approve in [true, false] {
        asked.lock().unwrap().clear();
        let before = fake.seen().len();
        fake.knobs()
            .call_tools(&[("weather", json!({ "city": "Lyon", "units": "metric" }))]);
        let run = client
            .submit(workflow_goal(&text, json!({})))
            .await
            .unwrap()
            .run_id;
        let waiting = mesh_tests::wait_for(
            "the step to await approval",
            Duration::from_secs(20),
            || async {
                let view = client.get_run(&run).await.ok()?;
                (view.steps[0].state == mesh_agent_sdk::StepState::AwaitingApproval).then_some(view)
            },
        )
        .await;
        let detail = waiting.steps[0].detail.clone().unwrap_or_default();
        assert!(
            detail.contains("weather") && detail.contains(r#"{"city":"Lyon","units":"metric"}"#),
            "the exact arguments are shown: {detail}"
        );
        // Nothing is sent while it waits.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            asked.lock().unwrap().is_empty(),
            "no call before a decision"
        );
        let decided = client
            .decide(&run, "ask", approve, "checked", "ana")
            .await
            .unwrap();
        assert_ne!(
            decided.steps[0].state,
            mesh_agent_sdk::StepState::AwaitingApproval,
            "decided: {decided:?}"
        );
        // Deciding twice is refused: nothing waits any more.
        let again = client.decide(&run, "ask", approve, "", "ana").await;
        assert!(
            matches!(
                &again,
                Err(mesh_agent_sdk::ClientError::Rpc {
                    code: mesh_agent_sdk::RpcCode::FailedPrecondition,
                    ..
                })
            ),
            "{again:?}"
        );
        let view = tokio::time::timeout(Duration::from_secs(30), client.wait(&run))
            .await
            .expect("the run finishes")
            .unwrap();
        assert_eq!(view.state, RunState::Succeeded, "{view:?}");
        let out = view.steps[0].output.clone().unwrap();
        let call = &out["tool_calls"][0];
        let journal = mesh.journal(&run);
        let kinds: Vec<&str> = journal.iter().map(|(k, _)| k.as_str()).collect();
        let at = |kind: &str| kinds.iter().position(|k| *k == kind);
        let asked_at = at("tool_approval_asked").expect("the request is journaled");
        let decided_at = at("tool_approval_decided").expect("the decision is journaled");
        assert!(asked_at < decided_at, "{kinds:?}");
        let request = &journal[asked_at].1;
        assert_eq!(request["tool"], "weather");
        assert_eq!(
            request["arguments"],
            json!({ "city": "Lyon", "units": "metric" })
        );
        let decision = &journal[decided_at].1;
        assert_eq!(decision["approved"], approve);
        assert_eq!(decision["comment"], "checked");
        let trace = client.trace(&run).await.unwrap();
        let traced = &trace.steps[0].attempts[0].calls[0];
        assert_eq!(traced.tool, "weather");
        assert_eq!(traced.call_id, request["call_id"].as_str().unwrap());
        if approve {
            assert_eq!(asked.lock().unwrap().len(), 1, "approved: the call is made");
            assert_eq!(call["ok"], true, "{out}");
            assert_eq!(out["text"], "answer: tool said sunny in Lyon");
            let used_at = at("tool_used").expect("the call itself is journaled");
            assert!(decided_at < used_at, "{kinds:?}");
            let used = &journal[used_at].1;
            assert_eq!(used["call_id"], request["call_id"]);
            assert_eq!(used["ok"], true);
            assert_eq!(used["result"], "sunny in Lyon");
            assert_eq!(traced.outcome, "succeeded");
            assert!(traced.decision.starts_with("approved by "), "{traced:?}");
        } else {
            assert!(
                asked.lock().unwrap().is_empty(),
                "rejected: nothing is sent"
            );
            assert_eq!(call["ok"], false, "{out}");
            assert!(at("tool_used").is_none(), "{kinds:?}");
            let told = fake.seen()[before..]
                .last()
                .map(|r| r.body.to_string())
                .unwrap_or_default();
            assert!(
                told.contains("the call was rejected by") && told.contains("checked"),
                "the model is told: {told}"
            );
            assert_eq!(traced.outcome, "rejected");
        }
    }
}

/// The team example (examples/workflows/llm-team.yaml) against the fake provider: the
/// researcher runs Python through the code tool, the writer drafts, the critic's JSON ends the
/// loop; a second run on the same topic gives the researcher the first one's notes.
#[tokio::test]
async fn the_team_example_researches_with_code_writes_critiques_and_remembers() {
    let fake = FakeLlm::start(KEY).await;
    let mut mesh = Mesh::start(Timings::default()).await;
    let team: String = ["researcher", "writer", "critic"]
        .iter()
        .map(|name| format!("[[agents]]\nkind = \"llm\"\nname = \"{name}\"\n"))
        .collect();
    mesh.start_node("n1", &format!("{team}{}", llm_node(&fake)))
        .await;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/workflows/llm-team.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let client = mesh.client().await;
    let inputs = json!({ "model": "openai/team-model", "topic": "fencing tokens" });
    let team_run = |facts: &str| {
        fake.knobs()
            .call_tools(&[("run_python", json!({ "code": "print(6 * 7)" }))]);
        fake.knobs().call_tools(&[(
            "message_writer",
            json!({ "text": format!("notes for the writer: {facts}") }),
        )]);
        let mut answers = fake.knobs().answers.lock().unwrap();
        answers.push_back(facts.to_owned());
        answers.push_back("a brief about fencing tokens".to_owned());
        answers.push_back(
            json!({ "score": 9, "critique": "clear", "draft": "the final brief" }).to_string(),
        );
    };

    team_run("five facts, one of them 42");
    let first = mesh_tests::run_workflow(&client, &text, inputs.clone()).await;
    assert_eq!(first.state, RunState::Succeeded, "{first:?}");
    let out = first.output.clone().unwrap();
    assert_eq!(out["brief"], "the final brief");
    assert_eq!(out["score"], 9);
    assert_eq!(out["facts"], "five facts, one of them 42");
    let research = first.steps[0].output.clone().unwrap();
    let call = &research["tool_calls"][0];
    assert_eq!(call["tool"], "run_python");
    let ran: Value = serde_json::from_str(call["result"].as_str().unwrap()).unwrap();
    assert_eq!(
        ran["stdout"], "42\n",
        "the code ran in the sandbox: {research}"
    );
    let sent = &research["tool_calls"][1];
    assert_eq!(sent["tool"], "message_writer");
    assert_eq!(sent["result"], "sent to 1 agent(s)", "{research}");
    // The writer's model got the researcher's message before its prompt.
    let writer_call = fake
        .seen()
        .iter()
        .map(|r| r.body.to_string())
        .find(|b| b.contains("You are a writer"))
        .expect("the writer called its model");
    assert!(
        writer_call.contains("Messages you received")
            && writer_call
                .contains("from researcher: notes for the writer: five facts, one of them 42"),
        "{writer_call}"
    );

    let before = fake.seen().len();
    team_run("five more facts");
    let second = mesh_tests::run_workflow(&client, &text, inputs).await;
    assert_eq!(second.state, RunState::Succeeded, "{second:?}");
    let research_call = &fake.seen()[before].body;
    assert!(
        research_call["messages"]
            .to_string()
            .contains("five facts, one of them 42"),
        "the researcher starts from the first run's notes: {research_call}"
    );
}

/// A tool registered once in a namespace (with `mesh tool put` from a YAML file) is used by
/// name from any step there, its secret-free declaration put in place at dispatch; a name not
/// registered fails the step naming the entry; another namespace does not see it; bad
/// declarations are refused naming the field.
#[tokio::test]
async fn a_tool_registered_once_is_used_by_name_in_its_namespace() {
    let fake = FakeLlm::start(KEY).await;
    let (addr, asked, _server) = weather_server().await;
    let mesh = mesh_with(&fake).await;
    let client = mesh.client().await;

    let mut declaration = weather_tool(addr);
    declaration.as_object_mut().unwrap().remove("name").unwrap();
    let file = mesh.dir.path().join("weather.yaml");
    std::fs::write(&file, serde_json::to_string(&declaration).unwrap()).unwrap();
    let mesh_cli = |args: &[&str]| {
        std::process::Command::new(mesh_tests::mesh_bin())
            .args(["--coordinator", &mesh.url(), "--output", "json"])
            .args(args)
            .output()
            .unwrap()
    };
    let out = mesh_cli(&["tool", "put", "weather", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = mesh_cli(&["tool", "ls"]);
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed["tools"][0]["name"], "weather");
    assert_eq!(listed["tools"][0]["kind"], "http");

    fake.knobs()
        .call_tools(&[("weather", json!({ "city": "Oslo" }))]);
    let view = run_step(
        &mesh,
        json!({ "model": "openai/tool-model", "prompt": "weather?", "tools": ["weather"] }),
    )
    .await;
    assert_eq!(view.state, RunState::Succeeded, "{view:?}");
    let out = view.steps[0].output.clone().unwrap();
    assert_eq!(out["text"], "answer: tool said sunny in Oslo", "{out}");
    assert_eq!(asked.lock().unwrap().len(), 1);

    let view = run_step(
        &mesh,
        json!({ "model": "openai/tool-model", "prompt": "x",
            "tools": [{ "use": "weather" }, { "use": "nothere" }] }),
    )
    .await;
    assert_eq!(view.state, RunState::Failed, "{view:?}");
    let error = view.steps[0].error.clone().unwrap_or_default();
    assert!(
        error.contains("with.tools[1]") && error.contains("`nothere`"),
        "{error}"
    );

    let other = mesh.client().await.with_namespace("team-b").unwrap();
    assert!(other.list_tools(0, "").await.unwrap().tools.is_empty());
    let missing = other.get_tool("weather").await.unwrap_err();
    assert_eq!(missing.code(), Some(mesh_agent_sdk::RpcCode::NotFound));

    for (name, bad, field) in [
        ("w w", json!({ "http": { "url": "http://a/" } }), "name"),
        (
            "w",
            json!({ "http": {}, "skill": "echo" }),
            "declaration_json",
        ),
        ("w", json!(["not", "a", "map"]), "declaration_json"),
    ] {
        let e = client.put_tool(name, &bad).await.unwrap_err();
        assert_eq!(
            e.code(),
            Some(mesh_agent_sdk::RpcCode::InvalidArgument),
            "{e}"
        );
        assert!(e.to_string().contains(field), "{field}: {e}");
    }
    let removed = client.delete_tool("weather").await.unwrap();
    assert_eq!(removed.name, "weather");
    let gone = client.delete_tool("weather").await.unwrap_err();
    assert_eq!(gone.code(), Some(mesh_agent_sdk::RpcCode::NotFound));
}
