//! Human approval through MCP elicitation (`[approval]`): the table of calls held for a
//! person's answer, the elicitation request the client is sent, reading its answer, handing
//! that answer to the worker holding the call, and the audit and metrics of each outcome.
//!
//! # How a held call goes
//!
//! A `tools/call` of a tool `approval.tools` names passes authorization (phase 7) and the rate
//! limit (phase 8) like any call; then, before phase 9, the pipeline asks [`hold`] for an entry
//! in this worker's table and answers the POST with an SSE stream whose first event is the
//! gateway's own `elicitation/create` request (form mode: a message naming the tool and its
//! arguments, escaped and bounded, and a `requestedSchema` with one boolean, `approve`). The
//! call waits on a task of its own for one of: the client's answer, `approval.timeout_secs`,
//! or its stream closing. Only `action: "accept"` with `content.approve = true` sends it
//! upstream; the upstream's answer is then the stream's last event(s) (a JSON answer as one
//! event, an SSE answer event by event, through the same `deliver` as any answer). Anything
//! else (`decline`, `cancel`, an accept without `approve = true`, an error response, an answer
//! that cannot be read, the timeout) is refused with a JSON-RPC error on the stream (code
//! `-32003`, `data.reason` = `approval_declined`, `approval_cancelled`, `approval_error`,
//! `approval_timeout`), and the upstream never sees the call. A stream the client closes
//! refuses the call too (`disconnected`; no one is left to tell).
//!
//! # Who can approve: the capability is carried in the session id
//!
//! The gateway sees the client's `initialize`. When `[approval]` is on and the initialize
//! declares `params.capabilities.elicitation` with form mode (`{}`, or an object naming
//! `form`; one naming only `url` cannot show a form) and asks for 2025-06-18 or later, the
//! session id handed back is minted as `e.<payload>.<mac>`, its MAC bound to the identity and
//! to [`session_binding`] of the route instead of the bare route. So the flag travels in what
//! the gateway already wraps: no shared table, no lock, every worker and every replica with
//! the same keys reads it, and a client cannot add the `e.` itself (the MAC would not verify
//! under the other binding). Ids without the prefix verify exactly as before (old ids stay
//! valid; their clients simply cannot approve until they initialize again). A call needing
//! approval from a session without the flag, with a `MCP-Protocol-Version` before 2025-06-18,
//! in a batch, over the legacy HTTP+SSE transport (2024-11-05 has no elicitation), or over
//! HTTP/1.0 (which cannot carry the held call's chunked SSE stream: it gets plain JSON saying
//! so) is refused at once with reason `approval_unsupported`. Calls that need no approval never look
//! at any of this: the cost on their path is one glob match against `approval.tools`.
//!
//! # Where the answer goes: any worker, handed to the owner
//!
//! The client POSTs its JSON-RPC response to whatever connection it likes, so it lands on any
//! worker. The elicitation request id names the worker holding the call and 128 random bits:
//! `mcp-guard-approval.<worker>.<32 hex>`. The worker that receives the answer checks what
//! any request gets checked (credentials, session MAC, rate limit), then hands
//! `(token, identity, session id, outcome)` to the owner's inbox, the same mechanism as the
//! legacy transport's POSTs (`legacy::Inboxes`: one bounded channel per worker, an ack back).
//! The owner accepts it only when the token is pending **and** was issued to that identity on
//! that session id; it is then removed (single use) and its outcome wakes the call. An answer
//! for an unknown, expired, already used, guessed, other-session or other-identity id is
//! refused (HTTP 400, JSON-RPC `-32600`) and changes nothing: the real pending call still
//! waits for its own answer. Any response whose id starts with [`ID_PREFIX`] is the
//! gateway's and is never forwarded upstream (the upstream never issued it); responses to the
//! upstream's own server-to-client requests still go upstream as before.
//!
//! # Withdrawn by the client
//!
//! A `notifications/cancelled` naming a held call's request id, from the identity and session
//! that made the call, ends its wait at once: it is refused as `approval_cancelled` (audited,
//! never forwarded), and the notification itself is answered 202 and not forwarded either (the
//! upstream never saw the call it names). The notification may land on any worker: it is
//! handed to every worker's inbox, and the one holding a matching call takes it. A cancel from
//! another session or identity matches nothing and goes upstream as any notification.
//!
//! # Bounds
//!
//! At most [`PER_WORKER`] calls wait on one worker and [`PER_IDENTITY`] of one identity on each
//! worker (the table is the worker's own: no lock); [`PER_SESSION`] of one session across all
//! workers (one process-wide count behind a mutex, touched only when a call is held or
//! released: a session's calls spread over the workers cannot multiply its bound). Beyond that
//! a call is refused (`approval_full`). Every entry leaves the table, and its places are given
//! back, when its call ends (answered, cancelled, timed out, or its stream closed).
//!
//! # Audit and metrics
//!
//! Each outcome is an audit event (`method` = `approval`, the tool, `decision` allow or deny,
//! `reason` = `approval_<outcome>`, the identity that answered, a digest of the session id)
//! and a count in `mcp_guard_approvals_total{outcome=…}`.

