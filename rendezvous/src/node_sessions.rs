//! Node sessions of the standalone `ferry-rendezvous`: nodes dial it the way they dial
//! a relay (a `ferry://<id>@host:port` URL, QUIC, ALPN `ferry/1`, raw-key TLS with the
//! rendezvous's key pinned), open one session stream, `Register` with no services, and
//! then publish and look up path records and ask for punches. The messages are
//! answered by the same [`Rendezvous`] the relay embeds.
//!
//! QUIC only, no TLS-over-TCP fallback: a node whose UDP is blocked cannot use a
//! direct path, so a rendezvous has nothing to offer it. Overlay packets are not
//! carried (this is not a relay); a node that sends one is told so and dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use ferry_proto::frame::{self, Control, ErrorCode, Frame, ServiceGrant};
use ferry_proto::limits::{HANDSHAKE_TIMEOUT, LINK_IDLE_TIMEOUT};
use ferry_proto::link::{self, Link};
use ferry_proto::stall::Silence;
use ferry_proto::tls::{self, ALPN_RELAY};
use ferry_proto::{NodeId, SecretKey};
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::coordinator::SessionInfo;
use crate::sessions::Rendezvous;

/// Frames queued for one node; rendezvous traffic is a few small messages.
const SESSION_QUEUE: usize = 64;

/// Handshakes in progress at once (as on the relay).
const MAX_PENDING_HANDSHAKES: usize = 4096;

/// How long a new link may take to open its session stream.
const SESSION_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

struct Session {
    number: u64,
    link: Link,
    tx: frame::FrameSender,
}

/// The live node sessions and what answers them.
pub struct NodeSessions {
    rendezvous: Arc<Rendezvous>,
    stun_port: u16,
    sessions: DashMap<NodeId, Session>,
    next: AtomicU64,
    handshakes: Arc<Semaphore>,
}

/// Binds the QUIC endpoint for node sessions on `listen`.
pub fn bind(key: &SecretKey, listen: SocketAddr) -> anyhow::Result<quinn::Endpoint> {
    let crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(tls::server_config(key, ALPN_RELAY)?)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(link::relay_server_transport_config()));
    let bind_err = |e: std::io::Error| {
        anyhow::anyhow!(
            "cannot listen for node sessions on UDP {listen}: {e}; pick another --listen address"
        )
    };
    let udp = ferry_proto::net::bind_udp(listen, "node sessions").map_err(bind_err)?;
    link::size_udp_buffers(&udp, link::SERVER_UDP_BUFFER, "rendezvous");
    quinn::Endpoint::new(
        link::restart_safe_endpoint_config(key, b"ferry-rendezvous quic stateless reset key v1"),
        Some(server),
        udp,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(bind_err)
}

