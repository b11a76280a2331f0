//! The shim's one UDP socket and the quinn `AsyncUdpSocket` over it (SPEC §2: one
//! socket carries rendezvous, relay-over-QUIC and direct peer traffic, so the NAT
//! mapping the rendezvous observes is the one a peer must hit).
//!
//! One quinn endpoint runs over this socket: its relay connections talk to the
//! relay's real address; its overlay connections talk to *virtual* peer addresses (an
//! IPv6 ULA per peer node). For each virtual address the socket picks the path right
//! now — straight to the peer's verified UDP address, or wrapped in a `Frame::Packet`
//! on the relay session — so QUIC sees one stable peer address while the path under
//! it moves between relay and direct without breaking a stream.
//!
//! Received datagrams are sorted by their first bytes and source: path probes and STUN
//! answers go to the path driver; QUIC from a peer's known address is delivered as
//! from that peer's virtual address; QUIC from a relay passes through; anything else
//! is dropped (nobody can reach the endpoint except through a verified path).
//!
//! The sorting happens in place, inside quinn's own receive call: the socket is read
//! with quinn-udp (`recvmmsg` batches and GRO, so one system call brings up to dozens
//! of datagrams from one sender as one buffer) straight into quinn's buffers, and only
//! the source address of each batch is rewritten. Sends go out through quinn-udp too,
//! with GSO, so a burst of QUIC packets to a peer or a relay is one system call.
//!
//! Like UDP, this layer drops rather than queues without bound: a full queue or a
//! missing relay session loses the packet and QUIC retransmits.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use dashmap::DashMap;
use ferry_proto::NodeId;
use ferry_proto::channel::{self, ChannelToken};
use ferry_proto::frame::{self, Control, Frame};
use ferry_proto::link::Link;
use ferry_proto::probe;
use ferry_proto::stream_socket::poll_recv_queue;
use ferry_proto::udp::{Writable, poll_recv_sorted, retain_segments};
use prometheus::{IntCounter, IntCounterVec, Opts};
use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::paths::Route;
use ferry_proto::sync::lock;

/// Relayed packets received and not yet read by the QUIC endpoint.
const INBOUND_QUEUE: usize = 2048;

/// How often a relay session carries a ping while overlay packets leave on its relay's
/// channel, which nobody acknowledges: the relay's QUIC acknowledges the ping, well
/// inside the liveness check's one second, so a dead relay is noticed as quickly as
/// when the packets rode the link.
const CHANNEL_HEARTBEAT: std::time::Duration = std::time::Duration::from_millis(250);

/// Shortest time between two pings a relay's restart notices cause.
const RESTART_NOTICE_GAP: std::time::Duration = std::time::Duration::from_secs(1);

/// Probes and STUN answers waiting for the path driver; beyond this they are dropped
/// (a flood of probes cannot grow memory; genuine ones are retried).
const CONTROL_QUEUE: usize = 512;

/// Peers this shim will track at once. Each costs a few small map entries; the bound
/// stops a flood of packets from fresh node IDs from growing the maps forever.
pub const MAX_PEERS: usize = 65_536;

/// Port of every virtual address (any non-zero value works; QUIC needs one).
const VIRTUAL_PORT: u16 = 7842;

/// ULA prefix fd66:6572:7279::/48 ("fer" "ry") for virtual peer addresses.
const VIRTUAL_PREFIX: [u16; 3] = [0xfd66, 0x6572, 0x7279];

fn virtual_addr(n: u64) -> SocketAddr {
    let [a, b, c] = VIRTUAL_PREFIX;
    let ip = Ipv6Addr::new(
        a,
        b,
        c,
        0,
        (n >> 48) as u16,
        (n >> 32) as u16,
        (n >> 16) as u16,
        n as u16,
    );
    SocketAddr::V6(SocketAddrV6::new(ip, VIRTUAL_PORT, 0, 0))
}

fn is_virtual(addr: &SocketAddr) -> bool {
    match addr {
        SocketAddr::V6(v6) => {
            let s = v6.ip().segments();
            s[..3] == VIRTUAL_PREFIX && s[3] == 0
        }
        SocketAddr::V4(_) => false,
    }
}

/// Bidirectional node ID ↔ virtual address table.
#[derive(Default)]
pub struct PeerTable {
    by_node: DashMap<NodeId, SocketAddr>,
    by_addr: DashMap<SocketAddr, NodeId>,
    next: AtomicU64,
}

impl PeerTable {
    /// The virtual address of `node`, allocated on first use; `None` when full.
    pub fn addr_of(&self, node: NodeId) -> Option<SocketAddr> {
        if let Some(a) = self.by_node.get(&node) {
            return Some(*a);
        }
        if self.by_node.len() >= MAX_PEERS {
            return None;
        }
        let addr = *self
            .by_node
            .entry(node)
            .or_insert_with(|| virtual_addr(self.next.fetch_add(1, Ordering::Relaxed) + 1));
        self.by_addr.insert(addr, node);
        Some(addr)
    }

    pub fn node_at(&self, addr: &SocketAddr) -> Option<NodeId> {
        self.by_addr.get(addr).map(|n| *n)
    }
}

/// A datagram for the path driver.
#[derive(Debug)]
pub enum ControlPacket {
    Probe { from: SocketAddr, data: Bytes },
    Stun { from: SocketAddr, data: Bytes },
}

/// A live relay session that can carry relayed overlay packets.
struct RelaySlot {
    /// The relay's place in the shim's relay list (lower is preferred).
    index: usize,
    /// The session's outgoing frame queue, for packets too large for a datagram.
    frames: frame::FrameSender,
    /// The link itself, for packets sent as QUIC DATAGRAMs (absent in unit tests).
    link: Option<Link>,
    /// The relay channel, when the relay offered one and its link runs on this
    /// socket: plain UDP to the relay's address (see `ferry_proto::channel`).
    channel: Option<(ChannelToken, SocketAddr)>,
    /// When the session last carried a ping because of channel traffic (see
    /// `CHANNEL_HEARTBEAT`).
    heartbeat_at: Option<std::time::Instant>,
}

