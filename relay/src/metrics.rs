//! The relay's Prometheus metrics. All live in one registry owned by the relay (not the
//! process-global one) so several relays can run in one test process. No label takes
//! per-node values: label sets stay bounded however many nodes connect. The embedded
//! rendezvous registers its `ferry_rendezvous_*` metrics in the same registry (see
//! `ferry_rendezvous::stun_service`), so the relay's one `/metrics` shows both.

use ferry_proto::admin::SETUP_SECONDS_BUCKETS;
use ferry_rendezvous::fleet::FleetOps;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

/// A limit the relay enforces (SPEC §6), as `ferry_relay_limit_hits_total` labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// A node asked for more public ports than `max_public_ports_per_node`.
    PublicPorts,
    /// Handshakes in progress at once.
    Handshakes,
    /// Handshakes per second from one address.
    HandshakeRate,
    /// Public-port connections per second from one address.
    ConnectionRate,
    /// Nodes with a session at once (`max_nodes`).
    Nodes,
    /// Public-port connections one node has open at once.
    Streams,
    /// A node's bytes per second (public streams wait, overlay packets are dropped).
    Bytes,
}

impl Limit {
    pub const ALL: [Limit; 7] = [
        Self::PublicPorts,
        Self::Handshakes,
        Self::HandshakeRate,
        Self::ConnectionRate,
        Self::Nodes,
        Self::Streams,
        Self::Bytes,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::PublicPorts => "public_ports",
            Self::Handshakes => "handshakes",
            Self::HandshakeRate => "handshake_rate",
            Self::ConnectionRate => "connection_rate",
            Self::Nodes => "nodes",
            Self::Streams => "streams",
            Self::Bytes => "bytes",
        }
    }
}

/// Why an overlay packet went no further, as `ferry_relay_overlay_packets_dropped_total`
/// labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketDrop {
    /// No node with that ID has a session here.
    UnknownDestination,
    /// The destination's session queue was full, or its link closed.
    QueueFull,
    /// The relay's UDP send buffer was full.
    SendBufferFull,
    /// A relay-channel packet with an unknown token, from the wrong address, or
    /// malformed.
    BadChannel,
}

impl PacketDrop {
    pub const ALL: [PacketDrop; 4] = [
        Self::UnknownDestination,
        Self::QueueFull,
        Self::SendBufferFull,
        Self::BadChannel,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::UnknownDestination => "unknown_destination",
            Self::QueueFull => "queue_full",
            Self::SendBufferFull => "send_buffer_full",
            Self::BadChannel => "bad_channel",
        }
    }
}

pub struct Metrics {
    pub registry: Registry,
    pub nodes_connected: IntGauge,
    /// The fleet link: up, operations and their latency (none without `--fleet`
    /// but `ferry_relay_fleet_up` at 0).
    pub fleet: FleetOps,
    pub public_ports_bound: IntGauge,
    pub streams_active: IntGauge,
    /// Tokio tasks alive in the process (see [`Metrics::track_tasks`]).
    pub tasks: IntGauge,
    pub bytes: IntCounterVec,
    pub handshakes: IntCounterVec,
    pub public_connections: IntCounterVec,
    pub packets_dropped: IntCounterVec,
    pub packets_forwarded: IntCounterVec,
    pub session_errors: IntCounterVec,
    pub link_upgrades: IntCounterVec,
    pub refusals: IntCounterVec,
    pub limit_hits: IntCounterVec,
    pub joins: IntCounterVec,
    pub handshake_seconds: HistogramVec,
    pub stream_setup_seconds: Histogram,
    /// Children of the vectors above touched once per overlay packet, looked up once
    /// (a label lookup hashes the labels: about 1% of a busy relay's CPU).
    pub overlay: OverlayCounters,
}

pub struct OverlayCounters {
    pub bytes_from_node: IntCounter,
    pub bytes_to_node: IntCounter,
    pub by_channel: IntCounter,
    pub by_datagram: IntCounter,
    pub by_stream: IntCounter,
}

