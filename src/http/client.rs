//! The upstream HTTP/1.1 client: one keep-alive pool per worker, heads parsed with httparse,
//! bodies relayed as they arrive (Content-Length, chunked, or until close).
//!
//! A pooled connection the upstream has already closed is found before use (a non-blocking
//! peek). A request that failed on a reused connection is retried once on a fresh one only when
//! that cannot run it twice: nothing of it was written, or it is idempotent (GET, HEAD, DELETE,
//! OPTIONS) and no response byte arrived. A POST (`tools/call`) that was written may have been
//! read and acted on by the upstream even if the connection then died, so it is never resent;
//! instead every pooled connection is probed before a POST goes out on it.

use crate::http::chunked::{ChunkError, ChunkedDecoder};
use crate::http::io::{read_append, write_all};
use monoio::net::TcpStream;
use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Idle connections kept per upstream address.
const MAX_IDLE_PER_ADDR: usize = 256;
/// Pooled connections younger than this are reused without a liveness probe.
const RECENT: Duration = Duration::from_secs(1);
/// Idle connections older than this are not reused.
const IDLE_TTL: Duration = Duration::from_secs(50);
/// Largest upstream response head accepted.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Cap on a decoded upstream body held in memory (only when the gateway must buffer one).
pub const MAX_BUFFERED_BODY: u64 = 64 * 1024 * 1024;

/// A worker's pool of idle upstream connections.
#[derive(Default)]
pub struct Pool {
    idle: RefCell<HashMap<SocketAddr, Vec<(TcpStream, Instant)>>>,
}

impl Pool {
    /// An idle connection to `addr`; `always_probe` for a request that may not be resent.
    fn checkout(&self, addr: SocketAddr, always_probe: bool) -> Option<TcpStream> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(&addr)?;
        while let Some((conn, since)) = list.pop() {
            let idle = since.elapsed();
            if idle >= IDLE_TTL {
                continue;
            }
            // A connection pooled moments ago is almost surely alive, and if the upstream did
            // close it, an idempotent request is simply retried: skip the probe's syscall for
            // those. A POST cannot be retried once written, so it always pays for the probe.
            if (idle < RECENT && !always_probe) || still_open(&conn) {
                return Some(conn);
            }
        }
        None
    }

    fn checkin(&self, addr: SocketAddr, conn: TcpStream) {
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry(addr).or_default();
        if list.len() < MAX_IDLE_PER_ADDR {
            list.push((conn, Instant::now()));
        }
    }

    /// Idle connections currently held (all addresses).
    pub fn idle_count(&self) -> usize {
        self.idle.borrow().values().map(Vec::len).sum()
    }
}

/// Whether an idle connection is still usable: no EOF, no unexpected bytes waiting.
#[allow(unsafe_code)]
fn still_open(conn: &TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut byte = 0u8;
    // SAFETY: a one-byte peek into a stack buffer on a socket fd we own; MSG_DONTWAIT keeps it
    // non-blocking. 0 means the peer closed; data means a stray response, so don't reuse.
    let n = unsafe {
        libc::recv(
            conn.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
}

/// How an upstream response body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RespFraming {
    /// No body (204, 304, or Content-Length: 0).
    Empty,
    /// Exactly n bytes.
    Length(u64),
    /// Chunked.
    Chunked,
    /// Until the upstream closes.
    Close,
}

/// A response whose head has been read; the body is pulled with [`UpstreamResponse::next_data`].
pub struct UpstreamResponse {
    /// Status code.
    pub status: u16,
    /// Content-Type, if any.
    pub content_type: Option<String>,
    /// Mcp-Session-Id, if any.
    pub session_id: Option<String>,
    /// Body framing.
    pub framing: RespFraming,
    conn: Option<TcpStream>,
    addr: SocketAddr,
    /// Bytes read past the head, not yet returned.
    pending: Vec<u8>,
    remaining: u64,
    decoder: Option<ChunkedDecoder>,
    reusable: bool,
    done: bool,
}

/// Why an upstream exchange failed.
#[derive(Debug)]
pub enum UpstreamError {
    /// Connect, read or write failure.
    Io(io::Error),
    /// The upstream sent something that is not a valid HTTP response.
    Protocol(&'static str),
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Io(e) => write!(f, "{e}"),
            UpstreamError::Protocol(m) => f.write_str(m),
        }
    }
}

