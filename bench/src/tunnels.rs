//! Setting up each path a benchmark runs through. Every tunnel carries two services,
//! the iperf3 server (bulk) and the echo service (request/response), and is torn down
//! when dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::measure::wait_working;
use crate::procs::{Child, field, free_port, wait_for};

/// Each path's name, as the report shows it (here, where the paths are made, so the
/// report depends on the tunnels and not the other way round).
pub mod names {
    pub const RAW: &str = "raw loopback";
    pub const RATHOLE: &str = "rathole (Noise)";
    pub const DUMBPIPE: &str = "dumbpipe (iroh, direct)";
    pub const FERRY_PUBLIC: &str = "Ferry public port";
    pub const FERRY_RELAYED: &str = "Ferry overlay, relayed";
    pub const FERRY_DIRECT: &str = "Ferry overlay, direct";
}

/// Where a path's two services are reached, and the processes that make it.
pub struct Tunnel {
    pub name: &'static str,
    pub bulk: SocketAddr,
    pub rr: SocketAddr,
    pub _children: Vec<Child>,
}

/// The local services every tunnel leads to.
#[derive(Clone, Copy)]
pub struct Services {
    pub bulk: SocketAddr,
    pub rr: SocketAddr,
}

pub fn raw(services: Services) -> Tunnel {
    Tunnel {
        name: names::RAW,
        bulk: services.bulk,
        rr: services.rr,
        _children: Vec::new(),
    }
}

// ---------------------------------------------------------------- Ferry

/// Public-port ranges of the benchmark's relays, apart from each other and from the
/// integration tests' ranges (22500-23299), which may run at the same time.
const PORTS_PUBLIC: &str = "26000-26009";
const PORTS_RELAYED: &str = "26010-26019";
const PORTS_DIRECT: &str = "26020-26029";
pub const PORTS_START: &str = "26030-26039";
pub const PORTS_IDLE: &str = "26040-26049";
pub const PORTS_FLEET_A: &str = "26050-26059";
pub const PORTS_FLEET_B: &str = "26060-26069";

/// Ferry's programs, from one build.
pub struct FerryBins {
    pub relay: PathBuf,
    pub shim: PathBuf,
}

impl FerryBins {
    pub fn in_dir(dir: &Path) -> anyhow::Result<FerryBins> {
        let bins = FerryBins {
            relay: dir.join("ferry-relay"),
            shim: dir.join("ferry-shim"),
        };
        for bin in [&bins.relay, &bins.shim] {
            if !bin.exists() {
                bail!(
                    "{} is missing: build Ferry first (cargo build --release --workspace --bins) or pass --bin-dir",
                    bin.display()
                );
            }
        }
        Ok(bins)
    }
}

