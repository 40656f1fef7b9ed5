//! OAuth access tokens issued by an external authorization server, checked at the resource
//! server (`[auth.oauth]`): as JWTs against the server's JWKS (found through its metadata), or
//! by RFC 7662 introspection ([`super::introspect`]). Either way the token must have been
//! minted for this gateway: its audience must hold the canonical URI of the MCP endpoint it
//! is used at (RFC 8707), and it reaches only the endpoints its audience names. The caller
//! becomes `oauth:<user>`, with the tools its scopes grant through `scope_tool_mapping`.
//!
//! Also here: the scopes a tool needs (for the `insufficient_scope` challenge) and the
//! protected-resource metadata URL of an endpoint (RFC 9728), which challenges point at.

use super::fetch::{self, IdpUrl};
use super::introspect::{Introspected, Introspector};
use super::jwks::Jwks;
use super::{AuthMethod, Identity, jwt};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// How this gateway checks the authorization server's access tokens.
#[derive(Debug)]
pub enum Validation {
    /// JWT access tokens (RFC 9068), signed with the server's published keys.
    Jwt {
        /// Algorithms, issuer, claims.
        rules: jwt::Rules,
        /// The server's keys.
        keys: Arc<Jwks>,
    },
    /// Opaque (or any) tokens, asked about at the server's introspection endpoint.
    Introspection(Arc<Introspector>),
    /// No external token is accepted (a provider whose tokens a resource server cannot check).
    None,
}

/// OAuth access tokens at the resource server.
#[derive(Debug)]
pub struct OauthProvider {
    /// How tokens are checked.
    pub validation: Validation,
    /// The authorization server's issuer identifier, when known.
    pub issuer: Option<String>,
    /// Each route's canonical resource URI (`server.public_url` + its endpoint), normalised.
    pub resources: Vec<(Arc<str>, String)>,
    /// The claim (or introspection member) naming the user.
    pub user_id_claim: String,
    /// Scope → tool entries it grants; `None`: no mapping, a token may call every tool.
    pub scope_tools: Option<BTreeMap<String, Vec<String>>>,
    /// The routed servers' names (tool entries may name one: `server/tool`).
    pub routes: Vec<Arc<str>>,
    /// `server.public_url`, without a trailing slash.
    pub public_url: String,
    /// Distinguishes this configuration's cached identities from another's.
    pub generation: u64,
}

/// What a valid access token says, however it was checked.
#[derive(Debug)]
pub struct Grant<'a> {
    /// The user.
    pub subject: &'a str,
    /// Its scopes.
    pub scopes: &'a [String],
    /// Its audiences.
    pub audiences: Vec<&'a str>,
    /// Until when it may be used (Unix seconds).
    pub until: u64,
}

impl OauthProvider {
    /// Which key set is in force (JWT validation): bumped by every JWKS fetch.
    pub fn key_epoch(&self) -> u64 {
        match &self.validation {
            Validation::Jwt { keys, .. } => keys.fetched.load(std::sync::atomic::Ordering::Acquire),
            _ => 0,
        }
    }

    /// Whether a JWT-shaped bearer token is this provider's to check (rather than
    /// `[auth.jwt]`'s): `[auth.jwt]` is not configured, or the token's issuer (unverified:
    /// it only picks who checks) is this authorization server.
    pub fn takes_jwt(&self, token: &str, jwt_configured: bool) -> bool {
        if matches!(self.validation, Validation::None) {
            return false;
        }
        !jwt_configured
            || (self.issuer.is_some()
                && unverified_issuer(token).as_deref() == self.issuer.as_deref())
    }

    /// The identity a valid token becomes, or why it is refused: `oauth:<user>` with the tools
    /// its scopes grant, reaching only the routes its audience names.
    pub fn identity(&self, grant: &Grant<'_>) -> Result<Identity, &'static str> {
        let reachable: std::collections::HashSet<String> = self
            .resources
            .iter()
            .filter(|(_, uri)| grant.audiences.iter().any(|a| canonical(a) == *uri))
            .map(|(name, _)| name.to_string())
            .collect();
        if reachable.is_empty() {
            // Minted for another resource (or for no one): passing it on would make this
            // gateway a confused deputy.
            return Err("oauth_wrong_audience");
        }
        let mut policy = super::scope_policy(grant.scopes, self.scope_tools.as_ref(), &self.routes);
        policy.servers = Some(reachable);
        Ok(Identity {
            id: Arc::from(format!("oauth:{}", grant.subject)),
            method: AuthMethod::OAuth,
            policy: Arc::new(policy),
        })
    }

    /// Checks an introspection answer at `now` (Unix seconds); the identity and until when.
    pub fn accept_introspected(
        &self,
        answer: &Introspected,
        now: u64,
    ) -> Result<(Identity, u64), &'static str> {
        if !answer.active {
            return Err("oauth_inactive");
        }
        if answer.exp.is_some_and(|exp| exp <= now) {
            return Err("oauth_expired");
        }
        if answer.nbf.is_some_and(|nbf| nbf > now + 60) {
            return Err("oauth_not_yet_valid");
        }
        if let (Some(want), Some(iss)) = (&self.issuer, &answer.iss)
            && want != iss
        {
            return Err("oauth_wrong_issuer");
        }
        let subject = answer.subject.as_deref().ok_or("oauth_missing_user")?;
        // Without `exp` the answer is trusted briefly, so a revocation is seen soon.
        let until = answer
            .exp
            .unwrap_or(now + super::introspect::CACHE_WITHOUT_EXP.as_secs());
        let grant = Grant {
            subject,
            scopes: &answer.scopes,
            audiences: answer.aud.iter().map(String::as_str).collect(),
            until,
        };
        Ok((self.identity(&grant)?, until))
    }

