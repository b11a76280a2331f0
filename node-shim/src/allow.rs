//! Who may open streams to this node's services over the overlay: the allow list
//! from the config and flags, changed at run time by the web panel; with
//! `allow_grid`, every member of this node's grids that proves it (a
//! [`PeerHello`] with a membership certificate, checked against the grid's
//! [`GridView`] its relays send). Read by the overlay's connection loops and the path
//! manager (which punches only towards peers it allows).
//!
//! [`AllowList::decide`] is the whole rule, sans-IO. In order: this node itself is
//! always let in; a node denied here (the panel) or revoked by any of its grids is
//! refused, even if listed or with `allow_any`; then the list and `allow_any`; then,
//! with `allow_grid`, a valid, unexpired membership certificate issued by one of the
//! grid's admins.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ferry_proto::NodeId;
use ferry_proto::frame::{MAX_HELLO_CERTIFICATES, PeerHello};
use ferry_proto::grid::{GridView, MemberError};

use serde::{Deserialize, Serialize};

/// How a peer came to be allowed to use this node's services.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PeerAccess {
    /// The node itself.
    ThisNode,
    /// On the allow list (`allow`, `--allow`, the panel).
    Listed,
    /// `allow_any`.
    AnyNode,
    /// A member of one of this node's grids, by a certificate from `issuer`, valid
    /// until `expires` (unix seconds).
    Member { issuer: NodeId, expires: u64 },
    /// Not allowed: it may not use this node's services (this node may still use
    /// its), and why.
    NotAllowed { reason: String },
}

impl PeerAccess {
    /// In words, for the panel and `ferry-shim status`.
    pub fn describe(&self) -> String {
        match self {
            PeerAccess::ThisNode => "this node".to_string(),
            PeerAccess::Listed => "allowed".to_string(),
            PeerAccess::AnyNode => "allowed (allow_any)".to_string(),
            PeerAccess::Member { issuer, .. } => {
                format!("grid member (issued by {})", issuer.short())
            }
            PeerAccess::NotAllowed { .. } => "not allowed".to_string(),
        }
    }
}

/// One grid this node belongs to, as far as it knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownGrid {
    /// The relay this node joined through; its `Control::Grid` messages replace `view`.
    pub relay: NodeId,
    pub view: GridView,
}

/// Who may open streams to this node's services.
#[derive(Debug, Clone)]
pub struct AllowList {
    pub me: NodeId,
    pub nodes: Vec<NodeId>,
    pub any: bool,
    /// Denied at run time (the web panel's deny button). Beats `any` and `nodes`, so
    /// that deny means deny even with `allow_any`; kept in memory only.
    pub denied: BTreeSet<NodeId>,
    /// `allow_grid`: members of this node's grids may connect.
    pub grid: bool,
    /// The grids this node belongs to (its memberships).
    pub grids: Vec<KnownGrid>,
    /// Peers that proved membership, with when their membership runs out (unix
    /// seconds).
    pub members: BTreeMap<NodeId, u64>,
}

/// What [`AllowList::decide`] says of a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Admit(PeerAccess),
    /// Only a membership certificate could let the peer in: read its hello first.
    NeedHello,
    Refuse(NotAllowed),
}

/// Why a peer may not use this node's services. The message reaches the peer (as the
/// connection's close reason or a stream's refusal) and both nodes' status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotAllowed {
    #[error("node {peer} is denied by node {me}'s operator")]
    Denied { peer: NodeId, me: NodeId },
    #[error("node {peer}'s grid membership was revoked; node {me} no longer lets it in")]
    Revoked { peer: NodeId, me: NodeId },
    #[error(
        "node {peer} is not allowed to connect to node {me}; its operator can add --allow {peer}"
    )]
    NotListed { peer: NodeId, me: NodeId },
    #[error(
        "node {peer} is not a member of node {me}'s grid: it presented no membership certificate; join the grid with `ferry-shim join CODE`"
    )]
    NoCertificate { peer: NodeId, me: NodeId },
    #[error("node {peer} is not a member of node {me}'s grid: {why}")]
    NotAMember {
        peer: NodeId,
        me: NodeId,
        why: Box<MemberError>,
    },
}

impl NotAllowed {
    /// Whether the operator or the grid shut this peer out on purpose: its
    /// connections are closed even when this node dialled them.
    pub fn shut_out(&self) -> bool {
        matches!(self, NotAllowed::Denied { .. } | NotAllowed::Revoked { .. })
    }
}

