//! Path selection for one peer, as a sans-IO state machine: which address (if any)
//! carries our packets to the peer directly, when to ask the rendezvous for a
//! coordinated hole punch, when to probe, and when to give up and stay relayed.
//!
//! The driver feeds it events (the peer is wanted, the rendezvous said start, a probe
//! arrived) and the time, and carries out the [`Action`]s it returns. Nothing here
//! touches a socket or a clock, so every timing and give-up rule is unit-tested.
//!
//! The punch sequence for one attempt (SPEC §3), from `PunchStart`:
//! 1. wait the delay the rendezvous computed, so both ends start at the same instant;
//! 2. **prime**: send one ping at a low TTL to each of the peer's public candidates.
//!    It opens our own NAT's mapping towards the peer but dies before the peer's NAT,
//!    so the peer's Linux NAT never sees an inbound packet before its own outbound
//!    one (which would make conntrack rewrite the peer's source port — the clash);
//! 3. after a guard time that covers the peer's priming, send full-TTL pings to every
//!    candidate every `probe_interval` for `punch_window`;
//! 4. a pong for one of our pings verifies that address: traffic moves there at once.
//!
//! Both ends do all of this, and each also answers any authenticated ping and pings
//! its source back: so when only one direction can open a hole (a full-cone side and
//! a symmetric side), the side that can reach the other does, and the path forms.
//! A direct path is kept alive and watched with pings; when it stops answering,
//! traffic returns to the relay at once and the old address keeps being probed so the
//! path comes back when the network does.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ferry_proto::record::NatMapping;

/// Timing and give-up rules; defaults suit home connections.
#[derive(Clone, Debug)]
pub struct PathConfig {
    /// TTL of priming pings: enough to leave every NAT of our own (2 under
    /// carrier-grade NAT) but not reach the peer's. `None`: we are not behind a NAT,
    /// or the TTL is unknown — then no priming is done.
    pub prime_ttl: Option<u8>,
    /// Time between priming and the first full-TTL ping: covers the peer's priming
    /// and the error in the rendezvous's start-time estimate.
    pub guard: Duration,
    pub probe_interval: Duration,
    /// How long one attempt keeps probing before it counts as failed.
    pub punch_window: Duration,
    /// Ping interval on a direct path in use.
    pub keepalive: Duration,
    /// A direct path with no pong for this long is dead: traffic returns to the relay.
    pub dead_after: Duration,
    /// Coordinated attempts before giving up (reset when a direct path dies).
    pub max_attempts: u32,
    /// Wait before the n-th retry (the last entry repeats).
    pub retry_delays: Vec<Duration>,
    /// How long a `Punch` request may go unanswered before it counts as failed.
    pub request_timeout: Duration,
    /// How long the address of a dead direct path keeps being probed.
    pub recover_for: Duration,
    /// Ping back the source of a peer's ping from an address not among its
    /// candidates (strict mode does not: it never dials a peer that dials it).
    pub probe_back: bool,
}

impl Default for PathConfig {
    fn default() -> Self {
        PathConfig {
            prime_ttl: None,
            guard: Duration::from_millis(300),
            probe_interval: Duration::from_millis(150),
            punch_window: Duration::from_millis(2500),
            keepalive: Duration::from_millis(700),
            dead_after: Duration::from_millis(2500),
            max_attempts: 3,
            retry_delays: vec![Duration::from_secs(2), Duration::from_secs(5)],
            request_timeout: Duration::from_secs(3),
            recover_for: Duration::from_secs(300),
            probe_back: true,
        }
    }
}

/// Where packets to the peer go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Relayed,
    Direct(SocketAddr),
}

/// How an attempt ended (the label of `ferry_shim_punch_outcomes_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A direct path was verified.
    Direct,
    /// No pong within the punch window.
    NoResponse,
    /// The rendezvous could not coordinate (peer offline, no record, no answer).
    NotCoordinated,
    /// Both NATs change ports per destination: no attempt is made.
    BothSymmetric,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Outcome::Direct,
        Outcome::NoResponse,
        Outcome::NotCoordinated,
        Outcome::BothSymmetric,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Direct => "direct",
            Outcome::NoResponse => "no_response",
            Outcome::NotCoordinated => "not_coordinated",
            Outcome::BothSymmetric => "both_symmetric",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    SendPing {
        to: SocketAddr,
        tx: u64,
        /// `Some` for a low-TTL priming ping.
        ttl: Option<u8>,
    },
    SendPong {
        to: SocketAddr,
        tx: u64,
    },
    /// Ask the rendezvous to coordinate a punch with this peer.
    RequestPunch,
    RouteChanged(Route),
    /// An attempt ended; count it.
    Attempt(Outcome),
}

