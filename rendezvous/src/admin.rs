//! The standalone rendezvous's admin HTTP routes: health, readiness, identity, metrics.
//! Binding and the token rule are `ferry_proto::admin`'s, as for every Ferry program.

use std::sync::Arc;

use axum::Router;
use axum::extract::State as Extract;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use serde_json::json;

use crate::server::State;

pub fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/api/info", get(info))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn ready(Extract(state): Extract<Arc<State>>) -> Response {
    if state.shutdown.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    } else {
        "ready\n".into_response()
    }
}

async fn info(Extract(state): Extract<Arc<State>>) -> Json<serde_json::Value> {
    Json(json!({
        "node_id": state.id,
        "stun": state.stun_addr,
        "listen": state.listen,
        "nodes_connected": state.sessions.len(),
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

async fn metrics(Extract(state): Extract<Arc<State>>) -> Response {
    ferry_proto::admin::metrics_response(&state.registry)
}
