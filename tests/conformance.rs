//! The MCP 2025-11-25 conformance checklist, through the real binary: one test per MUST and
//! SHOULD of the Streamable HTTP transport (and of the stdio transport, where the gateway is the
//! client of its upstream), the lifecycle and the base protocol that a server or a proxy must
//! honour. Each test is named after the sentence it checks and quotes it; docs/conformance.md
//! is the table of them all.

mod common;

use common::*;
use mcp_guard::cli::hash_key;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One driver is enough here: the data-plane suite runs the transport on both.
const IO: &str = "auto";
/// The revisions the gateway serves (src/mcp/transport.rs); a negotiated version must be one.
const SERVED: [&str; 4] = ["2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"];
const PING: &str = r#"{"jsonrpc":"2.0","id":5,"method":"ping"}"#;
const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn stdio_gateway(demo_args: &[&str]) -> Gateway {
    Gateway::start(&stdio_config(IO, "", demo_args))
}

fn http_gateway(up: &DemoHttp) -> Gateway {
    Gateway::start(&http_config(IO, &up.url(), "", ""))
}

/// Runs `check` against a gateway in front of the demo server over stdio, then over HTTP.
fn on_both_upstreams(demo_args: &[&str], check: impl Fn(&str, &Gateway)) {
    check("stdio", &stdio_gateway(demo_args));
    let up = DemoHttp::start(demo_args);
    check("http", &http_gateway(&up));
}

fn initialize_with_version(addr: SocketAddr, version: &str) -> Response {
    let body = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"initialize","params":{{"protocolVersion":"{version}","capabilities":{{}},"clientInfo":{{"name":"conformance","version":"1"}}}}}}"#
    );
    mcp_post(addr, &body, None)
}

fn session_line(sid: Option<&str>) -> String {
    sid.map_or(String::new(), |s| format!("Mcp-Session-Id: {s}\r\n"))
}

fn get_raw(sid: Option<&str>, extra: &str) -> String {
    format!(
        "GET /mcp HTTP/1.1\r\nHost: t\r\n{}{extra}\r\n",
        session_line(sid)
    )
}

fn delete_raw(sid: Option<&str>, extra: &str) -> String {
    format!(
        "DELETE /mcp HTTP/1.1\r\nHost: t\r\n{}{extra}Connection: close\r\n\r\n",
        session_line(sid)
    )
}

/// Opens the session's GET stream and returns it with the response head.
fn open_stream(addr: SocketAddr, sid: &str, extra: &str) -> (TcpStream, String) {
    let mut s = connect(addr);
    s.write_all(get_raw(Some(sid), &format!("Accept: text/event-stream\r\n{extra}")).as_bytes())
        .unwrap();
    let head = read_until(&mut s, b"\r\n\r\n");
    (s, head)
}

/// Reads until `needle` has been seen, or the read times out or the stream ends.
fn read_until(s: &mut TcpStream, needle: &[u8]) -> String {
    let mut got = Vec::new();
    read_more(s, &mut got, needle);
    String::from_utf8_lossy(&got).into_owned()
}

