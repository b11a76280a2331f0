//! Overlay packets through the relay: taken in from a node's link or its relay
//! channel (tapped, charged to the sender's byte rate, counted), and sent on to the
//! destination's link as a datagram, a session frame, or a channel packet. The relay
//! never decrypts them: they are end-to-end QUIC between two shims.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use ferry_proto::NodeId;
use ferry_proto::channel::{self, ChannelId};
use ferry_proto::frame::{self, Frame};
use ferry_proto::sync::lock;

use crate::channel_socket::{ChannelRouter, Destination};
use crate::metrics::{Limit, PacketDrop};
use crate::state::{Session, State};

pub(crate) fn forward_packet(state: &State, from: &Session, to: NodeId, data: bytes::Bytes) {
    if let Some(dest) = accept_packet(state, from, &to, &data) {
        send_over_link(state, from.node, &dest, data);
    }
}

/// Takes one overlay packet from `from` to `to` into the relay: taps it, charges the
/// sender's byte allowance, counts it, and finds the destination's session. None
/// (counted) when the packet goes no further.
fn accept_packet(state: &State, from: &Session, to: &NodeId, data: &[u8]) -> Option<Arc<Session>> {
    if let Some(tap) = &state.opts.packet_tap {
        (tap.0)(from.node, *to, data);
    }
    let len = data.len() as u64;
    if let Some(bucket) = &from.bucket
        && !lock(bucket).try_take(len, std::time::Instant::now())
    {
        // Over its byte rate: like a congested link, the packet is lost and the
        // end-to-end QUIC connection slows down.
        state.metrics.limit_hit(Limit::Bytes);
        return None;
    }
    from.bytes_from_node.fetch_add(len, Ordering::Relaxed);
    state.metrics.overlay.bytes_from_node.inc_by(len);
    let dest = state.registry.get(to);
    if dest.is_none() {
        state
            .metrics
            .count_dropped(PacketDrop::UnknownDestination, 1);
    }
    dest
}

/// Counts one overlay packet delivered to `dest`.
fn count_delivered(state: &State, dest: &Session, len: usize, carrier: &prometheus::IntCounter) {
    carrier.inc();
    dest.bytes_to_node.fetch_add(len as u64, Ordering::Relaxed);
    state.metrics.overlay.bytes_to_node.inc_by(len as u64);
}

/// Sends an overlay packet from `from` on `dest`'s link: as a datagram when the link
/// takes one (see `frame::encode_datagram`), else as a frame on its session stream.
fn send_over_link(state: &State, from: NodeId, dest: &Session, data: bytes::Bytes) {
    let len = data.len();
    let overlay = &state.metrics.overlay;
    if dest
        .link
        .send_datagram(frame::encode_datagram(&from, &data))
        .is_ok()
    {
        count_delivered(state, dest, len, &overlay.by_datagram);
    } else if dest.tx.try_send(Frame::Packet { peer: from, data }).is_ok() {
        count_delivered(state, dest, len, &overlay.by_stream);
    } else {
        state.metrics.count_dropped(PacketDrop::QueueFull, 1);
    }
}

impl State {
    /// The live session of channel `id` and the node ID `masked` names on that channel,
    /// if the packet came from that session's link address.
    fn channel_sender(
        &self,
        from: SocketAddr,
        id: &ChannelId,
        masked: &[u8; 32],
    ) -> Option<(Arc<Session>, NodeId)> {
        let session = self.channels.get(id)?.clone();
        let channel = session.channel.as_ref()?;
        {
            let mut addr = lock(&channel.addr);
            if *addr != from {
                // The link may have moved (NAT rebinding): believe the link, not the
                // packet.
                if session.link.remote_socket_addr() != from {
                    return None;
                }
                *addr = from;
            }
        }
        let to = channel.token.node(masked);
        Some((session, to))
    }
}

impl ChannelRouter for State {
    fn route(&self, from: SocketAddr, packet: &mut [u8]) -> Option<Destination> {
        let Some((id, masked, body)) = channel::parse(packet) else {
            self.metrics.count_dropped(PacketDrop::BadChannel, 1);
            return None;
        };
        let Some((sender, to)) = self.channel_sender(from, &id, &masked) else {
            self.metrics.count_dropped(PacketDrop::BadChannel, 1);
            return None;
        };
        let dest = accept_packet(self, &sender, &to, body)?;
        let len = body.len();
        let Some(channel) = &dest.channel else {
            // The destination's link runs over TCP: it gets the packet on its link.
            let data = bytes::Bytes::copy_from_slice(body);
            send_over_link(self, sender.node, &dest, data);
            return None;
        };
        let to = Destination {
            addr: *lock(&channel.addr),
            src_ip: channel.local_ip,
        };
        channel::write_header(packet, &channel.token, &sender.node);
        count_delivered(self, &dest, len, &self.metrics.overlay.by_channel);
        Some(to)
    }

    fn send_failed(&self, packets: usize) {
        self.metrics
            .count_dropped(PacketDrop::SendBufferFull, packets as u64);
    }
}
