//! OAuth discovery and mcp-guard as an OAuth 2.1 authorization server (the "facade").
//!
//! Discovery, whenever `[auth.oauth]` is on: RFC 9728 protected-resource metadata at
//! `/.well-known/oauth-protected-resource` and its path-suffixed form for every MCP endpoint,
//! and the 401 challenge pointing there. The facade, for identity providers that cannot serve
//! MCP clients themselves (GitHub, Google; okta/custom without `authorization_servers`): RFC
//! 8414 metadata, RFC 7591 registration, `/oauth/authorize` (PKCE S256 and `state` required),
//! the IdP's callback, `/oauth/token` (one-time codes, rotating refresh tokens) and the
//! verification of the access tokens it signs, bound to this resource (RFC 8707).

pub mod form;
pub mod idp;
pub mod state;

use crate::auth::{AuthError, AuthMethod, Caller, Identity, IdentitySlot, JwtProvider, RateKey};
use crate::config::Settings;
use crate::http::request::{Method, RequestHead};
use crate::observe::metrics::M_NONE;
use crate::pipeline::Reply;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde_json::{Value, json};
use state::{Busy, Client, Grant, GrantError, Pending, Refresh, Tables};
use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// RFC 9728 protected-resource metadata; an endpoint's own is this plus its path.
pub const PRM_PATH: &str = "/.well-known/oauth-protected-resource";
/// RFC 8414 authorization-server metadata (the issuer has no path).
pub const AS_PATH: &str = "/.well-known/oauth-authorization-server";
/// RFC 7591 dynamic client registration.
pub const REGISTER_PATH: &str = "/oauth/register";
/// The authorization endpoint.
pub const AUTHORIZE_PATH: &str = "/oauth/authorize";
/// The token endpoint.
pub const TOKEN_PATH: &str = "/oauth/token";
/// Where the IdP sends the browser back, unless `redirect_uri` names another path.
pub const DEFAULT_CALLBACK: &str = "/oauth/callback";

/// The largest registration or token request read.
const MAX_FORM_BYTES: usize = 16 * 1024;
/// Redirect URIs one client may register.
const MAX_REDIRECT_URIS: usize = 10;
/// The longest redirect URI accepted.
const MAX_REDIRECT_URI_BYTES: usize = 2048;
/// Verified facade tokens one worker remembers.
const TOKEN_CACHE: usize = 1024;

/// `[auth.oauth]`, validated: what discovery advertises, and the facade when mcp-guard is
/// the authorization server.
#[derive(Debug)]
pub struct Oauth {
    /// `server.public_url`: `scheme://host[:port]`, no trailing slash. The gateway's own
    /// resource identifier, and the facade's issuer.
    pub public_url: String,
    /// Paths with protected-resource metadata of their own (every MCP endpoint and legacy SSE
    /// path), longest first.
    pub resource_paths: Vec<String>,
    /// Each of those paths with the routed server it reaches.
    pub resource_routes: Vec<(String, Arc<str>)>,
    /// Advertised in the metadata: the external servers, or `public_url` for the facade.
    pub authorization_servers: Vec<String>,
    /// Scopes advertised (`scopes_supported`, the challenge's `scope`).
    pub scopes: Vec<String>,
    /// The facade, when mcp-guard is the authorization server.
    pub server: Option<AuthServer>,
}

/// mcp-guard as the authorization server.
#[derive(Debug)]
pub struct AuthServer {
    /// The path of the facade's callback (from `redirect_uri`).
    pub callback_path: String,
    /// Calls to the IdP, off the workers.
    pub calls: Arc<idp::Calls>,
    /// Tables and signing key, shared by every worker (and kept across a reload that does not
    /// change the facade).
    pub shared: Arc<Shared>,
    /// Verifies issued tokens and turns their scopes into a policy.
    pub tokens: JwtProvider,
}

