//! The web dashboard on the coordinator's HTTP port (docs/observability.md): server-rendered
//! pages (maud), a few lines of JavaScript for live updates over server-sent events, every
//! asset in the binary.
//!
//! The dashboard is a client of the gRPC services in the same process: each page and action
//! is decided by the guard under the rule of the RPC it stands for (a read-only token sees no
//! buttons, and an action it sends anyway is refused the same way the RPC is), then served by
//! calling that service's handler with the caller in the request. A token is given once on
//! the login page and kept in an HttpOnly, SameSite=Strict cookie.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use futures::{Stream, StreamExt};
use maud::{DOCTYPE, Markup, PreEscaped, html};
use mesh_proto::domain::{
    AgentView, NodeView, RunEvent, RunState, RunSummary, RunView, StepState, StepView,
};
use mesh_proto::pb;
use mesh_proto::pb::goal_service_server::GoalService;
use mesh_proto::pb::registry_service_server::RegistryService;
use mesh_proto::pb::workflow_service_server::WorkflowService;
use serde::Deserialize;
use tonic::Code;

use crate::auth::Need;
use crate::grpc::{Caller, GoalApi, Guard, RegistryApi, WorkflowApi};

const TOKEN_COOKIE: &str = "mesh_token";
const CSS: &str = include_str!("dashboard/style.css");
const RUN_JS: &str = include_str!("dashboard/run.js");
const OVERVIEW_JS: &str = include_str!("dashboard/overview.js");

/// What the dashboard's handlers share.
#[derive(Clone)]
pub struct Dashboard {
    pub guard: Guard,
    pub goals: Arc<GoalApi>,
    pub workflows: Arc<WorkflowApi>,
    pub registry: Arc<RegistryApi>,
}

pub fn routes(dashboard: Dashboard) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui") }))
        .route("/ui", get(overview))
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/runs", get(runs))
        .route("/ui/runs/{id}", get(run_page))
        .route("/ui/runs/{id}/events", get(run_events))
        .route("/ui/runs/{id}/{action}", post(run_action))
        .route("/ui/workflows", get(workflows))
        .route("/ui/workflows/{name}", get(workflow_page))
        .with_state(dashboard)
}

/// Who is looking, in which namespace, and what they may do there.
struct Who {
    caller: Caller,
    ns: String,
    can_write: bool,
    signed_in: bool,
    peer: String,
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
        .filter(|v| !v.is_empty())
}

/// `path` with the namespace kept, when it is not the default one.
fn at(path: &str, ns: &str) -> String {
    if ns == crate::auth::DEFAULT_NAMESPACE {
        path.to_owned()
    } else {
        let sep = if path.contains('?') { '&' } else { '?' };
        format!("{path}{sep}ns={ns}")
    }
}

fn status_page(status: &tonic::Status, ns: &str) -> Response {
    let code = match status.code() {
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable | Code::DeadlineExceeded => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let body = html! {
        h1 { "Not done" }
        p.error { (status.message()) }
        p { a href=(at("/ui", ns)) { "Back to the overview" } }
    };
    (code, layout("Error", ns, false, body)).into_response()
}

impl Dashboard {
    /// The caller of a page or action standing for the RPC `path`, or the answer refusing it.
    async fn who(
        &self,
        headers: &HeaderMap,
        ns: Option<&str>,
        path: &str,
        peer: SocketAddr,
    ) -> Result<Who, Response> {
        let token = cookie(headers, TOKEN_COOKIE);
        let ns = ns
            .filter(|n| !n.is_empty())
            .unwrap_or(crate::auth::DEFAULT_NAMESPACE)
            .to_owned();
        let authorization = token.as_ref().map(|t| format!("Bearer {t}"));
        let peer = peer.to_string();
        match self
            .guard
            .decide(path, authorization.as_deref(), Some(&ns), &peer, None)
        {
            Ok((caller, _)) => Ok(Who {
                can_write: caller.principal.may(&ns, Need::Write),
                signed_in: self.guard.enabled() && token.is_some(),
                caller,
                ns,
                peer,
            }),
            Err(refusal) => {
                let (status, row) = refusal.into_parts();
                if let Some(row) = row {
                    self.guard.audit(row).await;
                }
                Err(match status.code() {
                    Code::Unauthenticated => Redirect::to("/ui/login").into_response(),
                    _ => status_page(&status, &ns),
                })
            }
        }
    }
}

fn request<T>(who: &Who, message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.extensions_mut().insert(who.caller.clone());
    r
}

fn layout(title: &str, ns: &str, signed_in: bool, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · agentmesh" }
                style { (PreEscaped(CSS)) }
            }
            body {
                header {
                    a.brand href=(at("/ui", ns)) { "agentmesh" }
                    nav {
                        a href=(at("/ui", ns)) { "Overview" }
                        a href=(at("/ui/runs", ns)) { "Runs" }
                        a href=(at("/ui/workflows", ns)) { "Workflows" }
                    }
                    form.ns method="get" action="/ui" {
                        label { "namespace " input name="ns" value=(ns) size="12"; }
                    }
                    @if signed_in {
                        form method="post" action="/ui/logout" { button.link { "Log out" } }
                    }
                }
                main { (body) }
            }
        }
    }
}

