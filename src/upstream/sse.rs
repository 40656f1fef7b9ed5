//! A legacy HTTP+SSE (2024-11-05) upstream connection, run as the stdio hub's "child": the
//! hub's router sends it one JSON-RPC line at a time and reads one message at a time, exactly
//! as with a process, so shared and per-session modes, id remapping, progress routing and
//! restart with backoff are the router's and the supervisor's, not repeated here.
//!
//! Two threads (never a worker; both block, with timeouts where a peer could stall them): a
//! *reader* opens the server's SSE stream (`GET url`), waits for its `endpoint` event,
//! resolves it against the configured URL and refuses any other origin (scheme, host or port:
//! a server must not send the gateway's messages, and the upstream credentials in `headers`,
//! elsewhere), then turns every `message` event into a line for the router; a *writer* POSTs
//! each line to the endpoint on a kept-alive connection. Either one ending ends the link,
//! once; the supervisor then reconnects with backoff.

use crate::config::{HttpEndpoint, SseSettings};
use crate::http::chunked::ChunkedDecoder;
use crate::http::sse::SseDecoder;
use crate::upstream::health::push_headers;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Connecting, and the stream's response head.
const CONNECT: Duration = Duration::from_secs(5);
/// From connecting to the `endpoint` event.
const HANDSHAKE: Duration = Duration::from_secs(10);
/// One POST, from writing it to the end of its (small) answer.
const POST: Duration = Duration::from_secs(30);
/// The largest response head or POST answer read.
const HEAD_CAP: usize = 64 * 1024;
/// The longest `endpoint` accepted (it becomes our request line).
const MAX_ENDPOINT: usize = 8 * 1024;
/// The largest single event on the stream.
const EVENT_CAP: u64 = 64 * 1024 * 1024;

/// Called once, with why, when a link ends.
type OnEnd = Box<dyn FnOnce(String) + Send>;

/// A running link; dropping it does not stop it, [`SseLink::cut`] does.
pub struct SseLink {
    stream: Arc<Mutex<Option<TcpStream>>>,
    ended: Arc<AtomicBool>,
}

impl SseLink {
    /// Opens the link: `lines` are posted to the server, each message the server sends is
    /// given to `on_message` (false: stop), and `on_end` is called once when the link ends for
    /// any reason, with why.
    pub fn open(
        settings: &SseSettings,
        lines: Receiver<Vec<u8>>,
        on_message: impl FnMut(Vec<u8>) -> bool + Send + Clone + 'static,
        on_end: impl FnOnce(String) + Send + 'static,
    ) -> std::io::Result<SseLink> {
        let stream: Arc<Mutex<Option<TcpStream>>> = Arc::default();
        let ended = Arc::new(AtomicBool::new(false));
        let on_end: Arc<Mutex<Option<OnEnd>>> = Arc::new(Mutex::new(Some(Box::new(on_end))));
        let end = {
            let (on_end, ended) = (on_end.clone(), ended.clone());
            move |why: String| {
                ended.store(true, Ordering::Relaxed);
                let f = on_end.lock().ok().and_then(|mut f| f.take());
                if let Some(f) = f {
                    f(why);
                }
            }
        };
        let (endpoint_tx, endpoint_rx) = std::sync::mpsc::sync_channel::<String>(1);
        let refused = on_message.clone();
        let reader = {
            let (settings, stream, end) = (settings.clone(), stream.clone(), end.clone());
            move || {
                let why = read_stream(&settings, &stream, endpoint_tx, on_message);
                end(why);
            }
        };
        std::thread::Builder::new()
            .name("sse-reader".into())
            .spawn(reader)?;
        let writer = {
            let settings = settings.clone();
            move || {
                if let Some(why) = write_lines(&settings, endpoint_rx, lines, refused) {
                    end(why);
                }
            }
        };
        std::thread::Builder::new()
            .name("sse-writer".into())
            .spawn(writer)?;
        Ok(SseLink { stream, ended })
    }

