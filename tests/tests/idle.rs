//! Idle connections stay up. Tahoe's Foolscap pings only after 240 s of silence, so a
//! quiet connection must survive. Every timer that could cut one is beaten by a
//! keepalive: relay links send QUIC keepalives every 3 s (idle timeout 60 s) and
//! session pings every 15 s (relay read timeout 60 s); overlay connections keep alive
//! every 15 s (idle timeout 60 s); public TCP connections and local sockets have no
//! idle timeout at all. This test holds connections silent for just over 10 minutes —
//! the promise Ferry makes, and ten times every idle timeout in the chain — then checks
//! the same connections still carry data and no link was re-established meanwhile.
//! (It is the one long test; nextest's config gives it room, and it runs beside the
//! others.)

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use ferry_tests::*;

const SILENCE: Duration = Duration::from_secs(10 * 60 + 10);

fn round_trip(stream: &mut TcpStream, message: &[u8]) {
    stream.write_all(message).unwrap();
    let mut back = vec![0u8; message.len()];
    stream.read_exact(&mut back).unwrap();
    assert_eq!(back, message);
}

#[test]
fn silent_connections_survive_longer_than_every_idle_timeout() {
    let dir = TempDir::new("idle");
    let relay = Relay::start(dir.path(), "22400-22409");
    let server = Shim::expose_echo(
        dir.path(),
        "server",
        &relay.url,
        &["--public", "--allow-any"],
    );
    let public = server.public_addr("echo");
    let client = Shim::connect(dir.path(), "client", &server.node_id, &relay.url);

    let mut via_public = TcpStream::connect(public).unwrap();
    let mut via_overlay = TcpStream::connect(client.forward_addr()).unwrap();
    for s in [&mut via_public, &mut via_overlay] {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        round_trip(s, b"before the silence");
    }
    let connected_since = || -> Vec<u64> {
        relay
            .nodes()
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["connected_since"].as_u64().unwrap())
            .collect()
    };
    let since_before = connected_since();

    std::thread::sleep(SILENCE);

    round_trip(&mut via_public, b"after the silence, public");
    round_trip(&mut via_overlay, b"after the silence, overlay");
    let since_after = connected_since();
    assert_eq!(since_before, since_after, "a relay link was re-established");
    for shim in [&server, &client] {
        assert!(
            !shim.proc.log().contains("reconnecting"),
            "{}",
            shim.proc.log()
        );
    }
}
