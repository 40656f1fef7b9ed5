//! The span exporter: a thread of its own that drains the workers' bounded span queue, encodes
//! batches as an OTLP/HTTP protobuf `ExportTraceServiceRequest`, and POSTs them with
//! `auth::fetch`'s blocking client. Workers never wait on it: a full queue drops the span and
//! counts it.
//!
//! The protobuf is written by hand from the field numbers of opentelemetry-proto's
//! `collector/trace/v1/trace_service.proto`, `trace/v1/trace.proto`, `common/v1/common.proto`
//! and `resource/v1/resource.proto`: the handful of messages needed do not justify a code
//! generator and its dependencies. The tests decode the output with the official definitions.

use super::trace::{SpanRecord, Value};
use crate::auth::fetch::IdpUrl;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

/// Spans waiting for the exporter, across workers.
pub const QUEUE_CAPACITY: usize = 8192;
/// Most spans in one POST.
const BATCH: usize = 512;
/// Longest a finished span waits for its batch to fill.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Deadline of one POST to the collector.
const POST_TIMEOUT: Duration = Duration::from_secs(10);

/// The exporter's counters.
#[derive(Debug, Default)]
pub struct TraceMetrics {
    /// Spans the collector accepted.
    pub exported: AtomicU64,
    /// Spans in batches the collector refused or could not be reached for.
    pub failed: AtomicU64,
    /// Spans dropped because the queue was full.
    pub dropped: AtomicU64,
}

impl TraceMetrics {
    /// Appends the Prometheus exposition.
    pub fn render(&self, out: &mut String) {
        for (name, help, v) in [
            (
                "mcp_guard_trace_spans_exported_total",
                "Spans the OTLP collector accepted.",
                &self.exported,
            ),
            (
                "mcp_guard_trace_spans_failed_total",
                "Spans lost because the OTLP collector refused their batch or could not be reached.",
                &self.failed,
            ),
            (
                "mcp_guard_trace_spans_dropped_total",
                "Spans dropped because the exporter's queue was full.",
                &self.dropped,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Relaxed)
            );
        }
    }
}

/// The workers' end of the exporter.
pub struct Tracer {
    tx: SyncSender<SpanRecord>,
    metrics: Arc<TraceMetrics>,
    stop: Arc<AtomicBool>,
    handle: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Tracer {
    /// Starts the exporter thread.
    pub fn start(
        endpoint: IdpUrl,
        service_name: Arc<str>,
        metrics: Arc<TraceMetrics>,
    ) -> std::io::Result<Tracer> {
        let (tx, rx) = sync_channel(QUEUE_CAPACITY);
        let stop = Arc::new(AtomicBool::new(false));
        let (m, s) = (metrics.clone(), stop.clone());
        let handle = std::thread::Builder::new()
            .name("otlp".into())
            .spawn(move || export_loop(rx, endpoint, service_name, m, s))?;
        Ok(Tracer {
            tx,
            metrics,
            stop,
            handle: std::sync::Mutex::new(Some(handle)),
        })
    }

    /// Queues a finished span; never blocks (a full queue drops it and counts).
    pub fn push(&self, span: SpanRecord) {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.tx.try_send(span) {
            self.metrics.dropped.fetch_add(1, Relaxed);
        }
    }

    /// Exports what is queued and stops the thread.
    pub fn stop(&self) {
        self.stop.store(true, Relaxed);
        if let Some(h) = self.handle.lock().ok().and_then(|mut h| h.take()) {
            let _ = h.join();
        }
    }
}

fn export_loop(
    rx: Receiver<SpanRecord>,
    endpoint: IdpUrl,
    service_name: Arc<str>,
    metrics: Arc<TraceMetrics>,
    stop: Arc<AtomicBool>,
) {
    let mut batch: Vec<SpanRecord> = Vec::with_capacity(BATCH);
    let mut first_at: Option<Instant> = None;
    loop {
        let wait = first_at.map_or(Duration::from_millis(200), |t| {
            FLUSH_EVERY.saturating_sub(t.elapsed())
        });
        let stopping = stop.load(Relaxed);
        match rx.recv_timeout(if stopping { Duration::ZERO } else { wait }) {
            Ok(span) => {
                first_at.get_or_insert_with(Instant::now);
                batch.push(span);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                send(&endpoint, &service_name, &metrics, &mut batch);
                return;
            }
        }
        let due = first_at.is_some_and(|t| t.elapsed() >= FLUSH_EVERY);
        if batch.len() >= BATCH || (due && !batch.is_empty()) {
            send(&endpoint, &service_name, &metrics, &mut batch);
            first_at = None;
        }
        if stopping && rx.try_recv().is_err() {
            send(&endpoint, &service_name, &metrics, &mut batch);
            return;
        }
    }
}

/// POSTs one batch; a failure loses it (counted): spans are diagnostics, not a record that
/// must survive, and a dead collector must not make the queue back up into drops for longer
/// than one POST timeout.
fn send(endpoint: &IdpUrl, service: &str, metrics: &TraceMetrics, batch: &mut Vec<SpanRecord>) {
    if batch.is_empty() {
        return;
    }
    let body = encode_request(service, batch);
    let n = batch.len() as u64;
    batch.clear();
    match crate::auth::fetch::post_for_status(
        endpoint,
        &[],
        "application/x-protobuf",
        &body,
        POST_TIMEOUT,
    ) {
        Ok(status) if (200..300).contains(&status) => {
            metrics.exported.fetch_add(n, Relaxed);
        }
        Ok(status) => {
            metrics.failed.fetch_add(n, Relaxed);
            tracing::warn!(target: "mcp_guard::trace", "OTLP collector answered {status}; {n} spans lost");
        }
        Err(e) => {
            metrics.failed.fetch_add(n, Relaxed);
            tracing::warn!(target: "mcp_guard::trace", "OTLP export failed: {e}; {n} spans lost");
        }
    }
}

// Protobuf wire format: a key is (field << 3 | wire type).
const VARINT: u64 = 0;
const FIXED64: u64 = 1;
const LEN: u64 = 2;
const FIXED32: u64 = 5;

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(out: &mut Vec<u8>, field: u64, wire: u64) {
    varint(out, field << 3 | wire);
}

fn bytes_field(out: &mut Vec<u8>, field: u64, b: &[u8]) {
    key(out, field, LEN);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// A length-delimited sub-message written by `body`.
fn message(out: &mut Vec<u8>, field: u64, body: impl FnOnce(&mut Vec<u8>)) {
    let mut inner = Vec::new();
    body(&mut inner);
    bytes_field(out, field, &inner);
}

/// `KeyValue { key = 1; AnyValue value = 2 }`, `AnyValue { string_value = 1; int_value = 3 }`.
fn attribute(out: &mut Vec<u8>, field: u64, k: &str, v: &Value) {
    message(out, field, |kv| {
        bytes_field(kv, 1, k.as_bytes());
        message(kv, 2, |any| match v {
            Value::Str(s) => bytes_field(any, 1, s.as_bytes()),
            Value::Int(i) => {
                key(any, 3, VARINT);
                varint(any, *i as u64);
            }
        });
    });
}

/// `ExportTraceServiceRequest { repeated ResourceSpans resource_spans = 1 }` with one
/// resource (this service) and one scope (mcp-guard).
pub fn encode_request(service: &str, spans: &[SpanRecord]) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + spans.len() * 512);
    message(&mut out, 1, |rs| {
        // ResourceSpans.resource = 1: Resource { attributes = 1 }
        message(rs, 1, |res| {
            attribute(res, 1, "service.name", &Value::Str(service.into()));
            attribute(
                res,
                1,
                "service.version",
                &Value::Str(env!("CARGO_PKG_VERSION").into()),
            );
        });
        // ResourceSpans.scope_spans = 2: ScopeSpans { scope = 1; spans = 2 }
        message(rs, 2, |ss| {
            message(ss, 1, |scope| {
                bytes_field(scope, 1, b"mcp-guard");
                bytes_field(scope, 2, env!("CARGO_PKG_VERSION").as_bytes());
            });
            for span in spans {
                message(ss, 2, |s| encode_span(s, span));
            }
        });
    });
    out
}

