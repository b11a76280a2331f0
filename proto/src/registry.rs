//! Who is connected right now: node ID → the current session handle.
//!
//! Soft state by design (nothing here survives a restart; nodes simply reconnect). The
//! one rule it enforces: a node has at most one session, the newest. A session's
//! cleanup only removes the entry if it is still the current one, so an old session
//! that ends late cannot tear down its successor.
//!
//! Deadlock hazard (DashMap shards are locks): never hold a guard from this map across
//! an `.await` or while touching another entry; every method clones the handle out.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::identity::NodeId;
use dashmap::DashMap;

struct Entry<S> {
    session: u64,
    handle: S,
}

pub struct Registry<S> {
    nodes: DashMap<NodeId, Entry<S>>,
    next_session: AtomicU64,
}

impl<S: Clone> Default for Registry<S> {
    fn default() -> Self {
        Registry {
            nodes: DashMap::new(),
            next_session: AtomicU64::new(1),
        }
    }
}

impl<S: Clone> Registry<S> {
    /// Makes `handle` the node's current session. Returns the new session number and
    /// the session it replaced, which the caller must close.
    pub fn insert(&self, node: NodeId, handle: S) -> (u64, Option<S>) {
        let session = self.next_session.fetch_add(1, Ordering::Relaxed);
        let old = self
            .nodes
            .insert(node, Entry { session, handle })
            .map(|e| e.handle);
        (session, old)
    }

    /// Removes the node if `session` is still its current session; true if removed.
    pub fn remove(&self, node: &NodeId, session: u64) -> bool {
        self.nodes
            .remove_if(node, |_, e| e.session == session)
            .is_some()
    }

    pub fn get(&self, node: &NodeId) -> Option<S> {
        self.nodes.get(node).map(|e| e.handle.clone())
    }

    /// True if `session` is the node's current session.
    pub fn is_current(&self, node: &NodeId, session: u64) -> bool {
        self.nodes.get(node).is_some_and(|e| e.session == session)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The nodes with a session now.
    pub fn nodes(&self) -> Vec<NodeId> {
        self.nodes.iter().map(|e| *e.key()).collect()
    }

    pub fn snapshot(&self) -> Vec<(NodeId, S)> {
        self.nodes
            .iter()
            .map(|e| (*e.key(), e.value().handle.clone()))
            .collect()
    }

    /// The current sessions `wanted` picks, looked at in place: unlike [`snapshot`],
    /// nothing is cloned for the ones it passes over (a relay asks every second, over
    /// every node).
    ///
    /// [`snapshot`]: Registry::snapshot
    pub fn select(&self, mut wanted: impl FnMut(&S) -> bool) -> Vec<(NodeId, S)> {
        self.nodes
            .iter()
            .filter(|e| wanted(&e.value().handle))
            .map(|e| (*e.key(), e.value().handle.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SecretKey;

    #[test]
    fn newest_session_wins_and_late_cleanup_is_harmless() {
        let reg: Registry<&'static str> = Registry::default();
        let node = SecretKey::generate().node_id();
        let (first, replaced) = reg.insert(node, "first");
        assert!(replaced.is_none());
        let (second, replaced) = reg.insert(node, "second");
        assert_eq!(replaced, Some("first"));
        // The replaced session is no longer current: a re-registration on it ends it
        // (the drivers ask before serving one) rather than taking the node back.
        assert!(!reg.is_current(&node, first));
        assert!(reg.is_current(&node, second));
        // The first session ends after the second took over: nothing is removed.
        assert!(!reg.remove(&node, first));
        assert_eq!(reg.get(&node), Some("second"));
        assert!(reg.is_current(&node, second));
        assert!(reg.remove(&node, second));
        assert!(reg.get(&node).is_none());
        assert!(reg.is_empty());
    }
}
