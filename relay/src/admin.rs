//! The relay's admin HTTP routes: health, readiness, identity, connected nodes, metrics.

use std::sync::Arc;

use axum::Router;
use axum::extract::State as Extract;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use serde_json::json;

use crate::server::State;

pub fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/api/info", get(info))
        .route("/api/nodes", get(nodes))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn ready(Extract(state): Extract<Arc<State>>) -> Response {
    if state.shutdown.is_cancelled() {
        (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "shutting down\n",
        )
            .into_response()
    } else {
        "ready\n".into_response()
    }
}

async fn info(Extract(state): Extract<Arc<State>>) -> Json<serde_json::Value> {
    Json(json!({
        "node_id": state.id,
        "url": state.url,
        "listen": state.listen,
        "public_host": state.url.host,
        "ports": format!("{}-{}", state.opts.ports.start(), state.opts.ports.end()),
        "version": env!("CARGO_PKG_VERSION"),
        "nodes_connected": state.registry.len(),
        // The embedded rendezvous: its STUN address (null when off).
        "stun": state.stun_addr,
        "rendezvous": state.stun_addr.is_some(),
    }))
}

async fn nodes(Extract(state): Extract<Arc<State>>) -> impl IntoResponse {
    Json(state.node_views())
}

async fn metrics(Extract(state): Extract<Arc<State>>) -> Response {
    ferry_proto::admin::metrics_response(&state.metrics.registry)
}