impl From<io::Error> for UpstreamError {
    fn from(e: io::Error) -> Self {
        UpstreamError::Io(e)
    }
}

/// Whether a request with this method may be sent a second time after the upstream may have
/// read it (RFC 9110 section 9.2.2). Anything else, POST first of all, is never resent.
fn idempotent(method: &str) -> bool {
    matches!(method, "GET" | "HEAD" | "DELETE" | "OPTIONS")
}

/// How far an exchange got before it failed: what decides whether a retry is safe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    /// Not one byte of the request reached the socket: always safe to send again.
    NothingWritten,
    /// Some or all of the request was written, no response byte arrived: safe only for an
    /// idempotent request (the upstream may have read it and acted on it).
    Written,
    /// Some of a response arrived: never retried.
    ResponseStarted,
}

/// Sends `request` (head and body already serialised, as [`build_request`] makes it) to one of
/// `addrs`, and reads the response head. The method is read back from the request line; an
/// unrecognised one is treated as not idempotent. Prefer [`send_request`], which is told.
pub async fn send(
    pool: &Pool,
    addrs: &[SocketAddr],
    request: Vec<u8>,
) -> Result<UpstreamResponse, UpstreamError> {
    let method = request
        .split(|&b| b == b' ')
        .next()
        .and_then(|m| std::str::from_utf8(m).ok())
        .unwrap_or("")
        .to_owned();
    send_request(pool, addrs, &method, request).await
}

/// Sends `request` (head and body already serialised, for `method`) to one of `addrs`, and
/// reads the response head. A failure on a reused connection is retried once on a fresh one
/// only where that cannot make the upstream act twice (see [`Progress`]); otherwise the error
/// is returned and the caller answers 502.
pub async fn send_request(
    pool: &Pool,
    addrs: &[SocketAddr],
    method: &str,
    request: Vec<u8>,
) -> Result<UpstreamResponse, UpstreamError> {
    let resendable = idempotent(method);
    let mut request = request;
    // First try a pooled connection to any address, then fresh connections in order.
    for addr in addrs {
        if let Some(conn) = pool.checkout(*addr, !resendable) {
            match exchange(conn, *addr, request).await {
                Ok(r) => return Ok(r),
                Err((e, req, progress)) => {
                    let retry = match progress {
                        Progress::NothingWritten => true,
                        Progress::Written => resendable,
                        Progress::ResponseStarted => false,
                    };
                    if !retry {
                        return Err(e);
                    }
                    request = req;
                }
            }
            break;
        }
    }
    let mut last_err = UpstreamError::Protocol("no upstream address");
    for addr in addrs {
        match TcpStream::connect_addr(*addr).await {
            Ok(conn) => {
                let _ = conn.set_nodelay(true);
                return match exchange(conn, *addr, request).await {
                    Ok(r) => Ok(r),
                    Err((e, _, _)) => Err(e),
                };
            }
            Err(e) => last_err = UpstreamError::Io(e),
        }
    }
    Err(last_err)
}

/// Writes all of `request`, saying on failure whether any byte of it reached the socket.
async fn write_request(
    conn: &mut TcpStream,
    request: Vec<u8>,
) -> Result<Vec<u8>, (io::Error, Vec<u8>, Progress)> {
    use monoio::buf::IoBuf;
    use monoio::io::AsyncWriteRent;
    let mut request = request;
    let mut written = 0;
    while written < request.len() {
        let (res, slice) = conn.write(request.slice(written..)).await;
        request = slice.into_inner();
        let progress = if written == 0 {
            Progress::NothingWritten
        } else {
            Progress::Written
        };
        match res {
            Ok(0) => {
                let e = io::Error::new(io::ErrorKind::WriteZero, "upstream stopped accepting");
                return Err((e, request, progress));
            }
            Ok(n) => written += n,
            Err(e) => return Err((e, request, progress)),
        }
    }
    Ok(request)
}

