//! A model provider on loopback that speaks each provider's real wire protocol, streaming
//! included, so that the mesh's real client code (genai, in the SDK) runs against it:
//!
//! - OpenAI chat completions, `POST /openai/v1/chat/completions` (`Authorization: Bearer`):
//!   SSE `data:` chunks, usage in a last chunk when `stream_options.include_usage`, `data: [DONE]`;
//! - Anthropic Messages, `POST /anthropic/v1/messages` (`x-api-key`): `message_start`,
//!   `content_block_start`, `ping`, `content_block_delta`…, `content_block_stop`,
//!   `message_delta` (usage), `message_stop`;
//! - Gemini, `POST /gemini/v1beta/models/MODEL:streamGenerateContent?alt=sse` and
//!   `:generateContent` (`x-goog-api-key`), usage in `usageMetadata`;
//! - Ollama, `POST /ollama/api/chat`: NDJSON lines, the last with `done`, `done_reason`,
//!   `prompt_eval_count` and `eval_count`.
//!
//! The answer is deterministic: `answer: ` followed by the words of the last user message, one
//! word per chunk (after a tool's result, OpenAI's and Anthropic's wires: `answer: tool said `
//! and the result). Queued tool calls (`Knobs::call_tools`) are asked for, streamed in pieces,
//! by the next call that offers tools. Input tokens are the words of every message; output tokens the words of the
//! answer. Knobs make the next calls fail (429 with `retry-after`, 500), cut a stream midway,
//! slow every chunk, or ask for another key; every request is recorded.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// The four wire protocols.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    OpenAi,
    Anthropic,
    Gemini,
    Ollama,
}

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub wire: Wire,
    pub model: String,
    pub stream: bool,
    pub body: Value,
    /// What the request carried as its key (header value without `Bearer `).
    pub key: Option<String>,
    pub at: std::time::Instant,
}

#[derive(Default)]
pub struct Knobs {
    /// The next N calls answer 429 with `retry-after: retry_after_s`.
    pub rate_limited: AtomicU32,
    pub retry_after_s: AtomicU32,
    /// The next N calls answer 500.
    pub server_errors: AtomicU32,
    /// Streams stop after half their chunks, without their end.
    pub cut_streams: AtomicBool,
    /// A pause before every chunk.
    pub chunk_delay_ms: AtomicU64,
    /// The next calls answer these texts, in order, instead of echoing their prompt.
    pub answers: Mutex<std::collections::VecDeque<String>>,
    /// The next calls (that offer tools) ask for these tool calls, in order, instead of
    /// answering: each a list of `(tool name, arguments)`.
    pub tool_calls: Mutex<std::collections::VecDeque<Vec<(String, Value)>>>,
}

impl Knobs {
    /// Makes the next call that offers tools ask for `calls`.
    pub fn call_tools(&self, calls: &[(&str, Value)]) {
        let calls = calls.iter().map(|(n, a)| ((*n).to_owned(), a.clone()));
        self.tool_calls.lock().unwrap().push_back(calls.collect());
    }
}

/// The calls a request is answered with, when it offers tools and some are queued.
fn tool_calls_for(shared: &Shared, body: &Value) -> Option<Vec<(String, Value)>> {
    let offers = body["tools"].as_array().is_some_and(|t| !t.is_empty());
    offers
        .then(|| shared.knobs.tool_calls.lock().unwrap().pop_front())
        .flatten()
}

/// The arguments of a call, as the JSON text a model streams in pieces.
fn argument_pieces(arguments: &Value) -> Vec<String> {
    let text = arguments.to_string();
    text.chars()
        .collect::<Vec<_>>()
        .chunks(6)
        .map(|c| c.iter().collect())
        .collect()
}

struct Shared {
    key: String,
    knobs: Knobs,
    seen: Mutex<Vec<Seen>>,
}

