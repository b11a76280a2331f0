//! Public-port assignments: which (node, service) owns which relay TCP port, forever.
//!
//! [`PortTable`] is the sans-IO allocator (no sockets, no files), unit-tested below.
//! [`PortStore`] makes it durable: every change is written to `ports.json` in the data
//! directory atomically (temporary file, fsync, rename, fsync of the directory) *before*
//! the node is told its port, so a port once announced survives restarts and `kill -9`.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use ferry_proto::NodeId;
use serde::{Deserialize, Serialize};

/// File name of the assignment store inside the data directory.
pub const STORE_FILE: &str = "ports.json";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PortError {
    #[error(
        "this node already holds {max} public ports on this relay (the relay's max_public_ports_per_node); drop a --public service or ask the relay operator to raise the limit"
    )]
    NodeLimit { max: usize },
    #[error(
        "no free public port left in the relay's range {lo}-{hi}; the relay operator must widen --ports"
    )]
    RangeFull { lo: u16, hi: u16 },
}

/// The sans-IO allocator.
#[derive(Debug, Clone)]
pub struct PortTable {
    range: RangeInclusive<u16>,
    max_per_node: usize,
    by_owner: BTreeMap<(NodeId, String), u16>,
    by_port: BTreeMap<u16, (NodeId, String)>,
}

/// Result of [`PortTable::assign`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment {
    pub port: u16,
    /// True when the port was just allocated (the store must be saved before use).
    pub new: bool,
}

impl PortTable {
    pub fn new(range: RangeInclusive<u16>, max_per_node: usize) -> Self {
        PortTable {
            range,
            max_per_node,
            by_owner: BTreeMap::new(),
            by_port: BTreeMap::new(),
        }
    }

    /// Loads earlier assignments. Ones outside the current range (the operator
    /// narrowed it) or clashing with an earlier entry are dropped and returned so they
    /// can be logged.
    pub fn restore(&mut self, entries: Vec<StoredAssignment>) -> Vec<StoredAssignment> {
        let mut dropped = Vec::new();
        for e in entries {
            // A hand-edited or corrupt store may name a port twice, or give one
            // service two ports: the first entry wins, so each port has one owner and
            // each owner one port.
            let owner = (e.node_id, e.service.clone());
            if !self.range.contains(&e.port)
                || self.by_port.contains_key(&e.port)
                || self.by_owner.contains_key(&owner)
            {
                dropped.push(e);
                continue;
            }
            self.by_port.insert(e.port, owner.clone());
            self.by_owner.insert(owner, e.port);
        }
        dropped
    }

    pub fn lookup(&self, node: &NodeId, service: &str) -> Option<u16> {
        self.by_owner.get(&(*node, service.to_string())).copied()
    }

    pub fn ports_of(&self, node: &NodeId) -> usize {
        self.by_owner.keys().filter(|(n, _)| n == node).count()
    }

    /// Returns the port of (node, service), allocating the lowest free one not in
    /// `unusable` (ports found busy on this host) when it has none yet.
    pub fn assign(
        &mut self,
        node: NodeId,
        service: &str,
        unusable: &BTreeSet<u16>,
    ) -> Result<Assignment, PortError> {
        if let Some(port) = self.lookup(&node, service) {
            return Ok(Assignment { port, new: false });
        }
        if self.ports_of(&node) >= self.max_per_node {
            return Err(PortError::NodeLimit {
                max: self.max_per_node,
            });
        }
        let port = self
            .range
            .clone()
            .find(|p| !self.by_port.contains_key(p) && !unusable.contains(p))
            .ok_or(PortError::RangeFull {
                lo: *self.range.start(),
                hi: *self.range.end(),
            })?;
        self.by_port.insert(port, (node, service.to_string()));
        self.by_owner.insert((node, service.to_string()), port);
        Ok(Assignment { port, new: true })
    }

    /// Forgets an assignment (used when a fresh port turned out to be unbindable).
    pub fn release(&mut self, node: &NodeId, service: &str) {
        if let Some(port) = self.by_owner.remove(&(*node, service.to_string())) {
            self.by_port.remove(&port);
        }
    }

