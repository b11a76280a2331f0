//! The shim's Prometheus metrics, in a registry owned by the shim. Labels take only
//! fixed values (no per-peer or per-service labels).

use ferry_proto::admin::SETUP_SECONDS_BUCKETS;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

pub struct Metrics {
    pub registry: Registry,
    pub relays_connected: IntGauge,
    pub relay_connects: IntCounterVec,
    pub bytes: IntCounterVec,
    pub streams: IntCounterVec,
    pub stream_setup_seconds: HistogramVec,
    pub relay_failovers: IntCounterVec,
    pub relay_upgrades: IntCounterVec,
}

impl Metrics {
    pub fn new(socket: &crate::path_socket::PathSocket) -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        registry.register(Box::new(socket.dropped.clone()))?;
        registry.register(Box::new(socket.bytes.clone()))?;
        let relays_connected = IntGauge::new(
            "ferry_shim_relays_connected",
            "Relays this shim currently holds a registered session with",
        )?;
        let relay_connects = IntCounterVec::new(
            Opts::new(
                "ferry_shim_relay_connects_total",
                "Relay connection attempts by transport (quic, tcp, none) and outcome (ok, failed)",
            ),
            &["transport", "outcome"],
        )?;
        let bytes = IntCounterVec::new(
            Opts::new(
                "ferry_shim_bytes_total",
                "Bytes carried for local services and forwards, by direction (in, out) and path (public, overlay)",
            ),
            &["direction", "path"],
        )?;
        let streams = IntCounterVec::new(
            Opts::new(
                "ferry_shim_streams_total",
                "Streams handled, by kind (public, overlay_in, overlay_out, socks) and outcome (ok, refused, failed, bad_request)",
            ),
            &["kind", "outcome"],
        )?;
        let stream_setup_seconds = HistogramVec::new(
            HistogramOpts::new(
                "ferry_shim_stream_setup_seconds",
                "Time to set up a stream, by kind: public (relay's request to the local service connected), overlay_out (local client accepted to the remote node's answer, including any connection to it)",
            )
            .buckets(SETUP_SECONDS_BUCKETS.to_vec()),
            &["kind"],
        )?;
        let relay_failovers = IntCounterVec::new(
            Opts::new(
                "ferry_shim_relay_failovers_total",
                "Relayed overlay traffic moved off a relay that is still connected, by reason (going_away: it drains; unresponsive: it stopped answering)",
            ),
            &["reason"],
        )?;
        for reason in ["going_away", "unresponsive"] {
            relay_failovers.with_label_values(&[reason]);
        }
        registry.register(Box::new(relay_failovers.clone()))?;
        let relay_upgrades = IntCounterVec::new(
            Opts::new(
                "ferry_shim_relay_upgrades_total",
                "Tries to move a relay link that fell back to TLS/TCP onto QUIC, by outcome (moved; unreachable: no QUIC link to the relay yet; refused: the relay said no; half_done: no answer, so the session reconnected)",
            ),
            &["outcome"],
        )?;
        for outcome in ["moved", "unreachable", "refused", "half_done"] {
            relay_upgrades.with_label_values(&[outcome]);
        }
        registry.register(Box::new(relay_upgrades.clone()))?;
        registry.register(Box::new(stream_setup_seconds.clone()))?;
        registry.register(Box::new(relays_connected.clone()))?;
        registry.register(Box::new(relay_connects.clone()))?;
        registry.register(Box::new(bytes.clone()))?;
        registry.register(Box::new(streams.clone()))?;
        Ok(Metrics {
            registry,
            relays_connected,
            relay_connects,
            bytes,
            streams,
            stream_setup_seconds,
            relay_failovers,
            relay_upgrades,
        })
    }
}
