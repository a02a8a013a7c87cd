//! Tracks live nodes and their agents. A node silent for `heartbeat_every × suspect_after_missed`
//! is `suspect` (no new work); silent for `lease` it is `dead`: its session is closed, its
//! in-flight attempts are handed back to the dispatcher, and it must register again as a new
//! instance. Only this actor's monotonic clock decides.
//! Child of `CoordinatorRoot`.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use mesh_proto::domain::*;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tracing::{info, warn};

use crate::config::RegistryConfig;
use crate::dispatcher::{DispatcherMsg, LoadBoard};
use crate::error::{Error, Result};
use crate::metrics as m;
use crate::node_link::{NodeTx, Outbound};
use crate::node_session::NodeSessionMsg;
use crate::slot::Slot;

pub enum RegistryMsg {
    /// Panics: for the tests of the restart paths.
    #[cfg(test)]
    Crash,
    Register {
        registration: Registration,
        session: ActorRef<NodeSessionMsg>,
        tx: NodeTx,
        reply: RpcReplyPort<Result<Registered, String>>,
    },
    Heartbeat {
        node: NodeId,
        instance: u64,
        session: ActorRef<NodeSessionMsg>,
    },
    /// The node said it is draining: no new work for it.
    Draining {
        node: NodeId,
        instance: u64,
    },
    /// An agent exhausted its restart budget on its node.
    AgentDown {
        node: NodeId,
        instance: u64,
        agent: String,
    },
    /// The node's stream ended; `clean` when the node drained first.
    Disconnected {
        node: NodeId,
        instance: u64,
        clean: bool,
    },
    /// Sent to itself every `sweep_every`.
    Sweep,
    /// Announce every live node to the dispatcher again (after the dispatcher restarted).
    Replay,
    /// An operator asks a node to drain.
    Drain {
        node: NodeId,
        reason: String,
        reply: RpcReplyPort<Result<NodeView>>,
    },
    ListNodes(RpcReplyPort<Vec<NodeView>>),
    ListAgents(Option<String>, RpcReplyPort<Vec<AgentView>>),
}

#[derive(Clone, Debug)]
pub struct NodeEntry {
    pub instance: u64,
    pub labels: BTreeMap<String, String>,
    pub agents: Vec<AgentCard>,
    pub last_beat: Instant,
    pub health: Health,
    pub died_at: Option<Instant>,
}

/// The agents as the dispatcher places work on them: each with its node's labels, where
/// it does not set the same label itself.
fn with_node_labels(agents: &[AgentCard], node: &BTreeMap<String, String>) -> Vec<AgentCard> {
    agents
        .iter()
        .map(|card| {
            let mut card = card.clone();
            for (k, v) in node {
                card.labels.entry(k.clone()).or_insert_with(|| v.clone());
            }
            card
        })
        .collect()
}

/// A change the sweep decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthChange {
    pub node: NodeId,
    pub instance: u64,
    pub to: Health,
}

/// What a heartbeat did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Beat {
    Alive,
    /// The node was suspect and is healthy again.
    Recovered,
    /// No live instance matches: the sender must register again.
    Unknown,
}

/// The registry's decisions, free of any actor runtime.
#[derive(Debug)]
pub struct RegistryState {
    pub config: RegistryConfig,
    pub nodes: HashMap<NodeId, NodeEntry>,
    next_instance: u64,
    /// Skills whose healthy-agent gauge was published, so that a skill no agent serves any
    /// more reads 0 rather than its last count.
    skills_published: std::collections::BTreeSet<String>,
}

impl RegistryState {
    /// `epoch` seeds instance numbers so that they never repeat across coordinator restarts.
    pub fn new(config: RegistryConfig, epoch: u64) -> Self {
        Self {
            config,
            nodes: HashMap::new(),
            next_instance: epoch << 32,
            skills_published: Default::default(),
        }
    }

