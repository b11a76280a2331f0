//! Grid membership as overlay access (issue #18, item 1), end to end on loopback: a
//! relay in `grid` mode, members that joined by invite, and shims with `allow_grid`.
//! A member reaches another member's service over the overlay with no `--allow`, and
//! the member that was dialled reaches the dialler's service back over the same
//! connection; a node the relay admits but that is no member is refused, and both
//! sides' status says why; a member revoked at the relay loses its overlay connection
//! to the storage node within 5 s (measured and printed) and cannot come back; a shim
//! that was down during a revocation learns it when it reconnects, and keeps it on
//! disk.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_tests::*;

fn ferry_shim(args: &[&str]) -> String {
    let out = Command::new(bin("ferry-shim")).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "ferry-shim {args:?}: {text}");
    text
}

/// Joins `dir/name` to the relay's grid; returns its node ID.
fn member(relay: &Relay, dir: &Path, name: &str) -> String {
    let answer = relay.post_admin(
        "/api/invites",
        serde_json::json!({"expires": "1h", "uses": 1}),
    );
    let code = answer["code"].as_str().expect("an invite code").to_string();
    let data_dir = dir.join(name);
    let out = ferry_shim(&["join", &code, "--data-dir", data_dir.to_str().unwrap()]);
    assert!(out.contains("joined the grid"), "{out}");
    node_id(&data_dir)
}

fn node_id(data_dir: &Path) -> String {
    ferry_shim(&["id", "--data-dir", data_dir.to_str().unwrap()])
        .trim()
        .to_string()
}

/// A shim config: one echo service, `allow_grid`, and a forward to `to` if given.
fn config(dir: &Path, name: &str, to: Option<&str>) -> String {
    let mut text = format!(
        "allow_grid = true\n\n[[service]]\nname = \"echo\"\ntarget = \"{}\"\n",
        echo_server()
    );
    if let Some(to) = to {
        text.push_str(&format!(
            "\n[[forward]]\nto = \"{to}/echo\"\nlisten = \"127.0.0.1:0\"\n"
        ));
    }
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

fn run(dir: &Path, name: &str, config: &str) -> Shim {
    let shim = Shim::start(dir, name, &["run", "--config", config]);
    shim.wait_connected();
    shim
}

fn peer<'a>(status: &'a serde_json::Value, node: &str) -> Option<&'a serde_json::Value> {
    status["peers"]
        .as_array()?
        .iter()
        .find(|p| p["node_id"] == node)
}

fn refusal(status: &serde_json::Value, node: &str, direction: &str) -> Option<String> {
    status["refusals"]
        .as_array()?
        .iter()
        .find(|r| r["node_id"] == node && r["direction"] == direction)
        .and_then(|r| r["reason"].as_str())
        .map(str::to_string)
}

fn echo_through(shim: &Shim, seed: u64, len: usize) {
    let (sent, received, n) = echo_transfer(shim.forward_addr(), seed, len);
    assert_eq!((sent, n), (received, len), "bytes through the overlay");
}

