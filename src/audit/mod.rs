//! The audit trail: one JSON object per line for every decision.
//!
//! Workers hand events to their own bounded queue and never wait: a full queue drops the event
//! and counts it. One writer thread drains every worker's queue, serialises, and writes to the
//! file and/or stdout, and hands it to the SIEM shipper ([`ship`]) when `export_url` is set;
//! SIGHUP (log rotation) makes it reopen the file. The writer stamps each event with an
//! `event_id` (this run, the queue, the event's place in it) that a SIEM can deduplicate on.
//! Secrets never enter an event: identities are ids, credentials are never copied in.

pub mod export;
pub mod ship;
pub mod spool;

use crate::observe::metrics::Metrics;
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One decision.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    /// When the request arrived.
    pub time: SystemTime,
    /// The gateway's request id (also sent upstream and to the client).
    pub request_id: String,
    /// The client's own `X-Request-Id`, when it sent a printable one of at most 128 bytes.
    pub client_request_id: Option<String>,
    /// W3C trace id, if the request carried a traceparent.
    pub trace_id: Option<String>,
    /// The identity, when authentication succeeded.
    pub identity: Option<Arc<str>>,
    /// How it authenticated ("none" when it did not).
    pub auth_method: &'static str,
    /// The client's address.
    pub client: IpAddr,
    /// MCP method (or "stream", "delete", "batch", "" when unknown).
    pub method: String,
    /// "tool", "resource" or "prompt", with its name.
    pub target: Option<(&'static str, String)>,
    /// allow | deny | error
    pub decision: &'static str,
    /// Why, when not plainly allowed.
    pub reason: Option<&'static str>,
    /// HTTP status sent.
    pub status: u16,
    /// Which upstream (the route name; `default` for `[upstream]`).
    pub upstream: Arc<str>,
    /// Time to the end of the response (to the first byte for streams), µs.
    pub latency_us: u64,
    /// Tool arguments (raw JSON), only when `audit.include_arguments` is on.
    pub arguments: Option<String>,
    /// What the advanced-policy steps noted (a rule refusing an argument: its `pointer`,
    /// `check` and `rule`; a pinned tool that changed; the detectors a redaction fired): written
    /// as the JSON object `details`, name → JSON value (text, or a number where the fact is
    /// one), in order; never a secret or an argument's value.
    pub details: Vec<(&'static str, serde_json::Value)>,
    /// A digest of the client's session id (approval events: the session that answered).
    pub session: Option<String>,
}

/// Who sent a message whose upstream failed after the gateway had answered its request (a
/// legacy POST's `202`, an approved call's held stream): the client then gets the gateway's
/// error on its stream, and the trail records the failure as it records any call's.
pub struct LateFailure<'a> {
    /// The POST's (or the held call's) request id.
    pub request_id: &'a str,
    /// Who sent it.
    pub identity: &'a Arc<str>,
    /// How they authenticated.
    pub auth_method: &'static str,
    /// From where.
    pub client: IpAddr,
    /// The route it went to.
    pub upstream: &'a Arc<str>,
    /// When the message was taken (the line's latency runs from it).
    pub taken: std::time::Instant,
}

impl LateFailure<'_> {
    /// The line for one request (`method`, `target`) that got `e` in place of its answer.
    pub fn event(
        &self,
        method: &str,
        target: Option<&crate::mcp::jsonrpc::Target>,
        e: &crate::error::GatewayError,
    ) -> AuditEvent {
        use crate::mcp::jsonrpc::Target;
        AuditEvent {
            time: SystemTime::now(),
            request_id: self.request_id.to_string(),
            client_request_id: None,
            trace_id: None,
            identity: Some(self.identity.clone()),
            auth_method: self.auth_method,
            client: self.client,
            method: method.to_string(),
            target: target.map(|t| match t {
                Target::Tool(n) => ("tool", n.clone()),
                Target::Resource(n) => ("resource", n.clone()),
                Target::Prompt(n) => ("prompt", n.clone()),
            }),
            decision: "error",
            reason: Some(e.reason()),
            status: e.status(),
            upstream: self.upstream.clone(),
            latency_us: self.taken.elapsed().as_micros() as u64,
            arguments: None,
            details: Vec::new(),
            session: None,
        }
    }
}

