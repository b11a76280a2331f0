//! The relay's access control at run time: the policy in force and the invites, their
//! files, reloading when the policy file changes (polled every second) or on SIGHUP,
//! applying a changed policy to live sessions, and redeeming invites for membership
//! certificates. The decisions themselves are in [`crate::policy`].

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use ferry_proto::grid::{Certificate, INVITE_SECRET_LEN, InviteCode, Membership};
use ferry_proto::{NodeId, RelayUrl, SecretKey};
use rand::Rng;

use crate::fleet::{Fleet, Redeemed};
use crate::metrics::Metrics;
use crate::policy::{self, InviteRefusal, Invites, Lists, Mode, Policy, Refusal};
use ferry_proto::sync::{lock, read, write};

/// How often the policy file is checked for changes; bounds how long a revocation
/// takes to reach live sessions (the issue's promise is 5 s).
pub const POLICY_POLL: Duration = Duration::from_secs(1);

/// Access-control state of a running relay.
pub struct Access {
    key: SecretKey,
    policy: RwLock<Policy>,
    invites: Mutex<Invites>,
    pub policy_path: PathBuf,
    invites_path: PathBuf,
    membership_lifetime: Duration,
    /// (modified time, length) of the policy file as last loaded.
    seen: Mutex<Option<(SystemTime, u64)>>,
    /// This relay is part of a fleet (`--fleet`): the lists and invites live in the
    /// engine, and the policy file only keeps the last known lists for a start
    /// without it.
    fleet_configured: bool,
    /// The fleet's engine, once reached.
    fleet: OnceLock<Arc<Fleet>>,
    /// The engine answered the last time this relay asked (every second).
    engine_up: std::sync::atomic::AtomicBool,
    /// Denies and revocations made here while the engine was unreachable: in force
    /// here at once (failing closed), written to the fleet when it is back.
    held: Mutex<Vec<(NodeId, policy::ListEdit)>>,
}

fn fleet_unreachable() -> String {
    "this relay cannot reach its fleet's engine (NATS) right now, and the fleet's policy and invites live there; try again in a minute (see /api/info)".to_string()
}

