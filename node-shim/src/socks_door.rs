//! The SOCKS door: a local SOCKS5 server through which unmodified apps (curl
//! `--socks5-hostname`, browsers) reach other nodes' services by key. A CONNECT to
//! `SERVICE.NODE_ID.ferry` (or `NODE_ID.ferry`, the node's default service) opens an
//! overlay stream to that node, end-to-end encrypted; the port in the request is
//! ignored, since the service is named. Any other name is refused, or in p2p mode
//! connected directly from this machine when `socks_passthrough` is on.
//!
//! The SOCKS5 wire protocol is `fast-socks5`'s server side; what a name means is
//! decided here, by [`parse_ferry_name`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fast_socks5::server::{Socks5ServerProtocol, states};
use fast_socks5::util::target_addr::TargetAddr;
use fast_socks5::{ReplyError, Socks5Command};
use ferry_proto::NodeId;
use ferry_proto::frame::validate_service_name;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::overlay::OpenError;
use crate::state::Core;

/// The top-level name the door carries over the overlay.
pub const FERRY_SUFFIX: &str = ".ferry";

/// Clients served at once; further ones wait in the listen queue.
const MAX_CLIENTS: usize = 1024;

/// How long a client may take to send its greeting and request.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a passthrough connection may take to open.
const PASSTHROUGH_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a `.ferry` name asks for: a node and optionally one of its services.
pub type FerryTarget = (NodeId, Option<String>);

/// Reads `SERVICE.NODE_ID.ferry` or `NODE_ID.ferry` (any case). `None`: not a
/// `.ferry` name; `Some(Err)`: a `.ferry` name that names nothing, with the reason.
pub fn parse_ferry_name(name: &str) -> Option<Result<FerryTarget, String>> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let inner = name.strip_suffix(FERRY_SUFFIX)?;
    let (service, node) = match inner.rsplit_once('.') {
        Some((service, node)) => (Some(service), node),
        None => (None, inner),
    };
    let node: NodeId = match node.parse() {
        Ok(n) => n,
        Err(_) => {
            return Some(Err(format!(
                "{name:?} names no node: expected SERVICE.NODE_ID.ferry or NODE_ID.ferry with a 52-character node ID"
            )));
        }
    };
    if let Some(s) = service
        && let Err(e) = validate_service_name(s)
    {
        return Some(Err(format!("{name:?}: {e}")));
    }
    Some(Ok((node, service.map(str::to_string))))
}

/// Serves SOCKS clients on `listener` until the process ends.
pub async fn run(core: Arc<Core>, listener: TcpListener) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tcp, client) = crate::state::accept_local(&listener, "SOCKS door").await;
        let core = core.clone();
        tokio::spawn(async move {
            serve(&core, tcp, client).await;
            drop(permit);
        });
    }
}

type Request = (
    Socks5ServerProtocol<TcpStream, states::CommandRead>,
    Socks5Command,
    TargetAddr,
);

async fn read_request(tcp: TcpStream) -> Result<Request, String> {
    let handshake = async {
        let proto = Socks5ServerProtocol::accept_no_auth(tcp)
            .await
            .map_err(|e| e.to_string())?;
        proto.read_command().await.map_err(|e| e.to_string())
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| format!("no SOCKS request within {} s", HANDSHAKE_TIMEOUT.as_secs()))?
}

async fn serve(core: &Core, tcp: TcpStream, client: SocketAddr) {
    let (proto, command, target) = match read_request(tcp).await {
        Ok(r) => r,
        Err(why) => {
            tracing::info!("SOCKS client {client}: {why}");
            count(core, "bad_request");
            return;
        }
    };
    if command != Socks5Command::TCPConnect {
        tracing::info!("SOCKS client {client}: only CONNECT is supported, not {command:?}");
        count(core, "refused");
        let _ = proto.reply_error(&ReplyError::CommandNotSupported).await;
        return;
    }
    let name = match &target {
        TargetAddr::Domain(name, _) => Some(name.as_str()),
        TargetAddr::Ip(_) => None,
    };
    match name.and_then(parse_ferry_name) {
        Some(Ok((node, service))) => carry(core, proto, client, node, service).await,
        Some(Err(why)) => {
            tracing::info!("SOCKS client {client}: {why}");
            count(core, "refused");
            let _ = proto.reply_error(&ReplyError::HostUnreachable).await;
        }
        None if core.opts.socks_passthrough => passthrough(core, proto, client, &target).await,
        None => {
            let why = if core.opts.policy.socks_passthrough_allowed {
                "only NAME.ferry names are carried (socks_passthrough is off)".to_string()
            } else {
                format!(
                    "only NAME.ferry names are carried in {} mode",
                    core.opts.policy.mode.name()
                )
            };
            tracing::info!("SOCKS client {client} asked for {target}: refused, {why}");
            count(core, "refused");
            let _ = proto.reply_error(&ReplyError::ConnectionNotAllowed).await;
        }
    }
}

