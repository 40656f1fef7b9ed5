//! The client-facing HTTP/1.1 connection loop: read a head within its deadline, read the body
//! (Content-Length or chunked, within limits), run the pipeline, write the reply (streamed
//! where it streams), count it, and go round again while keep-alive allows.

use crate::config::Settings;
use crate::error::GatewayError;
use crate::http::body::{BodyReservation, HeldBody};
use crate::http::chunked::{ChunkError, ChunkedDecoder};
use crate::http::client::RespFraming;
use crate::http::io::read_append;
use crate::http::request::{BodyFraming, HeadError, HeadParse, RequestHead, parse_head};
use crate::http::response::{Framing, LAST_CHUNK, write_chunk, write_head};
use crate::observe::metrics::M_NONE;
use crate::observe::trace::Phase;
use crate::pipeline::{self, Reply, ReplyBody};
use crate::runtime::worker::Worker;
use crate::tls::Peer;
use monoio::buf::SliceMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, CancelableAsyncReadRent};
use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// How often an idle SSE stream gets a comment line, so intermediaries keep it open.
const SSE_KEEPALIVE: Duration = Duration::from_secs(15);

#[allow(clippy::large_enum_variant)] // see `HeadParse`
enum HeadOutcome {
    Head(RequestHead),
    /// No byte of a next request came within the hold (this long): the connection is idle.
    Quiet(Duration),
    Closed,
    Error(GatewayError),
}

/// Serves one client connection until it closes, errs, or the worker shuts down. `client`:
/// over TLS, the client authentication of the handshake, checked again before every request.
///
/// A connection alternates between two states. Idle (new, or quiet for [`IDLE_BUFFER_HOLD`]
/// after its last request) it holds no buffer and only the small state of a readiness wait,
/// so ten thousand idle keep-alive connections cost little memory. Once bytes arrive it is
/// served in a boxed burst ([`serve_burst`]) that holds the request pipeline's large state
/// machine and the connection's buffers, allocated once per burst rather than per request,
/// until the connection goes quiet again.
pub async fn serve<S: Connection>(
    w: Rc<Worker>,
    mut stream: S,
    addr: SocketAddr,
    client: Option<Box<crate::tls::client::ClientAuth>>,
) {
    let mut conn = ConnState {
        buf: Vec::new(),
        out: Vec::new(),
        client,
    };
    // A new connection gets `header_timeout` for its first byte, not the keep-alive idle
    // allowance: silent sockets would otherwise hold connection slots (and `max_connections`)
    // for two minutes each.
    let mut wait = {
        let s = &w.settings().server;
        s.header_timeout.min(s.idle_timeout)
    };
    loop {
        match idle_wait(&w, &mut stream, wait).await {
            Idle::Data(b) => conn.buf = b,
            Idle::Closed => return,
        }
        match Box::pin(serve_burst(&w, &mut stream, addr, &mut conn)).await {
            Burst::Quiet { waited } => {
                // Nothing is kept while idle: the next burst allocates afresh.
                conn.buf = Vec::new();
                conn.out = Vec::new();
                wait = w.settings().server.idle_timeout.saturating_sub(waited);
            }
            Burst::Closed => return,
        }
    }
}

/// What a connection keeps between its bursts.
struct ConnState {
    /// Bytes read and not yet consumed (the start of the next request).
    buf: Vec<u8>,
    /// The reply buffer, reused across the requests of a burst.
    out: Vec<u8>,
    /// Boxed: a plain connection's idle task then carries a pointer, not the whole record.
    client: Option<Box<crate::tls::client::ClientAuth>>,
}

/// How a burst of requests ended.
enum Burst {
    /// No byte of a next request within `waited` of the last reply: the connection is idle.
    Quiet {
        waited: Duration,
    },
    Closed,
}

/// Serves requests while they keep coming: from a connection's first buffered bytes until it
/// closes or stays quiet for [`IDLE_BUFFER_HOLD`].
async fn serve_burst<S: Connection>(
    w: &Rc<Worker>,
    stream: &mut S,
    addr: SocketAddr,
    conn: &mut ConnState,
) -> Burst {
    // One canceller for the burst's between-request reads: its set of operations is allocated
    // once, not per request.
    let mut canceller = monoio::io::Canceller::new();
    loop {
        let mut head =
            match read_head(w, stream, &mut conn.buf, &w.settings(), &mut canceller).await {
                HeadOutcome::Head(h) => h,
                HeadOutcome::Quiet(waited) => return Burst::Quiet { waited },
                HeadOutcome::Closed => return Burst::Closed,
                HeadOutcome::Error(e) => {
                    let peer = Peer::of(addr, conn.client.as_deref());
                    let out = std::mem::take(&mut conn.out);
                    Box::pin(refuse_head(w, stream, e, peer, out)).await;
                    return Burst::Closed;
                }
            };
        // The snapshot is taken once the head has arrived, not before the idle wait: a reload
        // that revokes a key applies to the very next request of every open connection.
        let cfg = w.settings();
        // What the handshake decided about the client certificate holds only while the
        // certificate is valid and the CAs that verified it are still trusted.
        let mut last_request = false;
        if let Some(c) = conn.client.as_mut() {
            let verifier = cfg
                .server
                .tls
                .as_ref()
                .and_then(|t| t.client_verifier.as_ref());
            match c.recheck(verifier, unix_now()) {
                crate::tls::client::Recheck::Serve => {}
                crate::tls::client::Recheck::Close => return Burst::Closed,
                // Refused through the mTLS provider (401, audited with the reason), and the
                // connection ends with that reply. Without the provider nothing would refuse
                // the request, so the connection ends now.
                crate::tls::client::Recheck::Refused if cfg.auth.mtls.is_none() => {
                    return Burst::Closed;
                }
                crate::tls::client::Recheck::Refused => last_request = true,
            }
        }
        let peer = Peer::of(addr, conn.client.as_deref());
        let out = std::mem::take(&mut conn.out);
        // The head stays here and is lent: moved in, rustc would keep it twice in the request's
        // future (as the argument and as the local it becomes), 456 bytes more to build and move.
        let served = serve_request(w, stream, &mut conn.buf, out, &cfg, &mut head, peer).await;
        match served {
            Some(o) if !last_request => conn.out = o,
            _ => return Burst::Closed,
        }
        // A large body grew the buffers: give that memory back rather than keep it per
        // connection.
        if conn.out.capacity() > MAX_KEPT_BUFFER {
            conn.out = Vec::new();
        }
        if conn.buf.is_empty() && conn.buf.capacity() > MAX_KEPT_BUFFER {
            conn.buf = Vec::new();
        }
    }
}

/// Now, in Unix seconds.
fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The worker-local handle on a config snapshot (see `Worker::settings`).
#[allow(clippy::redundant_allocation)]
type Snapshot = Rc<Arc<Settings>>;

/// One request after its head: admission on the head, then body, pipeline, reply. `None`
/// ends the connection.
/// Answers a head that could not be read (malformed, too large, too slow) and ends the
/// connection. A function of its own, boxed by its caller, so the connection task does not
/// carry the reply's state while it waits for the next head.
async fn refuse_head<S: Connection>(
    w: &Rc<Worker>,
    stream: &mut S,
    e: GatewayError,
    peer: Peer<'_>,
    out: Vec<u8>,
) {
    let reply = Reply::error(&e, None, M_NONE);
    let meta = ReqMeta {
        request_id: w.next_request_id(),
        client_request_id: None,
        peer,
        trace_id: None,
        trace: None,
        started: Instant::now(),
        wall: SystemTime::now(),
        stream_auth: None,
    };
    let _ = write_reply(w, stream, reply, false, &meta, out).await;
}

