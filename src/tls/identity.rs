//! The names a verified client certificate carries (subject CN, first SAN DNS name, e-mail and
//! URI), read once per connection right after the handshake, for the mTLS provider to choose
//! from (`[auth.mtls] identity_source`).
//!
//! Parsed with `x509-parser` (without its `verify` feature: rustls has already verified the
//! chain with ring, this only reads names). Only the fields are read here; whether a value is
//! acceptable as an identity is the provider's decision (`auth::mtls`).

use x509_parser::extensions::GeneralName;

/// The longest name kept from a certificate; a longer one is as good as absent (the provider
/// refuses identities longer than a JWT subject may be anyway).
const MAX_NAME_BYTES: usize = 1024;

/// The identity-bearing names of one certificate. A field is `None` when the certificate does
/// not carry it (or carries it in a form that cannot be read as text).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertNames {
    /// The subject's common name (only when the subject has exactly one).
    pub cn: Option<Box<str>>,
    /// The first DNS subject alternative name.
    pub san_dns: Option<Box<str>>,
    /// The first e-mail (RFC 822) subject alternative name.
    pub san_email: Option<Box<str>>,
    /// The first URI subject alternative name (a SPIFFE id, for instance).
    pub san_uri: Option<Box<str>>,
    /// The certificate's validity window (notBefore, notAfter), in Unix seconds: checked on
    /// every request, since a resumed session or a keep-alive connection outlives the
    /// handshake that checked it.
    pub valid_from: i64,
    /// See `valid_from`.
    pub valid_until: i64,
    /// Why the certificate no longer names anybody on this connection (it expired, or a reload
    /// no longer trusts its chain); set by [`super::client::ClientAuth::recheck`].
    pub refused: Option<&'static str>,
}

impl CertNames {
    /// The names in a DER certificate; `None` when it does not parse (rustls accepted it, so
    /// that would be a parser disagreement: the connection then has no certificate identity).
    pub fn from_der(der: &[u8]) -> Option<CertNames> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let keep = |s: &str| (s.len() <= MAX_NAME_BYTES).then(|| Box::<str>::from(s));
        let mut names = CertNames {
            valid_from: cert.validity().not_before.timestamp(),
            valid_until: cert.validity().not_after.timestamp(),
            ..CertNames::default()
        };
        // Two CNs would be two claims to one identity: neither is taken.
        let mut cns = cert.subject().iter_common_name();
        if let (Some(cn), None) = (cns.next(), cns.next()) {
            names.cn = cn.as_str().ok().and_then(keep);
        }
        // A certificate with two SAN extensions is malformed (RFC 5280 §4.2): no SAN names.
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                let (field, value) = match name {
                    GeneralName::DNSName(v) => (&mut names.san_dns, *v),
                    GeneralName::RFC822Name(v) => (&mut names.san_email, *v),
                    GeneralName::URI(v) => (&mut names.san_uri, *v),
                    _ => continue,
                };
                if field.is_none() {
                    *field = keep(value);
                }
            }
        }
        Some(names)
    }
}
