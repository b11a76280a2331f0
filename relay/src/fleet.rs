//! A fleet of relays that acts as one (#19), on NATS JetStream key-value buckets:
//! one policy (the access lists), one set of invites, and the fleet's relays, whose
//! keys are all grid admins so that a certificate from any of them is good at every
//! one. A relay without `--fleet` uses none of this: its policy file and
//! `invites.json` are the whole truth, as before.
//!
//! The engine is not trusted with anything it could forge: certificates and path
//! records are signed by relay and node keys, and every relay checks them. What the
//! engine's credentials do allow is editing the shared lists and invites, which is
//! what a grid admin can do (SECURITY.md).
//!
//! Buckets, named after the fleet (`--fleet-name`, default `ferry`):
//! - `NAME-policy`: one key per listed node, `node.<id>` (which of allow, deny,
//!   revoked it is on) and `admin.<id>`. An edit is one put of one node's key, so
//!   edits of different nodes at different relays never undo each other, with no
//!   read-modify-write of a shared value. Every relay watches the bucket and puts
//!   each change in force at once.
//! - `NAME-invites`: key the SHA-256 of the invite's secret (never the secret), the
//!   invite's expiry and number of uses; and one claim key per use granted,
//!   `<hash>.<n>`, made with create-if-absent. Each use is granted exactly once
//!   however many relays race for it. Not compare-and-set on a use counter: on
//!   Debian's nats-server 2.9, two concurrent updates expecting the same revision of
//!   a replicated bucket both succeeded in 112 of 200 tries here, while
//!   create-if-absent had one winner in 200 of 200.
//! - `NAME-relays`, key a relay's node ID: its URL. Entries expire unless refreshed,
//!   so a relay that is gone leaves the set.
//! - `NAME-presence`, key `<node>.<relay>` (empty value): the node has a session at
//!   that relay. Put when a node registers, deleted when its session ends; a relay
//!   that died without deleting its keys is left out of every answer once its entry in
//!   `NAME-relays` expires, and deletes them itself when it comes back. Every relay
//!   watches the bucket, so `locate` is answered from memory, never by waiting on the
//!   engine (`crate::whereabouts`).
//! - `NAME-records`, key a node's ID: its signed path record as it published it at one
//!   of the relays. Every relay watches the bucket and stores what it sees in its own
//!   rendezvous after checking the node's signature (`Rendezvous::adopt`), so a
//!   lookup or a punch at any relay finds a node that published at another.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::kv;
use bytes::Bytes;
use ferry_proto::{NodeId, RelayUrl};
pub use ferry_rendezvous::fleet::{
    Change, Engine, FleetError, FleetOps, FleetOptions, FleetRecords, RECONNECT_DELAY,
};
use futures::StreamExt;

use crate::policy::{Invite, InviteRefusal, Lists};

/// How long an invite's issue or redemption, or a policy edit, keeps trying through
/// an engine that does not answer (a stream leader killed stalls writes for about
/// 4 s while another is elected).
pub const REDEEM_PATIENCE: Duration = Duration::from_secs(12);
/// How often a relay renews its entry in the relays bucket and reads the others';
/// entries live [`RELAY_ENTRY_LIFETIME`], so a relay killed without a word leaves
/// every other relay's answers within that plus one refresh (the promise is 6 s).
pub const RELAY_REFRESH: Duration = Duration::from_secs(1);
/// How long a relay seen in the fleet stays a grid admin here after it was last seen
/// (its certificates stay good through a few missed renewals, and a relay gone for
/// good is forgotten).
pub const ADMIN_MEMORY: Duration = Duration::from_secs(600);
/// How long one round of announcing and reading the relays may take before it counts
/// as failed (one put and a few reads; a loaded engine is slow, not gone).
pub const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a relay's entry in the relays bucket lives without a refresh: three
/// missed refreshes are not yet a dead relay.
pub const RELAY_ENTRY_LIFETIME: Duration = Duration::from_secs(4);
/// An entry this much older than the reader's own fresh one is a relay that stopped
/// renewing (see [`Fleet::relays`]).
pub const RELAY_STALE_AFTER: Duration = Duration::from_secs(3);
/// Fleet writes (presence, records) waiting for the engine; beyond this they are
/// dropped and the relay rewrites its presence once the engine keeps up again.
pub const WRITE_QUEUE: usize = 65_536;

