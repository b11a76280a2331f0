//! Telling the nodes of the last run that the relay restarted.
//!
//! Nodes keep their relay links quiet for many seconds (a keepalive well inside NAT
//! timeouts, not one every few seconds: at 100,000 nodes every beat is a packet the
//! relay must answer). A link to a relay process that died does not know it is dead
//! until the node sends something and the new process answers with a stateless
//! reset. So the relay remembers where its nodes' QUIC links come from (the file
//! [`LAST_NODES_FILE`] in its data directory, rewritten at most once a second while
//! sessions come and go), and a relay that starts sends each of those addresses a
//! restart notice (`ferry_proto::channel::restart_notice`) from its QUIC socket —
//! the address their NAT mappings lead back to — a few times. A node that gets one
//! pings the relay at once and is back within a round trip or two.
//!
//! Links over TLS/TCP need none of this: the kernel resets their TCP connections
//! when the process dies.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::channel_socket::ChannelSocket;
use crate::state::State;

/// The file in the data directory with the QUIC addresses of the nodes connected now,
/// one `IP:PORT` per line.
pub const LAST_NODES_FILE: &str = "last-nodes";

/// Shortest time between two rewrites of the file.
const SAVE_GAP: Duration = Duration::from_secs(1);

/// Notices sent to each address, a second apart: a lost one is made up by the next.
const NOTICE_ROUNDS: u32 = 3;
const ROUND_GAP: Duration = Duration::from_secs(1);

/// Notices sent between two yields, so telling 100,000 nodes does not hold a worker.
const SENDS_PER_YIELD: usize = 256;

pub fn last_nodes_path(data_dir: &Path) -> PathBuf {
    data_dir.join(LAST_NODES_FILE)
}

/// The addresses the last run's nodes' links came from, at most `limit` of them; none
/// when there is no file. Lines that are not addresses are skipped (the file is the
/// relay's own, but a hand-edited or truncated one must not stop a start).
pub fn last_nodes(path: &Path, limit: usize) -> Vec<SocketAddr> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            tracing::warn!(
                "cannot read {} (the last run's nodes, to tell them of the restart): {e}",
                path.display()
            );
            return Vec::new();
        }
    };
    text.lines()
        .filter_map(|line| line.trim().parse().ok())
        .take(limit)
        .collect()
}

/// Keeps [`LAST_NODES_FILE`] current while the relay runs: rewritten after sessions
/// change, at most once per [`SAVE_GAP`].
pub async fn keep_last_nodes(state: Arc<State>) {
    let path = last_nodes_path(&state.opts.data_dir);
    let mut warned = false;
    loop {
        state.nodes_changed.notified().await;
        let text = quic_addrs(&state)
            .iter()
            .map(|addr| format!("{addr}\n"))
            .collect::<String>();
        match ferry_proto::config::write_atomic(&path, text.as_bytes()) {
            Ok(()) => warned = false,
            Err(e) if !warned => {
                warned = true;
                tracing::warn!(
                    "cannot write {}: after a restart, nodes will take until their next keepalive to come back: {e}",
                    path.display()
                );
            }
            Err(_) => {}
        }
        tokio::time::sleep(SAVE_GAP).await;
    }
}

/// Where the QUIC links of the sessions open now come from, as the relay's socket
/// sees them (the address a notice must go to).
fn quic_addrs(state: &State) -> Vec<SocketAddr> {
    let mut addrs: Vec<SocketAddr> = state
        .registry
        .snapshot()
        .iter()
        .filter_map(|(_, session)| {
            let channel = session.channel.as_ref()?;
            Some(*ferry_proto::sync::lock(&channel.addr))
        })
        .collect();
    addrs.sort_unstable();
    addrs.dedup();
    addrs
}

/// Sends the restart notice to each of `nodes`, [`NOTICE_ROUNDS`] times.
pub async fn tell_last_nodes(
    socket: Arc<ChannelSocket>,
    relay: ferry_proto::NodeId,
    nodes: Vec<SocketAddr>,
) {
    if nodes.is_empty() {
        return;
    }
    let notice = ferry_proto::channel::restart_notice(&relay);
    for round in 0..NOTICE_ROUNDS {
        if round > 0 {
            tokio::time::sleep(ROUND_GAP).await;
        }
        let mut failed = 0usize;
        for (i, addr) in nodes.iter().enumerate() {
            if socket.send_to(&notice, *addr).await.is_err() {
                failed += 1;
            }
            if i % SENDS_PER_YIELD == SENDS_PER_YIELD - 1 {
                tokio::task::yield_now().await;
            }
        }
        if round == 0 {
            tracing::info!(
                "told {} node address(es) of the last run that this relay restarted{}",
                nodes.len() - failed,
                if failed > 0 {
                    format!(" ({failed} could not be sent to)")
                } else {
                    String::new()
                }
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_nodes_file_is_read_as_far_as_it_makes_sense() {
        let dir = std::env::temp_dir().join(format!("ferry-last-nodes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = last_nodes_path(&dir);
        assert!(last_nodes(&path, 10).is_empty(), "no file: nobody to tell");
        std::fs::write(
            &path,
            "192.0.2.1:4000\nnot an address\n[2001:db8::1]:5000\n\n198.51.100.9:1\n",
        )
        .expect("write");
        let addrs = last_nodes(&path, 10);
        assert_eq!(
            addrs,
            vec![
                "192.0.2.1:4000".parse::<SocketAddr>().expect("address"),
                "[2001:db8::1]:5000".parse().expect("address"),
                "198.51.100.9:1".parse().expect("address"),
            ]
        );
        assert_eq!(
            last_nodes(&path, 2).len(),
            2,
            "at most the relay's node limit"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
