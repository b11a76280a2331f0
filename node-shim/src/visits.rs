//! Reaching a peer that is on another relay of a fleet (#19): the bookkeeping and
//! the decision; `relay_client` drives it (`find_peer`, `run_visit`).
//!
//! The pattern is iroh's: a dialer that does not share a relay with its peer opens a
//! link to the peer's relay on demand, and relays never forward to each other. When
//! the overlay dials a peer it has no connection to, the shim asks one of its relays
//! that is in a fleet where the peer has sessions (`locate`). If none of its own
//! relays holds one, it opens a *visit*: a session with that relay (pinned by the
//! relay key in the URL the fleet gave, so nobody but that relay can answer),
//! registering no services, carrying this peer's relayed packets, its rendezvous
//! messages and so its hole punching; closed once no peer it carries has had a
//! connection for a minute. Which relays a mode may visit is the mode's policy:
//! p2p any, private any (through its proxy, like every link there), strict only those
//! listed in `may_reach`; otherwise the peer shows why it cannot be reached.
//!
//! The other end needs nothing: the peer answers through the relay its packets came
//! in by (`PathSocket::heard_via`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ferry_proto::frame::{self, Control, Frame};
use ferry_proto::sync::lock;
use ferry_proto::{NodeId, RelayUrl};
use tokio::sync::{oneshot, watch};

/// Relay session indices of visits start here, after every configured relay and the
/// rendezvous: a visit is never a node's preferred relay.
pub const VISIT_BASE: usize = 1 << 16;
/// A visit closes once no peer it carries has had a connection for this long.
pub const VISIT_IDLE: Duration = Duration::from_secs(60);
/// How long a relay may take to answer `locate`.
pub const LOCATE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a visit may take to be registered before the peer is given up.
pub const VISIT_SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// What to do about a peer the fleet located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// The peer has a session at a relay this node holds a session with: relay its
    /// packets through that session (by index).
    Through(usize),
    /// Open a visit to this relay.
    Visit(RelayUrl),
    /// The peer is only on relays this mode may not reach; the text names them and
    /// the fix.
    Refused(String),
    /// The peer has no session at any relay of the fleet.
    Nowhere,
}

/// Decides how to reach a peer at `located` (the relays holding its sessions, as a
/// relay of the fleet said) from this node's live relay `sessions` (index, relay
/// key); `may_visit` is the mode's rule for relays it is not configured with.
pub fn choose(
    located: &[RelayUrl],
    sessions: &BTreeMap<usize, NodeId>,
    may_visit: impl Fn(&RelayUrl) -> bool,
    mode: &str,
) -> Choice {
    if located.is_empty() {
        return Choice::Nowhere;
    }
    // The lowest index first: a configured relay before a visit.
    if let Some((index, _)) = sessions
        .iter()
        .find(|(_, relay)| located.iter().any(|url| url.relay_id == **relay))
    {
        return Choice::Through(*index);
    }
    match located.iter().find(|url| may_visit(url)) {
        Some(url) => Choice::Visit(url.clone()),
        None => {
            let names: Vec<String> = located.iter().map(ToString::to_string).collect();
            Choice::Refused(format!(
                "the peer is connected only to relay {}, which {mode} mode does not reach: it reaches the relays it is configured with; add that relay to may_reach (--may-reach URL) to reach it there",
                names.join(", ")
            ))
        }
    }
}

/// One visit: its session index and whether it is registered now.
struct Visit {
    index: usize,
    up: watch::Sender<bool>,
}

/// What the shim knows about its relays' fleets and its visits.
#[derive(Default)]
pub struct Visits {
    /// Live sessions of relays in a fleet, which answer `locate`, by index.
    askable: Mutex<BTreeMap<usize, frame::FrameSender>>,
    /// Live relay sessions that carry overlay packets: index → relay key.
    sessions: Mutex<BTreeMap<usize, NodeId>>,
    /// `locate` questions waiting for their answer, by the node asked about.
    waiting: Mutex<HashMap<NodeId, Vec<oneshot::Sender<Vec<RelayUrl>>>>>,
    /// Visits open or opening, by relay key.
    visits: Mutex<HashMap<NodeId, Visit>>,
    /// Peers being located now (one search per peer at a time).
    finding: Mutex<HashSet<NodeId>>,
    next: AtomicUsize,
}

/// How asking the fleet failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocateError {
    /// None of this node's relays is in a fleet: there is nobody to ask, and a peer
    /// must share a relay with this node.
    NoFleet,
    /// The relay asked did not answer in time.
    Unanswered,
}

impl Visits {
    /// Relay session `index` (relay key `relay`) carries overlay packets now; `fleet`
    /// is its queue when the relay is in a fleet and answers `locate`.
    pub fn session_up(&self, index: usize, relay: NodeId, fleet: Option<frame::FrameSender>) {
        lock(&self.sessions).insert(index, relay);
        if let Some(tx) = fleet {
            lock(&self.askable).insert(index, tx);
        }
        if let Some(visit) = lock(&self.visits).get(&relay)
            && visit.index == index
        {
            visit.up.send_replace(true);
        }
    }

    /// Relay session `index` ended.
    pub fn session_down(&self, index: usize) {
        lock(&self.askable).remove(&index);
        if let Some(relay) = lock(&self.sessions).remove(&index)
            && let Some(visit) = lock(&self.visits).get(&relay)
            && visit.index == index
        {
            visit.up.send_replace(false);
        }
    }

    /// The live relay sessions that carry overlay packets (index → relay key).
    pub fn sessions(&self) -> BTreeMap<usize, NodeId> {
        lock(&self.sessions).clone()
    }

    /// Starts a search for `peer`; false when one is under way.
    pub fn start_finding(&self, peer: NodeId) -> bool {
        lock(&self.finding).insert(peer)
    }

