//! What the relay knows while it runs, shared by its drivers, admin routes and panel:
//! the options it started with, every live node session, the public-port listeners,
//! and the views and checks over them (`/api/nodes`, limits, the policy re-check).
//! `server` fills it in and drives the sockets; nothing here imports a driver.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use ferry_proto::channel::{ChannelId, ChannelToken};
use ferry_proto::frame::{self, Control, ErrorCode, Frame, ServiceGrant};
use ferry_proto::grid::Certificate;
use ferry_proto::link::{self, Link};
use ferry_proto::registry::Registry;
use ferry_proto::sync::lock;
use ferry_proto::{NodeId, RelayUrl};
use ferry_rendezvous::sessions::Rendezvous;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::access::Access;
use crate::fleet::FleetWrite;
use crate::metrics::{Limit, Metrics};
use crate::ports::{PortStore, PortTable};
use crate::whereabouts::Whereabouts;

/// Everything the relay needs to start, after flags and config are merged.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Host name or address clients use; `None` guesses it (and says so in the log).
    pub public_host: Option<String>,
    pub ports: RangeInclusive<u16>,
    pub admin: SocketAddr,
    pub admin_token: Option<Arc<str>>,
    pub max_public_ports_per_node: usize,
    /// Who may register (`--policy`), the file with the lists (`--policy-file`), and
    /// how long certificates bought with an invite last.
    pub policy: crate::policy::Mode,
    pub policy_file: PathBuf,
    pub membership_lifetime: Duration,
    /// How long a SIGTERM waits for public connections to finish.
    pub drain_timeout: Duration,
    /// Limits (SPEC §6); see `relay/src/config.rs` for defaults and reasons.
    pub limits: Limits,
    /// UDP address of the embedded rendezvous's STUN service; `None` runs without the
    /// embedded rendezvous (`--no-rendezvous`).
    pub stun: Option<SocketAddr>,
    /// The fleet this relay is part of (`--fleet`), if any.
    pub fleet: Option<crate::fleet::FleetOptions>,
    /// Sees every overlay packet the relay forwards (source, destination, bytes). For
    /// tests and debugging only: it shows exactly what a relay operator could see.
    pub packet_tap: Option<PacketTap>,
}

/// The relay's configurable limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Nodes with a session at once.
    pub max_nodes: usize,
    /// Public-port connections one node may have open at once.
    pub max_streams_per_node: usize,
    /// Bytes per second one node may move through the relay (public streams and
    /// overlay packets together); 0 is no limit.
    pub node_bytes_per_sec: u64,
    /// Handshakes per second one source address may start (burst: ten times that).
    pub handshakes_per_ip_per_sec: f64,
    pub connections_per_ip_per_sec: f64,
}

/// Observer of forwarded overlay packets; see [`RelayOptions::packet_tap`].
#[derive(Clone)]
pub struct PacketTap(pub Arc<TapFn>);

/// Called with (source, destination, packet) for each forwarded overlay packet.
pub type TapFn = dyn Fn(NodeId, NodeId, &[u8]) + Send + Sync;

impl std::fmt::Debug for PacketTap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PacketTap")
    }
}

/// One node's live session.
pub struct Session {
    pub node: NodeId,
    pub link: Link,
    pub(crate) tx: frame::FrameSender,
    pub connected_at: SystemTime,
    pub services: Mutex<Vec<ServiceGrant>>,
    /// The membership certificate the node presented, re-checked when policy changes.
    pub certificate: Mutex<Option<Certificate>>,
    /// The node's byte budget, shared by its streams and packets (None: unlimited).
    pub(crate) bucket: Option<ferry_proto::rate::SharedBucket>,
    /// Public-port connections open now.
    pub(crate) public_streams: std::sync::atomic::AtomicUsize,
    /// The node moved to a newer link (`Control::Register::upgrade`): this session
    /// is no longer the node's, and its link stays only until its public-port
    /// connections end.
    pub(crate) handed_over: std::sync::atomic::AtomicBool,
    /// The session this one took over from (`Control::Register::upgrade`), while its
    /// link drains: a policy that cuts the node off closes it too. Weak, so a drained
    /// one's link is not kept.
    pub(crate) predecessor: Mutex<Option<std::sync::Weak<Session>>>,
    pub bytes_to_node: AtomicU64,
    pub bytes_from_node: AtomicU64,
    /// The session's relay channel; links over QUIC only (their packets come and go
    /// through the relay's UDP socket, where channel packets are forwarded).
    pub(crate) channel: Option<SessionChannel>,
}

