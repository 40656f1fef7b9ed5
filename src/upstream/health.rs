//! Active health checks of HTTP upstreams, run by the control thread every 2 s with blocking
//! sockets and short timeouts (never on a worker, never on a request's path).
//!
//! - A single `url` is checked as before: ready while a `GET` of its endpoint gets any HTTP
//!   answer (an error status is an answer too).
//! - Each replica of a balanced server (`urls`) gets the MCP `initialize` handshake: healthy
//!   when it answers 200 with a `serverInfo`. What it says it is (name, version, protocol
//!   version) is remembered; a replica that starts answering as another server gets a new
//!   epoch, which ends every session opened on it before (404: the client initializes again).
//!   The session the check opened is ended again at once (`DELETE`), so checks leave nothing
//!   behind on the server. A failed check counts towards ejection like a failed request; a good
//!   one brings an ejected replica back.

use super::balance::{HttpServer, Replica};
use crate::config::HttpEndpoint;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// How long one check (connect, then the whole answer) may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// Cap on an answer to the check's initialize: far above any real one.
const ANSWER_CAP: usize = 256 * 1024;
/// The check's initialize request.
const INIT: &str = concat!(
    r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","#,
    r#""capabilities":{},"clientInfo":{"name":"mcp-guard-health","version":""#,
    env!("CARGO_PKG_VERSION"),
    r#""}}}"#
);

/// Checks every replica of `server` (route `name`), updating what the workers see and
/// logging each change. Replicas are checked at once (each on a thread of its own, a few at a
/// time), so replicas that accept and never answer cost a round one check timeout, not one
/// each.
pub fn check(name: &str, server: &HttpServer) {
    for batch in server.replicas().chunks(CHECKS_AT_ONCE) {
        std::thread::scope(|scope| {
            for r in batch {
                scope.spawn(move || check_replica(name, server, r));
            }
        });
    }
}

/// Replicas checked in parallel at most.
const CHECKS_AT_ONCE: usize = 32;

fn check_replica(name: &str, server: &HttpServer, r: &Replica) {
    let (ep, state) = (&r.endpoint, &r.state);
    if !server.is_balanced() {
        // Ready means the upstream answers HTTP, not merely that its port accepts.
        let ok = ep.addrs.iter().any(|a| answers_http(*a, ep));
        if state.checked_single(ok) {
            if ok {
                tracing::info!(target: "mcp_guard::upstream", "upstream {name} ({}) reachable", ep.url);
            } else {
                tracing::warn!(target: "mcp_guard::upstream", "upstream {name} ({}) unreachable", ep.url);
            }
        }
        return;
    }
    match probe_initialize(ep, &server.settings.headers) {
        Ok(identity) => {
            let first = state.identity().is_none();
            let (back, was) = state.checked_ok(identity.clone());
            if let Some(was) = was {
                tracing::warn!(
                    target: "mcp_guard::upstream",
                    "server {name}: replica {} now answers as {identity} (was {was}); the sessions opened on it are ended",
                    ep.url
                );
            } else if first {
                tracing::info!(target: "mcp_guard::upstream", "server {name}: replica {} answers as {identity}", ep.url);
            }
            if back {
                tracing::info!(target: "mcp_guard::upstream", "server {name}: replica {} healthy again", ep.url);
            }
        }
        Err(why) => {
            if state.failed() {
                tracing::warn!(target: "mcp_guard::upstream", "server {name}: replica {} ejected: {why}", ep.url);
            } else {
                tracing::debug!(target: "mcp_guard::upstream", "server {name}: replica {} failed its check: {why}", ep.url);
            }
        }
    }
}