/// What every worker shares: the signing key, the tables, and a count of revocations that
/// invalidates the workers' verified-token caches.
pub struct Shared {
    key: [u8; 32],
    /// The facade's tables.
    pub tables: Mutex<Tables>,
    revocations: AtomicU64,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Shared {
    /// A fresh key (random, for this process) and empty tables.
    pub fn new() -> Arc<Shared> {
        Arc::new(Shared {
            key: crate::mcp::session::random_bytes::<32>(),
            tables: Mutex::new(Tables::default()),
            revocations: AtomicU64::new(0),
        })
    }

    /// The HS256 key tokens are signed and verified with.
    pub fn key_set(&self) -> crate::auth::jwt::KeySet {
        // 32 random bytes always meet the minimum length.
        crate::auth::jwt::hmac_key(&self.key).unwrap_or_default()
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        // A panic while holding the lock leaves tables that are still consistent (every
        // change is one insert or remove), so a poisoned lock is taken over.
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A facade or discovery request, recognised on the head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// Protected-resource metadata for the resource at this path ("" for the gateway).
    ResourceMetadata(String),
    /// Authorization-server metadata.
    ServerMetadata,
    /// Client registration.
    Register,
    /// Authorization.
    Authorize,
    /// The IdP's callback.
    Callback,
    /// Tokens.
    Token,
}

impl Oauth {
    /// The resource identifier of the gateway (`path` "") or of one endpoint.
    pub fn resource(&self, path: &str) -> String {
        format!("{}{path}", self.public_url)
    }

    /// The endpoint path a request path belongs to: the longest resource path equal to it or
    /// a segment prefix of it.
    pub fn resource_path_of(&self, path: &str) -> Option<&str> {
        self.resource_paths
            .iter()
            .find(|p| {
                path == p.as_str()
                    || (path.starts_with(p.as_str()) && path.as_bytes().get(p.len()) == Some(&b'/'))
            })
            .map(String::as_str)
    }

    /// Whether `resource` names this gateway or one of its endpoints.
    pub fn is_own_resource(&self, resource: &str) -> bool {
        resource == self.public_url
            || resource
                .strip_prefix(&self.public_url)
                .is_some_and(|p| self.resource_paths.iter().any(|r| r == p))
    }

    /// A client's `resource` parameter in canonical form, when it names this gateway or one of
    /// its endpoints. MCP: implementations "SHOULD accept uppercase scheme and host
    /// components"; the gateway's own identifier also with a trailing slash.
    pub fn own_resource(&self, resource: &str) -> Option<String> {
        let (scheme, rest) = resource.split_once("://")?;
        let (authority, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
        let canonical = format!(
            "{}://{}{}",
            scheme.to_ascii_lowercase(),
            authority.to_ascii_lowercase(),
            if path == "/" { "" } else { path }
        );
        self.is_own_resource(&canonical).then_some(canonical)
    }

    /// Which facade or discovery endpoint `path` is, if any.
    pub fn endpoint(&self, path: &str) -> Option<Endpoint> {
        if let Some(rest) = path.strip_prefix(PRM_PATH) {
            return (rest.is_empty() || self.resource_paths.iter().any(|p| p == rest))
                .then(|| Endpoint::ResourceMetadata(rest.to_string()));
        }
        let server = self.server.as_ref()?;
        Some(match path {
            // No OpenID Connect discovery: the facade issues no ID tokens and has no JWKS or
            // userinfo endpoint, so that document could not be complete; MCP clients fall
            // back to RFC 8414's.
            AS_PATH => Endpoint::ServerMetadata,
            REGISTER_PATH => Endpoint::Register,
            AUTHORIZE_PATH => Endpoint::Authorize,
            TOKEN_PATH => Endpoint::Token,
            p if p == server.callback_path => Endpoint::Callback,
            _ => return None,
        })
    }

    /// The `WWW-Authenticate` value of a 401 at `path`: where its metadata is, and the scopes
    /// to ask for (MCP authorization, RFC 9728 §5.1, RFC 6750 §3).
    pub fn challenge(&self, path: &str, invalid: bool) -> String {
        let suffix = self.resource_path_of(path).unwrap_or("");
        let mut v = format!(
            "Bearer realm=\"mcp-guard\", resource_metadata=\"{}{PRM_PATH}{suffix}\"",
            self.public_url
        );
        if !self.scopes.is_empty() {
            v.push_str(&format!(", scope=\"{}\"", self.scopes.join(" ")));
        }
        if invalid {
            v.push_str(", error=\"invalid_token\"");
        }
        v
    }

    /// RFC 9728 metadata for the resource at `path`.
    fn resource_metadata(&self, path: &str) -> Value {
        let mut doc = json!({
            "resource": self.resource(path),
            "authorization_servers": self.authorization_servers,
            "bearer_methods_supported": ["header"],
            "resource_name": "mcp-guard",
        });
        if !self.scopes.is_empty() {
            doc["scopes_supported"] = json!(self.scopes);
        }
        doc
    }

    /// RFC 8414 metadata of the facade.
    fn server_metadata(&self) -> Value {
        let base = &self.public_url;
        let mut doc = json!({
            "issuer": base,
            "authorization_endpoint": format!("{base}{AUTHORIZE_PATH}"),
            "token_endpoint": format!("{base}{TOKEN_PATH}"),
            "registration_endpoint": format!("{base}{REGISTER_PATH}"),
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "token_endpoint_auth_methods_supported": ["none"],
            "code_challenge_methods_supported": ["S256"],
            "authorization_response_iss_parameter_supported": true,
        });
        if !self.scopes.is_empty() {
            doc["scopes_supported"] = json!(self.scopes);
        }
        doc
    }

    /// Starts the facade's IdP threads, keeping what `previous` already holds (registered
    /// clients, codes, refresh tokens, the signing key) when it talks to the same IdP as the
    /// same client: a reload then logs no one out.
    pub fn start(&mut self, previous: Option<&Oauth>) {
        let Some(server) = &mut self.server else {
            return;
        };
        if let Some(old) = previous.and_then(|p| p.server.as_ref())
            && previous.is_some_and(|p| p.public_url == self.public_url)
            && old.calls.client() == server.calls.client()
        {
            server.shared = old.shared.clone();
            server.calls = old.calls.clone();
            server.tokens.keys = crate::auth::JwtKeys::Secret(server.shared.key_set());
        }
        server.calls.start();
    }
}

thread_local! {
    /// This worker's verified facade tokens: token → identity, audience and expiry; and
    /// the (configuration, revocation count) they were verified under.
    static VERIFIED: RefCell<VerifiedTokens> = RefCell::new(((0, 0), HashMap::new()));
}

/// The (configuration, revocation count) a worker's cache is for, and its tokens.
type VerifiedTokens = ((u64, u64), HashMap<Box<str>, CachedToken>);

#[derive(Clone)]
struct CachedToken {
    identity: Rc<Identity>,
    audience: Rc<str>,
    until: u64,
}

/// Seconds since the Unix epoch.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Why a facade token was not accepted; `NotOurs` lets another provider try it.
pub enum TokenRefusal {
    /// Not signed by this facade.
    NotOurs,
    /// Ours, but refused (the reason for audit).
    Refused(&'static str),
}

impl AuthServer {
    /// Verifies one of the facade's own access tokens for a request at `path`: signature,
    /// issuer, expiry, not revoked, and an audience that is this gateway or the endpoint the
    /// path belongs to.
    pub fn authenticate<'a>(
        &self,
        oauth: &Oauth,
        token: &str,
        path: &str,
        slot: &'a IdentitySlot,
    ) -> Result<Caller<'a>, TokenRefusal> {
        let now = unix_now();
        let generation = (
            self.tokens.generation,
            self.shared.revocations.load(Ordering::Relaxed),
        );
        let cached = VERIFIED.with(|c| {
            let mut c = c.borrow_mut();
            if c.0 != generation {
                c.1.clear();
                c.0 = generation;
            }
            c.1.get(token).filter(|t| now < t.until).cloned()
        });
        let entry = match cached {
            Some(hit) => hit,
            None => {
                // The facade signs with a secret: no key is ever fetched, so "its key is not held"
                // means the token is not one of ours.
                let v = self.tokens.verify(token, now).map_err(|e| match e {
                    Err(_)
                    | Ok(crate::auth::jwt::JwtError::BadSignature)
                    | Ok(crate::auth::jwt::JwtError::KeyMismatch)
                    | Ok(crate::auth::jwt::JwtError::AlgNotAllowed)
                    | Ok(crate::auth::jwt::JwtError::WrongIssuer) => TokenRefusal::NotOurs,
                    Ok(other) => TokenRefusal::Refused(other.reason()),
                })?;
                let audience = v
                    .claims
                    .get("aud")
                    .and_then(Value::as_str)
                    .ok_or(TokenRefusal::Refused("oauth_no_audience"))?;
                let family = v.claims.get("fam").and_then(Value::as_u64).unwrap_or(0);
                if self.shared.tables().is_revoked(family) {
                    return Err(TokenRefusal::Refused("oauth_token_revoked"));
                }
                let mut identity = self.tokens.identity_as(&v, AuthMethod::OAuth, "oauth:");
                // A token for one endpoint reaches that endpoint's server only, whichever path
                // it is presented at (the legacy messages URL names no endpoint of its own).
                if audience != oauth.public_url {
                    let path = audience
                        .strip_prefix(oauth.public_url.as_str())
                        .unwrap_or("");
                    let mut policy = (*identity.policy).clone();
                    policy.servers = Some(
                        oauth
                            .resource_routes
                            .iter()
                            .filter(|(p, _)| p == path)
                            .map(|(_, route)| route.to_string())
                            .collect(),
                    );
                    identity.policy = Arc::new(policy);
                }
                let entry = CachedToken {
                    identity: Rc::new(identity),
                    audience: Rc::from(audience),
                    until: v.expires_at.saturating_add(self.tokens.rules.leeway_secs),
                };
                VERIFIED.with(|c| {
                    let mut c = c.borrow_mut();
                    if c.1.len() >= TOKEN_CACHE {
                        c.1.clear();
                    }
                    c.1.insert(token.into(), entry.clone());
                });
                entry
            }
        };
        // A token for the whole gateway works everywhere; one for an endpoint only there
        // (paths that are no endpoint's, like `/routes` and legacy messages, take any of
        // the gateway's own).
        let fits = *entry.audience == oauth.public_url
            || match oauth.resource_path_of(path) {
                Some(p) => entry.audience.strip_prefix(oauth.public_url.as_str()) == Some(p),
                None => oauth.is_own_resource(&entry.audience),
            };
        if !fits {
            return Err(TokenRefusal::Refused("oauth_wrong_audience"));
        }
        let identity: &'a Rc<Identity> = slot.get_or_init(|| entry.identity.clone());
        Ok(Caller {
            identity,
            rate_key: RateKey::Identity(&identity.id),
            expires_at: Some(entry.until),
        })
    }

    /// Signs an access token for `user`.
    fn access_token(&self, oauth: &Oauth, g: &Issue<'_>, now: u64) -> String {
        let header = B64.encode(br#"{"alg":"HS256","typ":"at+jwt"}"#);
        let claims = json!({
            "iss": oauth.public_url,
            "sub": g.user,
            "aud": g.resource,
            "iat": now,
            "exp": now + state::ACCESS_TTL_SECS,
            "scope": g.scopes.join(" "),
            "client_id": g.client_id,
            "fam": g.family,
            "jti": B64.encode(crate::mcp::session::random_bytes::<12>()),
        });
        let input = format!("{header}.{}", B64.encode(claims.to_string()));
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.shared.key);
        let tag = ring::hmac::sign(&key, input.as_bytes());
        format!("{input}.{}", B64.encode(tag.as_ref()))
    }
}

/// What a token response is issued for.
struct Issue<'a> {
    user: &'a str,
    scopes: &'a [String],
    resource: &'a str,
    client_id: &'a str,
    family: u64,
}

/// A random value for codes, states and tokens: 256 bits, base64url.
fn random_token() -> String {
    B64.encode(crate::mcp::session::random_bytes::<32>())
}

/// The S256 challenge of `verifier` (RFC 7636 §4.2).
pub fn s256(verifier: &str) -> String {
    B64.encode(ring::digest::digest(
        &ring::digest::SHA256,
        verifier.as_bytes(),
    ))
}

/// RFC 7636 §4.1: 43-128 unreserved characters.
fn is_verifier(v: &str) -> bool {
    (43..=128).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

/// An S256 challenge: the 43 base64url characters of a SHA-256 digest.
fn is_challenge(c: &str) -> bool {
    c.len() == 43
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

/// A redirect URI a client may register: no fragment, nothing a header line could not carry,
/// and either `https://host…` or `http://` to a loopback host (MCP: "All redirect URIs MUST
/// be either localhost or use HTTPS"; so no private-use schemes, and never `javascript:`,
/// `data:` or `file:`).
pub fn is_registrable_redirect_uri(uri: &str) -> bool {
    if uri.is_empty()
        || uri.len() > MAX_REDIRECT_URI_BYTES
        || uri.contains('#')
        || !uri.bytes().all(|b| (0x21..=0x7e).contains(&b))
    {
        return false;
    }
    let Some((scheme, rest)) = uri.split_once(':') else {
        return false;
    };
    let host_of = |rest: &str| -> Option<String> {
        let authority = rest.strip_prefix("//")?.split(['/', '?']).next()?;
        if authority.is_empty() || authority.contains('@') {
            return None;
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            // An IPv6 literal: closed, a valid address, then nothing or `:port`.
            let (addr, after) = v6.split_once(']')?;
            addr.parse::<std::net::Ipv6Addr>().ok()?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':')?),
            };
            (addr.to_string(), port)
        } else {
            match authority.split_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (authority.to_string(), None),
            }
        };
        let host_ok = !host.is_empty()
            && (authority.starts_with('[')
                || host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')));
        // A port is 1-65535 in decimal; an empty one (`host:`) is the default.
        let port_ok = port.is_none_or(|p| {
            p.is_empty()
                || (p.len() <= 5
                    && p.bytes().all(|b| b.is_ascii_digit())
                    && p.parse::<u32>().is_ok_and(|n| (1..=65535).contains(&n)))
        });
        (host_ok && port_ok).then_some(host)
    };
    // The code, state and issuer are appended to the query; one already there would make
    // two values of one parameter reach the client.
    // Names are compared decoded (`%63ode` is `code` to the client); one that does not
    // decode is refused too.
    let query_clash = rest.split_once('?').is_some_and(|(_, q)| {
        form::names(q.as_bytes()).iter().any(|name| {
            name.as_deref().is_none_or(|n| {
                matches!(
                    n,
                    "code" | "state" | "iss" | "error" | "error_description" | "error_uri"
                )
            })
        })
    });
    if query_clash {
        return false;
    }
    match scheme {
        "https" => host_of(rest).is_some(),
        "http" => host_of(rest).is_some_and(|h| is_loopback_host(&h)),
        _ => false,
    }
}

