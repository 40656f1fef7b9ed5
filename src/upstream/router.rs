//! The isolated message router of a shared MCP upstream: every identifier that crosses it is
//! remapped per session, and every line it writes to the upstream is one compact JSON line.
//!
//! Pure and synchronous (no threads, no process, no clock), so it can be unit-tested and fuzzed:
//! callers feed it "a client message from session S" and "a line from the upstream" and carry
//! out the [`Output`]s it returns (the stdio hub writes lines to the child, delivers messages to
//! the session's streams and answers waiting workers).
//!
//! What is remapped, and why:
//! - request ids: the worker's hub-unique id replaces the client's; restored on the response;
//! - progress tokens: a client's `_meta.progressToken` becomes a hub-unique token, restored on
//!   the way out; progress for a token the hub did not issue is dropped, never broadcast;
//! - cancellations: a client's `notifications/cancelled` names its own request id, rewritten to
//!   the hub id; an id the session does not own is dropped. A server's cancellation of one of
//!   its own requests goes only to the session that was given it, with the id it was given;
//! - server-initiated requests (sampling, elicitation, roots): delivered to exactly one session
//!   under a hub-given id; only that session's answer is accepted, restored to the server's id.
//!   Where the owning session cannot be known, the upstream is answered with an error at once.
//!
//! Notifications from the upstream that are tied to no request (list_changed, logging) still
//! reach every session: a shared process cannot say whose they are.

use crate::error::GatewayError;
use crate::mcp::session::random_bytes;
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, HashMap};

/// A hub session key.
pub type SessionKey = [u8; 16];

/// Ids at and above this are the hub's own requests (the replayed `initialize`). Every id
/// the hub sends stays below 2^53: servers written in JavaScript read ids as doubles, and the
/// official TypeScript SDK refuses a larger one as an invalid message.
pub const REPLAY_ID_BASE: u64 = 1 << 52;

/// Client lines held at most while a restarted upstream answers the replayed initialize.
const MAX_HELD: usize = 4096;

/// Id of the hub's own `ping` to a newly started upstream (above every replay id), the largest
/// integer a double holds exactly.
pub const PING_ID: u64 = (1 << 53) - 1;

/// JSON-RPC error sent to the upstream for a server-initiated request the hub cannot route.
pub const UNROUTABLE_MESSAGE: &str =
    "cannot route a server-initiated request in shared mode; use session_mode = \"per_session\"";

/// Why a message was dropped rather than forwarded; each is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// A client cancelled a request id its session does not own.
    ForeignCancel,
    /// A client answered a server-initiated request its session was not given.
    ForeignResponse,
    /// A client sent progress for a token its session was not given.
    ForeignProgress,
    /// The upstream sent progress for a token the hub did not issue (or no longer routes).
    UnknownProgressToken,
    /// The upstream cancelled a request no session was given.
    UnknownCancel,
    /// The upstream answered an id nobody waits on (late after a timeout, or made up).
    UnknownResponse,
    /// A server-initiated request no single session could be found for (answered with an error).
    UnroutableServerRequest,
    /// A server-initiated request pushed out of the full table (answered with an error).
    ServerRequestEvicted,
    /// Not a JSON-RPC object, or a shape the hub does not forward.
    Malformed,
    /// A client notification or response arriving while a restarted upstream was being
    /// initialized again, with the holding queue full.
    HeldOverflow,
}

impl DropReason {
    /// Every reason, in metric order.
    pub const ALL: [DropReason; 10] = [
        DropReason::ForeignCancel,
        DropReason::ForeignResponse,
        DropReason::ForeignProgress,
        DropReason::UnknownProgressToken,
        DropReason::UnknownCancel,
        DropReason::UnknownResponse,
        DropReason::UnroutableServerRequest,
        DropReason::ServerRequestEvicted,
        DropReason::Malformed,
        DropReason::HeldOverflow,
    ];

    /// Metric label value.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::ForeignCancel => "foreign_cancel",
            DropReason::ForeignResponse => "foreign_response",
            DropReason::ForeignProgress => "foreign_progress",
            DropReason::UnknownProgressToken => "unknown_progress_token",
            DropReason::UnknownCancel => "unknown_cancel",
            DropReason::UnknownResponse => "unknown_response",
            DropReason::UnroutableServerRequest => "unroutable_server_request",
            DropReason::ServerRequestEvicted => "server_request_evicted",
            DropReason::Malformed => "malformed",
            DropReason::HeldOverflow => "held_overflow",
        }
    }

    /// Position in [`DropReason::ALL`].
    pub fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// Bounds on every table the router keeps.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Sessions kept in all.
    pub max_sessions: usize,
    /// Sessions kept per identity; beyond it the identity's own least recently used goes.
    pub max_sessions_per_identity: usize,
    /// Client requests in flight.
    pub max_pending: usize,
    /// Server-initiated requests awaiting a client's answer; beyond it the oldest is refused.
    pub max_server_requests: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sessions: 65_536,
            max_sessions_per_identity: 4_096,
            max_pending: 16_384,
            max_server_requests: 1_024,
        }
    }
}

/// What the caller must do. `W` is whatever the caller uses to answer a waiting worker.
#[derive(Debug)]
pub enum Output<W> {
    /// Write this line (compact JSON ending in one LF) to the upstream. `request` is the hub id
    /// of the client request it carries: if the write fails, hand it back through
    /// [`Router::abandon`].
    ToChild {
        /// The line, LF included.
        line: Vec<u8>,
        /// The client request it carries, if any.
        request: Option<u64>,
    },
    /// Deliver to the session's server-to-client stream. When `server_request` is set and the
    /// message cannot be delivered, report it through [`Router::undeliverable`].
    Deliver {
        /// The session.
        session: SessionKey,
        /// One JSON message.
        message: Vec<u8>,
        /// Hub id of the server-initiated request it carries.
        server_request: Option<u64>,
        /// Hub id of the client request it relates to (progress): the caller may send it on
        /// that request's own response stream instead (see [`Router::waiter`]).
        for_request: Option<u64>,
    },
    /// Deliver to each of `sessions` that has a stream open (one message, tied to no request:
    /// a shared process cannot say whose it is). Copies are made only for listening sessions.
    Broadcast {
        /// The sessions that hear it.
        sessions: Vec<SessionKey>,
        /// One JSON message.
        message: Vec<u8>,
    },
    /// The response to a waiting worker (its original id restored).
    Respond {
        /// The worker.
        waiter: W,
        /// The response message.
        message: Vec<u8>,
        /// A new session, when it answered a successful initialize.
        new_session: Option<SessionKey>,
    },
    /// The request failed.
    Fail {
        /// The worker.
        waiter: W,
        /// Why.
        error: GatewayError,
    },
    /// The session was evicted or deleted: close its streams.
    SessionEnded(SessionKey),
    /// Something was dropped (count it).
    Dropped(DropReason),
}

struct Pending<W> {
    waiter: W,
    original_id: Value,
    session: Option<SessionKey>,
    /// Set for an initialize: the identity the new session will belong to.
    init_identity: Option<Box<str>>,
    /// The hub token and the client's own, when the request asked for progress.
    progress: Option<(u64, Value)>,
}

struct ServerRequest {
    session: SessionKey,
    server_id: Value,
    progress_token: Option<Value>,
}

struct Session {
    identity: Box<str>,
    last_used: u64,
    /// When a request last named it (for idle expiry).
    used_at: std::time::Instant,
}

