//! The request path, in its one fixed order. Each phase either lets the request continue or
//! answers it; an early answer is a [`GatewayError`] turned into a response in `error.rs`.
//!
//! Order, and why:
//!
//! - 1 accept (connection cap) and 3 head parse with limits happen in `http::server` before
//!   any byte reaches here: nothing is interpreted from a request whose framing is in doubt.
//! - 4 route by path: health probes answer without authentication (orchestrators must reach
//!   them).
//! - 4a Origin check before authentication: a DNS-rebinding page must learn nothing, not even
//!   whether its credentials would have worked.
//! - 5 authenticate (client certificate, API key, the OAuth facade's tokens, JWT, OAuth access
//!   tokens) on the head, before the body is even read: a stranger gets no `100 Continue`, holds
//!   no body buffer, and cannot make us parse JSON-RPC. When the answer needs an identity
//!   provider (a JWKS refresh, an introspection call) admission answers [`Admission::Pending`];
//!   the connection waits for it once, bounded, and admits again — the only await before the
//!   body, and never for a cached token or an API key.
//! - 5a transport rules (protocol version, Accept, Content-Type), also on the head. Phases 4
//!   to 5a are [`admit`]; the connection loop reads the body only for an admitted request.
//! - 6 classify the JSON-RPC body once; everything after reads the classification, never the
//!   JSON. Every message is decided whatever its kind (an id-less `tools/call` is invalid, not
//!   an unchecked notification).
//! - 6a session check after classification: only `initialize` may arrive without a session.
//! - 7 authorize, then 8 rate-limit: a denied call must not spend quota.
//! - 8a approval (`mcp::approval`): a call of an `[approval]` tool waits for a person's answer
//!   before anything reaches the upstream; answers to the gateway's own elicitation requests
//!   end here.
//! - 9 forward, 10 relay (streamed), 11 metrics (and audit) always, also after an early exit:
//!   the connection loop records them from the [`Reply`] once it has been written.

use crate::auth::{AuthError, AuthMethod, Caller, IdentitySlot, Pending};
use crate::authz::{Decision, Denial, Policy};
use crate::config::Settings;
use crate::error::{GatewayError, code};
use crate::http::body::HeldBody;
use crate::http::client::UpstreamResponse;
use crate::http::request::{Method, RequestHead};
use crate::http::response::jsonrpc_error;
use crate::mcp::approval::{self, Outcome};
use crate::mcp::filter::SseFilter;
use crate::mcp::jsonrpc::{Body, ClassifyError, Kind, Message, RpcId, Target, is_spec_tool_name};
use crate::mcp::legacy;
use crate::mcp::transform::{Expect, Transform};
use crate::mcp::transport;
use crate::observe::metrics::{self, M_BATCH, M_DELETE, M_NONE, M_RESPONSE, M_STREAM};
use crate::ratelimit::{Limit, bucket_key, fleet_key};
use crate::runtime::worker::Worker;
use crate::tls::Peer;
use crate::upstream::balance::InFlight;
use crate::upstream::events::Backlog;
use crate::upstream::{Answer, Exchange, Outgoing, UpstreamRef};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

/// What the connection loop writes back.
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Extra response headers.
    pub headers: Vec<(&'static str, String)>,
    /// The body.
    pub body: ReplyBody,
    /// Close the connection afterwards.
    pub close: bool,
    /// Metric label index (MCP method).
    pub method: usize,
    /// Why the request ended early, if it did (audit reason).
    pub reason: Option<&'static str>,
    /// What the audit event of this request says.
    pub audit: AuditInfo,
    /// The upstream's hold on the request (its replica's count of requests in flight), let go
    /// once the reply is written.
    pub hold: Option<InFlight>,
    /// For the requests whose answer is relayed as it arrives (a single call, or a batch's):
    /// how to end it when the gateway gives up on the answer part-way (its time ran out, an
    /// event could not be checked, the body stalled).
    pub call: Option<Box<StreamedCall>>,
}

/// The requests an answer relayed as it arrives answers, for ending it early: an SSE stream's
/// head has gone out by then, so a status cannot say why; an error event with the call's id
/// can (and a JSON answer's error carries the id, or a batch's an error per request).
pub struct StreamedCall {
    /// The call's id (a batch's first request's).
    pub id: RpcId,
    /// For a batch, the ids of its other requests: an error answers each in its place, and
    /// no event of the gateway's ends its stream (some of its requests may be answered).
    pub batch: Option<Vec<RpcId>>,
    /// Whether the answer is an SSE stream, which can end with an event of the gateway's.
    pub events: bool,
    /// The call's cancellation, for an HTTP upstream's SSE answer.
    pub cancel: Option<crate::upstream::http::Cancel>,
}

/// The audit-relevant facts gathered along the path.
#[derive(Debug, Default)]
pub struct AuditInfo {
    /// Not an auditable request (health probes, unknown paths).
    pub skip: bool,
    /// Who, once authenticated.
    pub identity: Option<Arc<str>>,
    /// How they authenticated; `None` before authentication.
    pub auth_method: Option<&'static str>,
    /// Each JSON-RPC message's method and target.
    pub messages: Vec<(String, Option<Target>)>,
    /// An explicit decision ("deny", "rate_limited"); otherwise derived from the status.
    pub decision: Option<&'static str>,
    /// Tool arguments, when `audit.include_arguments` is on.
    pub arguments: Option<String>,
    /// The route the request was for, once known.
    pub upstream: Option<Arc<str>>,
    /// Why credentials were refused (a stable reason, never the credential).
    pub auth_failure: Option<&'static str>,
    /// When the request went to the upstream (with tracing on): splits a span's phases.
    pub forwarded_at: Option<Instant>,
    /// What the advanced-policy steps noted (the audit event's `details`): an argument
    /// check's `pointer`, `check` and `rule` when one refused or would have, then what the
    /// response transforms noted.
    pub details: Vec<(&'static str, serde_json::Value)>,
    /// Why, for a request that went ahead with a decision worth a reason (`would_deny`).
    pub reason: Option<&'static str>,
    /// A batch's: which of its messages are requests (set where it was classified).
    pub requests: Option<Box<[bool]>>,
    /// A batch's, given up on part-way: whether each of its requests, in order, had its
    /// response relayed; only those without carry the reason the stream was given up for.
    pub answered: Option<Vec<bool>>,
}

/// Reply bodies.
pub enum ReplyBody {
    /// No body.
    Empty,
    /// A complete body.
    Full(Vec<u8>),
    /// An upstream response relayed as it arrives (boxed: see [`Answer::Streamed`]).
    Upstream(Box<UpstreamResponse>),
    /// An upstream SSE response rewritten event by event (`tools/list` filtering).
    /// Boxed: rare, and the largest variant by far, it would make every `Reply` (moved several
    /// times per request) as large as itself.
    FilteredEvents(Box<(UpstreamResponse, SseFilter)>),
    /// Server-to-client messages written as SSE events until the channel closes (boxed, as
    /// the largest variant: every `Reply` would otherwise be as large).
    Events(Box<EventStream>),
}

/// Messages (JSON each) to write as SSE `message` events until their channel closes.
pub struct EventStream {
    /// The messages.
    pub messages: async_channel::Receiver<Vec<u8>>,
    /// With a restricted policy, each message goes through the `tools/list` filter first.
    pub transform: Option<Transform>,
    /// SSE bytes written before the first message (the legacy transport's `endpoint` event).
    pub preamble: Vec<u8>,
    /// Held for as long as the stream is open (a legacy session ends when it is dropped).
    pub guard: Option<Box<dyn std::any::Any>>,
    /// Bytes its producer has queued, counted down as messages are taken (a legacy session or
    /// a stdio hub bounds what a client that stops reading can make it hold).
    pub backlog: Option<Backlog>,
    /// Messages being forwarded whose answers are still to come on this stream (a legacy
    /// session's): at shutdown the stream stays open for them, up to the grace.
    pub in_flight: Option<std::rc::Rc<std::cell::Cell<usize>>>,
    /// Which responses its client asked for (a legacy session's requests, a held call's): a
    /// message holding one that the stream cannot check gets the error in its place. `None`:
    /// a single call's own, where the stream answers one (`Reply::call`), else none.
    pub asked: Option<Asked>,
}

/// Whether a response id is one a stream's client asked for (see [`EventStream::asked`]).
pub type Asked = std::rc::Rc<dyn Fn(&RpcId) -> bool>;

impl Reply {
    fn new(status: u16, body: ReplyBody, method: usize) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body,
            close: false,
            method,
            reason: None,
            audit: AuditInfo::default(),
            hold: None,
            call: None,
        }
    }

    /// Whether the body is read from the upstream as it is relayed (after the reply's head
    /// has been decided), or is a stream.
    fn is_relayed(&self) -> bool {
        matches!(
            self.body,
            ReplyBody::Upstream(_) | ReplyBody::FilteredEvents(_) | ReplyBody::Events(_)
        )
    }

    /// Whether the body is an SSE stream: an upstream's, relayed as it arrives, or the
    /// gateway's own (a stdio child's progress and answer).
    fn streams_events(&self) -> bool {
        self.is_relayed()
            && self
                .headers
                .iter()
                .any(|(name, value)| *name == "content-type" && crate::http::is_event_stream(value))
    }

    /// A complete JSON response.
    pub fn json(status: u16, body: Vec<u8>, method: usize) -> Self {
        let mut r = Self::new(status, ReplyBody::Full(body), method);
        r.headers.push(("content-type", "application/json".into()));
        r
    }

    /// The response for an early exit.
    pub fn error(e: &GatewayError, id: Option<&RpcId>, method: usize) -> Self {
        let mut r = Self::json(e.status(), e.body(id), method);
        r.close = e.closes_connection();
        r.reason = Some(e.reason());
        r.headers.extend(e.headers());
        r
    }
}

/// What phases 4 and 5 decided from the request head alone, before any body byte is read.
// An admitted request is moved once per request; boxing it would cost an allocation each time.
#[allow(clippy::large_enum_variant)]
pub enum Admission<'c> {
    /// Answered on the head: health probes, unknown paths, and every request refused before
    /// its body (Origin, credentials, transport headers). The body is never read for these.
    Answered(Box<Reply>),
    /// An MCP request from an authenticated caller: its body may now be read.
    Admitted(Admitted<'c>),
    /// OAuth discovery or the authorization-server facade (no authentication): its body, if
    /// any, is read and `facade::serve` answers it.
    OAuth(crate::facade::Endpoint),
    /// Authentication waits for an identity provider (a JWKS refresh, an introspection
    /// call): [`Waiting::settle`], then admit again. Never for a cached token or an API key.
    Pending(Box<Waiting>),
}

/// The longest a request waits for an identity provider before it is refused.
pub const AUTH_WAIT: std::time::Duration = std::time::Duration::from_secs(6);

/// A request whose authentication waits, with the answer it gets if the wait does not help.
pub struct Waiting {
    pending: Pending,
    refusal: Reply,
}

