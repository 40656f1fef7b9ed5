//! JWT verification, pure: turns a JWKS document or an HS256 secret into ring verification keys
//! once, and checks a compact JWS token against them and a set of [`Rules`]. No I/O, no clock,
//! no config parsing: the caller passes the time, fetches the JWKS and maps errors to responses.
//!
//! Everything here treats the token as hostile. The order of [`verify`] is fixed and each step
//! only looks at what the previous ones vouched for:
//!
//! 1. size bound, before any decoding;
//! 2. three strict base64url parts (no padding, no stray bits, nothing else);
//! 3. header: a JSON object without duplicate members; `alg` allowed by the rules; no header
//!    that asks us to fetch or trust a key (`jku`, `x5u`, `jwk`, `x5c`), no `crit`;
//! 4. key choice by `kid` and by key type, so the algorithm can never be used with a key of
//!    another family (HS256 "signed" with an RSA public key is the classic confusion attack);
//! 5. the signature, with ring;
//! 6. only then the claims: JSON object without duplicates, every registered claim of the
//!    right JSON type (a wrong type is a rejection, never "absent"), then times, issuer,
//!    audience, identity and scopes.

use base64::Engine as _;
use ring::signature::{self, RsaParameters, RsaPublicKeyComponents, UnparsedPublicKey};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};
use std::fmt;

/// The largest JWKS document accepted.
pub const MAX_JWKS_BYTES: usize = 1 << 20;
/// The most keys (usable or not) a JWKS document may list.
pub const MAX_JWKS_KEYS: usize = 100;
/// RSA modulus bounds, in bits: below 2048 is breakable or close to it; above 8192 is not
/// something an IdP issues and only makes each verification slower (ring refuses it anyway).
pub const RSA_MIN_BITS: usize = 2048;
/// See [`RSA_MIN_BITS`].
pub const RSA_MAX_BITS: usize = 8192;
/// The shortest HS256 secret accepted: RFC 7518 §3.2 asks for a key at least as long as the
/// hash output (256 bits).
pub const HMAC_MIN_SECRET: usize = 32;
/// Default [`Rules::max_token_bytes`].
pub const DEFAULT_MAX_TOKEN_BYTES: usize = 8 * 1024;
/// The longest identity accepted from [`Rules::user_id_claim`].
pub const MAX_IDENTITY_BYTES: usize = 256;
/// How many keys a token may be tried against. Without a `kid` every key of the right type is
/// a candidate; RSA verification costs tens of microseconds, so an unbounded list would let
/// one request buy many of them. More candidates than this and the token must carry a `kid`.
pub const MAX_CANDIDATE_KEYS: usize = 4;

/// A JWS algorithm this module verifies. `none` is deliberately not one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// HMAC with SHA-256 (a shared secret).
    HS256,
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RS256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    RS384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    RS512,
    /// RSASSA-PSS with SHA-256 (MGF1 SHA-256, salt of 32 bytes).
    PS256,
    /// RSASSA-PSS with SHA-384.
    PS384,
    /// RSASSA-PSS with SHA-512.
    PS512,
    /// ECDSA on P-256 with SHA-256, signature as fixed-width r||s.
    ES256,
    /// ECDSA on P-384 with SHA-384, signature as fixed-width r||s.
    ES384,
    /// EdDSA; only Ed25519 keys are accepted.
    EdDSA,
}

impl Algorithm {
    /// Every algorithm, in a fixed order.
    pub const ALL: [Algorithm; 10] = [
        Algorithm::HS256,
        Algorithm::RS256,
        Algorithm::RS384,
        Algorithm::RS512,
        Algorithm::PS256,
        Algorithm::PS384,
        Algorithm::PS512,
        Algorithm::ES256,
        Algorithm::ES384,
        Algorithm::EdDSA,
    ];

    /// The algorithm a JOSE `alg` value names. Exact, case-sensitive match (RFC 7515 §4.1.1
    /// says the value is case-sensitive); `none` and anything unknown is `None`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }

    /// The JOSE name.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::HS256 => "HS256",
            Algorithm::RS256 => "RS256",
            Algorithm::RS384 => "RS384",
            Algorithm::RS512 => "RS512",
            Algorithm::PS256 => "PS256",
            Algorithm::PS384 => "PS384",
            Algorithm::PS512 => "PS512",
            Algorithm::ES256 => "ES256",
            Algorithm::ES384 => "ES384",
            Algorithm::EdDSA => "EdDSA",
        }
    }

    /// ring's parameters for the RSA algorithms. The 2048..8192 variants: ring itself then
    /// refuses a shorter modulus even if one got past the JWKS bound.
    fn rsa_params(self) -> Option<&'static RsaParameters> {
        Some(match self {
            Algorithm::RS256 => &signature::RSA_PKCS1_2048_8192_SHA256,
            Algorithm::RS384 => &signature::RSA_PKCS1_2048_8192_SHA384,
            Algorithm::RS512 => &signature::RSA_PKCS1_2048_8192_SHA512,
            Algorithm::PS256 => &signature::RSA_PSS_2048_8192_SHA256,
            Algorithm::PS384 => &signature::RSA_PSS_2048_8192_SHA384,
            Algorithm::PS512 => &signature::RSA_PSS_2048_8192_SHA512,
            _ => return None,
        })
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An elliptic curve a JWKS key may be on. The curve fixes the algorithm (RFC 7518 §3.4):
/// P-256 only with ES256, P-384 only with ES384.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Curve {
    P256,
    P384,
}

/// Verification material, already in the form ring takes.
enum Material {
    /// An HS256 secret (only from [`hmac_key`], never from a JWKS).
    Hmac(ring::hmac::Key),
    /// An RSA public key. ring 0.17 has no pre-parsed RSA public key type for verification, so
    /// the checked, leading-zero-free components are kept and handed to ring as they are.
    Rsa {
        components: RsaPublicKeyComponents<Vec<u8>>,
        bits: usize,
    },
    /// An ECDSA public key as an uncompressed point, bound to its curve's fixed-width
    /// (JOSE r||s) algorithm.
    Ec {
        curve: Curve,
        key: UnparsedPublicKey<Vec<u8>>,
    },
    /// An Ed25519 public key.
    Ed25519(UnparsedPublicKey<Vec<u8>>),
}

impl Material {
    /// Whether a token of `alg` may be checked with this key. This is the defence against
    /// algorithm confusion: the token's `alg` picks ring's algorithm, and this match makes
    /// sure that algorithm belongs to the key's family, whatever the token says.
    fn fits(&self, alg: Algorithm) -> bool {
        match self {
            Material::Hmac(_) => alg == Algorithm::HS256,
            Material::Rsa { .. } => alg.rsa_params().is_some(),
            Material::Ec { curve, .. } => matches!(
                (curve, alg),
                (Curve::P256, Algorithm::ES256) | (Curve::P384, Algorithm::ES384)
            ),
            Material::Ed25519(_) => alg == Algorithm::EdDSA,
        }
    }

    fn kind(&self) -> String {
        match self {
            Material::Hmac(_) => "HMAC".into(),
            Material::Rsa { bits, .. } => format!("RSA-{bits}"),
            Material::Ec {
                curve: Curve::P256, ..
            } => "EC P-256".into(),
            Material::Ec {
                curve: Curve::P384, ..
            } => "EC P-384".into(),
            Material::Ed25519(_) => "Ed25519".into(),
        }
    }

    /// Checks `sig` over `signed` with `alg`; the caller has checked [`Material::fits`].
    fn verify(&self, alg: Algorithm, signed: &[u8], sig: &[u8]) -> bool {
        match self {
            // ring compares the tags in constant time.
            Material::Hmac(key) => ring::hmac::verify(key, signed, sig).is_ok(),
            Material::Rsa { components, .. } => match alg.rsa_params() {
                Some(params) => components.verify(params, signed, sig).is_ok(),
                None => false,
            },
            Material::Ec { key, .. } | Material::Ed25519(key) => key.verify(signed, sig).is_ok(),
        }
    }
}

/// One usable key.
struct Key {
    kid: Option<String>,
    /// The JWK's `alg`, when it named one: the key is then used for that algorithm only.
    alg: Option<Algorithm>,
    material: Material,
}

impl Key {
    fn fits(&self, alg: Algorithm) -> bool {
        self.alg.is_none_or(|a| a == alg) && self.material.fits(alg)
    }
}

/// Verification keys: either the keys of a JWKS document or one HS256 secret, never both, so
/// a public key can never be reached by an HMAC token.
pub struct KeySet {
    keys: Vec<Key>,
    /// An HS256 secret has no `kid`: a token's `kid` is ignored for it.
    hmac: bool,
}

// Written by hand so that no secret and no key bytes ever reach a log.
impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        for k in &self.keys {
            list.entry(&format_args!(
                "{} kid={:?} alg={:?}",
                k.material.kind(),
                k.kid,
                k.alg.map(Algorithm::name)
            ));
        }
        list.finish()
    }
}

impl Default for KeySet {
    /// No key: every token is refused (a JWKS not fetched yet).
    fn default() -> Self {
        KeySet {
            keys: Vec::new(),
            hmac: false,
        }
    }
}

impl KeySet {
    /// Number of usable keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there are no keys (never true for a set this module built).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The `kid`s of the keys, in document order (`None` for a key without one).
    pub fn kids(&self) -> impl Iterator<Item = Option<&str>> {
        self.keys.iter().map(|k| k.kid.as_deref())
    }

