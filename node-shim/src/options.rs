//! What a shim is asked to do, from flags (`expose`, `connect`) or a TOML file (`run`),
//! resolved into one [`ShimOptions`]. Every setting has a config key; unknown keys are
//! errors that name the key.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use ferry_proto::frame::validate_service_name;
use ferry_proto::{NodeId, RelayUrl};
use serde::Deserialize;

use crate::mode::{Mode, Policy};
use crate::proxy::{ProxyKind, ProxyUrl};

pub const DEFAULT_ADMIN: &str = "127.0.0.1:7844";

/// One local service this node offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    pub name: String,
    /// `host:port` of the local service (usually on loopback).
    pub target: String,
    /// Ask relays for a stable public TCP port for it.
    pub public: bool,
}

/// One local listener whose connections go to a remote node's service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardConfig {
    pub node: NodeId,
    /// `None`: the remote node's default (first) service.
    pub service: Option<String>,
    pub listen: SocketAddr,
}

#[derive(Debug, Clone)]
pub struct ShimOptions {
    pub data_dir: PathBuf,
    pub admin: SocketAddr,
    pub admin_token: Option<Arc<str>>,
    pub relays: Vec<RelayUrl>,
    /// A standalone rendezvous; without it the relays' embedded ones are used.
    pub rendezvous: Option<RelayUrl>,
    /// Relays of a fleet that strict mode may also reach when a peer is only there
    /// (`crate::visits`); p2p and private modes reach any the fleet names.
    pub may_reach: Vec<RelayUrl>,
    pub services: Vec<ServiceConfig>,
    pub allow: Vec<NodeId>,
    pub allow_any: bool,
    /// Members of this node's grids (its memberships) may reach its services.
    pub allow_grid: bool,
    pub forwards: Vec<ForwardConfig>,
    /// Grid memberships from `ferry-shim join` (data directory's membership.json).
    pub memberships: crate::membership::Memberships,
    /// UDP port of the shim's one socket (0: any).
    pub udp_port: u16,
    /// Extra direct-path candidates to announce (e.g. a port forwarded on the router).
    pub addresses: Vec<SocketAddr>,
    /// Priming TTL for hole punching; found by probing when unset.
    pub punch_ttl: Option<u8>,
    /// Relayed packets may use relay channels (`ferry_proto::channel`); when false
    /// they stay inside the relay links.
    pub relay_channel: bool,
    /// The mode and what it allows (SPEC §4).
    pub policy: Policy,
    /// The configured egress proxy for relay links (p2p mode also reads the usual
    /// environment variables when this is unset).
    pub proxy: Option<ProxyUrl>,
    /// The SOCKS door's listen address (`ferry-shim socks --listen`).
    pub socks: Option<SocketAddr>,
    /// The SOCKS door passes names outside `.ferry` straight through (p2p only).
    pub socks_passthrough: bool,
    /// Port-mapping protocols to try on the home router, in order (p2p only; empty:
    /// none).
    pub port_mapping: Vec<crate::portmap::Protocol>,
}

/// Parses `NAME=HOST:PORT` as given to `--service`.
pub fn parse_service(text: &str, public: bool) -> anyhow::Result<ServiceConfig> {
    let (name, target) = text.split_once('=').with_context(|| {
        format!("invalid --service {text:?}: expected NAME=HOST:PORT, e.g. storage=127.0.0.1:3457")
    })?;
    let service = ServiceConfig {
        name: name.to_string(),
        target: target.to_string(),
        public,
    };
    check_service(&service)?;
    Ok(service)
}

fn check_service(s: &ServiceConfig) -> anyhow::Result<()> {
    validate_service_name(&s.name).map_err(anyhow::Error::msg)?;
    let port_ok = s
        .target
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0));
    if !port_ok {
        bail!(
            "invalid target {:?} for service {:?}: expected HOST:PORT, e.g. 127.0.0.1:3457",
            s.target,
            s.name
        );
    }
    Ok(())
}

