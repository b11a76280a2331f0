//! `ferry-bench`: Ferry against raw loopback, rathole (Noise) and dumbpipe (iroh) in
//! one run, rounds interleaved so every path sees the same machine state; medians and
//! ratios printed, written as Markdown and JSON. It never fails on a number: a result
//! below target is reported, not an error. `bench/run` builds everything first.

mod load;
mod measure;
mod netns;
mod peers;
mod procs;
mod report;
mod tunnels;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use crate::report::{PathResult, Regime, Report};
use crate::tunnels::{FerryBins, Services, Tunnel};

#[derive(Debug, Parser)]
#[command(
    name = "ferry-bench",
    about = "Benchmarks Ferry against raw loopback, rathole (Noise) and dumbpipe (iroh) in one run",
    long_about = "Benchmarks Ferry against raw loopback, rathole (Noise) and dumbpipe (iroh) in one run.\n\n\
        Measures bulk throughput (iperf3) and connect-to-first-byte through every path, \
        rounds interleaved; relay memory per idle node; STUN bindings per second; shim \
        start to reachable. Prints a table with ratios and the targets of issue #5, and \
        writes results.md and results.json. Peers are built once into --cache; a peer \
        that cannot be had is skipped with a line saying why."
)]
struct Args {
    /// Seconds, rounds and counts small enough for CI (seconds, not minutes); numbers
    /// from it mean little. Never installs peers.
    #[arg(long)]
    smoke: bool,
    /// Directory with ferry-relay and ferry-shim [default: this program's directory].
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    /// Where peers are built and kept [default: ~/.cache/ferry-bench].
    #[arg(long, value_name = "DIR", env = "FERRY_BENCH_CACHE")]
    cache: Option<PathBuf>,
    /// Do not build missing peers; skip them.
    #[arg(long)]
    no_install: bool,
    /// Where results.md, results.json and the processes' logs go [default: target/bench].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Rounds over every path [default: 3; smoke 1].
    #[arg(long)]
    rounds: Option<u32>,
    /// Seconds of each iperf3 run [default: 8; smoke 1].
    #[arg(long)]
    seconds: Option<u32>,
    /// Connect-to-first-byte samples per path per round [default: 300; smoke 20].
    #[arg(long)]
    samples: Option<usize>,
    /// Idle nodes to hold on a relay for the memory figure [default: 100000; smoke 200].
    #[arg(long)]
    idle_nodes: Option<usize>,
    /// Seconds of STUN load [default: 5; smoke 1].
    #[arg(long)]
    stun_seconds: Option<f64>,
    /// Shim starts to time [default: 5; smoke 2].
    #[arg(long)]
    starts: Option<usize>,
    /// Idle nodes per relay for the fleet's figures, with and without --fleet
    /// [default: 20000; smoke 200].
    #[arg(long)]
    fleet_nodes: Option<usize>,
    /// Nodes looked up across the fleet for its lookup latency [default: 200; smoke 10].
    #[arg(long)]
    lookups: Option<usize>,
    /// Measure the paths on the host's loopback only, without the second run at MTU
    /// 1500 in a network namespace (which needs root).
    #[arg(long)]
    no_mtu_1500: bool,
    /// Run only these parts (comma-separated: paths, start, stun, idle, fleet) [default: all].
    #[arg(long, value_delimiter = ',', value_name = "PARTS")]
    only: Vec<Part>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    /// Throughput and connect-to-first-byte through every path, on the host's
    /// loopback and again at MTU 1500.
    Paths,
    /// Shim start to reachable.
    Start,
    /// STUN bindings per second.
    Stun,
    /// Relay memory per idle node.
    Idle,
    /// A fleet on NATS JetStream against the embedded store: registrations per
    /// second, memory per idle node, lookup latency across relays.
    Fleet,
}

