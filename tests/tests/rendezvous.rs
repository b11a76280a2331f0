//! The rendezvous's STUN service over real UDP, embedded in `ferry-relay` and standalone
//! in `ferry-rendezvous`: Binding requests learn their own address, anything else gets
//! no answer (or 420 where RFC 8489 asks for one) and never stops the service, metrics
//! count it all, `--no-rendezvous` turns it off, and config files set it.
//!
//! Public ports of this file: 22500-22549.

use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use ferry_rendezvous::stun;
use ferry_tests::node_session::NodeSession;
use ferry_tests::*;

fn get(url: &str) -> String {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    agent
        .get(url)
        .call()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .body_mut()
        .read_to_string()
        .unwrap_or_else(|e| panic!("GET {url} body: {e}"))
}

fn get_json(url: &str) -> serde_json::Value {
    serde_json::from_str(&get(url)).unwrap_or_else(|e| panic!("GET {url}: not JSON: {e}"))
}

/// Value of `ferry_rendezvous_stun_requests_total{outcome="..."}` in metrics text.
fn stun_count(metrics: &str, outcome: &str) -> u64 {
    let prefix = format!("ferry_rendezvous_stun_requests_total{{outcome=\"{outcome}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in metrics:\n{metrics}"))
}

fn client() -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind a client UDP socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("set read timeout");
    socket
}

/// The next datagram on `socket`, or `None` after its read timeout.
fn recv(socket: &UdpSocket) -> Option<Vec<u8>> {
    let mut buf = [0u8; 2048];
    let (n, _) = socket.recv_from(&mut buf).ok()?;
    Some(buf[..n].to_vec())
}

/// Sends `request` (retrying, since this is UDP) and returns the first reply that
/// belongs to its transaction; late answers to earlier transactions are skipped.
fn request(socket: &UdpSocket, server: SocketAddr, request: &[u8]) -> Vec<u8> {
    let txid = &request[8..20];
    for _ in 0..5 {
        socket
            .send_to(request, server)
            .expect("send a STUN request");
        while let Some(reply) = recv(socket) {
            if reply.get(8..20) == Some(txid) {
                return reply;
            }
        }
    }
    panic!("no reply from {server} after 5 tries");
}

/// The reflexive address `server` reports for `socket`.
fn binding(socket: &UdpSocket, server: SocketAddr, txid: [u8; 12]) -> SocketAddr {
    let reply = request(socket, server, &stun::binding_request(&txid));
    stun::parse_binding_response(&reply, &txid)
        .unwrap_or_else(|e| panic!("bad Binding response from {server}: {e}"))
}

/// A Binding request carrying PRIORITY (0x0024, an ICE attribute this server does not
/// understand): comprehension-required, so RFC 8489 §7.3.1 asks for a 420 reply.
fn binding_with_unknown_attribute(txid: [u8; 12]) -> Vec<u8> {
    let mut m = vec![0x00, 0x01, 0x00, 0x08];
    m.extend_from_slice(&stun::MAGIC_COOKIE.to_be_bytes());
    m.extend_from_slice(&txid);
    m.extend_from_slice(&[0x00, 0x24, 0x00, 0x04, 0, 0, 0, 1]);
    m
}

/// Drives one STUN server through the contract; `metrics` reads its /metrics text.
fn check_stun_service(server: SocketAddr, metrics: impl Fn() -> String) {
    let socket = client();
    let me = socket.local_addr().unwrap();
    assert_eq!(binding(&socket, server, [1; 12]), me, "reflexive address");

    // Garbage, a Binding response and a Binding indication: no answer at all.
    let response = stun::handle(&stun::binding_request(&[2; 12]), me).unwrap();
    let mut indication = stun::binding_request(&[3; 12]);
    indication[1] = 0x11;
    let nonsense: Vec<Vec<u8>> = vec![
        b"hello".to_vec(),
        vec![0xff; 20],
        pattern(7, 700),
        Vec::new(),
        response,
        indication,
    ];
    for packet in &nonsense {
        socket.send_to(packet, server).unwrap();
    }
    // Every reply from now on must belong to a request; the service keeps answering.
    assert_eq!(binding(&socket, server, [4; 12]), me, "still answering");
    while let Some(extra) = recv(&socket) {
        // Only a duplicate answer to a retried request may still arrive.
        let duplicate = [[1; 12], [4; 12]]
            .iter()
            .any(|txid| stun::parse_binding_response(&extra, txid).is_ok());
        assert!(
            duplicate,
            "the service answered a datagram that was not a Binding request: {extra:?}"
        );
    }

    // An unknown comprehension-required attribute gets 420 listing it.
    let reply = request(&socket, server, &binding_with_unknown_attribute([5; 12]));
    let msg = stun::parse(&reply).expect("the 420 reply is STUN");
    assert_eq!(msg.msg_type, 0x0111, "Binding error response");
    assert_eq!(msg.transaction_id, [5; 12]);
    let code = msg.attributes.iter().find(|(k, _)| *k == 0x0009).unwrap().1;
    assert_eq!(&code[2..4], &[4, 20], "error code 420");
    let unknown = msg.attributes.iter().find(|(k, _)| *k == 0x000A).unwrap().1;
    assert_eq!(unknown, &[0x00, 0x24]);

    // The counters saw it all (the workers may still be counting the garbage).
    wait_for("STUN counters", Duration::from_secs(5), || {
        let text = metrics();
        (stun_count(&text, "answered") >= 2
            && stun_count(&text, "dropped") >= nonsense.len() as u64
            && stun_count(&text, "error_reply") >= 1)
            .then_some(())
    });
    assert_eq!(stun_count(&metrics(), "send_failed"), 0);
}

