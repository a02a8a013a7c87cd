//! The `llm` agent of the stock node against a fake provider that speaks each provider's real
//! wire protocol (`mesh_tests::fake_llm`): real processes, the SDK's real client code (genai)
//! on the path, no paid service.

use std::time::Duration;

use mesh_agent_sdk::{RunState, RunView};
use mesh_tests::fake_llm::{FakeLlm, Wire};
use mesh_tests::{Mesh, Timings, workflow_goal};
use serde_json::{Value, json};

const KEY: &str = "sk-test-5f1e2d3c4b5a69788796a5b4";

/// A node hosting the `llm` agent with every provider pointed at the fake, and a price for
/// `openai/gpt-4o-mini` set in its configuration.
fn llm_node(fake: &FakeLlm, anthropic_key: &str) -> String {
    format!(
        r#"
[[agents]]
kind = "llm"
max_concurrency = 64

[llm.openai]
base_url = "{openai}"
api_key = "{KEY}"

[llm.anthropic]
base_url = "{anthropic}"
api_key = "{anthropic_key}"

[llm.gemini]
base_url = "{gemini}"
api_key = "{KEY}"

[llm.ollama]
base_url = "{ollama}"

[llm.prices."openai/gpt-4o-mini"]
input_per_million = 1.5
output_per_million = 6.0
"#,
        openai = fake.base_url(Wire::OpenAi),
        anthropic = fake.base_url(Wire::Anthropic),
        gemini = fake.base_url(Wire::Gemini),
        ollama = fake.base_url(Wire::Ollama),
    )
}

fn one_step(with: Value) -> String {
    let step = json!({ "steps": [{ "id": "ask", "uses": "llm", "with": with }] });
    step.to_string()
}

async fn run(mesh: &Mesh, with: Value) -> RunView {
    let client = mesh.client().await;
    submit_and_finish(&client, &one_step(with), json!({})).await
}

/// Submits a workflow and waits (30 s at most) for its run to end.
async fn submit_and_finish(
    client: &mesh_agent_sdk::GoalClient,
    text: &str,
    inputs: Value,
) -> RunView {
    let run = client.submit(workflow_goal(text, inputs)).await.unwrap();
    finish(client, &run.run_id).await
}

async fn finish(client: &mesh_agent_sdk::GoalClient, run: &mesh_agent_sdk::RunId) -> RunView {
    tokio::time::timeout(Duration::from_secs(30), client.wait(run))
        .await
        .expect("the run finishes")
        .unwrap()
}

fn output(view: &RunView) -> &Value {
    view.steps[0].output.as_ref().expect("the step's output")
}

async fn mesh_with_llm(fake: &FakeLlm, anthropic_key: &str) -> Mesh {
    let mut mesh = Mesh::start(Timings::default()).await;
    mesh.start_node("n1", &llm_node(fake, anthropic_key)).await;
    mesh
}

/// The same step on all four providers, switched by its `model` line: each answer comes back
/// through the provider's own streaming protocol with its usage, and the model and finish
/// reason named alike.
#[tokio::test]
async fn one_step_runs_on_every_provider_by_changing_one_line() {
    let fake = FakeLlm::start(KEY).await;
    let mesh = mesh_with_llm(&fake, KEY).await;
    for (model, wire) in [
        ("openai/test-model", Wire::OpenAi),
        ("anthropic/test-model", Wire::Anthropic),
        ("gemini/test-model", Wire::Gemini),
        ("ollama/test-model", Wire::Ollama),
    ] {
        let view = run(
            &mesh,
            json!({ "model": model, "system": "be brief", "prompt": "hello mesh of agents" }),
        )
        .await;
        assert_eq!(view.state, RunState::Succeeded, "{model}: {view:?}");
        let out = output(&view);
        let (provider, name) = model.split_once('/').unwrap();
        assert_eq!(out["text"], "answer: hello mesh of agents", "{model}");
        assert_eq!(out["provider"], provider);
        assert_eq!(out["model"], name);
        assert_eq!(out["finish_reason"], "stop", "{model}");
        // Input: the system prompt's 2 words and the prompt's 4; output: 5 chunks.
        assert_eq!(
            out["usage"],
            json!({ "input_tokens": 6, "output_tokens": 5 }),
            "{model}"
        );
        assert_eq!(
            out["cost_usd"],
            Value::Null,
            "{model}: unknown price, not zero"
        );
        assert_eq!(out["fallbacks"], json!([]));
        let seen = fake.seen();
        let last = seen.last().unwrap();
        assert_eq!(
            (last.wire, last.model.as_str(), last.stream),
            (wire, "test-model", true)
        );
    }
}

