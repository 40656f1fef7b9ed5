//! The configuration file's serde schema: one struct per TOML table, every field documented.
//!
//! These types mirror `shared/spec/config.toml` exactly (keys marked compat keep the original
//! mcp-guard spelling). They are only a parse target: `config::validate` turns them into the
//! runtime types the data plane reads, so nothing here is re-checked per request.

use serde::Deserialize;
use std::collections::BTreeMap;

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The data-plane listener and its HTTP limits.
    #[serde(default)]
    pub server: ServerSection,
    /// The admin listener (/metrics, /health, /live, /ready).
    #[serde(default)]
    pub admin: AdminSection,
    /// The default upstream and the routed servers.
    #[serde(default)]
    pub upstream: UpstreamSection,
    /// Authentication providers.
    #[serde(default)]
    pub auth: AuthSection,
    /// Per-identity rate limiting.
    #[serde(default)]
    pub rate_limit: RateLimitSection,
    /// The audit trail.
    #[serde(default)]
    pub audit: AuditSection,
    /// OpenTelemetry tracing.
    #[serde(default)]
    pub tracing: TracingSection,
}

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// (compat) Address to listen on.
    pub host: String,
    /// (compat) Port, 1..65535; 0 picks a free port (logged at start).
    pub port: u16,
    /// Data-plane threads; 0 = one per available core.
    pub workers: usize,
    /// I/O driver: auto | io_uring | epoll.
    pub io: String,
    /// Streamable HTTP endpoint of the default upstream.
    pub mcp_path: String,
    /// Legacy HTTP+SSE endpoint (GET); its POSTs go to /messages.
    pub sse_path: String,
    /// Larger request bodies get 413.
    pub max_body_bytes: usize,
    /// Larger request heads get 431.
    pub max_header_bytes: usize,
    /// A request head must arrive within this many seconds of its first byte.
    pub header_timeout_secs: u64,
    /// Keep-alive connections idle longer are closed.
    pub idle_timeout_secs: u64,
    /// A whole request body must arrive within this many seconds of its head (slow-body
    /// defence).
    pub body_timeout_secs: u64,
    /// Refuse tool names outside the MCP character set (`A-Z a-z 0-9 _ - .`, 1-128 chars).
    /// Turning it off lets names through that an upstream may fold (case, Unicode) into a name
    /// a deny rule was written for: a risk.
    pub strict_tool_names: bool,
    /// Open connections across all workers; above it new connections are refused.
    pub max_connections: usize,
    /// On SIGTERM, in-flight requests get this long to finish.
    pub shutdown_grace_secs: u64,
    /// Browser Origin values accepted; any other Origin gets 403.
    pub allowed_origins: Vec<String>,
    /// How clients reach us (used in OAuth metadata).
    pub public_url: Option<String>,
    /// (compat) TLS; absent = plain HTTP.
    pub tls: Option<TlsSection>,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 3000,
            workers: 0,
            io: "auto".into(),
            mcp_path: "/mcp".into(),
            sse_path: "/sse".into(),
            max_body_bytes: 4 * 1024 * 1024,
            max_header_bytes: 16 * 1024,
            header_timeout_secs: 10,
            idle_timeout_secs: 120,
            body_timeout_secs: 30,
            strict_tool_names: true,
            max_connections: 100_000,
            shutdown_grace_secs: 30,
            allowed_origins: Vec::new(),
            public_url: None,
            tls: None,
        }
    }
}

/// `[server.tls]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// (compat) PEM certificate chain.
    pub cert_path: String,
    /// (compat) PEM private key.
    pub key_path: String,
    /// (compat) Enables mTLS: client certificates must chain to this CA bundle.
    pub client_ca_path: Option<String>,
    /// required | optional.
    #[serde(default = "default_client_auth")]
    pub client_auth: String,
}

fn default_client_auth() -> String {
    "required".into()
}

/// `[admin]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    /// Admin listener address.
    pub host: String,
    /// Admin listener port; 0 picks a free port.
    pub port: u16,
    /// Set to false to run without the admin listener.
    pub enabled: bool,
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 9090,
            enabled: true,
        }
    }
}

