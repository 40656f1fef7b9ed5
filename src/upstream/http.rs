//! A Streamable HTTP upstream: which headers go upstream (only what the transport needs, the
//! upstream's own credentials from config, never the client's), the deadline for the answer
//! (the whole of it, not only its start), and error accounting (a replica's failures count towards its ejection). Which
//! replica is `balance.rs`'s; the bytes on the wire and the per-worker keep-alive pool are
//! `http::client`'s.

use super::balance::HttpServer;
use super::{Answer, Exchange, Outgoing};
use crate::error::GatewayError;
use crate::http::body::HeldBody;
use crate::http::client;
use crate::runtime::worker::Worker;
use std::sync::atomic::Ordering;

/// Sends one request and returns the response, its body still to be relayed.
pub async fn exchange(
    w: &Worker,
    server: &HttpServer,
    out: &Outgoing<'_>,
    method: &str,
    body: Option<HeldBody>,
) -> Result<Exchange, GatewayError> {
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
    // there is no body to check them against, so they are not forwarded.
    let post = method == "POST";
    for (name, v) in [
        ("mcp-protocol-version", h.protocol_version()),
        ("mcp-method", h.mcp_method().filter(|_| post)),
        ("mcp-name", h.mcp_name().filter(|_| post)),
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
    // A `strip_prefix` route forwards the remainder below its endpoint under the upstream's path.
    let path: std::borrow::Cow<'_, str> = if out.path_rest.is_empty() {
        ep.path.as_str().into()
    } else {
        format!("{}{}", ep.path.trim_end_matches('/'), out.path_rest).into()
    };
    let request = client::build_request(
        method,
        &path,
        &ep.host_header,
        &headers,
        body.as_deref().unwrap_or_default(),
    );
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
