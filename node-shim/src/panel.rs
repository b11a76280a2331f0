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
//! cookie from `/login?token=…`) and the refusal of cross-site form posts. Every
//! string that reaches the HTML goes through [`escape_html`].

use std::fmt::Write as _;
use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::FormRejection;
use axum::extract::{Form, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use ferry_proto::NodeId;
use ferry_proto::admin::{
    back_to_panel, escape_html, html_page, human_bytes, panel_error, panel_form,
};
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
        &render(&status, &core.allow.snapshot()),
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

/// A table with a header row and one row per item, each cell already HTML.
fn table(id: &str, headers: &[&str], rows: &[Vec<String>], empty: &str) -> String {
    if rows.is_empty() {
        return format!("<p id=\"{id}-none\">{}</p>\n", escape_html(empty));
    }
    let mut html = format!("<table id=\"{id}\"><thead><tr>");
    for h in headers {
        let _ = write!(html, "<th>{}</th>", escape_html(h));
    }
    html.push_str("</tr></thead><tbody>\n");
    for row in rows {
        html.push_str("<tr>");
        for cell in row {
            let _ = write!(html, "<td>{cell}</td>");
        }
        html.push_str("</tr>\n");
    }
    html.push_str("</tbody></table>\n");
    html
}

fn items(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// One allow or deny button for `node`: a form of its own, so no script is needed.
fn button(action: &str, node: &str) -> String {
    let node = escape_html(node);
    format!(
        "<form class=\"act\" method=\"post\" action=\"/panel/peer\">\
         <input type=\"hidden\" name=\"action\" value=\"{action}\">\
         <input type=\"hidden\" name=\"node\" value=\"{node}\">\
         <button type=\"submit\" data-action=\"{action}\" data-node=\"{node}\">{action}</button></form>"
    )
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

/// The whole panel body from `/api/status` and the allow list.
fn render(status: &Value, allow: &AllowList) -> String {
    let mut html = String::new();
    let _ = write!(
        html,
        "<h1>Ferry node</h1>\n<dl><dt>Node ID</dt><dd><code id=\"node-id\">{}</code></dd>\
         <dt>Version</dt><dd>{}</dd></dl>\n",
        escape_html(&text(&status["node_id"])),
        env!("CARGO_PKG_VERSION"),
    );

    let relays: Vec<Vec<String>> = items(&status["relays"])
        .iter()
        .map(|r| {
            let error = match &r["error"] {
                Value::Null => "-".to_string(),
                e => format!("<span class=\"err\">{}</span>", escape_html(&text(e))),
            };
            vec![
                format!("<code>{}</code>", escape_html(&text(&r["url"]))),
                escape_html(&text(&r["role"])),
                format!("<b>{}</b>", escape_html(&text(&r["state"]))),
                escape_html(&text(&r["transport"])),
                escape_html(&text(&r["remote_addr"])),
                escape_html(&text(&r["observed_addr"])),
                error,
            ]
        })
        .collect();
    html.push_str("<h2>Relays</h2>\n");
    html.push_str(&table(
        "relays",
        &[
            "URL",
            "Role",
            "State",
            "Transport",
            "Address",
            "This node as seen",
            "Error",
        ],
        &relays,
        "No relay is configured.",
    ));

    let services: Vec<Vec<String>> = items(&status["services"])
        .iter()
        .map(|s| {
            let public = match (&s["public"], &s["error"]) {
                (Value::String(p), _) => format!("<code>{}</code>", escape_html(p)),
                (_, Value::String(e)) => format!("<span class=\"err\">{}</span>", escape_html(e)),
                _ => "-".to_string(),
            };
            vec![
                format!("<b>{}</b>", escape_html(&text(&s["name"]))),
                format!("<code>{}</code>", escape_html(&text(&s["target"]))),
                public,
            ]
        })
        .collect();
    html.push_str("<h2>Services</h2>\n");
    html.push_str(&table(
        "services",
        &["Name", "Target", "Public address"],
        &services,
        "This node exposes no services.",
    ));

    let peers: Vec<Vec<String>> = items(&status["peers"])
        .iter()
        .map(|p| {
            let node = text(&p["node_id"]);
            let rtt = p["rtt_ms"]
                .as_f64()
                .map(|ms| format!("{ms:.1} ms"))
                .unwrap_or_else(|| "-".to_string());
            let bytes = |key: &str| {
                p[key]
                    .as_u64()
                    .map(|n| format!("<span title=\"{n} B\">{}</span>", human_bytes(n)))
                    .unwrap_or_else(|| "-".to_string())
            };
            vec![
                format!("<code>{}</code>", escape_html(&node)),
                format!("<b class=\"path\">{}</b>", escape_html(&text(&p["path"]))),
                escape_html(&text(&p["remote_addr"])),
                rtt,
                bytes("bytes_sent"),
                bytes("bytes_received"),
                escape_html(&text(&p["punch"])),
                escape_html(&text(&p["reason"])),
                access_of(allow, &node).to_string(),
                format!("{}{}", button("allow", &node), button("deny", &node)),
            ]
        })
        .collect();
    html.push_str("<h2>Peers</h2>\n");
    html.push_str(&table(
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
    ));

    let forwards: Vec<Vec<String>> = items(&status["forwards"])
        .iter()
        .map(|f| {
            vec![
                format!("<code>{}</code>", escape_html(&text(&f["listen"]))),
                format!("<code>{}</code>", escape_html(&text(&f["to"]))),
            ]
        })
        .collect();
    html.push_str("<h2>Forwards</h2>\n");
    html.push_str(&table(
        "forwards",
        &["Listening on", "To node/service"],
        &forwards,
        "No forwards.",
    ));

    let network = &status["network"];
    let candidates: Vec<String> = items(&network["candidates"])
        .iter()
        .map(|c| {
            let sources: Vec<String> = items(&c["sources"]).iter().map(text).collect();
            format!(
                "<code>{}</code> ({})",
                escape_html(&text(&c["addr"])),
                escape_html(&sources.join(", "))
            )
        })
        .collect();
    let _ = write!(
        html,
        "<h2>Network</h2>\n<dl><dt>UDP port</dt><dd>{}</dd><dt>NAT mapping</dt><dd>{}</dd>\
         <dt>Priming TTL</dt><dd>{}</dd><dt>Announced addresses</dt><dd>{}</dd></dl>\n",
        escape_html(&text(&network["udp_port"])),
        escape_html(&text(&network["nat"])),
        escape_html(&text(&network["prime_ttl"])),
        if candidates.is_empty() {
            "-".to_string()
        } else {
            candidates.join(" ")
        },
    );

    html.push_str(&access_section(allow));
    html
}

/// Who may reach this node over the overlay, with buttons, and a form to allow a
/// node by ID.
fn access_section(allow: &AllowList) -> String {
    let mut html = String::from("<h2>Overlay access</h2>\n");
    if allow.any {
        html.push_str(
            "<p>Any node may connect (<code>allow_any</code>), except the denied ones below.</p>\n",
        );
    } else {
        html.push_str("<p>Only this node and the nodes allowed below may connect.</p>\n");
    }
    let mut rows: Vec<Vec<String>> = allow
        .nodes
        .iter()
        .map(|n| {
            let id = n.to_string();
            vec![
                format!("<code>{}</code>", escape_html(&id)),
                "allowed".to_string(),
                button("deny", &id),
            ]
        })
        .collect();
    rows.extend(allow.denied.iter().map(|n| {
        let id = n.to_string();
        vec![
            format!("<code>{}</code>", escape_html(&id)),
            "denied".to_string(),
            button("allow", &id),
        ]
    }));
    html.push_str(&table(
        "access",
        &["Node ID", "Access", "Change"],
        &rows,
        "No node is on the allow list.",
    ));
    html.push_str(
        "<form id=\"allow-node\" method=\"post\" action=\"/panel/peer\">\
         <input type=\"hidden\" name=\"action\" value=\"allow\">\
         <label>Allow node <input name=\"node\" size=\"54\" placeholder=\"node ID\"></label> \
         <button type=\"submit\">allow</button></form>\n\
         <p class=\"note\">Changes made on this page last until the shim restarts. To keep \
         one, add the node to <code>allow = [...]</code> in the config file (or pass \
         <code>--allow</code>); a deny means removing it from there. Deny closes the node's \
         open connection to this node at once.</p>\n",
    );
    html
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
        let html = render(&status, &allow.snapshot());
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
