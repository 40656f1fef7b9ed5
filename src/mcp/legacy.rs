//! The 2024-11-05 HTTP+SSE transport, for clients that still speak it: `GET server.sse_path`
//! (or `<sse_path>/<server>`) opens a stream whose first event, `endpoint`, names our messages
//! URL with a session parameter; the client POSTs each message there and reads every answer
//! on the stream.
//!
//! The stream and the POSTs may land on different workers. The worker holding the stream owns
//! the session (its upstream session, the stream's sender, what is in flight) in a
//! worker-local table; the session id names that worker, under the MAC, so a POST, once
//! authenticated, authorized and rate-limited on whatever worker it reached, is handed to the
//! owner's inbox (a bounded channel, no lock) and answered 202 as soon as the owner takes it.
//! The owner forwards it upstream through the same [`UpstreamRef`] as any request and writes
//! the answer to the stream. The session ends with its stream: the upstream session is ended
//! too, and its id is unknown (404) from then on.

use crate::error::GatewayError;
use crate::http::client::UpstreamResponse;
use crate::http::request::{Kept, RequestHead};
use crate::http::sse::{SseDecoder, push_event};
use crate::mcp::jsonrpc::{Body, Kind, RpcId};
use crate::mcp::owed::Owed;
use crate::runtime::shutdown::LocalShutdown;
use crate::runtime::worker::Worker;
use crate::upstream::http::Cancel;
use crate::upstream::{Answer, Outgoing, UpstreamRef};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// Where every legacy client POSTs (the session parameter says which session and server).
pub const MESSAGES_PATH: &str = "/messages";
/// The query parameter naming the session.
pub const SESSION_PARAM: &str = "sessionId";

/// POSTs waiting for a worker to take them.
const INBOX: usize = 1024;
/// Messages waiting to be written to one client's stream.
const STREAM_BACKLOG: usize = 256;
/// Bytes waiting to be written to one client's stream; a client that lets more pile up is not
/// reading, and loses its session (one message larger than this still goes, alone).
const STREAM_BYTES: usize = 8 * 1024 * 1024;
/// Messages of one session being forwarded at once; beyond it a POST is refused (503).
const IN_FLIGHT: usize = 64;
/// How long a POST waits for the owning worker to take it.
const HAND_OVER: Duration = Duration::from_secs(5);
/// How long ending a session upstream may take, once its stream has closed.
const END_UPSTREAM: Duration = Duration::from_secs(5);
/// Pause before reopening an upstream's server-to-client stream that ended.
const REOPEN_STREAM: Duration = Duration::from_secs(1);

/// The second MAC part of a legacy session id: the route, marked so that no Streamable HTTP
/// session id (bound to a bare route name, which cannot hold `:`) verifies as a legacy one or
/// the other way round.
pub fn binding(route: &str) -> String {
    format!("sse:{route}")
}

/// What a legacy session id carries (its MAC binds it to the identity and route).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    /// The worker that owns the session.
    pub worker: u16,
    /// The session's number on that worker.
    pub serial: u64,
    /// Random, checked by the owner: a serial reused after a restart is not the old session.
    pub nonce: [u8; 8],
    /// The server's route name.
    pub route: String,
}

const TICKET_VERSION: u8 = 1;
const TICKET_FIXED: usize = 1 + 2 + 8 + 8;

impl Ticket {
    fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(TICKET_FIXED + self.route.len());
        b.push(TICKET_VERSION);
        b.extend_from_slice(&self.worker.to_be_bytes());
        b.extend_from_slice(&self.serial.to_be_bytes());
        b.extend_from_slice(&self.nonce);
        b.extend_from_slice(self.route.as_bytes());
        b
    }

    /// A ticket from a session payload (verified or not).
    pub fn parse(b: &[u8]) -> Option<Self> {
        if b.len() <= TICKET_FIXED || b[0] != TICKET_VERSION {
            return None;
        }
        Some(Self {
            worker: u16::from_be_bytes(b[1..3].try_into().ok()?),
            serial: u64::from_be_bytes(b[3..11].try_into().ok()?),
            nonce: b[11..19].try_into().ok()?,
            route: String::from_utf8(b[19..].to_vec()).ok()?,
        })
    }
}

/// The route a legacy session id names, read before its MAC can be checked: only to choose
/// which server's admission rules apply. Nothing is trusted from it until the MAC is verified
/// for the authenticated caller.
pub fn route_of(sid: &str) -> Option<String> {
    if sid.len() > crate::mcp::session::MAX_SESSION_ID_LEN {
        return None;
    }
    let (payload, _) = sid.split_once('.')?;
    Ticket::parse(&B64.decode(payload).ok()?).map(|t| t.route)
}

/// The session parameter of a messages URL's query, if present exactly once.
pub fn session_param(target: &str) -> Option<&str> {
    let (_, query) = target.split_once('?')?;
    let mut found = None;
    for pair in query.split(['&', ';']) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key == SESSION_PARAM {
            if found.is_some() {
                // Two session parameters: which one a proxy in front reads is anyone's guess.
                return None;
            }
            found = Some(value);
        } else if key.contains('%')
            && crate::http::percent_decoded(key).as_deref() == Some(SESSION_PARAM)
        {
            // A spelling another reader would decode to the parameter: just as ambiguous.
            return None;
        }
    }
    found
}

