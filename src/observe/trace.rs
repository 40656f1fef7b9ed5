//! W3C trace context on the request path: the incoming `traceparent` / `tracestate` checked,
//! the sampling decision (parent-based, the trace id as the coin), the context sent upstream
//! with the gateway's span as parent, and the span record a sampled request leaves for the
//! exporter (`otlp.rs`).

use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// `[tracing]`, validated.
#[derive(Debug, Clone)]
pub struct TraceSettings {
    /// Spans are made and exported (`tracing.enabled`).
    pub enabled: bool,
    /// `service.name` of the resource.
    pub service_name: Arc<str>,
    /// Where spans are POSTed (OTLP/HTTP protobuf); set whenever `enabled`.
    pub endpoint: Option<crate::auth::fetch::IdpUrl>,
    /// `sample_rate` as a threshold on the trace id's low 64 bits (`u64::MAX`: always).
    pub threshold: u64,
    /// Incoming trace headers are read and forwarded (`propagate_context`).
    pub propagate: bool,
    /// An incoming parent's sampled flag decides (`honour_parent_sampling`); otherwise the
    /// gateway's own `sample_rate` decides for every trace.
    pub honour_parent: bool,
}

impl Default for TraceSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            service_name: "mcp-guard".into(),
            endpoint: None,
            threshold: 0,
            propagate: true,
            honour_parent: true,
        }
    }
}

/// The threshold for a `sample_rate` in 0.0..=1.0 (checked by the config).
pub fn threshold(rate: f64) -> u64 {
    if rate >= 1.0 {
        u64::MAX
    } else if rate <= 0.0 || rate.is_nan() {
        0
    } else {
        // 2^64 as f64 is exact; the cast saturates.
        (rate * 18_446_744_073_709_551_616.0) as u64
    }
}

/// Longest `traceparent` looked at: version 00 is 55 bytes; later versions may append fields,
/// but nothing honest needs more than this.
const MAX_TRACEPARENT: usize = 256;
/// Longest `tracestate` forwarded (W3C: vendors must propagate at least 512 characters).
const MAX_TRACESTATE: usize = 512;
/// Most `tracestate` list members (W3C's limit).
const MAX_TRACESTATE_MEMBERS: usize = 32;

/// A well-formed incoming `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    /// The trace.
    pub trace_id: [u8; 16],
    /// The caller's span, parent of ours.
    pub span_id: [u8; 8],
    /// The caller's sampled flag.
    pub sampled: bool,
}

/// Parses a W3C `traceparent`; `None` for anything malformed, oversized, of version `ff`,
/// upper-case, or with an all-zero id (the header is then ignored and a new trace starts).
pub fn parse_traceparent(v: &str) -> Option<Parent> {
    let b = v.as_bytes();
    if b.len() < 55 || b.len() > MAX_TRACEPARENT {
        return None;
    }
    if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let version = hex::<1>(&b[0..2])?[0];
    // Version 00 has exactly four fields; a later version may append more after a dash.
    if version == 0xff || (version == 0 && b.len() != 55) || (b.len() > 55 && b[55] != b'-') {
        return None;
    }
    let trace_id = hex::<16>(&b[3..35])?;
    let span_id = hex::<8>(&b[36..52])?;
    let flags = hex::<1>(&b[53..55])?[0];
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(Parent {
        trace_id,
        span_id,
        sampled: flags & 1 == 1,
    })
}

/// Lower-case hex of exactly `N` bytes.
fn hex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

/// Whether a `tracestate` is fit to forward: bounded in length and members, each member
/// `key=value` in W3C's character sets.
pub fn valid_tracestate(v: &str) -> bool {
    if v.len() > MAX_TRACESTATE {
        return false;
    }
    let mut members = 0;
    for m in v.split(',') {
        let m = m.trim_matches([' ', '\t']);
        if m.is_empty() {
            continue;
        }
        members += 1;
        let Some((key, value)) = m.split_once('=') else {
            return false;
        };
        let key_ok = !key.is_empty()
            && key.len() <= 256
            && key.as_bytes()[0].is_ascii_alphanumeric()
            && key
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_-*/@".contains(&c));
        let value_ok = !value.is_empty()
            && value.len() <= 256
            && !value.ends_with(' ')
            && value
                .bytes()
                .all(|c| (0x20..=0x7e).contains(&c) && c != b',' && c != b'=');
        if !key_ok || !value_ok {
            return false;
        }
    }
    members <= MAX_TRACESTATE_MEMBERS
}

