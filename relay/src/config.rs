//! Command-line flags and the TOML config file of ferry-relay, merged into
//! [`RelayOptions`]. Every flag has a config key of the same name (dashes become
//! underscores); a flag given on the command line wins over the file. The one
//! exception is `--no-rendezvous`, whose key reads positively: `rendezvous = false`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde::Deserialize;

use ferry_rendezvous::stun_service::DEFAULT_STUN;

use crate::policy::{Mode, parse_duration};
use crate::ports::parse_range;
use crate::server::{Limits, RelayOptions};

pub const DEFAULT_LISTEN: &str = "[::]:7842";
pub const DEFAULT_ADMIN: &str = "127.0.0.1:7843";
pub const DEFAULT_PORTS: &str = "20000-20999";
/// Public ports one node may hold. Eight covers a storage server with its web and SSH
/// companions; operators raise it per relay.
pub const DEFAULT_MAX_PUBLIC_PORTS_PER_NODE: usize = 8;
/// The SPEC's 100,000 idle nodes per relay.
pub const DEFAULT_MAX_NODES: usize = 100_000;
/// As many as one node's link multiplexes (its QUIC stream limit).
pub const DEFAULT_MAX_STREAMS_PER_NODE: usize = 1024;
/// A node reconnects at most a few times a second; twenty per second per address with
/// bursts of two hundred leaves room for a whole NAT-ed house of nodes.
pub const DEFAULT_HANDSHAKES_PER_IP_PER_SEC: f64 = 20.0;
/// A Tahoe client opens a handful of connections; a busy web client behind one NAT a
/// few dozen. 100/s with bursts of 1,000 stops a flood without touching either.
pub const DEFAULT_CONNECTIONS_PER_IP_PER_SEC: f64 = 100.0;
/// Long enough for a Tahoe upload in flight to finish; below systemd's default stop
/// timeout of 90 s.
pub const DEFAULT_DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// A year: members of a friends' grid should not be locked out by surprise; revocation
/// is the tool for removing someone.
pub const DEFAULT_MEMBERSHIP_LIFETIME: std::time::Duration =
    std::time::Duration::from_secs(365 * 86_400);

