//! Running Ferry's real binaries inside a NAT lab: a relay on the lab's public core,
//! shims on hosts behind NATs, and the echo service and clients they carry — each in
//! its own network namespace, driven from the test process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::netlab::{Lab, LabBuilder, NatKind};
use crate::{Proc, TempDir, TiedToTest, bin, echo_server, echo_transfer, http_get, wait_for};

/// Port the lab relay listens on (QUIC and TCP) and its STUN port.
pub const RELAY_PORT: u16 = 7842;
pub const STUN_PORT: u16 = 3478;

fn ip_netns_exec(lab: &Lab, node: &str, program: &Path, args: &[String]) -> Vec<String> {
    let mut all = vec![
        "netns".to_string(),
        "exec".to_string(),
        lab.ns(node).to_string(),
        program.display().to_string(),
    ];
    all.extend(args.iter().cloned());
    all
}

fn ip_path() -> PathBuf {
    for dir in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        let p = Path::new(dir).join("ip");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("ip")
}

/// A relay with its embedded rendezvous on the lab's relay host.
pub struct LabRelay {
    pub proc: Proc,
    pub url: String,
}

impl LabRelay {
    /// The relay's URL with its IPv6 address (it listens on both families).
    pub fn url_v6(&self, lab: &Lab, node: &str) -> String {
        let id = self.url.trim_start_matches("ferry://");
        let id = id.split('@').next().unwrap_or_default();
        format!("ferry://{id}@[{}]:{RELAY_PORT}", lab.ipv6(node))
    }

    pub fn start(lab: &Lab, node: &str, dir: &Path) -> LabRelay {
        Self::start_args(lab, node, dir, &[])
    }

    /// Like `start`, with extra flags (e.g. `--no-rendezvous`).
    pub fn start_args(lab: &Lab, node: &str, dir: &Path, extra: &[&str]) -> LabRelay {
        Self::start_on(lab, node, &lab.relay_ip().to_string(), dir, extra)
    }

