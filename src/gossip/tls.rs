//! Mutually authenticated TLS for QUIC, from ed25519 node keys.
//!
//! Each node presents a self-signed certificate made from its node key, with
//! its admission credential in a private extension (the design libp2p-tls
//! uses for peer ids). One verifier type checks both sides: the certificate's
//! key must be ed25519, and the credential must admit exactly that key into
//! our network. A stranger therefore can neither gossip nor read membership.
//! The crypto provider (ring) is passed explicitly: with several providers in
//! a dependency tree, rustls' default-provider lookup panics.

use std::sync::Arc;

use ed25519_dalek::pkcs8::EncodePrivateKey;
use ed25519_dalek::SigningKey;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::admission::Credential;
use crate::proto::{self, PublicKeyBytes};
use crate::trust::{PeerIdentity, TrustState};

/// ALPN of the gossip protocol, version 2.
pub const ALPN: &[u8] = b"meshpeer/2";
/// Private OID of the credential extension (arc reserved for meshpeer's use;
/// see proto/PROTOCOL.md; version 1 used `.1.1`).
pub const ADMISSION_OID: &[u64] = &[1, 3, 6, 1, 4, 1, 53594, 1, 2];
const ED25519_OID: &str = "1.3.101.112";
/// A gossip connection closes after this long without packets (see
/// [`quic_configs`]).
const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(180);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot encode the node key: {0}")]
    Pkcs8(String),
    #[error("cannot make the node certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("QUIC crypto configuration: {0}")]
    Quic(String),
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A node's certificate and key in rustls form.
pub struct NodeCert {
    pub cert: CertificateDer<'static>,
    pub key: PrivatePkcs8KeyDer<'static>,
}

impl NodeCert {
    pub fn new(signing: &SigningKey, credential: &Credential) -> Result<Self, TlsError> {
        let pkcs8 = signing
            .to_pkcs8_der()
            .map_err(|e| TlsError::Pkcs8(e.to_string()))?;
        let key = PrivatePkcs8KeyDer::from(pkcs8.as_bytes().to_vec());
        let kp = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&key, &rcgen::PKCS_ED25519)?;
        let mut params = rcgen::CertificateParams::new(vec!["meshpeer".to_string()])?;
        params
            .custom_extensions
            .push(rcgen::CustomExtension::from_oid_content(
                ADMISSION_OID,
                proto::encode(credential),
            ));
        let cert = params.self_signed(&kp)?;
        Ok(Self {
            cert: cert.der().clone(),
            key,
        })
    }
}

/// Extracts the node key and credential of a peer certificate.
pub fn read_certificate(cert: &CertificateDer<'_>) -> Result<(PublicKeyBytes, Credential), String> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("unparsable certificate: {e}"))?;
    let spki = x509.public_key();
    if spki.algorithm.algorithm.to_id_string() != ED25519_OID {
        return Err("certificate key is not ed25519".into());
    }
    let node_key: PublicKeyBytes = spki
        .subject_public_key
        .data
        .as_ref()
        .try_into()
        .map_err(|_| "certificate key is not 32 bytes".to_string())?;
    let oid = ADMISSION_OID
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(".");
    let ext = x509
        .extensions()
        .iter()
        .find(|e| e.oid.to_id_string() == oid)
        .ok_or_else(|| "certificate carries no meshpeer v2 credential".to_string())?;
    let credential: Credential =
        proto::decode("credential", ext.value).map_err(|e| e.to_string())?;
    Ok((node_key, credential))
}

/// Reads and checks the credential in a peer certificate.
pub fn check_certificate(
    cert: &CertificateDer<'_>,
    trust: &TrustState,
) -> Result<PeerIdentity, String> {
    let (node_key, credential) = read_certificate(cert)?;
    trust
        .check_credential(&credential, &node_key)
        .map_err(|e| e.to_string())
}

/// Verifies peers (as server and as client) against the network key.
pub struct AdmissionVerifier {
    trust: Arc<TrustState>,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for AdmissionVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdmissionVerifier").finish_non_exhaustive()
    }
}

