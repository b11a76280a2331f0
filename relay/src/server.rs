//! The relay's async driver: QUIC and TLS/TCP listeners on one port number, one task
//! per node session, public-port listeners and splicing. What it knows is `state`'s;
//! overlay packets are `forwarding`'s.
//!
//! Data flow of a public-port connection: stock client → public TCP port → `serve_public`
//! opens a stream on the owning node's link, writes a `PublicOpen` header, and splices.
//! Overlay packets arrive tagged with their destination, as QUIC DATAGRAMs on a node's
//! link (or `Frame::Packet` on its session stream when too large for one), and leave
//! tagged with their source the same way on the destination's link; the relay never
//! decrypts them (they are end-to-end QUIC between the two shims).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::channel_socket::ChannelSocket;
use anyhow::Context;
use dashmap::DashMap;
use ferry_proto::channel::ChannelToken;
use ferry_proto::frame::{
    self, Control, ErrorCode, Frame, FrameCodec, PublicAnswer, PublicAnswerReader, PublicOpen,
    ServiceRequest,
};
use ferry_proto::link::{self, Link, Stream};
use ferry_proto::node_session::{
    self, Effect, Ending, Event, NodeSession, Offers, SessionError, Timer,
};
use ferry_proto::splice::splice_limited;
use ferry_proto::stall;
use ferry_proto::tls::{self, ALPN_RELAY};
use ferry_proto::{NodeId, RelayUrl, SecretKey};
use futures::StreamExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use ferry_rendezvous::coordinator::SessionInfo;
use ferry_rendezvous::fleet::{next_change, warner};
use ferry_rendezvous::sessions::Rendezvous;

use crate::access::{Access, POLICY_POLL};
use crate::forwarding::forward_packet;
use crate::metrics::{Limit, Metrics};
use crate::ports::{PortError, PortStore, PortTable};
use crate::registration::{self, Registration};
pub use crate::state::{Limits, NodeView, PacketTap, RelayOptions, TapFn};
use crate::state::{PublicListener, Session, SessionChannel, State};
use ferry_proto::registry::Registry;
use ferry_proto::sync::lock;

/// Frames waiting to be written to one node. Overlay packets beyond this are dropped
/// (the end-to-end QUIC connection retransmits), so a node that stops reading costs
/// the relay at most this many packets of memory and never slows anyone else.
const SESSION_QUEUE: usize = 1024;

/// How long a new link may take to open its session stream after the handshake.
const SESSION_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the relay waits for a node to accept a stream for a public connection.
const PUBLIC_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once. Beyond this new attempts are refused, so a flood of
/// half-open handshakes cannot exhaust memory (per-IP rate limits come on top).
const MAX_PENDING_HANDSHAKES: usize = 4096;

/// How long a session that is ending may take to deliver its last message.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// How often a link its node moved away from is checked for public connections left.
const DRAIN_POLL: Duration = Duration::from_millis(200);

/// Source addresses whose handshake rate is tracked at once.
const MAX_TRACKED_SOURCES: usize = 100_000;

/// Attempts to find a bindable port for a new assignment before giving up.
const BIND_ATTEMPTS: usize = 32;

/// A started relay.
pub struct Relay {
    pub state: Arc<State>,
    pub admin_addr: SocketAddr,
    endpoint: quinn::Endpoint,
    tasks: Vec<JoinHandle<()>>,
}

impl Relay {
    pub fn url(&self) -> &RelayUrl {
        &self.state.url
    }

    /// Runs until SIGINT/SIGTERM or `state.shutdown` is cancelled.
    pub async fn run_until_shutdown(self) {
        let shutdown = self.state.shutdown.clone();
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = wait_for_signal() => {
                tracing::info!("signal received: draining");
                self.drain().await;
            }
        }
        self.endpoint.close(0u32.into(), b"relay shutting down");
        for task in &self.tasks {
            task.abort();
        }
        self.state.listeners.clear();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

impl Relay {
    /// Graceful drain: stop taking nodes and public connections, tell every node to
    /// move to another relay (`going_away`), and wait for the public connections in
    /// flight to finish, at most `--drain-timeout`. Node links stay up meanwhile, so
    /// those connections are not cut; nodes move their new traffic elsewhere at once.
    async fn drain(&self) {
        let state = &self.state;
        state.draining.store(true, Ordering::Relaxed);
        // New QUIC connections are refused; the TCP accept loop checks `draining`.
        self.endpoint.set_server_config(None);
        // Closing the public listeners refuses new public connections; the ones
        // already spliced run in their own tasks and go on.
        state.listeners.clear();
        state.metrics.public_ports_bound.set(0);
        for (_, session) in state.registry.snapshot() {
            let _ = session.tx.try_send(Frame::Control(Control::Error {
                code: ErrorCode::GoingAway,
                message: "the relay is shutting down; use another relay".into(),
            }));
        }
        let deadline = tokio::time::Instant::now() + state.opts.drain_timeout;
        loop {
            let active = state.metrics.streams_active.get();
            if active <= 0 {
                tracing::info!("drained: no public connections left");
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    "drain timeout ({} s) reached with {active} public connection(s) still open; closing them",
                    state.opts.drain_timeout.as_secs()
                );
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                // A second signal means: stop now.
                _ = wait_for_signal() => {
                    tracing::warn!("second signal: stopping without waiting");
                    break;
                }
            }
        }
    }
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Binds a TCP listener (`ferry_proto::net::bind_tcp`: reusable address, dual stack
/// on `[::]`).
fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::from_std(ferry_proto::net::bind_tcp(addr, "the relay")?)
}

/// Binds QUIC (UDP) and TCP on the same port number. With port 0 the kernel picks
/// the UDP port and TCP is tried on the same number, retrying if it is taken.
fn bind_both(
    listen: SocketAddr,
    server: quinn::ServerConfig,
    endpoint_config: quinn::EndpointConfig,
) -> anyhow::Result<(quinn::Endpoint, Arc<ChannelSocket>, TcpListener)> {
    let attempts = if listen.port() == 0 { 20 } else { 1 };
    let mut last_err = None;
    for _ in 0..attempts {
        let udp = ferry_proto::net::bind_udp(listen, "the relay").with_context(|| {
            format!("cannot listen on UDP {listen}; pick another --listen address")
        })?;
        let actual = udp.local_addr()?;
        link::size_udp_buffers(&udp, link::SERVER_UDP_BUFFER, "relay");
        match bind_tcp(actual) {
            Ok(tcp) => {
                let socket = ChannelSocket::new(udp)
                    .with_context(|| format!("cannot start QUIC on {actual}"))?;
                let endpoint = quinn::Endpoint::new_with_abstract_socket(
                    endpoint_config,
                    Some(server),
                    socket.clone(),
                    Arc::new(quinn::TokioRuntime),
                )
                .with_context(|| format!("cannot start QUIC on {actual}"))?;
                return Ok((endpoint, socket, tcp));
            }
            Err(e) => last_err = Some(e),
        }
    }
    Err(anyhow::anyhow!(
        "cannot listen on TCP {listen}: {}; pick another --listen address",
        last_err.map(|e| e.to_string()).unwrap_or_default()
    ))
}

/// Guesses the address clients should use when `--public-host` is not given: the
/// listen address if it is specific, else the source address of the default route
/// (found by connecting a UDP socket, which sends nothing), else loopback.
fn guess_public_host(listen: SocketAddr) -> String {
    if !listen.ip().is_unspecified() {
        return listen.ip().to_string();
    }
    let probe = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("192.0.2.1:9").map(|_| s))
        .and_then(|s| s.local_addr());
    match probe {
        Ok(addr) if !addr.ip().is_unspecified() => addr.ip().to_string(),
        _ => "127.0.0.1".to_string(),
    }
}

