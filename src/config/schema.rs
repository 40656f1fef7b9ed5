//! The configuration file's schema: one struct per TOML table, every field documented. It is
//! the single source for three things: the loader (serde), the generated reference
//! `docs/configuration.md` (schemars: doc comments, defaults, allowed values, plus the
//! `x-type`, `x-reload` and `x-since` annotations), and the type errors the loader reports in
//! the user's words (the same `x-type` phrases).
//!
//! These types mirror `shared/spec/config.toml` (keys marked (compat) keep the original
//! mcp-guard spelling). They are only a parse target: `config::validate` turns them into the
//! runtime types the data plane reads, so nothing here is re-checked per request.
//!
//! Annotations: `x-reload = "restart"` marks a key a reload cannot change (a reload that
//! changes it is refused, naming it); every other key applies to the next request after a
//! reload. `x-since` is the release that added a key (absent: 0.1.0, the first). `x-type` is
//! the type in words, used by the reference and by type errors.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// The release every key without an `x-since` annotation arrived in.
pub const FIRST_RELEASE: &str = "0.1.0";

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The data-plane listener and its HTTP limits.
    #[serde(default)]
    pub server: ServerSection,
    /// The admin listener (/metrics, /health, /live, /ready).
    #[serde(default)]
    pub admin: AdminSection,
    /// (compat) The default upstream and the routed servers.
    #[serde(default)]
    pub upstream: UpstreamSection,
    /// (compat) Authentication providers.
    #[serde(default)]
    pub auth: AuthSection,
    /// (compat) Per-identity rate limiting.
    #[serde(default)]
    pub rate_limit: RateLimitSection,
    /// (compat) The audit trail.
    #[serde(default)]
    pub audit: AuditSection,
    /// (compat) OpenTelemetry tracing.
    #[serde(default)]
    pub tracing: TracingSection,
    /// Human approval through MCP elicitation before a listed tool's call runs.
    #[serde(default)]
    pub approval: ApprovalSection,
    /// Tool-definition pinning (the rug-pull defence).
    #[serde(default)]
    pub pinning: PinningSection,
    /// Secret redaction in what upstreams send toward the model.
    #[serde(default)]
    pub redaction: RedactionSection,
    /// Argument constraints per tool (see `[[tool_rules]]`).
    #[serde(default)]
    pub tool_rules: Vec<ToolRuleSection>,
    /// Dotted paths of the keys the file itself sets (array elements without an index), so
    /// that a key set to no effect can be told apart from a default. Filled by the loader.
    #[serde(skip)]
    #[schemars(skip)]
    pub explicit: BTreeSet<String>,
}

impl FileConfig {
    /// Whether the file itself sets `path` (dotted, e.g. `server.sse_path`).
    pub fn sets(&self, path: &str) -> bool {
        self.explicit.contains(path)
    }
}

/// `io`: which kernel interface the workers use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum IoChoice {
    /// io_uring when the kernel allows it, else epoll.
    #[default]
    Auto,
    /// io_uring, or refuse to start.
    IoUring,
    /// epoll.
    Epoll,
}

/// `client_auth`: whether a client certificate is demanded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// Every client presents a certificate chaining to `client_ca_path`.
    #[default]
    Required,
    /// A certificate is used when presented.
    Optional,
}

/// `transport`: how an upstream is reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TransportKind {
    /// A child process speaking newline-delimited JSON-RPC.
    #[default]
    Stdio,
    /// MCP Streamable HTTP.
    Http,
    /// The legacy HTTP+SSE transport (2024-11-05).
    Sse,
}

/// `session_mode`: how stdio processes (or SSE connections) map to client sessions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SessionMode {
    /// One process for every session, request ids remapped.
    #[default]
    Shared,
    /// One process per session.
    PerSession,
}

/// `load_balance`: how replicas are chosen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalance {
    /// The healthy replicas in turn.
    #[default]
    RoundRobin,
    /// The healthy replica with the fewest requests in flight (across workers, until each
    /// reply is written); ties in turn.
    LeastOutstanding,
}

/// `[auth.jwt] mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum JwtMode {
    /// HS256 with a shared secret.
    Simple,
    /// Keys from a JWKS endpoint.
    Jwks,
}

/// `[auth.oauth] provider`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OauthProvider {
    /// GitHub.
    Github,
    /// Google.
    Google,
    /// Okta.
    Okta,
    /// Any OAuth 2.1 authorization server, by its URLs.
    Custom,
}

/// `[auth.mtls] identity_source`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum IdentitySource {
    /// The subject's common name.
    #[default]
    Cn,
    /// The first DNS subject alternative name.
    SanDns,
    /// The first e-mail subject alternative name.
    SanEmail,
    /// The first URI subject alternative name.
    SanUri,
}

/// `[rate_limit] backend`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RateBackend {
    /// Per process.
    #[default]
    Memory,
    /// Shared by a fleet through Redis.
    Redis,
}

/// `[rate_limit] redis_failure`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RedisFailure {
    /// Fall back to this node's share of the limit.
    #[default]
    Local,
    /// Let requests through.
    Open,
    /// Refuse requests.
    Closed,
}