thread_local! {
    /// This thread's id generator: seeded from the system's randomness once, then cheap.
    /// Trace and span ids must be unique, not secret.
    static IDS: Cell<u64> = Cell::new(u64::from_be_bytes(crate::mcp::session::random_bytes::<8>()));
}

/// The next 64 random-looking bits (splitmix64).
fn next_u64() -> u64 {
    IDS.with(|s| {
        let x = s.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        s.set(x);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

/// A fresh non-zero span id.
fn new_span_id() -> [u8; 8] {
    loop {
        let v = next_u64();
        if v != 0 {
            return v.to_be_bytes();
        }
    }
}

/// A fresh non-zero trace id.
fn new_trace_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&next_u64().to_be_bytes());
    id[8..].copy_from_slice(&new_span_id());
    id
}

/// Whether the trace id falls within the sample: its low 64 bits against the threshold, so
/// every gateway with the same rate decides the same way for the same trace.
fn coin(trace_id: &[u8; 16], threshold: u64) -> bool {
    threshold == u64::MAX
        || u64::from_be_bytes(trace_id[8..].try_into().unwrap_or_default()) < threshold
}

/// The longest string attribute a span records, in bytes; a longer value is cut at a character
/// boundary.
pub const MAX_ATTRIBUTE: usize = 256;

fn bounded_attribute(v: &str) -> &str {
    if v.len() <= MAX_ATTRIBUTE {
        return v;
    }
    let mut end = MAX_ATTRIBUTE;
    while !v.is_char_boundary(end) {
        end -= 1;
    }
    &v[..end]
}

/// The trace context of one request while it is served.
#[derive(Debug)]
pub struct RequestTrace {
    /// The trace (the caller's, or a new one).
    pub trace_id: [u8; 16],
    /// The gateway's span for this request.
    pub span_id: [u8; 8],
    /// The caller's span, when a valid `traceparent` came in.
    pub parent: Option<[u8; 8]>,
    /// Whether this request's span is recorded and exported.
    pub sampled: bool,
    /// Whether `sample_rate` alone would have sampled it (rather than only the caller's
    /// flag): a request refused before its caller was known is exported only then.
    pub sampled_by_rate: bool,
    /// The caller's `tracestate`, when valid (forwarded and recorded as is).
    pub tracestate: Option<String>,
    /// When the request began, for the span's start.
    pub wall: SystemTime,
    started: Instant,
    /// Phase ends, from `started`: admission on the head, body read, pipeline answered.
    marks: [Cell<Option<Duration>>; 3],
}

/// The phases a span times, in order.
#[derive(Debug, Clone, Copy)]
pub enum Phase {
    /// Route, Origin, authentication and transport rules, on the head.
    Admit = 0,
    /// The body read.
    Body = 1,
    /// Classify, authorize, rate-limit, and the upstream until its answer began.
    Handle = 2,
}

impl RequestTrace {
    /// Marks the end of `phase`.
    pub fn mark(&self, phase: Phase) {
        self.marks[phase as usize].set(Some(self.started.elapsed()));
    }

    /// The trace id in lower-case hex (for audit events).
    pub fn trace_id_hex(&self) -> String {
        to_hex(&self.trace_id)
    }
}

fn to_hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    push_hex(&mut s, bytes);
    s
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
}

