//! The coordinator's HTTP port: `/metrics` (Prometheus text format) and `/healthz`.

use axum::Router;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

pub fn router(prometheus: Option<PrometheusHandle>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(move || {
                let text = prometheus
                    .as_ref()
                    .map(PrometheusHandle::render)
                    .unwrap_or_else(|| "# no metrics recorder installed\n".to_owned());
                async move { text }
            }),
        )
}