/// The data-plane listener and its HTTP limits.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// (compat) Address to listen on.
    #[schemars(extend("x-type" = "IP address or host name", "x-reload" = "restart"))]
    pub host: String,
    /// (compat) Port to listen on; 0 picks a free port, and the bound address is logged
    /// (`listening on http://…`).
    #[schemars(extend("x-type" = "port number 1–65535, or 0 for any free port", "x-reload" = "restart"))]
    pub port: u16,
    /// Data-plane threads; 0 = one per available core.
    #[schemars(extend("x-type" = "whole number 0–1024", "x-reload" = "restart"))]
    pub workers: usize,
    /// I/O driver: `auto` is io_uring when the kernel allows it, else epoll.
    #[schemars(extend("x-reload" = "restart"))]
    pub io: IoChoice,
    /// Streamable HTTP endpoint of the default upstream.
    #[schemars(extend("x-type" = "absolute URL path"))]
    pub mcp_path: String,
    /// Legacy HTTP+SSE (2024-11-05) stream of the default server (GET); `<sse_path>/<name>` for a
    /// named server; its POSTs go to /messages. Must not overlap a route's path.
    #[schemars(extend("x-type" = "absolute URL path"))]
    pub sse_path: String,
    /// Larger request bodies get 413.
    #[schemars(extend("x-type" = "bytes (whole number, at least 1)"))]
    pub max_body_bytes: usize,
    /// Larger request heads get 431.
    #[schemars(extend("x-type" = "bytes (whole number, at least 256)"))]
    pub max_header_bytes: usize,
    /// A request head must arrive within this many seconds of its first byte, else 408
    /// (slowloris defence).
    #[schemars(extend("x-type" = "seconds (whole number, at least 1)"))]
    pub header_timeout_secs: u64,
    /// Keep-alive connections idle longer are closed; so is a connection whose client reads
    /// nothing of its reply for this long (slow-reader defence; within twice this long when the
    /// reply waits behind earlier ones the client left unread). A client still reading, however
    /// slowly, keeps its connection.
    #[schemars(extend("x-type" = "seconds (whole number, at least 1)"))]
    pub idle_timeout_secs: u64,
    /// A whole request body must arrive within this many seconds of its head, else 408 and the
    /// connection closed (slow-body defence).
    #[schemars(extend("x-type" = "seconds (whole number, at least 1)"))]
    pub body_timeout_secs: u64,
    /// Tool names outside the MCP character set (`A-Z a-z 0-9 _ - .`, 1–128 characters) are
    /// refused with -32602, and left out of the `tools/list` answers of a caller whose tool
    /// rule filters them. `false` relaxes both, at the risk that an upstream folding case or
    /// Unicode (`read_ſecret`) runs a tool a deny rule was written for.
    pub strict_tool_names: bool,
    /// Open connections across all workers; beyond it new connections get 503.
    #[schemars(extend("x-type" = "whole number, at least 1"))]
    pub max_connections: usize,
    /// On SIGTERM, in-flight requests get this long to finish; a call still waiting on its
    /// upstream then is answered 503 (with up to half a second more to write those answers).
    #[schemars(extend("x-type" = "seconds (whole number)"))]
    pub shutdown_grace_secs: u64,
    /// A session without a request for this long ends (its client gets 404 and initializes
    /// again): a per-session stdio child or SSE connection is stopped, a shared one forgets the
    /// session (unless its client holds a stream open). A request in flight is not idleness.
    /// Sessions of an HTTP upstream hold nothing here (the upstream expires its own). A legacy
    /// SSE client's session ends with its stream, and closes its stream when its upstream
    /// session ends.
    #[schemars(extend("x-type" = "seconds (whole number, at least 1)"))]
    pub session_idle_secs: u64,
    /// Browser `Origin` values accepted; any other `Origin` gets 403. Requests without an
    /// `Origin` (non-browser clients) are not affected.
    #[schemars(extend("x-type" = "list of origins (`https://app.example.com`)"))]
    pub allowed_origins: Vec<String>,
    /// Keys that sign session ids, each the base64 of at least 32 random bytes
    /// (`openssl rand -base64 32`), usually `${ENV}` references. The first signs new ids; every
    /// one verifies, so a key is rotated by putting the new one first and removing the old one
    /// once sessions signed with it may end. Give every replica the same keys and a session
    /// opened on one is accepted by all, and survives restarts. Absent (and no
    /// `session_key_file`): a random key per process.
    #[schemars(extend("x-type" = "list of base64 keys (secret)"))]
    pub session_keys: Vec<String>,
    /// The same keys from a file: one base64 key per line, the first signs; blank lines and
    /// `#` comments are skipped. Read at start and at each reload. Not with `session_keys`.
    #[schemars(extend("x-type" = "file path"))]
    pub session_key_file: Option<String>,
    /// How clients reach the gateway, `https://host[:port]` (http only to a loopback address),
    /// no path: the resource identifier and metadata URLs of OAuth discovery are built from
    /// it, and the facade's issuer is it. Required with `[auth.oauth]`.
    #[schemars(extend("x-type" = "URL"))]
    pub public_url: Option<String>,
    /// (compat) TLS termination; absent = plain HTTP. Adding or removing the section takes a
    /// restart; its files are read again at every reload (new handshakes use them).
    pub tls: Option<TlsSection>,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 3000,
            workers: 0,
            io: IoChoice::Auto,
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
            session_idle_secs: 1800,
            allowed_origins: Vec::new(),
            session_keys: Vec::new(),
            session_key_file: None,
            public_url: None,
            tls: None,
        }
    }
}

