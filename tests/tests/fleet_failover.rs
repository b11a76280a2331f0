//! A fleet relay killed with SIGKILL under load (#19 item 4), on a real NATS
//! JetStream cluster (three Debian `nats-server`s on loopback) and three relays of one
//! fleet. Node B has sessions at relays 2 and 3 and a public port at each; node A is
//! configured only with relay 1 and reaches B by visiting one of B's relays (strict
//! mode with `--may-reach`, so the pair stays relayed). Killing the relay A visits
//! moves the transfer to B's other relay within 5 s (measured and printed), with no
//! byte lost or changed; the killed relay comes back with B's same public port.

use std::path::Path;
use std::time::{Duration, Instant};

use ferry_tests::nats::{NatsCluster, fleet_relay, fleet_relays};
use ferry_tests::*;

const NATS_BASE: u16 = 25600;

/// The relay URL of A's connected visit, if it has one.
fn visiting(shim: &Shim) -> Option<String> {
    let status = shim.status();
    status["relays"]
        .as_array()?
        .iter()
        .find(|r| r["role"] == "visit" && r["state"] == "connected")
        .and_then(|r| r["url"].as_str().map(str::to_string))
}

/// B's public port at `relay` (`/api/nodes`).
fn public_port(relay: &Relay, node: &str) -> Option<u64> {
    relay
        .nodes()
        .as_array()?
        .iter()
        .find(|n| n["node_id"] == node)?["services"][0]["public_port"]
        .as_u64()
}

#[test]
fn a_killed_fleet_relay_hands_its_traffic_to_another_within_5s() {
    let dir = TempDir::new("fleet-failover");
    let Some(cluster) = NatsCluster::start(dir.path(), NATS_BASE) else {
        return;
    };
    let urls = cluster.urls();
    let one = fleet_relay(dir.path(), "one", "25620-25629", &urls, "failover", &[]);
    let mut two = fleet_relay(dir.path(), "two", "25630-25639", &urls, "failover", &[]);
    let mut three = fleet_relay(dir.path(), "three", "25640-25649", &urls, "failover", &[]);
    for relay in [&one, &two, &three] {
        wait_for("the fleet's three relays", Duration::from_secs(60), || {
            (fleet_relays(relay) == 2).then_some(())
        });
    }

    let b = Shim::expose_echo(
        dir.path(),
        "b",
        &two.url,
        &[
            "--relay",
            &three.url,
            "--public",
            "--allow-any",
            "--mode",
            "strict",
        ],
    );
    b.wait_connected();
    let ports_before = (
        public_port(&two, &b.node_id).expect("B's port at relay 2"),
        public_port(&three, &b.node_id).expect("B's port at relay 3"),
    );
    let a = Shim::connect_with(
        dir.path(),
        "a",
        &format!("{}/echo", b.node_id),
        &one.url,
        &[
            "--mode",
            "strict",
            "--may-reach",
            &two.url,
            "--may-reach",
            &three.url,
        ],
    );
    // A steady transfer that spans the kill and the move.
    let forward = a.forward_addr();
    let transfer = std::thread::spawn(move || {
        let stream = std::net::TcpStream::connect(forward).expect("A's forward");
        let pace = Pace {
            chunk: 64 << 10,
            every: Duration::from_millis(20),
        };
        paced_echo(
            stream,
            pace,
            |chunks| chunks < 600,
            "a transfer across a relay's death",
        )
    });
    let first = wait_for(
        "A to visit one of B's relays",
        Duration::from_secs(20),
        || visiting(&a),
    );
    std::thread::sleep(Duration::from_secs(2));
    let (victim, survivor) = if first == two.url {
        (&mut two, three.url.clone())
    } else {
        (&mut three, two.url.clone())
    };
    victim.proc.kill9();
    let killed = Instant::now();
    wait_for(
        "A's traffic to move to B's other relay",
        Duration::from_secs(5),
        || (visiting(&a).as_deref() == Some(survivor.as_str())).then_some(()),
    );
    println!(
        "the visited relay killed with SIGKILL: A carried on through B's other relay after {} ms",
        killed.elapsed().as_millis()
    );
    let (sent, received, n) = transfer.join().expect("the transfer thread");
    assert_eq!(n, 600 * (64 << 10));
    assert_eq!(
        sent, received,
        "no byte lost or changed across the relay's death"
    );

    // The killed relay comes back with B's same public port.
    let home = victim.data_dir.parent().map(Path::to_path_buf);
    victim.restart(home.as_deref().unwrap_or(dir.path()));
    let port = wait_for(
        "B back at the restarted relay",
        Duration::from_secs(30),
        || public_port(victim, &b.node_id),
    );
    let before = if first == two.url {
        ports_before.0
    } else {
        ports_before.1
    };
    assert_eq!(port, before, "the same public port after a SIGKILL");
    drop(cluster);
}
