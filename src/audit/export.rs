//! What the audit shipper sends: its validated settings, the bound on one event, the four wire
//! formats a batch is rendered in (`json`, `splunk_hec`, `elastic_bulk`, `cef`), and the
//! shipper's metrics.
//!
//! Events arrive here as the writer's JSON lines (with their `event_id`). Every string inside
//! is JSON-escaped already, so no field can end a line or a JSON value early; each format adds
//! only its own escaping (CEF's separators). Field values a client controls (tool names,
//! arguments, request ids) are bounded before an event is spooled or sent, so one hostile
//! request cannot make a batch the SIEM refuses.

use crate::auth::fetch::IdpUrl;
pub use crate::config::schema::ExportFormat;
use serde_json::Value;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// `[audit]`'s SIEM export, validated.
#[derive(Clone, PartialEq, Eq)]
pub struct ExportSettings {
    /// Where batches are POSTed.
    pub url: IdpUrl,
    /// Their body format.
    pub format: ExportFormat,
    /// Events per POST at most.
    pub batch_size: usize,
    /// The longest an event waits in memory for its batch to fill.
    pub interval: Duration,
    /// Sent with every POST (they may hold the SIEM's token: never logged or shown).
    pub headers: Vec<(String, String)>,
    /// Where batches wait while the SIEM is unreachable.
    pub spool_dir: PathBuf,
    /// The spool's bound in bytes.
    pub spool_max_bytes: u64,
    /// At shutdown, how long the shipper keeps trying before leaving the rest in the spool.
    pub shutdown_grace: Duration,
}

impl std::fmt::Debug for ExportSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Header values are credentials (a Splunk token, an API key): names only.
        let names: Vec<&str> = self.headers.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("ExportSettings")
            .field("url", &self.url.url)
            .field("format", &self.format)
            .field("batch_size", &self.batch_size)
            .field("interval", &self.interval)
            .field("headers", &names)
            .field("spool_dir", &self.spool_dir)
            .field("spool_max_bytes", &self.spool_max_bytes)
            .finish()
    }
}

/// Header names the gateway writes itself (framing and connection management): a configured
/// one would fight with them.
pub const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "keep-alive",
    "proxy-connection",
    "user-agent",
    "accept",
];

/// Checks one `export_headers` entry; the error never repeats the value (it is a secret).
pub fn check_header(name: &str, value: &str) -> Result<(), String> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(token) {
        return Err("is not a valid HTTP header name".into());
    }
    if RESERVED_HEADERS
        .iter()
        .any(|r| r.eq_ignore_ascii_case(name))
    {
        return Err("is set by the gateway itself and cannot be configured".into());
    }
    // A CR or LF would end the header and let the value write the rest of the request.
    if value
        .bytes()
        .any(|b| b == b'\r' || b == b'\n' || b == 0 || (b < 0x20 && b != b'\t') || b == 0x7f)
    {
        return Err("has a control character (CR, LF, NUL…) in its value".into());
    }
    if value.trim().is_empty() {
        return Err("has an empty value (an unset ${VAR} gives this)".into());
    }
    Ok(())
}

/// Longest string field kept whole in a shipped event, in bytes.
pub const MAX_FIELD_BYTES: usize = 1024;
/// Longest `arguments` kept as JSON in a shipped event; longer ones become a cut string.
pub const MAX_ARGUMENTS_BYTES: usize = 8 * 1024;
/// An event line at most this long is shipped as the writer wrote it (no field can be over
/// its bound then, except arguments, which are checked on their own).
const FAST_PATH_BYTES: usize = MAX_FIELD_BYTES;