/// TLS termination on the data-plane listener: TLS 1.2 and 1.3, ALPN `http/1.1`. The
/// certificate, key and client CA are read again at every reload (new handshakes use them; a
/// file that does not load refuses the reload); adding or removing the section takes a restart.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// (compat) PEM certificate chain.
    #[schemars(extend("x-type" = "file path"))]
    pub cert_path: String,
    /// (compat) PEM private key.
    #[schemars(extend("x-type" = "file path"))]
    pub key_path: String,
    /// (compat) Enables mTLS: client certificates must chain to this CA bundle.
    #[schemars(extend("x-type" = "file path"))]
    pub client_ca_path: Option<String>,
    /// With `client_ca_path`: `required` refuses a handshake without a valid client
    /// certificate; `optional` verifies and uses one when presented.
    #[serde(default)]
    pub client_auth: ClientAuth,
}

/// The admin listener: `/metrics` (Prometheus text), `/health`, `/live`, `/ready`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
#[schemars(extend("x-reload" = "restart"))]
pub struct AdminSection {
    /// Admin listener address.
    #[schemars(extend("x-type" = "IP address or host name"))]
    pub host: String,
    /// Admin listener port; 0 picks a free port.
    #[schemars(extend("x-type" = "port number 1–65535, or 0 for any free port"))]
    pub port: u16,
    /// Set to `false` to run without the admin listener.
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

/// The default upstream, served at `server.mcp_path`, and the routed servers.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    /// (compat) How the upstream is reached: `stdio` (a child process), `http` (Streamable
    /// HTTP) or `sse` (a legacy HTTP+SSE server: its stream at `url`, messages posted where its
    /// `endpoint` event says, on the same origin only). On reload, a changed upstream is started before
    /// the switch (one that cannot start refuses the reload); the old one finishes its
    /// in-flight requests, and its sessions end (clients initialize again).
    #[serde(default)]
    pub transport: TransportKind,
    /// (compat) stdio: the program to run, found on `PATH` or relative to `cwd`.
    #[schemars(extend("x-type" = "program name or path"))]
    pub command: Option<String>,
    /// (compat) stdio: its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// stdio: extra environment for the child (the gateway's own environment is inherited).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// stdio: the child's working directory (default: the gateway's).
    #[schemars(extend("x-type" = "directory path"))]
    pub cwd: Option<String>,
    /// stdio and sse: one shared process or SSE connection (request ids remapped per session)
    /// or one per session (isolated; started on initialize, stopped on DELETE or after
    /// `server.session_idle_secs` without a request).
    #[serde(default)]
    pub session_mode: SessionMode,
    /// stdio and sse `per_session`: most children (or connections) at once (default 64); one identity may hold half of
    /// them (at least one). At the cap an initialize gets 503 with a JSON-RPC error.
    #[schemars(extend("x-type" = "whole number 1–4096"))]
    pub max_processes: Option<usize>,
    /// (compat) http: the server's endpoint; sse: its stream's URL. `http://host[:port]/path`,
    /// resolved at load time.
    #[schemars(extend("x-type" = "URL"))]
    pub url: Option<String>,
    /// http: replicas of one server, load balanced (instead of `url`, never with it; at most
    /// 64, no two the same). A session stays on the replica that opened it: while that replica
    /// is ejected its requests get 503, and once it left `urls` (or answers as another server)
    /// the session is unknown (404) and the client initializes again; it never moves to another
    /// replica. Each replica gets an MCP `initialize` every 2 s from the health-check thread (the
    /// session it opens is deleted at once); 3 consecutive failures, of requests that cannot
    /// reach it or of these checks, eject it, and a good check brings it back. With every
    /// replica ejected, requests fail at once with 503 and a JSON-RPC error naming the server.
    /// `/ready` lists each replica.
    #[serde(default)]
    #[schemars(extend("x-type" = "list of URLs"))]
    pub urls: Vec<String>,
    /// With `urls`: how a new session (or a request outside any session) picks a healthy
    /// replica; a session stays on its replica.
    #[serde(default)]
    pub load_balance: LoadBalance,
    /// http and sse: headers sent upstream (the client's credentials never are).
    #[serde(default)]
    #[schemars(extend("x-type" = "table of header name = value"))]
    pub headers: BTreeMap<String, String>,
    /// Seconds the upstream has to answer a request, per request: the JSON-RPC response must
    /// have arrived by then, as a JSON body or as the last event of an SSE stream (progress
    /// does not extend it; time spent on a client reading slowly is not counted, up to this
    /// long again). Beyond it the client gets 504, or, on an SSE answer already begun, the
    /// same error as the stream's last event. A GET stream is not bounded by it.
    #[serde(default = "default_upstream_timeout")]
    #[schemars(extend("x-type" = "seconds (whole number, at least 1)"))]
    pub timeout_secs: u64,
    /// (compat) Several servers routed by path; the longest prefix wins.
    #[serde(default)]
    pub servers: Vec<ServerRoute>,
}

fn default_upstream_timeout() -> u64 {
    60
}

impl Default for UpstreamSection {
    fn default() -> Self {
        Self {
            transport: TransportKind::default(),
            command: None,
            args: Vec::new(),
            env: BTreeMap::new(),
            cwd: None,
            session_mode: SessionMode::default(),
            max_processes: None,
            url: None,
            urls: Vec::new(),
            load_balance: LoadBalance::default(),
            headers: BTreeMap::new(),
            timeout_secs: default_upstream_timeout(),
            servers: Vec::new(),
        }
    }
}