    /// Builds the usable keys of an RFC 7517 JWK Set (`{"keys":[...]}`).
    ///
    /// Keys this module cannot or must not use are skipped: an unknown `kty` or curve, `oct`
    /// (a symmetric key published in a JWKS is readable by anyone, so honouring it would let
    /// anyone mint HS256 tokens), `use` other than `sig`, `key_ops` without `verify`, an `alg`
    /// we do not verify or that does not fit the key, an RSA modulus outside 2048..=8192 bits
    /// or an exponent ring refuses. The whole document is refused when it is too large, has too
    /// many keys, is not JSON with unique member names, or when a key we would use has a member
    /// of the wrong type or bytes that are not strict base64url: a half-readable document is a
    /// broken IdP or a tampered response, and the caller keeps its previous keys instead.
    /// A document with no usable key at all is refused too, so the operator hears about it,
    /// except an explicitly empty `keys` list: that is an IdP revoking every key, and it is
    /// honoured (every token is then refused).
    pub fn from_jwks(json: &[u8]) -> Result<KeySet, String> {
        if json.len() > MAX_JWKS_BYTES {
            return Err(format!(
                "JWKS document is {} bytes, over the {MAX_JWKS_BYTES}-byte limit",
                json.len()
            ));
        }
        let doc = parse_object(json).map_err(|e| format!("JWKS document: {e}"))?;
        let Some(list) = doc.get("keys") else {
            return Err("JWKS document has no `keys` member".into());
        };
        let Value::Array(list) = list else {
            return Err("JWKS `keys` is not an array".into());
        };
        if list.len() > MAX_JWKS_KEYS {
            return Err(format!(
                "JWKS lists {} keys, over the limit of {MAX_JWKS_KEYS}",
                list.len()
            ));
        }
        let mut keys = Vec::new();
        for (i, jwk) in list.iter().enumerate() {
            let Value::Object(jwk) = jwk else {
                return Err(format!("JWKS key #{i} is not an object"));
            };
            if let Some(key) = parse_jwk(jwk).map_err(|e| format!("JWKS key #{i}: {e}"))? {
                keys.push(key);
            }
        }
        if keys.is_empty() && !list.is_empty() {
            return Err("JWKS has no key usable for signature verification".into());
        }
        Ok(KeySet { keys, hmac: false })
    }
}

/// An HS256 key set from a shared secret of at least [`HMAC_MIN_SECRET`] bytes.
pub fn hmac_key(secret: &[u8]) -> Result<KeySet, String> {
    if secret.len() < HMAC_MIN_SECRET {
        // The length only, never the secret.
        return Err(format!(
            "HS256 secret is {} bytes; at least {HMAC_MIN_SECRET} are required",
            secret.len()
        ));
    }
    Ok(KeySet {
        keys: vec![Key {
            kid: None,
            alg: Some(Algorithm::HS256),
            material: Material::Hmac(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret)),
        }],
        hmac: true,
    })
}

/// A member that must be a string when present.
fn opt_str<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>, String> {
    match obj.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("`{name}` is not a string")),
    }
}

/// A required base64url member, decoded.
fn b64_member(obj: &Map<String, Value>, name: &str) -> Result<Vec<u8>, String> {
    let s = opt_str(obj, name)?.ok_or_else(|| format!("no `{name}`"))?;
    b64url(s).ok_or_else(|| format!("`{name}` is not base64url without padding"))
}

/// Drops leading zero bytes: JWKs should not have them (RFC 7518 §6.3.1.1) but some do, and
/// ring wants the minimal big-endian form.
fn strip_zeros(mut b: &[u8]) -> &[u8] {
    while let [0, rest @ ..] = b {
        b = rest;
    }
    b
}

fn bit_len(b: &[u8]) -> usize {
    match b.first() {
        None => 0,
        Some(top) => b.len() * 8 - top.leading_zeros() as usize,
    }
}

/// One JWK: `Ok(None)` when it is to be skipped, `Err` when the document must be refused.
fn parse_jwk(jwk: &Map<String, Value>) -> Result<Option<Key>, String> {
    let kty = opt_str(jwk, "kty")?.ok_or("no `kty`")?;
    let kid = opt_str(jwk, "kid")?.map(str::to_owned);
    // Encryption keys are not ours to use for signatures (RFC 7517 §4.2).
    match opt_str(jwk, "use")? {
        None | Some("sig") => {}
        Some(_) => return Ok(None),
    }
    // key_ops, when present, must allow verification (RFC 7517 §4.3).
    match jwk.get("key_ops") {
        None => {}
        Some(Value::Array(ops)) if ops.iter().any(|op| op.as_str() == Some("verify")) => {}
        Some(Value::Array(_)) => return Ok(None),
        Some(_) => return Err("`key_ops` is not an array".into()),
    }
    // An `alg` we do not verify (RSA-OAEP, ES512, none...) means the key is not for us.
    let alg = match opt_str(jwk, "alg")? {
        None => None,
        Some(name) => match Algorithm::from_name(name) {
            Some(a) => Some(a),
            None => return Ok(None),
        },
    };
    let material = match kty {
        "RSA" => {
            let n = b64_member(jwk, "n")?;
            let e = b64_member(jwk, "e")?;
            let (n, e) = (strip_zeros(&n), strip_zeros(&e));
            let bits = bit_len(n);
            if !(RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits) {
                return Ok(None);
            }
            // ring accepts odd exponents from 3 up to 33 bits; anything else could never
            // verify, so the key is skipped here rather than failing every token later.
            let e_bits = bit_len(e);
            if !(2..=33).contains(&e_bits) || e.last().is_none_or(|b| b & 1 == 0) {
                return Ok(None);
            }
            Material::Rsa {
                components: RsaPublicKeyComponents {
                    n: n.to_vec(),
                    e: e.to_vec(),
                },
                bits,
            }
        }
        "EC" => {
            let (curve, len, verifier): (_, _, &'static dyn signature::VerificationAlgorithm) =
                match opt_str(jwk, "crv")?.ok_or("EC key without `crv`")? {
                    "P-256" => (Curve::P256, 32, &signature::ECDSA_P256_SHA256_FIXED),
                    "P-384" => (Curve::P384, 48, &signature::ECDSA_P384_SHA384_FIXED),
                    _ => return Ok(None),
                };
            let x = b64_member(jwk, "x")?;
            let y = b64_member(jwk, "y")?;
            // Coordinates are full-length octet strings (RFC 7518 §6.2.1.2).
            if x.len() != len || y.len() != len {
                return Err(format!("EC coordinates are not {len} bytes"));
            }
            let mut point = Vec::with_capacity(1 + 2 * len);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            Material::Ec {
                curve,
                key: UnparsedPublicKey::new(verifier, point),
            }
        }
        "OKP" => {
            if opt_str(jwk, "crv")?.ok_or("OKP key without `crv`")? != "Ed25519" {
                return Ok(None);
            }
            let x = b64_member(jwk, "x")?;
            if x.len() != 32 {
                return Err("Ed25519 `x` is not 32 bytes".into());
            }
            Material::Ed25519(UnparsedPublicKey::new(&signature::ED25519, x))
        }
        // `oct` included: see from_jwks.
        _ => return Ok(None),
    };
    if alg.is_some_and(|a| !material.fits(a)) {
        return Ok(None);
    }
    Ok(Some(Key { kid, alg, material }))
}

/// What a token must satisfy besides its signature.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Algorithms accepted; an empty list accepts nothing.
    pub algorithms: Vec<Algorithm>,
    /// When set, `iss` must be present and equal to it, byte for byte.
    pub issuer: Option<String>,
    /// When set, `aud` must be present and be this string or an array containing it.
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
    /// The claim the caller's identity is read from (a non-empty string of at most
    /// [`MAX_IDENTITY_BYTES`] bytes without control characters).
    pub user_id_claim: String,
    /// The claim scopes are read from: a space-separated string or an array of strings.
    pub scopes_claim: String,
    /// Longest token accepted, in bytes; checked before anything is decoded.
    pub max_token_bytes: usize,
}

impl Default for Rules {
    /// No algorithm (the caller must choose), no issuer or audience rule, 60 s leeway, identity
    /// from `sub`, scopes from `scope` (RFC 9068 / RFC 8693), 8 KiB tokens.
    fn default() -> Self {
        Self {
            algorithms: Vec::new(),
            issuer: None,
            audience: None,
            leeway_secs: 60,
            user_id_claim: "sub".into(),
            scopes_claim: "scope".into(),
            max_token_bytes: DEFAULT_MAX_TOKEN_BYTES,
        }
    }
}

/// What a valid token says.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    /// The identity, from [`Rules::user_id_claim`].
    pub subject: String,
    /// Scopes from [`Rules::scopes_claim`] (empty when the claim is absent).
    pub scopes: Vec<String>,
    /// `exp`, in whole seconds (a fractional `exp` is rounded down). Always present: a token
    /// without `exp` is refused. A verified-token cache drops the entry at this time.
    pub expires_at: u64,
    /// The header's `kid`, if any.
    pub kid: Option<String>,
    /// The algorithm the token was verified with.
    pub algorithm: Algorithm,
    /// All claims, for policy that looks beyond identity and scopes.
    pub claims: Map<String, Value>,
}

/// Why a token was refused. [`JwtError::reason`] is a stable label for audit and metrics;
/// `Display` says what was wrong without repeating anything from the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtError {
    /// Not three strict base64url parts, or a part is not a JSON object with unique members.
    Malformed,
    /// Longer than [`Rules::max_token_bytes`].
    TooLarge,
    /// `alg` is `none`, unknown, or not in [`Rules::algorithms`].
    AlgNotAllowed,
    /// No configured key is of the family the token's `alg` needs (or its JWK `alg` says
    /// otherwise). Not a reason to refresh the JWKS: this is what an HS256-with-the-public-key
    /// forgery looks like.
    KeyMismatch,
    /// The token names a `kid` no key has. The caller may refresh the JWKS (rate-limited) and
    /// retry: this is what a key rotation at the IdP looks like.
    UnknownKid,
    /// More than [`MAX_CANDIDATE_KEYS`] keys fit a token; it must carry a `kid`.
    AmbiguousKey,
    /// The signature does not verify with any candidate key.
    BadSignature,
    /// `exp` has passed (with leeway).
    Expired,
    /// `nbf` is still ahead (with leeway).
    NotYetValid,
    /// `iss` differs from [`Rules::issuer`].
    WrongIssuer,
    /// `aud` does not contain [`Rules::audience`].
    WrongAudience,
    /// A claim has the wrong JSON type (the claim's name, from the registered set or the
    /// rules, never from the token).
    ClaimType(String),
    /// A required claim is absent (named as for `ClaimType`).
    MissingClaim(String),
    /// The identity claim is empty, too long or has control characters.
    BadIdentity,
    /// The header has `crit`: we implement no extension, so every critical one is unknown.
    Crit,
    /// A header member is refused (the static text says which and why).
    Header(&'static str),
}