/// The operations a relay counts in `ferry_relay_fleet_operations_total`.
pub const OPERATIONS: &str = "connect, announce, read_relays, watch, issue_invite, redeem_invite, put_policy, write_presence, write_record";

/// What a redemption came to.
#[derive(Debug)]
pub enum Redeemed {
    Granted,
    Refused(InviteRefusal),
}

/// A relay's handle on its fleet.
pub struct Fleet {
    engine: Engine,
    policy: kv::Store,
    invites: kv::Store,
    relays: kv::Store,
    presence: kv::Store,
    /// Shared with the standalone rendezvous: the relay's embedded rendezvous reads
    /// and writes it the same way.
    pub records: FleetRecords,
}

/// A write to the fleet that nothing waits for: the session that caused it goes on
/// at once, and [`Fleet::carry_writes`] makes them in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetWrite {
    /// `node` has a session at this relay now.
    Present(NodeId),
    /// `node`'s session at this relay ended.
    Absent(NodeId),
    /// A path record `node` published here (its JSON).
    Record(NodeId, Bytes),
}

impl Fleet {
    /// Connects to the engine and opens (or creates) the fleet's buckets.
    pub async fn connect(opts: &FleetOptions, ops: FleetOps) -> Result<Fleet, FleetError> {
        let engine = Engine::connect(opts, "ferry-relay", ops).await?;
        Ok(Fleet {
            policy: engine.bucket("policy", Duration::ZERO).await?,
            invites: engine.bucket("invites", Duration::ZERO).await?,
            relays: engine.bucket("relays", RELAY_ENTRY_LIFETIME).await?,
            presence: engine.bucket("presence", Duration::ZERO).await?,
            records: FleetRecords::open(&engine).await?,
            engine,
        })
    }

    /// The link to the engine these buckets are on.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Whether the relay holds a connection to a server of the engine now.
    pub fn connected(&self) -> bool {
        self.engine.connected()
    }

    fn unreachable(&self, e: impl std::fmt::Display) -> FleetError {
        self.engine.unreachable(e)
    }

    /// Writes `lists` into the fleet when its policy bucket is empty (a relay's
    /// policy file becomes the fleet's when it is the first to join). Two relays
    /// seeding at once add up.
    pub async fn seed_if_empty(&self, lists: &Lists) -> Result<(), FleetError> {
        let mut keys = self.policy.keys().await.map_err(|e| self.unreachable(e))?;
        if keys.next().await.is_some() {
            return Ok(());
        }
        self.put_lists(lists).await.map(|_| ())
    }

    /// Writes where every node `lists` names stands, and its admins; the other keys
    /// of the bucket stay. Returns how many nodes and admins were written.
    pub async fn put_lists(&self, lists: &Lists) -> Result<(usize, usize), FleetError> {
        let nodes: BTreeSet<NodeId> = [&lists.allow, &lists.deny, &lists.revoked]
            .into_iter()
            .flatten()
            .copied()
            .collect();
        for node in &nodes {
            self.put_node(*node, lists).await?;
        }
        for admin in &lists.admins {
            self.policy
                .put(format!("admin.{admin}"), Bytes::from_static(b"true"))
                .await
                .map_err(|e| self.unreachable(e))?;
        }
        Ok((nodes.len(), lists.admins.len()))
    }