/// Whether an HTTP response head starts coming back, within a second, to a `GET` of the MCP
/// endpoint without a session (any status counts: an error is an answer too).
fn answers_http(addr: SocketAddr, ep: &HttpEndpoint) -> bool {
    let Ok(mut conn) = TcpStream::connect_timeout(&addr, CHECK_TIMEOUT) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(CHECK_TIMEOUT));
    let _ = conn.set_write_timeout(Some(CHECK_TIMEOUT));
    let probe = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nConnection: close\r\n\r\n",
        ep.path, ep.host_header
    );
    if conn.write_all(probe.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    let mut got = 0;
    while got < head.len() {
        match conn.read(&mut head[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    head[..got].starts_with(b"HTTP/1.")
}

/// The MCP handshake against one replica: what it says it is, or why it failed. The session
/// it opens is ended again.
pub fn probe_initialize(ep: &HttpEndpoint, headers: &[(String, String)]) -> Result<String, String> {
    let mut last = String::from("no address");
    for addr in &ep.addrs {
        let mut conn = match TcpStream::connect_timeout(addr, CHECK_TIMEOUT) {
            Ok(c) => c,
            Err(e) => {
                last = format!("cannot connect to {addr}: {e}");
                continue;
            }
        };
        // One deadline for the whole exchange: a per-read timeout alone would let a server
        // that trickles bytes hold the control thread for ever.
        let deadline = Instant::now() + CHECK_TIMEOUT;
        let mut req = format!(
            "POST {} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\nconnection: close\r\ncontent-length: {}\r\n",
            ep.path,
            ep.host_header,
            INIT.len()
        );
        push_headers(&mut req, headers);
        req.push_str("\r\n");
        req.push_str(INIT);
        let _ = conn.set_write_timeout(Some(CHECK_TIMEOUT));
        conn.write_all(req.as_bytes())
            .map_err(|e| format!("cannot send initialize to {addr}: {e}"))?;
        let answer =
            read_answer(&mut conn, deadline).map_err(|e| format!("initialize at {addr}: {e}"))?;
        drop(conn);
        if let Some(sid) = &answer.session {
            end_session(*addr, ep, headers, sid, &answer.protocol);
        }
        return Ok(answer.identity);
    }
    Err(last)
}

/// Appends `name: value` lines for the upstream's configured headers.
pub(crate) fn push_headers(req: &mut String, headers: &[(String, String)]) {
    for (n, v) in headers {
        req.push_str(n);
        req.push_str(": ");
        req.push_str(v);
        req.push_str("\r\n");
    }
}

/// A replica's answer to the check's initialize.
#[derive(Debug, PartialEq)]
struct Answer {
    /// `<name> <version>, protocol <version>`.
    identity: String,
    /// The negotiated protocol version.
    protocol: String,
    /// The session the answer opened.
    session: Option<String>,
}

/// Reads until the answer is complete (an SSE stream may stay open after it), the connection
/// closes, or `deadline` passes.
fn read_answer(conn: &mut TcpStream, deadline: Instant) -> Result<Answer, String> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("no complete answer in time".into());
        }
        let _ = conn.set_read_timeout(Some(left));
        let eof = match conn.read(&mut buf) {
            Ok(0) => true,
            Ok(n) => {
                raw.extend_from_slice(&buf[..n]);
                raw.len() >= ANSWER_CAP
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => false,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err("no complete answer in time".into());
            }
            Err(e) => return Err(e.to_string()),
        };
        if let Some(result) = parse_answer(&raw, eof) {
            return result;
        }
        if eof {
            return Err("the connection closed before a complete answer".into());
        }
    }
}

/// The answer in `raw`, if it is complete (`eof`: nothing more will come); `None` to read on.
fn parse_answer(raw: &[u8], eof: bool) -> Option<Result<Answer, String>> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if !eof => return None,
        _ => return Some(Err("not a valid HTTP response".into())),
    };
    let status = resp.code.unwrap_or(0);
    if status != 200 {
        return Some(Err(format!("HTTP {status}")));
    }
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).into_owned())
    };
    // Only an id that can travel back in a header unchanged is ended again.
    let session = header("mcp-session-id")
        .filter(|s| !s.is_empty() && s.bytes().all(|b| (0x21..=0x7e).contains(&b)));
    let is_sse = header("content-type").is_some_and(|c| crate::http::is_event_stream(&c));
    let chunked = header("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked"));
    let mut body = raw[head_len..].to_vec();
    if chunked {
        let mut out = Vec::new();
        let mut dec = crate::http::chunked::ChunkedDecoder::new(ANSWER_CAP as u64);
        if dec.decode(&body, &mut out).is_err() {
            return Some(Err("malformed chunked body".into()));
        }
        body = out;
    }
    let message: serde_json::Value = if is_sse {
        // Complete `data:` lines only; the response is the one carrying our id.
        let text = String::from_utf8_lossy(&body);
        let complete = text.rfind('\n').map_or("", |i| &text[..i]);
        let found = complete
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .filter_map(|d| serde_json::from_str::<serde_json::Value>(d.trim()).ok())
            .find(|m| m.get("id").is_some() && (m.get("result").or(m.get("error")).is_some()));
        match found {
            Some(m) => m,
            None if eof => return Some(Err("no JSON-RPC response in the SSE stream".into())),
            None => return None,
        }
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(_) if !eof => return None,
            Err(e) => return Some(Err(format!("invalid JSON: {e}"))),
        }
    };
    Some(identity(&message).map(|(identity, protocol)| Answer {
        identity,
        protocol,
        session,
    }))
}

/// What an initialize result says the server is, and its protocol version.
fn identity(message: &serde_json::Value) -> Result<(String, String), String> {
    if let Some(err) = message.get("error") {
        return Err(format!("initialize returned an error: {err}"));
    }
    let result = message.get("result").ok_or("the answer has no result")?;
    let text = |p: &str| result.pointer(p).and_then(|v| v.as_str());
    let name = text("/serverInfo/name").ok_or("the answer has no serverInfo.name")?;
    let version = text("/serverInfo/version").unwrap_or("?");
    let protocol = text("/protocolVersion").ok_or("the answer has no protocolVersion")?;
    // Printable: it goes to the log and to /ready.
    let clean = |s: &str| -> String {
        s.chars()
            .take(128)
            .map(|c| if c.is_control() { '?' } else { c })
            .collect()
    };
    Ok((
        format!(
            "{} {}, protocol {}",
            clean(name),
            clean(version),
            clean(protocol)
        ),
        clean(protocol),
    ))
}