fn is_loopback_host(h: &str) -> bool {
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

// ---------------------------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------------------------

fn finish(mut r: Reply) -> Reply {
    // Nothing here is an MCP request: no audit event of its own (registrations and sign-ins
    // are logged), and nothing a cache may keep (RFC 6749 §5.1).
    r.audit.skip = true;
    r.headers.push(("cache-control", "no-store".into()));
    r.headers.push(("x-content-type-options", "nosniff".into()));
    r
}

/// Makes a facade reply an audit event of its own, named `event` (never carrying a token,
/// code, state or secret).
fn audited(
    mut r: Reply,
    event: &str,
    decision: &'static str,
    reason: Option<&'static str>,
    user: Option<&str>,
) -> Reply {
    r.audit.skip = false;
    r.audit.messages = vec![(event.to_string(), None)];
    r.audit.decision = Some(decision);
    if reason.is_some() {
        r.reason = reason;
    }
    if let Some(u) = user {
        r.audit.identity = Some(format!("oauth:{u}").into());
        r.audit.auth_method = Some("oauth");
    }
    r
}

fn json_reply(status: u16, doc: &Value) -> Reply {
    let mut r = Reply::json(status, doc.to_string().into_bytes(), M_NONE);
    // Browser-based clients read metadata, register and redeem codes cross-origin; no
    // cookie or ambient credential is involved in any of these.
    r.headers.push(("access-control-allow-origin", "*".into()));
    finish(r)
}

/// An OAuth error response (RFC 6749 §5.2).
fn oauth_error(status: u16, error: &str, description: &str) -> Reply {
    let mut r = json_reply(
        status,
        &json!({ "error": error, "error_description": description }),
    );
    r.reason = Some("oauth_error");
    r
}

/// An error shown to the person in the browser: used whenever the redirect URI is not (yet)
/// known to be the client's, so that no error is ever sent to an address nobody validated.
fn error_page(status: u16, text: &str) -> Reply {
    let mut r = Reply::json(status, format!("{text}\n").into_bytes(), M_NONE);
    r.headers.clear();
    r.headers
        .push(("content-type", "text/plain; charset=utf-8".into()));
    r.reason = Some("oauth_error");
    finish(r)
}

fn redirect(to: String) -> Reply {
    let mut r = Reply::json(302, Vec::new(), M_NONE);
    r.headers.clear();
    r.headers.push(("location", to));
    finish(r)
}

fn method_not_allowed(allow: &'static str) -> Reply {
    let mut r = Reply::error(
        &crate::error::GatewayError::MethodNotAllowed(allow),
        None,
        M_NONE,
    );
    r.audit.skip = true;
    r
}

/// The answer to a CORS preflight of a facade endpoint.
fn preflight(allow: &'static str) -> Reply {
    let mut r = Reply::json(204, Vec::new(), M_NONE);
    r.headers.clear();
    r.headers.push(("access-control-allow-origin", "*".into()));
    r.headers
        .push(("access-control-allow-methods", allow.into()));
    r.headers.push((
        "access-control-allow-headers",
        "authorization, content-type, mcp-protocol-version".into(),
    ));
    r.headers.push(("access-control-max-age", "600".into()));
    r.body = crate::pipeline::ReplyBody::Empty;
    finish(r)
}

// ---------------------------------------------------------------------------------------------
// Endpoints
// ---------------------------------------------------------------------------------------------

/// Answers a facade or discovery request (its body, if any, already read).
pub async fn serve(
    cfg: &Settings,
    head: &RequestHead,
    body: &[u8],
    endpoint: Endpoint,
    peer: SocketAddr,
) -> Reply {
    let Some(oauth) = cfg.auth.oauth.as_ref() else {
        return error_page(404, "not found");
    };
    let get_only = matches!(
        endpoint,
        Endpoint::ResourceMetadata(_) | Endpoint::ServerMetadata | Endpoint::Callback
    );
    if head.method == Method::Options
        && !matches!(endpoint, Endpoint::Authorize | Endpoint::Callback)
    {
        return preflight(if get_only { "GET" } else { "POST" });
    }
    match (&endpoint, head.method) {
        (Endpoint::Authorize, Method::Get | Method::Post) => {}
        (Endpoint::Authorize, _) => return method_not_allowed("GET, POST"),
        (_, Method::Get) if get_only => {}
        (_, Method::Post) if !get_only => {}
        _ => return method_not_allowed(if get_only { "GET" } else { "POST" }),
    }
    let query = head.target.get(head.path_len + 1..).unwrap_or_default();
    match (endpoint, &oauth.server) {
        (Endpoint::ResourceMetadata(path), _) => json_reply(200, &oauth.resource_metadata(&path)),
        (Endpoint::ServerMetadata, Some(_)) => json_reply(200, &oauth.server_metadata()),
        (Endpoint::Register, Some(s)) => register(s, head, body, peer),
        (Endpoint::Authorize, Some(s)) if head.method == Method::Post => {
            consent(oauth, s, head, body)
        }
        (Endpoint::Authorize, Some(s)) => authorize(oauth, s, query, peer.ip()),
        (Endpoint::Callback, Some(s)) => callback(oauth, s, head, query).await,
        (Endpoint::Token, Some(s)) => token(oauth, s, head, body),
        _ => error_page(404, "not found"),
    }
}

/// RFC 7591: registers a public client after checking every redirect URI it names.
fn register(s: &AuthServer, head: &RequestHead, body: &[u8], peer: SocketAddr) -> Reply {
    let bad = |why: &str| oauth_error(400, "invalid_client_metadata", why);
    let json_type = head
        .h
        .content_type()
        .and_then(|c| c.split(';').next())
        .is_some_and(|c| c.trim().eq_ignore_ascii_case("application/json"));
    if !json_type {
        return oauth_error(400, "invalid_request", "registration is a JSON document");
    }
    if body.len() > MAX_FORM_BYTES {
        return bad("registration document too large");
    }
    // The budget is spent before the document is read: a flood costs a lookup each.
    if let Err(Busy::RateLimited(wait)) = s
        .shared
        .tables()
        .take_registration(peer.ip(), Instant::now())
    {
        let mut r = oauth_error(
            429,
            "too_many_requests",
            "too many registrations from this address",
        );
        // Rounded up: a client that waits exactly this long finds a registration ready.
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        r.headers.push(("retry-after", secs.to_string()));
        return r;
    }
    // A member named twice is refused: parsers that keep the first and the last would see
    // two different clients.
    let doc = match crate::auth::jwt::parse_object(body) {
        Ok(doc) => doc,
        Err(why) => {
            return bad(&format!(
                "registration is not a JSON object with unique members: {}",
                why.chars().take(120).collect::<String>()
            ));
        }
    };
    let uris: Vec<String> = match doc.get("redirect_uris") {
        Some(Value::Array(list)) if !list.is_empty() && list.len() <= MAX_REDIRECT_URIS => {
            let mut uris = Vec::with_capacity(list.len());
            for u in list {
                match u.as_str() {
                    Some(u) if is_registrable_redirect_uri(u) => uris.push(u.to_string()),
                    _ => {
                        return oauth_error(
                            400,
                            "invalid_redirect_uri",
                            "each redirect URI must be https, or http to a loopback host, with a \
                             valid host and port, without a fragment, and without code, state, \
                             iss or error in its query",
                        );
                    }
                }
            }
            uris
        }
        _ => {
            return oauth_error(
                400,
                "invalid_redirect_uri",
                "1 to 10 redirect_uris are required",
            );
        }
    };
    let subset = |key: &str, allowed: &[&str]| match doc.get(key) {
        None => true,
        Some(Value::Array(list)) => list
            .iter()
            .all(|v| v.as_str().is_some_and(|v| allowed.contains(&v))),
        _ => false,
    };
    if !subset("grant_types", &["authorization_code", "refresh_token"]) {
        return bad("grant_types may hold authorization_code and refresh_token only");
    }
    if !subset("response_types", &["code"]) {
        return bad("response_types may hold code only");
    }
    let name = match doc.get("client_name") {
        None => None,
        // Shown on the consent page: no control, bidi, zero-width or other invisible
        // characters that would let one name pass for another.
        Some(Value::String(n))
            if n.len() <= 200
                && !n.trim().is_empty()
                && !n.chars().any(crate::auth::jwt::forbidden_in_identity) =>
        {
            Some(n.clone())
        }
        _ => {
            return bad(
                "client_name must be a string of at most 200 bytes without control, bidi or \
                 invisible characters",
            );
        }
    };
    let id = random_token();
    let added = s.shared.tables().register(
        id.clone(),
        Client {
            redirect_uris: uris.clone(),
            name: name.clone(),
            from: peer.ip(),
        },
        Instant::now(),
    );
    if added.is_err() {
        let mut r = oauth_error(
            503,
            "temporarily_unavailable",
            "every registered client is in use; try again later",
        );
        r.headers.push(("retry-after", "60".into()));
        return audited(
            r,
            "oauth/register",
            "deny",
            Some("oauth_clients_full"),
            None,
        );
    }
    tracing::info!(target: "mcp_guard::auth", "OAuth client registered from {} ({:?})", peer.ip(), name.as_deref().unwrap_or(""));
    let mut answer = json!({
        "client_id": id,
        "client_id_issued_at": unix_now(),
        "redirect_uris": uris,
        // Public clients: PKCE binds each code to the client that asked for it. A client that
        // asked for a secret learns here that it has none (RFC 7591 §3.2.1).
        "token_endpoint_auth_method": "none",
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
    });
    if let Some(n) = name {
        answer["client_name"] = n.into();
    }
    audited(
        json_reply(201, &answer),
        "oauth/register",
        "allow",
        None,
        None,
    )
}

/// `/oauth/authorize`: checks the client and its redirect URI (errors shown as a page), then
/// everything else (errors sent back to the client's redirect URI), and sends the browser
/// to the IdP with a state of the facade's own.
fn authorize(oauth: &Oauth, s: &AuthServer, query: &str, peer: IpAddr) -> Reply {
    let q = match form::parse(query.as_bytes()) {
        Ok(q) => q,
        Err(e) => return error_page(400, &format!("Invalid authorization request: {e}.")),
    };
    let param = |n: &str| q.get(n).map(String::as_str);
    let Some(client_id) = param("client_id") else {
        return error_page(400, "Invalid authorization request: no client_id.");
    };
    let Some(client) = s.shared.tables().client(client_id).cloned() else {
        return error_page(
            400,
            "Unknown client: it may have registered with an earlier run of the gateway; \
             it should register again.",
        );
    };
    let (redirect_uri, explicit) = match param("redirect_uri") {
        Some(u) if client.redirect_uris.iter().any(|r| r == u) => (u.to_string(), true),
        Some(_) => {
            return error_page(
                400,
                "Invalid authorization request: redirect_uri is not one this client registered \
                 (compared exactly).",
            );
        }
        None if client.redirect_uris.len() == 1 => (client.redirect_uris[0].clone(), false),
        None => {
            return error_page(
                400,
                "Invalid authorization request: redirect_uri is required (the client registered several).",
            );
        }
    };
    // Anyone may register any redirect URI, so a registered one is not yet a trusted one:
    // until the person has approved this client on the consent page, errors are shown here
    // rather than sent there (OAuth 2.1 §7.12.2; MCP: "SHOULD only automatically redirect
    // the user agent if it trusts the redirection URI").
    let client_state = param("state").unwrap_or_default().to_string();
    let back = |error: &str, description: &str| {
        error_page(
            400,
            &format!("The application's request was refused ({error}): {description}."),
        )
    };
    if client_state.is_empty() {
        return back("invalid_request", "state is required");
    }
    if param("response_type") != Some("code") {
        return back("unsupported_response_type", "response_type must be code");
    }
    match (param("code_challenge"), param("code_challenge_method")) {
        (Some(c), Some("S256")) if is_challenge(c) => {}
        (Some(_), Some("S256")) => {
            return back("invalid_request", "code_challenge is not an S256 challenge");
        }
        (None, _) => {
            return back(
                "invalid_request",
                "PKCE is required: code_challenge is missing",
            );
        }
        _ => return back("invalid_request", "PKCE code_challenge_method must be S256"),
    }
    let resource = match param("resource").map(|r| oauth.own_resource(r)) {
        Some(Some(r)) => r,
        Some(None) => return back("invalid_target", "resource is not this server"),
        None => oauth.public_url.clone(),
    };
    let scopes: Vec<String> = match param("scope") {
        None => oauth.scopes.clone(),
        Some(list) => {
            let asked: Vec<String> = list
                .split(' ')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            if asked.iter().any(|a| !oauth.scopes.contains(a)) {
                return back("invalid_scope", "a requested scope is not offered");
            }
            asked
        }
    };
    let ticket = random_token();
    let pending = Pending::new(
        client_id.to_string(),
        redirect_uri.clone(),
        explicit,
        client_state.clone(),
        param("code_challenge").unwrap_or_default().to_string(),
        scopes,
        resource,
        random_token(),
        peer,
    );
    let page = consent_page(oauth, s, &client, &pending, &ticket);
    s.shared
        .tables()
        .add_pending(ticket, pending, Instant::now());
    page
}

/// Escapes text for HTML.
fn html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The consent page: every client registered itself, so the person must see which one is
/// asking (its name, where the code goes, what it may do) before the facade signs them in at
/// the IdP as its own client (MCP security best practices, confused deputy: "MUST obtain user
/// consent for each dynamically registered client"). It cannot be framed.
fn consent_page(
    oauth: &Oauth,
    s: &AuthServer,
    client: &Client,
    p: &Pending,
    ticket: &str,
) -> Reply {
    let name = client.name.as_deref().unwrap_or("An unnamed application");
    let scopes = if p.scopes.is_empty() {
        "every tool this gateway allows".to_string()
    } else {
        p.scopes.join(", ")
    };
    let idp = &s.calls.client().authorization_url;
    let idp_host = idp
        .split_once("://")
        .and_then(|(_, r)| r.split(['/', '?']).next())
        .unwrap_or_default();
    let body = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Allow access?</title></head>\
         <body><h1>Allow access to {gateway}?</h1>\
         <p><strong>{name}</strong> (client <code>{id}</code>) asks to use the MCP servers at \
         <code>{resource}</code> as you, with: {scopes}.</p>\
         <p>If you allow it, you sign in at <code>{idp_host}</code>, and the application receives \
         its access at <code>{redirect}</code>.</p>\
         {local}<p>Only allow it if you started this from that application.</p>\
         <form method=\"post\" action=\"{AUTHORIZE_PATH}\">\
         <input type=\"hidden\" name=\"ticket\" value=\"{ticket}\">\
         <button name=\"decision\" value=\"allow\">Allow</button> \
         <button name=\"decision\" value=\"deny\">Deny</button></form></body></html>",
        gateway = html(&oauth.public_url),
        name = html(name),
        id = html(&p.client_id),
        resource = html(&p.resource),
        scopes = html(&scopes),
        idp_host = html(idp_host),
        redirect = html(&p.redirect_uri),
        local = if p.redirect_uri.starts_with("http://") {
            // Any program on the person's machine can listen on a loopback port and claim to
            // be any application (MCP: "SHOULD display additional warnings for
            // localhost-only redirect URIs").
            "<p><strong>Warning:</strong> the access goes to a program on this computer; \
             any program here could have asked under this name.</p>"
        } else {
            ""
        },
    );
    let mut r = Reply::json(200, body.into_bytes(), M_NONE);
    r.headers.clear();
    r.headers
        .push(("content-type", "text/html; charset=utf-8".into()));
    r.headers.push(("x-frame-options", "DENY".into()));
    r.headers.push((
        "content-security-policy",
        "default-src 'none'; frame-ancestors 'none'; base-uri 'none'".into(),
    ));
    r.headers.push(("referrer-policy", "no-referrer".into()));
    finish(r)
}

