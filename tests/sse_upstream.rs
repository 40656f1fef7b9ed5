//! A legacy HTTP+SSE server as the upstream (`transport = "sse"`), through the real binary:
//! what a hostile server's `endpoint` event may not do (send the gateway's messages, and the
//! upstream credentials in `headers`, to another origin or into a forged request line).

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A listener that only counts the connections it gets (and what they send first).
struct Counter {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Counter {
    fn start() -> Counter {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (h, s) = (hits.clone(), seen.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                h.fetch_add(1, Ordering::SeqCst);
                conn.set_read_timeout(Some(Duration::from_millis(500))).ok();
                let mut buf = [0u8; 4096];
                let n = conn.read(&mut buf).unwrap_or(0);
                s.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).to_string());
            }
        });
        Counter { addr, hits, seen }
    }
}

/// A legacy SSE server that answers `GET /sse` with an `endpoint` event carrying `endpoint`
/// verbatim and keeps the stream open; any other request is counted and refused.
fn hostile_server(endpoint: String) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let streams = Arc::new(AtomicUsize::new(0));
    let posts = Arc::new(AtomicUsize::new(0));
    let (st, po) = (streams.clone(), posts.clone());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let (st, po, endpoint) = (st.clone(), po.clone(), endpoint.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let n = conn.read(&mut buf).unwrap_or(0);
                if buf[..n].starts_with(b"GET ") {
                    st.fetch_add(1, Ordering::SeqCst);
                    let _ = write!(
                        conn,
                        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\nevent: endpoint\ndata: {endpoint}\n\n"
                    );
                    std::thread::sleep(Duration::from_secs(30));
                } else {
                    po.fetch_add(1, Ordering::SeqCst);
                    let _ =
                        conn.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n");
                }
            });
        }
    });
    (addr, streams, posts)
}

fn sse_config(url: &str) -> String {
    format!(
        "[server]\nport = 0\nworkers = 2\n[admin]\nport = 0\n[upstream]\ntransport = \"sse\"\nurl = \"{url}\"\ntimeout_secs = 3\nheaders = {{ \"X-Upstream-Key\" = \"upstream-secret-123\" }}\n"
    )
}

#[test]
fn an_endpoint_on_another_origin_or_smuggling_a_request_line_is_never_posted_to() {
    let foreign = Counter::start();
    for endpoint in [
        format!("http://{}/messages?s=1", foreign.addr),
        format!("//{}/messages?s=1", foreign.addr),
        format!("http://127.0.0.1:1@{}/m", foreign.addr),
        "https://127.0.0.1/m".to_string(),
        "/m HTTP/1.1\\r\\nX: y".to_string(),
    ] {
        let (addr, streams, posts) = hostile_server(endpoint.clone());
        let g = Gateway::start(&sse_config(&format!("http://{addr}/sse")));
        // The initialize cannot be delivered: it fails (never hangs past the timeout).
        let started = Instant::now();
        let r = mcp_post(g.addr, INIT, None);
        assert!(r.status >= 500, "{endpoint}: {} {}", r.status, r.text());
        assert!(started.elapsed() < Duration::from_secs(8), "{endpoint}");
        assert!(
            g.wait_log("another origin", Duration::from_secs(5))
                || g.wait_log("not a URL", Duration::from_secs(1)),
            "{endpoint}: refusal not logged"
        );
        assert!(streams.load(Ordering::SeqCst) >= 1, "{endpoint}");
        assert_eq!(posts.load(Ordering::SeqCst), 0, "{endpoint}");
    }
    assert_eq!(
        foreign.hits.load(Ordering::SeqCst),
        0,
        "the foreign origin was contacted: {:?}",
        foreign.seen.lock().unwrap()
    );
}

