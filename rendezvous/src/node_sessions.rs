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
use std::time::{Duration, Instant};

use ferry_proto::frame::{self, Control, Frame, ServiceGrant, ServiceRequest};
use ferry_proto::limits::HANDSHAKE_TIMEOUT;
use ferry_proto::link::{self, Link};
use ferry_proto::node_session::{self, Effect, Ending, Event, NodeSession, Offers, Timer};
use ferry_proto::registry::Registry;
use ferry_proto::tls::ALPN_RELAY;
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

#[derive(Clone)]
struct Session {
    link: Link,
    tx: frame::FrameSender,
}

/// The live node sessions and what answers them.
pub struct NodeSessions {
    rendezvous: Arc<Rendezvous>,
    stun_port: u16,
    sessions: Registry<Session>,
    handshakes: Arc<Semaphore>,
}

/// Binds the QUIC endpoint for node sessions on `listen`.
pub fn bind(key: &SecretKey, listen: SocketAddr) -> anyhow::Result<quinn::Endpoint> {
    let server = link::quic_server_config(key, ALPN_RELAY)?;
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
            sessions: Registry::default(),
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

    /// Serves one node: feeds what happens on its session to the sans-IO core shared
    /// with the relay (`ferry_proto::node_session`) and carries out what it asks for.
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
        let mut core = NodeSession::new(Offers::RENDEZVOUS, Instant::now());
        let mut session_no = None;
        let timer = tokio::time::sleep_until(core.timeout().into());
        tokio::pin!(timer);
        let ended = loop {
            let event = tokio::select! {
                next = reader.next() => Event::from_read(next),
                () = &mut timer => match core.timer_fired() {
                    Timer::Rearm(next) => {
                        timer.as_mut().reset(next.into());
                        continue;
                    }
                    Timer::End(ending) => break ending,
                },
                _ = link.closed() => Event::Closed("link closed".into()),
            };
            match core.handle(event, Instant::now()) {
                None => {}
                Some(Effect::Admit { services, .. } | Effect::Reregister { services, .. }) => {
                    if !core.is_serving() {
                        // Everyone is admitted: a rendezvous only answers about the
                        // node's own key.
                        core.admitted(Instant::now());
                        session_no = Some(self.admitted(node, remote, &link, &tx));
                        timer.as_mut().reset(core.timeout().into());
                    }
                    if !self.answer_register(node, remote, services, &tx).await {
                        break core.end(Ending::quiet("session writer gone"));
                    }
                }
                Some(Effect::Send(msg)) => {
                    let _ = tx.send_async(Frame::Control(msg)).await;
                }
                Some(Effect::Rendezvous(msg)) => {
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
                        break core.end(Ending::quiet("session writer gone"));
                    }
                }
                Some(Effect::End(ending)) => break ending,
                // Not offered here: the core refuses joins, packets and port
                // questions itself.
                Some(
                    Effect::Join { .. }
                    | Effect::Forward { .. }
                    | Effect::WhoOwns { .. }
                    | Effect::Locate { .. },
                ) => {}
            }
        };
        if let Some(last_word) = ended.tell_node {
            let _ = tx.send_async(Frame::Control(last_word)).await;
        }
        if let Some(number) = session_no {
            tracing::info!("node {node} at {remote} disconnected: {}", ended.reason);
            self.sessions.remove(&node, number);
        }
        drop(tx);
        // Let the writer deliver a last error before the link goes.
        let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
        link.close(&ended.reason);
    }

    /// Makes this the node's current session, telling an older one it was replaced.
    /// Returns the session's number.
    fn admitted(
        &self,
        node: NodeId,
        remote: SocketAddr,
        link: &Link,
        tx: &frame::FrameSender,
    ) -> u64 {
        let session = Session {
            link: link.clone(),
            tx: tx.clone(),
        };
        let (number, replaced) = self.sessions.insert(node, session);
        if let Some(old) = replaced {
            // As on a relay: the old session is told why before its link closes.
            old.link.close_after_telling(
                &old.tx,
                node_session::replaced_notice(node, remote, "rendezvous"),
                "replaced by a newer connection with the same node key",
            );
        }
        tracing::info!("node {node} connected from {remote}");
        number
    }

    /// Answers a registration. Not a relay: every service is refused with the reason.
    /// False when the session's writer is gone.
    async fn answer_register(
        &self,
        node: NodeId,
        remote: SocketAddr,
        services: Vec<ServiceRequest>,
        tx: &frame::FrameSender,
    ) -> bool {
        let grants = services
            .into_iter()
            .map(|s| ServiceGrant {
                name: s.name,
                public_addr: None,
                public_port: None,
                error: Some("this is a rendezvous, not a relay: it carries no services".into()),
            })
            .collect();
        let reply = Control::Registered {
            node_id: node,
            observed_addr: remote,
            services: grants,
            rendezvous: true,
            stun_port: Some(self.stun_port),
            channel: None,
            fleet: None,
        };
        tx.send_async(Frame::Control(reply)).await.is_ok()
    }
}