/// One routed server: every `[upstream]` key, per server, plus its route. Each server is
/// reachable at `<server.mcp_path>/<name>` and, with `path_prefix`, at that path too; the
/// longest matching endpoint wins, on a segment boundary. Paths must be in normal form (a
/// request path with `//`, `.` or `..` segments, `%` escapes or `\` gets 400), so no spelling
/// reaches another server. Session ids are bound to the server as well as the caller: an id
/// minted at one server is unknown (404) at another. `GET /routes` lists the servers the caller
/// may reach; `allowed_servers` on a key restricts them (403 elsewhere). With routed servers,
/// `[upstream]` is a default at `server.mcp_path` only when it names a `command`, `url` or
/// `urls`; its `timeout_secs` is every server's default. On reload servers are reconciled by name: an
/// unchanged one runs on, a changed or new one is started first, a removed one is retired.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServerRoute {
    /// (compat) Name, 1-64 characters of `A-Z a-z 0-9 _ -` (not `default`); the server is
    /// reachable at `<server.mcp_path>/<name>`.
    pub name: String,
    /// (compat) A path of its own, in normal form (`/github`, not `/github/`).
    #[schemars(extend("x-type" = "absolute URL path"))]
    pub path_prefix: Option<String>,
    /// (compat) Route sub-paths too: a request below the server's endpoint or prefix reaches the
    /// HTTP upstream's path plus the remainder (`/github/x` → `<url path>/x`). Without it only
    /// the exact paths are routed.
    #[serde(default)]
    pub strip_prefix: bool,
    /// (compat) How the server is reached.
    #[serde(default)]
    pub transport: TransportKind,
    /// (compat) stdio: the program to run.
    #[schemars(extend("x-type" = "program name or path"))]
    pub command: Option<String>,
    /// (compat) stdio: its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// stdio: extra environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// stdio: working directory.
    #[schemars(extend("x-type" = "directory path"))]
    pub cwd: Option<String>,
    /// stdio: shared or per-session processes.
    #[serde(default)]
    pub session_mode: SessionMode,
    /// stdio `per_session`: process cap.
    #[schemars(extend("x-type" = "whole number, at least 1"))]
    pub max_processes: Option<usize>,
    /// (compat) http: the server's endpoint.
    #[schemars(extend("x-type" = "URL"))]
    pub url: Option<String>,
    /// http: replicas, load balanced (instead of `url`); as `upstream.urls`.
    #[serde(default)]
    #[schemars(extend("x-type" = "list of URLs"))]
    pub urls: Vec<String>,
    /// With `urls`: how a replica is chosen; as `upstream.load_balance`.
    #[serde(default)]
    pub load_balance: LoadBalance,
    /// http: headers sent upstream.
    #[serde(default)]
    #[schemars(extend("x-type" = "table of header name = value"))]
    pub headers: BTreeMap<String, String>,
    /// Seconds the server has to answer a request (see `upstream.timeout_secs`); default
    /// `upstream.timeout_secs`.
    #[schemars(extend("x-type" = "seconds (whole number, at least 1)"))]
    pub timeout_secs: Option<u64>,
}

/// Authentication providers. With none configured every caller is anonymous.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
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

/// One pre-shared API key and the policy of the identity it stands for. Clients send it as
/// `Authorization: Bearer <key>` or `X-API-Key: <key>`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyEntry {
    /// (compat) The identity the key stands for. Unique: two entries with one id, or with one
    /// `key_hash`, are refused at load (they would share sessions and rate buckets under
    /// different policies). To rotate a key, add the new one under a new id, move clients
    /// over, then remove the old entry. It must read as what it is: no whitespace at either
    /// end, no control or invisible characters, at most 256 bytes, and no `jwt:`, `oauth:` or
    /// `mtls:` prefix (those name token and certificate identities).
    pub id: String,
    /// (compat) Standard base64 of the SHA-256 of the key, from `mcp-guard keygen` or
    /// `mcp-guard hash-key` (unique).
    #[schemars(extend("x-type" = "base64 SHA-256 digest"))]
    pub key_hash: String,
    /// (compat) Tool names or globs (`*`, `?`) this identity may call; empty = every tool. An
    /// entry `server/tool` applies on that routed server only (`default` is `[upstream]`); with
    /// any allow entry, a server none of them applies to allows nothing. An entry that can
    /// never match (outside the tool-name character set, an unknown server) is refused.
    #[serde(default)]
    #[schemars(extend("x-type" = "list of names or globs"))]
    pub allowed_tools: Vec<String>,
    /// Tool names or globs refused; deny wins over allow. `server/tool` as for
    /// `allowed_tools`.
    #[serde(default)]
    #[schemars(extend("x-type" = "list of names or globs"))]
    pub denied_tools: Vec<String>,
    /// Routed servers this identity may reach, by name (`default` is the `[upstream]` at
    /// `server.mcp_path`); absent = all. Any other server is 403 and missing from `/routes`.
    #[schemars(extend("x-type" = "list of server names"))]
    pub allowed_servers: Option<Vec<String>>,
    /// Resource URIs or globs `resources/read` may name; empty = all.
    #[serde(default)]
    #[schemars(extend("x-type" = "list of URIs or globs"))]
    pub allowed_resources: Vec<String>,
    /// Resource URIs or globs refused; deny wins over allow.
    #[serde(default)]
    #[schemars(extend("x-type" = "list of URIs or globs"))]
    pub denied_resources: Vec<String>,
    /// Prompt names or globs `prompts/get` may name; empty = all.
    #[serde(default)]
    #[schemars(extend("x-type" = "list of names or globs"))]
    pub allowed_prompts: Vec<String>,
    /// Prompt names or globs refused; deny wins over allow.
    #[serde(default)]
    #[schemars(extend("x-type" = "list of names or globs"))]
    pub denied_prompts: Vec<String>,
    /// (compat) Requests per second for this identity (instead of
    /// `rate_limit.requests_per_second`; the burst stays `rate_limit.burst_size`).
    #[schemars(extend("x-type" = "requests per second (whole number, at least 1)"))]
    pub rate_limit: Option<u32>,
    /// `enforce` refuses what this identity's lists and the `[[tool_rules]]` refuse; `shadow`
    /// decides the same, audits a refusal as `would_deny` with its reason, counts it, and lets
    /// the request through (rate limits are never shadowed). Per API key: token and certificate
    /// identities always enforce.
    #[serde(default)]
    pub policy_mode: PolicyMode,
}