/// The socket quinn drives.
pub struct PathSocket {
    udp: Arc<UdpSocket>,
    /// quinn-udp's view of the same socket: GRO/GSO support and batched I/O.
    state: UdpSocketState,
    /// Private mode: not one UDP packet may leave (see [`PathSocket::forbid_udp`]).
    udp_forbidden: std::sync::atomic::AtomicBool,
    /// The socket is IPv6 with IPv4 mapped in: IPv4 destinations are handed to the
    /// kernel as `::ffff:a.b.c.d`. Everything inside the shim keys addresses in their
    /// plain form ([`canonical`]).
    dual_stack: bool,
    /// Which source `poll_recv` tries first (flips each call), so a busy relayed
    /// transfer and a busy direct one never starve each other.
    relayed_first: std::sync::atomic::AtomicBool,
    pub peers: PeerTable,
    /// Current route of each peer; absent means relayed.
    routes: DashMap<NodeId, Route>,
    /// Real addresses at which a peer is known (candidates it was probed or heard at).
    known: DashMap<SocketAddr, NodeId>,
    /// Real addresses of relays: QUIC from them goes to the relay connections. With
    /// this node's channel token when that relay's channel is in use.
    relays: DashMap<SocketAddr, Option<ChannelToken>>,
    /// Relay session index by the relay's address, for channel packets: which relay a
    /// peer's packets came through.
    relay_index: DashMap<SocketAddr, usize>,
    /// Relay sessions by their relay's address, for restart notices, with when a
    /// notice last made them ping.
    restart_watch: DashMap<SocketAddr, (frame::FrameSender, Option<std::time::Instant>)>,
    /// Peers relayed through a relay other than the preferred one (see
    /// [`PathSocket::pin`]), by relay index.
    pins: DashMap<NodeId, usize>,
    /// Index of the preferred relay (the first live one), `usize::MAX` with none.
    preferred: std::sync::atomic::AtomicUsize,
    /// Where channel packets are put together before they leave (one transmit at a
    /// time: quinn's sends come from its endpoint task).
    channel_scratch: Mutex<Vec<u8>>,
    /// Relayed packets (they arrive on relay links, not on the socket).
    inbound_tx: mpsc::Sender<(SocketAddr, Bytes)>,
    inbound_rx: Mutex<mpsc::Receiver<(SocketAddr, Bytes)>>,
    control_tx: mpsc::Sender<ControlPacket>,
    /// The live relay sessions that carry overlay packets, by relay index; the first
    /// (the highest-priority relay) is used.
    relay: Mutex<Vec<RelaySlot>>,
    /// Packets dropped (no relay session, full queue, unknown sender, too many peers);
    /// exported as `ferry_shim_overlay_packets_dropped_total`.
    pub dropped: IntCounter,
    /// Overlay bytes by direction (sent, received) and path (direct, relayed).
    pub bytes: IntCounterVec,
    /// The four children of `bytes`, looked up once: they move with every packet.
    sent_direct: IntCounter,
    sent_relayed: IntCounter,
    received_direct: IntCounter,
    received_relayed: IntCounter,
}

impl fmt::Debug for PathSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PathSocket")
    }
}

