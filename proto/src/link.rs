//! A relay link: one authenticated, multiplexed connection between a node and a relay,
//! over QUIC (quinn) or, where UDP does not get through, TLS over TCP.
//!
//! Both transports are QUIC: over TCP, QUIC packets travel inside the TLS stream (see
//! `stream_socket` for why). So every link offers the same thing — bidirectional
//! streams opened by either side, each with its own flow control so one slow stream
//! never stalls another — behind [`Link`], a `quinn::Connection` plus what it rides on.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::identity::{NodeId, SecretKey};
use crate::limits::{HANDSHAKE_TIMEOUT, KEEPALIVE_INTERVAL, RELAY_QUIC_KEEPALIVE};
use crate::stream_socket;
use crate::tls;

/// Streams one side may have open at once on a link. A relay opens one per public-port
/// connection; 1,024 concurrent client connections per node covers a busy storage
/// server, and the relay's own per-node limit is enforced before this.
pub const MAX_STREAMS_PER_LINK: u32 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot reach {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("handshake with {addr} failed: {why}")]
    Handshake { addr: SocketAddr, why: String },
    #[error("handshake with {addr} timed out after {secs} s")]
    HandshakeTimeout { addr: SocketAddr, secs: u64 },
    #[error("peer at {addr} did not negotiate ALPN {expected}; it is not a compatible Ferry peer")]
    WrongAlpn { addr: SocketAddr, expected: String },
    #[error("peer at {addr} presented no usable ed25519 key")]
    NoIdentity { addr: SocketAddr },
    #[error("TLS setup failed: {0}")]
    Tls(#[from] tls::TlsError),
}

/// How long a peer gets to read a last message before its link is closed
/// ([`Link::close_after_telling`]).
pub const LAST_WORD_GRACE: std::time::Duration = std::time::Duration::from_millis(200);

/// Which transport carries a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkKind {
    Quic,
    Tcp,
}

impl std::fmt::Display for LinkKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LinkKind::Quic => "quic",
            LinkKind::Tcp => "tcp",
        })
    }
}

pub type BoxRead = Pin<Box<dyn AsyncRead + Send>>;
pub type BoxWrite = Pin<Box<dyn AsyncWrite + Send>>;

/// One bidirectional stream of a link (or any byte stream), readable and writable.
pub struct Stream {
    pub recv: BoxRead,
    pub send: BoxWrite,
}

impl Stream {
    pub fn new(
        recv: impl AsyncRead + Send + 'static,
        send: impl AsyncWrite + Send + 'static,
    ) -> Self {
        Stream {
            recv: Box::pin(recv),
            send: Box::pin(send),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.recv.as_mut().poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.send.as_mut().poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.send.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.send.as_mut().poll_shutdown(cx)
    }
}

/// Keeps the per-connection QUIC endpoint and stream tasks of a TCP link alive for as
/// long as any handle to the link exists.
struct TcpCarrier {
    endpoint: quinn::Endpoint,
}

impl Drop for TcpCarrier {
    fn drop(&mut self) {
        self.endpoint.close(0u32.into(), b"link dropped");
    }
}

/// An authenticated, multiplexed connection to one peer. Cheap to clone.
#[derive(Clone)]
pub struct Link {
    conn: quinn::Connection,
    kind: LinkKind,
    peer: NodeId,
    remote: SocketAddr,
    _carrier: Option<Arc<TcpCarrier>>,
    datagrams: Arc<DatagramLedger>,
}

/// What this side has handed quinn as DATAGRAMs on one link (see
/// [`Link::send_datagram`]).
#[derive(Debug, Default)]
struct DatagramLedger {
    /// Largest datagram queued so far.
    largest: std::sync::atomic::AtomicUsize,
    /// Datagrams queued so far (ack-eliciting once sent; see [`Link::activity`]).
    queued: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Link({} {} {})",
            self.kind,
            self.peer.short(),
            self.remote
        )
    }
}

fn closed_err(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, what.to_string())
}

impl Link {
    pub fn kind(&self) -> LinkKind {
        self.kind
    }

    /// The node ID the handshake authenticated.
    pub fn peer_id(&self) -> NodeId {
        self.peer
    }

    /// The peer's real address (for QUIC, the current one after any migration), in
    /// plain form: an IPv4 peer of a dual-stack listener is `a.b.c.d`, never
    /// `::ffff:a.b.c.d`, which a node told its observed address would take for public
    /// IPv6 ([`crate::net::canonical`]). Every address reported to a node or compared
    /// with a configured one comes from here.
    pub fn remote_addr(&self) -> SocketAddr {
        crate::net::canonical(self.remote_socket_addr())
    }

