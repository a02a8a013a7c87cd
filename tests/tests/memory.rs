//! Memory across runs (docs/memory.md), through real processes: a second run of a workflow
//! sees what the first remembered, per key; entries expire; `MemoryService` and `mesh memory`
//! list, read, add and delete them, within the caller's namespace only.

use std::process::Command;
use std::time::Duration;

use mesh_agent_sdk::{RunState, RunView};
use mesh_tests::fake_llm::{FakeLlm, Wire};
use mesh_tests::{Mesh, Timings, mesh_bin, workflow_goal};
use serde_json::{Value, json};

const KEY: &str = "sk-test-memory-0123456789abcdef";

const CHAT: &str = r#"
name: chat
version: 1
inputs: { user: string, say: string }
steps:
  - id: reply
    uses: llm
    with:
      model: openai/chat-model
      prompt: "${{ inputs.say }}"
    memory: { scope: workflow, key: "user-${{ inputs.user }}", last: 4 }
"#;

async fn mesh_with_llm(fake: &FakeLlm) -> Mesh {
    let mut mesh = Mesh::start(Timings::default()).await;
    let node = format!(
        "[[agents]]\nkind = \"llm\"\n\n[[agents]]\nkind = \"echo\"\n\n[llm.openai]\nbase_url = \"{}\"\napi_key = \"{KEY}\"\n",
        fake.base_url(Wire::OpenAi)
    );
    mesh.start_node("n1", &node).await;
    mesh
}

async fn chat(client: &mesh_agent_sdk::GoalClient, user: &str, say: &str) -> RunView {
    let mut goal = workflow_goal("", json!({ "user": user, "say": say }));
    goal.workflow = None;
    goal.workflow_ref = Some("chat".into());
    let run = client.submit(goal).await.unwrap();
    let view = tokio::time::timeout(Duration::from_secs(30), client.wait(&run.run_id))
        .await
        .expect("the run finishes")
        .unwrap();
    assert_eq!(view.state, RunState::Succeeded, "{view:?}");
    view
}

/// The messages of the last request the fake got, as (role, text).
fn last_messages(fake: &FakeLlm) -> Vec<(String, String)> {
    let seen = fake.seen();
    let body = &seen.last().expect("a model call").body;
    body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap_or_default().to_owned(),
                m["content"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn pair(role: &str, text: &str) -> (String, String) {
    (role.to_owned(), text.to_owned())
}

/// Run 2 of `chat` for ann gets run 1's exchange before its prompt; bob's run gets nothing of
/// ann's; the entries are listed, read, and deleted through the service and the CLI.
#[tokio::test]
async fn a_second_run_sees_what_the_first_remembered() {
    let fake = FakeLlm::start(KEY).await;
    let mesh = mesh_with_llm(&fake).await;
    let client = mesh.client().await;
    client.register_workflow(CHAT).await.unwrap();

    chat(&client, "ann", "my name is Ann").await;
    assert_eq!(last_messages(&fake), [pair("user", "my name is Ann")]);
    let second = chat(&client, "ann", "what is my name").await;
    assert_eq!(
        last_messages(&fake),
        [
            pair("user", "my name is Ann"),
            pair("assistant", "answer: my name is Ann"),
            pair("user", "what is my name"),
        ],
        "the second run's prompt follows the first run's exchange"
    );
    let out = second.steps[0].output.clone().unwrap();
    assert_eq!(
        out["remember"],
        json!({ "prompt": "what is my name", "text": "answer: what is my name" })
    );
    chat(&client, "bob", "hello").await;
    assert_eq!(
        last_messages(&fake),
        [pair("user", "hello")],
        "bob's key is another"
    );

    // The service: two keys, ann's with two entries saved by their runs.
    let keys = client
        .list_memory(mesh_proto::pb::ListMemoryRequest {
            scope: "workflow:chat".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let listed: Vec<(String, u64)> = keys
        .keys
        .iter()
        .map(|k| (k.key.clone(), k.entries))
        .collect();
    assert_eq!(
        listed,
        [("user-ann".to_owned(), 2), ("user-bob".to_owned(), 1)]
    );
    let entries = client
        .get_memory("workflow:chat", "user-ann", 10)
        .await
        .unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[1].run_id, second.run_id.0);
    assert_eq!(entries[1].step_id, "reply");
    let value: Value = serde_json::from_str(&entries[0].value_json).unwrap();
    assert_eq!(value["text"], "answer: my name is Ann");

    // The CLI reads and deletes; after that ann starts afresh.
    let cli = |args: &[&str]| {
        let out = Command::new(mesh_bin())
            .args(["--coordinator", &mesh.url(), "--output", "json"])
            .args(args)
            .output()
            .expect("run mesh");
        assert!(
            out.status.success(),
            "mesh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let got = cli(&["memory", "get", "workflow:chat", "user-ann", "--last", "1"]);
    assert_eq!(got["entries"][0]["value"]["prompt"], "what is my name");
    assert_eq!(
        cli(&["memory", "rm", "workflow:chat", "user-ann"])["deleted"],
        2
    );
    chat(&client, "ann", "who am I").await;
    assert_eq!(last_messages(&fake), [pair("user", "who am I")]);
}

/// Entries put by a client reach a step as facts in its system prompt; an entry past its TTL
/// is gone; another namespace sees none of them; bad scopes and values are refused, naming
/// the field.
#[tokio::test]
async fn entries_expire_stay_in_their_namespace_and_bad_input_is_refused() {
    let fake = FakeLlm::start(KEY).await;
    let mesh = mesh_with_llm(&fake).await;
    let client = mesh.client().await;
    client.register_workflow(CHAT).await.unwrap();

    client
        .put_memory(
            "workflow:chat",
            "user-cy",
            &json!("Cy likes short answers"),
            None,
        )
        .await
        .unwrap();
    client
        .put_memory(
            "workflow:chat",
            "user-cy",
            &json!("a passing thought"),
            Some(Duration::from_millis(300)),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    chat(&client, "cy", "hi").await;
    let system = fake.seen().last().unwrap().body.to_string();
    assert!(system.contains("Cy likes short answers"), "{system}");
    assert!(!system.contains("a passing thought"), "expired: {system}");
    let entries = client
        .get_memory("workflow:chat", "user-cy", 10)
        .await
        .unwrap();
    assert_eq!(entries.len(), 2, "the fact and the run's exchange");

    let other = mesh.client().await.with_namespace("other").unwrap();
    let err = other
        .get_memory("workflow:chat", "user-cy", 10)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no memory"), "{err}");
    assert!(
        other
            .list_memory(Default::default())
            .await
            .unwrap()
            .keys
            .is_empty()
    );

    let err = client
        .put_memory("team:x", "k", &json!(1), None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("scope `team:x`"), "{err}");
    let big = json!("x".repeat(70 * 1024));
    let err = client
        .put_memory("agent:llm", "k", &big, None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("value_json"), "{err}");

    // A workflow whose memory key is not text, or an inline workflow with workflow memory,
    // is refused when submitted.
    let inline = r#"{"steps":[{"id":"a","uses":"echo","memory":{"scope":"workflow","key":"k"}}]}"#;
    let err = client
        .submit(workflow_goal(inline, json!({})))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("steps[0].memory.scope"), "{err}");
}
