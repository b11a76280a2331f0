//! The server side of a node session, sans-IO: the rules the relay and the standalone
//! rendezvous apply to what a node sends on its session stream, in one place for both.
//!
//! A driver feeds a [`NodeSession`] what happened ([`Event`]) and the time, carries
//! out the [`Effect`]s it returns, and arms one timer at [`NodeSession::timeout`].
//! What only the server can decide (is the relay full, does the policy admit the node,
//! which public ports it gets) stays with the driver: the core says *when* to decide
//! ([`Effect::Admit`], [`Effect::Join`], [`Effect::Reregister`]) and the driver tells
//! it the outcome ([`NodeSession::admitted`]) or ends the session.
//!
//! The rules:
//! - the first message is `register` (or, where invites are redeemed, `join`); nothing
//!   else is served before it, and a node that sends nothing within
//!   [`FIRST_MESSAGE_TIMEOUT`] is hung up on without a word;
//! - `ping` is answered with `pong`, `pong` is ignored;
//! - overlay packets, `who_owns` and rendezvous requests are served where the server
//!   offers them, and are a protocol error where it does not;
//! - a node's `error` ends the session; bytes that are not a frame end it with a
//!   `protocol` error to the node; anything else a node may not send does too;
//! - a session silent for [`LINK_IDLE_TIMEOUT`] of time this process was running ends
//!   (`stall::Silence`).

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::frame::{Control, ErrorCode, Frame, FrameError, ServiceRequest};
use crate::grid::Certificate;
use crate::identity::NodeId;
use crate::limits::LINK_IDLE_TIMEOUT;
use crate::stall::{Silence, StallClock};

/// How long a node has, once its session stream is open, to send its first message.
pub const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a server offers on its node sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offers {
    /// Public ports and the relaying of overlay packets (a relay).
    pub relaying: bool,
    /// Path records and punch coordination (`publish`, `lookup`, `punch`).
    pub rendezvous: bool,
}

impl Offers {
    /// What a relay offers, with or without its embedded rendezvous.
    pub fn relay(rendezvous: bool) -> Self {
        Offers {
            relaying: true,
            rendezvous,
        }
    }

    /// What the standalone rendezvous offers.
    pub const RENDEZVOUS: Offers = Offers {
        relaying: false,
        rendezvous: true,
    };
}

/// What happened on the session.
#[derive(Debug)]
pub enum Event {
    /// A frame arrived on the session stream (or an overlay packet as a datagram).
    Frame(Frame),
    /// The session stream carried bytes that are not a frame; the text says how.
    Garbage(String),
    /// The session stream or the link under it ended; the text says how.
    Closed(String),
}

impl Event {
    /// What one read from the session stream means.
    pub fn from_read(next: Option<Result<Frame, FrameError>>) -> Event {
        match next {
            Some(Ok(frame)) => Event::Frame(frame),
            Some(Err(FrameError::Io(e))) => Event::Closed(format!("connection lost: {e}")),
            Some(Err(e)) => Event::Garbage(e.to_string()),
            None => Event::Closed("session stream closed".into()),
        }
    }
}

/// Why a session ended, for the log and the `session_errors` metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    /// For the log line "node … disconnected: {reason}".
    pub reason: String,
    /// The last word to the node, sent before the link closes.
    pub tell_node: Option<Control>,
    /// The `session_errors` label this ending counts under, if it is an error.
    pub counted_as: Option<SessionError>,
}

impl Ending {
    /// An ending that is no error and leaves nothing to say to the node.
    pub fn quiet(reason: impl Into<String>) -> Self {
        Ending {
            reason: reason.into(),
            tell_node: None,
            counted_as: None,
        }
    }
}

/// The kinds of session error a server counts (`session_errors{kind}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionError {
    /// The node broke the protocol.
    Protocol,
    /// The node sent nothing for [`LINK_IDLE_TIMEOUT`].
    Idle,
    /// A newer session with the same node key took over.
    Replaced,
}

impl SessionError {
    pub const ALL: [SessionError; 3] = [Self::Protocol, Self::Idle, Self::Replaced];

    pub fn label(self) -> &'static str {
        match self {
            Self::Protocol => "protocol",
            Self::Idle => "idle",
            Self::Replaced => "replaced",
        }
    }
}

/// What the driver does when its timer fired.
#[derive(Debug, PartialEq, Eq)]
pub enum Timer {
    /// Arm it again for this instant.
    Rearm(Instant),
    /// The session is over.
    End(Ending),
}