/// The route a legacy stream path names: `sse_path` itself is the default server,
/// `<sse_path>/<name>` a named one.
pub fn stream_route<'p>(path: &'p str, sse_path: &str) -> Option<&'p str> {
    let rest = path.strip_prefix(sse_path)?;
    if rest.is_empty() {
        return Some(crate::config::DEFAULT_ROUTE);
    }
    rest.strip_prefix('/')
        .filter(|n| !n.is_empty() && !n.contains('/'))
}

/// What the owner tells the POSTing worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ack {
    /// Taken: answer 202.
    Accepted,
    /// No such session (its stream has ended): 404.
    Unknown,
    /// Too much of this session is in flight: 503.
    Busy,
    /// The gateway is shutting down: 503.
    ShuttingDown,
}

/// A checked POST on its way to the worker owning its session.
pub struct Handover {
    serial: u64,
    nonce: [u8; 8],
    identity: Arc<str>,
    work: Work,
    request_id: String,
    /// How the POST's caller authenticated, and from where (for the audit of a failure).
    auth_method: &'static str,
    client: std::net::IpAddr,
    ack: async_channel::Sender<Ack>,
}

/// What the owner is to do with a POST.
pub enum Work {
    /// Forward the message (or batch) upstream and write the answer to the stream; the
    /// sender is dropped once the bytes are handed upstream (the POST's worker counts them
    /// against its body allowance until then).
    Forward(Body, Vec<u8>, async_channel::Sender<()>),
    /// Write the gateway's own answer (a denial, an invalid request) to the stream: a legacy
    /// client reads answers there, never in a POST's response body.
    Answer(Vec<u8>),
}

/// Every worker's inbox, in the process-wide state: legacy POSTs ([`Handover`]) and approval
/// answers (`approval::AnswerPost`) travel to the worker that owns what they name this way.
pub struct Inboxes<T = Handover> {
    senders: Vec<async_channel::Sender<T>>,
    receivers: std::sync::Mutex<Vec<Option<async_channel::Receiver<T>>>>,
}

impl<T> Inboxes<T> {
    /// One inbox per worker.
    pub fn new(workers: usize) -> Self {
        Self::with_capacity(workers, INBOX)
    }

    /// One inbox per worker, each holding at most `capacity` items.
    pub fn with_capacity(workers: usize, capacity: usize) -> Self {
        let (senders, receivers) = (0..workers)
            .map(|_| {
                let (tx, rx) = async_channel::bounded(capacity);
                (tx, Some(rx))
            })
            .unzip();
        Self {
            senders,
            receivers: std::sync::Mutex::new(receivers),
        }
    }

    /// The receiving end of `worker`'s inbox, taken once by that worker.
    pub fn take(&self, worker: usize) -> Option<async_channel::Receiver<T>> {
        self.receivers.lock().ok()?.get_mut(worker)?.take()
    }

    /// The sending end of `worker`'s inbox.
    pub fn sender(&self, worker: usize) -> Option<&async_channel::Sender<T>> {
        self.senders.get(worker)
    }
}

/// One worker's legacy sessions.
#[derive(Default)]
pub struct Sessions {
    open: RefCell<HashMap<u64, Rc<Session>>>,
    next: Cell<u64>,
}

impl Sessions {
    /// How many sessions this worker owns.
    pub fn len(&self) -> usize {
        self.open.borrow().len()
    }

    /// Whether this worker owns none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A legacy session, owned by the worker holding its stream.
struct Session {
    serial: u64,
    nonce: [u8; 8],
    identity: Arc<str>,
    route: Arc<str>,
    /// JSON messages for the client's stream.
    events: async_channel::Sender<Vec<u8>>,
    /// What upstream requests carry of the client's head (trace context, user agent, and the
    /// protocol version once negotiated); replaced, never mutated, so a request in flight
    /// keeps the one it started with.
    head: RefCell<Rc<RequestHead>>,
    /// The upstream's session (HTTP session id, stdio hub key), once initialized.
    upstream: RefCell<Option<Vec<u8>>>,
    initialized: Cell<bool>,
    /// Messages being forwarded (their answers still to come on the stream).
    in_flight: Rc<Cell<usize>>,
    /// Fired when the client's stream ends.
    closed: Rc<LocalShutdown>,
    /// Bytes queued for the stream and not yet taken by its writer.
    backlog: Rc<Cell<usize>>,
    /// Each request id the messages in flight owe a response to, and how many times.
    owed: RefCell<IdCounts>,
    /// How many responses with each of those ids the stream has carried, whichever message's
    /// answer carried them: a response one answer brings for another message's request
    /// answers that request (the client reads it on the same stream).
    answered: RefCell<IdCounts>,
    /// The ids of the session's latest requests (at most [`ASKED`]): a response among them
    /// that the stream cannot check gets the gateway's error in its place; one with any other
    /// id is only dropped.
    asked: RefCell<(std::collections::VecDeque<RpcId>, IdCounts)>,
}

/// How many of a session's latest request ids it remembers (see `Session::asked`).
const ASKED: usize = 1024;

/// Request ids, each with a count.
type IdCounts = HashMap<RpcId, u32, foldhash::fast::RandomState>;

impl Session {
    /// Queues a message for the client's stream; false once the session is over (its stream
    /// gone, or ended here because the client stopped reading).
    async fn send(&self, message: Vec<u8>) -> bool {
        let queued = self.backlog.get();
        if queued > 0 && queued + message.len() > STREAM_BYTES {
            tracing::warn!(
                target: "mcp_guard::legacy",
                "legacy SSE session of `{}` ended: over {STREAM_BYTES} bytes waiting for a client that is not reading",
                self.identity
            );
            self.end();
            return false;
        }
        self.backlog.set(queued + message.len());
        {
            let owed = self.owed.borrow();
            if !owed.is_empty() {
                let mut answered = self.answered.borrow_mut();
                crate::mcp::jsonrpc::response_ids(&message, true, |id| {
                    if owed.contains_key(&id) {
                        *answered.entry(id).or_default() += 1;
                    }
                });
            }
        }
        self.events.send(message).await.is_ok()
    }

