//! One data-plane worker: a monoio runtime on its own thread with its own SO_REUSEPORT
//! listener, connections, upstream pool, classifier buffers and metric shard. Nothing here is
//! shared with another worker except through [`Shared`] (immutable snapshot, atomics, channels).

use crate::audit::{AuditSink, AuditWriter};
use crate::config::Settings;
use crate::mcp::jsonrpc::Classifier;
use crate::mcp::session::{SessionCodec, random_bytes};
use crate::observe::metrics::{Metrics, WorkerMetrics, new_histogram};
use crate::ratelimit::{LocalLimiter, QuotaPool};
use crate::runtime::shutdown::LocalShutdown;
use crate::upstream::connections::Pool;
use crate::upstream::set::Upstream;
use crate::upstream::stdio::StdioHub;
use arc_swap::{ArcSwap, Cache};
use hdrhistogram::Histogram;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Verified session ids cached per worker (cleared when full).
const VERIFIED_SESSIONS: usize = 4096;

/// Session id → (identity and route it was verified for, payload).
/// The codec generation the entries were verified under, and id → (identity, route, payload).
/// Keyed by foldhash: an id is cached only once its MAC verified, so no client chooses the
/// keys (a lookup's key is the client's, but lookups cannot crowd a bucket).
type VerifiedSessions = (
    u64,
    std::collections::HashMap<String, (Arc<str>, Arc<str>, Vec<u8>), foldhash::fast::RandomState>,
);

/// Session ids a client ended with DELETE. An id stays verifiable under its MAC after the
/// session ends (the gateway keeps no session table for HTTP upstreams), so ended ids are
/// remembered to answer 404, as the transport requires, instead of forwarding them to an
/// upstream that may answer anything. Bounded: the oldest are forgotten first.
#[derive(Default)]
pub struct EndedSessions {
    /// How many ids are remembered: zero lets every request skip the lock.
    count: AtomicUsize,
    ids: std::sync::RwLock<EndedIds>,
}

/// The ended ids, and the order they ended in (for forgetting the oldest).
type EndedIds = (
    std::collections::HashSet<Box<str>>,
    std::collections::VecDeque<Box<str>>,
);

/// Ended session ids remembered at most.
const ENDED_SESSIONS: usize = 100_000;

impl EndedSessions {
    /// Remembers that `sid` was ended.
    pub fn end(&self, sid: &str) {
        let Ok(mut ids) = self.ids.write() else {
            return;
        };
        let (set, order) = &mut *ids;
        if set.insert(sid.into()) {
            order.push_back(sid.into());
            if order.len() > ENDED_SESSIONS
                && let Some(old) = order.pop_front()
            {
                set.remove(&old);
            }
        }
        self.count.store(set.len(), Ordering::Relaxed);
    }

    /// Whether `sid` was ended.
    pub fn is_ended(&self, sid: &str) -> bool {
        self.count.load(Ordering::Relaxed) > 0
            && self.ids.read().is_ok_and(|ids| ids.0.contains(sid))
    }
}

/// Process-wide state every worker can see.
pub struct Shared {
    /// The current configuration snapshot.
    pub config: Arc<ArcSwap<Settings>>,
    /// All metric shards.
    pub metrics: Arc<Metrics>,
    /// Stdio hubs a reload replaced, shut down once idle or after the shutdown grace.
    pub retiring: std::sync::Mutex<Vec<(Arc<StdioHub>, Instant)>>,
    /// Session ids ended by DELETE.
    pub ended_sessions: EndedSessions,
    /// Each worker's inbox for legacy HTTP+SSE POSTs whose session it owns.
    pub legacy: crate::mcp::legacy::Inboxes,
    /// Each worker's inbox for answers to the approval requests of calls it holds.
    pub approvals: crate::mcp::legacy::Inboxes<crate::mcp::approval::AnswerPost>,
    /// Calls held for approval per session, across workers.
    pub approval_sessions: crate::mcp::approval::SessionCounts,
    /// Open client connections across workers (for `max_connections`).
    pub connections: AtomicUsize,
    /// "io_uring" or "epoll".
    pub io_driver: &'static str,
    /// Closed when shutdown begins; workers await it next to `accept`.
    pub shutdown_rx: async_channel::Receiver<()>,
    /// Number of workers.
    pub workers: usize,
    /// Where workers lease rate-limit quota.
    pub quota: Arc<dyn QuotaPool>,
    /// Each worker's audit queue, taken by the worker when it starts.
    pub audit_sinks: std::sync::Mutex<Vec<Option<AuditSink>>>,
    /// The control thread's audit queue (reload decisions).
    pub control_audit: AuditSink,
    /// The audit writer thread, when auditing is on.
    pub audit_writer: Option<AuditWriter>,
    /// The span exporter, when tracing is on.
    pub tracer: Option<crate::observe::otlp::Tracer>,
}

