//! Punch coordination: when node A asks to reach node B, tell both the other's
//! candidates and when to start, so that their first packets leave at the same moment.
//!
//! Sans-IO: the caller supplies the time and, for each node, the round-trip time and
//! observed address of its session with this rendezvous; the coordinator returns the
//! messages to send. "Together" means: both start at one absolute instant T, and each
//! is told `T - now - one_way_time` (half its measured RTT), so the node further away
//! gets the shorter delay. T is chosen so the further node's delay is a small margin.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use ferry_proto::NodeId;
use ferry_proto::frame::Control;

use crate::directory::Directory;

/// Slack added to the later node's delay: covers the time to write the message out
/// and jitter in the RTT estimates.
pub const START_MARGIN: Duration = Duration::from_millis(30);

/// How long an attempt covers requests from the other side of the pair. When both
/// nodes ask at once, the second request falls inside it and joins the first attempt
/// (the asker is told again, with the time left until the common start).
pub const PAIR_INTERVAL: Duration = Duration::from_millis(1500);

/// Minimum time between two attempts started by the same node for the same pair; a
/// node that restarted and asks again gets a fresh attempt after this.
pub const REPEAT_INTERVAL: Duration = Duration::from_millis(250);

/// RTT assumed for a session whose RTT is not known (TCP-carried sessions report the
/// inner QUIC estimate, so this is only a fallback).
const DEFAULT_RTT: Duration = Duration::from_millis(100);

/// Pairs remembered for the rate limit; older entries are forgotten first.
const MAX_PAIRS: usize = 100_000;

/// What the rendezvous knows about a node's live session.
#[derive(Clone, Copy, Debug)]
pub struct SessionInfo {
    pub rtt: Option<Duration>,
    pub observed_addr: SocketAddr,
}

/// Why a punch request ended as it did (the label of the outcome metric).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PunchOutcome {
    Coordinated,
    /// Another attempt for the pair started moments ago; the asker joins it.
    Duplicate,
    PeerOffline,
    NoRecord,
    SelfPunch,
}

impl PunchOutcome {
    pub const ALL: [PunchOutcome; 5] = [
        PunchOutcome::Coordinated,
        PunchOutcome::Duplicate,
        PunchOutcome::PeerOffline,
        PunchOutcome::NoRecord,
        PunchOutcome::SelfPunch,
    ];

    pub fn label(self) -> &'static str {
        match self {
            PunchOutcome::Coordinated => "coordinated",
            PunchOutcome::Duplicate => "duplicate",
            PunchOutcome::PeerOffline => "peer_offline",
            PunchOutcome::NoRecord => "no_record",
            PunchOutcome::SelfPunch => "self",
        }
    }
}

/// The latest attempt of a pair.
#[derive(Debug, Clone, Copy)]
struct Attempt {
    at: Instant,
    start_at: Instant,
    initiator: NodeId,
    id: u64,
}

#[derive(Debug, Default)]
pub struct Coordinator {
    last_attempt: HashMap<(NodeId, NodeId), Attempt>,
    next_attempt: u64,
}

fn pair(a: NodeId, b: NodeId) -> (NodeId, NodeId) {
    if a <= b { (a, b) } else { (b, a) }
}

fn half(rtt: Option<Duration>) -> Duration {
    rtt.unwrap_or(DEFAULT_RTT) / 2
}