/// Where hole punching with one peer stands, as status shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PunchState {
    /// Not asked for.
    #[default]
    Idle,
    /// Asked the rendezvous to coordinate; no answer yet.
    Requested,
    /// Told when to start; waiting for that moment.
    Waiting,
    /// Sending probes to the peer's candidates.
    Probing,
    /// Failed once; trying again after a pause.
    Retrying,
    /// Done, and the direct path is in use.
    Direct,
    /// Done without a direct path; the peer stays relayed.
    GaveUp,
}

impl PunchState {
    pub fn name(self) -> &'static str {
        match self {
            PunchState::Idle => "idle",
            PunchState::Requested => "requested",
            PunchState::Waiting => "waiting",
            PunchState::Probing => "probing",
            PunchState::Retrying => "retrying",
            PunchState::Direct => "direct",
            PunchState::GaveUp => "gave_up",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Punch {
    /// Nothing asked yet.
    Idle,
    /// `Punch` sent at this time, waiting for `PunchStart`.
    Requested(Instant),
    Waiting {
        start_at: Instant,
    },
    Probing {
        full_from: Instant,
        next_probe: Instant,
        until: Instant,
    },
    /// Attempts over for now: a direct path is up, or we gave up (see `reason`).
    Done,
    Retrying(Instant),
}

#[derive(Clone, Debug)]
struct Candidate {
    /// Across the Internet (primed at low TTL) rather than on a local network.
    public: bool,
    last_pong: Option<Instant>,
    rtt: Option<Duration>,
    last_ping: Option<Instant>,
}

/// Path state for one peer.
#[derive(Debug)]
pub struct PeerPath {
    cfg: PathConfig,
    local_nat: NatMapping,
    candidates: BTreeMap<SocketAddr, Candidate>,
    /// Our pings awaiting a pong: transaction ID → (address, sent at).
    outstanding: HashMap<u64, (SocketAddr, Instant)>,
    next_tx: u64,
    route: Route,
    punch: Punch,
    attempts: u32,
    next_keepalive: Option<Instant>,
    /// Address of a direct path that died, probed until `recover_until`.
    recovering: Option<(SocketAddr, Instant)>,
    /// Why the peer is relayed, when it is for a known reason.
    reason: Option<String>,
    /// The rendezvous's ID of the latest attempt.
    attempt_id: Option<u64>,
}

/// Candidates tracked per peer; a flood of pings from new addresses cannot grow it.
const MAX_CANDIDATES: usize = 32;

/// Pings awaiting an answer, per peer.
const MAX_OUTSTANDING: usize = 256;

/// Whether an address is across the Internet rather than on a local network.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            let cgnat = o[0] == 100 && (o[1] & 0xc0) == 64;
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || cgnat)
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let ula = (s[0] & 0xfe00) == 0xfc00;
            let link_local = (s[0] & 0xffc0) == 0xfe80;
            !(v6.is_loopback() || v6.is_unspecified() || ula || link_local)
        }
    }
}

impl PeerPath {
    /// `first_tx` seeds transaction IDs (random in production, fixed in tests).
    pub fn new(cfg: PathConfig, local_nat: NatMapping, first_tx: u64) -> Self {
        PeerPath {
            cfg,
            local_nat,
            candidates: BTreeMap::new(),
            outstanding: HashMap::new(),
            next_tx: first_tx,
            route: Route::Relayed,
            punch: Punch::Idle,
            attempts: 0,
            next_keepalive: None,
            recovering: None,
            reason: None,
            attempt_id: None,
        }
    }

    pub fn route(&self) -> Route {
        self.route
    }

    /// Why the peer is relayed, when known.
    pub fn reason(&self) -> Option<&str> {
        self.reason.as_deref()
    }

    /// Smoothed RTT of the direct path in use.
    pub fn direct_rtt(&self) -> Option<Duration> {
        match self.route {
            Route::Direct(a) => self.candidates.get(&a).and_then(|c| c.rtt),
            Route::Relayed => None,
        }
    }

    pub fn set_local_nat(&mut self, nat: NatMapping) {
        self.local_nat = nat;
    }

