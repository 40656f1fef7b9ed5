//! Configuration: the file schema, loading, and validation into the runtime [`Settings`] that
//! the data plane reads from an `ArcSwap` snapshot.

pub mod features;
pub mod load;
pub mod preflight;
pub mod reference;
pub mod schema;

use crate::audit::AuditOutput;
use crate::auth::{Authenticator, api_key};
use crate::authz::{Matcher, Policy, Rule};
use crate::mcp::session::SessionCodec;
use crate::ratelimit::Limit;
pub use load::{ConfigError, load_file, parse_str, printable};
use schema::{FileConfig, TransportKind};
use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Which io driver the workers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoMode {
    /// io_uring when the kernel allows it, else epoll.
    Auto,
    /// io_uring, or fail to start.
    IoUring,
    /// epoll (monoio's legacy driver).
    Epoll,
}

/// The validated, runtime form of the configuration. Built once per load; immutable.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Listener and HTTP limits.
    pub server: ServerSettings,
    /// Admin listener; `None` when disabled.
    pub admin: Option<SocketAddr>,
    /// Every MCP endpoint and its upstream: the default (`[upstream]` at `server.mcp_path`)
    /// first when there is one, then each `[[upstream.servers]]` in file order.
    pub routes: Vec<Route>,
    /// The authentication chain with each identity's compiled policy.
    pub auth: Arc<Authenticator>,
    /// Rate limits.
    pub rate: RateSettings,
    /// The audit trail.
    pub audit: AuditSettings,
    /// Tool names with their own metric label (names the config mentions), to their slot.
    pub tool_labels: Arc<HashMap<String, usize>>,
    /// Keys the file sets that have no effect where they stand, to be logged.
    pub warnings: Vec<String>,
    /// The file as parsed (JSON form), for telling a reload which keys changed.
    pub file_view: Arc<serde_json::Value>,
    /// The running upstreams of this snapshot, attached by the runtime before the snapshot is
    /// published (`None` in a snapshot that was only validated).
    pub upstreams: Option<Arc<crate::upstream::set::UpstreamSet>>,
    /// Signs and verifies session ids.
    pub sessions: Arc<SessionCodec>,
    /// `[tracing]`: trace context and spans.
    pub tracing: crate::observe::trace::TraceSettings,
    /// `[approval]`: `None` when no tool needs a person's approval.
    pub approval: Option<Arc<crate::mcp::approval::ApprovalSettings>>,
    /// `[pinning]`, when on.
    pub pinning: Option<crate::pinning::PinSettings>,
    /// The pins every worker checks tool lists against, attached by the runtime like
    /// `upstreams` (`None` in a snapshot that was only validated, or with pinning off).
    pub pins: Option<Arc<crate::pinning::Pins>>,
    /// `[redaction]`, compiled; `None` when off.
    pub redaction: Option<Arc<crate::mcp::redact::Redactor>>,
    /// `[[tool_rules]]`, compiled.
    pub tool_rules: Arc<crate::rules::ToolRules>,
}

/// `[rate_limit]`, validated.
#[derive(Debug, Clone)]
pub struct RateSettings {
    /// Whether limits apply.
    pub enabled: bool,
    /// Per identity, unless the identity has its own `rate_limit`.
    pub default: Limit,
    /// Burst for identities with their own rate.
    pub burst: u32,
    /// Per identity × tool.
    pub per_tool: HashMap<String, Limit>,
    /// The Redis backend's settings (`None`: limits per process).
    pub redis: Option<crate::ratelimit::redis::RedisSettings>,
}

/// `[audit]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSettings {
    /// Where events go; `None` when auditing is off or has no destination.
    pub output: Option<AuditOutput>,
    /// Tool arguments in events.
    pub include_arguments: bool,
    /// Per-worker queue bound.
    pub queue_capacity: usize,
}

/// `[server]`, validated.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Address the workers bind.
    pub listen: SocketAddr,
    /// Worker threads (already resolved from 0 = per core).
    pub workers: usize,
    /// io driver choice.
    pub io: IoMode,
    /// Streamable HTTP endpoint.
    pub mcp_path: String,
    /// Legacy SSE endpoint.
    pub sse_path: String,
    /// Request body cap (413 above).
    pub max_body_bytes: usize,
    /// Request head cap (431 above).
    pub max_header_bytes: usize,
    /// Deadline for a whole request head, from its first byte.
    pub header_timeout: Duration,
    /// Keep-alive idle limit.
    pub idle_timeout: Duration,
    /// A session without a request this long ends (with what it holds upstream).
    pub session_idle: Duration,
    /// Deadline for a whole request body, from the end of its head.
    pub body_timeout: Duration,
    /// Tool names must use the MCP character set.
    pub strict_tool_names: bool,
    /// Connection cap across workers.
    pub max_connections: usize,
    /// Grace period on shutdown.
    pub shutdown_grace: Duration,
    /// Accepted browser origins, compared ASCII-case-insensitively.
    pub allowed_origins: Vec<String>,
    /// TLS on the listener (`[server.tls]`); `None`: plain HTTP.
    pub tls: Option<crate::tls::TlsSettings>,
}

/// `max_processes` when a per-session stdio upstream names none.
const DEFAULT_MAX_PROCESSES: usize = 64;
/// The most `max_processes` accepted (each child costs a process and four threads).
const MAX_PROCESSES: usize = 4096;

/// The name of the route of `[upstream]`, served at `server.mcp_path`.
pub const DEFAULT_ROUTE: &str = "default";

/// One MCP endpoint of the gateway and the upstream behind it.
#[derive(Debug, Clone)]
pub struct Route {
    /// `default` for `[upstream]`, else the server's name.
    pub name: Arc<str>,
    /// Where it stands in the file (`upstream`, `upstream.servers[2]`), for messages.
    pub key: String,
    /// Its endpoint: `server.mcp_path` for the default, `<mcp_path>/<name>` for a server.
    pub endpoint: String,
    /// A server's `path_prefix`, in normal form.
    pub prefix: Option<String>,
    /// Sub-paths below the endpoint or prefix reach the upstream's path plus the remainder;
    /// without it only the exact paths are routed.
    pub strip_prefix: bool,
    /// The upstream.
    pub upstream: UpstreamSettings,
}

impl Settings {
    /// The route `path` selects (longest endpoint or prefix, on a segment boundary), with the
    /// remainder after it (empty for an exact match). A remainder is routed only with
    /// `strip_prefix`. `path` must already be in normal form.
    pub fn route_for<'p>(&self, path: &'p str) -> Option<(usize, &'p str)> {
        let mut best: Option<(usize, usize)> = None;
        for (i, r) in self.routes.iter().enumerate() {
            for base in std::iter::once(r.endpoint.as_str()).chain(r.prefix.as_deref()) {
                let Some(rest) = path.strip_prefix(base) else {
                    continue;
                };
                let fits = rest.is_empty() || (rest.starts_with('/') && r.strip_prefix);
                if fits && best.is_none_or(|(_, len)| base.len() > len) {
                    best = Some((i, base.len()));
                }
            }
        }
        best.map(|(i, len)| (i, &path[len..]))
    }

    /// The route named `name`.
    pub fn route(&self, name: &str) -> Option<&Route> {
        self.routes.iter().find(|r| &*r.name == name)
    }
}

/// One upstream MCP server.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    /// How to reach it.
    pub transport: Transport,
    /// How long a request's answer may take, whole.
    pub timeout: Duration,
}

/// Upstream transports.
#[derive(Debug, Clone)]
pub enum Transport {
    /// A child process speaking newline-delimited JSON-RPC.
    Stdio(StdioSettings),
    /// A Streamable HTTP endpoint.
    Http(HttpUpstream),
    /// A legacy HTTP+SSE (2024-11-05) server.
    Sse(SseSettings),
}

/// A legacy HTTP+SSE upstream: its stream's URL (messages go where its `endpoint` event says,
/// on the same origin only), the headers sent with every request, and whether each session
/// gets a connection of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseSettings {
    /// The SSE stream's URL.
    pub endpoint: HttpEndpoint,
    /// Extra headers sent upstream (name, value).
    pub headers: Vec<(String, String)>,
    /// One connection per session (`None`: one shared connection).
    pub per_session: Option<PerSession>,
}

/// `session_mode = "per_session"`: the limits of a stdio upstream's per-session children.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerSession {
    /// Children at most (one identity: half of it, at least one).
    pub max_processes: usize,
    /// A session without a request this long has its child stopped.
    pub idle: Duration,
}

/// A stdio upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StdioSettings {
    /// Program.
    pub command: String,
    /// Arguments.
    pub args: Vec<String>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: Option<String>,
    /// One child per session (`None`: one shared child).
    pub per_session: Option<PerSession>,
}

/// A Streamable HTTP upstream, resolved at load time (no DNS on a worker).
#[derive(Debug, Clone)]
pub struct HttpUpstream {
    /// Where it answers: one endpoint for `url`, one per replica for `urls`, in file order.
    pub endpoints: Vec<HttpEndpoint>,
    /// How a replica is chosen; `Some` only for `urls`. A server given by `url` alone is
    /// never ejected: with nothing to fall back to, every request still tries it.
    pub balance: Option<schema::LoadBalance>,
    /// Extra headers sent upstream (name, value).
    pub headers: Vec<(String, String)>,
    /// Session keys are configured (`server.session_keys`): sessions are meant to move between
    /// replicas of the gateway and across restarts, so a replica's first epoch is the same in
    /// every process instead of drawn at random (see `upstream::balance`).
    pub stable_epochs: bool,
}

/// One HTTP endpoint of an upstream (its only one, or one replica).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpEndpoint {
    /// The URL as shown: credentials and query left out.
    pub url: String,
    /// Resolved addresses, tried in order.
    pub addrs: Vec<SocketAddr>,
    /// `Host` header value.
    pub host_header: String,
    /// Request target (path and query).
    pub path: String,
}

/// The most replicas one server may list in `urls` (a bound on per-request choosing and on
/// the health checks' round).
pub const MAX_REPLICAS: usize = 64;

impl Settings {
    /// Loads and validates `path`.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let file = load_file(path)?;
        validate(&file).map_err(|mut e| {
            e.path = Some(path.to_path_buf());
            e
        })
    }
}

fn invalid(key: &str, msg: impl std::fmt::Display) -> ConfigError {
    ConfigError::new(format!("{key}: {msg}"))
}

