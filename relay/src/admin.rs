//! The relay's admin HTTP routes: health, readiness, identity, connected nodes, metrics,
//! invites and the access lists. The web panel (`crate::panel`) is mounted here too;
//! both make their changes through `crate::edits`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State as Extract;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use crate::state::State;

pub fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/api/info", get(info))
        .route("/api/nodes", get(nodes))
        .route("/metrics", get(metrics))
        .route("/api/invites", post(invite))
        .route("/api/policy", get(policy).post(edit_policy))
        .merge(crate::panel::routes())
        .with_state(state)
}

async fn ready(Extract(state): Extract<Arc<State>>) -> Response {
    if state.shutdown.is_cancelled() || state.draining.load(std::sync::atomic::Ordering::Relaxed) {
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
        // The fleet (`--fleet`): its name, whether its engine is reached now, its
        // other live relays (those `locate` may name), and the relays whose
        // certificates are good here (the live ones and those seen in the last
        // minutes).
        "fleet": state.opts.fleet.as_ref().map(|f| json!({
            "name": f.name,
            "up": state.metrics.fleet.up.get() == 1,
            "relays": ferry_proto::sync::lock(&state.whereabouts)
                .relays()
                .keys()
                .filter(|id| **id != state.id)
                .collect::<Vec<_>>(),
            "admins": state.access.fleet_relays(),
        })),
    }))
}

async fn nodes(Extract(state): Extract<Arc<State>>) -> impl IntoResponse {
    Json(state.node_views())
}

async fn metrics(Extract(state): Extract<Arc<State>>) -> Response {
    ferry_proto::admin::metrics_response(&state.metrics.registry)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InviteRequest {
    /// e.g. "24h".
    expires: String,
    uses: u32,
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

/// Issues an invite code (what `ferry-relay invite` calls).
async fn invite(Extract(state): Extract<Arc<State>>, Json(req): Json<InviteRequest>) -> Response {
    match crate::edits::issue_invite(&state, &req.expires, req.uses).await {
        Ok((code, lifetime)) => Json(json!({
            "code": code.to_string(),
            "expires_in_s": lifetime.as_secs(),
            "uses": req.uses.max(1),
        }))
        .into_response(),
        Err((status, e)) => error(status, e),
    }
}

async fn policy(Extract(state): Extract<Arc<State>>) -> Json<serde_json::Value> {
    Json(json!({
        "mode": state.access.mode().to_string(),
        "file": state.access.policy_path,
        "lists": state.access.lists(),
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyEdit {
    /// allow, deny, revoke, or clear (removes the node from every list).
    action: String,
    node: ferry_proto::NodeId,
}

/// `POST /api/policy`: see [`crate::edits::apply_policy_edit`].
async fn edit_policy(
    Extract(state): Extract<Arc<State>>,
    Json(edit): Json<PolicyEdit>,
) -> Response {
    match crate::edits::apply_policy_edit(&state, &edit.action, edit.node).await {
        Ok(lists) => Json(json!({ "lists": lists })).into_response(),
        Err((status, e)) => error(status, e),
    }
}