/// Ferry relay: makes services behind NAT reachable on stable public TCP ports and
/// splices end-to-end encrypted traffic between Ferry nodes.
///
/// With no arguments it runs on built-in defaults: data in ~/.local/share/ferry-relay
/// (or $STATE_DIRECTORY under systemd), QUIC and TLS on [::]:7842, public ports
/// 20000-20999, admin HTTP on 127.0.0.1:7843, and the embedded rendezvous's STUN
/// service on UDP [::]:3478. It prints its URL (ferry://<relay-id>@host:port), which
/// nodes pass to `ferry-shim expose --relay`.
#[derive(Debug, Parser, Default)]
#[command(name = "ferry-relay", version)]
pub struct Flags {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// TOML file with any of the settings below (keys use underscores, e.g.
    /// public_host = "relay.example.org"). Unknown keys are errors.
    #[arg(long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// Directory for the relay key and the public-port store.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address for QUIC (UDP) and TLS (TCP), same port number for both [default: [::]:7842].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Host name or address that clients and nodes use to reach this relay; goes into
    /// the relay URL and public addresses [default: guessed from the default route].
    #[arg(long, value_name = "HOST")]
    pub public_host: Option<String>,
    /// Range of public TCP ports handed to services, LO-HI inclusive [default: 20000-20999].
    #[arg(long, value_name = "LO-HI")]
    pub ports: Option<String>,
    /// Admin HTTP address (/metrics, /healthz, /readyz, /api/info, /api/nodes). A
    /// non-loopback address requires --admin-token-file [default: 127.0.0.1:7843].
    #[arg(long, value_name = "ADDR", global = true)]
    pub admin: Option<SocketAddr>,
    /// File whose first line is the bearer token the admin HTTP listener requires.
    #[arg(long, value_name = "FILE", global = true)]
    pub admin_token_file: Option<PathBuf>,
    /// Most public ports one node may hold [default: 8].
    #[arg(long, value_name = "N")]
    pub max_public_ports_per_node: Option<usize>,
    /// UDP address of the embedded rendezvous's STUN service, which tells nodes the
    /// public address their packets come from (RFC 8489 Binding). Open this UDP port in
    /// the firewall [default: [::]:3478].
    #[arg(long, value_name = "ADDR")]
    pub stun: Option<SocketAddr>,
    /// Run without the embedded rendezvous: no STUN port. Use it when a separate
    /// ferry-rendezvous serves this grid or port 3478 is unavailable. Config key:
    /// rendezvous = false.
    #[arg(long)]
    pub no_rendezvous: bool,
    /// Who may register: open (any node), allowlist (the node IDs in the policy
    /// file's allow list), grid (nodes with a membership certificate from an invite,
    /// plus the allow list). The deny and revoked lists apply in every mode
    /// [default: open].
    #[arg(long, value_name = "MODE")]
    pub policy: Option<String>,
    /// The policy file (TOML: allow, deny, admins, revoked lists of node IDs), re-read
    /// when it changes or on SIGHUP; a broken file keeps the old policy
    /// [default: <data-dir>/policy.toml].
    #[arg(long, value_name = "FILE")]
    pub policy_file: Option<PathBuf>,
    /// How long a membership certificate bought with an invite lasts [default: 365d].
    #[arg(long, value_name = "DURATION")]
    pub membership_lifetime: Option<String>,
    /// On SIGTERM the relay stops taking nodes and connections, tells nodes to move to
    /// another relay, and waits this long at most for public connections in flight to
    /// finish (a second SIGTERM stops at once) [default: 30s].
    #[arg(long, value_name = "DURATION")]
    pub drain_timeout: Option<String>,
    /// Most nodes with a session at once; more are told the relay is full
    /// [default: 100000].
    #[arg(long, value_name = "N")]
    pub max_nodes: Option<usize>,
    /// Most public-port connections one node may have open at once [default: 1024].
    #[arg(long, value_name = "N")]
    pub max_streams_per_node: Option<usize>,
    /// Bytes per second one node may move through this relay, public connections and
    /// overlay packets together; over it, its connections are read more slowly (never
    /// cut) and its overlay packets dropped. 0 means no limit [default: 0].
    #[arg(long, value_name = "BYTES")]
    pub node_bytes_per_sec: Option<u64>,
    /// Handshakes per second one source IP may start, with bursts of ten times that;
    /// a flood from one address is refused without touching anyone else [default: 20].
    #[arg(long, value_name = "N")]
    pub handshakes_per_ip_per_sec: Option<f64>,
    /// Public-port connections per second one source IP may open (all ports together),
    /// with bursts of ten times that; over it, connections are closed at once, before
    /// they reach any node [default: 100].
    #[arg(long, value_name = "N")]
    pub connections_per_ip_per_sec: Option<f64>,
    /// Join a fleet of relays that act as one: NATS servers with JetStream,
    /// comma-separated (nats://h1:4222,nats://h2:4222). The fleet shares one policy,
    /// one set of invites and one revocation list; without it the relay uses its
    /// policy file and invites.json alone. See README, "Running a fleet".
    #[arg(long, value_name = "URLS")]
    pub fleet: Option<String>,
    /// The fleet's name: relays with the same name share a policy [default: ferry].
    #[arg(long, value_name = "NAME")]
    pub fleet_name: Option<String>,
    /// NATS credentials file (.creds) for the fleet; keep it 0600 — it allows what a
    /// grid admin may do.
    #[arg(long, value_name = "FILE")]
    pub fleet_credentials: Option<PathBuf>,
    /// Copies of each fleet bucket the NATS cluster keeps [default: 3; 1 for a single
    /// NATS server].
    #[arg(long, value_name = "N")]
    pub fleet_replicas: Option<usize>,
}

/// What `ferry-relay` does besides running the relay.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print an invite code for a new grid member (the running relay, with
    /// --policy grid, issues it). The friend runs `ferry-shim join CODE` once; after
    /// that their shim is a member and knows this relay.
    Invite {
        /// How long the code can be redeemed, e.g. 30m, 24h, 7d.
        #[arg(long, default_value = "24h")]
        expires: String,
        /// How many nodes may redeem it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
    },
    /// Move this relay's policy lists (the policy file) and its outstanding invites
    /// (invites.json, each with the uses it has left) into the fleet given by
    /// --fleet, once, before running the relay with --fleet. Nodes the fleet lists
    /// already are placed as this relay's file says; the rest of the fleet's lists
    /// stay. Run it with the relay's usual flags or --config.
    FleetImport,
}