/// What the driver must do.
#[derive(Debug)]
pub enum Effect {
    /// The first message was `register`: decide whether the node is admitted, then
    /// call [`NodeSession::admitted`] and answer with its registration, or end.
    Admit {
        services: Vec<ServiceRequest>,
        certificate: Option<Box<Certificate>>,
        /// The node moves here from its other link (`Control::Register::upgrade`).
        upgrade: bool,
    },
    /// The first message was `join`: redeem the invite, answer, and hang up.
    Join { invite: String },
    /// An admitted node registered again (its services changed): check it is still
    /// the node's current session and still admitted, and answer.
    Reregister {
        services: Vec<ServiceRequest>,
        certificate: Option<Box<Certificate>>,
    },
    /// Send this to the node.
    Send(Control),
    /// An overlay packet for `peer`.
    Forward { peer: NodeId, data: Bytes },
    /// A rendezvous request, for the rendezvous to answer.
    Rendezvous(Control),
    /// `who_owns` on a relay: answer with `owner` (only the relay knows its ports and
    /// whether the node may ask).
    WhoOwns { host: String, port: u16 },
    /// `locate` on a relay: answer with `located` (only a relay knows its fleet).
    Locate { node: NodeId },
    /// The session is over: log, count, tell the node, close.
    End(Ending),
}