    /// Ends the link: the stream is shut down, which ends the reader (the writer ends when
    /// its lines' sender is dropped).
    pub fn cut(&self) {
        self.ended.store(true, Ordering::Relaxed);
        if let Ok(mut s) = self.stream.lock()
            && let Some(s) = s.take()
        {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn connect(ep: &HttpEndpoint) -> Result<TcpStream, String> {
    let mut last = "no address".to_string();
    for addr in &ep.addrs {
        match TcpStream::connect_timeout(addr, CONNECT) {
            Ok(c) => {
                let _ = c.set_nodelay(true);
                return Ok(c);
            }
            Err(e) => last = format!("cannot connect to {addr}: {e}"),
        }
    }
    Err(last)
}

/// How a response body is framed.
enum Framing {
    Length(u64),
    Chunked,
    UntilClose,
}

/// A parsed response head: status, content type, framing, and the bytes after the head.
struct Head {
    status: u16,
    content_type: Option<String>,
    framing: Framing,
    rest: Vec<u8>,
}

/// Reads a response head (up to [`HEAD_CAP`]) before `deadline`.
fn read_head(conn: &mut TcpStream, deadline: Instant) -> Result<Head, String> {
    let mut raw = Vec::with_capacity(4096);
    let mut buf = [0u8; 8192];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("no response head in time".into());
        }
        let _ = conn.set_read_timeout(Some(left));
        let n = conn
            .read(&mut buf)
            .map_err(|e| format!("reading the response: {e}"))?;
        if n == 0 {
            return Err("connection closed before a response".into());
        }
        raw.extend_from_slice(&buf[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&raw) {
            Ok(httparse::Status::Complete(len)) => {
                let status = resp.code.unwrap_or(0);
                let mut content_type = None;
                let mut framing = Framing::UntilClose;
                for h in resp.headers.iter() {
                    let value = String::from_utf8_lossy(h.value).trim().to_string();
                    if h.name.eq_ignore_ascii_case("content-type") {
                        content_type = Some(value.to_ascii_lowercase());
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        if value.to_ascii_lowercase().ends_with("chunked") {
                            framing = Framing::Chunked;
                        }
                    } else if h.name.eq_ignore_ascii_case("content-length")
                        && !matches!(framing, Framing::Chunked)
                    {
                        let n = value
                            .parse()
                            .map_err(|_| format!("bad content-length `{value}`"))?;
                        framing = Framing::Length(n);
                    }
                }
                if status == 204 || status == 304 || (100..200).contains(&status) {
                    framing = Framing::Length(0);
                }
                return Ok(Head {
                    status,
                    content_type,
                    framing,
                    rest: raw[len..].to_vec(),
                });
            }
            Ok(httparse::Status::Partial) if raw.len() < HEAD_CAP => {}
            Ok(httparse::Status::Partial) => return Err("response head too large".into()),
            Err(e) => return Err(format!("malformed response: {e}")),
        }
    }
}

/// The reader: opens the stream, hands the endpoint to the writer, relays messages. Returns
/// why it ended.
fn read_stream(
    s: &SseSettings,
    shared: &Mutex<Option<TcpStream>>,
    endpoint_tx: SyncSender<String>,
    mut on_message: impl FnMut(Vec<u8>) -> bool,
) -> String {
    let ep = &s.endpoint;
    let mut conn = match connect(ep) {
        Ok(c) => c,
        Err(e) => return format!("SSE upstream {}: {e}", ep.url),
    };
    match (conn.try_clone(), shared.lock()) {
        (Ok(c), Ok(mut slot)) => *slot = Some(c),
        _ => return "cannot keep the SSE connection".into(),
    }
    let mut req = format!(
        "GET {} HTTP/1.1\r\nhost: {}\r\naccept: text/event-stream\r\ncache-control: no-cache\r\n",
        ep.path, ep.host_header
    );
    push_headers(&mut req, &s.headers);
    req.push_str("\r\n");
    let _ = conn.set_write_timeout(Some(CONNECT));
    if let Err(e) = conn.write_all(req.as_bytes()) {
        return format!("SSE upstream {}: cannot send the request: {e}", ep.url);
    }
    let handshake_deadline = Instant::now() + HANDSHAKE;
    let head = match read_head(&mut conn, Instant::now() + CONNECT) {
        Ok(h) => h,
        Err(e) => return format!("SSE upstream {}: {e}", ep.url),
    };
    if head.status != 200 {
        return format!("SSE upstream {} answered HTTP {}", ep.url, head.status);
    }
    if !head
        .content_type
        .as_deref()
        .is_some_and(crate::http::is_event_stream)
    {
        return format!(
            "SSE upstream {} did not answer with an event stream",
            ep.url
        );
    }
    let mut chunked = match head.framing {
        Framing::Chunked => Some(ChunkedDecoder::new(u64::MAX)),
        _ => None,
    };
    let mut left = match head.framing {
        Framing::Length(n) => Some(n),
        _ => None,
    };
    let mut decoder = SseDecoder::default();
    let mut endpoint_tx = Some(endpoint_tx);
    let mut pending = head.rest;
    let mut buf = vec![0u8; 16 * 1024];
    let mut event_bytes: u64 = 0;
    loop {
        // De-frame what arrived into SSE bytes.
        let mut body = Vec::new();
        if let Some(d) = chunked.as_mut() {
            match d.decode(&pending, &mut body) {
                Ok(used) => {
                    pending.drain(..used);
                }
                Err(_) => return format!("SSE upstream {}: malformed chunked body", ep.url),
            }
        } else {
            let take = left.map_or(pending.len(), |l| pending.len().min(l as usize));
            body.extend(pending.drain(..take));
            if let Some(l) = left.as_mut() {
                *l -= take as u64;
            }
        }
        event_bytes += body.len() as u64;
        let events = match decoder.push(&body) {
            Ok(events) => events,
            Err(e) => return format!("SSE upstream {}: {e}", ep.url),
        };
        if !events.is_empty() {
            event_bytes = 0;
        }
        for event in events {
            // An event without data is never dispatched (a comment, a lone `retry:` or `id:`):
            // servers send them as padding or keep-alives, before `endpoint` too.
            if event.data.is_empty() {
                continue;
            }
            if let Some(tx) = endpoint_tx.take() {
                // The first event must say where to post; nothing is relayed before it.
                if event.event.as_deref() != Some("endpoint") {
                    return format!("SSE upstream {}: the first event is not `endpoint`", ep.url);
                }
                match resolve_endpoint(ep, &event.data) {
                    Ok(target) => {
                        let _ = tx.send(target);
                        // From here the stream may stay idle for as long as the server likes.
                        let _ = conn.set_read_timeout(None);
                    }
                    Err(e) => return format!("SSE upstream {}: {e}", ep.url),
                }
                continue;
            }
            if event.is_message() && !on_message(event.data.into_bytes()) {
                return "link closed".into();
            }
        }
        if event_bytes > EVENT_CAP {
            return format!("SSE upstream {}: an event over {EVENT_CAP} bytes", ep.url);
        }
        let finished = chunked.as_ref().is_some_and(ChunkedDecoder::is_done) || left == Some(0);
        if finished {
            return format!("SSE upstream {} ended its stream", ep.url);
        }
        if endpoint_tx.is_some() {
            let remaining = handshake_deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return format!("SSE upstream {}: no `endpoint` event in time", ep.url);
            }
            let _ = conn.set_read_timeout(Some(remaining));
        }
        match conn.read(&mut buf) {
            Ok(0) => return format!("SSE upstream {} closed its stream", ep.url),
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return format!("SSE upstream {}: {e}", ep.url),
        }
    }
}

/// The request target to POST to, from an `endpoint` event's data: a path on the configured
/// server, or an absolute `http://` URL of the very same origin. Anything else is refused:
/// another host, port or scheme, and any byte that does not belong in a request line.
pub fn resolve_endpoint(base: &HttpEndpoint, data: &str) -> Result<String, String> {
    let data = data.trim();
    let shown: String = data.chars().take(120).collect();
    if data.len() > MAX_ENDPOINT {
        return Err(format!("its `endpoint` event is over {MAX_ENDPOINT} bytes"));
    }
    if data.is_empty() || !data.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(format!(
            "its `endpoint` event `{}` is not a URL",
            shown.escape_debug()
        ));
    }
    let target = if let Some(rest) = data.strip_prefix("//") {
        // Scheme-relative: the authority must still be ours.
        same_origin(base, rest, &shown)?
    } else if data.len() > 7 && data[..7].eq_ignore_ascii_case("http://") {
        same_origin(base, &data[7..], &shown)?
    } else if data.contains("://") || data.contains(':') && !data.starts_with('/') {
        return Err(format!(
            "its `endpoint` event `{shown}` names another origin; only the configured server is \
             posted to"
        ));
    } else if data.starts_with('/') {
        data.to_string()
    } else {
        // Relative to the stream URL's directory.
        let dir = match base.path.split('?').next().unwrap_or("/").rsplit_once('/') {
            Some((dir, _)) => dir,
            None => "",
        };
        format!("{dir}/{data}")
    };
    let target = target.split('#').next().unwrap_or_default().to_string();
    if !target.starts_with('/') {
        return Err(format!("its `endpoint` event `{shown}` is not a path"));
    }
    Ok(target)
}