#[test]
fn an_unreachable_sse_server_fails_requests_fast_and_check_upstream_says_why() {
    // A port nothing listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/sse");
    let g = Gateway::start(&sse_config(&url));
    let r = mcp_post(g.addr, INIT, None);
    assert!(r.status >= 500, "{} {}", r.status, r.text());
    let out = std::process::Command::new(GUARD)
        .args(["check-upstream", "--config"])
        .arg(&g.config_path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("FAIL") && text.contains(&url), "{text}");
    let _ = TcpStream::connect(g.addr);
}

/// The demo server speaking legacy HTTP+SSE, with its test tools.
fn demo_sse() -> DemoHttp {
    DemoHttp::start(&["--legacy-sse", "--test-tools"])
}

fn sse_url(d: &DemoHttp) -> String {
    format!("http://{}/sse", d.addr)
}

fn call_with_progress(addr: SocketAddr, sid: &str, id: u64, token: &str) -> Vec<serde_json::Value> {
    let body = format!(
        r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"slow_progress","arguments":{{"steps":3,"ms":100}},"_meta":{{"progressToken":"{token}"}}}}}}"#
    );
    let r = mcp_post(addr, &body, Some(sid));
    assert_eq!(r.status, 200, "{}", r.text());
    r.sse_messages()
}