/// A session's relay channel (`ferry_proto::channel`).
pub(crate) struct SessionChannel {
    pub(crate) token: ChannelToken,
    /// Where the node's link is (cached: read for every packet; refreshed from the
    /// link when a packet with the right token comes from elsewhere, as after a NAT
    /// rebinding the link followed).
    pub(crate) addr: Mutex<SocketAddr>,
    /// The relay's local address that link uses (multi-homed hosts).
    pub(crate) local_ip: Option<std::net::IpAddr>,
}

pub(crate) struct PublicListener {
    pub(crate) owner: NodeId,
    pub(crate) task: JoinHandle<()>,
}

impl Drop for PublicListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct State {
    pub id: NodeId,
    pub url: RelayUrl,
    pub listen: SocketAddr,
    /// The STUN service's bound address; `None` when the embedded rendezvous is off.
    pub stun_addr: Option<SocketAddr>,
    /// The embedded rendezvous (records, punch coordination); `None` when it is off.
    pub rendezvous: Option<Arc<Rendezvous>>,
    /// The access policy and invites.
    pub access: Access,
    pub opts: RelayOptions,
    pub registry: Registry<Arc<Session>>,
    /// Live sessions by relay-channel token.
    pub(crate) channels: DashMap<ChannelId, Arc<Session>>,
    pub metrics: Metrics,
    pub(crate) ports: Mutex<PortTable>,
    pub(crate) unusable: Mutex<BTreeSet<u16>>,
    pub(crate) store: PortStore,
    pub(crate) save_lock: tokio::sync::Mutex<()>,
    pub(crate) listeners: DashMap<u16, PublicListener>,
    pub(crate) handshakes: Arc<Semaphore>,
    pub shutdown: CancellationToken,
    /// Set on SIGTERM: no new nodes or public connections; `/readyz` says 503.
    pub draining: std::sync::atomic::AtomicBool,
    /// Handshake rate per source address.
    pub(crate) handshake_rate: Mutex<ferry_proto::rate::PerAddress>,
    /// Public-port connections per source IP.
    pub(crate) connection_rate: Mutex<ferry_proto::rate::PerAddress>,
    /// Where the fleet's nodes are (`--fleet`; empty without one).
    pub whereabouts: Mutex<Whereabouts>,
    /// Writes for the fleet's engine (`--fleet`), made in order by
    /// `Fleet::carry_writes` once the engine is reached.
    pub fleet_writes: Option<tokio::sync::mpsc::Sender<FleetWrite>>,
    /// A fleet write was lost (a full queue or an engine that did not take it): the
    /// presence bucket is rewritten from the sessions here at the next chance.
    pub fleet_stale: std::sync::atomic::AtomicBool,
    /// Told when the fleet's engine answers again after an outage: the watches of
    /// its buckets are made anew.
    pub fleet_back: tokio::sync::Notify,
    /// A session began or ended: the last-nodes file is due (`crate::restart`).
    pub(crate) nodes_changed: tokio::sync::Notify,
    /// No session's certificate expires before this (Unix seconds; lower than the
    /// truth after the session holding the earliest one left, which costs one look):
    /// until then an unchanged policy needs no look at the sessions.
    pub(crate) next_expiry: std::sync::atomic::AtomicU64,
    /// When a per-address rate limit was last reported in the log.
    pub(crate) rate_limit_said_at: Mutex<Option<std::time::Instant>>,
}