    /// The peer's address as this side's socket names it (IPv4-mapped on a dual-stack
    /// socket): only for sending to the peer on that socket directly, or matching what
    /// the socket received.
    pub fn remote_socket_addr(&self) -> SocketAddr {
        match self.kind {
            LinkKind::Quic => self.conn.remote_address(),
            LinkKind::Tcp => self.remote,
        }
    }

    /// The local address the peer's packets arrive at (QUIC links on a socket bound to
    /// a wildcard address, where the platform reports it; else None).
    pub fn local_ip(&self) -> Option<std::net::IpAddr> {
        match self.kind {
            LinkKind::Quic => self.conn.local_ip(),
            LinkKind::Tcp => None,
        }
    }

    /// Smoothed round-trip time of the link (for TCP links, the inner QUIC estimate,
    /// which includes the TCP path's queueing).
    pub fn rtt(&self) -> std::time::Duration {
        self.conn.rtt()
    }

    /// Counters for [`crate::liveness::Liveness`]: ack-eliciting frames sent and
    /// datagrams received so far (for TCP links, those of the inner QUIC).
    pub fn activity(&self) -> crate::liveness::Activity {
        let stats = self.conn.stats();
        let f = &stats.frame_tx;
        crate::liveness::Activity {
            eliciting_sent: f.ping
                + f.stream
                + f.datagram
                + f.crypto
                + f.max_data
                + f.max_stream_data
                + f.reset_stream
                + f.stop_sending
                + f.new_connection_id
                + f.retire_connection_id
                + f.path_challenge
                // Datagrams queued but not sent yet (the congestion window is full of
                // packets the dead peer will never acknowledge) count too: waiting
                // for an answer starts when the application wanted to send.
                + self.datagrams.queued.load(std::sync::atomic::Ordering::Relaxed),
            received: stats.udp_rx.datagrams,
            rtt: stats.path.rtt,
        }
    }

    /// Sends `data` as one QUIC DATAGRAM if the link can take it now; otherwise hands
    /// it back, for the caller to send another way (a frame on a stream). Unreliable
    /// like UDP: when the link's datagram buffer is full the oldest queued one is
    /// dropped.
    ///
    /// Why "can take it" is more than "fits the current MTU": quinn sends its queued
    /// datagrams strictly in order, and one queued when the path MTU was larger stays
    /// at the head of the queue, blocking every later one, after the MTU shrinks (black
    /// hole detection drops it to 1200 bytes when a path stalls, for example when
    /// the relay died). So once the MTU is below the largest datagram ever queued here,
    /// nothing more is queued until path MTU discovery has grown it back.
    pub fn send_datagram(&self, data: bytes::Bytes) -> Result<(), bytes::Bytes> {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(max) = self.conn.max_datagram_size() else {
            return Err(data);
        };
        if data.len() > max || self.datagrams.largest.load(Relaxed) > max {
            return Err(data);
        }
        self.datagrams.largest.fetch_max(data.len(), Relaxed);
        match self.conn.send_datagram(data.clone()) {
            Ok(()) => {
                self.datagrams.queued.fetch_add(1, Relaxed);
                Ok(())
            }
            Err(_) => Err(data),
        }
    }

    /// Waits for the next QUIC DATAGRAM from the peer; fails once the link is closed.
    pub async fn read_datagram(&self) -> io::Result<bytes::Bytes> {
        self.conn.read_datagram().await.map_err(closed_err)
    }

    /// Waits for overlay DATAGRAMs (see `frame::encode_datagram`) and hands each, with
    /// the node ID it carries, to `each`: the first one that arrives and then those
    /// already waiting, up to [`DATAGRAM_BURST`], so a busy link wakes its reader once
    /// per burst rather than once per packet. Fails with `FrameError::Io` once the link
    /// is closed, or with the decoding error of a malformed datagram.
    pub async fn read_overlay_datagrams(
        &self,
        mut each: impl FnMut(NodeId, bytes::Bytes),
    ) -> Result<(), crate::frame::FrameError> {
        use futures::FutureExt;
        let mut hand_over = |datagram| {
            let (peer, packet) = crate::frame::decode_datagram(datagram)?;
            each(peer, packet);
            Ok::<(), crate::frame::FrameError>(())
        };
        hand_over(self.read_datagram().await?)?;
        for _ in 1..DATAGRAM_BURST {
            match self.read_datagram().now_or_never() {
                Some(Ok(datagram)) => hand_over(datagram)?,
                _ => break,
            }
        }
        Ok(())
    }

