//! Stock Tahoe-LAFS clients on the overlay, with no change to Tahoe (issue #18): the
//! pieces that read a client's introducer cache and write its `private/servers.yaml`,
//! sans-IO (text in, text out), so every rule is unit-tested without a Tahoe node.
//!
//! Facts from Tahoe 1.20 this rests on: static servers in `private/servers.yaml`
//! override introducer announcements for the same server ID (`storage:` → `v0-…` →
//! `ann:`); a Foolscap FURL (`pb://TUBID@HINT,HINT/SWISSNUM`) is verified by its tub
//! ID, and an HTTPS-storage NURL (`pb://CERTHASH@HOST:PORT/SWISSNUM#v=1`) pins the
//! server certificate's hash, so pointing a hint at a local forward is as safe as the
//! original hint. The two syntaxes differ: a FURL hint is `tcp:127.0.0.1:PORT`, a
//! NURL's authority plain `127.0.0.1:PORT` (Tahoe silently drops a static server whose
//! NURL does not parse). Both clients race every hint they are given (Foolscap's
//! connector and `_pick_a_http_server` take whichever answers first), so an entry
//! Ferry writes names only the forward: a public-port hint beside it would win about
//! half the races and carry the shares through the relay. Tahoe ignores keys of a
//! server entry other than `ann` and `connections`; Ferry marks the entries it writes
//! with a `ferry` key and touches no other entry.
//!
//! YAML through `yaml_serde` (the YAML organisation's maintained serde_yaml): the
//! user's other entries survive as data, in order; comments in the file do not, which
//! is why the writer keeps a backup and shows a diff.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ferry_proto::NodeId;
use ferry_proto::frame::PortOwner;
use yaml_serde::{Mapping, Value};

/// The announcement key of a Foolscap storage FURL.
pub const FURL_KEY: &str = "anonymous-storage-FURL";
/// The announcement key of the HTTPS storage protocol's NURLs.
pub const NURLS_KEY: &str = "anonymous-storage-NURLs";
/// The key Ferry adds beside `ann` in the entries it manages.
pub const MARK_KEY: &str = "ferry";

/// Why a Tahoe file could not be used. Each names the file's role and what to do.
#[derive(Debug, thiserror::Error)]
pub enum TahoeError {
    #[error(
        "the introducer cache is not what Tahoe writes ({0}); let the client connect to its introducer once, or remove the file"
    )]
    BadCache(String),
    #[error(
        "private/servers.yaml cannot be read as YAML ({0}); fix it by hand (Ferry does not overwrite a file it cannot parse)"
    )]
    BadServersYaml(String),
    #[error(
        "private/servers.yaml has a `storage:` that is not a mapping of server IDs; fix it by hand (Ferry does not overwrite a file it cannot parse)"
    )]
    BadStorage,
    #[error("cannot write YAML: {0}")]
    Write(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{}: line {line} is neither a [section], a key = value nor a comment; fix it by hand (Ferry does not rewrite a file it cannot read)",
        path.display()
    )]
    BadConfig { path: PathBuf, line: usize },
    #[error(
        "{}: tub.port = {value:?} is not a TCP port Ferry can expose; set it to tcp:PORT:interface=127.0.0.1 (or remove it for {DEFAULT_TUB_PORT})",
        path.display()
    )]
    BadTubPort { path: PathBuf, value: String },
}

/// The storage port `tahoe serve` uses when `tub.port` is not set.
pub const DEFAULT_TUB_PORT: u16 = 3457;

/// The Foolscap/storage port of a `tub.port` value: `tcp:PORT[:interface=…]` or a
/// bare port; the first TCP endpoint of a list.
fn tub_port_of(value: &str) -> Option<u16> {
    value.split(',').find_map(|endpoint| {
        let endpoint = endpoint.trim();
        let rest = endpoint.strip_prefix("tcp:").unwrap_or(endpoint);
        rest.split(':').next()?.parse().ok().filter(|p| *p != 0)
    })
}

/// What `tahoe serve` makes of a storage node's `tahoe.cfg`: its storage port, and
/// the config with `tub.port` on loopback and, once the relay granted the public
/// address `public` (`HOST:PORT`), `tub.location = tcp:HOST:PORT` so the node
/// announces the relay's address.
pub fn serve_config(
    text: &str,
    path: &Path,
    public: Option<&str>,
) -> Result<(u16, String), TahoeError> {
    let port = match get_config(text, "node", "tub.port") {
        None => DEFAULT_TUB_PORT,
        Some(value) => tub_port_of(&value).ok_or_else(|| TahoeError::BadTubPort {
            path: path.to_path_buf(),
            value,
        })?,
    };
    let mut out = set_config(
        text,
        path,
        "node",
        "tub.port",
        &format!("tcp:{port}:interface=127.0.0.1"),
    )?;
    if let Some(public) = public {
        out = set_config(&out, path, "node", "tub.location", &format!("tcp:{public}"))?;
    }
    Ok((port, out))
}