use crate::authz::Matcher;
use crate::error::{GatewayError, code};
use crate::http::response::jsonrpc_error;
use crate::mcp::jsonrpc::RpcId;
use crate::mcp::session::{SessionCodec, random_bytes};
use crate::runtime::shutdown::LocalShutdown;
use crate::runtime::worker::Worker;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// `[approval]`, validated.
#[derive(Debug)]
pub struct ApprovalSettings {
    /// The tools whose calls wait for a person.
    pub tools: Matcher,
    /// How long a held call waits for the answer.
    pub timeout: Duration,
}

/// Every elicitation request id the gateway issues starts with this.
pub const ID_PREFIX: &str = "mcp-guard-approval.";
/// A session id whose client declared elicitation at initialize starts with this.
pub const ELICIT_SID_PREFIX: &str = "e.";
/// Calls waiting for approval on one worker.
pub const PER_WORKER: usize = 1024;
/// Calls waiting for approval in one session, across all workers.
pub const PER_SESSION: usize = 16;
/// Calls one identity may hold on one worker, across all its sessions: sessions are free to
/// open, so without it one key could fill [`PER_WORKER`] and refuse everyone else's approvals.
pub const PER_IDENTITY: usize = 64;
/// Answers waiting for their owning worker to take them.
pub const INBOX: usize = 1024;
/// How long an answer waits for the owning worker to take it.
const HAND_OVER: Duration = Duration::from_secs(5);
/// Characters of a tool's arguments shown to the person; the rest is counted, not shown.
const SHOWN_ARGUMENTS: usize = 1024;
/// Characters of a tool name shown.
const SHOWN_TOOL: usize = 128;
/// The first revision with elicitation (revisions are dates: they compare as strings).
const FIRST_ELICITING: &str = "2025-06-18";

/// How an approval ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The person accepted: the call went upstream.
    Accepted,
    /// The person declined (or accepted without `approve = true`).
    Declined,
    /// The person dismissed the request.
    Cancelled,
    /// The client answered with an error, or with something that is not an elicitation result.
    Error,
    /// No answer within `approval.timeout_secs`.
    Timeout,
    /// The client closed the call's stream before answering.
    Disconnected,
    /// The client cannot be asked (no elicitation capability, old revision, legacy transport).
    Unsupported,
    /// Too many calls wait already.
    Full,
}

/// Metric labels, in [`Outcome`] order.
pub const OUTCOMES: &[&str] = &[
    "accepted",
    "declined",
    "cancelled",
    "error",
    "timeout",
    "disconnected",
    "unsupported",
    "full",
];

impl Outcome {
    /// Its metric label.
    pub fn label(self) -> &'static str {
        OUTCOMES[self as usize]
    }

    /// Its audit reason (and the refusal's `data.reason`).
    pub fn reason(self) -> &'static str {
        match self {
            Outcome::Accepted => "approval_accepted",
            Outcome::Declined => "approval_declined",
            Outcome::Cancelled => "approval_cancelled",
            Outcome::Error => "approval_error",
            Outcome::Timeout => "approval_timeout",
            Outcome::Disconnected => "approval_disconnected",
            Outcome::Unsupported => "approval_unsupported",
            Outcome::Full => "approval_full",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Outcome::Accepted => "Approved",
            Outcome::Declined => "Not approved: the person asked declined this call",
            Outcome::Cancelled => "Not approved: the approval request was cancelled",
            Outcome::Error => {
                "Not approved: the client answered the approval request with an error or an unreadable result"
            }
            Outcome::Timeout => "Not approved: no answer to the approval request in time",
            Outcome::Disconnected => "Not approved: the client closed the stream",
            Outcome::Unsupported => {
                "This tool needs a person's approval, which this client cannot give: it must declare the elicitation capability at initialize and speak MCP 2025-06-18 or later over Streamable HTTP"
            }
            Outcome::Full => "Too many calls are waiting for approval; try again later",
        }
    }
}