async fn serve_request<S: Connection>(
    w: &Rc<Worker>,
    stream: &mut S,
    buf: &mut Vec<u8>,
    out: Vec<u8>,
    snapshot: &Snapshot,
    head: &mut RequestHead,
    peer: Peer<'_>,
) -> Option<Vec<u8>> {
    let cfg: &Settings = snapshot;
    let started = crate::runtime::clock::now();
    let wall = SystemTime::now();
    // The request's trace context; from here on the head's trace headers are the ones the
    // upstream is sent (the gateway's span as parent, or nothing that failed validation).
    let trace = crate::observe::trace::begin(
        &cfg.tracing,
        &mut head.h.traceparent,
        &mut head.h.tracestate,
        started,
        wall,
    );
    let head: &RequestHead = head;
    buf.drain(..head.head_len);
    // The audit trail's request id is always ours; a client's `X-Request-Id` is recorded beside
    // it (when printable and short), never instead of it.
    let client_request_id = head
        .h
        .request_id()
        .filter(|r| r.len() <= 128 && r.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string);
    let meta = ReqMeta {
        trace_id: match &trace {
            Some(t) if w.audit.enabled() => Some(t.trace_id_hex()),
            _ => head.h.traceparent.as_deref().and_then(trace_id),
        },
        trace,
        request_id: w.next_request_id(),
        client_request_id,
        peer,
        started,
        wall,
        stream_auth: Some(StreamAuth {
            head,
            opened_with: RefCell::new(snapshot.clone()),
            expires_at: std::cell::Cell::new(None),
        }),
    };
    // A token's identity lives here for the request (an API key's is in the snapshot).
    let slot = crate::auth::IdentitySlot::new();
    let mut admission = pipeline::admit(w, cfg, head, peer, &slot);
    // Authentication that waits for an identity provider: once, bounded, then admission runs
    // again and finds what it waited for (or refuses).
    if let pipeline::Admission::Pending(waiting) = admission {
        waiting.settle(w).await;
        admission = match pipeline::admit(w, cfg, head, peer, &slot) {
            pipeline::Admission::Pending(still) => {
                pipeline::Admission::Answered(Box::new(still.refuse(w)))
            }
            other => other,
        };
    }
    meta.mark(Phase::Admit);
    let admitted = match admission {
        // Not after the wait above; were it ever, refusing and closing is always safe.
        pipeline::Admission::Pending(still) => {
            return write_reply(w, stream, still.refuse(w), false, &meta, out).await;
        }
        pipeline::Admission::Admitted(a) => {
            if let Some(auth) = &meta.stream_auth {
                auth.expires_at.set(a.expires_at());
            }
            // A POST naming its method in `Mcp-Method` spends its quota before its body is read.
            match pipeline::rate_on_head(w, cfg, head, a).await {
                Ok(a) => Ok(a),
                Err(reply) => return answer_unread(w, stream, buf, head, reply, &meta, out).await,
            }
        }
        pipeline::Admission::OAuth(endpoint) => Err(endpoint),
        pipeline::Admission::Answered(reply) => {
            return answer_unread(w, stream, buf, head, *reply, &meta, out).await;
        }
    };
    let body = match read_body(w, stream, buf, head, cfg).await {
        Ok(b) => {
            meta.mark(Phase::Body);
            b
        }
        Err(None) => return None,
        Err(Some(e)) => {
            let mut reply = Reply::error(&e, None, M_NONE);
            reply.close = true;
            let _ = write_reply(w, stream, reply, false, &meta, out).await;
            return None;
        }
    };
    // The body moves into the pipeline, which lets it go (and its share of the worker's body
    // allowance) once it has been handed upstream, not when the answer comes.
    let request_id = &meta.request_id;
    let handled = async move {
        match admitted {
            Ok(a) => pipeline::handle(w, cfg, head, body, a, request_id).await,
            Err(endpoint) => crate::facade::serve(cfg, head, &body, endpoint, peer.addr).await,
        }
    };
    let reply = match CatchPanic(handled).await {
        Ok(r) => r,
        Err(what) => {
            // The safety net: a bug in one request must not take the worker (and every
            // connection on it) down. Nothing has been written yet, so the client gets a 500.
            w.metrics
                .panics
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(target: "mcp_guard::runtime", "request {} panicked: {what}; answered 500", meta.request_id);
            let mut r = Reply::json(
                500,
                crate::http::response::jsonrpc_error(
                    None,
                    crate::error::code::INTERNAL_ERROR,
                    "Internal error",
                    None,
                ),
                M_NONE,
            );
            r.close = true;
            r.reason = Some("internal_error");
            r
        }
    };
    meta.mark(Phase::Handle);
    write_reply(w, stream, reply, head.keep_alive, &meta, out).await
}

/// Polls a future, turning a panic inside it into `Err(message)`.
pub struct CatchPanic<F>(pub F);

impl<F: std::future::Future> std::future::Future for CatchPanic<F> {
    type Output = Result<F::Output, String>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        // SAFETY: structural pin projection; `CatchPanic` never moves its field and has no
        // Drop impl, so the inner future stays pinned where it is.
        #[allow(unsafe_code)]
        let inner = unsafe { self.map_unchecked_mut(|s| &mut s.0) };
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(std::task::Poll::Ready(v)) => std::task::Poll::Ready(Ok(v)),
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Err(payload) => std::task::Poll::Ready(Err(panic_message(payload.as_ref()))),
        }
    }
}

/// The text of a panic payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into())
}

/// How long an idle keep-alive connection keeps its read buffer before giving it back and
/// waiting for readability without one.
const IDLE_BUFFER_HOLD: Duration = Duration::from_millis(500);
/// Read buffer size for a new request head.
const HEAD_READ: usize = 4096;
/// Buffers larger than this are released after the request that grew them.
const MAX_KEPT_BUFFER: usize = 64 * 1024;

/// A client connection: readable with owned buffers (cancellable), writable, and able to wait
/// for readability without holding a buffer.
pub trait Connection: AsyncReadRent + AsyncWriteRent + CancelableAsyncReadRent {
    /// Completes when data (or EOF) is ready to read. Holds no buffer, and loses nothing when
    /// dropped before it completes.
    fn wait_readable(&mut self) -> impl std::future::Future<Output = std::io::Result<()>>;

    /// The TCP socket under the connection (see [`unacknowledged`]).
    fn socket(&self) -> std::os::fd::RawFd;
}

impl Connection for monoio::net::TcpStream {
    fn wait_readable(&mut self) -> impl std::future::Future<Output = std::io::Result<()>> {
        self.readable(false)
    }

    fn socket(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(self)
    }
}

impl Connection for crate::tls::TlsStream {
    fn wait_readable(&mut self) -> impl std::future::Future<Output = std::io::Result<()>> {
        crate::tls::TlsStream::wait_readable(self)
    }

    fn socket(&self) -> std::os::fd::RawFd {
        self.tcp_fd()
    }
}

/// Bytes written to a TCP socket that its peer has not acknowledged yet (sent or still queued:
/// `SIOCOUTQ`); `None` where the kernel does not say.
fn unacknowledged(socket: std::os::fd::RawFd) -> Option<u32> {
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int through the pointer, which points at a local
    // int; on a descriptor that is not a TCP socket it fails and writes nothing.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::ioctl(socket, libc::TIOCOUTQ, &mut queued) };
    (rc == 0).then(|| u32::try_from(queued).ok()).flatten()
}

enum Idle {
    /// Bytes arrived in the buffer.
    Data(Vec<u8>),
    /// EOF, error, idle timeout or shutdown.
    Closed,
}

/// Waits, holding no buffer, up to `wait` for the first bytes of an idle connection's next
/// request (or a new connection's first).
async fn idle_wait<S: Connection>(w: &Rc<Worker>, stream: &mut S, wait: Duration) -> Idle {
    if wait.is_zero() || w.shutdown.is_fired() {
        return Idle::Closed;
    }
    // The worker's shared deadlines, not a timer of its own: see `runtime::deadlines`.
    let ready = monoio::select! {
        r = stream.wait_readable() => r,
        _ = crate::runtime::deadlines::at(crate::runtime::clock::now() + wait) => return Idle::Closed,
        _ = w.shutdown.wait() => return Idle::Closed,
    };
    if ready.is_err() {
        return Idle::Closed;
    }
    let (res, buf) = read_append(stream, Vec::new(), HEAD_READ).await;
    match res {
        Ok(n) if n > 0 => Idle::Data(buf),
        _ => Idle::Closed,
    }
}

/// Waits up to `hold` for the next request of a busy keep-alive connection with a read
/// posted (no extra operation between its requests). `None`: nothing came, and the read was
/// cancelled without losing bytes that raced the cancel. `buf`: the connection's emptied
/// read buffer, reused rather than a new one allocated per request.
async fn hold_wait<S: Connection>(
    w: &Rc<Worker>,
    stream: &mut S,
    hold: Duration,
    canceller: &mut monoio::io::Canceller,
    mut buf: Vec<u8>,
) -> Option<Idle> {
    buf.clear();
    if buf.capacity() < HEAD_READ {
        buf.reserve_exact(HEAD_READ);
    }
    let read = stream.cancelable_read(SliceMut::new(buf, 0, HEAD_READ), canceller.handle());
    let mut read = std::pin::pin!(read);
    let early = monoio::select! {
        r = &mut read => Some(r),
        _ = crate::runtime::deadlines::at(crate::runtime::clock::now() + hold) => None,
        _ = w.shutdown.wait() => return Some(Idle::Closed),
    };
    let (res, slice) = match early {
        Some(r) => r,
        None => {
            // A cancelled canceller stays cancelled; the fresh one it returns (same set) serves
            // the connection's next reads should bytes have raced the cancel.
            *canceller = std::mem::take(canceller).cancel();
            read.await
        }
    };
    let buf = slice.into_inner();
    match res {
        Ok(0) => Some(Idle::Closed),
        Ok(_) => Some(Idle::Data(buf)),
        Err(e) if e.raw_os_error() == Some(libc::ECANCELED) => None,
        Err(_) if !buf.is_empty() => Some(Idle::Data(buf)),
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => None,
        Err(_) => Some(Idle::Closed),
    }
}

