//! The async driver of direct paths: one task that owns every peer's [`PeerPath`],
//! feeds it probes, rendezvous messages and time, and carries out its actions on the
//! shared [`PathSocket`] and the relay session.
//!
//! It also gathers this node's candidates when a relay session comes up — interface
//! addresses, the reflexive address the relay sees, configured addresses — measures
//! how the NAT maps ports (the relay's view of our socket against the STUN service's
//! view, two destinations), finds the priming TTL ([`crate::hops`]), and publishes the
//! signed path record to the rendezvous.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use ferry_proto::frame::{self, Control, Frame};
use ferry_proto::link::LinkKind;
use ferry_proto::probe::{Probe, ProbeKind};
use ferry_proto::record::{NatMapping, PathRecord, RecordError, expiry_after};
use ferry_proto::{NodeId, RelayUrl, SecretKey};
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use rand::Rng;
use tokio::sync::{mpsc, oneshot};

use crate::allow::SharedAllow;
use crate::mode::Policy;
use crate::path_socket::{ControlPacket, PathSocket, canonical};
use crate::paths::{Action, Outcome, PathConfig, PeerPath, PunchState, Route};
use ferry_proto::sync::lock;

/// How long a published record stays valid.
const RECORD_LIFETIME: Duration = Duration::from_secs(600);

/// How often the record is published again. A third of its life, so that with this
/// node's clock up to `CLOCK_SKEW_TOLERANCE` behind the checker's (its records expiring
/// that much sooner there) a fresh record always arrives before the last one expires.
const REPUBLISH_EVERY: Duration = Duration::from_secs(RECORD_LIFETIME.as_secs() / 3);
const _: () = assert!(
    RECORD_LIFETIME.as_secs()
        > REPUBLISH_EVERY.as_secs() + ferry_proto::record::CLOCK_SKEW_TOLERANCE.as_secs()
);
const _: () = assert!(
    RECORD_LIFETIME.as_secs() + ferry_proto::record::CLOCK_SKEW_TOLERANCE.as_secs()
        <= ferry_proto::record::MAX_RECORD_LIFETIME.as_secs()
);

/// How long to wait for the STUN service's answer when measuring the NAT.
const STUN_TIMEOUT: Duration = Duration::from_millis(1500);

/// How long hop discovery listens for ICMP answers.
const HOPS_WAIT: Duration = Duration::from_millis(1000);

/// Hop discovery rounds, and the pause between them (ICMP rate limits refill).
const HOPS_ROUNDS: usize = 3;
const HOPS_RETRY: Duration = Duration::from_millis(1000);

/// Events queued for the driver; beyond this, `want` notices are dropped (they repeat).
const EVENT_QUEUE: usize = 1024;

/// Peers with path state at once.
const MAX_PATH_PEERS: usize = 4096;

pub enum PathEvent {
    /// An overlay connection to this peer is being made (`inbound` false) or was
    /// accepted (`inbound` true).
    Want {
        peer: NodeId,
        inbound: bool,
    },
    RelayUp(RelayInfo),
    RelayDown {
        index: usize,
    },
    /// A rendezvous answer that arrived on relay session `index`.
    Rendezvous {
        index: usize,
        msg: Control,
    },
    Gathered(Gathered),
    /// The home router's port mapping changed: `Some((reported external address,
    /// external port))`, or `None` when it is gone.
    PortMapped(Option<(IpAddr, u16)>),
}

/// A registered relay session, as the path layer needs it.
pub struct RelayInfo {
    pub index: usize,
    pub tx: frame::FrameSender,
    pub kind: LinkKind,
    pub relay_addr: SocketAddr,
    pub observed_addr: SocketAddr,
    pub rendezvous: bool,
    /// A standalone rendezvous (`--rendezvous`), preferred over relays' embedded ones.
    pub dedicated: bool,
    pub stun_port: Option<u16>,
}

pub struct Gathered {
    index: usize,
    nat: NatMapping,
    prime_ttl: Option<u8>,
    addrs: Vec<(SocketAddr, AddrSource)>,
    /// The relay's view of our socket, when the session runs over QUIC on it.
    reflexive: Option<SocketAddr>,
}

/// Path-related settings from the shim's options.
#[derive(Clone, Debug)]
pub struct PathOptions {
    /// Extra candidate addresses to announce (port forwards, known public addresses).
    pub addresses: Vec<SocketAddr>,
    /// Priming TTL override; found by probing when `None`.
    pub punch_ttl: Option<u8>,
    pub relays: Vec<RelayUrl>,
    /// Who may connect to this node's services. A punch that this node did not ask
    /// for is only joined for these nodes, so a stranger cannot make it probe
    /// addresses of the stranger's choosing.
    pub allow: SharedAllow,
    /// What the mode allows: discovery, announcing, punching.
    pub policy: Policy,
}