impl Coordinator {
    /// Handles `from`'s request to reach `peer`. `sessions` looks up live sessions;
    /// `now` is monotonic time for rate limits, `wall` the clock for record expiry.
    pub fn request(
        &mut self,
        from: NodeId,
        peer: NodeId,
        sessions: impl Fn(&NodeId) -> Option<SessionInfo>,
        directory: &Directory,
        now: Instant,
        wall: SystemTime,
    ) -> (PunchOutcome, Vec<(NodeId, Control)>) {
        let fail = |outcome, reason: String| {
            (outcome, vec![(from, Control::PunchFailed { peer, reason })])
        };
        if from == peer {
            return fail(
                PunchOutcome::SelfPunch,
                "a node cannot punch a path to itself".into(),
            );
        }
        let (Some(me), Some(them)) = (sessions(&from), sessions(&peer)) else {
            return fail(
                PunchOutcome::PeerOffline,
                format!("node {peer} is not connected to this rendezvous"),
            );
        };
        let Some(their_record) = directory.get(&peer, wall) else {
            return fail(
                PunchOutcome::NoRecord,
                format!("node {peer} has published no current path record"),
            );
        };
        let Some(my_record) = directory.get(&from, wall) else {
            return fail(
                PunchOutcome::NoRecord,
                "this node has published no current path record; publish one first".into(),
            );
        };
        let key = pair(from, peer);
        let (my_way, their_way) = (half(me.rtt), half(them.rtt));
        let millis = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
        if let Some(last) = self.last_attempt.get(&key).copied() {
            let age = now.saturating_duration_since(last.at);
            let repeat = last.initiator == from && age >= REPEAT_INTERVAL;
            if age < PAIR_INTERVAL && !repeat {
                // Join the attempt under way: same start instant, same ID.
                let start_in = last
                    .start_at
                    .saturating_duration_since(now)
                    .saturating_sub(my_way);
                let join = Control::PunchStart {
                    peer,
                    record: Box::new(their_record.clone()),
                    observed_addr: Some(them.observed_addr),
                    start_in_ms: millis(start_in),
                    attempt: last.id,
                };
                return (PunchOutcome::Duplicate, vec![(from, join)]);
            }
        }
        if self.last_attempt.len() >= MAX_PAIRS {
            self.last_attempt
                .retain(|_, a| now.saturating_duration_since(a.at) < PAIR_INTERVAL);
        }
        self.next_attempt += 1;
        let attempt = self.next_attempt;
        let start_at = my_way.max(their_way) + START_MARGIN;
        self.last_attempt.insert(
            key,
            Attempt {
                at: now,
                start_at: now + start_at,
                initiator: from,
                id: attempt,
            },
        );
        let messages = vec![
            (
                from,
                Control::PunchStart {
                    peer,
                    record: Box::new(their_record.clone()),
                    observed_addr: Some(them.observed_addr),
                    start_in_ms: millis(start_at - my_way),
                    attempt,
                },
            ),
            (
                peer,
                Control::PunchStart {
                    peer: from,
                    record: Box::new(my_record.clone()),
                    observed_addr: Some(me.observed_addr),
                    start_in_ms: millis(start_at - their_way),
                    attempt,
                },
            ),
        ];
        (PunchOutcome::Coordinated, messages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::SecretKey;
    use ferry_proto::record::{NatMapping, PathRecord, expiry_after};

    struct World {
        a: SecretKey,
        b: SecretKey,
        dir: Directory,
        wall: SystemTime,
    }

    fn world() -> World {
        let (a, b) = (SecretKey::generate(), SecretKey::generate());
        let wall = SystemTime::now();
        let mut dir = Directory::default();
        for k in [&a, &b] {
            let rec = PathRecord {
                node_id: k.node_id(),
                seq: 1,
                expires: expiry_after(wall, Duration::from_secs(60)),
                addrs: vec!["192.168.1.2:4000".parse().unwrap()],
                relays: vec![],
                nat: NatMapping::EndpointIndependent,
            };
            dir.publish(k.node_id(), rec.sign(k), wall).unwrap();
        }
        World { a, b, dir, wall }
    }

    fn info(rtt_ms: u64, addr: &str) -> SessionInfo {
        SessionInfo {
            rtt: Some(Duration::from_millis(rtt_ms)),
            observed_addr: addr.parse().unwrap(),
        }
    }

    #[test]
    fn both_sides_get_each_others_record_and_delays_that_meet() {
        let w = world();
        let (a, b) = (w.a.node_id(), w.b.node_id());
        let sessions = |n: &NodeId| {
            if *n == a {
                Some(info(20, "198.51.100.1:1111"))
            } else {
                Some(info(200, "203.0.113.2:2222"))
            }
        };
        let mut c = Coordinator::default();
        let now = Instant::now();
        let (outcome, out) = c.request(a, b, sessions, &w.dir, now, w.wall);
        assert_eq!(outcome, PunchOutcome::Coordinated);
        assert_eq!(out.len(), 2);
        let mut arrival = Vec::new();
        for (to, msg) in &out {
            let Control::PunchStart {
                peer,
                record,
                observed_addr,
                start_in_ms,
                attempt,
            } = msg
            else {
                panic!("{msg:?}")
            };
            assert_eq!(*attempt, 1);
            assert_ne!(peer, to);
            assert_eq!(record.record.node_id, *peer);
            record.verify(w.wall).unwrap();
            let (one_way, expected_addr) = if *to == a {
                (10, "203.0.113.2:2222")
            } else {
                (100, "198.51.100.1:1111")
            };
            assert_eq!(*observed_addr, Some(expected_addr.parse().unwrap()));
            // Message travel time plus the delay it carries: the same instant.
            arrival.push(one_way + *start_in_ms as u64);
        }
        assert_eq!(arrival[0], arrival[1]);
        // The far node starts after only the margin.
        assert_eq!(arrival[0], 100 + START_MARGIN.as_millis() as u64);
    }

    #[test]
    fn the_other_side_asking_at_once_joins_the_attempt_under_way() {
        let w = world();
        let (a, b) = (w.a.node_id(), w.b.node_id());
        let sessions = |_: &NodeId| Some(info(100, "198.51.100.1:1"));
        let mut c = Coordinator::default();
        let t0 = Instant::now();
        let (o, first) = c.request(a, b, sessions, &w.dir, t0, w.wall);
        assert_eq!(o, PunchOutcome::Coordinated);
        let Control::PunchStart { start_in_ms, .. } = &first[1].1 else {
            panic!()
        };
        assert_eq!(*start_in_ms, 30, "equal RTTs: the margin only");
        // B asks 20 ms later: it is told about the same attempt, 20 ms less to wait.
        let t1 = t0 + Duration::from_millis(20);
        let (o, out) = c.request(b, a, sessions, &w.dir, t1, w.wall);
        assert_eq!(o, PunchOutcome::Duplicate);
        match &out[..] {
            [
                (
                    to,
                    Control::PunchStart {
                        peer,
                        start_in_ms,
                        attempt,
                        ..
                    },
                ),
            ] => {
                assert_eq!((*to, *peer, *attempt), (b, a, 1));
                assert_eq!(*start_in_ms, 10);
            }
            other => panic!("{other:?}"),
        }
        // A asking again (say, after a restart) gets a fresh attempt.
        let t2 = t0 + REPEAT_INTERVAL;
        let (o, out) = c.request(a, b, sessions, &w.dir, t2, w.wall);
        assert_eq!((o, out.len()), (PunchOutcome::Coordinated, 2));
        // And after the interval anyone does.
        let later = t2 + PAIR_INTERVAL;
        assert_eq!(
            c.request(b, a, sessions, &w.dir, later, w.wall).0,
            PunchOutcome::Coordinated
        );
    }

    #[test]
    fn failures_say_why() {
        let w = world();
        let (a, b) = (w.a.node_id(), w.b.node_id());
        let stranger = SecretKey::generate().node_id();
        let mut c = Coordinator::default();
        let now = Instant::now();
        let only_a = |n: &NodeId| (*n == a).then(|| info(10, "198.51.100.1:1"));
        let reason = |out: Vec<(NodeId, Control)>| match &out[..] {
            [(to, Control::PunchFailed { reason, .. })] if *to == a => reason.clone(),
            other => panic!("{other:?}"),
        };
        let (o, out) = c.request(a, b, only_a, &w.dir, now, w.wall);
        assert_eq!(o, PunchOutcome::PeerOffline);
        assert!(reason(out).contains("is not connected"));

        let everyone = |_: &NodeId| Some(info(10, "198.51.100.1:1"));
        let (o, out) = c.request(a, stranger, everyone, &w.dir, now, w.wall);
        assert_eq!(o, PunchOutcome::NoRecord);
        assert!(reason(out).contains("no current path record"));

        let (o, out) = c.request(a, a, everyone, &w.dir, now, w.wall);
        assert_eq!(o, PunchOutcome::SelfPunch);
        assert!(reason(out).contains("itself"));

        // Records that expired are as good as none.
        let late = w.wall + Duration::from_secs(61);
        let (o, _) = c.request(a, b, everyone, &w.dir, now, late);
        assert_eq!(o, PunchOutcome::NoRecord);
    }
}