/// Starts a relay: key, port store, listeners, admin HTTP. Returns once everything is
/// bound, so the URL and admin address are final.
pub async fn start(opts: RelayOptions) -> anyhow::Result<Relay> {
    ferry_proto::identity::create_private_dir(&opts.data_dir)?;
    let key_path = opts.data_dir.join("relay.key");
    let (key, created) = SecretKey::load_or_create(&key_path)?;
    if created {
        tracing::info!("created relay key {}", key_path.display());
    }

    let store = PortStore::new(&opts.data_dir);
    let mut table = PortTable::new(opts.ports.clone(), opts.max_public_ports_per_node);
    for dropped in table.restore(store.load()?) {
        tracing::warn!(
            "dropping public port {} of node {} service {:?} from the store: outside the configured range {}-{}, or a port or service the store names twice",
            dropped.port,
            dropped.node_id,
            dropped.service,
            opts.ports.start(),
            opts.ports.end()
        );
    }

    let server = link::quic_server_config(&key, ALPN_RELAY)?;
    let (endpoint, socket, tcp) = bind_both(
        opts.listen,
        server.clone(),
        ferry_proto::link::restart_safe_endpoint_config(
            &key,
            b"ferry-relay quic stateless reset key v1",
        ),
    )?;
    let listen = endpoint.local_addr()?;

    let public_host = match &opts.public_host {
        Some(h) => h.clone(),
        None => {
            let guess = guess_public_host(listen);
            tracing::warn!(
                "no --public-host given; advertising {guess}. Set --public-host to the name or address clients use"
            );
            guess
        }
    };
    let url = RelayUrl {
        relay_id: key.node_id(),
        host: public_host,
        port: listen.port(),
    };

    // STUN metrics go into the relay's registry, so one /metrics shows both.
    let metrics = Metrics::new()?;
    metrics.track_tasks();
    let stun = match opts.stun {
        Some(addr) => Some(
            ferry_rendezvous::stun_service::StunService::bind(addr, &metrics.registry)
                .await
                .context("cannot start the embedded rendezvous (--no-rendezvous turns it off)")?,
        ),
        None => None,
    };
    let stun_addr = stun.as_ref().map(|s| s.local_addr());
    let rendezvous = match stun {
        Some(_) => Some(Arc::new(Rendezvous::new(&metrics.registry)?)),
        None => None,
    };
    // In a fleet, what this relay learns for the others (presence, records) queues
    // here from the start; `run_fleet` writes it once the engine is reached.
    let (fleet_writes, fleet_queue) = match &opts.fleet {
        Some(_) => {
            let (tx, rx) = tokio::sync::mpsc::channel(crate::fleet::WRITE_QUEUE);
            (Some(tx), Some(rx))
        }
        None => (None, None),
    };
    if let (Some(rendezvous), Some(queue)) = (&rendezvous, &fleet_writes) {
        let queue = queue.clone();
        rendezvous.on_stored(Box::new(move |record| {
            if let Ok(json) = serde_json::to_vec(record) {
                // A record lost here is published again by its node within minutes.
                let _ = queue.try_send(crate::fleet::FleetWrite::Record(
                    record.record.node_id,
                    json.into(),
                ));
            }
        }));
    }

    let admin = ferry_proto::admin::bind(opts.admin, &opts.admin_token).await?;
    let admin_addr = admin.local_addr()?;

    let access = Access::load(
        &key,
        opts.policy,
        opts.policy_file.clone(),
        &opts.data_dir,
        opts.membership_lifetime,
        opts.fleet.is_some(),
    )?;
    let state = Arc::new(State {
        id: key.node_id(),
        url,
        listen,
        stun_addr,
        rendezvous,
        access,
        registry: Registry::default(),
        channels: DashMap::new(),
        metrics,
        ports: Mutex::new(table),
        unusable: Mutex::new(BTreeSet::new()),
        store,
        save_lock: tokio::sync::Mutex::new(()),
        listeners: DashMap::new(),
        handshakes: Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES)),
        shutdown: CancellationToken::new(),
        draining: std::sync::atomic::AtomicBool::new(false),
        handshake_rate: Mutex::new(ferry_proto::rate::PerAddress::new(
            opts.limits.handshakes_per_ip_per_sec,
            opts.limits.handshakes_per_ip_per_sec * 10.0,
            MAX_TRACKED_SOURCES,
        )),
        connection_rate: Mutex::new(ferry_proto::rate::PerAddress::new(
            opts.limits.connections_per_ip_per_sec,
            opts.limits.connections_per_ip_per_sec * 10.0,
            MAX_TRACKED_SOURCES,
        )),
        whereabouts: Mutex::new(crate::whereabouts::Whereabouts::default()),
        fleet_writes,
        fleet_stale: std::sync::atomic::AtomicBool::new(false),
        fleet_back: tokio::sync::Notify::new(),
        nodes_changed: tokio::sync::Notify::new(),
        next_expiry: AtomicU64::new(u64::MAX),
        rate_limit_said_at: Mutex::new(None),
        opts: opts.clone(),
    });

    let router: std::sync::Weak<State> = Arc::downgrade(&state);
    socket.set_router(router);
    // Read before this run's list replaces it.
    let last_nodes = crate::restart::last_nodes(
        &crate::restart::last_nodes_path(&opts.data_dir),
        opts.limits.max_nodes,
    );

    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls::server_config(&key, ALPN_RELAY)?));
    let mut tasks = vec![
        tokio::spawn(accept_quic(state.clone(), endpoint.clone())),
        tokio::spawn(accept_tcp(state.clone(), tcp, acceptor, server)),
        tokio::spawn(ferry_proto::admin::serve(
            admin,
            crate::admin::router(state.clone()),
            opts.admin_token.clone(),
        )),
    ];
    // Aborting this task (in `run_until_shutdown`) stops the STUN workers and closes
    // the socket; cancelling `shutdown` stops them too.
    if let Some(stun) = stun {
        tasks.push(tokio::spawn(stun.run(state.shutdown.clone())));
    }
    tasks.push(tokio::spawn(enforce_policy(state.clone())));
    tasks.push(tokio::spawn(crate::restart::tell_last_nodes(
        socket, state.id, last_nodes,
    )));
    tasks.push(tokio::spawn(crate::restart::keep_last_nodes(state.clone())));
    if let (Some(fleet), Some(queue)) = (&opts.fleet, fleet_queue) {
        tasks.push(tokio::spawn(run_fleet(state.clone(), fleet.clone(), queue)));
    }
    if let Some(rendezvous) = state.rendezvous.clone() {
        tasks.push(tokio::spawn(rendezvous.sweep_now_and_then()));
    }
    tracing::info!(
        "relay {} listening on {listen} (QUIC and TCP), public ports {}-{}, admin http://{admin_addr}, STUN {}",
        state.url,
        opts.ports.start(),
        opts.ports.end(),
        stun_addr.map_or_else(|| "off".to_string(), |a| format!("UDP {a}"))
    );
    Ok(Relay {
        state,
        admin_addr,
        endpoint,
        tasks,
    })
}

/// Lets one handshake from `ip` over `transport` begin: within the source's handshake
/// rate and the cap on handshakes in progress, each refusal counted. The permit is
/// held until the handshake ends.
fn handshake_permit(
    state: &Arc<State>,
    transport: &str,
    ip: std::net::IpAddr,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    if !state.handshake_allowed(ip) {
        return None;
    }
    let permit = state.handshakes.clone().try_acquire_owned().ok();
    if permit.is_none() {
        state
            .metrics
            .handshakes
            .with_label_values(&[transport, "refused"])
            .inc();
        state.metrics.limit_hit(Limit::Handshakes);
    }
    permit
}

