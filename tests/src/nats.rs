//! A real NATS JetStream cluster for the fleet tests (#19): three Debian
//! `nats-server` processes on loopback, clustered, each with JetStream and its own
//! store, killed and reaped with the test. Without `nats-server` the tests skip, unless
//! `FERRY_REQUIRE_NATS=1` (CI), which makes a missing server a failure.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{Proc, wait_for};

/// The `nats-server` program, if installed.
pub fn nats_server() -> Option<PathBuf> {
    let found = [
        "/usr/bin/nats-server",
        "/usr/sbin/nats-server",
        "/usr/local/bin/nats-server",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists());
    if found.is_none() {
        let required = std::env::var("FERRY_REQUIRE_NATS").is_ok_and(|v| !v.is_empty() && v != "0");
        assert!(
            !required,
            "FERRY_REQUIRE_NATS is set but nats-server is not installed: run .ci/run (it installs Debian's nats-server)"
        );
        eprintln!("skipped: no nats-server (apt install nats-server, or run .ci/run)");
    }
    found
}

/// Three clustered JetStream servers on loopback.
pub struct NatsCluster {
    servers: Vec<Option<Proc>>,
    args: Vec<Vec<String>>,
    program: PathBuf,
    dir: PathBuf,
    /// Client ports, one per server.
    pub ports: Vec<u16>,
    /// The address clients reach the servers at.
    host: String,
    /// The lab host the servers run on (`ip netns exec`), if any.
    netns: Option<String>,
}

impl NatsCluster {
    /// Starts the cluster with client ports `base`, `base+1`, `base+2`, monitoring
    /// ports `base+5…` and cluster ports `base+10…`; `None` (skipped) without `nats-server`.
    pub fn start(dir: &Path, base: u16) -> Option<NatsCluster> {
        Self::start_on(dir, base, "127.0.0.1", None)
    }

    /// The same cluster on a NAT-lab host (`node`), listening on its address, for
    /// relays on other lab hosts; `None` (skipped) without `nats-server`.
    pub fn start_in_lab(
        lab: &crate::netlab::Lab,
        node: &str,
        dir: &Path,
        base: u16,
    ) -> Option<NatsCluster> {
        let ip = lab.lan_ip(node).to_string();
        let cluster = Self::start_on(dir, base, &ip, Some(lab.ns(node).to_string()))?;
        Some(cluster)
    }

    fn start_on(dir: &Path, base: u16, host: &str, netns: Option<String>) -> Option<NatsCluster> {
        let program = nats_server()?;
        let ports: Vec<u16> = (0..3).map(|i| base + i).collect();
        let routes: Vec<String> = (0..3)
            .map(|i| format!("nats://{host}:{}", base + 10 + i))
            .collect();
        let args: Vec<Vec<String>> = (0..3)
            .map(|i| {
                let store = dir.join(format!("nats-{i}"));
                vec![
                    "-a".to_string(),
                    host.to_string(),
                    "-p".to_string(),
                    ports[i].to_string(),
                    "-n".to_string(),
                    format!("ferry-nats-{i}"),
                    // Monitoring, for `/healthz`: whether its JetStream has caught up.
                    "-m".to_string(),
                    (ports[i] + 5).to_string(),
                    "-js".to_string(),
                    "-sd".to_string(),
                    store.display().to_string(),
                    "--cluster_name".to_string(),
                    "ferry-test".to_string(),
                    "--cluster".to_string(),
                    routes[i].clone(),
                    "--routes".to_string(),
                    routes.join(","),
                ]
            })
            .collect();
        let mut cluster = NatsCluster {
            servers: Vec::new(),
            args,
            program,
            dir: dir.to_path_buf(),
            ports,
            host: host.to_string(),
            netns,
        };
        for i in 0..3 {
            let proc = cluster.spawn(i);
            cluster.servers.push(Some(proc));
        }
        for i in 0..3 {
            cluster.wait_listening(i);
        }
        Some(cluster)
    }