    fn suspect_after(&self) -> Duration {
        self.config.heartbeat_every * self.config.suspect_after_missed
    }

    /// Registers a node as a new instance; returns it and the live instance it replaced.
    /// Whether a live node of this name belongs to another namespace: a registration must
    /// not take over another namespace's node (and with it, its work).
    pub fn held_by_another_namespace(&self, reg: &Registration) -> bool {
        self.nodes
            .get(&NodeId(reg.node_name.clone()))
            .filter(|e| e.health != Health::Dead)
            .is_some_and(|e| e.labels.get(NAMESPACE_LABEL) != reg.labels.get(NAMESPACE_LABEL))
    }

    pub fn register(&mut self, reg: &Registration, now: Instant) -> (Registered, Option<u64>) {
        self.next_instance += 1;
        let instance = self.next_instance;
        let node = NodeId(reg.node_name.clone());
        let replaced = self
            .nodes
            .get(&node)
            .filter(|e| e.health != Health::Dead)
            .map(|e| e.instance);
        self.nodes.insert(
            node.clone(),
            NodeEntry {
                instance,
                labels: reg.labels.clone(),
                agents: reg.agents.clone(),
                last_beat: now,
                health: Health::Healthy,
                died_at: None,
            },
        );
        let registered = Registered {
            node_id: node,
            instance,
            heartbeat_every_ms: self.config.heartbeat_every.as_millis() as u64,
            lease_ms: self.config.lease.as_millis() as u64,
        };
        (registered, replaced)
    }

    fn live_entry(&mut self, node: &NodeId, instance: u64) -> Option<&mut NodeEntry> {
        self.nodes
            .get_mut(node)
            .filter(|e| e.instance == instance && e.health != Health::Dead)
    }

    /// A dead instance never comes back: its heartbeats are `Unknown`.
    pub fn heartbeat(&mut self, node: &NodeId, instance: u64, now: Instant) -> Beat {
        match self.live_entry(node, instance) {
            None => Beat::Unknown,
            Some(entry) => {
                entry.last_beat = now;
                if entry.health == Health::Suspect {
                    entry.health = Health::Healthy;
                    Beat::Recovered
                } else {
                    Beat::Alive
                }
            }
        }
    }

    pub fn draining(&mut self, node: &NodeId, instance: u64) -> bool {
        match self.live_entry(node, instance) {
            Some(entry) => {
                entry.health = Health::Draining;
                true
            }
            None => false,
        }
    }

    pub fn agent_down(&mut self, node: &NodeId, instance: u64, agent: &str) -> bool {
        match self.live_entry(node, instance) {
            Some(entry) => {
                let before = entry.agents.len();
                entry.agents.retain(|a| a.name != agent);
                entry.agents.len() != before
            }
            None => false,
        }
    }

    /// The stream of `instance` ended. A clean leave forgets the node; otherwise it is dead.
    /// Returns whether the instance was live.
    pub fn disconnected(
        &mut self,
        node: &NodeId,
        instance: u64,
        clean: bool,
        now: Instant,
    ) -> bool {
        if self.live_entry(node, instance).is_none() {
            return false;
        }
        if clean {
            self.nodes.remove(node);
        } else if let Some(entry) = self.nodes.get_mut(node) {
            entry.health = Health::Dead;
            entry.died_at = Some(now);
        }
        true
    }

    /// Applies the lease rules at `now`.
    pub fn sweep(&mut self, now: Instant) -> Vec<HealthChange> {
        let suspect_after = self.suspect_after();
        let lease = self.config.lease;
        let forget = self.config.forget_dead_after;
        let mut changes = Vec::new();
        self.nodes.retain(|node, entry| {
            let age = now.saturating_duration_since(entry.last_beat);
            let to = match entry.health {
                Health::Dead => {
                    return entry
                        .died_at
                        .is_none_or(|t| now.saturating_duration_since(t) < forget);
                }
                _ if age > lease => Health::Dead,
                Health::Healthy if age > suspect_after => Health::Suspect,
                current => current,
            };
            if to != entry.health {
                entry.health = to;
                if to == Health::Dead {
                    entry.died_at = Some(now);
                }
                changes.push(HealthChange {
                    node: node.clone(),
                    instance: entry.instance,
                    to,
                });
            }
            true
        });
        changes
    }

