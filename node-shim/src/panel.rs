//! The shim's web panel on the admin listener: plain server-rendered HTML that works
//! without JavaScript and loads nothing from elsewhere.
//!
//! - `GET /` (and `/panel`): what `/api/status` says ([`crate::state::Core::status_json`]),
//!   as tables: node ID, relays, services, peers with their paths, forwards and the
//!   network view; then who may reach this node over the overlay. The page reloads
//!   itself every 5 s (`<meta http-equiv="refresh">`).
//! - `POST /panel/peer` (form fields `action` = `allow`/`deny`, `node`): changes the
//!   overlay allow list ([`SharedAllow`]), then 303 back to `/`. Deny takes the node off
//!   the list, refuses it even with `allow_any`, and closes its live connection to this
//!   node with `CLOSE_NOT_ALLOWED`.
//!
//! Changes made here live in memory until the shim restarts; to keep one, put the node
//! in the config file's `allow = [...]` (or `--allow`). The page says so.
//!
//! The admin listener's guard (`ferry_proto::admin`) applies: the token (header or
//! cookie from `/login?token=…`) and the refusal of cross-site form posts. The HTML is
//! maud templates, which escape every value they are given.

use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::FormRejection;
use axum::extract::{Form, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use ferry_proto::NodeId;
use ferry_proto::admin::{back_to_panel, html_page, human_bytes, panel_error, panel_form};
use maud::{Markup, html};
use serde::Deserialize;
use serde_json::Value;

use crate::allow::{AllowList, SharedAllow};
use crate::state::Core;

/// How often the panel reloads itself.
const REFRESH_SECONDS: u32 = 5;

/// The panel's routes, merged into the admin router.
pub fn routes() -> Router<Arc<Core>> {
    Router::new()
        .route("/", get(panel))
        .route("/panel", get(panel))
        .route("/panel/peer", post(peer_form))
}

async fn panel(State(core): State<Arc<Core>>) -> Response {
    let status = core.status_json();
    html_page(
        StatusCode::OK,
        &format!("Ferry node {}", core.node_id.short()),
        Some(REFRESH_SECONDS),
        render(&status, &core.allow.snapshot()),
    )
}

/// A JSON value as table text: strings as they are, null as `-`.
fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A table with a header row and one row per item, or the `empty` line.
fn table(id: &str, headers: &[&str], rows: &[Vec<Markup>], empty: &str) -> Markup {
    html! {
        @if rows.is_empty() {
            p id={ (id) "-none" } { (empty) }
        } @else {
            table id=(id) {
                thead { tr { @for h in headers { th { (h) } } } }
                tbody {
                    @for row in rows {
                        tr { @for cell in row { td { (cell) } } }
                    }
                }
            }
        }
    }
}

fn items(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// One allow or deny button for `node`: a form of its own, so no script is needed.
fn button(action: &str, node: &str) -> Markup {
    html! {
        form.act method="post" action="/panel/peer" {
            input type="hidden" name="action" value=(action);
            input type="hidden" name="node" value=(node);
            button type="submit" data-action=(action) data-node=(node) { (action) }
        }
    }
}

/// Whether `node` may reach this node's services, in words.
fn access_of(allow: &AllowList, node: &str) -> &'static str {
    match node.parse::<NodeId>() {
        Ok(id) if id == allow.me => "this node",
        Ok(id) if allow.denied.contains(&id) => "denied",
        Ok(id) if allow.allows(&id) => "allowed",
        _ => "not allowed",
    }
}

/// A JSON value as a table cell: its text, or `-`.
fn cell(v: &Value) -> Markup {
    html! { (text(v)) }
}

/// A JSON value as `<code>` in a table cell.
fn code(v: &Value) -> Markup {
    html! { code { (text(v)) } }
}

/// An error in red, or `-` when there is none.
fn error(v: &Value) -> Markup {
    html! {
        @match v {
            Value::Null => "-",
            e => span.err { (text(e)) },
        }
    }
}

/// The whole panel body from `/api/status` and the allow list.
fn render(status: &Value, allow: &AllowList) -> Markup {
    let relays: Vec<Vec<Markup>> = items(&status["relays"])
        .iter()
        .map(|r| {
            vec![
                code(&r["url"]),
                cell(&r["role"]),
                html! { b { (text(&r["state"])) } },
                cell(&r["transport"]),
                cell(&r["remote_addr"]),
                cell(&r["observed_addr"]),
                error(&r["error"]),
            ]
        })
        .collect();
    let services: Vec<Vec<Markup>> = items(&status["services"])
        .iter()
        .map(|s| {
            let public = match (&s["public"], &s["error"]) {
                (p @ Value::String(_), _) => code(p),
                (_, e @ Value::String(_)) => error(e),
                _ => html! { "-" },
            };
            vec![
                html! { b { (text(&s["name"])) } },
                code(&s["target"]),
                public,
            ]
        })
        .collect();
    let peers: Vec<Vec<Markup>> = items(&status["peers"])
        .iter()
        .map(|p| {
            let node = text(&p["node_id"]);
            let rtt = p["rtt_ms"]
                .as_f64()
                .map(|ms| format!("{ms:.1} ms"))
                .unwrap_or_else(|| "-".to_string());
            let bytes = |key: &str| match p[key].as_u64() {
                Some(n) => html! { span title={ (n) " B" } { (human_bytes(n)) } },
                None => html! { "-" },
            };
            vec![
                html! { code { (node) } },
                html! { b.path { (text(&p["path"])) } },
                cell(&p["remote_addr"]),
                html! { (rtt) },
                bytes("bytes_sent"),
                bytes("bytes_received"),
                cell(&p["punch"]),
                cell(&p["reason"]),
                html! { (access_of(allow, &node)) },
                html! { (button("allow", &node)) (button("deny", &node)) },
            ]
        })
        .collect();
    let forwards: Vec<Vec<Markup>> = items(&status["forwards"])
        .iter()
        .map(|f| vec![code(&f["listen"]), code(&f["to"])])
        .collect();
    let network = &status["network"];
    let candidates = items(&network["candidates"]);
    html! {
        h1 { "Ferry node" }
        dl {
            dt { "Node ID" } dd { code #node-id { (text(&status["node_id"])) } }
            dt { "Version" } dd { (env!("CARGO_PKG_VERSION")) }
        }
        h2 { "Relays" }
        (table(
            "relays",
            &["URL", "Role", "State", "Transport", "Address", "This node as seen", "Error"],
            &relays,
            "No relay is configured.",
        ))
        h2 { "Services" }
        (table(
            "services",
            &["Name", "Target", "Public address"],
            &services,
            "This node exposes no services.",
        ))
        h2 { "Peers" }
        (table(
            "peers",
            &[
                "Node ID",
                "Path",
                "Remote address",
                "RTT",
                "Bytes sent",
                "Bytes received",
                "Punch",
                "Reason",
                "May reach this node",
                "Overlay access",
            ],
            &peers,
            "No overlay connection is open.",
        ))
        h2 { "Forwards" }
        (table(
            "forwards",
            &["Listening on", "To node/service"],
            &forwards,
            "No forwards.",
        ))
        h2 { "Network" }
        dl {
            dt { "UDP port" } dd { (text(&network["udp_port"])) }
            dt { "NAT mapping" } dd { (text(&network["nat"])) }
            dt { "Priming TTL" } dd { (text(&network["prime_ttl"])) }
            dt { "Announced addresses" }
            dd {
                @for (i, c) in candidates.iter().enumerate() {
                    @if i > 0 { " " }
                    (code(&c["addr"])) " ("
                    (items(&c["sources"]).iter().map(text).collect::<Vec<_>>().join(", "))
                    ")"
                }
                @if candidates.is_empty() { "-" }
            }
        }
        (access_section(allow))
    }
}

/// Who may reach this node over the overlay, with buttons, and a form to allow a
/// node by ID.
fn access_section(allow: &AllowList) -> Markup {
    let row = |node: &NodeId, access: &str, change: &str| {
        let id = node.to_string();
        vec![
            html! { code { (id) } },
            html! { (access) },
            button(change, &id),
        ]
    };
    let rows: Vec<Vec<Markup>> = allow
        .nodes
        .iter()
        .map(|n| row(n, "allowed", "deny"))
        .chain(allow.denied.iter().map(|n| row(n, "denied", "allow")))
        .collect();
    html! {
        h2 { "Overlay access" }
        @if allow.any {
            p { "Any node may connect (" code { "allow_any" } "), except the denied ones below." }
        } @else {
            p { "Only this node and the nodes allowed below may connect." }
        }
        (table("access", &["Node ID", "Access", "Change"], &rows, "No node is on the allow list."))
        form #allow-node method="post" action="/panel/peer" {
            input type="hidden" name="action" value="allow";
            label { "Allow node " input name="node" size="54" placeholder="node ID"; }
            " "
            button type="submit" { "allow" }
        }
        p.note {
            "Changes made on this page last until the shim restarts. To keep one, add the \
             node to " code { "allow = [...]" } " in the config file (or pass "
            code { "--allow" } "); a deny means removing it from there. Deny closes the \
             node's open connection to this node at once."
        }
    }
}

#[derive(Deserialize)]
struct PeerForm {
    #[serde(default)]
    action: String,
    #[serde(default)]
    node: String,
}

/// Applies `action` (`allow` or `deny`) for `node` to the shared allow list.
pub fn apply_peer_action(allow: &SharedAllow, action: &str, node: &str) -> Result<(), String> {
    let node: NodeId = node.trim().parse().map_err(|e| format!("{e}"))?;
    match action {
        "allow" => {
            allow.allow(node);
            Ok(())
        }
        "deny" => allow.deny(node),
        other => Err(format!("unknown action {other:?}: use allow or deny")),
    }
}

/// An allow or deny button, then back to the panel.
async fn peer_form(
    State(core): State<Arc<Core>>,
    form: Result<Form<PeerForm>, FormRejection>,
) -> Response {
    let form = match panel_form(form, "the panel's buttons") {
        Ok(fields) => fields,
        Err(page) => return page,
    };
    match apply_peer_action(&core.allow, &form.action, &form.node) {
        Ok(()) => {
            tracing::info!(
                "panel: {} node {} on the overlay (until restart)",
                form.action,
                form.node.trim()
            );
            back_to_panel()
        }
        Err(e) => panel_error(StatusCode::BAD_REQUEST, &e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::SecretKey;

    fn list() -> (SharedAllow, NodeId, NodeId) {
        let me = SecretKey::generate().node_id();
        let friend = SecretKey::generate().node_id();
        let allow = SharedAllow::new(AllowList {
            me,
            nodes: vec![friend],
            any: false,
            denied: Default::default(),
        });
        (allow, me, friend)
    }

    #[test]
    fn deny_and_allow_change_the_shared_list() {
        let (allow, me, friend) = list();
        assert!(allow.allows(&friend));
        apply_peer_action(&allow, "deny", &friend.to_string()).unwrap();
        assert!(!allow.allows(&friend));
        assert!(allow.snapshot().nodes.is_empty());
        apply_peer_action(&allow, "allow", &friend.to_string()).unwrap();
        assert!(allow.allows(&friend));
        // The node itself cannot be denied, and nonsense is refused with a reason.
        let why = apply_peer_action(&allow, "deny", &me.to_string()).unwrap_err();
        assert!(why.contains("this node itself"), "{why}");
        assert!(apply_peer_action(&allow, "deny", "<script>").is_err());
        let why = apply_peer_action(&allow, "revoke", &friend.to_string()).unwrap_err();
        assert!(why.contains("use allow or deny"), "{why}");
    }

    #[test]
    fn deny_beats_allow_any() {
        let allow = SharedAllow::new(AllowList {
            me: SecretKey::generate().node_id(),
            nodes: Vec::new(),
            any: true,
            denied: Default::default(),
        });
        let stranger = SecretKey::generate().node_id();
        assert!(allow.allows(&stranger));
        allow.deny(stranger).unwrap();
        assert!(!allow.allows(&stranger));
    }

    #[test]
    fn hostile_strings_are_escaped() {
        let (allow, _, _) = list();
        let status = serde_json::json!({
            "node_id": "<script>alert(1)</script>",
            "relays": [{"url": "ferry://x@<b>:1", "role": "relay", "state": "refused",
                        "transport": null, "remote_addr": null, "observed_addr": null,
                        "error": "<img src=x onerror=alert(1)>"}],
            "services": [], "peers": [], "forwards": [], "network": {},
        });
        let html = render(&status, &allow.snapshot()).into_string();
        assert!(
            !html.contains("<script>") && !html.contains("<img"),
            "{html}"
        );
        assert!(
            html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{html}"
        );
        assert!(
            html.contains("&lt;img src=x onerror=alert(1)&gt;"),
            "{html}"
        );
    }
}