/// The router. `W` answers a waiting worker (a channel sender in the hub, anything in tests).
pub struct Router<W> {
    limits: Limits,
    pending: HashMap<u64, Pending<W>>,
    /// Hub progress token -> hub request id.
    progress: HashMap<u64, u64>,
    next_token: u64,
    /// Hub id -> server-initiated request; ordered, so the oldest is first.
    server_requests: BTreeMap<u64, ServerRequest>,
    next_server_request: u64,
    sessions: HashMap<SessionKey, Session>,
    /// Per identity, its sessions by last use (a logical clock), oldest first.
    identities: HashMap<Box<str>, BTreeMap<u64, SessionKey>>,
    tick: u64,
    /// The protocol version the upstream agreed to, for the replayed initialize.
    protocol_version: Option<String>,
    replay_pending: Option<u64>,
    /// Client lines (with the request each carries) that arrived while a restarted upstream had
    /// not yet answered the replayed initialize: a client sends nothing but pings before the
    /// server has answered initialize, so they wait, in order, until it has.
    held: Vec<(Vec<u8>, Option<u64>)>,
    /// Requests the worker gave up on (timeout) that the upstream may still be working on,
    /// by hub id (oldest first), with their session: until the upstream answers, a
    /// server-initiated request may still be theirs, so they count as in flight when one is
    /// routed. Bounded by `max_pending`; the oldest go first.
    abandoned: BTreeMap<u64, Option<SessionKey>>,
}

/// One compact JSON line, LF-terminated. serde_json escapes every control character inside
/// strings and writes no whitespace, so the only LF is the terminator; checked all the same.
///
/// The Unicode line breaks JSON allows raw inside strings (U+0085, U+2028, U+2029) are escaped
/// too: a child that splits its input the way `str.splitlines()` does would otherwise see two
/// lines. Outside strings compact JSON has no whitespace, so they can only be inside one.
pub fn frame<T: serde::Serialize + ?Sized>(value: &T) -> Option<Vec<u8>> {
    let mut line = serde_json::to_vec(value).ok()?;
    let one_line = !line.iter().any(|b| *b == b'\n' || *b == b'\r');
    debug_assert!(one_line, "a compact JSON line held a raw CR or LF");
    if !one_line {
        return None;
    }
    if line
        .windows(2)
        .any(|w| w == [0xC2, 0x85] || w == [0xE2, 0x80])
    {
        line = escape_unicode_line_breaks(&line);
    }
    line.push(b'\n');
    Some(line)
}

/// Replaces the UTF-8 forms of U+0085, U+2028 and U+2029 with their `\uXXXX` escapes.
fn escape_unicode_line_breaks(json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(json.len() + 16);
    let mut i = 0;
    while i < json.len() {
        let rest = &json[i..];
        let escape: Option<(&[u8], usize)> = if rest.starts_with(&[0xC2, 0x85]) {
            Some((b"\\u0085", 2))
        } else if rest.starts_with(&[0xE2, 0x80, 0xA8]) {
            Some((b"\\u2028", 3))
        } else if rest.starts_with(&[0xE2, 0x80, 0xA9]) {
            Some((b"\\u2029", 3))
        } else {
            None
        };
        match escape {
            Some((e, len)) => {
                out.extend_from_slice(e);
                i += len;
            }
            None => {
                out.push(json[i]);
                i += 1;
            }
        }
    }
    out
}

fn parse_object(bytes: &[u8]) -> Option<Map<String, Value>> {
    match serde_json::from_slice::<Value>(bytes).ok()? {
        Value::Object(o) => Some(o),
        _ => None,
    }
}

fn method_of(o: &Map<String, Value>) -> Option<&str> {
    o.get("method").and_then(Value::as_str)
}

fn params_field<'a>(o: &'a Map<String, Value>, field: &str) -> Option<&'a Value> {
    o.get("params").and_then(|p| p.get(field))
}

fn set_params_field(o: &mut Map<String, Value>, field: &str, v: Value) {
    if let Some(Value::Object(p)) = o.get_mut("params") {
        p.insert(field.into(), v);
    }
}

impl<W> Default for Router<W> {
    fn default() -> Self {
        Self::new(Limits::default())
    }
}

impl<W> Router<W> {
    /// An empty router.
    pub fn new(limits: Limits) -> Self {
        Router {
            limits,
            pending: HashMap::new(),
            progress: HashMap::new(),
            next_token: 1,
            server_requests: BTreeMap::new(),
            next_server_request: 1,
            sessions: HashMap::new(),
            identities: HashMap::new(),
            tick: 0,
            protocol_version: None,
            replay_pending: None,
            held: Vec::new(),
            abandoned: BTreeMap::new(),
        }
    }

    /// Sessions held.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Client requests in flight.
    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// Server-initiated requests awaiting an answer.
    pub fn server_request_count(&self) -> usize {
        self.server_requests.len()
    }

    /// Progress tokens routed.
    pub fn progress_count(&self) -> usize {
        self.progress.len()
    }

    /// Whether the session exists; marks it used.
    pub fn touch(&mut self, key: &SessionKey) -> bool {
        let Some(s) = self.sessions.get_mut(key) else {
            return false;
        };
        self.tick += 1;
        if let Some(lru) = self.identities.get_mut(&*s.identity) {
            lru.remove(&s.last_used);
            lru.insert(self.tick, *key);
        }
        s.last_used = self.tick;
        s.used_at = std::time::Instant::now();
        true
    }

    /// Ends the sessions no request has named since `cutoff`, unless a request of theirs is
    /// still in flight (a long tool call is not idleness) or their client is `listening` on a
    /// stream; returns how many ended.
    pub fn expire_idle(
        &mut self,
        cutoff: std::time::Instant,
        listening: &std::collections::HashSet<SessionKey>,
        out: &mut Vec<Output<W>>,
    ) -> usize {
        let mut busy: std::collections::HashSet<SessionKey> =
            self.pending.values().filter_map(|p| p.session).collect();
        busy.extend(listening);
        let idle: Vec<SessionKey> = self
            .sessions
            .iter()
            .filter(|(k, s)| s.used_at < cutoff && !busy.contains(*k))
            .map(|(k, _)| *k)
            .collect();
        for key in &idle {
            self.remove_session(key, out);
        }
        idle.len()
    }

    fn emit(&self, value: &impl serde::Serialize, request: Option<u64>, out: &mut Vec<Output<W>>) {
        match frame(value) {
            Some(line) => out.push(Output::ToChild { line, request }),
            None => out.push(Output::Dropped(DropReason::Malformed)),
        }
    }

    /// Writes a client's line, or holds it while the replayed handshake is under way (bounded:
    /// beyond [`MAX_HELD`] a request fails at once as busy, anything else is dropped).
    fn write_client(&mut self, line: Vec<u8>, request: Option<u64>, out: &mut Vec<Output<W>>) {
        if self.replay_pending.is_none() {
            return out.push(Output::ToChild { line, request });
        }
        if self.held.len() < MAX_HELD {
            return self.held.push((line, request));
        }
        match request.and_then(|h| self.abandon(h)) {
            Some(waiter) => out.push(Output::Fail {
                waiter,
                error: GatewayError::UpstreamBusy,
            }),
            None => out.push(Output::Dropped(DropReason::HeldOverflow)),
        }
    }

    /// [`Router::emit`] for a message on a client's behalf: held like its requests.
    fn emit_client(&mut self, value: &impl serde::Serialize, out: &mut Vec<Output<W>>) {
        match frame(value) {
            Some(line) => self.write_client(line, None, out),
            None => out.push(Output::Dropped(DropReason::Malformed)),
        }
    }

