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
        matches!(self.check(current, now), Check::Unchanged | Check::Admitted)
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

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

    fn ca(name: &str) -> (CertificateDer<'static>, Issuer<'static, KeyPair>) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        let cert = p.self_signed(&key).unwrap();
        (cert.der().clone(), Issuer::new(p, key))
    }

    fn client(issuer: &Issuer<'static, KeyPair>) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, "alice");
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        p.signed_by(&key, issuer).unwrap().der().clone()
    }

    fn verifier(cas: &[&CertificateDer<'static>], required: bool) -> Arc<dyn ClientCertVerifier> {
        let mut roots = rustls::RootCertStore::empty();
        for ca in cas {
            roots.add((*ca).clone()).unwrap();
        }
        let b = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.into(),
            Arc::new(rustls::crypto::ring::default_provider()),
        );
        let b = if required {
            b
        } else {
            b.allow_unauthenticated()
        };
        Arc::new(CappedClientVerifier::new(b.build().unwrap()))
    }

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    #[test]
    fn a_reload_is_checked_against_the_new_verifier_and_refusals_stick() {
        let (a, issuer_a) = ca("A");
        let (b, issuer_b) = ca("B");
        let both = verifier(&[&a, &b], false);
        let from_b = client(&issuer_b);
        let mut auth = ClientAuth::new(Some(both.clone()), Some(std::slice::from_ref(&from_b)));
        assert_eq!(auth.recheck(Some(&both), now()), Recheck::Serve);
        assert!(!auth.expired(now()));
        let only_a = verifier(&[&a], false);
        // A stream only asks; the connection's next request decides, and the refusal sticks.
        assert!(!auth.still_admitted(Some(&only_a), now()));
        assert!(auth.still_admitted(Some(&both), now()));
        assert_eq!(auth.recheck(Some(&only_a), now()), Recheck::Refused);
        assert_eq!(auth.names().unwrap().refused, Some("mtls_revoked"));
        assert_eq!(auth.recheck(Some(&both), now()), Recheck::Refused);
        // A certificate the new verifier accepts goes on, and is not verified again after.
        let from_a = client(&issuer_a);
        let mut auth = ClientAuth::new(Some(both.clone()), Some(&[from_a]));
        assert_eq!(auth.recheck(Some(&only_a), now()), Recheck::Serve);
        assert!(Arc::ptr_eq(auth.verifier.as_ref().unwrap(), &only_a));
        // Client verification switched off: the certificate vouches for nothing any more.
        assert_eq!(auth.recheck(None, now()), Recheck::Serve);
        assert!(auth.names().is_none());
    }

    #[test]
    fn without_a_certificate_a_switch_to_required_closes_and_validity_is_checked() {
        let (a, issuer_a) = ca("A");
        let optional = verifier(&[&a], false);
        let mut none = ClientAuth::new(Some(optional.clone()), None);
        assert!(none.still_admitted(Some(&verifier(&[&a], false)), now()));
        assert_eq!(
            none.recheck(Some(&verifier(&[&a], true)), now()),
            Recheck::Close
        );
        let cert = client(&issuer_a);
        let mut auth = ClientAuth::new(Some(optional.clone()), Some(&[cert]));
        let names = auth.names().unwrap().clone();
        assert!(auth.expired(names.valid_until + 1));
        assert!(auth.expired(names.valid_from - 1));
        assert_eq!(
            auth.recheck(Some(&optional), names.valid_until + 1),
            Recheck::Refused
        );
        assert_eq!(
            auth.names().unwrap().refused,
            Some("mtls_certificate_expired")
        );
        // Not a certificate at all: no names, so nothing to keep.
        let junk = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        assert!(
            ClientAuth::new(Some(optional), Some(&[junk]))
                .names()
                .is_none()
        );
    }

    #[test]
    fn more_than_eight_intermediates_are_refused_before_verification() {
        let (a, issuer_a) = ca("A");
        let v = verifier(&[&a], true);
        let leaf = client(&issuer_a);
        let bogus: Vec<_> = (0..=MAX_CLIENT_INTERMEDIATES).map(|_| ca("A").0).collect();
        let at = UnixTime::now();
        let err = v.verify_client_cert(&leaf, &bogus, at).unwrap_err();
        let e = std::io::Error::new(std::io::ErrorKind::InvalidData, err);
        assert_eq!(
            super::super::certificate_refusal(&e),
            Some("mtls_chain_too_long")
        );
        assert!(
            v.verify_client_cert(&leaf, &bogus[..MAX_CLIENT_INTERMEDIATES], at)
                .is_ok()
        );
    }
}