/// Keys shared by the default upstream and each routed server.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    /// (compat) stdio | http | sse.
    pub transport: Option<String>,
    /// (compat) stdio: program to run.
    pub command: Option<String>,
    /// (compat) stdio: its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// stdio: extra environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// stdio: working directory.
    pub cwd: Option<String>,
    /// stdio: shared | per_session.
    pub session_mode: Option<String>,
    /// stdio per_session: process cap.
    pub max_processes: Option<usize>,
    /// (compat) http | sse: the server's endpoint.
    pub url: Option<String>,
    /// http | sse: several replicas (instead of url).
    #[serde(default)]
    pub urls: Vec<String>,
    /// round_robin | least_outstanding.
    pub load_balance: Option<String>,
    /// Headers sent upstream.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Seconds to wait for a response to start.
    pub timeout_secs: Option<u64>,
    /// (compat) Routed servers; longest prefix wins.
    #[serde(default)]
    pub servers: Vec<ServerRoute>,
}

/// `[[upstream.servers]]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerRoute {
    /// (compat) Name; also reachable as /mcp/<name>.
    pub name: String,
    /// (compat) Path prefix, starts with "/".
    pub path_prefix: Option<String>,
    /// (compat) Forward without the prefix.
    #[serde(default)]
    pub strip_prefix: bool,
    /// (compat) stdio | http | sse.
    pub transport: Option<String>,
    /// (compat) stdio program.
    pub command: Option<String>,
    /// (compat) stdio arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// stdio environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// stdio working directory.
    pub cwd: Option<String>,
    /// stdio: shared | per_session.
    pub session_mode: Option<String>,
    /// stdio per_session: process cap.
    pub max_processes: Option<usize>,
    /// (compat) http | sse endpoint.
    pub url: Option<String>,
    /// Replicas.
    #[serde(default)]
    pub urls: Vec<String>,
    /// round_robin | least_outstanding.
    pub load_balance: Option<String>,
    /// Headers sent upstream.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Seconds to wait for a response to start.
    pub timeout_secs: Option<u64>,
}

/// `[auth]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    /// (compat) Pre-shared API keys.
    #[serde(default)]
    pub api_keys: Vec<ApiKeyEntry>,
    /// (compat) JWT validation.
    pub jwt: Option<JwtSection>,
    /// (compat) OAuth 2.1.
    pub oauth: Option<OauthSection>,
    /// (compat) mTLS identities.
    pub mtls: Option<MtlsSection>,
}

/// `[[auth.api_keys]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyEntry {
    /// (compat) The identity.
    pub id: String,
    /// (compat) base64 of the SHA-256 of the key.
    pub key_hash: String,
    /// (compat) Tool names or globs; absent or empty = every tool.
    #[serde(default)]
    pub allowed_tools: Vec<String>,
    /// Tool names or globs that are refused; deny wins over allow.
    #[serde(default)]
    pub denied_tools: Vec<String>,
    /// Routed servers this identity may reach; absent = all.
    pub allowed_servers: Option<Vec<String>>,
    /// Resource URIs or globs `resources/read` may name; absent or empty = all.
    #[serde(default)]
    pub allowed_resources: Vec<String>,
    /// Resource URIs or globs refused; deny wins over allow.
    #[serde(default)]
    pub denied_resources: Vec<String>,
    /// Prompt names or globs `prompts/get` may name; absent or empty = all.
    #[serde(default)]
    pub allowed_prompts: Vec<String>,
    /// Prompt names or globs refused; deny wins over allow.
    #[serde(default)]
    pub denied_prompts: Vec<String>,
    /// (compat) Requests per second for this identity.
    pub rate_limit: Option<u32>,
}

/// `[auth.jwt]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSection {
    /// (compat) simple | jwks.
    pub mode: String,
    /// (compat) HS256 secret (simple mode).
    pub secret: Option<String>,
    /// (compat) JWKS endpoint (jwks mode).
    pub jwks_url: Option<String>,
    /// (compat) Accepted algorithms.
    #[serde(default)]
    pub algorithms: Vec<String>,
    /// (compat) Required issuer.
    pub issuer: Option<String>,
    /// (compat) Required audience.
    pub audience: Option<String>,
    /// (compat) Claim holding the user id.
    pub user_id_claim: Option<String>,
    /// (compat) Claim holding scopes.
    pub scopes_claim: Option<String>,
    /// (compat) Clock leeway.
    pub leeway_secs: Option<u64>,
    /// (compat) JWKS refresh interval.
    pub cache_duration_secs: Option<u64>,
    /// (compat) scope -> tools it grants.
    #[serde(default)]
    pub scope_tool_mapping: BTreeMap<String, Vec<String>>,
}

