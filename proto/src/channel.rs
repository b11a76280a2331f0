//! The relay channel: overlay packets as plain UDP between a shim and its relay,
//! beside the QUIC relay link and on the same sockets.
//!
//! Why a channel as well as the link's DATAGRAMs: an overlay packet is already an
//! end-to-end encrypted and authenticated QUIC packet. Carried in a link DATAGRAM it
//! is encrypted again by the sending shim, decrypted and re-encrypted by the relay and
//! decrypted again by the receiving shim: three QUIC hops of work for one packet
//! (BENCHMARKS.md has the profile). On the channel the relay only reads a header,
//! rewrites it in place and sends the datagram on, inside its socket's receive call,
//! and each shim does the end-to-end work alone.
//!
//! Wire format, both directions: `TAG | channel ID (16) | masked node ID (32) | packet`.
//! - shim → relay: the sending shim's channel, the destination's node ID;
//! - relay → shim: the receiving shim's channel, the source's node ID.
//!
//! A node's [`ChannelToken`] is a random channel ID and a random 32-byte mask, which
//! the relay hands the node in `Registered`, over the authenticated link, and forgets
//! when the session ends. The node ID in the header is XORed with the mask, so
//! someone watching the wire sees which packets belong together but not which nodes
//! talk (the link's own encryption used to hide that). The relay accepts a channel
//! packet only with a live channel ID from the address that channel's link uses, so
//! an off-path sender can neither inject packets nor spend a node's byte allowance; a
//! shim accepts one only from its relay's address with its own channel ID. Someone on
//! the path who copies a channel ID could inject packets, which the end-to-end QUIC
//! then rejects — no worse than that party dropping packets.
//!
//! `TAG` has the top two bits clear, so no QUIC v1 packet (fixed bit set; endpoints
//! disable fixed-bit greasing) and no STUN message (first byte 0 or 1) looks like one.
//!
//! The same socket pair carries one more kind of packet: a relay that just started
//! sends [`restart_notice`] to the addresses its nodes' QUIC links came from in its
//! last run. A node's link to the old process is dead but does not know it until it
//! sends something (the new process answers with a stateless reset); nodes keep
//! links quiet for many seconds, so the notice asks them to send now. It is only a
//! hint — a node that gets one pings its relay over the link, which costs nothing if
//! the relay did not restart — so it carries no signature, and a forged one is worth
//! one session ping, at most once a second.

use crate::NodeId;

/// First byte of every channel packet.
pub const TAG: u8 = 0x2f;
/// Bytes of a channel ID.
pub const ID_LEN: usize = 16;
/// Bytes in front of the overlay packet.
pub const HEADER_LEN: usize = 1 + ID_LEN + 32;
/// Bytes of a token as it travels: channel ID and mask.
const TOKEN_LEN: usize = ID_LEN + 32;

/// A channel's ID, as written in each packet.
pub type ChannelId = [u8; ID_LEN];

/// A node's channel ID and node-ID mask, given by its relay (see module docs).
#[derive(Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct ChannelToken {
    pub id: ChannelId,
    mask: [u8; 32],
}

impl ChannelToken {
    pub fn random() -> Self {
        ChannelToken {
            id: rand::random(),
            mask: rand::random(),
        }
    }

    /// The node ID a header of this channel carries (see [`parse`]).
    pub fn node(&self, masked: &[u8; 32]) -> NodeId {
        NodeId::from_bytes(std::array::from_fn(|i| masked[i] ^ self.mask[i]))
    }

    /// The node ID and overlay packet of a channel packet of this channel; None when
    /// `packet` is malformed or of another channel.
    pub fn open<'a>(&self, packet: &'a [u8]) -> Option<(NodeId, &'a [u8])> {
        let (id, masked, body) = parse(packet)?;
        (id == self.id).then(|| (self.node(&masked), body))
    }
}

impl From<ChannelToken> for String {
    fn from(token: ChannelToken) -> String {
        let mut bytes = [0u8; TOKEN_LEN];
        bytes[..ID_LEN].copy_from_slice(&token.id);
        bytes[ID_LEN..].copy_from_slice(&token.mask);
        data_encoding::HEXLOWER.encode(&bytes)
    }
}

impl TryFrom<String> for ChannelToken {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        let bytes = data_encoding::HEXLOWER
            .decode(text.as_bytes())
            .map_err(|e| format!("bad channel token: {e}"))?;
        if bytes.len() != TOKEN_LEN {
            return Err(format!(
                "a channel token is {TOKEN_LEN} bytes, not {}",
                bytes.len()
            ));
        }
        let mut token = ChannelToken {
            id: [0; ID_LEN],
            mask: [0; 32],
        };
        token.id.copy_from_slice(&bytes[..ID_LEN]);
        token.mask.copy_from_slice(&bytes[ID_LEN..]);
        Ok(token)
    }
}

impl std::fmt::Debug for ChannelToken {
    // A token is a capability: logs never show it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChannelToken(…)")
    }
}

/// First byte of a relay's restart notice (top two bits clear, like [`TAG`]).
pub const RESTART_TAG: u8 = 0x2e;
const RESTART_MAGIC: &[u8; 15] = b"ferry restarted";
/// Bytes of a restart notice: tag, magic, the relay's node ID.
pub const RESTART_NOTICE_LEN: usize = 1 + RESTART_MAGIC.len() + 32;

