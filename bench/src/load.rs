//! Load generators: many idle authenticated nodes held open on a relay (memory per
//! node), STUN Binding requests as fast as the server answers, and shim start to
//! first byte through its public port.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ferry_proto::frame::{Control, Frame, FrameCodec};
use ferry_proto::limits::KEEPALIVE_INTERVAL;
use ferry_proto::link::{self, Link};
use ferry_proto::tls::{self, ALPN_RELAY};
use ferry_proto::{NodeId, SecretKey};
use futures::{SinkExt, StreamExt};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::procs::field;
use crate::tunnels::{FerryBins, PORTS_IDLE, ferry_relay};

/// Connections one client endpoint (one UDP socket) carries; more endpoints spread the
/// load generator's packet processing over tasks.
const NODES_PER_ENDPOINT: usize = 2_000;
/// Handshakes in flight at once.
const CONCURRENT_HANDSHAKES: usize = 256;

/// An idle registered node: its link and session stream, kept alive the way a shim
/// keeps them (a session ping every `KEEPALIVE_INTERVAL`, pongs read) so the relay
/// does not close it as silent while the measurement runs.
struct IdleNode {
    id: NodeId,
    link: Link,
    reader: FramedRead<ferry_proto::link::BoxRead, FrameCodec>,
    writer: FramedWrite<ferry_proto::link::BoxWrite, FrameCodec>,
}

impl IdleNode {
    /// Asks the relay where `node` has sessions (`locate`); the relays' URLs.
    async fn locate(&mut self, node: NodeId) -> anyhow::Result<Vec<String>> {
        self.writer
            .send(Frame::Control(Control::Locate { node_id: node }))
            .await?;
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.reader.next()).await {
                Ok(Some(Ok(Frame::Control(Control::Located { node_id, relays }))))
                    if node_id == node =>
                {
                    return Ok(relays.iter().map(ToString::to_string).collect());
                }
                Ok(Some(Ok(_))) => continue,
                other => bail!("locate answered with {other:?}"),
            }
        }
    }

    /// Pings until the session ends; counts it in `lost` if the relay ends it first.
    async fn keep_alive(mut self, first_ping: Duration, lost: Arc<AtomicU64>) {
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + first_ping, KEEPALIVE_INTERVAL);
        let mut nonce = 0u64;
        loop {
            tokio::select! {
                _ = ping.tick() => {
                    nonce += 1;
                    if self.writer.send(Frame::Control(Control::Ping { nonce })).await.is_err() {
                        break;
                    }
                }
                frame = self.reader.next() => if !matches!(frame, Some(Ok(_))) {
                    break;
                },
            }
        }
        lost.fetch_add(1, Ordering::Relaxed);
        drop(self.link);
    }
}

async fn register_node(
    endpoint: &quinn::Endpoint,
    relay: SocketAddr,
    relay_id: NodeId,
) -> anyhow::Result<IdleNode> {
    let key = SecretKey::generate();
    let tls = tls::client_config(&key, relay_id, ALPN_RELAY, "relay")?;
    // A shim's settings, except that the relay may open no streams to these nodes:
    // quinn keeps state for each stream a peer may open, which at a shim's 1,024 made
    // the load generator itself need ~140 KiB per node.
    let mut transport = link::relay_transport_config();
    // Keepalives as a shim's (`RELAY_QUIC_KEEPALIVE`, after the session pings).
    transport.max_concurrent_bidi_streams(0u32.into());
    let mut config = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls)?,
    ));
    config.transport_config(Arc::new(transport));
    let conn = endpoint
        .connect_with(config, relay, ferry_proto::tls::SERVER_NAME)?
        .await?;
    let link = Link::from_quic(conn, ALPN_RELAY)?;
    let stream = link.open().await?;
    let mut reader = FramedRead::new(stream.recv, FrameCodec);
    let mut writer = FramedWrite::new(stream.send, FrameCodec);
    writer
        .send(Frame::Control(Control::Register {
            services: Vec::new(),
            certificate: None,
            upgrade: false,
        }))
        .await?;
    match tokio::time::timeout(Duration::from_secs(30), reader.next()).await {
        Ok(Some(Ok(Frame::Control(Control::Registered { .. })))) => Ok(IdleNode {
            id: key.node_id(),
            link,
            reader,
            writer,
        }),
        other => bail!("registration answered with {other:?}"),
    }
}