    /// A client request (it has an id and a method). `hub_id` is unique to the hub and below
    /// [`REPLAY_ID_BASE`]; `session` is `None` only for an initialize; `identity` is the caller's
    /// binding (the session's owner).
    pub fn client_request(
        &mut self,
        hub_id: u64,
        session: Option<SessionKey>,
        identity: &str,
        message: &[u8],
        waiter: W,
        out: &mut Vec<Output<W>>,
    ) {
        macro_rules! fail {
            ($e:expr) => {{
                out.push(Output::Fail { waiter, error: $e });
                return;
            }};
        }
        if let Some(s) = &session {
            if self
                .sessions
                .get(s)
                .is_none_or(|s| &*s.identity != identity)
            {
                fail!(GatewayError::UnknownSession);
            }
            self.touch(s);
        }
        if hub_id >= REPLAY_ID_BASE || self.pending.contains_key(&hub_id) {
            fail!(GatewayError::UpstreamUnavailable(
                "stdio hub id reused".into()
            ));
        }
        if self.pending.len() >= self.limits.max_pending {
            fail!(GatewayError::UpstreamBusy);
        }
        let Some(mut msg) = parse_object(message) else {
            fail!(GatewayError::Parse("invalid JSON-RPC request".into()));
        };
        let Some(method) = method_of(&msg) else {
            fail!(GatewayError::Parse("request without a method".into()));
        };
        if method.starts_with("notifications/") {
            // A notification never carries an id; one that does would reach the child
            // without the remapping notifications get (see `client_send`).
            fail!(GatewayError::InvalidRequest(
                "a notification must not carry an id".into(),
                None
            ));
        }
        let is_initialize = method == "initialize";
        if session.is_none() && !is_initialize {
            fail!(GatewayError::MissingSession);
        }
        let original_id = msg.insert("id".into(), Value::from(hub_id));
        let Some(original_id) = original_id else {
            fail!(GatewayError::Parse("request without an id".into()));
        };
        // `-0` is the one integer serde_json keeps as a float (-0.0), which would come back as
        // `-0.0` and not parse as the integer id the client sent: it is the id 0 (as the
        // classifier read it), and 0 is what comes back.
        let original_id = match original_id {
            Value::Number(n) if n.is_f64() && n.as_f64() == Some(0.0) => Value::from(0),
            other => other,
        };
        let mut progress = None;
        if let Some(Value::Object(p)) = msg.get_mut("params")
            && let Some(Value::Object(meta)) = p.get_mut("_meta")
            && let Some(token) = meta.get_mut("progressToken")
        {
            let hub_token = self.next_token;
            self.next_token += 1;
            let original = std::mem::replace(token, Value::from(hub_token));
            progress = Some((hub_token, original));
        }
        let Some(line) = frame(&msg) else {
            out.push(Output::Dropped(DropReason::Malformed));
            fail!(GatewayError::Parse("unframeable request".into()));
        };
        if let Some((t, _)) = &progress {
            self.progress.insert(*t, hub_id);
        }
        self.pending.insert(
            hub_id,
            Pending {
                waiter,
                original_id,
                session,
                init_identity: is_initialize.then(|| identity.into()),
                progress,
            },
        );
        self.write_client(line, Some(hub_id), out);
    }

    /// The waiter of a client request still in flight.
    pub fn waiter(&self, hub_id: u64) -> Option<&W> {
        self.pending.get(&hub_id).map(|p| &p.waiter)
    }

    fn take_pending(&mut self, hub_id: u64) -> Option<Pending<W>> {
        let p = self.pending.remove(&hub_id)?;
        if let Some((t, _)) = &p.progress {
            self.progress.remove(t);
        }
        // A request just finished: its session's idle time starts now, not when it was sent.
        if let Some(s) = p.session.and_then(|k| self.sessions.get_mut(&k)) {
            s.used_at = std::time::Instant::now();
        }
        Some(p)
    }

    /// The line carrying `hub_id` could not be written: forget the request, return its waiter.
    pub fn abandon(&mut self, hub_id: u64) -> Option<W> {
        self.take_pending(hub_id).map(|p| p.waiter)
    }

    /// The worker gave up on `hub_id` (timeout): forget it and tell the upstream.
    pub fn cancel(&mut self, hub_id: u64, out: &mut Vec<Output<W>>) {
        // Still held: the upstream never saw it, so there is nothing to cancel there.
        if let Some(i) = self.held.iter().position(|(_, r)| *r == Some(hub_id)) {
            self.held.remove(i);
            self.take_pending(hub_id);
            return;
        }
        if let Some(p) = self.take_pending(hub_id) {
            while self.abandoned.len() >= self.limits.max_pending.max(1) {
                self.abandoned.pop_first();
            }
            self.abandoned.insert(hub_id, p.session);
            let note = json!({"jsonrpc":"2.0","method":"notifications/cancelled",
                "params":{"requestId": hub_id, "reason":"client request timed out"}});
            self.emit_client(&note, out);
        }
    }

    /// A client notification or a client response to a server-initiated request. Messages
    /// naming an id the session does not own are dropped (and reported in `out`), not refused,
    /// so a prober learns nothing.
    pub fn client_send(
        &mut self,
        session: SessionKey,
        message: &[u8],
        out: &mut Vec<Output<W>>,
    ) -> Result<(), GatewayError> {
        if !self.touch(&session) {
            return Err(GatewayError::UnknownSession);
        }
        let Some(mut msg) = parse_object(message) else {
            return Err(GatewayError::Parse("invalid JSON-RPC message".into()));
        };
        let has_id = msg.contains_key("id");
        match (msg.get("method"), has_id) {
            (Some(Value::String(_)), false) => {
                self.client_notification(session, msg, out);
                Ok(())
            }
            (None, true) => {
                let owned = msg
                    .get("id")
                    .and_then(Value::as_u64)
                    .and_then(|h| self.server_requests.get(&h).map(|r| (h, r)))
                    .filter(|(_, r)| r.session == session)
                    .map(|(h, _)| h);
                match owned.and_then(|h| self.server_requests.remove(&h)) {
                    Some(r) => {
                        msg.insert("id".into(), r.server_id);
                        self.emit_client(&msg, out);
                    }
                    None => out.push(Output::Dropped(DropReason::ForeignResponse)),
                }
                Ok(())
            }
            _ => Err(GatewayError::InvalidRequest(
                "not a notification or a response".into(),
                None,
            )),
        }
    }

    fn client_notification(
        &mut self,
        session: SessionKey,
        mut msg: Map<String, Value>,
        out: &mut Vec<Output<W>>,
    ) {
        match method_of(&msg) {
            Some("notifications/cancelled") => {
                let target = params_field(&msg, "requestId").and_then(|rid| {
                    self.pending
                        .iter()
                        .find(|(_, p)| p.session == Some(session) && p.original_id == *rid)
                        .map(|(h, _)| *h)
                });
                match target {
                    Some(h) => {
                        set_params_field(&mut msg, "requestId", Value::from(h));
                        self.emit_client(&msg, out);
                    }
                    None => out.push(Output::Dropped(DropReason::ForeignCancel)),
                }
            }
            Some("notifications/progress") => {
                // A client reports progress only on a server-initiated request it was given.
                let owned = params_field(&msg, "progressToken").is_some_and(|t| {
                    self.server_requests
                        .values()
                        .any(|r| r.session == session && r.progress_token.as_ref() == Some(t))
                });
                if owned {
                    self.emit_client(&msg, out);
                } else {
                    out.push(Output::Dropped(DropReason::ForeignProgress));
                }
            }
            _ => self.emit_client(&msg, out),
        }
    }

    /// A line from the upstream (without its terminator).
    pub fn child_line(&mut self, line: &[u8], out: &mut Vec<Output<W>>) {
        match serde_json::from_slice::<Value>(line) {
            Ok(Value::Object(o)) => self.child_message(o, out),
            Ok(Value::Array(batch)) => {
                for m in batch {
                    match m {
                        Value::Object(o) => self.child_message(o, out),
                        _ => out.push(Output::Dropped(DropReason::Malformed)),
                    }
                }
            }
            _ => out.push(Output::Dropped(DropReason::Malformed)),
        }
    }

    fn child_message(&mut self, msg: Map<String, Value>, out: &mut Vec<Output<W>>) {
        let has_method = matches!(msg.get("method"), Some(Value::String(_)));
        match (has_method, msg.contains_key("id")) {
            (false, true) => self.child_response(msg, out),
            (true, true) => self.child_request(msg, out),
            (true, false) => self.child_notification(msg, out),
            (false, false) => out.push(Output::Dropped(DropReason::Malformed)),
        }
    }

