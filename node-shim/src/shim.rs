//! Starting and stopping the shim, the composition root: `start` builds the `Core`
//! (`crate::state`) and binds everything that can fail up front (admin, forward
//! listeners) so that mistakes are reported at once, then spawns one relay client per
//! configured relay.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use ferry_proto::SecretKey;
use ferry_proto::splice::splice;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::allow::{AllowList, SharedAllow};
use crate::metrics::Metrics;
use crate::options::{ForwardConfig, ShimOptions};
use crate::overlay::Overlay;
use crate::path_manager::PathOptions;
use crate::path_socket::PathSocket;
use crate::state::{Core, ForwardStatus, RelayRole, RelayStatus, ServiceStatus, accept_local};

/// How long shutdown waits for relay sessions to close cleanly.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(300);

/// A started shim.
pub struct Shim {
    pub core: Arc<Core>,
    pub admin_addr: SocketAddr,
    fatal: mpsc::Receiver<anyhow::Error>,
    /// Ends once the port mapping is removed (after shutdown).
    port_mapper: Option<tokio::task::JoinHandle<()>>,
    /// The configured forwards, open as long as the shim runs.
    _forwards: Vec<ForwardHandle>,
}

/// A running forward: a local listener whose connections are carried over the
/// overlay to one node's service. Dropping it closes the listener and takes the
/// forward out of status; connections already carried go on.
pub struct ForwardHandle {
    core: std::sync::Weak<Core>,
    listen: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl ForwardHandle {
    /// The local address clients connect to.
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }
}

impl Drop for ForwardHandle {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(core) = self.core.upgrade() {
            ferry_proto::sync::lock(&core.forwards).retain(|f| f.listen != self.listen);
        }
    }
}

/// Starts carrying `listener`'s connections to `forward`'s node and service, and
/// shows the forward in status until the handle is dropped.
pub fn start_forward(
    core: &Arc<Core>,
    forward: ForwardConfig,
    listener: TcpListener,
) -> std::io::Result<ForwardHandle> {
    let listen = listener.local_addr()?;
    let to = match &forward.service {
        Some(s) => format!("{}/{s}", forward.node),
        None => forward.node.to_string(),
    };
    ferry_proto::sync::lock(&core.forwards).push(ForwardStatus { to, listen });
    Ok(ForwardHandle {
        core: Arc::downgrade(core),
        listen,
        task: tokio::spawn(run_forward(core.clone(), forward, listener)),
    })
}

/// Loads or creates the node key in `data_dir`.
pub fn load_key(opts: &ShimOptions) -> anyhow::Result<SecretKey> {
    let path = opts.data_dir.join("node.key");
    let (key, created) = SecretKey::load_or_create(&path)?;
    if created {
        tracing::info!(
            "created node key {} (node ID {})",
            path.display(),
            key.node_id()
        );
    }
    Ok(key)
}