impl Shared {
    /// Ready: the upstream is reachable (stdio: its process is running).
    pub fn is_ready(&self) -> bool {
        let cfg = self.config.load();
        cfg.upstreams.as_ref().is_some_and(|u| u.all_ready())
    }

    /// Whether an upstream has answered at least once since start.
    pub fn upstream_has_answered(&self) -> bool {
        let cfg = self.config.load();
        cfg.upstreams.as_ref().is_some_and(|u| u.all_answered())
    }

    /// Each upstream by route name: `ready` now, `answered` at least once, and for a
    /// load-balanced server its policy and each replica.
    fn upstream_states(&self) -> serde_json::Map<String, serde_json::Value> {
        let cfg = self.config.load();
        cfg.upstreams
            .iter()
            .flat_map(|set| set.iter())
            .map(|(name, u)| {
                let mut state =
                    serde_json::json!({ "ready": u.is_ready(), "answered": u.has_answered() });
                if let Upstream::Http(h) = u
                    && h.is_balanced()
                    && let (Some(s), serde_json::Value::Object(more)) =
                        (state.as_object_mut(), h.describe())
                {
                    s.extend(more);
                }
                (name.to_string(), state)
            })
            .collect()
    }

    /// The /ready status and document: 200 while every upstream serves, else 503, with each
    /// upstream's state.
    pub fn readiness(&self) -> (u16, String) {
        let ready = self.is_ready();
        let body = serde_json::json!({
            "status": if ready { "ready" } else { "not ready" },
            "upstreams": self.upstream_states(),
        })
        .to_string();
        (if ready { 200 } else { 503 }, body)
    }

    /// The /health status and document: `ok` (200) once an upstream has answered at least
    /// once, `starting` (503) until then. Liveness is `/live`; readiness now is `/ready`.
    pub fn health(&self) -> (u16, String) {
        let answered = self.upstream_has_answered();
        let body = serde_json::json!({
            "status": if answered { "ok" } else { "starting" },
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_secs": self.metrics.started.elapsed().as_secs(),
            "workers": self.workers,
            "io_driver": self.io_driver,
            "upstream_ready": self.is_ready(),
            "upstream_answered": answered,
            "upstreams": self.upstream_states(),
        })
        .to_string();
        (if answered { 200 } else { 503 }, body)
    }
}

// The `Rc` around the `Arc` is the point: requests clone a worker-local, non-atomic count
// instead of the snapshot's shared atomic one.
#[allow(clippy::redundant_allocation)]
struct ConfigView {
    cache: Cache<Arc<ArcSwap<Settings>>, Arc<Settings>>,
    local: Rc<Arc<Settings>>,
}