pub struct IdleResult {
    pub nodes: usize,
    pub rss_before: u64,
    pub rss_after: u64,
    /// Seconds between the last registration and the memory reading.
    pub settled_secs: u64,
    /// The relay's CPU over a window after that, in cores (0.1: a tenth of one), and
    /// the window's seconds; `None` when not measured.
    pub cpu: Option<(f64, u64)>,
    pub handshakes_per_sec: f64,
    /// Registrations that failed once and were tried again.
    pub retries: u64,
    /// A fleet relay's presence writes: (written, seconds its one writer spent).
    pub presence_writes: Option<(u64, f64)>,
}

impl IdleResult {
    pub fn bytes_per_node(&self) -> f64 {
        self.rss_after.saturating_sub(self.rss_before) as f64 / self.nodes.max(1) as f64
    }
}

/// Starts a relay, registers `count` idle nodes on it from this process, and reads the
/// relay's resident memory before and after; then, unless `cpu_window` is zero, the
/// CPU the relay spends on them over that window (steady state: nodes pinging as
/// shims do, nothing else).
pub fn idle_nodes(
    bins: &FerryBins,
    dir: &Path,
    count: usize,
    extra: &[&str],
    cpu_window: Duration,
) -> anyhow::Result<IdleResult> {
    let max_nodes = (count + 100).to_string();
    let mut args = vec!["--no-rendezvous", "--max-nodes", &max_nodes];
    args.extend_from_slice(extra);
    let (relay, ready) = ferry_relay(bins, dir, "relay-idle", PORTS_IDLE, &args)?;
    let url = field(&ready, "url")?;
    let (relay_id, addr) = url
        .strip_prefix("ferry://")
        .and_then(|rest| rest.split_once('@'))
        .context("relay URL")?;
    let relay_id: NodeId = relay_id.parse().map_err(anyhow::Error::msg)?;
    let addr: SocketAddr = addr.parse()?;
    std::thread::sleep(Duration::from_millis(500));
    let rss_before = relay.rss_bytes()?;
    let runtime = tokio::runtime::Runtime::new()?;
    let retries = Arc::new(AtomicU64::new(0));
    let (nodes, took) = runtime.block_on(async {
        let endpoints: Vec<quinn::Endpoint> = (0..count.div_ceil(NODES_PER_ENDPOINT))
            .map(|_| {
                let udp = std::net::UdpSocket::bind("127.0.0.1:0")?;
                link::size_udp_buffers(&udp, link::SERVER_UDP_BUFFER, "load generator");
                quinn::Endpoint::new(
                    quinn::EndpointConfig::default(),
                    None,
                    udp,
                    Arc::new(quinn::TokioRuntime),
                )
            })
            .collect::<Result<_, _>>()?;
        let start = Instant::now();
        let retries = retries.clone();
        let lost = Arc::new(AtomicU64::new(0));
        let results: Vec<anyhow::Result<tokio::task::JoinHandle<()>>> =
            futures::stream::iter(0..count)
                .map(|i| {
                    let endpoint = endpoints[i / NODES_PER_ENDPOINT].clone();
                    let retries = retries.clone();
                    let lost = lost.clone();
                    async move {
                        // Two cores serve both ends: under a burst of thousands of
                        // handshakes one can outlast a timeout. Retry, and say how often.
                        let mut attempt = 1;
                        loop {
                            match register_node(&endpoint, addr, relay_id).await {
                                // Pinging from the moment it is registered: registering
                                // 100,000 nodes takes minutes, longer than the relay
                                // lets a session stay silent. First pings spread over
                                // one interval, as independent shims' would be.
                                Ok(node) => {
                                    let first_ping =
                                        KEEPALIVE_INTERVAL.mul_f64(rand::random::<f64>());
                                    return Ok(tokio::spawn(
                                        node.keep_alive(first_ping, lost.clone()),
                                    ));
                                }
                                Err(_) if attempt < 3 => {
                                    attempt += 1;
                                    retries.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(e) => return Err(e),
                            }
                        }
                    }
                })
                .buffer_unordered(CONCURRENT_HANDSHAKES)
                .collect()
                .await;
        let took = start.elapsed();
        let mut nodes = Vec::with_capacity(count);
        for r in results {
            nodes.push(r?);
        }
        Ok::<_, anyhow::Error>(((nodes, endpoints, lost), took))
    })?;
    // Let the relay settle for a whole keepalive round, so every session has carried
    // a ping and its answer since it registered, the way a live shim's session has.
    let settle = KEEPALIVE_INTERVAL + Duration::from_secs(5);
    std::thread::sleep(settle);
    let rss_after = relay.rss_bytes()?;
    let cpu = if cpu_window.is_zero() {
        None
    } else {
        let before = relay.cpu_seconds()?;
        std::thread::sleep(cpu_window);
        let used = relay.cpu_seconds()? - before;
        Some((used / cpu_window.as_secs_f64(), cpu_window.as_secs()))
    };
    let (_tasks, _endpoints, lost) = &nodes;
    let admin = field(&ready, "admin")?;
    let connected = relay_nodes_connected(&admin)?;
    let presence_writes = fleet_writes(&admin, "write_presence")?;
    let lost = lost.load(Ordering::Relaxed);
    if lost > 0 || connected != count as u64 {
        bail!(
            "the relay held {connected} of {count} idle nodes after memory and CPU were read ({lost} sessions ended): the figures would be wrong; see {}",
            dir.display()
        );
    }
    drop(nodes);
    drop(runtime);
    drop(relay);
    Ok(IdleResult {
        nodes: count,
        rss_before,
        rss_after,
        settled_secs: settle.as_secs(),
        cpu,
        handshakes_per_sec: count as f64 / took.as_secs_f64(),
        retries: retries.load(Ordering::Relaxed),
        presence_writes,
    })
}

/// A fleet relay's writes of one kind from its metrics page: (count written, seconds
/// the one writer spent on them); `None` without a fleet.
fn fleet_writes(admin: &str, operation: &str) -> anyhow::Result<Option<(u64, f64)>> {
    let page = crate::tunnels::get_text(&format!("{admin}/metrics"))
        .with_context(|| format!("reading {admin}/metrics"))?;
    let value = |prefix: &str| {
        page.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    let ok = value(&format!(
        "ferry_relay_fleet_operations_total{{operation=\"{operation}\",outcome=\"ok\"}} "
    ));
    let seconds = value(&format!(
        "ferry_relay_fleet_operation_seconds_sum{{operation=\"{operation}\"}} "
    ));
    Ok(ok.zip(seconds).map(|(n, s)| (n as u64, s)))
}

/// How long after a node registers at one relay of a fleet another relay's `locate`
/// names it (`samples` fresh nodes, each asked about until it is found), and, as the
/// baseline, the same question answered by the relay the node is on. Relays `a` and
/// `b` are fleet relays (their ready lines); times in milliseconds.
pub fn lookup_latency(
    a_ready: &str,
    b_ready: &str,
    samples: usize,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let url_of = |ready: &str| -> anyhow::Result<(NodeId, SocketAddr, String)> {
        let url = field(ready, "url")?;
        let (id, addr) = url
            .strip_prefix("ferry://")
            .and_then(|rest| rest.split_once('@'))
            .context("relay URL")?;
        Ok((id.parse().map_err(anyhow::Error::msg)?, addr.parse()?, url))
    };
    let (a_id, a_addr, a_url) = url_of(a_ready)?;
    let (b_id, b_addr, _) = url_of(b_ready)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            None,
            udp,
            Arc::new(quinn::TokioRuntime),
        )?;
        let mut far = register_node(&endpoint, b_addr, b_id).await?;
        let mut near = register_node(&endpoint, a_addr, a_id).await?;
        let (mut fleet_ms, mut local_ms) = (Vec::new(), Vec::new());
        let mut held = Vec::new();
        for _ in 0..samples {
            let node = register_node(&endpoint, a_addr, a_id).await?;
            let id = node.id;
            let registered = Instant::now();
            loop {
                if far.locate(id).await?.contains(&a_url) {
                    break;
                }
                if registered.elapsed() > Duration::from_secs(30) {
                    bail!("relay B never located a node registered at relay A");
                }
            }
            fleet_ms.push(registered.elapsed().as_secs_f64() * 1e3);
            let asked = Instant::now();
            let here = near.locate(id).await?;
            anyhow::ensure!(here.first() == Some(&a_url), "relay A does not name itself");
            local_ms.push(asked.elapsed().as_secs_f64() * 1e3);
            held.push(node);
        }
        Ok((fleet_ms, local_ms))
    })
}