    /// Opens a new bidirectional stream to the peer.
    pub async fn open(&self) -> io::Result<Stream> {
        let (send, recv) = self.conn.open_bi().await.map_err(closed_err)?;
        Ok(Stream::new(recv, send))
    }

    /// Waits for the peer to open a stream. Returns an error once the link is closed.
    pub async fn accept(&self) -> io::Result<Stream> {
        let (send, recv) = self.conn.accept_bi().await.map_err(closed_err)?;
        Ok(Stream::new(recv, send))
    }

    /// Closes the link; `reason` reaches the peer.
    pub fn close(&self, reason: &str) {
        self.conn.close(0u32.into(), reason.as_bytes());
    }

    /// Queues `last_word` on the session's frame queue `tx` and closes the link with
    /// `reason` once the peer has had [`LAST_WORD_GRACE`] to read it: closing a QUIC
    /// connection at once would discard the unacknowledged message. Never blocks; a
    /// full queue loses the message, not the close.
    pub fn close_after_telling(
        &self,
        tx: &crate::frame::FrameSender,
        last_word: crate::frame::Control,
        reason: &'static str,
    ) {
        let _ = tx.try_send(crate::frame::Frame::Control(last_word));
        let link = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(LAST_WORD_GRACE).await;
            link.close(reason);
        });
    }

    /// Resolves when the link is closed, by either side or by a failure.
    pub async fn closed(&self) {
        self.conn.closed().await;
    }

    /// Wraps an established QUIC connection, checking its ALPN and peer key.
    pub fn from_quic(conn: quinn::Connection, alpn: &[u8]) -> Result<Self, LinkError> {
        Self::wrap(conn, alpn, LinkKind::Quic, None, None)
    }

    fn wrap(
        conn: quinn::Connection,
        alpn: &[u8],
        kind: LinkKind,
        remote: Option<SocketAddr>,
        carrier: Option<Arc<TcpCarrier>>,
    ) -> Result<Self, LinkError> {
        let addr = remote.unwrap_or_else(|| conn.remote_address());
        let negotiated = conn
            .handshake_data()
            .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|d| d.protocol);
        if let Err(e) = check_alpn(negotiated.as_deref(), alpn, addr) {
            conn.close(0u32.into(), b"wrong ALPN");
            return Err(e);
        }
        let peer = tls::quic_peer_id(&conn).ok_or(LinkError::NoIdentity { addr })?;
        Ok(Link {
            conn,
            kind,
            peer,
            remote: addr,
            _carrier: carrier,
            datagrams: Arc::default(),
        })
    }
}

/// QUIC transport settings for relay links: keepalives well inside NAT timeouts, and an
/// idle timeout that only fires when the peer is really gone.
pub fn relay_transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(RELAY_QUIC_KEEPALIVE));
    // The programs close a link silent for `LINK_IDLE_TIMEOUT` of awake time
    // themselves (`stall::Silence`); QUIC's own timer, which a frozen host would trip on
    // waking, is only the backstop.
    t.max_idle_timeout(Some(crate::stall::quic_idle_backstop()));
    t.max_concurrent_bidi_streams(MAX_STREAMS_PER_LINK.into());
    t.max_concurrent_uni_streams(0u32.into());
    // Overlay packets ride relay links as QUIC DATAGRAMs (see `frame::encode_datagram`).
    // A few milliseconds of a fast transfer; beyond it the oldest are dropped and the
    // end-to-end QUIC slows down, as behind any full router queue.
    t.datagram_receive_buffer_size(Some(DATAGRAM_BUFFER));
    t.datagram_send_buffer_size(DATAGRAM_BUFFER);
    t
}

/// Most overlay datagrams [`Link::read_overlay_datagrams`] hands over per call, so one
/// busy link cannot keep its reader from its other work.
pub const DATAGRAM_BURST: usize = 64;

/// QUIC DATAGRAM bytes a relay link queues in each direction.
pub const DATAGRAM_BUFFER: usize = 512 * 1024;

/// UDP socket buffer a relay or rendezvous asks for: a relay restarting with 100,000
/// nodes, or a STUN burst, sends thousands of datagrams at once, and each one the
/// kernel drops for want of buffer costs a QUIC handshake a full retransmission timeout
/// (about a second).
pub const SERVER_UDP_BUFFER: usize = 8 * 1024 * 1024;