    /// The relay's answer to a node's `who_owns` question: the node and service
    /// holding `port` at `host`, or why the relay does not say. Only members of this
    /// relay's grid are told (`asker_is_member`: the relay runs `--policy grid` and
    /// admitted the asker with its certificate): a public port hides its node's
    /// identity, and with it the node's path record, from everyone else. The port
    /// need not be open now: the answer is the node that will hold it again.
    pub fn who_owns(
        &self,
        asker_is_member: bool,
        public_host: &str,
        host: &str,
        port: u16,
    ) -> Result<ferry_proto::frame::PortOwner, String> {
        if !asker_is_member {
            return Err(
                "this relay tells who holds a public port only to members of its grid (it must run --policy grid, and this node must `ferry-shim join` it)"
                    .into(),
            );
        }
        if !ferry_proto::net::same_host(host, public_host) {
            return Err(format!(
                "{host} is not this relay's public host ({public_host})"
            ));
        }
        let (node, service) = self
            .by_port
            .get(&port)
            .ok_or_else(|| format!("no node holds port {port} on this relay"))?;
        Ok(ferry_proto::frame::PortOwner {
            node: *node,
            service: service.clone(),
        })
    }

    pub fn entries(&self) -> Vec<StoredAssignment> {
        self.by_port
            .iter()
            .map(|(port, (node_id, service))| StoredAssignment {
                node_id: *node_id,
                service: service.clone(),
                port: *port,
            })
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredAssignment {
    pub node_id: NodeId,
    pub service: String,
    pub port: u16,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreFile {
    version: u32,
    assignments: Vec<StoredAssignment>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot {what} the public-port store {path}: {source}; check the data directory's permissions and free space"
    )]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the public-port store {path} is corrupt ({why}); restore it from a backup — deleting it would give every node new public ports"
    )]
    Corrupt { path: PathBuf, why: String },
}

/// Durable storage of a [`PortTable`].
#[derive(Debug)]
pub struct PortStore {
    path: PathBuf,
}

impl PortStore {
    pub fn new(data_dir: &Path) -> Self {
        PortStore {
            path: data_dir.join(STORE_FILE),
        }
    }

    pub fn load(&self) -> Result<Vec<StoredAssignment>, StoreError> {
        let text = match ferry_proto::config::read_text(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(StoreError::Io {
                    what: "read",
                    path: self.path.clone(),
                    source,
                });
            }
        };
        parse_store(&text).map_err(|why| StoreError::Corrupt {
            path: self.path.clone(),
            why,
        })
    }

    /// Replaces the store with `entries`, atomically and durably.
    pub fn save(&self, entries: Vec<StoredAssignment>) -> Result<(), StoreError> {
        let io = |what| {
            let path = self.path.clone();
            move |source| StoreError::Io { what, path, source }
        };
        let body = serde_json::to_vec_pretty(&StoreFile {
            version: 1,
            assignments: entries,
        })
        .map_err(|e| StoreError::Corrupt {
            path: self.path.clone(),
            why: e.to_string(),
        })?;
        ferry_proto::config::write_atomic(&self.path, &body).map_err(io("replace"))?;
        Ok(())
    }
}

/// Parses the store file's text.
pub fn parse_store(text: &str) -> Result<Vec<StoredAssignment>, String> {
    let file: StoreFile = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if file.version != 1 {
        return Err(format!("unknown version {}", file.version));
    }
    Ok(file.assignments)
}

