//! The SOCKS door and the egress proxies facing bad input, on loopback: garbage and
//! wrong requests at the door get a SOCKS error (or a closed connection) and a metric,
//! never a hang; proxies that refuse, lie or babble leave the relay link down with an
//! error in status that names the proxy and what it said. (The real proxies and the
//! real curl are in `modes.rs`, in the NAT lab.)

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use ferry_tests::*;

fn door(shim: &Shim) -> SocketAddr {
    shim.status()["socks"]
        .as_str()
        .expect("socks address in status")
        .parse()
        .expect("socks address")
}

/// Greets with "no authentication", sends CONNECT with `target` (already encoded:
/// address type and address) and port 80; returns the reply code.
fn socks_connect(door: SocketAddr, target: &[u8]) -> std::io::Result<u8> {
    let mut tcp = TcpStream::connect(door)?;
    tcp.set_read_timeout(Some(Duration::from_secs(20)))?;
    tcp.write_all(&[5, 1, 0])?;
    let mut choice = [0u8; 2];
    tcp.read_exact(&mut choice)?;
    assert_eq!(choice, [5, 0], "the door must accept no-auth");
    let mut request = vec![5, 1, 0];
    request.extend_from_slice(target);
    request.extend_from_slice(&80u16.to_be_bytes());
    tcp.write_all(&request)?;
    let mut reply = [0u8; 4];
    tcp.read_exact(&mut reply)?;
    Ok(reply[1])
}

fn domain(name: &str) -> Vec<u8> {
    let mut out = vec![3, name.len() as u8];
    out.extend_from_slice(name.as_bytes());
    out
}

#[test]
fn the_door_answers_bad_requests_with_socks_errors() {
    let dir = TempDir::new("socks-door-bad");
    let relay = Relay::start(dir.path(), "23560-23569");
    let shim = Shim::start(
        dir.path(),
        "door",
        &["socks", "--listen", "127.0.0.1:0", "--relay", &relay.url],
    );
    shim.wait_connected();
    let door = door(&shim);

    // Not SOCKS at all: the connection is closed, not held.
    let mut tcp = TcpStream::connect(door).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let mut rest = Vec::new();
    let _ = tcp.read_to_end(&mut rest);
    assert!(rest.len() < 16, "the door answered HTTP with {rest:?}");

    // A .ferry name that names no node: host unreachable (4).
    assert_eq!(
        socks_connect(door, &domain("web.nonsense.ferry")).unwrap(),
        4
    );
    // Anything else without passthrough: not allowed (2), by name or by address.
    assert_eq!(socks_connect(door, &domain("example.com")).unwrap(), 2);
    assert_eq!(socks_connect(door, &[1, 127, 0, 0, 1]).unwrap(), 2);

    // The door counts a bad request just after it closed the connection (the SOCKS
    // library owns the socket until then), so on a loaded machine the count can
    // trail the client's EOF a little.
    let count = |outcome: &str| {
        let series = format!("ferry_shim_streams_total{{kind=\"socks\",outcome=\"{outcome}\"}}");
        try_metric_at(&shim.admin, &series)
    };
    wait_for("the door's counts", Duration::from_secs(5), || {
        (count("refused") == Some(3.0) && count("bad_request") == Some(1.0)).then_some(())
    });
    // The shim is still fine.
    assert_eq!(shim.status()["relays"][0]["state"], "connected");
}

/// A node the door reaches but that will not take the stream answers in SOCKS terms:
/// a node whose allow list leaves the door's node out is "not allowed" (2), a service
/// the node does not have is "refused" (5), and the door says why in its log.
#[test]
fn a_node_that_refuses_the_stream_is_answered_not_allowed_or_refused() {
    let dir = TempDir::new("socks-door-refusals");
    let relay = Relay::start(dir.path(), "23600-23609");
    let door_shim = Shim::start(
        dir.path(),
        "door",
        &["socks", "--listen", "127.0.0.1:0", "--relay", &relay.url],
    );
    // Allows only itself: the door's node is not on its list.
    let closed = Shim::expose_echo(dir.path(), "closed", &relay.url, &[]);
    let open = Shim::expose_echo(dir.path(), "open", &relay.url, &["--allow-any"]);
    for shim in [&door_shim, &closed, &open] {
        shim.wait_connected();
    }
    let door = door(&door_shim);
    let not_allowed = socks_connect(door, &domain(&format!("echo.{}.ferry", closed.node_id)));
    assert_eq!(not_allowed.expect("answer"), 2, "{}", door_shim.proc.log());
    let no_service = socks_connect(door, &domain(&format!("nope.{}.ferry", open.node_id)));
    assert_eq!(no_service.expect("answer"), 5, "{}", door_shim.proc.log());
    // The door can still reach the service that exists.
    assert_eq!(
        socks_connect(door, &domain(&format!("echo.{}.ferry", open.node_id))).expect("answer"),
        0
    );
    let log = door_shim.proc.log();
    assert!(log.contains("is not allowed to connect to node"), "{log}");
    assert!(log.contains("no service \"nope\""), "{log}");
}

