//! The stdio hub: one shared child process speaking newline-delimited JSON-RPC, reached by
//! every worker through a bounded channel.
//!
//! Threads (none of them a worker): the *router* owns all hub state (pending requests, sessions,
//! their server-to-client streams) and is the only one that decides; a *writer* feeds the
//! child's stdin from a bounded queue; a *reader* turns stdout lines into router messages; a
//! *stderr* thread forwards the child's log. The router never blocks on the child, so a child
//! that stops reading cannot wedge response routing.
//!
//! Request ids are remapped to hub-unique integers so responses find their client; the original
//! id is restored on the way back. Sessions are the hub's own (stdio has none): created when an
//! initialize succeeds, they survive a child restart, and the hub replays the last initialize
//! to the new child so clients carry on.

use crate::config::StdioSettings;
use crate::error::GatewayError;
use crate::mcp::session::random_bytes;
use crate::observe::metrics::Metrics;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

/// A hub session key.
pub type SessionKey = [u8; 16];

/// What the router answers a worker.
#[derive(Debug)]
pub enum HubReply {
    /// The response message (original id restored); a new session when it answered initialize.
    Response(Vec<u8>, Option<SessionKey>),
    /// A notification or client response was handed to the child.
    Accepted,
    /// A server-to-client stream for the session.
    Stream(async_channel::Receiver<Vec<u8>>),
    /// The session was ended.
    Deleted,
    /// Refused.
    Error(GatewayError),
}

enum Command_ {
    Call {
        hub_id: u64,
        session: Option<SessionKey>,
        message: Vec<u8>,
        reply: async_channel::Sender<HubReply>,
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
    FromChild(u64, Vec<u8>),
    ChildExited(u64),
    Shutdown,
}

/// The worker-side handle.
pub struct StdioHub {
    inbox: SyncSender<Command_>,
    next_id: AtomicU64,
    alive: Arc<AtomicBool>,
    router: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Commands queued to the router beyond this are refused (503) rather than waited for.
const INBOX_CAPACITY: usize = 4096;
/// Lines queued for the child's stdin.
const STDIN_CAPACITY: usize = 1024;
/// Messages buffered per server-to-client stream; beyond it they are dropped and counted.
const STREAM_CAPACITY: usize = 256;
/// Longest line accepted from the child.
const MAX_LINE: usize = 64 * 1024 * 1024;
/// Sessions kept; the least recently used is evicted beyond it.
const MAX_SESSIONS: usize = 65_536;

impl StdioHub {
    /// Starts the router and the first child.
    pub fn start(settings: StdioSettings, metrics: Arc<Metrics>) -> Arc<StdioHub> {
        let (tx, rx) = std::sync::mpsc::sync_channel(INBOX_CAPACITY);
        let alive = Arc::new(AtomicBool::new(false));
        let router = Router {
            settings,
            inbox_tx: tx.clone(),
            metrics,
            alive: alive.clone(),
            child: None,
            stdin: None,
            generation: 0,
            pending: HashMap::new(),
            sessions: HashMap::new(),
            progress: HashMap::new(),
            init_params: None,
            backoff: Duration::from_millis(100),
            restart_at: Some(Instant::now()),
            started_at: Instant::now(),
        };
        let handle = std::thread::Builder::new()
            .name("stdio-hub".into())
            .spawn(move || router.run(rx))
            .expect("spawning the stdio hub thread");
        Arc::new(StdioHub {
            inbox: tx,
            next_id: AtomicU64::new(1),
            alive,
            router: std::sync::Mutex::new(Some(handle)),
        })
    }

    /// Whether the child is running.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }

    fn submit(&self, cmd: Command_) -> Result<(), GatewayError> {
        match self.inbox.try_send(cmd) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(GatewayError::UpstreamBusy),
            Err(TrySendError::Disconnected(_)) => Err(GatewayError::ShuttingDown),
        }
    }

