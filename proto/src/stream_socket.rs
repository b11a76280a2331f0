//! QUIC over a byte stream: a quinn `AsyncUdpSocket` whose only peer is at the other
//! end of one TLS-over-TCP connection, each QUIC packet sent as `u16 length | bytes`.
//!
//! Why not a TCP stream multiplexer such as yamux: yamux 0.13 stops reading its socket
//! while a control reply waits to be written, so two peers pushing bulk data at each
//! other can deadlock (rust-yamux issue #227, open) — exactly the traffic of an overlay
//! relayed over TCP. Carrying QUIC itself over the stream gives the TCP fallback the
//! same streams, per-stream flow control and keepalives as the UDP path, from the same
//! well-tested code, and every relay link is a `quinn::Connection`.
//!
//! Back-pressure instead of buffering: when the outgoing queue is full, `try_send`
//! returns `WouldBlock` and quinn waits for `poll_writable`; the reader waits for room
//! in the incoming queue before reading more from TCP.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use crate::sync::lock;
use bytes::Bytes;
use futures::task::AtomicWaker;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Packets queued in each direction. 256 full-size packets (~370 KiB) keep a fast TCP
/// connection busy while bounding what one slow peer can make us hold.
const QUEUE: usize = 256;

/// Largest packet accepted from the stream; QUIC never sends more than a UDP payload.
const MAX_PACKET: usize = u16::MAX as usize;

/// Virtual addresses of the two ends; quinn needs some address, nothing routes them.
const LOCAL: SocketAddr = SocketAddr::V6(SocketAddrV6::new(
    Ipv6Addr::new(0xfd66, 0x6572, 0x7279, 0xffff, 0, 0, 0, 1),
    1,
    0,
    0,
));
pub const PEER: SocketAddr = SocketAddr::V6(SocketAddrV6::new(
    Ipv6Addr::new(0xfd66, 0x6572, 0x7279, 0xffff, 0, 0, 0, 2),
    1,
    0,
    0,
));

pub struct StreamSocket {
    outbound: mpsc::Sender<Bytes>,
    inbound: Mutex<mpsc::Receiver<Bytes>>,
    writable: Arc<AtomicWaker>,
}

impl fmt::Debug for StreamSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StreamSocket")
    }
}

/// Wraps `io` (already authenticated by TLS) as a socket for a quinn endpoint. The
/// returned token is cancelled when the byte stream ends, in either direction.
pub fn spawn<S>(io: S) -> (Arc<StreamSocket>, CancellationToken)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (out_tx, mut out_rx) = mpsc::channel::<Bytes>(QUEUE);
    let (in_tx, in_rx) = mpsc::channel::<Bytes>(QUEUE);
    let writable = Arc::new(AtomicWaker::new());
    let dead = CancellationToken::new();
    let (mut reader, writer) = tokio::io::split(io);

    let (waker, done) = (writable.clone(), dead.clone());
    tokio::spawn(async move {
        let mut writer = BufWriter::with_capacity(64 * 1024, writer);
        let result: io::Result<()> = async {
            while let Some(packet) = out_rx.recv().await {
                waker.wake();
                writer
                    .write_all(&(packet.len() as u16).to_be_bytes())
                    .await?;
                writer.write_all(&packet).await?;
                if out_rx.is_empty() {
                    writer.flush().await?;
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::debug!("stream socket writer ended: {e}");
        }
        let _ = writer.shutdown().await;
        done.cancel();
    });

    let done = dead.clone();
    tokio::spawn(async move {
        let result: io::Result<()> = async {
            loop {
                // Once the socket is gone (its endpoint closed), stop reading at once
                // rather than at the peer's next packet: a peer that never sends again
                // and never closes its end would otherwise keep this task and the
                // connection's descriptor forever (seen: one of each per TCP-linked
                // node that left a relay that way).
                let packet = tokio::select! {
                    packet = read_packet(&mut reader) => packet?,
                    () = in_tx.closed() => return Ok(()),
                };
                if in_tx.send(packet).await.is_err() {
                    return Ok(());
                }
            }
        }
        .await;
        if let Err(e) = result {
            tracing::debug!("stream socket reader ended: {e}");
        }
        done.cancel();
    });

    let socket = Arc::new(StreamSocket {
        outbound: out_tx,
        inbound: Mutex::new(in_rx),
        writable,
    });
    (socket, dead)
}

/// One `u16 length | bytes` packet from the stream.
async fn read_packet<R: AsyncRead + Unpin>(reader: &mut R) -> io::Result<Bytes> {
    let len = reader.read_u16().await? as usize;
    if len == 0 || len > MAX_PACKET {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad packet length",
        ));
    }
    let mut packet = vec![0u8; len];
    reader.read_exact(&mut packet).await?;
    Ok(Bytes::from(packet))
}