struct Settings {
    rounds: u32,
    seconds: u32,
    samples: usize,
    idle_nodes: usize,
    stun_seconds: f64,
    starts: usize,
    fleet_nodes: usize,
    lookups: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let pick = |given: Option<u64>, full: u64, smoke: u64| {
        given.unwrap_or(if args.smoke { smoke } else { full })
    };
    let settings = Settings {
        rounds: pick(args.rounds.map(u64::from), 3, 1) as u32,
        seconds: pick(args.seconds.map(u64::from), 8, 1) as u32,
        samples: pick(args.samples.map(|n| n as u64), 300, 20) as usize,
        idle_nodes: pick(args.idle_nodes.map(|n| n as u64), 100_000, 200) as usize,
        stun_seconds: args
            .stun_seconds
            .unwrap_or(if args.smoke { 1.0 } else { 5.0 }),
        starts: pick(args.starts.map(|n| n as u64), 5, 2) as usize,
        fleet_nodes: pick(args.fleet_nodes.map(|n| n as u64), 20_000, 200) as usize,
        lookups: pick(args.lookups.map(|n| n as u64), 200, 10) as usize,
    };
    let bin_dir = match args.bin_dir {
        Some(dir) => dir,
        None => std::env::current_exe()?
            .parent()
            .context("this program's directory")?
            .to_path_buf(),
    };
    let bins = FerryBins::in_dir(&bin_dir)?;
    let cache = args.cache.unwrap_or_else(|| {
        std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir)
            .join(".cache/ferry-bench")
    });
    let out = args.out.unwrap_or_else(|| PathBuf::from("target/bench"));
    let logs = out.join("logs");
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs).with_context(|| format!("create {}", logs.display()))?;
    let install = !args.no_install && !args.smoke;
    let runs = |part: Part| args.only.is_empty() || args.only.contains(&part);

    let mut report = Report::new(args.smoke, &settings_json(&settings, &bin_dir));
    let iperf3 = peers::iperf3()
        .map_err(|why| report.skip("bulk throughput (every path)", &why))
        .ok();

    let subdir = |name: &str| -> anyhow::Result<PathBuf> {
        let dir = logs.join(name);
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    };
    if runs(Part::Paths) {
        let host_mtu = netns::loopback_mtu()?;
        let paths = measure_paths(
            &mut report,
            &settings,
            &bins,
            &cache,
            install,
            iperf3.as_deref(),
            &|name| subdir(name),
        )?;
        report.regimes.push(Regime {
            name: format!("loopback, MTU {host_mtu}"),
            mtu: host_mtu,
            paths,
        });
        if !args.no_mtu_1500 {
            let mtu = netns::INTERNET_MTU;
            eprintln!("the paths again at MTU {mtu} (a network namespace)");
            let measured = netns::with_mtu(mtu, || {
                measure_paths(
                    &mut report,
                    &settings,
                    &bins,
                    &cache,
                    install,
                    iperf3.as_deref(),
                    &|name| subdir(&format!("mtu{mtu}-{name}")),
                )
            });
            match measured {
                Ok(paths) => report.regimes.push(Regime {
                    name: format!("namespace loopback, MTU {mtu}"),
                    mtu,
                    paths,
                }),
                Err(e) => report.skip(&format!("the paths at MTU {mtu}"), &format!("{e:#}")),
            }
        }
    }
    if runs(Part::Start) {
        eprintln!("shim start to reachable ({} starts)", settings.starts);
        let dir = subdir("ferry-start")?;
        let (_relay, ready) = tunnels::ferry_relay(
            &bins,
            &dir,
            "relay",
            tunnels::PORTS_START,
            &["--no-rendezvous"],
        )?;
        let url = procs::field(&ready, "url")?;
        // The first start makes the key and learns the port; the rest are timed.
        let rr = measure::echo_service()?;
        let (_, public) = load::start_to_reachable(&bins, &dir, &url, rr, None)?;
        for _ in 0..settings.starts {
            let (took, _) = load::start_to_reachable(&bins, &dir, &url, rr, Some(public))?;
            report.start_ms.push(took.as_secs_f64() * 1e3);
        }
    }
    if runs(Part::Stun) {
        eprintln!("STUN bindings per second ({} s)", settings.stun_seconds);
        let dir = subdir("ferry-stun")?;
        let (_relay, ready) =
            tunnels::ferry_relay(&bins, &dir, "relay", tunnels::PORTS_START, &[])?;
        let stun: std::net::SocketAddr = procs::field(&ready, "stun")?.parse()?;
        report.stun_per_second = Some(load::stun_rate(stun, settings.stun_seconds, 4)?);
    }

    if runs(Part::Idle) {
        eprintln!("relay memory with {} idle nodes", settings.idle_nodes);
        // A failed measurement is reported, not fatal: the parts measured before it
        // (minutes of them) still reach the report.
        // Two ping rounds: each node's session ping and its answer, twice.
        let cpu_window = if args.smoke {
            Duration::from_secs(2)
        } else {
            ferry_proto::limits::KEEPALIVE_INTERVAL * 2
        };
        let dir = subdir("ferry-idle")?;
        match load::idle_nodes(&bins, &dir, settings.idle_nodes, &[], cpu_window) {
            Ok(idle) => report.idle = Some(idle),
            Err(e) => report.skip("relay memory per idle node", &format!("{e:#}")),
        }
    }

    if runs(Part::Fleet) {
        match load::nats_server() {
            None => report.skip(
                "the fleet (NATS JetStream)",
                "no nats-server: apt install nats-server (bench/run does)",
            ),
            Some(nats) => match measure_fleet(&bins, &nats, &settings, &subdir) {
                Ok(fleet) => report.fleet = Some(fleet),
                Err(e) => report.skip("the fleet (NATS JetStream)", &format!("{e:#}")),
            },
        }
    }

    let markdown = report.markdown();
    println!("{markdown}");
    std::fs::write(out.join("results.md"), &markdown)?;
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&report.json())?,
    )?;
    eprintln!(
        "wrote {} and {}",
        out.join("results.md").display(),
        out.join("results.json").display()
    );
    Ok(())
}

