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
//! Wire format, both directions: `TAG | token (16) | node ID (32) | packet`.
//! - shim → relay: `token` is the sending shim's channel token, `node ID` the
//!   destination;
//! - relay → shim: `token` is the receiving shim's channel token, `node ID` the source.
//!
//! The token is 16 random bytes the relay hands the node in `Registered`, over the
//! authenticated link, and forgets when the session ends. The relay accepts a channel
//! packet only with a live token from the address that token's link uses, so an
//! off-path sender can neither inject packets nor spend a node's byte allowance; a
//! shim accepts one only from its relay's address with its own token. Someone on the
//! path who reads the token could inject packets, which the end-to-end QUIC then
//! rejects — no worse than that party dropping packets.
//!
//! `TAG` has the top two bits clear, so no QUIC v1 packet (fixed bit set; endpoints
//! disable fixed-bit greasing) and no STUN message (first byte 0 or 1) looks like one.

use crate::NodeId;

/// First byte of every channel packet.
pub const TAG: u8 = 0x2f;
/// Bytes of a channel token.
pub const TOKEN_LEN: usize = 16;
/// Bytes in front of the overlay packet.
pub const HEADER_LEN: usize = 1 + TOKEN_LEN + 32;

/// A node's channel token, given by its relay (see module docs).
#[derive(Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct ChannelToken(#[serde(with = "hex_token")] pub [u8; TOKEN_LEN]);

impl ChannelToken {
    pub fn random() -> Self {
        ChannelToken(rand::random())
    }
}

impl std::fmt::Debug for ChannelToken {
    // A token is a capability: logs never show it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChannelToken(…)")
    }
}

mod hex_token {
    use super::TOKEN_LEN;
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(token: &[u8; TOKEN_LEN], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&data_encoding::HEXLOWER.encode(token))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; TOKEN_LEN], D::Error> {
        let text = String::deserialize(d)?;
        let bytes = data_encoding::HEXLOWER
            .decode(text.as_bytes())
            .map_err(D::Error::custom)?;
        bytes
            .try_into()
            .map_err(|_| D::Error::custom("a channel token is 16 bytes"))
    }
}

/// Whether `packet` is a channel packet (by its first byte; the token decides whether
/// it is accepted).
pub fn is_channel(packet: &[u8]) -> bool {
    packet.first() == Some(&TAG)
}

/// A channel packet's token, node ID and overlay packet; None when `packet` is not a
/// well-formed channel packet.
pub fn parse(packet: &[u8]) -> Option<(ChannelToken, NodeId, &[u8])> {
    if packet.len() <= HEADER_LEN || packet[0] != TAG {
        return None;
    }
    let token: [u8; TOKEN_LEN] = packet[1..1 + TOKEN_LEN].try_into().ok()?;
    let node: [u8; 32] = packet[1 + TOKEN_LEN..HEADER_LEN].try_into().ok()?;
    Some((
        ChannelToken(token),
        NodeId::from_bytes(node),
        &packet[HEADER_LEN..],
    ))
}

/// Writes a channel header at the front of `out` (at least `HEADER_LEN` bytes long).
/// The relay uses it to rewrite a packet in place; a shim, in front of each packet.
pub fn write_header(out: &mut [u8], token: &ChannelToken, node: &NodeId) {
    out[0] = TAG;
    out[1..1 + TOKEN_LEN].copy_from_slice(&token.0);
    out[1 + TOKEN_LEN..HEADER_LEN].copy_from_slice(node.as_bytes());
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
        let (t, n, body) = parse(&packet).expect("parses");
        assert_eq!((t, n, body), (token, node(7), &b"hello"[..]));
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
        let token = ChannelToken([0xab; TOKEN_LEN]);
        let json = serde_json::to_string(&token).expect("serializes");
        assert_eq!(json, format!("\"{}\"", "ab".repeat(TOKEN_LEN)));
        assert_eq!(
            serde_json::from_str::<ChannelToken>(&json).expect("parses"),
            token
        );
        let err = serde_json::from_str::<ChannelToken>("\"abcd\"").expect_err("too short");
        assert!(err.to_string().contains("16 bytes"), "{err}");
        assert!(
            !format!("{token:?}").contains("ab"),
            "Debug hides the token"
        );
    }
}
