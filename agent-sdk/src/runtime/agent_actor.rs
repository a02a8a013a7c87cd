//! One actor per hosted agent. Each attempt runs in its own task so that up to
//! `max_concurrency` run at once; a panic in the handler fails the attempt (retryable) and
//! then fails this actor, which `NodeRoot` restarts with backoff within a restart budget.
//! Child of `NodeRoot`.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use mesh_proto::domain::{AgentCard, Delivered, FencingToken, Task, TaskError, TaskResult};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, warn};

use super::connection::ConnMsg;
use crate::agent::{Agent, Context, Report};
use crate::messages::{Mail, Message};
use crate::metrics as m;

pub enum AgentMsg {
    Run(Task),
    /// A message for this agent, handled in a task of its own.
    Message(Delivered),
    Cancel(FencingToken),
    /// An attempt finished (sent by its task).
    Done(FencingToken),
    /// A handler panicked: this actor fails so that its supervisor restarts it.
    Panicked(String),
}

pub struct AgentActor<A>(PhantomData<fn() -> A>);

impl<A> Default for AgentActor<A> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

pub struct AgentArgs<A> {
    pub agent: Arc<A>,
    pub card: AgentCard,
    pub conn: ActorRef<ConnMsg>,
    pub progress: mpsc::Sender<(FencingToken, Report)>,
}

pub struct AgentState<A> {
    args: AgentArgs<A>,
    running: HashMap<FencingToken, CancellationToken>,
    /// Messages handled lately, (sender, id): one delivered again is acknowledged, not
    /// handled twice.
    handled: Arc<std::sync::Mutex<Handled>>,
}

/// The ids of messages handled lately, at most [`REMEMBERED`].
#[derive(Debug, Default)]
pub struct Handled {
    ids: std::collections::HashSet<(String, String)>,
    order: std::collections::VecDeque<(String, String)>,
}

const REMEMBERED: usize = 4_096;
/// How long a message handler may take before its delivery is failed (the coordinator waits
/// 30 s for an answer).
const MESSAGE_WITHIN: Duration = Duration::from_secs(25);

impl Handled {
    fn contains(&self, id: &(String, String)) -> bool {
        self.ids.contains(id)
    }

    fn insert(&mut self, id: (String, String)) {
        if self.ids.insert(id.clone()) {
            self.order.push_back(id);
            if self.order.len() > REMEMBERED
                && let Some(old) = self.order.pop_front()
            {
                self.ids.remove(&old);
            }
        }
    }
}

fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".to_owned()),
        Err(e) => e.to_string(),
    }
}