/// What writing a Tahoe file did (or, with `--dry-run`, would do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The file already says this.
    Unchanged,
    /// Written (or would be): the diff, and where the old file was kept.
    Changed {
        diff: String,
        backup: Option<PathBuf>,
    },
}

/// Reads `path`, `None` if it does not exist.
fn read_optional(path: &Path) -> Result<Option<String>, TahoeError> {
    match ferry_proto::config::read_text(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TahoeError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Replaces `path` with `new` unless it already says that: the old file is copied to
/// `PATH.ferry-backup` first (when there was one and no backup exists yet), then the
/// new one is written atomically. With `dry_run` nothing is written; the answer is the same.
pub fn replace_file(path: &Path, new: &str, dry_run: bool) -> Result<Change, TahoeError> {
    let old = read_optional(path)?;
    if old.as_deref() == Some(new) {
        return Ok(Change::Unchanged);
    }
    let io = |source| TahoeError::Io {
        path: path.to_path_buf(),
        source,
    };
    let backup = old.as_ref().map(|_| {
        let mut name = path.as_os_str().to_owned();
        name.push(".ferry-backup");
        PathBuf::from(name)
    });
    if !dry_run {
        // The first backup is the user's own file; later ones would only be Ferry's
        // earlier versions of it, so the first is kept.
        if let (Some(old), Some(backup)) = (&old, &backup)
            && !backup.exists()
        {
            ferry_proto::config::write_atomic(backup, old.as_bytes()).map_err(io)?;
        }
        ferry_proto::config::write_atomic(path, new.as_bytes()).map_err(io)?;
    }
    Ok(Change::Changed {
        diff: diff(old.as_deref().unwrap_or(""), new),
        backup,
    })
}

/// Writes `NODEDIR/private/servers.yaml` for `carried` ([`write_servers_yaml`]),
/// keeping a backup of the old file and refusing one it cannot parse.
pub fn update_servers_yaml(
    node_dir: &Path,
    carried: &[Carried],
    dry_run: bool,
) -> Result<Change, TahoeError> {
    let path = node_dir.join("private").join("servers.yaml");
    let old = read_optional(&path)?;
    if old.is_none() && carried.is_empty() {
        // Nothing to carry and nothing to keep in step: no file to create.
        return Ok(Change::Unchanged);
    }
    let new = write_servers_yaml(old.as_deref(), carried)?;
    // The same data in other words (the user's layout, comments) is no change:
    // rewriting it would only lose the comments and ask for a restart of Tahoe.
    let same = |old: &str| {
        yaml_serde::from_str::<Value>(old).ok() == yaml_serde::from_str::<Value>(&new).ok()
    };
    if old.as_deref().is_some_and(same) {
        return Ok(Change::Unchanged);
    }
    replace_file(&path, &new, dry_run)
}

/// `tahoe.cfg` with `key = value` in `[section]`, every other line (comments
/// included) as it was: the key's line is replaced where it is, or added at the end
/// of the section, or a new section is added at the end. Hand-written because the INI
/// crates rewrite the whole file and drop the comments a Tahoe config is full of.
pub fn set_config(
    text: &str,
    path: &Path,
    section: &str,
    key: &str,
    value: &str,
) -> Result<String, TahoeError> {
    let line_of = format!("{key} = {value}");
    let mut out: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    let mut done = false;
    // Where the wanted section's last key line is, to add after it.
    let mut insert_at: Option<usize> = None;
    for (n, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if let Some(name) = trimmed.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
            current = Some(name.trim().to_string());
        } else if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
        } else if let Some((k, _)) = trimmed.split_once(['=', ':']) {
            if current.as_deref() == Some(section) {
                if k.trim() == key && !done {
                    out.push(line_of.clone());
                    done = true;
                    continue;
                }
                insert_at = Some(out.len() + 1);
            }
        } else if !line.starts_with([' ', '\t']) {
            // Continuation lines are indented; anything else is not INI.
            return Err(TahoeError::BadConfig {
                path: path.to_path_buf(),
                line: n + 1,
            });
        }
        if current.as_deref() == Some(section) && insert_at.is_none() && trimmed.starts_with('[') {
            insert_at = Some(out.len() + 1);
        }
        out.push(line.to_string());
    }
    if !done {
        match insert_at {
            Some(at) => out.insert(at, line_of),
            None => {
                if out.last().is_some_and(|l| !l.trim().is_empty()) {
                    out.push(String::new());
                }
                out.push(format!("[{section}]"));
                out.push(line_of);
            }
        }
    }
    let mut joined = out.join("\n");
    joined.push('\n');
    Ok(joined)
}

