//! One shim's session with one relay: dial (QUIC first, TLS over TCP when UDP does not
//! get through), register services, carry public-port streams and overlay packets,
//! keep the session alive, and reconnect with capped, jittered backoff when it ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry_proto::RelayUrl;
use ferry_proto::frame::{self, Control, ErrorCode, Frame, FrameCodec, PublicOpen, ServiceRequest};
use ferry_proto::limits::{KEEPALIVE_INTERVAL, LINK_IDLE_TIMEOUT};
use ferry_proto::link::{self, Link, LinkError, Stream};
use ferry_proto::liveness::{Liveness, Verdict};
use ferry_proto::stall::Silence;
use ferry_proto::tls::{self, ALPN_RELAY};
use futures::{SinkExt, StreamExt};
use rand::Rng;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::backoff::Backoff;
use crate::path_manager::{PathEvent, RelayInfo};
use crate::shim::Core;

/// How long QUIC gets before TLS over TCP is tried in parallel. Long enough for a
/// QUIC handshake across a continent, short enough to be unnoticeable when UDP is
/// blocked.
const QUIC_HEAD_START: Duration = Duration::from_millis(500);

/// How long the relay may take to answer a registration.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// Frames waiting to be written to the relay; overlay packets beyond it are dropped.
const SESSION_QUEUE: usize = 1024;

/// Silence after a send that makes a relay "unresponsive" (longer on slow links: see
/// `ferry_proto::liveness`). With sampling every 200 ms, relayed traffic leaves a
/// crashed relay about 1.2 s after its last answer.
const UNRESPONSIVE_AFTER: Duration = Duration::from_secs(1);
const LIVENESS_SAMPLE: Duration = Duration::from_millis(200);

enum SessionEnd {
    /// The session ended; reconnect. `registered` says whether it got that far.
    Lost { reason: String, registered: bool },
    /// Reconnecting would not help (another process uses this key).
    Fatal(String),
    /// The relay's policy refused this node; try again only slowly (an operator may
    /// change the policy, but asking every few seconds would be noise).
    Refused(String),
}

/// Wait before asking a relay that refused this node again.
const REFUSED_RETRY: Duration = Duration::from_secs(30);

pub async fn run(core: Arc<Core>, index: usize, url: RelayUrl, fatal: mpsc::Sender<anyhow::Error>) {
    let mut backoff = Backoff::default();
    let mut endpoints = Endpoints::default();
    loop {
        if core.shutdown.is_cancelled() {
            return;
        }
        core.update_relay(index, |r| r.state = "connecting");
        match session(&core, index, &url, &mut endpoints).await {
            SessionEnd::Fatal(why) => {
                tracing::error!("relay {url}: {why}");
                core.update_relay(index, |r| {
                    r.state = "refused";
                    r.error = Some(why.clone());
                });
                let _ = fatal.send(anyhow::anyhow!("relay {url}: {why}")).await;
                return;
            }
            SessionEnd::Refused(why) => {
                tracing::error!("relay {url} refused this node: {why}");
                core.update_relay(index, |r| {
                    r.state = "refused";
                    r.error = Some(why.clone());
                });
                tokio::select! {
                    _ = tokio::time::sleep(REFUSED_RETRY) => {}
                    _ = core.shutdown.cancelled() => return,
                }
                continue;
            }
            SessionEnd::Lost { .. } if core.shutdown.is_cancelled() => return,
            SessionEnd::Lost { reason, registered } => {
                if registered {
                    backoff.reset();
                }
                tracing::warn!("relay {url}: {reason}; reconnecting");
                core.update_relay(index, |r| {
                    r.state = "disconnected";
                    r.error = Some(reason);
                });
            }
        }
        let delay = backoff.next_delay(rand::thread_rng().r#gen::<f64>());
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = core.shutdown.cancelled() => return,
        }
    }
}

/// The QUIC endpoint for relay links: the shim's one shared socket (SPEC §2: the
/// relay then sees the same NAT mapping peers must hit). Only where that socket could
/// not be made dual-stack (no IPv6 on the host) do IPv6 relays get a separate client
/// endpoint, created on first use.
#[derive(Default)]
struct Endpoints {
    v6: Option<quinn::Endpoint>,
}

