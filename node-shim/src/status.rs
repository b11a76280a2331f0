//! The shim's status as one typed shape: `/api/status` serializes [`Status`], the web
//! panel (`crate::panel`) renders it, and `ferry-shim status` reads it back from the
//! admin listener and prints it ([`Status::to_text`]). A renamed or retyped field is
//! therefore a compile error in all three, not a column that silently shows `-`.
//!
//! The JSON names are a stable interface (SPEC §5): tests and scripts read them.
//! This module holds types only; `crate::state::Core::status` fills them in.

use std::fmt::Write as _;
use std::net::SocketAddr;

use ferry_proto::link::LinkKind;
use ferry_proto::{NodeId, RelayUrl};
use serde::{Deserialize, Serialize};

pub use crate::allow::PeerAccess;
use crate::mode::Mode;
use crate::path_manager::LocalView;
pub use crate::paths::PunchState;
use crate::portmap::MappingView;
pub use crate::relay_session::RelayState;

/// Everything `/api/status` says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub node_id: NodeId,
    pub mode: Mode,
    /// What the mode forbids, in words (empty in p2p mode).
    pub forbids: Vec<String>,
    /// The proxy relay connections go through, password hidden.
    pub proxy: Option<String>,
    /// Where the SOCKS door listens, when it runs.
    pub socks: Option<SocketAddr>,
    pub relays: Vec<RelayStatus>,
    pub services: Vec<ServiceStatus>,
    /// Open overlay connections, by node ID.
    pub peers: Vec<PeerStatus>,
    pub forwards: Vec<ForwardStatus>,
    pub network: NetworkStatus,
    /// The grids this node belongs to, as its relays describe them.
    pub grids: Vec<GridStatus>,
    /// Whether members of those grids may use this node's services (`allow_grid`).
    pub allow_grid: bool,
    /// The latest overlay refusals, either way, newest first.
    pub refusals: Vec<RefusalStatus>,
}

/// One grid this node belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GridStatus {
    /// The relay this node joined through.
    pub relay: NodeId,
    pub admins: Vec<NodeId>,
    pub revoked: Vec<NodeId>,
}

/// Which way an overlay refusal went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// This node refused the peer.
    Inbound,
    /// The peer refused this node.
    Outbound,
}

/// A peer refused on the overlay, or a peer that refused this node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefusalStatus {
    pub node_id: NodeId,
    pub direction: Direction,
    pub reason: String,
    /// Unix seconds.
    pub at: u64,
}

/// What a configured server is to this shim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelayRole {
    /// A relay (`--relay`): services, overlay traffic, and its embedded rendezvous.
    Relay,
    /// The standalone rendezvous (`--rendezvous`): records and punching only.
    Rendezvous,
    /// A relay of a fleet this node is not configured with, reached on demand for a
    /// peer that has a session only there (`crate::visits`); closed when idle.
    Visit,
}

impl RelayRole {
    pub fn name(self) -> &'static str {
        match self {
            RelayRole::Relay => "relay",
            RelayRole::Rendezvous => "rendezvous",
            RelayRole::Visit => "visit",
        }
    }
}

/// Status of one relay (or the standalone rendezvous).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayStatus {
    /// The session's index in the shim (not shown).
    #[serde(skip)]
    pub index: usize,
    pub url: RelayUrl,
    pub role: RelayRole,
    pub state: RelayState,
    pub transport: Option<LinkKind>,
    pub remote_addr: Option<SocketAddr>,
    /// This node's address as the relay sees it.
    pub observed_addr: Option<SocketAddr>,
    /// The fleet the relay belongs to, when it is in one.
    #[serde(default)]
    pub fleet: Option<String>,
    /// Times a link to this relay that fell back to TLS/TCP moved onto QUIC.
    #[serde(default)]
    pub moved_to_quic: u32,
    pub error: Option<String>,
}

impl RelayStatus {
    /// A relay session not connected yet.
    pub fn connecting(index: usize, url: RelayUrl, role: RelayRole) -> RelayStatus {
        RelayStatus {
            index,
            url,
            role,
            state: RelayState::Connecting,
            transport: None,
            remote_addr: None,
            observed_addr: None,
            fleet: None,
            moved_to_quic: 0,
            error: None,
        }
    }
}