/// Whether a policy refuses or only reports what it would refuse.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PolicyMode {
    /// Refusals are enforced.
    #[default]
    Enforce,
    /// Refusals are audited as `would_deny` and counted; the request proceeds.
    Shadow,
}

/// Argument constraints on the calls of some tools, checked after the allow/deny lists, on
/// `params.arguments` of each `tools/call` (the classifier's own parse; no second one). A call
/// is checked against every rule whose `tool`, `server` and `identities` match it; the first
/// failed check refuses it (JSON-RPC error -32003 naming the argument's pointer and the check,
/// audited as `argument_refused`), and the upstream never sees it.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolRuleSection {
    /// Tool name or glob (`*`, `?`).
    #[schemars(extend("x-type" = "name or glob"))]
    pub tool: String,
    /// Only on this routed server (`default` is `[upstream]`); absent = every server.
    #[schemars(extend("x-type" = "server name"))]
    pub server: Option<String>,
    /// Only for these identity ids or globs; absent = every caller.
    #[schemars(extend("x-type" = "list of identity ids or globs"))]
    pub identities: Option<Vec<String>>,
    /// `enforce` refuses a call failing a check; `shadow` audits it as `would_deny` and lets
    /// it through.
    #[serde(default)]
    pub mode: PolicyMode,
    /// The checks, one entry per argument.
    #[serde(default)]
    pub args: Vec<ArgRuleSection>,
}

/// The checks on one argument of a `[[tool_rules]]` entry; at least one besides `pointer`.
/// Every check but `required` applies only when the argument is present.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ArgRuleSection {
    /// RFC 6901 JSON pointer into `params.arguments` (`/path`, `/options/depth`, `/a~1b` for
    /// the member `a/b`). A member named twice anywhere along it refuses the call.
    #[schemars(extend("x-type" = "JSON pointer"))]
    pub pointer: String,
    /// An absent argument is refused.
    #[serde(default)]
    pub required: bool,
    /// A string that, percent-decoded (once: a `%` left after decoding is refused) and with
    /// `.`, `..` and repeated slashes resolved, is one of these absolute roots or below it on a
    /// segment boundary (`/srv/data` admits `/srv/data/x`, never `/srv/database`). A `..` may
    /// climb only below the root (`/srv/data/a/../b` passes, `/srv/data/../data/b` does not).
    /// A relative path, a NUL, a backslash, a control character or a character that reads as
    /// a dot or slash (fullwidth `．`, `／`, the two-dot leader) is refused. Symlinks are not
    /// resolved: that is the server's business.
    #[schemars(extend("x-type" = "list of absolute paths"))]
    pub path_under: Option<Vec<String>>,
    /// A string matching one of these globs (`*` any run, `?` one character).
    #[schemars(extend("x-type" = "list of globs"))]
    pub glob: Option<Vec<String>>,
    /// A string this regular expression matches (Rust `regex` syntax, linear time; anchor it
    /// with `^…$` to match the whole value).
    #[schemars(extend("x-type" = "regular expression"))]
    pub regex: Option<String>,
    /// A string equal to one of these.
    #[schemars(extend("x-type" = "list of strings"))]
    pub one_of: Option<Vec<String>>,
    /// A JSON number at least this (a number sent as a string is refused, never converted).
    #[schemars(extend("x-type" = "number"))]
    pub min: Option<f64>,
    /// A JSON number at most this (a number sent as a string is refused, never converted).
    #[schemars(extend("x-type" = "number"))]
    pub max: Option<f64>,
    /// A string of at most this many characters (Unicode scalar values, not bytes).
    #[schemars(extend("x-type" = "characters (whole number)"))]
    pub max_len: Option<usize>,
    /// The JSON type the argument must have: `string`, `number`, `integer` (a number without
    /// a fraction or exponent) or `boolean`.
    #[serde(rename = "type")]
    pub kind: Option<ArgType>,
}

/// `type` of an argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ArgType {
    /// A JSON string.
    String,
    /// Any JSON number.
    Number,
    /// A JSON number written without a fraction or exponent.
    Integer,
    /// `true` or `false`.
    Boolean,
}

/// JWT bearer tokens.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JwtSection {
    /// (compat) `simple`: HS256 with `secret`; `jwks`: keys from `jwks_url`.
    pub mode: JwtMode,
    /// (compat) HS256 secret (simple mode).
    pub secret: Option<String>,
    /// (compat) JWKS endpoint (jwks mode).
    #[schemars(extend("x-type" = "URL"))]
    pub jwks_url: Option<String>,
    /// (compat) Accepted algorithms; `none` never is.
    #[serde(default)]
    pub algorithms: Vec<String>,
    /// (compat) Required issuer.
    pub issuer: Option<String>,
    /// (compat) Required audience.
    pub audience: Option<String>,
    /// (compat) Claim holding the user id.
    pub user_id_claim: Option<String>,
    /// (compat) Claim holding scopes (space-separated string or array).
    pub scopes_claim: Option<String>,
    /// (compat) Clock leeway for `exp` and `nbf`.
    #[schemars(extend("x-type" = "seconds (whole number)"))]
    pub leeway_secs: Option<u64>,
    /// (compat) JWKS refresh interval.
    #[schemars(extend("x-type" = "seconds (whole number)"))]
    pub cache_duration_secs: Option<u64>,
    /// (compat) Scope → tools it grants; `"*"` = all.
    #[serde(default)]
    #[schemars(extend("x-type" = "table of scope = list of tools"))]
    pub scope_tool_mapping: BTreeMap<String, Vec<String>>,
}