    /// Sends a request; returns its hub id (for [`StdioHub::cancel`]) and the reply channel.
    pub fn call(
        &self,
        session: Option<SessionKey>,
        message: Vec<u8>,
    ) -> Result<(u64, async_channel::Receiver<HubReply>), GatewayError> {
        let hub_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, rx) = async_channel::bounded(1);
        self.submit(Command_::Call {
            hub_id,
            session,
            message,
            reply,
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
        let _ = self.inbox.try_send(Command_::Cancel { hub_id });
    }

    /// Stops the child (stdin closed, then killed after `grace`) and the router.
    pub fn shutdown(&self) {
        let _ = self.inbox.send(Command_::Shutdown);
        if let Some(h) = self.router.lock().ok().and_then(|mut g| g.take()) {
            let _ = h.join();
        }
    }
}

struct Pending {
    reply: Option<async_channel::Sender<HubReply>>,
    original_id: Value,
    session: Option<SessionKey>,
    is_initialize: bool,
    progress_token: Option<String>,
}

struct Session {
    streams: Vec<async_channel::Sender<Vec<u8>>>,
    last_used: Instant,
}

struct Router {
    settings: StdioSettings,
    inbox_tx: SyncSender<Command_>,
    metrics: Arc<Metrics>,
    alive: Arc<AtomicBool>,
    child: Option<Child>,
    stdin: Option<SyncSender<Vec<u8>>>,
    generation: u64,
    pending: HashMap<u64, Pending>,
    sessions: HashMap<SessionKey, Session>,
    progress: HashMap<String, SessionKey>,
    init_params: Option<Value>,
    backoff: Duration,
    restart_at: Option<Instant>,
    started_at: Instant,
}

/// Hub id used for the initialize the hub replays to a restarted child.
const REPLAY_ID_BASE: u64 = 1 << 62;

impl Router {
    fn run(mut self, rx: Receiver<Command_>) {
        loop {
            if let Some(at) = self.restart_at
                && Instant::now() >= at
            {
                self.spawn_child();
            }
            let cmd = match self.restart_at {
                Some(at) => match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                    Ok(c) => c,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => break,
                },
                None => match rx.recv() {
                    Ok(c) => c,
                    Err(_) => break,
                },
            };
            match cmd {
                Command_::Shutdown => break,
                other => self.handle(other),
            }
        }
        self.stop_child();
    }

    fn handle(&mut self, cmd: Command_) {
        match cmd {
            Command_::Call {
                hub_id,
                session,
                message,
                reply,
            } => self.call(hub_id, session, message, reply),
            Command_::Send {
                session,
                message,
                reply,
            } => {
                let r = if !self.touch(&session) {
                    HubReply::Error(GatewayError::UnknownSession)
                } else {
                    match self.write_line(message) {
                        Ok(()) => HubReply::Accepted,
                        Err(e) => HubReply::Error(e),
                    }
                };
                let _ = reply.try_send(r);
            }
            Command_::OpenStream { session, reply } => {
                let r = match self.sessions.get_mut(&session) {
                    None => HubReply::Error(GatewayError::UnknownSession),
                    Some(s) => {
                        let (tx, rx) = async_channel::bounded(STREAM_CAPACITY);
                        s.streams.retain(|t| !t.is_closed());
                        s.streams.push(tx);
                        s.last_used = Instant::now();
                        HubReply::Stream(rx)
                    }
                };
                let _ = reply.try_send(r);
            }
            Command_::Delete { session, reply } => {
                // Dropping the session drops its stream senders, which ends the GET streams.
                let r = match self.sessions.remove(&session) {
                    Some(_) => HubReply::Deleted,
                    None => HubReply::Error(GatewayError::UnknownSession),
                };
                self.progress.retain(|_, s| *s != session);
                let _ = reply.try_send(r);
            }
            Command_::Cancel { hub_id } => {
                if let Some(p) = self.pending.remove(&hub_id) {
                    // Its progress token would otherwise outlive it in the routing map.
                    if let Some(t) = &p.progress_token {
                        self.progress.remove(t);
                    }
                    let note = json!({"jsonrpc":"2.0","method":"notifications/cancelled",
                        "params":{"requestId": hub_id, "reason":"client request timed out"}});
                    let _ = self.write_line(note.to_string().into_bytes());
                }
            }
            Command_::FromChild(generation, line) => {
                if generation == self.generation {
                    self.route_child_message(&line);
                }
            }
            Command_::ChildExited(generation) => {
                if generation == self.generation {
                    self.child_exited();
                }
            }
            Command_::Shutdown => {}
        }
    }