async fn read_head<S: Connection>(
    w: &Rc<Worker>,
    stream: &mut S,
    buf: &mut Vec<u8>,
    cfg: &crate::config::Settings,
    canceller: &mut monoio::io::Canceller,
) -> HeadOutcome {
    let s = &cfg.server;
    let mut deadline = (!buf.is_empty()).then(|| crate::runtime::clock::now() + s.header_timeout);
    loop {
        if !buf.is_empty() {
            match parse_head(buf, s.max_header_bytes, s.max_body_bytes as u64) {
                Ok(HeadParse::Complete(h)) => return HeadOutcome::Head(h),
                Ok(HeadParse::Incomplete) => {}
                Err(e) => return HeadOutcome::Error(GatewayError::Head(e)),
            }
        }
        let Some(d) = deadline else {
            // Between requests: nothing of the next one yet.
            if w.shutdown.is_fired() {
                return HeadOutcome::Closed;
            }
            let hold = IDLE_BUFFER_HOLD.min(s.idle_timeout);
            let start = crate::runtime::clock::now();
            match hold_wait(w, stream, hold, canceller, std::mem::take(buf)).await {
                None => return HeadOutcome::Quiet(start.elapsed()),
                Some(Idle::Closed) => return HeadOutcome::Closed,
                Some(Idle::Data(b)) => {
                    *buf = b;
                    deadline = Some(crate::runtime::clock::now() + s.header_timeout);
                    continue;
                }
            }
        };
        let left = d.saturating_duration_since(crate::runtime::clock::now());
        if left.is_zero() {
            return HeadOutcome::Error(GatewayError::HeaderTimeout);
        }
        let b = std::mem::take(buf);
        match crate::runtime::deadlines::timeout(left, read_append(stream, b, HEAD_READ)).await {
            Err(_elapsed) => return HeadOutcome::Error(GatewayError::HeaderTimeout),
            Ok((Ok(0), _)) | Ok((Err(_), _)) => return HeadOutcome::Closed,
            Ok((Ok(_), b)) => {
                *buf = b;
                if buf.len() > s.max_header_bytes + HEAD_READ
                    && matches!(
                        parse_head(buf, s.max_header_bytes, s.max_body_bytes as u64),
                        Ok(HeadParse::Incomplete)
                    )
                {
                    return HeadOutcome::Error(GatewayError::Head(HeadError::TooLarge));
                }
            }
        }
    }
}

/// Reads the body of an admitted request: `100 Continue` first when asked for, the whole body
/// within `body_timeout` of the head (each read also within the idle timeout), and never more
/// than the worker's in-flight cap. `Err(None)` means the client went away (nothing to answer).
async fn read_body<S: Connection>(
    w: &Rc<Worker>,
    stream: &mut S,
    buf: &mut Vec<u8>,
    head: &RequestHead,
    cfg: &crate::config::Settings,
) -> Result<HeldBody, Option<GatewayError>> {
    let mut reservation = BodyReservation::new(w, cfg.server.max_body_bytes);
    if head.body == BodyFraming::None {
        return Ok(HeldBody::new(Vec::new(), reservation));
    }
    if let BodyFraming::Length(n) = head.body {
        // The whole declared length is reserved before a byte of it is invited.
        reservation.grow_to(n as usize).map_err(Some)?;
    }
    if head.expect_continue && buf.is_empty() {
        let (res, _) = write_bounded(w, stream, b"HTTP/1.1 100 Continue\r\n\r\n".to_vec()).await;
        res.map_err(|_| None)?;
    }
    let deadline = crate::runtime::clock::now() + cfg.server.body_timeout;
    let idle = cfg.server.idle_timeout;
    // One read of more body bytes, bounded by the idle timeout and the body deadline.
    async fn read_more<S: AsyncReadRent>(
        stream: &mut S,
        buf: &mut Vec<u8>,
        want: usize,
        idle: Duration,
        deadline: Instant,
    ) -> Result<(), Option<GatewayError>> {
        let left = deadline.saturating_duration_since(crate::runtime::clock::now());
        if left.is_zero() {
            return Err(Some(GatewayError::BodyTimeout));
        }
        let b = std::mem::take(buf);
        match crate::runtime::deadlines::timeout(idle.min(left), read_append(stream, b, want)).await
        {
            Ok((Ok(0), _)) | Ok((Err(_), _)) => Err(None),
            Ok((Ok(_), b)) => {
                *buf = b;
                Ok(())
            }
            Err(_) if crate::runtime::clock::now() >= deadline => {
                Err(Some(GatewayError::BodyTimeout))
            }
            Err(_) => Err(None),
        }
    }
    match head.body {
        BodyFraming::None => unreachable!("handled above"),
        BodyFraming::Length(n) => {
            // Read straight into a buffer of the declared size (what came with the head
            // first): the connection's own buffer never grows to hold the body, so a request
            // that waits on its upstream holds nothing but the body, and the body only until
            // it is handed on.
            let n = n as usize;
            let mut bytes = Vec::with_capacity(n);
            let have = buf.len().min(n);
            bytes.extend_from_slice(&buf[..have]);
            buf.drain(..have);
            while bytes.len() < n {
                let want = n - bytes.len();
                read_more(stream, &mut bytes, want, idle, deadline).await?;
            }
            if bytes.len() > n {
                // The allocator gave more room than asked and a pipelined request's first
                // bytes came with the body's last: they are the next head's.
                buf.extend_from_slice(&bytes[n..]);
                bytes.truncate(n);
            }
            Ok(HeldBody::new(bytes, reservation))
        }
        BodyFraming::Chunked => {
            let mut decoder = ChunkedDecoder::new(cfg.server.max_body_bytes as u64);
            let mut body = Vec::new();
            loop {
                let used = decoder.decode(buf, &mut body).map_err(|e| {
                    Some(match e {
                        ChunkError::Invalid => GatewayError::BadBody,
                        ChunkError::TooLarge => GatewayError::BodyTooLarge,
                    })
                })?;
                buf.drain(..used);
                reservation.grow_to(body.len()).map_err(Some)?;
                if buf.capacity() > MAX_KEPT_BUFFER && buf.len() <= MAX_KEPT_BUFFER {
                    // A large read of chunk data is decoded: its buffer is not kept for the
                    // rest of the request.
                    buf.shrink_to(MAX_KEPT_BUFFER);
                }
                if decoder.is_done() {
                    return Ok(HeldBody::new(body, reservation));
                }
                read_more(stream, buf, 8192, idle, deadline).await?;
            }
        }
    }
}

/// What a long response needs to notice that a reload revoked the credentials it was opened
/// with: the request head and the snapshot it was admitted under.
struct StreamAuth<'a> {
    head: &'a RequestHead,
    opened_with: RefCell<Snapshot>,
    /// When the credential it was opened with expires (a token's `exp`).
    expires_at: std::cell::Cell<Option<u64>>,
}

impl StreamAuth<'_> {
    /// Whether the caller that opened the response is still who these credentials name. Only
    /// a changed snapshot costs anything: both snapshots authenticate the same head, and the
    /// response goes on only if the same identity results.
    fn still_valid(&self, w: &Worker, peer: Peer<'_>) -> bool {
        // A token that has expired ends what it opened, reload or not.
        if let Some(exp) = self.expires_at.get() {
            let now_unix = SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            if now_unix >= exp {
                return false;
            }
        }
        // So does a client certificate that has expired.
        if peer.client.is_some_and(|c| c.expired(unix_now())) {
            return false;
        }
        let now = w.settings();
        if Rc::ptr_eq(&now, &self.opened_with.borrow()) {
            return true;
        }
        // A reload: the certificate must still verify with the client verifier it brought.
        let verifier = now
            .server
            .tls
            .as_ref()
            .and_then(|t| t.client_verifier.as_ref());
        if peer
            .client
            .is_some_and(|c| !c.still_admitted(verifier, unix_now()))
        {
            return false;
        }
        let id = |s: &Settings| {
            let slot = crate::auth::IdentitySlot::new();
            s.auth
                .authenticate_peer(self.head, peer, &slot, &w.tokens)
                .ok()
                .map(|c| c.identity.id.clone())
        };
        // Now: the same caller, and still allowed on this path's server.
        let path = self.head.path();
        let slot = crate::auth::IdentitySlot::new();
        let still = now
            .auth
            .authenticate_peer(self.head, peer, &slot, &w.tokens)
            .ok()
            .filter(|c| {
                now.route_for(path)
                    .is_some_and(|(i, _)| c.identity.policy.may_reach(&now.routes[i].name))
            })
            .map(|c| c.identity.id.clone());
        let before = id(&self.opened_with.borrow());
        let same = before.is_some() && before == still;
        if same {
            *self.opened_with.borrow_mut() = now;
        }
        same
    }
}