    fn child_response(&mut self, mut msg: Map<String, Value>, out: &mut Vec<Output<W>>) {
        let Some(hub_id) = msg.get("id").and_then(Value::as_u64) else {
            return out.push(Output::Dropped(DropReason::UnknownResponse));
        };
        if hub_id == PING_ID {
            // The answer to the hub's own liveness ping: nobody waits for it.
            return;
        }
        if self.replay_pending == Some(hub_id) {
            // The answer to the replayed initialize: complete the handshake for the new child,
            // then let through what clients sent meanwhile.
            self.replay_pending = None;
            self.emit(
                &json!({"jsonrpc":"2.0","method":"notifications/initialized"}),
                None,
                out,
            );
            for (line, request) in std::mem::take(&mut self.held) {
                out.push(Output::ToChild { line, request });
            }
            return;
        }
        let Some(p) = self.take_pending(hub_id) else {
            // A late answer to an abandoned request ends its claim on server requests.
            self.abandoned.remove(&hub_id);
            return out.push(Output::Dropped(DropReason::UnknownResponse));
        };
        msg.insert("id".into(), p.original_id);
        let mut new_session = None;
        if let Some(identity) = p.init_identity
            && let Some(result) = msg.get("result")
        {
            if let Some(v) = result.get("protocolVersion").and_then(Value::as_str)
                && v.len() <= 64
            {
                self.protocol_version = Some(v.to_string());
            }
            new_session = Some(self.admit(identity, out));
        }
        match serde_json::to_vec(&msg) {
            Ok(message) => out.push(Output::Respond {
                waiter: p.waiter,
                message,
                new_session,
            }),
            Err(_) => out.push(Output::Fail {
                waiter: p.waiter,
                error: GatewayError::UpstreamUnavailable("unserialisable response".into()),
            }),
        }
    }

    /// Picks the session a server-initiated request belongs to: the only one with requests in
    /// flight, else the only session; otherwise nobody can know.
    fn owner_for_server_request(&self) -> Option<SessionKey> {
        // Requests still in flight, and abandoned ones the upstream may still be working on: a
        // server request may belong to any of them. One of a deleted session makes the owner
        // unknowable too. (An initialize in flight has no session yet and claims nothing.)
        let in_flight = self
            .pending
            .values()
            .filter_map(|p| p.session)
            .chain(self.abandoned.values().filter_map(|s| *s));
        let mut found = None;
        for s in in_flight {
            match found {
                None => found = Some(s),
                Some(f) if f != s => return None,
                Some(_) => {}
            }
        }
        if let Some(owner) = found {
            return self.sessions.contains_key(&owner).then_some(owner);
        }
        if self.sessions.len() == 1 {
            return self.sessions.keys().next().copied();
        }
        None
    }

    fn refuse_server_request(&self, server_id: Value, message: &str, out: &mut Vec<Output<W>>) {
        let err = json!({"jsonrpc":"2.0","id":server_id,
            "error":{"code":-32603,"message":message}});
        self.emit(&err, None, out);
    }

    fn child_request(&mut self, mut msg: Map<String, Value>, out: &mut Vec<Output<W>>) {
        let server_id = msg.get("id").cloned().unwrap_or(Value::Null);
        // Only an id the hub can hand back exactly: a string or an integer (a fraction or an
        // integer beyond 64 bits would come back re-spelled, answering nobody).
        if !(server_id.is_string() || server_id.is_u64() || server_id.is_i64()) {
            return out.push(Output::Dropped(DropReason::Malformed));
        }
        if method_of(&msg).is_some_and(|m| m.starts_with("notifications/")) {
            // Not a request whatever its id says: nothing of it is delivered.
            out.push(Output::Dropped(DropReason::Malformed));
            return self.refuse_server_request(
                server_id,
                "a notification must not carry an id",
                out,
            );
        }
        let Some(session) = self.owner_for_server_request() else {
            out.push(Output::Dropped(DropReason::UnroutableServerRequest));
            return self.refuse_server_request(server_id, UNROUTABLE_MESSAGE, out);
        };
        while self.server_requests.len() >= self.limits.max_server_requests.max(1) {
            if let Some((_, old)) = self.server_requests.pop_first() {
                out.push(Output::Dropped(DropReason::ServerRequestEvicted));
                self.refuse_server_request(
                    old.server_id,
                    "too many server-initiated requests awaiting an answer",
                    out,
                );
            }
        }
        let hub_id = self.next_server_request;
        self.next_server_request += 1;
        msg.insert("id".into(), Value::from(hub_id));
        let progress_token = msg
            .get("params")
            .and_then(|p| p.get("_meta"))
            .and_then(|m| m.get("progressToken"))
            .cloned();
        match serde_json::to_vec(&msg) {
            Ok(message) => {
                self.server_requests.insert(
                    hub_id,
                    ServerRequest {
                        session,
                        server_id,
                        progress_token,
                    },
                );
                out.push(Output::Deliver {
                    session,
                    message,
                    server_request: Some(hub_id),
                    for_request: None,
                });
            }
            Err(_) => out.push(Output::Dropped(DropReason::Malformed)),
        }
    }

    /// A server-initiated request could not be delivered (no open stream, or it was full):
    /// forget it and answer the upstream with an error.
    pub fn undeliverable(&mut self, server_request: u64, out: &mut Vec<Output<W>>) {
        if let Some(r) = self.server_requests.remove(&server_request) {
            self.refuse_server_request(
                r.server_id,
                "no client stream is open to receive this request",
                out,
            );
        }
    }

    fn child_notification(&mut self, mut msg: Map<String, Value>, out: &mut Vec<Output<W>>) {
        match method_of(&msg) {
            Some("notifications/progress") => {
                let route = params_field(&msg, "progressToken")
                    .and_then(Value::as_u64)
                    .and_then(|t| self.progress.get(&t))
                    .and_then(|h| Some((*h, self.pending.get(h)?)))
                    .and_then(|(h, p)| Some((h, p.session?, p.progress.as_ref()?.1.clone())))
                    .filter(|(_, s, _)| self.sessions.contains_key(s));
                let Some((request, session, token)) = route else {
                    return out.push(Output::Dropped(DropReason::UnknownProgressToken));
                };
                set_params_field(&mut msg, "progressToken", token);
                self.deliver(session, &msg, Some(request), out);
            }
            Some("notifications/cancelled") => {
                let target = params_field(&msg, "requestId").and_then(|rid| {
                    self.server_requests
                        .iter()
                        .find(|(_, r)| r.server_id == *rid)
                        .map(|(h, _)| *h)
                });
                match target.and_then(|h| Some((h, self.server_requests.remove(&h)?))) {
                    Some((h, r)) => {
                        set_params_field(&mut msg, "requestId", Value::from(h));
                        self.deliver(r.session, &msg, None, out);
                    }
                    None => out.push(Output::Dropped(DropReason::UnknownCancel)),
                }
            }
            _ => {
                // Tied to no request: every session of the shared process hears it.
                let Ok(message) = serde_json::to_vec(&msg) else {
                    return out.push(Output::Dropped(DropReason::Malformed));
                };
                out.push(Output::Broadcast {
                    sessions: self.sessions.keys().copied().collect(),
                    message,
                });
            }
        }
    }

    fn deliver(
        &self,
        session: SessionKey,
        msg: &Map<String, Value>,
        for_request: Option<u64>,
        out: &mut Vec<Output<W>>,
    ) {
        match serde_json::to_vec(msg) {
            Ok(message) => out.push(Output::Deliver {
                session,
                message,
                server_request: None,
                for_request,
            }),
            Err(_) => out.push(Output::Dropped(DropReason::Malformed)),
        }
    }

