//! A runnable example agent: upper-cases text.
//!
//!     cargo run -p mesh-cli -- dev                       # in one terminal
//!     cargo run -p mesh-agent-sdk --example upper        # in another
//!
//! then submit a goal with a step `uses: uppercase` and `with: { text: "hello" }`
//! (examples/goals/upper.yaml).

use mesh_agent_sdk::{Agent, AgentCard, AgentError, Context, NodeRuntime};
use serde_json::{Value, json};

struct Upper;

impl Agent for Upper {
    fn card(&self) -> AgentCard {
        AgentCard::new("upper")
            .description("upper-cases with.text")
            .skill("uppercase")
            .max_concurrency(8)
    }

    async fn handle(&self, ctx: Context, input: Value) -> Result<Value, AgentError> {
        let text = input["with"]["text"]
            .as_str()
            .ok_or_else(|| AgentError::bad_input("with.text must be a string"))?;
        ctx.progress("upper-casing", Some(0.5));
        Ok(json!({ "text": text.to_uppercase(), "key": ctx.idempotency_key() }))
    }
}

#[tokio::main]
async fn main() -> Result<(), mesh_agent_sdk::Error> {
    tracing_subscriber::fmt()
        .with_env_filter("info,ractor=warn")
        .init();
    let coordinator =
        std::env::var("MESH_COORDINATOR").unwrap_or_else(|_| "http://127.0.0.1:7700".into());
    NodeRuntime::builder()
        .coordinator(coordinator)
        .name("upper-node")
        .agent(Upper)
        .build()?
        .run_until(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn upper_cases_and_rejects_bad_input() {
        let out = Upper
            .handle(
                Context::for_test("r", "s", 1),
                json!({ "with": { "text": "hi" } }),
            )
            .await
            .unwrap();
        assert_eq!(out["text"], "HI");
        let err = Upper
            .handle(Context::for_test("r", "s", 1), json!({ "with": {} }))
            .await
            .unwrap_err();
        assert!(!err.retryable);
    }
}
