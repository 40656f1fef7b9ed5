//! Process bootstrap and lifecycle: bind listeners, start the workers (one monoio runtime per
//! thread), the admin thread and the stdio hub; then run the control loop (signals, config
//! reload, upstream health) on the main thread until shutdown.

pub mod clock;
pub mod control;
pub mod deadlines;
pub mod shutdown;
pub mod worker;

use crate::config::{IoMode, Settings};
use crate::observe::metrics::Metrics;
use crate::upstream::set::UpstreamSet;
use arc_swap::ArcSwap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use worker::{Shared, Worker};

/// The io driver chosen for this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// io_uring.
    IoUring,
    /// epoll (monoio's legacy driver).
    Epoll,
}

impl Driver {
    /// The name shown in logs and /health.
    pub fn name(self) -> &'static str {
        match self {
            Driver::IoUring => "io_uring",
            Driver::Epoll => "epoll",
        }
    }
}

/// Picks the driver: io_uring when asked or allowed by the kernel, else epoll.
pub fn choose_driver(mode: IoMode) -> Result<Driver, String> {
    let uring = monoio::utils::detect_uring();
    match mode {
        IoMode::Epoll => Ok(Driver::Epoll),
        IoMode::IoUring if uring => Ok(Driver::IoUring),
        IoMode::IoUring => Err(
            "server.io = \"io_uring\" but the kernel refuses io_uring (disabled, or blocked by \
             seccomp); use \"auto\" or \"epoll\""
                .into(),
        ),
        IoMode::Auto if uring => Ok(Driver::IoUring),
        IoMode::Auto => Ok(Driver::Epoll),
    }
}

/// Refuses an address another socket already listens on. The workers' listeners use
/// SO_REUSEPORT, which the kernel lets any process of the same user join: a second mcp-guard
/// on the port of a running one would start "successfully" and take half of its connections
/// (the old one perhaps anonymous, the new one keyed). A plain bind, without SO_REUSEPORT,
/// fails with EADDRINUSE where anything listens, SO_REUSEPORT or not. SO_REUSEADDR is kept,
/// as the listeners have it, so connections of a previous run lingering in TIME_WAIT do not
/// block a restart. Port 0 asks for a fresh port and needs no probe.
pub fn refuse_taken_port(addr: SocketAddr) -> Result<(), String> {
    if addr.port() == 0 {
        return Ok(());
    }
    let probe = || -> std::io::Result<()> {
        let sock = tcp_socket(addr)?;
        // Dropped on return, never listening: the real listeners bind right after.
        sock.bind(&addr.into())
    };
    match probe() {
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(format!(
            "cannot listen on {addr}: the address is already in use by another process \
             (perhaps another mcp-guard, which would otherwise share the port and split the \
             connections with it); stop that process or choose another server.port"
        )),
        // Any other failure (no such local address, a privileged port) is the real bind's to
        // report, with its own words.
        _ => Ok(()),
    }
}

/// A TCP socket for `addr` with SO_REUSEADDR (so a restart is not blocked by connections of
/// the previous run in TIME_WAIT).
fn tcp_socket(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    sock.set_reuse_address(true)?;
    Ok(sock)
}

/// Binds one SO_REUSEPORT listener per worker on the same address (a requested port 0 is
/// resolved by the first bind, and the rest join that port). Call [`refuse_taken_port`]
/// first: SO_REUSEPORT alone does not notice another process on the port.
pub fn bind_listeners(addr: SocketAddr, n: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut out = Vec::with_capacity(n);
    let mut addr = addr;
    for _ in 0..n {
        let sock = tcp_socket(addr)?;
        sock.set_reuse_port(true)?;
        sock.set_nonblocking(true)?;
        sock.bind(&addr.into())?;
        sock.listen(4096)?;
        let l: std::net::TcpListener = sock.into();
        if addr.port() == 0 {
            addr = l.local_addr()?;
        }
        out.push(l);
    }
    Ok(out)
}

