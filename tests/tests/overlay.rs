//! Node-to-node traffic through the relay (`ferry-shim connect`): bit-identical bulk
//! transfers, end-to-end encryption the relay cannot read, the exposing side's allow
//! list, and key pinning of the relay.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ferry_relay::server::{PacketTap, RelayOptions};
use ferry_tests::*;

const MIB: usize = 1 << 20;

fn init_id(dir: &std::path::Path, name: &str) -> String {
    let out = Command::new(bin("ferry-shim"))
        .args(["init", "--data-dir"])
        .arg(dir.join(name))
        .output()
        .expect("run ferry-shim init");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A relay running inside the test process, so the test can watch every overlay
/// packet it forwards.
struct TappedRelay {
    _rt: tokio::runtime::Runtime,
    url: String,
    admin: String,
    bytes_seen: Arc<AtomicU64>,
    marker_seen: Arc<AtomicBool>,
}

const MARKER: &[u8] = b"FERRY-END-TO-END-PLAINTEXT-MARKER";

fn tapped_relay(dir: &std::path::Path, ports: std::ops::RangeInclusive<u16>) -> TappedRelay {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let bytes_seen = Arc::new(AtomicU64::new(0));
    let marker_seen = Arc::new(AtomicBool::new(false));
    let (b, m) = (bytes_seen.clone(), marker_seen.clone());
    let opts = RelayOptions {
        data_dir: dir.join("relay"),
        listen: "127.0.0.1:0".parse().unwrap(),
        public_host: Some("127.0.0.1".into()),
        ports,
        admin: "127.0.0.1:0".parse().unwrap(),
        admin_token: None,
        max_public_ports_per_node: 8,
        stun: None,
        policy: ferry_relay::policy::Mode::Open,
        policy_file: dir.join("relay/policy.toml"),
        membership_lifetime: std::time::Duration::from_secs(3600),
        drain_timeout: std::time::Duration::from_secs(1),
        limits: ferry_relay::server::Limits {
            max_nodes: 100,
            max_streams_per_node: 100,
            node_bytes_per_sec: 0,
            handshakes_per_ip_per_sec: 1000.0,
            connections_per_ip_per_sec: 1000.0,
        },
        fleet: None,
        packet_tap: Some(PacketTap(Arc::new(move |_from, _to, data: &[u8]| {
            b.fetch_add(data.len() as u64, Ordering::Relaxed);
            if data.windows(MARKER.len()).any(|w| w == MARKER) {
                m.store(true, Ordering::Relaxed);
            }
        }))),
    };
    let relay = rt.block_on(ferry_relay::server::start(opts)).unwrap();
    let url = relay.url().to_string();
    let admin = format!("http://{}", relay.admin_addr);
    rt.spawn(relay.run_until_shutdown());
    TappedRelay {
        _rt: rt,
        url,
        admin,
        bytes_seen,
        marker_seen,
    }
}

#[test]
fn overlay_carries_256_mib_each_way_and_the_relay_sees_only_ciphertext() {
    let dir = TempDir::new("overlay-bulk");
    let relay = tapped_relay(dir.path(), 22100..=22109);
    let client_id = init_id(dir.path(), "client");
    let server = Shim::expose_echo(dir.path(), "server", &relay.url, &["--allow", &client_id]);
    server.wait_connected();
    let destination = format!("{}/echo", server.node_id);
    let client = Shim::connect(dir.path(), "client", &destination, &relay.url);
    assert_eq!(client.node_id, client_id);
    let forward = client.forward_addr();

    // Plaintext check first: a payload full of a marker string crosses the relay.
    let marked: Vec<u8> = MARKER.iter().copied().cycle().take(MIB).collect();
    let back = echo_once(forward, &marked).expect("marker transfer");
    assert!(back == marked, "marker payload altered");
    assert!(
        relay.bytes_seen.load(Ordering::Relaxed) >= 2 * MIB as u64,
        "the tap must have seen the packets carrying the payload"
    );
    assert!(
        !relay.marker_seen.load(Ordering::Relaxed),
        "the relay saw end-to-end plaintext"
    );

    let (sent, received, n) = echo_transfer(forward, 2, 256 * MIB);
    assert_eq!(n, 256 * MIB);
    assert_eq!(sent, received, "bytes through the overlay differ");
    assert!(!relay.marker_seen.load(Ordering::Relaxed));

    // The packets crossed the relay on its channel (plain UDP, forwarded without
    // decryption), not inside the links' QUIC: 512 MiB crossed the relay (256 MiB each
    // way), at least ~390,000 packets of at most 1,380 bytes; the first few may ride
    // the links before the channels are set up.
    let forwarded = |carrier: &str| {
        metric_at(
            &relay.admin,
            &format!("ferry_relay_overlay_packets_forwarded_total{{carrier=\"{carrier}\"}}"),
        )
    };
    let (channel, datagrams, frames) = (
        forwarded("channel"),
        forwarded("datagram"),
        forwarded("stream"),
    );
    assert!(
        channel >= 380_000.0 && datagrams + frames < channel / 100.0,
        "channel {channel}, link datagrams {datagrams}, stream frames {frames}"
    );

    let status = client.status();
    let peer = &status["peers"][0];
    assert_eq!(peer["node_id"], server.node_id.as_str(), "{status}");
    assert_eq!(peer["path"], "relayed");
    assert!(peer["bytes_sent"].as_u64().unwrap() >= 256 * MIB as u64);
    assert!(peer["remote_addr"].as_str().is_some());
}

#[test]
fn overlay_works_when_the_connecting_node_only_has_tcp() {
    let dir = TempDir::new("overlay-tcp");
    let relay = Relay::start(dir.path(), "22110-22119");
    let server = Shim::expose_echo(dir.path(), "server", &relay.url, &["--allow-any"]);
    server.wait_connected();
    let proxy = tcp_only_proxy(relay.listen_addr());
    let url = url_with_port(&relay.url, proxy.port());
    let client = Shim::connect(dir.path(), "client", &server.node_id, &url);
    assert_eq!(client.status()["relays"][0]["transport"], "tcp");
    let (sent, received, n) = echo_transfer(client.forward_addr(), 3, 32 * MIB);
    assert_eq!(n, 32 * MIB);
    assert_eq!(sent, received);
}

#[test]
fn with_no_relay_channel_relayed_packets_stay_inside_the_links() {
    let dir = TempDir::new("overlay-no-channel");
    // No rendezvous, so no hole punching: everything is relayed.
    let relay = Relay::start_args(dir.path(), "22150-22159", &["--no-rendezvous"]);
    let server = Shim::expose_echo(
        dir.path(),
        "server",
        &relay.url,
        &["--allow-any", "--no-relay-channel"],
    );
    server.wait_connected();
    let client = Shim::connect_with(
        dir.path(),
        "client",
        &server.node_id,
        &relay.url,
        &["--no-relay-channel"],
    );
    let (sent, received, n) = echo_transfer(client.forward_addr(), 2, 8 * MIB);
    assert_eq!(n, 8 * MIB);
    assert_eq!(sent, received);
    let forwarded = |carrier: &str| {
        relay.metric(&format!(
            "ferry_relay_overlay_packets_forwarded_total{{carrier=\"{carrier}\"}}"
        ))
    };
    assert_eq!(forwarded("channel"), 0.0);
    assert!(forwarded("datagram") >= 10_000.0, "{}", relay.metrics());
}

#[test]
fn an_unlisted_node_is_refused_and_told_why() {
    let dir = TempDir::new("overlay-deny");
    let relay = Relay::start(dir.path(), "22120-22129");
    let server = Shim::expose_echo(dir.path(), "server", &relay.url, &[]);
    server.wait_connected();
    let client = Shim::connect(dir.path(), "client", &server.node_id, &relay.url);
    let back = echo_once(client.forward_addr(), b"let me in").unwrap_or_default();
    assert!(back.is_empty(), "a refused node must get nothing back");
    let expected = format!("node {} is not allowed to connect", client.node_id);
    wait_for(
        "the refusal in the client's log",
        Duration::from_secs(10),
        || client.proc.log().contains(&expected).then_some(()),
    );
    assert!(
        client
            .proc
            .log()
            .contains(&format!("--allow {}", client.node_id))
    );
    assert!(server.proc.log().contains("refused overlay connection"));
    assert!(client.status()["peers"].as_array().unwrap().is_empty());
}

#[test]
fn asking_for_a_service_the_node_does_not_have_is_refused() {
    let dir = TempDir::new("overlay-nosvc");
    let relay = Relay::start(dir.path(), "22130-22139");
    let server = Shim::expose_echo(dir.path(), "server", &relay.url, &["--allow-any"]);
    server.wait_connected();
    let destination = format!("{}/nosuch", server.node_id);
    let client = Shim::connect(dir.path(), "client", &destination, &relay.url);
    let back = echo_once(client.forward_addr(), b"hello").unwrap_or_default();
    assert!(back.is_empty());
    wait_for(
        "the refusal in the client's log",
        Duration::from_secs(10),
        || {
            client
                .proc
                .log()
                .contains("has no service \"nosuch\"")
                .then_some(())
        },
    );
}

#[test]
fn a_relay_with_the_wrong_key_is_refused() {
    let dir = TempDir::new("wrong-key");
    let relay = Relay::start(dir.path(), "22140-22149");
    // Same address, but the URL pins some other node's key.
    let other = init_id(dir.path(), "other");
    let (_, host_port) = relay.url.rsplit_once('@').unwrap();
    let url = format!("ferry://{other}@{host_port}");
    let shim = Shim::expose_echo(dir.path(), "home", &url, &["--public"]);
    let relay_id = relay.url["ferry://".len()..]
        .split('@')
        .next()
        .unwrap()
        .to_string();
    wait_for(
        "the key mismatch in the log",
        Duration::from_secs(20),
        || {
            let log = shim.proc.log();
            (log.contains(&format!("relay presented key {relay_id}")) && log.contains("relay URL"))
                .then_some(())
        },
    );
    let status = shim.status();
    assert_ne!(status["relays"][0]["state"], "connected", "{status}");
    assert!(
        status["relays"][0]["error"]
            .as_str()
            .unwrap()
            .contains("presented key")
    );
    assert!(status["services"][0]["public"].is_null());
    assert!(relay.nodes().as_array().unwrap().is_empty());
}