/// One exposed service and its public port, if any.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub target: String,
    /// `host:port` stock clients use, once a relay granted a public port.
    pub public: Option<String>,
    pub error: Option<String>,
}

/// One local port forward (`connect`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForwardStatus {
    /// `node` or `node/service`.
    pub to: String,
    pub listen: SocketAddr,
}

/// How packets to an overlay peer travel right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathKind {
    /// Through a relay.
    Relayed,
    /// Straight to the peer's address (a punched or directly reachable path).
    Direct,
}

impl PathKind {
    pub fn name(self) -> &'static str {
        match self {
            PathKind::Relayed => "relayed",
            PathKind::Direct => "direct",
        }
    }
}

/// One open overlay connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub node_id: NodeId,
    pub path: PathKind,
    /// Address packets to this peer go to: the peer's own address when direct, the
    /// relay carrying them when relayed.
    pub remote_addr: Option<SocketAddr>,
    pub punch: PunchState,
    /// Why the peer is relayed, when there is a known reason.
    pub reason: Option<String>,
    pub rtt_ms: f64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// May this peer use this node's services, and why; `None` until decided.
    pub access: Option<PeerAccess>,
}

/// What this node knows of its own network: the path manager's view and the home
/// router's port mapping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkStatus {
    #[serde(flatten)]
    pub local: LocalView,
    pub port_mapping: Option<MappingView>,
}