/// A worker's own state.
pub struct Worker {
    /// Worker index.
    pub id: usize,
    /// Itself, for tasks a request spawns that outlive it.
    me: std::rc::Weak<Worker>,
    /// The legacy HTTP+SSE sessions whose streams this worker holds.
    pub legacy: crate::mcp::legacy::Sessions,
    /// The calls this worker holds for a person's approval.
    pub approvals: crate::mcp::approval::Pending,
    /// Tokens this worker has verified, with the identities they became.
    pub tokens: crate::auth::TokenCache,
    /// Process-wide state.
    pub shared: Arc<Shared>,
    config: RefCell<ConfigView>,
    /// This worker's metric shard.
    pub metrics: Arc<WorkerMetrics>,
    /// JSON-RPC classifier with reusable buffers.
    pub classifier: RefCell<Classifier>,
    /// Upstream connection pool.
    pub pool: Pool,
    latency: RefCell<Histogram<u64>>,
    latency_dirty: Cell<bool>,
    /// Fires when this worker starts draining.
    pub shutdown: Rc<LocalShutdown>,
    /// Fires when the shutdown grace has run out: calls still waiting on an upstream are then
    /// answered 503 rather than cut off without a word.
    pub grace_over: Rc<LocalShutdown>,
    /// Connections being served by this worker.
    pub active: Cell<usize>,
    /// Notices of the gateway's own on their way upstream (cancellations, legacy sessions'
    /// ends): shutdown gives them a moment, as most are sent as the grace runs out.
    pub upstream_notices: Cell<usize>,
    /// Tokens for sending those notices, [`NOTICES_AT_ONCE`] per server (route): a notice
    /// waits for one, so that hundreds given up on at once (at the grace's end) go over a few
    /// pooled connections rather than hundreds of new ones the upstream cannot all accept in
    /// time. Per server, so that one that does not answer holds up only its own.
    notice_tokens: RefCell<HashMap<Arc<str>, NoticeTokens>>,
    /// Request-body bytes this worker holds in memory right now (capped in `http::server`).
    pub body_bytes_in_flight: Cell<usize>,
    /// Failed-authentication audit allowance per client address.
    pub auth_failure_audit: RefCell<AuthFailureAudit>,
    /// The audit allowance for every other refusal of an authenticated identity: a table of
    /// its own, so that strangers filling theirs with addresses cannot silence identities'.
    pub refusal_audit: RefCell<AuditAllowance<std::sync::Arc<str>>>,
    /// The audit allowance for every other refusal of a caller known by its address (it did
    /// not authenticate, or is anonymous).
    pub stranger_refusal_audit: RefCell<AuditAllowance<std::net::IpAddr>>,
    /// This worker's rate-limit buckets.
    pub limiter: LocalLimiter,
    /// This worker's audit queue.
    pub audit: AuditSink,
    /// Session ids this worker has verified: id → (binding, payload). A MAC check costs more
    /// than the rest of the transport rules together, and a session's id never changes.
    verified_sessions: RefCell<VerifiedSessions>,
    request_seq: Cell<u64>,
    request_prefix: u64,
}

impl Worker {
    /// A worker's state (built on its own thread).
    pub fn new(id: usize, shared: Arc<Shared>) -> Rc<Self> {
        let cache = Cache::new(shared.config.clone());
        let audit = shared
            .audit_sinks
            .lock()
            .ok()
            .and_then(|mut sinks| sinks.get_mut(id).and_then(Option::take))
            .unwrap_or_else(AuditSink::disabled);
        let local = Rc::new(shared.config.load_full());
        Rc::new_cyclic(|me| Self {
            id,
            me: me.clone(),
            legacy: Default::default(),
            approvals: Default::default(),
            tokens: Default::default(),
            metrics: shared.metrics.workers[id].clone(),
            config: RefCell::new(ConfigView { cache, local }),
            classifier: RefCell::new(Classifier::new()),
            pool: Pool::default(),
            latency: RefCell::new(new_histogram()),
            latency_dirty: Cell::new(false),
            shutdown: LocalShutdown::new(),
            grace_over: LocalShutdown::new(),
            upstream_notices: Cell::new(0),
            notice_tokens: RefCell::default(),
            active: Cell::new(0),
            body_bytes_in_flight: Cell::new(0),
            auth_failure_audit: RefCell::new(AuthFailureAudit::default()),
            refusal_audit: RefCell::new(AuditAllowance::default()),
            stranger_refusal_audit: RefCell::new(AuditAllowance::default()),
            limiter: LocalLimiter::new(shared.workers),
            audit,
            verified_sessions: RefCell::new((0, std::collections::HashMap::default())),
            request_seq: Cell::new(0),
            request_prefix: u64::from_be_bytes(random_bytes::<8>()) & 0xffff_ffff,
            shared,
        })
    }

    /// This worker as an `Rc`, for a task that must outlive the request spawning it.
    pub fn rc(&self) -> Rc<Worker> {
        // A `Worker` only exists inside the `Rc` built by `new`, which outlives its tasks.
        self.me.upgrade().expect("a worker outlives its requests")
    }