/// A priced model's cost is its usage times the configured price, exactly.
#[tokio::test]
async fn cost_is_usage_times_price() {
    let fake = FakeLlm::start(KEY).await;
    let mesh = mesh_with_llm(&fake, KEY).await;
    let view = run(
        &mesh,
        json!({ "model": "openai/gpt-4o-mini", "prompt": "one two three", "max_tokens": 50 }),
    )
    .await;
    let out = output(&view);
    assert_eq!(
        out["usage"],
        json!({ "input_tokens": 3, "output_tokens": 4 })
    );
    let cost = out["cost_usd"].as_f64().expect("priced");
    let expected = 3.0 * 1.5e-6 + 4.0 * 6.0e-6;
    assert!((cost - expected).abs() < 1e-12, "{cost} != {expected}");
    assert_eq!(fake.seen().last().unwrap().body["max_tokens"], 50);
}

/// `models` is a chain: a model that fails with a 5xx gives way to the next, and the output
/// names the model that answered and why the earlier one failed; a rejected key stops the
/// chain, fails the step for good, and its message holds no key.
#[tokio::test]
async fn a_fallback_chain_moves_on_from_a_server_error_and_stops_at_a_bad_key() {
    let fake = FakeLlm::start(KEY).await;
    let wrong = "sk-wrong-0123456789abcdef0123";
    let mesh = mesh_with_llm(&fake, wrong).await;
    fake.knobs()
        .server_errors
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let view = run(
        &mesh,
        json!({ "models": ["gemini/first", "ollama/second"], "prompt": "fall back" }),
    )
    .await;
    assert_eq!(view.state, RunState::Succeeded, "{view:?}");
    let out = output(&view);
    assert_eq!(
        (out["provider"].as_str(), out["model"].as_str()),
        (Some("ollama"), Some("second"))
    );
    assert_eq!(out["fallbacks"][0]["model"], "gemini/first");
    assert_eq!(out["fallbacks"][0]["error"]["code"], "unavailable");
    assert!(
        out["fallbacks"][0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("500")
    );

    let view = run(
        &mesh,
        json!({ "models": ["anthropic/keyed", "ollama/never"], "prompt": "no key" }),
    )
    .await;
    assert_eq!(view.state, RunState::Failed, "{view:?}");
    let error = view.steps[0].error.clone().unwrap_or_default();
    assert!(error.contains("anthropic/keyed refused the key"), "{error}");
    assert!(!error.contains(wrong), "the key is not in the error");
    assert_eq!(
        view.steps[0].attempt, 1,
        "a rejected key is not retried: {view:?}"
    );
    assert!(
        !fake.seen().iter().any(|s| s.model == "never"),
        "the chain stopped at the key"
    );
}

/// A 429 with `retry-after` is waited out and the same model answers; nothing fails.
#[tokio::test]
async fn a_rate_limit_is_waited_out() {
    let fake = FakeLlm::start(KEY).await;
    let mesh = mesh_with_llm(&fake, KEY).await;
    let knobs = fake.knobs();
    knobs
        .retry_after_s
        .store(1, std::sync::atomic::Ordering::SeqCst);
    knobs
        .rate_limited
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let started = std::time::Instant::now();
    let view = run(
        &mesh,
        json!({ "model": "anthropic/limited", "prompt": "wait" }),
    )
    .await;
    assert_eq!(view.state, RunState::Succeeded, "{view:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "retry-after honoured"
    );
    let out = output(&view);
    assert_eq!(out["rate_limited"], 1);
    assert_eq!(out["fallbacks"], json!([]));
    assert_eq!(view.steps[0].attempt, 1, "waited within the attempt");
}

/// A stream cut midway is a transient failure: the step's retry runs it again.
#[tokio::test]
async fn a_stream_cut_midway_fails_the_attempt_and_a_retry_answers() {
    let fake = FakeLlm::start(KEY).await;
    let mesh = mesh_with_llm(&fake, KEY).await;
    fake.knobs()
        .cut_streams
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let client = mesh.client().await;
    let text = r#"{"steps": [{"id": "ask", "uses": "llm", "retry": {"max_attempts": 3, "backoff": "1s"},
        "with": {"model": "openai/cut", "prompt": "a longer prompt to cut"}}]}"#;
    let run = client.submit(workflow_goal(text, json!({}))).await.unwrap();
    // Let the first attempt fail on the cut stream, then heal the provider.
    mesh_tests::wait_for("a cut stream", Duration::from_secs(10), || async {
        (!fake.seen().is_empty()).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    fake.knobs()
        .cut_streams
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let view = finish(&client, &run.run_id).await;
    assert_eq!(view.state, RunState::Succeeded, "{view:?}");
    assert!(view.steps[0].attempt >= 2, "{view:?}");
    assert_eq!(output(&view)["text"], "answer: a longer prompt to cut");
}

/// Bad fields are refused before any call, naming the field; nothing is retried.
#[tokio::test]
async fn a_bad_step_is_refused_naming_its_field() {
    let fake = FakeLlm::start(KEY).await;
    let mesh = mesh_with_llm(&fake, KEY).await;
    let view = run(&mesh, json!({ "model": "azure/gpt-4o", "prompt": "x" })).await;
    assert_eq!(view.state, RunState::Failed);
    let error = view.steps[0].error.clone().unwrap_or_default();
    assert!(
        error.contains("with.model: `azure` is not a provider"),
        "{error}"
    );
    assert!(fake.seen().is_empty(), "no call was made");
}

/// After calls of every kind, failed ones included, the keys are nowhere in the store or in
/// any process's log.
#[tokio::test]
async fn keys_never_reach_the_store_or_the_logs() {
    let fake = FakeLlm::start(KEY).await;
    let wrong = "sk-wrong-0123456789abcdef0123";
    let mesh = mesh_with_llm(&fake, wrong).await;
    for with in [
        json!({ "model": "openai/gpt-4o-mini", "prompt": "keep it secret" }),
        json!({ "model": "anthropic/rejected", "prompt": "bad key" }),
        json!({ "models": ["gemini/x", "ollama/y"], "prompt": "chain" }),
    ] {
        run(&mesh, with).await;
    }
    // Logs go out line by line, and the store's WAL file is read along with its database.
    for entry in std::fs::read_dir(mesh.dir.path()).unwrap().chain(
        std::fs::read_dir(mesh.dir.path().join("data"))
            .into_iter()
            .flatten(),
    ) {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") || path.is_dir() {
            continue; // the node's configuration holds the keys by design
        }
        let bytes = std::fs::read(&path).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        for key in [KEY, wrong] {
            assert!(!text.contains(key), "{} holds a key", path.display());
        }
    }
}

