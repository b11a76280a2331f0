//! Hostile peers against a real relay (issue #7's battery; `bad_input.rs`, `limits.rs`
//! and `socks_door.rs` hold the rest): forged, replayed and transplanted signatures;
//! thousands of half-open and slowloris connections; a node that registers and never
//! reads. For each, the expected refusal or closed connection, memory and file
//! descriptors that stay bounded, and a well-behaved node served throughout with its
//! bytes intact (its throughput under attack is printed beside a baseline taken in the
//! same test; never judged by a timer).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_proto::SecretKey;
use ferry_proto::frame::{Control, ErrorCode, ServiceRequest};
use ferry_proto::grid::Membership;
use ferry_tests::node_session::NodeSession;
use ferry_tests::*;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Registers with `certificate` and returns the relay's refusal message, or None if
/// it admitted the node.
async fn register_with(
    relay: &Relay,
    key: SecretKey,
    certificate: Option<ferry_proto::grid::Certificate>,
) -> Option<String> {
    let register = Control::Register {
        services: vec![],
        certificate: certificate.map(Box::new),
        upgrade: false,
    };
    let (_session, answer) =
        NodeSession::open_with(&relay.url, relay.listen_addr(), key, register).await;
    match answer {
        Some(Control::Registered { .. }) => None,
        Some(Control::Error {
            code: ErrorCode::Denied,
            message,
        }) => Some(message),
        other => panic!("expected Registered or a denial, got {other:?}"),
    }
}