    /// Checks a JWT access token at `now`; `Err(None)`: its key is not held (a refresh may
    /// help), `Err(Some(reason))`: refused.
    pub fn verify_jwt(
        &self,
        token: &str,
        now: u64,
    ) -> Result<(Identity, u64), Result<&'static str, &Arc<Jwks>>> {
        let Validation::Jwt { rules, keys } = &self.validation else {
            return Err(Ok("oauth_not_accepted"));
        };
        let held = keys.keys();
        let verified = match jwt::verify(token, &held, rules, now) {
            Ok(v) => v,
            Err(jwt::JwtError::UnknownKid) => return Err(Err(keys)),
            Err(_) if held.is_empty() => return Err(Err(keys)),
            Err(e) => return Err(Ok(oauth_reason(&e))),
        };
        let audiences: Vec<&str> = match verified.claims.get("aud") {
            Some(serde_json::Value::String(s)) => vec![s.as_str()],
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_str()).collect(),
            _ => Vec::new(),
        };
        let until = verified.expires_at.saturating_add(rules.leeway_secs);
        let grant = Grant {
            subject: &verified.subject,
            scopes: &verified.scopes,
            audiences,
            until,
        };
        Ok((self.identity(&grant).map_err(Ok)?, until))
    }

    /// The scopes any one of which would let a caller call `tool` on the route `server`
    /// (from `scope_tool_mapping`), space-separated; `None` when no scope would.
    pub fn scopes_for_tool(&self, tool: &str, server: &str) -> Option<String> {
        let map = self.scope_tools.as_ref()?;
        let server = self.routes.iter().find(|r| &***r == server);
        let scopes: Vec<&str> = map
            .iter()
            .filter(|(scope, entries)| {
                // A scope that cannot be sent in a challenge (RFC 6750 §3: no `"` or `\`).
                is_scope_token(scope)
                    && crate::config::tool_rule_for(
                        entries,
                        &[],
                        server.map(|s| &**s),
                        &self.routes,
                    )
                    .permits(tool)
            })
            .map(|(scope, _)| scope.as_str())
            .collect();
        (!scopes.is_empty()).then(|| scopes.join(" "))
    }

    /// The protected-resource metadata URL of the endpoint at `path` (RFC 9728 §3.1: the
    /// well-known segment goes between the host and the resource's path).
    pub fn resource_metadata_url(&self, path: &str) -> String {
        resource_metadata_url(&self.public_url, path)
    }
}

/// RFC 9728 §3.1: `<origin>/.well-known/oauth-protected-resource<path of public_url + endpoint>`.
pub fn resource_metadata_url(public_url: &str, endpoint: &str) -> String {
    let (origin, base) = split_origin(public_url);
    format!(
        "{origin}/.well-known/oauth-protected-resource{}{endpoint}",
        base.trim_end_matches('/')
    )
}

/// A scope token as RFC 6749 §3.3 allows (printable ASCII but `"` and `\`), so it can stand
/// in a `WWW-Authenticate` parameter unescaped.
fn is_scope_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
}

/// The audit reason of a refused OAuth JWT.
fn oauth_reason(e: &jwt::JwtError) -> &'static str {
    match e {
        jwt::JwtError::Expired => "oauth_expired",
        jwt::JwtError::NotYetValid => "oauth_not_yet_valid",
        jwt::JwtError::WrongIssuer => "oauth_wrong_issuer",
        jwt::JwtError::BadSignature => "oauth_bad_signature",
        jwt::JwtError::Malformed | jwt::JwtError::TooLarge => "oauth_malformed",
        jwt::JwtError::MissingClaim(_) | jwt::JwtError::ClaimType(_) => "oauth_bad_claims",
        jwt::JwtError::BadIdentity => "oauth_bad_identity",
        _ => "oauth_key_refused",
    }
}

