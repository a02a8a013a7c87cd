//! Messages between agents (reference: docs/messages.md): the decisions, apart from I/O. The
//! dispatcher owns a [`Postbox`], feeds it the nodes it learns about, the messages and
//! acknowledgements their streams carry and the time, and sends the deliveries it returns.
//!
//! - An agent's **mailbox** is per namespace and agent name; any live instance of the agent
//!   (on any node) may take a message from it. A mailbox holds at most [`MAX_MAILBOX`]
//!   messages: a send that would overfill one is refused whole, `mailbox_full`.
//! - **At least once:** a delivery stays in flight until its acknowledgement; it goes out again
//!   when its node is lost, its agent goes down, or no answer comes within
//!   [`DELIVERY_TIMEOUT`]; a handler's failure is delivered again after a backoff, at most
//!   [`MAX_ATTEMPTS`] times in all, then dropped, counted and logged.
//! - **Ordered per sender:** a mailbox keeps a lane per sender and delivers the next message of
//!   a lane only once the one before is acknowledged. Between lanes, the highest **priority**
//!   goes first, then the oldest.
//! - **Deduplicated:** a message sent again with the same id by the same agent (after its
//!   answer was lost) is taken once; its answer is repeated.
//! - **Kept:** a message is taken ([`Postbox::admit`]) and answered only once the store holds
//!   it ([`Postbox::commit`]), one row per recipient, and forgotten there once acknowledged or
//!   dropped ([`Postbox::forgotten`]); a coordinator that restarts restores its mailboxes from
//!   the store ([`Postbox::restore`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use mesh_proto::domain::{AgentCard, Delivered, NodeId, TaskError, ToNode};
use serde_json::Value;
use tokio::time::Instant;

use crate::node_link::NodeTx;

/// Most messages one mailbox holds, in flight included.
pub const MAX_MAILBOX: usize = 1_000;
/// How long a delivery waits for its acknowledgement before it goes out again.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);
/// Most deliveries of one message whose handler failed or did not answer.
pub const MAX_ATTEMPTS: u32 = 5;
/// Most deliveries in flight to one agent instance.
const WINDOW: usize = 64;
/// How many sent message ids are remembered, for deduplication.
const REMEMBERED: usize = 65_536;

/// A mailbox: (namespace, agent name).
pub type BoxKey = (String, String);

/// What names a message for one recipient in the store.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MessageKey {
    pub namespace: String,
    pub recipient: String,
    pub sender: String,
    pub message_id: String,
}

/// A message as the store keeps it, for one recipient.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredMessage {
    pub key: MessageKey,
    pub topic: String,
    pub priority: u8,
    pub payload: Value,
    pub sent_at_ms: i64,
}

/// What to do with a message sent.
#[derive(Debug, PartialEq)]
pub enum Admit {
    /// Seen before: answered again as then.
    Seen(u32),
    Refused(TaskError),
    /// Taken, its room held: store these rows, then [`Postbox::commit`] them (or
    /// [`Postbox::abort`] when the store fails).
    Store(Vec<StoredMessage>),
}

#[derive(Clone, Debug)]
struct Queued {
    seq: u64,
    message_id: String,
    from: String,
    topic: String,
    priority: u8,
    payload: Arc<Value>,
    sent_at_ms: i64,
    /// Deliveries so far.
    attempts: u32,
    /// Not delivered again before this (a failed handler's backoff).
    not_before: Option<Instant>,
}

#[derive(Debug, Default)]
struct Mailbox {
    lanes: HashMap<String, VecDeque<Queued>>,
    /// Senders with a message of this mailbox in flight: their next one waits.
    busy: HashSet<String>,
    len: usize,
}

#[derive(Debug)]
struct InFlight {
    to: BoxKey,
    message: Queued,
    node: NodeId,
    instance: u64,
    due: Instant,
}

/// An agent instance that takes messages.
#[derive(Debug)]
struct Taker {
    node: NodeId,
    instance: u64,
    name: String,
    namespaces: Vec<String>,
    topics: Vec<String>,
    inbox: bool,
    in_flight: usize,
}