/// Whether the credentials this request was admitted with no longer name the same caller.
fn revoked(w: &Worker, meta: &ReqMeta<'_>) -> bool {
    meta.stream_auth
        .as_ref()
        .is_some_and(|a| !a.still_valid(w, meta.peer))
}

/// What the connection knows about a request, for the reply and its audit event.
struct ReqMeta<'a> {
    /// Set for requests that went through admission: lets long responses end on revocation.
    stream_auth: Option<StreamAuth<'a>>,
    request_id: String,
    /// The client's own `X-Request-Id`, recorded beside ours in the audit trail.
    client_request_id: Option<String>,
    peer: Peer<'a>,
    trace_id: Option<String>,
    /// With tracing on: the request's span.
    trace: Option<crate::observe::trace::RequestTrace>,
    started: Instant,
    wall: SystemTime,
}

impl ReqMeta<'_> {
    fn mark(&self, phase: Phase) {
        if let Some(t) = self.trace.as_ref().filter(|t| t.sampled) {
            t.mark(phase);
        }
    }
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), if well formed.
fn trace_id(tp: &str) -> Option<String> {
    let mut parts = tp.split('-');
    let (_version, trace) = (parts.next()?, parts.next()?);
    (trace.len() == 32 && trace.bytes().all(|b| b.is_ascii_hexdigit()) && trace != "0".repeat(32))
        .then(|| trace.to_ascii_lowercase())
}

/// Answers a request refused before its body was read. A body already wholly received is
/// skipped and the connection kept; one still on its way closes the connection (reading it
/// only to throw it away would spend what refusing on the head saves, and a client that never
/// sends it would hold the connection).
async fn answer_unread<S: Connection>(
    w: &Rc<Worker>,
    stream: &mut S,
    buf: &mut Vec<u8>,
    head: &RequestHead,
    mut reply: Reply,
    meta: &ReqMeta<'_>,
    out: Vec<u8>,
) -> Option<Vec<u8>> {
    match head.body {
        BodyFraming::None => {}
        BodyFraming::Length(n) if buf.len() as u64 >= n => {
            buf.drain(..n as usize);
        }
        _ => reply.close = true,
    }
    write_reply(w, stream, reply, head.keep_alive, meta, out).await
}

/// Writes the reply; returns the output buffer when the connection may serve another request.
async fn write_reply<S: Connection>(
    w: &Rc<Worker>,
    stream: &mut S,
    mut reply: Reply,
    client_keep_alive: bool,
    meta: &ReqMeta<'_>,
    mut out: Vec<u8>,
) -> Option<Vec<u8>> {
    // What the client was answered: an upstream answer given up on before any of it went out
    // is answered with the error's status instead (see `body_refused`).
    let mut status = reply.status;
    let method = reply.method;
    let keep_alive = client_keep_alive && !reply.close && !w.shutdown.is_fired();
    let mut headers: Vec<(&str, &str)> = reply
        .headers
        .iter()
        .map(|(n, v)| (*n, v.as_str()))
        .collect();
    headers.push(("x-request-id", &meta.request_id));
    out.clear();
    let mut streamed = false;
    let kept = match reply.body {
        ReplyBody::Empty => {
            write_head(&mut out, status, &headers, Framing::Length(0), keep_alive);
            let (res, o) = write_bounded(w, stream, out).await;
            out = o;
            res.is_ok() && keep_alive
        }
        ReplyBody::Full(body) => {
            write_head(
                &mut out,
                status,
                &headers,
                Framing::Length(body.len() as u64),
                keep_alive,
            );
            // A large body goes out from its own buffer after the head, rather than copied
            // behind it: one copy of the reply held while a slow client reads it, not two.
            let res = if body.len() > LARGE_BODY {
                let (res, o) = write_bounded(w, stream, out).await;
                out = o;
                match res {
                    Ok(()) => write_bounded(w, stream, body).await.0,
                    Err(e) => Err(e),
                }
            } else {
                out.extend_from_slice(&body);
                // Often the buffer an upstream's answer was read into: it serves the next
                // exchange's response head instead of being freed.
                w.pool.recycle(body);
                let (res, o) = write_bounded(w, stream, out).await;
                out = o;
                res
            };
            res.is_ok() && keep_alive
        }
        ReplyBody::Upstream(resp) => {
            // A call's SSE answer is chunked to the client whatever its upstream framing, so
            // that the gateway can end it at the response, or with an error event of its own
            // (red team: one of a declared length was relayed as it came, past its response).
            let events = reply.call.as_ref().is_some_and(|c| c.events);
            let framing = match resp.framing {
                RespFraming::Empty => Framing::Length(0),
                RespFraming::Length(n) if !events => Framing::Length(n),
                RespFraming::Length(_) | RespFraming::Chunked | RespFraming::Close => {
                    Framing::Chunked
                }
            };
            streamed = framing == Framing::Chunked;
            write_head(&mut out, status, &headers, framing, keep_alive);
            let end = StreamEnd {
                call: reply.call.take(),
                reason: &mut reply.reason,
                status: &mut status,
                answered: &mut reply.audit.answered,
            };
            let (ok, o) = pump(w, stream, *resp, &mut None, framing, meta, out, end).await;
            out = o;
            ok && keep_alive
        }
        ReplyBody::FilteredEvents(boxed) => {
            let (resp, filter) = *boxed;
            // Rewritten events change length: always chunked to the client.
            streamed = true;
            write_head(&mut out, status, &headers, Framing::Chunked, keep_alive);
            let mut filter = Some(filter);
            let end = StreamEnd {
                call: reply.call.take(),
                reason: &mut reply.reason,
                status: &mut status,
                answered: &mut reply.audit.answered,
            };
            let (ok, o) = pump(
                w,
                stream,
                resp,
                &mut filter,
                Framing::Chunked,
                meta,
                out,
                end,
            )
            .await;
            out = o;
            if let Some(f) = filter.as_mut() {
                reply.audit.details.extend(f.transform_mut().take_details());
            }
            ok && keep_alive
        }
        ReplyBody::Events(events) => {
            streamed = true;
            write_head(&mut out, status, &headers, Framing::Chunked, false);
            if !events.preamble.is_empty() {
                write_chunk(&mut out, &events.preamble);
            }
            let (res, o) = write_bounded(w, stream, out).await;
            out = o;
            if res.is_ok() {
                let mut transform = events.transform;
                let source = EventSource {
                    messages: events.messages,
                    backlog: events.backlog,
                    in_flight: events.in_flight,
                    asked: events.asked,
                    call: reply
                        .call
                        .take()
                        .filter(|c| c.events && c.batch.is_none())
                        .map(|c| c.id),
                };
                relay_events(w, stream, source, &mut transform, meta, &mut out).await;
                if let Some(t) = transform.as_mut() {
                    reply.audit.details.extend(t.take_details());
                }
            }
            // The stream has ended: whatever lived as long as it (a legacy session) ends now.
            drop(events.guard);
            false
        }
    };
    let latency = meta.started.elapsed();
    w.record(method, status, if streamed { None } else { Some(latency) });
    if let (Some(t), Some(tracer)) = (meta.trace.as_ref(), w.shared.tracer.as_ref())
        && t.sampled
        // A caller's own "sampled" flag counts once the caller is known: a client that cannot
        // authenticate does not choose which of its refusals are exported.
        && (t.sampled_by_rate || reply.audit.identity.is_some())
        && !reply.audit.skip
    {
        tracer.push(finish_span(t, &reply.audit, status, method, meta));
    }
    if !reply.audit.skip && w.audit.enabled() {
        emit_audit(w, reply.audit, reply.reason, status, method, meta, latency);
    }
    kept.then_some(out)
}

/// How a relayed stream ends when the gateway gives up on it.
struct StreamEnd<'r> {
    /// The requests it answers, if known (see `Reply::call`).
    call: Option<Box<crate::pipeline::StreamedCall>>,
    /// The reply's audit reason, set when the gateway gives up.
    reason: &'r mut Option<&'static str>,
    /// The reply's status, as metrics and the audit record it.
    status: &'r mut u16,
    /// See [`crate::pipeline::AuditInfo::answered`].
    answered: &'r mut Option<Vec<bool>>,
}