/// The value of `key` in `[section]` of `tahoe.cfg`, if set.
pub fn get_config(text: &str, section: &str, key: &str) -> Option<String> {
    let mut current: Option<&str> = None;
    for line in text.lines() {
        let trimmed = line.trim();
        if let Some(name) = trimmed.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
            current = Some(name.trim());
        } else if current == Some(section)
            && !trimmed.starts_with(['#', ';'])
            && let Some((k, v)) = trimmed.split_once(['=', ':'])
            && k.trim() == key
        {
            return Some(v.trim().to_string());
        }
    }
    None
}

/// One storage server as the introducer announced it.
#[derive(Debug, Clone, PartialEq)]
pub struct Announced {
    /// `v0-…`: the server's ID, the key of its `servers.yaml` entry.
    pub server_id: String,
    /// The announcement as Tahoe cached it.
    pub ann: Mapping,
}

impl Announced {
    /// The `host:port` addresses its FURL's TCP hints and its NURLs point at.
    pub fn addresses(&self) -> Vec<(String, u16)> {
        let mut out = Vec::new();
        if let Some(furl) = self.ann.get(FURL_KEY).and_then(Value::as_str) {
            out.extend(furl_hints(furl));
        }
        for nurl in self.nurls() {
            out.extend(nurl_authority(&nurl));
        }
        out.dedup();
        out
    }