/// UDP socket buffer a shim asks for: one busy overlay connection at a few Gbit/s.
pub const SHIM_UDP_BUFFER: usize = 4 * 1024 * 1024;

/// Asks for `wanted` bytes of receive and send buffer on a UDP socket. The kernel caps
/// the size at `net.core.rmem_max`/`wmem_max`; when that leaves much less than asked,
/// says so once, naming the setting, and carries on with what it got.
pub fn size_udp_buffers<S: std::os::fd::AsFd>(socket: &S, wanted: usize, what: &str) {
    let sock = socket2::SockRef::from(socket);
    let _ = sock.set_recv_buffer_size(wanted);
    let _ = sock.set_send_buffer_size(wanted);
    // Linux reports double what it grants (bookkeeping overhead).
    let got = sock.recv_buffer_size().unwrap_or(0) / 2;
    if got < wanted / 2 {
        tracing::info!(
            "{what}: UDP receive buffer is {} KiB, not the {} KiB asked for; raise net.core.rmem_max (sysctl) so bursts of packets are not dropped",
            got / 1024,
            wanted / 1024
        );
    }
}

/// Streams a node may open to a relay or rendezvous: its one session stream, with room
/// to spare. quinn keeps state for every stream the peer may open (two map entries
/// each, made up front), so the relay's side offers few — at 1,024 that state alone was
/// about 60 KiB per idle node.
pub const NODE_OPENED_STREAMS: u32 = 4;

/// [`relay_transport_config`] for the accepting side (relay, rendezvous): the node may
/// open only [`NODE_OPENED_STREAMS`]; the relay may still open
/// [`MAX_STREAMS_PER_LINK`] to the node (the node's own config grants those).
pub fn relay_server_transport_config() -> quinn::TransportConfig {
    let mut t = relay_transport_config();
    t.max_concurrent_bidi_streams(NODE_OPENED_STREAMS.into());
    // The nodes' session pings and keepalives already keep each link and its NAT
    // mapping alive, and the relay's acknowledgements keep its idle timer fed.
    // Keepalives of its own would double an idle relay's packet rate for nothing.
    t.keep_alive_interval(None);
    t
}

/// The QUIC client side of a relay link (over UDP or inside TLS/TCP), with the relay
/// transport settings; `addr` names the relay in errors.
fn quic_client_config(
    client: rustls::ClientConfig,
    addr: SocketAddr,
) -> Result<quinn::ClientConfig, LinkError> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(client).map_err(|e| {
        LinkError::Handshake {
            addr,
            why: e.to_string(),
        }
    })?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(relay_transport_config()));
    Ok(config)
}

/// The QUIC server side of a Ferry server (relay or rendezvous) with key `key`: its
/// TLS identity, `alpn`, and the server transport settings.
pub fn quic_server_config(key: &SecretKey, alpn: &[u8]) -> Result<quinn::ServerConfig, LinkError> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls::server_config(key, alpn)?)
        .map_err(|e| LinkError::Handshake {
            addr: stream_socket::PEER,
            why: e.to_string(),
        })?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(relay_server_transport_config()));
    Ok(server)
}

/// A node's link to a server and the server's link from it, joined by an in-memory
/// byte stream (`tokio::io::duplex`) where a TLS/TCP link has a TCP connection. The
/// QUIC handshake inside authenticates both keys exactly as it does over TCP (which
/// adds only the outer TLS layer); each side reports `remote` as the other's address.
/// For tests of session drivers that need real frames on real streams, no sockets.
pub async fn in_memory_pair(
    node: &SecretKey,
    server: &SecretKey,
    alpn: &[u8],
    remote: SocketAddr,
) -> Result<(Link, Link), LinkError> {
    let (node_io, server_io) = tokio::io::duplex(256 * 1024);
    let (server_endpoint, server_dead) =
        stream_endpoint(server_io, Some(quic_server_config(server, alpn)?))?;
    let (node_endpoint, node_dead) = stream_endpoint(node_io, None)?;
    let config = quic_client_config(
        tls::client_config(node, server.node_id(), alpn, "server")?,
        remote,
    )?;
    let handshake_failed = |why: String| LinkError::Handshake { addr: remote, why };
    let dial = async {
        node_endpoint
            .connect_with(config, stream_socket::PEER, tls::SERVER_NAME)
            .map_err(|e| handshake_failed(e.to_string()))?
            .await
            .map_err(|e| handshake_failed(describe_quic_error(&e)))
    };
    let accept = async {
        server_endpoint
            .accept()
            .await
            .ok_or_else(|| handshake_failed("the server endpoint closed".into()))?
            .await
            .map_err(|e| handshake_failed(describe_quic_error(&e)))
    };
    let (node_conn, server_conn) = tokio::try_join!(dial, accept)?;
    Ok((
        tcp_link(node_conn, node_dead, node_endpoint, alpn, remote)?,
        tcp_link(server_conn, server_dead, server_endpoint, alpn, remote)?,
    ))
}