    /// Notes that a message in flight owes responses to `ids`.
    fn owe(&self, ids: &[RpcId]) {
        let mut owed = self.owed.borrow_mut();
        let (order, asked) = &mut *self.asked.borrow_mut();
        for id in ids {
            *owed.entry(id.clone()).or_default() += 1;
            order.push_back(id.clone());
            *asked.entry(id.clone()).or_default() += 1;
            if order.len() > ASKED
                && let Some(oldest) = order.pop_front()
                && let Some(n) = asked.get_mut(&oldest)
            {
                *n -= 1;
                if *n == 0 {
                    asked.remove(&oldest);
                }
            }
        }
    }

    /// Whether `id` is one of the session's latest requests'.
    fn asked(&self, id: &RpcId) -> bool {
        self.asked.borrow().1.contains_key(id)
    }

    /// A message in flight that owed responses to `ids` is done: what the session keeps of
    /// an id no message owes any more goes.
    fn settle(&self, ids: &[RpcId]) {
        let mut owed = self.owed.borrow_mut();
        for id in ids {
            if let Some(n) = owed.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    owed.remove(id);
                    self.answered.borrow_mut().remove(id);
                }
            }
        }
    }

    /// Whether a response to `id` went by on the stream beyond the `own` this message's
    /// answer carried itself; such a one, if any, is taken as this request's.
    fn answered_elsewhere(&self, id: &RpcId, own: u32) -> bool {
        match self.answered.borrow_mut().get_mut(id) {
            Some(n) if *n > own => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }

    /// Marks the session initialized, with the protocol version its initialize negotiated
    /// (what later upstream requests carry).
    fn note_initialized(&self, version: Option<String>) {
        self.initialized.set(true);
        if let Some(v) = version {
            let mut next = (**self.head.borrow()).clone();
            next.h.set(Kept::ProtocolVersion, &v);
            *self.head.borrow_mut() = Rc::new(next);
        }
    }

    /// What an upstream call on this session's behalf carries (the route's timeout).
    fn outgoing<'a>(
        &'a self,
        w: &'a Worker,
        head: &'a RequestHead,
        cfg: &'a crate::config::Settings,
        route: usize,
        request_id: &'a str,
        upstream_session: Option<&'a [u8]>,
    ) -> Outgoing<'a> {
        Outgoing {
            head,
            request_id,
            binding: &self.identity,
            server: &cfg.routes[route].name,
            session: upstream_session,
            timeout: cfg.routes[route].upstream.timeout,
            grace_over: &w.grace_over,
            path_rest: "",
        }
    }

    /// Ends the session now: its stream closes (the client reconnects and starts over), its
    /// forwards stop, and its upstream session is ended.
    fn end(&self) {
        self.events.close();
        self.closed.fire();
    }
}

/// Held by the client's stream; its drop ends the session.
struct StreamGuard(Rc<Session>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.closed.fire();
    }
}

/// What opening a legacy stream gives the pipeline to answer with.
pub struct Opened {
    /// The session's messages, for the client's stream.
    pub messages: async_channel::Receiver<Vec<u8>>,
    /// The `endpoint` event, written first.
    pub preamble: Vec<u8>,
    /// Ends the session when dropped (with the stream).
    pub guard: Box<dyn std::any::Any>,
    /// Bytes queued for the stream, for its writer to count down.
    pub backlog: Rc<Cell<usize>>,
    /// Messages being forwarded, whose answers the stream waits for at shutdown.
    pub in_flight: Rc<Cell<usize>>,
    /// Whether a response id is one of the session's requests' (see `Session::asked`).
    pub asked: crate::pipeline::Asked,
}