/// What `/api/status` shows of one peer's path.
#[derive(Clone, Debug, Default)]
pub struct PathView {
    pub punch: PunchState,
    pub reason: Option<String>,
}

struct Metrics {
    attempts: IntCounterVec,
    changes: IntCounterVec,
    peers: IntGaugeVec,
}

/// Handle shared with the overlay, the relay clients and the admin API.
pub struct PathManager {
    pub events: mpsc::Sender<PathEvent>,
    views: Mutex<HashMap<NodeId, PathView>>,
    /// What we learned about our own network, for `/api/status`.
    pub local: Mutex<LocalView>,
}

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LocalView {
    pub udp_port: u16,
    pub nat: Option<NatMapping>,
    pub prime_ttl: Option<u8>,
    /// This node's direct-path candidates, each with where it came from (Tahoe
    /// ticket #754): configured and discovered addresses merged, one entry each.
    pub candidates: Vec<Candidate>,
    /// Whether the candidates are put in the published path record (not in private
    /// mode).
    pub announced: bool,
    /// The last path record the rendezvous answered for. A refused record is what a
    /// wrong clock looks like from here, so the refusal is shown, not only logged.
    pub record: Option<RecordStatus>,
}

/// A published path record and what the rendezvous said of it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RecordStatus {
    pub seq: u64,
    /// Unix seconds, by this node's clock.
    pub expires: u64,
    /// Why the rendezvous refused it; `None` once it was stored.
    pub error: Option<String>,
}

/// Where a candidate address came from.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum AddrSource {
    /// `addresses = [...]` in the config.
    Configured,
    /// An address of one of this host's interfaces.
    Interface,
    /// How a relay sees this node's UDP socket (its NAT's public side).
    Reflexive,
    /// A port the home router forwards to this node (UPnP-IGD, NAT-PMP, PCP).
    PortMapping,
}

impl AddrSource {
    /// The name status shows (the same as in JSON).
    pub fn name(self) -> &'static str {
        match self {
            AddrSource::Configured => "configured",
            AddrSource::Interface => "interface",
            AddrSource::Reflexive => "reflexive",
            AddrSource::PortMapping => "port_mapping",
        }
    }
}

/// Addresses and the source that found each.
type Found = Vec<(SocketAddr, AddrSource)>;

/// One direct-path candidate and every source that found it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Candidate {
    pub addr: SocketAddr,
    pub sources: Vec<AddrSource>,
}

/// Merges addresses found by several sources: one entry per address, in the order
/// first seen, listing each source once.
pub fn merge_candidates(
    found: impl IntoIterator<Item = (SocketAddr, AddrSource)>,
) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = Vec::new();
    for (addr, source) in found {
        match out.iter_mut().find(|c| c.addr == addr) {
            Some(c) => {
                if !c.sources.contains(&source) {
                    c.sources.push(source);
                    c.sources.sort();
                }
            }
            None => out.push(Candidate {
                addr,
                sources: vec![source],
            }),
        }
    }
    out
}

impl PathManager {
    /// Tells the driver a peer is wanted because this node connects to it, or
    /// (`inbound`) because it connected to this node. Never blocks; a full queue
    /// drops it, and the next stream to that peer says it again.
    pub fn want(&self, peer: NodeId, inbound: bool) {
        let _ = self.events.try_send(PathEvent::Want { peer, inbound });
    }

    /// What this node learned about its own network (for `/api/status`).
    pub fn local_view(&self) -> LocalView {
        lock(&self.local).clone()
    }

    pub fn view(&self, peer: &NodeId) -> PathView {
        lock(&self.views).get(peer).cloned().unwrap_or_default()
    }
}