/// Starts a request's trace context from its headers, and rewrites them into what goes
/// upstream: with tracing on, a `traceparent` naming the gateway's span as parent; with it
/// off, the caller's own when valid; with `propagate_context = false`, none at all (and the
/// caller's are not read). Returns the context only when tracing is on.
pub fn begin(
    cfg: &TraceSettings,
    traceparent: &mut Option<String>,
    tracestate: &mut Option<String>,
    started: Instant,
    wall: SystemTime,
) -> Option<RequestTrace> {
    let parent = if cfg.propagate {
        traceparent.as_deref().and_then(parse_traceparent)
    } else {
        None
    };
    if !cfg.propagate || parent.is_none() {
        // A malformed or unwanted context is neither recorded nor forwarded.
        *traceparent = None;
        *tracestate = None;
    } else if tracestate.as_deref().is_some_and(|s| !valid_tracestate(s)) {
        *tracestate = None;
    }
    if !cfg.enabled {
        return None;
    }
    let (trace_id, parent_span) = match parent {
        Some(p) => (p.trace_id, Some(p.span_id)),
        None => (new_trace_id(), None),
    };
    let sampled_by_rate = coin(&trace_id, cfg.threshold);
    let sampled = match parent {
        Some(p) if cfg.honour_parent => p.sampled,
        _ => sampled_by_rate,
    };
    let span_id = new_span_id();
    if cfg.propagate {
        // The caller's buffer is reused: it already has room for the 55 bytes.
        let out = traceparent.get_or_insert_with(|| String::with_capacity(55));
        out.clear();
        out.push_str("00-");
        push_hex(out, &trace_id);
        out.push('-');
        push_hex(out, &span_id);
        out.push_str(if sampled { "-01" } else { "-00" });
    }
    Some(RequestTrace {
        trace_id,
        span_id,
        parent: parent_span,
        sampled,
        sampled_by_rate,
        tracestate: if sampled { tracestate.clone() } else { None },
        wall,
        started,
        marks: Default::default(),
    })
}

/// An attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A string.
    Str(String),
    /// An integer.
    Int(i64),
}

/// A finished span, for the exporter.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    /// The trace.
    pub trace_id: [u8; 16],
    /// This span.
    pub span_id: [u8; 8],
    /// The caller's span, if any.
    pub parent: Option<[u8; 8]>,
    /// The caller's `tracestate`.
    pub tracestate: Option<String>,
    /// The span's name (the MCP method, or the HTTP method for non-MCP requests).
    pub name: String,
    /// Start, nanoseconds since the Unix epoch.
    pub start_unix_nanos: u64,
    /// End, nanoseconds since the Unix epoch.
    pub end_unix_nanos: u64,
    /// Attributes.
    pub attributes: Vec<(&'static str, Value)>,
    /// The request failed on the gateway's or upstream's side (5xx).
    pub error: bool,
}

/// What the connection loop knows about a finished request, for its span. Only names and
/// outcomes: never arguments, credentials or bodies.
pub struct Finished<'a> {
    /// HTTP method of the request.
    pub http_method: crate::http::request::Method,
    /// Request path (without the query string, which may carry a credential).
    pub path: &'a str,
    /// HTTP status answered.
    pub status: u16,
    /// Each JSON-RPC message's method and target.
    pub messages: &'a [(String, Option<crate::mcp::jsonrpc::Target>)],
    /// The metric label of the method, when no message was classified.
    pub method_label: &'a str,
    /// The caller's identity id.
    pub identity: Option<&'a str>,
    /// The decision.
    pub decision: &'a str,
    /// The route's server.
    pub upstream: Option<&'a str>,
    /// The `Mcp-Session-Id` the request carried.
    pub session: Option<&'a str>,
    /// When the request was sent upstream, if it was.
    pub forwarded_at: Option<Instant>,
}

