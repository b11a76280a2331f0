//! Grid memberships of this node: redeeming an invite code (`ferry-shim join CODE`)
//! and keeping the certificates it bought, with their relays, in the data directory
//! (`membership.json`), so that afterwards `expose` needs no `--relay` and every
//! registration presents the certificate by itself.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use ferry_proto::NodeId;
use ferry_proto::frame::{
    Control, ErrorCode, Frame, FrameCodec, MAX_HELLO_CERTIFICATES, PeerHello,
};
use ferry_proto::grid::{Certificate, GridView, InviteCode};
use ferry_proto::link::{self, Link};
use ferry_proto::tls::{self, ALPN_RELAY};
use ferry_proto::{RelayUrl, SecretKey};
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::allow::KnownGrid;

/// How long joining may take, end to end.
const JOIN_TIMEOUT: Duration = Duration::from_secs(20);

/// How long QUIC gets before TLS over TCP is tried instead.
const QUIC_TRY: Duration = Duration::from_secs(3);

/// One grid this node belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GridMembership {
    pub relay: RelayUrl,
    pub certificate: Certificate,
    /// The grid as the relay last described it (`Control::Grid`): kept so that a
    /// shim started while its relays are out of reach still refuses revoked members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grid: Option<GridView>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Memberships {
    pub memberships: Vec<GridMembership>,
}

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("membership.json")
}

impl Memberships {
    /// Loads the memberships (none if the file does not exist).
    pub fn load(data_dir: &Path) -> anyhow::Result<Memberships> {
        let path = path(data_dir);
        match ferry_proto::config::read_text(&path) {
            Ok(text) => Self::parse(&text).with_context(|| {
                format!(
                    "{} is corrupt; remove it and join again with a new invite",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Memberships::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Parses the memberships file's text.
    pub fn parse(text: &str) -> serde_json::Result<Memberships> {
        serde_json::from_str(text)
    }

    fn save(&self, data_dir: &Path) -> anyhow::Result<()> {
        let path = path(data_dir);
        let body = serde_json::to_vec_pretty(self)?;
        ferry_proto::config::write_atomic(&path, &body)
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// The certificate to present to `relay`: the one bought there, else any (a grid's
    /// relays share admins).
    pub fn certificate_for(&self, relay: &RelayUrl) -> Option<&Certificate> {
        self.memberships
            .iter()
            .find(|m| m.relay.relay_id == relay.relay_id)
            .or(self.memberships.first())
            .map(|m| &m.certificate)
    }

    /// The grids this node belongs to, for the allow list: as last heard from each
    /// relay, else the relay and its certificate's issuer as the admins.
    pub fn known_grids(&self) -> Vec<KnownGrid> {
        self.memberships
            .iter()
            .map(|m| KnownGrid {
                relay: m.relay.relay_id,
                view: m.grid.clone().unwrap_or_else(|| GridView {
                    admins: [m.relay.relay_id, m.certificate.membership.issuer].into(),
                    revoked: Default::default(),
                }),
            })
            .collect()
    }

    /// What this node proves of itself on the overlay: its certificates.
    pub fn hello(&self) -> PeerHello {
        let mut certificates: Vec<Certificate> = Vec::new();
        for m in &self.memberships {
            if !certificates.contains(&m.certificate) {
                certificates.push(m.certificate.clone());
            }
        }
        certificates.truncate(MAX_HELLO_CERTIFICATES);
        PeerHello { certificates }
    }

    /// Keeps what `relay` said of its grid in the memberships file, when this node
    /// is a member there and it changed.
    pub fn record_grid(data_dir: &Path, relay: NodeId, view: &GridView) -> anyhow::Result<()> {
        let mut all = Memberships::load(data_dir)?;
        let Some(m) = all
            .memberships
            .iter_mut()
            .find(|m| m.relay.relay_id == relay)
        else {
            return Ok(());
        };
        if m.grid.as_ref() == Some(view) {
            return Ok(());
        }
        m.grid = Some(view.clone());
        all.save(data_dir)
    }

    pub fn relays(&self) -> Vec<RelayUrl> {
        self.memberships.iter().map(|m| m.relay.clone()).collect()
    }
}

/// How `join` may reach the relay: the mode's policy and the configured proxy.
#[derive(Debug, Clone)]
pub struct JoinRoute {
    pub policy: crate::mode::Policy,
    pub proxy: Option<crate::proxy::ProxyUrl>,
}

async fn connect(key: &SecretKey, relay: &RelayUrl, route: &JoinRoute) -> anyhow::Result<Link> {
    let cfg = tls::client_config(key, relay.relay_id, ALPN_RELAY, "relay")?;
    // As for relay sessions (`relay_client::dial`).
    if let Some(proxy) = crate::proxy::for_relay(route.proxy.as_ref(), &route.policy, &relay.host)
        .map_err(anyhow::Error::msg)?
    {
        return proxy
            .relay_link(relay, cfg)
            .await
            .map_err(anyhow::Error::msg);
    }
    let addr = tokio::net::lookup_host(relay.authority())
        .await
        .with_context(|| format!("cannot resolve {}", relay.host))?
        .next()
        .with_context(|| format!("{} resolves to no address", relay.host))?;
    let bind = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let endpoint = quinn::Endpoint::client(bind.parse()?)?;
    let quic = link::connect_quic(&endpoint, addr, cfg.clone(), ALPN_RELAY);
    match tokio::time::timeout(QUIC_TRY, quic).await {
        Ok(Ok(link)) => Ok(link),
        _ => Ok(link::connect_tcp(addr, cfg.clone(), cfg, ALPN_RELAY).await?),
    }
}

/// Redeems `code` with its relay and stores the certificate. Returns the membership.
pub async fn join(
    key: &SecretKey,
    data_dir: &Path,
    code: &InviteCode,
    route: &JoinRoute,
) -> anyhow::Result<GridMembership> {
    let attempt = async {
        let link = connect(key, &code.relay, route).await.with_context(|| {
            format!("cannot reach the relay {} named in the invite", code.relay)
        })?;
        let stream = link.open().await?;
        let mut writer = FramedWrite::new(stream.send, FrameCodec);
        let mut reader = FramedRead::new(stream.recv, FrameCodec);
        writer
            .send(Frame::Control(Control::Join {
                invite: code.secret_text(),
            }))
            .await?;
        let answer = reader.next().await;
        link.close("joined");
        match answer {
            Some(Ok(Frame::Control(Control::Joined { certificate }))) => {
                certificate
                    .verify(&key.node_id(), std::time::SystemTime::now())
                    .context("the relay sent a certificate that does not hold")?;
                if certificate.membership.issuer != code.relay.relay_id {
                    anyhow::bail!("the relay sent a certificate signed by another key");
                }
                Ok(*certificate)
            }
            Some(Ok(Frame::Control(Control::Error {
                code: ErrorCode::Denied,
                message,
            }))) => anyhow::bail!("the relay refused the invite: {message}"),
            other => anyhow::bail!("unexpected answer from the relay: {other:?}"),
        }
    };
    let certificate: Certificate =
        tokio::time::timeout(JOIN_TIMEOUT, attempt)
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "the relay did not answer within {} s",
                    JOIN_TIMEOUT.as_secs()
                )
            })??;
    let membership = GridMembership {
        relay: code.relay.clone(),
        certificate,
        grid: None,
    };
    ferry_proto::identity::create_private_dir(data_dir)?;
    let mut all = Memberships::load(data_dir)?;
    all.memberships
        .retain(|m| m.relay.relay_id != membership.relay.relay_id);
    all.memberships.push(membership.clone());
    all.save(data_dir)?;
    Ok(membership)
}