/// One request/response-head exchange; on failure returns the request bytes and how far the
/// exchange got (which decides whether a retry is safe).
async fn exchange(
    mut conn: TcpStream,
    addr: SocketAddr,
    request: Vec<u8>,
) -> Result<UpstreamResponse, (UpstreamError, Vec<u8>, Progress)> {
    let request = match write_request(&mut conn, request).await {
        Ok(r) => r,
        Err((e, request, progress)) => return Err((e.into(), request, progress)),
    };
    let mut buf = Vec::with_capacity(4096);
    // An interim (1xx) response counts as the response having started.
    let mut interim_seen = false;
    let progress = |buf: &[u8], interim_seen: bool| {
        if buf.is_empty() && !interim_seen {
            Progress::Written
        } else {
            Progress::ResponseStarted
        }
    };
    // Set after an interim response: what is already buffered is parsed before reading more
    // (the final head often arrives in the same read as the `100 Continue`).
    let mut parse_first = false;
    loop {
        if parse_first && !buf.is_empty() {
            parse_first = false;
        } else {
            let (res, b) = read_append(&mut conn, buf, 4096).await;
            buf = b;
            match res {
                Ok(0) => {
                    let p = progress(&buf, interim_seen);
                    return Err((
                        UpstreamError::Io(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "upstream closed the connection",
                        )),
                        request,
                        p,
                    ));
                }
                Ok(_) => {}
                Err(e) => {
                    let p = progress(&buf, interim_seen);
                    return Err((e.into(), request, p));
                }
            }
        }
        match parse_response_head(&buf) {
            Ok(Some(head)) => {
                if (100..200).contains(&head.status) {
                    // Interim response: discard it and look for the final one, first in what
                    // is already buffered.
                    buf.drain(..head.len);
                    interim_seen = true;
                    parse_first = true;
                    continue;
                }
                let pending = buf.split_off(head.len);
                let (remaining, decoder) = match head.framing {
                    RespFraming::Length(n) => (n, None),
                    RespFraming::Chunked => (0, Some(ChunkedDecoder::new(u64::MAX))),
                    _ => (0, None),
                };
                return Ok(UpstreamResponse {
                    status: head.status,
                    content_type: head.content_type,
                    session_id: head.session_id,
                    framing: head.framing,
                    conn: Some(conn),
                    addr,
                    pending,
                    remaining,
                    decoder,
                    reusable: head.keep_alive && head.framing != RespFraming::Close,
                    done: head.framing == RespFraming::Empty,
                });
            }
            Ok(None) if buf.len() > MAX_RESPONSE_HEAD => {
                return Err((
                    UpstreamError::Protocol("upstream response head too large"),
                    request,
                    Progress::ResponseStarted,
                ));
            }
            Ok(None) => {}
            Err(m) => {
                return Err((
                    UpstreamError::Protocol(m),
                    request,
                    Progress::ResponseStarted,
                ));
            }
        }
    }
}

struct ResponseHead {
    status: u16,
    len: usize,
    framing: RespFraming,
    keep_alive: bool,
    content_type: Option<String>,
    session_id: Option<String>,
}

