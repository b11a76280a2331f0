//! Churn and soak (issue #7): 10,000 nodes connect to a relay, stay a random while
//! (5 s to 2 minutes), leave, come back 5 s to a minute later, for 10 minutes (about
//! 100 handshakes a second and several thousand sessions at once), while 100 transfers run through ten shims'
//! public ports. Afterwards the relay's descriptors and tasks are back where they were
//! and its memory has not grown beyond what its allocator keeps; no transfer was
//! corrupted. `FERRY_SOAK_SECONDS` shortens the run for local use (CI runs the full
//! 600 s, beside the idle test, which takes as long).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferry_proto::SecretKey;
use ferry_proto::frame::Control;
use ferry_tests::node_session::NodeSession;
use ferry_tests::*;
use sha2::{Digest, Sha256};

const CHURNING_NODES: usize = 10_000;
const TRANSFERS: usize = 100;

/// The most resident memory this test's own process may use for its 10,000 nodes (a
/// few thousand sessions at once, each a QUIC connection's state) and 100 transfers.
const TEST_PROCESS_MEMORY_LIMIT_KIB: u64 = 3 << 20;

fn soak_seconds() -> u64 {
    std::env::var("FERRY_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600)
}

/// A small deterministic generator, so the churn pattern is the same every run.
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// One echo round of `len` bytes in 16 KiB chunks, paced; true when it came back
/// identical.
fn paced_echo(port: std::net::SocketAddr, seed: u64, len: usize) -> std::io::Result<bool> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(port)?;
    c.set_read_timeout(Some(Duration::from_secs(30)))?;
    let data = pattern(seed, len);
    let (mut sent, mut got) = (Sha256::new(), Sha256::new());
    let mut buf = vec![0u8; 16 << 10];
    for chunk in data.chunks(16 << 10) {
        c.write_all(chunk)?;
        sent.update(chunk);
        c.read_exact(&mut buf[..chunk.len()])?;
        got.update(&buf[..chunk.len()]);
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(sent.finalize() == got.finalize())
}

/// Counts of one churn phase.
#[derive(Default)]
struct Churn {
    sessions: AtomicU64,
    peak: AtomicU64,
    live: AtomicU64,
    refused: AtomicU64,
}

/// UDP endpoints the churning nodes dial from, each shared by a slice of the nodes.
/// One per node cost the test's process gigabytes (see `node_session::client_endpoint`);
/// a handful keeps quinn's per-endpoint work spread over the runtime's threads.
const ENDPOINTS: usize = 16;

/// Handshakes the churn keeps in flight at once. A slower machine then churns a little
/// more slowly instead of piling up attempts that time out, are retried and time out
/// again, each holding a connection's memory meanwhile.
const HANDSHAKES_IN_FLIGHT: usize = 128;

/// The churn: each of the nodes connects, registers, stays 5–120 s, leaves, waits
/// 5–60 s and comes back, until `deadline` (or until `memory` says the test's own
/// process has grown past its limit); starts are spread over half the phase (at most 5
/// minutes), a ramp rather than a thundering herd.
fn churn(
    relay: &Relay,
    keys: &[SecretKey],
    seconds: u64,
    phase: u64,
    memory: &Arc<MemoryWatch>,
) -> Arc<Churn> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let counts = Arc::new(Churn::default());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let endpoints: Vec<quinn::Endpoint> = (0..ENDPOINTS)
            .map(|_| node_session::client_endpoint())
            .collect();
        let handshakes = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_IN_FLIGHT));
        let mut nodes = tokio::task::JoinSet::new();
        for (n, key) in keys.iter().enumerate() {
            let url = relay.url.clone();
            let addr = relay.listen_addr();
            let counts = counts.clone();
            let key = key.clone();
            let endpoint = endpoints[n % ENDPOINTS].clone();
            let (handshakes, memory) = (handshakes.clone(), memory.clone());
            nodes.spawn(async move {
                let mut x = 0x9E37_79B9_7F4A_7C15 ^ (n as u64 + 1) ^ (phase << 40);
                let spread = (seconds / 2).clamp(1, 300) * 1000;
                tokio::time::sleep(Duration::from_millis(next(&mut x) % spread)).await;
                while Instant::now() < deadline && !memory.exceeded() {
                    let register = Control::Register {
                        services: vec![],
                        certificate: None,
                        upgrade: false,
                    };
                    let opened = {
                        let _permit = handshakes.acquire().await;
                        NodeSession::try_open_on(&endpoint, &url, addr, key.clone(), register).await
                    };
                    let session = match opened {
                        Ok((session, Some(Control::Registered { .. }))) => session,
                        // A busy machine may time a handshake out; a node retries, as a
                        // shim does. Counted and reported.
                        Ok((_, _)) | Err(_) => {
                            counts.refused.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(1000 + next(&mut x) % 4000))
                                .await;
                            continue;
                        }
                    };
                    counts.sessions.fetch_add(1, Ordering::Relaxed);
                    let now_live = counts.live.fetch_add(1, Ordering::Relaxed) + 1;
                    counts.peak.fetch_max(now_live, Ordering::Relaxed);
                    let stay = Duration::from_millis(5_000 + next(&mut x) % 115_000);
                    tokio::time::sleep_until(tokio::time::Instant::from_std(
                        (Instant::now() + stay).min(deadline),
                    ))
                    .await;
                    session.link.close("leaving");
                    drop(session);
                    counts.live.fetch_sub(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(5_000 + next(&mut x) % 55_000)).await;
                }
            });
        }
        while let Some(done) = nodes.join_next().await {
            done.expect("a churning node failed");
        }
        // The closes just sent must reach the relay before the endpoints go.
        for endpoint in &endpoints {
            endpoint.wait_idle().await;
        }
    });
    counts
}

