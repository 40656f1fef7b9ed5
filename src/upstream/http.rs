//! A Streamable HTTP upstream: which headers go upstream (only what the transport needs, the
//! upstream's own credentials from config, never the client's), the deadline for the answer
//! (the whole of it, not only its start), the cancellation of a request given up on, and error
//! accounting (a replica's failures count towards its ejection). Which replica is
//! `balance.rs`'s; the bytes on the wire and the per-worker keep-alive pool are
//! `http::client`'s.

use super::balance::{HttpServer, Target};
use super::{Answer, Exchange, Outgoing};
use crate::error::GatewayError;
use crate::http::body::HeldBody;
use crate::http::client;
use crate::mcp::jsonrpc::{Body, Kind, RpcId};
use crate::runtime::worker::Worker;
use std::sync::atomic::Ordering;

/// How long a cancellation has to be taken: it is sent after the request's own time ran out,
/// and nobody waits for it.
const CANCEL_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A `notifications/cancelled` for a request the gateway gave up on, ready to go to the
/// replica that has the request. The MCP lifecycle: a sender whose request timed out SHOULD
/// cancel it, so the server stops work nobody will read (`initialize` excepted, which MUST
/// NOT be cancelled).
pub struct Cancel {
    worker: std::rc::Rc<Worker>,
    addrs: Vec<std::net::SocketAddr>,
    /// The request's head, all but its length, which the notifications sent decide.
    head: Vec<u8>,
    /// Each request's id, once, with its JSON text.
    notes: Vec<(RpcId, String)>,
    /// One notification alone for a single request; an array for a batch.
    batch: bool,
    owner: u64,
    /// The server (route) it goes to.
    server: std::sync::Arc<str>,
}

impl Cancel {
    /// The cancellation of the requests `body` sent to `server` (`initialize` never is): one
    /// notification for a single request, one batch of them, each id once, for a batch (the
    /// session speaks a version with batches, or the client's batch was refused), so a batch
    /// of many requests costs the upstream one request more, not one each. `None` when there
    /// is nothing to cancel, or no upstream session to cancel it in: without one, an id names
    /// no request of this client's in particular (another tenant's calls may use it too).
    pub fn of(w: &Worker, server: &HttpServer, out: &Outgoing<'_>, body: &Body) -> Option<Cancel> {
        let mut ids: std::collections::HashSet<&RpcId, foldhash::fast::RandomState> =
            Default::default();
        let mut notes: Vec<(RpcId, String)> = Vec::new();
        for m in body.messages() {
            if m.kind == Kind::Request
                && m.method_str() != "initialize"
                && let Some(id) = &m.id
                && ids.insert(id)
            {
                notes.push((id.clone(), id.to_json()));
            }
        }
        if notes.is_empty() {
            return None;
        }
        let (request, target) = prepare(server, out, "POST", b"", Some(CANCELLED)).ok()?;
        target.session?;
        Some(Cancel {
            worker: w.rc(),
            addrs: server.replicas()[target.replica].endpoint.addrs.clone(),
            head: client::request_head(request)?,
            notes,
            batch: matches!(body, Body::Batch(_)),
            owner: w.pool.owner_of(out.binding),
            server: out.server.clone(),
        })
    }