/// Starts the driver. Metrics go into `registry`.
pub fn start(
    key: SecretKey,
    socket: Arc<PathSocket>,
    control: mpsc::Receiver<ControlPacket>,
    opts: PathOptions,
    registry: &Registry,
) -> Result<Arc<PathManager>, prometheus::Error> {
    let attempts = IntCounterVec::new(
        Opts::new(
            "ferry_shim_punch_attempts_total",
            "Hole-punch attempts by outcome (direct, no_response, not_coordinated, both_symmetric)",
        ),
        &["outcome"],
    )?;
    let changes = IntCounterVec::new(
        Opts::new(
            "ferry_shim_path_changes_total",
            "Peers moved to another path, by the new path (direct, relayed)",
        ),
        &["to"],
    )?;
    let peers = IntGaugeVec::new(
        Opts::new("ferry_shim_peers", "Peers with path state, by path in use"),
        &["path"],
    )?;
    for o in Outcome::ALL {
        attempts.with_label_values(&[o.label()]);
    }
    for p in ["direct", "relayed"] {
        changes.with_label_values(&[p]);
        peers.with_label_values(&[p]);
    }
    registry.register(Box::new(attempts.clone()))?;
    registry.register(Box::new(changes.clone()))?;
    registry.register(Box::new(peers.clone()))?;
    let (events, rx) = mpsc::channel(EVENT_QUEUE);
    let manager = Arc::new(PathManager {
        events: events.clone(),
        views: Mutex::new(HashMap::new()),
        local: Mutex::new(LocalView {
            udp_port: socket.udp_local_addr().map(|a| a.port()).unwrap_or(0),
            ..LocalView::default()
        }),
    });
    let driver = Driver {
        key,
        socket,
        opts,
        manager: manager.clone(),
        events,
        peers: HashMap::new(),
        relays: HashMap::new(),
        nat: NatMapping::Unknown,
        prime_ttl: None,
        candidates: Vec::new(),
        gathered: HashMap::new(),
        mapped: None,
        stun_waiters: Arc::new(Mutex::new(HashMap::new())),
        next_publish: None,
        last_seq: 0,
        last_sent: None,
        catching_up_seq: false,
        metrics: Metrics {
            attempts,
            changes,
            peers,
        },
    };
    tokio::spawn(driver.run(rx, control));
    Ok(manager)
}

type StunWaiters = Arc<Mutex<HashMap<[u8; 12], oneshot::Sender<SocketAddr>>>>;

struct Driver {
    key: SecretKey,
    socket: Arc<PathSocket>,
    opts: PathOptions,
    manager: Arc<PathManager>,
    events: mpsc::Sender<PathEvent>,
    peers: HashMap<NodeId, PeerPath>,
    relays: HashMap<usize, RelayInfo>,
    nat: NatMapping,
    prime_ttl: Option<u8>,
    candidates: Vec<Candidate>,
    /// Addresses gathered through each live session, by session index, and the
    /// relay's view of our socket through it.
    gathered: HashMap<usize, (Found, Option<SocketAddr>)>,
    /// The port mapping: the address the router reports and the external port.
    mapped: Option<(IpAddr, u16)>,
    stun_waiters: StunWaiters,
    next_publish: Option<Instant>,
    last_seq: u64,
    /// Sequence number and expiry of the record sent last, until the rendezvous answers.
    last_sent: Option<(u64, u64)>,
    /// A record was refused and this node asked the rendezvous for its stored one.
    catching_up_seq: bool,
    metrics: Metrics,
}

impl Driver {
    async fn run(
        mut self,
        mut events: mpsc::Receiver<PathEvent>,
        mut control: mpsc::Receiver<ControlPacket>,
    ) {
        loop {
            let wake = self
                .peers
                .values()
                .filter_map(PeerPath::next_timeout)
                .chain(self.next_publish)
                .min();
            let sleep = async {
                match wake {
                    Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => self.on_event(ev),
                    None => return,
                },
                packet = control.recv() => match packet {
                    Some(p) => self.on_packet(p),
                    None => return,
                },
                _ = sleep => {}
            }
            let now = Instant::now();
            if self.next_publish.is_some_and(|t| now >= t) {
                self.publish();
            }
            let ids: Vec<NodeId> = self.peers.keys().copied().collect();
            for peer in ids {
                if let Some(p) = self.peers.get_mut(&peer) {
                    let actions = p.poll(now);
                    self.apply(peer, actions);
                }
            }
            self.refresh_views();
        }
    }

    fn path_config(&self) -> PathConfig {
        let defaults = PathConfig::default();
        let policy = &self.opts.policy;
        PathConfig {
            prime_ttl: self.opts.punch_ttl.or(self.prime_ttl),
            max_attempts: if policy.retry_punch {
                defaults.max_attempts
            } else {
                1
            },
            probe_back: policy.probe_back,
            ..defaults
        }
    }