/// `mesh dev` finds a provider in the environment (`OPENAI_API_KEY`, `OPENAI_BASE_URL`), says
/// so, and hosts the `llm` agent, which answers through it.
#[tokio::test]
async fn mesh_dev_hosts_the_llm_agent_when_a_provider_is_in_the_environment() {
    let fake = FakeLlm::start(KEY).await;
    let dir = tempfile::tempdir().unwrap();
    let (grpc, http) = (mesh_tests::free_port(), mesh_tests::free_port());
    let (listen, http_listen) = (format!("127.0.0.1:{grpc}"), format!("127.0.0.1:{http}"));
    let data = dir.path().join("data");
    let base = fake.base_url(Wire::OpenAi);
    let dev = mesh_tests::Proc::spawn(
        &mesh_tests::mesh_bin(),
        "dev",
        dir.path(),
        &[
            "dev",
            "--listen",
            &listen,
            "--http-listen",
            &http_listen,
            "--data-dir",
            data.to_str().unwrap(),
        ],
        &[("OPENAI_API_KEY", KEY), ("OPENAI_BASE_URL", &base)],
    )
    .expect("start mesh dev");
    let url = format!("http://{listen}");
    let client = mesh_tests::wait_for("mesh dev's llm agent", Duration::from_secs(30), || {
        let url = url.clone();
        async move {
            let client = mesh_agent_sdk::GoalClient::connect(&url).await.ok()?;
            let agents = client.agents(Some("llm")).await.ok()?;
            (!agents.is_empty()).then_some(client)
        }
    })
    .await;
    assert!(
        dev.log_text().contains("providers found: openai"),
        "{}",
        dev.log_text()
    );
    let run = client
        .submit(workflow_goal(
            &one_step(json!({ "model": "openai/dev-model", "prompt": "from the environment" })),
            json!({}),
        ))
        .await
        .unwrap();
    let view = finish(&client, &run.run_id).await;
    assert_eq!(view.state, RunState::Succeeded, "{view:?}");
    assert_eq!(output(&view)["text"], "answer: from the environment");
    assert!(!dev.log_text().contains(KEY), "no key in the log");
}

/// The example `examples/workflows/llm-summary-fallback.yaml` runs as written: a fan-out of
/// calls, each with a fallback chain, then a join; here the first model fails once with a 500
/// and its chain moves on.
#[tokio::test]
async fn the_summary_example_runs_with_its_fallback_chain() {
    let fake = FakeLlm::start(KEY).await;
    let mesh = mesh_with_llm(&fake, KEY).await;
    fake.knobs()
        .server_errors
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/workflows/llm-summary-fallback.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let client = mesh.client().await;
    let inputs = json!({ "model": "openai/primary", "fallback": "ollama/backup" });
    let run = client.submit(workflow_goal(&text, inputs)).await.unwrap();
    let view = finish(&client, &run.run_id).await;
    assert_eq!(view.state, RunState::Succeeded, "{view:?}");
    let out = view.output.unwrap();
    let models = out["models"].as_array().unwrap();
    assert_eq!(models.len(), 3);
    assert_eq!(
        models.iter().filter(|m| *m == "ollama/backup").count(),
        1,
        "one call fell back: {models:?}"
    );
    assert_eq!(
        out["output_tokens"],
        json!([3, 3, 4]),
        "`answer:` and the prompt's words"
    );
    let paragraph = out["paragraph"].as_str().unwrap();
    for topic in ["actors", "leases", "fencing tokens"] {
        assert!(
            paragraph.contains(&format!("Explain {topic}")),
            "{paragraph}"
        );
    }
    assert!(
        out["paragraph"]
            .as_str()
            .unwrap()
            .starts_with("answer: Join into one paragraph:"),
        "{out}"
    );
}