/// Opens a legacy session on this worker for `identity` at `route`.
pub fn open(w: &Worker, identity: &Arc<str>, route: &Arc<str>, head: &RequestHead) -> Opened {
    let serial = w.legacy.next.get() + 1;
    w.legacy.next.set(serial);
    let ticket = Ticket {
        // Worker indexes are bounded by the core count, far below u16::MAX.
        worker: w.id as u16,
        serial,
        nonce: crate::mcp::session::random_bytes::<8>(),
        route: route.to_string(),
    };
    let sid = w
        .settings()
        .sessions
        .encode_for(identity, &binding(route), &ticket.to_bytes());
    let (tx, rx) = async_channel::bounded(STREAM_BACKLOG);
    let mut upstream_head = head.clone();
    // Only what an upstream request may carry of the client's head stays: never its
    // credentials, and nothing that described the GET itself.
    let h = &mut upstream_head.h;
    h.remove(Kept::Authorization);
    h.remove(Kept::ApiKey);
    h.remove(Kept::SessionId);
    h.remove(Kept::Accept);
    h.remove(Kept::ContentType);
    h.remove(Kept::LastEventId);
    h.remove(Kept::McpMethod);
    h.remove(Kept::McpName);
    h.remove(Kept::ProtocolVersion);
    let session = Rc::new(Session {
        serial,
        nonce: ticket.nonce,
        identity: identity.clone(),
        route: route.clone(),
        events: tx,
        head: RefCell::new(Rc::new(upstream_head)),
        upstream: RefCell::new(None),
        initialized: Cell::new(false),
        in_flight: Rc::default(),
        closed: LocalShutdown::new(),
        backlog: Rc::default(),
        owed: RefCell::default(),
        answered: RefCell::default(),
        asked: RefCell::default(),
    });
    w.legacy.open.borrow_mut().insert(serial, session.clone());
    publish_count(w);
    monoio::spawn(watch(w.rc(), session.clone()));
    let mut preamble = Vec::with_capacity(64 + sid.len());
    let url = format!("{MESSAGES_PATH}?{SESSION_PARAM}={sid}");
    push_event(&mut preamble, Some("endpoint"), url.as_bytes());
    Opened {
        messages: rx,
        preamble,
        backlog: session.backlog.clone(),
        in_flight: session.in_flight.clone(),
        asked: {
            let session = Rc::downgrade(&session);
            Rc::new(move |id: &RpcId| session.upgrade().is_some_and(|s| s.asked(id)))
        },
        guard: Box::new(StreamGuard(session)),
    }
}

/// Hands a checked POST to the worker owning its session; `Ok` once that worker took it.
pub async fn hand_over(
    w: &Worker,
    ticket: &Ticket,
    identity: &crate::auth::Identity,
    client: std::net::IpAddr,
    work: Work,
    request_id: &str,
) -> Result<(), GatewayError> {
    let inbox = w
        .shared
        .legacy
        .sender(usize::from(ticket.worker))
        .ok_or(GatewayError::UnknownSession)?;
    let (ack, acked) = async_channel::bounded(1);
    let post = Handover {
        serial: ticket.serial,
        nonce: ticket.nonce,
        identity: identity.id.clone(),
        work,
        request_id: request_id.to_string(),
        auth_method: identity.method.as_str(),
        client,
        ack,
    };
    let taken = async {
        inbox.send(post).await.ok()?;
        acked.recv().await.ok()
    };
    match crate::runtime::deadlines::timeout(HAND_OVER, taken).await {
        Ok(Some(Ack::Accepted)) => Ok(()),
        Ok(Some(Ack::Unknown)) => Err(GatewayError::UnknownSession),
        Ok(Some(Ack::ShuttingDown)) => Err(GatewayError::ShuttingDown),
        Ok(Some(Ack::Busy)) | Ok(None) | Err(_) => Err(GatewayError::UpstreamBusy),
    }
}

/// A worker's inbox loop: takes POSTs for the sessions it owns and forwards each on a task of
/// its own (a long tool call must not hold up a `ping` or a cancellation behind it).
pub async fn run_inbox(w: Rc<Worker>, inbox: async_channel::Receiver<Handover>) {
    while let Ok(post) = inbox.recv().await {
        let session = w.legacy.open.borrow().get(&post.serial).cloned();
        let ack = match &session {
            Some(s) if s.nonce != post.nonce || s.identity != post.identity => Ack::Unknown,
            Some(s) if s.closed.is_fired() => Ack::Unknown,
            // Shutting down: what is in flight may finish, nothing new starts.
            Some(_) if w.shutdown.is_fired() => Ack::ShuttingDown,
            Some(s) if s.in_flight.get() >= IN_FLIGHT => Ack::Busy,
            Some(_) => Ack::Accepted,
            None => Ack::Unknown,
        };
        let _ = post.ack.try_send(ack);
        if let (Ack::Accepted, Some(s)) = (ack, session) {
            s.in_flight.set(s.in_flight.get() + 1);
            monoio::spawn(forward(w.clone(), s, post));
        }
    }
}

