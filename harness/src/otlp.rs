//! An OTLP/gRPC trace receiver on loopback: where the telemetry tests and `mesh bench
//! w2-traced` export spans. It counts every span it is sent; one started with `keep` also
//! keeps them, decoded, for a test to read. One that only counts decodes no more than the
//! nesting of resources, scopes and spans, skipping each span's bytes: in `mesh bench` it
//! shares the machine with the mesh it measures, and a collector's cost is not the mesh's.

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

/// An export request read only as far as its spans: each span's fields are skipped unread.
#[derive(Clone, PartialEq, prost::Message)]
struct Counted {
    #[prost(message, repeated, tag = "1")]
    resource_spans: Vec<CountedResource>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct CountedResource {
    #[prost(message, repeated, tag = "2")]
    scope_spans: Vec<CountedScope>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct CountedScope {
    #[prost(message, repeated, tag = "2")]
    spans: Vec<Skipped>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Skipped {}

/// The `TraceService` of a receiver that only counts, served as tonic's generated servers
/// are, with a codec that decodes a [`Counted`].
#[derive(Clone)]
struct Counter(Arc<Shared>);

impl tonic::server::NamedService for Counter {
    const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
}

impl tonic::server::UnaryService<Counted> for Counter {
    type Response = ExportTraceServiceResponse;
    type Future = std::future::Ready<Result<Response<ExportTraceServiceResponse>, Status>>;

    fn call(&mut self, request: Request<Counted>) -> Self::Future {
        let n: usize = (request.into_inner().resource_spans.iter())
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.0.count.fetch_add(n as u64, Ordering::Relaxed);
        std::future::ready(Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        })))
    }
}

impl<B> tonic::codegen::Service<tonic::codegen::http::Request<B>> for Counter
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: tonic::codegen::http::Request<B>) -> Self::Future {
        let counter = self.clone();
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<ExportTraceServiceResponse, Counted>::default();
            Ok(tonic::server::Grpc::new(codec)
                .unary(counter, request)
                .await)
        })
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
        let (keeper, counter) = match keep {
            true => (Some(TraceServiceServer::new(Service(shared.clone()))), None),
            false => (None, Some(Counter(shared.clone()))),
        };
        let server = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_optional_service(keeper)
                .add_optional_service(counter)
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

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span as Proto};

    fn request(spans_per_scope: &[usize]) -> ExportTraceServiceRequest {
        let span = |i: usize| Proto {
            trace_id: vec![1; 16],
            span_id: vec![i as u8; 8],
            name: format!("span {i}"),
            attributes: vec![KeyValue {
                key: "run_id".into(),
                value: Some(opentelemetry_proto::tonic::common::v1::AnyValue {
                    value: Some(Any::StringValue("r".repeat(i + 1))),
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let scope = |n: usize| ScopeSpans {
            spans: (0..n).map(span).collect(),
            ..Default::default()
        };
        ExportTraceServiceRequest {
            resource_spans: vec![
                ResourceSpans {
                    scope_spans: spans_per_scope.iter().map(|&n| scope(n)).collect(),
                    ..Default::default()
                },
                ResourceSpans {
                    scope_spans: vec![scope(1)],
                    ..Default::default()
                },
            ],
        }
    }

    #[tokio::test]
    async fn both_receivers_count_every_span_and_one_keeps_them() {
        for keep in [false, true] {
            let receiver = Receiver::start(keep).await.unwrap();
            let mut client = TraceServiceClient::connect(receiver.endpoint())
                .await
                .unwrap();
            client.export(request(&[3, 0, 2])).await.unwrap();
            client.export(request(&[4])).await.unwrap();
            assert_eq!(receiver.count(), (3 + 2 + 1) + (4 + 1), "keep: {keep}");
            let kept = receiver.spans();
            match keep {
                true => {
                    assert_eq!(kept.len(), 11);
                    assert_eq!(kept[1].name, "span 1");
                    assert_eq!(kept[1].attributes["run_id"], "rr");
                }
                false => assert!(kept.is_empty()),
            }
        }
    }
}
