//! The relay's web panel on the admin listener: plain server-rendered HTML that works
//! without JavaScript and loads nothing from elsewhere.
//!
//! - `GET /` (and `/panel`): the relay's URL, node ID and policy mode; the connected
//!   nodes (services with public ports, bytes each way, connected since); the nodes in
//!   the policy lists; for each node, allow / deny / revoke / clear buttons. The page
//!   reloads itself every 5 s (`<meta http-equiv="refresh">`).
//! - `POST /panel/policy` (form fields `action`, `node`): the buttons. The same code as
//!   `POST /api/policy` ([`crate::edits::apply_policy_edit`]), then 303 back to `/`.
//! - `GET /panel/invite` and `POST /panel/invite` (fields `expires`, `uses`), grid mode:
//!   issue an invite code and show it once.
//!
//! The admin listener's guard (`ferry_proto::admin`) applies: the token (header or
//! cookie from `/login?token=…`) and the refusal of cross-site form posts. The HTML is
//! maud templates, which escape every value they are given.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::FormRejection;
use axum::extract::{Form, State as Extract};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use ferry_proto::NodeId;
use ferry_proto::admin::{
    age, back_to_panel, html_page, human_bytes, panel_error, panel_form, utc_time,
};
use ferry_proto::frame::ServiceGrant;
use maud::{Markup, html};
use serde::Deserialize;

use crate::policy::{Lists, Mode};
use crate::state::{NodeView, State};

/// How often the panel reloads itself.
const REFRESH_SECONDS: u32 = 5;

/// What the invite form starts with: one friend, one day.
const DEFAULT_INVITE_EXPIRES: &str = "24h";
const DEFAULT_INVITE_USES: u32 = 1;

/// The panel's routes, merged into the admin router.
pub fn routes() -> Router<Arc<State>> {
    Router::new()
        .route("/", get(panel))
        .route("/panel", get(panel))
        .route("/panel/policy", axum::routing::post(policy_form))
        .route("/panel/invite", get(invite_page).post(invite_form))
}

async fn panel(Extract(state): Extract<Arc<State>>) -> Response {
    html_page(
        StatusCode::OK,
        &format!("Ferry relay {}", state.url.host),
        Some(REFRESH_SECONDS),
        render(&state),
    )
}

/// The whole panel body.
fn render(state: &State) -> Markup {
    let mode = state.access.mode();
    let lists = state.access.lists();
    let nodes = state.node_views();
    html! {
        h1 { "Ferry relay" }
        dl {
            dt { "URL" } dd { code #relay-url { (state.url) } }
            dt { "Node ID" } dd { code { (state.id) } }
            dt { "Policy" } dd #policy-mode { (mode) }
            dt { "Policy file" } dd { code { (state.access.policy_path.display()) } }
            dt { "Nodes connected" } dd { (nodes.len()) }
            dt { "Version" } dd { (env!("CARGO_PKG_VERSION")) }
        }
        (nodes_table(&nodes, &lists))
        @if let Some(fleet) = &state.opts.fleet {
            (fleet_table(state, &fleet.name))
        }
        (lists_table(&nodes, &lists))
        @if mode == Mode::Grid {
            h2 { "Invite a friend" }
            (invite_form_html())
            p.note {
                "This page reloads every " (REFRESH_SECONDS) " s; to type at leisure use "
                a href="/panel/invite" { "the invite page" } "."
            }
        }
        p.note {
            @if state.opts.fleet.is_some() {
                "Buttons change the fleet's lists (every relay of the fleet applies them \
                 within a second or two; while the engine is unreachable, deny and revoke \
                 apply here at once and reach the fleet when it answers again, allow and \
                 clear are refused). "
            } @else {
                "Buttons change the policy file and apply at once: a denied or revoked node \
                 is cut off within a second or two. "
            }
            em { "clear" } " removes a node from every list. This page reloads every "
            (REFRESH_SECONDS) " s."
        }
    }
}

/// The fleet (`--fleet`): whether the engine answers, and its live relays.
fn fleet_table(state: &State, name: &str) -> Markup {
    let up = state.metrics.fleet.up.get() == 1;
    let relays: Vec<(NodeId, ferry_proto::RelayUrl)> = ferry_proto::sync::lock(&state.whereabouts)
        .relays()
        .iter()
        .map(|(id, url)| (*id, url.clone()))
        .collect();
    html! {
        h2 { "Fleet " code { (name) } }
        p #fleet-engine {
            @if up { "The fleet's engine answers." }
            @else { "The fleet's engine does not answer: this relay serves with the last policy it saw." }
        }
        table #fleet-relays {
            thead { tr { th { "Relay" } th { "URL" } } }
            tbody {
                @for (id, url) in &relays {
                    tr {
                        td { code { (id) } @if *id == state.id { " (this relay)" } }
                        td { code { (url) } }
                    }
                }
            }
        }
    }
}

