//! End-to-end connections between shims: one QUIC connection per pair of nodes, over
//! the [`PathSocket`], authenticated by node ID on both sides (raw-key TLS 1.3) so
//! the relay in between only ever sees ciphertext.
//!
//! The exposing side decides who may connect: its allow list (plus itself), or anyone
//! with `allow_any`. A peer that is not allowed has its connection closed with a reason
//! that names the fix, which the dialing side reports. The list can change at run time
//! (`crate::allow`, the web panel's buttons); a peer denied then loses its live
//! connection at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use ferry_proto::frame::{self, PeerOpen, PeerOpenReply};
use ferry_proto::limits::{KEEPALIVE_INTERVAL, LINK_IDLE_TIMEOUT};
use ferry_proto::link::{Stream, describe_quic_error};
use ferry_proto::stall::{self, Silence};
use ferry_proto::tls::{self, ALPN_PEER};
use ferry_proto::{NodeId, SecretKey};

use crate::allow::SharedAllow;
use crate::path_manager::PathManager;
use crate::path_socket::PathSocket;
use crate::paths::Route;
use crate::status::{PathKind, PeerStatus};

/// How long dialling a peer through the relay may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a stream's opening exchange (header and reply) may take.
pub const STREAM_SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Concurrent streams one peer may open to us; matches the relay link's limit.
const MAX_PEER_STREAMS: u32 = 1024;

/// QUIC application error code sent when a peer is not allowed.
pub const CLOSE_NOT_ALLOWED: u32 = 0x46_01;

fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEPALIVE_INTERVAL));
    // A connection silent for `LINK_IDLE_TIMEOUT` of awake time is closed by
    // `close_when_silent`; QUIC's own timer, which a frozen host would trip on waking,
    // is only the backstop.
    t.max_idle_timeout(Some(stall::quic_idle_backstop()));
    t.max_concurrent_bidi_streams(MAX_PEER_STREAMS.into());
    t.max_concurrent_uni_streams(0u32.into());
    // Larger packets mean fewer of everything per byte (system calls, encryptions,
    // relay forwards): +15% on a direct path. The path under a connection moves
    // between relay and direct, so the ceiling is what still fits one QUIC DATAGRAM on
    // a relay link over a 1500-byte network; larger ones would not break a relayed
    // path (they go as frames) but would lose the datagram fast path. A direct path
    // smaller than a size found earlier is caught by quinn's black-hole detection,
    // which drops back to 1200 bytes and probes again.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(OVERLAY_MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtu));
    t
}

/// Closes `conn` once nothing has arrived on it for `LINK_IDLE_TIMEOUT` of the time this
/// process was running (the peer sends keepalives every `KEEPALIVE_INTERVAL`), so a
/// dead peer's connection ends about as soon as QUIC's idle timer used to end it, and a
/// host that was frozen for a while keeps its connections.
fn close_when_silent(conn: quinn::Connection) {
    tokio::spawn(async move {
        let received = || conn.stats().udp_rx.datagrams;
        let mut heard = received();
        let mut silence = Silence::new(LINK_IDLE_TIMEOUT, Instant::now());
        loop {
            tokio::select! {
                _ = conn.closed() => return,
                () = tokio::time::sleep(KEEPALIVE_INTERVAL) => {}
            }
            let now = Instant::now();
            let count = received();
            if count != heard {
                heard = count;
                silence.heard(now);
            } else if silence.recheck(now).is_none() {
                conn.close(
                    0u32.into(),
                    format!("silent for {} s", LINK_IDLE_TIMEOUT.as_secs()).as_bytes(),
                );
                return;
            }
        }
    });
}

/// Largest end-to-end QUIC packet: quinn's default relay-link ceiling (1452-byte UDP
/// payloads, a 1500-byte IPv4 network) less a short header with an 8-byte connection
/// ID, the AEAD tag, the DATAGRAM frame's bound and `frame::DATAGRAM_OVERHEAD`.
pub const OVERLAY_MAX_UDP_PAYLOAD: u16 = 1452 - (1 + 8 + 4 + 16) - 9 - 33;

/// Why a stream to a peer could not be opened. Each says what happened in words (its
/// `Display`); the kind lets a caller answer in its own terms (the SOCKS door's reply
/// codes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// No connection to the peer: it did not answer, or could not be dialled.
    #[error("{0}")]
    Unreachable(String),
    /// The peer closed the connection because it does not allow this node.
    #[error("{0}")]
    NotAllowed(String),
    /// The peer refused the stream: no such service, or its local service is down.
    #[error("{0}")]
    Refused(String),
    /// The peer did not answer the stream request in time.
    #[error("{0}")]
    TimedOut(String),
}

