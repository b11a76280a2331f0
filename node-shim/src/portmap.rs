//! Port mapping on the home router (p2p mode; Tahoe ticket #49): asks the router to
//! forward a public port to the shim's one UDP socket, so that peers behind NATs
//! that could not punch a hole to us (a symmetric NAT on their side) reach us
//! directly. PCP (RFC 6887) first, then NAT-PMP (RFC 6886) — both `crab_nat` —
//! then UPnP-IGD (`igd-next`). The mapping is renewed at half its lifetime, retried
//! with backoff when the router stops answering, and removed on shutdown.
//!
//! When to ask, renew and retry is [`Schedule`], a plain state machine; the driver
//! ([`start`]) does the talking.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::num::NonZeroU16;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::path_manager::PathEvent;
use ferry_proto::sync::lock;

/// Lifetime asked for: two hours, as RFC 6886 recommends. Routers may grant less.
const LIFETIME: Duration = Duration::from_secs(7200);

/// How long one protocol may take to answer before the next is tried. The router is
/// one hop away: a silent one does not support the protocol.
const PROTOCOL_TIMEOUT: Duration = Duration::from_secs(2);

/// Waits before asking again after every protocol failed (the last entry repeats).
const RETRY_DELAYS: [Duration; 4] = [
    Duration::from_secs(30),
    Duration::from_secs(60),
    Duration::from_secs(300),
    Duration::from_secs(900),
];

/// Wait before the first request. Routers answer a protocol they do not speak with
/// ICMP port-unreachable, which draws on the same per-host ICMP budget as the
/// time-exceeded answers that finding the priming TTL needs right after start
/// (`crate::hops`); a few seconds keep the two apart.
const FIRST_ATTEMPT_AFTER: Duration = Duration::from_secs(3);

/// How long removing the mapping on shutdown may take.
pub const REMOVE_TIMEOUT: Duration = Duration::from_secs(1);

/// `port_mapping = [...]` entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    Pcp,
    NatPmp,
    Upnp,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Pcp, Protocol::NatPmp, Protocol::Upnp];

    pub fn name(self) -> &'static str {
        match self {
            Protocol::Pcp => "pcp",
            Protocol::NatPmp => "nat-pmp",
            Protocol::Upnp => "upnp",
        }
    }
}

/// What `/api/status` shows of the mapping.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MappingView {
    pub protocol: Protocol,
    /// The router's address on this node's network.
    pub gateway: IpAddr,
    /// The external address the router reports.
    pub external: SocketAddr,
    pub internal: SocketAddr,
    /// Unix time when the lease runs out unless renewed.
    pub expires: u64,
}

/// When to (re)map. Fed the outcome of each attempt and the time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    next: Instant,
    failures: usize,
}

impl Schedule {
    pub fn new(now: Instant) -> Self {
        Schedule {
            next: now,
            failures: 0,
        }
    }

    /// When the next attempt (first mapping, renewal or retry) is due.
    pub fn next(&self) -> Instant {
        self.next
    }

    /// A mapping was made or renewed for `lifetime`: renew at half of it (at least a
    /// few seconds on, so a router granting tiny leases cannot make us spin).
    pub fn mapped(&mut self, now: Instant, lifetime: Duration) {
        self.failures = 0;
        self.next = now + (lifetime / 2).max(Duration::from_secs(5));
    }

    /// Every protocol failed: retry after a growing delay.
    pub fn failed(&mut self, now: Instant) {
        let delay = RETRY_DELAYS
            .get(self.failures)
            .or(RETRY_DELAYS.last())
            .copied()
            .unwrap_or(Duration::from_secs(900));
        self.failures += 1;
        self.next = now + delay;
    }
}

/// A live mapping and how to renew or remove it.
enum Live {
    /// PCP or NAT-PMP (which one is in the mapping itself).
    Crab(crab_nat::PortMapping),
    Upnp {
        gateway: igd_next::aio::Gateway<igd_next::aio::tokio::Tokio>,
        external_port: u16,
        internal: SocketAddrV4,
    },
}

struct Mapped {
    live: Live,
    view: MappingView,
    lifetime: Duration,
}

/// The mapping shown in status; shared with the path manager's view.
pub type SharedView = Arc<Mutex<Option<MappingView>>>;

