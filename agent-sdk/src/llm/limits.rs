//! Rate limits that wait: requests and tokens per minute per provider (and optionally per
//! model), on `governor`'s limiters. A call over a limit waits its turn, within its own time
//! limit, instead of failing; one that would wait longer fails as a timeout, which a fallback
//! chain moves past.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Deserialize;

use super::{ChatModel, ChatRequest, ChatStream, LlmError, ModelRef, Provider};
use crate::metrics as m;

/// A limit as configuration gives it, for a provider (`openai`) or a model (`openai/gpt-4o`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimit {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    /// Requests (and the same share of tokens) that may go at once before the pace applies;
    /// a whole minute's worth when absent.
    pub burst: Option<u32>,
}

/// The limiters of one provider or model.
struct Limiters {
    requests: Option<DefaultDirectRateLimiter>,
    tokens: Option<(DefaultDirectRateLimiter, NonZeroU32)>,
}

fn quota(per_minute: NonZeroU32, burst: Option<u32>) -> Quota {
    let quota = Quota::per_minute(per_minute);
    match burst.and_then(NonZeroU32::new) {
        Some(b) => quota.allow_burst(b.min(per_minute)),
        None => quota,
    }
}

impl Limiters {
    fn new(limit: RateLimit) -> Limiters {
        let rpm = limit.requests_per_minute.and_then(NonZeroU32::new);
        let tpm = limit.tokens_per_minute.and_then(NonZeroU32::new);
        let token_burst = match (limit.burst, rpm, tpm) {
            (Some(b), Some(r), Some(t)) => {
                Some((u64::from(t.get()) * u64::from(b) / u64::from(r.get())).max(1) as u32)
            }
            _ => None,
        };
        Limiters {
            requests: rpm.map(|r| RateLimiter::direct(quota(r, limit.burst))),
            tokens: tpm.map(|t| {
                let q = quota(t, token_burst);
                (RateLimiter::direct(q), q.burst_size())
            }),
        }
    }

    async fn wait(&self, tokens: u32) {
        if let Some(r) = &self.requests {
            r.until_ready().await;
        }
        if let Some((t, capacity)) = &self.tokens {
            // A call larger than the bucket waits for a full bucket.
            let n = NonZeroU32::new(tokens.max(1)).unwrap_or(NonZeroU32::MIN);
            let _ = t.until_n_ready(n.min(*capacity)).await;
        }
    }
}

/// Checks a limit's name (`provider` or `provider/model`) and numbers.
pub fn check_limit(name: &str, limit: &RateLimit) -> Result<(), String> {
    if Provider::parse(name).is_none() {
        ModelRef::parse(name).map_err(|e| format!("`{name}`: {e}"))?;
    }
    if limit.requests_per_minute.is_none() && limit.tokens_per_minute.is_none() {
        return Err(format!(
            "`{name}`: give requests_per_minute, tokens_per_minute or both"
        ));
    }
    for (field, v) in [
        ("requests_per_minute", limit.requests_per_minute),
        ("tokens_per_minute", limit.tokens_per_minute),
        ("burst", limit.burst),
    ] {
        if v == Some(0) {
            return Err(format!("`{name}`.{field}: must be at least 1"));
        }
    }
    Ok(())
}

/// A [`ChatModel`] whose calls wait for their provider's and model's limits.
pub struct Limited {
    inner: Arc<dyn ChatModel>,
    limits: HashMap<String, Arc<Limiters>>,
}

impl Limited {
    /// `limits` by provider (`openai`) or model (`openai/gpt-4o`); both apply to a call.
    pub fn new(inner: Arc<dyn ChatModel>, limits: &HashMap<String, RateLimit>) -> Limited {
        Limited {
            inner,
            limits: limits
                .iter()
                .map(|(k, v)| (k.clone(), Arc::new(Limiters::new(*v))))
                .collect(),
        }
    }
}

/// Tokens a call may use, guessed before it is made: its text at four characters a token,
/// plus the answer it may get.
fn estimate(request: &ChatRequest) -> u32 {
    let chars: usize = request.messages.iter().map(|m| m.text.len()).sum::<usize>()
        + request.system.as_ref().map_or(0, String::len);
    let answer = request.max_tokens.unwrap_or(256);
    (chars / 4)
        .saturating_add(answer as usize)
        .min(u32::MAX as usize) as u32
}