/// The event as shipped: `line` (the writer's JSON line) with every string value cut to
/// [`MAX_FIELD_BYTES`] and `arguments` to [`MAX_ARGUMENTS_BYTES`], `"truncated":true` added
/// when anything was cut. None when the line is not a JSON object (never from the writer).
pub fn bound_event(line: &str) -> Option<String> {
    if line.len() <= FAST_PATH_BYTES {
        return Some(line.to_string());
    }
    let Ok(Value::Object(mut map)) = serde_json::from_str::<Value>(line) else {
        return None;
    };
    let mut cut = false;
    if let Some(args) = map.get_mut("arguments") {
        let text = args.to_string();
        if text.len() > MAX_ARGUMENTS_BYTES {
            *args = Value::String(format!("{}…", cut_at(&text, MAX_ARGUMENTS_BYTES)));
            cut = true;
        }
    }
    let mut bound = |v: &mut Value| {
        if let Value::String(s) = v
            && s.len() > MAX_FIELD_BYTES
        {
            *s = format!("{}…", cut_at(s, MAX_FIELD_BYTES));
            cut = true;
        }
    };
    for (key, v) in map.iter_mut() {
        match (key.as_str(), v) {
            ("arguments", _) => {}
            // `details` is one level of name → JSON value: each text has the same bound
            // (numbers are short).
            ("details", Value::Object(d)) => d.values_mut().for_each(&mut bound),
            (_, v) => bound(v),
        }
    }
    if cut {
        map.insert("truncated".into(), Value::Bool(true));
    }
    Some(Value::Object(map).to_string())
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn cut_at(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A batch rendered for the wire: content type and body.
pub fn render(format: ExportFormat, events: &[String]) -> (&'static str, Vec<u8>) {
    let mut body = String::with_capacity(events.iter().map(|e| e.len() + 64).sum());
    match format {
        ExportFormat::Json => {
            body.push('[');
            for (i, e) in events.iter().enumerate() {
                if i > 0 {
                    body.push(',');
                }
                body.push_str(e);
            }
            body.push(']');
            ("application/json", body.into_bytes())
        }
        ExportFormat::SplunkHec => {
            for e in events {
                let time = field(e, "timestamp")
                    .and_then(|t| parse_rfc3339_ms(&t))
                    .unwrap_or(0);
                let _ = write!(
                    body,
                    "{{\"time\":{}.{:03},\"source\":\"mcp-guard\",\"sourcetype\":\"mcp-guard:audit\",\"event\":{e}}}",
                    time / 1000,
                    time % 1000
                );
            }
            ("application/json", body.into_bytes())
        }
        ExportFormat::ElasticBulk => {
            for e in events {
                // `create` with the event id as `_id`: a batch sent twice (at-least-once)
                // indexes each event once; a data stream accepts `create` only.
                let id = field(e, "event_id").unwrap_or_default();
                body.push_str("{\"create\":{\"_id\":");
                body.push_str(&Value::String(id).to_string());
                body.push_str("}}\n");
                body.push_str(e);
                body.push('\n');
            }
            ("application/x-ndjson", body.into_bytes())
        }
        ExportFormat::Cef => {
            for e in events {
                if let Ok(Value::Object(map)) = serde_json::from_str::<Value>(e) {
                    cef_line(&map, &mut body);
                }
            }
            ("text/plain; charset=utf-8", body.into_bytes())
        }
    }
}

/// A top-level string field of an event line.
fn field(line: &str, key: &str) -> Option<String> {
    match serde_json::from_str::<Value>(line).ok()?.get(key)? {
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// Milliseconds since the epoch of the writer's `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn parse_rfc3339_ms(t: &str) -> Option<u64> {
    let b = t.as_bytes();
    if b.len() != 24 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[23] != b'Z' {
        return None;
    }
    let num = |from: usize, to: usize| -> Option<i64> { t.get(from..to)?.parse().ok() };
    let (y, mo, d) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (h, mi, s, ms) = (num(11, 13)?, num(14, 16)?, num(17, 19)?, num(20, 23)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    // Days-from-civil (proleptic Gregorian), the inverse of the writer's conversion.
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + s;
    u64::try_from(secs * 1000 + ms).ok()
}

/// CEF header fields: at most this many characters.
const CEF_HEADER_CHARS: usize = 128;

/// Appends one CEF line for `event`.
fn cef_line(event: &serde_json::Map<String, Value>, out: &mut String) {
    let text = |key: &str| -> Option<String> {
        match event.get(key)? {
            Value::String(s) => Some(s.clone()),
            Value::Null => None,
            other => Some(other.to_string()),
        }
    };
    let decision = text("decision").unwrap_or_default();
    let method = text("method").unwrap_or_default();
    let severity = match decision.as_str() {
        "allow" => 3,
        "deny" => 6,
        _ => 8,
    };
    out.push_str("CEF:0|mcp-guard|mcp-guard|");
    cef_header(env!("CARGO_PKG_VERSION"), out);
    out.push('|');
    cef_header(&decision, out);
    out.push('|');
    cef_header(
        if method.is_empty() {
            "request"
        } else {
            &method
        },
        out,
    );
    let _ = write!(out, "|{severity}|");
    let mut ext: Vec<(&str, String)> = Vec::with_capacity(20);
    if let Some(ms) = text("timestamp").and_then(|t| parse_rfc3339_ms(&t)) {
        ext.push(("rt", ms.to_string()));
    }
    let mut push = |key: &'static str, v: Option<String>| {
        if let Some(v) = v {
            ext.push((key, v));
        }
    };
    push("externalId", text("event_id"));
    push("act", Some(decision.clone()));
    push("reason", text("reason"));
    push("src", text("client_addr"));
    push("suser", text("identity"));
    push("cs1Label", Some("mcpMethod".into()));
    push("cs1", Some(method.clone()));
    let target = ["tool", "resource", "prompt"]
        .into_iter()
        .find_map(|k| text(k).map(|v| (k, v)));
    if let Some((kind, name)) = target {
        push("cs2Label", Some(kind.into()));
        push("cs2", Some(name));
    }
    push("cs3Label", Some("upstream".into()));
    push("cs3", text("upstream"));
    push("cs4Label", Some("requestId".into()));
    push("cs4", text("request_id"));
    push("cs5Label", Some("authMethod".into()));
    push("cs5", text("auth_method"));
    if let Some(t) = text("trace_id") {
        push("cs6Label", Some("traceId".into()));
        push("cs6", Some(t));
    }
    if let Some(c) = text("client_request_id") {
        push("flexString1Label", Some("clientRequestId".into()));
        push("flexString1", Some(c));
    }
    push("cn1Label", Some("httpStatus".into()));
    push("cn1", text("status"));
    push("cn2Label", Some("latencyMicros".into()));
    push("cn2", text("latency_us"));
    push("msg", text("arguments"));
    // Not in the CEF dictionary: a custom key (CEF allows them) holding the JSON object.
    push("mcpDetails", text("details"));
    if event.get("truncated") == Some(&Value::Bool(true)) {
        push("flexString2Label", Some("truncated".into()));
        push("flexString2", Some("true".into()));
    }
    for (i, (key, value)) in ext.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(key);
        out.push('=');
        cef_value(value, out);
    }
    out.push('\n');
}

/// A header field: `\` and `|` escaped; line breaks and other controls, which a header cannot
/// hold at all, become spaces; cut to [`CEF_HEADER_CHARS`].
fn cef_header(s: &str, out: &mut String) {
    for c in s.chars().take(CEF_HEADER_CHARS) {
        match c {
            '\\' => out.push_str("\\\\"),
            '|' => out.push_str("\\|"),
            c if c.is_control() || c == '\u{2028}' || c == '\u{2029}' => out.push(' '),
            c => out.push(c),
        }
    }
}

/// An extension value: `\`, `=` escaped, CR and LF written as `\r` `\n`, other controls as
/// spaces; cut to [`MAX_FIELD_BYTES`] characters (arguments arrive cut already).
fn cef_value(s: &str, out: &mut String) {
    for c in s.chars().take(MAX_ARGUMENTS_BYTES) {
        match c {
            '\\' => out.push_str("\\\\"),
            '=' => out.push_str("\\="),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() || c == '\u{2028}' || c == '\u{2029}' => out.push(' '),
            c => out.push(c),
        }
    }
}

/// Upper bounds (seconds) of the SIEM latency histogram.
const LATENCY_BOUNDS_MS: &[u64] = &[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000];

/// Why an event was dropped on the way to the SIEM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The spool was at `spool_max_bytes`: its oldest segment went.
    SpoolFull,
    /// The spool could not be written (disk full, I/O error).
    SpoolUnwritable,
    /// A spooled record was cut short or damaged (a crash mid-write).
    Corrupt,
    /// The shipper's queue was full (it was busy with a SIEM that answers slowly, or not at
    /// all, while events kept coming): the event went to the audit file only.
    QueueFull,
}

impl DropReason {
    const ALL: [DropReason; 4] = [
        DropReason::SpoolFull,
        DropReason::SpoolUnwritable,
        DropReason::Corrupt,
        DropReason::QueueFull,
    ];

    fn label(self) -> &'static str {
        match self {
            DropReason::SpoolFull => "spool_full",
            DropReason::SpoolUnwritable => "spool_unwritable",
            DropReason::Corrupt => "corrupt",
            DropReason::QueueFull => "queue_full",
        }
    }
}