/// Waits for the session's stream to end, then forgets the session and ends it upstream.
async fn watch(w: Rc<Worker>, session: Rc<Session>) {
    session.closed.wait().await;
    w.legacy.open.borrow_mut().remove(&session.serial);
    publish_count(&w);
    let upstream_session = session.upstream.borrow_mut().take();
    let Some(upstream_session) = upstream_session else {
        return;
    };
    let cfg = w.settings();
    let Some((route, upstream)) = current_upstream(&cfg, &session.route) else {
        return;
    };
    let head = session.head.borrow().clone();
    let request_id = w.next_request_id();
    let mut out = session.outgoing(&w, &head, &cfg, route, &request_id, Some(&upstream_session));
    out.timeout = END_UPSTREAM;
    let _on_its_way = crate::upstream::http::NoticeOnItsWay::new(&w);
    let Ok(_turn) =
        crate::runtime::deadlines::timeout(END_UPSTREAM, w.notice_turn(&session.route)).await
    else {
        return;
    };
    if let Ok(Ok(exchange)) =
        crate::runtime::deadlines::timeout(END_UPSTREAM, upstream.end_session(&w, &out)).await
        && let Answer::Streamed(resp, _) = exchange.answer
    {
        let mut resp = resp;
        if resp
            .discard_body(crate::upstream::http::NOTIFICATION_ANSWER)
            .await
            .is_ok()
        {
            w.pool.release(*resp);
        }
    }
}

fn publish_count(w: &Worker) {
    w.metrics
        .legacy_sessions
        .store(w.legacy.len() as u64, std::sync::atomic::Ordering::Relaxed);
}

/// The route named `name` in the current snapshot, and its running upstream.
fn current_upstream<'c>(
    cfg: &'c crate::config::Settings,
    name: &str,
) -> Option<(usize, UpstreamRef<'c>)> {
    let route = cfg.routes.iter().position(|r| &*r.name == name)?;
    let upstream = cfg.upstreams.as_deref()?.at(route)?;
    Some((route, upstream))
}

/// Forwards one POSTed body upstream and writes the answer to the session's stream. Still
/// waiting when the shutdown grace runs out, it writes the 503 error in place of each request
/// left unanswered (and cancels those upstream).
async fn forward(w: Rc<Worker>, session: Rc<Session>, post: Handover) {
    let closed = session.closed.clone();
    let mut pending = Pending {
        owed: None,
        cancel: None,
        ids: Vec::new(),
        requests: Vec::new(),
        request_id: post.request_id.clone(),
        auth_method: post.auth_method,
        client: post.client,
        taken: std::time::Instant::now(),
    };
    let grace_over = monoio::select! {
        _ = closed.wait() => false,
        _ = forward_inner(&w, &session, post, &mut pending) => false,
        _ = w.grace_over.wait() => true,
    };
    if grace_over {
        pending
            .give_up(&w, &session, &GatewayError::ShuttingDown)
            .await;
    }
    session.settle(&pending.ids);
    session.in_flight.set(session.in_flight.get() - 1);
}

/// What a forwarded message's answer still owes, how to cancel it upstream, and what the audit
/// trail says of it if the upstream fails it.
struct Pending {
    /// The requests still unanswered (`None`: none were sent).
    owed: Option<Owed>,
    /// Their cancellation, once the upstream has the request (an HTTP upstream's).
    cancel: Option<Cancel>,
    /// Each request's id, in order (what the session was told this message owes).
    ids: Vec<RpcId>,
    /// Each request's method and target, in order (while auditing).
    requests: Vec<(String, Option<crate::mcp::jsonrpc::Target>)>,
    request_id: String,
    auth_method: &'static str,
    client: std::net::IpAddr,
    taken: std::time::Instant,
}

impl Pending {
    /// Each request still unanswered gets `e` on the stream in its place (the client, reading
    /// its answers there, would otherwise wait for it for ever), is cancelled upstream, as
    /// nobody will read what it still makes, and is audited as a call that failed upstream
    /// (the POST's own line, written when it was taken, says only that it was).
    async fn give_up(&mut self, w: &Worker, session: &Session, e: &GatewayError) {
        let Some(owed) = self.owed.take().filter(|o| !o.settled()) else {
            return;
        };
        // A request whose response another message's answer carried is answered: the client
        // read it on its stream (red team: it got that, then the gateway's error, and the
        // request was cancelled).
        let still_owed: Vec<bool> = owed
            .still_owed()
            .into_iter()
            .zip(&self.ids)
            .map(|(owed_here, id)| {
                owed_here && !session.answered_elsewhere(id, owed.answered_count(id))
            })
            .collect();
        let unanswered: Vec<RpcId> = self
            .ids
            .iter()
            .zip(&still_owed)
            .filter(|(_, owed)| **owed)
            .map(|(id, _)| id.clone())
            .collect();
        if let Some(cancel) = self.cancel.take() {
            let owed: std::collections::HashSet<&RpcId, foldhash::fast::RandomState> =
                unanswered.iter().collect();
            cancel.send(|id| owed.contains(id), e);
        }
        if w.audit.enabled() {
            let failure = crate::audit::LateFailure {
                request_id: &self.request_id,
                identity: &session.identity,
                auth_method: self.auth_method,
                client: self.client,
                upstream: &session.route,
                taken: self.taken,
            };
            for ((method, target), _) in self.requests.iter().zip(&still_owed).filter(|(_, o)| **o)
            {
                w.push_audit(failure.event(method, target.as_ref(), e));
            }
        }
        for id in &unanswered {
            if !session.send(e.body(Some(id))).await {
                return;
            }
        }
    }
}

