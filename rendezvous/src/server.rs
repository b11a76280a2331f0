//! The standalone `ferry-rendezvous` process: its key, the STUN service, node sessions
//! (QUIC on `--listen`: path records and punch coordination) and the admin HTTP
//! listener, bound in that order so a busy port fails startup before the ready line;
//! with `--fleet`, the fleet's shared path records (`crate::fleet`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry_proto::SecretKey;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::State;
use crate::config::RendezvousOptions;
use crate::fleet::{self, FleetOps};
use crate::node_sessions::{self, NodeSessions};
use crate::sessions::Rendezvous;
use crate::stun_service::StunService;

/// How long the STUN workers get to finish after a stop signal.
const STOP_GRACE: Duration = Duration::from_secs(1);

/// A started standalone rendezvous.
pub struct RendezvousServer {
    pub state: Arc<State>,
    pub admin_addr: SocketAddr,
    stun: JoinHandle<()>,
    admin: JoinHandle<()>,
    nodes: JoinHandle<()>,
    /// Sweeping expired records, and the fleet's records (`--fleet`).
    background: Vec<JoinHandle<()>>,
}

/// Loads or creates the key, binds STUN and admin HTTP. Returns once everything is
/// bound, so the addresses are final.
pub async fn start(opts: RendezvousOptions) -> anyhow::Result<RendezvousServer> {
    ferry_proto::identity::create_private_dir(&opts.data_dir)?;
    let key_path = opts.data_dir.join("rendezvous.key");
    let (key, created) = SecretKey::load_or_create(&key_path)?;
    if created {
        tracing::info!("created rendezvous key {}", key_path.display());
    }

    let registry = prometheus::Registry::new();
    let stun = StunService::bind(opts.stun, &registry).await?;
    let stun_addr = stun.local_addr();
    let endpoint = node_sessions::bind(&key, opts.listen)?;
    let listen = endpoint.local_addr()?;
    let rendezvous = Arc::new(Rendezvous::new(&registry)?);
    // In a fleet, records published here queue from the start and are written once
    // the engine is reached; nothing a node does waits for the engine.
    let fleet = match &opts.fleet {
        Some(fleet) => {
            let ops = FleetOps::new(
                &registry,
                "ferry_rendezvous",
                "connect, watch, write_record",
            )?;
            let (queue, records) = tokio::sync::mpsc::channel(fleet::RECORD_QUEUE);
            rendezvous.on_stored(Box::new(move |record| {
                if let Ok(json) = serde_json::to_vec(record) {
                    let _ = queue.try_send((record.record.node_id, json.into()));
                }
            }));
            Some((fleet.clone(), ops, records))
        }
        None => None,
    };
    let sessions = NodeSessions::new(rendezvous.clone(), stun_addr.port());
    let admin = ferry_proto::admin::bind(opts.admin, &opts.admin_token).await?;
    let admin_addr = admin.local_addr()?;

    let shutdown = CancellationToken::new();
    let fleet_up = fleet.as_ref().map(|(_, ops, _)| ops.up.clone());
    let fleet_task = fleet.map(|(opts, ops, records)| {
        tokio::spawn(fleet::serve_rendezvous_records(
            opts,
            ops,
            rendezvous.clone(),
            records,
        ))
    });
    let sweep = tokio::spawn(rendezvous.clone().sweep_now_and_then());
    let state = Arc::new(State {
        fleet_up,
        id: key.node_id(),
        stun_addr,
        listen,
        sessions: sessions.clone(),
        opts: opts.clone(),
        registry,
        shutdown: shutdown.clone(),
    });
    let nodes = tokio::spawn(sessions.serve(endpoint, shutdown.clone()));
    let stun = tokio::spawn(stun.run(shutdown));
    let admin = tokio::spawn(ferry_proto::admin::serve(
        admin,
        crate::admin::router(state.clone()),
        opts.admin_token.clone(),
    ));
    tracing::info!(
        "rendezvous {} serving STUN on UDP {stun_addr}, node sessions on UDP {listen}, admin http://{admin_addr}",
        state.id,
    );
    Ok(RendezvousServer {
        state,
        admin_addr,
        stun,
        admin,
        nodes,
        background: [Some(sweep), fleet_task].into_iter().flatten().collect(),
    })
}

impl RendezvousServer {
    /// Runs until SIGINT/SIGTERM or `state.shutdown` is cancelled, then stops STUN
    /// (closing its socket) and the admin listener.
    pub async fn run_until_shutdown(self) {
        let shutdown = self.state.shutdown.clone();
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = wait_for_signal() => tracing::info!("signal received, shutting down"),
        }
        shutdown.cancel();
        let mut stun = self.stun;
        if tokio::time::timeout(STOP_GRACE, &mut stun).await.is_err() {
            stun.abort();
        }
        self.admin.abort();
        self.nodes.abort();
        for task in self.background {
            task.abort();
        }
    }
}

/// SIGINT (Ctrl-C) or SIGTERM (systemd, container runtimes), whichever comes first.
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::warn!("cannot watch for SIGTERM ({e}); only Ctrl-C stops this process");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
