//! Calling language models from an agent: a small trait of our own ([`ChatModel`]: a chat
//! call and a streaming chat call yielding text deltas, usage and the finish reason), one
//! implementation on the `genai` crate ([`Models`]) for OpenAI (and any OpenAI-compatible
//! server), Anthropic, Gemini and Ollama, a fallback chain ([`chat_with_fallback`]) and a
//! price table ([`pricing`]).
//!
//! A model is named `provider/model` (`openai/gpt-4o-mini`, `anthropic/claude-haiku-4-5`,
//! `gemini/gemini-2.0-flash`, `ollama/llama3.2`): switching provider is changing that one
//! string. Keys and addresses come from the environment variables the ecosystem already uses
//! (see [`LlmConfig::from_env`]), overridable per provider. A key is a [`Secret`]: it prints as
//! `***`, and every error message is scrubbed of it before it leaves this module.

mod fallback;
mod genai_models;
mod limits;
pub mod pricing;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

pub use fallback::{Attempted, FallbackError, Fallen, RetryPolicy, Streamed, chat_with_fallback};
pub use genai_models::{Models, install_crypto_provider};
pub use limits::{Limited, RateLimit, check_limit};
pub use pricing::{Price, Prices};

/// The providers the mesh speaks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// OpenAI, and any server that speaks its chat completions API (vLLM, llama.cpp's
    /// server, LM Studio, OpenRouter) through `OPENAI_BASE_URL` or `base_url`.
    OpenAi,
    Anthropic,
    Gemini,
    /// Ollama's native `/api/chat`.
    Ollama,
}

impl Provider {
    pub const ALL: [Provider; 4] = [
        Provider::OpenAi,
        Provider::Anthropic,
        Provider::Gemini,
        Provider::Ollama,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Provider::OpenAi => "openai",
            Provider::Anthropic => "anthropic",
            Provider::Gemini => "gemini",
            Provider::Ollama => "ollama",
        }
    }

    pub fn parse(name: &str) -> Option<Provider> {
        Provider::ALL.into_iter().find(|p| p.as_str() == name)
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `provider/model`: the provider, then the model's name as that provider knows it (which
/// may hold `/` itself, as OpenRouter's names do).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelRef {
    pub provider: Provider,
    pub model: String,
}

impl ModelRef {
    /// Parses `provider/model`, with an error that says what is expected.
    pub fn parse(text: &str) -> Result<ModelRef, String> {
        let names = Provider::ALL.map(Provider::as_str).join(", ");
        let Some((provider, model)) = text.split_once('/') else {
            return Err(format!(
                "`{text}` is not `provider/model` (providers: {names})"
            ));
        };
        let provider = Provider::parse(provider)
            .ok_or_else(|| format!("`{provider}` is not a provider (providers: {names})"))?;
        if model.is_empty() || model.len() > 256 || model.chars().any(char::is_control) {
            return Err(format!(
                "`{text}`: the model name must be 1 to 256 printable characters"
            ));
        }
        Ok(ModelRef {
            provider,
            model: model.to_owned(),
        })
    }
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.provider, self.model)
    }
}

/// A key or token: never printed, never in an error message.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `text` with every occurrence of the secret replaced by `***`.
    pub fn scrub(&self, text: &str) -> String {
        if self.0.len() < 4 {
            return text.to_owned();
        }
        text.replace(&self.0, "***")
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "***" })
    }
}

/// Where one provider is and how to authenticate to it.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderConfig {
    /// The API's base URL, ending with `/` (`https://api.openai.com/v1/`); the provider's own
    /// when absent.
    pub base_url: Option<String>,
    pub api_key: Option<Secret>,
}

/// The providers a node can reach.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LlmConfig {
    pub openai: ProviderConfig,
    pub anthropic: ProviderConfig,
    pub gemini: ProviderConfig,
    pub ollama: ProviderConfig,
}