#[test]
fn grid_members_reach_each_other_and_a_revoked_member_is_cut_off_within_5s() {
    let dir = TempDir::new("grid-access");
    let mut relay = Relay::start_args(dir.path(), "25100-25109", &["--policy", "grid"]);
    let storage_id = member(&relay, dir.path(), "storage");
    let client_id = member(&relay, dir.path(), "client");
    let later_id = member(&relay, dir.path(), "later");

    // The storage node lets its grid in and has a way back to the client; the client
    // forwards to the storage node. Neither names the other in an allow list.
    let storage_config = config(dir.path(), "storage", Some(&client_id));
    let storage = run(dir.path(), "storage", &storage_config);
    let client = run(
        dir.path(),
        "client",
        &config(dir.path(), "client", Some(&storage_id)),
    );
    echo_through(&client, 1, 4 << 20);
    let status = storage.status();
    let seen = peer(&status, &client_id).expect("the client among the storage node's peers");
    assert_eq!(seen["access"]["kind"], "member", "{seen}");
    assert!(
        seen["bytes_received"].as_u64().unwrap() >= 4 << 20,
        "{seen}"
    );
    assert_eq!(status["allow_grid"], true);
    assert_eq!(status["grids"][0]["relay"], relay.relay_id().to_string());
    // Back the other way over the connection the client dialled.
    echo_through(&storage, 2, 1 << 20);
    let status = client.status();
    let seen = peer(&status, &storage_id).expect("the storage node among the client's peers");
    assert_eq!(seen["access"]["kind"], "member", "{seen}");
    let shown = ferry_shim(&[
        "status",
        "--admin",
        client.admin.trim_start_matches("http://"),
    ]);
    assert!(
        shown.contains(&format!("peer {storage_id}")) && shown.contains("access grid member"),
        "{shown}"
    );

    // A node the relay admits by its allow list, but no member of the grid: refused
    // by the storage node, and both say why.
    let outsider_dir = dir.path().join("outsider");
    ferry_shim(&["init", "--data-dir", outsider_dir.to_str().unwrap()]);
    let outsider_id = node_id(&outsider_dir);
    relay.post_admin(
        "/api/policy",
        serde_json::json!({"action": "allow", "node": outsider_id}),
    );
    let outsider = Shim::connect(
        dir.path(),
        "outsider",
        &format!("{storage_id}/echo"),
        &relay.url,
    );
    assert!(
        echo_once(outsider.forward_addr(), b"let me in").is_err_or_empty(),
        "a non-member got an answer"
    );
    let why = wait_for("the outsider's refusal", Duration::from_secs(10), || {
        refusal(&outsider.status(), &storage_id, "outbound")
    });
    assert!(
        why.contains("not a member") && why.contains("no membership certificate"),
        "{why}"
    );
    let why = wait_for(
        "the storage node's refusal",
        Duration::from_secs(10),
        || refusal(&storage.status(), &outsider_id, "inbound"),
    );
    assert!(why.contains("not a member"), "{why}");
    drop(outsider);

    // Revoked at the relay: the storage node closes the client's connection within
    // 5 s, and the client cannot reach it again.
    let revoked_at = Instant::now();
    let answer = relay.post_admin(
        "/api/policy",
        serde_json::json!({"action": "revoke", "node": client_id}),
    );
    assert!(answer["lists"]["revoked"].is_array(), "{answer}");
    wait_for(
        "the storage node to drop the revoked client",
        Duration::from_secs(5),
        || peer(&storage.status(), &client_id).is_none().then_some(()),
    );
    let took = revoked_at.elapsed();
    eprintln!(
        "revocation: the storage node closed the revoked member's overlay connection {} ms after the relay's policy change",
        took.as_millis()
    );
    let why = refusal(&storage.status(), &client_id, "inbound").expect("the refusal shown");
    assert!(why.contains("revoked"), "{why}");
    assert!(
        echo_once(client.forward_addr(), b"still there?").is_err_or_empty(),
        "the revoked member still reaches the storage node"
    );

    // A revocation while the storage node is down reaches it when it reconnects,
    // and is kept on disk for a start with no relay in reach.
    drop(storage);
    relay.post_admin(
        "/api/policy",
        serde_json::json!({"action": "revoke", "node": later_id}),
    );
    let storage = run(dir.path(), "storage", &storage_config);
    wait_for("the grid's revocations", Duration::from_secs(10), || {
        let status = storage.status();
        let revoked = status["grids"][0]["revoked"].as_array()?.clone();
        (revoked.iter().any(|n| n == later_id.as_str())
            && revoked.iter().any(|n| n == client_id.as_str()))
        .then_some(())
    });
    drop(storage);
    let kept = std::fs::read_to_string(dir.path().join("storage/membership.json")).unwrap();
    assert!(
        kept.contains(&later_id) && kept.contains(&client_id),
        "{kept}"
    );
    relay.proc.terminate();
}

/// What a refused forward looks like to a stock client: the connection closes with
/// nothing, or fails.
trait ErrOrEmpty {
    fn is_err_or_empty(&self) -> bool;
}

impl ErrOrEmpty for std::io::Result<Vec<u8>> {
    fn is_err_or_empty(&self) -> bool {
        match self {
            Ok(bytes) => bytes.is_empty(),
            Err(_) => true,
        }
    }
}
