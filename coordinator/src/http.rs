//! The coordinator's HTTP port: `/metrics` (Prometheus text format), `/healthz` (200 when
//! ready, 503 with the reason while starting, draining or unable to write its store) and
//! `/livez` (200 while the process runs: the liveness probe's, never 503 for a passing state).

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::readiness::Readiness;

pub fn router(prometheus: Option<PrometheusHandle>, readiness: Readiness) -> Router {
    Router::new()
        .route("/livez", get(live))
        .route(
            "/healthz",
            get(move || {
                let answer = match readiness.check() {
                    Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
                    Err(why) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {}\n", why.as_str()),
                    ),
                };
                async move { answer }
            }),
        )
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

/// `/livez`: the process answers. A starting, draining or standby coordinator is alive: a
/// liveness probe that restarted it would only make things worse.
pub async fn live() -> &'static str {
    "alive\n"
}