fn file_stamp(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

impl Access {
    /// Loads the policy file and invites. A broken file at startup is an error (the
    /// relay must not start with a policy other than the one configured).
    pub fn load(
        key: &SecretKey,
        mode: Mode,
        policy_path: PathBuf,
        data_dir: &std::path::Path,
        membership_lifetime: Duration,
        fleet_configured: bool,
    ) -> anyhow::Result<Access> {
        let lists = policy::load_lists(&policy_path).map_err(|e| {
            anyhow::anyhow!("{e}; fix the policy file (or point --policy-file elsewhere)")
        })?;
        let invites_path = policy::invites_path(data_dir);
        let invites = policy::load_invites(&invites_path).map_err(anyhow::Error::msg)?;
        Ok(Access {
            key: key.clone(),
            policy: RwLock::new(Policy {
                mode,
                relay: key.node_id(),
                lists,
                fleet: BTreeSet::new(),
            }),
            invites: Mutex::new(invites),
            seen: Mutex::new(file_stamp(&policy_path)),
            policy_path,
            invites_path,
            membership_lifetime,
            fleet_configured,
            fleet: OnceLock::new(),
            engine_up: std::sync::atomic::AtomicBool::new(false),
            held: Mutex::new(Vec::new()),
        })
    }

    /// The fleet's engine, once this relay has reached it.
    pub fn fleet(&self) -> Option<&Arc<Fleet>> {
        self.fleet.get()
    }

    /// The fleet's engine if it answered the last time it was asked: what must not
    /// wait out a timeout when the engine is away (invites, joins, edits).
    fn reachable_fleet(&self) -> Option<&Arc<Fleet>> {
        self.fleet()
            .filter(|_| self.engine_up.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Whether the engine answered just now (`server.rs` asks every second).
    pub fn set_engine_up(&self, up: bool) {
        self.engine_up
            .store(up, std::sync::atomic::Ordering::Relaxed);
    }

    /// The fleet's lists with the denies and revocations held here on top (until
    /// they are written, the fleet's lists do not have them yet).
    pub fn with_held(&self, mut lists: Lists) -> Lists {
        for (node, edit) in lock(&self.held).iter() {
            edit.apply(&mut lists, *node);
        }
        lists
    }

    /// Writes the edits held during an outage to the fleet, oldest first; each one
    /// written is forgotten here. Returns how many were written.
    pub async fn flush_held(&self, fleet: &Fleet) -> Result<usize, crate::fleet::FleetError> {
        let held: Vec<(NodeId, policy::ListEdit)> = lock(&self.held).clone();
        for (i, (node, _)) in held.iter().enumerate() {
            // Where the node stands here, held edits included, is what goes out.
            let lists = self.lists();
            if let Err(e) = fleet.put_node(*node, &lists).await {
                lock(&self.held).drain(..i);
                return Err(e);
            }
        }
        lock(&self.held).drain(..held.len());
        Ok(held.len())
    }

    /// True when this relay is part of a fleet (`--fleet`), reached or not.
    pub fn in_fleet(&self) -> bool {
        self.fleet_configured
    }

    /// The engine was reached: edits and invites go through it from now on.
    pub fn reached_fleet(&self, fleet: Arc<Fleet>) {
        let _ = self.fleet.set(fleet);
        self.set_engine_up(true);
    }

    /// Puts the fleet's lists in force and keeps them in the policy file, for a
    /// start without the engine. True when they changed.
    pub fn set_lists(&self, lists: Lists) -> bool {
        {
            let mut p = write(&self.policy);
            if p.lists == lists {
                return false;
            }
            p.lists = lists.clone();
        }
        match policy::save_lists(&self.policy_path, &lists) {
            Ok(()) => *lock(&self.seen) = file_stamp(&self.policy_path),
            Err(e) => tracing::warn!("cannot keep the fleet's policy on disk: {e}"),
        }
        true
    }

    /// The fleet's other relays, whose certificates are good here. True when the set
    /// changed.
    pub fn set_fleet_relays(&self, mut relays: BTreeSet<NodeId>) -> bool {
        let mut p = write(&self.policy);
        relays.remove(&p.relay);
        if p.fleet == relays {
            return false;
        }
        p.fleet = relays;
        true
    }

    /// Changes the lists where they live: in the fleet's engine (then here), or in
    /// this relay's policy file. A fleet relay that cannot reach its engine refuses
    /// an allow or a clear rather than let a node in that the fleet keeps out; a deny
    /// or a revocation it puts in force here at once and writes to the fleet when the
    /// engine is back (failing closed, nothing lost).
    pub async fn edit_everywhere(
        &self,
        node: NodeId,
        edit: policy::ListEdit,
    ) -> Result<(), String> {
        if !self.fleet_configured {
            return self.edit(|lists| edit.apply(lists, node));
        }
        let tightens = matches!(edit, policy::ListEdit::Deny | policy::ListEdit::Revoke);
        let mut lists = self.lists();
        edit.apply(&mut lists, node);
        let written = match self.reachable_fleet() {
            Some(fleet) => fleet
                .put_node(node, &lists)
                .await
                .map_err(|e| e.to_string()),
            None => Err(fleet_unreachable()),
        };
        match written {
            Ok(()) => {}
            Err(_) if tightens => {
                tracing::warn!(
                    "the fleet's engine is unreachable: {} of {node} is in force here and goes to the fleet when the engine is back",
                    edit.name()
                );
                lock(&self.held).push((node, edit));
            }
            Err(e) => return Err(e),
        }
        self.set_lists(lists);
        Ok(())
    }

    pub fn mode(&self) -> Mode {
        read(&self.policy).mode
    }

    /// The fleet's other relays this relay knows (their certificates are good here).
    pub fn fleet_relays(&self) -> BTreeSet<NodeId> {
        read(&self.policy).fleet.clone()
    }

    pub fn lists(&self) -> Lists {
        read(&self.policy).lists.clone()
    }

    /// Decides for `node`, counting a refusal by reason.
    pub fn admit(
        &self,
        node: &NodeId,
        cert: Option<&Certificate>,
        metrics: &Metrics,
    ) -> Result<(), Refusal> {
        let result = read(&self.policy).admit(node, cert, SystemTime::now());
        if let Err(refusal) = &result {
            metrics
                .refusals
                .with_label_values(&[refusal.reason()])
                .inc();
        }
        result
    }

    /// What the relay tells its nodes of the grid (`Control::Grid`).
    pub fn grid_view(&self) -> ferry_proto::grid::GridView {
        read(&self.policy).grid_view()
    }

    /// Re-reads the policy file if it changed (or if `force`). Returns true when a new
    /// policy is in force; a file that does not parse keeps the old one.
    pub fn reload(&self, force: bool) -> bool {
        if self.fleet_configured {
            // The file only keeps the fleet's lists; edits go to the engine.
            if force {
                tracing::warn!(
                    "{} is this fleet relay's copy of the fleet's policy; change the policy with the admin API or the panel",
                    self.policy_path.display()
                );
            }
            return false;
        }
        let stamp = file_stamp(&self.policy_path);
        {
            let mut seen = lock(&self.seen);
            if !force && *seen == stamp {
                return false;
            }
            *seen = stamp;
        }
        match policy::load_lists(&self.policy_path) {
            Ok(lists) => {
                let mut p = write(&self.policy);
                if p.lists == lists {
                    return false;
                }
                p.lists = lists;
                tracing::info!("policy file {} reloaded", self.policy_path.display());
                true
            }
            Err(e) => {
                tracing::error!("keeping the old policy: {e}");
                false
            }
        }
    }

    /// Changes the lists (panel and API), saves the file, and puts it in force.
    pub fn edit(&self, change: impl FnOnce(&mut Lists)) -> Result<(), String> {
        let mut lists = self.lists();
        change(&mut lists);
        policy::save_lists(&self.policy_path, &lists)?;
        *lock(&self.seen) = file_stamp(&self.policy_path);
        write(&self.policy).lists = lists;
        Ok(())
    }

    /// Issues an invite; returns the code a friend passes to `ferry-shim join`. In a
    /// fleet it is stored in the engine (under its secret's hash), so any of the
    /// fleet's relays redeems it.
    pub async fn invite(
        &self,
        relay: &RelayUrl,
        lifetime: Duration,
        uses: u32,
    ) -> Result<InviteCode, String> {
        if self.mode() != Mode::Grid {
            return Err(format!(
                "this relay's policy is {}; invites admit grid members, so run it with --policy grid",
                self.mode()
            ));
        }
        let secret: [u8; INVITE_SECRET_LEN] = rand::thread_rng().r#gen();
        if self.fleet_configured {
            let fleet = self.reachable_fleet().ok_or_else(fleet_unreachable)?;
            let invite = policy::Invite {
                expires: policy::unix(SystemTime::now()) + lifetime.as_secs(),
                uses_left: uses.max(1),
            };
            let key = crate::fleet::invite_key(&InviteCode::secret_text_of(&secret));
            fleet
                .issue_invite(&key, &invite)
                .await
                .map_err(|e| e.to_string())?;
        } else {
            let mut invites = lock(&self.invites);
            invites.issue(&secret, lifetime, uses, SystemTime::now())?;
            policy::save_invites(&self.invites_path, &invites)?;
        }
        Ok(InviteCode {
            relay: relay.clone(),
            secret,
        })
    }

    /// Redeems an invite for `node`: a certificate signed by this relay's key.
    pub async fn join(
        &self,
        node: NodeId,
        secret: &str,
        metrics: &Metrics,
    ) -> Result<Certificate, InviteRefusal> {
        let count = |outcome: &str| metrics.joins.with_label_values(&[outcome]).inc();
        if self.mode() != Mode::Grid {
            count("not_grid");
            return Err(InviteRefusal::NotGrid(self.mode()));
        }
        let now = SystemTime::now();
        let redeemed = if self.fleet_configured {
            match self.reachable_fleet() {
                None => Err(InviteRefusal::Unavailable),
                Some(fleet) => match fleet
                    .redeem_invite(&crate::fleet::invite_key(secret), node, now)
                    .await
                {
                    Ok(Redeemed::Granted) => Ok(()),
                    Ok(Redeemed::Refused(refusal)) => Err(refusal),
                    Err(e) => {
                        tracing::warn!("invite not checked: {e}");
                        Err(InviteRefusal::Unavailable)
                    }
                },
            }
        } else {
            let mut invites = lock(&self.invites);
            let redeemed = invites.redeem(secret, now);
            if redeemed.is_ok()
                && let Err(e) = policy::save_invites(&self.invites_path, &invites)
            {
                // The redemption stands in memory; a restart would allow it again,
                // which is the lesser evil than refusing a valid invite.
                tracing::error!("{e}");
            }
            redeemed
        };
        if let Err(e) = redeemed {
            count(match e {
                InviteRefusal::Unknown => "unknown",
                InviteRefusal::Expired => "expired",
                InviteRefusal::UsedUp => "used_up",
                InviteRefusal::NotGrid(_) => "not_grid",
                InviteRefusal::Unavailable => "unavailable",
            });
            return Err(e);
        }
        let issued = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let cert = Membership {
            member: node,
            issuer: self.key.node_id(),
            issued,
            expires: issued + self.membership_lifetime.as_secs(),
            serial: rand::thread_rng().r#gen(),
        }
        .sign(&self.key);
        count("joined");
        tracing::info!("node {node} joined the grid with an invite");
        Ok(cert)
    }
}
