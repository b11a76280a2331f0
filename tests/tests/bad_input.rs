//! Hostile and broken input against a real relay: each gets a clear error and a closed
//! connection, and a well-behaved node keeps being served throughout.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use ferry_proto::frame::{Control, ErrorCode, Frame, FrameCodec, ServiceRequest};
use ferry_proto::link::{self, Link};
use ferry_proto::tls::{self, ALPN_RELAY};
use ferry_proto::{NodeId, SecretKey};
use futures::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio_util::codec::{FramedRead, FramedWrite};

use ferry_tests::*;

async fn quic_link(relay: &Relay) -> Link {
    let key = SecretKey::generate();
    let cfg = tls::client_config(&key, relay.relay_id(), ALPN_RELAY, "relay").unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    link::connect_quic(&endpoint, relay.listen_addr(), cfg, ALPN_RELAY)
        .await
        .unwrap()
}

/// Sends `bytes` as the start of a session stream and returns the relay's answer.
async fn answer_to_raw(relay: &Relay, bytes: &[u8]) -> Option<Frame> {
    let link = quic_link(relay).await;
    let mut stream = link.open().await.unwrap();
    stream.send.write_all(bytes).await.unwrap();
    stream.send.flush().await.unwrap();
    let mut reader = FramedRead::new(stream.recv, FrameCodec);
    let answer = tokio::time::timeout(Duration::from_secs(10), reader.next())
        .await
        .expect("the relay must answer, not hang");
    // After a fatal error the relay closes the link.
    tokio::time::timeout(Duration::from_secs(10), link.closed())
        .await
        .expect("the relay must close the link after a protocol error");
    answer.and_then(|f| f.ok())
}

fn assert_protocol_error(answer: Option<Frame>, needle: &str) {
    match answer {
        Some(Frame::Control(Control::Error {
            code: ErrorCode::Protocol,
            message,
        })) => assert!(message.contains(needle), "{message:?} lacks {needle:?}"),
        other => panic!("expected a protocol error mentioning {needle:?}, got {other:?}"),
    }
}

fn healthy_node(dir: &std::path::Path, relay: &Relay) -> (Shim, SocketAddr) {
    let shim = Shim::expose_echo(dir, "good", &relay.url, &["--public"]);
    let public = shim.public_addr("echo");
    (shim, public)
}

