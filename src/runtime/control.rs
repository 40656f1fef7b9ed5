//! The control loop on the main thread: signals (SIGHUP reload, SIGTERM/SIGINT shutdown),
//! config-file change detection, reload and upstream reconciliation, retiring and reaping of
//! stdio children. It may block (with timeouts); the workers never wait on it. Upstream health
//! checks run on a thread of their own, so a hung upstream cannot delay a signal.

use crate::config::Settings;
use crate::runtime::worker::Shared;
use crate::upstream::set::Upstream;
use crate::upstream::stdio::StdioHub;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

enum Event {
    Reload,
    Stop,
}

/// A file's identity for change detection: modification time and length.
pub type FileStamp = Option<(SystemTime, u64)>;

/// Signals, as the control loop receives them.
pub struct SignalEvents(mpsc::Receiver<Event>);

/// Installs the SIGHUP/SIGINT/SIGTERM handlers. Called before the gateway announces that it
/// listens: a SIGHUP arriving before then would otherwise take its default action (terminate).
pub fn install_signals() -> SignalEvents {
    let (tx, rx) = mpsc::channel();
    match signal_hook::iterator::Signals::new([SIGHUP, SIGINT, SIGTERM]) {
        Ok(mut signals) => {
            let _ = std::thread::Builder::new()
                .name("signals".into())
                .spawn(move || {
                    for s in signals.forever() {
                        let ev = if s == SIGHUP {
                            Event::Reload
                        } else {
                            Event::Stop
                        };
                        if tx.send(ev).is_err() {
                            return;
                        }
                    }
                });
        }
        Err(e) => tracing::error!(target: "mcp_guard", "cannot install signal handlers: {e}"),
    }
    SignalEvents(rx)
}

/// Runs until a shutdown signal arrives; `loaded` is the file's stamp when it was loaded.
pub fn run(path: &Path, loaded: FileStamp, signals: SignalEvents, shared: &Arc<Shared>) {
    let rx = signals.0;
    let mut last_seen = loaded;
    // A change seen on disk, and since when it has not changed again.
    let mut settling: Option<(FileStamp, Instant)> = None;
    let mut next_sweep = Instant::now() + Duration::from_secs(10);
    // Shared hubs scan every session to find idle ones: every few seconds is plenty.
    let mut next_expiry = Instant::now();
    spawn_health_checks(shared);
    loop {
        let poll = if settling.is_some() {
            Duration::from_millis(100)
        } else {
            Duration::from_millis(500)
        };
        match rx.recv_timeout(poll) {
            Ok(Event::Stop) => return,
            Ok(Event::Reload) => {
                last_seen = file_stamp(path);
                reload(path, shared);
                // SIGHUP is also the log-rotation signal for the audit file.
                if let Some(a) = &shared.audit_writer {
                    a.reopen();
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        // Debounce: a file being written is read only once it has stopped changing for
        // `SETTLE`, so an editor's or a deploy tool's half-written file is not loaded.
        let stamp = file_stamp(path);
        if stamp == last_seen {
            settling = None;
        } else {
            match settling {
                Some((s, since)) if s == stamp => {
                    if since.elapsed() >= SETTLE {
                        settling = None;
                        last_seen = stamp;
                        reload(path, shared);
                    }
                }
                _ => settling = Some((stamp, Instant::now())),
            }
        }
        let cfg = shared.config.load();
        if let Some(set) = cfg.upstreams.as_deref() {
            if Instant::now() >= next_expiry {
                next_expiry = Instant::now() + Duration::from_secs(2);
                for hub in set.hubs() {
                    hub.expire_idle(cfg.server.session_idle);
                }
            }
            for pool in set.pools() {
                let stopped = pool.reap_idle(Instant::now());
                if stopped > 0 {
                    tracing::info!(target: "mcp_guard::upstream", "stopped {stopped} idle per-session stdio child(ren)");
                }
            }
        }
        for hub in take_retiring(shared, false) {
            // Joining a hub waits for its child to exit: not on the control loop.
            let _ = std::thread::Builder::new()
                .name("retire-stdio".into())
                .spawn(move || hub.shutdown());
        }
        if Instant::now() >= next_sweep {
            shared.quota.sweep(Instant::now());
            next_sweep = Instant::now() + Duration::from_secs(10);
        }
    }
}

/// How long a changed config file must stay unchanged before it is reloaded.
const SETTLE: Duration = Duration::from_millis(300);

/// The current stamp of `path` (`None` when it cannot be read).
pub fn file_stamp(path: &Path) -> FileStamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Loads, validates and swaps in a new snapshot; on any error the old one keeps serving.
pub fn reload(path: &Path, shared: &Shared) {
    let metrics = &shared.metrics.global;
    // A parser bug must cost a refused reload, not the running gateway.
    let loaded = std::panic::catch_unwind(|| Settings::load(path)).unwrap_or_else(|_| {
        Err(crate::config::ConfigError::new(
            "internal error while loading the configuration",
        ))
    });
    let new = match loaded {
        Ok(s) => s,
        Err(e) => {
            metrics.reloads_failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(target: "mcp_guard::config", "reload refused, keeping the running configuration: {e}");
            return;
        }
    };
    let old = shared.config.load();
    // The downgrade is checked before the restart-only keys: a file that both drops every
    // credential and changes such a key is refused either way, but only this check counts and
    // audits the downgrade, and that is what an operator watching for it needs to see.
    if old.auth.requires_credentials() && !new.auth.requires_credentials() {
        // Going from "credentials required" to "anyone may call anything" is never a reload:
        // a file that lost its keys (a bad edit, a half-written file) would otherwise open the
        // gateway silently. It takes a restart, which is a deliberate act.
        metrics.reloads_failed.fetch_add(1, Ordering::Relaxed);
        metrics
            .reloads_auth_downgrade_refused
            .fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            target: "mcp_guard::config",
            "reload refused, keeping the running configuration: the new file configures no \
             authentication, which would make every caller anonymous; restart the gateway to \
             turn authentication off"
        );
        shared
            .control_audit
            .push(reload_refused_event("auth_downgrade"));
        return;
    }
    if old.server.tls.is_some() != new.server.tls.is_some() {
        // A listener does not change protocol under its clients; a file that lost its
        // [server.tls] must not turn the gateway into plain HTTP by a reload either.
        metrics.reloads_failed.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            target: "mcp_guard::config",
            "reload refused, keeping the running configuration: server.tls was added or removed, which needs a restart"
        );
        return;
    }
    if let Some(field) =
        crate::config::reference::restart_only_change(&old.file_view, &new.file_view)
    {
        metrics.reloads_failed.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            target: "mcp_guard::config",
            "reload refused, keeping the running configuration: {field} changed, which needs a restart"
        );
        return;
    }
    // The upstreams of the new snapshot: unchanged ones carried over running, changed ones
    // started now (before the swap, so a command that cannot start refuses the reload).
    let mut new = new;
    let running = old.upstreams.clone();
    let retired = match running.as_deref() {
        Some(set) => match set.reconcile(&new, &shared.metrics) {
            Ok((set, retired)) => {
                new.upstreams = Some(Arc::new(set));
                retired
            }
            Err(e) => {
                metrics.reloads_failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    target: "mcp_guard::config",
                    "reload refused, keeping the running configuration: the new upstream cannot start: {e}"
                );
                return;
            }
        },
        None => Vec::new(),
    };
    // The pins live across reloads (`pinning.enabled` and `store` take a restart); a reload
    // re-reads the pin file, taking in approvals made with `mcp-guard pins approve`.
    new.pins = old.pins.clone();
    if let Some(pins) = &new.pins {
        pins.reread();
    }
    // The JWKS of an unchanged source is taken over, keys and refresher; a new one starts.
    if let Some(auth) = Arc::get_mut(&mut new.auth) {
        auth.start(Some(&old.auth));
    }
    shared.config.store(Arc::new(new));
    if !retired.is_empty() {
        let deadline = Instant::now() + shared.config.load().server.shutdown_grace;
        if let Ok(mut r) = shared.retiring.lock() {
            r.extend(retired.into_iter().map(|h| (h, deadline)));
        }
        tracing::info!(target: "mcp_guard::upstream", "upstream replaced; the old one finishes its in-flight requests");
    }
    metrics.reloads_ok.fetch_add(1, Ordering::Relaxed);
    tracing::info!(target: "mcp_guard::config", "configuration reloaded from {}", path.display());
}

