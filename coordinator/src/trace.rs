//! Execution traces, read from a run's journal and the time each entry was written: per step
//! and per attempt, when it was queued, when its agent started and finished it, where it ran,
//! how it ended and what it cost; the run's critical path; and the profile of a workflow over
//! its recent runs. Plain functions of stored data: tests call them without a runtime.

use std::collections::{BTreeMap, HashMap};

use mesh_proto::domain::{ModelUsage, RunState, StepId};
use mesh_proto::pb;
use mesh_workflow::WorkflowDef;

use crate::journal::JournalEvent;

/// One journal entry and when it was written (Unix ms).
pub type Timed<'a> = (i64, &'a JournalEvent);

fn add_usage(tokens: &mut (u64, u64, f64), usage: &[ModelUsage]) {
    for u in usage {
        tokens.0 += u.input_tokens;
        tokens.1 += u.output_tokens;
        tokens.2 += u.cost_usd.unwrap_or(0.0);
    }
}

fn state_name(state: RunState) -> String {
    format!("{state:?}").to_lowercase()
}

/// The trace of one run: `workflow` is the definition its goal carried, `events` its journal
/// with times, `finished_ms` when it ended (0 while it runs).
pub fn build(
    run_id: &str,
    state: RunState,
    workflow: &WorkflowDef,
    events: &[Timed<'_>],
) -> pb::RunTrace {
    let mut steps: Vec<pb::StepTrace> = Vec::new();
    let mut position: HashMap<String, usize> = HashMap::new();
    add_steps(&mut steps, &mut position, workflow);
    let mut trace = pb::RunTrace {
        run_id: run_id.to_owned(),
        state: state_name(state),
        workflow: match (&workflow.name, workflow.version) {
            (n, Some(v)) if !n.is_empty() => format!("{n}@{v}"),
            (n, _) => n.clone(),
        },
        ..Default::default()
    };
    let mut tokens: HashMap<String, (u64, u64, f64)> = HashMap::new();
    for (at, event) in events {
        let at = *at;
        let step_of = |steps: &mut Vec<pb::StepTrace>, id: &StepId| -> Option<usize> {
            let i = *position.get(id.as_str())?;
            let s = &mut steps[i];
            if s.started_at_ms == 0 {
                s.started_at_ms = at;
            }
            Some(i)
        };
        match event {
            JournalEvent::RunCreated => trace.created_at_ms = at,
            JournalEvent::WorkflowPlanned { workflow, .. } => {
                // Its steps follow the planner's.
                let before = steps.len();
                add_steps(&mut steps, &mut position, workflow);
                let _ = before;
            }
            JournalEvent::StepStarted {
                step,
                index,
                attempt,
                ..
            } => {
                let Some(i) = step_of(&mut steps, step) else {
                    continue;
                };
                let s = &mut steps[i];
                s.state = "running".into();
                // An attempt of this task still open was superseded (its node went away).
                for a in s.attempts.iter_mut() {
                    if a.index == *index && a.outcome == "running" {
                        a.outcome = "superseded".into();
                        a.finished_at_ms = at;
                    }
                }
                s.attempts.push(pb::AttemptTrace {
                    index: *index,
                    attempt: *attempt,
                    queued_at_ms: at,
                    outcome: "running".into(),
                    ..Default::default()
                });
            }
            JournalEvent::StepAssigned {
                step,
                index,
                attempt,
                agent,
            } => {
                if let Some(a) = attempt_of(&mut steps, &position, step, *index, *attempt) {
                    a.node = agent.node.to_string();
                    a.agent = agent.agent.clone();
                }
            }
            JournalEvent::TaskSucceeded {
                step,
                index,
                attempt,
                agent,
                elapsed_ms,
                ..
            } => {
                if let Some(a) = attempt_of(&mut steps, &position, step, *index, *attempt) {
                    finish(a, at, "succeeded", agent.as_ref(), *elapsed_ms);
                }
            }
            JournalEvent::TaskFailed {
                step,
                index,
                attempt,
                error,
                agent,
                elapsed_ms,
            } => {
                if let Some(a) = attempt_of(&mut steps, &position, step, *index, *attempt) {
                    finish(a, at, "failed", agent.as_ref(), *elapsed_ms);
                    a.error = error.message.clone();
                    a.error_code = error.code.clone();
                    a.retryable = error.retryable;
                }
            }
            JournalEvent::UsageRecorded {
                step,
                index,
                attempt,
                usage,
            } => {
                let key = format!("{step}/{index}/{attempt}");
                add_usage(tokens.entry(key).or_default(), usage);
            }
            JournalEvent::StepWaiting { step, .. } => {
                if let Some(i) = step_of(&mut steps, step) {
                    steps[i].state = "waiting".into();
                    steps[i].waiting_since_ms = at;
                }
            }
            JournalEvent::SkillCalled {
                step,
                index,
                attempt,
                call_id,
                skill,
                input,
            } => {
                if let Some(a) = attempt_of(&mut steps, &position, step, *index, *attempt) {
                    match a.calls.iter_mut().find(|c| c.call_id == *call_id) {
                        // Approved a moment ago.
                        Some(c) => c.kind = "skill".into(),
                        None => a.calls.push(pb::ToolCallTrace {
                            call_id: call_id.clone(),
                            tool: skill.clone(),
                            kind: "skill".into(),
                            arguments_json: input.to_string(),
                            outcome: "running".into(),
                            started_at_ms: at,
                            ..Default::default()
                        }),
                    }
                }
            }
            JournalEvent::SkillReturned {
                step,
                index,
                attempt,
                call_id,
                outcome,
                ..
            } => {
                if let Some(c) = call_of(&mut steps, &position, step, *index, *attempt, call_id) {
                    c.finished_at_ms = at;
                    (c.outcome, c.result) = match outcome {
                        Ok(v) => ("succeeded".into(), preview(&v.to_string())),
                        Err(e) => (
                            "failed".into(),
                            preview(&format!("{}: {}", e.code, e.message)),
                        ),
                    };
                }
            }
            JournalEvent::ToolApprovalAsked {
                step,
                index,
                attempt,
                call_id,
                tool,
                arguments,
            } => {
                if let Some(a) = attempt_of(&mut steps, &position, step, *index, *attempt) {
                    a.calls.push(pb::ToolCallTrace {
                        call_id: call_id.clone(),
                        tool: tool.clone(),
                        kind: "tool".into(),
                        arguments_json: arguments.to_string(),
                        outcome: "waiting".into(),
                        started_at_ms: at,
                        ..Default::default()
                    });
                }
            }
            JournalEvent::ToolApprovalDecided {
                step,
                index,
                attempt,
                call_id,
                approved,
                comment,
                by,
            } => {
                if let Some(c) = call_of(&mut steps, &position, step, *index, *attempt, call_id) {
                    c.waited_ms = at - c.started_at_ms;
                    let by = if by.is_empty() {
                        "a person"
                    } else {
                        by.as_str()
                    };
                    c.decision = match (approved, comment.is_empty()) {
                        (true, true) => format!("approved by {by}"),
                        (true, false) => format!("approved by {by}: {comment}"),
                        (false, true) => format!("rejected by {by}"),
                        (false, false) => format!("rejected by {by}: {comment}"),
                    };
                    if *approved {
                        c.outcome = "running".into();
                    } else {
                        c.outcome = "rejected".into();
                        c.finished_at_ms = at;
                    }
                }
            }
            JournalEvent::ToolUsed {
                step,
                index,
                attempt,
                call_id,
                tool,
                arguments,
                ok,
                result,
                elapsed_ms,
            } => {
                if let Some(a) = attempt_of(&mut steps, &position, step, *index, *attempt) {
                    // A call that waited for approval is in the trace already.
                    let c = match a.calls.iter().position(|c| c.call_id == *call_id) {
                        Some(k) => &mut a.calls[k],
                        None => {
                            a.calls.push(pb::ToolCallTrace {
                                call_id: call_id.clone(),
                                tool: tool.clone(),
                                kind: "tool".into(),
                                arguments_json: arguments.to_string(),
                                started_at_ms: at - *elapsed_ms as i64,
                                ..Default::default()
                            });
                            a.calls.last_mut().expect("just pushed")
                        }
                    };
                    c.finished_at_ms = at;
                    c.outcome = if *ok { "succeeded" } else { "failed" }.into();
                    c.result = preview(result);
                }
            }
            JournalEvent::SignalReceived { .. }
            | JournalEvent::StepExpanded { .. }
            | JournalEvent::MemorySaved { .. } => {}
            JournalEvent::StepSucceeded { step, .. } => {
                end(&mut steps, &position, step, at, "succeeded")
            }
            JournalEvent::StepFailed { step, .. } => end(&mut steps, &position, step, at, "failed"),
            JournalEvent::StepSkipped { step, .. } => {
                end(&mut steps, &position, step, at, "skipped")
            }
            JournalEvent::StepCancelled { step } => {
                end(&mut steps, &position, step, at, "cancelled")
            }
            JournalEvent::StepParked { step, .. } => end(&mut steps, &position, step, at, "parked"),
            JournalEvent::StepResumed { step } | JournalEvent::StepReset { step } => {
                if let Some(&i) = position.get(step.as_str()) {
                    steps[i].state = "pending".into();
                    steps[i].finished_at_ms = 0;
                }
            }
            JournalEvent::BudgetRaised { .. } | JournalEvent::RunResumed => {
                trace.finished_at_ms = 0;
            }
            JournalEvent::RunFinished { .. } => trace.finished_at_ms = at,
        }
    }
    for s in &mut steps {
        let mut total = (0u64, 0u64, 0f64);
        for a in &mut s.attempts {
            if let Some(t) = tokens.get(&format!("{}/{}/{}", s.step_id, a.index, a.attempt)) {
                a.input_tokens = t.0;
                a.output_tokens = t.1;
                a.cost_usd = t.2;
                total = (total.0 + t.0, total.1 + t.1, total.2 + t.2);
            }
        }
        (s.input_tokens, s.output_tokens, s.cost_usd) = total;
    }
    trace.critical_path = critical_path(&steps);
    for s in &mut steps {
        s.critical = trace.critical_path.contains(&s.step_id);
    }
    trace.steps = steps;
    trace
}

/// Steps of `def` not yet in `steps`, pending.
fn add_steps(
    steps: &mut Vec<pb::StepTrace>,
    position: &mut HashMap<String, usize>,
    def: &WorkflowDef,
) {
    for s in &def.steps {
        if position.contains_key(&s.id) {
            continue;
        }
        position.insert(s.id.clone(), steps.len());
        steps.push(pb::StepTrace {
            step_id: s.id.clone(),
            uses: s
                .uses
                .clone()
                .or_else(|| s.agent.clone().map(|a| format!("agent:{a}")))
                .or_else(|| s.workflow.clone().map(|w| format!("workflow:{w}")))
                .unwrap_or_default(),
            state: "pending".into(),
            needs: s.needs.clone(),
            ..Default::default()
        });
    }
}

/// How much of a call's result a trace carries.
const PREVIEW_BYTES: usize = 512;

fn preview(text: &str) -> String {
    mesh_proto::convert::truncated(text.to_owned(), PREVIEW_BYTES)
}

fn call_of<'a>(
    steps: &'a mut [pb::StepTrace],
    position: &HashMap<String, usize>,
    step: &StepId,
    index: u32,
    attempt: u32,
    call_id: &str,
) -> Option<&'a mut pb::ToolCallTrace> {
    attempt_of(steps, position, step, index, attempt)?
        .calls
        .iter_mut()
        .find(|c| c.call_id == call_id)
}

