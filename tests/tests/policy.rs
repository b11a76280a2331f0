//! The relay's access policy end to end (issue #4): in `grid` mode an unknown node is
//! refused and told why, redeems an invite code (`ferry-relay invite`, `ferry-shim
//! join`) and is admitted without naming the relay again, a used code cannot be used
//! twice, a broken policy file keeps the old policy, and a revocation written to the
//! policy file cuts the member off within 5 s. In `allowlist` mode the admin API's
//! allow and deny change who gets in.

use std::process::Command;
use std::time::{Duration, Instant};

use ferry_tests::*;

fn refused_with(shim: &Shim, needle: &str, limit: Duration) -> String {
    wait_for(
        &format!("the relay to refuse with {needle:?}"),
        limit,
        || {
            let status = shim.status();
            let relay = &status["relays"][0];
            let error = relay["error"].as_str().unwrap_or_default().to_string();
            (relay["state"] == "refused" && error.contains(needle)).then_some(error)
        },
    )
}

fn invite(relay: &Relay, uses: &str) -> String {
    let admin = relay.admin.trim_start_matches("http://");
    let out = Command::new(bin("ferry-relay"))
        .args([
            "invite",
            "--admin",
            admin,
            "--expires",
            "1h",
            "--uses",
            uses,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let code = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(
        code.starts_with(&relay.url) && code.contains("?invite="),
        "{code}"
    );
    code
}

fn join(data_dir: &std::path::Path, code: &str) -> (bool, String) {
    let out = Command::new(bin("ferry-shim"))
        .args(["join", code, "--data-dir", data_dir.to_str().unwrap()])
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn grid_members_join_with_an_invite_and_are_cut_off_when_revoked() {
    let dir = TempDir::new("policy-grid");
    let relay = Relay::start_args(dir.path(), "22600-22609", &["--policy", "grid"]);

    // A node that is not a member is refused, and told how to become one.
    let outsider = Shim::expose_echo(dir.path(), "friend", &relay.url, &["--public"]);
    let why = refused_with(&outsider, "not a member", Duration::from_secs(10));
    assert!(why.contains("ferry-shim join"), "{why}");
    assert!(relay.metric("ferry_relay_refusals_total{reason=\"not_a_member\"}") >= 1.0);
    drop(outsider);

    // An invite admits it; the relay is remembered, so expose needs no --relay.
    let code = invite(&relay, "1");
    let friend_dir = dir.path().join("friend");
    let (ok, out) = join(&friend_dir, &code);
    assert!(ok, "{out}");
    assert!(out.contains("joined the grid"), "{out}");
    let service = format!("echo={}", echo_server());
    let friend = Shim::start(
        dir.path(),
        "friend",
        &["expose", "--service", &service, "--public"],
    );
    friend.wait_connected();
    let public = friend.public_addr("echo");
    assert_eq!(echo_once(public, b"member").unwrap(), b"member");
    assert_eq!(
        relay.metric("ferry_relay_joins_total{outcome=\"joined\"}"),
        1.0
    );

    // The code was for one use: a second node cannot redeem it.
    let (ok, out) = join(&dir.path().join("gatecrasher"), &code);
    assert!(!ok && out.contains("already used"), "{out}");

    // A broken policy file keeps the policy in force.
    let policy = dir.path().join("relay/policy.toml");
    std::fs::write(&policy, "revoked = [\"this is not a node id\"]\n").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(friend.status()["relays"][0]["state"], "connected");
    assert!(
        relay.proc.log().contains("keeping the old policy"),
        "{}",
        relay.proc.log()
    );

    // Revocation through the policy file: the live session is cut within 5 s and its
    // public port stops answering.
    let revoked_at = Instant::now();
    std::fs::write(&policy, format!("revoked = [\"{}\"]\n", friend.node_id)).unwrap();
    let why = refused_with(&friend, "revoked", Duration::from_secs(5));
    eprintln!(
        "revoked member cut off after {} ms: {why}",
        revoked_at.elapsed().as_millis()
    );
    assert!(
        echo_once(public, b"x").is_err(),
        "the public port still answers"
    );
    assert!(relay.metric("ferry_relay_refusals_total{reason=\"revoked\"}") >= 1.0);
}

#[test]
fn allowlist_mode_admits_listed_nodes_and_deny_cuts_them_off() {
    let dir = TempDir::new("policy-allowlist");
    let relay = Relay::start_args(dir.path(), "22610-22619", &["--policy", "allowlist"]);
    let node = Shim::expose_echo(dir.path(), "node", &relay.url, &[]);
    let why = refused_with(&node, "allow list", Duration::from_secs(10));
    assert!(why.contains(&node.node_id), "{why}");
    drop(node);

    // Invites make no sense outside grid mode, and the relay says so.
    let answer = relay.post_admin(
        "/api/invites",
        serde_json::json!({"expires": "1h", "uses": 1}),
    );
    assert!(
        answer["error"]
            .as_str()
            .unwrap_or_default()
            .contains("--policy grid"),
        "{answer}"
    );

    // Allow it through the API (what the panel's button does), then it gets in.
    let node = Shim::expose_echo(dir.path(), "node", &relay.url, &[]);
    let answer = relay.post_admin(
        "/api/policy",
        serde_json::json!({"action": "allow", "node": node.node_id}),
    );
    assert!(
        answer["lists"]["allow"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n == node.node_id.as_str()),
        "{answer}"
    );
    drop(node);
    let node = Shim::expose_echo(dir.path(), "node", &relay.url, &[]);
    node.wait_connected();

    // Deny takes effect on the live session at once.
    let answer = relay.post_admin(
        "/api/policy",
        serde_json::json!({"action": "deny", "node": node.node_id}),
    );
    assert!(answer["lists"]["deny"].is_array(), "{answer}");
    refused_with(&node, "deny list", Duration::from_secs(5));
    let answer = relay.post_admin(
        "/api/policy",
        serde_json::json!({"action": "banish", "node": node.node_id}),
    );
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("allow, deny, revoke"),
        "{answer}"
    );
}