/// The path of `authority_and_path` if its authority is `base`'s origin.
fn same_origin(
    base: &HttpEndpoint,
    authority_and_path: &str,
    shown: &str,
) -> Result<String, String> {
    let (authority, path) = match authority_and_path.find(['/', '?']) {
        Some(i) => authority_and_path.split_at(i),
        None => (authority_and_path, "/"),
    };
    let origin =
        |a: &str| crate::config::split_host_port(a, 80).map(|(h, p)| (h.to_ascii_lowercase(), p));
    if authority.contains('@')
        || origin(authority).is_none()
        || origin(authority) != origin(&base.host_header)
    {
        return Err(format!(
            "its `endpoint` event `{shown}` names another origin; only the configured server is \
             posted to"
        ));
    }
    Ok(if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_string()
    })
}

/// The writer: waits for the endpoint, then POSTs every line. A message the server refuses
/// (400: it could not read it) is answered with a JSON-RPC error through `refused`, so its
/// caller learns why at once; a server that no longer knows the session (404, 410) or cannot be
/// reached ends the link. Returns why it ended, or `None` when its lines ended (the supervisor
/// let go of the link).
fn write_lines(
    s: &SseSettings,
    endpoint: Receiver<String>,
    lines: Receiver<Vec<u8>>,
    mut refused: impl FnMut(Vec<u8>) -> bool,
) -> Option<String> {
    // The reader ends the link if the endpoint never comes; this only bounds the wait.
    let target = endpoint.recv_timeout(HANDSHAKE + CONNECT * 2).ok()?;
    let ep = &s.endpoint;
    let mut conn: Option<TcpStream> = None;
    for line in lines {
        let body = line.strip_suffix(b"\n").unwrap_or(&line);
        let mut req = format!(
            "POST {target} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
            ep.host_header,
            body.len()
        );
        push_headers(&mut req, &s.headers);
        req.push_str("\r\n");
        let mut request = req.into_bytes();
        request.extend_from_slice(body);
        // A kept-alive connection may have been closed by the server meanwhile: one retry on
        // a fresh one.
        let mut outcome = Err(String::new());
        for _ in 0..2 {
            let c = match conn.take() {
                Some(c) => c,
                None => match connect(ep) {
                    Ok(c) => c,
                    Err(e) => return Some(format!("SSE upstream {}: {e}", ep.url)),
                },
            };
            outcome = post_once(c, &request);
            if outcome.is_ok() {
                break;
            }
        }
        match outcome {
            Ok((status, reusable)) if (200..300).contains(&status) => conn = reusable,
            // The gateway's own credentials refused: no message will pass, and the challenge is
            // not the client's to see. The link ends; its requests fail naming the upstream.
            Ok((401, _)) => {
                return Some(format!(
                    "SSE upstream {} refused the gateway's credentials (HTTP 401)",
                    ep.url
                ));
            }
            Ok((status, reusable)) if !matches!(status, 404 | 410) && status < 500 => {
                conn = reusable;
                tracing::warn!(target: "mcp_guard::upstream", "SSE upstream {} refused a message: HTTP {status}", ep.url);
                if let Some(answer) = refusal(body, status)
                    && !refused(answer)
                {
                    return None;
                }
            }
            Ok((status, _)) => {
                return Some(format!(
                    "SSE upstream {} refused a message: HTTP {status}",
                    ep.url
                ));
            }
            Err(e) => return Some(format!("SSE upstream {}: posting a message: {e}", ep.url)),
        }
    }
    None
}

