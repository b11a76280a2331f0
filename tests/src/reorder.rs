//! Packet reordering for the NAT lab ([`crate::netlab::Lab::reorder`]): an nft rule on a
//! lab node hands every IPv4 packet it sees to an NFQUEUE, and a thread here lets most
//! of them through at once and holds a few back for a moment, so later packets of the
//! same flow overtake them.
//!
//! Written here because the usual tool, netem (`tc qdisc ... netem reorder`), is not in
//! the lab's kernel, and nft alone can drop packets but not delay them. The kernel
//! keeps each queued packet until it gets a verdict, and verdicts may come in any
//! order; so holding a verdict back is all it takes. Only a packet's first bytes are
//! copied out (to tell its flow), and the verdict carries no payload, so the kernel
//! sends the packet it kept, unchanged.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The queue the nft rule feeds ([`crate::netlab::Lab::reorder`]); queues belong to a
/// network namespace, so every lab node can use the same number.
pub const QUEUE: u16 = 7;

/// The longest the reorderer sleeps while its queue is empty.
const IDLE_NAP: Duration = Duration::from_micros(200);

/// Enough of a packet to read its IPv4 addresses, protocol and ports.
const COPY_BYTES: u16 = 64;

/// What the reorderer did so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReorderStats {
    /// Packets that went through the queue.
    pub queued: u64,
    /// Packets held back.
    pub held: u64,
    /// Packets let through while an earlier packet of their own flow (addresses,
    /// protocol, ports) was held back: each one arrived ahead of a packet sent before
    /// it.
    pub overtook: u64,
}

#[derive(Default)]
struct Counters {
    queued: AtomicU64,
    held: AtomicU64,
    overtook: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> ReorderStats {
        ReorderStats {
            queued: self.queued.load(Ordering::Relaxed),
            held: self.held.load(Ordering::Relaxed),
            overtook: self.overtook.load(Ordering::Relaxed),
        }
    }
}

/// Opens and binds the queue. Call it inside the node's namespace: the netlink socket
/// stays in the namespace it was made in.
pub fn open_queue() -> io::Result<nfq::Queue> {
    let mut queue = nfq::Queue::open()?;
    queue.bind(QUEUE)?;
    queue.set_copy_range(QUEUE, COPY_BYTES)?;
    // Large (GSO) packets come whole instead of being cut up in the kernel first.
    queue.set_recv_gso(QUEUE, true)?;
    // If the queue ever fills, packets pass rather than vanish: this is a reorderer,
    // loss is another fault's job.
    queue.set_fail_open(QUEUE, true)?;
    queue.set_queue_max_len(QUEUE, 8192)?;
    queue.set_nonblocking(true);
    Ok(queue)
}

/// Runs until dropped or [`Reorderer::stop`]ped; every packet still held is then let
/// through.
pub struct Reorderer {
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl Reorderer {
    /// Holds `percent`% of the packets from `queue`, picked at random, for `hold` each.
    pub fn start(queue: nfq::Queue, percent: u8, hold: Duration) -> Reorderer {
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (counters.clone(), stop.clone());
        let thread = std::thread::spawn(move || run(queue, percent, hold, &c, &s));
        Reorderer {
            counters,
            stop,
            thread: Some(thread),
        }
    }

    pub fn stats(&self) -> ReorderStats {
        self.counters.snapshot()
    }

    /// Stops, lets every held packet through, and returns the final counts or the
    /// error that stopped the thread early.
    pub fn stop(mut self) -> Result<ReorderStats, String> {
        self.join()?;
        Ok(self.stats())
    }

    fn join(&mut self) -> Result<(), String> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(format!("the reorderer failed: {e}")),
            Some(Err(_)) => Err("the reorderer panicked".to_string()),
        }
    }
}

impl Drop for Reorderer {
    fn drop(&mut self) {
        let _ = self.join();
    }
}

/// Addresses, protocol and ports: what tells one flow from another.
type FlowKey = [u8; 13];

fn flow_key(packet: &[u8]) -> FlowKey {
    let mut key = [0u8; 13];
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return key;
    }
    key[0] = packet[9];
    key[1..9].copy_from_slice(&packet[12..20]);
    let header = usize::from(packet[0] & 0x0f) * 4;
    // TCP and UDP both start with the two ports.
    if matches!(packet[9], 6 | 17)
        && let Some(ports) = packet.get(header..header + 4)
    {
        key[9..13].copy_from_slice(ports);
    }
    key
}

