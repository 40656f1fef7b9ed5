//! A call's `timeout_secs` bounds its whole answer from an HTTP upstream, not only the answer's
//! start: an SSE answer that keeps streaming progress, one that falls silent, a chunked JSON
//! answer that stalls (read whole for a transform, or relayed), each ends at the call's
//! deadline and lets its upstream connection go; a GET stream, which is no call, does not.

mod common;

use common::legacy::Legacy;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const INITIALIZED: &str = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;

/// A JSON-RPC error saying the upstream did not answer in time.
fn assert_timeout_error(message: &serde_json::Value) {
    assert!(message["error"]["code"].is_i64(), "{message}");
    assert!(
        message["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("in time")),
        "{message}"
    );
}

/// What the scripted upstream writes for a request other than `initialize`: `None` for 202.
type Script = fn(&str) -> Option<Vec<u8>>;

/// Every request the scripted upstream has read, head and body.
type Seen = Arc<Mutex<Vec<String>>>;

/// An HTTP upstream answering `initialize` itself and every other request with `script`'s
/// bytes, then saying nothing more on that connection. Counts the connections the gateway has
/// since closed, and keeps every request.
fn scripted_upstream(script: Script) -> (String, Arc<AtomicUsize>, Seen) {
    scripted_upstream_with(script, true)
}

/// [`scripted_upstream`]; `sessions`: whether its `initialize` answer opens a session.
fn scripted_upstream_with(script: Script, sessions: bool) -> (String, Arc<AtomicUsize>, Seen) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    let closed = Arc::new(AtomicUsize::new(0));
    let requests: Seen = Arc::default();
    let (seen, kept) = (closed.clone(), requests.clone());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let (seen, kept) = (seen.clone(), kept.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                loop {
                    // One request per read is enough for the gateway's small requests.
                    let n = conn.read(&mut buf).unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    let req = String::from_utf8_lossy(&buf[..n]).to_string();
                    kept.lock().unwrap().push(req.clone());
                    if req.contains("\"initialize\"") {
                        let body = r#"{"jsonrpc":"2.0","id":1,"result":{"protocolVersion":"2025-11-25","capabilities":{"tools":{}},"serverInfo":{"name":"scripted","version":"1"}}}"#;
                        let session = if sessions {
                            "Mcp-Session-Id: s1\r\n"
                        } else {
                            ""
                        };
                        let _ = write!(
                            conn,
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{session}Content-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        continue;
                    }
                    let Some(answer) = script(&req) else {
                        let _ =
                            conn.write_all(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n");
                        continue;
                    };
                    let _ = conn.write_all(&answer);
                    // Silent from here: wait for the gateway to close the connection.
                    while conn.read(&mut buf).map(|n| n > 0).unwrap_or(false) {}
                    seen.fetch_add(1, Ordering::SeqCst);
                    return;
                }
            });
        }
    });
    (url, closed, requests)
}

/// Waits (up to 5 s) for the `notifications/cancelled` of request `id` to reach the upstream,
/// and returns that request, head and body.
fn cancellation_of(seen: &Seen, id: impl Into<serde_json::Value>) -> String {
    let id = id.into();
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let found = seen.lock().unwrap().iter().find_map(|req| {
            let body = req.split_once("\r\n\r\n")?.1;
            let json: serde_json::Value = serde_json::from_str(body).ok()?;
            (json["method"] == "notifications/cancelled" && json["params"]["requestId"] == id)
                .then(|| req.clone())
        });
        if let Some(req) = found {
            return req;
        }
        assert!(
            Instant::now() < until,
            "request {id} was not cancelled upstream"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A chunked response head of `content_type`, and `parts` as chunks.
fn chunked(content_type: &str, parts: &[&str]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for p in parts {
        out.extend_from_slice(format!("{:x}\r\n{p}\r\n", p.len()).as_bytes());
    }
    out
}

/// A call's answer: an SSE stream of `parts` (raw SSE text, a chunk each) that stays open
/// after them; anything but a call is taken (202).
fn call_answered_with(req: &str, parts: &[&str]) -> Option<Vec<u8>> {
    req.contains("tools/call")
        .then(|| chunked("text/event-stream", parts))
}

/// A gateway in front of `url` whose calls time out after a second.
fn gateway(url: &str, extra: &str) -> Gateway {
    Gateway::start(&format!(
        "{}{extra}",
        http_config("auto", url, "", "").replace("timeout_secs = 10", "timeout_secs = 1")
    ))
}

/// Everything the gateway sends on `s` until it closes the connection, or until `within`.
/// `Ok`: closed by the gateway; `Err`: still open at the end.
fn read_all(s: &mut TcpStream, within: Duration) -> Result<Vec<u8>, Vec<u8>> {
    let until = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(got);
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(got),
            Err(_) => return Err(got),
        }
    }
}