    /// Writes where `node` stands in `lists` (the lists after an edit of it).
    pub async fn put_node(&self, node: NodeId, lists: &Lists) -> Result<(), FleetError> {
        self.engine
            .ops()
            .time("put_policy", async {
                let placement = Placement {
                    allow: lists.allow.contains(&node),
                    deny: lists.deny.contains(&node),
                    revoked: lists.revoked.contains(&node),
                };
                let value = serde_json::to_vec(&placement).map_err(|e| FleetError::Corrupt {
                    what: "policy",
                    why: e.to_string(),
                })?;
                let (key, value) = (format!("node.{node}"), Bytes::from(value));
                let deadline = tokio::time::Instant::now() + REDEEM_PATIENCE;
                retry_until(deadline, || self.policy.put(&key, value.clone()))
                    .await
                    .map(|_| ())
                    .map_err(|e| self.unreachable(e))
            })
            .await
    }

    /// Every key of the policy bucket as it is, then every change. Until the watch
    /// is current the lists are incomplete, and a revoked node could slip through
    /// them.
    pub async fn watch_policy(
        &self,
    ) -> Result<impl futures::Stream<Item = Result<Change, FleetError>> + use<>, FleetError> {
        self.engine.watch(&self.policy).await
    }

    /// Every key of the presence bucket as it is, then every change.
    pub async fn watch_presence(
        &self,
    ) -> Result<impl futures::Stream<Item = Result<Change, FleetError>> + use<>, FleetError> {
        self.engine.watch(&self.presence).await
    }

    /// Records a new invite under the hash of its secret.
    pub async fn issue_invite(&self, secret_hash: &str, invite: &Invite) -> Result<(), FleetError> {
        self.engine
            .ops()
            .time("issue_invite", async {
                let value = serde_json::to_vec(invite).map_err(|e| FleetError::Corrupt {
                    what: "invite",
                    why: e.to_string(),
                })?;
                let value = Bytes::from(value);
                let deadline = tokio::time::Instant::now() + REDEEM_PATIENCE;
                loop {
                    match self.invites.create(secret_hash, value.clone()).await {
                        Ok(_) => return Ok(()),
                        // An earlier try whose answer was lost stored it after all.
                        Err(e) if is_conflict(&e.to_string()) => {
                            let stored = retry_until(deadline, || self.invites.get(secret_hash))
                                .await
                                .map_err(|e| self.unreachable(e))?;
                            return match stored {
                                Some(v) if v == value => Ok(()),
                                _ => Err(FleetError::Refused {
                                    what: "an invite",
                                    why: "its key is taken (a secret drawn twice?)".into(),
                                }),
                            };
                        }
                        Err(e) if tokio::time::Instant::now() < deadline => {
                            tracing::debug!("invite not stored yet ({e}); trying again");
                            tokio::time::sleep(RECONNECT_DELAY).await;
                        }
                        Err(e) => return Err(self.unreachable(e)),
                    }
                }
            })
            .await
    }