/// A relay on loopback with every per-IP limit out of the way (all load comes from
/// 127.0.0.1). Returns the process and its ready line.
pub fn ferry_relay(
    bins: &FerryBins,
    dir: &Path,
    name: &str,
    ports: &str,
    extra: &[&str],
) -> anyhow::Result<(Child, String)> {
    let data = dir.join(name);
    let mut args: Vec<String> = [
        "--data-dir",
        &data.display().to_string(),
        "--listen",
        "127.0.0.1:0",
        "--public-host",
        "127.0.0.1",
        "--ports",
        ports,
        "--admin",
        "127.0.0.1:0",
        "--handshakes-per-ip-per-sec",
        "10000000",
        "--connections-per-ip-per-sec",
        "10000000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if !extra.contains(&"--no-rendezvous") {
        args.extend(["--stun".into(), "127.0.0.1:0".into()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut relay = Child::spawn(name, &bins.relay, &args, dir)?;
    let ready = relay.wait_line("ferry-relay ready", Duration::from_secs(20))?;
    Ok((relay, ready))
}

fn get_json(url: &str) -> Option<serde_json::Value> {
    serde_json::from_str(&get_text(url)?).ok()
}

/// The body of a GET, or None when it cannot be had.
pub fn get_text(url: &str) -> Option<String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    agent.get(url).call().ok()?.body_mut().read_to_string().ok()
}

/// A shim; returns it with its admin URL and node ID.
pub fn ferry_shim(
    bins: &FerryBins,
    dir: &Path,
    name: &str,
    args: &[String],
) -> anyhow::Result<(Child, String, String)> {
    let mut all = args.to_vec();
    all.extend([
        "--data-dir".into(),
        dir.join(name).display().to_string(),
        "--admin".into(),
        "127.0.0.1:0".into(),
    ]);
    let mut shim = Child::spawn(name, &bins.shim, &all, dir)?;
    let ready = shim.wait_line("ferry-shim ready", Duration::from_secs(20))?;
    Ok((shim, field(&ready, "admin")?, field(&ready, "node_id")?))
}

/// The public address the relay gave `service`, from the shim's status.
pub fn public_addr(admin: &str, service: &str) -> anyhow::Result<SocketAddr> {
    wait_for(
        &format!("a public port for {service}"),
        Duration::from_secs(20),
        || {
            let status = get_json(&format!("{admin}/api/status"))?;
            status["services"]
                .as_array()?
                .iter()
                .find(|s| s["name"] == service)?["public"]
                .as_str()?
                .parse()
                .ok()
        },
    )
}

/// A relay and a shim exposing both services publicly on it (and to any node).
struct FerryServer {
    children: Vec<Child>,
    relay_url: String,
    node_id: String,
    admin: String,
}

fn ferry_server(
    bins: &FerryBins,
    dir: &Path,
    services: Services,
    ports: &str,
    relay_extra: &[&str],
) -> anyhow::Result<FerryServer> {
    let (relay, ready) = ferry_relay(bins, dir, "relay", ports, relay_extra)?;
    let relay_url = field(&ready, "url")?;
    let (server, admin, node_id) = ferry_shim(
        bins,
        dir,
        "server",
        &[
            "expose".into(),
            "--relay".into(),
            relay_url.clone(),
            "--service".into(),
            format!("bulk={}", services.bulk),
            "--service".into(),
            format!("rr={}", services.rr),
            "--public".into(),
            "--allow-any".into(),
        ],
    )?;
    public_addr(&admin, "rr")?;
    Ok(FerryServer {
        children: vec![relay, server],
        relay_url,
        node_id,
        admin,
    })
}

/// Stock client → relay public port → shim → service.
pub fn ferry_public(bins: &FerryBins, dir: &Path, services: Services) -> anyhow::Result<Tunnel> {
    let server = ferry_server(bins, dir, services, PORTS_PUBLIC, &["--no-rendezvous"])?;
    let tunnel = Tunnel {
        name: names::FERRY_PUBLIC,
        bulk: public_addr(&server.admin, "bulk")?,
        rr: public_addr(&server.admin, "rr")?,
        _children: server.children,
    };
    wait_working(tunnel.rr, Duration::from_secs(20))?;
    Ok(tunnel)
}

/// Local client → shim → (relay or direct) → shim → service, end-to-end QUIC.
pub fn ferry_overlay(
    bins: &FerryBins,
    dir: &Path,
    services: Services,
    direct: bool,
) -> anyhow::Result<Tunnel> {
    // Without a rendezvous there is no hole punching: every packet goes via the relay.
    let relay_extra: &[&str] = if direct { &[] } else { &["--no-rendezvous"] };
    let ports = if direct { PORTS_DIRECT } else { PORTS_RELAYED };
    let FerryServer {
        mut children,
        relay_url: url,
        node_id: server_id,
        ..
    } = ferry_server(bins, dir, services, ports, relay_extra)?;
    let (bulk_port, rr_port) = (free_port()?, free_port()?);
    let config = dir.join("client.toml");
    std::fs::write(
        &config,
        format!(
            "relays = [\"{url}\"]\n\n[[forward]]\nto = \"{server_id}/bulk\"\nlisten = \"127.0.0.1:{bulk_port}\"\n\n[[forward]]\nto = \"{server_id}/rr\"\nlisten = \"127.0.0.1:{rr_port}\"\n"
        ),
    )?;
    let (client, admin, _) = ferry_shim(
        bins,
        dir,
        "client",
        &[
            "run".into(),
            "--config".into(),
            config.display().to_string(),
        ],
    )?;
    children.push(client);
    let tunnel = Tunnel {
        name: if direct {
            names::FERRY_DIRECT
        } else {
            names::FERRY_RELAYED
        },
        bulk: SocketAddr::from(([127, 0, 0, 1], bulk_port)),
        rr: SocketAddr::from(([127, 0, 0, 1], rr_port)),
        _children: children,
    };
    wait_working(tunnel.rr, Duration::from_secs(20))?;
    let want = if direct { "direct" } else { "relayed" };
    wait_for(
        &format!("the peer path to be {want}"),
        Duration::from_secs(20),
        || {
            let status = get_json(&format!("{admin}/api/status"))?;
            (status["peers"].as_array()?.first()?["path"] == want).then_some(())
        },
    )
    .with_context(|| format!("{}: the path never became {want}", tunnel.name))?;
    Ok(tunnel)
}

// ---------------------------------------------------------------- peers

/// rathole with its Noise transport (encrypted, like Ferry's relay link).
pub fn rathole_noise(rathole: &Path, dir: &Path, services: Services) -> anyhow::Result<Tunnel> {
    let keys = std::process::Command::new(rathole)
        .arg("--genkey")
        .output()
        .context("rathole --genkey")?;
    let text = String::from_utf8_lossy(&keys.stdout).to_string();
    // "Private Key:\n<base64>\n\nPublic Key:\n<base64>"
    let after = |label: &str| -> anyhow::Result<String> {
        let mut lines = text.lines().skip_while(|l| !l.contains(label));
        lines.next();
        lines
            .next()
            .map(|l| l.trim().to_string())
            .with_context(|| format!("no {label} in rathole --genkey output: {text}"))
    };
    let (private, public) = (after("Private Key")?, after("Public Key")?);
    let (control, bulk, rr) = (free_port()?, free_port()?, free_port()?);
    let server = format!(
        "[server]\nbind_addr = \"127.0.0.1:{control}\"\ndefault_token = \"bench\"\n\n[server.transport]\ntype = \"noise\"\n\n[server.transport.noise]\nlocal_private_key = \"{private}\"\n\n[server.services.bulk]\nbind_addr = \"127.0.0.1:{bulk}\"\nnodelay = true\n\n[server.services.rr]\nbind_addr = \"127.0.0.1:{rr}\"\nnodelay = true\n"
    );
    let client = format!(
        "[client]\nremote_addr = \"127.0.0.1:{control}\"\ndefault_token = \"bench\"\n\n[client.transport]\ntype = \"noise\"\n\n[client.transport.noise]\nremote_public_key = \"{public}\"\n\n[client.services.bulk]\nlocal_addr = \"{}\"\nnodelay = true\n\n[client.services.rr]\nlocal_addr = \"{}\"\nnodelay = true\n",
        services.bulk, services.rr
    );
    let (server_toml, client_toml) = (
        dir.join("rathole-server.toml"),
        dir.join("rathole-client.toml"),
    );
    std::fs::write(&server_toml, server)?;
    std::fs::write(&client_toml, client)?;
    let server = Child::spawn(
        "rathole-server",
        rathole,
        &["--server".into(), server_toml.display().to_string()],
        dir,
    )?;
    let client = Child::spawn(
        "rathole-client",
        rathole,
        &["--client".into(), client_toml.display().to_string()],
        dir,
    )?;
    let tunnel = Tunnel {
        name: names::RATHOLE,
        bulk: SocketAddr::from(([127, 0, 0, 1], bulk)),
        rr: SocketAddr::from(([127, 0, 0, 1], rr)),
        _children: vec![server, client],
    };
    wait_working(tunnel.rr, Duration::from_secs(20))?;
    Ok(tunnel)
}

/// dumbpipe (iroh): one listen/connect pair per service, direct over loopback.
pub fn dumbpipe(dumbpipe: &Path, dir: &Path, services: Services) -> anyhow::Result<Tunnel> {
    let mut children = Vec::new();
    let mut pair = |name: &str, target: SocketAddr| -> anyhow::Result<SocketAddr> {
        let mut listen = Child::spawn(
            &format!("dumbpipe-listen-{name}"),
            dumbpipe,
            &["listen-tcp".into(), "--host".into(), target.to_string()],
            dir,
        )?;
        let line = listen.wait_line("connect-tcp", Duration::from_secs(60))?;
        let ticket = line
            .split_whitespace()
            .last()
            .context("no ticket in dumbpipe's output")?
            .to_string();
        let port = free_port()?;
        let connect = Child::spawn(
            &format!("dumbpipe-connect-{name}"),
            dumbpipe,
            &[
                "connect-tcp".into(),
                "--addr".into(),
                format!("127.0.0.1:{port}"),
                ticket,
            ],
            dir,
        )?;
        children.push(listen);
        children.push(connect);
        Ok(SocketAddr::from(([127, 0, 0, 1], port)))
    };
    let bulk = pair("bulk", services.bulk)?;
    let rr = pair("rr", services.rr)?;
    let tunnel = Tunnel {
        name: names::DUMBPIPE,
        bulk,
        rr,
        _children: children,
    };
    wait_working(tunnel.rr, Duration::from_secs(60))?;
    Ok(tunnel)
}
