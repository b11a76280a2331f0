//! The running shim's shared state (`Core`): its key and options, the overlay, the
//! allow list, and the status of every relay, service and forward, with the few
//! operations every driver needs (reach a local service, splice, serve an overlay
//! stream). `shim::start` builds it; the relay clients, forwards, SOCKS door, admin
//! routes and panel all read it, and it imports none of them.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_proto::frame::{PeerOpen, PeerOpenReply, write_header};
use ferry_proto::link::Stream;
use ferry_proto::splice::{Counter, splice};
use ferry_proto::sync::lock;
use ferry_proto::{NodeId, SecretKey};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::allow::SharedAllow;
use crate::metrics::Metrics;
use crate::options::{ServiceConfig, ShimOptions};
use crate::overlay::Overlay;
pub use crate::status::{
    ForwardStatus, GridStatus, NetworkStatus, RelayRole, RelayState, RelayStatus, ServiceStatus,
    Status,
};

/// How long connecting to a local service may take.
const LOCAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Core {
    pub key: SecretKey,
    pub node_id: NodeId,
    pub opts: ShimOptions,
    pub metrics: Metrics,
    pub overlay: Arc<Overlay>,
    /// Who may reach this node's services over the overlay; the panel changes it.
    pub allow: SharedAllow,
    pub relays: Mutex<Vec<RelayStatus>>,
    pub services: Mutex<Vec<ServiceStatus>>,
    /// Forwards running now; `shim::start_forward` adds one, dropping its handle
    /// removes it.
    pub forwards: Mutex<Vec<ForwardStatus>>,
    /// Relays this node may ask who holds a public port.
    pub owners: crate::owners::PortOwners,
    /// Relays of a fleet this node may ask where a peer is, and its visits to them.
    pub visits: crate::visits::Visits,
    /// Where the SOCKS door listens, when it runs.
    pub socks_addr: Option<SocketAddr>,
    /// The home router's port mapping, when there is one.
    pub port_mapping: crate::portmap::SharedView,
    /// Cancelled on SIGINT/SIGTERM: relay sessions say goodbye so relays free this
    /// node's public ports at once instead of after an idle timeout.
    pub shutdown: CancellationToken,
}

impl Core {
    pub fn service(&self, name: Option<&str>) -> Option<&ServiceConfig> {
        match name {
            Some(n) => self.opts.services.iter().find(|s| s.name == n),
            None => self.opts.services.first(),
        }
    }

    pub fn update_relay(&self, index: usize, f: impl FnOnce(&mut RelayStatus)) {
        if let Some(r) = lock(&self.relays).iter_mut().find(|r| r.index == index) {
            f(r);
        }
    }

    /// Shows a visit (`crate::visits`) among the relays until [`Core::forget_relay`].
    pub fn show_visit(&self, index: usize, url: &ferry_proto::RelayUrl) {
        lock(&self.relays).push(RelayStatus::connecting(
            index,
            url.clone(),
            RelayRole::Visit,
        ));
    }

    /// Stops showing session `index` (a visit that ended).
    pub fn forget_relay(&self, index: usize) {
        lock(&self.relays).retain(|r| r.index != index);
    }

    pub fn relay_statuses(&self) -> Vec<RelayStatus> {
        lock(&self.relays).clone()
    }

    pub fn service_statuses(&self) -> Vec<ServiceStatus> {
        lock(&self.services).clone()
    }

    pub fn set_service_grant(&self, name: &str, public: Option<String>, error: Option<String>) {
        if let Some(s) = lock(&self.services).iter_mut().find(|s| s.name == name) {
            s.public = public.or(s.public.take());
            s.error = error;
        }
    }

    /// What `/api/status` says, the panel shows and `ferry-shim status` prints.
    pub fn status(&self) -> Status {
        let relays = self.relay_statuses();
        let relay_addr = relays
            .iter()
            .find(|r| r.state == RelayState::Connected)
            .and_then(|r| r.remote_addr);
        let policy = &self.opts.policy;
        Status {
            node_id: self.node_id,
            mode: policy.mode,
            forbids: policy.forbids().into_iter().map(str::to_string).collect(),
            proxy: self.opts.proxy.as_ref().map(|p| p.to_string()),
            socks: self.socks_addr,
            relays,
            services: self.service_statuses(),
            peers: self.overlay.peer_statuses(relay_addr),
            forwards: lock(&self.forwards).clone(),
            network: NetworkStatus {
                local: self.overlay.paths.local_view(),
                port_mapping: lock(&self.port_mapping).clone(),
            },
            grids: self
                .allow
                .snapshot()
                .grids
                .iter()
                .map(|g| GridStatus {
                    relay: g.relay,
                    admins: g.view.admins.iter().copied().collect(),
                    revoked: g.view.revoked.iter().copied().collect(),
                })
                .collect(),
            allow_grid: self.opts.allow_grid,
            refusals: self.overlay.refusals(),
        }
    }