/// Parses `NODE_ID[/SERVICE]` as given to `connect`.
pub fn parse_destination(text: &str) -> anyhow::Result<(NodeId, Option<String>)> {
    let (node, service) = match text.split_once('/') {
        Some((n, s)) => (n, Some(s.to_string())),
        None => (text, None),
    };
    let node: NodeId = node.parse()?;
    if let Some(s) = &service {
        validate_service_name(s).map_err(anyhow::Error::msg)?;
    }
    Ok((node, service))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileService {
    name: String,
    target: String,
    #[serde(default)]
    public: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileForward {
    /// `NODE_ID[/SERVICE]`
    to: String,
    listen: SocketAddr,
}

/// The `ferry-shim run --config` file (parse it with
/// `ferry_proto::config::load_toml` or `parse_toml`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    data_dir: Option<PathBuf>,
    admin: Option<SocketAddr>,
    admin_token_file: Option<PathBuf>,
    #[serde(default)]
    relays: Vec<RelayUrl>,
    rendezvous: Option<RelayUrl>,
    #[serde(default)]
    may_reach: Vec<RelayUrl>,
    #[serde(default)]
    allow: Vec<NodeId>,
    #[serde(default)]
    allow_any: bool,
    #[serde(default)]
    allow_grid: bool,
    #[serde(default)]
    service: Vec<FileService>,
    #[serde(default)]
    forward: Vec<FileForward>,
    udp_port: Option<u16>,
    #[serde(default)]
    addresses: Vec<SocketAddr>,
    punch_ttl: Option<u8>,
    relay_channel: Option<bool>,
    mode: Option<Mode>,
    proxy: Option<ProxyUrl>,
    punch: Option<bool>,
    socks_listen: Option<SocketAddr>,
    #[serde(default)]
    socks_passthrough: bool,
    port_mapping: Option<Vec<crate::portmap::Protocol>>,
}

/// Flags shared by the commands that run a shim.
#[derive(Debug, Default, Clone)]
pub struct CommonFlags {
    pub data_dir: Option<PathBuf>,
    pub admin: Option<SocketAddr>,
    pub admin_token_file: Option<PathBuf>,
    pub udp_port: Option<u16>,
    pub rendezvous: Option<RelayUrl>,
    /// `--may-reach`.
    pub may_reach: Vec<RelayUrl>,
    pub no_relay_channel: bool,
    pub mode: Option<Mode>,
    pub proxy: Option<ProxyUrl>,
    /// `--punch`: hole punching in strict mode.
    pub punch: bool,
    /// `socks --listen`.
    pub socks: Option<SocketAddr>,
    /// `socks --passthrough`.
    pub socks_passthrough: bool,
    /// `--no-port-mapping`.
    pub no_port_mapping: bool,
    /// `expose --allow-grid`.
    pub allow_grid: bool,
}

impl ShimOptions {
    /// Builds options from a config file (`FileConfig::default()` for none), with
    /// command-line values on top.
    pub fn resolve(
        file: FileConfig,
        common: CommonFlags,
        relays: Vec<RelayUrl>,
        services: Vec<ServiceConfig>,
        allow: Vec<NodeId>,
        allow_any: bool,
        forwards: Vec<ForwardConfig>,
    ) -> anyhow::Result<ShimOptions> {
        let mut all_services = Vec::new();
        for s in file.service {
            let s = ServiceConfig {
                name: s.name,
                target: s.target,
                public: s.public,
            };
            check_service(&s)?;
            all_services.push(s);
        }
        all_services.extend(services);
        for (i, s) in all_services.iter().enumerate() {
            if all_services[..i].iter().any(|o| o.name == s.name) {
                bail!(
                    "service {:?} is configured twice; give each service its own name",
                    s.name
                );
            }
        }
        let mut all_forwards = Vec::new();
        for f in file.forward {
            let (node, service) = parse_destination(&f.to)?;
            all_forwards.push(ForwardConfig {
                node,
                service,
                listen: f.listen,
            });
        }
        all_forwards.extend(forwards);
        let mut all_relays = file.relays;
        for r in relays {
            if !all_relays.contains(&r) {
                all_relays.push(r);
            }
        }
        let data_dir = common
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| ferry_proto::config::default_data_dir("ferry-shim"));
        let memberships = crate::membership::Memberships::load(&data_dir)?;
        if all_relays.is_empty() {
            // After `ferry-shim join`, the grid's relay is known.
            all_relays = memberships.relays();
        }
        if all_relays.is_empty() {
            bail!(
                "no relay configured: pass --relay ferry://<relay-id>@host:port (printed by ferry-relay at start), set relays = [...] in the config file, or join a grid with `ferry-shim join CODE`"
            );
        }
        let token_file = common.admin_token_file.or(file.admin_token_file);
        let mut all_allow = file.allow;
        all_allow.extend(allow);
        let mode = common.mode.or(file.mode).unwrap_or_default();
        let punch = if common.punch { Some(true) } else { file.punch };
        let udp_port = common.udp_port.or(file.udp_port);
        let policy = Policy::new(mode, punch);
        let port_mapping = match (&file.port_mapping, common.no_port_mapping) {
            (_, true) => Vec::new(),
            (Some(list), false) => {
                if !list.is_empty() && !policy.port_mapping {
                    bail!(
                        "port_mapping is off in {} mode (nothing automatic): remove port_mapping, or forward a port on the router yourself and list it in addresses = [...]",
                        mode.name()
                    );
                }
                list.clone()
            }
            (None, false) if policy.port_mapping => crate::portmap::Protocol::ALL.to_vec(),
            (None, false) => Vec::new(),
        };
        let opts = ShimOptions {
            data_dir,
            memberships,
            admin: match common.admin.or(file.admin) {
                Some(a) => a,
                None => DEFAULT_ADMIN.parse()?,
            },
            admin_token: ferry_proto::admin::load_token(token_file.as_deref())?,
            relays: all_relays,
            rendezvous: common.rendezvous.or(file.rendezvous),
            may_reach: {
                let mut all = file.may_reach;
                all.extend(common.may_reach);
                all
            },
            services: all_services,
            allow: all_allow,
            allow_any: allow_any || file.allow_any,
            allow_grid: common.allow_grid || file.allow_grid,
            forwards: all_forwards,
            udp_port: udp_port.unwrap_or(0),
            addresses: file.addresses,
            punch_ttl: match file.punch_ttl {
                Some(0) => {
                    bail!("punch_ttl = 0 would never leave this host; use 1-255 or leave it unset")
                }
                t => t,
            },
            relay_channel: mode != Mode::Private
                && !common.no_relay_channel
                && file.relay_channel.unwrap_or(true),
            policy,
            port_mapping,
            proxy: common.proxy.or(file.proxy),
            socks: common.socks.or(file.socks_listen),
            socks_passthrough: common.socks_passthrough || file.socks_passthrough,
        };
        check_mode(&opts, punch, udp_port)?;
        if opts.allow_grid && opts.memberships.memberships.is_empty() {
            bail!(
                "allow_grid lets in members of this node's grids, and this node belongs to none: redeem an invite with `ferry-shim join CODE` first (data directory {})",
                opts.data_dir.display()
            );
        }
        Ok(opts)
    }
}