/// Capacity of the control thread's audit queue.
const CONTROL_AUDIT_QUEUE: usize = 64;
/// Capacity of the pin thread's audit queue (`pinning/changed` events, one per new digest).
const PIN_AUDIT_QUEUE: usize = 1024;

/// Runs the gateway with the config at `path` until SIGTERM/SIGINT. Returns an error message
/// for a startup failure.
pub fn run(path: PathBuf) -> Result<(), String> {
    let signals = control::install_signals();
    // The file's stamp as loaded: a change made while the gateway starts is still a change.
    let loaded_stamp = control::file_stamp(&path);
    let settings = Settings::load(&path).map_err(|e| e.to_string())?;
    // Before anything is spawned or bound: a command that cannot run is a start-up error, not
    // a restart loop behind a healthy-looking /health.
    let problems =
        crate::config::preflight::check(&settings, crate::config::preflight::Ports::Skip);
    if !problems.is_empty() {
        let lines: Vec<String> = problems
            .iter()
            .map(|p| format!("{}: {p}", path.display()))
            .collect();
        return Err(lines.join("\n"));
    }
    let driver = choose_driver(settings.server.io)?;
    for w in &settings.warnings {
        tracing::warn!(target: "mcp_guard::config", "{w}");
    }
    let workers = settings.server.workers;
    let metrics = Metrics::new(workers);
    refuse_taken_port(settings.server.listen)?;
    let listeners = bind_listeners(settings.server.listen, workers)
        .map_err(|e| format!("cannot listen on {}: {e}", settings.server.listen))?;
    let bound = listeners[0].local_addr().map_err(|e| e.to_string())?;
    let admin_listener = match settings.admin {
        Some(addr) => Some(
            std::net::TcpListener::bind(addr)
                .map_err(|e| format!("cannot listen on admin address {addr}: {e}"))?,
        ),
        None => None,
    };
    let mut settings = settings;
    // Before any child starts: their output is read on worker 0, not on a thread each.
    crate::upstream::stdio::reserve_home();
    settings.upstreams = Some(Arc::new(UpstreamSet::start(&settings, &metrics)?));
    if let Some(auth) = Arc::get_mut(&mut settings.auth) {
        auth.start(None);
    }
    let (audit_writer, audit_sinks) = match &settings.audit.output {
        Some(output) => {
            // One queue per worker, and a small one (the last) for the control thread's rare
            // events (refused reloads): a channel allocates its whole capacity up front.
            let mut queues = vec![settings.audit.queue_capacity; workers];
            queues.push(CONTROL_AUDIT_QUEUE);
            if settings.pinning.is_some() {
                queues.push(PIN_AUDIT_QUEUE);
            }
            let (writer, sinks) =
                crate::audit::AuditWriter::start(output.clone(), &queues, metrics.clone())
                    .map_err(|e| format!("cannot open the audit trail: {e}"))?;
            (Some(writer), sinks.into_iter().map(Some).collect())
        }
        None => (None, Vec::new()),
    };
    let mut audit_sinks: Vec<Option<crate::audit::AuditSink>> = audit_sinks;
    let pin_audit = if settings.pinning.is_some() && audit_sinks.len() > workers + 1 {
        audit_sinks.pop().flatten()
    } else {
        None
    }
    .unwrap_or_else(crate::audit::AuditSink::disabled);
    if let Some(p) = &settings.pinning {
        let servers: Vec<Arc<str>> = settings.routes.iter().map(|r| r.name.clone()).collect();
        settings.pins = Some(crate::pinning::Pins::start(&p.store, &servers, pin_audit)?);
    }
    let control_audit = if audit_sinks.len() > workers {
        audit_sinks.pop().flatten()
    } else {
        None
    }
    .unwrap_or_else(crate::audit::AuditSink::disabled);
    if !settings.auth.requires_credentials() {
        // The per-address remark only where there are limits for it to be about.
        let limits = if settings.rate.enabled {
            " (rate limits apply per client address)"
        } else {
            ""
        };
        tracing::warn!(
            target: "mcp_guard",
            "no authentication is configured: every caller is anonymous{limits}"
        );
    }
    let quota: Arc<dyn crate::ratelimit::QuotaPool> = match &settings.rate.redis {
        Some(redis) => Arc::new(crate::ratelimit::redis::RedisPool::start(redis.clone())?),
        None => Arc::new(crate::ratelimit::MemoryPool::default()),
    };
    // Started with the process: `[tracing]` changes take a restart.
    let tracer = match (&settings.tracing.endpoint, settings.tracing.enabled) {
        (Some(endpoint), true) => Some(
            crate::observe::otlp::Tracer::start(
                endpoint.clone(),
                settings.tracing.service_name.clone(),
                metrics.global.trace.clone(),
            )
            .map_err(|e| format!("cannot start the span exporter: {e}"))?,
        ),
        _ => None,
    };
    let (shutdown_tx, shutdown_rx) = async_channel::bounded::<()>(1);
    let shared = Arc::new(Shared {
        config: Arc::new(ArcSwap::from_pointee(settings.clone())),
        metrics: metrics.clone(),
        retiring: std::sync::Mutex::new(Vec::new()),
        ended_sessions: Default::default(),
        legacy: crate::mcp::legacy::Inboxes::new(workers),
        approvals: crate::mcp::legacy::Inboxes::with_capacity(workers, crate::mcp::approval::INBOX),
        approval_sessions: Default::default(),
        connections: AtomicUsize::new(0),
        io_driver: driver.name(),
        shutdown_rx,
        workers,
        quota,
        audit_sinks: std::sync::Mutex::new(audit_sinks),
        control_audit,
        audit_writer,
        tracer,
    });
    let mut threads = Vec::with_capacity(workers);
    for (id, listener) in listeners.into_iter().enumerate() {
        let shared = shared.clone();
        let t = std::thread::Builder::new()
            .name(format!("worker-{id}"))
            .spawn(move || run_worker(id, shared, listener, driver))
            .map_err(|e| format!("cannot start worker thread: {e}"))?;
        threads.push(t);
    }
    tracing::info!(
        target: "mcp_guard",
        "mcp-guard {} listening on {}://{bound} ({}, {} driver)",
        env!("CARGO_PKG_VERSION"),
        if shared.config.load().server.tls.is_some() { "https" } else { "http" },
        crate::cli::workers_phrase(workers),
        driver.name()
    );
    if let Some(l) = admin_listener {
        let addr = l.local_addr().map_err(|e| e.to_string())?;
        tracing::info!(target: "mcp_guard", "admin listening on http://{addr}");
        crate::admin::spawn(l, shared.clone());
    }
    control::run(&path, loaded_stamp, signals, &shared);
    tracing::info!(target: "mcp_guard", "shutting down: no longer accepting connections");
    drop(shutdown_tx);
    // A worker that panicked has already printed why; the shutdown still runs to its end (the
    // other workers drained, the children stopped, the audit flushed), and the exit status then
    // says it went wrong.
    let panicked: Vec<String> = threads
        .into_iter()
        .filter_map(|t| {
            let name = t.thread().name().unwrap_or("worker").to_string();
            t.join().is_err().then_some(name)
        })
        .collect();
    let current = shared.config.load_full();
    let hubs = current
        .upstreams
        .iter()
        .flat_map(|set| {
            set.hubs()
                .cloned()
                .chain(set.pools().flat_map(|p| p.drain()))
                .collect::<Vec<_>>()
        })
        .chain(control::take_retiring(&shared, true));
    for hub in hubs {
        hub.shutdown();
    }
    if let Some(a) = &shared.audit_writer {
        a.stop();
    }
    if let Some(t) = &shared.tracer {
        t.stop();
    }
    if !panicked.is_empty() {
        return Err(format!("shut down, but {} panicked", panicked.join(", ")));
    }
    tracing::info!(target: "mcp_guard", "shutdown complete");
    Ok(())
}