    /// True when every relay holds a registered session.
    pub fn ready(&self) -> bool {
        lock(&self.relays)
            .iter()
            .filter(|r| r.role == RelayRole::Relay)
            .all(|r| r.state == RelayState::Connected)
    }

    /// Whether session `index` is with the standalone rendezvous (it comes after the
    /// relays), which carries no services and no overlay packets.
    pub fn is_rendezvous_session(&self, index: usize) -> bool {
        index >= self.opts.relays.len() && !crate::visits::is_visit(index)
    }

    pub(crate) fn counter(&self, direction: &str, path: &str) -> Counter {
        let c = self.metrics.bytes.with_label_values(&[direction, path]);
        Arc::new(move |n| c.inc_by(n))
    }

    /// Connects to a local service, or explains why not.
    pub async fn connect_local(&self, service: &ServiceConfig) -> Result<TcpStream, String> {
        let attempt = TcpStream::connect(&service.target);
        match tokio::time::timeout(LOCAL_CONNECT_TIMEOUT, attempt).await {
            Ok(Ok(tcp)) => {
                let _ = tcp.set_nodelay(true);
                Ok(tcp)
            }
            Ok(Err(e)) => Err(format!(
                "local service {:?} at {} is not reachable: {e}",
                service.name, service.target
            )),
            Err(_) => Err(format!(
                "local service {:?} at {} did not accept within {} s",
                service.name,
                service.target,
                LOCAL_CONNECT_TIMEOUT.as_secs()
            )),
        }
    }

    /// Splices a remote stream with a local socket, counting bytes on `path`.
    pub async fn splice_counted<R>(&self, remote: R, local: TcpStream, path: &str)
    where
        R: AsyncRead + AsyncWrite + Unpin,
    {
        let result = splice(
            remote,
            local,
            self.counter("in", path),
            self.counter("out", path),
        )
        .await;
        if let Err(e) = result {
            tracing::debug!("{path} stream ended: {e}");
        }
    }

    /// Serves one overlay stream request from `peer`.
    pub(crate) async fn serve_peer_stream(&self, peer: NodeId, open: PeerOpen, mut stream: Stream) {
        let refuse = |why: String| PeerOpenReply {
            error: Some(why),
            not_allowed: false,
        };
        let Some(service) = self.service(open.service.as_deref()).cloned() else {
            let why = match &open.service {
                Some(name) => format!("node {} has no service {name:?}", self.node_id),
                None => format!("node {} exposes no services", self.node_id),
            };
            tracing::info!("overlay stream from {peer} refused: {why}");
            self.metrics
                .streams
                .with_label_values(&["overlay_in", "refused"])
                .inc();
            let _ = write_header(&mut stream, &refuse(why)).await;
            return;
        };
        let local = match self.connect_local(&service).await {
            Ok(tcp) => tcp,
            Err(why) => {
                tracing::warn!("overlay stream from {peer}: {why}");
                self.metrics
                    .streams
                    .with_label_values(&["overlay_in", "failed"])
                    .inc();
                let _ = write_header(&mut stream, &refuse(why)).await;
                return;
            }
        };
        if write_header(
            &mut stream,
            &PeerOpenReply {
                error: None,
                not_allowed: false,
            },
        )
        .await
        .is_err()
        {
            return;
        }
        self.metrics
            .streams
            .with_label_values(&["overlay_in", "ok"])
            .inc();
        self.splice_counted(stream, local, "overlay").await;
    }
}

/// The next connection on a local listener (a forward, the SOCKS door), with Nagle
/// off. A failed accept (out of file descriptors, say) is logged and retried after a
/// pause rather than ending the listener.
pub async fn accept_local(listener: &TcpListener, what: &str) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((tcp, client)) => {
                let _ = tcp.set_nodelay(true);
                return (tcp, client);
            }
            Err(e) => {
                tracing::warn!("accept on the {what} listener failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
