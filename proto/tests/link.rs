//! Real-socket checks of the relay link: mutual raw-key authentication over QUIC and
//! TLS/TCP, key pinning, ALPN, and streams in both directions.

use std::net::SocketAddr;
use std::sync::Arc;

use ferry_proto::SecretKey;
use ferry_proto::link::{self, Link};
use ferry_proto::tls::{self, ALPN_PEER, ALPN_RELAY};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn quic_server(key: &SecretKey) -> quinn::Endpoint {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(
        tls::server_config(key, ALPN_RELAY).unwrap(),
    )
    .unwrap();
    let config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap()
}

fn quic_client() -> quinn::Endpoint {
    quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap()
}

async fn echo_once(server: Link, client: Link) {
    let mut s = client.open().await.unwrap();
    s.write_all(b"hello from client").await.unwrap();
    s.shutdown().await.unwrap();
    let mut a = server.accept().await.unwrap();
    let mut got = Vec::new();
    a.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"hello from client");
    a.write_all(b"reply").await.unwrap();
    a.shutdown().await.unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"reply");

    // The server side can open streams too (public-port connections go that way).
    let mut o = server.open().await.unwrap();
    o.write_all(b"x").await.unwrap();
    o.shutdown().await.unwrap();
    let mut i = client.accept().await.unwrap();
    let mut got = Vec::new();
    i.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"x");
}

#[tokio::test]
async fn quic_link_authenticates_both_sides() {
    let relay = SecretKey::generate();
    let node = SecretKey::generate();
    let server = quic_server(&relay);
    let addr = server.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        Link::from_quic(conn, ALPN_RELAY).unwrap()
    });
    let client_cfg = tls::client_config(&node, relay.node_id(), ALPN_RELAY, "relay").unwrap();
    let client = link::connect_quic(&quic_client(), addr, client_cfg, ALPN_RELAY)
        .await
        .unwrap();
    let server_side = accept.await.unwrap();
    assert_eq!(client.peer_id(), relay.node_id());
    assert_eq!(server_side.peer_id(), node.node_id());
    echo_once(server_side, client).await;
}

#[tokio::test]
async fn quic_link_refuses_a_relay_with_the_wrong_key() {
    let relay = SecretKey::generate();
    let impostor = SecretKey::generate();
    let node = SecretKey::generate();
    let server = quic_server(&impostor);
    let addr = server.local_addr().unwrap();
    tokio::spawn(async move {
        if let Some(incoming) = server.accept().await {
            let _ = incoming.await;
        }
    });
    let client_cfg = tls::client_config(&node, relay.node_id(), ALPN_RELAY, "relay").unwrap();
    let err = link::connect_quic(&quic_client(), addr, client_cfg, ALPN_RELAY)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(&impostor.node_id().to_string()), "{err}");
    assert!(err.contains("relay URL"), "{err}");
}

async fn tcp_pair(
    server_key: &SecretKey,
    server_alpn: &'static [u8],
    client_key: &SecretKey,
    expected: &SecretKey,
    client_alpn: &'static [u8],
) -> (Result<Link, String>, Result<Link, String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(
        tls::server_config(server_key, server_alpn).unwrap(),
    ));
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(
        tls::server_config(server_key, server_alpn).unwrap(),
    )
    .unwrap();
    let quic = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let accept = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        link::accept_tcp(tcp, &acceptor, quic, server_alpn)
            .await
            .map_err(|e| e.to_string())
    });
    let cfg = tls::client_config(client_key, expected.node_id(), client_alpn, "relay").unwrap();
    let client = link::connect_tcp(addr, cfg.clone(), cfg, client_alpn)
        .await
        .map_err(|e| e.to_string());
    (accept.await.unwrap(), client)
}

#[tokio::test]
async fn tcp_link_authenticates_both_sides_and_multiplexes() {
    let relay = SecretKey::generate();
    let node = SecretKey::generate();
    let (server, client) = tcp_pair(&relay, ALPN_RELAY, &node, &relay, ALPN_RELAY).await;
    let (server, client) = (server.unwrap(), client.unwrap());
    assert_eq!(server.peer_id(), node.node_id());
    assert_eq!(client.peer_id(), relay.node_id());
    echo_once(server, client).await;
}

#[tokio::test]
async fn tcp_link_refuses_wrong_key_and_wrong_alpn() {
    let relay = SecretKey::generate();
    let impostor = SecretKey::generate();
    let node = SecretKey::generate();
    let (_, client) = tcp_pair(&impostor, ALPN_RELAY, &node, &relay, ALPN_RELAY).await;
    let err = client.unwrap_err();
    assert!(err.contains("relay URL"), "{err}");

    let (server, client) = tcp_pair(&relay, ALPN_RELAY, &node, &relay, ALPN_PEER).await;
    assert!(server.is_err() && client.is_err());
}

