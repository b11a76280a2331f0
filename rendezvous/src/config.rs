//! Command-line flags and the TOML config file of `ferry-rendezvous`, merged into
//! [`RendezvousOptions`] the way `ferry-relay` does it: every flag has a config key of
//! the same name (dashes become underscores), a flag wins over the file, and the file
//! wins over the built-in default.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use serde::Deserialize;

use crate::fleet::FleetOptions;
use crate::stun_service::DEFAULT_STUN;

/// Where node sessions are accepted (QUIC on UDP), the relay's port number, so a node
/// can use the same URL shape for both.
/// `[::]`: dual stack (see `ferry_proto::net`).
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, 7842, 0, 0));
/// Admin HTTP: next to the relay's 7843 and the shim's 7844, so all three programs can
/// run on one host with their defaults.
pub const DEFAULT_ADMIN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 7845));

/// Ferry rendezvous, standalone: tells nodes how the Internet sees them (STUN,
/// RFC 8489 Binding), keeps their signed path records and coordinates hole punching.
/// `ferry-relay` runs the same service embedded; run this one where the rendezvous
/// should live apart from any relay.
///
/// With no arguments it runs on built-in defaults: key in ~/.local/share/ferry-rendezvous
/// (or $STATE_DIRECTORY under systemd), STUN on UDP [::]:3478, admin HTTP on
/// 127.0.0.1:7845. It prints `ferry-rendezvous ready node_id=... stun=IP:PORT
/// admin=http://...` on stdout.
#[derive(Debug, Parser, Default)]
#[command(name = "ferry-rendezvous", version)]
pub struct Flags {
    /// TOML file with any of the settings below (keys use underscores, e.g.
    /// admin_token_file = "/etc/ferry/admin-token"). Unknown keys are errors.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory for the rendezvous key (rendezvous.key, created 0600).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// UDP address of the STUN service, which answers Binding requests with the
    /// address they came from. Open this UDP port in the firewall [default: [::]:3478].
    #[arg(long, value_name = "ADDR")]
    pub stun: Option<SocketAddr>,
    /// UDP address for node sessions (QUIC): shims given `--rendezvous
    /// ferry://<node_id>@host:port` publish path records and ask for hole punches
    /// here [default: [::]:7842].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Admin HTTP address (/metrics, /healthz, /readyz, /api/info). A non-loopback
    /// address requires --admin-token-file [default: 127.0.0.1:7845].
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<SocketAddr>,
    /// File whose first line is the bearer token the admin HTTP listener requires.
    #[arg(long, value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Share path records with a fleet of relays and rendezvous (README, "Running a
    /// fleet"): NATS servers with JetStream, comma-separated
    /// (nats://h1:4222,nats://h2:4222). A record published here is found by a lookup
    /// or punch at any member, and the fleet's records are found here.
    #[arg(long, value_name = "URLS")]
    pub fleet: Option<String>,
    /// The fleet's name, as given to its relays [default: ferry].
    #[arg(long, value_name = "NAME")]
    pub fleet_name: Option<String>,
    /// NATS credentials file (.creds) for the fleet; keep it 0600.
    #[arg(long, value_name = "FILE")]
    pub fleet_credentials: Option<PathBuf>,
    /// Copies of each fleet bucket the NATS cluster keeps [default: 3; 1 for a single
    /// NATS server].
    #[arg(long, value_name = "N")]
    pub fleet_replicas: Option<usize>,
}

/// The config file; same settings as [`Flags`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub stun: Option<SocketAddr>,
    pub listen: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub admin_token_file: Option<PathBuf>,
    pub fleet: Option<String>,
    pub fleet_name: Option<String>,
    pub fleet_credentials: Option<PathBuf>,
    pub fleet_replicas: Option<usize>,
}

/// Everything the standalone rendezvous needs to start.
#[derive(Debug, Clone)]
pub struct RendezvousOptions {
    pub data_dir: PathBuf,
    pub stun: SocketAddr,
    /// Node sessions (QUIC).
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub admin_token: Option<Arc<str>>,
    /// The fleet whose path records this rendezvous shares; `None`: records stay here.
    pub fleet: Option<FleetOptions>,
}

impl Flags {
    /// Merges flags over the config file over built-in defaults.
    pub fn resolve(self) -> anyhow::Result<RendezvousOptions> {
        let file: FileConfig = match &self.config {
            Some(path) => ferry_proto::config::load_toml(path)?,
            None => FileConfig::default(),
        };
        self.resolve_file(file)
    }

    /// Merges flags over an already parsed config file over built-in defaults.
    pub fn resolve_file(self, file: FileConfig) -> anyhow::Result<RendezvousOptions> {
        let token_file = self.admin_token_file.or(file.admin_token_file);
        Ok(RendezvousOptions {
            data_dir: self
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| ferry_proto::config::default_data_dir("ferry-rendezvous")),
            stun: self.stun.or(file.stun).unwrap_or(DEFAULT_STUN),
            listen: self.listen.or(file.listen).unwrap_or(DEFAULT_LISTEN),
            admin: self.admin.or(file.admin).unwrap_or(DEFAULT_ADMIN),
            admin_token: ferry_proto::admin::load_token(token_file.as_deref())?,
            fleet: FleetOptions::from_settings(
                self.fleet.or(file.fleet),
                self.fleet_name.or(file.fleet_name),
                self.fleet_credentials.or(file.fleet_credentials),
                self.fleet_replicas.or(file.fleet_replicas),
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_apply_without_flags_or_file() {
        let opts = Flags::default().resolve().unwrap();
        assert_eq!(opts.stun, "[::]:3478".parse().unwrap());
        assert_eq!(opts.listen, "[::]:7842".parse().unwrap());
        assert_eq!(opts.admin, "127.0.0.1:7845".parse().unwrap());
        assert!(opts.admin_token.is_none());
        assert!(opts.fleet.is_none());
    }

    #[test]
    fn fleet_settings_are_checked() {
        let opts = Flags {
            fleet: Some("nats://a:4222, nats://b:4222".into()),
            fleet_replicas: Some(0),
            ..Flags::default()
        }
        .resolve()
        .unwrap();
        let fleet = opts.fleet.unwrap();
        assert_eq!(fleet.servers, ["nats://a:4222", "nats://b:4222"]);
        assert_eq!((fleet.name.as_str(), fleet.replicas), ("ferry", 1));
        let err = Flags {
            fleet: Some("nats://a:4222".into()),
            fleet_name: Some("no spaces".into()),
            ..Flags::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(err.contains("letters, digits"), "{err}");
        let err = Flags {
            fleet: Some(" , ".into()),
            ..Flags::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(err.contains("needs NATS server URLs"), "{err}");
    }

    #[test]
    fn flags_override_the_file_and_unknown_keys_fail() {
        let dir = std::env::temp_dir().join(format!("ferry-rdv-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("rendezvous.toml");
        std::fs::write(
            &path,
            "stun = \"127.0.0.1:3479\"\nadmin = \"127.0.0.1:9999\"\n",
        )
        .unwrap();
        let opts = Flags {
            config: Some(path.clone()),
            admin: Some("127.0.0.1:1".parse().unwrap()),
            ..Flags::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(opts.stun, "127.0.0.1:3479".parse().unwrap());
        assert_eq!(opts.admin, "127.0.0.1:1".parse().unwrap());

        std::fs::write(&path, "sutn = \"127.0.0.1:1\"\n").unwrap();
        let err = Flags {
            config: Some(path),
            ..Flags::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(err.contains("sutn"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
