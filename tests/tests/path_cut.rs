//! A direct path cut mid-transfer (issue #3): traffic moves back to the relay without
//! the application seeing an error, and returns to the direct path once the cut is
//! lifted. Two Linux NATs in the lab; the cut is an nft drop of UDP between their
//! public addresses on the core router, which leaves both relay sessions untouched.
//!
//! And a node whose relay link fell back to TLS/TCP (its QUIC to the relay dropped,
//! as a lost handshake packet can make QUIC lose the connect race) still publishes
//! its UDP address, learnt from the relay's STUN service, and punches a direct path;
//! and once its QUIC gets through, it moves the link onto QUIC with a public-port
//! connection and a relayed overlay connection in flight, both intact.

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ferry_tests::labrun::{EchoLab, LabShim, time_to_direct, transfer_in};
use ferry_tests::netlab::{CORE, Lab, NatKind};
use ferry_tests::{Pace, paced_echo, wait_for};

const CHUNK: usize = 16 * 1024;

#[test]
fn a_cut_direct_path_falls_back_to_the_relay_and_comes_back() {
    let Some(net) = EchoLab::builder("path_cut")
        .nats(NatKind::Masquerade, NatKind::Masquerade)
        .build()
    else {
        return;
    };
    let lab = &net.lab;
    let (server, client) = net.pair();
    let forward = client.forward_addr(lab);

    let stream = lab
        .in_ns("client", move || TcpStream::connect(forward))
        .expect("namespace")
        .expect("connect to the forward");
    let stop = Arc::new(AtomicBool::new(false));
    let transfer = {
        let stop = stop.clone();
        // About 3 MB/s: steady traffic across the cut, not a flood.
        let pace = Pace {
            chunk: CHUNK,
            every: Duration::from_millis(5),
        };
        let more = move |_| !stop.load(Ordering::Relaxed);
        std::thread::spawn(move || paced_echo(stream, pace, more, "traffic across the cut"))
    };

    let started = Instant::now();
    time_to_direct(
        lab,
        &client,
        &server.node_id,
        started,
        Duration::from_secs(10),
    )
    .expect("a direct path before the cut");
    let direct_addr = client.peer(lab, &server.node_id).unwrap()["remote_addr"].clone();
    assert_eq!(
        direct_addr.as_str().unwrap(),
        format!("{}", server_public(lab, &server)),
    );
    std::thread::sleep(Duration::from_millis(500));

    // Cut: the core drops UDP between the two NATs' public addresses.
    let fault = lab
        .block_udp(CORE, lab.wan_ip("server"), lab.wan_ip("client"))
        .expect("cut");
    let cut_at = Instant::now();
    let fell_back = wait_for(
        "the client to fall back to the relay",
        Duration::from_secs(10),
        || {
            let peer = client.peer(lab, &server.node_id)?;
            (peer["path"] == "relayed").then(|| cut_at.elapsed())
        },
    );
    eprintln!(
        "fell back to the relay {} ms after the cut",
        fell_back.as_millis()
    );
    assert!(client.metric(lab, "ferry_shim_path_changes_total{to=\"relayed\"}") >= 1.0);
    // Traffic keeps flowing over the relay for a while.
    std::thread::sleep(Duration::from_secs(2));
    let peer = client.peer(lab, &server.node_id).unwrap();
    assert_eq!(peer["path"], "relayed", "{peer}");

    // Lift the cut: the probes of the old address get answers again.
    lab.clear(fault).expect("lift the cut");
    let lifted_at = Instant::now();
    let back = time_to_direct(
        lab,
        &client,
        &server.node_id,
        lifted_at,
        Duration::from_secs(15),
    )
    .expect("back on the direct path after the cut is lifted");
    eprintln!(
        "back on the direct path {} ms after the cut was lifted",
        back.as_millis()
    );
    std::thread::sleep(Duration::from_millis(500));

    stop.store(true, Ordering::Relaxed);
    let (sent, received, total) = transfer.join().expect("transfer thread");
    assert!(total > 4 * CHUNK, "only {total} bytes moved");
    assert_eq!(sent, received, "bytes differ after {total} bytes");
    eprintln!("{total} bytes echoed intact across the cut and back");
    assert!(client.metric(lab, "ferry_shim_path_changes_total{to=\"direct\"}") >= 2.0);
}