async fn accept_quic(state: Arc<State>, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        let Some(permit) = handshake_permit(&state, "quic", incoming.remote_address().ip()) else {
            incoming.refuse();
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let started = std::time::Instant::now();
            let handshake = async {
                let conn = incoming.await.map_err(|e| link::describe_quic_error(&e))?;
                Link::from_quic(conn, ALPN_RELAY).map_err(|e| e.to_string())
            };
            let result = tokio::time::timeout(ferry_proto::limits::HANDSHAKE_TIMEOUT, handshake)
                .await
                .unwrap_or_else(|_| Err("handshake timed out".into()));
            drop(permit);
            serve_handshake(state, "quic", remote, started, result).await;
        });
    }
}

async fn accept_tcp(
    state: Arc<State>,
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    quic: quinn::ServerConfig,
) {
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("accepting a TCP connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if state.draining.load(Ordering::Relaxed) {
            // New nodes go elsewhere.
            continue;
        }
        let Some(permit) = handshake_permit(&state, "tcp", remote.ip()) else {
            continue;
        };
        let state = state.clone();
        let acceptor = acceptor.clone();
        let quic = quic.clone();
        let started = std::time::Instant::now();
        tokio::spawn(async move {
            let result = link::accept_tcp(tcp, &acceptor, quic, ALPN_RELAY).await;
            drop(permit);
            let result = result.map_err(|e| e.to_string());
            serve_handshake(state, "tcp", remote, started, result).await;
        });
    }
}

/// Counts a finished handshake and, when it succeeded, serves the node.
async fn serve_handshake(
    state: Arc<State>,
    transport: &str,
    remote: SocketAddr,
    started: std::time::Instant,
    result: Result<Link, String>,
) {
    match result {
        Ok(link) => {
            state
                .metrics
                .handshakes
                .with_label_values(&[transport, "ok"])
                .inc();
            state
                .metrics
                .handshake_seconds
                .with_label_values(&[transport])
                .observe(started.elapsed().as_secs_f64());
            // A task of its own: the handshake's state (this task) is freed, and an
            // idle node costs only what its session holds.
            tokio::spawn(run_session(state, link));
        }
        Err(why) => {
            state
                .metrics
                .handshakes
                .with_label_values(&[transport, "failed"])
                .inc();
            tracing::info!("{transport} handshake from {remote} failed: {why}");
        }
    }
}

/// A session stream whose first message was an admitted `register`.
struct Admitted {
    reader: tokio_util::codec::FramedRead<ferry_proto::link::BoxRead, frame::FrameCodec>,
    send: ferry_proto::link::BoxWrite,
    core: NodeSession,
    services: Vec<ServiceRequest>,
    certificate: Option<Box<ferry_proto::grid::Certificate>>,
    /// The node moves here from its registered link (`Control::Register::upgrade`).
    upgrade: bool,
}

/// Waits for the node's session stream and first message, and decides: `register`
/// admitted (returned), refused, or `join` (answered, then the link closes). Its own
/// future, boxed by the caller, so the state it needs is freed once the session runs
/// (the session task then holds only what an idle node needs).
async fn admit(state: &State, link: &Link) -> Option<Admitted> {
    let node = link.peer_id();
    let remote = link.remote_addr();
    let stream = match tokio::time::timeout(SESSION_OPEN_TIMEOUT, link.accept()).await {
        Ok(Ok(stream)) => stream,
        _ => {
            tracing::info!("node {node} at {remote} opened no session stream; closing");
            link.close("no session stream opened");
            return None;
        }
    };
    let mut reader = frame::session_reader(stream.recv);
    let mut core = NodeSession::new(
        Offers::relay(state.rendezvous.is_some()),
        std::time::Instant::now(),
    );
    let first = tokio::time::timeout_at(core.timeout().into(), reader.next()).await;
    let now = std::time::Instant::now();
    let effect = match first {
        Ok(next) => core.handle(Event::from_read(next), now),
        Err(_) => match core.on_timeout(now, &stall::stalls()) {
            Timer::End(ending) => Some(Effect::End(ending)),
            Timer::Rearm(_) => None,
        },
    };
    let refuse = |message: String| Control::Error {
        code: ErrorCode::Denied,
        message,
    };
    let answer = match effect {
        Some(Effect::Admit {
            services,
            certificate,
            upgrade,
        }) => {
            if let Some(full) = registration::refusal_when_full(
                state.registry.len(),
                state.opts.limits.max_nodes,
                state.registry.get(&node).is_some(),
            ) {
                state.metrics.limit_hit(Limit::Nodes);
                refuse(full)
            } else if let Err(refusal) =
                state
                    .access
                    .admit(&node, certificate.as_deref(), &state.metrics)
            {
                tracing::info!("refused node {node} at {remote}: {refusal}");
                refuse(refusal.to_string())
            } else {
                core.admitted(now);
                return Some(Admitted {
                    reader,
                    send: stream.send,
                    core,
                    services,
                    certificate,
                    upgrade,
                });
            }
        }
        Some(Effect::Join { invite }) => {
            match state.access.join(node, &invite, &state.metrics).await {
                Ok(certificate) => Control::Joined {
                    certificate: Box::new(certificate),
                },
                Err(why) => {
                    tracing::info!("node {node} at {remote} could not join: {why}");
                    refuse(why.to_string())
                }
            }
        }
        Some(Effect::End(ending)) => {
            count_session_error(state, &ending);
            match ending.tell_node {
                Some(last_word) => last_word,
                None => {
                    link.close(&ending.reason);
                    return None;
                }
            }
        }
        // Nothing else comes before the first message is decided.
        Some(_) | None => {
            link.close("no registration");
            return None;
        }
    };
    say_and_close(link, stream.send, answer).await;
    None
}

fn count_session_error(state: &State, ending: &Ending) {
    if let Some(error) = ending.counted_as {
        state
            .metrics
            .session_errors
            .with_label_values(&[error.label()])
            .inc();
    }
}

