//! `mesh run trace` and `mesh workflow profile`: where a run spent its time, drawn as a text
//! waterfall with its critical path and slowest steps marked, and a workflow's steps over its
//! recent runs.

use mesh_proto::pb;
use serde_json::{Value, json};

/// How many of the slowest steps are marked.
const SLOWEST: usize = 3;

fn ms(n: i64) -> String {
    match n {
        n if n < 1_000 => format!("{n} ms"),
        n if n < 60_000 => format!("{:.2} s", n as f64 / 1000.0),
        n => format!("{:.1} min", n as f64 / 60_000.0),
    }
}

fn step_ms(s: &pb::StepTrace) -> Option<i64> {
    (s.finished_at_ms > 0 && s.started_at_ms > 0).then(|| s.finished_at_ms - s.started_at_ms)
}

/// The run's trace as a waterfall `width` columns wide (the bars' part).
pub fn waterfall(t: &pb::RunTrace, now_ms: i64, width: usize) -> String {
    let width = width.max(10);
    let start = t.created_at_ms;
    let end = if t.finished_at_ms > 0 {
        t.finished_at_ms
    } else {
        now_ms.max(start + 1)
    };
    let span = (end - start).max(1);
    let col =
        |at: i64| (((at - start).clamp(0, span) as f64 / span as f64) * width as f64) as usize;
    let mut slow: Vec<(&str, i64)> = t
        .steps
        .iter()
        .filter_map(|s| step_ms(s).map(|d| (s.step_id.as_str(), d)))
        .collect();
    slow.sort_by_key(|s| std::cmp::Reverse(s.1));
    let slowest: Vec<&str> = slow.iter().take(SLOWEST).map(|(id, _)| *id).collect();

    let mut out = String::new();
    let workflow = if t.workflow.is_empty() {
        String::new()
    } else {
        format!(" (workflow {})", t.workflow)
    };
    let took = if t.finished_at_ms > 0 {
        format!("in {}", ms(span))
    } else {
        format!("for {} so far", ms(span))
    };
    out.push_str(&format!("run {} {} {took}{workflow}\n", t.run_id, t.state));
    if !t.critical_path.is_empty() {
        out.push_str(&format!(
            "critical path (*): {}\n",
            t.critical_path.join(" → ")
        ));
    }
    if !slowest.is_empty() {
        out.push_str(&format!("slowest (!): {}\n", slowest.join(", ")));
    }
    out.push_str("legend: · queued  █ ran  x failed  ~ superseded  ? waiting\n\n");
    let name_w = t
        .steps
        .iter()
        .map(|s| s.step_id.len() + 2)
        .max()
        .unwrap_or(6)
        .max(6);
    out.push_str(&format!(
        "{:<name_w$} {:<9} {:<10} {:<18} {:>9} {:>9}  |{:<width$}|\n",
        "step",
        "attempt",
        "outcome",
        "node/agent",
        "at",
        "took",
        format!("0 … {}", ms(span)),
    ));
    for s in &t.steps {
        let mark = format!(
            "{}{}",
            if s.critical { "*" } else { " " },
            if slowest.contains(&s.step_id.as_str()) {
                "!"
            } else {
                " "
            }
        );
        let label = format!("{mark}{}", s.step_id);
        if s.attempts.is_empty() {
            let mut bar = vec![' '; width];
            let (from, to) = match (s.started_at_ms, s.finished_at_ms, s.waiting_since_ms) {
                (0, _, 0) => (None, None),
                (_, _, w) if w > 0 => (Some(col(w)), Some(col(end))),
                (a, 0, _) => (Some(col(a)), Some(col(end))),
                (a, b, _) => (Some(col(a)), Some(col(b))),
            };
            if let (Some(a), Some(b)) = (from, to) {
                for c in bar
                    .iter_mut()
                    .take(b.max(a + 1).min(width))
                    .skip(a.min(width - 1))
                {
                    *c = '?';
                }
            }
            let at = if s.started_at_ms > 0 {
                format!("+{}", ms(s.started_at_ms - start))
            } else {
                String::new()
            };
            let took = step_ms(s).map(ms).unwrap_or_default();
            out.push_str(&format!(
                "{label:<name_w$} {:<9} {:<10} {:<18} {at:>9} {took:>9}  |{}|\n",
                "-",
                s.state,
                s.uses.chars().take(18).collect::<String>(),
                bar.into_iter().collect::<String>()
            ));
            continue;
        }
        for (n, a) in s.attempts.iter().enumerate() {
            let mut bar = vec![' '; width];
            let finished = if a.finished_at_ms > 0 {
                a.finished_at_ms
            } else {
                end
            };
            let started = if a.started_at_ms > 0 {
                a.started_at_ms
            } else {
                finished
            };
            let (q, r, f) = (col(a.queued_at_ms), col(started), col(finished));
            let ran = match a.outcome.as_str() {
                "failed" => 'x',
                "superseded" => '~',
                _ => '█',
            };
            for (c, cell) in bar.iter_mut().enumerate() {
                if c >= q && c < r {
                    *cell = '·';
                } else if c >= r && (c < f || (c == r && f == r)) {
                    *cell = ran;
                }
            }
            let who = if a.node.is_empty() {
                String::new()
            } else {
                format!("{}/{}", a.node, a.agent)
            };
            let attempt = if a.index > 0 || s.attempts.iter().any(|x| x.index > 0) {
                format!("{}#{}", a.index, a.attempt)
            } else {
                a.attempt.to_string()
            };
            out.push_str(&format!(
                "{:<name_w$} {attempt:<9} {:<10} {:<18} {:>9} {:>9}  |{}|\n",
                if n == 0 { label.clone() } else { String::new() },
                a.outcome,
                who.chars().take(18).collect::<String>(),
                format!("+{}", ms(a.queued_at_ms - start)),
                ms(finished - a.queued_at_ms),
                bar.into_iter().collect::<String>()
            ));
            if !a.error.is_empty() {
                out.push_str(&format!(
                    "{:<name_w$}   {}: {}\n",
                    "",
                    a.error_code,
                    a.error.chars().take(120).collect::<String>()
                ));
            }
            for c in &a.calls {
                let took = if c.finished_at_ms > 0 {
                    ms(c.finished_at_ms - c.started_at_ms)
                } else {
                    "…".to_owned()
                };
                let decision = if c.decision.is_empty() {
                    String::new()
                } else {
                    format!(" [{}, waited {}]", c.decision, ms(c.waited_ms))
                };
                out.push_str(&format!(
                    "{:<name_w$}   ↳ {} {}({}) {} {took}{decision}\n",
                    "",
                    c.kind,
                    c.tool,
                    c.arguments_json.chars().take(80).collect::<String>(),
                    c.outcome,
                ));
            }
        }
    }
    let cost: f64 = t.steps.iter().map(|s| s.cost_usd).sum();
    let tokens: u64 = t
        .steps
        .iter()
        .map(|s| s.input_tokens + s.output_tokens)
        .sum();
    if tokens > 0 {
        out.push_str(&format!("\ntokens {tokens}, cost ${cost:.6}\n"));
    }
    out
}

