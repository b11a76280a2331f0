//! Signed path records: "where to reach me", published by a node to a rendezvous and
//! handed to peers that want to reach it.
//!
//! A record names the node, the addresses it may be reached at (interface, reflexive
//! and configured addresses), the relays it keeps sessions with, how its NAT maps
//! ports, an expiry and a sequence number. The node signs it with its own key, so a
//! rendezvous can store and hand out records without being able to forge or alter
//! them: both the rendezvous (on arrival) and every peer (on lookup) verify the
//! signature against the node ID itself.
//!
//! The signature covers a fixed binary encoding written here, not the JSON the record
//! travels in, so verification does not depend on how a JSON library orders or spells
//! fields.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ed25519_dalek::Signature;
use serde::{Deserialize, Serialize};

use crate::identity::{NodeId, SecretKey};
use crate::url::RelayUrl;

/// Candidate addresses one record may carry. A host with many interfaces and a few
/// configured addresses fits; more would only make peers probe longer.
pub const MAX_RECORD_ADDRS: usize = 16;

/// Relay URLs one record may carry.
pub const MAX_RECORD_RELAYS: usize = 8;

/// Longest validity a record may claim; a rendezvous refuses records that would
/// outlive this, so stale addresses cannot be pinned for days.
pub const MAX_RECORD_LIFETIME: Duration = Duration::from_secs(3600);

/// How far apart the clocks of a node and those who check its records (rendezvous,
/// peers) may be with every record still accepted for its whole life: a node ahead by
/// this much claims a lifetime this much longer (still under
/// [`MAX_RECORD_LIFETIME`]); a node behind by this much has records that expire this
/// much sooner, which its publishing interval must leave room for.
pub const CLOCK_SKEW_TOLERANCE: Duration = Duration::from_secs(300);

/// Domain separation: a signature over a path record can never be mistaken for a
/// signature over anything else a node key signs.
const SIGNING_CONTEXT: &[u8] = b"ferry path record v1\0";

/// How a node's NAT maps its one UDP socket, as the node measured it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum NatMapping {
    /// Not measured (no UDP, or only one observer answered).
    #[default]
    Unknown,
    /// The node's socket has a public address itself: no NAT.
    None,
    /// The same public address and port towards every destination (punchable).
    EndpointIndependent,
    /// A different public port per destination ("symmetric"): peers cannot use the
    /// address a rendezvous saw.
    EndpointDependent,
}

impl NatMapping {
    /// The name status and logs use (the same as in JSON).
    pub fn name(self) -> &'static str {
        match self {
            NatMapping::Unknown => "unknown",
            NatMapping::None => "none",
            NatMapping::EndpointIndependent => "endpoint_independent",
            NatMapping::EndpointDependent => "endpoint_dependent",
        }
    }

    fn code(self) -> u8 {
        match self {
            NatMapping::Unknown => 0,
            NatMapping::None => 1,
            NatMapping::EndpointIndependent => 2,
            NatMapping::EndpointDependent => 3,
        }
    }
}

/// The signed content of a path record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathRecord {
    pub node_id: NodeId,
    /// Increases with every record the node publishes; a rendezvous keeps the highest.
    pub seq: u64,
    /// Unix time (seconds) after which the record must not be used.
    pub expires: u64,
    /// Candidate UDP addresses of the node's one socket.
    pub addrs: Vec<SocketAddr>,
    pub relays: Vec<RelayUrl>,
    #[serde(default)]
    pub nat: NatMapping,
}

/// A path record with its signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedRecord {
    pub record: PathRecord,
    /// ed25519 signature, lowercase hex.
    pub signature: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("path record of node {0} carries a signature that does not verify")]
    BadSignature(NodeId),
    // A fresh record that is already expired or too long-lived means the signer's
    // clock and the checker's disagree by more than CLOCK_SKEW_TOLERANCE, so both
    // messages name the clock: that is the fix when a node sees them for its own record.
    #[error(
        "path record of node {node} expired {ago} s ago (if it was just signed, the \
         signer's clock is behind the checker's: set both clocks right, e.g. with NTP)"
    )]
    Expired { node: NodeId, ago: u64 },
    #[error(
        "path record of node {node} claims a lifetime of {secs} s; at most {max} s is \
         accepted (if it was just signed, the signer's clock is ahead of the checker's: \
         set both clocks right, e.g. with NTP)"
    )]
    TooLong { node: NodeId, secs: u64, max: u64 },
    #[error("path record of node {node} has {count} {what}; at most {max} are accepted")]
    TooMany {
        node: NodeId,
        what: &'static str,
        count: usize,
        max: usize,
    },
}