/// While a step runs, its text reaches a watcher as deltas, coalesced (several chunks per
/// delta at most every 50 ms), live (before the step ends), and whole (they add up to the
/// answer). The journal keeps only the final text.
#[tokio::test]
async fn a_watcher_sees_the_text_as_it_comes() {
    use futures::StreamExt;
    let fake = FakeLlm::start(KEY).await;
    let mesh = mesh_with_llm(&fake, KEY).await;
    fake.knobs()
        .chunk_delay_ms
        .store(40, std::sync::atomic::Ordering::SeqCst);
    let client = mesh.client().await;
    let prompt = "one two three four five six seven eight nine ten";
    let goal = workflow_goal(
        &one_step(json!({ "model": "anthropic/streamer", "prompt": prompt })),
        json!({}),
    );
    let (run, events) = client.submit_and_watch(goal).await.unwrap();
    let mut events = Box::pin(events);
    let mut deltas: Vec<String> = Vec::new();
    let mut before_end = 0;
    let mut step_done = false;
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(event) = events.next().await {
            match event.unwrap() {
                mesh_agent_sdk::RunEvent::Delta {
                    step,
                    text,
                    restart,
                    ..
                } => {
                    assert_eq!(step.as_str(), "ask");
                    assert!(!restart);
                    deltas.push(text);
                    if !step_done {
                        before_end += 1;
                    }
                }
                mesh_agent_sdk::RunEvent::Step(s) if s.state.is_terminal() => step_done = true,
                mesh_agent_sdk::RunEvent::Finished { .. } => break,
                _ => {}
            }
        }
    })
    .await
    .expect("the run finishes");
    let answer = FakeLlm::answer_to(prompt);
    assert_eq!(deltas.concat(), answer, "the deltas add up to the answer");
    // 11 chunks 40 ms apart, coalesced every 50 ms: more than one delta, fewer than chunks.
    assert!(
        deltas.len() >= 2 && deltas.len() < 11,
        "coalesced: {deltas:?}"
    );
    assert_eq!(
        before_end,
        deltas.len(),
        "every delta came before the step ended"
    );
    let view = client.get_run(&run.run_id).await.unwrap();
    assert_eq!(output(&view)["text"], answer);
    // The journal holds the answer once (in the result), never a row per delta.
    let kinds: Vec<String> = mesh
        .journal(&run.run_id)
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(
        kinds,
        [
            "run_created",
            "step_started",
            "usage_recorded",
            "task_succeeded",
            "step_succeeded",
            "run_finished"
        ]
    );
}

/// A watcher who comes while a step streams gets the text so far first (one delta that
/// restarts the step's text), then the rest as it comes: the whole answer, from its beginning.
#[tokio::test]
async fn a_late_watcher_gets_the_text_so_far_then_the_rest() {
    use futures::StreamExt;
    use mesh_agent_sdk::RunEvent;
    let fake = FakeLlm::start(KEY).await;
    let mesh = mesh_with_llm(&fake, KEY).await;
    fake.knobs()
        .chunk_delay_ms
        .store(100, std::sync::atomic::Ordering::SeqCst);
    let client = mesh.client().await;
    let prompt = "one two three four five six seven eight nine ten";
    let goal = workflow_goal(
        &one_step(json!({ "model": "openai/late", "prompt": prompt })),
        json!({}),
    );
    let (run, early) = client.submit_and_watch(goal).await.unwrap();
    let mut early = Box::pin(early);
    // Wait for text to have been streamed, as an early watcher sees it.
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(event) = early.next().await {
            if matches!(event.unwrap(), RunEvent::Delta { .. }) {
                break;
            }
        }
    })
    .await
    .expect("text is streamed");
    let mut late = Box::pin(client.watch(&run.run_id).await.unwrap());
    let mut text = String::new();
    let mut first: Option<(String, bool)> = None;
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(event) = late.next().await {
            match event.unwrap() {
                RunEvent::Delta {
                    text: delta,
                    restart,
                    ..
                } => {
                    first.get_or_insert((delta.clone(), restart));
                    if restart {
                        text.clear();
                    }
                    text.push_str(&delta);
                }
                RunEvent::Finished { .. } => break,
                _ => {}
            }
        }
    })
    .await
    .expect("the run finishes");
    let answer = FakeLlm::answer_to(prompt);
    let (caught_up, restart) = first.expect("the late watcher got text");
    assert!(restart, "the text so far restarts the step's text");
    assert!(
        answer.starts_with(&caught_up) && caught_up.len() < answer.len(),
        "the text so far is the answer's beginning: {caught_up:?}"
    );
    assert_eq!(text, answer, "then the rest, nothing missing or twice");
}

