//! Every way a request can end early, in one place: its HTTP status, its JSON-RPC error, and
//! the reason written to the audit trail and metrics. Errors from deep in the stack become
//! responses only here (the single rescue point), so the mapping is reviewed once.

use crate::http::request::HeadError;
use crate::http::response::jsonrpc_error;
use crate::mcp::jsonrpc::RpcId;

/// JSON-RPC error codes used by the gateway.
pub mod code {
    /// Invalid JSON.
    pub const PARSE_ERROR: i64 = -32700;
    /// Not a valid JSON-RPC message.
    pub const INVALID_REQUEST: i64 = -32600;
    /// Unknown method.
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// Bad params.
    pub const INVALID_PARAMS: i64 = -32602;
    /// Gateway or upstream failure.
    pub const INTERNAL_ERROR: i64 = -32603;
    /// Refused by policy (the message names what).
    pub const FORBIDDEN: i64 = -32003;
    /// Over the rate limit (`data.retryAfterSeconds` says when to retry).
    pub const RATE_LIMITED: i64 = -32029;
    /// Credentials missing or not accepted.
    pub const UNAUTHORIZED: i64 = -32001;
    /// Refused by transport rules (session, headers).
    pub const SERVER_ERROR: i64 = -32000;
}

/// A request that ends before (or instead of) reaching the upstream.
#[derive(Debug, Clone, PartialEq)]
pub enum GatewayError {
    /// Malformed or over-limit request head.
    Head(HeadError),
    /// Request body larger than `max_body_bytes`.
    BodyTooLarge,
    /// Malformed chunked body.
    BadBody,
    /// The request head did not arrive within `header_timeout_secs`.
    HeaderTimeout,
    /// The request body did not arrive within `body_timeout_secs`.
    BodyTimeout,
    /// The worker holds its cap of in-flight request-body bytes.
    Overloaded,
    /// No route for this path.
    NotFound,
    /// A path that is not in normal form (`//`, `.` or `..` segments, percent escapes,
    /// backslashes): refused rather than normalised, so no spelling can select another route.
    PathNotNormal,
    /// The caller's `allowed_servers` does not include the server this path routes to.
    ServerForbidden(std::sync::Arc<str>),
    /// Method not served on this path; carries the `Allow` value.
    MethodNotAllowed(&'static str),
    /// `Accept` does not allow what the transport requires.
    NotAcceptable(&'static str),
    /// `Content-Type` is not `application/json`.
    UnsupportedMediaType,
    /// Browser `Origin` not in `server.allowed_origins`.
    OriginForbidden,
    /// `MCP-Protocol-Version` names a version we do not serve.
    UnsupportedProtocolVersion(String),
    /// A request other than initialize without `Mcp-Session-Id`.
    MissingSession,
    /// `Mcp-Session-Id` unknown, expired, or terminated.
    UnknownSession,
    /// Body is not JSON.
    Parse(String),
    /// Body is not a valid JSON-RPC message.
    InvalidRequest(String, Option<RpcId>),
    /// Params missing what the method requires.
    InvalidParams(String, RpcId),
    /// `Mcp-Method` / `Mcp-Name` disagree with the body.
    HeaderMismatch(String),
    /// The upstream could not be reached or failed mid-response.
    UpstreamUnavailable(String),
    /// The upstream did not start a response within `timeout_secs`.
    UpstreamTimeout,
    /// The upstream's request queue is full.
    UpstreamBusy,
    /// A per-session stdio process cap (of this many) is reached.
    ProcessCap(usize),
    /// Every replica of this load-balanced server is ejected: failed at once rather than
    /// after a timeout.
    ServerDown(std::sync::Arc<str>),
    /// The replica this session is pinned to is ejected. The session is not moved to another
    /// replica (that server never saw it): the client retries later or initializes again.
    ReplicaDown(std::sync::Arc<str>),
    /// The gateway is draining for shutdown.
    ShuttingDown,
    /// No credentials (`invalid: false`) or credentials not accepted (`invalid: true`).
    Unauthorized {
        /// Credentials were presented but refused.
        invalid: bool,
    },
    /// The identity's policy refuses this call (JSON-RPC error on HTTP 200, naming it).
    Denied(crate::authz::Denial),
    /// The policy refuses the call the `Mcp-Method` / `Mcp-Name` headers name, decided before
    /// the body was read (HTTP 403 with a JSON-RPC error whose id is null: the id is in the
    /// body nobody read).
    HeadDenied(crate::authz::Denial),
    /// A `[[tool_rules]]` check refused an argument (JSON-RPC error on HTTP 200, like a
    /// denial, naming the argument's pointer and the check, never its value).
    ArgumentRefused {
        /// For the caller.
        message: String,
        /// The error's `data` (JSON).
        data: String,
    },
    /// An OAuth caller's token lacks a scope this call needs (HTTP 403 with the RFC 6750
    /// challenge naming the scopes that would grant it, so the client can step up).
    InsufficientScope {
        /// The scopes, space-separated, any one of which grants the call.
        scope: String,
        /// The protected-resource metadata URL of the endpoint (RFC 9728).
        resource_metadata: String,
        /// What was refused, for the caller.
        message: String,
    },
    /// The identity provider could not say whether the credentials are good (down, busy,
    /// answering nonsense): 503, retry shortly.
    AuthUnavailable,
    /// The upstream refused the gateway's own credentials (HTTP 401). Never relayed as-is:
    /// its challenge would send MCP clients into OAuth discovery against the wrong server.
    UpstreamUnauthorized(std::sync::Arc<str>),
    /// Over the rate limit.
    RateLimited {
        /// Whole seconds until a retry can succeed (at least 1).
        retry_after_secs: u64,
        /// The limit, requests per second.
        limit: u32,
    },
}

impl GatewayError {
    /// HTTP status for this error.
    pub fn status(&self) -> u16 {
        use GatewayError::*;
        match self {
            Head(HeadError::Malformed(_)) => 400,
            Head(HeadError::TooLarge) => 431,
            Head(HeadError::BodyTooLarge) | BodyTooLarge => 413,
            Head(HeadError::Version) => 505,
            Head(HeadError::Expectation) => 417,
            BadBody => 400,
            HeaderTimeout | BodyTimeout => 408,
            Overloaded => 503,
            NotFound | UnknownSession => 404,
            PathNotNormal => 400,
            ServerForbidden(_) | HeadDenied(_) => 403,
            MethodNotAllowed(_) => 405,
            NotAcceptable(_) => 406,
            UnsupportedMediaType => 415,
            OriginForbidden => 403,
            UnsupportedProtocolVersion(_) | MissingSession | HeaderMismatch(_) => 400,
            Parse(_) | InvalidRequest(..) | InvalidParams(..) => 400,
            UpstreamUnavailable(_) => 502,
            UpstreamTimeout => 504,
            UpstreamBusy | ShuttingDown | ProcessCap(_) | ServerDown(_) | ReplicaDown(_) => 503,
            Unauthorized { .. } => 401,
            Denied(_) | ArgumentRefused { .. } => 200,
            InsufficientScope { .. } => 403,
            AuthUnavailable => 503,
            UpstreamUnauthorized(_) => 502,
            RateLimited { .. } => 429,
        }
    }

    /// JSON-RPC error code for this error.
    pub fn rpc_code(&self) -> i64 {
        use GatewayError::*;
        match self {
            Parse(_) => code::PARSE_ERROR,
            InvalidRequest(..) | HeaderMismatch(_) => code::INVALID_REQUEST,
            InvalidParams(..) => code::INVALID_PARAMS,
            UpstreamUnavailable(_) | UpstreamTimeout | UpstreamBusy | ProcessCap(_) => {
                code::INTERNAL_ERROR
            }
            ServerDown(_) | ReplicaDown(_) | UpstreamUnauthorized(_) => code::INTERNAL_ERROR,
            Unauthorized { .. } | AuthUnavailable => code::UNAUTHORIZED,
            Denied(_)
            | HeadDenied(_)
            | ArgumentRefused { .. }
            | ServerForbidden(_)
            | InsufficientScope { .. } => code::FORBIDDEN,
            RateLimited { .. } => code::RATE_LIMITED,
            _ => code::SERVER_ERROR,
        }
    }

    /// Short, stable reason for audit events and metric labels.
    pub fn reason(&self) -> &'static str {
        use GatewayError::*;
        match self {
            Head(HeadError::Malformed(_)) => "malformed_http",
            Head(HeadError::TooLarge) => "header_too_large",
            Head(HeadError::BodyTooLarge) | BodyTooLarge => "body_too_large",
            Head(HeadError::Version) => "http_version",
            Head(HeadError::Expectation) => "expectation",
            BadBody => "malformed_body",
            HeaderTimeout => "header_timeout",
            BodyTimeout => "body_timeout",
            Overloaded => "overloaded",
            NotFound => "not_found",
            PathNotNormal => "path_not_normal",
            ServerForbidden(_) => "server_not_allowed",
            MethodNotAllowed(_) => "method_not_allowed",
            NotAcceptable(_) => "not_acceptable",
            UnsupportedMediaType => "unsupported_media_type",
            OriginForbidden => "origin_forbidden",
            UnsupportedProtocolVersion(_) => "unsupported_protocol_version",
            MissingSession => "missing_session",
            UnknownSession => "unknown_session",
            Parse(_) => "parse_error",
            InvalidRequest(..) => "invalid_request",
            InvalidParams(..) => "invalid_params",
            HeaderMismatch(_) => "header_mismatch",
            UpstreamUnavailable(_) => "upstream_unavailable",
            UpstreamTimeout => "upstream_timeout",
            UpstreamBusy => "upstream_busy",
            ProcessCap(_) => "process_cap",
            ServerDown(_) => "server_down",
            ReplicaDown(_) => "replica_down",
            ShuttingDown => "shutting_down",
            Unauthorized { invalid: false } => "missing_credentials",
            Unauthorized { invalid: true } => "invalid_credentials",
            Denied(d) | HeadDenied(d) => d.reason.as_str(),
            ArgumentRefused { .. } => "argument_refused",
            InsufficientScope { .. } => "insufficient_scope",
            AuthUnavailable => "auth_unavailable",
            UpstreamUnauthorized(_) => "upstream_unauthorized",
            RateLimited { .. } => "rate_limited",
        }
    }

    /// Whether a [`Self::reason`] names a failure on the upstream side (or the gateway's
    /// shutdown): a request it ends is an error whatever status carried it (a batch's errors in
    /// place go out as 200; an answer given up on after its head as the head's status).
    pub fn is_failure_reason(reason: &str) -> bool {
        matches!(
            reason,
            "upstream_unavailable"
                | "upstream_timeout"
                | "upstream_busy"
                | "process_cap"
                | "server_down"
                | "replica_down"
                | "shutting_down"
                | "upstream_unauthorized"
        )
    }

    /// Human-readable message for the client.
    pub fn message(&self) -> String {
        use GatewayError::*;
        match self {
            Head(HeadError::Malformed(m)) => format!("Bad request: {m}"),
            Head(HeadError::TooLarge) => "Request header fields too large".into(),
            Head(HeadError::BodyTooLarge) | BodyTooLarge => "Request body too large".into(),
            Head(HeadError::Version) => "Only HTTP/1.0 and HTTP/1.1 are supported".into(),
            Head(HeadError::Expectation) => "Only Expect: 100-continue is supported".into(),
            BadBody => "Bad request: malformed chunked body".into(),
            HeaderTimeout => "Request head not received in time".into(),
            BodyTimeout => "Request body not received in time".into(),
            Overloaded => "Too many request bodies in flight; retry later".into(),
            NotFound => "Not found".into(),
            PathNotNormal => {
                "Bad request: the path is not in normal form (no `//`, `.`, `..`, `%`, `;` or `\\`)"
                    .into()
            }
            ServerForbidden(name) => format!("Server '{name}' is not permitted for this caller"),
            MethodNotAllowed(allow) => format!("Method not allowed (allowed: {allow})"),
            NotAcceptable(what) => format!("Not acceptable: Accept must allow {what}"),
            UnsupportedMediaType => "Content-Type must be application/json".into(),
            OriginForbidden => "Forbidden: Origin not allowed".into(),
            UnsupportedProtocolVersion(v) => format!("Unsupported MCP-Protocol-Version: {v}"),
            MissingSession => "Bad Request: a session is required (Mcp-Session-Id, or the sessionId of a legacy messages URL)".into(),
            UnknownSession => "Session not found".into(),
            Parse(m) => format!("Parse error: {m}"),
            InvalidRequest(m, _) => format!("Invalid Request: {m}"),
            InvalidParams(m, _) => format!("Invalid params: {m}"),
            HeaderMismatch(m) => format!("Invalid Request: {m}"),
            UpstreamUnavailable(m) => format!("Upstream unavailable: {m}"),
            UpstreamTimeout => "Upstream did not respond in time".into(),
            UpstreamBusy => "Upstream is busy; retry later".into(),
            ProcessCap(cap) => format!(
                "No upstream process available: the cap of {cap} is reached; end an idle session \
                 (DELETE) or retry later"
            ),
            ServerDown(name) => {
                format!("Server '{name}' is unavailable: every replica is down; retry later")
            }
            ReplicaDown(name) => format!(
                "Server '{name}': the replica serving this session is down; retry later, or \
                 initialize a new session"
            ),
            ShuttingDown => "Gateway is shutting down".into(),
            Unauthorized { invalid: false } => "Authentication required".into(),
            Unauthorized { invalid: true } => "Invalid credentials".into(),
            Denied(d) => d.message.clone(),
            HeadDenied(d) => format!("{} (decided on the Mcp-Method / Mcp-Name headers)", d.message),
            ArgumentRefused { message, .. } => message.clone(),
            InsufficientScope { message, scope, .. } => {
                format!("{message}: the token needs one of these scopes: {scope}")
            }
            AuthUnavailable => {
                "The identity provider cannot check credentials right now; retry shortly".into()
            }
            UpstreamUnauthorized(name) => format!(
                "Upstream '{name}' refused the gateway's credentials (HTTP 401); the gateway's \
                 configuration for it needs fixing"
            ),
            RateLimited {
                retry_after_secs, ..
            } => {
                format!("Rate limit exceeded; retry after {retry_after_secs} s")
            }
        }
    }

    /// Whether the connection must be closed after this response (framing can't be trusted).
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            GatewayError::Head(_)
                | GatewayError::BadBody
                | GatewayError::BodyTooLarge
                | GatewayError::HeaderTimeout
                | GatewayError::BodyTimeout
                | GatewayError::Overloaded
        )
    }

    /// The JSON-RPC error body; `id` is the request's id when known.
    pub fn body(&self, id: Option<&RpcId>) -> Vec<u8> {
        let id = match self {
            GatewayError::InvalidRequest(_, Some(i)) | GatewayError::InvalidParams(_, i) => Some(i),
            _ => id,
        };
        let id_json = id.map(RpcId::to_json);
        let data = match self {
            GatewayError::RateLimited {
                retry_after_secs, ..
            } => Some(format!("{{\"retryAfterSeconds\":{retry_after_secs}}}")),
            GatewayError::Denied(d) => Some(format!("{{\"reason\":\"{}\"}}", d.reason.as_str())),
            GatewayError::ArgumentRefused { data, .. } => Some(data.clone()),
            GatewayError::HeadDenied(d) => Some(format!(
                "{{\"reason\":\"{}\",\"decidedOn\":\"headers\"}}",
                d.reason.as_str()
            )),
            GatewayError::InsufficientScope { scope, .. } => Some(
                serde_json::json!({ "reason": "insufficient_scope", "scope": scope }).to_string(),
            ),
            GatewayError::UpstreamUnauthorized(name) => {
                Some(serde_json::json!({ "server": &**name, "upstreamStatus": 401 }).to_string())
            }
            GatewayError::ServerDown(name) | GatewayError::ReplicaDown(name) => Some(
                serde_json::json!({ "server": &**name, "retryAfterSeconds": RETRY_DOWN_SECS })
                    .to_string(),
            ),
            _ => None,
        };
        jsonrpc_error(
            id_json.as_deref(),
            self.rpc_code(),
            &self.message(),
            data.as_deref(),
        )
    }

    /// Headers this error's response must carry.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        match self {
            GatewayError::MethodNotAllowed(allow) => vec![("allow", (*allow).to_string())],
            GatewayError::Unauthorized { invalid } => {
                let v = if *invalid {
                    "Bearer realm=\"mcp-guard\", error=\"invalid_token\"".to_string()
                } else {
                    "Bearer realm=\"mcp-guard\"".to_string()
                };
                vec![("www-authenticate", v)]
            }
            // RFC 6750 §3.1; the scope tokens were checked to need no escaping.
            GatewayError::InsufficientScope {
                scope,
                resource_metadata,
                ..
            } => vec![(
                "www-authenticate",
                format!(
                    "Bearer error=\"insufficient_scope\", scope=\"{scope}\", resource_metadata=\"{resource_metadata}\""
                ),
            )],
            GatewayError::AuthUnavailable => vec![("retry-after", "1".to_string())],
            GatewayError::RateLimited {
                retry_after_secs,
                limit,
            } => vec![
                ("retry-after", retry_after_secs.to_string()),
                ("ratelimit-limit", limit.to_string()),
                ("ratelimit-remaining", "0".to_string()),
                ("ratelimit-reset", retry_after_secs.to_string()),
            ],
            // The health checks run every 2 s: a replica that comes back is chosen again
            // within about that long.
            GatewayError::ServerDown(_) | GatewayError::ReplicaDown(_) => {
                vec![("retry-after", RETRY_DOWN_SECS.to_string())]
            }
            _ => Vec::new(),
        }
    }
}