#[test]
fn the_relay_answers_stun_and_shows_it_in_info_and_metrics() {
    let dir = TempDir::new("stun-relay");
    let relay = Relay::start(dir.path(), "22500-22504");
    let stun = relay
        .stun
        .expect("the embedded rendezvous is on by default");
    assert_eq!(stun.ip().to_string(), "127.0.0.1");
    assert!(relay.proc.ready_line.ends_with(&format!(" stun={stun}")));
    let info = get_json(&format!("{}/api/info", relay.admin));
    assert_eq!(info["rendezvous"], true);
    assert_eq!(info["stun"], stun.to_string());
    check_stun_service(stun, || relay.metrics());
    // The relay's own metrics are on the same page.
    assert!(relay.metrics().contains("ferry_relay_nodes_connected"));
}

#[test]
fn no_rendezvous_means_no_stun_port() {
    let dir = TempDir::new("stun-off");
    let relay = Relay::start_args(dir.path(), "22505-22509", &["--no-rendezvous"]);
    assert!(
        relay.proc.ready_line.ends_with(" stun=off"),
        "{}",
        relay.proc.ready_line
    );
    assert_eq!(relay.stun, None);
    let info = get_json(&format!("{}/api/info", relay.admin));
    assert_eq!(info["rendezvous"], false);
    assert!(info["stun"].is_null(), "{info}");
    assert!(!relay.metrics().contains("ferry_rendezvous_stun"));
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("an ephemeral UDP port")
        .port()
}