#[test]
fn garbage_and_broken_frames_get_clear_errors_and_others_keep_working() {
    let dir = TempDir::new("bad-input");
    let relay = Relay::start_args(
        dir.path(),
        "22300-22309",
        &["--max-public-ports-per-node", "1"],
    );
    let (_good, public) = healthy_node(dir.path(), &relay);
    let rt = tokio::runtime::Runtime::new().unwrap();

    // Random bytes where TLS is expected, and random UDP datagrams: dropped, closed.
    let mut tcp = TcpStream::connect(relay.listen_addr()).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(&pattern(9, 4096)).unwrap();
    let mut buf = [0u8; 4096];
    let closed = matches!(tcp.read(&mut buf), Ok(0) | Err(_))
        || matches!(tcp.read(&mut buf), Ok(0) | Err(_));
    assert!(
        closed,
        "garbage on the TLS port must end in a closed connection"
    );
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..200 {
        udp.send_to(
            &pattern(i, 1 + (i as usize * 37) % 1400),
            relay.listen_addr(),
        )
        .unwrap();
    }

    rt.block_on(async {
        // Unknown frame type.
        assert_protocol_error(
            answer_to_raw(&relay, &[0x7f, 0, 0, 0, 1, 0]).await,
            "unknown frame type 0x7f",
        );
        // A frame claiming 4 GiB is refused from its header alone.
        assert_protocol_error(
            answer_to_raw(&relay, &[0x01, 0xff, 0xff, 0xff, 0xff]).await,
            "exceeds the limit",
        );
        // A well-framed but unknown control message.
        let body = br#"{"type":"launch_missiles"}"#;
        let mut frame = BytesMut::new();
        frame.put_u8(0x01);
        frame.put_u32(body.len() as u32);
        frame.put_slice(body);
        assert_protocol_error(
            answer_to_raw(&relay, &frame).await,
            "malformed control message",
        );
        // A relay-only message sent by a node.
        let mut framed = BytesMut::new();
        tokio_util::codec::Encoder::encode(
            &mut FrameCodec,
            Frame::Control(Control::Pong { nonce: 1 }),
            &mut framed,
        )
        .unwrap();
        tokio_util::codec::Encoder::encode(
            &mut FrameCodec,
            Frame::Control(Control::Registered {
                node_id: SecretKey::generate().node_id(),
                observed_addr: "127.0.0.1:1".parse().unwrap(),
                services: vec![],
                rendezvous: false,
                stun_port: None,
                channel: None,
                fleet: None,
            }),
            &mut framed,
        )
        .unwrap();
        assert_protocol_error(
            answer_to_raw(&relay, &framed).await,
            "must be register or join",
        );
    });

    // Wrong ALPN: the TLS handshake fails.
    rt.block_on(async {
        let key = SecretKey::generate();
        let mut cfg = tls::client_config(&key, relay.relay_id(), ALPN_RELAY, "relay").unwrap();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = tokio::net::TcpStream::connect(relay.listen_addr())
            .await
            .unwrap();
        let name = rustls::pki_types::ServerName::try_from(tls::SERVER_NAME).unwrap();
        let err = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .expect_err("a wrong ALPN must fail the handshake");
        assert!(err.to_string().contains("NoApplicationProtocol"), "{err}");
    });

    // Asking for more public ports than allowed, and an invalid service name: each
    // service gets its own clear refusal, the session stays up.
    rt.block_on(async {
        let link = quic_link(&relay).await;
        let stream = link.open().await.unwrap();
        let mut writer = FramedWrite::new(stream.send, FrameCodec);
        let mut reader = FramedRead::new(stream.recv, FrameCodec);
        let services = ["one", "two", "Bad Name"]
            .iter()
            .map(|n| ServiceRequest {
                name: n.to_string(),
                public: true,
            })
            .collect();
        writer
            .send(Frame::Control(Control::Register {
                services,
                certificate: None,
                upgrade: false,
            }))
            .await
            .unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(10), reader.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let Frame::Control(Control::Registered { services, .. }) = reply else {
            panic!("expected Registered, got {reply:?}");
        };
        assert!(services[0].public_port.is_some() && services[0].error.is_none());
        assert!(services[1].public_port.is_none());
        assert!(
            services[1]
                .error
                .as_deref()
                .unwrap()
                .contains("max_public_ports_per_node"),
            "{:?}",
            services[1]
        );
        assert!(
            services[2]
                .error
                .as_deref()
                .unwrap()
                .contains("invalid service name")
        );
        writer
            .send(Frame::Control(Control::Ping { nonce: 42 }))
            .await
            .unwrap();
        let pong = reader.next().await.unwrap().unwrap();
        assert_eq!(pong, Frame::Control(Control::Pong { nonce: 42 }));

        // An overlay datagram for a node that is not connected is dropped and counted;
        // the session stays up.
        let stranger = SecretKey::generate().node_id();
        link.send_datagram(ferry_proto::frame::encode_datagram(&stranger, b"to nobody"))
            .expect("the link takes a small datagram");
        writer
            .send(Frame::Control(Control::Ping { nonce: 43 }))
            .await
            .unwrap();
        let pong = reader.next().await.unwrap().unwrap();
        assert_eq!(pong, Frame::Control(Control::Pong { nonce: 43 }));
        // A datagram that is not an overlay packet is a protocol error: told, closed.
        link.send_datagram(bytes::Bytes::from_static(&[0x7f, 1, 2, 3]))
            .expect("the link takes a small datagram");
        let answer = tokio::time::timeout(Duration::from_secs(10), reader.next())
            .await
            .expect("the relay must answer a malformed datagram");
        assert_protocol_error(answer.and_then(|f| f.ok()), "unknown frame type 0x7f");
        tokio::time::timeout(Duration::from_secs(10), link.closed())
            .await
            .expect("the relay must close the link after a malformed datagram");
    });

    // Through all of it the well-behaved node was served.
    let (sent, received, n) = echo_transfer(public, 5, 8 << 20);
    assert_eq!(n, 8 << 20);
    assert_eq!(sent, received);
    let metrics = relay.metrics();
    assert!(
        metrics.contains("ferry_relay_session_errors_total{kind=\"protocol\"} 5"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "ferry_relay_overlay_packets_dropped_total{reason=\"unknown_destination\"} 1"
        ),
        "{metrics}"
    );
}

#[test]
fn a_node_that_opens_no_session_stream_is_closed() {
    let dir = TempDir::new("no-session");
    let relay = Relay::start(dir.path(), "22310-22319");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let link = quic_link(&relay).await;
        let closed = tokio::time::timeout(Duration::from_secs(20), link.closed()).await;
        assert!(
            closed.is_ok(),
            "a silent node must be closed after the session-open timeout"
        );
    });
    assert!(relay.nodes().as_array().unwrap().is_empty());
}

