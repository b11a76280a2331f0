//! The shim's side of one session with one relay, sans-IO: what the relay's answers
//! mean, when to ping, when a relay counts as silent or unresponsive, and how each
//! way a session ends decides what happens next (reconnect, wait, or stop).
//!
//! The driver (`relay_client::session`) sends `register`, then feeds a
//! [`RelaySession`] what arrives ([`Event`]) and the time, carries out the
//! [`Action`]s it returns, and arms one timer at [`RelaySession::timeout`]. The rules:
//! - the relay's first answer is `registered` (for this node's key) or an `error`;
//!   anything else, silence for [`REGISTER_TIMEOUT`], or a close ends the attempt;
//! - `error` ends the session: `replaced` (another process uses this key) stops the
//!   shim, `denied` (the relay's policy) retries only slowly, anything else
//!   reconnects — except `going_away`, which moves overlay traffic to another relay
//!   and keeps the link until the draining relay closes it;
//! - once registered: `ping` every [`KEEPALIVE_INTERVAL`]; a session silent for
//!   [`LINK_IDLE_TIMEOUT`] of time this process was running ends; a relay that leaves
//!   sends unanswered for [`UNRESPONSIVE_AFTER`] loses the overlay traffic until it
//!   answers again (not on a dedicated rendezvous session, nor while draining);
//! - rendezvous answers go to the path layer; messages only a node sends end the
//!   session;
//! - a session whose link fell back to TLS/TCP (and may use QUIC) asks the driver to
//!   try QUIC every [`QUIC_RETRY`] ([`Action::TryQuic`]); the driver opens a QUIC
//!   link, sends `register` with `upgrade` on it and feeds the relay's first answer
//!   to [`RelaySession::quic_answered`]: `registered` moves the session onto the new
//!   link ([`QuicStep::Switch`]); an `error` leaves it where it is (a relay that does
//!   not know upgrades is not asked again); anything else leaves it half moved, so it
//!   ends and reconnects.

use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_proto::NodeId;
use ferry_proto::channel::ChannelToken;
use ferry_proto::frame::{Control, ErrorCode, Frame, ServiceGrant};
use ferry_proto::limits::{KEEPALIVE_INTERVAL, LINK_IDLE_TIMEOUT};
use ferry_proto::liveness::{Activity, Liveness, Verdict};
use ferry_proto::stall::{Silence, StallClock};
use serde::{Deserialize, Serialize};

/// How long the relay may take to answer a registration.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// Silence after a send that makes a relay "unresponsive" (longer on slow links: see
/// `ferry_proto::liveness`). With sampling every [`LIVENESS_SAMPLE`], relayed traffic
/// leaves a crashed relay about 1.2 s after its last answer.
pub const UNRESPONSIVE_AFTER: Duration = Duration::from_secs(1);
pub const LIVENESS_SAMPLE: Duration = Duration::from_millis(200);

/// How often a session on TLS/TCP tries QUIC again. With [`QUIC_TRY_TIMEOUT`] it puts
/// a link back on QUIC within about 8 s of UDP getting through, for a few Initial
/// packets per try while it does not.
pub const QUIC_RETRY: Duration = Duration::from_secs(5);
/// How long one try may take to get a QUIC link to the relay.
pub const QUIC_TRY_TIMEOUT: Duration = Duration::from_secs(3);
/// How long to wait after the relay refused a move to QUIC before asking again.
pub const QUIC_REFUSED_RETRY: Duration = Duration::from_secs(60);

/// Where this shim's session with one relay stands, as status shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelayState {
    /// Dialing or registering.
    Connecting,
    /// Registered: services granted, overlay traffic may go through it.
    Connected,
    /// The session ended; reconnecting after a backoff.
    Disconnected,
    /// The relay refused this node (its policy, or the key is in use elsewhere).
    Refused,
    /// Registered, but it stopped answering: overlay traffic goes elsewhere until it
    /// answers again.
    Unresponsive,
    /// The relay is shutting down (`going_away`): overlay traffic goes elsewhere, the
    /// link stays until connections in flight finish.
    Draining,
}

impl RelayState {
    pub const ALL: [RelayState; 6] = [
        Self::Connecting,
        Self::Connected,
        Self::Disconnected,
        Self::Refused,
        Self::Unresponsive,
        Self::Draining,
    ];

    /// The state's name in `/api/status`, the panel and `ferry-shim status`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Connected => "connected",
            Self::Disconnected => "disconnected",
            Self::Refused => "refused",
            Self::Unresponsive => "unresponsive",
            Self::Draining => "draining",
        }
    }
}

/// How a session ended, which decides what the shim does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// The session ended; reconnect. `registered` says whether it got that far.
    Lost { reason: String, registered: bool },
    /// Reconnecting would not help (another process uses this key).
    Fatal(String),
    /// The relay's policy refused this node; try again only slowly (an operator may
    /// change the policy, but asking every few seconds would be noise).
    Refused(String),
}

impl SessionEnd {
    fn lost(reason: impl Into<String>) -> Self {
        SessionEnd::Lost {
            reason: reason.into(),
            registered: false,
        }
    }
}

/// What the session is fed: the same events as a server's side of a session
/// (`ferry_proto::node_session`), from the same framed reads.
pub use ferry_proto::node_session::Event;

