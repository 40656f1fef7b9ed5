//! Request-head parsing on httparse: limits, framing and smuggling checks, and the handful of
//! headers the gateway reads. Parsing distinguishes "incomplete, read more" from "invalid".
//!
//! Only headers listed in [`RequestHead`] are kept; everything else is dropped here, which is
//! also the forwarding policy: nothing the gateway did not look at goes upstream.

/// HTTP methods the gateway routes; anything else is answered 405.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// GET
    Get,
    /// POST
    Post,
    /// DELETE
    Delete,
    /// OPTIONS
    Options,
    /// HEAD
    Head,
    /// Any other token.
    Other,
}

/// How the request body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body.
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// Transfer-Encoding: chunked.
    Chunked,
}

/// A parsed request head.
#[derive(Debug, Clone)]
pub struct RequestHead {
    /// The method.
    pub method: Method,
    /// Request target as sent (path and query).
    pub target: String,
    /// Length of the path part of `target` (up to any `?`).
    pub path_len: usize,
    /// HTTP/1.x minor version.
    pub minor_version: u8,
    /// Bytes the head occupied in the buffer.
    pub head_len: usize,
    /// Body framing.
    pub body: BodyFraming,
    /// Whether the connection may be reused afterwards.
    pub keep_alive: bool,
    /// `Expect: 100-continue` was sent.
    pub expect_continue: bool,
    /// The headers the gateway reads.
    pub h: KnownHeaders,
}

impl RequestHead {
    /// The path part of the target, without the query.
    pub fn path(&self) -> &str {
        &self.target[..self.path_len]
    }
}

/// The headers the gateway understands; values are trimmed and free of control characters.
///
/// The common ones ([`Kept`]) share one string: one allocation per head rather than one per
/// header, and a head small enough to move cheaply. The trace context (rewritten in place when
/// the gateway propagates its own span), cookies and certificate headers are held apart.
#[derive(Clone, Default)]
pub struct KnownHeaders {
    /// Every [`Kept`] value, one after another.
    values: String,
    /// Where each [`Kept`] value lies in `values` (`ABSENT` when the header was not sent).
    spans: [Span; KEPT],
    /// traceparent
    pub traceparent: Option<String>,
    /// tracestate (repeated headers joined by ", ")
    pub tracestate: Option<String>,
    /// Cookie (repeated headers joined by "; "); read only by the OAuth facade.
    pub cookie: Option<String>,
    /// `X-Client-Cert-*`, as a TLS terminator in front sets them (boxed: almost no request
    /// carries them). Read only for clients in `[auth.mtls] trusted_proxy_ips`, and never
    /// forwarded upstream.
    pub client_cert: Option<Box<ClientCertHeaders>>,
}

impl std::fmt::Debug for KnownHeaders {
    /// The values by name, as they are read (the shared string also holds bytes no span
    /// refers to any more: a value replaced, or moved to grow).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("KnownHeaders");
        for (name, which) in [
            ("host", Kept::Host),
            ("accept", Kept::Accept),
            ("origin", Kept::Origin),
            ("content_type", Kept::ContentType),
            ("authorization", Kept::Authorization),
            ("api_key", Kept::ApiKey),
            ("session_id", Kept::SessionId),
            ("protocol_version", Kept::ProtocolVersion),
            ("mcp_method", Kept::McpMethod),
            ("mcp_name", Kept::McpName),
            ("last_event_id", Kept::LastEventId),
            ("request_id", Kept::RequestId),
            ("user_agent", Kept::UserAgent),
        ] {
            d.field(name, &self.get(which));
        }
        d.field("traceparent", &self.traceparent)
            .field("tracestate", &self.tracestate)
            .field("cookie", &self.cookie)
            .field("client_cert", &self.client_cert)
            .finish()
    }
}

/// A value's place in [`KnownHeaders::values`]: `start..end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    start: u32,
    end: u32,
}

/// The span of a header that was not sent.
const ABSENT: Span = Span {
    start: u32::MAX,
    end: u32::MAX,
};

impl Default for Span {
    fn default() -> Self {
        ABSENT
    }
}

