//! Stock TCP clients reach a NAT-bound service through a relay's public port: bulk
//! transfers arrive bit-identical, many connections at once work, UDP-blocked nodes
//! fall back to TLS over TCP, and an offline node's port refuses at once.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use ferry_tests::*;

const MIB: usize = 1 << 20;

#[test]
fn public_port_carries_256_mib_each_way_with_identical_sha256() {
    let dir = TempDir::new("bulk-public");
    let relay = Relay::start(dir.path(), "22000-22009");
    let shim = Shim::expose_echo(dir.path(), "home", &relay.url, &["--public"]);
    let public = shim.public_addr("echo");
    assert_eq!(public.port(), 22000, "first port of the range");
    let (sent, received, n) = echo_transfer(public, 1, 256 * MIB);
    assert_eq!(n, 256 * MIB);
    assert_eq!(sent, received, "bytes through the public port differ");

    // The relay's counters saw the traffic, per node and in Prometheus.
    let nodes = relay.nodes();
    let node = &nodes.as_array().unwrap()[0];
    assert_eq!(node["node_id"], shim.node_id.as_str());
    assert!(node["bytes_to_node"].as_u64().unwrap() >= 256 * MIB as u64);
    assert!(node["bytes_from_node"].as_u64().unwrap() >= 256 * MIB as u64);
    let metrics = relay.metrics();
    assert!(
        metrics.contains("ferry_relay_nodes_connected 1"),
        "{metrics}"
    );
    let to_node = metrics
        .lines()
        .find(|l| l.starts_with("ferry_relay_bytes_total{direction=\"to_node\",path=\"public\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .expect("public to_node byte counter");
    assert!(to_node >= 256 * MIB as u64, "{to_node}");
}

#[test]
fn two_hundred_concurrent_connections_through_one_public_port() {
    let dir = TempDir::new("concurrent");
    let relay = Relay::start(dir.path(), "22010-22019");
    let shim = Shim::expose_echo(dir.path(), "home", &relay.url, &["--public"]);
    let public = shim.public_addr("echo");
    let threads: Vec<_> = (0..200u64)
        .map(|i| {
            std::thread::spawn(move || {
                let (sent, received, n) = echo_transfer(public, 1000 + i, 256 * 1024 + i as usize);
                assert_eq!(n, 256 * 1024 + i as usize, "connection {i} length");
                assert_eq!(sent, received, "connection {i} content");
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a connection failed");
    }
}

#[test]
fn a_node_behind_udp_blocking_falls_back_to_tls_over_tcp() {
    let dir = TempDir::new("tcp-fallback");
    let relay = Relay::start(dir.path(), "22020-22029");
    // Only TCP reaches the relay through this proxy; QUIC packets go unanswered.
    let proxy = tcp_only_proxy(relay.listen_addr());
    let url = url_with_port(&relay.url, proxy.port());
    let shim = Shim::expose_echo(dir.path(), "home", &url, &["--public"]);
    let public = shim.public_addr("echo");
    let status = shim.status();
    assert_eq!(status["relays"][0]["transport"], "tcp", "{status}");
    let (sent, received, n) = echo_transfer(public, 7, 64 * MIB);
    assert_eq!(n, 64 * MIB);
    assert_eq!(sent, received);
    assert_eq!(relay.nodes()[0]["transport"], "tcp");
}

#[test]
fn an_offline_nodes_port_refuses_at_once() {
    let dir = TempDir::new("offline");
    let relay = Relay::start(dir.path(), "22030-22039");
    let mut shim = Shim::expose_echo(dir.path(), "home", &relay.url, &["--public"]);
    let public = shim.public_addr("echo");
    assert_eq!(echo_once(public, b"ping").unwrap(), b"ping");
    shim.proc.kill9();
    // The relay notices the node is gone (QUIC idle timeout or TCP reset); from then
    // on the port refuses instead of hanging.
    wait_for("relay to drop the node", Duration::from_secs(90), || {
        relay.nodes().as_array().unwrap().is_empty().then_some(())
    });
    let start = Instant::now();
    let result = TcpStream::connect_timeout(&public, Duration::from_secs(5)).and_then(|mut s| {
        use std::io::Read;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = [0u8; 1];
        match s.read(&mut buf)? {
            0 => Err(std::io::Error::other("closed")),
            _ => Ok(()),
        }
    });
    assert!(
        result.is_err(),
        "an offline node's port must not accept data"
    );
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "refusal took {:?}",
        start.elapsed()
    );
}

#[test]
fn a_node_that_stops_cleanly_frees_its_port_at_once() {
    let dir = TempDir::new("stop");
    let relay = Relay::start(dir.path(), "22040-22049");
    let mut shim = Shim::expose_echo(dir.path(), "home", &relay.url, &["--public"]);
    let public = shim.public_addr("echo");
    assert_eq!(echo_once(public, b"ping").unwrap(), b"ping");
    shim.proc.terminate();
    // The shim said goodbye, so the relay drops it without waiting for a timeout.
    wait_for("relay to drop the node", Duration::from_secs(3), || {
        relay.nodes().as_array().unwrap().is_empty().then_some(())
    });
    let err = TcpStream::connect_timeout(&public, Duration::from_secs(2)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
}
