//! A fleet in the NAT lab (#19 item 2): two relays on their own public hosts, a real
//! NATS JetStream cluster (three Debian `nats-server`s) on a third, node A behind one
//! masquerade NAT configured only with relay 1, node B behind another configured only
//! with relay 3. A's dial is answered with "B is at relay 3", A visits relay 3, the
//! bytes arrive identical, and the pair goes direct through relay 3's coordinator
//! (relay 1 coordinates nothing).

use std::path::Path;
use std::time::{Duration, Instant};

use ferry_tests::labrun::{LabRelay, LabShim, echo_in, transfer_in};
use ferry_tests::nats::NatsCluster;
use ferry_tests::netlab::{Lab, NatKind};
use ferry_tests::*;

/// NATS client ports on the engine host (its own namespace: nothing else is there).
const NATS_BASE: u16 = 4222;

fn admin_of(relay: &LabRelay) -> String {
    relay.proc.ready_field("admin")
}

fn info(lab: &Lab, host: &str, relay: &LabRelay) -> serde_json::Value {
    let url = format!("{}/api/info", admin_of(relay));
    lab.in_ns(host, move || http_get(&url))
        .expect("enter the relay's namespace")
        .unwrap_or(serde_json::Value::Null)
}

fn punches(lab: &Lab, host: &str, relay: &LabRelay, outcome: &str) -> f64 {
    let admin = admin_of(relay);
    let series = format!("ferry_rendezvous_punch_requests_total{{outcome=\"{outcome}\"}}");
    lab.in_ns(host, move || metric_at(&admin, &series))
        .expect("enter the relay's namespace")
}

fn fleet_relay(lab: &Lab, host: &str, dir: &Path, urls: &str) -> LabRelay {
    let home = dir.join(host);
    std::fs::create_dir_all(&home).unwrap();
    LabRelay::start_on(
        lab,
        host,
        &lab.lan_ip(host).to_string(),
        &home,
        &[
            "--fleet",
            urls,
            "--fleet-name",
            "lab",
            "--fleet-replicas",
            "3",
        ],
    )
}

#[test]
fn a_pair_on_different_relays_goes_direct_through_the_peers_relay() {
    let test = "fleet_lab";
    let Some(lab) = Lab::builder(test)
        .relay("r1")
        .public("r3")
        .public("engine")
        .nat("west", NatKind::Masquerade, &["a"])
        .nat("east", NatKind::Masquerade, &["b"])
        .build()
    else {
        return;
    };
    let dir = TempDir::new(test);
    let Some(cluster) = NatsCluster::start_in_lab(&lab, "engine", dir.path(), NATS_BASE) else {
        return;
    };
    let urls = cluster.urls();
    let one = fleet_relay(&lab, "r1", dir.path(), &urls);
    let three = fleet_relay(&lab, "r3", dir.path(), &urls);
    for (host, relay) in [("r1", &one), ("r3", &three)] {
        wait_for("the fleet's two relays", Duration::from_secs(60), || {
            let known = info(&lab, host, relay)["fleet"]["relays"]
                .as_array()
                .map_or(0, Vec::len);
            (known == 1).then_some(())
        });
    }

    let echo = echo_in(&lab, "b");
    let service = format!("echo={echo}");
    let b = LabShim::start(
        &lab,
        "b",
        dir.path(),
        "b",
        &[
            "expose",
            "--relay",
            &three.url,
            "--service",
            &service,
            "--allow-any",
        ],
    );
    b.wait_ready(&lab);
    let to_b = format!("{}/echo", b.node_id);
    let a = LabShim::start(
        &lab,
        "a",
        dir.path(),
        "a",
        &[
            "connect",
            &to_b,
            "--listen",
            "127.0.0.1:0",
            "--relay",
            &one.url,
        ],
    );
    a.wait_ready(&lab);

    let started = Instant::now();
    let (sent, received, n) = transfer_in(&lab, "a", a.forward_addr(&lab), 41, 16 << 20);
    assert_eq!(n, 16 << 20);
    assert_eq!(sent, received, "16 MiB A→B and back arrive identical");
    println!(
        "16 MiB A (west, relay 1) → B (east, relay 3) and back in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let path = wait_for(
        "A's path to B to go direct",
        Duration::from_secs(30),
        || {
            let peer = a.peer(&lab, &b.node_id)?;
            (peer["path"] == "direct").then_some(peer)
        },
    );
    println!("A reaches B direct at {}", path["remote_addr"]);
    assert!(
        punches(&lab, "r3", &three, "coordinated") >= 1.0,
        "relay 3 (B's relay, which A visits) coordinated the punch"
    );
    assert_eq!(
        punches(&lab, "r1", &one, "coordinated"),
        0.0,
        "relay 1 holds no session of B and coordinates nothing"
    );
    let status = a.status(&lab);
    assert!(
        status["relays"].as_array().is_some_and(|r| r
            .iter()
            .any(|r| r["role"] == "visit" && r["url"] == three.url.as_str())),
        "A's status shows the visit: {status}"
    );
    // Direct now: the same bytes again, identical.
    let (sent, received, _) = transfer_in(&lab, "a", a.forward_addr(&lab), 42, 8 << 20);
    assert_eq!(sent, received);
    drop(cluster);
}
