//! Where a fleet's nodes are (#19), sans-IO: which of the fleet's relays are alive
//! (with their URLs) and which relays hold a session of each node, as the fleet's
//! relays and presence buckets say (`crate::fleet`). It answers `locate` from memory;
//! the driver (`server.rs` `run_fleet`) feeds it the buckets' changes.
//!
//! Presence of a relay that is not alive is never told: a relay killed without a word
//! leaves its keys behind, and they count for nothing once its relays entry expires.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ferry_proto::{NodeId, RelayUrl};

use crate::fleet::parse_presence_key;

/// A relay's view of where the fleet's nodes are.
#[derive(Debug, Default)]
pub struct Whereabouts {
    /// The fleet's live relays, this one included.
    relays: BTreeMap<NodeId, RelayUrl>,
    /// Node → the relays the presence bucket says hold a session of it.
    at: HashMap<NodeId, BTreeSet<NodeId>>,
}

impl Whereabouts {
    /// The fleet's live relays now. True when the set changed.
    pub fn set_relays(&mut self, relays: BTreeMap<NodeId, RelayUrl>) -> bool {
        let changed = self.relays != relays;
        self.relays = relays;
        changed
    }

    /// The fleet's live relays, this one included.
    pub fn relays(&self) -> &BTreeMap<NodeId, RelayUrl> {
        &self.relays
    }

    /// One change of the presence bucket: `key` was put (`present`) or deleted. A
    /// key no relay writes is ignored (and returns false).
    pub fn update(&mut self, key: &str, present: bool) -> bool {
        let Some((node, relay)) = parse_presence_key(key) else {
            return false;
        };
        if present {
            self.at.entry(node).or_default().insert(relay);
        } else if let Some(relays) = self.at.get_mut(&node) {
            relays.remove(&relay);
            if relays.is_empty() {
                self.at.remove(&node);
            }
        }
        true
    }

    /// Forgets every node's place (a watch of the presence bucket starts over).
    pub fn clear_presence(&mut self) {
        self.at.clear();
    }

    /// The live relays, other than `this`, holding a session of `node`.
    pub fn locate(&self, node: &NodeId, this: &NodeId) -> Vec<RelayUrl> {
        self.at
            .get(node)
            .into_iter()
            .flatten()
            .filter(|relay| *relay != this)
            .filter_map(|relay| self.relays.get(relay).cloned())
            .collect()
    }

    /// What `relay` must write so the bucket says exactly that it holds `sessions`:
    /// the nodes to put, and the nodes to delete (left by a crash, or by writes lost
    /// while the engine was away).
    pub fn reconcile(
        &self,
        relay: &NodeId,
        sessions: &BTreeSet<NodeId>,
    ) -> (Vec<NodeId>, Vec<NodeId>) {
        let said: BTreeSet<NodeId> = self
            .at
            .iter()
            .filter(|(_, relays)| relays.contains(relay))
            .map(|(node, _)| *node)
            .collect();
        let put = sessions.difference(&said).copied().collect();
        let delete = said.difference(sessions).copied().collect();
        (put, delete)
    }

    /// Nodes the presence bucket places somewhere.
    pub fn len(&self) -> usize {
        self.at.len()
    }

    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::presence_key;
    use ferry_proto::SecretKey;

    fn id() -> NodeId {
        SecretKey::generate().node_id()
    }

    fn url(relay: NodeId, port: u16) -> RelayUrl {
        format!("ferry://{relay}@relay.example:{port}")
            .parse()
            .unwrap()
    }

    #[test]
    fn a_node_is_located_only_at_live_relays_other_than_the_asked_one() {
        let (this, other, dead, node) = (id(), id(), id(), id());
        let mut w = Whereabouts::default();
        w.set_relays(BTreeMap::from([
            (this, url(this, 1)),
            (other, url(other, 2)),
        ]));
        for relay in [this, other, dead] {
            assert!(w.update(&presence_key(&node, &relay), true));
        }
        // The dead relay's key is left behind; it counts for nothing.
        assert_eq!(w.locate(&node, &this), vec![url(other, 2)]);
        w.update(&presence_key(&node, &other), false);
        assert!(w.locate(&node, &this).is_empty());
        assert!(w.locate(&id(), &this).is_empty());
        assert!(!w.update("garbage", true));
        assert!(!w.update(&format!("{node}.nonsense"), true));
    }

    #[test]
    fn a_relay_learns_which_of_its_keys_to_write_and_which_to_delete() {
        let (this, other) = (id(), id());
        let (kept, stale, missing, elsewhere) = (id(), id(), id(), id());
        let mut w = Whereabouts::default();
        w.update(&presence_key(&kept, &this), true);
        w.update(&presence_key(&stale, &this), true);
        w.update(&presence_key(&elsewhere, &other), true);
        let sessions = BTreeSet::from([kept, missing]);
        let (put, delete) = w.reconcile(&this, &sessions);
        assert_eq!(put, vec![missing]);
        assert_eq!(delete, vec![stale]);
        assert_eq!(w.len(), 3);
    }
}