/// `mesh goal submit --watch` prints a step's text as it comes.
#[tokio::test]
async fn the_cli_prints_the_text_as_it_comes() {
    let fake = FakeLlm::start(KEY).await;
    let mesh = mesh_with_llm(&fake, KEY).await;
    fake.knobs()
        .chunk_delay_ms
        .store(20, std::sync::atomic::Ordering::SeqCst);
    let file = mesh.dir.path().join("ask.json");
    std::fs::write(
        &file,
        one_step(json!({ "model": "gemini/cli", "prompt": "print me live" })),
    )
    .unwrap();
    let out = mesh_cli(
        &mesh,
        &["goal", "submit", file.to_str().unwrap(), "--watch"],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("step ask text  attempt 1  answer: print me live"),
        "{stderr}"
    );
}

/// Spends on every attempt (a priced model call it reports itself) and fails its first.
struct Spender;

impl mesh_agent_sdk::Agent for Spender {
    fn card(&self) -> mesh_agent_sdk::AgentCard {
        mesh_agent_sdk::AgentCard::new("spender").skill("spend")
    }

    async fn handle(
        &self,
        ctx: mesh_agent_sdk::Context,
        _input: Value,
    ) -> Result<Value, mesh_agent_sdk::AgentError> {
        let first = ctx.attempt() == 1;
        ctx.record_usage(mesh_agent_sdk::ModelUsage {
            provider: "openai".into(),
            model: "gpt-4o-mini".into(),
            calls: 1,
            input_tokens: if first { 100 } else { 10 },
            output_tokens: if first { 50 } else { 5 },
            cost_usd: Some(if first { 0.01 } else { 0.001 }),
        });
        if first {
            return Err(mesh_agent_sdk::AgentError::retryable(
                "bad_answer",
                "the model's answer did not parse",
            ));
        }
        Ok(json!("spent"))
    }
}

/// Usage and cost are journaled with every result, failed attempts included, summed exactly
/// per step and per run, kept across a coordinator kill -9, shown by `mesh run get`, and
/// counted on the node's `/metrics`.
#[tokio::test]
async fn usage_and_cost_are_summed_per_step_and_run_and_survive_a_restart() {
    let fake = FakeLlm::start(KEY).await;
    let mut mesh = Mesh::start(Timings::default()).await;
    let metrics_port = mesh_tests::free_port();
    mesh.start_node_with("n1", &llm_node(&fake, KEY), Some(metrics_port))
        .await;
    let node = mesh_agent_sdk::NodeRuntime::builder()
        .coordinator(mesh.url())
        .name("spender-node")
        .agent(Spender)
        .build()
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let spender = tokio::spawn(node.run_until(async move {
        let _ = stopped.await;
    }));
    let text = r#"
steps:
  - id: one
    uses: llm
    with: { model: openai/gpt-4o-mini, prompt: "a b c" }
  - id: many
    uses: llm
    foreach: '${{ ["x", "y"] }}'
    with: { model: ollama/unpriced, prompt: "${{ item }} z" }
  - id: spend
    uses: spend
    retry: { max_attempts: 2, backoff: 100ms }
"#;
    let client = mesh.client().await;
    mesh_tests::wait_for("the spender", Duration::from_secs(10), || async {
        let agents = client.agents(Some("spend")).await.ok()?;
        (!agents.is_empty()).then_some(())
    })
    .await;
    let view = submit_and_finish(&client, text, json!({})).await;
    assert_eq!(view.state, RunState::Succeeded, "{view:?}");
    let step = |id: &str| {
        view.steps
            .iter()
            .find(|s| s.id.as_str() == id)
            .unwrap()
            .usage
    };
    let one_cost = 3.0 * 1.5e-6 + 4.0 * 6.0e-6;
    let one = step("one");
    assert_eq!(
        (
            one.calls,
            one.input_tokens,
            one.output_tokens,
            one.unpriced_calls
        ),
        (1, 3, 4, 0)
    );
    assert!((one.cost_usd - one_cost).abs() < 1e-12);
    let many = step("many");
    assert_eq!(
        (
            many.calls,
            many.input_tokens,
            many.output_tokens,
            many.unpriced_calls
        ),
        (2, 4, 6, 2),
        "an unpriced model's calls are counted, their cost unknown"
    );
    assert_eq!(many.cost_usd, 0.0);
    let spend = step("spend");
    assert_eq!(
        (spend.calls, spend.input_tokens, spend.output_tokens),
        (2, 110, 55),
        "the failed attempt's call counts too"
    );
    assert!((spend.cost_usd - 0.011).abs() < 1e-12);
    let total = view.usage;
    assert_eq!(
        (
            total.calls,
            total.input_tokens,
            total.output_tokens,
            total.unpriced_calls
        ),
        (5, 117, 65, 2)
    );
    assert!((total.cost_usd - (0.011 + one_cost)).abs() < 1e-12);

    // Kept across a coordinator kill -9: the journal holds it.
    mesh.coordinator.as_mut().unwrap().kill9();
    mesh.start_coordinator().await;
    let client = mesh.client().await;
    let again = client.get_run(&view.run_id).await.unwrap();
    assert_eq!(again.usage, view.usage);
    assert_eq!(
        again.steps.iter().map(|s| s.usage).collect::<Vec<_>>(),
        view.steps.iter().map(|s| s.usage).collect::<Vec<_>>()
    );

    let out = std::process::Command::new(mesh_tests::mesh_bin())
        .args([
            "--coordinator",
            &mesh.url(),
            "run",
            "get",
            view.run_id.as_str(),
        ])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table
            .contains("usage    5 model calls, 117 tokens in, 65 out, cost $0.011029 + 2 unpriced"),
        "{table}"
    );
    assert_eq!(
        mesh_tests::metric_at(metrics_port, "mesh_llm_calls_total"),
        3.0
    );
    assert_eq!(
        mesh_tests::metric_at(metrics_port, "mesh_llm_tokens_total"),
        17.0
    );
    let _ = stop.send(());
    spender.await.unwrap().unwrap();
}