/// `[auth.oauth]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OauthSection {
    /// (compat) github | google | okta | custom.
    pub provider: String,
    /// (compat)
    pub client_id: String,
    /// (compat)
    pub client_secret: Option<String>,
    /// (compat)
    pub authorization_url: Option<String>,
    /// (compat)
    pub token_url: Option<String>,
    /// (compat) RFC 7662 introspection endpoint.
    pub introspection_url: Option<String>,
    /// (compat)
    pub userinfo_url: Option<String>,
    /// (compat)
    pub redirect_uri: Option<String>,
    /// (compat)
    #[serde(default)]
    pub scopes: Vec<String>,
    /// (compat)
    pub user_id_claim: Option<String>,
    /// Advertised in protected-resource metadata.
    #[serde(default)]
    pub authorization_servers: Vec<String>,
    /// (compat) scope -> tools it grants.
    #[serde(default)]
    pub scope_tool_mapping: BTreeMap<String, Vec<String>>,
}

/// `[auth.mtls]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MtlsSection {
    /// (compat)
    #[serde(default)]
    pub enabled: bool,
    /// (compat) cn | san_dns | san_email | san_uri.
    pub identity_source: Option<String>,
    /// (compat)
    #[serde(default)]
    pub allowed_tools: Vec<String>,
    /// (compat)
    pub rate_limit: Option<u32>,
    /// (compat) Accept X-Client-Cert-* headers only from these addresses.
    #[serde(default)]
    pub trusted_proxy_ips: Vec<String>,
}

/// `[rate_limit]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitSection {
    /// (compat)
    pub enabled: bool,
    /// (compat) Default per identity.
    pub requests_per_second: u32,
    /// (compat)
    pub burst_size: u32,
    /// Per identity x tool, requests per second.
    pub per_tool: BTreeMap<String, u32>,
    /// memory | redis.
    pub backend: String,
    /// Redis URL for the redis backend.
    pub redis_url: Option<String>,
    /// local | open | closed.
    pub redis_failure: String,
}

impl Default for RateLimitSection {
    fn default() -> Self {
        Self {
            enabled: true,
            requests_per_second: 100,
            burst_size: 50,
            per_tool: BTreeMap::new(),
            backend: "memory".into(),
            redis_url: None,
            redis_failure: "local".into(),
        }
    }
}

/// `[audit]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSection {
    /// (compat)
    pub enabled: bool,
    /// (compat)
    pub stdout: bool,
    /// (compat) JSON lines file.
    pub file: Option<String>,
    /// (compat) SIEM endpoint.
    pub export_url: Option<String>,
    /// (compat) 1..10000.
    pub export_batch_size: usize,
    /// (compat)
    pub export_interval_secs: u64,
    /// (compat)
    pub export_headers: BTreeMap<String, String>,
    /// Spool directory while the SIEM is unreachable.
    pub spool_dir: Option<String>,
    /// Spool cap.
    pub spool_max_bytes: u64,
    /// Tool arguments in events.
    pub include_arguments: bool,
    /// Events queued per worker before new ones are dropped (and counted).
    pub queue_capacity: usize,
}

impl Default for AuditSection {
    fn default() -> Self {
        Self {
            enabled: true,
            stdout: false,
            file: None,
            export_url: None,
            export_batch_size: 100,
            export_interval_secs: 5,
            export_headers: BTreeMap::new(),
            spool_dir: None,
            spool_max_bytes: 1 << 30,
            include_arguments: false,
            queue_capacity: 8192,
        }
    }
}

/// `[tracing]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingSection {
    /// (compat)
    pub enabled: bool,
    /// (compat)
    pub service_name: String,
    /// (compat) OTLP over HTTP.
    pub otlp_endpoint: Option<String>,
    /// (compat) 0.0..1.0.
    pub sample_rate: f64,
    /// (compat)
    pub propagate_context: bool,
}

impl Default for TracingSection {
    fn default() -> Self {
        Self {
            enabled: false,
            service_name: "mcp-guard".into(),
            otlp_endpoint: None,
            sample_rate: 0.1,
            propagate_context: true,
        }
    }
}
