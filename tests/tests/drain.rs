//! Graceful drain and failover (issue #4): SIGTERM on a relay mid-transfer. The
//! transfer through its public port finishes intact (the relay waits for it), new
//! connections and overlay traffic reach the service through the second relay within
//! 5 s, the draining relay refuses new work and says so on /readyz, and it exits once
//! the last connection is done — well before its drain timeout. And a relay that dies
//! (SIGKILL: no goodbye) is noticed by its silence: an overlay transfer in flight moves
//! to the second relay and completes intact, and the first relay's public port is the
//! same when it comes back.

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ferry_tests::*;

/// The public address `relay` gave the node's `echo` service.
fn public_on(relay: &Relay) -> SocketAddr {
    wait_for(
        "the relay to list the node",
        Duration::from_secs(10),
        || {
            // Both shims are connected; only the exposing one has the service.
            let nodes = relay.nodes();
            let port = nodes
                .as_array()?
                .iter()
                .flat_map(|n| n["services"].as_array().into_iter().flatten())
                .find(|s| s["name"] == "echo")?["public_port"]
                .as_u64()?;
            Some(SocketAddr::from(([127, 0, 0, 1], port as u16)))
        },
    )
}

/// Echoes `chunks` chunks of 32 KiB through `addr`, one every 25 ms, so the transfer
/// spans the drain; returns (hash sent, hash received, bytes received).
fn slow_echo(addr: SocketAddr, chunks: usize) -> ([u8; 32], [u8; 32], usize) {
    let stream = TcpStream::connect(addr).expect("connect");
    let pace = Pace {
        chunk: 32 * 1024,
        every: Duration::from_millis(25),
    };
    paced_echo(
        stream,
        pace,
        |sent| sent < chunks,
        "the transfer through the draining relay broke",
    )
}

fn get_status(url: &str) -> u16 {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    agent
        .get(url)
        .call()
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// Waits until a new overlay connection through `forward` echoes (the shims moved off
/// the first relay), which must be within 5 s of `since`; returns how long it took.
fn overlay_works_again(forward: SocketAddr, since: Instant) -> Duration {
    wait_for(
        "overlay traffic via the second relay",
        Duration::from_secs(5),
        || {
            echo_once(forward, b"overlay")
                .ok()
                .filter(|b| b == b"overlay")
                .map(|_| ())
        },
    );
    let failover = since.elapsed();
    assert!(
        failover < Duration::from_secs(5),
        "failover took {failover:?}"
    );
    failover
}

/// A node exposing `echo` publicly on both relays, and a node forwarding to it, both
/// preferring `first`; checked by one echo through the overlay. The relays run without
/// a rendezvous, so overlay traffic goes through a relay and failover shows.
fn nodes_on_both(dir: &std::path::Path, first: &Relay, second: &Relay) -> (Shim, Shim) {
    let server = Shim::expose_echo(
        dir,
        "server",
        &first.url,
        &["--relay", &second.url, "--public", "--allow-any"],
    );
    server.wait_connected();
    let client = Shim::connect_with(
        dir,
        "client",
        &format!("{}/echo", server.node_id),
        &first.url,
        &["--relay", &second.url],
    );
    assert_eq!(
        echo_once(client.forward_addr(), b"before").unwrap(),
        b"before"
    );
    (server, client)
}

#[test]
fn a_draining_relay_finishes_its_connections_and_the_second_relay_takes_over() {
    let (dir1, dir2, dir) = (
        TempDir::new("drain-1"),
        TempDir::new("drain-2"),
        TempDir::new("drain-nodes"),
    );
    let mut first = Relay::start_args(
        dir1.path(),
        "22800-22809",
        &["--drain-timeout", "30s", "--no-rendezvous"],
    );
    let second = Relay::start_args(dir2.path(), "22810-22819", &["--no-rendezvous"]);
    let (_server, client) = nodes_on_both(dir.path(), &first, &second);
    let forward = client.forward_addr();
    let (public1, public2) = (public_on(&first), public_on(&second));

    // A transfer through the first relay, spanning the drain (about 4 s).
    let transfer = std::thread::spawn(move || slow_echo(public1, 160));
    std::thread::sleep(Duration::from_millis(500));

    let stopped_at = Instant::now();
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(first.proc.pid() as libc::pid_t, libc::SIGTERM);
    }
    // The draining relay refuses new public connections and says it is not ready.
    wait_for("the public port to close", Duration::from_secs(5), || {
        TcpStream::connect(public1).is_err().then_some(())
    });
    assert_eq!(get_status(&format!("{}/readyz", first.admin)), 503);
    // New connections reach the service through the second relay...
    assert_eq!(echo_once(public2, b"second").unwrap(), b"second");
    // ...and so does node-to-node traffic, which the shims moved off the first relay.
    let failover = overlay_works_again(forward, stopped_at);
    let status = client.status();
    assert_eq!(status["relays"][0]["state"], "draining", "{status}");

    // The transfer in flight through the first relay completes, byte for byte.
    let (sent, received, n) = transfer.join().unwrap();
    assert_eq!(n, 160 * 32 * 1024);
    assert_eq!(sent, received);

    // And the relay exits soon after, not at its 30 s drain timeout.
    let exited = wait_for("the drained relay to exit", Duration::from_secs(15), || {
        first.proc.child.try_wait().ok().flatten()
    });
    assert!(exited.success(), "exit status {exited}");
    let took = stopped_at.elapsed();
    eprintln!(
        "failover {} ms; relay exited {} ms after SIGTERM",
        failover.as_millis(),
        took.as_millis()
    );
    assert!(took < Duration::from_secs(15), "{took:?}");
    assert!(first.proc.log().contains("drained"), "{}", first.proc.log());
}

