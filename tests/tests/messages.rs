//! Messages between agents (docs/messages.md), through real processes: the `messenger`
//! example of the SDK hosts a sender, an inbox and a topic listener; messages travel on the
//! node streams through the coordinator's mailboxes.

use std::time::Duration;

use mesh_agent_sdk::{GoalClient, RunState};
use mesh_tests::{Mesh, Proc, Timings, example_bin, run_workflow, wait_for};
use serde_json::{Value, json};

/// Starts the messenger example as node `name`, hosting `agents`, and waits until it is
/// healthy.
async fn messenger(mesh: &Mesh, name: &str, agents: &str) -> Proc {
    let url = mesh.url();
    let proc = Proc::spawn(
        &example_bin("messenger"),
        name,
        mesh.dir.path(),
        &[],
        &[
            ("MESH_COORDINATOR", &url),
            ("MESH_NODE_NAME", name),
            ("MESH_AGENTS", agents),
        ],
    )
    .expect("spawn the messenger example");
    mesh.wait_healthy(name).await;
    proc
}

/// Runs one step and answers its output (read in pages when too large for the view).
async fn step(client: &GoalClient, uses: &str, with: Value) -> Value {
    let text = json!({ "steps": [{ "id": "s", "uses": uses, "with": with }] }).to_string();
    let view = run_workflow(client, &text, json!({})).await;
    assert_eq!(view.state, RunState::Succeeded, "{uses}: {view:?}");
    match view.steps[0].output.clone() {
        Some(output) => output,
        None => client.output(&view.run_id, Some("s")).await.unwrap(),
    }
}

/// What `reader` (inbox.read or listener.read) received, once it has `n` messages.
async fn received(client: &GoalClient, reader: &str, n: usize) -> Vec<Value> {
    wait_for(
        &format!("{reader} to hold {n} messages"),
        Duration::from_secs(20),
        || async {
            let out = step(client, reader, json!({})).await;
            let got = out["received"].as_array().cloned().unwrap_or_default();
            (got.len() >= n).then_some(got)
        },
    )
    .await
}

/// Sends one message to `inbox` whose handler on `node` takes `slow_ms` on its first
/// delivery, waits until the handler holds it, and answers its id.
async fn hold_slow_message(client: &GoalClient, node: &Proc, slow_ms: u64) -> String {
    let out = step(
        client,
        "send",
        json!({ "to": "inbox", "tag": "slow", "slow_ms": slow_ms }),
    )
    .await;
    assert_eq!(out["sent"], 1, "{out}");
    wait_for(
        &format!("{} to be handling the message", node.name),
        Duration::from_secs(10),
        || async { node.log_text().contains("handling message").then_some(()) },
    )
    .await;
    let log = node.log_text();
    log.split("handling message ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the message's id in the log")
        .to_owned()
}