#[test]
fn passthrough_connects_other_names_directly_when_configured() {
    let dir = TempDir::new("socks-door-passthrough");
    let relay = Relay::start(dir.path(), "23590-23599");
    let shim = Shim::start(
        dir.path(),
        "door",
        &[
            "socks",
            "--listen",
            "127.0.0.1:0",
            "--passthrough",
            "--relay",
            &relay.url,
        ],
    );
    shim.wait_connected();
    let door = door(&shim);
    let echo = echo_server();
    let SocketAddr::V4(v4) = echo else {
        panic!("echo server on IPv4 loopback")
    };
    let mut tcp = TcpStream::connect(door).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    tcp.write_all(&[5, 1, 0]).expect("greeting");
    let mut choice = [0u8; 2];
    tcp.read_exact(&mut choice).expect("method");
    let mut request = vec![5, 1, 0, 1];
    request.extend_from_slice(&v4.ip().octets());
    request.extend_from_slice(&v4.port().to_be_bytes());
    tcp.write_all(&request).expect("request");
    let mut reply = [0u8; 10];
    tcp.read_exact(&mut reply).expect("reply");
    assert_eq!(reply[1], 0, "passthrough refused: {reply:?}");
    let message = pattern(11, 64 * 1024);
    tcp.write_all(&message).expect("write");
    let mut back = vec![0u8; message.len()];
    tcp.read_exact(&mut back).expect("echo");
    assert_eq!(sha256(&back), sha256(&message));
    assert_eq!(
        metric_at(
            &shim.admin,
            "ferry_shim_streams_total{kind=\"socks\",outcome=\"ok\"}"
        ),
        1.0
    );
}

#[test]
fn passthrough_is_refused_outside_p2p_mode() {
    let dir = TempDir::new("socks-door-strict");
    let relay = Relay::start(dir.path(), "23570-23579");
    let out = std::process::Command::new(bin("ferry-shim"))
        .args([
            "socks",
            "--listen",
            "127.0.0.1:0",
            "--passthrough",
            "--mode",
            "strict",
            "--relay",
            &relay.url,
            "--data-dir",
        ])
        .arg(dir.path().join("strict"))
        .output()
        .expect("run ferry-shim");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("socks_passthrough is not allowed in strict mode"),
        "{err}"
    );
}

/// A "proxy" that reads one request header and answers `answer` (then holds the
/// connection until the client leaves).
fn fake_proxy(answer: Vec<u8>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let answer = answer.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf);
                let _ = stream.write_all(&answer);
                let _ = stream.read(&mut buf);
            });
        }
    });
    addr
}

fn relay_error_with_proxy(name: &str, relay: &Relay, proxy: &str, mode: &[&str]) -> String {
    let dir = TempDir::new(name);
    let mut args = vec![
        "expose",
        "--relay",
        &relay.url,
        "--service",
        "web=127.0.0.1:9",
        "--proxy",
        proxy,
    ];
    args.extend_from_slice(mode);
    let shim = Shim::start(dir.path(), "shim", &args);
    wait_for("a relay error", Duration::from_secs(40), || {
        let status = shim.status();
        status["relays"][0]["error"].as_str().map(str::to_string)
    })
}

#[test]
fn proxies_that_refuse_or_babble_are_named_in_status() {
    let dir = TempDir::new("proxy-errors");
    let relay = Relay::start(dir.path(), "23580-23589");

    let forbidding = fake_proxy(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n".to_vec());
    let err = relay_error_with_proxy("proxy-403", &relay, &format!("http://{forbidding}"), &[]);
    assert!(
        err.contains("HTTP 403 Forbidden") && err.contains(&forbidding.to_string()),
        "{err}"
    );

    let babbling = fake_proxy(vec![b'x'; 64 * 1024]);
    let err = relay_error_with_proxy("proxy-babble", &relay, &format!("http://{babbling}"), &[]);
    assert!(
        err.contains("not an HTTP answer") || err.contains("too long"),
        "{err}"
    );

    // A SOCKS5 "proxy" that rejects every method.
    let picky = fake_proxy(vec![5, 0xff]);
    let err = relay_error_with_proxy(
        "proxy-socks-picky",
        &relay,
        &format!("socks5://{picky}"),
        &["--mode", "private"],
    );
    assert!(
        err.contains("SOCKS5") && err.contains(&picky.to_string()),
        "{err}"
    );

    // Nobody listening.
    let closed = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let err = relay_error_with_proxy("proxy-closed", &relay, &format!("socks5://{closed}"), &[]);
    assert!(err.contains("cannot reach the proxy"), "{err}");
}