/// The JSON-RPC error refusing call `id` for `outcome`.
pub fn refusal(id: &RpcId, outcome: Outcome) -> Vec<u8> {
    refusal_saying(id, outcome, outcome.message())
}

/// [`refusal`] with a message of its own.
pub fn refusal_saying(id: &RpcId, outcome: Outcome, message: &str) -> Vec<u8> {
    jsonrpc_error(
        Some(&id.to_json()),
        code::FORBIDDEN,
        message,
        Some(&format!("{{\"reason\":\"{}\"}}", outcome.reason())),
    )
}

/// Why an HTTP/1.0 client cannot be asked: the held call's answer is an open-ended SSE stream,
/// which needs HTTP/1.1 chunked framing.
pub const HTTP10_MESSAGE: &str = "This tool needs a person's approval, asked on a Server-Sent Events stream that needs HTTP/1.1; this request came over HTTP/1.0";

/// The second MAC part of a session id whose client can elicit: no route name holds `:`, and
/// the legacy transport's bindings start `sse:`, so it meets neither.
pub fn session_binding(route: &str) -> String {
    format!("elicit:{route}")
}

/// Whether a client speaking `version` can be sent an elicitation request.
pub fn version_can_elicit(version: &str) -> bool {
    version >= FIRST_ELICITING
}

/// Whether an initialize request declares form-mode elicitation and asks for a revision that
/// has it.
pub fn declares_elicitation(raw: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(raw) else {
        return false;
    };
    let asks_new_enough = v
        .pointer("/params/protocolVersion")
        .and_then(|p| p.as_str())
        .is_some_and(version_can_elicit);
    let Some(cap) = v
        .pointer("/params/capabilities/elicitation")
        .and_then(|c| c.as_object())
    else {
        return false;
    };
    // 2025-11-25: `{}` means form mode (as in 2025-06-18); naming only `url` means no forms.
    let forms = cap.contains_key("form") || !cap.contains_key("url");
    asks_new_enough && forms
}

/// The session id `sid` (minted by `deliver` for `identity` at `route`) re-minted with the
/// elicitation flag; `None` if it does not verify.
pub fn flag_session(
    codec: &SessionCodec,
    identity: &str,
    route: &str,
    sid: &str,
) -> Option<String> {
    let payload = codec.decode_for(identity, route, sid)?;
    let mut flagged = String::from(ELICIT_SID_PREFIX);
    flagged.push_str(&codec.encode_for(identity, &session_binding(route), &payload));
    Some(flagged)
}

/// Calls held per session id, across the workers of the process.
#[derive(Default)]
pub struct SessionCounts(Mutex<HashMap<Box<str>, usize>>);

impl SessionCounts {
    /// Takes one of `sid`'s [`PER_SESSION`] places; `false` when none is left.
    fn take(&self, sid: &str) -> bool {
        // A poisoned lock only means another thread panicked mid-update of plain counts.
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(sid.into()).or_insert(0);
        if *n >= PER_SESSION {
            return false;
        }
        *n += 1;
        true
    }

    fn give_back(&self, sid: &str) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(sid) {
            *n -= 1;
            if *n == 0 {
                map.remove(sid);
            }
        }
    }
}

/// One worker's held calls.
#[derive(Default)]
pub struct Pending {
    entries: RefCell<HashMap<[u8; 16], Entry>>,
    per_identity: RefCell<HashMap<Arc<str>, usize>>,
}

struct Entry {
    identity: Arc<str>,
    session: Rc<str>,
    /// The held call's own JSON-RPC id, which a `notifications/cancelled` names.
    call: RpcId,
    answer: async_channel::Sender<Outcome>,
}

