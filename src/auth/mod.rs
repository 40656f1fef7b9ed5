//! Authentication: who is calling. A chain of providers in a fixed order produces an
//! [`Identity`]: client certificates ([`mtls`]), API keys ([`api_key`]), JWTs (verified by
//! [`jwt`], keys from a secret or a JWKS kept fresh by [`jwks`]), the OAuth facade's own access
//! tokens (`crate::facade`) and OAuth access tokens of an external authorization server
//! ([`oauth`], as JWTs or by [`introspect`]ion).
//!
//! Chain order (first match wins): mTLS certificate → API key → the OAuth facade's own tokens
//! → JWT → OAuth (JWT or introspection). A JWT-shaped bearer token the facade did not sign goes
//! to `[auth.jwt]`, or to `[auth.oauth]` when that validates JWTs and the token's issuer is its
//! authorization server (or `[auth.jwt]` is not configured); an opaque one is an API key, or
//! else introspected. A request that presents credentials no provider accepts is refused; it is
//! never treated as anonymous.
//!
//! Authentication may have to wait (a JWKS refresh for a key not held yet, an introspection
//! call): it then answers [`AuthError::Pending`], the connection awaits it (bounded in time
//! and in number per worker) and runs admission again, which finds the answer in place. The
//! common case — a cached token, an API key — never waits and allocates nothing.
//!
//! An API key's identity is borrowed from the configuration snapshot. A token's is built once
//! per worker and token (its policy compiled from its scopes), cached until the token expires,
//! and lent to the request through an [`IdentitySlot`] the connection owns. Identities are
//! namespaced by how they authenticated: a token's is `jwt:<subject>`, so an API key `alice` and
//! a token for `alice` never share sessions, rate limits or audit lines.

