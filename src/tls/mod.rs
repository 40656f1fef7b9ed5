//! Native TLS on the data-plane listener: the rustls server configuration built from
//! `[server.tls]` at every config load (so a reload with a new certificate takes effect for new
//! handshakes, and a bad file keeps the old configuration), the handshake on a worker, the
//! stream the connection loop reads through ([`stream`]), and the names a verified client
//! certificate carries ([`identity`]), and what a connection keeps of its client
//! authentication to check it again on every request ([`client`]).
//!
//! rustls on the ring provider only: one crypto library in the process, TLS 1.2 and 1.3, ALPN
//! `http/1.1`.

pub mod client;
pub mod identity;
pub mod stream;

use crate::config::schema::{ClientAuth, TlsSection};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

pub use identity::CertNames;
pub use stream::TlsStream;

/// `[server.tls]`, validated: what every new handshake uses.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// The rustls configuration (certificate, key, client verification, ALPN).
    pub config: Arc<rustls::ServerConfig>,
    /// Whether client certificates are verified (`client_ca_path` is set).
    pub verifies_clients: bool,
    /// The client verifier inside `config`, when clients are verified: a connection compares
    /// it with the one that accepted its handshake to notice a reload that changed it.
    pub client_verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
}

/// What the connection layer knows about a client, handed to the pipeline with each request:
/// its address and, over mTLS, the names of its verified certificate (computed once per
/// connection, after the handshake).
#[derive(Debug, Clone, Copy)]
pub struct Peer<'a> {
    /// The client's address.
    pub addr: SocketAddr,
    /// The verified client certificate's names, when one was presented and verified.
    pub cert: Option<&'a CertNames>,
    /// Over TLS, the connection's client authentication, for a long response to check that
    /// it still holds.
    pub client: Option<&'a client::ClientAuth>,
}

impl<'a> Peer<'a> {
    /// A client on plain TCP, or over TLS without a client certificate.
    pub fn plain(addr: SocketAddr) -> Self {
        Self {
            addr,
            cert: None,
            client: None,
        }
    }

    /// A client on a connection whose client authentication is `client` (`None`: plain TCP).
    pub fn of(addr: SocketAddr, client: Option<&'a client::ClientAuth>) -> Self {
        Self {
            addr,
            cert: client.and_then(|c| c.names()),
            client,
        }
    }

    /// The client's IP address.
    pub fn ip(&self) -> IpAddr {
        self.addr.ip()
    }
}

/// Why a failed handshake refused the client's certificate, as the audit trail says it; `None`
/// when the handshake failed for another reason (not TLS at all, a protocol error, a reset),
/// which is no authentication attempt.
pub fn certificate_refusal(e: &std::io::Error) -> Option<&'static str> {
    use rustls::{CertificateError, Error};
    match e.get_ref()?.downcast_ref::<Error>()? {
        Error::NoCertificatesPresented => Some("mtls_no_certificate"),
        Error::InvalidCertificate(CertificateError::Expired)
        | Error::InvalidCertificate(CertificateError::ExpiredContext { .. }) => {
            Some("mtls_certificate_expired")
        }
        Error::InvalidCertificate(CertificateError::NotValidYet)
        | Error::InvalidCertificate(CertificateError::NotValidYetContext { .. }) => {
            Some("mtls_certificate_not_yet_valid")
        }
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => Some("mtls_unknown_issuer"),
        Error::InvalidCertificate(CertificateError::Other(other))
            if other.0.downcast_ref::<client::ChainTooLong>().is_some() =>
        {
            Some("mtls_chain_too_long")
        }
        Error::InvalidCertificate(_) => Some("mtls_invalid_certificate"),
        _ => None,
    }
}

/// Whether a failed handshake was refused for a handshake message over rustls's size limit:
/// with client verification on, that is in practice an oversized client certificate chain
/// (no real ClientHello comes near the limit), so it is counted and audited as a refused
/// certificate.
pub fn oversized_handshake(e: &std::io::Error) -> bool {
    use rustls::{Error, InvalidMessage};
    e.get_ref()
        .and_then(|e| e.downcast_ref::<Error>())
        .is_some_and(|e| {
            matches!(
                e,
                Error::InvalidMessage(InvalidMessage::HandshakePayloadTooLarge)
                    | Error::InvalidMessage(InvalidMessage::MessageTooLarge)
            )
        })
}

/// The ring provider, which is the only one this build links.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the server configuration from `[server.tls]`. Errors name the key at fault and say
/// what is wrong with its file, never the file's contents.
pub fn build(t: &TlsSection) -> Result<TlsSettings, (&'static str, String)> {
    let certs = read_certs(&t.cert_path).map_err(|e| ("server.tls.cert_path", e))?;
    let key = read_key(&t.key_path).map_err(|e| ("server.tls.key_path", e))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| ("server.tls", e.to_string()))?;
    let mut client_verifier = None;
    let builder = match &t.client_ca_path {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs(path).map_err(|e| ("server.tls.client_ca_path", e))? {
                roots.add(cert).map_err(|e| {
                    (
                        "server.tls.client_ca_path",
                        format!("`{path}` holds a certificate that is not a usable CA: {e}"),
                    )
                })?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots.into(),
                provider(),
            );
            let verifier = match t.client_auth {
                ClientAuth::Required => verifier,
                ClientAuth::Optional => verifier.allow_unauthenticated(),
            };
            let verifier = verifier
                .build()
                .map_err(|e| ("server.tls.client_ca_path", e.to_string()))?;
            let verifier: Arc<dyn rustls::server::danger::ClientCertVerifier> =
                Arc::new(client::CappedClientVerifier::new(verifier));
            client_verifier = Some(verifier.clone());
            builder.with_client_cert_verifier(verifier)
        }
    };
    // `with_single_cert` checks that the key belongs to the first certificate.
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        (
            "server.tls.key_path",
            format!("`{}` cannot serve `{}`: {e}", t.key_path, t.cert_path),
        )
    })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsSettings {
        config: Arc::new(config),
        verifies_clients: t.client_ca_path.is_some(),
        client_verifier,
    })
}

/// The certificates of a PEM file, in file order; at least one.
fn read_certs(path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read `{path}`: {e}"))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("`{path}` is not valid PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!("`{path}` holds no PEM certificate"));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
fn read_key(path: &str) -> Result<PrivateKeyDer<'static>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read `{path}`: {e}"))?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| format!("`{path}` holds no usable PEM private key: {e}"))
}