/// Waits (up to 5 s) until the upstream has seen `n` of its connections closed.
fn wait_closed(closed: &AtomicUsize, n: usize, what: &str) {
    let until = Instant::now() + Duration::from_secs(5);
    while closed.load(Ordering::SeqCst) < n {
        assert!(
            Instant::now() < until,
            "{what}: the upstream's connection was kept open"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn progress_then_silence(req: &str) -> Option<Vec<u8>> {
    call_answered_with(
        req,
        &[
            "event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{\"progressToken\":\"p\",\"progress\":1}}\n\n",
        ],
    )
}

#[test]
fn an_sse_answer_silent_past_the_calls_timeout_ends_with_the_calls_error_and_its_upstream_goes() {
    let (url, closed, seen) = scripted_upstream(progress_then_silence);
    let g = gateway(&url, "");
    let sid = initialize(g.addr);
    let mut s = connect(g.addr);
    s.write_all(mcp_post_raw(&call(7, "slow", "{}"), Some(&sid), "").as_bytes())
        .unwrap();
    let started = Instant::now();
    let r = read_response(&mut s).expect("an answer");
    let waited = started.elapsed();
    assert_eq!(r.status, 200, "{}", r.text());
    let messages = r.sse_messages();
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert_eq!(messages[0]["method"], "notifications/progress");
    // The call's own error, with its id, as the stream's last event.
    assert_eq!(messages[1]["id"], 7, "{messages:?}");
    assert_timeout_error(&messages[1]);
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "ended after {waited:?}, the call's timeout being 1 s"
    );
    wait_closed(&closed, 1, "a timed-out SSE answer");
    // The call is cancelled upstream, in the session it ran in, with the gateway's own
    // headers: no client credential rides along.
    let cancel = cancellation_of(&seen, 7).to_ascii_lowercase();
    assert!(cancel.contains("mcp-session-id: s1\r\n"), "{cancel}");
    assert!(!cancel.contains("authorization"), "{cancel}");
    // The stream ended properly (its last chunk sent): the connection serves the next request.
    s.write_all(mcp_post_raw(INITIALIZED, Some(&sid), "").as_bytes())
        .unwrap();
    let next = read_response(&mut s).expect("the next answer on the same connection");
    assert_eq!(next.status, 202, "{}", next.text());
}

#[test]
fn a_restricted_callers_sse_answer_ends_with_the_calls_error_too() {
    // The answer goes through the response checks (redaction here), which emit whole events:
    // the timeout error follows them the same way.
    let c = one_call(
        progress_then_silence,
        "\n[redaction]\nenabled = true\n",
        8,
        "slow",
    );
    let messages = c.r.sse_messages();
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert_eq!(messages[1]["id"], 8, "{messages:?}");
    assert_timeout_error(&messages[1]);
    wait_closed(&c.closed, 1, "a timed-out checked SSE answer");
    cancellation_of(&c.seen, 8);
}

#[test]
fn an_sse_answer_that_stalls_mid_event_is_cut_not_finished_with_an_event_of_ours() {
    // Written after half an event, an event of the gateway's would be read as the rest of the
    // upstream's: its `data:` line would join the upstream's, one message made of two.
    fn half_an_event(req: &str) -> Option<Vec<u8>> {
        call_answered_with(
            req,
            &["event: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":9,"],
        )
    }
    let (url, closed, seen) = scripted_upstream(half_an_event);
    let g = gateway(&url, "");
    let sid = initialize(g.addr);
    let mut s = connect(g.addr);
    s.write_all(mcp_post_raw(&call(9, "slow", "{}"), Some(&sid), "").as_bytes())
        .unwrap();
    let got = read_all(&mut s, Duration::from_secs(6))
        .unwrap_or_else(|open| panic!("still open: {}", String::from_utf8_lossy(&open)));
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        !text.contains("in time"),
        "an event was added mid-event: {text}"
    );
    assert!(
        !text.ends_with("0\r\n\r\n"),
        "a cut stream must not end as a whole one: {text}"
    );
    wait_closed(&closed, 1, "an SSE answer stalled mid-event");
    cancellation_of(&seen, 9);
}

fn chunked_json_then_silence(req: &str) -> Option<Vec<u8>> {
    req.contains("tools/call")
        .then(|| chunked("application/json", &["{\"jsonrpc\":\"2.0\",\"id\":3,"]))
}

#[test]
fn a_chunked_json_answer_read_whole_that_stalls_gets_504_at_the_calls_timeout() {
    // Read whole so that redaction can check it: before, a chunked body that stalled held the
    // call, its connection slot and the upstream's connection for ever.
    let c = one_call(
        chunked_json_then_silence,
        "\n[redaction]\nenabled = true\n",
        3,
        "slow",
    );
    assert_eq!(c.r.status, 504, "{}", c.r.text());
    assert_eq!(c.r.json()["id"], 3);
    assert!(c.took < Duration::from_secs(5));
    wait_closed(&c.closed, 1, "a stalled chunked JSON answer read whole");
    cancellation_of(&c.seen, 3);
}

#[test]
fn a_relayed_chunked_json_answer_that_stalls_is_cut_at_the_calls_timeout() {
    let (url, closed, _) = scripted_upstream(chunked_json_then_silence);
    let g = gateway(&url, "");
    let sid = initialize(g.addr);
    let mut s = connect(g.addr);
    s.write_all(mcp_post_raw(&call(3, "slow", "{}"), Some(&sid), "").as_bytes())
        .unwrap();
    let got = read_all(&mut s, Duration::from_secs(6))
        .unwrap_or_else(|open| panic!("still open: {}", String::from_utf8_lossy(&open)));
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(!text.ends_with("0\r\n\r\n"), "cut, not ended: {text}");
    assert!(
        !text.contains("in time"),
        "an event of ours in a JSON body: {text}"
    );
    wait_closed(&closed, 1, "a stalled relayed chunked answer");
}

#[test]
fn a_get_stream_is_not_a_call_and_outlives_the_calls_timeout() {
    fn get_stream(req: &str) -> Option<Vec<u8>> {
        // The client's stream, not the gateway's health probe (which carries no session).
        (req.starts_with("GET ") && req.to_ascii_lowercase().contains("mcp-session-id: s1"))
            .then(|| chunked("text/event-stream", &[": open\n\n"]))
    }
    let (url, closed, seen) = scripted_upstream(get_stream);
    let g = gateway(&url, "");
    let sid = initialize(g.addr);
    let mut s = connect(g.addr);
    write!(
        s,
        "GET /mcp HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\nMcp-Session-Id: {sid}\r\nMcp-Protocol-Version: 2025-11-25\r\n\r\n"
    )
    .unwrap();
    let open = read_all(&mut s, Duration::from_secs(3))
        .expect_err("the GET stream ended within the calls' 1 s timeout");
    let text = String::from_utf8_lossy(&open);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(closed.load(Ordering::SeqCst), 0);
    drop(s);
    wait_closed(&closed, 1, "a GET stream whose client left");
    assert!(
        !seen
            .lock()
            .unwrap()
            .iter()
            .any(|r| r.contains("notifications/cancelled")),
        "a GET stream is no request to cancel"
    );
}

#[test]
fn an_initialize_that_times_out_is_never_cancelled() {
    // "The initialize request MUST NOT be cancelled by clients." An initialize has no
    // upstream session yet either, which alone keeps it from being cancelled: this checks the
    // outcome, whichever rule holds it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    let kept: Seen = Arc::default();
    let seen = kept.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let kept = kept.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while let Ok(n @ 1..) = conn.read(&mut buf) {
                    let req = String::from_utf8_lossy(&buf[..n]).to_string();
                    kept.lock().unwrap().push(req.clone());
                    // Accepts notifications; leaves every request unanswered.
                    if !req.contains("\"id\"") {
                        let _ =
                            conn.write_all(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n");
                    }
                }
            });
        }
    });
    let g = gateway(&url, "");
    let r = mcp_post(g.addr, INIT, None);
    assert_eq!(r.status, 504, "{}", r.text());
    // A call of the same kind would have been cancelled by now.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !seen
            .lock()
            .unwrap()
            .iter()
            .any(|r| r.contains("notifications/cancelled")),
        "initialize was cancelled"
    );
}

#[test]
fn a_cancellation_names_a_string_id_exactly_whatever_it_holds() {
    // The id is the client's: written back as JSON, never pasted, so quotes and line breaks in
    // it can neither break the notification nor add members to it.
    let (url, _, seen) = scripted_upstream(chunked_json_then_silence);
    let g = gateway(&url, "\n[redaction]\nenabled = true\n");
    let sid = initialize(g.addr);
    let id = "x\",\"method\":\"tools/call\"\n\u{2028}";
    let body = serde_json::json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":"slow","arguments":{}}}).to_string();
    let r = mcp_post(g.addr, &body, Some(&sid));
    assert_eq!(r.status, 504, "{}", r.text());
    let cancel = cancellation_of(&seen, id);
    let json: serde_json::Value =
        serde_json::from_str(cancel.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(json["method"], "notifications/cancelled");
    assert_eq!(json.as_object().unwrap().len(), 3, "{json}");
}

#[test]
fn a_streaming_call_still_open_when_the_shutdown_grace_ends_gets_its_error_as_the_last_event() {
    let (url, _, _) = scripted_upstream(progress_then_silence);
    let mut g = Gateway::start(&http_config("auto", &url, "shutdown_grace_secs = 1", ""));
    let sid = initialize(g.addr);
    let mut s = connect(g.addr);
    s.write_all(mcp_post_raw(&call(12, "slow", "{}"), Some(&sid), "").as_bytes())
        .unwrap();
    // The progress event is through: the call is streaming.
    let mut seen = read_until_seen(&mut s, "notifications/progress");
    g.signal(libc::SIGTERM);
    let rest = read_all(&mut s, Duration::from_secs(8))
        .unwrap_or_else(|open| panic!("still open: {}", String::from_utf8_lossy(&open)));
    seen.extend_from_slice(&rest);
    let text = String::from_utf8_lossy(&seen);
    assert!(text.ends_with("0\r\n\r\n"), "ended, not cut: {text}");
    let last = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str::<serde_json::Value>(d).unwrap())
        .expect("events");
    assert_eq!(last["id"], 12, "{text}");
    assert!(last["error"]["code"].is_i64(), "{text}");
    assert!(g.wait_exit(Duration::from_secs(10)).is_some());
}