impl LlmConfig {
    /// From the environment: `OPENAI_API_KEY`, `OPENAI_BASE_URL`, `ANTHROPIC_API_KEY`,
    /// `ANTHROPIC_BASE_URL`, `GEMINI_API_KEY`, `GEMINI_BASE_URL`, `OLLAMA_HOST`.
    pub fn from_env() -> LlmConfig {
        Self::from_vars(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    /// As [`from_env`](Self::from_env), reading variables through `var`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> LlmConfig {
        let slash = |url: String| {
            if url.ends_with('/') {
                url
            } else {
                format!("{url}/")
            }
        };
        let provider = |key: &str, base: &str| ProviderConfig {
            base_url: var(base).map(slash),
            api_key: var(key).map(Secret),
        };
        let ollama_base = var("OLLAMA_HOST").map(|host| {
            let host = if host.contains("://") {
                host
            } else {
                format!("http://{host}")
            };
            slash(host)
        });
        LlmConfig {
            openai: provider("OPENAI_API_KEY", "OPENAI_BASE_URL"),
            anthropic: provider("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL"),
            gemini: provider("GEMINI_API_KEY", "GEMINI_BASE_URL"),
            ollama: ProviderConfig {
                base_url: ollama_base,
                api_key: var("OLLAMA_API_KEY").map(Secret),
            },
        }
    }

    /// `self` with what `over` sets replacing it, provider by provider.
    pub fn overridden_by(mut self, over: &LlmConfig) -> LlmConfig {
        for p in Provider::ALL {
            let (mine, theirs) = (self.provider_mut(p), over.provider(p));
            if theirs.base_url.is_some() {
                mine.base_url.clone_from(&theirs.base_url);
            }
            if theirs.api_key.is_some() {
                mine.api_key.clone_from(&theirs.api_key);
            }
        }
        self
    }

    pub fn provider(&self, p: Provider) -> &ProviderConfig {
        match p {
            Provider::OpenAi => &self.openai,
            Provider::Anthropic => &self.anthropic,
            Provider::Gemini => &self.gemini,
            Provider::Ollama => &self.ollama,
        }
    }

    fn provider_mut(&mut self, p: Provider) -> &mut ProviderConfig {
        match p {
            Provider::OpenAi => &mut self.openai,
            Provider::Anthropic => &mut self.anthropic,
            Provider::Gemini => &mut self.gemini,
            Provider::Ollama => &mut self.ollama,
        }
    }

    /// The providers that can be called: a key given, or (Ollama) an address given.
    pub fn configured(&self) -> Vec<Provider> {
        Provider::ALL
            .into_iter()
            .filter(|&p| {
                let c = self.provider(p);
                match p {
                    Provider::Ollama => c.base_url.is_some(),
                    _ => c.api_key.as_ref().is_some_and(|k| !k.is_empty()),
                }
            })
            .collect()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Assistant,
    /// The result of a tool call, answering the assistant message that asked for it.
    Tool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub text: String,
    /// An assistant message's tool calls.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// A tool message's call: the id of the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl Message {
    pub fn user(text: impl Into<String>) -> Self {
        Message {
            role: Role::User,
            text: text.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }

    pub fn assistant(text: impl Into<String>) -> Self {
        Message {
            role: Role::Assistant,
            text: text.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }

    /// The assistant's turn that asked for `calls` (with any text it said alongside).
    pub fn assistant_calls(text: impl Into<String>, calls: Vec<ToolCall>) -> Self {
        Message {
            tool_calls: calls,
            ..Message::assistant(text)
        }
    }

    /// The result of the call `call_id`, as text (JSON, usually) for the model.
    pub fn tool_result(call_id: impl Into<String>, text: impl Into<String>) -> Self {
        Message {
            role: Role::Tool,
            text: text.into(),
            tool_calls: Vec::new(),
            tool_call_id: Some(call_id.into()),
        }
    }
}

/// A tool offered to the model: its name, what it does, and a JSON Schema of its arguments.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    pub parameters: serde_json::Value,
}

/// A call the model asked for: its id (to answer it), the tool and the arguments.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: serde_json::Value,
}

/// One chat call.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChatRequest {
    pub system: Option<String>,
    pub messages: Vec<Message>,
    /// Tools the model may call; its reply then may hold calls instead of (or beside) text.
    pub tools: Vec<ToolSpec>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f64>,
    /// Give up on the whole call (stream included) after this long.
    pub timeout: Option<Duration>,
    /// The key for this call instead of the node's (a namespace's secret, handed in the
    /// task: `api_key: ${{ secrets.OPENAI_API_KEY }}`).
    pub api_key: Option<Secret>,
}

/// Tokens a call used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

impl std::ops::AddAssign for Usage {
    fn add_assign(&mut self, other: Usage) {
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
    }
}

/// The answer of a call.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatReply {
    pub model: ModelRef,
    pub text: String,
    /// `None` when the provider did not report it.
    pub usage: Option<Usage>,
    /// `stop`, `length`, `tool_calls`, … as the provider said it (lowercase; a call for
    /// tools is `tool_calls` for every provider).
    pub finish_reason: String,
    /// The tools the model asked to call, in its order; empty when it answered.
    pub tool_calls: Vec<ToolCall>,
}

/// What a streaming call yields: text as it comes, then the whole reply.
#[derive(Clone, Debug, PartialEq)]
pub enum ChatEvent {
    Delta(String),
    Done(ChatReply),
}

