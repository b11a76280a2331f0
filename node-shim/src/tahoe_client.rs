//! Keeps a stock Tahoe-LAFS client on the overlay (`ferry-shim tahoe client`, and the
//! client side of `tahoe serve`): reads the node's introducer caches, asks the relays
//! which announced servers are grid members' public ports (`crate::owners`), keeps a
//! local forward to each such member's service, and writes `private/servers.yaml`
//! entries that point Tahoe at those forwards (`crate::tahoe` decides every byte of
//! the file). Tahoe reads servers.yaml only when it starts, so each change says so.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_proto::frame::PortOwner;
use tokio::net::TcpListener;

use crate::options::ForwardConfig;
use crate::owners::AskError;
use crate::shim::{ForwardHandle, start_forward};
use crate::state::Core;
use crate::tahoe::{self, Announced, Carried, Change, OwnerBook};

/// How often the introducer caches are read again.
pub const POLL: Duration = Duration::from_secs(5);

/// How long a dry run waits for a relay that answers `who_owns`.
const DRY_RUN_WAIT: Duration = Duration::from_secs(20);

/// One server carried: its owner on the overlay and the forward Tahoe is pointed at.
struct Running {
    owner: PortOwner,
    forward: ForwardHandle,
}

/// The client side of one Tahoe node directory.
pub struct TahoeClient {
    core: Arc<Core>,
    node_dir: PathBuf,
    dry_run: bool,
    book: OwnerBook,
    running: BTreeMap<String, Running>,
    /// The last problem reported, so that a lasting one is logged once.
    last_problem: Option<String>,
    /// Problems met in this round.
    problems: usize,
}

impl TahoeClient {
    pub fn new(core: Arc<Core>, node_dir: PathBuf, dry_run: bool) -> Self {
        let me = core.node_id;
        let remembered = written(&node_dir)
            .into_iter()
            .map(|(id, entry)| (id, entry.owner))
            .collect();
        TahoeClient {
            core,
            node_dir,
            dry_run,
            book: OwnerBook::new(me, remembered),
            running: BTreeMap::new(),
            last_problem: None,
            problems: 0,
        }
    }