    pub fn set_prime_ttl(&mut self, ttl: Option<u8>) {
        self.cfg.prime_ttl = ttl;
    }

    /// Whether `addr` is one of this peer's verified addresses.
    pub fn is_verified(&self, addr: &SocketAddr) -> bool {
        self.candidates
            .get(addr)
            .is_some_and(|c| c.last_pong.is_some())
    }

    fn add_candidate(&mut self, addr: SocketAddr) -> bool {
        if self.candidates.contains_key(&addr) {
            return true;
        }
        if self.candidates.len() >= MAX_CANDIDATES || addr.ip().is_unspecified() {
            return false;
        }
        self.candidates.insert(
            addr,
            Candidate {
                public: is_public(addr.ip()),
                last_pong: None,
                rtt: None,
                last_ping: None,
            },
        );
        true
    }

    fn ping(&mut self, to: SocketAddr, ttl: Option<u8>, now: Instant, out: &mut Vec<Action>) {
        if self.outstanding.len() >= MAX_OUTSTANDING {
            self.outstanding
                .retain(|_, (_, sent)| now.saturating_duration_since(*sent) < self.cfg.dead_after);
            if self.outstanding.len() >= MAX_OUTSTANDING {
                return;
            }
        }
        let tx = self.next_tx;
        self.next_tx = self.next_tx.wrapping_add(1);
        self.outstanding.insert(tx, (to, now));
        if let Some(c) = self.candidates.get_mut(&to) {
            c.last_ping = Some(now);
        }
        out.push(Action::SendPing { to, tx, ttl });
    }

    /// The peer is wanted (an overlay connection is being made or was accepted).
    pub fn want(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if self.punch == Punch::Idle {
            self.punch = Punch::Requested(now);
            out.push(Action::RequestPunch);
        }
        out
    }

    /// The rendezvous coordinated attempt `attempt`: probe `candidates` after
    /// `start_in`. A second notice of an attempt already under way is ignored.
    pub fn punch_start(
        &mut self,
        now: Instant,
        candidates: &[SocketAddr],
        peer_nat: NatMapping,
        start_in: Duration,
        attempt: u64,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        if self.attempt_id == Some(attempt)
            && matches!(self.punch, Punch::Waiting { .. } | Punch::Probing { .. })
        {
            return out;
        }
        // After giving up, further attempts (the other side asking again and again)
        // are not joined: the bound on probing holds whoever asks. A direct path that
        // dies resets the count.
        if self.punch == Punch::Done && self.attempts >= self.cfg.max_attempts {
            return out;
        }
        self.attempt_id = Some(attempt);
        if matches!(self.route, Route::Direct(_)) {
            // Already direct (the peer asked too late, or asked again): just answer.
            return out;
        }
        if self.local_nat == NatMapping::EndpointDependent
            && peer_nat == NatMapping::EndpointDependent
        {
            self.reason = Some(
                "both nodes are behind NATs that pick a new port for every destination (symmetric NATs); no hole can be punched, so traffic stays on the relay".into(),
            );
            self.punch = Punch::Done;
            out.push(Action::Attempt(Outcome::BothSymmetric));
            return out;
        }
        for addr in candidates {
            self.add_candidate(*addr);
        }
        self.attempts += 1;
        self.punch = Punch::Waiting {
            start_at: now + start_in,
        };
        out
    }

    /// The rendezvous could not coordinate.
    pub fn punch_failed(&mut self, now: Instant, reason: &str) -> Vec<Action> {
        let mut out = Vec::new();
        if matches!(self.punch, Punch::Requested(_)) {
            self.attempts += 1;
            self.reason = Some(format!("the rendezvous could not coordinate: {reason}"));
            self.attempt_failed(now, Outcome::NotCoordinated, &mut out);
        }
        out
    }

    fn attempt_failed(&mut self, now: Instant, outcome: Outcome, out: &mut Vec<Action>) {
        out.push(Action::Attempt(outcome));
        if self.attempts >= self.cfg.max_attempts {
            self.punch = Punch::Done;
            if outcome == Outcome::NoResponse {
                self.reason = Some(format!(
                    "no direct path: {} coordinated attempts got no answer (the NATs on the way do not let a hole be punched); traffic stays on the relay",
                    self.attempts
                ));
            }
        } else {
            let i = (self.attempts as usize).saturating_sub(1);
            let delay = self
                .cfg
                .retry_delays
                .get(i)
                .or(self.cfg.retry_delays.last())
                .copied()
                .unwrap_or(Duration::from_secs(5));
            self.punch = Punch::Retrying(now + delay);
        }
    }