/// Why a call failed; whether another model should be tried is [`LlmError::falls_back`].
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum LlmError {
    /// 429: the provider asked to slow down.
    #[error("rate limited by {model}{}: {message}", retry_after.map(|d| format!(" (retry after {} s)", d.as_secs())).unwrap_or_default())]
    RateLimited {
        model: String,
        retry_after: Option<Duration>,
        message: String,
    },
    /// 5xx, a refused connection, or a stream cut short.
    #[error("{model} is unavailable: {message}")]
    Unavailable { model: String, message: String },
    #[error("{model} did not answer within {after:?}")]
    Timeout { model: String, after: Duration },
    /// The prompt and the answer do not fit the model's context.
    #[error("{model}: the request exceeds the model's context length: {message}")]
    ContextLength { model: String, message: String },
    /// 400, 404, 422: the request is wrong for this model; another attempt would fail alike.
    #[error("{model} refused the request: {message}")]
    BadRequest { model: String, message: String },
    /// 401, 403: the key is missing or rejected.
    #[error("{model} refused the key: {message}")]
    Auth { model: String, message: String },
    /// The provider is not set up on this node.
    #[error("{0}")]
    NotConfigured(String),
}

impl LlmError {
    /// Whether the next model of a fallback chain should be tried: yes on rate limiting,
    /// unavailability, timeouts and context overflow; never on a bad request or a key.
    pub fn falls_back(&self) -> bool {
        matches!(
            self,
            LlmError::RateLimited { .. }
                | LlmError::Unavailable { .. }
                | LlmError::Timeout { .. }
                | LlmError::ContextLength { .. }
        )
    }

    /// A short machine-readable code (`rate_limited`, `unavailable`, …).
    pub fn code(&self) -> &'static str {
        match self {
            LlmError::RateLimited { .. } => "rate_limited",
            LlmError::Unavailable { .. } => "unavailable",
            LlmError::Timeout { .. } => "timeout",
            LlmError::ContextLength { .. } => "context_length",
            LlmError::BadRequest { .. } => "bad_request",
            LlmError::Auth { .. } => "auth",
            LlmError::NotConfigured(_) => "not_configured",
        }
    }
}

/// A stream of a call's events; the last item is `Done` or an error.
pub type ChatStream = BoxStream<'static, Result<ChatEvent, LlmError>>;

/// What the mesh asks of a model provider.
pub trait ChatModel: Send + Sync {
    /// Starts a streaming call: deltas as they come, then `Done` with the reply.
    fn chat_stream(&self, model: &ModelRef, request: &ChatRequest) -> ChatStream;

    /// A call whose answer comes whole.
    fn chat<'a>(
        &'a self,
        model: &'a ModelRef,
        request: &'a ChatRequest,
    ) -> BoxFuture<'a, Result<ChatReply, LlmError>> {
        Box::pin(async move {
            let mut stream = self.chat_stream(model, request);
            while let Some(event) = stream.next().await {
                if let ChatEvent::Done(reply) = event? {
                    return Ok(reply);
                }
            }
            Err(LlmError::Unavailable {
                model: model.to_string(),
                message: "the stream ended without an answer".into(),
            })
        })
    }
}

/// Coalesces a call's deltas so that watchers get text at a bounded rate: what comes in is
/// held until `every` has passed since the last flush (or `max_bytes` are held). Time is
/// passed in.
#[derive(Debug)]
pub struct DeltaBuffer {
    held: String,
    last: Option<std::time::Instant>,
    every: Duration,
    max_bytes: usize,
}

impl DeltaBuffer {
    pub fn new(every: Duration, max_bytes: usize) -> Self {
        DeltaBuffer {
            held: String::new(),
            last: None,
            every,
            max_bytes,
        }
    }

    /// Adds `text`; returns what to send now, if anything.
    pub fn push(&mut self, text: &str, now: std::time::Instant) -> Option<String> {
        self.held.push_str(text);
        let due = self
            .last
            .is_none_or(|last| now.saturating_duration_since(last) >= self.every);
        if (due || self.held.len() >= self.max_bytes) && !self.held.is_empty() {
            self.last = Some(now);
            return Some(std::mem::take(&mut self.held));
        }
        None
    }

    /// What is still held (at the end of a call).
    pub fn flush(&mut self) -> Option<String> {
        (!self.held.is_empty()).then(|| std::mem::take(&mut self.held))
    }

    /// Drops what is held (the call starts again on another model).
    pub fn clear(&mut self) {
        self.held.clear();
    }
}