    /// A turn to send a notice to the server `route` (see `notice_tokens`), given back when
    /// dropped.
    pub async fn notice_turn(&self, route: &Arc<str>) -> NoticeTurn {
        let (tx, rx) = self
            .notice_tokens
            .borrow_mut()
            .entry(route.clone())
            .or_insert_with(|| {
                let (tx, rx) = async_channel::bounded(NOTICES_AT_ONCE);
                for _ in 0..NOTICES_AT_ONCE {
                    let _ = tx.try_send(());
                }
                (tx, rx)
            })
            .clone();
        let _ = rx.recv().await;
        NoticeTurn(tx)
    }

    /// Queues an audit event, counting it as dropped when the queue is full.
    pub fn push_audit(&self, ev: crate::audit::AuditEvent) {
        if !self.audit.push(ev) {
            self.metrics.audit_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[allow(clippy::redundant_allocation)] // see `ConfigView`
    /// The current configuration. A reload is noticed through the `arc_swap::Cache` (no shared
    /// refcount traffic when nothing changed) and handed out as a worker-local `Rc`.
    pub fn settings(&self) -> Rc<Arc<Settings>> {
        let mut view = self.config.borrow_mut();
        let ConfigView { cache, local } = &mut *view;
        let current = cache.load();
        if !Arc::ptr_eq(current, local) {
            *local = Rc::new(current.clone());
        }
        local.clone()
    }

    /// The payload of a client-presented session id bound to `binding`, if it is valid.
    pub fn verify_session(
        &self,
        codec: &SessionCodec,
        identity: &str,
        route: &str,
        sid: &str,
    ) -> Option<Vec<u8>> {
        {
            // Ids verified under other keys (before a reload changed them) count for nothing.
            let mut cache = self.verified_sessions.borrow_mut();
            if cache.0 != codec.generation() {
                cache.0 = codec.generation();
                cache.1.clear();
            }
        }
        if let Some((i, r, payload)) = self.verified_sessions.borrow().1.get(sid)
            && &**i == identity
            && &**r == route
        {
            return Some(payload.clone());
        }
        let payload = codec.decode_for(identity, route, sid)?;
        let cache = &mut self.verified_sessions.borrow_mut().1;
        if cache.len() >= VERIFIED_SESSIONS {
            cache.clear();
        }
        cache.insert(
            sid.to_string(),
            (Arc::from(identity), Arc::from(route), payload.clone()),
        );
        Some(payload)
    }

    /// A request id unique in this process: worker-random prefix and a counter.
    pub fn next_request_id(&self) -> String {
        let n = self.request_seq.get() + 1;
        self.request_seq.set(n);
        // Hand-rolled hex: this runs for every request, and `format!` costs several times more.
        let mut id = String::with_capacity(22);
        push_hex(&mut id, self.request_prefix, 8);
        id.push('-');
        push_hex(&mut id, self.id as u64, 2);
        id.push('-');
        push_hex(&mut id, n, 10);
        id
    }

    /// Counts a finished request; `latency` is `None` for streams.
    pub fn record(&self, method: usize, status: u16, latency: Option<Duration>) {
        self.metrics.count_request(method, status);
        if let Some(l) = latency {
            let us = (l.as_micros() as u64).clamp(1, 60_000_000);
            let _ = self.latency.borrow_mut().record(us);
            self.latency_dirty.set(true);
        }
    }

    /// Publishes the latency histogram if it changed (called by a timer task).
    pub fn publish_metrics(&self) {
        if self.latency_dirty.replace(false) {
            self.metrics.publish_latency(&self.latency.borrow());
        }
    }
}

/// Refusals a client can repeat as fast as it can send are audited, but a flood of them must
/// not fill the disk: each key (a client address for failed authentications; for the other
/// refusals the identity, or an unauthenticated or anonymous caller's address, in tables of
/// their own) gets
/// [`AuditAllowance::PER_WINDOW`] audit lines per [`AuditAllowance::WINDOW`] (a batch's lines
/// each count); the rest are counted as suppressed. Bounded: at most [`AuditAllowance::KEYS`]
/// keys are tracked; while the table is full and none of its windows has ended, keys not in it
/// share one allowance of [`AuditAllowance::OVERFLOW_PER_WINDOW`] lines, so that filling the
/// table (many addresses are cheap) makes newcomers share lines rather than lose them all.
pub struct AuditAllowance<K> {
    seen: std::collections::HashMap<K, (Instant, u32)>,
    /// The allowance of keys the full table could not take.
    overflow: (Instant, u32),
}

/// The allowance for failed authentications, per client address.
pub type AuthFailureAudit = AuditAllowance<std::net::IpAddr>;

impl<K> Default for AuditAllowance<K> {
    fn default() -> Self {
        Self {
            seen: std::collections::HashMap::new(),
            overflow: (Instant::now(), 0),
        }
    }
}

impl<K: std::hash::Hash + Eq> AuditAllowance<K> {
    /// Audit lines per key per window.
    pub const PER_WINDOW: u32 = 10;
    /// Audit lines per window shared by the keys a full table cannot track.
    pub const OVERFLOW_PER_WINDOW: u32 = 100;
    /// The window.
    pub const WINDOW: Duration = Duration::from_secs(60);
    /// Keys tracked per worker.
    pub const KEYS: usize = 4096;

    /// Whether another refusal of `key` may be written to the audit trail now.
    pub fn allow(&mut self, key: K, now: Instant) -> bool {
        self.take(key, 1, now) == 1
    }

    /// How many of `lines` more lines for `key` may be written now (the rest are suppressed).
    pub fn take(&mut self, key: K, lines: u32, now: Instant) -> u32 {
        if self.seen.len() >= Self::KEYS && !self.seen.contains_key(&key) {
            self.seen
                .retain(|_, (start, _)| now.duration_since(*start) < Self::WINDOW);
            if self.seen.len() >= Self::KEYS {
                return Self::spend(&mut self.overflow, Self::OVERFLOW_PER_WINDOW, lines, now);
            }
        }
        let entry = self.seen.entry(key).or_insert((now, 0));
        Self::spend(entry, Self::PER_WINDOW, lines, now)
    }

    fn spend(window: &mut (Instant, u32), per_window: u32, lines: u32, now: Instant) -> u32 {
        if now.duration_since(window.0) >= Self::WINDOW {
            *window = (now, 0);
        }
        let granted = lines.min(per_window.saturating_sub(window.1));
        // Counted whole, so that a caller past its allowance stays past it.
        window.1 = window.1.saturating_add(lines);
        granted
    }
}

/// Appends the low `digits` hex digits of `v`, zero-padded.
fn push_hex(out: &mut String, v: u64, digits: u32) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for i in (0..digits).rev() {
        out.push(HEX[((v >> (i * 4)) & 0xf) as usize] as char);
    }
}

/// Runs the accept loop of one worker until shutdown, then drains its connections.
pub async fn run(w: Rc<Worker>, listener: monoio::net::TcpListener) {
    // The worker's runtime has no timer driver: every wait on it, the sleeps below included,
    // is on these deadlines.
    if let Err(e) = super::deadlines::install() {
        tracing::error!(target: "mcp_guard::runtime", "worker {}: no timer for its deadlines: {e}", w.id);
        std::process::exit(1);
    }
    let publisher = w.clone();
    monoio::spawn(async move {
        let mut ticks = 0u32;
        loop {
            super::deadlines::sleep(Duration::from_millis(250)).await;
            publisher.publish_metrics();
            ticks = ticks.wrapping_add(1);
            if ticks % 20 == 0 {
                publisher.limiter.evict_idle(Instant::now());
            }
        }
    });
    // What other threads send this worker, each read by a task of its own; closed at the end
    // of the drain (see there).
    let legacy_inbox = w.shared.legacy.take(w.id);
    if let Some(inbox) = &legacy_inbox {
        monoio::spawn(crate::mcp::legacy::run_inbox(w.clone(), inbox.clone()));
    }
    let approvals_inbox = w.shared.approvals.take(w.id);
    if let Some(inbox) = &approvals_inbox {
        monoio::spawn(crate::mcp::approval::run_inbox(w.clone(), inbox.clone()));
    }
    // The first worker is the stdio children's home: it reads their output.
    let claims = (w.id == 0)
        .then(crate::upstream::stdio::take_home)
        .flatten();
    if let Some(claims) = &claims {
        monoio::spawn(crate::upstream::stdio::run_home(claims.clone()));
    }
    let shutdown_rx = w.shared.shutdown_rx.clone();
    loop {
        let accepted = monoio::select! {
            r = listener.accept() => Some(r),
            _ = shutdown_rx.recv() => None,
        };
        let Some(accepted) = accepted else { break };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(target: "mcp_guard::runtime", "accept failed: {e}");
                super::deadlines::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let max = w.settings().server.max_connections;
        if w.shared.connections.fetch_add(1, Ordering::Relaxed) >= max {
            w.shared.connections.fetch_sub(1, Ordering::Relaxed);
            w.metrics
                .connections_refused
                .fetch_add(1, Ordering::Relaxed);
            monoio::spawn(refuse(stream));
            continue;
        }
        let _ = stream.set_nodelay(true);
        w.metrics.connections_total.fetch_add(1, Ordering::Relaxed);
        w.metrics.active_connections.fetch_add(1, Ordering::Relaxed);
        w.active.set(w.active.get() + 1);
        let tls = w
            .settings()
            .server
            .tls
            .as_ref()
            .map(|t| (t.config.clone(), t.client_verifier.clone()));
        let wc = w.clone();
        // Plain connections keep their own task type: TLS adds nothing to them.
        match tls {
            None => {
                let served = crate::http::server::serve(wc.clone(), stream, peer, None);
                monoio::spawn(connection(wc, peer, served));
            }
            Some((config, verifier)) => {
                monoio::spawn(connection(
                    wc.clone(),
                    peer,
                    serve_tls(wc, stream, peer, config, verifier),
                ));
            }
        }
    }
    // Stop listening now, not when the listener's close runs: under io_uring that close is an
    // operation queued on the ring, submitted only once the cancelled accept has completed and
    // the worker parks again, and a worker with nothing left to drain returns first, so the
    // port went on taking connections nobody would accept until the process exited.
    // SAFETY: a plain system call on a descriptor the listener owns and still holds open.
    #[allow(unsafe_code)]
    unsafe {
        libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(&listener), libc::SHUT_RDWR);
    }
    drop(listener);
    w.shutdown.fire();
    let grace = w.settings().server.shutdown_grace;
    let deadline = Instant::now() + grace;
    // The first worker reads the stdio children's output for every worker's requests: it stays
    // until every worker's connections are done (or the grace ends), not only its own.
    let still_open = || {
        if w.id == 0 {
            w.shared.connections.load(Ordering::Relaxed)
        } else {
            w.active.get()
        }
    };
    while still_open() > 0 && Instant::now() < deadline {
        super::deadlines::sleep(Duration::from_millis(20)).await;
    }
    let mut answered_by = None;
    if still_open() > 0 {
        // Calls still waiting on an upstream get their 503 now; a moment to write them.
        w.grace_over.fire();
        let by = Instant::now() + GRACE_ANSWER;
        answered_by = Some(by);
        while w.active.get() > 0 && Instant::now() < by {
            super::deadlines::sleep(Duration::from_millis(20)).await;
        }
    }
    // No task may outlive the runtime waiting on a channel another thread sends on: that
    // thread's next send would wake it, find the runtime gone and drop the task there, inside
    // the channel's lock, which the task's drop takes again (a deadlock; the gateway never
    // exited). So a task still waiting for another thread's answer (a stdio call's stream
    // task whose client has gone, see `StdioHub::streamed`) is told to end, even when nothing
    // was left open, and the inboxes are closed (a later send fails instead of waking); the
    // sleep gives their tasks the turn to end, on this thread.
    w.grace_over.fire();
    if let Some(inbox) = &legacy_inbox {
        inbox.close();
    }
    if let Some(inbox) = &approvals_inbox {
        inbox.close();
    }
    if let Some(claims) = &claims {
        claims.close();
    }
    super::deadlines::sleep(Duration::from_millis(20)).await;
    // The calls given up on at the grace's end are cancelled upstream, and the legacy sessions
    // that ended with it are ended there: the same moment to send those (red team: with
    // hundreds given up on at once, the worker ended before a sixth of them had gone).
    let sent_by = answered_by.unwrap_or_else(|| Instant::now() + GRACE_ANSWER);
    while w.upstream_notices.get() > 0 && Instant::now() < sent_by {
        super::deadlines::sleep(Duration::from_millis(20)).await;
    }
    w.publish_metrics();
    if w.active.get() > 0 {
        tracing::warn!(
            target: "mcp_guard::runtime",
            "worker {}: {} connection(s) still open after the {:?} grace period; closing them",
            w.id,
            w.active.get(),
            grace
        );
    }
    // Last: the deadlines' firing task ends here, within the runtime, rather than outliving it.
    super::deadlines::retire().await;
}