    /// An authenticated ping from the peer arrived from `from`.
    pub fn on_ping(&mut self, from: SocketAddr, tx: u64, now: Instant) -> Vec<Action> {
        let mut out = vec![Action::SendPong { to: from, tx }];
        // The peer reached us from `from`: that is the address to answer on, even if
        // it was never announced (a symmetric NAT picked it just now). Ping it back
        // unless we did so a moment ago, so our side verifies the path too.
        let known = self.candidates.contains_key(&from);
        if (known || self.cfg.probe_back) && self.add_candidate(from) {
            let recent = self.candidates.get(&from).and_then(|c| c.last_ping);
            if recent.is_none_or(|t| now.saturating_duration_since(t) >= self.cfg.probe_interval)
                && !self.is_verified_alive(&from, now)
            {
                self.ping(from, None, now, &mut out);
            }
        }
        out
    }

    fn is_verified_alive(&self, addr: &SocketAddr, now: Instant) -> bool {
        self.candidates.get(addr).is_some_and(|c| {
            c.last_pong
                .is_some_and(|t| now.saturating_duration_since(t) < self.cfg.dead_after)
        })
    }

    /// An authenticated pong from the peer arrived from `from`.
    pub fn on_pong(&mut self, from: SocketAddr, tx: u64, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        // Only a pong to our own ping, from the address we pinged, verifies a path.
        match self.outstanding.get(&tx) {
            Some((addr, _)) if *addr == from => {}
            _ => return out,
        }
        let Some((_, sent)) = self.outstanding.remove(&tx) else {
            return out;
        };
        let rtt = now.saturating_duration_since(sent);
        if let Some(c) = self.candidates.get_mut(&from) {
            c.last_pong = Some(now);
            c.rtt = Some(match c.rtt {
                Some(old) => (old * 7 + rtt) / 8,
                None => rtt,
            });
        }
        self.choose_route(now, &mut out);
        out
    }

    /// Picks the verified, live candidate with the lowest RTT (local-network
    /// addresses first on a tie), and reports a change.
    fn choose_route(&mut self, now: Instant, out: &mut Vec<Action>) {
        let best = self
            .candidates
            .iter()
            .filter(|(a, _)| self.is_verified_alive(a, now))
            .min_by_key(|(_, c)| (c.rtt.unwrap_or(Duration::MAX), c.public))
            .map(|(a, _)| *a);
        let new = match best {
            Some(addr) => Route::Direct(addr),
            None => Route::Relayed,
        };
        if new != self.route {
            // Switch only for a clearly better path, so two similar paths do not flap.
            if let (Route::Direct(cur), Route::Direct(_)) = (self.route, new)
                && self.is_verified_alive(&cur, now)
            {
                let cur_rtt = self.candidates.get(&cur).and_then(|c| c.rtt);
                let new_rtt = best
                    .and_then(|a| self.candidates.get(&a))
                    .and_then(|c| c.rtt);
                if let (Some(c), Some(n)) = (cur_rtt, new_rtt)
                    && n * 2 > c
                {
                    return;
                }
            }
            if matches!(new, Route::Direct(_)) {
                self.recovering = None;
                self.reason = None;
                self.next_keepalive = Some(now + self.cfg.keepalive);
                if matches!(self.punch, Punch::Probing { .. } | Punch::Waiting { .. }) {
                    out.push(Action::Attempt(Outcome::Direct));
                }
                // A direct path ends any punching under way or planned.
                self.punch = Punch::Done;
            }
            self.route = new;
            out.push(Action::RouteChanged(new));
        }
    }