    /// Sends the cancellation of the requests `still_owed` keeps, if any, given up on for
    /// `why`, on the worker's runtime, without waiting: its answer (202, or an error) says
    /// nothing the client could use, and a server that has stopped listening loses nothing.
    pub fn send(self, still_owed: impl Fn(&RpcId) -> bool, why: &GatewayError) {
        let reason = match why {
            GatewayError::UpstreamTimeout => "the gateway's timeout for this request ran out",
            GatewayError::ShuttingDown => "the gateway is shutting down",
            _ => "the gateway gave up on this request: its answer broke off",
        };
        let notes: Vec<String> = self
            .notes
            .iter()
            .filter(|(id, _)| still_owed(id))
            .map(|(_, id)| {
                format!(
                    r#"{{"jsonrpc":"2.0","method":"notifications/cancelled","params":{{"requestId":{id},"reason":"{reason}"}}}}"#
                )
            })
            .collect();
        let body = match notes.as_slice() {
            [] => return,
            [one] if !self.batch => one.clone(),
            _ => format!("[{}]", notes.join(",")),
        };
        let Cancel {
            worker,
            addrs,
            head,
            owner,
            server,
            ..
        } = self;
        let request = client::finish_request(head, body.as_bytes());
        let on_its_way = NoticeOnItsWay::new(&worker);
        monoio::spawn(async move {
            let _on_its_way = on_its_way;
            let Ok(_turn) =
                crate::runtime::deadlines::timeout(CANCEL_WAIT, worker.notice_turn(&server)).await
            else {
                tracing::debug!(target: "mcp_guard::upstream", "a cancellation found no turn to be sent in time");
                return;
            };
            let send = super::connections::send_request(
                &worker.pool,
                &addrs,
                "POST",
                request,
                None,
                owner,
            );
            match crate::runtime::deadlines::timeout(CANCEL_WAIT, send).await {
                Ok(Ok(mut resp)) => {
                    resp.set_deadline(std::time::Instant::now() + CANCEL_WAIT);
                    if resp.discard_body(NOTIFICATION_ANSWER).await.is_ok() {
                        worker.pool.release(resp);
                    }
                }
                Ok(Err(e)) => {
                    tracing::debug!(target: "mcp_guard::upstream", "a cancellation was not taken: {e}");
                }
                Err(_) => {
                    tracing::debug!(target: "mcp_guard::upstream", "a cancellation was not answered in time");
                }
            }
        });
    }
}

/// Counts a notice of the gateway's own on its way upstream, for as long as it lives (see
/// [`Worker::upstream_notices`]).
pub struct NoticeOnItsWay(std::rc::Rc<Worker>);

impl NoticeOnItsWay {
    /// Counted from now.
    pub fn new(w: &std::rc::Rc<Worker>) -> Self {
        w.upstream_notices.set(w.upstream_notices.get() + 1);
        Self(w.clone())
    }
}

impl Drop for NoticeOnItsWay {
    fn drop(&mut self) {
        let n = &self.0.upstream_notices;
        n.set(n.get() - 1);
    }
}

/// The most of an answer to a notification of the gateway's own read (and dropped) before its
/// connection is let go instead (a 202 has none; an error a few hundred bytes).
pub const NOTIFICATION_ANSWER: usize = 64 * 1024;

/// The notification's method, as its `Mcp-Method` header names it.
const CANCELLED: &str = "notifications/cancelled";

/// The request for `method` with `body`, to the replica the client's session is pinned to.
/// `mcp_method`: the `Mcp-Method` header in place of the client's (a request of the gateway's
/// own); the client's is forwarded otherwise, on a POST, as it was checked against the body.
fn prepare<'o>(
    server: &HttpServer,
    out: &Outgoing<'o>,
    method: &str,
    body: &[u8],
    mcp_method: Option<&str>,
) -> Result<(Vec<u8>, Target<'o>), GatewayError> {
    let target = server.target(out.server, out.session)?;
    let replica = &server.replicas()[target.replica];
    let (up, ep) = (&server.settings, &replica.endpoint);
    let h = &out.head.h;
    let session = target.session.map(String::from_utf8_lossy);
    let mut headers: Vec<(&str, &str)> = Vec::with_capacity(12 + up.headers.len());
    if method == "POST" {
        headers.push(("content-type", "application/json"));
        // Named exactly as the transport requires of a client, whatever wildcard form the
        // client's own Accept took (it was checked to allow both).
        headers.push(("accept", "application/json, text/event-stream"));
    } else if method == "GET" {
        headers.push(("accept", "text/event-stream"));
    }
    if let Some(s) = &session {
        headers.push(("mcp-session-id", s));
    }
    // Mcp-Method and Mcp-Name were checked against the body of a POST; on GET and DELETE
    // there is no body to check them against, so they are not forwarded. A request of the
    // gateway's own names its method where the client's named one (the header is part of the
    // protocol version the session speaks) and no tool.
    let client_post = method == "POST" && mcp_method.is_none();
    let own_method = mcp_method.filter(|_| h.mcp_method().is_some());
    for (name, v) in [
        ("mcp-protocol-version", h.protocol_version()),
        (
            "mcp-method",
            own_method.or(h.mcp_method().filter(|_| client_post)),
        ),
        ("mcp-name", h.mcp_name().filter(|_| client_post)),
        ("last-event-id", h.last_event_id()),
        ("traceparent", h.traceparent.as_deref()),
        ("tracestate", h.tracestate.as_deref()),
        ("user-agent", h.user_agent()),
    ] {
        if let Some(v) = v {
            headers.push((name, v));
        }
    }
    headers.push(("x-request-id", out.request_id));
    for (n, v) in &up.headers {
        headers.push((n, v));
    }
    // The client's query string is not forwarded: it is ours to read (and may carry a
    // credential, `?api_key=`), and the upstream's endpoint is the configured URL.
    // A `strip_prefix` route forwards the remainder below its endpoint under the upstream's
    // path, and before the configured URL's own query, if it has one.
    let path: std::borrow::Cow<'_, str> = if out.path_rest.is_empty() {
        ep.path.as_str().into()
    } else {
        let (base, query) = ep.path.split_at(ep.path.find('?').unwrap_or(ep.path.len()));
        format!("{}{}{query}", base.trim_end_matches('/'), out.path_rest).into()
    };
    let request = client::build_request(method, &path, &ep.host_header, &headers, body);
    Ok((request, target))
}