fn ago(ms: i64) -> String {
    let now = crate::store::now_ms();
    let d = (now - ms).max(0);
    match d {
        d if d < 1_000 => "just now".to_owned(),
        d if d < 60_000 => format!("{} s ago", d / 1_000),
        d if d < 3_600_000 => format!("{} min ago", d / 60_000),
        d => format!("{} h ago", d / 3_600_000),
    }
}

fn duration(ms: i64) -> String {
    match ms {
        ms if ms < 1_000 => format!("{ms} ms"),
        ms if ms < 60_000 => format!("{:.1} s", ms as f64 / 1_000.0),
        ms => format!("{:.1} min", ms as f64 / 60_000.0),
    }
}

/// A timeline segment's position, at least visible and never past the bar's end.
fn segment(from: f64, to: f64) -> String {
    let width = (to - from).max(0.8);
    let left = from.min(100.0 - width).max(0.0);
    format!("left:{left:.2}%;width:{width:.2}%")
}

fn badge(state: &str) -> Markup {
    html! { span class={ "badge " (state) } { (state.replace('_', " ")) } }
}

#[derive(Deserialize, Default)]
struct NsQuery {
    ns: Option<String>,
    fragment: Option<u8>,
}

async fn overview(
    State(d): State<Dashboard>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<NsQuery>,
) -> Result<Response, Response> {
    let who = d
        .who(
            &headers,
            q.ns.as_deref(),
            "/mesh.v1.RegistryService/ListNodes",
            peer,
        )
        .await?;
    let nodes: Vec<NodeView> = d
        .registry
        .list_nodes(request(&who, pb::ListNodesRequest {}))
        .await
        .map(|r| r.into_inner().nodes.into_iter().map(Into::into).collect())
        .map_err(|s| status_page(&s, &who.ns))?;
    let agents: Vec<AgentView> = d
        .registry
        .list_agents(request(&who, pb::ListAgentsRequest::default()))
        .await
        .map(|r| r.into_inner().agents.into_iter().map(Into::into).collect())
        .map_err(|s| status_page(&s, &who.ns))?;
    let mut counts = Vec::new();
    for state in [
        RunState::Running,
        RunState::Succeeded,
        RunState::Failed,
        RunState::Cancelled,
    ] {
        let page = list_runs(&d, &who, Some(state), 1000, "").await;
        let (n, more) = page
            .map(|(runs, next)| (runs.len(), next.is_some()))
            .unwrap_or((0, false));
        counts.push((state, if more { format!("{n}+") } else { n.to_string() }));
    }
    let failures = list_runs(&d, &who, Some(RunState::Failed), 10, "")
        .await
        .map(|(r, _)| r)
        .unwrap_or_default();
    let ns = who.ns.clone();
    let live = html! {
            h1 { "Overview" }
            section {
                h2 { "Nodes" }
                div.scroll { table #nodes {
                    thead { tr { th { "node" } th { "health" } th { "heartbeat" } th { "agents" } th { "in flight" } } }
                    tbody {
                        @for n in &nodes {
                            tr.node data-health=(n.health.as_str()) {
                                td { (n.node_id.as_str()) }
                                td { (badge(n.health.as_str())) }
                                td { (n.heartbeat_age_ms) " ms ago" }
                                td { (n.agents) }
                                td { (n.in_flight) }
                            }
                        }
                        @if nodes.is_empty() { tr { td colspan="5" { "No node is connected." } } }
                    }
                } }
            }
            section {
                h2 { "Agents" }
                div.scroll { table #agents {
                    thead { tr { th { "agent" } th { "node" } th { "skills" } th { "health" } th { "load" } th { "circuit" } } }
                    tbody {
                        @for a in &agents {
                            tr {
                                td { (a.name) }
                                td { (a.node_id.as_str()) }
                                td { (a.skills.join(", ")) }
                                td { (badge(a.health.as_str())) }
                                td { (a.in_flight) " / " (a.max_concurrency) }
                                td { (badge(&a.circuit)) }
                            }
                        }
                    }
                } }
            }
            section {
                h2 { "Runs" }
                div.counts {
                    @for (state, n) in &counts {
                        a.count href=(at(&format!("/ui/runs?state={}", state.as_str()), &ns)) {
                            span.n { (n) } " " (badge(state.as_str()))
                        }
                    }
                }
            }
            section {
                h2 { "Recent failures" }
                @if failures.is_empty() { p.muted { "None." } } @else {
                    (runs_table(&failures, &ns))
                }
            }
    };
    if q.fragment == Some(1) {
        return Ok(live.into_response());
    }
    let body = html! {
        div #live { (live) }
        script { (PreEscaped(OVERVIEW_JS)) }
    };
    Ok(layout("Overview", &ns, who.signed_in, body).into_response())
}