    fn peer(&mut self, peer: NodeId) -> Option<&mut PeerPath> {
        if !self.peers.contains_key(&peer) {
            if self.peers.len() >= MAX_PATH_PEERS {
                return None;
            }
            let path = PeerPath::new(self.path_config(), self.nat, rand::thread_rng().r#gen());
            self.peers.insert(peer, path);
        }
        self.peers.get_mut(&peer)
    }

    /// The session whose rendezvous we use: the standalone one if configured and up,
    /// else the first relay's embedded one.
    fn rendezvous(&self) -> Option<&RelayInfo> {
        self.relays
            .values()
            .filter(|r| r.rendezvous)
            .min_by_key(|r| (!r.dedicated, r.index))
    }

    fn on_event(&mut self, ev: PathEvent) {
        let now = Instant::now();
        match ev {
            PathEvent::Want { peer, inbound } => {
                let policy = &self.opts.policy;
                if !policy.punch || (inbound && !policy.paths_for_inbound) {
                    // Relayed only: strict mode without `punch = true` and private
                    // mode look for no direct path, and strict mode never starts one
                    // towards a peer that connected to it.
                    return;
                }
                if let Some(p) = self.peer(peer) {
                    let actions = p.want(now);
                    self.apply(peer, actions);
                }
            }
            PathEvent::RelayUp(info) => {
                self.socket.allow_relay(info.relay_addr);
                let gather = (info.index, info.kind, info.relay_addr, info.observed_addr);
                let stun = info.stun_port;
                self.relays.insert(info.index, info);
                self.spawn_gather(gather, stun);
            }
            PathEvent::RelayDown { index } => {
                self.relays.remove(&index);
                self.gathered.remove(&index);
            }
            PathEvent::Gathered(g) => {
                if !self.relays.contains_key(&g.index) {
                    return;
                }
                // Each session measures on its own; an unmeasured answer (a relay
                // without STUN) never overrides a measured one.
                if g.nat != NatMapping::Unknown {
                    self.nat = g.nat;
                }
                self.prime_ttl = g.prime_ttl.or(self.prime_ttl);
                self.gathered.insert(g.index, (g.addrs, g.reflexive));
                self.candidates_changed();
            }
            PathEvent::PortMapped(mapped) => {
                self.mapped = mapped;
                self.candidates_changed();
            }
            PathEvent::Rendezvous { msg, .. } => self.on_rendezvous(msg, now),
        }
    }

    /// The port mapping's candidates. The mapped port is paired with the address the
    /// relays see (the ground truth of how the Internet reaches us): a router may
    /// report an external address that is not really its public one (an inner
    /// router under carrier-grade NAT reports a private one). The router's own
    /// address is used only when no relay sees our socket, and only if it is public.
    fn mapped_candidates(&self) -> Vec<(SocketAddr, AddrSource)> {
        let Some((reported, port)) = self.mapped else {
            return Vec::new();
        };
        let mut seen: Vec<IpAddr> = self
            .gathered
            .values()
            .filter_map(|(_, reflexive)| reflexive.map(|a| a.ip()))
            .collect();
        seen.sort();
        seen.dedup();
        if seen.is_empty() && crate::paths::is_public(reported) {
            seen.push(reported);
        }
        seen.into_iter()
            .map(|ip| (SocketAddr::new(ip, port), AddrSource::PortMapping))
            .collect()
    }

    /// Recomputes the candidates from every source, updates the peers and the
    /// status, and publishes the record.
    fn candidates_changed(&mut self) {
        let mapped = self.mapped_candidates();
        // Mapped first: an address the router forwards is the one most likely to work.
        let found = mapped.into_iter().chain(
            self.gathered
                .values()
                .flat_map(|(addrs, _)| addrs.iter().copied()),
        );
        self.candidates = merge_candidates(found);
        let cfg = self.path_config();
        for p in self.peers.values_mut() {
            p.set_local_nat(self.nat);
            p.set_prime_ttl(cfg.prime_ttl);
        }
        {
            let mut local = lock(&self.manager.local);
            local.nat = Some(self.nat);
            local.prime_ttl = cfg.prime_ttl;
            local.candidates = self.candidates.clone();
            local.announced = self.opts.policy.announce_addresses;
        }
        self.publish();
    }

    fn on_rendezvous(&mut self, msg: Control, now: Instant) {
        match msg {
            Control::PunchStart {
                peer,
                record,
                observed_addr,
                start_in_ms,
                attempt,
            } => {
                if !self.opts.policy.punch {
                    tracing::info!(
                        "ignored a hole punch from node {peer}: hole punching is off in {} mode",
                        self.opts.policy.mode.name()
                    );
                    return;
                }
                if !self.peers.contains_key(&peer) && !self.opts.allow.allows(&peer) {
                    tracing::info!(
                        "ignored a punch from node {peer}: not on the allow list and not dialled by this node"
                    );
                    return;
                }
                let record = match record.verify(SystemTime::now()) {
                    Ok(r) if r.node_id == peer => r.clone(),
                    Ok(_) => {
                        tracing::warn!("the rendezvous sent a record of another node for {peer}");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!("the rendezvous sent a bad record for {peer}: {e}");
                        return;
                    }
                };
                let mut candidates = record.addrs.clone();
                // Where the rendezvous sees the peer: its reflexive address, unless
                // its session runs over TCP (then that port means nothing for UDP).
                if let Some(addr) = observed_addr
                    && record.nat != NatMapping::Unknown
                    && !candidates.contains(&addr)
                {
                    candidates.push(addr);
                }
                // A private address of the peer is only worth probing if it is on one
                // of our own networks (the same LAN); elsewhere the probes would go
                // out to the Internet and only earn ICMP errors, which routers
                // rate-limit — starving the ICMP that finding the priming TTL needs.
                let nets = local_networks();
                candidates
                    .retain(|a| crate::paths::is_public(a.ip()) || on_local_network(a, &nets));
                tracing::debug!("punching to {peer}: candidates {candidates:?}");
                let start_in = Duration::from_millis(start_in_ms.into());
                if let Some(p) = self.peer(peer) {
                    let actions = p.punch_start(now, &candidates, record.nat, start_in, attempt);
                    self.apply(peer, actions);
                }
            }
            Control::PunchFailed { peer, reason } => {
                tracing::info!("no punch to {peer}: {reason}");
                if let Some(p) = self.peers.get_mut(&peer) {
                    let actions = p.punch_failed(now, &reason);
                    self.apply(peer, actions);
                }
            }
            Control::Published { seq, error } => {
                if let Some(e) = &error {
                    tracing::warn!("the rendezvous refused path record {seq}: {e}");
                }
                // Answers to records since replaced change nothing.
                let Some((_, expires)) = self.last_sent.filter(|(sent, _)| *sent == seq) else {
                    return;
                };
                if error.is_some() {
                    // Perhaps it holds a record of ours with a higher sequence number:
                    // this node's clock went back and the shim restarted since. Ask
                    // for it, and continue from its number (see `Found` below).
                    if !self.catching_up_seq
                        && let Some(rdv) = self.rendezvous()
                        && rdv
                            .tx
                            .try_send(Frame::Control(Control::Lookup {
                                node_id: self.key.node_id(),
                            }))
                            .is_ok()
                    {
                        self.catching_up_seq = true;
                    }
                }
                lock(&self.manager.local).record = Some(RecordStatus {
                    seq,
                    expires,
                    error,
                });
            }
            Control::Found {
                node_id,
                record: Some(stored),
            } if self.catching_up_seq && node_id == self.key.node_id() => {
                self.catching_up_seq = false;
                // Only our own signature counts: a number taken from anything else
                // would let whoever made it push our sequence numbers around. (An
                // expired or too long-lived record has had its signature checked: by
                // this node's clock it may be either.)
                let ours = stored.record.node_id == node_id
                    && matches!(
                        stored.verify(SystemTime::now()),
                        Ok(_) | Err(RecordError::Expired { .. } | RecordError::TooLong { .. })
                    );
                if ours && stored.record.seq >= self.last_seq {
                    tracing::info!(
                        "the rendezvous holds path record {} of this node, newer than ours \
                         (has the clock gone back?); publishing from there",
                        stored.record.seq
                    );
                    self.last_seq = stored.record.seq;
                    self.publish();
                }
            }
            Control::Found { node_id, .. } if node_id == self.key.node_id() => {
                self.catching_up_seq = false;
            }
            _ => {}
        }
    }

    fn on_packet(&mut self, packet: ControlPacket) {
        match packet {
            ControlPacket::Stun { from, data } => {
                let Some(id) = ferry_rendezvous::stun::transaction_id(&data) else {
                    return;
                };
                let waiter = lock(&self.stun_waiters).remove(&id);
                if let Some(tx) = waiter
                    && let Ok(addr) = ferry_rendezvous::stun::parse_binding_response(&data, &id)
                {
                    let _ = tx.send(addr);
                } else {
                    tracing::trace!("unexpected STUN message from {from}");
                }
            }
            ControlPacket::Probe { from, data } => self.on_probe(from, &data),
        }
    }

    fn on_probe(&mut self, from: SocketAddr, data: &Bytes) {
        let Ok(probe) = Probe::decode(data) else {
            return;
        };
        // Cheap checks first: only probes for us, from peers we are dealing with,
        // cost a signature check.
        if probe.receiver != self.key.node_id() || !self.peers.contains_key(&probe.sender) {
            return;
        }
        if let Err(e) = probe.verify(data) {
            tracing::debug!("dropped a probe from {from}: {e}");
            return;
        }
        let now = Instant::now();
        let peer = probe.sender;
        if let Some(p) = self.peers.get_mut(&peer) {
            let actions = match probe.kind {
                ProbeKind::Ping => p.on_ping(from, probe.tx, now),
                ProbeKind::Pong => p.on_pong(from, probe.tx, now),
            };
            // Only an address that answered our own ping with the peer's signature
            // carries the peer's QUIC packets. A candidate from a record, or a ping's
            // source (which could be spoofed), is never enough: otherwise a node
            // could list someone else's address and have their packets misrouted.
            if p.is_verified(&from) {
                self.socket.know(from, peer);
            }
            self.apply(peer, actions);
        }
    }

    fn apply(&mut self, peer: NodeId, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::SendPing { to, tx, ttl } => {
                    self.send_probe(ProbeKind::Ping, peer, to, tx, ttl);
                }
                Action::SendPong { to, tx } => self.send_probe(ProbeKind::Pong, peer, to, tx, None),
                Action::RequestPunch => {
                    // A peer relayed through another relay than the preferred one
                    // (a visit, or the relay its packets come by) is coordinated
                    // there: that relay holds both sessions.
                    let rendezvous = self
                        .socket
                        .pinned(&peer)
                        .and_then(|index| self.relays.get(&index))
                        .filter(|r| r.rendezvous)
                        .or_else(|| self.rendezvous());
                    let sent = rendezvous.is_some_and(|r| {
                        r.tx.try_send(Frame::Control(Control::Punch { peer }))
                            .is_ok()
                    });
                    if !sent && let Some(p) = self.peers.get_mut(&peer) {
                        // No rendezvous: nothing to coordinate with. Counted as a
                        // failed attempt; the retry rules decide what happens next.
                        let actions = p.punch_failed(
                            Instant::now(),
                            "no relay with a rendezvous is connected",
                        );
                        self.apply(peer, actions);
                    }
                }
                Action::RouteChanged(route) => {
                    self.socket.set_route(peer, route);
                    let to = match route {
                        Route::Direct(addr) => {
                            tracing::info!("peer {peer}: direct path via {addr}");
                            "direct"
                        }
                        Route::Relayed => {
                            let why = self
                                .peers
                                .get(&peer)
                                .and_then(|p| p.reason().map(str::to_string))
                                .unwrap_or_default();
                            tracing::info!("peer {peer}: back on the relay: {why}");
                            "relayed"
                        }
                    };
                    self.metrics.changes.with_label_values(&[to]).inc();
                }
                Action::Attempt(outcome) => {
                    self.metrics
                        .attempts
                        .with_label_values(&[outcome.label()])
                        .inc();
                    if outcome != Outcome::Direct {
                        let reason = self
                            .peers
                            .get(&peer)
                            .and_then(|p| p.reason().map(str::to_string))
                            .unwrap_or_default();
                        if self.opts.policy.retry_punch {
                            tracing::info!("punch to {peer}: {} {reason}", outcome.label());
                        } else {
                            // Strict mode: one attempt, and the operator is told why.
                            tracing::warn!(
                                "punch to {peer} failed ({}), not retried in {} mode; the peer stays relayed: {reason}",
                                outcome.label(),
                                self.opts.policy.mode.name()
                            );
                        }
                    }
                }
            }
        }
    }

    fn send_probe(&self, kind: ProbeKind, peer: NodeId, to: SocketAddr, tx: u64, ttl: Option<u8>) {
        let probe = Probe {
            kind,
            sender: self.key.node_id(),
            receiver: peer,
            tx,
            observed: to,
        };
        if let Err(e) = self.socket.send_control(&probe.encode(&self.key), to, ttl) {
            tracing::debug!("probe to {to} not sent: {e}");
        }
    }

    fn refresh_views(&mut self) {
        let mut direct = 0;
        let mut views = lock(&self.manager.views);
        views.clear();
        for (id, p) in &self.peers {
            if matches!(p.route(), Route::Direct(_)) {
                direct += 1;
            }
            views.insert(
                *id,
                PathView {
                    punch: p.punch_state(),
                    reason: p.reason().map(str::to_string),
                },
            );
        }
        self.metrics
            .peers
            .with_label_values(&["direct"])
            .set(direct);
        self.metrics
            .peers
            .with_label_values(&["relayed"])
            .set(self.peers.len() as i64 - direct);
    }

    /// Signs and sends this node's path record to the rendezvous.
    fn publish(&mut self) {
        self.next_publish = Some(Instant::now() + REPUBLISH_EVERY);
        // A catch-up whose answer never came (the session dropped) must not stop the
        // next refusal from asking again.
        self.catching_up_seq = false;
        if self.rendezvous().is_none() {
            return;
        }
        let now = SystemTime::now();
        // Milliseconds since the epoch keep increasing across restarts; the +1 keeps
        // two records published within one millisecond distinct.
        let millis = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let seq = millis.max(self.last_seq + 1);
        self.last_seq = seq;
        let mut addrs = if self.opts.policy.announce_addresses {
            self.candidates.iter().map(|c| c.addr).collect()
        } else {
            Vec::new()
        };
        addrs.truncate(ferry_proto::record::MAX_RECORD_ADDRS);
        let mut relays = self.opts.relays.clone();
        relays.truncate(ferry_proto::record::MAX_RECORD_RELAYS);
        let expires = expiry_after(now, RECORD_LIFETIME);
        self.last_sent = Some((seq, expires));
        let record = PathRecord {
            node_id: self.key.node_id(),
            seq,
            expires,
            addrs,
            relays,
            nat: self.nat,
        }
        .sign(&self.key);
        let Some(rdv) = self.rendezvous() else {
            return;
        };
        if rdv
            .tx
            .try_send(Frame::Control(Control::Publish {
                record: Box::new(record),
            }))
            .is_err()
        {
            tracing::debug!("path record not sent: the relay session queue is full");
        }
    }

    /// Measures the NAT and gathers candidates in the background (it waits on the
    /// network), then reports back with `PathEvent::Gathered`.
    fn spawn_gather(
        &self,
        (index, kind, relay_addr, observed): (usize, LinkKind, SocketAddr, SocketAddr),
        stun_port: Option<u16>,
    ) {
        let socket = self.socket.clone();
        let waiters = self.stun_waiters.clone();
        let events = self.events.clone();
        let configured: Vec<(SocketAddr, AddrSource)> = self
            .opts
            .addresses
            .iter()
            .map(|a| (*a, AddrSource::Configured))
            .collect();
        let ttl_override = self.opts.punch_ttl;
        if !self.opts.policy.discover_addresses {
            // Strict and private modes: the configured addresses and nothing else;
            // not a packet is sent to learn more.
            let _ = self.events.try_send(PathEvent::Gathered(Gathered {
                index,
                nat: NatMapping::Unknown,
                prime_ttl: None,
                addrs: configured,
                reflexive: None,
            }));
            return;
        }
        tokio::spawn(async move {
            let port = socket.udp_local_addr().map(|a| a.port()).unwrap_or(0);
            let interfaces = interface_addrs(port, socket.is_dual_stack());
            let mut addrs: Vec<(SocketAddr, AddrSource)> = interfaces
                .iter()
                .map(|a| (*a, AddrSource::Interface))
                .collect();
            let mut nat = NatMapping::Unknown;
            let mut prime_ttl = None;
            let observed = canonical(observed);
            let mut reflexive = (kind == LinkKind::Quic).then_some(observed);
            if kind == LinkKind::Quic {
                // The relay's QUIC connection runs on our one socket: what it sees is
                // our reflexive address.
                addrs.push((observed, AddrSource::Reflexive));
            }
            if kind == LinkKind::Quic && !interfaces.contains(&observed) {
                // Publish what is known at once (a peer may ask for us any moment);
                // the measured record follows within a few round trips.
                let mut quick = addrs.clone();
                quick.extend(configured.iter().copied());
                let _ = events
                    .send(PathEvent::Gathered(Gathered {
                        index,
                        nat,
                        prime_ttl: None,
                        addrs: quick,
                        reflexive,
                    }))
                    .await;
            }
            if kind == LinkKind::Quic {
                if interfaces.contains(&observed) {
                    nat = NatMapping::None;
                } else if let Some(stun_port) = stun_port {
                    let stun_addr = SocketAddr::new(relay_addr.ip(), stun_port);
                    nat = match stun_query(&socket, &waiters, stun_addr).await {
                        Some(seen) if canonical(seen) == observed => {
                            NatMapping::EndpointIndependent
                        }
                        Some(seen) => {
                            tracing::info!(
                                "this node's NAT maps its UDP port differently per destination ({observed} towards the relay, {seen} towards STUN): a symmetric NAT"
                            );
                            NatMapping::EndpointDependent
                        }
                        None => NatMapping::Unknown,
                    };
                    if ttl_override.is_none() {
                        prime_ttl = find_prime_ttl(stun_addr).await;
                    }
                }
            } else if let Some(stun_port) = stun_port {
                // A relay link on TLS/TCP (QUIC lost the connect race to a lost
                // packet, or UDP is blocked) says nothing of this node's UDP mapping.
                // Ask the relay's STUN service from the one UDP socket: when UDP
                // works, peers can still punch to the address it reports.
                let stun_addr = SocketAddr::new(relay_addr.ip(), stun_port);
                if let Some(seen) = stun_query(&socket, &waiters, stun_addr).await {
                    let seen = canonical(seen);
                    reflexive = Some(seen);
                    if interfaces.contains(&seen) {
                        nat = NatMapping::None;
                    } else {
                        addrs.push((seen, AddrSource::Reflexive));
                        if ttl_override.is_none() {
                            prime_ttl = find_prime_ttl(stun_addr).await;
                        }
                    }
                }
            }
            addrs.extend(configured);
            let _ = events
                .send(PathEvent::Gathered(Gathered {
                    index,
                    nat,
                    prime_ttl,
                    addrs,
                    reflexive,
                }))
                .await;
        });
    }
}

