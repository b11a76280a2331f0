//! The shim's web panel on the admin listener: plain server-rendered HTML that works
//! without JavaScript and loads nothing from elsewhere.
//!
//! - `GET /` (and `/panel`): what `/api/status` says ([`crate::status::Status`]),
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
use ferry_proto::record::NatMapping;
use maud::{Markup, html};
use serde::Deserialize;

use crate::allow::{AllowList, SharedAllow};
use crate::state::Core;
use crate::status::{Direction, PeerAccess, PeerStatus, Status};

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
    let status = core.status();
    html_page(
        StatusCode::OK,
        &format!("Ferry node {}", core.node_id.short()),
        Some(REFRESH_SECONDS),
        render(&status, &core.allow.snapshot()),
    )
}

/// An optional value as table text, `-` when there is none.
fn text<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".to_string())
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

/// Whether a peer may reach this node's services, in words: a run-time deny first
/// (it acts at once), then how the peer was let in, or why not.
fn access_of(allow: &AllowList, peer: &PeerStatus) -> Markup {
    if allow.denied.contains(&peer.node_id) {
        return html! { "denied" };
    }
    match &peer.access {
        Some(PeerAccess::NotAllowed { reason }) => {
            html! { span.err title=(reason) { "not allowed" } }
        }
        Some(access) => html! { (access.describe()) },
        None if allow.allows(&peer.node_id) => html! { "allowed" },
        None => html! { "not allowed" },
    }
}

/// An optional value as `<code>` in a table cell, or `-`.
fn code<T: std::fmt::Display>(v: Option<T>) -> Markup {
    html! { code { (text(v)) } }
}

/// An error in red, or `-` when there is none.
fn error(e: Option<&str>) -> Markup {
    html! {
        @match e {
            None => "-",
            Some(e) => span.err { (e) },
        }
    }
}

/// The whole panel body from the status and the allow list.
fn render(status: &Status, allow: &AllowList) -> Markup {
    let relays: Vec<Vec<Markup>> = status
        .relays
        .iter()
        .map(|r| {
            vec![
                code(Some(&r.url)),
                html! { (r.role.name()) },
                html! { b { (r.state.name()) } },
                html! { (text(r.transport)) },
                html! { (text(r.remote_addr)) },
                html! { (text(r.observed_addr)) },
                error(r.error.as_deref()),
            ]
        })
        .collect();
    let services: Vec<Vec<Markup>> = status
        .services
        .iter()
        .map(|s| {
            let public = match (&s.public, &s.error) {
                (Some(p), _) => code(Some(p)),
                (None, e) => error(e.as_deref()),
            };
            vec![html! { b { (s.name) } }, code(Some(&s.target)), public]
        })
        .collect();
    let peers: Vec<Vec<Markup>> = status
        .peers
        .iter()
        .map(|p| {
            let node = p.node_id.to_string();
            let bytes = |n: u64| html! { span title={ (n) " B" } { (human_bytes(n)) } };
            vec![
                html! { code { (node) } },
                html! { b.path { (p.path.name()) } },
                html! { (text(p.remote_addr)) },
                html! { (format!("{:.1} ms", p.rtt_ms)) },
                bytes(p.bytes_sent),
                bytes(p.bytes_received),
                html! { (p.punch.name()) },
                html! { (text(p.reason.as_ref())) },
                html! { (access_of(allow, p)) },
                html! { (button("allow", &node)) (button("deny", &node)) },
            ]
        })
        .collect();
    let forwards: Vec<Vec<Markup>> = status
        .forwards
        .iter()
        .map(|f| vec![code(Some(f.listen)), code(Some(&f.to))])
        .collect();
    let refusals: Vec<Vec<Markup>> = status
        .refusals
        .iter()
        .map(|r| {
            vec![
                code(Some(r.node_id)),
                html! {
                    (match r.direction {
                        Direction::Inbound => "this node refused it",
                        Direction::Outbound => "it refused this node",
                    })
                },
                error(Some(&r.reason)),
            ]
        })
        .collect();
    let network = &status.network.local;
    let candidates = &network.candidates;
    html! {
        h1 { "Ferry node" }
        dl {
            dt { "Node ID" } dd { code #node-id { (status.node_id) } }
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
        h2 { "Refused" }
        (table(
            "refusals",
            &["Node ID", "Which way", "Why"],
            &refusals,
            "No overlay refusals.",
        ))
        h2 { "Network" }
        dl {
            dt { "UDP port" } dd { (network.udp_port) }
            dt { "NAT mapping" } dd { (text(network.nat.map(NatMapping::name))) }
            dt { "Priming TTL" } dd { (text(network.prime_ttl)) }
            dt { "Announced addresses" }
            dd {
                @for (i, c) in candidates.iter().enumerate() {
                    @if i > 0 { " " }
                    (code(Some(c.addr))) " ("
                    (c.sources.iter().map(|s| s.name()).collect::<Vec<_>>().join(", "))
                    ")"
                }
                @if candidates.is_empty() { "-" }
            }
        }
        (access_section(allow, status))
    }
}

/// Who may reach this node over the overlay, with buttons, and a form to allow a
/// node by ID.
fn access_section(allow: &AllowList, status: &Status) -> Markup {
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
        } @else if allow.grid {
            p { "This node, the nodes allowed below and members of this node's grids (" code { "allow_grid" } ") may connect, except the denied ones." }
        } @else {
            p { "Only this node and the nodes allowed below may connect." }
        }
        @for g in &status.grids {
            p.grid {
                "Grid of relay " code { (g.relay) } ": " (g.admins.len()) " admin key(s), "
                (g.revoked.len()) " revoked member(s)."
            }
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
        let allow = SharedAllow::new(AllowList::new(me, vec![friend], false));
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
        let allow = SharedAllow::new(AllowList::new(
            SecretKey::generate().node_id(),
            Vec::new(),
            true,
        ));
        let stranger = SecretKey::generate().node_id();
        assert!(allow.allows(&stranger));
        allow.deny(stranger).unwrap();
        assert!(!allow.allows(&stranger));
    }

    #[test]
    fn hostile_strings_are_escaped() {
        let (allow, _, _) = list();
        // Strings that come from config, relays and peers: a service name, a relay's
        // error, why a peer is relayed, a forward's target.
        let mut status = crate::status::tests::sample();
        status.services[0].name = "<script>alert(1)</script>".to_string();
        status.relays[0].error = Some("<img src=x onerror=alert(1)>".to_string());
        status.peers[0].reason = Some("<script>alert(1)</script>".to_string());
        status.forwards[0].to = "<img src=x onerror=alert(1)>".to_string();
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