impl Endpoints {
    fn for_addr(&mut self, core: &Core, addr: SocketAddr) -> std::io::Result<quinn::Endpoint> {
        if addr.is_ipv4() || core.overlay.socket.is_dual_stack() {
            core.overlay.socket.allow_relay(addr);
            return Ok(core.overlay.endpoint.clone());
        }
        if let Some(e) = &self.v6 {
            return Ok(e.clone());
        }
        let endpoint =
            quinn::Endpoint::client(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)))?;
        self.v6 = Some(endpoint.clone());
        Ok(endpoint)
    }
}

async fn resolve(url: &RelayUrl) -> Result<SocketAddr, String> {
    tokio::net::lookup_host(url.authority())
        .await
        .map_err(|e| format!("cannot resolve {}: {e}", url.host))?
        .next()
        .ok_or_else(|| format!("{} resolves to no address", url.host))
}

/// Dials the relay: through the proxy when there is one (TLS over TCP inside the
/// tunnel; QUIC cannot cross a SOCKS or HTTP CONNECT proxy); otherwise races QUIC
/// against TLS/TCP (TCP starting after a head start, and only TCP when the mode
/// forbids QUIC) and keeps the first link that authenticates.
async fn dial(core: &Core, url: &RelayUrl, endpoints: &mut Endpoints) -> Result<Link, String> {
    let quic_cfg = tls::client_config(&core.key, url.relay_id, ALPN_RELAY, "relay")
        .map_err(|e| e.to_string())?;
    let (tls_cfg, inner_cfg) = (quic_cfg.clone(), quic_cfg.clone());
    if let Some(proxy) =
        crate::proxy::for_relay(core.opts.proxy.as_ref(), &core.opts.policy, &url.host)?
    {
        let result = proxy.relay_link(url, tls_cfg).await;
        if result.is_err() {
            core.metrics
                .relay_connects
                .with_label_values(&["none", "failed"])
                .inc();
        }
        return result;
    }
    let addr = resolve(url).await?;
    let endpoint = endpoints.for_addr(core, addr).map_err(|e| e.to_string())?;
    let quic = link::connect_quic(&endpoint, addr, quic_cfg, ALPN_RELAY);
    let tcp = async {
        tokio::time::sleep(QUIC_HEAD_START).await;
        link::connect_tcp(addr, tls_cfg, inner_cfg, ALPN_RELAY).await
    };
    tokio::pin!(quic, tcp);
    let mut quic_err: Option<LinkError> = None;
    let mut tcp_err: Option<LinkError> = None;
    loop {
        tokio::select! {
            r = &mut quic, if quic_err.is_none() => match r {
                Ok(link) => return Ok(link),
                Err(e) => quic_err = Some(e),
            },
            r = &mut tcp, if tcp_err.is_none() => match r {
                Ok(link) => return Ok(link),
                Err(e) => tcp_err = Some(e),
            },
        }
        if let (Some(q), Some(t)) = (&quic_err, &tcp_err) {
            core.metrics
                .relay_connects
                .with_label_values(&["none", "failed"])
                .inc();
            let (q, t) = (q.to_string(), t.to_string());
            return Err(if q == t {
                q
            } else {
                format!("QUIC: {q}; TCP: {t}")
            });
        }
    }
}