struct Poller {
    socket: Arc<StreamSocket>,
}

impl fmt::Debug for Poller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StreamSocketPoller")
    }
}

impl UdpPoller for Poller {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        if self.socket.outbound.capacity() > 0 || self.socket.outbound.is_closed() {
            return Poll::Ready(Ok(()));
        }
        self.socket.writable.register(cx.waker());
        // Re-check: the writer may have drained between the check and the register.
        if self.socket.outbound.capacity() > 0 || self.socket.outbound.is_closed() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
}

impl AsyncUdpSocket for StreamSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Poller { socket: self })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        if transmit.destination != PEER {
            return Err(io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                "not the stream's peer",
            ));
        }
        let packet = Bytes::copy_from_slice(transmit.contents);
        match self.outbound.try_send(packet) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(io::ErrorKind::WouldBlock.into()),
            // The stream is gone; pretend the packet left, as UDP would, and let the
            // connection's close or idle timeout end things.
            Err(mpsc::error::TrySendError::Closed(_)) => Ok(()),
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut rx = lock(&self.inbound);
        // Stream ended: stay silent; the owner closes the connection.
        poll_recv_queue(&mut rx, cx, bufs, meta, |packet| (PEER, packet))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(LOCAL)
    }

    fn may_fragment(&self) -> bool {
        false
    }
}

/// Fills quinn's receive buffers from a queue of packets, as many as are ready. Shared
/// by every socket here whose "network" is a channel. A closed queue reads as silence:
/// the socket's owner ends the connection.
pub fn poll_recv_queue<T>(
    rx: &mut mpsc::Receiver<T>,
    cx: &mut Context,
    bufs: &mut [IoSliceMut<'_>],
    meta: &mut [RecvMeta],
    split: impl Fn(T) -> (SocketAddr, Bytes),
) -> Poll<io::Result<usize>> {
    let mut n = 0;
    while n < bufs.len().min(meta.len()) {
        match rx.poll_recv(cx) {
            Poll::Ready(Some(item)) => {
                let (addr, packet) = split(item);
                let len = packet.len().min(bufs[n].len());
                bufs[n][..len].copy_from_slice(&packet[..len]);
                meta[n] = RecvMeta {
                    addr,
                    len,
                    stride: len,
                    ecn: None,
                    dst_ip: None,
                };
                n += 1;
            }
            Poll::Ready(None) | Poll::Pending => break,
        }
    }
    if n > 0 {
        Poll::Ready(Ok(n))
    } else {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A peer that goes silent and never closes its end must not keep the stream's
    /// tasks and descriptor alive once the socket is dropped.
    #[tokio::test]
    async fn dropping_the_socket_releases_the_stream_while_the_peer_stays_silent() {
        let (ours, mut theirs) = tokio::io::duplex(4096);
        let (socket, dead) = spawn(ours);
        drop(socket);
        tokio::time::timeout(Duration::from_secs(5), dead.cancelled())
            .await
            .expect("the stream is declared dead once the socket is gone");
        // The writer has shut its half: the peer reads EOF.
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), theirs.read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0))), "{read:?}");
        // Our end is released only when the reader has ended too; an empty write finds
        // out without giving the reader a packet that would wake it up.
        let released = tokio::time::timeout(Duration::from_secs(5), async {
            while theirs.write(&[]).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(released.is_ok(), "our end of the stream is still held open");
    }

    #[tokio::test]
    async fn a_zero_length_packet_ends_the_stream() {
        let (ours, mut theirs) = tokio::io::duplex(4096);
        let (_socket, dead) = spawn(ours);
        theirs.write_all(&0u16.to_be_bytes()).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), dead.cancelled())
            .await
            .expect("a zero-length packet is refused and ends the stream");
    }
}