/// Models named in configuration or input, parsed: `model: X` or `models: [X, Y]`.
pub fn parse_models(list: &[String]) -> Result<Vec<ModelRef>, String> {
    if list.is_empty() {
        return Err("name at least one model".into());
    }
    let mut seen = BTreeMap::new();
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let parsed = ModelRef::parse(m).map_err(|e| format!("[{i}]: {e}"))?;
            if let Some(first) = seen.insert(parsed.clone(), i) {
                return Err(format!("[{i}]: `{m}` is already [{first}]"));
            }
            Ok(parsed)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_is_provider_slash_name_and_errors_say_what_is_expected() {
        let m = ModelRef::parse("openai/gpt-4o-mini").unwrap();
        assert_eq!(
            (m.provider, m.model.as_str()),
            (Provider::OpenAi, "gpt-4o-mini")
        );
        let r = ModelRef::parse("openai/meta-llama/llama-3.1-8b").unwrap();
        assert_eq!(r.model, "meta-llama/llama-3.1-8b", "the name may hold `/`");
        assert_eq!(r.to_string(), "openai/meta-llama/llama-3.1-8b");
        let e = ModelRef::parse("gpt-4o").unwrap_err();
        assert!(
            e.contains("not `provider/model`") && e.contains("anthropic"),
            "{e}"
        );
        let e = ModelRef::parse("azure/gpt-4o").unwrap_err();
        assert!(e.contains("`azure` is not a provider"), "{e}");
        assert!(ModelRef::parse("openai/").is_err());
        let e = parse_models(&["ollama/a".into(), "ollama/a".into()]).unwrap_err();
        assert_eq!(e, "[1]: `ollama/a` is already [0]");
    }

    #[test]
    fn keys_come_from_the_usual_variables_and_config_overrides_them() {
        let env = |name: &str| match name {
            "OPENAI_API_KEY" => Some("sk-env".to_owned()),
            "OPENAI_BASE_URL" => Some("http://127.0.0.1:9/v1".to_owned()),
            "OLLAMA_HOST" => Some("127.0.0.1:11434".to_owned()),
            _ => None,
        };
        let from_env = LlmConfig::from_vars(env);
        assert_eq!(from_env.openai.api_key, Some(Secret::new("sk-env")));
        assert_eq!(
            from_env.openai.base_url.as_deref(),
            Some("http://127.0.0.1:9/v1/")
        );
        assert_eq!(
            from_env.ollama.base_url.as_deref(),
            Some("http://127.0.0.1:11434/")
        );
        assert_eq!(
            from_env.configured(),
            vec![Provider::OpenAi, Provider::Ollama]
        );
        let over = LlmConfig {
            openai: ProviderConfig {
                base_url: None,
                api_key: Some(Secret::new("sk-config")),
            },
            ..LlmConfig::default()
        };
        let merged = from_env.overridden_by(&over);
        assert_eq!(merged.openai.api_key, Some(Secret::new("sk-config")));
        assert_eq!(
            merged.openai.base_url.as_deref(),
            Some("http://127.0.0.1:9/v1/")
        );
    }

    #[test]
    fn a_secret_never_prints_and_is_scrubbed_from_text() {
        let s = Secret::new("sk-very-secret");
        assert_eq!(format!("{s:?}"), "***");
        let cfg = ProviderConfig {
            base_url: None,
            api_key: Some(s.clone()),
        };
        assert!(!format!("{cfg:?}").contains("sk-very"));
        assert_eq!(s.scrub("bad key sk-very-secret given"), "bad key *** given");
    }

    #[test]
    fn deltas_are_coalesced_to_a_bounded_rate() {
        let t0 = std::time::Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut b = DeltaBuffer::new(Duration::from_millis(50), 8);
        assert_eq!(
            b.push("a", ms(0)).as_deref(),
            Some("a"),
            "the first goes at once"
        );
        assert_eq!(b.push("b", ms(10)), None);
        assert_eq!(b.push("c", ms(20)), None);
        assert_eq!(
            b.push("d", ms(50)).as_deref(),
            Some("bcd"),
            "then every 50 ms"
        );
        assert_eq!(
            b.push("123456789", ms(60)).as_deref(),
            Some("123456789"),
            "or when full"
        );
        assert_eq!(b.push("e", ms(70)), None);
        assert_eq!(b.flush().as_deref(), Some("e"));
        assert_eq!(b.flush(), None);
        b.push("f", ms(80));
        b.clear();
        assert_eq!(b.flush(), None);
    }

    #[test]
    fn only_transient_failures_fall_back() {
        let m = || "openai/x".to_owned();
        let falls = [
            LlmError::RateLimited {
                model: m(),
                retry_after: None,
                message: String::new(),
            },
            LlmError::Unavailable {
                model: m(),
                message: String::new(),
            },
            LlmError::Timeout {
                model: m(),
                after: Duration::from_secs(1),
            },
            LlmError::ContextLength {
                model: m(),
                message: String::new(),
            },
        ];
        assert!(falls.iter().all(LlmError::falls_back));
        let stops = [
            LlmError::BadRequest {
                model: m(),
                message: String::new(),
            },
            LlmError::Auth {
                model: m(),
                message: String::new(),
            },
            LlmError::NotConfigured(String::new()),
        ];
        assert!(!stops.iter().any(LlmError::falls_back));
    }
}
