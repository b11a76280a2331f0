//! The results: per-path medians, ratios against the peers measured in the same run,
//! the issue's targets with met / not met, as Markdown (for people and
//! BENCHMARKS.md) and JSON (for scripts).

use crate::load::IdleResult;
use crate::measure::median_p99;

pub use crate::tunnels::names::{
    DUMBPIPE, FERRY_DIRECT, FERRY_PUBLIC, FERRY_RELAYED, RATHOLE, RAW,
};

pub struct PathResult {
    pub name: &'static str,
    pub bits_per_second: Vec<f64>,
    pub first_byte_ms: Vec<f64>,
}

impl PathResult {
    pub fn new(name: &'static str) -> Self {
        PathResult {
            name,
            bits_per_second: Vec::new(),
            first_byte_ms: Vec::new(),
        }
    }

    fn gbps(&self) -> Option<f64> {
        median_p99(&self.bits_per_second).map(|(m, _)| m / 1e9)
    }

    fn first_byte(&self) -> Option<(f64, f64)> {
        median_p99(&self.first_byte_ms)
    }
}

pub struct Report {
    pub smoke: bool,
    date: String,
    machine: serde_json::Value,
    settings: serde_json::Value,
    pub skipped: Vec<(String, String)>,
    /// The paths, measured on the host's loopback and again at MTU 1500.
    pub regimes: Vec<Regime>,
    pub start_ms: Vec<f64>,
    pub stun_per_second: Option<f64>,
    pub idle: Option<IdleResult>,
    pub fleet: Option<FleetResult>,
}

/// Every path measured at one MTU.
pub struct Regime {
    pub name: String,
    pub mtu: u32,
    pub paths: Vec<PathResult>,
}

impl Regime {
    fn path(&self, name: &str) -> Option<&PathResult> {
        self.paths.iter().find(|p| p.name == name)
    }

    fn throughput_ratio(&self, ours: &str, theirs: &str) -> Option<f64> {
        Some(self.path(ours)?.gbps()? / self.path(theirs)?.gbps()?)
    }

    fn first_byte_median(&self, name: &str) -> Option<f64> {
        self.path(name).and_then(|p| p.first_byte()).map(|(m, _)| m)
    }

    /// The regime's table: each path's medians and its ratios to the baselines.
    fn markdown(&self) -> String {
        let mut md = format!("### Paths: {}\n\n", self.name);
        let raw = self.path(RAW).and_then(PathResult::gbps);
        let rathole = self.path(RATHOLE).and_then(PathResult::gbps);
        let dumbpipe = self.path(DUMBPIPE).and_then(PathResult::gbps);
        md.push_str("| path | throughput, Gbit/s (median) | ÷ raw | ÷ rathole (Noise) | ÷ dumbpipe | connect-to-first-byte median, ms | p99, ms |\n");
        md.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
        let ratio = |x: Option<f64>, base: Option<f64>| match x.zip(base) {
            Some((x, b)) if b > 0.0 => format!("{:.2}", x / b),
            _ => "–".to_string(),
        };
        for p in &self.paths {
            let g = p.gbps();
            let (fb, fb99) = match p.first_byte() {
                Some((m, p99)) => (format!("{m:.3}"), format!("{p99:.3}")),
                None => ("–".into(), "–".into()),
            };
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} | {fb} | {fb99} |\n",
                p.name,
                g.map(|g| format!("{g:.2}")).unwrap_or("–".into()),
                ratio(g, raw),
                ratio(g, rathole),
                ratio(g, dumbpipe),
            ));
        }
        md.push('\n');
        md
    }

    fn json(&self) -> Vec<serde_json::Value> {
        self.paths
            .iter()
            .map(|p| {
                let fb = p.first_byte();
                serde_json::json!({
                    "name": p.name,
                    "gbit_per_s_median": p.gbps(),
                    "gbit_per_s_rounds": p.bits_per_second.iter().map(|b| b / 1e9).collect::<Vec<_>>(),
                    "first_byte_ms_median": fb.map(|f| f.0),
                    "first_byte_ms_p99": fb.map(|f| f.1),
                    "first_byte_samples": p.first_byte_ms.len(),
                })
            })
            .collect()
    }
}

/// The fleet against the embedded store (`measure_fleet`).
pub struct FleetResult {
    pub embedded: IdleResult,
    pub fleet: IdleResult,
    /// From a node's registration at relay A until relay B's `locate` names A, ms.
    pub lookup_ms: Vec<f64>,
    /// The baseline: relay A's `locate` about its own node, ms.
    pub local_lookup_ms: Vec<f64>,
}

struct Target {
    what: String,
    goal: String,
    measured: Option<String>,
    met: Option<bool>,
}