    /// Waits until server `i` takes client connections.
    pub fn wait_listening(&self, i: usize) {
        let port = self.ports[i];
        wait_for("nats-server to listen", Duration::from_secs(20), || {
            let host = self.host.clone();
            let reach = move || TcpStream::connect((host.as_str(), port)).ok();
            match &self.netns {
                None => reach(),
                Some(ns) => crate::netlab::in_netns(ns, reach).ok().flatten(),
            }
        });
    }

    fn spawn(&self, i: usize) -> Proc {
        let log = self.dir.join(format!(
            "nats-{i}-{}.log",
            crate::COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        match &self.netns {
            None => Proc::start_unready(&self.program, &self.args[i], log),
            Some(ns) => {
                let mut args = vec![
                    "netns".to_string(),
                    "exec".to_string(),
                    ns.clone(),
                    self.program.display().to_string(),
                ];
                args.extend(self.args[i].iter().cloned());
                Proc::start_unready(Path::new("ip"), &args, log)
            }
        }
    }

    /// `--fleet`'s value: every server's URL.
    pub fn urls(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("nats://{}:{p}", self.host))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// SIGKILLs server `i`.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut proc) = self.servers[i].take() {
            proc.kill9();
        }
    }

    /// Starts server `i` again (same store), once it takes connections and its
    /// JetStream has caught up with the others (so killing another server next
    /// leaves a quorum with every stream).
    pub fn restart(&mut self, i: usize) {
        self.kill9(i);
        self.servers[i] = Some(self.spawn(i));
        self.wait_listening(i);
        self.wait_healthy(i);
    }

    /// Starts every server again at once (after the whole engine was stopped), once
    /// each takes connections; a lone server could not catch up without the others.
    pub fn restart_all(&mut self) {
        for i in 0..3 {
            self.kill9(i);
            self.servers[i] = Some(self.spawn(i));
        }
        for i in 0..3 {
            self.wait_listening(i);
        }
    }

    /// Waits until server `i`'s `/healthz` says ok: its JetStream streams are current.
    pub fn wait_healthy(&self, i: usize) {
        let url = format!("http://{}:{}/healthz", self.host, self.ports[i] + 5);
        wait_for("nats-server to catch up", Duration::from_secs(30), || {
            let url = url.clone();
            let ask = move || {
                ureq::get(&url)
                    .call()
                    .ok()
                    .filter(|r| r.status() == 200)
                    .map(|_| ())
            };
            match &self.netns {
                None => ask(),
                Some(ns) => crate::netlab::in_netns(ns, ask).ok().flatten(),
            }
        });
    }

    /// The logs of every server, for a failure message.
    pub fn logs(&self) -> String {
        self.servers
            .iter()
            .flatten()
            .map(|p| p.log())
            .collect::<Vec<_>>()
            .join("\n----\n")
    }
}

/// A relay of fleet `fleet` (on the cluster at `urls`, three copies of each bucket)
/// in `dir/name`, with `extra` flags.
pub fn fleet_relay(
    dir: &Path,
    name: &str,
    ports: &str,
    urls: &str,
    fleet: &str,
    extra: &[&str],
) -> crate::Relay {
    let home = dir.join(name);
    std::fs::create_dir_all(&home).expect("the relay's directory");
    let mut args = vec![
        "--fleet",
        urls,
        "--fleet-name",
        fleet,
        "--fleet-replicas",
        "3",
    ];
    args.extend_from_slice(extra);
    crate::Relay::start_args(&home, ports, &args)
}

/// A relay's `/api/info` (null when it does not answer).
pub fn info(relay: &crate::Relay) -> serde_json::Value {
    crate::http_get(&format!("{}/api/info", relay.admin)).unwrap_or(serde_json::Value::Null)
}

/// How many other live relays of its fleet `relay` knows.
pub fn fleet_relays(relay: &crate::Relay) -> usize {
    info(relay)["fleet"]["relays"]
        .as_array()
        .map_or(0, Vec::len)
}

/// Waits until `relay` is in touch with its fleet and knows `others` other relays.
pub fn wait_in_fleet(relay: &crate::Relay, others: usize) {
    wait_for(
        "the relay to reach its fleet",
        Duration::from_secs(60),
        || {
            let fleet = &info(relay)["fleet"];
            (fleet["up"] == true && fleet_relays(relay) == others).then_some(())
        },
    );
}