#[test]
fn a_streaming_batch_still_open_when_the_shutdown_grace_ends_gets_errors_for_what_is_unanswered() {
    fn second_answered_then_silence(req: &str) -> Option<Vec<u8>> {
        req.contains("tools/call").then(|| {
            sse_events_then_silence(&[r#"{"jsonrpc":"2.0","id":72,"result":{"content":[]}}"#])
        })
    }
    let (url, _, _) = scripted_upstream(second_answered_then_silence);
    let mut g = Gateway::start(&http_config("auto", &url, "shutdown_grace_secs = 1", ""));
    let r = mcp_post(g.addr, &INIT.replace("2025-11-25", "2025-03-26"), None);
    let sid = r.header("mcp-session-id").unwrap().to_string();
    let batch = format!("[{},{}]", call(71, "slow", "{}"), call(72, "slow", "{}"));
    let mut s = connect(g.addr);
    s.write_all(
        mcp_post_raw(&batch, Some(&sid), "MCP-Protocol-Version: 2025-03-26\r\n").as_bytes(),
    )
    .unwrap();
    let mut seen = read_until_seen(&mut s, "\"id\":72");
    g.signal(libc::SIGTERM);
    let rest = read_all(&mut s, Duration::from_secs(8))
        .unwrap_or_else(|open| panic!("still open: {}", String::from_utf8_lossy(&open)));
    seen.extend_from_slice(&rest);
    let text = String::from_utf8_lossy(&seen);
    assert!(text.ends_with("0\r\n\r\n"), "ended, not cut: {text}");
    let events: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(events.len(), 2, "{text}");
    assert_eq!(events[0]["id"], 72, "{text}");
    assert_eq!(events[1]["id"], 71, "{text}");
    assert!(events[1]["error"]["code"].is_i64(), "{text}");
    assert!(g.wait_exit(Duration::from_secs(10)).is_some());
}

fn six_megabytes_at_once(req: &str) -> Option<Vec<u8>> {
    req.contains("tools/call").then(|| {
        let text = "A".repeat(6 << 20);
        let body = serde_json::json!({"jsonrpc":"2.0","id":13,"result":{"content":[{"type":"text","text":text}]}}).to_string();
        let mut out = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(body.as_bytes());
        out
    })
}

#[test]
fn a_client_reading_slowly_gets_a_whole_answer_the_upstream_sent_in_time() {
    // The upstream sends all of it at once; the client takes about a second and a half to
    // read it. The time spent waiting for the client is not the upstream's (up to the timeout
    // once more): the answer must not be cut at the call's one-second deadline (nor the call
    // cancelled upstream).
    let (url, _, seen) = scripted_upstream(six_megabytes_at_once);
    let g = gateway(&url, "");
    let sid = initialize(g.addr);
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&g.addr.into()).unwrap();
    let mut s: TcpStream = socket.into();
    s.write_all(mcp_post_raw(&call(13, "big", "{}"), Some(&sid), "").as_bytes())
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut paced = 0;
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
        if got.len() > 6 << 20 && got.ends_with(b"}}") {
            break;
        }
        // About 4 MB/s.
        if got.len() >= paced + (64 << 10) {
            paced = got.len();
            std::thread::sleep(Duration::from_millis(16));
        }
    }
    let text = String::from_utf8_lossy(&got);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    let json: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|_| panic!("cut after {} bytes", got.len()));
    assert_eq!(json["id"], 13);
    assert!(
        !seen
            .lock()
            .unwrap()
            .iter()
            .any(|r| r.contains("notifications/cancelled")),
        "an answered call was cancelled"
    );
}

/// No answer at all to a call (nor to a batch holding one): the head never comes.
fn nothing_to_calls(req: &str) -> Option<Vec<u8>> {
    req.contains("tools/call").then(Vec::new)
}

/// The `notifications/cancelled` requests the upstream has seen, as JSON bodies.
fn cancellations(seen: &Seen) -> Vec<serde_json::Value> {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|r| r.contains("notifications/cancelled"))
        .filter_map(|r| serde_json::from_str(r.split_once("\r\n\r\n")?.1).ok())
        .collect()
}

/// Waits (up to 5 s) for a batch's cancellation, one request of notifications, and returns the
/// ids it cancels, in order.
fn batch_cancellation(seen: &Seen) -> Vec<serde_json::Value> {
    let until = Instant::now() + Duration::from_secs(5);
    while cancellations(seen).is_empty() {
        assert!(Instant::now() < until, "the batch was not cancelled");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A second one would come at once: give it a moment to show.
    std::thread::sleep(Duration::from_millis(200));
    let sent = cancellations(seen);
    assert_eq!(sent.len(), 1, "{sent:?}");
    sent[0]
        .as_array()
        .expect("a batch of notifications")
        .iter()
        .map(|n| n["params"]["requestId"].clone())
        .collect()
}

/// A gateway in front of a scripted upstream (see [`gateway`]), and one `tools/call` through
/// it, with the time it took.
struct OneCall {
    /// Kept running for the test's later checks.
    _gateway: Gateway,
    r: Response,
    closed: Arc<AtomicUsize>,
    seen: Seen,
    took: Duration,
}

fn one_call(script: Script, extra: &str, id: u64, tool: &str) -> OneCall {
    let (url, closed, seen) = scripted_upstream(script);
    let g = gateway(&url, extra);
    let sid = initialize(g.addr);
    let started = Instant::now();
    let r = mcp_post(g.addr, &call(id, tool, "{}"), Some(&sid));
    OneCall {
        took: started.elapsed(),
        _gateway: g,
        r,
        closed,
        seen,
    }
}

/// Waits (up to 5 s) for the audit line of the `tools/call` in `audit`, and returns it.
fn call_audit_line(audit: &std::path::Path) -> serde_json::Value {
    audit_line_where(audit, |l| l["method"] == "tools/call")
}

/// Waits (up to 5 s) for the first complete audit line in `audit` that `wanted` picks.
fn audit_line_where(
    audit: &std::path::Path,
    wanted: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(audit).unwrap_or_default();
        let found = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|l| wanted(l));
        if let Some(line) = found {
            return line;
        }
        assert!(Instant::now() < until, "no such audit line: {text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The configuration that sends the audit trail to a file in a new directory (kept by the
/// caller for as long as the gateway runs), and that file.
fn audit_to_file() -> (String, tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let extra = format!("\n[audit]\nfile = {:?}\n", audit.to_str().unwrap());
    (extra, dir, audit)
}

/// Past the call's deadline (1 s), still no cancellation: nothing answered is cancelled.
fn never_cancelled(seen: &Seen) {
    std::thread::sleep(Duration::from_millis(1200));
    assert!(cancellations(seen).is_empty(), "{:?}", cancellations(seen));
}

#[test]
fn a_timed_out_batch_is_answered_in_place_and_cancelled_in_one_request_each_id_once() {
    // One notification POSTed per request would let a batch of many requests open as many
    // upstream connections at once.
    let (url, _, seen) = scripted_upstream(nothing_to_calls);
    let g = gateway(&url, "");
    let r = mcp_post(g.addr, &INIT.replace("2025-11-25", "2025-03-26"), None);
    let sid = r.header("mcp-session-id").unwrap().to_string();
    let calls: Vec<String> = [31, 32, 31, 33]
        .iter()
        .map(|id| call(*id, "slow", "{}"))
        .chain([INITIALIZED.to_string()])
        .collect();
    let batch = format!("[{}]", calls.join(","));
    let raw = mcp_post_raw(&batch, Some(&sid), "MCP-Protocol-Version: 2025-03-26\r\n");
    let r = request(g.addr, &raw);
    // Each request answered in its place, as a batch is answered.
    assert_eq!(r.status, 200, "{}", r.text());
    let answers = r.json();
    let answered: Vec<&serde_json::Value> = answers
        .as_array()
        .expect("an array")
        .iter()
        .map(|a| &a["id"])
        .collect();
    assert_eq!(answered, [31, 32, 31, 33], "{answers}");
    for a in answers.as_array().unwrap() {
        assert_timeout_error(a);
    }
    assert_eq!(batch_cancellation(&seen), [31, 32, 33]);
}

#[test]
fn without_an_upstream_session_a_timed_out_call_is_not_cancelled() {
    // Without a session, `requestId: 7` names no request of this client's in particular: at a
    // stateless upstream another tenant's call may carry the same id.
    let (url, _, seen) = scripted_upstream_with(nothing_to_calls, false);
    let g = gateway(&url, "");
    assert_eq!(mcp_post(g.addr, INIT, None).status, 200);
    let r = mcp_post(g.addr, &call(7, "slow", "{}"), None);
    assert_eq!(r.status, 504, "{}", r.text());
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        cancellations(&seen).is_empty(),
        "{:?}",
        cancellations(&seen)
    );
}

#[test]
fn an_error_about_a_posted_response_carries_no_id() {
    // A client POSTs its answer to a server request; the upstream never takes it. The 504 must
    // not carry that answer's id: the client would read it as the answer to its own request
    // of the same id.
    fn nothing_to_anything(req: &str) -> Option<Vec<u8>> {
        req.contains("\"result\"").then(Vec::new)
    }
    let (url, _, _) = scripted_upstream(nothing_to_anything);
    let g = gateway(&url, "");
    let sid = initialize(g.addr);
    let r = mcp_post(
        g.addr,
        r#"{"jsonrpc":"2.0","id":9001,"result":{}}"#,
        Some(&sid),
    );
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(r.json().get("id").is_none(), "{}", r.text());
}

#[test]
fn an_answer_ended_by_cr_cr_reaches_a_checked_stream_before_the_deadline() {
    // CR CR ends an SSE event. Checked (redaction), the event was held until the upstream's
    // next byte; an upstream that then waited lost the call its answer at the deadline.
    fn answer_then_silence(req: &str) -> Option<Vec<u8>> {
        call_answered_with(
            req,
            &[
                "event: message\rdata: {\"jsonrpc\":\"2.0\",\"id\":14,\"result\":{\"content\":[]}}\r\r",
            ],
        )
    }
    let c = one_call(
        answer_then_silence,
        "\n[redaction]\nenabled = true\n",
        14,
        "quick",
    );
    let messages = c.r.sse_messages();
    assert_eq!(messages[0]["id"], 14, "{messages:?}");
    assert!(messages[0].get("result").is_some(), "{messages:?}");
}

#[test]
fn a_json_answer_whose_body_stalls_gets_504_with_the_calls_id() {
    fn head_and_a_little(req: &str) -> Option<Vec<u8>> {
        req.contains("tools/call").then(|| {
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"jsonrpc\":".to_vec()
        })
    }
    let (url, closed, seen) = scripted_upstream(head_and_a_little);
    let (extra, _dir, audit) = audit_to_file();
    let g = gateway(&url, &extra);
    let sid = initialize(g.addr);
    let r = mcp_post(g.addr, &call(15, "slow", "{}"), Some(&sid));
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.json()["id"], 15, "{}", r.text());
    wait_closed(&closed, 1, "a stalled JSON body");
    // Given up on, it is cancelled upstream like a call whose head never came.
    cancellation_of(&seen, 15);
    // Audited as the client was answered (red team: `allow` and the upstream's 200).
    let line = call_audit_line(&audit);
    assert_eq!(
        (&line["decision"], &line["status"], &line["reason"]),
        (
            &serde_json::json!("error"),
            &serde_json::json!(504),
            &serde_json::json!("upstream_timeout")
        ),
        "{line}"
    );
}

