//! The data plane through the real binary: MCP over both upstream kinds, the transport rules,
//! HTTP limits and smuggling defences, crash recovery, reload and shutdown, on both io drivers.

mod common;

use common::*;
use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

macro_rules! on_both_drivers {
    ($($name:ident),* $(,)?) => {
        mod io_uring {
            $( #[test] fn $name() { super::$name("io_uring") } )*
        }
        mod epoll {
            $( #[test] fn $name() { super::$name("epoll") } )*
        }
    };
}

on_both_drivers!(
    stdio_initialize_list_and_call,
    http_upstream_json_initialize_list_and_call,
    http_upstream_sse_responses_are_relayed_as_events,
    stdio_get_stream_delivers_server_notifications,
    http_get_stream_is_relayed,
    sessions_missing_unknown_and_deleted,
    protocol_version_header_is_validated,
    origin_not_allowed_gets_403,
    oversized_head_gets_431_and_body_413,
    smuggling_shapes_get_400_and_close,
    malformed_json_and_invalid_jsonrpc_are_refused,
    stdio_child_crash_fails_request_then_recovers,
    stdio_lines_longer_than_the_pipe_reach_the_child_whole_and_in_order,
    a_stdio_child_that_never_reads_blocks_no_worker,
    keep_alive_and_pipelining_serve_several_requests,
    idle_connection_serves_a_request_after_giving_its_buffer_back,
    sse_events_are_flushed_as_they_arrive,
    a_panicking_request_gets_500_and_the_worker_keeps_serving,
    header_timeout_closes_slowloris_with_408,
    a_head_trickled_byte_by_byte_is_cut_off_at_the_header_timeout,
    a_connection_that_never_sends_is_closed_after_the_header_timeout,
    a_silent_sse_answer_shows_its_head_and_ends_with_its_upstream_when_the_client_leaves,
);

/// Reads the head of an answer whose upstream sent a head and nothing since (up to 5 s), and
/// returns it in lowercase; `what` names the case in the panic when none comes.
fn head_of_silent_answer(s: &mut std::net::TcpStream, what: &str) -> String {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            other => panic!(
                "{what}: no head while the upstream is silent ({other:?}): {}",
                String::from_utf8_lossy(&head)
            ),
        }
    }
    String::from_utf8_lossy(&head).to_ascii_lowercase()
}

/// An HTTP upstream that answers `initialize` and, to anything else, the head of an SSE answer
/// (chunked) and then nothing. Counts the answers it left silent whose connection the gateway
/// has since closed.
fn silent_sse_upstream() -> (String, Arc<AtomicUsize>) {
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
                loop {
                    // One request per read is enough for the gateway's small POSTs.
                    let n = conn.read(&mut buf).unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    let req = String::from_utf8_lossy(&buf[..n]).to_string();
                    if req.contains("\"initialize\"") {
                        let body = r#"{"jsonrpc":"2.0","id":1,"result":{"protocolVersion":"2025-11-25","capabilities":{"tools":{}},"serverInfo":{"name":"silent","version":"1"}}}"#;
                        let _ = write!(
                            conn,
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nMcp-Session-Id: s1\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        continue;
                    }
                    if !req.contains("tools/call") {
                        let _ =
                            conn.write_all(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n");
                        continue;
                    }
                    let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n");
                    // Silent from here: wait for the gateway to close the connection.
                    while conn.read(&mut buf).map(|n| n > 0).unwrap_or(false) {}
                    seen.fetch_add(1, Ordering::SeqCst);
                    return;
                }
            });
        }
    });
    (url, closed)
}

