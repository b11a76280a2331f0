//! Reconnect pacing: exponential backoff, capped, with jitter so that thousands of
//! nodes whose relay restarted do not all knock at the same instant. Sans-IO: the
//! caller supplies the randomness and sleeps.
//!
//! Hand-written: a few lines, sans-IO, where backoff crates bring their own timers
//! and retry loops.

use std::time::Duration;

/// First retry delay after a failure.
pub const BASE: Duration = Duration::from_millis(250);
/// Longest wait between attempts. Small enough that a node is back within a few
/// seconds of its relay, cheap enough (one handshake) to repeat during a long outage.
pub const CAP: Duration = Duration::from_secs(3);

#[derive(Debug, Clone)]
pub struct Backoff {
    failures: u32,
    base: Duration,
    cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(BASE, CAP)
    }
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            failures: 0,
            base,
            cap,
        }
    }

    /// Delay before the next attempt. `unit` is a random number in [0, 1): the delay is
    /// drawn from the upper half of the current step ("equal jitter"), so it never
    /// collapses to zero and never exceeds the cap.
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let step = self
            .base
            .saturating_mul(1u32 << self.failures.min(16))
            .min(self.cap);
        self.failures = self.failures.saturating_add(1);
        let unit = unit.clamp(0.0, 1.0);
        step.mul_f64(0.5 + unit / 2.0)
    }

    /// Call after a successful connection.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_doubles_and_caps_with_jitter_inside_bounds() {
        let mut b = Backoff::default();
        assert_eq!(b.next_delay(1.0), Duration::from_millis(250));
        assert_eq!(b.next_delay(1.0), Duration::from_millis(500));
        assert_eq!(b.next_delay(0.0), Duration::from_millis(500));
        for _ in 0..40 {
            let d = b.next_delay(0.999);
            assert!(d <= CAP && d >= CAP / 2, "{d:?}");
        }
        b.reset();
        assert_eq!(b.next_delay(0.0), Duration::from_millis(125));
    }
}
