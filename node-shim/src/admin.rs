//! The shim's admin HTTP routes: health, readiness, identity, status, metrics, and the
//! web panel (`crate::panel`); both show `Core::status` (`crate::status::Status`).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use serde_json::json;

use crate::state::Core;

pub fn router(core: Arc<Core>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/api/info", get(info))
        .route("/api/status", get(status))
        .route("/metrics", get(metrics))
        .merge(crate::panel::routes())
        .with_state(core)
}

async fn ready(State(core): State<Arc<Core>>) -> Response {
    if core.ready() {
        "ready\n".into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: not every relay has a registered session yet\n",
        )
            .into_response()
    }
}

async fn info(State(core): State<Arc<Core>>) -> Json<serde_json::Value> {
    Json(json!({
        "node_id": core.node_id,
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

async fn status(State(core): State<Arc<Core>>) -> Json<crate::status::Status> {
    Json(core.status())
}

async fn metrics(State(core): State<Arc<Core>>) -> Response {
    ferry_proto::admin::metrics_response(&core.metrics.registry)
}