impl RequestTrace {
    /// The span of a finished, sampled request.
    pub fn finish(&self, f: Finished<'_>) -> SpanRecord {
        use crate::mcp::jsonrpc::Target;
        let elapsed = self.started.elapsed();
        let start = self
            .wall
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mut attributes: Vec<(&'static str, Value)> = Vec::with_capacity(16);
        // Most values come from the client (path, names, URIs, the session id it sent): each
        // is cut to a bound, so that what a span (and the export queue) holds does not grow
        // with what a client sends.
        let mut s = |k: &'static str, v: &str| {
            attributes.push((k, Value::Str(bounded_attribute(v).to_string())))
        };
        use crate::http::request::Method;
        let http_method = match f.http_method {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Delete => "DELETE",
            Method::Options => "OPTIONS",
            Method::Head => "HEAD",
            Method::Other => "_OTHER",
        };
        s("http.request.method", http_method);
        s("url.path", f.path);
        let method = f
            .messages
            .first()
            .map_or(f.method_label, |(m, _)| m.as_str());
        s("mcp.method", method);
        if let Some((_, Some(target))) = f.messages.first() {
            match target {
                Target::Tool(n) => s("mcp.tool.name", n),
                Target::Resource(n) => s("mcp.resource.uri", n),
                Target::Prompt(n) => s("mcp.prompt.name", n),
            }
        }
        if let Some(sid) = f.session {
            s("mcp.session.id", sid);
        }
        if let Some(id) = f.identity {
            s("enduser.id", id);
        }
        s("mcp_guard.decision", f.decision);
        if let Some(u) = f.upstream {
            s("mcp_guard.upstream", u);
        }
        attributes.push(("http.response.status_code", Value::Int(f.status.into())));
        if f.messages.len() > 1 {
            attributes.push(("mcp_guard.batch_size", Value::Int(f.messages.len() as i64)));
        }
        // Each phase's own duration, in microseconds; a phase the request never reached is
        // absent. The pipeline's time splits where the request went upstream, when it did.
        let forwarded = f
            .forwarded_at
            .map(|t| t.saturating_duration_since(self.started));
        let ends = [
            ("mcp_guard.phase.admit_us", self.marks[0].get()),
            ("mcp_guard.phase.body_us", self.marks[1].get()),
            (
                "mcp_guard.phase.decide_us",
                forwarded.or(self.marks[2].get()),
            ),
            (
                "mcp_guard.phase.upstream_us",
                forwarded.and(self.marks[2].get()),
            ),
        ];
        let mut from = Duration::ZERO;
        for (name, end) in ends {
            if let Some(at) = end {
                attributes.push((name, Value::Int(at.saturating_sub(from).as_micros() as i64)));
                from = at;
            }
        }
        attributes.push((
            "mcp_guard.phase.reply_us",
            Value::Int(elapsed.saturating_sub(from).as_micros() as i64),
        ));
        SpanRecord {
            trace_id: self.trace_id,
            span_id: self.span_id,
            parent: self.parent,
            tracestate: self.tracestate.clone(),
            name: method.to_string(),
            start_unix_nanos: start,
            end_unix_nanos: start.saturating_add(elapsed.as_nanos() as u64),
            attributes,
            error: f.status >= 500,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_parses() {
        let p = parse_traceparent(TP).unwrap();
        assert_eq!(to_hex(&p.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(to_hex(&p.span_id), "00f067aa0ba902b7");
        assert!(p.sampled);
        // A later version may append fields.
        assert!(parse_traceparent(&format!("01{}-extra", &TP[2..])).is_some());
    }

    #[test]
    fn hostile_traceparents_are_refused() {
        let long = format!("{TP}-{}", "a".repeat(300));
        for bad in [
            "",
            "00",
            &TP[..54],
            &format!("{TP}0"),
            &format!("{TP}-01"), // version 00 has four fields exactly
            &TP.to_uppercase(),
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\u{e9}",
            &long,
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn tracestate_is_bounded_and_checked() {
        assert!(valid_tracestate("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"));
        assert!(valid_tracestate("tenant@vendor=x, ,a=b"));
        let many: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
        assert!(!valid_tracestate(&many.join(",")));
        assert!(valid_tracestate(&many[..32].join(",")));
        assert!(!valid_tracestate(&format!("a={}", "b".repeat(600))));
        for bad in ["novalue", "UPPER=x", "a=b=c", "=x", "a=", "a=\u{7f}"] {
            assert!(!valid_tracestate(bad), "{bad:?}");
        }
    }

    fn settings(rate: f64, honour: bool) -> TraceSettings {
        TraceSettings {
            enabled: true,
            threshold: threshold(rate),
            honour_parent: honour,
            ..TraceSettings::default()
        }
    }

    #[test]
    fn the_gateway_span_becomes_the_upstream_parent() {
        let mut tp = Some(TP.to_string());
        let mut ts = Some("rojo=1".to_string());
        let t = begin(
            &settings(0.0, true),
            &mut tp,
            &mut ts,
            Instant::now(),
            SystemTime::now(),
        )
        .unwrap();
        assert!(t.sampled, "a sampled parent is honoured");
        assert_eq!(t.parent, Some(parse_traceparent(TP).unwrap().span_id));
        let out = parse_traceparent(tp.as_deref().unwrap()).unwrap();
        assert_eq!(out.trace_id, t.trace_id);
        assert_eq!(out.span_id, t.span_id);
        assert_ne!(out.span_id, t.parent.unwrap());
        assert_eq!(ts.as_deref(), Some("rojo=1"));
    }

    #[test]
    fn an_untrusted_sampled_flag_does_not_force_sampling() {
        let mut tp = Some(TP.to_string());
        let t = begin(
            &settings(0.0, false),
            &mut tp,
            &mut None,
            Instant::now(),
            SystemTime::now(),
        )
        .unwrap();
        assert!(!t.sampled);
        assert!(tp.as_deref().unwrap().ends_with("-00"));
        let t = begin(
            &settings(1.0, false),
            &mut Some(TP.to_string()),
            &mut None,
            Instant::now(),
            SystemTime::now(),
        )
        .unwrap();
        assert!(t.sampled);
    }

    #[test]
    fn a_malformed_parent_starts_a_new_trace_and_is_not_forwarded() {
        let mut tp = Some("00-zz".to_string());
        let mut ts = Some("a=b".to_string());
        let t = begin(
            &settings(1.0, true),
            &mut tp,
            &mut ts,
            Instant::now(),
            SystemTime::now(),
        )
        .unwrap();
        assert_eq!(t.parent, None);
        assert_eq!(ts, None);
        assert_eq!(
            parse_traceparent(tp.as_deref().unwrap()).unwrap().trace_id,
            t.trace_id
        );
        // Tracing off: the caller's header only when valid.
        let off = TraceSettings::default();
        let mut tp = Some("garbage".to_string());
        assert!(begin(&off, &mut tp, &mut None, Instant::now(), SystemTime::now()).is_none());
        assert_eq!(tp, None);
        let mut tp = Some(TP.to_string());
        begin(&off, &mut tp, &mut None, Instant::now(), SystemTime::now());
        assert_eq!(tp.as_deref(), Some(TP));
        // propagate_context = false: nothing read, nothing forwarded.
        let quiet = TraceSettings {
            propagate: false,
            ..settings(1.0, true)
        };
        let mut tp = Some(TP.to_string());
        let mut ts = Some("a=b".to_string());
        let t = begin(&quiet, &mut tp, &mut ts, Instant::now(), SystemTime::now()).unwrap();
        assert_eq!(t.parent, None);
        assert_ne!(t.trace_id, parse_traceparent(TP).unwrap().trace_id);
        assert_eq!((tp, ts), (None, None));
    }

    #[test]
    fn the_sample_rate_is_about_right_and_deterministic() {
        let th = threshold(0.25);
        let hits = (0..10_000).filter(|_| coin(&new_trace_id(), th)).count();
        assert!((2000..3000).contains(&hits), "{hits}");
        let id = new_trace_id();
        assert_eq!(coin(&id, th), coin(&id, th));
        assert!(!coin(&id, threshold(0.0)));
        assert!(coin(&id, threshold(1.0)));
    }
}
