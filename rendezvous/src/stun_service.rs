//! The STUN service: one UDP socket driven by the sans-IO codec in [`crate::stun`].
//! Both `ferry-relay` (embedded rendezvous) and `ferry-rendezvous` run it.
//!
//! It owns the socket, the receive loop and the `ferry_rendezvous_stun_*` metrics, and
//! nothing else: a Binding answer depends only on the datagram and its source, so a
//! flood costs CPU but never memory. Each worker task reuses one receive buffer; the
//! only per-packet allocations are the codec's.
//!
//! Reflection: UDP sources can be forged, so an answer larger than its request would
//! let someone aim more bytes at a victim than they send. Ferry's own requests are
//! padded to the size of any answer (`stun::binding_request`) and are answered without
//! limit. A stock client's bare 20-byte request gets a 32-byte (IPv4) or 44-byte
//! (IPv6) answer — RFC 8489 leaves no way to answer it smaller — so answers larger
//! than their request draw on a per-source-address budget ([`AMPLIFYING_PER_SEC`],
//! burst [`AMPLIFYING_BURST`]): plenty for real clients, and at most about 1 KiB/s
//! aimed at any one forged address. Over budget, nothing is sent (`rate_limited`).
//! The budget table is bounded ([`MAX_BUDGETED_SOURCES`]), so it cannot be grown.
//!
//! Replies are sent without waiting: if the socket's send buffer is full the reply is
//! dropped, as UDP may drop it anyway, and the client retransmits (RFC 8489 §6.2.1).
//! Stalling the loop on a slow send would delay every other client instead.

use std::io;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_proto::rate::PerAddress;

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use tokio::net::UdpSocket;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::stun;
use ferry_proto::sync::lock;

/// The IANA port for STUN over UDP.
pub const DEFAULT_STUN_PORT: u16 = 3478;

/// Where the STUN service listens unless `--stun` says otherwise: every interface,
/// IPv6 and IPv4 on one dual-stack socket (see `ferry_proto::net`).
pub const DEFAULT_STUN: SocketAddr = SocketAddr::V6(SocketAddrV6::new(
    Ipv6Addr::UNSPECIFIED,
    DEFAULT_STUN_PORT,
    0,
    0,
));

/// Largest datagram answered. STUN over UDP must fit the path MTU (RFC 8489 §6.2.1),
/// so anything bigger is not a request a real client sends. The receive buffer is one
/// byte longer, so a datagram that fills it is known to be oversized (the kernel
/// truncates silently) and is dropped instead of being parsed as its own prefix.
pub const MAX_REQUEST: usize = 2048;

/// Datagrams one worker handles before yielding to the runtime, so a flood on the STUN
/// port cannot starve the relay's other tasks on the same thread.
const BATCH: usize = 64;

/// Answers larger than their request that one source address gets per second, and at
/// once after a quiet spell (see the module docs).
pub const AMPLIFYING_PER_SEC: f64 = 20.0;
pub const AMPLIFYING_BURST: f64 = 40.0;
/// Source addresses whose budget is remembered at most (about 5 MiB).
pub const MAX_BUDGETED_SOURCES: usize = 65_536;

/// Pause after an unexpected receive error, so a persistent one does not spin a core.
const RECV_ERROR_PAUSE: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum StunServiceError {
    #[error("cannot listen for STUN on UDP {addr}: {source}; pick another address with --stun")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot register the STUN metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// One counter per outcome, resolved once so the per-packet cost is one atomic add.
#[derive(Clone)]
struct Counters {
    answered: IntCounter,
    error_reply: IntCounter,
    dropped: IntCounter,
    rate_limited: IntCounter,
    send_failed: IntCounter,
}

impl Counters {
    fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new(
                "ferry_rendezvous_stun_requests_total",
                "Datagrams received on the STUN port, by outcome: answered (Binding success \
                 sent), error_reply (420 Unknown Attribute sent), dropped (not a Binding \
                 request, malformed or oversized: no reply), rate_limited (the answer would \
                 be larger than the request and the source is over its budget for those: \
                 no reply), send_failed (a reply was due but the socket refused it)",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        Ok(Counters {
            answered: requests.with_label_values(&["answered"]),
            error_reply: requests.with_label_values(&["error_reply"]),
            dropped: requests.with_label_values(&["dropped"]),
            rate_limited: requests.with_label_values(&["rate_limited"]),
            send_failed: requests.with_label_values(&["send_failed"]),
        })
    }
}

/// Workers that share the socket. A few let a Binding flood use more than one core;
/// more than four mostly contend on the socket's receive queue.
fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 4)
}

