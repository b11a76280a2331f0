//! Who may open streams to this node's services over the overlay: the allow list
//! from the config and flags, changed at run time by the web panel, and read by the
//! overlay's accept loop and the path manager (which punches only towards peers it
//! allows).

use std::collections::BTreeSet;
use std::sync::Arc;

use ferry_proto::NodeId;

/// Who may open streams to this node's services.
#[derive(Debug, Clone)]
pub struct AllowList {
    pub me: NodeId,
    pub nodes: Vec<NodeId>,
    pub any: bool,
    /// Denied at run time (the web panel's deny button). Beats `any` and `nodes`, so
    /// that deny means deny even with `allow_any`; kept in memory only.
    pub denied: BTreeSet<NodeId>,
}

impl AllowList {
    pub fn allows(&self, peer: &NodeId) -> bool {
        *peer == self.me || (!self.denied.contains(peer) && (self.any || self.nodes.contains(peer)))
    }
}

/// The allow list, shared by the overlay's accept loop, the path manager and the
/// admin panel, and changeable at run time. A `watch` channel rather than a bare lock:
/// each accepted connection waits on it, so a deny closes a live connection at once.
#[derive(Debug, Clone)]
pub struct SharedAllow(Arc<tokio::sync::watch::Sender<AllowList>>);

impl SharedAllow {
    pub fn new(list: AllowList) -> Self {
        SharedAllow(Arc::new(tokio::sync::watch::Sender::new(list)))
    }

    pub fn allows(&self, peer: &NodeId) -> bool {
        self.0.borrow().allows(peer)
    }

    /// This node's own ID (always allowed).
    pub fn me(&self) -> NodeId {
        self.0.borrow().me
    }

    /// A copy of the list as it is now.
    pub fn snapshot(&self) -> AllowList {
        self.0.borrow().clone()
    }

    /// Lets `peer` connect (and lifts a run-time deny).
    pub fn allow(&self, peer: NodeId) {
        self.0.send_modify(|list| {
            list.denied.remove(&peer);
            if !list.nodes.contains(&peer) {
                list.nodes.push(peer);
            }
        });
    }

    /// Takes `peer` off the list and refuses it even with `allow_any`; its live
    /// connections to this node are closed with
    /// [`crate::overlay::CLOSE_NOT_ALLOWED`].
    pub fn deny(&self, peer: NodeId) -> Result<(), String> {
        if peer == self.0.borrow().me {
            return Err(format!(
                "node {peer} is this node itself, which may always reach its own services"
            ));
        }
        self.0.send_modify(|list| {
            list.nodes.retain(|n| *n != peer);
            list.denied.insert(peer);
        });
        Ok(())
    }

    /// Wakes up whenever the list changes.
    pub(crate) fn changes(&self) -> tokio::sync::watch::Receiver<AllowList> {
        self.0.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> NodeId {
        ferry_proto::SecretKey::generate().node_id()
    }

    #[test]
    fn listed_nodes_and_the_node_itself_are_allowed_others_not() {
        let (me, friend, stranger) = (node(), node(), node());
        let list = AllowList {
            me,
            nodes: vec![friend],
            any: false,
            denied: BTreeSet::new(),
        };
        assert!(list.allows(&me) && list.allows(&friend));
        assert!(!list.allows(&stranger));
    }

    #[test]
    fn a_run_time_deny_beats_allow_any_but_never_shuts_out_the_node_itself() {
        let (me, peer) = (node(), node());
        let shared = SharedAllow::new(AllowList {
            me,
            nodes: vec![],
            any: true,
            denied: BTreeSet::new(),
        });
        assert!(shared.allows(&peer));
        shared.deny(peer).expect("deny a peer");
        assert!(!shared.allows(&peer));
        let err = shared.deny(me).unwrap_err();
        assert!(err.contains("this node itself"), "{err}");
        assert!(shared.allows(&me));
        shared.allow(peer);
        assert!(shared.allows(&peer) && shared.snapshot().denied.is_empty());
    }

    #[test]
    fn a_change_wakes_the_watchers() {
        let shared = SharedAllow::new(AllowList {
            me: node(),
            nodes: vec![],
            any: false,
            denied: BTreeSet::new(),
        });
        let changes = shared.changes();
        assert!(!changes.has_changed().expect("open"));
        shared.allow(node());
        assert!(changes.has_changed().expect("open"));
    }
}