/// Turns a parsed file into runtime settings, refusing anything inconsistent or not supported
/// by this build (a gateway that silently ignored a security setting would be worse than one
/// that refuses to start).
pub fn validate(file: &FileConfig) -> Result<Settings, ConfigError> {
    let s = &file.server;
    if let Some(u) = features::first_unbuilt_in(file) {
        return Err(invalid(u.path, u.message));
    }
    let io = match s.io {
        schema::IoChoice::Auto => IoMode::Auto,
        schema::IoChoice::IoUring => IoMode::IoUring,
        schema::IoChoice::Epoll => IoMode::Epoll,
    };
    let listen = resolve_one(&s.host, s.port).map_err(|e| invalid("server.host", e))?;
    for (key, path) in [
        ("server.mcp_path", &s.mcp_path),
        ("server.sse_path", &s.sse_path),
    ] {
        if !path.starts_with('/') || path.contains(['?', '#', ' ']) {
            return Err(invalid(key, format!("`{path}` must be an absolute path")));
        }
    }
    if s.max_body_bytes == 0 || s.max_header_bytes < 256 {
        return Err(invalid(
            "server.max_body_bytes / max_header_bytes",
            "must be > 0 and >= 256",
        ));
    }
    if s.max_connections == 0 {
        return Err(invalid("server.max_connections", "must be at least 1"));
    }
    if s.header_timeout_secs == 0 || s.idle_timeout_secs == 0 || s.body_timeout_secs == 0 {
        return Err(invalid(
            "server.header_timeout_secs / idle_timeout_secs / body_timeout_secs",
            "must be at least 1",
        ));
    }
    for (key, secs) in [
        ("server.header_timeout_secs", s.header_timeout_secs),
        ("server.idle_timeout_secs", s.idle_timeout_secs),
        ("server.body_timeout_secs", s.body_timeout_secs),
        ("server.shutdown_grace_secs", s.shutdown_grace_secs),
        ("server.session_idle_secs", s.session_idle_secs),
        ("upstream.timeout_secs", file.upstream.timeout_secs),
    ] {
        check_secs(key, secs)?;
    }
    let allowed_origins = s
        .allowed_origins
        .iter()
        .enumerate()
        .map(|(i, o)| {
            normal_origin(o).map_err(|e| invalid(&format!("server.allowed_origins[{i}]"), e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if file
        .audit
        .file
        .as_deref()
        .is_some_and(|f| f.trim().is_empty())
    {
        return Err(invalid(
            "audit.file",
            "is empty; name a file, or remove the key (an empty ${VAR} gives this)",
        ));
    }
    let workers = if s.workers == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        s.workers
    };
    if workers > 1024 {
        return Err(invalid("server.workers", "at most 1024"));
    }
    let admin = if file.admin.enabled {
        Some(resolve_one(&file.admin.host, file.admin.port).map_err(|e| invalid("admin.host", e))?)
    } else {
        None
    };
    let tls = match &s.tls {
        Some(t) => {
            if t.client_ca_path.is_none() && file.sets("server.tls.client_auth") {
                return Err(invalid(
                    "server.tls.client_auth",
                    "needs server.tls.client_ca_path (the CA client certificates must chain to)",
                ));
            }
            Some(crate::tls::build(t).map_err(|(key, e)| invalid(key, e))?)
        }
        None => None,
    };
    let mut routes = validate_routes(file, &s.mcp_path)?;
    check_legacy_paths(&s.sse_path, &routes)?;
    let fleet_sessions = !s.session_keys.is_empty() || s.session_key_file.is_some();
    for route in &mut routes {
        if let Transport::Http(h) = &mut route.upstream.transport {
            h.stable_epochs = fleet_sessions;
        }
    }
    let auth = Arc::new(validate_auth(file, &routes)?);
    let rate = validate_rate(file)?;
    let export = validate_export(file)?;
    let audit = AuditSettings {
        output: (file.audit.enabled
            && (file.audit.stdout || file.audit.file.is_some() || export.is_some()))
        .then(|| AuditOutput {
            file: file.audit.file.as_ref().map(std::path::PathBuf::from),
            stdout: file.audit.stdout,
            export,
        }),
        include_arguments: file.audit.include_arguments,
        queue_capacity: file.audit.queue_capacity,
    };
    if !(1..=1_000_000).contains(&audit.queue_capacity) {
        return Err(invalid("audit.queue_capacity", "must be 1..=1000000"));
    }
    let tracing = validate_tracing(&file.tracing)?;
    let approval = validate_approval(&file.approval)?;
    let pinning = crate::pinning::validate(&file.pinning)?;
    let redaction = validate_redaction(&file.redaction)?;
    let tool_rules = validate_tool_rules(file, &routes)?;
    let tool_labels = Arc::new(tool_labels(file));
    let mut warnings = features::ignored_keys(file);
    let sessions = Arc::new(session_codec(s, &mut warnings)?);
    Ok(Settings {
        server: ServerSettings {
            listen,
            workers,
            io,
            mcp_path: s.mcp_path.clone(),
            sse_path: s.sse_path.clone(),
            max_body_bytes: s.max_body_bytes,
            max_header_bytes: s.max_header_bytes,
            header_timeout: Duration::from_secs(s.header_timeout_secs),
            idle_timeout: Duration::from_secs(s.idle_timeout_secs),
            session_idle: Duration::from_secs(s.session_idle_secs),
            body_timeout: Duration::from_secs(s.body_timeout_secs),
            strict_tool_names: s.strict_tool_names,
            max_connections: s.max_connections,
            shutdown_grace: Duration::from_secs(s.shutdown_grace_secs),
            allowed_origins,
            tls,
        },
        admin,
        routes,
        auth,
        rate,
        audit,
        tool_labels,
        warnings,
        file_view: Arc::new(serde_json::to_value(file).unwrap_or_default()),
        upstreams: None,
        sessions,
        tracing,
        approval,
        pinning,
        pins: None,
        redaction,
        tool_rules,
    })
}

/// `[approval]`: each entry a tool name or glob, the timeout in range; no entries: off.
fn validate_approval(
    a: &schema::ApprovalSection,
) -> Result<Option<Arc<crate::mcp::approval::ApprovalSettings>>, ConfigError> {
    if !(1..=3600).contains(&a.timeout_secs) {
        return Err(invalid("approval.timeout_secs", "must be 1..=3600"));
    }
    for t in &a.tools {
        if t.is_empty() || t.len() > 128 || t.chars().any(char::is_control) {
            return Err(invalid(
                "approval.tools",
                format!(
                    "{t:?} is not a tool name or glob (1-128 characters, no control characters)"
                ),
            ));
        }
    }
    if a.tools.is_empty() {
        return Ok(None);
    }
    Ok(Some(Arc::new(crate::mcp::approval::ApprovalSettings {
        tools: crate::authz::Matcher::new(&a.tools),
        timeout: Duration::from_secs(a.timeout_secs),
    })))
}

/// `[[tool_rules]]`: every pointer, regex, bound and root checked and compiled once, so a
/// request only walks its arguments.
fn validate_tool_rules(
    file: &FileConfig,
    routes: &[Route],
) -> Result<Arc<crate::rules::ToolRules>, ConfigError> {
    let names: Vec<Arc<str>> = routes.iter().map(|r| r.name.clone()).collect();
    crate::rules::compile(&file.tool_rules, &names)
        .map(Arc::new)
        .map_err(|(key, msg)| invalid(&key, msg))
}

/// `[redaction]`: the detectors and patterns compiled once, here; an unknown detector or a
/// pattern that does not compile is an error naming its key.
fn validate_redaction(
    r: &schema::RedactionSection,
) -> Result<Option<Arc<crate::mcp::redact::Redactor>>, ConfigError> {
    use crate::mcp::redact::{RedactionConfig, Redactor};
    let compiled = Redactor::new(&RedactionConfig {
        detectors: &r.detectors,
        patterns: &r.patterns,
        replacement: &r.replacement,
    })
    .map_err(|(key, msg)| invalid(&key, msg))?;
    Ok(r.enabled.then(|| Arc::new(compiled)))
}

/// `[tracing]`: the rate in range, the collector https (http only to loopback). An endpoint
/// without a path gets OTLP/HTTP's `/v1/traces`.
fn validate_tracing(
    t: &schema::TracingSection,
) -> Result<crate::observe::trace::TraceSettings, ConfigError> {
    if !(0.0..=1.0).contains(&t.sample_rate) {
        return Err(invalid("tracing.sample_rate", "must be 0.0..=1.0"));
    }
    if t.service_name.is_empty() || t.service_name.len() > 256 {
        return Err(invalid("tracing.service_name", "must be 1 to 256 bytes"));
    }
    let endpoint = match t.otlp_endpoint.as_deref().filter(|_| t.enabled) {
        None if t.enabled => Some("http://127.0.0.1:4318"),
        e => e,
    }
    .map(|url| {
        let after_scheme = url.split_once("://").map_or("", |(_, rest)| rest);
        let url = match after_scheme.find('/') {
            None => format!("{url}/v1/traces"),
            Some(i) if &after_scheme[i..] == "/" => format!("{url}v1/traces"),
            Some(_) => url.to_string(),
        };
        crate::auth::fetch::IdpUrl::parse(&url).map_err(|e| {
            invalid(
                "tracing.otlp_endpoint",
                e.replace("identity-provider URLs", "OTLP collector URLs"),
            )
        })
    })
    .transpose()?;
    Ok(crate::observe::trace::TraceSettings {
        enabled: t.enabled,
        service_name: t.service_name.as_str().into(),
        endpoint,
        threshold: crate::observe::trace::threshold(t.sample_rate),
        propagate: t.propagate_context,
        honour_parent: t.honour_parent_sampling,
    })
}

/// `[audit]`'s SIEM export, when `export_url` is set (and auditing on). Header values are
/// secrets: errors name the header, never its value.
fn validate_export(
    file: &FileConfig,
) -> Result<Option<crate::audit::export::ExportSettings>, ConfigError> {
    let a = &file.audit;
    let Some(url) = a.export_url.as_deref().filter(|_| a.enabled) else {
        return Ok(None);
    };
    let url = crate::auth::fetch::IdpUrl::parse(url).map_err(|e| {
        invalid(
            "audit.export_url",
            e.replace("identity-provider URLs", "SIEM URLs"),
        )
    })?;
    if !(1..=10_000).contains(&a.export_batch_size) {
        return Err(invalid("audit.export_batch_size", "must be 1..=10000"));
    }
    if !(1..=3600).contains(&a.export_interval_secs) {
        return Err(invalid("audit.export_interval_secs", "must be 1..=3600"));
    }
    let mut headers = Vec::with_capacity(a.export_headers.len());
    for (name, value) in &a.export_headers {
        crate::audit::export::check_header(name, value)
            .map_err(|e| invalid(&format!("audit.export_headers.{name}"), e))?;
        headers.push((name.clone(), value.clone()));
    }
    let spool_dir = match a.spool_dir.as_deref() {
        Some(d) if !d.trim().is_empty() => std::path::PathBuf::from(d),
        Some(_) => {
            return Err(invalid(
                "audit.spool_dir",
                "is empty; name a directory (an empty ${VAR} gives this)",
            ));
        }
        None => {
            return Err(invalid(
                "audit.spool_dir",
                "is required with audit.export_url: events wait there while the SIEM is \
                 unreachable, and across restarts",
            ));
        }
    };
    if a.spool_max_bytes < MIN_SPOOL_BYTES {
        return Err(invalid(
            "audit.spool_max_bytes",
            format!("must be at least {MIN_SPOOL_BYTES}"),
        ));
    }
    Ok(Some(crate::audit::export::ExportSettings {
        url,
        format: a.format,
        batch_size: a.export_batch_size,
        interval: Duration::from_secs(a.export_interval_secs),
        headers,
        spool_dir,
        spool_max_bytes: a.spool_max_bytes,
        shutdown_grace: Duration::from_secs(file.server.shutdown_grace_secs),
    }))
}

/// The smallest spool accepted (a few batches of large events).
const MIN_SPOOL_BYTES: u64 = 64 * 1024;

/// At most this many session keys (rotation needs two; a long list only slows every miss).
const MAX_SESSION_KEYS: usize = 8;

/// The session-id keys from `server.session_keys` or `server.session_key_file`, else the
/// process's own. Key material is never echoed in an error.
fn session_codec(
    s: &schema::ServerSection,
    warnings: &mut Vec<String>,
) -> Result<SessionCodec, ConfigError> {
    use base64::Engine as _;
    let (key, lines): (&str, Vec<String>) = match (&s.session_key_file, s.session_keys.is_empty()) {
        (Some(_), false) => {
            return Err(invalid(
                "server.session_keys",
                "give the keys either here or in server.session_key_file, not both",
            ));
        }
        (None, true) => return Ok(SessionCodec::process_random()),
        (None, false) => ("server.session_keys", s.session_keys.clone()),
        (Some(path), true) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| invalid("server.session_key_file", format!("`{path}`: {e}")))?;
            if let Ok(meta) = std::fs::metadata(path) {
                use std::os::unix::fs::PermissionsExt as _;
                if meta.permissions().mode() & 0o077 != 0 {
                    warnings.push(format!(
                        "server.session_key_file: `{path}` is readable by other users; \
                         anyone who reads it can forge session ids (chmod 600)"
                    ));
                }
            }
            let lines = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string)
                .collect();
            ("server.session_key_file", lines)
        }
    };
    if lines.is_empty() {
        return Err(invalid(key, "holds no key"));
    }
    if lines.len() > MAX_SESSION_KEYS {
        return Err(invalid(key, format!("at most {MAX_SESSION_KEYS} keys")));
    }
    let engines = [
        base64::engine::general_purpose::STANDARD,
        base64::engine::general_purpose::URL_SAFE,
        base64::engine::general_purpose::STANDARD_NO_PAD,
        base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ];
    let mut keys = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        let bytes = engines
            .iter()
            .find_map(|e| e.decode(line.as_bytes()).ok())
            .ok_or_else(|| invalid(&format!("{key}[{i}]"), "is not base64"))?;
        if bytes.len() < crate::mcp::session::MIN_SESSION_KEY_BYTES {
            return Err(invalid(
                &format!("{key}[{i}]"),
                format!(
                    "holds {} bytes; a session key needs at least {} random bytes \
                     (`openssl rand -base64 32`)",
                    bytes.len(),
                    crate::mcp::session::MIN_SESSION_KEY_BYTES
                ),
            ));
        }
        keys.push(bytes);
    }
    Ok(SessionCodec::from_keys(&keys))
}

