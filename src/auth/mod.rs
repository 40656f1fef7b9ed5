//! Authentication: who is calling. A chain of providers in a fixed order produces an
//! [`Identity`]: API keys ([`api_key`]) and JWTs (verified by [`jwt`], keys from a secret or a
//! JWKS kept fresh by [`jwks`]), after client certificates ([`mtls`]); OAuth joins the same
//! chain later.
//!
//! Chain order (first match wins): mTLS certificate → API key → the OAuth facade's own tokens
//! (`crate::facade`) → JWT → OAuth introspection. A request that presents credentials no
//! provider accepts is refused; it is never treated as anonymous.
//!
//! An API key's identity is borrowed from the configuration snapshot. A token's is built once
//! per worker and token (its policy compiled from its scopes), cached until the token expires,
//! and lent to the request through an [`IdentitySlot`] the connection owns. Identities are
//! namespaced by how they authenticated: a token's is `jwt:<subject>`, so an API key `alice` and
//! a token for `alice` never share sessions, rate limits or audit lines.

pub mod api_key;
pub mod fetch;
pub mod jwks;
pub mod jwt;
pub mod mtls;

use crate::authz::Policy;
use crate::http::request::RequestHead;
use std::cell::{OnceCell, RefCell};
use std::collections::HashMap;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;

/// How an identity authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// No authentication is configured: every caller is anonymous.
    Anonymous,
    /// A pre-shared API key.
    ApiKey,
    /// A JWT bearer token.
    Jwt,
    /// An OAuth access token (the facade's own, or an external authorization server's).
    OAuth,
    /// A client certificate (verified in our handshake, or by a trusted TLS terminator).
    Mtls,
}

impl AuthMethod {
    /// Label for metrics and audit.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Anonymous => "anonymous",
            AuthMethod::ApiKey => "api_key",
            AuthMethod::Jwt => "jwt",
            AuthMethod::OAuth => "oauth",
            AuthMethod::Mtls => "mtls",
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The identity's id (an API key's `id`, a token's subject).
    pub id: Arc<str>,
    /// How it authenticated.
    pub method: AuthMethod,
    /// What it may do.
    pub policy: Arc<Policy>,
}

/// The caller of one request: a borrowed identity from the configuration snapshot (no shared
/// refcount is touched per request) and what its rate limit is keyed on.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    /// Who.
    pub identity: &'a Identity,
    /// The rate-limit key.
    pub rate_key: RateKey<'a>,
    /// When the credential stops being valid (a token's `exp`, in Unix seconds); a stream
    /// opened with it ends then.
    pub expires_at: Option<u64>,
}

/// What a caller's rate limit is keyed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RateKey<'a> {
    /// An authenticated identity.
    Identity(&'a str),
    /// An anonymous caller's address.
    Address(IpAddr),
}

/// Why authentication failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// No credentials presented, and the gateway requires them.
    Missing,
    /// Credentials presented but not accepted (which method, for metrics; why, for the audit
    /// trail — never the credential itself).
    Invalid(AuthMethod, &'static str),
}

/// Where a request's identity lives when it is not borrowed from the configuration (a
/// token's): owned by the connection for the length of the request.
pub type IdentitySlot = OnceCell<Rc<Identity>>;

/// Token → the identity it became, and until when (Unix seconds) it may be used.
type CachedTokens = HashMap<Box<str>, (Rc<Identity>, u64)>;

/// Verified tokens most recently seen on one worker, each with the identity it became.
const TOKEN_CACHE: usize = 1024;

/// A worker's verified-token cache: token → identity, until the token expires. Bounded
/// (cleared when full), and emptied when the configuration that verified them is replaced.
#[derive(Default)]
pub struct TokenCache {
    generation: std::cell::Cell<(u64, u64)>,
    tokens: RefCell<CachedTokens>,
}