fn parse_response_head(buf: &[u8]) -> Result<Option<ResponseHead>, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err("malformed upstream response head"),
    };
    let status = resp.code.ok_or("upstream response without status")?;
    let mut keep_alive = resp.version == Some(1);
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut content_type = None;
    let mut session_id = None;
    for h in resp.headers.iter() {
        let value = std::str::from_utf8(h.value)
            .map_err(|_| "non-UTF-8 upstream header")?
            .trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            let n: u64 = value.parse().map_err(|_| "bad upstream Content-Length")?;
            if content_length.is_some_and(|p| p != n) {
                return Err("conflicting upstream Content-Length");
            }
            content_length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if !value.eq_ignore_ascii_case("chunked") {
                return Err("unsupported upstream transfer coding");
            }
            chunked = true;
        } else if h.name.eq_ignore_ascii_case("connection") {
            for t in value.split(',') {
                let t = t.trim();
                if t.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if t.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        } else if h.name.eq_ignore_ascii_case("content-type") {
            content_type = Some(value.to_string());
        } else if h.name.eq_ignore_ascii_case("mcp-session-id") {
            if value.is_empty() || !value.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
                return Err("invalid upstream Mcp-Session-Id");
            }
            session_id = Some(value.to_string());
        }
    }
    if chunked && content_length.is_some() {
        return Err("upstream sent both Content-Length and Transfer-Encoding");
    }
    let framing = if status == 204 || status == 304 {
        RespFraming::Empty
    } else if chunked {
        RespFraming::Chunked
    } else {
        match content_length {
            Some(0) => RespFraming::Empty,
            Some(n) => RespFraming::Length(n),
            None => RespFraming::Close,
        }
    };
    Ok(Some(ResponseHead {
        status,
        len,
        framing,
        keep_alive,
        content_type,
        session_id,
    }))
}

impl UpstreamResponse {
    /// The next piece of decoded body, or `None` at its end.
    pub async fn next_data(&mut self) -> Result<Option<Vec<u8>>, UpstreamError> {
        loop {
            if self.done {
                return Ok(None);
            }
            // Serve what is already buffered first.
            if !self.pending.is_empty() {
                match self.framing {
                    RespFraming::Length(_) => {
                        let take = (self.remaining as usize).min(self.pending.len());
                        let rest = self.pending.split_off(take);
                        let data = std::mem::replace(&mut self.pending, rest);
                        self.remaining -= take as u64;
                        if self.remaining == 0 {
                            self.done = true;
                            if !self.pending.is_empty() {
                                // Bytes beyond the declared length: don't reuse this connection.
                                self.reusable = false;
                            }
                        }
                        return Ok(Some(data));
                    }
                    RespFraming::Chunked => {
                        let mut out = Vec::new();
                        let decoder = self
                            .decoder
                            .as_mut()
                            .ok_or(UpstreamError::Protocol("no decoder"))?;
                        let used =
                            decoder
                                .decode(&self.pending, &mut out)
                                .map_err(|e| match e {
                                    ChunkError::Invalid => {
                                        UpstreamError::Protocol("malformed upstream chunked body")
                                    }
                                    ChunkError::TooLarge => {
                                        UpstreamError::Protocol("upstream body too large")
                                    }
                                })?;
                        self.pending.drain(..used);
                        if decoder.is_done() {
                            self.done = true;
                            if !self.pending.is_empty() {
                                self.reusable = false;
                            }
                        }
                        if !out.is_empty() {
                            return Ok(Some(out));
                        }
                        if self.done {
                            return Ok(None);
                        }
                        // Only a partial chunk line is buffered: read more.
                    }
                    RespFraming::Close => {
                        return Ok(Some(std::mem::take(&mut self.pending)));
                    }
                    RespFraming::Empty => {
                        self.done = true;
                        return Ok(None);
                    }
                }
            }
            let Some(conn) = self.conn.as_mut() else {
                return Ok(None);
            };
            let buf = std::mem::take(&mut self.pending);
            let (res, buf) = read_append(conn, buf, 16 * 1024).await;
            self.pending = buf;
            match res {
                Ok(0) => {
                    self.reusable = false;
                    if self.framing == RespFraming::Close {
                        self.done = true;
                        return Ok(None);
                    }
                    return Err(UpstreamError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "upstream closed mid-body",
                    )));
                }
                Ok(_) => {}
                Err(e) => {
                    self.reusable = false;
                    return Err(e.into());
                }
            }
        }
    }

    /// Reads the whole body (bounded by [`MAX_BUFFERED_BODY`]).
    pub async fn read_to_end(&mut self) -> Result<Vec<u8>, UpstreamError> {
        let mut all = Vec::new();
        while let Some(d) = self.next_data().await? {
            all.extend_from_slice(&d);
            if all.len() as u64 > MAX_BUFFERED_BODY {
                self.reusable = false;
                return Err(UpstreamError::Protocol("upstream body too large"));
            }
        }
        Ok(all)
    }

    /// Returns the connection to the pool if the whole body was read and it may be reused.
    pub fn release(mut self, pool: &Pool) {
        if self.done
            && self.reusable
            && self.pending.is_empty()
            && let Some(conn) = self.conn.take()
        {
            pool.checkin(self.addr, conn);
        }
    }
}