/// How many notices of the gateway's own a worker sends to one server at once.
pub const NOTICES_AT_ONCE: usize = 16;

/// The tokens of one server's notices.
type NoticeTokens = (async_channel::Sender<()>, async_channel::Receiver<()>);

/// A turn to send a notice upstream ([`Worker::notice_turn`]).
pub struct NoticeTurn(async_channel::Sender<()>);

impl Drop for NoticeTurn {
    fn drop(&mut self) {
        let _ = self.0.try_send(());
    }
}

/// How long, after the shutdown grace, calls cut short have to write their 503.
const GRACE_ANSWER: Duration = Duration::from_millis(500);

/// Runs one client connection's task, keeping the connection counts.
///
/// A future of its own rather than an `async` wrapper: awaiting the connection's future from an
/// `async` block or fn stores it twice in the task (once as the captured value, once as the
/// awaited one; rustc keeps both slots), which doubled what every idle connection costs.
fn connection<F: std::future::Future<Output = ()>>(
    w: Rc<Worker>,
    peer: std::net::SocketAddr,
    served: F,
) -> ConnectionTask<F> {
    ConnectionTask {
        served: crate::http::server::CatchPanic(served),
        w,
        peer,
    }
}

/// A connection's future and what is settled when it ends.
struct ConnectionTask<F> {
    served: crate::http::server::CatchPanic<F>,
    w: Rc<Worker>,
    peer: std::net::SocketAddr,
}