/// What a server tells a node's older session when a newer one with the same key
/// arrives from `remote`. `server` is "relay" or "rendezvous".
pub fn replaced_notice(node: NodeId, remote: std::net::SocketAddr, server: &str) -> Control {
    Control::Error {
        code: ErrorCode::Replaced,
        message: format!(
            "another connection with node key {node} reached the {server} (from {remote}); only one process may use a node key — use `ferry-shim run --config` to expose and connect from one process"
        ),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for `register` or `join` until the deadline.
    First {
        deadline: Instant,
    },
    Serving,
    Ended,
}

/// One node's session on a relay or rendezvous.
#[derive(Debug)]
pub struct NodeSession {
    offers: Offers,
    phase: Phase,
    silence: Silence,
}

impl NodeSession {
    /// A session whose stream opened at `now`.
    pub fn new(offers: Offers, now: Instant) -> Self {
        NodeSession {
            offers,
            phase: Phase::First {
                deadline: now + FIRST_MESSAGE_TIMEOUT,
            },
            silence: Silence::new(LINK_IDLE_TIMEOUT, now),
        }
    }

    /// The driver admitted the node at `now` (after [`Effect::Admit`]).
    pub fn admitted(&mut self, now: Instant) {
        if let Phase::First { .. } = self.phase {
            self.phase = Phase::Serving;
            self.silence.heard(now);
        }
    }

    /// True once the node has been admitted and the session has not ended.
    pub fn is_serving(&self) -> bool {
        self.phase == Phase::Serving
    }

    /// When the driver's timer must first fire (at the start, and once admitted);
    /// after that, each [`Timer::Rearm`] says when.
    pub fn timeout(&self) -> Instant {
        match self.phase {
            Phase::First { deadline } => deadline,
            Phase::Serving | Phase::Ended => self.silence.deadline(),
        }
    }

    /// The timer fired at `now`; `stalls` says when this process did not run. Frames
    /// only note the time, so the timer is moved here: to where the last frame or a
    /// stall pushed the deadline, or the session ends.
    pub fn on_timeout(&mut self, now: Instant, stalls: &StallClock) -> Timer {
        match self.phase {
            Phase::First { deadline } if now >= deadline => {
                Timer::End(self.end(Ending::quiet("no registration")))
            }
            Phase::First { .. } | Phase::Ended => Timer::Rearm(self.timeout()),
            Phase::Serving => match self.silence.recheck_at(now, stalls) {
                Some(again) => Timer::Rearm(again),
                None => Timer::End(self.end(Ending {
                    reason: format!("silent for {} s", LINK_IDLE_TIMEOUT.as_secs()),
                    tell_node: None,
                    counted_as: Some(SessionError::Idle),
                })),
            },
        }
    }

    /// [`NodeSession::on_timeout`] now, against this process's stalls.
    pub fn timer_fired(&mut self) -> Timer {
        self.on_timeout(Instant::now(), &crate::stall::stalls())
    }

    /// Something happened on the session at `now`.
    pub fn handle(&mut self, event: Event, now: Instant) -> Option<Effect> {
        match self.phase {
            Phase::Ended => None,
            Phase::First { .. } => self.first(event),
            Phase::Serving => {
                self.silence.heard(now);
                self.serving(event)
            }
        }
    }

    fn first(&mut self, event: Event) -> Option<Effect> {
        let protocol_error = |message: String| Ending {
            reason: format!("protocol error: {message}"),
            tell_node: Some(Control::Error {
                code: ErrorCode::Protocol,
                message,
            }),
            counted_as: Some(SessionError::Protocol),
        };
        let effect = match event {
            Event::Frame(Frame::Control(Control::Register {
                services,
                certificate,
                upgrade,
            })) => {
                return Some(Effect::Admit {
                    services,
                    certificate,
                    upgrade,
                });
            }
            Event::Frame(Frame::Control(Control::Join { invite })) if self.offers.relaying => {
                self.phase = Phase::Ended;
                return Some(Effect::Join { invite });
            }
            Event::Garbage(message) => protocol_error(message),
            Event::Closed(_) => Ending::quiet("no registration"),
            Event::Frame(Frame::Packet { .. }) => protocol_error(format!(
                "the first message of a session must be {}, not an overlay packet",
                self.first_messages()
            )),
            Event::Frame(Frame::Control(c)) => protocol_error(format!(
                "the first message of a session must be {}, not {c:?}",
                self.first_messages()
            )),
        };
        Some(Effect::End(self.end(effect)))
    }

    fn first_messages(&self) -> &'static str {
        if self.offers.relaying {
            "register or join"
        } else {
            "register"
        }
    }

    fn serving(&mut self, event: Event) -> Option<Effect> {
        let refuse = |message: String| Ending {
            reason: message.clone(),
            tell_node: Some(Control::Error {
                code: ErrorCode::Protocol,
                message,
            }),
            counted_as: Some(SessionError::Protocol),
        };
        let ending = match event {
            Event::Frame(Frame::Packet { peer, data }) if self.offers.relaying => {
                return Some(Effect::Forward { peer, data });
            }
            Event::Frame(Frame::Packet { .. }) => refuse(
                "this is a rendezvous, not a relay: it does not accept an overlay packet".into(),
            ),
            Event::Frame(Frame::Control(msg)) => match msg {
                Control::Ping { nonce } => return Some(Effect::Send(Control::Pong { nonce })),
                Control::Pong { .. } => return None,
                // A session already admitted moves nowhere: `upgrade` counts only
                // in the first message.
                Control::Register {
                    services,
                    certificate,
                    upgrade: _,
                } => {
                    return Some(Effect::Reregister {
                        services,
                        certificate,
                    });
                }
                Control::WhoOwns { host, port } if self.offers.relaying => {
                    return Some(Effect::WhoOwns { host, port });
                }
                Control::Locate { node_id } if self.offers.relaying => {
                    return Some(Effect::Locate { node: node_id });
                }
                msg if msg.is_rendezvous_request() && self.offers.rendezvous => {
                    return Some(Effect::Rendezvous(msg));
                }
                Control::Error { code, message } => {
                    Ending::quiet(format!("node reported {code:?}: {message}"))
                }
                other => refuse(format!("unexpected message from a node: {other:?}")),
            },
            Event::Garbage(message) => Ending {
                reason: format!("protocol error: {message}"),
                tell_node: Some(Control::Error {
                    code: ErrorCode::Protocol,
                    message,
                }),
                counted_as: Some(SessionError::Protocol),
            },
            Event::Closed(reason) => Ending::quiet(reason),
        };
        Some(Effect::End(self.end(ending)))
    }

    /// The driver ends the session for a reason of its own (replaced, refused by the
    /// policy, its writer gone).
    pub fn end(&mut self, ending: Ending) -> Ending {
        self.phase = Phase::Ended;
        ending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SecretKey;

    const S: Duration = Duration::from_secs(1);

    fn control(c: Control) -> Event {
        Event::Frame(Frame::Control(c))
    }

    fn register() -> Event {
        control(Control::Register {
            services: vec![ServiceRequest {
                name: "web".into(),
                public: true,
            }],
            certificate: None,
            upgrade: false,
        })
    }

    /// A clock that ticked every second from `t` to `t + n` s.
    fn ticking(t: Instant, n: u32) -> StallClock {
        let mut c = StallClock::default();
        for i in 0..=n {
            c.tick(t + i * S);
        }
        c
    }

    fn serving(offers: Offers, t: Instant) -> NodeSession {
        let mut s = NodeSession::new(offers, t);
        assert!(matches!(
            s.handle(register(), t),
            Some(Effect::Admit { .. })
        ));
        s.admitted(t);
        assert!(s.is_serving());
        s
    }

    fn ended(effect: Option<Effect>) -> Ending {
        match effect {
            Some(Effect::End(e)) => e,
            other => panic!("expected the session to end: {other:?}"),
        }
    }

    impl Timer {
        fn ended(self, why: &str) -> Ending {
            match self {
                Timer::End(e) => e,
                Timer::Rearm(at) => panic!("expected the end ({why}), got a re-arm for {at:?}"),
            }
        }
    }

    fn told_protocol_error(ending: &Ending) -> &str {
        match &ending.tell_node {
            Some(Control::Error {
                code: ErrorCode::Protocol,
                message,
            }) => message,
            other => panic!("expected a protocol error to the node: {other:?}"),
        }
    }

    #[test]
    fn register_first_is_put_to_the_driver_with_its_services() {
        let t = Instant::now();
        let mut s = NodeSession::new(Offers::relay(true), t);
        match s.handle(register(), t) {
            Some(Effect::Admit { services, .. }) => assert_eq!(services[0].name, "web"),
            other => panic!("{other:?}"),
        }
        assert!(!s.is_serving(), "not serving until the driver admits");
    }

    #[test]
    fn nothing_but_register_or_join_is_served_first() {
        let t = Instant::now();
        for offers in [Offers::relay(true), Offers::RENDEZVOUS] {
            let mut s = NodeSession::new(offers, t);
            let e = ended(s.handle(control(Control::Ping { nonce: 1 }), t));
            assert!(
                told_protocol_error(&e).starts_with("the first message of a session must be"),
                "{e:?}"
            );
            assert_eq!(e.counted_as, Some(SessionError::Protocol));
            // Nothing more is served once it ended.
            assert!(s.handle(register(), t).is_none());

            let mut s = NodeSession::new(offers, t);
            let packet = Event::Frame(Frame::Packet {
                peer: SecretKey::generate().node_id(),
                data: Bytes::from_static(b"x"),
            });
            let e = ended(s.handle(packet, t));
            assert!(told_protocol_error(&e).ends_with("not an overlay packet"));
        }
    }

    #[test]
    fn join_is_redeemed_on_a_relay_and_refused_on_a_rendezvous() {
        let t = Instant::now();
        let invite = || {
            control(Control::Join {
                invite: "secret".into(),
            })
        };
        let mut relay = NodeSession::new(Offers::relay(false), t);
        assert!(matches!(
            relay.handle(invite(), t),
            Some(Effect::Join { .. })
        ));
        assert!(relay.handle(register(), t).is_none(), "join hangs up");
        let mut rendezvous = NodeSession::new(Offers::RENDEZVOUS, t);
        let e = ended(rendezvous.handle(invite(), t));
        assert!(
            told_protocol_error(&e).contains("must be register, not Join"),
            "{e:?}"
        );
    }

    #[test]
    fn garbage_first_is_a_protocol_error_and_silence_first_a_quiet_hang_up() {
        let t = Instant::now();
        let mut s = NodeSession::new(Offers::relay(true), t);
        let e = ended(s.handle(Event::Garbage("frame too large".into()), t));
        assert_eq!(told_protocol_error(&e), "frame too large");

        let mut s = NodeSession::new(Offers::relay(true), t);
        assert_eq!(s.timeout(), t + FIRST_MESSAGE_TIMEOUT);
        assert_eq!(
            s.on_timeout(t + 9 * S, &ticking(t, 9)),
            Timer::Rearm(t + FIRST_MESSAGE_TIMEOUT)
        );
        let e = s
            .on_timeout(t + FIRST_MESSAGE_TIMEOUT, &ticking(t, 10))
            .ended("no first message in time");
        assert_eq!((e.tell_node, e.counted_as), (None, None));
    }

    #[test]
    fn pings_are_answered_and_pongs_ignored() {
        let t = Instant::now();
        let mut s = serving(Offers::RENDEZVOUS, t);
        assert!(matches!(
            s.handle(control(Control::Ping { nonce: 7 }), t),
            Some(Effect::Send(Control::Pong { nonce: 7 }))
        ));
        assert!(s.handle(control(Control::Pong { nonce: 7 }), t).is_none());
        assert!(s.is_serving());
    }

    #[test]
    fn packets_are_forwarded_by_a_relay_and_end_a_rendezvous_session() {
        let t = Instant::now();
        let peer = SecretKey::generate().node_id();
        let packet = || {
            Event::Frame(Frame::Packet {
                peer,
                data: Bytes::from_static(b"hello"),
            })
        };
        let mut relay = serving(Offers::relay(false), t);
        match relay.handle(packet(), t) {
            Some(Effect::Forward { peer: to, data }) => {
                assert_eq!((to, &data[..]), (peer, &b"hello"[..]))
            }
            other => panic!("{other:?}"),
        }
        let mut rendezvous = serving(Offers::RENDEZVOUS, t);
        let e = ended(rendezvous.handle(packet(), t));
        assert!(told_protocol_error(&e).contains("not a relay"));
    }

    #[test]
    fn rendezvous_requests_go_where_a_rendezvous_runs() {
        let t = Instant::now();
        let lookup = || {
            control(Control::Lookup {
                node_id: SecretKey::generate().node_id(),
            })
        };
        let mut with = serving(Offers::relay(true), t);
        assert!(matches!(
            with.handle(lookup(), t),
            Some(Effect::Rendezvous(Control::Lookup { .. }))
        ));
        let mut without = serving(Offers::relay(false), t);
        let e = ended(without.handle(lookup(), t));
        assert!(told_protocol_error(&e).starts_with("unexpected message from a node: Lookup"));
    }

    #[test]
    fn who_owns_is_put_to_a_relay_and_ends_a_rendezvous_session() {
        let t = Instant::now();
        let ask = || {
            control(Control::WhoOwns {
                host: "relay.example".into(),
                port: 23100,
            })
        };
        let mut relay = serving(Offers::relay(true), t);
        assert!(matches!(
            relay.handle(ask(), t),
            Some(Effect::WhoOwns { port: 23100, .. })
        ));
        assert!(relay.is_serving());
        let mut rendezvous = serving(Offers::RENDEZVOUS, t);
        let ending = ended(rendezvous.handle(ask(), t));
        assert!(
            told_protocol_error(&ending).contains("unexpected message"),
            "{ending:?}"
        );
    }

    #[test]
    fn a_second_register_is_put_to_the_driver() {
        let t = Instant::now();
        let mut s = serving(Offers::relay(true), t);
        assert!(matches!(
            s.handle(register(), t),
            Some(Effect::Reregister { .. })
        ));
        assert!(s.is_serving());
    }

    #[test]
    fn a_node_error_or_a_closed_stream_ends_the_session_without_a_word() {
        let t = Instant::now();
        let mut s = serving(Offers::relay(true), t);
        let e = ended(s.handle(
            control(Control::Error {
                code: ErrorCode::Replaced,
                message: "bye".into(),
            }),
            t,
        ));
        assert_eq!(e.reason, "node reported Replaced: bye");
        assert_eq!((e.tell_node, e.counted_as), (None, None));

        let mut s = serving(Offers::relay(true), t);
        let e = ended(s.handle(Event::Closed("link closed".into()), t));
        assert_eq!(e.reason, "link closed");
        assert_eq!(e.tell_node, None);
    }

    #[test]
    fn messages_a_node_may_not_send_are_protocol_errors() {
        let t = Instant::now();
        let mut s = serving(Offers::relay(true), t);
        let e = ended(
            s.handle(control(Control::Pong { nonce: 1 }), t)
                .or_else(|| {
                    s.handle(
                        control(Control::PunchFailed {
                            peer: SecretKey::generate().node_id(),
                            reason: "x".into(),
                        }),
                        t,
                    )
                }),
        );
        assert!(told_protocol_error(&e).starts_with("unexpected message from a node: PunchFailed"));
        assert_eq!(e.counted_as, Some(SessionError::Protocol));
    }

    #[test]
    fn silence_ends_a_session_but_a_frozen_host_does_not() {
        let t = Instant::now();
        let mut s = serving(Offers::relay(true), t);
        s.handle(control(Control::Ping { nonce: 1 }), t + 5 * S);
        assert_eq!(s.timeout(), t + 65 * S);
        // The whole host froze from 10 s to 110 s: only 5 s of awake silence.
        let mut frozen = ticking(t, 9);
        frozen.tick(t + 110 * S);
        assert_eq!(
            s.on_timeout(t + 110 * S, &frozen),
            Timer::Rearm(t + 165 * S)
        );
        // Then real silence.
        for i in 111..=165 {
            frozen.tick(t + i * S);
        }
        let e = s
            .on_timeout(t + 165 * S, &frozen)
            .ended("60 s awake silence");
        assert_eq!(e.counted_as, Some(SessionError::Idle));
        assert_eq!(e.reason, "silent for 60 s");
    }
}
