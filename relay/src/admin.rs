//! The relay's admin HTTP routes: health, readiness, identity, connected nodes, metrics,
//! invites and the access lists. The web panel (`crate::panel`) is mounted here too
//! and shares the policy-edit and invite logic.

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

/// Issues an invite (`POST /api/invites` and the panel's form): `expires` is a
/// duration such as `24h`. Returns the code and its lifetime, or the status and a
/// message that names the fix.
pub fn issue_invite(
    state: &State,
    expires: &str,
    uses: u32,
) -> Result<(ferry_proto::grid::InviteCode, std::time::Duration), (StatusCode, String)> {
    let lifetime =
        crate::policy::parse_duration(expires).map_err(|e| (StatusCode::BAD_REQUEST, e))?;
    let code = state
        .access
        .invite(&state.url, lifetime, uses)
        .map_err(|e| (StatusCode::CONFLICT, e))?;
    Ok((code, lifetime))
}

/// Issues an invite code (what `ferry-relay invite` calls).
async fn invite(Extract(state): Extract<Arc<State>>, Json(req): Json<InviteRequest>) -> Response {
    match issue_invite(&state, &req.expires, req.uses) {
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

/// Changes the access lists for `node`, saves the policy file and applies it to live
/// sessions at once: a node that is now refused is cut off. `action` is `allow`,
/// `deny`, `revoke` or `clear` (removes the node from every list). Both the JSON
/// route and the panel's buttons come here. Errors carry the HTTP status to answer
/// with and a message that names the fix.
pub fn apply_policy_edit(
    state: &State,
    action: &str,
    node: ferry_proto::NodeId,
) -> Result<crate::policy::Lists, (StatusCode, String)> {
    let change: fn(&mut crate::policy::Lists, ferry_proto::NodeId) = match action {
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
            return Err((
                StatusCode::BAD_REQUEST,
                format!("unknown action {other:?}: use allow, deny, revoke or clear"),
            ));
        }
    };
    state
        .access
        .edit(|lists| change(lists, node))
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e))?;
    crate::server::recheck_sessions(state);
    Ok(state.access.lists())
}

/// `POST /api/policy`: see [`apply_policy_edit`].
async fn edit_policy(
    Extract(state): Extract<Arc<State>>,
    Json(edit): Json<PolicyEdit>,
) -> Response {
    match apply_policy_edit(&state, &edit.action, edit.node) {
        Ok(lists) => Json(json!({ "lists": lists })).into_response(),
        Err((status, e)) => error(status, e),
    }
}