/// How a worker's io_uring is set up. Task-work modes change when the kernel runs the work that
/// posts completions: by default it interrupts the worker with an IPI whenever a completion
/// arrives; `COOP_TASKRUN` lets it wait for the worker's next syscall, which a busy worker makes
/// every loop anyway, and `DEFER_TASKRUN` waits further, until the worker asks for completions
/// (monoio does so when it parks, the only moment it needs them). Each worker is the only thread
/// that submits to its ring (`SINGLE_ISSUER`), which `DEFER_TASKRUN` requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingSetup {
    /// The kernel's default.
    Plain,
    /// `COOP_TASKRUN | SINGLE_ISSUER` (kernel 6.0+).
    Coop,
    /// `DEFER_TASKRUN | SINGLE_ISSUER` (kernel 6.1+).
    Defer,
}

impl RingSetup {
    /// The setup the workers ask for: `MCP_GUARD_URING_SETUP` (`plain`, `coop` or `defer`) picks
    /// one for measuring; the default is the one issue 12's runs found cheapest. A kernel that
    /// refuses the flags gets `Plain` (see `run_worker`).
    pub fn from_env() -> Self {
        match std::env::var("MCP_GUARD_URING_SETUP").as_deref() {
            Ok("plain") => RingSetup::Plain,
            Ok("defer") => RingSetup::Defer,
            Ok("coop") => RingSetup::Coop,
            _ => RingSetup::Coop,
        }
    }