impl Waiting {
    /// Waits (at most [`AUTH_WAIT`]) for what authentication needs; admission runs again next.
    pub async fn settle(&self, w: &Worker) {
        self.pending.clone().settle(&w.tokens, AUTH_WAIT).await;
    }

    /// The answer when authentication still waits after [`Waiting::settle`]: refused.
    pub fn refuse(self, w: &Worker) -> Reply {
        w.metrics
            .count_auth(auth_index(self.pending.refusal.0), false);
        self.refusal
    }
}

/// Which transport a request speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Front {
    /// Streamable HTTP (2025-03-26 and later) at a route's endpoint.
    Streamable,
    /// The legacy HTTP+SSE stream (`GET server.sse_path`).
    LegacyStream,
    /// A legacy HTTP+SSE message (`POST /messages?sessionId=`).
    LegacyPost,
}

/// An MCP request that passed the head phases; it borrows its caller from the config snapshot.
pub struct Admitted<'c> {
    front: Front,
    caller: Caller<'c>,
    version: &'static str,
    /// Index of its route in `Settings::routes`.
    route: usize,
    /// Where the path's remainder after the route's endpoint or prefix starts.
    rest_at: usize,
    /// The client's address.
    client: std::net::IpAddr,
    audit: AuditInfo,
    /// Its rate-limit token was taken on the head ([`rate_on_head`]).
    rated: bool,
}

impl Admitted<'_> {
    /// When the caller's credential expires (a token's `exp`), if it does.
    pub fn expires_at(&self) -> Option<u64> {
        self.caller.expires_at
    }
}

/// Phases 4 (route), 4a (Origin), 5 (authenticate) and 5a (transport headers), on the head.
/// Running them before the body is read means a stranger costs us a parsed head and nothing
/// more: no `100 Continue`, no buffered body, no JSON parsing.
pub fn admit<'c>(
    w: &Worker,
    cfg: &'c Settings,
    head: &RequestHead,
    peer: Peer<'_>,
    slot: &'c IdentitySlot,
) -> Admission<'c> {
    // 4. route: probes first (no authentication), then paths in normal form only, so that no
    // spelling of a path (`//`, `..`, `%2f`) can select a route its plain form would not.
    let path = head.path();
    // A path that leads nowhere is not audited (scanners try thousands); a path spelled to
    // slip past routing, or a messages URL with a missing or forged session, is aimed at a
    // route and audited, under the refusals' allowance like any other 4xx.
    let unrouted = |e: GatewayError| {
        let mut reply = Reply::error(&e, None, M_NONE);
        reply.audit.skip = matches!(e, GatewayError::NotFound);
        Admission::Answered(Box::new(reply))
    };
    let route = match path {
        "/health" | "/live" | "/ready" => {
            let mut reply = health(w, head, path);
            reply.audit.skip = true;
            return Admission::Answered(Box::new(reply));
        }
        _ if !crate::config::is_normal_path(path) => return unrouted(GatewayError::PathNotNormal),
        "/routes" => {
            let mut pending = None;
            let reply = with_challenge(cfg, path, routes(w, cfg, head, peer, &mut pending));
            return match pending {
                Some(pending) => Admission::Pending(Box::new(Waiting {
                    pending,
                    refusal: reply,
                })),
                None => Admission::Answered(Box::new(reply)),
            };
        }
        _ => match legacy_route(cfg, head, path) {
            Some(Ok(found)) => found,
            Some(Err(e)) => return unrouted(e),
            // OAuth discovery and the facade answer before any MCP route: their paths are
            // reserved whenever `[auth.oauth]` is on.
            None => match cfg.auth.oauth.as_ref().and_then(|o| o.endpoint(path)) {
                Some(endpoint) => return Admission::OAuth(endpoint),
                None => match cfg.route_for(path) {
                    Some((route, rest)) => (Front::Streamable, route, rest),
                    None => return unrouted(GatewayError::NotFound),
                },
            },
        },
    };
    let (front, route, rest) = route;
    let rest_at = path.len() - rest.len();
    let mut audit = AuditInfo {
        upstream: Some(cfg.routes[route].name.clone()),
        ..AuditInfo::default()
    };
    let mut pending = None;
    let admitted = admit_mcp(
        w,
        cfg,
        head,
        peer,
        (front, route),
        slot,
        &mut audit,
        &mut pending,
    );
    match admitted {
        Err((e, id, method)) if let Some(pending) = pending => {
            Admission::Pending(Box::new(Waiting {
                pending,
                refusal: with_challenge(cfg, path, refused(e, id, method, audit)),
            }))
        }
        Ok((caller, version)) => Admission::Admitted(Admitted {
            front,
            caller,
            version,
            route,
            rest_at,
            client: peer.ip(),
            audit,
            rated: false,
        }),
        Err((e, id, method)) => Admission::Answered(Box::new(with_challenge(
            cfg,
            path,
            refused(e, id, method, audit),
        ))),
    }
}

/// A 401 under `[auth.oauth]` says where the resource's metadata is and what scopes to ask
/// for (MCP authorization: "MUST use the WWW-Authenticate header … resource_metadata").
fn with_challenge(cfg: &Settings, path: &str, mut reply: Reply) -> Reply {
    if reply.status == 401
        && let Some(oauth) = &cfg.auth.oauth
    {
        let invalid = reply.reason == Some("invalid_credentials");
        reply.headers.retain(|(n, _)| *n != "www-authenticate");
        reply
            .headers
            .push(("www-authenticate", oauth.challenge(path, invalid)));
    }
    reply
}

/// Phase 4 for the legacy transport's paths: the stream at `server.sse_path` (or
/// `<sse_path>/<server>`), and the messages URL, whose session parameter names its server.
/// `None`: not a legacy path.
fn legacy_route<'p>(
    cfg: &Settings,
    head: &RequestHead,
    path: &'p str,
) -> Option<Result<(Front, usize, &'p str), GatewayError>> {
    let (front, name) = if path == legacy::MESSAGES_PATH {
        let Some(sid) = legacy::session_param(&head.target) else {
            return Some(Err(GatewayError::MissingSession));
        };
        match legacy::route_of(sid) {
            Some(name) => (Front::LegacyPost, std::borrow::Cow::Owned(name)),
            None => return Some(Err(GatewayError::UnknownSession)),
        }
    } else {
        let name = legacy::stream_route(path, &cfg.server.sse_path)?;
        (Front::LegacyStream, std::borrow::Cow::Borrowed(name))
    };
    Some(
        cfg.routes
            .iter()
            .position(|r| *r.name == *name)
            .map(|route| (front, route, ""))
            .ok_or(match front {
                Front::LegacyPost => GatewayError::UnknownSession,
                _ => GatewayError::NotFound,
            }),
    )
}

/// `GET /routes`: the MCP endpoints this caller may reach (names and paths, never where they
/// lead), after the same Origin and authentication checks as an MCP request.
fn routes(
    w: &Worker,
    cfg: &Settings,
    head: &RequestHead,
    peer: Peer<'_>,
    pending: &mut Option<Pending>,
) -> Reply {
    let mut audit = AuditInfo::default();
    let slot = IdentitySlot::new();
    let caller = match authenticate(w, cfg, head, peer, &slot, &mut audit, pending) {
        Ok(c) => c,
        Err((e, id, method)) => return refused(e, id, method, audit),
    };
    if head.method != Method::Get {
        return Reply::error(&GatewayError::MethodNotAllowed("GET"), None, M_NONE);
    }
    let list: Vec<serde_json::Value> = cfg
        .routes
        .iter()
        .filter(|r| caller.identity.policy.may_reach(&r.name))
        .map(|r| {
            let mut entry = serde_json::json!({ "name": &*r.name, "endpoint": r.endpoint });
            if let Some(p) = &r.prefix {
                entry["path_prefix"] = p.as_str().into();
            }
            entry
        })
        .collect();
    let mut reply = Reply::json(
        200,
        serde_json::json!({ "routes": list })
            .to_string()
            .into_bytes(),
        M_NONE,
    );
    reply.audit.skip = true;
    reply
}

/// What every phase after admission reads about the request, in one place.
struct Ctx<'r> {
    w: &'r Worker,
    cfg: &'r Settings,
    head: &'r RequestHead,
    request_id: &'r str,
    caller: Caller<'r>,
    /// The negotiated protocol version.
    version: &'static str,
    /// The caller's policy on this route's server.
    policy: &'r Arc<Policy>,
    /// Index of the route in `Settings::routes`.
    route: usize,
    /// The path's remainder below the route's endpoint (empty for the endpoint itself).
    rest: &'r str,
    /// The server session ids of this request are bound to besides the identity (empty for
    /// the default upstream), so an id minted for one server is unknown at another.
    session_route: &'r str,
    /// The client's address.
    client: std::net::IpAddr,
    /// Rate-limited on the head already.
    rated: bool,
}

impl Ctx<'_> {
    /// The upstream serving this request, from the snapshot the request started with.
    fn upstream(&self) -> Result<UpstreamRef<'_>, GatewayError> {
        self.cfg
            .upstreams
            .as_deref()
            .and_then(|set| set.at(self.route))
            .ok_or_else(|| GatewayError::UpstreamUnavailable("no upstream is running".into()))
    }

    /// The facts an upstream needs, for a verified session payload.
    fn outgoing<'a>(&'a self, session: Option<&'a [u8]>) -> Outgoing<'a> {
        Outgoing {
            head: self.head,
            request_id: self.request_id,
            binding: &self.caller.identity.id,
            server: &self.cfg.routes[self.route].name,
            session,
            timeout: self.cfg.routes[self.route].upstream.timeout,
            grace_over: &self.w.grace_over,
            path_rest: self.rest,
        }
    }

    /// The legacy session a messages URL names, verified for this caller and route.
    fn legacy_ticket(&self) -> Result<legacy::Ticket, GatewayError> {
        let sid = legacy::session_param(&self.head.target).ok_or(GatewayError::MissingSession)?;
        let name = &self.cfg.routes[self.route].name;
        self.w
            .verify_session(
                &self.cfg.sessions,
                &self.caller.identity.id,
                &legacy::binding(name),
                sid,
            )
            .and_then(|payload| legacy::Ticket::parse(&payload))
            .filter(|t| *t.route == **name)
            .ok_or(GatewayError::UnknownSession)
    }

    /// The session payload of the client's `Mcp-Session-Id`, verified for this caller. An id
    /// minted for a client that declared elicitation (`e.` prefix) verifies under its own
    /// binding (see `mcp::approval`).
    fn session(&self) -> Result<Option<Vec<u8>>, GatewayError> {
        match self.head.h.session_id() {
            Some(sid) if self.w.shared.ended_sessions.is_ended(sid) => {
                Err(GatewayError::UnknownSession)
            }
            Some(sid) => {
                let (sid, binding) = match sid.strip_prefix(approval::ELICIT_SID_PREFIX) {
                    Some(rest) => (
                        rest,
                        std::borrow::Cow::Owned(approval::session_binding(self.session_route)),
                    ),
                    None => (sid, std::borrow::Cow::Borrowed(self.session_route)),
                };
                self.w
                    .verify_session(&self.cfg.sessions, &self.caller.identity.id, &binding, sid)
                    .map(Some)
                    .ok_or(GatewayError::UnknownSession)
            }
            None => Ok(None),
        }
    }
}