fn unix_now(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn put_addr(out: &mut Vec<u8>, addr: &SocketAddr) {
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

impl PathRecord {
    /// The bytes the signature covers. Counts are bounded by [`PathRecord::check`]
    /// before anything is signed or verified, so the one-byte counts cannot wrap.
    fn signed_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(SIGNING_CONTEXT);
        out.extend_from_slice(self.node_id.as_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.expires.to_be_bytes());
        out.push(self.nat.code());
        out.push(self.addrs.len() as u8);
        for addr in &self.addrs {
            put_addr(&mut out, addr);
        }
        out.push(self.relays.len() as u8);
        for relay in &self.relays {
            let text = relay.to_string();
            out.extend_from_slice(&(text.len() as u16).to_be_bytes());
            out.extend_from_slice(text.as_bytes());
        }
        out
    }

    /// Checks the sizes and the validity window (at `now`).
    pub fn check(&self, now: SystemTime) -> Result<(), RecordError> {
        let node = self.node_id;
        if self.addrs.len() > MAX_RECORD_ADDRS {
            return Err(RecordError::TooMany {
                node,
                what: "addresses",
                count: self.addrs.len(),
                max: MAX_RECORD_ADDRS,
            });
        }
        if self.relays.len() > MAX_RECORD_RELAYS {
            return Err(RecordError::TooMany {
                node,
                what: "relays",
                count: self.relays.len(),
                max: MAX_RECORD_RELAYS,
            });
        }
        let now = unix_now(now);
        if self.expires <= now {
            return Err(RecordError::Expired {
                node,
                ago: now - self.expires,
            });
        }
        let max = MAX_RECORD_LIFETIME.as_secs();
        if self.expires - now > max {
            return Err(RecordError::TooLong {
                node,
                secs: self.expires - now,
                max,
            });
        }
        Ok(())
    }

    /// Signs the record with the node's key. The key must be the record's node.
    pub fn sign(self, key: &SecretKey) -> SignedRecord {
        let signature = key.sign(&self.signed_bytes());
        SignedRecord {
            record: self,
            signature: data_encoding::HEXLOWER.encode(&signature),
        }
    }

    /// Seconds of validity left at `now` (0 when expired).
    pub fn remaining(&self, now: SystemTime) -> u64 {
        self.expires.saturating_sub(unix_now(now))
    }
}

impl SignedRecord {
    /// Verifies the signature against the record's own node ID, then its sizes and
    /// validity window. Whoever receives a record calls this before using it.
    pub fn verify(&self, now: SystemTime) -> Result<&PathRecord, RecordError> {
        let record = &self.record;
        let bad = || RecordError::BadSignature(record.node_id);
        // Sizes first: they bound the work of encoding the signed bytes, and `check`
        // tests them before the validity window.
        if record.addrs.len() > MAX_RECORD_ADDRS || record.relays.len() > MAX_RECORD_RELAYS {
            return record.check(now).map(|()| record);
        }
        let key = record.node_id.verifying_key().ok_or_else(bad)?;
        let bytes = data_encoding::HEXLOWER
            .decode(self.signature.as_bytes())
            .map_err(|_| bad())?;
        let bytes: [u8; 64] = bytes.try_into().map_err(|_| bad())?;
        key.verify_strict(&record.signed_bytes(), &Signature::from_bytes(&bytes))
            .map_err(|_| bad())?;
        record.check(now)?;
        Ok(record)
    }
}

/// Unix time `lifetime` from `now`, for building records.
pub fn expiry_after(now: SystemTime, lifetime: Duration) -> u64 {
    unix_now(now) + lifetime.as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &SecretKey, now: SystemTime) -> PathRecord {
        PathRecord {
            node_id: key.node_id(),
            seq: 7,
            expires: expiry_after(now, Duration::from_secs(600)),
            addrs: vec![
                "192.168.1.5:4000".parse().unwrap(),
                "[2001:db8::1]:4000".parse().unwrap(),
            ],
            relays: vec![
                format!("ferry://{}@relay.example:7842", key.node_id())
                    .parse()
                    .unwrap(),
            ],
            nat: NatMapping::EndpointIndependent,
        }
    }

    /// A node whose clock is off by the tolerance either way: its records verify at the
    /// checker for their whole (shortened or lengthened) life, and a node that is
    /// behind, republishing every 200 s as the shim does, is never without a valid
    /// record at the checker.
    #[test]
    fn records_survive_the_clock_skew_tolerance_either_way() {
        let key = SecretKey::generate();
        let checker_now = SystemTime::now();
        let skew = CLOCK_SKEW_TOLERANCE;
        for node_now in [checker_now + skew, checker_now - skew] {
            let signed = record(&key, node_now).sign(&key);
            assert!(signed.verify(checker_now).is_ok(), "skew {skew:?}");
        }
        // Node behind: published at node time t, checked at t + skew + elapsed.
        let republish = Duration::from_secs(200);
        let mut published = checker_now - skew;
        for _ in 0..5 {
            let signed = record(&key, published).sign(&key);
            // Just before the next record arrives, this one is still good.
            let just_before_next = published + skew + republish - Duration::from_secs(1);
            assert!(signed.verify(just_before_next).is_ok());
            published += republish;
        }
        // Beyond the tolerance a node that is ahead claims too long a life.
        let far_ahead = record(&key, checker_now + Duration::from_secs(3600)).sign(&key);
        assert!(matches!(
            far_ahead.verify(checker_now),
            Err(RecordError::TooLong { .. })
        ));
    }

    #[test]
    fn a_signed_record_verifies_and_survives_json() {
        let key = SecretKey::generate();
        let now = SystemTime::now();
        let signed = record(&key, now).sign(&key);
        let json = serde_json::to_string(&signed).unwrap();
        let back: SignedRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back.verify(now).unwrap(), &record(&key, now));
    }

    #[test]
    fn any_change_breaks_the_signature() {
        let key = SecretKey::generate();
        let now = SystemTime::now();
        let signed = record(&key, now).sign(&key);
        let node = key.node_id();
        let tamper: Vec<fn(&mut PathRecord)> = vec![
            |r| r.seq += 1,
            |r| r.expires -= 1,
            |r| r.addrs[0] = "10.0.0.1:4000".parse().unwrap(),
            |r| {
                r.addrs.pop();
            },
            |r| r.relays.clear(),
            |r| r.nat = NatMapping::EndpointDependent,
        ];
        for t in tamper {
            let mut forged = signed.clone();
            t(&mut forged.record);
            assert_eq!(forged.verify(now), Err(RecordError::BadSignature(node)));
        }
        // Signed by another key but claiming this node.
        let other = SecretKey::generate();
        let forged = record(&key, now).sign(&other);
        assert_eq!(forged.verify(now), Err(RecordError::BadSignature(node)));
        // Garbage signature text.
        let mut forged = signed.clone();
        forged.signature = "zz".into();
        assert_eq!(forged.verify(now), Err(RecordError::BadSignature(node)));
    }

    #[test]
    fn expiry_and_sizes_are_enforced() {
        let key = SecretKey::generate();
        let now = SystemTime::now();
        let signed = record(&key, now).sign(&key);
        let later = now + Duration::from_secs(601);
        assert!(matches!(
            signed.verify(later),
            Err(RecordError::Expired { .. })
        ));

        let mut long = record(&key, now);
        long.expires = expiry_after(now, Duration::from_secs(7200));
        assert!(matches!(
            long.sign(&key).verify(now),
            Err(RecordError::TooLong { .. })
        ));

        let mut many = record(&key, now);
        many.addrs = vec!["10.0.0.1:1".parse().unwrap(); MAX_RECORD_ADDRS + 1];
        let err = many.sign(&key).verify(now).unwrap_err();
        assert!(err.to_string().contains("at most 16"), "{err}");
    }
}