/// The TTL that primes this node's NAT without reaching the peer's: the hops towards
/// `stun_addr` (routers rate-limit ICMP, so one silent round is not the last word).
async fn find_prime_ttl(stun_addr: SocketAddr) -> Option<u8> {
    let target = crate::hops::target(stun_addr)?;
    for round in 0..HOPS_ROUNDS {
        if round > 0 {
            tokio::time::sleep(HOPS_RETRY).await;
        }
        match crate::hops::discover(target, HOPS_WAIT).await {
            Ok(report) => {
                let prime_ttl = report.prime_ttl();
                tracing::info!(
                    "priming TTL {:?} (routers on the way: {:?})",
                    prime_ttl,
                    report.hops
                );
                if prime_ttl.is_some() {
                    return prime_ttl;
                }
            }
            Err(e) => {
                tracing::info!("cannot find the priming TTL ({e}); set punch_ttl in the config")
            }
        }
    }
    None
}

/// Asks the STUN service how it sees our shared socket.
async fn stun_query(
    socket: &PathSocket,
    waiters: &StunWaiters,
    stun: SocketAddr,
) -> Option<SocketAddr> {
    let id: [u8; 12] = rand::thread_rng().r#gen();
    let (tx, rx) = oneshot::channel();
    lock(waiters).insert(id, tx);
    let request = ferry_rendezvous::stun::binding_request(&id);
    let mut answer = None;
    let mut rx = rx;
    for _ in 0..3 {
        if socket.send_control(&request, stun, None).is_err() {
            break;
        }
        match tokio::time::timeout(STUN_TIMEOUT / 3, &mut rx).await {
            Ok(Ok(addr)) => {
                answer = Some(addr);
                break;
            }
            Ok(Err(_)) => break,
            Err(_) => continue,
        }
    }
    lock(waiters).remove(&id);
    answer
}

