//! Idle connections stay up. Tahoe's Foolscap pings only after 240 s of silence, so a
//! quiet connection must survive. Every timer that could cut one is beaten by a
//! keepalive: relay links carry session pings every 15 s and a QUIC keepalive after 25 s
//! (sessions silent for 60 s end); overlay connections keep alive every 15 s (idle
//! timeout 60 s); public TCP connections and local sockets have no idle timeout at
//! all. This test holds connections silent for just over 10 minutes —
//! the promise Ferry makes, and ten times every idle timeout in the chain — over QUIC
//! relay links and over TLS/TCP ones side by side, then checks the same connections
//! still carry data and no link was re-established meanwhile.
//! (It is the one long test; nextest's config gives it room, and it runs beside the
//! others.)

use std::net::TcpStream;
use std::time::Duration;

use ferry_tests::*;

const SILENCE: Duration = Duration::from_secs(10 * 60 + 10);

/// Lines of a program's log that say why a link, session or connection ended.
fn endings(log: &str) -> String {
    const WORDS: [&str; 8] = [
        "disconnected",
        "reconnecting",
        "silent",
        "closed",
        "lost",
        "unresponsive",
        "timed out",
        "error",
    ];
    log.lines()
        .filter(|l| WORDS.iter().any(|w| l.contains(w)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A serving node with a public port and a node connected to it over the overlay, on
/// one kind of relay link, with one silent connection on each path.
struct Pair {
    link: &'static str,
    server: Shim,
    client: Shim,
    via_public: TcpStream,
    via_overlay: TcpStream,
}

impl Pair {
    fn start(dir: &std::path::Path, link: &'static str, relay_url: &str) -> Pair {
        let server = Shim::expose_echo(
            dir,
            &format!("server-{link}"),
            relay_url,
            &["--public", "--allow-any"],
        );
        let client = Shim::connect(dir, &format!("client-{link}"), &server.node_id, relay_url);
        // A TCP-only route can only give TLS/TCP links. A QUIC link may still lose the
        // connect race to TLS/TCP on a loaded machine; the test then says so, as the
        // link it held silent is what it reports.
        for shim in [&server, &client] {
            // A connecting shim is ready before its relay link is up.
            let transport = wait_for("a relay link", Duration::from_secs(20), || {
                let transport = shim.status()["relays"][0]["transport"].clone();
                (!transport.is_null()).then_some(transport)
            });
            if link == "tcp" {
                assert_eq!(transport, "tcp");
            } else if transport != link {
                eprintln!(
                    "IDLE | the {link} pair's {} came up over {transport}",
                    shim.proc.log_path.display()
                );
            }
        }
        let mut via_public = TcpStream::connect(server.public_addr("echo")).unwrap();
        let mut via_overlay = TcpStream::connect(client.forward_addr()).unwrap();
        for s in [&mut via_public, &mut via_overlay] {
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            round_trip(s, b"before the silence").unwrap();
        }
        Pair {
            link,
            server,
            client,
            via_public,
            via_overlay,
        }
    }

    /// Both paths are tried before anything is judged; a failure says which path died
    /// and what the programs logged about it.
    fn after_the_silence(&mut self, relay: &Relay) {
        let public = round_trip(&mut self.via_public, b"after the silence, public");
        let overlay = round_trip(&mut self.via_overlay, b"after the silence, overlay");
        if public.is_err() || overlay.is_err() {
            panic!(
                "over {} relay links, after {SILENCE:?} of silence: public-port connection \
                 {public:?}, overlay connection {overlay:?}\nrelay:\n{}\nserver shim:\n{}\n\
                 client shim:\n{}",
                self.link,
                endings(&relay.proc.log()),
                endings(&self.server.proc.log()),
                endings(&self.client.proc.log())
            );
        }
        for shim in [&self.server, &self.client] {
            assert!(
                !shim.proc.log().contains("reconnecting"),
                "{}",
                shim.proc.log()
            );
        }
    }
}

/// QUIC relay links and TLS/TCP ones (a shim whose UDP is blocked, or that lost the
/// connect race on a loaded machine) are held silent side by side.
#[test]
fn silent_connections_survive_longer_than_every_idle_timeout() {
    let dir = TempDir::new("idle");
    let relay = Relay::start(dir.path(), "22400-22409");
    let tcp_only = url_with_port(&relay.url, tcp_only_proxy(relay.listen_addr()).port());
    let mut pairs = [
        Pair::start(dir.path(), "quic", &relay.url),
        Pair::start(dir.path(), "tcp", &tcp_only),
    ];
    let since_before = relay.connected_since();
    assert_eq!(since_before.len(), 4);

    std::thread::sleep(SILENCE);

    for pair in &mut pairs {
        pair.after_the_silence(&relay);
    }
    assert_eq!(
        since_before,
        relay.connected_since(),
        "a relay link was re-established"
    );
}