/// A node's rate limit makes calls wait their turn (here Ollama at 600 a minute, one at a
/// time: a call every 100 ms) and none fails, though four are asked for at once.
#[tokio::test]
async fn a_rate_limit_on_the_node_makes_calls_wait_and_none_fail() {
    let fake = FakeLlm::start(KEY).await;
    let mut mesh = Mesh::start(Timings::default()).await;
    let config = format!(
        "{}\n[llm.limits.ollama]\nrequests_per_minute = 600\nburst = 1\n",
        llm_node(&fake, KEY)
    );
    mesh.start_node("n1", &config).await;
    let text = r#"
steps:
  - id: many
    uses: llm
    foreach: '${{ ["a", "b", "c", "d"] }}'
    parallel: 4
    with: { model: ollama/paced, prompt: "${{ item }}" }
"#;
    let client = mesh.client().await;
    let view = submit_and_finish(&client, text, json!({})).await;
    assert_eq!(view.state, RunState::Succeeded, "{view:?}");
    assert_eq!(view.steps[0].attempt, 1, "no attempt failed");
    let mut times: Vec<_> = fake.seen().iter().map(|s| s.at).collect();
    times.sort();
    assert_eq!(times.len(), 4, "one call each");
    for pair in times.windows(2) {
        assert!(
            pair[1] - pair[0] >= Duration::from_millis(80),
            "paced: {:?}",
            pair[1] - pair[0]
        );
    }
}

/// The `max_tokens` of each request the fake received, in order.
fn sent_max_tokens(fake: &FakeLlm) -> Vec<Value> {
    fake.seen()
        .iter()
        .map(|s| s.body["max_tokens"].clone())
        .collect()
}

/// A budget stops a loop at the call that would exceed it: each call's `max_tokens` is capped
/// by what is left, the run fails naming the budget and the spend, and nothing more is sent.
#[tokio::test]
async fn a_budget_stops_a_loop_at_the_step_that_would_exceed_it() {
    let fake = FakeLlm::start(KEY).await;
    let mesh = mesh_with_llm(&fake, KEY).await;
    let text = r#"
budget: { max_tokens: 20 }
steps:
  - id: think
    uses: llm
    with: { model: anthropic/thinker, prompt: "a b c", max_tokens: 100 }
    loop: { until: "${{ output.text == 'never' }}", max_iterations: 10 }
"#;
    let client = mesh.client().await;
    let view = submit_and_finish(&client, text, json!({})).await;
    assert_eq!(view.state, RunState::Failed, "{view:?}");
    let error = view.steps[0].error.clone().unwrap_or_default();
    assert!(
        error.contains("budget: the run has used 21 tokens, its max_tokens is 20"),
        "{error}"
    );
    // Each call: 3 tokens in, 4 out. The fourth would start at 21 of 20: never sent.
    let sent = sent_max_tokens(&fake);
    assert_eq!(
        sent,
        [json!(20), json!(13), json!(6)],
        "capped by what is left"
    );
    assert_eq!(view.usage.input_tokens + view.usage.output_tokens, 21);
    // A bad budget is refused at submission, naming the field.
    let bad = "budget: { max_cost_usd: -1 }\nsteps:\n  - { id: a, uses: llm, with: { model: ollama/x, prompt: p } }\n";
    let err = client
        .submit(workflow_goal(bad, json!({})))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("budget.max_cost_usd: must be a number of USD above 0"),
        "{err}"
    );
}

