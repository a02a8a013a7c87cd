//! Human tables and JSON output.

use mesh_proto::domain::*;
use serde::Serialize;

use crate::Output;

/// Prints rows as aligned columns.
pub fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let text: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_uppercase()).collect());
    for row in rows {
        line(row);
    }
}

pub fn json<T: Serialize>(value: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

fn agent_of(step: &StepView) -> String {
    step.agent
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_else(|| "-".into())
}

pub fn step_line(step: &StepView) -> String {
    let mut line = format!(
        "step {:<16} {:<10} attempt {:<2} {}",
        step.id,
        step.state.as_str(),
        step.attempt,
        agent_of(step)
    );
    if step.items_total > 0 {
        line.push_str(&format!("  items {}/{}", step.items_done, step.items_total));
    }
    if step.iteration > 0 {
        line.push_str(&format!("  iteration {}", step.iteration));
    }
    if let Some(d) = &step.detail {
        line.push_str(&format!("  [{d}]"));
    }
    if let Some(e) = &step.error {
        line.push_str(&format!("  ({e})"));
    }
    line
}

/// Calls, tokens in and out, and cost of a usage total; a cost that misses unpriced calls
/// says so.
fn usage_cells(u: &mesh_agent_sdk::UsageTotal) -> [String; 4] {
    if u.is_empty() {
        return [String::new(), String::new(), String::new(), String::new()];
    }
    let cost = match (u.unpriced_calls, u.calls) {
        (0, _) => format!("${:.6}", u.cost_usd),
        (n, all) if n == all => "unknown".to_owned(),
        (n, _) => format!("${:.6} + {n} unpriced", u.cost_usd),
    };
    [
        u.calls.to_string(),
        u.input_tokens.to_string(),
        u.output_tokens.to_string(),
        cost,
    ]
}

pub fn run(view: &RunView, format: Output) {
    match format {
        Output::Json => json(view),
        Output::Table => {
            println!("run      {}", view.run_id);
            println!("goal     {}", view.goal_id);
            if !view.namespace.is_default() {
                println!("namespace {}", view.namespace);
            }
            if !view.objective.is_empty() {
                println!("objective {}", view.objective);
            }
            println!("state    {}", view.state);
            if let Some(e) = &view.error {
                println!("error    {e}");
            }
            let spent = !view.usage.is_empty();
            let rows = view
                .steps
                .iter()
                .map(|s| {
                    let mut row = vec![
                        s.id.to_string(),
                        s.uses.clone(),
                        s.state.to_string(),
                        s.attempt.to_string(),
                        agent_of(s),
                    ];
                    if spent {
                        row.extend(usage_cells(&s.usage));
                    }
                    row
                })
                .collect();
            let mut headers = vec!["step", "uses", "state", "attempt", "agent"];
            if spent {
                headers.extend(["calls", "tokens in", "tokens out", "cost"]);
            }
            table(&headers, rows);
            if spent {
                let [calls, input, output, cost] = usage_cells(&view.usage);
                println!(
                    "usage    {calls} model calls, {input} tokens in, {output} out, cost {cost}"
                );
            }
            if let Some(b) = &view.budget {
                let mut limits = Vec::new();
                if let Some(t) = b.max_tokens {
                    limits.push(format!("{t} tokens"));
                }
                if let Some(usd) = b.max_cost_usd {
                    limits.push(format!("${usd}"));
                }
                println!(
                    "budget   {}, on_exceed {}",
                    limits.join(", "),
                    b.on_exceed.as_str()
                );
            }
            if !view.swarm.is_empty() {
                let members: Vec<String> = view
                    .swarm
                    .iter()
                    .map(|m| format!("{}={}", m.skill, m.agent))
                    .collect();
                println!("swarm    {}", members.join(", "));
            }
            if let Some(out) = &view.output {
                println!("output   {out}");
            }
            if let Some(bytes) = view.output_elided_bytes {
                println!(
                    "output   ({bytes} bytes, not shown: `mesh run output {}`)",
                    view.run_id
                );
            }
            for s in view.steps.iter() {
                if let Some(bytes) = s.output_elided_bytes {
                    println!(
                        "step {} output: {bytes} bytes, not shown: `mesh run output {} {}`",
                        s.id, view.run_id, s.id
                    );
                }
            }
        }
    }
}
