//! Responses that always fit a gRPC message: a run's view carries its outputs inline only
//! while they are small, and anything larger is read in pages with `GetOutput`. A run the
//! coordinator accepted can always be read, however much its agents returned.

use mesh_proto::domain::{OutputPage, RunEvent, RunView};
use mesh_proto::pb;
use serde_json::Value;

/// Largest output sent inline in a view or an event.
pub const MAX_INLINE_OUTPUT: usize = 64 << 10;
/// Outputs sent inline in one response, in all; past it the rest are elided.
pub const MAX_INLINE_TOTAL: usize = 2 << 20;
/// Above this encoded size, step errors and details are cut short as well.
const MAX_RESPONSE: usize = 3 << 20;
/// What is left of an error or a detail in a response that was too large.
const SHORT_TEXT: usize = 256;
/// Pages of `GetOutput`: the default and the most.
pub const DEFAULT_PAGE: usize = 1 << 20;
pub const MAX_PAGE: usize = 2 << 20;

/// Budget of inline output bytes left in one response.
struct Budget(usize);

impl Budget {
    /// Keeps `json` inline if it fits; otherwise empties it and answers its size.
    fn inline(&mut self, json: &mut String) -> u64 {
        let n = json.len();
        if n <= MAX_INLINE_OUTPUT && n <= self.0 {
            self.0 -= n;
            0
        } else {
            json.clear();
            n as u64
        }
    }
}

fn shorten(text: &mut String) {
    *text = mesh_proto::convert::truncated(std::mem::take(text), SHORT_TEXT);
}

fn bound_run(run: &mut pb::Run) {
    use prost::Message;
    let mut budget = Budget(MAX_INLINE_TOTAL);
    run.output_elided_bytes = budget.inline(&mut run.output_json);
    for step in &mut run.steps {
        step.output_elided_bytes = budget.inline(&mut step.output_json);
    }
    if run.encoded_len() > MAX_RESPONSE {
        shorten(&mut run.error);
        for step in &mut run.steps {
            shorten(&mut step.error);
            shorten(&mut step.detail);
        }
    }
}

/// A run's view as it travels: within the message limit whatever the run holds.
pub fn run(view: RunView) -> pb::Run {
    let mut run = pb::Run::from(view);
    bound_run(&mut run);
    run
}

/// An event as it travels, bounded like [`run`].
pub fn event(event: RunEvent) -> pb::RunEvent {
    use pb::run_event::Kind;
    let mut event = pb::RunEvent::from(event);
    let mut budget = Budget(MAX_INLINE_TOTAL);
    match &mut event.kind {
        Some(Kind::Snapshot(run)) => bound_run(run),
        Some(Kind::Step(changed)) => {
            if let Some(step) = &mut changed.step {
                step.output_elided_bytes = budget.inline(&mut step.output_json);
            }
        }
        Some(Kind::Finished(f)) => f.output_elided_bytes = budget.inline(&mut f.output_json),
        Some(Kind::Progress(_) | Kind::Delta(_)) | None => {}
    }
    event
}

/// A page of `output`'s JSON text from byte `offset`, at most `max_bytes` long.
pub fn page(output: &Value, offset: u64, max_bytes: usize) -> Result<OutputPage, String> {
    let text = serde_json::to_vec(output).map_err(|e| e.to_string())?;
    let total = text.len() as u64;
    if offset > total {
        return Err(format!(
            "offset: {offset} is past the end of the output ({total} bytes)"
        ));
    }
    let max = match max_bytes {
        0 => DEFAULT_PAGE,
        n => n.min(MAX_PAGE),
    };
    let start = offset as usize;
    let end = (start + max).min(text.len());
    Ok(OutputPage {
        chunk: text[start..end].to_vec(),
        offset,
        total_bytes: total,
        done: end == text.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::domain::*;
    use prost::Message;
    use serde_json::json;

    fn step(i: usize, output: Value, error: Option<String>) -> StepView {
        StepView {
            id: StepId(format!("s{i}")),
            uses: "echo".into(),
            state: StepState::Succeeded,
            attempt: 1,
            agent: None,
            output: Some(output),
            error,
            items_done: 0,
            items_total: 0,
            iteration: 0,
            detail: None,
            output_elided_bytes: None,
            usage: Default::default(),
        }
    }

    fn view(steps: Vec<StepView>, output: Value) -> RunView {
        RunView {
            run_id: RunId("run-1".into()),
            goal_id: GoalId("goal-1".into()),
            objective: String::new(),
            state: RunState::Succeeded,
            steps,
            output: Some(output),
            error: None,
            swarm: Vec::new(),
            created_at_ms: 0,
            updated_at_ms: 0,
            output_elided_bytes: None,
            usage: Default::default(),
            budget: None,
            namespace: Default::default(),
        }
    }

    #[test]
    fn a_run_with_large_outputs_fits_a_message_and_says_what_it_left_out() {
        let big = json!("x".repeat(900 << 10));
        let small = json!({ "ok": true });
        let mut steps: Vec<StepView> = (0..10).map(|i| step(i, big.clone(), None)).collect();
        steps.push(step(10, small.clone(), None));
        // Ten thousand steps with long errors, too.
        steps.extend((11..10_011).map(|i| step(i, json!(i), Some("e".repeat(4096)))));
        let run = run(view(steps, big.clone()));
        assert!(run.encoded_len() < 4 << 20, "{} bytes", run.encoded_len());
        assert_eq!(run.output_json, "");
        assert_eq!(run.output_elided_bytes, big.to_string().len() as u64);
        assert_eq!(
            run.steps[0].output_elided_bytes,
            big.to_string().len() as u64
        );
        assert_eq!(run.steps[10].output_json, small.to_string());
        assert_eq!(run.steps[10].output_elided_bytes, 0);
        assert!(run.steps[20].error.contains("(truncated)"));
        // Small runs travel whole.
        let whole = super::run(view(vec![step(0, small.clone(), None)], small.clone()));
        assert_eq!(whole.output_json, small.to_string());
        assert_eq!(whole.steps[0].output_json, small.to_string());
    }

    /// A run's end with a large output says so, through the wire and back.
    #[test]
    fn a_large_final_output_travels_as_its_size() {
        let big = json!("y".repeat(100 << 10));
        let sent = event(RunEvent::Finished {
            state: RunState::Succeeded,
            output: Some(big.clone()),
            error: None,
            output_elided_bytes: None,
        });
        match RunEvent::try_from(sent).unwrap() {
            RunEvent::Finished {
                output,
                output_elided_bytes,
                ..
            } => {
                assert_eq!(output, None);
                assert_eq!(output_elided_bytes, Some(big.to_string().len() as u64));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pages_put_the_output_back_together() {
        let output = json!({ "items": (0..50_000).collect::<Vec<_>>(), "text": "é".repeat(1000) });
        let mut text = Vec::new();
        let mut offset = 0;
        loop {
            let p = page(&output, offset, 64 << 10).unwrap();
            assert!(p.chunk.len() <= 64 << 10);
            text.extend_from_slice(&p.chunk);
            offset += p.chunk.len() as u64;
            if p.done {
                assert_eq!(p.total_bytes, text.len() as u64);
                break;
            }
        }
        assert_eq!(serde_json::from_slice::<Value>(&text).unwrap(), output);
        assert!(
            page(&output, u64::MAX, 0)
                .unwrap_err()
                .contains("past the end")
        );
    }
}
