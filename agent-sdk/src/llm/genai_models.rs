//! [`ChatModel`] on the `genai` crate: each call names its endpoint, key and adapter
//! explicitly (a `ServiceTarget`), so nothing is read from the environment behind our back and
//! a base URL can point at any compatible server. genai's errors are mapped to [`LlmError`] by
//! HTTP status and transport failure, and every message is scrubbed of the key.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use genai::adapter::AdapterKind;
use genai::chat::{
    ChatMessage, ChatOptions, ChatRequest as GenaiRequest, ChatStreamEvent, StopReason, Tool,
    ToolCall as GenaiToolCall, ToolResponse,
};
use genai::resolver::{AuthData, Endpoint};
use genai::{ModelIden, ModelSpec, ServiceTarget};

use crate::metrics as m;

use super::{
    ChatEvent, ChatModel, ChatReply, ChatRequest, ChatStream, LlmConfig, LlmError, ModelRef,
    Provider, Role, Secret, ToolCall, Usage,
};

/// The default per-call limit when the request gives none.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// How much of an error body is kept in a message.
const MAX_BODY_IN_MESSAGE: usize = 300;

/// Models of every configured provider, through one HTTP client.
#[derive(Clone)]
pub struct Models {
    client: genai::Client,
    config: Arc<LlmConfig>,
}

impl std::fmt::Debug for Models {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Models")
            .field("configured", &self.config.configured())
            .finish()
    }
}

impl Models {
    /// Models of the providers `config` sets up; fails only when no HTTP client can be built.
    pub fn new(config: LlmConfig) -> Result<Models, LlmError> {
        install_crypto_provider();
        let client = genai::Client::new().map_err(|e| {
            LlmError::NotConfigured(format!("cannot build the HTTP client for models: {e}"))
        })?;
        Ok(Models {
            client,
            config: Arc::new(config),
        })
    }

    pub fn config(&self) -> &LlmConfig {
        &self.config
    }

    fn target(
        &self,
        model: &ModelRef,
        key: Option<&Secret>,
    ) -> Result<(ServiceTarget, Secret), LlmError> {
        let cfg = self.config.provider(model.provider);
        let (kind, default_base) = match model.provider {
            Provider::OpenAi => (AdapterKind::OpenAI, "https://api.openai.com/v1/"),
            Provider::Anthropic => (AdapterKind::Anthropic, "https://api.anthropic.com/v1/"),
            Provider::Gemini => (
                AdapterKind::Gemini,
                "https://generativelanguage.googleapis.com/v1beta/",
            ),
            Provider::Ollama => (AdapterKind::Ollama, "http://localhost:11434/"),
        };
        let key = match (key.or(cfg.api_key.as_ref()), model.provider) {
            (Some(k), _) if !k.is_empty() => k.clone(),
            // A local Ollama takes no key; genai wants some value.
            (_, Provider::Ollama) => Secret::new("ollama"),
            _ => {
                let var = match model.provider {
                    Provider::OpenAi => "OPENAI_API_KEY",
                    Provider::Anthropic => "ANTHROPIC_API_KEY",
                    Provider::Gemini => "GEMINI_API_KEY",
                    Provider::Ollama => "OLLAMA_API_KEY",
                };
                return Err(LlmError::NotConfigured(format!(
                    "{model}: no key for {}: set {var} on the node, or [llm.{}] api_key in node.toml",
                    model.provider, model.provider
                )));
            }
        };
        let base = cfg.base_url.as_deref().unwrap_or(default_base).to_owned();
        let target = ServiceTarget {
            endpoint: Endpoint::from_owned(base),
            auth: AuthData::from_single(key.expose().to_owned()),
            model: ModelIden::new(kind, model.model.clone()),
        };
        Ok((target, key))
    }
}

/// HTTPS to providers uses rustls on ring, the one crypto provider of the mesh's binaries;
/// installed here unless the process chose one already.
pub fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // ring, not aws-lc: no long C build, and the provider tonic's TLS uses too. rustls
        // 0.23.48 deprecates it for lacking post-quantum key exchange, which we accept.
        #[allow(deprecated)]
        let ring = rustls::crypto::ring::default_provider();
        let _ = ring.install_default();
    }
}