/// Serves one node from handshake to disconnect: feeds what happens on the link to
/// the session's sans-IO core (`ferry_proto::node_session`) and carries out what it
/// asks for.
async fn run_session(state: Arc<State>, link: Link) {
    let node = link.peer_id();
    let remote = link.remote_addr();
    let Some(Admitted {
        mut reader,
        send,
        mut core,
        services: first_services,
        certificate,
        upgrade,
    }) = Box::pin(admit(&state, &link)).await
    else {
        return;
    };
    // A node moving to a new link keeps spending the budget its old link spends
    // while the old one drains.
    let predecessor = upgrade.then(|| state.registry.get(&node)).flatten();
    let (tx, rx) = frame::frame_queue(SESSION_QUEUE);
    let session = Arc::new(Session {
        node,
        link: link.clone(),
        tx,
        connected_at: SystemTime::now(),
        services: Mutex::new(Vec::new()),
        certificate: Mutex::new(certificate.map(|c| *c)),
        bucket: match &predecessor {
            Some(old) => old.bucket.clone(),
            None => (state.opts.limits.node_bytes_per_sec > 0).then(|| {
                let rate = state.opts.limits.node_bytes_per_sec as f64;
                // One second's worth, at least 256 KiB, so bursts of small requests pass.
                ferry_proto::rate::shared(rate, rate.max(256.0 * 1024.0))
            }),
        },
        public_streams: std::sync::atomic::AtomicUsize::new(0),
        handed_over: std::sync::atomic::AtomicBool::new(false),
        predecessor: Mutex::new(None),
        bytes_to_node: AtomicU64::new(0),
        bytes_from_node: AtomicU64::new(0),
        channel: (link.kind() == ferry_proto::link::LinkKind::Quic).then(|| SessionChannel {
            token: ChannelToken::random(),
            addr: Mutex::new(link.remote_socket_addr()),
            local_ip: link.local_ip(),
        }),
    });
    let (session_no, replaced) = state.registry.insert(node, session.clone());
    if let Some(c) = lock(&session.certificate).as_ref() {
        state.note_certificate(c.membership.expires);
    }
    if let Some(channel) = &session.channel {
        state.channels.insert(channel.token.id, session.clone());
    }
    state.nodes_changed.notify_one();
    drop(predecessor);
    if let Some(old) = replaced.as_ref().filter(|_| upgrade) {
        // The node said this link takes over: public connections in flight on the
        // old one go on (it closes once they end, below), new ones come here.
        old.handed_over.store(true, Ordering::Relaxed);
        *lock(&session.predecessor) = Some(Arc::downgrade(old));
        let (from, to) = (old.link.kind().to_string(), link.kind().to_string());
        state
            .metrics
            .link_upgrades
            .with_label_values(&[&from, &to])
            .inc();
        tracing::info!("node {node} moved its link from {from} to {to}");
    } else if let Some(old) = replaced {
        state
            .metrics
            .session_errors
            .with_label_values(&[SessionError::Replaced.label()])
            .inc();
        old.link.close_after_telling(
            &old.tx,
            node_session::replaced_notice(node, remote, "relay"),
            "replaced by a newer connection with the same node key",
        );
    } else {
        state.metrics.nodes_connected.inc();
        state.tell_fleet(crate::fleet::FleetWrite::Present(node));
    }
    tracing::info!("node {node} connected from {remote} over {}", link.kind());

    let writer_task = tokio::spawn(frame::pump_frames(rx, send));
    let reply = Box::pin(register(&state, &session, &first_services, remote)).await;
    let _ = session.tx.send_async(Frame::Control(reply)).await;
    // A member (a node that presented a certificate) learns what it needs to check
    // other members on the overlay; one that was offline during a revocation learns
    // of it here.
    if state.is_grid_member(&node, &session) {
        let grid = Control::Grid {
            view: Box::new(state.access.grid_view()),
        };
        let _ = session.tx.send_async(Frame::Control(grid)).await;
    }

    // One timer, moved only when it fires: session frames just note the time (overlay
    // datagrams arrive here at up to hundreds of thousands per second).
    let idle = tokio::time::sleep_until(core.timeout().into());
    tokio::pin!(idle);
    let ended = loop {
        let event = tokio::select! {
            next = reader.next() => Event::from_read(next),
            read = link.read_overlay_datagrams(|peer, data| forward_packet(&state, &session, peer, data)) => match read {
                Ok(()) => continue,
                Err(frame::FrameError::Io(_)) => Event::Closed("link closed".into()),
                Err(e) => Event::Garbage(e.to_string()),
            },
            () = &mut idle => match core.timer_fired() {
                Timer::Rearm(next) => {
                    idle.as_mut().reset(next.into());
                    continue;
                }
                Timer::End(ending) => break ending,
            },
            _ = link.closed() => Event::Closed("link closed".into()),
        };
        match core.handle(event, std::time::Instant::now()) {
            None => {}
            Some(Effect::Forward { peer, data }) => forward_packet(&state, &session, peer, data),
            Some(Effect::Send(msg)) => {
                let _ = session.tx.send_async(Frame::Control(msg)).await;
            }
            Some(Effect::Reregister {
                services,
                certificate,
            }) => {
                if !state.registry.is_current(&node, session_no) {
                    break core.end(Ending::quiet("replaced"));
                }
                if let Err(refusal) =
                    state
                        .access
                        .admit(&node, certificate.as_deref(), &state.metrics)
                {
                    break core.end(Ending {
                        reason: format!("refused: {refusal}"),
                        tell_node: Some(Control::Error {
                            code: ErrorCode::Denied,
                            message: refusal.to_string(),
                        }),
                        counted_as: None,
                    });
                }
                *lock(&session.certificate) = certificate.map(|c| *c);
                if let Some(c) = lock(&session.certificate).as_ref() {
                    state.note_certificate(c.membership.expires);
                }
                let reply = Box::pin(register(&state, &session, &services, remote)).await;
                if session.tx.send_async(Frame::Control(reply)).await.is_err() {
                    break core.end(Ending::quiet("session writer gone"));
                }
            }
            Some(Effect::WhoOwns { host, port }) => {
                let is_member = state.access.mode() == crate::policy::Mode::Grid
                    && state.is_grid_member(&node, &session);
                let answer = lock(&state.ports).who_owns(is_member, &state.url.host, &host, port);
                let (owner, reason) = match answer {
                    Ok(owner) => (Some(owner), None),
                    Err(reason) => (None, Some(reason)),
                };
                let reply = Control::Owner {
                    host,
                    port,
                    owner,
                    reason,
                };
                if session.tx.send_async(Frame::Control(reply)).await.is_err() {
                    break core.end(Ending::quiet("session writer gone"));
                }
            }
            Some(Effect::Locate { node: wanted }) => {
                let reply = Control::Located {
                    node_id: wanted,
                    relays: state.locate(&wanted),
                };
                if session.tx.send_async(Frame::Control(reply)).await.is_err() {
                    break core.end(Ending::quiet("session writer gone"));
                }
            }
            Some(Effect::Rendezvous(msg)) => {
                let writer_alive = Box::pin(serve_rendezvous(&state, &session, msg)).await;
                if !writer_alive {
                    break core.end(Ending::quiet("session writer gone"));
                }
            }
            Some(Effect::End(ending)) => break ending,
            // Decided before the session ran.
            Some(Effect::Admit { .. } | Effect::Join { .. }) => {}
        }
    };

    count_session_error(&state, &ended);
    if let Some(last_word) = ended.tell_node {
        let _ = session.tx.send_async(Frame::Control(last_word)).await;
    }
    let ended = ended.reason;
    if session.handed_over.load(Ordering::Relaxed) {
        tracing::info!(
            "node {node} at {remote}: its old {} link is done ({ended})",
            link.kind()
        );
    } else {
        tracing::info!("node {node} at {remote} disconnected: {ended}");
    }
    if let Some(channel) = &session.channel {
        state.channels.remove(&channel.token.id);
    }
    if state.registry.remove(&node, session_no) {
        state.nodes_changed.notify_one();
        state.metrics.nodes_connected.dec();
        state.tell_fleet(crate::fleet::FleetWrite::Absent(node));
        drop_listeners_of(&state, &node, &BTreeSet::new());
    }
    if session.handed_over.load(Ordering::Relaxed) {
        Box::pin(drain_handed_over(&state, &session)).await;
    }
    // Let the writer deliver a final error message before the link goes: closing a
    // QUIC connection discards unacknowledged stream data, so give the node a moment
    // to read it and hang up itself.
    drop(session);
    // Boxed, like the admission: the session task's inline state stays what an idle
    // session needs.
    Box::pin(async move {
        let _ = tokio::time::timeout(CLOSE_GRACE, writer_task).await;
        let _ = tokio::time::timeout(CLOSE_GRACE, link.closed()).await;
        link.close(&ended);
    })
    .await;
}

/// Waits, at most `--drain-timeout`, for the public-port connections on a link its
/// node moved away from to end; the link closes after. The node stopped using the
/// session stream when it moved, which is what ended the session.
async fn drain_handed_over(state: &State, session: &Session) {
    let deadline = tokio::time::Instant::now() + state.opts.drain_timeout;
    loop {
        let open = session.public_streams.load(Ordering::Relaxed);
        if open == 0 {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::info!(
                "node {}: closing its old link with {open} public connection(s) still open (--drain-timeout)",
                session.node
            );
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(DRAIN_POLL) => {}
            _ = session.link.closed() => return,
        }
    }
}