/// Shortest time between two log lines about per-address rate limits.
const RATE_LIMIT_LOG_GAP: std::time::Duration = std::time::Duration::from_secs(10);

impl State {
    /// Queues a write for the fleet's engine (nothing waits for it); without a fleet,
    /// nothing happens.
    pub fn tell_fleet(&self, write: FleetWrite) {
        if let Some(queue) = &self.fleet_writes
            && queue.try_send(write).is_err()
        {
            self.fleet_stale.store(true, Ordering::Relaxed);
        }
    }

    /// The relays holding a session of `node` now: this one first if it does, then
    /// the fleet's other live relays that do.
    pub fn locate(&self, node: &NodeId) -> Vec<RelayUrl> {
        let here = self.registry.get(node).is_some().then(|| self.url.clone());
        let elsewhere = lock(&self.whereabouts).locate(node, &self.id);
        here.into_iter().chain(elsewhere).collect()
    }

    /// The nodes with a session here now.
    pub fn session_nodes(&self) -> BTreeSet<NodeId> {
        self.registry.nodes().into_iter().collect()
    }

    /// Counts one handshake from `ip` against its rate; false (and counted as a limit
    /// hit) when the source is over it.
    pub(crate) fn handshake_allowed(&self, ip: std::net::IpAddr) -> bool {
        self.within_rate(
            &self.handshake_rate,
            ip,
            Limit::HandshakeRate,
            "node handshakes",
            "--handshakes-per-ip-per-sec",
            self.opts.limits.handshakes_per_ip_per_sec,
        )
    }

    /// Whether a public-port connection from `ip` is within the per-address rate.
    pub(crate) fn connection_allowed(&self, ip: std::net::IpAddr) -> bool {
        self.within_rate(
            &self.connection_rate,
            ip,
            Limit::ConnectionRate,
            "public-port connections",
            "--connections-per-ip-per-sec",
            self.opts.limits.connections_per_ip_per_sec,
        )
    }

    /// Counts one `what` from `ip` against a per-address rate; over it: the limit hit
    /// counted, the log told (`say_rate_limited`), false.
    fn within_rate(
        &self,
        rate: &Mutex<ferry_proto::rate::PerAddress>,
        ip: std::net::IpAddr,
        limit: Limit,
        what: &str,
        setting: &str,
        per_second: f64,
    ) -> bool {
        let ok = lock(rate).allow(ip, std::time::Instant::now());
        if !ok {
            self.metrics.limit_hit(limit);
            self.say_rate_limited(ip, what, setting, per_second);
        }
        ok
    }

    /// Tells the operator that a per-address rate is closing `what` from `ip`, at most
    /// once per [`RATE_LIMIT_LOG_GAP`] (a flood must not flood the log too); the
    /// metric counts every one.
    fn say_rate_limited(&self, ip: std::net::IpAddr, what: &str, setting: &str, rate: f64) {
        let now = std::time::Instant::now();
        {
            let mut said = lock(&self.rate_limit_said_at);
            if said.is_some_and(|at| now.duration_since(at) < RATE_LIMIT_LOG_GAP) {
                return;
            }
            *said = Some(now);
        }
        tracing::warn!(
            "{what} from {ip} are over {setting} ({rate} a second, bursts of ten times that): \
             closing them (counted in ferry_relay_limit_hits_total); raise the setting if \
             this address is legitimate"
        );
    }
}

impl State {
    /// True when `node`'s session holds a valid certificate of this relay's grid.
    /// Not the same as admitted: a grid relay also admits the nodes on its allow
    /// list, with any certificate or none.
    pub fn is_grid_member(&self, node: &NodeId, session: &Session) -> bool {
        lock(&session.certificate).as_ref().is_some_and(|cert| {
            self.access
                .grid_view()
                .member(node, cert, SystemTime::now())
                .is_ok()
        })
    }

