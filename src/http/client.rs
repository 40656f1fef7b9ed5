//! The upstream HTTP/1.1 client's wire: requests serialised, response heads parsed with
//! httparse, bodies relayed as they arrive (Content-Length, chunked, or until close), and how
//! far a failed exchange got. Which connection a request goes out on, and whether a failed one
//! may be sent again, is `upstream::connections`'s.

use crate::http::body::BodyReservation;
use crate::http::chunked::{ChunkError, ChunkedDecoder};
use crate::http::io::{read_append, write_all};
use monoio::net::TcpStream;
use std::io;
use std::net::SocketAddr;
use std::time::Instant;

/// Largest upstream response head accepted.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Cap on a decoded upstream body held in memory (only when the gateway must buffer one).
pub const MAX_BUFFERED_BODY: u64 = 64 * 1024 * 1024;

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
    /// Framing that broke after body bytes decoded in the same read: those went out first, and
    /// this is the next read's error (red team: a response followed in one read by a bad chunk
    /// was lost with it).
    broken: Option<&'static str>,
    /// When the whole body must have arrived: the call's timeout, which otherwise would cover
    /// only the head, bounds every read of an answer to a call, whether read whole or relayed
    /// as it streams. `None`: no bound (a GET stream, which lasts as long as its client stays).
    deadline: Option<Instant>,
    /// How much later the deadline may still be moved for time spent on a slow client.
    slack: std::time::Duration,
    /// Whose request this answers (the pool's owner key): the connection is pooled for that
    /// owner only.
    owner: u64,
}