/// The address the client should use for the server on the direct path: the server's
/// NAT's public address with the server's mapped port (taken from the server's own
/// view of its reflexive address).
fn server_public(lab: &Lab, server: &LabShim) -> std::net::SocketAddr {
    let status = server.status(lab);
    let observed: std::net::SocketAddr = status["relays"][0]["observed_addr"]
        .as_str()
        .expect("observed address")
        .parse()
        .expect("address");
    let ip = lab.wan_ip("server");
    std::net::SocketAddr::new(ip.into(), observed.port())
}

#[test]
fn a_node_on_a_tcp_relay_link_still_punches_a_direct_path() {
    let Some(net) = EchoLab::builder("tcp_link_punch")
        .nats(NatKind::Masquerade, NatKind::Masquerade)
        .build()
    else {
        return;
    };
    let lab = &net.lab;
    // The client's QUIC to the relay is dropped at the core; STUN and everything
    // else still pass.
    let _no_quic = lab
        .block_udp_port(
            CORE,
            lab.wan_ip("client"),
            lab.wan_ip("relay"),
            relay_port(&net),
        )
        .expect("block the client's QUIC to the relay");
    let server = net.expose(&[]);
    let client = net.connect(&server);
    let status = client.status(lab);
    assert_eq!(status["relays"][0]["transport"], "tcp", "{status}");
    // Its candidates name the address the relay's STUN service saw: its NAT's.
    let nat_ip = lab.wan_ip("client").to_string();
    wait_for(
        "the client's reflexive candidate",
        Duration::from_secs(10),
        || {
            let status = client.status(lab);
            status["network"]["candidates"]
                .as_array()?
                .iter()
                .any(|c| {
                    c["addr"]
                        .as_str()
                        .is_some_and(|a| a.starts_with(&format!("{nat_ip}:")))
                        && c["sources"]
                            .as_array()
                            .is_some_and(|s| s.iter().any(|s| s == "reflexive"))
                })
                .then_some(())
        },
    );

    let forward = client.forward_addr(lab);
    let started = Instant::now();
    let (sent, received, n) = ferry_tests::labrun::transfer_in(lab, "client", forward, 4, 1 << 20);
    assert_eq!((sent, n), (received, 1 << 20));
    let took = time_to_direct(
        lab,
        &client,
        &server.node_id,
        started,
        Duration::from_secs(20),
    )
    .unwrap_or_else(|| {
        panic!(
            "no direct path from a node on a TCP relay link: {:?}\nclient log:\n{}",
            client.peer(lab, &server.node_id),
            client.proc.log()
        )
    });
    println!(
        "a node on a TCP relay link went direct {} ms after its first transfer",
        took.as_millis()
    );
    let (sent, received, n) = ferry_tests::labrun::transfer_in(lab, "client", forward, 5, 4 << 20);
    assert_eq!((sent, n), (received, 4 << 20), "over the direct path");
    let peer = client.peer(lab, &server.node_id).expect("peer in status");
    assert_eq!(peer["path"], "direct", "{peer}");
    assert_eq!(client.status(lab)["relays"][0]["transport"], "tcp");
}

/// The relay's port, from the lab's relay URL.
fn relay_port(net: &EchoLab) -> u16 {
    net.url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port in the relay URL")
}