fn count(core: &Core, outcome: &str) {
    core.metrics
        .streams
        .with_label_values(&["socks", outcome])
        .inc();
}

async fn carry(
    core: &Core,
    proto: Socks5ServerProtocol<TcpStream, states::CommandRead>,
    client: SocketAddr,
    node: NodeId,
    service: Option<String>,
) {
    let stream = match core.overlay.open(node, service.clone()).await {
        Ok(s) => s,
        Err(why) => {
            tracing::warn!(
                "SOCKS client {client}: cannot reach {} on node {node}: {why}",
                service.as_deref().unwrap_or("the default service")
            );
            count(core, "failed");
            let _ = proto.reply_error(&reply_for(&why)).await;
            return;
        }
    };
    let Ok(tcp) = proto
        .reply_success(SocketAddr::from(([0, 0, 0, 0], 0)))
        .await
    else {
        return;
    };
    count(core, "ok");
    core.splice_counted(stream, tcp, "overlay").await;
}

/// The SOCKS answer (RFC 1928 §6) for a stream the overlay could not open.
fn reply_for(error: &OpenError) -> ReplyError {
    match error {
        OpenError::Unreachable(_) => ReplyError::HostUnreachable,
        OpenError::NotAllowed(_) => ReplyError::ConnectionNotAllowed,
        OpenError::Refused(_) => ReplyError::ConnectionRefused,
        OpenError::TimedOut(_) => ReplyError::TtlExpired,
    }
}

async fn passthrough(
    core: &Core,
    proto: Socks5ServerProtocol<TcpStream, states::CommandRead>,
    client: SocketAddr,
    target: &TargetAddr,
) {
    let connect = async {
        match target {
            TargetAddr::Ip(addr) => TcpStream::connect(addr).await,
            TargetAddr::Domain(host, port) => TcpStream::connect((host.as_str(), *port)).await,
        }
    };
    let remote = match tokio::time::timeout(PASSTHROUGH_CONNECT_TIMEOUT, connect).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            tracing::info!("SOCKS client {client}: passthrough to {target} failed: {e}");
            count(core, "failed");
            let _ = proto.reply_error(&ReplyError::ConnectionRefused).await;
            return;
        }
        Err(_) => {
            count(core, "failed");
            let _ = proto.reply_error(&ReplyError::ConnectionTimeout).await;
            return;
        }
    };
    let _ = remote.set_nodelay(true);
    let bound = remote
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let Ok(tcp) = proto.reply_success(bound).await else {
        return;
    };
    count(core, "ok");
    core.splice_counted(remote, tcp, "passthrough").await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::SecretKey;

    #[test]
    fn ferry_names_name_a_node_and_maybe_a_service() {
        let id = SecretKey::generate().node_id();
        assert_eq!(
            parse_ferry_name(&format!("{id}.ferry")),
            Some(Ok((id, None)))
        );
        assert_eq!(
            parse_ferry_name(&format!("web.{}.FERRY.", id.to_string().to_uppercase())),
            Some(Ok((id, Some("web".into()))))
        );
        assert_eq!(parse_ferry_name("example.com"), None);
        assert_eq!(parse_ferry_name("ferry"), None);
        let err = parse_ferry_name("web.nope.ferry").unwrap().unwrap_err();
        assert!(err.contains("52-character node ID"), "{err}");
        let err = parse_ferry_name(&format!("a.b.{id}.ferry"))
            .unwrap()
            .unwrap_err();
        assert!(err.contains("a.b"), "{err}");
    }
}