/// The relay's `registered` answer, as far as the shim uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// True for the answer that opened the session: bring the relay up (overlay
    /// route, path layer, public-port streams). Later answers only update grants.
    pub first: bool,
    pub observed_addr: std::net::SocketAddr,
    pub rendezvous: bool,
    pub stun_port: Option<u16>,
    /// The relay-channel token, when the relay gave one and this shim uses channels.
    pub channel: Option<ChannelToken>,
    /// What each service was granted (none on a dedicated rendezvous session).
    pub grants: Vec<ServiceGrant>,
    /// The relay's fleet, when it is in one: it answers `locate`.
    pub fleet: Option<String>,
}

/// Why overlay traffic leaves a relay that keeps its link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failover {
    /// The failover's metric label.
    pub reason: &'static str,
    /// The relay's state in status.
    pub state: RelayState,
    /// What status shows as the relay's error.
    pub why: String,
}

/// What the driver must do.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Queue this message to the relay (dropped if the queue is full).
    Send(Control),
    /// An overlay packet relayed from `peer`.
    Deliver {
        peer: NodeId,
        data: Bytes,
    },
    /// A rendezvous answer for the path layer.
    ToPaths(Control),
    /// The relay's grid (admins, revoked members) for the allow list. A relay that
    /// sends it also answers this node's `who_owns`.
    Grid(Box<ferry_proto::grid::GridView>),
    /// The relay's answer to `who_owns`, for whoever asked (`crate::owners`).
    Owner(crate::owners::Answer),
    /// The relay's answer to `locate`, for whoever asked (`crate::visits`).
    Located {
        node: NodeId,
        relays: Vec<ferry_proto::RelayUrl>,
    },
    Registered(Registered),
    /// Move relayed overlay traffic to another relay; keep the link.
    MoveOverlayOff(Failover),
    /// The relay answers again: route overlay traffic through it again.
    TakeOverlayBack,
    /// Try to move the session onto a QUIC link: dial one, send `register` with
    /// `upgrade`, feed the answer to [`RelaySession::quic_answered`] (or report a
    /// failure to get that far to [`RelaySession::quic_unreachable`]).
    TryQuic,
    End(SessionEnd),
}

/// What the relay's first answer on a new QUIC link means (`quic_answered`).
#[derive(Debug, PartialEq, Eq)]
pub enum QuicStep {
    /// The relay registered the node on the new link: move the session there; the
    /// old link stays until the relay closes it (its public connections ended).
    Switch(Registered),
    /// The relay refused the move; the session stays on its link. `again` says
    /// whether it is worth asking later (not for a relay that does not know moves).
    Stay { why: String, again: bool },
    /// The relay may have moved the node or not: the session ends and reconnects.
    End(SessionEnd),
}

/// Whether this session tries to move onto QUIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QuicRetry {
    /// Not on TLS/TCP, or may not (proxy, mode, visit), or the relay does not know
    /// moves, or it moved.
    Off,
    /// Next try at this instant.
    At(Instant),
    /// A try is under way.
    Trying,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Registering { deadline: Instant },
    Serving,
    Ended,
}

/// Set-up of one session, fixed for its life.
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    pub node_id: NodeId,
    /// A session with a standalone rendezvous: no services, no overlay traffic.
    pub dedicated: bool,
    /// This shim sends overlay packets on relay channels when offered.
    pub use_channel: bool,
    /// The link is TLS/TCP where QUIC is allowed: try QUIC once registered.
    pub retry_quic: bool,
}

/// One session with one relay, from `register` sent to its end.
#[derive(Debug)]
pub struct RelaySession {
    setup: Setup,
    phase: Phase,
    silence: Silence,
    /// When to next ask whether the silence reached its limit.
    silence_check: Instant,
    next_ping: Instant,
    nonce: u64,
    liveness: Liveness,
    next_sample: Instant,
    draining: bool,
    quic_retry: QuicRetry,
}

impl RelaySession {
    /// A session whose `register` was sent at `now`.
    pub fn new(setup: Setup, now: Instant) -> Self {
        let silence = Silence::new(LINK_IDLE_TIMEOUT, now);
        RelaySession {
            setup,
            phase: Phase::Registering {
                deadline: now + REGISTER_TIMEOUT,
            },
            silence_check: silence.deadline(),
            silence,
            next_ping: now + KEEPALIVE_INTERVAL,
            nonce: 0,
            liveness: Liveness::new(UNRESPONSIVE_AFTER),
            next_sample: now + LIVENESS_SAMPLE,
            draining: false,
            quic_retry: QuicRetry::Off,
        }
    }

    /// True once the relay accepted the registration, until the session ends.
    pub fn is_registered(&self) -> bool {
        self.phase == Phase::Serving
    }

    fn samples_liveness(&self) -> bool {
        !self.setup.dedicated && !self.draining
    }

    /// When the driver's timer must fire next.
    pub fn timeout(&self) -> Instant {
        match self.phase {
            Phase::Registering { deadline } => deadline,
            Phase::Serving => {
                let mut next = self.silence_check.min(self.next_ping);
                if self.samples_liveness() {
                    next = next.min(self.next_sample);
                }
                if let QuicRetry::At(at) = self.quic_retry {
                    next = next.min(at);
                }
                next
            }
            // Nothing is due; a far deadline keeps a careless driver from spinning.
            Phase::Ended => self.silence.deadline().max(self.next_ping),
        }
    }