#[test]
fn a_node_on_a_tcp_relay_link_moves_to_quic_once_udp_gets_through_with_transfers_intact() {
    let Some(net) = EchoLab::builder("tcp_to_quic")
        .public("outside")
        .nats(NatKind::Masquerade, NatKind::Masquerade)
        .build()
    else {
        return;
    };
    let lab = &net.lab;
    // The server's QUIC to the relay is dropped at the core, so its link is TLS/TCP;
    // and the two nodes cannot reach each other over UDP at all, so the overlay
    // connection stays relayed, through that link.
    let no_quic = lab
        .block_udp_port(
            CORE,
            lab.wan_ip("server"),
            lab.wan_ip("relay"),
            relay_port(&net),
        )
        .expect("block the server's QUIC to the relay");
    let _no_direct = lab
        .block_udp(CORE, lab.wan_ip("server"), lab.wan_ip("client"))
        .expect("block UDP between the nodes");
    let server = net.expose(&["--public"]);
    assert_eq!(server.status(lab)["relays"][0]["transport"], "tcp");
    let public = server.public_addr(lab);
    let client = net.connect(&server);
    let forward = client.forward_addr(lab);

    // Two transfers in flight across the move: a stock client on the public port
    // (a stream on the server's TLS/TCP link) and node to node over the relay.
    let stop = Arc::new(AtomicBool::new(false));
    let paced = |host: &'static str, addr: SocketAddr, what: &'static str| {
        let stream = lab
            .in_ns(host, move || TcpStream::connect(addr))
            .expect("namespace")
            .expect("connect");
        let stop = stop.clone();
        // About 1.6 MB/s each: steady traffic across the move, not a flood.
        let pace = Pace {
            chunk: CHUNK,
            every: Duration::from_millis(10),
        };
        std::thread::spawn(move || {
            paced_echo(stream, pace, move |_| !stop.load(Ordering::Relaxed), what)
        })
    };
    let public_transfer = paced(
        "outside",
        public,
        "a public-port connection across the move",
    );
    let overlay_transfer = paced("client", forward, "an overlay connection across the move");
    // It tries QUIC meanwhile, and fails while it is dropped.
    let unreachable = "ferry_shim_relay_upgrades_total{outcome=\"unreachable\"}";
    wait_for(
        "a try at QUIC that cannot get through",
        Duration::from_secs(20),
        || (server.metric(lab, unreachable) >= 1.0).then_some(()),
    );
    assert_eq!(server.status(lab)["relays"][0]["transport"], "tcp");

    lab.clear(no_quic).expect("let the server's QUIC through");
    let unblocked = Instant::now();
    let moved = wait_for(
        "the server's relay link to move to QUIC",
        Duration::from_secs(15),
        || {
            let relay = &server.status(lab)["relays"][0];
            (relay["transport"] == "quic").then(|| unblocked.elapsed())
        },
    );
    println!(
        "the relay link moved to QUIC {} ms after its UDP got through",
        moved.as_millis()
    );
    assert!(
        moved <= Duration::from_secs(10),
        "moved to QUIC only {} ms after UDP got through",
        moved.as_millis()
    );
    let status = server.status(lab);
    assert_eq!(status["relays"][0]["state"], "connected", "{status}");
    assert_eq!(status["relays"][0]["moved_to_quic"], 1, "{status}");
    assert_eq!(server.public_addr(lab), public, "the same public port");
    assert_eq!(
        server.metric(lab, "ferry_shim_relay_upgrades_total{outcome=\"moved\"}"),
        1.0
    );
    assert!(
        server.metric(
            lab,
            "ferry_shim_relay_upgrades_total{outcome=\"unreachable\"}"
        ) >= 1.0,
        "the tries while QUIC was dropped are counted"
    );

    // Both transfers go on over the new link for a while, then end intact.
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    for (transfer, what) in [
        (public_transfer, "public port"),
        (overlay_transfer, "overlay"),
    ] {
        let (sent, received, total) = transfer.join().expect("transfer thread");
        assert!(total > 100 * CHUNK, "{what}: only {total} bytes moved");
        assert_eq!(sent, received, "{what}: bytes differ after {total} bytes");
        println!("{what}: {total} bytes echoed intact across the move");
    }
    // New public connections come over the QUIC link; the relay saw one move, and
    // the node never left it.
    let (sent, received, n) = transfer_in(lab, "outside", public, 7, 4 << 20);
    assert_eq!((sent, n), (received, 4 << 20), "public port after the move");
    let relay_log = net.relay.proc.log();
    let node = &server.node_id;
    assert!(
        relay_log.contains(&format!("node {node} moved its link from tcp to quic")),
        "{relay_log}"
    );
    // The old link closed once its public connection ended, and only it.
    wait_for(
        "the relay to close the old link",
        Duration::from_secs(10),
        || {
            net.relay
                .proc
                .log()
                .lines()
                .any(|l| {
                    l.contains(&format!("node {node} at")) && l.contains("its old tcp link is done")
                })
                .then_some(())
        },
    );
    let relay_log = net.relay.proc.log();
    assert!(
        !relay_log
            .lines()
            .any(|l| l.contains(&format!("node {node} at")) && l.contains("disconnected")),
        "the node never left the relay:\n{relay_log}"
    );
}
