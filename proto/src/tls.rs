//! TLS 1.3 with raw ed25519 public keys (RFC 7250) for every Ferry connection: shim to
//! relay (QUIC and TCP) and shim to shim (the end-to-end overlay).
//!
//! Why raw public keys rather than self-signed X.509: a node ID *is* a key, so there is
//! nothing for a certificate to add, and the peer's "certificate" becomes a 44-byte
//! SubjectPublicKeyInfo that is parsed strictly instead of a general X.509 parse whose
//! every extension is attack surface. Both sides always present a key (mutual
//! authentication): the client pins the key it expects (the relay ID in the URL, or the
//! peer's node ID), and the server learns who connected from the handshake itself, so no
//! bearer token ever crosses the wire and nothing the relay sees can be replayed.
//!
//! Only the ED25519 signature scheme is accepted, and only TLS 1.3.

use std::sync::Arc;

use ed25519_dalek::pkcs8::{DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, VerifyingKey};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::identity::{NodeId, SecretKey};

/// ALPN of the node-to-relay protocol.
pub const ALPN_RELAY: &[u8] = b"ferry/1";
/// ALPN of the end-to-end shim-to-shim protocol carried over the overlay.
pub const ALPN_PEER: &[u8] = b"ferry-peer/1";
/// Name sent in place of a host name. Identity comes from the pinned key, not from
/// names; SNI is disabled so this never even leaves the machine.
pub const SERVER_NAME: &str = "ferry.invalid";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot encode the node key for TLS: {0}")]
    Key(String),
    #[error("TLS configuration rejected: {0}")]
    Config(#[from] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certified_key(key: &SecretKey) -> Result<Arc<CertifiedKey>, TlsError> {
    let pkcs8 = key
        .signing_key()
        .to_pkcs8_der()
        .map_err(|e| TlsError::Key(e.to_string()))?;
    let spki = key
        .signing_key()
        .verifying_key()
        .to_public_key_der()
        .map_err(|e| TlsError::Key(e.to_string()))?;
    let signer = rustls::crypto::ring::sign::any_eddsa_type(&PrivatePkcs8KeyDer::from(
        pkcs8.as_bytes().to_vec(),
    ))
    .map_err(|e| TlsError::Key(e.to_string()))?;
    Ok(Arc::new(CertifiedKey::new(
        vec![CertificateDer::from(spki.as_bytes().to_vec())],
        signer,
    )))
}

/// Extracts the node ID from a raw-public-key "certificate" (an ed25519 SPKI).
pub fn node_id_from_spki(spki: &[u8]) -> Option<NodeId> {
    VerifyingKey::from_public_key_der(spki)
        .ok()
        .map(|key| NodeId::from_bytes(key.to_bytes()))
}

fn check_single_key(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Result<NodeId, rustls::Error> {
    if !intermediates.is_empty() {
        return Err(rustls::Error::General(
            "peer sent a certificate chain; Ferry expects a single raw ed25519 key".into(),
        ));
    }
    node_id_from_spki(end_entity.as_ref())
        .ok_or_else(|| rustls::Error::General("peer's key is not an ed25519 public key".into()))
}

fn verify_ed25519(
    message: &[u8],
    spki: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    if dss.scheme != SignatureScheme::ED25519 {
        return Err(rustls::Error::PeerMisbehaved(
            rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme,
        ));
    }
    let key = VerifyingKey::from_public_key_der(spki.as_ref())
        .map_err(|_| rustls::Error::General("peer's key is not an ed25519 public key".into()))?;
    let sig = Signature::from_slice(dss.signature())
        .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature))?;
    key.verify_strict(message, &sig)
        .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature))?;
    Ok(HandshakeSignatureValid::assertion())
}

/// Verifies the server's raw key; with `expected` set, only that key is accepted.
#[derive(Debug)]
struct PinnedServerKey {
    expected: NodeId,
    what: &'static str,
}

