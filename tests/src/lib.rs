//! Test harness: starts the real `ferry-relay` and `ferry-shim` binaries as separate
//! processes, reads their ready lines and admin APIs, and provides plain TCP services
//! and clients that hash what they move. Everything stays on loopback.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub use children::TiedToTest;

pub mod children;
pub mod labrun;
pub mod nats;
pub mod netlab;
pub mod node_session;
pub mod reorder;
/// Directory holding the built binaries (next to the test executable's `deps/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("deps directory");
    deps.parent().expect("profile directory").to_path_buf()
}

static BUILD: Once = Once::new();

/// Path of a Ferry binary, building the binaries first so tests never run stale ones.
pub fn bin(name: &str) -> PathBuf {
    BUILD.call_once(|| {
        if std::env::var_os("FERRY_TEST_NO_BUILD").is_some() {
            return;
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "--workspace", "--bins", "--tests"])
            .status()
            .expect("run cargo build for the Ferry binaries");
        assert!(status.success(), "building the Ferry binaries failed");
    });
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing; run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh, empty directory for one test, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "ferry-test-{tag}-{}-{n}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // FERRY_TEST_KEEP=1 keeps logs and data for a look after a failure.
        if std::env::var_os("FERRY_TEST_KEEP").is_some() {
            eprintln!("kept {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running Ferry process whose stderr (logs) goes to a file.
/// Environment variables that point programs at a proxy.
const PROXY_VARIABLES: [&str; 6] = [
    "ALL_PROXY",
    "all_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "NO_PROXY",
    "no_proxy",
];

pub struct Proc {
    pub child: Child,
    pub log_path: PathBuf,
    pub ready_line: String,
}

impl Proc {
    /// Starts `program` with `args`, waiting for its stdout line containing `ready`.
    pub fn start(program: &Path, args: &[String], log_path: PathBuf) -> Proc {
        Self::start_with_env(program, args, log_path, &[])
    }

    /// Like `start` with extra environment variables.
    pub fn start_with_env(
        program: &Path,
        args: &[String],
        log_path: PathBuf,
        env: &[(&str, &str)],
    ) -> Proc {
        Self::spawn(program, args, log_path, env)
            .unwrap_or_else(|log| panic!("{} did not become ready; log:\n{log}", program.display()))
    }

    /// Like `start` with extra environment variables; `None` if the process exited or
    /// did not become ready.
    pub fn start_env(
        program: &Path,
        args: &[String],
        log_path: PathBuf,
        env: &[(&str, &str)],
    ) -> Option<Proc> {
        Self::spawn(program, args, log_path, env).ok()
    }

    /// Starts a program that prints no ready line (a third-party server), stdout and
    /// stderr both to `log_path`; the caller waits for readiness its own way.
    pub fn start_unready(program: &Path, args: &[String], log_path: PathBuf) -> Proc {
        let log = std::fs::File::create(&log_path).expect("create log file");
        let stdout = log.try_clone().expect("clone log file");
        let child = Command::new(program)
            .args(args)
            .stdout(stdout)
            .stderr(log)
            .spawn_tied()
            .unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
        Proc {
            child,
            log_path,
            ready_line: String::new(),
        }
    }

    fn spawn(
        program: &Path,
        args: &[String],
        log_path: PathBuf,
        env: &[(&str, &str)],
    ) -> Result<Proc, String> {
        let log = std::fs::File::create(&log_path).expect("create log file");
        let mut command = Command::new(program);
        // The machine's proxy settings are not the test's: a shim in p2p mode would
        // follow them (a test that wants a proxy passes one in `env` or as a flag).
        for var in PROXY_VARIABLES {
            command.env_remove(var);
        }
        let mut child = command
            .args(args)
            .envs(env.iter().copied())
            .env(
                "FERRY_LOG",
                "info,ferry_relay=debug,ferry_shim=debug,ferry_rendezvous=debug",
            )
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn_tied()
            .unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
        let stdout = child.stdout.take().expect("stdout pipe");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            for line in lines.by_ref().map_while(Result::ok) {
                if line.contains("ready") {
                    let _ = tx.send(line);
                    break;
                }
            }
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
        let ready_line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(std::fs::read_to_string(&log_path).unwrap_or_default());
            }
        };
        Ok(Proc {
            child,
            log_path,
            ready_line,
        })
    }

    /// Value of `key=` in the ready line.
    pub fn ready_field(&self, key: &str) -> String {
        self.ready_line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}= in {:?}", self.ready_line))
            .to_string()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// SIGKILL, the way a crash or OOM kill ends a process.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, the way systemd or Ctrl-C stops a process; waits for it to exit.
    pub fn terminate(&mut self) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn http_get(url: &str) -> Result<serde_json::Value, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let mut response = agent.get(url).call().map_err(|e| e.to_string())?;
    response
        .body_mut()
        .read_json::<serde_json::Value>()
        .map_err(|e| e.to_string())
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub struct Relay {
    pub proc: Proc,
    pub url: String,
    pub admin: String,
    /// The embedded rendezvous's STUN address (`stun=` of the ready line); `None` with
    /// `--no-rendezvous`.
    pub stun: Option<SocketAddr>,
    pub data_dir: PathBuf,
    args: Vec<String>,
}

impl Relay {
    /// The relay's node ID, from its URL (what a client pins its TLS key to).
    pub fn relay_id(&self) -> ferry_proto::NodeId {
        let url: ferry_proto::RelayUrl = self.url.parse().expect("the relay printed a valid URL");
        url.relay_id
    }

    /// POSTs `body` to the relay's admin API at `path`; the JSON answer, error or not.
    pub fn post_admin(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        agent
            .post(&format!("{}{path}", self.admin))
            .send_json(body)
            .expect("the relay's admin API answers")
            .body_mut()
            .read_json()
            .expect("the relay's admin API answers JSON")
    }

    /// Starts a relay on an ephemeral loopback port with public ports from `ports`.
    pub fn start(dir: &Path, ports: &str) -> Relay {
        Self::start_args(dir, ports, &[])
    }

    /// Relay arguments that lift the per-address rate limits, for tests whose many nodes
    /// all come from one loopback address (the limits themselves are `limits.rs`'s).
    pub const NO_PER_ADDRESS_LIMITS: [&str; 4] = [
        "--handshakes-per-ip-per-sec",
        "1000000",
        "--connections-per-ip-per-sec",
        "1000000",
    ];

    pub fn start_args(dir: &Path, ports: &str, extra: &[&str]) -> Relay {
        let data_dir = dir.join("relay");
        let mut args: Vec<String> = [
            "--data-dir",
            data_dir.to_str().expect("utf-8 path"),
            "--listen",
            "127.0.0.1:0",
            "--public-host",
            "127.0.0.1",
            "--ports",
            ports,
            "--admin",
            "127.0.0.1:0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // Tests run many relays at once, so none may take the default STUN port 3478.
        if !extra.contains(&"--stun") {
            args.extend(["--stun".to_string(), "127.0.0.1:0".to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::launch(dir, data_dir, args)
    }

    fn launch(dir: &Path, data_dir: PathBuf, args: Vec<String>) -> Relay {
        Self::try_launch(dir, data_dir, args)
            .unwrap_or_else(|log| panic!("ferry-relay did not become ready; log:\n{log}"))
    }

    /// [`Relay::launch`], or the log of a relay that did not become ready.
    fn try_launch(dir: &Path, data_dir: PathBuf, args: Vec<String>) -> Result<Relay, String> {
        let log = dir.join(format!(
            "relay-{}.log",
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let proc = Proc::spawn(&bin("ferry-relay"), &args, log, &[])?;
        let url = proc.ready_field("url");
        let admin = proc.ready_field("admin");
        let stun = match proc.ready_field("stun").as_str() {
            "off" => None,
            addr => Some(addr.parse().expect("stun= is off or IP:PORT")),
        };
        Ok(Relay {
            proc,
            url,
            admin,
            stun,
            data_dir,
            args,
        })
    }

    /// The `host:port` the relay listens on.
    pub fn listen_addr(&self) -> SocketAddr {
        self.url
            .rsplit_once('@')
            .and_then(|(_, hp)| hp.parse().ok())
            .expect("relay URL ends in host:port")
    }

    /// Restarts a (killed) relay with the same arguments, but on the ports it had
    /// (relay and STUN).
    pub fn restart(&mut self, dir: &Path) {
        let mut args = self.args.clone();
        let port = self.listen_addr().port();
        if let Some(i) = args.iter().position(|a| a == "--listen") {
            args[i + 1] = format!("127.0.0.1:{port}");
        }
        if let (Some(stun), Some(i)) = (self.stun, args.iter().rposition(|a| a == "--stun")) {
            args[i + 1] = stun.to_string();
        }
        // Its old port can be held for a moment by another process's connection that
        // the kernel gave that number as its source port: try again for a while.
        let deadline = Instant::now() + Duration::from_secs(10);
        let fresh = loop {
            match Self::try_launch(dir, self.data_dir.clone(), args.clone()) {
                Ok(relay) => break relay,
                Err(log) if log.contains("Address already in use") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(log) => panic!("ferry-relay did not become ready again; log:\n{log}"),
            }
        };
        *self = fresh;
    }

    pub fn nodes(&self) -> serde_json::Value {
        http_get(&format!("{}/api/nodes", self.admin)).expect("relay /api/nodes")
    }

    /// Whether `node` has a session here now (`/api/nodes`).
    pub fn holds(&self, node: &str) -> bool {
        self.nodes()
            .as_array()
            .is_some_and(|nodes| nodes.iter().any(|n| n["node_id"] == node))
    }

    /// When each connected node's current link came up (`/api/nodes`): unchanged
    /// across a check means no link was re-established meanwhile.
    pub fn connected_since(&self) -> Vec<u64> {
        self.nodes()
            .as_array()
            .expect("/api/nodes is a list")
            .iter()
            .map(|n| n["connected_since"].as_u64().expect("connected_since"))
            .collect()
    }

    /// See [`metric_at`].
    pub fn metric(&self, series: &str) -> f64 {
        metric_at(&self.admin, series)
    }

    pub fn metrics(&self) -> String {
        metrics_at(&self.admin)
    }
}

/// A standalone `ferry-rendezvous` on loopback.
pub struct Rendezvous {
    pub proc: Proc,
    pub node_id: String,
    pub stun: SocketAddr,
    pub admin: String,
    /// `ferry://<id>@<listen>`, for `ferry-shim --rendezvous`.
    pub url: String,
}

impl Rendezvous {
    /// Starts `ferry-rendezvous --data-dir <dir>/rendezvous --admin 127.0.0.1:0
    /// <extra>`, on an ephemeral node-session port unless `extra` sets one.
    pub fn start(dir: &Path, extra: &[&str]) -> Rendezvous {
        let data = dir.join("rendezvous");
        let mut args: Vec<String> = vec![
            "--data-dir".into(),
            data.to_str().expect("utf-8 path").into(),
            "--admin".into(),
            "127.0.0.1:0".into(),
        ];
        if !extra.iter().any(|a| *a == "--listen" || *a == "--config") {
            args.extend(["--listen".into(), "127.0.0.1:0".into()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = dir.join(format!(
            "rendezvous-{}.log",
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let proc = Proc::start(&bin("ferry-rendezvous"), &args, log);
        assert!(
            proc.ready_line
                .starts_with("ferry-rendezvous ready node_id="),
            "{}",
            proc.ready_line
        );
        let node_id = proc.ready_field("node_id");
        let url = format!("ferry://{node_id}@{}", proc.ready_field("listen"));
        Rendezvous {
            stun: proc.ready_field("stun").parse().expect("stun=IP:PORT"),
            admin: proc.ready_field("admin"),
            node_id,
            url,
            proc,
        }
    }
}

pub struct Shim {
    pub proc: Proc,
    pub admin: String,
    pub node_id: String,
    pub data_dir: PathBuf,
}

impl Shim {
    /// Runs `ferry-shim <args> --data-dir <dir>/<name> --admin 127.0.0.1:0`.
    pub fn start(dir: &Path, name: &str, args: &[&str]) -> Shim {
        Self::start_env(dir, name, args, &[])
    }

    /// [`Shim::start`] with extra environment variables.
    pub fn start_env(dir: &Path, name: &str, args: &[&str], env: &[(&str, &str)]) -> Shim {
        let data_dir = dir.join(name);
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.extend([
            "--data-dir".to_string(),
            data_dir.to_str().expect("utf-8 path").to_string(),
            "--admin".to_string(),
            "127.0.0.1:0".to_string(),
        ]);
        let log = dir.join(format!(
            "{name}-{}.log",
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let proc = Proc::start_with_env(&bin("ferry-shim"), &all, log, env);
        let admin = proc.ready_field("admin");
        let node_id = proc.ready_field("node_id");
        Shim {
            proc,
            admin,
            node_id,
            data_dir,
        }
    }

    /// `ferry-shim expose --relay <url> --service echo=<a fresh echo server> <extra>`.
    pub fn expose_echo(dir: &Path, name: &str, relay_url: &str, extra: &[&str]) -> Shim {
        let service = format!("echo={}", echo_server());
        let mut args = vec!["expose", "--relay", relay_url, "--service", &service];
        args.extend_from_slice(extra);
        Shim::start(dir, name, &args)
    }

    /// `ferry-shim connect <destination> --listen 127.0.0.1:0 --relay <url>`, returned
    /// once its relay session is registered.
    pub fn connect(dir: &Path, name: &str, destination: &str, relay_url: &str) -> Shim {
        Shim::connect_with(dir, name, destination, relay_url, &[])
    }

    /// [`Shim::connect`] with `extra` arguments.
    pub fn connect_with(
        dir: &Path,
        name: &str,
        destination: &str,
        relay_url: &str,
        extra: &[&str],
    ) -> Shim {
        let mut args = vec![
            "connect",
            destination,
            "--listen",
            "127.0.0.1:0",
            "--relay",
            relay_url,
        ];
        args.extend_from_slice(extra);
        let shim = Shim::start(dir, name, &args);
        shim.wait_connected();
        shim
    }

    pub fn status(&self) -> serde_json::Value {
        http_get(&format!("{}/api/status", self.admin)).expect("shim /api/status")
    }

    /// See [`metric_at`].
    pub fn metric(&self, series: &str) -> f64 {
        metric_at(&self.admin, series)
    }

    /// Waits until the relay granted the named service a public address; returns it.
    pub fn public_addr(&self, service: &str) -> SocketAddr {
        wait_for("a public address", Duration::from_secs(20), || {
            let status = self.status();
            status["services"]
                .as_array()?
                .iter()
                .find(|s| s["name"] == service)?["public"]
                .as_str()?
                .parse()
                .ok()
        })
    }

    /// Waits until every relay is connected.
    pub fn wait_connected(&self) {
        wait_for("relay connection", Duration::from_secs(20), || {
            let status = self.status();
            let relays = status["relays"].as_array()?;
            relays
                .iter()
                .all(|r| r["state"] == "connected")
                .then_some(())
        });
    }

    /// The local address of the first forward (`connect --listen`).
    pub fn forward_addr(&self) -> SocketAddr {
        self.status()["forwards"][0]["listen"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("a forward listener")
    }
}

/// The `/metrics` text of the admin listener at `admin` (`http://host:port`).
pub fn metrics_at(admin: &str) -> String {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    agent
        .get(format!("{admin}/metrics"))
        .call()
        .unwrap_or_else(|e| panic!("{admin}/metrics: {e}"))
        .body_mut()
        .read_to_string()
        .expect("metrics text")
}

/// The value of the first `/metrics` line at `admin` starting with `series` (a metric
/// name with its labels, e.g. `ferry_relay_refusals_total{reason="revoked"}`).
pub fn metric_at(admin: &str, series: &str) -> f64 {
    try_metric_at(admin, series).unwrap_or_else(|| panic!("no {series} in {admin}/metrics"))
}

/// [`metric_at`], with `None` while the series is not there yet.
pub fn try_metric_at(admin: &str, series: &str) -> Option<f64> {
    metrics_at(admin)
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A TCP echo service on loopback; each connection echoes until EOF.
pub fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind echo server");
    let addr = listener.local_addr().expect("echo addr");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut reader = stream.try_clone().expect("clone echo stream");
                let mut writer = stream;
                let _ = std::io::copy(&mut reader, &mut writer);
                let _ = writer.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

/// Deterministic pseudo-random bytes (xorshift), so both ends can agree on content.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Sends `total` bytes of a seeded pattern through `addr` (an echo path) while reading
/// the echo back; returns (sha256 sent, sha256 received, bytes received).
pub fn echo_transfer(addr: SocketAddr, seed: u64, total: usize) -> ([u8; 32], [u8; 32], usize) {
    let stream = TcpStream::connect(addr).expect("connect through Ferry");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("set timeout");
    let mut reader = stream.try_clone().expect("clone stream");
    let mut writer = stream;
    let sender = std::thread::spawn(move || {
        let mut hash = Sha256::new();
        let chunk_len = 1 << 20;
        let mut sent = 0usize;
        let mut n = 0u64;
        while sent < total {
            let len = chunk_len.min(total - sent);
            let chunk = pattern(seed.wrapping_add(n), len);
            hash.update(&chunk);
            writer.write_all(&chunk).expect("write through Ferry");
            sent += len;
            n += 1;
        }
        writer
            .shutdown(std::net::Shutdown::Write)
            .expect("half-close");
        <[u8; 32]>::from(hash.finalize())
    });
    let (received_hash, received) = hash_to_eof(&mut reader, "reading the echo failed");
    let sent_hash = sender.join().expect("sender thread");
    (sent_hash, received_hash, received)
}

/// Reads `reader` to EOF; returns the SHA-256 of what came and how many bytes. An I/O
/// error panics with `what` and the count so far.
fn hash_to_eof(reader: &mut impl Read, what: &str) -> ([u8; 32], usize) {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut received = 0usize;
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hash.update(&buf[..n]);
                received += n;
            }
            Err(e) => panic!("{what} after {received} bytes: {e}"),
        }
    }
    (hash.finalize().into(), received)
}

/// How [`paced_echo`] sends: `chunk` bytes at a time, one chunk every `every`.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    pub chunk: usize,
    pub every: Duration,
}

/// Streams a seeded pattern through an echo connection at a steady pace, so that the
/// transfer spans an event (a relay draining or dying, a path cut), while a thread
/// reads the echo back. Sends another chunk while `more(chunks sent so far)` says so,
/// then half-closes. Returns (sha256 sent, sha256 received, bytes received). The
/// application must see no error across the event: any I/O error panics, naming
/// `what`.
pub fn paced_echo(
    stream: TcpStream,
    pace: Pace,
    mut more: impl FnMut(usize) -> bool,
    what: &str,
) -> ([u8; 32], [u8; 32], usize) {
    let mut reader = stream.try_clone().expect("clone stream");
    let reading = format!("{what}: the application saw an error while reading");
    let receiving = std::thread::spawn(move || hash_to_eof(&mut reader, &reading));
    let mut writer = stream;
    let mut hash = Sha256::new();
    let mut sent = 0;
    while more(sent) {
        let chunk = pattern(sent as u64 + 1, pace.chunk);
        writer
            .write_all(&chunk)
            .unwrap_or_else(|e| panic!("{what}: the application saw an error while writing: {e}"));
        hash.update(&chunk);
        sent += 1;
        std::thread::sleep(pace.every);
    }
    writer
        .shutdown(std::net::Shutdown::Write)
        .unwrap_or_else(|e| panic!("{what}: half-close: {e}"));
    let (received, total) = receiving.join().expect("the reading thread");
    (hash.finalize().into(), received, total)
}

/// Sends a short message through `addr` (an echo path) and returns what came back.
pub fn echo_once(addr: SocketAddr, message: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    stream.write_all(message)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut back = Vec::new();
    stream.read_to_end(&mut back)?;
    Ok(back)
}

/// A TCP-only forwarder to `target`: UDP to its port goes nowhere, which is how a
/// network that blocks UDP looks to a shim.
pub fn tcp_only_proxy(target: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
    let addr = listener.local_addr().expect("proxy addr");
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let Ok(server) = TcpStream::connect(target) else {
                continue;
            };
            let (mut c_read, mut s_write) = (
                client.try_clone().expect("clone"),
                server.try_clone().expect("clone"),
            );
            let (mut s_read, mut c_write) = (server, client);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_read, &mut s_write);
                let _ = s_write.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s_read, &mut c_write);
                let _ = c_write.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

/// The relay URL with its port replaced (to point a shim at a proxy).
pub fn url_with_port(url: &str, port: u16) -> String {
    let (head, _) = url.rsplit_once(':').expect("URL has a port");
    format!("{head}:{port}")
}

/// The workspace root (for README and deploy files).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Metric name → label names, from README's one metrics table (rows starting
/// "| `ferry_"), the list tests hold alerts, dashboards and live `/metrics` to.
pub fn readme_metrics() -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
    let path = repo_root().join("README.md");
    let readme =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mut known = std::collections::BTreeMap::new();
    for line in readme.lines().filter(|l| l.starts_with("| `ferry_")) {
        let cell = line[3..].split('`').next().expect("metric cell");
        let (name, labels) = match cell.split_once('{') {
            Some((name, rest)) => (name, rest.trim_end_matches('}')),
            None => (cell, ""),
        };
        let labels = labels
            .split(',')
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        known.insert(name.to_string(), labels);
    }
    assert!(
        known.len() >= 15,
        "README's metrics table not found or changed shape: {known:?}"
    );
    known
}

/// The metric family a scraped series name belongs to: `x_bucket`, `x_sum` and
/// `x_count` are histogram `x`'s when `known` (from [`readme_metrics`]) lists `x`.
pub fn readme_metric_family<'a, V>(
    name: &'a str,
    known: &std::collections::BTreeMap<String, V>,
) -> &'a str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s).filter(|b| known.contains_key(*b)))
        .unwrap_or(name)
}

/// A minimal web app on loopback: every request gets `body` as a 200 answer, then the
/// connection closes (a stand-in for a service behind a node, fetched by stock curl).
pub fn http_file_server(body: Vec<u8>) -> SocketAddr {
    use std::io::{Read, Write};
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind web server");
    let addr = listener.local_addr().expect("web server addr");
    let body = std::sync::Arc::new(body);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let body = body.clone();
            std::thread::spawn(move || {
                let mut request = Vec::new();
                let mut byte = [0u8; 1];
                while !request.ends_with(b"\r\n\r\n") && request.len() < 16 * 1024 {
                    match stream.read(&mut byte) {
                        Ok(1) => request.push(byte[0]),
                        _ => return,
                    }
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&body);
            });
        }
    });
    addr
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

/// A process's resident memory in KiB (`VmRSS` of /proc/PID/status).
pub fn rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS")
}

/// The most resident memory a process has had, in KiB (`VmHWM` of /proc/PID/status).
pub fn peak_rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmHWM")
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

/// Watches this test process's own resident memory from a thread, so a test that
/// drives heavy load from inside its own process (thousands of nodes) can stop and
/// fail with a clear message when that load grows past `limit_kib`, long before the
/// kernel's OOM killer ends the process and everything beside it.
pub struct MemoryWatch {
    limit_kib: u64,
    over: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl MemoryWatch {
    /// How often the watch reads the process's memory.
    const EVERY: Duration = Duration::from_millis(250);

    pub fn start(limit_kib: u64) -> MemoryWatch {
        let over = std::sync::Arc::new(AtomicU64::new(0));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (seen, done) = (over.clone(), stop.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                let rss = rss_kib(std::process::id());
                if rss > limit_kib {
                    seen.fetch_max(rss, Ordering::Relaxed);
                }
                std::thread::sleep(Self::EVERY);
            }
        });
        MemoryWatch {
            limit_kib,
            over,
            stop,
        }
    }

    /// True once the process has been seen above the limit.
    pub fn exceeded(&self) -> bool {
        self.over.load(Ordering::Relaxed) > 0
    }

    /// The process's peak resident memory so far, in KiB.
    pub fn peak_kib(&self) -> u64 {
        peak_rss_kib(std::process::id())
    }

    /// Panics, naming `what`, if the process has been above the limit.
    pub fn check(&self, what: &str) {
        let over = self.over.load(Ordering::Relaxed);
        assert!(
            over == 0,
            "{what}: this test's own process reached {over} KiB of resident memory, over \
             its limit of {} KiB; the load it drives is holding memory it should have \
             released (peak so far {} KiB)",
            self.limit_kib,
            self.peak_kib()
        );
    }
}

impl Drop for MemoryWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// How many file descriptors a process has open.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("process fd directory")
        .count()
}

/// A wall clock set off from the machine's for one program, by libfaketime (Debian's
/// `faketime` package) preloaded into it. Only the wall clock moves: monotonic clocks,
/// which timers, QUIC and TCP use, stay true, as they do on a machine whose clock is
/// merely set wrong.
pub struct FakeClock {
    preload: String,
    offset: String,
}

impl FakeClock {
    /// A clock `offset_secs` ahead (negative: behind); `None` without libfaketime.
    pub fn new(offset_secs: i64) -> Option<FakeClock> {
        // Debian installs it under the multiarch directory of the machine.
        let lib = std::fs::read_dir("/usr/lib")
            .ok()?
            .filter_map(Result::ok)
            .map(|dir| dir.path().join("faketime/libfaketime.so.1"))
            .find(|lib| lib.is_file())?;
        Some(FakeClock {
            preload: lib.to_str()?.to_string(),
            offset: format!("{offset_secs:+}"),
        })
    }

    /// The environment that starts a program on this clock.
    pub fn env(&self) -> [(&str, &str); 3] {
        [
            ("LD_PRELOAD", self.preload.as_str()),
            ("FAKETIME", self.offset.as_str()),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ]
    }
}

/// Sends `message` on a connection to an echo service and checks the same bytes come
/// back; an I/O error (the connection is gone, or the read timed out) is returned.
pub fn round_trip(stream: &mut TcpStream, message: &[u8]) -> std::io::Result<()> {
    stream.write_all(message)?;
    let mut back = vec![0u8; message.len()];
    stream.read_exact(&mut back)?;
    assert_eq!(back, message);
    Ok(())
}

/// The stock Tahoe-LAFS 1.20 `tahoe` program: `$FERRY_TAHOE`, else the virtualenv
/// `.ci/run` installs (`target/tahoe-venv`). `None` when neither exists, so a
/// developer without it skips the Tahoe tests; with `FERRY_REQUIRE_TAHOE=1` (CI) a
/// missing Tahoe fails them instead.
pub fn tahoe() -> Option<PathBuf> {
    let found = std::env::var_os("FERRY_TAHOE")
        .map(PathBuf::from)
        .or_else(|| Some(repo_root().join("target/tahoe-venv/bin/tahoe")))
        .filter(|p| p.exists());
    if found.is_none() {
        let required =
            std::env::var("FERRY_REQUIRE_TAHOE").is_ok_and(|v| !v.is_empty() && v != "0");
        assert!(
            !required,
            "FERRY_REQUIRE_TAHOE is set but no tahoe was found: run .ci/run, or set FERRY_TAHOE"
        );
        eprintln!("skipped: no stock Tahoe-LAFS (run .ci/run once, or set FERRY_TAHOE)");
    }
    found
}

/// The fURL of the Tahoe introducer in `node_dir`, once it has started and written it.
pub fn introducer_furl(node_dir: &Path) -> String {
    let path = node_dir.join("private/introducer.furl");
    wait_for("the introducer's fURL", Duration::from_secs(30), || {
        std::fs::read_to_string(&path)
            .ok()
            .map(|furl| furl.trim().to_string())
            .filter(|furl| !furl.is_empty())
    })
}

/// Arguments for `tahoe`: `create-node` for a storage node listening on TCP
/// `storage_port` (announcing `AUTO`), or `create-client` without one; joined to the
/// introducer at `furl`, storing every file as one share (a test grid has one
/// storage node), with `extra` flags, in `node_dir`.
pub fn tahoe_create(
    furl: &str,
    nickname: &str,
    storage_port: Option<u16>,
    extra: &[String],
    node_dir: &Path,
) -> Vec<String> {
    let mut args = match storage_port {
        Some(port) => vec![
            "create-node".to_string(),
            "--listen=tcp".to_string(),
            format!("--port=tcp:{port}"),
            "--location=AUTO".to_string(),
        ],
        None => vec!["create-client".to_string()],
    };
    args.extend([
        format!("--introducer={}", furl.trim()),
        format!("--nickname={nickname}"),
        "--shares-needed=1".to_string(),
        "--shares-happy=1".to_string(),
        "--shares-total=1".to_string(),
    ]);
    args.extend_from_slice(extra);
    args.push(node_dir.display().to_string());
    args
}

#[cfg(test)]
mod tests {
    /// Tests run in parallel, each relay on its own range of public ports
    /// (`Relay::start(dir, "22500-22509")`); two tests sharing a range make each
    /// other flaky in ways that are hard to trace, so overlaps are refused here.
    #[test]
    fn no_two_tests_share_public_ports() {
        let dir = super::repo_root().join("tests/tests");
        let mut ranges: Vec<(u16, u16, String)> = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            for (n, line) in text.lines().enumerate() {
                // A quoted "low-high" range of five-digit ports.
                for part in line.split('"').skip(1).step_by(2) {
                    let Some((low, high)) = part.split_once('-') else {
                        continue;
                    };
                    if let (Ok(low), Ok(high)) = (low.parse::<u16>(), high.parse::<u16>())
                        && low >= 10_000
                        && low <= high
                    {
                        let name = path.file_name().unwrap().to_string_lossy();
                        ranges.push((low, high, format!("{name}:{}", n + 1)));
                    }
                }
            }
        }
        assert!(ranges.len() > 20, "found only {ranges:?}");
        ranges.sort();
        for pair in ranges.windows(2) {
            let ((_, high, a), (low, _, b)) = (&pair[0], &pair[1]);
            assert!(low > high, "{a} and {b} use overlapping public ports");
        }
    }
}