impl JwtError {
    /// A stable label for audit and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            JwtError::Malformed => "jwt_malformed",
            JwtError::TooLarge => "jwt_too_large",
            JwtError::AlgNotAllowed => "jwt_alg_not_allowed",
            JwtError::KeyMismatch => "jwt_key_mismatch",
            JwtError::UnknownKid => "jwt_unknown_kid",
            JwtError::AmbiguousKey => "jwt_ambiguous_key",
            JwtError::BadSignature => "jwt_bad_signature",
            JwtError::Expired => "jwt_expired",
            JwtError::NotYetValid => "jwt_not_yet_valid",
            JwtError::WrongIssuer => "jwt_wrong_issuer",
            JwtError::WrongAudience => "jwt_wrong_audience",
            JwtError::ClaimType(_) => "jwt_claim_type",
            JwtError::MissingClaim(_) => "jwt_missing_claim",
            JwtError::BadIdentity => "jwt_bad_identity",
            JwtError::Crit => "jwt_crit",
            JwtError::Header(_) => "jwt_header",
        }
    }
}

impl fmt::Display for JwtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JwtError::Malformed => f.write_str("malformed token"),
            JwtError::TooLarge => f.write_str("token larger than the configured limit"),
            JwtError::AlgNotAllowed => f.write_str("token algorithm not allowed"),
            JwtError::KeyMismatch => f.write_str("no configured key fits the token algorithm"),
            JwtError::UnknownKid => f.write_str("token key id is not in the key set"),
            JwtError::AmbiguousKey => f.write_str("too many keys fit a token without a key id"),
            JwtError::BadSignature => f.write_str("token signature does not verify"),
            JwtError::Expired => f.write_str("token expired"),
            JwtError::NotYetValid => f.write_str("token not valid yet"),
            JwtError::WrongIssuer => f.write_str("token issuer not accepted"),
            JwtError::WrongAudience => f.write_str("token audience not accepted"),
            JwtError::ClaimType(c) => write!(f, "token claim `{c}` has the wrong type"),
            JwtError::MissingClaim(c) => write!(f, "token has no `{c}` claim"),
            JwtError::BadIdentity => f.write_str("token identity claim is not usable"),
            JwtError::Crit => f.write_str("token header has critical extensions"),
            JwtError::Header(why) => write!(f, "token header refused: {why}"),
        }
    }
}

impl std::error::Error for JwtError {}

/// Strict base64url: the URL-safe alphabet, no padding, no non-zero trailing bits, so each
/// byte string has exactly one accepted spelling.
fn b64url(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .ok()
}

/// A JSON value built by a visitor that refuses an object naming a member twice. serde_json's
/// own `Value`/`Map` keep the last duplicate silently, which would let a token show one `exp`
/// (or `alg`) to us and another to a different parser.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("non-finite number"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        // Keys arrive unescaped, so `"exp"` and `"\u0065xp"` are caught as the same name.
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(de::Error::custom("duplicate member name"));
            }
            let Strict(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

/// Parses a JSON object with unique member names at every depth. serde_json bounds nesting
/// (128 levels) and refuses trailing bytes, invalid UTF-8 and lone surrogates.
pub(crate) fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, String> {
    match serde_json::from_slice::<Strict>(bytes) {
        Ok(Strict(Value::Object(m))) => Ok(m),
        Ok(_) => Err("not a JSON object".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// `typ` values accepted (compared case-insensitively, RFC 7515 §4.1.9 lets the
/// `application/` prefix be dropped). Other JWT kinds (`dpop+jwt`, `logout+jwt`,
/// `secevent+jwt`, ...) are signed by the same IdP keys but are not access tokens: accepting
/// them would let one kind of token stand in for another (RFC 8725 §3.11).
const ACCEPTED_TYP: [&str; 4] = ["jwt", "at+jwt", "application/jwt", "application/at+jwt"];

/// The header members that matter, after the checks.
struct Header {
    alg: Algorithm,
    kid: Option<String>,
}

fn check_header(h: &Map<String, Value>, rules: &Rules) -> Result<Header, JwtError> {
    let alg = match h.get("alg") {
        Some(Value::String(s)) => s,
        Some(_) => return Err(JwtError::Header("`alg` is not a string")),
        None => return Err(JwtError::Header("no `alg`")),
    };
    // `none` in any spelling fails here: from_name is exact and knows no such algorithm.
    let alg = Algorithm::from_name(alg)
        .filter(|a| rules.algorithms.contains(a))
        .ok_or(JwtError::AlgNotAllowed)?;
    // RFC 7515 §4.1.11: a recipient must refuse a token whose `crit` names an extension it does
    // not understand, and we understand none (an empty `crit` is invalid per the same section).
    if h.contains_key("crit") {
        return Err(JwtError::Crit);
    }
    // Members that carry or point at a key. We never fetch or trust them (keys come from the
    // configuration only), but we refuse rather than ignore: an honest issuer of ours has no
    // reason to send them, a forged token carrying its own key is an attack worth a distinct
    // audit reason, and a refusal keeps any later code from starting to honour them.
    for (name, why) in [
        ("jku", "`jku` (a key URL) is never followed"),
        ("x5u", "`x5u` (a certificate URL) is never followed"),
        ("jwk", "`jwk` (an embedded key) is never trusted"),
        (
            "x5c",
            "`x5c` (an embedded certificate chain) is never trusted",
        ),
    ] {
        if h.contains_key(name) {
            return Err(JwtError::Header(why));
        }
    }
    // RFC 7797 unencoded payloads change what is signed; we only verify the standard form.
    if h.contains_key("b64") {
        return Err(JwtError::Header(
            "`b64` (unencoded payload) is not supported",
        ));
    }
    // A `cty` marks a nested JWT or a non-claims payload; we verify claim sets only.
    if h.contains_key("cty") {
        return Err(JwtError::Header("`cty` (nested or non-claims payload)"));
    }
    match h.get("typ") {
        None => {}
        Some(Value::String(t)) if ACCEPTED_TYP.iter().any(|a| t.eq_ignore_ascii_case(a)) => {}
        Some(_) => return Err(JwtError::Header("`typ` is not JWT or at+jwt")),
    }
    let kid = match h.get("kid") {
        None => None,
        Some(Value::String(k)) => Some(k.clone()),
        Some(_) => return Err(JwtError::Header("`kid` is not a string")),
    };
    Ok(Header { alg, kid })
}

/// The keys a token may be checked with.
///
/// - HS256 secret: the `kid` is ignored (there is one secret); the algorithm must be HS256.
/// - JWKS, with a `kid`: the keys with that `kid`; if none has it, the keys without a `kid`
///   (a JWKS may publish an unnamed key meant for every token) that fit the algorithm; if
///   there are none either, [`JwtError::UnknownKid`]. Keys found but of the wrong family: [`JwtError::KeyMismatch`].
/// - JWKS, without a `kid`: every key that fits the algorithm.
///
/// At most [`MAX_CANDIDATE_KEYS`] candidates, else [`JwtError::AmbiguousKey`].
fn candidates<'k>(
    keys: &'k KeySet,
    alg: Algorithm,
    kid: Option<&str>,
) -> Result<Vec<&'k Key>, JwtError> {
    let fitting: Vec<&Key> = match kid {
        Some(kid) if !keys.hmac => {
            let named: Vec<&Key> = keys
                .keys
                .iter()
                .filter(|k| k.kid.as_deref() == Some(kid))
                .collect();
            if named.is_empty() {
                let unnamed: Vec<&Key> = keys
                    .keys
                    .iter()
                    .filter(|k| k.kid.is_none() && k.fits(alg))
                    .collect();
                if unnamed.is_empty() {
                    return Err(JwtError::UnknownKid);
                }
                unnamed
            } else {
                named.into_iter().filter(|k| k.fits(alg)).collect()
            }
        }
        _ => keys.keys.iter().filter(|k| k.fits(alg)).collect(),
    };
    if fitting.is_empty() {
        return Err(JwtError::KeyMismatch);
    }
    if fitting.len() > MAX_CANDIDATE_KEYS {
        return Err(JwtError::AmbiguousKey);
    }
    Ok(fitting)
}

/// Verifies a compact JWS token at `now_unix` (seconds since the epoch).
pub fn verify(
    token: &str,
    keys: &KeySet,
    rules: &Rules,
    now_unix: u64,
) -> Result<Verified, JwtError> {
    // Bound first, so an oversized token costs a length comparison and nothing else.
    if token.len() > rules.max_token_bytes {
        return Err(JwtError::TooLarge);
    }
    let mut parts = token.split('.');
    let (Some(h64), Some(p64), Some(s64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    // An empty signature is what `alg: none` tokens carry; an empty header or payload is
    // never a valid JWS.
    if h64.is_empty() || p64.is_empty() || s64.is_empty() {
        return Err(JwtError::Malformed);
    }
    let (Some(header), Some(payload), Some(sig)) = (b64url(h64), b64url(p64), b64url(s64)) else {
        return Err(JwtError::Malformed);
    };
    let header = parse_object(&header).map_err(|_| JwtError::Malformed)?;
    let Header { alg, kid } = check_header(&header, rules)?;
    let candidates = candidates(keys, alg, kid.as_deref())?;

    // The signing input is the header and payload exactly as sent (RFC 7515 §5.2).
    let signed = &token.as_bytes()[..h64.len() + 1 + p64.len()];
    if !candidates
        .iter()
        .any(|k| k.material.verify(alg, signed, &sig))
    {
        return Err(JwtError::BadSignature);
    }

    // Authenticated from here on: the claims are what the issuer wrote.
    let claims = parse_object(&payload).map_err(|_| JwtError::Malformed)?;
    let checked = check_claims(&claims, rules, now_unix)?;
    Ok(Verified {
        subject: checked.subject,
        scopes: checked.scopes,
        expires_at: checked.expires_at,
        kid,
        algorithm: alg,
        claims,
    })
}

/// A NumericDate (RFC 7519 §2), which may be fractional, kept as the two integers the checks
/// need: rounding `exp` down and `nbf` up makes a fraction only ever shorten validity.
#[derive(Clone, Copy)]
struct NumericDate {
    floor: i128,
    ceil: i128,
}

impl NumericDate {
    fn of(n: &Number) -> Self {
        if let Some(u) = n.as_u64() {
            let v = i128::from(u);
            return NumericDate { floor: v, ceil: v };
        }
        if let Some(i) = n.as_i64() {
            let v = i128::from(i);
            return NumericDate { floor: v, ceil: v };
        }
        // JSON has no NaN or infinity; `as` saturates for values beyond i128.
        let f = n.as_f64().unwrap_or(0.0);
        NumericDate {
            floor: f.floor() as i128,
            ceil: f.ceil() as i128,
        }
    }
}

/// A registered claim that must be a number when present.
fn numeric(claims: &Map<String, Value>, name: &str) -> Result<Option<NumericDate>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => Ok(Some(NumericDate::of(n))),
        Some(_) => Err(JwtError::ClaimType(name.into())),
    }
}

/// A registered claim that must be a string when present.
fn string<'a>(claims: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(JwtError::ClaimType(name.into())),
    }
}