#[derive(Debug)]
struct Node {
    tx: NodeTx,
    /// Every agent of the node and the namespaces it serves: who may send.
    agents: HashMap<String, Vec<String>>,
}

/// What a send is, once its recipients are known.
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub namespace: String,
    pub message_id: String,
    pub from: String,
    /// The topic, `swarm:RUN`, or empty.
    pub topic: String,
    pub priority: u8,
    pub payload: Value,
    pub recipients: Vec<String>,
}

#[derive(Debug, Default)]
pub struct Postbox {
    nodes: HashMap<(NodeId, u64), Node>,
    takers: Vec<Taker>,
    boxes: HashMap<BoxKey, Mailbox>,
    in_flight: HashMap<u64, InFlight>,
    /// Ids taken lately, with the answer given (`None` while the store keeps the message):
    /// (namespace, sender, id).
    seen: HashMap<(String, String, String), Option<u32>>,
    seen_order: VecDeque<(String, String, String)>,
    next_delivery: u64,
    next_seq: u64,
    /// Messages dropped after [`MAX_ATTEMPTS`], for the metric.
    pub dropped: u64,
    /// Messages acknowledged or dropped, for the store to forget.
    forgotten: Vec<MessageKey>,
}

fn namespaces_of(card: &AgentCard) -> Vec<String> {
    card.labels
        .get(mesh_proto::domain::NAMESPACE_LABEL)
        .map(|l| l.split(',').map(str::to_owned).collect())
        .unwrap_or_default()
}

fn refused(code: &str, message: String, retryable: bool) -> TaskError {
    TaskError::new(code, message, retryable)
}

impl Postbox {
    pub fn node_up(&mut self, node: &NodeId, instance: u64, cards: &[AgentCard], tx: NodeTx) {
        let agents = cards
            .iter()
            .map(|c| (c.name.clone(), namespaces_of(c)))
            .collect();
        self.nodes
            .insert((node.clone(), instance), Node { tx, agents });
        for c in cards.iter().filter(|c| c.takes_messages()) {
            self.takers.push(Taker {
                node: node.clone(),
                instance,
                name: c.name.clone(),
                namespaces: namespaces_of(c),
                topics: c.topics.clone(),
                inbox: c.inbox,
                in_flight: 0,
            });
        }
    }

    /// The node is gone: its deliveries in flight go back to the front of their lanes.
    pub fn node_down(&mut self, node: &NodeId, instance: u64) {
        self.nodes.remove(&(node.clone(), instance));
        self.takers
            .retain(|t| !(t.node == *node && t.instance == instance));
        self.requeue_where(|f| f.node == *node && f.instance == instance, false);
    }

    /// One agent of a node went down: the same, for its deliveries.
    pub fn agent_down(&mut self, node: &NodeId, instance: u64, agent: &str) {
        self.takers
            .retain(|t| !(t.node == *node && t.instance == instance && t.name == agent));
        self.requeue_where(
            |f| f.node == *node && f.instance == instance && f.to.1 == agent,
            false,
        );
    }

    /// Every node is forgotten (the registry restarted; they register again).
    pub fn reset_nodes(&mut self) {
        self.nodes.clear();
        self.takers.clear();
        self.requeue_where(|_| true, false);
    }