/// `Retry-After` for a server or replica that is down: the health checks' interval.
const RETRY_DOWN_SECS: u64 = 2;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_failures_are_told_by_their_reason_and_refusals_are_not() {
        for e in [
            GatewayError::UpstreamUnavailable("x".into()),
            GatewayError::UpstreamTimeout,
            GatewayError::UpstreamBusy,
            GatewayError::ProcessCap(1),
            GatewayError::ServerDown("x".into()),
            GatewayError::ReplicaDown("x".into()),
            GatewayError::ShuttingDown,
            GatewayError::UpstreamUnauthorized("x".into()),
        ] {
            assert!(GatewayError::is_failure_reason(e.reason()), "{e:?}");
        }
        for e in [
            GatewayError::RateLimited {
                retry_after_secs: 1,
                limit: 1,
            },
            GatewayError::UnknownSession,
            GatewayError::BadBody,
            GatewayError::Unauthorized { invalid: true },
        ] {
            assert!(!GatewayError::is_failure_reason(e.reason()), "{e:?}");
        }
    }

    #[test]
    fn parse_errors_are_400_with_32700() {
        let e = GatewayError::Parse("x".into());
        assert_eq!((e.status(), e.rpc_code()), (400, -32700));
        let v: serde_json::Value = serde_json::from_slice(&e.body(None)).unwrap();
        assert_eq!(v["id"], serde_json::Value::Null);
    }

    #[test]
    fn rate_limited_carries_retry_after_in_headers_and_body() {
        let e = GatewayError::RateLimited {
            retry_after_secs: 3,
            limit: 10,
        };
        assert_eq!(e.status(), 429);
        assert!(e.headers().contains(&("retry-after", "3".to_string())));
        let v: serde_json::Value = serde_json::from_slice(&e.body(None)).unwrap();
        assert_eq!(v["error"]["data"]["retryAfterSeconds"], 3);
    }

    #[test]
    fn a_server_with_every_replica_down_is_503_naming_it() {
        for e in [
            GatewayError::ServerDown("web".into()),
            GatewayError::ReplicaDown("web".into()),
        ] {
            assert_eq!((e.status(), e.rpc_code()), (503, -32603));
            assert!(e.headers().contains(&("retry-after", "2".to_string())));
            let v: serde_json::Value = serde_json::from_slice(&e.body(None)).unwrap();
            assert_eq!(v["error"]["data"]["server"], "web");
            assert!(v["error"]["message"].as_str().unwrap().contains("'web'"));
        }
    }

    #[test]
    fn invalid_params_echo_the_request_id() {
        let e = GatewayError::InvalidParams("x".into(), RpcId::Str("abc".into()));
        let v: serde_json::Value = serde_json::from_slice(&e.body(None)).unwrap();
        assert_eq!(v["id"], "abc");
        assert_eq!(v["error"]["code"], -32602);
    }
}