fn attempt_of<'a>(
    steps: &'a mut [pb::StepTrace],
    position: &HashMap<String, usize>,
    step: &StepId,
    index: u32,
    attempt: u32,
) -> Option<&'a mut pb::AttemptTrace> {
    let i = *position.get(step.as_str())?;
    steps[i]
        .attempts
        .iter_mut()
        .rev()
        .find(|a| a.index == index && a.attempt == attempt)
}

fn finish(
    a: &mut pb::AttemptTrace,
    at: i64,
    outcome: &str,
    agent: Option<&mesh_proto::domain::AgentKey>,
    elapsed_ms: u64,
) {
    a.outcome = outcome.into();
    a.finished_at_ms = at;
    if let Some(agent) = agent {
        a.node = agent.node.to_string();
        a.agent = agent.agent.clone();
    }
    // The agent's own measure of its work; what is left of the span was spent queued and
    // on the way.
    a.started_at_ms = if elapsed_ms > 0 {
        (at - elapsed_ms as i64).max(a.queued_at_ms)
    } else {
        a.queued_at_ms
    };
}

fn end(
    steps: &mut [pb::StepTrace],
    position: &HashMap<String, usize>,
    step: &StepId,
    at: i64,
    state: &str,
) {
    let Some(&i) = position.get(step.as_str()) else {
        return;
    };
    let s = &mut steps[i];
    s.state = state.into();
    s.finished_at_ms = at;
    if s.started_at_ms == 0 {
        s.started_at_ms = at;
    }
    if s.waiting_since_ms > 0 {
        s.waited_ms += at - s.waiting_since_ms;
        s.waiting_since_ms = 0;
    }
}