/// A node's relay link over QUIC on a socket the test can also send plain UDP from
/// (its clone), and its session stream, registered.
struct ChannelNode {
    link: Link,
    socket: UdpSocket,
    token: ferry_proto::channel::ChannelToken,
    node: NodeId,
    reader: FramedRead<link::BoxRead, FrameCodec>,
    writer: FramedWrite<link::BoxWrite, FrameCodec>,
}

impl ChannelNode {
    async fn register(relay: &Relay) -> ChannelNode {
        let key = SecretKey::generate();
        let cfg = tls::client_config(&key, relay.relay_id(), ALPN_RELAY, "relay").unwrap();
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let clone = socket.try_clone().unwrap();
        let mut config = quinn::EndpointConfig::default();
        config.grease_quic_bit(false);
        let endpoint =
            quinn::Endpoint::new(config, None, socket, Arc::new(quinn::TokioRuntime)).unwrap();
        let link = link::connect_quic(&endpoint, relay.listen_addr(), cfg, ALPN_RELAY)
            .await
            .unwrap();
        let stream = link.open().await.unwrap();
        let mut writer = FramedWrite::new(stream.send, FrameCodec);
        let mut reader = FramedRead::new(stream.recv, FrameCodec);
        writer
            .send(Frame::Control(Control::Register {
                services: vec![],
                certificate: None,
                upgrade: false,
            }))
            .await
            .unwrap();
        let reply = reader.next().await.unwrap().unwrap();
        let Frame::Control(Control::Registered {
            channel: Some(token),
            ..
        }) = reply
        else {
            panic!("a node on QUIC gets a channel token: {reply:?}");
        };
        ChannelNode {
            link,
            socket: clone,
            token: *token,
            node: key.node_id(),
            reader,
            writer,
        }
    }

    /// The session still answers.
    async fn ping(&mut self, nonce: u64) {
        self.writer
            .send(Frame::Control(Control::Ping { nonce }))
            .await
            .unwrap();
        let pong = tokio::time::timeout(Duration::from_secs(10), self.reader.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(pong, Frame::Control(Control::Pong { nonce }));
    }
}

fn channel_packet(token: &ferry_proto::channel::ChannelToken, to: &NodeId) -> Vec<u8> {
    let mut packet = vec![0u8; ferry_proto::channel::HEADER_LEN + 100];
    ferry_proto::channel::write_header(&mut packet, token, to);
    packet
}

#[test]
fn forged_and_misdirected_channel_packets_are_dropped_and_counted() {
    let dir = TempDir::new("bad-channel");
    let relay = Relay::start(dir.path(), "24740-24749");
    let (_good, public) = healthy_node(dir.path(), &relay);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dropped = |reason: &str| {
        let metric = format!("ferry_relay_overlay_packets_dropped_total{{reason=\"{reason}\"}}");
        relay
            .metrics()
            .lines()
            .find_map(|l| l.strip_prefix(metric.as_str()))
            .map(|v| v.trim().parse::<u64>().unwrap())
            .unwrap_or(0)
    };
    rt.block_on(async {
        let mut a = ChannelNode::register(&relay).await;
        let b = ChannelNode::register(&relay).await;
        let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
        let relay_addr = relay.listen_addr();

        // A made-up token, a real one sent from another address, a header cut short:
        // none is forwarded, each is counted.
        let forged = ferry_proto::channel::ChannelToken::random();
        stranger
            .send_to(&channel_packet(&forged, &b.node), relay_addr)
            .unwrap();
        stranger
            .send_to(&channel_packet(&a.token, &b.node), relay_addr)
            .unwrap();
        stranger
            .send_to(&[ferry_proto::channel::TAG, 1, 2, 3], relay_addr)
            .unwrap();
        wait_for(
            "three bad channel packets counted",
            Duration::from_secs(5),
            || (dropped("bad_channel") == 3).then_some(()),
        );
        // The real token from the link's own address, for a node that is not there.
        let nobody = SecretKey::generate().node_id();
        a.socket
            .send_to(&channel_packet(&a.token, &nobody), relay_addr)
            .unwrap();
        wait_for(
            "unknown destination counted",
            Duration::from_secs(5),
            || (dropped("unknown_destination") == 1).then_some(()),
        );
        // Both sessions are unharmed; a forged packet moved nothing.
        a.ping(1).await;
        assert!(
            futures::FutureExt::now_or_never(b.link.closed()).is_none(),
            "the other node's link is open"
        );
        assert!(
            relay
                .metrics()
                .contains("ferry_relay_overlay_packets_forwarded_total{carrier=\"channel\"} 0")
        );
    });
    // And the well-behaved node was served throughout.
    let (sent, received, n) = echo_transfer(public, 2, 1 << 20);
    assert_eq!((n, sent), (1 << 20, received));
}