/// The shipper's counters (written by its thread only; read on scrape).
#[derive(Debug, Default)]
pub struct ExportMetrics {
    /// Events the SIEM accepted (2xx).
    pub shipped: AtomicU64,
    /// POSTs that failed and will be tried again.
    pub retried: AtomicU64,
    /// Events written to the spool.
    pub spooled: AtomicU64,
    /// Events dropped, by [`DropReason`].
    dropped: [AtomicU64; 4],
    /// Bytes in the spool now.
    pub spool_bytes: AtomicU64,
    /// SIEM answers by latency bucket (the last is +Inf).
    latency_buckets: [AtomicU64; 12],
    latency_sum_us: AtomicU64,
}

impl ExportMetrics {
    /// Events dropped for `reason` so far.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        DropReason::ALL
            .iter()
            .position(|r| *r == reason)
            .map_or(0, |i| self.dropped[i].load(Relaxed))
    }

    /// Counts `n` events dropped for `reason`.
    pub fn count_dropped(&self, reason: DropReason, n: u64) {
        let i = DropReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.dropped[i].fetch_add(n, Relaxed);
    }

    /// Records how long the SIEM took to answer one POST.
    pub fn observe_latency(&self, took: Duration) {
        let ms = took.as_millis() as u64;
        let i = LATENCY_BOUNDS_MS
            .iter()
            .position(|b| ms <= *b)
            .unwrap_or(LATENCY_BOUNDS_MS.len());
        self.latency_buckets[i].fetch_add(1, Relaxed);
        self.latency_sum_us
            .fetch_add(took.as_micros() as u64, Relaxed);
    }

    /// Prometheus exposition of these metrics.
    pub fn render(&self, out: &mut String) {
        let metric = |out: &mut String, name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        metric(
            out,
            "mcp_guard_audit_export_events_shipped_total",
            "counter",
            "Audit events the SIEM accepted.",
            self.shipped.load(Relaxed),
        );
        metric(
            out,
            "mcp_guard_audit_export_retries_total",
            "counter",
            "SIEM POSTs that failed and are tried again (with backoff).",
            self.retried.load(Relaxed),
        );
        metric(
            out,
            "mcp_guard_audit_export_events_spooled_total",
            "counter",
            "Audit events written to the spool while the SIEM was unreachable.",
            self.spooled.load(Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP mcp_guard_audit_export_events_dropped_total Audit events that will never reach the SIEM, by reason.\n# TYPE mcp_guard_audit_export_events_dropped_total counter"
        );
        for (i, r) in DropReason::ALL.iter().enumerate() {
            let _ = writeln!(
                out,
                "mcp_guard_audit_export_events_dropped_total{{reason=\"{}\"}} {}",
                r.label(),
                self.dropped[i].load(Relaxed)
            );
        }
        metric(
            out,
            "mcp_guard_audit_export_spool_bytes",
            "gauge",
            "Bytes waiting in the audit spool.",
            self.spool_bytes.load(Relaxed),
        );
        out.push_str("# HELP mcp_guard_audit_export_duration_seconds Time the SIEM took to answer a POST.\n# TYPE mcp_guard_audit_export_duration_seconds histogram\n");
        let mut cumulative = 0;
        for (i, b) in LATENCY_BOUNDS_MS.iter().enumerate() {
            cumulative += self.latency_buckets[i].load(Relaxed);
            let _ = writeln!(
                out,
                "mcp_guard_audit_export_duration_seconds_bucket{{le=\"{}\"}} {cumulative}",
                *b as f64 / 1000.0
            );
        }
        cumulative += self.latency_buckets[LATENCY_BOUNDS_MS.len()].load(Relaxed);
        let _ = writeln!(
            out,
            "mcp_guard_audit_export_duration_seconds_bucket{{le=\"+Inf\"}} {cumulative}\nmcp_guard_audit_export_duration_seconds_sum {}\nmcp_guard_audit_export_duration_seconds_count {cumulative}",
            self.latency_sum_us.load(Relaxed) as f64 / 1e6
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(extra: &str) -> String {
        format!(
            "{{\"timestamp\":\"2026-01-01T00:00:00.123Z\",\"event_id\":\"e1\",\"request_id\":\"r\",\"identity\":\"alice\",\"auth_method\":\"api_key\",\"client_addr\":\"127.0.0.1\",\"method\":\"tools/call\",\"decision\":\"deny\",\"reason\":\"tool_denied\",\"status\":403,\"upstream\":\"default\",\"latency_us\":7{extra}}}"
        )
    }

    #[test]
    fn timestamps_parse_back_to_the_epoch() {
        assert_eq!(
            parse_rfc3339_ms("2026-01-01T00:00:00.123Z"),
            Some(1_767_225_600_123)
        );
        assert_eq!(
            parse_rfc3339_ms("2000-02-29T00:00:00.000Z"),
            Some(951_782_400_000)
        );
        let now = std::time::SystemTime::now();
        let ms = now
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert_eq!(parse_rfc3339_ms(&super::super::rfc3339(now)), Some(ms));
        for bad in [
            "",
            "2026-13-01T00:00:00.000Z",
            "2026-01-01 00:00:00.000Z",
            "x",
        ] {
            assert_eq!(parse_rfc3339_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn every_format_frames_a_batch() {
        let events = vec![event(""), event(",\"tool\":\"add\"")];
        let (ct, body) = render(ExportFormat::Json, &events);
        assert_eq!(ct, "application/json");
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v.as_array().unwrap().len(), 2);
        let (_, body) = render(ExportFormat::SplunkHec, &events);
        let objs: Vec<Value> = serde_json::Deserializer::from_slice(&body)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(objs.len(), 2);
        assert_eq!(objs[0]["time"].as_f64().unwrap(), 1_767_225_600.123);
        assert_eq!(objs[1]["event"]["tool"], "add");
        let (ct, body) = render(ExportFormat::ElasticBulk, &events);
        assert_eq!(ct, "application/x-ndjson");
        let text = String::from_utf8(body).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        let action: Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(action["create"]["_id"], "e1");
        let (_, body) = render(ExportFormat::Cef, &events);
        let text = String::from_utf8(body).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(text.starts_with("CEF:0|mcp-guard|mcp-guard|"), "{text}");
        assert!(text.contains("|deny|tools/call|6|rt=1767225600123 externalId=e1 act=deny"));
        assert!(text.contains("cs2Label=tool cs2=add"), "{text}");
    }

    #[test]
    fn hostile_fields_cannot_break_any_framing() {
        let evil = "a\nCEF:0|x|y|1|2|3|10|src=6.6.6.6\r\n{\"create\":{}}\n=|\\\u{2028}\u{0}";
        let line = event(&format!(
            ",\"tool\":{},\"client_request_id\":{}",
            Value::String(evil.into()),
            Value::String(evil.into())
        ));
        let events = vec![line.clone(), line];
        for format in [
            ExportFormat::Json,
            ExportFormat::SplunkHec,
            ExportFormat::ElasticBulk,
        ] {
            let (_, body) = render(format, &events);
            let text = String::from_utf8(body).unwrap();
            // Every JSON value decodes back to the hostile text, and no raw line break
            // exists outside the framing's own.
            let values: Vec<Value> = serde_json::Deserializer::from_str(&text)
                .into_iter()
                .map(Result::unwrap)
                .collect();
            let n = values.len();
            assert!(n == 1 || n == 2 || n == 4, "{format:?}: {n}");
            assert!(text.contains(&Value::String(evil.into()).to_string()));
            let breaks = text.matches('\n').count();
            let want = if format == ExportFormat::ElasticBulk {
                4
            } else {
                0
            };
            assert_eq!(breaks, want, "{format:?}");
        }
        let (_, body) = render(ExportFormat::Cef, &events);
        let text = String::from_utf8(body).unwrap();
        assert_eq!(text.matches('\n').count(), 2, "one line per event: {text}");
        for line in text.lines() {
            // Seven unescaped pipes end the header (the hostile method would add more if
            // header escaping failed); in the extension every `=` of a value is escaped, so
            // the only keys are the gateway's and the injected `src=` is not one.
            let unescaped = |text: &str, ch: char| -> Vec<usize> {
                text.char_indices()
                    .filter(|(i, c)| *c == ch && !text[..*i].ends_with('\\'))
                    .map(|(i, _)| i)
                    .collect()
            };
            let pipes = unescaped(line, '|');
            assert!(pipes.len() >= 7, "{line}");
            let ext = &line[pipes[6] + 1..];
            let keys: Vec<&str> = unescaped(ext, '=')
                .into_iter()
                .map(|i| ext[..i].rsplit(' ').next().unwrap())
                .collect();
            assert_eq!(keys.iter().filter(|k| **k == "src").count(), 1, "{line}");
            assert!(ext.contains("src=127.0.0.1"), "{line}");
            assert!(
                keys.iter()
                    .all(|k| k.chars().all(|c| c.is_ascii_alphanumeric())),
                "{keys:?}"
            );
            assert!(
                line.contains("cs2=a\\nCEF:0|x|y|1|2|3|10|src\\=6.6.6.6\\r\\n"),
                "{line}"
            );
            assert!(!line.contains('\u{0}') && !line.contains('\u{2028}'));
        }
    }

    #[test]
    fn huge_values_are_cut_and_marked() {
        let huge = "x".repeat(100_000);
        let args = format!("{{\"blob\":\"{huge}\"}}");
        let line = event(&format!(
            ",\"tool\":\"{}\",\"arguments\":{args}",
            "é".repeat(5000)
        ));
        let bounded = bound_event(&line).unwrap();
        assert!(
            bounded.len() < MAX_ARGUMENTS_BYTES + 4 * MAX_FIELD_BYTES,
            "{}",
            bounded.len()
        );
        let v: Value = serde_json::from_str(&bounded).unwrap();
        assert_eq!(v["truncated"], true);
        assert!(
            v["arguments"]
                .as_str()
                .unwrap()
                .starts_with("{\"blob\":\"xxx")
        );
        assert!(v["tool"].as_str().unwrap().len() <= MAX_FIELD_BYTES + 3);
        assert_eq!(v["identity"], "alice");
        let small = event("");
        assert_eq!(bound_event(&small).unwrap(), small);
        for format in [
            ExportFormat::Json,
            ExportFormat::SplunkHec,
            ExportFormat::ElasticBulk,
            ExportFormat::Cef,
        ] {
            let (_, body) = render(format, std::slice::from_ref(&bounded));
            assert!(body.len() < 32 * 1024, "{format:?}: {}", body.len());
        }
    }

    #[test]
    fn header_values_are_checked_without_being_repeated() {
        check_header("Authorization", "Splunk abc").unwrap();
        check_header("X-Api-Key", "k").unwrap();
        for (n, v) in [
            ("Authorization", "Splunk sekrit\r\nX-Evil: 1"),
            ("Bad Name", "sekrit"),
            ("", "sekrit"),
            ("Content-Length", "5"),
            ("host", "sekrit.example"),
            ("X", ""),
            ("X", "sekrit\u{0}b"),
        ] {
            let e = check_header(n, v).unwrap_err();
            assert!(!e.contains("sekrit"), "{e}");
        }
        let s = ExportSettings {
            url: IdpUrl::parse("http://127.0.0.1:9/x").unwrap(),
            format: ExportFormat::Json,
            batch_size: 1,
            interval: Duration::from_secs(1),
            headers: vec![("Authorization".into(), "Splunk sekrit-token".into())],
            spool_dir: "/tmp/x".into(),
            spool_max_bytes: 1 << 20,
            shutdown_grace: Duration::from_secs(1),
        };
        let shown = format!("{s:?}");
        assert!(
            shown.contains("Authorization") && !shown.contains("sekrit"),
            "{shown}"
        );
    }
}
