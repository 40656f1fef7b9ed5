//! Metric shards and their Prometheus exposition.
//!
//! Each worker owns one [`WorkerMetrics`]: plain atomics that only that worker writes (so no
//! cache line is shared on the request path) and that the admin thread sums on scrape, plus an
//! hdrhistogram the worker records into locally and publishes a copy of every half second.
//! Label values come from fixed tables, so a hostile client cannot grow the series count.

use crate::upstream::router::DropReason;
use arc_swap::ArcSwap;
use hdrhistogram::Histogram;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

/// MCP method labels; anything else is "other".
pub const METHODS: &[&str] = &[
    "initialize",
    "ping",
    "tools/list",
    "tools/call",
    "resources/list",
    "resources/read",
    "resources/templates/list",
    "resources/subscribe",
    "resources/unsubscribe",
    "prompts/list",
    "prompts/get",
    "completion/complete",
    "logging/setLevel",
    "notification",
    "response",
    "batch",
    "stream",
    "delete",
    "other",
    "none",
];

/// The MCP request methods among [`METHODS`] (the labels after them are the gateway's own).
pub const MCP_METHODS: &[&str] = METHODS.split_at(13).0;

/// Index of a method label.
pub fn method_index(method: &str) -> usize {
    if let Some(i) = MCP_METHODS.iter().position(|m| *m == method) {
        return i;
    }
    if method.starts_with("notifications/") {
        return 13;
    }
    18
}

/// Label index for client responses.
pub const M_RESPONSE: usize = 14;
/// Label index for batches.
pub const M_BATCH: usize = 15;
/// Label index for GET streams.
pub const M_STREAM: usize = 16;
/// Label index for DELETE.
pub const M_DELETE: usize = 17;
/// Label index for requests that never got as far as a JSON-RPC method.
pub const M_NONE: usize = 19;

/// Status labels; anything else is "other".
pub const STATUSES: &[u16] = &[
    200, 202, 204, 400, 401, 403, 404, 405, 406, 408, 413, 415, 417, 429, 431, 500, 502, 503, 504,
    505,
];

fn status_index(status: u16) -> usize {
    STATUSES
        .iter()
        .position(|s| *s == status)
        .unwrap_or(STATUSES.len())
}

const N_STATUS: usize = 21;

/// Tool-label slots: slot 0 is "other", the rest are names the configuration mentions.
pub const TOOL_SLOTS: usize = 256;

fn tool_registry() -> &'static Mutex<Vec<String>> {
    static REGISTRY: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(vec!["other".to_string()]))
}

/// The metric slot of a tool name the config mentions; stable for the life of the process.
/// Called at config load (never on the request path); `None` once all slots are taken.
pub fn tool_label_slot(name: &str) -> Option<usize> {
    let mut reg = tool_registry().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(i) = reg.iter().position(|n| n == name) {
        return Some(i);
    }
    if reg.len() >= TOOL_SLOTS {
        return None;
    }
    reg.push(name.to_string());
    Some(reg.len() - 1)
}

/// Decision outcomes counted per tool.
/// (`would_deny`: a refusal computed in shadow mode; the call went ahead.)
pub const OUTCOMES: &[&str] = &["allow", "deny", "rate_limited", "would_deny"];
/// The [`OUTCOMES`] slot of `would_deny`.
pub const OUTCOME_WOULD_DENY: usize = 3;
/// Auth methods counted.
pub const AUTH_METHODS: &[&str] = &["anonymous", "api_key", "jwt", "none", "oauth", "mtls"];

