//! One shim's session with one relay, the async driver: dial (QUIC first, TLS over TCP
//! when UDP does not get through), register services, carry public-port streams and
//! overlay packets, and reconnect with capped, jittered backoff when it ends. What the
//! relay's answers mean and when the session ends are `relay_session`'s rules.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_proto::channel::ChannelToken;
use ferry_proto::frame::{self, Control, Frame, FrameCodec, PublicOpen, ServiceRequest};
use ferry_proto::link::{self, Link, LinkError, LinkKind, Stream};
use ferry_proto::tls::{self, ALPN_RELAY};
use ferry_proto::{NodeId, RelayUrl};
use futures::{SinkExt, StreamExt};
use rand::Rng;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::backoff::Backoff;
use crate::path_manager::{PathEvent, RelayInfo};
use crate::relay_session::{
    Action, Event, QUIC_TRY_TIMEOUT, QuicStep, REGISTER_TIMEOUT, Registered, RelaySession,
    SessionEnd, Setup,
};
use crate::state::{Core, RelayState};

/// How long QUIC gets before TLS over TCP is tried in parallel. Long enough for a
/// QUIC handshake across a continent, short enough to be unnoticeable when UDP is
/// blocked.
const QUIC_HEAD_START: Duration = Duration::from_millis(500);

/// Frames waiting to be written to the relay; overlay packets beyond it are dropped.
const SESSION_QUEUE: usize = 1024;

/// How often a visit checks whether it still carries a peer.
const IDLE_CHECK: Duration = Duration::from_secs(5);

/// Wait before asking a relay that refused this node again.
const REFUSED_RETRY: Duration = Duration::from_secs(30);

/// The longest a link the session moved away from is kept for the public-port
/// connections still on it; the relay closes it sooner, once they end.
const OLD_LINK_LIMIT: Duration = Duration::from_secs(3600);

