//! End-to-end connections between shims: one QUIC connection per pair of nodes, over
//! the [`PathSocket`], authenticated by node ID on both sides (raw-key TLS 1.3) so
//! the relay in between only ever sees ciphertext.
//!
//! One connection carries streams both ways: each side serves the other's streams
//! (`serve_connection`) when its [`AllowList`](crate::allow::AllowList) lets the other
//! in — listed, `allow_any`, or, with `allow_grid`, a grid member that proved it in its
//! [`PeerHello`], the one unidirectional stream each side opens first. A peer that
//! dialled and is not allowed has the connection closed with a reason that names the
//! fix; a peer this node dialled that may not use its services has just its streams
//! refused. The list can change at run time (the panel's buttons, a relay's
//! `Control::Grid` with a revocation): a peer denied or revoked then loses its live
//! connection at once. Refusals either way are kept for status.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use ferry_proto::frame::{self, PeerHello, PeerOpen, PeerOpenReply};
use ferry_proto::limits::{KEEPALIVE_INTERVAL, LINK_IDLE_TIMEOUT};
use ferry_proto::link::{Stream, describe_quic_error};
use ferry_proto::stall::{self, Silence};
use ferry_proto::sync::lock;
use ferry_proto::tls::{self, ALPN_PEER};
use ferry_proto::{NodeId, SecretKey};

use crate::allow::{Decision, NotAllowed, SharedAllow};
use crate::path_manager::PathManager;
use crate::path_socket::PathSocket;
use crate::paths::Route;
use crate::status::{Direction, PathKind, PeerAccess, PeerStatus, RefusalStatus};

/// How long dialling a peer through the relay may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a stream's opening exchange (header and reply) may take.
pub const STREAM_SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Concurrent streams one peer may open to us; matches the relay link's limit.
const MAX_PEER_STREAMS: u32 = 1024;

/// QUIC application error code sent when a peer is not allowed.
pub const CLOSE_NOT_ALLOWED: u32 = 0x46_01;

/// How long a peer that must prove grid membership has to send its hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// How many refusals status keeps (the newest; one per peer and direction).
const REFUSALS_KEPT: usize = 16;

/// What serves a peer's stream request: the shim's services.
pub type ServeFn =
    Arc<dyn Fn(NodeId, PeerOpen, Stream) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEPALIVE_INTERVAL));
    // A connection silent for `LINK_IDLE_TIMEOUT` of awake time is closed by
    // `close_when_silent`; QUIC's own timer, which a frozen host would trip on waking,
    // is only the backstop.
    t.max_idle_timeout(Some(stall::quic_idle_backstop()));
    t.max_concurrent_bidi_streams(MAX_PEER_STREAMS.into());
    // The hello, and nothing after it.
    t.max_concurrent_uni_streams(1u32.into());
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
    /// Who may use this node's services.
    allow: SharedAllow,
    /// What this node proves of itself on every connection.
    hello: PeerHello,
    /// The shim's services, once `accept_loop` runs.
    serve: OnceLock<ServeFn>,
    conns: DashMap<NodeId, quinn::Connection>,
    /// How each connected peer was let in (or why not), for status.
    access: DashMap<NodeId, PeerAccess>,
    dialing: DashMap<NodeId, Arc<tokio::sync::Mutex<()>>>,
    refusals: Mutex<VecDeque<RefusalStatus>>,
    /// Called when a peer without a connection is dialled: looks for it among the
    /// fleet's relays (`crate::visits`), beside the dial.
    finder: OnceLock<Finder>,
    /// Why a peer cannot be reached, when the fleet said (for the dial's error).
    unreachable: DashMap<NodeId, String>,
}

/// See [`Overlay::set_finder`].
pub type Finder = Box<dyn Fn(NodeId) + Send + Sync>;

