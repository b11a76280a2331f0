//! The relay's access control at run time: the policy in force and the invites, their
//! files, reloading when the policy file changes (polled every second) or on SIGHUP,
//! applying a changed policy to live sessions, and redeeming invites for membership
//! certificates. The decisions themselves are in [`crate::policy`].

use std::path::PathBuf;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, SystemTime};

use ferry_proto::grid::{Certificate, INVITE_SECRET_LEN, InviteCode, Membership};
use ferry_proto::{NodeId, RelayUrl, SecretKey};
use rand::Rng;

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
            }),
            invites: Mutex::new(invites),
            seen: Mutex::new(file_stamp(&policy_path)),
            policy_path,
            invites_path,
            membership_lifetime,
        })
    }

    pub fn mode(&self) -> Mode {
        read(&self.policy).mode
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

    /// Issues an invite; returns the code a friend passes to `ferry-shim join`.
    pub fn invite(
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
        let mut invites = lock(&self.invites);
        invites.issue(&secret, lifetime, uses, SystemTime::now())?;
        policy::save_invites(&self.invites_path, &invites)?;
        Ok(InviteCode {
            relay: relay.clone(),
            secret,
        })
    }

    /// Redeems an invite for `node`: a certificate signed by this relay's key.
    pub fn join(
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
        {
            let mut invites = lock(&self.invites);
            if let Err(e) = invites.redeem(secret, now) {
                count(match e {
                    InviteRefusal::Unknown => "unknown",
                    InviteRefusal::Expired => "expired",
                    InviteRefusal::UsedUp => "used_up",
                    InviteRefusal::NotGrid(_) => "not_grid",
                });
                return Err(e);
            }
            if let Err(e) = policy::save_invites(&self.invites_path, &invites) {
                // The redemption stands in memory; a restart would allow it again,
                // which is the lesser evil than refusing a valid invite.
                tracing::error!("{e}");
            }
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
