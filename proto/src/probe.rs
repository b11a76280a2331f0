//! Path probes: the small signed UDP packets two shims exchange to find and keep a
//! direct path, sent from the same socket as their QUIC traffic.
//!
//! A `Ping` asks "can you hear me at this address?"; the `Pong` answers with the
//! address the ping came from. A path counts as verified only when a pong for one of
//! our own pings arrives, so one-way reachability is never mistaken for a path.
//! Every probe is signed by the sender's node key and names the receiver, so nobody
//! can forge a path into someone else's table; a pong also echoes the ping's random
//! transaction ID, so a replayed pong matches nothing. A pong is exactly as large as
//! the ping that caused it: probes cannot be used to amplify traffic.
//!
//! Layout (big endian): magic (8) | kind (1) | sender (32) | receiver (32) | tx (8) |
//! observed address (19: family 4/6, 16 address bytes, port) | signature (64).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ed25519_dalek::Signature;

use crate::identity::{NodeId, SecretKey};

/// Leading bytes of every probe. QUIC packets cannot start with them by accident in
/// practice (a short-header QUIC packet carries a random connection ID there), and
/// STUN messages start with two zero bits.
pub const MAGIC: [u8; 8] = *b"\xfeFERRYp1";

/// Size of every probe on the wire.
pub const PROBE_LEN: usize = 8 + 1 + 32 + 32 + 8 + 19 + 64;

const SIGNING_CONTEXT: &[u8] = b"ferry path probe v1\0";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    Ping,
    Pong,
}

/// One decoded (not yet verified) probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub kind: ProbeKind,
    pub sender: NodeId,
    pub receiver: NodeId,
    pub tx: u64,
    /// For a pong, where the ping came from as the answering node saw it; for a ping,
    /// the address the sender sent to (informational).
    pub observed: SocketAddr,
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProbeError {
    #[error("not a path probe")]
    NotAProbe,
    #[error("path probe with unknown kind {0}")]
    UnknownKind(u8),
    #[error("path probe with a malformed address")]
    BadAddress,
    #[error("path probe from node {0} carries a signature that does not verify")]
    BadSignature(NodeId),
}

/// True when `packet` looks like a probe (cheap test for demultiplexing).
pub fn is_probe(packet: &[u8]) -> bool {
    packet.len() == PROBE_LEN && packet[..8] == MAGIC
}

fn body(p: &Probe) -> [u8; PROBE_LEN - 64] {
    let mut out = [0u8; PROBE_LEN - 64];
    out[..8].copy_from_slice(&MAGIC);
    out[8] = match p.kind {
        ProbeKind::Ping => 1,
        ProbeKind::Pong => 2,
    };
    out[9..41].copy_from_slice(p.sender.as_bytes());
    out[41..73].copy_from_slice(p.receiver.as_bytes());
    out[73..81].copy_from_slice(&p.tx.to_be_bytes());
    let addr = &mut out[81..100];
    match p.observed.ip() {
        IpAddr::V4(ip) => {
            addr[0] = 4;
            addr[1..5].copy_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            addr[0] = 6;
            addr[1..17].copy_from_slice(&ip.octets());
        }
    }
    addr[17..19].copy_from_slice(&p.observed.port().to_be_bytes());
    out
}

fn signed_message(body: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(SIGNING_CONTEXT.len() + body.len());
    msg.extend_from_slice(SIGNING_CONTEXT);
    msg.extend_from_slice(body);
    msg
}

impl Probe {
    /// Encodes and signs. `key` must belong to `self.sender`.
    pub fn encode(&self, key: &SecretKey) -> [u8; PROBE_LEN] {
        let body = body(self);
        let signature = key.sign(&signed_message(&body));
        let mut out = [0u8; PROBE_LEN];
        out[..PROBE_LEN - 64].copy_from_slice(&body);
        out[PROBE_LEN - 64..].copy_from_slice(&signature);
        out
    }

