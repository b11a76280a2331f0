//! The standalone rendezvous's admin HTTP routes (health, readiness, identity,
//! metrics) and the `State` they read, which `server` fills in at start.
//! Binding and the token rule are `ferry_proto::admin`'s, as for every Ferry program.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State as Extract;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use ferry_proto::NodeId;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::RendezvousOptions;
use crate::node_sessions::NodeSessions;

/// What the admin routes see.
pub struct State {
    pub id: NodeId,
    pub stun_addr: SocketAddr,
    /// Where node sessions are accepted (QUIC).
    pub listen: SocketAddr,
    pub sessions: Arc<NodeSessions>,
    pub opts: RendezvousOptions,
    /// Every `ferry_rendezvous_*` metric of this process.
    pub registry: prometheus::Registry,
    pub shutdown: CancellationToken,
    /// `ferry_rendezvous_fleet_up` with `--fleet`.
    pub fleet_up: Option<prometheus::IntGauge>,
}

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
        "fleet": state.opts.fleet.as_ref().map(|fleet| json!({
            "name": fleet.name,
            "up": state.fleet_up.as_ref().is_some_and(|up| up.get() == 1),
        })),
    }))
}

async fn metrics(Extract(state): Extract<Arc<State>>) -> Response {
    ferry_proto::admin::metrics_response(&state.registry)
}
