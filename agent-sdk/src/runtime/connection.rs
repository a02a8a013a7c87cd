//! The node's side of its stream to the coordinator: connects, registers, heartbeats on the
//! same stream that carries tasks, routes tasks to agent actors and sends their results.
//! Results stay buffered until the coordinator acknowledges them, and are sent again after
//! a reconnect, so none is lost with a broken stream. A lost stream is re-opened with capped
//! exponential backoff and jitter, and the node registers again as a new instance.
//! Child of `NodeRoot`.

use std::collections::HashMap;
use std::time::Duration;

use mesh_proto::domain::*;
use mesh_proto::pb;
use mesh_proto::pb::node_service_client::NodeServiceClient;
use ractor::concurrency::JoinHandle;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use tracing::{debug, info, warn};

use super::agent_actor::AgentMsg;
use super::ledger::{Acked, Admit, AgentState, Ledger, MAX_UNACKED};
use super::{AgentSlot, AgentTable, RuntimeConfig};
use crate::agent::{Report, SkillReply};
use crate::metrics as m;

/// Frames buffered towards the coordinator.
const OUTBOUND_QUEUE: usize = 1024;
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

pub enum ConnMsg {
    /// Sent to itself: open the stream.
    Connect,
    Inbound {
        generation: u64,
        frame: ToNode,
    },
    Lost {
        generation: u64,
        reason: String,
    },
    /// A task frame whose token is readable and the rest is not.
    Unreadable {
        generation: u64,
        token: FencingToken,
        error: String,
    },
    Heartbeat,
    /// An agent finished an attempt.
    Result(TaskResult),
    Report(FencingToken, Report),
    AgentDown {
        agent: String,
        reason: String,
    },
    /// A restarted agent is back: deliver the attempts held for it.
    AgentBack(String),
    /// Finish in-flight attempts, take no new ones, then close; the reply comes when done.
    Drain(Option<RpcReplyPort<()>>),
    /// An agent sends a message; the coordinator's answer goes to `reply`.
    Send {
        send: SendMessage,
        reply: oneshot::Sender<Result<u32, TaskError>>,
    },
    /// An agent handled a delivered message (or failed to).
    MessageDone {
        delivery: u64,
        outcome: Result<(), TaskError>,
    },
}

struct Link {
    generation: u64,
    tx: mpsc::Sender<pb::NodeFrame>,
    instance: Option<u64>,
    heartbeat: Option<JoinHandle<()>>,
}

pub struct Connection;

pub struct ConnArgs {
    pub config: RuntimeConfig,
    pub cards: Vec<AgentCard>,
    pub agents: AgentTable,
    /// Set to true once the node has drained and left.
    pub finished: watch::Sender<bool>,
}

pub struct ConnState {
    args: ConnArgs,
    link: Option<Link>,
    generation: u64,
    failures: u32,
    /// Which of the coordinator's addresses the next connect tries (they are tried in turn,
    /// moving on after each failure or lost stream: a standby refuses, the leader takes it).
    address: usize,
    /// Attempts, held attempts, unacknowledged results, drain: the decisions, apart from I/O.
    ledger: Ledger,
    drain_waiters: Vec<RpcReplyPort<()>>,
    /// Skill calls and tool approvals sent and not answered yet, by caller and call id.
    skill_calls: HashMap<(FencingToken, String), SkillReply>,
    /// Messages sent and not answered yet, by id.
    sends: HashMap<String, oneshot::Sender<Result<u32, TaskError>>>,
}

/// Most skill calls of the node's attempts waiting for their answers at once.
const MAX_SKILL_CALLS: usize = 1024;

/// Wait before reconnect attempt `failures` (1-based): capped exponential, full jitter on
/// the upper half.
pub fn backoff(failures: u32, min: Duration, max: Duration) -> Duration {
    let factor = 1u32
        .checked_shl(failures.saturating_sub(1).min(20))
        .unwrap_or(u32::MAX);
    let ceiling = min.saturating_mul(factor).min(max);
    let half = ceiling / 2;
    half + half.mul_f64(fastrand::f64())
}

impl ConnState {
    fn registration(&self) -> pb::NodeFrame {
        pb::NodeFrame::from(FromNode::Register(Registration {
            node_name: self.args.config.name.clone(),
            labels: self.args.config.labels.clone(),
            agents: self.args.cards.clone(),
        }))
    }