    /// Grants one use of the invite whose secret hashes to `secret_hash` to `node`,
    /// exactly once however many relays race for it: the first to create claim key
    /// `<hash>.<n>` has use `n`. The claim names the node, so a try whose answer was
    /// lost (a stream leader killed mid-write) is retried without spending a second
    /// use or losing the first: finding its own claim, the node has it.
    pub async fn redeem_invite(
        &self,
        secret_hash: &str,
        node: NodeId,
        now: SystemTime,
    ) -> Result<Redeemed, FleetError> {
        self.engine
            .ops()
            .time("redeem_invite", async {
                let deadline = tokio::time::Instant::now() + REDEEM_PATIENCE;
                let entry = retry_until(deadline, || self.invites.entry(secret_hash))
                    .await
                    .map_err(|e| self.unreachable(e))?;
                let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
                    return Ok(Redeemed::Refused(InviteRefusal::Unknown));
                };
                let invite: Invite =
                    serde_json::from_slice(&entry.value).map_err(|e| FleetError::Corrupt {
                        what: "invite",
                        why: e.to_string(),
                    })?;
                // The stored invite never changes: its `uses_left` is the number of uses.
                if let Err(refusal) = invite.spend(now) {
                    return Ok(Redeemed::Refused(refusal));
                }
                let claimant = Bytes::from(node.to_string());
                for n in 0..invite.uses_left {
                    let key = format!("{secret_hash}.{n}");
                    loop {
                        match self.invites.create(&key, claimant.clone()).await {
                            Ok(_) => return Ok(Redeemed::Granted),
                            Err(e) if is_conflict(&e.to_string()) => {
                                let holder = retry_until(deadline, || self.invites.get(&key))
                                    .await
                                    .map_err(|e| self.unreachable(e))?;
                                if holder.as_ref() == Some(&claimant) {
                                    return Ok(Redeemed::Granted);
                                }
                                break;
                            }
                            Err(e) if tokio::time::Instant::now() < deadline => {
                                tracing::debug!("claim {key} not answered ({e}); trying again");
                                tokio::time::sleep(RECONNECT_DELAY).await;
                            }
                            Err(e) => return Err(self.unreachable(e)),
                        }
                    }
                }
                Ok(Redeemed::Refused(InviteRefusal::UsedUp))
            })
            .await
    }

    /// Says this relay is in the fleet (renewed every [`RELAY_REFRESH`]).
    pub async fn announce(&self, id: NodeId, url: &RelayUrl) -> Result<(), FleetError> {
        self.engine
            .ops()
            .time("announce", async {
                self.relays
                    .put(id.to_string(), Bytes::from(url.to_string()))
                    .await
                    .map(|_| ())
                    .map_err(|e| self.unreachable(e))
            })
            .await
    }

    /// The fleet's live relays (this one, `own`, included) and their URLs. An entry
    /// that is not what a relay writes is skipped, and so is one written more than
    /// [`RELAY_STALE_AFTER`] before this relay's own latest (both stamped by the
    /// engine's clock, so no two hosts' clocks are compared): the engine drops
    /// expired entries only now and then, and a dead relay must leave the answers
    /// within seconds.
    pub async fn relays(&self, own: NodeId) -> Result<BTreeMap<NodeId, RelayUrl>, FleetError> {
        self.engine
            .ops()
            .time("read_relays", async {
                let mut keys = self.relays.keys().await.map_err(|e| self.unreachable(e))?;
                let mut names = Vec::new();
                while let Some(key) = keys.next().await {
                    names.push(key.map_err(|e| self.unreachable(e))?);
                }
                let mut entries = Vec::new();
                for key in names {
                    let Ok(id) = key.parse::<NodeId>() else {
                        continue;
                    };
                    let entry = self
                        .relays
                        .entry(&key)
                        .await
                        .map_err(|e| self.unreachable(e))?;
                    let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
                        // Expired between the listing and the read.
                        continue;
                    };
                    let url = std::str::from_utf8(&entry.value)
                        .ok()
                        .and_then(|v| v.parse::<RelayUrl>().ok());
                    if let Some(url) = url.filter(|url| url.relay_id == id) {
                        entries.push((id, url, entry.created));
                    }
                }
                let newest = entries
                    .iter()
                    .find(|(id, _, _)| *id == own)
                    .map(|(_, _, at)| *at);
                let stale_ms = RELAY_STALE_AFTER.as_millis() as i128;
                Ok(entries
                    .into_iter()
                    .filter(|(_, _, at)| {
                        newest.is_none_or(|newest| (newest - *at).whole_milliseconds() <= stale_ms)
                    })
                    .map(|(id, url, _)| (id, url))
                    .collect())
            })
            .await
    }

    /// Makes the queued writes, in order, as they come; returns when the queue's
    /// senders are gone. A write the engine does not take is logged (once per kind
    /// of failure) and counted by `failed`; the presence watch's reconciliation
    /// (`crate::whereabouts::Whereabouts::reconcile`) repairs what was lost.
    pub async fn carry_writes(
        &self,
        relay: NodeId,
        mut queue: tokio::sync::mpsc::Receiver<FleetWrite>,
        failed: impl Fn(&FleetError),
    ) {
        while let Some(write) = queue.recv().await {
            let started = std::time::Instant::now();
            let result = match &write {
                FleetWrite::Present(node) => self
                    .presence
                    .put(presence_key(node, &relay), Bytes::new())
                    .await
                    .map(|_| ())
                    .map_err(|e| self.unreachable(e)),
                FleetWrite::Absent(node) => self
                    .presence
                    .delete(presence_key(node, &relay))
                    .await
                    .map_err(|e| self.unreachable(e)),
                FleetWrite::Record(node, json) => {
                    self.records.put(&self.engine, *node, json.clone()).await
                }
            };
            let operation = match write {
                FleetWrite::Present(_) | FleetWrite::Absent(_) => "write_presence",
                FleetWrite::Record(..) => "write_record",
            };
            self.engine
                .ops()
                .observe(operation, result.is_ok(), started.elapsed());
            if let Err(e) = result {
                failed(&e);
            }
        }
    }
}