fn run(
    mut queue: nfq::Queue,
    percent: u8,
    hold: Duration,
    counters: &Counters,
    stop: &AtomicBool,
) -> io::Result<()> {
    let mut held: VecDeque<(Instant, nfq::Message, FlowKey)> = VecDeque::new();
    let mut held_per_flow: HashMap<FlowKey, u32> = HashMap::new();
    // xorshift64: the picks need no quality beyond "spread out", and the tests crate
    // need not pull in a random number crate for it.
    let mut state = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        | 1;
    let mut pick = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % 100 < u64::from(percent)
    };
    let result = loop {
        if stop.load(Ordering::Relaxed) {
            break Ok(());
        }
        let mut failed = None;
        let mut received = 0;
        // A bounded batch, so that held packets fall due even under steady traffic.
        while received < 256 {
            let mut message = match queue.recv() {
                Ok(message) => message,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            received += 1;
            counters.queued.fetch_add(1, Ordering::Relaxed);
            let key = flow_key(message.get_payload());
            if pick() {
                counters.held.fetch_add(1, Ordering::Relaxed);
                *held_per_flow.entry(key).or_default() += 1;
                held.push_back((Instant::now() + hold, message, key));
                continue;
            }
            if held_per_flow.get(&key).is_some_and(|n| *n > 0) {
                counters.overtook.fetch_add(1, Ordering::Relaxed);
            }
            message.set_verdict(nfq::Verdict::Accept);
            if let Err(e) = queue.verdict(message) {
                failed = Some(e);
                break;
            }
        }
        if let Some(e) = failed {
            break Err(e);
        }
        let now = Instant::now();
        while held.front().is_some_and(|(due, _, _)| *due <= now) {
            if let Some((_, message, key)) = held.pop_front()
                && let Err(e) = release(&mut queue, message, key, &mut held_per_flow)
            {
                return Err(e);
            }
        }
        if received == 0 {
            // nfq does not expose its socket to poll on, so an idle queue is polled
            // by napping: 200 µs is short beside a hold of milliseconds, and long
            // enough to cost next to no CPU.
            let next_due = held
                .front()
                .map(|(due, _, _)| due.saturating_duration_since(now))
                .unwrap_or(IDLE_NAP);
            std::thread::sleep(next_due.min(IDLE_NAP));
        }
    };
    for (_, message, key) in held.drain(..) {
        release(&mut queue, message, key, &mut held_per_flow)?;
    }
    result
}

fn release(
    queue: &mut nfq::Queue,
    mut message: nfq::Message,
    key: FlowKey,
    held_per_flow: &mut HashMap<FlowKey, u32>,
) -> io::Result<()> {
    if let Some(n) = held_per_flow.get_mut(&key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            held_per_flow.remove(&key);
        }
    }
    message.set_verdict(nfq::Verdict::Accept);
    queue.verdict(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_are_told_apart_by_addresses_protocol_and_ports() {
        let mut udp = vec![0u8; 28];
        udp[0] = 0x45;
        udp[9] = 17;
        udp[12..16].copy_from_slice(&[10, 0, 0, 1]);
        udp[16..20].copy_from_slice(&[10, 0, 0, 2]);
        udp[20..24].copy_from_slice(&[0x1f, 0x90, 0x00, 0x35]);
        let mut other_port = udp.clone();
        other_port[23] = 0x36;
        assert_ne!(flow_key(&udp), flow_key(&other_port));
        assert_eq!(flow_key(&udp)[9..13], [0x1f, 0x90, 0x00, 0x35]);
        // Too short, or not IPv4: all in one bucket, never a panic.
        assert_eq!(flow_key(&udp[..10]), [0u8; 13]);
        assert_eq!(flow_key(&[0x60; 40]), [0u8; 13]);
        // A header length pointing past the copied bytes: no ports, no panic.
        let mut long_header = udp.clone();
        long_header[0] = 0x4f;
        assert_eq!(flow_key(&long_header)[9..13], [0u8; 4]);
    }
}
