//! Idle timers that count only the silence this process could have heard.
//!
//! A host near its memory limit can stop running its programs for a minute or more
//! before the OOM killer acts (seen in the lab: a process growing by 10 MB/s froze
//! every program on the machine for 104 s), and a paused VM does the same. When it
//! resumes, every timer is overdue at once: counted naively, each link looks as if its
//! peer had been silent through the whole freeze, though the peer (often on the same
//! host) was frozen too, and every idle connection would be cut. So a thread ticks
//! once a second and writes down when it did not get to run ([`StallClock`]), and each
//! idle check ([`Silence`]) subtracts those stalls from the silence it measured.
//!
//! QUIC's own idle timers cannot be told about stalls, so connections set theirs to
//! [`QUIC_IDLE_BACKSTOP`] and the programs close silent links themselves with a
//! [`Silence`] of [`crate::limits::LINK_IDLE_TIMEOUT`].

use crate::sync::lock;
use std::collections::VecDeque;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How often the stall watch ticks.
pub const TICK: Duration = Duration::from_secs(1);

/// How late a tick must be to count as a stall. Well above what a merely busy machine
/// delays a sleeping thread by (milliseconds), well below any idle timeout.
pub const STALL_AFTER: Duration = Duration::from_secs(2);

/// QUIC's own idle timeout on relay links and end-to-end connections: a backstop only,
/// since Ferry closes links that stay silent for `LINK_IDLE_TIMEOUT` of awake time
/// itself. It is the longest freeze of a whole host that a link survives (QUIC times
/// out on both ends at once when the host resumes): five minutes, longer than the
/// freezes thrashing was seen to cause, short enough that a link whose program has
/// lost track of it is still cleaned up.
pub const QUIC_IDLE_BACKSTOP: Duration = Duration::from_secs(300);

/// [`QUIC_IDLE_BACKSTOP`] as quinn takes it.
pub fn quic_idle_backstop() -> quinn::IdleTimeout {
    quinn::IdleTimeout::try_from(QUIC_IDLE_BACKSTOP).unwrap_or(quinn::VarInt::MAX.into())
}

/// Stalls kept: enough for every silence measured up to the backstop, as each stall is
/// at least `STALL_AFTER` long. Older ones are dropped.
const KEPT: usize = (QUIC_IDLE_BACKSTOP.as_secs() / STALL_AFTER.as_secs()) as usize;

/// When this process did not run: the stalls the tick thread saw. Sans-IO: fed tick
/// times, asked about intervals.
#[derive(Debug, Default)]
pub struct StallClock {
    last_tick: Option<Instant>,
    /// `(start, end)` of each stall, oldest first, not overlapping.
    stalls: VecDeque<(Instant, Instant)>,
}

impl StallClock {
    /// The tick thread ran at `now`. Returns the length of the stall that just ended,
    /// if the tick came that late.
    pub fn tick(&mut self, now: Instant) -> Option<Duration> {
        let stall = self.open_stall(now);
        self.last_tick = Some(now);
        let (start, end) = stall?;
        if self.stalls.len() == KEPT {
            self.stalls.pop_front();
        }
        self.stalls.push_back((start, end));
        Some(end - start)
    }

    /// A stall under way at `now` that the tick thread has not written down yet (the
    /// process has just resumed, and the asking task ran before the tick thread).
    fn open_stall(&self, now: Instant) -> Option<(Instant, Instant)> {
        let due = self.last_tick? + TICK;
        (now.saturating_duration_since(due) >= STALL_AFTER).then_some((due, now))
    }

    /// How much of `from..to` this process spent stalled.
    pub fn stalled_between(&self, from: Instant, to: Instant) -> Duration {
        self.stalls
            .iter()
            .copied()
            .chain(self.open_stall(to))
            .map(|(start, end)| end.min(to).saturating_duration_since(start.max(from)))
            .sum()
    }
}

/// The process's stall clock, with its tick thread started on first use. The thread
/// is an OS thread, not a task, so a runtime that ends cannot stop it.
pub fn clock() -> &'static Mutex<StallClock> {
    static CLOCK: OnceLock<&'static Mutex<StallClock>> = OnceLock::new();
    CLOCK.get_or_init(|| {
        let clock: &'static Mutex<StallClock> = Box::leak(Box::default());
        let started = std::thread::Builder::new()
            .name("stall-watch".into())
            .spawn(move || {
                loop {
                    let now = Instant::now();
                    let stall = lock(clock).tick(now);
                    if let Some(stall) = stall {
                        tracing::warn!(
                            "this process did not run for {:.1} s (the host was overloaded, thrashing or paused); idle timers do not count that time",
                            stall.as_secs_f64()
                        );
                    }
                    std::thread::sleep(TICK);
                }
            });
        if let Err(e) = started {
            tracing::warn!("cannot start the stall watch ({e}); idle timers count stalls as silence");
        }
        clock
    })
}