/// Keeps a mapping of `port` (the shim's UDP socket) on the default gateway until
/// `shutdown`, then removes it. Each change goes to the path manager as
/// [`PathEvent::PortMapped`] and into `view`. The returned task ends once the mapping
/// is removed.
pub fn start(
    protocols: Vec<Protocol>,
    port: u16,
    events: mpsc::Sender<PathEvent>,
    view: SharedView,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Some(port) = NonZeroU16::new(port) else {
            return;
        };
        let mut schedule = Schedule::new(Instant::now() + FIRST_ATTEMPT_AFTER);
        let mut current: Option<Mapped> = None;
        loop {
            let wake = tokio::time::Instant::from_std(schedule.next());
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                _ = shutdown.cancelled() => break,
            }
            let now = Instant::now();
            let renewed = match current.as_mut() {
                Some(m) => match renew(m).await {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(
                            "the router stopped renewing port mapping {} ({}): {e}; mapping again",
                            m.view.external,
                            m.view.protocol.name()
                        );
                        false
                    }
                },
                None => false,
            };
            if renewed {
                if let Some(m) = &current {
                    schedule.mapped(now, m.lifetime);
                    *lock(&view) = Some(m.view.clone());
                    tracing::debug!("renewed the port mapping {}", m.view.external);
                }
                continue;
            }
            current = None;
            match map(&protocols, port).await {
                Ok(m) => {
                    tracing::info!(
                        "the router {} forwards {} to this node ({}, {} s lease)",
                        m.view.gateway,
                        m.view.external,
                        m.view.protocol.name(),
                        m.lifetime.as_secs()
                    );
                    schedule.mapped(now, m.lifetime);
                    *lock(&view) = Some(m.view.clone());
                    let _ = events
                        .send(PathEvent::PortMapped(Some((
                            m.view.external.ip(),
                            m.view.external.port(),
                        ))))
                        .await;
                    current = Some(m);
                }
                Err(why) => {
                    schedule.failed(now);
                    tracing::info!(
                        "no port mapping ({why}); retrying in {} s",
                        schedule.next().saturating_duration_since(now).as_secs()
                    );
                    if lock(&view).take().is_some() {
                        let _ = events.send(PathEvent::PortMapped(None)).await;
                    }
                }
            }
        }
        if let Some(m) = current {
            let external = m.view.external;
            match tokio::time::timeout(REMOVE_TIMEOUT, remove(m)).await {
                Ok(Ok(())) => tracing::info!("removed the port mapping {external}"),
                Ok(Err(e)) => tracing::warn!("could not remove the port mapping {external}: {e}"),
                Err(_) => tracing::warn!(
                    "the router did not confirm removing the port mapping {external}; it expires with its lease"
                ),
            }
            lock(&view).take();
        }
    })
}

/// Whether a port mapping can help: only when some relay is beyond this host. With
/// every relay on loopback (a development or test setup) no node elsewhere can be
/// coordinating with this one, and asking the router would only be noise on the LAN.
pub fn worth_mapping(relays: &[ferry_proto::RelayUrl]) -> bool {
    relays
        .iter()
        .any(|r| !ferry_proto::net::is_this_machine(&r.host))
}

/// The default gateway (IPv4) from the kernel's routing table, and this host's
/// address on the gateway's network. Read from /proc/net/route: Linux only, and a
/// crate for one line of a text file would be overkill.
fn gateway() -> Result<(Ipv4Addr, Ipv4Addr), String> {
    let table = std::fs::read_to_string("/proc/net/route")
        .map_err(|e| format!("cannot read the routing table: {e}"))?;
    let gateway = parse_default_gateway(&table).ok_or("no default IPv4 route")?;
    let local = if_addrs::get_if_addrs()
        .map_err(|e| format!("cannot list interfaces: {e}"))?
        .into_iter()
        .find_map(|iface| match iface.addr {
            if_addrs::IfAddr::V4(v4) => {
                let mask = u32::from(v4.netmask);
                (u32::from(v4.ip) & mask == u32::from(gateway) & mask && !v4.ip.is_loopback())
                    .then_some(v4.ip)
            }
            _ => None,
        })
        .ok_or_else(|| format!("no interface on the network of the gateway {gateway}"))?;
    Ok((gateway, local))
}