/// Sends one message on a session stream that is not (or no longer) served, then
/// closes the link once the node has had a moment to read it.
async fn say_and_close(link: &Link, send: ferry_proto::link::BoxWrite, msg: Control) {
    use futures::SinkExt;
    let mut writer = tokio_util::codec::FramedWrite::new(send, FrameCodec);
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        let _ = writer.send(Frame::Control(msg)).await;
        let _ = writer.close().await;
        // The node hangs up once it has read the message.
        link.closed().await;
    })
    .await;
    link.close("session refused");
}

/// Keeps the policy current: re-reads the policy file when it changes (checked every
/// [`POLICY_POLL`]) or on SIGHUP, and cuts off live sessions the policy in force no
/// longer admits (a revocation, a deny, an expired certificate).
async fn enforce_policy(state: Arc<State>) {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut tick = tokio::time::interval(POLICY_POLL);
    loop {
        let forced = tokio::select! {
            _ = tick.tick() => false,
            Some(()) = async {
                match hup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => true,
        };
        if forced {
            tracing::info!("SIGHUP: re-reading the policy file");
        }
        // Every tick: certificates expire on their own.
        let changed = state.access.reload(forced);
        state.recheck_sessions(changed);
    }
}

/// Keeps this relay in its fleet (`--fleet`): reaches the engine (retrying while it
/// is away; meanwhile the relay serves with the policy it kept on disk), makes the
/// fleet's lists the policy in force (the policy file seeds them when the fleet has
/// none yet), follows every change of them, keeps the relay announced and the
/// fleet's relays known (their certificates are good here), writes where this relay's
/// nodes are and the records they publish, and follows where the others' are.
async fn run_fleet(
    state: Arc<State>,
    opts: crate::fleet::FleetOptions,
    writes: tokio::sync::mpsc::Receiver<crate::fleet::FleetWrite>,
) {
    use crate::fleet::Fleet;
    let mut warn_once = warner();
    let fleet = loop {
        let ops = state.metrics.fleet.clone();
        match ops
            .time("connect", Fleet::connect(&opts, ops.clone()))
            .await
        {
            Ok(fleet) => break Arc::new(fleet),
            Err(e) => warn_once(e.to_string()),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    tracing::info!(
        "in fleet {} ({} NATS server(s))",
        opts.name,
        opts.servers.len()
    );
    state.access.reached_fleet(fleet.clone());
    let (writer, writing) = (fleet.clone(), state.clone());
    tokio::spawn(async move {
        writer
            .carry_writes(writing.id, writes, |e| {
                tracing::debug!("a fleet write was lost: {e}");
                writing.fleet_stale.store(true, Ordering::Relaxed);
            })
            .await;
    });
    tokio::spawn(announce_in_fleet(state.clone(), fleet.clone()));
    tokio::spawn(follow_presence(state.clone(), fleet.clone()));
    if let Some(rendezvous) = state.rendezvous.clone() {
        let (fleet, state) = (fleet.clone(), state.clone());
        tokio::spawn(async move {
            let engine = fleet.engine();
            fleet
                .records
                .follow(engine, &rendezvous, &state.fleet_back)
                .await;
        });
    }
    loop {
        if let Err(e) = fleet.seed_if_empty(&state.access.lists()).await {
            warn_once(e.to_string());
        }
        match fleet.watch_policy().await {
            Ok(updates) => {
                let mut updates = std::pin::pin!(updates);
                let mut seen = crate::fleet::FleetLists::default();
                while let Some(update) = next_change(&mut updates, &state.fleet_back).await {
                    match update {
                        Ok((key, value, current)) => {
                            seen.update(key, value);
                            let lists = state.access.with_held(seen.lists());
                            if current && state.access.set_lists(lists) {
                                tracing::info!("the fleet's policy changed");
                                state.recheck_sessions(true);
                            }
                        }
                        Err(e) => {
                            warn_once(e.to_string());
                            break;
                        }
                    }
                }
            }
            Err(e) => warn_once(e.to_string()),
        }
        tokio::time::sleep(crate::fleet::RECONNECT_DELAY).await;
    }
}

/// Keeps this relay's entry in the fleet's relays bucket fresh and reads the others'
/// (`RELAY_REFRESH`); rewrites this relay's presence when a write was lost.
async fn announce_in_fleet(state: Arc<State>, fleet: Arc<crate::fleet::Fleet>) {
    let mut warn_once = warner();
    let mut was_up = true;
    let mut admins_seen: std::collections::BTreeMap<NodeId, std::time::Instant> =
        std::collections::BTreeMap::new();
    loop {
        // Bounded: an engine electing leaders does not hold up the next try (nor the
        // writing of held edits once it answers) for long; generous enough for a
        // busy engine, whose answers to five requests in a row take their time.
        let result = tokio::time::timeout(crate::fleet::ANNOUNCE_TIMEOUT, async {
            fleet.announce(state.id, &state.url).await?;
            fleet.relays(state.id).await
        })
        .await
        .unwrap_or_else(|_| {
            Err(crate::fleet::FleetError::Unreachable {
                servers: state
                    .opts
                    .fleet
                    .as_ref()
                    .map(|f| f.servers.join(","))
                    .unwrap_or_default(),
                why: format!(
                    "no answer within {} s",
                    crate::fleet::ANNOUNCE_TIMEOUT.as_secs()
                ),
            })
        });
        match result {
            Ok(relays) => {
                state.metrics.fleet.up.set(1);
                state.access.set_engine_up(true);
                if !was_up {
                    tracing::info!("the fleet's engine answers again");
                    state.fleet_back.notify_waiters();
                }
                was_up = true;
                match state.access.flush_held(&fleet).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(
                        "wrote {n} deny/revoke edit(s) made during the engine's absence to the fleet"
                    ),
                    Err(e) => warn_once(e.to_string()),
                }
                // Grid admins are the relays seen in the last few minutes, not
                // only those live this second: a relay that misses a few renewals
                // under load must not cut off the members it certified.
                let now = std::time::Instant::now();
                for id in relays.keys() {
                    admins_seen.insert(*id, now);
                }
                admins_seen
                    .retain(|_, seen| now.duration_since(*seen) < crate::fleet::ADMIN_MEMORY);
                let ids = admins_seen.keys().copied().collect();
                lock(&state.whereabouts).set_relays(relays);
                if state.access.set_fleet_relays(ids) {
                    state.recheck_sessions(true);
                }
                if state.fleet_stale.swap(false, Ordering::Relaxed) {
                    reconcile_presence(&state);
                }
            }
            Err(e) => {
                // Not answering, but still connected: a stall (leaders being
                // elected) that invites and edits may wait out; without a
                // connection they fail at once.
                state.metrics.fleet.up.set(0);
                state.access.set_engine_up(fleet.connected());
                was_up = false;
                warn_once(e.to_string());
            }
        }
        tokio::time::sleep(crate::fleet::RELAY_REFRESH).await;
    }
}

/// Queues the writes that make the presence bucket say exactly which nodes have a
/// session here: after a restart (keys a killed relay left) and after lost writes.
fn reconcile_presence(state: &State) {
    let (put, delete) = lock(&state.whereabouts).reconcile(&state.id, &state.session_nodes());
    if !put.is_empty() || !delete.is_empty() {
        tracing::info!(
            "fleet presence: {} node(s) to add, {} left from before to remove",
            put.len(),
            delete.len()
        );
    }
    for node in put {
        state.tell_fleet(crate::fleet::FleetWrite::Present(node));
    }
    for node in delete {
        state.tell_fleet(crate::fleet::FleetWrite::Absent(node));
    }
}

/// Follows the fleet's presence bucket into `state.whereabouts`; once caught up
/// (again), makes this relay's own keys true.
async fn follow_presence(state: Arc<State>, fleet: Arc<crate::fleet::Fleet>) {
    let mut warn_once = warner();
    loop {
        match fleet.watch_presence().await {
            Ok(updates) => {
                let mut updates = std::pin::pin!(updates);
                let mut caught_up = false;
                lock(&state.whereabouts).clear_presence();
                while let Some(update) = next_change(&mut updates, &state.fleet_back).await {
                    match update {
                        Ok((key, value, current)) => {
                            lock(&state.whereabouts).update(&key, value.is_some());
                            if current && !caught_up {
                                caught_up = true;
                                reconcile_presence(&state);
                            }
                        }
                        Err(e) => {
                            warn_once(e.to_string());
                            break;
                        }
                    }
                }
            }
            Err(e) => warn_once(e.to_string()),
        }
        tokio::time::sleep(crate::fleet::RECONNECT_DELAY).await;
    }
}

/// Hands a rendezvous message to the embedded rendezvous, which answers over the
/// sessions' queues. Returns false when this session's writer is gone.
async fn serve_rendezvous(state: &State, session: &Session, msg: Control) -> bool {
    let Some(rendezvous) = &state.rendezvous else {
        return true;
    };
    let sessions = |node: &NodeId| {
        state.registry.get(node).map(|s| {
            let info = SessionInfo {
                rtt: Some(s.link.rtt()),
                observed_addr: s.link.remote_addr(),
            };
            (info, s.tx.clone())
        })
    };
    rendezvous
        .answer(session.node, msg, &session.tx, sessions)
        .await
}

/// Removes the node's public listeners except those for ports in `keep`.
fn drop_listeners_of(state: &State, node: &NodeId, keep: &BTreeSet<u16>) {
    let before = state.listeners.len();
    state
        .listeners
        .retain(|port, l| l.owner != *node || keep.contains(port));
    let removed = before - state.listeners.len();
    state.metrics.public_ports_bound.sub(removed as i64);
}

/// Decides a node's registration (`registration::Registration`: the rules) and
/// carries it out: finds each wanted public port, stops the node's listeners it no
/// longer wants, and records the grants on the session.
async fn register(
    state: &Arc<State>,
    session: &Arc<Session>,
    services: &[ServiceRequest],
    remote: SocketAddr,
) -> Control {
    let node = session.node;
    let mut plan = Registration::plan(services);
    let wanted: Vec<(usize, String)> = plan
        .public_ports_wanted()
        .map(|(i, name)| (i, name.to_string()))
        .collect();
    for (i, name) in wanted {
        let answer = public_port(state, node, &name).await;
        plan.port_answer(i, answer, &state.url.host);
    }
    let (grants, listening) = plan.finish();
    for grant in &grants {
        if let Some(e) = &grant.error {
            tracing::info!("node {node} service {:?} not granted: {e}", grant.name);
        }
    }
    // Services no longer public stop listening; their ports stay reserved.
    drop_listeners_of(state, &node, &listening);
    *lock(&session.services) = grants.clone();
    Control::Registered {
        node_id: node,
        observed_addr: remote,
        services: grants,
        rendezvous: state.rendezvous.is_some(),
        stun_port: state.stun_addr.map(|a| a.port()),
        channel: session.channel.as_ref().map(|c| Box::new(c.token)),
        fleet: state.opts.fleet.as_ref().map(|f| Box::new(f.name.clone())),
    }
}

/// Finds (or allocates, binds and durably records) the public port of a service, and
/// makes sure it is listening.
async fn public_port(state: &Arc<State>, node: NodeId, service: &str) -> Result<u16, String> {
    for _ in 0..BIND_ATTEMPTS {
        let assignment = {
            let unusable = lock(&state.unusable).clone();
            lock(&state.ports).assign(node, service, &unusable)
        };
        let assignment = assignment.map_err(|e: PortError| {
            if matches!(e, PortError::NodeLimit { .. }) {
                state.metrics.limit_hit(Limit::PublicPorts);
            }
            e.to_string()
        })?;
        let port = assignment.port;
        if state.listeners.get(&port).is_some_and(|l| l.owner == node) {
            return Ok(port);
        }
        let addr = SocketAddr::new(state.listen.ip(), port);
        let listener = match bind_tcp(addr) {
            Ok(l) => l,
            Err(e) if assignment.new => {
                tracing::warn!("public port {port} is busy on this host ({e}); skipping it");
                lock(&state.unusable).insert(port);
                lock(&state.ports).release(&node, service);
                continue;
            }
            Err(e) => {
                return Err(format!(
                    "the relay cannot listen on this service's public port {port}: {e}; the relay operator must free that port"
                ));
            }
        };
        if assignment.new
            && let Err(e) = save_ports(state).await
        {
            lock(&state.ports).release(&node, service);
            tracing::error!("{e}");
            return Err(
                "the relay could not record the public port on disk; try again later".into(),
            );
        }
        let task = tokio::spawn(serve_public_port(
            state.clone(),
            listener,
            node,
            service.to_string(),
        ));
        let previous = state
            .listeners
            .insert(port, PublicListener { owner: node, task });
        if previous.is_none() {
            state.metrics.public_ports_bound.inc();
        }
        tracing::info!("node {node} service {service:?} listening on public port {port}");
        return Ok(port);
    }
    Err("no bindable public port found; the relay operator must free ports in its range".into())
}

async fn save_ports(state: &Arc<State>) -> anyhow::Result<()> {
    let _serial = state.save_lock.lock().await;
    // Snapshot under the save lock, so the last write always holds the newest table.
    let entries = lock(&state.ports).entries();
    let st = state.clone();
    tokio::task::spawn_blocking(move || st.store.save(entries))
        .await
        .context("port store writer panicked")??;
    Ok(())
}

async fn serve_public_port(
    state: Arc<State>,
    listener: TcpListener,
    node: NodeId,
    service: String,
) {
    loop {
        let (tcp, client) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("accept on a public port failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if !state.connection_allowed(client.ip()) {
            // Closed before anything reaches the node: a flooding client costs the
            // node nothing and other clients nothing.
            continue;
        }
        let state = state.clone();
        let service = service.clone();
        tokio::spawn(async move { serve_public(state, tcp, client, node, service).await });
    }
}

async fn serve_public(
    state: Arc<State>,
    tcp: TcpStream,
    client: SocketAddr,
    node: NodeId,
    service: String,
) {
    let accepted = std::time::Instant::now();
    let _ = tcp.set_nodelay(true);
    let Some(session) = state.registry.get(&node) else {
        // Dropping the socket closes it at once: an offline node never hangs a client.
        state
            .metrics
            .public_connections
            .with_label_values(&["node_offline"])
            .inc();
        return;
    };
    let max_streams = state.opts.limits.max_streams_per_node;
    if session.public_streams.load(Ordering::Relaxed) >= max_streams {
        // The client sees the connection close; the node's operator sees the metric
        // and this log line, which names the setting.
        state.metrics.limit_hit(Limit::Streams);
        tracing::info!(
            "public connection from {client} to node {node} refused: the node has {max_streams} open (max_streams_per_node)"
        );
        return;
    }
    let opened = async {
        let mut stream = session.link.open().await?;
        frame::write_header(&mut stream, &PublicOpen { service, client })
            .await
            .map_err(std::io::Error::other)?;
        Ok::<_, std::io::Error>(stream)
    };
    let stream = match tokio::time::timeout(PUBLIC_OPEN_TIMEOUT, opened).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            state
                .metrics
                .public_connections
                .with_label_values(&["open_failed"])
                .inc();
            tracing::info!(
                "public connection from {client} to node {node}: cannot open stream: {e}"
            );
            return;
        }
        Err(_) => {
            state
                .metrics
                .public_connections
                .with_label_values(&["open_failed"])
                .inc();
            tracing::info!("public connection from {client} to node {node}: node did not answer");
            return;
        }
    };
    let stream = {
        let setup = state.metrics.stream_setup_seconds.clone();
        let outcomes = state.metrics.public_connections.clone();
        let on_answer = move |answer| match answer {
            PublicAnswer::Accepted(took) => {
                setup.observe(took.as_secs_f64());
                outcomes.with_label_values(&["spliced"]).inc();
            }
            PublicAnswer::NotAccepted => outcomes.with_label_values(&["not_accepted"]).inc(),
        };
        Stream {
            recv: Box::pin(PublicAnswerReader::new(stream.recv, accepted, on_answer)),
            send: stream.send,
        }
    };
    state.metrics.streams_active.inc();
    session.public_streams.fetch_add(1, Ordering::Relaxed);
    let limit = session.bucket.clone().map(|bucket| {
        let hits = state
            .metrics
            .limit_hits
            .with_label_values(&[Limit::Bytes.label()]);
        let on_wait: ferry_proto::splice::Counter = Arc::new(move |n| hits.inc_by(n));
        (bucket, on_wait)
    });
    let (s1, m1) = (
        session.clone(),
        state
            .metrics
            .bytes
            .with_label_values(&["to_node", "public"]),
    );
    let (s2, m2) = (
        session.clone(),
        state
            .metrics
            .bytes
            .with_label_values(&["from_node", "public"]),
    );
    let result = splice_limited(
        tcp,
        stream,
        Arc::new(move |n| {
            s1.bytes_to_node.fetch_add(n, Ordering::Relaxed);
            m1.inc_by(n);
        }),
        Arc::new(move |n| {
            s2.bytes_from_node.fetch_add(n, Ordering::Relaxed);
            m2.inc_by(n);
        }),
        limit,
    )
    .await;
    session.public_streams.fetch_sub(1, Ordering::Relaxed);
    state.metrics.streams_active.dec();
    if let Err(e) = result {
        tracing::debug!("public connection from {client} to node {node} ended: {e}");
    }
}

