//! Who may use this relay: the access policy and the invites that let new members in.
//!
//! Sans-IO decisions: [`Policy::admit`] takes a node ID, the certificate it presented
//! and the time, and says yes or exactly why not; [`Invites`] issues and redeems
//! invite secrets. The async side (loading, saving, reloading on change, applying a
//! new policy to live sessions) lives in `server.rs`.
//!
//! Modes (`--policy`): `open` admits every node; `allowlist` admits the listed node
//! IDs; `grid` admits nodes holding an unexpired membership certificate signed by one
//! of the grid's admin keys (this relay's own key first, then `admins`), and the
//! listed node IDs. In every mode the `deny` and `revoked` lists win, so an operator
//! can always shut a node out. The lists live in the policy file (TOML, default
//! `<data-dir>/policy.toml`), which the relay re-reads when it changes or on SIGHUP;
//! a file that does not parse leaves the old policy in force.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_proto::NodeId;
use ferry_proto::grid::{
    CertError, Certificate, GridView, INVITE_SECRET_LEN, MAX_GRID_REVOKED, MemberError,
};
use serde::{Deserialize, Serialize};

/// How the relay decides who may register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Open,
    Allowlist,
    Grid,
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "open" => Ok(Mode::Open),
            "allowlist" => Ok(Mode::Allowlist),
            "grid" => Ok(Mode::Grid),
            other => Err(format!(
                "unknown policy {other:?}: use open, allowlist or grid"
            )),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Open => "open",
            Mode::Allowlist => "allowlist",
            Mode::Grid => "grid",
        })
    }
}

/// One change an operator makes to the lists for one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListEdit {
    /// Admit the node (and lift a deny or a revocation).
    Allow,
    /// Refuse the node in every mode.
    Deny,
    /// Revoke the node's membership: refused in every mode.
    Revoke,
    /// Remove the node from every list.
    Clear,
}

impl ListEdit {
    pub const ALL: [ListEdit; 4] = [Self::Allow, Self::Deny, Self::Revoke, Self::Clear];

    /// The edit's name in the API, the panel's forms and the logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::Revoke => "revoke",
            Self::Clear => "clear",
        }
    }

    pub fn apply(self, lists: &mut Lists, node: NodeId) {
        match self {
            Self::Allow => {
                lists.deny.remove(&node);
                lists.revoked.remove(&node);
                lists.allow.insert(node);
            }
            Self::Deny => {
                lists.allow.remove(&node);
                lists.deny.insert(node);
            }
            Self::Revoke => {
                lists.allow.remove(&node);
                lists.revoked.insert(node);
            }
            Self::Clear => {
                lists.allow.remove(&node);
                lists.deny.remove(&node);
                lists.revoked.remove(&node);
            }
        }
    }
}

impl FromStr for ListEdit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|edit| edit.name() == s)
            .ok_or_else(|| format!("unknown action {s:?}: use allow, deny, revoke or clear"))
    }
}

/// The lists an operator edits: the policy file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lists {
    /// Admitted in `allowlist` and `grid` mode without a certificate.
    #[serde(default)]
    pub allow: BTreeSet<NodeId>,
    /// Refused in every mode.
    #[serde(default)]
    pub deny: BTreeSet<NodeId>,
    /// Extra grid admin keys (this relay's own key is always one).
    #[serde(default)]
    pub admins: BTreeSet<NodeId>,
    /// Members whose membership was revoked; refused in every mode.
    #[serde(default)]
    pub revoked: BTreeSet<NodeId>,
}

/// Why a node was refused. The message reaches the node, so it names the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("node {0} is on this relay's deny list; ask the relay's operator")]
    Denied(NodeId),
    #[error(
        "node {0} is not on this relay's allow list; ask the relay's operator to add it (policy file: allow = [...])"
    )]
    NotListed(NodeId),
    #[error(
        "node {0} is not a member of this grid: this relay admits grid members only; redeem an invite with `ferry-shim join CODE`"
    )]
    NotAMember(NodeId),
    /// Revoked, or a certificate that does not make the node a member (the check
    /// members make of each other too: `GridView::member`).
    #[error("{0}")]
    Member(#[from] MemberError),
}

impl Refusal {
    /// Label of `ferry_relay_refusals_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Denied(_) => "denied",
            Refusal::Member(MemberError::Revoked(_)) => "revoked",
            Refusal::NotListed(_) => "not_listed",
            Refusal::NotAMember(_) => "not_a_member",
            Refusal::Member(MemberError::UnknownIssuer { .. }) => "unknown_issuer",
            Refusal::Member(MemberError::Certificate(CertError::Expired { .. })) => "expired",
            Refusal::Member(MemberError::Certificate(_)) => "bad_certificate",
        }
    }

    pub const REASONS: [&'static str; 7] = [
        "denied",
        "revoked",
        "not_listed",
        "not_a_member",
        "unknown_issuer",
        "expired",
        "bad_certificate",
    ];
}