    pub fn done_finding(&self, peer: &NodeId) {
        lock(&self.finding).remove(peer);
    }

    /// Asks a relay of the fleet (a configured one first) where `peer` has sessions.
    pub async fn locate(&self, peer: NodeId) -> Result<Vec<RelayUrl>, LocateError> {
        let (tx, rx) = oneshot::channel();
        lock(&self.waiting).entry(peer).or_default().push(tx);
        let asked = lock(&self.askable).values().any(|session| {
            session
                .try_send(Frame::Control(Control::Locate { node_id: peer }))
                .is_ok()
        });
        let answer = if asked {
            tokio::time::timeout(LOCATE_TIMEOUT, rx)
                .await
                .ok()
                .and_then(Result::ok)
                .ok_or(LocateError::Unanswered)
        } else {
            Err(LocateError::NoFleet)
        };
        // Waiters whose answer never came (their sender is dropped with them).
        let mut waiting = lock(&self.waiting);
        if let Some(list) = waiting.get_mut(&peer) {
            list.retain(|w| !w.is_closed());
            if list.is_empty() {
                waiting.remove(&peer);
            }
        }
        answer
    }

    /// A relay's answer to `locate`: for everyone waiting to hear about `node`.
    pub fn located(&self, node: NodeId, relays: Vec<RelayUrl>) {
        for waiter in lock(&self.waiting).remove(&node).into_iter().flatten() {
            let _ = waiter.send(relays.clone());
        }
    }

    /// The visit to `url`'s relay: its index, whether it is new (the caller starts
    /// it), and a view of whether it is registered.
    pub fn visit(&self, url: &RelayUrl) -> (usize, bool, watch::Receiver<bool>) {
        let mut visits = lock(&self.visits);
        if let Some(visit) = visits.get(&url.relay_id) {
            return (visit.index, false, visit.up.subscribe());
        }
        let index = VISIT_BASE + self.next.fetch_add(1, Ordering::Relaxed);
        let (up, seen) = watch::channel(false);
        visits.insert(url.relay_id, Visit { index, up });
        (index, true, seen)
    }

    /// The visit with session `index` to relay `relay` is over.
    pub fn visit_ended(&self, relay: &NodeId, index: usize) {
        let mut visits = lock(&self.visits);
        if visits.get(relay).is_some_and(|v| v.index == index) {
            visits.remove(relay);
        }
    }
}

/// True for the session index of a visit.
pub fn is_visit(index: usize) -> bool {
    index >= VISIT_BASE
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::SecretKey;

    fn relay(port: u16) -> RelayUrl {
        let id = SecretKey::generate().node_id();
        format!("ferry://{id}@relay.example:{port}")
            .parse()
            .unwrap()
    }

    #[test]
    fn a_peer_on_a_relay_this_node_holds_goes_through_it_and_the_lowest_index_wins() {
        let (one, two, three) = (relay(1), relay(2), relay(3));
        let sessions = BTreeMap::from([(0, one.relay_id), (1, two.relay_id)]);
        let choice = choose(&[three.clone(), two.clone()], &sessions, |_| true, "p2p");
        assert_eq!(choice, Choice::Through(1));
        let both = choose(&[two.clone(), one.clone()], &sessions, |_| true, "p2p");
        assert_eq!(both, Choice::Through(0));
    }

    #[test]
    fn a_peer_only_elsewhere_is_visited_where_the_mode_allows_and_refused_with_the_fix_otherwise() {
        let (one, three, four) = (relay(1), relay(3), relay(4));
        let sessions = BTreeMap::from([(0, one.relay_id)]);
        let located = [three.clone(), four.clone()];
        assert_eq!(
            choose(&located, &sessions, |_| true, "p2p"),
            Choice::Visit(three.clone())
        );
        let only_four = |url: &RelayUrl| url.relay_id == four.relay_id;
        assert_eq!(
            choose(&located, &sessions, only_four, "strict"),
            Choice::Visit(four.clone())
        );
        let Choice::Refused(why) = choose(&located, &sessions, |_| false, "strict") else {
            panic!("strict mode without may_reach must refuse");
        };
        assert!(why.contains(&three.to_string()) && why.contains("strict mode"));
        assert!(why.contains("may_reach"), "{why}");
        assert_eq!(choose(&[], &sessions, |_| true, "p2p"), Choice::Nowhere);
    }

    #[tokio::test]
    async fn a_located_answer_reaches_every_asker_and_a_visit_is_opened_once() {
        let visits = Visits::default();
        let peer = SecretKey::generate().node_id();
        assert_eq!(visits.locate(peer).await, Err(LocateError::NoFleet));
        let (tx, rx) = frame::frame_queue(8);
        visits.session_up(0, relay(1).relay_id, Some(tx));
        let three = relay(3);
        let answer = {
            let three = three.clone();
            let visits = &visits;
            async move {
                let Ok(Frame::Control(Control::Locate { node_id })) = rx.recv_async().await else {
                    panic!("locate was not sent");
                };
                visits.located(node_id, vec![three]);
            }
        };
        let (located, ()) = tokio::join!(visits.locate(peer), answer);
        assert_eq!(located, Ok(vec![three.clone()]));

        let (index, new, mut up) = visits.visit(&three);
        assert!(new && is_visit(index) && !*up.borrow());
        let (again, new_again, _) = visits.visit(&three);
        assert_eq!((again, new_again), (index, false));
        visits.session_up(index, three.relay_id, None);
        assert!(*up.borrow_and_update());
        visits.session_down(index);
        assert!(!*up.borrow_and_update());
        visits.visit_ended(&three.relay_id, index);
        assert!(visits.visit(&three).1, "a visit that ended is opened anew");
    }
}