impl NodeSessions {
    pub fn new(rendezvous: Arc<Rendezvous>, stun_port: u16) -> Arc<Self> {
        Arc::new(NodeSessions {
            rendezvous,
            stun_port,
            sessions: DashMap::new(),
            next: AtomicU64::new(1),
            handshakes: Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES)),
        })
    }

    /// Nodes with a live session.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Accepts node links until `shutdown`.
    pub async fn serve(self: Arc<Self>, endpoint: quinn::Endpoint, shutdown: CancellationToken) {
        loop {
            let incoming = tokio::select! {
                i = endpoint.accept() => match i {
                    Some(i) => i,
                    None => return,
                },
                _ = shutdown.cancelled() => {
                    endpoint.close(0u32.into(), b"rendezvous shutting down");
                    return;
                }
            };
            let Ok(permit) = self.handshakes.clone().try_acquire_owned() else {
                incoming.refuse();
                continue;
            };
            let this = self.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                let handshake = async {
                    let conn = incoming.await.map_err(|e| link::describe_quic_error(&e))?;
                    Link::from_quic(conn, ALPN_RELAY).map_err(|e| e.to_string())
                };
                let result = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
                    .await
                    .unwrap_or_else(|_| Err("handshake timed out".into()));
                drop(permit);
                match result {
                    Ok(link) => this.run_session(link).await,
                    Err(why) => tracing::info!("handshake from {remote} failed: {why}"),
                }
            });
        }
    }

    async fn run_session(self: Arc<Self>, link: Link) {
        let node = link.peer_id();
        let remote = link.remote_addr();
        let stream = match tokio::time::timeout(SESSION_OPEN_TIMEOUT, link.accept()).await {
            Ok(Ok(s)) => s,
            _ => {
                link.close("no session stream opened");
                return;
            }
        };
        let mut reader = frame::session_reader(stream.recv);
        let (tx, rx) = frame::frame_queue(SESSION_QUEUE);
        let writer = tokio::spawn(frame::pump_frames(rx, stream.send));
        let number = self.next.fetch_add(1, Ordering::Relaxed);
        if let Some(old) = self.sessions.insert(
            node,
            Session {
                number,
                link: link.clone(),
                tx: tx.clone(),
            },
        ) {
            let _ = old.tx.try_send(Frame::Control(Control::Error {
                code: ErrorCode::Replaced,
                message: format!(
                    "another connection with node key {node} reached the rendezvous (from {remote}); only one process may use a node key"
                ),
            }));
            old.link
                .close("replaced by a newer connection with the same node key");
        }
        tracing::info!("node {node} connected from {remote}");
        // Time this process spent frozen does not count as the node's silence.
        let mut silence = Silence::new(LINK_IDLE_TIMEOUT, std::time::Instant::now());
        let idle = tokio::time::sleep_until(silence.deadline().into());
        tokio::pin!(idle);
        let ended = loop {
            let next = tokio::select! {
                n = reader.next() => Ok(n),
                () = &mut idle => Err(silence.recheck(std::time::Instant::now())),
                _ = link.closed() => break "link closed".to_string(),
            };
            let frame = match next {
                Err(Some(again)) => {
                    idle.as_mut().reset(again.into());
                    continue;
                }
                Err(None) => break format!("silent for {} s", LINK_IDLE_TIMEOUT.as_secs()),
                Ok(None) => break "session stream closed".to_string(),
                Ok(Some(Err(e))) => {
                    let _ = tx
                        .send_async(Frame::Control(Control::Error {
                            code: ErrorCode::Protocol,
                            message: e.to_string(),
                        }))
                        .await;
                    break format!("protocol error: {e}");
                }
                Ok(Some(Ok(f))) => {
                    silence.heard(std::time::Instant::now());
                    f
                }
            };
            match frame {
                Frame::Control(Control::Register { services, .. }) => {
                    // Not a relay: every service is answered with the reason.
                    let grants = services
                        .into_iter()
                        .map(|s| ServiceGrant {
                            name: s.name,
                            public_addr: None,
                            public_port: None,
                            error: Some(
                                "this is a rendezvous, not a relay: it carries no services".into(),
                            ),
                        })
                        .collect();
                    let reply = Control::Registered {
                        node_id: node,
                        observed_addr: remote,
                        services: grants,
                        rendezvous: true,
                        stun_port: Some(self.stun_port),
                        channel: None,
                    };
                    if tx.send_async(Frame::Control(reply)).await.is_err() {
                        break "session writer gone".into();
                    }
                }
                Frame::Control(Control::Ping { nonce }) => {
                    let _ = tx.send_async(Frame::Control(Control::Pong { nonce })).await;
                }
                Frame::Control(Control::Pong { .. }) => {}
                Frame::Control(msg) if Rendezvous::handles(&msg) => {
                    let sessions = |n: &NodeId| {
                        self.sessions.get(n).map(|s| {
                            let info = SessionInfo {
                                rtt: Some(s.link.rtt()),
                                observed_addr: s.link.remote_addr(),
                            };
                            (info, s.tx.clone())
                        })
                    };
                    if !self.rendezvous.answer(node, msg, &tx, sessions).await {
                        break "session writer gone".into();
                    }
                }
                Frame::Control(Control::Error { code, message }) => {
                    break format!("node reported {code:?}: {message}");
                }
                other => {
                    let what = match other {
                        Frame::Packet { .. } => "an overlay packet".to_string(),
                        Frame::Control(c) => format!("{c:?}"),
                    };
                    let message =
                        format!("this is a rendezvous, not a relay: it does not accept {what}");
                    let _ = tx
                        .send_async(Frame::Control(Control::Error {
                            code: ErrorCode::Protocol,
                            message: message.clone(),
                        }))
                        .await;
                    break message;
                }
            }
        };
        tracing::info!("node {node} at {remote} disconnected: {ended}");
        self.sessions.remove_if(&node, |_, s| s.number == number);
        drop(tx);
        // Let the writer deliver a last error before the link goes.
        let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
        link.close("session ended");
    }
}