/// Starts the services (iperf3's server, the echo service) and every path to them in
/// the calling thread's network namespace, then measures the paths in interleaved
/// rounds.
fn measure_paths(
    report: &mut Report,
    settings: &Settings,
    bins: &FerryBins,
    cache: &std::path::Path,
    install: bool,
    iperf3: Option<&std::path::Path>,
    subdir: &dyn Fn(&str) -> anyhow::Result<PathBuf>,
) -> anyhow::Result<Vec<PathResult>> {
    let services = Services {
        bulk: match iperf3 {
            Some(_) => std::net::SocketAddr::from(([127, 0, 0, 1], procs::free_port()?)),
            None => measure::echo_service()?,
        },
        rr: measure::echo_service()?,
    };
    let _iperf3_server = match iperf3 {
        Some(bin) => Some(measure::iperf3_server(
            bin,
            services.bulk.port(),
            &subdir("iperf3")?,
        )?),
        None => None,
    };
    let mut tunnels: Vec<Tunnel> = vec![tunnels::raw(services)];
    match peers::RATHOLE.find(cache, install) {
        Ok(bin) => match tunnels::rathole_noise(&bin, &subdir("rathole")?, services) {
            Ok(t) => tunnels.push(t),
            Err(e) => report.skip(report::RATHOLE, &format!("{e:#}")),
        },
        Err(why) => report.skip(report::RATHOLE, &why),
    }
    match peers::DUMBPIPE.find(cache, install) {
        Ok(bin) => match tunnels::dumbpipe(&bin, &subdir("dumbpipe")?, services) {
            Ok(t) => tunnels.push(t),
            Err(e) => report.skip(report::DUMBPIPE, &format!("{e:#}")),
        },
        Err(why) => report.skip(report::DUMBPIPE, &why),
    }
    // Ferry's own paths must work: an error here is a broken build, not a skip.
    tunnels.push(tunnels::ferry_public(
        bins,
        &subdir("ferry-public")?,
        services,
    )?);
    tunnels.push(tunnels::ferry_overlay(
        bins,
        &subdir("ferry-relayed")?,
        services,
        false,
    )?);
    tunnels.push(tunnels::ferry_overlay(
        bins,
        &subdir("ferry-direct")?,
        services,
        true,
    )?);

    let mut results: Vec<PathResult> = tunnels.iter().map(|t| PathResult::new(t.name)).collect();
    for round in 1..=settings.rounds {
        eprintln!("round {round} of {}", settings.rounds);
        for (tunnel, result) in tunnels.iter().zip(results.iter_mut()) {
            if let Some(bin) = iperf3 {
                let bps = measure::iperf3_bulk(bin, tunnel.bulk, settings.seconds)
                    .with_context(|| format!("bulk through {}", tunnel.name))?;
                eprintln!("  {:<26} {:>8.2} Gbit/s", tunnel.name, bps / 1e9);
                result.bits_per_second.push(bps);
            }
            for _ in 0..settings.samples {
                let took = measure::connect_to_first_byte(tunnel.rr)
                    .with_context(|| format!("request/response through {}", tunnel.name))?;
                result.first_byte_ms.push(took.as_secs_f64() * 1e3);
            }
        }
    }
    drop(tunnels);
    Ok(results)
}

