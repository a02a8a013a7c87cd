//! Metric names of the node runtime.

use metrics::{describe_counter, describe_gauge, describe_histogram};

pub const TASKS: &str = "mesh_node_tasks_total";
pub const TASKS_RUNNING: &str = "mesh_node_tasks_running";
pub const AGENT_RESTARTS: &str = "mesh_node_agent_restarts_total";
pub const RESULTS_REJECTED: &str = "mesh_node_results_rejected_total";
pub const CONNECTED: &str = "mesh_node_connected";
pub const RECONNECTS: &str = "mesh_node_reconnects_total";
/// Model calls, by provider and model (at most `MAX_MODEL_LABELS` models; the rest `other`).
pub const LLM_CALLS: &str = "mesh_llm_calls_total";
pub const LLM_TOKENS: &str = "mesh_llm_tokens_total";
pub const LLM_COST: &str = "mesh_llm_cost_usd_total";
/// Latency of a whole call and to its first token, by provider.
pub const LLM_SECONDS: &str = "mesh_llm_request_seconds";
pub const LLM_FIRST_TOKEN: &str = "mesh_llm_time_to_first_token_seconds";
/// Time a call waited for its rate limits, and 429s met, by provider.
pub const LLM_LIMIT_WAIT: &str = "mesh_llm_rate_limit_wait_seconds";
pub const LLM_RATE_LIMITED: &str = "mesh_llm_rate_limited_total";
/// Distinct model names used as metric labels; past it a model counts as `other`.
pub const MAX_MODEL_LABELS: usize = 64;

pub fn describe() {
    describe_counter!(
        TASKS,
        "Attempts finished by hosted agents, by agent and outcome"
    );
    describe_gauge!(TASKS_RUNNING, "Attempts running on this node");
    describe_counter!(
        AGENT_RESTARTS,
        "Agent actors restarted after a panic, by agent"
    );
    describe_counter!(
        RESULTS_REJECTED,
        "Results the coordinator rejected as stale"
    );
    describe_gauge!(CONNECTED, "1 while registered with the coordinator");
    describe_counter!(RECONNECTS, "Connection attempts after the first");
    describe_counter!(LLM_CALLS, "Model calls answered, by provider and model");
    describe_counter!(
        LLM_TOKENS,
        "Tokens of answered model calls, by provider, model and direction (input, output)"
    );
    describe_gauge!(
        LLM_COST,
        "USD spent on priced model calls, by provider and model (only ever grows)"
    );
    describe_histogram!(LLM_SECONDS, "Model call latency, start to end, by provider");
    describe_histogram!(
        LLM_LIMIT_WAIT,
        "Time model calls waited for the node's rate limits, by provider"
    );
    describe_counter!(
        LLM_RATE_LIMITED,
        "429 answers from providers (each waited out or moved past), by provider"
    );
    describe_histogram!(
        LLM_FIRST_TOKEN,
        "Model call latency to the first token, by provider"
    );
}

/// The model label for `model`: itself for the first `MAX_MODEL_LABELS` distinct names, then
/// `other` (model names come from workflows, so labels must stay bounded).
pub fn model_label(model: &str) -> String {
    use std::collections::HashSet;
    use std::sync::{Mutex, OnceLock};
    static SEEN: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    let mut seen = SEEN
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if seen.contains(model) {
        return model.to_owned();
    }
    if seen.len() < MAX_MODEL_LABELS {
        seen.insert(model.to_owned());
        return model.to_owned();
    }
    "other".to_owned()
}

/// Counts an answered model call: calls, tokens and (when priced) cost, by provider and model.
pub fn record_llm_call(provider: &str, model: &str, input: u64, output: u64, cost: Option<f64>) {
    let (p, m) = (provider.to_owned(), model_label(model));
    metrics::counter!(LLM_CALLS, "provider" => p.clone(), "model" => m.clone()).increment(1);
    metrics::counter!(LLM_TOKENS, "provider" => p.clone(), "model" => m.clone(), "direction" => "input")
        .increment(input);
    metrics::counter!(LLM_TOKENS, "provider" => p.clone(), "model" => m.clone(), "direction" => "output")
        .increment(output);
    if let Some(c) = cost {
        metrics::gauge!(LLM_COST, "provider" => p, "model" => m).increment(c);
    }
}