/// Dials a relay (or any Ferry server) over QUIC from `endpoint`.
pub async fn connect_quic(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    client: rustls::ClientConfig,
    alpn: &[u8],
) -> Result<Link, LinkError> {
    let config = quic_client_config(client, addr)?;
    let connecting = endpoint
        .connect_with(config, addr, tls::SERVER_NAME)
        .map_err(|e| LinkError::Handshake {
            addr,
            why: e.to_string(),
        })?;
    let conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting)
        .await
        .map_err(|_| LinkError::HandshakeTimeout {
            addr,
            secs: HANDSHAKE_TIMEOUT.as_secs(),
        })?
        .map_err(|e| LinkError::Handshake {
            addr,
            why: describe_quic_error(&e),
        })?;
    Link::from_quic(conn, alpn)
}

/// Human wording of a QUIC connection error, keeping the TLS reason intact.
pub fn describe_quic_error(e: &quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::TransportError(t) => t.reason.clone(),
        quinn::ConnectionError::ConnectionClosed(c) => {
            String::from_utf8_lossy(&c.reason).into_owned()
        }
        quinn::ConnectionError::ApplicationClosed(c) => {
            String::from_utf8_lossy(&c.reason).into_owned()
        }
        other => other.to_string(),
    }
}

fn tune_tcp(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_INTERVAL)
        .with_interval(KEEPALIVE_INTERVAL);
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive);
}

fn check_alpn(negotiated: Option<&[u8]>, alpn: &[u8], addr: SocketAddr) -> Result<(), LinkError> {
    if negotiated == Some(alpn) {
        Ok(())
    } else {
        Err(LinkError::WrongAlpn {
            addr,
            expected: String::from_utf8_lossy(alpn).into_owned(),
        })
    }
}

/// A QUIC endpoint whose only network is one TLS-over-TCP connection.
fn stream_endpoint<S>(
    io: S,
    server: Option<quinn::ServerConfig>,
) -> Result<(quinn::Endpoint, CancellationToken), LinkError>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (socket, dead) = stream_socket::spawn(io);
    let endpoint = quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        server,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|e| LinkError::Handshake {
        addr: stream_socket::PEER,
        why: e.to_string(),
    })?;
    Ok((endpoint, dead))
}

/// Finishes a QUIC-inside-TLS link: watches the byte stream and keeps the endpoint
/// alive as long as the link.
fn tcp_link(
    conn: quinn::Connection,
    dead: CancellationToken,
    endpoint: quinn::Endpoint,
    alpn: &[u8],
    addr: SocketAddr,
) -> Result<Link, LinkError> {
    close_when_dead(&conn, dead);
    Link::wrap(
        conn,
        alpn,
        LinkKind::Tcp,
        Some(addr),
        Some(Arc::new(TcpCarrier { endpoint })),
    )
}

async fn within_handshake_timeout<T>(
    addr: SocketAddr,
    attempt: impl std::future::Future<Output = Result<T, LinkError>>,
) -> Result<T, LinkError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, attempt)
        .await
        .map_err(|_| LinkError::HandshakeTimeout {
            addr,
            secs: HANDSHAKE_TIMEOUT.as_secs(),
        })?
}

/// Closes `conn` as soon as the byte stream under it ends, so a reset TCP connection
/// is noticed at once rather than after the idle timeout.
fn close_when_dead(conn: &quinn::Connection, dead: CancellationToken) {
    let conn = conn.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = dead.cancelled() => conn.close(0u32.into(), b"TCP connection lost"),
            _ = conn.closed() => {}
        }
    });
}

