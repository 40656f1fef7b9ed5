//! The stdio hub: one shared child process speaking newline-delimited JSON-RPC, reached by
//! every worker.
//!
//! This file is process supervision; where each message goes is decided by the pure
//! [`Router`] in `router.rs` (ids, progress tokens, cancellations and server-initiated requests
//! remapped per session; every line to the child framed as one compact JSON line).
//!
//! All hub state (the router, the sessions' server-to-client streams, the child) sits in one
//! [`Supervisor`] behind a mutex, held only for a decision and never across a wait. A request
//! is decided on the worker that carries it, which writes its line straight into the child's
//! stdin (non-blocking). The child's stdout is one end of a socket pair, read by a task on the
//! home worker (worker 0) like any connection, which routes each line there and wakes the
//! waiting request ([`StdoutClaim`]; a reader thread outside the runtime). So a request on the
//! home worker never leaves its thread, and one on another worker is woken once. A line the
//! pipe cannot take at once goes to the *writer* thread's
//! bounded queue (and every line after it, until the queue drains, to keep their order), so a
//! child that stops reading never blocks a worker or wedges routing. The *hub* thread does what
//! takes time or a timer: restarts with backoff, reaping an exited child, idle expiry, the
//! legacy SSE link's messages, shutdown. A *stderr* thread forwards the child's log.
//!
//! Sessions are the hub's own (stdio has none): created when an initialize succeeds, capped per
//! identity, they survive a child restart, and the hub replays its own initialize to the new
//! child so clients carry on.

use crate::config::{PerSession, SseSettings, StdioSettings};
use crate::error::GatewayError;
use crate::http::body::HeldBody;
use crate::mcp::jsonrpc::{Body, Kind, Message};
use crate::observe::metrics::Metrics;
use crate::upstream::events::{EventSender, Queued};
use crate::upstream::router::{Limits, Output, Router};
use crate::upstream::sse::SseLink;
use crate::upstream::{Answer, Exchange, Outgoing};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

pub use crate::upstream::router::SessionKey;

/// What a hub's router talks to: a child process over its stdin and stdout, or a legacy
/// HTTP+SSE server over its stream and messages endpoint. The router cannot tell them apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    /// A child process speaking newline-delimited JSON-RPC.
    Process(StdioSettings),
    /// A legacy HTTP+SSE server.
    Sse(SseSettings),
}

impl Link {
    /// One child (or connection) per session, with these limits; `None`: one shared.
    pub fn per_session(&self) -> Option<PerSession> {
        match self {
            Link::Process(s) => s.per_session,
            Link::Sse(s) => s.per_session,
        }
    }

    /// What it is, for messages: the command, or the stream's URL.
    pub fn describe(&self) -> String {
        match self {
            Link::Process(s) => format!("stdio upstream `{}`", s.command),
            Link::Sse(s) => format!("SSE upstream {}", s.endpoint.url),
        }
    }
}

/// A running child or connection.
enum Running {
    Process(Child),
    Sse(SseLink),
}

impl Running {
    /// Stops it at once, with whatever it started; says how it ended, for the log.
    fn kill(self) -> String {
        match self {
            Running::Process(mut c) => {
                // The reader may have stopped on an oversized line while the child still runs.
                signal_group(&c, libc::SIGKILL);
                let _ = c.kill();
                format!("{:?}", c.wait())
            }
            Running::Sse(link) => {
                link.cut();
                "connection closed".into()
            }
        }
    }

