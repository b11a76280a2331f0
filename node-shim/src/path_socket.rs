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
use ferry_proto::frame::Frame;
use ferry_proto::probe;
use ferry_proto::stream_socket::poll_recv_queue;
use prometheus::{IntCounter, IntCounterVec, Opts};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::paths::Route;

/// Packets received and not yet read by the QUIC endpoint.
const INBOUND_QUEUE: usize = 2048;

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

/// The socket quinn drives.
pub struct PathSocket {
    udp: Arc<UdpSocket>,
    pub peers: PeerTable,
    /// Current route of each peer; absent means relayed.
    routes: DashMap<NodeId, Route>,
    /// Real addresses at which a peer is known (candidates it was probed or heard at).
    known: DashMap<SocketAddr, NodeId>,
    /// Real addresses of relays: QUIC from them goes to the relay connections.
    relays: DashMap<SocketAddr, ()>,
    inbound_tx: mpsc::Sender<(SocketAddr, Bytes)>,
    inbound_rx: Mutex<mpsc::Receiver<(SocketAddr, Bytes)>>,
    control_tx: mpsc::Sender<ControlPacket>,
    /// Outgoing queues of the live relay sessions that carry overlay packets, by
    /// relay index; the first (the highest-priority relay) is used.
    relay: Mutex<Vec<(usize, mpsc::Sender<Frame>)>>,
    /// Packets dropped (no relay session, full queue, unknown sender, too many peers);
    /// exported as `ferry_shim_overlay_packets_dropped_total`.
    pub dropped: IntCounter,
    /// Overlay bytes by direction (sent, received) and path (direct, relayed).
    pub bytes: IntCounterVec,
}

impl fmt::Debug for PathSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PathSocket")
    }
}