    /// Advances timers. Call at [`PeerPath::next_timeout`] (or any time).
    pub fn poll(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        match self.punch.clone() {
            Punch::Requested(at) if now >= at + self.cfg.request_timeout => {
                self.attempts += 1;
                self.reason = Some("the rendezvous did not answer the punch request".into());
                self.attempt_failed(now, Outcome::NotCoordinated, &mut out);
            }
            Punch::Retrying(at) if now >= at => {
                self.punch = Punch::Requested(now);
                out.push(Action::RequestPunch);
            }
            Punch::Waiting { start_at } if now >= start_at => {
                let prime = match self.local_nat {
                    NatMapping::None => None,
                    _ => self.cfg.prime_ttl,
                };
                let targets: Vec<(SocketAddr, bool)> = self
                    .candidates
                    .iter()
                    .map(|(a, c)| (*a, c.public))
                    .collect();
                for (addr, public) in targets {
                    match (public, prime) {
                        (true, Some(ttl)) => self.ping(addr, Some(ttl), now, &mut out),
                        // Local-network candidates cross no NAT: probe them at once.
                        (false, _) => self.ping(addr, None, now, &mut out),
                        (true, None) => {}
                    }
                }
                let (full_from, next_probe) = if prime.is_some() {
                    (now + self.cfg.guard, now + self.cfg.guard)
                } else {
                    // Nothing to prime: the first full-TTL round goes out now.
                    let targets: Vec<SocketAddr> = self
                        .candidates
                        .iter()
                        .filter(|(_, c)| c.public)
                        .map(|(a, _)| *a)
                        .collect();
                    for addr in targets {
                        self.ping(addr, None, now, &mut out);
                    }
                    (now, now + self.cfg.probe_interval)
                };
                self.punch = Punch::Probing {
                    full_from,
                    next_probe,
                    until: now + self.cfg.punch_window,
                };
            }
            Punch::Probing { until, .. } if now >= until => {
                self.attempt_failed(now, Outcome::NoResponse, &mut out);
            }
            Punch::Probing {
                full_from,
                next_probe,
                until,
            } if now >= next_probe && now >= full_from => {
                let targets: Vec<SocketAddr> = self.candidates.keys().copied().collect();
                for addr in targets {
                    self.ping(addr, None, now, &mut out);
                }
                self.punch = Punch::Probing {
                    full_from,
                    next_probe: now + self.cfg.probe_interval,
                    until,
                };
            }
            _ => {}
        }

        if let Route::Direct(addr) = self.route {
            if !self.is_verified_alive(&addr, now) {
                // Dead: back to the relay now, keep probing the old address, and ask
                // for a fresh punch in case the peer's address changed.
                self.recovering = Some((addr, now + self.cfg.recover_for));
                self.choose_route(now, &mut out);
                if self.route == Route::Relayed {
                    self.reason = Some(format!(
                        "the direct path to {addr} stopped answering; using the relay while it is probed"
                    ));
                    self.attempts = 0;
                    let delay = self.cfg.retry_delays.first().copied().unwrap_or_default();
                    self.punch = Punch::Retrying(now + delay);
                    self.next_keepalive = Some(now);
                }
            } else if self.next_keepalive.is_none_or(|t| now >= t) {
                self.ping(addr, None, now, &mut out);
                self.next_keepalive = Some(now + self.cfg.keepalive);
            }
        }
        if let Some((addr, until)) = self.recovering {
            if now >= until || matches!(self.route, Route::Direct(_)) {
                self.recovering = None;
            } else if self.next_keepalive.is_none_or(|t| now >= t) {
                self.ping(addr, None, now, &mut out);
                self.next_keepalive = Some(now + self.cfg.keepalive);
            }
        }
        self.outstanding
            .retain(|_, (_, sent)| now.saturating_duration_since(*sent) < self.cfg.dead_after * 2);
        out
    }

