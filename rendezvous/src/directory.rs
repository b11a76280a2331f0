//! The record directory: the newest valid signed path record of each node, soft state
//! that expires unless the node refreshes it.
//!
//! Sans-IO: callers pass the time. Records are verified on arrival (signature, sizes,
//! validity window) and only accepted from the node they describe, over its own
//! authenticated session, so an old record replayed by someone else is never stored.
//! Whoever looks a record up verifies it again: the directory is not trusted.

use std::collections::HashMap;
use std::time::SystemTime;

use ferry_proto::NodeId;
use ferry_proto::record::{RecordError, SignedRecord};

/// Records kept at most. Each is well under 2 KiB, so the bound caps memory at a few
/// hundred MiB even if every slot is used; expired records are swept first.
pub const MAX_RECORDS: usize = 200_000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PublishError {
    #[error(transparent)]
    Invalid(#[from] RecordError),
    #[error("node {from} may only publish its own path record, not one of node {record}")]
    NotOwn { from: NodeId, record: NodeId },
    #[error(
        "path record sequence number {got} is not newer than the stored {stored}; publish with a higher sequence number"
    )]
    Stale { got: u64, stored: u64 },
    #[error("the rendezvous holds {MAX_RECORDS} records and has no room; try again later")]
    Full,
}

#[derive(Debug, Default)]
pub struct Directory {
    records: HashMap<NodeId, SignedRecord>,
}

impl Directory {
    /// Stores `record`, published by the authenticated node `from`.
    pub fn publish(
        &mut self,
        from: NodeId,
        record: SignedRecord,
        now: SystemTime,
    ) -> Result<u64, PublishError> {
        let checked = record.verify(now)?;
        if checked.node_id != from {
            return Err(PublishError::NotOwn {
                from,
                record: checked.node_id,
            });
        }
        let seq = checked.seq;
        if let Some(old) = self.records.get(&from) {
            // Re-publishing the identical record (a retry) is fine; anything else must
            // be newer, so a delayed older record cannot overwrite a fresh one.
            if old.record.seq > seq || (old.record.seq == seq && *old != record) {
                return Err(PublishError::Stale {
                    got: seq,
                    stored: old.record.seq,
                });
            }
        } else if self.records.len() >= MAX_RECORDS {
            self.sweep(now);
            if self.records.len() >= MAX_RECORDS {
                return Err(PublishError::Full);
            }
        }
        self.records.insert(from, record);
        Ok(seq)
    }

    /// The node's record if it is still valid at `now`.
    pub fn get(&self, node: &NodeId, now: SystemTime) -> Option<&SignedRecord> {
        self.records
            .get(node)
            .filter(|r| r.record.remaining(now) > 0)
    }

    /// Drops expired records.
    pub fn sweep(&mut self, now: SystemTime) {
        self.records.retain(|_, r| r.record.remaining(now) > 0);
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::SecretKey;
    use ferry_proto::record::{NatMapping, PathRecord, expiry_after};
    use std::time::Duration;

    fn signed(key: &SecretKey, seq: u64, now: SystemTime, secs: u64) -> SignedRecord {
        PathRecord {
            node_id: key.node_id(),
            seq,
            expires: expiry_after(now, Duration::from_secs(secs)),
            addrs: vec!["198.51.100.7:5000".parse().unwrap()],
            relays: vec![],
            nat: NatMapping::EndpointIndependent,
        }
        .sign(key)
    }

    #[test]
    fn newer_records_replace_older_ones_and_stale_ones_are_refused() {
        let key = SecretKey::generate();
        let node = key.node_id();
        let now = SystemTime::now();
        let mut dir = Directory::default();
        assert_eq!(dir.publish(node, signed(&key, 1, now, 60), now), Ok(1));
        assert_eq!(dir.publish(node, signed(&key, 3, now, 60), now), Ok(3));
        assert_eq!(
            dir.publish(node, signed(&key, 2, now, 60), now),
            Err(PublishError::Stale { got: 2, stored: 3 })
        );
        // The identical record again is an idempotent retry.
        let again = dir.get(&node, now).unwrap().clone();
        assert_eq!(dir.publish(node, again, now), Ok(3));
        assert_eq!(dir.get(&node, now).unwrap().record.seq, 3);
    }

    #[test]
    fn records_are_only_taken_from_their_own_node_and_must_verify() {
        let (a, b) = (SecretKey::generate(), SecretKey::generate());
        let now = SystemTime::now();
        let mut dir = Directory::default();
        assert_eq!(
            dir.publish(b.node_id(), signed(&a, 1, now, 60), now),
            Err(PublishError::NotOwn {
                from: b.node_id(),
                record: a.node_id()
            })
        );
        let mut forged = signed(&a, 1, now, 60);
        forged.record.addrs = vec!["192.0.2.66:1".parse().unwrap()];
        assert!(matches!(
            dir.publish(a.node_id(), forged, now),
            Err(PublishError::Invalid(RecordError::BadSignature(_)))
        ));
        assert!(dir.is_empty());
    }

    #[test]
    fn records_expire() {
        let key = SecretKey::generate();
        let now = SystemTime::now();
        let mut dir = Directory::default();
        dir.publish(key.node_id(), signed(&key, 1, now, 30), now)
            .unwrap();
        let later = now + Duration::from_secs(31);
        assert!(dir.get(&key.node_id(), later).is_none());
        dir.sweep(later);
        assert_eq!(dir.len(), 0);
    }
}