/// Handles an admitted MCP request with its complete body.
pub async fn handle(
    w: &Worker,
    cfg: &Settings,
    head: &RequestHead,
    body: HeldBody,
    admitted: Admitted<'_>,
    request_id: &str,
) -> Reply {
    let Admitted {
        front,
        caller,
        version,
        route,
        rest_at,
        client,
        mut audit,
        rated,
    } = admitted;
    let name = &cfg.routes[route].name;
    let session_route = if &**name == crate::config::DEFAULT_ROUTE {
        ""
    } else {
        &**name
    };
    let cx = Ctx {
        w,
        cfg,
        head,
        request_id,
        caller,
        version,
        policy: crate::authz::policy_on(&caller.identity.policy, name),
        route,
        rest: head.path().get(rest_at..).unwrap_or_default(),
        session_route,
        client,
        rated,
    };
    let outcome = match head.method {
        Method::Post if front == Front::LegacyPost => legacy_post(&cx, body, &mut audit).await,
        Method::Post => post(&cx, body, &mut audit, None).await,
        Method::Get => {
            audit.messages.push(("stream".into(), None));
            match rate_limit(w, cfg, caller, &[]).await {
                Ok(()) if front == Front::LegacyStream => Ok(legacy_stream(&cx)),
                Ok(()) => stream(&cx).await.map_err(|e| early(e, M_STREAM)),
                Err(e) => Err(early(e, M_STREAM)),
            }
        }
        Method::Delete => {
            audit.messages.push(("delete".into(), None));
            match rate_limit(w, cfg, caller, &[]).await {
                Ok(()) => delete(&cx).await.map_err(|e| early(e, M_DELETE)),
                Err(e) => Err(early(e, M_DELETE)),
            }
        }
        // `admit` only lets the three methods above through.
        _ => Err(early(
            GatewayError::MethodNotAllowed("GET, POST, DELETE"),
            M_NONE,
        )),
    };
    match outcome {
        Ok(mut reply) => {
            // What phase 10 noted (the response transforms) joins what the request path did.
            let noted = std::mem::take(&mut reply.audit.details);
            reply.audit = audit;
            reply.audit.details.extend(noted);
            reply
        }
        Err((e, id, method)) => refused(e, id, method, audit),
    }
}

/// The reply for a request that ended early, with its audit decision.
fn refused(e: GatewayError, id: Option<RpcId>, method: usize, mut audit: AuditInfo) -> Reply {
    // A shadow `would_deny` that was then refused for another reason reports that refusal.
    if audit.decision == Some("would_deny") {
        audit.decision = None;
        audit.reason = None;
    }
    if audit.decision.is_none() {
        audit.decision = match e {
            GatewayError::Denied(_)
            | GatewayError::HeadDenied(_)
            | GatewayError::ArgumentRefused { .. }
            | GatewayError::Unauthorized { .. } => Some("deny"),
            GatewayError::OriginForbidden => Some("deny"),
            GatewayError::RateLimited { .. } => Some("rate_limited"),
            _ => None,
        };
    }
    let mut reply = Reply::error(&e, id.as_ref(), method);
    reply.audit = audit;
    reply
}

fn health(w: &Worker, head: &RequestHead, path: &str) -> Reply {
    // HEAD is refused rather than answered with a body a HEAD response must not carry.
    if head.method != Method::Get {
        return Reply::error(&GatewayError::MethodNotAllowed("GET"), None, M_NONE);
    }
    // The main port answers anyone: the verdict only. Which servers, replicas and versions
    // stand behind it is the admin port's to tell.
    let shared = &w.shared;
    let (status, body): (u16, &[u8]) = match path {
        "/live" => (200, b"{\"status\":\"alive\"}"),
        "/ready" if shared.is_ready() => (200, b"{\"status\":\"ready\"}"),
        "/ready" => (503, b"{\"status\":\"not ready\"}"),
        _ if shared.upstream_has_answered() => (200, b"{\"status\":\"ok\"}"),
        _ => (503, b"{\"status\":\"starting\"}"),
    };
    Reply::json(status, body.to_vec(), M_NONE)
}

type Early = (GatewayError, Option<RpcId>, usize);

fn early(e: GatewayError, method: usize) -> Early {
    (e, None, method)
}

/// Index of "none" in `metrics::AUTH_METHODS` (no credentials presented).
const AUTH_NONE: usize = 3;

/// The [`metrics::AUTH_METHODS`] slot of `m`.
pub(crate) fn auth_index(m: AuthMethod) -> usize {
    match m {
        AuthMethod::Anonymous => 0,
        AuthMethod::ApiKey => 1,
        AuthMethod::Jwt => 2,
        AuthMethod::OAuth => 4,
        AuthMethod::Mtls => 5,
    }
}

// The phases' inputs, one each; bundling them would only rename them.
#[allow(clippy::too_many_arguments)]
fn admit_mcp<'c>(
    w: &Worker,
    cfg: &'c Settings,
    head: &RequestHead,
    peer: Peer<'_>,
    (front, route): (Front, usize),
    slot: &'c IdentitySlot,
    audit: &mut AuditInfo,
    pending: &mut Option<Pending>,
) -> Result<(Caller<'c>, &'static str), Early> {
    let caller = authenticate(w, cfg, head, peer, slot, audit, pending)?;
    // 5b. the caller's servers: one outside `allowed_servers` is refused before its transport
    // rules are even looked at.
    let name = &cfg.routes[route].name;
    let policy = &caller.identity.policy;
    if policy.shadow && !policy.reaches(name) {
        shadow_denial(audit, "server_not_allowed");
    }
    if !policy.may_reach(name) {
        audit.decision = Some("deny");
        // A legacy session id names its server: for a caller who may not reach that server,
        // it is simply not theirs (as for any session of someone else), not a hint.
        let refusal = match front {
            Front::LegacyPost => GatewayError::UnknownSession,
            _ => GatewayError::ServerForbidden(name.clone()),
        };
        return Err(early(refusal, M_NONE));
    }
    // 5a. transport rules, all readable from the head
    let version = transport::check_protocol_version(head).map_err(|e| early(e, M_NONE))?;
    if front != Front::Streamable {
        // The legacy transport: one stream (GET) and its messages (POST, JSON); its clients
        // send no protocol-version header, and batches are theirs to send.
        let version = match head.h.protocol_version() {
            Some(_) => version,
            None => "2024-11-05",
        };
        match (front, head.method) {
            (Front::LegacyStream, Method::Get) => {
                transport::check_stream_accept(head).map_err(|e| early(e, M_STREAM))?
            }
            (Front::LegacyPost, Method::Post) => {
                transport::check_content_type(head).map_err(|e| early(e, M_NONE))?
            }
            (Front::LegacyStream, _) => {
                return Err(early(GatewayError::MethodNotAllowed("GET"), M_NONE));
            }
            _ => return Err(early(GatewayError::MethodNotAllowed("POST"), M_NONE)),
        }
        return Ok((caller, version));
    }
    match head.method {
        Method::Post => {
            transport::check_post_headers(head).map_err(|e| early(e, M_NONE))?;
            decide_on_head(w, cfg, head, caller, route, audit)?;
        }
        Method::Get => transport::check_stream_accept(head).map_err(|e| early(e, M_STREAM))?,
        Method::Delete => {}
        _ => {
            return Err(early(
                GatewayError::MethodNotAllowed("GET, POST, DELETE"),
                M_NONE,
            ));
        }
    }
    Ok((caller, version))
}

/// What `Mcp-Method` and `Mcp-Name` say a POST acts on, when they name a call policy decides
/// on: the method's metric label and the target. A name in the base64 form is decoded; `None`
/// leaves every decision to the body: no `Mcp-Method`, another method, no `Mcp-Name`, or one
/// that does not decode (the body check answers it 400).
fn head_target(head: &RequestHead) -> Option<(&str, Target)> {
    let method = head.h.mcp_method()?;
    let name = transport::mcp_name(head.h.mcp_name()?).ok()?;
    let target = match method {
        "tools/call" => Target::Tool(name.into_owned()),
        "resources/read" => Target::Resource(name.into_owned()),
        "prompts/get" => Target::Prompt(name.into_owned()),
        _ => return None,
    };
    Some((method, target))
}

/// Phase 7 on the head: a POST whose `Mcp-Method` / `Mcp-Name` name a call the caller's
/// allow/deny lists refuse is answered before its body is read (no body buffer, no JSON
/// parse). The body of an admitted request is still parsed and must agree with the headers
/// (`transport::check_method_headers`), so a header naming an allowed tool cannot carry a
/// call of a denied one. Argument rules need the body and run there.
fn decide_on_head(
    w: &Worker,
    cfg: &Settings,
    head: &RequestHead,
    caller: Caller<'_>,
    route: usize,
    audit: &mut AuditInfo,
) -> Result<(), Early> {
    let Some((method, target)) = head_target(head) else {
        return Ok(());
    };
    let policy = crate::authz::policy_on(&caller.identity.policy, &cfg.routes[route].name);
    // In shadow mode nothing is refused here: the body path decides again and records the
    // would-be refusal (and counts it, once).
    if policy.shadow {
        return Ok(());
    }
    let Decision::Deny(denial) = policy.decide(Some(&target)) else {
        return Ok(());
    };
    // Counted here; the body path never sees this call.
    if let Target::Tool(t) = &target {
        let slot = cfg.tool_labels.get(t).copied().unwrap_or(0);
        w.metrics.count_decision(slot, 1);
    }
    // An OAuth caller a scope would grant it to gets the step-up challenge, as on the body.
    let refusal = scope_challenge(cfg, caller, route, Some(&target), &denial)
        .unwrap_or(GatewayError::HeadDenied(denial));
    audit.messages = vec![(method.to_string(), Some(target))];
    audit.decision = Some("deny");
    Err(early(refusal, metrics::method_index(method)))
}