impl ChatModel for Limited {
    fn chat_stream(&self, model: &ModelRef, request: &ChatRequest) -> ChatStream {
        let applying: Vec<Arc<Limiters>> = [model.provider.as_str().to_owned(), model.to_string()]
            .iter()
            .filter_map(|k| self.limits.get(k).cloned())
            .collect();
        if applying.is_empty() {
            return self.inner.chat_stream(model, request);
        }
        let (inner, model, request) = (self.inner.clone(), model.clone(), request.clone());
        let tokens = estimate(&request);
        let started = async move {
            let limit = request.timeout.unwrap_or(Duration::from_secs(300));
            let began = tokio::time::Instant::now();
            let waited = tokio::time::timeout(limit, async {
                for l in &applying {
                    l.wait(tokens).await;
                }
            })
            .await;
            metrics::histogram!(m::LLM_LIMIT_WAIT, "provider" => model.provider.as_str())
                .record(began.elapsed().as_secs_f64());
            match waited {
                Ok(()) => {
                    let request = ChatRequest {
                        timeout: Some(limit.saturating_sub(began.elapsed())),
                        ..request
                    };
                    inner.chat_stream(&model, &request)
                }
                Err(_) => {
                    let e = LlmError::Timeout {
                        model: format!("{model} (waiting for its rate limit)"),
                        after: limit,
                    };
                    futures::stream::once(async move { Err(e) }).boxed()
                }
            }
        };
        futures::stream::once(started).flatten().boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::{ChatEvent, ChatReply, Message};
    use std::sync::Mutex;
    use std::time::Instant;

    /// Answers at once, noting when each call started.
    struct Clock(Mutex<Vec<Instant>>);

    impl ChatModel for Clock {
        fn chat_stream(&self, model: &ModelRef, _request: &ChatRequest) -> ChatStream {
            self.0.lock().unwrap().push(Instant::now());
            let reply = ChatReply {
                model: model.clone(),
                text: "ok".into(),
                usage: None,
                finish_reason: "stop".into(),
                tool_calls: Vec::new(),
            };
            futures::stream::iter([Ok(ChatEvent::Done(reply))]).boxed()
        }
    }

    fn request() -> ChatRequest {
        ChatRequest {
            messages: vec![Message::user("hello")],
            timeout: Some(Duration::from_secs(10)),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn calls_over_a_limit_wait_their_turn_and_none_fails() {
        let clock = Arc::new(Clock(Mutex::new(Vec::new())));
        // 600 a minute, one at a time: a call every 100 ms.
        let limit = RateLimit {
            requests_per_minute: Some(600),
            tokens_per_minute: None,
            burst: Some(1),
        };
        let limited = Limited::new(clock.clone(), &HashMap::from([("ollama".into(), limit)]));
        let model = ModelRef::parse("ollama/x").unwrap();
        let req = request();
        let calls = (0..4).map(|_| limited.chat(&model, &req));
        for r in futures::future::join_all(calls).await {
            assert_eq!(r.unwrap().text, "ok");
        }
        let times = clock.0.lock().unwrap().clone();
        let span = *times.iter().max().unwrap() - *times.iter().min().unwrap();
        assert!(span >= Duration::from_millis(280), "paced: {span:?}");
        // Another provider is not held up.
        let other = ModelRef::parse("openai/y").unwrap();
        let started = Instant::now();
        limited.chat(&other, &request()).await.unwrap();
        assert!(started.elapsed() < Duration::from_millis(50));
    }

    #[tokio::test]
    async fn a_wait_longer_than_the_call_may_take_is_a_timeout() {
        let clock = Arc::new(Clock(Mutex::new(Vec::new())));
        let limit = RateLimit {
            requests_per_minute: Some(1),
            tokens_per_minute: None,
            burst: Some(1),
        };
        let limited = Limited::new(clock, &HashMap::from([("ollama/x".into(), limit)]));
        let model = ModelRef::parse("ollama/x").unwrap();
        let short = ChatRequest {
            timeout: Some(Duration::from_millis(100)),
            ..request()
        };
        limited.chat(&model, &short).await.unwrap();
        let e = limited.chat(&model, &short).await.unwrap_err();
        assert_eq!(e.code(), "timeout");
        assert!(e.falls_back(), "a chain moves past it");
    }

    #[test]
    fn limits_are_checked_naming_what_is_wrong() {
        let ok = RateLimit {
            requests_per_minute: Some(60),
            ..Default::default()
        };
        assert!(check_limit("openai", &ok).is_ok());
        assert!(check_limit("openai/gpt-4o", &ok).is_ok());
        assert!(check_limit("azure", &ok).unwrap_err().contains("`azure`"));
        let none = RateLimit::default();
        assert!(
            check_limit("openai", &none)
                .unwrap_err()
                .contains("give requests_per_minute")
        );
        let zero = RateLimit {
            tokens_per_minute: Some(0),
            ..Default::default()
        };
        assert_eq!(
            check_limit("openai", &zero).unwrap_err(),
            "`openai`.tokens_per_minute: must be at least 1"
        );
    }
}