/// The consent page's answer: only from the gateway's own page (a browser's `Origin` on a
/// form POST), once per ticket. Allowed: the browser goes to the IdP with a state of the
/// facade's own; denied: back to the client with `access_denied`.
fn consent(oauth: &Oauth, s: &AuthServer, head: &RequestHead, body: &[u8]) -> Reply {
    // A page elsewhere could submit this form in the person's browser; the browser names that
    // page's origin, which is refused (and a POST without one is not from a browser's form).
    // An origin is serialised without a path, so never with a trailing slash.
    let same_origin = head
        .h
        .origin()
        .is_some_and(|o| o.eq_ignore_ascii_case(&oauth.public_url));
    if !same_origin {
        return error_page(
            403,
            "This approval did not come from the gateway's own page.",
        );
    }
    let q = match form::parse(body) {
        Ok(q) => q,
        Err(e) => return error_page(400, &format!("Invalid approval: {e}.")),
    };
    let now = Instant::now();
    let Some(mut pending) = q
        .get("ticket")
        .and_then(|t| s.shared.tables().take_pending(t, now))
        .filter(|p| !p.consented)
    else {
        return error_page(
            400,
            "This approval is unknown, expired, or already given; start again from the application.",
        );
    };
    if q.get("decision").map(String::as_str) != Some("allow") {
        return redirect(form::with_query(
            &pending.redirect_uri,
            &[
                ("error", "access_denied"),
                ("error_description", "the user denied access"),
                ("state", &pending.client_state),
                ("iss", &oauth.public_url),
            ],
        ));
    }
    pending.consented = true;
    // The browser that approved gets a cookie only it holds; the callback requires it. Without
    // it, whoever posted the approval (a script, not the person) could hand the IdP link to a
    // person signed in there and receive that person's code at its own redirect URI.
    pending.browser = random_token();
    let browser = pending.browser.clone();
    let our_state = random_token();
    let idp_challenge = s256(&pending.idp_verifier);
    s.shared
        .tables()
        .add_pending(our_state.clone(), pending, now);
    let idp = s.calls.client();
    let scope = idp.scopes.join(" ");
    let mut pairs = vec![
        ("response_type", "code"),
        ("client_id", idp.client_id.as_str()),
        ("redirect_uri", idp.redirect_uri.as_str()),
        ("state", our_state.as_str()),
        ("code_challenge", idp_challenge.as_str()),
        ("code_challenge_method", "S256"),
    ];
    if !scope.is_empty() {
        pairs.push(("scope", scope.as_str()));
    }
    let mut r = redirect(form::with_query(&idp.authorization_url, &pairs));
    r.headers.push((
        "set-cookie",
        browser_cookie(oauth, &our_state, &browser, state::PENDING_TTL.as_secs()),
    ));
    r
}

