//! A fleet of relays on a real NATS JetStream cluster (#19): three Debian
//! `nats-server`s on loopback, two relays with `--policy grid --fleet`. One test, so
//! the file starts one cluster:
//!
//! - an invite issued at relay A is redeemed at relay B, and B's certificate is good
//!   at A (the fleet's relays are each other's grid admins);
//! - a revocation made at A's admin API cuts the member's live session at B within
//!   2 s (measured and printed), and A refuses it too;
//! - invite races across the two relays: a single-use invite redeemed by two nodes
//!   at once, one at each relay, admits exactly one, in 30 of 30 rounds; a 3-use
//!   invite with 5 racers admits exactly 3; single-use races again while each NATS
//!   server in turn is killed with SIGKILL (one of them leads the invites stream);
//! - the whole engine stopped: a transfer through a relay's public port finishes
//!   intact, invites are refused with a try-again error, a deny made at A is in
//!   force there at once and ends the node's session at B within 2 s of the engine's
//!   return (taking writes again; measured and printed, with the time since its
//!   servers were restarted).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_tests::nats::{NatsCluster, fleet_relay, info, wait_in_fleet};
use ferry_tests::*;

const NATS_BASE: u16 = 25400;

/// A fresh invite from `relay`'s admin API: its code.
fn invite(relay: &Relay, uses: u32) -> String {
    let answer = relay.post_admin(
        "/api/invites",
        serde_json::json!({"expires": "1h", "uses": uses}),
    );
    answer["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no invite code: {answer}"))
        .to_string()
}

/// The same invite code, pointed at another relay of the fleet.
fn at(code: &str, relay: &Relay) -> String {
    let secret = code.split_once('?').expect("an invite code has ?invite=").1;
    format!("{}?{secret}", relay.url)
}