/// One worker's metric shard.
pub struct WorkerMetrics {
    requests: Vec<[AtomicU64; N_STATUS]>,
    /// Open client connections on this worker.
    pub active_connections: AtomicI64,
    /// Connections accepted.
    pub connections_total: AtomicU64,
    /// Connections refused at `max_connections`.
    pub connections_refused: AtomicU64,
    /// Upstream failures (connect, reset, timeout, malformed response).
    pub upstream_errors: AtomicU64,
    /// Requests refused with 429.
    pub rate_limited: AtomicU64,
    /// Audit events dropped because this worker's queue was full.
    pub audit_dropped: AtomicU64,
    /// Failed-authentication audit events not written because their client address was over
    /// its allowance (a flood must not fill the disk).
    pub audit_suppressed: AtomicU64,
    /// Requests whose handling panicked (answered 500; the worker kept serving).
    pub panics: AtomicU64,
    /// Requests refused with 503 because the worker's in-flight body bytes were at their cap.
    pub bodies_refused: AtomicU64,
    /// Legacy HTTP+SSE sessions this worker owns (their streams are open on it).
    pub legacy_sessions: AtomicU64,
    /// Approval outcomes, in `approval::OUTCOMES` order.
    approvals: [AtomicU64; crate::mcp::approval::OUTCOMES.len()],
    auth: [[AtomicU64; 2]; AUTH_METHODS.len()],
    decisions: Vec<[AtomicU64; OUTCOMES.len()]>,
    /// Tool calls whose arguments a `[[tool_rules]]` check failed: [enforced, shadow].
    pub argument_refusals: [AtomicU64; 2],
    latency: ArcSwap<Histogram<u64>>,
}

impl WorkerMetrics {
    fn new() -> Self {
        Self {
            requests: (0..METHODS.len())
                .map(|_| std::array::from_fn(|_| AtomicU64::new(0)))
                .collect(),
            active_connections: AtomicI64::new(0),
            connections_total: AtomicU64::new(0),
            connections_refused: AtomicU64::new(0),
            upstream_errors: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            audit_dropped: AtomicU64::new(0),
            audit_suppressed: AtomicU64::new(0),
            panics: AtomicU64::new(0),
            bodies_refused: AtomicU64::new(0),
            legacy_sessions: AtomicU64::new(0),
            approvals: std::array::from_fn(|_| AtomicU64::new(0)),
            auth: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            decisions: (0..TOOL_SLOTS)
                .map(|_| std::array::from_fn(|_| AtomicU64::new(0)))
                .collect(),
            argument_refusals: std::array::from_fn(|_| AtomicU64::new(0)),
            latency: ArcSwap::from_pointee(new_histogram()),
        }
    }

    /// Counts an approval's outcome; `outcome` indexes `approval::OUTCOMES`.
    pub fn count_approval(&self, outcome: usize) {
        if let Some(c) = self.approvals.get(outcome) {
            c.fetch_add(1, Relaxed);
        }
    }

    /// Counts an authentication result; `method` indexes [`AUTH_METHODS`].
    pub fn count_auth(&self, method: usize, success: bool) {
        self.auth[method.min(AUTH_METHODS.len() - 1)][usize::from(!success)].fetch_add(1, Relaxed);
    }

    /// Counts a decision on a tool call; `outcome` indexes [`OUTCOMES`].
    pub fn count_decision(&self, tool_slot: usize, outcome: usize) {
        self.decisions[tool_slot.min(TOOL_SLOTS - 1)][outcome.min(OUTCOMES.len() - 1)]
            .fetch_add(1, Relaxed);
    }

    /// Counts one finished request.
    pub fn count_request(&self, method: usize, status: u16) {
        self.requests[method][status_index(status)].fetch_add(1, Relaxed);
    }

    /// Publishes the worker's local latency histogram for the admin thread.
    pub fn publish_latency(&self, local: &Histogram<u64>) {
        self.latency.store(Arc::new(local.clone()));
    }
}

/// A latency histogram in microseconds, 1 µs to 60 s, 2 significant digits (1 % error), small
/// enough (~30 KB) that workers can publish copies often.
pub fn new_histogram() -> Histogram<u64> {
    // Bounds are constants that hdrhistogram accepts; a failure here is a programming error.
    Histogram::new_with_bounds(1, 60_000_000, 2).expect("static histogram bounds are valid")
}