/// Phase 8 on the head, for a POST whose `Mcp-Method` header is present: the caller's quota
/// is spent before the body is read, so a caller over its limit costs no body read either.
/// The request then carries [`Admitted::rated`] and the body path does not count it again.
/// Without `Mcp-Method` (or with a name only the body can decide), the body path rates it.
pub async fn rate_on_head<'c>(
    w: &Worker,
    cfg: &Settings,
    head: &RequestHead,
    mut admitted: Admitted<'c>,
) -> Result<Admitted<'c>, Reply> {
    let Some(method) = head.h.mcp_method() else {
        return Ok(admitted);
    };
    let target = head_target(head).map(|(_, t)| t);
    // A call whose name the head does not give is rated on the body, where its per-tool
    // bucket can be found.
    let named = matches!(method, "tools/call" | "resources/read" | "prompts/get");
    if !cfg.rate.enabled
        || head.method != Method::Post
        || admitted.front != Front::Streamable
        || (named && target.is_none())
    {
        return Ok(admitted);
    }
    let message = Message {
        kind: Kind::Request,
        method: Some(method.to_string()),
        id: None,
        target,
    };
    match rate_limit(w, cfg, admitted.caller, std::slice::from_ref(&message)).await {
        Ok(()) => {
            admitted.rated = true;
            Ok(admitted)
        }
        Err(e) => {
            admitted.audit.messages = vec![(method.to_string(), message.target)];
            Err(refused(
                e,
                None,
                metrics::method_index(method),
                admitted.audit,
            ))
        }
    }
}

/// Phases 4a (Origin) and 5 (authenticate), shared by every authenticated path. When the
/// answer needs a wait, `pending` says for what, and the refusal returned is the answer if the
/// wait does not help.
fn authenticate<'c>(
    w: &Worker,
    cfg: &'c Settings,
    head: &RequestHead,
    peer: Peer<'_>,
    slot: &'c IdentitySlot,
    audit: &mut AuditInfo,
    pending: &mut Option<Pending>,
) -> Result<Caller<'c>, Early> {
    // 4a. Origin
    transport::check_origin(head, &cfg.server.allowed_origins).map_err(|e| early(e, M_NONE))?;
    // 5. authenticate
    let caller = match cfg.auth.authenticate_peer(head, peer, slot, &w.tokens) {
        Ok(c) => {
            w.metrics.count_auth(auth_index(c.identity.method), true);
            c
        }
        Err(AuthError::Missing) => {
            w.metrics.count_auth(AUTH_NONE, false);
            return Err(early(GatewayError::Unauthorized { invalid: false }, M_NONE));
        }
        Err(AuthError::Invalid(m, why)) => {
            w.metrics.count_auth(auth_index(m), false);
            audit.auth_method = Some(m.as_str());
            audit.auth_failure = Some(why);
            return Err(early(GatewayError::Unauthorized { invalid: true }, M_NONE));
        }
        Err(AuthError::Unavailable(m, why)) => {
            w.metrics.count_auth(auth_index(m), false);
            audit.auth_method = Some(m.as_str());
            audit.auth_failure = Some(why);
            return Err(early(GatewayError::AuthUnavailable, M_NONE));
        }
        // Counted once it is known how it ends (`Waiting::refuse`, or the next run).
        Err(AuthError::Pending(p)) => {
            let (m, why) = p.refusal;
            audit.auth_method = Some(m.as_str());
            audit.auth_failure = Some(why);
            *pending = Some(p);
            return Err(early(GatewayError::Unauthorized { invalid: true }, M_NONE));
        }
    };
    let identity = caller.identity;
    // Spans name the caller too (its id, never its credential).
    if w.audit.enabled() || cfg.tracing.enabled {
        audit.identity = Some(identity.id.clone());
    }
    audit.auth_method = Some(identity.method.as_str());
    Ok(caller)
}

/// Phases 7 (lists), 7b (pinning) and 7c (argument rules) on a classified body: `Ok(None)`
/// = go on, `Ok(Some(reply))` = a batch refused, `Err` = the call refused. `shadowed` gets
/// the index of each message a shadow decision would have refused.
fn decide_body(
    cx: &Ctx<'_>,
    body: &Body,
    findings: &[(usize, crate::rules::Violation)],
    method: usize,
    audit: &mut AuditInfo,
    shadowed: &mut Vec<usize>,
) -> Result<Option<Reply>, GatewayError> {
    let (w, cfg) = (cx.w, cx.cfg);
    if let Some(refused) = authorize(w, cfg, cx.policy, body, method, audit, shadowed)
        .map_err(|e| step_up(cx, body, e))?
    {
        return Ok(Some(refused));
    }
    // A hidden tool's call, or any request to a blocked server, is refused before it is
    // forwarded (a lookup in the pins snapshot).
    if let Some(denial) = pinning_refusal(cx, body) {
        audit.decision = Some("deny");
        return Err(GatewayError::Denied(denial));
    }
    constrain(w, cfg, cx.policy, body, findings, method, audit, shadowed)
}

/// Refund of the tokens [`rate_on_head`] took for a request then refused on its body by
/// policy: the same keys [`rate_limit`] takes for these messages.
fn refund(w: &Worker, cfg: &Settings, caller: Caller<'_>, messages: &[Message]) {
    if !cfg.rate.enabled {
        return;
    }
    let now = crate::runtime::clock::now();
    let pool = &*w.shared.quota;
    let limit = identity_limit(cfg, caller);
    for _ in 0..messages.len().max(1) {
        w.limiter
            .refund(pool, bucket_key(&caller.rate_key, None), limit, now);
    }
    for m in messages {
        if let Some(Target::Tool(t)) = &m.target
            && let Some(tool_limit) = cfg.rate.per_tool.get(t)
        {
            w.limiter.refund(
                pool,
                bucket_key(&caller.rate_key, Some(t)),
                *tool_limit,
                now,
            );
        }
    }
}

fn identity_limit(cfg: &Settings, caller: Caller<'_>) -> Limit {
    match caller.identity.policy.rate_limit {
        Some(r) => Limit {
            rate: f64::from(r),
            burst: cfg.rate.burst,
        },
        None => cfg.rate.default,
    }
}

/// Phase 7: authorize every message; `Ok(None)` = all allowed, `Ok(Some(reply))` = a batch refused.
fn authorize(
    w: &Worker,
    cfg: &Settings,
    policy: &Policy,
    body: &Body,
    method: usize,
    audit: &mut AuditInfo,
    shadowed: &mut Vec<usize>,
) -> Result<Option<Reply>, GatewayError> {
    let mut denied: Option<(usize, Denial)> = None;
    for (i, m) in body.messages().iter().enumerate() {
        let decision = policy.decide(m.target.as_ref());
        // Shadow mode: the refusal is only reported; the request goes on, and is counted
        // (`would_deny`) once it has passed the rate limit, like an allowed call.
        if let Decision::Deny(d) = &decision
            && policy.shadow
        {
            shadow_denial(audit, d.reason.as_str());
            shadowed.push(i);
            continue;
        }
        // Denials are counted here; an allowed call is counted once it has also passed the
        // rate limit (a 429 counts as `rate_limited` only).
        if let Some(Target::Tool(t)) = &m.target
            && decision != Decision::Allow
        {
            w.metrics
                .count_decision(cfg.tool_labels.get(t).copied().unwrap_or(0), 1);
        }
        if let Decision::Deny(d) = decision
            && denied.is_none()
        {
            denied = Some((i, d));
        }
    }
    let Some((index, denial)) = denied else {
        return Ok(None);
    };
    let Body::Batch(messages) = body else {
        return Err(GatewayError::Denied(denial));
    };
    let data = format!("{{\"reason\":\"{}\"}}", denial.reason.as_str());
    let mut r = batch_refusal(messages, index, &denial.message, &data, method);
    r.reason = Some(denial.reason.as_str());
    Ok(Some(r))
}

/// Records a refusal computed in shadow mode: audited as `would_deny` with its reason (the
/// first one, when several would have refused).
fn shadow_denial(audit: &mut AuditInfo, reason: &'static str) {
    audit.decision = Some("would_deny");
    audit.reason.get_or_insert(reason);
}

/// Phase 7c: argument constraints. `findings` are the classifier's outcomes (message index,
/// the failed check); an enforced one refuses the call (a batch whole, as for a denial), a
/// shadow one (the rule's mode or the identity's) is audited as `would_deny` and forwarded.
#[allow(clippy::too_many_arguments)]
fn constrain(
    w: &Worker,
    cfg: &Settings,
    policy: &Policy,
    body: &Body,
    findings: &[(usize, crate::rules::Violation)],
    method: usize,
    audit: &mut AuditInfo,
    shadowed: &mut Vec<usize>,
) -> Result<Option<Reply>, GatewayError> {
    let mut enforced = None;
    for (i, v) in findings {
        let shadow = v.shadow || policy.shadow;
        w.metrics.argument_refusals[usize::from(shadow)]
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if shadow {
            shadow_denial(audit, "argument_refused");
            shadowed.push(*i);
            // The first finding's facts (one set per event, like its reason).
            if !audit.details.iter().any(|(k, _)| *k == "pointer") {
                audit.details.extend(v.audit_details());
            }
        } else if enforced.is_none() {
            enforced = Some((*i, v));
        }
    }
    let Some((index, v)) = enforced else {
        return Ok(None);
    };
    let tool = match &body.messages()[index].target {
        Some(Target::Tool(t)) => t.as_str(),
        _ => "",
    };
    w.metrics
        .count_decision(cfg.tool_labels.get(tool).copied().unwrap_or(0), 1);
    // The shadow findings' facts give way to the one that refused.
    audit
        .details
        .retain(|(k, _)| !crate::rules::AUDIT_KEYS.contains(k));
    audit.details.extend(v.audit_details());
    audit.reason = None;
    let message = v.message(tool);
    let Body::Batch(messages) = body else {
        return Err(GatewayError::ArgumentRefused {
            message,
            data: v.data_json(),
        });
    };
    let mut r = batch_refusal(messages, index, &message, &v.data_json(), method);
    r.reason = Some("argument_refused");
    Ok(Some(r))
}