/// The policy in force.
#[derive(Clone, Debug)]
pub struct Policy {
    pub mode: Mode,
    /// This relay's key: the grid's first admin.
    pub relay: NodeId,
    pub lists: Lists,
    /// The other relays of this relay's fleet (`--fleet`): admins too, so that a
    /// certificate any of them signed is good here.
    pub fleet: BTreeSet<NodeId>,
}

impl Policy {
    /// May `node`, presenting `cert`, use this relay at `now`?
    pub fn admit(
        &self,
        node: &NodeId,
        cert: Option<&Certificate>,
        now: SystemTime,
    ) -> Result<(), Refusal> {
        if self.lists.deny.contains(node) {
            return Err(Refusal::Denied(*node));
        }
        if self.lists.revoked.contains(node) {
            return Err(MemberError::Revoked(*node).into());
        }
        match self.mode {
            Mode::Open => Ok(()),
            Mode::Allowlist if self.lists.allow.contains(node) => Ok(()),
            Mode::Allowlist => Err(Refusal::NotListed(*node)),
            Mode::Grid if self.lists.allow.contains(node) => Ok(()),
            Mode::Grid => {
                let cert = cert.ok_or(Refusal::NotAMember(*node))?;
                self.grid_view().member(node, cert, now)?;
                Ok(())
            }
        }
    }

    /// What this relay tells its nodes of the grid (`Control::Grid`): its admins (this
    /// relay first) and its revoked members, at most `MAX_GRID_REVOKED` of them.
    pub fn grid_view(&self) -> GridView {
        let mut admins = self.lists.admins.clone();
        admins.insert(self.relay);
        admins.extend(self.fleet.iter().copied());
        GridView {
            admins,
            revoked: self
                .lists
                .revoked
                .iter()
                .take(MAX_GRID_REVOKED)
                .copied()
                .collect(),
        }
    }
}

/// Parses the policy file's text.
pub fn parse_lists(text: &str) -> Result<Lists, String> {
    toml::from_str(text).map_err(|e| e.to_string())
}

/// Reads the policy file; a missing file means empty lists.
pub fn load_lists(path: &Path) -> Result<Lists, String> {
    match ferry_proto::config::read_text(path) {
        Ok(text) => parse_lists(&text).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Lists::default()),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Writes the policy file atomically (the panel's and API's allow/deny/revoke).
pub fn save_lists(path: &Path, lists: &Lists) -> Result<(), String> {
    let mut text = String::from(
        "# Ferry relay access lists. Edited by the admin panel and API; the relay re-reads\n\
         # this file when it changes. allow: admitted without a certificate (allowlist and\n\
         # grid modes); deny and revoked: refused in every mode; admins: extra grid admin keys.\n",
    );
    text.push_str(&toml::to_string(lists).map_err(|e| e.to_string())?);
    ferry_proto::config::write_atomic(path, text.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One invite the relay has issued.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Invite {
    /// Unix seconds after which it cannot be redeemed.
    pub expires: u64,
    pub uses_left: u32,
}

impl Invite {
    /// The invite after one redemption at `now`, or why it cannot be redeemed. The
    /// one rule for a relay's own invites and a fleet's.
    pub fn spend(&self, now: SystemTime) -> Result<Invite, InviteRefusal> {
        if self.expires <= unix(now) {
            return Err(InviteRefusal::Expired);
        }
        if self.uses_left == 0 {
            return Err(InviteRefusal::UsedUp);
        }
        Ok(Invite {
            expires: self.expires,
            uses_left: self.uses_left - 1,
        })
    }
}

/// Why an invite could not be redeemed (sent to the would-be member).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InviteRefusal {
    #[error("this invite code is not known to the relay (mistyped, or for another relay)")]
    Unknown,
    #[error("this invite code expired; ask for a new one")]
    Expired,
    #[error("this invite code was already used; ask for a new one")]
    UsedUp,
    #[error("this relay does not take invites: its policy is {0}, not grid")]
    NotGrid(Mode),
    #[error(
        "the grid's fleet cannot check invites right now (its engine is unreachable); try again in a minute"
    )]
    Unavailable,
}

/// Issued invites, keyed by the secret's text. Durable (`invites.json`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Invites {
    pub invites: BTreeMap<String, Invite>,
}

/// Invites kept at most; expired ones are dropped first.
pub const MAX_INVITES: usize = 10_000;