fn genai_request(request: &ChatRequest) -> GenaiRequest {
    let messages = request
        .messages
        .iter()
        .map(|m| match m.role {
            Role::User => ChatMessage::user(m.text.clone()),
            Role::Assistant if m.tool_calls.is_empty() => ChatMessage::assistant(m.text.clone()),
            Role::Assistant => {
                let calls: Vec<GenaiToolCall> = m
                    .tool_calls
                    .iter()
                    .map(|c| GenaiToolCall {
                        call_id: c.id.clone(),
                        fn_name: c.name.clone(),
                        fn_arguments: c.arguments.clone(),
                        thought_signatures: None,
                    })
                    .collect();
                ChatMessage::from(calls)
            }
            Role::Tool => ChatMessage::from(ToolResponse::new(
                m.tool_call_id.clone().unwrap_or_default(),
                m.text.clone(),
            )),
        })
        .collect();
    let mut req = GenaiRequest::new(messages);
    if let Some(system) = &request.system {
        req = req.with_system(system.clone());
    }
    if !request.tools.is_empty() {
        req = req.with_tools(request.tools.iter().map(|t| {
            Tool::new(t.name.clone())
                .with_description(t.description.clone())
                .with_schema(t.parameters.clone())
        }));
    }
    req
}

fn options(request: &ChatRequest, timeout: Duration) -> ChatOptions {
    let mut opts = ChatOptions::default()
        .with_capture_usage(true)
        .with_capture_content(true)
        .with_capture_tool_calls(true)
        .with_stream_header_timeout(timeout)
        .with_stream_read_timeout(timeout);
    if let Some(n) = request.max_tokens {
        opts = opts.with_max_tokens(n);
    }
    if let Some(t) = request.temperature {
        opts = opts.with_temperature(t);
    }
    opts
}

fn finish_reason(reason: Option<StopReason>) -> String {
    let text = match reason {
        Some(
            StopReason::Completed(s)
            | StopReason::MaxTokens(s)
            | StopReason::ToolCall(s)
            | StopReason::ContentFilter(s)
            | StopReason::StopSequence(s)
            | StopReason::Other(s),
        ) => s,
        None => "stop".to_owned(),
    };
    match text.as_str() {
        "end_turn" | "STOP" | "COMPLETE" | "completed" => "stop".to_owned(),
        "tool_use" | "tool_calls" | "function_call" => "tool_calls".to_owned(),
        "max_tokens" | "MAX_TOKENS" => "length".to_owned(),
        _ => text.to_lowercase(),
    }
}

fn cut(body: &str) -> &str {
    match body.char_indices().nth(MAX_BODY_IN_MESSAGE) {
        Some((i, _)) => &body[..i],
        None => body,
    }
}

/// The delay a 429 asked for: `retry-after-ms`, or `retry-after` in seconds.
fn retry_after(headers: Option<&reqwest::header::HeaderMap>) -> Option<Duration> {
    let headers = headers?;
    let get = |name: &str| headers.get(name)?.to_str().ok()?.trim().parse::<f64>().ok();
    if let Some(ms) = get("retry-after-ms") {
        return Some(Duration::from_secs_f64(ms.max(0.0) / 1000.0));
    }
    get("retry-after").map(|s| Duration::from_secs_f64(s.max(0.0)))
}

/// Maps a genai error (found in any of the shapes it takes) to ours.
fn map_error(model: &ModelRef, key: &Secret, e: &genai::Error) -> LlmError {
    let name = model.to_string();
    let scrub = |text: &str| key.scrub(text);
    if let Some(status) = status_of(e) {
        let body = scrub(cut(&body_of(e).unwrap_or_default()));
        let code = status.as_u16();
        return match code {
            429 => LlmError::RateLimited {
                model: name,
                retry_after: retry_after(headers_of(e)),
                message: body,
            },
            401 | 403 => LlmError::Auth {
                model: name,
                message: format!("HTTP {code}: {body}"),
            },
            400 | 413 | 422
                if body.contains("context")
                    && (body.contains("length") || body.contains("window"))
                    || body.contains("too many tokens")
                    || body.contains("prompt is too long") =>
            {
                LlmError::ContextLength {
                    model: name,
                    message: body,
                }
            }
            408 | 500..=599 => LlmError::Unavailable {
                model: name,
                message: format!("HTTP {code}: {body}"),
            },
            _ => LlmError::BadRequest {
                model: name,
                message: format!("HTTP {code}: {body}"),
            },
        };
    }
    if let Some(r) = reqwest_of(e) {
        if r.is_timeout() {
            return LlmError::Unavailable {
                model: name,
                message: "timed out".into(),
            };
        }
        return LlmError::Unavailable {
            model: name,
            message: scrub(&format!("connection failed: {}", chain(r))),
        };
    }
    let message = match e {
        genai::Error::WebStream { cause, .. } => format!("the stream broke: {cause}"),
        genai::Error::StreamParse { serde_error, .. } => {
            format!("the stream could not be read: {serde_error}")
        }
        other => first_line(&other.to_string()),
    };
    LlmError::Unavailable {
        model: name,
        message: scrub(&message),
    }
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().to_owned()
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    parts.join(": ")
}

