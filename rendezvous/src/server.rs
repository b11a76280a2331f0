//! The standalone `ferry-rendezvous` process: its key, the STUN service, node sessions
//! (QUIC on `--listen`: path records and punch coordination) and the admin HTTP
//! listener, bound in that order so a busy port fails startup before the ready line.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry_proto::SecretKey;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::State;
use crate::config::RendezvousOptions;
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
    let sessions = NodeSessions::new(Arc::new(Rendezvous::new(&registry)?), stun_addr.port());
    let admin = ferry_proto::admin::bind(opts.admin, &opts.admin_token).await?;
    let admin_addr = admin.local_addr()?;

    let shutdown = CancellationToken::new();
    let state = Arc::new(State {
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