    /// Deliveries matching `lost` go back to the front of their lanes; `failed` counts them
    /// as attempts that failed (dropped past [`MAX_ATTEMPTS`]).
    fn requeue_where(&mut self, lost: impl Fn(&InFlight) -> bool, failed: bool) {
        let ids: Vec<u64> = (self.in_flight.iter())
            .filter(|(_, f)| lost(f))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some(f) = self.in_flight.remove(&id) {
                self.give_back(f, failed, None);
            }
        }
    }

    fn give_back(&mut self, f: InFlight, failed: bool, not_before: Option<Instant>) {
        if let Some(t) = self
            .takers
            .iter_mut()
            .find(|t| t.node == f.node && t.instance == f.instance && t.name == f.to.1)
        {
            t.in_flight = t.in_flight.saturating_sub(1);
        }
        let Some(mailbox) = self.boxes.get_mut(&f.to) else {
            return;
        };
        mailbox.busy.remove(&f.message.from);
        if failed && f.message.attempts >= MAX_ATTEMPTS {
            mailbox.len -= 1;
            self.dropped += 1;
            self.forgotten.push(key_of(&f.to, &f.message));
            tracing::warn!(
                to = %f.to.1, namespace = %f.to.0, from = %f.message.from,
                message_id = %f.message.message_id, attempts = f.message.attempts,
                "message dropped: its handler failed at every delivery"
            );
            return;
        }
        let mut message = f.message;
        message.not_before = not_before;
        mailbox
            .lanes
            .entry(message.from.clone())
            .or_default()
            .push_front(message);
    }

    /// Whether the agent `from` of this node may send in `namespace` (empty: its only one);
    /// the namespace it sends in.
    pub fn sender_namespace(
        &self,
        node: &NodeId,
        instance: u64,
        from: &str,
        namespace: &str,
    ) -> Result<String, TaskError> {
        let Some(served) = self
            .nodes
            .get(&(node.clone(), instance))
            .and_then(|n| n.agents.get(from))
        else {
            return Err(refused(
                "bad_message",
                format!("send_message.from_agent: `{from}` is not an agent of this node"),
                false,
            ));
        };
        match (namespace, served.as_slice()) {
            ("", [only]) => Ok(only.clone()),
            ("", _) => Err(refused(
                "bad_message",
                "send_message.namespace: this node serves several namespaces; name one".into(),
                false,
            )),
            (ns, served) if served.iter().any(|s| s == ns) => Ok(ns.to_owned()),
            (ns, _) => Err(refused(
                "bad_message",
                format!("send_message.namespace: this node does not serve namespace `{ns}`"),
                false,
            )),
        }
    }

    /// The agents that take messages sent to `agent` by name, or to `topic`.
    pub fn recipients_of_agent(
        &self,
        namespace: &str,
        agent: &str,
    ) -> Result<Vec<String>, TaskError> {
        // A mailbox already holding messages keeps taking them while its agent is away.
        if self.has_inbox(namespace, agent)
            || self
                .boxes
                .contains_key(&(namespace.to_owned(), agent.to_owned()))
        {
            Ok(vec![agent.to_owned()])
        } else {
            Err(refused(
                "no_such_agent",
                format!(
                    "no agent `{agent}` that takes messages is connected in namespace `{namespace}`"
                ),
                true,
            ))
        }
    }

    /// Those of `names` that take messages by name in `namespace`.
    pub fn taking_messages(&self, namespace: &str, names: Vec<String>) -> Vec<String> {
        names
            .into_iter()
            .filter(|name| self.has_inbox(namespace, name))
            .collect()
    }

    /// Whether a live instance of `agent` takes messages by name in `namespace`.
    fn has_inbox(&self, namespace: &str, agent: &str) -> bool {
        self.takers
            .iter()
            .any(|t| t.name == agent && t.inbox && t.namespaces.iter().any(|n| n == namespace))
    }

    pub fn subscribers(&self, namespace: &str, topic: &str) -> Vec<String> {
        let mut names: Vec<String> = (self.takers.iter())
            .filter(|t| {
                t.topics.iter().any(|x| x == topic) && t.namespaces.iter().any(|n| n == namespace)
            })
            .map(|t| t.name.clone())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Takes a message for its recipients (its room held, not yet deliverable), refuses it
    /// whole, or answers again a message seen before (same namespace, sender and id).
    pub fn admit(&mut self, out: &Outgoing, now_ms: i64) -> Admit {
        let id = (
            out.namespace.clone(),
            out.from.clone(),
            out.message_id.clone(),
        );
        match self.seen.get(&id) {
            Some(Some(n)) => return Admit::Seen(*n),
            // Sent again before the store kept it: the answer must wait for the store.
            Some(None) => {
                return Admit::Refused(refused(
                    "pending",
                    "the message is being kept; send it again".into(),
                    true,
                ));
            }
            None => {}
        }
        if let Some(full) = out.recipients.iter().find(|r| {
            self.boxes
                .get(&(out.namespace.clone(), (*r).clone()))
                .is_some_and(|b| b.len >= MAX_MAILBOX)
        }) {
            return Admit::Refused(refused(
                "mailbox_full",
                format!(
                    "the mailbox of agent `{full}` holds {MAX_MAILBOX} messages, its limit; \
                     send again later"
                ),
                true,
            ));
        }
        for to in &out.recipients {
            self.boxes
                .entry((out.namespace.clone(), to.clone()))
                .or_default()
                .len += 1;
        }
        self.remember(id, None);
        Admit::Store(
            out.recipients
                .iter()
                .map(|to| StoredMessage {
                    key: MessageKey {
                        namespace: out.namespace.clone(),
                        recipient: to.clone(),
                        sender: out.from.clone(),
                        message_id: out.message_id.clone(),
                    },
                    topic: out.topic.clone(),
                    priority: out.priority,
                    payload: out.payload.clone(),
                    sent_at_ms: now_ms,
                })
                .collect(),
        )
    }

    fn remember(&mut self, id: (String, String, String), recipients: Option<u32>) {
        if self.seen.insert(id.clone(), recipients).is_none() {
            self.seen_order.push_back(id);
        }
        if self.seen_order.len() > REMEMBERED
            && let Some(old) = self.seen_order.pop_front()
        {
            self.seen.remove(&old);
        }
    }

    /// The store holds the rows [`admit`](Self::admit) gave: they may be delivered.
    pub fn commit(&mut self, rows: Vec<StoredMessage>) {
        if let Some(row) = rows.first() {
            let k = &row.key;
            let id = (k.namespace.clone(), k.sender.clone(), k.message_id.clone());
            if let Some(answer) = self.seen.get_mut(&id) {
                *answer = Some(rows.len() as u32);
            }
        }
        let payload = rows.first().map(|r| Arc::new(r.payload.clone()));
        for row in rows {
            self.next_seq += 1;
            let mailbox = self
                .boxes
                .entry((row.key.namespace.clone(), row.key.recipient.clone()))
                .or_default();
            let lane = mailbox.lanes.entry(row.key.sender.clone()).or_default();
            let queued = Queued {
                seq: self.next_seq,
                message_id: row.key.message_id,
                from: row.key.sender,
                topic: row.topic,
                priority: row.priority,
                payload: payload.clone().unwrap_or_default(),
                sent_at_ms: row.sent_at_ms,
                attempts: 0,
                not_before: None,
            };
            lane.push_back(queued);
        }
    }

    /// The store failed to keep the rows: their room is given back and the message is not
    /// remembered (the sender is told to send it again).
    pub fn abort(&mut self, rows: &[StoredMessage]) {
        for row in rows {
            let key = (row.key.namespace.clone(), row.key.recipient.clone());
            if let Some(mailbox) = self.boxes.get_mut(&key) {
                mailbox.len = mailbox.len.saturating_sub(1);
                if mailbox.len == 0 {
                    self.boxes.remove(&key);
                }
            }
        }
        if let Some(row) = rows.first() {
            let id = (
                row.key.namespace.clone(),
                row.key.sender.clone(),
                row.key.message_id.clone(),
            );
            self.seen.remove(&id);
            self.seen_order.retain(|s| *s != id);
        }
    }

    /// The messages the store kept (after a restart), oldest first, back in their mailboxes.
    pub fn restore(&mut self, rows: Vec<StoredMessage>) {
        for row in rows {
            let k = &row.key;
            self.remember(
                (k.namespace.clone(), k.sender.clone(), k.message_id.clone()),
                None,
            );
            self.boxes
                .entry((k.namespace.clone(), k.recipient.clone()))
                .or_default()
                .len += 1;
            self.commit(vec![row]);
        }
    }

    /// Messages acknowledged or dropped since the last call: the store forgets them.
    pub fn forgotten(&mut self) -> Vec<MessageKey> {
        std::mem::take(&mut self.forgotten)
    }

    /// [`admit`](Self::admit) then [`commit`](Self::commit), without a store.
    #[cfg(test)]
    pub fn post(&mut self, out: Outgoing, now_ms: i64) -> Result<u32, TaskError> {
        match self.admit(&out, now_ms) {
            Admit::Seen(n) => Ok(n),
            Admit::Refused(e) => Err(e),
            Admit::Store(rows) => {
                let n = rows.len() as u32;
                self.commit(rows);
                Ok(n)
            }
        }
    }

    /// A delivery answered by the node it went to: done, or (its handler failed) delivered
    /// again after a backoff. An answer from another node, or for a delivery that went out
    /// again meanwhile, is ignored.
    pub fn ack(
        &mut self,
        node: &NodeId,
        instance: u64,
        delivery: u64,
        outcome: Result<(), TaskError>,
        now: Instant,
    ) {
        let ours = self
            .in_flight
            .get(&delivery)
            .is_some_and(|f| f.node == *node && f.instance == instance);
        if !ours {
            return;
        }
        let f = self.in_flight.remove(&delivery).expect("checked above");
        match outcome {
            Ok(()) => {
                if let Some(t) = self
                    .takers
                    .iter_mut()
                    .find(|t| t.node == f.node && t.instance == f.instance && t.name == f.to.1)
                {
                    t.in_flight = t.in_flight.saturating_sub(1);
                }
                if let Some(mailbox) = self.boxes.get_mut(&f.to) {
                    mailbox.busy.remove(&f.message.from);
                    mailbox.len -= 1;
                    if mailbox.len == 0 {
                        self.boxes.remove(&f.to);
                    }
                }
                self.forgotten.push(key_of(&f.to, &f.message));
            }
            Err(e) => {
                tracing::debug!(message_id = %f.message.message_id, error = %e, "message handler failed");
                let backoff = Duration::from_millis(100 << f.message.attempts.min(6));
                self.give_back(f, true, Some(now + backoff));
            }
        }
    }

    /// Deliveries whose answer is overdue go out again (counted as failed attempts).
    pub fn sweep(&mut self, now: Instant) {
        self.requeue_where(|f| f.due <= now, true);
    }

    /// What can be delivered now: the best head of each mailbox's free lanes, to an instance of
    /// its agent with room, until none is left.
    pub fn pump(&mut self, now: Instant) -> Vec<(NodeTx, ToNode)> {
        let mut out = Vec::new();
        let keys: Vec<BoxKey> = self.boxes.keys().cloned().collect();
        for key in keys {
            while let Some(taker) = self.free_taker(&key) {
                let t = &self.takers[taker];
                let (node, instance) = (t.node.clone(), t.instance);
                let Some(tx) = self
                    .nodes
                    .get(&(node.clone(), instance))
                    .map(|n| n.tx.clone())
                else {
                    break;
                };
                let Some(mailbox) = self.boxes.get_mut(&key) else {
                    break;
                };
                let best = (mailbox.lanes.iter())
                    .filter(|(from, lane)| {
                        !mailbox.busy.contains(*from)
                            && lane
                                .front()
                                .is_some_and(|m| m.not_before.is_none_or(|t| t <= now))
                    })
                    .map(|(from, lane)| {
                        let m = lane.front().expect("filtered");
                        (std::cmp::Reverse(m.priority), m.seq, from.clone())
                    })
                    .min();
                let Some((_, _, from)) = best else {
                    break;
                };
                let lane = mailbox.lanes.get_mut(&from).expect("found above");
                let mut message = lane.pop_front().expect("found above");
                if lane.is_empty() {
                    mailbox.lanes.remove(&from);
                }
                mailbox.busy.insert(from);
                message.attempts += 1;
                self.takers[taker].in_flight += 1;
                self.next_delivery += 1;
                let delivery = self.next_delivery;
                out.push((
                    tx,
                    ToNode::Deliver(Delivered {
                        delivery,
                        agent: key.1.clone(),
                        message_id: message.message_id.clone(),
                        from_agent: message.from.clone(),
                        topic: message.topic.clone(),
                        priority: message.priority,
                        payload: (*message.payload).clone(),
                        namespace: key.0.clone(),
                        sent_at_ms: message.sent_at_ms,
                        attempt: message.attempts,
                    }),
                ));
                self.in_flight.insert(
                    delivery,
                    InFlight {
                        to: key.clone(),
                        message,
                        node,
                        instance,
                        due: now + DELIVERY_TIMEOUT,
                    },
                );
            }
        }
        out
    }

    /// The least busy instance of the mailbox's agent with room, serving its namespace.
    fn free_taker(&self, key: &BoxKey) -> Option<usize> {
        (self.takers.iter().enumerate())
            .filter(|(_, t)| {
                t.name == key.1 && t.in_flight < WINDOW && t.namespaces.contains(&key.0)
            })
            .min_by_key(|(_, t)| t.in_flight)
            .map(|(i, _)| i)
    }

    /// Messages held for `namespace`'s agent `agent`, in flight included.
    pub fn held(&self, namespace: &str, agent: &str) -> usize {
        self.boxes
            .get(&(namespace.to_owned(), agent.to_owned()))
            .map_or(0, |b| b.len)
    }
}