/// Private mode's proxy: a SOCKS5 proxy given by IP address.
pub fn check_private_proxy(proxy: Option<&ProxyUrl>) -> anyhow::Result<()> {
    match proxy {
        None => bail!(
            "private mode reaches relays only through a SOCKS5 proxy: set proxy = \"socks5://127.0.0.1:9050\" (Tor's SOCKS port) or --proxy"
        ),
        Some(p) if p.kind != ProxyKind::Socks5 => bail!(
            "private mode reaches relays only through a SOCKS5 proxy, not {p}: use a socks5:// proxy (Tor's SOCKS port)"
        ),
        Some(p) if !p.is_ip() => bail!(
            "private mode does no DNS of its own: give the proxy {p} by IP address, e.g. socks5://127.0.0.1:9050"
        ),
        Some(_) => Ok(()),
    }
}

/// Refuses settings the mode cannot honour, naming the setting and the fix: a mode's
/// promise is never quietly weakened by a leftover option.
fn check_mode(
    opts: &ShimOptions,
    punch: Option<bool>,
    udp_port: Option<u16>,
) -> anyhow::Result<()> {
    let mode = opts.policy.mode;
    if opts.socks_passthrough && !opts.policy.socks_passthrough_allowed {
        bail!(
            "socks_passthrough is not allowed in {} mode: the SOCKS door only carries names ending in .ferry there; remove it or use --mode p2p",
            mode.name()
        );
    }
    if mode != Mode::Private {
        return Ok(());
    }
    check_private_proxy(opts.proxy.as_ref())?;
    if !opts.addresses.is_empty() {
        bail!("private mode never announces an address: remove addresses = [...]");
    }
    if punch == Some(true) {
        bail!(
            "private mode never punches holes (that would reveal this node's address): remove punch = true / --punch"
        );
    }
    if udp_port.is_some() {
        bail!("private mode sends no UDP at all: remove udp_port / --udp-port");
    }
    if opts.punch_ttl.is_some() {
        bail!("private mode never punches holes: remove punch_ttl");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::SecretKey;
    use std::path::Path;

    /// Options from the config file at `path` alone.
    fn resolve_file(path: &Path) -> anyhow::Result<ShimOptions> {
        ShimOptions::resolve(
            ferry_proto::config::load_toml(path)?,
            CommonFlags::default(),
            vec![],
            vec![],
            vec![],
            false,
            vec![],
        )
    }

    #[test]
    fn services_and_destinations_parse_or_explain() {
        let s = parse_service("web=127.0.0.1:8080", true).unwrap();
        assert_eq!(s.name, "web");
        assert!(s.public);
        for bad in ["web", "web=127.0.0.1", "web=:80", "Web=h:1", "web=h:0"] {
            assert!(parse_service(bad, false).is_err(), "{bad}");
        }
        let id = SecretKey::generate().node_id();
        assert_eq!(parse_destination(&id.to_string()).unwrap(), (id, None));
        assert_eq!(
            parse_destination(&format!("{id}/web")).unwrap(),
            (id, Some("web".into()))
        );
        assert!(parse_destination("nope/web").is_err());
    }

    #[test]
    fn the_shipped_example_config_is_valid_once_the_relay_is_filled_in() {
        let example = include_str!("../../deploy/shim.toml");
        let relay = SecretKey::generate().node_id();
        let dir = std::env::temp_dir().join(format!("ferry-shim-example-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("shim.toml");
        std::fs::write(
            &path,
            example.replace("REPLACE-WITH-RELAY-NODE-ID", &relay.to_string()),
        )
        .unwrap();
        let opts = resolve_file(&path).unwrap();
        assert_eq!(opts.relays[0].relay_id, relay);
        assert_eq!(opts.services[0].name, "storage");
        assert!(opts.services[0].public);

        // Every commented-out setting is valid where it stands once uncommented
        // (the example's mode is strict, which all of them suit).
        let uncommented: String = example
            .replace("REPLACE-WITH-RELAY-NODE-ID", &relay.to_string())
            .replace(
                "RENDEZVOUS-NODE-ID",
                &SecretKey::generate().node_id().to_string(),
            )
            .lines()
            .map(|line| {
                let setting = line
                    .strip_prefix("# ")
                    .filter(|rest| {
                        rest.split_once(" = ")
                            .is_some_and(|(k, _)| !k.contains(' '))
                    })
                    .filter(|rest| !rest.starts_with("to ") && !rest.starts_with("listen "));
                format!("{}\n", setting.unwrap_or(line))
            })
            .collect();
        std::fs::write(&path, uncommented).unwrap();
        let all = resolve_file(&path).unwrap();
        assert_eq!(all.policy.mode, Mode::Strict);
        assert!(all.policy.punch && all.socks.is_some() && all.proxy.is_some());
        assert_eq!(all.addresses.len(), 1);
        assert!(all.rendezvous.is_some() && !all.relay_channel);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn modes_refuse_settings_they_cannot_honour() {
        let dir = std::env::temp_dir().join(format!("ferry-shim-mode-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("shim.toml");
        let relay = SecretKey::generate().node_id();
        let resolve = |body: &str| {
            std::fs::write(
                &path,
                format!("relays = [\"ferry://{relay}@relay.example:7842\"]\n{body}"),
            )
            .unwrap();
            resolve_file(&path)
        };
        let p2p = resolve("").unwrap();
        assert_eq!(p2p.policy.mode, Mode::P2p);
        assert!(p2p.policy.punch && p2p.relay_channel);

        let strict = resolve("mode = \"strict\"\npunch = true\n").unwrap();
        assert!(strict.policy.punch && !strict.policy.retry_punch);
        let err = resolve("mode = \"strict\"\nsocks_passthrough = true\n").unwrap_err();
        assert!(err.to_string().contains("strict mode"), "{err}");

        let private = resolve("mode = \"private\"\nproxy = \"socks5://127.0.0.1:9050\"\n").unwrap();
        assert!(!private.policy.udp && !private.relay_channel);
        for (body, says) in [
            ("", "socks5://127.0.0.1:9050"),
            (
                "proxy = \"http://127.0.0.1:3128\"\n",
                "only through a SOCKS5 proxy",
            ),
            ("proxy = \"socks5://tor.example:9050\"\n", "by IP address"),
            (
                "proxy = \"socks5://127.0.0.1:9050\"\naddresses = [\"203.0.113.1:4000\"]\n",
                "never announces",
            ),
            (
                "proxy = \"socks5://127.0.0.1:9050\"\npunch = true\n",
                "never punches",
            ),
            (
                "proxy = \"socks5://127.0.0.1:9050\"\nudp_port = 4000\n",
                "no UDP",
            ),
        ] {
            let err = resolve(&format!("mode = \"private\"\n{body}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{body}: {err}");
        }
        let err = resolve("mode = \"paranoid\"\n").unwrap_err();
        assert!(format!("{err:#}").contains("paranoid"), "{err:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn config_file_merges_and_checks() {
        let dir = std::env::temp_dir().join(format!("ferry-shim-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("shim.toml");
        let relay = SecretKey::generate().node_id();
        let peer = SecretKey::generate().node_id();
        std::fs::write(
            &path,
            format!(
                "relays = [\"ferry://{relay}@127.0.0.1:7842\"]\nallow = [\"{peer}\"]\n\n[[service]]\nname = \"web\"\ntarget = \"127.0.0.1:80\"\npublic = true\n\n[[forward]]\nto = \"{peer}/ssh\"\nlisten = \"127.0.0.1:2222\"\n"
            ),
        )
        .unwrap();
        let opts = resolve_file(&path).unwrap();
        assert_eq!(opts.relays[0].relay_id, relay);
        assert_eq!(opts.services[0].name, "web");
        assert_eq!(opts.allow, vec![peer]);
        assert_eq!(opts.forwards[0].service.as_deref(), Some("ssh"));

        std::fs::write(&path, "relays = []\nservices = []\n").unwrap();
        let err = resolve_file(&path).unwrap_err().to_string();
        assert!(err.contains("services"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
