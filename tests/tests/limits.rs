//! The relay's limits (issue #4): a node over its bytes/s is slowed, not cut off, and
//! others are not slowed with it; a flood of handshakes from one address is throttled
//! while other addresses get in, and so is a flood of public-port connections, before
//! it reaches the node; streams per node and nodes per relay are capped with a metric
//! and a clear message.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ferry_proto::SecretKey;
use ferry_proto::tls::{self, ALPN_RELAY};
use ferry_tests::*;

#[test]
fn a_node_over_its_byte_rate_is_slowed_not_cut_and_others_are_not_slowed() {
    let dir = TempDir::new("limits-bytes");
    // 1 MB/s per node, with a one-second (1 MB) burst.
    let relay = Relay::start_args(
        dir.path(),
        "24900-24909",
        &["--node-bytes-per-sec", "1000000"],
    );
    let slow = Shim::expose_echo(dir.path(), "slow", &relay.url, &["--public"]);
    let fast = Shim::expose_echo(dir.path(), "fast", &relay.url, &["--public"]);
    let (slow_addr, fast_addr) = (slow.public_addr("echo"), fast.public_addr("echo"));

    // 1.5 MB each way through the limited node: 3 MB against its budget, 1 MB of
    // which the burst covers, so at least about two seconds.
    let limited = std::thread::spawn(move || {
        let start = Instant::now();
        let result = echo_transfer(slow_addr, 1, 1_500_000);
        (result, start.elapsed())
    });
    std::thread::sleep(Duration::from_millis(200));
    // Meanwhile another node moves data within its own budget (its burst), and is
    // not held back by the first node's traffic.
    let start = Instant::now();
    let (sent, received, n) = echo_transfer(fast_addr, 2, 400_000);
    let fast_took = start.elapsed();
    assert_eq!((sent, n), (received, 400_000));
    assert!(
        !limited.is_finished(),
        "the limited transfer finished first ({fast_took:?})"
    );

    let ((sent, received, n), slow_took) = limited.join().unwrap();
    assert_eq!(n, 1_500_000, "the slowed node was cut off");
    assert_eq!(sent, received);
    // A lower bound only: it can never fail because the machine is slow.
    assert!(slow_took >= Duration::from_millis(1600), "{slow_took:?}");
    assert!(relay.metric("ferry_relay_limit_hits_total{limit=\"bytes\"}") > 0.0);
    eprintln!(
        "limited node: 3 MB in {} ms; other node: 0.8 MB in {} ms",
        slow_took.as_millis(),
        fast_took.as_millis()
    );
}

/// Tries `count` QUIC handshakes at once from `source`; returns how many succeeded.
async fn handshakes(relay: &Relay, source: &str, count: usize) -> usize {
    let endpoint = quinn::Endpoint::client(source.parse().unwrap()).unwrap();
    let attempts = (0..count).map(|_| {
        let cfg = tls::client_config(
            &SecretKey::generate(),
            relay.relay_id(),
            ALPN_RELAY,
            "relay",
        )
        .unwrap();
        let endpoint = endpoint.clone();
        let addr = relay.listen_addr();
        async move {
            ferry_proto::link::connect_quic(&endpoint, addr, cfg, ALPN_RELAY)
                .await
                .is_ok()
        }
    });
    futures::future::join_all(attempts)
        .await
        .into_iter()
        .filter(|ok| *ok)
        .count()
}