    /// The timer fired at `now`. `stalls` says when this process did not run;
    /// `activity` is the link's counters now (for the liveness verdict).
    pub fn on_timeout(
        &mut self,
        now: Instant,
        stalls: &StallClock,
        activity: Activity,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        match self.phase {
            Phase::Ended => {}
            Phase::Registering { deadline } => {
                if now >= deadline {
                    actions.push(self.end(SessionEnd::lost(
                        "the relay did not answer the registration",
                    )));
                }
            }
            Phase::Serving => {
                if now >= self.silence_check {
                    match self.silence.recheck_at(now, stalls) {
                        Some(again) => self.silence_check = again,
                        None => {
                            actions.push(self.end(SessionEnd::Lost {
                                reason: format!(
                                    "relay silent for {} s",
                                    LINK_IDLE_TIMEOUT.as_secs()
                                ),
                                registered: true,
                            }));
                            return actions;
                        }
                    }
                }
                if now >= self.next_ping {
                    self.nonce += 1;
                    actions.push(Action::Send(Control::Ping { nonce: self.nonce }));
                    self.next_ping += KEEPALIVE_INTERVAL;
                    if self.next_ping <= now {
                        // After a stall: one ping now, not one per interval missed.
                        self.next_ping = now + KEEPALIVE_INTERVAL;
                    }
                }
                if self.samples_liveness() && now >= self.next_sample {
                    self.next_sample = now + LIVENESS_SAMPLE;
                    match self.liveness.observe(now, activity) {
                        Some(Verdict::Unresponsive { silent_for }) => {
                            // A relay that crashed sends nothing, not even a close; QUIC
                            // would notice only at its idle timeout. Overlay traffic
                            // moves now; the link stays in case it is only a hiccup.
                            actions.push(Action::MoveOverlayOff(Failover {
                                reason: "unresponsive",
                                state: RelayState::Unresponsive,
                                why: format!("no answer for {} ms", silent_for.as_millis()),
                            }));
                        }
                        Some(Verdict::Answering) => actions.push(Action::TakeOverlayBack),
                        None => {}
                    }
                }
                if let QuicRetry::At(at) = self.quic_retry
                    && now >= at
                {
                    if self.draining {
                        // The relay is leaving: nothing to move onto.
                        self.quic_retry = QuicRetry::Off;
                    } else {
                        self.quic_retry = QuicRetry::Trying;
                        actions.push(Action::TryQuic);
                    }
                }
            }
        }
        actions
    }

    /// [`RelaySession::on_timeout`] now, against this process's stalls.
    pub fn timer_fired(&mut self, activity: Activity) -> Vec<Action> {
        self.on_timeout(Instant::now(), &ferry_proto::stall::stalls(), activity)
    }

    /// Something arrived (or the session closed) at `now`.
    pub fn handle(&mut self, event: Event, now: Instant) -> Option<Action> {
        match self.phase {
            Phase::Ended => None,
            Phase::Registering { .. } => Some(self.registering(event, now)),
            Phase::Serving => {
                if let Event::Frame(_) = event {
                    self.silence.heard(now);
                }
                self.serving(event)
            }
        }
    }

    fn registering(&mut self, event: Event, now: Instant) -> Action {
        let msg = match event {
            Event::Frame(Frame::Control(msg)) => msg,
            Event::Frame(Frame::Packet { .. }) => {
                return self.end(SessionEnd::lost(
                    "the relay sent an overlay packet before answering the registration",
                ));
            }
            Event::Garbage(e) => {
                return self.end(SessionEnd::lost(format!("bad answer from the relay: {e}")));
            }
            Event::Closed(_) => {
                return self.end(SessionEnd::lost(
                    "the relay closed the session before answering",
                ));
            }
        };
        match msg {
            Control::Registered { .. } => match self.registered(msg, true) {
                Ok(answer) => {
                    self.phase = Phase::Serving;
                    self.silence = Silence::new(LINK_IDLE_TIMEOUT, now);
                    self.silence_check = self.silence.deadline();
                    self.next_ping = now + KEEPALIVE_INTERVAL;
                    self.next_sample = now + LIVENESS_SAMPLE;
                    if self.setup.retry_quic && !self.setup.dedicated {
                        self.quic_retry = QuicRetry::At(now + QUIC_RETRY);
                    }
                    answer
                }
                Err(end) => self.end(end),
            },
            Control::Error { code, message } => {
                let end = error_end(code, message);
                self.end(end)
            }
            other => self.end(SessionEnd::lost(format!(
                "the relay answered the registration with {:?} instead of registered",
                other.name()
            ))),
        }
    }