/// Dials a Ferry server over TLS on TCP and runs QUIC inside it. `tls` pins the server
/// key for the outer layer; `quic` does so again for the QUIC handshake inside.
pub async fn connect_tcp(
    addr: SocketAddr,
    tls_config: rustls::ClientConfig,
    quic: rustls::ClientConfig,
    alpn: &[u8],
) -> Result<Link, LinkError> {
    let attempt = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| LinkError::Connect { addr, source })?;
        tcp_link_over(tcp, addr, tls_config, quic, alpn).await
    };
    within_handshake_timeout(addr, attempt).await
}

/// Like [`connect_tcp`] on a TCP connection that is already open (through a proxy,
/// for example); `addr` is what the connection is known by in errors and status.
pub async fn connect_tcp_stream(
    tcp: TcpStream,
    addr: SocketAddr,
    tls_config: rustls::ClientConfig,
    quic: rustls::ClientConfig,
    alpn: &[u8],
) -> Result<Link, LinkError> {
    within_handshake_timeout(addr, tcp_link_over(tcp, addr, tls_config, quic, alpn)).await
}

async fn tcp_link_over(
    tcp: TcpStream,
    addr: SocketAddr,
    tls_config: rustls::ClientConfig,
    quic: rustls::ClientConfig,
    alpn: &[u8],
) -> Result<Link, LinkError> {
    tune_tcp(&tcp);
    let name = rustls::pki_types::ServerName::try_from(tls::SERVER_NAME)
        .map_err(|e| LinkError::Handshake {
            addr,
            why: e.to_string(),
        })?
        .to_owned();
    let tls_stream = tokio_rustls::TlsConnector::from(Arc::new(tls_config))
        .connect(name, tcp)
        .await
        .map_err(|e| LinkError::Handshake {
            addr,
            why: e.to_string(),
        })?;
    check_alpn(tls_stream.get_ref().1.alpn_protocol(), alpn, addr)?;
    let (endpoint, dead) = stream_endpoint(tls_stream, None)?;
    let config = quic_client_config(quic, addr)?;
    let conn = endpoint
        .connect_with(config, stream_socket::PEER, tls::SERVER_NAME)
        .map_err(|e| LinkError::Handshake {
            addr,
            why: e.to_string(),
        })?
        .await
        .map_err(|e| LinkError::Handshake {
            addr,
            why: describe_quic_error(&e),
        })?;
    tcp_link(conn, dead, endpoint, alpn, addr)
}

/// Completes the server side of a TLS-over-TCP link on an accepted socket: TLS, then
/// the QUIC handshake inside it.
pub async fn accept_tcp(
    tcp: TcpStream,
    acceptor: &tokio_rustls::TlsAcceptor,
    quic: quinn::ServerConfig,
    alpn: &[u8],
) -> Result<Link, LinkError> {
    let addr = tcp
        .peer_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    tune_tcp(&tcp);
    let attempt = async {
        let tls_stream = acceptor
            .accept(tcp)
            .await
            .map_err(|e| LinkError::Handshake {
                addr,
                why: e.to_string(),
            })?;
        check_alpn(tls_stream.get_ref().1.alpn_protocol(), alpn, addr)?;
        let (endpoint, dead) = stream_endpoint(tls_stream, Some(quic))?;
        let incoming = endpoint.accept().await.ok_or(LinkError::Handshake {
            addr,
            why: "the connection closed before the QUIC handshake".into(),
        })?;
        let conn = incoming.await.map_err(|e| LinkError::Handshake {
            addr,
            why: describe_quic_error(&e),
        })?;
        tcp_link(conn, dead, endpoint, alpn, addr)
    };
    within_handshake_timeout(addr, attempt).await
}

/// QUIC endpoint settings for a server whose stateless-reset key (and connection-ID
/// generator) are derived from its secret key and `label`. After a crash and restart
/// the server can then reset the connections its former self held, so nodes learn at
/// their next keepalive that they must reconnect instead of waiting out an idle
/// timeout (the relay and the standalone rendezvous both use it, with their own label).
pub fn restart_safe_endpoint_config(key: &SecretKey, label: &[u8]) -> quinn::EndpointConfig {
    let seed = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.signing_key().as_bytes());
    let derived = ring::hmac::sign(&seed, label);
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, derived.as_ref());
    // quinn only answers packets whose connection ID its generator recognises, so the
    // generator's key must survive restarts too.
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&derived.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    let mut config = quinn::EndpointConfig::new(Arc::new(reset_key));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    // Nodes must always set QUIC's fixed bit: relay-channel packets on the same
    // socket are told apart by it being clear (see `crate::channel`).
    config.grease_quic_bit(false);
    config
}
