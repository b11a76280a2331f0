//! Every size limit and timeout shared by the relay and the shim, each with the reason
//! for its value. Program-specific limits live next to the code that enforces them.

use std::time::Duration;

/// Largest control message (JSON) on a relay session. Registrations of a few dozen
/// services fit in a few KiB; anything larger is a broken or hostile peer.
pub const MAX_CONTROL_FRAME: usize = 64 * 1024;

/// Largest overlay packet the relay forwards. A QUIC packet never exceeds a UDP
/// payload (65,527 bytes), so this is the natural ceiling.
pub const MAX_PACKET: usize = 65_527;

/// Largest stream header (service name and addresses, JSON) at the start of a stream.
pub const MAX_STREAM_HEADER: usize = 4 * 1024;

/// How often each side of a relay link proves it is alive. Home NATs drop idle UDP
/// mappings after 30 s or more; 15 s keeps the mapping and the relay's view fresh.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);

/// How often a node sends a QUIC keepalive on its relay link when nothing else went
/// out: inside the 30 s that the shortest-lived home NAT mappings last. (The session
/// ping every [`KEEPALIVE_INTERVAL`] usually comes first.) It used to be 3 s, so that a
/// relay that crashed and came back answered the next keepalive with a stateless
/// reset within seconds; at 100,000 idle nodes that was 33,000 packets a second for
/// the relay to answer. A restarted relay now tells its last run's nodes itself
/// (`ferry_proto::channel::restart_notice`), and they are back within a round trip.
pub const RELAY_QUIC_KEEPALIVE: Duration = Duration::from_secs(25);

/// How long a relay session or an end-to-end connection may stay silent before it is
/// closed: four missed session pings or overlay keepalives, so a lossy home uplink
/// keeps its sessions. Only time the program was
/// running counts (`stall::Silence`): a host frozen for a while keeps its links. A
/// crashed relay is noticed much sooner by `liveness` (about a second), which moves
/// traffic off it without closing the link.
pub const LINK_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a QUIC or TLS handshake to a relay may take before the attempt fails.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Buffer size for splicing one TCP stream into another. 64 KiB amortises system
/// calls on bulk transfers without holding much memory per idle stream.
pub const SPLICE_BUFFER: usize = 64 * 1024;