impl AuditEvent {
    /// The JSON line (without the newline), without an event id.
    pub fn to_json(&self) -> String {
        self.to_json_with_id(None)
    }

    /// The JSON line (without the newline), with `event_id` when given.
    pub fn to_json_with_id(&self, event_id: Option<&str>) -> String {
        let mut o = String::with_capacity(384);
        self.write_json(&mut o, event_id);
        o
    }

    /// Appends the JSON line (without the newline) to `o`, written field by field: this runs
    /// once per decision on the writer thread, so it builds no JSON tree and goes through no
    /// `format!` machinery (which cost more than everything else here together).
    pub fn write_json(&self, o: &mut String, event_id: Option<&str>) {
        o.push_str("{\"timestamp\":\"");
        push_rfc3339(o, self.time);
        o.push('"');
        if let Some(id) = event_id {
            o.push_str(",\"event_id\":");
            json_str(o, id);
        }
        o.push_str(",\"request_id\":");
        json_str(o, &self.request_id);
        if let Some(c) = &self.client_request_id {
            o.push_str(",\"client_request_id\":");
            json_str(o, c);
        }
        if let Some(t) = &self.trace_id {
            o.push_str(",\"trace_id\":");
            json_str(o, t);
        }
        o.push_str(",\"identity\":");
        match &self.identity {
            Some(i) => json_str(o, i),
            None => o.push_str("null"),
        }
        o.push_str(",\"auth_method\":");
        json_str(o, self.auth_method);
        o.push_str(",\"client_addr\":\"");
        push_ip(o, self.client);
        o.push_str("\",\"method\":");
        json_str(o, &self.method);
        if let Some((kind, name)) = &self.target {
            o.push_str(",\"");
            o.push_str(kind);
            o.push_str("\":");
            json_str(o, name);
        }
        o.push_str(",\"decision\":");
        json_str(o, self.decision);
        if let Some(r) = self.reason {
            o.push_str(",\"reason\":");
            json_str(o, r);
        }
        o.push_str(",\"status\":");
        push_u64(o, u64::from(self.status));
        o.push_str(",\"upstream\":");
        json_str(o, &self.upstream);
        o.push_str(",\"latency_us\":");
        push_u64(o, self.latency_us);
        if let Some(s) = &self.session {
            o.push_str(",\"session\":");
            json_str(o, s);
        }
        if let Some(a) = &self.arguments {
            // Arguments were re-serialised by serde_json from the request: valid JSON.
            o.push_str(",\"arguments\":");
            o.push_str(a);
        }
        if !self.details.is_empty() {
            o.push_str(",\"details\":{");
            for (i, (k, v)) in self.details.iter().enumerate() {
                if i > 0 {
                    o.push(',');
                }
                json_str(o, k);
                o.push(':');
                match v {
                    serde_json::Value::String(t) => json_str(o, t),
                    other => o.push_str(&other.to_string()),
                }
            }
            o.push('}');
        }
        o.push('}');
    }
}