    fn builder(self) -> Option<io_uring::Builder> {
        let mut b = io_uring::IoUring::builder();
        match self {
            RingSetup::Plain => return None,
            RingSetup::Coop => b.setup_coop_taskrun().setup_single_issuer(),
            RingSetup::Defer => b.setup_defer_taskrun().setup_single_issuer(),
        };
        Some(b)
    }
}

fn uring_runtime(setup: RingSetup) -> std::io::Result<monoio::Runtime<monoio::IoUringDriver>> {
    let mut builder = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new().with_entries(4096);
    if let Some(urb) = setup.builder() {
        builder = builder.uring_builder(urb);
    }
    // No `enable_timer`: the worker's waits are on `deadlines`, whose timerfd is read through
    // the ring (see that module for what monoio's timer driver cost per park).
    builder.build()
}

fn run_worker(id: usize, shared: Arc<Shared>, listener: std::net::TcpListener, driver: Driver) {
    let result = match driver {
        Driver::IoUring => {
            let setup = RingSetup::from_env();
            // An older kernel answers EINVAL to flags it does not know: fall back to the default
            // ring rather than refuse to start.
            uring_runtime(setup)
                .or_else(|e| {
                    if setup == RingSetup::Plain {
                        return Err(e);
                    }
                    tracing::debug!(target: "mcp_guard::runtime", "worker {id}: io_uring setup {setup:?} refused ({e}); using the default ring");
                    uring_runtime(RingSetup::Plain)
                })
                .map(|mut rt| rt.block_on(worker_main(id, shared, listener)))
        }
        Driver::Epoll => monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .map(|mut rt| rt.block_on(worker_main(id, shared, listener))),
    };
    if let Err(e) = result {
        tracing::error!(target: "mcp_guard::runtime", "worker {id} could not start its runtime: {e}");
        std::process::exit(1);
    }
}

async fn worker_main(id: usize, shared: Arc<Shared>, listener: std::net::TcpListener) {
    let listener = match monoio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(target: "mcp_guard::runtime", "worker {id}: listener setup failed: {e}");
            std::process::exit(1);
        }
    };
    let w = Worker::new(id, shared);
    worker::run(w, listener).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_held_by_reuseport_listeners_is_refused_and_a_free_one_is_not() {
        let held = bind_listeners("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let addr = held[0].local_addr().unwrap();
        // The SO_REUSEPORT listeners would let a third one join; the probe must not.
        let err = refuse_taken_port(addr).unwrap_err();
        assert!(err.contains(&addr.to_string()), "{err}");
        assert!(err.contains("another mcp-guard"), "{err}");
        drop(held);
        refuse_taken_port(addr).unwrap();
        refuse_taken_port("127.0.0.1:0".parse().unwrap()).unwrap();
    }
}