async fn list_runs(
    d: &Dashboard,
    who: &Who,
    state: Option<RunState>,
    size: u32,
    token: &str,
) -> Result<(Vec<RunSummary>, Option<String>), tonic::Status> {
    let r = d
        .goals
        .list_runs(request(
            who,
            pb::ListRunsRequest {
                state: state.map_or(0, |s| pb::RunState::from(s) as i32),
                page_size: size,
                page_token: token.to_owned(),
            },
        ))
        .await?
        .into_inner();
    let next = (!r.next_page_token.is_empty()).then_some(r.next_page_token);
    Ok((r.runs.into_iter().map(Into::into).collect(), next))
}

fn runs_table(runs: &[RunSummary], ns: &str) -> Markup {
    html! {
        div.scroll { table.runs {
            thead { tr { th { "run" } th { "objective" } th { "state" } th { "created" } th { "updated" } } }
            tbody {
                @for r in runs {
                    tr {
                        td.mono { a href=(at(&format!("/ui/runs/{}", r.run_id), ns)) { (r.run_id.as_str()) } }
                        td { (r.objective.chars().take(80).collect::<String>()) }
                        td { (badge(r.state.as_str())) }
                        td { (ago(r.created_at_ms)) }
                        td { (ago(r.updated_at_ms)) }
                    }
                }
            }
        } }
    }
}

#[derive(Deserialize, Default)]
struct RunsQuery {
    ns: Option<String>,
    state: Option<String>,
    q: Option<String>,
    page_token: Option<String>,
}