fn a_silent_sse_answer_shows_its_head_and_ends_with_its_upstream_when_the_client_leaves(io: &str) {
    // The upstream's answer begins as SSE and then says nothing, for as long as it likes (no
    // timeout bounds a stream once its head has arrived). The client must see the head at once,
    // and when it leaves, the relay must end with it: held, each such call would keep its
    // connection slot and its upstream connection for ever, and a silent upstream could fill
    // `max_connections` with calls nobody waits for.
    let (url, closed) = silent_sse_upstream();
    let g = Gateway::start(&http_config(io, &url, "max_connections = 8", ""));
    let sid = initialize(g.addr);
    let body = call(2, "echo", r#"{"text":"anyone?"}"#);
    for round in 0..3 {
        let mut clients = Vec::new();
        for _ in 0..4 {
            let mut s = connect(g.addr);
            s.write_all(mcp_post_raw(&body, Some(&sid), "").as_bytes())
                .unwrap();
            let head = head_of_silent_answer(&mut s, &format!("round {round}"));
            assert!(head.starts_with("http/1.1 200"), "{head}");
            assert!(head.contains("text/event-stream"), "{head}");
            clients.push(s);
        }
        // Every client leaves; their calls and upstream connections must go with them.
        drop(clients);
        let deadline = Instant::now() + Duration::from_secs(5);
        while closed.load(Ordering::SeqCst) < 4 * (round + 1) {
            assert!(
                Instant::now() < deadline,
                "round {round}: the gateway kept {} silent upstream answers open after their clients left",
                4 * (round + 1) - closed.load(Ordering::SeqCst)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            g.metric_settles("mcp_guard_active_connections", &[], 0.0),
            0.0,
            "round {round}: client connections still counted"
        );
    }
    // Three rounds of four on eight slots: had any slot leaked, this would be refused.
    assert_eq!(mcp_post(g.addr, INIT, None).status, 200);
    // A client that sends anything while its answer streams (a pipelined request, a stray
    // byte) breaks the exchange: its connection and the upstream's end too.
    let mut s = connect(g.addr);
    s.write_all(mcp_post_raw(&body, Some(&sid), "").as_bytes())
        .unwrap();
    head_of_silent_answer(&mut s, "a client that then sends a byte");
    s.write_all(b"x").unwrap();
    match s.read(&mut [0u8; 4096]) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the connection stayed open after the client sent bytes: {other:?}"),
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while closed.load(Ordering::SeqCst) < 13 {
        assert!(
            Instant::now() < deadline,
            "the upstream's answer was kept open"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn a_panicking_request_gets_500_and_the_worker_keeps_serving(io: &str) {
    // Debug builds panic on a call of the tool named by MCP_GUARD_TEST_PANIC_TOOL: the request
    // gets a 500, the worker (one only, so nothing else could serve) keeps serving, and the
    // connection count is not leaked.
    let config = stdio_config(io, "workers = 1", &[]).replace("workers = 2\n", "");
    let g = Gateway::start_env(&config, &[("MCP_GUARD_TEST_PANIC_TOOL", "add")]);
    let sid = initialize(g.addr);
    for i in 0..3 {
        let r = mcp_post(g.addr, &call(10 + i, "add", r#"{"a":1,"b":2}"#), Some(&sid));
        assert_eq!(r.status, 500, "{}", r.text());
        assert_eq!(r.json()["error"]["code"], -32603);
        let r = mcp_post(
            g.addr,
            &call(20 + i, "echo", r#"{"text":"still here"}"#),
            Some(&sid),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.text().contains("still here"));
    }
    assert_eq!(g.metric("mcp_guard_request_panics_total", &[]), 3.0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while g.metric("mcp_guard_active_connections", &[]) != 0.0 {
        assert!(Instant::now() < deadline, "connections leaked");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sse_events_are_flushed_as_they_arrive(io: &str) {
    // With --sse-responses the demo server sends a progress event at once, then sleeps, then
    // the result: the client must see the first event long before the result exists.
    let up = DemoHttp::start(&["--sse-responses"]);
    let g = Gateway::start(&http_config(io, &up.url(), "", ""));
    let sid = initialize(g.addr);
    let body = r#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"sleep","arguments":{"ms":2000},"_meta":{"progressToken":"t"}}}"#;
    let mut s = connect(g.addr);
    let start = Instant::now();
    s.write_all(mcp_post_raw(body, Some(&sid), "").as_bytes())
        .unwrap();
    let first = read_until(&mut s, b"notifications/progress");
    let first_at = start.elapsed();
    assert!(first.contains("notifications/progress"), "{first}");
    assert!(
        first_at < Duration::from_millis(1500),
        "first event held back for {first_at:?}"
    );
    let rest = read_until(&mut s, b"slept 2000ms");
    assert!(rest.contains("slept 2000ms"), "{rest}");
    assert!(start.elapsed() >= Duration::from_millis(2000));
}

fn idle_connection_serves_a_request_after_giving_its_buffer_back(io: &str) {
    let g = Gateway::start(&stdio_config(io, "", &[]));
    let sid = initialize(g.addr);
    let ping = |id: u32| ping_raw(id, &sid);
    let mut s = connect(g.addr);
    s.write_all(ping(1).as_bytes()).unwrap();
    assert_eq!(read_response(&mut s).unwrap().json()["id"], 1);
    // Longer than the buffer hold (500 ms): the read is cancelled and the connection waits
    // for readability without a buffer; a request arriving now must still be served whole.
    std::thread::sleep(Duration::from_millis(800));
    s.write_all(ping(2).as_bytes()).unwrap();
    assert_eq!(read_response(&mut s).unwrap().json()["id"], 2);
    // A request split across the hold boundary is not lost either.
    let p3 = ping(3);
    let (a, b) = p3.split_at(20);
    std::thread::sleep(Duration::from_millis(450));
    s.write_all(a.as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    s.write_all(b.as_bytes()).unwrap();
    assert_eq!(read_response(&mut s).unwrap().json()["id"], 3);
}

fn stdio_initialize_list_and_call(io: &str) {
    let g = Gateway::start(&stdio_config(io, "", &[]));
    let sid = initialize(g.addr);
    let list = mcp_post(
        g.addr,
        r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#,
        Some(&sid),
    );
    assert_eq!(list.status, 200);
    let tools = list.json()["result"]["tools"].as_array().unwrap().clone();
    assert!(tools.iter().any(|t| t["name"] == "echo"), "{tools:?}");
    let r = mcp_post(
        g.addr,
        &call(3, "echo", r#"{"text":"hi there"}"#),
        Some(&sid),
    );
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["id"], 3, "original id restored");
    assert_eq!(v["result"]["content"][0]["text"], "hi there");
    // A string id survives the remapping too.
    let r = mcp_post(
        g.addr,
        r#"{"jsonrpc":"2.0","id":"abc","method":"tools/call","params":{"name":"add","arguments":{"a":2,"b":3}}}"#,
        Some(&sid),
    );
    assert_eq!(r.json()["id"], "abc");
    assert_eq!(r.json()["result"]["content"][0]["text"], "5");
}

fn http_upstream_json_initialize_list_and_call(io: &str) {
    let up = DemoHttp::start(&["--test-tools"]);
    let g = Gateway::start(&http_config(
        io,
        &up.url(),
        "",
        "headers = { \"X-Upstream-Key\" = \"upstream-secret\" }",
    ));
    let sid = initialize(g.addr);
    let list = mcp_post(
        g.addr,
        r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#,
        Some(&sid),
    );
    assert_eq!(list.status, 200, "{}", list.text());
    assert!(list.json()["result"]["tools"].as_array().unwrap().len() >= 3);
    let r = mcp_post(
        g.addr,
        &call(3, "echo", r#"{"text":"via http"}"#),
        Some(&sid),
    );
    assert_eq!(rpc_result(&r)["result"]["content"][0]["text"], "via http");
    // The client's credentials never reach the upstream; the configured upstream header does.
    // The demo server reports the headers of the very request that carries this call, so the
    // credentials ride on it.
    let r = request(
        g.addr,
        &mcp_post_raw(
            &call(5, "last_request_headers", "{}"),
            Some(&sid),
            "Authorization: Bearer client-secret\r\nX-Api-Key: client-key\r\nCookie: c=1\r\n",
        ),
    );
    assert_eq!(r.status, 200);
    let text = rpc_result(&r)["result"]["content"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    let seen: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(
        seen.get("authorization").is_none(),
        "Authorization leaked: {seen}"
    );
    assert!(seen.get("x-api-key").is_none(), "X-Api-Key leaked: {seen}");
    assert!(seen.get("cookie").is_none(), "Cookie leaked: {seen}");
    assert_eq!(seen["x-upstream-key"], "upstream-secret");
    assert!(seen.get("x-request-id").is_some());
    assert!(
        seen.get("accept").is_some(),
        "the demo reports this request's headers: {seen}"
    );
    // The upstream saw its own session id, not the gateway's wrapped one.
    assert_ne!(seen["mcp-session-id"].as_str(), Some(sid.as_str()));
}

fn http_upstream_sse_responses_are_relayed_as_events(io: &str) {
    let up = DemoHttp::start(&["--sse-responses"]);
    let g = Gateway::start(&http_config(io, &up.url(), "", ""));
    let sid = initialize(g.addr);
    let body = r#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"progress","arguments":{"steps":3},"_meta":{"progressToken":"p1"}}}"#;
    let r = mcp_post(g.addr, body, Some(&sid));
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("text/event-stream")
    );
    let msgs = r.sse_messages();
    let progress = msgs
        .iter()
        .filter(|m| m["method"] == "notifications/progress")
        .count();
    assert_eq!(progress, 3, "{msgs:?}");
    assert_eq!(msgs.last().unwrap()["id"], 9);
}

fn stdio_get_stream_delivers_server_notifications(io: &str) {
    let g = Gateway::start(&stdio_config(io, "", &[]));
    let sid = initialize(g.addr);
    let mut stream = open_get_stream(g.addr, &sid);
    // Read the head, then trigger a server notification from another connection.
    let head = read_until(&mut stream, b"\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("text/event-stream"));
    let r = mcp_post(g.addr, &call(2, "notify", "{}"), Some(&sid));
    assert_eq!(r.status, 200);
    let events = read_until(&mut stream, b"list_changed");
    assert!(
        events.contains("notifications/tools/list_changed"),
        "{events}"
    );
}

fn http_get_stream_is_relayed(io: &str) {
    let up = DemoHttp::start(&[]);
    let g = Gateway::start(&http_config(io, &up.url(), "", ""));
    let sid = initialize(g.addr);
    let mut stream = open_get_stream(g.addr, &sid);
    let got = read_until(&mut stream, b"stream opened");
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
}

fn sessions_missing_unknown_and_deleted(io: &str) {
    for http in [false, true] {
        let up = DemoHttp::start(&[]);
        let cfg = if http {
            http_config(io, &up.url(), "", "")
        } else {
            stdio_config(io, "", &[])
        };
        let g = Gateway::start(&cfg);
        let sid = initialize(g.addr);
        let ping = r#"{"jsonrpc":"2.0","id":5,"method":"ping"}"#;
        assert_eq!(mcp_post(g.addr, ping, Some(&sid)).status, 200);
        let missing = mcp_post(g.addr, ping, None);
        assert_eq!(missing.status, 400, "http={http}: {}", missing.text());
        let forged = mcp_post(g.addr, ping, Some("Zm9yZ2Vk.AAAA"));
        assert_eq!(forged.status, 404, "http={http}");
        let mut tampered = sid.clone().into_bytes();
        tampered[1] = if tampered[1] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap();
        assert_eq!(
            mcp_post(g.addr, ping, Some(&tampered)).status,
            404,
            "http={http}"
        );
        let del = request(
            g.addr,
            &format!("DELETE /mcp HTTP/1.1\r\nHost: t\r\nMcp-Session-Id: {sid}\r\n\r\n"),
        );
        assert_eq!(del.status, 204, "http={http}: {}", del.text());
        assert_eq!(
            mcp_post(g.addr, ping, Some(&sid)).status,
            404,
            "http={http}: deleted"
        );
    }
}

fn protocol_version_header_is_validated(io: &str) {
    let g = Gateway::start(&stdio_config(io, "", &[]));
    let sid = initialize(g.addr);
    let ping = r#"{"jsonrpc":"2.0","id":5,"method":"ping"}"#;
    for (version, status) in [
        ("2025-11-25", 200),
        ("2025-06-18", 200),
        ("2025-03-26", 200),
        ("1999-01-01", 400),
    ] {
        let r = request(
            g.addr,
            &mcp_post_raw(
                ping,
                Some(&sid),
                &format!("MCP-Protocol-Version: {version}\r\n"),
            ),
        );
        assert_eq!(r.status, status, "{version}: {}", r.text());
    }
    // Batches: accepted for 2025-03-26, refused for later revisions.
    let batch =
        r#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":2,"method":"ping"}]"#;
    let r = request(
        g.addr,
        &mcp_post_raw(batch, Some(&sid), "MCP-Protocol-Version: 2025-03-26\r\n"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let arr = r.json();
    assert_eq!(arr.as_array().unwrap().len(), 2);
    let r = request(
        g.addr,
        &mcp_post_raw(batch, Some(&sid), "MCP-Protocol-Version: 2025-11-25\r\n"),
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], -32600);
    // Mcp-Method must agree with the body.
    let r = request(
        g.addr,
        &mcp_post_raw(ping, Some(&sid), "Mcp-Method: tools/list\r\n"),
    );
    assert_eq!(r.status, 400);
    let r = request(
        g.addr,
        &mcp_post_raw(
            &call(6, "echo", r#"{"text":"a"}"#),
            Some(&sid),
            "Mcp-Method: tools/call\r\nMcp-Name: add\r\n",
        ),
    );
    assert_eq!(r.status, 400);
}

fn origin_not_allowed_gets_403(io: &str) {
    let g = Gateway::start(&stdio_config(
        io,
        "allowed_origins = [\"https://app.example.com\"]",
        &[],
    ));
    let r = request(
        g.addr,
        &mcp_post_raw(INIT, None, "Origin: https://evil.example.com\r\n"),
    );
    assert_eq!(r.status, 403);
    let r = request(
        g.addr,
        &mcp_post_raw(INIT, None, "Origin: https://app.example.com\r\n"),
    );
    assert_eq!(r.status, 200);
}

fn oversized_head_gets_431_and_body_413(io: &str) {
    let g = Gateway::start(&stdio_config(
        io,
        "max_header_bytes = 1024\nmax_body_bytes = 2048",
        &[],
    ));
    let big_header = format!("X-Filler: {}\r\n", "a".repeat(4000));
    let r = request(g.addr, &mcp_post_raw(INIT, None, &big_header));
    assert_eq!(r.status, 431);
    let big_body = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"ping","params":{{"x":"{}"}}}}"#,
        "b".repeat(4000)
    );
    let r = mcp_post(g.addr, &big_body, None);
    assert_eq!(r.status, 413);
    // Chunked bodies are held to the same limit.
    let chunk = "c".repeat(3000);
    let raw = format!(
        "POST /mcp HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nAccept: {ACCEPT_BOTH}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len()
    );
    assert_eq!(request(g.addr, &raw).status, 413);
}

fn smuggling_shapes_get_400_and_close(io: &str) {
    let g = Gateway::start(&stdio_config(io, "", &[]));
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
    for extra in [
        format!(
            "Content-Length: {}\r\nTransfer-Encoding: chunked\r\n",
            body.len()
        ),
        format!(
            "Content-Length: {}\r\nContent-Length: {}\r\n",
            body.len(),
            body.len() + 1
        ),
        "Transfer-Encoding: gzip, chunked\r\n".to_string(),
        "Transfer-Encoding: identity\r\n".to_string(),
    ] {
        let raw = format!(
            "POST /mcp HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nAccept: {ACCEPT_BOTH}\r\n{extra}\r\n{body}"
        );
        let mut s = connect(g.addr);
        s.write_all(raw.as_bytes()).unwrap();
        let r = read_response(&mut s).unwrap();
        assert_eq!(r.status, 400, "{extra:?}");
        assert_eq!(r.header("connection"), Some("close"));
        // The connection is closed: nothing more is read from it.
        let mut rest = Vec::new();
        let n = s.read_to_end(&mut rest).unwrap_or(0);
        assert_eq!(n, 0, "connection must be closed after a framing error");
    }
}

fn malformed_json_and_invalid_jsonrpc_are_refused(io: &str) {
    let g = Gateway::start(&stdio_config(io, "", &[]));
    let sid = initialize(g.addr);
    let r = mcp_post(g.addr, "{not json", Some(&sid));
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], -32700);
    assert!(r.json()["id"].is_null());
    for bad in [
        r#"{"jsonrpc":"1.0","id":1,"method":"ping"}"#,
        r#"{"id":1,"method":"ping"}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":7}"#,
        r#""just a string""#,
        r#"[]"#,
    ] {
        let r = mcp_post(g.addr, bad, Some(&sid));
        assert_eq!(r.status, 400, "{bad}");
        assert_eq!(r.json()["error"]["code"], -32600, "{bad}");
    }
    // Wrong content type and Accept.
    let r = request(
        g.addr,
        &format!(
            "POST /mcp HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\nAccept: {ACCEPT_BOTH}\r\nContent-Length: 2\r\n\r\n{{}}"
        ),
    );
    assert_eq!(r.status, 415);
    let r = request(
        g.addr,
        "POST /mcp HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nAccept: application/json\r\nContent-Length: 2\r\n\r\n{}",
    );
    assert_eq!(r.status, 406);
}

/// Waits (at most 10 s) until an echo in session `sid` is answered again after a restart.
fn echo_comes_back(g: &Gateway, sid: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = mcp_post(g.addr, &call(8, "echo", r#"{"text":"back"}"#), Some(sid));
        if r.status == 200 {
            assert_eq!(r.json()["result"]["content"][0]["text"], "back");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "upstream never came back: {}",
            r.text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn stdio_child_crash_fails_request_then_recovers(io: &str) {
    let g = Gateway::start(&stdio_config(io, "", &["--test-tools"]));
    let sid = initialize(g.addr);
    let r = mcp_post(g.addr, &call(7, "crash", "{}"), Some(&sid));
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["id"], 7);
    assert_eq!(r.json()["error"]["code"], -32603);
    // The child is restarted (with the session's initialize replayed); the same session works.
    echo_comes_back(&g, &sid);
    assert!(g.metric("mcp_guard_upstream_restarts_total", &[]) >= 1.0);
}

fn stdio_lines_longer_than_the_pipe_reach_the_child_whole_and_in_order(io: &str) {
    // Lines are written straight into the child's pipe while it takes them whole; one longer
    // than the pipe's buffer (64 KiB) is finished by the writer thread, and every line decided
    // meanwhile must queue behind it. Long and short calls from several connections at once:
    // were two lines ever interleaved, the child would read broken JSON and an answer would be
    // missing or wrong.
    let g = Gateway::start(&stdio_config(io, "", &[]));
    let sid = initialize(g.addr);
    let senders: Vec<_> = (0..8u64)
        .map(|t| {
            let (addr, sid) = (g.addr, sid.clone());
            std::thread::spawn(move || {
                for i in 0..6u64 {
                    let id = 100 * t + i;
                    let text = if i % 2 == 0 {
                        // Distinct per request, so an answer can only be its own.
                        format!("{id}:{}", "abcdefghij".repeat(40_000 + id as usize))
                    } else {
                        format!("short {id}")
                    };
                    let args = serde_json::json!({ "text": text }).to_string();
                    let r = mcp_post(addr, &call(id, "echo", &args), Some(&sid));
                    assert_eq!(r.status, 200, "call {id}: {}", r.status);
                    let answer = r.json();
                    assert_eq!(answer["id"], id);
                    assert_eq!(answer["result"]["content"][0]["text"], text.as_str());
                }
            })
        })
        .collect();
    for s in senders {
        s.join().unwrap();
    }
}

fn a_stdio_child_that_never_reads_blocks_no_worker(io: &str) {
    // The child never reads its stdin. A request longer than the pipe's buffer fills it: the
    // rest waits in the writer thread, never in the one worker, which goes on serving other
    // connections; the stuck request times out like any unanswered one.
    let config = format!(
        "[server]\nport = 0\nworkers = 1\nio = \"{io}\"\n\n[admin]\nport = 0\n\n[upstream]\ntransport = \"stdio\"\ncommand = \"sleep\"\nargs = [\"60\"]\ntimeout_secs = 2\n"
    );
    let g = Gateway::start(&config);
    let padding = "p".repeat(300_000);
    let long_init = INIT.replace(r#""name":"test""#, &format!(r#""name":"{padding}""#));
    let mut stuck = connect(g.addr);
    stuck
        .write_all(mcp_post_raw(&long_init, None, "").as_bytes())
        .unwrap();
    // Whatever the order the worker takes them in, the next connection is answered while the
    // long line still waits for the child (a blocked worker would answer nothing until the
    // child exits, a minute later).
    std::thread::sleep(Duration::from_millis(300));
    let other = request(g.addr, "GET /elsewhere HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(other.status, 404, "{}", other.text());
    let short = mcp_post(g.addr, INIT, None);
    assert_eq!(short.status, 504, "{}", short.text());
    let r = read_response(&mut stuck).expect("the stuck request is answered");
    assert_eq!(r.status, 504, "{}", r.text());
}

/// A stdio upstream running `script` (a shell script written to a temp dir, made executable).
fn scripted_stdio(
    script: &str,
    extra_server: &str,
    timeout_secs: u64,
) -> (Gateway, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("server.sh");
    write_executable(&path, script.as_bytes());
    let config = stdio_config("auto", extra_server, &[])
        .replace(
            &format!("command = {DEMO:?}"),
            &format!("command = {:?}", path.to_str().unwrap()),
        )
        .replace(
            "timeout_secs = 10",
            &format!("timeout_secs = {timeout_secs}"),
        );
    (Gateway::start(&config), dir)
}

#[test]
fn a_child_that_stops_reading_holds_a_bounded_queue_of_bytes() {
    // The child never reads. Requests of 2 MB each queue behind the first until the queue
    // holds 16 MiB; the next ones are refused at once (503), not queued without end.
    let (g, _dir) = scripted_stdio("#!/bin/sh\nexec sleep 60\n", "", 2);
    let padding = "p".repeat(2_000_000);
    let long_init = INIT.replace(r#""name":"test""#, &format!(r#""name":"{padding}""#));
    let mut sent = Vec::new();
    for _ in 0..14 {
        let mut s = connect(g.addr);
        s.write_all(mcp_post_raw(&long_init, None, "").as_bytes())
            .unwrap();
        sent.push(s);
    }
    let statuses: Vec<u16> = sent
        .iter_mut()
        .map(|s| read_response(s).expect("an answer").status)
        .collect();
    assert!(
        statuses.iter().all(|s| *s == 503 || *s == 504),
        "{statuses:?}"
    );
    assert!(statuses.contains(&503), "nothing refused: {statuses:?}");
    assert!(statuses.contains(&504), "nothing queued: {statuses:?}");
}

#[test]
fn a_child_that_closes_its_stdin_is_stopped_and_restarted() {
    // It stays alive with its stdout open: only its stdin says it is gone. It closes it either
    // before the request is written (the write breaks) or after, with the request unread in
    // the pipe (the hub finds the pipe without a reader); either way the request fails at once
    // rather than at its 10 s timeout, and the child is restarted.
    for script in [
        "#!/bin/sh\nexec <&-\nexec sleep 60\n",
        "#!/bin/sh\nsleep 1\nexec <&-\nexec sleep 60\n",
    ] {
        let (g, _dir) = scripted_stdio(script, "", 10);
        let r = mcp_post(g.addr, INIT, None);
        assert_eq!(r.status, 502, "{script}: {}", r.text());
        let deadline = Instant::now() + Duration::from_secs(10);
        while g.metric("mcp_guard_upstream_restarts_total", &[]) < 1.0 {
            assert!(Instant::now() < deadline, "{script}: never restarted");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Waits for `file` to hold a line, and returns it.
fn wait_for_line(file: &std::path::Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(text) = std::fs::read_to_string(file)
            && text.ends_with('\n')
        {
            return text.trim().to_string();
        }
        assert!(
            Instant::now() < deadline,
            "{} never written",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn stopping_a_child_at_shutdown_stops_what_it_started() {
    let notes = tempfile::tempdir().unwrap();
    let pid_file = notes.path().join("grandchild.pid");
    let (mut g, _dir) = scripted_stdio(
        &format!("#!/bin/sh\nsleep 300 &\necho $! > {pid_file:?}\nexec {DEMO:?}\n"),
        "",
        10,
    );
    initialize(g.addr);
    let grandchild = wait_for_line(&pid_file);
    assert!(!process_ended(&grandchild));
    g.signal(libc::SIGTERM);
    assert_eq!(g.wait_exit(Duration::from_secs(15)), Some(0));
    wait_until_ended(
        &grandchild,
        Duration::from_secs(5),
        "the child's own child outlived it",
    );
}

#[test]
fn a_child_that_dies_while_a_process_it_started_holds_its_output_is_restarted() {
    // A background process keeps the child's stdout open after the child exits: the exit is
    // noticed all the same, the call in flight fails at once, the background process is
    // stopped with it, and a new child serves.
    let notes = tempfile::tempdir().unwrap();
    let pid_file = notes.path().join("grandchild.pid");
    let (g, _dir) = scripted_stdio(
        &format!(
            "#!/bin/sh\nsleep 20 &\n[ -e {pid_file:?} ] || echo $! > {pid_file:?}\nexec {DEMO:?} --test-tools\n"
        ),
        "",
        10,
    );
    let sid = initialize(g.addr);
    let grandchild = wait_for_line(&pid_file);
    let r = mcp_post(g.addr, &call(7, "crash", "{}"), Some(&sid));
    assert_eq!(r.status, 502, "{}", r.text());
    echo_comes_back(&g, &sid);
    assert!(
        process_ended(&grandchild),
        "the crashed child's own child lives on"
    );
}

#[test]
fn a_call_in_flight_on_a_replaced_child_fails_when_the_child_is_stopped() {
    // A reload replaces the child; once the old one is stopped after the grace, a call still
    // waiting on it fails then, not at its 20 s timeout.
    let config = |name: &str| {
        stdio_config(
            "auto",
            "shutdown_grace_secs = 1",
            &["--test-tools", "--name", name],
        )
        .replace("timeout_secs = 10", "timeout_secs = 20")
    };
    let g = Gateway::start(&config("first"));
    let sid = initialize(g.addr);
    let addr = g.addr;
    let in_flight = std::thread::spawn(move || {
        let started = Instant::now();
        let r = mcp_post(addr, &call(11, "sleep", r#"{"ms":15000}"#), Some(&sid));
        (r.status, started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
    g.rewrite_config(&config("second"));
    g.signal(libc::SIGHUP);
    assert!(g.wait_log("upstream replaced", Duration::from_secs(5)));
    let (status, took) = in_flight.join().unwrap();
    assert_eq!(status, 502);
    assert!(took < Duration::from_secs(12), "waited {took:?}");
}

#[test]
fn a_child_writing_bytes_that_are_not_text_and_endless_lines_to_stderr_keeps_serving() {
    // Its stderr is read on whatever it holds: a byte that is not UTF-8, then a line of 300 KB
    // (more than the pipe holds) with no end yet. Were the reading to stop at the bad byte, the
    // child would block on its full stderr and never start answering.
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("server.sh");
    write_executable(&script, format!(
            "#!/bin/sh\nprintf 'AAAA\\rFAKE\\n' >&2\nprintf '\\377\\376 not text\\n' >&2\nhead -c 300000 /dev/zero | tr '\\0' x >&2\nexec {DEMO:?}\n"
        ).as_bytes());
    let config = stdio_config("auto", "", &[]).replace(
        &format!("command = {DEMO:?}"),
        &format!("command = {:?}", script.to_str().unwrap()),
    );
    let g = Gateway::start(&config);
    let sid = initialize(g.addr);
    let r = mcp_post(g.addr, &call(3, "echo", r#"{"text":"fine"}"#), Some(&sid));
    assert_eq!(r.status, 200, "{}", r.text());
    // The long line is logged cut short, with what was left out counted.
    assert!(g.wait_log("more bytes not logged", Duration::from_secs(5)));
    // A CR from the child is logged escaped: raw, it would rewrite the log line on a terminal.
    assert!(g.wait_log("AAAA\\rFAKE", Duration::from_secs(5)));
}

fn keep_alive_and_pipelining_serve_several_requests(io: &str) {
    let g = Gateway::start(&stdio_config(io, "", &[]));
    let sid = initialize(g.addr);
    let ping = |id: u32| ping_raw(id, &sid);
    let mut s = connect(g.addr);
    // Two requests in one write, then a third on the same connection.
    s.write_all(format!("{}{}", ping(1), ping(2)).as_bytes())
        .unwrap();
    assert_eq!(read_response(&mut s).unwrap().json()["id"], 1);
    assert_eq!(read_response(&mut s).unwrap().json()["id"], 2);
    s.write_all(ping(3).as_bytes()).unwrap();
    assert_eq!(read_response(&mut s).unwrap().json()["id"], 3);
    // Expect: 100-continue gets an interim response before the body is sent.
    let body = r#"{"jsonrpc":"2.0","id":4,"method":"ping"}"#;
    write!(
        s,
        "POST /mcp HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nAccept: {ACCEPT_BOTH}\r\nMcp-Session-Id: {sid}\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    let interim = read_until(&mut s, b"\r\n\r\n");
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
    s.write_all(body.as_bytes()).unwrap();
    assert_eq!(read_response(&mut s).unwrap().json()["id"], 4);
}

/// Opens the session's server-to-client SSE stream (GET), without reading the response.
fn open_get_stream(addr: std::net::SocketAddr, sid: &str) -> std::net::TcpStream {
    let mut stream = connect(addr);
    write!(
        stream,
        "GET /mcp HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\nMcp-Session-Id: {sid}\r\n\r\n"
    )
    .unwrap();
    stream
}

/// Reads until `needle` has been seen (or the read times out), returning what was read.
fn read_until(s: &mut std::net::TcpStream, needle: &[u8]) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 1];
    // One byte at a time, so the needle can only have just arrived at the end.
    while !got.ends_with(needle) {
        match s.read(&mut buf) {
            Ok(1) => got.push(buf[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

fn header_timeout_closes_slowloris_with_408(io: &str) {
    let g = Gateway::start(&stdio_config(io, "header_timeout_secs = 1", &[]));
    let mut s = connect(g.addr);
    s.write_all(b"POST /mcp HTTP/1.1\r\nHost: t\r\n").unwrap();
    let start = Instant::now();
    let r = read_response(&mut s).expect("a 408 response");
    assert_eq!(r.status, 408);
    assert!(start.elapsed() < Duration::from_secs(5));
}

fn a_head_trickled_byte_by_byte_is_cut_off_at_the_header_timeout(io: &str) {
    // Each byte wakes the connection's task again, and each wake reads the clock afresh
    // (`runtime::clock` keeps a reading only within one poll): a head that keeps arriving, a
    // byte every 150 ms, is still cut off at the header timeout from its first byte.
    let g = Gateway::start(&stdio_config(io, "header_timeout_secs = 1", &[]));
    let mut s = connect(g.addr);
    let head = b"POST /mcp HTTP/1.1\r\nHost: t\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let start = Instant::now();
    let mut refused = false;
    for b in head.iter() {
        if s.write_all(&[*b]).is_err() {
            refused = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(150));
        if start.elapsed() > Duration::from_secs(4) {
            break;
        }
    }
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    if !refused {
        let r = read_response(&mut s).expect("a 408 response");
        assert_eq!(r.status, 408);
    }
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "a trickled head held its connection for {:?}",
        start.elapsed()
    );
}

fn a_connection_that_never_sends_is_closed_after_the_header_timeout(io: &str) {
    // Not after the (much longer) keep-alive idle timeout: silent sockets must not hold
    // connection slots.
    let g = Gateway::start(&stdio_config(
        io,
        "header_timeout_secs = 1\nidle_timeout_secs = 60",
        &[],
    ));
    let mut s = connect(g.addr);
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let start = Instant::now();
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).unwrap(), 0);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn a_kept_alive_connection_waits_the_idle_timeout_not_the_header_timeout() {
    // After a request the connection is idle, not new: past the buffer hold and past the
    // header timeout it is still open, and serves its next request.
    let g = Gateway::start(&stdio_config(
        "auto",
        "header_timeout_secs = 1\nidle_timeout_secs = 60",
        &[],
    ));
    let mut s = connect(g.addr);
    s.write_all(b"GET /live HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut s).unwrap().status, 200);
    std::thread::sleep(Duration::from_millis(2500));
    s.write_all(b"GET /live HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut s).unwrap().status, 200);
}

/// The whole length of the response whose beginning is `got`, once its head is in (it must
/// carry a Content-Length).
fn response_length(got: &[u8]) -> Option<usize> {
    let end = got.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .expect("a content-length")
        .trim()
        .parse()
        .unwrap();
    Some(end + 4 + length)
}

/// `got` is a whole response whose answer's text is `want` characters long.
fn assert_answer_text_length(got: &[u8], want: usize) {
    let r = read_response(&mut &got[..]).expect("the whole response");
    assert_eq!(
        r.json()["result"]["content"][0]["text"]
            .as_str()
            .map(str::len),
        Some(want)
    );
}

/// A gateway with a one-second idle timeout, and a connection with a tiny receive buffer that
/// has asked the demo upstream for `bytes` characters (a reply the socket buffers cannot hold).
fn asked_for_a_large_reply(bytes: usize) -> (Gateway, std::net::TcpStream) {
    let g = Gateway::start(&stdio_config(
        "auto",
        "idle_timeout_secs = 1",
        &["--test-tools"],
    ));
    let sid = initialize(g.addr);
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&g.addr.into()).unwrap();
    let mut s: std::net::TcpStream = socket.into();
    let args = format!(r#"{{"bytes":{bytes}}}"#);
    let big = mcp_post_raw(&call(9, "big", &args), Some(&sid), "");
    s.write_all(big.as_bytes()).unwrap();
    (g, s)
}

#[test]
fn a_client_that_stops_reading_its_reply_is_cut_off_after_the_idle_timeout() {
    // A slow reader must not hold its connection (and the reply's memory) for ever: with the
    // client's receive buffer tiny and nothing read, the reply's write stalls and is given up.
    let (g, mut s) = asked_for_a_large_reply(8_000_000);
    // The reply has begun before the wait below starts (a peek consumes nothing): on a loaded
    // machine the gateway may not have accepted the connection yet, and a count of 0 from
    // before then would end the wait at once, the reply then read whole.
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.peek(&mut [0u8; 1]).expect("the reply begins");
    // Nothing is read: the gateway's write can make no progress once the buffers are full.
    let deadline = Instant::now() + Duration::from_secs(15);
    while g.metric("mcp_guard_active_connections", &[]) > 0.0 {
        assert!(
            Instant::now() < deadline,
            "a connection whose client reads nothing is still held"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut got = Vec::new();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.read_to_end(&mut got);
    assert!(
        got.len() < 8_000_000,
        "the reply was cut short: {} bytes",
        got.len()
    );
}

#[test]
fn a_client_that_reads_slowly_but_steadily_gets_its_whole_reply() {
    // The bound is on a stall, not on the whole reply: a reader that keeps taking bytes, for
    // longer in all than the idle timeout, is never cut off. The reply is larger than the
    // socket buffers can absorb (loopback send buffers grow to 4 MiB), so the gateway's write
    // really waits on the reader.
    let want = 6_000_000;
    let (_g, mut s) = asked_for_a_large_reply(want);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let start = Instant::now();
    let mut got = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    // The whole response's length, once its head is in.
    let mut total = None;
    while total.is_none_or(|t| got.len() < t) {
        let n = s.read(&mut chunk).unwrap();
        assert!(
            n > 0,
            "closed after {} bytes and {:?}",
            got.len(),
            start.elapsed()
        );
        got.extend_from_slice(&chunk[..n]);
        if total.is_none() {
            total = response_length(&got);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_answer_text_length(&got, want);
    assert!(
        start.elapsed() > Duration::from_secs(1),
        "the read took longer than the idle timeout: {:?}",
        start.elapsed()
    );
}

#[test]
fn a_client_reading_slower_than_the_kernel_wakes_a_full_socket_still_gets_its_whole_reply() {
    // A full socket's writer is woken only once about a third of its send buffer has drained
    // (over a MiB on loopback), so a reader taking less than that per idle timeout (1 s here)
    // never lets the gateway's write complete within it; it reads all the same, and must not
    // be taken for one that stopped. Found by the red team: such a reader was cut off after
    // about 3.6 MB of 6.
    let want = 6_000_000;
    let (_g, mut s) = asked_for_a_large_reply(want);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let mut read_some = |s: &mut std::net::TcpStream, got: &mut Vec<u8>| {
        let n = s.read(&mut chunk).unwrap();
        got.extend_from_slice(&chunk[..n]);
        n
    };
    // Three seconds at about 300 KiB/s: well under a MiB a second.
    let slow_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < slow_until {
        assert!(
            read_some(&mut s, &mut got) > 0,
            "closed after {} bytes",
            got.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let total = response_length(&got).expect("the head came first");
    while got.len() < total {
        assert!(
            read_some(&mut s, &mut got) > 0,
            "closed after {} bytes",
            got.len()
        );
    }
    assert_answer_text_length(&got, want);
}

#[test]
fn replies_around_the_write_thresholds_arrive_whole_and_in_order_on_one_connection() {
    // Bodies up to 64 KiB are copied behind the head, larger ones written after it from
    // their own buffer: replies of sizes around that threshold (and around 4 KiB, where a
    // vectored write was tried), one after another on one keep-alive connection whose client
    // reads through a tiny receive buffer (so the writes come up short), each arrive whole.
    let (g, mut s) = asked_for_a_large_reply(1_500_000);
    let sid = initialize(g.addr);
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let text_of = |r: &Response| {
        r.json()["result"]["content"][0]["text"]
            .as_str()
            .map(str::to_owned)
    };
    let first = read_response(&mut s).expect("the first reply");
    assert_eq!(text_of(&first), Some("x".repeat(1_500_000)));
    // The reply's total length sits near a threshold for a text of these lengths.
    for bytes in [
        0, 1, 3_900, 3_990, 4_000, 4_100, 20_000, 65_400, 65_536, 70_000, 300_000,
    ] {
        let args = format!(r#"{{"bytes":{bytes}}}"#);
        let req = mcp_post_raw(&call(10, "big", &args), Some(&sid), "");
        s.write_all(req.as_bytes()).unwrap();
        let r = read_response(&mut s).expect("a reply");
        assert_eq!(r.status, 200, "{bytes}");
        assert_eq!(text_of(&r), Some("x".repeat(bytes)), "{bytes}");
    }
}

#[test]
fn idle_keep_alive_connection_is_closed() {
    let g = Gateway::start(&stdio_config("auto", "idle_timeout_secs = 1", &[]));
    let mut s = connect(g.addr);
    s.write_all(b"GET /live HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut s).unwrap().status, 200);
    let mut rest = Vec::new();
    // The server closes the idle connection: read returns EOF well before our 15 s timeout.
    let start = Instant::now();
    let n = s.read_to_end(&mut rest).unwrap();
    assert_eq!(n, 0);
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn max_connections_refuses_the_excess() {
    let g = Gateway::start(&stdio_config("auto", "max_connections = 2", &[]));
    let a = connect(g.addr);
    let b = connect(g.addr);
    // Let both be accepted before the third arrives.
    let deadline = Instant::now() + Duration::from_secs(5);
    while g.metric("mcp_guard_active_connections", &[]) < 2.0 {
        assert!(Instant::now() < deadline, "connections not accepted");
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = request(g.addr, "GET /live HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 503);
    assert!(g.metric("mcp_guard_connections_refused_total", &[]) >= 1.0);
    // Once they close, their slots are free again.
    drop((a, b));
    let deadline = Instant::now() + Duration::from_secs(5);
    while g.metric("mcp_guard_active_connections", &[]) > 0.0 {
        assert!(
            Instant::now() < deadline,
            "closed connections still counted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        request(g.addr, "GET /live HTTP/1.1\r\nHost: t\r\n\r\n").status,
        200
    );
}

#[test]
fn config_reload_applies_valid_and_keeps_old_on_invalid() {
    let base = stdio_config("auto", "", &[]);
    let g = Gateway::start(&base);
    let probe = || {
        request(
            g.addr,
            &mcp_post_raw(INIT, None, "Origin: https://app.example.com\r\n"),
        )
        .status
    };
    assert_eq!(probe(), 403);
    // A valid change, signalled with SIGHUP: the next request sees it, no restart.
    g.rewrite_config(&stdio_config(
        "auto",
        "allowed_origins = [\"https://app.example.com\"]",
        &[],
    ));
    g.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    while probe() != 200 {
        assert!(Instant::now() < deadline, "reload not applied");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(g.metric("mcp_guard_config_reloads_total", &[]) >= 1.0);
    // An invalid file is refused; the running config keeps serving, and the failure counts.
    g.rewrite_config("[server]\nport = \"not a number\"\n");
    let deadline = Instant::now() + Duration::from_secs(5);
    while g.metric("mcp_guard_config_reload_failures_total", &[]) < 1.0 {
        assert!(Instant::now() < deadline, "invalid reload not noticed");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(probe(), 200, "old snapshot still serving");
    assert!(g.wait_log("reload refused", Duration::from_secs(1)));
    // A valid file that changes a key the reference marks `restart` is refused, naming it.
    g.rewrite_config(&format!(
        "{}\n[audit]\nqueue_capacity = 7\n",
        stdio_config(
            "auto",
            "allowed_origins = [\"https://app.example.com\"]",
            &[]
        )
    ));
    g.signal(libc::SIGHUP);
    assert!(g.wait_log(
        "audit.queue_capacity changed, which needs a restart",
        Duration::from_secs(5)
    ));
    assert_eq!(probe(), 200, "old snapshot still serving");
}

/// Waits until a call's connection is accepted, then long enough for the tool to be running.
fn wait_until_the_call_runs(g: &Gateway) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while g.metric("mcp_guard_active_connections", &[]) < 1.0 {
        assert!(Instant::now() < deadline, "request never arrived");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
}

/// Calls `sleep` for `ms` as request `id`, sends SIGTERM once the call is in flight (its
/// connection accepted, the tool sleeping), and returns the call's answer.
fn sleeping_call_cut_by_sigterm(g: &Gateway, id: u64, ms: u64) -> Response {
    let sid = initialize(g.addr);
    let addr = g.addr;
    let in_flight = std::thread::spawn(move || {
        mcp_post(
            addr,
            &call(id, "sleep", &format!(r#"{{"ms":{ms}}}"#)),
            Some(&sid),
        )
    });
    wait_until_the_call_runs(g);
    g.signal(libc::SIGTERM);
    in_flight.join().unwrap()
}

#[test]
fn graceful_shutdown_finishes_in_flight_request() {
    let mut g = Gateway::start(&stdio_config("auto", "shutdown_grace_secs = 10", &[]));
    let addr = g.addr;
    let sid = initialize(addr);
    let in_flight = std::thread::spawn(move || {
        mcp_post(addr, &call(11, "sleep", r#"{"ms":4000}"#), Some(&sid))
    });
    wait_until_the_call_runs(&g);
    g.signal(libc::SIGTERM);
    // New connections are refused once draining started. Checked while the call still runs,
    // not after the exit, when the port is free for any other test's listener to take.
    assert!(g.wait_log(
        "shutting down: no longer accepting connections",
        Duration::from_secs(5)
    ));
    let refused_by = Instant::now() + Duration::from_secs(2);
    loop {
        match std::net::TcpStream::connect(addr) {
            Err(_) => break,
            // A connect to a port nobody listens on can pick that very port as its source and
            // connect to itself: no listener either.
            Ok(s) if s.local_addr().ok() == s.peer_addr().ok() => break,
            // The workers close their listeners as they take the signal; dropped at once, so
            // the drain does not wait for it.
            Ok(s) => drop(s),
        }
        assert!(
            Instant::now() < refused_by,
            "new connections to {addr} still accepted 2 s into the drain"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!in_flight.is_finished(), "the drain ended before the check");
    let r = in_flight.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["result"]["content"][0]["text"], "slept 4000ms");
    assert_eq!(g.wait_exit(Duration::from_secs(15)), Some(0));
}

#[test]
fn a_call_still_running_when_the_shutdown_grace_ends_is_answered_503() {
    let mut g = Gateway::start(&stdio_config("auto", "shutdown_grace_secs = 1", &[]));
    let started = Instant::now();
    let r = sleeping_call_cut_by_sigterm(&g, 12, 8000);
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["id"], 12);
    assert!(
        started.elapsed() < Duration::from_secs(7),
        "answered at the sleep's end"
    );
    assert_eq!(g.wait_exit(Duration::from_secs(15)), Some(0));
}

/// Calls `slow_progress` for `steps` of `ms` as request `id`, asking for progress, sends
/// SIGTERM once the first progress event is through, and returns the stream's messages.
fn progress_call_cut_by_sigterm(
    g: &Gateway,
    id: u64,
    steps: u32,
    ms: u32,
) -> Vec<serde_json::Value> {
    let sid = initialize(g.addr);
    let body = format!(
        r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"slow_progress","arguments":{{"steps":{steps},"ms":{ms},"label":"busy"}},"_meta":{{"progressToken":"p"}}}}}}"#
    );
    let mut s = connect(g.addr);
    s.write_all(mcp_post_raw(&body, Some(&sid), "").as_bytes())
        .unwrap();
    let mut seen = read_until_seen(&mut s, "notifications/progress");
    g.signal(libc::SIGTERM);
    s.read_to_end(&mut seen).unwrap();
    let text = String::from_utf8_lossy(&seen).to_string();
    assert!(text.ends_with("0\r\n\r\n"), "ended, not cut: {text}");
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

#[test]
fn a_stdio_call_streaming_progress_at_shutdown_brings_its_answer_within_the_grace() {
    // Before, a call's progress stream ended as soon as shutdown began, its answer lost
    // though the grace had 10 s left.
    let mut g = Gateway::start(&stdio_config(
        "auto",
        "shutdown_grace_secs = 10",
        &["--test-tools"],
    ));
    let messages = progress_call_cut_by_sigterm(&g, 21, 5, 200);
    let last = messages.last().expect("events");
    assert_eq!(last["id"], 21, "{messages:?}");
    assert!(last.get("result").is_some(), "{messages:?}");
    assert_eq!(g.wait_exit(Duration::from_secs(15)), Some(0));
}

#[test]
fn a_stdio_call_streaming_past_the_shutdown_grace_ends_with_its_error_as_the_last_event() {
    let mut g = Gateway::start(&stdio_config(
        "auto",
        "shutdown_grace_secs = 1",
        &["--test-tools"],
    ));
    let started = Instant::now();
    let messages = progress_call_cut_by_sigterm(&g, 22, 20, 500);
    let last = messages.last().expect("events");
    assert_eq!(last["id"], 22, "{messages:?}");
    assert!(last["error"]["code"].is_i64(), "{messages:?}");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "ran to the tool's end"
    );
    assert_eq!(g.wait_exit(Duration::from_secs(15)), Some(0));
}

#[test]
fn a_stdio_call_whose_client_left_mid_stream_does_not_keep_the_gateway_from_exiting() {
    // The call's task still waits for the child's answer when the drain finds no connection
    // open. Left waiting as the worker ended, it was later dropped by the stdio hub's thread
    // inside the channel's lock, which the drop took again: the gateway never exited.
    let mut g = Gateway::start(&stdio_config(
        "auto",
        "shutdown_grace_secs = 10",
        &["--test-tools"],
    ));
    let sid = initialize(g.addr);
    let body = r#"{"jsonrpc":"2.0","id":23,"method":"tools/call","params":{"name":"slow_progress","arguments":{"steps":20,"ms":500,"label":"busy"},"_meta":{"progressToken":"p"}}}"#;
    let mut s = connect(g.addr);
    s.write_all(mcp_post_raw(body, Some(&sid), "").as_bytes())
        .unwrap();
    read_until_seen(&mut s, "notifications/progress");
    drop(s);
    assert_eq!(
        g.metric_settles("mcp_guard_active_connections", &[], 0.0),
        0.0
    );
    g.signal(libc::SIGTERM);
    assert_eq!(
        g.wait_exit(Duration::from_secs(15)),
        Some(0),
        "the gateway did not exit"
    );
}

#[test]
fn a_batch_still_waiting_when_the_shutdown_grace_ends_keeps_the_answers_it_has() {
    let mut g = Gateway::start(&stdio_config("auto", "shutdown_grace_secs = 1", &[]));
    let init = INIT.replace("2025-11-25", "2025-03-26");
    let r = mcp_post(g.addr, &init, None);
    let sid = r.header("mcp-session-id").unwrap().to_string();
    let batch = format!(
        "[{},{}]",
        call(3, "echo", r#"{"text":"done"}"#),
        call(4, "sleep", r#"{"ms":8000}"#)
    );
    let raw = mcp_post_raw(&batch, Some(&sid), "MCP-Protocol-Version: 2025-03-26\r\n");
    let addr = g.addr;
    let in_flight = std::thread::spawn(move || request(addr, &raw));
    std::thread::sleep(Duration::from_millis(700));
    g.signal(libc::SIGTERM);
    let r = in_flight.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let answers = r.json();
    let answers = answers.as_array().expect("a batch answer is an array");
    assert_eq!(answers[0]["id"], 3);
    assert_eq!(answers[0]["result"]["content"][0]["text"], "done");
    assert_eq!(answers[1]["id"], 4);
    assert!(answers[1]["error"]["code"].is_i64(), "{answers:?}");
    assert_eq!(g.wait_exit(Duration::from_secs(15)), Some(0));
}

#[test]
fn metrics_parse_and_count_requests_and_latency() {
    let g = Gateway::start(&stdio_config("auto", "", &[]));
    let sid = initialize(g.addr);
    for i in 0..5 {
        let r = mcp_post(
            g.addr,
            &call(100 + i, "echo", r#"{"text":"m"}"#),
            Some(&sid),
        );
        assert_eq!(r.status, 200);
    }
    assert_eq!(
        g.metric_settles(
            "mcp_guard_requests_total",
            &[("method", "tools/call"), ("status", "200")],
            5.0
        ),
        5.0
    );
    // Latency histograms are published by each worker within half a second.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let text = g.admin_get("/metrics").text();
        let scrape =
            prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
        let count = scrape
            .samples
            .iter()
            .find(|s| s.metric == "mcp_guard_request_duration_seconds")
            .map(|s| match &s.value {
                prometheus_parse::Value::Histogram(h) => {
                    h.iter().map(|b| b.count).fold(0.0, f64::max)
                }
                _ => 0.0,
            })
            .unwrap_or(0.0);
        if count >= 7.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "latency histogram never reached 7 samples: {count}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let health = g.admin_get("/health").json();
    assert_eq!(health["workers"], 2);
    assert!(health["io_driver"] == "io_uring" || health["io_driver"] == "epoll");
    assert_eq!(g.admin_get("/ready").status, 200);
    assert_eq!(
        request(g.addr, "GET /ready HTTP/1.1\r\nHost: t\r\n\r\n").status,
        200
    );
}

#[test]
fn ready_reports_unreachable_http_upstream() {
    // Nothing listens on this port (bound then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let g = Gateway::start(&http_config(
        "auto",
        &format!("http://127.0.0.1:{port}/mcp"),
        "",
        "",
    ));
    assert_eq!(g.admin_get("/ready").status, 503);
    let r = mcp_post(g.addr, INIT, None);
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"]["code"], -32603);
    // /health never says ok while no upstream has ever answered; /live still does.
    let health = g.admin_get("/health");
    assert_eq!(health.status, 503);
    assert_eq!(health.json()["status"], "starting");
    assert_eq!(health.json()["upstream_answered"], false);
    assert_eq!(g.admin_get("/live").status, 200);
}

#[test]
fn health_says_ok_once_the_upstream_has_answered_without_any_client() {
    // The stdio hub pings the child it starts; an HTTP upstream is probed over HTTP. No client
    // has sent anything when /health turns ok.
    let up = DemoHttp::start(&[]);
    for config in [
        stdio_config("auto", "", &[]),
        http_config("auto", &up.url(), "", ""),
    ] {
        let g = Gateway::start(&config);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = g.admin_get("/health");
            if r.status == 200 {
                assert_eq!(r.json()["status"], "ok");
                assert_eq!(r.json()["upstream_answered"], true);
                break;
            }
            assert_eq!(r.json()["status"], "starting");
            assert!(Instant::now() < deadline, "never healthy: {}", r.text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn a_port_that_accepts_but_never_answers_http_is_not_ready() {
    // A listener that accepts connections and says nothing: reachable, but not an upstream.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let g = Gateway::start(&http_config(
        "auto",
        &format!("http://127.0.0.1:{port}/mcp"),
        "",
        "",
    ));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(g.admin_get("/ready").status, 503);
    assert_eq!(g.admin_get("/health").status, 503);
    drop(silent);
}

/// The `serverInfo.name` an initialize through the gateway reports.
fn server_name(addr: std::net::SocketAddr) -> String {
    let r = mcp_post(addr, INIT, None);
    assert_eq!(r.status, 200, "{}", r.text());
    rpc_result(&r)["result"]["serverInfo"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn reload_replaces_a_changed_stdio_upstream_without_a_restart() {
    let g = Gateway::start(&stdio_config("auto", "", &["--name", "first"]));
    assert_eq!(server_name(g.addr), "first");
    let old_sid = initialize(g.addr);
    // Unchanged upstream settings: the child and its sessions carry on.
    g.rewrite_config(&stdio_config(
        "auto",
        "max_body_bytes = 1000000",
        &["--name", "first"],
    ));
    g.signal(libc::SIGHUP);
    assert!(g.wait_log("configuration reloaded", Duration::from_secs(5)));
    let r = mcp_post(
        g.addr,
        &call(7, "echo", r#"{"text":"still"}"#),
        Some(&old_sid),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // A changed command line: a new child serves new sessions; the old sessions are gone.
    g.rewrite_config(&stdio_config("auto", "", &["--name", "second"]));
    g.signal(libc::SIGHUP);
    assert!(g.wait_log("upstream replaced", Duration::from_secs(5)));
    assert_eq!(server_name(g.addr), "second");
    let r = mcp_post(
        g.addr,
        &call(8, "echo", r#"{"text":"old"}"#),
        Some(&old_sid),
    );
    assert_eq!(
        r.status,
        404,
        "an old session is unknown to the new child: {}",
        r.text()
    );
    // A command that cannot start refuses the reload; the running upstream keeps serving.
    let broken = stdio_config("auto", "", &[]).replace(DEMO, "/nonexistent/mcp-server");
    g.rewrite_config(&broken);
    g.signal(libc::SIGHUP);
    assert!(g.wait_log("the new upstream cannot start", Duration::from_secs(5)));
    assert_eq!(server_name(g.addr), "second");
    assert_eq!(g.admin_get("/ready").status, 200);
}

/// Sends `calls` calls of the slow `sleep` tool, each carrying about `pad` bytes, each on its
/// own connection, and returns the connections (their answers still to come).
fn slow_calls_with_large_bodies(
    g: &Gateway,
    sid: &str,
    calls: usize,
    pad: usize,
) -> Vec<std::net::TcpStream> {
    let padding = "p".repeat(pad);
    (0..calls)
        .map(|i| {
            let body = call(
                100 + i as u64,
                "sleep",
                &format!(r#"{{"ms":6000,"pad":"{padding}"}}"#),
            );
            let mut s = connect(g.addr);
            s.write_all(mcp_post_raw(&body, Some(sid), "").as_bytes())
                .unwrap();
            s
        })
        .collect()
}

/// Calls waiting on a slow tool hold none of the worker's 64 MiB body allowance once their
/// bodies are with the upstream: 72 MiB of them leave room for everyone else's bodies, and
/// every one of them is answered.
fn calls_waiting_on_a_slow_tool_leave_the_body_allowance_to_others(g: &Gateway) {
    let sid = initialize(g.addr);
    let mut waiting = slow_calls_with_large_bodies(g, &sid, 36, 2 << 20);
    // Each body is counted while it is read: wait until the last one is surely with the tool.
    std::thread::sleep(Duration::from_millis(1500));
    let padding = "v".repeat(1 << 20);
    let r = mcp_post(
        g.addr,
        &call(7, "echo", &format!(r#"{{"text":"{padding}"}}"#)),
        Some(&sid),
    );
    assert_eq!(
        r.status,
        200,
        "{}",
        String::from_utf8_lossy(&r.body[..r.body.len().min(300)])
    );
    assert_eq!(g.metric("mcp_guard_bodies_refused_total", &[]), 0.0);
    for s in &mut waiting {
        let r = read_response(s).expect("an answer");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            rpc_result(&r)["result"]["content"][0]["text"],
            "slept 6000ms"
        );
    }
}

/// The gateway's resident memory, in MiB.
fn rss_mib(g: &Gateway) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", g.child.id())).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib / 1024.0
}

#[test]
fn calls_waiting_on_a_slow_tool_do_not_keep_their_bodies_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input");
    let input_arg = input.to_str().unwrap();
    let config = stdio_config("io_uring", "", &["--log-input", input_arg])
        .replace("workers = 2", "workers = 1");
    let g = Gateway::start(&config);
    let sid = initialize(g.addr);
    // Until the child has read `calls` calls of `sleep`, every one of them whole.
    let child_has_read = |calls: usize| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = std::fs::read_to_string(&input).unwrap_or_default();
            if log.matches(r#""name":"sleep""#).count() >= calls {
                return;
            }
            assert!(Instant::now() < deadline, "the child never read them all");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // One call first, so what the allocator keeps after a large body is in the baseline.
    let mut first = slow_calls_with_large_bodies(&g, &sid, 1, 2_000_000);
    child_has_read(1);
    let before = rss_mib(&g);
    let mut waiting = slow_calls_with_large_bodies(&g, &sid, 60, 2_000_000);
    child_has_read(61);
    let during = rss_mib(&g);
    // 60 bodies of 2 MB kept until their answers would be about 115 MiB; what is left is what
    // the allocator keeps of the bodies it has freed.
    assert!(
        during - before < 50.0,
        "{before:.0} MiB before, {during:.0} MiB with 60 calls waiting"
    );
    for s in first.iter_mut().chain(&mut waiting) {
        assert_eq!(read_response(s).expect("an answer").status, 200);
    }
}

#[test]
fn a_batch_element_that_times_out_is_answered_with_its_error_beside_the_others_answers() {
    let config = stdio_config("auto", "", &[]).replace("timeout_secs = 10", "timeout_secs = 2");
    let g = Gateway::start(&config);
    let init = INIT.replace("2025-11-25", "2025-03-26");
    let r = mcp_post(g.addr, &init, None);
    let sid = r.header("mcp-session-id").unwrap().to_string();
    let batch = format!(
        "[{},{}]",
        call(1, "sleep", r#"{"ms":5000}"#),
        call(2, "echo", r#"{"text":"still here"}"#)
    );
    let version = "MCP-Protocol-Version: 2025-03-26\r\n";
    let r = request(g.addr, &mcp_post_raw(&batch, Some(&sid), version));
    assert_eq!(r.status, 200, "{}", r.text());
    let answers = r.json();
    let answers = answers.as_array().expect("a batch answer is an array");
    assert_eq!(answers.len(), 2, "{answers:?}");
    assert_eq!(answers[0]["id"], 1);
    assert!(answers[0]["error"]["code"].is_i64(), "{answers:?}");
    assert_eq!(answers[1]["id"], 2);
    assert_eq!(answers[1]["result"]["content"][0]["text"], "still here");
}

#[test]
fn initialize_inside_a_batch_is_refused() {
    let g = Gateway::start(&stdio_config("auto", "", &[]));
    let init = INIT.replace("2025-11-25", "2025-03-26");
    let r = mcp_post(g.addr, &init, None);
    let sid = r.header("mcp-session-id").unwrap().to_string();
    let batch = format!(r#"[{init},{{"jsonrpc":"2.0","id":2,"method":"ping"}}]"#);
    let version = "MCP-Protocol-Version: 2025-03-26\r\n";
    let r = request(g.addr, &mcp_post_raw(&batch, Some(&sid), version));
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], -32600);
}

#[test]
fn stdio_calls_waiting_on_a_slow_tool_leave_the_body_allowance_to_others() {
    let config = stdio_config("io_uring", "", &[]).replace("workers = 2", "workers = 1");
    calls_waiting_on_a_slow_tool_leave_the_body_allowance_to_others(&Gateway::start(&config));
}

#[test]
fn http_calls_waiting_on_a_slow_tool_leave_the_body_allowance_to_others() {
    let demo = DemoHttp::start(&[]);
    let config = http_config("io_uring", &demo.url(), "", "").replace("workers = 2", "workers = 1");
    calls_waiting_on_a_slow_tool_leave_the_body_allowance_to_others(&Gateway::start(&config));
}

#[test]
fn a_batch_the_childs_queue_cannot_take_whole_is_refused_without_any_of_it_delivered() {
    // The child answers the hub's ping and the initialize, then reads nothing for three
    // seconds (its stdin queue fills) and afterwards logs every line it gets (its stdout stays
    // open: the shell keeps it).
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("seen");
    let script = format!(
        "#!/bin/sh\nfor request in ping initialize; do\nread line\nid=$(printf '%s' \"$line\" | sed -n 's/.*\"id\":\\([0-9]*\\).*/\\1/p')\nprintf '{{\"jsonrpc\":\"2.0\",\"id\":%s,\"result\":{{\"protocolVersion\":\"2025-03-26\",\"capabilities\":{{}},\"serverInfo\":{{\"name\":\"slow\",\"version\":\"1\"}}}}}}\\n' \"$id\"\ndone\nread line\nsleep 3\ncat > {:?}\n",
        seen.to_str().unwrap()
    );
    let (g, _script_dir) = scripted_stdio(&script, "max_body_bytes = 33554432", 10);
    let init = INIT.replace("2025-11-25", "2025-03-26");
    let r = mcp_post(g.addr, &init, None);
    assert_eq!(r.status, 200, "{}", r.text());
    let sid = r.header("mcp-session-id").unwrap().to_string();
    let version = "MCP-Protocol-Version: 2025-03-26\r\n";
    let post = |body: &str| request(g.addr, &mcp_post_raw(body, Some(&sid), version));
    assert_eq!(
        post(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#).status,
        202
    );
    // 20 notifications of 1 MiB: more than the 16 MiB the queue holds for a child not reading.
    let padding = "b".repeat(1 << 20);
    let element = format!(
        r#"{{"jsonrpc":"2.0","method":"notifications/batched","params":{{"pad":"{padding}"}}}}"#
    );
    let batch = format!("[{}]", vec![element; 20].join(","));
    assert_eq!(post(&batch).status, 503);
    // The queue is still empty: a single message is taken, and once the child reads again it
    // is the only one it sees.
    assert_eq!(
        post(r#"{"jsonrpc":"2.0","method":"notifications/single"}"#).status,
        202
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(&seen).unwrap_or_default();
        if log.contains("notifications/single") {
            assert!(
                !log.contains("notifications/batched"),
                "part of a refused batch was delivered"
            );
            assert_eq!(log.lines().count(), 1, "{}", &log[..log.len().min(300)]);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the child never saw the single message"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_notification_for_no_request_goes_only_to_sessions_with_a_stream_open() {
    let g = Gateway::start(&stdio_config("auto", "", &[]));
    let quiet: Vec<String> = (0..3).map(|_| initialize(g.addr)).collect();
    let listening = initialize(g.addr);
    let mut stream = open_get_stream(g.addr, &listening);
    let head = read_until(&mut stream, b"\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // `notify` makes the child send tools/list_changed, tied to no request.
    let r = mcp_post(g.addr, &call(2, "notify", "{}"), Some(&quiet[0]));
    assert_eq!(r.status, 200);
    let events = read_until(&mut stream, b"list_changed");
    assert!(
        events.contains("notifications/tools/list_changed"),
        "{events}"
    );
    // Sessions without a stream were never offered a copy: nothing was dropped for them.
    assert_eq!(
        g.metric("mcp_guard_stream_messages_dropped_total", &[]),
        0.0
    );
}

#[test]
fn a_stream_nobody_reads_holds_a_bounded_number_of_bytes_for_it() {
    // A child that, when a tool is called, sends 100 notifications of 256 KiB tied to no
    // request (25 MiB, far under the 256-message bound), then answers.
    let script = "#!/bin/sh\npad=$(head -c 262144 /dev/zero | tr '\\0' a)\nwhile read line; do\ncase \"$line\" in *tools/call*) i=0; while [ $i -lt 100 ]; do printf '{\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\"params\":{\"level\":\"info\",\"data\":\"%s\"}}\\n' \"$pad\"; i=$((i+1)); done;; esac\nid=$(printf '%s' \"$line\" | sed -n 's/.*\"id\":\\([0-9]*\\).*/\\1/p')\n[ -n \"$id\" ] && printf '{\"jsonrpc\":\"2.0\",\"id\":%s,\"result\":{\"protocolVersion\":\"2025-11-25\",\"capabilities\":{},\"serverInfo\":{\"name\":\"loud\",\"version\":\"1\"},\"content\":[]}}\\n' \"$id\"\ndone\n";
    let (g, _dir) = scripted_stdio(script, "", 10);
    let sid = initialize(g.addr);
    let mut stream = open_get_stream(g.addr, &sid);
    let head = read_until(&mut stream, b"\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // The stream's client reads nothing while the child floods it.
    let r = mcp_post(g.addr, &call(2, "flood", "{}"), Some(&sid));
    assert_eq!(r.status, 200, "{}", r.text());
    let deadline = Instant::now() + Duration::from_secs(10);
    while g.metric("mcp_guard_stream_messages_dropped_total", &[]) == 0.0 {
        assert!(
            Instant::now() < deadline,
            "25 MiB queued for a client that reads nothing"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // What was kept is still delivered, whole, once the client reads.
    let events = read_until(&mut stream, b"\"}}\n\n");
    assert!(
        events.contains("notifications/message"),
        "{}",
        &events[..events.len().min(200)]
    );
}