#[tokio::test]
async fn one_slow_tcp_stream_does_not_stall_another() {
    let relay = SecretKey::generate();
    let node = SecretKey::generate();
    let (server, client) = tcp_pair(&relay, ALPN_RELAY, &node, &relay, ALPN_RELAY).await;
    let (server, client) = (server.unwrap(), client.unwrap());
    // Stream 1: the client writes far more than one window and nobody reads it.
    let mut stalled = client.open().await.unwrap();
    let writer = tokio::spawn(async move {
        let chunk = vec![1u8; 64 * 1024];
        loop {
            if stalled.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    let _stalled_server_side = server.accept().await.unwrap();
    // Stream 2 must still carry 8 MiB promptly.
    let mut fast = client.open().await.unwrap();
    let payload = vec![2u8; 8 * 1024 * 1024];
    let sent = payload.clone();
    tokio::spawn(async move {
        fast.write_all(&sent).await.unwrap();
        fast.shutdown().await.unwrap();
    });
    let mut fast_in = server.accept().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(20),
        fast_in.read_to_end(&mut got),
    )
    .await
    .expect("the second stream stalled behind the first")
    .unwrap();
    assert_eq!(got.len(), payload.len());
    assert!(got == payload);
    writer.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_link_stream_carries_full_duplex_bulk() {
    let relay = SecretKey::generate();
    let node = SecretKey::generate();
    let (server, client) = tcp_pair(&relay, ALPN_RELAY, &node, &relay, ALPN_RELAY).await;
    let (server, client) = (server.unwrap(), client.unwrap());
    // A QUIC stream reaches the peer with its first bytes, so announce it first.
    let mut c = client.open().await.unwrap();
    c.write_all(b"hi").await.unwrap();
    let mut s = server.accept().await.unwrap();
    let mut hi = [0u8; 2];
    s.read_exact(&mut hi).await.unwrap();
    const TOTAL: usize = 32 * 1024 * 1024;
    async fn pump(stream: ferry_proto::link::Stream) -> usize {
        let ferry_proto::link::Stream { mut recv, mut send } = stream;
        let writer = tokio::spawn(async move {
            let chunk = vec![5u8; 1400];
            let mut sent = 0;
            while sent < TOTAL {
                send.write_all(&chunk).await.unwrap();
                sent += chunk.len();
            }
            send.shutdown().await.unwrap();
        });
        let mut got = 0;
        let mut buf = vec![0u8; 65536];
        loop {
            let n = recv.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got += n;
        }
        writer.await.unwrap();
        got
    }
    let both = async { tokio::join!(pump(c), pump(s)) };
    let (a, b) = tokio::time::timeout(std::time::Duration::from_secs(30), both)
        .await
        .expect("full-duplex transfer stalled");
    assert!(a >= TOTAL && b >= TOTAL);
}

/// A client whose presented key and signing key differ (a forged identity), or whose
/// "key" is not an ed25519 key at all, fails the handshake on both transports.
#[tokio::test]
async fn forged_and_malformed_client_keys_are_refused() {
    use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey};
    use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};

    let relay = SecretKey::generate();
    let victim = SecretKey::generate();
    let attacker = SecretKey::generate();
    let signer = rustls::crypto::ring::sign::any_eddsa_type(&PrivatePkcs8KeyDer::from(
        attacker
            .signing_key()
            .to_pkcs8_der()
            .unwrap()
            .as_bytes()
            .to_vec(),
    ))
    .unwrap();
    let victim_spki = victim
        .signing_key()
        .verifying_key()
        .to_public_key_der()
        .unwrap()
        .as_bytes()
        .to_vec();
    for (what, presented) in [
        ("victim's key, attacker's signature", victim_spki),
        ("not a key", b"certainly not an ed25519 key".to_vec()),
    ] {
        let forged = Arc::new(rustls::sign::CertifiedKey::new(
            vec![CertificateDer::from(presented)],
            signer.clone(),
        ));
        let mut cfg = tls::client_config(&attacker, relay.node_id(), ALPN_RELAY, "relay").unwrap();
        cfg.client_auth_cert_resolver = Arc::new(
            rustls::client::AlwaysResolvesClientRawPublicKeys::new(forged),
        );

        let server = quic_server(&relay);
        let addr = server.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let incoming = server.accept().await.unwrap();
            incoming.await.map(|_| ()).map_err(|e| e.to_string())
        });
        let client = link::connect_quic(&quic_client(), addr, cfg, ALPN_RELAY).await;
        let server_side = accept.await.unwrap();
        let err = server_side.expect_err("the relay accepted a forged identity");
        assert!(
            err.contains("BadSignature") || err.contains("ed25519"),
            "{what}: {err}"
        );
        // The client may or may not see the failure before its handshake completes,
        // but it never gets a usable link.
        if let Ok(link) = client {
            assert!(
                link.open().await.is_err() || link.accept().await.is_err(),
                "{what}"
            );
        }
    }
}
