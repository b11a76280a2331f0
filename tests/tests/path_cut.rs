//! A direct path cut mid-transfer (issue #3): traffic moves back to the relay without
//! the application seeing an error, and returns to the direct path once the cut is
//! lifted. Two Linux NATs in the lab; the cut is an nft drop of UDP between their
//! public addresses on the core router, which leaves both relay sessions untouched.
//!
//! And a node whose relay link fell back to TLS/TCP (its QUIC to the relay dropped,
//! as a lost handshake packet can make QUIC lose the connect race) still publishes
//! its UDP address, learnt from the relay's STUN service, and punches a direct path.

use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ferry_tests::labrun::{EchoLab, LabShim, time_to_direct};
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
    let relay_port: u16 = net
        .url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port in the relay URL");
    // The client's QUIC to the relay is dropped at the core; STUN and everything
    // else still pass.
    let _no_quic = lab
        .block_udp_port(CORE, lab.wan_ip("client"), lab.wan_ip("relay"), relay_port)
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