/// `scheme://authority` and the path after it.
fn split_origin(url: &str) -> (&str, &str) {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    match url[after_scheme..].find('/') {
        Some(i) => url.split_at(after_scheme + i),
        None => (url, ""),
    }
}

/// A resource URI as compared: scheme and host lower-cased (they are case-insensitive), no
/// trailing slash, nothing else changed (RFC 8707 §2 URIs have no fragment; a query is kept
/// and must match).
pub fn canonical(uri: &str) -> String {
    let (origin, path) = split_origin(uri);
    let mut out = origin.to_ascii_lowercase();
    out.push_str(path.trim_end_matches('/'));
    out
}

/// The `iss` of a JWT before it is verified: only to pick which provider checks it.
fn unverified_issuer(token: &str) -> Option<String> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    if payload.len() > jwt::DEFAULT_MAX_TOKEN_BYTES {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    #[derive(serde::Deserialize)]
    struct Iss {
        iss: Option<String>,
    }
    serde_json::from_slice::<Iss>(&bytes).ok()?.iss
}

/// The `jwks_uri` of the authorization server `issuer` (at `base`): its RFC 8414 metadata,
/// then its OpenID Connect discovery document. The document must name the same issuer
/// (RFC 8414 §3.3), and the keys' URL must be https (or loopback http) like any IdP URL.
pub fn discover_jwks_uri(base: &IdpUrl, issuer: &str, timeout: Duration) -> Result<IdpUrl, String> {
    let (origin, path) = split_origin(&base.url);
    let path = path.trim_end_matches('/');
    let candidates = [
        format!("{origin}/.well-known/oauth-authorization-server{path}"),
        format!("{origin}{path}/.well-known/openid-configuration"),
    ];
    let mut last = String::new();
    for candidate in &candidates {
        let url = IdpUrl::parse(candidate)?;
        let answer = match fetch::get(&url, &[], timeout) {
            Ok(a) if a.status == 200 => a,
            Ok(a) => {
                last = format!("{candidate}: HTTP {}", a.status);
                continue;
            }
            Err(e) => {
                last = format!("{candidate}: {e}");
                continue;
            }
        };
        #[derive(serde::Deserialize)]
        struct Metadata {
            issuer: Option<String>,
            jwks_uri: Option<String>,
        }
        let meta: Metadata = serde_json::from_slice(&answer.body)
            .map_err(|e| format!("{candidate}: not authorization-server metadata: {e}"))?;
        if meta.issuer.as_deref() != Some(issuer) {
            return Err(format!(
                "{candidate} names another issuer than `{issuer}`; refusing its keys"
            ));
        }
        let jwks = meta
            .jwks_uri
            .ok_or_else(|| format!("{candidate} has no jwks_uri"))?;
        return IdpUrl::parse(&jwks);
    }
    Err(format!("no metadata for `{issuer}` ({last})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_uris_compare_by_case_insensitive_origin_without_trailing_slash() {
        assert_eq!(
            canonical("HTTPS://MCP.Example.com/mcp/"),
            "https://mcp.example.com/mcp"
        );
        assert_ne!(canonical("https://x/mcp/a"), canonical("https://x/mcp/b"));
        assert_ne!(canonical("https://x/MCP"), canonical("https://x/mcp"));
    }

    #[test]
    fn metadata_url_inserts_the_well_known_segment_before_the_path() {
        assert_eq!(
            resource_metadata_url("https://mcp.example.com", "/mcp"),
            "https://mcp.example.com/.well-known/oauth-protected-resource/mcp"
        );
        assert_eq!(
            resource_metadata_url("https://x.example/base/", "/mcp/a"),
            "https://x.example/.well-known/oauth-protected-resource/base/mcp/a"
        );
    }

    #[test]
    fn scope_tokens_with_quotes_or_backslashes_are_never_challenged() {
        assert!(is_scope_token("files:read"));
        assert!(!is_scope_token("a\"b") && !is_scope_token("a\\b") && !is_scope_token("a b"));
        assert!(!is_scope_token(""));
    }

    #[test]
    fn an_unverified_issuer_is_read_only_from_a_well_formed_payload() {
        use base64::Engine as _;
        let b = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let t = format!("{}.{}.x", b("{}"), b(r#"{"iss":"https://as"}"#));
        assert_eq!(unverified_issuer(&t).as_deref(), Some("https://as"));
        assert_eq!(unverified_issuer("a.!!.c"), None);
        assert_eq!(unverified_issuer(&format!("a.{}.c", b("[1]"))), None);
    }
}