    fn serving(&mut self, event: Event) -> Option<Action> {
        let msg = match event {
            Event::Frame(Frame::Packet { peer, data }) => {
                return Some(Action::Deliver { peer, data });
            }
            Event::Frame(Frame::Control(msg)) => msg,
            Event::Garbage(e) => {
                return Some(self.end(SessionEnd::Lost {
                    reason: format!("protocol error from the relay: {e}"),
                    registered: true,
                }));
            }
            Event::Closed(reason) => {
                return Some(self.end(SessionEnd::Lost {
                    reason,
                    registered: true,
                }));
            }
        };
        match msg {
            Control::Ping { nonce } => Some(Action::Send(Control::Pong { nonce })),
            Control::Pong { .. } => None,
            Control::Error {
                code: ErrorCode::GoingAway,
                message,
            } => {
                // The relay drains: new overlay traffic goes elsewhere now, but the
                // link stays so connections in flight through this relay finish; the
                // relay closes it when it is done.
                self.draining = true;
                Some(Action::MoveOverlayOff(Failover {
                    reason: "going_away",
                    state: RelayState::Draining,
                    why: message,
                }))
            }
            Control::Error { code, message } => {
                let end = error_end(code, message);
                Some(self.end(end))
            }
            Control::Registered { .. } => Some(match self.registered(msg, false) {
                Ok(answer) => answer,
                Err(end) => self.end(end),
            }),
            Control::Grid { view } => Some(Action::Grid(view)),
            Control::Owner {
                host,
                port,
                owner,
                reason,
            } => Some(Action::Owner(crate::owners::Answer {
                host,
                port,
                owner: owner.ok_or_else(|| {
                    reason.unwrap_or_else(|| "the relay did not say why".to_string())
                }),
            })),
            Control::Located { node_id, relays } => Some(Action::Located {
                node: node_id,
                relays,
            }),
            Control::Published { .. }
            | Control::Found { .. }
            | Control::PunchStart { .. }
            | Control::PunchFailed { .. } => Some(Action::ToPaths(msg)),
            Control::Register { .. }
            | Control::Join { .. }
            | Control::Joined { .. }
            | Control::Publish { .. }
            | Control::Lookup { .. }
            | Control::WhoOwns { .. }
            | Control::Locate { .. }
            | Control::Punch { .. } => {
                Some(self.end(SessionEnd::lost("the relay sent a node-only message")))
            }
        }
    }

    /// A `registered` answer, checked: it must name this node's key.
    fn registered(&self, msg: Control, first: bool) -> Result<Action, SessionEnd> {
        let Control::Registered {
            node_id,
            observed_addr,
            services,
            rendezvous,
            stun_port,
            channel,
            fleet,
        } = msg
        else {
            return Err(SessionEnd::lost("not a registration answer"));
        };
        if node_id != self.setup.node_id {
            return Err(SessionEnd::lost(format!(
                "the relay registered us as {node_id}, not {}",
                self.setup.node_id
            )));
        }
        Ok(Action::Registered(Registered {
            first,
            observed_addr,
            rendezvous,
            stun_port,
            channel: channel.map(|c| *c).filter(|_| self.setup.use_channel),
            grants: if self.setup.dedicated {
                Vec::new()
            } else {
                services
            },
            fleet: fleet.map(|name| *name),
        }))
    }

    fn end(&mut self, end: SessionEnd) -> Action {
        Action::End(self.end_quietly(end))
    }

    /// A try at QUIC ([`Action::TryQuic`]) failed before `register` was sent (no QUIC
    /// link to the relay yet): try again later.
    pub fn quic_unreachable(&mut self, now: Instant) {
        if self.quic_retry == QuicRetry::Trying {
            self.quic_retry = QuicRetry::At(now + QUIC_RETRY);
        }
    }

    /// The relay's first answer on the new QUIC link, after `register` with `upgrade`
    /// was sent on it (`Event::Closed` when none came in time).
    pub fn quic_answered(&mut self, event: Event, now: Instant) -> QuicStep {
        if self.phase != Phase::Serving {
            return QuicStep::Stay {
                why: "the session ended meanwhile".into(),
                again: false,
            };
        }
        self.quic_retry = QuicRetry::Off;
        let half_moved = |why: String| SessionEnd::Lost {
            reason: format!("moving the link to QUIC was left half done ({why}); reconnecting"),
            registered: true,
        };
        let msg = match event {
            Event::Frame(Frame::Control(msg)) => msg,
            Event::Frame(Frame::Packet { .. }) => {
                let end = half_moved("the relay answered with an overlay packet".into());
                return QuicStep::End(self.end_quietly(end));
            }
            Event::Garbage(e) | Event::Closed(e) => {
                return QuicStep::End(self.end_quietly(half_moved(e)));
            }
        };
        match msg {
            Control::Registered { .. } => match self.registered(msg, true) {
                Ok(Action::Registered(answer)) => {
                    // A fresh link: its counters start again, and it just answered.
                    self.liveness = Liveness::new(UNRESPONSIVE_AFTER);
                    self.next_sample = now + LIVENESS_SAMPLE;
                    self.silence.heard(now);
                    QuicStep::Switch(answer)
                }
                Ok(_) => QuicStep::End(self.end_quietly(half_moved("not registered".into()))),
                Err(end) => QuicStep::End(self.end_quietly(end)),
            },
            // Older relays refuse the `upgrade` field they do not know.
            Control::Error {
                code: ErrorCode::Protocol,
                message,
            } => QuicStep::Stay {
                why: format!("the relay does not take a move to QUIC: {message}"),
                again: false,
            },
            Control::Error { message, .. } => {
                self.quic_retry = QuicRetry::At(now + QUIC_REFUSED_RETRY);
                QuicStep::Stay {
                    why: format!("the relay refused the move to QUIC: {message}"),
                    again: true,
                }
            }
            other => QuicStep::End(self.end_quietly(half_moved(format!(
                "the relay answered with {:?}",
                other.name()
            )))),
        }
    }