/// The name of the cookie binding the sign-in `state` to the browser that approved it (one
/// per sign-in, so two sign-ins in one browser do not overwrite each other's). On https it
/// carries the `__Host-` prefix: then only this origin over https could have set it (no
/// sibling subdomain, no plain-http page). Browsers allow that prefix only with `Secure`, so
/// a gateway on http (loopback, for development) uses the bare name.
fn browser_cookie_name(oauth: &Oauth, state: &str) -> String {
    let prefix = if oauth.public_url.starts_with("https://") {
        "__Host-"
    } else {
        ""
    };
    let id: String = state.chars().take(16).collect();
    format!("{prefix}mcp-guard-signin-{id}")
}

/// The `Set-Cookie` value for that cookie (`max_age` 0 deletes it). `SameSite=Lax` is sent on
/// the IdP's top-level redirect back to the callback, and on nothing a third-party page
/// posts or embeds.
fn browser_cookie(oauth: &Oauth, state: &str, value: &str, max_age: u64) -> String {
    let secure = if oauth.public_url.starts_with("https://") {
        "; Secure"
    } else {
        ""
    };
    format!(
        "{}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Lax{secure}",
        browser_cookie_name(oauth, state)
    )
}

/// Whether the request carries the cookie `state`'s approval set, with `expected` as value
/// (compared in constant time).
fn has_browser_cookie(oauth: &Oauth, head: &RequestHead, state: &str, expected: &str) -> bool {
    let name = browser_cookie_name(oauth, state);
    let Some(cookies) = head.h.cookie.as_deref() else {
        return false;
    };
    let mut found = false;
    for pair in cookies.split(';') {
        if let Some((n, v)) = pair.trim().split_once('=')
            && n == name
        {
            found |= same_secret(v, expected);
        }
    }
    found && !expected.is_empty()
}