/// `aud`: a string or an array of strings (RFC 7519 §4.1.3).
fn audience(claims: &Map<String, Value>) -> Result<Option<Vec<&str>>, JwtError> {
    match claims.get("aud") {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(vec![s])),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().ok_or_else(|| JwtError::ClaimType("aud".into())))
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => Err(JwtError::ClaimType("aud".into())),
    }
}

/// Whether `name` reads as what it is, to become (part of) an identity: not blank, no
/// whitespace at either end (`"alice "` would be a second `alice` that looks the same), at most
/// [`MAX_IDENTITY_BYTES`] bytes, and no control or invisible characters.
pub(crate) fn acceptable_identity(name: &str) -> bool {
    !name.is_empty()
        && name.trim() == name
        && name.len() <= MAX_IDENTITY_BYTES
        && !name.chars().any(forbidden_in_identity)
}

/// Characters an identity may not hold: C0/C1 controls and DEL, and the invisible ones that
/// change how a line reads (line/paragraph separators, bidi overrides and isolates). The
/// identity lands in audit lines, metrics labels and policy; it must read as what it is.
/// Characters an identity may not hold: it is shown in audit lines and logs, where controls,
/// bidi overrides, format characters (Unicode category Cf: zero-width spaces and joiners, the
/// byte-order mark, tag characters) and invisible fillers would let `alice\u{200b}` pass for
/// `alice` to whoever reads them.
pub(crate) fn forbidden_in_identity(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{00AD}'
                | '\u{034F}'
                | '\u{0600}'..='\u{0605}'
                | '\u{061C}'
                | '\u{06DD}'
                | '\u{070F}'
                | '\u{0890}'..='\u{0891}'
                | '\u{08E2}'
                | '\u{115F}'..='\u{1160}'
                | '\u{17B4}'..='\u{17B5}'
                | '\u{180B}'..='\u{180F}'
                | '\u{200B}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{206F}'
                | '\u{3164}'
                | '\u{FE00}'..='\u{FE0F}'
                | '\u{FEFF}'
                | '\u{FFA0}'
                | '\u{FFF0}'..='\u{FFFB}'
                | '\u{110BD}'
                | '\u{110CD}'
                | '\u{13430}'..='\u{1343F}'
                | '\u{1BCA0}'..='\u{1BCA3}'
                | '\u{1D173}'..='\u{1D17A}'
                | '\u{E0000}'..='\u{E0FFF}'
        )
}

struct Checked {
    subject: String,
    scopes: Vec<String>,
    expires_at: u64,
}