/// JWT authentication: the rules tokens must meet, their keys, and how scopes become a policy.
#[derive(Debug)]
pub struct JwtProvider {
    /// What a token must satisfy.
    pub rules: jwt::Rules,
    /// Where the keys come from.
    pub keys: JwtKeys,
    /// Scope → tool entries it grants; `None`: no mapping, a token may call every tool.
    pub scope_tools: Option<std::collections::BTreeMap<String, Vec<String>>>,
    /// The routed servers' names (tool entries may name one: `server/tool`).
    pub routes: Vec<Arc<str>>,
    /// Distinguishes this configuration's cached identities from another's.
    pub generation: u64,
}

/// Where a JWT provider's keys come from.
#[derive(Debug)]
pub enum JwtKeys {
    /// One HS256 secret (`mode = "simple"`).
    Secret(jwt::KeySet),
    /// A JWKS kept fresh by its own thread (`mode = "jwks"`).
    Jwks(Arc<jwks::Jwks>),
}

impl JwtProvider {
    /// Which key set is in force: bumped by every JWKS fetch.
    pub fn key_epoch(&self) -> u64 {
        match &self.keys {
            JwtKeys::Secret(_) => 0,
            JwtKeys::Jwks(set) => set.fetched.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Verifies `token` now; an unknown `kid` (or no keys yet) asks for an early JWKS refresh.
    pub fn verify(&self, token: &str, now_unix: u64) -> Result<jwt::Verified, jwt::JwtError> {
        match &self.keys {
            JwtKeys::Secret(keys) => jwt::verify(token, keys, &self.rules, now_unix),
            JwtKeys::Jwks(set) => {
                let keys = set.keys();
                let verified = jwt::verify(token, &keys, &self.rules, now_unix);
                if matches!(verified, Err(jwt::JwtError::UnknownKid)) || keys.is_empty() {
                    set.refresh_soon();
                }
                verified
            }
        }
    }

    /// The identity a verified token becomes: `jwt:<subject>`, with the tools its scopes
    /// grant.
    pub fn identity(&self, v: &jwt::Verified) -> Identity {
        self.identity_as(v, AuthMethod::Jwt, "jwt:")
    }

    /// As [`JwtProvider::identity`], for a token that authenticates as `method` under the id
    /// namespace `prefix` (`oauth:` for the OAuth facade's tokens).
    pub fn identity_as(&self, v: &jwt::Verified, method: AuthMethod, prefix: &str) -> Identity {
        // The tool entries the token's scopes grant (`None`: no mapping, every tool).
        let granted: Option<Vec<String>> = self.scope_tools.as_ref().map(|map| {
            v.scopes
                .iter()
                .filter_map(|s| map.get(s))
                .flatten()
                .cloned()
                .collect()
        });
        let tools = match &granted {
            None => crate::authz::Rule::default(),
            Some(granted) => {
                if granted.is_empty() {
                    crate::authz::Rule {
                        allow: crate::authz::Matcher::nothing(),
                        deny: crate::authz::Matcher::default(),
                    }
                } else {
                    crate::config::tool_rule_for(granted, &[], None, &self.routes)
                }
            }
        };
        let mut policy = Policy {
            tools,
            ..Policy::default()
        };
        // A `server/tool` entry gives that server a rule of its own.
        if let Some(granted) = &granted {
            for server in self.routes.iter().filter(|r| {
                granted
                    .iter()
                    .any(|e| e.split_once('/').is_some_and(|(s, _)| s == &***r))
            }) {
                let on_server = Policy {
                    tools: crate::config::tool_rule_for(granted, &[], Some(server), &self.routes),
                    ..Policy::default()
                };
                policy
                    .per_server
                    .insert(server.clone(), Arc::new(on_server));
            }
        }
        Identity {
            id: Arc::from(format!("{prefix}{}", v.subject)),
            method,
            policy: Arc::new(policy),
        }
    }
}

/// Seconds since the Unix epoch.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether a bearer credential has a JWT's shape (three dot-separated parts); an API key
/// never does (keys are base64url/hex without dots).
fn looks_like_jwt(token: &str) -> bool {
    token.bytes().filter(|b| *b == b'.').count() == 2
}

/// The compiled provider chain (part of the config snapshot).
#[derive(Debug)]
pub struct Authenticator {
    /// API keys, when configured.
    pub api_keys: Option<api_key::ApiKeys>,
    /// JWT bearer tokens, when configured.
    pub jwt: Option<JwtProvider>,
    /// OAuth discovery, and mcp-guard's own authorization server when it is one.
    pub oauth: Option<crate::facade::Oauth>,
    /// Client-certificate identities, when `[auth.mtls]` is enabled.
    pub mtls: Option<mtls::MtlsProvider>,
    /// The identity every caller has when no provider is configured.
    pub anonymous: Identity,
}

impl Default for Authenticator {
    fn default() -> Self {
        Self {
            api_keys: None,
            jwt: None,
            oauth: None,
            mtls: None,
            anonymous: Identity {
                id: Arc::from("anonymous"),
                method: AuthMethod::Anonymous,
                policy: Arc::new(Policy::default()),
            },
        }
    }
}

impl Authenticator {
    /// Whether any provider is configured (otherwise every caller is anonymous).
    pub fn requires_credentials(&self) -> bool {
        self.api_keys.is_some() || self.jwt.is_some() || self.oauth.is_some() || self.mtls.is_some()
    }

    /// Starts what the providers run in the background (the JWKS refresher), taking over what
    /// `previous` already runs for the same source, keys included.
    pub fn start(&mut self, previous: Option<&Authenticator>) {
        if let Some(oauth) = &mut self.oauth {
            oauth.start(previous.and_then(|p| p.oauth.as_ref()));
        }
        let Some(JwtProvider {
            keys: JwtKeys::Jwks(set),
            ..
        }) = &mut self.jwt
        else {
            return;
        };
        if let Some(JwtProvider {
            keys: JwtKeys::Jwks(old),
            ..
        }) = previous.and_then(|p| p.jwt.as_ref())
            && old.is_for(set.url(), set.every())
        {
            *set = old.clone();
        }
        set.start();
    }

    /// Runs the chain for a request from `peer`: its client certificate first (a certificate
    /// identity is built per request and kept in `slot`), then the credentials in its head.
    pub fn authenticate_peer<'a>(
        &'a self,
        head: &RequestHead,
        peer: crate::tls::Peer<'_>,
        slot: &'a IdentitySlot,
        cache: &TokenCache,
    ) -> Result<Caller<'a>, AuthError> {
        if let Some(m) = &self.mtls {
            match m.presented(head, peer) {
                Ok(Some(name)) => {
                    let identity: &'a Rc<Identity> = slot.get_or_init(|| Rc::new(m.identity(name)));
                    return Ok(Caller {
                        identity,
                        rate_key: RateKey::Identity(&identity.id),
                        expires_at: None,
                    });
                }
                Ok(None) => {}
                Err(why) => return Err(AuthError::Invalid(AuthMethod::Mtls, why)),
            }
        }
        self.authenticate(head, peer.ip(), slot, cache)
    }

