//! The SIEM shipper: a thread of its own that batches the audit writer's events, POSTs them,
//! and keeps them in the spool while the SIEM cannot take them.
//!
//! Order is kept by one rule: while anything waits in the spool, new batches join it behind
//! the rest, and the spool drains from its head. A batch leaves memory only for the SIEM (a 2xx)
//! or the spool (written and fsynced). A failed POST is tried again after an exponential backoff
//! with jitter; meanwhile events keep arriving and go to the spool. The SIEM may see a batch
//! twice (it took it, but the answer was lost; or the gateway stopped before noting it shipped):
//! delivery is at least once, and every event carries an `event_id` to deduplicate on.

use super::export::{self, DropReason, ExportMetrics, ExportSettings};
use super::spool::Spool;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

/// Events the writer may hand over while the shipper is busy (a POST takes up to 10 s); past
/// that, events are dropped for the SIEM and counted (`queue_full`): the writer never waits,
/// so the audit file keeps every event whatever the SIEM does.
pub const CHANNEL_CAPACITY: usize = 65_536;
/// The bytes those events may hold together (events are handed over whole and cut to the
/// SIEM's bounds by the shipper: a few caller-chosen megabyte URIs would otherwise make a
/// stuck shipper hold gigabytes).
pub const QUEUED_BYTES: usize = 64 * 1024 * 1024;

/// The writer's end of the shipper's queue, bounded in events and in bytes.
pub struct ShipQueue {
    tx: SyncSender<String>,
    queued: Arc<AtomicUsize>,
}

/// Why [`ShipQueue::offer`] did not take an event.
pub enum NotTaken {
    /// The queue is full (events or bytes).
    Full,
    /// The shipper has stopped.
    Gone,
}

impl ShipQueue {
    /// Hands `line` to the shipper without waiting.
    pub fn offer(&self, line: String) -> Result<(), NotTaken> {
        let len = line.len();
        if self.queued.load(Relaxed) + len > QUEUED_BYTES {
            return Err(NotTaken::Full);
        }
        self.queued.fetch_add(len, Relaxed);
        self.tx.try_send(line).map_err(|e| {
            self.queued.fetch_sub(len, Relaxed);
            match e {
                TrySendError::Full(_) => NotTaken::Full,
                TrySendError::Disconnected(_) => NotTaken::Gone,
            }
        })
    }
}
/// The longest one POST may take.
const POST_TIMEOUT: Duration = Duration::from_secs(10);
/// The first retry's delay; each failure doubles it up to the cap.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);

/// Opens the spool (so a locked or unwritable directory fails the start) and starts the
/// shipping thread; returns the writer's end of its channel and the thread.
pub fn start(
    settings: ExportSettings,
    metrics: Arc<ExportMetrics>,
) -> std::io::Result<(ShipQueue, std::thread::JoinHandle<()>)> {
    let spool = Spool::open(&settings.spool_dir, settings.spool_max_bytes).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "audit.spool_dir {}: {e}",
                settings.spool_dir.to_string_lossy()
            ),
        )
    })?;
    metrics.spool_bytes.store(spool.bytes(), Relaxed);
    if !spool.is_empty() {
        tracing::info!(
            target: "mcp_guard::audit",
            "the audit spool holds {} bytes from a previous run; they are shipped first",
            spool.bytes()
        );
    }
    let (tx, rx) = sync_channel(CHANNEL_CAPACITY);
    let queued = Arc::new(AtomicUsize::new(0));
    let taken = queued.clone();
    let handle = std::thread::Builder::new()
        .name("audit-ship".into())
        .spawn(move || Shipper::new(settings, metrics, spool, taken).run(rx))?;
    Ok((ShipQueue { tx, queued }, handle))
}

/// The URL as logs may show it: no query (a token may hide there) and nothing else secret.
fn shown_url(settings: &ExportSettings) -> String {
    let u = &settings.url;
    let path = u.target.split('?').next().unwrap_or("/");
    format!(
        "{}://{}:{}{path}",
        if u.tls { "https" } else { "http" },
        u.host,
        u.port
    )
}

struct Shipper {
    settings: ExportSettings,
    metrics: Arc<ExportMetrics>,
    spool: Spool,
    headers: Vec<(String, String)>,
    /// Consecutive failed POSTs.
    failures: u32,
    /// No POST before this.
    retry_at: Instant,
    /// Jitter source (xorshift; unpredictability does not matter here, spread does).
    rng: u64,
    /// Why the SIEM is down, when it is (logged when it changes, not at every retry).
    down: Option<String>,
    backoff_cap: Duration,
    /// The bytes of events handed over and not yet taken ([`ShipQueue`]'s count).
    queued: Arc<AtomicUsize>,
    /// Whether the spool's dropping of its oldest events has been logged (until an append
    /// drops nothing).
    spool_full_logged: bool,
}