/// Keeps a session with a configured relay (or the standalone rendezvous) for as long
/// as the shim runs, reconnecting when it ends.
pub async fn run(core: Arc<Core>, index: usize, url: RelayUrl, fatal: mpsc::Sender<anyhow::Error>) {
    let mut backoff = Backoff::default();
    let mut endpoints = Endpoints::default();
    loop {
        if core.shutdown.is_cancelled() {
            return;
        }
        core.update_relay(index, |r| r.state = RelayState::Connecting);
        match session(&core, index, &url, &mut endpoints).await {
            SessionEnd::Fatal(why) => {
                tracing::error!("relay {url}: {why}");
                core.update_relay(index, |r| {
                    r.state = RelayState::Refused;
                    r.error = Some(why.clone());
                });
                let _ = fatal.send(anyhow::anyhow!("relay {url}: {why}")).await;
                return;
            }
            SessionEnd::Refused(why) => {
                tracing::error!("relay {url} refused this node: {why}");
                core.update_relay(index, |r| {
                    r.state = RelayState::Refused;
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
                    r.state = RelayState::Disconnected;
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

/// Looks for `peer`, which this node is dialling, among the relays of its relays'
/// fleet, and relays its packets through a relay that holds its session: one of this
/// node's own, or a visit opened for it (`crate::visits`). Without a fleet, or when
/// the peer is on this node's preferred relay, nothing changes.
pub fn find_peer(
    core: Arc<Core>,
    peer: NodeId,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    find_peer_avoiding(core, peer, None)
}

/// [`find_peer`], leaving out relay `avoid` (a visit to it just ended: until its entry
/// expires, the fleet may still name it).
fn find_peer_avoiding(
    core: Arc<Core>,
    peer: NodeId,
    avoid: Option<NodeId>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    // Boxed: a search starts visits, and a visit that ends searches again.
    Box::pin(search(core, peer, avoid))
}

async fn search(core: Arc<Core>, peer: NodeId, avoid: Option<NodeId>) {
    use crate::visits::{Choice, LocateError};
    if !core.visits.start_finding(peer) {
        return;
    }
    let located = core.visits.locate(peer).await;
    let located = match located {
        Ok(relays) => relays,
        Err(LocateError::NoFleet) => {
            core.visits.done_finding(&peer);
            return;
        }
        Err(LocateError::Unanswered) => {
            tracing::info!("no relay of the fleet said where node {peer} is");
            core.visits.done_finding(&peer);
            return;
        }
    };
    let policy = &core.opts.policy;
    let may_visit = |url: &RelayUrl| {
        Some(url.relay_id) != avoid
            && (policy.visit_relays
                || core
                    .opts
                    .may_reach
                    .iter()
                    .any(|m| m.relay_id == url.relay_id))
    };
    let choice = crate::visits::choose(
        &located,
        &core.visits.sessions(),
        may_visit,
        policy.mode.name(),
    );
    match choice {
        Choice::Through(index) => {
            core.overlay.note_unreachable(peer, None);
            core.overlay.socket.pin(peer, index);
        }
        Choice::Visit(url) => {
            let (index, new, mut up) = core.visits.visit(&url);
            if new {
                tracing::info!("node {peer} is on relay {url}: visiting it");
                core.show_visit(index, &url);
                tokio::spawn(run_visit(core.clone(), index, url.clone()));
            }
            let registered =
                tokio::time::timeout(crate::visits::VISIT_SETUP_TIMEOUT, up.wait_for(|up| *up))
                    .await;
            if matches!(registered, Ok(Ok(_))) {
                core.overlay.note_unreachable(peer, None);
                core.overlay.socket.pin(peer, index);
            } else {
                let why = format!("its relay {url} did not take this node's visit in time");
                tracing::warn!("node {peer}: {why}");
                core.overlay.note_unreachable(peer, Some(why));
            }
        }
        Choice::Refused(why) => {
            tracing::warn!("node {peer}: {why}");
            core.overlay.note_unreachable(peer, Some(why));
        }
        Choice::Nowhere => core.overlay.note_unreachable(
            peer,
            Some("it has no session at any relay of the fleet (is its shim running?)".into()),
        ),
    }
    core.visits.done_finding(&peer);
}

/// A visit (`crate::visits`): one session with a relay this node is not configured
/// with, registering no services, for the peers that are only there. It ends when
/// idle, or when its session ends; the peers it carried that still have a
/// connection are looked for again (they may be elsewhere now).
async fn run_visit(core: Arc<Core>, index: usize, url: RelayUrl) {
    let mut endpoints = Endpoints::default();
    let end = session(&core, index, &url, &mut endpoints).await;
    let pinned = core.overlay.socket.pinned_to(index);
    core.overlay.socket.unpin_relay(index);
    core.visits.visit_ended(&url.relay_id, index);
    core.forget_relay(index);
    match end {
        SessionEnd::Lost { reason, .. } => tracing::info!("visit to relay {url} ended: {reason}"),
        SessionEnd::Refused(why) | SessionEnd::Fatal(why) => {
            tracing::warn!("relay {url} refused this node's visit: {why}");
            for peer in pinned.iter().copied() {
                core.overlay.note_unreachable(
                    peer,
                    Some(format!("its relay {url} refused this node: {why}")),
                );
            }
        }
    }
    if core.shutdown.is_cancelled() {
        return;
    }
    for peer in pinned {
        if core.overlay.has_connection(&peer) {
            tokio::spawn(find_peer_avoiding(core.clone(), peer, Some(url.relay_id)));
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

/// A link to a relay, and how it was reached.
struct Dialed {
    link: Link,
    /// Through a proxy: TLS/TCP for good, as QUIC cannot cross it.
    proxied: bool,
}

/// Dials the relay: through the proxy when there is one (TLS over TCP inside the
/// tunnel; QUIC cannot cross a SOCKS or HTTP CONNECT proxy); otherwise races QUIC
/// against TLS/TCP (TCP starting after a head start, and only TCP when the mode
/// forbids QUIC) and keeps the first link that authenticates.
async fn dial(core: &Core, url: &RelayUrl, endpoints: &mut Endpoints) -> Result<Dialed, String> {
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
        return result.map(|link| Dialed {
            link,
            proxied: true,
        });
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
                Ok(link) => return Ok(Dialed { link, proxied: false }),
                Err(e) => quic_err = Some(e),
            },
            r = &mut tcp, if tcp_err.is_none() => match r {
                Ok(link) => return Ok(Dialed { link, proxied: false }),
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

/// A session stream's frames as they are read.
type SessionReader = FramedRead<link::BoxRead, FrameCodec>;

/// The `register` this node sends to relay session `index`: its services (none to a
/// standalone rendezvous or on a visit) and its certificate for that relay; with
/// `upgrade`, on a link that takes over from the session's current one.
fn register_message(core: &Core, index: usize, url: &RelayUrl, upgrade: bool) -> Control {
    let carries_services = !core.is_rendezvous_session(index) && !crate::visits::is_visit(index);
    let services: Vec<ServiceRequest> = core
        .opts
        .services
        .iter()
        .filter(|_| carries_services)
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
    Control::Register {
        services,
        certificate,
        upgrade,
    }
}

/// What one try at moving a session onto QUIC came to.
enum QuicTry {
    /// No QUIC link to the relay: nothing was asked of it.
    Unreachable(String),
    /// `register` with `upgrade` went out on a QUIC link.
    Asked(Box<QuicAsked>),
}

/// A QUIC link the relay was asked to move the session onto; `answer` is the relay's
/// first word on it (`Event::Closed` when none came in time).
struct QuicAsked {
    link: Link,
    reader: SessionReader,
    send: link::BoxWrite,
    answer: Event,
}

/// One try at QUIC for a session on TLS/TCP: a QUIC link to the relay at `addr` (the
/// address the TLS/TCP link reached), `register` sent on its session stream, and the
/// relay's first answer.
async fn try_quic(
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    cfg: rustls::ClientConfig,
    register: Control,
) -> QuicTry {
    let connect = link::connect_quic(&endpoint, addr, cfg, ALPN_RELAY);
    let link = match tokio::time::timeout(QUIC_TRY_TIMEOUT, connect).await {
        Ok(Ok(link)) => link,
        Ok(Err(e)) => return QuicTry::Unreachable(e.to_string()),
        Err(_) => {
            return QuicTry::Unreachable(format!(
                "no QUIC handshake within {} s",
                QUIC_TRY_TIMEOUT.as_secs()
            ));
        }
    };
    let stream = match link.open().await {
        Ok(stream) => stream,
        Err(e) => {
            link.close("no session stream");
            return QuicTry::Unreachable(format!("cannot open a session stream: {e}"));
        }
    };
    let mut reader = FramedRead::new(stream.recv, FrameCodec);
    let mut writer = FramedWrite::new(stream.send, FrameCodec);
    // From here on the relay may have acted on the registration.
    let answer = match writer.send(Frame::Control(register)).await {
        Err(e) => Event::Closed(format!("cannot send the registration: {e}")),
        Ok(()) => match tokio::time::timeout(REGISTER_TIMEOUT, reader.next()).await {
            Ok(next) => Event::from_read(next),
            Err(_) => Event::Closed(format!("no answer within {} s", REGISTER_TIMEOUT.as_secs())),
        },
    };
    QuicTry::Asked(Box::new(QuicAsked {
        link,
        reader,
        send: writer.into_inner(),
        answer,
    }))
}

/// The try at QUIC under way, if any; pending forever when there is none (a branch of
/// the session loop).
async fn finish(
    attempt: &mut Option<std::pin::Pin<Box<dyn std::future::Future<Output = QuicTry> + Send>>>,
) -> QuicTry {
    match attempt {
        Some(attempt) => attempt.await,
        None => std::future::pending().await,
    }
}

/// One session from dial to its end: feeds what happens on the link to the session's
/// sans-IO core (`relay_session`) and carries out what it asks for.
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
    let Dialed { link, proxied } = match dial(core, url, endpoints).await {
        Ok(dialed) => dialed,
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
    let visit = crate::visits::is_visit(index);
    if let Err(e) = writer
        .send(Frame::Control(register_message(core, index, url, false)))
        .await
    {
        return lost(format!("cannot register: {e}"));
    }
    // A link that lost the race to TLS/TCP (UDP blocked for now, or QUIC's head start
    // ran out on a loaded machine) tries QUIC again; not a visit, which is short-lived.
    let retry_quic = link.kind() == LinkKind::Tcp
        && !proxied
        && core.opts.policy.quic_relay
        && !dedicated
        && !visit;
    let quic_endpoint = retry_quic
        .then(|| endpoints.for_addr(core, link.remote_addr()).ok())
        .flatten();
    let mut rules = RelaySession::new(
        Setup {
            node_id: core.node_id,
            dedicated,
            use_channel: core.opts.relay_channel,
            retry_quic: quic_endpoint.is_some(),
        },
        Instant::now(),
    );
    let (tx, rx) = frame::frame_queue(SESSION_QUEUE);
    let mut driver = Driver {
        core,
        index,
        url,
        writer_task: tokio::spawn(frame::pump_frames(rx.clone(), writer.into_inner())),
        link,
        tx,
        rx,
        channel_route: None,
        accept_task: None,
        up: false,
        quic_endpoint,
        quic_try: None,
    };
    let mut link = driver.link.clone();

    // One timer, moved only when it fires: session frames just note the time (relayed
    // overlay datagrams pass through this loop at full transfer speed).
    let timer = tokio::time::sleep_until(rules.timeout().into());
    tokio::pin!(timer);
    let mut idle_check = tokio::time::interval(IDLE_CHECK);
    let mut busy_at = Instant::now();
    let end = 'session: loop {
        let event = tokio::select! {
            _ = idle_check.tick(), if visit => {
                let carrying = core
                    .overlay
                    .socket
                    .pinned_to(index)
                    .iter()
                    .any(|peer| core.overlay.has_connection(peer));
                if carrying || !rules.is_registered() {
                    busy_at = Instant::now();
                } else if busy_at.elapsed() >= crate::visits::VISIT_IDLE {
                    break SessionEnd::Lost {
                        reason: "idle: no peer it carried has a connection".into(),
                        registered: true,
                    };
                }
                continue;
            }
            read = link.read_overlay_datagrams(|peer, data| core.overlay.socket.deliver(peer, data, index)), if rules.is_registered() => match read {
                Ok(()) => continue,
                Err(frame::FrameError::Io(_)) => Event::Closed("the relay closed the link".into()),
                Err(e) => Event::Garbage(e.to_string()),
            },
            () = &mut timer => {
                for action in rules.timer_fired(link.activity()) {
                    if let Some(end) = driver.carry_out(action).await {
                        break 'session end;
                    }
                }
                timer.as_mut().reset(rules.timeout().into());
                continue;
            }
            tried = finish(&mut driver.quic_try) => {
                driver.quic_try = None;
                if let Some(end) = driver.quic_tried(tried, &mut rules, &mut reader).await {
                    break end;
                }
                link = driver.link.clone();
                timer.as_mut().reset(rules.timeout().into());
                continue;
            }
            next = reader.next() => Event::from_read(next),
            _ = link.closed() => Event::Closed("the relay link closed".into()),
            _ = core.shutdown.cancelled() => Event::Closed("shutting down".into()),
        };
        let was_registered = rules.is_registered();
        if let Some(action) = rules.handle(event, Instant::now())
            && let Some(end) = driver.carry_out(action).await
        {
            break end;
        }
        if !was_registered {
            // Registered: the timer now keeps the session alive instead of waiting
            // for the answer.
            timer.as_mut().reset(rules.timeout().into());
        }
    };
    driver.cleanup();
    end
}

/// What one session holds while it runs, and how it carries out the core's actions.
struct Driver<'a> {
    core: &'a Arc<Core>,
    index: usize,
    url: &'a RelayUrl,
    link: Link,
    /// The session's frame queue to the relay: it outlives a move to a new link.
    tx: frame::FrameSender,
    rx: frame::FrameReceiver,
    writer_task: tokio::task::JoinHandle<()>,
    /// Where overlay packets go as plain UDP, when the relay gave a channel.
    channel_route: Option<(ChannelToken, SocketAddr)>,
    accept_task: Option<tokio::task::JoinHandle<()>>,
    /// The relay was brought up (registered): overlay route, path layer, metrics.
    up: bool,
    /// Where a try at QUIC dials from, when the link is TLS/TCP and may move.
    quic_endpoint: Option<quinn::Endpoint>,
    /// The try at QUIC under way.
    quic_try: Option<std::pin::Pin<Box<dyn std::future::Future<Output = QuicTry> + Send>>>,
}

impl Driver<'_> {
    /// Carries out one action; `Some` ends the session.
    async fn carry_out(&mut self, action: Action) -> Option<SessionEnd> {
        let (core, index, url) = (self.core, self.index, self.url);
        match action {
            Action::Send(msg) => {
                let _ = self.tx.try_send(Frame::Control(msg));
            }
            Action::Deliver { peer, data } => core.overlay.socket.deliver(peer, data, index),
            Action::ToPaths(msg) => {
                let _ = core
                    .overlay
                    .paths
                    .events
                    .try_send(PathEvent::Rendezvous { index, msg });
            }
            Action::Grid(view) => {
                if !core.is_rendezvous_session(index) {
                    core.owners.relay_answers(index, self.tx.clone(), &url.host);
                }
                // On disk first, so what status shows is what a restart keeps. Only
                // a grid this node is a member of counts (`record_grid` and
                // `set_grid` ignore others); a revoked member's connections close as
                // the list changes.
                if let Err(e) = crate::membership::Memberships::record_grid(
                    &core.opts.data_dir,
                    url.relay_id,
                    &view,
                ) {
                    tracing::warn!("cannot keep the grid's revocations on disk: {e:#}");
                }
                if core.allow.set_grid(url.relay_id, (*view).clone()) {
                    tracing::info!(
                        "relay {url}: the grid has {} admins and {} revoked members",
                        view.admins.len(),
                        view.revoked.len()
                    );
                }
            }
            Action::Owner(answer) => core.owners.answered(index, answer),
            Action::Located { node, relays } => core.visits.located(node, relays),
            Action::Registered(answer) => {
                self.apply_grants(&answer);
                if answer.first {
                    self.bring_up(answer).await;
                }
            }
            // A visit exists only to carry its peers; one that cannot ends, and its
            // peers are looked for again (`run_visit`).
            Action::MoveOverlayOff(failover) if crate::visits::is_visit(index) => {
                return Some(SessionEnd::Lost {
                    reason: failover.why,
                    registered: true,
                });
            }
            Action::MoveOverlayOff(failover) => {
                tracing::warn!(
                    "relay {url}: {}; relayed traffic moves to the next relay",
                    failover.why
                );
                core.overlay.socket.clear_relay(&self.tx);
                core.metrics
                    .relay_failovers
                    .with_label_values(&[failover.reason])
                    .inc();
                core.update_relay(index, |r| {
                    r.state = failover.state;
                    r.error = Some(failover.why);
                });
            }
            Action::TakeOverlayBack => {
                tracing::info!("relay {url} answers again");
                core.overlay.socket.set_relay(
                    index,
                    self.tx.clone(),
                    Some(self.link.clone()),
                    self.channel_route,
                );
                core.update_relay(index, |r| {
                    r.state = RelayState::Connected;
                    r.error = None;
                });
            }
            Action::TryQuic => {
                if let Some(endpoint) = self.quic_endpoint.clone() {
                    let register = register_message(core, index, url, true);
                    let (key, relay_id) = (core.key.clone(), url.relay_id);
                    let addr = self.link.remote_addr();
                    self.quic_try = Some(Box::pin(async move {
                        let cfg = tls::client_config(&key, relay_id, ALPN_RELAY, "relay")
                            .map_err(|e| e.to_string());
                        match cfg {
                            Ok(cfg) => try_quic(endpoint, addr, cfg, register).await,
                            Err(why) => QuicTry::Unreachable(why),
                        }
                    }));
                }
            }
            Action::End(end) => return Some(end),
        }
        None
    }

    /// What a try at QUIC came to: the session moves onto the new link, stays, or (the
    /// relay may have moved it, or not) ends.
    async fn quic_tried(
        &mut self,
        tried: QuicTry,
        rules: &mut RelaySession,
        reader: &mut SessionReader,
    ) -> Option<SessionEnd> {
        let (core, url) = (self.core, self.url);
        let count = |outcome: &str| {
            core.metrics
                .relay_upgrades
                .with_label_values(&[outcome])
                .inc()
        };
        let QuicAsked {
            link: new_link,
            reader: new_reader,
            send,
            answer,
        } = match tried {
            QuicTry::Unreachable(why) => {
                tracing::debug!("relay {url}: still no QUIC: {why}");
                count("unreachable");
                rules.quic_unreachable(Instant::now());
                return None;
            }
            QuicTry::Asked(asked) => *asked,
        };
        match rules.quic_answered(answer, Instant::now()) {
            QuicStep::Switch(answer) => {
                count("moved");
                *reader = new_reader;
                self.move_to(new_link, send, answer).await;
                None
            }
            QuicStep::Stay { why, again } => {
                count("refused");
                if again {
                    tracing::warn!("relay {url}: {why}; staying on TLS/TCP for now");
                } else {
                    tracing::info!("relay {url}: {why}; staying on TLS/TCP");
                }
                new_link.close("move refused");
                None
            }
            QuicStep::End(end) => {
                count("half_done");
                new_link.close("move left half done");
                Some(end)
            }
        }
    }

    /// Moves the session onto `new`, the QUIC link the relay just registered this node
    /// on: frames, overlay packets and new public-port streams go there; the old link
    /// stays until the relay closes it, which it does once the public-port connections
    /// on it end (their streams are served where they are).
    async fn move_to(&mut self, new: Link, send: link::BoxWrite, answer: Registered) {
        let (core, index) = (self.core, self.index);
        let old = std::mem::replace(&mut self.link, new);
        // The old writer goes (finishing the old session stream, which tells the
        // relay the node left it); the queue stays, so every holder of `tx` follows.
        self.writer_task.abort();
        self.writer_task = tokio::spawn(frame::pump_frames(self.rx.clone(), send));
        self.quic_endpoint = None;
        let from = old.kind();
        if let Some(task) = self.accept_task.take() {
            task.abort();
        }
        // Streams the relay opened on the old link just before the move still arrive.
        let accept_old = accept_public(core.clone(), old.clone());
        tokio::spawn(async move {
            let _ = tokio::time::timeout(OLD_LINK_LIMIT, accept_old).await;
            old.close("the session moved to another link");
        });
        core.update_relay(index, |r| r.moved_to_quic += 1);
        tracing::info!(
            "relay {}: moved from {from} to {}; the old link closes when its public connections end",
            self.url,
            self.link.kind()
        );
        self.apply_grants(&answer);
        self.bring_up(answer).await;
    }

    /// Records what the relay granted each service, and the relay as connected.
    fn apply_grants(&self, answer: &Registered) {
        let (core, url, link) = (self.core, self.url, &self.link);
        for grant in &answer.grants {
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
            core.set_service_grant(&grant.name, grant.public_addr.clone(), grant.error.clone());
        }
        core.update_relay(self.index, |r| {
            r.state = RelayState::Connected;
            r.transport = Some(link.kind());
            r.remote_addr = Some(link.remote_addr());
            r.observed_addr = Some(answer.observed_addr);
            r.fleet = answer.fleet.clone();
            r.error = None;
        });
        tracing::info!("registered with relay {url} over {}", link.kind());
    }

    /// The first registration, or the registration on a link the session moved to:
    /// overlay traffic may go through this relay (on this link), the path layer learns
    /// of it, and it may open public-port streams.
    async fn bring_up(&mut self, answer: Registered) {
        let (core, index, link) = (self.core, self.index, &self.link);
        let dedicated = core.is_rendezvous_session(index);
        self.channel_route = answer.channel.map(|token| (token, link.remote_addr()));
        if !dedicated {
            core.overlay.socket.set_relay(
                index,
                self.tx.clone(),
                Some(link.clone()),
                self.channel_route,
            );
            if !self.up {
                core.metrics.relays_connected.inc();
                core.visits.session_up(
                    index,
                    self.url.relay_id,
                    answer.fleet.is_some().then(|| self.tx.clone()),
                );
            }
        }
        if link.kind() == LinkKind::Quic {
            core.overlay
                .socket
                .watch_restarts(link.remote_addr(), self.tx.clone());
        }
        self.up = true;
        let _ = core
            .overlay
            .paths
            .events
            .send(PathEvent::RelayUp(RelayInfo {
                index,
                tx: self.tx.clone(),
                kind: link.kind(),
                relay_addr: link.remote_addr(),
                observed_addr: answer.observed_addr,
                rendezvous: answer.rendezvous,
                dedicated,
                stun_port: answer.stun_port,
            }))
            .await;
        // A standalone rendezvous opens no public-port streams, nor does a visit.
        self.accept_task = (!dedicated && !crate::visits::is_visit(index))
            .then(|| tokio::spawn(accept_public(core.clone(), link.clone())));
    }

    fn cleanup(self) {
        let core = self.core;
        core.owners.relay_gone(self.index);
        core.overlay.socket.unwatch_restarts(&self.tx);
        if self.up {
            if !core.is_rendezvous_session(self.index) {
                core.metrics.relays_connected.dec();
                core.overlay.socket.clear_relay(&self.tx);
                core.visits.session_down(self.index);
            }
            let _ = core
                .overlay
                .paths
                .events
                .try_send(PathEvent::RelayDown { index: self.index });
        }
        if let Some(task) = self.accept_task {
            task.abort();
        }
        self.writer_task.abort();
        self.link.close("session ended");
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
