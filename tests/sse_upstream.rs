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
