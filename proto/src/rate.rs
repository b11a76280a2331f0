//! Token buckets: the one rate-limiting primitive of Ferry's limits (bytes per second
//! per node, handshakes per second per source address).
//!
//! [`TokenBucket`] is sans-IO (it takes the time); [`SharedBucket`] is the handle the
//! async code shares, and [`crate::splice`] uses it to apply backpressure: a stream
//! over its rate is simply read more slowly, so TCP flow control slows the sender and
//! nothing is buffered or dropped.
//!
//! Hand-written: backpressure needs "how long until n bytes may pass" on the caller's
//! clock ([`TokenBucket::wait_for`]); rate-limit crates answer yes or no per request.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct TokenBucket {
    /// Tokens added per second.
    rate: f64,
    /// Most tokens held (the burst allowed after a quiet spell).
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        TokenBucket {
            rate: rate.max(f64::MIN_POSITIVE),
            burst: burst.max(1.0),
            tokens: burst.max(1.0),
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
    }

    /// Whole tokens available at `now`.
    pub fn available(&mut self, now: Instant) -> u64 {
        self.refill(now);
        self.tokens.max(0.0) as u64
    }

    /// Takes `n` tokens if they are all there.
    pub fn try_take(&mut self, n: u64, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= n as f64 {
            self.tokens -= n as f64;
            true
        } else {
            false
        }
    }

    /// Takes `n` tokens (the caller checked `available`).
    pub fn take(&mut self, n: u64, now: Instant) {
        self.refill(now);
        self.tokens -= n as f64;
    }

    /// How long until `n` tokens (at most a full bucket) are available.
    pub fn wait_for(&mut self, n: u64, now: Instant) -> Duration {
        self.refill(now);
        let want = (n as f64).min(self.burst);
        if self.tokens >= want {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((want - self.tokens) / self.rate)
        }
    }
}

/// A bucket shared by every stream of one node.
pub type SharedBucket = Arc<Mutex<TokenBucket>>;

pub fn shared(rate: f64, burst: f64) -> SharedBucket {
    Arc::new(Mutex::new(TokenBucket::new(rate, burst, Instant::now())))
}

/// Per-source-address buckets, bounded in number: when full, buckets that have
/// refilled completely (idle sources) are forgotten first, and if none has, the new
/// source is refused, so a flood of fresh addresses cannot grow memory.
#[derive(Debug)]
pub struct PerAddress {
    rate: f64,
    burst: f64,
    max: usize,
    buckets: HashMap<IpAddr, TokenBucket>,
}

impl PerAddress {
    pub fn new(rate: f64, burst: f64, max: usize) -> Self {
        PerAddress {
            rate,
            burst,
            max,
            buckets: HashMap::new(),
        }
    }

    /// One event from `ip` at `now`: allowed or not.
    pub fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        if !self.buckets.contains_key(&ip) && self.buckets.len() >= self.max {
            let burst = self.burst;
            self.buckets
                .retain(|_, b| (b.available(now) as f64) < burst);
            if self.buckets.len() >= self.max {
                return false;
            }
        }
        let (rate, burst) = (self.rate, self.burst);
        self.buckets
            .entry(ip)
            .or_insert_with(|| TokenBucket::new(rate, burst, now))
            .try_take(1, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100.0, 10.0, t0);
        assert_eq!(b.available(t0), 10);
        assert!(b.try_take(10, t0));
        assert!(!b.try_take(1, t0));
        assert_eq!(b.wait_for(5, t0), Duration::from_millis(50));
        let later = t0 + Duration::from_millis(50);
        assert_eq!(b.available(later), 5);
        // Never more than the burst, however long it was quiet.
        assert_eq!(b.available(t0 + Duration::from_secs(60)), 10);
    }

    #[test]
    fn per_address_limits_each_source_and_stays_bounded() {
        let t0 = Instant::now();
        let mut limits = PerAddress::new(1.0, 3.0, 2);
        let (a, b, c): (IpAddr, IpAddr, IpAddr) = (
            "192.0.2.1".parse().unwrap(),
            "192.0.2.2".parse().unwrap(),
            "192.0.2.3".parse().unwrap(),
        );
        assert!((0..3).all(|_| limits.allow(a, t0)));
        assert!(
            !limits.allow(a, t0),
            "a flood from one address is throttled"
        );
        assert!(limits.allow(b, t0), "another address is not affected");
        // Table full of busy sources: a third address is refused rather than stored.
        assert!(!limits.allow(c, t0));
        // Once the others are idle (bucket full again), room is made.
        let later = t0 + Duration::from_secs(10);
        assert!(limits.allow(c, later));
    }
}