#[test]
fn a_handshake_flood_from_one_address_is_throttled_and_others_get_in() {
    let dir = TempDir::new("limits-handshakes");
    // Two per second, bursts of twenty.
    let relay = Relay::start_args(
        dir.path(),
        "22910-22919",
        &["--handshakes-per-ip-per-sec", "2"],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let flooded = rt.block_on(handshakes(&relay, "127.0.0.1:0", 60));
    assert!(flooded <= 25, "{flooded} of 60 handshakes got through");
    assert!(flooded >= 15, "the burst was not honoured: {flooded}");
    assert!(relay.metric("ferry_relay_limit_hits_total{limit=\"handshake_rate\"}") >= 30.0);
    // Another source address is not affected.
    let other = rt.block_on(handshakes(&relay, "127.0.0.2:0", 5));
    assert_eq!(other, 5);
}

/// Connects from `source` to `public` and echoes a byte; true if it was served.
async fn served_from(source: &str, public: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(source.parse().unwrap()).unwrap();
    let Ok(mut stream) = socket.connect(public).await else {
        return false;
    };
    let echoed = async {
        stream.write_all(b"x").await?;
        let mut buf = [0u8; 1];
        stream.read_exact(&mut buf).await?;
        Ok::<_, std::io::Error>(buf == *b"x")
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), echoed).await,
        Ok(Ok(true))
    )
}

#[test]
fn a_connection_flood_from_one_address_is_closed_before_the_node() {
    let dir = TempDir::new("limits-connections");
    // Two per second, bursts of twenty.
    let relay = Relay::start_args(
        dir.path(),
        "22930-22939",
        &["--connections-per-ip-per-sec", "2"],
    );
    let node = Shim::expose_echo(dir.path(), "node", &relay.url, &["--public"]);
    let public = node.public_addr("echo");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut served = 0;
    for _ in 0..60 {
        served += rt.block_on(served_from("127.0.0.1:0", public)) as usize;
    }
    assert!(served <= 25, "{served} of 60 connections got through");
    assert!(served >= 15, "the burst was not honoured: {served}");
    assert!(relay.metric("ferry_relay_limit_hits_total{limit=\"connection_rate\"}") >= 30.0);
    // And the operator reads why, once, with the setting to change.
    let log = relay.proc.log();
    let said = log
        .lines()
        .filter(|l| l.contains("public-port connections from 127.0.0.1 are over --connections-per-ip-per-sec (2 a second"))
        .count();
    assert_eq!(said, 1, "{log}");
    // The refused ones never reached the node.
    let reached = node.metric("ferry_shim_streams_total{kind=\"public\",outcome=\"ok\"}");
    assert_eq!(reached as usize, served);
    // Another source address is served.
    for _ in 0..5 {
        assert!(rt.block_on(served_from("127.0.0.2:0", public)));
    }
}

#[test]
fn streams_per_node_and_nodes_per_relay_are_capped() {
    let dir = TempDir::new("limits-caps");
    let relay = Relay::start_args(
        dir.path(),
        "22920-22929",
        &["--max-streams-per-node", "2", "--max-nodes", "1"],
    );
    let node = Shim::expose_echo(dir.path(), "node", &relay.url, &["--public"]);
    let public: SocketAddr = node.public_addr("echo");
    let held: Vec<TcpStream> = (0..2)
        .map(|_| {
            let s = TcpStream::connect(public).unwrap();
            // Make sure each is spliced before the next.
            assert_eq!(echo_over(&s, b"ok"), b"ok");
            s
        })
        .collect();
    // The third is closed at once.
    let mut third = TcpStream::connect(public).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 1];
    let n = third.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the third connection was served");
    assert!(relay.metric("ferry_relay_limit_hits_total{limit=\"streams\"}") >= 1.0);
    drop(held);

    // A second node does not fit on a relay for one.
    let second = Shim::expose_echo(dir.path(), "second", &relay.url, &[]);
    let why = wait_for("the full relay to refuse", Duration::from_secs(10), || {
        let status = second.status();
        let relay = &status["relays"][0];
        (relay["state"] == "refused").then(|| relay["error"].as_str().unwrap().to_string())
    });
    assert!(why.contains("full") && why.contains("max_nodes"), "{why}");
    assert!(relay.metric("ferry_relay_limit_hits_total{limit=\"nodes\"}") >= 1.0);
}

fn echo_over(stream: &TcpStream, message: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut s = stream.try_clone().unwrap();
    s.write_all(message).unwrap();
    let mut back = vec![0u8; message.len()];
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.read_exact(&mut back).unwrap();
    back
}
