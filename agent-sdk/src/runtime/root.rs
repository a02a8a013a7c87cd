//! `NodeRoot`: supervises the connection and one actor per hosted agent. A failed agent is
//! restarted with backoff (100 ms doubling) within its restart budget; past it the agent is
//! reported down. A failed connection stops the node.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use mesh_proto::domain::{AgentCard, FencingToken};
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::connection::{ConnArgs, ConnMsg, Connection};
use super::{AgentSlot, AgentTable, Hosted, RuntimeConfig};
use crate::agent::Report;
use crate::metrics as m;

pub(super) enum RootMsg {
    Connection(ractor::RpcReplyPort<ActorRef<ConnMsg>>),
    /// Sent to itself once an agent's restart backoff has passed.
    Respawn(usize),
}

pub(super) struct NodeRoot;

pub(super) struct RootArgs {
    pub(super) config: RuntimeConfig,
    pub(super) agents: Vec<Arc<dyn Hosted>>,
    pub(super) finished: watch::Sender<bool>,
}

pub(super) struct RootState {
    config: RuntimeConfig,
    agents: Vec<Arc<dyn Hosted>>,
    names: Vec<String>,
    table: AgentTable,
    conn: ActorRef<ConnMsg>,
    progress: mpsc::Sender<(FencingToken, Report)>,
    /// Actor id of each live agent actor, by agent index.
    ids: HashMap<ActorId, usize>,
    restarts: Vec<Vec<Instant>>,
}

impl RootState {
    async fn spawn_agent(
        &mut self,
        myself: &ActorRef<RootMsg>,
        i: usize,
    ) -> Result<(), ActorProcessingErr> {
        let agent = self.agents[i]
            .spawn(self.conn.clone(), self.progress.clone(), myself.get_cell())
            .await?;
        self.ids.insert(agent.get_id(), i);
        self.table.set(&self.names[i], AgentSlot::Live(agent));
        let _ = self.conn.cast(ConnMsg::AgentBack(self.names[i].clone()));
        Ok(())
    }
}

impl Actor for NodeRoot {
    type Msg = RootMsg;
    type State = RootState;
    type Arguments = RootArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: RootArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let table = AgentTable::default();
        let cards: Vec<AgentCard> = args.agents.iter().map(|a| a.card()).collect();
        let names = cards.iter().map(|c| c.name.clone()).collect();
        let conn_args = ConnArgs {
            config: args.config.clone(),
            cards,
            agents: table.clone(),
            finished: args.finished,
        };
        let (conn, _) = Actor::spawn_linked(None, Connection, conn_args, myself.get_cell()).await?;
        // Reports and results go through one bounded channel to the connection, in order:
        // an attempt's last text arrives before its result.
        let (progress, mut progress_rx) = mpsc::channel::<(FencingToken, Report)>(256);
        let conn_for_progress = conn.clone();
        tokio::spawn(async move {
            while let Some((token, report)) = progress_rx.recv().await {
                let msg = match report {
                    Report::Result(result) => ConnMsg::Result(result),
                    other => ConnMsg::Report(token, other),
                };
                if conn_for_progress.cast(msg).is_err() {
                    break;
                }
            }
        });
        let n = args.agents.len();
        let mut st = RootState {
            config: args.config,
            agents: args.agents,
            names,
            table,
            conn,
            progress,
            ids: HashMap::new(),
            restarts: vec![Vec::new(); n],
        };
        for i in 0..n {
            st.spawn_agent(&myself, i).await?;
        }
        Ok(st)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RootMsg::Connection(reply) => {
                let _ = reply.send(st.conn.clone());
            }
            RootMsg::Respawn(i) => {
                info!(agent = %st.names[i], "restarting agent");
                st.spawn_agent(&myself, i).await?;
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorFailed(cell, err) => {
                let Some(i) = st.ids.remove(&cell.get_id()) else {
                    // The connection failed: without it the node cannot work.
                    error!(error = %err, "connection actor failed; stopping the node");
                    myself.stop(Some("connection failed".into()));
                    return Ok(());
                };
                let name = st.names[i].clone();
                st.table.set(&name, AgentSlot::Restarting);
                metrics::counter!(m::AGENT_RESTARTS, "agent" => name.clone()).increment(1);
                let now = Instant::now();
                let window = st.config.restart_window;
                let history = &mut st.restarts[i];
                history.retain(|t| now.duration_since(*t) < window);
                if history.len() as u32 >= st.config.restart_budget {
                    error!(agent = %name, restarts = history.len(), "agent exhausted its restart budget; reporting it down");
                    st.table.set(&name, AgentSlot::Absent);
                    let _ = st.conn.cast(ConnMsg::AgentDown {
                        agent: name,
                        reason: format!(
                            "restarted {} times within {window:?}; last: {err}",
                            history.len()
                        ),
                    });
                    return Ok(());
                }
                history.push(now);
                let delay =
                    Duration::from_millis(100).saturating_mul(1 << (history.len() - 1).min(6));
                warn!(agent = %name, error = %err, delay_ms = delay.as_millis() as u64, "agent failed; restarting after backoff");
                myself.send_after(delay, move || RootMsg::Respawn(i));
            }
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                if cell.get_id() == st.conn.get_id() {
                    myself.stop(Some("connection finished".into()));
                }
            }
            SupervisionEvent::ActorStarted(_) | SupervisionEvent::ProcessGroupChanged(_) => {}
        }
        Ok(())
    }
}