#[test]
fn when_a_relay_dies_overlay_traffic_in_flight_moves_to_the_second_relay() {
    let (dir1, dir2, dir) = (
        TempDir::new("die-1"),
        TempDir::new("die-2"),
        TempDir::new("die-nodes"),
    );
    let mut first = Relay::start_args(dir1.path(), "22830-22839", &["--no-rendezvous"]);
    let second = Relay::start_args(dir2.path(), "22840-22849", &["--no-rendezvous"]);
    let (server, client) = nodes_on_both(dir.path(), &first, &second);
    let forward = client.forward_addr();
    let (public1, public2) = (public_on(&first), public_on(&second));

    // An overlay transfer (about 4 s) relayed by the first relay when it dies.
    let transfer = std::thread::spawn(move || slow_echo(forward, 160));
    std::thread::sleep(Duration::from_millis(1000));
    let overlay_bytes =
        first.metric("ferry_relay_bytes_total{direction=\"to_node\",path=\"overlay\"}");
    assert!(overlay_bytes > 0.0, "the first relay carries the overlay");
    // Which transport each shim's link to the first relay took: under load the TLS/TCP
    // link can win the race against QUIC's head start, and a killed relay's TCP
    // connections are closed by its kernel, where QUIC ones just fall silent.
    let over_quic = |shim: &Shim| shim.status()["relays"][0]["transport"] == "quic";
    let (client_quic, server_quic) = (over_quic(&client), over_quic(&server));
    let killed_at = Instant::now();
    first.proc.kill9();

    // Stock clients use the second relay's port at once...
    assert_eq!(echo_once(public2, b"second").unwrap(), b"second");
    // ...and new node-to-node connections work within 5 s.
    let failover = overlay_works_again(forward, killed_at);

    // The transfer in flight survived the move: one end-to-end QUIC connection, and
    // only the path under it changed.
    let (sent, received, n) = transfer.join().unwrap();
    assert_eq!(n, 160 * 32 * 1024);
    assert_eq!(sent, received, "every byte, in order");
    // A silent QUIC link is declared unresponsive and its traffic moved off while it
    // is still up; a closed TCP link simply ends, and the shim reconnects.
    for (shim, quic) in [(&client, client_quic), (&server, server_quic)] {
        if quic {
            // A shim whose peer moved first follows it at once (it answers through
            // the relay its peer's packets come by) and sends nothing more on the dead
            // link; its own verdict then comes from the link's keepalives, a few
            // seconds later.
            let declared = wait_for_optional(Duration::from_secs(10), || {
                let failovers =
                    shim.metric("ferry_shim_relay_failovers_total{reason=\"unresponsive\"}");
                (failovers >= 1.0).then_some(())
            });
            assert!(declared.is_some(), "{}", shim.proc.log());
        } else {
            let state = shim.status()["relays"][0]["state"].clone();
            assert_ne!(state, "connected", "{}", shim.proc.log());
        }
    }
    if client_quic {
        assert_eq!(client.status()["relays"][0]["state"], "unresponsive");
    }

    // The first relay comes back on the same ports: the shims return to it, and the
    // node's public port there is the one it had.
    first.restart(dir1.path());
    wait_for(
        "the shims back on the first relay",
        Duration::from_secs(10),
        || (client.status()["relays"][0]["state"] == "connected").then_some(()),
    );
    assert_eq!(public_on(&first), public1, "the public port is stable");
    assert_eq!(echo_once(public1, b"back").unwrap(), b"back");
    eprintln!("failover after SIGKILL: {} ms", failover.as_millis());
}

/// Polls `check` until it gives `Some` or `limit` passes (then `None`).
fn wait_for_optional<T>(limit: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
