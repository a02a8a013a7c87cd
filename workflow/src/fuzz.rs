//! What the fuzz target (`fuzz/fuzz_targets/workflow.rs`) runs on each input, shared with
//! the corpus replay test so that CI checks the same code path without a fuzzer.

use serde_json::json;

use crate::{Limits, load};

/// Parses, validates, binds inputs and renders every template of one input. Returns whether
/// the text was a valid workflow; never panics on any input (that is what is checked).
pub fn check(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let limits = Limits {
        // Small enough that the fuzzer spends its time on shapes, not sizes.
        max_bytes: 64 * 1024,
        ..Limits::default()
    };
    let Ok(workflow) = load(text, &limits) else {
        return false;
    };
    if let Ok(inputs) = workflow.bind_inputs(&json!({})) {
        let mut bindings = serde_json::Map::new();
        bindings.insert("inputs".into(), inputs);
        bindings.insert("steps".into(), json!({}));
        bindings.insert("item".into(), json!(1));
        bindings.insert("index".into(), json!(0));
        bindings.insert("iteration".into(), json!(0));
        bindings.insert("output".into(), json!(null));
        for step in &workflow.steps {
            let _ = step.with.render(&bindings);
            for e in step.exprs() {
                let _ = e.eval(&bindings);
            }
        }
    }
    true
}