/// Appends `s` as a JSON string literal.
fn json_str(out: &mut String, s: &str) {
    use std::fmt::Write as _;
    out.push('"');
    // Almost every value (ids, names, addresses) needs no escape: one byte scan proves it,
    // without early exit so that it vectorizes. 0xE2 leads U+2028/U+2029, which are escaped for
    // consumers that treat them as line ends.
    let needs_escape = s.bytes().fold(false, |found, b| {
        found | (b < 0x20) | (b == b'"') | (b == b'\\') | (b == 0xE2)
    });
    if !needs_escape {
        out.push_str(s);
        out.push('"');
        return;
    }
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{2028}' || c == '\u{2029}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Appends `n` in decimal.
fn push_u64(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // Pushed as chars: the digits are ASCII, and a `from_utf8` per number cost more than the
    // number itself.
    out.extend(digits[at..].iter().map(|&d| char::from(d)));
}

/// Appends `n` as exactly `width` decimal digits (zero-padded; higher digits dropped).
fn push_padded(out: &mut String, mut n: u64, width: usize) {
    let mut digits = [b'0'; 20];
    for at in (0..width).rev() {
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.extend(digits[..width].iter().map(|&d| char::from(d)));
}

/// Appends an address as `Display` writes it (dotted quad by hand; IPv6 through `fmt`).
fn push_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                push_u64(out, u64::from(octet));
            }
        }
        IpAddr::V6(v6) => {
            use std::fmt::Write as _;
            let _ = write!(out, "{v6}");
        }
    }
}

/// RFC 3339 UTC with milliseconds, computed without a date library.
pub fn rfc3339(t: SystemTime) -> String {
    let mut out = String::with_capacity(24);
    push_rfc3339(&mut out, t);
    out
}

/// Appends [`rfc3339`]'s text to `out`.
fn push_rfc3339(out: &mut String, t: SystemTime) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil-from-days (proleptic Gregorian), valid for all dates after 1970.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = if month <= 2 { y + 1 } else { y };
    // Positive: `days` counts from 1970. Years past 9999 would lose digits, as `{:04}` would not;
    // no clock reads that.
    push_padded(out, year.max(0) as u64, 4);
    out.push('-');
    push_padded(out, month as u64, 2);
    out.push('-');
    push_padded(out, day as u64, 2);
    out.push('T');
    push_padded(out, h, 2);
    out.push(':');
    push_padded(out, m, 2);
    out.push(':');
    push_padded(out, s, 2);
    out.push('.');
    push_padded(out, u64::from(d.subsec_millis()), 3);
    out.push('Z');
}

/// A worker's end of its audit queue.
pub struct AuditSink {
    tx: Option<SyncSender<AuditEvent>>,
}

impl AuditSink {
    /// A sink that discards (auditing off).
    pub fn disabled() -> Self {
        Self { tx: None }
    }

    /// Whether events are wanted at all (so callers can skip building them).
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues an event; false when it was dropped (queue full).
    pub fn push(&self, ev: AuditEvent) -> bool {
        match &self.tx {
            None => true,
            Some(tx) => match tx.try_send(ev) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => false,
            },
        }
    }
}

/// Where the writer writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditOutput {
    /// JSON-lines file, appended.
    pub file: Option<PathBuf>,
    /// Also to stdout.
    pub stdout: bool,
    /// Also to a SIEM.
    pub export: Option<export::ExportSettings>,
}

/// Control handle of the writer thread.
pub struct AuditWriter {
    reopen: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    handle: Mutex<Option<std::thread::JoinHandle<()>>>,
    shipper: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl AuditWriter {
    /// Starts the writer for one queue per capacity in `queues` (each worker's, and any other
    /// thread's); returns it and the sinks, in the same order.
    pub fn start(
        output: AuditOutput,
        queues: &[usize],
        metrics: Arc<Metrics>,
    ) -> std::io::Result<(AuditWriter, Vec<AuditSink>)> {
        let mut sinks = Vec::with_capacity(queues.len());
        let mut rxs = Vec::with_capacity(queues.len());
        for &capacity in queues {
            let (tx, rx) = sync_channel(capacity);
            sinks.push(AuditSink { tx: Some(tx) });
            rxs.push(rx);
        }
        let file = match &output.file {
            Some(p) => Some(open(p)?),
            None => None,
        };
        let (ship, shipper) = match &output.export {
            Some(settings) => {
                let (tx, handle) =
                    ship::start(settings.clone(), metrics.global.audit_export.clone())?;
                (Some(tx), Some(handle))
            }
            None => (None, None),
        };
        let reopen = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (r2, s2) = (reopen.clone(), stop.clone());
        let handle = std::thread::Builder::new()
            .name("audit".into())
            .spawn(move || write_loop(rxs, output, file, ship, r2, s2, metrics))?;
        Ok((
            AuditWriter {
                reopen,
                stop,
                handle: Mutex::new(Some(handle)),
                shipper: Mutex::new(shipper),
            },
            sinks,
        ))
    }

    /// Reopens the file on the next pass (log rotation).
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Relaxed);
    }

    /// Drains what is queued and stops; the shipper then has the shutdown grace to hand the
    /// rest to the SIEM before it leaves it in the spool.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.lock().ok().and_then(|mut g| g.take()) {
            let _ = h.join();
        }
        if let Some(h) = self.shipper.lock().ok().and_then(|mut g| g.take()) {
            let _ = h.join();
        }
    }
}

