//! A relay link: one authenticated, multiplexed connection between a node and a relay,
//! over QUIC (quinn) or, where UDP does not get through, TLS over TCP with yamux.
//!
//! Both transports offer the same thing — bidirectional streams, opened by either side,
//! each with its own flow control so one slow stream never stalls another — behind
//! [`Link`]. Yamux was chosen for TCP because it gives exactly that (per-stream windows
//! with auto-tuning) and is well kept; yamux needs its connection polled continuously,
//! so a small driver task owns it and hands streams out through channels.

use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};
use tokio_util::sync::CancellationToken;

use crate::identity::NodeId;
use crate::limits::{HANDSHAKE_TIMEOUT, KEEPALIVE_INTERVAL, LINK_IDLE_TIMEOUT};
use crate::tls;

/// Streams one side may have open at once on a link. A relay opens one per public-port
/// connection; 1,024 concurrent client connections per node covers a busy storage
/// server, and the relay's own per-node limit is enforced before this.
pub const MAX_STREAMS_PER_LINK: u32 = 1024;

/// Inbound yamux streams waiting to be accepted before new ones are refused.
const INBOUND_BACKLOG: usize = 64;

/// How long a yamux link may take to say goodbye when closed.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

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

/// Which transport carries a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
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

type OpenReply = oneshot::Sender<io::Result<yamux::Stream>>;

struct YamuxLink {
    open: mpsc::Sender<OpenReply>,
    inbound: Mutex<mpsc::Receiver<yamux::Stream>>,
    /// Cancelled by `close`; the driver then closes the session.
    close: CancellationToken,
    /// Cancelled by the driver when the session is over, whatever the reason.
    dead: CancellationToken,
}

enum Inner {
    Quic(quinn::Connection),
    Tcp(Arc<YamuxLink>),
}

/// An authenticated, multiplexed connection to one peer. Cheap to clone.
#[derive(Clone)]
pub struct Link {
    inner: Arc<Inner>,
    peer: NodeId,
    remote: SocketAddr,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Link({} {} {})", self.kind(), self.peer.short(), self.remote)
    }
}

fn closed_err(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, what.to_string())
}

impl Link {
    pub fn kind(&self) -> LinkKind {
        match &*self.inner {
            Inner::Quic(_) => LinkKind::Quic,
            Inner::Tcp(_) => LinkKind::Tcp,
        }
    }

    /// The node ID the handshake authenticated.
    pub fn peer_id(&self) -> NodeId {
        self.peer
    }

    pub fn remote_addr(&self) -> SocketAddr {
        match &*self.inner {
            Inner::Quic(c) => c.remote_address(),
            Inner::Tcp(_) => self.remote,
        }
    }

    /// Opens a new bidirectional stream to the peer.
    pub async fn open(&self) -> io::Result<Stream> {
        match &*self.inner {
            Inner::Quic(c) => {
                let (send, recv) = c.open_bi().await.map_err(closed_err)?;
                Ok(Stream::new(recv, send))
            }
            Inner::Tcp(y) => {
                let (tx, rx) = oneshot::channel();
                y.open
                    .send(tx)
                    .await
                    .map_err(|_| closed_err("link closed"))?;
                let stream = rx.await.map_err(|_| closed_err("link closed"))??;
                let (recv, send) = tokio::io::split(stream.compat());
                Ok(Stream::new(recv, send))
            }
        }
    }

    /// Waits for the peer to open a stream. Returns an error once the link is closed.
    pub async fn accept(&self) -> io::Result<Stream> {
        match &*self.inner {
            Inner::Quic(c) => {
                let (send, recv) = c.accept_bi().await.map_err(closed_err)?;
                Ok(Stream::new(recv, send))
            }
            Inner::Tcp(y) => {
                let stream = y
                    .inbound
                    .lock()
                    .await
                    .recv()
                    .await
                    .ok_or_else(|| closed_err("link closed"))?;
                let (recv, send) = tokio::io::split(stream.compat());
                Ok(Stream::new(recv, send))
            }
        }
    }

