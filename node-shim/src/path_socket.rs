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
use ferry_proto::frame::{self, Frame};
use ferry_proto::link::Link;
use ferry_proto::probe;
use ferry_proto::stream_socket::poll_recv_queue;
use prometheus::{IntCounter, IntCounterVec, Opts};
use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::paths::Route;

/// Relayed packets received and not yet read by the QUIC endpoint.
const INBOUND_QUEUE: usize = 2048;

/// Receive batches in a row that held nothing for QUIC before the receive call yields:
/// a flood of strangers' datagrams must not keep the endpoint's task from other work.
const RECEIVE_BUDGET: usize = 32;

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
}

/// The socket quinn drives.
pub struct PathSocket {
    udp: Arc<UdpSocket>,
    /// quinn-udp's view of the same socket: GRO/GSO support and batched I/O.
    state: UdpSocketState,
    /// Which source `poll_recv` tries first (flips each call), so a busy relayed
    /// transfer and a busy direct one never starve each other.
    relayed_first: std::sync::atomic::AtomicBool,
    pub peers: PeerTable,
    /// Current route of each peer; absent means relayed.
    routes: DashMap<NodeId, Route>,
    /// Real addresses at which a peer is known (candidates it was probed or heard at).
    known: DashMap<SocketAddr, NodeId>,
    /// Real addresses of relays: QUIC from them goes to the relay connections.
    relays: DashMap<SocketAddr, ()>,
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
        let std = std::net::UdpSocket::bind(addr)?;
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
            relayed_first: std::sync::atomic::AtomicBool::new(false),
            peers: PeerTable::default(),
            routes: DashMap::new(),
            known: DashMap::new(),
            relays: DashMap::new(),
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

    /// The UDP socket's local address (port shared by every path).
    pub fn udp_local_addr(&self) -> io::Result<SocketAddr> {
        self.udp.local_addr()
    }

    /// Relay session `index` can carry relayed packets (replacing an older session
    /// of the same relay): as datagrams on `link` when they fit, else as frames on
    /// `frames`. The lowest index among live sessions is used, so every node of a
    /// grid prefers the same relay and both ends of a connection meet there.
    pub fn set_relay(&self, index: usize, frames: frame::FrameSender, link: Option<Link>) {
        let mut relays = self.relay.lock().unwrap_or_else(|p| p.into_inner());
        relays.retain(|slot| slot.index != index);
        relays.push(RelaySlot {
            index,
            frames,
            link,
        });
        relays.sort_by_key(|slot| slot.index);
    }

    /// Stops using the relay session whose frame queue is `frames` (it ended, or its
    /// relay is draining); relayed packets move to the next live relay at once.
    pub fn clear_relay(&self, frames: &frame::FrameSender) {
        let mut relays = self.relay.lock().unwrap_or_else(|p| p.into_inner());
        relays.retain(|slot| !slot.frames.same_channel(frames));
    }