/// Starts a relay whose settings come from `config` (plus per-test paths and ports);
/// its log if it did not become ready.
fn relay_with_config(dir: &std::path::Path, config: &str, ports: &str) -> Result<Proc, String> {
    let path = dir.join("relay.toml");
    std::fs::write(&path, config).unwrap();
    let data = dir.join("relay");
    let args: Vec<String> = [
        "--config",
        path.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--ports",
        ports,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let log = dir.join(format!("relay-{ports}.log"));
    Proc::start_env(&bin("ferry-relay"), &args, log.clone(), &[])
        .ok_or_else(|| std::fs::read_to_string(log).unwrap_or_default())
}

#[test]
fn the_relay_config_file_sets_stun_and_rejects_unknown_keys() {
    let dir = TempDir::new("stun-config");
    let port = free_udp_port();
    let relay = relay_with_config(
        dir.path(),
        &format!("stun = \"127.0.0.1:{port}\"\n"),
        "22510-22514",
    )
    .unwrap_or_else(|log| panic!("relay with stun in its config did not start:\n{log}"));
    let ready = &relay.ready_line;
    assert!(
        ready.ends_with(&format!(" stun=127.0.0.1:{port}")),
        "{ready}"
    );
    let socket = client();
    let server: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert_eq!(
        binding(&socket, server, [9; 12]),
        socket.local_addr().unwrap()
    );
    drop(relay);

    let relay = relay_with_config(dir.path(), "rendezvous = false\n", "22515-22519")
        .unwrap_or_else(|log| panic!("relay with rendezvous = false did not start:\n{log}"));
    assert!(
        relay.ready_line.ends_with(" stun=off"),
        "{}",
        relay.ready_line
    );

    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "stun_addr = \"127.0.0.1:1\"\n").unwrap();
    let out = Command::new(bin("ferry-relay"))
        .args(["--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("unknown field") && err.contains("stun_addr"),
        "{err}"
    );
}

#[test]
fn a_busy_stun_port_stops_the_relay_and_names_the_flags() {
    let dir = TempDir::new("stun-busy");
    let busy = UdpSocket::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    let data = dir.path().join("relay");
    let out = Command::new(bin("ferry-relay"))
        .args([
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--ports",
            "22520-22524",
            "--stun",
            &busy_addr,
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the relay started on a busy STUN port"
    );
    assert!(err.contains(&busy_addr), "{err}");
    assert!(
        err.contains("--stun") && err.contains("--no-rendezvous"),
        "{err}"
    );
}

#[test]
fn help_explains_the_rendezvous_flags() {
    let out = Command::new(bin("ferry-relay"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("--stun <ADDR>") && help.contains("[::]:3478"),
        "{help}"
    );
    assert!(help.contains("--no-rendezvous"), "{help}");
    let out = Command::new(bin("ferry-rendezvous"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--data-dir",
        "--stun",
        "--listen",
        "--admin",
        "--admin-token-file",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help:\n{help}");
    }
    assert!(help.contains("hole punches"), "{help}");
}

#[test]
fn the_standalone_rendezvous_answers_stun_and_stops_cleanly() {
    let dir = TempDir::new("stun-standalone");
    let mut rdv = Rendezvous::start(dir.path(), &["--stun", "127.0.0.1:0"]);
    assert_eq!(rdv.node_id.len(), 52);
    let key = dir.path().join("rendezvous/rendezvous.key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600,
        "rendezvous.key must be private"
    );
    let info = get_json(&format!("{}/api/info", rdv.admin));
    assert_eq!(info["node_id"], rdv.node_id.as_str());
    assert_eq!(info["stun"], rdv.stun.to_string());
    assert_eq!(get(&format!("{}/healthz", rdv.admin)), "ok\n");
    assert_eq!(get(&format!("{}/readyz", rdv.admin)), "ready\n");
    let admin = rdv.admin.clone();
    check_stun_service(rdv.stun, || get(&format!("{admin}/metrics")));

    // SIGTERM: exits 0 and releases the STUN port.
    // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
    unsafe {
        libc::kill(rdv.proc.pid() as libc::pid_t, libc::SIGTERM);
    }
    let status = rdv.proc.child.wait().unwrap();
    assert!(status.success(), "exit after SIGTERM: {status}");
    UdpSocket::bind(rdv.stun).expect("the STUN port is free after the stop");

    // Same key, same node ID, after a restart.
    let again = Rendezvous::start(dir.path(), &["--stun", "127.0.0.1:0"]);
    assert_eq!(again.node_id, rdv.node_id);
}

#[test]
fn the_standalone_rendezvous_config_file_and_admin_rules() {
    let dir = TempDir::new("stun-standalone-config");
    let port = free_udp_port();
    let path = dir.path().join("rendezvous.toml");
    std::fs::write(
        &path,
        format!("stun = \"127.0.0.1:{port}\"\nlisten = \"127.0.0.1:0\"\n"),
    )
    .unwrap();
    let config = ["--config", path.to_str().unwrap()];
    // The file's address is used...
    let rdv = Rendezvous::start(dir.path(), &config);
    assert_eq!(rdv.stun, format!("127.0.0.1:{port}").parse().unwrap());
    let socket = client();
    assert_eq!(
        binding(&socket, rdv.stun, [6; 12]),
        socket.local_addr().unwrap()
    );
    drop(rdv);
    // ...unless a flag overrides it.
    let rdv = Rendezvous::start(dir.path(), &[config[0], config[1], "--stun", "127.0.0.1:0"]);
    assert_ne!(rdv.stun.port(), port);
    drop(rdv);

    let run = |args: &[&str]| {
        let out = Command::new(bin("ferry-rendezvous"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    std::fs::write(&path, "stun = \"127.0.0.1:0\"\nadmn = \"127.0.0.1:0\"\n").unwrap();
    let (ok, err) = run(&["--config", path.to_str().unwrap()]);
    assert!(!ok && err.contains("admn"), "{err}");
    let missing = dir.path().join("nope.toml");
    let (ok, err) = run(&["--config", missing.to_str().unwrap()]);
    assert!(!ok && err.contains("does not exist"), "{err}");
    let data = dir.path().join("rendezvous");
    let (ok, err) = run(&[
        "--data-dir",
        data.to_str().unwrap(),
        "--stun",
        "127.0.0.1:0",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "0.0.0.0:0",
    ]);
    assert!(!ok && err.contains("needs a token"), "{err}");
}

/// Records travel over a node's authenticated session: the rendezvous stores only a
/// node's own, correctly signed, newer record, and what a lookup returns verifies
/// against the node ID. Run against the relay's embedded rendezvous and the standalone
/// one, which answer the same way.
async fn check_records(url: &str, addr: SocketAddr) {
    use ferry_proto::frame::Control;
    let (mut a, reg) = NodeSession::open(url, addr).await;
    match reg {
        Control::Registered {
            rendezvous: true,
            stun_port: Some(_),
            ..
        } => {}
        other => panic!("expected a registration with a rendezvous: {other:?}"),
    }
    let (mut b, _) = NodeSession::open(url, addr).await;
    let a_id = a.key.node_id();

    let good = a.record(5, "198.51.100.7:4000");
    a.send(Control::Publish {
        record: Box::new(good.clone()),
    })
    .await;
    assert_eq!(
        a.next().await,
        Control::Published {
            seq: 5,
            error: None
        }
    );

    // An older record is refused: a delayed copy cannot overwrite a fresh one.
    let older = a.record(4, "198.51.100.7:1");
    a.send(Control::Publish {
        record: Box::new(older),
    })
    .await;
    let Control::Published { error: Some(e), .. } = a.next().await else {
        panic!("a stale record was accepted")
    };
    assert!(e.contains("not newer"), "{e}");

    // A record altered after signing is refused.
    let mut altered = a.record(6, "198.51.100.7:4000");
    altered.record.addrs = vec!["192.0.2.66:6666".parse().unwrap()];
    a.send(Control::Publish {
        record: Box::new(altered),
    })
    .await;
    let Control::Published { error: Some(e), .. } = a.next().await else {
        panic!("an altered record was accepted")
    };
    assert!(e.contains("does not verify"), "{e}");

    // B may not publish A's record, not even a genuine one.
    b.send(Control::Publish {
        record: Box::new(a.record(7, "198.51.100.7:4000")),
    })
    .await;
    let Control::Published { error: Some(e), .. } = b.next().await else {
        panic!("a record of another node was accepted")
    };
    assert!(e.contains("may only publish its own"), "{e}");

    // B looks A up and gets exactly the record A signed, which verifies.
    b.send(Control::Lookup { node_id: a_id }).await;
    let Control::Found {
        node_id,
        record: Some(found),
    } = b.next().await
    else {
        panic!("no record for A")
    };
    assert_eq!(node_id, a_id);
    assert_eq!(*found, good);
    found.verify(std::time::SystemTime::now()).unwrap();

    // Nobody's record: an empty answer.
    let stranger = ferry_proto::SecretKey::generate().node_id();
    b.send(Control::Lookup { node_id: stranger }).await;
    assert_eq!(
        b.next().await,
        Control::Found {
            node_id: stranger,
            record: None
        }
    );

    // A punch request to a node that is not connected says so.
    b.send(Control::Punch { peer: stranger }).await;
    let Control::PunchFailed { reason, .. } = b.next().await else {
        panic!("expected PunchFailed")
    };
    assert!(reason.contains("not connected"), "{reason}");
    a.link.close("done");
    b.link.close("done");
}

#[test]
fn signed_records_are_checked_on_publish_and_verify_on_lookup() {
    let dir = TempDir::new("records");
    let relay = Relay::start(dir.path(), "22540-22549");
    let rdv = Rendezvous::start(dir.path(), &["--stun", "127.0.0.1:0"]);
    let listen: SocketAddr = rdv.proc.ready_field("listen").parse().unwrap();
    let rdv_url = rdv.url.clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        check_records(&relay.url, relay.listen_addr()).await;
        check_records(&rdv_url, listen).await;
    });
    let info = get_json(&format!("{}/api/info", rdv.admin));
    assert_eq!(info["listen"], listen.to_string());
    assert!(info["fleet"].is_null(), "no fleet without --fleet: {info}");

    // In a fleet whose engine cannot be reached (nothing listens there), the
    // rendezvous starts all the same, says so, and keeps records as it would alone.
    let cut_off_dir = dir.path().join("cut-off");
    std::fs::create_dir_all(&cut_off_dir).unwrap();
    let cut_off = Rendezvous::start(
        &cut_off_dir,
        &[
            "--stun",
            "127.0.0.1:0",
            "--fleet",
            "nats://127.0.0.1:1",
            "--fleet-name",
            "lost",
        ],
    );
    let listen: SocketAddr = cut_off.proc.ready_field("listen").parse().unwrap();
    rt.block_on(check_records(&cut_off.url, listen));
    let info = get_json(&format!("{}/api/info", cut_off.admin));
    assert_eq!(info["fleet"]["name"], "lost", "{info}");
    assert_eq!(info["fleet"]["up"], false, "{info}");
    let metrics = get(&format!("{}/metrics", cut_off.admin));
    assert!(metrics.contains("ferry_rendezvous_fleet_up 0"), "{metrics}");
}

/// A rendezvous listening dual-stack (`[::]`, its default) receives IPv4 nodes as
/// IPv4-mapped addresses. It must tell them, and the peers it coordinates punches
/// with, the plain IPv4 address, as the relay does: a node told `::ffff:a.b.c.d` takes
/// itself for a host with public IPv6.
#[test]
fn a_dual_stack_rendezvous_reports_ipv4_nodes_as_ipv4() {
    use ferry_proto::frame::Control;
    let dir = TempDir::new("mapped");
    let rdv = Rendezvous::start(dir.path(), &["--stun", "127.0.0.1:0", "--listen", "[::]:0"]);
    let listen: SocketAddr = rdv.proc.ready_field("listen").parse().unwrap();
    assert!(listen.is_ipv6(), "{listen}");
    let over_ipv4 = SocketAddr::from(([127, 0, 0, 1], listen.port()));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (mut a, reg_a) = NodeSession::open(&rdv.url, over_ipv4).await;
        let (mut b, reg_b) = NodeSession::open(&rdv.url, over_ipv4).await;
        let observed = |reg: Control| match reg {
            Control::Registered { observed_addr, .. } => observed_addr,
            other => panic!("expected Registered: {other:?}"),
        };
        let (seen_a, seen_b) = (observed(reg_a), observed(reg_b));
        for seen in [seen_a, seen_b] {
            assert_eq!(seen.ip(), std::net::Ipv4Addr::LOCALHOST, "{seen}");
        }
        for (node, seq) in [(&mut a, 1), (&mut b, 1)] {
            let record = node.record(seq, "198.51.100.7:4000");
            node.send(Control::Publish {
                record: Box::new(record),
            })
            .await;
            assert!(matches!(
                node.next().await,
                Control::Published { error: None, .. }
            ));
        }
        b.send(Control::Punch {
            peer: a.key.node_id(),
        })
        .await;
        for (node, peer_seen) in [(&mut b, seen_a), (&mut a, seen_b)] {
            match node.next().await {
                Control::PunchStart { observed_addr, .. } => {
                    assert_eq!(observed_addr, Some(peer_seen))
                }
                other => panic!("expected PunchStart: {other:?}"),
            }
        }
    });
}

/// A second session with the same node key replaces the first, and the first is told
/// why (`error {replaced}`) before its link closes, as on a relay: a shim told this
/// stops instead of fighting the other process for the key.
#[test]
fn a_replaced_session_on_the_standalone_rendezvous_is_told_why() {
    use ferry_proto::SecretKey;
    use ferry_proto::frame::{Control, ErrorCode};
    let dir = TempDir::new("rdv-replaced");
    let rdv = Rendezvous::start(
        dir.path(),
        &["--stun", "127.0.0.1:0", "--listen", "127.0.0.1:0"],
    );
    let listen: SocketAddr = rdv.proc.ready_field("listen").parse().unwrap();
    let register = || Control::Register {
        services: vec![],
        certificate: None,
        upgrade: false,
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let key = SecretKey::generate();
        let (mut old, first) =
            NodeSession::open_with(&rdv.url, listen, key.clone(), register()).await;
        assert!(
            matches!(first, Some(Control::Registered { .. })),
            "{first:?}"
        );
        let (_new, second) = NodeSession::open_with(&rdv.url, listen, key, register()).await;
        assert!(
            matches!(second, Some(Control::Registered { .. })),
            "{second:?}"
        );
        match old.try_next().await {
            Some(Control::Error { code, message }) => {
                assert_eq!(code, ErrorCode::Replaced);
                assert!(message.contains("rendezvous"), "{message}");
            }
            other => panic!("the replaced session was not told why: {other:?}"),
        }
    });
}
