//! The relay's UDP socket under quinn: relay-channel packets (`ferry_proto::channel`)
//! are forwarded right here, inside quinn's receive call, and everything else goes to
//! quinn.
//!
//! A channel packet is read, its header rewritten in place by the [`ChannelRouter`]
//! (the relay's session table) and sent on from the same buffer: no copy, no queue,
//! no task hand-over and no cryptography on the relay. A GRO batch of packets from
//! one node to one destination (a bulk transfer) leaves as one GSO send. What the
//! router drops or carries another way (a destination without a channel) is simply
//! gone from the batch quinn sees.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, OnceLock, Weak};
use std::task::{Context, Poll};

use ferry_proto::channel;
use ferry_proto::udp::{Writable, poll_recv_sorted, retain_segments, try_send};
use quinn::udp::{EcnCodepoint, RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::net::UdpSocket;

/// Where a channel packet goes once its header is rewritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Destination {
    pub addr: SocketAddr,
    /// The local address the destination's link uses (matters on a multi-homed host).
    pub src_ip: Option<IpAddr>,
}

/// Decides about channel packets (implemented by the relay's state).
pub trait ChannelRouter: Send + Sync {
    /// One channel packet from `from`: rewrite its header for the destination and
    /// return where it goes, or `None` when it was dropped (and counted) or handed to
    /// another carrier.
    fn route(&self, from: SocketAddr, packet: &mut [u8]) -> Option<Destination>;
    /// `packets` forwarded packets the socket could not send (full send buffer).
    fn send_failed(&self, packets: usize);
}

pub struct ChannelSocket {
    udp: Arc<UdpSocket>,
    state: UdpSocketState,
    router: OnceLock<Weak<dyn ChannelRouter>>,
}

impl fmt::Debug for ChannelSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChannelSocket")
    }
}

impl ChannelSocket {
    pub fn new(udp: std::net::UdpSocket) -> io::Result<Arc<Self>> {
        udp.set_nonblocking(true)?;
        let state = UdpSocketState::new((&udp).into())?;
        Ok(Arc::new(ChannelSocket {
            udp: Arc::new(UdpSocket::from_std(udp)?),
            state,
            router: OnceLock::new(),
        }))
    }

    /// Sends one datagram of the relay's own (not a forwarded one) to `addr`, from the
    /// address nodes' links use: a restart notice (`crate::restart`).
    pub async fn send_to(&self, packet: &[u8], addr: SocketAddr) -> io::Result<()> {
        self.udp.send_to(packet, addr).await.map(|_| ())
    }

    /// Sets who decides about channel packets; until then they are dropped. Set once.
    pub fn set_router(&self, router: Weak<dyn ChannelRouter>) {
        let _ = self.router.set(router);
    }

    /// Forwards the channel packets in one received batch and returns the length of
    /// what is left for quinn (moved to the front of the batch).
    fn forward_channel_packets(&self, batch: &mut [u8], meta: &RecvMeta) -> usize {
        let len = meta.len;
        let stride = if meta.stride == 0 { len } else { meta.stride };
        if len == 0 || !batch[..len].chunks(stride).any(channel::is_channel) {
            return len;
        }
        let router = self.router.get().and_then(Weak::upgrade);
        let mut run = Run::default();
        let mut start = 0;
        while start < len {
            let end = (start + stride).min(len);
            if channel::is_channel(&batch[start..end]) {
                let to = router
                    .as_ref()
                    .and_then(|r| r.route(meta.addr, &mut batch[start..end]));
                match to {
                    Some(to) if run.extends(to, start, stride, self.max_run()) => {
                        run.end = end;
                        run.segments += 1;
                    }
                    Some(to) => {
                        self.send_run(&run, batch, stride, meta.ecn, router.as_deref());
                        run = Run {
                            to: Some(to),
                            start,
                            end,
                            segments: 1,
                        };
                    }
                    None => {}
                }
            } else {
                self.send_run(&run, batch, stride, meta.ecn, router.as_deref());
                run = Run::default();
            }
            start = end;
        }
        self.send_run(&run, batch, stride, meta.ecn, router.as_deref());
        retain_segments(batch, len, meta.stride, |s| !channel::is_channel(s))
    }

    fn max_run(&self) -> usize {
        self.state.max_gso_segments().max(1)
    }

    fn send_run(
        &self,
        run: &Run,
        batch: &[u8],
        stride: usize,
        ecn: Option<EcnCodepoint>,
        router: Option<&dyn ChannelRouter>,
    ) {
        let Some(to) = run.to else { return };
        let transmit = Transmit {
            destination: to.addr,
            ecn,
            contents: &batch[run.start..run.end],
            segment_size: (run.segments > 1).then_some(stride),
            src_ip: to.src_ip,
        };
        // Never wait: this is quinn's receive path. A full buffer loses the packets,
        // as a congested router would; the end-to-end QUIC slows down.
        if !matches!(try_send(&self.udp, &self.state, &transmit), Ok(true))
            && let Some(router) = router
        {
            router.send_failed(run.segments);
        }
    }
}