    fn touch(&mut self, session: &SessionKey) -> bool {
        match self.sessions.get_mut(session) {
            Some(s) => {
                s.last_used = Instant::now();
                true
            }
            None => false,
        }
    }

    fn call(
        &mut self,
        hub_id: u64,
        session: Option<SessionKey>,
        message: Vec<u8>,
        reply: async_channel::Sender<HubReply>,
    ) {
        if let Some(s) = &session
            && !self.touch(s)
        {
            let _ = reply.try_send(HubReply::Error(GatewayError::UnknownSession));
            return;
        }
        let Ok(mut msg) = serde_json::from_slice::<Value>(&message) else {
            let _ = reply.try_send(HubReply::Error(GatewayError::Parse("invalid JSON".into())));
            return;
        };
        let is_initialize = msg.get("method").and_then(Value::as_str) == Some("initialize");
        if is_initialize {
            self.init_params = msg.get("params").cloned();
        }
        let progress_token = msg
            .pointer("/params/_meta/progressToken")
            .map(|t| t.to_string());
        let original_id = msg
            .as_object_mut()
            .and_then(|o| o.insert("id".into(), Value::from(hub_id)))
            .unwrap_or(Value::Null);
        if let (Some(t), Some(s)) = (&progress_token, session) {
            self.progress.insert(t.clone(), s);
        }
        if let Err(e) = self.write_line(msg.to_string().into_bytes()) {
            let _ = reply.try_send(HubReply::Error(e));
            return;
        }
        self.pending.insert(
            hub_id,
            Pending {
                reply: Some(reply),
                original_id,
                session,
                is_initialize,
                progress_token,
            },
        );
    }

    fn write_line(&mut self, mut line: Vec<u8>) -> Result<(), GatewayError> {
        let Some(stdin) = &self.stdin else {
            return Err(GatewayError::UpstreamUnavailable(
                "stdio upstream is restarting".into(),
            ));
        };
        line.push(b'\n');
        match stdin.try_send(line) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(GatewayError::UpstreamBusy),
            Err(TrySendError::Disconnected(_)) => Err(GatewayError::UpstreamUnavailable(
                "stdio upstream exited".into(),
            )),
        }
    }

    fn route_child_message(&mut self, line: &[u8]) {
        let Ok(mut msg) = serde_json::from_slice::<Value>(line) else {
            tracing::warn!(
                target: "mcp_guard::upstream",
                "stdio upstream wrote a line that is not JSON ({} bytes); ignored",
                line.len()
            );
            return;
        };
        let has_method = msg.get("method").is_some();
        let id = msg.get("id").cloned();
        match (has_method, id) {
            (false, Some(id)) => self.route_response(&mut msg, id),
            (true, Some(_)) => self.route_server_request(msg),
            (true, None) => self.route_notification(msg),
            (false, None) => tracing::warn!(
                target: "mcp_guard::upstream",
                "stdio upstream wrote a message with neither method nor id; ignored"
            ),
        }
    }

