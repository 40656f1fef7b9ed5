//! Reaching MCP servers, every kind behind one interface. The pipeline decides (who may call
//! what) and hands the checked message to an [`UpstreamRef`]: post a message, open the
//! server-to-client stream, end a session. Every kind answers with one [`Exchange`]; session
//! wrapping and response transforms (the `tools/list` filter) then run once, in the pipeline,
//! whatever the kind.
//!
//! Kinds: `http` (Streamable HTTP: the per-worker pool and retry policy in `connections.rs`, the
//! wire in `http::client`; replicas balanced, pinned and health-checked in `balance.rs`, probed
//! in `health.rs`), `stdio` (a supervised child: supervision in `stdio.rs`, message routing in
//! the pure `router.rs` that every kind multiplexing sessions over one link reuses, a child per
//! session in `pool.rs`) and `sse` (a legacy HTTP+SSE server, driven by the same hub as a
//! child: the link in `sse.rs`). The legacy SSE *client* side is `mcp::legacy`.

pub mod balance;
pub mod connections;
pub mod events;
pub mod health;
pub mod http;
pub mod pool;
pub mod router;
pub mod set;
pub mod sse;
pub mod stdio;

use crate::error::GatewayError;
use crate::http::body::HeldBody;
use crate::http::client::UpstreamResponse;
use crate::http::request::RequestHead;
use crate::mcp::jsonrpc::Body;
use crate::runtime::worker::Worker;
use balance::{HttpServer, InFlight};
use std::time::Duration;
use stdio::StdioHub;

/// One upstream, borrowed for the length of a request.
#[derive(Clone, Copy)]
pub enum UpstreamRef<'u> {
    /// A Streamable HTTP server (one endpoint, or balanced replicas).
    Http(&'u HttpServer),
    /// The shared stdio child.
    Stdio(&'u StdioHub),
    /// A stdio child per session.
    StdioPool(&'u pool::StdioPool),
}

/// What an upstream needs to know about a request besides its body, all already checked.
pub struct Outgoing<'a> {
    /// The client's request head (transport headers are forwarded from it, credentials never).
    pub head: &'a RequestHead,
    /// The gateway's id for the request (`x-request-id` upstream, and in the audit).
    pub request_id: &'a str,
    /// The identity sessions are bound to.
    pub binding: &'a str,
    /// The route's name (`default` for `[upstream]`), for errors that name the server.
    pub server: &'a std::sync::Arc<str>,
    /// The verified session payload the client presented: the upstream's own session id
    /// (HTTP) or the hub's session key (stdio). `None` for an initialize.
    pub session: Option<&'a [u8]>,
    /// How long the upstream has for its whole answer (not a GET stream's).
    pub timeout: Duration,
    /// Fires when the shutdown grace runs out: an answer still awaited is given up then.
    pub grace_over: &'a std::rc::Rc<crate::runtime::shutdown::LocalShutdown>,
    /// The client path's remainder below the route's endpoint (`strip_prefix` routes only):
    /// appended to an HTTP upstream's path.
    pub path_rest: &'a str,
}

/// An upstream's answer, before the gateway's transforms.
pub enum Answer {
    /// An HTTP response whose body is relayed as it arrives (JSON or SSE), and the request's
    /// count against its replica, held until the reply is written. Boxed: the answer, and the
    /// reply it becomes, are moved through every layer of the request's futures, and a
    /// pointer is cheaper to move each time than the response's 272 bytes.
    Streamed(Box<UpstreamResponse>, Option<InFlight>),
    /// A complete JSON body.
    Complete {
        /// HTTP status to answer with.
        status: u16,
        /// The JSON (one message or a batch array).
        body: Vec<u8>,
    },
    /// Server-to-client messages (one JSON message each), as SSE events until it closes, and
    /// the count of queued bytes the reader keeps when it takes one.
    Events(async_channel::Receiver<Vec<u8>>, Option<events::Queued>),
    /// Taken (a notification or a client response): 202, no body.
    Accepted,
    /// The session was ended: 204.
    Ended,
}

/// An [`Answer`] and the session the client is to be handed, if the upstream opened one.
pub struct Exchange {
    /// The answer.
    pub answer: Answer,
    /// The upstream's session id (or hub key), to be wrapped under the gateway's MAC.
    pub session: Option<Vec<u8>>,
}

impl Exchange {
    fn of(answer: Answer) -> Self {
        Self {
            answer,
            session: None,
        }
    }
}

impl UpstreamRef<'_> {
    /// Posts a checked body (one message or a batch).
    pub async fn post(
        self,
        w: &Worker,
        out: &Outgoing<'_>,
        body: &Body,
        raw: HeldBody,
    ) -> Result<Exchange, GatewayError> {
        match self {
            UpstreamRef::Http(up) => http::exchange(w, up, out, "POST", Some(raw)).await,
            UpstreamRef::Stdio(_) if !out.path_rest.is_empty() => Err(GatewayError::NotFound),
            UpstreamRef::Stdio(hub) => hub.post(out, body, raw).await,
            UpstreamRef::StdioPool(_) if !out.path_rest.is_empty() => Err(GatewayError::NotFound),
            UpstreamRef::StdioPool(pool) => pool.post(out, body, raw).await,
        }
    }

    /// Opens the server-to-client stream (GET).
    pub async fn open_stream(
        self,
        w: &Worker,
        out: &Outgoing<'_>,
    ) -> Result<Exchange, GatewayError> {
        match self {
            UpstreamRef::Http(up) => http::exchange(w, up, out, "GET", None).await,
            UpstreamRef::Stdio(_) if !out.path_rest.is_empty() => Err(GatewayError::NotFound),
            UpstreamRef::Stdio(hub) => hub.stream(out).await,
            UpstreamRef::StdioPool(_) if !out.path_rest.is_empty() => Err(GatewayError::NotFound),
            UpstreamRef::StdioPool(pool) => pool.stream(out).await,
        }
    }

    /// Ends the client's session (DELETE).
    pub async fn end_session(
        self,
        w: &Worker,
        out: &Outgoing<'_>,
    ) -> Result<Exchange, GatewayError> {
        match self {
            UpstreamRef::Http(up) => http::exchange(w, up, out, "DELETE", None).await,
            UpstreamRef::Stdio(_) if !out.path_rest.is_empty() => Err(GatewayError::NotFound),
            UpstreamRef::Stdio(hub) => hub.end(out).await,
            UpstreamRef::StdioPool(_) if !out.path_rest.is_empty() => Err(GatewayError::NotFound),
            UpstreamRef::StdioPool(pool) => pool.end(out).await,
        }
    }
}