/// Consecutive forwarded segments of one batch going to one destination: one send.
#[derive(Default)]
struct Run {
    to: Option<Destination>,
    start: usize,
    end: usize,
    segments: usize,
}

impl Run {
    /// Whether a segment starting at `start` going to `to` can join this run (GSO:
    /// back to back, every segment but the last `stride` bytes; a batch's segments
    /// are never longer than its stride).
    fn extends(&self, to: Destination, start: usize, stride: usize, max: usize) -> bool {
        self.to == Some(to)
            && self.end == start
            && (self.end - self.start) == self.segments * stride
            && self.segments < max
    }
}

impl AsyncUdpSocket for ChannelSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Writable(self.udp.clone()))
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        // Refused sends are lost packets to QUIC; only `WouldBlock` is quinn's to retry.
        try_send(&self.udp, &self.state, transmit).map(|_| ())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        poll_recv_sorted(&self.udp, &self.state, cx, bufs, meta, |bufs, meta| {
            let mut for_quinn = 0;
            for (buf, meta) in bufs.iter_mut().zip(meta.iter_mut()) {
                meta.len = self.forward_channel_packets(buf, meta);
                for_quinn += meta.len;
            }
            for_quinn > 0
        })
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.udp.local_addr()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::NodeId;
    use ferry_proto::channel::{ChannelToken, write_header};
    use std::sync::Mutex;

    /// Sends every channel packet to `to`, rewriting its token to `token_out`, and
    /// records the node IDs it saw.
    struct Router {
        to: SocketAddr,
        token_in: ChannelToken,
        token_out: ChannelToken,
        seen: Mutex<Vec<NodeId>>,
    }

    impl ChannelRouter for Router {
        fn route(&self, _from: SocketAddr, packet: &mut [u8]) -> Option<Destination> {
            let (node, _) = self.token_in.open(packet)?;
            self.seen.lock().unwrap().push(node);
            write_header(packet, &self.token_out, &node);
            Some(Destination {
                addr: self.to,
                src_ip: None,
            })
        }
        fn send_failed(&self, _: usize) {}
    }

    #[tokio::test]
    async fn channel_packets_leave_in_place_and_quic_around_them_stays_for_quinn() {
        let socket = ChannelSocket::new(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let dest = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        dest.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let (token_in, token_out) = (ChannelToken::random(), ChannelToken::random());
        let router: Arc<dyn ChannelRouter> = Arc::new(Router {
            to: dest.local_addr().unwrap(),
            token_in,
            token_out,
            seen: Mutex::new(Vec::new()),
        });
        socket.set_router(Arc::downgrade(&router));
        socket.udp.writable().await.unwrap();

        // A GRO batch of 100-byte segments: QUIC, three channel packets, QUIC, and a
        // shorter channel packet at the end.
        let stride = 100;
        let node = NodeId::from_bytes([9; 32]);
        let mut batch = Vec::new();
        for (i, kind) in ["quic", "ch", "ch", "ch", "quic", "ch"].iter().enumerate() {
            let size = if i == 5 { 70 } else { stride };
            let at = batch.len();
            batch.resize(at + size, i as u8);
            if *kind == "ch" {
                write_header(&mut batch[at..], &token_in, &node);
            } else {
                batch[at] = 0x40;
            }
        }
        let meta = RecvMeta {
            addr: "127.0.0.1:9".parse().unwrap(),
            len: batch.len(),
            stride,
            ecn: None,
            dst_ip: None,
        };
        let left = socket.forward_channel_packets(&mut batch, &meta);
        assert_eq!(left, 2 * stride, "the two QUIC segments stay");
        assert_eq!((batch[0], batch[1], batch[stride + 1]), (0x40, 0, 4));

        // The three in a row left as one GSO send (three datagrams), the last alone.
        let mut sizes = Vec::new();
        for _ in 0..4 {
            let mut buf = [0u8; 2048];
            let n = dest.recv(&mut buf).unwrap();
            let (from, body) = token_out.open(&buf[..n]).unwrap();
            assert_eq!(from, node);
            assert!(body.iter().all(|b| *b == body[0]));
            sizes.push(n);
        }
        assert_eq!(sizes, [100, 100, 100, 70]);
    }

    #[test]
    fn a_run_takes_equal_back_to_back_segments_up_to_the_gso_limit() {
        let to = Destination {
            addr: "127.0.0.1:1".parse().unwrap(),
            src_ip: None,
        };
        let elsewhere = Destination {
            addr: "127.0.0.1:2".parse().unwrap(),
            src_ip: None,
        };
        let run = Run {
            to: Some(to),
            start: 0,
            end: 200,
            segments: 2,
        };
        assert!(run.extends(to, 200, 100, 64));
        assert!(!run.extends(elsewhere, 200, 100, 64));
        assert!(!run.extends(to, 300, 100, 64), "not back to back");
        assert!(!run.extends(to, 200, 100, 2), "GSO limit");
        let short_tail = Run { end: 160, ..run };
        assert!(!short_tail.extends(to, 160, 100, 64), "after a short one");
    }
}
