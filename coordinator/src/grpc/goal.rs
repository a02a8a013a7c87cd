//! `mesh.v1.GoalService`: submit goals, read, watch, cancel and list runs.

use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt, stream};
use mesh_proto::convert::{check_id, parse_json, run_id};
use mesh_proto::domain::*;
use mesh_proto::{FieldError, pb};
use tokio_stream::wrappers::BroadcastStream;
use tonic::{Request, Response, Status};

use super::{Caller, bounded, status};
use crate::error::{Error, call_result};
use crate::intake;
use crate::machine::BudgetRaise;
use crate::root::Handles;
use crate::run::{self, RunMsg};
use crate::store::Backend;

const RUN_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a watch waits for a stored, running run to come live.
const WAIT_FOR_LIVE: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
pub struct GoalApi {
    pub quotas: std::sync::Arc<crate::quotas::Quotas>,
    pub handles: Handles,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::RunEvent, Status>> + Send>>;

fn finished_events(view: RunView) -> Vec<Result<pb::RunEvent, Status>> {
    let finished = view.state.is_terminal().then(|| RunEvent::Finished {
        state: view.state,
        output: view.output.clone(),
        error: view.error.clone(),
        output_elided_bytes: None,
    });
    std::iter::once(RunEvent::Snapshot(view))
        .chain(finished)
        .map(|e| Ok(bounded::event(e)))
        .collect()
}

/// The snapshot, then the run's events until it finishes. A watch ends with the run's
/// `Finished` event or with an error status, never with OK before the run finished: a
/// watcher that falls more than the buffer behind is cut off (RESOURCE_EXHAUSTED) rather
/// than holding memory, and one whose run stops without finishing (its actor restarts)
/// gets UNAVAILABLE; either can watch again and starts from a fresh snapshot.
fn live_events(subscription: run::Subscription) -> EventStream {
    let run::Subscription {
        view,
        streamed,
        events: rx,
    } = subscription;
    if view.state.is_terminal() {
        return Box::pin(stream::iter(finished_events(view)));
    }
    let run_id = view.run_id.clone();
    // The text running steps have streamed so far comes right after the snapshot.
    let caught_up = streamed.into_iter().map(|e| Ok(bounded::event(e)));
    let first = stream::iter(finished_events(view).into_iter().chain(caught_up));
    let live = BroadcastStream::new(rx)
        .map(Some)
        .chain(stream::once(std::future::ready(None)))
        .scan(false, move |done, item| {
            if *done {
                return std::future::ready(None);
            }
            *done = true;
            std::future::ready(Some(match item {
                Some(Ok(event)) => {
                    *done = matches!(*event, RunEvent::Finished { .. });
                    Ok(bounded::event(std::sync::Arc::unwrap_or_clone(event)))
                }
                Some(Err(_)) => Err(Status::resource_exhausted(
                    "watcher fell behind the run's events; watch again",
                )),
                None => Err(Status::unavailable(format!(
                    "run `{run_id}` stopped before it finished (it is being restarted); watch again"
                ))),
            }))
        });
    Box::pin(first.chain(live))
}

impl GoalApi {
    /// Goal intake as this coordinator is configured.
    fn intake(&self) -> intake::Intake {
        intake::Intake {
            deps: self.handles.deps.clone(),
            supervisor: self.handles.swarms.get(),
            registry: self.handles.registry.get(),
            quotas: Some(self.quotas.clone()),
            admission: intake::Admission {
                max_active_runs: self.handles.config.dispatch.max_active_runs,
                max_pending_per_skill: self.handles.config.dispatch.max_pending_per_skill,
            },
        }
    }

    /// A goal submitted: stored and started, or refused with nothing stored. No deadline of
    /// our own: once the goal is handed to the store the answer waits for the commit; the
    /// server's request deadline and the client's still apply, and their DEADLINE_EXCEEDED
    /// means "unknown: submit again with the same idempotency key".
    async fn accept(
        &self,
        caller: &Caller,
        request: pb::SubmitGoalRequest,
    ) -> Result<RunRef, Status> {
        let mut goal = GoalSpec::try_from(request).map_err(|e| status(e.into()))?;
        goal.namespace = caller.namespace.clone();
        self.intake().accept(goal).await.map_err(status)
    }