impl<F: std::future::Future<Output = ()>> std::future::Future for ConnectionTask<F> {
    type Output = ();

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        // SAFETY: only `served` is projected to a pinned reference; `ConnectionTask` never
        // moves it out and has no Drop impl, so it stays where it was pinned. The other fields
        // are used through plain references.
        #[allow(unsafe_code)]
        let this = unsafe { self.get_unchecked_mut() };
        // SAFETY: see above; `this.served` is never moved while `this` is pinned.
        #[allow(unsafe_code)]
        let served = unsafe { std::pin::Pin::new_unchecked(&mut this.served) };
        // The request path's clock reads once per poll of a connection (see `clock`).
        let clock = super::clock::PollScope::enter();
        let outcome = served.poll(cx);
        drop(clock);
        let outcome = std::task::ready!(outcome);
        // monoio re-raises a task's panic on the worker thread, which would stop every
        // connection of this worker: `CatchPanic` contains it to this connection, and the
        // counts are kept either way.
        if let Err(what) = outcome {
            this.w.metrics.panics.fetch_add(1, Ordering::Relaxed);
            tracing::error!(target: "mcp_guard::runtime", "connection from {} panicked: {what}; closed", this.peer);
        }
        let w = &this.w;
        w.active.set(w.active.get() - 1);
        w.metrics.active_connections.fetch_sub(1, Ordering::Relaxed);
        w.shared.connections.fetch_sub(1, Ordering::Relaxed);
        std::task::Poll::Ready(())
    }
}

