//! A real Prometheus server (Debian's `prometheus`) scrapes a relay, a standalone
//! rendezvous and two shims once a second while traffic flows, and everything is
//! asserted through Prometheus's HTTP query API: byte counters move while a connection
//! is still open (not only when it ends), gauges rise and fall, the setup-time
//! histograms filled, the rendezvous counted STUN and records, and every series is
//! one README's metrics table documents.
//!
//! Skipped (with a message) when no `prometheus` binary is installed, except in CI
//! (`CI` set), where `.ci/run` installs it and a missing binary fails the test.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_tests::*;

const MIB: usize = 1024 * 1024;

/// The `prometheus` binary, or `None` (outside CI) when it is not installed.
fn prometheus_binary() -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var("FERRY_PROMETHEUS").unwrap_or("prometheus".into()));
    let found = std::process::Command::new(&path)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some(path);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "prometheus is not installed; .ci/run installs Debian's prometheus package"
    );
    eprintln!("skipping: no prometheus binary (apt install prometheus)");
    None
}

/// `host:port` of an admin URL (`http://127.0.0.1:1234`).
fn target(admin: &str) -> &str {
    admin.trim_start_matches("http://")
}

struct Prometheus {
    proc: Proc,
    api: String,
}

impl Prometheus {
    fn start(binary: &Path, dir: &Path, jobs: &[(&str, Vec<&str>)]) -> Prometheus {
        let mut config =
            String::from("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n");
        for (job, targets) in jobs {
            let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: [{}]\n",
                list.join(", ")
            ));
        }
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port for Prometheus")
            .port();
        let args: Vec<String> = vec![
            format!("--config.file={}", config_path.display()),
            format!("--storage.tsdb.path={}", dir.join("tsdb").display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
        ];
        let proc = Proc::start_unready(binary, &args, dir.join("prometheus.log"));
        let api = format!("http://127.0.0.1:{port}");
        wait_for("Prometheus to be ready", Duration::from_secs(30), || {
            ureq::get(format!("{api}/-/ready")).call().ok().map(|_| ())
        });
        Prometheus { proc, api }
    }

    /// The instant vector of `query`: each series' labels and value.
    fn query(&self, query: &str) -> Vec<(serde_json::Value, f64)> {
        let mut response = ureq::get(format!("{}/api/v1/query", self.api))
            .query("query", query)
            .call()
            .unwrap_or_else(|e| panic!("query {query}: {e}\n{}", self.proc.log()));
        let body: serde_json::Value = response.body_mut().read_json().expect("JSON answer");
        assert_eq!(body["status"], "success", "{query}: {body}");
        body["data"]["result"]
            .as_array()
            .expect("a vector result")
            .iter()
            .map(|series| {
                let value = series["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .expect("a sample value");
                (series["metric"].clone(), value)
            })
            .collect()
    }

    /// The single value of `query` (an aggregate), or `None` when it has no series.
    fn value(&self, query: &str) -> Option<f64> {
        let result = self.query(query);
        assert!(result.len() <= 1, "{query} gave several series: {result:?}");
        result.first().map(|(_, v)| *v)
    }

    /// Waits (up to 30 s: a few scrapes) until `query`'s value satisfies `ok`.
    fn wait_until(&self, query: &str, what: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let mut last = None;
        let found = wait_for_opt(Duration::from_secs(30), || {
            last = self.value(query);
            last.filter(|v| ok(*v))
        });
        found.unwrap_or_else(|| {
            panic!(
                "Prometheus never saw {what}: {query} = {last:?}\n{}",
                self.proc.log()
            )
        })
    }
}