    /// The run's events from a snapshot to its end (see [`live_events`]).
    async fn watch(&self, id: &RunId) -> Result<EventStream, Status> {
        // A running run that is not live yet is starting (or resuming): wait for it a little,
        // woken when a run comes live.
        let give_up = tokio::time::Instant::now() + WAIT_FOR_LIVE;
        let changes = self.handles.directory.changes();
        loop {
            let changed = changes.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(run) = self.handles.directory.get(id)
                && let Ok(subscription) = call_result(
                    "run",
                    run.call(RunMsg::Subscribe, Some(RUN_CALL_TIMEOUT)).await,
                )
            {
                return Ok(live_events(subscription));
            }
            let view = run::stored_view(&self.handles.deps, id)
                .await
                .map_err(status)?;
            if view.state.is_terminal() {
                // Finished: the store has the whole story.
                return Ok(Box::pin(stream::iter(finished_events(view))));
            }
            if tokio::time::Instant::now() >= give_up {
                return Err(Status::unavailable(format!(
                    "run `{id}` is unfinished and not running yet (it is being resumed); watch again"
                )));
            }
            let _ = tokio::time::timeout_at(give_up, changed).await;
        }
    }

    /// A live run answers from memory; any other from its replayed journal.
    async fn view(&self, id: &RunId) -> Result<RunView, Status> {
        if let Some(run) = self.handles.directory.get(id)
            && let Ok(view) =
                call_result("run", run.call(RunMsg::View, Some(RUN_CALL_TIMEOUT)).await)
        {
            return Ok(view);
        }
        run::stored_view(&self.handles.deps, id)
            .await
            .map_err(status)
    }

    /// Asks a live run; a run that is not live is finished (or about to be resumed).
    async fn call_live(
        &self,
        id: &RunId,
        msg: impl FnOnce(ractor::RpcReplyPort<crate::error::Result<RunView>>) -> RunMsg,
    ) -> Result<RunView, Status> {
        if let Some(run) = self.handles.directory.get(id) {
            let answer = run.call(msg, Some(RUN_CALL_TIMEOUT)).await;
            if let Ok(result) = call_result("run", answer) {
                return result.map_err(status);
            }
        }
        let view = run::stored_view(&self.handles.deps, id)
            .await
            .map_err(status)?;
        Err(status(if view.state.is_terminal() {
            Error::FailedPrecondition(format!("run `{id}` already {}", view.state))
        } else {
            Error::Unavailable("the run (it is being resumed; try again)")
        }))
    }

    /// A run the caller may act on: parsed, and in the caller's namespace. A run of another
    /// namespace is as unknown as one that never was (`NOT_FOUND`, the same words).
    async fn own_run(&self, caller: &Caller, text: String) -> Result<RunId, Status> {
        let id = run_id("run_id", text).map_err(|e| status(e.into()))?;
        caller.acted_on(format!("run {id}"));
        self.in_namespace(caller, self.view(&id).await?)?;
        Ok(id)
    }

    /// `view` if it belongs to the caller's namespace, else `NOT_FOUND`.
    fn in_namespace(&self, caller: &Caller, view: RunView) -> Result<RunView, Status> {
        if view.namespace == caller.namespace {
            Ok(view)
        } else {
            Err(status(Error::RunNotFound(view.run_id.0)))
        }
    }

    async fn decide(
        &self,
        request: Request<pb::DecideRequest>,
        approved: bool,
    ) -> Result<Response<pb::Run>, Status> {
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        let id = self.own_run(&caller, req.run_id).await?;
        check_id("step_id", &req.step_id).map_err(|e| status(e.into()))?;
        check_comment(&req.comment)?;
        caller.acted_on(format!("run {id} step {}", req.step_id));
        // With authentication on, the decision is recorded under the caller's token, not
        // under a name the request declares.
        let by = if caller.authenticated() {
            caller.principal.subject.clone()
        } else {
            req.by
        };
        let (step, comment) = (StepId(req.step_id), req.comment);
        let view = self
            .call_live(&id, |reply| RunMsg::Decide {
                step,
                approved,
                comment,
                by,
                reply,
            })
            .await?;
        Ok(Response::new(bounded::run(view)))
    }
}

/// Longest comment kept with an approval, a rejection or a skip.
const MAX_COMMENT: usize = 4096;

fn check_comment(comment: &str) -> Result<(), Status> {
    if comment.len() > MAX_COMMENT {
        return Err(status(Error::InvalidArgument(mesh_proto::FieldError::new(
            "comment",
            format!("is {} bytes, the limit is {MAX_COMMENT}", comment.len()),
        ))));
    }
    Ok(())
}

#[tonic::async_trait]
impl pb::goal_service_server::GoalService for GoalApi {
    #[tracing::instrument(name = "grpc.submit_goal", level = "debug", skip_all)]
    async fn submit_goal(
        &self,
        request: Request<pb::SubmitGoalRequest>,
    ) -> Result<Response<pb::SubmitGoalResponse>, Status> {
        let caller = Caller::of(&request)?;
        let run = self.accept(&caller, request.into_inner()).await?;
        caller.acted_on(format!("run {}", run.run_id));
        Ok(Response::new(pb::SubmitGoalResponse {
            goal_id: run.goal_id.0,
            run_id: run.run_id.0,
            created: run.created,
        }))
    }