/// The fake provider; stops when dropped.
pub struct FakeLlm {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeLlm {
    /// Serves on a free loopback port; requests must carry `key`.
    pub async fn start(key: &str) -> FakeLlm {
        let shared = Arc::new(Shared {
            key: key.to_owned(),
            knobs: Knobs::default(),
            seen: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/openai/v1/chat/completions", post(openai))
            .route("/anthropic/v1/messages", post(anthropic))
            .route("/gemini/v1beta/models/{call}", post(gemini))
            .route("/ollama/api/chat", post(ollama))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake provider");
        let addr = listener.local_addr().expect("its address");
        let server = tokio::spawn(async move {
            // Each chunk is written as it comes: without TCP_NODELAY, Nagle's algorithm would
            // hold small writes for the client's delayed ACK (40 ms on Linux).
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let _ = axum::serve(listener, app).await;
        });
        FakeLlm {
            addr,
            shared,
            server,
        }
    }

    /// The base URL a provider's client is given (`http://ADDR/openai/v1/`, …).
    pub fn base_url(&self, wire: Wire) -> String {
        let path = match wire {
            Wire::OpenAi => "openai/v1/",
            Wire::Anthropic => "anthropic/v1/",
            Wire::Gemini => "gemini/v1beta/",
            Wire::Ollama => "ollama/",
        };
        format!("http://{}/{path}", self.addr)
    }

    pub fn knobs(&self) -> &Knobs {
        &self.shared.knobs
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    /// What the fake answers to `prompt`.
    pub fn answer_to(prompt: &str) -> String {
        answer_words(prompt).concat()
    }
}

fn answer_words(prompt: &str) -> Vec<String> {
    let mut words = vec!["answer:".to_owned()];
    words.extend(prompt.split_whitespace().map(str::to_owned));
    let n = words.len();
    words
        .into_iter()
        .enumerate()
        .map(|(i, w)| if i + 1 < n { format!("{w} ") } else { w })
        .collect()
}

/// The chunks of the answer to a call whose last user message is `prompt`: a canned answer
/// when one waits (in pieces of 8 characters), else the echo of the prompt.
fn reply_chunks(shared: &Shared, prompt: &str) -> Vec<String> {
    match shared.knobs.answers.lock().unwrap().pop_front() {
        Some(text) => text
            .chars()
            .collect::<Vec<_>>()
            .chunks(8)
            .map(|c| c.iter().collect())
            .collect(),
        None => answer_words(prompt),
    }
}

fn words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// The texts of a request's messages, by protocol, and the last user text.
fn texts(wire: Wire, body: &Value) -> (Vec<String>, String) {
    let mut all = Vec::new();
    let mut last_user = String::new();
    let content_text = |c: &Value| -> String {
        match c {
            Value::String(s) => s.clone(),
            Value::Array(parts) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(" "),
            _ => String::new(),
        }
    };
    match wire {
        Wire::OpenAi | Wire::Ollama | Wire::Anthropic => {
            if let Some(system) = body.get("system") {
                all.push(content_text(system));
            }
            for m in body["messages"].as_array().into_iter().flatten() {
                let text = content_text(&m["content"]);
                // A tool's result (OpenAI's `tool` role, Anthropic's `tool_result` block)
                // is what the answer echoes, so a test sees it reached the model.
                let results: Vec<String> = m["content"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|p| p["type"] == "tool_result")
                    .map(|p| content_text(&p["content"]))
                    .collect();
                if m["role"] == "tool" {
                    last_user = format!("tool said {text}");
                } else if !results.is_empty() {
                    last_user = format!("tool said {}", results.join(" "));
                } else if m["role"] == "user" {
                    last_user = text.clone();
                }
                all.push(text);
            }
        }
        Wire::Gemini => {
            if let Some(system) = body.get("systemInstruction") {
                all.push(content_text(&system["parts"]));
            }
            for c in body["contents"].as_array().into_iter().flatten() {
                let text = content_text(&c["parts"]);
                if c["role"] == "user" {
                    last_user = text.clone();
                }
                all.push(text);
            }
        }
    }
    (all, last_user)
}

/// Checks the key and the knobs; `Some` is the answer to give instead.
fn admit(
    shared: &Shared,
    wire: Wire,
    model: &str,
    stream: bool,
    body: &Value,
    key: Option<String>,
) -> Option<Response> {
    shared.seen.lock().unwrap().push(Seen {
        wire,
        model: model.to_owned(),
        stream,
        body: body.clone(),
        key: key.clone(),
        at: std::time::Instant::now(),
    });
    if key.as_deref() != Some(shared.key.as_str()) {
        let error =
            json!({ "error": { "message": "invalid api key", "type": "authentication_error" } });
        return Some((StatusCode::UNAUTHORIZED, Json(error)).into_response());
    }
    let take = |n: &AtomicU32| {
        n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
            .is_ok()
    };
    if take(&shared.knobs.rate_limited) {
        let after = shared
            .knobs
            .retry_after_s
            .load(Ordering::SeqCst)
            .to_string();
        let error = json!({ "error": { "message": "rate limited", "type": "rate_limit_error" } });
        return Some(
            (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, after)],
                Json(error),
            )
                .into_response(),
        );
    }
    if take(&shared.knobs.server_errors) {
        let error = json!({ "error": { "message": "overloaded", "type": "server_error" } });
        return Some((StatusCode::INTERNAL_SERVER_ERROR, Json(error)).into_response());
    }
    None
}

/// A streamed body of `frames`, paced by the knobs, cut midway when asked.
fn stream_body(shared: &Shared, frames: Vec<String>, content_type: &'static str) -> Response {
    let delay = Duration::from_millis(shared.knobs.chunk_delay_ms.load(Ordering::SeqCst));
    let cut = shared.knobs.cut_streams.load(Ordering::SeqCst);
    let keep = if cut { frames.len() / 2 } else { frames.len() };
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(4);
    tokio::spawn(async move {
        for frame in frames.into_iter().take(keep) {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if tx.send(Ok(Bytes::from(frame))).await.is_err() {
                return;
            }
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .body(body)
        .expect("a response")
}

/// A JSON body (axum's `Json` needs a feature the workspace does not enable).
struct Json(Value);

impl IntoResponse for Json {
    fn into_response(self) -> Response {
        (
            [(header::CONTENT_TYPE, "application/json")],
            self.0.to_string(),
        )
            .into_response()
    }
}

fn sse(data: &Value) -> String {
    format!("data: {data}\n\n")
}

fn sse_event(event: &str, data: &Value) -> String {
    format!("event: {event}\ndata: {data}\n\n")
}

fn header_key(headers: &HeaderMap, name: &str) -> Option<String> {
    let v = headers.get(name)?.to_str().ok()?;
    Some(v.strip_prefix("Bearer ").unwrap_or(v).to_owned())
}

async fn openai(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    let stream = body["stream"].as_bool().unwrap_or(false);
    let key = header_key(&headers, "authorization");
    if let Some(answer) = admit(&shared, Wire::OpenAi, &model, stream, &body, key) {
        return answer;
    }
    let (all, last) = texts(Wire::OpenAi, &body);
    let input: u64 = all.iter().map(|t| words(t)).sum();
    if stream && let Some(calls) = tool_calls_for(&shared, &body) {
        return openai_tool_calls(&shared, &body, &model, input, calls);
    }
    let chunks = reply_chunks(&shared, &last);
    let output = chunks.len() as u64;
    let usage = json!({ "prompt_tokens": input, "completion_tokens": output, "total_tokens": input + output });
    if !stream {
        return Json(json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{ "index": 0, "finish_reason": "stop",
                "message": { "role": "assistant", "content": chunks.concat() } }],
            "usage": usage,
        }))
        .into_response();
    }
    let chunk = |delta: Value, finish: Value| {
        sse(&json!({
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model,
            "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }],
        }))
    };
    let mut frames = vec![chunk(
        json!({ "role": "assistant", "content": "" }),
        Value::Null,
    )];
    frames.extend(
        chunks
            .iter()
            .map(|c| chunk(json!({ "content": c }), Value::Null)),
    );
    frames.push(chunk(json!({}), json!("stop")));
    if body["stream_options"]["include_usage"] == json!(true) {
        frames.push(sse(&json!({
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model,
            "choices": [], "usage": usage,
        })));
    }
    frames.push("data: [DONE]\n\n".to_owned());
    stream_body(&shared, frames, "text/event-stream")
}

/// A streamed answer that asks for `calls`: each call's id, name, then its arguments in
/// pieces, `finish_reason: tool_calls`, usage when asked, `[DONE]`.
fn openai_tool_calls(
    shared: &Shared,
    body: &Value,
    model: &str,
    input: u64,
    calls: Vec<(String, Value)>,
) -> Response {
    let chunk = |delta: Value, finish: Value| {
        sse(&json!({
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model,
            "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }],
        }))
    };
    let mut frames = vec![chunk(
        json!({ "role": "assistant", "content": null }),
        Value::Null,
    )];
    let mut output = 0;
    for (i, (name, arguments)) in calls.iter().enumerate() {
        frames.push(chunk(
            json!({ "tool_calls": [{ "index": i, "id": format!("call_{i}"), "type": "function",
                "function": { "name": name, "arguments": "" } }] }),
            Value::Null,
        ));
        for piece in argument_pieces(arguments) {
            output += 1;
            frames.push(chunk(
                json!({ "tool_calls": [{ "index": i, "function": { "arguments": piece } }] }),
                Value::Null,
            ));
        }
    }
    frames.push(chunk(json!({}), json!("tool_calls")));
    if body["stream_options"]["include_usage"] == json!(true) {
        frames.push(sse(&json!({
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model,
            "choices": [], "usage": { "prompt_tokens": input, "completion_tokens": output,
                "total_tokens": input + output },
        })));
    }
    frames.push("data: [DONE]\n\n".to_owned());
    stream_body(shared, frames, "text/event-stream")
}

/// A streamed answer that asks for `calls`: a `tool_use` block per call with its input in
/// `input_json_delta` pieces, `stop_reason: tool_use`.
fn anthropic_tool_calls(
    shared: &Shared,
    model: &str,
    input: u64,
    calls: Vec<(String, Value)>,
) -> Response {
    let mut frames = vec![sse_event(
        "message_start",
        &json!({ "type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": { "input_tokens": input, "output_tokens": 1 } } }),
    )];
    let mut output = 0;
    for (i, (name, arguments)) in calls.iter().enumerate() {
        frames.push(sse_event(
            "content_block_start",
            &json!({ "type": "content_block_start", "index": i,
                "content_block": { "type": "tool_use", "id": format!("toolu_{i}"),
                    "name": name, "input": {} } }),
        ));
        for piece in argument_pieces(arguments) {
            output += 1;
            frames.push(sse_event(
                "content_block_delta",
                &json!({ "type": "content_block_delta", "index": i,
                    "delta": { "type": "input_json_delta", "partial_json": piece } }),
            ));
        }
        frames.push(sse_event(
            "content_block_stop",
            &json!({ "type": "content_block_stop", "index": i }),
        ));
    }
    frames.push(sse_event(
        "message_delta",
        &json!({ "type": "message_delta",
            "delta": { "stop_reason": "tool_use", "stop_sequence": null },
            "usage": { "output_tokens": output } }),
    ));
    frames.push(sse_event(
        "message_stop",
        &json!({ "type": "message_stop" }),
    ));
    stream_body(shared, frames, "text/event-stream")
}

async fn anthropic(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    let stream = body["stream"].as_bool().unwrap_or(false);
    let key = header_key(&headers, "x-api-key");
    if let Some(answer) = admit(&shared, Wire::Anthropic, &model, stream, &body, key) {
        return answer;
    }
    let (all, last) = texts(Wire::Anthropic, &body);
    let input: u64 = all.iter().map(|t| words(t)).sum();
    if stream && let Some(calls) = tool_calls_for(&shared, &body) {
        return anthropic_tool_calls(&shared, &model, input, calls);
    }
    let chunks = reply_chunks(&shared, &last);
    let output = chunks.len() as u64;
    if !stream {
        return Json(json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": model,
            "content": [{ "type": "text", "text": chunks.concat() }],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": { "input_tokens": input, "output_tokens": output },
        }))
        .into_response();
    }
    let mut frames = vec![
        sse_event(
            "message_start",
            &json!({ "type": "message_start", "message": {
                "id": "msg_1", "type": "message", "role": "assistant", "model": model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": { "input_tokens": input, "output_tokens": 1 } } }),
        ),
        sse_event(
            "content_block_start",
            &json!({ "type": "content_block_start", "index": 0,
                "content_block": { "type": "text", "text": "" } }),
        ),
        sse_event("ping", &json!({ "type": "ping" })),
    ];
    frames.extend(chunks.iter().map(|c| {
        sse_event(
            "content_block_delta",
            &json!({ "type": "content_block_delta", "index": 0,
                "delta": { "type": "text_delta", "text": c } }),
        )
    }));
    frames.push(sse_event(
        "content_block_stop",
        &json!({ "type": "content_block_stop", "index": 0 }),
    ));
    frames.push(sse_event(
        "message_delta",
        &json!({ "type": "message_delta",
            "delta": { "stop_reason": "end_turn", "stop_sequence": null },
            "usage": { "output_tokens": output } }),
    ));
    frames.push(sse_event(
        "message_stop",
        &json!({ "type": "message_stop" }),
    ));
    stream_body(&shared, frames, "text/event-stream")
}

async fn gemini(
    State(shared): State<Arc<Shared>>,
    Path(call): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let Some((model, action)) = call.split_once(':') else {
        return (StatusCode::NOT_FOUND, "expected MODEL:ACTION").into_response();
    };
    let stream = match action {
        "streamGenerateContent" => true,
        "generateContent" => false,
        _ => return (StatusCode::NOT_FOUND, "unknown action").into_response(),
    };
    let key = header_key(&headers, "x-goog-api-key");
    if let Some(answer) = admit(&shared, Wire::Gemini, model, stream, &body, key) {
        return answer;
    }
    let (all, last) = texts(Wire::Gemini, &body);
    let input: u64 = all.iter().map(|t| words(t)).sum();
    let chunks = reply_chunks(&shared, &last);
    let output = chunks.len() as u64;
    let usage = json!({ "promptTokenCount": input, "candidatesTokenCount": output,
        "totalTokenCount": input + output });
    let candidate = |text: &str, finish: Option<&str>| {
        let mut c =
            json!({ "content": { "parts": [{ "text": text }], "role": "model" }, "index": 0 });
        if let Some(f) = finish {
            c["finishReason"] = json!(f);
        }
        c
    };
    if !stream {
        return Json(json!({
            "candidates": [candidate(&chunks.concat(), Some("STOP"))],
            "usageMetadata": usage, "modelVersion": model,
        }))
        .into_response();
    }
    let n = chunks.len();
    let frames = chunks
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let last = i + 1 == n;
            let mut frame = json!({
                "candidates": [candidate(c, last.then_some("STOP"))],
                "modelVersion": model,
            });
            if last {
                frame["usageMetadata"] = usage.clone();
            }
            sse(&frame)
        })
        .collect();
    stream_body(&shared, frames, "text/event-stream")
}

