//! The shim's three modes (SPEC §4) and what each allows, as one [`Policy`] every
//! part of the shim asks instead of checking the mode itself. p2p users and
//! sysadmins want opposite defaults (the tahoe-dev thread in `shared/seed/`): p2p
//! finds and announces everything it can; strict uses only what is configured and
//! fails loudly; private never reveals the node's address at all.

use serde::{Deserialize, Serialize};

/// `--mode` / `mode =`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Everything automatic: interface addresses, STUN, port mapping, hole punching,
    /// QUIC to relays with TLS/TCP as fallback.
    #[default]
    P2p,
    /// Nothing automatic: only configured addresses, relays and services; no STUN,
    /// interface scan or port mapping; no hole punching unless `punch = true`; every
    /// failure logged with its reason, and that path given up.
    Strict,
    /// Never reveals the node's address: relays only over TLS/TCP through the
    /// configured SOCKS5 proxy (Tor), no UDP at all, no address announced.
    Private,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::P2p => "p2p",
            Mode::Strict => "strict",
            Mode::Private => "private",
        }
    }
}

/// What the shim may do, decided once from the mode and the options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub mode: Mode,
    /// Any UDP packet at all (the shim's socket, QUIC to relays, STUN, probes).
    pub udp: bool,
    /// Learn addresses by itself: interface scan, the relay's and STUN's view of the
    /// socket, NAT measurement, hop discovery for the priming TTL.
    pub discover_addresses: bool,
    /// Ask relays for port mappings (UPnP-IGD, NAT-PMP, PCP).
    pub port_mapping: bool,
    /// Put addresses (discovered or configured) in the signed path record.
    pub announce_addresses: bool,
    /// Coordinated hole punching through the rendezvous.
    pub punch: bool,
    /// Try again after a failed punch; otherwise one attempt, then the reason is
    /// logged and the peer stays relayed.
    pub retry_punch: bool,
    /// Probe back the source of a peer's probe that came from an address nobody
    /// announced (which lets a full-cone side reach a symmetric one). Off in strict
    /// mode: it never dials a peer that dials it.
    pub probe_back: bool,
    /// Start looking for a direct path to a peer that connected to us.
    pub paths_for_inbound: bool,
    /// Relay links over QUIC (UDP); otherwise TLS over TCP only.
    pub quic_relay: bool,
    /// Proxy settings from `ALL_PROXY`/`HTTPS_PROXY`; otherwise only the configured one.
    pub proxy_from_env: bool,
    /// SOCKS door: names other than `*.ferry` may be passed through (when configured).
    pub socks_passthrough_allowed: bool,
    /// Reach a peer that is only on another relay of a fleet through an on-demand link
    /// to that relay (`crate::visits`); otherwise only relays listed in `may_reach`
    /// besides the configured ones.
    pub visit_relays: bool,
}

impl Policy {
    /// The policy of `mode`; `punch` is the `punch =` setting (strict only; p2p
    /// always punches unless `punch = false`, private never does).
    pub fn new(mode: Mode, punch: Option<bool>) -> Policy {
        match mode {
            Mode::P2p => Policy {
                mode,
                udp: true,
                discover_addresses: true,
                port_mapping: true,
                announce_addresses: true,
                punch: punch.unwrap_or(true),
                retry_punch: true,
                probe_back: true,
                paths_for_inbound: true,
                quic_relay: true,
                proxy_from_env: true,
                socks_passthrough_allowed: true,
                visit_relays: true,
            },
            Mode::Strict => Policy {
                mode,
                udp: true,
                discover_addresses: false,
                port_mapping: false,
                announce_addresses: true,
                punch: punch.unwrap_or(false),
                retry_punch: false,
                probe_back: false,
                paths_for_inbound: false,
                quic_relay: true,
                proxy_from_env: false,
                socks_passthrough_allowed: false,
                visit_relays: false,
            },
            Mode::Private => Policy {
                mode,
                udp: false,
                discover_addresses: false,
                port_mapping: false,
                announce_addresses: false,
                punch: false,
                retry_punch: false,
                probe_back: false,
                paths_for_inbound: false,
                quic_relay: false,
                proxy_from_env: false,
                socks_passthrough_allowed: false,
                // Through the proxy, like every relay link in private mode.
                visit_relays: true,
            },
        }
    }

    /// What this policy forbids, in words, for `ferry-shim status` and `/api/status`.
    pub fn forbids(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if !self.udp {
            out.push("UDP of any kind (QUIC, STUN, probes, relay channel)");
        }
        if !self.discover_addresses {
            out.push("address discovery (interface scan, STUN, NAT measurement)");
        }
        if !self.port_mapping {
            out.push("port mapping (UPnP, NAT-PMP, PCP)");
        }
        if !self.announce_addresses {
            out.push("announcing any address");
        }
        if !self.punch {
            out.push("hole punching");
        }
        if self.punch && !self.retry_punch {
            out.push("retrying a failed hole punch");
        }
        if !self.probe_back {
            out.push("probing a peer that probed this node");
        }
        if !self.quic_relay && self.udp {
            out.push("QUIC to relays");
        }
        if !self.proxy_from_env {
            out.push("proxy settings from the environment");
        }
        if !self.socks_passthrough_allowed {
            out.push("SOCKS passthrough to names outside .ferry");
        }
        if !self.visit_relays {
            out.push("reaching a fleet's relays other than the configured ones and may_reach");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_mode_keeps_its_promise() {
        let p2p = Policy::new(Mode::P2p, None);
        assert!(p2p.udp && p2p.discover_addresses && p2p.punch && p2p.probe_back);
        assert!(p2p.forbids().is_empty(), "{:?}", p2p.forbids());

        let strict = Policy::new(Mode::Strict, None);
        assert!(strict.udp && !strict.discover_addresses && !strict.punch);
        assert!(!strict.probe_back && !strict.paths_for_inbound && !strict.proxy_from_env);
        let with_punch = Policy::new(Mode::Strict, Some(true));
        assert!(with_punch.punch && !with_punch.retry_punch);
        assert!(
            with_punch
                .forbids()
                .contains(&"retrying a failed hole punch")
        );

        // Private mode may not be talked into punching.
        let private = Policy::new(Mode::Private, Some(true));
        assert!(!private.udp && !private.punch && !private.quic_relay);
        assert!(!private.announce_addresses);
        assert!(private.forbids()[0].starts_with("UDP"));
    }
}