#[test]
fn a_slow_reader_and_an_endless_upstream_together_cannot_stretch_a_call_past_twice_its_timeout() {
    // An upstream that keeps writing large events, a client that keeps reading slowly: time
    // spent on the client is forgiven only up to the timeout once more.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    let closed = Arc::new(AtomicUsize::new(0));
    let seen = closed.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                let n = conn.read(&mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                if req.contains("\"initialize\"") {
                    let body = r#"{"jsonrpc":"2.0","id":1,"result":{"protocolVersion":"2025-11-25","capabilities":{},"serverInfo":{"name":"endless","version":"1"}}}"#;
                    let _ = write!(
                        conn,
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nMcp-Session-Id: s1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    return;
                }
                if !req.contains("tools/call") {
                    let _ = conn.write_all(
                        b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                    return;
                }
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n");
                let event = format!(
                    "event: message\ndata: {{\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\"params\":{{\"data\":\"{}\"}}}}\n\n",
                    "x".repeat(256 << 10)
                );
                let chunk = format!("{:x}\r\n{event}\r\n", event.len());
                while conn.write_all(chunk.as_bytes()).is_ok() {}
                seen.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    let g = gateway(&url, "");
    let sid = initialize(g.addr);
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&g.addr.into()).unwrap();
    let mut s: TcpStream = socket.into();
    s.write_all(mcp_post_raw(&call(16, "endless", "{}"), Some(&sid), "").as_bytes())
        .unwrap();
    let started = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = vec![0u8; 64 << 10];
    let (mut paced, mut got) = (0, 0);
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
        // About 2 MB/s, far below what the upstream writes.
        if got >= paced + (32 << 10) {
            paced = got;
            std::thread::sleep(Duration::from_millis(16));
        }
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "still streaming after 8 s, the call's timeout being 1 s"
        );
    }
    wait_closed(&closed, 1, "an endless answer to a slow reader");
}