/// The config file; same settings as [`Flags`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub public_host: Option<String>,
    pub ports: Option<String>,
    pub admin: Option<SocketAddr>,
    pub admin_token_file: Option<PathBuf>,
    pub max_public_ports_per_node: Option<usize>,
    pub stun: Option<SocketAddr>,
    /// `false` is `--no-rendezvous`.
    pub rendezvous: Option<bool>,
    pub policy: Option<String>,
    pub policy_file: Option<PathBuf>,
    pub membership_lifetime: Option<String>,
    pub drain_timeout: Option<String>,
    pub max_nodes: Option<usize>,
    pub max_streams_per_node: Option<usize>,
    pub node_bytes_per_sec: Option<u64>,
    pub handshakes_per_ip_per_sec: Option<f64>,
    pub connections_per_ip_per_sec: Option<f64>,
    pub fleet: Option<String>,
    pub fleet_name: Option<String>,
    pub fleet_credentials: Option<PathBuf>,
    pub fleet_replicas: Option<usize>,
}

/// A per-second rate setting: above zero and a number.
fn positive_rate(name: &str, value: f64) -> anyhow::Result<f64> {
    if value.is_nan() || value <= 0.0 {
        anyhow::bail!("{name} must be above 0 (it is {value})");
    }
    Ok(value)
}

impl Flags {
    /// Merges flags over the config file over built-in defaults.
    pub fn resolve(self) -> anyhow::Result<RelayOptions> {
        let file: FileConfig = match &self.config {
            Some(path) => ferry_proto::config::load_toml(path)?,
            None => FileConfig::default(),
        };
        self.resolve_file(file)
    }

