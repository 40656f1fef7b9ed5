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

/// The headers the gateway understands; values are trimmed and valid visible ASCII.
#[derive(Debug, Clone, Default)]
pub struct KnownHeaders {
    /// Host
    pub host: Option<String>,
    /// Content-Type
    pub content_type: Option<String>,
    /// Accept (repeated headers joined by ", ")
    pub accept: Option<String>,
    /// Origin
    pub origin: Option<String>,
    /// Authorization
    pub authorization: Option<String>,
    /// X-API-Key
    pub api_key: Option<String>,
    /// Mcp-Session-Id
    pub session_id: Option<String>,
    /// MCP-Protocol-Version
    pub protocol_version: Option<String>,
    /// Mcp-Method
    pub mcp_method: Option<String>,
    /// Mcp-Name
    pub mcp_name: Option<String>,
    /// Last-Event-ID
    pub last_event_id: Option<String>,
    /// traceparent
    pub traceparent: Option<String>,
    /// tracestate
    pub tracestate: Option<String>,
    /// X-Request-Id
    pub request_id: Option<String>,
    /// User-Agent
    pub user_agent: Option<String>,
    /// Cookie (repeated headers joined by "; "); read only by the OAuth facade.
    pub cookie: Option<String>,
    /// `X-Client-Cert-*`, as a TLS terminator in front sets them (boxed: almost no request
    /// carries them). Read only for clients in `[auth.mtls] trusted_proxy_ips`, and never
    /// forwarded upstream.
    pub client_cert: Option<Box<ClientCertHeaders>>,
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
        if kind == HeaderKind::Cookie {
            // Read only by the OAuth facade's callback, never forwarded. A cookie the gateway
            // cannot read (set by something else on the host) is ignored rather than refused:
            // it must not break requests that never look at cookies.
            if let Ok(v) = std::str::from_utf8(header.value)
                && !v.bytes().any(|b| b < 0x20 && b != b'\t' || b == 0x7f)
            {
                let cookies = h.cookie.get_or_insert_default();
                if !cookies.is_empty() {
                    cookies.push_str("; ");
                }
                cookies.push_str(v.trim_matches([' ', '\t']));
            }
            continue;
        }
        let value = std::str::from_utf8(header.value)
            .map_err(|_| HeadError::Malformed("header value is not UTF-8"))?
            .trim_matches([' ', '\t']);
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
    if minor_version == 1 && h.host.is_none() {
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

/// Where a kept header goes in [`KnownHeaders`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Host,
    Accept,
    Origin,
    ContentType,
    Authorization,
    ApiKey,
    SessionId,
    ProtocolVersion,
    McpMethod,
    McpName,
    LastEventId,
    Traceparent,
    Tracestate,
    RequestId,
    UserAgent,
    CertVerified,
    CertCn,
    CertSanDns,
    CertSanEmail,
    CertSanUri,
}

fn header_kind(name: &str) -> HeaderKind {
    use HeaderKind::Known;
    // Length first: most headers are told apart without comparing a single byte.
    let is = |s: &str| name.eq_ignore_ascii_case(s);
    match name.len() {
        4 if is("host") => Known(Slot::Host),
        6 if is("accept") => Known(Slot::Accept),
        6 if is("origin") => Known(Slot::Origin),
        6 if is("expect") => HeaderKind::Expect,
        6 if is("cookie") => HeaderKind::Cookie,
        8 if is("mcp-name") => Known(Slot::McpName),
        9 if is("x-api-key") => Known(Slot::ApiKey),
        10 if is("connection") => HeaderKind::Connection,
        10 if is("mcp-method") => Known(Slot::McpMethod),
        10 if is("tracestate") => Known(Slot::Tracestate),
        10 if is("user-agent") => Known(Slot::UserAgent),
        11 if is("traceparent") => Known(Slot::Traceparent),
        12 if is("content-type") => Known(Slot::ContentType),
        12 if is("x-request-id") => Known(Slot::RequestId),
        13 if is("authorization") => Known(Slot::Authorization),
        13 if is("last-event-id") => Known(Slot::LastEventId),
        14 if is("content-length") => HeaderKind::ContentLength,
        14 if is("mcp-session-id") => Known(Slot::SessionId),
        17 if is("transfer-encoding") => HeaderKind::TransferEncoding,
        20 if is("mcp-protocol-version") => Known(Slot::ProtocolVersion),
        16 if is("x-client-cert-cn") => Known(Slot::CertCn),
        21 if is("x-client-cert-san-dns") => Known(Slot::CertSanDns),
        21 if is("x-client-cert-san-uri") => Known(Slot::CertSanUri),
        22 if is("x-client-cert-verified") => Known(Slot::CertVerified),
        23 if is("x-client-cert-san-email") => Known(Slot::CertSanEmail),
        _ => HeaderKind::Other,
    }
}

/// A Content-Length value: 1 to 19 ASCII digits, nothing else (no sign, no spaces inside).
fn parse_length(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 19 {
        return None;
    }
    s.bytes().try_fold(0u64, |acc, b| {
        b.is_ascii_digit().then(|| acc * 10 + u64::from(b - b'0'))
    })
}

fn store_known(h: &mut KnownHeaders, slot: Slot, value: &str) -> Result<(), HeadError> {
    // Headers that identify the caller or the session may appear once: a duplicate is how a
    // client would try to make two components see two different values.
    let (field, single) = match slot {
        Slot::Host => (&mut h.host, true),
        Slot::Accept => (&mut h.accept, false),
        Slot::Origin => (&mut h.origin, true),
        Slot::ContentType => (&mut h.content_type, true),
        Slot::Authorization => (&mut h.authorization, true),
        Slot::ApiKey => (&mut h.api_key, true),
        Slot::SessionId => (&mut h.session_id, true),
        Slot::ProtocolVersion => (&mut h.protocol_version, true),
        Slot::McpMethod => (&mut h.mcp_method, true),
        Slot::McpName => (&mut h.mcp_name, true),
        Slot::LastEventId => (&mut h.last_event_id, true),
        Slot::Traceparent => (&mut h.traceparent, true),
        Slot::Tracestate => (&mut h.tracestate, false),
        Slot::RequestId => (&mut h.request_id, true),
        Slot::UserAgent => (&mut h.user_agent, true),
        // Each names one certificate field: a repeat is refused like any identity header.
        Slot::CertVerified => (&mut h.client_cert.get_or_insert_default().verified, true),
        Slot::CertCn => (&mut h.client_cert.get_or_insert_default().cn, true),
        Slot::CertSanDns => (&mut h.client_cert.get_or_insert_default().san_dns, true),
        Slot::CertSanEmail => (&mut h.client_cert.get_or_insert_default().san_email, true),
        Slot::CertSanUri => (&mut h.client_cert.get_or_insert_default().san_uri, true),
    };
    if value.bytes().any(|b| b < 0x20 && b != b'\t' || b == 0x7f) {
        return Err(HeadError::Malformed("control character in header value"));
    }
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
        assert_eq!(
            h.h.accept.as_deref(),
            Some("application/json, text/event-stream")
        );
        assert_eq!(h.h.session_id.as_deref(), Some("abc"));
        assert!(h.keep_alive);
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