impl PathSocket {
    /// Binds the shim's UDP socket. Returns the socket and the receiver of probes and
    /// STUN answers. The socket is read by the QUIC endpoint it is given to, which
    /// must keep running for probes and STUN answers to arrive.
    pub fn bind(addr: SocketAddr) -> io::Result<(Arc<Self>, mpsc::Receiver<ControlPacket>)> {
        let (std, dual_stack) = bind_udp(addr)?;
        std.set_nonblocking(true)?;
        ferry_proto::link::size_udp_buffers(&std, ferry_proto::link::SHIM_UDP_BUFFER, "shim");
        let state = UdpSocketState::new((&std).into())?;
        let udp = Arc::new(UdpSocket::from_std(std)?);
        let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_QUEUE);
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let metric_err = |e: prometheus::Error| io::Error::other(e.to_string());
        let dropped = IntCounter::new(
            "ferry_shim_overlay_packets_dropped_total",
            "Overlay packets dropped: no relay session, a full queue, an unknown sender, or too many peers",
        )
        .map_err(metric_err)?;
        let bytes = IntCounterVec::new(
            Opts::new(
                "ferry_shim_overlay_packet_bytes_total",
                "Overlay (end-to-end QUIC) bytes by direction (sent, received) and path (direct, relayed)",
            ),
            &["direction", "path"],
        )
        .map_err(metric_err)?;
        let socket = Arc::new(PathSocket {
            udp,
            state,
            udp_forbidden: std::sync::atomic::AtomicBool::new(false),
            dual_stack,
            relayed_first: std::sync::atomic::AtomicBool::new(false),
            peers: PeerTable::default(),
            routes: DashMap::new(),
            known: DashMap::new(),
            relays: DashMap::new(),
            relay_index: DashMap::new(),
            restart_watch: DashMap::new(),
            pins: DashMap::new(),
            preferred: std::sync::atomic::AtomicUsize::new(usize::MAX),
            channel_scratch: Mutex::new(Vec::new()),
            inbound_tx,
            inbound_rx: Mutex::new(inbound_rx),
            control_tx,
            relay: Mutex::new(Vec::new()),
            dropped,
            sent_direct: bytes.with_label_values(&["sent", "direct"]),
            sent_relayed: bytes.with_label_values(&["sent", "relayed"]),
            received_direct: bytes.with_label_values(&["received", "direct"]),
            received_relayed: bytes.with_label_values(&["received", "relayed"]),
            bytes,
        });
        Ok((socket, control_rx))
    }

    /// From now on every UDP send fails (private mode). The mode's other rules already
    /// keep every packet on relay links; this is the backstop that makes a mistake
    /// elsewhere an error in the log rather than a packet revealing the node's address.
    pub fn forbid_udp(&self) {
        self.udp_forbidden.store(true, Ordering::Relaxed);
    }

    fn check_udp_allowed(&self, to: SocketAddr) -> io::Result<()> {
        if self.udp_forbidden.load(Ordering::Relaxed) {
            tracing::error!("refused to send a UDP packet to {to}: private mode sends no UDP");
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "private mode sends no UDP",
            ));
        }
        Ok(())
    }

    /// Whether the socket reaches IPv6 as well as IPv4.
    pub fn is_dual_stack(&self) -> bool {
        self.dual_stack
    }

    /// `addr` as the kernel wants it for this socket.
    fn to_kernel(&self, addr: SocketAddr) -> SocketAddr {
        if self.dual_stack {
            mapped(canonical(addr))
        } else {
            canonical(addr)
        }
    }

    /// The UDP socket's local address (port shared by every path).
    pub fn udp_local_addr(&self) -> io::Result<SocketAddr> {
        self.udp.local_addr()
    }

    /// Relay session `index` can carry relayed packets (replacing an older session
    /// of the same relay): on the relay channel when the relay at that address gave
    /// this node a token and its link runs on this socket, else as datagrams on `link` when they fit,
    /// else as frames on `frames`. The lowest index among live sessions is used, so
    /// every node of a grid prefers the same relay and both ends of a connection
    /// meet there.
    pub fn set_relay(
        &self,
        index: usize,
        frames: frame::FrameSender,
        link: Option<Link>,
        channel: Option<(ChannelToken, SocketAddr)>,
    ) {
        // Only for a relay whose link runs on this socket (`allow_relay`).
        let channel = channel.and_then(|(token, relay)| {
            let relay = canonical(relay);
            let mut entry = self.relays.get_mut(&relay)?;
            *entry = Some(token);
            self.relay_index.insert(relay, index);
            Some((token, relay))
        });
        let mut relays = lock(&self.relay);
        relays.retain(|slot| slot.index != index);
        relays.push(RelaySlot {
            index,
            frames,
            link,
            channel,
            heartbeat_at: None,
        });
        relays.sort_by_key(|slot| slot.index);
        self.note_preferred(&relays);
    }

    fn note_preferred(&self, relays: &[RelaySlot]) {
        let first = relays.first().map_or(usize::MAX, |slot| slot.index);
        self.preferred.store(first, Ordering::Relaxed);
    }

    /// Relays packets to `peer` through relay session `index` rather than the
    /// preferred relay: the peer has a session only there (`crate::visits`), or its
    /// packets arrive through it. While that session is gone the preferred relay
    /// carries them.
    pub fn pin(&self, peer: NodeId, index: usize) {
        if self.pins.get(&peer).is_none_or(|at| *at != index) {
            self.pins.insert(peer, index);
        }
    }

    /// The relay session `peer` is pinned to, if any.
    pub fn pinned(&self, peer: &NodeId) -> Option<usize> {
        self.pins.get(peer).map(|at| *at)
    }

    /// Forgets every pin to relay session `index` (a visit that ended).
    pub fn unpin_relay(&self, index: usize) {
        self.pins.retain(|_, at| *at != index);
    }

    /// The peers pinned to relay session `index`.
    pub fn pinned_to(&self, index: usize) -> Vec<NodeId> {
        self.pins
            .iter()
            .filter(|e| *e.value() == index)
            .map(|e| *e.key())
            .collect()
    }

    /// Notes that a packet of `peer` came through relay session `via`: answers go
    /// back the same way, so two nodes that share no relay but the one one of them
    /// visits (`crate::visits`) meet there, whichever relay each prefers.
    pub fn heard_via(&self, peer: NodeId, via: usize) {
        if via != self.preferred.load(Ordering::Relaxed) {
            self.pin(peer, via);
        } else if !self.pins.is_empty() && self.pins.get(&peer).is_some() {
            self.pins.remove(&peer);
        }
    }

    /// Stops using the relay session whose frame queue is `frames` (it ended, or its
    /// relay is draining); relayed packets move to the next live relay at once.
    pub fn clear_relay(&self, frames: &frame::FrameSender) {
        let mut relays = lock(&self.relay);
        relays.retain(|slot| {
            let keep = !slot.frames.same_channel(frames);
            // Pins to it stay: they count for nothing while it is gone (packets
            // take the preferred relay), and hold again if it comes back.
            if !keep
                && let Some((_, relay)) = slot.channel
                && let Some(mut token) = self.relays.get_mut(&relay)
            {
                *token = None;
            }
            keep
        });
        self.note_preferred(&relays);
    }

    /// Accepts QUIC from this relay address (call before dialling the relay).
    pub fn allow_relay(&self, addr: SocketAddr) {
        self.relays.entry(canonical(addr)).or_insert(None);
    }

    /// Sets where packets to `peer` go.
    pub fn set_route(&self, peer: NodeId, route: Route) {
        self.routes.insert(peer, route);
    }

    pub fn route(&self, peer: &NodeId) -> Route {
        self.routes.get(peer).map(|r| *r).unwrap_or(Route::Relayed)
    }

    /// Records that QUIC from `addr` is `peer`'s (an address the peer answered on).
    /// A relay's address is never a peer's.
    pub fn know(&self, addr: SocketAddr, peer: NodeId) {
        let addr = canonical(addr);
        if self.relays.contains_key(&addr) {
            return;
        }
        if self.known.len() < MAX_PEERS * 4 || self.known.contains_key(&addr) {
            self.known.insert(addr, peer);
        }
    }

    /// Delivers a packet that arrived from relay session `via`, sent by `from`.
    pub fn deliver(&self, from: NodeId, data: Bytes, via: usize) {
        let Some(addr) = self.peers.addr_of(from) else {
            self.dropped.inc();
            return;
        };
        self.heard_via(from, via);
        let len = data.len() as u64;
        if self.inbound_tx.try_send((addr, data)).is_err() {
            self.dropped.inc();
        } else {
            self.received_relayed.inc_by(len);
        }
    }

    /// Sends one datagram (a probe or STUN request) from the shared socket, with an
    /// explicit IP TTL when `ttl` is given. Errors are the caller's to log.
    pub fn send_control(&self, data: &[u8], to: SocketAddr, ttl: Option<u8>) -> io::Result<()> {
        self.check_udp_allowed(canonical(to))?;
        let to = self.to_kernel(to);
        // Straight to the kernel rather than through tokio's readiness tracking: a
        // probe that finds the buffer full is simply lost, like any datagram.
        match ttl {
            None => socket2::SockRef::from(&*self.udp)
                .send_to(data, &to.into())
                .map(|_| ()),
            Some(ttl) => send_with_ttl(self.udp.as_raw_fd(), data, to, ttl),
        }
    }

    /// Sorts what one receive call brought (see module docs), rewriting each batch's
    /// source to what quinn should see and setting its length to 0 when nothing in it
    /// is for quinn. Returns how many batches quinn should read.
    fn sort_received(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> usize {
        let mut kept = 0;
        for (buf, meta) in bufs.iter_mut().zip(meta.iter_mut()) {
            let from = canonical(meta.addr);
            // quinn would answer from the address a packet came to; the shim's peers
            // and relays know it by the one socket address, so let the kernel choose.
            meta.dst_ip = None;
            let quic_len = self.take_control(buf, meta.len, meta.stride, from);
            meta.len = quic_len;
            if quic_len == 0 {
                continue;
            }
            if let Some(token) = self.relays.get(&from).map(|t| *t) {
                if self.sort_from_relay(buf, meta, token, from) {
                    kept += 1;
                }
                continue;
            }
            let virtual_addr = self
                .known
                .get(&from)
                .map(|p| *p)
                .and_then(|peer| self.peers.addr_of(peer));
            match virtual_addr {
                Some(addr) => {
                    meta.addr = addr;
                    self.received_direct.inc_by(quic_len as u64);
                    kept += 1;
                }
                None => {
                    self.dropped.inc();
                    meta.len = 0;
                }
            }
        }
        kept
    }

    /// Hands the probes and STUN messages in one received batch (`len` bytes of
    /// `stride`-byte segments from one sender) to the path driver; returns the length
    /// of what is left (moved to the front of the batch).
    fn take_control(&self, batch: &mut [u8], len: usize, stride: usize, from: SocketAddr) -> usize {
        retain_segments(batch, len, stride, |segment| {
            let control = if probe::is_probe(segment) {
                ControlPacket::Probe {
                    from,
                    data: Bytes::copy_from_slice(segment),
                }
            } else if ferry_rendezvous::stun::looks_like_stun(segment) {
                ControlPacket::Stun {
                    from,
                    data: Bytes::copy_from_slice(segment),
                }
            } else if channel::parse_restart_notice(segment).is_some() {
                self.restart_notice(from);
                return false;
            } else {
                return true;
            };
            if self.control_tx.try_send(control).is_err() {
                self.dropped.inc();
            }
            false
        })
    }

    /// A restart notice came from `from` (`ferry_proto::channel`): the session whose
    /// link goes there pings the relay now, at most once a second. If it did restart,
    /// the ping meets a stateless reset and the session reconnects at once; if not (a
    /// forged or stray notice), it is one more ping.
    fn restart_notice(&self, from: SocketAddr) {
        let now = std::time::Instant::now();
        if let Some(mut session) = self.restart_watch.get_mut(&from)
            && session
                .1
                .is_none_or(|at| now.duration_since(at) >= RESTART_NOTICE_GAP)
        {
            session.1 = Some(now);
            let _ = session
                .0
                .try_send(Frame::Control(Control::Ping { nonce: 0 }));
        }
    }

    /// Restart notices from `relay` make the session behind `frames` ping it (see
    /// [`PathSocket::restart_notice`]); until [`PathSocket::unwatch_restarts`].
    pub fn watch_restarts(&self, relay: SocketAddr, frames: frame::FrameSender) {
        self.restart_watch.insert(canonical(relay), (frames, None));
    }

    /// Ends [`PathSocket::watch_restarts`] for the session behind `frames`.
    pub fn unwatch_restarts(&self, frames: &frame::FrameSender) {
        self.restart_watch
            .retain(|_, (watcher, _)| !watcher.same_channel(frames));
    }

    /// Sorts a batch from a relay: QUIC for the relay connection, or relay-channel
    /// packets (this node's `token`) from a peer. A batch of channel packets from one
    /// peer (a relayed transfer) has its headers taken out in place and goes to quinn
    /// as from the peer's virtual address; channel packets mixed with other traffic
    /// are copied to the relayed queue. Returns whether quinn gets the batch.
    fn sort_from_relay(
        &self,
        batch: &mut [u8],
        meta: &mut RecvMeta,
        token: Option<ChannelToken>,
        relay: SocketAddr,
    ) -> bool {
        let len = meta.len;
        // A channel is only in use once its session is registered (`set_relay`).
        let via = self
            .relay_index
            .get(&relay)
            .map_or_else(|| self.preferred.load(Ordering::Relaxed), |i| *i);
        let stride = if meta.stride == 0 { len } else { meta.stride };
        let mut one_peer = None;
        let mut all_channel = true;
        for segment in batch[..len].chunks(stride) {
            match token.and_then(|t| t.open(segment)) {
                Some((from, _)) if one_peer.is_none_or(|p| p == from) => {
                    one_peer = Some(from);
                }
                _ => {
                    all_channel = false;
                    break;
                }
            }
        }
        if all_channel
            && let Some(peer) = one_peer
            && let Some(addr) = self.peers.addr_of(peer)
        {
            self.heard_via(peer, via);
            let body_stride = stride - channel::HEADER_LEN;
            let mut out = 0;
            let mut start = 0;
            while start < len {
                let end = (start + stride).min(len);
                batch.copy_within(start + channel::HEADER_LEN..end, out);
                out += end - start - channel::HEADER_LEN;
                start = end;
            }
            meta.addr = addr;
            meta.len = out;
            meta.stride = body_stride;
            self.received_relayed.inc_by(out as u64);
            return true;
        }
        meta.len = retain_segments(batch, len, meta.stride, |segment| {
            if !channel::is_channel(segment) {
                return true;
            }
            match token.and_then(|t| t.open(segment)) {
                Some((from, packet)) => self.deliver(from, Bytes::copy_from_slice(packet), via),
                None => self.dropped.inc(),
            }
            false
        });
        // quinn sees the socket as IPv6 (see `local_addr`), so relay connections know
        // the relay by its IPv4-mapped address.
        meta.addr = mapped(canonical(meta.addr));
        meta.len > 0
    }

    /// Reads datagrams from the socket into quinn's buffers and sorts them.
    fn poll_socket(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        poll_recv_sorted(&self.udp, &self.state, cx, bufs, meta, |bufs, meta| {
            self.sort_received(bufs, meta) > 0
        })
    }

    fn poll_relayed(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut rx = lock(&self.inbound_rx);
        poll_recv_queue(&mut rx, cx, bufs, meta, |item| item)
    }

    /// Sends a QUIC transmit (one packet, or several of `segment_size` for GSO) to a
    /// real address. Returns whether it left; `WouldBlock` is quinn's to retry, any
    /// other failure is counted and treated as loss.
    fn send_udp(&self, transmit: &Transmit, to: SocketAddr) -> io::Result<bool> {
        self.check_udp_allowed(to)?;
        let out = Transmit {
            destination: self.to_kernel(to),
            ecn: transmit.ecn,
            contents: transmit.contents,
            segment_size: transmit.segment_size,
            src_ip: None,
        };
        let sent = ferry_proto::udp::try_send(&self.udp, &self.state, &out)?;
        if !sent {
            // Like a lost datagram: QUIC recovers; an error here would not help.
            self.dropped.inc();
        }
        Ok(sent)
    }

    /// Sends a QUIC transmit (one packet, or several of `segment_size` for GSO) to
    /// `peer` through the preferred relay: on its channel, one system call for the
    /// whole batch, when it has one; else packet by packet on its link.
    fn send_relayed_transmit(&self, peer: NodeId, transmit: &Transmit) -> io::Result<()> {
        let segment = transmit
            .segment_size
            .unwrap_or(transmit.contents.len())
            .max(1);
        let channel = {
            let mut relays = lock(&self.relay);
            self.slot_for(&mut relays, &peer).and_then(|slot| {
                let channel = slot.channel?;
                let now = std::time::Instant::now();
                if slot
                    .heartbeat_at
                    .is_none_or(|at| now.duration_since(at) >= CHANNEL_HEARTBEAT)
                {
                    // A session ping, not a link datagram: `Link::send_datagram`
                    // refuses everything once a dying link's MTU shrinks.
                    slot.heartbeat_at = Some(now);
                    let _ = slot
                        .frames
                        .try_send(Frame::Control(Control::Ping { nonce: 0 }));
                }
                Some(channel)
            })
        };
        let Some((token, relay)) = channel else {
            for packet in transmit.contents.chunks(segment) {
                self.send_relayed(peer, packet);
            }
            return Ok(());
        };
        let mut out = lock(&self.channel_scratch);
        out.clear();
        let mut packets = 0;
        for packet in transmit.contents.chunks(segment) {
            let at = out.len();
            out.resize(at + channel::HEADER_LEN, 0);
            channel::write_header(&mut out[at..], &token, &peer);
            out.extend_from_slice(packet);
            packets += 1;
        }
        let batch = Transmit {
            destination: relay,
            ecn: transmit.ecn,
            contents: &out,
            segment_size: (packets > 1).then_some(segment + channel::HEADER_LEN),
            src_ip: None,
        };
        if self.send_udp(&batch, relay)? {
            self.sent_relayed.inc_by(transmit.contents.len() as u64);
        }
        Ok(())
    }

    /// The relay session packets to `peer` go through: the one it is pinned to while
    /// that is live, else the preferred one.
    fn slot_for<'a>(
        &self,
        relays: &'a mut [RelaySlot],
        peer: &NodeId,
    ) -> Option<&'a mut RelaySlot> {
        let pinned = if self.pins.is_empty() {
            None
        } else {
            self.pins.get(peer).map(|at| *at)
        };
        let at = pinned
            .and_then(|index| relays.iter().position(|slot| slot.index == index))
            .unwrap_or(0);
        relays.get_mut(at)
    }

    /// Sends one overlay packet to `peer` through the preferred relay: as a QUIC
    /// DATAGRAM when it fits the link, else as a frame on the session stream.
    fn send_relayed(&self, peer: NodeId, packet: &[u8]) {
        let mut relays = lock(&self.relay);
        let Some(slot) = self.slot_for(&mut relays, &peer) else {
            self.dropped.inc();
            return;
        };
        let by_datagram = slot.link.as_ref().is_some_and(|link| {
            link.send_datagram(frame::encode_datagram(&peer, packet))
                .is_ok()
        });
        let sent = by_datagram
            || slot
                .frames
                .try_send(Frame::Packet {
                    peer,
                    data: Bytes::copy_from_slice(packet),
                })
                .is_ok();
        if sent {
            self.sent_relayed.inc_by(packet.len() as u64);
        } else {
            self.dropped.inc();
        }
    }
}

