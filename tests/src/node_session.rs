//! One node's session with a relay or rendezvous, spoken by hand over a real QUIC link:
//! for tests that send what a well-behaved shim never would (forged records and
//! certificates, sessions that never read).

use std::net::SocketAddr;
use std::time::Duration;

use ferry_proto::frame::{Control, Frame, FrameCodec};
use ferry_proto::link::{BoxRead, BoxWrite, Link};
use ferry_proto::record::{NatMapping, PathRecord, SignedRecord, expiry_after};
use ferry_proto::tls::{self, ALPN_RELAY};
use ferry_proto::{NodeId, SecretKey};
use futures::{SinkExt, StreamExt};
use tokio_util::codec::{FramedRead, FramedWrite};

pub struct NodeSession {
    pub key: SecretKey,
    pub link: Link,
    pub reader: FramedRead<BoxRead, FrameCodec>,
    pub writer: FramedWrite<BoxWrite, FrameCodec>,
}

/// The relay or rendezvous node ID in a `ferry://ID@host:port` URL.
pub fn url_node_id(url: &str) -> NodeId {
    url.trim_start_matches("ferry://")
        .split('@')
        .next()
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("no node ID in {url}"))
}

/// A client QUIC endpoint on a loopback port of its own. Many sessions may share one
/// (quinn tells connections apart by connection ID), and a test with thousands of
/// nodes must: every endpoint reserves a receive buffer for 32 batches of 64 coalesced
/// 64 KiB datagrams (128 MiB of address space) and quinn's per-endpoint state, so one
/// endpoint per session made the soak test's process grow by gigabytes.
pub fn client_endpoint() -> quinn::Endpoint {
    quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap()
}

impl NodeSession {
    /// Dials `url`'s host (at `addr`) with a new key, registers with no services, and
    /// returns the session and the `Registered` answer.
    pub async fn open(url: &str, addr: SocketAddr) -> (NodeSession, Control) {
        let register = Control::Register {
            services: vec![],
            certificate: None,
            upgrade: false,
        };
        let (session, reply) = Self::open_with(url, addr, SecretKey::generate(), register).await;
        (
            session,
            reply.unwrap_or_else(|| panic!("no answer to Register")),
        )
    }

    /// Dials with `key` and sends `first` as the session's first message; the answer,
    /// if one came before the session closed.
    pub async fn open_with(
        url: &str,
        addr: SocketAddr,
        key: SecretKey,
        first: Control,
    ) -> (NodeSession, Option<Control>) {
        Self::try_open_with(url, addr, key, first)
            .await
            .unwrap_or_else(|e| panic!("cannot open a session with {url}: {e}"))
    }

    /// [`NodeSession::open_with`], with a failure to connect returned. Dials from an
    /// endpoint of its own; a test with many nodes shares a few with [`Self::try_open_on`].
    pub async fn try_open_with(
        url: &str,
        addr: SocketAddr,
        key: SecretKey,
        first: Control,
    ) -> Result<(NodeSession, Option<Control>), String> {
        Self::try_open_on(&client_endpoint(), url, addr, key, first).await
    }

    /// [`NodeSession::try_open_with`] from `endpoint`. The session keeps the endpoint's
    /// driver running as long as it lives.
    pub async fn try_open_on(
        endpoint: &quinn::Endpoint,
        url: &str,
        addr: SocketAddr,
        key: SecretKey,
        first: Control,
    ) -> Result<(NodeSession, Option<Control>), String> {
        let cfg = tls::client_config(&key, url_node_id(url), ALPN_RELAY, "test").unwrap();
        let link = ferry_proto::link::connect_quic(endpoint, addr, cfg, ALPN_RELAY)
            .await
            .map_err(|e| e.to_string())?;
        Self::start(link, key, first).await
    }

    /// [`NodeSession::try_open_with`] over the TLS/TCP fallback: QUIC inside one TCP
    /// connection, as a shim whose UDP is blocked dials.
    pub async fn try_open_tcp(
        url: &str,
        addr: SocketAddr,
        key: SecretKey,
        first: Control,
    ) -> Result<(NodeSession, Option<Control>), String> {
        let cfg = tls::client_config(&key, url_node_id(url), ALPN_RELAY, "test").unwrap();
        let link = ferry_proto::link::connect_tcp(addr, cfg.clone(), cfg, ALPN_RELAY)
            .await
            .map_err(|e| e.to_string())?;
        Self::start(link, key, first).await
    }

    /// Opens the session stream on `link`, sends `first` and waits for the answer.
    async fn start(
        link: Link,
        key: SecretKey,
        first: Control,
    ) -> Result<(NodeSession, Option<Control>), String> {
        let stream = link.open().await.map_err(|e| e.to_string())?;
        let mut session = NodeSession {
            key,
            link,
            reader: FramedRead::new(stream.recv, FrameCodec),
            writer: FramedWrite::new(stream.send, FrameCodec),
        };
        session.send(first).await;
        let reply = session.try_next().await;
        Ok((session, reply))
    }

    pub async fn send(&mut self, msg: Control) {
        self.writer.send(Frame::Control(msg)).await.unwrap();
    }

    /// The next control message; None if the session ended first or nothing came
    /// within 10 s.
    pub async fn try_next(&mut self) -> Option<Control> {
        match tokio::time::timeout(Duration::from_secs(10), self.reader.next()).await {
            Ok(Some(Ok(Frame::Control(c)))) => Some(c),
            Ok(None | Some(Err(_))) | Err(_) => None,
            Ok(Some(Ok(other))) => panic!("expected a control message, got {other:?}"),
        }
    }

    pub async fn next(&mut self) -> Control {
        match self.try_next().await {
            Some(c) => c,
            None => panic!("no answer within 10 s, or the session ended"),
        }
    }

    /// A path record of this node, valid for 5 minutes, signed by its own key.
    pub fn record(&self, seq: u64, addr: &str) -> SignedRecord {
        PathRecord {
            node_id: self.key.node_id(),
            seq,
            expires: expiry_after(std::time::SystemTime::now(), Duration::from_secs(300)),
            addrs: vec![addr.parse().unwrap()],
            relays: vec![],
            nat: NatMapping::EndpointIndependent,
        }
        .sign(&self.key)
    }
}