/// Process-wide counters written off the request path (control, stdio hub).
#[derive(Default)]
pub struct GlobalMetrics {
    /// stdio upstream restarts.
    pub upstream_restarts: AtomicU64,
    /// Per-session stdio children running.
    pub stdio_processes: AtomicU64,
    /// Initializes refused at a per-session process cap.
    pub stdio_process_cap_refusals: AtomicU64,
    /// Config reloads applied.
    pub reloads_ok: AtomicU64,
    /// Config reloads refused (old snapshot kept).
    pub reloads_failed: AtomicU64,
    /// Of those, reloads refused because they would have turned authentication off.
    pub reloads_auth_downgrade_refused: AtomicU64,
    /// Server-to-client messages dropped because a stream was full or absent.
    pub stream_messages_dropped: AtomicU64,
    /// Audit events written.
    pub audit_written: AtomicU64,
    /// The SIEM shipper's counters.
    pub audit_export: Arc<crate::audit::export::ExportMetrics>,
    /// The span exporter's counters.
    pub trace: Arc<crate::observe::otlp::TraceMetrics>,
    /// Messages the stdio router dropped, by [`DropReason::index`].
    pub stdio_dropped: [AtomicU64; DropReason::ALL.len()],
}

impl GlobalMetrics {
    /// Counts a message the stdio router dropped (foreign id, unknown token, ...).
    pub fn count_stdio_drop(&self, reason: DropReason) {
        self.stdio_dropped[reason.index()].fetch_add(1, Relaxed);
    }
}

/// All shards, for the admin thread.
pub struct Metrics {
    /// One per worker.
    pub workers: Vec<Arc<WorkerMetrics>>,
    /// Off-path counters.
    pub global: GlobalMetrics,
    /// Process start.
    pub started: Instant,
}

impl Metrics {
    /// Shards for `workers` workers.
    pub fn new(workers: usize) -> Arc<Self> {
        Arc::new(Self {
            workers: (0..workers)
                .map(|_| Arc::new(WorkerMetrics::new()))
                .collect(),
            global: GlobalMetrics::default(),
            started: Instant::now(),
        })
    }