/// The error answering a refused request (`None` for a notification or response).
fn refusal(line: &[u8], status: u16) -> Option<Vec<u8>> {
    let message: serde_json::Value = serde_json::from_slice(line).ok()?;
    let id = message
        .get("id")
        .filter(|_| message.get("method").is_some())?;
    let answer = serde_json::json!({
        "jsonrpc": "2.0",
        "id": id,
        "error": {
            "code": crate::error::code::INVALID_REQUEST,
            "message": format!("the upstream refused the message (HTTP {status})"),
        },
    });
    Some(answer.to_string().into_bytes())
}

/// One POST on `conn`: the status, and the connection when it may be reused.
fn post_once(mut conn: TcpStream, request: &[u8]) -> Result<(u16, Option<TcpStream>), String> {
    let deadline = Instant::now() + POST;
    let _ = conn.set_write_timeout(Some(POST));
    conn.write_all(request).map_err(|e| e.to_string())?;
    let head = read_head(&mut conn, deadline)?;
    let mut rest = head.rest;
    let mut buf = [0u8; 8192];
    let mut more = |conn: &mut TcpStream, rest: &mut Vec<u8>| -> Result<bool, String> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("no complete answer in time".into());
        }
        let _ = conn.set_read_timeout(Some(left));
        let n = conn.read(&mut buf).map_err(|e| e.to_string())?;
        rest.extend_from_slice(&buf[..n]);
        if rest.len() > HEAD_CAP {
            return Err("answer too large".into());
        }
        Ok(n > 0)
    };
    let reusable = match head.framing {
        Framing::Length(n) => {
            while (rest.len() as u64) < n {
                if !more(&mut conn, &mut rest)? {
                    return Err("answer cut short".into());
                }
            }
            rest.len() as u64 == n
        }
        Framing::Chunked => {
            let mut d = ChunkedDecoder::new(HEAD_CAP as u64);
            let mut sink = Vec::new();
            loop {
                let used = d.decode(&rest, &mut sink).map_err(|_| "malformed answer")?;
                rest.drain(..used);
                if d.is_done() {
                    break rest.is_empty();
                }
                if !more(&mut conn, &mut rest)? {
                    return Err("answer cut short".into());
                }
            }
        }
        Framing::UntilClose => {
            while more(&mut conn, &mut rest)? {}
            false
        }
    };
    Ok((head.status, reusable.then_some(conn)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> HttpEndpoint {
        HttpEndpoint {
            url: "http://127.0.0.1:8080/sse".into(),
            addrs: vec!["127.0.0.1:8080".parse().unwrap()],
            host_header: "127.0.0.1:8080".into(),
            path: "/sse".into(),
        }
    }

    #[test]
    fn endpoints_on_the_same_origin_resolve() {
        let b = base();
        assert_eq!(
            resolve_endpoint(&b, "/messages?sessionId=a").unwrap(),
            "/messages?sessionId=a"
        );
        assert_eq!(
            resolve_endpoint(&b, "http://127.0.0.1:8080/m?s=1").unwrap(),
            "/m?s=1"
        );
        assert_eq!(
            resolve_endpoint(&b, "HTTP://127.0.0.1:8080/m").unwrap(),
            "/m"
        );
        assert_eq!(resolve_endpoint(&b, "//127.0.0.1:8080/m").unwrap(), "/m");
        assert_eq!(
            resolve_endpoint(&b, "messages?x=1").unwrap(),
            "/messages?x=1"
        );
        assert_eq!(
            resolve_endpoint(&b, "http://127.0.0.1:8080?s=1").unwrap(),
            "/?s=1"
        );
    }

    #[test]
    fn endpoints_elsewhere_or_malformed_are_refused() {
        let b = base();
        for bad in [
            "http://127.0.0.2:8080/m",
            "http://127.0.0.1:8081/m",
            "http://127.0.0.1/m",
            "https://127.0.0.1:8080/m",
            "//evil.example/m",
            "http://127.0.0.1:8080@evil.example/m",
            "http://user@127.0.0.1:8080/m",
            "ftp://127.0.0.1:8080/m",
            "javascript:alert(1)",
            "/m HTTP/1.1\r\nX-Injected: 1",
            "/m\u{0}",
            "",
        ] {
            assert!(resolve_endpoint(&b, bad).is_err(), "{bad:?} accepted");
        }
    }
}
