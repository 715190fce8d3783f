//! Post-quantum TLS for the front door: the hybrid X25519MLKEM768 key exchange
//! ([`hybrid`]) on rustls' ring provider, and the rustls and quinn configurations that offer
//! it according to a [`PqMode`]. Documented in `docs/quic.md`.

pub mod backhaul;
pub mod front_door;
pub mod hybrid;
pub mod metrics;

use std::sync::Arc;

use rustls::{
    RootCertStore,
    crypto::{CryptoProvider, SupportedKxGroup, ring::kx_group::X25519},
    pki_types::{CertificateDer, PrivateKeyDer},
};
use serde::{Deserialize, Serialize};

pub use hybrid::X25519MLKEM768;

/// The ALPN protocol identifier of HTTP/3.
pub const ALPN_H3: &[u8] = b"h3";

/// Whether the hybrid post-quantum key exchange is required, preferred, or not offered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PqMode {
    /// X25519MLKEM768 only: a peer without it cannot connect (a server answers its
    /// ClientHello with a `handshake_failure` alert).
    Required,
    /// X25519MLKEM768 first, then X25519. A client offers shares for both (one X25519 key),
    /// so a classical server costs no extra round trip; a server takes the first of the
    /// client's groups it supports.
    #[default]
    Preferred,
    /// X25519 only.
    Off,
}

impl PqMode {
    /// The mode's name as written in configuration files.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Required => "required",
            Self::Preferred => "preferred",
            Self::Off => "off",
        }
    }
}

impl std::fmt::Display for PqMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Errors from building TLS and QUIC configurations.
#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    /// rustls refused the configuration (for example a key that does not match the
    /// certificate, or an unsupported key type).
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The certificate or key could not be generated.
    #[error("generating a self-signed certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    /// The TLS configuration cannot carry QUIC (it lacks the cipher suite QUIC's Initial
    /// packets need).
    #[error("TLS configuration unusable for QUIC: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    /// The CA certificates for client certificates cannot be used.
    #[error("client certificate CAs: {0}")]
    ClientCa(String),
}

/// The key exchange groups of `mode`, most preferred first.
pub fn kx_groups(mode: PqMode) -> Vec<&'static dyn SupportedKxGroup> {
    match mode {
        PqMode::Required => vec![X25519MLKEM768],
        PqMode::Preferred => vec![X25519MLKEM768, X25519],
        PqMode::Off => vec![X25519],
    }
}

/// rustls' ring provider with the key exchange groups of `mode`.
pub fn crypto_provider(mode: PqMode) -> CryptoProvider {
    CryptoProvider {
        kx_groups: kx_groups(mode),
        ..rustls::crypto::ring::default_provider()
    }
}

/// A TLS 1.3 server configuration for `mode`, presenting `cert_chain` (end entity first)
/// with `key`, and accepting the ALPN protocols `alpn` (none: no ALPN).
pub fn server_config(
    mode: PqMode,
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, QuicError> {
    server_config_with(mode, cert_chain, key, alpn, None)
}

/// [`server_config`], also asking clients for certificates that chain to `client_roots`
/// (when given): a client may present none, but one it presents must verify.
pub fn server_config_with(
    mode: PqMode,
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: &[&[u8]],
    client_roots: Option<Arc<RootCertStore>>,
) -> Result<rustls::ServerConfig, QuicError> {
    let provider = Arc::new(crypto_provider(mode));
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match client_roots {
        None => builder.with_no_client_auth(),
        Some(roots) => builder.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| QuicError::ClientCa(e.to_string()))?,
        ),
    };
    let mut config = builder.with_single_cert(cert_chain, key)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A TLS 1.3 client configuration for `mode` that trusts `roots` and offers the ALPN
/// protocols `alpn`.
pub fn client_config(
    mode: PqMode,
    roots: RootCertStore,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, QuicError> {
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(crypto_provider(mode)))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// The CA certificates of a PEM file, as trust anchors; an error (its text) when the file
/// cannot be read, holds a bad certificate, or holds none.
pub fn roots_from_pem(path: &std::path::Path) -> Result<RootCertStore, String> {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| e.to_string())? {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    if roots.is_empty() {
        return Err("no CERTIFICATE in the file".to_string());
    }
    Ok(roots)
}

/// A quinn server configuration for `mode` with ALPN `h3`.
pub fn quinn_server_config(
    mode: PqMode,
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<quinn::ServerConfig, QuicError> {
    let tls = server_config(mode, cert_chain, key, &[ALPN_H3])?;
    quinn_server_config_from(tls)
}

/// A quinn server configuration around a rustls one (whose ALPN list is kept as it is).
pub fn quinn_server_config_from(
    tls: rustls::ServerConfig,
) -> Result<quinn::ServerConfig, QuicError> {
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls))?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(quic)))
}

/// A quinn client configuration for `mode` with ALPN `h3`, trusting `roots`.
pub fn quinn_client_config(
    mode: PqMode,
    roots: RootCertStore,
) -> Result<quinn::ClientConfig, QuicError> {
    quinn_client_config_from(client_config(mode, roots, &[ALPN_H3])?)
}