#[test]
fn a_batch_whose_json_body_stalls_is_answered_in_place() {
    fn head_and_a_little(req: &str) -> Option<Vec<u8>> {
        req.contains("tools/call").then(|| {
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n[{\"jsonrpc\":".to_vec()
        })
    }
    let (url, _, seen) = scripted_upstream(head_and_a_little);
    let g = gateway(&url, "");
    let r = mcp_post(g.addr, &INIT.replace("2025-11-25", "2025-03-26"), None);
    let sid = r.header("mcp-session-id").unwrap().to_string();
    let batch = format!(
        "[{},{},{}]",
        call(41, "slow", "{}"),
        INITIALIZED,
        call(42, "slow", "{}")
    );
    let raw = mcp_post_raw(&batch, Some(&sid), "MCP-Protocol-Version: 2025-03-26\r\n");
    let r = request(g.addr, &raw);
    assert_eq!(r.status, 200, "{}", r.text());
    let answers = r.json();
    let ids: Vec<&serde_json::Value> = answers
        .as_array()
        .expect("an array")
        .iter()
        .map(|a| &a["id"])
        .collect();
    assert_eq!(ids, [41, 42], "{answers}");
    for a in answers.as_array().unwrap() {
        assert_timeout_error(a);
    }
    assert_eq!(batch_cancellation(&seen), [41, 42]);
}

#[test]
fn a_batch_answered_as_sse_that_times_out_gets_errors_for_what_is_unanswered_and_cancels_only_that()
{
    // The stream's events say which of the batch's requests were answered: those that were
    // not get the timeout error in their place as the last events, and only they are
    // cancelled upstream, in one request. (Before: no error event at all, as which were
    // answered was not read, and every request was cancelled.)
    fn one_answered_then_silence(req: &str) -> Option<Vec<u8>> {
        req.contains("tools/call").then(|| {
            sse_events_then_silence(&[
                PROGRESS,
                r#"{"jsonrpc":"2.0","id":"b","result":{"content":[]}}"#,
            ])
        })
    }
    let (url, closed, seen) = scripted_upstream(one_answered_then_silence);
    let (extra, _dir, audit) = audit_to_file();
    let g = gateway(&url, &extra);
    let r = mcp_post(g.addr, &INIT.replace("2025-11-25", "2025-03-26"), None);
    let sid = r.header("mcp-session-id").unwrap().to_string();
    let batch = format!(
        "[{},{},{},{}]",
        call(51, "slow", "{}"),
        r#"{"jsonrpc":"2.0","id":"b","method":"tools/call","params":{"name":"slow","arguments":{}}}"#,
        r#"{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":"t","progress":1}}"#,
        call(53, "slow", "{}")
    );
    let mut s = connect(g.addr);
    s.write_all(
        mcp_post_raw(&batch, Some(&sid), "MCP-Protocol-Version: 2025-03-26\r\n").as_bytes(),
    )
    .unwrap();
    let started = Instant::now();
    let r = read_response(&mut s).expect("an answer");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(r.status, 200, "{}", r.text());
    let messages = r.sse_messages();
    assert_eq!(messages.len(), 4, "{messages:?}");
    assert_eq!(messages[0]["method"], "notifications/progress");
    assert_eq!(messages[1]["id"], "b");
    assert!(messages[1].get("result").is_some(), "{messages:?}");
    assert_eq!(messages[2]["id"], 51, "{messages:?}");
    assert_eq!(messages[3]["id"], 53, "{messages:?}");
    assert_timeout_error(&messages[2]);
    assert_timeout_error(&messages[3]);
    wait_closed(&closed, 1, "a timed-out SSE batch");
    assert_eq!(batch_cancellation(&seen), [51, 53]);
    // The audit says the same: only the unanswered requests carry the timeout; the answered
    // one and the notification went through.
    let until = Instant::now() + Duration::from_secs(5);
    let lines = loop {
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .filter(|l: &serde_json::Value| {
                l["method"] == "tools/call" || l["method"] == "notifications/progress"
            })
            .collect();
        if lines.len() >= 4 || Instant::now() > until {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let seen: Vec<(&str, &serde_json::Value)> = lines
        .iter()
        .map(|l| (l["decision"].as_str().unwrap(), &l["reason"]))
        .collect();
    let timeout = serde_json::json!("upstream_timeout");
    let none = serde_json::Value::Null;
    assert_eq!(
        seen,
        [
            ("error", &timeout),
            ("allow", &none),
            ("allow", &none),
            ("error", &timeout)
        ],
        "{lines:?}"
    );
    // The stream ended properly: the connection serves the next request.
    s.write_all(
        mcp_post_raw(
            INITIALIZED,
            Some(&sid),
            "MCP-Protocol-Version: 2025-03-26\r\n",
        )
        .as_bytes(),
    )
    .unwrap();
    let next = read_response(&mut s).expect("the next answer on the same connection");
    assert_eq!(next.status, 202, "{}", next.text());
}

#[test]
fn a_batch_answered_as_sse_ends_with_its_last_response_and_a_reused_id_counts_twice() {
    // A batch's stream ends once each of its requests has its response, in one event each or
    // as an array, whatever the upstream keeps open; an id the batch uses twice needs two.
    fn answers_then_silence(req: &str) -> Option<Vec<u8>> {
        req.contains("tools/call").then(|| {
            sse_events_then_silence(&[
                r#"{"jsonrpc":"2.0","id":61,"result":{"content":[]}}"#,
                r#"{"jsonrpc":"2.0","id":61,"result":{"content":[]}}"#,
                r#"[{"jsonrpc":"2.0","id":62,"error":{"code":1,"message":"no"}},{"jsonrpc":"2.0","id":99,"method":"ping"}]"#,
                r#"{"jsonrpc":"2.0","id":63,"result":{"content":[]}}"#,
                r#"{"jsonrpc":"2.0","method":"notifications/message","params":{"level":"info","data":"after"}}"#,
            ])
        })
    }
    let (url, closed, seen) = scripted_upstream(answers_then_silence);
    let g = gateway(&url, "");
    let r = mcp_post(g.addr, &INIT.replace("2025-11-25", "2025-03-26"), None);
    let sid = r.header("mcp-session-id").unwrap().to_string();
    let batch = format!(
        "[{},{},{},{}]",
        call(61, "quick", "{}"),
        call(62, "quick", "{}"),
        call(61, "quick", "{}"),
        call(63, "quick", "{}")
    );
    let started = Instant::now();
    let r = request(
        g.addr,
        &mcp_post_raw(&batch, Some(&sid), "MCP-Protocol-Version: 2025-03-26\r\n"),
    );
    assert!(
        started.elapsed() < Duration::from_millis(800),
        "the stream ended after {:?}, at the call's deadline (1 s) rather than its last answer",
        started.elapsed()
    );
    let text = r.text();
    assert!(
        !text.contains("after") && !text.contains("in time"),
        "{text}"
    );
    assert!(
        text.trim_end()
            .ends_with(r#""id":63,"result":{"content":[]}}"#),
        "{text}"
    );
    wait_closed(&closed, 1, "a batch's stream kept open after its answers");
    never_cancelled(&seen);
}

/// A call's answer as an SSE stream of `events` (each a JSON-RPC message), with no end: the
/// stream stays open after them.
fn sse_events_then_silence(events: &[&str]) -> Vec<u8> {
    let parts: Vec<String> = events
        .iter()
        .map(|e| format!("event: message\ndata: {e}\n\n"))
        .collect();
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    chunked("text/event-stream", &parts)
}

const PROGRESS: &str = r#"{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":"p","progress":1}}"#;

fn answer_then_silence(req: &str) -> Option<Vec<u8>> {
    req.contains("tools/call").then(|| {
        sse_events_then_silence(&[
            PROGRESS,
            r#"{"jsonrpc":"2.0","id":21,"result":{"content":[]}}"#,
        ])
    })
}

#[test]
fn a_stream_its_upstream_keeps_open_after_the_answer_ends_with_the_answer() {
    // MCP: the server SHOULD close the stream once the response is sent. The gateway is the
    // server its client sees: it ends the stream at the response, not at the call's deadline
    // (where it used to add a timeout error after the answer and cancel an answered request).
    let (url, closed, seen) = scripted_upstream(answer_then_silence);
    let g = gateway(&url, "");
    let sid = initialize(g.addr);
    let mut s = connect(g.addr);
    s.write_all(mcp_post_raw(&call(21, "quick", "{}"), Some(&sid), "").as_bytes())
        .unwrap();
    let started = Instant::now();
    let r = read_response(&mut s).expect("an answer");
    let waited = started.elapsed();
    let messages = r.sse_messages();
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert_eq!(messages[1]["id"], 21, "{messages:?}");
    assert!(messages[1].get("result").is_some(), "{messages:?}");
    assert!(
        waited < Duration::from_millis(800),
        "the stream ended after {waited:?}, with the call's deadline (1 s) rather than its answer"
    );
    // The upstream's still-open stream is let go, and the answered request is not cancelled.
    wait_closed(&closed, 1, "a stream kept open after its answer");
    // The client's connection serves its next request.
    s.write_all(mcp_post_raw(INITIALIZED, Some(&sid), "").as_bytes())
        .unwrap();
    let next = read_response(&mut s).expect("the next answer on the same connection");
    assert_eq!(next.status, 202, "{}", next.text());
    // Past the call's deadline: still no cancellation of the answered request.
    never_cancelled(&seen);
}

#[test]
fn a_checked_stream_kept_open_after_the_answer_ends_with_the_answer_too() {
    // Through the response steps (redaction), the response is recognised in what the client
    // reads, after the steps.
    let c = one_call(
        answer_then_silence,
        "\n[redaction]\nenabled = true\n",
        21,
        "quick",
    );
    assert!(c.took < Duration::from_millis(800));
    let messages = c.r.sse_messages();
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert_eq!(messages[1]["id"], 21, "{messages:?}");
    wait_closed(&c.closed, 1, "a checked stream kept open after its answer");
    never_cancelled(&c.seen);
}

#[test]
fn nothing_an_upstream_sends_after_the_answer_reaches_the_client() {
    // A second answer to the same id, a request of the server's, in the same read as the
    // response, then the stream's end: the client's stream ends with the response.
    fn answer_and_more(req: &str) -> Option<Vec<u8>> {
        req.contains("tools/call").then(|| {
            let mut out = chunked(
                "text/event-stream",
                &[concat!(
                    "event: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":22,\"result\":{\"content\":[]}}\n\n",
                    "event: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":22,\"result\":{\"content\":[{\"type\":\"text\",\"text\":\"second\"}]}}\n\n",
                    "event: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":99,\"method\":\"roots/list\"}\n\n",
                )],
            );
            out.extend_from_slice(b"0\r\n\r\n");
            out
        })
    }
    let c = one_call(answer_and_more, "", 22, "quick");
    let text = c.r.text();
    let messages = c.r.sse_messages();
    assert_eq!(messages.len(), 1, "{text}");
    assert_eq!(messages[0]["id"], 22, "{text}");
    assert!(
        !text.contains("second") && !text.contains("roots/list"),
        "{text}"
    );
}

#[test]
fn an_sse_answer_of_a_declared_length_ends_with_the_answer_too() {
    // Red team: an SSE answer framed by Content-Length was relayed as it came, its length
    // passed on, so neither the end at the response nor an error event of the gateway's
    // could apply. It is chunked to the client like any other stream.
    fn declared_length_stream(req: &str) -> Option<Vec<u8>> {
        req.contains("tools/call").then(|| {
            let events = concat!(
                "event: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":26,\"result\":{\"content\":[]}}\n\n",
                "event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\"params\":{\"level\":\"info\",\"data\":\"after\"}}\n\n",
            );
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 100000\r\n\r\n{events}"
            )
            .into_bytes()
        })
    }
    let c = one_call(declared_length_stream, "", 26, "quick");
    assert!(c.took < Duration::from_millis(800));
    assert_eq!(c.r.header("content-length"), None, "{:?}", c.r.headers);
    let text = c.r.text();
    let messages = c.r.sse_messages();
    assert_eq!(messages.len(), 1, "{text}");
    assert_eq!(messages[0]["id"], 26, "{text}");
    assert!(!text.contains("after"), "{text}");
    wait_closed(
        &c.closed,
        1,
        "a declared-length stream kept open after its answer",
    );
    never_cancelled(&c.seen);
}

#[test]
fn a_response_followed_in_the_same_read_by_broken_framing_still_reaches_the_client() {
    // Red team: the chunk decoder's error took the response decoded before it down with it.
    fn answer_then_garbage(req: &str) -> Option<Vec<u8>> {
        req.contains("tools/call").then(|| {
            let mut out =
                sse_events_then_silence(&[r#"{"jsonrpc":"2.0","id":27,"result":{"content":[]}}"#]);
            out.extend_from_slice(b"zz\r\n");
            out
        })
    }
    let c = one_call(answer_then_garbage, "", 27, "quick");
    let messages = c.r.sse_messages();
    assert_eq!(messages.len(), 1, "{}", c.r.text());
    assert_eq!(messages[0]["id"], 27, "{}", c.r.text());
    never_cancelled(&c.seen);
}

#[test]
fn an_answer_without_a_body_gets_none_whatever_its_type_says() {
    // Red team: a 204 labelled text/event-stream, through a response step (redaction here),
    // was answered with `transfer-encoding: chunked` and a last chunk, which a client reads as
    // the start of its next response.
    fn no_content(req: &str) -> Option<Vec<u8>> {
        req.contains("tools/call")
            .then(|| b"HTTP/1.1 204 No Content\r\nContent-Type: text/event-stream\r\n\r\n".to_vec())
    }
    let (url, _, _) = scripted_upstream(no_content);
    let g = gateway(&url, "\n[redaction]\nenabled = true\n");
    let sid = initialize(g.addr);
    let mut s = connect(g.addr);
    s.write_all(mcp_post_raw(&call(28, "quick", "{}"), Some(&sid), "").as_bytes())
        .unwrap();
    s.write_all(mcp_post_raw(INITIALIZED, Some(&sid), "").as_bytes())
        .unwrap();
    // Both answers, read straight from the socket: nothing between them. (The second waits
    // out its timeout: this upstream says nothing more on the connection it answered 204 on,
    // which the gateway rightly pooled.)
    let got = read_all(&mut s, Duration::from_secs(2)).unwrap_or_else(|open| open);
    let text = String::from_utf8_lossy(&got);
    let (first, rest) = text.split_once("\r\n\r\n").expect("a head");
    assert!(first.starts_with("HTTP/1.1 204"), "{text}");
    assert!(
        !first.to_ascii_lowercase().contains("transfer-encoding")
            && !first.to_ascii_lowercase().contains("content-length"),
        "{text}"
    );
    assert!(rest.starts_with("HTTP/1.1 "), "{text}");
}

#[test]
fn an_sse_answer_cut_by_its_upstream_is_audited_as_an_upstream_failure() {
    // Red team: a stream cut by broken framing (or an early close) was audited `allow`, no
    // reason.
    fn progress_then_garbage(req: &str) -> Option<Vec<u8>> {
        req.contains("tools/call").then(|| {
            let mut out = sse_events_then_silence(&[PROGRESS]);
            out.extend_from_slice(b"zz\r\n");
            out
        })
    }
    let (url, _, _) = scripted_upstream(progress_then_garbage);
    let (extra, _dir, audit) = audit_to_file();
    let g = gateway(&url, &extra);
    let sid = initialize(g.addr);
    let mut s = connect(g.addr);
    s.write_all(mcp_post_raw(&call(29, "quick", "{}"), Some(&sid), "").as_bytes())
        .unwrap();
    let got = read_all(&mut s, Duration::from_secs(5)).expect("the cut stream closes");
    assert!(String::from_utf8_lossy(&got).contains("notifications/progress"));
    let line = call_audit_line(&audit);
    assert_eq!(line["decision"], "error", "{line}");
    assert_eq!(line["reason"], "upstream_unavailable", "{line}");
}

#[test]
fn only_the_calls_own_response_ends_its_stream() {
    // A request of the server's carrying the call's id, an answer to another id, a response
    // with the call's id as a string, an event of another type: none ends the stream.
    fn lookalikes_then_answer(req: &str) -> Option<Vec<u8>> {
        req.contains("tools/call").then(|| {
            let mut out = chunked(
                "text/event-stream",
                &[
                    "event: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":23,\"method\":\"sampling/createMessage\",\"params\":{}}\n\n",
                    "event: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":24,\"result\":{}}\n\n",
                    "event: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":\"23\",\"result\":{}}\n\n",
                    "event: other\ndata: {\"jsonrpc\":\"2.0\",\"id\":23,\"result\":{}}\n\n",
                    "event: message\ndata: {\"jsonrpc\":\"2.0\",\n",
                    "data: \"id\":23,\"result\":{\"content\":[]}}\n\n",
                ],
            );
            out.extend_from_slice(b"0\r\n\r\n");
            out
        })
    }
    let c = one_call(lookalikes_then_answer, "", 23, "quick");
    let text = c.r.text();
    // Every event, its data lines joined: all five came through, the answer last.
    let events: Vec<serde_json::Value> = text
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let data: Vec<&str> = e.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
            serde_json::from_str(&data.join("\n")).unwrap()
        })
        .collect();
    assert_eq!(events.len(), 5, "{text}");
    assert!(text.contains("event: other"), "{text}");
    assert_eq!(events[4]["id"], 23, "{text}");
    assert!(events[4].get("result").is_some(), "{text}");
}

#[test]
fn an_upstream_that_ends_its_stream_just_after_the_answer_keeps_its_connection() {
    // The answer and the stream's last chunk in two writes, a moment apart: the connection
    // goes back to the pool and carries the next call.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            counted.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                loop {
                    let n = conn.read(&mut buf).unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    let req = String::from_utf8_lossy(&buf[..n]).to_string();
                    if req.contains("\"initialize\"") {
                        let body = r#"{"jsonrpc":"2.0","id":1,"result":{"protocolVersion":"2025-11-25","capabilities":{"tools":{}},"serverInfo":{"name":"two-writes","version":"1"}}}"#;
                        let _ = write!(
                            conn,
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nMcp-Session-Id: s1\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                    } else if req.contains("tools/call") {
                        let id = if req.contains("\"id\":31") { 31 } else { 32 };
                        let event = format!(
                            "event: message\ndata: {{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":{{\"content\":[]}}}}\n\n"
                        );
                        let _ = conn.write_all(&chunked("text/event-stream", &[&event]));
                        // A second write, a moment later (well within the gateway's 100 ms).
                        std::thread::sleep(Duration::from_millis(5));
                        let _ = conn.write_all(b"0\r\n\r\n");
                    } else {
                        let _ =
                            conn.write_all(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n");
                    }
                }
            });
        }
    });
    let g = gateway(&url, "");
    let sid = initialize(g.addr);
    // One client connection, so both calls are served by one worker (pools are per worker).
    let mut s = connect(g.addr);
    s.write_all(mcp_post_raw(&call(31, "quick", "{}"), Some(&sid), "").as_bytes())
        .unwrap();
    let first = read_response(&mut s).expect("the first answer");
    assert_eq!(first.sse_messages()[0]["id"], 31, "{}", first.text());
    let before = accepted.load(Ordering::SeqCst);
    s.write_all(mcp_post_raw(&call(32, "quick", "{}"), Some(&sid), "").as_bytes())
        .unwrap();
    let second = read_response(&mut s).expect("the second answer");
    assert_eq!(second.sse_messages()[0]["id"], 32, "{}", second.text());
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        before,
        "the second call needed a new upstream connection"
    );
}

// A legacy (HTTP+SSE, 2024-11-05) client reads every answer on its one stream, where nothing
// says an answer has ended: the same deadlines hold for it, with the gateway's errors as
// messages on that stream. (Before: a call whose answer stalled left it waiting for ever,
// nothing was cancelled, and an upstream's stream kept open after the answer was relayed
// until the call's deadline.)

/// A legacy client's initialized session through a gateway (see [`gateway`]) in front of a
/// scripted upstream.
fn legacy_session(script: Script) -> (Gateway, Legacy, Arc<AtomicUsize>, Seen) {
    legacy_session_with(script, "")
}

/// [`legacy_session`], with `extra` configuration.
fn legacy_session_with(script: Script, extra: &str) -> (Gateway, Legacy, Arc<AtomicUsize>, Seen) {
    let (url, closed, seen) = scripted_upstream(script);
    let g = gateway(&url, extra);
    let mut l = Legacy::open(g.addr, "/sse", "");
    l.initialize();
    (g, l, closed, seen)
}

#[test]
fn a_legacy_clients_call_whose_sse_answer_stalls_gets_the_timeout_error_and_is_cancelled() {
    let (extra, _dir, audit) = audit_to_file();
    let (_g, mut l, closed, seen) = legacy_session_with(progress_then_silence, &extra);
    let started = Instant::now();
    let answer = l.call(&call(7, "slow", "{}"));
    let waited = started.elapsed();
    assert_eq!(answer["id"], 7, "{answer}");
    assert_timeout_error(&answer);
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "answered after {waited:?}, the call's timeout being 1 s"
    );
    assert_eq!(l.others.len(), 1, "{:?}", l.others);
    assert_eq!(l.others[0]["method"], "notifications/progress");
    wait_closed(&closed, 1, "a legacy call's timed-out SSE answer");
    let cancel = cancellation_of(&seen, 7).to_ascii_lowercase();
    assert!(cancel.contains("mcp-session-id: s1\r\n"), "{cancel}");
    // The POST was audited when it was taken (`allow`, 202); the failure upstream after that
    // is audited too, as a call's is (red team: it left no line).
    let line = audit_line_where(&audit, |l| {
        l["method"] == "tools/call" && l["decision"] == "error"
    });
    assert_eq!(line["reason"], "upstream_timeout", "{line}");
    assert_eq!(line["tool"], "slow", "{line}");
    assert_eq!(line["identity"], "anonymous", "{line}");
}