impl Invites {
    /// Records a new invite for `secret`.
    pub fn issue(
        &mut self,
        secret: &[u8; INVITE_SECRET_LEN],
        lifetime: Duration,
        uses: u32,
        now: SystemTime,
    ) -> Result<String, String> {
        self.drop_expired(now);
        if self.invites.len() >= MAX_INVITES {
            return Err(format!(
                "{MAX_INVITES} unredeemed invites are outstanding; wait for some to expire"
            ));
        }
        let key = ferry_proto::grid::InviteCode::secret_text_of(secret);
        self.invites.insert(
            key.clone(),
            Invite {
                expires: unix(now) + lifetime.as_secs(),
                uses_left: uses.max(1),
            },
        );
        Ok(key)
    }

    /// Uses up one redemption of `secret`.
    pub fn redeem(&mut self, secret: &str, now: SystemTime) -> Result<(), InviteRefusal> {
        let invite = self.invites.get_mut(secret).ok_or(InviteRefusal::Unknown)?;
        match invite.spend(now) {
            Err(InviteRefusal::Expired) => {
                self.invites.remove(secret);
                Err(InviteRefusal::Expired)
            }
            Err(refusal) => Err(refusal),
            // A spent entry stays until it expires, so a second try says "already
            // used".
            Ok(spent) => {
                *invite = spent;
                Ok(())
            }
        }
    }

    pub fn drop_expired(&mut self, now: SystemTime) {
        let now = unix(now);
        self.invites.retain(|_, i| i.expires > now);
    }
}

/// Where the invites are kept.
pub fn invites_path(data_dir: &Path) -> PathBuf {
    data_dir.join("invites.json")
}