    fn send(&self, frame: FromNode) {
        if let Some(link) = &self.link
            && link.instance.is_some()
            && link.tx.try_send(frame.into()).is_err()
        {
            debug!("outbound queue full; frame dropped");
        }
    }

    /// Sends a frame the coordinator answers (a skill call, a tool approval), keeping `reply`
    /// for the answer; refused at once when the node is not registered or too many wait.
    fn ask(&mut self, token: FencingToken, call_id: String, frame: FromNode, reply: SkillReply) {
        // Calls of attempts that ended meanwhile wait for nothing.
        self.skill_calls.retain(|_, r| !r.abandoned());
        let registered = self.link.as_ref().is_some_and(|l| l.instance.is_some());
        if !registered {
            reply.send(Err(TaskError::new(
                "connection_lost",
                "the node is not connected to the coordinator",
                true,
            )));
        } else if self.skill_calls.len() >= MAX_SKILL_CALLS {
            reply.send(Err(TaskError::new(
                "skill_calls_full",
                format!("the node has {MAX_SKILL_CALLS} calls waiting for answers, its limit"),
                true,
            )));
        } else {
            self.skill_calls.insert((token, call_id), reply);
            self.send(frame);
        }
    }

    async fn send_result(&mut self, myself: &ActorRef<ConnMsg>, result: TaskResult) {
        let Some(link) = self.link.as_ref().filter(|l| l.instance.is_some()) else {
            return;
        };
        let frame = pb::NodeFrame::from(FromNode::Result(result));
        if tokio::time::timeout(SEND_TIMEOUT, link.tx.send(frame))
            .await
            .is_err()
        {
            // The stream does not drain: treat it as lost; unacked results go out again.
            let generation = link.generation;
            let _ = myself.cast(ConnMsg::Lost {
                generation,
                reason: "outbound stream stalled".into(),
            });
        }
    }

    fn drop_link(&mut self) {
        if let Some(h) = self.link.take().and_then(|link| link.heartbeat) {
            h.abort();
        }
        metrics::gauge!(m::CONNECTED).set(0.0);
    }

    fn schedule_reconnect(&mut self, myself: &ActorRef<ConnMsg>) {
        self.failures += 1;
        self.address = self.address.wrapping_add(1);
        let delay = backoff(
            self.failures,
            self.args.config.reconnect_min,
            self.args.config.reconnect_max,
        );
        debug!(
            delay_ms = delay.as_millis() as u64,
            failures = self.failures,
            "reconnecting after backoff"
        );
        myself.send_after(delay, || ConnMsg::Connect);
    }

    fn check_drained(&mut self, myself: &ActorRef<ConnMsg>) {
        if !self.ledger.drained() {
            return;
        }
        info!(node = %self.args.config.name, "drained; leaving");
        // Dropping the sender ends the request stream: the coordinator sees a clean leave.
        self.drop_link();
        for waiter in self.drain_waiters.drain(..) {
            let _ = waiter.send(());
        }
        let _ = self.args.finished.send(true);
        myself.stop(Some("drained".into()));
    }