/// The headers [`KnownHeaders`] keeps in its shared string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    /// Host
    Host,
    /// Accept (repeated headers joined by ", ")
    Accept,
    /// Origin
    Origin,
    /// Content-Type
    ContentType,
    /// Authorization
    Authorization,
    /// X-API-Key
    ApiKey,
    /// Mcp-Session-Id
    SessionId,
    /// MCP-Protocol-Version
    ProtocolVersion,
    /// Mcp-Method
    McpMethod,
    /// Mcp-Name
    McpName,
    /// Last-Event-ID
    LastEventId,
    /// X-Request-Id
    RequestId,
    /// User-Agent
    UserAgent,
}

/// How many [`Kept`] headers there are.
const KEPT: usize = Kept::UserAgent as usize + 1;

impl KnownHeaders {
    /// The value of `which`, when the request sent it.
    pub fn get(&self, which: Kept) -> Option<&str> {
        let Span { start, end } = self.spans[which as usize];
        if start == u32::MAX {
            return None;
        }
        // Spans are only ever made from `values`' own length at a push, so they lie on char
        // boundaries; `get` rather than indexing all the same, so no span could panic.
        self.values.get(start as usize..end as usize)
    }

    /// Sets `which` to `value`, replacing what the request sent.
    pub fn set(&mut self, which: Kept, value: &str) {
        self.spans[which as usize] = self.push(value);
    }

    /// Forgets `which`, as if the request had not sent it. Its bytes are overwritten, not
    /// only unreferenced: a head stripped of its credentials (the legacy transport's upstream
    /// head) holds none of them any more.
    pub fn remove(&mut self, which: Kept) {
        let Span { start, end } = std::mem::replace(&mut self.spans[which as usize], ABSENT);
        if start != u32::MAX {
            let blank = "*".repeat((end - start) as usize);
            // Same length, ASCII over whole chars: every other span stays where it was.
            self.values
                .replace_range(start as usize..end as usize, &blank);
        }
    }

    /// Appends `value` to the shared string and says where it went. A head is at most
    /// `max_header_bytes` (far below 4 GiB); past `u32` the value would be dropped, not
    /// misplaced.
    fn push(&mut self, value: &str) -> Span {
        let start = self.values.len();
        let Some(end) = start
            .checked_add(value.len())
            .filter(|&e| e < u32::MAX as usize)
        else {
            return ABSENT;
        };
        self.values.push_str(value);
        Span {
            start: start as u32,
            end: end as u32,
        }
    }

    /// Appends `value` to `which` after `separator` (a repeated header): the joined value is
    /// written at the end of the shared string when it is not there already.
    fn append(&mut self, which: Kept, separator: &str, value: &str) {
        if self.get(which).is_none() {
            self.set(which, value);
            return;
        }
        if self.spans[which as usize].end as usize != self.values.len() {
            // Not the last value written: copied to the end, where it can grow.
            let existing = self.get(which).unwrap_or_default().to_owned();
            self.spans[which as usize] = self.push(&existing);
        }
        let start = self.spans[which as usize].start;
        self.push(separator);
        let tail = self.push(value);
        if start != u32::MAX && tail != ABSENT {
            self.spans[which as usize] = Span {
                start,
                end: tail.end,
            };
        }
    }

    /// Host
    pub fn host(&self) -> Option<&str> {
        self.get(Kept::Host)
    }
    /// Accept (repeated headers joined by ", ")
    pub fn accept(&self) -> Option<&str> {
        self.get(Kept::Accept)
    }
    /// Origin
    pub fn origin(&self) -> Option<&str> {
        self.get(Kept::Origin)
    }
    /// Content-Type
    pub fn content_type(&self) -> Option<&str> {
        self.get(Kept::ContentType)
    }
    /// Authorization
    pub fn authorization(&self) -> Option<&str> {
        self.get(Kept::Authorization)
    }
    /// X-API-Key
    pub fn api_key(&self) -> Option<&str> {
        self.get(Kept::ApiKey)
    }
    /// Mcp-Session-Id
    pub fn session_id(&self) -> Option<&str> {
        self.get(Kept::SessionId)
    }
    /// MCP-Protocol-Version
    pub fn protocol_version(&self) -> Option<&str> {
        self.get(Kept::ProtocolVersion)
    }
    /// Mcp-Method
    pub fn mcp_method(&self) -> Option<&str> {
        self.get(Kept::McpMethod)
    }
    /// Mcp-Name
    pub fn mcp_name(&self) -> Option<&str> {
        self.get(Kept::McpName)
    }
    /// Last-Event-ID
    pub fn last_event_id(&self) -> Option<&str> {
        self.get(Kept::LastEventId)
    }
    /// X-Request-Id
    pub fn request_id(&self) -> Option<&str> {
        self.get(Kept::RequestId)
    }
    /// User-Agent
    pub fn user_agent(&self) -> Option<&str> {
        self.get(Kept::UserAgent)
    }
}