/// OAuth 2.1 as the MCP authorization spec requires. As a resource server the gateway
/// accepts access tokens of the authorization server: checked by introspection when
/// `introspection_url` is set, else as JWTs (RFC 9068) signed with the keys its metadata
/// names; either way minted for the endpoint they are used at (`server.public_url`).
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OauthSection {
    /// (compat) The identity provider. `github` and `google` always make mcp-guard the
    /// authorization server MCP clients talk to (the facade); `okta` and `custom` do when
    /// `authorization_servers` is empty, else their tokens are checked here (`okta` reads
    /// scopes from `scp`).
    pub provider: OauthProvider,
    /// (compat) The gateway's client id at the identity provider.
    pub client_id: String,
    /// (compat) The gateway's client secret at the identity provider (required for github and
    /// google).
    pub client_secret: Option<String>,
    /// (compat) Authorization endpoint (github and google have defaults).
    #[schemars(extend("x-type" = "URL"))]
    pub authorization_url: Option<String>,
    /// (compat) Token endpoint (github and google have defaults); https, or http to loopback.
    #[schemars(extend("x-type" = "URL"))]
    pub token_url: Option<String>,
    /// (compat) RFC 7662 introspection endpoint (https, or http to loopback): when set, every
    /// access token is checked there, the call authenticated with `client_id` and
    /// `client_secret`. Answers are cached per worker until the token's `exp` (60 s without
    /// one), refusals for 10 s.
    #[schemars(extend("x-type" = "URL"))]
    pub introspection_url: Option<String>,
    /// (compat) Where the facade reads who signed in (github: `https://api.github.com/user`,
    /// google: its OpenID userinfo).
    #[schemars(extend("x-type" = "URL"))]
    pub userinfo_url: Option<String>,
    /// (compat) The facade's callback, registered with the provider: `server.public_url` plus
    /// a path (default `<public_url>/oauth/callback`).
    #[schemars(extend("x-type" = "URL"))]
    pub redirect_uri: Option<String>,
    /// (compat) Scopes requested: by the facade at the identity provider (default github
    /// `read:user`, google `openid email`, others `openid profile`); without the facade, what
    /// the challenge and metadata tell clients to ask the authorization servers for.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// (compat) The userinfo member or token claim naming the user (github default `id`,
    /// others `sub`); the identity is `oauth:<it>`.
    pub user_id_claim: Option<String>,
    /// The authorization servers' issuer URLs (https, or http to loopback), advertised in
    /// protected-resource metadata; empty (with okta or custom) makes mcp-guard the
    /// authorization server, advertising `server.public_url`. Otherwise the first is the one
    /// whose tokens are accepted: their `iss` must equal it, and its metadata (RFC 8414, else
    /// OpenID Connect discovery) names the keys JWT access tokens are checked with.
    #[serde(default)]
    #[schemars(extend("x-type" = "list of URLs"))]
    pub authorization_servers: Vec<String>,
    /// (compat) Scope → tools it grants; `"*"` = all. With the facade, its keys are the scopes
    /// clients may ask for (`scopes_supported`); empty: no scopes, every tool. A tool call an
    /// external server's token does not grant, and another scope would, is answered 403 with
    /// the `insufficient_scope` challenge naming those scopes.
    #[serde(default)]
    #[schemars(extend("x-type" = "table of scope = list of tools"))]
    pub scope_tool_mapping: BTreeMap<String, Vec<String>>,
}

/// Identities from client certificates.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MtlsSection {
    /// (compat) Turns certificate identities on.
    #[serde(default)]
    pub enabled: bool,
    /// (compat) Which certificate field names the identity.
    #[serde(default)]
    pub identity_source: IdentitySource,
    /// (compat) Tool names or globs certificate identities may call; empty = every tool.
    #[serde(default)]
    #[schemars(extend("x-type" = "list of names or globs"))]
    pub allowed_tools: Vec<String>,
    /// (compat) Requests per second per certificate identity.
    #[schemars(extend("x-type" = "requests per second (whole number, at least 1)"))]
    pub rate_limit: Option<u32>,
    /// (compat) Accept `X-Client-Cert-*` headers, only from these addresses (a TLS terminator
    /// in front); from anyone else they are ignored, and so they are on a connection that
    /// brought a certificate of its own to the gateway's handshake. Never forwarded upstream.
    #[serde(default)]
    #[schemars(extend("x-type" = "list of IP addresses or CIDR blocks"))]
    pub trusted_proxy_ips: Vec<String>,
}