/// Sends one request and returns the response, its body still to be relayed.
pub async fn exchange(
    w: &Worker,
    server: &HttpServer,
    out: &Outgoing<'_>,
    method: &str,
    body: Option<HeldBody>,
) -> Result<Exchange, GatewayError> {
    let (request, target) = prepare(
        server,
        out,
        method,
        body.as_deref().unwrap_or_default(),
        None,
    )?;
    let replica = &server.replicas()[target.replica];
    let ep = &replica.endpoint;
    // The client's body is in the request now: it goes, and its share of the worker's body
    // allowance counts the request instead until the request is written upstream.
    let mut share = body.and_then(|body| body.into_parts().1);
    if let Some(share) = &mut share {
        share.grow_to(request.len())?;
    }
    let in_flight = server.begin(target.replica);
    let started = crate::runtime::clock::now();
    // Pinned where it is made, and the timeout given a reference: a future of a kilobyte is
    // otherwise copied into the timeout and then into this one's state.
    let send = std::pin::pin!(super::connections::send_request(
        &w.pool,
        &ep.addrs,
        method,
        request,
        share,
        w.pool.owner_of(out.binding),
    ));
    match crate::runtime::deadlines::timeout(out.timeout, send).await {
        Ok(Ok(mut resp)) => {
            replica.state.succeeded();
            // The call's timeout covers its whole answer, not only the head: read whole, or
            // relayed as it streams, progress or not (the MCP lifecycle's maximum timeout). A
            // GET stream is not a call: it lasts while its client stays.
            if method != "GET" {
                resp.set_deadline(started + out.timeout);
                // Time spent on a slow client is not counted, up to the timeout once more:
                // an answer lasts at most twice its timeout, whoever is slow.
                resp.allow_postponement(out.timeout);
            }
            let session = resp
                .session_id
                .take()
                .map(|sid| server.pin(&target, sid.as_bytes()));
            Ok(Exchange {
                answer: Answer::Streamed(Box::new(resp), in_flight),
                session,
            })
        }
        Ok(Err(e)) => {
            w.metrics.upstream_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(target: "mcp_guard::upstream", "upstream {} failed: {e}", ep.url);
            if server.is_balanced() && replica.state.failed() {
                tracing::warn!(
                    target: "mcp_guard::upstream",
                    "server {}: replica {} ejected after {} consecutive failures",
                    out.server, ep.url, super::balance::EJECT_AFTER
                );
            }
            Err(GatewayError::UpstreamUnavailable(e.to_string()))
        }
        Err(_) => {
            w.metrics.upstream_errors.fetch_add(1, Ordering::Relaxed);
            Err(GatewayError::UpstreamTimeout)
        }
    }
}