fn command_output(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

impl Report {
    pub fn new(smoke: bool, settings: &serde_json::Value) -> Self {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
            .unwrap_or_default();
        let machine = serde_json::json!({
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "cpu": cpu,
            "kernel": command_output("uname", &["-r"]),
            "rustc": command_output("rustc", &["--version"]),
        });
        Report {
            smoke,
            date: command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            machine,
            settings: settings.clone(),
            skipped: Vec::new(),
            regimes: Vec::new(),
            start_ms: Vec::new(),
            stun_per_second: None,
            idle: None,
            fleet: None,
        }
    }

    /// Records and prints a skipped measurement (once: each regime's paths skip the
    /// same peers for the same reason).
    pub fn skip(&mut self, what: &str, why: &str) {
        let skip = (what.to_string(), why.to_string());
        if !self.skipped.contains(&skip) {
            eprintln!("SKIPPED {what}: {why}");
            self.skipped.push(skip);
        }
    }

    fn targets(&self) -> Vec<Target> {
        let mut targets = Vec::new();
        // The path targets hold in every regime: one row each per MTU measured.
        for regime in &self.regimes {
            let ratio_target = |what: &str, ours, theirs, goal: f64| {
                let r = regime.throughput_ratio(ours, theirs);
                Target {
                    what: format!("{what}, MTU {}", regime.mtu),
                    goal: format!("≥ {goal:.1}× {theirs}"),
                    measured: r.map(|r| format!("{r:.2}×")),
                    met: r.map(|r| r >= goal),
                }
            };
            targets.push(ratio_target(
                "public port throughput",
                FERRY_PUBLIC,
                RATHOLE,
                1.5,
            ));
            targets.push(ratio_target(
                "overlay relayed throughput",
                FERRY_RELAYED,
                DUMBPIPE,
                1.0,
            ));
            targets.push(ratio_target(
                "overlay direct throughput",
                FERRY_DIRECT,
                DUMBPIPE,
                1.3,
            ));
            let (ours_fb, rathole_fb) = (
                regime.first_byte_median(FERRY_PUBLIC),
                regime.first_byte_median(RATHOLE),
            );
            targets.push(Target {
                what: format!(
                    "public port connect-to-first-byte (median), MTU {}",
                    regime.mtu
                ),
                goal: format!("≤ {RATHOLE}'s"),
                measured: ours_fb
                    .zip(rathole_fb)
                    .map(|(o, r)| format!("{o:.2} ms vs {r:.2} ms")),
                met: ours_fb.zip(rathole_fb).map(|(o, r)| o <= r),
            });
        }
        let start = median_p99(&self.start_ms).map(|(m, _)| m);
        let per_node = self.idle.as_ref().map(IdleResult::bytes_per_node);
        let cpu = self
            .idle
            .as_ref()
            .and_then(|i| i.cpu)
            .map(|(share, _)| share);
        targets.extend([
            Target {
                what: "shim start to reachable (median)".into(),
                goal: "≤ 1 s".into(),
                measured: start.map(|m| format!("{m:.0} ms")),
                met: start.map(|m| m <= 1000.0),
            },
            Target {
                what: "relay memory per idle node".into(),
                goal: "≤ 16 KiB (10 KiB the stretch)".into(),
                measured: per_node.map(|b| format!("{:.1} KiB", b / 1024.0)),
                met: per_node.map(|b| b <= 16.0 * 1024.0),
            },
            Target {
                what: "relay CPU with the idle nodes".into(),
                goal: "≤ 10 % of one core".into(),
                measured: cpu.map(|c| format!("{:.1} %", c * 100.0)),
                met: cpu.map(|c| c <= 0.10),
            },
            Target {
                what: "STUN bindings per second".into(),
                goal: "≥ 100,000".into(),
                measured: self.stun_per_second.map(|r| format!("{r:.0}")),
                met: self.stun_per_second.map(|r| r >= 100_000.0),
            },
        ]);
        targets
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let title = if self.smoke {
            "Ferry benchmark (smoke run: the numbers mean little)"
        } else {
            "Ferry benchmark"
        };
        md.push_str(&format!(
            "## {title}\n\n{} · {} CPUs · {} · kernel {} · {}\n\n",
            self.date,
            self.machine["cpus"],
            self.machine["cpu"].as_str().unwrap_or("?"),
            self.machine["kernel"].as_str().unwrap_or("?"),
            self.machine["rustc"].as_str().unwrap_or("?"),
        ));
        md.push_str(&format!("Settings: `{}`\n\n", self.settings));
        for regime in &self.regimes {
            md.push_str(&regime.markdown());
        }
        if let Some((m, p99)) = median_p99(&self.start_ms) {
            md.push_str(&format!(
                "Shim start to first byte through its public port: median {m:.0} ms, max-rank p99 {p99:.0} ms ({} starts).\n\n",
                self.start_ms.len()
            ));
        }
        if let Some(r) = self.stun_per_second {
            md.push_str(&format!(
                "STUN: {r:.0} Binding answers per second (load generator on the same cores).\n\n"
            ));
        }
        if let Some(idle) = &self.idle {
            md.push_str(&format!(
                "Relay memory: {} idle registered nodes (QUIC) took RSS from {:.1} MiB to {:.1} MiB ({} s after the last registered, all still connected and pinging as shims do): {:.1} KiB per node; registered at {:.0} handshakes/s ({} retried).\n\n",
                idle.nodes,
                idle.rss_before as f64 / 1048576.0,
                idle.rss_after as f64 / 1048576.0,
                idle.settled_secs,
                idle.bytes_per_node() / 1024.0,
                idle.handshakes_per_sec,
                idle.retries
            ));
            if let Some((share, secs)) = idle.cpu {
                md.push_str(&format!(
                    "Relay CPU with them, over the {secs} s after: {:.1} % of one core (nodes send a session ping every {} s, as shims do).\n\n",
                    share * 100.0,
                    ferry_proto::limits::KEEPALIVE_INTERVAL.as_secs()
                ));
            }
        }
        if let Some(f) = &self.fleet {
            let (e, n) = (&f.embedded, &f.fleet);
            let writes = n
                .presence_writes
                .map(|(count, secs)| {
                    format!(
                        "; its one writer stored {count} presence keys at {:.0} per second",
                        count as f64 / secs.max(1e-9)
                    )
                })
                .unwrap_or_default();
            md.push_str(&format!(
                "Fleet (three-node NATS JetStream cluster on the same cores) against the embedded store, {} idle nodes each: registrations {:.0}/s embedded, {:.0}/s in the fleet ({:.2}×){writes}; relay memory {:.1} KiB per node embedded, {:.1} KiB in the fleet ({:.2}×).\n\n",
                e.nodes,
                e.handshakes_per_sec,
                n.handshakes_per_sec,
                n.handshakes_per_sec / e.handshakes_per_sec,
                e.bytes_per_node() / 1024.0,
                n.bytes_per_node() / 1024.0,
                n.bytes_per_node() / e.bytes_per_node(),
            ));
            if let (Some((fm, fp)), Some((lm, lp))) =
                (median_p99(&f.lookup_ms), median_p99(&f.local_lookup_ms))
            {
                md.push_str(&format!(
                    "Fleet lookup: from a node's registration at relay A until relay B's `locate` names A, median {fm:.2} ms, p99 {fp:.2} ms ({} nodes); the same question at relay A itself (the embedded answer), median {lm:.3} ms, p99 {lp:.3} ms.\n\n",
                    f.lookup_ms.len()
                ));
            }
        }
        md.push_str("| target | goal | measured | met |\n|---|---|---|---|\n");
        for t in self.targets() {
            md.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                t.what,
                t.goal,
                t.measured.unwrap_or("not measured".into()),
                match t.met {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "–",
                }
            ));
        }
        if !self.skipped.is_empty() {
            md.push_str("\nSkipped:\n\n");
            for (what, why) in &self.skipped {
                md.push_str(&format!("- {what}: {why}\n"));
            }
        }
        md
    }

    pub fn json(&self) -> serde_json::Value {
        let regimes: Vec<serde_json::Value> = self
            .regimes
            .iter()
            .map(|r| serde_json::json!({"name": r.name, "mtu": r.mtu, "paths": r.json()}))
            .collect();
        let targets: Vec<serde_json::Value> = self
            .targets()
            .into_iter()
            .map(|t| serde_json::json!({"target": t.what, "goal": t.goal, "measured": t.measured, "met": t.met}))
            .collect();
        serde_json::json!({
            "smoke": self.smoke,
            "date": self.date,
            "machine": self.machine,
            "settings": self.settings,
            // The host's loopback, as before regimes; every regime below.
            "paths": self.regimes.first().map(Regime::json).unwrap_or_default(),
            "regimes": regimes,
            "shim_start_ms": self.start_ms,
            "stun_per_second": self.stun_per_second,
            "idle": self.idle.as_ref().map(|i| serde_json::json!({
                "nodes": i.nodes,
                "rss_before": i.rss_before,
                "rss_after": i.rss_after,
                "settled_secs": i.settled_secs,
                "bytes_per_node": i.bytes_per_node(),
                "relay_cpu_cores": i.cpu.map(|(share, _)| share),
                "cpu_window_secs": i.cpu.map(|(_, secs)| secs),
                "handshakes_per_sec": i.handshakes_per_sec,
                "retries": i.retries,
            })),
            "fleet": self.fleet.as_ref().map(|f| serde_json::json!({
                "nodes": f.embedded.nodes,
                "embedded_registrations_per_sec": f.embedded.handshakes_per_sec,
                "fleet_registrations_per_sec": f.fleet.handshakes_per_sec,
                "embedded_bytes_per_node": f.embedded.bytes_per_node(),
                "fleet_bytes_per_node": f.fleet.bytes_per_node(),
                "fleet_presence_writes": f.fleet.presence_writes,
                "lookup_ms": median_p99(&f.lookup_ms),
                "local_lookup_ms": median_p99(&f.local_lookup_ms),
            })),
            "targets": targets,
            "skipped": self.skipped.iter().map(|(w, y)| serde_json::json!({"what": w, "why": y})).collect::<Vec<_>>(),
        })
    }
}