fn validate_auth(file: &FileConfig, routes: &[Route]) -> Result<Authenticator, ConfigError> {
    let mut auth = Authenticator::default();
    if let Some(m) = file.auth.mtls.as_ref().filter(|m| m.enabled) {
        auth.mtls = Some(validate_mtls(file, m, routes)?);
    }
    if let Some(jwt) = &file.auth.jwt {
        auth.jwt = Some(validate_jwt(file, jwt, routes)?);
    }
    if let Some(oauth) = &file.auth.oauth {
        let discovery = validate_oauth(file, oauth, routes)?;
        // Tokens of an external authorization server are checked here when one is advertised
        // (mcp-guard is then not the authorization server) or an introspection endpoint is
        // given; the facade's own tokens are checked by the facade.
        if discovery.server.is_none() || oauth.introspection_url.is_some() {
            auth.oauth_tokens = Some(validate_oauth_tokens(file, oauth, routes)?);
        }
        auth.oauth = Some(discovery);
    }
    if file.auth.api_keys.is_empty() {
        return Ok(auth);
    }
    let mut keys = api_key::ApiKeys::default();
    // The id keys sessions, rate buckets and audit lines: two entries sharing one would share
    // those under different policies, so ids (and hashes) must be unique. Index of first use.
    let mut ids: HashMap<&str, usize> = HashMap::with_capacity(file.auth.api_keys.len());
    let mut digests: HashMap<[u8; 32], usize> = HashMap::with_capacity(file.auth.api_keys.len());
    for (i, k) in file.auth.api_keys.iter().enumerate() {
        let key = format!("auth.api_keys[{i}]");
        if k.id.trim().is_empty() {
            return Err(invalid(&format!("{key}.id"), "must not be empty"));
        }
        // The id is the caller's identity: it gets the hygiene certificate and token names get,
        // so `" mtls:alice"` or a zero-width character cannot pass for another caller.
        if !crate::auth::jwt::acceptable_identity(&k.id) {
            return Err(invalid(
                &format!("{key}.id"),
                format!(
                    "{:?} must not start or end with whitespace, hold control or invisible \
                     characters, or be longer than {} bytes",
                    k.id,
                    crate::auth::jwt::MAX_IDENTITY_BYTES
                ),
            ));
        }
        // Token identities are `jwt:<subject>` (OAuth and mTLS take prefixes of their own):
        // a key with such an id would be that token's caller, sessions and rate limit included.
        if let Some(prefix) = ["jwt:", "oauth:", "mtls:"]
            .iter()
            .find(|p| k.id.to_ascii_lowercase().starts_with(*p))
        {
            return Err(invalid(
                &format!("{key}.id"),
                format!(
                    "ids starting with `{prefix}` are reserved for identities from tokens and certificates"
                ),
            ));
        }
        if let Some(first) = ids.insert(k.id.as_str(), i) {
            return Err(invalid(
                &format!("{key}.id"),
                format!(
                    "duplicate id {:?}, already used by auth.api_keys[{first}] (each key needs \
                     its own id: sessions, rate limits and audit lines are keyed by it)",
                    k.id
                ),
            ));
        }
        let digest = api_key::decode_hash(&k.key_hash).ok_or_else(|| {
            invalid(
                &format!("{key}.key_hash"),
                "is not the base64 of a 32-byte SHA-256 digest (use `mcp-guard hash-key`)",
            )
        })?;
        if let Some(first) = digests.insert(digest, i) {
            return Err(invalid(
                &format!("{key}.key_hash"),
                format!("the same key is already configured as auth.api_keys[{first}]"),
            ));
        }
        if k.rate_limit == Some(0) {
            return Err(invalid(&format!("{key}.rate_limit"), "must be at least 1"));
        }
        let tool_names = if file.server.strict_tool_names {
            Names::Tools
        } else {
            Names::Any
        };
        for (list, entries) in [
            ("allowed_tools", &k.allowed_tools),
            ("denied_tools", &k.denied_tools),
        ] {
            check_tool_patterns(&format!("{key}.{list}"), entries, tool_names, routes)?;
        }
        for (list, entries, names) in [
            ("allowed_resources", &k.allowed_resources, Names::Any),
            ("denied_resources", &k.denied_resources, Names::Any),
            ("allowed_prompts", &k.allowed_prompts, Names::Any),
            ("denied_prompts", &k.denied_prompts, Names::Any),
        ] {
            check_patterns(&format!("{key}.{list}"), entries, names)?;
        }
        let mut policy = Policy {
            tools: tool_rule(&k.allowed_tools, &k.denied_tools, None, routes),
            resources: Rule {
                allow: Matcher::new(&k.allowed_resources),
                deny: Matcher::new(&k.denied_resources),
            },
            prompts: Rule {
                allow: Matcher::new(&k.allowed_prompts),
                deny: Matcher::new(&k.denied_prompts),
            },
            servers: k
                .allowed_servers
                .as_ref()
                .map(|s| s.iter().cloned().collect()),
            rate_limit: k.rate_limit,
            shadow: k.policy_mode == schema::PolicyMode::Shadow,
            per_server: HashMap::new(),
        };
        // A server named by a `server/tool` entry gets a policy of its own.
        let named: std::collections::BTreeSet<&str> = k
            .allowed_tools
            .iter()
            .chain(&k.denied_tools)
            .filter_map(|e| e.split_once('/').map(|(s, _)| s))
            .filter(|s| routes.iter().any(|r| &*r.name == *s))
            .collect();
        for server in named {
            let on_server = Policy {
                tools: tool_rule(&k.allowed_tools, &k.denied_tools, Some(server), routes),
                per_server: HashMap::new(),
                ..policy.clone()
            };
            policy.per_server.insert(server.into(), Arc::new(on_server));
        }
        if !keys.insert(&k.id, digest, Arc::new(policy)) {
            return Err(invalid(
                &format!("{key}.key_hash"),
                "the same key is configured twice",
            ));
        }
    }
    auth.api_keys = Some(keys);
    Ok(auth)
}

fn validate_rate(file: &FileConfig) -> Result<RateSettings, ConfigError> {
    let r = &file.rate_limit;
    if r.enabled && r.requests_per_second == 0 {
        return Err(invalid(
            "rate_limit.requests_per_second",
            "must be at least 1",
        ));
    }
    if r.enabled && r.burst_size == 0 {
        return Err(invalid("rate_limit.burst_size", "must be at least 1"));
    }
    let mut per_tool = HashMap::new();
    for (tool, rps) in &r.per_tool {
        let key = format!("rate_limit.per_tool.{tool}");
        if tool.contains(['*', '?']) {
            return Err(invalid(
                &key,
                "per_tool names tools exactly; `*` and `?` are not globs here",
            ));
        }
        if file.server.strict_tool_names && !crate::mcp::jsonrpc::is_spec_tool_name(tool) {
            return Err(invalid(&key, NEVER_A_TOOL));
        }
        if *rps == 0 {
            return Err(invalid(
                &format!("rate_limit.per_tool.{tool}"),
                "must be at least 1",
            ));
        }
        per_tool.insert(
            tool.clone(),
            Limit {
                rate: f64::from(*rps),
                burst: *rps,
            },
        );
    }
    // With a URL the pool is built even while limits are off, so a reload that turns them on
    // (the backend and URL need a restart, `enabled` does not) finds it there.
    let redis = if r.backend == schema::RateBackend::Redis && (r.enabled || r.redis_url.is_some()) {
        Some(validate_redis(r)?)
    } else {
        None
    };
    Ok(RateSettings {
        redis,
        enabled: r.enabled,
        default: Limit {
            rate: f64::from(r.requests_per_second.max(1)),
            burst: r.burst_size.max(1),
        },
        burst: r.burst_size.max(1),
        per_tool,
    })
}

fn validate_redis(
    r: &schema::RateLimitSection,
) -> Result<crate::ratelimit::redis::RedisSettings, ConfigError> {
    let Some(url) = &r.redis_url else {
        return Err(invalid(
            "rate_limit.redis_url",
            "is required when rate_limit.backend is \"redis\"",
        ));
    };
    // The message never repeats the URL: it may hold a password.
    let url = crate::ratelimit::resp::RedisUrl::parse(url)
        .map_err(|why| invalid("rate_limit.redis_url", &why))?;
    if !(1..=10_000).contains(&r.redis_replicas) {
        return Err(invalid("rate_limit.redis_replicas", "must be 1–10000"));
    }
    if !(1..=10_000).contains(&r.redis_lease_timeout_ms) {
        return Err(invalid(
            "rate_limit.redis_lease_timeout_ms",
            "must be 1–10000 (milliseconds)",
        ));
    }
    let ca = match &r.redis_ca_file {
        None => None,
        Some(_) if !url.tls => {
            return Err(invalid(
                "rate_limit.redis_ca_file",
                "applies to rediss:// (TLS) URLs only; rate_limit.redis_url is redis://",
            ));
        }
        Some(path) => Some(
            crate::ratelimit::resp::read_ca_file(Path::new(path))
                .map_err(|why| invalid("rate_limit.redis_ca_file", why))?,
        ),
    };
    Ok(crate::ratelimit::redis::RedisSettings {
        ca,
        url,
        failure: r.redis_failure,
        replicas: r.redis_replicas,
        lease_timeout: Duration::from_millis(r.redis_lease_timeout_ms),
    })
}

/// Exact tool names the config mentions get their own `tool` metric label.
fn tool_labels(file: &FileConfig) -> HashMap<String, usize> {
    let mut names: Vec<&str> = file
        .rate_limit
        .per_tool
        .keys()
        .map(String::as_str)
        .collect();
    for k in &file.auth.api_keys {
        names.extend(
            k.allowed_tools
                .iter()
                .chain(&k.denied_tools)
                .map(String::as_str),
        );
    }
    names
        .into_iter()
        .filter(|n| !n.contains(['*', '?']))
        .filter_map(|n| crate::observe::metrics::tool_label_slot(n).map(|i| (n.to_string(), i)))
        .collect()
}

/// The keys `[upstream]` and each `[[upstream.servers]]` share, whichever they came from.
struct UpstreamKeys<'a> {
    /// Where they stand in the file (`upstream`, `upstream.servers[2]`), for messages.
    key: String,
    transport: TransportKind,
    command: Option<&'a String>,
    args: &'a [String],
    env: &'a std::collections::BTreeMap<String, String>,
    cwd: Option<&'a String>,
    session_mode: schema::SessionMode,
    max_processes: Option<usize>,
    /// `server.session_idle_secs`.
    session_idle_secs: u64,
    url: Option<&'a String>,
    urls: &'a [String],
    load_balance: schema::LoadBalance,
    headers: &'a std::collections::BTreeMap<String, String>,
    timeout_secs: u64,
}

fn validate_upstream(u: &UpstreamKeys<'_>) -> Result<UpstreamSettings, ConfigError> {
    let key = |name: &str| format!("{}.{name}", u.key);
    let timeout = Duration::from_secs(u.timeout_secs);
    if timeout.is_zero() {
        return Err(invalid(&key("timeout_secs"), "must be at least 1"));
    }
    check_secs(&key("timeout_secs"), u.timeout_secs)?;
    let transport = match u.transport {
        TransportKind::Stdio => {
            let Some(command) = u.command.filter(|c| !c.trim().is_empty()).cloned() else {
                return Err(invalid(
                    &key("command"),
                    "required for transport = \"stdio\" (the program to run)",
                ));
            };
            let per_session = per_session(u)?;
            Transport::Stdio(StdioSettings {
                command,
                args: u.args.to_vec(),
                env: u.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                cwd: u.cwd.cloned(),
                per_session,
            })
        }
        TransportKind::Http => Transport::Http(validate_http(u, &key("headers"))?),
        TransportKind::Sse => {
            if !u.urls.is_empty() {
                return Err(invalid(
                    &key("urls"),
                    "replicas of a legacy SSE server are not balanced by this build; give its \
                     stream's URL as url",
                ));
            }
            let mut http = validate_http(u, &key("headers"))?;
            Transport::Sse(SseSettings {
                endpoint: http.endpoints.remove(0),
                headers: http.headers,
                per_session: per_session(u)?,
            })
        }
    };
    Ok(UpstreamSettings { transport, timeout })
}

/// `session_mode`'s limits (stdio and SSE upstreams).
fn per_session(u: &UpstreamKeys<'_>) -> Result<Option<PerSession>, ConfigError> {
    Ok(match u.session_mode {
        schema::SessionMode::Shared => None,
        schema::SessionMode::PerSession => {
            let max_processes = u.max_processes.unwrap_or(DEFAULT_MAX_PROCESSES);
            if !(1..=MAX_PROCESSES).contains(&max_processes) {
                return Err(invalid(
                    &format!("{}.max_processes", u.key),
                    format!("must be 1..={MAX_PROCESSES}"),
                ));
            }
            Some(PerSession {
                max_processes,
                idle: Duration::from_secs(u.session_idle_secs),
            })
        }
    })
}

/// The endpoints of an HTTP upstream: `url`, or each replica of `urls` (not both), every one
/// parsed and resolved, no two the same.
fn validate_http(u: &UpstreamKeys<'_>, headers_key: &str) -> Result<HttpUpstream, ConfigError> {
    let key = |name: &str| format!("{}.{name}", u.key);
    let (list, balance): (Vec<(String, &String)>, _) = match (u.url, u.urls) {
        (Some(_), [_, ..]) => {
            return Err(invalid(
                &key("urls"),
                "set either url (one server) or urls (replicas), not both",
            ));
        }
        (Some(url), []) => (vec![(key("url"), url)], None),
        (None, []) => {
            return Err(invalid(
                &key("url"),
                "required for transport = \"http\" (the server's endpoint), or urls for replicas",
            ));
        }
        (None, urls) if urls.len() > MAX_REPLICAS => {
            return Err(invalid(
                &key("urls"),
                format!("{} replicas; at most {MAX_REPLICAS}", urls.len()),
            ));
        }
        (None, urls) => (
            urls.iter()
                .enumerate()
                .map(|(i, url)| (format!("{}[{i}]", key("urls")), url))
                .collect(),
            Some(u.load_balance),
        ),
    };
    let mut endpoints: Vec<HttpEndpoint> = Vec::with_capacity(list.len());
    for (url_key, url) in &list {
        let e = parse_endpoint(url_key, url, headers_key)?;
        // A session is pinned to its replica by the URL shown: two replicas with one URL
        // would be one replica to the pin.
        if let Some(i) = endpoints.iter().position(|o| o.url == e.url) {
            return Err(invalid(
                url_key,
                format!("`{}` is already {}[{i}]", e.url, key("urls")),
            ));
        }
        endpoints.push(e);
    }
    Ok(HttpUpstream {
        endpoints,
        balance,
        headers: parse_upstream_headers(headers_key, u.headers)?,
        stable_epochs: false,
    })
}