    /// Keeps servers.yaml in sync until the shim stops. A dry run prints what the
    /// first round would write and returns.
    pub async fn run(mut self) -> anyhow::Result<()> {
        if self.dry_run {
            let waited = Instant::now();
            while !self.core.owners.any() {
                if waited.elapsed() > DRY_RUN_WAIT {
                    anyhow::bail!(
                        "no relay that knows this node as a grid member answered within {} s; check `ferry-shim status` (was this node joined with `ferry-shim join`?)",
                        DRY_RUN_WAIT.as_secs()
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            return self.round().await.map(|_| ());
        }
        loop {
            // Without a relay to ask, nothing new can be learned, and what is known
            // stays: a relay that is down for a moment must not unwrite servers.yaml.
            if self.core.owners.any() {
                self.problems = 0;
                if let Err(e) = self.round().await {
                    self.problem(format!("{e:#}"));
                }
                if self.problems == 0 {
                    self.last_problem = None;
                }
            }
            tokio::select! {
                () = tokio::time::sleep(POLL) => {}
                () = self.core.shutdown.cancelled() => return Ok(()),
            }
        }
    }

    fn problem(&mut self, text: String) {
        self.problems += 1;
        if self.last_problem.as_ref() != Some(&text) {
            tracing::warn!("tahoe client {}: {text}", self.node_dir.display());
            self.last_problem = Some(text);
        }
    }

    /// Every storage server the node's introducers announced; `None` when a cache is
    /// missing or unreadable, for then the servers it names are unknown, not gone.
    fn announced(&mut self) -> Option<Vec<Announced>> {
        let caches = tahoe::introducer_caches(&self.node_dir);
        if caches.is_empty() {
            self.problem(format!(
                "no introducer cache in {} yet; start the Tahoe node so that it hears from its introducer",
                self.node_dir.join("private").display()
            ));
            return None;
        }
        let mut all: BTreeMap<String, Announced> = BTreeMap::new();
        for cache in caches {
            let parsed = ferry_proto::config::read_text(&cache)
                .map_err(|e| e.to_string())
                .and_then(|text| tahoe::parse_introducer_cache(&text).map_err(|e| e.to_string()));
            match parsed {
                Ok(servers) => {
                    for server in servers {
                        all.insert(server.server_id.clone(), server);
                    }
                }
                Err(e) => {
                    self.problem(format!("{}: {e}", cache.display()));
                    return None;
                }
            }
        }
        Some(all.into_values().collect())
    }

    /// One pass: learn owners, start and stop forwards, rewrite servers.yaml.
    async fn round(&mut self) -> anyhow::Result<Change> {
        let Some(announced) = self.announced() else {
            return Ok(Change::Unchanged);
        };
        self.book.keep_only(&announced);
        for addr in self.book.to_ask(&announced, Instant::now()) {
            let answer = match self.core.owners.ask(&addr.0, addr.1).await {
                Ok(owner) => {
                    tracing::info!(
                        "{}:{} is node {}'s service {}",
                        addr.0,
                        addr.1,
                        owner.node,
                        owner.service
                    );
                    Ok(owner)
                }
                Err(AskError::Refused(why)) => {
                    tracing::debug!("{}:{} is not carried: {why}", addr.0, addr.1);
                    Err(why)
                }
                // Nothing certain learned: asked again next round.
                Err(e) => {
                    tracing::debug!("{}:{}: {e}", addr.0, addr.1);
                    continue;
                }
            };
            self.book.learned(addr, answer, Instant::now());
        }
        let wanted = self.book.carried(&announced);
        self.running.retain(|id, r| {
            wanted
                .iter()
                .any(|(a, o)| a.server_id == *id && *o == r.owner)
        });
        // Read only when a forward starts, where it is wanted: its earlier port.
        let mut written: Option<BTreeMap<String, tahoe::FerryEntry>> = None;
        let mut carried = Vec::new();
        for (announced, owner) in wanted {
            if !self.running.contains_key(&announced.server_id) {
                let earlier = written
                    .get_or_insert_with(|| self::written(&self.node_dir))
                    .get(&announced.server_id)
                    .map(|e| e.forward);
                let listener = bind_forward(earlier).await?;
                let forward = start_forward(
                    &self.core,
                    ForwardConfig {
                        node: owner.node,
                        service: Some(owner.service.clone()),
                        listen: listener.local_addr()?,
                    },
                    listener,
                )?;
                tracing::info!(
                    "Tahoe storage server {} ({}) is carried over the overlay to node {}'s service {} through {}",
                    announced.server_id,
                    nickname(announced),
                    owner.node,
                    owner.service,
                    forward.listen()
                );
                self.running.insert(
                    announced.server_id.clone(),
                    Running {
                        owner: owner.clone(),
                        forward,
                    },
                );
            }
            let forward = self.running[&announced.server_id].forward.listen();
            carried.push(Carried {
                announced: announced.clone(),
                node: owner.node,
                service: owner.service,
                forward,
            });
        }
        let change = tahoe::update_servers_yaml(&self.node_dir, &carried, self.dry_run)?;
        if let Change::Changed { diff, backup } = &change {
            let path = self.node_dir.join("private").join("servers.yaml");
            print!("{diff}");
            if self.dry_run {
                println!("(dry run: {} not changed)", path.display());
            } else {
                let kept = backup
                    .as_ref()
                    .map(|b| format!(" (the old one is {})", b.display()))
                    .unwrap_or_default();
                let done = format!(
                    "changed {}{kept}: {} server(s) carried over the overlay; restart the Tahoe node (stop `tahoe run {}` and start it again) so that it reads the file",
                    path.display(),
                    carried.len(),
                    self.node_dir.display()
                );
                // Printed for the person who ran it, logged for a service's journal.
                println!("{done}");
                tracing::info!("{done}");
            }
        }
        Ok(change)
    }
}

/// The entries Ferry wrote into the node's servers.yaml before (a previous run).
fn written(node_dir: &std::path::Path) -> BTreeMap<String, tahoe::FerryEntry> {
    let path = node_dir.join("private").join("servers.yaml");
    ferry_proto::config::read_text(&path)
        .map(|text| tahoe::ferry_entries(&text))
        .unwrap_or_default()
}

/// A loopback listener for a forward: where an earlier run had it when that port is
/// free (so servers.yaml, and Tahoe, need not change), else any free port.
async fn bind_forward(earlier: Option<SocketAddr>) -> anyhow::Result<TcpListener> {
    if let Some(addr) = earlier.filter(|a| a.ip().is_loopback())
        && let Ok(listener) = TcpListener::bind(addr).await
    {
        return Ok(listener);
    }
    Ok(TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?)
}

fn nickname(announced: &Announced) -> &str {
    announced
        .ann
        .get("nickname")
        .and_then(|v| v.as_str())
        .unwrap_or("no nickname")
}