#[test]
fn a_legacy_clients_call_whose_answer_never_starts_or_stalls_mid_json_is_cancelled_too() {
    for script in [nothing_to_calls as Script, chunked_json_then_silence] {
        let (_g, mut l, _, seen) = legacy_session(script);
        let answer = l.call(&call(3, "slow", "{}"));
        assert_timeout_error(&answer);
        cancellation_of(&seen, 3);
    }
}

#[test]
fn a_legacy_clients_answer_ends_with_its_response_and_nothing_sent_after_it_is_relayed() {
    fn answer_then_more(req: &str) -> Option<Vec<u8>> {
        req.contains("tools/call").then(|| {
            sse_events_then_silence(&[
                r#"{"jsonrpc":"2.0","id":21,"result":{"content":[]}}"#,
                r#"{"jsonrpc":"2.0","method":"notifications/message","params":{"level":"info","data":"after"}}"#,
            ])
        })
    }
    let (_g, mut l, closed, seen) = legacy_session(answer_then_more);
    let started = Instant::now();
    let answer = l.call(&call(21, "quick", "{}"));
    assert!(answer.get("result").is_some(), "{answer}");
    assert!(started.elapsed() < Duration::from_millis(800));
    // The upstream's still-open stream is let go, and the answered call is not cancelled.
    wait_closed(
        &closed,
        1,
        "a legacy call's stream kept open after its answer",
    );
    never_cancelled(&seen);
    // Past the call's deadline, the next message on the stream is the next call's: neither
    // what the upstream sent after the answer nor a timeout error for the answered call.
    let next = l.call(r#"{"jsonrpc":"2.0","id":22,"method":"ping"}"#);
    assert_eq!(next["id"], 22, "{next}");
    assert!(l.others.is_empty(), "{:?}", l.others);
}

#[test]
fn a_legacy_clients_batch_that_times_out_gets_errors_for_what_is_unanswered_and_cancels_only_that()
{
    fn one_answered_then_silence(req: &str) -> Option<Vec<u8>> {
        req.contains("tools/call").then(|| {
            sse_events_then_silence(&[r#"{"jsonrpc":"2.0","id":"b","result":{"content":[]}}"#])
        })
    }
    let (_g, mut l, _, seen) = legacy_session(one_answered_then_silence);
    let batch = format!(
        "[{},{},{},{}]",
        call(51, "slow", "{}"),
        r#"{"jsonrpc":"2.0","id":"b","method":"tools/call","params":{"name":"slow","arguments":{}}}"#,
        r#"{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":"t","progress":1}}"#,
        call(53, "slow", "{}")
    );
    assert_eq!(l.post(&batch).status, 202);
    let messages: Vec<serde_json::Value> = (0..3)
        .map(|_| l.next_message().expect("a message on the stream"))
        .collect();
    assert_eq!(messages[0]["id"], "b", "{messages:?}");
    assert!(messages[0].get("result").is_some(), "{messages:?}");
    assert_eq!(messages[1]["id"], 51, "{messages:?}");
    assert_eq!(messages[2]["id"], 53, "{messages:?}");
    assert_timeout_error(&messages[1]);
    assert_timeout_error(&messages[2]);
    assert_eq!(batch_cancellation(&seen), [51, 53]);
}

#[test]
fn a_legacy_clients_call_the_upstream_answers_without_a_response_gets_an_error_not_a_silence() {
    // An SSE answer ended before its response (the client cannot resume it through the
    // gateway), and a request answered 202 as if it were a notification.
    fn ended_or_accepted(req: &str) -> Option<Vec<u8>> {
        (req.contains("tools/call") && req.contains("\"ends\"")).then(|| {
            let event = format!("event: message\ndata: {PROGRESS}\n\n");
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{event}\r\n0\r\n\r\n",
                event.len()
            )
            .into_bytes()
        })
    }
    let (_g, mut l, _, seen) = legacy_session(ended_or_accepted);
    let started = Instant::now();
    for (id, tool) in [(41, "ends"), (42, "accepted")] {
        let answer = l.call(&call(id, tool, "{}"));
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("without a response"), "{answer}");
    }
    assert!(started.elapsed() < Duration::from_millis(800));
    // The stream that ended short is cancelled (its request may still run), saying why; the
    // 202 was the upstream's whole answer.
    let cancel = cancellation_of(&seen, 41);
    assert!(cancel.contains("broke off"), "{cancel}");
    std::thread::sleep(Duration::from_millis(200));
    let cancelled: Vec<_> = cancellations(&seen)
        .iter()
        .map(|c| c["params"]["requestId"].clone())
        .collect();
    assert_eq!(cancelled, [41]);
}

#[test]
fn a_legacy_call_still_unanswered_when_the_shutdown_grace_ends_gets_the_error_and_is_cancelled() {
    // The legacy stream is where the call's answer would come: it stays open through the
    // grace for it, and then carries the 503 error in its place before it ends.
    let (url, _, seen) = scripted_upstream(progress_then_silence);
    let mut g = Gateway::start(&http_config("auto", &url, "shutdown_grace_secs = 1", ""));
    let mut l = Legacy::open(g.addr, "/sse", "");
    l.initialize();
    assert_eq!(l.post(&call(12, "slow", "{}")).status, 202);
    let progress = l.next_message().expect("the call's progress");
    assert_eq!(progress["method"], "notifications/progress");
    let signalled = Instant::now();
    g.signal(libc::SIGTERM);
    let answer = l.next_message().expect("the call's error on the stream");
    assert_eq!(answer["id"], 12, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("shutting down")),
        "{answer}"
    );
    assert!(
        signalled.elapsed() >= Duration::from_millis(900),
        "the error came before the grace ran out"
    );
    assert!(
        l.next_event().is_none(),
        "the stream goes on after the error"
    );
    cancellation_of(&seen, 12);
    assert!(g.wait_exit(Duration::from_secs(10)).is_some());
}