pub mod api_key;
pub mod fetch;
pub mod introspect;
pub mod jwks;
pub mod jwt;
pub mod mtls;
pub mod oauth;

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
#[derive(Debug, Clone)]
pub enum AuthError {
    /// No credentials presented, and the gateway requires them.
    Missing,
    /// Credentials presented but not accepted (which method, for metrics; why, for the audit
    /// trail — never the credential itself).
    Invalid(AuthMethod, &'static str),
    /// The identity provider cannot answer now (down, busy, answering nonsense): the
    /// credentials are neither accepted nor known bad.
    Unavailable(AuthMethod, &'static str),
    /// The answer needs a wait: await [`Pending::settle`], then authenticate again.
    Pending(Pending),
}

/// The most requests one worker lets wait for an identity provider at once; more are
/// answered at once (as if the wait had not settled).
pub const MAX_WAITING: usize = 256;

/// Something authentication waits for.
#[derive(Debug, Clone)]
pub struct Pending {
    awaiting: Awaiting,
    /// What the request gets if the wait does not settle it.
    pub refusal: (AuthMethod, &'static str),
}

#[derive(Debug, Clone)]
enum Awaiting {
    /// A JWKS fetch: the receiver closes when it ends.
    Keys(async_channel::Receiver<()>),
    /// An introspection answer for this token.
    Introspection(Box<str>, async_channel::Receiver<introspect::Outcome>),
}

impl Pending {
    /// Waits for what authentication needs, at most `limit`; an introspection answer (or its
    /// absence) is left in `cache`, where authenticating again finds it.
    pub async fn settle(self, cache: &TokenCache, limit: std::time::Duration) {
        if cache.waiting.get() >= MAX_WAITING {
            if let Awaiting::Introspection(token, _) = self.awaiting {
                cache.answer(token, Err("oauth_introspection_busy"));
            }
            return;
        }
        cache.waiting.set(cache.waiting.get() + 1);
        let _waiting = Waiting(&cache.waiting);
        match self.awaiting {
            Awaiting::Keys(ended) => {
                let _ = crate::runtime::deadlines::timeout(limit, ended.recv()).await;
            }
            Awaiting::Introspection(token, answer) => {
                let outcome = match crate::runtime::deadlines::timeout(limit, answer.recv()).await {
                    Ok(Ok(outcome)) => outcome,
                    Ok(Err(_)) => Err("oauth_introspection_unavailable"),
                    Err(_) => Err("oauth_introspection_timeout"),
                };
                cache.answer(token, outcome);
            }
        }
    }
}

/// Counts a request waiting for as long as it waits.
struct Waiting<'a>(&'a std::cell::Cell<usize>);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
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
    /// Tokens an identity provider refused, with why and until when (Unix seconds) that is
    /// remembered ([`introspect::REFUSAL_TTL`]).
    refused: RefCell<HashMap<Box<str>, (&'static str, u64)>>,
    /// Introspection answers that arrived for waiting requests, taken by their next run.
    answers: RefCell<HashMap<Box<str>, introspect::Outcome>>,
    /// Requests of this worker waiting for an identity provider.
    waiting: std::cell::Cell<usize>,
}

impl TokenCache {
    fn answer(&self, token: Box<str>, outcome: introspect::Outcome) {
        let mut answers = self.answers.borrow_mut();
        if answers.len() >= MAX_WAITING {
            answers.clear();
        }
        answers.insert(token, outcome);
    }

    /// Empties the cache when the configuration or a key set changed since it was filled.
    fn check_generation(&self, generation: (u64, u64)) {
        if self.generation.get() != generation {
            self.tokens.borrow_mut().clear();
            self.refused.borrow_mut().clear();
            self.generation.set(generation);
        }
    }

    fn remember(&self, token: &str, identity: Rc<Identity>, until: u64) {
        let mut tokens = self.tokens.borrow_mut();
        if tokens.len() >= TOKEN_CACHE {
            tokens.clear();
        }
        tokens.insert(token.into(), (identity, until));
    }

    fn remember_refusal(&self, token: &str, why: &'static str, now: u64) {
        let mut refused = self.refused.borrow_mut();
        if refused.len() >= TOKEN_CACHE {
            refused.clear();
        }
        refused.insert(token.into(), (why, now + introspect::REFUSAL_TTL.as_secs()));
    }

    fn cached(&self, token: &str, now: u64) -> Option<(Rc<Identity>, u64)> {
        self.tokens
            .borrow()
            .get(token)
            .filter(|(_, until)| now < *until)
            .map(|(identity, until)| (identity.clone(), *until))
    }
}

/// The policy a token's scopes give it: the tool entries `scope_tools` maps them to (`None`:
/// no mapping, every tool), with a rule of its own for each routed server an entry names.
pub fn scope_policy(
    scopes: &[String],
    scope_tools: Option<&std::collections::BTreeMap<String, Vec<String>>>,
    routes: &[Arc<str>],
) -> Policy {
    let granted: Option<Vec<String>> = scope_tools.map(|map| {
        scopes
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
                crate::config::tool_rule_for(granted, &[], None, routes)
            }
        }
    };
    let mut policy = Policy {
        tools,
        ..Policy::default()
    };
    // A `server/tool` entry gives that server a rule of its own.
    if let Some(granted) = &granted {
        for server in routes.iter().filter(|r| {
            granted
                .iter()
                .any(|e| e.split_once('/').is_some_and(|(s, _)| s == &***r))
        }) {
            let on_server = Policy {
                tools: crate::config::tool_rule_for(granted, &[], Some(server), routes),
                ..Policy::default()
            };
            policy
                .per_server
                .insert(server.clone(), Arc::new(on_server));
        }
    }
    policy
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
            JwtKeys::Jwks(set) => set.fetched.load(std::sync::atomic::Ordering::Acquire),
        }
    }

    /// Verifies `token` now. `Err(Err(jwks))`: its key is not held (an unknown `kid`, or no
    /// keys yet): a refresh of `jwks` may help.
    pub fn verify(
        &self,
        token: &str,
        now_unix: u64,
    ) -> Result<jwt::Verified, Result<jwt::JwtError, &Arc<jwks::Jwks>>> {
        match &self.keys {
            JwtKeys::Secret(keys) => jwt::verify(token, keys, &self.rules, now_unix).map_err(Ok),
            JwtKeys::Jwks(set) => {
                let keys = set.keys();
                match jwt::verify(token, &keys, &self.rules, now_unix) {
                    Err(jwt::JwtError::UnknownKid) => Err(Err(set)),
                    Err(_) if keys.is_empty() => Err(Err(set)),
                    other => other.map_err(Ok),
                }
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
        Identity {
            id: Arc::from(format!("{prefix}{}", v.subject)),
            method,
            policy: Arc::new(scope_policy(
                &v.scopes,
                self.scope_tools.as_ref(),
                &self.routes,
            )),
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
    /// OAuth access tokens of an external authorization server, when configured.
    pub oauth_tokens: Option<oauth::OauthProvider>,
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
            oauth_tokens: None,
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
        self.api_keys.is_some()
            || self.jwt.is_some()
            || self.oauth.is_some()
            || self.oauth_tokens.is_some()
            || self.mtls.is_some()
    }

    /// Starts what the providers run in the background (JWKS refreshers, introspection
    /// threads), taking over what `previous` already runs for the same source, keys included.
    pub fn start(&mut self, previous: Option<&Authenticator>) {
        if let Some(oauth) = &mut self.oauth {
            oauth.start(previous.and_then(|p| p.oauth.as_ref()));
        }
        if let Some(JwtProvider {
            keys: JwtKeys::Jwks(set),
            ..
        }) = &mut self.jwt
        {
            if let Some(JwtProvider {
                keys: JwtKeys::Jwks(old),
                ..
            }) = previous.and_then(|p| p.jwt.as_ref())
                && old.same_source(set)
            {
                *set = old.clone();
            }
            set.start();
        }
        let old = previous
            .and_then(|p| p.oauth_tokens.as_ref())
            .map(|o| &o.validation);
        match (self.oauth_tokens.as_mut().map(|o| &mut o.validation), old) {
            (Some(oauth::Validation::Jwt { keys, .. }), old) => {
                if let Some(oauth::Validation::Jwt { keys: old, .. }) = old
                    && old.same_source(keys)
                {
                    *keys = old.clone();
                }
                keys.start();
            }
            (Some(oauth::Validation::Introspection(i)), old) => {
                if let Some(oauth::Validation::Introspection(old)) = old
                    && old.same_source(i)
                {
                    *i = old.clone();
                }
                i.start();
            }
            _ => {}
        }
    }

    /// Which verified tokens a worker's cache may keep: changes with the configuration and
    /// with every key set fetched.
    fn cache_generation(&self) -> (u64, u64) {
        let (mut generation, mut epoch) = (0u64, 0u64);
        if let Some(j) = &self.jwt {
            generation ^= j.generation;
            epoch = epoch.wrapping_add(j.key_epoch());
        }
        if let Some(o) = &self.oauth_tokens {
            generation ^= o.generation.rotate_left(1);
            epoch = epoch.wrapping_add(o.key_epoch().rotate_left(32));
        }
        (generation, epoch)
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
            .authorization()
            .and_then(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                // Spaces and tabs only (RFC 9110 whitespace, as around every header value):
                // `str::trim` would also take NBSP or U+3000 off the end, so that a key with them
                // appended authenticated here but not in X-API-Key (red team round 6).
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then(|| rest.trim_matches([' ', '\t']))
            })
            .filter(|t| !t.is_empty());
        let header_key = head.h.api_key().filter(|k| !k.is_empty());
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
                Err(crate::facade::TokenRefusal::NotOurs)
                    if self.jwt.is_none() && self.oauth_tokens.is_none() =>
                {
                    return Err(crate::facade::refusal("oauth_not_issued_here"));
                }
                Err(crate::facade::TokenRefusal::NotOurs) => {}
            }
        }
        if let Some(token) = bearer
            && looks_like_jwt(token)
        {
            let to_oauth = self
                .oauth_tokens
                .as_ref()
                .filter(|o| o.takes_jwt(token, self.jwt.is_some()));
            if to_oauth.is_some() || self.jwt.is_some() {
                if header_key.is_some() {
                    // Two credentials: refuse rather than pick one.
                    let method = if to_oauth.is_some() {
                        AuthMethod::OAuth
                    } else {
                        AuthMethod::Jwt
                    };
                    return Err(AuthError::Invalid(method, "two_credentials"));
                }
                if let Some(o) = to_oauth {
                    return self.authenticate_oauth(o, token, slot, cache);
                }
                if let Some(jwt) = &self.jwt {
                    return self.authenticate_token(jwt, token, slot, cache);
                }
            }
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
                match keys.lookup(key) {
                    Some(identity) => {
                        return Ok(Caller {
                            identity,
                            rate_key: RateKey::Identity(&identity.id),
                            expires_at: None,
                        });
                    }
                    // Not a key: a bearer token may still be an opaque access token.
                    None if bearer.is_none() || !self.introspects() => {
                        return Err(AuthError::Invalid(
                            AuthMethod::ApiKey,
                            "invalid_credentials",
                        ));
                    }
                    None => {}
                }
            }
        }
        if let (Some(o), Some(token)) = (&self.oauth_tokens, bearer)
            && self.introspects()
        {
            if header_key.is_some() && self.api_keys.is_none() {
                return Err(AuthError::Invalid(AuthMethod::OAuth, "two_credentials"));
            }
            return self.authenticate_oauth(o, token, slot, cache);
        }
        if head.h.authorization().is_some() || header_key.is_some() {
            // Credentials no configured provider understands.
            let method = if self.jwt.is_some() {
                AuthMethod::Jwt
            } else if (self.oauth.is_some() || self.oauth_tokens.is_some())
                && self.api_keys.is_none()
            {
                AuthMethod::OAuth
            } else {
                AuthMethod::ApiKey
            };
            return Err(AuthError::Invalid(method, "invalid_credentials"));
        }
        Err(AuthError::Missing)
    }

    /// Whether opaque bearer tokens are introspected.
    fn introspects(&self) -> bool {
        matches!(
            self.oauth_tokens.as_ref().map(|o| &o.validation),
            Some(oauth::Validation::Introspection(_))
        )
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
        cache.check_generation(self.cache_generation());
        let (identity, until) = match cache.cached(token, now) {
            Some(hit) => hit,
            None => {
                // Which fetch the keys are from, read before they are looked at (see
                // `Jwks::refresh_now`).
                let seen = jwt.key_epoch();
                let verified = match jwt.verify(token, now) {
                    Ok(v) => v,
                    Err(Ok(e)) => return Err(AuthError::Invalid(AuthMethod::Jwt, e.reason())),
                    Err(Err(set)) => {
                        return Err(wait_for_keys(set, seen, AuthMethod::Jwt, "jwt_unknown_kid"));
                    }
                };
                let identity = Rc::new(jwt.identity(&verified));
                let until = verified.expires_at.saturating_add(jwt.rules.leeway_secs);
                cache.remember(token, identity.clone(), until);
                (identity, until)
            }
        };
        Ok(lend(slot, identity, until))
    }

    fn authenticate_oauth<'a>(
        &'a self,
        provider: &oauth::OauthProvider,
        token: &str,
        slot: &'a IdentitySlot,
        cache: &TokenCache,
    ) -> Result<Caller<'a>, AuthError> {
        let now = unix_now();
        cache.check_generation(self.cache_generation());
        if let Some((identity, until)) = cache.cached(token, now) {
            return Ok(lend(slot, identity, until));
        }
        let refused = |why| AuthError::Invalid(AuthMethod::OAuth, why);
        if let Some((why, until)) = cache.refused.borrow().get(token)
            && now < *until
        {
            return Err(refused(why));
        }
        if token.len() > jwt::DEFAULT_MAX_TOKEN_BYTES {
            return Err(refused("oauth_too_large"));
        }
        let (identity, until) = match &provider.validation {
            oauth::Validation::Jwt { .. } => {
                let seen = provider.key_epoch();
                match provider.verify_jwt(token, now) {
                    Ok(found) => found,
                    Err(Ok(why)) => return Err(refused(why)),
                    Err(Err(set)) => {
                        return Err(wait_for_keys(
                            set,
                            seen,
                            AuthMethod::OAuth,
                            "oauth_unknown_kid",
                        ));
                    }
                }
            }
            oauth::Validation::Introspection(introspector) => {
                let answer = cache.answers.borrow_mut().remove(token);
                match answer {
                    None => {
                        let reply = introspector
                            .ask(token)
                            .map_err(|why| AuthError::Unavailable(AuthMethod::OAuth, why))?;
                        return Err(AuthError::Pending(Pending {
                            awaiting: Awaiting::Introspection(token.into(), reply),
                            refusal: (AuthMethod::OAuth, "oauth_introspection_timeout"),
                        }));
                    }
                    // The endpoint could not say: nothing is remembered, the next request asks
                    // again.
                    Some(Err(why)) => return Err(AuthError::Unavailable(AuthMethod::OAuth, why)),
                    Some(Ok(answer)) => match provider.accept_introspected(&answer, now) {
                        Ok(found) => found,
                        Err(why) => {
                            cache.remember_refusal(token, why, now);
                            return Err(refused(why));
                        }
                    },
                }
            }
            oauth::Validation::None => return Err(refused("oauth_not_accepted")),
        };
        let identity = Rc::new(identity);
        cache.remember(token, identity.clone(), until);
        Ok(lend(slot, identity, until))
    }
}