    /// Closes the link; `reason` reaches the peer on QUIC and is logged on TCP.
    pub fn close(&self, reason: &str) {
        match &*self.inner {
            Inner::Quic(c) => c.close(0u32.into(), reason.as_bytes()),
            Inner::Tcp(y) => y.close.cancel(),
        }
    }

    /// Resolves when the link is closed, by either side or by a failure.
    pub async fn closed(&self) {
        match &*self.inner {
            Inner::Quic(c) => {
                c.closed().await;
            }
            Inner::Tcp(y) => y.dead.cancelled().await,
        }
    }

    /// Wraps an established QUIC connection, checking its ALPN and peer key.
    pub fn from_quic(conn: quinn::Connection, alpn: &[u8]) -> Result<Self, LinkError> {
        let addr = conn.remote_address();
        let negotiated = conn
            .handshake_data()
            .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|d| d.protocol);
        if negotiated.as_deref() != Some(alpn) {
            conn.close(0u32.into(), b"wrong ALPN");
            return Err(LinkError::WrongAlpn {
                addr,
                expected: String::from_utf8_lossy(alpn).into_owned(),
            });
        }
        let peer = tls::quic_peer_id(&conn).ok_or(LinkError::NoIdentity { addr })?;
        Ok(Link {
            inner: Arc::new(Inner::Quic(conn)),
            peer,
            remote: addr,
        })
    }
}

/// QUIC transport settings for relay links: keepalives well inside NAT timeouts, and an
/// idle timeout that only fires when the peer is really gone.
pub fn relay_transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEPALIVE_INTERVAL));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(LINK_IDLE_TIMEOUT).unwrap_or(quinn::VarInt::MAX.into()),
    ));
    t.max_concurrent_bidi_streams(MAX_STREAMS_PER_LINK.into());
    t.max_concurrent_uni_streams(0u32.into());
    t
}

/// Dials a relay (or any Ferry server) over QUIC from `endpoint`.
pub async fn connect_quic(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    client: rustls::ClientConfig,
    alpn: &[u8],
) -> Result<Link, LinkError> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(client).map_err(|e| {
        LinkError::Handshake {
            addr,
            why: e.to_string(),
        }
    })?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(relay_transport_config()));
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
        quinn::ConnectionError::ConnectionClosed(c) => String::from_utf8_lossy(&c.reason).into_owned(),
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

fn yamux_config() -> yamux::Config {
    let mut config = yamux::Config::default();
    // Bound what one peer can make us buffer: every stream keeps yamux's 256 KiB
    // default window, and the whole link at most the sum of those.
    config.set_max_num_streams(MAX_STREAMS_PER_LINK as usize);
    config.set_max_connection_receive_window(Some(MAX_STREAMS_PER_LINK as usize * 256 * 1024));
    config
}

/// Dials a Ferry server over TLS on TCP.
pub async fn connect_tcp(
    addr: SocketAddr,
    client: rustls::ClientConfig,
    alpn: &[u8],
) -> Result<Link, LinkError> {
    let attempt = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| LinkError::Connect { addr, source })?;
        tune_tcp(&tcp);
        let name = rustls::pki_types::ServerName::try_from(tls::SERVER_NAME)
            .map_err(|e| LinkError::Handshake {
                addr,
                why: e.to_string(),
            })?
            .to_owned();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(client))
            .connect(name, tcp)
            .await
            .map_err(|e| LinkError::Handshake {
                addr,
                why: e.to_string(),
            })?;
        let (_, session) = tls.get_ref();
        if session.alpn_protocol() != Some(alpn) {
            return Err(LinkError::WrongAlpn {
                addr,
                expected: String::from_utf8_lossy(alpn).into_owned(),
            });
        }
        let peer = tls::peer_node_id(session.peer_certificates())
            .ok_or(LinkError::NoIdentity { addr })?;
        Ok(spawn_yamux(
            tokio_rustls::TlsStream::Client(tls),
            yamux::Mode::Client,
            peer,
            addr,
        ))
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, attempt)
        .await
        .map_err(|_| LinkError::HandshakeTimeout {
            addr,
            secs: HANDSHAKE_TIMEOUT.as_secs(),
        })?
}