/// A batch with a refused call is refused whole: nothing of it reaches the upstream, and each
/// request in it gets an error saying why (the refused one its own `message` and `data`, the
/// others `batch_refused`).
fn batch_refusal(
    messages: &[Message],
    index: usize,
    message: &str,
    data: &str,
    method: usize,
) -> Reply {
    let mut out = Vec::from(&b"["[..]);
    let mut first = true;
    for (i, m) in messages.iter().enumerate() {
        let Some(id) = &m.id else { continue };
        if m.kind != Kind::Request {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        let (text, data) = if i == index {
            (message, data)
        } else {
            (
                "Batch refused: another call in it is not permitted",
                "{\"reason\":\"batch_refused\"}",
            )
        };
        out.extend(jsonrpc_error(
            Some(&id.to_json()),
            code::FORBIDDEN,
            text,
            Some(data),
        ));
    }
    out.push(b']');
    Reply::json(200, out, method)
}

/// A tool call refused to an OAuth caller whose token lacks the scope for it becomes the
/// RFC 6750 `insufficient_scope` challenge (403), naming the scopes that would grant it, so
/// the client can ask its authorization server for more (the MCP spec's step-up flow). A
/// call no scope would grant stays a plain denial: asking for more would not help.
fn step_up(cx: &Ctx<'_>, body: &Body, e: GatewayError) -> GatewayError {
    let GatewayError::Denied(denial) = &e else {
        return e;
    };
    let Body::Single(m) = body else {
        return e;
    };
    scope_challenge(cx.cfg, cx.caller, cx.route, m.target.as_ref(), denial).unwrap_or(e)
}

/// The `insufficient_scope` challenge for a denied tool call of an OAuth caller, when some
/// scope would grant it (see [`step_up`]); shared by the body and the head decisions.
fn scope_challenge(
    cfg: &Settings,
    caller: Caller<'_>,
    route: usize,
    target: Option<&Target>,
    denial: &Denial,
) -> Option<GatewayError> {
    let oauth = cfg.auth.oauth_tokens.as_ref()?;
    let Some(Target::Tool(tool)) = target else {
        return None;
    };
    if caller.identity.method != AuthMethod::OAuth
        || denial.reason != crate::authz::DenyReason::NotAllowed
    {
        return None;
    }
    let route = &cfg.routes[route];
    oauth
        .scopes_for_tool(tool, &route.name)
        .map(|scope| GatewayError::InsufficientScope {
            scope,
            resource_metadata: oauth.resource_metadata_url(&route.endpoint),
            message: denial.message.clone(),
        })
}

/// Phase 8, rate limiting: one token of the identity's bucket per message (one for GET/DELETE), and one
/// of the identity × tool bucket for each call of a tool with its own limit. With the Redis
/// backend a lease may be awaited, for at most the lease timeout.
async fn rate_limit(
    w: &Worker,
    cfg: &Settings,
    caller: Caller<'_>,
    messages: &[Message],
) -> Result<(), GatewayError> {
    if !cfg.rate.enabled {
        return Ok(());
    }
    let now = crate::runtime::clock::now();
    let limit = identity_limit(cfg, caller);
    let pool = &*w.shared.quota;
    let refuse = |l: crate::ratelimit::Limited, tool: Option<&str>| {
        w.metrics
            .rate_limited
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = tool {
            let slot = cfg.tool_labels.get(t).copied().unwrap_or(0);
            w.metrics.count_decision(slot, 2);
        }
        GatewayError::RateLimited {
            retry_after_secs: (l.retry_after.as_secs_f64().ceil() as u64).max(1),
            limit: l.limit.rate.round() as u32,
        }
    };
    let key = bucket_key(&caller.rate_key, None);
    let fleet = || fleet_key(&caller.rate_key, None);
    for _ in 0..messages.len().max(1) {
        w.limiter
            .check_async(pool, key, &fleet, limit, now)
            .await
            .map_err(|l| refuse(l, None))?;
    }
    for m in messages {
        if let Some(Target::Tool(t)) = &m.target
            && let Some(tool_limit) = cfg.rate.per_tool.get(t)
        {
            let fleet = || fleet_key(&caller.rate_key, Some(t));
            w.limiter
                .check_async(
                    pool,
                    bucket_key(&caller.rate_key, Some(t)),
                    &fleet,
                    *tool_limit,
                    now,
                )
                .await
                .map_err(|l| refuse(l, Some(t)))?;
        }
    }
    Ok(())
}

/// `params.arguments` of a single tools/call, as raw JSON (only when auditing asks for it).
fn tool_arguments(raw: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(raw).ok()?;
    v.pointer("/params/arguments").map(|a| a.to_string())
}

fn label(body: &Body) -> usize {
    match body {
        Body::Batch(_) => M_BATCH,
        Body::Single(m) if m.kind == Kind::Response => M_RESPONSE,
        Body::Single(m) => metrics::method_index(m.method_str()),
    }
}

/// A legacy HTTP+SSE message: checked like any POST, then handed to the worker holding its
/// session's stream. Its client reads every answer on that stream, the gateway's own refusals
/// (a denied call, an invalid request: HTTP 200 with a JSON-RPC error elsewhere) included, so
/// those go there too and the POST is answered 202; refusals at the HTTP level (401, 404, 429)
/// stay in the POST's response, where the client's send sees them.
async fn legacy_post(cx: &Ctx<'_>, raw: HeldBody, audit: &mut AuditInfo) -> Result<Reply, Early> {
    let ticket = cx.legacy_ticket().map_err(|e| early(e, M_NONE))?;
    let (answer, method, error) = match post(cx, raw, audit, Some(&ticket)).await {
        Ok(Reply {
            status: 200,
            body: ReplyBody::Full(answer),
            method,
            reason,
            ..
        }) => (answer, method, reason),
        Ok(reply) => return Ok(reply),
        // Refusals that answer a request the client can name (a denial; an invalid request or
        // params, with its id) go where it waits for answers; one without an id (unparseable)
        // and refusals of the POST itself (401, 404, 429) stay in the POST's response.
        Err((e, id, method))
            if e.status() == 200
                || (e.status() == 400
                    && (id.is_some()
                        || matches!(
                            e,
                            GatewayError::InvalidRequest(_, Some(_))
                                | GatewayError::InvalidParams(..)
                        ))) =>
        {
            let reason = e.reason();
            // The POST is answered 202, but the message was refused: the audit says so, as
            // it would for the same refusal over Streamable HTTP.
            audit.decision = Some(match e {
                GatewayError::Denied(_) | GatewayError::ArgumentRefused { .. } => "deny",
                _ => "error",
            });
            (e.body(id.as_ref()), method, Some(reason))
        }
        Err(refused) => return Err(refused),
    };
    let work = legacy::Work::Answer(answer);
    legacy::hand_over(
        cx.w,
        &ticket,
        cx.caller.identity,
        cx.client,
        work,
        cx.request_id,
    )
    .await
    .map_err(|e| early(e, method))?;
    let mut reply = Reply::new(202, ReplyBody::Empty, method);
    reply.reason = error;
    Ok(reply)
}

async fn post(
    cx: &Ctx<'_>,
    mut held: HeldBody,
    audit: &mut AuditInfo,
    ticket: Option<&legacy::Ticket>,
) -> Result<Reply, Early> {
    let (w, cfg, head) = (cx.w, cx.cfg, cx.head);
    let raw: &[u8] = &held;
    // 6. classify; argument rules run on this parse (see `rules`), their outcome kept here.
    let mut findings: Vec<(usize, crate::rules::Violation)> = Vec::new();
    let rules = &cfg.tool_rules;
    let classified = if rules.is_empty() {
        w.classifier.borrow_mut().classify(raw)
    } else {
        let server = &*cfg.routes[cx.route].name;
        let identity = &*cx.caller.identity.id;
        w.classifier
            .borrow_mut()
            .classify_inspecting(raw, &mut |i, tool, arguments| {
                let source = crate::rules::Source::new(raw, i);
                if let Some(v) = rules.check(tool, server, identity, arguments, source) {
                    findings.push((i, v));
                }
            })
    };
    let body = classified.map_err(|e| match e {
        ClassifyError::Parse(m) => early(GatewayError::Parse(m), M_NONE),
        ClassifyError::Invalid(m, id) => (GatewayError::InvalidRequest(m, id), None, M_NONE),
        ClassifyError::Params(m, id) => {
            (GatewayError::InvalidParams(m, id.clone()), Some(id), M_NONE)
        }
    })?;
    let method = label(&body);
    audit.messages = body
        .messages()
        .iter()
        .map(|m| {
            let name = match m.kind {
                Kind::Response => "response".to_string(),
                _ => m.method_str().to_string(),
            };
            (name, m.target.clone())
        })
        .collect();
    if let Body::Batch(messages) = &body {
        audit.requests = Some(
            messages
                .iter()
                .map(|m| m.kind == Kind::Request && m.id.is_some())
                .collect(),
        );
    }
    if cfg.audit.include_arguments
        && let Body::Single(m) = &body
        && matches!(m.target, Some(Target::Tool(_)))
    {
        audit.arguments = tool_arguments(raw);
    }
    // A request's id: an error about a POSTed response (or notification) carries none, as the
    // client would read one as the answer to its own request of that id.
    let first_id = body
        .messages()
        .iter()
        .find(|m| m.kind == Kind::Request)
        .and_then(|m| m.id.clone());
    let fail = |e: GatewayError| (e, first_id.clone(), method);
    if let Body::Batch(_) = body
        && !transport::batch_allowed(cx.version)
    {
        return Err(fail(GatewayError::InvalidRequest(
            format!(
                "JSON-RPC batches are not supported in protocol version {}",
                cx.version
            ),
            None,
        )));
    }
    // "The initialize request MUST NOT be part of a JSON-RPC batch" (2025-03-26 lifecycle):
    // a session cannot begin among messages that already need one.
    if let Body::Batch(messages) = &body
        && messages
            .iter()
            .any(|m| m.kind == Kind::Request && m.method_str() == "initialize")
    {
        return Err(fail(GatewayError::InvalidRequest(
            "initialize must not be part of a JSON-RPC batch".into(),
            None,
        )));
    }
    match &body {
        Body::Single(m) => transport::check_method_headers(head, m).map_err(fail)?,
        // The headers describe one message: on a batch nothing could check them, and an
        // upstream routing on them would trust what no one decided.
        Body::Batch(_) if head.h.mcp_method().is_some() || head.h.mcp_name().is_some() => {
            return Err(fail(GatewayError::InvalidRequest(
                "Mcp-Method and Mcp-Name describe a single message; a batch must not carry them"
                    .into(),
                None,
            )));
        }
        Body::Batch(_) => {}
    }
    if cfg.server.strict_tool_names {
        for m in body.messages() {
            if let Some(Target::Tool(t)) = &m.target
                && !is_spec_tool_name(t)
            {
                let id = m.id.clone().unwrap_or(RpcId::Num(0));
                return Err(fail(GatewayError::InvalidParams(
                    "tool name must be 1-128 characters of A-Z a-z 0-9 _ - .".into(),
                    id,
                )));
            }
        }
    }
    let is_initialize = matches!(&body, Body::Single(m) if m.kind == Kind::Request && m.method_str() == "initialize");
    // 6a. session: an initialize starts a new one whatever the client sent; a legacy message
    // belongs to the session its URL names.
    let session = if ticket.is_some() || is_initialize {
        None
    } else {
        cx.session().map_err(fail)?
    };
    // An initialize asking for a revision the gateway does not serve goes upstream asking for
    // the latest it does: the upstream then answers a version the gateway accepts on every
    // later request ("otherwise, the server MUST respond with another protocol version it
    // supports" — the gateway is that server to its client).
    let renegotiated = if is_initialize {
        transport::initialize_within_served_versions(raw)
    } else {
        None
    };
    let elicits = is_initialize && cfg.approval.is_some() && approval::declares_elicitation(raw);
    if let Some(rewritten) = renegotiated {
        held.replace(rewritten).map_err(fail)?;
    }
    let raw: &[u8] = &held;
    #[cfg(debug_assertions)]
    test_hooks::maybe_panic(&body);
    // 7. authorize, 7b. pinning, 7c. argument constraints: each decided before any quota is
    // spent. A call the head already rated gets its tokens back when refused here, so it
    // costs what the same call costs without headers.
    let mut shadowed = Vec::new();
    let decided = decide_body(cx, &body, &findings, method, audit, &mut shadowed);
    if cx.rated && !matches!(decided, Ok(None)) {
        refund(w, cfg, cx.caller, body.messages());
    }
    if let Some(refused) = decided.map_err(fail)? {
        audit.decision = Some("deny");
        return Ok(refused);
    }
    // 8. rate-limit (unless the head already did: one token per call, not two)
    if !cx.rated {
        rate_limit(w, cfg, cx.caller, body.messages())
            .await
            .map_err(fail)?;
    }
    // Each tool call is counted once: `would_deny` when a shadow decision would have refused
    // it, else `allow` (refusals were counted where they were decided).
    for (i, m) in body.messages().iter().enumerate() {
        if let Some(Target::Tool(t)) = &m.target {
            let outcome = if shadowed.contains(&i) {
                metrics::OUTCOME_WOULD_DENY
            } else {
                0
            };
            w.metrics
                .count_decision(cfg.tool_labels.get(t).copied().unwrap_or(0), outcome);
        }
    }
    // 8a. approval: answers to the gateway's own elicitation requests end here, never
    // upstream; a call of a listed tool waits for a person's answer on its own stream.
    if let Some(reply) = approval_step(cx, &body, raw, session.is_some(), ticket.is_some(), method)
        .await
        .map_err(fail)?
    {
        if matches!(reply.reason, Some("approval_unsupported" | "approval_full")) {
            audit.decision = Some("deny");
        }
        return Ok(reply);
    }
    // The answers go through the response-transform chain (tools/list answers filtered to
    // what this identity may call).
    let transform = Transform::for_request(cfg, cx.route, cx.policy, Expect::of(&body));
    // 9. forward; a legacy message goes to the worker holding its session's stream, which
    // forwards it and writes the answer there.
    if let Some(ticket) = ticket {
        // The bytes move to the worker holding the stream; this worker goes on counting them
        // until that one has handed them upstream (its end of `handed` then drops).
        let (bytes, share) = held.into_parts();
        let (handed, on_handed) = async_channel::bounded::<()>(1);
        let work = legacy::Work::Forward(body, bytes, handed);
        legacy::hand_over(
            w,
            ticket,
            cx.caller.identity,
            cx.client,
            work,
            cx.request_id,
        )
        .await
        .map_err(fail)?;
        let _ = on_handed.recv().await;
        drop(share);
        return Ok(Reply::new(202, ReplyBody::Empty, method));
    }
    if cfg.tracing.enabled {
        // A real reading, not the poll's (`runtime::clock`): the upstream span starts when the
        // request leaves, not when its poll began.
        audit.forwarded_at = Some(Instant::now());
    }
    let upstream = cx.upstream().map_err(fail)?;
    let outgoing = cx.outgoing(session.as_deref());
    let forwarded = upstream.post(w, &outgoing, &body, held);
    // A request to an HTTP upstream given up on at its timeout is cancelled there (a stdio
    // child's hub cancels its own).
    let cancel_on_timeout = |e: &GatewayError| {
        if *e == GatewayError::UpstreamTimeout
            && let UpstreamRef::Http(server) = upstream
        {
            if let Some(cancel) = crate::upstream::http::Cancel::of(w, server, &outgoing, &body) {
                cancel.send(|_| true, e);
            }
        }
    };
    let exchange = if let Body::Single(_) = body {
        monoio::select! {
            exchange = forwarded => exchange.inspect_err(cancel_on_timeout).map_err(fail)?,
            // Still waiting when the shutdown grace ran out: the client is told, not cut off.
            _ = w.grace_over.wait() => return Err(fail(GatewayError::ShuttingDown)),
        }
    } else {
        // A batch cannot be answered with one error: some of its requests may be done. A
        // stdio child's batch answers each request still waiting in its place; an HTTP
        // upstream's answers the batch whole, or the connection closes with the grace.
        match forwarded.await {
            Ok(exchange) => exchange,
            Err(e) => {
                cancel_on_timeout(&e);
                return errors_in_place(&body, e, method).map_err(fail);
            }
        }
    };
    // 10. relay
    let mut reply = match deliver(cx, exchange, method, transform).await {
        Ok(reply) => reply,
        Err(e) => {
            cancel_on_timeout(&e);
            return errors_in_place(&body, e, method).map_err(fail);
        }
    };
    // The requests a relayed answer answers, for an error in their place should the gateway
    // give up on it part-way.
    let ids: Option<(RpcId, Vec<RpcId>)> = match &body {
        Body::Single(m) if m.kind == Kind::Request => m.id.clone().map(|id| (id, Vec::new())),
        Body::Single(_) => None,
        Body::Batch(messages) => {
            let mut ids = messages
                .iter()
                .filter(|m| m.kind == Kind::Request)
                .filter_map(|m| m.id.clone());
            ids.next().map(|first| (first, ids.collect()))
        }
    };
    if let Some((id, more)) = ids
        && reply.is_relayed()
    {
        // Built ahead for an answer whose time may still run out: an SSE answer (it may
        // stream for as long as its call runs), or a JSON one whose body has not all come
        // with its head. The usual small JSON answer is here whole and needs none.
        let events = reply.streams_events();
        let whole = match &reply.body {
            ReplyBody::Upstream(resp) => resp.body_complete(),
            _ => false,
        };
        let cancel = match upstream {
            UpstreamRef::Http(server) if events || !whole => {
                crate::upstream::http::Cancel::of(w, server, &outgoing, &body)
            }
            _ => None,
        };
        reply.call = Some(Box::new(StreamedCall {
            id,
            batch: matches!(body, Body::Batch(_)).then_some(more),
            events,
            cancel,
        }));
    }
    if elicits {
        flag_elicitation(cx, &mut reply);
    }
    Ok(reply)
}

/// A failure of the upstream side as the answer to a batch: the error in place of each of its
/// requests, in an array, as a batch is answered (a single error would answer one request of
/// it, the first, and leave the others unanswered). `Err`: not a batch with requests; the
/// error answers the POST.
fn errors_in_place(body: &Body, e: GatewayError, method: usize) -> Result<Reply, GatewayError> {
    let Body::Batch(messages) = body else {
        return Err(e);
    };
    let answers: Vec<Vec<u8>> = messages
        .iter()
        .filter(|m| m.kind == Kind::Request)
        .filter_map(|m| m.id.as_ref())
        .map(|id| e.body(Some(id)))
        .collect();
    if answers.is_empty() {
        return Err(e);
    }
    let mut array = b"[".to_vec();
    array.extend_from_slice(&answers.join(&b","[..]));
    array.push(b']');
    let mut reply = Reply::json(200, array, method);
    reply.reason = Some(e.reason());
    Ok(reply)
}

/// Re-mints the session id of an initialize answer for a client that declared elicitation,
/// so that later requests show the gateway it may be asked for approvals.
fn flag_elicitation(cx: &Ctx<'_>, reply: &mut Reply) {
    for (name, value) in reply.headers.iter_mut() {
        if *name == "mcp-session-id"
            && let Some(flagged) = approval::flag_session(
                &cx.cfg.sessions,
                &cx.caller.identity.id,
                cx.session_route,
                value,
            )
        {
            *value = flagged;
        }
    }
}

/// Phase 8a: `Ok(Some(reply))` when approval answers the request itself (an answer to one of
/// the gateway's elicitation requests; a held call's stream; a call that cannot be held),
/// `Ok(None)` when the request goes on to the upstream.
async fn approval_step(
    cx: &Ctx<'_>,
    body: &Body,
    raw: &[u8],
    has_session: bool,
    legacy: bool,
    method: usize,
) -> Result<Option<Reply>, GatewayError> {
    let messages = body.messages();
    let ours =
        |m: &Message| m.kind == Kind::Response && m.id.as_ref().is_some_and(approval::is_ours);
    if messages.iter().any(ours) {
        let (
            Body::Single(Message {
                id: Some(RpcId::Str(id)),
                ..
            }),
            false,
        ) = (body, legacy)
        else {
            return Err(GatewayError::InvalidRequest(
                "an answer to the gateway's approval request goes alone, on the Streamable HTTP session it was asked in".into(),
                None,
            ));
        };
        let sid = cx
            .head
            .h
            .session_id()
            .filter(|_| has_session)
            .ok_or(GatewayError::MissingSession)?;
        approval::answer(cx.w, id, &cx.caller.identity.id, sid, raw).await?;
        let mut reply = Reply::new(202, ReplyBody::Empty, method);
        reply.reason = Some("approval_answer");
        return Ok(Some(reply));
    }
    let Some(settings) = cx.cfg.approval.clone() else {
        return Ok(None);
    };
    // A client withdrawing a call it is being asked about: the held call ends as cancelled
    // and nothing goes upstream (the upstream never saw the call). Only a session that can
    // hold calls looks.
    if let Body::Single(m) = body
        && m.kind == Kind::Notification
        && m.method_str() == "notifications/cancelled"
        && !legacy
        && has_session
        && let Some(sid) = cx.head.h.session_id()
        && sid.starts_with(approval::ELICIT_SID_PREFIX)
        && let Some(call) = approval::cancelled_request(raw)
        && approval::cancel(cx.w, &cx.caller.identity.id, sid, &call).await
    {
        let mut reply = Reply::new(202, ReplyBody::Empty, method);
        reply.reason = Some("approval_cancelled");
        return Ok(Some(reply));
    }
    let Some((m, tool)) = messages.iter().find_map(|m| match &m.target {
        Some(Target::Tool(t)) if m.kind == Kind::Request && settings.tools.matches(t) => {
            Some((m, t))
        }
        _ => None,
    }) else {
        return Ok(None);
    };
    let id = m.id.clone().unwrap_or(RpcId::Num(0));
    let sid = cx.head.h.session_id();
    let record = |outcome: Outcome| {
        approval::record(
            cx.w,
            &approval::Record {
                request_id: cx.request_id,
                identity: cx.caller.identity,
                client: cx.client,
                session: sid,
                tool,
                upstream: &cx.cfg.routes[cx.route].name,
                waited: std::time::Duration::ZERO,
            },
            outcome,
        );
    };
    let refuse = |outcome: Outcome| {
        record(outcome);
        let mut reply = Reply::json(200, approval::refusal(&id, outcome), method);
        reply.reason = Some(outcome.reason());
        reply
    };
    if let Body::Batch(_) = body {
        record(Outcome::Unsupported);
        return Err(GatewayError::InvalidRequest(
            "a call that needs approval cannot be sent in a batch".into(),
            None,
        ));
    }
    let accepts_sse = cx
        .head
        .h
        .accept()
        .is_some_and(|a| a.contains("text/event-stream"));
    let sid = match sid {
        Some(s)
            if !legacy
                && has_session
                && accepts_sse
                && s.starts_with(approval::ELICIT_SID_PREFIX)
                && approval::version_can_elicit(cx.version) =>
        {
            s
        }
        _ => return Ok(Some(refuse(Outcome::Unsupported))),
    };
    if cx.head.minor_version == 0 {
        record(Outcome::Unsupported);
        let body = approval::refusal_saying(&id, Outcome::Unsupported, approval::HTTP10_MESSAGE);
        let mut reply = Reply::json(200, body, method);
        reply.reason = Some(Outcome::Unsupported.reason());
        return Ok(Some(reply));
    }
    let session = cx.session()?;
    // What the person reads must be what runs: arguments that cannot be shown faithfully are
    // refused before anyone is asked.
    let shown = held_arguments(raw)
        .ok_or("its params cannot be read whole (a member twice?)")
        .and_then(|a| approval::shown_arguments(a.as_deref().map(|a| a.get())))
        .map_err(|why| {
            record(Outcome::Unsupported);
            GatewayError::InvalidParams(
                format!("This call needs a person's approval, but {why}"),
                id.clone(),
            )
        })?;
    let held = match approval::hold(cx.w, &cx.caller.identity.id, sid, &id) {
        Ok(h) => h,
        Err(outcome) => return Ok(Some(refuse(outcome))),
    };
    let (tx, rx) = async_channel::bounded(16);
    let _ = tx.try_send(approval::request(&held.id, tool, &shown));
    let closed = crate::runtime::shutdown::LocalShutdown::new();
    let call = HeldCall {
        head: cx.head.clone(),
        request_id: cx.request_id.to_string(),
        identity: cx.caller.identity.clone(),
        client: cx.client,
        version: cx.version,
        route_name: cx.cfg.routes[cx.route].name.clone(),
        rest: cx.rest.to_string(),
        session,
        sid: sid.to_string(),
        body: body.clone(),
        raw: raw.to_vec(),
        id,
        tool: tool.clone(),
        method,
        timeout: settings.timeout,
    };
    let asked: Asked = {
        let id = call.id.clone();
        std::rc::Rc::new(move |answered: &RpcId| *answered == id)
    };
    monoio::spawn(run_held(cx.w.rc(), call, held, tx, closed.clone()));
    let mut reply = Reply::new(
        200,
        ReplyBody::Events(Box::new(EventStream {
            messages: rx,
            // The upstream's answer reaches the client through this stream: the chain
            // (redaction of the call's result) applies here.
            transform: Transform::for_request(cx.cfg, cx.route, cx.policy, Expect::of(body)),
            preamble: Vec::new(),
            guard: Some(Box::new(approval::StreamGuard(closed))),
            backlog: None,
            in_flight: None,
            asked: Some(asked),
        })),
        method,
    );
    reply
        .headers
        .push(("content-type", "text/event-stream".into()));
    reply.headers.push(("cache-control", "no-cache".into()));
    reply.reason = Some("approval_held");
    Ok(Some(reply))
}

/// `params.arguments` of a single tools/call, raw; `None` when it cannot be read (serde's
/// derived readers refuse a member twice, so a second `arguments` is never left unseen).
#[allow(clippy::option_option)]
fn held_arguments(raw: &[u8]) -> Option<Option<Box<serde_json::value::RawValue>>> {
    #[derive(serde::Deserialize)]
    struct Call {
        params: Option<Params>,
    }
    #[derive(serde::Deserialize)]
    struct Params {
        arguments: Option<Box<serde_json::value::RawValue>>,
    }
    Some(serde_json::from_slice::<Call>(raw).ok()?.params?.arguments)
}

/// A call held for approval, owned by the task that waits for the answer.
struct HeldCall {
    head: RequestHead,
    request_id: String,
    identity: crate::auth::Identity,
    client: std::net::IpAddr,
    version: &'static str,
    route_name: Arc<str>,
    rest: String,
    session: Option<Vec<u8>>,
    sid: String,
    body: Body,
    raw: Vec<u8>,
    id: RpcId,
    tool: String,
    method: usize,
    timeout: std::time::Duration,
}

/// Waits for the person's answer, then forwards the call and relays its answer to the held
/// stream, or refuses it there.
async fn run_held(
    w: Rc<Worker>,
    call: HeldCall,
    held: approval::Held,
    tx: async_channel::Sender<Vec<u8>>,
    closed: Rc<crate::runtime::shutdown::LocalShutdown>,
) {
    let started = Instant::now();
    let mut outcome = monoio::select! {
        a = held.answer.recv() => a.unwrap_or(Outcome::Cancelled),
        _ = crate::runtime::deadlines::at(Instant::now() + call.timeout) => Outcome::Timeout,
        _ = closed.wait() => Outcome::Disconnected,
    };
    approval::release(&w, &held);
    if outcome == Outcome::Timeout
        && let Ok(late) = held.answer.try_recv()
    {
        // Taken by the inbox as the timer fired: the answer was in time.
        outcome = late;
    }
    approval::record(
        &w,
        &approval::Record {
            request_id: &call.request_id,
            identity: &call.identity,
            client: call.client,
            session: Some(&call.sid),
            tool: &call.tool,
            upstream: &call.route_name,
            waited: started.elapsed(),
        },
        outcome,
    );
    if outcome != Outcome::Accepted {
        if outcome != Outcome::Disconnected {
            let _ = tx.send(approval::refusal(&call.id, outcome)).await;
        }
        return;
    }
    monoio::select! {
        _ = closed.wait() => {}
        _ = forward_held(&w, &call, &tx) => {}
    }
}

/// Phases 9 and 10 for an approved call, on the current snapshot; its answer goes to `tx`.
async fn forward_held(w: &Rc<Worker>, call: &HeldCall, tx: &async_channel::Sender<Vec<u8>>) {
    let started = Instant::now();
    let cfg = w.settings();
    let Some(route) = cfg.routes.iter().position(|r| r.name == call.route_name) else {
        let e = GatewayError::UpstreamUnavailable(format!(
            "server `{}` is no longer configured",
            call.route_name
        ));
        let _ = tx.send(e.body(Some(&call.id))).await;
        return;
    };
    let name = &cfg.routes[route].name;
    let cx = Ctx {
        w,
        cfg: &cfg,
        head: &call.head,
        request_id: &call.request_id,
        caller: Caller {
            identity: &call.identity,
            rate_key: crate::auth::RateKey::Identity(&call.identity.id),
            expires_at: None,
        },
        version: call.version,
        policy: crate::authz::policy_on(&call.identity.policy, name),
        route,
        rest: &call.rest,
        session_route: if &**name == crate::config::DEFAULT_ROUTE {
            ""
        } else {
            name
        },
        client: call.client,
        // Rate-limited when it was held.
        rated: true,
    };
    let upstream = match cx.upstream() {
        Ok(upstream) => upstream,
        Err(e) => {
            let _ = tx.send(e.body(Some(&call.id))).await;
            return;
        }
    };
    let outgoing = cx.outgoing(call.session.as_deref());
    // A call given up on at its timeout is cancelled at an HTTP upstream, as any call is.
    let cancel = || match upstream {
        UpstreamRef::Http(server) => {
            crate::upstream::http::Cancel::of(w, server, &outgoing, &call.body)
        }
        _ => None,
    };
    let answered = async {
        let raw = HeldBody::uncounted(call.raw.clone());
        let exchange = upstream.post(w, &outgoing, &call.body, raw).await?;
        let cancel = match &exchange.answer {
            Answer::Streamed(resp, _) if !resp.body_complete() => cancel(),
            _ => None,
        };
        Ok::<_, GatewayError>((deliver(&cx, exchange, call.method, None).await?, cancel))
    }
    .await;
    let failed = match answered {
        Ok((reply, cancel)) => relay_held(w, reply, &call.id, tx, cancel).await,
        Err(e) => {
            if e == GatewayError::UpstreamTimeout
                && let Some(cancel) = cancel()
            {
                cancel.send(|_| true, &e);
            }
            let _ = tx.send(e.body(Some(&call.id))).await;
            Some(e)
        }
    };
    // The call's own line was written when it was approved: a failure upstream after that is
    // audited as any call's is.
    if let Some(e) = failed
        && w.audit.enabled()
    {
        let failure = crate::audit::LateFailure {
            request_id: &call.request_id,
            identity: &call.identity.id,
            auth_method: call.identity.method.as_str(),
            client: call.client,
            upstream: &call.route_name,
            taken: started,
        };
        let tool = Target::Tool(call.tool.clone());
        w.push_audit(failure.event("tools/call", Some(&tool), &e));
    }
}

/// Writes a delivered answer's messages to a held call's stream: a JSON body as one event, an
/// SSE body event by event, up to the call's response. An answer without it (one that stops
/// short, or ends, or comes whole, without it) leaves the call the gateway's error in its
/// place, not a stream that ends unanswered; one that stopped short is cancelled (`cancel`).
/// Returns the error given in its place, if any.
async fn relay_held(
    w: &Worker,
    reply: Reply,
    id: &RpcId,
    tx: &async_channel::Sender<Vec<u8>>,
    cancel: Option<crate::upstream::http::Cancel>,
) -> Option<GatewayError> {
    let _hold = reply.hold;
    let status = reply.status;
    let mut owed = crate::mcp::owed::Owed::One(Some(id.clone()));
    let mut send = async |msg: Vec<u8>| tx.send(msg).await.is_ok();
    // Why the answer stopped short, if it did, and whether it was a stream (which may end
    // before its response, where a JSON body that came whole without it was the whole answer).
    let mut cut = None;
    let mut streamed = false;
    match reply.body {
        ReplyBody::Full(body) if legacy::is_jsonrpc(&body) => {
            owed.read(&body);
            send(body).await;
        }
        ReplyBody::Upstream(mut resp) => {
            let is_sse = resp
                .content_type
                .as_deref()
                .is_some_and(crate::http::is_event_stream);
            if is_sse && (200..300).contains(&status) {
                streamed = true;
                match legacy::relay_sse(w, *resp, &mut send, Some(&mut owed)).await {
                    legacy::SseEnd::ClientGone => return None,
                    legacy::SseEnd::Failed(e) => cut = Some(e),
                    legacy::SseEnd::Ended => {}
                }
            } else {
                match resp.read_to_end().await {
                    Ok(data) => {
                        w.pool.release(*resp);
                        if legacy::is_jsonrpc(&data) {
                            owed.read(&data);
                            send(data).await;
                        }
                    }
                    Err(e) => cut = Some(legacy::SseEnd::failure(&e)),
                }
            }
        }
        ReplyBody::Events(events) => {
            while let Ok(msg) = events.messages.recv().await {
                owed.read(&msg);
                if !send(msg).await {
                    return None;
                }
            }
        }
        _ => {}
    }
    if owed.settled() {
        return None;
    }
    let stopped_short = cut.is_some() || streamed;
    let e = match cut {
        Some(e) => e,
        None if (200..300).contains(&status) => GatewayError::UpstreamUnavailable(
            "the upstream's answer ended without a response to this request".into(),
        ),
        None => GatewayError::UpstreamUnavailable(format!(
            "upstream answered HTTP {status} without a JSON-RPC answer"
        )),
    };
    if stopped_short && let Some(cancel) = cancel {
        cancel.send(|_| true, &e);
    }
    send(e.body(Some(id))).await;
    Some(e)
}

/// Phase 7b: what pinning refuses. `block`: every request to a server with a change awaiting
/// approval; `hide`: a call of a tool whose current definition is not approved.
fn pinning_refusal(cx: &Ctx<'_>, body: &Body) -> Option<crate::authz::Denial> {
    use crate::authz::{Denial, DenyReason};
    use crate::config::schema::PinningMode;
    let (pins, settings) = (cx.cfg.pins.as_ref()?, cx.cfg.pinning.as_ref()?);
    let server = &cx.cfg.routes[cx.route].name;
    let denial = match settings.mode {
        PinningMode::Alert => None,
        PinningMode::Block => pins
            .blocked(server)
            .then(|| Denial::of("Server", server, DenyReason::ServerBlocked)),
        PinningMode::Hide => body.messages().iter().find_map(|m| match &m.target {
            Some(Target::Tool(t)) if !pins.callable(server, t) => {
                Some(Denial::of("Tool", t, DenyReason::ToolChanged))
            }
            _ => None,
        }),
    };
    if denial.is_some() {
        pins.count_refused(server);
    }
    denial
}

/// GET: the server-to-client stream. It may carry any message, a replayed tools/list answer
/// among them (`Last-Event-ID` resumes a POST's stream), so a restricted caller's streams are
/// filtered.
async fn stream(cx: &Ctx<'_>) -> Result<Reply, GatewayError> {
    if let Some(denial) = pinning_refusal(cx, &Body::Batch(Vec::new())) {
        return Err(GatewayError::Denied(denial));
    }
    let transform = Transform::for_request(cx.cfg, cx.route, cx.policy, Expect::ANY);
    let session = cx.session()?;
    let exchange = cx
        .upstream()?
        .open_stream(cx.w, &cx.outgoing(session.as_deref()))
        .await?;
    deliver(cx, exchange, M_STREAM, transform).await
}

/// GET at `server.sse_path`: a legacy session, owned by this worker, whose stream starts with
/// the `endpoint` event naming its messages URL. A restricted caller's stream is filtered.
fn legacy_stream(cx: &Ctx<'_>) -> Reply {
    let route = &cx.cfg.routes[cx.route].name;
    let opened = legacy::open(cx.w, &cx.caller.identity.id, route, cx.head);
    let mut r = Reply::new(
        200,
        ReplyBody::Events(Box::new(EventStream {
            messages: opened.messages,
            transform: Transform::for_request(cx.cfg, cx.route, cx.policy, Expect::ANY),
            preamble: opened.preamble,
            guard: Some(opened.guard),
            backlog: Some(Backlog::Local(opened.backlog)),
            in_flight: Some(opened.in_flight),
            asked: Some(opened.asked),
        })),
        M_STREAM,
    );
    r.headers.push(("content-type", "text/event-stream".into()));
    r.headers.push(("cache-control", "no-cache".into()));
    r
}

/// DELETE: ends the session upstream.
async fn delete(cx: &Ctx<'_>) -> Result<Reply, GatewayError> {
    let session = cx.session()?.ok_or(GatewayError::MissingSession)?;
    let exchange = cx
        .upstream()?
        .end_session(cx.w, &cx.outgoing(Some(&session)))
        .await?;
    let mut reply = deliver(cx, exchange, M_DELETE, None).await?;
    // Ending a session answers with a status; whatever body an upstream sends with it is not
    // MCP the client needs, and no transform (redaction, the tools filter) reads it: it is not
    // relayed.
    if !matches!(reply.body, ReplyBody::Empty) {
        reply.body = ReplyBody::Empty;
        reply
            .headers
            .retain(|(name, _)| !name.eq_ignore_ascii_case("content-type"));
    }
    if (200..300).contains(&reply.status)
        && let Some(sid) = cx.head.h.session_id()
    {
        cx.w.shared.ended_sessions.end(sid);
    }
    Ok(reply)
}

/// Phase 10 for every upstream kind: the answer becomes a reply, through the response-transform
/// chain when one applies, and a session the upstream opened is handed
/// to the client wrapped under the gateway's MAC, bound to the caller.
async fn deliver(
    cx: &Ctx<'_>,
    exchange: Exchange,
    method: usize,
    transform: Option<Transform>,
) -> Result<Reply, GatewayError> {
    let w = cx.w;
    // An upstream's own 401 is about the gateway's credentials there, never the client's:
    // relayed, its challenge would send an MCP client into OAuth discovery against the wrong
    // server. It is a gateway-side failure naming the upstream (and its body and
    // `WWW-Authenticate` go nowhere).
    let upstream_status = match &exchange.answer {
        Answer::Streamed(resp, _) => Some(resp.status),
        Answer::Complete { status, .. } => Some(*status),
        _ => None,
    };
    let mut noted = Vec::new();
    if upstream_status == Some(401) {
        let name = cx.cfg.routes[cx.route].name.clone();
        tracing::warn!(target: "mcp_guard::upstream", "upstream '{name}' answered 401: the gateway's credentials for it are missing or refused");
        return Err(GatewayError::UpstreamUnauthorized(name));
    }
    let mut reply = match exchange.answer {
        Answer::Streamed(resp, hold) => {
            let mut r = match transform {
                // No body (204, 304, a length of 0) has nothing to check, and none may be
                // written: a checked answer's chunked end would be read as the start of the
                // client's next response (red team).
                Some(t) if resp.framing != crate::http::client::RespFraming::Empty => {
                    relay_checked(w, resp, t, method).await?
                }
                _ => relay(resp, method, None),
            };
            r.hold = hold;
            r
        }
        Answer::Complete { status, body } => {
            let body = match transform {
                None => body,
                Some(mut t) => {
                    let body = match t.rewrite(&body) {
                        // Unchanged: relayed from the buffer it was read into.
                        Some(None) => body,
                        Some(Some(rewritten)) => {
                            // The upstream's bytes are done with: their buffer (often the one
                            // the response head was read into) serves a later exchange.
                            w.pool.recycle(body);
                            rewritten
                        }
                        None => {
                            return Err(GatewayError::UpstreamUnavailable(
                                "upstream answer cannot be checked (not JSON)".into(),
                            ));
                        }
                    };
                    noted = t.take_details();
                    body
                }
            };
            Reply::json(status, body, method)
        }
        Answer::Events(events, queued) => {
            let stream = EventStream {
                messages: events,
                transform,
                preamble: Vec::new(),
                guard: None,
                backlog: queued.map(Backlog::Shared),
                in_flight: None,
                asked: None,
            };
            let mut r = Reply::new(200, ReplyBody::Events(Box::new(stream)), method);
            r.headers.push(("content-type", "text/event-stream".into()));
            r.headers.push(("cache-control", "no-cache".into()));
            r
        }
        Answer::Accepted => Reply::new(202, ReplyBody::Empty, method),
        Answer::Ended => Reply::new(204, ReplyBody::Empty, method),
    };
    reply.audit.details.extend(noted);
    if let Some(s) = exchange.session {
        reply.headers.push((
            "mcp-session-id",
            cx.cfg
                .sessions
                .encode_for(&cx.caller.identity.id, cx.session_route, &s),
        ));
    }
    Ok(reply)
}

/// Phase 10, relay: status and content type go back; the body streams, through the
/// `tools/list` filter when one applies.
fn relay(resp: Box<UpstreamResponse>, method: usize, filter: Option<SseFilter>) -> Reply {
    let mut r = Reply::new(resp.status, ReplyBody::Empty, method);
    if let Some(ct) = &resp.content_type {
        r.headers.push(("content-type", ct.clone()));
        if crate::http::is_event_stream(ct) {
            r.headers.push(("cache-control", "no-cache".into()));
        }
    }
    r.body = match filter {
        Some(f) => ReplyBody::FilteredEvents(Box::new((*resp, f))),
        None => ReplyBody::Upstream(resp),
    };
    r
}

/// Phase 10 for an answer the response-transform chain must see: SSE goes through it event
/// by event as it streams; any other body is read, transformed as JSON (single message or
/// batch) and sent complete. Fail closed: a 2xx body that cannot be parsed
/// is refused (502); an error status keeps its status but loses a body nobody could check.
async fn relay_checked(
    w: &Worker,
    mut resp: Box<UpstreamResponse>,
    mut transform: Transform,
    method: usize,
) -> Result<Reply, GatewayError> {
    let is_sse = resp
        .content_type
        .as_deref()
        .is_some_and(crate::http::is_event_stream);
    if is_sse {
        return Ok(relay(resp, method, Some(SseFilter::with(transform))));
    }
    let status = resp.status;
    let data = resp.read_to_end().await.map_err(|e| {
        if e.is_timeout() {
            GatewayError::UpstreamTimeout
        } else {
            GatewayError::UpstreamUnavailable(e.to_string())
        }
    })?;
    w.pool.release(*resp);
    if data.iter().all(u8::is_ascii_whitespace) {
        return Ok(Reply::new(status, ReplyBody::Empty, method));
    }
    match transform.rewrite(&data) {
        Some(changed) => {
            let body = match changed {
                // Unchanged: relayed from the buffer it was read into (which the reply's
                // writer then keeps for a later exchange).
                None => data,
                Some(rewritten) => {
                    w.pool.recycle(data);
                    rewritten
                }
            };
            let mut reply = Reply::json(status, body, method);
            reply.audit.details = transform.take_details();
            Ok(reply)
        }
        None if (200..300).contains(&status) => Err(GatewayError::UpstreamUnavailable(
            "upstream answer cannot be checked".into(),
        )),
        None => Ok(Reply::new(status, ReplyBody::Empty, method)),
    }
}

#[cfg(debug_assertions)]
mod test_hooks {
    //! Debug builds only: `MCP_GUARD_TEST_PANIC_TOOL=<name>` makes a call of that tool panic, so
    //! tests can prove a panicking request is contained (no panic is known to be reachable).
    use crate::mcp::jsonrpc::{Body, Target};
    use std::sync::OnceLock;

    pub(super) fn maybe_panic(body: &Body) {
        static TOOL: OnceLock<Option<String>> = OnceLock::new();
        let Some(tool) = TOOL.get_or_init(|| std::env::var("MCP_GUARD_TEST_PANIC_TOOL").ok())
        else {
            return;
        };
        if body
            .messages()
            .iter()
            .any(|m| matches!(&m.target, Some(Target::Tool(t)) if t == tool))
        {
            panic!("test hook: a call of `{tool}` panics");
        }
    }
}