    fn nurls(&self) -> Vec<String> {
        self.ann
            .get(NURLS_KEY)
            .and_then(Value::as_sequence)
            .map(|s| {
                s.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The announcement with the forward at `local` as the FURL's only hint and every
    /// NURL's authority (see the module comment for why no other hint stays).
    pub fn through_forward(&self, local: SocketAddr) -> Mapping {
        let mut ann = self.ann.clone();
        if let Some(furl) = ann.get(FURL_KEY).and_then(Value::as_str)
            && let Some(rewritten) = furl_through(furl, local)
        {
            ann.insert(FURL_KEY.into(), rewritten.into());
        }
        let nurls = self.nurls();
        if !nurls.is_empty() {
            let mut all: Vec<Value> = nurls
                .iter()
                .filter_map(|n| nurl_through(n, local))
                .map(Value::from)
                .collect();
            all.dedup();
            ann.insert(NURLS_KEY.into(), Value::Sequence(all));
        }
        ann
    }
}

/// Reads a client's introducer cache (`private/introducer_default_cache.yaml`): a list
/// of `{ann, key_s}`. Entries without a storage FURL or NURL are not storage servers
/// and are left out.
pub fn parse_introducer_cache(text: &str) -> Result<Vec<Announced>, TahoeError> {
    let value: Value =
        yaml_serde::from_str(text).map_err(|e| TahoeError::BadCache(e.to_string()))?;
    let list = match value {
        Value::Null => return Ok(Vec::new()),
        Value::Sequence(list) => list,
        _ => return Err(TahoeError::BadCache("not a list".into())),
    };
    let mut out = Vec::new();
    for entry in list {
        let server_id = entry
            .get("key_s")
            .and_then(Value::as_str)
            .ok_or_else(|| TahoeError::BadCache("an entry without key_s".into()))?;
        let ann = entry
            .get("ann")
            .and_then(Value::as_mapping)
            .ok_or_else(|| TahoeError::BadCache("an entry without ann".into()))?;
        if ann.contains_key(FURL_KEY) || ann.contains_key(NURLS_KEY) {
            out.push(Announced {
                server_id: server_id.to_string(),
                ann: ann.clone(),
            });
        }
    }
    Ok(out)
}

/// Splits `pb://ID@LOCATION/REST` into its three parts.
fn split_pb(url: &str) -> Option<(&str, &str, &str)> {
    let rest = url.strip_prefix("pb://")?;
    let (id, rest) = rest.split_once('@')?;
    let (location, tail) = rest.split_once('/')?;
    Some((id, location, tail))
}

/// `host:port` (IPv6 in brackets) as a pair.
fn host_port(text: &str) -> Option<(String, u16)> {
    let (host, port) = text.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((host.to_string(), port.parse().ok()?))
}

/// The TCP hints of a FURL: `tcp:HOST:PORT` and the legacy bare `HOST:PORT`.
pub fn furl_hints(furl: &str) -> Vec<(String, u16)> {
    let Some((_, location, _)) = split_pb(furl) else {
        return Vec::new();
    };
    location
        .split(',')
        .filter_map(|hint| {
            // Other hint types (`tor:`, `i2p:`) are not addresses Ferry can carry.
            if hint.starts_with("tor:") || hint.starts_with("i2p:") {
                return None;
            }
            host_port(hint.strip_prefix("tcp:").unwrap_or(hint))
        })
        .collect()
}

/// The `HOST:PORT` a NURL points at.
pub fn nurl_authority(nurl: &str) -> Option<(String, u16)> {
    let (_, location, _) = split_pb(nurl)?;
    host_port(location)
}

/// The FURL with `tcp:LOCAL` as its only hint; `None` if it does not parse.
pub fn furl_through(furl: &str, local: SocketAddr) -> Option<String> {
    let (id, _, tail) = split_pb(furl)?;
    Some(format!(
        "pb://{id}@tcp:{}/{tail}",
        ferry_proto::net::host_port(&local.ip().to_string(), local.port())
    ))
}

/// The NURL with `LOCAL` as its authority; `None` if it does not parse.
pub fn nurl_through(nurl: &str, local: SocketAddr) -> Option<String> {
    let (id, _, tail) = split_pb(nurl)?;
    Some(format!(
        "pb://{id}@{}/{tail}",
        ferry_proto::net::host_port(&local.ip().to_string(), local.port())
    ))
}

/// One storage server Ferry carries: where it is on the overlay and the local
/// forward that reaches it.
#[derive(Debug, Clone, PartialEq)]
pub struct Carried {
    pub announced: Announced,
    pub node: NodeId,
    pub service: String,
    pub forward: SocketAddr,
}

/// `servers.yaml` with an entry for each server in `carried` (replacing the entries
/// Ferry wrote before, and removing those of servers it no longer carries), every
/// other entry and key as it was. `existing` is the file's text, `None` if there is
/// none.
pub fn write_servers_yaml(
    existing: Option<&str>,
    carried: &[Carried],
) -> Result<String, TahoeError> {
    let mut root = match existing {
        None => Mapping::new(),
        Some(text) => match yaml_serde::from_str::<Value>(text)
            .map_err(|e| TahoeError::BadServersYaml(e.to_string()))?
        {
            Value::Null => Mapping::new(),
            Value::Mapping(m) => m,
            _ => return Err(TahoeError::BadServersYaml("not a mapping".into())),
        },
    };
    let mut storage = match root.remove("storage") {
        None | Some(Value::Null) => Mapping::new(),
        Some(Value::Mapping(m)) => m,
        Some(_) => return Err(TahoeError::BadStorage),
    };
    storage.retain(|_, entry| entry.get(MARK_KEY).is_none());
    for c in carried {
        let mut mark = Mapping::new();
        mark.insert("node".into(), c.node.to_string().into());
        mark.insert("service".into(), c.service.clone().into());
        mark.insert("forward".into(), c.forward.to_string().into());
        let mut entry = Mapping::new();
        entry.insert(
            "ann".into(),
            Value::Mapping(c.announced.through_forward(c.forward)),
        );
        entry.insert(MARK_KEY.into(), Value::Mapping(mark));
        storage.insert(c.announced.server_id.clone().into(), Value::Mapping(entry));
    }
    root.insert("storage".into(), Value::Mapping(storage));
    yaml_serde::to_string(&Value::Mapping(root)).map_err(|e| TahoeError::Write(e.to_string()))
}

/// What Ferry noted in one of its `servers.yaml` entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FerryEntry {
    pub owner: PortOwner,
    pub forward: SocketAddr,
}

/// The entries Ferry wrote in `servers.yaml` (server ID → what it noted), so that a
/// restarted shim carries the same servers through the same forwards until the
/// relays say otherwise, and the file, and Tahoe, need not change. A file that does
/// not parse has none.
pub fn ferry_entries(servers_yaml: &str) -> BTreeMap<String, FerryEntry> {
    let Ok(root) = yaml_serde::from_str::<Value>(servers_yaml) else {
        return BTreeMap::new();
    };
    let Some(storage) = root.get("storage").and_then(Value::as_mapping) else {
        return BTreeMap::new();
    };
    storage
        .iter()
        .filter_map(|(id, entry)| {
            let mark = entry.get(MARK_KEY)?;
            let text = |key: &str| mark.get(key).and_then(Value::as_str);
            let entry = FerryEntry {
                owner: PortOwner {
                    node: text("node")?.parse().ok()?,
                    service: text("service")?.to_string(),
                },
                forward: text("forward")?.parse().ok()?,
            };
            Some((id.as_str()?.to_string(), entry))
        })
        .collect()
}

/// The introducer caches of a client node: `private/introducer_default_cache.yaml`
/// for `introducer.furl` in tahoe.cfg, `private/introducer_NAME_cache.yaml` for each
/// introducer of `private/introducers.yaml`.
pub fn introducer_caches(node_dir: &Path) -> Vec<PathBuf> {
    let private = node_dir.join("private");
    let mut caches: Vec<PathBuf> = std::fs::read_dir(&private)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("introducer_") && n.ends_with("_cache.yaml"))
        })
        .collect();
    caches.sort();
    caches
}