/// The `X-Client-Cert-*` headers a TLS terminator passes on about its client's certificate.
#[derive(Debug, Clone, Default)]
pub struct ClientCertHeaders {
    /// X-Client-Cert-Verified (`SUCCESS` when the terminator verified a certificate)
    pub verified: Option<String>,
    /// X-Client-Cert-CN
    pub cn: Option<String>,
    /// X-Client-Cert-SAN-DNS
    pub san_dns: Option<String>,
    /// X-Client-Cert-SAN-Email
    pub san_email: Option<String>,
    /// X-Client-Cert-SAN-URI
    pub san_uri: Option<String>,
}

/// Why a request head is refused; each maps to a status in `error.rs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadError {
    /// Syntax error or a smuggling-prone framing: 400, connection closed.
    Malformed(&'static str),
    /// Head larger than `max_header_bytes`: 431.
    TooLarge,
    /// Declared body larger than `max_body_bytes`: 413.
    BodyTooLarge,
    /// HTTP version other than 1.0/1.1: 505.
    Version,
    /// An `Expect` other than 100-continue: 417.
    Expectation,
}

/// Outcome of trying to parse a head from the bytes read so far.
// Returned once per request and moved straight out: boxing the head would add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum HeadParse {
    /// A whole head was parsed.
    Complete(RequestHead),
    /// More bytes are needed.
    Incomplete,
}

/// The most headers a request may carry.
pub const MAX_HEADERS: usize = 64;

