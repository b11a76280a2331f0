//! Grid membership: certificates that admit a node to a grid's relays, and the invite
//! codes a new member redeems for one.
//!
//! A grid is a set of admin keys (a relay's own key is its grid's first admin). A
//! membership certificate says "node M is a member until T", signed by an admin key;
//! a relay in `grid` mode admits a node that presents an unexpired certificate for its
//! own key, issued by one of the grid's admins, and not revoked. Like path records,
//! what is signed is a fixed binary encoding with a domain-separation prefix.
//!
//! What a node needs to check another member's certificate is its grid's [`GridView`]:
//! the admin keys and the revoked members. Relays send it to their nodes (and again on
//! every policy change), and shims check peers on the overlay against it
//! ([`GridView::member`]), the same test a relay applies at registration.
//!
//! An invite code is what a friend receives: the relay's URL (which pins the relay's
//! key) plus a random secret, written `ferry://<relay-id>@host:port?invite=<secret>`.
//! The secret is single-use (or N-use) and expires; the relay keeps the list.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use ed25519_dalek::Signature;
use serde::{Deserialize, Serialize};

use crate::identity::{NodeId, SecretKey};
use crate::url::RelayUrl;

const SIGNING_CONTEXT: &[u8] = b"ferry grid membership v1\0";

/// Bytes of randomness in an invite secret (128 bits: unguessable, short to type).
pub const INVITE_SECRET_LEN: usize = 16;

fn unix_now(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The signed content of a membership certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Membership {
    /// The member's node ID.
    pub member: NodeId,
    /// The admin key that signed it.
    pub issuer: NodeId,
    /// Unix seconds.
    pub issued: u64,
    pub expires: u64,
    /// Unique per issuer; lets one certificate be revoked without revoking the node.
    pub serial: u64,
}

/// A membership with the issuer's signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    pub membership: Membership,
    /// ed25519 signature, lowercase hex.
    pub signature: String,
}

/// Why a certificate is not acceptable. The messages reach the refused node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("the membership certificate's signature does not verify")]
    BadSignature,
    #[error("the membership certificate is for node {member}, not for this node {node}")]
    WrongMember { member: NodeId, node: NodeId },
    #[error("the membership certificate expired {ago} s ago; ask a grid admin for a new invite")]
    Expired { ago: u64 },
}

impl Membership {
    fn signed_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(SIGNING_CONTEXT.len() + 88);
        out.extend_from_slice(SIGNING_CONTEXT);
        out.extend_from_slice(self.member.as_bytes());
        out.extend_from_slice(self.issuer.as_bytes());
        out.extend_from_slice(&self.issued.to_be_bytes());
        out.extend_from_slice(&self.expires.to_be_bytes());
        out.extend_from_slice(&self.serial.to_be_bytes());
        out
    }

    /// Signs with the issuer's key (which must be `self.issuer`).
    pub fn sign(self, issuer: &SecretKey) -> Certificate {
        let signature = issuer.sign(&self.signed_bytes());
        Certificate {
            membership: self,
            signature: data_encoding::HEXLOWER.encode(&signature),
        }
    }
}

impl Certificate {
    /// Checks the signature against the issuer, that it names `node`, and expiry.
    /// Whether the issuer is one of the grid's admins is the caller's question.
    pub fn verify(&self, node: &NodeId, now: SystemTime) -> Result<&Membership, CertError> {
        let m = &self.membership;
        let key = m.issuer.verifying_key().ok_or(CertError::BadSignature)?;
        let bytes = data_encoding::HEXLOWER
            .decode(self.signature.as_bytes())
            .map_err(|_| CertError::BadSignature)?;
        let bytes: [u8; 64] = bytes.try_into().map_err(|_| CertError::BadSignature)?;
        key.verify_strict(&m.signed_bytes(), &Signature::from_bytes(&bytes))
            .map_err(|_| CertError::BadSignature)?;
        if m.member != *node {
            return Err(CertError::WrongMember {
                member: m.member,
                node: *node,
            });
        }
        let now = unix_now(now);
        if m.expires <= now {
            return Err(CertError::Expired {
                ago: now - m.expires,
            });
        }
        Ok(m)
    }
}