/// The notice a relay that just started sends its last run's nodes (see module docs).
pub fn restart_notice(relay: &NodeId) -> [u8; RESTART_NOTICE_LEN] {
    let mut notice = [0u8; RESTART_NOTICE_LEN];
    notice[0] = RESTART_TAG;
    notice[1..1 + RESTART_MAGIC.len()].copy_from_slice(RESTART_MAGIC);
    notice[1 + RESTART_MAGIC.len()..].copy_from_slice(relay.as_bytes());
    notice
}

/// Whether `packet` is a restart notice; the node ID of the relay that sent it. Who
/// may send one is the receiver's question (its relays' addresses).
pub fn parse_restart_notice(packet: &[u8]) -> Option<NodeId> {
    if packet.len() != RESTART_NOTICE_LEN
        || packet[0] != RESTART_TAG
        || &packet[1..1 + RESTART_MAGIC.len()] != RESTART_MAGIC
    {
        return None;
    }
    let id: [u8; 32] = packet[1 + RESTART_MAGIC.len()..].try_into().ok()?;
    Some(NodeId::from_bytes(id))
}

/// Whether `packet` is a channel packet (by its first byte; the token decides whether
/// it is accepted).
pub fn is_channel(packet: &[u8]) -> bool {
    packet.first() == Some(&TAG)
}

/// A channel packet's channel ID, masked node ID (see [`ChannelToken::node`]) and
/// overlay packet; None when `packet` is not a well-formed channel packet.
pub fn parse(packet: &[u8]) -> Option<(ChannelId, [u8; 32], &[u8])> {
    if packet.len() <= HEADER_LEN || packet[0] != TAG {
        return None;
    }
    let id: ChannelId = packet[1..1 + ID_LEN].try_into().ok()?;
    let masked: [u8; 32] = packet[1 + ID_LEN..HEADER_LEN].try_into().ok()?;
    Some((id, masked, &packet[HEADER_LEN..]))
}

/// Writes the header of a packet on `token`'s channel about `node` at the front of
/// `out` (at least `HEADER_LEN` bytes long). The relay uses it to rewrite a packet in
/// place; a shim, in front of each packet.
pub fn write_header(out: &mut [u8], token: &ChannelToken, node: &NodeId) {
    out[0] = TAG;
    out[1..1 + ID_LEN].copy_from_slice(&token.id);
    for (o, (n, m)) in out[1 + ID_LEN..HEADER_LEN]
        .iter_mut()
        .zip(node.as_bytes().iter().zip(token.mask.iter()))
    {
        *o = n ^ m;
    }
}

#[cfg(test)]
mod restart_tests {
    use super::*;

    #[test]
    fn a_restart_notice_names_its_relay_and_nothing_else_passes_for_one() {
        let relay = crate::SecretKey::generate().node_id();
        let notice = restart_notice(&relay);
        assert_eq!(parse_restart_notice(&notice), Some(relay));
        assert!(!is_channel(&notice), "not a channel packet");
        assert_eq!(notice[0] & 0xc0, 0, "neither QUIC nor STUN");
        assert_eq!(
            parse_restart_notice(&notice[..RESTART_NOTICE_LEN - 1]),
            None
        );
        let mut longer = notice.to_vec();
        longer.push(0);
        assert_eq!(parse_restart_notice(&longer), None);
        let mut wrong = notice;
        wrong[3] ^= 1;
        assert_eq!(parse_restart_notice(&wrong), None);
        wrong = notice;
        wrong[0] = TAG;
        assert_eq!(parse_restart_notice(&wrong), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: u8) -> NodeId {
        NodeId::from_bytes([n; 32])
    }

    #[test]
    fn a_header_written_in_place_parses_back() {
        let token = ChannelToken::random();
        let mut packet = vec![0u8; HEADER_LEN + 5];
        packet[HEADER_LEN..].copy_from_slice(b"hello");
        write_header(&mut packet, &token, &node(7));
        assert!(is_channel(&packet));
        assert_eq!(token.open(&packet), Some((node(7), &b"hello"[..])));
        assert!(
            !packet.windows(32).any(|w| w == node(7).as_bytes()),
            "the node ID does not travel in the clear"
        );
        assert_eq!(
            ChannelToken::random().open(&packet),
            None,
            "another channel"
        );
    }

    #[test]
    fn short_or_foreign_packets_are_not_channel_packets() {
        assert!(parse(&[TAG; HEADER_LEN]).is_none(), "no payload");
        assert!(parse(&[]).is_none());
        let mut quic = vec![0x40u8; 100];
        assert!(!is_channel(&quic));
        assert!(parse(&quic).is_none());
        quic[0] = 0x00; // STUN's first byte
        assert!(!is_channel(&quic));
    }

    #[test]
    fn tokens_travel_as_hex_and_bad_ones_are_refused() {
        let token = ChannelToken::random();
        let json = serde_json::to_string(&token).expect("serializes");
        assert_eq!(json.len(), 2 + 2 * TOKEN_LEN);
        let back: ChannelToken = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, token);
        let err = serde_json::from_str::<ChannelToken>("\"abcd\"").expect_err("too short");
        assert!(err.to_string().contains("48 bytes"), "{err}");
        let hex = &json[1..json.len() - 1];
        assert!(
            !format!("{token:?}").contains(&hex[..8]),
            "Debug hides the token"
        );
    }
}