/// The genai error inside a stream error, if that is what it holds.
fn inner(e: &genai::Error) -> Option<&genai::Error> {
    match e {
        genai::Error::WebStream { error, .. } => error.downcast_ref::<genai::Error>(),
        _ => None,
    }
}

fn status_of(e: &genai::Error) -> Option<reqwest::StatusCode> {
    e.status().or_else(|| inner(e).and_then(status_of))
}

fn headers_of(e: &genai::Error) -> Option<&reqwest::header::HeaderMap> {
    e.headers().or_else(|| inner(e).and_then(headers_of))
}

fn body_of(e: &genai::Error) -> Option<String> {
    match e {
        genai::Error::HttpError { body, .. } => Some(body.clone()),
        genai::Error::WebModelCall { webc_error, .. }
        | genai::Error::WebAdapterCall { webc_error, .. } => match webc_error {
            genai::webc::Error::ResponseFailedStatus { body, .. } => Some(body.clone()),
            _ => None,
        },
        _ => inner(e).and_then(body_of),
    }
}

fn reqwest_of(e: &genai::Error) -> Option<&reqwest::Error> {
    match e {
        genai::Error::WebModelCall { webc_error, .. }
        | genai::Error::WebAdapterCall { webc_error, .. } => match webc_error {
            genai::webc::Error::Reqwest(r) => Some(r),
            _ => None,
        },
        genai::Error::WebStream { error, .. } => {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error.as_ref());
            while let Some(s) = source {
                if let Some(r) = s.downcast_ref::<reqwest::Error>() {
                    return Some(r);
                }
                if let Some(g) = s.downcast_ref::<genai::Error>() {
                    return reqwest_of(g);
                }
                source = s.source();
            }
            None
        }
        _ => None,
    }
}

/// The span of one model call, named and with attributes as OpenTelemetry's GenAI semantic
/// conventions say; child of the agent's span. None with tracing off.
fn chat_span(model: &ModelRef) -> tracing::Span {
    if !mesh_proto::trace_context::enabled() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        "gen_ai.chat",
        otel.name = format!("chat {}", model.model),
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        gen_ai.operation.name = "chat",
        gen_ai.provider.name = model.provider.as_str(),
        gen_ai.request.model = model.model.as_str(),
        gen_ai.usage.input_tokens = tracing::field::Empty,
        gen_ai.usage.output_tokens = tracing::field::Empty,
        gen_ai.response.finish_reasons = tracing::field::Empty,
        error.type = tracing::field::Empty,
    )
}