async fn runs(
    State(d): State<Dashboard>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<RunsQuery>,
) -> Result<Response, Response> {
    let who = d
        .who(
            &headers,
            q.ns.as_deref(),
            "/mesh.v1.GoalService/ListRuns",
            peer,
        )
        .await?;
    if let Some(id) = q.q.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        return Ok(Redirect::to(&at(&format!("/ui/runs/{id}"), &who.ns)).into_response());
    }
    let state = q.state.as_deref().and_then(RunState::parse);
    let token = q.page_token.clone().unwrap_or_default();
    let (runs, next) = match list_runs(&d, &who, state, 50, &token).await {
        Ok(p) => p,
        Err(s) => return Err(status_page(&s, &who.ns)),
    };
    let ns = who.ns.clone();
    let chosen = state.map(RunState::as_str).unwrap_or("");
    let body = html! {
        h1 { "Runs" }
        form.filters method="get" action="/ui/runs" {
            input type="hidden" name="ns" value=(ns);
            label { "state " select name="state" {
                option value="" selected[chosen.is_empty()] { "any" }
                @for s in ["running", "succeeded", "failed", "cancelled"] {
                    option value=(s) selected[chosen == s] { (s) }
                }
            } }
            label { "run id " input name="q" placeholder="run-…" size="24"; }
            button { "Show" }
        }
        @if runs.is_empty() { p.muted { "No run." } } @else { (runs_table(&runs, &ns)) }
        @if let Some(next) = &next {
            p { a.next href=(at(&format!("/ui/runs?state={chosen}&page_token={next}"), &ns)) { "Older runs →" } }
        }
    };
    Ok(layout("Runs", &ns, who.signed_in, body).into_response())
}

async fn run_page(
    State(d): State<Dashboard>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<NsQuery>,
) -> Result<Response, Response> {
    let who = d
        .who(
            &headers,
            q.ns.as_deref(),
            "/mesh.v1.GoalService/GetRun",
            peer,
        )
        .await?;
    let view: RunView = d
        .goals
        .get_run(request(&who, pb::GetRunRequest { run_id: id.clone() }))
        .await
        .map(|r| r.into_inner().into())
        .map_err(|s| status_page(&s, &who.ns))?;
    let trace = d
        .goals
        .get_run_trace(request(&who, pb::GetRunTraceRequest { run_id: id.clone() }))
        .await
        .map(|r| r.into_inner())
        .ok();
    let inner = run_markup(&view, trace.as_ref(), &who);
    if q.fragment == Some(1) {
        return Ok(inner.into_response());
    }
    let events = at(&format!("/ui/runs/{id}/events"), &who.ns);
    let body = html! {
        div #run data-events=(events) data-state=(view.state.as_str()) { (inner) }
        script { (PreEscaped(RUN_JS)) }
    };
    Ok(layout(&format!("Run {id}"), &who.ns, who.signed_in, body).into_response())
}

fn action_form(view: &RunView, ns: &str, action: &str, fields: Markup, label: &str) -> Markup {
    html! {
        form.action method="post" action=(at(&format!("/ui/runs/{}/{action}", view.run_id), ns)) {
            (fields)
            button class={ "btn " (action) } { (label) }
        }
    }
}

fn run_markup(view: &RunView, trace: Option<&pb::RunTrace>, who: &Who) -> Markup {
    let ns = who.ns.as_str();
    let took = (view.updated_at_ms - view.created_at_ms).max(0);
    let traced: BTreeMap<&str, &pb::StepTrace> = trace
        .map(|t| t.steps.iter().map(|s| (s.step_id.as_str(), s)).collect())
        .unwrap_or_default();
    let (start, end) = trace
        .map(|t| {
            let end = if t.finished_at_ms > 0 {
                t.finished_at_ms
            } else {
                crate::store::now_ms()
            };
            (t.created_at_ms, end.max(t.created_at_ms + 1))
        })
        .unwrap_or((0, 1));
    let pct = |at: i64| ((at - start).max(0) as f64 * 100.0 / (end - start) as f64).min(100.0);
    html! {
        div.runhead {
            h1 { @if view.objective.is_empty() { "Run" } @else { (view.objective) } }
            p.meta {
                span #run-state { (badge(view.state.as_str())) }
                " " span.mono { (view.run_id.as_str()) }
                " · created " (ago(view.created_at_ms))
                @if view.state.is_terminal() { " · took " (duration(took)) }
                @if view.usage.calls > 0 {
                    " · " (view.usage.input_tokens + view.usage.output_tokens) " tokens, $"
                    (format!("{:.6}", view.usage.cost_usd))
                }
            }
            @if let Some(e) = &view.error { p.error #run-error { (e) } }
            @if who.can_write && view.state == RunState::Running {
                (action_form(view, ns, "cancel", html! {}, "Cancel run"))
            }
        }
        h2 { "Steps" }
        div.scroll { table #steps {
            thead { tr { th { "step" } th { "state" } th { "attempt" } th { "agent" } th.wide { "timeline" } } }
            tbody {
                @for s in &view.steps {
                    (step_row(view, s, traced.get(s.id.as_str()).copied(), who, &pct))
                }
            }
        } }
        @if let Some(out) = &view.output {
            h2 { "Output" }
            pre #run-output { (serde_json::to_string_pretty(out).unwrap_or_default()) }
        }
        @if let Some(t) = trace && !t.critical_path.is_empty() {
            p.muted { "Critical path: " (t.critical_path.join(" → ")) }
        }
    }
}