    /// Prometheus text exposition (format 0.0.4).
    pub fn render(&self, upstream_ready: bool) -> String {
        let mut out = String::with_capacity(16 * 1024);
        out.push_str(
            "# HELP mcp_guard_requests_total Requests handled, by MCP method and HTTP status.\n",
        );
        out.push_str("# TYPE mcp_guard_requests_total counter\n");
        for (mi, method) in METHODS.iter().enumerate() {
            for si in 0..N_STATUS {
                let n: u64 = self
                    .workers
                    .iter()
                    .map(|w| w.requests[mi][si].load(Relaxed))
                    .sum();
                if n == 0 {
                    continue;
                }
                let status = STATUSES
                    .get(si)
                    .map_or_else(|| "other".to_string(), |s| s.to_string());
                let _ = writeln!(
                    out,
                    "mcp_guard_requests_total{{method=\"{method}\",status=\"{status}\"}} {n}"
                );
            }
        }
        let sum =
            |f: &dyn Fn(&WorkerMetrics) -> u64| -> u64 { self.workers.iter().map(|w| f(w)).sum() };
        let gauge_active: i64 = self
            .workers
            .iter()
            .map(|w| w.active_connections.load(Relaxed))
            .sum();
        write_metric(
            &mut out,
            "mcp_guard_active_connections",
            "gauge",
            "Open client connections.",
            gauge_active.max(0) as u64,
        );
        write_metric(
            &mut out,
            "mcp_guard_legacy_sse_sessions",
            "gauge",
            "Open legacy HTTP+SSE (2024-11-05) client sessions.",
            sum(&|w| w.legacy_sessions.load(Relaxed)),
        );
        write_metric(
            &mut out,
            "mcp_guard_connections_total",
            "counter",
            "Client connections accepted.",
            sum(&|w| w.connections_total.load(Relaxed)),
        );
        write_metric(
            &mut out,
            "mcp_guard_connections_refused_total",
            "counter",
            "Client connections refused at server.max_connections.",
            sum(&|w| w.connections_refused.load(Relaxed)),
        );
        write_metric(
            &mut out,
            "mcp_guard_upstream_errors_total",
            "counter",
            "Upstream failures: connect errors, resets, timeouts, malformed responses.",
            sum(&|w| w.upstream_errors.load(Relaxed)),
        );
        write_metric(
            &mut out,
            "mcp_guard_stdio_processes",
            "gauge",
            "Per-session stdio children (or legacy SSE upstream connections) running.",
            self.global.stdio_processes.load(Relaxed),
        );
        write_metric(
            &mut out,
            "mcp_guard_stdio_process_cap_refusals_total",
            "counter",
            "Initializes refused because a per-session process cap (total or per identity) was reached.",
            self.global.stdio_process_cap_refusals.load(Relaxed),
        );
        write_metric(
            &mut out,
            "mcp_guard_upstream_restarts_total",
            "counter",
            "stdio upstream process restarts.",
            self.global.upstream_restarts.load(Relaxed),
        );
        write_metric(
            &mut out,
            "mcp_guard_config_reloads_total",
            "counter",
            "Configuration reloads applied.",
            self.global.reloads_ok.load(Relaxed),
        );
        write_metric(
            &mut out,
            "mcp_guard_config_reload_failures_total",
            "counter",
            "Configuration reloads refused; the previous configuration kept serving.",
            self.global.reloads_failed.load(Relaxed),
        );
        write_metric(
            &mut out,
            "mcp_guard_stream_messages_dropped_total",
            "counter",
            "Server-to-client messages dropped (no open stream, or stream full).",
            self.global.stream_messages_dropped.load(Relaxed),
        );
        out.push_str("# HELP mcp_guard_stdio_messages_dropped_total Messages the shared stdio hub dropped rather than forward, by reason (ids a session does not own, unknown progress tokens, unroutable server-initiated requests, malformed lines).\n");
        out.push_str("# TYPE mcp_guard_stdio_messages_dropped_total counter\n");
        for r in DropReason::ALL {
            let _ = writeln!(
                out,
                "mcp_guard_stdio_messages_dropped_total{{reason=\"{}\"}} {}",
                r.label(),
                self.global.stdio_dropped[r.index()].load(Relaxed)
            );
        }
        write_metric(
            &mut out,
            "mcp_guard_upstream_ready",
            "gauge",
            "1 when the upstream is reachable.",
            u64::from(upstream_ready),
        );
        out.push_str("# HELP mcp_guard_auth_total Authentication results by method.\n");
        out.push_str("# TYPE mcp_guard_auth_total counter\n");
        for (mi, m) in AUTH_METHODS.iter().enumerate() {
            for (ri, r) in ["success", "failure"].iter().enumerate() {
                let n: u64 = self
                    .workers
                    .iter()
                    .map(|w| w.auth[mi][ri].load(Relaxed))
                    .sum();
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "mcp_guard_auth_total{{method=\"{m}\",result=\"{r}\"}} {n}"
                    );
                }
            }
        }
        out.push_str("# HELP mcp_guard_decisions_total Tool-call decisions by outcome and tool (tools the configuration names; others are \"other\").\n");
        out.push_str("# TYPE mcp_guard_decisions_total counter\n");
        let names = tool_registry()
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default();
        for (slot, name) in names.iter().enumerate() {
            for (oi, o) in OUTCOMES.iter().enumerate() {
                let n: u64 = self
                    .workers
                    .iter()
                    .map(|w| w.decisions[slot][oi].load(Relaxed))
                    .sum();
                if n > 0 {
                    let label = name.replace('\\', "\\\\").replace('"', "\\\"");
                    let _ = writeln!(
                        out,
                        "mcp_guard_decisions_total{{outcome=\"{o}\",tool=\"{label}\"}} {n}"
                    );
                }
            }
        }
        out.push_str(
            "# HELP mcp_guard_approvals_total Calls held for a person's approval, by outcome.\n",
        );
        out.push_str("# TYPE mcp_guard_approvals_total counter\n");
        for (i, o) in crate::mcp::approval::OUTCOMES.iter().enumerate() {
            let n: u64 = sum(&|w| w.approvals[i].load(Relaxed));
            let _ = writeln!(out, "mcp_guard_approvals_total{{outcome=\"{o}\"}} {n}");
        }
        crate::mcp::redact::render_metrics(&mut out);
        out.push_str("# HELP mcp_guard_argument_refusals_total Tool calls whose arguments failed a [[tool_rules]] check, by mode (shadow: audited as would_deny, forwarded).\n");
        out.push_str("# TYPE mcp_guard_argument_refusals_total counter\n");
        for (i, mode) in ["enforce", "shadow"].iter().enumerate() {
            let n = sum(&|w| w.argument_refusals[i].load(Relaxed));
            let _ = writeln!(
                out,
                "mcp_guard_argument_refusals_total{{mode=\"{mode}\"}} {n}"
            );
        }
        write_metric(
            &mut out,
            "mcp_guard_rate_limited_total",
            "counter",
            "Requests refused with 429.",
            sum(&|w| w.rate_limited.load(Relaxed)),
        );
        write_metric(
            &mut out,
            "mcp_guard_audit_events_written_total",
            "counter",
            "Audit events written.",
            self.global.audit_written.load(Relaxed),
        );
        write_metric(
            &mut out,
            "mcp_guard_audit_events_dropped_total",
            "counter",
            "Audit events dropped because a worker's audit queue was full.",
            sum(&|w| w.audit_dropped.load(Relaxed)),
        );
        write_metric(
            &mut out,
            "mcp_guard_audit_events_suppressed_total",
            "counter",
            "Failed-authentication audit events not written: their client address was over its allowance.",
            sum(&|w| w.audit_suppressed.load(Relaxed)),
        );
        self.global.audit_export.render(&mut out);
        self.global.trace.render(&mut out);
        write_metric(
            &mut out,
            "mcp_guard_request_panics_total",
            "counter",
            "Requests whose handling panicked (answered 500; the worker kept serving).",
            sum(&|w| w.panics.load(Relaxed)),
        );
        write_metric(
            &mut out,
            "mcp_guard_bodies_refused_total",
            "counter",
            "Requests refused with 503: the worker held its cap of request-body bytes.",
            sum(&|w| w.bodies_refused.load(Relaxed)),
        );
        write_metric(
            &mut out,
            "mcp_guard_config_reloads_auth_downgrade_refused_total",
            "counter",
            "Reloads refused because they would have turned authentication off (needs a restart).",
            self.global.reloads_auth_downgrade_refused.load(Relaxed),
        );
        self.render_latency(&mut out);
        out
    }

    fn render_latency(&self, out: &mut String) {
        let mut merged = new_histogram();
        for w in &self.workers {
            let h = w.latency.load();
            // Same bounds on both sides, so add cannot fail.
            let _ = merged.add(&**h);
        }
        const BOUNDS_US: &[u64] = &[
            50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
            500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000, 30_000_000,
        ];
        out.push_str("# HELP mcp_guard_request_duration_seconds Time from request head to the end of the response (streams excluded).\n");
        out.push_str("# TYPE mcp_guard_request_duration_seconds histogram\n");
        for b in BOUNDS_US {
            let n = merged.count_between(0, *b);
            let _ = writeln!(
                out,
                "mcp_guard_request_duration_seconds_bucket{{le=\"{}\"}} {}",
                *b as f64 / 1e6,
                n
            );
        }
        let total = merged.len();
        let _ = writeln!(
            out,
            "mcp_guard_request_duration_seconds_bucket{{le=\"+Inf\"}} {total}"
        );
        let sum_us: f64 = merged
            .iter_recorded()
            .map(|v| v.value_iterated_to() as f64 * v.count_at_value() as f64)
            .sum();
        let _ = writeln!(
            out,
            "mcp_guard_request_duration_seconds_sum {}",
            sum_us / 1e6
        );
        let _ = writeln!(out, "mcp_guard_request_duration_seconds_count {total}");
    }
}

fn write_metric(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_labels_are_bounded() {
        assert_eq!(METHODS[method_index("tools/call")], "tools/call");
        assert_eq!(
            METHODS[method_index("notifications/progress")],
            "notification"
        );
        assert_eq!(METHODS[method_index("x".repeat(100).as_str())], "other");
    }

    #[test]
    fn render_sums_shards_and_merges_histograms() {
        let m = Metrics::new(2);
        m.workers[0].count_request(method_index("ping"), 200);
        m.workers[1].count_request(method_index("ping"), 200);
        let mut h = new_histogram();
        h.record(120).unwrap();
        m.workers[1].publish_latency(&h);
        let text = m.render(true);
        assert!(text.contains("mcp_guard_requests_total{method=\"ping\",status=\"200\"} 2"));
        assert!(text.contains("mcp_guard_request_duration_seconds_count 1"));
        assert!(text.contains("mcp_guard_request_duration_seconds_bucket{le=\"0.00025\"} 1"));
    }
}