fn key_of(to: &BoxKey, message: &Queued) -> MessageKey {
    MessageKey {
        namespace: to.0.clone(),
        recipient: to.1.clone(),
        sender: message.from.clone(),
        message_id: message.message_id.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::domain::NAMESPACE_LABEL;
    use tokio::sync::mpsc;

    fn card(name: &str, inbox: bool, topics: &[&str]) -> AgentCard {
        let mut c = AgentCard::new(name);
        c.inbox = inbox;
        c.topics = topics.iter().map(|t| (*t).to_owned()).collect();
        c.labels
            .insert(NAMESPACE_LABEL.to_owned(), "default".to_owned());
        c
    }

    fn up(
        p: &mut Postbox,
        node: &str,
        cards: &[AgentCard],
    ) -> mpsc::Receiver<crate::node_link::Outbound> {
        let (tx, rx) = mpsc::channel(1024);
        p.node_up(&NodeId(node.into()), 1, cards, tx);
        rx
    }

    fn send(
        p: &mut Postbox,
        id: &str,
        from: &str,
        to: &str,
        priority: u8,
    ) -> Result<u32, TaskError> {
        p.post(
            Outgoing {
                namespace: "default".into(),
                message_id: id.into(),
                from: from.into(),
                topic: String::new(),
                priority,
                payload: serde_json::json!(id),
                recipients: vec![to.into()],
            },
            0,
        )
    }

    fn delivered(out: &[(NodeTx, ToNode)]) -> Vec<(u64, String)> {
        out.iter()
            .map(|(_, f)| match f {
                ToNode::Deliver(d) => (d.delivery, d.message_id.clone()),
                other => panic!("not a delivery: {other:?}"),
            })
            .collect()
    }

    /// One sender's messages go one at a time, in order; between senders the higher
    /// priority goes first; an acknowledgement lets the lane's next one go.
    #[test]
    fn lanes_keep_each_senders_order_and_priorities_pick_between_senders() {
        let mut p = Postbox::default();
        let _rx = up(
            &mut p,
            "n1",
            &[
                card("inbox", true, &[]),
                card("a", false, &[]),
                card("b", false, &[]),
            ],
        );
        let now = Instant::now();
        for (id, from, prio) in [
            ("a1", "a", 0),
            ("a2", "a", 9),
            ("b1", "b", 5),
            ("b2", "b", 0),
        ] {
            assert_eq!(send(&mut p, id, from, "inbox", prio), Ok(1));
        }
        let first = delivered(&p.pump(now));
        // a2 has priority 9 but waits behind a1: the heads are a1 (0) and b1 (5).
        assert_eq!(
            first.iter().map(|d| d.1.as_str()).collect::<Vec<_>>(),
            ["b1", "a1"]
        );
        assert!(
            p.pump(now).is_empty(),
            "each lane waits for its acknowledgement"
        );
        let node = NodeId("n1".into());
        p.ack(&node, 1, first[1].0, Ok(()), now);
        assert_eq!(delivered(&p.pump(now))[0].1, "a2");
        p.ack(&node, 1, first[0].0, Ok(()), now);
        assert_eq!(delivered(&p.pump(now))[0].1, "b2");
        assert_eq!(p.held("default", "inbox"), 2, "two in flight");
    }

    /// Sent again with the same id: taken once, answered the same. Full: refused whole.
    #[test]
    fn a_resent_message_is_taken_once_and_a_full_mailbox_refuses() {
        let mut p = Postbox::default();
        let _rx = up(&mut p, "n1", &[card("a", false, &[])]);
        assert_eq!(send(&mut p, "m1", "a", "away", 0), Ok(1));
        assert_eq!(send(&mut p, "m1", "a", "away", 0), Ok(1));
        assert_eq!(p.held("default", "away"), 1);
        for i in 2..=MAX_MAILBOX {
            send(&mut p, &format!("m{i}"), "a", "away", 0).unwrap();
        }
        let e = send(&mut p, "over", "a", "away", 0).unwrap_err();
        assert_eq!(e.code, "mailbox_full");
        assert!(e.message.contains("agent `away`") && e.retryable, "{e:?}");
        assert_eq!(p.held("default", "away"), MAX_MAILBOX);
        // Nothing refused is kept: the same id later is a new message.
        assert!(
            !p.seen
                .contains_key(&("default".into(), "a".into(), "over".into()))
        );
    }

    /// A node lost with a delivery in flight: it goes to another instance, first of its lane;
    /// a late answer from the lost node is ignored. A handler failing every time: dropped
    /// after the cap, counted. No answer in time: delivered again.
    #[test]
    fn deliveries_survive_a_lost_node_and_failures_are_capped() {
        let mut p = Postbox::default();
        let _r1 = up(
            &mut p,
            "n1",
            &[card("inbox", true, &[]), card("a", false, &[])],
        );
        let now = Instant::now();
        send(&mut p, "m1", "a", "inbox", 0).unwrap();
        send(&mut p, "m2", "a", "inbox", 0).unwrap();
        let d = delivered(&p.pump(now));
        assert_eq!(d[0].1, "m1");
        let _r2 = up(&mut p, "n2", &[card("inbox", true, &[])]);
        p.node_down(&NodeId("n1".into()), 1);
        let again = p.pump(now);
        let ToNode::Deliver(d2) = &again[0].1 else {
            panic!()
        };
        assert_eq!((d2.message_id.as_str(), d2.attempt), ("m1", 2));
        p.ack(&NodeId("n1".into()), 1, d[0].0, Ok(()), now);
        assert_eq!(
            p.held("default", "inbox"),
            2,
            "the lost node's answer is ignored"
        );

        let n2 = NodeId("n2".into());
        let mut at = now;
        let mut delivery = d2.delivery;
        for attempt in 2..=MAX_ATTEMPTS {
            p.ack(
                &n2,
                1,
                delivery,
                Err(TaskError::new("boom", "no", true)),
                at,
            );
            assert!(p.pump(at).is_empty(), "not before its backoff");
            at += Duration::from_secs(10);
            let next = p.pump(at);
            let ToNode::Deliver(d) = &next[0].1 else {
                panic!()
            };
            assert_eq!((d.message_id.as_str(), d.attempt), ("m1", attempt + 1));
            delivery = d.delivery;
            if attempt + 1 == MAX_ATTEMPTS {
                break;
            }
        }
        p.ack(
            &n2,
            1,
            delivery,
            Err(TaskError::new("boom", "no", true)),
            at,
        );
        assert_eq!(p.dropped, 1);
        let next = delivered(&p.pump(at));
        assert_eq!(next[0].1, "m2", "the lane goes on");
        p.sweep(at + DELIVERY_TIMEOUT);
        let ToNode::Deliver(d) = &p.pump(at + DELIVERY_TIMEOUT)[0].1 else {
            panic!()
        };
        assert_eq!((d.message_id.as_str(), d.attempt), ("m2", 2));
    }

    /// A message is deliverable only once kept; a store that failed gives its room back and
    /// forgets its id; acknowledged ones are for the store to forget; kept ones come back after
    /// a restart, in order.
    #[test]
    fn messages_are_kept_before_they_go_and_restored_after_a_restart() {
        let mut p = Postbox::default();
        let _rx = up(
            &mut p,
            "n1",
            &[card("inbox", true, &[]), card("a", false, &[])],
        );
        let now = Instant::now();
        let out = |id: &str| Outgoing {
            namespace: "default".into(),
            message_id: id.into(),
            from: "a".into(),
            topic: String::new(),
            priority: 0,
            payload: serde_json::json!(id),
            recipients: vec!["inbox".into()],
        };
        let Admit::Store(rows) = p.admit(&out("m1"), 0) else {
            panic!("taken")
        };
        assert!(p.pump(now).is_empty(), "not before the store has it");
        let Admit::Refused(e) = p.admit(&out("m1"), 0) else {
            panic!("a resend before the store kept it waits")
        };
        assert_eq!((e.code.as_str(), e.retryable), ("pending", true));
        p.abort(&rows);
        assert_eq!(p.held("default", "inbox"), 0);
        let Admit::Store(rows) = p.admit(&out("m1"), 0) else {
            panic!("taken again: the failed one was forgotten")
        };
        p.commit(rows.clone());
        assert_eq!(
            p.admit(&out("m1"), 0),
            Admit::Seen(1),
            "kept: answered again"
        );
        let d = delivered(&p.pump(now));
        p.ack(&NodeId("n1".into()), 1, d[0].0, Ok(()), now);
        assert_eq!(p.forgotten(), [rows[0].key.clone()]);

        let mut again = Postbox::default();
        let kept: Vec<StoredMessage> = ["k1", "k2"]
            .iter()
            .map(|id| {
                let Admit::Store(mut r) = p.admit(&out(id), 0) else {
                    panic!()
                };
                r.remove(0)
            })
            .collect();
        again.restore(kept);
        let _rx = up(&mut again, "n1", &[card("inbox", true, &[])]);
        assert_eq!(again.held("default", "inbox"), 2);
        assert_eq!(delivered(&again.pump(now))[0].1, "k1");
    }

    /// Senders are agents of the sending node, in a namespace it serves; topics reach their
    /// subscribers; a name nobody takes messages under is refused.
    #[test]
    fn senders_topics_and_recipients_are_checked() {
        let mut p = Postbox::default();
        let _rx = up(
            &mut p,
            "n1",
            &[
                card("a", false, &[]),
                card("s1", false, &["news"]),
                card("s2", true, &["news"]),
            ],
        );
        let n1 = NodeId("n1".into());
        assert_eq!(p.sender_namespace(&n1, 1, "a", ""), Ok("default".into()));
        let e = p.sender_namespace(&n1, 1, "ghost", "").unwrap_err();
        assert!(e.message.contains("from_agent"), "{e:?}");
        let e = p.sender_namespace(&n1, 1, "a", "other").unwrap_err();
        assert!(e.message.contains("namespace `other`"), "{e:?}");
        assert_eq!(p.subscribers("default", "news"), ["s1", "s2"]);
        let swarm = vec![
            "a".to_owned(),
            "s1".to_owned(),
            "s2".to_owned(),
            "gone".to_owned(),
        ];
        assert_eq!(
            p.taking_messages("default", swarm),
            ["s2"],
            "a swarm's takers only"
        );
        assert!(p.subscribers("other", "news").is_empty());
        assert_eq!(
            p.recipients_of_agent("default", "s2"),
            Ok(vec!["s2".into()])
        );
        assert_eq!(
            p.recipients_of_agent("default", "s1").unwrap_err().code,
            "no_such_agent",
            "s1 only takes its topic"
        );
    }
}