impl Shipper {
    fn new(
        settings: ExportSettings,
        metrics: Arc<ExportMetrics>,
        spool: Spool,
        queued: Arc<AtomicUsize>,
    ) -> Shipper {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9E37_79B9, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()).rotate_left(32);
        let backoff_cap =
            (settings.interval * 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
        Shipper {
            headers: settings.headers.clone(),
            settings,
            metrics,
            spool,
            failures: 0,
            retry_at: Instant::now(),
            rng: seed | 1,
            down: None,
            backoff_cap,
            queued,
            spool_full_logged: false,
        }
    }

    fn run(mut self, rx: Receiver<String>) {
        let batch_size = self.settings.batch_size;
        let mut batch: Vec<String> = Vec::with_capacity(batch_size);
        let mut batch_since = Instant::now();
        loop {
            // What is due next: the open batch's deadline, or the spool's retry.
            let now = Instant::now();
            let mut due = now + Duration::from_secs(1);
            if !batch.is_empty() {
                due = due.min(batch_since + self.settings.interval);
            }
            if !self.spool.is_empty() {
                due = due.min(self.retry_at);
            }
            let closed = match rx.recv_timeout(due.saturating_duration_since(now)) {
                Ok(line) => {
                    if batch.is_empty() {
                        batch_since = Instant::now();
                    }
                    self.take(&mut batch, line);
                    // Whatever else is already queued, up to a full batch.
                    while batch.len() < batch_size {
                        match rx.try_recv() {
                            Ok(line) => self.take(&mut batch, line),
                            Err(_) => break,
                        }
                    }
                    false
                }
                Err(RecvTimeoutError::Timeout) => false,
                Err(RecvTimeoutError::Disconnected) => true,
            };
            let now = Instant::now();
            let deadline = closed.then(|| now + self.settings.shutdown_grace);
            if !batch.is_empty()
                && (batch.len() >= batch_size
                    || now >= batch_since + self.settings.interval
                    || closed)
            {
                self.send_or_spool(&mut batch, deadline);
            }
            if let Some(deadline) = deadline {
                self.shut_down(deadline);
                return;
            }
            if !self.spool.is_empty() && Instant::now() >= self.retry_at {
                // One batch per turn, so the channel keeps being read while a backlog drains.
                self.drain_one(None);
            }
        }
    }

    /// Adds one event of the writer's to `batch`, bounded for the SIEM.
    fn take(&mut self, batch: &mut Vec<String>, line: String) {
        self.queued.fetch_sub(line.len(), Relaxed);
        if let Some(event) = export::bound_event(&line) {
            batch.push(event);
        }
    }

    /// Sends a batch from memory when the way is clear (nothing spooled, no backoff pending),
    /// else spools it; a failed send spools it too.
    fn send_or_spool(&mut self, batch: &mut Vec<String>, deadline: Option<Instant>) {
        if self.spool.is_empty() && Instant::now() >= self.retry_at && self.post(batch, deadline) {
            batch.clear();
            return;
        }
        self.spool_batch(batch);
    }

    fn spool_batch(&mut self, batch: &mut Vec<String>) {
        match self.spool.append(batch) {
            Ok(a) => {
                self.metrics.spooled.fetch_add(a.spooled, Relaxed);
                if a.dropped > 0 {
                    self.metrics.count_dropped(DropReason::SpoolFull, a.dropped);
                    // Once while the spool stays full, not per segment (hundreds a minute in a
                    // long outage); the counter has the number.
                    if !self.spool_full_logged {
                        self.spool_full_logged = true;
                        tracing::warn!(
                            target: "mcp_guard::audit",
                            "the audit spool is at audit.spool_max_bytes: its oldest events are dropped (counted in mcp_guard_audit_export_events_dropped_total{{reason=\"spool_full\"}}) until the SIEM takes events again"
                        );
                    }
                } else {
                    self.spool_full_logged = false;
                }
            }
            Err(e) => {
                self.metrics
                    .count_dropped(DropReason::SpoolUnwritable, batch.len() as u64);
                tracing::error!(
                    target: "mcp_guard::audit",
                    "cannot write the audit spool ({e}); {} events for the SIEM are lost",
                    batch.len()
                );
            }
        }
        self.metrics.spool_bytes.store(self.spool.bytes(), Relaxed);
        batch.clear();
    }