impl Metrics {
    /// Counts one request refused or slowed by `limit`.
    pub fn limit_hit(&self, limit: Limit) {
        self.limit_hits.with_label_values(&[limit.label()]).inc();
    }

    /// Counts `packets` overlay packets dropped for `why`.
    pub fn count_dropped(&self, why: PacketDrop, packets: u64) {
        self.packets_dropped
            .with_label_values(&[why.label()])
            .inc_by(packets);
    }

    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let nodes_connected = IntGauge::new(
            "ferry_relay_nodes_connected",
            "Nodes with a live session on this relay",
        )?;
        let public_ports_bound = IntGauge::new(
            "ferry_relay_public_ports_bound",
            "Public TCP ports currently listening for a connected node",
        )?;
        let streams_active = IntGauge::new(
            "ferry_relay_streams_active",
            "Public-port connections currently spliced to a node",
        )?;
        let tasks = IntGauge::new(
            "ferry_relay_tasks",
            "Tasks alive in the relay process; after nodes leave it returns to where it was, \
             so a rise that never comes back is a leak",
        )?;
        let bytes = IntCounterVec::new(
            Opts::new(
                "ferry_relay_bytes_total",
                "Bytes forwarded, by direction (to_node, from_node) and path (public, overlay)",
            ),
            &["direction", "path"],
        )?;
        let handshakes = IntCounterVec::new(
            Opts::new(
                "ferry_relay_handshakes_total",
                "Node handshakes by transport (quic, tcp) and outcome (ok, failed, refused: too many in progress)",
            ),
            &["transport", "outcome"],
        )?;
        let public_connections = IntCounterVec::new(
            Opts::new(
                "ferry_relay_public_connections_total",
                "Connections accepted on public ports, by outcome (spliced: the node connected its service; not_accepted: the node closed the stream without; node_offline; open_failed)",
            ),
            &["outcome"],
        )?;
        let packets_dropped = IntCounterVec::new(
            Opts::new(
                "ferry_relay_overlay_packets_dropped_total",
                "Overlay packets dropped, by reason (unknown_destination; queue_full: the destination's session queue was full or its link closed; send_buffer_full: the relay's UDP send buffer was full; bad_channel: a relay-channel packet with an unknown token, from the wrong address, or malformed)",
            ),
            &["reason"],
        )?;
        for drop in PacketDrop::ALL {
            packets_dropped.with_label_values(&[drop.label()]);
        }
        let packets_forwarded = IntCounterVec::new(
            Opts::new(
                "ferry_relay_overlay_packets_forwarded_total",
                "Overlay packets forwarded to their destination node, by carrier (channel: plain UDP on its relay channel; datagram: a QUIC DATAGRAM on its link; stream: a frame on its session stream, for packets too large for the link's datagrams)",
            ),
            &["carrier"],
        )?;
        for carrier in ["channel", "datagram", "stream"] {
            packets_forwarded.with_label_values(&[carrier]);
        }
        let session_errors = IntCounterVec::new(
            Opts::new(
                "ferry_relay_session_errors_total",
                "Sessions ended by an error, by kind (protocol, idle, replaced)",
            ),
            &["kind"],
        )?;
        for kind in ferry_proto::node_session::SessionError::ALL {
            session_errors.with_label_values(&[kind.label()]);
        }
        let link_upgrades = IntCounterVec::new(
            Opts::new(
                "ferry_relay_link_upgrades_total",
                "Nodes that moved their session to a new link without dropping the old one's public connections, by the transports moved from and to (a link that fell back to TLS/TCP moving to QUIC: from=tcp, to=quic)",
            ),
            &["from", "to"],
        )?;
        link_upgrades.with_label_values(&["tcp", "quic"]);
        let refusals = IntCounterVec::new(
            Opts::new(
                "ferry_relay_refusals_total",
                "Nodes refused by the access policy, at registration or on a live session, by reason (denied, revoked, not_listed, not_a_member, unknown_issuer, expired, bad_certificate)",
            ),
            &["reason"],
        )?;
        for reason in crate::policy::Refusal::REASONS {
            refusals.with_label_values(&[reason]);
        }
        let limit_hits = IntCounterVec::new(
            Opts::new(
                "ferry_relay_limit_hits_total",
                "Requests refused or slowed by a limit, by limit (public_ports, handshakes, handshake_rate, connection_rate, nodes, streams, bytes: waits of a public stream or overlay packets dropped over a node's byte rate)",
            ),
            &["limit"],
        )?;
        for limit in Limit::ALL {
            limit_hits.with_label_values(&[limit.label()]);
        }
        let joins = IntCounterVec::new(
            Opts::new(
                "ferry_relay_joins_total",
                "Invite redemptions, by outcome (joined, unknown, expired, used_up, not_grid, unavailable: a fleet relay cut off from its engine)",
            ),
            &["outcome"],
        )?;
        for outcome in [
            "joined",
            "unknown",
            "expired",
            "used_up",
            "not_grid",
            "unavailable",
        ] {
            joins.with_label_values(&[outcome]);
        }
        // Handshakes cross the Internet (one to three round trips plus key checks);
        // stream setup adds the node's connect to its local service.
        let handshake_seconds = HistogramVec::new(
            HistogramOpts::new(
                "ferry_relay_handshake_seconds",
                "Time from a node's first packet (QUIC) or TCP accept to an established, authenticated link, by transport (quic, tcp); successful handshakes only",
            )
            .buckets(SETUP_SECONDS_BUCKETS.to_vec()),
            &["transport"],
        )?;
        let stream_setup_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "ferry_relay_stream_setup_seconds",
                "Time from accepting a public-port connection to the node reporting its local service connected",
            )
            .buckets(SETUP_SECONDS_BUCKETS.to_vec()),
        )?;
        registry.register(Box::new(handshake_seconds.clone()))?;
        registry.register(Box::new(stream_setup_seconds.clone()))?;
        registry.register(Box::new(refusals.clone()))?;
        registry.register(Box::new(limit_hits.clone()))?;
        registry.register(Box::new(joins.clone()))?;
        registry.register(Box::new(nodes_connected.clone()))?;
        let fleet = FleetOps::new(&registry, "ferry_relay", crate::fleet::OPERATIONS)?;
        registry.register(Box::new(public_ports_bound.clone()))?;
        registry.register(Box::new(streams_active.clone()))?;
        registry.register(Box::new(tasks.clone()))?;
        registry.register(Box::new(bytes.clone()))?;
        registry.register(Box::new(handshakes.clone()))?;
        registry.register(Box::new(public_connections.clone()))?;
        registry.register(Box::new(packets_dropped.clone()))?;
        registry.register(Box::new(packets_forwarded.clone()))?;
        registry.register(Box::new(session_errors.clone()))?;
        registry.register(Box::new(link_upgrades.clone()))?;
        let overlay = OverlayCounters {
            bytes_from_node: bytes.with_label_values(&["from_node", "overlay"]),
            bytes_to_node: bytes.with_label_values(&["to_node", "overlay"]),
            by_channel: packets_forwarded.with_label_values(&["channel"]),
            by_datagram: packets_forwarded.with_label_values(&["datagram"]),
            by_stream: packets_forwarded.with_label_values(&["stream"]),
        };
        Ok(Metrics {
            overlay,
            registry,
            nodes_connected,
            fleet,
            public_ports_bound,
            streams_active,
            tasks,
            bytes,
            handshakes,
            public_connections,
            packets_dropped,
            packets_forwarded,
            session_errors,
            link_upgrades,
            refusals,
            limit_hits,
            joins,
            handshake_seconds,
            stream_setup_seconds,
        })
    }

    /// Keeps `ferry_relay_tasks` current (every second) until the runtime stops.
    pub fn track_tasks(&self) {
        let tasks = self.tasks.clone();
        tokio::spawn(async move {
            let runtime = tokio::runtime::Handle::current();
            loop {
                tasks.set(runtime.metrics().num_alive_tasks() as i64);
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        });
    }
}