/// Completes the handshake of the session a check opened, as a client must
/// (`notifications/initialized`), then ends it (`DELETE`). Best effort: a server that keeps
/// the session expires it itself.
pub fn end_session(
    addr: SocketAddr,
    ep: &HttpEndpoint,
    headers: &[(String, String)],
    sid: &str,
    protocol: &str,
) {
    const INITIALIZED: &str = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
    let visible = |s: &str| !s.is_empty() && s.bytes().all(|b| (0x21..=0x7e).contains(&b));
    if !visible(sid) {
        return;
    }
    for (method, body) in [("POST", INITIALIZED), ("DELETE", "")] {
        let Ok(mut conn) = TcpStream::connect_timeout(&addr, CHECK_TIMEOUT) else {
            return;
        };
        let _ = conn.set_write_timeout(Some(CHECK_TIMEOUT));
        let _ = conn.set_read_timeout(Some(CHECK_TIMEOUT));
        let mut req = format!(
            "{method} {} HTTP/1.1\r\nhost: {}\r\nmcp-session-id: {sid}\r\nconnection: close\r\n",
            ep.path, ep.host_header
        );
        if method == "POST" {
            req.push_str(&format!(
                "content-type: application/json\r\naccept: application/json, text/event-stream\r\ncontent-length: {}\r\n",
                body.len()
            ));
        }
        if visible(protocol) {
            req.push_str(&format!("mcp-protocol-version: {protocol}\r\n"));
        }
        push_headers(&mut req, headers);
        req.push_str("\r\n");
        req.push_str(body);
        if conn.write_all(req.as_bytes()).is_ok() {
            // Wait for the status line, so the server has taken the request before we go on.
            let mut head = [0u8; 12];
            let _ = conn.read(&mut head);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RESULT: &str = r#"{"jsonrpc":"2.0","id":1,"result":{"protocolVersion":"2025-06-18","serverInfo":{"name":"srv","version":"1.2"},"capabilities":{}}}"#;

    #[test]
    fn a_json_answer_names_the_server_and_its_session() {
        let raw = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nmcp-session-id: abc\r\ncontent-length: {}\r\n\r\n{RESULT}",
            RESULT.len()
        );
        let a = parse_answer(raw.as_bytes(), false).unwrap().unwrap();
        assert_eq!(a.identity, "srv 1.2, protocol 2025-06-18");
        assert_eq!(a.protocol, "2025-06-18");
        assert_eq!(a.session.as_deref(), Some("abc"));
        // Half a body: read on.
        assert!(parse_answer(&raw.as_bytes()[..raw.len() - 5], false).is_none());
        assert!(parse_answer(&raw.as_bytes()[..10], false).is_none());
    }

    #[test]
    fn an_sse_answer_is_complete_at_its_response_line_even_if_the_stream_stays_open() {
        let events = format!(
            "data: {{\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\"}}\n\ndata: {RESULT}\n\n"
        );
        let chunked = format!("{:x}\r\n{events}\r\n", events.len());
        let raw = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{chunked}"
        );
        let a = parse_answer(raw.as_bytes(), false).unwrap().unwrap();
        assert_eq!(a.identity, "srv 1.2, protocol 2025-06-18");
        assert_eq!(a.session, None);
        // The response line cut short: read on.
        let cut = &raw.as_bytes()[..raw.len() - 20];
        assert!(parse_answer(cut, false).is_none());
        assert!(parse_answer(cut, true).unwrap().is_err());
    }

    #[test]
    fn errors_and_answers_without_server_info_fail_the_check() {
        let body = |b: &str| format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{b}", b.len());
        for (raw, why) in [
            (
                "HTTP/1.1 503 x\r\ncontent-length: 0\r\n\r\n".to_string(),
                "HTTP 503",
            ),
            ("garbage\r\n\r\n".to_string(), "not a valid HTTP response"),
            (
                body(r#"{"jsonrpc":"2.0","id":1,"error":{"code":1,"message":""}}"#),
                "returned an error",
            ),
            (
                body(r#"{"jsonrpc":"2.0","id":1,"result":{}}"#),
                "no serverInfo",
            ),
            (body("{"), "invalid JSON"),
        ] {
            let e = parse_answer(raw.as_bytes(), true).unwrap().unwrap_err();
            assert!(e.contains(why), "{raw}: {e}");
        }
        // A session id that could not travel back unchanged is not kept.
        let raw = format!(
            "HTTP/1.1 200 OK\r\nmcp-session-id: a\u{e9}b\r\ncontent-length: {}\r\n\r\n{RESULT}",
            RESULT.len()
        );
        assert_eq!(
            parse_answer(raw.as_bytes(), true).unwrap().unwrap().session,
            None
        );
    }
}