/// Parses a request head from `buf`, enforcing `max_head` and `max_body`.
pub fn parse_head(buf: &[u8], max_head: usize, max_body: u64) -> Result<HeadParse, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let status = match req.parse(buf) {
        Ok(s) => s,
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(httparse::Error::Version) => return Err(HeadError::Version),
        Err(_) => return Err(HeadError::Malformed("malformed request head")),
    };
    let head_len = match status {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => {
            return if buf.len() > max_head {
                Err(HeadError::TooLarge)
            } else {
                Ok(HeadParse::Incomplete)
            };
        }
    };
    if head_len > max_head {
        return Err(HeadError::TooLarge);
    }
    // httparse ends a line at a lone LF, as RFC 9112 section 2.2 allows; a proxy in front may
    // not, and would then not have seen the headers read here (a Content-Length, a key):
    // refused, as every other framing the hops could read differently.
    if has_bare_lf(&buf[..head_len]) {
        return Err(HeadError::Malformed("bare LF in request head"));
    }
    let minor_version = req.version.unwrap_or(1);
    let method = match req.method.unwrap_or("") {
        "GET" => Method::Get,
        "POST" => Method::Post,
        "DELETE" => Method::Delete,
        "OPTIONS" => Method::Options,
        "HEAD" => Method::Head,
        _ => Method::Other,
    };
    let target = req.path.unwrap_or("").to_string();
    if !target.starts_with('/') {
        // Absolute-form and authority-form targets are proxy requests; we are not a forward proxy.
        return Err(HeadError::Malformed("request target must be origin-form"));
    }

    let mut h = KnownHeaders::default();
    // One allocation for every kept value: they are part of the head, so never longer.
    h.values.reserve(head_len);
    // Validated once: a head is almost always UTF-8 (ASCII) whole, and each value is then a
    // slice of it, with no check of its own. A head that is not falls back to a check per value.
    let whole = std::str::from_utf8(&buf[..head_len]).ok();
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut saw_te = false;
    let mut conn_close = minor_version == 0;
    let mut conn_keep_alive = false;
    let mut expect_continue = false;
    for header in req.headers.iter() {
        let name = header.name;
        let kind = header_kind(name);
        if kind == HeaderKind::Other {
            // Not read and never forwarded: no need to even look at its value.
            continue;
        }
        let value = trim_blanks(header.value);
        if kind == HeaderKind::Cookie {
            // Read only by the OAuth facade's callback, never forwarded. A cookie the gateway
            // cannot read (set by something else on the host) is ignored rather than refused:
            // it must not break requests that never look at cookies.
            if let Some(v) = value_str(buf, whole, value)
                && !has_control(v.as_bytes())
            {
                let cookies = h.cookie.get_or_insert_default();
                if !cookies.is_empty() {
                    cookies.push_str("; ");
                }
                cookies.push_str(v);
            }
            continue;
        }
        let value = value_str(buf, whole, value)
            .ok_or(HeadError::Malformed("header value is not UTF-8"))?;
        match kind {
            HeaderKind::ContentLength => {
                // RFC 9112 §6.3: differing lengths (also as a list) are unrecoverable framing
                // errors.
                for part in value.split(',') {
                    let n = parse_length(part.trim_matches([' ', '\t']))
                        .ok_or(HeadError::Malformed("invalid Content-Length"))?;
                    if content_length.is_some_and(|prev| prev != n) {
                        return Err(HeadError::Malformed("conflicting Content-Length headers"));
                    }
                    content_length = Some(n);
                }
            }
            HeaderKind::TransferEncoding => {
                if saw_te {
                    return Err(HeadError::Malformed("repeated Transfer-Encoding"));
                }
                saw_te = true;
                // Only exactly "chunked" is understood; any other coding (or a list) is refused
                // rather than guessed at, since a mismatch with another hop is how smuggling
                // works.
                if !value.eq_ignore_ascii_case("chunked") {
                    return Err(HeadError::Malformed("unsupported transfer coding"));
                }
                chunked = true;
            }
            HeaderKind::Connection => {
                for token in value.split(',') {
                    let t = token.trim();
                    if t.eq_ignore_ascii_case("close") {
                        conn_close = true;
                    } else if t.eq_ignore_ascii_case("keep-alive") {
                        conn_keep_alive = true;
                    }
                }
            }
            HeaderKind::Expect => {
                if value.eq_ignore_ascii_case("100-continue") {
                    expect_continue = true;
                } else {
                    return Err(HeadError::Expectation);
                }
            }
            HeaderKind::Known(slot) => store_known(&mut h, slot, value)?,
            HeaderKind::Other | HeaderKind::Cookie => {}
        }
    }
    if saw_te && content_length.is_some() {
        return Err(HeadError::Malformed(
            "both Content-Length and Transfer-Encoding present",
        ));
    }
    if chunked && minor_version == 0 {
        return Err(HeadError::Malformed(
            "Transfer-Encoding in an HTTP/1.0 request",
        ));
    }
    if minor_version == 1 && h.host().is_none() {
        return Err(HeadError::Malformed("missing Host header"));
    }
    let body = if chunked {
        BodyFraming::Chunked
    } else {
        match content_length {
            Some(0) | None => BodyFraming::None,
            Some(n) if n > max_body => return Err(HeadError::BodyTooLarge),
            Some(n) => BodyFraming::Length(n),
        }
    };
    let keep_alive = if minor_version == 0 {
        conn_keep_alive && !conn_close
    } else {
        !conn_close
    };
    let path_len = target.find('?').unwrap_or(target.len());
    Ok(HeadParse::Complete(RequestHead {
        method,
        path_len,
        target,
        minor_version,
        head_len,
        body,
        keep_alive,
        expect_continue,
        h,
    }))
}

/// The headers the gateway reads, by how it reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeaderKind {
    ContentLength,
    TransferEncoding,
    Connection,
    Expect,
    Cookie,
    Known(Slot),
    Other,
}

/// Where a kept header goes in [`KnownHeaders`]: the shared string, or a field of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Kept(Kept),
    Traceparent,
    Tracestate,
    /// One field of a TLS terminator's client-certificate headers.
    Cert(CertField),
}

/// The client-certificate header a [`Slot::Cert`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CertField {
    Verified,
    Cn,
    SanDns,
    SanEmail,
    SanUri,
}

impl CertField {
    /// Where `cert` keeps this field.
    fn of(self, cert: &mut ClientCertHeaders) -> &mut Option<String> {
        match self {
            CertField::Verified => &mut cert.verified,
            CertField::Cn => &mut cert.cn,
            CertField::SanDns => &mut cert.san_dns,
            CertField::SanEmail => &mut cert.san_email,
            CertField::SanUri => &mut cert.san_uri,
        }
    }
}