    pub fn node_views(&self, now: Instant, load: &LoadBoard) -> Vec<NodeView> {
        let mut views: Vec<NodeView> = self
            .nodes
            .iter()
            .map(|(id, e)| NodeView {
                node_id: id.clone(),
                instance: e.instance,
                health: e.health,
                heartbeat_age_ms: now.saturating_duration_since(e.last_beat).as_millis() as u64,
                labels: e.labels.clone(),
                agents: e.agents.len() as u32,
                in_flight: e
                    .agents
                    .iter()
                    .map(|a| {
                        load.in_flight(&AgentKey {
                            node: id.clone(),
                            agent: a.name.clone(),
                        })
                    })
                    .sum(),
            })
            .collect();
        views.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        views
    }

    pub fn agent_views(
        &self,
        skill: Option<&str>,
        now: Instant,
        load: &LoadBoard,
    ) -> Vec<AgentView> {
        let mut views = Vec::new();
        for (id, e) in &self.nodes {
            for card in e
                .agents
                .iter()
                .filter(|c| skill.is_none_or(|s| c.has_skill(s)))
            {
                let key = AgentKey {
                    node: id.clone(),
                    agent: card.name.clone(),
                };
                views.push(AgentView {
                    node_id: id.clone(),
                    instance: e.instance,
                    name: card.name.clone(),
                    version: card.version.clone(),
                    skills: card.skills.iter().map(|s| s.name.clone()).collect(),
                    health: e.health,
                    heartbeat_age_ms: now.saturating_duration_since(e.last_beat).as_millis() as u64,
                    in_flight: load.in_flight(&key),
                    max_concurrency: card.max_concurrency,
                    circuit: load.circuit(&key).to_owned(),
                    description: card.description.clone(),
                    skill_specs: card.skills.clone(),
                    labels: card.labels.clone(),
                });
            }
        }
        views.sort_by(|a, b| (&a.node_id, &a.name).cmp(&(&b.node_id, &b.name)));
        views
    }

    fn publish_gauges(&mut self) {
        for health in [
            Health::Healthy,
            Health::Suspect,
            Health::Dead,
            Health::Draining,
        ] {
            let nodes = self.nodes.values().filter(|e| e.health == health);
            let (n, a) = nodes.fold((0, 0), |(n, a), e| (n + 1, a + e.agents.len()));
            metrics::gauge!(m::NODES, "health" => health.as_str()).set(n as f64);
            metrics::gauge!(m::AGENTS, "health" => health.as_str()).set(a as f64);
        }
        // Healthy agents per skill, for the "no healthy agent for a skill" alert; the label's
        // values are bounded by MAX_SKILL_LABELS.
        let mut healthy: std::collections::BTreeMap<&str, u32> = Default::default();
        for e in self.nodes.values() {
            for card in &e.agents {
                for skill in &card.skills {
                    let n = healthy.entry(skill.name.as_str()).or_default();
                    if e.health == Health::Healthy {
                        *n += 1;
                    }
                }
            }
        }
        for skill in &self.skills_published {
            if !healthy.contains_key(skill.as_str()) {
                metrics::gauge!(m::SKILL_HEALTHY_AGENTS, "skill" => skill.clone()).set(0.0);
            }
        }
        for (skill, n) in &healthy {
            if self.skills_published.len() >= m::MAX_SKILL_LABELS
                && !self.skills_published.contains(*skill)
            {
                continue;
            }
            metrics::gauge!(m::SKILL_HEALTHY_AGENTS, "skill" => skill.to_string())
                .set(f64::from(*n));
            self.skills_published.insert((*skill).to_owned());
        }
    }
}