/// Grid mode: only a certificate signed by an admin key, for the node presenting it,
/// unaltered and unexpired, gets a node in; each forgery is refused with its reason
/// and counted. Path records: one signed by another node's key, and a replay of a
/// record already stored, are refused; the genuine one is served.
#[test]
fn forged_replayed_and_transplanted_signatures_are_refused() {
    let dir = TempDir::new("hostile-signatures");
    let relay = Relay::start_args(dir.path(), "24700-24709", &["--policy", "grid"]);
    let admin = SecretKey::load(&relay.data_dir.join("relay.key")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let member = SecretKey::generate();
        let now = unix_now();
        let membership = |member: &SecretKey, issuer: &SecretKey, expires: u64| Membership {
            member: member.node_id(),
            issuer: issuer.node_id(),
            issued: now - 60,
            expires,
            serial: 1,
        };
        let genuine = membership(&member, &admin, now + 3600).sign(&admin);

        // Self-issued: the issuer is not one of the grid's admins.
        let why = register_with(
            &relay,
            member.clone(),
            Some(membership(&member, &member, now + 3600).sign(&member)),
        )
        .await
        .expect("a self-issued certificate must be refused");
        assert!(why.contains("not an admin of this grid"), "{why}");

        // The admin's genuine certificate for `member`, presented by another node.
        let thief = SecretKey::generate();
        let why = register_with(&relay, thief, Some(genuine.clone()))
            .await
            .expect("someone else's certificate must be refused");
        assert!(why.contains("not for this node"), "{why}");

        // Altered after signing: a later expiry.
        let mut altered = genuine.clone();
        altered.membership.expires += 86_400 * 365;
        let why = register_with(&relay, member.clone(), Some(altered))
            .await
            .expect("an altered certificate must be refused");
        assert!(why.contains("does not verify"), "{why}");

        // Claiming the admin's signature with the bytes of another signature.
        let mut forged = genuine.clone();
        forged.signature = membership(&member, &admin, now + 7200)
            .sign(&SecretKey::generate())
            .signature;
        let why = register_with(&relay, member.clone(), Some(forged))
            .await
            .expect("a forged signature must be refused");
        assert!(why.contains("does not verify"), "{why}");

        // Genuine but expired.
        let expired = membership(&member, &admin, now - 1).sign(&admin);
        let why = register_with(&relay, member.clone(), Some(expired))
            .await
            .expect("an expired certificate must be refused");
        assert!(why.contains("expired"), "{why}");

        // The genuine certificate, from its member: admitted.
        let register = Control::Register {
            services: vec![],
            certificate: Some(Box::new(genuine.clone())),
            upgrade: false,
        };
        let (mut session, answer) =
            NodeSession::open_with(&relay.url, relay.listen_addr(), member.clone(), register).await;
        assert!(
            matches!(answer, Some(Control::Registered { .. })),
            "{answer:?}"
        );
        // A member then hears of the grid: its admins, so it can check other members.
        let Control::Grid { view } = session.next().await else {
            panic!("a member got no grid view after registering");
        };
        assert!(view.admins.contains(&admin.node_id()), "{view:?}");

        // Path records on the admitted session.
        let record = session.record(5, "198.51.100.7:4000");
        session
            .send(Control::Publish {
                record: Box::new(record.clone()),
            })
            .await;
        assert_eq!(
            session.next().await,
            Control::Published {
                seq: 5,
                error: None
            }
        );
        // A replay of an older record, and another record under the stored sequence
        // number: refused, so a delayed or captured copy cannot undo a newer one. (The
        // identical record again is a harmless retry and is accepted.)
        for (seq, addr) in [(4, "198.51.100.7:1"), (5, "192.0.2.66:6666")] {
            session
                .send(Control::Publish {
                    record: Box::new(session.record(seq, addr)),
                })
                .await;
            let Control::Published { error: Some(e), .. } = session.next().await else {
                panic!("a replayed record (seq {seq}) was accepted");
            };
            assert!(e.contains("not newer"), "{e}");
        }
        // A record for this node signed by another node's key.
        let mut transplanted = session.record(6, "192.0.2.66:6666");
        transplanted.signature = ferry_proto::record::PathRecord {
            ..transplanted.record.clone()
        }
        .sign(&SecretKey::generate())
        .signature;
        session
            .send(Control::Publish {
                record: Box::new(transplanted),
            })
            .await;
        let Control::Published { error: Some(e), .. } = session.next().await else {
            panic!("a record signed by another key was accepted");
        };
        assert!(e.contains("does not verify"), "{e}");
        session
            .send(Control::Lookup {
                node_id: member.node_id(),
            })
            .await;
        let Control::Found {
            record: Some(found),
            ..
        } = session.next().await
        else {
            panic!("the genuine record is gone");
        };
        assert_eq!(*found, record, "the genuine record is what is served");
        // Through all of it the session stayed up.
        session.send(Control::Ping { nonce: 7 }).await;
        assert_eq!(session.next().await, Control::Pong { nonce: 7 });
    });
    for (reason, at_least) in [
        ("unknown_issuer", 1.0),
        ("bad_certificate", 3.0),
        ("expired", 1.0),
    ] {
        let n = relay.metric(&format!(
            "ferry_relay_refusals_total{{reason=\"{reason}\"}}"
        ));
        assert!(n >= at_least, "{reason}: {n}");
    }
}

/// A TCP connection that has sent `bytes` and is held open.
fn hold(from: &str, to: SocketAddr, bytes: &[u8]) -> Option<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
    socket
        .bind(&format!("{from}:0").parse::<SocketAddr>().ok()?.into())
        .ok()?;
    socket
        .connect_timeout(&to.into(), Duration::from_secs(5))
        .ok()?;
    let mut stream: TcpStream = socket.into();
    stream.write_all(bytes).ok()?;
    Some(stream)
}

/// Whether the other end has closed `stream` (read returns end of file or an error).
fn closed_by_peer(stream: &mut TcpStream) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut buf = [0u8; 512];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

/// Megabytes per second of an echo transfer of `total` bytes, checked intact.
fn echo_rate(public: SocketAddr, seed: u64, total: usize) -> f64 {
    let start = Instant::now();
    let (sent, received, n) = echo_transfer(public, seed, total);
    assert_eq!(n, total);
    assert_eq!(sent, received, "the echo came back altered");
    total as f64 / 1e6 / start.elapsed().as_secs_f64()
}