/// A TLS connection: the handshake, on this worker, within `header_timeout` (a client that
/// stalls mid-handshake is cut off like a slowloris, and counted as one: a 408 that could not
/// be written), then the same connection loop as plain TCP.
async fn serve_tls(
    w: Rc<Worker>,
    stream: monoio::net::TcpStream,
    peer: std::net::SocketAddr,
    config: Arc<rustls::ServerConfig>,
    verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
) {
    let limit = w.settings().server.header_timeout;
    let handshake = monoio::select! {
        r = super::deadlines::timeout(limit, crate::tls::TlsStream::accept(stream, config)) => r,
        _ = w.shutdown.wait() => return,
    };
    match handshake {
        Ok(Ok(tls)) => {
            // Only a certificate rustls verified is here; its names are read once, and the
            // chain is kept to verify again should a reload change the trusted CAs.
            let client = crate::tls::client::ClientAuth::new(verifier, tls.client_chain());
            crate::http::server::serve(w, tls, peer, Some(Box::new(client))).await;
        }
        Ok(Err(e)) => {
            tracing::debug!(target: "mcp_guard::tls", "TLS handshake with {peer} failed: {e}");
            // A refused client certificate is a failed authentication: counted and audited
            // with its reason like any other (the certificate itself is not recorded).
            let reason = crate::tls::certificate_refusal(&e).or_else(|| {
                (verifier.is_some() && crate::tls::oversized_handshake(&e))
                    .then_some("mtls_certificate_too_large")
            });
            if let Some(reason) = reason {
                refused_certificate(&w, peer, reason);
            }
        }
        Err(_elapsed) => {
            w.record(crate::observe::metrics::M_NONE, 408, None);
            tracing::debug!(target: "mcp_guard::tls", "TLS handshake with {peer} not done within {limit:?}; closed");
        }
    }
}