impl OpenError {
    /// The error for a connection that ended: refused by the peer's allow list, or
    /// lost.
    fn from_close(e: &quinn::ConnectionError) -> Self {
        let why = describe_quic_error(e);
        match e {
            quinn::ConnectionError::ApplicationClosed(close)
                if close.error_code == quinn::VarInt::from_u32(CLOSE_NOT_ALLOWED) =>
            {
                OpenError::NotAllowed(why)
            }
            _ => OpenError::Unreachable(why),
        }
    }
}

pub struct Overlay {
    pub socket: Arc<PathSocket>,
    /// The shim's one QUIC endpoint: overlay connections and relay links.
    pub endpoint: quinn::Endpoint,
    pub paths: Arc<PathManager>,
    key: SecretKey,
    conns: DashMap<NodeId, quinn::Connection>,
    dialing: DashMap<NodeId, Arc<tokio::sync::Mutex<()>>>,
}

impl Overlay {
    pub fn new(
        key: &SecretKey,
        socket: Arc<PathSocket>,
        paths: Arc<PathManager>,
    ) -> anyhow::Result<Self> {
        let crypto =
            quinn::crypto::rustls::QuicServerConfig::try_from(tls::server_config(key, ALPN_PEER)?)?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(Arc::new(transport()));
        // Relays and peers must always set QUIC's fixed bit on packets to this socket:
        // relay-channel packets are told apart by it being clear (`ferry_proto::channel`).
        let mut endpoint_config = quinn::EndpointConfig::default();
        endpoint_config.grease_quic_bit(false);
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            endpoint_config,
            Some(server),
            socket.clone(),
            Arc::new(quinn::TokioRuntime),
        )?;
        Ok(Overlay {
            socket,
            endpoint,
            paths,
            key: key.clone(),
            conns: DashMap::new(),
            dialing: DashMap::new(),
        })
    }

    fn live(&self, peer: &NodeId) -> Option<quinn::Connection> {
        self.conns
            .get(peer)
            .map(|c| c.clone())
            .filter(|c| c.close_reason().is_none())
    }

    /// The connection to `peer`, dialling it if there is none.
    pub async fn connection(&self, peer: NodeId) -> Result<quinn::Connection, String> {
        // Start looking for a direct path at once; the connection starts relayed.
        self.paths.want(peer, false);
        if let Some(conn) = self.live(&peer) {
            return Ok(conn);
        }
        let lock = self.dialing.entry(peer).or_default().clone();
        let _one_dial_at_a_time = lock.lock().await;
        if let Some(conn) = self.live(&peer) {
            return Ok(conn);
        }
        let addr = self
            .socket
            .peers
            .addr_of(peer)
            .ok_or("too many overlay peers are tracked; try again later")?;
        let client =
            tls::client_config(&self.key, peer, ALPN_PEER, "peer").map_err(|e| e.to_string())?;
        let crypto =
            quinn::crypto::rustls::QuicClientConfig::try_from(client).map_err(|e| e.to_string())?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(Arc::new(transport()));
        let connecting = self
            .endpoint
            .connect_with(config, addr, tls::SERVER_NAME)
            .map_err(|e| e.to_string())?;
        let conn = tokio::time::timeout(DIAL_TIMEOUT, connecting)
            .await
            .map_err(|_| {
                format!(
                    "node {peer} did not answer through the relay within {} s; is it connected to the same relay?",
                    DIAL_TIMEOUT.as_secs()
                )
            })?
            .map_err(|e| describe_quic_error(&e))?;
        close_when_silent(conn.clone());
        self.conns.insert(peer, conn.clone());
        Ok(conn)
    }

    /// Opens a stream to `service` (or the default one) on `peer`.
    pub async fn open(&self, peer: NodeId, service: Option<String>) -> Result<Stream, OpenError> {
        let conn = self
            .connection(peer)
            .await
            .map_err(OpenError::Unreachable)?;
        // A peer that does not allow this node closes the connection: the open or the
        // answer then fails with its close reason.
        let lost = |e: String| match conn.close_reason() {
            Some(reason) => OpenError::from_close(&reason),
            None => OpenError::Unreachable(e),
        };
        let setup = async {
            let (mut send, mut recv) = conn
                .open_bi()
                .await
                .map_err(|e| OpenError::from_close(&e))?;
            frame::write_header(&mut send, &PeerOpen { service })
                .await
                .map_err(|e| lost(e.to_string()))?;
            let reply: PeerOpenReply = frame::read_header(&mut recv)
                .await
                .map_err(|e| lost(e.to_string()))?;
            match reply.error {
                Some(e) => Err(OpenError::Refused(e)),
                None => Ok(Stream::new(recv, send)),
            }
        };
        tokio::time::timeout(STREAM_SETUP_TIMEOUT, setup)
            .await
            .map_err(|_| {
                OpenError::TimedOut(format!("node {peer} did not answer the stream request"))
            })?
    }

    /// Accepts incoming connections, refusing peers not on `allow`, and hands each
    /// stream's request to `serve`. A peer denied later has its connection closed.
    pub async fn accept_loop<F, Fut>(self: Arc<Self>, allow: SharedAllow, serve: F)
    where
        F: Fn(NodeId, PeerOpen, Stream) -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        while let Some(incoming) = self.endpoint.accept().await {
            let overlay = self.clone();
            let allow = allow.clone();
            let serve = serve.clone();
            tokio::spawn(async move {
                let conn = match incoming.await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::info!("overlay handshake failed: {}", describe_quic_error(&e));
                        return;
                    }
                };
                let Some(peer) = tls::quic_peer_id(&conn) else {
                    conn.close(CLOSE_NOT_ALLOWED.into(), b"no usable node key");
                    return;
                };
                // Watch before checking, so that no change slips in between.
                let mut changes = allow.changes();
                if !allow.allows(&peer) {
                    let reason = format!(
                        "node {peer} is not allowed to connect to node {}; its operator can add --allow {peer}",
                        allow.me()
                    );
                    tracing::warn!("refused overlay connection: {reason}");
                    conn.close(CLOSE_NOT_ALLOWED.into(), reason.as_bytes());
                    return;
                }
                tracing::info!("overlay connection from node {peer}");
                close_when_silent(conn.clone());
                overlay.conns.insert(peer, conn.clone());
                overlay.paths.want(peer, true);
                loop {
                    // Waiting for a stream and for a change of the allow list at once
                    // is safe: quinn hands out a stream only when `accept_bi` returns.
                    let accepted = tokio::select! {
                        accepted = conn.accept_bi() => accepted,
                        Ok(()) = changes.changed() => {
                            if !allow.allows(&peer) {
                                let reason = format!(
                                    "node {peer} is no longer allowed to connect to node {}: its operator denied it",
                                    allow.me()
                                );
                                tracing::warn!("closing overlay connection: {reason}");
                                conn.close(CLOSE_NOT_ALLOWED.into(), reason.as_bytes());
                            }
                            continue;
                        }
                    };
                    let (send, mut recv) = match accepted {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::info!(
                                "overlay connection from node {peer} ended: {}",
                                describe_quic_error(&e)
                            );
                            // Forget it unless a newer connection took its place.
                            overlay
                                .conns
                                .remove_if(&peer, |_, c| c.stable_id() == conn.stable_id());
                            break;
                        }
                    };
                    let serve = serve.clone();
                    tokio::spawn(async move {
                        let request = tokio::time::timeout(
                            STREAM_SETUP_TIMEOUT,
                            frame::read_header::<_, PeerOpen>(&mut recv),
                        )
                        .await;
                        match request {
                            Ok(Ok(open)) => serve(peer, open, Stream::new(recv, send)).await,
                            Ok(Err(e)) => tracing::info!("bad stream request from {peer}: {e}"),
                            Err(_) => tracing::info!("stream request from {peer} timed out"),
                        }
                    });
                }
            });
        }
    }

    /// Status of every live peer connection; `relay_addr` is the relay carrying them.
    pub fn peer_statuses(&self, relay_addr: Option<SocketAddr>) -> Vec<PeerStatus> {
        let mut views: Vec<PeerStatus> = self
            .conns
            .iter()
            .filter(|c| c.value().close_reason().is_none())
            .map(|c| {
                let stats = c.value().stats();
                let node_id = *c.key();
                let view = self.paths.view(&node_id);
                let (path, remote_addr) = match self.socket.route(&node_id) {
                    Route::Direct(addr) => (PathKind::Direct, Some(addr)),
                    Route::Relayed => (PathKind::Relayed, relay_addr),
                };
                PeerStatus {
                    node_id,
                    path,
                    remote_addr,
                    punch: view.punch,
                    reason: view.reason,
                    rtt_ms: c.value().rtt().as_secs_f64() * 1000.0,
                    bytes_sent: stats.udp_tx.bytes,
                    bytes_received: stats.udp_rx.bytes,
                }
            })
            .collect();
        views.sort_by_key(|v| v.node_id);
        views
    }

    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"shim shutting down");
    }
}