impl StreamEnd<'_> {
    /// The answer given up on, for `err`: the audit notes why, the requests still unanswered
    /// are cancelled upstream, and when the stream stands between events (and is chunked),
    /// it gets the error in place of each of them as its last events and a proper end,
    /// returned to be written: the client learns why at once, rather than waiting for answers
    /// that will not come. `owed`: what the relayed events left unanswered, where they were
    /// read. `None`: the stream is to be cut (mid-event, an event of ours would be read as
    /// the rest of the upstream's; a batch's stream whose events were not all read, as which
    /// of its requests were answered is not known).
    fn give_up(
        &mut self,
        err: &GatewayError,
        framing: Framing,
        tail: Option<&EventTail>,
        owed: Option<&Owed>,
    ) -> Option<Vec<u8>> {
        *self.reason = Some(err.reason());
        let call = self.call.as_mut()?;
        let unanswered: Vec<RpcId> = match owed {
            Some(owed) => {
                if owed.is_batch() {
                    *self.answered = Some(owed.still_owed().into_iter().map(|o| !o).collect());
                }
                owed.unanswered()
            }
            None if call.batch.is_some() => {
                if let Some(cancel) = call.cancel.take() {
                    cancel.send(|_| true, err);
                }
                return None;
            }
            None => vec![call.id.clone()],
        };
        if let Some(cancel) = call.cancel.take() {
            // A set: a batch may hold a body's worth of requests (red team: a list here made
            // a 40,000-request batch's timeout cost the worker a second).
            let owed: std::collections::HashSet<&RpcId, foldhash::fast::RandomState> =
                unanswered.iter().collect();
            cancel.send(|id| owed.contains(id), err);
        }
        if !call.events
            || unanswered.is_empty()
            || framing != Framing::Chunked
            || !tail.is_some_and(EventTail::at_boundary)
        {
            return None;
        }
        let mut end = Vec::with_capacity(160 * unanswered.len() + 16);
        for id in &unanswered {
            write_chunk(&mut end, &message_event(&err.body(Some(id))));
        }
        end.extend_from_slice(LAST_CHUNK);
        Some(end)
    }
}

/// Relays an upstream body to the client piece by piece (through `filter` when given); returns
/// whether the whole body went out (or, for a call's SSE stream whose time ran out, was ended
/// with the call's timeout error), and the buffer.
#[allow(clippy::too_many_arguments)]
async fn pump<S: Connection>(
    w: &Rc<Worker>,
    stream: &mut S,
    mut resp: crate::http::client::UpstreamResponse,
    filter: &mut Option<crate::mcp::filter::SseFilter>,
    framing: Framing,
    meta: &ReqMeta<'_>,
    mut out: Vec<u8>,
    mut end: StreamEnd<'_>,
) -> (bool, Vec<u8>) {
    // A small body of a declared length (a JSON answer) goes out with its head in one write:
    // a write per piece read would cost a submission and a wake-up of the client each.
    if filter.is_none()
        && let RespFraming::Length(n) = resp.framing
        && framing == Framing::Length(n)
        && n <= LARGE_BODY as u64
    {
        let (read, o) = resp.append_declared_body(out).await;
        out = o;
        let ok = match read {
            // Revoked on the way: nothing of the response goes out.
            Ok(()) if revoked(w, meta) => {
                out.clear();
                false
            }
            Ok(()) => {
                let (res, o) = write_bounded(w, stream, out).await;
                out = o;
                res.is_ok()
            }
            // Nothing has gone to the client yet: it gets a whole error reply (504 when the
            // call's time ran out, else 502) rather than a cut one.
            Err(e) => {
                let timed_out = e.is_timeout();
                let err = if timed_out {
                    GatewayError::UpstreamTimeout
                } else {
                    GatewayError::UpstreamUnavailable("upstream answer cut short".into())
                };
                *end.reason = Some(err.reason());
                let refused = body_refused(w, stream, meta, e, err, end.call.as_deref_mut()).await;
                (*end.status, out) = refused;
                false
            }
        };
        w.pool.release(resp);
        return (ok, out);
    }
    // The head goes out before the first wait on the upstream, unless body bytes came with it:
    // a client whose answer streams learns at once that it has begun (an SSE answer may stay
    // silent for as long as its call runs), and one that came whole keeps its single write.
    if !out.is_empty() && !resp.body_buffered() {
        let writing = Instant::now();
        let (res, o) = write_bounded(w, stream, out).await;
        resp.postpone_deadline(writing.elapsed());
        out = o;
        if res.is_err() {
            w.pool.release(resp);
            return (false, out);
        }
    }
    let ok;
    // Where the relayed events stand, kept only when a timeout error may end the stream.
    let mut tail = end
        .call
        .as_ref()
        .is_some_and(|c| c.events)
        .then(EventTail::default);
    // A call's SSE stream ends with its response (a batch's, with its last), whatever the
    // upstream does after it.
    let mut watch = end
        .call
        .as_ref()
        .filter(|c| c.events && framing == Framing::Chunked)
        .map(|c| AnswerWatch::new(owed_by(c)));
    loop {
        // While the upstream is silent the client is watched. It sends nothing while it reads
        // an answer, so its connection turning readable means it has gone (EOF) or broken the
        // protocol: the relay ends then, with the upstream's connection, rather than holding
        // both (and a connection slot) until the upstream next writes, which a silent upstream
        // never does. Biased: a piece already buffered is taken without arming the watch.
        // The shutdown grace running out ends it too, as it ends a call still waiting (503):
        // a single call's stream with that error as its last event.
        let next = monoio::select! {
            biased;
            next = resp.next_data() => Ok(next),
            _ = stream.wait_readable() => Err(false),
            _ = w.grace_over.wait() => Err(true),
        };
        let next = match next {
            Ok(next) => next,
            Err(grace_over) => {
                ok = false;
                if !grace_over {
                    tracing::debug!(target: "mcp_guard::upstream", "client left (or sent bytes) while its answer streamed; relay ended");
                } else if let Some(last) = end.give_up(
                    &GatewayError::ShuttingDown,
                    framing,
                    tail.as_ref(),
                    watch.as_ref().map(|wt| &wt.owed),
                ) {
                    out.extend_from_slice(&last);
                    out = write_bounded(w, stream, out).await.1;
                }
                break;
            }
        };
        match next {
            Ok(Some(_)) if revoked(w, meta) => {
                // A reload revoked the credentials this response was opened with: it ends
                // here (the connection closes, nothing more is relayed).
                ok = false;
                break;
            }
            Ok(Some(data)) => {
                let mut data = match filter.as_mut() {
                    None => data,
                    Some(f) => match f.push(&data) {
                        Ok(d) => d,
                        Err(e) => {
                            tracing::warn!(target: "mcp_guard::filter", "{e}");
                            let refused = GatewayError::UpstreamUnavailable(format!(
                                "upstream answer cannot be checked: {e}"
                            ));
                            let last = end.give_up(
                                &refused,
                                framing,
                                tail.as_ref(),
                                watch.as_ref().map(|wt| &wt.owed),
                            );
                            let ended = last.is_some();
                            out.extend_from_slice(&last.unwrap_or_default());
                            let (res, o) = write_bounded(w, stream, out).await;
                            out = o;
                            ok = ended && res.is_ok();
                            break;
                        }
                    },
                };
                let answered = match watch.as_mut().map(|wt| wt.push(&data)) {
                    Some(Watched::Answered { after }) => {
                        // Nothing the upstream sent after the response reaches the client.
                        data.truncate(data.len() - after);
                        true
                    }
                    Some(Watched::TooLarge) => {
                        watch = None;
                        false
                    }
                    Some(Watched::Waiting) | None => false,
                };
                if let Some(t) = tail.as_mut() {
                    t.push(&data);
                }
                if framing == Framing::Chunked {
                    write_chunk(&mut out, &data);
                } else {
                    out.extend_from_slice(&data);
                }
                if answered {
                    // The response goes out at once; the stream's end waits for the upstream's
                    // for a moment, so that a stream about to end leaves its connection in the
                    // pool before the client, seeing the end, sends its next call.
                    let (mut res, o) = write_bounded(w, stream, out).await;
                    out = o;
                    if res.is_ok() {
                        drain_after_answer(&mut resp).await;
                        out.extend_from_slice(LAST_CHUNK);
                        (res, out) = write_bounded(w, stream, out).await;
                    }
                    ok = res.is_ok();
                    break;
                }
            }
            Ok(None) => {
                if let Some(f) = filter.as_mut() {
                    write_chunk(&mut out, &f.finish());
                }
                if framing == Framing::Chunked {
                    out.extend_from_slice(LAST_CHUNK);
                }
                ok = if out.is_empty() {
                    true
                } else {
                    let (res, o) = write_bounded(w, stream, out).await;
                    out = o;
                    res.is_ok()
                };
                break;
            }
            Err(e) => {
                let timed_out = e.is_timeout();
                // A stream the upstream broke (closed early, bad framing) is cut, never ended
                // for it: a client may resume it from its last event id. One whose time ran
                // out is the gateway's to end.
                if timed_out
                    && let Some(last) = end.give_up(
                        &GatewayError::UpstreamTimeout,
                        framing,
                        tail.as_ref(),
                        watch.as_ref().map(|wt| &wt.owed),
                    )
                {
                    w.metrics
                        .upstream_errors
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(target: "mcp_guard::upstream", "upstream answer not complete within the call's timeout: its SSE stream ended with the timeout error");
                    out.extend_from_slice(&last);
                    let (res, o) = write_bounded(w, stream, out).await;
                    out = o;
                    ok = res.is_ok();
                    break;
                }
                // The audit records the cut (red team: it read `allow` with no reason).
                *end.reason = Some(if timed_out {
                    GatewayError::UpstreamTimeout.reason()
                } else {
                    "upstream_unavailable"
                });
                out = body_failed(w, stream, out, e).await;
                ok = false;
                break;
            }
        }
        // Flush each piece as it arrives: SSE events must not wait for the next one.
        if out.is_empty() {
            continue;
        }
        let writing = Instant::now();
        let (res, o) = write_bounded(w, stream, out).await;
        resp.postpone_deadline(writing.elapsed());
        out = o;
        if res.is_err() {
            ok = false;
            break;
        }
    }
    w.pool.release(resp);
    (ok, out)
}