/// A text goal planned by a model: the `llm_planner` agent asks for a workflow, checks it as
/// the coordinator will, asks again once with the problems when it is invalid, and the
/// corrected workflow runs.
#[tokio::test]
async fn a_text_goal_is_planned_by_a_model_asked_again_once_with_the_errors() {
    let fake = FakeLlm::start(KEY).await;
    let mut mesh = Mesh::start(Timings::default()).await;
    let config = format!(
        "{}\n[[agents]]\nkind = \"llm_planner\"\nmodels = [\"openai/planner\"]\n[[agents]]\nkind = \"echo\"\n",
        llm_node(&fake, KEY)
    );
    mesh.start_node("n1", &config).await;
    {
        let mut answers = fake.knobs().answers.lock().unwrap();
        answers.push_back("Here is a plan: first research, then write.".into());
        answers.push_back(
            "```json\n{\"steps\": [{\"id\": \"note\", \"uses\": \"echo\", \"with\": {\"text\": \"planned\"}}]}\n```"
                .into(),
        );
    }
    let client = mesh.client().await;
    let goal = mesh_agent_sdk::GoalSpec {
        objective: "write a note about fencing tokens".into(),
        inputs: json!({}),
        steps: Vec::new(),
        workflow: None,
        workflow_ref: None,
        idempotency_key: None,
        budget: None,
        namespace: Default::default(),
    };
    let run = client.submit(goal).await.unwrap();
    let view = finish(&client, &run.run_id).await;
    assert_eq!(view.state, RunState::Succeeded, "{view:?}");
    let note = view
        .steps
        .iter()
        .find(|s| s.id.as_str() == "note")
        .expect("the planned step");
    assert_eq!(note.output.as_ref().unwrap()["with"]["text"], "planned");
    let seen = fake.seen();
    assert_eq!(seen.len(), 2, "asked again once");
    let retry = seen[1].body.to_string();
    assert!(retry.contains("That workflow is invalid"), "{retry}");
    let planner = view
        .steps
        .iter()
        .find(|s| s.id.as_str() == "planner")
        .unwrap();
    assert_eq!(planner.usage.calls, 2, "both calls counted");
}

/// With `response_schema` the answer is parsed and checked; an invalid one is asked again once
/// with what is wrong, and comes back as `json`; still invalid fails for good naming the path.
#[tokio::test]
async fn a_response_schema_is_checked_and_asked_again_once() {
    let fake = FakeLlm::start(KEY).await;
    let mesh = mesh_with_llm(&fake, KEY).await;
    let schema = json!({
        "type": "object",
        "required": ["score"],
        "properties": { "score": { "type": "integer" } }
    });
    {
        let mut answers = fake.knobs().answers.lock().unwrap();
        answers.push_back("Nine out of ten.".into());
        answers.push_back("{\"score\": 9}".into());
    }
    let view = run(
        &mesh,
        json!({ "model": "openai/judge", "prompt": "score it", "response_schema": schema }),
    )
    .await;
    assert_eq!(view.state, RunState::Succeeded, "{view:?}");
    assert_eq!(output(&view)["json"], json!({ "score": 9 }));
    assert_eq!(view.steps[0].usage.calls, 2, "both calls counted");
    let seen = fake.seen();
    assert!(
        seen[0]
            .body
            .to_string()
            .contains("matching this JSON Schema")
    );
    assert!(seen[1].body.to_string().contains("That answer is invalid"));

    {
        let mut answers = fake.knobs().answers.lock().unwrap();
        answers.push_back("{\"score\": \"high\"}".into());
        answers.push_back("{\"score\": \"higher\"}".into());
    }
    let view = run(
        &mesh,
        json!({ "model": "openai/judge", "prompt": "score it", "response_schema": schema }),
    )
    .await;
    assert_eq!(view.state, RunState::Failed, "{view:?}");
    let error = view.steps[0].error.clone().unwrap_or_default();
    assert!(
        error.contains("json.score: \"higher\" is not of type"),
        "{error}"
    );
    assert_eq!(view.steps[0].attempt, 1, "not retried");
}

/// Runs the `mesh` CLI against `mesh`.
async fn mesh_cli(mesh: &Mesh, args: &[&str]) -> std::process::Output {
    let mut all = vec!["--coordinator".to_owned(), mesh.url()];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    let run = move || {
        std::process::Command::new(mesh_tests::mesh_bin())
            .args(&all)
            .output()
            .unwrap()
    };
    tokio::task::spawn_blocking(run).await.unwrap()
}