/// Poll interval of the writer while events flow, and its ceiling when idle.
const MIN_IDLE_SLEEP: Duration = Duration::from_millis(1);
const MAX_IDLE_SLEEP: Duration = Duration::from_millis(50);

fn open(p: &PathBuf) -> std::io::Result<std::io::BufWriter<std::fs::File>> {
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Some(dir) = p.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)?;
    }
    // A new file is private to the gateway's user (0600, less any umask bits): it holds
    // identities, client addresses and possibly tool arguments. An existing file keeps the mode
    // the operator gave it (a log shipper's group may need to read it).
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(p)?;
    Ok(std::io::BufWriter::with_capacity(64 * 1024, f))
}

/// This run's part of every event id: random, so ids of different runs never meet.
fn run_id() -> String {
    let mut bytes = [0u8; 8];
    // Without randomness the clock still tells runs apart.
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        bytes = nanos.to_be_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn write_loop(
    rxs: Vec<Receiver<AuditEvent>>,
    output: AuditOutput,
    mut file: Option<std::io::BufWriter<std::fs::File>>,
    mut ship: Option<ship::ShipQueue>,
    reopen: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
) {
    let stdout = std::io::stdout();
    let mut line = String::with_capacity(512);
    let mut id = String::with_capacity(48);
    let run = run_id();
    let mut sequence = vec![0u64; rxs.len()];
    let mut idle_sleep = MIN_IDLE_SLEEP;
    // Whether the last hand-off to the shipper found its queue full (logged once per episode).
    let mut ship_full = false;
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        if reopen.swap(false, Ordering::Relaxed)
            && let Some(p) = &output.file
        {
            if let Some(f) = file.as_mut() {
                let _ = f.flush();
            }
            match open(p) {
                Ok(f) => {
                    file = Some(f);
                    tracing::info!(target: "mcp_guard::audit", "audit file reopened: {}", p.display());
                }
                Err(e) => {
                    tracing::error!(target: "mcp_guard::audit", "cannot reopen audit file {}: {e}", p.display())
                }
            }
        }
        let mut wrote = 0u64;
        for (queue, rx) in rxs.iter().enumerate() {
            // Bounded per pass so one busy worker cannot starve the others' queues.
            for ev in rx.try_iter().take(4096) {
                sequence[queue] += 1;
                id.clear();
                id.push_str(&run);
                id.push('-');
                push_u64(&mut id, queue as u64);
                id.push('-');
                push_u64(&mut id, sequence[queue]);
                line.clear();
                ev.write_json(&mut line, Some(&id));
                line.push('\n');
                if let Some(f) = file.as_mut()
                    && let Err(e) = f.write_all(line.as_bytes())
                {
                    tracing::error!(target: "mcp_guard::audit", "audit write failed: {e}");
                }
                if output.stdout {
                    let _ = stdout.lock().write_all(line.as_bytes());
                }
                // Never waits for the shipper: one stuck on a SIEM that does not answer would
                // stop the file too, and the workers' queues would then drop events that are
                // in neither. A full hand-off drops the event for the SIEM only.
                if let Some(queue) = &ship {
                    match queue.offer(line[..line.len() - 1].to_string()) {
                        Ok(()) => ship_full = false,
                        Err(ship::NotTaken::Full) => {
                            metrics
                                .global
                                .audit_export
                                .count_dropped(export::DropReason::QueueFull, 1);
                            if !ship_full {
                                tracing::warn!(target: "mcp_guard::audit", "the SIEM shipper is behind (its queue of {} events or {} MiB is full): events are dropped for the SIEM, not for the audit file", ship::CHANNEL_CAPACITY, ship::QUEUED_BYTES >> 20);
                                ship_full = true;
                            }
                        }
                        Err(ship::NotTaken::Gone) => {
                            tracing::error!(target: "mcp_guard::audit", "the SIEM shipper stopped; events are no longer shipped");
                            ship = None;
                        }
                    }
                }
                wrote += 1;
            }
        }
        if wrote > 0 {
            metrics
                .global
                .audit_written
                .fetch_add(wrote, Ordering::Relaxed);
            idle_sleep = MIN_IDLE_SLEEP;
        } else {
            if let Some(f) = file.as_mut() {
                let _ = f.flush();
            }
            if output.stdout {
                let _ = stdout.lock().flush();
            }
            if stopping {
                return;
            }
            // Workers never wake this thread (that would cost them a syscall per event), so it
            // polls: often while events flow, backing off to 50 ms when the gateway is idle.
            std::thread::sleep(idle_sleep);
            idle_sleep = (idle_sleep * 2).min(MAX_IDLE_SLEEP);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = UNIX_EPOCH + Duration::from_millis(1_767_225_600_123); // 2026-01-01T00:00:00.123Z
        assert_eq!(rfc3339(t), "2026-01-01T00:00:00.123Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn hand_written_numbers_and_addresses_read_as_display_writes_them() {
        for n in [0u64, 7, 10, 99, 100, 65_535, u64::MAX] {
            let mut s = String::new();
            push_u64(&mut s, n);
            assert_eq!(s, n.to_string());
        }
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "255.255.255.255",
            "::1",
            "2001:db8::8:800:200c:417a",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut s = String::new();
            push_ip(&mut s, ip);
            assert_eq!(s, ip.to_string());
        }
    }

    #[test]
    fn strings_needing_no_escape_and_strings_needing_one_both_come_out_valid() {
        for s in [
            "plain",
            "",
            "caf\u{e9}",
            "a\u{2028}b",
            "\u{2029}",
            "\u{20ac} euro",
            "q\"",
            "b\\",
            "\u{7f}",
        ] {
            let mut out = String::new();
            json_str(&mut out, s);
            assert_eq!(serde_json::from_str::<String>(&out).unwrap(), s);
            assert!(
                !out.contains('\u{2028}') && !out.contains('\u{2029}'),
                "{out}"
            );
        }
    }

    #[test]
    fn events_serialise_to_valid_escaped_json() {
        let mut ev = sample();
        ev.target = Some(("tool", "we\"ird\n\u{1}name".into()));
        ev.arguments = Some(r#"{"path":"/x"}"#.into());
        let v: serde_json::Value = serde_json::from_str(&ev.to_json()).unwrap();
        assert_eq!(v["tool"], "we\"ird\n\u{1}name");
        assert_eq!(v["arguments"]["path"], "/x");
        assert_eq!(v["identity"], "alice");
        assert_eq!(v["status"], 200);
        assert_eq!(v["request_id"], "r");
        assert_eq!(v["client_request_id"], "client\nid");
        assert!(!ev.to_json().contains('\n'));
    }

    fn sample() -> AuditEvent {
        AuditEvent {
            time: SystemTime::now(),
            request_id: "r".into(),
            client_request_id: Some("client\nid".into()),
            trace_id: None,
            identity: Some(Arc::from("alice")),
            auth_method: "api_key",
            client: "127.0.0.1".parse().unwrap(),
            method: "tools/call".into(),
            target: None,
            decision: "allow",
            reason: None,
            status: 200,
            upstream: "default".into(),
            latency_us: 1,
            arguments: None,
            details: Vec::new(),
            session: None,
        }
    }

    #[test]
    fn a_siem_that_never_answers_costs_the_siem_events_never_the_files() {
        // Red team (fleet, F1): the writer waited for a shipper stuck 10 s on a POST that
        // never got its answer; the file stopped, the workers' queues filled, and events were
        // then in neither. The listener below takes connections (the kernel's backlog) and
        // never answers.
        let dir = tempfile::tempdir().unwrap();
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/ingest", silent.local_addr().unwrap());
        let settings = export::ExportSettings {
            url: crate::auth::fetch::IdpUrl::parse(&url).unwrap(),
            format: export::ExportFormat::Json,
            batch_size: 100,
            interval: Duration::from_millis(10),
            headers: Vec::new(),
            spool_dir: dir.path().join("spool"),
            spool_max_bytes: 1 << 30,
            shutdown_grace: Duration::from_secs(1),
        };
        let path = dir.path().join("audit.jsonl");
        let metrics = Metrics::new(1);
        let events = ship::CHANNEL_CAPACITY + 20_000;
        let (_writer, sinks) = AuditWriter::start(
            AuditOutput {
                file: Some(path.clone()),
                stdout: false,
                export: Some(settings),
            },
            &[events],
            metrics.clone(),
        )
        .unwrap();
        for _ in 0..events {
            assert!(sinks[0].push(sample()));
        }
        // Well within the 10 s a POST may take: the file must not wait for it.
        let until = std::time::Instant::now() + Duration::from_secs(8);
        loop {
            let lines = std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .count();
            if lines == events {
                break;
            }
            assert!(
                std::time::Instant::now() < until,
                "the file holds {lines} of {events} events"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let export = &metrics.global.audit_export;
        assert!(
            export.dropped(export::DropReason::QueueFull) >= 20_000 - 1_000,
            "{} dropped for the SIEM",
            export.dropped(export::DropReason::QueueFull)
        );
        // The writer is left running: stopping it would wait for the stuck POST.
    }

    #[test]
    fn details_is_one_object_of_json_values() {
        let mut e = sample();
        e.details = vec![
            ("pointer", serde_json::Value::from("/a\"b\u{2028}")),
            ("check", serde_json::Value::from("max")),
            ("rule", serde_json::Value::from(3)),
            ("redacted", serde_json::Value::from("jwt=1")),
        ];
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v["details"]["pointer"], "/a\"b\u{2028}");
        assert_eq!(v["details"]["rule"], 3);
        assert_eq!(v["details"]["redacted"], "jwt=1");
        assert!(v.get("detail").is_none());
        assert!(!e.to_json().contains('\u{2028}'));
        let bounded = crate::audit::export::bound_event(&e.to_json()).unwrap();
        let b: serde_json::Value = serde_json::from_str(&bounded).unwrap();
        assert_eq!(b["details"]["rule"], 3);
    }

    #[test]
    fn a_new_audit_file_is_private_and_an_existing_one_keeps_its_mode() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let new = dir.path().join("logs/audit.jsonl");
        open(&new).unwrap();
        assert_eq!(mode(&new), 0o600);
        let existing = dir.path().join("shipped.jsonl");
        std::fs::write(&existing, "").unwrap();
        std::fs::set_permissions(&existing, std::fs::Permissions::from_mode(0o640)).unwrap();
        open(&existing).unwrap();
        assert_eq!(mode(&existing), 0o640);
    }

    #[test]
    fn full_queue_drops_instead_of_blocking() {
        let (tx, _rx) = sync_channel(1);
        let sink = AuditSink { tx: Some(tx) };
        let ev = sample();
        assert!(sink.push(ev.clone()));
        assert!(!sink.push(ev));
    }
}