    /// Stops it gently, as the MCP stdio transport asks: a process gets its stdin closed
    /// (already done by the caller) and two seconds to exit, then SIGTERM and half a second
    /// more, then SIGKILL; each signal goes to its whole process group, so what it started
    /// (and left holding its output) goes with it. A connection is closed.
    fn stop(self) {
        match self {
            Running::Process(mut child) => {
                let exits_within = |child: &Child, within: Duration| {
                    let deadline = Instant::now() + within;
                    while !has_exited(child) {
                        if Instant::now() >= deadline {
                            return false;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    true
                };
                if exits_within(&child, Duration::from_secs(2)) {
                    // What it left running is asked to go too.
                    signal_group(&child, libc::SIGTERM);
                } else {
                    signal_group(&child, libc::SIGTERM);
                    if !exits_within(&child, Duration::from_millis(500)) {
                        signal_group(&child, libc::SIGKILL);
                        let _ = child.kill();
                    }
                }
                let _ = child.wait();
            }
            Running::Sse(link) => link.cut(),
        }
    }
}

/// Sends `signal` to the child's process group (it leads one of its own: `confine_child`).
/// Only before the child is reaped: until then its id cannot name another process or group.
#[allow(unsafe_code)]
fn signal_group(child: &Child, signal: libc::c_int) {
    let Ok(group) = libc::pid_t::try_from(child.id()) else {
        return;
    };
    // SAFETY: kill with a negated process group id and a signal number; no memory is involved.
    unsafe {
        libc::kill(-group, signal);
    }
}

/// Whether the child has exited, without reaping it (so its group can still be signalled).
#[allow(unsafe_code)]
fn has_exited(child: &Child) -> bool {
    // SAFETY: an all-zero siginfo_t is valid; waitid writes only into it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid on our own child's pid with a valid siginfo_t pointer; WNOWAIT leaves it
    // unreaped, WNOHANG never blocks.
    let r = unsafe {
        libc::waitid(
            libc::P_PID,
            child.id(),
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    // An error (no such child: reaped already) counts as exited.
    // SAFETY: si_pid is the field waitid fills for WEXITED; zero when nothing has exited.
    r != 0 || unsafe { info.si_pid() } != 0
}

/// What the router answers a worker.
#[derive(Debug)]
pub enum HubReply {
    /// The response message (original id restored); a new session when it answered initialize.
    Response(Vec<u8>, Option<SessionKey>),
    /// A notification or client response was handed to the child.
    Accepted,
    /// A server-to-client stream for the session.
    Stream(async_channel::Receiver<Vec<u8>>, Queued),
    /// The session was ended.
    Deleted,
    /// Refused.
    Error(GatewayError),
}

/// How the router answers a worker waiting on a request: its reply, and for a request that
/// asked for progress, the stream its related messages go on (the request's own SSE answer).
#[derive(Debug)]
struct Waiter {
    reply: async_channel::Sender<HubReply>,
    related: Option<EventSender>,
}

impl Waiter {
    fn try_send(&self, r: HubReply) -> Result<(), async_channel::TrySendError<HubReply>> {
        self.reply.try_send(r)
    }
}

enum Command_ {
    Call {
        hub_id: u64,
        session: Option<SessionKey>,
        identity: Box<str>,
        message: Vec<u8>,
        reply: Waiter,
    },
    Send {
        session: SessionKey,
        message: Vec<u8>,
        reply: async_channel::Sender<HubReply>,
    },
    OpenStream {
        session: SessionKey,
        reply: async_channel::Sender<HubReply>,
    },
    Delete {
        session: SessionKey,
        reply: async_channel::Sender<HubReply>,
    },
    Cancel {
        hub_id: u64,
    },
    /// End the sessions idle this long.
    ExpireIdle(Duration),
    FromChild(u64, Vec<u8>),
    ChildExited(u64),
    Shutdown,
}

/// The worker-side handle.
pub struct StdioHub {
    /// Decisions taken on the caller's thread.
    supervisor: Arc<Mutex<Supervisor>>,
    /// Work for the hub thread (see the module doc).
    inbox: SyncSender<Command_>,
    next_id: AtomicU64,
    alive: Arc<AtomicBool>,
    answered: Arc<AtomicBool>,
    router: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Commands queued to the hub thread beyond this are refused rather than waited for.
const INBOX_CAPACITY: usize = 4096;
/// Lines queued for the child's stdin behind one it could not take at once; beyond it a
/// request is refused (503).
const STDIN_CAPACITY: usize = 1024;
/// Bytes those lines may hold together: a child that stops reading cannot make the gateway
/// hold more for it than this (plus one line, when that line alone is larger).
const STDIN_QUEUE_BYTES: usize = 16 * 1024 * 1024;
/// Longest line accepted from the child.
const MAX_LINE: usize = 64 * 1024 * 1024;
/// Sessions kept; beyond it the least recently used session of the identity holding the most
/// is evicted.
const MAX_SESSIONS: usize = 65_536;
/// Sessions kept per identity; beyond it the identity's own least recently used is evicted.
const MAX_SESSIONS_PER_IDENTITY: usize = 4_096;
/// Client requests in flight (each also holds a worker until its timeout).
const MAX_PENDING: usize = 16_384;
/// Server-initiated requests awaiting a client's answer; beyond it the oldest is refused.
const MAX_SERVER_REQUESTS: usize = 1_024;

impl StdioHub {
    /// Starts the router and the first child.
    /// The first child is started here, on the caller's thread: one that cannot be started at
    /// all is a start-up error (one that dies later is restarted with backoff).
    pub fn start(link: Link, metrics: Arc<Metrics>) -> Result<Arc<StdioHub>, String> {
        let (tx, rx) = std::sync::mpsc::sync_channel(INBOX_CAPACITY);
        let alive = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicBool::new(false));
        let supervisor = Arc::new_cyclic(|me| {
            Mutex::new(Supervisor {
                me: me.clone(),
                shut: false,
                link,
                inbox_tx: tx.clone(),
                metrics,
                alive: alive.clone(),
                answered: answered.clone(),
                child: None,
                stdin: None,
                generation: 0,
                router: Router::new(Limits {
                    max_sessions: MAX_SESSIONS,
                    max_sessions_per_identity: MAX_SESSIONS_PER_IDENTITY,
                    max_pending: MAX_PENDING,
                    max_server_requests: MAX_SERVER_REQUESTS,
                }),
                streams: HashMap::new(),
                backoff: Duration::from_millis(100),
                restart_at: Some(Instant::now()),
                started_at: Instant::now(),
            })
        });
        {
            let mut first = lock(&supervisor);
            if let Err(e) = first.spawn_child() {
                return Err(format!("cannot start the {}: {e}", first.link.describe()));
            }
        }
        let for_hub = supervisor.clone();
        let handle = std::thread::Builder::new()
            .name("stdio-hub".into())
            .spawn(move || run_hub(&for_hub, rx))
            .map_err(|e| format!("cannot start the stdio hub thread: {e}"))?;
        Ok(Arc::new(StdioHub {
            supervisor,
            inbox: tx,
            next_id: AtomicU64::new(1),
            alive,
            answered,
            router: std::sync::Mutex::new(Some(handle)),
        }))
    }

    /// Asks the hub to end the sessions without a request for `idle` (the control thread's
    /// sweep); skipped when the hub is busy.
    pub fn expire_idle(&self, idle: Duration) {
        let _ = self.inbox.try_send(Command_::ExpireIdle(idle));
    }

    /// Whether the child is running.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }

    /// Whether a child has ever answered (the hub pings each new one).
    pub fn has_answered(&self) -> bool {
        self.answered.load(Ordering::Relaxed)
    }

    /// Decides `cmd` here, on the caller's thread; its answer goes to the reply channel in it.
    fn submit(&self, cmd: Command_) -> Result<(), GatewayError> {
        decide(&self.supervisor, cmd)
    }

    /// Sends a request; returns its hub id (for [`StdioHub::cancel`]) and the reply channel.
    /// `identity` is the caller's session binding: an initialize creates a session owned by it
    /// (and counted against its per-identity cap); any other request must come from the owner.
    pub fn call(
        &self,
        session: Option<SessionKey>,
        identity: &str,
        message: Vec<u8>,
        related: Option<EventSender>,
    ) -> Result<(u64, async_channel::Receiver<HubReply>), GatewayError> {
        let hub_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, rx) = async_channel::bounded(1);
        self.submit(Command_::Call {
            hub_id,
            session,
            identity: identity.into(),
            message,
            reply: Waiter { reply, related },
        })?;
        Ok((hub_id, rx))
    }

    /// Hands a notification or a client response to the child.
    pub fn send(
        &self,
        session: SessionKey,
        message: Vec<u8>,
    ) -> Result<async_channel::Receiver<HubReply>, GatewayError> {
        let (reply, rx) = async_channel::bounded(1);
        self.submit(Command_::Send {
            session,
            message,
            reply,
        })?;
        Ok(rx)
    }

    /// Opens the server-to-client stream of a session.
    pub fn open_stream(
        &self,
        session: SessionKey,
    ) -> Result<async_channel::Receiver<HubReply>, GatewayError> {
        let (reply, rx) = async_channel::bounded(1);
        self.submit(Command_::OpenStream { session, reply })?;
        Ok(rx)
    }

    /// Ends a session.
    pub fn delete(
        &self,
        session: SessionKey,
    ) -> Result<async_channel::Receiver<HubReply>, GatewayError> {
        let (reply, rx) = async_channel::bounded(1);
        self.submit(Command_::Delete { session, reply })?;
        Ok(rx)
    }

    /// Gives up on a request (its client timed out); the child is told it was cancelled.
    pub fn cancel(&self, hub_id: u64) {
        let _ = self.submit(Command_::Cancel { hub_id });
    }

    /// Stops the child (stdin closed, then killed after `grace`) and the router.
    pub fn shutdown(&self) {
        let _ = self.inbox.send(Command_::Shutdown);
        if let Some(h) = self.router.lock().ok().and_then(|mut g| g.take()) {
            let _ = h.join();
        }
    }
}

/// The worker-side calls of the upstream interface (`UpstreamRef::Stdio`).
impl StdioHub {
    /// Posts one message or a batch. Requests wait for their response; notifications and
    /// client responses are accepted once the child has them. Only an initialize may come
    /// without a session; it opens one, returned for the client.
    pub async fn post(
        &self,
        out: &Outgoing<'_>,
        body: &Body,
        raw: HeldBody,
    ) -> Result<Exchange, GatewayError> {
        let key = out.session.map(hub_key).transpose()?;
        match body {
            Body::Single(m) if m.kind == Kind::Request && key.is_some() && asks_progress(&raw) => {
                // The bytes move to the child (or its bounded queue): their share of the
                // worker's body allowance ends once they are handed over, before the wait.
                let (bytes, _share) = raw.into_parts();
                self.streamed(m, bytes, key, out)
            }
            Body::Single(m) => {
                if key.is_none() && !(m.kind == Kind::Request && m.method_str() == "initialize") {
                    return Err(GatewayError::MissingSession);
                }
                let (bytes, share) = raw.into_parts();
                let handed = self.hand(m, bytes, key, out)?;
                drop(share);
                let (bytes, new_session) =
                    self.settle(handed, Instant::now() + out.timeout).await?;
                Ok(match bytes {
                    None => Exchange::of(Answer::Accepted),
                    Some(body) => Exchange {
                        answer: Answer::Complete { status: 200, body },
                        session: new_session.map(|k| k.to_vec()),
                    },
                })
            }
            Body::Batch(messages) => self.batch(messages, raw, key, out).await,
        }
    }

    /// A batch: every element handed to the child at once (or none, when its queue cannot take
    /// them all: a client told 503 may send the batch again without any of it arriving twice),
    /// then the answers gathered in the batch's order within one timeout.
    async fn batch(
        &self,
        messages: &[Message],
        raw: HeldBody,
        key: Option<SessionKey>,
        out: &Outgoing<'_>,
    ) -> Result<Exchange, GatewayError> {
        let key = key.ok_or(GatewayError::MissingSession)?;
        // Each element is re-serialised on its own; the batch's bytes are split, not edited.
        let parts: Vec<serde_json::Value> =
            serde_json::from_slice(&raw).map_err(|e| GatewayError::Parse(e.to_string()))?;
        // The elements stand in for the body now; its share counts them until they are handed.
        let (_bytes, share) = raw.into_parts();
        let mut commands = Vec::with_capacity(parts.len());
        let mut waits = Vec::with_capacity(parts.len());
        let mut bytes = 0;
        for (m, part) in messages.iter().zip(parts) {
            let line = part.to_string().into_bytes();
            bytes += line.len();
            let (reply, rx) = async_channel::bounded(1);
            if m.kind == Kind::Request {
                let hub_id = self.next_id.fetch_add(1, Ordering::Relaxed);
                commands.push(Command_::Call {
                    hub_id,
                    session: Some(key),
                    identity: out.binding.into(),
                    message: line,
                    reply: Waiter {
                        reply,
                        related: None,
                    },
                });
                waits.push(Handed::Call(hub_id, rx));
            } else {
                commands.push(Command_::Send {
                    session: key,
                    message: line,
                    reply,
                });
                waits.push(Handed::Sent(rx));
            }
        }
        decide_all(&self.supervisor, commands, bytes)?;
        drop(share);
        let deadline = Instant::now() + out.timeout;
        let mut answers = Vec::new();
        let mut refused = None;
        for (m, handed) in messages.iter().zip(waits) {
            // Once the shutdown grace has run out, every answer still awaited is given up
            // (the call cancelled) and answered 503 in its place; those already in are kept.
            let settled = monoio::select! {
                settled = self.settle(handed, deadline) => settled,
                _ = out.grace_over.wait() => Err(GatewayError::ShuttingDown),
            };
            match settled {
                Ok((answer, _)) => answers.extend(answer),
                // A request that failed (timed out: the deadline is shared, so the rest are
                // cancelled at once too; its child gone) is answered in its place with its
                // error, as JSON-RPC answers each request of a batch: the others keep theirs.
                Err(e) if m.kind == Kind::Request => answers.push(e.body(m.id.as_ref())),
                // A notification or response the child did not take has no answer of its own.
                Err(e) => {
                    refused.get_or_insert(e);
                }
            }
        }
        if answers.is_empty() {
            return match refused {
                Some(e) => Err(e),
                None => Ok(Exchange::of(Answer::Accepted)),
            };
        }
        let mut joined = Vec::from(&b"["[..]);
        for (i, b) in answers.iter().enumerate() {
            if i > 0 {
                joined.push(b',');
            }
            joined.extend_from_slice(b);
        }
        joined.push(b']');
        Ok(Exchange::of(Answer::Complete {
            status: 200,
            body: joined,
        }))
    }

    /// A request that asked for progress, answered as an SSE stream: its progress as the
    /// child reports it, then its response, in that order on one connection (the transport's
    /// place for messages related to a request; on the GET stream they would race the answer,
    /// and clients drop progress that arrives after its result).
    fn streamed(
        &self,
        m: &Message,
        bytes: Vec<u8>,
        key: Option<SessionKey>,
        out: &Outgoing<'_>,
    ) -> Result<Exchange, GatewayError> {
        let (events, stream, queued) = super::events::channel();
        let (hub_id, reply) = self.call(key, out.binding, bytes, Some(events.clone()))?;
        let supervisor = self.supervisor.clone();
        let id = m.id.clone();
        let timeout = out.timeout;
        let grace_over = out.grace_over.clone();
        // The response (or the error in its place) is the stream's last event; the router
        // drops its own sender once the request is answered, so the stream then ends.
        monoio::spawn(async move {
            // The shutdown grace running out ends the wait too, as it ends a call waiting for
            // a JSON answer. It must: a task left waiting on the hub's channel when its
            // worker's runtime ends is dropped by the hub's thread when that next wakes it,
            // inside the channel's own lock, which the drop then takes again (the gateway
            // never exited).
            let answer = monoio::select! {
                answer = crate::runtime::deadlines::timeout(timeout, reply.recv()) => Some(answer),
                _ = grace_over.wait() => None,
            };
            let last = match answer {
                Some(Ok(Ok(HubReply::Response(b, _)))) => b,
                Some(Ok(Ok(HubReply::Error(e)))) => e.body(id.as_ref()),
                Some(Err(_)) => {
                    let _ = decide(&supervisor, Command_::Cancel { hub_id });
                    GatewayError::UpstreamTimeout.body(id.as_ref())
                }
                None => {
                    let _ = decide(&supervisor, Command_::Cancel { hub_id });
                    GatewayError::ShuttingDown.body(id.as_ref())
                }
                _ => stopped().body(id.as_ref()),
            };
            events.send_last(last).await;
        });
        Ok(Exchange::of(Answer::Events(stream, Some(queued))))
    }

    /// Hands one message to the child: a request to be answered, or a notification or client
    /// response to be taken.
    fn hand(
        &self,
        m: &Message,
        bytes: Vec<u8>,
        key: Option<SessionKey>,
        out: &Outgoing<'_>,
    ) -> Result<Handed, GatewayError> {
        if m.kind == Kind::Request {
            let (hub_id, rx) = self.call(key, out.binding, bytes, None)?;
            Ok(Handed::Call(hub_id, rx))
        } else {
            let key = key.ok_or(GatewayError::MissingSession)?;
            Ok(Handed::Sent(self.send(key, bytes)?))
        }
    }

    /// What became of a handed message: a request's answer (and the session an initialize
    /// opened) by `deadline`, or `None` once a notification was taken.
    async fn settle(
        &self,
        handed: Handed,
        deadline: Instant,
    ) -> Result<(Option<Vec<u8>>, Option<SessionKey>), GatewayError> {
        match handed {
            Handed::Call(hub_id, rx) => {
                let left = deadline.saturating_duration_since(Instant::now());
                match crate::runtime::deadlines::timeout(left, rx.recv()).await {
                    Err(_) => {
                        self.cancel(hub_id);
                        Err(GatewayError::UpstreamTimeout)
                    }
                    Ok(Err(_)) => Err(stopped()),
                    Ok(Ok(HubReply::Response(b, s))) => Ok((Some(b), s)),
                    Ok(Ok(HubReply::Error(e))) => Err(e),
                    Ok(Ok(_)) => Err(GatewayError::UpstreamUnavailable(
                        "unexpected hub reply".into(),
                    )),
                }
            }
            Handed::Sent(rx) => match rx.recv().await {
                Ok(HubReply::Accepted) => Ok((None, None)),
                Ok(HubReply::Error(e)) => Err(e),
                _ => Err(stopped()),
            },
        }
    }

    /// The session's server-to-client stream.
    pub async fn stream(&self, out: &Outgoing<'_>) -> Result<Exchange, GatewayError> {
        let key = hub_key(out.session.ok_or(GatewayError::MissingSession)?)?;
        match self.open_stream(key)?.recv().await {
            Ok(HubReply::Stream(events, queued)) => {
                Ok(Exchange::of(Answer::Events(events, Some(queued))))
            }
            Ok(HubReply::Error(e)) => Err(e),
            _ => Err(stopped()),
        }
    }

    /// Ends the session.
    pub async fn end(&self, out: &Outgoing<'_>) -> Result<Exchange, GatewayError> {
        let key = hub_key(out.session.ok_or(GatewayError::MissingSession)?)?;
        match self.delete(key)?.recv().await {
            Ok(HubReply::Deleted) => Ok(Exchange::of(Answer::Ended)),
            Ok(HubReply::Error(e)) => Err(e),
            _ => Err(stopped()),
        }
    }
}

/// The supervisor, whoever held it last: a panic under the lock (a bug, never input) must not
/// take every later request down with it.
fn lock(supervisor: &Mutex<Supervisor>) -> MutexGuard<'_, Supervisor> {
    supervisor
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A message handed to the child, waiting for what becomes of it.
enum Handed {
    /// A request (its hub id, for cancelling) and where its answer will come.
    Call(u64, async_channel::Receiver<HubReply>),
    /// A notification or client response, and where its acceptance will come.
    Sent(async_channel::Receiver<HubReply>),
}

/// Decides every command of a batch under one hold of the lock, or none of them (503) when the
/// child's stdin queue could not take all of their `bytes`.
fn decide_all(
    supervisor: &Mutex<Supervisor>,
    commands: Vec<Command_>,
    bytes: usize,
) -> Result<(), GatewayError> {
    let mut supervisor = lock(supervisor);
    if supervisor.shut {
        return Err(stopped());
    }
    if let Some(stdin) = &supervisor.stdin
        && !stdin.has_room(commands.len(), bytes)
    {
        return Err(GatewayError::UpstreamBusy);
    }
    for cmd in commands {
        supervisor.handle(cmd);
    }
    Ok(())
}

/// Decides `cmd` on this thread; refused once the hub has shut down.
fn decide(supervisor: &Mutex<Supervisor>, cmd: Command_) -> Result<(), GatewayError> {
    let mut supervisor = lock(supervisor);
    if supervisor.shut {
        return Err(stopped());
    }
    supervisor.handle(cmd);
    Ok(())
}

/// The hub thread: restarts when their time comes, and the work sent to it, until shutdown;
/// then the child is stopped outside the lock (it may take seconds to exit).
fn run_hub(supervisor: &Mutex<Supervisor>, rx: Receiver<Command_>) {
    loop {
        let restart_at = {
            let mut s = lock(supervisor);
            if let Some(at) = s.restart_at
                && Instant::now() >= at
            {
                // A failure is logged and retried with backoff (`schedule_restart`).
                let _ = s.spawn_child();
            }
            s.restart_at
        };
        let wait = restart_at.map_or(CHILD_CHECK, |at| {
            at.saturating_duration_since(Instant::now())
                .min(CHILD_CHECK)
        });
        let cmd = match rx.recv_timeout(wait) {
            Ok(c) => c,
            Err(RecvTimeoutError::Timeout) => {
                lock(supervisor).reap_if_exited();
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        match cmd {
            Command_::Shutdown => break,
            other => lock(supervisor).handle(other),
        }
    }
    let (child, router) = {
        let mut s = lock(supervisor);
        s.shut = true;
        (s.detach_child(), std::mem::take(&mut s.router))
    };
    // Requests still waiting on this hub fail now (their reply channels close) rather than at
    // their timeout: nothing will answer them.
    drop(router);
    if let Some(running) = child {
        running.stop();
    }
}

/// How often the hub thread looks whether its child has exited, for a child whose output stays
/// open after it (a process it started holds its stdout).
const CHILD_CHECK: Duration = Duration::from_secs(1);

/// The hub went away under a request: the gateway is shutting down, or this upstream (a
/// replaced one, a per-session child ended idle or by DELETE) was stopped.
fn stopped() -> GatewayError {
    GatewayError::UpstreamUnavailable("the upstream process was stopped".into())
}

/// Whether a request's `params._meta` carries a `progressToken` (parsed only when the bytes
/// mention one).
fn asks_progress(raw: &[u8]) -> bool {
    memchr::memmem::find(raw, b"progressToken").is_some()
        && serde_json::from_slice::<serde_json::Value>(raw)
            .ok()
            .and_then(|v| v.pointer("/params/_meta/progressToken").cloned())
            .is_some()
}

/// A verified session payload as a hub key; any other length is not one of ours.
fn hub_key(payload: &[u8]) -> Result<SessionKey, GatewayError> {
    payload.try_into().map_err(|_| GatewayError::UnknownSession)
}

/// The hub thread's state: the child and its pipes, the sessions' streams, and the
/// [`Router`] that decides where every message goes.
struct Supervisor {
    /// Itself, for the reader threads it starts.
    me: Weak<Mutex<Supervisor>>,
    /// Shut down: every request is refused.
    shut: bool,
    link: Link,
    inbox_tx: SyncSender<Command_>,
    metrics: Arc<Metrics>,
    alive: Arc<AtomicBool>,
    /// Set once any child has written a line: it has answered at least once.
    answered: Arc<AtomicBool>,
    child: Option<Running>,
    stdin: Option<ChildInput>,
    generation: u64,
    router: Router<Waiter>,
    streams: HashMap<SessionKey, Vec<EventSender>>,
    backoff: Duration,
    restart_at: Option<Instant>,
    started_at: Instant,
}

type Outputs = Vec<Output<Waiter>>;

impl Supervisor {
    fn handle(&mut self, cmd: Command_) {
        let mut out = Outputs::new();
        match cmd {
            Command_::Call {
                hub_id,
                session,
                identity,
                message,
                reply,
            } => self
                .router
                .client_request(hub_id, session, &identity, &message, reply, &mut out),
            Command_::Send {
                session,
                message,
                reply,
            } => {
                let r = match self.router.client_send(session, &message, &mut out) {
                    Ok(()) => HubReply::Accepted,
                    Err(e) => HubReply::Error(e),
                };
                // A line the child cannot take fails the send; a dropped message does not.
                let r = match (r, self.apply_writes(&mut out)) {
                    (HubReply::Accepted, Err(e)) => HubReply::Error(e),
                    (r, _) => r,
                };
                let _ = reply.try_send(r);
            }
            Command_::OpenStream { session, reply } => {
                let r = if self.router.touch(&session) {
                    let (tx, rx, queued) = super::events::channel();
                    let streams = self.streams.entry(session).or_default();
                    streams.retain(|t| !t.is_closed());
                    streams.push(tx);
                    HubReply::Stream(rx, queued)
                } else {
                    HubReply::Error(GatewayError::UnknownSession)
                };
                let _ = reply.try_send(r);
            }
            Command_::Delete { session, reply } => {
                // Dropping the session's stream senders ends its GET streams.
                let r = if self.router.delete_session(&session, &mut out) {
                    HubReply::Deleted
                } else {
                    HubReply::Error(GatewayError::UnknownSession)
                };
                let _ = reply.try_send(r);
            }
            Command_::Cancel { hub_id } => self.router.cancel(hub_id, &mut out),
            Command_::ExpireIdle(idle) => {
                if let Some(cutoff) = Instant::now().checked_sub(idle) {
                    // A session whose client holds its stream open is in use, requests or not.
                    let listening: std::collections::HashSet<SessionKey> = self
                        .streams
                        .iter()
                        .filter(|(_, senders)| senders.iter().any(|s| !s.is_closed()))
                        .map(|(k, _)| *k)
                        .collect();
                    let ended = self.router.expire_idle(cutoff, &listening, &mut out);
                    if ended > 0 {
                        tracing::info!(target: "mcp_guard::upstream", "{}: ended {ended} idle session(s)", self.link.describe());
                    }
                }
            }
            Command_::FromChild(generation, line) => {
                if generation == self.generation {
                    self.answered.store(true, Ordering::Relaxed);
                    self.router.child_line(&line, &mut out);
                }
            }
            Command_::ChildExited(generation) => {
                // Once per child: a broken stdin and the end of its output both report it.
                if generation == self.generation && self.child.is_some() {
                    self.child_exited(&mut out);
                }
            }
            Command_::Shutdown => {}
        }
        self.apply(out);
    }

    /// Writes the lines among `out` (removing them), so a caller can report a failed write.
    fn apply_writes(&mut self, out: &mut Outputs) -> Result<(), GatewayError> {
        let mut result = Ok(());
        let mut rest = Outputs::with_capacity(out.len());
        for o in out.drain(..) {
            match o {
                Output::ToChild { line, request } => {
                    if let Err(e) = self.write_line(line) {
                        match request.and_then(|h| self.router.abandon(h)) {
                            Some(waiter) => {
                                let _ = waiter.try_send(HubReply::Error(e));
                            }
                            None => result = Err(e),
                        }
                    }
                }
                other => rest.push(other),
            }
        }
        *out = rest;
        result
    }

    /// Carries out what the router decided, in order.
    fn apply(&mut self, mut out: Outputs) {
        while !out.is_empty() {
            let mut more = Outputs::new();
            for o in out {
                match o {
                    Output::ToChild { line, request } => {
                        if let Err(e) = self.write_line(line)
                            && let Some(waiter) = request.and_then(|h| self.router.abandon(h))
                        {
                            let _ = waiter.try_send(HubReply::Error(e));
                        }
                    }
                    Output::Deliver {
                        session,
                        message,
                        server_request,
                        for_request,
                    } => {
                        // Progress of a request whose client waits on an SSE answer goes there,
                        // in order before the response; otherwise on the session's GET stream.
                        let own_stream = for_request
                            .and_then(|h| self.router.waiter(h))
                            .and_then(|w| w.related.clone());
                        let delivered = match own_stream {
                            Some(stream) => stream.try_send(message).is_ok(),
                            None => self.deliver(&session, message),
                        };
                        if !delivered {
                            self.metrics
                                .global
                                .stream_messages_dropped
                                .fetch_add(1, Ordering::Relaxed);
                            if let Some(h) = server_request {
                                self.router.undeliverable(h, &mut more);
                            }
                        }
                    }
                    Output::Broadcast { sessions, message } => {
                        // Only a session whose client holds a stream open gets a copy: a
                        // hostile child's large notification costs one per listener, not one
                        // per session.
                        for session in sessions {
                            let listening = self
                                .streams
                                .get(&session)
                                .is_some_and(|s| s.iter().any(|t| !t.is_closed()));
                            if listening && !self.deliver(&session, message.clone()) {
                                self.metrics
                                    .global
                                    .stream_messages_dropped
                                    .fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    Output::Respond {
                        waiter,
                        message,
                        new_session,
                    } => {
                        let _ = waiter.try_send(HubReply::Response(message, new_session));
                    }
                    Output::Fail { waiter, error } => {
                        let _ = waiter.try_send(HubReply::Error(error));
                    }
                    Output::SessionEnded(key) => {
                        self.streams.remove(&key);
                    }
                    Output::Dropped(reason) => {
                        self.metrics.global.count_stdio_drop(reason);
                        tracing::debug!(
                            target: "mcp_guard::upstream",
                            "stdio message dropped: {}",
                            reason.label()
                        );
                    }
                }
            }
            out = more;
        }
    }

    fn write_line(&mut self, line: Vec<u8>) -> Result<(), GatewayError> {
        let Some(stdin) = &self.stdin else {
            return Err(GatewayError::UpstreamUnavailable(format!(
                "{} is restarting",
                self.link.describe()
            )));
        };
        // The router frames every line; this is the last look before the child's stdin.
        debug_assert!(
            line.last() == Some(&b'\n')
                && !line[..line.len() - 1]
                    .iter()
                    .any(|b| *b == b'\n' || *b == b'\r'),
            "a line for the stdio child is not exactly one line"
        );
        match stdin.write(line) {
            Ok(()) => Ok(()),
            Err(InputError::Full) => Err(GatewayError::UpstreamBusy),
            Err(InputError::Stopped) => Err(GatewayError::UpstreamUnavailable(format!(
                "{} has stopped",
                self.link.describe()
            ))),
        }
    }

    fn deliver(&mut self, session: &SessionKey, bytes: Vec<u8>) -> bool {
        let Some(streams) = self.streams.get_mut(session) else {
            return false;
        };
        streams.retain(|t| !t.is_closed());
        let mut bytes = Some(bytes);
        for t in streams.iter() {
            match t.try_send(bytes.take().unwrap_or_default()) {
                Ok(()) => return true,
                Err(back) => bytes = Some(back),
            }
        }
        false
    }

    /// Starts a child (or opens the connection); on failure schedules a retry and says why.
    fn spawn_child(&mut self) -> Result<(), std::io::Error> {
        self.restart_at = None;
        self.generation += 1;
        let generation = self.generation;
        let s = match &self.link {
            Link::Process(s) => s,
            Link::Sse(s) => {
                let s = s.clone();
                return self.open_sse(&s, generation);
            }
        };
        // The child's stdout is one end of a socket pair rather than a pipe: a worker's runtime
        // reads a socket like any connection (see `StdoutClaim`). The child writes to it as
        // to a pipe.
        let (output, child_output) = match std::os::unix::net::UnixStream::pair() {
            Ok(pair) => pair,
            Err(e) => {
                tracing::error!(target: "mcp_guard::upstream", "cannot start stdio upstream `{}`: no socket pair for its output: {e}", s.command);
                self.schedule_restart();
                return Err(e);
            }
        };
        let mut cmd = Command::new(&s.command);
        cmd.args(&s.args)
            .envs(s.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::from(std::os::fd::OwnedFd::from(child_output)))
            .stderr(Stdio::piped());
        if let Some(cwd) = &s.cwd {
            cmd.current_dir(cwd);
        }
        confine_child(&mut cmd);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(
                    target: "mcp_guard::upstream",
                    "cannot start stdio upstream `{}`: {e}; retrying in {:?}",
                    s.command,
                    self.backoff
                );
                self.schedule_restart();
                return Err(e);
            }
        };
        tracing::info!(target: "mcp_guard::upstream", "stdio upstream started (pid {})", child.id());
        // Our copy of the child's end goes now: the child's exit must end the output.
        drop(cmd);
        let stderr = child.stderr.take();
        let broken = Broken {
            inbox: self.inbox_tx.clone(),
            generation,
            reported: AtomicBool::new(false),
        };
        let input = match child.stdin.take() {
            Some(stdin) => ChildInput::pipe(stdin, broken),
            // Never: stdin was asked for as a pipe.
            None => ChildInput::queue().0,
        };
        StdoutClaim {
            output,
            generation,
            supervisor: self.me.clone(),
            inbox: self.inbox_tx.clone(),
        }
        .hand_over();
        if let Some(stderr) = stderr {
            let _ = std::thread::Builder::new()
                .name("stdio-stderr".into())
                .spawn(move || {
                    stderr_lines(stderr, |line, unlogged| {
                        // A CR or NUL written raw could rewrite the log line on a terminal.
                        let line: String = line
                            .chars()
                            .flat_map(|c| {
                                let escape = c.is_control() && c != '\t';
                                let escaped = escape.then(|| c.escape_default().to_string());
                                escaped.unwrap_or_else(|| c.to_string()).into_bytes()
                            })
                            .map(char::from)
                            .collect();
                        if unlogged > 0 {
                            tracing::info!(target: "mcp_guard::upstream::stderr", "{line}… ({unlogged} more bytes not logged)");
                        } else {
                            tracing::info!(target: "mcp_guard::upstream::stderr", "{line}");
                        }
                    })
                });
        }
        self.child = Some(Running::Process(child));
        self.started(input, generation);
        Ok(())
    }

    /// Opens a legacy SSE connection as the child: its messages come in as lines, and its
    /// end is the child's exit.
    fn open_sse(&mut self, s: &SseSettings, generation: u64) -> Result<(), std::io::Error> {
        let (input, line_rx) = ChildInput::queue();
        let (to_hub, at_end) = (self.inbox_tx.clone(), self.inbox_tx.clone());
        let url = s.endpoint.url.clone();
        let link = SseLink::open(
            s,
            line_rx,
            move |message| {
                to_hub
                    .send(Command_::FromChild(generation, message))
                    .is_ok()
            },
            move |why| {
                tracing::warn!(target: "mcp_guard::upstream", "{why}");
                let _ = at_end.send(Command_::ChildExited(generation));
            },
        );
        match link {
            Ok(link) => {
                tracing::info!(target: "mcp_guard::upstream", "SSE upstream {url}: connecting");
                self.child = Some(Running::Sse(link));
                self.started(input, generation);
                Ok(())
            }
            Err(e) => {
                self.schedule_restart();
                Err(e)
            }
        }
    }

    /// A new child is running: the router replays its handshake and pings it.
    fn started(&mut self, input: ChildInput, generation: u64) {
        self.stdin = Some(input);
        self.started_at = Instant::now();
        self.alive.store(true, Ordering::Relaxed);
        let mut out = Outputs::new();
        self.router.child_started(generation, &mut out);
        self.router.health_ping(&mut out);
        self.apply(out);
    }

    fn schedule_restart(&mut self) {
        self.restart_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(Duration::from_secs(10));
    }

    fn child_exited(&mut self, out: &mut Outputs) {
        self.alive.store(false, Ordering::Relaxed);
        self.stdin = None;
        let status = self.child.take().map(Running::kill);
        tracing::error!(
            target: "mcp_guard::upstream",
            "{} ended ({}); failing {} in-flight request(s) and restarting",
            self.link.describe(),
            status.unwrap_or_default(),
            self.router.pending_count()
        );
        self.metrics
            .global
            .upstream_restarts
            .fetch_add(1, Ordering::Relaxed);
        self.router.child_exited(out);
        if self.started_at.elapsed() > Duration::from_secs(30) {
            self.backoff = Duration::from_millis(100);
        }
        self.schedule_restart();
    }

    /// A child that exited while something else holds its stdout open never ends its output:
    /// it is noticed here, from the hub thread's periodic look, and restarted.
    fn reap_if_exited(&mut self) {
        if let Some(input) = &self.stdin {
            input.check_broken();
        }
        let exited = match &self.child {
            Some(Running::Process(child)) => has_exited(child),
            _ => false,
        };
        if exited {
            let mut out = Outputs::new();
            self.child_exited(&mut out);
            self.apply(out);
        }
    }

    /// Closes the child's stdin (a well-behaved server exits on EOF) and hands the child over
    /// to be stopped.
    fn detach_child(&mut self) -> Option<Running> {
        self.alive.store(false, Ordering::Relaxed);
        self.stdin = None;
        self.child.take()
    }
}

/// The way into the child: its stdin pipe, written at once while the pipe takes a line whole,
/// and a bounded queue that a writer thread drains for what it does not (a legacy SSE link has
/// the queue alone, drained by the link).
struct ChildInput {
    queue: SyncSender<Vec<u8>>,
    /// The pipe, non-blocking; `None` for a queue-only input.
    pipe: Option<Arc<ChildStdin>>,
    /// Lines queued and not yet wholly written. While any is, new lines queue behind it, so
    /// the child reads them in the order they were decided.
    backlog: Arc<AtomicUsize>,
    /// Bytes of those lines: bounded by [`STDIN_QUEUE_BYTES`], whatever their number.
    queued_bytes: Arc<AtomicUsize>,
    /// Who is told when the pipe breaks (the child closed its stdin, or is gone).
    broken: Option<Arc<Broken>>,
}

/// A child whose stdin broke is as good as gone, whether or not its stdout is still open (it
/// closed its stdin, or it died and a process it started holds its stdout): the hub thread is
/// told once, as if it had exited, and stops and restarts it.
struct Broken {
    inbox: SyncSender<Command_>,
    generation: u64,
    reported: AtomicBool,
}

impl Broken {
    fn report(&self) {
        if self.reported.swap(true, Ordering::AcqRel) {
            return;
        }
        let exited = Command_::ChildExited(self.generation);
        if let Err(TrySendError::Full(exited)) = self.inbox.try_send(exited) {
            // Never wait on a worker: a thread waits for room instead.
            let inbox = self.inbox.clone();
            let _ = std::thread::Builder::new()
                .name("stdio-writer".into())
                .spawn(move || inbox.send(exited));
        }
    }
}

/// Why a line could not be handed to the child.
enum InputError {
    /// The queue is full: the child is not reading.
    Full,
    /// The child's stdin is closed.
    Stopped,
}

impl ChildInput {
    /// A queue-only input and the receiving end the link drains.
    fn queue() -> (ChildInput, Receiver<Vec<u8>>) {
        let (queue, lines) = std::sync::mpsc::sync_channel(STDIN_CAPACITY);
        let input = ChildInput {
            queue,
            pipe: None,
            backlog: Arc::new(AtomicUsize::new(0)),
            queued_bytes: Arc::new(AtomicUsize::new(0)),
            broken: None,
        };
        (input, lines)
    }

    /// The child's stdin, made non-blocking, with its writer thread for what it cannot take.
    fn pipe(stdin: ChildStdin, broken: Broken) -> ChildInput {
        let (mut input, lines) = ChildInput::queue();
        let broken = Arc::new(broken);
        input.broken = Some(broken.clone());
        let pipe = Arc::new(stdin);
        // Without O_NONBLOCK a full pipe would block the deciding thread (a worker). If it
        // cannot be set, every line goes through the writer thread instead.
        if set_nonblocking(&pipe) {
            input.pipe = Some(pipe.clone());
        }
        let (backlog, queued_bytes) = (input.backlog.clone(), input.queued_bytes.clone());
        let _ = std::thread::Builder::new()
            .name("stdio-writer".into())
            .spawn(move || {
                for line in lines {
                    if write_all_waiting(&pipe, &line).is_err() {
                        // The backlog stays above zero: later lines queue, and fail once the
                        // queue's receiver is gone.
                        broken.report();
                        break;
                    }
                    queued_bytes.fetch_sub(line.len(), Ordering::Release);
                    backlog.fetch_sub(1, Ordering::Release);
                }
            });
        input
    }

    /// Hands `line` to the child: straight into the pipe when nothing is queued and the pipe
    /// takes it, else (what is left of it) to the queue.
    fn write(&self, mut line: Vec<u8>) -> Result<(), InputError> {
        if let Some(pipe) = &self.pipe
            && self.backlog.load(Ordering::Acquire) == 0
        {
            match (&**pipe).write(&line) {
                Ok(n) if n == line.len() => return Ok(()),
                // A line longer than the pipe's buffer: the rest is queued right behind it
                // (room or not: what the child has read of it must be finished).
                Ok(n) => {
                    line.drain(..n);
                    return self.enqueue(line, false);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return Err(self.stopped()),
            }
        }
        self.enqueue(line, true)
    }

    /// Whether `lines` more lines of `bytes` in all would be queued without one being refused,
    /// even if the pipe took none of them. The router re-frames each line (its id, a newline):
    /// a little room per line is kept for that.
    fn has_room(&self, lines: usize, bytes: usize) -> bool {
        const REFRAMING: usize = 64;
        let queued = self.queued_bytes.load(Ordering::Acquire);
        let wanted = bytes + lines * REFRAMING;
        self.backlog.load(Ordering::Acquire) + lines <= STDIN_CAPACITY
            && (queued + wanted <= STDIN_QUEUE_BYTES || (queued == 0 && lines == 1))
    }

    /// Queues `line` for the writer thread; with `bounded`, refused when the queue already
    /// holds [`STDIN_QUEUE_BYTES`] (one line alone always fits, so no message is too big to
    /// ever pass).
    fn enqueue(&self, line: Vec<u8>, bounded: bool) -> Result<(), InputError> {
        let len = line.len();
        let held = self.queued_bytes.fetch_add(len, Ordering::AcqRel);
        if bounded && held > 0 && held + len > STDIN_QUEUE_BYTES {
            self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            return Err(InputError::Full);
        }
        self.backlog.fetch_add(1, Ordering::Release);
        self.queue.try_send(line).map_err(|e| {
            self.backlog.fetch_sub(1, Ordering::Release);
            self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            match e {
                TrySendError::Full(_) => InputError::Full,
                TrySendError::Disconnected(_) => self.stopped(),
            }
        })
    }

    /// Whether the pipe has no reader left (the child closed its stdin, perhaps after taking a
    /// line that nobody will now answer), found without writing; told to the hub thread as
    /// [`ChildInput::stopped`] does.
    #[allow(unsafe_code)]
    fn check_broken(&self) {
        let Some(pipe) = &self.pipe else { return };
        let mut state = libc::pollfd {
            fd: pipe.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the length given; a zero timeout never blocks.
        let ready = unsafe { libc::poll(&mut state, 1, 0) };
        if ready > 0 && state.revents & libc::POLLERR != 0 {
            self.stopped();
        }
    }

    /// The pipe broke: the hub thread is told (once), and the line refused.
    fn stopped(&self) -> InputError {
        if let Some(broken) = &self.broken {
            broken.report();
        }
        InputError::Stopped
    }
}

/// Sets O_NONBLOCK on our end of the pipe (the child's end is another open file, unaffected).
#[allow(unsafe_code)]
fn set_nonblocking(pipe: &ChildStdin) -> bool {
    let fd = pipe.as_raw_fd();
    // SAFETY: fcntl on a descriptor this process owns (the pipe lives as long as `pipe`), with
    // integer arguments only.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
    }
}

/// Writes all of `bytes` to the non-blocking pipe, waiting for room as long as it takes (the
/// writer thread's job: it is the one that may wait on the child).
#[allow(unsafe_code)]
fn write_all_waiting(pipe: &ChildStdin, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        match (&*pipe).write(bytes) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let mut ready = libc::pollfd {
                    fd: pipe.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the length given; a negative timeout waits until
                // the pipe has room or its reader is gone (POLLERR, and the next write fails).
                unsafe { libc::poll(&mut ready, 1, -1) };
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A child's output and where its lines go: read by a task on the home worker when the
/// runtime has one (`reserve_home`), else by a thread of its own. Each line is routed where it
/// is read and wakes whoever waits for it; the end is reported to the hub thread, which reaps
/// the child.
pub struct StdoutClaim {
    output: std::os::unix::net::UnixStream,
    generation: u64,
    supervisor: Weak<Mutex<Supervisor>>,
    inbox: SyncSender<Command_>,
}

/// The home worker's queue of outputs to read.
struct Home {
    claims: async_channel::Sender<StdoutClaim>,
    unclaimed: Mutex<Option<async_channel::Receiver<StdoutClaim>>>,
}

static HOME: std::sync::OnceLock<Home> = std::sync::OnceLock::new();

/// Called by the runtime before it starts any upstream: from now on children's output is read
/// on the home worker (worker 0), which takes the queue with [`take_home`] when it starts.
/// On a worker the read needs no thread of its own, and a request's answer reaches a request of
/// that worker without crossing a thread.
pub fn reserve_home() {
    HOME.get_or_init(|| {
        let (claims, unclaimed) = async_channel::unbounded();
        Home {
            claims,
            unclaimed: Mutex::new(Some(unclaimed)),
        }
    });
}

/// The home worker's end of the queue; `None` once taken (or when no home was reserved).
pub fn take_home() -> Option<async_channel::Receiver<StdoutClaim>> {
    HOME.get()?.unclaimed.lock().ok()?.take()
}

/// The home worker's task: reads every child output handed over, each on a task of its own,
/// until the runtime ends.
pub async fn run_home(claims: async_channel::Receiver<StdoutClaim>) {
    while let Ok(claim) = claims.recv().await {
        monoio::spawn(claim.read_on_worker());
    }
}

impl StdoutClaim {
    /// To the home worker if there is one still taking outputs, else to a thread.
    fn hand_over(self) {
        let claim = match HOME.get() {
            Some(home) => match home.claims.try_send(self) {
                Ok(()) => return,
                Err(e) => e.into_inner(),
            },
            None => self,
        };
        let _ = std::thread::Builder::new()
            .name("stdio-reader".into())
            .spawn(move || claim.read_on_thread());
    }

    fn read_on_thread(self) {
        read_lines(&self.output, |line| self.route(line));
        self.ended();
    }

    async fn read_on_worker(self) {
        use monoio::io::AsyncReadRent;
        let stream = self
            .output
            .try_clone()
            .and_then(|s| s.set_nonblocking(true).map(|()| s))
            .and_then(monoio::net::UnixStream::from_std);
        let Ok(mut stream) = stream else {
            // Not on this runtime after all: a thread reads it instead, blocking.
            let _ = self.output.set_nonblocking(false);
            let _ = std::thread::Builder::new()
                .name("stdio-reader".into())
                .spawn(move || self.read_on_thread());
            return;
        };
        let mut chunk = Vec::with_capacity(64 * 1024);
        let mut lines = LineSplitter::default();
        loop {
            chunk.clear();
            let (read, back) = stream.read(chunk).await;
            chunk = back;
            match read {
                Ok(0) => {
                    lines.finish(|line| {
                        self.route(line);
                    });
                    break;
                }
                Ok(n) => {
                    let mut reading = true;
                    let fed = lines.feed(&chunk[..n], |line| {
                        if reading {
                            reading = self.route(line);
                        }
                    });
                    if !fed || !reading {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        drop(stream);
        self.ended();
    }

    /// Decides one line of the child's here; says whether to read on, which stops once the child
    /// has been replaced (what still writes to a retired child's output, a process it started,
    /// is read no more, and its socket closes).
    fn route(&self, line: &[u8]) -> bool {
        let Some(supervisor) = self.supervisor.upgrade() else {
            return false;
        };
        let mut supervisor = lock(&supervisor);
        if supervisor.generation != self.generation {
            return false;
        }
        supervisor.handle(Command_::FromChild(self.generation, line.to_vec()));
        true
    }

    /// The output ended (or broke a rule): the hub thread reaps and restarts the child.
    fn ended(self) {
        if self.supervisor.strong_count() == 0 {
            return;
        }
        match self.inbox.try_send(Command_::ChildExited(self.generation)) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            // Never wait on a worker: a thread waits for room instead.
            Err(TrySendError::Full(exited)) => {
                let inbox = self.inbox.clone();
                let _ = std::thread::Builder::new()
                    .name("stdio-reader".into())
                    .spawn(move || inbox.send(exited));
            }
        }
    }
}

/// Reads `output` to its end (or an error, or a line over the limit), passing each line to
/// `line` until it says to stop.
fn read_lines(mut output: impl Read, mut line: impl FnMut(&[u8]) -> bool) {
    let mut chunk = vec![0u8; 64 * 1024];
    let mut lines = LineSplitter::default();
    let mut reading = true;
    loop {
        match output.read(&mut chunk) {
            Ok(0) => {
                return lines.finish(|l| {
                    if reading {
                        reading = line(l);
                    }
                });
            }
            Ok(n) => {
                let fed = lines.feed(&chunk[..n], |l| {
                    if reading {
                        reading = line(l);
                    }
                });
                if !fed || !reading {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Longest part of a stderr line that is logged; the rest of a longer one is counted, not kept.
pub const MAX_LOG_LINE: usize = 4096;

/// Reads a child's stderr to its end, passing each line (at most [`MAX_LOG_LINE`] bytes of it,
/// invalid UTF-8 replaced) and how many bytes of it were left out. Whatever the child writes
/// (a line with no end, bytes that are not text) is read on, so the child never blocks on a
/// full stderr, and memory stays bounded.
pub fn stderr_lines(mut stderr: impl Read, mut line: impl FnMut(&str, usize)) {
    let mut chunk = vec![0u8; 16 * 1024];
    let mut kept: Vec<u8> = Vec::with_capacity(256);
    let mut unlogged = 0usize;
    let keep = |kept: &mut Vec<u8>, bytes: &[u8], unlogged: &mut usize| {
        let take = (MAX_LOG_LINE - kept.len()).min(bytes.len());
        kept.extend_from_slice(&bytes[..take]);
        *unlogged += bytes.len() - take;
    };
    let mut emit = |kept: &mut Vec<u8>, unlogged: &mut usize| {
        while kept.last() == Some(&b'\r') {
            kept.pop();
        }
        if !kept.is_empty() || *unlogged > 0 {
            line(&String::from_utf8_lossy(kept), *unlogged);
        }
        kept.clear();
        *unlogged = 0;
    };
    loop {
        let n = match stderr.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let mut rest = &chunk[..n];
        while let Some(end) = memchr::memchr(b'\n', rest) {
            keep(&mut kept, &rest[..end], &mut unlogged);
            emit(&mut kept, &mut unlogged);
            rest = &rest[end + 1..];
        }
        keep(&mut kept, rest, &mut unlogged);
    }
    emit(&mut kept, &mut unlogged);
}

/// Splits a child's output into lines without their CR/LF; an empty line is skipped, a line
/// longer than [`MAX_LINE`] ends the output (the child is stopped and restarted).
#[derive(Default)]
pub struct LineSplitter {
    /// The start of a line whose end has not arrived yet.
    partial: Vec<u8>,
}

impl LineSplitter {
    /// Passes each line `chunk` completes to `line`; false once a line is over the limit.
    pub fn feed(&mut self, mut chunk: &[u8], mut line: impl FnMut(&[u8])) -> bool {
        while let Some(end) = memchr::memchr(b'\n', chunk) {
            if self.partial.is_empty() {
                if end > MAX_LINE {
                    return too_long();
                }
                emit_line(&chunk[..end], &mut line);
            } else {
                self.partial.extend_from_slice(&chunk[..end]);
                if self.partial.len() > MAX_LINE {
                    return too_long();
                }
                emit_line(&self.partial, &mut line);
                self.partial.clear();
            }
            chunk = &chunk[end + 1..];
        }
        self.partial.extend_from_slice(chunk);
        self.partial.len() <= MAX_LINE || too_long()
    }

    /// The output's last line, when it ended without a newline.
    pub fn finish(&mut self, mut line: impl FnMut(&[u8])) {
        emit_line(&self.partial, &mut line);
        self.partial.clear();
    }
}

fn emit_line(raw: &[u8], line: &mut impl FnMut(&[u8])) {
    let mut end = raw.len();
    while end > 0 && raw[end - 1] == b'\r' {
        end -= 1;
    }
    if end > 0 {
        line(&raw[..end]);
    }
}

fn too_long() -> bool {
    tracing::error!(target: "mcp_guard::upstream", "stdio upstream line over {MAX_LINE} bytes; stopping it");
    false
}

/// In the child, before exec: make it the leader of a process group of its own (so stopping it
/// reaches whatever it started, see [`Running::stop`]), ask the kernel to SIGTERM it if the
/// gateway dies without cleaning up, and make every descriptor above stderr close on exec. The gateway's sockets
/// (accepted client connections — io_uring's accept does not set close-on-exec —, listeners,
/// upstream connections) and files must never reach an upstream program: a child holding
/// another client's connection could read its requests, API key included, and answer them.
#[allow(unsafe_code)]
fn confine_child(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl, close_range, getrlimit and fcntl are async-signal-safe system calls on
    // plain integers; nothing of the parent's memory is touched.
    unsafe {
        cmd.pre_exec(|| {
            libc::setpgid(0, 0);
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            // Marked, not closed: std's own exec-error pipe (already close-on-exec) must stay
            // open until exec, or a failed exec would look like a success.
            const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
            let marked = libc::syscall(
                libc::SYS_close_range,
                3 as libc::c_uint,
                libc::c_uint::MAX,
                CLOSE_RANGE_CLOEXEC,
            );
            if marked != 0 {
                // Kernels before 5.11: one descriptor at a time, up to the limit.
                let mut limit = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                let top = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
                    limit.rlim_cur.min(1 << 20) as libc::c_int
                } else {
                    4096
                };
                for fd in 3..top {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    if flags >= 0 {
                        libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
                    }
                }
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> (Vec<Vec<u8>>, bool) {
        let mut lines = LineSplitter::default();
        let mut out = Vec::new();
        for chunk in chunks {
            if !lines.feed(chunk, |l| out.push(l.to_vec())) {
                return (out, false);
            }
        }
        lines.finish(|l| out.push(l.to_vec()));
        (out, true)
    }

    #[test]
    fn lines_come_out_whole_however_the_output_is_cut() {
        let text: &[u8] = b"{\"a\":1}\r\n\n{\"b\":2}\n\r\n{\"c\":3}";
        let want: Vec<Vec<u8>> = vec![
            b"{\"a\":1}".to_vec(),
            b"{\"b\":2}".to_vec(),
            b"{\"c\":3}".to_vec(),
        ];
        assert_eq!(split(&[text]), (want.clone(), true));
        for cut in 0..=text.len() {
            assert_eq!(
                split(&[&text[..cut], &text[cut..]]),
                (want.clone(), true),
                "cut at {cut}"
            );
        }
        let bytes: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(split(&bytes), (want, true));
    }

    #[test]
    fn a_line_over_the_limit_ends_the_output() {
        let long = vec![b'x'; MAX_LINE + 1];
        let (lines, ok) = split(&[b"{}\n", &long[..MAX_LINE / 2], &long[MAX_LINE / 2..]]);
        assert_eq!(lines, vec![b"{}".to_vec()]);
        assert!(!ok);
        // Exactly at the limit is still a line.
        let (lines, ok) = split(&[&long[..MAX_LINE], b"\n"]);
        assert!(ok);
        assert_eq!(lines.len(), 1);
    }

    #[test]
    fn stderr_is_read_to_its_end_in_bounded_lines_whatever_it_holds() {
        let mut input = b"plain\r\n\xff\xfe not text\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 10 * MAX_LOG_LINE + 7));
        input.extend_from_slice(b"\nafter\nno end");
        let mut got = Vec::new();
        stderr_lines(&input[..], |l, unlogged| {
            got.push((l.to_string(), unlogged))
        });
        assert_eq!(got.len(), 5);
        assert_eq!(got[0], ("plain".to_string(), 0));
        assert_eq!(got[1], ("\u{fffd}\u{fffd} not text".to_string(), 0));
        assert_eq!(got[2].0.len(), MAX_LOG_LINE);
        assert_eq!(got[2].1, 9 * MAX_LOG_LINE + 7);
        assert_eq!(got[3], ("after".to_string(), 0));
        assert_eq!(got[4], ("no end".to_string(), 0));
    }

    #[test]
    fn the_reader_thread_reads_a_socket_pair_to_its_end() {
        let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            for i in 0..1000 {
                theirs
                    .write_all(format!("{{\"id\":{i}}}\n").as_bytes())
                    .unwrap();
            }
            theirs.write_all(b"{\"last\":true}").unwrap();
        });
        let mut got = Vec::new();
        read_lines(&ours, |l| {
            got.push(String::from_utf8(l.to_vec()).unwrap());
            true
        });
        writer.join().unwrap();
        assert_eq!(got.len(), 1001);
        assert_eq!(got[999], "{\"id\":999}");
        assert_eq!(got[1000], "{\"last\":true}");
    }
}