impl AdmissionVerifier {
    pub fn new(trust: Arc<TrustState>, provider: Arc<CryptoProvider>) -> Self {
        Self { trust, provider }
    }

    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        check_certificate(cert, &self.trust)
            .map(|_| ())
            .map_err(|e| {
                tracing::debug!(error = %e, "rejected a peer certificate");
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::ApplicationVerificationFailure,
                )
            })
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

impl ServerCertVerifier for AdmissionVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|_| ServerCertVerified::assertion())
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
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl ClientCertVerifier for AdmissionVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|_| ClientCertVerified::assertion())
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
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

/// Builds quinn's server and client configurations for a node.
pub fn quic_configs(
    cert: &NodeCert,
    trust: Arc<TrustState>,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig), TlsError> {
    let provider = provider();
    let verifier = Arc::new(AdmissionVerifier::new(trust, provider.clone()));
    let key = || PrivateKeyDer::Pkcs8(cert.key.clone_key());

    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(vec![cert.cert.clone()], key())?;
    server.alpn_protocols = vec![ALPN.to_vec()];
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![cert.cert.clone()], key())?;
    client.alpn_protocols = vec![ALPN.to_vec()];

    let mut transport = quinn::TransportConfig::default();
    // No keep-alive: a connection lives while gossip uses it and closes
    // after IDLE_TIMEOUT of silence. Keep-alives on a connection to every
    // member (a ping each few seconds on each) would cost O(N) packets per
    // second per node; an idle connection costs only memory. The timeout
    // is long because in a large mesh a node gossips with a given member
    // only every minute or so, and a new connection is a TLS handshake
    // (signatures, key exchange, our certificate check) on both sides.
    transport.keep_alive_interval(None);
    // Each gossip message or request takes one stream: a peer may have a
    // few in flight, not thousands (proto/PROTOCOL.md §4.6).
    transport.max_concurrent_uni_streams(16u32.into());
    transport.max_concurrent_bidi_streams(16u32.into());
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(IDLE_TIMEOUT).map_err(|e| TlsError::Quic(e.to_string()))?,
    ));
    let transport = Arc::new(transport);

    let server_crypto = quinn::crypto::rustls::QuicServerConfig::try_from(server)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut server_cfg = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
    server_cfg.transport_config(transport.clone());
    let client_crypto = quinn::crypto::rustls::QuicClientConfig::try_from(client)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut client_cfg = quinn::ClientConfig::new(Arc::new(client_crypto));
    client_cfg.transport_config(transport);
    Ok((server_cfg, client_cfg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::{issue_token, stamp, Network, Stamper, Token};

    #[test]
    fn certificates_carry_a_checkable_credential() {
        let net = SigningKey::from_bytes(&[1; 32]);
        let nk = net.verifying_key().to_bytes();
        let trust = TrustState::new(
            Network {
                key: nk,
                cidr: "10.77.0.0/16".parse().unwrap(),
            },
            Arc::new(|| 1000),
        );
        let node = SigningKey::from_bytes(&[2; 32]);
        let key = node.verifying_key().to_bytes();
        let token = issue_token(&net, "10.77.0.0/16".parse().unwrap(), 0, vec![]);
        let (_, d) = Token::parse(&token.to_text()).unwrap();
        let admission = token.admit(key, 1);
        // A joiner's certificate: accepted, but not as a member.
        let joiner = Credential {
            admission: admission.clone(),
            stamp: None,
        };
        let c = NodeCert::new(&node, &joiner).unwrap();
        let v = check_certificate(&c.cert, &trust).unwrap();
        assert_eq!(v.node_key, key);
        assert!(!v.stamped);
        // A member's.
        let member = Credential {
            admission,
            stamp: Some(stamp(&net, Stamper::Network, nk, key, d.token_id, 5)),
        };
        let c = NodeCert::new(&node, &member).unwrap();
        assert!(check_certificate(&c.cert, &trust).unwrap().stamped);
        let other = TrustState::new(
            Network {
                key: [9; 32],
                cidr: "10.77.0.0/16".parse().unwrap(),
            },
            Arc::new(|| 1000),
        );
        assert!(check_certificate(&c.cert, &other).is_err());
        // A credential for another node inside my certificate is refused.
        let thief = SigningKey::from_bytes(&[3; 32]);
        let c = NodeCert::new(&thief, &member).unwrap();
        assert!(check_certificate(&c.cert, &trust).is_err());
    }
}