/// Rate limits per identity (anonymous callers: per client address) and per identity × tool.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitSection {
    /// (compat) Turns rate limiting on.
    pub enabled: bool,
    /// (compat) Default per identity.
    #[schemars(extend("x-type" = "requests per second (whole number, at least 1)"))]
    pub requests_per_second: u32,
    /// (compat) Requests an identity may send at once above its rate.
    #[schemars(extend("x-type" = "whole number, at least 1"))]
    pub burst_size: u32,
    /// Per identity × tool, requests per second: an extra bucket per identity and tool (its
    /// burst equals its rate).
    #[schemars(extend("x-type" = "table of tool name = requests per second"))]
    pub per_tool: BTreeMap<String, u32>,
    /// Where the buckets live.
    #[schemars(extend("x-reload" = "restart"))]
    pub backend: RateBackend,
    /// The Redis server of the `redis` backend: `redis://[[user]:password@]host[:port][/db]`,
    /// or `rediss://` for TLS (verified against the Mozilla root set). The password never
    /// appears in logs, metrics or `validate` output; `${REDIS_URL}` keeps it out of the file.
    #[schemars(extend("x-type" = "URL (`redis://` or `rediss://`)", "x-reload" = "restart"))]
    pub redis_url: Option<String>,
    /// PEM file of the certificate authorities a `rediss://` server's certificate must chain
    /// to, instead of the Mozilla root set (a private CA).
    #[schemars(extend("x-type" = "path to a PEM file", "x-reload" = "restart"))]
    pub redis_ca_file: Option<String>,
    /// What the `redis` backend does while Redis is unreachable: `local` applies each limit
    /// divided by `redis_replicas` on this node, `open` lets requests through unlimited
    /// (a lease that is only late, Redis reachable, takes the node's share as under `local`),
    /// `closed` refuses them with 429.
    #[schemars(extend("x-reload" = "restart"))]
    pub redis_failure: RedisFailure,
    /// Replicas expected to share the limits: while Redis is unreachable and `redis_failure`
    /// is `local`, each node applies rate / redis_replicas (and burst / redis_replicas).
    #[schemars(extend("x-type" = "whole number 1–10000", "x-reload" = "restart"))]
    pub redis_replicas: u32,
    /// How long a request may wait for quota from Redis (and each Redis command's timeout);
    /// past it the `redis_failure` rule answers that request.
    #[schemars(extend("x-type" = "milliseconds 1–10000", "x-reload" = "restart"))]
    pub redis_lease_timeout_ms: u64,
}

impl Default for RateLimitSection {
    fn default() -> Self {
        Self {
            enabled: true,
            requests_per_second: 100,
            burst_size: 50,
            per_tool: BTreeMap::new(),
            backend: RateBackend::Memory,
            redis_url: None,
            redis_ca_file: None,
            redis_failure: RedisFailure::Local,
            redis_replicas: 1,
            redis_lease_timeout_ms: 50,
        }
    }
}

/// `format`: the body of a SIEM batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExportFormat {
    /// One JSON array of event objects per POST (`application/json`).
    #[default]
    Json,
    /// Splunk HTTP Event Collector: `{"time":…,"event":{…}}` objects, concatenated.
    SplunkHec,
    /// Elasticsearch/OpenSearch `_bulk`: a `create` action (the event id as `_id`) and the
    /// event, as NDJSON.
    ElasticBulk,
    /// ArcSight Common Event Format: one `CEF:0|…` line per event.
    Cef,
}

/// The audit trail: one JSON line per decision, written off the request path.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSection {
    /// (compat) Turns the audit trail on; events are written only when `stdout` or `file` is
    /// set.
    #[schemars(extend("x-reload" = "restart"))]
    pub enabled: bool,
    /// (compat) Events to standard output.
    #[schemars(extend("x-reload" = "restart"))]
    pub stdout: bool,
    /// (compat) Events appended to this JSON-lines file (its directory must be writable);
    /// reopened on SIGHUP, for log rotation.
    #[schemars(extend("x-type" = "file path", "x-reload" = "restart"))]
    pub file: Option<String>,
    /// (compat) SIEM endpoint batches are POSTed to.
    #[schemars(extend("x-type" = "URL", "x-reload" = "restart"))]
    pub export_url: Option<String>,
    /// (compat) Events per SIEM batch, 1–10000.
    #[schemars(extend("x-type" = "whole number 1–10000", "x-reload" = "restart"))]
    pub export_batch_size: usize,
    /// (compat) The longest an event waits for its batch to fill before the batch is sent.
    #[schemars(extend("x-type" = "seconds (whole number 1–3600)", "x-reload" = "restart"))]
    pub export_interval_secs: u64,
    /// (compat) Headers sent with each SIEM batch (the SIEM's token, typically: never logged,
    /// shown or put in metrics).
    #[schemars(extend("x-type" = "table of header name = value", "x-reload" = "restart"))]
    pub export_headers: BTreeMap<String, String>,
    /// Body of each SIEM batch: `json` (one JSON array of events), `splunk_hec` (HEC event
    /// objects), `elastic_bulk` (`_bulk` NDJSON, the event id as `_id`) or `cef` (one
    /// `CEF:0` line per event).
    #[schemars(extend("x-reload" = "restart"))]
    pub format: ExportFormat,
    /// Events wait here while the SIEM is unreachable, and across restarts (required with
    /// `export_url`; one gateway per directory).
    #[schemars(extend("x-type" = "directory path", "x-reload" = "restart"))]
    pub spool_dir: Option<String>,
    /// Spool cap; beyond it the oldest events are dropped, and counted.
    #[schemars(extend("x-type" = "bytes (whole number, at least 65536)", "x-reload" = "restart"))]
    pub spool_max_bytes: u64,
    /// Tool arguments in events (they may hold personal data).
    pub include_arguments: bool,
    /// Events queued per worker before new ones are dropped (and counted).
    #[schemars(extend("x-type" = "whole number 1–1000000", "x-reload" = "restart"))]
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
            format: ExportFormat::Json,
            spool_dir: None,
            spool_max_bytes: 1 << 30,
            include_arguments: false,
            queue_capacity: 8192,
        }
    }
}

