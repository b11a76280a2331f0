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
//! cookie from `/login?token=…`) and the refusal of cross-site form posts. Every
//! string that reaches the HTML goes through [`escape_html`].

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::FormRejection;
use axum::extract::{Form, State as Extract};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use ferry_proto::NodeId;
use ferry_proto::admin::{
    age, back_to_panel, escape_html, html_page, human_bytes, panel_error, panel_form, utc_time,
};
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
        &render(&state),
    )
}

/// The whole panel body.
fn render(state: &State) -> String {
    let mode = state.access.mode();
    let lists = state.access.lists();
    let nodes = state.node_views();
    let mut html = String::new();
    let _ = write!(
        html,
        "<h1>Ferry relay</h1>\n<dl>\
         <dt>URL</dt><dd><code id=\"relay-url\">{url}</code></dd>\
         <dt>Node ID</dt><dd><code>{id}</code></dd>\
         <dt>Policy</dt><dd id=\"policy-mode\">{mode}</dd>\
         <dt>Policy file</dt><dd><code>{file}</code></dd>\
         <dt>Nodes connected</dt><dd>{count}</dd>\
         <dt>Version</dt><dd>{version}</dd></dl>\n",
        url = escape_html(&state.url.to_string()),
        id = escape_html(&state.id.to_string()),
        mode = escape_html(&mode.to_string()),
        file = escape_html(&state.access.policy_path.display().to_string()),
        count = nodes.len(),
        version = env!("CARGO_PKG_VERSION"),
    );
    html.push_str(&nodes_table(&nodes, &lists));
    html.push_str(&lists_table(&nodes, &lists));
    if mode == Mode::Grid {
        let _ = write!(
            html,
            "<h2>Invite a friend</h2>\n{}\
             <p class=\"note\">This page reloads every {REFRESH_SECONDS} s; to type at leisure use \
             <a href=\"/panel/invite\">the invite page</a>.</p>\n",
            invite_form_html()
        );
    }
    let _ = writeln!(
        html,
        "<p class=\"note\">Buttons change the policy file and apply at once: a denied or \
         revoked node is cut off within a second or two. <em>clear</em> removes a node from \
         every list. This page reloads every {REFRESH_SECONDS} s.</p>"
    );
    html
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
fn buttons(node: &NodeId) -> String {
    let node = escape_html(&node.to_string());
    let mut html = String::new();
    for action in ["allow", "deny", "revoke", "clear"] {
        let _ = write!(
            html,
            "<form class=\"act\" method=\"post\" action=\"/panel/policy\">\
             <input type=\"hidden\" name=\"action\" value=\"{action}\">\
             <input type=\"hidden\" name=\"node\" value=\"{node}\">\
             <button type=\"submit\" data-action=\"{action}\" data-node=\"{node}\">{action}</button></form>"
        );
    }
    html
}

fn nodes_table(nodes: &[NodeView], lists: &Lists) -> String {
    let mut html = String::from("<h2>Connected nodes</h2>\n");
    if nodes.is_empty() {
        html.push_str("<p id=\"no-nodes\">No node is connected.</p>\n");
        return html;
    }
    html.push_str(
        "<table id=\"nodes\"><thead><tr><th>Node ID</th><th>Link</th><th>Services</th>\
         <th>Bytes to node</th><th>Bytes from node</th><th>Connected since</th><th>Lists</th>\
         <th>Policy</th></tr></thead><tbody>\n",
    );
    for node in nodes {
        let mut services = String::new();
        for s in &node.services {
            let grant = match (&s.public_addr, &s.error) {
                (Some(addr), _) => format!("public <code>{}</code>", escape_html(addr)),
                (None, Some(e)) => format!("<span class=\"err\">{}</span>", escape_html(e)),
                (None, None) => "overlay only".to_string(),
            };
            let _ = write!(
                services,
                "<div><b>{}</b>: {grant}</div>",
                escape_html(&s.name)
            );
        }
        if services.is_empty() {
            services.push('-');
        }
        let _ = writeln!(
            html,
            "<tr data-node=\"{id}\"><td><code>{id}</code></td><td>{transport} from {remote}</td>\
             <td>{services}</td><td title=\"{to} B\">{to_h}</td><td title=\"{from} B\">{from_h}</td>\
             <td>{since} ({age} ago)</td><td>{lists}</td><td>{buttons}</td></tr>",
            id = escape_html(&node.node_id.to_string()),
            transport = node.transport,
            remote = escape_html(&node.remote_addr.to_string()),
            to = node.bytes_to_node,
            to_h = human_bytes(node.bytes_to_node),
            from = node.bytes_from_node,
            from_h = human_bytes(node.bytes_from_node),
            since = utc_time(node.connected_since),
            age = age(node.connected_since),
            lists = memberships(lists, &node.node_id),
            buttons = buttons(&node.node_id),
        );
    }
    html.push_str("</tbody></table>\n");
    html
}

/// Every node on one of the policy lists, connected or not.
fn lists_table(nodes: &[NodeView], lists: &Lists) -> String {
    let listed: BTreeSet<NodeId> = lists
        .allow
        .iter()
        .chain(&lists.deny)
        .chain(&lists.revoked)
        .chain(&lists.admins)
        .copied()
        .collect();
    let mut html = String::from("<h2>Policy lists</h2>\n");
    if listed.is_empty() {
        html.push_str("<p>The allow, deny, revoked and admin lists are empty.</p>\n");
        return html;
    }
    html.push_str(
        "<table id=\"lists\"><thead><tr><th>Node ID</th><th>Lists</th><th>Connected</th>\
         <th>Policy</th></tr></thead><tbody>\n",
    );
    for node in &listed {
        let connected = nodes.iter().any(|n| n.node_id == *node);
        let _ = writeln!(
            html,
            "<tr data-node=\"{id}\"><td><code>{id}</code></td><td>{lists}</td><td>{connected}</td>\
             <td>{buttons}</td></tr>",
            id = escape_html(&node.to_string()),
            lists = memberships(lists, node),
            connected = if connected { "yes" } else { "no" },
            buttons = buttons(node),
        );
    }
    html.push_str("</tbody></table>\n");
    html
}

fn invite_form_html() -> String {
    format!(
        "<form id=\"invite\" method=\"post\" action=\"/panel/invite\">\
         <label>Expires after <input name=\"expires\" value=\"{DEFAULT_INVITE_EXPIRES}\" size=\"6\"></label> \
         <label>Uses <input name=\"uses\" type=\"number\" min=\"1\" value=\"{DEFAULT_INVITE_USES}\" size=\"4\"></label> \
         <button type=\"submit\">Create invite</button></form>\n"
    )
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
    match crate::edits::apply_policy_edit(&state, &form.action, node) {
        Ok(_) => {
            tracing::info!("panel: {} node {node}", form.action);
            back_to_panel()
        }
        Err((status, e)) => panel_error(status, &e),
    }
}

/// The invite form on a page of its own that does not reload while one types.
async fn invite_page(Extract(state): Extract<Arc<State>>) -> Response {
    let body = if state.access.mode() == Mode::Grid {
        format!(
            "<h1>Invite a friend</h1>\n{}<p class=\"note\">Durations look like 30m, 24h or 7d. \
             The code is shown once.</p><p><a href=\"/\">Back to the panel</a></p>",
            invite_form_html()
        )
    } else {
        format!(
            "<h1>Invite a friend</h1><p class=\"err\">This relay's policy is {}; invites admit \
             grid members, so run it with --policy grid.</p><p><a href=\"/\">Back to the panel</a></p>",
            escape_html(&state.access.mode().to_string())
        )
    };
    html_page(StatusCode::OK, "Ferry relay: invite", None, &body)
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
    let (code, lifetime) = match crate::edits::issue_invite(&state, expires, uses) {
        Ok(x) => x,
        Err((status, e)) => return panel_error(status, &e),
    };
    tracing::info!(
        "panel: invite issued for {uses} use(s), expiring in {} s",
        lifetime.as_secs()
    );
    let body = format!(
        "<h1>Invite created</h1>\n<p>Give this code to your friend; it admits {uses} node(s) and \
         expires in {expires}. It is shown only now.</p>\n\
         <p><code id=\"invite-code\">{code}</code></p>\n\
         <p>Your friend runs:</p><pre>ferry-shim join '{code}'</pre>\n\
         <p><a href=\"/\">Back to the panel</a></p>",
        expires = escape_html(expires),
        code = escape_html(&code.to_string()),
    );
    html_page(StatusCode::OK, "Ferry relay: invite created", None, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buttons_are_plain_forms_for_each_action() {
        let node = ferry_proto::SecretKey::generate().node_id();
        let html = buttons(&node);
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