    /// Accepts QUIC from this relay address (call before dialling the relay).
    pub fn allow_relay(&self, addr: SocketAddr) {
        self.relays.insert(canonical(addr), ());
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

    /// Delivers a packet that arrived from the relay, sent by `from`.
    pub fn deliver(&self, from: NodeId, data: Bytes) {
        let Some(addr) = self.peers.addr_of(from) else {
            self.dropped.inc();
            return;
        };
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
        let to = canonical(to);
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
    fn sort_received(&self, bufs: &[IoSliceMut<'_>], meta: &mut [RecvMeta]) -> usize {
        let mut kept = 0;
        for (buf, meta) in bufs.iter().zip(meta.iter_mut()) {
            let from = canonical(meta.addr);
            // quinn would answer from the address a packet came to; the shim's peers
            // and relays know it by the one socket address, so let the kernel choose.
            meta.dst_ip = None;
            let quic_len = self.take_control(&buf[..meta.len], meta.stride, from);
            meta.len = quic_len;
            if quic_len == 0 {
                continue;
            }
            if self.relays.contains_key(&from) {
                // quinn sees the socket as IPv6 (see `local_addr`), so relay
                // connections know the relay by its IPv4-mapped address.
                meta.addr = mapped(from);
                kept += 1;
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

    /// Hands the probes and STUN messages in one received batch (`stride`-byte
    /// segments from one sender) to the path driver; returns the length of the QUIC
    /// segments that lead the batch. GRO only joins equal-sized datagrams of one flow,
    /// so a probe practically never shares a batch with QUIC; if one does, QUIC
    /// segments after it are dropped (QUIC resends them).
    fn take_control(&self, batch: &[u8], stride: usize, from: SocketAddr) -> usize {
        let stride = if stride == 0 {
            batch.len().max(1)
        } else {
            stride
        };
        let mut quic_len = 0;
        let mut leading = true;
        for segment in batch.chunks(stride) {
            let control = if probe::is_probe(segment) {
                Some(ControlPacket::Probe {
                    from,
                    data: Bytes::copy_from_slice(segment),
                })
            } else if is_stun(segment) {
                Some(ControlPacket::Stun {
                    from,
                    data: Bytes::copy_from_slice(segment),
                })
            } else {
                None
            };
            match control {
                Some(packet) => {
                    leading = false;
                    if self.control_tx.try_send(packet).is_err() {
                        self.dropped.inc();
                    }
                }
                None if leading => quic_len += segment.len(),
                None => self.dropped.inc(),
            }
        }
        quic_len
    }

    /// Reads datagrams from the socket into quinn's buffers and sorts them.
    fn poll_socket(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        for _ in 0..RECEIVE_BUDGET {
            std::task::ready!(self.udp.poll_recv_ready(cx))?;
            let received = self.udp.try_io(Interest::READABLE, || {
                self.state.recv((&*self.udp).into(), bufs, meta)
            });
            match received {
                Ok(n) => {
                    if self.sort_received(&bufs[..n], &mut meta[..n]) > 0 {
                        return Poll::Ready(Ok(n));
                    }
                }
                // Readiness cleared: the next `poll_recv_ready` registers the waker.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // ICMP errors for earlier sends surface here on Linux (for example
                // "connection refused" after probing a closed port); they say
                // nothing about this socket, so keep reading.
                Err(e) => tracing::trace!("UDP receive error: {e}"),
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn poll_relayed(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut rx = self.inbound_rx.lock().unwrap_or_else(|p| p.into_inner());
        poll_recv_queue(&mut rx, cx, bufs, meta, |item| item)
    }

    /// Sends a QUIC transmit (one packet, or several of `segment_size` for GSO) to a
    /// real address. Returns whether it left; `WouldBlock` is quinn's to retry, any
    /// other failure is counted and treated as loss.
    fn send_udp(&self, transmit: &Transmit, to: SocketAddr) -> io::Result<bool> {
        let out = Transmit {
            destination: to,
            ecn: transmit.ecn,
            contents: transmit.contents,
            segment_size: transmit.segment_size,
            src_ip: None,
        };
        let sent = self.udp.try_io(Interest::WRITABLE, || {
            self.state.try_send((&*self.udp).into(), &out)
        });
        match sent {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(e),
            // Like a lost datagram: QUIC recovers; an error here would not help.
            Err(e) => {
                tracing::trace!("UDP send to {to} failed: {e}");
                self.dropped.inc();
                Ok(false)
            }
        }
    }

    /// Sends one overlay packet to `peer` through the preferred relay: as a QUIC
    /// DATAGRAM when it fits the link, else as a frame on the session stream.
    fn send_relayed(&self, peer: NodeId, packet: &[u8]) {
        let relays = self.relay.lock().unwrap_or_else(|p| p.into_inner());
        let Some(slot) = relays.first() else {
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

/// The IPv4-mapped IPv6 form of an IPv4 address (IPv6 addresses unchanged).
fn mapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(v4) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        v6 => v6,
    }
}

/// IPv4-mapped IPv6 sources as plain IPv4, so maps keyed by address agree.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// A STUN message starts with two zero bits and carries the magic cookie at 4..8.
fn is_stun(packet: &[u8]) -> bool {
    packet.len() >= 20 && packet[0] & 0xc0 == 0 && packet[4..8] == [0x21, 0x12, 0xa4, 0x42]
}

/// `sendmsg` with an `IP_TTL` control message: the TTL applies to this one datagram,
/// so QUIC packets sent at the same moment from the same socket keep the normal TTL.
/// Written by hand because tokio and socket2 only offer the socket-wide option, and
/// changing that would race with concurrent QUIC sends.
fn send_with_ttl(fd: i32, data: &[u8], to: SocketAddr, ttl: u8) -> io::Result<()> {
    let SocketAddr::V4(v4) = to else {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "low-TTL priming is only done over IPv4",
        ));
    };
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    addr.sin_family = libc::AF_INET as libc::sa_family_t;
    addr.sin_port = v4.port().to_be();
    addr.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let ttl_value: libc::c_int = ttl.into();
    // Room for one cmsg carrying a c_int, aligned as the kernel expects.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = &mut addr as *mut libc::sockaddr_in as *mut libc::c_void;
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    // SAFETY: `msg` points at live buffers sized above; CMSG_FIRSTHDR is non-null
    // because msg_controllen >= CMSG_SPACE(c_int).
    let sent = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::IPPROTO_IP;
        (*cmsg).cmsg_type = libc::IP_TTL;
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

/// quinn's writability check: the real socket's send readiness.
struct Writable(Arc<UdpSocket>);

impl fmt::Debug for Writable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Writable")
    }
}

impl UdpPoller for Writable {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        self.0.poll_send_ready(cx)
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
            Route::Relayed => {
                let segment = transmit.segment_size.unwrap_or(transmit.contents.len());
                for packet in transmit.contents.chunks(segment.max(1)) {
                    self.send_relayed(peer, packet);
                }
            }
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
        socket.set_relay(0, tx, None);
        socket.try_send(&transmit(vaddr, b"two")).unwrap();
        assert_eq!(
            rx.recv_async().await.ok(),
            Some(Frame::Packet {
                peer,
                data: Bytes::from_static(b"two")
            })
        );
        // What the relay hands back comes to quinn from the peer's virtual address.
        socket.deliver(peer, Bytes::from_static(b"relayed back"));
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
        let mut stun = vec![0u8; 20];
        stun[4..8].copy_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
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
        let bufs = [IoSliceMut::new(&mut storage)];
        let mut meta = [RecvMeta {
            addr: remote.local_addr().unwrap(),
            len: batch.len(),
            stride: 1200,
            ecn: None,
            dst_ip: None,
        }];
        assert_eq!(socket.sort_received(&bufs, &mut meta), 1);
        assert_eq!((meta[0].addr, meta[0].len), (vaddr, 2400));
        assert!(
            matches!(control.try_recv(), Ok(ControlPacket::Probe { data, .. }) if data[..] == probe[..])
        );

        // A batch from a stranger is dropped whole.
        meta[0].addr = "127.0.0.1:9".parse().unwrap();
        meta[0].len = 2400;
        assert_eq!(socket.sort_received(&bufs, &mut meta), 0);
        assert_eq!(meta[0].len, 0);
    }

    #[tokio::test]
    async fn a_gso_transmit_to_a_relayed_peer_becomes_one_frame_per_packet() {
        let (socket, _control) = PathSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let peer = SecretKey::generate().node_id();
        let vaddr = socket.peers.addr_of(peer).unwrap();
        let (tx, rx) = frame::frame_queue(8);
        socket.set_relay(0, tx, None);
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