async fn session(
    core: &Arc<Core>,
    index: usize,
    url: &RelayUrl,
    endpoints: &mut Endpoints,
) -> SessionEnd {
    let lost = |reason: String| SessionEnd::Lost {
        reason,
        registered: false,
    };
    let link = match dial(core, url, endpoints).await {
        Ok(link) => link,
        Err(e) => return lost(format!("cannot connect: {e}")),
    };
    core.metrics
        .relay_connects
        .with_label_values(&[&link.kind().to_string(), "ok"])
        .inc();
    let stream = match link.open().await {
        Ok(s) => s,
        Err(e) => return lost(format!("cannot open the session stream: {e}")),
    };
    let mut reader = FramedRead::new(stream.recv, FrameCodec);
    let mut writer = FramedWrite::new(stream.send, FrameCodec);
    let dedicated = core.is_rendezvous_session(index);
    // A standalone rendezvous carries no services: register none there.
    let services: Vec<ServiceRequest> = core
        .opts
        .services
        .iter()
        .filter(|_| !dedicated)
        .map(|s| ServiceRequest {
            name: s.name.clone(),
            public: s.public,
        })
        .collect();
    let certificate = core
        .opts
        .memberships
        .certificate_for(url)
        .cloned()
        .map(Box::new);
    if let Err(e) = writer
        .send(Frame::Control(Control::Register {
            services,
            certificate,
        }))
        .await
    {
        return lost(format!("cannot register: {e}"));
    }
    let first = tokio::time::timeout(REGISTER_TIMEOUT, reader.next()).await;
    let mut rendezvous = (false, None, link.remote_addr());
    let mut channel = None;
    match first {
        Ok(Some(Ok(Frame::Control(reply)))) => {
            if let Control::Registered {
                rendezvous: has,
                stun_port,
                observed_addr,
                channel: token,
                ..
            } = &reply
            {
                rendezvous = (*has, *stun_port, *observed_addr);
                channel = token
                    .as_deref()
                    .copied()
                    .filter(|_| core.opts.relay_channel);
            }
            if let Some(end) = apply_control(core, index, url, &link, reply) {
                return end;
            }
        }
        Ok(Some(Ok(Frame::Packet { .. }))) | Ok(None) => {
            return lost("the relay closed the session before answering".into());
        }
        Ok(Some(Err(e))) => return lost(format!("bad answer from the relay: {e}")),
        Err(_) => return lost("the relay did not answer the registration".into()),
    }

    let (tx, rx) = frame::frame_queue(SESSION_QUEUE);
    let writer_task = tokio::spawn(frame::pump_frames(rx, writer.into_inner()));
    let channel_route = channel.map(|token| (token, link.remote_addr()));
    if !dedicated {
        core.overlay
            .socket
            .set_relay(index, tx.clone(), Some(link.clone()), channel_route);
        core.metrics.relays_connected.inc();
    }
    let (has_rendezvous, stun_port, observed_addr) = rendezvous;
    let _ = core
        .overlay
        .paths
        .events
        .send(PathEvent::RelayUp(RelayInfo {
            index,
            tx: tx.clone(),
            kind: link.kind(),
            relay_addr: link.remote_addr(),
            observed_addr,
            rendezvous: has_rendezvous,
            dedicated,
            stun_port,
        }))
        .await;
    // A standalone rendezvous opens no public-port streams.
    let accept_task = (!dedicated).then(|| tokio::spawn(accept_public(core.clone(), link.clone())));

    let mut ping = tokio::time::interval(KEEPALIVE_INTERVAL);
    ping.tick().await;
    let mut nonce = 0u64;
    let mut liveness = Liveness::new(UNRESPONSIVE_AFTER);
    let mut liveness_tick = tokio::time::interval(LIVENESS_SAMPLE);
    liveness_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut draining = false;
    // Each session frame only notes the time and the one timer moves when it fires
    // (relayed overlay datagrams pass through this loop at full transfer speed); time
    // this process spent frozen does not count as the relay's silence.
    let mut silence = Silence::new(LINK_IDLE_TIMEOUT, std::time::Instant::now());
    let idle = tokio::time::sleep_until(silence.deadline().into());
    tokio::pin!(idle);
    let reason = loop {
        let frame = tokio::select! {
            read = link.read_overlay_datagrams(|peer, data| core.overlay.socket.deliver(peer, data)) => match read {
                Ok(()) => continue,
                Err(frame::FrameError::Io(_)) => break "the relay closed the link".to_string(),
                Err(e) => break format!("protocol error from the relay: {e}"),
            },
            () = &mut idle => match silence.recheck(std::time::Instant::now()) {
                Some(again) => {
                    idle.as_mut().reset(again.into());
                    continue;
                }
                None => break format!("relay silent for {} s", LINK_IDLE_TIMEOUT.as_secs()),
            },
            next = reader.next() => match next {
                None => break "the relay closed the session".to_string(),
                Some(Err(e)) => break format!("protocol error from the relay: {e}"),
                Some(Ok(frame)) => {
                    silence.heard(std::time::Instant::now());
                    frame
                }
            },
            _ = ping.tick() => {
                nonce += 1;
                let _ = tx.try_send(Frame::Control(Control::Ping { nonce }));
                continue;
            }
            _ = liveness_tick.tick(), if !dedicated && !draining => {
                match liveness.observe(std::time::Instant::now(), link.activity()) {
                    Some(Verdict::Unresponsive { silent_for }) => {
                        // A relay that crashed sends nothing, not even a close; QUIC
                        // would notice only at its idle timeout. Move relayed overlay
                        // traffic to the next relay now and keep the link in case it is
                        // only a hiccup.
                        tracing::warn!(
                            "relay {url} has not answered for {} ms; relayed traffic moves to the next relay",
                            silent_for.as_millis()
                        );
                        let why = format!("no answer for {} ms", silent_for.as_millis());
                        move_overlay_off(core, index, &tx, "unresponsive", "unresponsive", why);
                    }
                    Some(Verdict::Answering) => {
                        tracing::info!("relay {url} answers again");
                        core.overlay.socket.set_relay(index, tx.clone(), Some(link.clone()), channel_route);
                        core.update_relay(index, |r| {
                            r.state = "connected";
                            r.error = None;
                        });
                    }
                    None => {}
                }
                continue;
            }
            _ = link.closed() => break "the relay link closed".to_string(),
            _ = core.shutdown.cancelled() => break "shutting down".to_string(),
        };
        match frame {
            Frame::Packet { peer, data } => core.overlay.socket.deliver(peer, data),
            Frame::Control(Control::Ping { nonce }) => {
                let _ = tx.try_send(Frame::Control(Control::Pong { nonce }));
            }
            Frame::Control(Control::Error {
                code: ErrorCode::GoingAway,
                message,
            }) => {
                // The relay drains: move new overlay traffic to another relay now,
                // but keep the link so connections in flight through this relay
                // finish; the relay closes it when it is done.
                tracing::warn!("relay {url} is going away: {message}");
                draining = true;
                move_overlay_off(core, index, &tx, "going_away", "draining", message);
            }
            Frame::Control(
                msg @ (Control::Published { .. }
                | Control::Found { .. }
                | Control::PunchStart { .. }
                | Control::PunchFailed { .. }),
            ) => {
                let _ = core
                    .overlay
                    .paths
                    .events
                    .try_send(PathEvent::Rendezvous { index, msg });
            }
            Frame::Control(msg) => {
                if let Some(end) = apply_control(core, index, url, &link, msg) {
                    cleanup(core, index, &tx, &link, accept_task, writer_task);
                    return end;
                }
            }
        }
    };
    cleanup(core, index, &tx, &link, accept_task, writer_task);
    SessionEnd::Lost {
        reason,
        registered: true,
    }
}