/// Most revoked members a [`GridView`] carries: what fits in one control frame
/// (`limits::MAX_CONTROL_FRAME`) with room to spare; a relay with more keeps the rest
/// out of the view it sends and says so in its log.
pub const MAX_GRID_REVOKED: usize = 800;

/// What members need to check each other: who may issue certificates in the grid,
/// and whose membership was revoked.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GridView {
    pub admins: BTreeSet<NodeId>,
    #[serde(default)]
    pub revoked: BTreeSet<NodeId>,
}

/// Why a certificate does not make its holder a member of a grid. The messages reach
/// the refused node and status pages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemberError {
    #[error("node {0}'s membership in this grid was revoked; ask a grid admin")]
    Revoked(NodeId),
    #[error("node {node}'s certificate was issued by {issuer}, which is not an admin of this grid")]
    UnknownIssuer { node: NodeId, issuer: NodeId },
    #[error("{0}")]
    Certificate(#[from] CertError),
}

impl GridView {
    /// Does `cert`, presented by `node` (authenticated by its key), make it a member
    /// of this grid at `now`: a good signature by one of the admins, for this node,
    /// unexpired, and the node not revoked?
    pub fn member<'c>(
        &self,
        node: &NodeId,
        cert: &'c Certificate,
        now: SystemTime,
    ) -> Result<&'c Membership, MemberError> {
        if self.revoked.contains(node) {
            return Err(MemberError::Revoked(*node));
        }
        let m = cert.verify(node, now)?;
        if !self.admins.contains(&m.issuer) {
            return Err(MemberError::UnknownIssuer {
                node: *node,
                issuer: m.issuer,
            });
        }
        Ok(m)
    }
}

/// An invite: where to go and the secret to show there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InviteCode {
    pub relay: RelayUrl,
    pub secret: [u8; INVITE_SECRET_LEN],
}

#[derive(Debug, thiserror::Error)]
#[error(
    "invalid invite code {0:?}: expected ferry://<relay-id>@host:port?invite=<secret>, as printed by `ferry-relay invite`"
)]
pub struct InviteError(String);

impl InviteCode {
    /// The secret as written in the code (lowercase base32, no padding).
    pub fn secret_text(&self) -> String {
        Self::secret_text_of(&self.secret)
    }

    pub fn secret_text_of(secret: &[u8; INVITE_SECRET_LEN]) -> String {
        crate::identity::BASE32.encode(secret)
    }

    /// Parses the secret part alone (as a node presents it to the relay).
    pub fn parse_secret(text: &str) -> Option<[u8; INVITE_SECRET_LEN]> {
        let bytes = crate::identity::BASE32.decode(text.as_bytes()).ok()?;
        bytes.try_into().ok()
    }
}

impl fmt::Display for InviteCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}?invite={}", self.relay, self.secret_text())
    }
}