pub struct Registry;

pub struct RegistryArgs {
    pub config: RegistryConfig,
    pub epoch: u64,
    pub dispatcher: Slot<DispatcherMsg>,
    pub load: LoadBoard,
}

pub struct RegistryActorState {
    core: RegistryState,
    /// The session and stream of each live instance.
    links: HashMap<(NodeId, u64), (ActorRef<NodeSessionMsg>, NodeTx)>,
    dispatcher: Slot<DispatcherMsg>,
    load: LoadBoard,
}

impl RegistryActorState {
    fn node_down(&mut self, node: &NodeId, instance: u64, reason: &str) {
        if let Some((session, _)) = self.links.remove(&(node.clone(), instance)) {
            let _ = session.cast(NodeSessionMsg::Close(
                tonic::Code::FailedPrecondition,
                reason.to_owned(),
            ));
        }
        self.dispatcher.cast(DispatcherMsg::NodeDown {
            node: node.clone(),
            instance,
        });
    }
}

impl Actor for Registry {
    type Msg = RegistryMsg;
    type State = RegistryActorState;
    type Arguments = RegistryArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: RegistryArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        myself.send_interval(args.config.sweep_every, || RegistryMsg::Sweep);
        Ok(RegistryActorState {
            core: RegistryState::new(args.config, args.epoch),
            links: HashMap::new(),
            dispatcher: args.dispatcher,
            load: args.load,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let now = Instant::now();
        match msg {
            RegistryMsg::Register {
                registration,
                session,
                tx,
                reply,
            } => {
                if st.core.held_by_another_namespace(&registration) {
                    let _ = reply.send(Err(format!(
                        "node `{}` is live in another namespace; give this node another name",
                        registration.node_name
                    )));
                    return Ok(());
                }
                let (registered, replaced) = st.core.register(&registration, now);
                let node = registered.node_id.clone();
                if let Some(old) = replaced {
                    info!(%node, instance = old, "instance replaced by a new registration");
                    metrics::counter!(m::NODE_DEATHS, "cause" => "replaced").increment(1);
                    st.node_down(&node, old, "replaced by a newer registration of this node");
                }
                info!(%node, instance = registered.instance, agents = registration.agents.len(), "node registered");
                st.links
                    .insert((node.clone(), registered.instance), (session, tx.clone()));
                st.dispatcher.cast(DispatcherMsg::NodeUp {
                    node,
                    instance: registered.instance,
                    agents: with_node_labels(&registration.agents, &registration.labels),
                    tx,
                });
                let _ = reply.send(Ok(registered));
                st.core.publish_gauges();
            }
            RegistryMsg::Heartbeat {
                node,
                instance,
                session,
            } => match st.core.heartbeat(&node, instance, now) {
                Beat::Alive => {}
                Beat::Recovered => {
                    info!(%node, instance, "node healthy again");
                    st.dispatcher.cast(DispatcherMsg::NodeDispatchable {
                        node,
                        instance,
                        dispatchable: true,
                    });
                    st.core.publish_gauges();
                }
                Beat::Unknown => {
                    warn!(%node, instance, "heartbeat from an instance that is not live");
                    let _ = session.cast(NodeSessionMsg::Close(
                        tonic::Code::FailedPrecondition,
                        format!("instance {instance} of node {node} is not live; register again"),
                    ));
                }
            },
            RegistryMsg::Draining { node, instance } => {
                if st.core.draining(&node, instance) {
                    info!(%node, instance, "node draining");
                    st.dispatcher.cast(DispatcherMsg::NodeDispatchable {
                        node,
                        instance,
                        dispatchable: false,
                    });
                    st.core.publish_gauges();
                }
            }
            RegistryMsg::AgentDown {
                node,
                instance,
                agent,
            } => {
                if st.core.agent_down(&node, instance, &agent) {
                    warn!(%node, instance, %agent, "agent down");
                    st.dispatcher.cast(DispatcherMsg::AgentDown {
                        node,
                        instance,
                        agent,
                    });
                    st.core.publish_gauges();
                }
            }
            RegistryMsg::Disconnected {
                node,
                instance,
                clean,
            } => {
                if st.core.disconnected(&node, instance, clean, now) {
                    if clean {
                        info!(%node, instance, "node left");
                    } else {
                        warn!(%node, instance, "node stream lost; node dead");
                        metrics::counter!(m::NODE_DEATHS, "cause" => "stream_lost").increment(1);
                    }
                    st.node_down(&node, instance, "stream ended");
                    st.core.publish_gauges();
                }
            }
            RegistryMsg::Sweep => {
                let _span = tracing::debug_span!("registry.sweep").entered();
                let changes = st.core.sweep(now);
                for change in &changes {
                    match change.to {
                        Health::Dead => {
                            warn!(node = %change.node, instance = change.instance, "lease expired; node dead");
                            metrics::counter!(m::NODE_DEATHS, "cause" => "lease_expired")
                                .increment(1);
                            st.node_down(
                                &change.node,
                                change.instance,
                                "lease expired; register again as a new instance",
                            );
                        }
                        Health::Suspect => {
                            warn!(node = %change.node, instance = change.instance, "node suspect");
                            st.dispatcher.cast(DispatcherMsg::NodeDispatchable {
                                node: change.node.clone(),
                                instance: change.instance,
                                dispatchable: false,
                            });
                        }
                        Health::Healthy | Health::Draining => {}
                    }
                }
                if !changes.is_empty() {
                    st.core.publish_gauges();
                }
            }
            #[cfg(test)]
            RegistryMsg::Crash => panic!("registry crashed on purpose (a test)"),
            RegistryMsg::Replay => {
                for (id, entry) in &st.core.nodes {
                    if let Some((_, tx)) = st.links.get(&(id.clone(), entry.instance)) {
                        st.dispatcher.cast(DispatcherMsg::NodeUp {
                            node: id.clone(),
                            instance: entry.instance,
                            agents: with_node_labels(&entry.agents, &entry.labels),
                            tx: tx.clone(),
                        });
                        if entry.health != Health::Healthy {
                            st.dispatcher.cast(DispatcherMsg::NodeDispatchable {
                                node: id.clone(),
                                instance: entry.instance,
                                dispatchable: false,
                            });
                        }
                    }
                }
            }
            RegistryMsg::Drain {
                node,
                reason,
                reply,
            } => {
                let instance = st
                    .core
                    .nodes
                    .get(&node)
                    .filter(|e| {
                        matches!(
                            e.health,
                            Health::Healthy | Health::Suspect | Health::Draining
                        )
                    })
                    .map(|e| e.instance);
                let result = match instance {
                    Some(instance) if st.core.draining(&node, instance) => {
                        info!(%node, instance, %reason, "drain requested");
                        st.dispatcher.cast(DispatcherMsg::NodeDispatchable {
                            node: node.clone(),
                            instance,
                            dispatchable: false,
                        });
                        if let Some((_, tx)) = st.links.get(&(node.clone(), instance)) {
                            let _ = tx.try_send(Outbound::Frame(ToNode::Drain { reason }));
                        }
                        st.core.publish_gauges();
                        st.core
                            .node_views(now, &st.load)
                            .into_iter()
                            .find(|v| v.node_id == node)
                            .ok_or_else(|| Error::NodeNotFound(node.0.clone()))
                    }
                    _ => Err(Error::NodeNotFound(node.0.clone())),
                };
                let _ = reply.send(result);
            }
            RegistryMsg::ListNodes(reply) => {
                let _ = reply.send(st.core.node_views(now, &st.load));
            }
            RegistryMsg::ListAgents(skill, reply) => {
                let _ = reply.send(st.core.agent_views(skill.as_deref(), now, &st.load));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RegistryConfig {
        RegistryConfig {
            heartbeat_every: Duration::from_secs(1),
            suspect_after_missed: 2,
            lease: Duration::from_secs(5),
            sweep_every: Duration::from_millis(250),
            forget_dead_after: Duration::from_secs(60),
            ..RegistryConfig::default()
        }
    }

    fn reg(name: &str) -> Registration {
        Registration {
            node_name: name.into(),
            labels: Default::default(),
            agents: vec![],
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_node_turns_suspect_then_dead() {
        let mut r = RegistryState::new(config(), 1);
        let t0 = Instant::now();
        let (n1, _) = r.register(&reg("n1"), t0);
        tokio::time::advance(Duration::from_millis(1900)).await;
        assert!(r.sweep(Instant::now()).is_empty());
        tokio::time::advance(Duration::from_millis(200)).await;
        let changes = r.sweep(Instant::now());
        assert_eq!(changes[0].to, Health::Suspect);
        // A heartbeat brings a suspect node back.
        assert_eq!(
            r.heartbeat(&n1.node_id, n1.instance, Instant::now()),
            Beat::Recovered
        );
        tokio::time::advance(Duration::from_millis(5001)).await;
        let changes = r.sweep(Instant::now());
        assert_eq!(changes.last().unwrap().to, Health::Dead);
    }

    #[tokio::test(start_paused = true)]
    async fn beats_shorter_than_half_the_lease_keep_a_node_healthy() {
        let mut r = RegistryState::new(config(), 1);
        let (n1, _) = r.register(&reg("n1"), Instant::now());
        for _ in 0..100 {
            tokio::time::advance(Duration::from_millis(1900)).await;
            r.heartbeat(&n1.node_id, n1.instance, Instant::now());
            assert!(r.sweep(Instant::now()).is_empty());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_instance_never_heartbeats_back_to_life() {
        let mut r = RegistryState::new(config(), 1);
        let (n1, _) = r.register(&reg("n1"), Instant::now());
        tokio::time::advance(Duration::from_secs(6)).await;
        r.sweep(Instant::now());
        assert_eq!(
            r.heartbeat(&n1.node_id, n1.instance, Instant::now()),
            Beat::Unknown
        );
        assert_eq!(r.nodes[&n1.node_id].health, Health::Dead);
        let (again, replaced) = r.register(&reg("n1"), Instant::now());
        assert_eq!(replaced, None, "a dead instance is not live");
        assert!(again.instance > n1.instance);
        assert_eq!(
            r.heartbeat(&again.node_id, again.instance, Instant::now()),
            Beat::Alive
        );
    }

    #[tokio::test(start_paused = true)]
    async fn registering_again_replaces_the_live_instance() {
        let mut r = RegistryState::new(config(), 3);
        let (first, _) = r.register(&reg("n1"), Instant::now());
        let (second, replaced) = r.register(&reg("n1"), Instant::now());
        assert_eq!(replaced, Some(first.instance));
        assert_eq!(
            r.heartbeat(&first.node_id, first.instance, Instant::now()),
            Beat::Unknown
        );
        assert!(second.instance > 3 << 32);
    }

    #[tokio::test(start_paused = true)]
    async fn a_clean_leave_forgets_the_node_and_dead_ones_are_forgotten_later() {
        let mut r = RegistryState::new(config(), 1);
        let (a, _) = r.register(&reg("a"), Instant::now());
        let (b, _) = r.register(&reg("b"), Instant::now());
        assert!(r.disconnected(&a.node_id, a.instance, true, Instant::now()));
        assert!(!r.nodes.contains_key(&a.node_id));
        assert!(r.disconnected(&b.node_id, b.instance, false, Instant::now()));
        assert!(!r.disconnected(&b.node_id, b.instance, false, Instant::now()));
        tokio::time::advance(Duration::from_secs(61)).await;
        r.sweep(Instant::now());
        assert!(r.nodes.is_empty());
    }
}