/// `ferry_relay_nodes_connected` from the relay's metrics page.
fn relay_nodes_connected(admin: &str) -> anyhow::Result<u64> {
    let page = crate::tunnels::get_text(&format!("{admin}/metrics"))
        .with_context(|| format!("reading {admin}/metrics"))?;
    page.lines()
        .find_map(|l| l.strip_prefix("ferry_relay_nodes_connected "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .context("no ferry_relay_nodes_connected on the relay's metrics page")
}

/// STUN Binding requests from `sockets` sockets, each keeping `window` requests
/// outstanding, for `seconds`; answers per second.
pub fn stun_rate(server: SocketAddr, seconds: f64, sockets: usize) -> anyhow::Result<f64> {
    const WINDOW: usize = 32;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let answered = Arc::new(AtomicU64::new(0));
        let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(seconds);
        let mut tasks = Vec::new();
        for s in 0..sockets {
            let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
            socket.connect(server).await?;
            let answered = answered.clone();
            tasks.push(tokio::spawn(async move {
                let mut n: u64 = 0;
                let mut buf = [0u8; 512];
                let request = |n: u64| {
                    let mut txid = [0u8; 12];
                    txid[..8].copy_from_slice(&n.to_be_bytes());
                    txid[8..].copy_from_slice(&(s as u32).to_be_bytes());
                    ferry_rendezvous::stun::binding_request(&txid)
                };
                while tokio::time::Instant::now() < deadline {
                    for _ in 0..WINDOW {
                        n += 1;
                        let _ = socket.send(&request(n)).await;
                    }
                    // Collect the window's answers; a lost one is given up on after
                    // 50 ms and the next window sent.
                    for _ in 0..WINDOW {
                        match tokio::time::timeout(Duration::from_millis(50), socket.recv(&mut buf))
                            .await
                        {
                            Ok(Ok(len)) if len >= 20 => {
                                answered.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                }
            }));
        }
        let start = Instant::now();
        for task in tasks {
            task.await?;
        }
        Ok(answered.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
    })
}

/// Time from starting `ferry-shim expose --public` (key already made, relay running) to
/// the first answer through its public port; the shim is stopped with SIGTERM after.
pub fn start_to_reachable(
    bins: &FerryBins,
    dir: &Path,
    relay_url: &str,
    service: SocketAddr,
    public: Option<SocketAddr>,
) -> anyhow::Result<(Duration, SocketAddr)> {
    let args = [
        "expose".to_string(),
        "--relay".into(),
        relay_url.to_string(),
        "--service".into(),
        format!("rr={service}"),
        "--public".into(),
    ];
    let start = Instant::now();
    let (mut shim, admin, _) = crate::tunnels::ferry_shim(bins, dir, "start-shim", &args)?;
    let public = match public {
        Some(p) => p,
        None => crate::tunnels::public_addr(&admin, "rr")?,
    };
    let took = crate::procs::wait_for("the public port to answer", Duration::from_secs(20), || {
        crate::measure::connect_to_first_byte(public).ok()
    })
    .map(|_| start.elapsed())?;
    shim.stop(Duration::from_secs(10));
    Ok((took, public))
}

/// Debian's `nats-server`, if installed (`bench/run` installs it).
pub fn nats_server() -> Option<std::path::PathBuf> {
    [
        "/usr/bin/nats-server",
        "/usr/sbin/nats-server",
        "/usr/local/bin/nats-server",
    ]
    .iter()
    .map(std::path::PathBuf::from)
    .find(|p| p.exists())
}

/// A three-node NATS JetStream cluster on loopback (client ports `base`..`base+2`,
/// stores in `dir`); its processes and the `--fleet` value.
pub fn nats_cluster(
    program: &Path,
    dir: &Path,
    base: u16,
) -> anyhow::Result<(Vec<crate::procs::Child>, String)> {
    let routes: Vec<String> = (0..3)
        .map(|i| format!("nats://127.0.0.1:{}", base + 10 + i))
        .collect();
    let mut servers = Vec::new();
    for i in 0..3u16 {
        let args: Vec<String> = [
            "-a",
            "127.0.0.1",
            "-p",
            &(base + i).to_string(),
            "-n",
            &format!("bench-nats-{i}"),
            "-js",
            "-sd",
            &dir.join(format!("nats-{i}")).display().to_string(),
            "--cluster_name",
            "ferry-bench",
            "--cluster",
            &routes[usize::from(i)],
            "--routes",
            &routes.join(","),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        servers.push(crate::procs::Child::spawn(
            &format!("nats-{i}"),
            program,
            &args,
            dir,
        )?);
    }
    for i in 0..3 {
        crate::procs::wait_for("nats-server to listen", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", base + i)).ok()
        })?;
    }
    let urls = (0..3)
        .map(|i| format!("nats://127.0.0.1:{}", base + i))
        .collect::<Vec<_>>()
        .join(",");
    Ok((servers, urls))
}