/// Waits until only the ten shims are connected; the relay's resident memory then.
fn churned_sessions_gone(relay: &Relay) -> u64 {
    wait_for(
        "the churned sessions to be gone",
        Duration::from_secs(90),
        || (relay.metric("ferry_relay_nodes_connected") == 10.0).then_some(()),
    );
    rss_kib(relay.proc.pid())
}

/// Once the churn and the transfers have stopped: waits until the relay's descriptors
/// and tasks are back to the baseline, and returns them with its resident memory.
fn settled(relay: &Relay, fds_before: usize, tasks_before: f64) -> (usize, f64, u64) {
    let pid = relay.proc.pid();
    churned_sessions_gone(relay);
    let fds = wait_for("descriptors back", Duration::from_secs(30), || {
        let n = open_fds(pid);
        (n <= fds_before + 16).then_some(n)
    });
    let started = Instant::now();
    let tasks = loop {
        let n = relay.metric("ferry_relay_tasks");
        if n <= tasks_before + 16.0 {
            break n;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the relay still runs {n} tasks, {tasks_before} before the churn"
        );
        eprintln!("relay tasks: {n} (before the churn: {tasks_before})");
        std::thread::sleep(Duration::from_secs(5));
    };
    (fds, tasks, rss_kib(pid))
}

#[test]
fn ten_thousand_nodes_churn_for_ten_minutes_without_leaks_or_corruption() {
    let seconds = soak_seconds();
    let dir = TempDir::new("soak");
    let relay = Relay::start_args(dir.path(), "24800-24819", &Relay::NO_PER_ADDRESS_LIMITS);
    let shims: Vec<Shim> = (0..10)
        .map(|i| Shim::expose_echo(dir.path(), &format!("s{i}"), &relay.url, &["--public"]))
        .collect();
    let ports: Vec<_> = shims.iter().map(|s| s.public_addr("echo")).collect();
    let pid = relay.proc.pid();
    // Baseline once the relay has served a little of everything.
    assert!(paced_echo(ports[0], 0, 64 << 10).unwrap());
    std::thread::sleep(Duration::from_secs(2));
    let (fds_before, rss_before) = (open_fds(pid), rss_kib(pid));
    let tasks_before = relay.metric("ferry_relay_tasks");

    let stop = Arc::new(AtomicBool::new(false));
    let (rounds, corrupted, failed) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let transfers: Vec<_> = (0..TRANSFERS)
        .map(|i| {
            let port = ports[i % ports.len()];
            let (stop, rounds, corrupted, failed) = (
                stop.clone(),
                rounds.clone(),
                corrupted.clone(),
                failed.clone(),
            );
            std::thread::spawn(move || {
                let mut seed = i as u64 + 1;
                while !stop.load(Ordering::Relaxed) {
                    seed += 1000;
                    match paced_echo(port, seed, 256 << 10) {
                        Ok(true) => rounds.fetch_add(1, Ordering::Relaxed),
                        Ok(false) => corrupted.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();

    // Two phases of churn with the same 10,000 nodes. The allocator keeps the memory
    // of the first phase's peak (glibc returns little to the system), so the leak test
    // is the second phase: with as many sessions again, memory must not grow again.
    let keys: Vec<SecretKey> = (0..CHURNING_NODES).map(|_| SecretKey::generate()).collect();
    let memory = Arc::new(MemoryWatch::start(TEST_PROCESS_MEMORY_LIMIT_KIB));
    let first = churn(&relay, &keys, seconds / 2, 1, &memory);
    memory.check("the first phase of the churn");
    // (The transfers go on meanwhile, so descriptors and tasks are compared only at
    // the end.)
    let rss_mid = churned_sessions_gone(&relay);
    let second = churn(&relay, &keys, seconds / 2, 2, &memory);
    memory.check("the second phase of the churn");
    stop.store(true, Ordering::Relaxed);
    for t in transfers {
        t.join().unwrap();
    }

    let (fds_after, tasks_after, rss_after) = settled(&relay, fds_before, tasks_before);
    assert!(
        paced_echo(ports[0], 7, 64 << 10).unwrap(),
        "served after the soak"
    );
    let (rounds, corrupted, failed) = (
        rounds.load(Ordering::Relaxed),
        corrupted.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    let sessions = first.sessions.load(Ordering::Relaxed) + second.sessions.load(Ordering::Relaxed);
    let peak = first
        .peak
        .load(Ordering::Relaxed)
        .max(second.peak.load(Ordering::Relaxed));
    let refused = first.refused.load(Ordering::Relaxed) + second.refused.load(Ordering::Relaxed);
    println!(
        "SOAK | {seconds} s, {CHURNING_NODES} nodes, {sessions} sessions (peak {peak} at once, \
         {refused} attempts timed out and retried) | {TRANSFERS} transfers: {rounds} rounds \
         intact, {corrupted} corrupted, {failed} failed | relay fds {fds_before} -> \
         {fds_after}, tasks {tasks_before} -> {tasks_after}, RSS \
         {rss_before} -> {rss_mid} (after phase 1) -> {rss_after} KiB (after phase 2) | \
         this test's process: peak RSS {} KiB (limit {TEST_PROCESS_MEMORY_LIMIT_KIB})",
        memory.peak_kib()
    );
    assert_eq!(corrupted, 0, "a transfer came back altered");
    assert_eq!(failed, 0, "a transfer failed during the churn");
    assert!(
        rounds >= TRANSFERS as u64,
        "the transfers barely ran: {rounds} rounds"
    );
    assert!(
        rss_after < rss_mid + rss_mid / 5 + 16 * 1024,
        "the relay grew from {rss_mid} to {rss_after} KiB over a second phase of the same \
         churn: memory that sessions leave behind"
    );
}