/// A token whose key is not held: wait for the JWKS fetch under way (or start one), or — when
/// one ran too recently — refuse at once.
fn wait_for_keys(
    set: &jwks::Jwks,
    seen: u64,
    method: AuthMethod,
    reason: &'static str,
) -> AuthError {
    match set.refresh_now(seen) {
        jwks::Refresh::Wait(ended) => AuthError::Pending(Pending {
            awaiting: Awaiting::Keys(ended),
            refusal: (method, reason),
        }),
        jwks::Refresh::Refused => AuthError::Invalid(method, reason),
    }
}

/// The caller a token's identity makes, the identity kept in the request's `slot`.
fn lend(slot: &IdentitySlot, identity: Rc<Identity>, until: u64) -> Caller<'_> {
    let identity: &Rc<Identity> = slot.get_or_init(|| identity);
    Caller {
        identity,
        rate_key: RateKey::Identity(&identity.id),
        expires_at: Some(until),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("a test runtime")
            .block_on(f)
    }

    fn introspection(token: &str) -> (Pending, async_channel::Sender<introspect::Outcome>) {
        let (tx, rx) = async_channel::bounded(1);
        let pending = Pending {
            awaiting: Awaiting::Introspection(token.into(), rx),
            refusal: (AuthMethod::OAuth, "oauth_introspection_timeout"),
        };
        (pending, tx)
    }

    #[test]
    fn an_answer_that_never_comes_is_a_timeout_left_for_the_next_run() {
        let cache = TokenCache::default();
        let (pending, _answer_never_sent) = introspection("t");
        block_on(pending.settle(&cache, Duration::from_millis(20)));
        assert_eq!(
            cache.answers.borrow().get("t").cloned(),
            Some(Err("oauth_introspection_timeout"))
        );
        assert_eq!(cache.waiting.get(), 0, "the waiter was not counted out");
    }

    #[test]
    fn a_worker_with_its_waiters_full_answers_at_once() {
        let cache = TokenCache::default();
        cache.waiting.set(MAX_WAITING);
        let (pending, _answer_never_sent) = introspection("t");
        // A full hour allowed: were it waited for, this test would not end.
        block_on(pending.settle(&cache, Duration::from_secs(3600)));
        assert_eq!(
            cache.answers.borrow().get("t").cloned(),
            Some(Err("oauth_introspection_busy"))
        );
        assert_eq!(cache.waiting.get(), MAX_WAITING);
    }
}