/// The session driver over real frames: a relay started in this process, and nodes
/// linked to it over in-memory byte streams (`link::in_memory_pair`) instead of
/// sockets. The rules themselves are unit-tested in `ferry_proto::node_session` and
/// `registration`; these check that the driver carries them out.
#[cfg(test)]
mod tests {
    use super::*;
    use futures::SinkExt;
    use tokio_util::codec::{FramedRead, FramedWrite};

    struct TestRelay {
        relay: Relay,
        key: SecretKey,
        dir: std::path::PathBuf,
    }

    impl Drop for TestRelay {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    async fn relay(name: &str) -> TestRelay {
        relay_with(name, |_| {}).await
    }

    async fn relay_with(name: &str, adjust: impl FnOnce(&mut RelayOptions)) -> TestRelay {
        let dir =
            std::env::temp_dir().join(format!("ferry-relay-session-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut opts = crate::config::Flags::default()
            .resolve()
            .expect("built-in defaults");
        opts.data_dir = dir.clone();
        opts.policy_file = dir.join("policy.toml");
        opts.listen = "127.0.0.1:0".parse().expect("address");
        opts.admin = "127.0.0.1:0".parse().expect("address");
        opts.public_host = Some("127.0.0.1".into());
        opts.stun = None;
        // Ports no other test of this crate uses; the relay skips busy ones.
        opts.ports = 47100..=47199;
        adjust(&mut opts);
        let relay = start(opts).await.expect("relay starts");
        let key = SecretKey::load(&dir.join("relay.key")).expect("relay key");
        TestRelay { relay, key, dir }
    }

    /// A node's session stream to `relay`, served by the relay's driver.
    async fn connect(
        relay: &TestRelay,
        node: &SecretKey,
    ) -> (
        Link,
        FramedRead<link::BoxRead, FrameCodec>,
        FramedWrite<link::BoxWrite, FrameCodec>,
    ) {
        let remote = "[::ffff:192.0.2.5]:40000".parse().expect("address");
        let (node_link, relay_link) = link::in_memory_pair(node, &relay.key, ALPN_RELAY, remote)
            .await
            .expect("in-memory link");
        tokio::spawn(run_session(relay.relay.state.clone(), relay_link));
        let stream = node_link.open().await.expect("session stream");
        (
            node_link,
            FramedRead::new(stream.recv, FrameCodec),
            FramedWrite::new(stream.send, FrameCodec),
        )
    }

    async fn next_control(reader: &mut FramedRead<link::BoxRead, FrameCodec>) -> Control {
        match tokio::time::timeout(Duration::from_secs(10), reader.next()).await {
            Ok(Some(Ok(Frame::Control(msg)))) => msg,
            other => panic!("expected a control message, got {other:?}"),
        }
    }

    fn service(name: &str, public: bool) -> ServiceRequest {
        ServiceRequest {
            name: name.into(),
            public,
        }
    }

    #[tokio::test]
    async fn a_registration_is_answered_with_the_plan_and_a_listening_public_port() {
        let relay = relay("plan").await;
        let node = SecretKey::generate();
        let (_link, mut reader, mut writer) = connect(&relay, &node).await;
        writer
            .send(Frame::Control(Control::Register {
                services: vec![
                    service("storage", true),
                    service("storage", false),
                    service("web", false),
                ],
                certificate: None,
                upgrade: false,
            }))
            .await
            .expect("send register");
        let Control::Registered {
            node_id,
            observed_addr,
            services,
            ..
        } = next_control(&mut reader).await
        else {
            panic!("not registered");
        };
        assert_eq!(node_id, node.node_id());
        assert_eq!(
            observed_addr,
            "192.0.2.5:40000".parse().expect("address"),
            "the node is told its canonical address"
        );
        let port = services[0].public_port.expect("a public port");
        assert!((47100..=47199).contains(&port));
        assert_eq!(
            services[0].public_addr.as_deref(),
            Some(format!("127.0.0.1:{port}").as_str())
        );
        assert_eq!(
            services[1].error.as_deref(),
            Some("service \"storage\" is listed twice")
        );
        assert_eq!(
            (services[2].error.as_ref(), services[2].public_port),
            (None, None)
        );
        // The port listens for stock clients.
        TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("the public port accepts");
    }

    #[tokio::test]
    async fn bytes_that_are_not_a_frame_get_a_protocol_error() {
        let relay = relay("garbage").await;
        let node = SecretKey::generate();
        let (_link, mut reader, writer) = connect(&relay, &node).await;
        let mut raw = writer.into_inner();
        tokio::io::AsyncWriteExt::write_all(&mut raw, &[0xff; 64])
            .await
            .expect("write garbage");
        let Control::Error { code, .. } = next_control(&mut reader).await else {
            panic!("not an error");
        };
        assert_eq!(code, ErrorCode::Protocol);
        let errors = &relay.relay.state.metrics.session_errors;
        assert_eq!(errors.with_label_values(&["protocol"]).get(), 1);
    }

    #[tokio::test]
    async fn a_newer_session_with_the_same_key_replaces_the_older_one() {
        let relay = relay("replace").await;
        let node = SecretKey::generate();
        let register = || {
            Frame::Control(Control::Register {
                services: vec![],
                certificate: None,
                upgrade: false,
            })
        };
        let (_old_link, mut old_reader, mut old_writer) = connect(&relay, &node).await;
        old_writer.send(register()).await.expect("register");
        assert!(matches!(
            next_control(&mut old_reader).await,
            Control::Registered { .. }
        ));
        let (_new_link, mut new_reader, mut new_writer) = connect(&relay, &node).await;
        new_writer.send(register()).await.expect("register");
        assert!(matches!(
            next_control(&mut new_reader).await,
            Control::Registered { .. }
        ));
        let Control::Error { code, message } = next_control(&mut old_reader).await else {
            panic!("the old session was not told");
        };
        assert_eq!(code, ErrorCode::Replaced);
        assert!(message.contains("192.0.2.5:40000"), "{message}");
        assert_eq!(relay.relay.state.registry.len(), 1);
    }

    #[tokio::test]
    async fn a_member_whose_certificate_expires_is_cut_off_at_the_next_look() {
        let relay = relay_with("expiry", |o| o.policy = crate::policy::Mode::Grid).await;
        let node = SecretKey::generate();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let certificate = ferry_proto::grid::Membership {
            member: node.node_id(),
            issuer: relay.key.node_id(),
            issued: now,
            expires: now + 2,
            serial: 7,
        }
        .sign(&relay.key);
        let (_link, mut reader, mut writer) = connect(&relay, &node).await;
        writer
            .send(Frame::Control(Control::Register {
                services: vec![],
                certificate: Some(Box::new(certificate)),
                upgrade: false,
            }))
            .await
            .expect("register");
        assert!(matches!(
            next_control(&mut reader).await,
            Control::Registered { .. }
        ));
        let state = &relay.relay.state;
        assert_eq!(state.next_expiry.load(Ordering::Relaxed), now + 2);
        // The relay looks every second with the policy unchanged; the grid view comes
        // first, then the refusal once the certificate has expired.
        let refusal = loop {
            match next_control(&mut reader).await {
                Control::Grid { .. } => continue,
                other => break other,
            }
        };
        let Control::Error { code, message } = refusal else {
            panic!("not refused: {refusal:?}");
        };
        assert_eq!(code, ErrorCode::Denied);
        assert!(message.contains("expired"), "{message}");
        assert!(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .expect("clock")
                .as_secs()
                >= now + 2
        );
    }

    /// Serves public-port streams accepted on `link` by echoing them back.
    fn echo_public_streams(link: Link) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            while let Ok(mut stream) = link.accept().await {
                tokio::spawn(async move {
                    use tokio::io::AsyncWriteExt;
                    if frame::read_header::<_, PublicOpen>(&mut stream)
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let _ = stream.write_all(&[frame::PUBLIC_ACCEPTED]).await;
                    let (mut recv, mut send) = (stream.recv, stream.send);
                    let _ = tokio::io::copy(&mut recv, &mut send).await;
                    let _ = send.shutdown().await;
                });
            }
        })
    }