/// Replaced stdio hubs that are done: nothing but the retirement list holds them any more (no
/// request, no snapshot), or their grace has passed; with `all`, every one (shutdown).
pub fn take_retiring(shared: &Shared, all: bool) -> Vec<Arc<StdioHub>> {
    let Ok(mut list) = shared.retiring.lock() else {
        return Vec::new();
    };
    let now = Instant::now();
    let (done, keep): (Vec<_>, Vec<_>) = list
        .drain(..)
        .partition(|(hub, deadline)| all || Arc::strong_count(hub) == 1 || now >= *deadline);
    *list = keep;
    done.into_iter().map(|(hub, _)| hub).collect()
}

/// The audit event of a refused reload (the control thread's own queue; never blocks).
fn reload_refused_event(reason: &'static str) -> crate::audit::AuditEvent {
    crate::audit::AuditEvent {
        time: SystemTime::now(),
        request_id: "config-reload".into(),
        client_request_id: None,
        trace_id: None,
        identity: None,
        auth_method: "none",
        client: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        method: "config/reload".into(),
        target: None,
        decision: "deny",
        reason: Some(reason),
        status: 0,
        upstream: crate::config::DEFAULT_ROUTE.into(),
        latency_us: 0,
        arguments: None,
        details: Vec::new(),
        session: None,
    }
}

/// One round of upstream checks, every HTTP server at once.
fn check_health(shared: &Shared) {
    let cfg = shared.config.load_full();
    let Some(set) = cfg.upstreams.as_deref() else {
        return;
    };
    std::thread::scope(|scope| {
        for (name, upstream) in set.iter() {
            if let Upstream::Http(server) = upstream {
                scope.spawn(move || crate::upstream::health::check(name, server));
            }
        }
    });
}

/// Checks the upstreams every 2 s on a thread of its own until shutdown begins: a replica that
/// accepts and never answers must not hold up signals, reloads or shutdown.
fn spawn_health_checks(shared: &Arc<Shared>) {
    let shared = shared.clone();
    let _ = std::thread::Builder::new()
        .name("health".into())
        .spawn(move || {
            while !shared.shutdown_rx.is_closed() {
                check_health(&shared);
                std::thread::sleep(Duration::from_secs(2));
            }
        });
}
