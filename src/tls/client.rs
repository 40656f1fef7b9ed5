//! Client certificates after the handshake: the verifier wrapper that refuses oversized chains
//! before any signature is checked, and what a connection keeps of its client authentication
//! (the certificate's names and validity, its chain, the verifier that accepted it) so that
//! every request re-checks what the handshake decided: the validity window, and, after a
//! reload changed the client verification, the chain against the new trust anchors.

use super::CertNames;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::sync::Arc;

/// The most intermediate certificates a client may send with its own. Real client chains have
/// one or two; each extra one can cost the path builder several signature checks, so a long
/// chain of bogus intermediates is CPU spent for an unauthenticated client.
pub const MAX_CLIENT_INTERMEDIATES: usize = 8;

/// A client chain with more than [`MAX_CLIENT_INTERMEDIATES`] intermediates.
#[derive(Debug)]
pub struct ChainTooLong;

impl std::fmt::Display for ChainTooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the client sent more than {MAX_CLIENT_INTERMEDIATES} intermediate certificates"
        )
    }
}

impl std::error::Error for ChainTooLong {}

/// rustls's client verifier behind a count of the intermediates: a chain over the cap is
/// refused before the path builder sees it.
#[derive(Debug)]
pub struct CappedClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl CappedClientVerifier {
    /// Caps the chains `inner` is asked to verify.
    pub fn new(inner: Arc<dyn ClientCertVerifier>) -> Self {
        Self { inner }
    }
}

impl ClientCertVerifier for CappedClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if intermediates.len() > MAX_CLIENT_INTERMEDIATES {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(ChainTooLong))),
            ));
        }
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }
}

/// A verified client certificate as a connection keeps it.
#[derive(Debug)]
struct ClientCert {
    /// Its names and validity (and why it no longer counts, once it does not).
    names: CertNames,
    /// The chain the client sent (end entity first), DER, to verify again after a reload.
    chain: Vec<CertificateDer<'static>>,
}

/// What a TLS connection keeps of its client authentication.
#[derive(Debug)]
pub struct ClientAuth {
    /// The client verifier that last accepted this connection (the handshake's, or a later
    /// one that re-verified its chain); `None` when client certificates were not asked for.
    verifier: Option<Arc<dyn ClientCertVerifier>>,
    /// The certificate, when the client presented one (and names could be read from it).
    cert: Option<ClientCert>,
}

/// What the connection does with the next request after [`ClientAuth::recheck`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recheck {
    /// Serve it as usual.
    Serve,
    /// The certificate no longer names anybody (`CertNames::refused` says why): the request
    /// is refused with that reason, and the connection closed after the reply.
    Refused,
    /// Close the connection without serving it: client certificates are now required and this
    /// connection has none.
    Close,
}

impl ClientAuth {
    /// After a handshake with `verifier` (the configuration's client verifier, if any):
    /// `chain` is what the client presented and rustls verified.
    pub fn new(
        verifier: Option<Arc<dyn ClientCertVerifier>>,
        chain: Option<&[CertificateDer<'_>]>,
    ) -> Self {
        let cert = chain.and_then(|chain| {
            let names = CertNames::from_der(chain.first()?)?;
            Some(ClientCert {
                names,
                chain: chain.iter().map(|c| c.clone().into_owned()).collect(),
            })
        });
        Self { verifier, cert }
    }

    /// The certificate's names, for the mTLS provider.
    pub fn names(&self) -> Option<&CertNames> {
        self.cert.as_ref().map(|c| &c.names)
    }

    /// Checks, before a request, that the handshake's decision still holds: the certificate
    /// is inside its validity window at `now` (Unix seconds), and, when the configuration's
    /// client verifier is no longer the one that accepted it (a reload), the chain verifies
    /// with the current one. Refusals stick: once refused, the connection ends after the reply.
    pub fn recheck(&mut self, current: Option<&Arc<dyn ClientCertVerifier>>, now: i64) -> Recheck {
        match self.check(current, now) {
            Check::Unchanged => Recheck::Serve,
            Check::Admitted => {
                self.verifier = current.cloned();
                Recheck::Serve
            }
            // Client certificates are no longer verified at all: nothing vouches for this one
            // now, so it counts as absent (the request goes on down the chain).
            Check::Unverified => {
                self.cert = None;
                self.verifier = None;
                Recheck::Serve
            }
            Check::Refused(why) => {
                if let Some(cert) = &mut self.cert {
                    cert.names.refused = Some(why);
                }
                Recheck::Refused
            }
            Check::Close => Recheck::Close,
        }
    }

    /// Whether the certificate is outside its validity window at `now`.
    pub fn expired(&self, now: i64) -> bool {
        self.cert.as_ref().is_some_and(|c| {
            c.names.refused.is_some() || now < c.names.valid_from || now > c.names.valid_until
        })
    }

    /// Whether a response stream opened on this connection may go on under the client verifier
    /// `current` (a reload happened since it opened): [`ClientAuth::recheck`] without changing
    /// anything, since the connection's next request checks again anyway.
    pub fn still_admitted(&self, current: Option<&Arc<dyn ClientCertVerifier>>, now: i64) -> bool {
        matches!(
            self.check(current, now),
            Check::Unchanged | Check::Admitted
        )
    }

    fn check(&self, current: Option<&Arc<dyn ClientCertVerifier>>, now: i64) -> Check {
        if let Some(cert) = &self.cert {
            if let Some(why) = cert.names.refused {
                return Check::Refused(why);
            }
            if now < cert.names.valid_from {
                return Check::Refused("mtls_certificate_not_yet_valid");
            }
            if now > cert.names.valid_until {
                return Check::Refused("mtls_certificate_expired");
            }
        }
        let unchanged = match (&self.verifier, current) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if unchanged {
            return Check::Unchanged;
        }
        match (&self.cert, current) {
            (Some(_), None) => Check::Unverified,
            (Some(cert), Some(verifier)) => {
                let Some((end_entity, intermediates)) = cert.chain.split_first() else {
                    return Check::Refused("mtls_revoked");
                };
                let now = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                    u64::try_from(now).unwrap_or(0),
                ));
                match verifier.verify_client_cert(end_entity, intermediates, now) {
                    Ok(_) => Check::Admitted,
                    Err(_) => Check::Refused("mtls_revoked"),
                }
            }
            (None, Some(verifier)) if verifier.client_auth_mandatory() => Check::Close,
            (None, _) => Check::Admitted,
        }
    }
}

/// What [`ClientAuth::check`] found.
enum Check {
    /// The verifier that accepted the connection is still the configuration's.
    Unchanged,
    /// A new verifier that accepts the connection too.
    Admitted,
    /// Client certificates are no longer verified: the certificate vouches for nothing.
    Unverified,
    /// The certificate no longer names anybody, for this reason.
    Refused(&'static str),
    /// Certificates are now required and the connection has none.
    Close,
}