/// Completes the server side of a TLS-over-TCP link on an accepted socket.
pub async fn accept_tcp(
    tcp: TcpStream,
    acceptor: &tokio_rustls::TlsAcceptor,
    alpn: &[u8],
) -> Result<Link, LinkError> {
    let addr = tcp
        .peer_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    tune_tcp(&tcp);
    let attempt = async {
        let tls = acceptor
            .accept(tcp)
            .await
            .map_err(|e| LinkError::Handshake {
                addr,
                why: e.to_string(),
            })?;
        let (_, session) = tls.get_ref();
        if session.alpn_protocol() != Some(alpn) {
            return Err(LinkError::WrongAlpn {
                addr,
                expected: String::from_utf8_lossy(alpn).into_owned(),
            });
        }
        let peer = tls::peer_node_id(session.peer_certificates())
            .ok_or(LinkError::NoIdentity { addr })?;
        Ok(spawn_yamux(
            tokio_rustls::TlsStream::Server(tls),
            yamux::Mode::Server,
            peer,
            addr,
        ))
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, attempt)
        .await
        .map_err(|_| LinkError::HandshakeTimeout {
            addr,
            secs: HANDSHAKE_TIMEOUT.as_secs(),
        })?
}

fn spawn_yamux(
    io: tokio_rustls::TlsStream<TcpStream>,
    mode: yamux::Mode,
    peer: NodeId,
    remote: SocketAddr,
) -> Link {
    let (open_tx, open_rx) = mpsc::channel(16);
    let (in_tx, in_rx) = mpsc::channel(INBOUND_BACKLOG);
    let link = Arc::new(YamuxLink {
        open: open_tx,
        inbound: Mutex::new(in_rx),
        close: CancellationToken::new(),
        dead: CancellationToken::new(),
    });
    let conn = yamux::Connection::new(io.compat(), yamux_config(), mode);
    tokio::spawn(drive_yamux(
        conn,
        open_rx,
        in_tx,
        link.close.clone(),
        link.dead.clone(),
    ));
    Link {
        inner: Arc::new(Inner::Tcp(link)),
        peer,
        remote,
    }
}

/// Owns a yamux connection: serves open requests, hands out inbound streams, and keeps
/// polling so that every stream's I/O makes progress.
async fn drive_yamux<T>(
    mut conn: yamux::Connection<T>,
    mut open_rx: mpsc::Receiver<OpenReply>,
    inbound: mpsc::Sender<yamux::Stream>,
    close: CancellationToken,
    dead: CancellationToken,
) where
    T: futures::AsyncRead + futures::AsyncWrite + Unpin,
{
    let mut pending: Option<OpenReply> = None;
    let mut close_requested = pin!(close.cancelled());
    let outcome = poll_fn(|cx| {
        if close_requested.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Ok(()));
        }
        loop {
            match pending.take() {
                Some(reply) => match conn.poll_new_outbound(cx) {
                    Poll::Ready(result) => {
                        let _ = reply.send(result.map_err(closed_err));
                    }
                    Poll::Pending => {
                        pending = Some(reply);
                        break;
                    }
                },
                None => match open_rx.poll_recv(cx) {
                    Poll::Ready(Some(reply)) => pending = Some(reply),
                    // Every `Link` handle is gone: nobody can use this session any more.
                    Poll::Ready(None) => return Poll::Ready(Ok(())),
                    Poll::Pending => break,
                },
            }
        }
        loop {
            match conn.poll_next_inbound(cx) {
                Poll::Ready(Some(Ok(stream))) => {
                    // A full backlog means the application is not accepting; dropping
                    // the stream resets it, which the peer sees as a refusal.
                    let _ = inbound.try_send(stream);
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await;
    if let Err(e) = outcome {
        tracing::debug!("yamux link ended: {e}");
    }
    let _ = tokio::time::timeout(CLOSE_GRACE, poll_fn(|cx| conn.poll_close(cx))).await;
    dead.cancel();
}