/// The fleet against the embedded store, in one run: the same number of idle nodes
/// registered on a relay without and with `--fleet` (a three-node NATS cluster on
/// loopback), then lookups across two fleet relays.
fn measure_fleet(
    bins: &FerryBins,
    nats: &std::path::Path,
    settings: &Settings,
    subdir: &dyn Fn(&str) -> anyhow::Result<PathBuf>,
) -> anyhow::Result<report::FleetResult> {
    let dir = subdir("ferry-fleet")?;
    let (_nats, urls) = load::nats_cluster(nats, &dir, 26100)?;
    let fleet = [
        "--fleet",
        &urls,
        "--fleet-name",
        "bench",
        "--fleet-replicas",
        "3",
    ];
    eprintln!(
        "fleet: {} idle nodes on a relay without, then with --fleet",
        settings.fleet_nodes
    );
    let embedded = load::idle_nodes(
        bins,
        &subdir("ferry-fleet-embedded")?,
        settings.fleet_nodes,
        &[],
        Duration::ZERO,
    )?;
    let in_fleet = load::idle_nodes(
        bins,
        &subdir("ferry-fleet-idle")?,
        settings.fleet_nodes,
        &fleet,
        Duration::ZERO,
    )?;
    eprintln!("fleet: {} lookups across two relays", settings.lookups);
    let mut args = vec!["--no-rendezvous"];
    args.extend_from_slice(&fleet);
    let (_a, a_ready) = tunnels::ferry_relay(bins, &dir, "relay-a", tunnels::PORTS_FLEET_A, &args)?;
    let (_b, b_ready) = tunnels::ferry_relay(bins, &dir, "relay-b", tunnels::PORTS_FLEET_B, &args)?;
    for ready in [&a_ready, &b_ready] {
        let info = format!("{}/api/info", procs::field(ready, "admin")?);
        procs::wait_for("both relays in the fleet", Duration::from_secs(60), || {
            let text = tunnels::get_text(&info)?;
            let info: serde_json::Value = serde_json::from_str(&text).ok()?;
            (info["fleet"]["relays"].as_array()?.len() == 1).then_some(())
        })?;
    }
    let (lookup_ms, local_lookup_ms) = load::lookup_latency(&a_ready, &b_ready, settings.lookups)?;
    Ok(report::FleetResult {
        embedded,
        fleet: in_fleet,
        lookup_ms,
        local_lookup_ms,
    })
}

fn settings_json(s: &Settings, bin_dir: &std::path::Path) -> serde_json::Value {
    serde_json::json!({
        "rounds": s.rounds,
        "iperf3_seconds": s.seconds,
        "first_byte_samples_per_round": s.samples,
        "idle_nodes": s.idle_nodes,
        "stun_seconds": s.stun_seconds,
        "shim_starts": s.starts,
        "fleet_nodes": s.fleet_nodes,
        "fleet_lookups": s.lookups,
        "ferry_binaries": bin_dir.display().to_string(),
    })
}