fn step_row(
    view: &RunView,
    s: &StepView,
    trace: Option<&pb::StepTrace>,
    who: &Who,
    pct: &dyn Fn(i64) -> f64,
) -> Markup {
    let ns = who.ns.as_str();
    let step = s.id.as_str();
    let hidden = html! { input type="hidden" name="step" value=(step); };
    html! {
        tr.step data-step=(step) data-state=(s.state.as_str()) {
            td { (step) div.muted { (s.uses) } }
            td { (badge(s.state.as_str())) }
            td { (s.attempt) }
            td { @if let Some(a) = &s.agent { (a.agent) "@" (a.node.as_str()) } }
            td.wide {
                @if let Some(t) = trace {
                    div.bar {
                        @if t.attempts.is_empty() && t.started_at_ms > 0 {
                            @let from = pct(t.started_at_ms);
                            @let to = if t.finished_at_ms > 0 { pct(t.finished_at_ms) } else { 100.0 };
                            span class={ "seg " @if t.finished_at_ms > 0 { "succeeded" } @else { "waiting" } }
                                style=(segment(from, to))
                                title="waiting for a person or a signal" {}
                        }
                        @for a in &t.attempts {
                            @let from = pct(a.queued_at_ms);
                            @let to = if a.finished_at_ms > 0 { pct(a.finished_at_ms) } else { 100.0 };
                            span class={ "seg " (a.outcome) }
                                style=(segment(from, to))
                                title=(format!("attempt {} {} {}", a.attempt, a.outcome, a.node)) {}
                        }
                    }
                }
            }
        }
        tr.detail data-step=(step) {
            td colspan="5" {
                @if let Some(d) = &s.detail { p.muted { (d) } }
                @if let Some(t) = trace && (t.attempts.len() > 1 || t.attempts.iter().any(|a| a.outcome == "failed")) {
                    ul.attempts {
                        @for a in &t.attempts {
                            li {
                                "attempt " (a.attempt)
                                @if t.attempts.iter().any(|x| x.index > 0) { " of item " (a.index) }
                                " " (badge(&a.outcome))
                                @if !a.node.is_empty() { " on " (a.agent) "@" (a.node) }
                                @if a.finished_at_ms > 0 { " · " (duration(a.finished_at_ms - a.queued_at_ms)) }
                                @if !a.error.is_empty() { " · " span.error { (a.error_code) ": " (a.error) } }
                            }
                        }
                    }
                }
                @if let Some(e) = &s.error { p.error { (e) } }
                @if s.state == StepState::Running {
                    pre.delta id=(format!("delta-{step}")) {}
                }
                @if let Some(out) = &s.output {
                    details.output open[view.steps.len() == 1] {
                        summary { "output" }
                        pre { (serde_json::to_string_pretty(out).unwrap_or_default()) }
                    }
                }
                @if who.can_write {
                    div.actions {
                        @if s.state == StepState::AwaitingApproval {
                            (action_form(view, ns, "approve", html! { (hidden) input name="comment" placeholder="comment"; }, "Approve"))
                            (action_form(view, ns, "reject", html! { (hidden) input name="comment" placeholder="comment"; }, "Reject"))
                        }
                        @if s.state == StepState::Waiting {
                            (action_form(view, ns, "signal", html! {
                                input name="name" placeholder="signal name" required;
                                input name="payload" placeholder="payload (JSON)";
                            }, "Send signal"))
                        }
                        @if s.state == StepState::Parked || (view.state == RunState::Failed && s.state == StepState::Failed) {
                            (action_form(view, ns, "retry", hidden.clone(), "Retry from here"))
                        }
                        @if s.state == StepState::Parked {
                            (action_form(view, ns, "skip", html! { (hidden) input name="comment" placeholder="comment"; }, "Skip"))
                        }
                    }
                }
            }
        }
    }
}