/// How long the answer "no node of this relay holds it" stands before the address is
/// asked about again (a server may start using Ferry; a relay may come back).
pub const ASK_AGAIN_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// What a client knows of the addresses its introducer announced: which are a grid
/// member's public port, and which are not, for now. Sans-IO: the driver asks the
/// relays what [`OwnerBook::to_ask`] lists and reports each definite answer with
/// [`OwnerBook::learned`] (a relay that did not answer teaches nothing). Servers
/// Ferry carried before a restart stay carried, by what servers.yaml noted, until a
/// relay says their address is not a member's port.
#[derive(Debug)]
pub struct OwnerBook {
    me: NodeId,
    owners: BTreeMap<(String, u16), PortOwner>,
    not_ferry: BTreeMap<(String, u16), (String, std::time::Instant)>,
    remembered: BTreeMap<String, PortOwner>,
}

impl OwnerBook {
    /// A book that remembers the owners of the servers Ferry carried before
    /// (server ID → owner, from [`ferry_entries`]).
    pub fn new(me: NodeId, remembered: BTreeMap<String, PortOwner>) -> Self {
        OwnerBook {
            me,
            owners: BTreeMap::new(),
            not_ferry: BTreeMap::new(),
            remembered,
        }
    }

    /// Addresses of `announced` servers to ask the relays about now: not known yet,
    /// or refused more than [`ASK_AGAIN_AFTER`] ago.
    pub fn to_ask(&self, announced: &[Announced], now: std::time::Instant) -> Vec<(String, u16)> {
        let mut out: Vec<(String, u16)> = announced
            .iter()
            .flat_map(Announced::addresses)
            .filter(|addr| !self.owners.contains_key(addr))
            .filter(|addr| {
                self.not_ferry
                    .get(addr)
                    .is_none_or(|(_, at)| now.saturating_duration_since(*at) >= ASK_AGAIN_AFTER)
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// A relay's definite answer about `addr`: its owner, or why it has none.
    pub fn learned(
        &mut self,
        addr: (String, u16),
        answer: Result<PortOwner, String>,
        now: std::time::Instant,
    ) {
        match answer {
            Ok(owner) => {
                self.not_ferry.remove(&addr);
                self.owners.insert(addr, owner);
            }
            Err(why) => {
                self.owners.remove(&addr);
                self.not_ferry.insert(addr, (why, now));
            }
        }
    }

    /// Why `addr` is not carried, if a relay said.
    pub fn why_not(&self, addr: &(String, u16)) -> Option<&str> {
        self.not_ferry.get(addr).map(|(why, _)| why.as_str())
    }

    /// Forgets what concerns servers and addresses no longer announced.
    pub fn keep_only(&mut self, announced: &[Announced]) {
        let addresses: std::collections::BTreeSet<(String, u16)> =
            announced.iter().flat_map(Announced::addresses).collect();
        self.owners.retain(|a, _| addresses.contains(a));
        self.not_ferry.retain(|a, _| addresses.contains(a));
        self.remembered
            .retain(|id, _| announced.iter().any(|a| a.server_id == *id));
    }

    /// The announced servers that are another node's service behind a relay's public
    /// port, each with that node and service: by a relay's answer, else by what
    /// servers.yaml noted while no relay has said otherwise. This node's own storage
    /// server is left to Tahoe, which knows to use it directly.
    pub fn carried<'a>(&self, announced: &'a [Announced]) -> Vec<(&'a Announced, PortOwner)> {
        announced
            .iter()
            .filter_map(|a| {
                let addresses = a.addresses();
                let owner = addresses
                    .iter()
                    .find_map(|addr| self.owners.get(addr))
                    .or_else(|| {
                        let refused = addresses
                            .iter()
                            .any(|addr| self.not_ferry.contains_key(addr));
                        (!refused)
                            .then(|| self.remembered.get(&a.server_id))
                            .flatten()
                    })?;
                (owner.node != self.me).then(|| (a, owner.clone()))
            })
            .collect()
    }
}

/// A line diff of `old` and `new` for `--dry-run` and the log: `-` lines removed,
/// `+` lines added, in order (good enough for a file of a few dozen lines).
pub fn diff(old: &str, new: &str) -> String {
    let old: Vec<&str> = old.lines().collect();
    let new: Vec<&str> = new.lines().collect();
    // Longest common subsequence, then walk it: quadratic, and servers.yaml is small.
    let mut lcs = vec![vec![0usize; new.len() + 1]; old.len() + 1];
    for i in (0..old.len()).rev() {
        for j in (0..new.len()).rev() {
            lcs[i][j] = if old[i] == new[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, String::new());
    while i < old.len() || j < new.len() {
        if i < old.len() && j < new.len() && old[i] == new[j] {
            i += 1;
            j += 1;
        } else if i < old.len() && (j == new.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out.push_str(&format!("-{}\n", old[i]));
            i += 1;
        } else {
            out.push_str(&format!("+{}\n", new[j]));
            j += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const FURL: &str = "pb://wa6x2zm7kbvbqsyvn6djtaouwoqgsizf@tcp:relay.example.org:20000/y3ke2mrxwqqsutmcpw2y2yr2beknigd4";
    const NURL: &str = "pb://kvp7ovtqakqujzyxeebymvgqogbbpvrbrdvbupnk5bqndkgzahvq@relay.example.org:20000/y3ke2mrxwqqsutmcpw2y2yr2beknigd4#v=1";

    fn cache() -> String {
        format!(
            "- ann:\n    anonymous-storage-FURL: {FURL}\n    anonymous-storage-NURLs:\n    - {NURL}\n    nickname: storage\n    permutation-seed-base32: abc\n  key_s: v0-server1\n- ann:\n    nickname: not-a-storage-server\n  key_s: v0-other\n"
        )
    }

    fn carried(local: &str) -> Carried {
        Carried {
            announced: parse_introducer_cache(&cache()).unwrap().remove(0),
            node: ferry_proto::SecretKey::from_seed([7; 32]).node_id(),
            service: "storage".into(),
            forward: local.parse().unwrap(),
        }
    }

    #[test]
    fn the_cache_gives_storage_servers_and_where_they_point() {
        let servers = parse_introducer_cache(&cache()).unwrap();
        assert_eq!(servers.len(), 1);
        assert_eq!(servers[0].server_id, "v0-server1");
        assert_eq!(
            servers[0].addresses(),
            vec![("relay.example.org".to_string(), 20000)]
        );
        assert!(parse_introducer_cache("").unwrap().is_empty());
        let e = parse_introducer_cache("ann: {}").unwrap_err();
        assert!(e.to_string().contains("introducer cache"), "{e}");
    }

    /// The two hint syntaxes: a FURL hint with `tcp:`, a NURL authority without.
    #[test]
    fn hints_point_only_at_the_forward() {
        let local: SocketAddr = "127.0.0.1:41000".parse().unwrap();
        assert_eq!(
            furl_through(FURL, local).unwrap(),
            "pb://wa6x2zm7kbvbqsyvn6djtaouwoqgsizf@tcp:127.0.0.1:41000/y3ke2mrxwqqsutmcpw2y2yr2beknigd4"
        );
        assert_eq!(
            nurl_through(NURL, local).unwrap(),
            "pb://kvp7ovtqakqujzyxeebymvgqogbbpvrbrdvbupnk5bqndkgzahvq@127.0.0.1:41000/y3ke2mrxwqqsutmcpw2y2yr2beknigd4#v=1"
        );
        // Twice is the same as once.
        let again = furl_through(&furl_through(FURL, local).unwrap(), local).unwrap();
        assert_eq!(again, furl_through(FURL, local).unwrap());
        assert_eq!(furl_through("not a furl", local), None);
        let ann = carried("127.0.0.1:41000").announced.through_forward(local);
        let nurls = ann.get(NURLS_KEY).unwrap().as_sequence().unwrap();
        assert_eq!(nurls.len(), 1);
        assert!(nurls[0].as_str().unwrap().contains("@127.0.0.1:41000/"));
        assert_eq!(ann.get("nickname").unwrap().as_str(), Some("storage"));
    }

    #[test]
    fn the_book_asks_once_carries_members_and_asks_a_refusal_again_later() {
        let me = NodeId::from_bytes([1; 32]);
        let other = NodeId::from_bytes([2; 32]);
        let mut book = OwnerBook::new(me, BTreeMap::new());
        let t = std::time::Instant::now();
        let servers = parse_introducer_cache(&cache()).unwrap();
        let addr = ("relay.example.org".to_string(), 20000);
        assert_eq!(book.to_ask(&servers, t), vec![addr.clone()]);
        assert!(book.carried(&servers).is_empty());
        book.learned(addr.clone(), Err("not a member".into()), t);
        assert!(
            book.to_ask(&servers, t + Duration::from_secs(59))
                .is_empty()
        );
        assert_eq!(book.why_not(&addr), Some("not a member"));
        assert_eq!(
            book.to_ask(&servers, t + ASK_AGAIN_AFTER),
            vec![addr.clone()]
        );
        let owner = PortOwner {
            node: other,
            service: "storage".into(),
        };
        book.learned(addr.clone(), Ok(owner.clone()), t);
        assert!(book.to_ask(&servers, t + ASK_AGAIN_AFTER * 10).is_empty());
        let carried = book.carried(&servers);
        assert_eq!(carried.len(), 1);
        assert_eq!(
            (carried[0].0.server_id.as_str(), &carried[0].1),
            ("v0-server1", &owner)
        );
        // This node's own storage server is not carried.
        let mut mine = OwnerBook::new(other, BTreeMap::new());
        mine.learned(addr.clone(), Ok(owner.clone()), t);
        assert!(mine.carried(&servers).is_empty());
        // A server carried before a restart stays carried, by what servers.yaml
        // noted, until a relay says its address is no member's port.
        let noted = BTreeMap::from([("v0-server1".to_string(), owner.clone())]);
        let mut restarted = OwnerBook::new(me, noted);
        assert_eq!(restarted.carried(&servers).len(), 1);
        restarted.learned(addr.clone(), Err("no node holds port 20000".into()), t);
        assert!(restarted.carried(&servers).is_empty());
        // Servers no longer announced are forgotten.
        book.keep_only(&[]);
        assert!(book.carried(&servers).is_empty());
        assert_eq!(book.to_ask(&servers, t), vec![addr]);
    }

    #[test]
    fn the_entries_ferry_wrote_are_read_back() {
        let text = write_servers_yaml(
            Some("storage:\n  v0-mine:\n    ann: {nickname: mine}\n"),
            &[carried("127.0.0.1:41000")],
        )
        .unwrap();
        let entries = ferry_entries(&text);
        assert_eq!(entries.len(), 1);
        let entry = &entries["v0-server1"];
        assert_eq!(entry.forward, "127.0.0.1:41000".parse().unwrap());
        assert_eq!(entry.owner.node, carried("127.0.0.1:1").node);
        assert_eq!(entry.owner.service, "storage");
        assert!(ferry_entries("storage: [").is_empty());
    }

    #[test]
    fn servers_yaml_keeps_the_users_entries_and_replaces_only_ferrys() {
        let users = "storage:\n  v0-mine:\n    ann:\n      nickname: my own server\n      anonymous-storage-FURL: pb://x@tcp:10.0.0.5:3457/y\n    connections:\n      tcp: tor\nextra: kept\n";
        let first = write_servers_yaml(Some(users), &[carried("127.0.0.1:41000")]).unwrap();
        let parsed: Value = yaml_serde::from_str(&first).unwrap();
        let storage = parsed.get("storage").unwrap();
        // The user's server and top-level key, as they were.
        let original: Value = yaml_serde::from_str(users).unwrap();
        assert_eq!(
            storage.get("v0-mine"),
            original.get("storage").unwrap().get("v0-mine")
        );
        assert_eq!(parsed.get("extra").unwrap().as_str(), Some("kept"));
        // Ferry's, marked, with the forward as its only hint.
        let ours = storage.get("v0-server1").unwrap();
        assert!(ours.get(MARK_KEY).is_some());
        let furl = ours
            .get("ann")
            .unwrap()
            .get(FURL_KEY)
            .unwrap()
            .as_str()
            .unwrap();
        assert!(furl.contains("@tcp:127.0.0.1:41000/"), "{furl}");
        // Written again with a new forward: replaced, not added; with none: removed.
        let second = write_servers_yaml(Some(&first), &[carried("127.0.0.1:42000")]).unwrap();
        assert!(
            !second.contains("41000") && second.contains("42000"),
            "{second}"
        );
        let third = write_servers_yaml(Some(&second), &[]).unwrap();
        assert!(
            !third.contains("v0-server1") && third.contains("v0-mine"),
            "{third}"
        );
        // The same input gives the same file, so an unchanged set rewrites nothing.
        assert_eq!(
            write_servers_yaml(Some(&first), &[carried("127.0.0.1:41000")]).unwrap(),
            first
        );
    }

    #[test]
    fn a_servers_yaml_that_does_not_parse_is_refused_not_overwritten() {
        for bad in ["storage: [1, 2", "- a list\n", "storage: just text\n"] {
            let e = write_servers_yaml(Some(bad), &[carried("127.0.0.1:41000")]).unwrap_err();
            assert!(e.to_string().contains("fix it by hand"), "{bad:?}: {e}");
        }
        // No file, or an empty one, is a fresh start.
        assert!(write_servers_yaml(None, &[]).unwrap().contains("storage"));
        assert!(
            write_servers_yaml(Some(""), &[])
                .unwrap()
                .contains("storage")
        );
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ferry-tahoe-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("private")).unwrap();
        dir
    }

    #[test]
    fn servers_yaml_is_written_with_a_backup_and_a_dry_run_writes_nothing() {
        let node = temp_dir("servers");
        let path = node.join("private/servers.yaml");
        // Nothing to carry and no file: none is created.
        assert_eq!(
            update_servers_yaml(&node, &[], false).unwrap(),
            Change::Unchanged
        );
        assert!(!path.exists());
        let users = "storage:\n  v0-mine:\n    ann: {nickname: mine}\n";
        std::fs::write(&path, users).unwrap();
        let carried = [carried("127.0.0.1:41000")];
        let Change::Changed { diff, backup } = update_servers_yaml(&node, &carried, true).unwrap()
        else {
            panic!("no change shown");
        };
        assert!(diff.contains("+  v0-server1:"), "{diff}");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            users,
            "a dry run wrote"
        );
        let backup = backup.unwrap();
        assert!(!backup.exists());
        update_servers_yaml(&node, &carried, false).unwrap();
        assert_eq!(std::fs::read_to_string(&backup).unwrap(), users);
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .contains("v0-server1")
        );
        assert_eq!(
            update_servers_yaml(&node, &carried, false).unwrap(),
            Change::Unchanged
        );
        // A later change keeps the first backup, the user's own file.
        let moved = [super::tests::carried("127.0.0.1:42000")];
        update_servers_yaml(&node, &moved, false).unwrap();
        assert_eq!(std::fs::read_to_string(&backup).unwrap(), users);
        // The user's file with nothing to carry: the same data, so left as written,
        // comments and all.
        let commented = "# my servers\nstorage:\n  v0-mine:\n    ann: {nickname: mine}\n";
        std::fs::write(&path, commented).unwrap();
        assert_eq!(
            update_servers_yaml(&node, &[], false).unwrap(),
            Change::Unchanged
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), commented);
        // A file it cannot parse stays as it is.
        std::fs::write(&path, "storage: [broken").unwrap();
        assert!(update_servers_yaml(&node, &carried, false).is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "storage: [broken");
        let _ = std::fs::remove_dir_all(&node);
    }

    #[test]
    fn tahoe_cfg_edits_keep_every_other_line() {
        let cfg = "# my grid\n[node]\nnickname = alice\n# where clients connect\ntub.location = AUTO\n\n[storage]\nenabled = true\n";
        let path = Path::new("tahoe.cfg");
        let set = set_config(
            cfg,
            path,
            "node",
            "tub.location",
            "tcp:relay.example.org:20000",
        )
        .unwrap();
        assert_eq!(
            set,
            "# my grid\n[node]\nnickname = alice\n# where clients connect\ntub.location = tcp:relay.example.org:20000\n\n[storage]\nenabled = true\n"
        );
        assert_eq!(
            get_config(&set, "node", "tub.location").as_deref(),
            Some("tcp:relay.example.org:20000")
        );
        // A key the section lacks goes after its last key; a missing section at the end.
        let added = set_config(
            cfg,
            path,
            "node",
            "tub.port",
            "tcp:3457:interface=127.0.0.1",
        )
        .unwrap();
        assert!(
            added.contains("tub.location = AUTO\ntub.port = tcp:3457:interface=127.0.0.1\n"),
            "{added}"
        );
        let client = set_config(cfg, path, "client", "force_foolscap", "true").unwrap();
        assert!(
            client.ends_with("enabled = true\n\n[client]\nforce_foolscap = true\n"),
            "{client}"
        );
        assert_eq!(get_config(cfg, "storage", "tub.location"), None);
        let e = set_config("[node]\nthis is not ini\n", path, "node", "a", "b").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
    }

    #[test]
    fn a_storage_node_is_set_to_listen_on_loopback_and_announce_the_relay() {
        let path = Path::new("tahoe.cfg");
        let cfg = "[node]\ntub.port = tcp:3457\ntub.location = AUTO\n[storage]\nenabled = true\n";
        let (port, out) = serve_config(cfg, path, None).unwrap();
        assert_eq!(port, 3457);
        assert!(
            out.contains("tub.port = tcp:3457:interface=127.0.0.1\n"),
            "{out}"
        );
        assert!(out.contains("tub.location = AUTO"), "{out}");
        let (_, out) = serve_config(cfg, path, Some("relay.example.org:20000")).unwrap();
        assert!(
            out.contains("tub.location = tcp:relay.example.org:20000\n"),
            "{out}"
        );
        // Already right: nothing changes.
        assert_eq!(
            serve_config(&out, path, Some("relay.example.org:20000"))
                .unwrap()
                .1,
            out
        );
        // No tub.port: the default; a port Ferry cannot expose: refused, naming the fix.
        assert_eq!(
            serve_config("[node]\n", path, None).unwrap().0,
            DEFAULT_TUB_PORT
        );
        let e = serve_config("[node]\ntub.port = disabled\n", path, None).unwrap_err();
        assert!(e.to_string().contains("interface=127.0.0.1"), "{e}");
    }

    #[test]
    fn the_diff_shows_what_changed() {
        let d = diff("a\nb\nc\n", "a\nB\nc\nd\n");
        assert_eq!(d, "-b\n+B\n+d\n");
        assert_eq!(diff("same\n", "same\n"), "");
    }
}
