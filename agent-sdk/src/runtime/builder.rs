//! The public face of the node runtime: a builder that checks the configuration and every
//! agent card, and `NodeRuntime::run_until`, which starts the `NodeRoot` supervisor and drains
//! it on shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use mesh_proto::convert::check_id;
use ractor::Actor;
use tokio::sync::watch;
use tracing::{info, warn};

use super::connection::ConnMsg;
use super::root::{NodeRoot, RootArgs, RootMsg};
use super::{Hosted, HostedAgent, RuntimeConfig};
use crate::agent::Agent;
use crate::error::{Error, Result};

/// Builds a [`NodeRuntime`].
#[derive(Default)]
pub struct NodeRuntimeBuilder {
    config: RuntimeConfig,
    agents: Vec<Arc<dyn Hosted>>,
}

impl NodeRuntimeBuilder {
    pub fn config(mut self, config: RuntimeConfig) -> Self {
        self.config = config;
        self
    }

    pub fn coordinator(mut self, url: impl Into<String>) -> Self {
        self.config.coordinator = url.into();
        self
    }

    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.config.name = name.into();
        self
    }

    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.labels.insert(key.into(), value.into());
        self
    }

    pub fn drain_grace(mut self, grace: Duration) -> Self {
        self.config.drain_grace = grace;
        self
    }

    pub fn agent<A: Agent>(mut self, agent: A) -> Self {
        self.agents.push(Arc::new(HostedAgent(Arc::new(agent))));
        self
    }

    /// Checks the configuration and every agent card.
    pub fn build(self) -> Result<NodeRuntime> {
        check_id("name", &self.config.name).map_err(|e| Error::Config(e.to_string()))?;
        crate::client::check_coordinator_url(&self.config.coordinator, self.config.tls.is_set())
            .map_err(|e| Error::Config(format!("coordinator: {e}")))?;
        if self.agents.is_empty() {
            return Err(Error::Config(
                "agents: a node needs at least one agent".into(),
            ));
        }
        let mut seen = HashMap::new();
        for (i, agent) in self.agents.iter().enumerate() {
            let card = agent.card();
            check_id(&format!("agents[{i}].name"), &card.name)
                .map_err(|e| Error::Config(e.to_string()))?;
            if card.skills.is_empty() {
                return Err(Error::Config(format!(
                    "agents[{i}].skills: agent `{}` has no skill",
                    card.name
                )));
            }
            if card.max_concurrency == 0 {
                return Err(Error::Config(format!(
                    "agents[{i}].max_concurrency: must be at least 1"
                )));
            }
            if let Some(first) = seen.insert(card.name.clone(), i) {
                return Err(Error::Config(format!(
                    "agents[{i}].name: `{}` already used by agents[{first}]",
                    card.name
                )));
            }
        }
        Ok(NodeRuntime {
            config: self.config,
            agents: self.agents,
        })
    }
}

/// Hosts agents on this node until told to stop.
pub struct NodeRuntime {
    config: RuntimeConfig,
    agents: Vec<Arc<dyn Hosted>>,
}

impl std::fmt::Debug for NodeRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeRuntime")
            .field("config", &self.config)
            .field("agents", &self.agents.len())
            .finish()
    }
}

impl NodeRuntime {
    pub fn builder() -> NodeRuntimeBuilder {
        NodeRuntimeBuilder::default()
    }

    /// Runs until `shutdown` resolves (or the coordinator asks the node to drain), then
    /// drains: in-flight attempts finish (up to `drain_grace`), no new ones are taken, and the
    /// node leaves cleanly.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        crate::metrics::describe();
        let grace = self.config.drain_grace;
        let (finished_tx, mut finished_rx) = watch::channel(false);
        let args = RootArgs {
            config: self.config,
            agents: self.agents,
            finished: finished_tx,
        };
        let (root, root_handle) = Actor::spawn(None, NodeRoot, args)
            .await
            .map_err(|e| Error::Runtime(format!("could not start the node: {e}")))?;
        let conn = ractor::call_t!(root, RootMsg::Connection, 5_000)
            .map_err(|e| Error::Runtime(format!("node root did not answer: {e}")))?;
        tokio::select! {
            _ = shutdown => info!("shutdown requested"),
            _ = finished_rx.wait_for(|done| *done) => info!("drained at the coordinator's request"),
        }
        let drained = conn
            .call(|reply| ConnMsg::Drain(Some(reply)), Some(grace))
            .await;
        if !matches!(drained, Ok(ractor::rpc::CallResult::Success(()))) && !*finished_rx.borrow() {
            warn!(
                grace_ms = grace.as_millis() as u64,
                "drain grace period over; leaving with attempts in flight"
            );
        }
        root.stop(Some("shutdown".into()));
        let _ = root_handle.await;
        Ok(())
    }
}