impl Status {
    /// The plain-text lines `ferry-shim status` prints, one per relay, service, peer
    /// and forward.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; the results are ignored for that reason.
        let _ = writeln!(out, "node {}", self.node_id);
        if self.forbids.is_empty() {
            let _ = writeln!(out, "mode {}", self.mode.name());
        } else {
            let _ = writeln!(
                out,
                "mode {} (forbids: {})",
                self.mode.name(),
                self.forbids.join("; ")
            );
        }
        if let Some(proxy) = &self.proxy {
            let _ = writeln!(out, "proxy {proxy}");
        }
        for r in &self.relays {
            let mut transport = r.transport.map(|t| t.to_string()).unwrap_or_default();
            if r.moved_to_quic > 0 {
                transport.push_str(" (moved from tcp)");
            }
            let error = r
                .error
                .as_ref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default();
            let word = if r.role == RelayRole::Visit {
                "visit"
            } else {
                "relay"
            };
            let fleet = r
                .fleet
                .as_ref()
                .map(|f| format!(" fleet {f}"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "{word} {} {} {transport}{fleet}{error}",
                r.url,
                r.state.name()
            );
        }
        for s in &self.services {
            let _ = writeln!(
                out,
                "service {} -> {} public {}",
                s.name,
                s.target,
                s.public.as_deref().unwrap_or("none")
            );
        }
        for p in &self.peers {
            let via = p.remote_addr.map(|a| a.to_string());
            let reason = p
                .reason
                .as_ref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default();
            let access = p
                .access
                .as_ref()
                .map(|a| format!(" access {}", a.describe()))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "peer {} {} via {} rtt {:.1} ms sent {} received {} punch {}{reason}{access}",
                p.node_id,
                p.path.name(),
                via.as_deref().unwrap_or("-"),
                p.rtt_ms,
                p.bytes_sent,
                p.bytes_received,
                p.punch.name()
            );
        }
        for g in &self.grids {
            let _ = writeln!(
                out,
                "grid of relay {} admins {} revoked {}{}",
                g.relay,
                g.admins.len(),
                g.revoked.len(),
                if self.allow_grid {
                    " (members may use this node's services)"
                } else {
                    ""
                }
            );
        }
        for r in &self.refusals {
            let _ = match r.direction {
                Direction::Inbound => writeln!(out, "refused node {}: {}", r.node_id, r.reason),
                Direction::Outbound => {
                    writeln!(out, "refused by node {}: {}", r.node_id, r.reason)
                }
            };
        }
        for f in &self.forwards {
            let _ = writeln!(out, "forward {} -> {}", f.listen, f.to);
        }
        if let Some(socks) = self.socks {
            let _ = writeln!(out, "socks {socks}");
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::path_manager::{AddrSource, Candidate};
    use ferry_proto::SecretKey;

    /// A status with one of everything, for this module's and the panel's tests.
    pub(crate) fn sample() -> Status {
        let peer = SecretKey::generate().node_id();
        Status {
            node_id: SecretKey::generate().node_id(),
            mode: Mode::Strict,
            forbids: vec!["hole punching unless punch = true".to_string()],
            proxy: Some("socks5://alice:***@127.0.0.1:9050".to_string()),
            socks: Some("127.0.0.1:1080".parse().unwrap()),
            relays: vec![RelayStatus {
                index: 0,
                url: format!("ferry://{peer}@relay.example:4433")
                    .parse()
                    .unwrap(),
                role: RelayRole::Relay,
                state: RelayState::Connected,
                transport: Some(LinkKind::Quic),
                remote_addr: Some("192.0.2.1:4433".parse().unwrap()),
                observed_addr: Some("198.51.100.7:40000".parse().unwrap()),
                fleet: Some("ferry".to_string()),
                moved_to_quic: 1,
                error: None,
            }],
            services: vec![ServiceStatus {
                name: "storage".to_string(),
                target: "127.0.0.1:3456".to_string(),
                public: Some("relay.example:40123".to_string()),
                error: None,
            }],
            peers: vec![PeerStatus {
                node_id: peer,
                path: PathKind::Direct,
                remote_addr: Some("203.0.113.9:5000".parse().unwrap()),
                punch: PunchState::Direct,
                reason: None,
                rtt_ms: 12.3,
                bytes_sent: 2048,
                bytes_received: 4096,
                access: Some(PeerAccess::Listed),
            }],
            forwards: vec![ForwardStatus {
                to: format!("{peer}/storage"),
                listen: "127.0.0.1:7000".parse().unwrap(),
            }],
            network: NetworkStatus {
                local: LocalView {
                    udp_port: 5000,
                    candidates: vec![Candidate {
                        addr: "198.51.100.7:40000".parse().unwrap(),
                        sources: vec![AddrSource::Reflexive],
                    }],
                    ..LocalView::default()
                },
                port_mapping: None,
            },
            grids: vec![],
            allow_grid: false,
            refusals: vec![RefusalStatus {
                node_id: peer,
                direction: Direction::Outbound,
                reason: "not a member".to_string(),
                at: 1,
            }],
        }
    }

    #[test]
    fn status_reads_back_as_it_was_written() {
        let status = sample();
        let json = serde_json::to_value(&status).unwrap();
        // The stable names scripts and tests read (SPEC §5).
        assert_eq!(json["relays"][0]["state"], "connected");
        assert_eq!(json["relays"][0]["transport"], "quic");
        assert_eq!(json["peers"][0]["path"], "direct");
        assert_eq!(json["peers"][0]["punch"], "direct");
        assert_eq!(json["network"]["udp_port"], 5000);
        assert_eq!(json["network"]["candidates"][0]["sources"][0], "reflexive");
        assert!(json["network"]["port_mapping"].is_null());
        let back: Status = serde_json::from_value(json).unwrap();
        assert_eq!(back, status);
    }

    #[test]
    fn text_has_one_line_per_thing() {
        let status = sample();
        let text = status.to_text();
        let peer = status.peers[0].node_id;
        assert!(
            text.contains("mode strict (forbids: hole punching unless punch = true)"),
            "{text}"
        );
        assert!(text.contains("relay ferry://"), "{text}");
        assert!(
            text.contains(" connected quic (moved from tcp) fleet ferry\n"),
            "{text}"
        );
        assert!(
            text.contains("service storage -> 127.0.0.1:3456 public relay.example:40123"),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "peer {peer} direct via 203.0.113.9:5000 rtt 12.3 ms sent 2048 received 4096 punch direct access allowed"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!("forward 127.0.0.1:7000 -> {peer}/storage")),
            "{text}"
        );
        assert!(
            text.contains(&format!("refused by node {peer}: not a member")),
            "{text}"
        );
        assert!(text.ends_with("socks 127.0.0.1:1080\n"), "{text}");
    }

    #[test]
    fn a_status_from_another_shape_is_refused_not_shown_as_dashes() {
        let mut json = serde_json::to_value(sample()).unwrap();
        json["peers"][0]["path"] = "sideways".into();
        let e = serde_json::from_value::<Status>(json).unwrap_err();
        assert!(e.to_string().contains("sideways"), "{e}");
    }
}
