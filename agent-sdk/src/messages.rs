//! Messages between agents (reference: docs/messages.md). An agent sends with a [`Mail`] (its
//! task handler's [`Context::mail`](crate::Context::mail), or the one its
//! [`on_message`](crate::Agent::on_message) handler is given) and receives with `on_message`,
//! once its card says it takes messages ([`AgentCard::inbox`](crate::AgentCard::inbox),
//! [`AgentCard::subscribe`](crate::AgentCard::subscribe)).
//!
//! Messages travel on the node's stream to the coordinator, which keeps a mailbox per agent
//! name: at least once (a handler may see a message again after a node is lost; the message
//! id tells), in order per sender, higher priorities first between senders.

use std::time::Duration;

use mesh_proto::domain::{FencingToken, MAX_PRIORITY, Recipient, SendMessage, TaskError};
use ractor::ActorRef;
use serde_json::Value;
use tokio::sync::oneshot;

use crate::runtime::connection::ConnMsg;

/// How long a send waits for the coordinator's answer, per try.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// Tries of a send whose answer is lost (with the same id: it is taken once).
const TRIES: u32 = 5;

/// A message as an agent receives it.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    /// The sender's id for it: the same on every delivery.
    pub id: String,
    /// The sending agent.
    pub from: String,
    /// The topic it was published to, `swarm:RUN` when broadcast to a run's swarm, `None`
    /// when sent by name.
    pub topic: Option<String>,
    pub priority: u8,
    pub payload: Value,
    pub namespace: String,
    /// When the coordinator took it (Unix ms).
    pub sent_at_ms: i64,
    /// 1 for the first delivery; more after a lost node, a failed handler or no answer.
    pub attempt: u32,
}

/// Where an agent sends messages from: its name, its namespace and, in a task handler, the
/// attempt (for [`broadcast`](Self::broadcast)).
#[derive(Clone, Debug)]
pub struct Mail {
    pub(crate) from: String,
    pub(crate) namespace: String,
    pub(crate) attempt: Option<FencingToken>,
    pub(crate) conn: Option<ActorRef<ConnMsg>>,
    priority: u8,
}

impl Mail {
    pub(crate) fn new(
        from: &str,
        attempt: Option<FencingToken>,
        conn: Option<ActorRef<ConnMsg>>,
    ) -> Self {
        Self {
            from: from.to_owned(),
            namespace: String::new(),
            attempt,
            conn,
            priority: 0,
        }
    }

    /// The same, sending at `priority` (0 to 9, higher first; 0 by default).
    pub fn priority(mut self, priority: u8) -> Self {
        self.priority = priority.min(MAX_PRIORITY);
        self
    }

    /// The same, sending in `namespace` (needed only when the node serves several).
    pub fn namespace(mut self, namespace: &str) -> Self {
        self.namespace = namespace.to_owned();
        self
    }

    /// Sends to the agent named `to` (one instance of it, on any node). Answers how many
    /// agents will get it (1), or why it was refused: `no_such_agent` (no agent of that name
    /// takes messages), `mailbox_full` (retryable), `bad_message`.
    pub async fn send(&self, to: &str, payload: Value) -> Result<u32, TaskError> {
        self.post(Recipient::Agent(to.to_owned()), payload).await
    }

    /// Publishes to every agent subscribed to `topic` (one instance of each); 0 when none is.
    pub async fn publish(&self, topic: &str, payload: Value) -> Result<u32, TaskError> {
        self.post(Recipient::Topic(topic.to_owned()), payload).await
    }

    /// Sends to every agent of the swarm of this attempt's run (those that ran its steps so
    /// far and take messages), the sender aside. Only from a task handler.
    pub async fn broadcast(&self, payload: Value) -> Result<u32, TaskError> {
        let Some(token) = &self.attempt else {
            return Err(TaskError::new(
                "bad_message",
                "broadcast goes to the swarm of a run: send it from a task handler",
                false,
            ));
        };
        self.post(Recipient::SwarmOf(token.clone()), payload).await
    }

    async fn post(&self, to: Recipient, payload: Value) -> Result<u32, TaskError> {
        let Some(conn) = &self.conn else {
            return Err(TaskError::new(
                "no_coordinator",
                "this agent is not connected to a coordinator",
                false,
            ));
        };
        let send = SendMessage {
            message_id: format!("m-{:016x}", fastrand::u64(..)),
            from_agent: self.from.clone(),
            namespace: self.namespace.clone(),
            to,
            priority: self.priority,
            payload,
        };
        let mut last = None;
        for try_ in 1..=TRIES {
            let (reply, answer) = oneshot::channel();
            if conn
                .cast(ConnMsg::Send {
                    send: send.clone(),
                    reply,
                })
                .is_err()
            {
                break;
            }
            match tokio::time::timeout(ANSWER_WITHIN, answer).await {
                Ok(Ok(Ok(n))) => return Ok(n),
                // Refused for a reason the coordinator gave: told as it is. Lost on the way, or
                // sent again while the coordinator was keeping it: again, same id.
                Ok(Ok(Err(e))) if e.code != "connection_lost" && e.code != "pending" => {
                    return Err(e);
                }
                Ok(Ok(Err(e))) => last = Some(e),
                Ok(Err(_)) | Err(_) => {}
            }
            // The answer was lost: the same id again, taken once.
            tokio::time::sleep(Duration::from_millis(500 * u64::from(try_))).await;
        }
        Err(last.unwrap_or_else(|| {
            TaskError::new(
                "unavailable",
                format!("the coordinator did not answer the message in {TRIES} tries"),
                true,
            )
        }))
    }
}