impl ChatModel for Models {
    fn chat_stream(&self, model: &ModelRef, request: &ChatRequest) -> ChatStream {
        let (target, key) = match self.target(model, request.api_key.as_ref()) {
            Ok(t) => t,
            Err(e) => return futures::stream::once(async move { Err(e) }).boxed(),
        };
        let timeout = request.timeout.unwrap_or(DEFAULT_TIMEOUT);
        let client = self.client.clone();
        let model = model.clone();
        let req = genai_request(request);
        let opts = options(request, timeout);
        let deadline = tokio::time::Instant::now() + timeout;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<ChatEvent, LlmError>>(64);
        let span = chat_span(&model);
        let traced = span.clone();
        let work = async move {
            let timed_out = || LlmError::Timeout {
                model: model.to_string(),
                after: timeout,
            };
            let provider = model.provider.as_str();
            let began = tokio::time::Instant::now();
            let mut first_token = true;
            let call = async {
                let started = client
                    .exec_chat_stream(ModelSpec::from_target(target), req, Some(&opts))
                    .await;
                let mut stream = match started {
                    Ok(response) => response.stream,
                    Err(e) => return Err(map_error(&model, &key, &e)),
                };
                let mut text = String::new();
                while let Some(event) = stream.next().await {
                    match event.map_err(|e| map_error(&model, &key, &e))? {
                        ChatStreamEvent::Chunk(chunk) => {
                            if first_token {
                                first_token = false;
                                metrics::histogram!(m::LLM_FIRST_TOKEN, "provider" => provider)
                                    .record(began.elapsed().as_secs_f64());
                            }
                            text.push_str(&chunk.content);
                            if tx.send(Ok(ChatEvent::Delta(chunk.content))).await.is_err() {
                                return Ok(None);
                            }
                        }
                        ChatStreamEvent::End(end) => {
                            metrics::histogram!(m::LLM_SECONDS, "provider" => provider)
                                .record(began.elapsed().as_secs_f64());
                            let usage = end.captured_usage.as_ref().map(|u| Usage {
                                input_tokens: u.prompt_tokens.unwrap_or(0).max(0) as u64,
                                output_tokens: u.completion_tokens.unwrap_or(0).max(0) as u64,
                            });
                            let mut finish = finish_reason(end.captured_stop_reason.clone());
                            let whole = end.captured_texts().map(|t| t.concat());
                            let tool_calls: Vec<ToolCall> = end
                                .captured_tool_calls()
                                .unwrap_or_default()
                                .into_iter()
                                .map(|c| ToolCall {
                                    id: c.call_id.clone(),
                                    name: c.fn_name.clone(),
                                    arguments: c.fn_arguments.clone(),
                                })
                                .collect();
                            // Gemini ends a call for tools with `STOP`: name it alike.
                            if !tool_calls.is_empty() {
                                finish = "tool_calls".to_owned();
                            }
                            return Ok(Some(ChatReply {
                                model: model.clone(),
                                text: whole.filter(|t| !t.is_empty()).unwrap_or(text),
                                usage,
                                finish_reason: finish,
                                tool_calls,
                            }));
                        }
                        _ => {}
                    }
                }
                Err(LlmError::Unavailable {
                    model: model.to_string(),
                    message: "the stream ended before its end event".into(),
                })
            };
            let outcome = match tokio::time::timeout_at(deadline, call).await {
                Ok(Ok(Some(reply))) => Ok(ChatEvent::Done(reply)),
                Ok(Ok(None)) => return,
                Ok(Err(e)) => Err(e),
                Err(_) => Err(timed_out()),
            };
            match &outcome {
                Ok(ChatEvent::Done(reply)) => {
                    if let Some(usage) = &reply.usage {
                        traced.record("gen_ai.usage.input_tokens", usage.input_tokens);
                        traced.record("gen_ai.usage.output_tokens", usage.output_tokens);
                    }
                    traced.record(
                        "gen_ai.response.finish_reasons",
                        reply.finish_reason.as_str(),
                    );
                }
                Ok(ChatEvent::Delta(_)) => {}
                Err(e) => {
                    traced.record("error.type", e.code());
                    traced.record("otel.status_code", "ERROR");
                }
            }
            let _ = tx.send(outcome).await;
        };
        tokio::spawn(tracing::Instrument::instrument(work, span));
        tokio_stream::wrappers::ReceiverStream::new(rx).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finish_reasons_are_named_alike_for_every_provider() {
        let f = |s: &str| finish_reason(Some(StopReason::from(s.to_owned())));
        assert_eq!(f("end_turn"), "stop");
        assert_eq!(f("STOP"), "stop");
        assert_eq!(f("stop"), "stop");
        assert_eq!(f("max_tokens"), "length");
        assert_eq!(f("MAX_TOKENS"), "length");
        assert_eq!(f("length"), "length");
        assert_eq!(finish_reason(None), "stop");
    }

    #[test]
    fn a_missing_key_names_the_variable_and_the_config_field() {
        let models = Models::new(LlmConfig::default()).unwrap();
        let m = ModelRef::parse("anthropic/claude-haiku-4-5").unwrap();
        let Err(LlmError::NotConfigured(msg)) = models.target(&m, None) else {
            panic!("not configured")
        };
        assert!(
            msg.contains("ANTHROPIC_API_KEY") && msg.contains("[llm.anthropic]"),
            "{msg}"
        );
        let local = ModelRef::parse("ollama/llama3.2").unwrap();
        assert!(
            models.target(&local, None).is_ok(),
            "a local Ollama needs no key"
        );
    }
}