    /// Admits a new session for `identity`, evicting first if a cap is reached: the identity's
    /// own least recently used session when it is at its cap, else (table full) the least
    /// recently used of the identity holding the most sessions.
    fn admit(&mut self, identity: Box<str>, out: &mut Vec<Output<W>>) -> SessionKey {
        let own = self.identities.get(&identity).map_or(0, BTreeMap::len);
        let victim_identity = if own >= self.limits.max_sessions_per_identity.max(1) {
            Some(identity.clone())
        } else if self.sessions.len() >= self.limits.max_sessions.max(1) {
            self.identities
                .iter()
                .max_by_key(|(_, lru)| lru.len())
                .map(|(i, _)| i.clone())
        } else {
            None
        };
        if let Some(victim) = victim_identity
            && let Some(key) = self
                .identities
                .get(&victim)
                .and_then(|lru| lru.values().next().copied())
        {
            self.remove_session(&key, out);
        }
        let key: SessionKey = random_bytes();
        self.tick += 1;
        self.identities
            .entry(identity.clone())
            .or_default()
            .insert(self.tick, key);
        self.sessions.insert(
            key,
            Session {
                identity,
                last_used: self.tick,
                used_at: std::time::Instant::now(),
            },
        );
        key
    }

    fn remove_session(&mut self, key: &SessionKey, out: &mut Vec<Output<W>>) -> bool {
        let Some(s) = self.sessions.remove(key) else {
            return false;
        };
        if let Some(lru) = self.identities.get_mut(&*s.identity) {
            lru.remove(&s.last_used);
            if lru.is_empty() {
                self.identities.remove(&*s.identity);
            }
        }
        // Its progress routes go; its in-flight requests still answer their own waiters.
        for p in self.pending.values_mut() {
            if p.session == Some(*key)
                && let Some((t, _)) = p.progress.take()
            {
                self.progress.remove(&t);
            }
        }
        let orphaned: Vec<u64> = self
            .server_requests
            .iter()
            .filter(|(_, r)| r.session == *key)
            .map(|(h, _)| *h)
            .collect();
        for h in orphaned {
            if let Some(r) = self.server_requests.remove(&h) {
                self.refuse_server_request(r.server_id, "the client session ended", out);
            }
        }
        out.push(Output::SessionEnded(*key));
        true
    }

    /// Ends a session (client DELETE); false when it does not exist.
    pub fn delete_session(&mut self, key: &SessionKey, out: &mut Vec<Output<W>>) -> bool {
        self.remove_session(key, out)
    }

    /// A (re)started upstream: once an earlier one agreed to a protocol version, the hub
    /// replays its *own* initialize (never a client's params) so existing sessions carry on.
    pub fn child_started(&mut self, generation: u64, out: &mut Vec<Output<W>>) {
        self.replay_pending = None;
        let Some(version) = self.protocol_version.clone() else {
            return;
        };
        let id = REPLAY_ID_BASE + (generation & (REPLAY_ID_BASE - 1));
        self.replay_pending = Some(id);
        let init = json!({"jsonrpc":"2.0","id":id,"method":"initialize","params":{
            "protocolVersion": version,
            "capabilities": {},
            "clientInfo": {"name":"mcp-guard","version":env!("CARGO_PKG_VERSION")}}});
        self.emit(&init, None, out);
    }

    /// The hub's own `ping` (allowed before initialization), so that an upstream is known to
    /// answer before any client has talked to it.
    pub fn health_ping(&self, out: &mut Vec<Output<W>>) {
        self.emit(
            &json!({"jsonrpc":"2.0","id":PING_ID,"method":"ping"}),
            None,
            out,
        );
    }