/// Polls `check` every 200 ms until it returns `Some` or `limit` passes.
fn wait_for_opt<T>(limit: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn prometheus_scrapes_relay_rendezvous_and_shims_while_traffic_flows() {
    let Some(binary) = prometheus_binary() else {
        return;
    };
    let dir = TempDir::new("prometheus");
    let relay = Relay::start_args(dir.path(), "23200-23209", &["--no-rendezvous"]);
    let rdv = Rendezvous::start(dir.path(), &["--stun", "127.0.0.1:0"]);
    let server = Shim::expose_echo(
        dir.path(),
        "server",
        &relay.url,
        &["--public", "--allow-any", "--rendezvous", &rdv.url],
    );
    let public = server.public_addr("echo");
    let client = Shim::connect_with(
        dir.path(),
        "client",
        &server.node_id,
        &relay.url,
        &["--rendezvous", &rdv.url],
    );

    let prom = Prometheus::start(
        &binary,
        dir.path(),
        &[
            ("relay", vec![target(&relay.admin)]),
            ("rendezvous", vec![target(&rdv.admin)]),
            ("shim", vec![target(&server.admin), target(&client.admin)]),
        ],
    );
    for job in ["relay", "rendezvous", "shim"] {
        prom.wait_until(
            &format!("sum(up{{job=\"{job}\"}})"),
            &format!("every {job} target up"),
            |v| v == if job == "shim" { 2.0 } else { 1.0 },
        );
    }
    prom.wait_until("ferry_relay_nodes_connected", "two nodes", |v| v == 2.0);
    prom.wait_until("ferry_relay_public_ports_bound", "one public port", |v| {
        v == 1.0
    });
    prom.wait_until(
        "count(ferry_shim_relays_connected == 1)",
        "both shims on their relay",
        |v| v == 2.0,
    );

    // A public-port connection that stays open: its bytes must show up in Prometheus
    // before it ends, with the active-streams gauge at one.
    let mut open = TcpStream::connect(public).expect("connect to the public port");
    open.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let sent = pattern(1, 2 * MIB);
    let writer = {
        let mut w = open.try_clone().unwrap();
        let sent = sent.clone();
        std::thread::spawn(move || w.write_all(&sent).expect("write to the public port"))
    };
    let mut echoed = vec![0u8; sent.len()];
    open.read_exact(&mut echoed).expect("the echo comes back");
    writer.join().unwrap();
    assert!(echoed == sent, "the echo is intact");
    prom.wait_until("ferry_relay_streams_active", "the open stream", |v| {
        v == 1.0
    });
    let to_node = prom.wait_until(
        "sum(ferry_relay_bytes_total{path=\"public\",direction=\"to_node\"})",
        "the open connection's bytes to the node",
        |v| v >= (2 * MIB) as f64,
    );
    prom.wait_until(
        "sum(ferry_relay_bytes_total{path=\"public\",direction=\"from_node\"})",
        "the open connection's bytes from the node",
        |v| v >= (2 * MIB) as f64,
    );
    prom.wait_until(
        &format!(
            "sum(ferry_shim_bytes_total{{instance=\"{}\",path=\"public\"}})",
            target(&server.admin)
        ),
        "the serving shim's public bytes",
        |v| v >= (4 * MIB) as f64,
    );
    assert_eq!(
        prom.value("ferry_relay_streams_active"),
        Some(1.0),
        "the connection is still open while its bytes were counted"
    );
    drop(open);
    prom.wait_until("ferry_relay_streams_active", "the stream closed", |v| {
        v == 0.0
    });
    assert!(
        to_node < (3 * MIB) as f64,
        "{to_node}: only this connection's bytes"
    );

    // Node to node through the overlay (relayed or direct: both are counted).
    let (up, down, n) = echo_transfer(client.forward_addr(), 2, MIB);
    assert_eq!((up, n), (down, MIB), "the overlay echo is intact");
    prom.wait_until(
        &format!(
            "sum(ferry_shim_bytes_total{{instance=\"{}\",path=\"overlay\"}})",
            target(&client.admin)
        ),
        "the dialing shim's overlay bytes",
        |v| v >= (2 * MIB) as f64,
    );
    prom.wait_until(
        &format!(
            "sum(ferry_shim_overlay_packet_bytes_total{{instance=\"{}\",direction=\"sent\"}})",
            target(&client.admin)
        ),
        "the dialing shim's end-to-end packets",
        |v| v >= MIB as f64,
    );
    prom.wait_until(
        &format!(
            "sum(ferry_shim_peers{{instance=\"{}\"}})",
            target(&client.admin)
        ),
        "the peer in the shim's path gauge",
        |v| v == 1.0,
    );

    // Setup-time histograms.
    prom.wait_until(
        "sum(ferry_relay_handshake_seconds_count)",
        "two node handshakes timed",
        |v| v >= 2.0,
    );
    prom.wait_until(
        "sum(ferry_relay_stream_setup_seconds_count)",
        "the public stream's setup timed",
        |v| v >= 1.0,
    );
    prom.wait_until(
        "sum(ferry_relay_public_connections_total{outcome=\"spliced\"})",
        "the public connection counted as spliced",
        |v| v >= 1.0,
    );
    prom.wait_until(
        "histogram_quantile(0.5, sum by (le) (ferry_relay_handshake_seconds_bucket))",
        "a median handshake time",
        |v| v > 0.0 && v < 10.0,
    );
    prom.wait_until(
        "sum(ferry_shim_stream_setup_seconds_count{kind=\"overlay_out\"})",
        "the overlay stream's setup timed",
        |v| v >= 1.0,
    );
    prom.wait_until(
        "sum(ferry_shim_stream_setup_seconds_count{kind=\"public\"})",
        "the public stream's setup timed at the shim",
        |v| v >= 1.0,
    );

    // The rendezvous: records published by both shims, and a STUN request answered.
    prom.wait_until(
        "sum(ferry_rendezvous_publishes_total{job=\"rendezvous\",outcome=\"stored\"})",
        "both shims' records",
        |v| v >= 2.0,
    );
    let before = prom
        .value("sum(ferry_rendezvous_stun_requests_total{outcome=\"answered\"})")
        .unwrap_or(0.0);
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let txid = [9u8; 12];
    let request = ferry_rendezvous::stun::binding_request(&txid);
    let answered = (0..5).any(|_| {
        socket.send_to(&request, rdv.stun).unwrap();
        let mut buf = [0u8; 512];
        socket.recv(&mut buf).is_ok()
    });
    assert!(answered, "the rendezvous answers STUN");
    prom.wait_until(
        "sum(ferry_rendezvous_stun_requests_total{outcome=\"answered\"})",
        "the STUN request counted",
        |v| v > before,
    );

    // Every series Prometheus scraped from the three programs is in README's one
    // metrics table, with the labels the table names.
    let known = readme_metrics();
    let mut undocumented = Vec::new();
    for (labels, _) in prom.query("{__name__=~\"ferry_.+\"}") {
        let labels = labels.as_object().expect("label set");
        let name = labels["__name__"].as_str().expect("a name");
        let base = readme_metric_family(name, &known);
        let Some(documented) = known.get(base) else {
            undocumented.push(format!("{name} is not in README"));
            continue;
        };
        for label in labels.keys() {
            let ours = !["__name__", "job", "instance", "le"].contains(&label.as_str());
            if ours && !documented.contains(label) {
                undocumented.push(format!("{name} has label {label}, README does not say"));
            }
        }
    }
    undocumented.sort();
    undocumented.dedup();
    assert!(undocumented.is_empty(), "{undocumented:#?}");

    // A node leaving moves the gauge down, and Prometheus kept the earlier value.
    let mut client = client;
    client.proc.terminate();
    prom.wait_until("ferry_relay_nodes_connected", "one node left", |v| v == 1.0);
    assert_eq!(
        prom.value("max_over_time(ferry_relay_nodes_connected[5m])"),
        Some(2.0)
    );
}