/// The default upstream (when configured) and every routed server, as routes: each with the
/// paths it answers, checked for collisions.
/// The legacy transport's paths (`sse_path`, `<sse_path>/<server>`, and `/messages`) are
/// matched before any route: a route endpoint or prefix at or under one of them would never
/// be reached, so it is refused rather than silently shadowed.
fn check_legacy_paths(sse_path: &str, routes: &[Route]) -> Result<(), ConfigError> {
    let messages = crate::mcp::legacy::MESSAGES_PATH;
    if !is_normal_path(sse_path) || sse_path == "/" {
        return Err(invalid(
            "server.sse_path",
            format!("`{sse_path}` must be an absolute path in normal form, other than `/`"),
        ));
    }
    let under = |path: &str, base: &str| {
        path == base || path.strip_prefix(base).is_some_and(|r| r.starts_with('/'))
    };
    if under(sse_path, messages) || under(messages, sse_path) {
        return Err(invalid(
            "server.sse_path",
            format!("`{sse_path}` overlaps `{messages}`, where legacy SSE clients post"),
        ));
    }
    for r in routes {
        for (what, base) in std::iter::once(("endpoint", r.endpoint.as_str()))
            .chain(r.prefix.as_deref().map(|p| ("path_prefix", p)))
        {
            // A route that forwards sub-paths and sits above a legacy path would lose them.
            let shadowed = r.strip_prefix && (under(sse_path, base) || under(messages, base));
            if under(base, sse_path) || under(base, messages) || shadowed {
                let key = match what {
                    "endpoint" if &*r.name == DEFAULT_ROUTE => "server.mcp_path".to_string(),
                    "endpoint" => format!("{}.name", r.key),
                    _ => format!("{}.{what}", r.key),
                };
                return Err(invalid(
                    &key,
                    format!(
                        "its {what} `{base}` overlaps the legacy SSE paths (`{sse_path}`, \
                         `{messages}`), which are matched first; move one of them"
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn validate_routes(file: &FileConfig, mcp_path: &str) -> Result<Vec<Route>, ConfigError> {
    let u = &file.upstream;
    let servers = &u.servers;
    let mut routes = Vec::with_capacity(servers.len() + 1);
    // With routed servers, `[upstream]` is a default only when it names something to reach.
    let has_default =
        servers.is_empty() || u.command.is_some() || u.url.is_some() || !u.urls.is_empty();
    if has_default {
        let upstream = validate_upstream(&UpstreamKeys {
            key: "upstream".into(),
            transport: u.transport,
            command: u.command.as_ref(),
            args: &u.args,
            env: &u.env,
            cwd: u.cwd.as_ref(),
            session_mode: u.session_mode,
            max_processes: u.max_processes,
            session_idle_secs: file.server.session_idle_secs,
            url: u.url.as_ref(),
            urls: &u.urls,
            load_balance: u.load_balance,
            headers: &u.headers,
            timeout_secs: u.timeout_secs,
        })?;
        routes.push(Route {
            name: DEFAULT_ROUTE.into(),
            key: "upstream".into(),
            endpoint: mcp_path.to_string(),
            prefix: None,
            strip_prefix: false,
            upstream,
        });
    }
    for (i, s) in servers.iter().enumerate() {
        let key = format!("upstream.servers[{i}]");
        let name = s.name.as_str();
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !name_ok {
            return Err(invalid(
                &format!("{key}.name"),
                format!("`{name}` must be 1-64 characters of A-Z a-z 0-9 _ -"),
            ));
        }
        if name == DEFAULT_ROUTE {
            return Err(invalid(
                &format!("{key}.name"),
                "`default` names the [upstream] at server.mcp_path; choose another name",
            ));
        }
        if let Some(other) = routes.iter().find(|r| &*r.name == name) {
            return Err(invalid(
                &format!("{key}.name"),
                format!("`{name}` is already the name of {}", other.key),
            ));
        }
        let prefix = match &s.path_prefix {
            None => None,
            Some(p) => {
                if !is_normal_path(p) || p == "/" {
                    return Err(invalid(
                        &format!("{key}.path_prefix"),
                        format!(
                            "`{p}` must be an absolute path in normal form (no `//`, `.` or `..` \
                             segments, `%`, `\\` or trailing `/`), other than `/`"
                        ),
                    ));
                }
                Some(p.clone())
            }
        };
        let upstream = validate_upstream(&UpstreamKeys {
            key: key.clone(),
            transport: s.transport,
            command: s.command.as_ref(),
            args: &s.args,
            env: &s.env,
            cwd: s.cwd.as_ref(),
            session_mode: s.session_mode,
            max_processes: s.max_processes,
            session_idle_secs: file.server.session_idle_secs,
            url: s.url.as_ref(),
            urls: &s.urls,
            load_balance: s.load_balance,
            headers: &s.headers,
            timeout_secs: s.timeout_secs.unwrap_or(u.timeout_secs),
        })?;
        routes.push(Route {
            name: name.into(),
            key,
            endpoint: format!("{}/{name}", mcp_path.trim_end_matches('/')),
            prefix,
            strip_prefix: s.strip_prefix,
            upstream,
        });
    }
    // Every path a route answers is its own: two routes on one path would make a session's
    // server depend on configuration order.
    let mut taken: HashMap<&str, &str> = HashMap::new();
    for r in &routes {
        for path in std::iter::once(r.endpoint.as_str()).chain(r.prefix.as_deref()) {
            // The key that put this path here.
            let key = if path != r.endpoint {
                format!("{}.path_prefix", r.key)
            } else if &*r.name == DEFAULT_ROUTE {
                "server.mcp_path".to_string()
            } else {
                format!("{}.name", r.key)
            };
            let reserved = matches!(path, "/health" | "/live" | "/ready" | "/routes");
            if reserved {
                return Err(invalid(
                    &key,
                    format!("`{path}` is one of the gateway's own paths"),
                ));
            }
            if let Some(other) = taken.insert(path, &r.key) {
                return Err(invalid(
                    &key,
                    format!("`{path}` is already served by {other}"),
                ));
            }
        }
    }
    Ok(routes)
}

/// Longest a duration may be: far beyond any sensible setting, and far from where adding it to
/// the clock would overflow.
const MAX_SECS: u64 = 365 * 24 * 3600;

fn check_secs(key: &str, secs: u64) -> Result<(), ConfigError> {
    if secs > MAX_SECS {
        return Err(invalid(
            key,
            format!("{secs} s is more than a year ({MAX_SECS} s), the most accepted"),
        ));
    }
    Ok(())
}

/// What the names in a policy list must look like.
#[derive(Clone, Copy)]
enum Names {
    /// Tool names under `strict_tool_names`: the MCP character set, plus `*` and `?`.
    Tools,
    /// Anything printable.
    Any,
}

const NEVER_A_TOOL: &str = "can never match a tool name: tool names are 1-128 characters of \
                            A-Z a-z 0-9 _ - . (with `*` and `?` as globs in lists)";

/// An entry that can never match is refused, not ignored: a deny rule that silently matches
/// nothing (`"sleep "`) is a hole.
fn check_patterns(key: &str, entries: &[String], names: Names) -> Result<(), ConfigError> {
    for (i, e) in entries.iter().enumerate() {
        check_pattern(&format!("{key}[{i}]"), e, names)?;
    }
    Ok(())
}

fn check_pattern(key: &str, e: &str, names: Names) -> Result<(), ConfigError> {
    if e.trim().is_empty() {
        return Err(invalid(key, "is empty, and matches nothing"));
    }
    if e.chars().any(char::is_control) {
        return Err(invalid(
            key,
            "holds control characters, and matches nothing",
        ));
    }
    if let Names::Tools = names {
        let fits = e.len() <= 128
            && e.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'*' | b'?')
            });
        if !fits {
            return Err(invalid(key, format!("`{e}` {NEVER_A_TOOL}")));
        }
    }
    Ok(())
}

/// The tool rule of one server (`None`: a server no `server/tool` entry names): the plain
/// entries, plus the entries qualified with that server. An identity with an allow list allows
/// nothing on a server where none of its allow entries applies.
fn tool_rule(
    allowed: &[String],
    denied: &[String],
    server: Option<&str>,
    routes: &[Route],
) -> Rule {
    let names: Vec<Arc<str>> = routes.iter().map(|r| r.name.clone()).collect();
    tool_rule_for(allowed, denied, server, &names)
}

/// `[auth.mtls]`: where certificates come from (our handshake, trusted terminators), which
/// field names the caller, and what certificate identities may do.
fn validate_mtls(
    file: &FileConfig,
    m: &schema::MtlsSection,
    routes: &[Route],
) -> Result<crate::auth::mtls::MtlsProvider, ConfigError> {
    let verifies_here = file
        .server
        .tls
        .as_ref()
        .is_some_and(|t| t.client_ca_path.is_some());
    if !verifies_here && m.trusted_proxy_ips.is_empty() {
        return Err(invalid(
            "auth.mtls.enabled",
            "no client certificate can reach the gateway: set server.tls.client_ca_path (verify \
             certificates here) or auth.mtls.trusted_proxy_ips (a TLS terminator in front passes \
             them on as X-Client-Cert-* headers)",
        ));
    }
    let trusted_proxies = m
        .trusted_proxy_ips
        .iter()
        .enumerate()
        .map(|(i, ip)| {
            crate::auth::mtls::IpNet::parse(ip)
                .map_err(|e| invalid(&format!("auth.mtls.trusted_proxy_ips[{i}]"), e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if m.rate_limit == Some(0) {
        return Err(invalid("auth.mtls.rate_limit", "must be at least 1"));
    }
    let tool_names = if file.server.strict_tool_names {
        Names::Tools
    } else {
        Names::Any
    };
    check_tool_patterns(
        "auth.mtls.allowed_tools",
        &m.allowed_tools,
        tool_names,
        routes,
    )?;
    let mut policy = Policy {
        tools: tool_rule(&m.allowed_tools, &[], None, routes),
        rate_limit: m.rate_limit,
        ..Policy::default()
    };
    // As for an API key: a server named by a `server/tool` entry gets a policy of its own.
    let named: std::collections::BTreeSet<&str> = m
        .allowed_tools
        .iter()
        .filter_map(|e| e.split_once('/').map(|(s, _)| s))
        .filter(|s| routes.iter().any(|r| &*r.name == *s))
        .collect();
    for server in named {
        let on_server = Policy {
            tools: tool_rule(&m.allowed_tools, &[], Some(server), routes),
            per_server: HashMap::new(),
            ..policy.clone()
        };
        policy.per_server.insert(server.into(), Arc::new(on_server));
    }
    Ok(crate::auth::mtls::MtlsProvider {
        source: m.identity_source,
        policy: Arc::new(policy),
        trusted_proxies,
    })
}

/// `[auth.jwt]`: the rules a token must meet, where its keys come from, and the scope mapping.
fn validate_jwt(
    file: &FileConfig,
    j: &schema::JwtSection,
    routes: &[Route],
) -> Result<crate::auth::JwtProvider, ConfigError> {
    use crate::auth::jwt::{self, Algorithm};
    let k = |name: &str| format!("auth.jwt.{name}");
    let defaults: &[&str] = match j.mode {
        schema::JwtMode::Simple => &["HS256"],
        schema::JwtMode::Jwks => &["RS256", "ES256"],
    };
    let names: Vec<&str> = if j.algorithms.is_empty() {
        defaults.to_vec()
    } else {
        j.algorithms.iter().map(String::as_str).collect()
    };
    let mut algorithms = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let alg = Algorithm::from_name(name).ok_or_else(|| {
            invalid(
                &format!("{}[{i}]", k("algorithms")),
                format!(
                    "`{name}` is not an accepted algorithm (HS256, RS256, RS384, RS512, PS256, \
                     PS384, PS512, ES256, ES384, EdDSA; never `none`)"
                ),
            )
        })?;
        // A secret and public keys never share a configuration: HS256 beside a JWKS is the
        // shape of the key-confusion attack.
        let hmac = alg == Algorithm::HS256;
        if hmac != (j.mode == schema::JwtMode::Simple) {
            return Err(invalid(
                &format!("{}[{i}]", k("algorithms")),
                match j.mode {
                    schema::JwtMode::Simple => format!("`{name}` needs a JWKS; mode = \"simple\" is HS256 only"),
                    schema::JwtMode::Jwks => "HS256 needs a shared secret; mode = \"jwks\" verifies public-key signatures only".to_string(),
                },
            ));
        }
        algorithms.push(alg);
    }
    let keys = match j.mode {
        schema::JwtMode::Simple => {
            let secret = j
                .secret
                .as_deref()
                .ok_or_else(|| invalid(&k("secret"), "required for mode = \"simple\""))?;
            crate::auth::JwtKeys::Secret(
                jwt::hmac_key(secret.as_bytes()).map_err(|e| invalid(&k("secret"), e))?,
            )
        }
        schema::JwtMode::Jwks => {
            let url = j
                .jwks_url
                .as_deref()
                .ok_or_else(|| invalid(&k("jwks_url"), "required for mode = \"jwks\""))?;
            let url =
                crate::auth::fetch::IdpUrl::parse(url).map_err(|e| invalid(&k("jwks_url"), e))?;
            let every = j.cache_duration_secs.unwrap_or(3600);
            if every < 10 {
                return Err(invalid(&k("cache_duration_secs"), "must be at least 10"));
            }
            check_secs(&k("cache_duration_secs"), every)?;
            crate::auth::JwtKeys::Jwks(crate::auth::jwks::Jwks::new(
                url,
                Duration::from_secs(every),
            ))
        }
    };
    let claim =
        |name: &str, value: &Option<String>, default: &str| -> Result<String, ConfigError> {
            let v = value.clone().unwrap_or_else(|| default.to_string());
            if v.is_empty() || v.len() > 256 {
                return Err(invalid(&k(name), "must be 1-256 characters"));
            }
            Ok(v)
        };
    let leeway_secs = j.leeway_secs.unwrap_or(60);
    if leeway_secs > 600 {
        return Err(invalid(
            &k("leeway_secs"),
            "at most 600 (ten minutes of clock skew)",
        ));
    }
    let names = if file.server.strict_tool_names {
        Names::Tools
    } else {
        Names::Any
    };
    for (scope, tools) in &j.scope_tool_mapping {
        check_tool_patterns(
            &format!("{}.{scope:?}", k("scope_tool_mapping")),
            tools,
            names,
            routes,
        )?;
    }
    Ok(crate::auth::JwtProvider {
        rules: jwt::Rules {
            algorithms,
            issuer: j.issuer.clone(),
            audience: j.audience.clone(),
            leeway_secs,
            user_id_claim: claim("user_id_claim", &j.user_id_claim, "sub")?,
            scopes_claim: claim("scopes_claim", &j.scopes_claim, "scope")?,
            max_token_bytes: jwt::DEFAULT_MAX_TOKEN_BYTES,
        },
        keys,
        scope_tools: (!j.scope_tool_mapping.is_empty()).then(|| j.scope_tool_mapping.clone()),
        routes: routes.iter().map(|r| r.name.clone()).collect(),
        generation: provider_generation(j, file, routes),
    })
}

/// `server.public_url` as OAuth metadata needs it: `https://host[:port]` (or `http://` to a
/// loopback host), without path, query, fragment or user; returned without a trailing slash.
/// It is written into headers and metadata, so nothing else may appear in it.
fn public_url(url: &str) -> Result<String, String> {
    let url = url.strip_suffix('/').unwrap_or(url);
    let parsed = crate::auth::fetch::IdpUrl::parse(url).map_err(|_| {
        format!(
            "`{}` must be https://host[:port] (http only to a loopback address)",
            shown_url(url)
        )
    })?;
    let authority = url.split_once("://").map_or("", |(_, a)| a);
    if parsed.target != "/"
        || !authority
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
    {
        return Err(format!(
            "`{}` must be scheme://host[:port] with no path, query or fragment (OAuth metadata \
             puts each endpoint's path after it)",
            shown_url(url)
        ));
    }
    Ok(url.to_ascii_lowercase())
}

/// An RFC 6749 scope token: visible ASCII without `"` or `\` (it is quoted in headers).
fn is_scope_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b'"' && b != b'\\')
}

/// `[auth.oauth]`: discovery metadata, and the facade when mcp-guard is the authorization
/// server (provider github or google; okta or custom without `authorization_servers`).
fn validate_oauth(
    file: &FileConfig,
    o: &schema::OauthSection,
    routes: &[Route],
) -> Result<crate::facade::Oauth, ConfigError> {
    use crate::auth::fetch::IdpUrl;
    use crate::facade::idp;
    use schema::OauthProvider;
    let k = |name: &str| format!("auth.oauth.{name}");
    let base = file
        .server
        .public_url
        .as_deref()
        .ok_or_else(|| {
            invalid(
                "server.public_url",
                "required with [auth.oauth]: clients are told the resource and metadata URLs from it",
            )
        })
        .and_then(|u| public_url(u).map_err(|e| invalid("server.public_url", e)))?;
    // Every MCP endpoint has metadata of its own; longest first, so a path finds its own.
    let mut resource_paths: Vec<String> = Vec::new();
    // Which server each of those paths reaches (a token for one reaches that server only).
    let mut resource_routes: Vec<(String, Arc<str>)> = Vec::new();
    let sse = &file.server.sse_path;
    for r in routes {
        let legacy = if &*r.name == DEFAULT_ROUTE {
            sse.clone()
        } else {
            format!("{sse}/{}", r.name)
        };
        for p in std::iter::once(&r.endpoint)
            .chain(r.prefix.as_ref())
            .chain(std::iter::once(&legacy))
        {
            resource_paths.push(p.clone());
            resource_routes.push((p.clone(), r.name.clone()));
        }
    }
    resource_paths.retain(|p| p != "/");
    resource_paths.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
    resource_paths.dedup();
    // Discovery and the facade answer before any route: a route there would never be reached.
    if let Some(p) = resource_paths.iter().find(|p| {
        p.starts_with("/.well-known/")
            || *p == "/.well-known"
            || *p == "/oauth"
            || p.starts_with("/oauth/")
    }) {
        return Err(invalid(
            "auth.oauth",
            format!(
                "the MCP endpoint `{p}` is under /.well-known or /oauth, which OAuth discovery and the authorization server answer"
            ),
        ));
    }
    for (i, s) in o.scopes.iter().enumerate() {
        if !is_scope_token(s) {
            return Err(invalid(
                &format!("{}[{i}]", k("scopes")),
                "a scope is 1-128 visible characters without spaces, quotes or backslashes",
            ));
        }
    }
    let names = if file.server.strict_tool_names {
        Names::Tools
    } else {
        Names::Any
    };
    for (scope, tools) in &o.scope_tool_mapping {
        if !is_scope_token(scope) {
            return Err(invalid(
                &format!("{}.{scope:?}", k("scope_tool_mapping")),
                "a scope is 1-128 visible characters without spaces, quotes or backslashes",
            ));
        }
        check_tool_patterns(
            &format!("{}.{scope:?}", k("scope_tool_mapping")),
            tools,
            names,
            routes,
        )?;
    }
    for (key, url) in [("introspection_url", &o.introspection_url)] {
        if let Some(u) = url {
            IdpUrl::parse(u).map_err(|e| invalid(&k(key), e))?;
        }
    }
    let facade = match o.provider {
        OauthProvider::Github | OauthProvider::Google => {
            if !o.authorization_servers.is_empty() {
                return Err(invalid(
                    &k("authorization_servers"),
                    "must be empty for provider github or google: they cannot serve MCP \
                     clients (no client registration, no resource-bound tokens), so mcp-guard \
                     is the authorization server",
                ));
            }
            true
        }
        OauthProvider::Okta | OauthProvider::Custom => o.authorization_servers.is_empty(),
    };
    if !facade {
        for (i, a) in o.authorization_servers.iter().enumerate() {
            let key = format!("{}[{i}]", k("authorization_servers"));
            IdpUrl::parse(a).map_err(|e| invalid(&key, e))?;
            if a.contains(['"', '?', '#']) {
                return Err(invalid(&key, "an issuer URL has no query or fragment"));
            }
        }
        return Ok(crate::facade::Oauth {
            public_url: base,
            resource_paths,
            resource_routes,
            authorization_servers: o.authorization_servers.clone(),
            scopes: o.scopes.clone(),
            server: None,
        });
    }
    let defaults = idp::defaults(o.provider);
    if o.client_id.trim().is_empty() || o.client_id.len() > 512 {
        return Err(invalid(&k("client_id"), "must be 1-512 characters"));
    }
    if matches!(o.provider, OauthProvider::Github | OauthProvider::Google)
        && o.client_secret.as_deref().is_none_or(str::is_empty)
    {
        return Err(invalid(
            &k("client_secret"),
            "required for provider github or google (their token endpoints need it)",
        ));
    }
    let url = |key: &str, set: &Option<String>, default: Option<&str>| {
        let u = set.as_deref().or(default).ok_or_else(|| {
            invalid(
                &k(key),
                "required for provider okta or custom when mcp-guard is the authorization server",
            )
        })?;
        IdpUrl::parse(u).map_err(|e| invalid(&k(key), e))
    };
    let authorization_url = url(
        "authorization_url",
        &o.authorization_url,
        defaults.authorization_url,
    )?;
    if authorization_url.target.contains('#') {
        return Err(invalid(&k("authorization_url"), "must not have a fragment"));
    }
    let token_url = url("token_url", &o.token_url, defaults.token_url)?;
    let userinfo_url = url("userinfo_url", &o.userinfo_url, defaults.userinfo_url)?;
    let redirect_uri = o
        .redirect_uri
        .clone()
        .unwrap_or_else(|| format!("{base}{}", crate::facade::DEFAULT_CALLBACK));
    let callback_path = redirect_uri
        .strip_prefix(base.as_str())
        .filter(|p| is_normal_path(p) && p.len() > 1 && !p.contains(['?', '#']))
        .ok_or_else(|| {
            invalid(
                &k("redirect_uri"),
                format!(
                    "must be server.public_url followed by a path (`{base}{}` by default): the \
                     identity provider sends the browser back to mcp-guard there",
                    crate::facade::DEFAULT_CALLBACK
                ),
            )
        })?
        .to_string();
    let taken = [
        crate::facade::AUTHORIZE_PATH,
        crate::facade::TOKEN_PATH,
        crate::facade::REGISTER_PATH,
    ];
    if taken.contains(&callback_path.as_str())
        || callback_path.starts_with("/.well-known/")
        || resource_paths
            .iter()
            .any(|r| callback_path == *r || callback_path.starts_with(&format!("{r}/")))
    {
        return Err(invalid(
            &k("redirect_uri"),
            format!("path `{callback_path}` is already an endpoint of the gateway"),
        ));
    }
    let idp_scopes: Vec<String> = if o.scopes.is_empty() {
        defaults.scopes.iter().map(|s| s.to_string()).collect()
    } else {
        o.scopes.clone()
    };
    let user_id_claim = o
        .user_id_claim
        .clone()
        .unwrap_or_else(|| defaults.user_id_claim.to_string());
    if user_id_claim.is_empty() || user_id_claim.len() > 256 {
        return Err(invalid(&k("user_id_claim"), "must be 1-256 characters"));
    }
    let shared = crate::facade::Shared::new();
    let tokens = crate::auth::JwtProvider {
        rules: crate::auth::jwt::Rules {
            algorithms: vec![crate::auth::jwt::Algorithm::HS256],
            issuer: Some(base.clone()),
            ..crate::auth::jwt::Rules::default()
        },
        keys: crate::auth::JwtKeys::Secret(shared.key_set()),
        scope_tools: (!o.scope_tool_mapping.is_empty()).then(|| o.scope_tool_mapping.clone()),
        routes: routes.iter().map(|r| r.name.clone()).collect(),
        generation: u64::from_be_bytes(crate::mcp::session::random_bytes::<8>()),
    };
    let calls = idp::Calls::new(idp::IdpClient {
        client_id: o.client_id.clone(),
        client_secret: o.client_secret.clone(),
        authorization_url: authorization_url.url,
        token_url,
        userinfo_url,
        redirect_uri,
        scopes: idp_scopes,
        user_id_claim,
    });
    Ok(crate::facade::Oauth {
        authorization_servers: vec![base.clone()],
        public_url: base,
        resource_paths,
        resource_routes,
        // What this authorization server grants: the scopes the mapping knows.
        scopes: o.scope_tool_mapping.keys().cloned().collect(),
        server: Some(crate::facade::AuthServer {
            callback_path,
            calls: Arc::new(calls),
            shared,
            tokens,
        }),
    })
}

/// `[auth.oauth]`, the resource-server side: how access tokens of the authorization server
/// are checked (introspection when `introspection_url` is set, else JWTs against the keys
/// its metadata names), the resource URI of each endpoint (`server.public_url` + endpoint),
/// and the scope mapping.
fn validate_oauth_tokens(
    file: &FileConfig,
    o: &schema::OauthSection,
    routes: &[Route],
) -> Result<crate::auth::oauth::OauthProvider, ConfigError> {
    use crate::auth::fetch::IdpUrl;
    use crate::auth::{jwt, oauth};
    let k = |name: &str| format!("auth.oauth.{name}");
    let public_url = file.server.public_url.as_deref().ok_or_else(|| {
        invalid(
            "server.public_url",
            "required with [auth.oauth]: tokens must be minted for this gateway's URL (their audience)",
        )
    })?;
    check_public_url(public_url)?;
    let public_url = public_url.trim_end_matches('/').to_string();
    if o.client_id.trim().is_empty() {
        return Err(invalid(&k("client_id"), "must not be empty"));
    }
    for (i, url) in o.authorization_servers.iter().enumerate() {
        IdpUrl::parse(url)
            .map_err(|e| invalid(&format!("{}[{i}]", k("authorization_servers")), e))?;
    }
    let user_id_claim = o.user_id_claim.clone().unwrap_or_else(|| "sub".into());
    if user_id_claim.is_empty() || user_id_claim.len() > 256 {
        return Err(invalid(&k("user_id_claim"), "must be 1-256 characters"));
    }
    // The authorization server whose tokens are accepted: the first advertised, or the
    // provider's own.
    let issuer = o
        .authorization_servers
        .first()
        .cloned()
        .or(match o.provider {
            schema::OauthProvider::Github => Some("https://github.com".to_string()),
            schema::OauthProvider::Google => Some("https://accounts.google.com".to_string()),
            _ => None,
        });
    let validation = if let Some(url) = &o.introspection_url {
        let url = IdpUrl::parse(url).map_err(|e| invalid(&k("introspection_url"), e))?;
        let secret = o
            .client_secret
            .as_deref()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                invalid(
                    &k("client_secret"),
                    "required with introspection_url (RFC 7662 calls are client-authenticated)",
                )
            })?;
        oauth::Validation::Introspection(Arc::new(crate::auth::introspect::Introspector::new(
            url,
            &o.client_id,
            secret,
            &user_id_claim,
        )))
    } else {
        match o.provider {
            // Their access tokens are opaque, carry no audience and have no RFC 7662
            // endpoint: a resource server cannot check them (the authorization-server facade
            // can, and issues tokens of its own).
            schema::OauthProvider::Github | schema::OauthProvider::Google => {
                oauth::Validation::None
            }
            schema::OauthProvider::Okta | schema::OauthProvider::Custom => {
                let issuer = issuer.as_deref().ok_or_else(|| {
                    invalid(
                        &k("authorization_servers"),
                        "needs the authorization server's issuer URL (its keys are found through its metadata), or set introspection_url",
                    )
                })?;
                let base =
                    IdpUrl::parse(issuer).map_err(|e| invalid(&k("authorization_servers"), e))?;
                oauth::Validation::Jwt {
                    rules: jwt::Rules {
                        // Public-key signatures only: the server's keys are public.
                        algorithms: jwt::Algorithm::ALL
                            .into_iter()
                            .filter(|a| *a != jwt::Algorithm::HS256)
                            .collect(),
                        issuer: Some(issuer.to_string()),
                        // Checked against the endpoint's resource URI (`OauthProvider`).
                        audience: None,
                        leeway_secs: 60,
                        user_id_claim: user_id_claim.clone(),
                        // Okta's access tokens carry their scopes in `scp`.
                        scopes_claim: if o.provider == schema::OauthProvider::Okta {
                            "scp".into()
                        } else {
                            "scope".into()
                        },
                        max_token_bytes: jwt::DEFAULT_MAX_TOKEN_BYTES,
                    },
                    keys: crate::auth::jwks::Jwks::discovered(base, Duration::from_secs(3600)),
                }
            }
        }
    };
    let names = if file.server.strict_tool_names {
        Names::Tools
    } else {
        Names::Any
    };
    for (scope, tools) in &o.scope_tool_mapping {
        let key = format!("{}.{scope:?}", k("scope_tool_mapping"));
        // RFC 6749 §3.3 scope tokens: what a token can carry and a challenge can name.
        if scope.is_empty()
            || !scope
                .bytes()
                .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
        {
            return Err(invalid(
                &key,
                "a scope is printable ASCII without spaces, `\"` or `\\` (RFC 6749 §3.3)",
            ));
        }
        check_tool_patterns(&key, tools, names, routes)?;
    }
    let mut resources = Vec::new();
    for r in routes {
        for path in std::iter::once(&r.endpoint).chain(r.prefix.as_ref()) {
            // It becomes a resource URI, and part of the metadata URL in challenges.
            if !path
                .bytes()
                .all(|b| (0x21..=0x7e).contains(&b) && b != b'"' && b != b'\\')
            {
                let key = if r.prefix.as_ref() == Some(path) {
                    format!("{}.path_prefix", r.key)
                } else if &*r.name == DEFAULT_ROUTE {
                    "server.mcp_path".to_string()
                } else {
                    format!("{}.name", r.key)
                };
                return Err(invalid(
                    &key,
                    format!(
                        "with [auth.oauth] the path `{}` is part of a resource URI and may hold only printable ASCII without `\"` or `\\`",
                        path.escape_debug()
                    ),
                ));
            }
            resources.push((
                r.name.clone(),
                oauth::canonical(&format!("{public_url}{path}")),
            ));
        }
    }
    Ok(oauth::OauthProvider {
        validation,
        issuer,
        resources,
        user_id_claim,
        scope_tools: (!o.scope_tool_mapping.is_empty()).then(|| o.scope_tool_mapping.clone()),
        routes: routes.iter().map(|r| r.name.clone()).collect(),
        public_url,
        generation: provider_generation(o, file, routes),
    })
}

/// What a token provider's cached identities depend on, as one number: its section, the
/// public URL and the routes (which shape policies and audiences). A reload that changes none
/// of them keeps the workers' verified tokens (and the streams opened with them); any change
/// makes every token be checked again.
fn provider_generation(section: &impl std::fmt::Debug, file: &FileConfig, routes: &[Route]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    format!("{section:?}").hash(&mut h);
    file.server.public_url.hash(&mut h);
    file.server.strict_tool_names.hash(&mut h);
    for r in routes {
        (&*r.name, &r.endpoint, &r.prefix).hash(&mut h);
    }
    h.finish()
}

/// `server.public_url`: an absolute https URL (http only for a loopback host), no query or
/// fragment, nothing a header parameter would need escaped: it becomes resource URIs and the
/// metadata URL in challenges.
fn check_public_url(url: &str) -> Result<(), ConfigError> {
    let key = "server.public_url";
    let rest = if let Some(r) = url.strip_prefix("https://") {
        r
    } else if let Some(r) = url.strip_prefix("http://") {
        let host = r.split(['/', ':']).next().unwrap_or_default();
        let bracketed = r
            .strip_prefix('[')
            .and_then(|v| v.split(']').next())
            .unwrap_or(host);
        let loopback = host.eq_ignore_ascii_case("localhost")
            || bracketed
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if !loopback {
            return Err(invalid(
                key,
                "must be https (http only for a loopback address)",
            ));
        }
        r
    } else {
        return Err(invalid(key, "must be an absolute https:// URL"));
    };
    if rest.is_empty() || rest.starts_with('/') || rest.contains('@') {
        return Err(invalid(key, "must name a host (and no credentials)"));
    }
    if url.contains(['?', '#']) {
        return Err(invalid(
            key,
            "must have no query or fragment (RFC 8707 resource URIs)",
        ));
    }
    if !url
        .bytes()
        .all(|b| (0x21..=0x7e).contains(&b) && b != b'"' && b != b'\\')
    {
        return Err(invalid(key, "holds characters a URL cannot"));
    }
    Ok(())
}

/// The tool rule of allow and deny entries on `server` (`None`: servers no entry names), where
/// an entry `name/tool` applies to the routed server `name` only.
pub fn tool_rule_for(
    allowed: &[String],
    denied: &[String],
    server: Option<&str>,
    routes: &[Arc<str>],
) -> Rule {
    fn qualified<'e>(e: &'e str, routes: &[Arc<str>]) -> Option<(&'e str, &'e str)> {
        e.split_once('/')
            .filter(|(s, _)| routes.iter().any(|r| &**r == *s))
    }
    let applies = |e: &&String| match qualified(e, routes) {
        None => true,
        Some((s, _)) => Some(s) == server,
    };
    let bare = |e: &String| qualified(e, routes).map_or(e.clone(), |(_, t)| t.to_string());
    let allow: Vec<String> = allowed.iter().filter(applies).map(bare).collect();
    let deny: Vec<String> = denied.iter().filter(applies).map(bare).collect();
    Rule {
        allow: if allow.is_empty() && !allowed.is_empty() {
            Matcher::nothing()
        } else {
            Matcher::new(&allow)
        },
        deny: Matcher::new(&deny),
    }
}

/// Tool entries: a pattern, or `server/pattern` for one routed server (a server that must
/// exist: a misspelt server name would silently apply nowhere).
fn check_tool_patterns(
    key: &str,
    entries: &[String],
    names: Names,
    routes: &[Route],
) -> Result<(), ConfigError> {
    for (i, e) in entries.iter().enumerate() {
        let key = format!("{key}[{i}]");
        let Some((server, tool)) = e.split_once('/') else {
            check_pattern(&key, e, names)?;
            continue;
        };
        if matches!(names, Names::Tools) && tool.contains('/') {
            return Err(invalid(&key, format!("`{e}` {NEVER_A_TOOL}")));
        }
        if !routes.iter().any(|r| &*r.name == server) {
            if let Names::Any = names {
                // Tool names may hold `/` without strict names: a plain pattern then.
                check_pattern(&key, e, names)?;
                continue;
            }
            return Err(invalid(
                &key,
                format!(
                    "`{e}` names server `{server}`, which is not configured (servers: {})",
                    routes
                        .iter()
                        .map(|r| &*r.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        check_pattern(&key, tool, names)?;
    }
    Ok(())
}

/// A browser origin as browsers send it: `scheme://host[:port]`, lower case, the scheme's
/// default port dropped. `null` (sandboxed frames, `file:` pages) and `*` are refused: either
/// would let any page in.
fn normal_origin(o: &str) -> Result<String, String> {
    let lower = o.trim().to_ascii_lowercase();
    if lower == "null" || lower == "*" {
        return Err(format!(
            "`{o}` would admit any page (`null` is sent by sandboxed frames and file: pages); \
             list each origin as scheme://host[:port]"
        ));
    }
    let lower = lower.trim_end_matches('/');
    let (scheme, rest) = lower
        .split_once("://")
        .filter(|(s, _)| matches!(*s, "http" | "https"))
        .ok_or_else(|| format!("`{o}` is not an origin (scheme://host[:port], http or https)"))?;
    if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
        return Err(format!(
            "`{o}` is not an origin: scheme://host[:port], without path, query or user"
        ));
    }
    let default_port = if scheme == "https" { ":443" } else { ":80" };
    Ok(format!(
        "{scheme}://{}",
        rest.strip_suffix(default_port).unwrap_or(rest)
    ))
}

/// A URL as it may appear in a message: without user information or query, which may hold
/// credentials.
fn shown_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let rest = match rest.split_once('/') {
        Some((auth, path)) => format!("{}/{path}", auth.rsplit('@').next().unwrap_or_default()),
        None => rest.rsplit('@').next().unwrap_or_default().to_string(),
    };
    if scheme.is_empty() {
        rest
    } else {
        format!("{scheme}://{rest}")
    }
}

/// An absolute path with nothing to normalise: no empty, `.` or `..` segment, no percent
/// escapes, backslashes or `;` (path parameters: `..;` is `..` to some servers), no trailing
/// slash. Routing compares such paths byte for byte, so a
/// spelling that a server would normalise differently cannot select another route.
pub fn is_normal_path(p: &str) -> bool {
    p.starts_with('/')
        && !p.contains(['%', '\\', ';'])
        && (p == "/"
            || p[1..]
                .split('/')
                .all(|seg| !seg.is_empty() && seg != "." && seg != ".."))
}

fn parse_endpoint(
    url_key: &str,
    url: &str,
    headers_key: &str,
) -> Result<HttpEndpoint, ConfigError> {
    let rest = if let Some(r) = url.strip_prefix("http://") {
        r
    } else if url.starts_with("https://") {
        return Err(invalid(
            url_key,
            "https upstreams are not supported by this build yet",
        ));
    } else {
        return Err(invalid(
            url_key,
            format!("`{}` is not an http:// URL", shown_url(url)),
        ));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.contains('@') {
        // Not echoed: the part before `@` is a credential.
        return Err(invalid(
            url_key,
            format!(
                "carries credentials (user:password@); send them as a header with {headers_key}"
            ),
        ));
    }
    if authority.is_empty() {
        return Err(invalid(
            url_key,
            format!("`{}` has no host", shown_url(url)),
        ));
    }
    let (host, port) = split_host_port(authority, 80)
        .ok_or_else(|| invalid(url_key, format!("bad host:port in `{}`", shown_url(url))))?;
    let addrs: Vec<SocketAddr> = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| invalid(url_key, format!("cannot resolve `{host}`: {e}")))?
        .collect();
    if addrs.is_empty() {
        return Err(invalid(url_key, format!("`{host}` resolves to nothing")));
    }
    Ok(HttpEndpoint {
        url: shown_url(url),
        addrs,
        host_header: authority.to_string(),
        path: path.to_string(),
    })
}

fn parse_upstream_headers(
    headers_key: &str,
    headers: &std::collections::BTreeMap<String, String>,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut out_headers: Vec<(String, String)> = Vec::new();
    for (name, value) in headers {
        let valid_name = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        // Values are visible ASCII, space and tab (and UTF-8 above): no control characters.
        let valid_value = !value.chars().any(|c| c.is_control() && c != '\t');
        if !valid_name || !valid_value {
            return Err(invalid(
                headers_key,
                format!("`{}` is not a valid header", printable(name)),
            ));
        }
        let lower = name.to_ascii_lowercase();
        if GATEWAY_HEADERS.contains(&lower.as_str()) {
            return Err(invalid(
                headers_key,
                format!(
                    "`{name}` is set by the gateway itself (from the client's request or the \
                     transport); configuring it would send it twice"
                ),
            ));
        }
        if let Some((first, _)) = out_headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
        {
            return Err(invalid(
                headers_key,
                format!("`{name}` and `{first}` are the same header"),
            ));
        }
        out_headers.push((name.clone(), value.clone()));
    }
    Ok(out_headers)
}

/// Headers the gateway writes on every upstream request itself, lower case.
const GATEWAY_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "content-type",
    "accept",
    "mcp-session-id",
    "mcp-protocol-version",
    "mcp-method",
    "mcp-name",
    "last-event-id",
    "traceparent",
    "tracestate",
    "user-agent",
    "x-request-id",
];

/// Splits `host[:port]` (with `[v6]` brackets) into host and port.
/// A port as a URL writes it: decimal digits only (`u16::from_str` also takes a leading `+`,
/// which no URL parser reads as a port).
pub(crate) fn parse_port(p: &str) -> Option<u16> {
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    p.parse().ok()
}

pub(crate) fn split_host_port(authority: &str, default_port: u16) -> Option<(String, u16)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => parse_port(p)?,
            None if after.is_empty() => default_port,
            None => return None,
        };
        return Some((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => Some((h.to_string(), parse_port(p)?)),
        None => Some((authority.to_string(), default_port)),
    }
}

fn resolve_one(host: &str, port: u16) -> Result<SocketAddr, String> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve `{host}`: {e}"))?
        .next()
        .ok_or_else(|| format!("`{host}` resolves to nothing"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_is_digits_only() {
        assert_eq!(split_host_port("h:8080", 80), Some(("h".into(), 8080)));
        assert_eq!(split_host_port("h:08080", 80), Some(("h".into(), 8080)));
        assert_eq!(split_host_port("[::1]:9", 80), Some(("::1".into(), 9)));
        assert_eq!(split_host_port("h", 80), Some(("h".into(), 80)));
        // Fuzzing (sse_events): `+8080` parsed as 8080 where a URL parser refuses it.
        for bad in ["h:+8080", "[::1]:+9", "h:", "h: 80", "h:65536", "h:-1"] {
            assert_eq!(split_host_port(bad, 80), None, "{bad}");
        }
    }

    fn settings(text: &str) -> Result<Settings, ConfigError> {
        validate(&parse_str(text, &|_| None)?)
    }

    #[test]
    fn http_upstream_url_is_split_and_resolved() {
        let s = settings("[upstream]\ntransport = \"http\"\nurl = \"http://127.0.0.1:8081/mcp\"\n")
            .unwrap();
        let Transport::Http(h) = s.routes[0].upstream.transport.clone() else {
            panic!("expected http")
        };
        assert_eq!(h.endpoints.len(), 1);
        let e = &h.endpoints[0];
        assert_eq!(e.addrs[0].port(), 8081);
        assert_eq!(e.path, "/mcp");
        assert_eq!(e.host_header, "127.0.0.1:8081");
        assert_eq!(h.balance, None, "a single url is not balanced");
    }

    #[test]
    fn replicas_are_each_parsed_and_never_mixed_with_url() {
        let http = |keys: &str| format!("[upstream]\ntransport = \"http\"\n{keys}\n");
        let s = settings(&http(
            "urls = [\"http://127.0.0.1:1/mcp\", \"http://127.0.0.1:2/x\"]\nload_balance = \"least_outstanding\"",
        ))
        .unwrap();
        let Transport::Http(h) = &s.routes[0].upstream.transport else {
            panic!("expected http")
        };
        let urls: Vec<&str> = h.endpoints.iter().map(|e| e.url.as_str()).collect();
        assert_eq!(urls, ["http://127.0.0.1:1/mcp", "http://127.0.0.1:2/x"]);
        assert_eq!(h.balance, Some(schema::LoadBalance::LeastOutstanding));
        for (keys, expected) in [
            (
                "url = \"http://127.0.0.1:1/mcp\"\nurls = [\"http://127.0.0.1:2/mcp\"]",
                "upstream.urls: set either url (one server) or urls (replicas), not both",
            ),
            (
                "urls = [\"http://127.0.0.1:1/mcp\", \"ftp://x\"]",
                "upstream.urls[1]: `ftp://x` is not an http:// URL",
            ),
            (
                "urls = [\"http://127.0.0.1:1/mcp\", \"http://127.0.0.1:1/mcp?b=1\"]",
                "upstream.urls[1]: `http://127.0.0.1:1/mcp` is already upstream.urls[0]",
            ),
            ("urls = []", "upstream.url: required"),
        ] {
            let err = refusal(&http(keys));
            assert!(err.contains(expected), "{keys}: {err}");
        }
        let many: Vec<String> = (1..=MAX_REPLICAS + 1)
            .map(|p| format!("\"http://127.0.0.1:{p}/mcp\""))
            .collect();
        let err = refusal(&http(&format!("urls = [{}]", many.join(", "))));
        assert!(err.contains("65 replicas; at most 64"), "{err}");
        // In a routed server too.
        let err = refusal(
            "[[upstream.servers]]\nname = \"web\"\ntransport = \"http\"\nurl = \"http://127.0.0.1:1/mcp\"\nurls = [\"http://127.0.0.1:2/mcp\"]\n",
        );
        assert!(
            err.contains("upstream.servers[0].urls: set either"),
            "{err}"
        );
        let w = warnings_of(&http(
            "url = \"http://127.0.0.1:1/mcp\"\nload_balance = \"round_robin\"",
        ));
        assert_eq!(
            w,
            [
                "upstream.load_balance has no effect: it chooses among upstream.urls, which is not set"
            ]
        );
        assert!(
            warnings_of(&http(
                "urls = [\"http://127.0.0.1:1/mcp\"]\nload_balance = \"round_robin\""
            ))
            .is_empty()
        );
    }

    #[test]
    fn tls_and_mtls_mistakes_are_refused_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            format!("{:?}", p.to_str().unwrap())
        };
        let pair = |name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
                .unwrap()
                .self_signed(&key)
                .unwrap();
            (
                file(&format!("{name}.crt"), &cert.pem()),
                file(&format!("{name}.key"), &key.serialize_pem()),
            )
        };
        let (cert, key) = pair("a");
        let (_, other_key) = pair("b");
        let base = "[upstream]\ncommand = \"x\"\n";
        let tls = |extra: &str| {
            format!("{base}[server.tls]\ncert_path = {cert}\nkey_path = {key}\n{extra}")
        };
        settings(&tls("")).unwrap();
        settings(&tls(&format!(
            "client_ca_path = {cert}\nclient_auth = \"optional\"\n"
        )))
        .unwrap();
        let missing = file("empty.pem", "");
        let junk = file(
            "junk.pem",
            "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        );
        for (text, starts) in [
            (
                format!(
                    "{base}[server.tls]\ncert_path = \"/nonexistent/c.pem\"\nkey_path = {key}\n"
                ),
                "server.tls.cert_path: cannot read",
            ),
            (
                format!("{base}[server.tls]\ncert_path = {missing}\nkey_path = {key}\n"),
                "server.tls.cert_path",
            ),
            (
                format!("{base}[server.tls]\ncert_path = {junk}\nkey_path = {key}\n"),
                "server.tls.cert_path",
            ),
            (
                format!("{base}[server.tls]\ncert_path = {cert}\nkey_path = {cert}\n"),
                "server.tls.key_path",
            ),
            (
                format!("{base}[server.tls]\ncert_path = {cert}\nkey_path = {other_key}\n"),
                "server.tls.key_path",
            ),
            (
                tls("client_auth = \"required\"\n"),
                "server.tls.client_auth",
            ),
            (
                tls(&format!("client_ca_path = {missing}\n")),
                "server.tls.client_ca_path",
            ),
            (
                format!("{base}[auth.mtls]\nenabled = true\n"),
                "auth.mtls.enabled",
            ),
            (
                format!(
                    "{base}[auth.mtls]\nenabled = true\ntrusted_proxy_ips = [\"proxy.local\"]\n"
                ),
                "auth.mtls.trusted_proxy_ips[0]",
            ),
            (
                format!(
                    "{base}[auth.mtls]\nenabled = true\ntrusted_proxy_ips = [\"10.0.0.1/8\"]\n"
                ),
                "auth.mtls.trusted_proxy_ips[0]",
            ),
            (
                format!(
                    "{base}[auth.mtls]\nenabled = true\ntrusted_proxy_ips = [\"10.0.0.1\"]\nrate_limit = 0\n"
                ),
                "auth.mtls.rate_limit",
            ),
            (
                format!(
                    "{base}[auth.mtls]\nenabled = true\ntrusted_proxy_ips = [\"10.0.0.1\"]\nidentity_source = \"serial\"\n"
                ),
                "",
            ),
        ] {
            let err = settings(&text).unwrap_err();
            assert!(err.message.starts_with(starts), "{starts}: {err}");
            assert!(!err.message.contains("PRIVATE KEY"), "{err}");
        }
        // A proxy address block or a client CA, and mTLS is on.
        let s = settings(&format!(
            "{base}[auth.mtls]\nenabled = true\ntrusted_proxy_ips = [\"10.0.0.0/8\", \"::1\"]\n"
        ))
        .unwrap();
        assert!(s.auth.mtls.is_some() && s.auth.requires_credentials());
        let s = settings(&tls(&format!(
            "client_ca_path = {cert}\n[auth.mtls]\nenabled = true\n"
        )))
        .unwrap();
        assert!(s.server.tls.as_ref().is_some_and(|t| t.verifies_clients));
    }

    #[test]
    fn stdio_without_command_is_rejected() {
        let err = settings("[upstream]\ntransport = \"stdio\"\n").unwrap_err();
        assert!(err.message.contains("upstream.command"));
    }

    #[test]
    fn header_injection_in_upstream_headers_is_rejected() {
        let err = settings(
            "[upstream]\ntransport = \"http\"\nurl = \"http://127.0.0.1:1/\"\nheaders = { \"X-A\" = \"a\\r\\nEvil: 1\" }\n",
        )
        .unwrap_err();
        assert!(err.message.contains("upstream.headers"));
    }

    fn keys_config(entries: &[(&str, &str)]) -> String {
        let mut t = String::from("[upstream]\ncommand = \"x\"\n");
        for (id, hash) in entries {
            t.push_str(&format!(
                "[[auth.api_keys]]\nid = \"{id}\"\nkey_hash = \"{hash}\"\n"
            ));
        }
        t
    }

    #[test]
    fn api_keys_with_the_same_id_are_refused_naming_both_entries() {
        let err = settings(&keys_config(&[
            ("a", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
            ("ci", "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="),
            ("b", "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI="),
            ("ci", "AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM="),
        ]))
        .unwrap_err();
        assert_eq!(
            err.message,
            "auth.api_keys[3].id: duplicate id \"ci\", already used by auth.api_keys[1] (each \
             key needs its own id: sessions, rate limits and audit lines are keyed by it)"
        );
    }

    #[test]
    fn api_keys_with_the_same_hash_are_refused_naming_both_entries() {
        let err = settings(&keys_config(&[
            ("a", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
            ("b", "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="),
            ("c", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
        ]))
        .unwrap_err();
        assert_eq!(
            err.message,
            "auth.api_keys[2].key_hash: the same key is already configured as auth.api_keys[0]"
        );
        assert!(
            settings(&keys_config(&[
                ("a", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
                ("b", "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=")
            ]))
            .is_ok()
        );
    }

    #[test]
    fn tracing_is_validated() {
        let with = |t: &str| settings(&format!("[upstream]\ncommand = \"x\"\n[tracing]\n{t}\n"));
        let s = with("enabled = true").unwrap();
        let ep = s.tracing.endpoint.unwrap();
        assert_eq!((ep.port, ep.target.as_str()), (4318, "/v1/traces"));
        let s = with("enabled = true\notlp_endpoint = \"https://otel.example.com/\"").unwrap();
        assert_eq!(s.tracing.endpoint.unwrap().target, "/v1/traces");
        let s = with("enabled = true\notlp_endpoint = \"http://[::1]:9/custom\"").unwrap();
        assert_eq!(s.tracing.endpoint.unwrap().target, "/custom");
        for (bad, key) in [
            ("sample_rate = 1.5", "tracing.sample_rate"),
            ("sample_rate = -0.1", "tracing.sample_rate"),
            ("sample_rate = nan", "tracing.sample_rate"),
            ("service_name = \"\"", "tracing.service_name"),
            (
                "otlp_endpoint = \"http://collector.example.com:4318\"",
                "tracing.otlp_endpoint",
            ),
            ("otlp_endpoint = \"ftp://x\"", "tracing.otlp_endpoint"),
        ] {
            let e = with(&format!("enabled = true\n{bad}")).unwrap_err();
            assert!(e.message.starts_with(key), "{bad}: {}", e.message);
        }
        assert!(
            !with("enabled = false\notlp_endpoint = \"ftp://x\"")
                .unwrap()
                .tracing
                .enabled
        );
    }

    fn warnings_of(text: &str) -> Vec<String> {
        settings(text).unwrap().warnings
    }

    #[test]
    fn keys_without_effect_where_they_stand_are_warned_about() {
        let w = warnings_of(
            "[upstream]\ncommand = \"x\"\nurl = \"http://127.0.0.1:1/mcp\"\nheaders = { A = \"b\" }\n",
        );
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].starts_with("upstream.url has no effect: upstream.transport is \"stdio\""));
        assert!(w[1].starts_with("upstream.headers has no effect"));

        let w = warnings_of(
            "[upstream]\ntransport = \"http\"\nurl = \"http://127.0.0.1:1/mcp\"\ncommand = \"x\"\ncwd = \"/\"\n",
        );
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("upstream.command has no effect") && w[0].contains("stdio upstream"));

        let w = warnings_of(
            "[upstream]\ncommand = \"x\"\n[rate_limit]\nenabled = false\nrequests_per_second = 5\n[[auth.api_keys]]\nid = \"a\"\nkey_hash = \"n4bQgYhMfWWaL+qgxVrQFaO/TxsrC4Is0V1sFbDwCgg=\"\nrate_limit = 3\n",
        );
        assert_eq!(
            w,
            [
                "rate_limit.requests_per_second has no effect: rate_limit.enabled is false",
                "auth.api_keys[0].rate_limit has no effect: rate_limit.enabled is false",
            ]
        );

        let w = warnings_of(
            "[server]\nsse_path = \"/events\"\npublic_url = \"https://x\"\n[upstream]\ncommand = \"x\"\n",
        );
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("server.public_url has no effect"));

        let w = warnings_of("[upstream]\ncommand = \"x\"\n[audit]\ninclude_arguments = true\n");
        assert!(w[0].contains("no destination"), "{w:?}");

        let w = warnings_of("[upstream]\ncommand = \"x\"\n[tracing]\nenabled = true\n");
        assert!(w.is_empty(), "{w:?}");
        let w =
            warnings_of("[upstream]\ncommand = \"x\"\n[tracing]\notlp_endpoint = \"http://x\"\n");
        assert_eq!(
            w,
            ["tracing.otlp_endpoint has no effect: tracing.enabled is false"]
        );

        // Defaults are never warned about: only what the file itself sets.
        assert!(
            warnings_of("[upstream]\ncommand = \"x\"\n[rate_limit]\nenabled = false\n").is_empty()
        );
    }

    fn refusal(text: &str) -> String {
        settings(text).unwrap_err().to_string()
    }

    #[test]
    fn policy_entries_that_can_never_match_are_refused() {
        let key = |extra: &str| {
            format!(
                "[upstream]\ncommand = \"x\"\n[[auth.api_keys]]\nid = \"a\"\nkey_hash = \"n4bQgYhMfWWaL+qgxVrQFaO/TxsrC4Is0V1sFbDwCgg=\"\n{extra}\n"
            )
        };
        for entry in [
            "\"sleep \"",
            "\"\"",
            "\"sleep/\"",
            "\"[sleep]\"",
            "\"sleep\\n\"",
        ] {
            let err = refusal(&key(&format!("denied_tools = [{entry}]")));
            assert!(
                err.contains("auth.api_keys[0].denied_tools[0]"),
                "{entry}: {err}"
            );
        }
        // Globs over the tool character set are fine.
        settings(&key("denied_tools = [\"del*\", \"rm?\"]")).unwrap();
        // With strict names off, tools may be named anything printable.
        settings(&format!(
            "[server]\nstrict_tool_names = false\n{}",
            key("denied_tools = [\"sleep/x\"]")
        ))
        .unwrap();
        let err =
            refusal("[upstream]\ncommand = \"x\"\n[rate_limit]\nper_tool = { \"ec*\" = 1 }\n");
        assert!(err.contains("per_tool names tools exactly"), "{err}");
    }

    #[test]
    fn upstream_headers_the_gateway_sets_or_repeats_are_refused() {
        let http = |headers: &str| {
            format!(
                "[upstream]\ntransport = \"http\"\nurl = \"http://127.0.0.1:1/mcp\"\nheaders = {{ {headers} }}\n"
            )
        };
        for h in [
            "\"Mcp-Session-Id\" = \"s\"",
            "\"Accept\" = \"x\"",
            "\"X-Request-Id\" = \"1\"",
        ] {
            assert!(
                refusal(&http(h)).contains("is set by the gateway itself"),
                "{h}"
            );
        }
        assert!(refusal(&http("\"X-A\" = \"1\", \"x-a\" = \"2\"")).contains("are the same header"));
        assert!(refusal(&http("\"X-A\" = \"a\\u0001b\"")).contains("is not a valid header"));
        settings(&http("\"Authorization\" = \"Bearer up\"")).unwrap();
    }

    #[test]
    fn urls_with_credentials_are_refused_without_echoing_them() {
        let err = refusal(
            "[upstream]\ntransport = \"http\"\nurl = \"http://user:hunter2@127.0.0.1:1/mcp\"\n",
        );
        assert!(err.contains("carries credentials"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        let err =
            refusal("[upstream]\ntransport = \"http\"\nurl = \"ftp://h/mcp?token=hunter2\"\n");
        assert!(!err.contains("hunter2"), "{err}");
        // A query is kept for the request but never shown.
        let s = settings(
            "[upstream]\ntransport = \"http\"\nurl = \"http://127.0.0.1:1/mcp?token=hunter2\"\n",
        )
        .unwrap();
        let Transport::Http(h) = &s.routes[0].upstream.transport else {
            panic!()
        };
        assert_eq!(h.endpoints[0].url, "http://127.0.0.1:1/mcp");
        assert_eq!(h.endpoints[0].path, "/mcp?token=hunter2");
    }

    #[test]
    fn durations_beyond_a_year_are_refused() {
        let err = refusal(
            "[server]\nheader_timeout_secs = 9223372036854775807\n[upstream]\ncommand = \"x\"\n",
        );
        assert!(
            err.contains("server.header_timeout_secs") && err.contains("more than a year"),
            "{err}"
        );
        let err = refusal("[upstream]\ncommand = \"x\"\ntimeout_secs = 99999999999\n");
        assert!(err.contains("upstream.timeout_secs"), "{err}");
    }

    #[test]
    fn origins_are_normalised_and_wildcards_refused() {
        let s = settings("[server]\nallowed_origins = [\"HTTPS://App.Example.com:443/\", \"http://localhost:8080\"]\n[upstream]\ncommand = \"x\"\n").unwrap();
        assert_eq!(
            s.server.allowed_origins,
            ["https://app.example.com", "http://localhost:8080"]
        );
        for bad in ["null", "*", "app.example.com", "https://a.com/path"] {
            let err = refusal(&format!(
                "[server]\nallowed_origins = [\"{bad}\"]\n[upstream]\ncommand = \"x\"\n"
            ));
            assert!(err.contains("server.allowed_origins[0]"), "{bad}: {err}");
        }
    }

    #[test]
    fn routes_under_the_legacy_sse_paths_are_refused() {
        let err = refusal("[server]\nmcp_path = \"/sse/mcp\"\n[upstream]\ncommand = \"x\"\n");
        assert!(err.contains("server.mcp_path"), "{err}");
        let err = refusal(
            "[[upstream.servers]]\nname = \"a\"\npath_prefix = \"/messages/a\"\ncommand = \"x\"\n",
        );
        assert!(err.contains("upstream.servers[0].path_prefix"), "{err}");
        let err = refusal(
            "[server]\nsse_path = \"/p/q\"\n[[upstream.servers]]\nname = \"a\"\npath_prefix = \"/p\"\nstrip_prefix = true\ncommand = \"x\"\n",
        );
        assert!(err.contains("upstream.servers[0].path_prefix"), "{err}");
        let err = refusal("[server]\nsse_path = \"/messages\"\n[upstream]\ncommand = \"x\"\n");
        assert!(err.contains("server.sse_path"), "{err}");
        let err = refusal("[server]\nsse_path = \"/a/../sse\"\n[upstream]\ncommand = \"x\"\n");
        assert!(err.contains("normal form"), "{err}");
        // Beside each other they are fine.
        let cfg = settings("[server]\nsse_path = \"/events\"\n[upstream]\ncommand = \"x\"\n");
        assert_eq!(cfg.unwrap().server.sse_path, "/events");
    }

    #[test]
    fn small_mistakes_get_named() {
        let err = refusal("[server]\nmcp_path = \"/live\"\n[upstream]\ncommand = \"x\"\n");
        assert!(
            err.contains("server.mcp_path: `/live` is one of the gateway's own paths"),
            "{err}"
        );
        let err = refusal("[upstream]\ncommand = \"x\"\n[audit]\nfile = \"\"\n");
        assert!(err.contains("audit.file: is empty"), "{err}");
        let w = warnings_of("[admin]\nenabled = false\nport = 9\n[upstream]\ncommand = \"x\"\n");
        assert_eq!(w, ["admin.port has no effect: admin.enabled is false"]);
    }

    fn oauth_config(server: &str, oauth: &str) -> String {
        format!("[server]\n{server}\n[upstream]\ncommand = \"x\"\n[auth.oauth]\n{oauth}\n")
    }

    const GITHUB: &str = "provider = \"github\"\nclient_id = \"c\"\nclient_secret = \"s\"";

    #[test]
    fn oauth_needs_a_public_url_that_is_an_origin() {
        let ok = settings(&oauth_config(
            "public_url = \"https://mcp.example.com/\"",
            GITHUB,
        ))
        .unwrap();
        let oauth = ok.auth.oauth.as_ref().unwrap();
        assert_eq!(oauth.public_url, "https://mcp.example.com");
        assert_eq!(oauth.authorization_servers, ["https://mcp.example.com"]);
        assert!(oauth.server.is_some());
        assert!(refusal(&oauth_config("", GITHUB)).contains("server.public_url: required"));
        for bad in [
            "http://mcp.example.com",
            "https://mcp.example.com/guard",
            "https://mcp.example.com?x=1",
            "https://mcp.example.com#f",
            "https://user@mcp.example.com",
            "https://mcp.example.com\\\"x",
            "ftp://mcp.example.com",
        ] {
            let text = oauth_config(&format!("public_url = {bad:?}"), GITHUB);
            assert!(refusal(&text).starts_with("server.public_url"), "{bad}");
        }
        settings(&oauth_config(
            "public_url = \"http://127.0.0.1:8080\"",
            GITHUB,
        ))
        .unwrap();
    }

    #[test]
    fn oauth_providers_decide_who_the_authorization_server_is() {
        let url = "public_url = \"https://mcp.example.com\"";
        let with_as = format!("{GITHUB}\nauthorization_servers = [\"https://idp.example.com\"]");
        assert!(
            refusal(&oauth_config(url, &with_as)).starts_with("auth.oauth.authorization_servers")
        );
        let no_secret = "provider = \"google\"\nclient_id = \"c\"";
        assert!(refusal(&oauth_config(url, no_secret)).starts_with("auth.oauth.client_secret"));
        // okta/custom without authorization_servers: the facade, which needs the IdP's URLs.
        let custom = "provider = \"custom\"\nclient_id = \"c\"";
        assert!(refusal(&oauth_config(url, custom)).starts_with("auth.oauth.authorization_url"));
        // …with them: discovery only, advertising them.
        let rs = format!(
            "{custom}\nauthorization_servers = [\"https://idp.example.com\"]\nscopes = [\"mcp\"]"
        );
        let s = settings(&oauth_config(url, &rs)).unwrap();
        let oauth = s.auth.oauth.as_ref().unwrap();
        assert!(oauth.server.is_none());
        assert_eq!(oauth.authorization_servers, ["https://idp.example.com"]);
        let rs = format!("{custom}\nauthorization_servers = [\"http://idp.example.com\"]");
        assert!(
            refusal(&oauth_config(url, &rs)).starts_with("auth.oauth.authorization_servers[0]")
        );
    }

    #[test]
    fn oauth_values_that_reach_headers_or_urls_are_checked() {
        let url = "public_url = \"https://mcp.example.com\"";
        for (extra, key) in [
            ("scopes = [\"a b\"]", "auth.oauth.scopes[0]"),
            ("scopes = [\"a\\\"b\"]", "auth.oauth.scopes[0]"),
            (
                "redirect_uri = \"https://elsewhere.example.com/oauth/callback\"",
                "auth.oauth.redirect_uri",
            ),
            (
                "redirect_uri = \"https://mcp.example.com/mcp\"",
                "auth.oauth.redirect_uri",
            ),
            (
                "redirect_uri = \"https://mcp.example.com/oauth/token\"",
                "auth.oauth.redirect_uri",
            ),
            (
                "redirect_uri = \"https://mcp.example.com/a/../b\"",
                "auth.oauth.redirect_uri",
            ),
            (
                "token_url = \"http://idp.example.com/token\"",
                "auth.oauth.token_url",
            ),
        ] {
            let text = oauth_config(url, &format!("{GITHUB}\n{extra}"));
            assert!(
                refusal(&text).starts_with(key),
                "{extra}: {}",
                refusal(&text)
            );
        }
        let text = format!(
            "[server]\n{url}\nmcp_path = \"/oauth/mcp\"\n[upstream]\ncommand = \"x\"\n[auth.oauth]\n{GITHUB}\n"
        );
        assert!(
            refusal(&text).starts_with("auth.oauth: the MCP endpoint `/oauth/mcp`"),
            "{}",
            refusal(&text)
        );
        let text = oauth_config(
            url,
            &format!("{GITHUB}\n[auth.oauth.scope_tool_mapping]\n\"a b\" = [\"*\"]"),
        );
        assert!(refusal(&text).starts_with("auth.oauth.scope_tool_mapping"));
        let ok = oauth_config(
            url,
            &format!("{GITHUB}\nredirect_uri = \"https://mcp.example.com/auth/back\""),
        );
        let s = settings(&ok).unwrap();
        assert_eq!(
            s.auth
                .oauth
                .as_ref()
                .unwrap()
                .server
                .as_ref()
                .unwrap()
                .callback_path,
            "/auth/back"
        );
    }

    const SIEM: &str = "[upstream]\ncommand = \"x\"\n[audit]\nexport_url = \"https://siem.example.com/ingest\"\nspool_dir = \"/var/lib/mcp-guard/spool\"\n";

    #[test]
    fn siem_export_is_validated_and_its_header_values_never_echoed() {
        let s = settings(&format!(
            "{SIEM}format = \"splunk_hec\"\nexport_headers = {{ Authorization = \"Splunk sekrit\" }}\n"
        ))
        .unwrap();
        let export = s.audit.output.as_ref().unwrap().export.as_ref().unwrap();
        assert_eq!(export.format, schema::ExportFormat::SplunkHec);
        assert_eq!(export.batch_size, 100);
        assert!(
            !format!("{export:?}").contains("sekrit"),
            "Debug shows a header value"
        );
        for (extra, key) in [
            (
                "export_headers = { Authorization = \"Splunk sekrit\\r\\nX: y\" }",
                "audit.export_headers.Authorization",
            ),
            (
                "export_headers = { \"Content-Length\" = \"sekrit\" }",
                "audit.export_headers.Content-Length",
            ),
            ("export_batch_size = 0", "audit.export_batch_size"),
            ("export_interval_secs = 0", "audit.export_interval_secs"),
            ("spool_max_bytes = 1000", "audit.spool_max_bytes"),
            ("spool_dir = \"\"", "audit.spool_dir"),
        ] {
            let text = format!("{SIEM}{extra}\n").replace(
                "spool_dir = \"/var/lib/mcp-guard/spool\"\nspool_dir",
                "spool_dir",
            );
            let err = refusal(&text);
            assert!(err.starts_with(key), "{extra}: {err}");
            assert!(!err.contains("sekrit"), "{err}");
        }
        let err = refusal("[upstream]\ncommand = \"x\"\n[audit]\nexport_url = \"https://s/i\"\n");
        assert!(err.starts_with("audit.spool_dir: is required"), "{err}");
        let err = refusal(&SIEM.replace("https://siem.example.com", "http://siem.example.com"));
        assert!(
            err.contains("audit.export_url") && err.contains("SIEM URLs must be https"),
            "{err}"
        );
        assert!(refusal(&format!("{SIEM}format = \"syslog\"\n")).contains("format"));
    }

    #[test]
    fn siem_keys_without_an_export_url_are_warned_about() {
        let w = warnings_of(
            "[upstream]\ncommand = \"x\"\n[audit]\nstdout = true\nformat = \"cef\"\nspool_dir = \"/tmp/s\"\n",
        );
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("audit.export_url is not set"), "{w:?}");
        let w = warnings_of(&format!("{SIEM}enabled = false\n"));
        assert!(
            w.iter()
                .any(|w| w.starts_with("audit.export_url has no effect: audit.enabled is false")),
            "{w:?}"
        );
        // An export alone is a destination.
        let s = settings(SIEM).unwrap();
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
        let out = s.audit.output.unwrap();
        assert!(out.file.is_none() && !out.stdout && out.export.is_some());
    }
}