    /// Applies the policy in force to every live session: a node it no longer admits
    /// (revoked, denied, certificate expired) is told why and cut off. With
    /// `changed` (the lists or the fleet's relays changed), members still admitted
    /// are sent the grid as it is now.
    /// A session in the registry now holds a certificate that expires at `expires`
    /// (Unix seconds).
    pub(crate) fn note_certificate(&self, expires: u64) {
        self.next_expiry.fetch_min(expires, Ordering::Relaxed);
    }

    pub fn recheck_sessions(&self, changed: bool) {
        let sessions = if changed {
            self.registry.snapshot()
        } else {
            // The same policy gives the same answers, except to a certificate that
            // has expired since: only those are asked again. (Asking every session
            // every second took a tenth of a core at 100,000 idle nodes.)
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            if now < self.next_expiry.load(Ordering::Relaxed) {
                return;
            }
            // Forgotten before the look, so a certificate noted during it stays noted
            // (`note_certificate` is called once the session is in the registry).
            self.next_expiry.store(u64::MAX, Ordering::Relaxed);
            let mut next = u64::MAX;
            let expired = self.registry.select(|session| {
                let Some(expires) = lock(&session.certificate)
                    .as_ref()
                    .map(|c| c.membership.expires)
                else {
                    return false;
                };
                if expires > now {
                    next = next.min(expires);
                }
                expires <= now
            });
            self.next_expiry.fetch_min(next, Ordering::Relaxed);
            if expired.is_empty() {
                return;
            }
            expired
        };
        let grid = self.access.grid_view();
        for (node, session) in sessions {
            let cert = lock(&session.certificate).clone();
            let Err(refusal) = self.access.admit(&node, cert.as_ref(), &self.metrics) else {
                // Members still admitted learn the grid as it is now: a revocation
                // reaches every member's overlay within this round trip. Sent in
                // order behind queued packets, never dropped like a full queue would.
                // The view computed above, not one per session: it holds up to
                // MAX_GRID_REVOKED entries.
                let member = cert
                    .as_ref()
                    .is_some_and(|c| grid.member(&node, c, SystemTime::now()).is_ok());
                if !changed || !member {
                    continue;
                }
                let tx = session.tx.clone();
                let view = Control::Grid {
                    view: Box::new(grid.clone()),
                };
                tokio::spawn(async move { tx.send_async(Frame::Control(view)).await });
                continue;
            };
            tracing::info!("cutting off node {node}: {refusal}");
            // Its old link, if it just moved, with the public connections on it.
            let predecessor = lock(&session.predecessor).take();
            if let Some(old) = predecessor.and_then(|old| old.upgrade()) {
                old.link.close("refused by the relay's policy");
            }
            session.link.close_after_telling(
                &session.tx,
                Control::Error {
                    code: ErrorCode::Denied,
                    message: refusal.to_string(),
                },
                "refused by the relay's policy",
            );
        }
    }
}

/// JSON view of one connected node for `/api/nodes`.
#[derive(Serialize)]
pub struct NodeView {
    pub node_id: NodeId,
    pub transport: link::LinkKind,
    pub remote_addr: SocketAddr,
    pub connected_since: u64,
    pub services: Vec<ServiceGrant>,
    pub bytes_to_node: u64,
    pub bytes_from_node: u64,
}

impl State {
    pub fn node_views(&self) -> Vec<NodeView> {
        let mut views: Vec<NodeView> = self
            .registry
            .snapshot()
            .into_iter()
            .map(|(node_id, s)| NodeView {
                node_id,
                transport: s.link.kind(),
                remote_addr: s.link.remote_addr(),
                connected_since: s
                    .connected_at
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                services: lock(&s.services).clone(),
                bytes_to_node: s.bytes_to_node.load(Ordering::Relaxed),
                bytes_from_node: s.bytes_from_node.load(Ordering::Relaxed),
            })
            .collect();
        views.sort_by_key(|v| v.node_id);
        views
    }
}