/// Parses `LO-HI` (inclusive) as given to `--ports`.
pub fn parse_range(text: &str) -> Result<RangeInclusive<u16>, String> {
    let bad = || {
        format!(
            "invalid port range {text:?}: expected LO-HI with 1 <= LO <= HI <= 65535, e.g. 20000-20999"
        )
    };
    let (lo, hi) = text.split_once('-').ok_or_else(bad)?;
    let lo: u16 = lo.trim().parse().map_err(|_| bad())?;
    let hi: u16 = hi.trim().parse().map_err(|_| bad())?;
    if lo == 0 || lo > hi {
        return Err(bad());
    }
    Ok(lo..=hi)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::SecretKey;

    fn node() -> NodeId {
        SecretKey::generate().node_id()
    }

    #[test]
    fn only_grid_members_learn_who_holds_a_port_of_this_relay() {
        let mut t = PortTable::new(100..=105, 4);
        let a = node();
        t.assign(a, "storage", &BTreeSet::new()).unwrap();
        let owner = t
            .who_owns(true, "Relay.Example", "relay.example", 100)
            .unwrap();
        assert_eq!((owner.node, owner.service.as_str()), (a, "storage"));
        assert!(t.who_owns(true, "[::1]", "::1", 100).is_ok());
        let not_member = t.who_owns(false, "relay.example", "relay.example", 100);
        assert!(not_member.unwrap_err().contains("only to members"));
        let elsewhere = t.who_owns(true, "relay.example", "other.example", 100);
        assert!(
            elsewhere
                .unwrap_err()
                .contains("not this relay's public host")
        );
        let free = t.who_owns(true, "relay.example", "relay.example", 101);
        assert_eq!(free.unwrap_err(), "no node holds port 101 on this relay");
    }

    #[test]
    fn same_owner_always_gets_the_same_port() {
        let mut t = PortTable::new(100..=105, 4);
        let (a, b) = (node(), node());
        let none = BTreeSet::new();
        let pa = t.assign(a, "web", &none).unwrap();
        assert_eq!(
            pa,
            Assignment {
                port: 100,
                new: true
            }
        );
        let pb = t.assign(b, "web", &none).unwrap();
        assert_eq!(pb.port, 101);
        assert_eq!(
            t.assign(a, "web", &none).unwrap(),
            Assignment {
                port: 100,
                new: false
            }
        );
        assert_eq!(t.assign(a, "ssh", &none).unwrap().port, 102);
    }

    #[test]
    fn busy_ports_are_skipped_and_limits_hold() {
        let mut t = PortTable::new(100..=102, 2);
        let a = node();
        let busy = BTreeSet::from([100]);
        assert_eq!(t.assign(a, "one", &busy).unwrap().port, 101);
        assert_eq!(t.assign(a, "two", &busy).unwrap().port, 102);
        assert_eq!(
            t.assign(a, "three", &busy).unwrap_err(),
            PortError::NodeLimit { max: 2 }
        );
        let b = node();
        assert_eq!(
            t.assign(b, "x", &busy).unwrap_err(),
            PortError::RangeFull { lo: 100, hi: 102 }
        );
        t.release(&a, "one");
        assert_eq!(t.assign(b, "x", &busy).unwrap().port, 101);
    }

    #[test]
    fn restore_keeps_in_range_entries_and_reports_the_rest() {
        let (a, b) = (node(), node());
        let mut t = PortTable::new(100..=110, 8);
        let dropped = t.restore(vec![
            StoredAssignment {
                node_id: a,
                service: "web".into(),
                port: 105,
            },
            StoredAssignment {
                node_id: b,
                service: "web".into(),
                port: 200,
            },
        ]);
        assert_eq!(dropped.len(), 1);
        assert_eq!(t.lookup(&a, "web"), Some(105));
        assert_eq!(t.assign(b, "web", &BTreeSet::new()).unwrap().port, 100);
    }

    #[test]
    fn restore_keeps_the_first_of_clashing_entries() {
        let (a, b) = (node(), node());
        let entry = |node_id, port| StoredAssignment {
            node_id,
            service: "web".into(),
            port,
        };
        let mut t = PortTable::new(100..=110, 8);
        // The same port twice, and one service with two ports.
        let dropped = t.restore(vec![entry(a, 105), entry(b, 105), entry(a, 106)]);
        assert_eq!(dropped, vec![entry(b, 105), entry(a, 106)]);
        assert_eq!(t.entries(), vec![entry(a, 105)]);
        t.release(&a, "web");
        assert!(t.entries().is_empty(), "nothing is left behind");
    }

    #[test]
    fn store_round_trips_atomically_and_reports_corruption() {
        let dir = std::env::temp_dir().join(format!("ferry-ports-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = PortStore::new(&dir);
        assert!(store.load().unwrap().is_empty());
        let mut t = PortTable::new(100..=110, 8);
        let a = node();
        t.assign(a, "web", &BTreeSet::new()).unwrap();
        store.save(t.entries()).unwrap();
        assert_eq!(store.load().unwrap(), t.entries());
        assert!(!dir.join("ports.json.tmp").exists());
        std::fs::write(dir.join(STORE_FILE), "{not json").unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(err.contains("corrupt") && err.contains("backup"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ranges_parse_or_explain() {
        assert_eq!(parse_range("20000-20999").unwrap(), 20000..=20999);
        for bad in ["", "5", "0-10", "10-5", "a-b", "1-70000"] {
            assert!(parse_range(bad).unwrap_err().contains("LO-HI"));
        }
    }
}
