//! Clock skew between real processes (issue #7's faults): shims run with their wall
//! clocks set off by libfaketime (`tests/src/lib.rs` `FakeClock`), the relay and its
//! rendezvous on the machine's clock.
//!
//! - Nodes 5 minutes ahead and 5 minutes behind (`CLOCK_SKEW_TOLERANCE`) get their
//!   path records stored, reach a node on the right time through the relay, punch
//!   direct paths (each side checks the other's signed record and probes with its own
//!   clock) and move data SHA-256-identical over both.
//! - Nodes far outside the tolerance are told what is wrong, and what to do, in their
//!   status, and their public ports keep working: the clock only costs them direct
//!   paths.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_tests::labrun::{EchoLab, transfer_and_go_direct};
use ferry_tests::netlab::{NatKind, skip_test};
use ferry_tests::*;

const SKEW_SECS: i64 = 300;
/// `RECORD_LIFETIME` of the shim (node-shim/src/path_manager.rs).
const RECORD_LIFETIME_SECS: i64 = 600;

fn fake_clock(test: &str, offset_secs: i64) -> Option<FakeClock> {
    let clock = FakeClock::new(offset_secs);
    if clock.is_none() {
        // .ci/run installs it, so under FERRY_REQUIRE_NETLAB (CI) this fails instead.
        skip_test(test, "libfaketime is not installed (apt install faketime)");
    }
    clock
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Waits for the rendezvous's answer to the shim's path record, from `/api/status`.
fn record_status(status: impl Fn() -> serde_json::Value, who: &str) -> serde_json::Value {
    wait_for(
        &format!("the rendezvous's answer to {who}'s path record"),
        Duration::from_secs(20),
        || {
            let record = status()["network"]["record"].clone();
            (!record.is_null()).then_some(record)
        },
    )
}

#[test]
fn nodes_five_minutes_ahead_and_behind_punch_direct_paths_and_move_data_intact() {
    let test = "nodes_five_minutes_ahead_and_behind_punch_direct_paths_and_move_data_intact";
    let (Some(ahead_clock), Some(behind_clock)) =
        (fake_clock(test, SKEW_SECS), fake_clock(test, -SKEW_SECS))
    else {
        return;
    };
    let Some(net) = EchoLab::builder("skew")
        .nat("west", NatKind::Masquerade, &["server"])
        .nat("east", NatKind::Masquerade, &["ahead"])
        .nat("south", NatKind::Masquerade, &["behind"])
        .build()
    else {
        return;
    };
    let lab = &net.lab;
    let server = net.expose(&[]);
    let ahead = net.connect_env("ahead", &server, &ahead_clock.env());
    let behind = net.connect_env("behind", &server, &behind_clock.env());

    let mut report = Vec::new();
    for (client, offset) in [(&ahead, SKEW_SECS), (&behind, -SKEW_SECS)] {
        // The skew is real: the record's expiry, by the shim's clock, is off by it.
        let record = record_status(|| client.status(lab), &client.host);
        assert!(record["error"].is_null(), "{}: {record}", client.host);
        let expires = record["expires"].as_i64().expect("expires");
        let off_by = expires - RECORD_LIFETIME_SECS - unix_now();
        assert!(
            (off_by - offset).abs() < 30,
            "the shim on {} should run {offset} s off, its record says {off_by} s: {record}",
            client.host
        );

        let what = format!("the node {offset} s off");
        let (direct_after, peer) =
            transfer_and_go_direct(lab, &client.host, client, &server, &what);
        assert_eq!(peer["path"], "direct", "{peer}");
        report.push(format!("{offset:+} s: direct after {direct_after:?}"));
    }
    println!(
        "FAULT | clock skew ±{SKEW_SECS} s | records stored, {} | all transfers intact",
        report.join(", ")
    );
}

#[test]
fn nodes_with_clocks_far_off_are_told_to_fix_them_and_keep_their_public_ports() {
    let test = "nodes_with_clocks_far_off_are_told_to_fix_them_and_keep_their_public_ports";
    let (Some(slow), Some(fast)) = (fake_clock(test, -20 * 60), fake_clock(test, 2 * 3600)) else {
        return;
    };
    let dir = TempDir::new("skew-far");
    let relay = Relay::start(dir.path(), "24640-24649");
    for (name, clock, needle) in [
        ("slow", &slow, "signer's clock is behind"),
        ("fast", &fast, "signer's clock is ahead"),
    ] {
        let service = format!("echo={}", echo_server());
        let shim = Shim::start_env(
            dir.path(),
            name,
            &[
                "expose",
                "--relay",
                &relay.url,
                "--service",
                &service,
                "--public",
            ],
            &clock.env(),
        );
        let record = record_status(|| shim.status(), name);
        let error = record["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(needle) && error.contains("NTP"),
            "{name}: the refusal should say which clock is off and how to fix it: {record}"
        );
        let public = shim.public_addr("echo");
        assert_eq!(echo_once(public, b"still served").unwrap(), b"still served");
        println!("FAULT | clock far off | {name}: {error}");
    }
}

/// A path record's sequence number is the node's clock in milliseconds. A shim whose
/// clock went back while it was down would publish numbers below the one the
/// rendezvous holds, and be refused until that record expired (up to 10 minutes
/// without direct paths). It now asks the rendezvous for its stored record on a
/// refusal and continues from there.
#[test]
fn a_node_whose_clock_went_back_across_a_restart_is_not_refused() {
    let test = "a_node_whose_clock_went_back_across_a_restart_is_not_refused";
    let Some(set_back) = fake_clock(test, -120) else {
        return;
    };
    let dir = TempDir::new("skew-back");
    let relay = Relay::start(dir.path(), "24650-24659");
    let service = format!("echo={}", echo_server());
    let args = [
        "expose",
        "--relay",
        relay.url.as_str(),
        "--service",
        service.as_str(),
    ];
    let mut shim = Shim::start(dir.path(), "home", &args);
    let before = record_status(|| shim.status(), "home");
    assert!(before["error"].is_null(), "{before}");
    let seq_before = before["seq"].as_u64().expect("seq");
    // Killed, as by a power cut (after which clocks are most often wrong).
    shim.proc.kill9();

    // Same key (same data directory), clock two minutes back.
    let shim = Shim::start_env(dir.path(), "home", &args, &set_back.env());
    let after = wait_for(
        "a record newer than the stored one, accepted",
        Duration::from_secs(20),
        || {
            let record = shim.status()["network"]["record"].clone();
            (record["error"].is_null() && record["seq"].as_u64()? > seq_before).then_some(record)
        },
    );
    assert!(
        shim.proc.log().contains("is not newer than the stored"),
        "the first record after the restart should have been refused as older:\n{}",
        shim.proc.log()
    );
    println!(
        "FAULT | clock set back 120 s across a restart | stored seq {seq_before}, refused, \
         then accepted {}",
        after["seq"]
    );
}