fn header_kind(name: &str) -> HeaderKind {
    use HeaderKind::Known;
    // Length first: most headers are told apart without comparing a single byte.
    let is = |s: &str| name.eq_ignore_ascii_case(s);
    match name.len() {
        4 if is("host") => Known(Slot::Kept(Kept::Host)),
        6 if is("accept") => Known(Slot::Kept(Kept::Accept)),
        6 if is("origin") => Known(Slot::Kept(Kept::Origin)),
        6 if is("expect") => HeaderKind::Expect,
        6 if is("cookie") => HeaderKind::Cookie,
        8 if is("mcp-name") => Known(Slot::Kept(Kept::McpName)),
        9 if is("x-api-key") => Known(Slot::Kept(Kept::ApiKey)),
        10 if is("connection") => HeaderKind::Connection,
        10 if is("mcp-method") => Known(Slot::Kept(Kept::McpMethod)),
        10 if is("tracestate") => Known(Slot::Tracestate),
        10 if is("user-agent") => Known(Slot::Kept(Kept::UserAgent)),
        11 if is("traceparent") => Known(Slot::Traceparent),
        12 if is("content-type") => Known(Slot::Kept(Kept::ContentType)),
        12 if is("x-request-id") => Known(Slot::Kept(Kept::RequestId)),
        13 if is("authorization") => Known(Slot::Kept(Kept::Authorization)),
        13 if is("last-event-id") => Known(Slot::Kept(Kept::LastEventId)),
        14 if is("content-length") => HeaderKind::ContentLength,
        14 if is("mcp-session-id") => Known(Slot::Kept(Kept::SessionId)),
        17 if is("transfer-encoding") => HeaderKind::TransferEncoding,
        20 if is("mcp-protocol-version") => Known(Slot::Kept(Kept::ProtocolVersion)),
        16 if is("x-client-cert-cn") => Known(Slot::Cert(CertField::Cn)),
        21 if is("x-client-cert-san-dns") => Known(Slot::Cert(CertField::SanDns)),
        21 if is("x-client-cert-san-uri") => Known(Slot::Cert(CertField::SanUri)),
        22 if is("x-client-cert-verified") => Known(Slot::Cert(CertField::Verified)),
        23 if is("x-client-cert-san-email") => Known(Slot::Cert(CertField::SanEmail)),
        _ => HeaderKind::Other,
    }
}

/// A Content-Length value: 1 to 19 ASCII digits, nothing else (no sign, no spaces inside).
pub(crate) fn parse_length(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 19 {
        return None;
    }
    s.bytes().try_fold(0u64, |acc, b| {
        b.is_ascii_digit().then(|| acc * 10 + u64::from(b - b'0'))
    })
}

/// Whether some LF in `head` has no CR before it. Each byte is compared with the one before it,
/// without early exit, so the compiler vectorizes it: a head holds a dozen LFs, and finding each
/// with a separate search cost more than reading the head once.
fn has_bare_lf(head: &[u8]) -> bool {
    head.first() == Some(&b'\n')
        || head
            .iter()
            .skip(1)
            .zip(head)
            .fold(false, |found, (&b, &before)| {
                found | ((b == b'\n') & (before != b'\r'))
            })
}

/// `value` without the spaces and tabs around it (RFC 9110 section 5.5: not part of the value).
fn trim_blanks(mut value: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = value {
        value = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = value {
        value = rest;
    }
    value
}

/// `value` (a slice of `buf`) as text: a slice of `whole` (`buf`'s head, when it is UTF-8)
/// found by its offset, else checked on its own. `None` when it is not UTF-8.
pub(crate) fn value_str<'b>(
    buf: &'b [u8],
    whole: Option<&'b str>,
    value: &'b [u8],
) -> Option<&'b str> {
    let offset = (value.as_ptr() as usize).wrapping_sub(buf.as_ptr() as usize);
    match whole.and_then(|w| w.get(offset..offset.checked_add(value.len())?)) {
        // `get` checked the range lies inside the head and on char boundaries; the bytes are
        // the value's own only if the pointers agree (httparse's slices are into `buf`).
        Some(s) if s.as_ptr() == value.as_ptr() => Some(s),
        _ => std::str::from_utf8(value).ok(),
    }
}