/// How long an upstream's SSE stream may still run after the call's response before its
/// connection is let go rather than kept for the next call. The upstream normally ends it with
/// the response (the same write, or the next): this only saves the connection of one that ends
/// it a moment later.
const ANSWER_LINGER: Duration = Duration::from_millis(100);

/// What an upstream may still send after the call's response, read and dropped, before its
/// connection is let go.
const ANSWER_LINGER_BYTES: usize = 64 * 1024;

/// The largest event [`AnswerWatch`] holds to read. A response larger than this is relayed
/// unrecognised, and its stream ends when its upstream ends it (at the latest, at the call's
/// deadline), as a stream did before the watch.
const WATCHED_EVENT: usize = 1024 * 1024;

/// Reads a call's relayed SSE stream, event by event, for the call's response (a batch's, for
/// each of its requests'): MCP says the server SHOULD close the stream once the response is
/// sent (all of them, for a batch), and the gateway is the server its client sees. An upstream
/// that keeps its stream open after answering would otherwise hold the client (and the
/// connection slot) until the call's deadline, which then added a timeout error after the
/// answer and cancelled a request already answered. Where the time runs out first, what it
/// read says which requests get an error in their place and a cancellation.
struct AnswerWatch {
    owed: Owed,
    splitter: crate::http::sse::SseSplitter,
}

/// What [`AnswerWatch::push`] found.
enum Watched {
    /// The last response ended `after` bytes before the end of the data pushed; the watch is
    /// over.
    Answered { after: usize },
    /// Not yet.
    Waiting,
    /// An event too large to hold, or one past the splitter's bounds: the watch is given up.
    TooLarge,
}

impl AnswerWatch {
    fn new(owed: Owed) -> Self {
        Self {
            owed,
            splitter: Default::default(),
        }
    }

    /// Feeds the bytes relayed to the client (after any response step, so what is recognised
    /// is what the client reads).
    fn push(&mut self, data: &[u8]) -> Watched {
        let owed = &mut self.owed;
        let found = self.splitter.push_until(data, |event| {
            if let Some(data) = crate::http::sse::message_data(event) {
                owed.read(&data);
            }
            owed.settled()
        });
        match found {
            Ok(Some(after)) => Watched::Answered { after },
            Ok(None) if self.splitter.held() <= WATCHED_EVENT => Watched::Waiting,
            _ => Watched::TooLarge,
        }
    }
}

use crate::mcp::jsonrpc::RpcId;
use crate::mcp::owed::Owed;

/// What a call's relayed answer owes: its one request's response, or each of a batch's.
fn owed_by(call: &crate::pipeline::StreamedCall) -> Owed {
    match &call.batch {
        None => Owed::One(Some(call.id.clone())),
        Some(more) => Owed::batch(std::iter::once(&call.id).chain(more).cloned()),
    }
}

/// After a call's response has gone out: what the upstream still sends is read and dropped,
/// for a moment, so that a stream about to end leaves its connection to the pool. One still
/// running then is let go with its connection.
pub(crate) async fn drain_after_answer(resp: &mut crate::http::client::UpstreamResponse) {
    if resp.framing == RespFraming::Close {
        // Ended only by closing: never reused.
        return;
    }
    resp.shorten_deadline(Instant::now() + ANSWER_LINGER);
    let mut dropped = 0usize;
    while let Ok(Some(data)) = resp.next_data().await {
        dropped += data.len();
        if dropped > ANSWER_LINGER_BYTES {
            break;
        }
    }
    if !resp.is_done() {
        tracing::debug!(target: "mcp_guard::upstream", "upstream kept the call's SSE stream open after its response; the stream was ended for the client and the upstream connection let go");
    }
}

/// One JSON-RPC message as an SSE `message` event (each of its lines a `data:` line).
fn message_event(msg: &[u8]) -> Vec<u8> {
    let mut event = Vec::new();
    crate::http::sse::push_event(&mut event, Some("message"), msg);
    event
}

/// The last bytes of a relayed SSE stream, enough to tell whether it stands between events
/// (after an empty line, or before anything), where an event of the gateway's can be added.
#[derive(Default)]
struct EventTail {
    last: [u8; 4],
    seen: usize,
}

impl EventTail {
    fn push(&mut self, data: &[u8]) {
        for &b in data.iter().rev().take(4).rev() {
            self.last.rotate_left(1);
            self.last[3] = b;
        }
        self.seen = self.seen.saturating_add(data.len());
    }

    /// Whether the stream's bytes end with an empty line (or there are none): a line ending
    /// (CRLF, LF or CR) right after another.
    fn at_boundary(&self) -> bool {
        let tail = &self.last[4 - self.seen.min(4)..];
        if self.seen <= 4 && tail.iter().all(|b| matches!(b, b'\r' | b'\n')) {
            // Nothing yet but line endings: still before the first event.
            return true;
        }
        let before = if tail.ends_with(b"\r\n") {
            &tail[..tail.len() - 2]
        } else if tail.ends_with(b"\n") || tail.ends_with(b"\r") {
            &tail[..tail.len() - 1]
        } else {
            return false;
        };
        before.ends_with(b"\n") || before.ends_with(b"\r")
    }
}

/// An upstream body that failed part-way: counted and logged, and what arrived goes out. The
/// caller then closes the connection: short of the declared length, or without the final
/// chunk, which is how the client learns the body is incomplete.
async fn body_failed<S: Connection>(
    w: &Rc<Worker>,
    stream: &mut S,
    out: Vec<u8>,
    e: crate::http::client::UpstreamError,
) -> Vec<u8> {
    w.metrics
        .upstream_errors
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::warn!(target: "mcp_guard::upstream", "upstream body failed: {e}");
    write_bounded(w, stream, out).await.1
}

/// An upstream answer read whole that did not arrive whole (cut short, or past the call's
/// timeout), before any of it went to the client: counted and logged, and the client gets
/// `err`'s reply instead (the connection then closes).
async fn body_refused<S: Connection>(
    w: &Rc<Worker>,
    stream: &mut S,
    meta: &ReqMeta<'_>,
    e: crate::http::client::UpstreamError,
    err: GatewayError,
    call: Option<&mut crate::pipeline::StreamedCall>,
) -> (u16, Vec<u8>) {
    w.metrics
        .upstream_errors
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::warn!(target: "mcp_guard::upstream", "upstream body failed: {e}");
    // Nothing of the answer reached the client: a timed-out one's requests are cancelled
    // (one the upstream cut short is not: it has stopped answering, if not working).
    let call = call.map(|c| {
        if err == GatewayError::UpstreamTimeout
            && let Some(cancel) = c.cancel.take()
        {
            cancel.send(|_| true, &err);
        }
        &*c
    });
    // A batch is answered as a batch: the error in place of each of its requests.
    let (status, body) = match call {
        Some(c) if let Some(more) = &c.batch => {
            let answers: Vec<Vec<u8>> = std::iter::once(&c.id)
                .chain(more)
                .map(|id| err.body(Some(id)))
                .collect();
            let mut array = b"[".to_vec();
            array.extend_from_slice(&answers.join(&b","[..]));
            array.push(b']');
            (200, array)
        }
        _ => (err.status(), err.body(call.map(|c| &c.id))),
    };
    let mut out = Vec::with_capacity(256 + body.len());
    write_head(
        &mut out,
        status,
        &[
            ("content-type", "application/json"),
            ("x-request-id", &meta.request_id),
        ],
        Framing::Length(body.len() as u64),
        false,
    );
    out.extend_from_slice(&body);
    (status, write_bounded(w, stream, out).await.1)
}