/// The process's stalls so far, for a sans-IO core's timer (hold it only briefly).
pub fn stalls() -> std::sync::MutexGuard<'static, StallClock> {
    lock(clock())
}

/// Silence on one link, measured in time this process was running.
#[derive(Debug, Clone, Copy)]
pub struct Silence {
    limit: Duration,
    heard_at: Instant,
}

impl Silence {
    /// Silence counted from `now`. Starts the process's stall watch if it is not yet
    /// running, so a freeze that comes before the first check is still seen.
    pub fn new(limit: Duration, now: Instant) -> Self {
        clock();
        Silence {
            limit,
            heard_at: now,
        }
    }

    /// Something arrived from the peer at `now`.
    pub fn heard(&mut self, now: Instant) {
        self.heard_at = now;
    }

    /// When the silence would reach the limit if no stall came in between.
    pub fn deadline(&self) -> Instant {
        self.heard_at + self.limit
    }

    /// `None` once the link has been silent for the limit of awake time at `now`;
    /// otherwise when to ask again.
    pub fn recheck_at(&self, now: Instant, stalls: &StallClock) -> Option<Instant> {
        let silent = now.saturating_duration_since(self.heard_at);
        let awake = silent.saturating_sub(stalls.stalled_between(self.heard_at, now));
        (awake < self.limit).then(|| now + (self.limit - awake))
    }

    /// [`Silence::recheck_at`] against the process's [`clock`].
    pub fn recheck(&self, now: Instant) -> Option<Instant> {
        self.recheck_at(now, &lock(clock()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    /// A clock that ticked every second from `t` to `t + n` s.
    fn ticking(t: Instant, n: u32) -> StallClock {
        let mut c = StallClock::default();
        for i in 0..=n {
            assert_eq!(c.tick(t + i * S), None);
        }
        c
    }

    #[test]
    fn a_busy_machine_is_not_a_stall() {
        let t = Instant::now();
        let mut c = ticking(t, 5);
        let late = t + 6 * S + Duration::from_millis(1500);
        assert_eq!(c.tick(late), None);
        assert_eq!(c.stalled_between(t, late), Duration::ZERO);
    }

    #[test]
    fn a_late_tick_records_the_time_it_did_not_run() {
        let t = Instant::now();
        let mut c = ticking(t, 10);
        // Due at 11 s, ran at 111 s: a 100 s stall.
        assert_eq!(c.tick(t + 111 * S), Some(100 * S));
        assert_eq!(c.stalled_between(t, t + 111 * S), 100 * S);
        assert_eq!(c.stalled_between(t + 61 * S, t + 111 * S), 50 * S);
        assert_eq!(c.stalled_between(t + 111 * S, t + 112 * S), Duration::ZERO);
    }

    #[test]
    fn a_stall_not_yet_written_down_counts_too() {
        let t = Instant::now();
        let c = ticking(t, 10);
        // The asking task runs before the tick thread after a freeze.
        assert_eq!(c.stalled_between(t, t + 71 * S), 60 * S);
    }

    #[test]
    fn silence_through_a_freeze_is_not_silence() {
        let t = Instant::now();
        let c = ticking(t, 10);
        let mut silence = Silence::new(60 * S, t);
        silence.heard(t + 5 * S);
        // The whole host froze from 11 s to 111 s; the deadline (65 s) fell inside.
        let again = silence
            .recheck_at(t + 111 * S, &c)
            .expect("6 s awake of silence is not 60");
        assert_eq!(again, t + 111 * S + 54 * S);
    }

    #[test]
    fn real_silence_expires_on_time() {
        let t = Instant::now();
        let c = ticking(t, 70);
        let silence = Silence::new(60 * S, t);
        assert_eq!(silence.recheck_at(t + 59 * S, &c), Some(t + 60 * S));
        assert_eq!(silence.recheck_at(t + 60 * S, &c), None);
    }

    #[test]
    fn silence_around_a_stall_adds_up() {
        let t = Instant::now();
        let mut c = ticking(t, 40);
        // 40 s awake, 30 s stalled, then 20 s awake: 60 s of awake silence at 90 s.
        assert_eq!(c.tick(t + 71 * S), Some(30 * S));
        for i in 72..=90 {
            c.tick(t + i * S);
        }
        let silence = Silence::new(60 * S, t);
        assert_eq!(silence.recheck_at(t + 89 * S, &c), Some(t + 90 * S));
        assert_eq!(silence.recheck_at(t + 90 * S, &c), None);
    }

    #[test]
    fn memory_stays_bounded() {
        let t = Instant::now();
        let mut c = StallClock::default();
        for i in 0..10_000u32 {
            c.tick(t + i * 5 * S);
        }
        assert_eq!(c.stalls.len(), KEPT);
    }
}
