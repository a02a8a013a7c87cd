//! An OTLP/gRPC trace receiver on loopback: where the telemetry tests and `mesh bench
//! w2-traced` export spans. It counts every span it is sent; one started with `keep` also
//! keeps them, decoded, for a test to read.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use tonic::{Request, Response, Status};

/// A span as received: its ids (hex), its name, its attributes and its process's.
#[derive(Clone, Debug)]
pub struct Span {
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent: String,
    pub name: String,
    pub attributes: HashMap<String, String>,
    /// The resource's `service.name` and `process.pid`.
    pub service: String,
    pub pid: String,
}

#[derive(Default)]
struct Shared {
    count: AtomicU64,
    kept: Option<Mutex<Vec<Span>>>,
}

#[derive(Clone)]
struct Service(Arc<Shared>);

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(attributes: &[KeyValue]) -> HashMap<String, String> {
    attributes
        .iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.clone()) {
                Some(Any::StringValue(s)) => s,
                Some(Any::IntValue(i)) => i.to_string(),
                Some(Any::BoolValue(b)) => b.to_string(),
                Some(Any::DoubleValue(d)) => d.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

#[tonic::async_trait]
impl TraceService for Service {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        for resource in request.into_inner().resource_spans {
            let n: usize = resource.scope_spans.iter().map(|s| s.spans.len()).sum();
            self.0.count.fetch_add(n as u64, Ordering::Relaxed);
            let Some(kept) = &self.0.kept else { continue };
            let process = text(&resource.resource.map(|r| r.attributes).unwrap_or_default());
            let mut kept = kept.lock().unwrap_or_else(|p| p.into_inner());
            for span in resource.scope_spans.into_iter().flat_map(|s| s.spans) {
                kept.push(Span {
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent: hex(&span.parent_span_id),
                    name: span.name,
                    attributes: text(&span.attributes),
                    service: process.get("service.name").cloned().unwrap_or_default(),
                    pid: process.get("process.pid").cloned().unwrap_or_default(),
                });
            }
        }
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// The receiver, served on a free loopback port until dropped.
pub struct Receiver {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// Serves; with `keep`, every span is kept as well as counted.
    pub async fn start(keep: bool) -> io::Result<Receiver> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            count: AtomicU64::new(0),
            kept: keep.then(Mutex::default),
        });
        let service = TraceServiceServer::new(Service(shared.clone()));
        let server = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await;
        });
        Ok(Receiver {
            addr,
            shared,
            server,
        })
    }

    /// The endpoint to export to (`OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Spans received so far.
    pub fn count(&self) -> u64 {
        self.shared.count.load(Ordering::Relaxed)
    }

    /// The spans kept so far (none unless started with `keep`).
    pub fn spans(&self) -> Vec<Span> {
        match &self.shared.kept {
            Some(kept) => kept.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            None => Vec::new(),
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}