/// `Span`: trace_id = 1, span_id = 2, trace_state = 3, parent_span_id = 4, name = 5,
/// kind = 6, start_time_unix_nano = 7, end_time_unix_nano = 8, attributes = 9, status = 15,
/// flags = 16.
fn encode_span(out: &mut Vec<u8>, span: &SpanRecord) {
    bytes_field(out, 1, &span.trace_id);
    bytes_field(out, 2, &span.span_id);
    if let Some(ts) = &span.tracestate {
        bytes_field(out, 3, ts.as_bytes());
    }
    if let Some(p) = &span.parent {
        bytes_field(out, 4, p);
    }
    bytes_field(out, 5, span.name.as_bytes());
    key(out, 6, VARINT);
    varint(out, 2); // SPAN_KIND_SERVER
    key(out, 7, FIXED64);
    out.extend_from_slice(&span.start_unix_nanos.to_le_bytes());
    key(out, 8, FIXED64);
    out.extend_from_slice(&span.end_unix_nanos.to_le_bytes());
    for (k, v) in &span.attributes {
        attribute(out, 9, k, v);
    }
    if span.error {
        // Status { code = 3 }: STATUS_CODE_ERROR = 2.
        message(out, 15, |st| {
            key(st, 3, VARINT);
            varint(st, 2);
        });
    }
    // flags = 16: the sampled trace flag (bit 0), and bits 8-9 saying whether the parent is
    // remote (a span with a parent here always has a remote one).
    key(out, 16, FIXED32);
    let flags: u32 = 1 | if span.parent.is_some() { 0x300 } else { 0x100 };
    out.extend_from_slice(&flags.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_keys_follow_the_wire_format() {
        let mut v = Vec::new();
        varint(&mut v, 300);
        assert_eq!(v, [0xac, 0x02]);
        let mut k = Vec::new();
        key(&mut k, 16, FIXED32);
        assert_eq!(k, [0x85, 0x01]);
        let mut neg = Vec::new();
        attribute(&mut neg, 9, "n", &Value::Int(-1));
        // A negative int64 is ten varint bytes.
        assert_eq!(neg.len(), 2 + 3 + 2 + 11);
    }

    #[test]
    fn an_empty_batch_still_encodes_a_resource() {
        let b = encode_request("svc", &[]);
        assert_eq!(b[0], 0x0a); // field 1, length-delimited
        assert!(b.windows(3).any(|w| w == b"svc"));
    }
}