pub async fn start(opts: ShimOptions) -> anyhow::Result<Shim> {
    let key = load_key(&opts)?;
    let node_id = key.node_id();
    // Private mode: the QUIC endpoint still needs a socket under it (relayed overlay
    // packets reach it from the relay link), but one on loopback that may send
    // nothing: no packet of it can leave the machine.
    let udp_ip = if opts.policy.udp {
        std::net::Ipv4Addr::UNSPECIFIED
    } else {
        std::net::Ipv4Addr::LOCALHOST
    };
    let udp_addr = SocketAddr::from((udp_ip, opts.udp_port));
    let (socket, control) = PathSocket::bind(udp_addr).with_context(|| {
        format!("cannot bind the shim's UDP socket {udp_addr}; pick another --udp-port")
    })?;
    if !opts.policy.udp {
        socket.forbid_udp();
    }
    let metrics = Metrics::new(&socket)?;
    // Shared and changeable at run time: the web panel's allow/deny buttons edit it
    // (in memory only; the config file's `allow` is what a restart starts from).
    let allow = SharedAllow::new(AllowList {
        me: node_id,
        nodes: opts.allow.clone(),
        any: opts.allow_any,
        denied: Default::default(),
        grid: opts.allow_grid,
        grids: opts.memberships.known_grids(),
        members: Default::default(),
    });
    let paths = crate::path_manager::start(
        key.clone(),
        socket.clone(),
        control,
        PathOptions {
            addresses: opts.addresses.clone(),
            punch_ttl: opts.punch_ttl,
            relays: opts.relays.clone(),
            allow: allow.clone(),
            policy: opts.policy,
        },
        &metrics.registry,
    )?;
    let overlay = Arc::new(Overlay::new(
        &key,
        socket,
        paths,
        allow.clone(),
        opts.memberships.hello(),
    )?);

    let mut forward_listeners = Vec::new();
    for f in &opts.forwards {
        let listener = TcpListener::bind(f.listen).await.with_context(|| {
            format!(
                "cannot listen on {} for the forward to {}; pick another --listen address",
                f.listen, f.node
            )
        })?;
        forward_listeners.push((f.clone(), listener));
    }

    let socks_listener = match opts.socks {
        Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| {
            format!("cannot listen on {addr} for the SOCKS door; pick another --listen address")
        })?),
        None => None,
    };
    let socks_addr = match &socks_listener {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };

    let admin = ferry_proto::admin::bind(opts.admin, &opts.admin_token).await?;
    let admin_addr = admin.local_addr()?;

    let core = Arc::new(Core {
        node_id,
        relays: Mutex::new(
            opts.relays
                .iter()
                .map(|url| (url, RelayRole::Relay))
                .chain(
                    opts.rendezvous
                        .iter()
                        .map(|url| (url, RelayRole::Rendezvous)),
                )
                .enumerate()
                .map(|(index, (url, role))| RelayStatus::connecting(index, url.clone(), role))
                .collect(),
        ),
        services: Mutex::new(
            opts.services
                .iter()
                .map(|s| ServiceStatus {
                    name: s.name.clone(),
                    target: s.target.clone(),
                    public: None,
                    error: None,
                })
                .collect(),
        ),
        forwards: Mutex::new(Vec::new()),
        owners: Default::default(),
        visits: Default::default(),
        socks_addr,
        port_mapping: Default::default(),
        shutdown: CancellationToken::new(),
        metrics,
        overlay: overlay.clone(),
        allow: allow.clone(),
        key,
        opts: opts.clone(),
    });

    tokio::spawn(ferry_proto::admin::serve(
        admin,
        crate::admin::router(core.clone()),
        opts.admin_token.clone(),
    ));

    let serving = core.clone();
    tokio::spawn(overlay.accept_loop(move |peer, open, stream| {
        let core = serving.clone();
        async move { core.serve_peer_stream(peer, open, stream).await }
    }));

    let mut forwards = Vec::new();
    for (f, listener) in forward_listeners {
        forwards.push(start_forward(&core, f, listener)?);
    }
    if let Some(listener) = socks_listener {
        tokio::spawn(crate::socks_door::run(core.clone(), listener));
    }

    let port_mapper = (core.opts.policy.port_mapping
        && !core.opts.port_mapping.is_empty()
        && crate::portmap::worth_mapping(&core.opts.relays))
    .then(|| {
        let port = core
            .overlay
            .socket
            .udp_local_addr()
            .map(|a| a.port())
            .unwrap_or(0);
        crate::portmap::start(
            core.opts.port_mapping.clone(),
            port,
            core.overlay.paths.events.clone(),
            core.port_mapping.clone(),
            core.shutdown.clone(),
        )
    });

    // A peer dialled without a connection is looked for in the relays' fleet too.
    let finding = Arc::downgrade(&core);
    core.overlay.set_finder(Box::new(move |peer| {
        if let Some(core) = finding.upgrade() {
            tokio::spawn(crate::relay_client::find_peer(core, peer));
        }
    }));
    let (fatal_tx, fatal) = mpsc::channel(4);
    for (index, url) in opts.relays.iter().chain(&opts.rendezvous).enumerate() {
        tokio::spawn(crate::relay_client::run(
            core.clone(),
            index,
            url.clone(),
            fatal_tx.clone(),
        ));
    }
    tracing::info!(
        "node {node_id} in {} mode: {} service(s), {} forward(s), {} relay(s), admin http://{admin_addr}",
        opts.policy.mode.name(),
        opts.services.len(),
        opts.forwards.len(),
        opts.relays.len()
    );
    Ok(Shim {
        core,
        admin_addr,
        fatal,
        port_mapper,
        _forwards: forwards,
    })
}

impl Shim {
    /// Runs until SIGINT/SIGTERM (Ok) or a fatal relay error (Err).
    pub async fn run(mut self) -> anyhow::Result<()> {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let result = tokio::select! {
            _ = tokio::signal::ctrl_c() => Ok(()),
            _ = term.recv() => Ok(()),
            err = self.fatal.recv() => Err(err.unwrap_or_else(|| anyhow::anyhow!("all relay clients stopped"))),
        };
        self.core.shutdown.cancel();
        self.core.overlay.close();
        // Give the relay sessions a moment to send their goodbyes, and the router
        // time to confirm that the port mapping is gone.
        let mapping_removed = async {
            if let Some(task) = self.port_mapper.take() {
                let limit = crate::portmap::REMOVE_TIMEOUT + Duration::from_millis(200);
                let _ = tokio::time::timeout(limit, task).await;
            }
        };
        tokio::join!(tokio::time::sleep(SHUTDOWN_GRACE), mapping_removed);
        result
    }
}

async fn run_forward(core: Arc<Core>, forward: ForwardConfig, listener: TcpListener) {
    loop {
        let (tcp, client) = accept_local(&listener, "forward").await;
        let core = core.clone();
        let forward = forward.clone();
        let accepted = std::time::Instant::now();
        tokio::spawn(async move {
            match core
                .overlay
                .open(forward.node, forward.service.clone())
                .await
            {
                Ok(stream) => {
                    core.metrics
                        .streams
                        .with_label_values(&["overlay_out", "ok"])
                        .inc();
                    core.metrics
                        .stream_setup_seconds
                        .with_label_values(&["overlay_out"])
                        .observe(accepted.elapsed().as_secs_f64());
                    let result = splice(
                        tcp,
                        stream,
                        core.counter("out", "overlay"),
                        core.counter("in", "overlay"),
                    )
                    .await;
                    if let Err(e) = result {
                        tracing::debug!("forward stream for {client} ended: {e}");
                    }
                }
                Err(why) => {
                    core.metrics
                        .streams
                        .with_label_values(&["overlay_out", "failed"])
                        .inc();
                    tracing::warn!(
                        "connection from {client} to node {} could not be carried: {why}",
                        forward.node
                    );
                }
            }
        });
    }
}