async fn forward_inner(
    w: &Rc<Worker>,
    session: &Rc<Session>,
    post: Handover,
    pending: &mut Pending,
) {
    let (body, raw, handed) = match post.work {
        Work::Forward(body, raw, handed) => (body, raw, handed),
        Work::Answer(message) => {
            session.send(message).await;
            return;
        }
    };
    let is_initialize = matches!(&body, Body::Single(m) if m.kind == Kind::Request && m.method_str() == "initialize");
    if is_initialize && session.initialized.get() {
        let e = GatewayError::InvalidRequest("this session is already initialized".into(), None);
        return refuse_all(session, &body, &e).await;
    }
    if !is_initialize && !session.initialized.get() {
        let e = GatewayError::InvalidRequest(
            "the session must be initialized first (send initialize)".into(),
            None,
        );
        return refuse_all(session, &body, &e).await;
    }
    let cfg = w.settings();
    let Some((route, upstream)) = current_upstream(&cfg, &session.route) else {
        // The server was removed by a reload: this session has nowhere to go.
        let e = GatewayError::UpstreamUnavailable(format!(
            "server `{}` is no longer configured",
            session.route
        ));
        refuse_all(session, &body, &e).await;
        session.end();
        return;
    };
    let head = session.head.borrow().clone();
    let upstream_session = session.upstream.borrow().clone();
    let out = session.outgoing(
        w,
        &head,
        &cfg,
        route,
        &post.request_id,
        upstream_session.as_deref(),
    );
    let raw = crate::http::body::HeldBody::handed_over(raw, w, handed);
    let cancel = || match upstream {
        UpstreamRef::Http(server) => Cancel::of(w, server, &out, &body),
        // A stdio child's hub cancels what it gives up on itself.
        _ => None,
    };
    pending.owed = Owed::of_body(&body);
    pending.ids = body
        .messages()
        .iter()
        .filter(|m| m.kind == Kind::Request)
        .filter_map(|m| m.id.clone())
        .collect();
    session.owe(&pending.ids);
    if w.audit.enabled() {
        pending.requests = body
            .messages()
            .iter()
            .filter(|m| m.kind == Kind::Request && m.id.is_some())
            .map(|m| (m.method_str().to_string(), m.target.clone()))
            .collect();
    }
    // Until the upstream's answer begins, the whole request is cancelled if given up on.
    pending.cancel = cancel();
    let exchange = match upstream.post(w, &out, &body, raw).await {
        Ok(x) => x,
        Err(e) => {
            // Only a request whose time ran out is cancelled: one whose connection failed
            // never reached the upstream, or found it gone.
            if e != GatewayError::UpstreamTimeout {
                pending.cancel = None;
            }
            pending.give_up(w, session, &e).await;
            if e == GatewayError::UnknownSession {
                // The upstream session is gone (ended idle, its server replaced): so is ours,
                // and the client, seeing its stream close, connects and initializes again.
                session.end();
            }
            return;
        }
    };
    if is_initialize {
        if let Some(s) = exchange.session {
            *session.upstream.borrow_mut() = Some(s);
        }
    }
    // Only an answer that did not come whole with its head can stop short; of those, an SSE
    // stream may also end before its response. A JSON body that came whole was the upstream's
    // whole answer, with the response or without: nothing is left to cancel.
    let mut streams = false;
    match &exchange.answer {
        Answer::Streamed(resp, _) if !resp.body_complete() => {
            streams = (200..300).contains(&resp.status)
                && resp
                    .content_type
                    .as_deref()
                    .is_some_and(crate::http::is_event_stream);
        }
        _ => pending.cancel = None,
    }
    let was_initialized = session.initialized.get();
    let outcome = relay(
        w,
        session,
        exchange.answer,
        is_initialize,
        pending.owed.as_mut(),
    )
    .await;
    match outcome {
        Relayed::Messages { version, cut } => {
            if is_initialize && !was_initialized {
                if !session.initialized.get() {
                    session.note_initialized(version);
                }
                monoio::spawn(server_stream(w.clone(), session.clone()));
            }
            // Nothing on the client's stream says an answer has ended: what this one left
            // unanswered is answered with the gateway's error.
            if cut.is_none() && !streams {
                pending.cancel = None;
            }
            let e = cut.unwrap_or_else(|| {
                GatewayError::UpstreamUnavailable(
                    "the upstream's answer ended without a response to this request".into(),
                )
            });
            pending.give_up(w, session, &e).await;
        }
        Relayed::Refused(e, session_gone) => {
            // The upstream answered with an error of HTTP's: nothing is left to cancel.
            pending.cancel = None;
            pending.give_up(w, session, &e).await;
            if session_gone {
                // The upstream no longer knows the session: end ours, so the client starts over.
                session.end();
            }
        }
    }
}