/// The span of a finished request: names and outcomes only.
fn finish_span(
    t: &crate::observe::trace::RequestTrace,
    info: &crate::pipeline::AuditInfo,
    status: u16,
    method: usize,
    meta: &ReqMeta<'_>,
) -> crate::observe::trace::SpanRecord {
    let head = meta.stream_auth.as_ref().map(|a| a.head);
    t.finish(crate::observe::trace::Finished {
        http_method: head.map_or(crate::http::request::Method::Other, |h| h.method),
        path: head.map_or("", |h| h.path()),
        status,
        messages: &info.messages,
        method_label: crate::observe::metrics::METHODS[method],
        identity: info.identity.as_deref(),
        decision: info
            .decision
            .unwrap_or(if status < 400 { "allow" } else { "error" }),
        upstream: info.upstream.as_deref(),
        // The session id only of a caller that authenticated: before, it is anyone's text.
        session: info
            .identity
            .as_ref()
            .and(head.and_then(|h| h.h.session_id())),
        forwarded_at: info.forwarded_at,
    })
}

/// Phase 11: the audit events of a finished request: one per JSON-RPC message (one for a request
/// that never got that far). Never blocks: a full queue drops and counts.
fn emit_audit(
    w: &Rc<Worker>,
    info: crate::pipeline::AuditInfo,
    reason: Option<&'static str>,
    status: u16,
    method: usize,
    meta: &ReqMeta<'_>,
    latency: Duration,
) {
    use crate::mcp::jsonrpc::Target;
    let failed = reason.is_some_and(GatewayError::is_failure_reason);
    let decision = info.decision.unwrap_or(if status < 400 && !failed {
        "allow"
    } else {
        "error"
    });
    // Refusals a client can repeat as fast as it sends (no credentials, a bad Origin, a denied
    // tool, a malformed request, its rate limit) get an allowance of audit lines, every line
    // of a batch counted; what the upstream answered, and everything allowed, is written whole.
    // A request no message was read from still gets its line.
    let lines = u32::try_from(info.messages.len().max(1)).unwrap_or(u32::MAX);
    let refused = (400..500).contains(&status) || matches!(decision, "deny" | "rate_limited");
    let granted = if matches!(reason, Some("missing_credentials" | "invalid_credentials")) {
        w.auth_failure_audit
            .borrow_mut()
            .take(meta.peer.ip(), lines, meta.started)
    } else if refused {
        match &info.identity {
            Some(id) if info.auth_method.is_some_and(|m| m != "anonymous") => w
                .refusal_audit
                .borrow_mut()
                .take(id.clone(), lines, meta.started),
            _ => w
                .stranger_refusal_audit
                .borrow_mut()
                .take(meta.peer.ip(), lines, meta.started),
        }
    } else {
        lines
    };
    if granted < lines {
        w.metrics.audit_suppressed.fetch_add(
            u64::from(lines - granted),
            std::sync::atomic::Ordering::Relaxed,
        );
        if granted == 0 {
            return;
        }
    }
    let mut messages = info.messages;
    if messages.is_empty() {
        messages.push((crate::observe::metrics::METHODS[method].to_string(), None));
    }
    messages.truncate(granted as usize);
    let last = messages.len() - 1;
    let mut arguments = info.arguments;
    let mut details = info.details;
    // An argument refusal's facts name the request's decision: every event of a batch gets
    // them (the rest of `details` is about the answer, and goes with the last).
    let shared: Vec<(&'static str, serde_json::Value)> = if last > 0 {
        details
            .iter()
            .filter(|(k, _)| crate::rules::AUDIT_KEYS.contains(k))
            .cloned()
            .collect()
    } else {
        Vec::new()
    };
    // Where a batch was given up on part-way, the requests answered before (and what is no
    // request) are audited as they went, not with the reason the rest was given up for.
    let mut requests_seen = 0;
    let mut went_through = |i: usize| {
        let (Some(requests), Some(answered)) = (&info.requests, &info.answered) else {
            return false;
        };
        if !requests.get(i).copied().unwrap_or(false) {
            return true;
        }
        requests_seen += 1;
        answered.get(requests_seen - 1).copied().unwrap_or(false)
    };
    let as_went = info
        .decision
        .unwrap_or(if status < 400 { "allow" } else { "error" });
    for (i, (m, target)) in messages.into_iter().enumerate() {
        let (decision, reason) = if went_through(i) {
            (as_went, None)
        } else {
            (decision, reason)
        };
        let ev = crate::audit::AuditEvent {
            time: meta.wall,
            request_id: meta.request_id.clone(),
            client_request_id: meta.client_request_id.clone(),
            trace_id: meta.trace_id.clone(),
            identity: info.identity.clone(),
            auth_method: info.auth_method.unwrap_or("none"),
            client: meta.peer.ip(),
            method: m,
            target: target.map(|t| match t {
                Target::Tool(n) => ("tool", n),
                Target::Resource(n) => ("resource", n),
                Target::Prompt(n) => ("prompt", n),
            }),
            decision,
            // A refused credential says why (`jwt_expired`, `invalid_credentials`), never what it was.
            reason: info.auth_failure.or(reason).or(info.reason),
            status,
            upstream: info
                .upstream
                .clone()
                .unwrap_or_else(|| crate::config::DEFAULT_ROUTE.into()),
            latency_us: latency.as_micros() as u64,
            arguments: if i == last { arguments.take() } else { None },
            details: if i == last {
                std::mem::take(&mut details)
            } else {
                shared.clone()
            },
            session: None,
        };
        if !w.audit.push(ev) {
            w.metrics
                .audit_dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// A server-to-client stream's messages, and what bounds it.
struct EventSource {
    messages: async_channel::Receiver<Vec<u8>>,
    backlog: Option<crate::upstream::events::Backlog>,
    /// The single call whose answer ends the stream, if it is one (not a GET stream).
    call: Option<crate::mcp::jsonrpc::RpcId>,
    /// See [`crate::pipeline::EventStream::in_flight`].
    in_flight: Option<Rc<std::cell::Cell<usize>>>,
    /// See [`crate::pipeline::EventStream::asked`].
    asked: Option<crate::pipeline::Asked>,
}

/// Writes all of `buf`, giving up when the client accepts nothing of it for the idle timeout:
/// a client that stops reading its reply is cut off as one that stops sending is (a slow reader
/// would otherwise hold its connection, and the reply's memory, for as long as it likes), while
/// one that keeps reading, however slowly, gets the whole reply.
async fn write_bounded<S: Connection>(
    w: &Rc<Worker>,
    stream: &mut S,
    buf: Vec<u8>,
) -> (std::io::Result<()>, Vec<u8>) {
    write_with_progress(stream, buf, w.settings().server.idle_timeout).await
}

/// Writes all of `buf`, giving up after `stall` without progress; on a stall the buffer is
/// gone with the write.
///
/// Progress is the client taking bytes: a write accepting some, or, while a write waits, the
/// socket's unacknowledged bytes going down. A write's completion alone is not enough: the
/// kernel wakes a full socket's writer only once a third of its send buffer has drained (4 MiB
/// on loopback), so a client reading steadily but below that third per `stall` looked stalled
/// and was cut off mid-reply.
async fn write_with_progress<S: Connection>(
    stream: &mut S,
    mut buf: Vec<u8>,
    stall: Duration,
) -> (std::io::Result<()>, Vec<u8>) {
    use monoio::buf::IoBuf as _;
    let socket = stream.socket();
    let mut written = 0;
    while written < buf.len() {
        let rest = buf.slice(written..);
        // What the socket held when the write began. Looked at (a system call) only for a
        // write large enough to fill the socket: a small one waits only behind earlier replies
        // the client left unread, and takes its first look at its first stall instead, so a
        // client that stopped reading is cut after two stalls rather than one.
        let mut queued: Option<Option<u32>> =
            (rest.bytes_init() >= LARGE_BODY).then(|| unacknowledged(socket));
        let mut write = std::pin::pin!(stream.write(rest));
        let done = loop {
            match crate::runtime::deadlines::timeout(stall, write.as_mut()).await {
                Ok(done) => break Ok(done),
                Err(stalled) => {
                    let now = unacknowledged(socket);
                    match queued {
                        None => {}
                        // Taken by the client since the last look: it is reading, wait on.
                        Some(Some(before)) if now.is_some_and(|after| after < before) => {}
                        Some(_) => break Err(stalled),
                    }
                    queued = Some(now);
                }
            }
        };
        match done {
            Ok((Ok(0), rest)) => {
                let e = std::io::Error::from(std::io::ErrorKind::WriteZero);
                return (Err(e), rest.into_inner());
            }
            Ok((Ok(n), rest)) => {
                written += n;
                buf = rest.into_inner();
            }
            Ok((Err(e), rest)) => return (Err(e), rest.into_inner()),
            Err(_stalled) => {
                let e = std::io::Error::from(std::io::ErrorKind::TimedOut);
                return (Err(e), Vec::new());
            }
        }
    }
    buf.clear();
    (Ok(()), buf)
}

/// Reply bodies larger than this are written from their own buffer (see `write_reply`).
const LARGE_BODY: usize = 64 * 1024;

/// How long one write of a stream may wait for a client that does not read.
const STREAM_WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Where a legacy session's stream stands at shutdown (see [`relay_events`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Drain {
    /// Not shutting down.
    Open,
    /// Shutting down: open while answers are awaited, until the grace runs out.
    Answers,
    /// The grace ran out: open, until this instant at the latest, for the errors written in
    /// place of the requests still unanswered.
    Errors(Instant),
}

/// How often a draining stream looks whether anything is still awaited.
const DRAIN_TICK: Duration = Duration::from_millis(50);

/// How long a draining stream waits, after the grace, for the errors of its unanswered
/// requests (written at once; within the half second the drain allows to write answers).
const DRAIN_ERRORS: Duration = Duration::from_millis(250);

async fn relay_events<S: Connection>(
    w: &Rc<Worker>,
    stream: &mut S,
    source: EventSource,
    transform: &mut Option<crate::mcp::transform::Transform>,
    meta: &ReqMeta<'_>,
    out: &mut Vec<u8>,
) {
    let EventSource {
        messages: rx,
        backlog,
        call,
        in_flight,
        asked,
    } = source;
    // A GET stream ends as soon as shutdown begins: nothing on it is awaited. A call's stream
    // has the grace to bring its answer, as a call waiting on a JSON answer has; then it ends
    // with the call's 503 error as its last event. A legacy session's stream is where the
    // answers to its POSTs arrive: it stays open while any is still being forwarded (up to
    // the grace, when each request still unanswered gets the 503 error on it), and ends as
    // soon as none is, so an idle legacy client does not hold the drain.
    let ends = if call.is_some() {
        &w.grace_over
    } else {
        &w.shutdown
    };
    let awaited = || in_flight.as_ref().is_some_and(|n| n.get() > 0) || !rx.is_empty();
    let mut drain = Drain::Open;
    loop {
        let drained = match drain {
            Drain::Open => false,
            Drain::Answers => !awaited(),
            Drain::Errors(until) => !awaited() || Instant::now() >= until,
        };
        if drained {
            let mut buf = std::mem::take(out);
            buf.extend_from_slice(LAST_CHUNK);
            let _ = write_bounded(w, stream, buf).await;
            return;
        }
        let (tick, ends) = match drain {
            Drain::Open => (SSE_KEEPALIVE, Some(ends)),
            Drain::Answers => (DRAIN_TICK, Some(&w.grace_over)),
            Drain::Errors(_) => (DRAIN_TICK, None),
        };
        // The client sends nothing while it reads a stream: the connection turning readable
        // means it has gone (EOF) or broken the protocol, and either way the stream ends now,
        // not at the next keep-alive write (a legacy session and its upstream end with it).
        let mut ended_by_shutdown = false;
        let next = monoio::select! {
            m = crate::runtime::deadlines::timeout(tick, rx.recv()) => Some(m),
            _ = stream.wait_readable() => None,
            _ = async {
                match ends {
                    Some(ends) => ends.wait().await,
                    None => std::future::pending().await,
                }
            } => {
                ended_by_shutdown = true;
                None
            }
        };
        if ended_by_shutdown && in_flight.is_some() {
            // The next step of a legacy session's drain: at shutdown, its answers; at the
            // grace's end, the errors its forwards write in place of what is unanswered.
            drain = match drain {
                Drain::Open => Drain::Answers,
                _ => Drain::Errors(Instant::now() + DRAIN_ERRORS),
            };
            continue;
        }
        if drain != Drain::Open && matches!(next, Some(Err(_))) {
            // A drain's tick, not a keep-alive's.
            continue;
        }
        let mut buf = std::mem::take(out);
        if ended_by_shutdown && let Some(id) = &call {
            write_chunk(
                &mut buf,
                &message_event(&GatewayError::ShuttingDown.body(Some(id))),
            );
        }
        // Checked at every message and keep-alive: a stream whose credentials a reload
        // revoked ends within `SSE_KEEPALIVE`.
        let next = if revoked(w, meta) { None } else { next };
        match next {
            None | Some(Ok(Err(_))) => {
                buf.extend_from_slice(LAST_CHUNK);
                let _ = write_bounded(w, stream, buf).await;
                return;
            }
            Some(Err(_)) => write_chunk(&mut buf, b": keepalive\n\n"),
            Some(Ok(Ok(msg))) => {
                if let Some(b) = &backlog {
                    b.taken(msg.len());
                }
                // A restricted caller's stream is filtered like any tools/list answer; a
                // message that cannot be checked is dropped, not relayed. A response in it gets
                // the error a call answered that way gets on its own (502's): its client is
                // waiting for it, on this stream (red team: a legacy client, and an approved
                // call, got nothing at all).
                let msg = match transform.as_mut() {
                    None => msg,
                    Some(t) => match t.json(&msg) {
                        Some(m) => m,
                        None => {
                            let refused = GatewayError::UpstreamUnavailable(
                                "upstream answer cannot be checked".into(),
                            );
                            // Only for what the client asked, and once each (red team: a
                            // hostile upstream's one event became 400,000 errors, some for
                            // ids of requests long answered).
                            let mut errored: std::collections::HashSet<
                                RpcId,
                                foldhash::fast::RandomState,
                            > = Default::default();
                            crate::mcp::jsonrpc::response_ids(&msg, true, |id| {
                                let was_asked = match &asked {
                                    Some(asked) => asked(&id),
                                    None => call.as_ref() == Some(&id),
                                };
                                if was_asked && errored.insert(id.clone()) {
                                    write_chunk(&mut buf, &message_event(&refused.body(Some(&id))));
                                }
                            });
                            let refusals = errored.len();
                            if refusals == 0 {
                                *out = buf;
                                continue;
                            }
                            tracing::warn!(target: "mcp_guard::filter", "an answer on a stream could not be checked: {refusals} response(s) answered with an error instead");
                            Vec::new()
                        }
                    },
                };
                if !msg.is_empty() {
                    write_chunk(&mut buf, &message_event(&msg));
                }
            }
        }
        // A client that stops reading holds the write at most this long; then the stream ends
        // (and what lives as long as it, a legacy session, with it).
        let stall = w.settings().server.idle_timeout.min(STREAM_WRITE_TIMEOUT);
        let (res, b) = write_with_progress(stream, buf, stall).await;
        *out = b;
        if res.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::EventTail;

    /// Whether the stream made of `pieces` stands between events.
    fn between_events(pieces: &[&[u8]]) -> bool {
        let mut tail = EventTail::default();
        for p in pieces {
            tail.push(p);
        }
        tail.at_boundary()
    }

    #[test]
    fn a_stream_stands_between_events_only_after_an_empty_line() {
        for ending in [
            &b"\n\n"[..],
            b"\r\r",
            b"\r\n\r\n",
            b"\n\r\n",
            b"\r\n\n",
            b"\n\r",
        ] {
            let mut event = b"data: {}".to_vec();
            event.extend_from_slice(ending);
            assert!(
                between_events(&[&event]),
                "{:?}",
                String::from_utf8_lossy(&event)
            );
            // However the pieces fell.
            for cut in 1..event.len() {
                assert!(
                    between_events(&[&event[..cut], &event[cut..]]),
                    "cut at {cut}"
                );
            }
        }
        assert!(between_events(&[]), "nothing relayed yet");
        assert!(between_events(&[b"\n"]), "only a line ending yet");
        for mid in [
            &b"data: {"[..],
            b"data: {}\n",
            b"data: {}\r\n",
            b"data: {}\r",
            b": c\n",
        ] {
            assert!(
                !between_events(&[mid]),
                "{:?}",
                String::from_utf8_lossy(mid)
            );
        }
        assert!(
            !between_events(&[b"data: 1\n\n", b"data: 2\n"]),
            "a second event begun"
        );
    }
}