impl ServerCertVerifier for PinnedServerKey {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = check_single_key(end_entity, intermediates)?;
        if presented != self.expected {
            return Err(rustls::Error::General(format!(
                "{} presented key {presented}, but {expected} was expected; check the {}",
                self.what,
                if self.what == "relay" {
                    "node ID in the relay URL"
                } else {
                    "node ID you asked to reach"
                },
                expected = self.expected,
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_ed25519(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

/// Accepts any client that proves possession of an ed25519 key. Who may do what is
/// decided after the handshake from the authenticated node ID.
#[derive(Debug)]
struct AnyClientKey;

impl ClientCertVerifier for AnyClientKey {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        check_single_key(end_entity, intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_ed25519(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

/// Server side: presents `key`, requires the client to present an ed25519 key.
pub fn server_config(key: &SecretKey, alpn: &[u8]) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(AnyClientKey))
        .with_cert_resolver(Arc::new(
            rustls::server::AlwaysResolvesServerRawPublicKeys::new(certified_key(key)?),
        ));
    config.alpn_protocols = vec![alpn.to_vec()];
    // 0-RTT data could be replayed; Ferry never needs it.
    config.max_early_data_size = 0;
    Ok(config)
}

/// Client side: presents `key`, accepts only a server holding `expected`'s key.
/// `what` names the server in errors ("relay" or "peer").
pub fn client_config(
    key: &SecretKey,
    expected: NodeId,
    alpn: &[u8],
    what: &'static str,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedServerKey { expected, what }))
        .with_client_cert_resolver(Arc::new(
            rustls::client::AlwaysResolvesClientRawPublicKeys::new(certified_key(key)?),
        ));
    config.alpn_protocols = vec![alpn.to_vec()];
    config.enable_sni = false;
    Ok(config)
}

/// The node ID a finished handshake authenticated, from the peer's presented keys.
pub fn peer_node_id(certs: Option<&[CertificateDer<'_>]>) -> Option<NodeId> {
    certs?.first().and_then(|c| node_id_from_spki(c.as_ref()))
}

/// The authenticated node ID of a QUIC connection's peer.
pub fn quic_peer_id(conn: &quinn::Connection) -> Option<NodeId> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    peer_node_id(Some(&certs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spki_round_trip_gives_the_node_id() {
        let key = SecretKey::generate();
        let ck = certified_key(&key).unwrap();
        assert_eq!(node_id_from_spki(ck.cert[0].as_ref()), Some(key.node_id()));
        assert_eq!(node_id_from_spki(b"garbage"), None);
    }

    /// Presents `claimed`'s public key but signs with `actual`'s private key: a node
    /// (or relay) claiming another's ID without holding its key.
    fn impostor(claimed: &SecretKey, actual: &SecretKey) -> Arc<CertifiedKey> {
        let real = certified_key(actual).unwrap();
        let shown = certified_key(claimed).unwrap();
        Arc::new(CertifiedKey::new(shown.cert.clone(), real.key.clone()))
    }

    /// Runs a TLS handshake in memory; the first error either side reports.
    fn handshake(
        client: rustls::ClientConfig,
        server: rustls::ServerConfig,
    ) -> Result<(), rustls::Error> {
        let name = rustls::pki_types::ServerName::try_from(SERVER_NAME).unwrap();
        let mut c = rustls::ClientConnection::new(Arc::new(client), name)?;
        let mut s = rustls::ServerConnection::new(Arc::new(server))?;
        for _ in 0..20 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets()?;
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
        }
        panic!("the handshake neither finished nor failed");
    }

    #[test]
    fn claiming_another_nodes_id_without_its_key_fails_the_handshake() {
        let (server_key, client_key, victim) = (
            SecretKey::generate(),
            SecretKey::generate(),
            SecretKey::generate(),
        );
        let server = || server_config(&server_key, ALPN_RELAY).unwrap();
        let client =
            || client_config(&client_key, server_key.node_id(), ALPN_RELAY, "relay").unwrap();
        handshake(client(), server()).expect("the genuine keys complete the handshake");

        // A client (a node dialling a relay or a peer) claiming the victim's ID.
        let mut forged = client();
        forged.client_auth_cert_resolver = Arc::new(
            rustls::client::AlwaysResolvesClientRawPublicKeys::new(impostor(&victim, &client_key)),
        );
        let err = handshake(forged, server()).expect_err("an impostor client must fail");
        assert!(err.to_string().contains("ignature"), "{err}");

        // A server (a relay or a peer being dialled) claiming the victim's ID to a client
        // that pinned the victim.
        let mut forged = server_config(&server_key, ALPN_RELAY).unwrap();
        forged.cert_resolver = Arc::new(rustls::server::AlwaysResolvesServerRawPublicKeys::new(
            impostor(&victim, &server_key),
        ));
        let pinned = client_config(&client_key, victim.node_id(), ALPN_RELAY, "relay").unwrap();
        let err = handshake(pinned, forged).expect_err("an impostor server must fail");
        assert!(err.to_string().contains("ignature"), "{err}");
    }

    #[test]
    fn configs_build_for_tls13_only() {
        let key = SecretKey::generate();
        let server = server_config(&key, ALPN_RELAY).unwrap();
        assert_eq!(server.alpn_protocols, vec![ALPN_RELAY.to_vec()]);
        let client = client_config(&key, key.node_id(), ALPN_RELAY, "relay").unwrap();
        assert!(!client.enable_sni);
    }
}
