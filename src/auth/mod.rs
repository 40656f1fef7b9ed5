//! Authentication: who is calling. A chain of providers in a fixed order produces an
//! [`Identity`]; this build has API keys, and JWT, OAuth and mTLS join the same chain later
//! (the pure JWT verifier is in [`jwt`]; it is not in the chain yet).
//!
//! Chain order (first match wins): mTLS certificate (not in this build) → API key → JWT → OAuth
//! introspection. A request that presents credentials no provider accepts is refused; it is
//! never treated as anonymous.

pub mod api_key;
pub mod fetch;
pub mod jwt;

use crate::authz::Policy;
use crate::http::request::RequestHead;
use std::net::IpAddr;
use std::sync::Arc;

/// How an identity authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// No authentication is configured: every caller is anonymous.
    Anonymous,
    /// A pre-shared API key.
    ApiKey,
}

impl AuthMethod {
    /// Label for metrics and audit.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Anonymous => "anonymous",
            AuthMethod::ApiKey => "api_key",
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
    /// Credentials presented but not accepted (which method, for metrics).
    Invalid(AuthMethod),
}

/// The compiled provider chain (part of the config snapshot).
#[derive(Debug)]
pub struct Authenticator {
    /// API keys, when configured.
    pub api_keys: Option<api_key::ApiKeys>,
    /// The identity every caller has when no provider is configured.
    pub anonymous: Identity,
}

impl Default for Authenticator {
    fn default() -> Self {
        Self {
            api_keys: None,
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
    }

    /// Runs the chain.
    pub fn authenticate(&self, head: &RequestHead, peer: IpAddr) -> Result<Caller<'_>, AuthError> {
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
            });
        }
        if let Some(keys) = &self.api_keys {
            // Both headers present and different: refuse rather than pick one, so no two
            // components can disagree about who is calling.
            let presented = match (bearer, header_key) {
                (Some(a), Some(b)) if a != b => return Err(AuthError::Invalid(AuthMethod::ApiKey)),
                (Some(a), _) => Some(a),
                (None, b) => b,
            };
            if let Some(key) = presented {
                let identity = keys
                    .lookup(key)
                    .ok_or(AuthError::Invalid(AuthMethod::ApiKey))?;
                return Ok(Caller {
                    identity,
                    rate_key: RateKey::Identity(&identity.id),
                });
            }
        }
        if head.h.authorization.is_some() {
            // An Authorization scheme no provider understands.
            return Err(AuthError::Invalid(AuthMethod::ApiKey));
        }
        Err(AuthError::Missing)
    }
}