/// `ferry-shim join CODE` for a fresh node in `dir/name`, not waited for.
fn start_join(dir: &Path, name: &str, code: &str) -> std::process::Child {
    Command::new(bin("ferry-shim"))
        .args(["join", code, "--data-dir", dir.join(name).to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ferry-shim join")
}

/// Whether a `ferry-shim join` succeeded, with its output.
fn joined(child: std::process::Child) -> (bool, String) {
    let out = child.wait_with_output().expect("ferry-shim join");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (
        out.status.success() && text.contains("joined the grid"),
        text,
    )
}

fn node_id(dir: &Path, name: &str) -> String {
    let out = Command::new(bin("ferry-shim"))
        .args(["id", "--data-dir", dir.join(name).to_str().unwrap()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_fleet_of_relays_shares_one_policy_and_one_set_of_invites() {
    let dir = TempDir::new("fleet");
    let Some(cluster) = NatsCluster::start(dir.path(), NATS_BASE) else {
        return;
    };
    let urls = cluster.urls();
    let a = fleet_relay(
        dir.path(),
        "a",
        "25300-25309",
        &urls,
        "test",
        &["--policy", "grid"],
    );
    let b = fleet_relay(
        dir.path(),
        "b",
        "25310-25319",
        &urls,
        "test",
        &["--policy", "grid"],
    );
    wait_in_fleet(&a, 1);
    wait_in_fleet(&b, 1);

    // Issued at A, redeemed at B; B's certificate is good at A.
    let code = invite(&a, 1);
    let (ok, out) = joined(start_join(dir.path(), "member", &at(&code, &b)));
    assert!(ok, "an invite from A redeemed at B: {out}");
    let member = node_id(dir.path(), "member");
    let at_a = Shim::expose_echo(dir.path(), "member", &a.url, &[]);
    at_a.wait_connected();
    drop(at_a);
    // The same code once more, at A: used up everywhere.
    let (ok, out) = joined(start_join(dir.path(), "second", &code));
    assert!(!ok && out.contains("already used"), "{out}");

    eprintln!("fleet: invite and certificate across relays checked");
    // Revoked at A: B cuts the member's live session within 2 s, A refuses it.
    let on_b = Shim::expose_echo(dir.path(), "member", &b.url, &[]);
    on_b.wait_connected();
    assert!(b.holds(&member));
    let revoked_at = Instant::now();
    let answer = a.post_admin(
        "/api/policy",
        serde_json::json!({"action": "revoke", "node": member}),
    );
    assert!(answer["lists"]["revoked"].is_array(), "{answer}");
    wait_for(
        "B to cut the revoked member off",
        Duration::from_secs(2),
        || (!b.holds(&member)).then_some(()),
    );
    eprintln!(
        "fleet revocation: made at relay A, the member's session at relay B ended {} ms later",
        revoked_at.elapsed().as_millis()
    );
    drop(on_b);
    let refused = Shim::expose_echo(dir.path(), "member", &a.url, &[]);
    let why = wait_for(
        "A to refuse the revoked member",
        Duration::from_secs(10),
        || {
            let status = refused.status();
            (status["relays"][0]["state"] == "refused")
                .then(|| status["relays"][0]["error"].to_string())
        },
    );
    assert!(why.contains("revoked"), "{why}");
    drop(refused);

    // Races: each use of an invite is granted exactly once across the fleet.
    let racing = Instant::now();
    for round in 0..30 {
        let code = invite(&a, 1);
        let racers = [
            start_join(dir.path(), &format!("race-{round}-a"), &code),
            start_join(dir.path(), &format!("race-{round}-b"), &at(&code, &b)),
        ];
        let results: Vec<(bool, String)> = racers.into_iter().map(joined).collect();
        let winners = results.iter().filter(|(ok, _)| *ok).count();
        assert_eq!(winners, 1, "round {round}: {results:?}");
    }
    eprintln!(
        "fleet invite races: 30 rounds of two joins at two relays, one winner each, in {:.1} s",
        racing.elapsed().as_secs_f64()
    );
    let code = invite(&b, 3);
    let racers: Vec<_> = (0..5)
        .map(|i| {
            let target = if i % 2 == 0 {
                code.clone()
            } else {
                at(&code, &a)
            };
            start_join(dir.path(), &format!("three-{i}"), &target)
        })
        .collect();
    let results: Vec<(bool, String)> = racers.into_iter().map(joined).collect();
    let winners = results.iter().filter(|(ok, _)| *ok).count();
    assert_eq!(winners, 3, "a 3-use invite, 5 racers: {results:?}");
    for (ok, out) in &results {
        assert!(*ok || out.contains("already used"), "{out}");
    }

    // The same while a NATS server is killed with SIGKILL: each server in turn, so
    // one of them is the invites stream's leader.
    let mut cluster = cluster;
    for server in 0..3 {
        cluster.kill9(server);
        for round in 0..3 {
            let code = invite(&a, 1);
            let racers = [
                start_join(dir.path(), &format!("kill-{server}-{round}-a"), &code),
                start_join(
                    dir.path(),
                    &format!("kill-{server}-{round}-b"),
                    &at(&code, &b),
                ),
            ];
            let results: Vec<(bool, String)> = racers.into_iter().map(joined).collect();
            let winners = results.iter().filter(|(ok, _)| *ok).count();
            assert_eq!(
                winners, 1,
                "NATS server {server} killed, round {round}: {results:?}"
            );
        }
        cluster.restart(server);
        wait_in_fleet(&a, 1);
        wait_in_fleet(&b, 1);
    }
    eprintln!("fleet invite races with each NATS server killed in turn: one winner each");

    // The whole engine stopped: a live transfer finishes intact, invites are refused
    // with a try-again error, and a deny made meanwhile reaches the other relay soon
    // after the engine is back.
    let code = invite(&a, 1);
    let (ok, out) = joined(start_join(dir.path(), "outage", &code));
    assert!(ok, "{out}");
    let outage = node_id(dir.path(), "outage");
    let on_b = Shim::expose_echo(dir.path(), "outage", &b.url, &["--public"]);
    let public = on_b.public_addr("echo");
    let transfer = std::thread::spawn(move || {
        let stream = std::net::TcpStream::connect(public).expect("the public port");
        let pace = Pace {
            chunk: 256 << 10,
            every: Duration::from_millis(50),
        };
        paced_echo(
            stream,
            pace,
            |chunks| chunks < 64,
            "a transfer across the engine's outage",
        )
    });
    std::thread::sleep(Duration::from_millis(500));
    for server in 0..3 {
        cluster.kill9(server);
    }
    wait_for("A to see its engine gone", Duration::from_secs(10), || {
        (info(&a)["fleet"]["up"] == false).then_some(())
    });
    let refused = a.post_admin(
        "/api/invites",
        serde_json::json!({"expires": "1h", "uses": 1}),
    );
    let error = refused["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("try again") && refused["code"].is_null(),
        "an invite while the engine is away: {refused}"
    );
    let denied = a.post_admin(
        "/api/policy",
        serde_json::json!({"action": "deny", "node": outage}),
    );
    assert!(
        denied["lists"]["deny"]
            .as_array()
            .is_some_and(|d| d.iter().any(|n| n == outage.as_str())),
        "a deny while the engine is away is in force at A at once: {denied}"
    );
    let (sent, received, n) = transfer.join().expect("the transfer thread");
    assert_eq!(n, 16 << 20);
    assert_eq!(
        sent, received,
        "a transfer through relay B outlives the engine"
    );
    assert!(b.holds(&outage), "B keeps serving the node it has");
    cluster.restart_all();
    let restarted = Instant::now();
    // Back: the engine takes writes again, as relay A sees it (a restarted cluster
    // first elects a leader for every stream, which took seconds here).
    wait_for(
        "the engine to take writes again",
        Duration::from_secs(60),
        || (info(&a)["fleet"]["up"] == true).then_some(()),
    );
    let back = Instant::now();
    wait_for(
        "the deny made during the outage to reach B",
        Duration::from_secs(2),
        || (!b.holds(&outage)).then_some(()),
    );
    eprintln!(
        "fleet outage: a deny made at A while the engine was stopped ended the node's session at B {} ms after the engine took writes again ({} ms after its servers were restarted)",
        back.elapsed().as_millis(),
        restarted.elapsed().as_millis()
    );
    drop(on_b);
    drop(cluster);
}
