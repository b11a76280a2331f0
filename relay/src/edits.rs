//! What an operator changes while the relay runs: the access lists (allow, deny,
//! revoke, clear; saved to the policy file and applied to live sessions at once) and
//! invites. The admin API and the web panel both come here, so they cannot differ.

use axum::http::StatusCode;

use crate::policy::ListEdit;
use crate::state::State;

/// Issues an invite (`POST /api/invites` and the panel's form): `expires` is a
/// duration such as `24h`. Returns the code and its lifetime, or the status and a
/// message that names the fix.
pub async fn issue_invite(
    state: &State,
    expires: &str,
    uses: u32,
) -> Result<(ferry_proto::grid::InviteCode, std::time::Duration), (StatusCode, String)> {
    let lifetime =
        crate::policy::parse_duration(expires).map_err(|e| (StatusCode::BAD_REQUEST, e))?;
    let code = state
        .access
        .invite(&state.url, lifetime, uses)
        .await
        .map_err(|e| (StatusCode::CONFLICT, e))?;
    Ok((code, lifetime))
}

/// Changes the access lists for `node`, saves them (the policy file, or the fleet's
/// engine and so every relay of the fleet) and applies them to live sessions at once: a node that is now refused is cut off. `action` is `allow`,
/// `deny`, `revoke` or `clear` (removes the node from every list). Both the JSON
/// route and the panel's buttons come here. Errors carry the HTTP status to answer
/// with and a message that names the fix.
pub async fn apply_policy_edit(
    state: &State,
    action: &str,
    node: ferry_proto::NodeId,
) -> Result<crate::policy::Lists, (StatusCode, String)> {
    let edit: ListEdit = action.parse().map_err(|e| (StatusCode::BAD_REQUEST, e))?;
    state
        .access
        .edit_everywhere(node, edit)
        .await
        .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e))?;
    state.recheck_sessions(true);
    Ok(state.access.lists())
}