/// Serialises a request head (and body) for the upstream.
pub fn build_request(
    method: &str,
    target: &str,
    host: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\n");
    for (n, v) in headers {
        out.extend_from_slice(n.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if method == "POST" || !body.is_empty() {
        out.extend_from_slice(b"content-length: ");
        crate::http::response::push_decimal(&mut out, body.len() as u64);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// Writes `data` to `stream` (used by relays that own a client stream).
pub async fn write_bytes<S: monoio::io::AsyncWriteRent>(
    stream: &mut S,
    data: Vec<u8>,
) -> io::Result<Vec<u8>> {
    let (res, buf) = write_all(stream, data).await;
    res.map(|_| buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_heads_are_framed_correctly() {
        let h = parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\nMcp-Session-Id: abc\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, RespFraming::Chunked);
        assert_eq!(h.session_id.as_deref(), Some("abc"));
        let h = parse_response_head(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, RespFraming::Empty);
        let h = parse_response_head(b"HTTP/1.0 200 OK\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, RespFraming::Close);
        assert!(!h.keep_alive);
        assert!(
            parse_response_head(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            .is_err()
        );
    }

    /// What a mock upstream connection does with each request it reads, in order.
    #[derive(Clone, Copy)]
    enum Step {
        /// Answer 200 and keep the connection.
        Answer,
        /// Read the whole request, then close without answering.
        ReadThenClose,
        /// Close as soon as the previous step is done (a keep-alive timeout upstream).
        Close,
        /// Answer `100 Continue` and the final 200 in one write.
        ContinueThenAnswer,
    }

    /// A raw std TCP upstream: connection `i` follows `scripts[i]`; later ones just answer.
    /// Returns its address, a stop flag and the thread, which yields every request line seen.
    fn mock_upstream(
        scripts: Vec<Vec<Step>>,
    ) -> (
        SocketAddr,
        std::sync::Arc<std::sync::atomic::AtomicBool>,
        std::thread::JoinHandle<Vec<String>>,
    ) {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let t = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut index = 0;
            while !stop2.load(Ordering::Relaxed) {
                let mut conn = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                conn.set_nonblocking(false).unwrap();
                conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let script = scripts
                    .get(index)
                    .cloned()
                    .unwrap_or_else(|| vec![Step::Answer; 4]);
                index += 1;
                let mut buf = Vec::new();
                for step in script {
                    if let Step::Close = step {
                        break;
                    }
                    // Read one whole request: head, then Content-Length bytes of body.
                    let mut chunk = [0u8; 4096];
                    let (line, total) = loop {
                        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).to_string();
                            let len = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length: "))
                                .map_or(0, |n| n.trim().parse::<usize>().unwrap());
                            if buf.len() >= end + 4 + len {
                                break (head.lines().next().unwrap().to_string(), end + 4 + len);
                            }
                        }
                        match conn.read(&mut chunk) {
                            Ok(0) | Err(_) => return seen,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    buf.drain(..total);
                    seen.push(line);
                    if let Step::ReadThenClose = step {
                        break;
                    }
                    if let Step::ContinueThenAnswer = step {
                        conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").unwrap();
                    }
                    conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .unwrap();
                }
            }
            seen
        });
        (addr, stop, t)
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
            .block_on(f)
    }

    /// One request through the pool; the body is read so the connection goes back to it.
    async fn roundtrip(pool: &Pool, addr: SocketAddr, method: &str) -> Result<u16, UpstreamError> {
        let req = build_request(
            method,
            "/mcp",
            "up",
            &[],
            if method == "POST" { b"{}" } else { b"" },
        );
        let mut resp = send_request(pool, &[addr], method, req).await?;
        let status = resp.status;
        resp.read_to_end().await?;
        resp.release(pool);
        Ok(status)
    }

    #[test]
    fn a_post_that_dies_on_a_reused_connection_is_not_resent() {
        let (addr, stop, mock) = mock_upstream(vec![vec![Step::Answer, Step::ReadThenClose]]);
        let (first, second) = block_on(async {
            // The pool lives (and drops its connections) inside the runtime.
            let pool = Pool::default();
            let first = roundtrip(&pool, addr, "GET").await;
            let second = roundtrip(&pool, addr, "POST").await;
            (first, second)
        });
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let seen = mock.join().unwrap();
        assert_eq!(first.unwrap(), 200);
        assert!(second.is_err(), "the caller must see the failure (502)");
        let posts = seen.iter().filter(|l| l.starts_with("POST ")).count();
        assert_eq!(
            posts, 1,
            "the upstream must see the POST exactly once: {seen:?}"
        );
    }

    #[test]
    fn a_get_that_dies_on_a_reused_connection_is_retried_once() {
        let (addr, stop, mock) = mock_upstream(vec![vec![Step::Answer, Step::ReadThenClose]]);
        let (first, second) = block_on(async {
            // The pool lives (and drops its connections) inside the runtime.
            let pool = Pool::default();
            let first = roundtrip(&pool, addr, "GET").await;
            let second = roundtrip(&pool, addr, "GET").await;
            (first, second)
        });
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let seen = mock.join().unwrap();
        assert_eq!(first.unwrap(), 200);
        assert_eq!(second.unwrap(), 200);
        assert_eq!(seen.len(), 3, "{seen:?}");
    }

    #[test]
    fn a_post_probes_even_a_just_pooled_connection_and_goes_out_once_on_a_fresh_one() {
        // The upstream closes right after answering; the POST follows within RECENT, when an
        // idempotent request would skip the probe. The POST must find the close first.
        let (addr, stop, mock) = mock_upstream(vec![vec![Step::Answer, Step::Close]]);
        let (first, second) = block_on(async {
            // The pool lives (and drops its connections) inside the runtime.
            let pool = Pool::default();
            let first = roundtrip(&pool, addr, "GET").await;
            // Let the upstream's FIN arrive.
            std::thread::sleep(Duration::from_millis(100));
            let second = roundtrip(&pool, addr, "POST").await;
            (first, second)
        });
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let seen = mock.join().unwrap();
        assert_eq!(first.unwrap(), 200);
        assert_eq!(second.unwrap(), 200);
        let posts = seen.iter().filter(|l| l.starts_with("POST ")).count();
        assert_eq!(posts, 1, "{seen:?}");
    }

    #[test]
    fn an_interim_response_arriving_with_the_final_one_is_skipped_at_once() {
        let (addr, stop, mock) = mock_upstream(vec![vec![Step::ContinueThenAnswer]]);
        let started = std::time::Instant::now();
        let status = block_on(async {
            let pool = Pool::default();
            roundtrip(&pool, addr, "POST").await
        });
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = mock.join();
        assert_eq!(status.unwrap(), 200);
        // Not after the mock's 5 s read timeout closed the connection.
        assert!(started.elapsed() < Duration::from_secs(4));
    }

    #[test]
    fn only_get_head_delete_and_options_count_as_resendable() {
        assert!(idempotent("GET") && idempotent("DELETE"));
        assert!(!idempotent("POST") && !idempotent("") && !idempotent("get"));
    }
}