/// The run's events as server-sent events: `change` when the page should fetch the run
/// again, `delta` with a step's streamed text, `end` when the run finished.
async fn run_events(
    State(d): State<Dashboard>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<NsQuery>,
) -> Result<Response, Response> {
    let who = d
        .who(
            &headers,
            q.ns.as_deref(),
            "/mesh.v1.GoalService/WatchRun",
            peer,
        )
        .await?;
    let stream = d
        .goals
        .watch_run(request(&who, pb::WatchRunRequest { run_id: id }))
        .await
        .map(|r| r.into_inner())
        .map_err(|s| status_page(&s, &who.ns))?;
    Ok(Sse::new(sse_events(stream))
        .keep_alive(KeepAlive::default())
        .into_response())
}

fn sse_events(
    stream: impl Stream<Item = Result<pb::RunEvent, tonic::Status>> + Send + 'static,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    stream
        .map(|item| {
            let Ok(event) = item
                .map_err(|_| ())
                .and_then(|e| RunEvent::try_from(e).map_err(|_| ()))
            else {
                return Event::default().event("end").data("error");
            };
            match event {
                RunEvent::Delta {
                    step,
                    text,
                    restart,
                    ..
                } => Event::default().event("delta").data(
                    serde_json::json!({ "step": step.as_str(), "text": text, "restart": restart })
                        .to_string(),
                ),
                RunEvent::Finished { state, .. } => {
                    Event::default().event("end").data(state.as_str())
                }
                // Data that is not empty: a browser drops an event whose data is.
                RunEvent::Snapshot(view) => {
                    Event::default().event("change").data(view.state.as_str())
                }
                RunEvent::Step(step) => Event::default().event("change").data(format!(
                    "{} {}",
                    step.id,
                    step.state.as_str()
                )),
                RunEvent::Progress { step, .. } => Event::default()
                    .event("change")
                    .data(format!("{step} progress")),
            }
        })
        .map(Ok)
}

#[derive(Deserialize, Default)]
struct ActionForm {
    step: Option<String>,
    comment: Option<String>,
    name: Option<String>,
    payload: Option<String>,
}

async fn run_action(
    State(d): State<Dashboard>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    Query(q): Query<NsQuery>,
    Form(form): Form<ActionForm>,
) -> Result<Response, Response> {
    let path = match action.as_str() {
        "cancel" => "/mesh.v1.GoalService/CancelRun",
        "approve" => "/mesh.v1.GoalService/Approve",
        "reject" => "/mesh.v1.GoalService/Reject",
        "retry" => "/mesh.v1.GoalService/RetryRun",
        "skip" => "/mesh.v1.GoalService/SkipStep",
        "signal" => "/mesh.v1.GoalService/Signal",
        _ => return Err((StatusCode::NOT_FOUND, "no such action\n").into_response()),
    };
    let who = d.who(&headers, q.ns.as_deref(), path, peer).await?;
    let step = form.step.unwrap_or_default();
    let comment = form.comment.unwrap_or_default();
    let run_id = id.clone();
    let done = match action.as_str() {
        "cancel" => d
            .goals
            .cancel_run(request(
                &who,
                pb::CancelRunRequest {
                    run_id,
                    reason: "cancelled from the dashboard".into(),
                },
            ))
            .await
            .map(drop),
        "approve" | "reject" => {
            let r = request(
                &who,
                pb::DecideRequest {
                    run_id,
                    step_id: step,
                    comment,
                    by: String::new(),
                },
            );
            if action == "approve" {
                d.goals.approve(r).await.map(drop)
            } else {
                d.goals.reject(r).await.map(drop)
            }
        }
        "retry" => d
            .goals
            .retry_run(request(
                &who,
                pb::RetryRunRequest {
                    run_id,
                    from_step: step,
                },
            ))
            .await
            .map(drop),
        "skip" => d
            .goals
            .skip_step(request(
                &who,
                pb::SkipStepRequest {
                    run_id,
                    step_id: step,
                    comment,
                },
            ))
            .await
            .map(drop),
        _ => d
            .goals
            .signal(request(
                &who,
                pb::SignalRequest {
                    run_id,
                    name: form.name.unwrap_or_default(),
                    payload_json: form.payload.unwrap_or_default(),
                },
            ))
            .await
            .map(drop),
    };
    let reason = match &done {
        Ok(()) => String::new(),
        Err(s) => format!("answered {:?}: {}", s.code(), s.message()),
    };
    d.guard
        .audit_allowed(&who.caller, path, &who.peer, reason)
        .await;
    match done {
        Ok(()) => Ok(Redirect::to(&at(&format!("/ui/runs/{id}"), &who.ns)).into_response()),
        Err(s) => Err(status_page(&s, &who.ns)),
    }
}