    /// Merges flags over an already parsed config file over built-in defaults.
    pub fn resolve_file(self, file: FileConfig) -> anyhow::Result<RelayOptions> {
        let ports_text = self
            .ports
            .or(file.ports)
            .unwrap_or_else(|| DEFAULT_PORTS.to_string());
        let ports = parse_range(&ports_text).map_err(anyhow::Error::msg)?;
        let token_file = self.admin_token_file.or(file.admin_token_file);
        let admin_token = ferry_proto::admin::load_token(token_file.as_deref())?;
        let max_ports = self
            .max_public_ports_per_node
            .or(file.max_public_ports_per_node)
            .unwrap_or(DEFAULT_MAX_PUBLIC_PORTS_PER_NODE);
        let rendezvous = !self.no_rendezvous && file.rendezvous.unwrap_or(true);
        let stun_setting = self.stun.or(file.stun);
        if !rendezvous && let Some(addr) = stun_setting {
            tracing::warn!("stun address {addr} is ignored: the embedded rendezvous is off");
        }
        let stun = rendezvous.then(|| stun_setting.unwrap_or(DEFAULT_STUN));
        let policy: Mode = match self.policy.or(file.policy) {
            Some(text) => text.parse().map_err(anyhow::Error::msg)?,
            None => Mode::Open,
        };
        let membership_lifetime = match self.membership_lifetime.or(file.membership_lifetime) {
            Some(text) => parse_duration(&text).map_err(anyhow::Error::msg)?,
            None => DEFAULT_MEMBERSHIP_LIFETIME,
        };
        let data_dir = self
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| ferry_proto::config::default_data_dir("ferry-relay"));
        let drain_timeout = match self.drain_timeout.or(file.drain_timeout) {
            Some(text) => parse_duration(&text).map_err(anyhow::Error::msg)?,
            None => DEFAULT_DRAIN_TIMEOUT,
        };
        let handshakes_per_ip_per_sec = self
            .handshakes_per_ip_per_sec
            .or(file.handshakes_per_ip_per_sec)
            .unwrap_or(DEFAULT_HANDSHAKES_PER_IP_PER_SEC);
        let handshakes_per_ip_per_sec =
            positive_rate("handshakes_per_ip_per_sec", handshakes_per_ip_per_sec)?;
        let connections_per_ip_per_sec = positive_rate(
            "connections_per_ip_per_sec",
            self.connections_per_ip_per_sec
                .or(file.connections_per_ip_per_sec)
                .unwrap_or(DEFAULT_CONNECTIONS_PER_IP_PER_SEC),
        )?;
        let limits = Limits {
            max_nodes: self
                .max_nodes
                .or(file.max_nodes)
                .unwrap_or(DEFAULT_MAX_NODES),
            max_streams_per_node: self
                .max_streams_per_node
                .or(file.max_streams_per_node)
                .unwrap_or(DEFAULT_MAX_STREAMS_PER_NODE),
            node_bytes_per_sec: self
                .node_bytes_per_sec
                .or(file.node_bytes_per_sec)
                .unwrap_or(0),
            handshakes_per_ip_per_sec,
            connections_per_ip_per_sec,
        };
        let fleet = crate::fleet::FleetOptions::from_settings(
            self.fleet.or(file.fleet),
            self.fleet_name.or(file.fleet_name),
            self.fleet_credentials.or(file.fleet_credentials),
            self.fleet_replicas.or(file.fleet_replicas),
        )?;
        Ok(RelayOptions {
            fleet,
            limits,
            drain_timeout,
            policy,
            policy_file: self
                .policy_file
                .or(file.policy_file)
                .unwrap_or_else(|| data_dir.join("policy.toml")),
            membership_lifetime,
            data_dir,
            listen: match self.listen.or(file.listen) {
                Some(a) => a,
                None => DEFAULT_LISTEN.parse().context("built-in listen address")?,
            },
            public_host: self.public_host.or(file.public_host),
            ports,
            admin: match self.admin.or(file.admin) {
                Some(a) => a,
                None => DEFAULT_ADMIN.parse().context("built-in admin address")?,
            },
            admin_token,
            max_public_ports_per_node: max_ports,
            stun,
            packet_tap: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_apply_without_flags_or_file() {
        let opts = Flags::default().resolve().unwrap();
        assert_eq!(opts.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(opts.admin, DEFAULT_ADMIN.parse().unwrap());
        assert_eq!(opts.ports, 20000..=20999);
        assert!(opts.admin_token.is_none());
        assert_eq!(opts.stun, Some("[::]:3478".parse().unwrap()));
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/relay.toml");
        let opts = Flags {
            config: Some(path),
            ..Flags::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(opts.public_host.as_deref(), Some("relay.example.org"));
        assert_eq!(opts.ports, 20000..=20999);
        assert_eq!(opts.stun, Some("[::]:3478".parse().unwrap()));
    }

    #[test]
    fn flags_override_the_file_and_unknown_keys_fail() {
        let dir = std::env::temp_dir().join(format!("ferry-relay-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("relay.toml");
        std::fs::write(
            &path,
            "ports = \"30000-30010\"\npublic_host = \"file.example\"\n",
        )
        .unwrap();
        let opts = Flags {
            config: Some(path.clone()),
            public_host: Some("flag.example".into()),
            ..Flags::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(opts.ports, 30000..=30010);
        assert_eq!(opts.public_host.as_deref(), Some("flag.example"));

        std::fs::write(&path, "prots = \"1-2\"\n").unwrap();
        let err = Flags {
            config: Some(path),
            ..Flags::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(err.contains("prots"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stun_and_rendezvous_keys_and_flags() {
        let dir = std::env::temp_dir().join(format!("ferry-relay-stun-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("relay.toml");
        let with = |text: &str, flags: Flags| {
            std::fs::write(&path, text).unwrap();
            Flags {
                config: Some(path.clone()),
                ..flags
            }
            .resolve()
        };
        let opts = with("stun = \"127.0.0.1:3479\"\n", Flags::default()).unwrap();
        assert_eq!(opts.stun, Some("127.0.0.1:3479".parse().unwrap()));
        let flag = Flags {
            stun: Some("127.0.0.1:4000".parse().unwrap()),
            ..Flags::default()
        };
        let opts = with("stun = \"127.0.0.1:3479\"\n", flag).unwrap();
        assert_eq!(opts.stun, Some("127.0.0.1:4000".parse().unwrap()));
        let opts = with("rendezvous = false\n", Flags::default()).unwrap();
        assert_eq!(opts.stun, None);
        let off = Flags {
            no_rendezvous: true,
            ..Flags::default()
        };
        let opts = with("rendezvous = true\n", off).unwrap();
        assert_eq!(opts.stun, None);
        let err = with("stun = \"not an address\"\n", Flags::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("stun"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