pub use ferry_proto::net::canonical;
/// The IPv4-mapped IPv6 form of an IPv4 address (IPv6 addresses unchanged).
use ferry_proto::net::mapped;

/// Binds the shim's socket. The unspecified IPv4 address (the default) becomes a
/// dual-stack IPv6 socket, so one socket reaches relays and peers over both families
/// (SPEC §2); where IPv6 is unavailable it stays IPv4. Returns whether it is dual-stack.
fn bind_udp(addr: SocketAddr) -> io::Result<(std::net::UdpSocket, bool)> {
    let addr = if addr.ip() == std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED) {
        SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), addr.port())
    } else {
        addr
    };
    let socket = ferry_proto::net::bind_udp(addr, "the shim's socket")?;
    let dual_stack = socket.local_addr()?.is_ipv6();
    Ok((socket, dual_stack))
}

/// `sendmsg` with a TTL (IPv4, also IPv4-mapped on a dual-stack socket) or hop-limit
/// (IPv6) control message: it applies to this one datagram, so QUIC packets sent at
/// the same moment from the same socket keep the normal TTL. Written by hand because
/// tokio and socket2 only offer the socket-wide option, and changing that would race
/// with concurrent QUIC sends.
fn send_with_ttl(fd: i32, data: &[u8], to: SocketAddr, ttl: u8) -> io::Result<()> {
    let (level, kind) = match to {
        SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_none() => {
            (libc::IPPROTO_IPV6, libc::IPV6_HOPLIMIT)
        }
        _ => (libc::IPPROTO_IP, libc::IP_TTL),
    };
    let name = socket2::SockAddr::from(to);
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let ttl_value: libc::c_int = ttl.into();
    // Room for one cmsg carrying a c_int, aligned as the kernel expects.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = name.as_ptr() as *mut libc::c_void;
    msg.msg_namelen = name.len();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    // SAFETY: `msg` points at live buffers sized above (`name` outlives the call);
    // CMSG_FIRSTHDR is non-null because msg_controllen >= CMSG_SPACE(c_int).
    let sent = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = level;
        (*cmsg).cmsg_type = kind;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut libc::c_int, ttl_value);
        libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT)
    };
    if sent < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl AsyncUdpSocket for PathSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Writable(self.udp.clone()))
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let dest = transmit.destination;
        if !is_virtual(&dest) {
            // A relay connection: straight out of the socket.
            return self.send_udp(transmit, canonical(dest)).map(|_| ());
        }
        let Some(peer) = self.peers.node_at(&dest) else {
            return Err(io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                "no overlay peer at this virtual address",
            ));
        };
        match self.route(&peer) {
            Route::Direct(addr) => {
                if self.send_udp(transmit, addr)? {
                    self.sent_direct.inc_by(transmit.contents.len() as u64);
                }
            }
            Route::Relayed => self.send_relayed_transmit(peer, transmit)?,
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let relayed_first = self.relayed_first.fetch_xor(true, Ordering::Relaxed);
        if relayed_first && let Poll::Ready(r) = self.poll_relayed(cx, bufs, meta) {
            return Poll::Ready(r);
        }
        if let Poll::Ready(r) = self.poll_socket(cx, bufs, meta) {
            return Poll::Ready(r);
        }
        if relayed_first {
            Poll::Pending
        } else {
            self.poll_relayed(cx, bufs, meta)
        }
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }

    /// An IPv6 address, so quinn accepts the IPv6 virtual peer addresses; it then
    /// hands IPv4 destinations over IPv4-mapped, which `try_send` undoes.
    fn local_addr(&self) -> io::Result<SocketAddr> {
        let port = self.udp.local_addr()?.port();
        Ok(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port))
    }

    fn may_fragment(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::SecretKey;

    #[test]
    fn peers_get_stable_distinct_virtual_addresses() {
        let table = PeerTable::default();
        let (a, b) = (
            SecretKey::generate().node_id(),
            SecretKey::generate().node_id(),
        );
        let aa = table.addr_of(a).unwrap();
        let bb = table.addr_of(b).unwrap();
        assert_ne!(aa, bb);
        assert!(is_virtual(&aa));
        assert_eq!(table.addr_of(a), Some(aa));
        assert_eq!(table.node_at(&bb), Some(b));
        assert_eq!(table.node_at(&virtual_addr(999)), None);
        assert!(!is_virtual(&"[2001:db8::1]:1".parse().unwrap()));
    }

    fn transmit(destination: SocketAddr, contents: &[u8]) -> Transmit<'_> {
        Transmit {
            destination,
            ecn: None,
            contents,
            segment_size: None,
            src_ip: None,
        }
    }

    /// What quinn's next receive call gets: each batch's source and segments.
    async fn receive(socket: &PathSocket) -> Vec<(SocketAddr, Vec<Vec<u8>>)> {
        let mut storage = vec![0u8; 64 * 1024];
        let mut meta = [RecvMeta::default(); 1];
        let n = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            std::future::poll_fn(|cx| {
                let mut bufs = [IoSliceMut::new(&mut storage)];
                socket.poll_recv(cx, &mut bufs, &mut meta)
            }),
        )
        .await
        .expect("a packet for quinn within 5 s")
        .unwrap();
        meta[..n]
            .iter()
            .map(|m| {
                let segments = storage[..m.len]
                    .chunks(m.stride.max(1))
                    .map(<[u8]>::to_vec)
                    .collect();
                (m.addr, segments)
            })
            .collect()
    }

    fn known_peer(socket: &PathSocket) -> (NodeId, SocketAddr, std::net::UdpSocket) {
        let peer = SecretKey::generate().node_id();
        let vaddr = socket.peers.addr_of(peer).unwrap();
        let remote = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_route(peer, Route::Direct(remote.local_addr().unwrap()));
        socket.know(remote.local_addr().unwrap(), peer);
        (peer, vaddr, remote)
    }

    #[tokio::test]
    async fn packets_follow_the_route_and_answers_map_back_to_the_virtual_address() {
        let (socket, _control) = PathSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let here = socket.udp_local_addr().unwrap();
        socket.udp.writable().await.unwrap();
        let peer = SecretKey::generate().node_id();
        let vaddr = socket.peers.addr_of(peer).unwrap();

        // Relayed and no relay yet: dropped, not queued.
        socket.try_send(&transmit(vaddr, b"one")).unwrap();
        assert_eq!(socket.dropped.get(), 1);
        // A relay without a datagram-capable link: the packet goes as a frame.
        let (tx, rx) = frame::frame_queue(4);
        socket.set_relay(0, tx, None, None);
        socket.try_send(&transmit(vaddr, b"two")).unwrap();
        assert_eq!(
            rx.recv_async().await.ok(),
            Some(Frame::Packet {
                peer,
                data: Bytes::from_static(b"two")
            })
        );
        // What the relay hands back comes to quinn from the peer's virtual address.
        socket.deliver(peer, Bytes::from_static(b"relayed back"), 0);
        assert_eq!(
            receive(&socket).await,
            vec![(vaddr, vec![b"relayed back".to_vec()])]
        );

        // Direct: the datagram goes to the peer's real address, and what comes back
        // from that address is delivered as from the virtual one.
        let remote = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let remote_addr = remote.local_addr().unwrap();
        socket.set_route(peer, Route::Direct(remote_addr));
        socket.know(remote_addr, peer);
        socket.try_send(&transmit(vaddr, b"three")).unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = remote.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from.port()), (&b"three"[..], here.port()));

        // A stranger's datagram is dropped; the peer's next one still arrives.
        let before = socket.dropped.get();
        let stranger = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        stranger.send_to(b"hello", here).unwrap();
        remote.send_to(b"four", here).unwrap();
        assert_eq!(
            receive(&socket).await,
            vec![(vaddr, vec![b"four".to_vec()])]
        );
        assert_eq!(socket.dropped.get(), before + 1);
    }

    #[tokio::test]
    async fn probes_and_stun_go_to_the_path_driver_and_quic_around_them_to_quinn() {
        let (socket, mut control) = PathSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let here = socket.udp_local_addr().unwrap();
        let (_, vaddr, remote) = known_peer(&socket);
        let key = SecretKey::generate();
        let probe = probe::Probe {
            kind: probe::ProbeKind::Ping,
            sender: key.node_id(),
            receiver: SecretKey::generate().node_id(),
            tx: 7,
            observed: here,
        }
        .encode(&key);
        let stun = ferry_rendezvous::stun::binding_request(&[3; 12]);
        // Equal-sized QUIC-looking datagrams may be joined by GRO; the control
        // messages must come out whichever way the kernel batches them.
        let quic = [[0x40u8; 1200], [0x41u8; 1200], [0x42u8; 1200]];
        for packet in &quic {
            remote.send_to(packet, here).unwrap();
        }
        remote.send_to(&probe, here).unwrap();
        remote.send_to(&stun, here).unwrap();
        remote.send_to(&quic[0], here).unwrap();

        let mut got = Vec::new();
        while got.len() < 4 {
            for (from, segments) in receive(&socket).await {
                assert_eq!(from, vaddr);
                got.extend(segments);
            }
        }
        let want: Vec<Vec<u8>> = [&quic[0], &quic[1], &quic[2], &quic[0]]
            .iter()
            .map(|p| p.to_vec())
            .collect();
        assert_eq!(got, want);
        let from = remote.local_addr().unwrap();
        match control.recv().await {
            Some(ControlPacket::Probe { from: f, data }) => {
                assert_eq!((f, &data[..]), (from, &probe[..]))
            }
            other => panic!("expected the probe, got {other:?}"),
        }
        match control.recv().await {
            Some(ControlPacket::Stun { from: f, data }) => {
                assert_eq!((f, &data[..]), (from, &stun[..]))
            }
            other => panic!("expected the STUN message, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_probe_at_the_end_of_a_gro_batch_is_taken_out_and_the_quic_before_it_kept() {
        let (socket, mut control) = PathSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let (_, vaddr, remote) = known_peer(&socket);
        let key = SecretKey::generate();
        let probe = probe::Probe {
            kind: probe::ProbeKind::Pong,
            sender: key.node_id(),
            receiver: key.node_id(),
            tx: 1,
            observed: vaddr,
        }
        .encode(&key);
        // As the kernel hands over a GRO batch: equal segments, the last one shorter.
        let mut batch = vec![0x40u8; 2400];
        batch.extend_from_slice(&probe);
        let mut storage = batch.clone();
        let mut bufs = [IoSliceMut::new(&mut storage)];
        let mut meta = [received(remote.local_addr().unwrap(), batch.len(), 1200)];
        assert_eq!(socket.sort_received(&mut bufs, &mut meta), 1);
        assert_eq!((meta[0].addr, meta[0].len), (vaddr, 2400));
        assert!(
            matches!(control.try_recv(), Ok(ControlPacket::Probe { data, .. }) if data[..] == probe[..])
        );

        // A batch from a stranger is dropped whole.
        meta[0].addr = "127.0.0.1:9".parse().unwrap();
        meta[0].len = 2400;
        assert_eq!(socket.sort_received(&mut bufs, &mut meta), 0);
        assert_eq!(meta[0].len, 0);
    }

    #[tokio::test]
    async fn a_gso_transmit_to_a_relayed_peer_becomes_one_frame_per_packet() {
        let (socket, _control) = PathSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let peer = SecretKey::generate().node_id();
        let vaddr = socket.peers.addr_of(peer).unwrap();
        let (tx, rx) = frame::frame_queue(8);
        socket.set_relay(0, tx, None, None);
        let contents: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
        let mut batch = transmit(vaddr, &contents);
        batch.segment_size = Some(1000);
        socket.try_send(&batch).unwrap();
        for chunk in contents.chunks(1000) {
            assert_eq!(
                rx.recv_async().await.ok(),
                Some(Frame::Packet {
                    peer,
                    data: Bytes::copy_from_slice(chunk)
                })
            );
        }
        assert!(rx.try_recv().is_err());
    }

    /// What quinn-udp reports for a batch of `len` bytes in `stride`-byte segments.
    fn received(addr: SocketAddr, len: usize, stride: usize) -> RecvMeta {
        RecvMeta {
            addr,
            len,
            stride,
            ecn: None,
            dst_ip: None,
        }
    }

    /// A socket with a relay at `relay`'s address whose channel token is returned.
    fn with_channel(socket: &PathSocket, relay: SocketAddr) -> ChannelToken {
        let token = ChannelToken::random();
        socket.allow_relay(relay);
        let (tx, _rx) = frame::frame_queue(8);
        socket.set_relay(0, tx, None, Some((token, relay)));
        token
    }

    #[tokio::test]
    async fn a_gso_transmit_to_a_relayed_peer_leaves_on_the_channel_with_a_header_each() {
        let (socket, _control) = PathSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let relay = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let token = with_channel(&socket, relay.local_addr().unwrap());
        let peer = SecretKey::generate().node_id();
        let vaddr = socket.peers.addr_of(peer).unwrap();
        let contents: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
        let mut batch = transmit(vaddr, &contents);
        batch.segment_size = Some(1000);
        // As quinn does: wait until the socket is known to be writable, then send.
        socket.udp.writable().await.unwrap();
        socket.try_send(&batch).unwrap();
        relay
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        for chunk in contents.chunks(1000) {
            let mut buf = [0u8; 2048];
            let (n, from) = relay.recv_from(&mut buf).unwrap();
            assert_eq!(from.port(), socket.udp_local_addr().unwrap().port());
            let (to, body) = token.open(&buf[..n]).expect("a channel packet");
            assert_eq!((to, body), (peer, chunk));
        }
    }

    /// A received batch of channel packets (`token`, from `peers[i]` for segment i).
    fn channel_batch(token: ChannelToken, peers: &[NodeId], body: &[u8]) -> (Vec<u8>, usize) {
        let mut batch = Vec::new();
        for (i, peer) in peers.iter().enumerate() {
            let at = batch.len();
            batch.resize(at + channel::HEADER_LEN, 0);
            channel::write_header(&mut batch[at..], &token, peer);
            let size = if i + 1 == peers.len() {
                body.len() / 2
            } else {
                body.len()
            };
            batch.extend_from_slice(&body[..size]);
        }
        (batch, channel::HEADER_LEN + body.len())
    }

    #[tokio::test]
    async fn a_relayed_batch_from_one_peer_reaches_quinn_in_place_as_from_its_virtual_address() {
        let (socket, _control) = PathSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let relay: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let token = with_channel(&socket, relay);
        let peer = SecretKey::generate().node_id();
        let vaddr = socket.peers.addr_of(peer).unwrap();
        let body = [0x41u8; 1000];
        let (mut storage, stride) = channel_batch(token, &[peer, peer, peer], &body);
        let len = storage.len();
        let mut bufs = [IoSliceMut::new(&mut storage)];
        let mut meta = [received(relay, len, stride)];
        assert_eq!(socket.sort_received(&mut bufs, &mut meta), 1);
        assert_eq!(
            (meta[0].addr, meta[0].len, meta[0].stride),
            (vaddr, 2500, 1000)
        );
        assert!(bufs[0][..2500].iter().all(|b| *b == 0x41));

        // The same batch with another node's token is not ours: dropped.
        let (mut storage, stride) = channel_batch(ChannelToken::random(), &[peer, peer], &body);
        let len = storage.len();
        let mut bufs = [IoSliceMut::new(&mut storage)];
        meta[0] = received(relay, len, stride);
        let dropped = socket.dropped.get();
        assert_eq!(socket.sort_received(&mut bufs, &mut meta), 0);
        assert_eq!(socket.dropped.get(), dropped + 2);
    }

    #[tokio::test]
    async fn a_relayed_batch_from_two_peers_goes_packet_by_packet_to_the_relayed_queue() {
        let (socket, _control) = PathSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let relay: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let token = with_channel(&socket, relay);
        let (a, b) = (
            SecretKey::generate().node_id(),
            SecretKey::generate().node_id(),
        );
        let body = [0x42u8; 1000];
        let (mut storage, stride) = channel_batch(token, &[a, b], &body);
        let len = storage.len();
        let mut bufs = [IoSliceMut::new(&mut storage)];
        let mut meta = [received(relay, len, stride)];
        assert_eq!(socket.sort_received(&mut bufs, &mut meta), 0);
        let mut queue = socket.inbound_rx.lock().unwrap();
        let (from_a, data_a) = queue.try_recv().unwrap();
        let (from_b, data_b) = queue.try_recv().unwrap();
        assert_eq!(from_a, socket.peers.addr_of(a).unwrap());
        assert_eq!(from_b, socket.peers.addr_of(b).unwrap());
        assert_eq!((data_a.len(), data_b.len()), (1000, 500));
    }

    #[tokio::test]
    async fn a_datagram_can_carry_its_own_ttl() {
        let (socket, _control) = PathSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let remote = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .send_control(b"primed", remote.local_addr().unwrap(), Some(5))
            .unwrap();
        let mut buf = [0u8; 16];
        let (n, _) = remote.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"primed");
    }
}