    /// The upstream exited: every request in flight fails, every id mapping is forgotten.
    pub fn child_exited(&mut self, out: &mut Vec<Output<W>>) {
        for (_, p) in self.pending.drain() {
            out.push(Output::Fail {
                waiter: p.waiter,
                error: GatewayError::UpstreamUnavailable("stdio upstream process exited".into()),
            });
        }
        self.progress.clear();
        self.server_requests.clear();
        self.abandoned.clear();
        self.replay_pending = None;
        // Their requests have just failed; nothing of them may reach the next child.
        self.held.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type R = Router<u64>;

    fn lines(out: &[Output<u64>]) -> Vec<Value> {
        out.iter()
            .filter_map(|o| match o {
                Output::ToChild { line, .. } => Some(serde_json::from_slice(line).unwrap()),
                _ => None,
            })
            .collect()
    }

    fn delivered(out: &[Output<u64>]) -> Vec<(SessionKey, Value)> {
        out.iter()
            .flat_map(|o| match o {
                Output::Deliver {
                    session, message, ..
                } => vec![(*session, serde_json::from_slice(message).unwrap())],
                Output::Broadcast { sessions, message } => sessions
                    .iter()
                    .map(|s| (*s, serde_json::from_slice(message).unwrap()))
                    .collect(),
                _ => Vec::new(),
            })
            .collect()
    }

    fn dropped(out: &[Output<u64>]) -> Vec<DropReason> {
        out.iter()
            .filter_map(|o| match o {
                Output::Dropped(r) => Some(*r),
                _ => None,
            })
            .collect()
    }

    /// Runs an initialize for `identity` through the router and the child's answer.
    fn session(r: &mut R, hub_id: u64, identity: &str) -> SessionKey {
        let mut out = Vec::new();
        let init = br#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{"sampling":{}},"clientInfo":{"name":"evil","version":"1"}}}"#;
        r.client_request(hub_id, None, identity, init, hub_id, &mut out);
        assert_eq!(lines(&out).len(), 1);
        out.clear();
        let answer = format!(
            r#"{{"jsonrpc":"2.0","id":{hub_id},"result":{{"protocolVersion":"2025-03-26","capabilities":{{}},"serverInfo":{{"name":"s","version":"1"}}}}}}"#
        );
        r.child_line(answer.as_bytes(), &mut out);
        out.iter()
            .find_map(|o| match o {
                Output::Respond { new_session, .. } => *new_session,
                _ => None,
            })
            .expect("a new session")
    }

    fn request(r: &mut R, hub_id: u64, s: SessionKey, identity: &str, body: &str) -> Value {
        let mut out = Vec::new();
        r.client_request(hub_id, Some(s), identity, body.as_bytes(), hub_id, &mut out);
        let l = lines(&out);
        assert_eq!(l.len(), 1, "{out:?}");
        l[0].clone()
    }

    /// A `tools/call` (client id 1) in flight for `s` under hub id `hub_id`.
    fn call_in_flight(r: &mut R, hub_id: u64, s: SessionKey, identity: &str) {
        request(
            r,
            hub_id,
            s,
            identity,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call"}"#,
        );
    }

    #[test]
    fn a_negative_zero_id_comes_back_as_an_integer() {
        let mut r = R::default();
        let a = session(&mut r, 1, "alice");
        request(
            &mut r,
            2,
            a,
            "alice",
            r#"{"jsonrpc":"2.0","id":-0,"method":"ping"}"#,
        );
        let mut out = Vec::new();
        r.child_line(br#"{"jsonrpc":"2.0","id":2,"result":{}}"#, &mut out);
        let answer = out
            .iter()
            .find_map(|o| match o {
                Output::Respond { message, .. } => Some(message.clone()),
                _ => None,
            })
            .expect("an answer");
        assert_eq!(
            String::from_utf8(answer).unwrap(),
            r#"{"id":0,"jsonrpc":"2.0","result":{}}"#
        );
    }

    #[test]
    fn request_ids_are_remapped_and_restored() {
        let mut r = R::default();
        let a = session(&mut r, 1, "alice");
        let sent = request(
            &mut r,
            7,
            a,
            "alice",
            r#"{"jsonrpc":"2.0","id":"x","method":"ping"}"#,
        );
        assert_eq!(sent["id"], 7);
        let mut out = Vec::new();
        r.child_line(br#"{"jsonrpc":"2.0","id":7,"result":{}}"#, &mut out);
        match &out[..] {
            [
                Output::Respond {
                    waiter: 7, message, ..
                },
            ] => {
                let v: Value = serde_json::from_slice(message).unwrap();
                assert_eq!(v["id"], "x");
            }
            o => panic!("{o:?}"),
        }
        assert_eq!(r.pending_count(), 0);
    }

    #[test]
    fn two_sessions_with_the_same_progress_token_each_see_only_their_own() {
        let mut r = R::default();
        let a = session(&mut r, 1, "alice");
        let b = session(&mut r, 2, "bob");
        let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","_meta":{"progressToken":1}}}"#;
        let ta = request(&mut r, 10, a, "alice", body)["params"]["_meta"]["progressToken"].clone();
        let tb = request(&mut r, 11, b, "bob", body)["params"]["_meta"]["progressToken"].clone();
        assert_ne!(ta, tb, "hub tokens are unique");
        for (token, owner) in [(&ta, a), (&tb, b)] {
            let mut out = Vec::new();
            let note = json!({"jsonrpc":"2.0","method":"notifications/progress",
                "params":{"progressToken": token, "progress": 1}});
            r.child_line(note.to_string().as_bytes(), &mut out);
            let d = delivered(&out);
            assert_eq!(d.len(), 1, "{out:?}");
            assert_eq!(d[0].0, owner);
            assert_eq!(
                d[0].1["params"]["progressToken"], 1,
                "client token restored"
            );
        }
    }

    #[test]
    fn progress_for_an_unknown_token_is_dropped_never_broadcast() {
        let mut r = R::default();
        let _a = session(&mut r, 1, "alice");
        let _b = session(&mut r, 2, "bob");
        for token in [json!(1), json!("1"), json!(999)] {
            let mut out = Vec::new();
            let note = json!({"jsonrpc":"2.0","method":"notifications/progress",
                "params":{"progressToken": token, "progress": 1}});
            r.child_line(note.to_string().as_bytes(), &mut out);
            assert!(delivered(&out).is_empty());
            assert_eq!(dropped(&out), [DropReason::UnknownProgressToken]);
        }
    }

    #[test]
    fn progress_route_ends_with_the_request() {
        let mut r = R::default();
        let a = session(&mut r, 1, "alice");
        let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"_meta":{"progressToken":"p"}}}"#;
        request(&mut r, 10, a, "alice", body);
        request(&mut r, 11, a, "alice", body);
        assert_eq!(r.progress_count(), 2);
        let mut out = Vec::new();
        r.child_line(br#"{"jsonrpc":"2.0","id":10,"result":{}}"#, &mut out);
        r.cancel(11, &mut out);
        assert_eq!(r.progress_count(), 0);
        assert_eq!(r.pending_count(), 0);
    }

    #[test]
    fn cancel_of_another_sessions_request_is_dropped() {
        let mut r = R::default();
        let a = session(&mut r, 1, "alice");
        let b = session(&mut r, 2, "bob");
        request(
            &mut r,
            10,
            a,
            "alice",
            r#"{"jsonrpc":"2.0","id":5,"method":"tools/call"}"#,
        );
        let mut out = Vec::new();
        // Bob guesses both Alice's id and the hub's id.
        for rid in [5, 10] {
            let c = json!({"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":rid}});
            r.client_send(b, c.to_string().as_bytes(), &mut out)
                .unwrap();
        }
        assert!(lines(&out).is_empty(), "{out:?}");
        assert_eq!(dropped(&out), [DropReason::ForeignCancel; 2]);
        // Alice cancelling her own id reaches the child under the hub id.
        let mut out = Vec::new();
        let c = br#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":5}}"#;
        r.client_send(a, c, &mut out).unwrap();
        assert_eq!(lines(&out)[0]["params"]["requestId"], 10);
    }

    fn sampling(r: &mut R, server_id: u64) -> Vec<Output<u64>> {
        let mut out = Vec::new();
        let req =
            json!({"jsonrpc":"2.0","id":server_id,"method":"sampling/createMessage","params":{}});
        r.child_line(req.to_string().as_bytes(), &mut out);
        out
    }

    #[test]
    fn server_request_goes_to_the_only_busy_session_and_only_it_may_answer() {
        let mut r = R::default();
        let a = session(&mut r, 1, "alice");
        let b = session(&mut r, 2, "bob");
        call_in_flight(&mut r, 10, a, "alice");
        let out = sampling(&mut r, 77);
        let d = delivered(&out);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].0, a);
        let given = d[0].1["id"].clone();
        // Bob answers Alice's request: dropped.
        let mut out = Vec::new();
        let answer = json!({"jsonrpc":"2.0","id":given,"result":{"stolen":true}});
        r.client_send(b, answer.to_string().as_bytes(), &mut out)
            .unwrap();
        assert!(lines(&out).is_empty());
        assert_eq!(dropped(&out), [DropReason::ForeignResponse]);
        // An id nobody was given: dropped.
        let mut out = Vec::new();
        r.client_send(a, br#"{"jsonrpc":"2.0","id":4242,"result":{}}"#, &mut out)
            .unwrap();
        assert_eq!(dropped(&out), [DropReason::ForeignResponse]);
        // Alice's answer reaches the child with the server's id, once.
        let mut out = Vec::new();
        r.client_send(a, answer.to_string().as_bytes(), &mut out)
            .unwrap();
        assert_eq!(lines(&out)[0]["id"], 77);
        let mut out = Vec::new();
        r.client_send(a, answer.to_string().as_bytes(), &mut out)
            .unwrap();
        assert_eq!(dropped(&out), [DropReason::ForeignResponse]);
        assert_eq!(r.server_request_count(), 0);
    }

    #[test]
    fn a_timed_out_request_still_claims_the_server_requests_that_follow_it() {
        // Alice's call times out (the worker cancels it) while the upstream works on; Bob then
        // has a call in flight. A server request arriving now may be Alice's: refused, never
        // handed to Bob.
        let mut r = R::default();
        let a = session(&mut r, 1, "alice");
        let b = session(&mut r, 2, "bob");
        call_in_flight(&mut r, 10, a, "alice");
        let mut out = Vec::new();
        r.cancel(10, &mut out);
        call_in_flight(&mut r, 11, b, "bob");
        let out = sampling(&mut r, 77);
        assert!(delivered(&out).is_empty(), "{out:?}");
        assert_eq!(dropped(&out), [DropReason::UnroutableServerRequest]);
        // Once the upstream answers the abandoned call, Bob is the only one in flight.
        let mut out = Vec::new();
        r.child_line(br#"{"jsonrpc":"2.0","id":10,"result":{}}"#, &mut out);
        let out = sampling(&mut r, 78);
        assert_eq!(delivered(&out)[0].0, b);
        // A request of a deleted session makes the owner unknowable as well.
        let mut r = R::default();
        let a = session(&mut r, 1, "alice");
        let _b = session(&mut r, 2, "bob");
        call_in_flight(&mut r, 10, a, "alice");
        let mut out = Vec::new();
        r.delete_session(&a, &mut out);
        let out = sampling(&mut r, 79);
        assert!(delivered(&out).is_empty(), "{out:?}");
    }

    #[test]
    fn notifications_carrying_an_id_are_neither_forwarded_nor_delivered() {
        let mut r = R::default();
        let a = session(&mut r, 1, "alice");
        let mut out = Vec::new();
        let bad = br#"{"jsonrpc":"2.0","id":3,"method":"notifications/cancelled","params":{"requestId":1}}"#;
        r.client_request(20, Some(a), "alice", bad, 20, &mut out);
        assert!(lines(&out).is_empty(), "{out:?}");
        assert!(matches!(out[..], [Output::Fail { .. }]), "{out:?}");
        // From the child: refused back to it, delivered to nobody.
        call_in_flight(&mut r, 10, a, "alice");
        let mut out = Vec::new();
        r.child_line(
            br#"{"jsonrpc":"2.0","id":9,"method":"notifications/progress","params":{}}"#,
            &mut out,
        );
        assert!(delivered(&out).is_empty(), "{out:?}");
        assert_eq!(dropped(&out), [DropReason::Malformed]);
        assert_eq!(lines(&out)[0]["error"]["code"], -32603);
    }

    #[test]
    fn unicode_line_breaks_inside_strings_are_escaped_on_the_way_to_the_child() {
        let line = frame(&json!({"a": "x\u{2028}y\u{2029}z\u{85}w"})).unwrap();
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        let text = std::str::from_utf8(&line).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("\\u2028") && text.contains("\\u2029") && text.contains("\\u0085"));
        let back: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(back["a"], "x\u{2028}y\u{2029}z\u{85}w");
    }

