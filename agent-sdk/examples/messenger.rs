//! A runnable example of messages between agents (docs/messages.md): a `sender` whose skill
//! sends messages by name, to a topic or to its run's swarm, an `inbox` that takes messages
//! sent to it by name, and a `listener` subscribed to the topic `news`. Both keep what they
//! received, which their `read` skills return.
//!
//!     cargo run -p mesh-cli -- dev                           # in one terminal
//!     cargo run -p mesh-agent-sdk --example messenger        # in another
//!
//! then run examples/workflows/messages.yaml. `MESH_AGENTS` picks the agents this process
//! hosts (default `sender,inbox,listener`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_agent_sdk::{Agent, AgentCard, AgentError, Context, Mail, Message, NodeRuntime};
use serde_json::{Value, json};

/// Messages an agent received, in the order its handler finished them.
type Received = Arc<Mutex<Vec<Value>>>;

fn record(received: &Received, message: &Message) {
    received.lock().unwrap().push(json!({
        "id": message.id, "from": message.from, "topic": message.topic,
        "priority": message.priority, "payload": message.payload, "attempt": message.attempt,
    }));
}

/// Takes messages by name; `slow_ms` in a payload makes its handler take that long on the
/// message's first delivery (so that a test can kill the node while it holds one).
struct Inbox(Received);

impl Agent for Inbox {
    fn card(&self) -> AgentCard {
        AgentCard::new("inbox")
            .description("keeps the messages sent to it; inbox.read returns them")
            .skill("inbox.read")
            .max_concurrency(8)
            .inbox()
    }

    async fn handle(&self, _ctx: Context, _input: Value) -> Result<Value, AgentError> {
        Ok(json!({ "received": *self.0.lock().unwrap() }))
    }

    async fn on_message(&self, _mail: Mail, message: Message) -> Result<(), AgentError> {
        // Printed first: a test sees it in this process's log while the handler runs.
        println!(
            "handling message {} from {} (attempt {})",
            message.id, message.from, message.attempt
        );
        if let Some(ms) = message.payload["slow_ms"].as_u64()
            && message.attempt == 1
        {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        record(&self.0, &message);
        Ok(())
    }
}

/// Subscribed to `news`.
struct Listener(Received);

impl Agent for Listener {
    fn card(&self) -> AgentCard {
        AgentCard::new("listener")
            .description("keeps what is published to `news`; listener.read returns it")
            .skill("listener.read")
            .subscribe("news")
    }

    async fn handle(&self, _ctx: Context, _input: Value) -> Result<Value, AgentError> {
        Ok(json!({ "received": *self.0.lock().unwrap() }))
    }

    async fn on_message(&self, _mail: Mail, message: Message) -> Result<(), AgentError> {
        record(&self.0, &message);
        Ok(())
    }
}

/// `send` with `with: { to | topic | broadcast: true, count, priority, tag, slow_ms }`: sends
/// `count` messages one after the other, payload `{ tag, n, slow_ms }`, and answers how many
/// agents each reached; the first refusal ends it, reported with what was sent before.
struct Sender;

impl Agent for Sender {
    fn card(&self) -> AgentCard {
        AgentCard::new("sender")
            .description("sends messages: by name, to a topic, or to its run's swarm")
            .skill("send")
            .max_concurrency(8)
    }

    async fn handle(&self, ctx: Context, input: Value) -> Result<Value, AgentError> {
        let with = &input["with"];
        let count = with["count"].as_u64().unwrap_or(1);
        let priority = with["priority"].as_u64().unwrap_or(0).min(9) as u8;
        let mail = ctx.mail().priority(priority);
        let mut reached = Vec::new();
        for n in 1..=count {
            let payload = json!({ "tag": with["tag"], "n": n, "slow_ms": with["slow_ms"] });
            let sent = if let Some(to) = with["to"].as_str() {
                mail.send(to, payload).await
            } else if let Some(topic) = with["topic"].as_str() {
                mail.publish(topic, payload).await
            } else if with["broadcast"] == json!(true) {
                mail.broadcast(payload).await
            } else {
                return Err(AgentError::bad_input(
                    "with: give `to`, `topic` or `broadcast: true`",
                ));
            };
            match sent {
                Ok(r) => reached.push(r),
                Err(e) => {
                    return Ok(json!({ "reached": reached, "sent": reached.len(),
                        "error": { "code": e.code, "message": e.message } }));
                }
            }
        }
        Ok(json!({ "reached": reached, "sent": reached.len() }))
    }
}

#[tokio::main]
async fn main() -> Result<(), mesh_agent_sdk::Error> {
    tracing_subscriber::fmt()
        .with_env_filter("info,ractor=warn")
        .init();
    let coordinator =
        std::env::var("MESH_COORDINATOR").unwrap_or_else(|_| "http://127.0.0.1:7700".into());
    let name = std::env::var("MESH_NODE_NAME").unwrap_or_else(|_| "messenger-node".into());
    let agents = std::env::var("MESH_AGENTS").unwrap_or_else(|_| "sender,inbox,listener".into());
    let mut builder = NodeRuntime::builder().coordinator(coordinator).name(name);
    for agent in agents.split(',') {
        builder = match agent.trim() {
            "sender" => builder.agent(Sender),
            "inbox" => builder.agent(Inbox(Received::default())),
            "listener" => builder.agent(Listener(Received::default())),
            other => panic!("MESH_AGENTS: unknown agent `{other}` (sender, inbox, listener)"),
        };
    }
    builder
        .build()?
        .run_until(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
}