/// The trace as JSON, for `--output json`.
pub fn trace_json(t: &pb::RunTrace) -> Value {
    json!({
        "run_id": t.run_id, "state": t.state, "workflow": t.workflow,
        "created_at_ms": t.created_at_ms, "finished_at_ms": t.finished_at_ms,
        "critical_path": t.critical_path,
        "steps": t.steps.iter().map(|s| json!({
            "step_id": s.step_id, "uses": s.uses, "state": s.state,
            "started_at_ms": s.started_at_ms, "finished_at_ms": s.finished_at_ms,
            "duration_ms": step_ms(s), "needs": s.needs, "critical": s.critical,
            "waited_ms": s.waited_ms, "input_tokens": s.input_tokens,
            "output_tokens": s.output_tokens, "cost_usd": s.cost_usd,
            "attempts": s.attempts.iter().map(|a| json!({
                "index": a.index, "attempt": a.attempt, "outcome": a.outcome,
                "queued_at_ms": a.queued_at_ms, "started_at_ms": a.started_at_ms,
                "finished_at_ms": a.finished_at_ms, "node": a.node, "agent": a.agent,
                "error": a.error, "error_code": a.error_code, "retryable": a.retryable,
                "input_tokens": a.input_tokens, "output_tokens": a.output_tokens,
                "cost_usd": a.cost_usd,
                "calls": a.calls.iter().map(call_json).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

fn call_json(c: &pb::ToolCallTrace) -> Value {
    json!({
        "call_id": c.call_id, "tool": c.tool, "kind": c.kind,
        "arguments": serde_json::from_str::<Value>(&c.arguments_json).unwrap_or(Value::Null),
        "outcome": c.outcome, "started_at_ms": c.started_at_ms,
        "finished_at_ms": c.finished_at_ms, "waited_ms": c.waited_ms,
        "decision": c.decision, "result": c.result,
    })
}

/// A workflow's profile as table rows.
pub fn profile_rows(p: &pb::WorkflowProfile) -> Vec<Vec<String>> {
    p.steps
        .iter()
        .map(|s| {
            vec![
                s.step_id.clone(),
                s.runs.to_string(),
                ms(s.p50_ms),
                ms(s.p95_ms),
                format!("{:.1}%", s.failure_rate * 100.0),
                format!("${:.6}", s.cost_usd),
                format!("{:.1}%", s.cost_share * 100.0),
            ]
        })
        .collect()
}

pub const PROFILE_HEADERS: [&str; 7] =
    ["step", "runs", "p50", "p95", "failed", "cost", "cost share"];

/// The profile as JSON, for `--output json`.
pub fn profile_json(p: &pb::WorkflowProfile) -> Value {
    json!({
        "workflow": p.workflow, "runs": p.runs,
        "steps": p.steps.iter().map(|s| json!({
            "step_id": s.step_id, "runs": s.runs, "p50_ms": s.p50_ms, "p95_ms": s.p95_ms,
            "failure_rate": s.failure_rate, "cost_usd": s.cost_usd, "cost_share": s.cost_share,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(q: i64, s: i64, f: i64, outcome: &str) -> pb::AttemptTrace {
        pb::AttemptTrace {
            attempt: 1,
            queued_at_ms: q,
            started_at_ms: s,
            finished_at_ms: f,
            node: "n1".into(),
            agent: "echo".into(),
            outcome: outcome.into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_waterfall_marks_the_critical_path_the_slowest_and_failed_attempts() {
        let t = pb::RunTrace {
            run_id: "run-1".into(),
            state: "succeeded".into(),
            created_at_ms: 1_000,
            finished_at_ms: 2_000,
            critical_path: vec!["a".into(), "c".into()],
            steps: vec![
                pb::StepTrace {
                    step_id: "a".into(),
                    state: "succeeded".into(),
                    started_at_ms: 1_000,
                    finished_at_ms: 1_500,
                    critical: true,
                    attempts: vec![attempt(1_000, 1_100, 1_500, "succeeded")],
                    ..Default::default()
                },
                pb::StepTrace {
                    step_id: "b".into(),
                    state: "succeeded".into(),
                    started_at_ms: 1_000,
                    finished_at_ms: 1_200,
                    attempts: vec![
                        {
                            let mut a = attempt(1_000, 1_000, 1_100, "failed");
                            a.error = "boom".into();
                            a.error_code = "agent_error".into();
                            a
                        },
                        attempt(1_100, 1_100, 1_200, "succeeded"),
                    ],
                    ..Default::default()
                },
                pb::StepTrace {
                    step_id: "c".into(),
                    state: "succeeded".into(),
                    started_at_ms: 1_500,
                    finished_at_ms: 2_000,
                    critical: true,
                    attempts: vec![attempt(1_500, 1_500, 2_000, "succeeded")],
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let text = waterfall(&t, 0, 20);
        assert!(text.contains("critical path (*): a → c"), "{text}");
        let line = |id: &str| {
            text.lines()
                .filter(|l| l.contains('|'))
                .find(|l| l.trim_start_matches([' ', '*', '!']).starts_with(id))
                .unwrap_or_default()
                .to_owned()
        };
        assert!(line("a").starts_with("*!a"), "{text}");
        assert!(
            line("b").starts_with("  b") || line("b").starts_with(" !b"),
            "{text}"
        );
        // a: queued the first 2 columns (100 ms of 1 s), then ran to the middle.
        assert!(line("a").ends_with("|··████████          |"), "{text}");
        assert!(text.contains("xx"), "the failed attempt is drawn: {text}");
        assert!(text.contains("agent_error: boom"), "{text}");
        assert!(line("c").ends_with("|          ██████████|"), "{text}");
    }
}