/// The lists `node` is on, for the table (`allow, deny`), or `-`.
fn memberships(lists: &Lists, node: &NodeId) -> String {
    let on: Vec<&str> = [
        ("allow", &lists.allow),
        ("deny", &lists.deny),
        ("revoked", &lists.revoked),
        ("admin", &lists.admins),
    ]
    .into_iter()
    .filter(|(_, set)| set.contains(node))
    .map(|(name, _)| name)
    .collect();
    if on.is_empty() {
        "-".to_string()
    } else {
        on.join(", ")
    }
}

/// The four policy buttons of one node: each its own form, so no script is needed.
fn buttons(node: &NodeId) -> Markup {
    html! {
        @for action in ["allow", "deny", "revoke", "clear"] {
            form.act method="post" action="/panel/policy" {
                input type="hidden" name="action" value=(action);
                input type="hidden" name="node" value=(node);
                button type="submit" data-action=(action) data-node=(node) { (action) }
            }
        }
    }
}

/// What a node's service got: its public address, the error, or neither.
fn grant(service: &ServiceGrant) -> Markup {
    html! {
        @match (&service.public_addr, &service.error) {
            (Some(addr), _) => { "public " code { (addr) } }
            (None, Some(e)) => span.err { (e) },
            (None, None) => "overlay only",
        }
    }
}

fn nodes_table(nodes: &[NodeView], lists: &Lists) -> Markup {
    html! {
        h2 { "Connected nodes" }
        @if nodes.is_empty() {
            p #no-nodes { "No node is connected." }
        } @else {
            table #nodes {
                thead { tr {
                    th { "Node ID" } th { "Link" } th { "Services" } th { "Bytes to node" }
                    th { "Bytes from node" } th { "Connected since" } th { "Lists" }
                    th { "Policy" }
                } }
                tbody {
                    @for node in nodes {
                        tr data-node=(node.node_id) {
                            td { code { (node.node_id) } }
                            td { (node.transport) " from " (node.remote_addr) }
                            td {
                                @for s in &node.services {
                                    div { b { (s.name) } ": " (grant(s)) }
                                }
                                @if node.services.is_empty() { "-" }
                            }
                            td title={ (node.bytes_to_node) " B" } { (human_bytes(node.bytes_to_node)) }
                            td title={ (node.bytes_from_node) " B" } { (human_bytes(node.bytes_from_node)) }
                            td { (utc_time(node.connected_since)) " (" (age(node.connected_since)) " ago)" }
                            td { (memberships(lists, &node.node_id)) }
                            td { (buttons(&node.node_id)) }
                        }
                    }
                }
            }
        }
    }
}

/// Every node on one of the policy lists, connected or not.
fn lists_table(nodes: &[NodeView], lists: &Lists) -> Markup {
    let listed: BTreeSet<NodeId> = lists
        .allow
        .iter()
        .chain(&lists.deny)
        .chain(&lists.revoked)
        .chain(&lists.admins)
        .copied()
        .collect();
    html! {
        h2 { "Policy lists" }
        @if listed.is_empty() {
            p { "The allow, deny, revoked and admin lists are empty." }
        } @else {
            table #lists {
                thead { tr {
                    th { "Node ID" } th { "Lists" } th { "Connected" } th { "Policy" }
                } }
                tbody {
                    @for node in &listed {
                        tr data-node=(node) {
                            td { code { (node) } }
                            td { (memberships(lists, node)) }
                            td { @if nodes.iter().any(|n| n.node_id == *node) { "yes" } @else { "no" } }
                            td { (buttons(node)) }
                        }
                    }
                }
            }
        }
    }
}

fn invite_form_html() -> Markup {
    html! {
        form #invite method="post" action="/panel/invite" {
            label { "Expires after " input name="expires" value=(DEFAULT_INVITE_EXPIRES) size="6"; }
            " "
            label { "Uses " input name="uses" type="number" min="1" value=(DEFAULT_INVITE_USES) size="4"; }
            " "
            button type="submit" { "Create invite" }
        }
    }
}