/// 2,000 connections to the relay's TLS port from 40 addresses (half send nothing,
/// half a TLS record header and then a byte every half second) and 200 slow HTTP
/// requests to its admin port: every one is closed by the relay within its handshake
/// or header timeout, descriptors and memory return to where they were, and a node's
/// public port carries an intact transfer throughout.
#[test]
fn half_open_and_slowloris_connections_are_shed_and_a_good_node_keeps_serving() {
    let dir = TempDir::new("hostile-halfopen");
    let relay = Relay::start(dir.path(), "24710-24719");
    let shim = Shim::expose_echo(dir.path(), "good", &relay.url, &["--public"]);
    let public = shim.public_addr("echo");
    let pid = relay.proc.pid();
    let baseline_rate = echo_rate(public, 1, 32 << 20);
    let (fds_before, rss_before) = (open_fds(pid), rss_kib(pid));

    let tls_port = relay.listen_addr();
    let admin: SocketAddr = relay.admin.trim_start_matches("http://").parse().unwrap();
    let mut tls_conns = Vec::new();
    for i in 0..2000 {
        let from = format!("127.0.0.{}", 2 + i % 40);
        let first: &[u8] = if i % 2 == 0 { b"" } else { &[0x16, 0x03, 0x01] };
        if let Some(c) = hold(&from, tls_port, first) {
            tls_conns.push(c);
        }
    }
    let mut admin_conns: Vec<TcpStream> = (0..200)
        .filter_map(|i| {
            hold(
                &format!("127.0.1.{}", 2 + i % 20),
                admin,
                b"GET /healthz HTTP/1.1\r\nHost: x\r\n",
            )
        })
        .collect();
    let opened = tls_conns.len() + admin_conns.len();
    eprintln!(
        "attack: {} connections to the TLS port, {} to the admin port",
        tls_conns.len(),
        admin_conns.len()
    );
    assert!(
        opened > 1500,
        "the kernel accepted only {opened} connections"
    );
    let peak_fds = open_fds(pid);

    // Slowloris: a byte every half second on every other connection, while the good
    // node moves its bytes.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let drip = {
        let stop = stop.clone();
        let mut drips: Vec<TcpStream> = tls_conns
            .iter()
            .skip(1)
            .step_by(2)
            .chain(admin_conns.iter())
            .filter_map(|c| c.try_clone().ok())
            .collect();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                drips.retain_mut(|c| c.write_all(b"X").is_ok());
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    let attacked_rate = echo_rate(public, 2, 32 << 20);

    // Every attacking connection is closed by the relay: the TLS port's handshake
    // timeout is 10 s, the admin port's header timeout 30 s.
    let deadline = Instant::now() + Duration::from_secs(45);
    while Instant::now() < deadline {
        tls_conns.retain_mut(|c| !closed_by_peer(c));
        admin_conns.retain_mut(|c| !closed_by_peer(c));
        if tls_conns.is_empty() && admin_conns.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drip.join().unwrap();
    assert_eq!(
        (tls_conns.len(), admin_conns.len()),
        (0, 0),
        "connections to the TLS port and the admin port still open after 45 s"
    );
    let fds_after = wait_for(
        "the relay's descriptors to return",
        Duration::from_secs(10),
        || {
            let n = open_fds(pid);
            (n <= fds_before + 16).then_some(n)
        },
    );
    let rss_after = rss_kib(pid);
    let after_rate = echo_rate(public, 3, 32 << 20);
    eprintln!(
        "HOSTILE | half-open and slowloris | fds {fds_before} -> peak {peak_fds} -> {fds_after} | \
         RSS {rss_before} -> {rss_after} KiB | good node {baseline_rate:.0} MB/s before, \
         {attacked_rate:.0} MB/s under attack ({:.2}x), {after_rate:.0} MB/s after",
        attacked_rate / baseline_rate
    );
    assert!(
        rss_after < rss_before + 64 * 1024,
        "the relay kept {} KiB after the attack",
        rss_after - rss_before
    );
    assert!(healthz(&relay), "the admin port answers again");
}

/// Nodes linked over TLS/TCP that end their session but leave the TCP connection open
/// and silent (a wedged client, a middlebox that swallows the FIN) leave nothing
/// behind in the relay: once their sessions are over, its tasks and descriptors are
/// back where they were while the clients still hold their connections. (Each such
/// node used to leave the relay one task and one descriptor for good; a relay whose
/// TCP-linked nodes came and went that way grew without end.)
#[test]
fn tcp_linked_nodes_that_leave_their_connection_open_leave_nothing_behind() {
    const NODES: usize = 300;
    let dir = TempDir::new("hostile-tcp-leavers");
    let relay = Relay::start_args(dir.path(), "24920-24929", &Relay::NO_PER_ADDRESS_LIMITS);
    let pid = relay.proc.pid();
    let (fds_before, tasks_before) = (open_fds(pid), relay.metric("ferry_relay_tasks"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut report = Vec::new();
    for round in 1..=3 {
        let held: Vec<NodeSession> = rt.block_on(async {
            let mut held = Vec::new();
            for _ in 0..NODES {
                let register = Control::Register {
                    services: vec![],
                    certificate: None,
                    upgrade: false,
                };
                let (session, answer) = NodeSession::try_open_tcp(
                    &relay.url,
                    relay.listen_addr(),
                    SecretKey::generate(),
                    register,
                )
                .await
                .unwrap_or_else(|e| panic!("a TCP-linked node cannot connect: {e}"));
                assert!(
                    matches!(answer, Some(Control::Registered { .. })),
                    "{answer:?}"
                );
                held.push(session);
            }
            held
        });
        assert_eq!(relay.metric("ferry_relay_nodes_connected"), NODES as f64);
        // The sessions end; the clients keep their TCP connections, sending nothing.
        for session in &held {
            session.link.close("leaving");
        }
        wait_for("the sessions to end", Duration::from_secs(30), || {
            (relay.metric("ferry_relay_nodes_connected") == 0.0).then_some(())
        });
        let (fds, tasks) = wait_for(
            "the relay's descriptors and tasks to return",
            Duration::from_secs(30),
            || {
                let (fds, tasks) = (open_fds(pid), relay.metric("ferry_relay_tasks"));
                (fds <= fds_before + 16 && tasks <= tasks_before + 16.0).then_some((fds, tasks))
            },
        );
        report.push(format!(
            "round {round}: fds {fds}, tasks {tasks}, RSS {} KiB",
            rss_kib(pid)
        ));
        drop(held);
    }
    eprintln!(
        "HOSTILE | {NODES} TCP-linked nodes leaving with their connection open, three \
         times | before: fds {fds_before}, tasks {tasks_before} | {}",
        report.join(" | ")
    );
}

fn healthz(relay: &Relay) -> bool {
    let admin: SocketAddr = relay.admin.trim_start_matches("http://").parse().unwrap();
    let Ok(mut c) = TcpStream::connect(admin) else {
        return false;
    };
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = c.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    let mut answer = String::new();
    let _ = c.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.1 200")
}

/// A node registers a public service and then reads nothing: not its session, not
/// the streams the relay opens to it. Stock clients pushing into its public port are
/// held back by flow control (each gets only a bounded amount in before its writes
/// stall); overlay packets sent to it are dropped and counted once its session queue
/// is full; the relay's memory stays bounded; another node is served throughout.
#[test]
fn a_node_that_never_reads_is_held_to_bounded_buffers() {
    let dir = TempDir::new("hostile-noread");
    let relay = Relay::start(dir.path(), "24720-24729");
    let good = Shim::expose_echo(dir.path(), "good", &relay.url, &["--public"]);
    let good_public = good.public_addr("echo");
    let pid = relay.proc.pid();
    let baseline_rate = echo_rate(good_public, 1, 32 << 20);
    let rss_before = rss_kib(pid);
    let rt = tokio::runtime::Runtime::new().unwrap();

    let (sink, sink_public) = rt.block_on(async {
        let register = Control::Register {
            services: vec![ServiceRequest {
                name: "sink".into(),
                public: true,
            }],
            certificate: None,
            upgrade: false,
        };
        let (sink, answer) = NodeSession::open_with(
            &relay.url,
            relay.listen_addr(),
            SecretKey::generate(),
            register,
        )
        .await;
        let Some(Control::Registered { services, .. }) = answer else {
            panic!("the sink was not registered: {answer:?}");
        };
        let port = services[0].public_port.expect("a public port for the sink");
        (sink, SocketAddr::from(([127, 0, 0, 1], port)))
    });

    // Twenty stock clients each try to push 64 MiB into the sink's public port.
    let pushers: Vec<_> = (0..20)
        .map(|i| {
            std::thread::spawn(move || {
                let mut c = TcpStream::connect(sink_public).unwrap();
                c.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
                let chunk = pattern(i, 64 << 10);
                let mut pushed = 0usize;
                while pushed < 64 << 20 {
                    match c.write(&chunk) {
                        Ok(n) => pushed += n,
                        Err(_) => break,
                    }
                }
                (pushed, c)
            })
        })
        .collect();

    // Another node floods the sink with overlay packets over its own session: small
    // ones, which the relay passes on as link datagrams (quinn's bounded datagram
    // buffers drop what the sink does not take), and ones too large for a datagram,
    // which go into the sink's session queue (bounded: dropped and counted once full).
    let flooded = rt.block_on(async {
        use futures::SinkExt;
        let (mut flooder, _) = NodeSession::open(&relay.url, relay.listen_addr()).await;
        let target = sink.key.node_id();
        let small = bytes::Bytes::from(vec![0xc0u8; 1000]);
        let large = bytes::Bytes::from(vec![0xc0u8; 4000]);
        let mut sent = 0usize;
        for _ in 0..20_000 {
            for data in [&small, &large] {
                flooder
                    .writer
                    .send(ferry_proto::frame::Frame::Packet {
                        peer: target,
                        data: data.clone(),
                    })
                    .await
                    .unwrap();
                sent += 1;
            }
        }
        // The flooder's own session is still served.
        flooder.send(Control::Ping { nonce: 1 }).await;
        assert_eq!(flooder.next().await, Control::Pong { nonce: 1 });
        sent
    });

    let attacked_rate = echo_rate(good_public, 2, 32 << 20);
    let mut total_pushed = 0;
    let mut clients = Vec::new();
    for p in pushers {
        let (pushed, c) = p.join().unwrap();
        assert!(
            pushed < 16 << 20,
            "a client got {pushed} bytes into a node that reads nothing"
        );
        total_pushed += pushed;
        clients.push(c);
    }
    let rss_during = rss_kib(pid);
    let dropped = relay.metric("ferry_relay_overlay_packets_dropped_total{reason=\"queue_full\"}");
    eprintln!(
        "HOSTILE | never reads | {} KiB pushed by 20 clients before flow control stopped them | \
         {flooded} packets flooded, {dropped} dropped (queue_full) | \
         RSS {rss_before} -> {rss_during} KiB | good node {baseline_rate:.0} MB/s before, \
         {attacked_rate:.0} MB/s meanwhile ({:.2}x)",
        total_pushed / 1024,
        attacked_rate / baseline_rate
    );
    assert!(
        dropped > 0.0,
        "packets to a node that reads nothing are dropped"
    );
    assert!(
        rss_during < rss_before + 128 * 1024,
        "the relay grew by {} KiB holding a non-reading node's traffic",
        rss_during - rss_before
    );
    drop(clients);
    drop(sink);
}

/// Random bytes on every port the three programs open: TCP (relay link, admin HTTP of
/// relay, rendezvous and shim) and UDP (relay link, both STUN services, the standalone
/// rendezvous's node sessions, the shim's one socket). Each TCP connection is closed by
/// the program; afterwards every program still does its job, and none logged a panic.
#[test]
fn random_bytes_on_every_port_leave_every_program_serving() {
    let dir = TempDir::new("hostile-garbage");
    let relay = Relay::start(dir.path(), "22530-22539");
    let rendezvous = Rendezvous::start(dir.path(), &[]);
    let udp_port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let shim = Shim::expose_echo(
        dir.path(),
        "good",
        &relay.url,
        &[
            "--public",
            "--udp-port",
            &udp_port.to_string(),
            "--rendezvous",
            &rendezvous.url,
        ],
    );
    let public = shim.public_addr("echo");
    let addr = |admin: &str| -> SocketAddr { admin.trim_start_matches("http://").parse().unwrap() };
    let rendezvous_listen: SocketAddr = rendezvous.url.rsplit_once('@').unwrap().1.parse().unwrap();
    let tcp_ports = [
        ("relay link (TLS)", relay.listen_addr()),
        ("relay admin", addr(&relay.admin)),
        ("rendezvous admin", addr(&rendezvous.admin)),
        ("shim admin", addr(&shim.admin)),
    ];
    let udp_ports = [
        ("relay link (QUIC)", relay.listen_addr()),
        ("relay STUN", relay.stun.expect("embedded STUN")),
        ("rendezvous sessions (QUIC)", rendezvous_listen),
        ("rendezvous STUN", rendezvous.stun),
        ("shim socket", SocketAddr::from(([127, 0, 0, 1], udp_port))),
    ];

    // A listener on every interface ([::] or 0.0.0.0) is reached on IPv4 loopback.
    let loopback = |a: SocketAddr| SocketAddr::from(([127, 0, 0, 1], a.port()));
    let udp_ports = udp_ports.map(|(what, a)| (what, loopback(a)));
    let tcp_ports = tcp_ports.map(|(what, a)| (what, loopback(a)));
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for (what, to) in udp_ports {
        for i in 0..2000u64 {
            let len = 1 + (i as usize * 7919) % 1472;
            udp.send_to(&pattern(i, len), to)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
        }
    }
    for (what, to) in tcp_ports {
        let conns: Vec<_> = (0..50u64)
            .map(|i| {
                let garbage = pattern(1000 + i, 1 + (i as usize * 1327) % (64 << 10));
                std::thread::spawn(move || {
                    let mut c = TcpStream::connect(to).unwrap();
                    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                    // The program may close before taking it all.
                    let _ = c.write_all(&garbage);
                    let mut sink = Vec::new();
                    match c.read_to_end(&mut sink) {
                        Ok(_) => true,
                        Err(e) => {
                            e.kind() != std::io::ErrorKind::WouldBlock
                                && e.kind() != std::io::ErrorKind::TimedOut
                        }
                    }
                })
            })
            .collect();
        let closed = conns
            .into_iter()
            .map(|t| t.join())
            .filter(|r| matches!(r, Ok(true)))
            .count();
        assert_eq!(closed, 50, "{what}: garbage connections left open");
    }

    // Everyone still works: the node's public port, its relay session and rendezvous,
    // both STUN services, every admin port.
    let rate = echo_rate(public, 9, 8 << 20);
    eprintln!("HOSTILE | garbage on every port | good node {rate:.0} MB/s afterwards");
    shim.wait_connected();
    let status = shim.status();
    assert_eq!(status["relays"][0]["state"], "connected", "{status}");
    for stun in [relay.stun.unwrap(), rendezvous.stun].map(loopback) {
        // A fresh socket: the garbage one may hold QUIC's answers to the garbage.
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let txid = [4u8; 12];
        udp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        udp.send_to(&ferry_rendezvous::stun::binding_request(&txid), stun)
            .unwrap();
        let mut buf = [0u8; 1500];
        let (n, _) = udp
            .recv_from(&mut buf)
            .expect("a STUN answer after the garbage");
        assert_eq!(
            ferry_rendezvous::stun::parse_binding_response(&buf[..n], &txid).unwrap(),
            udp.local_addr().unwrap()
        );
    }
    assert!(healthz(&relay));
    assert!(metrics_at(&rendezvous.admin).contains("ferry_rendezvous_"));
    assert!(metrics_at(&shim.admin).contains("ferry_shim_"));
    for (what, log) in [
        ("relay", relay.proc.log()),
        ("rendezvous", rendezvous.proc.log()),
        ("shim", shim.proc.log()),
    ] {
        assert!(!log.contains("panicked"), "the {what} panicked:\n{log}");
    }
}
