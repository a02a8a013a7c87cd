//! Logs and traces of a mesh process (docs/observability.md).
//!
//! - Logs go to stderr, filtered by `MESH_LOG` (an `EnvFilter`), as text or, with
//!   `MESH_LOG_FORMAT=json`, as one JSON object per line carrying the fields of the spans it
//!   happened in (`run_id`, `step_id`, `trace_id`, …).
//! - Spans are exported over OTLP/gRPC only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, as the OpenTelemetry specification names
//!   it; the other `OTEL_*` variables (service name, batch delay, headers) apply as usual.
//!   When it is not set, no exporter, no OpenTelemetry layer and no trace context exist: the
//!   mesh's spans are not even made (see [`mesh_proto::trace_context`]).
//!
//! Only the mesh's own spans at `info` and above are exported (targets `mesh_*`), whatever
//! `MESH_LOG` says.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{EnvFilter, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};

/// Keeps the span exporter of the process: dropping it sends what is still buffered.
#[must_use = "spans still buffered are lost when this is dropped"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Whether the environment asks for span export.
pub fn otlp_configured() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Installs the process's logger and, when configured, its span exporter, under the service
/// name `service` (unless `OTEL_SERVICE_NAME` says otherwise). `default_filter` applies when
/// `MESH_LOG` is not set. Call it once, inside the Tokio runtime (the exporter's gRPC client
/// needs it), and keep what it returns until the process ends.
pub fn init(default_filter: &str, service: &str) -> Telemetry {
    let filter =
        EnvFilter::try_from_env("MESH_LOG").unwrap_or_else(|_| EnvFilter::new(default_filter));
    let json = std::env::var("MESH_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let logs = log_layer(json, std::io::stderr, filter);
    let (provider, spans) = match otlp_configured().then(|| exporter(service)) {
        Some(Ok(provider)) => {
            let tracer = provider.tracer("agentmesh");
            // No source locations, thread ids or busy/idle timers on every span: each costs
            // work on every span and every enter, and the mesh's spans say what they are. No
            // OpenTelemetry context attached on every enter either: the mesh links spans by
            // their tracing parents and by `traceparent`, never by `Context::current()`.
            let layer = tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_context_activation(false)
                .with_location(false)
                .with_threads(false)
                .with_tracked_inactivity(false)
                .with_target(false)
                .with_filter(filter_fn(exported));
            (Some(provider), Some(layer))
        }
        Some(Err(e)) => {
            eprintln!("warning: spans are not exported: {e}");
            (None, None)
        }
        None => (None, None),
    };
    let _ = tracing_subscriber::registry()
        .with(logs)
        .with(spans)
        .try_init();
    if provider.is_some() {
        mesh_proto::trace_context::enable();
    }
    Telemetry { provider }
}

/// Which spans are exported: the mesh's own, at `info` and above (not the registry's sweep,
/// say, which is `debug` and runs ten times a second).
fn exported(m: &tracing::Metadata<'_>) -> bool {
    m.target().starts_with("mesh_") && *m.level() <= tracing::Level::INFO
}

/// The log layer: text or JSON lines (each with the fields of the spans it is in) to `out`.
fn log_layer<S, W>(json: bool, out: W, filter: EnvFilter) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    if json {
        fmt::layer()
            .json()
            .flatten_event(true)
            .with_span_list(true)
            .with_current_span(false)
            .with_writer(out)
            .with_filter(filter)
            .boxed()
    } else {
        fmt::layer().with_writer(out).with_filter(filter).boxed()
    }
}

fn exporter(service: &str) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()?;
    let mut resource = opentelemetry_sdk::Resource::builder().with_attribute(
        opentelemetry::KeyValue::new("process.pid", i64::from(std::process::id())),
    );
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service.to_owned());
    }
    Ok(SdkTracerProvider::builder()
        .with_resource(resource.build())
        .with_batch_exporter(exporter)
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_logs_carry_the_fields_of_their_spans() {
        let out = Lines::default();
        let writer = out.clone();
        let spans = tracing_opentelemetry::layer()
            .with_tracer(SdkTracerProvider::builder().build().tracer("test"))
            .with_filter(filter_fn(exported));
        let subscriber = tracing_subscriber::registry()
            .with(log_layer(
                true,
                move || writer.clone(),
                EnvFilter::new("info"),
            ))
            .with(Some(spans));
        tracing::subscriber::with_default(subscriber, || {
            let run = tracing::info_span!("run", run_id = "run-1", trace_id = "abc");
            let _run = run.enter();
            let step = tracing::info_span!("agent.handle", step_id = "a");
            let _step = step.enter();
            tracing::info!(n = 1, "hello");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["message"], "hello", "{line}");
        assert_eq!(line["n"], 1, "{line}");
        assert_eq!(line["spans"][0]["run_id"], "run-1", "{line}");
        assert_eq!(line["spans"][0]["trace_id"], "abc", "{line}");
        assert_eq!(line["spans"][1]["step_id"], "a", "{line}");
    }
}