    /// Parses without checking the signature: callers first decide whether the probe
    /// concerns them (receiver is this node, sender is a peer they talk to) so that
    /// strangers' garbage never costs a signature check.
    pub fn decode(packet: &[u8]) -> Result<Probe, ProbeError> {
        if !is_probe(packet) {
            return Err(ProbeError::NotAProbe);
        }
        let kind = match packet[8] {
            1 => ProbeKind::Ping,
            2 => ProbeKind::Pong,
            other => return Err(ProbeError::UnknownKind(other)),
        };
        let id = |range: std::ops::Range<usize>| {
            let mut b = [0u8; 32];
            b.copy_from_slice(&packet[range]);
            NodeId::from_bytes(b)
        };
        let mut tx = [0u8; 8];
        tx.copy_from_slice(&packet[73..81]);
        let addr = &packet[81..100];
        let port = u16::from_be_bytes([addr[17], addr[18]]);
        let ip = match addr[0] {
            4 => IpAddr::V4(Ipv4Addr::new(addr[1], addr[2], addr[3], addr[4])),
            6 => {
                let mut b = [0u8; 16];
                b.copy_from_slice(&addr[1..17]);
                IpAddr::V6(Ipv6Addr::from(b))
            }
            _ => return Err(ProbeError::BadAddress),
        };
        Ok(Probe {
            kind,
            sender: id(9..41),
            receiver: id(41..73),
            tx: u64::from_be_bytes(tx),
            observed: SocketAddr::new(ip, port),
        })
    }

    /// Checks the signature of `packet` (which decoded to `self`) against the sender.
    pub fn verify(&self, packet: &[u8]) -> Result<(), ProbeError> {
        let bad = ProbeError::BadSignature(self.sender);
        if packet.len() != PROBE_LEN {
            return Err(bad);
        }
        let key = self.sender.verifying_key().ok_or(bad.clone())?;
        let mut sig = [0u8; 64];
        sig.copy_from_slice(&packet[PROBE_LEN - 64..]);
        key.verify_strict(
            &signed_message(&packet[..PROBE_LEN - 64]),
            &Signature::from_bytes(&sig),
        )
        .map_err(|_| bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ping(from: &SecretKey, to: NodeId) -> Probe {
        Probe {
            kind: ProbeKind::Ping,
            sender: from.node_id(),
            receiver: to,
            tx: 0x0102_0304_0506_0708,
            observed: "[2001:db8::7]:9999".parse().unwrap(),
        }
    }

    #[test]
    fn probes_round_trip_and_verify() {
        let (a, b) = (SecretKey::generate(), SecretKey::generate());
        for observed in ["203.0.113.9:4242", "[2001:db8::7]:9999"] {
            let mut p = ping(&a, b.node_id());
            p.kind = ProbeKind::Pong;
            p.observed = observed.parse().unwrap();
            let wire = p.encode(&a);
            assert!(is_probe(&wire));
            let back = Probe::decode(&wire).unwrap();
            assert_eq!(back, p);
            back.verify(&wire).unwrap();
        }
    }

    #[test]
    fn forged_or_altered_probes_fail() {
        let (a, b, mallory) = (
            SecretKey::generate(),
            SecretKey::generate(),
            SecretKey::generate(),
        );
        // Mallory signs a ping that claims to come from A.
        let wire = ping(&a, b.node_id()).encode(&mallory);
        let p = Probe::decode(&wire).unwrap();
        assert_eq!(p.verify(&wire), Err(ProbeError::BadSignature(a.node_id())));
        // A genuine pong whose observed address was rewritten in flight.
        let mut wire = ping(&a, b.node_id()).encode(&a);
        wire[99] ^= 1;
        let p = Probe::decode(&wire).unwrap();
        assert!(p.verify(&wire).is_err());
    }

    #[test]
    fn other_packets_are_not_probes() {
        assert_eq!(Probe::decode(b"hello"), Err(ProbeError::NotAProbe));
        let mut quic = [0x40u8; PROBE_LEN];
        quic[1] = 7;
        assert_eq!(Probe::decode(&quic), Err(ProbeError::NotAProbe));
        let mut bad_kind = ping(&SecretKey::generate(), SecretKey::generate().node_id())
            .encode(&SecretKey::generate());
        bad_kind[8] = 9;
        assert_eq!(Probe::decode(&bad_kind), Err(ProbeError::UnknownKind(9)));
    }
}
