//! The relay's admin HTTP routes: health, readiness, identity, connected nodes, metrics,
//! invites and the access lists.

use std::sync::Arc;

use axum::Router;
use axum::extract::State as Extract;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use crate::server::State;

pub fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/api/info", get(info))
        .route("/api/nodes", get(nodes))
        .route("/metrics", get(metrics))
        .route("/api/invites", post(invite))
        .route("/api/policy", get(policy).post(edit_policy))
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

/// Issues an invite code (what `ferry-relay invite` and the panel call).
async fn invite(Extract(state): Extract<Arc<State>>, Json(req): Json<InviteRequest>) -> Response {
    let lifetime = match crate::policy::parse_duration(&req.expires) {
        Ok(d) => d,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match state.access.invite(&state.url, lifetime, req.uses) {
        Ok(code) => Json(json!({
            "code": code.to_string(),
            "expires_in_s": lifetime.as_secs(),
            "uses": req.uses.max(1),
        }))
        .into_response(),
        Err(e) => error(StatusCode::CONFLICT, e),
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

/// Changes the access lists, saves the policy file and applies it to live sessions
/// at once (the panel's allow/deny/revoke buttons).
async fn edit_policy(
    Extract(state): Extract<Arc<State>>,
    Json(edit): Json<PolicyEdit>,
) -> Response {
    let node = edit.node;
    let change: fn(&mut crate::policy::Lists, ferry_proto::NodeId) = match edit.action.as_str() {
        "allow" => |l, n| {
            l.deny.remove(&n);
            l.revoked.remove(&n);
            l.allow.insert(n);
        },
        "deny" => |l, n| {
            l.allow.remove(&n);
            l.deny.insert(n);
        },
        "revoke" => |l, n| {
            l.allow.remove(&n);
            l.revoked.insert(n);
        },
        "clear" => |l, n| {
            l.allow.remove(&n);
            l.deny.remove(&n);
            l.revoked.remove(&n);
        },
        other => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("unknown action {other:?}: use allow, deny, revoke or clear"),
            );
        }
    };
    if let Err(e) = state.access.edit(|lists| change(lists, node)) {
        return error(StatusCode::INTERNAL_SERVER_ERROR, e);
    }
    crate::server::recheck_sessions(&state);
    Json(json!({ "lists": state.access.lists() })).into_response()
}