    /// When [`PeerPath::poll`] next has something to do.
    pub fn next_timeout(&self) -> Option<Instant> {
        let punch = match &self.punch {
            Punch::Requested(at) => Some(*at + self.cfg.request_timeout),
            Punch::Retrying(at) => Some(*at),
            Punch::Waiting { start_at } => Some(*start_at),
            Punch::Probing {
                full_from,
                next_probe,
                until,
            } => Some((*next_probe).max(*full_from).min(*until)),
            Punch::Idle | Punch::Done => None,
        };
        let keepalive = match (self.route, self.recovering) {
            (Route::Direct(addr), _) => {
                let dead = self
                    .candidates
                    .get(&addr)
                    .and_then(|c| c.last_pong)
                    .map(|t| t + self.cfg.dead_after);
                match (self.next_keepalive, dead) {
                    (Some(k), Some(d)) => Some(k.min(d)),
                    (k, d) => k.or(d),
                }
            }
            (Route::Relayed, Some(_)) => self.next_keepalive,
            (Route::Relayed, None) => None,
        };
        match (punch, keepalive) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// What the punching is doing, for `/api/status`.
    pub fn punch_state(&self) -> PunchState {
        match self.punch {
            Punch::Idle => PunchState::Idle,
            Punch::Requested(_) => PunchState::Requested,
            Punch::Waiting { .. } => PunchState::Waiting,
            Punch::Probing { .. } => PunchState::Probing,
            Punch::Retrying(_) => PunchState::Retrying,
            Punch::Done if matches!(self.route, Route::Direct(_)) => PunchState::Direct,
            Punch::Done => PunchState::GaveUp,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PUB: &str = "203.0.113.20:4000";
    const LAN: &str = "192.168.7.3:4000";

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn cfg(ttl: Option<u8>) -> PathConfig {
        PathConfig {
            prime_ttl: ttl,
            ..PathConfig::default()
        }
    }

    fn pings(actions: &[Action]) -> Vec<(SocketAddr, u64, Option<u8>)> {
        actions
            .iter()
            .filter_map(|x| match x {
                Action::SendPing { to, tx, ttl } => Some((*to, *tx, *ttl)),
                _ => None,
            })
            .collect()
    }

    /// Drives `p` to `until`, stepping at each timeout; returns every action.
    fn run(p: &mut PeerPath, from: Instant, until: Instant) -> Vec<(Instant, Action)> {
        run_until(p, from, until, |_| false)
    }

    /// Like `run`, but stops right after an action for which `stop` is true.
    fn run_until(
        p: &mut PeerPath,
        from: Instant,
        until: Instant,
        stop: impl Fn(&Action) -> bool,
    ) -> Vec<(Instant, Action)> {
        let mut now = from;
        let mut all = Vec::new();
        loop {
            let mut stopped = false;
            for x in p.poll(now) {
                stopped |= stop(&x);
                all.push((now, x));
            }
            if stopped {
                return all;
            }
            match p.next_timeout() {
                Some(t) if t <= until => now = t.max(now + Duration::from_millis(1)),
                _ => return all,
            }
        }
    }

    #[test]
    fn priming_goes_out_at_low_ttl_then_full_pings_after_the_guard() {
        let t0 = Instant::now();
        let mut p = PeerPath::new(cfg(Some(3)), NatMapping::EndpointIndependent, 100);
        assert_eq!(p.want(t0), vec![Action::RequestPunch]);
        assert!(p.want(t0).is_empty(), "one request at a time");
        let start_in = Duration::from_millis(40);
        p.punch_start(
            t0,
            &[a(PUB), a(LAN)],
            NatMapping::EndpointIndependent,
            start_in,
            1,
        );
        // The same attempt announced again (the other side asked too) changes nothing.
        let later = t0 + Duration::from_millis(20);
        assert!(
            p.punch_start(
                later,
                &[a(PUB)],
                NatMapping::EndpointIndependent,
                start_in,
                1
            )
            .is_empty()
        );
        // Nothing before the start time.
        assert!(p.poll(t0 + Duration::from_millis(39)).is_empty());
        let start = t0 + start_in;
        let first = p.poll(start);
        // Public candidate primed at TTL 3; the LAN candidate probed at full TTL.
        assert_eq!(
            pings(&first),
            vec![(a(LAN), 100, None), (a(PUB), 101, Some(3))]
        );
        // No full-TTL ping to the public candidate inside the guard.
        let guard = p.cfg.guard;
        let early = run(&mut p, start, start + guard - Duration::from_millis(1));
        assert!(pings(&early.into_iter().map(|x| x.1).collect::<Vec<_>>()).is_empty());
        let later = p.poll(start + guard);
        assert!(pings(&later).iter().all(|(_, _, ttl)| ttl.is_none()));
        assert_eq!(pings(&later).len(), 2);
    }

    #[test]
    fn a_pong_verifies_the_path_and_traffic_moves_to_it() {
        let t0 = Instant::now();
        let mut p = PeerPath::new(cfg(Some(2)), NatMapping::EndpointIndependent, 1);
        p.want(t0);
        p.punch_start(
            t0,
            &[a(PUB)],
            NatMapping::EndpointIndependent,
            Duration::ZERO,
            2,
        );
        p.poll(t0);
        let full = p.poll(t0 + p.cfg.guard);
        let (to, tx, _) = pings(&full)[0];
        // A pong from another address, or for an unknown tx, verifies nothing.
        let t1 = t0 + Duration::from_millis(350);
        assert!(p.on_pong(a("198.51.100.9:1"), tx, t1).is_empty());
        assert!(p.on_pong(to, 9999, t1).is_empty());
        let got = p.on_pong(to, tx, t1);
        assert!(got.contains(&Action::RouteChanged(Route::Direct(a(PUB)))));
        assert!(got.contains(&Action::Attempt(Outcome::Direct)));
        assert_eq!(p.route(), Route::Direct(a(PUB)));
        assert_eq!(p.direct_rtt(), Some(Duration::from_millis(50)));
        assert_eq!(p.punch_state(), PunchState::Direct);
    }

    #[test]
    fn a_ping_from_an_unannounced_address_is_answered_and_pinged_back() {
        // The full-cone side receives a symmetric peer's ping from a port nobody
        // announced: it answers there and pings back, so both ends verify.
        let t0 = Instant::now();
        let mut p = PeerPath::new(cfg(None), NatMapping::EndpointIndependent, 7);
        let from = a("198.51.100.77:61234");
        let out = p.on_ping(from, 42, t0);
        assert_eq!(out[0], Action::SendPong { to: from, tx: 42 });
        assert_eq!(pings(&out), vec![(from, 7, None)]);
        // Not again right away.
        assert!(pings(&p.on_ping(from, 43, t0)).is_empty());
        let got = p.on_pong(from, 7, t0 + Duration::from_millis(20));
        assert!(got.contains(&Action::RouteChanged(Route::Direct(from))));
    }

    #[test]
    fn without_probe_back_an_unannounced_ping_only_gets_a_pong() {
        // Strict mode never dials a peer that dials it: a ping from an address the
        // peer never announced is answered where it came from, nothing more.
        let t0 = Instant::now();
        let cfg = PathConfig {
            probe_back: false,
            ..PathConfig::default()
        };
        let mut p = PeerPath::new(cfg, NatMapping::EndpointIndependent, 7);
        let from = a("198.51.100.77:61234");
        assert_eq!(
            p.on_ping(from, 42, t0),
            vec![Action::SendPong { to: from, tx: 42 }]
        );
        assert!(run(&mut p, t0, t0 + Duration::from_secs(30)).is_empty());
        assert_eq!(p.route(), Route::Relayed);
    }

    #[test]
    fn both_symmetric_is_not_tried() {
        let t0 = Instant::now();
        let mut p = PeerPath::new(cfg(Some(2)), NatMapping::EndpointDependent, 1);
        p.want(t0);
        let out = p.punch_start(
            t0,
            &[a(PUB)],
            NatMapping::EndpointDependent,
            Duration::ZERO,
            3,
        );
        assert_eq!(out, vec![Action::Attempt(Outcome::BothSymmetric)]);
        assert!(run(&mut p, t0, t0 + Duration::from_secs(60)).is_empty());
        assert_eq!(p.route(), Route::Relayed);
        assert_eq!(p.punch_state(), PunchState::GaveUp);
        assert!(p.reason().unwrap().contains("symmetric"));
    }

    #[test]
    fn silent_attempts_are_retried_then_given_up_with_a_reason() {
        let t0 = Instant::now();
        let mut p = PeerPath::new(cfg(Some(2)), NatMapping::EndpointIndependent, 1);
        p.want(t0);
        let mut now = t0;
        let mut requests = 0;
        let mut outcomes = Vec::new();
        // Each time the path asks for a punch, the rendezvous answers at once.
        for _ in 0..10 {
            p.punch_start(
                now,
                &[a(PUB)],
                NatMapping::EndpointDependent,
                Duration::ZERO,
                4,
            );
            let trace = run_until(&mut p, now, now + Duration::from_secs(30), |x| {
                *x == Action::RequestPunch
            });
            for (t, x) in trace {
                match x {
                    Action::RequestPunch => {
                        requests += 1;
                        now = t;
                    }
                    Action::Attempt(o) => outcomes.push(o),
                    _ => {}
                }
            }
            if p.punch_state() == PunchState::GaveUp {
                break;
            }
        }
        assert_eq!(outcomes, vec![Outcome::NoResponse; 3], "{requests}");
        assert_eq!(requests, 2, "three attempts: the first plus two retries");
        assert_eq!(outcomes, vec![Outcome::NoResponse; 3]);
        assert!(p.reason().unwrap().contains("3 coordinated attempts"));
        // The peer asking again after that is not joined.
        let more = p.punch_start(
            now,
            &[a(PUB)],
            NatMapping::EndpointIndependent,
            Duration::ZERO,
            99,
        );
        assert!(more.is_empty());
        assert_eq!(p.punch_state(), PunchState::GaveUp);
        assert_eq!(p.next_timeout(), None, "a path that gave up costs nothing");
    }

    #[test]
    fn retry_waits_follow_the_configured_delays() {
        let t0 = Instant::now();
        let mut p = PeerPath::new(cfg(None), NatMapping::EndpointIndependent, 1);
        p.want(t0);
        // The rendezvous never answers: request timeout, then the first retry delay.
        let timeout = t0 + p.cfg.request_timeout;
        let out = p.poll(timeout);
        assert_eq!(out, vec![Action::Attempt(Outcome::NotCoordinated)]);
        let retry_at = timeout + p.cfg.retry_delays[0];
        assert_eq!(p.next_timeout(), Some(retry_at));
        assert!(p.poll(retry_at - Duration::from_millis(1)).is_empty());
        assert_eq!(p.poll(retry_at), vec![Action::RequestPunch]);
    }

    #[test]
    fn a_dead_direct_path_falls_back_to_the_relay_and_recovers() {
        let t0 = Instant::now();
        let mut p = PeerPath::new(cfg(None), NatMapping::EndpointIndependent, 1);
        let peer = a(PUB);
        let out = p.on_ping(peer, 1, t0);
        let (_, tx, _) = pings(&out)[0];
        p.on_pong(peer, tx, t0);
        assert_eq!(p.route(), Route::Direct(peer));

        // The path goes silent: keepalives get no pong, and within `dead_after` the
        // route is back on the relay.
        let dead_at = t0 + p.cfg.dead_after;
        let trace = run(&mut p, t0, dead_at + Duration::from_millis(1));
        let fell = trace
            .iter()
            .find(|(_, x)| *x == Action::RouteChanged(Route::Relayed))
            .map(|(t, _)| *t)
            .expect("fell back");
        assert!(fell <= dead_at + Duration::from_millis(1));
        assert_eq!(p.route(), Route::Relayed);
        assert!(p.reason().unwrap().contains("stopped answering"));

        // The old address keeps being probed; once it answers, traffic goes back.
        let later = fell + Duration::from_secs(10);
        let trace = run(&mut p, fell, later);
        let probes: Vec<_> = trace
            .iter()
            .filter_map(|(_, x)| match x {
                Action::SendPing { to, tx, .. } if *to == peer => Some(*tx),
                _ => None,
            })
            .collect();
        assert!(probes.len() >= 5, "{probes:?}");
        let back = p.on_pong(peer, *probes.last().unwrap(), later);
        assert!(back.contains(&Action::RouteChanged(Route::Direct(peer))));
    }

    #[test]
    fn public_node_needs_no_priming() {
        let t0 = Instant::now();
        let mut p = PeerPath::new(cfg(Some(2)), NatMapping::None, 1);
        p.want(t0);
        p.punch_start(
            t0,
            &[a(PUB)],
            NatMapping::EndpointIndependent,
            Duration::ZERO,
            5,
        );
        let first = p.poll(t0);
        assert_eq!(pings(&first), vec![(a(PUB), 1, None)]);
    }

    #[test]
    fn lower_rtt_paths_win_and_similar_ones_do_not_flap() {
        let t0 = Instant::now();
        let mut p = PeerPath::new(cfg(None), NatMapping::EndpointIndependent, 1);
        let (wan, lan) = (a(PUB), a(LAN));
        let o = p.on_ping(wan, 1, t0);
        let (_, tx, _) = pings(&o)[0];
        p.on_pong(wan, tx, t0 + Duration::from_millis(40));
        let o = p.on_ping(lan, 2, t0);
        let (_, tx, _) = pings(&o)[0];
        let got = p.on_pong(lan, tx, t0 + Duration::from_millis(1));
        assert!(got.contains(&Action::RouteChanged(Route::Direct(lan))));
        assert_eq!(p.route(), Route::Direct(lan));
    }

    #[test]
    fn addresses_are_classified() {
        for ip in ["203.0.113.1", "198.51.100.3", "2001:db8::1", "8.8.8.8"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "192.168.1.1",
            "10.0.0.1",
            "100.64.1.1",
            "127.0.0.1",
            "fe80::1",
            "fd00::1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
    }
}
