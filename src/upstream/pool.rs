//! stdio per session: a child process of its own for every MCP session, so nothing one
//! client sends or receives can reach another's (the shared child isolates by remapping; this
//! isolates by process). Each child runs under its own [`StdioHub`] (supervision, restart,
//! routing), holding exactly one session, and the pool maps the session's key to it.
//!
//! Bounded: at most `max_processes` children, and one identity holds at most half of them
//! (at least one), so a caller opening sessions in a loop cannot take every process from
//! everyone. At the cap an initialize is refused with a JSON-RPC error and counted, never
//! queued or spawned beyond it. Children without a request for `session_idle_secs` are
//! stopped by the control thread, which also stops a session's child when the session is
//! deleted. Spawning happens off the worker (a fork and exec would stall its event loop).

use super::{Answer, Exchange, Outgoing};
use crate::config::PerSession;
use crate::error::GatewayError;
use crate::http::body::HeldBody;
use crate::mcp::jsonrpc::{Body, Kind};
use crate::observe::metrics::Metrics;
use crate::upstream::router::SessionKey;
use crate::upstream::stdio::{Link, StdioHub};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// One session's child.
struct Entry {
    hub: Arc<StdioHub>,
    identity: Arc<str>,
    last_used: Instant,
    /// Requests of the session in flight: a session is not idle while one runs.
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
}