/// The chain of steps that decided when the run ended: from the step that finished last,
/// back through the dependency that finished last, to a step that needed none.
pub fn critical_path(steps: &[pb::StepTrace]) -> Vec<String> {
    let by_id: HashMap<&str, &pb::StepTrace> =
        steps.iter().map(|s| (s.step_id.as_str(), s)).collect();
    let Some(mut at) = steps
        .iter()
        .filter(|s| s.finished_at_ms > 0)
        .max_by_key(|s| s.finished_at_ms)
    else {
        return Vec::new();
    };
    let mut path = vec![at.step_id.clone()];
    while let Some(next) = at
        .needs
        .iter()
        .filter_map(|n| by_id.get(n.as_str()))
        .filter(|s| s.finished_at_ms > 0)
        .max_by_key(|s| s.finished_at_ms)
    {
        if path.contains(&next.step_id) {
            break;
        }
        path.push(next.step_id.clone());
        at = next;
    }
    path.reverse();
    path
}

/// A step's duration in a trace: from its first attempt queued (or its wait begun) to its
/// end; `None` until it ends.
pub fn duration_ms(s: &pb::StepTrace) -> Option<i64> {
    (s.finished_at_ms > 0 && s.started_at_ms > 0).then(|| s.finished_at_ms - s.started_at_ms)
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A workflow's profile over the traces of its recent runs: per step, how many runs reached
/// it, its p50 and p95 duration, the share of them that failed and its share of the cost.
pub fn profile(name: &str, traces: &[pb::RunTrace]) -> pb::WorkflowProfile {
    let mut order: Vec<String> = Vec::new();
    let mut seen: BTreeMap<String, (Vec<i64>, u32, u32, f64)> = BTreeMap::new();
    let mut cost = 0.0;
    for t in traces {
        for s in &t.steps {
            if !seen.contains_key(&s.step_id) {
                order.push(s.step_id.clone());
            }
            let e = seen.entry(s.step_id.clone()).or_default();
            match s.state.as_str() {
                "succeeded" | "failed" => {
                    e.1 += 1;
                    if s.state == "failed" {
                        e.2 += 1;
                    }
                    if let Some(d) = duration_ms(s) {
                        e.0.push(d);
                    }
                }
                _ => {}
            }
            e.3 += s.cost_usd;
            cost += s.cost_usd;
        }
    }
    let steps = order
        .into_iter()
        .map(|id| {
            let (mut durations, runs, failed, step_cost) = seen.remove(&id).unwrap_or_default();
            durations.sort_unstable();
            pb::StepProfile {
                step_id: id,
                runs,
                p50_ms: percentile(&durations, 50.0),
                p95_ms: percentile(&durations, 95.0),
                failure_rate: if runs == 0 {
                    0.0
                } else {
                    f64::from(failed) / f64::from(runs)
                },
                cost_usd: step_cost,
                cost_share: if cost > 0.0 { step_cost / cost } else { 0.0 },
            }
        })
        .collect();
    pb::WorkflowProfile {
        workflow: name.to_owned(),
        runs: traces.len() as u32,
        steps,
    }
}

/// The trace of a stored run, with its namespace (callers check it before answering).
pub async fn load(
    store: &crate::store::Store,
    run_id: &mesh_proto::domain::RunId,
) -> crate::error::Result<(mesh_proto::domain::Namespace, pb::RunTrace)> {
    use crate::store::Backend;
    let run = store.load_run(run_id).await?;
    let times = store.journal_times(run_id).await?;
    let events: Vec<Timed<'_>> = times.into_iter().zip(run.events.iter()).collect();
    let trace = build(&run_id.0, run.state, &run.goal.workflow, &events);
    Ok((run.goal.namespace, trace))
}

#[cfg(test)]
mod tests {
    use mesh_proto::domain::{AgentKey, ModelUsage, NodeId, TaskError};
    use serde_json::json;

    use super::*;

    fn agent(node: &str) -> Option<AgentKey> {
        Some(AgentKey {
            node: NodeId::from(node),
            agent: "echo".into(),
        })
    }

    /// `a`, then `b` (failed once, then ran on another node) and `c` beside it, both after `a`.
    fn run() -> (WorkflowDef, Vec<(i64, JournalEvent)>) {
        let def = mesh_workflow::validate::from_value(json!({
            "name": "review", "version": 2,
            "steps": [
                { "id": "a", "uses": "echo" },
                { "id": "b", "uses": "llm", "needs": ["a"] },
                { "id": "c", "uses": "echo", "needs": ["a"] },
            ]
        }))
        .unwrap();
        let started = |step: &str, attempt| JournalEvent::StepStarted {
            step: step.into(),
            index: 0,
            attempt,
            epoch: 1,
        };
        let ok = |step: &str, attempt, node: &str, elapsed_ms| JournalEvent::TaskSucceeded {
            step: step.into(),
            index: 0,
            attempt,
            output: json!({}),
            agent: agent(node),
            elapsed_ms,
        };
        let done = |step: &str| JournalEvent::StepSucceeded {
            step: step.into(),
            output: json!({}),
        };
        let events = vec![
            (1_000, JournalEvent::RunCreated),
            (1_000, started("a", 1)),
            (1_100, ok("a", 1, "n1", 80)),
            (1_100, done("a")),
            (1_100, started("b", 1)),
            (1_100, started("c", 1)),
            (
                1_200,
                JournalEvent::TaskFailed {
                    step: "b".into(),
                    index: 0,
                    attempt: 1,
                    error: TaskError::new("agent_error", "boom", true),
                    agent: agent("n1"),
                    elapsed_ms: 90,
                },
            ),
            (1_250, ok("c", 1, "n1", 0)),
            (1_250, done("c")),
            (1_300, started("b", 2)),
            (
                1_900,
                JournalEvent::UsageRecorded {
                    step: "b".into(),
                    index: 0,
                    attempt: 2,
                    usage: vec![ModelUsage {
                        provider: "openai".into(),
                        model: "m".into(),
                        calls: 1,
                        input_tokens: 10,
                        output_tokens: 20,
                        cost_usd: Some(0.5),
                    }],
                },
            ),
            (1_900, ok("b", 2, "n2", 500)),
            (1_900, done("b")),
            (
                1_900,
                JournalEvent::RunFinished {
                    state: RunState::Succeeded,
                    output: None,
                    error: None,
                },
            ),
        ];
        (def, events)
    }

    #[test]
    fn a_trace_has_every_attempt_with_its_times_place_outcome_and_cost() {
        let (def, events) = run();
        let timed: Vec<Timed<'_>> = events.iter().map(|(t, e)| (*t, e)).collect();
        let t = build("run-1", RunState::Succeeded, &def, &timed);
        assert_eq!(t.workflow, "review@2");
        assert_eq!((t.created_at_ms, t.finished_at_ms), (1_000, 1_900));
        let b = &t.steps[1];
        assert_eq!(b.attempts.len(), 2);
        let (first, second) = (&b.attempts[0], &b.attempts[1]);
        assert_eq!(first.outcome, "failed");
        assert_eq!(
            (first.error_code.as_str(), first.retryable),
            ("agent_error", true)
        );
        assert_eq!((first.queued_at_ms, first.started_at_ms), (1_100, 1_110));
        assert_eq!(second.node, "n2");
        // The agent worked 500 ms of the 600 ms since it was queued.
        assert_eq!(
            (
                second.queued_at_ms,
                second.started_at_ms,
                second.finished_at_ms
            ),
            (1_300, 1_400, 1_900)
        );
        assert_eq!((second.input_tokens, second.output_tokens), (10, 20));
        assert_eq!(
            (b.started_at_ms, b.finished_at_ms, b.cost_usd),
            (1_100, 1_900, 0.5)
        );
        // Without the agent's measure, the attempt starts when it was queued.
        assert_eq!(t.steps[2].attempts[0].started_at_ms, 1_100);
        assert_eq!(t.critical_path, ["a", "b"]);
        assert!(t.steps[0].critical && t.steps[1].critical && !t.steps[2].critical);
    }

    #[test]
    fn a_running_run_shows_its_open_attempt_and_a_lost_one_is_superseded() {
        let (def, events) = run();
        let mut cut: Vec<(i64, JournalEvent)> = events.into_iter().take(6).collect();
        cut.push((
            1_150,
            JournalEvent::StepStarted {
                step: "b".into(),
                index: 0,
                attempt: 2,
                epoch: 1,
            },
        ));
        let timed: Vec<Timed<'_>> = cut.iter().map(|(t, e)| (*t, e)).collect();
        let t = build("run-1", RunState::Running, &def, &timed);
        assert_eq!(t.finished_at_ms, 0);
        let b = &t.steps[1];
        assert_eq!(b.attempts[0].outcome, "superseded");
        assert_eq!(b.attempts[0].finished_at_ms, 1_150);
        assert_eq!(b.attempts[1].outcome, "running");
        assert_eq!(b.state, "running");
        assert_eq!(t.critical_path, ["a"]);
    }

    #[test]
    fn a_profile_gives_percentiles_failure_rates_and_cost_shares() {
        let (def, events) = run();
        let timed: Vec<Timed<'_>> = events.iter().map(|(t, e)| (*t, e)).collect();
        let one = build("run-1", RunState::Succeeded, &def, &timed);
        let mut slow = one.clone();
        slow.steps[2].finished_at_ms += 1_000;
        let mut failed = one.clone();
        failed.steps[2].state = "failed".into();
        let p = profile("review@2", &[one, slow, failed]);
        assert_eq!(p.runs, 3);
        let c = p.steps.iter().find(|s| s.step_id == "c").unwrap();
        assert_eq!(c.runs, 3);
        assert_eq!((c.p50_ms, c.p95_ms), (150, 1_150));
        assert!((c.failure_rate - 1.0 / 3.0).abs() < 1e-9);
        let b = p.steps.iter().find(|s| s.step_id == "b").unwrap();
        assert_eq!(b.cost_share, 1.0);
        assert_eq!(c.cost_share, 0.0);
    }
}