impl Overlay {
    pub fn new(
        key: &SecretKey,
        socket: Arc<PathSocket>,
        paths: Arc<PathManager>,
        allow: SharedAllow,
        hello: PeerHello,
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
            allow,
            hello,
            serve: OnceLock::new(),
            conns: DashMap::new(),
            access: DashMap::new(),
            dialing: DashMap::new(),
            refusals: Mutex::new(VecDeque::new()),
            finder: OnceLock::new(),
            unreachable: DashMap::new(),
        })
    }

    /// Keeps `reason` for status: the newest first, one per peer and direction.
    fn note_refusal(&self, peer: NodeId, direction: Direction, reason: String) {
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut refusals = lock(&self.refusals);
        refusals.retain(|r| !(r.node_id == peer && r.direction == direction));
        refusals.push_front(RefusalStatus {
            node_id: peer,
            direction,
            reason,
            at,
        });
        refusals.truncate(REFUSALS_KEPT);
    }

    /// Sets what is called when a peer without a connection is dialled (once).
    pub fn set_finder(&self, finder: Finder) {
        let _ = self.finder.set(finder);
    }

    /// The peer cannot be reached, and why (shown in status and in the error of a
    /// dial that times out); `None` clears it.
    pub fn note_unreachable(&self, peer: NodeId, why: Option<String>) {
        match why {
            Some(why) => {
                self.note_refusal(peer, Direction::Outbound, why.clone());
                if self.unreachable.len() < REFUSALS_KEPT * 16 {
                    self.unreachable.insert(peer, why);
                }
            }
            None => {
                self.unreachable.remove(&peer);
            }
        }
    }

    /// True while this node has a live overlay connection to `peer`.
    pub fn has_connection(&self, peer: &NodeId) -> bool {
        self.live(peer).is_some()
    }

    /// The latest refusals, newest first.
    pub fn refusals(&self) -> Vec<RefusalStatus> {
        lock(&self.refusals).iter().cloned().collect()
    }

    fn live(&self, peer: &NodeId) -> Option<quinn::Connection> {
        self.conns
            .get(peer)
            .map(|c| c.clone())
            .filter(|c| c.close_reason().is_none())
    }

    /// The connection to `peer`, dialling it if there is none.
    pub async fn connection(self: &Arc<Self>, peer: NodeId) -> Result<quinn::Connection, String> {
        // Start looking for a direct path at once; the connection starts relayed.
        self.paths.want(peer, false);
        if let Some(conn) = self.live(&peer) {
            return Ok(conn);
        }
        if let Some(find) = self.finder.get() {
            find(peer);
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
            .map_err(|_| match self.unreachable.get(&peer) {
                Some(why) => format!("node {peer} cannot be reached: {}", *why),
                None => format!(
                    "node {peer} did not answer through the relay within {} s; is it connected to the same relay (or to a relay of the same fleet)?",
                    DIAL_TIMEOUT.as_secs()
                ),
            })?
            .map_err(|e| describe_quic_error(&e))?;
        close_when_silent(conn.clone());
        self.conns.insert(peer, conn.clone());
        tokio::spawn(self.clone().serve_connection(conn.clone(), peer, false));
        Ok(conn)
    }

    /// Opens a stream to `service` (or the default one) on `peer`.
    pub async fn open(
        self: &Arc<Self>,
        peer: NodeId,
        service: Option<String>,
    ) -> Result<Stream, OpenError> {
        let opened = self.open_stream(peer, service).await;
        if let Err(OpenError::NotAllowed(why)) = &opened {
            self.note_refusal(peer, Direction::Outbound, why.clone());
        }
        opened
    }

    async fn open_stream(
        self: &Arc<Self>,
        peer: NodeId,
        service: Option<String>,
    ) -> Result<Stream, OpenError> {
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
                Some(e) if reply.not_allowed => Err(OpenError::NotAllowed(e)),
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

    /// Accepts incoming connections and serves every peer's streams with `serve`
    /// (on connections this node dialled too), as the allow list says.
    pub async fn accept_loop<F, Fut>(self: Arc<Self>, serve: F)
    where
        F: Fn(NodeId, PeerOpen, Stream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let serve: ServeFn =
            Arc::new(move |peer, open, stream| Box::pin(serve(peer, open, stream)));
        let _ = self.serve.set(serve);
        while let Some(incoming) = self.endpoint.accept().await {
            let overlay = self.clone();
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
                overlay.serve_connection(conn, peer, true).await;
            });
        }
    }

    /// Says who this node is (its hello), decides whether `peer` may use this node's
    /// services, and serves its streams for as long as the connection lives and the
    /// answer stays yes. `accepted`: the peer dialled; refused, it loses the
    /// connection. On a connection this node dialled, a refused peer's streams are
    /// refused one by one, and this node's own streams go on.
    async fn serve_connection(
        self: Arc<Self>,
        conn: quinn::Connection,
        peer: NodeId,
        accepted: bool,
    ) {
        let hello_out = conn.clone();
        let own_hello = self.hello.clone();
        tokio::spawn(async move {
            // A peer that takes no hello (an older shim) just never reads it.
            if let Ok(mut send) = hello_out.open_uni().await {
                let _ = frame::write_header(&mut send, &own_hello).await;
                let _ = send.finish();
            }
        });
        // Watch before deciding, so that no change slips in between.
        let mut changes = self.allow.changes();
        let mut hello = None;
        let mut decision = self.allow.snapshot().decide(&peer, None, SystemTime::now());
        if decision == Decision::NeedHello {
            hello = Some(read_hello(&conn).await);
            decision = self
                .allow
                .snapshot()
                .decide(&peer, hello.as_ref(), SystemTime::now());
        }
        let mut admitted = self.take_decision(&conn, peer, decision, accepted);
        if accepted {
            if admitted.is_err() {
                self.access.remove(&peer);
                return;
            }
            tracing::info!("overlay connection from node {peer}");
            close_when_silent(conn.clone());
            self.conns.insert(peer, conn.clone());
            self.paths.want(peer, true);
        }
        loop {
            let expiry = match self.access.get(&peer).as_deref() {
                Some(PeerAccess::Member { expires, .. }) => {
                    let at = UNIX_EPOCH + Duration::from_secs(*expires);
                    at.duration_since(SystemTime::now()).unwrap_or_default()
                }
                _ => Duration::MAX,
            };
            // Waiting for a stream and for a change at once is safe: quinn hands out
            // a stream only when `accept_bi` returns.
            let accepted_stream = tokio::select! {
                accepted_stream = conn.accept_bi() => accepted_stream,
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let decision = self.allow.snapshot().decide(&peer, hello.as_ref(), SystemTime::now());
                    admitted = self.take_decision(&conn, peer, decision, accepted);
                    continue;
                }
                () = tokio::time::sleep(expiry) => {
                    let decision = self.allow.snapshot().decide(&peer, hello.as_ref(), SystemTime::now());
                    admitted = self.take_decision(&conn, peer, decision, accepted);
                    continue;
                }
            };
            let (mut send, mut recv) = match accepted_stream {
                Ok(s) => s,
                Err(e) => {
                    tracing::info!(
                        "overlay connection with node {peer} ended: {}",
                        describe_quic_error(&e)
                    );
                    // Forget it unless a newer connection took its place.
                    let gone = self
                        .conns
                        .remove_if(&peer, |_, c| c.stable_id() == conn.stable_id());
                    if gone.is_some() {
                        self.access.remove(&peer);
                    }
                    return;
                }
            };
            let serve = self.serve.get().cloned();
            let refusal = admitted.clone().err();
            tokio::spawn(async move {
                let request = tokio::time::timeout(
                    STREAM_SETUP_TIMEOUT,
                    frame::read_header::<_, PeerOpen>(&mut recv),
                )
                .await;
                let open = match request {
                    Ok(Ok(open)) => open,
                    Ok(Err(e)) => return tracing::info!("bad stream request from {peer}: {e}"),
                    Err(_) => return tracing::info!("stream request from {peer} timed out"),
                };
                let (refusal, not_allowed) = match (refusal, serve) {
                    (None, Some(serve)) => return serve(peer, open, Stream::new(recv, send)).await,
                    (Some(why), _) => (why.to_string(), true),
                    (None, None) => ("this node serves no overlay streams yet".to_string(), false),
                };
                let reply = PeerOpenReply {
                    error: Some(refusal),
                    not_allowed,
                };
                let _ = frame::write_header(&mut send, &reply).await;
            });
        }
    }

    /// Carries out a decision about `peer` on `conn`: records how it was let in or
    /// why not, and closes the connection when the peer must not keep it.
    fn take_decision(
        &self,
        conn: &quinn::Connection,
        peer: NodeId,
        decision: Decision,
        accepted: bool,
    ) -> Result<PeerAccess, NotAllowed> {
        let why = match decision {
            Decision::Admit(access) => {
                if let PeerAccess::Member { expires, .. } = &access {
                    self.allow.note_member(peer, *expires);
                }
                self.access.insert(peer, access.clone());
                return Ok(access);
            }
            Decision::Refuse(why) => why,
            // Decided only after the hello was read.
            Decision::NeedHello => NotAllowed::NoCertificate {
                peer,
                me: self.allow.me(),
            },
        };
        let was = self.access.insert(
            peer,
            PeerAccess::NotAllowed {
                reason: why.to_string(),
            },
        );
        let news = !matches!(was, Some(PeerAccess::NotAllowed { .. }));
        if news {
            tracing::warn!("refused overlay connection: {why}");
            self.note_refusal(peer, Direction::Inbound, why.to_string());
        }
        if accepted || why.shut_out() {
            conn.close(CLOSE_NOT_ALLOWED.into(), why.to_string().as_bytes());
        }
        Err(why)
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
                    access: self.access.get(&node_id).map(|a| a.clone()),
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

/// Reads the peer's hello: its first unidirectional stream, within `HELLO_TIMEOUT`.
/// A peer that sends none, or garbage, proves nothing.
async fn read_hello(conn: &quinn::Connection) -> PeerHello {
    let read = async {
        let mut recv = conn.accept_uni().await.ok()?;
        frame::read_header::<_, PeerHello>(&mut recv).await.ok()
    };
    match tokio::time::timeout(HELLO_TIMEOUT, read).await {
        Ok(Some(hello)) => hello,
        _ => PeerHello::default(),
    }
}