/// How an answer went.
enum Relayed {
    /// Its messages were written to the stream (an initialize result's protocol version
    /// noted); `cut`: why it stopped before its end, if it did (its time ran out, the
    /// upstream broke it).
    Messages {
        version: Option<String>,
        cut: Option<GatewayError>,
    },
    /// No JSON-RPC answer came back: each request gets this error; `true` when the upstream
    /// said the session is unknown.
    Refused(GatewayError, bool),
}

/// Writes an upstream answer's messages to the session's stream. `owed`: the requests a
/// POST's answer answers, marked off as their responses go by; its stream ends with the last.
async fn relay(
    w: &Worker,
    session: &Session,
    answer: Answer,
    note_version: bool,
    mut owed: Option<&mut Owed>,
) -> Relayed {
    let mut version = None;
    let mut cut = None;
    let mut send = async |msg: Vec<u8>| {
        if note_version && version.is_none() {
            version = negotiated_version(&msg);
            if let Some(v) = &version
                && !session.initialized.get()
            {
                // The client posts its next message as soon as it reads this answer, which
                // may be before the upstream's response has ended: the session is initialized
                // before the answer is queued, or that message would be refused as early.
                session.note_initialized(Some(v.clone()));
            }
        }
        session.send(msg).await
    };
    match answer {
        Answer::Streamed(resp, _hold) => {
            let status = resp.status;
            let is_sse = resp
                .content_type
                .as_deref()
                .is_some_and(crate::http::is_event_stream);
            if is_sse && (200..300).contains(&status) {
                if let SseEnd::Failed(e) = relay_sse(w, *resp, &mut send, owed).await {
                    cut = Some(e);
                }
            } else {
                let mut resp = resp;
                let data = match resp.read_to_end().await {
                    Ok(data) => data,
                    Err(e) => {
                        let cut = Some(SseEnd::failure(&e));
                        return Relayed::Messages { version, cut };
                    }
                };
                w.pool.release(*resp);
                if is_jsonrpc(&data) {
                    if let Some(owed) = owed {
                        owed.read(&data);
                    }
                    send(data).await;
                } else if !(200..300).contains(&status) {
                    return Relayed::Refused(
                        GatewayError::UpstreamUnavailable(format!(
                            "upstream answered HTTP {status}"
                        )),
                        status == 404,
                    );
                }
            }
        }
        Answer::Complete { body, .. } => {
            if is_jsonrpc(&body) {
                if let Some(owed) = owed {
                    owed.read(&body);
                }
                send(body).await;
            }
        }
        Answer::Events(events, queued) => {
            while let Ok(msg) = events.recv().await {
                if let Some(q) = &queued {
                    q.taken(msg.len());
                }
                if let Some(owed) = owed.as_deref_mut() {
                    owed.read(&msg);
                }
                if !send(msg).await {
                    break;
                }
            }
        }
        Answer::Accepted | Answer::Ended => {}
    }
    Relayed::Messages { version, cut }
}

/// How relaying an upstream's SSE body ended.
pub(crate) enum SseEnd {
    /// The upstream ended it, or it carried the last response owed (what the upstream sends
    /// after that is not relayed: MCP has the server end a POST's stream with its response).
    Ended,
    /// The client's side is gone.
    ClientGone,
    /// It stopped short: the call's time ran out, or the upstream broke it.
    Failed(GatewayError),
}

impl SseEnd {
    /// The error a request left unanswered by an answer that failed with `e` gets.
    pub(crate) fn failure(e: &crate::http::client::UpstreamError) -> GatewayError {
        if e.is_timeout() {
            GatewayError::UpstreamTimeout
        } else {
            GatewayError::UpstreamUnavailable("upstream answer cut short".into())
        }
    }
}

/// Relays each `message` event of an upstream SSE body that holds JSON. `owed`: the requests
/// it answers; it ends with the last of their responses.
pub(crate) async fn relay_sse(
    w: &Worker,
    mut resp: UpstreamResponse,
    send: &mut impl AsyncFnMut(Vec<u8>) -> bool,
    mut owed: Option<&mut Owed>,
) -> SseEnd {
    let mut decoder = SseDecoder::default();
    loop {
        let (events, done) = match resp.next_data().await {
            Ok(Some(data)) => match decoder.push(&data) {
                Ok(events) => (events, false),
                Err(why) => {
                    return SseEnd::Failed(GatewayError::UpstreamUnavailable(format!(
                        "upstream answer unreadable: {why}"
                    )));
                }
            },
            Ok(None) => (decoder.finish(), true),
            Err(e) => return SseEnd::Failed(SseEnd::failure(&e)),
        };
        for e in events {
            // Only JSON-RPC reaches a stream of messages (a legacy client's, a held call's):
            // anything else is nothing its client could read.
            if !e.is_message() || !is_jsonrpc(e.data.as_bytes()) {
                continue;
            }
            let data = e.data.into_bytes();
            if let Some(owed) = owed.as_deref_mut() {
                owed.read(&data);
            }
            if !send(data).await {
                return SseEnd::ClientGone;
            }
            if owed.as_deref().is_some_and(Owed::settled) {
                // The connection is kept if the upstream ends the stream a moment later.
                crate::http::server::drain_after_answer(&mut resp).await;
                w.pool.release(resp);
                return SseEnd::Ended;
            }
        }
        if done {
            w.pool.release(resp);
            return SseEnd::Ended;
        }
    }
}