/// A quinn client configuration around a rustls one.
pub fn quinn_client_config_from(
    tls: rustls::ClientConfig,
) -> Result<quinn::ClientConfig, QuicError> {
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls))?;
    Ok(quinn::ClientConfig::new(Arc::new(quic)))
}

/// A certificate and its private key, in DER and PEM.
pub struct SelfSigned {
    /// The certificate (DER).
    pub cert: CertificateDer<'static>,
    /// The private key (PKCS#8 DER).
    pub key: PrivateKeyDer<'static>,
    /// The certificate (PEM).
    pub cert_pem: String,
    /// The private key (PKCS#8 PEM).
    pub key_pem: String,
}

impl std::fmt::Debug for SelfSigned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("SelfSigned")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// A fresh self-signed certificate (ECDSA P-256) for the names `names` (DNS names or IP
/// addresses), valid as its own trust anchor.
pub fn self_signed(names: &[&str]) -> Result<SelfSigned, QuicError> {
    let rcgen::CertifiedKey { cert, signing_key } = rcgen::generate_simple_self_signed(
        names.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
    )?;
    Ok(SelfSigned {
        cert: cert.der().clone(),
        key: PrivateKeyDer::Pkcs8(signing_key.serialize_der().into()),
        cert_pem: cert.pem(),
        key_pem: signing_key.serialize_pem(),
    })
}

#[cfg(test)]
mod tests {
    use rustls::{ClientConnection, NamedGroup, ServerConnection, pki_types::ServerName};

    use super::*;

    #[test]
    fn groups_per_mode() {
        let names = |m| {
            crypto_provider(m)
                .kx_groups
                .iter()
                .map(|g| g.name())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(PqMode::Required), [NamedGroup::X25519MLKEM768]);
        assert_eq!(
            names(PqMode::Preferred),
            [NamedGroup::X25519MLKEM768, NamedGroup::X25519]
        );
        assert_eq!(names(PqMode::Off), [NamedGroup::X25519]);
        assert_eq!(PqMode::default(), PqMode::Preferred);
    }

    #[test]
    fn mode_names() {
        #[derive(Deserialize)]
        struct T {
            pq: PqMode,
        }
        for m in [PqMode::Required, PqMode::Preferred, PqMode::Off] {
            let t: T = toml::from_str(&format!("pq = \"{m}\"")).unwrap();
            assert_eq!(t.pq, m);
        }
        assert!(toml::from_str::<T>("pq = \"maybe\"").is_err());
    }

    /// Runs a handshake in memory and returns the groups both sides negotiated.
    fn handshake(
        client: PqMode,
        server: PqMode,
    ) -> Result<(NamedGroup, NamedGroup), rustls::Error> {
        let id = self_signed(&["localhost"]).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(id.cert.clone()).unwrap();
        let server_config = server_config(server, vec![id.cert], id.key, &[b"test"]).unwrap();
        let client_config = client_config(client, roots, &[b"test"]).unwrap();
        let mut s = ServerConnection::new(Arc::new(server_config)).unwrap();
        let mut c = ClientConnection::new(
            Arc::new(client_config),
            ServerName::try_from("localhost").unwrap(),
        )
        .unwrap();
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() {
                s.read_tls(&mut &buf[..]).unwrap();
                s.process_new_packets()?;
            }
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() {
                c.read_tls(&mut &buf[..]).unwrap();
                c.process_new_packets()?;
            }
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok((
                    c.negotiated_key_exchange_group().unwrap().name(),
                    s.negotiated_key_exchange_group().unwrap().name(),
                ));
            }
        }
        panic!("handshake did not finish");
    }

    #[test]
    fn modes_negotiate_the_expected_group() {
        use PqMode::*;
        let hybrid = NamedGroup::X25519MLKEM768;
        let classical = NamedGroup::X25519;
        for (client, server, group) in [
            (Required, Required, hybrid),
            (Required, Preferred, hybrid),
            (Preferred, Required, hybrid),
            (Preferred, Preferred, hybrid),
            (Preferred, Off, classical),
            (Off, Preferred, classical),
            (Off, Off, classical),
        ] {
            let got = handshake(client, server).unwrap();
            assert_eq!(got, (group, group), "client {client}, server {server}");
        }
        for (client, server) in [(Off, Required), (Required, Off)] {
            let err = handshake(client, server).unwrap_err();
            assert!(
                matches!(
                    err,
                    rustls::Error::PeerIncompatible(rustls::PeerIncompatible::NoKxGroupsInCommon)
                        | rustls::Error::AlertReceived(rustls::AlertDescription::HandshakeFailure)
                ),
                "client {client}, server {server}: {err:?}"
            );
        }
    }

    #[test]
    fn quinn_configs_build() {
        let id = self_signed(&["localhost", "127.0.0.1"]).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(id.cert.clone()).unwrap();
        quinn_server_config(PqMode::Required, vec![id.cert], id.key).unwrap();
        quinn_client_config(PqMode::Required, roots).unwrap();
    }
}