#[test]
fn streamable_clients_reach_a_legacy_sse_server_shared_or_per_session() {
    for mode in ["", "session_mode = \"per_session\"\n"] {
        let demo = demo_sse();
        let g = Gateway::start(&format!("{}{mode}", sse_config(&sse_url(&demo))));
        let (a, b) = (initialize(g.addr), initialize(g.addr));
        for (i, sid) in [&a, &b].into_iter().enumerate() {
            let text = format!("via sse {i}");
            let r = mcp_post(
                g.addr,
                &call(7, "echo", &format!(r#"{{"text":"{text}"}}"#)),
                Some(sid),
            );
            assert_eq!(r.status, 200, "{mode}: {}", r.text());
            assert_eq!(
                rpc_result(&r)["result"]["content"][0]["text"],
                text.as_str()
            );
        }
        let r = mcp_post(
            g.addr,
            r#"{"jsonrpc":"2.0","id":8,"method":"tools/list"}"#,
            Some(&a),
        );
        let tools = rpc_result(&r)["result"]["tools"].clone();
        assert!(
            tools
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["name"] == "echo"),
            "{tools}"
        );
        // Two clients, one progress token, at once: each gets its own progress and answer.
        let addr = g.addr;
        let runs: Vec<_> = [a.clone(), b.clone()]
            .into_iter()
            .enumerate()
            .map(|(i, sid)| {
                std::thread::spawn(move || {
                    (i, call_with_progress(addr, &sid, 20 + i as u64, "same"))
                })
            })
            .collect();
        for run in runs {
            let (i, messages) = run.join().unwrap();
            let progress: Vec<_> = messages
                .iter()
                .filter(|m| m["method"] == "notifications/progress")
                .collect();
            assert_eq!(progress.len(), 3, "{mode} client {i}: {messages:?}");
            assert!(
                progress
                    .iter()
                    .all(|p| p["params"]["progressToken"] == "same")
            );
            let last = messages.last().unwrap();
            assert_eq!(last["id"], 20 + i as u64, "{mode}: {messages:?}");
            assert!(last["result"].is_object(), "{mode}: {last}");
        }
    }
}

#[test]
fn a_dropped_sse_connection_is_reopened_and_sessions_carry_on() {
    let demo = demo_sse();
    let g = Gateway::start(&sse_config(&sse_url(&demo)));
    let sid = initialize(g.addr);
    // The server drops the stream (as a crashing server would).
    let r = mcp_post(g.addr, &call(2, "crash", "{}"), Some(&sid));
    assert!(
        r.status >= 500 || rpc_result(&r).get("error").is_some(),
        "{}",
        r.text()
    );
    assert!(
        g.wait_log("ended", Duration::from_secs(5)),
        "link end not logged"
    );
    // The hub reconnects (with backoff), replays its initialize, and the session goes on.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = mcp_post(g.addr, &call(3, "echo", r#"{"text":"again"}"#), Some(&sid));
        if r.status == 200 && rpc_result(&r)["result"]["content"][0]["text"] == "again" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never recovered: {} {}",
            r.status,
            r.text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_upstream_headers_go_with_every_sse_request_and_the_clients_credentials_never_do() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("input.log");
    let demo = DemoHttp::start(&[
        "--legacy-sse",
        "--test-tools",
        "--log-input",
        log.to_str().unwrap(),
    ]);
    let cfg = format!(
        "{}[[auth.api_keys]]\nid = \"c\"\nkey_hash = \"{}\"\n",
        sse_config(&sse_url(&demo)),
        mcp_guard::cli::hash_key("client-key-0123456789")
    );
    let g = Gateway::start(&cfg);
    let auth = bearer("client-key-0123456789");
    let r = request(g.addr, &mcp_post_raw(INIT, None, &auth));
    assert_eq!(r.status, 200, "{}", r.text());
    let sid = r.header("mcp-session-id").unwrap().to_string();
    let r = request(
        g.addr,
        &mcp_post_raw(&call(2, "last_request_headers", "{}"), Some(&sid), &auth),
    );
    let headers = rpc_result(&r)["result"]["content"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(headers.contains("upstream-secret-123"), "{headers}");
    assert!(!headers.contains("client-key-0123456789"), "{headers}");
    assert!(
        !std::fs::read_to_string(&log)
            .unwrap()
            .contains("client-key")
    );
}

/// A minimal legacy SSE server that sends `preamble` before its `endpoint` event, then answers
/// every request POSTed to `/m` on the stream with an empty result (initialize: a server
/// identity).
fn padded_server(preamble: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let stream: Arc<Mutex<Option<TcpStream>>> = Arc::default();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let stream = stream.clone();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match conn.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    if head.starts_with("get ") {
                        // Kept before the endpoint goes out: a gateway quick to POST its
                        // initialize would otherwise find no stream to be answered on (its
                        // answer dropped, the call a 504).
                        *stream.lock().unwrap() = conn.try_clone().ok();
                        let _ = write!(
                            conn,
                            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n{preamble}event: endpoint\ndata: /m\n\n"
                        );
                        std::thread::sleep(Duration::from_secs(30));
                        return;
                    }
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .and_then(|n| n.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < end + 4 + len {
                        match conn.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let msg: serde_json::Value =
                        serde_json::from_slice(&buf[end + 4..end + 4 + len]).unwrap_or_default();
                    buf.drain(..end + 4 + len);
                    let _ = conn.write_all(b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n");
                    if let (Some(id), Some(method)) = (msg.get("id"), msg["method"].as_str()) {
                        let result = if method == "initialize" {
                            serde_json::json!({"protocolVersion":"2025-06-18","capabilities":{},"serverInfo":{"name":"padded","version":"1"}})
                        } else {
                            serde_json::json!({})
                        };
                        let answer = serde_json::json!({"jsonrpc":"2.0","id":id,"result":result});
                        if let Some(s) = stream.lock().unwrap().as_mut() {
                            let _ = write!(s, "event: message\ndata: {answer}\n\n");
                        }
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn events_without_data_before_the_endpoint_event_are_skipped() {
    for preamble in [
        ": hello\n\n",
        "retry: 100\n\n",
        "id: 1\n\n",
        "event: noise\n\n",
        ": a\n: b\n\n",
    ] {
        let addr = padded_server(preamble);
        let g = Gateway::start(&sse_config(&format!("http://{addr}/sse")));
        let r = mcp_post(g.addr, INIT, None);
        assert_eq!(r.status, 200, "{preamble:?}: {}", r.text());
        assert_eq!(
            rpc_result(&r)["result"]["serverInfo"]["name"],
            "padded",
            "{preamble:?}"
        );
    }
}