/// The gateway of the default route in the text of /proc/net/route.
pub fn parse_default_gateway(table: &str) -> Option<Ipv4Addr> {
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (destination, gateway, mask) = (fields.get(1)?, fields.get(2)?, fields.get(7)?);
        if *destination != "00000000" || *mask != "00000000" {
            return None;
        }
        // Hex of the address in the kernel's (little-endian) byte order.
        let raw = u32::from_str_radix(gateway, 16).ok()?;
        let ip = Ipv4Addr::from(raw.to_le_bytes());
        (!ip.is_unspecified()).then_some(ip)
    })
}

fn timeouts() -> crab_nat::TimeoutConfig {
    crab_nat::TimeoutConfig {
        initial_timeout: Duration::from_millis(250),
        max_retries: 2,
        max_retry_timeout: Some(Duration::from_secs(1)),
    }
}

fn options(port: NonZeroU16) -> crab_nat::PortMappingOptions {
    crab_nat::PortMappingOptions {
        // The same port outside as inside, when the router can: the mapping then
        // agrees with what a port-preserving NAT does anyway.
        external_port: Some(port),
        lifetime_seconds: Some(LIFETIME.as_secs() as u32),
        timeout_config: Some(timeouts()),
    }
}

fn expires(lifetime: Duration) -> u64 {
    (SystemTime::now() + lifetime)
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Tries each protocol in turn; the first that maps wins.
async fn map(protocols: &[Protocol], port: NonZeroU16) -> Result<Mapped, String> {
    let (gateway, local) = gateway()?;
    let mut errors = Vec::new();
    for protocol in protocols {
        let attempt = tokio::time::timeout(
            PROTOCOL_TIMEOUT * 2,
            map_with(*protocol, gateway, local, port),
        )
        .await
        .unwrap_or_else(|_| Err("no answer".into()));
        match attempt {
            Ok(m) => return Ok(m),
            Err(e) => errors.push(format!("{}: {e}", protocol.name())),
        }
    }
    Err(format!("router {gateway}: {}", errors.join("; ")))
}

async fn map_with(
    protocol: Protocol,
    gateway: Ipv4Addr,
    local: Ipv4Addr,
    port: NonZeroU16,
) -> Result<Mapped, String> {
    let internal = SocketAddrV4::new(local, port.get());
    let crab = |m: crab_nat::PortMapping, external_ip: IpAddr, live: Live| {
        let lifetime = Duration::from_secs(m.lifetime().into());
        Mapped {
            view: MappingView {
                protocol,
                gateway: gateway.into(),
                external: SocketAddr::new(external_ip, m.external_port().get()),
                internal: internal.into(),
                expires: expires(lifetime),
            },
            lifetime,
            live,
        }
    };
    match protocol {
        Protocol::Pcp => {
            let request = crab_nat::pcp::BaseMapRequest::new(
                gateway.into(),
                local.into(),
                crab_nat::InternetProtocol::Udp,
                port,
            );
            let m = crab_nat::pcp::port_mapping(request, None, None, options(port))
                .await
                .map_err(|e| e.to_string())?;
            let external_ip = match m.mapping_type() {
                crab_nat::PortMappingType::Pcp { external_ip, .. } => external_ip,
                crab_nat::PortMappingType::NatPmp => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            };
            Ok(crab(m.clone(), external_ip, Live::Crab(m)))
        }
        Protocol::NatPmp => {
            let m = crab_nat::natpmp::port_mapping(
                gateway.into(),
                crab_nat::InternetProtocol::Udp,
                port,
                options(port),
            )
            .await
            .map_err(|e| e.to_string())?;
            let external_ip = crab_nat::natpmp::external_address(gateway.into(), Some(timeouts()))
                .await
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
            Ok(crab(m.clone(), external_ip, Live::Crab(m)))
        }
        Protocol::Upnp => {
            let mut search = igd_next::SearchOptions::default();
            search.bind_addr = SocketAddr::new(local.into(), 0);
            search.timeout = Some(PROTOCOL_TIMEOUT);
            search.single_search_timeout = Some(PROTOCOL_TIMEOUT);
            let gw = igd_next::aio::tokio::search_gateway(search)
                .await
                .map_err(|e| e.to_string())?;
            let external_ip = gw.get_external_ip().await.map_err(|e| e.to_string())?;
            let lease = LIFETIME.as_secs() as u32;
            let external_port = match gw
                .add_port(
                    igd_next::PortMappingProtocol::UDP,
                    port.get(),
                    internal.into(),
                    lease,
                    "ferry-shim",
                )
                .await
            {
                Ok(()) => port.get(),
                // The same port is taken (another host, or a stale mapping): any port.
                Err(_) => gw
                    .add_any_port(
                        igd_next::PortMappingProtocol::UDP,
                        internal.into(),
                        lease,
                        "ferry-shim",
                    )
                    .await
                    .map_err(|e| e.to_string())?,
            };
            Ok(Mapped {
                view: MappingView {
                    protocol,
                    gateway: gateway.into(),
                    external: SocketAddr::new(external_ip, external_port),
                    internal: internal.into(),
                    expires: expires(LIFETIME),
                },
                lifetime: LIFETIME,
                live: Live::Upnp {
                    gateway: gw,
                    external_port,
                    internal,
                },
            })
        }
    }
}

async fn renew(m: &mut Mapped) -> Result<(), String> {
    match &mut m.live {
        Live::Crab(p) => {
            p.renew().await.map_err(|e| e.to_string())?;
            m.lifetime = Duration::from_secs(p.lifetime().into());
        }
        Live::Upnp {
            gateway,
            external_port,
            internal,
        } => {
            gateway
                .add_port(
                    igd_next::PortMappingProtocol::UDP,
                    *external_port,
                    (*internal).into(),
                    m.lifetime.as_secs() as u32,
                    "ferry-shim",
                )
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    m.view.expires = expires(m.lifetime);
    Ok(())
}

async fn remove(m: Mapped) -> Result<(), String> {
    match m.live {
        Live::Crab(p) => p.try_drop().await.map_err(|(e, _)| e.to_string()),
        Live::Upnp {
            gateway,
            external_port,
            ..
        } => gateway
            .remove_port(igd_next::PortMappingProtocol::UDP, external_port)
            .await
            .map_err(|e| e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewals_come_at_half_the_lease_and_retries_back_off() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0);
        assert_eq!(s.next(), t0, "the first attempt is at once");
        s.mapped(t0, Duration::from_secs(7200));
        assert_eq!(s.next(), t0 + Duration::from_secs(3600));
        s.mapped(t0, Duration::from_secs(2));
        assert_eq!(
            s.next(),
            t0 + Duration::from_secs(5),
            "tiny leases cannot make us spin"
        );
        let mut waits = Vec::new();
        for _ in 0..6 {
            s.failed(t0);
            waits.push(s.next() - t0);
        }
        assert_eq!(
            waits.iter().map(Duration::as_secs).collect::<Vec<_>>(),
            vec![30, 60, 300, 900, 900, 900]
        );
        s.mapped(t0, Duration::from_secs(600));
        s.failed(t0);
        assert_eq!(
            s.next() - t0,
            Duration::from_secs(30),
            "success resets the backoff"
        );
    }

    #[test]
    fn the_default_gateway_is_read_from_the_routing_table() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t0002A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                     eth0\t00000000\t0102A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(
            parse_default_gateway(table),
            Some(Ipv4Addr::new(192, 168, 2, 1))
        );
        assert_eq!(parse_default_gateway("Iface\tDestination\n"), None);
        assert_eq!(parse_default_gateway("header\ngarbage line\n"), None);
    }

    #[test]
    fn relays_on_this_host_need_no_mapping() {
        let id = ferry_proto::SecretKey::generate().node_id();
        let url = |host: &str| -> ferry_proto::RelayUrl {
            format!("ferry://{id}@{host}:7842").parse().unwrap()
        };
        assert!(!worth_mapping(&[]));
        assert!(!worth_mapping(&[
            url("127.0.0.1"),
            url("localhost"),
            url("[::1]")
        ]));
        assert!(worth_mapping(&[url("127.0.0.1"), url("relay.example")]));
        assert!(worth_mapping(&[url("198.18.1.2")]));
    }

    #[test]
    fn protocol_names_match_the_config_keys() {
        for p in Protocol::ALL {
            let parsed: Protocol =
                serde_json::from_value(serde_json::Value::String(p.name().into())).unwrap();
            assert_eq!(parsed, p);
        }
    }
}