/// Moves relayed overlay traffic off relay `index` (its session queue `tx`) to the
/// next live relay, keeping the link: counts the failover under `reason` and shows the
/// relay as `state` with `why` in status.
fn move_overlay_off(
    core: &Core,
    index: usize,
    tx: &frame::FrameSender,
    reason: &str,
    state: &'static str,
    why: String,
) {
    core.overlay.socket.clear_relay(tx);
    core.metrics
        .relay_failovers
        .with_label_values(&[reason])
        .inc();
    core.update_relay(index, |r| {
        r.state = state;
        r.error = Some(why);
    });
}

fn cleanup(
    core: &Core,
    index: usize,
    tx: &frame::FrameSender,
    link: &Link,
    accept_task: Option<tokio::task::JoinHandle<()>>,
    writer_task: tokio::task::JoinHandle<()>,
) {
    if !core.is_rendezvous_session(index) {
        core.metrics.relays_connected.dec();
        core.overlay.socket.clear_relay(tx);
    }
    let _ = core
        .overlay
        .paths
        .events
        .try_send(PathEvent::RelayDown { index });
    if let Some(task) = accept_task {
        task.abort();
    }
    writer_task.abort();
    link.close("session ended");
}

/// Applies a control message from the relay; `Some` ends the session.
fn apply_control(
    core: &Core,
    index: usize,
    url: &RelayUrl,
    link: &Link,
    msg: Control,
) -> Option<SessionEnd> {
    match msg {
        Control::Registered {
            node_id,
            observed_addr,
            services,
            ..
        } => {
            if node_id != core.node_id {
                return Some(SessionEnd::Lost {
                    reason: format!("the relay registered us as {node_id}, not {}", core.node_id),
                    registered: false,
                });
            }
            for grant in services
                .into_iter()
                .filter(|_| !core.is_rendezvous_session(index))
            {
                match (&grant.public_addr, &grant.error) {
                    (_, Some(e)) => {
                        tracing::warn!("relay {url} refused service {:?}: {e}", grant.name)
                    }
                    (Some(addr), None) => {
                        tracing::info!(
                            "service {:?} is reachable at {addr} (via {url})",
                            grant.name
                        )
                    }
                    (None, None) => {}
                }
                core.set_service_grant(&grant.name, grant.public_addr, grant.error);
            }
            core.update_relay(index, |r| {
                r.state = "connected";
                r.transport = Some(link.kind());
                r.remote_addr = Some(link.remote_addr());
                r.observed_addr = Some(observed_addr);
                r.error = None;
            });
            tracing::info!("registered with relay {url} over {}", link.kind());
            None
        }
        Control::Pong { .. } | Control::Ping { .. } => None,
        Control::Error {
            code: ErrorCode::Replaced,
            message,
        } => Some(SessionEnd::Fatal(message)),
        Control::Error {
            code: ErrorCode::Denied,
            message,
        } => Some(SessionEnd::Refused(message)),
        Control::Error { code, message } => Some(SessionEnd::Lost {
            reason: format!("relay reported {code:?}: {message}"),
            registered: false,
        }),
        // Rendezvous answers: the session loop hands them to the path layer.
        Control::Published { .. }
        | Control::Found { .. }
        | Control::PunchStart { .. }
        | Control::PunchFailed { .. } => None,
        Control::Register { .. }
        | Control::Join { .. }
        | Control::Joined { .. }
        | Control::Publish { .. }
        | Control::Lookup { .. }
        | Control::Punch { .. } => Some(SessionEnd::Lost {
            reason: "the relay sent a node-only message".into(),
            registered: false,
        }),
    }
}