/// Credentials in upstream messages replaced with a marker before they reach the client.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RedactionSection {
    /// Turns redaction on: every message an upstream sends toward a client (tool results,
    /// resources, prompts, lists, server requests and notifications) is scanned.
    pub enabled: bool,
    /// Built-in detectors that run: `aws_access_key`, `github_token`, `slack_token`,
    /// `stripe_key`, `private_key`, `jwt`, `card_number` (Luhn-checked). Default: all.
    pub detectors: Vec<String>,
    /// Extra detectors: name = regex (the `regex` crate's syntax, linear time). A name is
    /// letters, digits, `_` or `-`; a pattern that does not compile, is too large or matches
    /// the empty string is refused.
    #[schemars(extend("x-type" = "table of name = regex"))]
    pub patterns: BTreeMap<String, String>,
    /// What a secret becomes; `{name}` is replaced by the detector's name.
    pub replacement: String,
}

impl Default for RedactionSection {
    fn default() -> Self {
        Self {
            enabled: false,
            detectors: crate::mcp::redact::BUILTIN
                .iter()
                .map(|s| s.to_string())
                .collect(),
            patterns: BTreeMap::new(),
            replacement: "[REDACTED:{name}]".into(),
        }
    }
}

/// OpenTelemetry traces.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
#[schemars(extend("x-reload" = "restart"))]
pub struct TracingSection {
    /// (compat) Turns tracing on.
    pub enabled: bool,
    /// (compat) `service.name` of the spans.
    pub service_name: String,
    /// (compat) OTLP over HTTP collector (protobuf); unset: `http://127.0.0.1:4318`. An URL
    /// without a path gets `/v1/traces`. https, or http to a loopback address only.
    #[schemars(extend("x-type" = "URL"))]
    pub otlp_endpoint: Option<String>,
    /// (compat) Share of traces sampled, 0.0–1.0; an incoming sampled `traceparent` is
    /// honoured.
    #[schemars(extend("x-type" = "number 0.0–1.0"))]
    pub sample_rate: f64,
    /// (compat) Read and forward W3C `traceparent` / `tracestate` (a malformed one is
    /// dropped). With tracing on, the upstream's `traceparent` names the gateway's span.
    pub propagate_context: bool,
    /// An incoming `traceparent`'s sampled flag decides whether the request is traced
    /// (parent-based sampling; a request refused before authentication only where
    /// `sample_rate` would trace it anyway). `false`: `sample_rate` decides for every trace,
    /// so clients cannot force tracing on (or off); set it where callers are not trusted.
    pub honour_parent_sampling: bool,
}

impl Default for TracingSection {
    fn default() -> Self {
        Self {
            enabled: false,
            service_name: "mcp-guard".into(),
            otlp_endpoint: None,
            sample_rate: 0.1,
            propagate_context: true,
            honour_parent_sampling: true,
        }
    }
}

/// `[approval]`: calls of the listed tools wait for a person to confirm them, asked through an
/// MCP `elicitation/create` request on the call's own SSE stream.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ApprovalSection {
    /// Tool names or globs (`*` any run, `?` one character) whose calls need a person's
    /// approval; absent or empty: approval is off. A client that did not declare the
    /// `elicitation` capability at `initialize` (or speaks a revision before 2025-06-18, or the
    /// legacy HTTP+SSE transport) cannot approve, and its calls of these tools are refused.
    pub tools: Vec<String>,
    /// Seconds the held call waits for the answer (1–3600); no answer in time: refused.
    #[schemars(extend("x-type" = "whole number 1–3600"))]
    pub timeout_secs: u64,
}

impl Default for ApprovalSection {
    fn default() -> Self {
        Self {
            tools: Vec::new(),
            timeout_secs: 120,
        }
    }
}

/// `pinning.mode`: what a changed, new or hidden-text tool costs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PinningMode {
    /// The tool stays; an audit event (`pinning/changed`) and a metric.
    Alert,
    /// The tool is dropped from lists and its calls refused until approved.
    #[default]
    Hide,
    /// Every request to the server is refused until its changes are approved.
    Block,
}

/// Tool-definition pinning: each server's tool definitions are pinned by digest (trust on
/// first use, or approved with `mcp-guard pins`); a changed one is handled by `mode`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct PinningSection {
    /// Turns pinning on (every routed server and the default upstream).
    #[schemars(extend("x-reload" = "restart"))]
    pub enabled: bool,
    /// What a changed or new tool costs until it is approved: `alert` (it stays listed; an
    /// audit event and a metric), `hide` (dropped from lists, its calls refused) or `block`
    /// (every request to its server refused).
    pub mode: PinningMode,
    /// The pin file (JSON; its directory must exist and be writable). Re-read on SIGHUP and
    /// when it changes on disk (`mcp-guard pins approve` writes it).
    #[schemars(extend("x-type" = "file path", "x-reload" = "restart"))]
    pub store: String,
    /// Descriptions and titles holding invisible or bidirectional control characters, or text
    /// in tags a client does not show (`<!-- -->`, `<important>`…), count as changed, even on
    /// first sight.
    pub reject_hidden_text: bool,
}

impl Default for PinningSection {
    fn default() -> Self {
        Self {
            enabled: false,
            mode: PinningMode::Hide,
            store: "/var/lib/mcp-guard/pins.json".into(),
            reject_hidden_text: true,
        }
    }
}