/// Whether a body is a JSON-RPC message or batch (what may be written to the stream).
pub(crate) fn is_jsonrpc(data: &[u8]) -> bool {
    let trimmed = data.trim_ascii_start();
    (trimmed.starts_with(b"{") || trimmed.starts_with(b"["))
        && serde_json::from_slice::<serde::de::IgnoredAny>(data).is_ok()
}

/// The protocol version an initialize result names.
fn negotiated_version(msg: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Init {
        result: Option<InitResult>,
    }
    #[derive(serde::Deserialize)]
    struct InitResult {
        #[serde(rename = "protocolVersion")]
        protocol_version: Option<String>,
    }
    let v: Init = serde_json::from_slice(msg).ok()?;
    let version = v.result?.protocol_version?;
    crate::mcp::transport::SUPPORTED_VERSIONS
        .iter()
        .any(|s| *s == version)
        .then_some(version)
}

/// Writes `e` as the answer to every request in `body` (notifications and responses get
/// none).
async fn refuse_all(session: &Session, body: &Body, e: &GatewayError) {
    for m in body.messages() {
        if m.kind != Kind::Request {
            continue;
        }
        let id: Option<&RpcId> = m.id.as_ref();
        if !session.send(e.body(id)).await {
            return;
        }
    }
}

/// Relays the upstream's server-to-client stream (notifications and requests not tied to a
/// POST) to the session's stream until the session ends; reopened when the upstream closes it.
async fn server_stream(w: Rc<Worker>, session: Rc<Session>) {
    let closed = session.closed.clone();
    monoio::select! {
        _ = closed.wait() => {}
        _ = server_stream_inner(&w, &session) => {}
    }
}

async fn server_stream_inner(w: &Rc<Worker>, session: &Rc<Session>) {
    loop {
        let cfg = w.settings();
        let Some((route, upstream)) = current_upstream(&cfg, &session.route) else {
            return;
        };
        let head = session.head.borrow().clone();
        let upstream_session = session.upstream.borrow().clone();
        let request_id = w.next_request_id();
        let out = session.outgoing(
            w,
            &head,
            &cfg,
            route,
            &request_id,
            upstream_session.as_deref(),
        );
        let Ok(exchange) = upstream.open_stream(w, &out).await else {
            return;
        };
        if let Answer::Streamed(resp, _) = &exchange.answer
            && !(200..300).contains(&resp.status)
        {
            // 405: this server offers no such stream; anything else: not now, nor later.
            return;
        }
        drop(cfg);
        if let Relayed::Refused(..) = relay(w, session, exchange.answer, false, None).await {
            return;
        }
        if session.events.is_closed() {
            return;
        }
        crate::runtime::deadlines::sleep(REOPEN_STREAM).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_round_trip_and_reject_other_payloads() {
        let t = Ticket {
            worker: 3,
            serial: 42,
            nonce: [7; 8],
            route: "github".into(),
        };
        assert_eq!(Ticket::parse(&t.to_bytes()), Some(t.clone()));
        assert_eq!(Ticket::parse(b"upstream-session-id"), None);
        assert_eq!(Ticket::parse(&t.to_bytes()[..TICKET_FIXED]), None);
        let sid = format!("{}.mac", B64.encode(t.to_bytes()));
        assert_eq!(route_of(&sid).as_deref(), Some("github"));
        assert_eq!(route_of("nonsense"), None);
    }

    #[test]
    fn the_session_parameter_must_appear_once() {
        assert_eq!(session_param("/messages?sessionId=abc"), Some("abc"));
        assert_eq!(session_param("/messages?x=1&sessionId=abc"), Some("abc"));
        assert_eq!(session_param("/messages?sessionId=a&sessionId=b"), None);
        assert_eq!(session_param("/messages?sessionIdx=a"), None);
        assert_eq!(session_param("/messages?sessionId=a&sessionId"), None);
        assert_eq!(session_param("/messages?sessionId=a;sessionId=b"), None);
        assert_eq!(session_param("/messages?sessionId=a&%73essionId=b"), None);
        assert_eq!(session_param("/messages?sessionId="), Some(""));
        assert_eq!(session_param("/messages?x=%zz&sessionId=a"), Some("a"));
        assert_eq!(session_param("/messages"), None);
    }

    #[test]
    fn stream_paths_name_the_default_or_one_server() {
        assert_eq!(stream_route("/sse", "/sse"), Some("default"));
        assert_eq!(stream_route("/sse/github", "/sse"), Some("github"));
        assert_eq!(stream_route("/sse/a/b", "/sse"), None);
        assert_eq!(stream_route("/ssex", "/sse"), None);
        assert_eq!(stream_route("/sse/", "/sse"), None);
    }

    #[test]
    fn bindings_never_meet_a_route_name() {
        assert_ne!(binding("default"), "default");
        assert!(binding("x").contains(':'));
    }
}