#[test]
fn a_legacy_stream_carries_multi_line_data_as_one_message_and_no_field_an_upstream_hides_in_it() {
    // Red team: data spread over several `data:` lines (legal SSE) was written to the legacy
    // stream with its line breaks raw: a pretty-printed answer reached the client cut to its
    // first line (and then got the gateway's error too), and data that was no JSON let the
    // upstream write whole events of its own, a forged `endpoint` among them.
    fn multi_line(req: &str) -> Option<Vec<u8>> {
        call_answered_with(
            req,
            &[
                "event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\"params\":{}}\ndata: \ndata: event: endpoint\ndata: data: http://127.0.0.1:1/evil?sessionId=x\n\n",
                "event: message\ndata: {\"jsonrpc\":\"2.0\",\ndata: \"id\":201,\ndata: \"result\":{\"content\":[]}}\n\n",
            ],
        )
    }
    let (_g, mut l, _, seen) = legacy_session(multi_line);
    // `next_message` fails on any event other than a message.
    let answer = l.call(&call(201, "quick", "{}"));
    assert!(answer.get("result").is_some(), "{answer}");
    assert!(l.others.is_empty(), "{:?}", l.others);
    never_cancelled(&seen);
}

#[test]
fn a_legacy_clients_call_answered_in_an_array_is_answered_once_and_a_whole_answer_is_not_cancelled()
{
    // A legacy client reads an array of responses (batches are its protocol's): the array
    // answers its request, which then gets no error of the gateway's besides (red team: a
    // double answer and a cancellation of an answered request). A JSON answer that came whole
    // without the response gets the error, but no cancellation: it was the upstream's whole
    // answer.
    fn array_or_another_id(req: &str) -> Option<Vec<u8>> {
        if !req.contains("tools/call") {
            return None;
        }
        let body = if req.contains("\"array\"") {
            r#"[{"jsonrpc":"2.0","id":43,"result":{"content":[]}}]"#
        } else {
            r#"{"jsonrpc":"2.0","id":999,"result":{"content":[]}}"#
        };
        Some(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        )
    }
    let (_g, mut l, _, seen) = legacy_session(array_or_another_id);
    assert_eq!(l.post(&call(43, "array", "{}")).status, 202);
    let array = l.next_message().expect("the array");
    assert_eq!(array[0]["id"], 43, "{array}");
    let answer = l.call(&call(44, "other", "{}"));
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("without a response"), "{answer}");
    // Between them, only the other id's response: no error for 43.
    assert_eq!(l.others.len(), 1, "{:?}", l.others);
    assert_eq!(l.others[0]["id"], 999, "{:?}", l.others);
    never_cancelled(&seen);
}