async fn ollama(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    // Ollama streams unless told not to.
    let stream = body["stream"].as_bool().unwrap_or(true);
    // A local Ollama takes no key; a hosted one (behind a proxy) may.
    let key = header_key(&headers, "authorization").or_else(|| Some(shared.key.clone()));
    if let Some(answer) = admit(&shared, Wire::Ollama, &model, stream, &body, key) {
        return answer;
    }
    let (all, last) = texts(Wire::Ollama, &body);
    let input: u64 = all.iter().map(|t| words(t)).sum();
    let chunks = reply_chunks(&shared, &last);
    let output = chunks.len() as u64;
    let end = |content: &str| {
        json!({ "model": model, "created_at": "2026-12-07T00:00:00Z",
            "message": { "role": "assistant", "content": content },
            "done": true, "done_reason": "stop", "total_duration": 1000,
            "prompt_eval_count": input, "eval_count": output })
    };
    if !stream {
        return Json(end(&chunks.concat())).into_response();
    }
    let mut frames: Vec<String> = chunks
        .iter()
        .map(|c| {
            format!(
                "{}\n",
                json!({ "model": model, "created_at": "2026-12-07T00:00:00Z",
                    "message": { "role": "assistant", "content": c }, "done": false })
            )
        })
        .collect();
    frames.push(format!("{}\n", end("")));
    stream_body(&shared, frames, "application/x-ndjson")
}