/// Whether `value` holds a control character other than HTAB. No early exit, so the compiler
/// vectorizes it: values are short and almost never hold one, so the whole value is read anyway.
fn has_control(value: &[u8]) -> bool {
    value.iter().fold(false, |found, &b| {
        found | ((b < 0x20) & (b != b'\t')) | (b == 0x7f)
    })
}

fn store_known(h: &mut KnownHeaders, slot: Slot, value: &str) -> Result<(), HeadError> {
    if has_control(value.as_bytes()) {
        return Err(HeadError::Malformed("control character in header value"));
    }
    // Headers that identify the caller or the session may appear once: a duplicate is how a
    // client would try to make two components see two different values.
    let kept = match slot {
        Slot::Kept(kept) => kept,
        Slot::Traceparent => return store_owned(&mut h.traceparent, true, value),
        Slot::Tracestate => return store_owned(&mut h.tracestate, false, value),
        // Each names one certificate field: a repeat is refused like any identity header.
        Slot::Cert(field) => {
            let cert = h.client_cert.get_or_insert_default();
            return store_owned(field.of(cert), true, value);
        }
    };
    // Only Accept is a list a client may spread over several lines.
    let single = kept != Kept::Accept;
    match h.get(kept) {
        Some(_) if single => Err(HeadError::Malformed("duplicate header")),
        Some(_) => {
            h.append(kept, ", ", value);
            Ok(())
        }
        None => {
            h.set(kept, value);
            Ok(())
        }
    }
}