/// A bound STUN socket with its metrics registered, not yet serving. Binding first
/// lets the caller report the real address (port 0 becomes a port) and fail startup on
/// a busy port before anything else runs.
pub struct StunService {
    socket: Arc<UdpSocket>,
    local_addr: SocketAddr,
    counters: Counters,
    budget: Arc<Budget>,
    workers: usize,
}

/// The per-source budget of answers larger than their request (module docs).
type Budget = Mutex<PerAddress>;

impl StunService {
    /// Binds `addr` and registers `ferry_rendezvous_stun_requests_total` in `registry`.
    pub async fn bind(addr: SocketAddr, registry: &Registry) -> Result<Self, StunServiceError> {
        let bind_err = |source| StunServiceError::Bind { addr, source };
        let socket = ferry_proto::net::bind_udp(addr, "STUN")
            .and_then(|s| {
                s.set_nonblocking(true)?;
                UdpSocket::from_std(s)
            })
            .map_err(bind_err)?;
        ferry_proto::link::size_udp_buffers(&socket, ferry_proto::link::SERVER_UDP_BUFFER, "STUN");
        let local_addr = socket.local_addr().map_err(bind_err)?;
        let counters = Counters::register(registry)?;
        Ok(StunService {
            socket: Arc::new(socket),
            local_addr,
            counters,
            budget: Arc::new(Mutex::new(PerAddress::new(
                AMPLIFYING_PER_SEC,
                AMPLIFYING_BURST,
                MAX_BUDGETED_SOURCES,
            ))),
            workers: default_workers(),
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` is cancelled (or the future is dropped, which stops the
    /// workers too).
    pub async fn run(self, shutdown: CancellationToken) {
        tracing::debug!("STUN service listening on UDP {}", self.local_addr);
        let mut workers = JoinSet::new();
        for _ in 0..self.workers {
            workers.spawn(serve(
                self.socket.clone(),
                self.counters.clone(),
                self.budget.clone(),
                shutdown.clone(),
            ));
        }
        while let Some(result) = workers.join_next().await {
            if let Err(e) = result
                && e.is_panic()
            {
                // The codec is meant never to panic; if it does, the other workers
                // keep the port answering and the log says what happened.
                tracing::error!("a STUN worker panicked: {e}");
            }
        }
    }

    /// Runs the service on its own task; the handle stops it.
    pub fn spawn(self) -> StunHandle {
        let local_addr = self.local_addr;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(self.run(shutdown.clone()));
        StunHandle {
            local_addr,
            shutdown,
            task: Some(task),
        }
    }
}

/// A running STUN service. Dropping it stops the service too.
pub struct StunHandle {
    local_addr: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl StunHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops the service and waits until its socket is closed.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for StunHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// One worker: wait until the socket is readable, then drain it without awaiting, so
/// the per-packet path is a receive, the codec and a send, with no waker bookkeeping.
async fn serve(
    socket: Arc<UdpSocket>,
    counters: Counters,
    budget: Arc<Budget>,
    shutdown: CancellationToken,
) {
    let mut buf = [0u8; MAX_REQUEST + 1];
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            ready = socket.readable() => {
                if let Err(e) = ready {
                    tracing::error!("STUN socket {:?} failed: {e}", socket.local_addr());
                    return;
                }
            }
        }
        let mut handled = 0;
        loop {
            match socket.try_recv_from(&mut buf) {
                Ok((len, from)) => answer(&socket, &buf[..len], from, &counters, &budget),
                // Another worker took the datagram, or the queue is empty.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    // Linux reports no ICMP errors on an unconnected UDP socket, so
                    // this is rare and unexpected (for example ENOMEM).
                    tracing::debug!("STUN receive failed: {e}");
                    tokio::time::sleep(RECV_ERROR_PAUSE).await;
                    break;
                }
            }
            handled += 1;
            if handled == BATCH {
                handled = 0;
                if shutdown.is_cancelled() {
                    return;
                }
                tokio::task::yield_now().await;
            }
        }
    }
}

/// Handles one datagram from `from`: counts it and sends the codec's reply, if any.
fn answer(
    socket: &UdpSocket,
    packet: &[u8],
    from: SocketAddr,
    counters: &Counters,
    budget: &Budget,
) {
    if packet.len() > MAX_REQUEST {
        counters.dropped.inc();
        return;
    }
    let Some(reply) = stun::handle(packet, canonical(from)) else {
        counters.dropped.inc();
        return;
    };
    if reply.len() > packet.len() {
        let allowed = lock(budget).allow(canonical(from).ip(), Instant::now());
        if !allowed {
            counters.rate_limited.inc();
            return;
        }
    }
    // A Binding success response has type 0x0101; the only other reply is 420.
    let counter = if reply.starts_with(&[0x01, 0x01]) {
        &counters.answered
    } else {
        &counters.error_reply
    };
    match socket.try_send_to(&reply, from) {
        Ok(_) => counter.inc(),
        Err(e) => {
            // WouldBlock: the send buffer is full. Anything else (say, an unroutable
            // source) concerns this one client. Either way drop, never stall.
            tracing::trace!("STUN reply to {from} not sent: {e}");
            counters.send_failed.inc();
        }
    }
}

/// An IPv4 client reaching a dual-stack IPv6 socket shows up as `::ffff:a.b.c.d`; it
/// must learn its IPv4 address, which is what a peer will see and dial.
use ferry_proto::net::canonical;

#[cfg(test)]
mod tests {
    use super::*;

    fn count(registry: &Registry, outcome: &str) -> u64 {
        registry
            .gather()
            .iter()
            .filter(|f| f.name() == "ferry_rendezvous_stun_requests_total")
            .flat_map(|f| f.get_metric())
            .find(|m| m.get_label().iter().any(|l| l.value() == outcome))
            .map(|m| m.get_counter().get_value() as u64)
            .unwrap_or(0)
    }

    /// Long enough for a loaded CI machine to answer; how long to wait for silence.
    const ANSWER: Duration = Duration::from_secs(5);
    const SILENCE: Duration = Duration::from_millis(300);

    /// Sends `packet` and waits up to `wait` for a reply. Loopback does not lose
    /// datagrams, so no retries: a missing reply is the service's doing.
    async fn exchange(
        client: &UdpSocket,
        packet: &[u8],
        to: SocketAddr,
        wait: Duration,
    ) -> Option<Vec<u8>> {
        client.send_to(packet, to).await.ok()?;
        let mut buf = [0u8; 1500];
        let (n, _) = tokio::time::timeout(wait, client.recv_from(&mut buf))
            .await
            .ok()?
            .ok()?;
        Some(buf[..n].to_vec())
    }

    #[tokio::test]
    async fn answers_bindings_drops_the_rest_and_stops() {
        let registry = Registry::new();
        let service = StunService::bind("127.0.0.1:0".parse().unwrap(), &registry)
            .await
            .unwrap();
        let server = service.local_addr();
        assert_ne!(server.port(), 0);
        let handle = service.spawn();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let me = client.local_addr().unwrap();

        let txid = [7u8; 12];
        let reply = exchange(&client, &stun::binding_request(&txid), server, ANSWER)
            .await
            .expect("a Binding response");
        assert_eq!(stun::parse_binding_response(&reply, &txid).unwrap(), me);

        assert!(exchange(&client, b"hello", server, SILENCE).await.is_none());
        let oversized = vec![0u8; MAX_REQUEST + 100];
        assert!(
            exchange(&client, &oversized, server, SILENCE)
                .await
                .is_none()
        );
        // Still answering after the garbage.
        let txid = [8u8; 12];
        let reply = exchange(&client, &stun::binding_request(&txid), server, ANSWER)
            .await
            .expect("a Binding response after garbage");
        assert_eq!(stun::parse_binding_response(&reply, &txid).unwrap(), me);
        assert_eq!(count(&registry, "answered"), 2);
        assert_eq!(count(&registry, "dropped"), 2);
        assert_eq!(count(&registry, "error_reply"), 0);

        handle.stop().await;
        // The socket is closed: the port can be bound again.
        UdpSocket::bind(server)
            .await
            .expect("port released on stop");
    }

    /// Waits until the service has counted `n` datagrams in all.
    async fn counted(registry: &Registry, n: u64) {
        let outcomes = [
            "answered",
            "error_reply",
            "dropped",
            "rate_limited",
            "send_failed",
        ];
        for _ in 0..500 {
            if outcomes.iter().map(|o| count(registry, o)).sum::<u64>() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the service did not count {n} datagrams");
    }

    #[tokio::test]
    async fn answers_that_amplify_draw_on_a_per_source_budget() {
        let registry = Registry::new();
        let service = StunService::bind("127.0.0.1:0".parse().unwrap(), &registry)
            .await
            .unwrap();
        let server = service.local_addr();
        let handle = service.spawn();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();

        // A stock client's bare request (header only): its answer is 12 bytes longer.
        let mut bare = vec![0, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42];
        bare.extend_from_slice(&[5u8; 12]);
        for _ in 0..100 {
            client.send_to(&bare, server).await.unwrap();
        }
        counted(&registry, 100).await;
        let answered = count(&registry, "answered");
        // The burst, plus whatever refilled while the datagrams were sent.
        assert!((40..=45).contains(&answered), "{answered} answered");
        assert_eq!(count(&registry, "rate_limited"), 100 - answered);

        // Ferry's own requests are as long as their answers: never budgeted, even from
        // a source that is over its budget.
        for i in 0..100u8 {
            client
                .send_to(&stun::binding_request(&[i; 12]), server)
                .await
                .unwrap();
        }
        counted(&registry, 200).await;
        assert_eq!(count(&registry, "answered"), answered + 100);

        // Another source has its own budget.
        let other = UdpSocket::bind("127.0.0.2:0").await.unwrap();
        let reply = exchange(&other, &bare, server, ANSWER).await;
        assert!(reply.is_some(), "another address is answered");
        handle.stop().await;
    }

    #[tokio::test]
    async fn a_busy_port_is_an_error_naming_the_flag() {
        let busy = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let err = StunService::bind(busy.local_addr().unwrap(), &Registry::new())
            .await
            .err()
            .expect("bind must fail")
            .to_string();
        assert!(err.contains("--stun"), "{err}");
    }

    #[tokio::test]
    async fn v4_clients_of_a_dual_stack_socket_learn_their_ipv4_address() {
        let registry = Registry::new();
        let service = StunService::bind("[::]:0".parse().unwrap(), &registry)
            .await
            .unwrap();
        let server = SocketAddr::new(
            std::net::Ipv4Addr::LOCALHOST.into(),
            service.local_addr().port(),
        );
        let handle = service.spawn();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let txid = [9u8; 12];
        let reply = exchange(&client, &stun::binding_request(&txid), server, ANSWER)
            .await
            .expect("a Binding response");
        let seen = stun::parse_binding_response(&reply, &txid).unwrap();
        assert_eq!(
            seen,
            client.local_addr().unwrap(),
            "plain IPv4, not ::ffff:"
        );
        handle.stop().await;
    }

    /// Mutations of valid requests (bit flips, truncations, extensions) must never
    /// panic the codec, whatever they are; the service's only defence is that it
    /// does not need one.
    #[test]
    fn mutated_requests_never_panic() {
        let from: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let base = stun::binding_request(&[3u8; 12]);
        for _ in 0..50_000 {
            let mut packet = base.clone();
            match next() % 4 {
                0 => {
                    let i = next() as usize % packet.len();
                    packet[i] ^= 1 << (next() % 8);
                }
                1 => packet.truncate(next() as usize % packet.len()),
                2 => {
                    let extra = next() as usize % 64;
                    packet.extend((0..extra).map(|_| next() as u8));
                    let len = (packet.len() - 20) as u16;
                    packet[2..4].copy_from_slice(&len.to_be_bytes());
                }
                _ => {
                    for byte in packet.iter_mut().skip(20) {
                        *byte = next() as u8;
                    }
                }
            }
            let _ = stun::handle(&packet, from);
        }
    }
}