/// This host's IPv4 networks (address, netmask), loopback excluded.
fn local_networks() -> Vec<(std::net::Ipv4Addr, std::net::Ipv4Addr)> {
    let mut out = Vec::new();
    if let Ok(ifaces) = if_addrs::get_if_addrs() {
        for iface in ifaces {
            if let if_addrs::IfAddr::V4(v4) = iface.addr
                && !v4.ip.is_loopback()
            {
                out.push((v4.ip, v4.netmask));
            }
        }
    }
    out
}

fn on_local_network(addr: &SocketAddr, nets: &[(std::net::Ipv4Addr, std::net::Ipv4Addr)]) -> bool {
    let IpAddr::V4(ip) = addr.ip() else {
        return false;
    };
    nets.iter().any(|(net, mask)| {
        let m = u32::from(*mask);
        u32::from(ip) & m == u32::from(*net) & m
    })
}

/// This host's interface addresses with our socket's port: IPv4 ones (not loopback),
/// and with a dual-stack socket (`v6`) global IPv6 ones (link-local and unique-local
/// addresses would need a scope or reach no one across the Internet).
fn interface_addrs(port: u16, v6: bool) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    if let Ok(ifaces) = if_addrs::get_if_addrs() {
        for iface in ifaces {
            let ip = iface.ip();
            let usable = match ip {
                IpAddr::V4(v4) => !v4.is_loopback(),
                IpAddr::V6(_) => v6 && crate::paths::is_public(ip),
            };
            if !usable {
                continue;
            }
            let addr = SocketAddr::new(ip, port);
            if !out.contains(&addr) {
                out.push(addr);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    #[test]
    fn candidates_are_one_per_address_in_the_order_first_found() {
        let merged = merge_candidates([
            (addr("198.51.100.4:5000"), AddrSource::Reflexive),
            (addr("192.168.1.10:5000"), AddrSource::Interface),
            (addr("198.51.100.4:5000"), AddrSource::Reflexive),
        ]);
        assert_eq!(
            merged,
            [
                Candidate {
                    addr: addr("198.51.100.4:5000"),
                    sources: vec![AddrSource::Reflexive],
                },
                Candidate {
                    addr: addr("192.168.1.10:5000"),
                    sources: vec![AddrSource::Interface],
                },
            ]
        );
    }

    #[test]
    fn an_address_found_by_several_sources_lists_each_once_in_a_fixed_order() {
        let merged = merge_candidates([
            (addr("203.0.113.9:7000"), AddrSource::PortMapping),
            (addr("203.0.113.9:7000"), AddrSource::Reflexive),
            (addr("203.0.113.9:7000"), AddrSource::Configured),
            (addr("203.0.113.9:7000"), AddrSource::Reflexive),
        ]);
        assert_eq!(merged.len(), 1);
        assert_eq!(
            merged[0].sources,
            [
                AddrSource::Configured,
                AddrSource::Reflexive,
                AddrSource::PortMapping
            ]
        );
    }

    #[test]
    fn the_same_host_on_another_port_is_another_candidate() {
        let merged = merge_candidates([
            (addr("203.0.113.9:7000"), AddrSource::Reflexive),
            (addr("203.0.113.9:7001"), AddrSource::PortMapping),
        ]);
        assert_eq!(merged.len(), 2);
        assert!(merge_candidates([]).is_empty());
    }
}
