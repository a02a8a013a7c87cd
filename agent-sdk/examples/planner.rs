//! A rule-based planner: an agent with the `plan` skill, which turns a goal's objective into a
//! workflow. A goal with an objective and no steps goes to it; what it answers is validated
//! like any other workflow and recorded with the run.
//!
//!     cargo run -p mesh-cli -- dev                          # in one terminal
//!     cargo run -p mesh-agent-sdk --example planner         # in another
//!     mesh goal submit --objective "compare actors, leases and fencing tokens" --watch
//!
//! The rules: an objective naming several topics ("a, b and c") becomes a fan-out that
//! researches each topic with `echo` and a summary over the results; any other objective a
//! single `echo` step. A real planner would ask a model; the contract is the same: answer
//! `{"workflow": <definition>}`.

use mesh_agent_sdk::{Agent, AgentCard, AgentError, Context, NodeRuntime};
use serde_json::{Value, json};

struct Planner;

/// The topics an objective names: the text after its first word, split at commas and "and".
fn topics(objective: &str) -> Vec<String> {
    let rest = objective
        .trim()
        .split_once(char::is_whitespace)
        .map_or("", |(_, rest)| rest);
    rest.split(',')
        .flat_map(|part| part.split(" and "))
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .collect()
}

/// The workflow for an objective.
fn plan(objective: &str) -> Value {
    let topics = topics(objective);
    if topics.len() < 2 {
        return json!({
            "steps": [{ "id": "answer", "uses": "echo", "with": { "objective": objective } }],
            "outputs": { "answer": "${{ steps.answer.output.with }}" }
        });
    }
    json!({
        "inputs": { "topics": { "type": "array", "default": topics } },
        "steps": [
            {
                "id": "research",
                "uses": "echo",
                "foreach": "${{ inputs.topics }}",
                "parallel": 4,
                "with": { "topic": "${{ item }}" }
            },
            {
                "id": "summary",
                "uses": "echo",
                "needs": ["research"],
                "with": { "topics": "${{ steps.research.output.map(r, r.with.topic) }}" }
            }
        ],
        "outputs": { "summary": "${{ steps.summary.output.with }}" }
    })
}

impl Agent for Planner {
    fn card(&self) -> AgentCard {
        AgentCard::new("planner")
            .description("turns an objective into a workflow, by rules")
            .skill("plan")
            .max_concurrency(16)
    }

    async fn handle(&self, _ctx: Context, input: Value) -> Result<Value, AgentError> {
        let objective = input["with"]["objective"]
            .as_str()
            .filter(|o| !o.trim().is_empty())
            .ok_or_else(|| AgentError::bad_input("with.objective must be a non-empty string"))?;
        Ok(json!({ "workflow": plan(objective) }))
    }
}

#[tokio::main]
async fn main() -> Result<(), mesh_agent_sdk::Error> {
    tracing_subscriber::fmt()
        .with_env_filter("info,ractor=warn")
        .init();
    let coordinator =
        std::env::var("MESH_COORDINATOR").unwrap_or_else(|_| "http://127.0.0.1:7700".into());
    let name = std::env::var("MESH_NODE_NAME").unwrap_or_else(|_| "planner-node".into());
    NodeRuntime::builder()
        .coordinator(coordinator)
        .name(&name)
        .agent(Planner)
        .build()?
        .run_until(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_topics_fan_out_and_one_objective_is_one_step() {
        assert_eq!(
            topics("compare actors, leases and fencing tokens"),
            ["actors", "leases", "fencing tokens"]
        );
        let w = plan("compare actors and leases");
        assert_eq!(w["steps"][0]["foreach"], json!("${{ inputs.topics }}"));
        assert_eq!(
            w["inputs"]["topics"]["default"],
            json!(["actors", "leases"])
        );
        assert_eq!(plan("hello")["steps"][0]["id"], json!("answer"));
    }

    #[tokio::test]
    async fn refuses_an_empty_objective() {
        let err = Planner
            .handle(Context::for_test("r", "s", 1), json!({ "with": {} }))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("with.objective"), "{err}");
    }
}
