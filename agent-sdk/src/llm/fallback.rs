//! A fallback chain: models tried in order. A model that rate-limits is retried (honouring
//! `retry-after`, capped) a few times before the next is tried; one that is unavailable, times
//! out or overflows its context gives way at once; a bad request or a rejected key stops the
//! chain, since the next model would be asked the same wrong thing or the operator must act.

use std::fmt;
use std::time::Duration;

use futures::StreamExt;

use super::{ChatEvent, ChatModel, ChatReply, ChatRequest, LlmError, ModelRef};

/// How long to keep asking one model that rate-limits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Retries of one model after a 429 before the next model is tried.
    pub rate_limit_retries: u32,
    /// The wait when the provider gives no `retry-after`; doubled at each retry.
    pub backoff: Duration,
    /// No wait is longer than this, whatever `retry-after` says.
    pub max_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            rate_limit_retries: 2,
            backoff: Duration::from_millis(500),
            max_wait: Duration::from_secs(30),
        }
    }
}

/// A model of the chain that did not answer, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Attempted {
    pub model: ModelRef,
    pub error: LlmError,
    /// 429s answered by this model (each one waited for, up to the policy's retries).
    pub rate_limited: u32,
}

/// The answer, with the models that failed before it.
#[derive(Clone, Debug, PartialEq)]
pub struct Fallen {
    pub reply: ChatReply,
    pub earlier: Vec<Attempted>,
    /// 429s met on the model that answered.
    pub rate_limited: u32,
}

/// Every model failed, or one failed in a way that stops the chain.
#[derive(Clone, Debug, PartialEq)]
pub struct FallbackError {
    pub attempts: Vec<Attempted>,
}

impl FallbackError {
    /// The error that ended the chain.
    pub fn last(&self) -> Option<&LlmError> {
        self.attempts.last().map(|a| &a.error)
    }
}

impl fmt::Display for FallbackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.attempts.iter().map(|a| a.error.to_string()).collect();
        f.write_str(&parts.join("; then "))
    }
}

impl std::error::Error for FallbackError {}

/// What the caller hears while the chain runs.
#[derive(Clone, Debug, PartialEq)]
pub enum Streamed {
    /// Text of the model being asked.
    Delta(String),
    /// That model failed after some text: what it said is void, `to` is asked next.
    Restart { to: ModelRef, reason: String },
}