#[derive(Deserialize, Default)]
struct WorkflowQuery {
    ns: Option<String>,
    version: Option<u32>,
}

async fn workflows(
    State(d): State<Dashboard>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<NsQuery>,
) -> Result<Response, Response> {
    let who = d
        .who(
            &headers,
            q.ns.as_deref(),
            "/mesh.v1.WorkflowService/List",
            peer,
        )
        .await?;
    let list = d
        .workflows
        .list(request(
            &who,
            pb::ListWorkflowsRequest {
                page_size: 200,
                ..Default::default()
            },
        ))
        .await
        .map(|r| r.into_inner().workflows)
        .map_err(|s| status_page(&s, &who.ns))?;
    let ns = who.ns.clone();
    let body = html! {
        h1 { "Workflows" }
        @if list.is_empty() { p.muted { "No registered workflow." } } @else {
            div.scroll { table #workflows {
                thead { tr { th { "name" } th { "version" } th { "steps" } th { "description" } } }
                tbody { @for w in &list {
                    tr {
                        td { a href=(at(&format!("/ui/workflows/{}?version={}", w.name, w.version), &ns)) { (w.name) } }
                        td { (w.version) } td { (w.steps) } td { (w.description) }
                    }
                } }
            } }
        }
    };
    Ok(layout("Workflows", &ns, who.signed_in, body).into_response())
}

async fn workflow_page(
    State(d): State<Dashboard>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(q): Query<WorkflowQuery>,
) -> Result<Response, Response> {
    let who = d
        .who(
            &headers,
            q.ns.as_deref(),
            "/mesh.v1.WorkflowService/Get",
            peer,
        )
        .await?;
    let w = d
        .workflows
        .get(request(
            &who,
            pb::GetWorkflowRequest {
                name: name.clone(),
                version: q.version.unwrap_or(0),
            },
        ))
        .await
        .map(|r| r.into_inner())
        .map_err(|s| status_page(&s, &who.ns))?;
    let versions = d
        .workflows
        .list(request(
            &who,
            pb::ListWorkflowsRequest {
                name: name.clone(),
                page_size: 100,
                ..Default::default()
            },
        ))
        .await
        .map(|r| r.into_inner().workflows)
        .unwrap_or_default();
    let profile = d
        .workflows
        .profile(request(
            &who,
            pb::ProfileWorkflowRequest {
                name: name.clone(),
                version: w.version,
                runs: 100,
            },
        ))
        .await
        .map(|r| r.into_inner())
        .ok();
    let ns = who.ns.clone();
    let body = html! {
        h1 { (w.name) "@" (w.version) }
        @if !w.description.is_empty() { p { (w.description) } }
        p { "Versions: "
            @for v in &versions {
                a.version href=(at(&format!("/ui/workflows/{}?version={}", v.name, v.version), &ns)) { (v.version) } " "
            }
        }
        h2 { "Profile" }
        @if let Some(p) = &profile {
            p.muted { "Over its last " (p.runs) " finished runs." }
            div.scroll { table #profile {
                thead { tr { th { "step" } th { "runs" } th { "p50" } th { "p95" } th { "failed" } th { "cost share" } } }
                tbody { @for s in &p.steps {
                    tr {
                        td { (s.step_id) } td { (s.runs) }
                        td { (duration(s.p50_ms)) } td { (duration(s.p95_ms)) }
                        td { (format!("{:.1}%", s.failure_rate * 100.0)) }
                        td { (format!("{:.1}%", s.cost_share * 100.0)) }
                    }
                } }
            } }
        } @else { p.muted { "No finished run yet." } }
        h2 { "Definition" }
        pre #definition { (w.definition) }
    };
    Ok(layout(&w.name, &ns, who.signed_in, body).into_response())
}

