//! Noticing that the far end of a link stopped answering, in about a second rather
//! than at QUIC's idle timeout (60 s, kept long so quiet links survive lossy uplinks).
//!
//! QUIC acknowledges every ack-eliciting packet within a round trip plus the peer's
//! ack delay, so "we sent something that needs an answer and heard nothing at all for
//! a while" means the peer (or the path to it) is gone. The verdict is advisory: a
//! node stops routing new traffic through an unresponsive relay but keeps the link, and
//! takes the relay back the moment any packet arrives again. Sans-IO: fed counter
//! samples and time, unit-tested without sockets.

use std::time::{Duration, Instant};

/// Counters of one link at one instant (see [`crate::link::Link::activity`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Activity {
    /// Frames sent that oblige the peer to acknowledge (stream data, PING, …).
    pub eliciting_sent: u64,
    /// Datagrams received from the peer, of any kind.
    pub received: u64,
    pub rtt: Duration,
}

/// A change of verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing came back for `silent_for` after something that needed an answer.
    Unresponsive { silent_for: Duration },
    /// Packets arrive again.
    Answering,
}

#[derive(Debug)]
pub struct Liveness {
    min_wait: Duration,
    last: Option<Activity>,
    /// When an unanswered ack-eliciting send was first seen.
    waiting_since: Option<Instant>,
    unresponsive: bool,
}

/// Round trips to wait beyond the floor: ack delay and a little jitter fit well inside.
const RTT_FACTOR: u32 = 4;

impl Liveness {
    /// `min_wait` is the shortest silence that counts (it must exceed the peer's ack
    /// delay and scheduling hiccups; about a second).
    pub fn new(min_wait: Duration) -> Self {
        Liveness {
            min_wait,
            last: None,
            waiting_since: None,
            unresponsive: false,
        }
    }

    pub fn is_unresponsive(&self) -> bool {
        self.unresponsive
    }

    /// Feeds one sample taken at `now`; returns the verdict when it changes.
    pub fn observe(&mut self, now: Instant, sample: Activity) -> Option<Verdict> {
        let last = self.last.replace(sample)?;
        if sample.received > last.received {
            self.waiting_since = None;
            if self.unresponsive {
                self.unresponsive = false;
                return Some(Verdict::Answering);
            }
            return None;
        }
        if sample.eliciting_sent > last.eliciting_sent && self.waiting_since.is_none() {
            // The send happened since the last sample; counting from now errs on the
            // side of waiting longer.
            self.waiting_since = Some(now);
        }
        let since = self.waiting_since?;
        let silent_for = now.saturating_duration_since(since);
        let limit = self.min_wait.max(sample.rtt * RTT_FACTOR);
        if !self.unresponsive && silent_for >= limit {
            self.unresponsive = true;
            return Some(Verdict::Unresponsive { silent_for });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn activity(eliciting_sent: u64, received: u64) -> Activity {
        Activity {
            eliciting_sent,
            received,
            rtt: 10 * MS,
        }
    }

    #[test]
    fn a_peer_that_answers_stays_answering() {
        let t = Instant::now();
        let mut l = Liveness::new(1000 * MS);
        for i in 0..100u64 {
            // Every send is answered by the next sample.
            assert_eq!(l.observe(t + i as u32 * 200 * MS, activity(i, i)), None);
        }
        assert!(!l.is_unresponsive());
    }

    #[test]
    fn quiet_is_not_dead_and_ack_only_traffic_expects_nothing() {
        let t = Instant::now();
        let mut l = Liveness::new(1000 * MS);
        l.observe(t, activity(5, 9));
        // Nothing sent that needs an answer: silence for a minute is fine.
        assert_eq!(l.observe(t + 60_000 * MS, activity(5, 9)), None);
        assert!(!l.is_unresponsive());
    }

    #[test]
    fn silence_after_a_send_is_unresponsive_then_any_packet_is_answering() {
        let t = Instant::now();
        let mut l = Liveness::new(1000 * MS);
        l.observe(t, activity(5, 9));
        assert_eq!(l.observe(t + 200 * MS, activity(6, 9)), None);
        assert_eq!(l.observe(t + 800 * MS, activity(9, 9)), None, "not yet");
        assert_eq!(
            l.observe(t + 1200 * MS, activity(12, 9)),
            Some(Verdict::Unresponsive {
                silent_for: 1000 * MS
            })
        );
        assert_eq!(l.observe(t + 1400 * MS, activity(13, 9)), None, "said once");
        assert_eq!(
            l.observe(t + 1600 * MS, activity(13, 10)),
            Some(Verdict::Answering)
        );
        assert!(!l.is_unresponsive());
    }

    #[test]
    fn a_long_round_trip_waits_longer() {
        let t = Instant::now();
        let mut l = Liveness::new(1000 * MS);
        let slow = |sent| Activity {
            eliciting_sent: sent,
            received: 0,
            rtt: 600 * MS,
        };
        l.observe(t, slow(0));
        l.observe(t + 100 * MS, slow(1));
        assert_eq!(l.observe(t + 2000 * MS, slow(2)), None, "4 RTT = 2.4 s");
        assert!(matches!(
            l.observe(t + 2600 * MS, slow(3)),
            Some(Verdict::Unresponsive { .. })
        ));
    }
}