fn check_claims(
    claims: &Map<String, Value>,
    rules: &Rules,
    now_unix: u64,
) -> Result<Checked, JwtError> {
    // Every registered claim's type first, whether or not a rule uses it: a wrong type is a
    // rejection, never "absent" (jsonwebtoken 9.x skipped `exp` given as a string,
    // CVE-2026-25537).
    let exp = numeric(claims, "exp")?;
    let nbf = numeric(claims, "nbf")?;
    numeric(claims, "iat")?;
    let iss = string(claims, "iss")?;
    string(claims, "sub")?;
    string(claims, "jti")?;
    let aud = audience(claims)?;

    // A token without `exp` would be valid forever (and a cache could never drop it); RFC 9068
    // makes `exp` required for access tokens, and so do we.
    let exp = exp.ok_or_else(|| JwtError::MissingClaim("exp".into()))?;
    let now = i128::from(now_unix);
    let leeway = i128::from(rules.leeway_secs);
    if exp.floor <= now - leeway {
        return Err(JwtError::Expired);
    }
    if nbf.is_some_and(|nbf| nbf.ceil > now + leeway) {
        return Err(JwtError::NotYetValid);
    }
    if let Some(want) = &rules.issuer {
        match iss {
            None => return Err(JwtError::MissingClaim("iss".into())),
            Some(iss) if iss != want => return Err(JwtError::WrongIssuer),
            Some(_) => {}
        }
    }
    if let Some(want) = &rules.audience {
        match aud {
            None => return Err(JwtError::MissingClaim("aud".into())),
            Some(list) if !list.iter().any(|a| a == want) => {
                return Err(JwtError::WrongAudience);
            }
            Some(_) => {}
        }
    }

    let subject = match claims.get(&rules.user_id_claim) {
        None => return Err(JwtError::MissingClaim(rules.user_id_claim.clone())),
        Some(Value::String(s)) => s,
        Some(_) => return Err(JwtError::ClaimType(rules.user_id_claim.clone())),
    };
    if !acceptable_identity(subject) {
        return Err(JwtError::BadIdentity);
    }

    // Scope tokens are separated by single spaces (RFC 6749 §3.3); empty ones from doubled
    // spaces are dropped rather than becoming an "" scope.
    let scopes = match claims.get(&rules.scopes_claim) {
        None => Vec::new(),
        Some(Value::String(s)) => s
            .split(' ')
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect(),
        Some(Value::Array(items)) => {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    Value::String(s) if !s.is_empty() => out.push(s.clone()),
                    Value::String(_) => {}
                    _ => return Err(JwtError::ClaimType(rules.scopes_claim.clone())),
                }
            }
            out
        }
        Some(_) => return Err(JwtError::ClaimType(rules.scopes_claim.clone())),
    };

    Ok(Checked {
        subject: subject.clone(),
        scopes,
        expires_at: u64::try_from(exp.floor.max(0)).unwrap_or(u64::MAX),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
    use serde_json::json;
    use std::sync::OnceLock;

    const NOW: u64 = 1_700_000_000;
    const ISS: &str = "https://issuer.example";
    const AUD: &str = "mcp-guard";
    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn enc(b: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(b)
    }

    /// Keys generated once per test run (RSA generation is the slow part).
    struct Fixture {
        rsa: RsaKeyPair,
        rsa_n: Vec<u8>,
        rsa_e: Vec<u8>,
        rsa_spki_der: Vec<u8>,
        rsa_spki_pem: String,
        p256: EcdsaKeyPair,
        p384: EcdsaKeyPair,
        ed: Ed25519KeyPair,
    }

    fn fixture() -> &'static Fixture {
        static F: OnceLock<Fixture> = OnceLock::new();
        F.get_or_init(|| {
            use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
            use rsa::traits::PublicKeyParts;
            let private = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
            let public = private.to_public_key();
            Fixture {
                rsa: RsaKeyPair::from_pkcs8(private.to_pkcs8_der().unwrap().as_bytes()).unwrap(),
                rsa_n: public.n().to_bytes_be(),
                rsa_e: public.e().to_bytes_be(),
                rsa_spki_der: public.to_public_key_der().unwrap().as_bytes().to_vec(),
                rsa_spki_pem: public.to_public_key_pem(LineEnding::LF).unwrap(),
                p256: ec_pair(&signature::ECDSA_P256_SHA256_FIXED_SIGNING),
                p384: ec_pair(&signature::ECDSA_P384_SHA384_FIXED_SIGNING),
                ed: ed_pair(),
            }
        })
    }

    fn ec_pair(alg: &'static signature::EcdsaSigningAlgorithm) -> EcdsaKeyPair {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap()
    }

    fn ed_pair() -> Ed25519KeyPair {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
    }

    fn hmac_sign(secret: &[u8], msg: &[u8]) -> Vec<u8> {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        ring::hmac::sign(&key, msg).as_ref().to_vec()
    }

    /// Signs with the fixture's key for `alg`.
    fn sign(alg: Algorithm, msg: &[u8]) -> Vec<u8> {
        let f = fixture();
        let rng = SystemRandom::new();
        let rsa: &'static dyn signature::RsaEncoding = match alg {
            Algorithm::HS256 => return hmac_sign(SECRET, msg),
            Algorithm::ES256 => return f.p256.sign(&rng, msg).unwrap().as_ref().to_vec(),
            Algorithm::ES384 => return f.p384.sign(&rng, msg).unwrap().as_ref().to_vec(),
            Algorithm::EdDSA => return f.ed.sign(msg).as_ref().to_vec(),
            Algorithm::RS256 => &signature::RSA_PKCS1_SHA256,
            Algorithm::RS384 => &signature::RSA_PKCS1_SHA384,
            Algorithm::RS512 => &signature::RSA_PKCS1_SHA512,
            Algorithm::PS256 => &signature::RSA_PSS_SHA256,
            Algorithm::PS384 => &signature::RSA_PSS_SHA384,
            Algorithm::PS512 => &signature::RSA_PSS_SHA512,
        };
        let mut sig = vec![0; f.rsa.public().modulus_len()];
        f.rsa.sign(rsa, &rng, msg, &mut sig).unwrap();
        sig
    }

    /// A token from raw header and claims text, signed by `signer` over the signing input.
    fn token_with(header: &str, claims: &str, signer: impl Fn(&[u8]) -> Vec<u8>) -> String {
        let input = format!("{}.{}", enc(header.as_bytes()), enc(claims.as_bytes()));
        let sig = signer(input.as_bytes());
        format!("{input}.{}", enc(&sig))
    }

    /// A token signed with the fixture's key for `alg`.
    fn token(header: &str, claims: &str, alg: Algorithm) -> String {
        token_with(header, claims, |m| sign(alg, m))
    }

    fn kid_of(alg: Algorithm) -> Option<&'static str> {
        match alg {
            Algorithm::HS256 => None,
            Algorithm::ES256 => Some("ec256"),
            Algorithm::ES384 => Some("ec384"),
            Algorithm::EdDSA => Some("ed"),
            _ => Some("rsa"),
        }
    }

    fn header(alg: Algorithm, kid: Option<&str>) -> String {
        match kid {
            Some(kid) => json!({"alg": alg.name(), "typ": "JWT", "kid": kid}),
            None => json!({"alg": alg.name(), "typ": "JWT"}),
        }
        .to_string()
    }

    fn claims() -> Value {
        json!({
            "iss": ISS,
            "aud": AUD,
            "sub": "alice",
            "exp": NOW + 300,
            "iat": NOW - 10,
            "nbf": NOW - 10,
            "jti": "t-1",
            "scope": "tools:read tools:call",
        })
    }

    fn with(claim: &str, value: Value) -> String {
        let mut c = claims();
        c[claim] = value;
        c.to_string()
    }

    fn without(claim: &str) -> String {
        let mut c = claims();
        c.as_object_mut().unwrap().remove(claim);
        c.to_string()
    }

    fn jwk_rsa(kid: &str) -> Value {
        let f = fixture();
        json!({"kty": "RSA", "kid": kid, "use": "sig", "n": enc(&f.rsa_n), "e": enc(&f.rsa_e)})
    }

    fn jwk_ec(pair: &EcdsaKeyPair, crv: &str, kid: &str) -> Value {
        let point = pair.public_key().as_ref();
        let len = (point.len() - 1) / 2;
        json!({
            "kty": "EC", "crv": crv, "kid": kid,
            "x": enc(&point[1..1 + len]), "y": enc(&point[1 + len..]),
        })
    }

    fn jwk_ed(pair: &Ed25519KeyPair, kid: Option<&str>) -> Value {
        let mut k = json!({"kty": "OKP", "crv": "Ed25519", "x": enc(pair.public_key().as_ref())});
        if let Some(kid) = kid {
            k["kid"] = json!(kid);
        }
        k
    }

    fn jwks(keys: Vec<Value>) -> Result<KeySet, String> {
        KeySet::from_jwks(json!({ "keys": keys }).to_string().as_bytes())
    }

    /// RSA, P-256, P-384 and Ed25519 keys, each with a kid.
    fn all_keys() -> KeySet {
        let f = fixture();
        jwks(vec![
            jwk_rsa("rsa"),
            jwk_ec(&f.p256, "P-256", "ec256"),
            jwk_ec(&f.p384, "P-384", "ec384"),
            jwk_ed(&f.ed, Some("ed")),
        ])
        .unwrap()
    }

    fn keys_for(alg: Algorithm) -> KeySet {
        if alg == Algorithm::HS256 {
            hmac_key(SECRET).unwrap()
        } else {
            all_keys()
        }
    }

    fn rules() -> Rules {
        Rules {
            algorithms: Algorithm::ALL.to_vec(),
            issuer: Some(ISS.into()),
            audience: Some(AUD.into()),
            ..Rules::default()
        }
    }

    fn good(alg: Algorithm) -> String {
        token(&header(alg, kid_of(alg)), &claims().to_string(), alg)
    }

    /// Verifies a token signed for `alg` with the usual keys and rules.
    fn check(alg: Algorithm, header: &str, claims: &str) -> Result<Verified, JwtError> {
        verify(&token(header, claims, alg), &keys_for(alg), &rules(), NOW)
    }

    fn check_claims_of(claims: &str) -> Result<Verified, JwtError> {
        check(
            Algorithm::ES256,
            &header(Algorithm::ES256, Some("ec256")),
            claims,
        )
    }

    #[test]
    fn every_algorithm_verifies_a_token_signed_with_its_key() {
        for alg in Algorithm::ALL {
            let v = verify(&good(alg), &keys_for(alg), &rules(), NOW)
                .unwrap_or_else(|e| panic!("{alg}: {e}"));
            assert_eq!(v.subject, "alice");
            assert_eq!(v.scopes, ["tools:read", "tools:call"]);
            assert_eq!(v.expires_at, NOW + 300);
            assert_eq!(v.algorithm, alg);
            assert_eq!(v.kid.as_deref(), kid_of(alg));
            assert_eq!(v.claims["jti"], "t-1");
            // Without a kid, the one key of the right family is tried.
            let no_kid = token(&header(alg, None), &claims().to_string(), alg);
            assert!(
                verify(&no_kid, &keys_for(alg), &rules(), NOW).is_ok(),
                "{alg}"
            );
        }
    }

    #[test]
    fn algorithm_names_are_exact_and_none_is_not_one() {
        for alg in Algorithm::ALL {
            assert_eq!(Algorithm::from_name(alg.name()), Some(alg));
        }
        for name in [
            "none", "None", "NONE", "hs256", "RS256 ", "ES512", "HS512", "", "Ed25519",
        ] {
            assert_eq!(Algorithm::from_name(name), None, "{name}");
        }
    }

    #[test]
    fn alg_none_in_any_spelling_is_refused() {
        let claims = claims().to_string();
        for name in ["none", "None", "NONE", "nOnE"] {
            let h = json!({"alg": name, "typ": "JWT"}).to_string();
            let body = format!("{}.{}", enc(h.as_bytes()), enc(claims.as_bytes()));
            for keys in [all_keys(), hmac_key(SECRET).unwrap()] {
                // The unsigned form (empty signature) is not even a well-formed JWS here...
                let unsigned = format!("{body}.");
                assert_eq!(
                    verify(&unsigned, &keys, &rules(), NOW),
                    Err(JwtError::Malformed)
                );
                // ...and with some signature bytes attached the algorithm itself is refused.
                let signed = format!("{body}.{}", enc(&hmac_sign(SECRET, body.as_bytes())));
                assert_eq!(
                    verify(&signed, &keys, &rules(), NOW),
                    Err(JwtError::AlgNotAllowed)
                );
            }
        }
    }

    #[test]
    fn alg_outside_the_allow_list_is_refused() {
        let only_rs256 = Rules {
            algorithms: vec![Algorithm::RS256],
            ..rules()
        };
        let t = good(Algorithm::ES256);
        assert_eq!(
            verify(&t, &all_keys(), &only_rs256, NOW),
            Err(JwtError::AlgNotAllowed)
        );
        assert!(verify(&good(Algorithm::RS256), &all_keys(), &only_rs256, NOW).is_ok());
        let nothing = Rules {
            algorithms: vec![],
            ..rules()
        };
        assert_eq!(
            verify(&good(Algorithm::RS256), &all_keys(), &nothing, NOW),
            Err(JwtError::AlgNotAllowed)
        );
        for name in ["rs256", "RS256 ", "HS512", "ES512", "RSA-OAEP"] {
            let h = json!({"alg": name, "kid": "rsa"}).to_string();
            let t = token(&h, &claims().to_string(), Algorithm::RS256);
            assert_eq!(
                verify(&t, &all_keys(), &rules(), NOW),
                Err(JwtError::AlgNotAllowed),
                "{name}"
            );
        }
    }

    #[test]
    fn hs256_signed_with_the_rsa_public_key_is_refused_against_a_jwks() {
        // The confusion attack: the attacker knows the public key and "signs" an HS256 token
        // with its bytes, hoping the verifier uses the same bytes as an HMAC secret. HS256 is
        // even in the allow list here.
        let f = fixture();
        let jwk_text = jwk_rsa("rsa").to_string();
        let secrets: [&[u8]; 4] = [
            &f.rsa_n,
            &f.rsa_spki_der,
            f.rsa_spki_pem.as_bytes(),
            jwk_text.as_bytes(),
        ];
        for secret in secrets {
            for kid in [Some("rsa"), None] {
                let t = token_with(&header(Algorithm::HS256, kid), &claims().to_string(), |m| {
                    hmac_sign(secret, m)
                });
                assert_eq!(
                    verify(&t, &all_keys(), &rules(), NOW),
                    Err(JwtError::KeyMismatch)
                );
            }
        }
    }

    #[test]
    fn an_algorithm_is_only_used_with_a_key_of_its_family() {
        let c = claims().to_string();
        let keys = all_keys();
        for (alg, kid) in [
            (Algorithm::RS256, "ec256"),
            (Algorithm::PS256, "ed"),
            (Algorithm::ES256, "rsa"),
            (Algorithm::ES384, "ec256"), // right kty, wrong curve
            (Algorithm::ES256, "ec384"),
            (Algorithm::EdDSA, "ec256"),
        ] {
            let t = token(&header(alg, Some(kid)), &c, alg);
            assert_eq!(
                verify(&t, &keys, &rules(), NOW),
                Err(JwtError::KeyMismatch),
                "{alg} with {kid}"
            );
        }
        // An HMAC secret never verifies a public-key algorithm.
        let t = token(&header(Algorithm::RS256, None), &c, Algorithm::RS256);
        assert_eq!(
            verify(&t, &hmac_key(SECRET).unwrap(), &rules(), NOW),
            Err(JwtError::KeyMismatch)
        );
        // And a set without a key of the family fails the same way when there is no kid.
        let only_ed = jwks(vec![jwk_ed(&fixture().ed, Some("ed"))]).unwrap();
        let t = token(&header(Algorithm::RS256, None), &c, Algorithm::RS256);
        assert_eq!(
            verify(&t, &only_ed, &rules(), NOW),
            Err(JwtError::KeyMismatch)
        );
    }

    #[test]
    fn a_jwk_alg_restricts_its_key_to_that_algorithm() {
        let mut k = jwk_rsa("r");
        k["alg"] = json!("RS256");
        let keys = jwks(vec![k]).unwrap();
        let c = claims().to_string();
        let rs = token(&header(Algorithm::RS256, Some("r")), &c, Algorithm::RS256);
        assert!(verify(&rs, &keys, &rules(), NOW).is_ok());
        let ps = token(&header(Algorithm::PS256, Some("r")), &c, Algorithm::PS256);
        assert_eq!(
            verify(&ps, &keys, &rules(), NOW),
            Err(JwtError::KeyMismatch)
        );
    }

    #[test]
    fn a_wrong_key_or_a_tampered_token_is_a_bad_signature() {
        let c = claims().to_string();
        // Same family and kid, other key.
        let other = ec_pair(&signature::ECDSA_P256_SHA256_FIXED_SIGNING);
        let rng = SystemRandom::new();
        let t = token_with(&header(Algorithm::ES256, Some("ec256")), &c, |m| {
            other.sign(&rng, m).unwrap().as_ref().to_vec()
        });
        assert_eq!(
            verify(&t, &all_keys(), &rules(), NOW),
            Err(JwtError::BadSignature)
        );
        let other_ed = ed_pair();
        let t = token_with(&header(Algorithm::EdDSA, Some("ed")), &c, |m| {
            other_ed.sign(m).as_ref().to_vec()
        });
        assert_eq!(
            verify(&t, &all_keys(), &rules(), NOW),
            Err(JwtError::BadSignature)
        );
        let t = token_with(&header(Algorithm::HS256, None), &c, |m| {
            hmac_sign(b"another secret, also 32 bytes lo", m)
        });
        assert_eq!(
            verify(&t, &hmac_key(SECRET).unwrap(), &rules(), NOW),
            Err(JwtError::BadSignature)
        );

        let forged = enc(with("sub", json!("mallory")).as_bytes());
        for alg in Algorithm::ALL {
            let good = good(alg);
            let parts: Vec<&str> = good.split('.').collect();
            // Payload swapped, signature kept.
            let t = format!("{}.{forged}.{}", parts[0], parts[2]);
            assert_eq!(
                verify(&t, &keys_for(alg), &rules(), NOW),
                Err(JwtError::BadSignature),
                "{alg}"
            );
            // One signature bit flipped.
            let mut sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
            sig[5] ^= 1;
            let t = format!("{}.{}.{}", parts[0], parts[1], enc(&sig));
            assert_eq!(
                verify(&t, &keys_for(alg), &rules(), NOW),
                Err(JwtError::BadSignature),
                "{alg}"
            );
            // A truncated signature.
            let t = format!("{}.{}.{}", parts[0], parts[1], enc(&sig[..sig.len() / 2]));
            assert_eq!(
                verify(&t, &keys_for(alg), &rules(), NOW),
                Err(JwtError::BadSignature),
                "{alg}"
            );
        }
    }

    #[test]
    fn an_unknown_kid_is_its_own_error_so_the_caller_can_refresh() {
        let t = token(
            &header(Algorithm::RS256, Some("rotated-key")),
            &claims().to_string(),
            Algorithm::RS256,
        );
        let err = verify(&t, &all_keys(), &rules(), NOW).unwrap_err();
        assert_eq!(err, JwtError::UnknownKid);
        assert_eq!(err.reason(), "jwt_unknown_kid");
        // An HS256 secret has no kid: whatever the token names is ignored.
        let t = token(
            &header(Algorithm::HS256, Some("anything")),
            &claims().to_string(),
            Algorithm::HS256,
        );
        assert!(verify(&t, &hmac_key(SECRET).unwrap(), &rules(), NOW).is_ok());
        // A JWKS key without a kid stands for any kid.
        let unnamed = jwks(vec![jwk_ed(&fixture().ed, None)]).unwrap();
        let t = token(
            &header(Algorithm::EdDSA, Some("whatever")),
            &claims().to_string(),
            Algorithm::EdDSA,
        );
        assert!(verify(&t, &unnamed, &rules(), NOW).is_ok());
    }

    #[test]
    fn the_kid_picks_the_key_and_without_one_only_a_few_keys_are_tried() {
        let pairs: Vec<Ed25519KeyPair> = (0..5).map(|_| ed_pair()).collect();
        let c = claims().to_string();
        let signed_by = |i: usize, kid: Option<&str>| {
            token_with(&header(Algorithm::EdDSA, kid), &c, |m| {
                pairs[i].sign(m).as_ref().to_vec()
            })
        };
        let named: Vec<Value> = (0..5)
            .map(|i| jwk_ed(&pairs[i], Some(&format!("k{i}"))))
            .collect();
        let named = jwks(named).unwrap();
        // The kid selects the one key to try.
        let v = verify(&signed_by(4, Some("k4")), &named, &rules(), NOW).unwrap();
        assert_eq!(v.kid.as_deref(), Some("k4"));
        assert_eq!(
            verify(&signed_by(4, Some("k3")), &named, &rules(), NOW),
            Err(JwtError::BadSignature)
        );
        // Without a kid, five fitting keys are too many to try.
        assert_eq!(
            verify(&signed_by(4, None), &named, &rules(), NOW),
            Err(JwtError::AmbiguousKey)
        );
        // Four are tried in turn; the last one verifies.
        let four: Vec<Value> = (0..4).map(|i| jwk_ed(&pairs[i], None)).collect();
        let four = jwks(four).unwrap();
        assert!(verify(&signed_by(3, None), &four, &rules(), NOW).is_ok());
        // Keys of other families do not count towards the bound.
        let mut mixed: Vec<Value> = (0..4).map(|i| jwk_ed(&pairs[i], None)).collect();
        mixed.push(jwk_rsa("rsa"));
        mixed.push(jwk_ec(&fixture().p256, "P-256", "ec256"));
        assert!(verify(&signed_by(0, None), &jwks(mixed).unwrap(), &rules(), NOW).is_ok());
    }

    #[test]
    fn expiry_is_checked_with_leeway_at_its_edges() {
        // leeway 60 (the default): expired when exp <= now - 60.
        assert_eq!(
            check_claims_of(&with("exp", json!(NOW - 60))),
            Err(JwtError::Expired)
        );
        assert!(check_claims_of(&with("exp", json!(NOW - 59))).is_ok());
        let strict = Rules {
            leeway_secs: 0,
            ..rules()
        };
        let at = |exp: Value| {
            let t = token(
                &header(Algorithm::ES256, Some("ec256")),
                &with("exp", exp),
                Algorithm::ES256,
            );
            verify(&t, &all_keys(), &strict, NOW)
        };
        assert_eq!(at(json!(NOW)), Err(JwtError::Expired));
        assert_eq!(at(json!(NOW + 1)).unwrap().expires_at, NOW + 1);
        // A fractional exp counts from its whole second: it can only end validity earlier.
        assert_eq!(at(json!(NOW as f64 + 0.5)), Err(JwtError::Expired));
        assert_eq!(at(json!(NOW as f64 + 1.5)).unwrap().expires_at, NOW + 1);
        // Far past and far future, integer and float.
        assert_eq!(at(json!(-1)), Err(JwtError::Expired));
        assert_eq!(at(json!(-1e300)), Err(JwtError::Expired));
        assert_eq!(at(json!(u64::MAX)).unwrap().expires_at, u64::MAX);
        assert_eq!(at(json!(1e300)).unwrap().expires_at, u64::MAX);
    }

    #[test]
    fn not_before_is_checked_with_leeway_at_its_edges() {
        assert!(check_claims_of(&with("nbf", json!(NOW + 60))).is_ok());
        assert_eq!(
            check_claims_of(&with("nbf", json!(NOW + 61))),
            Err(JwtError::NotYetValid)
        );
        // A fractional nbf counts from the next whole second.
        assert_eq!(
            check_claims_of(&with("nbf", json!(NOW as f64 + 60.5))),
            Err(JwtError::NotYetValid)
        );
        assert!(check_claims_of(&with("nbf", json!(NOW as f64 + 59.5))).is_ok());
        assert!(check_claims_of(&without("nbf")).is_ok());
    }

    #[test]
    fn a_token_without_exp_is_refused() {
        assert_eq!(
            check_claims_of(&without("exp")),
            Err(JwtError::MissingClaim("exp".into()))
        );
    }

    #[test]
    fn a_registered_claim_of_the_wrong_type_is_refused_never_treated_as_absent() {
        let cases = [
            // CVE-2026-25537: an exp given as a string must not skip the expiry check.
            ("exp", json!("9999999999")),
            ("exp", json!("1")),
            ("exp", json!(null)),
            ("exp", json!(true)),
            ("exp", json!([NOW + 300])),
            ("exp", json!({})),
            ("nbf", json!([])),
            ("nbf", json!("0")),
            ("nbf", json!(null)),
            ("iat", json!("now")),
            ("iat", json!(null)),
            ("iss", json!(5)),
            ("iss", json!(null)),
            ("iss", json!([ISS])),
            ("aud", json!({})),
            ("aud", json!(5)),
            ("aud", json!(null)),
            ("aud", json!([1])),
            ("aud", json!([AUD, null])),
            ("sub", json!(1)),
            ("sub", json!(null)),
            ("sub", json!({"id": "alice"})),
            ("jti", json!(7)),
        ];
        // With and without issuer/audience rules: the type is checked either way.
        let lax = Rules {
            issuer: None,
            audience: None,
            ..rules()
        };
        for (claim, value) in cases {
            for r in [rules(), lax.clone()] {
                let t = token(
                    &header(Algorithm::ES256, Some("ec256")),
                    &with(claim, value.clone()),
                    Algorithm::ES256,
                );
                let err = verify(&t, &all_keys(), &r, NOW).unwrap_err();
                assert_eq!(err, JwtError::ClaimType(claim.into()), "{claim}: {value}");
                assert_eq!(err.reason(), "jwt_claim_type");
            }
        }
    }

    #[test]
    fn the_issuer_must_match_when_a_rule_names_one() {
        assert_eq!(
            check_claims_of(&with("iss", json!("https://evil.example"))),
            Err(JwtError::WrongIssuer)
        );
        assert_eq!(
            check_claims_of(&with("iss", json!("HTTPS://ISSUER.EXAMPLE"))),
            Err(JwtError::WrongIssuer)
        );
        assert_eq!(
            check_claims_of(&without("iss")),
            Err(JwtError::MissingClaim("iss".into()))
        );
        let any_issuer = Rules {
            issuer: None,
            ..rules()
        };
        let t = token(
            &header(Algorithm::ES256, Some("ec256")),
            &without("iss"),
            Algorithm::ES256,
        );
        assert!(verify(&t, &all_keys(), &any_issuer, NOW).is_ok());
    }

    #[test]
    fn the_audience_may_be_a_string_or_an_array_that_contains_it() {
        assert!(check_claims_of(&with("aud", json!(["other", AUD]))).is_ok());
        assert!(check_claims_of(&with("aud", json!([AUD]))).is_ok());
        assert_eq!(
            check_claims_of(&with("aud", json!(["other", "mcp-guard2"]))),
            Err(JwtError::WrongAudience)
        );
        assert_eq!(
            check_claims_of(&with("aud", json!([]))),
            Err(JwtError::WrongAudience)
        );
        assert_eq!(
            check_claims_of(&with("aud", json!("other"))),
            Err(JwtError::WrongAudience)
        );
        assert_eq!(
            check_claims_of(&without("aud")),
            Err(JwtError::MissingClaim("aud".into()))
        );
        let any_audience = Rules {
            audience: None,
            ..rules()
        };
        let t = token(
            &header(Algorithm::ES256, Some("ec256")),
            &with("aud", json!(["x", "y"])),
            Algorithm::ES256,
        );
        assert!(verify(&t, &all_keys(), &any_audience, NOW).is_ok());
    }

    #[test]
    fn headers_that_point_at_or_carry_keys_and_crit_are_refused() {
        let c = claims().to_string();
        let run = |h: Value| {
            let t = token(&h.to_string(), &c, Algorithm::RS256);
            verify(&t, &all_keys(), &rules(), NOW)
        };
        let base = || json!({"alg": "RS256", "kid": "rsa"});
        for (name, value) in [
            ("jku", json!("https://evil.example/jwks.json")),
            ("x5u", json!("https://evil.example/cert.pem")),
            ("jwk", jwk_rsa("rsa")),
            ("x5c", json!(["MIIB"])),
            ("b64", json!(false)),
            ("cty", json!("JWT")),
        ] {
            let mut h = base();
            h[name] = value;
            let err = run(h).unwrap_err();
            assert!(matches!(err, JwtError::Header(_)), "{name}: {err:?}");
            assert_eq!(err.reason(), "jwt_header");
        }
        for crit in [json!(["exp"]), json!([]), json!("b64")] {
            let mut h = base();
            h["crit"] = crit;
            assert_eq!(run(h), Err(JwtError::Crit));
        }
        // typ: absent or an access-token/JWT type, any case; other JWT kinds are refused.
        for typ in [
            "JWT",
            "jwt",
            "at+jwt",
            "AT+JWT",
            "application/at+jwt",
            "application/JWT",
        ] {
            let mut h = base();
            h["typ"] = json!(typ);
            assert!(run(h).is_ok(), "{typ}");
        }
        for typ in [
            json!("dpop+jwt"),
            json!("logout+jwt"),
            json!("JWS"),
            json!(1),
        ] {
            let mut h = base();
            h["typ"] = typ.clone();
            assert!(matches!(run(h), Err(JwtError::Header(_))), "{typ}");
        }
        assert!(run(base()).is_ok());
        // Thumbprints are hints we do not need and carry no key: ignored.
        let mut h = base();
        h["x5t"] = json!("abc");
        assert!(run(h).is_ok());
        // kid and alg must be strings; alg must be present.
        let mut h = base();
        h["kid"] = json!(1);
        assert!(matches!(run(h), Err(JwtError::Header(_))));
        let mut h = base();
        h["alg"] = json!(["RS256"]);
        assert!(matches!(run(h), Err(JwtError::Header(_))));
        assert!(matches!(
            run(json!({"kid": "rsa"})),
            Err(JwtError::Header(_))
        ));
    }

    #[test]
    fn duplicate_member_names_are_malformed() {
        let sign = |h: &str, c: &str| {
            let t = token(h, c, Algorithm::ES256);
            verify(&t, &all_keys(), &rules(), NOW)
        };
        let h = r#"{"alg":"ES256","kid":"ec256"}"#;
        let c = claims().to_string();
        assert!(sign(h, &c).is_ok());
        // Header: a second alg or kid.
        assert_eq!(
            sign(r#"{"alg":"none","alg":"ES256","kid":"ec256"}"#, &c),
            Err(JwtError::Malformed)
        );
        assert_eq!(
            sign(r#"{"alg":"ES256","kid":"ec256","kid":"ec256"}"#, &c),
            Err(JwtError::Malformed)
        );
        // Claims: a second exp, even spelled with an escape, or a duplicate deep inside.
        let body = c.trim_end_matches('}');
        for extra in [
            r#","exp":1"#,
            r#","\u0065xp":1"#,
            r#","sub":"alice""#,
            r#","ctx":{"role":"user","role":"admin"}"#,
            r#","ctx":[{"a":1,"a":1}]"#,
        ] {
            let dup = format!("{body}{extra}}}");
            assert_eq!(sign(h, &dup), Err(JwtError::Malformed), "{extra}");
        }
        // The same names at different depths are fine.
        let nested = format!(r#"{body},"ctx":{{"sub":"x","exp":1}}}}"#);
        assert!(sign(h, &nested).is_ok());
    }

    #[test]
    fn an_oversized_token_is_refused_before_any_decoding() {
        // Not base64 at all: the size check must come first.
        let junk = "!".repeat(DEFAULT_MAX_TOKEN_BYTES + 1);
        assert_eq!(
            verify(&junk, &all_keys(), &rules(), NOW),
            Err(JwtError::TooLarge)
        );
        let t = good(Algorithm::EdDSA);
        let exact = Rules {
            max_token_bytes: t.len(),
            ..rules()
        };
        assert!(verify(&t, &all_keys(), &exact, NOW).is_ok());
        let short = Rules {
            max_token_bytes: t.len() - 1,
            ..rules()
        };
        assert_eq!(
            verify(&t, &all_keys(), &short, NOW),
            Err(JwtError::TooLarge)
        );
    }

    #[test]
    fn only_three_strict_base64url_parts_are_a_token() {
        let t = good(Algorithm::EdDSA);
        let p: Vec<&str> = t.split('.').collect();
        let (h, c, s) = (p[0], p[1], p[2]);
        let h_json = header(Algorithm::EdDSA, Some("ed"));
        let h_std = base64::engine::general_purpose::STANDARD.encode(h_json.as_bytes());
        let cases = [
            String::new(),
            format!("{h}.{c}"),
            format!("{h}.{c}.{s}."),
            format!("{h}.{c}.{s}.{s}"),
            format!(".{c}.{s}"),
            format!("{h}..{s}"),
            format!("{h}.{c}.{s}="),
            format!("{h}=.{c}.{s}"),
            format!("{h}.{c}.{s} "),
            format!(" {h}.{c}.{s}"),
            format!("{h}.{c}\n.{s}"),
            format!("{h_std}.{c}.{s}"),
            // "YR" decodes to the same byte as "YQ" but with stray low bits.
            format!("{h}.{c}.YR"),
        ];
        for bad in &cases {
            assert_eq!(
                verify(bad, &all_keys(), &rules(), NOW),
                Err(JwtError::Malformed),
                "{bad:?}"
            );
        }
        // Parts that decode but are not JSON objects (validly signed where it matters).
        for (hdr, body) in [
            ("[]", claims().to_string()),
            ("not json", claims().to_string()),
            (h_json.as_str(), "[]".to_string()),
            (h_json.as_str(), "{\"sub\":".to_string()),
            (h_json.as_str(), format!("{} x", claims())),
        ] {
            let t = token(hdr, &body, Algorithm::EdDSA);
            assert_eq!(
                verify(&t, &all_keys(), &rules(), NOW),
                Err(JwtError::Malformed),
                "{hdr} / {body}"
            );
        }
        // Invalid UTF-8 in the claims.
        let bad_utf8 = token_with(&h_json, "", |m| sign(Algorithm::EdDSA, m));
        assert_eq!(
            verify(&bad_utf8, &all_keys(), &rules(), NOW),
            Err(JwtError::Malformed)
        );
        let input = format!("{}.{}", enc(h_json.as_bytes()), enc(b"{\"sub\":\"\xff\"}"));
        let raw = format!("{input}.{}", enc(&sign(Algorithm::EdDSA, input.as_bytes())));
        assert_eq!(
            verify(&raw, &all_keys(), &rules(), NOW),
            Err(JwtError::Malformed)
        );
    }

    #[test]
    fn the_identity_is_a_short_printable_string_from_the_configured_claim() {
        assert_eq!(
            check_claims_of(&without("sub")),
            Err(JwtError::MissingClaim("sub".into()))
        );
        for bad in [
            String::new(),
            "a".repeat(MAX_IDENTITY_BYTES + 1),
            "ali\u{0}ce".into(),
            "alice\nadmin".into(),
            "alice\u{7f}".into(),
            "alice\u{85}".into(),
            "\u{202e}ecila".into(),
            "alice\u{2028}".into(),
            "alice\u{061c}".into(),
            "alice\u{200b}".into(),
            "\u{feff}alice".into(),
            "alice\u{ad}".into(),
            "alice\u{e0041}".into(),
            "alice\u{3164}".into(),
            "alice\u{fe0f}".into(),
            "   ".into(),
            "alice ".into(),
            " alice".into(),
        ] {
            assert_eq!(
                check_claims_of(&with("sub", json!(bad))),
                Err(JwtError::BadIdentity),
                "{bad:?}"
            );
        }
        let longest = "é".repeat(MAX_IDENTITY_BYTES / 2);
        assert_eq!(
            check_claims_of(&with("sub", json!(longest)))
                .unwrap()
                .subject,
            longest
        );
        // Another claim as the identity: it must be a string too.
        let by_email = Rules {
            user_id_claim: "email".into(),
            ..rules()
        };
        let run = |c: String| {
            let t = token(
                &header(Algorithm::ES256, Some("ec256")),
                &c,
                Algorithm::ES256,
            );
            verify(&t, &all_keys(), &by_email, NOW)
        };
        assert_eq!(
            run(with("email", json!("alice@example.com")))
                .unwrap()
                .subject,
            "alice@example.com"
        );
        assert_eq!(
            run(with("email", json!(42))),
            Err(JwtError::ClaimType("email".into()))
        );
        assert_eq!(
            run(claims().to_string()),
            Err(JwtError::MissingClaim("email".into()))
        );
    }

    #[test]
    fn scopes_are_a_space_separated_string_or_an_array_of_strings() {
        let scopes = |v: Value| check_claims_of(&with("scope", v)).map(|v| v.scopes);
        assert_eq!(scopes(json!("a b  c ")).unwrap(), ["a", "b", "c"]);
        assert_eq!(scopes(json!(["a", "b c", ""])).unwrap(), ["a", "b c"]);
        assert_eq!(scopes(json!("")).unwrap(), Vec::<String>::new());
        assert!(
            check_claims_of(&without("scope"))
                .unwrap()
                .scopes
                .is_empty()
        );
        for bad in [
            json!(5),
            json!({"a": 1}),
            json!(["a", 1]),
            json!(null),
            json!(true),
        ] {
            assert_eq!(
                scopes(bad.clone()),
                Err(JwtError::ClaimType("scope".into())),
                "{bad}"
            );
        }
        let scp = Rules {
            scopes_claim: "scp".into(),
            ..rules()
        };
        let t = token(
            &header(Algorithm::ES256, Some("ec256")),
            &with("scp", json!(["tools:call"])),
            Algorithm::ES256,
        );
        assert_eq!(
            verify(&t, &all_keys(), &scp, NOW).unwrap().scopes,
            ["tools:call"]
        );
    }

    #[test]
    fn jwks_documents_beyond_bounds_or_malformed_are_refused_whole() {
        let f = fixture();
        let good = jwk_ed(&f.ed, Some("ed"));
        // Over 1 MiB, even though it is valid JSON.
        let mut big = json!({"keys": [good.clone()]}).to_string();
        big.push_str(&" ".repeat(MAX_JWKS_BYTES));
        assert!(KeySet::from_jwks(big.as_bytes()).is_err());
        // 100 keys are fine, 101 are not.
        let hundred: Vec<Value> = (0..100)
            .map(|i| jwk_ed(&f.ed, Some(&format!("k{i}"))))
            .collect();
        assert_eq!(jwks(hundred.clone()).unwrap().len(), 100);
        let mut many = hundred;
        many.push(good.clone());
        assert!(jwks(many).unwrap_err().contains("101"));
        // Bad base64url in a key we would use: padding, the standard alphabet, junk.
        let x = good["x"].as_str().unwrap().to_owned();
        for bad_x in [
            format!("{x}="),
            x.replace('-', "+").replace('_', "/") + "+/",
            "@@@@".into(),
        ] {
            let mut k = good.clone();
            k["x"] = json!(bad_x);
            assert!(jwks(vec![good.clone(), k]).is_err(), "{bad_x}");
        }
        let mut k = jwk_rsa("rsa");
        k["n"] = json!("not*base64");
        assert!(jwks(vec![good.clone(), k]).is_err());
        // Structure and member types.
        for doc in [
            "",
            "[]",
            "{}",
            r#"{"keys":{}}"#,
            r#"{"keys":[1]}"#,
            r#"{"keys":[{"kty":5}]}"#,
            r#"{"keys":[],"keys":[]}"#,
        ] {
            assert!(KeySet::from_jwks(doc.as_bytes()).is_err(), "{doc}");
        }
        let dup = format!(r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","x":"{x}","x":"{x}"}}]}}"#);
        assert!(KeySet::from_jwks(dup.as_bytes()).is_err());
        let mut k = good.clone();
        k["kid"] = json!(7);
        assert!(jwks(vec![k]).is_err());
        let mut k = jwk_ec(&f.p256, "P-256", "ec");
        k["x"] = json!(enc(&[1; 31]));
        assert!(jwks(vec![k]).is_err());
        // Nothing usable at all.
        // An explicitly empty list is the IdP revoking every key: honoured, not refused.
        assert!(jwks(vec![]).unwrap().is_empty());
    }

    #[test]
    fn jwks_keys_it_must_not_use_are_skipped() {
        let f = fixture();
        let e = enc(&f.rsa_e);
        let modulus = |bits: usize| {
            let mut n = vec![0xa5; bits.div_ceil(8)];
            n[0] = 1 << ((bits - 1) % 8);
            *n.last_mut().unwrap() |= 1;
            enc(&n)
        };
        let mut enc_use = jwk_rsa("enc");
        enc_use["use"] = json!("enc");
        let mut no_verify = jwk_rsa("ops");
        no_verify["key_ops"] = json!(["encrypt", "wrapKey"]);
        let mut oaep = jwk_rsa("oaep");
        oaep["alg"] = json!("RSA-OAEP-256");
        let mut ec_alg_on_rsa = jwk_rsa("mismatch");
        ec_alg_on_rsa["alg"] = json!("ES256");
        let mut eddsa_alg_on_p256 = jwk_ec(&f.p256, "P-256", "mismatch2");
        eddsa_alg_on_p256["alg"] = json!("EdDSA");
        let skipped = vec![
            json!({"kty": "RSA", "kid": "1024", "n": modulus(1024), "e": e}),
            json!({"kty": "RSA", "kid": "2047", "n": modulus(2047), "e": e}),
            json!({"kty": "RSA", "kid": "8193", "n": modulus(8193), "e": e}),
            json!({"kty": "RSA", "kid": "16384", "n": modulus(16384), "e": e}),
            json!({"kty": "RSA", "kid": "even-e", "n": modulus(2048), "e": enc(&[1, 0, 0])}),
            json!({"kty": "RSA", "kid": "e-1", "n": modulus(2048), "e": enc(&[1])}),
            enc_use,
            no_verify,
            oaep,
            ec_alg_on_rsa,
            eddsa_alg_on_p256,
            json!({"kty": "oct", "kid": "hmac", "k": enc(SECRET)}),
            json!({"kty": "EC", "crv": "P-521", "kid": "p521", "x": "AA", "y": "AA"}),
            json!({"kty": "OKP", "crv": "X25519", "kid": "x", "x": enc(&[9; 32])}),
            json!({"kty": "OKP", "crv": "Ed448", "kid": "ed448", "x": enc(&[9; 57])}),
            json!({"kty": "PQC", "kid": "future"}),
        ];
        assert!(jwks(skipped.clone()).unwrap_err().contains("no key usable"));
        let mut doc = skipped;
        doc.push(jwk_rsa("rsa"));
        let keys = jwks(doc).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys.kids().collect::<Vec<_>>(), [Some("rsa")]);
        // The sizes at the bounds are kept.
        let edges = jwks(vec![
            json!({"kty": "RSA", "kid": "2048", "n": modulus(2048), "e": e}),
            json!({"kty": "RSA", "kid": "8192", "n": modulus(8192), "e": e}),
        ])
        .unwrap();
        assert_eq!(edges.len(), 2);
        // use=sig, key_ops with verify and a matching alg are all fine.
        let mut k = jwk_rsa("ok");
        k["use"] = json!("sig");
        k["key_ops"] = json!(["verify"]);
        k["alg"] = json!("PS512");
        assert_eq!(jwks(vec![k]).unwrap().len(), 1);
    }

    #[test]
    fn an_oct_key_in_a_jwks_never_verifies_hs256() {
        // A JWKS is public: a symmetric key in it would let anyone mint tokens.
        let keys = jwks(vec![
            json!({"kty": "oct", "kid": "hmac", "k": enc(SECRET), "alg": "HS256"}),
            jwk_ed(&fixture().ed, Some("ed")),
        ])
        .unwrap();
        for kid in [Some("hmac"), None] {
            let t = token(
                &header(Algorithm::HS256, kid),
                &claims().to_string(),
                Algorithm::HS256,
            );
            assert_eq!(
                verify(&t, &keys, &rules(), NOW),
                Err(if kid.is_some() {
                    JwtError::UnknownKid
                } else {
                    JwtError::KeyMismatch
                })
            );
        }
    }

    #[test]
    fn an_rsa_modulus_with_leading_zeros_still_verifies() {
        let f = fixture();
        let mut n = vec![0, 0];
        n.extend_from_slice(&f.rsa_n);
        let keys = jwks(vec![
            json!({"kty": "RSA", "kid": "rsa", "n": enc(&n), "e": enc(&f.rsa_e)}),
        ])
        .unwrap();
        assert!(verify(&good(Algorithm::RS256), &keys, &rules(), NOW).is_ok());
    }

    #[test]
    fn an_hmac_secret_shorter_than_32_bytes_is_refused_and_never_printed() {
        let err = hmac_key(&SECRET[..31]).unwrap_err();
        assert!(!err.contains("0123456789"), "{err}");
        let keys = hmac_key(SECRET).unwrap();
        assert_eq!(keys.len(), 1);
        let debug = format!("{keys:?}");
        assert!(!debug.contains("0123456789"), "{debug}");
        assert!(debug.contains("HMAC"));
        assert!(format!("{:?}", all_keys()).contains("RSA-2048"));
    }

    #[test]
    fn error_messages_never_repeat_the_token() {
        let secret_looking = "kid-Zm9vYmFy-<script>";
        let t = token(
            &header(Algorithm::RS256, Some(secret_looking)),
            &with("sub", json!("mallory-sub")),
            Algorithm::RS256,
        );
        let tampered = {
            let p: Vec<&str> = t.split('.').collect();
            format!(
                "{}.{}.{}",
                p[0],
                enc(with("sub", json!("x")).as_bytes()),
                p[2]
            )
        };
        let errors = [
            verify(&t, &all_keys(), &rules(), NOW).unwrap_err(),
            verify(&tampered, &all_keys(), &rules(), NOW).unwrap_err(),
            check_claims_of(&with("iss", json!("https://mallory.example"))).unwrap_err(),
            check_claims_of(&with("aud", json!("mallory-aud"))).unwrap_err(),
            check_claims_of(&with("sub", json!("mallory\n"))).unwrap_err(),
            check_claims_of(&with("exp", json!("mallory-exp"))).unwrap_err(),
        ];
        for e in &errors {
            let text = e.to_string();
            for part in t.split('.') {
                assert!(!text.contains(part), "{text}");
            }
            assert!(!text.contains("mallory"), "{text}");
            assert!(!text.contains(secret_looking), "{text}");
        }
    }

    #[test]
    fn reasons_are_stable_and_distinct() {
        let all = [
            (JwtError::Malformed, "jwt_malformed"),
            (JwtError::TooLarge, "jwt_too_large"),
            (JwtError::AlgNotAllowed, "jwt_alg_not_allowed"),
            (JwtError::KeyMismatch, "jwt_key_mismatch"),
            (JwtError::UnknownKid, "jwt_unknown_kid"),
            (JwtError::AmbiguousKey, "jwt_ambiguous_key"),
            (JwtError::BadSignature, "jwt_bad_signature"),
            (JwtError::Expired, "jwt_expired"),
            (JwtError::NotYetValid, "jwt_not_yet_valid"),
            (JwtError::WrongIssuer, "jwt_wrong_issuer"),
            (JwtError::WrongAudience, "jwt_wrong_audience"),
            (JwtError::ClaimType("exp".into()), "jwt_claim_type"),
            (JwtError::MissingClaim("exp".into()), "jwt_missing_claim"),
            (JwtError::BadIdentity, "jwt_bad_identity"),
            (JwtError::Crit, "jwt_crit"),
            (JwtError::Header("x"), "jwt_header"),
        ];
        let mut seen = std::collections::HashSet::new();
        for (e, reason) in &all {
            assert_eq!(e.reason(), *reason);
            assert!(seen.insert(*reason));
        }
    }
}