async fn login_page() -> Response {
    login_form(None).into_response()
}

fn login_form(error: Option<&str>) -> Markup {
    layout(
        "Log in",
        crate::auth::DEFAULT_NAMESPACE,
        false,
        html! {
            h1 { "Log in" }
            p { "Paste an API token (" code { "mesh token create" } ") or a JWT of your identity provider." }
            @if let Some(e) = error { p.error { (e) } }
            form.login method="post" action="/ui/login" {
                label { "token " input type="password" name="token" autocomplete="off" required; }
                label { "namespace " input name="ns" value="default"; }
                button { "Log in" }
            }
        },
    )
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
    ns: Option<String>,
}

async fn login(
    State(d): State<Dashboard>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Form(form): Form<LoginForm>,
) -> Response {
    let token = form.token.trim();
    let ns = form
        .ns
        .as_deref()
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .unwrap_or(crate::auth::DEFAULT_NAMESPACE)
        .to_owned();
    let printable = !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic());
    // A token that reads the namespace's runs may look at the dashboard.
    let decided = printable.then(|| {
        d.guard.decide(
            "/mesh.v1.GoalService/ListRuns",
            Some(&format!("Bearer {token}")),
            Some(&ns),
            &peer.to_string(),
            None,
        )
    });
    match decided {
        Some(Ok(_)) => {
            let mut r = Redirect::to(&at("/ui", &ns)).into_response();
            let cookie = format!("{TOKEN_COOKIE}={token}; Path=/ui; HttpOnly; SameSite=Strict");
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        Some(Err(refusal)) => {
            let (status, row) = refusal.into_parts();
            if let Some(row) = row {
                d.guard.audit(row).await;
            }
            (StatusCode::UNAUTHORIZED, login_form(Some(status.message()))).into_response()
        }
        None => (
            StatusCode::UNAUTHORIZED,
            login_form(Some("the token is not printable ASCII")),
        )
            .into_response(),
    }
}

async fn logout() -> Response {
    let mut r = Redirect::to("/ui/login").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("mesh_token=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    r
}

#[cfg(test)]
mod tests {
    use mesh_proto::domain::Health;

    use super::*;

    #[test]
    fn cookies_are_read_and_links_keep_the_namespace() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; mesh_token=mesh_x; b=2"),
        );
        assert_eq!(cookie(&h, TOKEN_COOKIE).as_deref(), Some("mesh_x"));
        assert_eq!(cookie(&h, "c"), None);
        assert_eq!(at("/ui/runs", "default"), "/ui/runs");
        assert_eq!(at("/ui/runs", "team-a"), "/ui/runs?ns=team-a");
        assert_eq!(
            at("/ui/runs?state=failed", "team-a"),
            "/ui/runs?state=failed&ns=team-a"
        );
    }

    #[test]
    fn what_a_page_shows_is_escaped() {
        let page = layout(
            "<x>",
            "default",
            false,
            html! { p { "<script>alert(1)</script>" } },
        );
        let text = page.into_string();
        assert!(!text.contains("<script>alert(1)"), "{text}");
        assert!(text.contains("&lt;script&gt;"), "{text}");
    }

    #[test]
    fn health_and_states_render_as_badges() {
        assert!(
            badge(Health::Healthy.as_str())
                .into_string()
                .contains("badge healthy")
        );
        assert!(
            badge("awaiting_approval")
                .into_string()
                .contains("awaiting approval")
        );
    }
}