    async fn connect(&mut self, myself: &ActorRef<ConnMsg>) -> Result<(), String> {
        self.generation += 1;
        let generation = self.generation;
        let cfg = &self.args.config;
        // Resolved at each connect: after a failover, a name may stand for other addresses.
        let targets = crate::client::resolve(&cfg.coordinator).await;
        let target = targets
            .get(self.address % targets.len().max(1))
            .ok_or_else(|| "no coordinator address is given".to_owned())?;
        let address = &target.url;
        let mut endpoint = Endpoint::from_shared(address.clone())
            .map_err(|e| format!("bad coordinator address {address}: {e}"))?;
        if let Some(mut tls) = cfg.tls.client_config()? {
            if let Some(name) = &target.server_name {
                tls = tls.domain_name(name.clone());
            }
            endpoint = endpoint.tls_config(tls).map_err(|e| format!("tls: {e}"))?;
        }
        let endpoint = endpoint
            .connect_timeout(cfg.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(
                (cfg.coordinator_silence / 5).max(Duration::from_millis(100)),
            )
            .keep_alive_timeout(cfg.coordinator_silence * 4 / 5);
        let channel = tokio::time::timeout(cfg.connect_timeout, endpoint.connect())
            .await
            .map_err(|_| "connect timed out".to_owned())?
            .map_err(|e| format!("connect: {e}"))?;
        let mut client = NodeServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        // Queue `register` before opening the stream: the server waits for it.
        tx.send(self.registration())
            .await
            .map_err(|_| "outbound closed".to_owned())?;
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(token) = cfg.token.as_ref().filter(|t| !t.is_empty()) {
            let value = format!("Bearer {}", token.expose().trim())
                .parse()
                .map_err(|_| "the token is not printable ASCII".to_owned())?;
            request.metadata_mut().insert("authorization", value);
        }
        if !cfg.namespaces.is_empty() {
            let list = cfg.namespaces.join(",");
            let value = list
                .parse()
                .map_err(|_| format!("namespaces `{list}` are not ASCII"))?;
            request.metadata_mut().insert("mesh-namespace", value);
        }
        let response = tokio::time::timeout(cfg.connect_timeout, client.connect(request))
            .await
            .map_err(|_| "stream open timed out".to_owned())?
            .map_err(|s| format!("stream refused: {}", s.message()))?;
        let mut inbound = response.into_inner();
        let me = myself.clone();
        tokio::spawn(async move {
            let reason = loop {
                match inbound.message().await {
                    Ok(Some(frame)) => {
                        let token = mesh_proto::convert::task_token(&frame);
                        let msg = match (ToNode::try_from(frame), token) {
                            (Ok(frame), _) => ConnMsg::Inbound { generation, frame },
                            // A task this node cannot read fails its attempt at once, for
                            // good: sending it again would not make it readable.
                            (Err(e), Some(token)) => ConnMsg::Unreadable {
                                generation,
                                token,
                                error: e.to_string(),
                            },
                            (Err(e), None) => {
                                warn!(error = %e, "invalid frame from the coordinator ignored");
                                continue;
                            }
                        };
                        if me.cast(msg).is_err() {
                            return;
                        }
                    }
                    Ok(None) => break "coordinator closed the stream".to_owned(),
                    Err(status) => break format!("{:?}: {}", status.code(), status.message()),
                }
            };
            let _ = me.cast(ConnMsg::Lost { generation, reason });
        });
        self.link = Some(Link {
            generation,
            tx,
            instance: None,
            heartbeat: None,
        });
        Ok(())
    }

    async fn on_frame(&mut self, myself: &ActorRef<ConnMsg>, frame: ToNode) {
        match frame {
            ToNode::Registered(r) => {
                let every = Duration::from_millis(r.heartbeat_every_ms.max(10));
                info!(node = %r.node_id, instance = r.instance, heartbeat_ms = r.heartbeat_every_ms, lease_ms = r.lease_ms, "registered");
                let heartbeat = myself.send_interval(every, || ConnMsg::Heartbeat);
                if let Some(link) = &mut self.link {
                    link.instance = Some(r.instance);
                    link.heartbeat = Some(heartbeat);
                }
                self.failures = 0;
                metrics::gauge!(m::CONNECTED).set(1.0);
                if self.ledger.draining() {
                    self.send(FromNode::Draining);
                }
                let pending = self.ledger.to_resend();
                if !pending.is_empty() {
                    info!(
                        results = pending.len(),
                        "sending unacknowledged results again"
                    );
                }
                for result in pending {
                    self.send_result(myself, result).await;
                }
            }
            ToNode::Task(task) => {
                let (agent, slot) = match self.args.agents.get(&task.agent) {
                    AgentSlot::Live(agent) => (Some(agent), AgentState::Live),
                    AgentSlot::Restarting => (None, AgentState::Restarting),
                    AgentSlot::Absent => (None, AgentState::Absent),
                };
                match self.ledger.admit(task, slot) {
                    Admit::Run(task) => {
                        if let Some(agent) = agent {
                            let _ = agent.cast(AgentMsg::Run(task));
                        }
                    }
                    Admit::Held => debug!("agent restarting; attempt held until it is back"),
                    Admit::Refuse(result) => self.send_result(myself, result).await,
                }
            }
            ToNode::Cancel { token, reason } => {
                debug!(%token, %reason, "cancel requested");
                if let Some(name) = self.ledger.cancel(&token)
                    && let AgentSlot::Live(agent) = self.args.agents.get(&name)
                {
                    let _ = agent.cast(AgentMsg::Cancel(token));
                }
            }
            ToNode::SkillResult {
                token,
                call_id,
                outcome,
            } => match self.skill_calls.remove(&(token, call_id)) {
                Some(reply) => reply.send(outcome),
                None => debug!("answer to a skill call nobody waits for dropped"),
            },
            ToNode::MessageSent {
                message_id,
                outcome,
            } => {
                if let Some(reply) = self.sends.remove(&message_id) {
                    let _ = reply.send(outcome);
                }
            }
            ToNode::Deliver(d) => match self.args.agents.get(&d.agent) {
                AgentSlot::Live(agent) => {
                    let _ = agent.cast(AgentMsg::Message(d));
                }
                AgentSlot::Restarting | AgentSlot::Absent => self.send(FromNode::MessageAck {
                    delivery: d.delivery,
                    outcome: Err(TaskError::new(
                        "agent_unavailable",
                        format!("agent `{}` is not running on this node", d.agent),
                        true,
                    )),
                }),
            },
            ToNode::ToolDecision {
                token,
                call_id,
                decision,
            } => match self.skill_calls.remove(&(token, call_id)) {
                Some(reply) => reply.send(Ok(serde_json::json!({
                    "approved": decision.approved,
                    "comment": decision.comment,
                    "by": decision.by,
                }))),
                None => debug!("decision on a tool call nobody waits for dropped"),
            },
            ToNode::Drain { reason } => {
                info!(%reason, "coordinator asked this node to drain");
                self.ledger.drain();
                self.send(FromNode::Draining);
                self.check_drained(myself);
            }
            ToNode::ResultAck {
                token,
                code,
                message,
            } => {
                if self.ledger.acked(&token, code) == Acked::Rejected {
                    warn!(%token, %message, "result rejected by the coordinator");
                    metrics::counter!(m::RESULTS_REJECTED).increment(1);
                }
                self.check_drained(myself);
            }
        }
    }
}

impl Actor for Connection {
    type Msg = ConnMsg;
    type State = ConnState;
    type Arguments = ConnArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: ConnArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        myself.cast(ConnMsg::Connect)?;
        Ok(ConnState {
            args,
            link: None,
            generation: 0,
            failures: 0,
            address: 0,
            ledger: Ledger::new(MAX_UNACKED),
            drain_waiters: Vec::new(),
            skill_calls: HashMap::new(),
            sends: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ConnMsg::Connect => {
                if st.link.is_some() {
                    return Ok(());
                }
                if st.generation > 0 {
                    metrics::counter!(m::RECONNECTS).increment(1);
                }
                if let Err(reason) = st.connect(&myself).await {
                    warn!(coordinator = %st.args.config.coordinator, %reason, "cannot reach the coordinator");
                    st.schedule_reconnect(&myself);
                }
            }
            ConnMsg::Inbound { generation, frame } => {
                if st.link.as_ref().is_some_and(|l| l.generation == generation) {
                    st.on_frame(&myself, frame).await;
                }
            }
            ConnMsg::Unreadable {
                generation,
                token,
                error,
            } => {
                if st.link.as_ref().is_some_and(|l| l.generation == generation) {
                    warn!(%token, %error, "task could not be read; its attempt fails");
                    let result = st.ledger.unreadable(token, &error);
                    st.send_result(&myself, result).await;
                }
            }
            ConnMsg::Lost { generation, reason } => {
                if st.link.as_ref().is_some_and(|l| l.generation == generation) {
                    warn!(%reason, "stream to the coordinator lost");
                    st.drop_link();
                    // Their answers would come on the lost stream: the callers learn now.
                    for (_, reply) in st.skill_calls.drain() {
                        reply.send(Err(TaskError::new(
                            "connection_lost",
                            format!("the stream to the coordinator was lost: {reason}"),
                            true,
                        )));
                    }
                    for (_, reply) in st.sends.drain() {
                        let _ = reply.send(Err(TaskError::new(
                            "connection_lost",
                            format!("the stream to the coordinator was lost: {reason}"),
                            true,
                        )));
                    }
                    st.schedule_reconnect(&myself);
                }
            }
            ConnMsg::Send { send, reply } => {
                st.sends.retain(|_, r| !r.is_closed());
                let registered = st.link.as_ref().is_some_and(|l| l.instance.is_some());
                if !registered {
                    let _ = reply.send(Err(TaskError::new(
                        "connection_lost",
                        "the node is not connected to the coordinator",
                        true,
                    )));
                } else if st.sends.len() >= MAX_SKILL_CALLS {
                    let _ = reply.send(Err(TaskError::new(
                        "sends_full",
                        format!(
                            "the node has {MAX_SKILL_CALLS} messages waiting for answers, its limit"
                        ),
                        true,
                    )));
                } else {
                    st.sends.insert(send.message_id.clone(), reply);
                    st.send(FromNode::SendMessage(send));
                }
            }
            ConnMsg::MessageDone { delivery, outcome } => {
                st.send(FromNode::MessageAck { delivery, outcome });
            }
            ConnMsg::Heartbeat => {
                if let Some(instance) = st.link.as_ref().and_then(|l| l.instance) {
                    st.send(FromNode::Heartbeat { instance });
                }
            }
            ConnMsg::Result(result) => {
                let (result, dropped) = st.ledger.finished(result);
                if let Some(victim) = dropped {
                    warn!(token = %victim, "too many unacknowledged results; dropping one");
                }
                st.send_result(&myself, result).await;
                st.check_drained(&myself);
            }
            ConnMsg::Report(token, Report::Progress(progress)) => {
                st.send(FromNode::Progress(TaskProgress {
                    token,
                    message: progress.message,
                    fraction: progress.fraction,
                }))
            }
            // The forwarder turns results into `ConnMsg::Result`; one arriving here is too.
            ConnMsg::Report(_, Report::Result(result)) => {
                let _ = myself.cast(ConnMsg::Result(result));
            }
            ConnMsg::Report(
                token,
                Report::SkillCall {
                    call_id,
                    skill,
                    input,
                    reply,
                },
            ) => {
                let frame = FromNode::SkillCall(SkillCall {
                    token: token.clone(),
                    call_id: call_id.clone(),
                    skill,
                    input,
                });
                st.ask(token, call_id, frame, reply);
            }
            ConnMsg::Report(
                token,
                Report::ToolApproval {
                    call_id,
                    tool,
                    arguments,
                    reply,
                },
            ) => {
                let frame = FromNode::ToolApproval(ToolApproval {
                    token: token.clone(),
                    call_id: call_id.clone(),
                    tool,
                    arguments,
                });
                st.ask(token, call_id, frame, reply);
            }
            ConnMsg::Report(
                token,
                Report::ToolUsed {
                    call_id,
                    tool,
                    arguments,
                    ok,
                    result,
                    elapsed_ms,
                },
            ) => st.send(FromNode::ToolUsed(ToolUsed {
                token,
                call_id,
                tool,
                arguments,
                ok,
                result,
                elapsed_ms,
            })),
            ConnMsg::Report(token, Report::Delta { text, restart }) => {
                st.send(FromNode::Delta(TaskDelta {
                    token,
                    text,
                    restart,
                }))
            }
            ConnMsg::AgentDown { agent, reason } => {
                // Attempts held for it fail now; the coordinator re-dispatches them elsewhere.
                for result in st.ledger.agent_down(&agent, &reason) {
                    st.send_result(&myself, result).await;
                }
                st.send(FromNode::AgentDown { agent, reason });
            }
            ConnMsg::AgentBack(name) => {
                let ready = st.ledger.agent_back(&name);
                if let AgentSlot::Live(agent) = st.args.agents.get(&name) {
                    for task in ready {
                        let _ = agent.cast(AgentMsg::Run(task));
                    }
                }
            }
            ConnMsg::Drain(waiter) => {
                if !st.ledger.draining() {
                    info!(in_flight = st.ledger.in_flight(), "draining");
                }
                st.ledger.drain();
                st.drain_waiters.extend(waiter);
                st.send(FromNode::Draining);
                st.check_drained(&myself);
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        st.drop_link();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped_with_jitter() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        for _ in 0..100 {
            let first = backoff(1, min, max);
            assert!(
                first >= Duration::from_millis(50) && first <= min,
                "{first:?}"
            );
            let fourth = backoff(4, min, max);
            assert!(fourth >= Duration::from_millis(400) && fourth <= Duration::from_millis(800));
            let late = backoff(40, min, max);
            assert!(late >= max / 2 && late <= max, "{late:?}");
        }
    }
}