    fn route_response(&mut self, msg: &mut Value, id: Value) {
        let Some(hub_id) = id.as_u64() else {
            tracing::warn!(target: "mcp_guard::upstream", "stdio response with a foreign id {id}; ignored");
            return;
        };
        if hub_id >= REPLAY_ID_BASE {
            // The answer to a replayed initialize: complete the handshake for the new child.
            let _ = self
                .write_line(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#.to_vec());
            return;
        }
        let Some(p) = self.pending.remove(&hub_id) else {
            return; // cancelled or timed out
        };
        if let Some(t) = &p.progress_token {
            self.progress.remove(t);
        }
        if let Some(o) = msg.as_object_mut() {
            o.insert("id".into(), p.original_id);
        }
        let mut new_session = None;
        if p.is_initialize && msg.get("result").is_some() {
            let key: SessionKey = random_bytes();
            self.evict_if_full();
            self.sessions.insert(
                key,
                Session {
                    streams: Vec::new(),
                    last_used: Instant::now(),
                },
            );
            new_session = Some(key);
        }
        if let Some(reply) = p.reply {
            let _ = reply.try_send(HubReply::Response(
                msg.to_string().into_bytes(),
                new_session,
            ));
        }
    }

    fn evict_if_full(&mut self) {
        if self.sessions.len() < MAX_SESSIONS {
            return;
        }
        if let Some(oldest) = self
            .sessions
            .iter()
            .min_by_key(|(_, s)| s.last_used)
            .map(|(k, _)| *k)
        {
            self.sessions.remove(&oldest);
        }
    }

    fn deliver(&mut self, session: &SessionKey, bytes: &[u8]) -> bool {
        let Some(s) = self.sessions.get_mut(session) else {
            return false;
        };
        s.streams.retain(|t| !t.is_closed());
        for t in &s.streams {
            if t.try_send(bytes.to_vec()).is_ok() {
                return true;
            }
        }
        false
    }

    fn route_notification(&mut self, msg: Value) {
        let bytes = msg.to_string().into_bytes();
        let token = msg.pointer("/params/progressToken").map(|t| t.to_string());
        let target = token.and_then(|t| self.progress.get(&t).copied());
        if let Some(session) = target {
            if !self.deliver(&session, &bytes) {
                self.metrics
                    .global
                    .stream_messages_dropped
                    .fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        // Not tied to a request: every session of the shared process hears it.
        let keys: Vec<SessionKey> = self.sessions.keys().copied().collect();
        for k in keys {
            if !self.deliver(&k, &bytes) {
                self.metrics
                    .global
                    .stream_messages_dropped
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn route_server_request(&mut self, msg: Value) {
        // A server-initiated request (sampling, roots, elicitation) goes to the session with
        // the most recent request in flight, else the most recently active session with a
        // stream. Its id is the server's own; the client's answer is passed back unchanged.
        let bytes = msg.to_string().into_bytes();
        let busiest = self
            .pending
            .iter()
            .filter_map(|(id, p)| p.session.map(|s| (*id, s)))
            .max_by_key(|(id, _)| *id)
            .map(|(_, s)| s);
        let mut candidates: Vec<SessionKey> = busiest.into_iter().collect();
        let mut by_recent: Vec<(&SessionKey, &Session)> = self.sessions.iter().collect();
        by_recent.sort_by_key(|(_, s)| std::cmp::Reverse(s.last_used));
        candidates.extend(by_recent.into_iter().map(|(k, _)| *k));
        for k in candidates {
            if self.deliver(&k, &bytes) {
                return;
            }
        }
        self.metrics
            .global
            .stream_messages_dropped
            .fetch_add(1, Ordering::Relaxed);
        if let Some(id) = msg.get("id") {
            let err = json!({"jsonrpc":"2.0","id":id,"error":{"code":-32603,
                "message":"no client stream is open to receive this request"}});
            let _ = self.write_line(err.to_string().into_bytes());
        }
    }

    fn spawn_child(&mut self) {
        self.restart_at = None;
        self.generation += 1;
        let generation = self.generation;
        let s = &self.settings;
        let mut cmd = Command::new(&s.command);
        cmd.args(&s.args)
            .envs(s.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(cwd) = &s.cwd {
            cmd.current_dir(cwd);
        }
        set_parent_death_signal(&mut cmd);
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
                return;
            }
        };
        tracing::info!(target: "mcp_guard::upstream", "stdio upstream started (pid {})", child.id());
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let (line_tx, line_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(STDIN_CAPACITY);
        if let Some(mut stdin) = stdin {
            let _ = std::thread::Builder::new()
                .name("stdio-writer".into())
                .spawn(move || {
                    for line in line_rx {
                        if stdin.write_all(&line).and_then(|_| stdin.flush()).is_err() {
                            break;
                        }
                    }
                });
        }
        if let Some(stdout) = stdout {
            let inbox = self.inbox_tx.clone();
            let _ = std::thread::Builder::new()
                .name("stdio-reader".into())
                .spawn(move || read_stdout(stdout, generation, inbox));
        }
        if let Some(stderr) = stderr {
            let _ = std::thread::Builder::new()
                .name("stdio-stderr".into())
                .spawn(move || {
                    for line in BufReader::new(stderr).lines() {
                        match line {
                            Ok(l) => tracing::info!(target: "mcp_guard::upstream::stderr", "{l}"),
                            Err(_) => break,
                        }
                    }
                });
        }
        self.child = Some(child);
        self.stdin = Some(line_tx);
        self.started_at = Instant::now();
        self.alive.store(true, Ordering::Relaxed);
        if let Some(params) = self.init_params.clone() {
            let replay = json!({"jsonrpc":"2.0","id": REPLAY_ID_BASE + generation,
                "method":"initialize","params": params});
            let _ = self.write_line(replay.to_string().into_bytes());
        }
    }

    fn schedule_restart(&mut self) {
        self.restart_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(Duration::from_secs(10));
    }

    fn child_exited(&mut self) {
        self.alive.store(false, Ordering::Relaxed);
        self.stdin = None;
        let status = self.child.take().map(|mut c| {
            // The reader may have stopped on an oversized line while the child still runs.
            let _ = c.kill();
            c.wait()
        });
        tracing::error!(
            target: "mcp_guard::upstream",
            "stdio upstream exited ({status:?}); failing {} in-flight request(s) and restarting",
            self.pending.len()
        );
        self.metrics
            .global
            .upstream_restarts
            .fetch_add(1, Ordering::Relaxed);
        for (_, p) in self.pending.drain() {
            if let Some(r) = p.reply {
                let _ = r.try_send(HubReply::Error(GatewayError::UpstreamUnavailable(
                    "stdio upstream process exited".into(),
                )));
            }
        }
        self.progress.clear();
        if self.started_at.elapsed() > Duration::from_secs(30) {
            self.backoff = Duration::from_millis(100);
        }
        self.schedule_restart();
    }

    fn stop_child(&mut self) {
        self.alive.store(false, Ordering::Relaxed);
        self.stdin = None; // closes stdin: a well-behaved server exits on EOF
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(2);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => return,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => break,
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn read_stdout(stdout: std::process::ChildStdout, generation: u64, inbox: SyncSender<Command_>) {
    let mut reader = BufReader::with_capacity(64 * 1024, stdout);
    let mut line = Vec::with_capacity(4096);
    loop {
        line.clear();
        match (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                if line.len() > MAX_LINE {
                    tracing::error!(target: "mcp_guard::upstream", "stdio upstream line over {MAX_LINE} bytes; stopping it");
                    break;
                }
                while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    line.pop();
                }
                if line.is_empty() {
                    continue;
                }
                if inbox
                    .send(Command_::FromChild(generation, line.clone()))
                    .is_err()
                {
                    return;
                }
            }
        }
    }
    let _ = inbox.send(Command_::ChildExited(generation));
}

/// Ask the kernel to SIGTERM the child if the gateway dies without cleaning up.
#[allow(unsafe_code)]
fn set_parent_death_signal(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
}