impl FromStr for InviteCode {
    type Err = InviteError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InviteError(s.to_string());
        let (url, secret) = s.trim().split_once("?invite=").ok_or_else(bad)?;
        Ok(InviteCode {
            relay: url.parse().map_err(|_| bad())?,
            secret: InviteCode::parse_secret(secret).ok_or_else(bad)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn membership(member: NodeId, issuer: NodeId, now: SystemTime) -> Membership {
        let t = unix_now(now);
        Membership {
            member,
            issuer,
            issued: t,
            expires: t + 3600,
            serial: 9,
        }
    }

    /// An admin whose clock is off by the records' tolerance either way issues
    /// certificates that a relay accepts: only the expiry is compared with the
    /// relay's clock, never the issue time, so skew shortens or lengthens a
    /// membership by the skew and nothing more.
    #[test]
    fn certificates_survive_the_clock_skew_tolerance_either_way() {
        let (admin, node) = (SecretKey::generate(), SecretKey::generate());
        let relay_now = SystemTime::now();
        let skew = crate::record::CLOCK_SKEW_TOLERANCE;
        for admin_now in [relay_now + skew, relay_now - skew] {
            let cert = membership(node.node_id(), admin.node_id(), admin_now).sign(&admin);
            assert!(cert.verify(&node.node_id(), relay_now).is_ok());
        }
    }

    #[test]
    fn certificates_verify_for_their_member_until_they_expire() {
        let (admin, node) = (SecretKey::generate(), SecretKey::generate());
        let now = SystemTime::now();
        let cert = membership(node.node_id(), admin.node_id(), now).sign(&admin);
        let json = serde_json::to_string(&cert).unwrap();
        let back: Certificate = serde_json::from_str(&json).unwrap();
        assert_eq!(back.verify(&node.node_id(), now).unwrap().serial, 9);
        // Presented by another node.
        let other = SecretKey::generate().node_id();
        assert!(matches!(
            back.verify(&other, now),
            Err(CertError::WrongMember { .. })
        ));
        // Later than its expiry.
        let later = now + Duration::from_secs(3601);
        let err = back.verify(&node.node_id(), later).unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");
    }

    #[test]
    fn forged_and_altered_certificates_fail() {
        let (admin, node, mallory) = (
            SecretKey::generate(),
            SecretKey::generate(),
            SecretKey::generate(),
        );
        let now = SystemTime::now();
        // Mallory signs a certificate claiming the admin issued it.
        let forged = membership(node.node_id(), admin.node_id(), now).sign(&mallory);
        assert_eq!(
            forged.verify(&node.node_id(), now),
            Err(CertError::BadSignature)
        );
        // A genuine one with its expiry pushed out.
        let mut altered = membership(node.node_id(), admin.node_id(), now).sign(&admin);
        altered.membership.expires += 1;
        assert_eq!(
            altered.verify(&node.node_id(), now),
            Err(CertError::BadSignature)
        );
    }

    #[test]
    fn a_grid_view_admits_members_of_its_admins_only_and_never_revoked_ones() {
        let (admin, node, stranger_admin) = (
            SecretKey::generate(),
            SecretKey::generate(),
            SecretKey::generate(),
        );
        let now = SystemTime::now();
        let mut grid = GridView {
            admins: [admin.node_id()].into(),
            revoked: BTreeSet::new(),
        };
        let cert = membership(node.node_id(), admin.node_id(), now).sign(&admin);
        assert_eq!(grid.member(&node.node_id(), &cert, now).unwrap().serial, 9);
        // Another grid's certificate.
        let other = membership(node.node_id(), stranger_admin.node_id(), now).sign(&stranger_admin);
        assert!(matches!(
            grid.member(&node.node_id(), &other, now),
            Err(MemberError::UnknownIssuer { .. })
        ));
        // Presented by a node it does not name, forged, expired.
        let thief = SecretKey::generate().node_id();
        assert!(matches!(
            grid.member(&thief, &cert, now),
            Err(MemberError::Certificate(CertError::WrongMember { .. }))
        ));
        let forged = membership(node.node_id(), admin.node_id(), now).sign(&stranger_admin);
        assert!(matches!(
            grid.member(&node.node_id(), &forged, now),
            Err(MemberError::Certificate(CertError::BadSignature))
        ));
        let later = now + Duration::from_secs(3601);
        assert!(matches!(
            grid.member(&node.node_id(), &cert, later),
            Err(MemberError::Certificate(CertError::Expired { .. }))
        ));
        // Revoked: refused whatever its certificate says.
        grid.revoked.insert(node.node_id());
        let e = grid.member(&node.node_id(), &cert, now).unwrap_err();
        assert!(e.to_string().contains("revoked"), "{e}");
    }

    #[test]
    fn invite_codes_round_trip_and_explain_mistakes() {
        let relay: RelayUrl = format!(
            "ferry://{}@relay.example.org:7842",
            SecretKey::generate().node_id()
        )
        .parse()
        .unwrap();
        let code = InviteCode {
            relay,
            secret: [7; INVITE_SECRET_LEN],
        };
        let text = code.to_string();
        assert!(text.contains("?invite="), "{text}");
        assert_eq!(text.parse::<InviteCode>().unwrap(), code);
        for bad in ["", "ferry://x@h:1", &format!("{}?invite=short", code.relay)] {
            let err = bad.parse::<InviteCode>().unwrap_err().to_string();
            assert!(err.contains("ferry-relay invite"), "{err}");
        }
    }
}