/// Counts a request of a session in flight until dropped.
struct Busy(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Children per session, and the places reserved for children being started.
#[derive(Default)]
struct Table {
    sessions: HashMap<SessionKey, Entry>,
    /// Children being started, per identity (they count against the caps already).
    starting: HashMap<Arc<str>, usize>,
    /// The pool was drained (a reload replaced it, or the gateway is stopping): a child that
    /// finishes starting now has no table to live in and is stopped at once.
    drained: bool,
}

impl Table {
    fn held_by(&self, identity: &str) -> usize {
        self.sessions
            .values()
            .filter(|e| &*e.identity == identity)
            .count()
            + self.starting.get(identity).copied().unwrap_or(0)
    }

    fn total(&self) -> usize {
        self.sessions.len() + self.starting.values().sum::<usize>()
    }

    fn release_start(&mut self, identity: &Arc<str>) {
        if let Some(n) = self.starting.get_mut(identity) {
            *n -= 1;
            if *n == 0 {
                self.starting.remove(identity);
            }
        }
    }
}

/// A request to the pool's spawner thread: start a child, answer on the channel.
type SpawnRequest = async_channel::Sender<Result<Arc<StdioHub>, String>>;

/// The per-session children of one upstream.
pub struct StdioPool {
    /// Children are forked by one long-lived thread: a child dies with the thread that
    /// forked it (`PR_SET_PDEATHSIG`), so that thread must outlive them.
    spawner: std::sync::mpsc::Sender<SpawnRequest>,
    settings: Link,
    limits: PerSession,
    metrics: Arc<Metrics>,
    table: Mutex<Table>,
    /// A child has answered at least once.
    answered: AtomicBool,
}

impl StdioPool {
    /// A pool; no child runs until a session asks for one.
    pub fn new(settings: Link, limits: PerSession, metrics: Arc<Metrics>) -> Arc<Self> {
        let (spawner, requests) = std::sync::mpsc::channel::<SpawnRequest>();
        let (for_spawner, metrics_for_spawner) = (settings.clone(), metrics.clone());
        // Ends when the pool (the only sender) is dropped.
        let _ = std::thread::Builder::new()
            .name("stdio-spawner".into())
            .spawn(move || {
                for reply in requests {
                    let started = StdioHub::start(for_spawner.clone(), metrics_for_spawner.clone());
                    let _ = reply.send_blocking(started);
                }
            });
        Arc::new(Self {
            spawner,
            settings,
            limits,
            metrics,
            table: Mutex::new(Table::default()),
            answered: AtomicBool::new(false),
        })
    }

    /// The settings its children are started from.
    pub fn settings(&self) -> &Link {
        &self.settings
    }

    /// The most children one identity may hold.
    fn per_identity(&self) -> usize {
        (self.limits.max_processes / 2).max(1)
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        // A panic while the lock is held leaves a table that is still consistent (every
        // change is one insert or remove): keep serving with it.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The child of a session, marked used now and busy until the guard is dropped.
    fn session_hub(&self, key: &[u8]) -> Result<(Arc<StdioHub>, Busy), GatewayError> {
        let key: SessionKey = key.try_into().map_err(|_| GatewayError::UnknownSession)?;
        let mut table = self.table();
        let entry = table
            .sessions
            .get_mut(&key)
            .ok_or(GatewayError::UnknownSession)?;
        entry.last_used = Instant::now();
        entry.in_flight.fetch_add(1, Ordering::Relaxed);
        Ok((entry.hub.clone(), Busy(entry.in_flight.clone())))
    }

    /// Posts a message: an initialize starts a child for the new session; anything else goes
    /// to its session's child.
    pub async fn post(
        &self,
        out: &Outgoing<'_>,
        body: &Body,
        raw: HeldBody,
    ) -> Result<Exchange, GatewayError> {
        if let Some(key) = out.session {
            let (hub, _busy) = self.session_hub(key)?;
            let answer = hub.post(out, body, raw).await;
            self.touch(key);
            return answer;
        }
        let is_initialize = matches!(body, Body::Single(m) if m.kind == Kind::Request && m.method_str() == "initialize");
        if !is_initialize {
            return Err(GatewayError::MissingSession);
        }
        let identity: Arc<str> = out.binding.into();
        self.reserve(&identity)?;
        let hub = match self.spawn().await {
            Ok(hub) => hub,
            Err(e) => {
                self.table().release_start(&identity);
                return Err(e);
            }
        };
        let result = hub.post(out, body, raw).await;
        let mut table = self.table();
        table.release_start(&identity);
        match result {
            // Drained while it started: nothing would ever stop this child, and the session it
            // opened would not be found by the pool that replaced this one.
            Ok(_) if table.drained => {
                retire(hub);
                Err(GatewayError::UpstreamUnavailable(
                    "the server was reconfigured while the session started; initialize again"
                        .into(),
                ))
            }
            Ok(exchange) => {
                let key = exchange
                    .session
                    .as_deref()
                    .and_then(|k| SessionKey::try_from(k).ok());
                match key {
                    Some(key) => {
                        self.answered.store(true, Ordering::Relaxed);
                        table.sessions.insert(
                            key,
                            Entry {
                                hub,
                                identity,
                                last_used: Instant::now(),
                                in_flight: Arc::default(),
                            },
                        );
                        self.count(1);
                    }
                    // The child answered initialize with an error: no session, no child.
                    None => retire(hub),
                }
                Ok(exchange)
            }
            Err(e) => {
                retire(hub);
                Err(e)
            }
        }
    }

    /// Holds a place under both caps for a child about to start, or says which cap is full.
    fn reserve(&self, identity: &Arc<str>) -> Result<(), GatewayError> {
        let mut table = self.table();
        if table.drained {
            return Err(GatewayError::UpstreamUnavailable(
                "the server is being reconfigured; initialize again".into(),
            ));
        }
        let cap = if table.total() >= self.limits.max_processes {
            Some(self.limits.max_processes)
        } else if table.held_by(identity) >= self.per_identity() {
            Some(self.per_identity())
        } else {
            None
        };
        if let Some(cap) = cap {
            self.metrics
                .global
                .stdio_process_cap_refusals
                .fetch_add(1, Ordering::Relaxed);
            return Err(GatewayError::ProcessCap(cap));
        }
        *table.starting.entry(identity.clone()).or_default() += 1;
        Ok(())
    }

    /// Has the spawner thread start a child, waiting without blocking the worker.
    async fn spawn(&self) -> Result<Arc<StdioHub>, GatewayError> {
        let (tx, rx) = async_channel::bounded(1);
        self.spawner.send(tx).map_err(|_| {
            GatewayError::UpstreamUnavailable("the process spawner has stopped".into())
        })?;
        match rx.recv().await {
            Ok(Ok(hub)) => Ok(hub),
            Ok(Err(e)) => {
                tracing::warn!(target: "mcp_guard::upstream", "per-session stdio child failed to start: {e}");
                Err(GatewayError::UpstreamUnavailable(e))
            }
            Err(_) => Err(GatewayError::UpstreamUnavailable(
                "the child could not be started".into(),
            )),
        }
    }

    /// The session's server-to-client stream.
    pub async fn stream(&self, out: &Outgoing<'_>) -> Result<Exchange, GatewayError> {
        let key = out.session.ok_or(GatewayError::MissingSession)?;
        let (hub, _busy) = self.session_hub(key)?;
        hub.stream(out).await
    }

    /// Ends the session and stops its child.
    pub async fn end(&self, out: &Outgoing<'_>) -> Result<Exchange, GatewayError> {
        let key = out.session.ok_or(GatewayError::MissingSession)?;
        let (hub, busy) = self.session_hub(key)?;
        let exchange = hub.end(out).await?;
        drop(busy);
        if let Ok(key) = SessionKey::try_from(key) {
            let mut table = self.table();
            if let Some(entry) = table.sessions.remove(&key) {
                retire(entry.hub);
                self.count(-1);
            }
        }
        Ok(Exchange {
            answer: Answer::Ended,
            ..exchange
        })
    }

    /// Stops the children whose session has been idle past `session_idle`; returns how many.
    pub fn reap_idle(&self, now: Instant) -> usize {
        let mut table = self.table();
        let idle: Vec<SessionKey> = table
            .sessions
            .iter()
            .filter(|(_, e)| {
                e.in_flight.load(Ordering::Relaxed) == 0
                    && now.saturating_duration_since(e.last_used) >= self.limits.idle
            })
            .map(|(k, _)| *k)
            .collect();
        for key in &idle {
            if let Some(entry) = table.sessions.remove(key) {
                retire(entry.hub);
                self.count(-1);
            }
        }
        idle.len()
    }

    /// Marks a session used now (a long request's end counts as use).
    fn touch(&self, key: &[u8]) {
        if let Ok(key) = SessionKey::try_from(key)
            && let Some(entry) = self.table().sessions.get_mut(&key)
        {
            entry.last_used = Instant::now();
        }
    }

    /// Every child, for shutdown.
    pub fn drain(&self) -> Vec<Arc<StdioHub>> {
        let mut table = self.table();
        table.drained = true;
        let hubs: Vec<_> = table.sessions.drain().map(|(_, e)| e.hub).collect();
        self.count(-(hubs.len() as i64));
        hubs
    }

    /// Children running now.
    pub fn processes(&self) -> usize {
        self.table().sessions.len()
    }

    /// Whether a child has ever answered. Before the first session there is nothing to wait
    /// for: children start on demand, and the command was checked at start.
    pub fn has_answered(&self) -> bool {
        self.answered.load(Ordering::Relaxed) || self.processes() == 0
    }

    /// Keeps the process gauge (shared by every pool) in step.
    fn count(&self, delta: i64) {
        let gauge = &self.metrics.global.stdio_processes;
        if delta >= 0 {
            gauge.fetch_add(delta as u64, Ordering::Relaxed);
        } else {
            gauge.fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
        }
    }
}

/// Stops a child off the caller's thread (joining its hub waits for the process to exit).
fn retire(hub: Arc<StdioHub>) {
    let _ = std::thread::Builder::new()
        .name("stdio-retire".into())
        .spawn(move || hub.shutdown());
}