#[derive(Deserialize)]
struct PolicyForm {
    #[serde(default)]
    action: String,
    #[serde(default)]
    node: String,
}

/// A policy button: edit the lists like `POST /api/policy`, then back to the panel.
async fn policy_form(
    Extract(state): Extract<Arc<State>>,
    form: Result<Form<PolicyForm>, FormRejection>,
) -> Response {
    let form = match panel_form(form, "the panel's buttons") {
        Ok(fields) => fields,
        Err(page) => return page,
    };
    let node: NodeId = match form.node.trim().parse() {
        Ok(n) => n,
        Err(e) => return panel_error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    match crate::edits::apply_policy_edit(&state, &form.action, node).await {
        Ok(_) => {
            tracing::info!("panel: {} node {node}", form.action);
            back_to_panel()
        }
        Err((status, e)) => panel_error(status, &e),
    }
}

/// The invite form on a page of its own that does not reload while one types.
async fn invite_page(Extract(state): Extract<Arc<State>>) -> Response {
    let mode = state.access.mode();
    let body = html! {
        h1 { "Invite a friend" }
        @if mode == Mode::Grid {
            (invite_form_html())
            p.note { "Durations look like 30m, 24h or 7d. The code is shown once." }
        } @else {
            p.err {
                "This relay's policy is " (mode) "; invites admit grid members, so run it \
                 with --policy grid."
            }
        }
        p { a href="/" { "Back to the panel" } }
    };
    html_page(StatusCode::OK, "Ferry relay: invite", None, body)
}

#[derive(Deserialize)]
struct InviteForm {
    #[serde(default)]
    expires: String,
    #[serde(default)]
    uses: String,
}

/// Issues an invite like `POST /api/invites` and shows the code. Not a redirect: the
/// code is a secret and must not end up in a URL or the browser history.
async fn invite_form(
    Extract(state): Extract<Arc<State>>,
    form: Result<Form<InviteForm>, FormRejection>,
) -> Response {
    let form = match panel_form(form, "the panel's invite form") {
        Ok(fields) => fields,
        Err(page) => return page,
    };
    let uses = match form.uses.trim() {
        "" => DEFAULT_INVITE_USES,
        text => match text.parse::<u32>() {
            Ok(n) if n >= 1 => n,
            _ => {
                return panel_error(
                    StatusCode::BAD_REQUEST,
                    &format!("uses must be a whole number of at least 1, not {text:?}"),
                );
            }
        },
    };
    let expires = match form.expires.trim() {
        "" => DEFAULT_INVITE_EXPIRES,
        text => text,
    };
    let (code, lifetime) = match crate::edits::issue_invite(&state, expires, uses).await {
        Ok(x) => x,
        Err((status, e)) => return panel_error(status, &e),
    };
    tracing::info!(
        "panel: invite issued for {uses} use(s), expiring in {} s",
        lifetime.as_secs()
    );
    let body = html! {
        h1 { "Invite created" }
        p {
            "Give this code to your friend; it admits " (uses) " node(s) and expires in "
            (expires) ". It is shown only now."
        }
        p { code #invite-code { (code) } }
        p { "Your friend runs:" }
        pre { "ferry-shim join '" (code) "'" }
        p { a href="/" { "Back to the panel" } }
    };
    html_page(StatusCode::OK, "Ferry relay: invite created", None, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buttons_are_plain_forms_for_each_action() {
        let node = ferry_proto::SecretKey::generate().node_id();
        let html = buttons(&node).into_string();
        for action in ["allow", "deny", "revoke", "clear"] {
            assert!(
                html.contains(&format!(
                    "<input type=\"hidden\" name=\"action\" value=\"{action}\">"
                )),
                "{html}"
            );
        }
        assert_eq!(
            html.matches("method=\"post\" action=\"/panel/policy\"")
                .count(),
            4
        );
        assert_eq!(html.matches(&node.to_string()).count(), 8);
    }

    #[test]
    fn memberships_name_every_list() {
        let node = ferry_proto::SecretKey::generate().node_id();
        let mut lists = Lists::default();
        assert_eq!(memberships(&lists, &node), "-");
        lists.deny.insert(node);
        lists.revoked.insert(node);
        assert_eq!(memberships(&lists, &node), "deny, revoked");
    }
}