    async fn echo_round_trip(client: &mut TcpStream, text: &[u8]) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        client
            .write_all(text)
            .await
            .expect("write to the public port");
        let mut back = vec![0; text.len()];
        tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut back))
            .await
            .expect("echo in time")
            .expect("echo");
        assert_eq!(back, text);
    }

    /// A node on `relay` with a public service "web" whose stock client is mid-echo
    /// on its first link, which then moved to a second link (`register` with
    /// `upgrade`): the two links, their session streams, the port, the client.
    struct Moved {
        old_link: Link,
        old_reader: FramedRead<link::BoxRead, FrameCodec>,
        old_writer: FramedWrite<link::BoxWrite, FrameCodec>,
        old_echo: tokio::task::JoinHandle<()>,
        new_link: Link,
        new_reader: FramedRead<link::BoxRead, FrameCodec>,
        /// Held: finishing the new session stream would end the new session.
        _new_writer: FramedWrite<link::BoxWrite, FrameCodec>,
        port: u16,
        new_port: Option<u16>,
        before: TcpStream,
    }

    async fn move_a_node(relay: &TestRelay) -> Moved {
        let node = SecretKey::generate();
        let register = |upgrade| {
            Frame::Control(Control::Register {
                services: vec![service("web", true)],
                certificate: None,
                upgrade,
            })
        };
        let (old_link, mut old_reader, mut old_writer) = connect(relay, &node).await;
        old_writer.send(register(false)).await.expect("register");
        let Control::Registered { services, .. } = next_control(&mut old_reader).await else {
            panic!("not registered");
        };
        let port = services[0].public_port.expect("a public port");
        let old_echo = echo_public_streams(old_link.clone());
        let mut before = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        echo_round_trip(&mut before, b"over the old link").await;
        let (new_link, mut new_reader, mut new_writer) = connect(relay, &node).await;
        new_writer.send(register(true)).await.expect("register");
        let Control::Registered { services, .. } = next_control(&mut new_reader).await else {
            panic!("the new link was not registered");
        };
        Moved {
            old_link,
            old_reader,
            old_writer,
            old_echo,
            new_link,
            new_reader,
            _new_writer: new_writer,
            port,
            new_port: services[0].public_port,
            before,
        }
    }

    #[tokio::test]
    async fn a_node_moving_to_a_new_link_keeps_the_public_connections_of_the_old_one() {
        let relay = relay("upgrade").await;
        let state = relay.relay.state.clone();
        // Every part held, even unused: a dropped link or stream ends its session.
        let Moved {
            old_link,
            mut old_reader,
            old_writer,
            old_echo,
            new_link,
            new_reader: _new_reader,
            _new_writer,
            port,
            new_port,
            mut before,
        } = move_a_node(&relay).await;
        assert_eq!(new_port, Some(port), "the same public port");
        let _new_echo = echo_public_streams(new_link.clone());
        let moved = state
            .metrics
            .link_upgrades
            .with_label_values(&["tcp", "tcp"]);
        assert_eq!(moved.get(), 1);
        assert_eq!(state.metrics.nodes_connected.get(), 1, "still one node");
        assert_eq!(
            state
                .metrics
                .session_errors
                .with_label_values(&["replaced"])
                .get(),
            0
        );

        // New public connections come through the new link, and the old one's
        // connection goes on, even once the node stops using its old session stream.
        old_echo.abort();
        let mut after = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        echo_round_trip(&mut after, b"over the new link").await;
        drop(old_writer);
        tokio::time::sleep(Duration::from_millis(500)).await;
        echo_round_trip(&mut before, b"still over the old link").await;
        assert!(
            tokio::time::timeout(Duration::from_millis(100), old_link.closed())
                .await
                .is_err(),
            "the old link stays while its public connection is open"
        );
        assert!(
            matches!(
                tokio::time::timeout(Duration::from_millis(100), old_reader.next()).await,
                Err(_) | Ok(None)
            ),
            "the old session is not told it was replaced"
        );

        // Its last public connection ended: the old link closes, the node stays.
        drop(before);
        tokio::time::timeout(Duration::from_secs(10), old_link.closed())
            .await
            .expect("the old link closes once its public connections end");
        assert_eq!(state.registry.len(), 1);
        assert_eq!(state.metrics.nodes_connected.get(), 1);
        echo_round_trip(&mut after, b"the new link carries on").await;
    }

    #[tokio::test]
    async fn a_node_cut_off_by_the_policy_loses_the_link_it_moved_from_too() {
        let relay = relay("upgrade-deny").await;
        let state = relay.relay.state.clone();
        // Every part held, even unused: a dropped link or stream ends its session.
        let Moved {
            old_link,
            old_reader: _old_reader,
            old_writer,
            old_echo: _old_echo,
            new_link: _new_link,
            mut new_reader,
            _new_writer,
            port: _,
            new_port: _,
            before: _before,
        } = move_a_node(&relay).await;
        let node = state.registry.nodes()[0];
        drop(old_writer);

        crate::edits::apply_policy_edit(&state, "deny", node)
            .await
            .expect("deny");
        let Control::Error { code, .. } = next_control(&mut new_reader).await else {
            panic!("the new session was not told");
        };
        assert_eq!(code, ErrorCode::Denied);
        // Well before --drain-timeout (30 s): the old link, public connection and all.
        tokio::time::timeout(Duration::from_secs(2), old_link.closed())
            .await
            .expect("the old link is closed with the new one");
    }
}