    /// Ships one batch from the spool's head; false when the POST failed.
    fn drain_one(&mut self, deadline: Option<Instant>) -> bool {
        let head = match self.spool.peek(self.settings.batch_size) {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(target: "mcp_guard::audit", "cannot read the audit spool: {e}");
                self.back_off();
                return false;
            }
        };
        let corrupt = self.spool.take_corrupt();
        if corrupt > 0 {
            self.metrics.count_dropped(DropReason::Corrupt, corrupt);
            tracing::warn!(
                target: "mcp_guard::audit",
                "skipped {corrupt} damaged record(s) in the audit spool (a write cut short)"
            );
        }
        let ok = head.events.is_empty() || self.post(&head.events, deadline);
        if ok {
            self.spool.ack(&head);
        }
        self.metrics.spool_bytes.store(self.spool.bytes(), Relaxed);
        ok
    }

    /// POSTs `events`; true when the SIEM took them (a 2xx).
    fn post(&mut self, events: &[String], deadline: Option<Instant>) -> bool {
        let timeout = match deadline {
            Some(d) => d
                .saturating_duration_since(Instant::now())
                .min(POST_TIMEOUT),
            None => POST_TIMEOUT,
        };
        if timeout.is_zero() {
            return false;
        }
        let (content_type, body) = export::render(self.settings.format, events);
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        let started = Instant::now();
        let result = crate::auth::fetch::post_for_status(
            &self.settings.url,
            &headers,
            content_type,
            &body,
            timeout,
        );
        let outcome = match result {
            Ok(status) => {
                self.metrics.observe_latency(started.elapsed());
                if (200..300).contains(&status) {
                    Ok(())
                } else {
                    // The answer's body is not logged: it may echo what was sent.
                    Err(format!("it answered HTTP {status}"))
                }
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => {
                self.metrics.shipped.fetch_add(events.len() as u64, Relaxed);
                self.failures = 0;
                self.retry_at = Instant::now();
                if self.down.take().is_some() {
                    tracing::info!(
                        target: "mcp_guard::audit",
                        "the SIEM at {} takes events again; the spool ({} bytes) drains in order",
                        shown_url(&self.settings),
                        self.spool.bytes()
                    );
                }
                true
            }
            Err(why) => {
                self.metrics.retried.fetch_add(1, Relaxed);
                if self.down.as_deref() != Some(why.as_str()) {
                    tracing::warn!(
                        target: "mcp_guard::audit",
                        "cannot ship audit events to the SIEM at {}: {why}; events wait in the spool and are retried",
                        shown_url(&self.settings)
                    );
                    self.down = Some(why);
                }
                self.back_off();
                false
            }
        }
    }

    /// Schedules the next try: `FIRST_BACKOFF · 2^failures`, capped, times a random factor in
    /// [0.5, 1) so a fleet of gateways does not retry in step.
    fn back_off(&mut self) {
        self.failures = self.failures.saturating_add(1);
        let exp = FIRST_BACKOFF
            .saturating_mul(1u32 << self.failures.min(16).saturating_sub(1))
            .min(self.backoff_cap);
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let factor = 0.5 + (self.rng >> 11) as f64 / (1u64 << 53) as f64 / 2.0;
        self.retry_at = Instant::now() + exp.mul_f64(factor);
    }

    /// The writer is gone (shutdown): everything queued goes to the SIEM within the grace, and
    /// what it cannot take stays in the spool for the next run.
    fn shut_down(&mut self, deadline: Instant) {
        while !self.spool.is_empty() && Instant::now() < deadline {
            let now = Instant::now();
            if now < self.retry_at {
                std::thread::sleep(self.retry_at.min(deadline) - now);
                continue;
            }
            self.drain_one(Some(deadline));
        }
        if !self.spool.is_empty() {
            tracing::warn!(
                target: "mcp_guard::audit",
                "{} bytes of audit events stay in the spool for the next start",
                self.spool.bytes()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hand_off_is_bounded_in_bytes_as_well_as_in_events() {
        // Red team (fleet, N4): 65,536 events of a caller's megabyte resource URIs, held while
        // the SIEM hangs, grew memory by a megabyte a request.
        let (tx, rx) = sync_channel(CHANNEL_CAPACITY);
        let queue = ShipQueue {
            tx,
            queued: Arc::default(),
        };
        let big = "x".repeat(1 << 20);
        let mut handed = 0;
        while queue.offer(big.clone()).is_ok() {
            handed += 1;
        }
        assert_eq!(handed, QUEUED_BYTES >> 20);
        // Full in bytes, with room for events: even a small one waits for the shipper.
        assert!(matches!(queue.offer("small".into()), Err(NotTaken::Full)));
        drop(rx);
        assert!(matches!(queue.offer(String::new()), Err(NotTaken::Gone)));
    }

    #[test]
    fn backoff_grows_with_jitter_and_stays_under_its_cap() {
        let dir = tempfile::tempdir().unwrap();
        let settings = ExportSettings {
            url: crate::auth::fetch::IdpUrl::parse("http://127.0.0.1:9/x?token=sekrit").unwrap(),
            format: export::ExportFormat::Json,
            batch_size: 10,
            interval: Duration::from_secs(1),
            headers: Vec::new(),
            spool_dir: dir.path().to_path_buf(),
            spool_max_bytes: 1 << 20,
            shutdown_grace: Duration::from_secs(1),
        };
        assert_eq!(shown_url(&settings), "http://127.0.0.1:9/x");
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let mut s = Shipper::new(settings, Arc::default(), spool, Arc::default());
        let mut last = Duration::ZERO;
        for i in 1..=20 {
            let before = Instant::now();
            s.back_off();
            let d = s.retry_at - before;
            assert!(d <= Duration::from_secs(4), "try {i}: {d:?}");
            if i <= 3 {
                // Below the cap each delay is at least half its nominal value.
                assert!(d >= FIRST_BACKOFF * (1 << (i - 1)) / 2, "try {i}: {d:?}");
                assert!(d + Duration::from_millis(1) >= last / 2);
            }
            last = d;
        }
    }
}