/// Counts and audits a handshake that refused the client's certificate.
fn refused_certificate(w: &Worker, peer: std::net::SocketAddr, reason: &'static str) {
    use crate::auth::AuthMethod;
    w.metrics
        .count_auth(crate::pipeline::auth_index(AuthMethod::Mtls), false);
    if !w.audit.enabled() {
        return;
    }
    // The same allowance per address as refused credentials: a flood of bad handshakes
    // must not fill the disk.
    if !w
        .auth_failure_audit
        .borrow_mut()
        .allow(peer.ip(), Instant::now())
    {
        w.metrics.audit_suppressed.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let event = crate::audit::AuditEvent {
        time: std::time::SystemTime::now(),
        request_id: w.next_request_id(),
        client_request_id: None,
        trace_id: None,
        identity: None,
        auth_method: AuthMethod::Mtls.as_str(),
        client: peer.ip(),
        method: "tls/handshake".into(),
        target: None,
        decision: "deny",
        reason: Some(reason),
        status: 0,
        upstream: crate::config::DEFAULT_ROUTE.into(),
        latency_us: 0,
        arguments: None,
        details: Vec::new(),
        session: None,
    };
    if !w.audit.push(event) {
        w.metrics.audit_dropped.fetch_add(1, Ordering::Relaxed);
    }
}

async fn refuse(mut stream: monoio::net::TcpStream) {
    let body =
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
    let _ = crate::http::io::write_all(&mut stream, body.to_vec()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    type Allowance = AuditAllowance<u32>;

    #[test]
    fn an_allowance_counts_lines_and_renews_each_window() {
        let mut a = Allowance::default();
        let t0 = Instant::now();
        // A batch's lines each count: 40 lines at once get the window's 10.
        assert_eq!(a.take(1, 40, t0), Allowance::PER_WINDOW);
        assert_eq!(a.take(1, 1, t0), 0);
        // Another key has its own.
        assert_eq!(a.take(2, 3, t0), 3);
        // The next window.
        assert_eq!(a.take(1, 1, t0 + Allowance::WINDOW), 1);
    }

    #[test]
    fn a_full_table_makes_newcomers_share_an_allowance_not_lose_every_line() {
        // Red team (fleet, N3): with the table full of one attacker's addresses, every other
        // address's refusals were written nowhere.
        let mut a = Allowance::default();
        let t0 = Instant::now();
        for key in 0..Allowance::KEYS as u32 {
            a.take(key, 1, t0);
        }
        let newcomer = Allowance::KEYS as u32 + 1;
        assert_eq!(a.take(newcomer, 1, t0), 1);
        let shared: u32 = (0..1000).map(|k| a.take(newcomer + 1 + k, 1, t0)).sum();
        assert_eq!(shared + 1, Allowance::OVERFLOW_PER_WINDOW);
        // Once the table's windows end, keys are tracked again, each with its own.
        let later = t0 + Allowance::WINDOW;
        assert_eq!(a.take(newcomer, 5, later), 5);
    }
}