    /// A relay on any public lab host (`node`, whose address is `public_host`): a
    /// fleet has several. Its data directory is `dir/relay`, its log `dir/relay.log`.
    pub fn start_on(
        lab: &Lab,
        node: &str,
        public_host: &str,
        dir: &Path,
        extra: &[&str],
    ) -> LabRelay {
        let data = dir.join("relay");
        let mut args: Vec<String> = [
            "--data-dir",
            &data.display().to_string(),
            "--listen",
            &format!("[::]:{RELAY_PORT}"),
            "--public-host",
            public_host,
            "--stun",
            &format!("[::]:{STUN_PORT}"),
            "--admin",
            "127.0.0.1:0",
            "--ports",
            "23100-23120",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if extra.contains(&"--no-rendezvous") {
            // The standalone rendezvous may want the STUN port.
            let i = args.iter().position(|a| a == "--stun").unwrap_or(0);
            args.drain(i..i + 2);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let proc = Proc::start(
            &ip_path(),
            &ip_netns_exec(lab, node, &bin("ferry-relay"), &args),
            dir.join("relay.log"),
        );
        let url = proc.ready_field("url");
        LabRelay { proc, url }
    }
}

impl LabRelay {
    /// Redeems a fresh invite of this relay (`ferry-relay invite` on the relay host)
    /// with `ferry-shim join` on `host`, for the node whose data directory is
    /// `<dir>/<name>`, with `extra` flags.
    pub fn join(&self, lab: &Lab, host: &str, dir: &Path, name: &str, extra: &[&str]) {
        let admin = self.proc.ready_field("admin");
        let admin = admin.trim_start_matches("http://");
        let relay_bin = bin("ferry-relay").display().to_string();
        let code = lab
            .run(
                "relay",
                &relay_bin,
                &["invite", "--admin", admin, "--expires", "1h", "--uses", "1"],
            )
            .expect("ferry-relay invite");
        let data = dir.join(name).display().to_string();
        let mut args = vec!["join", code.trim(), "--data-dir", &data];
        args.extend_from_slice(extra);
        let shim_bin = bin("ferry-shim").display().to_string();
        let out = lab.run(host, &shim_bin, &args).expect("ferry-shim join");
        assert!(out.contains("joined the grid"), "{out}");
    }

    /// POSTs `body` to the relay's admin API at `path` from inside the relay host
    /// (e.g. `/api/policy` with `{"action": "revoke", "node": ID}`); its JSON answer.
    pub fn post_admin(&self, lab: &Lab, path: &str, body: serde_json::Value) -> serde_json::Value {
        let url = format!("{}{path}", self.proc.ready_field("admin"));
        lab.in_ns("relay", move || {
            ureq::post(&url)
                .send_json(body)
                .map_err(|e| e.to_string())?
                .body_mut()
                .read_json::<serde_json::Value>()
                .map_err(|e| e.to_string())
        })
        .expect("enter the relay's namespace")
        .unwrap_or_else(|e| panic!("the relay's admin API at {path}: {e}"))
    }
}

/// The standalone `ferry-rendezvous` on a lab host, node sessions on `port`.
pub struct LabRendezvous {
    pub proc: Proc,
    /// `ferry://<id>@<host ip>:<port>`, for `ferry-shim --rendezvous`.
    pub url: String,
}

impl LabRendezvous {
    pub fn start(lab: &Lab, node: &str, dir: &Path, port: u16) -> LabRendezvous {
        let data = dir.join("rendezvous");
        let args: Vec<String> = [
            "--data-dir",
            &data.display().to_string(),
            "--listen",
            &format!("0.0.0.0:{port}"),
            "--stun",
            &format!("0.0.0.0:{STUN_PORT}"),
            "--admin",
            "127.0.0.1:0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let proc = Proc::start(
            &ip_path(),
            &ip_netns_exec(lab, node, &bin("ferry-rendezvous"), &args),
            dir.join("rendezvous.log"),
        );
        let url = format!(
            "ferry://{}@{}:{port}",
            proc.ready_field("node_id"),
            lab.lan_ip(node)
        );
        LabRendezvous { proc, url }
    }
}

/// A shim on a lab host.
pub struct LabShim {
    pub proc: Proc,
    pub host: String,
    pub admin: SocketAddr,
    pub node_id: String,
}

impl LabShim {
    /// Starts `ferry-shim` on `host` with `args` (a subcommand and its flags); the
    /// data directory and admin address are added here.
    pub fn start(lab: &Lab, host: &str, dir: &Path, name: &str, args: &[&str]) -> LabShim {
        Self::start_env(lab, host, dir, name, args, &[])
    }

    /// [`LabShim::start`] with extra environment variables (`ip netns exec` passes
    /// them on to the shim).
    pub fn start_env(
        lab: &Lab,
        host: &str,
        dir: &Path,
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> LabShim {
        let data = dir.join(name);
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.extend([
            "--data-dir".to_string(),
            data.display().to_string(),
            "--admin".to_string(),
            "127.0.0.1:0".to_string(),
        ]);
        let n = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
        let proc = Proc::start_with_env(
            &ip_path(),
            &ip_netns_exec(lab, host, &bin("ferry-shim"), &all),
            dir.join(format!("{name}-{n}.log")),
            env,
        );
        let admin: SocketAddr = proc
            .ready_field("admin")
            .trim_start_matches("http://")
            .parse()
            .expect("admin address in the ready line");
        let node_id = proc.ready_field("node_id");
        LabShim {
            proc,
            host: host.to_string(),
            admin,
            node_id,
        }
    }

    /// `/api/status`, fetched from inside the shim's namespace.
    pub fn status(&self, lab: &Lab) -> serde_json::Value {
        let url = format!("http://{}/api/status", self.admin);
        lab.in_ns(&self.host, move || http_get(&url))
            .expect("enter the shim's namespace")
            .unwrap_or_else(|e| panic!("status of the shim on {}: {e}", self.host))
    }

    /// Waits until the relay session is registered and the shim has measured its
    /// network (so its path record is complete).
    pub fn wait_ready(&self, lab: &Lab) {
        wait_for(
            &format!("the shim on {} to register and measure", self.host),
            Duration::from_secs(20),
            || {
                let s = self.status(lab);
                let connected = s["relays"][0]["state"] == "connected";
                let measured = !s["network"]["nat"].is_null()
                    && (s["network"]["nat"] != "unknown" || s["relays"][0]["transport"] == "tcp");
                (connected && measured).then_some(())
            },
        )
    }

    /// The value of the first `/metrics` line starting with `series` (a metric name
    /// with its labels), fetched from inside the shim's namespace.
    pub fn metric(&self, lab: &Lab, series: &str) -> f64 {
        let url = format!("http://{}/metrics", self.admin);
        let text = lab
            .in_ns(&self.host, move || {
                ureq::get(&url)
                    .call()
                    .map_err(|e| e.to_string())?
                    .body_mut()
                    .read_to_string()
                    .map_err(|e| e.to_string())
            })
            .expect("enter the shim's namespace")
            .unwrap_or_else(|e| panic!("metrics of the shim on {}: {e}", self.host));
        text.lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
    }

    /// The peer entry for `node_id` in `/api/status`, if there is one.
    pub fn peer(&self, lab: &Lab, node_id: &str) -> Option<serde_json::Value> {
        let status = self.status(lab);
        status["peers"]
            .as_array()?
            .iter()
            .find(|p| p["node_id"] == node_id)
            .cloned()
    }

    /// The public address (`host:port`) a relay granted this shim's first service.
    pub fn public_addr(&self, lab: &Lab) -> SocketAddr {
        self.status(lab)["services"][0]["public"]
            .as_str()
            .expect("a public address")
            .parse()
            .expect("host:port")
    }

    /// The local address of this shim's (single) forward.
    pub fn forward_addr(&self, lab: &Lab) -> SocketAddr {
        self.status(lab)["forwards"][0]["listen"]
            .as_str()
            .expect("a forward")
            .parse()
            .expect("forward address")
    }
}

/// An echo service listening inside `host`'s namespace.
pub fn echo_in(lab: &Lab, host: &str) -> SocketAddr {
    lab.in_ns(host, echo_server).expect("enter the namespace")
}

/// Moves `total` bytes each way through `addr` from inside `host`'s namespace;
/// returns (hash sent, hash received, bytes received).
pub fn transfer_in(
    lab: &Lab,
    host: &str,
    addr: SocketAddr,
    seed: u64,
    total: usize,
) -> ([u8; 32], [u8; 32], usize) {
    lab.in_ns(host, move || echo_transfer(addr, seed, total))
        .expect("enter the namespace")
}

/// Polls the client shim's view of `server` until its path is `direct`, returning how
/// long that took from `since`; `None` if it is still relayed after `limit`.
pub fn time_to_direct(
    lab: &Lab,
    client: &LabShim,
    server: &str,
    since: Instant,
    limit: Duration,
) -> Option<Duration> {
    loop {
        if let Some(peer) = client.peer(lab, server)
            && peer["path"] == "direct"
        {
            return Some(since.elapsed());
        }
        if since.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The lab most two-node tests need: the test's sites behind a relay host named
/// `relay` (added first, so the address plan is the usual one) that runs the relay and
/// its rendezvous, and an echo service on the serving host. Shims come from
/// [`EchoLab::expose`] and [`EchoLab::connect`], or both at once from
/// [`EchoLab::pair`]; each is named after its host.
pub struct EchoLab {
    pub relay: LabRelay,
    /// The standalone rendezvous, with [`EchoLabBuilder::standalone_rendezvous`].
    pub rendezvous: Option<LabRendezvous>,
    pub lab: Lab,
    pub dir: TempDir,
    /// The relay URL the shims are given.
    pub url: String,
    /// The echo service, listening in the serving host's namespace.
    pub echo: SocketAddr,
    server_host: String,
    client_host: String,
    /// Flags every shim gets (`--rendezvous URL`).
    shared: Vec<String>,
}

/// Describes an [`EchoLab`]: the sites as with [`LabBuilder`], and the variations the
/// tests need.
pub struct EchoLabBuilder {
    test: String,
    sites: LabBuilder,
    hosts: (String, String),
    ipv6: bool,
    standalone: bool,
}

impl EchoLab {
    /// Starts describing the lab of the test named `test`.
    pub fn builder(test: &str) -> EchoLabBuilder {
        EchoLabBuilder {
            test: test.to_string(),
            sites: Lab::builder(test).relay("relay"),
            hosts: ("server".to_string(), "client".to_string()),
            ipv6: false,
            standalone: false,
        }
    }

    /// A shim on the serving host exposing `echo` to any node (`expose --relay URL
    /// --service echo=ECHO --allow-any <extra>`), returned registered and measured.
    pub fn expose(&self, extra: &[&str]) -> LabShim {
        let service = format!("echo={}", self.echo);
        let mut args = vec![
            "expose",
            "--relay",
            &self.url,
            "--service",
            &service,
            "--allow-any",
        ];
        args.extend(self.shared.iter().map(String::as_str));
        args.extend_from_slice(extra);
        self.ready_shim(&self.server_host, &args, &[])
    }

    /// A shim on the connecting host forwarding a local port to `server`'s echo
    /// (`connect SERVER/echo --relay URL --listen 127.0.0.1:0`), returned ready.
    pub fn connect(&self, server: &LabShim) -> LabShim {
        self.connect_env(&self.client_host, server, &[])
    }

    /// [`EchoLab::connect`] from `host`, with environment variables for the shim.
    pub fn connect_env(&self, host: &str, server: &LabShim, env: &[(&str, &str)]) -> LabShim {
        let destination = format!("{}/echo", server.node_id);
        let mut args = vec![
            "connect",
            &destination,
            "--relay",
            &self.url,
            "--listen",
            "127.0.0.1:0",
        ];
        args.extend(self.shared.iter().map(String::as_str));
        self.ready_shim(host, &args, env)
    }

    /// The usual pair: [`EchoLab::expose`] with no extra flags, then
    /// [`EchoLab::connect`] to it.
    pub fn pair(&self) -> (LabShim, LabShim) {
        let server = self.expose(&[]);
        let client = self.connect(&server);
        (server, client)
    }

    fn ready_shim(&self, host: &str, args: &[&str], env: &[(&str, &str)]) -> LabShim {
        let shim = LabShim::start_env(&self.lab, host, self.dir.path(), host, args, env);
        shim.wait_ready(&self.lab);
        shim
    }
}

impl EchoLabBuilder {
    /// A host directly on the core ([`LabBuilder::public`]).
    pub fn public(mut self, name: &str) -> Self {
        self.sites = self.sites.public(name);
        self
    }

    /// A host on the core with only IPv6 ([`LabBuilder::public_v6_only`]).
    pub fn public_v6_only(mut self, name: &str) -> Self {
        self.sites = self.sites.public_v6_only(name);
        self
    }

    /// A NAT site with hosts on its LAN ([`LabBuilder::nat`]).
    pub fn nat(mut self, site: &str, kind: NatKind, hosts: &[&str]) -> Self {
        self.sites = self.sites.nat(site, kind, hosts);
        self
    }

    /// The usual two sites: the serving host alone behind a NAT of kind `server` (site
    /// `west`), the connecting host behind one of kind `client` (site `east`). After
    /// [`EchoLabBuilder::hosts`], if that is called.
    pub fn nats(self, server: NatKind, client: NatKind) -> Self {
        let (server_host, client_host) = self.hosts.clone();
        self.nat("west", server, &[&server_host])
            .nat("east", client, &[&client_host])
    }

    /// Where the exposing and the connecting shim run (`server` and `client` unless
    /// told); the echo service runs on the first.
    pub fn hosts(mut self, server: &str, client: &str) -> Self {
        self.hosts = (server.to_string(), client.to_string());
        self
    }

    /// Shims reach the relay at its IPv6 address.
    pub fn relay_over_ipv6(mut self) -> Self {
        self.ipv6 = true;
        self
    }

    /// The relay runs with `--no-rendezvous`, and a standalone `ferry-rendezvous` on
    /// the relay host is given to every shim with `--rendezvous`.
    pub fn standalone_rendezvous(mut self) -> Self {
        self.standalone = true;
        self
    }

    /// Builds the lab and starts the relay (and rendezvous) and the echo service;
    /// `None` where [`LabBuilder::build`] skips.
    pub fn build(self) -> Option<EchoLab> {
        let lab = self.sites.build()?;
        let dir = TempDir::new(&self.test);
        let (relay, rendezvous) = if self.standalone {
            let relay = LabRelay::start_args(&lab, "relay", dir.path(), &["--no-rendezvous"]);
            let rendezvous = LabRendezvous::start(&lab, "relay", dir.path(), 7900);
            (relay, Some(rendezvous))
        } else {
            (LabRelay::start(&lab, "relay", dir.path()), None)
        };
        let url = if self.ipv6 {
            relay.url_v6(&lab, "relay")
        } else {
            relay.url.clone()
        };
        let shared = match &rendezvous {
            Some(r) => vec!["--rendezvous".to_string(), r.url.clone()],
            None => Vec::new(),
        };
        let (server_host, client_host) = self.hosts;
        let echo = echo_in(&lab, &server_host);
        Some(EchoLab {
            relay,
            rendezvous,
            lab,
            dir,
            url,
            echo,
            server_host,
            client_host,
            shared,
        })
    }
}

/// A third-party daemon (a proxy, miniupnpd) running in a lab namespace, killed and
/// reaped on drop.
pub struct Daemon(std::process::Child);

impl Daemon {
    /// Starts `program args…` in `node`'s namespace with its output in `log`.
    pub fn start(lab: &Lab, node: &str, program: &str, args: &[&str], log: &Path) -> Daemon {
        let file = std::fs::File::create(log).expect("daemon log");
        let child = lab
            .command(node, program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(file.try_clone().expect("daemon log"))
            .stderr(file)
            .spawn_tied()
            .unwrap_or_else(|e| panic!("start {program}: {e}"));
        Daemon(child)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Moves 1 MiB each way through `client`'s forward from inside `host` (the bytes must
/// come back intact), waits up to 10 s for the client's path to `server` to go direct,
/// then moves another MiB over it. Returns the time to direct and the client's peer
/// entry for `server`. Panics with `what` and both logs if no direct path forms.
pub fn transfer_and_go_direct(
    lab: &Lab,
    host: &str,
    client: &LabShim,
    server: &LabShim,
    what: &str,
) -> (Duration, serde_json::Value) {
    const BYTES: usize = 1 << 20;
    let forward = client.forward_addr(lab);
    let started = Instant::now();
    let (sent, received, n) = transfer_in(lab, host, forward, 1, BYTES);
    assert_eq!((sent, n), (received, BYTES), "{what}: relayed transfer");
    let took = time_to_direct(
        lab,
        client,
        &server.node_id,
        started,
        Duration::from_secs(10),
    )
    .unwrap_or_else(|| {
        panic!(
            "{what}: no direct path: {:?}\nclient log:\n{}\nserver log:\n{}",
            client.peer(lab, &server.node_id),
            client.proc.log(),
            server.proc.log()
        )
    });
    let (sent, received, n) = transfer_in(lab, host, forward, 2, BYTES);
    assert_eq!((sent, n), (received, BYTES), "{what}: direct transfer");
    let peer = client.peer(lab, &server.node_id).expect("peer in status");
    (took, peer)
}