/// Reads until an SSE event whose text holds `needle` is complete.
fn read_event_with(s: &mut TcpStream, needle: &[u8]) -> String {
    let mut got = Vec::new();
    if read_more(s, &mut got, needle) {
        let from = got.len();
        while !got[from..].windows(2).any(|w| w == b"\n\n") && read_more(s, &mut got, b"\n") {}
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Appends to `got` at least one byte and until it ends with `needle`; false when the stream
/// ended or timed out first.
fn read_more(s: &mut TcpStream, got: &mut Vec<u8>, needle: &[u8]) -> bool {
    let mut byte = [0u8; 1];
    loop {
        match s.read(&mut byte) {
            Ok(1) => got.push(byte[0]),
            _ => return false,
        }
        if got.ends_with(needle) {
            return true;
        }
    }
}

/// The JSON-RPC messages in raw SSE text (chunk framing included).
fn data_messages(sse: &str) -> Vec<Value> {
    sse.lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("data:"))
        .filter(|d| !d.trim().is_empty())
        .map(|d| serde_json::from_str(d.trim()).unwrap())
        .collect()
}

fn content_type(r: &Response) -> &str {
    r.header("content-type").unwrap_or_default()
}

fn is_sse(r: &Response) -> bool {
    content_type(r).starts_with("text/event-stream")
}

/// Asserts that a refusal body, when there is one, is a JSON-RPC error with an integer code.
fn assert_error_body(r: &Response, what: &str) {
    if r.body.is_empty() {
        return;
    }
    let v = r.json();
    assert_eq!(v["jsonrpc"], "2.0", "{what}: {}", r.text());
    assert!(v["error"]["code"].is_i64(), "{what}: {}", r.text());
    assert!(v["error"]["message"].is_string(), "{what}: {}", r.text());
}

/// A file the demo server (`--log-input`) appends every line it reads on stdin to.
struct InputLog {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

impl InputLog {
    fn new() -> InputLog {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdin.jsonl");
        InputLog { _dir: dir, path }
    }

    fn arg(&self) -> &str {
        self.path.to_str().unwrap()
    }

    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.path)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn messages(&self) -> Vec<Value> {
        self.lines()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
            .collect()
    }

    /// Waits until some line contains `needle`.
    fn wait_for(&self, needle: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.lines().iter().any(|l| l.contains(needle)) {
            assert!(
                Instant::now() < deadline,
                "{needle} never reached the child"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A request as the fake upstream saw it.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    headers: Vec<(String, String)>,
    body: String,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

/// Versions the fake upstream supports, newest first: one newer than any the gateway serves,
/// as a server of a later revision would.
const FAKE_VERSIONS: [&str; 4] = ["2026-07-28", "2025-11-25", "2025-06-18", "2025-03-26"];

/// A minimal Streamable HTTP server that records every request. It answers `initialize` with
/// the requested version when it supports it (else its newest) and a fresh session, other
/// requests with an empty result (a call of the tool `slow` after 3 s), notifications and
/// responses with 202, GET with 405 (it offers no stream) and DELETE with 200. Stopped on drop.
struct FakeUpstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
}

impl FakeUpstream {
    fn start() -> FakeUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let sessions = Arc::new(AtomicU64::new(0));
        let (seen2, stop2) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (seen, sessions) = (seen2.clone(), sessions.clone());
                std::thread::spawn(move || fake_serve(conn, &seen, &sessions));
            }
        });
        FakeUpstream { addr, seen, stop }
    }

    fn url(&self) -> String {
        format!("http://{}/mcp", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // The accept loop only looks at the flag when a connection arrives.
        let _ = TcpStream::connect(self.addr);
    }
}

/// One request per connection (`Connection: close`), which every client must cope with.
fn fake_serve(conn: TcpStream, seen: &Mutex<Vec<Seen>>, sessions: &AtomicU64) {
    let _ = conn.set_read_timeout(Some(WAIT));
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let method = line.split(' ').next().unwrap_or_default().to_string();
    let mut headers = Vec::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((n, v)) = l.split_once(':') {
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let len = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let request = Seen {
        method,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    seen.lock().unwrap().push(request.clone());
    let (status, extra, payload) = fake_answer(&request, sessions);
    let mut out = conn;
    let _ = write!(
        out,
        "HTTP/1.1 {status} X\r\nConnection: close\r\nContent-Length: {}\r\n{extra}\r\n{payload}",
        payload.len()
    );
    let _ = out.shutdown(Shutdown::Write);
}

fn fake_answer(r: &Seen, sessions: &AtomicU64) -> (u16, String, String) {
    const JSON: &str = "Content-Type: application/json\r\n";
    match r.method.as_str() {
        "GET" => (405, "Allow: POST, DELETE\r\n".into(), String::new()),
        "DELETE" => (200, String::new(), String::new()),
        _ => {
            let msg = r.json();
            let (Some(method), Some(id)) = (msg["method"].as_str(), msg.get("id")) else {
                return (202, String::new(), String::new());
            };
            if method != "initialize" {
                if msg["params"]["name"] == "slow" {
                    // Longer than any test's upstream timeout: the gateway gives up first.
                    std::thread::sleep(Duration::from_secs(3));
                }
                let body = json!({"jsonrpc": "2.0", "id": id, "result": {}});
                return (200, JSON.into(), body.to_string());
            }
            let asked = msg["params"]["protocolVersion"].as_str().unwrap_or("");
            let version = FAKE_VERSIONS
                .iter()
                .find(|v| **v == asked)
                .unwrap_or(&FAKE_VERSIONS[0]);
            let n = sessions.fetch_add(1, Ordering::SeqCst) + 1;
            let body = json!({"jsonrpc": "2.0", "id": id, "result": {
                "protocolVersion": version, "capabilities": {},
                "serverInfo": {"name": "fake", "version": "1"}}});
            (
                200,
                format!("{JSON}Mcp-Session-Id: fake-{n}\r\n"),
                body.to_string(),
            )
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Streamable HTTP: the endpoint and its security
// ---------------------------------------------------------------------------------------------

/// "The server MUST provide a single HTTP endpoint path (hereafter referred to as the MCP
/// endpoint) that supports both POST and GET methods."
#[test]
fn must_serve_post_and_get_on_one_mcp_endpoint() {
    on_both_upstreams(&[], |kind, g| {
        let sid = initialize(g.addr);
        let r = mcp_post(g.addr, PING, Some(&sid));
        assert_eq!(r.status, 200, "{kind}: {}", r.text());
        let (_stream, head) = open_stream(g.addr, &sid, "");
        assert!(head.starts_with("HTTP/1.1 200"), "{kind}: {head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/event-stream"),
            "{kind}: {head}"
        );
    });
}

/// "Servers MUST validate the `Origin` header on all incoming connections to prevent DNS
/// rebinding attacks. If the `Origin` header is present and invalid, servers MUST respond with
/// HTTP 403 Forbidden. The HTTP response body MAY comprise a JSON-RPC error response that has
/// no `id`."
#[test]
fn must_validate_origin_header_and_answer_403_when_invalid() {
    // With no allow-list every browser origin is invalid; with one, only its entries are valid.
    for allowed in ["", "allowed_origins = [\"https://app.example.com\"]"] {
        let g = Gateway::start(&stdio_config(IO, allowed, &[]));
        let sid = initialize(g.addr);
        for origin in [
            "https://evil.example.com",
            "null",
            "http://127.0.0.1.evil.example",
        ] {
            let o = format!("Origin: {origin}\r\n");
            for (what, raw) in [
                ("POST", mcp_post_raw(INIT, None, &o)),
                ("POST in session", mcp_post_raw(PING, Some(&sid), &o)),
                (
                    "GET",
                    get_raw(Some(&sid), &format!("Accept: text/event-stream\r\n{o}")),
                ),
                ("DELETE", delete_raw(Some(&sid), &o)),
            ] {
                let r = request(g.addr, &raw);
                assert_eq!(r.status, 403, "{allowed:?} {origin} {what}: {}", r.text());
                assert_error_body(&r, what);
            }
        }
        // The session survived every refused request, DELETE included.
        assert_eq!(mcp_post(g.addr, PING, Some(&sid)).status, 200);
        if !allowed.is_empty() {
            let r = request(
                g.addr,
                &mcp_post_raw(INIT, None, "Origin: https://app.example.com\r\n"),
            );
            assert_eq!(r.status, 200, "{}", r.text());
        }
    }
}

/// "When running locally, servers SHOULD bind only to localhost (127.0.0.1) rather than all
/// network interfaces (0.0.0.0)."
#[test]
fn should_bind_only_to_localhost_by_default() {
    // stdio_config names no host: the defaults are in force for both listeners.
    let g = stdio_gateway(&[]);
    assert!(g.addr.ip().is_loopback(), "data plane on {}", g.addr);
    assert!(g.admin.ip().is_loopback(), "admin on {}", g.admin);
}

/// "Servers SHOULD implement proper authentication for all connections."
#[test]
fn should_implement_authentication_for_all_connections() {
    let key = "conformance-key-0123456789";
    let cfg = format!(
        "{}\n[[auth.api_keys]]\nid = \"client\"\nkey_hash = \"{}\"\n",
        stdio_config(IO, "", &[]),
        hash_key(key)
    );
    let g = Gateway::start(&cfg);
    let (_, sid) = initialize_at(g.addr, "/mcp", &bearer(key));
    for (what, raw) in [
        ("POST initialize", mcp_post_raw(INIT, None, "")),
        ("POST in session", mcp_post_raw(PING, Some(&sid), "")),
        (
            "GET",
            get_raw(
                Some(&sid),
                "Accept: text/event-stream\r\nConnection: close\r\n",
            ),
        ),
        ("DELETE", delete_raw(Some(&sid), "")),
        (
            "POST, wrong key",
            mcp_post_raw(PING, Some(&sid), &bearer("not-the-key-0123456789")),
        ),
    ] {
        let r = request(g.addr, &raw);
        assert_eq!(r.status, 401, "{what}: {}", r.text());
        assert!(r.header("www-authenticate").is_some(), "{what}");
    }
    let r = request(g.addr, &mcp_post_raw(PING, Some(&sid), &bearer(key)));
    assert_eq!(r.status, 200, "{}", r.text());
    // Without keys the gateway serves anyone, and says so at start.
    let open = stdio_gateway(&[]);
    assert!(open.wait_log("no authentication is configured", WAIT));
}

// ---------------------------------------------------------------------------------------------
// Streamable HTTP: sending messages to the server
// ---------------------------------------------------------------------------------------------

/// "If the input is a JSON-RPC request, the server MUST either return
/// `Content-Type: text/event-stream`, to initiate an SSE stream, or
/// `Content-Type: application/json`, to return one JSON object."
#[test]
fn must_answer_a_post_request_with_json_or_an_sse_stream() {
    let progress = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"progress","arguments":{"steps":2},"_meta":{"progressToken":"p"}}}"#;
    let plain = call(8, "echo", r#"{"text":"x"}"#);
    for args in [&[][..], &["--sse-responses"][..]] {
        on_both_upstreams(args, |kind, g| {
            let sid = initialize(g.addr);
            for (body, id) in [(PING, 5), (plain.as_str(), 8), (progress, 7)] {
                let r = mcp_post(g.addr, body, Some(&sid));
                assert_eq!(r.status, 200, "{kind} {args:?}: {}", r.text());
                let ct = content_type(&r);
                let message = if is_sse(&r) {
                    r.sse_messages()
                        .into_iter()
                        .find(|m| m.get("id").is_some())
                        .expect("the response among the events")
                } else {
                    assert!(ct.starts_with("application/json"), "{kind}: {ct}");
                    let v = r.json();
                    assert!(v.is_object(), "one JSON object: {v}");
                    v
                };
                assert_eq!(message["id"], id, "{kind} {args:?}");
            }
        });
    }
}

/// "If the input is a JSON-RPC response or notification: If the server accepts the input, the
/// server MUST return HTTP status code 202 Accepted with no body." (With the lifecycle's "the
/// client MUST send an `initialized` notification", and the base protocol's "The receiver MUST
/// NOT send a response" to a notification.)
#[test]
fn must_answer_an_accepted_notification_or_response_with_202_and_no_body() {
    on_both_upstreams(&[], |kind, g| {
        let r = mcp_post(g.addr, INIT, None);
        let sid = r.header("mcp-session-id").unwrap().to_string();
        for body in [
            r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
            r#"{"jsonrpc":"2.0","method":"notifications/roots/list_changed"}"#,
            r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":99}}"#,
            // A client response (to a server request nobody sent here: accepted, then dropped).
            r#"{"jsonrpc":"2.0","id":"srv-1","result":{}}"#,
            r#"{"jsonrpc":"2.0","id":"srv-2","error":{"code":-32601,"message":"no"}}"#,
        ] {
            let r = mcp_post(g.addr, body, Some(&sid));
            assert_eq!(r.status, 202, "{kind} {body}: {}", r.text());
            assert!(r.body.is_empty(), "{kind} {body}: {}", r.text());
        }
    });
}

/// "If the server cannot accept the input, it MUST return an HTTP error status code (e.g., 400
/// Bad Request). The HTTP response body MAY comprise a JSON-RPC error response that has no
/// `id`."
#[test]
fn must_answer_an_input_it_cannot_accept_with_an_http_error_status() {
    let g = stdio_gateway(&[]);
    let sid = initialize(g.addr);
    let s = Some(sid.as_str());
    for (body, session, status) in [
        (r#"{"jsonrpc":"2.0","method":7}"#, s, 400),
        (
            r#"{"jsonrpc":"1.0","method":"notifications/initialized"}"#,
            s,
            400,
        ),
        (r#"{"jsonrpc":"2.0","result":{}}"#, s, 400),
        (
            r#"{"jsonrpc":"2.0","id":3,"result":{},"error":{"code":1,"message":"m"}}"#,
            s,
            400,
        ),
        // Well formed, but for a session that does not exist.
        (
            r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
            Some("Zm9v.YmFy"),
            404,
        ),
        (
            r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
            None,
            400,
        ),
    ] {
        let r = mcp_post(g.addr, body, session);
        assert_eq!(r.status, status, "{body}: {}", r.text());
        assert_error_body(&r, body);
    }
}

/// "The HTTP response body MAY comprise a JSON-RPC error response that has no `id`." The MCP
/// schema has `id?: RequestId` (a string or a number) on an error response; `null` is not one.
#[test]
fn error_body_for_an_unreadable_message_has_no_id() {
    let g = stdio_gateway(&[]);
    let sid = initialize(g.addr);
    let r = mcp_post(g.addr, r#"{"jsonrpc":"2.0","method":7}"#, Some(&sid));
    assert_eq!(r.status, 400);
    let v = r.json();
    assert!(v.get("id").is_none(), "{v}");
}

/// "JSON-RPC messages MUST be UTF-8 encoded."
#[test]
fn must_refuse_a_message_that_is_not_utf8() {
    let g = stdio_gateway(&[]);
    let sid = initialize(g.addr);
    let mut body = br#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"echo","arguments":{"text":""#.to_vec();
    body.extend_from_slice(&[0xff, 0xfe, 0x80]);
    body.extend_from_slice(br#""}}}"#);
    let mut raw = format!(
        "POST /mcp HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nAccept: {ACCEPT_BOTH}\r\nMcp-Session-Id: {sid}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(&body);
    let mut s = connect(g.addr);
    s.write_all(&raw).unwrap();
    let r = read_response(&mut s).unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], -32700);
}

/// "The body of the POST request MUST be a single JSON-RPC request, notification, or
/// response." (Batches were removed in 2025-06-18.)
#[test]
fn must_refuse_a_body_that_is_not_a_single_json_rpc_message_with_400() {
    let log = InputLog::new();
    let g = stdio_gateway(&["--log-input", log.arg()]);
    let sid = initialize(g.addr);
    let batch = r#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":2,"method":"tools/list"}]"#;
    for (body, code) in [
        ("", -32700),
        ("{not json", -32700),
        (r#""a string""#, -32600),
        ("42", -32600),
        ("[]", -32600),
        (r#"{"id":1,"method":"tools/list"}"#, -32600),
        (r#"{"jsonrpc":"2.0","id":1}"#, -32600),
        (batch, -32600),
    ] {
        let r = request(
            g.addr,
            &mcp_post_raw(body, Some(&sid), "MCP-Protocol-Version: 2025-11-25\r\n"),
        );
        assert_eq!(r.status, 400, "{body:?}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], code, "{body:?}: {}", r.text());
    }
    // Nothing of them reached the server.
    mcp_post(g.addr, PING, Some(&sid));
    log.wait_for("\"ping\"");
    assert!(
        !log.lines().iter().any(|l| l.contains("tools/list")),
        "{:?}",
        log.lines()
    );
}

/// "The client MUST include an `Accept` header, listing both `application/json` and
/// `text/event-stream` as supported content types." A client rule the gateway enforces: a POST
/// that does not accept both answers cannot take every answer the transport allows.
#[test]
fn must_refuse_post_whose_accept_does_not_list_json_and_event_stream() {
    let g = stdio_gateway(&[]);
    let sid = initialize(g.addr);
    for accept in [
        None,
        Some("application/json"),
        Some("text/event-stream"),
        Some("text/html"),
        Some("application/json, text/event-stream;q=0"),
    ] {
        let accept_line = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
        let raw = format!(
            "POST /mcp HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n{accept_line}Mcp-Session-Id: {sid}\r\nContent-Length: {}\r\n\r\n{PING}",
            PING.len()
        );
        let r = request(g.addr, &raw);
        assert_eq!(r.status, 406, "{accept:?}: {}", r.text());
        assert_error_body(&r, "406");
    }
}

/// The same rule on the gateway's own hop: "The client MUST include an `Accept` header,
/// listing both `application/json` and `text/event-stream` as supported content types." The
/// gateway is the client of an HTTP upstream.
#[test]
fn must_send_an_accept_listing_json_and_event_stream_upstream() {
    let up = FakeUpstream::start();
    let g = Gateway::start(&http_config(IO, &up.url(), "", ""));
    for accept in ["*/*", "application/*, text/*"] {
        let raw = format!(
            "POST /mcp HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nAccept: {accept}\r\nContent-Length: {}\r\n\r\n{INIT}",
            INIT.len()
        );
        let r = request(g.addr, &raw);
        assert_eq!(r.status, 200, "{accept}: {}", r.text());
        let seen = up.seen();
        // The gateway's readiness probe (a GET) may land at any time: find the forwarded POST.
        let post = seen.iter().rev().find(|s| s.method == "POST").unwrap();
        let forwarded = post.header("accept").unwrap_or_default();
        assert!(
            forwarded.contains("application/json") && forwarded.contains("text/event-stream"),
            "client sent `{accept}`, upstream got `{forwarded}`"
        );
    }
}

/// "If the server initiates an SSE stream: The server SHOULD immediately send an SSE event
/// consisting of an event ID and an empty `data` field in order to prime the client to
/// reconnect."
#[test]
#[ignore = "SHOULD deliberately not followed: the gateway offers no resumable streams of its \
            own, so it has no event id to prime a reconnection with (docs/conformance.md)"]
fn should_prime_an_sse_stream_with_an_event_id_and_empty_data() {
    let g = stdio_gateway(&[]);
    let sid = initialize(g.addr);
    let body = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"progress","arguments":{"steps":1},"_meta":{"progressToken":"p"}}}"#;
    let r = mcp_post(g.addr, body, Some(&sid));
    assert!(is_sse(&r), "{}", r.text());
    let text = r.text();
    let first = text.split("\n\n").next().unwrap_or_default();
    assert!(first.lines().any(|l| l.starts_with("id:")), "{first:?}");
    assert!(
        first
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .all(|d| d.trim().is_empty()),
        "{first:?}"
    );
}

/// "The SSE stream SHOULD eventually include a JSON-RPC response for the JSON-RPC request sent
/// in the POST body."
#[test]
fn should_include_the_json_rpc_response_in_the_sse_stream() {
    let body = r#"{"jsonrpc":"2.0","id":"the-call","method":"tools/call","params":{"name":"progress","arguments":{"steps":3},"_meta":{"progressToken":"p"}}}"#;
    for args in [&[][..], &["--sse-responses"][..]] {
        on_both_upstreams(args, |kind, g| {
            let sid = initialize(g.addr);
            let r = mcp_post(g.addr, body, Some(&sid));
            if !is_sse(&r) {
                // The HTTP demo server answers JSON unless told to stream.
                assert_eq!(kind, "http");
                return;
            }
            let messages = r.sse_messages();
            let responses: Vec<_> = messages.iter().filter(|m| m.get("id").is_some()).collect();
            assert_eq!(responses.len(), 1, "{kind} {args:?}: {messages:?}");
            assert_eq!(responses[0]["id"], "the-call");
            assert_eq!(responses[0]["result"]["content"][0]["text"], "done");
        });
    }
}

/// "The server MAY send JSON-RPC requests and notifications before sending the JSON-RPC
/// response. These messages SHOULD relate to the originating client request."
#[test]
fn should_relate_messages_before_the_response_to_the_originating_request() {
    let g = stdio_gateway(&["--test-tools"]);
    let (a, b) = (initialize(g.addr), initialize(g.addr));
    // Both sessions use the same progress token at once; b also makes the child broadcast.
    let slow = |label: &str| {
        format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"slow_progress","arguments":{{"steps":3,"ms":100,"label":"{label}"}},"_meta":{{"progressToken":"tok"}}}}}}"#
        )
    };
    let addr = g.addr;
    let (slow_a, slow_b) = (slow("from-a"), slow("from-b"));
    let other = std::thread::spawn(move || {
        let r = mcp_post(addr, &slow_b, Some(&b));
        assert_eq!(
            mcp_post(addr, &call(2, "notify", "{}"), Some(&b)).status,
            200
        );
        r
    });
    let mine = mcp_post(g.addr, &slow_a, Some(&a));
    let theirs = other.join().unwrap();
    for (r, label) in [(mine, "from-a"), (theirs, "from-b")] {
        let messages = r.sse_messages();
        let (last, before) = messages.split_last().expect("events");
        assert_eq!(last["id"], 1, "{messages:?}");
        assert_eq!(before.len(), 3, "{messages:?}");
        for m in before {
            assert_eq!(m["method"], "notifications/progress", "{m}");
            assert_eq!(m["params"]["progressToken"], "tok", "{m}");
            assert_eq!(m["params"]["message"], label, "{m}");
        }
    }
}

/// "After the JSON-RPC response has been sent, the server SHOULD terminate the SSE stream."
#[test]
fn should_terminate_the_sse_stream_after_the_response() {
    let body = r#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"progress","arguments":{"steps":2},"_meta":{"progressToken":"p"}}}"#;
    let check = |kind: &str, g: &Gateway| {
        let sid = initialize(g.addr);
        let mut s = connect(g.addr);
        s.write_all(mcp_post_raw(body, Some(&sid), "").as_bytes())
            .unwrap();
        // read_response returns once the chunked body's last chunk has arrived: the stream
        // ended by itself (the read timeout would leave it incomplete).
        let r = read_response(&mut s).expect("a complete response");
        assert!(is_sse(&r), "{kind}: {}", r.text());
        let messages = r.sse_messages();
        assert_eq!(messages.last().unwrap()["id"], 4, "{kind}: {messages:?}");
        assert!(r.text().ends_with("\n\n"), "{kind}: {:?}", r.text());
    };
    check("stdio", &stdio_gateway(&[]));
    let up = DemoHttp::start(&["--sse-responses"]);
    check("http", &http_gateway(&up));
}

/// "Disconnection MAY occur at any time (e.g., due to network conditions). Therefore:
/// Disconnection SHOULD NOT be interpreted as the client cancelling its request."
#[test]
fn should_not_treat_a_disconnection_as_cancellation() {
    let log = InputLog::new();
    let g = stdio_gateway(&["--log-input", log.arg()]);
    let sid = initialize(g.addr);
    let mut s = connect(g.addr);
    s.write_all(mcp_post_raw(&call(21, "sleep", r#"{"ms":300}"#), Some(&sid), "").as_bytes())
        .unwrap();
    log.wait_for("\"sleep\"");
    s.shutdown(Shutdown::Both).unwrap();
    drop(s);
    // A longer call started afterwards: once it is answered, the first has long been answered
    // by the child, and anything the gateway made of the disconnection has reached the child.
    let r = mcp_post(g.addr, &call(22, "sleep", r#"{"ms":500}"#), Some(&sid));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        !log.lines()
            .iter()
            .any(|l| l.contains("notifications/cancelled")),
        "{:?}",
        log.lines()
    );
}

// ---------------------------------------------------------------------------------------------
// Streamable HTTP: listening for messages from the server
// ---------------------------------------------------------------------------------------------

/// "The client MUST include an `Accept` header, listing `text/event-stream` as a supported
/// content type." A client rule the gateway enforces on GET.
#[test]
fn must_refuse_get_without_accept_event_stream() {
    let g = stdio_gateway(&[]);
    let sid = initialize(g.addr);
    for accept in [
        "",
        "Accept: application/json\r\n",
        "Accept: text/event-stream;q=0\r\n",
    ] {
        let r = request(
            g.addr,
            &get_raw(Some(&sid), &format!("{accept}Connection: close\r\n")),
        );
        assert_eq!(r.status, 406, "{accept:?}: {}", r.text());
        assert_error_body(&r, accept);
    }
}

/// "The server MUST either return `Content-Type: text/event-stream` in response to this HTTP
/// GET, or else return HTTP 405 Method Not Allowed, indicating that the server does not offer
/// an SSE stream at this endpoint." (Gateway-served streams.)
#[test]
fn must_answer_get_with_an_event_stream() {
    on_both_upstreams(&[], |kind, g| {
        let sid = initialize(g.addr);
        let (_s, head) = open_stream(g.addr, &sid, "");
        assert!(head.starts_with("HTTP/1.1 200"), "{kind}: {head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/event-stream"),
            "{kind}: {head}"
        );
    });
}

/// The same sentence, for an upstream that offers no stream: "... or else return HTTP 405
/// Method Not Allowed, indicating that the server does not offer an SSE stream at this
/// endpoint."
#[test]
fn must_answer_get_with_405_when_the_server_offers_no_stream() {
    let up = FakeUpstream::start();
    let g = Gateway::start(&http_config(IO, &up.url(), "", ""));
    let sid = initialize(g.addr);
    let r = request(
        g.addr,
        &get_raw(
            Some(&sid),
            "Accept: text/event-stream\r\nConnection: close\r\n",
        ),
    );
    assert_eq!(r.status, 405, "{}", r.text());
    assert!(!is_sse(&r), "{:?}", r.headers);
}

/// "The server MUST NOT send a JSON-RPC response on the stream unless resuming a stream
/// associated with a previous client request."
#[test]
fn must_not_send_a_response_on_the_get_stream() {
    let g = stdio_gateway(&[]);
    let sid = initialize(g.addr);
    let (mut stream, head) = open_stream(g.addr, &sid, "");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let r = mcp_post(g.addr, PING, Some(&sid));
    assert_eq!(r.json()["id"], 5);
    let r = mcp_post(g.addr, &call(6, "echo", r#"{"text":"x"}"#), Some(&sid));
    assert_eq!(r.json()["id"], 6);
    // The child writes list_changed after the answers above: once it is on the stream, any
    // answer that went there would be too.
    assert_eq!(
        mcp_post(g.addr, &call(7, "notify", "{}"), Some(&sid)).status,
        200
    );
    let got = read_event_with(&mut stream, b"list_changed");
    let messages = data_messages(&got);
    assert!(
        messages
            .iter()
            .any(|m| m["method"] == "notifications/tools/list_changed"),
        "{got}"
    );
    for m in &messages {
        assert!(m.get("result").is_none() && m.get("error").is_none(), "{m}");
    }
}

/// "These messages SHOULD be unrelated to any concurrently-running JSON-RPC request from the
/// client."
#[test]
fn should_keep_get_stream_messages_unrelated_to_running_requests() {
    let g = stdio_gateway(&[]);
    let sid = initialize(g.addr);
    let (mut stream, _) = open_stream(g.addr, &sid, "");
    let body = r#"{"jsonrpc":"2.0","id":8,"method":"tools/call","params":{"name":"progress","arguments":{"steps":3},"_meta":{"progressToken":"p"}}}"#;
    let r = mcp_post(g.addr, body, Some(&sid));
    let progress = r
        .sse_messages()
        .iter()
        .filter(|m| m["method"] == "notifications/progress")
        .count();
    assert_eq!(progress, 3, "the request's own stream has its progress");
    mcp_post(g.addr, &call(9, "notify", "{}"), Some(&sid));
    let got = read_until(&mut stream, b"list_changed");
    assert!(got.contains("list_changed"), "{got}");
    assert!(!got.contains("notifications/progress"), "{got}");
}

/// "The server MUST send each of its JSON-RPC messages on only one of the connected streams;
/// that is, it MUST NOT broadcast the same message across multiple streams."
#[test]
fn must_send_each_message_on_only_one_of_the_clients_streams() {
    let g = stdio_gateway(&[]);
    let sid = initialize(g.addr);
    let seen = Arc::new(Mutex::new([0usize; 2]));
    for i in 0..2 {
        let (mut s, head) = open_stream(g.addr, &sid, "");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let seen = seen.clone();
        std::thread::spawn(move || {
            loop {
                let got = read_until(&mut s, b"list_changed");
                if !got.contains("list_changed") {
                    return;
                }
                seen.lock().unwrap()[i] += 1;
            }
        });
    }
    for n in 1..=3 {
        assert_eq!(
            mcp_post(g.addr, &call(n, "notify", "{}"), Some(&sid)).status,
            200
        );
        let deadline = Instant::now() + WAIT;
        while seen.lock().unwrap().iter().sum::<usize>() < n as usize {
            assert!(Instant::now() < deadline, "notification {n} never arrived");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    // A broadcast copy would have been handed to the other stream with the first one, three
    // round trips ago.
    let counts = *seen.lock().unwrap();
    assert_eq!(counts.iter().sum::<usize>(), 3, "per stream: {counts:?}");
}

// ---------------------------------------------------------------------------------------------
// Streamable HTTP: resumability and redelivery
// ---------------------------------------------------------------------------------------------

/// "If present, the ID MUST be globally unique across all streams within that session." The
/// gateway's own streams (stdio upstreams) carry no event ids, so none can collide; an HTTP
/// upstream's ids are relayed as it sent them.
#[test]
fn event_ids_if_present_must_be_unique_across_the_sessions_streams() {
    let g = stdio_gateway(&[]);
    let sid = initialize(g.addr);
    let (mut stream, _) = open_stream(g.addr, &sid, "");
    let body = r#"{"jsonrpc":"2.0","id":8,"method":"tools/call","params":{"name":"progress","arguments":{"steps":2},"_meta":{"progressToken":"p"}}}"#;
    let post = mcp_post(g.addr, body, Some(&sid)).text();
    mcp_post(g.addr, &call(9, "notify", "{}"), Some(&sid));
    let get = read_until(&mut stream, b"list_changed");
    let ids: Vec<&str> = post
        .lines()
        .chain(get.lines())
        .filter_map(|l| l.strip_prefix("id:"))
        .collect();
    let unique: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "{ids:?}");
}

/// "The server MUST NOT replay messages that would have been delivered on a different
/// stream." (Resumption is a GET with `Last-Event-ID`; a stdio upstream's streams are not
/// resumable, so such a GET opens a fresh stream and replays nothing.)
#[test]
fn must_not_replay_messages_from_another_stream_on_resume() {
    let g = stdio_gateway(&[]);
    let sid = initialize(g.addr);
    let body = r#"{"jsonrpc":"2.0","id":8,"method":"tools/call","params":{"name":"progress","arguments":{"steps":2},"_meta":{"progressToken":"p"}}}"#;
    assert!(is_sse(&mcp_post(g.addr, body, Some(&sid))));
    let (mut stream, head) = open_stream(g.addr, &sid, "Last-Event-ID: 0\r\n");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    mcp_post(g.addr, &call(9, "notify", "{}"), Some(&sid));
    let got = read_until(&mut stream, b"list_changed");
    assert!(got.contains("list_changed"), "{got}");
    assert!(
        !got.contains("notifications/progress") && !got.contains("\"result\""),
        "{got}"
    );
}

/// "If the client wishes to resume after a disconnection ..., it SHOULD issue an HTTP GET to
/// the MCP endpoint, and include the `Last-Event-ID` header." For an HTTP upstream that keeps
/// its own streams, resuming through the gateway works only if the header reaches it.
#[test]
fn resumption_get_carries_last_event_id_to_an_http_upstream() {
    let up = FakeUpstream::start();
    let g = Gateway::start(&http_config(IO, &up.url(), "", ""));
    let sid = initialize(g.addr);
    let r = request(
        g.addr,
        &get_raw(
            Some(&sid),
            "Accept: text/event-stream\r\nLast-Event-ID: stream-1/42\r\nConnection: close\r\n",
        ),
    );
    assert_eq!(r.status, 405, "{}", r.text());
    let seen = up.seen();
    // The gateway's own readiness probe GETs too, outside any session.
    let get = seen
        .iter()
        .find(|s| s.method == "GET" && s.header("mcp-session-id").is_some())
        .expect("the client's GET");
    assert_eq!(get.header("last-event-id"), Some("stream-1/42"));
    // The client rule for GET holds on the gateway's own hop too.
    assert_eq!(get.header("accept"), Some("text/event-stream"));
    assert_eq!(get.header("mcp-session-id"), Some("fake-1"));
}

// ---------------------------------------------------------------------------------------------
// Streamable HTTP: session management
// ---------------------------------------------------------------------------------------------

/// "The session ID SHOULD be globally unique and cryptographically secure (e.g., a securely
/// generated UUID, a JWT, or a cryptographic hash)."
#[test]
fn should_mint_globally_unique_unguessable_session_ids() {
    let g = stdio_gateway(&[]);
    let other = stdio_gateway(&[]);
    let mut ids = std::collections::HashSet::new();
    for _ in 0..20 {
        for gw in [&g, &other] {
            let sid = mcp_post(gw.addr, INIT, None)
                .header("mcp-session-id")
                .unwrap()
                .to_string();
            assert!(sid.len() >= 22, "shorter than 128 bits of base64: {sid}");
            assert!(ids.insert(sid.clone()), "{sid} minted twice");
        }
    }
    // A session id from one gateway means nothing to another, and an edited one nothing at all.
    let sid = initialize(g.addr);
    assert_eq!(mcp_post(other.addr, PING, Some(&sid)).status, 404);
    let mut edited = sid.clone().into_bytes();
    let last = edited.len() - 1;
    edited[last] = if edited[last] == b'A' { b'B' } else { b'A' };
    let edited = String::from_utf8(edited).unwrap();
    assert_eq!(mcp_post(g.addr, PING, Some(&edited)).status, 404);
}

/// "The session ID MUST only contain visible ASCII characters (ranging from 0x21 to 0x7E)."
#[test]
fn must_use_only_visible_ascii_in_session_ids() {
    let check = |kind: &str, g: &Gateway| {
        for _ in 0..10 {
            let r = mcp_post(g.addr, INIT, None);
            let sid = r.header("mcp-session-id").expect("a session id");
            assert!(!sid.is_empty(), "{kind}");
            assert!(
                sid.bytes().all(|b| (0x21..=0x7e).contains(&b)),
                "{kind}: {sid:?}"
            );
        }
    };
    on_both_upstreams(&[], check);
    let (a, b) = (DemoHttp::start(&[]), DemoHttp::start(&[]));
    let replicas = format!("urls = [\"{}\", \"{}\"]", a.url(), b.url());
    let cfg =
        http_config(IO, &a.url(), "", &replicas).replace(&format!("url = \"{}\"\n", a.url()), "");
    check("replicas", &Gateway::start(&cfg));
}

/// "Servers that require a session ID SHOULD respond to requests without an `MCP-Session-Id`
/// header (other than initialization) with HTTP 400 Bad Request."
#[test]
fn should_answer_400_to_requests_without_a_session_id() {
    on_both_upstreams(&[], |kind, g| {
        initialize(g.addr);
        for (what, raw) in [
            ("POST request", mcp_post_raw(PING, None, "")),
            (
                "POST notification",
                mcp_post_raw(
                    r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
                    None,
                    "",
                ),
            ),
            (
                "GET",
                get_raw(None, "Accept: text/event-stream\r\nConnection: close\r\n"),
            ),
            ("DELETE", delete_raw(None, "")),
        ] {
            let r = request(g.addr, &raw);
            assert_eq!(r.status, 400, "{kind} {what}: {}", r.text());
            assert_error_body(&r, what);
        }
    });
}

/// "The server MAY terminate the session at any time, after which it MUST respond to requests
/// containing that session ID with HTTP 404 Not Found." (Ended here by DELETE, and ids the
/// gateway never minted.)
#[test]
fn must_answer_404_after_the_session_is_terminated() {
    on_both_upstreams(&[], |kind, g| {
        let sid = initialize(g.addr);
        let r = request(g.addr, &delete_raw(Some(&sid), ""));
        assert!((200..300).contains(&r.status), "{kind}: {}", r.text());
        for bad in [sid.as_str(), "Zm9yZ2Vk.AAAA", "no-dot-at-all"] {
            for (what, raw) in [
                ("POST", mcp_post_raw(PING, Some(bad), "")),
                (
                    "POST notification",
                    mcp_post_raw(
                        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
                        Some(bad),
                        "",
                    ),
                ),
                (
                    "GET",
                    get_raw(
                        Some(bad),
                        "Accept: text/event-stream\r\nConnection: close\r\n",
                    ),
                ),
                ("DELETE", delete_raw(Some(bad), "")),
            ] {
                let r = request(g.addr, &raw);
                assert_eq!(r.status, 404, "{kind} {what} {bad}: {}", r.text());
                assert_error_body(&r, what);
            }
        }
    });
}

/// The same MUST when the upstream ends the session: "after which it MUST respond to requests
/// containing that session ID with HTTP 404 Not Found."
#[test]
fn must_answer_404_for_a_session_the_upstream_ended() {
    let up = DemoHttp::start(&["--test-tools"]);
    let g = http_gateway(&up);
    let sid = initialize(g.addr);
    // The demo reports the headers it received with this very call: its own session id.
    let r = mcp_post(g.addr, &call(3, "last_request_headers", "{}"), Some(&sid));
    let seen: Value = serde_json::from_str(
        rpc_result(&r)["result"]["content"][0]["text"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let upstream_sid = seen["mcp-session-id"].as_str().unwrap().to_string();
    let r = request(
        up.addr,
        &format!(
            "DELETE /mcp HTTP/1.1\r\nHost: t\r\nMcp-Session-Id: {upstream_sid}\r\nConnection: close\r\n\r\n"
        ),
    );
    assert!((200..300).contains(&r.status));
    let r = mcp_post(g.addr, PING, Some(&sid));
    assert_eq!(r.status, 404, "{}", r.text());
}

/// The same MUST when the gateway ends a session on its own: a per-session stdio child stopped
/// after `server.session_idle_secs`.
#[test]
fn must_answer_404_for_a_session_ended_by_idle_timeout() {
    let cfg = stdio_config(IO, "session_idle_secs = 1", &[]).replace(
        "transport = \"stdio\"\n",
        "transport = \"stdio\"\nsession_mode = \"per_session\"\n",
    );
    let g = Gateway::start(&cfg);
    let sid = initialize(g.addr);
    assert_eq!(mcp_post(g.addr, PING, Some(&sid)).status, 200);
    let deadline = Instant::now() + WAIT;
    loop {
        // Past the idle limit and the control loop's next sweep. A ping that comes before the
        // sweep keeps the session alive, so each round waits the whole span again.
        std::thread::sleep(Duration::from_millis(2500));
        let r = mcp_post(g.addr, PING, Some(&sid));
        if r.status == 404 {
            assert_error_body(&r, "idle");
            break;
        }
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(Instant::now() < deadline, "the idle session never ended");
    }
}

/// "When a client receives HTTP 404 in response to a request containing an `MCP-Session-Id`,
/// it MUST start a new session by sending a new `InitializeRequest` without a session ID
/// attached." The server side: that initialize works, and the new session does.
#[test]
fn must_start_a_new_session_with_initialize_after_404() {
    on_both_upstreams(&[], |kind, g| {
        let old = initialize(g.addr);
        assert!(request(g.addr, &delete_raw(Some(&old), "")).status < 300);
        assert_eq!(mcp_post(g.addr, PING, Some(&old)).status, 404, "{kind}");
        let new = initialize(g.addr);
        assert_ne!(new, old);
        assert_eq!(mcp_post(g.addr, PING, Some(&new)).status, 200, "{kind}");
        assert_eq!(mcp_post(g.addr, PING, Some(&old)).status, 404, "{kind}");
    });
}

/// "Clients that no longer need a particular session ... SHOULD send an HTTP DELETE to the MCP
/// endpoint with the `MCP-Session-Id` header, to explicitly terminate the session. The server
/// MAY respond to this request with HTTP 405 Method Not Allowed." The gateway honours it and
/// ends the session upstream too.
#[test]
fn should_terminate_the_session_on_delete() {
    let up = DemoHttp::start(&["--test-tools"]);
    let g = http_gateway(&up);
    let sid = initialize(g.addr);
    let r = mcp_post(g.addr, &call(3, "last_request_headers", "{}"), Some(&sid));
    let seen: Value = serde_json::from_str(
        rpc_result(&r)["result"]["content"][0]["text"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let upstream_sid = seen["mcp-session-id"].as_str().unwrap().to_string();
    let r = request(g.addr, &delete_raw(Some(&sid), ""));
    assert_eq!(r.status, 204, "{}", r.text());
    // The upstream's own session is gone as well.
    let direct = request(
        up.addr,
        &format!(
            "POST /mcp HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nAccept: {ACCEPT_BOTH}\r\nMcp-Session-Id: {upstream_sid}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{PING}",
            PING.len()
        ),
    );
    assert_eq!(direct.status, 404, "{}", direct.text());
    // And over stdio the hub forgets it.
    let g = stdio_gateway(&[]);
    let sid = initialize(g.addr);
    assert_eq!(request(g.addr, &delete_raw(Some(&sid), "")).status, 204);
    assert_eq!(mcp_post(g.addr, PING, Some(&sid)).status, 404);
}

// ---------------------------------------------------------------------------------------------
// Streamable HTTP: the protocol version header
// ---------------------------------------------------------------------------------------------

/// "If the server receives a request with an invalid or unsupported `MCP-Protocol-Version`, it
/// MUST respond with `400 Bad Request`."
#[test]
fn must_answer_400_to_an_unsupported_protocol_version() {
    on_both_upstreams(&[], |kind, g| {
        let sid = initialize(g.addr);
        for version in [
            "1999-01-01",
            "2025-11-26",
            "latest",
            "2025-11-25, 2025-06-18",
            "",
        ] {
            let v = format!("MCP-Protocol-Version: {version}\r\n");
            for (what, raw) in [
                ("POST", mcp_post_raw(PING, Some(&sid), &v)),
                (
                    "GET",
                    get_raw(
                        Some(&sid),
                        &format!("Accept: text/event-stream\r\n{v}Connection: close\r\n"),
                    ),
                ),
                ("DELETE", delete_raw(Some(&sid), &v)),
            ] {
                let r = request(g.addr, &raw);
                assert_eq!(r.status, 400, "{kind} {what} {version:?}: {}", r.text());
                assert_error_body(&r, what);
            }
        }
        // The session is intact: none of those reached it.
        for version in SERVED {
            let r = request(
                g.addr,
                &mcp_post_raw(
                    PING,
                    Some(&sid),
                    &format!("MCP-Protocol-Version: {version}\r\n"),
                ),
            );
            assert_eq!(r.status, 200, "{kind} {version}: {}", r.text());
        }
    });
}

/// "For backwards compatibility, if the server does not receive an `MCP-Protocol-Version`
/// header, and has no other way to identify the version ... the server SHOULD assume protocol
/// version 2025-03-26."
#[test]
fn should_assume_2025_03_26_when_the_version_header_is_absent() {
    let g = stdio_gateway(&[]);
    let sid = initialize(g.addr);
    // Batches exist in 2025-03-26 only: without the header one is served ...
    let batch =
        r#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":2,"method":"ping"}]"#;
    let r = mcp_post(g.addr, batch, Some(&sid));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().as_array().map(Vec::len), Some(2));
    // ... and with a later version named, it is refused.
    let r = request(
        g.addr,
        &mcp_post_raw(batch, Some(&sid), "MCP-Protocol-Version: 2025-11-25\r\n"),
    );
    assert_eq!(r.status, 400, "{}", r.text());
}

// ---------------------------------------------------------------------------------------------
// Lifecycle
// ---------------------------------------------------------------------------------------------

/// "The initialization phase MUST be the first interaction between client and server."
#[test]
fn must_initialize_before_any_other_request() {
    let log = InputLog::new();
    let g = stdio_gateway(&["--log-input", log.arg()]);
    for body in [
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
        &call(2, "echo", r#"{"text":"too early"}"#),
    ] {
        let r = mcp_post(g.addr, body, None);
        assert_eq!(r.status, 400, "{body}: {}", r.text());
    }
    initialize(g.addr);
    log.wait_for("notifications/initialized");
    let methods: Vec<Value> = log.messages().iter().map(|m| m["method"].clone()).collect();
    assert!(
        !methods
            .iter()
            .any(|m| m == "tools/list" || m == "tools/call"),
        "{methods:?}"
    );
    // An HTTP upstream decides for itself; its refusal comes back.
    let up = DemoHttp::start(&[]);
    let g = http_gateway(&up);
    let r = mcp_post(
        g.addr,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
        None,
    );
    assert_eq!(r.status, 400, "{}", r.text());
}

/// "If the server supports the requested protocol version, it MUST respond with the same
/// version." (Each session of a shared stdio child gets its own answer.)
#[test]
fn must_answer_initialize_with_the_requested_version_when_supported() {
    on_both_upstreams(&[], |kind, g| {
        for version in SERVED {
            let r = initialize_with_version(g.addr, version);
            assert_eq!(r.status, 200, "{kind} {version}: {}", r.text());
            let result = rpc_result(&r)["result"].clone();
            assert_eq!(result["protocolVersion"], version, "{kind}");
            // "The server MUST respond with its own capabilities and information".
            assert!(result["capabilities"].is_object(), "{kind}: {result}");
            assert!(result["serverInfo"]["name"].is_string(), "{kind}: {result}");
            // And the negotiated version is one the header check accepts.
            let sid = r.header("mcp-session-id").unwrap();
            let r = request(
                g.addr,
                &mcp_post_raw(
                    PING,
                    Some(sid),
                    &format!("MCP-Protocol-Version: {version}\r\n"),
                ),
            );
            assert_eq!(r.status, 200, "{kind} {version}: {}", r.text());
        }
    });
}

/// "Otherwise, the server MUST respond with another protocol version it supports. This SHOULD
/// be the latest version supported by the server."
#[test]
fn must_answer_initialize_with_a_version_it_supports_otherwise() {
    on_both_upstreams(&[], |kind, g| {
        let r = initialize_with_version(g.addr, "1999-01-01");
        assert_eq!(r.status, 200, "{kind}: {}", r.text());
        let v = rpc_result(&r)["result"]["protocolVersion"].clone();
        assert_eq!(v, SERVED[0], "{kind}: the latest");
    });
}

/// The same MUST, seen from the client of a gateway whose upstream speaks a revision the
/// gateway does not: "the server MUST respond with another protocol version it supports". The
/// client can only use a version that the gateway will then accept in `MCP-Protocol-Version`.
#[test]
fn must_not_negotiate_a_version_the_gateway_does_not_serve() {
    let up = FakeUpstream::start();
    let g = Gateway::start(&http_config(IO, &up.url(), "", ""));
    let r = initialize_with_version(g.addr, "2026-07-28");
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json()["result"]["protocolVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let sid = r.header("mcp-session-id").unwrap().to_string();
    let next = request(
        g.addr,
        &mcp_post_raw(PING, Some(&sid), &format!("MCP-Protocol-Version: {v}\r\n")),
    );
    assert!(
        SERVED.contains(&v.as_str()),
        "negotiated {v}; a request naming it then got {}",
        next.status
    );
    assert_eq!(next.status, 200, "{}", next.text());
}

/// "After successful initialization, the client MUST send an `initialized` notification to
/// indicate it is ready to begin normal operations." The gateway is the client when it
/// initializes a restarted stdio child itself.
#[test]
fn must_send_initialized_after_replaying_initialize_to_a_restarted_child() {
    let log = InputLog::new();
    let g = stdio_gateway(&["--test-tools", "--log-input", log.arg()]);
    let sid = initialize(g.addr);
    let r = mcp_post(g.addr, &call(2, "crash", "{}"), Some(&sid));
    assert_eq!(r.status, 502, "{}", r.text());
    let deadline = Instant::now() + WAIT;
    while mcp_post(g.addr, PING, Some(&sid)).status != 200 {
        assert!(Instant::now() < deadline, "the child never came back");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The notification is written once the child's answer is in, which can be after the ping
    // has been answered: wait for it rather than race it.
    loop {
        let messages = log.messages();
        let replay = messages
            .iter()
            .rposition(|m| m["method"] == "initialize")
            .unwrap();
        assert_eq!(
            messages[replay]["params"]["clientInfo"]["name"], "mcp-guard",
            "{messages:?}"
        );
        // "the client MUST send a protocol version it supports": the one agreed before.
        assert_eq!(messages[replay]["params"]["protocolVersion"], "2025-11-25");
        if messages[replay + 1..]
            .iter()
            .any(|m| m["method"] == "notifications/initialized")
        {
            break;
        }
        assert!(Instant::now() < deadline, "{messages:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// "The client SHOULD NOT send requests other than pings before the server has responded to
/// the `initialize` request." For a restarted child the gateway replays its own initialize;
/// a client request arriving meanwhile must wait for that answer (and for the `initialized`
/// notification that follows it).
#[test]
fn should_send_only_pings_until_a_restarted_child_has_answered_initialize() {
    let log = InputLog::new();
    // The shell makes every start of the child slow, which holds the window open: the
    // replayed initialize waits in the pipe for a second before anyone reads it.
    let cfg = format!(
        "[server]\nport = 0\nworkers = 1\nio = \"{IO}\"\n[admin]\nport = 0\n[upstream]\ntransport = \"stdio\"\ncommand = \"/bin/sh\"\nargs = [\"-c\", \"sleep 1; exec \\\"$0\\\" --test-tools --log-input \\\"$1\\\"\", {DEMO:?}, {:?}]\ntimeout_secs = 10\n",
        log.arg()
    );
    let g = Gateway::start(&cfg);
    let sid = initialize(g.addr);
    let r = mcp_post(g.addr, &call(2, "crash", "{}"), Some(&sid));
    assert_eq!(r.status, 502, "{}", r.text());
    let deadline = Instant::now() + WAIT;
    let mut id = 10;
    loop {
        id += 1;
        let r = mcp_post(g.addr, &call(id, "echo", r#"{"text":"after"}"#), Some(&sid));
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the child never came back");
        std::thread::sleep(Duration::from_millis(50));
    }
    let messages = log.messages();
    let replay = messages
        .iter()
        .rposition(|m| m["method"] == "initialize")
        .unwrap();
    let first = messages[replay + 1..]
        .iter()
        .find(|m| m.get("method").is_some() && m["method"] != "ping")
        .map(|m| m["method"].clone());
    assert_eq!(
        first,
        Some(json!("notifications/initialized")),
        "{messages:?}"
    );
}

/// The same MUST for the initialize of the replica health check: "After successful
/// initialization, the client MUST send an `initialized` notification".
#[test]
fn must_send_initialized_after_the_health_checks_initialize() {
    let up = FakeUpstream::start();
    let cfg = http_config(IO, &up.url(), "", &format!("urls = [\"{}\"]", up.url()))
        .replace(&format!("url = \"{}\"\n", up.url()), "");
    let _g = Gateway::start(&cfg);
    let deadline = Instant::now() + WAIT;
    while !up.seen().iter().any(|s| s.method == "DELETE") {
        assert!(Instant::now() < deadline, "no health check seen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let seen = up.seen();
    let ended = seen.iter().position(|s| s.method == "DELETE").unwrap();
    let session = seen[ended].header("mcp-session-id").unwrap().to_string();
    let initialized = seen[..ended].iter().any(|s| {
        s.header("mcp-session-id") == Some(session.as_str())
            && s.json()["method"] == "notifications/initialized"
    });
    let methods: Vec<String> = seen
        .iter()
        .map(|s| format!("{} {}", s.method, s.json()["method"]))
        .collect();
    assert!(initialized, "{methods:?}");
}

/// "The client SHOULD NOT send requests other than pings before the server has responded to
/// the `initialize` request." The gateway's first words to a new stdio child.
#[test]
fn should_send_only_pings_before_initialize_is_answered() {
    let log = InputLog::new();
    let g = stdio_gateway(&["--log-input", log.arg()]);
    initialize(g.addr);
    log.wait_for("notifications/initialized");
    let messages = log.messages();
    let init = messages
        .iter()
        .position(|m| m["method"] == "initialize")
        .unwrap();
    for m in &messages[..init] {
        assert_eq!(m["method"], "ping", "{messages:?}");
    }
}

/// "Implementations SHOULD establish timeouts for all sent requests, to prevent hung
/// connections and resource exhaustion. When the request has not received a success or error
/// response within the timeout period, the sender SHOULD issue a cancellation notification for
/// that request and stop waiting for a response." The gateway sends its upstream requests.
#[test]
fn should_time_out_and_cancel_an_unanswered_request_to_a_stdio_child() {
    let log = InputLog::new();
    let cfg = stdio_config(IO, "", &["--log-input", log.arg()])
        .replace("timeout_secs = 10", "timeout_secs = 1");
    let g = Gateway::start(&cfg);
    let sid = initialize(g.addr);
    let r = mcp_post(g.addr, &call(41, "sleep", r#"{"ms":2500}"#), Some(&sid));
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.json()["id"], 41);
    log.wait_for("notifications/cancelled");
    let messages = log.messages();
    let sent = messages
        .iter()
        .find(|m| m["params"]["name"] == "sleep")
        .unwrap();
    let cancel = messages
        .iter()
        .find(|m| m["method"] == "notifications/cancelled")
        .unwrap();
    assert_eq!(cancel["params"]["requestId"], sent["id"], "{messages:?}");
}

/// The same sentences for an HTTP upstream: the gateway gives up after `timeout_secs` (504),
/// and "the sender SHOULD issue a cancellation notification for that request".
#[test]
fn should_cancel_a_timed_out_request_to_an_http_upstream() {
    let up = FakeUpstream::start();
    let g = Gateway::start(
        &http_config(IO, &up.url(), "", "").replace("timeout_secs = 10", "timeout_secs = 1"),
    );
    let sid = initialize(g.addr);
    let r = mcp_post(g.addr, &call(42, "slow", "{}"), Some(&sid));
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.json()["id"], 42);
    let deadline = Instant::now() + WAIT;
    loop {
        let cancelled = up.seen().iter().any(|s| {
            s.json()["method"] == "notifications/cancelled" && s.json()["params"]["requestId"] == 42
        });
        if cancelled {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no cancellation reached the upstream"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// "Implementations MAY choose to reset the timeout clock when receiving a progress
/// notification ... However, implementations SHOULD always enforce a maximum timeout,
/// regardless of progress notifications, to limit the impact of a misbehaving client or
/// server."
#[test]
fn should_enforce_a_maximum_timeout_regardless_of_progress() {
    let cfg =
        stdio_config(IO, "", &["--test-tools"]).replace("timeout_secs = 10", "timeout_secs = 1");
    let g = Gateway::start(&cfg);
    let sid = initialize(g.addr);
    // Progress every 200 ms for 4 s: the request still ends at its deadline.
    let body = r#"{"jsonrpc":"2.0","id":43,"method":"tools/call","params":{"name":"slow_progress","arguments":{"steps":20,"ms":200,"label":"busy"},"_meta":{"progressToken":"p"}}}"#;
    let r = mcp_post(g.addr, body, Some(&sid));
    let messages = r.sse_messages();
    let last = messages.last().expect("events");
    assert_eq!(last["id"], 43, "{messages:?}");
    assert!(last["error"]["code"].is_i64(), "{messages:?}");
    let progress = messages.len() - 1;
    assert!(progress < 20, "every step arrived: {messages:?}");
}

/// The same SHOULD for an HTTP upstream that streams its answer: "implementations SHOULD always
/// enforce a maximum timeout, regardless of progress notifications".
#[test]
fn should_enforce_a_maximum_timeout_on_a_streamed_http_answer() {
    let up = DemoHttp::start(&["--sse-responses", "--test-tools"]);
    let g = Gateway::start(
        &http_config(IO, &up.url(), "", "").replace("timeout_secs = 10", "timeout_secs = 1"),
    );
    let sid = initialize(g.addr);
    let body = r#"{"jsonrpc":"2.0","id":44,"method":"tools/call","params":{"name":"slow_progress","arguments":{"steps":15,"ms":200,"label":"busy"},"_meta":{"progressToken":"p"}}}"#;
    let r = mcp_post(g.addr, body, Some(&sid));
    let messages = r.sse_messages();
    let last = messages.last().expect("events");
    assert!(
        last.get("result").is_none(),
        "the answer came whole, 3 s after a 1 s deadline: {last}"
    );
    // The stream ends with the call's own error, as the same call to a stdio child does.
    assert_eq!(last["id"], 44, "{messages:?}");
    assert!(last["error"]["code"].is_i64(), "{messages:?}");
    let progress = messages.len() - 1;
    assert!(progress < 15, "every step arrived: {messages:?}");
}

// ---------------------------------------------------------------------------------------------
// Base protocol
// ---------------------------------------------------------------------------------------------

/// "Requests MUST include a string or integer ID. Unlike base JSON-RPC, the ID MUST NOT be
/// `null`."
#[test]
fn must_refuse_a_request_id_that_is_null() {
    let log = InputLog::new();
    let g = stdio_gateway(&["--log-input", log.arg()]);
    let sid = initialize(g.addr);
    let r = mcp_post(
        g.addr,
        r#"{"jsonrpc":"2.0","id":null,"method":"tools/list"}"#,
        Some(&sid),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], -32600);
    mcp_post(g.addr, PING, Some(&sid));
    log.wait_for("\"ping\"");
    assert!(!log.lines().iter().any(|l| l.contains("tools/list")));
}

/// "Requests MUST include a string or integer ID."
#[test]
fn must_refuse_a_request_id_that_is_not_a_string_or_integer() {
    let g = stdio_gateway(&[]);
    let sid = initialize(g.addr);
    for id in ["1.5", "true", "{}", "[1]", r#"{"a":1}"#] {
        let body = format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"ping"}}"#);
        let r = mcp_post(g.addr, &body, Some(&sid));
        assert_eq!(r.status, 400, "{id}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], -32600, "{id}");
    }
    for id in [r#""s""#, "0", "-7", "9007199254740993"] {
        let body = format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"ping"}}"#);
        let r = mcp_post(g.addr, &body, Some(&sid));
        assert_eq!(r.status, 200, "{id}: {}", r.text());
        assert!(r.text().contains(id), "{id}: {}", r.text());
    }
}

/// "The request ID MUST NOT have been previously used by the requestor within the same
/// session." The gateway is the requestor on a shared stdio child, carrying many client
/// sessions that each count from 1.
#[test]
fn must_not_reuse_request_ids_towards_a_shared_child() {
    let log = InputLog::new();
    let g = stdio_gateway(&["--log-input", log.arg()]);
    let sessions: Vec<String> = (0..3).map(|_| initialize(g.addr)).collect();
    let addr = g.addr;
    let threads: Vec<_> = sessions
        .into_iter()
        .map(|sid| {
            std::thread::spawn(move || {
                for id in 1..=5 {
                    let r = mcp_post(addr, &call(id, "echo", r#"{"text":"x"}"#), Some(&sid));
                    assert_eq!(r.json()["id"], id, "{}", r.text());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let ids: Vec<Value> = log
        .messages()
        .into_iter()
        .filter(|m| m.get("method").is_some())
        .filter_map(|m| m.get("id").cloned())
        .collect();
    let unique: std::collections::HashSet<String> = ids.iter().map(Value::to_string).collect();
    assert_eq!(unique.len(), ids.len(), "{ids:?}");
    assert!(ids.len() >= 18, "{ids:?}");
}

/// "Result responses MUST include the same ID as the request they correspond to." and "Error
/// responses MUST include the same ID as the request they correspond to (except in error cases
/// where the ID could not be read due a malformed request)." and "Error codes MUST be
/// integers." Answers relayed and answers the gateway makes itself.
#[test]
fn must_answer_with_the_id_of_the_request() {
    let progress = |id: &str| {
        format!(
            r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"progress","arguments":{{"steps":1}},"_meta":{{"progressToken":"p"}}}}}}"#
        )
    };
    for args in [&[][..], &["--sse-responses"][..]] {
        on_both_upstreams(args, |kind, g| {
            let sid = initialize(g.addr);
            for id in [r#""abc""#, "0", "42", r#""""#, "123456789012"] {
                let want: Value = serde_json::from_str(id).unwrap();
                for body in [
                    format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"ping"}}"#),
                    progress(id),
                    format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"no/such"}}"#),
                ] {
                    let r = mcp_post(g.addr, &body, Some(&sid));
                    let m = rpc_result(&r);
                    assert_eq!(m["id"], want, "{kind} {args:?} {body}: {}", r.text());
                    if let Some(e) = m.get("error") {
                        assert!(e["code"].is_i64(), "{m}");
                    }
                }
            }
        });
    }
    // The gateway's own answers: a policy refusal, a mismatched Mcp-Method, an upstream that
    // does not answer in time.
    let key = "conformance-key-0123456789";
    let cfg = format!(
        "{}\n[[auth.api_keys]]\nid = \"client\"\nkey_hash = \"{}\"\ndenied_tools = [\"add\"]\n",
        stdio_config(IO, "", &[]).replace("timeout_secs = 10", "timeout_secs = 1"),
        hash_key(key)
    );
    let g = Gateway::start(&cfg);
    let auth = bearer(key);
    let (_, sid) = initialize_at(g.addr, "/mcp", &auth);
    for (body, extra, status) in [
        (call(31, "add", r#"{"a":1,"b":2}"#), String::new(), 200),
        (
            call(32, "echo", r#"{"text":"x"}"#),
            "Mcp-Method: tools/list\r\n".to_string(),
            400,
        ),
        (call(33, "sleep", r#"{"ms":1500}"#), String::new(), 504),
        (
            r#"{"jsonrpc":"2.0","id":"s34","method":"tools/call","params":{"name":"bad name!"}}"#
                .to_string(),
            String::new(),
            400,
        ),
    ] {
        let r = request(
            g.addr,
            &mcp_post_raw(&body, Some(&sid), &format!("{auth}{extra}")),
        );
        assert_eq!(r.status, status, "{body}: {}", r.text());
        let sent: Value = serde_json::from_str(&body).unwrap();
        let v = r.json();
        assert_eq!(v["id"], sent["id"], "{body}: {v}");
        assert!(v["error"]["code"].is_i64(), "{v}");
    }
}

/// "Notifications MUST NOT include an ID." A message that names a notification method and
/// carries an id is neither a notification nor a request the server may answer: refused.
#[test]
fn must_refuse_a_notification_that_carries_an_id() {
    let log = InputLog::new();
    let g = stdio_gateway(&["--log-input", log.arg()]);
    let sid = initialize(g.addr);
    let r = mcp_post(
        g.addr,
        r#"{"jsonrpc":"2.0","id":3,"method":"notifications/cancelled","params":{"requestId":1}}"#,
        Some(&sid),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], -32600);
    mcp_post(g.addr, PING, Some(&sid));
    log.wait_for("\"ping\"");
    assert!(
        !log.lines()
            .iter()
            .any(|l| l.contains("notifications/cancelled"))
    );
}

// ---------------------------------------------------------------------------------------------
// stdio transport: the gateway as the client of its child
// ---------------------------------------------------------------------------------------------

/// "Messages are delimited by newlines, and MUST NOT contain embedded newlines." and "The
/// client MUST NOT write anything to the server's `stdin` that is not a valid MCP message."
#[test]
fn must_write_one_valid_message_per_line_to_the_childs_stdin() {
    let log = InputLog::new();
    let g = stdio_gateway(&["--log-input", log.arg()]);
    let sid = initialize(g.addr);
    // Line breaks in the JSON whitespace, and escaped ones inside a string.
    let pretty = "{\r\n  \"jsonrpc\": \"2.0\",\n  \"id\": 11,\n  \"method\": \"tools/call\",\n  \"params\": {\"name\": \"echo\", \"arguments\": {\"text\": \"two\\nlines\\r\\n\"}}\n}";
    let r = mcp_post(g.addr, pretty, Some(&sid));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["result"]["content"][0]["text"], "two\nlines\r\n");
    let note = "{\"jsonrpc\":\"2.0\",\n\"method\":\"notifications/progress\",\n\"params\":{\"progressToken\":\"x\",\"progress\":1}}";
    assert_eq!(mcp_post(g.addr, note, Some(&sid)).status, 202);
    mcp_post(g.addr, PING, Some(&sid));
    log.wait_for("\"ping\"");
    let lines = log.lines();
    assert!(lines.len() >= 4, "{lines:?}");
    for l in &lines {
        let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}"));
        assert!(v.is_object(), "{l}");
        assert_eq!(v["jsonrpc"], "2.0", "{l}");
        assert!(!l.contains('\r'), "{l:?}");
    }
}

/// "The client MAY capture, forward, or ignore the server's `stderr` output and SHOULD NOT
/// assume `stderr` output indicates error conditions."
#[test]
fn should_not_treat_child_stderr_as_an_error() {
    // The demo server announces itself on stderr at start.
    let g = stdio_gateway(&[]);
    let sid = initialize(g.addr);
    assert!(g.wait_log("serving MCP on stdio", WAIT));
    let line = g
        .logs
        .lock()
        .unwrap()
        .iter()
        .find(|l| l.contains("serving MCP on stdio"))
        .cloned()
        .unwrap();
    assert!(
        !line.contains("ERROR") && !line.contains("WARN"),
        "stderr logged as a problem: {line}"
    );
    assert_eq!(mcp_post(g.addr, PING, Some(&sid)).status, 200);
    assert_eq!(g.admin_get("/ready").status, 200);
}

/// Lifecycle, stdio shutdown: "the client SHOULD initiate shutdown by: First, closing the input
/// stream to the child process (the server)", then waiting for it to exit.
#[test]
fn should_close_the_childs_stdin_first_on_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let exits = dir.path().join("exits");
    // The shell reports how the demo server ended: `exited-0` means it saw end of input and
    // left by itself; a kill would take the shell down before it could write.
    let cfg = format!(
        "[server]\nport = 0\nworkers = 1\nio = \"{IO}\"\n[admin]\nport = 0\n[upstream]\ntransport = \"stdio\"\ncommand = \"/bin/sh\"\nargs = [\"-c\", \"\\\"$0\\\"; echo exited-$? >> \\\"$1\\\"\", {DEMO:?}, {:?}]\ntimeout_secs = 10\n",
        exits.to_str().unwrap()
    );
    let mut g = Gateway::start(&cfg);
    let sid = initialize(g.addr);
    assert_eq!(mcp_post(g.addr, PING, Some(&sid)).status, 200);
    g.signal(libc::SIGTERM);
    assert_eq!(g.wait_exit(WAIT), Some(0));
    let written = std::fs::read_to_string(&exits).unwrap_or_default();
    assert_eq!(written.trim(), "exited-0");
}

/// The next steps of that sentence: "Waiting for the server to exit, or sending `SIGTERM` if
/// the server does not exit within a reasonable time" and "Sending `SIGKILL` if the server does
/// not exit within a reasonable time after `SIGTERM`."
#[test]
fn should_send_sigterm_before_sigkill_to_a_child_that_does_not_exit() {
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("signals");
    // A child that ignores end of input and notes a SIGTERM.
    let script = "trap 'echo term >> \\\"$0\\\"; exit 0' TERM; while :; do sleep 1; done";
    let cfg = format!(
        "[server]\nport = 0\nworkers = 1\nio = \"{IO}\"\n[admin]\nport = 0\n[upstream]\ntransport = \"stdio\"\ncommand = \"/bin/sh\"\nargs = [\"-c\", \"{script}\", {:?}]\ntimeout_secs = 10\n",
        seen.to_str().unwrap()
    );
    let mut g = Gateway::start(&cfg);
    g.signal(libc::SIGTERM);
    assert!(g.wait_exit(Duration::from_secs(20)).is_some());
    let written = std::fs::read_to_string(&seen).unwrap_or_default();
    assert_eq!(written.trim(), "term");
}

// ---------------------------------------------------------------------------------------------
// 2024-11-05 HTTP+SSE (legacy), served beside Streamable HTTP
// ---------------------------------------------------------------------------------------------

use common::legacy::{INIT_2024, INITIALIZED, Legacy, post_to};

const LEGACY_KEY: &str = "legacy-key-0123456789";

/// A gateway in front of the demo server over stdio, with one API key.
fn legacy_gateway(extra_server: &str) -> Gateway {
    Gateway::start(&format!(
        "{}\n[[auth.api_keys]]\nid = \"legacy\"\nkey_hash = \"{}\"\n",
        stdio_config(IO, extra_server, &["--test-tools"]),
        hash_key(LEGACY_KEY)
    ))
}

/// A message POSTed with extra header lines.
fn legacy_post_with(l: &Legacy, body: &str, extra: &str) -> Response {
    request(
        l.addr,
        &format!(
            "POST {} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n{}{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            l.endpoint,
            bearer(LEGACY_KEY),
            body.len()
        ),
    )
}

/// 2024-11-05: "Servers MUST validate the `Origin` header on all incoming connections to
/// prevent DNS rebinding attacks."
#[test]
fn legacy_must_validate_origin_on_the_sse_and_message_endpoints() {
    let g = legacy_gateway("");
    let evil = "Origin: https://evil.example.com\r\n";
    assert_eq!(
        Legacy::try_open_with(g.addr, "/sse", LEGACY_KEY, evil).0,
        403
    );
    let mut l = Legacy::open(g.addr, "/sse", LEGACY_KEY);
    l.initialize();
    let r = legacy_post_with(&l, PING, evil);
    assert_eq!(r.status, 403, "{}", r.text());
    // Nothing of the refused message reached the session; it goes on.
    assert_eq!(l.call(PING)["id"], 5);
}

/// 2024-11-05: "When running locally, servers SHOULD bind only to localhost (127.0.0.1)."
#[test]
fn legacy_should_bind_only_to_localhost() {
    let g = legacy_gateway("");
    assert!(g.addr.ip().is_loopback(), "{}", g.addr);
    Legacy::open(g.addr, "/sse", LEGACY_KEY);
}

/// 2024-11-05: "Servers SHOULD implement proper authentication for all connections."
#[test]
fn legacy_should_authenticate_the_stream_and_every_message_post() {
    let g = legacy_gateway("");
    assert_eq!(Legacy::try_open(g.addr, "/sse", "").0, 401);
    assert_eq!(
        Legacy::try_open(g.addr, "/sse", "not-the-key-0123456789").0,
        401
    );
    let mut l = Legacy::open(g.addr, "/sse", LEGACY_KEY);
    l.initialize();
    assert_eq!(post_to(g.addr, &l.endpoint, "", PING).status, 401);
    assert_eq!(
        post_to(g.addr, &l.endpoint, "not-the-key-0123456789", PING).status,
        401
    );
}

/// 2024-11-05: "The server MUST provide two endpoints: 1. An SSE endpoint, for clients to
/// establish a connection and receive messages from the server 2. A regular HTTP POST endpoint
/// for clients to send messages to the server."
#[test]
fn legacy_must_provide_an_sse_endpoint_and_a_post_endpoint() {
    let g = legacy_gateway("");
    let l = Legacy::open(g.addr, "/sse", LEGACY_KEY);
    let r = l.post(INIT_2024);
    assert_eq!(r.status, 202, "{}", r.text());
}

/// 2024-11-05: "When a client connects, the server MUST send an `endpoint` event containing a
/// URI for the client to use for sending messages."
#[test]
fn legacy_must_send_an_endpoint_event_first_with_the_message_uri() {
    let g = legacy_gateway("");
    // `Legacy::open` reads the first event and insists it is `endpoint`.
    let l = Legacy::open(g.addr, "/sse", LEGACY_KEY);
    assert!(
        l.endpoint.starts_with("/messages?sessionId="),
        "{}",
        l.endpoint
    );
    assert!(
        l.endpoint.bytes().all(|b| (0x21..=0x7e).contains(&b)),
        "a URI: {}",
        l.endpoint
    );
}

/// 2024-11-05: "All subsequent client messages MUST be sent as HTTP POST requests to this
/// endpoint." — and they are answered there with 202, the answer coming on the stream.
#[test]
fn legacy_post_to_the_endpoint_is_accepted_and_answered_on_the_stream() {
    let g = legacy_gateway("");
    let mut l = Legacy::open(g.addr, "/sse", LEGACY_KEY);
    l.initialize();
    let r = l.post(&call(9, "echo", r#"{"text":"on the stream"}"#));
    assert_eq!(r.status, 202);
    assert!(r.body.is_empty(), "{}", r.text());
    let m = l.next_message().unwrap();
    assert_eq!(m["id"], 9);
    assert_eq!(m["result"]["content"][0]["text"], "on the stream");
}

/// The endpoint names one session: a POST naming an unknown or ended one is refused.
#[test]
fn legacy_post_with_an_unknown_session_is_refused() {
    let g = legacy_gateway("");
    let r = post_to(g.addr, "/messages?sessionId=AAAA.BBBB", LEGACY_KEY, PING);
    assert_eq!(r.status, 404);
    let mut l = Legacy::open(g.addr, "/sse", LEGACY_KEY);
    l.initialize();
    let endpoint = l.endpoint.clone();
    drop(l);
    let deadline = Instant::now() + WAIT;
    while post_to(g.addr, &endpoint, LEGACY_KEY, PING).status != 404 {
        assert!(
            Instant::now() < deadline,
            "the ended session still takes messages"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// 2024-11-05: "Server messages are sent as SSE `message` events, with the message content
/// encoded as JSON in the event data." — answers and server notifications alike.
#[test]
fn legacy_server_messages_are_sse_message_events_with_json_data() {
    let g = legacy_gateway("");
    let mut l = Legacy::open(g.addr, "/sse", LEGACY_KEY);
    l.initialize();
    // `notify` makes the server send notifications/tools/list_changed, unrelated to a request.
    let answer = l.call(&call(4, "notify", "{}"));
    assert_eq!(answer["id"], 4);
    let deadline = Instant::now() + WAIT;
    while !l
        .others
        .iter()
        .any(|m| m["method"] == "notifications/tools/list_changed")
    {
        assert!(Instant::now() < deadline, "{:?}", l.others);
        let m = l.next_message().expect("the notification on the stream");
        l.others.push(m);
    }
}

/// 2024-11-05 (messages): "JSON-RPC messages MUST be UTF-8 encoded" — one JSON-RPC message per
/// `message` event.
#[test]
fn legacy_each_event_carries_one_utf8_json_rpc_message() {
    let g = legacy_gateway("");
    let mut l = Legacy::open(g.addr, "/sse", LEGACY_KEY);
    l.initialize();
    assert_eq!(
        l.post(&call(6, "echo", r#"{"text":"héllo ✓"}"#)).status,
        202
    );
    let (name, data) = l.next_event().unwrap();
    assert_eq!(name.as_deref(), Some("message"));
    let m: Value = serde_json::from_str(&data).unwrap();
    assert!(m.is_object(), "{data}");
    assert_eq!(m["jsonrpc"], "2.0");
    assert_eq!(m["result"]["content"][0]["text"], "héllo ✓");
}

/// Lifecycle over the legacy transport: "If the server supports the requested protocol version,
/// it MUST respond with the same version."
#[test]
fn legacy_initialize_negotiates_2024_11_05() {
    let g = legacy_gateway("");
    let mut l = Legacy::open(g.addr, "/sse", LEGACY_KEY);
    let init = l.initialize();
    assert_eq!(init["result"]["protocolVersion"], "2024-11-05", "{init}");
}

/// JSON-RPC over the legacy transport: a notification gets no response; a request's response
/// carries its ID (string IDs included).
#[test]
fn legacy_notifications_get_no_response_and_requests_keep_their_id() {
    let g = legacy_gateway("");
    let mut l = Legacy::open(g.addr, "/sse", LEGACY_KEY);
    l.initialize();
    assert_eq!(l.post(INITIALIZED).status, 202);
    assert_eq!(
        l.post(r#"{"jsonrpc":"2.0","id":"str-id","method":"ping"}"#)
            .status,
        202
    );
    // The first message after the notification is the ping's answer: nothing answered it.
    let m = l.next_message().unwrap();
    assert_eq!(m["id"], "str-id", "{m}");
    assert!(m.get("result").is_some(), "{m}");
}

/// 2025-11-25 (backwards compatibility): "Servers wanting to support older clients should:
/// Continue to host both the SSE and POST endpoints of the old transport, alongside the new
/// 'MCP endpoint' defined for the Streamable HTTP transport."
#[test]
fn legacy_sse_and_mcp_endpoints_are_served_side_by_side() {
    let g = legacy_gateway("");
    let (_, sid) = initialize_at(g.addr, "/mcp", &bearer(LEGACY_KEY));
    let mut l = Legacy::open(g.addr, "/sse", LEGACY_KEY);
    l.initialize();
    assert_eq!(l.call(PING)["id"], 5);
    let r = request(g.addr, &mcp_post_raw(PING, Some(&sid), &bearer(LEGACY_KEY)));
    assert_eq!(r.status, 200, "{}", r.text());
}

/// A legacy session is bound to its caller, as a Streamable HTTP session is.
#[test]
fn legacy_session_is_unknown_to_another_caller() {
    let other = "other-key-0123456789";
    let g = Gateway::start(&format!(
        "{}\n[[auth.api_keys]]\nid = \"legacy\"\nkey_hash = \"{}\"\n[[auth.api_keys]]\nid = \"other\"\nkey_hash = \"{}\"\n",
        stdio_config(IO, "", &[]),
        hash_key(LEGACY_KEY),
        hash_key(other)
    ));
    let mut l = Legacy::open(g.addr, "/sse", LEGACY_KEY);
    l.initialize();
    assert_eq!(post_to(g.addr, &l.endpoint, other, PING).status, 404);
}

// ---------------------------------------------------------------------------------------------
// Authorization (2025-11-25 basic/authorization, RFC 9728, RFC 8414, RFC 7591, OAuth 2.1):
// discovery, and mcp-guard as the authorization server in front of a fake GitHub.
// ---------------------------------------------------------------------------------------------

mod authorization {
    use super::common::oauth as o;
    use super::common::*;
    use serde_json::json;

    fn facade() -> (o::FakeGithub, Gateway) {
        let gh = o::FakeGithub::start();
        let g = o::facade_gateway(&gh, "");
        (gh, g)
    }

    /// "MCP servers MUST implement OAuth 2.0 Protected Resource Metadata … The Protected
    /// Resource Metadata document returned by the MCP server MUST include the
    /// `authorization_servers` field containing at least one authorization server."
    #[test]
    fn must_implement_protected_resource_metadata_with_at_least_one_authorization_server() {
        let (_gh, g) = facade();
        for suffix in ["", "/mcp", "/mcp/files"] {
            let r = o::get_url(&format!(
                "{}/.well-known/oauth-protected-resource{suffix}",
                o::base(&g)
            ));
            assert_eq!(r.status, 200);
            assert!(
                r.header("content-type")
                    .unwrap()
                    .starts_with("application/json")
            );
            let servers = r.json()["authorization_servers"].as_array().unwrap().len();
            assert!(servers >= 1, "{suffix}");
        }
    }

    /// "Include the resource metadata URL in the `WWW-Authenticate` HTTP header under
    /// `resource_metadata` when returning `401 Unauthorized` responses" — on every method of
    /// the endpoint, and for an invalid token as for none.
    #[test]
    fn must_name_the_resource_metadata_in_www_authenticate_on_every_401() {
        let (_gh, g) = facade();
        let want = format!(
            "resource_metadata=\"{}/.well-known/oauth-protected-resource/mcp\"",
            o::base(&g)
        );
        let get = "GET /mcp HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n".to_string();
        let delete = "DELETE /mcp HTTP/1.1\r\nHost: t\r\nMcp-Session-Id: x\r\n\r\n".to_string();
        let bad = mcp_post_raw(INIT, None, &bearer("not.a.token"));
        for raw in [mcp_post_raw(INIT, None, ""), get, delete, bad] {
            let r = request(g.addr, &raw);
            assert_eq!(r.status, 401, "{raw}");
            let v = r.header("www-authenticate").unwrap();
            assert!(v.starts_with("Bearer ") && v.contains(&want), "{v}");
        }
    }

    /// "MCP servers SHOULD include a `scope` parameter in the `WWW-Authenticate` header as
    /// defined in RFC 6750 Section 3 to indicate the scopes required for accessing the
    /// resource."
    #[test]
    fn should_include_a_scope_parameter_in_www_authenticate() {
        let (_gh, g) = facade();
        let r = request(g.addr, &mcp_post_raw(INIT, None, ""));
        assert!(
            r.header("www-authenticate")
                .unwrap()
                .contains("scope=\"mcp:all mcp:echo\"")
        );
    }

    /// RFC 9728 §3.3: "The `resource` value returned MUST be identical to the protected
    /// resource's resource identifier value into which the well-known URI path suffix was
    /// inserted to create the URL used to retrieve the metadata."
    #[test]
    fn resource_in_metadata_must_be_identical_to_the_url_it_was_fetched_for() {
        let (_gh, g) = facade();
        let base = o::base(&g);
        for path in ["", "/mcp", "/mcp/files", "/sse"] {
            let r = o::get_url(&format!(
                "{base}/.well-known/oauth-protected-resource{path}"
            ));
            assert_eq!(r.json()["resource"], format!("{base}{path}"));
        }
    }

    /// "MCP authorization servers MUST provide at least one of the following discovery
    /// mechanisms: OAuth 2.0 Authorization Server Metadata, OpenID Connect Discovery 1.0";
    /// RFC 8414 §3.3: "The `issuer` value returned MUST be identical to the authorization
    /// server's issuer identifier value into which the well-known URI string was inserted".
    #[test]
    fn must_provide_authorization_server_metadata_with_an_identical_issuer() {
        let (_gh, g) = facade();
        let base = o::base(&g);
        let asm = o::get_url(&format!("{base}/.well-known/oauth-authorization-server")).json();
        assert_eq!(asm["issuer"], base);
        for key in [
            "authorization_endpoint",
            "token_endpoint",
            "response_types_supported",
        ] {
            assert!(!asm[key].is_null(), "{key}");
        }
    }

    /// "Authorization servers providing OpenID Connect Discovery 1.0 MUST include
    /// `code_challenge_methods_supported` in their metadata" (and RFC 8414 metadata without it
    /// makes clients refuse to proceed). The facade provides RFC 8414 metadata only (it issues
    /// no ID tokens); clients "MUST support both discovery mechanisms".
    #[test]
    fn must_advertise_code_challenge_methods_supported_in_its_discovery_document() {
        let (_gh, g) = facade();
        let doc = o::get_url(&format!(
            "{}/.well-known/oauth-authorization-server",
            o::base(&g)
        ))
        .json();
        assert_eq!(doc["code_challenge_methods_supported"], json!(["S256"]));
        let oidc = o::get_url(&format!("{}/.well-known/openid-configuration", o::base(&g)));
        assert_eq!(oidc.status, 404);
    }

    /// OAuth 2.1 §4.1.1/§7.5.2 as MCP applies it: PKCE is required, and S256 the only method
    /// accepted (`plain`, or a challenge without a method, is refused).
    #[test]
    fn pkce_s256_is_required_and_plain_refused() {
        let (gh, g) = facade();
        let client = o::register(&g, &[o::CLIENT_REDIRECT]);
        let (verifier, challenge) = o::pkce();
        for (c, m) in [
            (Some(verifier.as_str()), Some("plain")),
            (Some(challenge.as_str()), None),
            (None, Some("S256")),
        ] {
            let mut p = vec![
                ("response_type", "code"),
                ("client_id", client.as_str()),
                ("redirect_uri", o::CLIENT_REDIRECT),
                ("state", "s"),
            ];
            if let Some(c) = c {
                p.push(("code_challenge", c));
            }
            if let Some(m) = m {
                p.push(("code_challenge_method", m));
            }
            assert_eq!(o::get_url(&o::authorize_url(&g, &p)).status, 400, "{m:?}");
        }
        assert!(gh.authorize_requests.lock().unwrap().is_empty());
    }

    /// "Authorization servers MUST validate exact redirect URIs against pre-registered
    /// values to prevent redirection attacks."
    #[test]
    fn must_validate_exact_redirect_uris_against_registered_values() {
        let (_gh, g) = facade();
        let client = o::register(&g, &[o::CLIENT_REDIRECT]);
        let (_, challenge) = o::pkce();
        for uri in [
            "http://127.0.0.1:1/callback/",
            "http://127.0.0.1:1/callback?x",
            "http://127.0.0.1:2/callback",
            "http://localhost:1/callback",
        ] {
            let mut p = o::authorize_params(&client, &challenge, "s", "");
            p.retain(|(n, _)| *n != "resource" && *n != "redirect_uri");
            p.push(("redirect_uri", uri));
            let r = o::get_url(&o::authorize_url(&g, &p));
            assert_eq!((r.status, r.header("location")), (400, None), "{uri}");
        }
    }

    /// "All redirect URIs MUST be either `localhost` or use HTTPS."
    #[test]
    fn redirect_uris_must_be_localhost_or_https() {
        let (_gh, g) = facade();
        for bad in [
            "http://app.example.com/cb",
            "com.example.app:/cb",
            "javascript:x",
        ] {
            let r = o::post(
                &g,
                "/oauth/register",
                "application/json",
                &json!({"redirect_uris": [bad]}).to_string(),
            );
            assert_eq!(
                (r.status, r.json()["error"].clone()),
                (400, json!("invalid_redirect_uri")),
                "{bad}"
            );
        }
    }

    /// "MCP proxy servers using static client IDs MUST obtain user consent for each dynamically
    /// registered client before forwarding to third-party authorization servers."
    #[test]
    fn must_obtain_consent_for_each_registered_client_before_the_third_party_server() {
        let (gh, g) = facade();
        let client = o::register(&g, &[o::CLIENT_REDIRECT]);
        let (_, challenge) = o::pkce();
        let base = o::base(&g);
        let url = o::authorize_url(&g, &o::authorize_params(&client, &challenge, "s", &base));
        let page = o::get_url(&url);
        assert_eq!(page.status, 200);
        assert!(page.text().contains("test client"), "the client is named");
        assert!(gh.authorize_requests.lock().unwrap().is_empty());
        let r = o::approve(&url);
        assert_eq!(r.status, 302);
        assert!(
            r.header("location")
                .unwrap()
                .starts_with(&gh.url("/login/oauth/authorize"))
        );
    }

    /// "Authorization servers SHOULD only automatically redirect the user agent if it trusts
    /// the redirection URI": before the person approves a (self-registered) client, errors are
    /// shown, not sent to its redirect URI.
    #[test]
    fn should_only_redirect_to_a_redirect_uri_it_trusts() {
        let (_gh, g) = facade();
        let client = o::register(&g, &["https://attacker.example.com/cb"]);
        let url = o::authorize_url(
            &g,
            &[
                ("response_type", "token"),
                ("client_id", &client),
                ("redirect_uri", "https://attacker.example.com/cb"),
                ("state", "s"),
            ],
        );
        let r = o::get_url(&url);
        assert_eq!((r.status, r.header("location")), (400, None));
    }

    /// "Authorization servers … SHOULD display additional warnings for `localhost`-only
    /// redirect URIs" and "MUST clearly display the redirect URI hostname".
    #[test]
    fn should_warn_about_localhost_redirect_uris_and_show_the_redirect_uri() {
        let (_gh, g) = facade();
        let client = o::register(&g, &[o::CLIENT_REDIRECT]);
        let (_, challenge) = o::pkce();
        let page = o::get_url(&o::authorize_url(
            &g,
            &o::authorize_params(&client, &challenge, "s", &o::base(&g)),
        ))
        .text();
        assert!(
            page.contains("Warning") && page.contains("127.0.0.1:1"),
            "{page}"
        );
    }

    /// OAuth 2.1 §4.1.2: "If an authorization code is used more than once, the authorization
    /// server MUST deny the request and SHOULD revoke (when possible) all access tokens and
    /// refresh tokens previously issued based on that authorization code."
    #[test]
    fn a_code_used_twice_must_be_denied_and_its_tokens_revoked() {
        let (_gh, g) = facade();
        let client = o::register(&g, &[o::CLIENT_REDIRECT]);
        let (verifier, challenge) = o::pkce();
        let back = o::sign_in(&o::authorize_url(
            &g,
            &o::authorize_params(&client, &challenge, "s", &o::base(&g)),
        ));
        let first = o::redeem(&g, &client, &back["code"], &verifier).json();
        assert_eq!(o::redeem(&g, &client, &back["code"], &verifier).status, 400);
        assert_eq!(
            o::initialize_with(&g, "/mcp", first["access_token"].as_str().unwrap()).status,
            401
        );
    }

    /// "For public clients, authorization servers MUST rotate refresh tokens"; "Authorization
    /// servers SHOULD issue short-lived access tokens".
    #[test]
    fn must_rotate_refresh_tokens_and_should_issue_short_lived_access_tokens() {
        let (_gh, g) = facade();
        let (client, tok) = o::tokens_for(&g, &o::base(&g), None);
        assert!(tok["expires_in"].as_u64().unwrap() <= 3600);
        let next = o::refresh(&g, &client, tok["refresh_token"].as_str().unwrap()).json();
        assert_ne!(next["refresh_token"], tok["refresh_token"]);
        assert_eq!(
            o::refresh(&g, &client, tok["refresh_token"].as_str().unwrap()).status,
            400
        );
    }

    /// OAuth 2.1 §3.2.3: "The authorization server MUST include the HTTP `Cache-Control`
    /// response header field with a value of `no-store` in any response containing tokens".
    #[test]
    fn token_responses_must_carry_cache_control_no_store() {
        let (_gh, g) = facade();
        let client = o::register(&g, &[o::CLIENT_REDIRECT]);
        let (verifier, challenge) = o::pkce();
        let back = o::sign_in(&o::authorize_url(
            &g,
            &o::authorize_params(&client, &challenge, "s", &o::base(&g)),
        ));
        let r = o::redeem(&g, &client, &back["code"], &verifier);
        assert_eq!(
            (r.status, r.header("cache-control")),
            (200, Some("no-store"))
        );
    }

    /// OAuth 2.1 §4.1.2: the client's `state` comes back "exact[ly] … as received"; RFC 9207
    /// (advertised with `authorization_response_iss_parameter_supported`): the response
    /// carries `iss`.
    #[test]
    fn the_authorization_response_returns_state_exactly_and_names_the_issuer() {
        let (_gh, g) = facade();
        let client = o::register(&g, &[o::CLIENT_REDIRECT]);
        let (_, challenge) = o::pkce();
        let state = "a b/c?d=e&f";
        let back = o::sign_in(&o::authorize_url(
            &g,
            &o::authorize_params(&client, &challenge, state, &o::base(&g)),
        ));
        assert_eq!(back["state"], state);
        assert_eq!(back["iss"], o::base(&g));
    }

    /// "MCP servers MUST validate that access tokens were issued specifically for them as the
    /// intended audience"; "Invalid or expired tokens MUST receive a HTTP 401 response."
    #[test]
    fn must_refuse_tokens_for_another_audience_and_invalid_ones_with_401() {
        let (_gh, g) = facade();
        let base = o::base(&g);
        let (_, tok) = o::tokens_for(&g, &format!("{base}/mcp/files"), None);
        let access = tok["access_token"].as_str().unwrap();
        assert_eq!(o::initialize_with(&g, "/mcp", access).status, 401);
        let mut tampered = access.to_string();
        tampered.pop();
        tampered.push(if access.ends_with('A') { 'B' } else { 'A' });
        assert_eq!(o::initialize_with(&g, "/mcp/files", &tampered).status, 401);
    }

    /// "Access tokens MUST NOT be included in the URI query string": one sent there is not a
    /// credential.
    #[test]
    fn a_token_in_the_query_string_is_not_accepted() {
        let (_gh, g) = facade();
        let (_, tok) = o::tokens_for(&g, &o::base(&g), None);
        let target = format!(
            "/mcp?access_token={}",
            tok["access_token"].as_str().unwrap()
        );
        let r = request(g.addr, &mcp_post_raw_at(&target, INIT, None, ""));
        assert_ne!(r.status, 200);
    }

    /// "The MCP server MUST NOT pass through the token it received from the MCP client."
    #[test]
    fn must_not_pass_the_clients_token_through_to_the_upstream() {
        let gh = o::FakeGithub::start();
        let up = DemoHttp::start(&["--test-tools"]);
        let g = o::start_on_a_free_port(|port| {
            format!(
                "[server]\nport = {port}\nworkers = 1\npublic_url = \"http://127.0.0.1:{port}\"\n\
             [upstream]\ntransport = \"http\"\nurl = \"{}\"\n\
             [auth.oauth]\nprovider = \"github\"\nclient_id = \"{}\"\nclient_secret = \"{}\"\n\
             authorization_url = \"{}\"\ntoken_url = \"{}\"\nuserinfo_url = \"{}\"\n",
                up.url(),
                o::GH_CLIENT,
                o::GH_SECRET,
                gh.url("/login/oauth/authorize"),
                gh.url("/login/oauth/access_token"),
                gh.url("/user"),
            )
        });
        let (_, tok) = o::tokens_for(&g, &o::base(&g), None);
        let access = tok["access_token"].as_str().unwrap();
        let r = o::initialize_with(&g, "/mcp", access);
        let sid = r.header("mcp-session-id").unwrap().to_string();
        let r = request(
            g.addr,
            &mcp_post_raw(
                &call(2, "last_request_headers", "{}"),
                Some(&sid),
                &bearer(access),
            ),
        );
        let seen = rpc_result(&r).to_string().to_ascii_lowercase();
        assert!(seen.contains("mcp-session-id"), "{seen}");
        assert!(
            !seen.contains("authorization") && !seen.contains(&access.to_ascii_lowercase()),
            "{seen}"
        );
    }

    /// "All authorization server endpoints MUST be served over HTTPS": `server.public_url`, the
    /// issuer and every endpoint's base, is refused unless https (or loopback http).
    #[test]
    fn authorization_server_urls_must_be_https() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.toml");
        std::fs::write(
            &p,
            "[server]\npublic_url = \"http://mcp.example.com\"\n[upstream]\ncommand = \"x\"\n\
             [auth.oauth]\nprovider = \"github\"\nclient_id = \"c\"\nclient_secret = \"s\"\n",
        )
        .unwrap();
        let out = std::process::Command::new(GUARD)
            .args(["validate", "--config"])
            .arg(&p)
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("server.public_url"));
    }
}

// ---------------------------------------------------------------------------------------------
// Authorization: the gateway as an OAuth 2.1 resource server (2025-11-25 basic/authorization,
// and RFC 6750, RFC 8707 and RFC 7662 where they bind a resource server). Tokens come from a
// test authorization server (tests/common/oauth_as.rs).
// ---------------------------------------------------------------------------------------------

mod resource_server {
    use super::*;
    use common::oauth_as::{As, EcKey, now};

    pub const PUBLIC: &str = "http://127.0.0.1:3000";
    pub const RESOURCE: &str = "http://127.0.0.1:3000/mcp";

    pub fn claims(issuer: &str, aud: Value) -> Value {
        json!({"iss": issuer, "sub": "conformance", "aud": aud, "scope": "tools:echo",
               "exp": now() + 300, "iat": now()})
    }

    /// A gateway whose `[auth.oauth]` checks JWT access tokens of `idp` (`introspect`: by
    /// introspection instead), in front of `upstream_config` (a `[upstream]`-and-more tail).
    pub fn gateway(idp: &As, introspect: bool, extra: &str, upstream: &str) -> Gateway {
        let introspection = if introspect {
            format!("introspection_url = \"{}/introspect\"\n", idp.issuer())
        } else {
            String::new()
        };
        let g = Gateway::start(&format!(
            "[server]\nport = 0\nworkers = 1\npublic_url = \"{PUBLIC}\"\n[admin]\nport = 0\n{upstream}\n[auth.oauth]\nprovider = \"custom\"\nclient_id = \"conformance\"\nclient_secret = \"secret\"\nauthorization_servers = [\"{}\"]\n{introspection}{extra}",
            idp.issuer()
        ));
        if !introspect {
            assert!(g.wait_log("JWKS loaded", WAIT), "keys never loaded");
        }
        g
    }

    pub fn stdio_upstream() -> String {
        format!("[upstream]\ntransport = \"stdio\"\ncommand = {DEMO:?}\ntimeout_secs = 10\n")
    }

    pub fn init(g: &Gateway, token: &str) -> Response {
        request(g.addr, &mcp_post_raw(INIT, None, &bearer(token)))
    }

    pub fn key_and_as() -> (EcKey, As) {
        let key = EcKey::new("k1");
        let idp = As::start(json!({"keys": [key.jwk()]}));
        (key, idp)
    }
}

/// 2025-11-25 (authorization, token handling): "MCP servers, acting in their role as an OAuth
/// 2.1 resource server, MUST validate access tokens as described in OAuth 2.1 Section 5.2"
/// and "Invalid or expired tokens MUST receive a HTTP 401 response"; RFC 6750 §3.1: the
/// challenge says `error="invalid_token"`.
#[test]
fn must_answer_401_with_invalid_token_to_invalid_or_expired_access_tokens() {
    use resource_server::*;
    let (key, idp) = key_and_as();
    let g = gateway(&idp, false, "", &stdio_upstream());
    assert_eq!(
        init(&g, &key.sign(&claims(&idp.issuer(), json!(RESOURCE)), "k1")).status,
        200
    );
    let mut expired = claims(&idp.issuer(), json!(RESOURCE));
    expired["exp"] = json!(common::oauth_as::now() - 600);
    // One signature character changed (to another one, whatever it was).
    let mut forged = key.sign(&claims(&idp.issuer(), json!(RESOURCE)), "k1");
    let at = forged.len() - 10;
    let other = if &forged[at..=at] == "A" { "B" } else { "A" };
    forged.replace_range(at..=at, other);
    for token in [key.sign(&expired, "k1"), forged, "not-a-token".to_string()] {
        let r = init(&g, &token);
        assert_eq!(r.status, 401, "{}", r.text());
        let challenge = r.header("www-authenticate").unwrap();
        assert!(challenge.starts_with("Bearer "), "{challenge}");
        assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
    }
}

/// RFC 6750 §3.1: "If the request lacks any authentication information (e.g., the client was
/// unaware that authentication is necessary ...), the resource server SHOULD NOT include an
/// error code or other error information."
#[test]
fn should_not_include_an_error_code_when_no_credentials_were_sent() {
    use resource_server::*;
    let (_, idp) = key_and_as();
    let g = gateway(&idp, false, "", &stdio_upstream());
    let r = request(g.addr, &mcp_post_raw(INIT, None, ""));
    assert_eq!(r.status, 401);
    let challenge = r.header("www-authenticate").unwrap();
    assert!(
        challenge.starts_with("Bearer") && !challenge.contains("error="),
        "{challenge}"
    );
}

/// 2025-11-25 (authorization, token handling): "MCP servers MUST validate that access tokens
/// were issued specifically for them as the intended audience, according to RFC 8707 Section
/// 2." A routed server is a resource of its own: a token for one does not open another.
#[test]
fn must_only_accept_tokens_issued_for_this_server_as_audience() {
    use resource_server::*;
    let (key, idp) = key_and_as();
    let upstream = format!(
        "{}[[upstream.servers]]\nname = \"alpha\"\ntransport = \"stdio\"\ncommand = {DEMO:?}\n",
        stdio_upstream()
    );
    let g = gateway(&idp, false, "", &upstream);
    let iss = idp.issuer();
    for aud in [
        json!("https://other.example/mcp"),
        json!("http://127.0.0.1:3000"),
        json!([]),
    ] {
        let r = init(&g, &key.sign(&claims(&iss, aud.clone()), "k1"));
        assert_eq!(r.status, 401, "{aud}: {}", r.text());
    }
    // Minted for /mcp/alpha: good there, not at /mcp.
    let alpha = key.sign(&claims(&iss, json!(format!("{RESOURCE}/alpha"))), "k1");
    let r = request(
        g.addr,
        &mcp_post_raw_at("/mcp/alpha", INIT, None, &bearer(&alpha)),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = init(&g, &alpha);
    assert_eq!(r.status, 403, "{}", r.text());
}

/// 2025-11-25 (authorization, access token privilege restriction): "MCP servers MUST NOT
/// accept or transit any other tokens", and (token passthrough) the server "MUST NOT pass
/// through the token it received from the MCP client" to an upstream API.
#[test]
fn must_not_pass_the_clients_access_token_through_to_the_upstream() {
    use resource_server::*;
    let (key, idp) = key_and_as();
    let up = DemoHttp::start(&["--test-tools"]);
    let upstream = format!(
        "[upstream]\ntransport = \"http\"\nurl = \"{}\"\ntimeout_secs = 10\n",
        up.url()
    );
    let g = gateway(&idp, false, "", &upstream);
    let token = key.sign(&claims(&idp.issuer(), json!(RESOURCE)), "k1");
    let r = init(&g, &token);
    assert_eq!(r.status, 200, "{}", r.text());
    let sid = r.header("mcp-session-id").unwrap().to_string();
    let r = request(
        g.addr,
        &mcp_post_raw(
            &call(2, "last_request_headers", "{}"),
            Some(&sid),
            &bearer(&token),
        ),
    );
    let seen = rpc_result(&r)["result"]["content"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        !seen.to_ascii_lowercase().contains("authorization"),
        "{seen}"
    );
    assert!(!seen.contains(&token[..40]), "{seen}");
}

/// OAuth 2.1 §5.1 (which 2025-11-25 makes binding: "Access tokens MUST NOT be included in the
/// URI query string"): a token there is not a credential.
#[test]
fn must_not_accept_an_access_token_in_the_query_string() {
    use resource_server::*;
    let (key, idp) = key_and_as();
    let g = gateway(&idp, false, "", &stdio_upstream());
    let token = key.sign(&claims(&idp.issuer(), json!(RESOURCE)), "k1");
    let r = request(
        g.addr,
        &mcp_post_raw_at(&format!("/mcp?access_token={token}"), INIT, None, ""),
    );
    assert!(matches!(r.status, 400 | 401), "{}", r.status);
    assert_ne!(r.status, 200);
}

/// 2025-11-25 (authorization, scope challenge handling): on insufficient scope the server
/// "SHOULD respond with: HTTP 403 Forbidden ... WWW-Authenticate header with the Bearer scheme
/// ... error="insufficient_scope" ... scope="<the scopes needed>" ... resource_metadata".
#[test]
fn should_answer_insufficient_scope_with_403_naming_the_scopes_needed() {
    use resource_server::*;
    let (key, idp) = key_and_as();
    let g = gateway(
        &idp,
        false,
        "[auth.oauth.scope_tool_mapping]\n\"tools:echo\" = [\"echo\"]\n\"tools:math\" = [\"add\"]\n",
        &stdio_upstream(),
    );
    let token = key.sign(&claims(&idp.issuer(), json!(RESOURCE)), "k1");
    let r = init(&g, &token);
    let sid = r.header("mcp-session-id").unwrap().to_string();
    let r = request(
        g.addr,
        &mcp_post_raw(
            &call(2, "add", r#"{"a":1,"b":2}"#),
            Some(&sid),
            &bearer(&token),
        ),
    );
    assert_eq!(r.status, 403, "{}", r.text());
    let challenge = r.header("www-authenticate").unwrap();
    for part in [
        "Bearer ",
        "error=\"insufficient_scope\"",
        "scope=\"tools:math\"",
        "resource_metadata=\"http://127.0.0.1:3000/.well-known/oauth-protected-resource/mcp\"",
    ] {
        assert!(challenge.contains(part), "{part}: {challenge}");
    }
}

/// RFC 7662 §2.2: `active` "is a boolean value indicating whether or not the presented token
/// is currently active"; an inactive token is refused (§4: "the protected resource ... MUST
/// NOT" treat it as valid). §2.1: the protected resource authenticates to the endpoint.
#[test]
fn must_refuse_a_token_introspection_calls_inactive_and_authenticate_to_the_endpoint() {
    use resource_server::*;
    let (_, idp) = key_and_as();
    idp.grant(
        "live-token",
        json!({"active": true, "sub": "x", "aud": RESOURCE, "exp": common::oauth_as::now() + 300}),
    );
    let g = gateway(&idp, true, "", &stdio_upstream());
    assert_eq!(init(&g, "live-token").status, 200);
    assert!(idp.last_auth.lock().unwrap().starts_with("Basic "));
    let r = init(&g, "dead-token");
    assert_eq!(r.status, 401, "{}", r.text());
}

/// RFC 7662 §4: a protected resource caching answers "SHOULD NOT ... cache [a response] beyond
/// the expiration time indicated by its `exp`".
#[test]
fn should_not_cache_an_introspection_answer_beyond_its_exp() {
    use resource_server::*;
    let (_, idp) = key_and_as();
    idp.grant(
        "short-token",
        json!({"active": true, "sub": "x", "aud": RESOURCE, "exp": common::oauth_as::now() + 2}),
    );
    let g = gateway(&idp, true, "", &stdio_upstream());
    assert_eq!(init(&g, "short-token").status, 200);
    // The server would still call it active; past its exp the gateway does not.
    idp.grant(
        "short-token",
        json!({"active": true, "sub": "x", "aud": RESOURCE, "exp": common::oauth_as::now() + 2}),
    );
    std::thread::sleep(Duration::from_millis(3_200));
    let asked = idp.hits("short-token");
    let r = init(&g, "short-token");
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(
        idp.hits("short-token"),
        asked + 1,
        "the stale answer was used"
    );
}

/// 2025-11-25 (authorization, communication security): "All authorization server endpoints
/// MUST be served over HTTPS": the gateway calls none over plain HTTP (loopback aside).
#[test]
fn must_reach_authorization_server_endpoints_over_https_only() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("g.toml");
    for oauth in [
        "authorization_servers = [\"http://as.example.com\"]\n",
        "client_secret = \"s\"\nintrospection_url = \"http://as.example.com/introspect\"\n",
    ] {
        std::fs::write(
            &p,
            format!(
                "{}[auth.oauth]\nprovider = \"custom\"\nclient_id = \"c\"\n{oauth}",
                stdio_config(IO, "public_url = \"https://mcp.example.com\"", &[])
            ),
        )
        .unwrap();
        let out = std::process::Command::new(GUARD)
            .args(["validate", "--config"])
            .arg(&p)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{oauth}: {err}");
        assert!(err.contains("must be https"), "{err}");
    }
}
