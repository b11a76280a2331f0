//! The shim's admin HTTP routes: health, readiness, identity, status, metrics, and the
//! web panel (`crate::panel`), which renders [`status_json`].

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use serde_json::json;

use crate::shim::Core;

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

/// The shape of `/api/status` (SPEC §5): node_id, relays, services, peers, plus forwards.
pub fn status_json(core: &Core) -> serde_json::Value {
    let relays = core.relay_statuses();
    let relay_addr = relays
        .iter()
        .find(|r| r.state == "connected")
        .and_then(|r| r.remote_addr);
    let policy = &core.opts.policy;
    let mut network = serde_json::to_value(core.overlay.paths.local_view()).unwrap_or_default();
    network["port_mapping"] = json!(*core.port_mapping.lock().unwrap_or_else(|p| p.into_inner()));
    json!({
        "node_id": core.node_id,
        "mode": policy.mode,
        "forbids": policy.forbids(),
        "proxy": core.opts.proxy,
        "socks": core.socks_addr,
        "relays": relays,
        "services": core.service_statuses(),
        "peers": core.overlay.peer_views(relay_addr),
        "forwards": core.forwards,
        "network": network,
    })
}

async fn status(State(core): State<Arc<Core>>) -> Json<serde_json::Value> {
    Json(status_json(&core))
}

async fn metrics(State(core): State<Arc<Core>>) -> Response {
    ferry_proto::admin::metrics_response(&core.metrics.registry)
}