async fn accept_public(core: Arc<Core>, link: Link) {
    while let Ok(stream) = link.accept().await {
        let core = core.clone();
        tokio::spawn(serve_public(core, stream));
    }
}

async fn serve_public(core: Arc<Core>, mut stream: Stream) {
    let opened = std::time::Instant::now();
    let header = tokio::time::timeout(
        crate::overlay::STREAM_SETUP_TIMEOUT,
        frame::read_header::<_, PublicOpen>(&mut stream),
    )
    .await;
    let open = match header {
        Ok(Ok(open)) => open,
        Ok(Err(e)) => {
            tracing::info!("bad public stream header from the relay: {e}");
            return;
        }
        Err(_) => return,
    };
    let Some(service) = core
        .service(Some(&open.service))
        .filter(|s| s.public)
        .cloned()
    else {
        core.metrics
            .streams
            .with_label_values(&["public", "refused"])
            .inc();
        tracing::warn!(
            "the relay forwarded a connection for {:?}, which is not a public service here",
            open.service
        );
        return;
    };
    match core.connect_local(&service).await {
        Ok(local) => {
            if let Err(e) = stream.write_all(&[frame::PUBLIC_ACCEPTED]).await {
                tracing::debug!("public stream from {} closed early: {e}", open.client);
                return;
            }
            core.metrics
                .streams
                .with_label_values(&["public", "ok"])
                .inc();
            core.metrics
                .stream_setup_seconds
                .with_label_values(&["public"])
                .observe(opened.elapsed().as_secs_f64());
            tracing::debug!(
                "public connection from {} to {:?}",
                open.client,
                service.name
            );
            core.splice_counted(stream, local, "public").await;
        }
        Err(why) => {
            core.metrics
                .streams
                .with_label_values(&["public", "failed"])
                .inc();
            tracing::warn!("public connection from {}: {why}", open.client);
        }
    }
}