impl Pending {
    /// Calls waiting on this worker.
    pub fn len(&self) -> usize {
        self.entries.borrow().len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A call's place in its worker's table.
pub struct Held {
    token: [u8; 16],
    identity: Arc<str>,
    session: Rc<str>,
    /// The elicitation request's id.
    pub id: String,
    /// Where its answer arrives.
    pub answer: async_channel::Receiver<Outcome>,
}

/// Enters call `call` of `identity` in session `sid` into this worker's table.
pub fn hold(w: &Worker, identity: &Arc<str>, sid: &str, call: &RpcId) -> Result<Held, Outcome> {
    let p = &w.approvals;
    let session: Rc<str> = Rc::from(sid);
    if p.len() >= PER_WORKER
        || p.per_identity.borrow().get(identity).copied().unwrap_or(0) >= PER_IDENTITY
        || !w.shared.approval_sessions.take(sid)
    {
        return Err(Outcome::Full);
    }
    let token = random_bytes::<16>();
    let (tx, rx) = async_channel::bounded(1);
    p.entries.borrow_mut().insert(
        token,
        Entry {
            identity: identity.clone(),
            session: session.clone(),
            call: call.clone(),
            answer: tx,
        },
    );
    *p.per_identity
        .borrow_mut()
        .entry(identity.clone())
        .or_insert(0) += 1;
    let mut id = String::with_capacity(ID_PREFIX.len() + 40);
    id.push_str(ID_PREFIX);
    id.push_str(&w.id.to_string());
    id.push('.');
    for b in token {
        id.push_str(&format!("{b:02x}"));
    }
    Ok(Held {
        token,
        identity: identity.clone(),
        session,
        id,
        answer: rx,
    })
}

/// Takes a call out of the table once it is over (answered, cancelled, timed out, its stream
/// closed), and gives back its places. Called once per [`Held`]; the entry itself may already
/// be gone (an answer or a cancel removes it as it wakes the call).
pub fn release(w: &Worker, held: &Held) {
    let p = &w.approvals;
    p.entries.borrow_mut().remove(&held.token);
    let mut mine = p.per_identity.borrow_mut();
    if let Some(n) = mine.get_mut(&held.identity) {
        *n -= 1;
        if *n == 0 {
            mine.remove(&held.identity);
        }
    }
    w.shared.approval_sessions.give_back(&held.session);
}

/// Fires when the held call's stream ends (dropped with it by the connection).
pub struct StreamGuard(pub Rc<LocalShutdown>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fire();
    }
}

/// Most top-level arguments a call held for approval may have: each is shown, none is left
/// out of what the person reads.
pub const SHOWN_MEMBERS: usize = 64;

/// What the person is shown of a held call's `arguments` (the raw JSON, if any): every
/// top-level member on its own line, in canonical order, each value cut on its own — a long
/// value cannot push another argument out of view. `Err` when the arguments cannot be shown
/// faithfully: a member twice at any depth (the upstream might act on the copy not shown), or
/// more than [`SHOWN_MEMBERS`] of them.
pub fn shown_arguments(arguments: Option<&str>) -> Result<String, &'static str> {
    use crate::pinning::canon::Json;
    let Some(raw) = arguments else {
        return Ok("(none)".into());
    };
    let value = serde_json::from_str::<Json>(raw)
        .map_err(|_| "its arguments repeat a member, so what would be shown is not what runs")?;
    let mut out = String::new();
    match &value {
        Json::Obj(members) if members.len() > SHOWN_MEMBERS => {
            return Err("it has too many arguments to show for approval");
        }
        Json::Obj(members) if members.is_empty() => out.push_str("(none)"),
        Json::Obj(members) => {
            let per_value = (SHOWN_ARGUMENTS / members.len()).max(64);
            for (k, v) in members {
                let mut text = String::new();
                v.write_canonical(&mut text);
                out.push_str("\n  ");
                out.push_str(&shown(k, SHOWN_TOOL));
                out.push_str(" = ");
                out.push_str(&shown(&text, per_value));
            }
        }
        other => {
            let mut text = String::new();
            other.write_canonical(&mut text);
            out.push_str(&shown(&text, SHOWN_ARGUMENTS));
        }
    }
    Ok(out)
}