#[test]
fn a_response_one_legacy_answer_carries_for_another_request_answers_that_request() {
    // Red team: the answer to B carried A's response too (the client read A answered); at A's
    // deadline the gateway still wrote its timeout error for A and cancelled it upstream.
    fn stall_or_carry(req: &str) -> Option<Vec<u8>> {
        if req.contains("\"stall\"") {
            Some(chunked("text/event-stream", &[": waiting\n\n"]))
        } else if req.contains("\"carry\"") {
            Some(sse_events_then_silence(&[
                r#"{"jsonrpc":"2.0","id":501,"result":{"content":[]}}"#,
                r#"{"jsonrpc":"2.0","id":502,"result":{"content":[]}}"#,
            ]))
        } else {
            None
        }
    }
    let (_g, mut l, _, seen) = legacy_session(stall_or_carry);
    assert_eq!(l.post(&call(501, "stall", "{}")).status, 202);
    // A is on its way upstream before B is.
    std::thread::sleep(Duration::from_millis(100));
    let b = l.call(&call(502, "carry", "{}"));
    assert!(b.get("result").is_some(), "{b}");
    assert_eq!(l.others.len(), 1, "{:?}", l.others);
    assert_eq!(l.others[0]["id"], 501, "{:?}", l.others);
    // Past A's deadline (1 s): the next message is the next request's, not an error for A.
    std::thread::sleep(Duration::from_millis(1200));
    l.others.clear();
    let next = l.call(r#"{"jsonrpc":"2.0","id":503,"method":"ping"}"#);
    assert_eq!(next["id"], 503, "{next}");
    assert!(l.others.is_empty(), "{:?}", l.others);
    assert!(
        !cancellations(&seen)
            .iter()
            .any(|c| c["params"]["requestId"] == 501),
        "{:?}",
        cancellations(&seen)
    );
}

#[test]
fn a_response_a_restricted_callers_stream_cannot_check_is_answered_with_the_error_not_dropped_silently()
 {
    // Red team: the answer to a restricted caller's call held a list the tool gate cannot
    // check (`Tools` beside where `tools` would be); it was dropped, rightly, but the legacy
    // client then got nothing at all for its request.
    // The error goes only to what the client asked, once (red team: one event of a hostile
    // upstream's became 400,000 errors, for ids nobody asked).
    fn unfilterable(req: &str) -> Option<Vec<u8>> {
        req.contains("tools/call").then(|| {
            sse_events_then_silence(&[
                r#"[{"jsonrpc":"2.0","id":601,"result":{"Tools":[{"name":"secret"}]}},{"jsonrpc":"2.0","id":999,"result":{}},{"jsonrpc":"2.0","id":601.0,"result":{}}]"#,
            ])
        })
    }
    const CAROL: &str = "carol-key-0123456789";
    let keys = format!(
        "\n[[auth.api_keys]]\nid = \"carol\"\nkey_hash = \"{}\"\nallowed_tools = [\"quick\"]\n",
        mcp_guard::cli::hash_key(CAROL)
    );
    let (url, _, _) = scripted_upstream(unfilterable);
    let g = gateway(&url, &keys);
    let mut l = Legacy::open(g.addr, "/sse", CAROL);
    l.initialize();
    let answer = l.call(&call(601, "quick", "{}"));
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("cannot be checked"), "{answer}");
    assert!(l.others.is_empty(), "{:?}", l.others);
    // The next message on the stream is the next request's: no second error for 601, none
    // for 999.
    let next = l.call(r#"{"jsonrpc":"2.0","id":602,"method":"ping"}"#);
    assert_eq!(next["id"], 602, "{next}");
    assert!(l.others.is_empty(), "{:?}", l.others);
}

#[test]
fn every_cancellation_at_the_end_of_the_shutdown_grace_is_sent_before_the_gateway_exits() {
    // Red team: with 640 legacy messages in flight at the grace's end, every client got its
    // 503, but the gateway exited before about a sixth of the cancellations had gone out (here,
    // with 320: a third or more, each on a connection of its own that the upstream could not
    // all take at once).
    let (url, _, seen) = scripted_upstream(|req| {
        req.contains("tools/call")
            .then(|| chunked("text/event-stream", &[": waiting\n\n"]))
    });
    let mut g = Gateway::start(
        &(http_config("auto", &url, "shutdown_grace_secs = 1", "")
            .replace("workers = 2", "workers = 1")
            + "\n[rate_limit]\nenabled = false\n"),
    );
    const SESSIONS: u64 = 5;
    const EACH: u64 = 64;
    let mut streams = Vec::new();
    for s in 0..SESSIONS {
        let mut l = Legacy::open(g.addr, "/sse", "");
        l.initialize();
        for i in 0..EACH {
            assert_eq!(l.post(&call(1000 * (s + 1) + i, "slow", "{}")).status, 202);
        }
        streams.push(l);
    }
    // Every call is on its way upstream.
    let until = Instant::now() + Duration::from_secs(10);
    while seen
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.contains("tools/call"))
        .count()
        < (SESSIONS * EACH) as usize
    {
        assert!(
            Instant::now() < until,
            "not every call reached the upstream"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    g.signal(libc::SIGTERM);
    assert!(g.wait_exit(Duration::from_secs(10)).is_some());
    std::thread::sleep(Duration::from_millis(300));
    let cancelled: std::collections::HashSet<String> = cancellations(&seen)
        .iter()
        .map(|c| c["params"]["requestId"].to_string())
        .collect();
    let mut missing: Vec<u64> = (0..SESSIONS)
        .flat_map(|s| (0..EACH).map(move |i| 1000 * (s + 1) + i))
        .filter(|id| !cancelled.contains(&id.to_string()))
        .collect();
    missing.sort();
    assert!(
        missing.is_empty(),
        "{} not cancelled: {missing:?}",
        missing.len()
    );
}

#[test]
fn a_server_that_never_answers_its_cancellations_holds_up_no_other_servers() {
    // The gateway sends a few notices to a server at once; a server that takes cancellations
    // and never answers them holds those turns for their whole wait. Another server's
    // cancellation does not wait behind them.
    fn silent_but_initialized(req: &str) -> Option<Vec<u8>> {
        // Calls and cancellations alike get nothing at all.
        (!req.contains("notifications/initialized")).then(Vec::new)
    }
    let (silent, _, silent_seen) = scripted_upstream(silent_but_initialized);
    let (other, _, other_seen) = scripted_upstream(nothing_to_calls);
    let g = Gateway::start(&format!(
        "[server]\nport = 0\nworkers = 1\n[admin]\nport = 0\n[rate_limit]\nenabled = false\n\
         [[upstream.servers]]\nname = \"silent\"\ntransport = \"http\"\nurl = \"{silent}\"\ntimeout_secs = 1\n\
         [[upstream.servers]]\nname = \"other\"\ntransport = \"http\"\nurl = \"{other}\"\ntimeout_secs = 1\n"
    ));
    let (_, silent_sid) = initialize_at(g.addr, "/mcp/silent", "");
    let calls: Vec<_> = (0..24)
        .map(|i| {
            let (addr, sid) = (g.addr, silent_sid.clone());
            std::thread::spawn(move || {
                request(
                    addr,
                    &mcp_post_raw_at("/mcp/silent", &call(100 + i, "slow", "{}"), Some(&sid), ""),
                )
            })
        })
        .collect();
    for c in calls {
        assert_eq!(c.join().unwrap().status, 504);
    }
    // The silent server has the cancellations it can take at once, and answers none.
    let until = Instant::now() + Duration::from_secs(5);
    while cancellations(&silent_seen).len() < 16 {
        assert!(
            Instant::now() < until,
            "the silent server got no cancellations"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (_, other_sid) = initialize_at(g.addr, "/mcp/other", "");
    let r = request(
        g.addr,
        &mcp_post_raw_at("/mcp/other", &call(7, "slow", "{}"), Some(&other_sid), ""),
    );
    assert_eq!(r.status, 504, "{}", r.text());
    let timed_out = Instant::now();
    while !cancellations(&other_seen)
        .iter()
        .any(|c| c["params"]["requestId"] == 7)
    {
        assert!(
            timed_out.elapsed() < Duration::from_millis(2500),
            "the other server's cancellation waited behind the silent one's"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