/// By name, in the order sent; to a topic's subscribers; to the run's swarm; a recipient that
/// does not exist is refused naming it.
#[tokio::test]
async fn messages_go_by_name_in_order_to_a_topic_and_to_the_swarm() {
    let mesh = Mesh::start(Timings::default()).await;
    let _a = messenger(&mesh, "node-a", "sender").await;
    let _b = messenger(&mesh, "node-b", "inbox,listener").await;
    let client = mesh.client().await;

    let out = step(
        &client,
        "send",
        json!({ "to": "inbox", "count": 30, "tag": "a" }),
    )
    .await;
    assert_eq!(out["sent"], 30, "{out}");
    assert!(out["reached"].as_array().unwrap().iter().all(|r| r == 1));
    let got = received(&client, "inbox.read", 30).await;
    let order: Vec<u64> = got
        .iter()
        .map(|m| m["payload"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(order, (1..=30).collect::<Vec<_>>(), "in the order sent");
    assert!(
        got.iter()
            .all(|m| m["from"] == "sender" && m["topic"].is_null())
    );
    let mut ids: Vec<&str> = got.iter().map(|m| m["id"].as_str().unwrap()).collect();
    ids.dedup();
    assert_eq!(ids.len(), 30, "each once");

    let out = step(
        &client,
        "send",
        json!({ "topic": "news", "count": 2, "tag": "n" }),
    )
    .await;
    assert_eq!(out["reached"], json!([1, 1]), "one subscriber: {out}");
    let news = received(&client, "listener.read", 2).await;
    assert!(news.iter().all(|m| m["topic"] == "news"), "{news:?}");
    let out = step(
        &client,
        "send",
        json!({ "topic": "nobody-listens", "tag": "x" }),
    )
    .await;
    assert_eq!(
        out["reached"],
        json!([0]),
        "a topic without subscribers reaches none"
    );

    // The swarm of a run: the agents that ran its steps (here the inbox, the listener, then
    // the sender); of them only the inbox takes messages by name.
    let text = json!({ "steps": [
        { "id": "look", "uses": "inbox.read" },
        { "id": "peek", "uses": "listener.read" },
        { "id": "tell", "uses": "send", "needs": ["look", "peek"],
          "with": { "broadcast": true, "tag": "all", "priority": 7 } }
    ] })
    .to_string();
    let view = run_workflow(&client, &text, json!({})).await;
    assert_eq!(view.state, RunState::Succeeded, "{view:?}");
    assert_eq!(
        view.steps[2].output.as_ref().unwrap()["reached"],
        json!([1]),
        "the inbox only"
    );
    let got = received(&client, "inbox.read", 31).await;
    let last = &got[30];
    assert_eq!(last["topic"], format!("swarm:{}", view.run_id));
    assert_eq!(last["priority"], 7);

    let out = step(&client, "send", json!({ "to": "nobody", "tag": "x" })).await;
    assert_eq!(out["error"]["code"], "no_such_agent", "{out}");
    assert!(
        out["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`nobody`"),
        "{out}"
    );
}

/// The node holding a message in its handler is killed: while no node has the agent, its
/// mailbox keeps taking messages up to its limit, then refuses with a clear error; once the
/// agent is back on another node, the message comes again (same id, a later attempt) and the
/// others follow in the order sent.
#[tokio::test]
async fn a_message_in_flight_on_a_killed_node_is_delivered_again_and_full_mailboxes_refuse() {
    let mesh = Mesh::start(Timings::default()).await;
    let _a = messenger(&mesh, "node-a", "sender").await;
    let mut b1 = messenger(&mesh, "node-b1", "inbox").await;
    let client = mesh.client().await;

    let id = hold_slow_message(&client, &b1, 60_000).await;
    b1.kill9();

    let out = step(
        &client,
        "send",
        json!({ "to": "inbox", "count": 1_200, "tag": "fill" }),
    )
    .await;
    assert_eq!(out["sent"], 999, "1,000 held with the slow one: {out}");
    assert_eq!(out["error"]["code"], "mailbox_full", "{out}");
    let message = out["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("agent `inbox`") && message.contains("1000"),
        "{message}"
    );

    let b2 = messenger(&mesh, "node-b2", "inbox").await;
    let got = received(&client, "inbox.read", 1_000).await;
    let again = &got[0];
    assert_eq!(
        again["id"],
        id.as_str(),
        "the message in flight comes first"
    );
    assert_eq!(again["payload"]["tag"], "slow");
    assert!(again["attempt"].as_u64().unwrap() >= 2, "{again}");
    let fill: Vec<u64> = got[1..]
        .iter()
        .map(|m| m["payload"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(
        fill,
        (1..=999).collect::<Vec<_>>(),
        "then the rest, in order"
    );
    let mut ids: Vec<&str> = got.iter().map(|m| m["id"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 1_000, "each once");
    assert!(b2.log_text().contains(&format!("handling message {id}")));
}

/// Messages taken are kept by the store until acknowledged: the coordinator killed -9 with
/// messages waiting for an agent that is away, and started again, delivers every one of them,
/// in order, once the agent is back.
#[tokio::test]
async fn messages_waiting_survive_a_coordinator_killed_9() {
    let mut mesh = Mesh::start(Timings::default()).await;
    let _a = messenger(&mesh, "node-a", "sender").await;
    let mut b1 = messenger(&mesh, "node-b1", "inbox").await;
    let client = mesh.client().await;
    hold_slow_message(&client, &b1, 2_000).await;
    b1.kill9();
    let out = step(
        &client,
        "send",
        json!({ "to": "inbox", "count": 20, "tag": "kept" }),
    )
    .await;
    assert_eq!(out["sent"], 20, "{out}");

    mesh.coordinator.as_mut().unwrap().kill9();
    tokio::time::sleep(Duration::from_millis(300)).await;
    mesh.start_coordinator().await;
    mesh.wait_healthy("node-a").await;
    let client = mesh.client().await;
    let _b2 = messenger(&mesh, "node-b2", "inbox").await;
    let got = received(&client, "inbox.read", 21).await;
    assert_eq!(got[0]["payload"]["tag"], "slow", "{got:?}");
    let kept: Vec<u64> = got[1..]
        .iter()
        .map(|m| m["payload"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(kept, (1..=20).collect::<Vec<_>>());
    assert_eq!(got.len(), 21, "each once");
}