/// The gateway's `elicitation/create` request asking about a call of `tool` whose arguments
/// are shown as `arguments` (from [`shown_arguments`]).
pub fn request(id: &str, tool: &str, arguments: &str) -> Vec<u8> {
    let mut message = format!(
        "Approve this tool call?\nTool: {}\nArguments: ",
        shown(tool, SHOWN_TOOL)
    );
    message.push_str(arguments);
    serde_json::json!({
        "jsonrpc": "2.0",
        "id": id,
        "method": "elicitation/create",
        "params": {
            "message": message,
            "requestedSchema": {
                "type": "object",
                "properties": {
                    "approve": {
                        "type": "boolean",
                        "title": "Approve",
                        "description": "Run this call now (anything else refuses it)",
                    }
                },
                "required": ["approve"],
            },
        },
    })
    .to_string()
    .into_bytes()
}

/// `s` as a person may safely read it: characters that would hide or reorder text
/// (controls, bidirectional overrides, zero-width and other format characters) written as
/// `\u{…}`, and at most `max` characters, the rest counted.
pub fn shown(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max * 2));
    for (count, c) in s.chars().enumerate() {
        if count == max {
            let rest = s.chars().count() - max;
            out.push_str(&format!("… ({rest} more characters)"));
            break;
        }
        if hides_text(c) {
            out.push_str(&format!("\\u{{{:04x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

fn hides_text(c: char) -> bool {
    // Line and paragraph separators and every space but the plain one may fake a line break
    // or push text out of view; the braille blank looks like nothing at all.
    c.is_control()
        || crate::pinning::canon::is_invisible(c)
        || (c.is_whitespace() && c != ' ')
        || c == '\u{2800}'
        || matches!(c,
            '\u{00ad}' | '\u{034f}' | '\u{061c}' | '\u{115f}' | '\u{1160}' | '\u{17b4}' | '\u{17b5}'
            | '\u{180b}'..='\u{180f}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}'
            | '\u{2060}'..='\u{206f}' | '\u{3164}' | '\u{fe00}'..='\u{fe0f}' | '\u{feff}'
            | '\u{ffa0}' | '\u{fff0}'..='\u{fffb}' | '\u{e0000}'..='\u{e0fff}')
}

/// Whether a response id names one of the gateway's own elicitation requests.
pub fn is_ours(id: &RpcId) -> bool {
    matches!(id, RpcId::Str(s) if s.starts_with(ID_PREFIX))
}

/// The worker and token an id names, if it has the gateway's form.
fn parse_id(id: &str) -> Option<(usize, [u8; 16])> {
    let rest = id.strip_prefix(ID_PREFIX)?;
    let (worker, hex) = rest.split_once('.')?;
    if worker.is_empty() || worker.len() > 5 || !worker.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if hex.len() != 32 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut token = [0u8; 16];
    for (i, t) in token.iter_mut().enumerate() {
        *t = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some((worker.parse().ok()?, token))
}

/// What a client's response to an elicitation request says.
pub fn read_answer(raw: &[u8]) -> Outcome {
    // A member twice anywhere (`"action":"decline","action":"accept"`): a client or UI that
    // keeps the first copy recorded another answer than the one read here. Unreadable.
    if serde_json::from_slice::<crate::pinning::canon::Json>(raw).is_err() {
        return Outcome::Error;
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(raw) else {
        return Outcome::Error;
    };
    if v.get("error").is_some() {
        return Outcome::Error;
    }
    let Some(result) = v.get("result").and_then(|r| r.as_object()) else {
        return Outcome::Error;
    };
    match result.get("action").and_then(|a| a.as_str()) {
        Some("accept")
            if result.get("content").and_then(|c| c.get("approve"))
                == Some(&serde_json::Value::Bool(true)) =>
        {
            Outcome::Accepted
        }
        Some("accept" | "decline") => Outcome::Declined,
        Some("cancel") => Outcome::Cancelled,
        _ => Outcome::Error,
    }
}

/// An answer on its way to the worker holding its call, or a cancel to every worker.
pub struct AnswerPost {
    delivery: Delivery,
    identity: Arc<str>,
    session: String,
    ack: async_channel::Sender<bool>,
}

enum Delivery {
    /// The answer to the elicitation request `token` names.
    Answer { token: [u8; 16], outcome: Outcome },
    /// `notifications/cancelled` naming the held call with this id.
    Cancel(RpcId),
}

/// The request id a `notifications/cancelled` body names, if it is one the gateway could hold.
pub fn cancelled_request(raw: &[u8]) -> Option<RpcId> {
    let v: serde_json::Value = serde_json::from_slice(raw).ok()?;
    match v.pointer("/params/requestId")? {
        serde_json::Value::String(s) => Some(RpcId::Str(s.clone())),
        serde_json::Value::Number(n) => n.as_i64().map(RpcId::Num),
        _ => None,
    }
}

/// Hands a client's `notifications/cancelled` for call `call` (from `identity` in session
/// `sid`) to every worker; `true` when one held that call and refused it as cancelled.
pub async fn cancel(w: &Worker, identity: &Arc<str>, sid: &str, call: &RpcId) -> bool {
    let mut acks = Vec::new();
    for worker in 0..w.shared.workers {
        let Some(inbox) = w.shared.approvals.sender(worker) else {
            continue;
        };
        let (ack, acked) = async_channel::bounded(1);
        let post = AnswerPost {
            delivery: Delivery::Cancel(call.clone()),
            identity: identity.clone(),
            session: sid.to_string(),
            ack,
        };
        if inbox.try_send(post).is_ok() {
            acks.push(acked);
        }
    }
    let mut taken = false;
    for acked in acks {
        if let Ok(Ok(true)) = crate::runtime::deadlines::timeout(HAND_OVER, acked.recv()).await {
            taken = true;
        }
    }
    taken
}

/// Hands the client's answer (`raw`, a response with id `id`, from `identity` in session
/// `sid`) to the worker holding the call; `Ok` once that worker took it as the call's answer.
pub async fn answer(
    w: &Worker,
    id: &str,
    identity: &Arc<str>,
    sid: &str,
    raw: &[u8],
) -> Result<(), GatewayError> {
    let unknown = || {
        GatewayError::InvalidRequest(
            "no approval request with this id is waiting for this session (unknown, expired, or already answered)"
                .into(),
            None,
        )
    };
    let (worker, token) = parse_id(id).ok_or_else(unknown)?;
    let inbox = w.shared.approvals.sender(worker).ok_or_else(unknown)?;
    let (ack, acked) = async_channel::bounded(1);
    let post = AnswerPost {
        delivery: Delivery::Answer {
            token,
            outcome: read_answer(raw),
        },
        identity: identity.clone(),
        session: sid.to_string(),
        ack,
    };
    let taken = async {
        inbox.send(post).await.ok()?;
        acked.recv().await.ok()
    };
    match crate::runtime::deadlines::timeout(HAND_OVER, taken).await {
        Ok(Some(true)) => Ok(()),
        Ok(Some(false)) => Err(unknown()),
        Ok(None) | Err(_) => Err(GatewayError::UpstreamBusy),
    }
}

/// A worker's answer inbox: each answer wakes its call when the token is pending for that
/// identity and session, and is refused otherwise (the call keeps waiting).
pub async fn run_inbox(w: Rc<Worker>, inbox: async_channel::Receiver<AnswerPost>) {
    while let Ok(post) = inbox.recv().await {
        let mut entries = w.approvals.entries.borrow_mut();
        let mine = |e: &Entry| e.identity == post.identity && *e.session == *post.session;
        let (token, outcome) = match &post.delivery {
            Delivery::Answer { token, outcome } => (Some(*token), *outcome),
            Delivery::Cancel(call) => (
                entries
                    .iter()
                    .find(|(_, e)| mine(e) && e.call == *call)
                    .map(|(t, _)| *t),
                Outcome::Cancelled,
            ),
        };
        // Single use: the entry leaves with its first valid answer (or cancel).
        let taken = token.is_some_and(|t| {
            entries.get(&t).is_some_and(mine)
                && entries
                    .remove(&t)
                    .is_some_and(|e| e.answer.try_send(outcome).is_ok())
        });
        drop(entries);
        let _ = post.ack.try_send(taken);
    }
}

/// What the audit event of an approval says.
pub struct Record<'a> {
    /// The held request's id.
    pub request_id: &'a str,
    /// Who called (and, for an answer, who answered: only they can).
    pub identity: &'a crate::auth::Identity,
    /// The caller's address.
    pub client: std::net::IpAddr,
    /// The client's session id, if any (only its digest is written).
    pub session: Option<&'a str>,
    /// The tool.
    pub tool: &'a str,
    /// The route.
    pub upstream: &'a Arc<str>,
    /// How long the call waited.
    pub waited: Duration,
}

/// Audits and counts an approval's outcome.
pub fn record(w: &Worker, r: &Record<'_>, outcome: Outcome) {
    w.metrics.count_approval(outcome as usize);
    if !w.audit.enabled() {
        return;
    }
    let ev = crate::audit::AuditEvent {
        time: std::time::SystemTime::now(),
        request_id: r.request_id.to_string(),
        client_request_id: None,
        trace_id: None,
        identity: Some(r.identity.id.clone()),
        auth_method: r.identity.method.as_str(),
        client: r.client,
        method: "approval".into(),
        target: Some(("tool", shown(r.tool, SHOWN_TOOL))),
        decision: if outcome == Outcome::Accepted {
            "allow"
        } else {
            "deny"
        },
        reason: Some(outcome.reason()),
        status: 200,
        upstream: r.upstream.clone(),
        latency_us: r.waited.as_micros() as u64,
        arguments: None,
        session: r.session.map(session_digest),
        details: Vec::new(),
    };
    if !w.audit.push(ev) {
        w.metrics
            .audit_dropped
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A session id as the audit trail names it: the first 16 hex digits of its SHA-256 (the id
/// itself is not written: with the caller's credentials it continues the session).
pub fn session_digest(sid: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, sid.as_bytes());
    d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_only_in_their_exact_form() {
        let id = format!("{ID_PREFIX}3.{}", "ab".repeat(16));
        assert_eq!(parse_id(&id), Some((3, [0xab; 16])));
        for bad in [
            format!("{ID_PREFIX}3.{}", "AB".repeat(16)),
            format!("{ID_PREFIX}3.{}", "ab".repeat(15)),
            format!("{ID_PREFIX}.{}", "ab".repeat(16)),
            format!("{ID_PREFIX}-1.{}", "ab".repeat(16)),
            format!("{ID_PREFIX}999999.{}", "ab".repeat(16)),
            format!("{ID_PREFIX}3.{}x", "ab".repeat(16)),
            format!("{ID_PREFIX}3.{}é", "a".repeat(31)),
            "mcp-guard-approval".into(),
        ] {
            assert_eq!(parse_id(&bad), None, "{bad}");
        }
    }

    #[test]
    fn only_an_explicit_accept_with_approve_true_approves() {
        let a = |r: &str| read_answer(r.as_bytes());
        let res = |x: &str| format!("{{\"jsonrpc\":\"2.0\",\"id\":\"x\",\"result\":{x}}}");
        assert_eq!(
            a(&res(r#"{"action":"accept","content":{"approve":true}}"#)),
            Outcome::Accepted
        );
        assert_eq!(
            a(&res(r#"{"action":"accept","content":{"approve":false}}"#)),
            Outcome::Declined
        );
        assert_eq!(
            a(&res(r#"{"action":"accept","content":{"approve":"true"}}"#)),
            Outcome::Declined
        );
        assert_eq!(a(&res(r#"{"action":"accept"}"#)), Outcome::Declined);
        assert_eq!(a(&res(r#"{"action":"decline"}"#)), Outcome::Declined);
        assert_eq!(a(&res(r#"{"action":"cancel"}"#)), Outcome::Cancelled);
        assert_eq!(
            a(&res(r#"{"action":"ACCEPT","content":{"approve":true}}"#)),
            Outcome::Error
        );
        assert_eq!(a(&res(r#""accept""#)), Outcome::Error);
        assert_eq!(
            a(r#"{"jsonrpc":"2.0","id":"x","error":{"code":-1,"message":"no"}}"#),
            Outcome::Error
        );
        assert_eq!(
            a(
                r#"{"jsonrpc":"2.0","id":"x","result":{"action":"accept","content":{"approve":true}},"error":{}}"#
            ),
            Outcome::Error
        );
        assert_eq!(a("not json"), Outcome::Error);
    }

    #[test]
    fn elicitation_is_declared_in_form_mode_at_a_new_enough_revision() {
        let init = |v: &str, caps: &str| {
            format!(
                r#"{{"jsonrpc":"2.0","id":1,"method":"initialize","params":{{"protocolVersion":"{v}","capabilities":{caps},"clientInfo":{{"name":"c","version":"1"}}}}}}"#
            )
        };
        let d = |s: String| declares_elicitation(s.as_bytes());
        assert!(d(init("2025-06-18", r#"{"elicitation":{}}"#)));
        assert!(d(init("2025-11-25", r#"{"elicitation":{"form":{}}}"#)));
        assert!(d(init(
            "2025-11-25",
            r#"{"elicitation":{"form":{},"url":{}}}"#
        )));
        assert!(!d(init("2025-11-25", r#"{"elicitation":{"url":{}}}"#)));
        assert!(!d(init("2025-03-26", r#"{"elicitation":{}}"#)));
        assert!(!d(init("2025-06-18", r#"{}"#)));
        assert!(!d(init("2025-06-18", r#"{"elicitation":true}"#)));
    }

    #[test]
    fn what_the_person_reads_is_bounded_and_shows_hidden_characters() {
        assert_eq!(shown("rm\u{202e}txt.exe", 64), "rm\\u{202e}txt.exe");
        assert_eq!(shown("a\u{200b}b\nc", 64), "a\\u{200b}b\\u{000a}c");
        let long = "x".repeat(2000);
        let s = shown(&long, 10);
        assert!(s.starts_with("xxxxxxxxxx… (1990 more characters)"), "{s}");
        let msg: serde_json::Value = serde_json::from_slice(&request(
            "mcp-guard-approval.0.00",
            "delete_file",
            &shown_arguments(Some(r#"{"path":"/srv/x"}"#)).unwrap(),
        ))
        .unwrap();
        assert_eq!(msg["method"], "elicitation/create");
        assert_eq!(
            msg["params"]["requestedSchema"]["properties"]["approve"]["type"],
            "boolean"
        );
        assert!(
            msg["params"]["message"]
                .as_str()
                .unwrap()
                .contains("delete_file")
        );
    }

    #[test]
    fn separators_and_blank_lookalikes_cannot_fake_lines_in_the_prompt() {
        for c in [
            '\u{2028}',
            '\u{2029}',
            '\u{00a0}',
            '\u{3000}',
            '\u{2800}',
            '\u{1d173}',
        ] {
            let s = shown(&format!("a{c}b"), 64);
            assert!(!s.contains(c), "{c:?} shown raw: {s}");
        }
    }

    #[test]
    fn arguments_shown_for_approval_are_faithful_or_refused() {
        // A member twice (at any depth): the upstream may act on the copy not shown.
        assert!(shown_arguments(Some(r#"{"text":"EVIL","text":"SAFE"}"#)).is_err());
        assert!(shown_arguments(Some(r#"{"a":{"b":1,"b":2}}"#)).is_err());
        // A long value cannot push another argument out of view.
        let pad = "A".repeat(5000);
        let s = shown_arguments(Some(&format!(r#"{{"pad":"{pad}","target":"/"}}"#))).unwrap();
        assert!(s.contains("target = \"/\""), "{s}");
        // Too many members to show each: refused rather than partly shown.
        let many: Vec<String> = (0..=SHOWN_MEMBERS).map(|i| format!("\"k{i}\":1")).collect();
        assert!(shown_arguments(Some(&format!("{{{}}}", many.join(",")))).is_err());
        assert_eq!(shown_arguments(None).unwrap(), "(none)");
    }

    #[test]
    fn an_answer_repeating_a_member_is_unreadable() {
        let twice = r#"{"jsonrpc":"2.0","id":"x","result":{"action":"decline","action":"accept","content":{"approve":true}}}"#;
        assert_eq!(read_answer(twice.as_bytes()), Outcome::Error);
        let nested = r#"{"jsonrpc":"2.0","id":"x","result":{"action":"accept","content":{"approve":false,"approve":true}}}"#;
        assert_eq!(read_answer(nested.as_bytes()), Outcome::Error);
    }

    #[test]
    fn flagged_session_ids_verify_only_under_the_flagged_binding() {
        let codec = SessionCodec::random();
        let sid = codec.encode_for("alice", "", b"upstream-sid");
        let flagged = flag_session(&codec, "alice", "", &sid).unwrap();
        let body = flagged.strip_prefix(ELICIT_SID_PREFIX).unwrap();
        assert_eq!(
            codec
                .decode_for("alice", &session_binding(""), body)
                .as_deref(),
            Some(&b"upstream-sid"[..])
        );
        assert_eq!(codec.decode_for("alice", "", body), None);
        assert_eq!(codec.decode_for("bob", &session_binding(""), body), None);
        // The flag cannot be added to an id minted without it.
        assert_eq!(codec.decode_for("alice", &session_binding(""), &sid), None);
        assert_eq!(flag_session(&codec, "bob", "", &sid), None);
    }
}