    type SubmitAndWatchStream =
        Pin<Box<dyn Stream<Item = Result<pb::SubmitAndWatchEvent, Status>> + Send>>;

    #[tracing::instrument(name = "grpc.submit_and_watch", level = "debug", skip_all)]
    async fn submit_and_watch(
        &self,
        request: Request<pb::SubmitGoalRequest>,
    ) -> Result<Response<Self::SubmitAndWatchStream>, Status> {
        use pb::submit_and_watch_event::Kind;
        let caller = Caller::of(&request)?;
        let run = self.accept(&caller, request.into_inner()).await?;
        caller.acted_on(format!("run {}", run.run_id));
        let accepted = pb::SubmitAndWatchEvent {
            kind: Some(Kind::Accepted(pb::SubmitGoalResponse {
                goal_id: run.goal_id.0,
                run_id: run.run_id.0.clone(),
                created: run.created,
            })),
        };
        // The goal is durable: from here a failure to watch is the watch's, told in the
        // stream after the acknowledgement, never instead of it.
        let events: EventStream = match self.watch(&run.run_id).await {
            Ok(events) => events,
            Err(status) => Box::pin(stream::once(std::future::ready(Err(status)))),
        };
        let events = events.map(|e| {
            e.map(|event| pb::SubmitAndWatchEvent {
                kind: Some(Kind::Event(event)),
            })
        });
        Ok(Response::new(Box::pin(
            stream::once(std::future::ready(Ok(accepted))).chain(events),
        )))
    }

    #[tracing::instrument(name = "grpc.get_run", level = "debug", skip_all)]
    async fn get_run(
        &self,
        request: Request<pb::GetRunRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let caller = Caller::of(&request)?;
        let id = run_id("run_id", request.into_inner().run_id).map_err(|e| status(e.into()))?;
        let view = self.in_namespace(&caller, self.view(&id).await?)?;
        Ok(Response::new(bounded::run(view)))
    }

    type WatchRunStream = EventStream;

    #[tracing::instrument(name = "grpc.watch_run", level = "debug", skip_all)]
    async fn watch_run(
        &self,
        request: Request<pb::WatchRunRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let caller = Caller::of(&request)?;
        let id = self.own_run(&caller, request.into_inner().run_id).await?;
        Ok(Response::new(self.watch(&id).await?))
    }

    #[tracing::instrument(name = "grpc.cancel_run", level = "debug", skip_all)]
    async fn cancel_run(
        &self,
        request: Request<pb::CancelRunRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        let id = self.own_run(&caller, req.run_id).await?;
        let reason = if req.reason.is_empty() {
            "cancelled by a client".to_owned()
        } else {
            req.reason
        };
        if let Some(run) = self.handles.directory.get(&id) {
            let answer = run
                .call(
                    |reply| RunMsg::Cancel { reason, reply },
                    Some(RUN_CALL_TIMEOUT),
                )
                .await;
            if let Ok(result) = call_result("run", answer) {
                return Ok(Response::new(bounded::run(result.map_err(status)?)));
            }
        }
        let view = run::stored_view(&self.handles.deps, &id)
            .await
            .map_err(status)?;
        Err(status(Error::FailedPrecondition(format!(
            "run `{id}` already {}",
            view.state
        ))))
    }

    #[tracing::instrument(name = "grpc.approve", level = "debug", skip_all)]
    async fn approve(
        &self,
        request: Request<pb::DecideRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        self.decide(request, true).await
    }

    #[tracing::instrument(name = "grpc.reject", level = "debug", skip_all)]
    async fn reject(
        &self,
        request: Request<pb::DecideRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        self.decide(request, false).await
    }

    #[tracing::instrument(name = "grpc.retry_run", level = "debug", skip_all)]
    async fn retry_run(
        &self,
        request: Request<pb::RetryRunRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        let id = self.own_run(&caller, req.run_id).await?;
        check_id("from_step", &req.from_step).map_err(|e| status(e.into()))?;
        let step = StepId(req.from_step);
        if self.handles.directory.contains(&id) {
            let view = self
                .call_live(&id, |reply| RunMsg::RetryFrom { step, reply })
                .await?;
            return Ok(Response::new(bounded::run(view)));
        }
        // A finished run: journaled, then started again; it replays to here.
        self.intake()
            .retry_finished(&id, &step)
            .await
            .map_err(status)?;
        Ok(Response::new(bounded::run(self.view(&id).await?)))
    }

    #[tracing::instrument(name = "grpc.skip_step", level = "debug", skip_all)]
    async fn skip_step(
        &self,
        request: Request<pb::SkipStepRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        let id = self.own_run(&caller, req.run_id).await?;
        check_id("step_id", &req.step_id).map_err(|e| status(e.into()))?;
        check_comment(&req.comment)?;
        let (step, comment) = (StepId(req.step_id), req.comment);
        let view = self
            .call_live(&id, |reply| RunMsg::Skip {
                step,
                comment,
                reply,
            })
            .await?;
        Ok(Response::new(bounded::run(view)))
    }