/// Calls `operation` until it succeeds or `deadline` passes, a short pause between
/// tries; the last error otherwise.
async fn retry_until<T, E, F, Fut>(deadline: tokio::time::Instant, mut operation: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    loop {
        match operation().await {
            Ok(value) => return Ok(value),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(RECONNECT_DELAY).await,
        }
    }
}

/// What `ferry-relay fleet-import` moved.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Imported {
    pub nodes: usize,
    pub admins: usize,
    pub invites: usize,
    /// Invites the fleet held already (an import run twice).
    pub already: usize,
}

/// `ferry-relay fleet-import`: puts the lists of the policy file at `policy_file`
/// and the outstanding invites of `invites_file` into the fleet. Each listed node's
/// key is written as the file places it; an invite is stored under its secret's
/// hash with the uses it has left (an expired or used-up one is skipped).
pub async fn import(
    opts: &FleetOptions,
    policy_file: &std::path::Path,
    invites_file: &std::path::Path,
) -> anyhow::Result<Imported> {
    let lists = crate::policy::load_lists(policy_file).map_err(anyhow::Error::msg)?;
    let invites = crate::policy::load_invites(invites_file).map_err(anyhow::Error::msg)?;
    let ops = FleetOps::new(&prometheus::Registry::new(), "ferry_relay", OPERATIONS)
        .map_err(|e| anyhow::anyhow!("metrics: {e}"))?;
    let fleet = Fleet::connect(opts, ops).await?;
    let (nodes, admins) = fleet.put_lists(&lists).await?;
    let mut imported = Imported {
        nodes,
        admins,
        ..Imported::default()
    };
    let now = SystemTime::now();
    for (secret_text, invite) in &invites.invites {
        if invite.spend(now).is_err() {
            continue;
        }
        match fleet.issue_invite(&invite_key(secret_text), invite).await {
            Ok(()) => imported.invites += 1,
            // Imported before (and perhaps redeemed since): the fleet's copy stands.
            Err(FleetError::Refused { .. }) => imported.already += 1,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(imported)
}

/// The presence bucket's key for `node` having a session at `relay`.
pub fn presence_key(node: &NodeId, relay: &NodeId) -> String {
    format!("{node}.{relay}")
}

/// The node and relay a presence key names; `None` for a key no relay writes.
pub fn parse_presence_key(key: &str) -> Option<(NodeId, NodeId)> {
    let (node, relay) = key.split_once('.')?;
    Some((node.parse().ok()?, relay.parse().ok()?))
}

/// Where one node stands in the fleet's lists (the value of `node.<id>`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Placement {
    allow: bool,
    deny: bool,
    revoked: bool,
}

/// The fleet's policy bucket as a relay last saw it, and the lists it makes.
/// Sans-IO: fed the watch's `(key, value)` updates.
#[derive(Debug, Default)]
pub struct FleetLists {
    entries: std::collections::BTreeMap<String, Bytes>,
}

impl FleetLists {
    /// One key's new value (`None`: deleted).
    pub fn update(&mut self, key: String, value: Option<Bytes>) {
        match value {
            Some(v) => {
                self.entries.insert(key, v);
            }
            None => {
                self.entries.remove(&key);
            }
        }
    }

    /// The lists the bucket says. A key that is not what a relay writes is skipped
    /// (and named in the log), never fatal.
    pub fn lists(&self) -> Lists {
        let mut lists = Lists::default();
        for (key, value) in &self.entries {
            if let Some(id) = key.strip_prefix("admin.") {
                match id.parse() {
                    Ok(node) if value.as_ref() == b"true" => {
                        lists.admins.insert(node);
                    }
                    Ok(_) => {}
                    Err(_) => tracing::warn!("fleet policy key {key:?} is not a node ID"),
                }
                continue;
            }
            let Some(id) = key.strip_prefix("node.") else {
                tracing::warn!("fleet policy key {key:?} is not one a relay writes");
                continue;
            };
            let (Ok(node), Ok(placement)) = (
                id.parse::<NodeId>(),
                serde_json::from_slice::<Placement>(value),
            ) else {
                tracing::warn!("fleet policy entry {key:?} is not what a relay writes");
                continue;
            };
            if placement.allow {
                lists.allow.insert(node);
            }
            if placement.deny {
                lists.deny.insert(node);
            }
            if placement.revoked {
                lists.revoked.insert(node);
            }
        }
        lists
    }
}

/// A compare-and-set that lost to another writer: JetStream's "wrong last sequence"
/// for an update, "already exists" for a create.
fn is_conflict(error: &str) -> bool {
    error.contains("wrong last sequence")
        || error.contains("10071")
        || error.contains("already exists")
}

/// The key an invite is stored under: the SHA-256 of its secret's text, hex.
pub fn invite_key(secret_text: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, secret_text.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::SecretKey;

    #[test]
    fn the_bucket_makes_the_lists_and_skips_what_a_relay_does_not_write() {
        let (a, b, c) = (
            SecretKey::generate().node_id(),
            SecretKey::generate().node_id(),
            SecretKey::generate().node_id(),
        );
        let mut fleet = FleetLists::default();
        let placement = |p: Placement| Some(Bytes::from(serde_json::to_vec(&p).unwrap()));
        fleet.update(
            format!("node.{a}"),
            placement(Placement {
                deny: true,
                revoked: true,
                ..Default::default()
            }),
        );
        fleet.update(
            format!("node.{b}"),
            placement(Placement {
                allow: true,
                ..Default::default()
            }),
        );
        fleet.update(format!("admin.{c}"), Some(Bytes::from_static(b"true")));
        fleet.update("node.nonsense".into(), Some(Bytes::from_static(b"{}")));
        fleet.update(format!("node.{c}"), Some(Bytes::from_static(b"garbage")));
        fleet.update("other".into(), Some(Bytes::from_static(b"x")));
        let lists = fleet.lists();
        assert!(lists.deny.contains(&a) && lists.revoked.contains(&a));
        assert!(lists.allow.contains(&b) && !lists.allow.contains(&a));
        assert_eq!(lists.admins, BTreeSet::from([c]));
        // A cleared node's key says nothing; a deleted key is gone.
        fleet.update(format!("node.{a}"), placement(Placement::default()));
        fleet.update(format!("node.{b}"), None);
        let lists = fleet.lists();
        assert!(lists.deny.is_empty() && lists.revoked.is_empty() && lists.allow.is_empty());
    }

    #[test]
    fn invites_are_stored_under_a_hash_of_the_secret() {
        let key = invite_key("secret-text");
        assert_eq!(key.len(), 64);
        assert!(!key.contains("secret"));
        assert_eq!(key, invite_key("secret-text"));
    }
}
