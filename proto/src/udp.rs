//! What the relay's and the shim's quinn sockets share: a batch of received segments
//! sorted in place, a datagram sent straight from a receive path, and quinn's
//! writability check over a tokio socket.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::UdpPoller;
use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Keeps the segments of one received batch (`len` bytes of `stride`-byte segments
/// from one sender, as quinn-udp hands them over with GRO) for which `keep` says so,
/// moved together at the front of `batch`; returns their total length. Every
/// segment keeps its size, so what remains is still a valid batch of `stride`-byte
/// segments (the last one possibly shorter) — unless a shorter final segment is kept
/// while ones before it are dropped, which cannot break the layout either because it
/// stays last.
pub fn retain_segments(
    batch: &mut [u8],
    len: usize,
    stride: usize,
    mut keep: impl FnMut(&mut [u8]) -> bool,
) -> usize {
    let stride = if stride == 0 { len.max(1) } else { stride };
    let mut kept = 0;
    let mut start = 0;
    while start < len {
        let end = (start + stride).min(len);
        if keep(&mut batch[start..end]) {
            if kept != start {
                batch.copy_within(start..end, kept);
            }
            kept += end - start;
        }
        start = end;
    }
    kept
}

/// Receive calls in a row that brought nothing for quinn before [`poll_recv_sorted`]
/// yields: a flood of datagrams quinn never sees (strangers', forwarded ones) must not
/// keep the endpoint's task from its connections.
pub const RECEIVE_BUDGET: usize = 32;

/// quinn's receive call over a socket whose batches are sorted first: reads with
/// quinn-udp (`recvmmsg`, GRO) into quinn's buffers and lets `sort` rewrite the `n`
/// batches in place, returning whether any is left for quinn. Receive errors are
/// skipped: on Linux they are ICMP errors for earlier sends (a closed port probed, a
/// peer gone), which say nothing about this socket.
pub fn poll_recv_sorted(
    udp: &UdpSocket,
    state: &UdpSocketState,
    cx: &mut Context,
    bufs: &mut [IoSliceMut<'_>],
    meta: &mut [RecvMeta],
    mut sort: impl FnMut(&mut [IoSliceMut<'_>], &mut [RecvMeta]) -> bool,
) -> Poll<io::Result<usize>> {
    for _ in 0..RECEIVE_BUDGET {
        std::task::ready!(udp.poll_recv_ready(cx))?;
        match udp.try_io(Interest::READABLE, || state.recv(udp.into(), bufs, meta)) {
            Ok(n) => {
                if sort(&mut bufs[..n], &mut meta[..n]) {
                    return Poll::Ready(Ok(n));
                }
            }
            // Readiness cleared: the next `poll_recv_ready` registers the waker.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => tracing::trace!("UDP receive error: {e}"),
        }
    }
    cx.waker().wake_by_ref();
    Poll::Pending
}

/// Sends `transmit` now, from a receive path or a quinn send: `Ok(true)` when it left,
/// `Ok(false)` when the kernel refused it for good (counted by the caller, like loss;
/// QUIC recovers), `Err(WouldBlock)` when the socket's buffer is full.
pub fn try_send(udp: &UdpSocket, state: &UdpSocketState, transmit: &Transmit) -> io::Result<bool> {
    match udp.try_io(Interest::WRITABLE, || state.try_send(udp.into(), transmit)) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(e),
        Err(e) => {
            tracing::trace!("UDP send to {} failed: {e}", transmit.destination);
            Ok(false)
        }
    }
}

/// quinn's writability check: the real socket's send readiness.
pub struct Writable(pub Arc<UdpSocket>);

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retain_segments_compacts_a_batch_and_keeps_the_short_tail() {
        // Four 4-byte segments and a 2-byte tail: drop the 2nd and 4th.
        let mut batch = *b"aaaabbbbccccddddee";
        let kept = retain_segments(&mut batch, 18, 4, |s| s[0] != b'b' && s[0] != b'd');
        assert_eq!(&batch[..kept], b"aaaaccccee");
        // Nothing dropped: unchanged; no stride: one segment.
        let mut one = *b"xyz";
        assert_eq!(retain_segments(&mut one, 3, 0, |_| true), 3);
        assert_eq!(retain_segments(&mut one, 3, 0, |_| false), 0);
    }
}