/// Loads `invites.json` (missing: none issued yet).
pub fn load_invites(path: &Path) -> Result<Invites, String> {
    match ferry_proto::config::read_text(path) {
        Ok(text) => parse_invites(&text).map_err(|e| {
            format!(
                "{} is corrupt ({e}); fix or remove it (outstanding invites are lost)",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Invites::default()),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Parses `invites.json`'s text.
pub fn parse_invites(text: &str) -> Result<Invites, String> {
    serde_json::from_str(text).map_err(|e| e.to_string())
}

pub fn save_invites(path: &Path, invites: &Invites) -> Result<(), String> {
    let body = serde_json::to_vec_pretty(invites).map_err(|e| e.to_string())?;
    ferry_proto::config::write_atomic(path, &body)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Parses a duration such as `24h`, `7d`, `90m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("invalid duration {text:?} ({e}); use e.g. 30m, 24h or 7d"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn list_edits_parse_by_name_and_leave_the_node_in_one_list() {
        let node = ferry_proto::SecretKey::generate().node_id();
        for edit in ListEdit::ALL {
            assert_eq!(edit.name().parse::<ListEdit>(), Ok(edit));
            let mut lists = Lists::default();
            lists.allow.insert(node);
            lists.deny.insert(node);
            lists.revoked.insert(node);
            edit.apply(&mut lists, node);
            let listed = [&lists.allow, &lists.deny, &lists.revoked].map(|l| l.contains(&node));
            let want = match edit {
                ListEdit::Allow => [true, false, false],
                // A deny does not undo a revocation, nor a revocation a deny.
                ListEdit::Deny => [false, true, true],
                ListEdit::Revoke => [false, true, true],
                ListEdit::Clear => [false, false, false],
            };
            assert_eq!(listed, want, "{edit:?}");
        }
        let err = "ban".parse::<ListEdit>().unwrap_err();
        assert_eq!(
            err,
            "unknown action \"ban\": use allow, deny, revoke or clear"
        );
    }

    use super::*;
    use ferry_proto::SecretKey;
    use ferry_proto::grid::Membership;

    fn cert(member: NodeId, issuer: &SecretKey, now: SystemTime, secs: u64) -> Certificate {
        Membership {
            member,
            issuer: issuer.node_id(),
            issued: unix(now),
            expires: unix(now) + secs,
            serial: 1,
        }
        .sign(issuer)
    }

    fn policy(mode: Mode, relay: &SecretKey) -> Policy {
        Policy {
            mode,
            relay: relay.node_id(),
            lists: Lists::default(),
            fleet: BTreeSet::new(),
        }
    }

    #[test]
    fn open_admits_everyone_but_the_denied() {
        let relay = SecretKey::generate();
        let node = SecretKey::generate().node_id();
        let mut p = policy(Mode::Open, &relay);
        let now = SystemTime::now();
        assert_eq!(p.admit(&node, None, now), Ok(()));
        p.lists.deny.insert(node);
        let refusal = p.admit(&node, None, now).unwrap_err();
        assert_eq!(refusal.reason(), "denied");
        assert!(refusal.to_string().contains("deny list"));
    }

    #[test]
    fn allowlist_admits_only_listed_nodes() {
        let relay = SecretKey::generate();
        let (a, b) = (
            SecretKey::generate().node_id(),
            SecretKey::generate().node_id(),
        );
        let mut p = policy(Mode::Allowlist, &relay);
        p.lists.allow.insert(a);
        let now = SystemTime::now();
        assert_eq!(p.admit(&a, None, now), Ok(()));
        let refusal = p.admit(&b, None, now).unwrap_err();
        assert_eq!(refusal, Refusal::NotListed(b));
        assert!(refusal.to_string().contains("allow list"));
    }

    #[test]
    fn grid_checks_certificates_issuers_expiry_and_revocation() {
        let relay = SecretKey::generate();
        let second_admin = SecretKey::generate();
        let stranger_admin = SecretKey::generate();
        let node = SecretKey::generate().node_id();
        let now = SystemTime::now();
        let mut p = policy(Mode::Grid, &relay);

        // No certificate: not a member, and the message says how to become one.
        let r = p.admit(&node, None, now).unwrap_err();
        assert_eq!(r.reason(), "not_a_member");
        assert!(r.to_string().contains("ferry-shim join"));

        // Issued by the relay's own key: admitted.
        let good = cert(node, &relay, now, 3600);
        assert_eq!(p.admit(&node, Some(&good), now), Ok(()));

        // Issued by a key that is not an admin of this grid.
        let foreign = cert(node, &stranger_admin, now, 3600);
        assert_eq!(
            p.admit(&node, Some(&foreign), now).unwrap_err().reason(),
            "unknown_issuer"
        );

        // A configured second admin's certificates are good.
        let by_second = cert(node, &second_admin, now, 3600);
        assert_eq!(
            p.admit(&node, Some(&by_second), now).unwrap_err().reason(),
            "unknown_issuer"
        );
        p.lists.admins.insert(second_admin.node_id());
        assert_eq!(p.admit(&node, Some(&by_second), now), Ok(()));

        // Expired.
        let later = now + Duration::from_secs(3601);
        assert_eq!(
            p.admit(&node, Some(&good), later).unwrap_err().reason(),
            "expired"
        );

        // Someone else's certificate.
        let other = SecretKey::generate().node_id();
        assert_eq!(
            p.admit(&other, Some(&good), now).unwrap_err().reason(),
            "bad_certificate"
        );

        // Revoked: refused even with a good certificate.
        p.lists.revoked.insert(node);
        let r = p.admit(&node, Some(&good), now).unwrap_err();
        assert_eq!(r.reason(), "revoked");
        assert!(r.to_string().contains("revoked"));
    }

    #[test]
    fn invites_are_single_use_and_expire() {
        let now = SystemTime::now();
        let mut invites = Invites::default();
        let secret = [3u8; INVITE_SECRET_LEN];
        let key = invites
            .issue(&secret, Duration::from_secs(60), 1, now)
            .unwrap();
        assert_eq!(invites.redeem(&key, now), Ok(()));
        assert_eq!(invites.redeem(&key, now), Err(InviteRefusal::UsedUp));
        assert_eq!(invites.redeem("nope", now), Err(InviteRefusal::Unknown));

        let two = invites
            .issue(&[4; INVITE_SECRET_LEN], Duration::from_secs(60), 2, now)
            .unwrap();
        assert_eq!(invites.redeem(&two, now), Ok(()));
        assert_eq!(invites.redeem(&two, now), Ok(()));
        assert_eq!(invites.redeem(&two, now), Err(InviteRefusal::UsedUp));

        let late = invites
            .issue(&[5; INVITE_SECRET_LEN], Duration::from_secs(60), 1, now)
            .unwrap();
        let after = now + Duration::from_secs(61);
        assert_eq!(invites.redeem(&late, after), Err(InviteRefusal::Expired));
        // Round trip through JSON (the durable form).
        let json = serde_json::to_string(&invites).unwrap();
        assert_eq!(serde_json::from_str::<Invites>(&json).unwrap(), invites);
    }

    #[test]
    fn policy_files_parse_or_explain() {
        let a = SecretKey::generate().node_id();
        let lists = parse_lists(&format!("allow = [\"{a}\"]\n")).unwrap();
        assert!(lists.allow.contains(&a));
        assert!(parse_lists("alow = []").unwrap_err().contains("alow"));
        assert!(parse_lists("deny = [\"not-a-node\"]").is_err());
        let dir = std::env::temp_dir().join(format!("ferry-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("policy.toml");
        save_lists(&path, &lists).unwrap();
        assert_eq!(load_lists(&path).unwrap(), lists);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            load_lists(&dir.join("missing.toml")).unwrap(),
            Lists::default()
        );
    }

    #[test]
    fn durations_parse_or_explain() {
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(parse_duration("soon").unwrap_err().contains("24h"));
    }
}