impl<A: Agent> Actor for AgentActor<A> {
    type Msg = AgentMsg;
    type State = AgentState<A>;
    type Arguments = AgentArgs<A>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: AgentArgs<A>,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(AgentState {
            args,
            running: HashMap::new(),
            handled: Arc::default(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            AgentMsg::Run(task) => {
                let name = st.args.card.name.clone();
                if st.running.len() >= st.args.card.max_concurrency as usize {
                    let outcome = Err(TaskError::new(
                        "busy",
                        format!(
                            "agent `{name}` is running {} attempts, its max_concurrency",
                            st.running.len()
                        ),
                        true,
                    ));
                    let _ = st
                        .args
                        .conn
                        .cast(ConnMsg::Result(TaskResult::new(task.token, outcome)));
                    return Ok(());
                }
                let cancel = CancellationToken::new();
                st.running.insert(task.token.clone(), cancel.clone());
                metrics::gauge!(m::TASKS_RUNNING).increment(1.0);
                let deadline = Duration::from_millis(task.deadline_ms.max(1));
                let ctx = Context {
                    token: task.token.clone(),
                    skill: task.skill.clone(),
                    idempotency_key: task.idempotency_key.clone(),
                    deadline: Instant::now() + deadline,
                    cancel: cancel.clone(),
                    progress: Some(st.args.progress.clone()),
                    usage: Arc::default(),
                    calls: Arc::default(),
                    mail: Mail::new(&name, Some(task.token.clone()), Some(st.args.conn.clone())),
                };
                let spent = ctx.usage.clone();
                let agent = st.args.agent.clone();
                let reports = st.args.progress.clone();
                let token = task.token;
                // The secrets the input names go in now, and nothing that comes back
                // carries their values (docs/security.md).
                let secrets = Arc::new(task.secrets);
                let mut input = task.input;
                mesh_proto::secrets::fill(&mut input, &secrets);
                let kept = secrets.clone();
                let began = Instant::now();
                let span = tracing::info_span!(
                    "agent.handle",
                    agent = %name,
                    skill = %task.skill,
                    run_id = %token.run_id,
                    step_id = %token.step_id,
                    attempt = token.attempt,
                    trace_id = tracing::field::Empty,
                    otel.status_code = tracing::field::Empty,
                );
                // The dispatch's span is its parent: one trace across the processes.
                mesh_proto::trace_context::set_parent(&span, &task.traceparent);
                if let Some(id) = mesh_proto::trace_context::trace_id(&span) {
                    span.record("trace_id", id);
                }
                let work = tokio::spawn(
                    async move {
                        let outcome = tokio::select! {
                            result = agent.handle(ctx, input) => result.map_err(TaskError::from),
                            _ = tokio::time::sleep(deadline) => Err(TaskError::new("timeout", format!("no result within {} ms", deadline.as_millis()), true)),
                            _ = cancel.cancelled() => Err(TaskError::new("cancelled", "the attempt was cancelled", false)),
                        };
                        if outcome.is_err() {
                            tracing::Span::current().record("otel.status_code", "ERROR");
                        }
                        outcome
                    }
                    .instrument(span),
                );
                tokio::spawn(async move {
                    let secrets = kept;
                    let outcome = match work.await {
                        Ok(outcome) => outcome,
                        Err(e) => {
                            let message =
                                mesh_proto::secrets::scrub_text(&panic_message(e), &secrets);
                            let _ = myself.cast(AgentMsg::Panicked(message.clone()));
                            Err(TaskError::new(
                                "agent_panicked",
                                format!("agent `{name}` panicked: {message}"),
                                true,
                            ))
                        }
                    };
                    let outcome = match outcome {
                        Ok(mut output) => {
                            mesh_proto::secrets::scrub(&mut output, &secrets);
                            Ok(output)
                        }
                        Err(mut e) => {
                            e.message = mesh_proto::secrets::scrub_text(&e.message, &secrets);
                            Err(e)
                        }
                    };
                    let label = match &outcome {
                        Ok(_) => "ok",
                        Err(_) => "error",
                    };
                    metrics::counter!(m::TASKS, "agent" => name, "outcome" => label).increment(1);
                    metrics::gauge!(m::TASKS_RUNNING).decrement(1.0);
                    let _ = myself.cast(AgentMsg::Done(token.clone()));
                    let usage =
                        std::mem::take(&mut *spent.lock().unwrap_or_else(|p| p.into_inner()));
                    // Behind the attempt's reports, on their channel; waits when it is full.
                    let result = TaskResult {
                        token: token.clone(),
                        outcome,
                        usage,
                        elapsed_ms: began.elapsed().as_millis() as u64,
                    };
                    let _ = reports.send((token, Report::Result(result))).await;
                });
            }
            AgentMsg::Message(d) => {
                let conn = st.args.conn.clone();
                let id = (d.from_agent.clone(), d.message_id.clone());
                let delivery = d.delivery;
                if st
                    .handled
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains(&id)
                {
                    let _ = conn.cast(ConnMsg::MessageDone {
                        delivery,
                        outcome: Ok(()),
                    });
                    return Ok(());
                }
                let name = st.args.card.name.clone();
                let mail = Mail::new(&name, None, Some(conn.clone())).namespace(&d.namespace);
                let message = Message {
                    id: d.message_id,
                    from: d.from_agent,
                    topic: (!d.topic.is_empty()).then_some(d.topic),
                    priority: d.priority,
                    payload: d.payload,
                    namespace: d.namespace,
                    sent_at_ms: d.sent_at_ms,
                    attempt: d.attempt,
                };
                let agent = st.args.agent.clone();
                let handled = st.handled.clone();
                let span = tracing::info_span!("agent.message", agent = %name, from = %message.from, message_id = %message.id);
                tokio::spawn(
                    async move {
                        let work = tokio::spawn(async move {
                            tokio::time::timeout(MESSAGE_WITHIN, agent.on_message(mail, message))
                                .await
                        });
                        let outcome = match work.await {
                            Ok(Ok(Ok(()))) => Ok(()),
                            Ok(Ok(Err(e))) => Err(TaskError::from(e)),
                            Ok(Err(_)) => Err(TaskError::new(
                                "timeout",
                                format!("no answer within {} s", MESSAGE_WITHIN.as_secs()),
                                true,
                            )),
                            Err(e) => Err(TaskError::new(
                                "agent_panicked",
                                format!("the message handler panicked: {}", panic_message(e)),
                                true,
                            )),
                        };
                        if outcome.is_ok() {
                            handled.lock().unwrap_or_else(|p| p.into_inner()).insert(id);
                        }
                        let _ = conn.cast(ConnMsg::MessageDone { delivery, outcome });
                    }
                    .instrument(span),
                );
            }
            AgentMsg::Cancel(token) => {
                if let Some(cancel) = st.running.get(&token) {
                    cancel.cancel();
                }
            }
            AgentMsg::Done(token) => {
                st.running.remove(&token);
            }
            AgentMsg::Panicked(message) => {
                warn!(agent = %st.args.card.name, %message, "agent panicked");
                return Err(format!("agent `{}` panicked: {message}", st.args.card.name).into());
            }
        }
        Ok(())
    }
}