/// Constant-time equality of two secrets (their digests, so lengths leak nothing either).
fn same_secret(a: &str, b: &str) -> bool {
    let da = ring::digest::digest(&ring::digest::SHA256, a.as_bytes());
    let db = ring::digest::digest(&ring::digest::SHA256, b.as_bytes());
    da.as_ref()
        .iter()
        .zip(db.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// The IdP's callback: the facade's state (once), the IdP's code exchanged off the worker,
/// then the browser goes back to the client with a one-time code and the client's state.
async fn callback(oauth: &Oauth, s: &AuthServer, head: &RequestHead, query: &str) -> Reply {
    let q = match form::parse(query.as_bytes()) {
        Ok(q) => q,
        Err(e) => return error_page(400, &format!("Invalid callback: {e}.")),
    };
    let Some(state) = q.get("state") else {
        return error_page(400, "Invalid callback: no state.");
    };
    let taken = s.shared.tables().take_pending(state, Instant::now());
    let Some(pending) = taken.filter(|p| p.consented) else {
        return error_page(
            400,
            "This sign-in is unknown, expired, or already finished; start again from the application.",
        );
    };
    let forget = browser_cookie(oauth, state, "", 0);
    if !has_browser_cookie(oauth, head, state, &pending.browser) {
        // Spent all the same: a sign-in link that reached another browser is dead.
        tracing::warn!(target: "mcp_guard::auth", "OAuth callback for client {} from a browser that did not approve it; refused", pending.client_id);
        let mut r = error_page(
            400,
            "This sign-in was not approved in this browser. If you did not start it yourself, \
             someone may have sent you this link; otherwise start again from the application.",
        );
        r.headers.push(("set-cookie", forget));
        return audited(
            r,
            "oauth/sign_in",
            "deny",
            Some("oauth_browser_mismatch"),
            None,
        );
    }
    // A failed sign-in: the client hears why, and the audit says so.
    let back = |pairs: &[(&str, &str)], why: &'static str| {
        let mut all = pairs.to_vec();
        all.push(("state", pending.client_state.as_str()));
        all.push(("iss", oauth.public_url.as_str()));
        let mut r = redirect(form::with_query(&pending.redirect_uri, &all));
        r.headers.push(("set-cookie", forget.clone()));
        audited(r, "oauth/sign_in", "deny", Some(why), None)
    };
    if q.contains_key("error") {
        return back(
            &[
                ("error", "access_denied"),
                (
                    "error_description",
                    "the identity provider did not sign the user in",
                ),
            ],
            "oauth_idp_refused",
        );
    }
    let Some(code) = q.get("code") else {
        return back(
            &[
                ("error", "server_error"),
                ("error_description", "the identity provider sent no code"),
            ],
            "oauth_idp_no_code",
        );
    };
    let (tx, rx) = async_channel::bounded(1);
    let job = idp::Job {
        code: code.clone(),
        verifier: pending.idp_verifier.clone(),
        reply: tx,
    };
    if let Err(why) = s.calls.submit(job) {
        return back(
            &[
                ("error", "temporarily_unavailable"),
                ("error_description", why),
            ],
            "oauth_idp_busy",
        );
    }
    let user = match crate::runtime::deadlines::timeout(idp::JOB_TIMEOUT, rx.recv()).await {
        Ok(Ok(Ok(user))) => user,
        Ok(Ok(Err(_))) | Ok(Err(_)) => {
            return back(
                &[
                    ("error", "server_error"),
                    (
                        "error_description",
                        "the sign-in could not be completed at the identity provider",
                    ),
                ],
                "oauth_sign_in_failed",
            );
        }
        Err(_) => {
            return back(
                &[
                    ("error", "temporarily_unavailable"),
                    (
                        "error_description",
                        "the identity provider did not answer in time",
                    ),
                ],
                "oauth_idp_timeout",
            );
        }
    };
    let code = random_token();
    tracing::info!(target: "mcp_guard::auth", "OAuth sign-in of oauth:{user} for client {}", pending.client_id);
    let redirect_to = pending.redirect_uri.clone();
    let (client_state, iss) = (pending.client_state.clone(), oauth.public_url.clone());
    let mut r = redirect(form::with_query(
        &redirect_to,
        &[("code", &code), ("state", &client_state), ("iss", &iss)],
    ));
    r.headers.push(("set-cookie", forget));
    let r = audited(r, "oauth/sign_in", "allow", None, Some(&user));
    s.shared.tables().add_code(
        code.clone(),
        Grant::from_pending(pending, user),
        Instant::now(),
    );
    r
}

/// `/oauth/token`: the authorization-code and refresh-token grants, for public clients.
fn token(oauth: &Oauth, s: &AuthServer, head: &RequestHead, body: &[u8]) -> Reply {
    let form_type = head
        .h
        .content_type()
        .and_then(|c| c.split(';').next())
        .is_some_and(|c| {
            c.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if !form_type {
        return oauth_error(
            400,
            "invalid_request",
            "the token request is a form (application/x-www-form-urlencoded)",
        );
    }
    if body.len() > MAX_FORM_BYTES {
        return oauth_error(400, "invalid_request", "token request too large");
    }
    let q = match form::parse(body) {
        Ok(q) => q,
        Err(e) => return oauth_error(400, "invalid_request", &e.to_string()),
    };
    let param = |n: &str| q.get(n).map(String::as_str);
    let Some(client_id) = param("client_id") else {
        return oauth_error(
            401,
            "invalid_client",
            "client_id is required (public clients)",
        );
    };
    if s.shared.tables().client(client_id).is_none() {
        return oauth_error(401, "invalid_client", "unknown client");
    }
    let now = Instant::now();
    let grant_failed = |e: GrantError| {
        // A refusal may have revoked a family (a replayed code or refresh token): the
        // workers' verified-token caches must look again.
        s.shared.revocations.fetch_add(1, Ordering::Relaxed);
        match e {
            // Theft signals: a family was revoked. Audited, never with the code or token.
            GrantError::Invalid(why @ ("code_reused" | "refresh_reused")) => audited(
                oauth_error(400, "invalid_grant", why),
                "oauth/token",
                "deny",
                Some(if why == "code_reused" {
                    "oauth_code_reused"
                } else {
                    "oauth_refresh_reused"
                }),
                None,
            ),
            GrantError::Invalid(why) => oauth_error(400, "invalid_grant", why),
            GrantError::WrongClient => audited(
                oauth_error(400, "invalid_grant", "issued to another client"),
                "oauth/token",
                "deny",
                Some("oauth_grant_wrong_client"),
                None,
            ),
        }
    };
    match param("grant_type") {
        Some("authorization_code") => {
            let (Some(code), Some(verifier)) = (param("code"), param("code_verifier")) else {
                return oauth_error(
                    400,
                    "invalid_request",
                    "code and code_verifier are required",
                );
            };
            let taken = s.shared.tables().take_code(code, client_id, now);
            let (grant, family) = match taken {
                Ok(g) => g,
                Err(e) => return grant_failed(e),
            };
            // The code is spent from here on: a wrong verifier or redirect URI burns it.
            let refuse = |error: &str, why: &str| {
                s.shared.tables().revoke(family, now);
                s.shared.revocations.fetch_add(1, Ordering::Relaxed);
                oauth_error(400, error, why)
            };
            if !is_verifier(verifier) || s256(verifier) != grant.challenge {
                return refuse(
                    "invalid_grant",
                    "code_verifier does not match the challenge",
                );
            }
            match param("redirect_uri") {
                Some(u) if u != grant.redirect_uri => {
                    return refuse(
                        "invalid_grant",
                        "redirect_uri differs from the authorization request's",
                    );
                }
                None if grant.redirect_explicit => {
                    return refuse(
                        "invalid_request",
                        "redirect_uri is required: the authorization request named it",
                    );
                }
                _ => {}
            }
            if param("resource")
                .is_some_and(|r| oauth.own_resource(r).as_deref() != Some(grant.resource.as_str()))
            {
                return refuse(
                    "invalid_target",
                    "resource differs from the authorization request's",
                );
            }
            issue(
                oauth,
                s,
                &Issue {
                    user: &grant.user,
                    scopes: &grant.scopes,
                    resource: &grant.resource,
                    client_id,
                    family,
                },
            )
        }
        Some("refresh_token") => {
            let Some(refresh) = param("refresh_token") else {
                return oauth_error(400, "invalid_request", "refresh_token is required");
            };
            // Checked, not used: a request refused below (scope, resource) leaves the token
            // as it was.
            let checked = s.shared.tables().check_refresh(refresh, client_id, now);
            let r = match checked {
                Ok(r) => r,
                Err(e) => {
                    if e == GrantError::Invalid("refresh_reused") {
                        tracing::warn!(target: "mcp_guard::auth", "a rotated-out refresh token of client {client_id} was presented again; its family is revoked");
                    }
                    return grant_failed(e);
                }
            };
            let scopes: Vec<String> = match param("scope") {
                None => r.scopes.clone(),
                Some(list) => {
                    let asked: Vec<String> = list
                        .split(' ')
                        .filter(|x| !x.is_empty())
                        .map(str::to_string)
                        .collect();
                    if asked.iter().any(|a| !r.scopes.contains(a)) {
                        return oauth_error(
                            400,
                            "invalid_scope",
                            "a refresh may narrow the scopes, not widen them",
                        );
                    }
                    asked
                }
            };
            if param("resource")
                .is_some_and(|x| oauth.own_resource(x).as_deref() != Some(r.resource.as_str()))
            {
                return oauth_error(400, "invalid_target", "resource differs from the grant's");
            }
            if let Err(e) = s.shared.tables().rotate_refresh(refresh, client_id, now) {
                return grant_failed(e);
            }
            issue(
                oauth,
                s,
                &Issue {
                    user: &r.user,
                    scopes: &scopes,
                    resource: &r.resource,
                    client_id,
                    family: r.family,
                },
            )
        }
        Some(_) => oauth_error(
            400,
            "unsupported_grant_type",
            "authorization_code or refresh_token",
        ),
        None => oauth_error(400, "invalid_request", "grant_type is required"),
    }
}

/// A token response: a signed access token and the family's next refresh token.
fn issue(oauth: &Oauth, s: &AuthServer, g: &Issue<'_>) -> Reply {
    let access = s.access_token(oauth, g, unix_now());
    let refresh = random_token();
    s.shared.tables().add_refresh(
        refresh.clone(),
        Refresh::new(g.family, g.client_id, g.user, g.scopes, g.resource),
        Instant::now(),
    );
    let mut answer = json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": state::ACCESS_TTL_SECS,
        "refresh_token": refresh,
    });
    if !g.scopes.is_empty() {
        answer["scope"] = g.scopes.join(" ").into();
    }
    let mut r = json_reply(200, &answer);
    r.headers.push(("pragma", "no-cache".into()));
    r
}

/// The refusal a token of the facade's earns in the chain.
pub fn refusal(why: &'static str) -> AuthError {
    AuthError::Invalid(AuthMethod::OAuth, why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_uris_are_https_loopback_http_or_private_use_schemes() {
        for ok in [
            "https://app.example.com/cb",
            "https://app.example.com:8443/cb?x=1",
            "http://127.0.0.1:33418/callback",
            "http://localhost:6274/oauth/callback",
            "http://[::1]/cb",
            "http://[::1]:8080/cb",
            "https://app.example.com:/cb",
            "https://app.example.com/cb?client=1&codex=2",
        ] {
            assert!(is_registrable_redirect_uri(ok), "{ok}");
        }
        for bad in [
            "javascript:alert(1)",
            "data:text/html,x",
            "file:///etc/passwd",
            "http://evil.example.com/cb",
            "https://app.example.com/cb#frag",
            "https://app.example.com/c b",
            "https://app.example.com/cb\r\nx: y",
            "https:///cb",
            "https://user@app.example.com/cb",
            "http://127.0.0.1.evil.com/cb",
            "com.example.app:/oauth2redirect",
            "",
            "https://[::1/cb",
            "https://[nothost]/cb",
            "https://[::1]x/cb",
            "https://app.example.com:99999/cb",
            "https://app.example.com:0/cb",
            "https://app.example.com:8a/cb",
            "https://app.example.com:-1/cb",
            "https://app.example.com/cb?code=x",
            "https://app.example.com/cb?a=1&state=x",
            "https://app.example.com/cb?iss",
            "https://app.example.com/cb?%63ode=x",
            "https://app.example.com/cb?st%61te=x",
            "https://app.example.com/cb?%zz=1",
            "https://app%2eexample.com/cb",
        ] {
            assert!(!is_registrable_redirect_uri(bad), "{bad}");
        }
    }

    #[test]
    fn resources_are_this_gateway_or_its_endpoints_in_any_case_of_scheme_and_host() {
        let o = Oauth {
            public_url: "https://mcp.example.com".into(),
            resource_paths: vec!["/mcp/files".into(), "/mcp".into()],
            resource_routes: vec![
                ("/mcp/files".into(), Arc::from("files")),
                ("/mcp".into(), Arc::from("default")),
            ],
            authorization_servers: vec![],
            scopes: vec![],
            server: None,
        };
        for (given, want) in [
            ("https://mcp.example.com", "https://mcp.example.com"),
            ("https://mcp.example.com/", "https://mcp.example.com"),
            ("HTTPS://MCP.Example.com/mcp", "https://mcp.example.com/mcp"),
            (
                "https://mcp.example.com/mcp/files",
                "https://mcp.example.com/mcp/files",
            ),
        ] {
            assert_eq!(o.own_resource(given).as_deref(), Some(want), "{given}");
        }
        for other in [
            "https://mcp.example.com/MCP",
            "https://mcp.example.com/mcp/",
            "https://mcp.example.com/other",
            "https://mcp.example.com.evil.com/mcp",
            "https://evil.com",
            "mcp.example.com/mcp",
            "https://mcp.example.com/mcp#f",
        ] {
            assert_eq!(o.own_resource(other), None, "{other}");
        }
        assert_eq!(o.resource_path_of("/mcp/files/x"), Some("/mcp/files"));
        assert_eq!(o.resource_path_of("/mcpx"), None);
    }

    fn facade_settings() -> crate::config::Settings {
        let text = "[server]\npublic_url = \"https://mcp.example.com\"\n[upstream]\ncommand = \"x\"\n\
                    [auth.oauth]\nprovider = \"github\"\nclient_id = \"c\"\nclient_secret = \"s\"\n";
        crate::config::validate(&crate::config::parse_str(text, &|_| None).unwrap()).unwrap()
    }

    #[test]
    fn issued_tokens_are_refused_when_expired_revoked_or_for_another_endpoint() {
        let cfg = facade_settings();
        let oauth = cfg.auth.oauth.as_ref().unwrap();
        let server = oauth.server.as_ref().unwrap();
        let issue = |resource: &str, family: u64, now: u64| {
            server.access_token(
                oauth,
                &Issue {
                    user: "42",
                    scopes: &[],
                    resource,
                    client_id: "c",
                    family,
                },
                now,
            )
        };
        let verdict = |token: &str, path: &str| {
            let slot = IdentitySlot::new();
            match server.authenticate(oauth, token, path, &slot) {
                Ok(c) => Ok(c.identity.id.to_string()),
                Err(TokenRefusal::Refused(why)) => Err(why),
                Err(TokenRefusal::NotOurs) => Err("not ours"),
            }
        };
        let now = unix_now();
        let good = issue("https://mcp.example.com/mcp", 1, now);
        assert_eq!(verdict(&good, "/mcp").as_deref(), Ok("oauth:42"));
        assert_eq!(verdict(&good, "/sse"), Err("oauth_wrong_audience"));
        // Expired (beyond the minute of leeway).
        let old = issue(
            "https://mcp.example.com",
            2,
            now - state::ACCESS_TTL_SECS - 120,
        );
        assert_eq!(verdict(&old, "/mcp"), Err("jwt_expired"));
        // Revoked: the cache of this worker is bypassed by the revocation count.
        let fam3 = issue("https://mcp.example.com", 3, now);
        assert!(verdict(&fam3, "/mcp").is_ok());
        server.shared.tables().revoke(3, Instant::now());
        server.shared.revocations.fetch_add(1, Ordering::Relaxed);
        assert_eq!(verdict(&fam3, "/mcp"), Err("oauth_token_revoked"));
        // Signed by another facade (another process, or before a restart).
        let other = facade_settings();
        let other_oauth = other.auth.oauth.as_ref().unwrap();
        let foreign = other_oauth.server.as_ref().unwrap().access_token(
            other_oauth,
            &Issue {
                user: "42",
                scopes: &[],
                resource: "https://mcp.example.com",
                client_id: "c",
                family: 1,
            },
            now,
        );
        assert_eq!(verdict(&foreign, "/mcp"), Err("not ours"));
    }

    #[test]
    fn the_sign_in_cookie_is_host_prefixed_and_secure_on_https_and_checked_in_full() {
        let cfg = facade_settings();
        let oauth = cfg.auth.oauth.as_ref().unwrap();
        let set = browser_cookie(oauth, "STATEabcdefghijklmnop", "secret", 600);
        assert_eq!(
            set,
            "__Host-mcp-guard-signin-STATEabcdefghijk=secret; Path=/; Max-Age=600; HttpOnly; \
             SameSite=Lax; Secure"
        );
        let head = |cookie: &str| {
            let raw =
                format!("GET /oauth/callback HTTP/1.1\r\nHost: a\r\nCookie: {cookie}\r\n\r\n");
            match crate::http::request::parse_head(raw.as_bytes(), 16384, 1 << 20) {
                Ok(crate::http::request::HeadParse::Complete(h)) => h,
                _ => panic!("a head"),
            }
        };
        let name = "__Host-mcp-guard-signin-STATEabcdefghijk";
        let st = "STATEabcdefghijklmnop";
        assert!(has_browser_cookie(
            oauth,
            &head(&format!("x=1; {name}=secret")),
            st,
            "secret"
        ));
        for bad in [
            format!("{name}=secre"),
            format!("{name}=secret2"),
            format!("{name}="),
            "mcp-guard-signin-STATEabcdefghijk=secret".to_string(),
            "x=1".to_string(),
        ] {
            assert!(
                !has_browser_cookie(oauth, &head(&bad), st, "secret"),
                "{bad}"
            );
        }
        // A sign-in never approved has no value to match, not even an empty cookie.
        assert!(!has_browser_cookie(
            oauth,
            &head(&format!("{name}=")),
            st,
            ""
        ));
    }

    #[test]
    fn pkce_values_are_checked_for_shape() {
        let v = "a".repeat(43);
        assert!(is_verifier(&v) && !is_verifier(&"a".repeat(42)) && !is_verifier(&"a".repeat(129)));
        assert!(!is_verifier(&format!("{}=", "a".repeat(43))));
        // RFC 7636 appendix B.
        assert_eq!(
            s256("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        assert!(is_challenge(&s256(&v)) && !is_challenge("plain-text-verifier"));
    }
}