/// Asks `chain` in order (see the module's rules); `on` hears the deltas as they come.
pub async fn chat_with_fallback(
    models: &dyn ChatModel,
    chain: &[ModelRef],
    request: &ChatRequest,
    policy: RetryPolicy,
    on: &mut (dyn FnMut(Streamed) + Send),
) -> Result<Fallen, FallbackError> {
    let mut earlier: Vec<Attempted> = Vec::new();
    let mut spoke = false;
    for (i, model) in chain.iter().enumerate() {
        if spoke && let Some(prev) = earlier.last() {
            on(Streamed::Restart {
                to: model.clone(),
                reason: prev.error.to_string(),
            });
        }
        let mut rate_limited = 0u32;
        let error = loop {
            let mut stream = models.chat_stream(model, request);
            let mut failed = None;
            while let Some(event) = stream.next().await {
                match event {
                    Ok(ChatEvent::Delta(text)) => {
                        spoke = true;
                        on(Streamed::Delta(text));
                    }
                    Ok(ChatEvent::Done(reply)) => {
                        return Ok(Fallen {
                            reply,
                            earlier,
                            rate_limited,
                        });
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            let e = failed.unwrap_or_else(|| LlmError::Unavailable {
                model: model.to_string(),
                message: "the stream ended without an answer".into(),
            });
            if let LlmError::RateLimited { .. } = e {
                metrics::counter!(crate::metrics::LLM_RATE_LIMITED, "provider" => model.provider.as_str())
                    .increment(1);
            }
            match &e {
                LlmError::RateLimited { retry_after, .. }
                    if rate_limited < policy.rate_limit_retries =>
                {
                    let backoff = policy.backoff.saturating_mul(1 << rate_limited.min(16));
                    let wait = retry_after.unwrap_or(backoff).min(policy.max_wait);
                    rate_limited += 1;
                    tokio::time::sleep(wait).await;
                }
                _ => break e,
            }
        };
        let stops = !error.falls_back();
        earlier.push(Attempted {
            model: model.clone(),
            error,
            rate_limited,
        });
        if stops || i + 1 == chain.len() {
            break;
        }
    }
    Err(FallbackError { attempts: earlier })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::{ChatStream, Provider, Usage};
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// Answers from a script per model: each call takes the next outcome.
    struct Scripted(Mutex<HashMap<String, Vec<Result<&'static str, LlmError>>>>);

    impl ChatModel for Scripted {
        fn chat_stream(&self, model: &ModelRef, _request: &ChatRequest) -> ChatStream {
            let next = self
                .0
                .lock()
                .unwrap()
                .get_mut(&model.to_string())
                .map(|script| script.remove(0))
                .expect("scripted");
            let model = model.clone();
            let events: Vec<Result<ChatEvent, LlmError>> = match next {
                Ok(text) => vec![
                    Ok(ChatEvent::Delta(text.to_owned())),
                    Ok(ChatEvent::Done(ChatReply {
                        model,
                        text: text.to_owned(),
                        usage: Some(Usage {
                            input_tokens: 1,
                            output_tokens: 1,
                        }),
                        finish_reason: "stop".into(),
                        tool_calls: Vec::new(),
                    })),
                ],
                Err(e) => vec![Ok(ChatEvent::Delta("par".into())), Err(e)],
            };
            futures::stream::iter(events).boxed()
        }
    }

    fn m(name: &str) -> ModelRef {
        ModelRef {
            provider: Provider::Ollama,
            model: name.into(),
        }
    }

    fn limited() -> LlmError {
        LlmError::RateLimited {
            model: "x".into(),
            retry_after: Some(Duration::from_secs(3600)),
            message: "slow down".into(),
        }
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            rate_limit_retries: 2,
            backoff: Duration::from_millis(1),
            max_wait: Duration::from_millis(5),
        }
    }

    #[tokio::test]
    async fn rate_limits_are_retried_capped_then_the_next_model_answers() {
        let script = HashMap::from([
            (
                "ollama/a".to_owned(),
                vec![Err(limited()), Err(limited()), Err(limited())],
            ),
            ("ollama/b".to_owned(), vec![Ok("hello")]),
        ]);
        let models = Scripted(Mutex::new(script));
        let mut heard = Vec::new();
        let started = std::time::Instant::now();
        let fallen = chat_with_fallback(
            &models,
            &[m("a"), m("b")],
            &ChatRequest::default(),
            policy(),
            &mut |s| heard.push(s),
        )
        .await
        .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "retry-after was capped"
        );
        assert_eq!(fallen.reply.text, "hello");
        assert_eq!(fallen.reply.model, m("b"));
        assert_eq!(fallen.earlier.len(), 1);
        assert_eq!(fallen.earlier[0].model, m("a"));
        assert_eq!(fallen.earlier[0].rate_limited, 2);
        assert_eq!(fallen.earlier[0].error.code(), "rate_limited");
        assert!(heard.contains(&Streamed::Delta("hello".into())));
        assert!(
            heard
                .iter()
                .any(|s| matches!(s, Streamed::Restart { to, .. } if *to == m("b"))),
            "watchers learn that the text so far is void: {heard:?}"
        );
    }

    /// Asks the chain `ollama/a`, `ollama/b` with `script`, hearing nothing.
    async fn chain_of_a_and_b(
        script: HashMap<String, Vec<Result<&'static str, LlmError>>>,
    ) -> (Scripted, Result<Fallen, FallbackError>) {
        let models = Scripted(Mutex::new(script));
        let outcome = chat_with_fallback(
            &models,
            &[m("a"), m("b")],
            &ChatRequest::default(),
            policy(),
            &mut |_| {},
        )
        .await;
        (models, outcome)
    }

    #[tokio::test]
    async fn a_bad_request_stops_the_chain() {
        let bad = LlmError::BadRequest {
            model: "ollama/a".into(),
            message: "unknown field".into(),
        };
        let script = HashMap::from([
            ("ollama/a".to_owned(), vec![Err(bad.clone())]),
            ("ollama/b".to_owned(), vec![Ok("never")]),
        ]);
        let (models, outcome) = chain_of_a_and_b(script).await;
        let err = outcome.unwrap_err();
        assert_eq!(err.attempts.len(), 1);
        assert_eq!(err.last(), Some(&bad));
        assert_eq!(
            models.0.lock().unwrap()["ollama/b"].len(),
            1,
            "b never asked"
        );
    }

    #[tokio::test]
    async fn when_every_model_fails_each_reason_is_given() {
        let down = |n: &str| LlmError::Unavailable {
            model: n.into(),
            message: "500".into(),
        };
        let script = HashMap::from([
            ("ollama/a".to_owned(), vec![Err(down("ollama/a"))]),
            ("ollama/b".to_owned(), vec![Err(down("ollama/b"))]),
        ]);
        let (_, outcome) = chain_of_a_and_b(script).await;
        let err = outcome.unwrap_err();
        assert_eq!(
            err.to_string(),
            "ollama/a is unavailable: 500; then ollama/b is unavailable: 500"
        );
    }
}