    /// Ends the session, for a step that says so itself.
    fn end_quietly(&mut self, end: SessionEnd) -> SessionEnd {
        self.phase = Phase::Ended;
        end
    }
}

/// What an `error` from the relay means for this node.
fn error_end(code: ErrorCode, message: String) -> SessionEnd {
    match code {
        ErrorCode::Replaced => SessionEnd::Fatal(message),
        ErrorCode::Denied => SessionEnd::Refused(message),
        code => SessionEnd::lost(format!("relay reported {code:?}: {message}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_states_are_named_as_status_shows_them() {
        for state in RelayState::ALL {
            let json = serde_json::to_value(state).expect("serializes");
            assert_eq!(json, state.name());
            assert_eq!(serde_json::from_value::<RelayState>(json).ok(), Some(state));
        }
    }
    use ferry_proto::SecretKey;

    fn node() -> NodeId {
        SecretKey::generate().node_id()
    }

    fn setup(node_id: NodeId) -> Setup {
        Setup {
            node_id,
            dedicated: false,
            use_channel: true,
            retry_quic: false,
        }
    }

    /// A session with a standalone rendezvous.
    fn dedicated(node_id: NodeId, use_channel: bool, t: Instant) -> RelaySession {
        RelaySession::new(
            Setup {
                node_id,
                dedicated: true,
                use_channel,
                retry_quic: true,
            },
            t,
        )
    }

    fn registered_as(node_id: NodeId) -> Event {
        Event::Frame(Frame::Control(Control::Registered {
            node_id,
            observed_addr: "192.0.2.7:4000".parse().unwrap(),
            services: vec![ServiceGrant {
                name: "storage".into(),
                public_addr: Some("relay.example:20001".into()),
                public_port: Some(20001),
                error: None,
            }],
            rendezvous: true,
            stun_port: Some(3478),
            channel: Some(Box::new(ChannelToken::random())),
            fleet: None,
        }))
    }

    fn error(code: ErrorCode, message: &str) -> Event {
        Event::Frame(Frame::Control(Control::Error {
            code,
            message: message.into(),
        }))
    }

    /// A session registered at `t`.
    fn serving(t: Instant) -> (RelaySession, NodeId) {
        let me = node();
        let mut s = RelaySession::new(setup(me), t);
        assert!(matches!(
            s.handle(registered_as(me), t),
            Some(Action::Registered(Registered { first: true, .. }))
        ));
        (s, me)
    }

    fn ended(action: Option<Action>) -> SessionEnd {
        match action {
            Some(Action::End(end)) => end,
            other => panic!("expected the session to end, got {other:?}"),
        }
    }

    fn quiet() -> StallClock {
        StallClock::default()
    }

    #[test]
    fn a_registration_for_this_key_brings_the_relay_up() {
        let t = Instant::now();
        let me = node();
        let mut s = RelaySession::new(setup(me), t);
        let Some(Action::Registered(r)) = s.handle(registered_as(me), t) else {
            panic!("not registered");
        };
        assert!(r.first && r.rendezvous && r.channel.is_some());
        assert_eq!(r.stun_port, Some(3478));
        assert_eq!(r.observed_addr, "192.0.2.7:4000".parse().unwrap());
        assert_eq!(r.grants.len(), 1);
        assert!(s.is_registered());
        // A later answer (grants changed) is not a second bring-up.
        assert!(matches!(
            s.handle(registered_as(me), t),
            Some(Action::Registered(Registered { first: false, .. }))
        ));
    }

    #[test]
    fn a_registration_for_another_key_ends_the_attempt() {
        let t = Instant::now();
        let me = node();
        let other = node();
        let mut s = RelaySession::new(setup(me), t);
        let end = ended(s.handle(registered_as(other), t));
        let SessionEnd::Lost { reason, registered } = end else {
            panic!("{end:?}")
        };
        assert!(!registered);
        assert_eq!(
            reason,
            format!("the relay registered us as {other}, not {me}")
        );
        assert_eq!(
            s.handle(registered_as(me), t),
            None,
            "an ended session stays ended"
        );
    }

    #[test]
    fn a_dedicated_rendezvous_session_takes_no_grants_and_a_shim_without_channels_no_token() {
        let t = Instant::now();
        let me = node();
        let mut s = dedicated(me, false, t);
        let Some(Action::Registered(r)) = s.handle(registered_as(me), t) else {
            panic!("not registered");
        };
        assert!(r.grants.is_empty());
        assert_eq!(r.channel, None);
    }

    #[test]
    fn errors_map_to_how_the_session_ends() {
        for (code, want) in [
            (ErrorCode::Replaced, SessionEnd::Fatal("m".into())),
            (ErrorCode::Denied, SessionEnd::Refused("m".into())),
            (
                ErrorCode::Protocol,
                SessionEnd::lost("relay reported Protocol: m"),
            ),
        ] {
            // Before and after registration alike.
            let t = Instant::now();
            let mut s = RelaySession::new(setup(node()), t);
            assert_eq!(ended(s.handle(error(code, "m"), t)), want, "{code:?}");
            let (mut s, _) = serving(t);
            assert_eq!(ended(s.handle(error(code, "m"), t)), want, "{code:?}");
        }
    }

    #[test]
    fn no_answer_within_the_timeout_ends_the_attempt() {
        let t = Instant::now();
        let mut s = RelaySession::new(setup(node()), t);
        assert_eq!(s.timeout(), t + REGISTER_TIMEOUT);
        assert!(
            s.on_timeout(t + REGISTER_TIMEOUT / 2, &quiet(), Activity::default())
                .is_empty()
        );
        let actions = s.on_timeout(t + REGISTER_TIMEOUT, &quiet(), Activity::default());
        assert_eq!(
            actions,
            [Action::End(SessionEnd::lost(
                "the relay did not answer the registration"
            ))]
        );
    }

    #[test]
    fn anything_but_an_answer_before_registration_ends_the_attempt() {
        let t = Instant::now();
        let cases: [(Event, &str); 4] = [
            (
                Event::Closed("x".into()),
                "the relay closed the session before answering",
            ),
            (
                Event::Garbage("junk".into()),
                "bad answer from the relay: junk",
            ),
            (
                Event::Frame(Frame::Packet {
                    peer: node(),
                    data: Bytes::from_static(b"p"),
                }),
                "overlay packet before answering",
            ),
            (
                Event::Frame(Frame::Control(Control::Pong { nonce: 1 })),
                "instead of registered",
            ),
        ];
        for (event, want) in cases {
            let mut s = RelaySession::new(setup(node()), t);
            let SessionEnd::Lost { reason, registered } = ended(s.handle(event, t)) else {
                panic!("not lost")
            };
            assert!(!registered);
            assert!(reason.contains(want), "{reason:?} lacks {want:?}");
        }
    }

    #[test]
    fn pings_are_answered_and_sent_every_keepalive_interval() {
        let t = Instant::now();
        let (mut s, _) = serving(t);
        assert_eq!(
            s.handle(Event::Frame(Frame::Control(Control::Ping { nonce: 9 })), t),
            Some(Action::Send(Control::Pong { nonce: 9 }))
        );
        assert_eq!(
            s.handle(Event::Frame(Frame::Control(Control::Pong { nonce: 1 })), t),
            None
        );
        let mut pings = Vec::new();
        let mut now = t;
        // Hear something every second so silence never ends it.
        while now < t + KEEPALIVE_INTERVAL * 3 + Duration::from_millis(1) {
            now += Duration::from_secs(1);
            s.handle(
                Event::Frame(Frame::Control(Control::Pong { nonce: 0 })),
                now,
            );
            for a in s.on_timeout(now, &quiet(), Activity::default()) {
                if let Action::Send(Control::Ping { nonce }) = a {
                    pings.push((nonce, now - t));
                }
            }
        }
        assert_eq!(
            pings,
            [
                (1, KEEPALIVE_INTERVAL),
                (2, KEEPALIVE_INTERVAL * 2),
                (3, KEEPALIVE_INTERVAL * 3)
            ]
        );
    }

    #[test]
    fn after_a_long_stall_one_ping_goes_not_a_burst() {
        let t = Instant::now();
        let (mut s, _) = serving(t);
        let late = t + KEEPALIVE_INTERVAL * 3;
        s.handle(
            Event::Frame(Frame::Control(Control::Pong { nonce: 0 })),
            late,
        );
        let pings = s
            .on_timeout(late, &quiet(), Activity::default())
            .into_iter()
            .filter(|a| matches!(a, Action::Send(Control::Ping { .. })))
            .count();
        assert_eq!(pings, 1);
        assert!(s.timeout() > late);
    }

    #[test]
    fn a_relay_silent_for_the_idle_limit_ends_the_session_but_a_stall_does_not_count() {
        let t = Instant::now();
        let (mut s, _) = serving(t);
        let at_limit = t + LINK_IDLE_TIMEOUT;
        // This process was frozen for 30 s of that minute: not the relay's silence.
        let mut stalls = StallClock::default();
        for second in (0..=10).chain(40..=100) {
            stalls.tick(t + Duration::from_secs(second));
        }
        let actions = s.on_timeout(at_limit, &stalls, Activity::default());
        assert!(
            !actions.iter().any(|a| matches!(a, Action::End(_))),
            "{actions:?}"
        );
        assert!(s.timeout() <= at_limit + Duration::from_secs(30));
        let actions = s.on_timeout(
            at_limit + Duration::from_secs(31),
            &stalls,
            Activity::default(),
        );
        assert_eq!(
            actions.last(),
            Some(&Action::End(SessionEnd::Lost {
                reason: format!("relay silent for {} s", LINK_IDLE_TIMEOUT.as_secs()),
                registered: true,
            }))
        );
    }

    #[test]
    fn frames_keep_the_session_alive() {
        let t = Instant::now();
        let (mut s, me) = serving(t);
        let later = t + LINK_IDLE_TIMEOUT - Duration::from_secs(1);
        s.handle(
            Event::Frame(Frame::Packet {
                peer: me,
                data: Bytes::from_static(b"x"),
            }),
            later,
        );
        let actions = s.on_timeout(t + LINK_IDLE_TIMEOUT, &quiet(), Activity::default());
        assert!(!actions.iter().any(|a| matches!(a, Action::End(_))));
    }

    #[test]
    fn packets_and_rendezvous_answers_are_handed_on() {
        let t = Instant::now();
        let (mut s, _) = serving(t);
        let peer = node();
        assert_eq!(
            s.handle(
                Event::Frame(Frame::Packet {
                    peer,
                    data: Bytes::from_static(b"d")
                }),
                t
            ),
            Some(Action::Deliver {
                peer,
                data: Bytes::from_static(b"d")
            })
        );
        let failed = Control::PunchFailed {
            peer,
            reason: "r".into(),
        };
        assert_eq!(
            s.handle(Event::Frame(Frame::Control(failed.clone())), t),
            Some(Action::ToPaths(failed))
        );
    }

    #[test]
    fn an_owner_answer_is_handed_on_with_its_reason() {
        let t = Instant::now();
        let (mut s, _) = serving(t);
        let answer = |owner, reason: Option<&str>| {
            Event::Frame(Frame::Control(Control::Owner {
                host: "relay.example".into(),
                port: 23100,
                owner,
                reason: reason.map(str::to_string),
            }))
        };
        let owner = ferry_proto::frame::PortOwner {
            node: node(),
            service: "storage".into(),
        };
        let Some(Action::Owner(got)) = s.handle(answer(Some(owner.clone()), None), t) else {
            panic!("not handed on");
        };
        assert_eq!((got.port, got.owner), (23100, Ok(owner)));
        let Some(Action::Owner(got)) = s.handle(answer(None, Some("not a member")), t) else {
            panic!("not handed on");
        };
        assert_eq!(got.owner, Err("not a member".to_string()));
        let end = ended(s.handle(
            Event::Frame(Frame::Control(Control::WhoOwns {
                host: "h".into(),
                port: 1,
            })),
            t,
        ));
        assert_eq!(end, SessionEnd::lost("the relay sent a node-only message"));
    }

    #[test]
    fn a_node_only_message_or_garbage_ends_the_session() {
        let t = Instant::now();
        let (mut s, _) = serving(t);
        let end = ended(s.handle(
            Event::Frame(Frame::Control(Control::Lookup { node_id: node() })),
            t,
        ));
        assert_eq!(end, SessionEnd::lost("the relay sent a node-only message"));
        let (mut s, _) = serving(t);
        assert_eq!(
            ended(s.handle(Event::Garbage("bad frame".into()), t)),
            SessionEnd::Lost {
                reason: "protocol error from the relay: bad frame".into(),
                registered: true
            }
        );
        let (mut s, _) = serving(t);
        assert_eq!(
            ended(s.handle(Event::Closed("the relay link closed".into()), t)),
            SessionEnd::Lost {
                reason: "the relay link closed".into(),
                registered: true
            }
        );
    }

    /// Counters of a link that sent `sent` eliciting frames and received `received`.
    fn activity(sent: u64, received: u64) -> Activity {
        Activity {
            eliciting_sent: sent,
            received,
            rtt: Duration::from_millis(20),
        }
    }

    /// Feeds liveness samples every [`LIVENESS_SAMPLE`] from `from` for `samples`
    /// samples, and returns the failover actions seen.
    fn sample(
        s: &mut RelaySession,
        from: Instant,
        samples: u32,
        counters: impl Fn(u32) -> Activity,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        for i in 1..=samples {
            let now = from + LIVENESS_SAMPLE * i;
            out.extend(
                s.on_timeout(now, &quiet(), counters(i))
                    .into_iter()
                    .filter(|a| matches!(a, Action::MoveOverlayOff(_) | Action::TakeOverlayBack)),
            );
        }
        out
    }

    #[test]
    fn an_unresponsive_relay_loses_overlay_traffic_and_gets_it_back_when_it_answers() {
        let t = Instant::now();
        let (mut s, _) = serving(t);
        // Sends go out, nothing comes back for 2 s.
        let moved = sample(&mut s, t, 10, |i| activity(u64::from(i), 0));
        assert_eq!(moved.len(), 1, "{moved:?}");
        let Action::MoveOverlayOff(f) = &moved[0] else {
            panic!("{moved:?}")
        };
        assert_eq!(
            (f.reason, f.state),
            ("unresponsive", RelayState::Unresponsive)
        );
        assert!(f.why.starts_with("no answer for "), "{}", f.why);
        // Packets arrive again.
        let back = sample(&mut s, t + LIVENESS_SAMPLE * 10, 1, |_| activity(10, 5));
        assert_eq!(back, [Action::TakeOverlayBack]);
    }

    #[test]
    fn a_draining_relay_keeps_its_link_and_is_not_judged_unresponsive() {
        let t = Instant::now();
        let (mut s, _) = serving(t);
        assert_eq!(
            s.handle(error(ErrorCode::GoingAway, "restarting"), t),
            Some(Action::MoveOverlayOff(Failover {
                reason: "going_away",
                state: RelayState::Draining,
                why: "restarting".into()
            }))
        );
        assert!(s.is_registered(), "the link stays");
        assert!(sample(&mut s, t, 20, |i| activity(u64::from(i), 0)).is_empty());
    }

    #[test]
    fn a_dedicated_rendezvous_session_is_not_judged_unresponsive() {
        let t = Instant::now();
        let me = node();
        let mut s = dedicated(me, true, t);
        s.handle(registered_as(me), t);
        assert!(sample(&mut s, t, 20, |i| activity(u64::from(i), 0)).is_empty());
    }
    /// A session on TLS/TCP, registered at `t`.
    fn on_tcp(t: Instant) -> (RelaySession, NodeId) {
        let me = node();
        let mut s = RelaySession::new(
            Setup {
                retry_quic: true,
                ..setup(me)
            },
            t,
        );
        assert!(matches!(
            s.handle(registered_as(me), t),
            Some(Action::Registered(_))
        ));
        (s, me)
    }

    fn tries_quic(s: &mut RelaySession, now: Instant) -> bool {
        s.on_timeout(now, &quiet(), Activity::default())
            .contains(&Action::TryQuic)
    }

    #[test]
    fn a_session_on_tcp_tries_quic_every_few_seconds_until_it_moves() {
        let t = Instant::now();
        let (mut s, me) = on_tcp(t);
        assert!(s.timeout() <= t + QUIC_RETRY, "the timer wakes for the try");
        assert!(!tries_quic(&mut s, t + QUIC_RETRY / 2));
        assert!(tries_quic(&mut s, t + QUIC_RETRY));
        assert!(!tries_quic(&mut s, t + QUIC_RETRY * 2), "one try at a time");
        // UDP is still blocked: the try could not reach the relay.
        let failed_at = t + QUIC_RETRY + QUIC_TRY_TIMEOUT;
        s.quic_unreachable(failed_at);
        assert!(!tries_quic(&mut s, failed_at + QUIC_RETRY / 2));
        assert!(tries_quic(&mut s, failed_at + QUIC_RETRY));
        // UDP gets through: the relay registers the node on the QUIC link.
        let moved_at = failed_at + QUIC_RETRY + Duration::from_millis(30);
        let QuicStep::Switch(answer) = s.quic_answered(registered_as(me), moved_at) else {
            panic!("not a switch");
        };
        assert_eq!(answer.grants.len(), 1, "the grants come with the move");
        assert!(s.is_registered());
        assert!(
            !tries_quic(&mut s, moved_at + QUIC_RETRY * 10),
            "moved: no more tries"
        );
    }

    #[test]
    fn a_session_on_quic_a_dedicated_one_and_a_draining_one_never_try() {
        let t = Instant::now();
        let (mut on_quic, _) = serving(t);
        assert!(!tries_quic(&mut on_quic, t + QUIC_RETRY * 3));
        let me = node();
        let mut rendezvous = dedicated(me, true, t);
        rendezvous.handle(registered_as(me), t);
        assert!(!tries_quic(&mut rendezvous, t + QUIC_RETRY * 3));
        let (mut draining, _) = on_tcp(t);
        draining.handle(error(ErrorCode::GoingAway, "bye"), t);
        assert!(!tries_quic(&mut draining, t + QUIC_RETRY * 3));
    }

    #[test]
    fn a_relay_that_refuses_the_move_keeps_the_session_where_it_is() {
        let t = Instant::now();
        // A relay that does not know `upgrade` (a protocol error): never again.
        let (mut s, _) = on_tcp(t);
        assert!(tries_quic(&mut s, t + QUIC_RETRY));
        let step = s.quic_answered(error(ErrorCode::Protocol, "unknown field `upgrade`"), t);
        assert_eq!(
            step,
            QuicStep::Stay {
                why: "the relay does not take a move to QUIC: unknown field `upgrade`".into(),
                again: false
            }
        );
        assert!(s.is_registered(), "the session goes on over TCP");
        assert!(!tries_quic(&mut s, t + QUIC_REFUSED_RETRY * 2));
        // Any other refusal: again, slowly.
        let (mut s, _) = on_tcp(t);
        assert!(tries_quic(&mut s, t + QUIC_RETRY));
        let refused_at = t + QUIC_RETRY;
        let step = s.quic_answered(error(ErrorCode::Denied, "not listed"), refused_at);
        assert!(
            matches!(step, QuicStep::Stay { again: true, .. }),
            "{step:?}"
        );
        assert!(!tries_quic(&mut s, refused_at + QUIC_RETRY));
        let again_at = refused_at + QUIC_REFUSED_RETRY;
        let pong = Event::Frame(Frame::Control(Control::Pong { nonce: 1 }));
        s.handle(pong, again_at - Duration::from_secs(1));
        assert!(tries_quic(&mut s, again_at));
    }

    #[test]
    fn no_answer_to_the_move_ends_the_session_because_the_relay_may_have_moved_it() {
        let t = Instant::now();
        let (mut s, me) = on_tcp(t);
        assert!(tries_quic(&mut s, t + QUIC_RETRY));
        let step = s.quic_answered(Event::Closed("no answer in 10 s".into()), t + QUIC_RETRY);
        assert_eq!(
            step,
            QuicStep::End(SessionEnd::Lost {
                reason:
                    "moving the link to QUIC was left half done (no answer in 10 s); reconnecting"
                        .into(),
                registered: true
            })
        );
        assert!(!s.is_registered());
        assert_eq!(s.handle(registered_as(me), t), None, "ended stays ended");
        // A registration for another key on the new link is no move either.
        let (mut s, _) = on_tcp(t);
        assert!(tries_quic(&mut s, t + QUIC_RETRY));
        assert!(matches!(
            s.quic_answered(registered_as(node()), t + QUIC_RETRY),
            QuicStep::End(SessionEnd::Lost { .. })
        ));
    }
}
