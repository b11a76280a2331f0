//! The overlay's packet layer: a quinn `AsyncUdpSocket` whose "network" is the relay.
//!
//! Every shim runs one QUIC endpoint for end-to-end connections to other shims. quinn
//! sees each peer at a stable *virtual* address (an IPv6 ULA derived from a counter);
//! this socket maps that address to the peer's node ID and hands the packet to the
//! current relay session, which forwards it by node ID. Packets from the relay come
//! back tagged with the sender's node ID and are delivered from its virtual address.
//! Because QUIC only ever sees the virtual address, the path underneath can change
//! (another relay now, a direct UDP path later) without breaking a single stream.
//!
//! Like UDP, this layer drops rather than queues without bound: a full queue or a
//! missing relay session loses the packet and QUIC retransmits.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use dashmap::DashMap;
use ferry_proto::NodeId;
use ferry_proto::frame::Frame;
use ferry_proto::stream_socket::poll_recv_queue;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::sync::mpsc;

/// Packets received from relays and not yet read by the QUIC endpoint.
const INBOUND_QUEUE: usize = 2048;

/// Peers this shim will track at once. Each costs two small map entries; the bound
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

/// The socket quinn drives.
pub struct OverlaySocket {
    pub peers: PeerTable,
    inbound_tx: mpsc::Sender<(SocketAddr, Bytes)>,
    inbound_rx: Mutex<mpsc::Receiver<(SocketAddr, Bytes)>>,
    /// Outgoing queue of the relay session currently in use, if any.
    relay: Mutex<Option<mpsc::Sender<Frame>>>,
    /// Packets dropped (no relay session, full queue, too many peers); exported as
    /// `ferry_shim_overlay_packets_dropped_total`.
    pub dropped: prometheus::IntCounter,
}

impl fmt::Debug for OverlaySocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OverlaySocket")
    }
}

impl OverlaySocket {
    pub fn new() -> Result<Self, prometheus::Error> {
        let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_QUEUE);
        let dropped = prometheus::IntCounter::new(
            "ferry_shim_overlay_packets_dropped_total",
            "Overlay packets dropped: no relay session, a full queue, or too many peers",
        )?;
        Ok(OverlaySocket {
            peers: PeerTable::default(),
            inbound_tx,
            inbound_rx: Mutex::new(inbound_rx),
            relay: Mutex::new(None),
            dropped,
        })
    }
    /// Routes outgoing packets through this relay session from now on.
    pub fn set_relay(&self, tx: Option<mpsc::Sender<Frame>>) {
        *self.relay.lock().unwrap_or_else(|p| p.into_inner()) = tx;
    }

    /// Stops using `tx` if it is still the current relay session's queue.
    pub fn clear_relay(&self, tx: &mpsc::Sender<Frame>) {
        let mut relay = self.relay.lock().unwrap_or_else(|p| p.into_inner());
        if relay.as_ref().is_some_and(|cur| cur.same_channel(tx)) {
            *relay = None;
        }
    }

    /// Delivers a packet that arrived from the relay, sent by `from`.
    pub fn deliver(&self, from: NodeId, data: Bytes) {
        let Some(addr) = self.peers.addr_of(from) else {
            self.dropped.inc();
            return;
        };
        if self.inbound_tx.try_send((addr, data)).is_err() {
            self.dropped.inc();
        }
    }
}

#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncUdpSocket for OverlaySocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        // `try_send` never returns WouldBlock (a full queue drops, like UDP).
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let Some(peer) = self.peers.node_at(&transmit.destination) else {
            return Err(io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                "no overlay peer at this virtual address",
            ));
        };
        let relay = self.relay.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let frame = Frame::Packet {
            peer,
            data: Bytes::copy_from_slice(transmit.contents),
        };
        match relay {
            Some(tx) if tx.try_send(frame).is_ok() => {}
            _ => {
                self.dropped.inc();
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
        let mut rx = self.inbound_rx.lock().unwrap_or_else(|p| p.into_inner());
        poll_recv_queue(&mut rx, cx, bufs, meta, |item| item)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(virtual_addr(0))
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
        assert_eq!(table.addr_of(a), Some(aa));
        assert_eq!(table.node_at(&bb), Some(b));
        assert_eq!(table.node_at(&virtual_addr(999)), None);
    }

    #[tokio::test]
    async fn outgoing_packets_go_to_the_relay_queue_tagged_with_the_peer() {
        let socket = OverlaySocket::new().unwrap();
        let peer = SecretKey::generate().node_id();
        let addr = socket.peers.addr_of(peer).unwrap();
        let transmit = Transmit {
            destination: addr,
            ecn: None,
            contents: b"packet",
            segment_size: None,
            src_ip: None,
        };
        // No relay yet: dropped, not queued.
        socket.try_send(&transmit).unwrap();
        assert_eq!(socket.dropped.get(), 1);
        let (tx, mut rx) = mpsc::channel(4);
        socket.set_relay(Some(tx));
        socket.try_send(&transmit).unwrap();
        assert_eq!(
            rx.recv().await,
            Some(Frame::Packet {
                peer,
                data: Bytes::from_static(b"packet")
            })
        );
    }
}