/// [`store_known`] for a header held in its own string.
fn store_owned(field: &mut Option<String>, single: bool, value: &str) -> Result<(), HeadError> {
    match field {
        Some(_) if single => Err(HeadError::Malformed("duplicate header")),
        Some(existing) => {
            existing.push_str(", ");
            existing.push_str(value);
            Ok(())
        }
        None => {
            *field = Some(value.to_string());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<HeadParse, HeadError> {
        parse_head(raw.as_bytes(), 16384, 1 << 20)
    }

    fn complete(raw: &str) -> RequestHead {
        match parse(raw) {
            Ok(HeadParse::Complete(h)) => h,
            other => panic!("expected complete head, got {other:?}"),
        }
    }

    #[test]
    fn parses_post_with_length_and_known_headers() {
        let h = complete(
            "POST /mcp?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\nAccept: application/json\r\nAccept: text/event-stream\r\nMcp-Session-Id: abc\r\n\r\n",
        );
        assert_eq!(h.method, Method::Post);
        assert_eq!(h.path(), "/mcp");
        assert_eq!(h.body, BodyFraming::Length(12));
        assert_eq!(h.h.accept(), Some("application/json, text/event-stream"));
        assert_eq!(h.h.session_id(), Some("abc"));
        assert!(h.keep_alive);
    }

    #[test]
    fn a_repeated_header_interleaved_with_others_joins_without_touching_them() {
        // The second Accept arrives after other kept values: its first part moves to the end
        // of the shared string, and no neighbour's value changes.
        let h = complete(
            "POST /mcp HTTP/1.1\r\nAccept: application/json\r\nHost: a\r\nX-API-Key: k1\r\nAccept: text/event-stream\r\nUser-Agent: ua\r\nAccept: */*\r\nContent-Length: 1\r\n\r\n",
        );
        assert_eq!(
            h.h.accept(),
            Some("application/json, text/event-stream, */*")
        );
        assert_eq!(h.h.host(), Some("a"));
        assert_eq!(h.h.api_key(), Some("k1"));
        assert_eq!(h.h.user_agent(), Some("ua"));
        assert_eq!(h.h.origin(), None);
    }

    #[test]
    fn kept_values_can_be_replaced_and_removed_without_disturbing_the_rest() {
        let mut h = complete(
            "POST /mcp HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer t\r\nMcp-Session-Id: s1\r\nMCP-Protocol-Version: 2025-03-26\r\nContent-Length: 1\r\n\r\n",
        )
        .h;
        h.remove(Kept::Authorization);
        h.set(Kept::ProtocolVersion, "2025-11-25");
        assert_eq!(h.authorization(), None);
        assert!(
            !h.values.contains("Bearer t") && !format!("{h:?}").contains("Bearer t"),
            "a removed credential leaves no bytes behind"
        );
        assert_eq!(h.protocol_version(), Some("2025-11-25"));
        assert_eq!(h.session_id(), Some("s1"));
        assert_eq!(h.host(), Some("a"));
        // Joining onto nothing is setting; joining onto a value that is no longer the last
        // one written moves it first.
        h.append(Kept::Accept, ", ", "application/json");
        h.set(Kept::Origin, "http://o");
        h.append(Kept::Accept, ", ", "text/event-stream");
        assert_eq!(h.accept(), Some("application/json, text/event-stream"));
        assert_eq!(h.origin(), Some("http://o"));
    }

    #[test]
    fn a_bare_lf_anywhere_in_the_head_is_refused() {
        for raw in [
            "POST /mcp HTTP/1.1\r\nHost: a\r\nX-Foo: a\nContent-Length: 5\r\n\r\nhello",
            "POST /mcp HTTP/1.1\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX-Foo: a\nX-API-Key: k\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\n\n",
            "\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            assert_eq!(
                parse(raw).unwrap_err(),
                HeadError::Malformed("bare LF in request head"),
                "{raw:?}"
            );
        }
        // A body's own LFs are not the head's.
        assert!(matches!(
            parse("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\na\nb"),
            Ok(HeadParse::Complete(_))
        ));
    }

    #[test]
    fn a_duplicate_of_a_single_header_is_refused_wherever_it_lies() {
        for raw in [
            "GET / HTTP/1.1\r\nHost: a\r\nMcp-Session-Id: s1\r\nAccept: x\r\nMcp-Session-Id: s2\r\n\r\n",
            "GET / HTTP/1.1\r\nAuthorization: Bearer a\r\nHost: a\r\nauthorization: Bearer b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nTraceparent: x\r\ntraceparent: y\r\n\r\n",
            "GET / HTTP/1.1\r\nX-Client-Cert-CN: a\r\nHost: a\r\nx-client-cert-cn: b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX-Client-Cert-SAN-URI: a\r\nX-Client-Cert-SAN-URI: b\r\n\r\n",
        ] {
            assert_eq!(
                parse(raw).unwrap_err(),
                HeadError::Malformed("duplicate header"),
                "{raw:?}"
            );
        }
    }

    #[test]
    fn cookies_are_joined_and_an_unreadable_one_is_ignored_not_refused() {
        let h = complete(
            "GET /oauth/callback HTTP/1.1\r\nHost: a\r\nCookie: a=1; b=2\r\nCookie: c=3\r\n\r\n",
        );
        assert_eq!(h.h.cookie.as_deref(), Some("a=1; b=2; c=3"));
        let raw = b"GET / HTTP/1.1\r\nHost: a\r\nCookie: x=\xff\xfe\r\nCookie: y=1\r\n\r\n";
        let h = match parse_head(raw, 16384, 1 << 20) {
            Ok(HeadParse::Complete(h)) => h,
            other => panic!("{other:?}"),
        };
        assert_eq!(h.h.cookie.as_deref(), Some("y=1"));
    }

    #[test]
    fn incomplete_head_asks_for_more() {
        assert!(matches!(
            parse("POST /mcp HTTP/1.1\r\nHost: a\r\n"),
            Ok(HeadParse::Incomplete)
        ));
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        for raw in [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 4\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\n",
            "POST http://evil/ HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            assert!(
                matches!(parse(raw), Err(HeadError::Malformed(_))),
                "{raw:?}"
            );
        }
    }

    #[test]
    fn identical_duplicate_content_length_is_accepted() {
        let h = complete(
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
        );
        assert_eq!(h.body, BodyFraming::Length(3));
    }

    #[test]
    fn limits_map_to_their_errors() {
        let big = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
            "a".repeat(20000)
        );
        assert_eq!(parse(&big).unwrap_err(), HeadError::TooLarge);
        assert_eq!(
            parse("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999\r\n\r\n").unwrap_err(),
            HeadError::BodyTooLarge
        );
        assert_eq!(
            parse("POST / HTTP/1.1\r\nHost: a\r\nExpect: nope\r\n\r\n").unwrap_err(),
            HeadError::Expectation
        );
    }

    #[test]
    fn duplicate_identity_headers_are_refused() {
        assert!(
            parse("GET / HTTP/1.1\r\nHost: a\r\nAuthorization: a\r\nAuthorization: b\r\n\r\n")
                .is_err()
        );
    }
}