    #[test]
    fn server_request_is_refused_when_two_sessions_are_busy() {
        let mut r = R::default();
        let a = session(&mut r, 1, "alice");
        let b = session(&mut r, 2, "bob");
        call_in_flight(&mut r, 10, a, "alice");
        call_in_flight(&mut r, 11, b, "bob");
        let out = sampling(&mut r, 77);
        assert!(delivered(&out).is_empty());
        assert_eq!(dropped(&out), [DropReason::UnroutableServerRequest]);
        let l = lines(&out);
        assert_eq!(l[0]["id"], 77);
        assert_eq!(l[0]["error"]["code"], -32603);
        assert_eq!(l[0]["error"]["message"], UNROUTABLE_MESSAGE);
    }

    #[test]
    fn server_request_goes_to_the_only_session_when_none_is_busy_and_is_refused_among_idle_ones() {
        let mut r = R::default();
        let a = session(&mut r, 1, "alice");
        assert_eq!(delivered(&sampling(&mut r, 1))[0].0, a);
        let _b = session(&mut r, 2, "bob");
        let out = sampling(&mut r, 2);
        assert!(delivered(&out).is_empty());
        assert_eq!(lines(&out)[0]["error"]["code"], -32603);
    }

    #[test]
    fn child_cancel_of_a_server_request_reaches_only_its_session_with_the_given_id() {
        let mut r = R::default();
        let a = session(&mut r, 1, "alice");
        let _b = session(&mut r, 2, "bob");
        call_in_flight(&mut r, 10, a, "alice");
        let given = delivered(&sampling(&mut r, 77))[0].1["id"].clone();
        let mut out = Vec::new();
        r.child_line(
            br#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":77}}"#,
            &mut out,
        );
        let d = delivered(&out);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].0, a);
        assert_eq!(d[0].1["params"]["requestId"], given);
        let mut out = Vec::new();
        r.child_line(
            br#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":77}}"#,
            &mut out,
        );
        assert!(delivered(&out).is_empty());
        assert_eq!(dropped(&out), [DropReason::UnknownCancel]);
    }

    #[test]
    fn server_request_with_an_id_that_cannot_be_echoed_exactly_is_dropped() {
        let mut r = R::default();
        let _a = session(&mut r, 1, "alice");
        let mut out = Vec::new();
        for id in [
            "1.5",
            "222222222222222222222222222222222222222",
            "null",
            "{}",
        ] {
            let line = format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"roots/list"}}"#);
            r.child_line(line.as_bytes(), &mut out);
        }
        assert!(
            delivered(&out).is_empty() && lines(&out).is_empty(),
            "{out:?}"
        );
        assert_eq!(dropped(&out), [DropReason::Malformed; 4]);
    }

    #[test]
    fn undeliverable_server_request_is_answered_with_an_error() {
        let mut r = R::default();
        let _a = session(&mut r, 1, "alice");
        let out = sampling(&mut r, 9);
        let Some(Output::Deliver {
            server_request: Some(h),
            ..
        }) = out.first()
        else {
            panic!("{out:?}")
        };
        let mut out = Vec::new();
        r.undeliverable(*h, &mut out);
        assert_eq!(lines(&out)[0]["id"], 9);
        assert_eq!(r.server_request_count(), 0);
    }

    #[test]
    fn crlf_in_json_whitespace_never_reaches_the_child_as_two_lines() {
        let mut r = R::default();
        let a = session(&mut r, 1, "alice");
        let evil = "{\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{\"x\":1\r\n,\n\"y\":\"a\\nb\"}\n}\r\n\n{\"jsonrpc\":\"2.0\",\"id\":424242,\"method\":\"tools/call\",\"params\":{\"name\":\"denied\"}}\n";
        let mut out = Vec::new();
        // Two documents in one message is not JSON: refused outright.
        assert!(r.client_send(a, evil.as_bytes(), &mut out).is_err());
        let one = "{\"jsonrpc\":\"2.0\",\r\n\"method\":\"notifications/initialized\",\n\"params\":{\"s\":\"a\\r\\nb\"}\r\n}";
        r.client_send(a, one.as_bytes(), &mut out).unwrap();
        let req = "{\"jsonrpc\":\"2.0\",\n\"id\":1,\r\n\"method\":\"tools/call\",\n\"params\":{\"name\":\"ok\"}\n}";
        r.client_request(5, Some(a), "alice", req.as_bytes(), 5, &mut out);
        r.child_line(
            b"{\"jsonrpc\":\"2.0\",\"id\":3,\"method\":\"roots/list\"}",
            &mut out,
        );
        let given = delivered(&out)[0].1["id"].clone();
        let resp =
            format!("{{\"jsonrpc\":\"2.0\",\r\n\"id\":{given},\n\"result\":{{\"roots\":[]}}\n}}");
        r.client_send(a, resp.as_bytes(), &mut out).unwrap();
        let written: Vec<&Vec<u8>> = out
            .iter()
            .filter_map(|o| match o {
                Output::ToChild { line, .. } => Some(line),
                _ => None,
            })
            .collect();
        assert_eq!(written.len(), 3);
        for l in written {
            assert_eq!(l.iter().filter(|b| **b == b'\n').count(), 1);
            assert_eq!(l.last(), Some(&b'\n'));
            assert!(!l.contains(&b'\r'));
            serde_json::from_slice::<Value>(l).unwrap();
        }
    }

    #[test]
    fn restart_replays_the_gateways_own_initialize() {
        let mut r = R::default();
        let _a = session(&mut r, 1, "alice");
        let mut out = Vec::new();
        r.child_exited(&mut out);
        r.child_started(2, &mut out);
        let l = lines(&out);
        assert_eq!(l.len(), 1);
        let init = &l[0];
        assert_eq!(init["method"], "initialize");
        assert_eq!(init["params"]["clientInfo"]["name"], "mcp-guard");
        assert_eq!(
            init["params"]["clientInfo"]["version"],
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(
            init["params"]["protocolVersion"], "2025-03-26",
            "what the child agreed"
        );
        assert_eq!(init["params"]["capabilities"], json!({}));
        let id = init["id"].as_u64().unwrap();
        assert!(id >= REPLAY_ID_BASE);
        let mut out = Vec::new();
        r.child_line(
            format!(r#"{{"jsonrpc":"2.0","id":{id},"result":{{}}}}"#).as_bytes(),
            &mut out,
        );
        assert_eq!(lines(&out)[0]["method"], "notifications/initialized");
        // A second answer to it is nobody's.
        let mut out = Vec::new();
        r.child_line(
            format!(r#"{{"jsonrpc":"2.0","id":{id},"result":{{}}}}"#).as_bytes(),
            &mut out,
        );
        assert_eq!(dropped(&out), [DropReason::UnknownResponse]);
    }

    #[test]
    fn client_lines_wait_until_a_restarted_child_has_answered_the_replayed_initialize() {
        let mut r = R::default();
        let a = session(&mut r, 1, "alice");
        let mut out = Vec::new();
        r.child_exited(&mut out);
        r.child_started(2, &mut out);
        let replay = lines(&out)[0]["id"].as_u64().unwrap();
        // A call, a notification and a call that times out arrive before the child answers.
        let mut out = Vec::new();
        let call = br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"x"}}"#;
        r.client_request(7, Some(a), "alice", call, 7, &mut out);
        r.client_send(
            a,
            br#"{"jsonrpc":"2.0","method":"notifications/roots/list_changed"}"#,
            &mut out,
        )
        .unwrap();
        r.client_request(8, Some(a), "alice", call, 8, &mut out);
        r.cancel(8, &mut out);
        assert!(lines(&out).is_empty(), "nothing before the answer: {out:?}");
        // The answer: initialized first, then what was held, in order; the timed-out call is
        // gone without a trace (the child never saw it).
        let mut out = Vec::new();
        r.child_line(
            format!(r#"{{"jsonrpc":"2.0","id":{replay},"result":{{}}}}"#).as_bytes(),
            &mut out,
        );
        let l = lines(&out);
        let methods: Vec<&str> = l.iter().map(|m| m["method"].as_str().unwrap()).collect();
        assert_eq!(
            methods,
            [
                "notifications/initialized",
                "tools/call",
                "notifications/roots/list_changed"
            ]
        );
        assert_eq!(l[1]["id"], 7);
        // A child that dies while holding lines takes them with it.
        let mut out = Vec::new();
        r.child_exited(&mut out);
        r.child_started(3, &mut out);
        r.client_request(9, Some(a), "alice", call, 9, &mut out);
        r.child_exited(&mut out);
        r.child_started(4, &mut out);
        let replay = lines(&out).last().unwrap()["id"].as_u64().unwrap();
        let mut out = Vec::new();
        r.child_line(
            format!(r#"{{"jsonrpc":"2.0","id":{replay},"result":{{}}}}"#).as_bytes(),
            &mut out,
        );
        assert_eq!(lines(&out).len(), 1, "only initialized: {out:?}");
    }

    #[test]
    fn child_exit_fails_in_flight_requests_and_forgets_every_mapping() {
        let mut r = R::default();
        let a = session(&mut r, 1, "alice");
        request(
            &mut r,
            10,
            a,
            "alice",
            r#"{"jsonrpc":"2.0","id":1,"method":"x","params":{"_meta":{"progressToken":1}}}"#,
        );
        sampling(&mut r, 3);
        let mut out = Vec::new();
        r.child_exited(&mut out);
        assert!(matches!(out[..], [Output::Fail { waiter: 10, .. }]));
        assert_eq!(
            (
                r.pending_count(),
                r.progress_count(),
                r.server_request_count()
            ),
            (0, 0, 0)
        );
        assert_eq!(r.session_count(), 1, "sessions survive a restart");
    }

    #[test]
    fn a_session_is_used_only_by_its_identity() {
        let mut r = R::default();
        let a = session(&mut r, 1, "alice");
        let mut out = Vec::new();
        r.client_request(
            5,
            Some(a),
            "bob",
            br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#,
            5,
            &mut out,
        );
        assert!(matches!(
            out[..],
            [Output::Fail {
                error: GatewayError::UnknownSession,
                ..
            }]
        ));
    }

    #[test]
    fn per_identity_cap_evicts_the_identitys_own_oldest_session() {
        let mut r = R::new(Limits {
            max_sessions: 4,
            max_sessions_per_identity: 2,
            ..Limits::default()
        });
        let a = session(&mut r, 1, "alice");
        let m1 = session(&mut r, 2, "mallory");
        let m2 = session(&mut r, 3, "mallory");
        assert!(r.touch(&m1), "m1 now more recent than m2");
        let m3 = session(&mut r, 4, "mallory");
        assert!(r.touch(&a) && r.touch(&m1) && r.touch(&m3));
        assert!(!r.touch(&m2), "mallory's least recently used went");
        for i in 5..50 {
            session(&mut r, i, "mallory");
        }
        assert!(r.touch(&a), "alice is never evicted by mallory");
        assert_eq!(r.session_count(), 3);
    }

    #[test]
    fn full_table_evicts_from_the_identity_with_the_most_sessions() {
        let mut r = R::new(Limits {
            max_sessions: 4,
            max_sessions_per_identity: 3,
            ..Limits::default()
        });
        let a = session(&mut r, 1, "alice");
        let m1 = session(&mut r, 2, "mallory");
        let _m2 = session(&mut r, 3, "mallory");
        let _m3 = session(&mut r, 4, "mallory");
        let mut out = Vec::new();
        let init = br#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{}}"#;
        r.client_request(5, None, "carol", init, 5, &mut out);
        r.child_line(br#"{"jsonrpc":"2.0","id":5,"result":{}}"#, &mut out);
        assert!(
            out.iter()
                .any(|o| matches!(o, Output::SessionEnded(k) if *k == m1))
        );
        assert!(r.touch(&a));
        assert_eq!(r.session_count(), 4);
    }

    #[test]
    fn deleting_a_session_refuses_its_server_requests_and_drops_its_progress_routes() {
        let mut r = R::default();
        let a = session(&mut r, 1, "alice");
        request(
            &mut r,
            10,
            a,
            "alice",
            r#"{"jsonrpc":"2.0","id":1,"method":"x","params":{"_meta":{"progressToken":1}}}"#,
        );
        sampling(&mut r, 3);
        let mut out = Vec::new();
        assert!(r.delete_session(&a, &mut out));
        assert_eq!(lines(&out)[0]["id"], 3);
        assert!(
            out.iter()
                .any(|o| matches!(o, Output::SessionEnded(k) if *k == a))
        );
        assert_eq!((r.progress_count(), r.server_request_count()), (0, 0));
        assert!(!r.delete_session(&a, &mut out));
    }

    #[test]
    fn server_request_table_is_bounded_and_refuses_the_oldest() {
        let mut r = R::new(Limits {
            max_server_requests: 2,
            ..Limits::default()
        });
        let _a = session(&mut r, 1, "alice");
        sampling(&mut r, 1);
        sampling(&mut r, 2);
        let out = sampling(&mut r, 3);
        assert_eq!(dropped(&out), [DropReason::ServerRequestEvicted]);
        assert_eq!(lines(&out)[0]["id"], 1);
        assert_eq!(r.server_request_count(), 2);
    }

    #[test]
    fn client_progress_only_for_a_server_request_the_session_was_given() {
        let mut r = R::default();
        let a = session(&mut r, 1, "alice");
        let b = session(&mut r, 2, "bob");
        request(
            &mut r,
            10,
            a,
            "alice",
            r#"{"jsonrpc":"2.0","id":1,"method":"x"}"#,
        );
        let mut out = Vec::new();
        r.child_line(
            br#"{"jsonrpc":"2.0","id":9,"method":"sampling/createMessage","params":{"_meta":{"progressToken":"s"}}}"#,
            &mut out,
        );
        let p = br#"{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":"s","progress":1}}"#;
        let mut out = Vec::new();
        r.client_send(b, p, &mut out).unwrap();
        assert_eq!(dropped(&out), [DropReason::ForeignProgress]);
        let mut out = Vec::new();
        r.client_send(a, p, &mut out).unwrap();
        assert_eq!(lines(&out).len(), 1);
    }

    #[test]
    fn untied_notifications_reach_every_session() {
        let mut r = R::default();
        let a = session(&mut r, 1, "alice");
        let b = session(&mut r, 2, "bob");
        let mut out = Vec::new();
        r.child_line(
            br#"{"jsonrpc":"2.0","method":"notifications/tools/list_changed"}"#,
            &mut out,
        );
        let mut got: Vec<SessionKey> = delivered(&out).into_iter().map(|(s, _)| s).collect();
        got.sort();
        let mut want = vec![a, b];
        want.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn pending_table_is_bounded() {
        let mut r = R::new(Limits {
            max_pending: 2,
            ..Limits::default()
        });
        let a = session(&mut r, 1, "alice");
        request(
            &mut r,
            10,
            a,
            "alice",
            r#"{"jsonrpc":"2.0","id":1,"method":"x"}"#,
        );
        request(
            &mut r,
            11,
            a,
            "alice",
            r#"{"jsonrpc":"2.0","id":2,"method":"x"}"#,
        );
        let mut out = Vec::new();
        r.client_request(
            12,
            Some(a),
            "alice",
            br#"{"jsonrpc":"2.0","id":3,"method":"x"}"#,
            12,
            &mut out,
        );
        assert!(matches!(
            out[..],
            [Output::Fail {
                error: GatewayError::UpstreamBusy,
                ..
            }]
        ));
    }
}