impl PathSocket {
    /// Binds the shim's UDP socket. Returns the socket and the receiver of probes and
    /// STUN answers; call [`PathSocket::run_receiver`] to start reading.
    pub fn bind(addr: SocketAddr) -> io::Result<(Arc<Self>, mpsc::Receiver<ControlPacket>)> {
        let std = std::net::UdpSocket::bind(addr)?;
        std.set_nonblocking(true)?;
        ferry_proto::link::size_udp_buffers(&std, ferry_proto::link::SHIM_UDP_BUFFER, "shim");
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
            peers: PeerTable::default(),
            routes: DashMap::new(),
            known: DashMap::new(),
            relays: DashMap::new(),
            inbound_tx,
            inbound_rx: Mutex::new(inbound_rx),
            control_tx,
            relay: Mutex::new(Vec::new()),
            dropped,
            bytes,
        });
        Ok((socket, control_rx))
    }

    /// The UDP socket's local address (port shared by every path).
    pub fn udp_local_addr(&self) -> io::Result<SocketAddr> {
        self.udp.local_addr()
    }

    /// Relay session `index` can carry relayed packets (replacing an older session
    /// of the same relay). The lowest index among live sessions is used, so every
    /// node of a grid prefers the same relay and both ends of a connection meet there.
    pub fn set_relay(&self, index: usize, tx: mpsc::Sender<Frame>) {
        let mut relays = self.relay.lock().unwrap_or_else(|p| p.into_inner());
        relays.retain(|(i, _)| *i != index);
        relays.push((index, tx));
        relays.sort_by_key(|(i, _)| *i);
    }

    /// Stops using relay session `tx` (it ended, or its relay is draining); relayed
    /// packets move to the next live relay at once.
    pub fn clear_relay(&self, tx: &mpsc::Sender<Frame>) {
        let mut relays = self.relay.lock().unwrap_or_else(|p| p.into_inner());
        relays.retain(|(_, cur)| !cur.same_channel(tx));
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
            self.bytes
                .with_label_values(&["received", "relayed"])
                .inc_by(len);
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

    /// Reads the UDP socket until it fails, sorting each datagram (see module docs).
    pub async fn run_receiver(self: Arc<Self>) {
        let mut buf = vec![0u8; 65_536];
        loop {
            let (len, from) = match self.udp.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    // ICMP errors for earlier sends surface here on Linux (for example
                    // "connection refused" after probing a closed port); they say
                    // nothing about this socket, so keep reading.
                    tracing::trace!("UDP receive error: {e}");
                    continue;
                }
            };
            let packet = &buf[..len];
            self.sort(packet, from);
        }
    }

    fn sort(&self, packet: &[u8], from: SocketAddr) {
        let from = canonical(from);
        if probe::is_probe(packet) {
            let data = Bytes::copy_from_slice(packet);
            if self
                .control_tx
                .try_send(ControlPacket::Probe { from, data })
                .is_err()
            {
                self.dropped.inc();
            }
            return;
        }
        if is_stun(packet) {
            let data = Bytes::copy_from_slice(packet);
            let _ = self.control_tx.try_send(ControlPacket::Stun { from, data });
            return;
        }
        if self.relays.contains_key(&from) {
            // quinn sees the socket as IPv6 (see `local_addr`), so relay connections
            // know the relay by its IPv4-mapped address.
            if self
                .inbound_tx
                .try_send((mapped(from), Bytes::copy_from_slice(packet)))
                .is_err()
            {
                self.dropped.inc();
            }
            return;
        }
        if let Some(peer) = self.known.get(&from).map(|p| *p) {
            if let Some(addr) = self.peers.addr_of(peer) {
                let len = packet.len() as u64;
                if self
                    .inbound_tx
                    .try_send((addr, Bytes::copy_from_slice(packet)))
                    .is_ok()
                {
                    self.bytes
                        .with_label_values(&["received", "direct"])
                        .inc_by(len);
                    return;
                }
            }
            self.dropped.inc();
            return;
        }
        self.dropped.inc();
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
            let dest = canonical(dest);
            // A relay connection: straight out of the socket.
            return match self.udp.try_send_to(transmit.contents, dest) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(e),
                // Like a lost datagram: QUIC recovers; an error here would not help.
                Err(_) => {
                    self.dropped.inc();
                    Ok(())
                }
                Ok(_) => Ok(()),
            };
        }
        let Some(peer) = self.peers.node_at(&dest) else {
            return Err(io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                "no overlay peer at this virtual address",
            ));
        };
        let len = transmit.contents.len() as u64;
        match self.route(&peer) {
            Route::Direct(addr) => match self.udp.try_send_to(transmit.contents, addr) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(e),
                Err(_) => {
                    self.dropped.inc();
                    Ok(())
                }
                Ok(_) => {
                    self.bytes
                        .with_label_values(&["sent", "direct"])
                        .inc_by(len);
                    Ok(())
                }
            },
            Route::Relayed => {
                let relay = self
                    .relay
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .first()
                    .map(|(_, tx)| tx.clone());
                let frame = Frame::Packet {
                    peer,
                    data: Bytes::copy_from_slice(transmit.contents),
                };
                match relay {
                    Some(tx) if tx.try_send(frame).is_ok() => {
                        self.bytes
                            .with_label_values(&["sent", "relayed"])
                            .inc_by(len);
                    }
                    _ => self.dropped.inc(),
                }
                Ok(())
            }
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut rx = self.inbound_rx.lock().unwrap_or_else(|p| p.into_inner());
        poll_recv_queue(&mut rx, cx, bufs, meta, |item| item)
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

    #[tokio::test]
    async fn packets_follow_the_route_and_answers_map_back_to_the_virtual_address() {
        let (socket, _control) = PathSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        tokio::spawn(socket.clone().run_receiver());
        socket.udp.writable().await.unwrap();
        let peer = SecretKey::generate().node_id();
        let vaddr = socket.peers.addr_of(peer).unwrap();

        // Relayed and no relay yet: dropped, not queued.
        socket.try_send(&transmit(vaddr, b"one")).unwrap();
        assert_eq!(socket.dropped.get(), 1);
        let (tx, mut rx) = mpsc::channel(4);
        socket.set_relay(0, tx);
        socket.try_send(&transmit(vaddr, b"two")).unwrap();
        assert_eq!(
            rx.recv().await,
            Some(Frame::Packet {
                peer,
                data: Bytes::from_static(b"two")
            })
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
        assert_eq!(&buf[..n], b"three");
        remote.send_to(b"four", from).unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            let mut rx = socket.inbound_rx.lock().unwrap().try_recv();
            while rx.is_err() {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                rx = socket.inbound_rx.lock().unwrap().try_recv();
            }
            rx.unwrap()
        })
        .await
        .unwrap();
        assert_eq!(got, (vaddr, Bytes::from_static(b"four")));

        // A stranger's datagram is dropped.
        let before = socket.dropped.get();
        let stranger = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        stranger.send_to(b"hello", from).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while socket.dropped.get() == before {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
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