    /// Runs the chain after the client certificate. A token's identity is built (or found in `cache`) and kept in `slot`.
    pub fn authenticate<'a>(
        &'a self,
        head: &RequestHead,
        peer: IpAddr,
        slot: &'a IdentitySlot,
        cache: &TokenCache,
    ) -> Result<Caller<'a>, AuthError> {
        let bearer = head
            .h
            .authorization
            .as_deref()
            .and_then(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .filter(|t| !t.is_empty());
        let header_key = head.h.api_key.as_deref().filter(|k| !k.is_empty());
        if !self.requires_credentials() {
            return Ok(Caller {
                identity: &self.anonymous,
                rate_key: RateKey::Address(peer),
                expires_at: None,
            });
        }
        // The facade's own tokens first: one that is not signed by it goes on to `[auth.jwt]`.
        if let (Some(oauth), Some(token)) = (&self.oauth, bearer)
            && let Some(server) = &oauth.server
            && looks_like_jwt(token)
        {
            if header_key.is_some() {
                return Err(crate::facade::refusal("two_credentials"));
            }
            match server.authenticate(oauth, token, head.path(), slot) {
                Ok(caller) => return Ok(caller),
                Err(crate::facade::TokenRefusal::Refused(why)) => {
                    return Err(crate::facade::refusal(why));
                }
                Err(crate::facade::TokenRefusal::NotOurs) if self.jwt.is_none() => {
                    return Err(crate::facade::refusal("oauth_not_issued_here"));
                }
                Err(crate::facade::TokenRefusal::NotOurs) => {}
            }
        }
        if let (Some(jwt), Some(token)) = (&self.jwt, bearer)
            && looks_like_jwt(token)
        {
            if header_key.is_some() {
                // Two credentials: refuse rather than pick one.
                return Err(AuthError::Invalid(AuthMethod::Jwt, "two_credentials"));
            }
            return self.authenticate_token(jwt, token, slot, cache);
        }
        if let Some(keys) = &self.api_keys {
            // Both headers present and different: refuse rather than pick one, so no two
            // components can disagree about who is calling.
            let presented = match (bearer, header_key) {
                (Some(a), Some(b)) if a != b => {
                    return Err(AuthError::Invalid(
                        AuthMethod::ApiKey,
                        "invalid_credentials",
                    ));
                }
                (Some(a), _) => Some(a),
                (None, b) => b,
            };
            if let Some(key) = presented {
                let identity = keys.lookup(key).ok_or(AuthError::Invalid(
                    AuthMethod::ApiKey,
                    "invalid_credentials",
                ))?;
                return Ok(Caller {
                    identity,
                    rate_key: RateKey::Identity(&identity.id),
                    expires_at: None,
                });
            }
        }
        if head.h.authorization.is_some() || header_key.is_some() {
            // Credentials no configured provider understands.
            let method = if self.jwt.is_some() {
                AuthMethod::Jwt
            } else if self.oauth.is_some() {
                AuthMethod::OAuth
            } else {
                AuthMethod::ApiKey
            };
            return Err(AuthError::Invalid(method, "invalid_credentials"));
        }
        Err(AuthError::Missing)
    }

    fn authenticate_token<'a>(
        &'a self,
        jwt: &JwtProvider,
        token: &str,
        slot: &'a IdentitySlot,
        cache: &TokenCache,
    ) -> Result<Caller<'a>, AuthError> {
        let now = unix_now();
        // A new configuration, or a new key set, and what was verified before is verified
        // again (a key the IdP removed stops working for cached tokens too).
        let generation = (jwt.generation, jwt.key_epoch());
        if cache.generation.get() != generation {
            cache.tokens.borrow_mut().clear();
            cache.generation.set(generation);
        }
        let cached = cache
            .tokens
            .borrow()
            .get(token)
            .filter(|(_, until)| now < *until)
            .map(|(identity, until)| (identity.clone(), *until));
        let (identity, until) = match cached {
            Some(hit) => hit,
            None => {
                let verified = jwt
                    .verify(token, now)
                    .map_err(|e| AuthError::Invalid(AuthMethod::Jwt, e.reason()))?;
                let identity = Rc::new(jwt.identity(&verified));
                let until = verified.expires_at.saturating_add(jwt.rules.leeway_secs);
                let mut tokens = cache.tokens.borrow_mut();
                if tokens.len() >= TOKEN_CACHE {
                    tokens.clear();
                }
                tokens.insert(token.into(), (identity.clone(), until));
                (identity, until)
            }
        };
        let identity: &'a Rc<Identity> = slot.get_or_init(|| identity);
        Ok(Caller {
            identity,
            rate_key: RateKey::Identity(&identity.id),
            expires_at: Some(until),
        })
    }
}