    #[tracing::instrument(name = "grpc.raise_budget", level = "debug", skip_all)]
    async fn raise_budget(
        &self,
        request: Request<pb::RaiseBudgetRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        let id = self.own_run(&caller, req.run_id).await?;
        check_comment(&req.comment)?;
        let wire = req.budget.unwrap_or_default();
        if wire.max_tokens.is_none() && wire.max_cost_usd.is_none() {
            return Err(status(
                FieldError::new("budget", "give the new max_tokens, max_cost_usd or both").into(),
            ));
        }
        let on_exceed = (!wire.on_exceed.is_empty())
            .then(|| wire.on_exceed.parse::<OnExceed>())
            .transpose()
            .map_err(|e| status(FieldError::new("budget.on_exceed", e).into()))?;
        let raise = BudgetRaise {
            max_tokens: wire.max_tokens,
            max_cost_usd: wire.max_cost_usd,
            on_exceed,
            comment: req.comment,
        };
        let view = self
            .call_live(&id, |reply| RunMsg::RaiseBudget { raise, reply })
            .await?;
        Ok(Response::new(bounded::run(view)))
    }

    #[tracing::instrument(name = "grpc.signal", level = "debug", skip_all)]
    async fn signal(
        &self,
        request: Request<pb::SignalRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        let id = self.own_run(&caller, req.run_id).await?;
        check_id("name", &req.name).map_err(|e| status(e.into()))?;
        let payload = parse_json("payload_json", &req.payload_json, serde_json::Value::Null)
            .map_err(|e| status(e.into()))?;
        let name = req.name;
        let view = self
            .call_live(&id, |reply| RunMsg::Signal {
                name,
                payload,
                reply,
            })
            .await?;
        Ok(Response::new(bounded::run(view)))
    }

    #[tracing::instrument(name = "grpc.get_run_trace", level = "debug", skip_all)]
    async fn get_run_trace(
        &self,
        request: Request<pb::GetRunTraceRequest>,
    ) -> Result<Response<pb::RunTrace>, Status> {
        let caller = Caller::of(&request)?;
        let id = run_id("run_id", request.into_inner().run_id).map_err(|e| status(e.into()))?;
        let (namespace, trace) = crate::trace::load(&self.handles.store, &id)
            .await
            .map_err(status)?;
        if namespace != caller.namespace {
            return Err(status(Error::RunNotFound(id.0)));
        }
        Ok(Response::new(trace))
    }

    #[tracing::instrument(name = "grpc.get_output", level = "debug", skip_all)]
    async fn get_output(
        &self,
        request: Request<pb::GetOutputRequest>,
    ) -> Result<Response<pb::OutputPage>, Status> {
        let caller = Caller::of(&request)?;
        let req = request.into_inner();
        let id = run_id("run_id", req.run_id).map_err(|e| status(e.into()))?;
        let view = self.in_namespace(&caller, self.view(&id).await?)?;
        let output = if req.step_id.is_empty() {
            view.output.ok_or_else(|| {
                status(Error::FailedPrecondition(format!(
                    "run `{id}` has no output (it is {})",
                    view.state
                )))
            })?
        } else {
            check_id("step_id", &req.step_id).map_err(|e| status(e.into()))?;
            let step = view
                .steps
                .into_iter()
                .find(|s| s.id.0 == req.step_id)
                .ok_or_else(|| {
                    status(Error::StepNotFound(format!(
                        "run `{id}` has no step `{}`",
                        req.step_id
                    )))
                })?;
            step.output.ok_or_else(|| {
                status(Error::FailedPrecondition(format!(
                    "step `{}` has no output (it is {})",
                    step.id, step.state
                )))
            })?
        };
        let page = bounded::page(&output, req.offset, req.max_bytes as usize).map_err(|e| {
            status(Error::InvalidArgument(mesh_proto::FieldError::new(
                "offset",
                e.trim_start_matches("offset: ").to_owned(),
            )))
        })?;
        Ok(Response::new(pb::OutputPage {
            chunk: page.chunk,
            offset: page.offset,
            total_bytes: page.total_bytes,
            done: page.done,
        }))
    }

    #[tracing::instrument(name = "grpc.list_runs", level = "debug", skip_all)]
    async fn list_runs(
        &self,
        request: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let mut query =
            ListRunsQuery::try_from(request.into_inner()).map_err(|e| status(e.into()))?;
        query.namespace = caller.namespace;
        let page = self.handles.store.list_runs(&query).await.map_err(status)?;
        Ok(Response::new(pb::ListRunsResponse {
            runs: page.runs.into_iter().map(Into::into).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }
}
