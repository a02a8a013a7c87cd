//! W3C trace context across the mesh's processes (docs/observability.md): a `traceparent`
//! travels in gRPC metadata from clients and in each task to its node, so that one run is one
//! connected trace. Nothing here does any work until [`enable`] is called, which the process
//! does when it exports spans: with tracing off, spans are not made and contexts not read.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The metadata key, and the field name in a task.
pub const TRACEPARENT: &str = "traceparent";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns propagation on, for a process that exports spans.
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Whether this process exports spans (and so makes and links them).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The `traceparent` of `span`, for a message or a call it starts; `None` with tracing off.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    if !enabled() {
        return None;
    }
    let mut carrier = Traceparent(None);
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.0
}

/// Makes `span` a child of the context a `traceparent` names; a malformed one is ignored.
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    if !enabled() || traceparent.is_empty() {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&Traceparent(Some(traceparent)));
    let _ = span.set_parent(cx);
}

/// A carrier of the `traceparent` alone (the mesh sends no `tracestate`): one string, where a
/// map would cost a table and two more strings per span on the hot path.
struct Traceparent<T>(Option<T>);

impl Injector for Traceparent<String> {
    fn set(&mut self, key: &str, value: String) {
        if key == TRACEPARENT {
            self.0 = Some(value);
        }
    }
}

impl Extractor for Traceparent<&str> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == TRACEPARENT).then_some(self.0).flatten()
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT]
    }
}

/// The trace id of `span`, in hex, for logs; `None` with tracing off.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    if !enabled() {
        return None;
    }
    let id = span.context().span().span_context().trace_id();
    (id != opentelemetry::trace::TraceId::INVALID).then(|| id.to_string())
}