fn unix(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl AllowList {
    /// A list of `nodes` (or anyone, with `any`), without grids.
    pub fn new(me: NodeId, nodes: Vec<NodeId>, any: bool) -> Self {
        AllowList {
            me,
            nodes,
            any,
            denied: BTreeSet::new(),
            grid: false,
            grids: Vec::new(),
            members: BTreeMap::new(),
        }
    }

    fn revoked(&self, peer: &NodeId) -> bool {
        self.grids.iter().any(|g| g.view.revoked.contains(peer))
    }

    /// May `peer` use this node's services at `now`, given what it said in its hello
    /// (`None`: not read yet)?
    pub fn decide(&self, peer: &NodeId, hello: Option<&PeerHello>, now: SystemTime) -> Decision {
        let me = self.me;
        if *peer == me {
            return Decision::Admit(PeerAccess::ThisNode);
        }
        if self.denied.contains(peer) {
            return Decision::Refuse(NotAllowed::Denied { peer: *peer, me });
        }
        if self.revoked(peer) {
            return Decision::Refuse(NotAllowed::Revoked { peer: *peer, me });
        }
        if self.nodes.contains(peer) {
            return Decision::Admit(PeerAccess::Listed);
        }
        if self.any {
            return Decision::Admit(PeerAccess::AnyNode);
        }
        if !self.grid {
            return Decision::Refuse(NotAllowed::NotListed { peer: *peer, me });
        }
        let Some(hello) = hello else {
            return Decision::NeedHello;
        };
        let mut why = None;
        for cert in hello.certificates.iter().take(MAX_HELLO_CERTIFICATES) {
            for grid in &self.grids {
                match grid.view.member(peer, cert, now) {
                    Ok(m) => {
                        return Decision::Admit(PeerAccess::Member {
                            issuer: m.issuer,
                            expires: m.expires,
                        });
                    }
                    Err(e) => why = Some(e),
                }
            }
        }
        Decision::Refuse(match why {
            Some(why) => NotAllowed::NotAMember {
                peer: *peer,
                me,
                why: Box::new(why),
            },
            None => NotAllowed::NoCertificate { peer: *peer, me },
        })
    }

    /// Whether `peer` may use this node's services as far as is known now: listed, or
    /// a member that proved it and whose membership has not run out.
    pub fn allows(&self, peer: &NodeId) -> bool {
        if *peer == self.me {
            return true;
        }
        if self.denied.contains(peer) || self.revoked(peer) {
            return false;
        }
        self.any
            || self.nodes.contains(peer)
            || (self.grid
                && self
                    .members
                    .get(peer)
                    .is_some_and(|expires| *expires > unix(SystemTime::now())))
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

    /// Records that `peer` proved a membership valid until `expires` (for `allows`).
    pub fn note_member(&self, peer: NodeId, expires: u64) {
        self.0
            .send_if_modified(|list| list.members.insert(peer, expires) != Some(expires));
    }

    /// Takes in what the relay `relay` says of its grid. Returns whether it changed
    /// anything: `false` for a relay whose grid this node is not a member of.
    pub fn set_grid(&self, relay: NodeId, view: GridView) -> bool {
        self.0.send_if_modified(
            |list| match list.grids.iter_mut().find(|g| g.relay == relay) {
                Some(g) if g.view != view => {
                    g.view = view;
                    true
                }
                _ => false,
            },
        )
    }

    /// Wakes up whenever the list changes.
    pub(crate) fn changes(&self) -> tokio::sync::watch::Receiver<AllowList> {
        self.0.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::SecretKey;
    use ferry_proto::grid::{CertError, Certificate, Membership};
    use std::time::Duration;

    fn node() -> NodeId {
        SecretKey::generate().node_id()
    }

    fn list(me: NodeId, nodes: Vec<NodeId>, any: bool) -> AllowList {
        AllowList::new(me, nodes, any)
    }

    fn cert(member: &SecretKey, admin: &SecretKey, now: SystemTime) -> Certificate {
        Membership {
            member: member.node_id(),
            issuer: admin.node_id(),
            issued: unix(now),
            expires: unix(now) + 3600,
            serial: 1,
        }
        .sign(admin)
    }

    fn hello(certs: Vec<Certificate>) -> PeerHello {
        PeerHello {
            certificates: certs,
        }
    }

    #[test]
    fn listed_nodes_and_the_node_itself_are_allowed_others_not() {
        let (me, friend, stranger) = (node(), node(), node());
        let list = list(me, vec![friend], false);
        assert!(list.allows(&me) && list.allows(&friend));
        assert!(!list.allows(&stranger));
        let now = SystemTime::now();
        assert_eq!(
            list.decide(&friend, None, now),
            Decision::Admit(PeerAccess::Listed)
        );
        let Decision::Refuse(why) = list.decide(&stranger, None, now) else {
            panic!("a stranger was let in");
        };
        assert!(why.to_string().contains("--allow"), "{why}");
    }

    /// The membership check on the overlay: a member of this node's grid with a
    /// good certificate is let in; expired, another grid's, forged, someone else's
    /// and revoked certificates are refused, each with its reason.
    #[test]
    fn grid_members_are_let_in_by_certificate_and_nobody_else() {
        let (admin, member, other_admin) = (
            SecretKey::generate(),
            SecretKey::generate(),
            SecretKey::generate(),
        );
        let relay = admin.node_id();
        let now = SystemTime::now();
        let mut list = list(node(), vec![], false);
        list.grid = true;
        list.grids.push(KnownGrid {
            relay,
            view: GridView {
                admins: [relay].into(),
                revoked: BTreeSet::new(),
            },
        });
        let peer = member.node_id();
        let good = cert(&member, &admin, now);
        assert_eq!(list.decide(&peer, None, now), Decision::NeedHello);
        assert_eq!(
            list.decide(&peer, Some(&hello(vec![good.clone()])), now),
            Decision::Admit(PeerAccess::Member {
                issuer: relay,
                expires: good.membership.expires
            })
        );
        let refused = |h: PeerHello, at: SystemTime| match list.decide(&peer, Some(&h), at) {
            Decision::Refuse(why) => why,
            other => panic!("let in: {other:?}"),
        };
        // No certificate at all.
        let why = refused(hello(vec![]), now);
        assert!(matches!(why, NotAllowed::NoCertificate { .. }), "{why}");
        assert!(why.to_string().contains("ferry-shim join"), "{why}");
        // Expired.
        let why = refused(hello(vec![good.clone()]), now + Duration::from_secs(3601));
        assert!(why.to_string().contains("expired"), "{why}");
        // Another grid's.
        let why = refused(hello(vec![cert(&member, &other_admin, now)]), now);
        assert!(
            why.to_string().contains("not an admin of this grid"),
            "{why}"
        );
        // Forged: signed by someone else in the admin's name.
        let mut forged = cert(&member, &other_admin, now);
        forged.membership.issuer = relay;
        let why = refused(hello(vec![forged]), now);
        assert!(
            matches!(
                &why,
                NotAllowed::NotAMember { why, .. }
                    if **why == MemberError::Certificate(CertError::BadSignature)
            ),
            "{why}"
        );
        // Another member's certificate, presented by this peer.
        let why = refused(hello(vec![cert(&SecretKey::generate(), &admin, now)]), now);
        assert!(why.to_string().contains("not for this node"), "{why}");
        // Revoked by the grid: refused at once, whatever it presents.
        let mut revoked = list.clone();
        revoked.grids[0].view.revoked.insert(peer);
        let Decision::Refuse(why) = revoked.decide(&peer, None, now) else {
            panic!("a revoked member was let in");
        };
        assert!(
            why.shut_out() && why.to_string().contains("revoked"),
            "{why}"
        );
        // Without allow_grid nobody gets in by certificate.
        let mut no_grid = list.clone();
        no_grid.grid = false;
        assert!(matches!(
            no_grid.decide(&peer, Some(&hello(vec![good])), now),
            Decision::Refuse(NotAllowed::NotListed { .. })
        ));
    }

    #[test]
    fn proven_members_are_allowed_until_revoked() {
        let (admin, member) = (SecretKey::generate(), SecretKey::generate());
        let now = SystemTime::now();
        let mut list = list(node(), vec![], false);
        list.grid = true;
        list.grids.push(KnownGrid {
            relay: admin.node_id(),
            view: GridView {
                admins: [admin.node_id()].into(),
                revoked: BTreeSet::new(),
            },
        });
        let shared = SharedAllow::new(list);
        let peer = member.node_id();
        assert!(!shared.allows(&peer));
        shared.note_member(peer, cert(&member, &admin, now).membership.expires);
        assert!(shared.allows(&peer));
        let changes = shared.changes();
        let view = GridView {
            admins: [admin.node_id()].into(),
            revoked: [peer].into(),
        };
        assert!(shared.set_grid(admin.node_id(), view.clone()));
        assert!(changes.has_changed().expect("open"));
        assert!(!shared.allows(&peer));
        // The same view again, or one from a relay of no grid of this node's: no change.
        assert!(!shared.set_grid(admin.node_id(), view.clone()));
        assert!(!shared.set_grid(node(), view));
    }

    #[test]
    fn a_run_time_deny_beats_allow_any_but_never_shuts_out_the_node_itself() {
        let (me, peer) = (node(), node());
        let shared = SharedAllow::new(list(me, vec![], true));
        assert!(shared.allows(&peer));
        shared.deny(peer).expect("deny a peer");
        assert!(!shared.allows(&peer));
        let Decision::Refuse(why) = shared.snapshot().decide(&peer, None, SystemTime::now()) else {
            panic!("a denied node was let in");
        };
        assert!(why.shut_out(), "{why}");
        let err = shared.deny(me).unwrap_err();
        assert!(err.contains("this node itself"), "{err}");
        assert!(shared.allows(&me));
        shared.allow(peer);
        assert!(shared.allows(&peer) && shared.snapshot().denied.is_empty());
    }

    #[test]
    fn a_change_wakes_the_watchers() {
        let shared = SharedAllow::new(list(node(), vec![], false));
        let changes = shared.changes();
        assert!(!changes.has_changed().expect("open"));
        shared.allow(node());
        assert!(changes.has_changed().expect("open"));
    }
}