/// Runs the `mesh` CLI against `mesh` and returns its stdout; panics when it fails.
async fn cli(mesh: &Mesh, args: &[&str]) -> String {
    let out = mesh_cli(mesh, args).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A goal's own budget, given on the command line with `on_exceed: park`: the loop is held
/// at the call that would exceed it, the run keeps running and says why; `mesh run budget`
/// raises it (journaled, shown by `mesh run get`) and the loop goes on from the iteration
/// it stopped at, with each call capped by what is left.
#[tokio::test]
async fn a_parked_budget_goes_on_once_raised_from_the_cli() {
    let fake = FakeLlm::start(KEY).await;
    let mesh = mesh_with_llm(&fake, KEY).await;
    let file = mesh.dir.path().join("loop.yaml");
    std::fs::write(
        &file,
        r#"
steps:
  - id: think
    uses: llm
    with: { model: anthropic/thinker, prompt: "a b c", max_tokens: 100 }
    loop: { until: "${{ iteration >= 3 }}", max_iterations: 5 }
"#,
    )
    .unwrap();
    let file = file.to_str().unwrap();
    let submitted = cli(
        &mesh,
        &[
            "goal",
            "submit",
            file,
            "--max-tokens",
            "10",
            "--on-exceed",
            "park",
        ],
    )
    .await;
    let run_id = mesh_agent_sdk::RunId(submitted.trim().to_owned());
    let client = mesh.client().await;
    // Each call: 3 tokens in, 4 out. The third would start at 14 of 10: held.
    let parked = mesh_tests::wait_for(
        "the step parked at the budget",
        Duration::from_secs(30),
        || async {
            let view = client.get_run(&run_id).await.ok()?;
            (view.steps[0].state == mesh_agent_sdk::StepState::Parked).then_some(view)
        },
    )
    .await;
    assert_eq!(parked.state, RunState::Running, "{parked:?}");
    let error = parked.steps[0].error.clone().unwrap_or_default();
    assert!(
        error.contains("budget: the run has used 14 tokens, its max_tokens is 10"),
        "{error}"
    );
    assert_eq!(fake.seen().len(), 2, "nothing sent past the budget");

    // A raise that lowers a limit is refused, naming the field.
    let lower = mesh_cli(&mesh, &["run", "budget", &run_id.0, "--max-tokens", "5"]).await;
    assert!(!lower.status.success());
    let stderr = String::from_utf8_lossy(&lower.stderr);
    assert!(
        stderr.contains("budget.max_tokens: 5 is below the run's 10"),
        "{stderr}"
    );

    let shown = cli(
        &mesh,
        &[
            "run",
            "budget",
            &run_id.0,
            "--max-tokens",
            "100",
            "--comment",
            "worth it",
        ],
    )
    .await;
    assert!(
        shown.contains("budget   100 tokens, on_exceed park"),
        "{shown}"
    );
    let view = finish(&client, &run_id).await;
    assert_eq!(view.state, RunState::Succeeded, "{view:?}");
    let sent = sent_max_tokens(&fake);
    assert_eq!(
        sent,
        [json!(10), json!(3), json!(86), json!(79)],
        "four iterations in all, each capped by what was left"
    );
    assert_eq!(view.usage.input_tokens + view.usage.output_tokens, 28);
    // The raise is in the journal, with its comment, and the step resumed after it.
    let kinds: Vec<(String, Value)> = mesh
        .journal(&run_id)
        .into_iter()
        .filter(|(k, _)| k.starts_with("budget") || k.starts_with("step_resumed"))
        .collect();
    assert_eq!(kinds.len(), 2, "{kinds:?}");
    assert_eq!(kinds[0].0, "budget_raised");
    assert_eq!(kinds[0].1["budget"]["max_tokens"], 100);
    assert_eq!(kinds[0].1["comment"], "worth it");
    assert_eq!(kinds[1].0, "step_resumed");
}

/// The draft → critique example: a model drafts, then judges and rewrites until the score
/// reaches the bar, each judgement checked against its `response_schema`, under the
/// example's budget.
#[tokio::test]
async fn the_draft_critique_example_loops_until_the_judge_is_satisfied() {
    let fake = FakeLlm::start(KEY).await;
    let mesh = mesh_with_llm(&fake, KEY).await;
    fake.knobs().answers.lock().unwrap().extend([
        "A first draft.".to_owned(),
        json!({ "score": 5, "critique": "too vague", "draft": "A sharper draft." }).to_string(),
        json!({ "score": 9, "critique": "good", "draft": "The final draft." }).to_string(),
    ]);
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/workflows/llm-draft-critique.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let client = mesh.client().await;
    let inputs = json!({ "model": "ollama/judge", "topic": "leases" });
    let view = submit_and_finish(&client, &text, inputs).await;
    assert_eq!(view.state, RunState::Succeeded, "{view:?}");
    let out = view.output.clone().unwrap();
    assert_eq!(out["text"], "The final draft.");
    assert_eq!(out["score"], 9);
    let prompts: Vec<String> = fake
        .seen()
        .iter()
        .map(|s| s.body["messages"].to_string())
        .collect();
    assert_eq!(prompts.len(), 3, "a draft and two rounds");
    assert!(
        prompts[0].contains("Write a paragraph about leases."),
        "{prompts:?}"
    );
    assert!(prompts[1].contains("A first draft."), "{prompts:?}");
    assert!(prompts[2].contains("A sharper draft."), "{prompts:?}");
    assert_eq!(view.usage.calls, 3);
    let budget = view.budget.expect("the example's budget");
    assert_eq!(budget.max_tokens, Some(6000));
    assert_eq!(budget.on_exceed, mesh_agent_sdk::OnExceed::Park);
}