/// Why an upstream exchange failed.
#[derive(Debug)]
pub enum UpstreamError {
    /// Connect, read or write failure.
    Io(io::Error),
    /// The upstream sent something that is not a valid HTTP response.
    Protocol(&'static str),
}

impl UpstreamError {
    /// Whether the answer's deadline (the call's timeout) ran out, rather than the upstream
    /// failing.
    pub fn is_timeout(&self) -> bool {
        matches!(self, UpstreamError::Io(e) if e.kind() == io::ErrorKind::TimedOut)
    }
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

/// How far an exchange got before it failed: what decides whether a retry is safe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Not one byte of the request reached the socket: always safe to send again.
    NothingWritten,
    /// Some or all of the request was written, no response byte arrived: safe only for an
    /// idempotent request (the upstream may have read it and acted on it).
    Written,
    /// Some of a response arrived: never retried.
    ResponseStarted,
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
/// exchange got (which decides whether a retry is safe). Once the request is written, `share`
/// (the body allowance counting it) ends, and so do the bytes unless `resendable` says a retry
/// may still need them: a call waiting on a slow tool holds neither. `buf` reads the head (and
/// stays the response's buffer); `owner` is whose request it is, for the pool.
pub async fn exchange(
    mut conn: TcpStream,
    addr: SocketAddr,
    request: Vec<u8>,
    resendable: bool,
    share: &mut Option<BodyReservation>,
    mut buf: Vec<u8>,
    owner: u64,
) -> Result<UpstreamResponse, (UpstreamError, Vec<u8>, Progress)> {
    let request = match write_request(&mut conn, request).await {
        Ok(r) if resendable => r,
        Ok(_) => Vec::new(),
        Err((e, request, progress)) => return Err((e.into(), request, progress)),
    };
    *share = None;
    // `buf`: the response head's buffer (a spare one of the worker's pool, or new); it stays
    // the response's buffer for the bytes past the head.
    buf.clear();
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
                // The bytes past the head move to the front of the same buffer: no second
                // allocation, and what follows the head is usually short.
                buf.drain(..head.len);
                let pending = buf;
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
                    broken: None,
                    deadline: None,
                    slack: std::time::Duration::ZERO,
                    owner,
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
    // The head's UTF-8 is checked once; each value is then a slice of it (see `value_str`).
    let whole = std::str::from_utf8(&buf[..len]).ok();
    for h in resp.headers.iter() {
        let value = crate::http::request::value_str(buf, whole, h.value)
            .ok_or("non-UTF-8 upstream header")?
            .trim();
        // Most of an answer's headers (Date, Server, ...) are none of these: the length tells
        // them apart before any name is compared.
        if !matches!(h.name.len(), 10 | 12 | 14 | 17) {
            continue;
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            // Digits only, as a client's is read: `+5` is not a length either way.
            let n =
                crate::http::request::parse_length(value).ok_or("bad upstream Content-Length")?;
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
    /// Whether body bytes are already buffered (they came with the head), so the first
    /// [`Self::next_data`] needs no wait on the upstream unless they end mid-chunk-line.
    pub fn body_buffered(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Whether the whole body is already here: nothing is left to wait for, so it cannot
    /// stall (a body of a declared length that came with its head, or none).
    pub fn body_complete(&self) -> bool {
        self.done
            || self.framing == RespFraming::Empty
            || (matches!(self.framing, RespFraming::Length(_))
                && self.pending.len() as u64 >= self.remaining)
    }

    /// The next piece of decoded body, or `None` at its end.
    pub async fn next_data(&mut self) -> Result<Option<Vec<u8>>, UpstreamError> {
        loop {
            if let Some(why) = self.broken {
                return Err(UpstreamError::Protocol(why));
            }
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
                        let used = match decoder.decode(&self.pending, &mut out) {
                            Ok(used) => used,
                            Err(e) => {
                                let why = match e {
                                    ChunkError::Invalid => "malformed upstream chunked body",
                                    ChunkError::TooLarge => "upstream body too large",
                                };
                                self.reusable = false;
                                if out.is_empty() {
                                    return Err(UpstreamError::Protocol(why));
                                }
                                self.pending.clear();
                                self.broken = Some(why);
                                return Ok(Some(out));
                            }
                        };
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
            if self.conn.is_none() {
                return Ok(None);
            }
            let buf = std::mem::take(&mut self.pending);
            let (res, buf) = self.read_part(buf, 16 * 1024).await?;
            self.pending = buf;
            if !self.more_read(res)? {
                if self.framing == RespFraming::Close {
                    self.done = true;
                    return Ok(None);
                }
                return Err(closed_mid_body());
            }
        }
    }

    /// Whether a read of body bytes brought any (`false`: the upstream closed); a connection
    /// whose read failed or ended is not reused.
    fn more_read(&mut self, res: io::Result<usize>) -> Result<bool, UpstreamError> {
        match res {
            Ok(0) => {
                self.reusable = false;
                Ok(false)
            }
            Ok(_) => Ok(true),
            Err(e) => {
                self.reusable = false;
                Err(e.into())
            }
        }
    }

    /// Reads the whole body (bounded by [`MAX_BUFFERED_BODY`]).
    pub async fn read_to_end(&mut self) -> Result<Vec<u8>, UpstreamError> {
        if matches!(self.framing, RespFraming::Length(_)) && !self.done {
            return self.read_declared_length().await;
        }
        let mut all = Vec::new();
        while let Some(d) = self.next_data().await? {
            // The first piece is often the whole body: taken as it is, not copied.
            if all.is_empty() {
                all = d;
            } else {
                all.extend_from_slice(&d);
            }
            if all.len() as u64 > MAX_BUFFERED_BODY {
                self.reusable = false;
                return Err(UpstreamError::Protocol("upstream body too large"));
            }
        }
        Ok(all)
    }

    /// Reads the body and drops it, for an answer no one reads (to a notification of the
    /// gateway's own): `Ok` once it has ended within `limit` bytes, and the connection may go
    /// back to the pool; past `limit` it is not kept (red team: a cancellation's answer, read
    /// whole, let a hostile upstream make the gateway hold 64 MiB per timed-out call).
    pub async fn discard_body(&mut self, limit: usize) -> Result<(), UpstreamError> {
        let mut seen = 0usize;
        while let Some(d) = self.next_data().await? {
            seen = seen.saturating_add(d.len());
            if seen > limit {
                self.reusable = false;
                return Err(UpstreamError::Protocol(
                    "upstream answer to a notification too large",
                ));
            }
        }
        Ok(())
    }

    /// A body of a declared length not yet read: read straight into one buffer of that size
    /// (what came with the head first), rather than piece by piece and copied together.
    async fn read_declared_length(&mut self) -> Result<Vec<u8>, UpstreamError> {
        if self.remaining > MAX_BUFFERED_BODY {
            self.reusable = false;
            return Err(UpstreamError::Protocol("upstream body too large"));
        }
        let total = self.remaining as usize;
        let mut all = std::mem::take(&mut self.pending);
        if all.len() < total {
            // A little room past the end, so bytes the upstream sent beyond the declared length
            // show up in the read and the connection is not pooled with them in it.
            all.reserve_exact(total - all.len() + 1024);
        }
        while all.len() < total {
            let want = total - all.len();
            let (res, b) = self.read_part(all, want).await?;
            all = b;
            if !self.more_read(res)? {
                return Err(closed_mid_body());
            }
        }
        if all.len() > total {
            // Bytes beyond the declared length: don't reuse this connection.
            self.reusable = false;
            all.truncate(total);
        }
        self.remaining = 0;
        self.done = true;
        Ok(all)
    }

    /// Appends the rest of a declared-length body to `out` (what came with the head, then
    /// reads straight into `out`'s spare room), so that a small reply goes to the client in
    /// one write behind its head instead of a write per piece read. The caller bounds the
    /// length; `Err` when the upstream closed or failed before the end (`out` then holds what
    /// did arrive).
    pub async fn append_declared_body(
        &mut self,
        mut out: Vec<u8>,
    ) -> (Result<(), UpstreamError>, Vec<u8>) {
        let take = (self.remaining as usize).min(self.pending.len());
        out.extend_from_slice(&self.pending[..take]);
        if self.pending.len() > take {
            // Bytes beyond the declared length: don't reuse this connection.
            self.reusable = false;
        }
        self.pending.clear();
        self.remaining -= take as u64;
        let end = out.len() + self.remaining as usize;
        while out.len() < end {
            // A little room past the end, as in `read_declared_length`.
            let want = end - out.len() + 1024;
            let (res, b) = match self.read_part(out, want).await {
                Ok(read) => read,
                // The bytes read so far went with the read that did not finish.
                Err(e) => return (Err(e), Vec::new()),
            };
            out = b;
            match self.more_read(res) {
                Ok(true) => {}
                Ok(false) => return (Err(closed_mid_body()), out),
                Err(e) => return (Err(e), out),
            }
        }
        if out.len() > end {
            self.reusable = false;
            out.truncate(end);
        }
        self.remaining = 0;
        self.done = true;
        (Ok(()), out)
    }

    /// Whose request this answers.
    pub fn owner(&self) -> u64 {
        self.owner
    }

    /// Bounds every read of the body by `at`, whether it is read whole or relayed piece by
    /// piece: an upstream that sends a head and then stalls, or streams progress without end,
    /// must not hold the call, its client connection and its buffers forever.
    pub fn set_deadline(&mut self, at: Instant) {
        self.deadline = Some(at);
    }

    /// Whether the whole body has been read.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Brings the deadline forward to `at` (never later than it was), and ends any
    /// postponement: what is left of the body is no longer anyone's answer.
    pub fn shorten_deadline(&mut self, at: Instant) {
        self.deadline = Some(self.deadline.map_or(at, |d| d.min(at)));
        self.slack = std::time::Duration::ZERO;
    }

    /// Lets [`Self::postpone_deadline`] move the deadline by up to `slack` in all.
    pub fn allow_postponement(&mut self, slack: std::time::Duration) {
        self.slack = slack;
    }

    /// Moves the deadline `by` later, within the slack left: the time the gateway spent
    /// writing to a client that reads slowly is not the upstream's to answer for, and a slow
    /// reader should still get an answer sent in time. Bounded, so that a slow reader and an
    /// upstream that keeps producing cannot stretch a call past its maximum together.
    pub fn postpone_deadline(&mut self, by: std::time::Duration) {
        let by = by.min(self.slack);
        self.slack -= by;
        if let Some(at) = self.deadline.as_mut() {
            *at += by;
        }
    }

    /// One read of a body into `buf`'s spare room, within the deadline. `Err`: no connection,
    /// or the deadline passed (`buf` is dropped with the read, and the connection with it).
    async fn read_part(
        &mut self,
        buf: Vec<u8>,
        want: usize,
    ) -> Result<(io::Result<usize>, Vec<u8>), UpstreamError> {
        let Some(conn) = self.conn.as_mut() else {
            return Err(UpstreamError::Protocol("no upstream connection"));
        };
        let Some(deadline) = self.deadline else {
            return Ok(read_append(conn, buf, want).await);
        };
        let left = deadline.saturating_duration_since(Instant::now());
        match crate::runtime::deadlines::timeout(left, read_append(conn, buf, want)).await {
            Ok(read) => Ok(read),
            Err(_elapsed) => {
                self.reusable = false;
                Err(UpstreamError::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "upstream answer not complete within the call's timeout",
                )))
            }
        }
    }

    /// The connection, when the whole body was read and it may carry another request.
    pub fn into_idle(self) -> Option<(SocketAddr, TcpStream)> {
        self.into_idle_and_buffer().0
    }

    /// [`Self::into_idle`], and the response's read buffer, emptied, for another exchange.
    pub fn into_idle_and_buffer(mut self) -> (Option<(SocketAddr, TcpStream)>, Vec<u8>) {
        let idle = self.done && self.reusable && self.pending.is_empty();
        let mut buf = std::mem::take(&mut self.pending);
        buf.clear();
        let conn = if idle {
            self.conn.take().map(|c| (self.addr, c))
        } else {
            None
        };
        (conn, buf)
    }
}

/// The error for a body the upstream stopped sending before its end.
fn closed_mid_body() -> UpstreamError {
    UpstreamError::Io(io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "upstream closed mid-body",
    ))
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

/// What [`build_request`] wrote for a POST with an empty body, without its length: the head
/// to finish with [`finish_request`] once the body is known. `None`: not such a request.
pub fn request_head(mut request: Vec<u8>) -> Option<Vec<u8>> {
    const EMPTY: &[u8] = b"content-length: 0\r\n\r\n";
    request.ends_with(EMPTY).then(|| {
        request.truncate(request.len() - EMPTY.len());
        request
    })
}

/// A head from [`request_head`] with its body.
pub fn finish_request(mut head: Vec<u8>, body: &[u8]) -> Vec<u8> {
    head.reserve(32 + body.len());
    head.extend_from_slice(b"content-length: ");
    crate::http::response::push_decimal(&mut head, body.len() as u64);
    head.extend_from_slice(b"\r\n\r\n");
    head.extend_from_slice(body);
    head
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
    fn a_request_finished_later_is_the_request_built_whole() {
        let headers = [("content-type", "application/json"), ("x-a", "b")];
        let body = br#"{"jsonrpc":"2.0","method":"x"}"#;
        let head = request_head(build_request("POST", "/mcp", "h:1", &headers, b"")).unwrap();
        assert_eq!(
            finish_request(head, body),
            build_request("POST", "/mcp", "h:1", &headers, body)
        );
        // A GET has no length to leave out.
        assert!(request_head(build_request("GET", "/mcp", "h:1", &headers, b"")).is_none());
    }

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
        // A length is digits only, as a client's is read.
        for length in ["+2", "-0", "2 2", "0x2", "2.0", "", "99999999999999999999"] {
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {length}\r\n\r\n");
            assert_eq!(
                parse_response_head(head.as_bytes()).err(),
                Some("bad upstream Content-Length"),
                "{length:?}"
            );
        }
    }

    #[test]
    fn response_header_values_are_read_from_a_head_checked_once_or_one_by_one() {
        // UTF-8 whole: values sliced from the checked head, names of other lengths skipped.
        let h = parse_response_head(
            b"HTTP/1.1 200 OK\r\nDate: x\r\nContent-Type:  application/json \r\nServer: y\r\nMcp-Session-Id: s-1\r\nContent-Length: 2\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.content_type.as_deref(), Some("application/json"));
        assert_eq!(h.session_id.as_deref(), Some("s-1"));
        assert_eq!(h.framing, RespFraming::Length(2));
        // Not UTF-8 whole (obs-text in the reason phrase): each value is checked on its own.
        let h = parse_response_head(
            b"HTTP/1.1 200 \xffK\r\nContent-Type: text/event-stream\r\nContent-Length: 0\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.content_type.as_deref(), Some("text/event-stream"));
        // A value that is not UTF-8 is refused, whichever header carries it.
        for head in [
            &b"HTTP/1.1 200 OK\r\nX-Other: \xc3\r\nContent-Length: 0\r\n\r\n"[..],
            &b"HTTP/1.1 200 OK\r\nContent-Type: \xff\xfe\r\nContent-Length: 0\r\n\r\n"[..],
        ] {
            assert_eq!(
                parse_response_head(head).err(),
                Some("non-UTF-8 upstream header")
            );
        }
    }
}
