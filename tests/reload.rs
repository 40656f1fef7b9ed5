//! Reloads under load, through the real binary: routed servers added and removed while clients
//! keep calling another server, and what becomes of a removed server's sessions.

mod common;

use common::*;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(20);
/// Client threads calling server `a` throughout.
const CLIENTS: usize = 3;
/// Calls each client still makes once the last reload has been checked.
const CALLS_AFTER: usize = 20;

fn http_server(name: &str, up: &DemoHttp) -> String {
    format!(
        "[[upstream.servers]]\nname = \"{name}\"\ntransport = \"http\"\nurl = \"{}\"\n",
        up.url()
    )
}

fn stdio_server(name: &str) -> String {
    format!(
        "[[upstream.servers]]\nname = \"{name}\"\ntransport = \"stdio\"\ncommand = {DEMO:?}\nargs = [\"--name\", \"srv-{name}\"]\n"
    )
}

/// Routed servers only: `[upstream]` names no server, so `/mcp` itself serves nothing. Rate
/// limits are off: the clients call as fast as they can from one address.
fn config(servers: &[&str]) -> String {
    format!(
        "[server]\nport = 0\nworkers = 2\n[admin]\nport = 0\n[rate_limit]\nenabled = false\n[upstream]\ntimeout_secs = 10\n{}",
        servers.concat()
    )
}

fn reload(g: &Gateway, config: &str) {
    g.reload(config, WAIT);
}

fn post_at(g: &Gateway, path: &str, body: &str, sid: Option<&str>) -> Response {
    request(g.addr, &mcp_post_raw_at(path, body, sid, ""))
}

/// What the client threads share with the test.
#[derive(Default)]
struct Load {
    /// Calls answered correctly, all clients together.
    ok: AtomicUsize,
    /// Set once the last reload has been checked: each client makes CALLS_AFTER more calls.
    finishing: AtomicBool,
    failures: std::sync::Mutex<Vec<String>>,
}

/// One client: its own session at `path`, then echo calls, each checked, until it has made
/// CALLS_AFTER calls after `finishing` was set (or the deadline passes, which the test reports).
fn client(addr: std::net::SocketAddr, path: &str, n: usize, load: &Load) {
    let (_, sid) = initialize_at(addr, path, "");
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut after = 0;
    for i in 0.. {
        if load.finishing.load(Ordering::SeqCst) {
            after += 1;
            if after > CALLS_AFTER {
                return;
            }
        }
        if Instant::now() > deadline {
            load.failures
                .lock()
                .unwrap()
                .push(format!("client {n}: still running at the deadline"));
            return;
        }
        let text = format!("client-{n}-call-{i}");
        let body = call(i, "echo", &format!(r#"{{"text":"{text}"}}"#));
        // A connection closed without an answer is a failure to count, not a panic.
        let mut s = connect(addr);
        let sent = s.write_all(mcp_post_raw_at(path, &body, Some(&sid), "").as_bytes());
        let answer = sent.ok().and_then(|()| read_response(&mut s));
        match answer {
            Some(r)
                if r.status == 200 && rpc_result(&r)["result"]["content"][0]["text"] == text =>
            {
                load.ok.fetch_add(1, Ordering::SeqCst);
            }
            Some(r) => load.failures.lock().unwrap().push(format!(
                "client {n} call {i}: {} {}",
                r.status,
                r.text()
            )),
            None => load
                .failures
                .lock()
                .unwrap()
                .push(format!("client {n} call {i}: no answer")),
        }
    }
}

/// Waits until the clients together have made `more` further good calls.
fn wait_for_calls(load: &Load, more: usize) {
    let target = load.ok.load(Ordering::SeqCst) + more;
    let deadline = Instant::now() + WAIT;
    while load.ok.load(Ordering::SeqCst) < target {
        assert!(
            Instant::now() < deadline,
            "the clients stalled: {:?}",
            load.failures.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Server `a` is called by CLIENTS sessions throughout two reloads: one adds `c`, the next
/// removes `b`. No call at `a` may fail; `c` answers after the first reload, `b`'s path is
/// gone after the second.
fn reload_under_load(a: &str, b: &str, c: &str) {
    let g = Gateway::start(&config(&[a, b]));
    let load = Arc::new(Load::default());
    let clients: Vec<_> = (0..CLIENTS)
        .map(|n| {
            let (addr, load) = (g.addr, load.clone());
            std::thread::spawn(move || client(addr, "/mcp/a", n, &load))
        })
        .collect();
    assert_eq!(initialize_at(g.addr, "/mcp/b", "").0, "srv-b");
    assert_eq!(post_at(&g, "/mcp/c", INIT, None).status, 404);
    wait_for_calls(&load, 5 * CLIENTS);

    reload(&g, &config(&[a, b, c]));
    assert_eq!(initialize_at(g.addr, "/mcp/c", "").0, "srv-c");
    let (_, c_sid) = initialize_at(g.addr, "/mcp/c", "");
    let r = post_at(
        &g,
        "/mcp/c",
        &call(2, "add", r#"{"a":2,"b":3}"#),
        Some(&c_sid),
    );
    assert_eq!(rpc_result(&r)["result"]["content"][0]["text"], "5");
    wait_for_calls(&load, 5 * CLIENTS);

    reload(&g, &config(&[a, c]));
    let r = post_at(&g, "/mcp/b", INIT, None);
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(initialize_at(g.addr, "/mcp/c", "").0, "srv-c");

    load.finishing.store(true, Ordering::SeqCst);
    for t in clients {
        t.join().unwrap();
    }
    let failures = load.failures.lock().unwrap();
    assert!(failures.is_empty(), "calls at a failed: {failures:#?}");
    assert!(load.ok.load(Ordering::SeqCst) >= 10 * CLIENTS + CALLS_AFTER * CLIENTS);
}

#[test]
fn calls_at_an_http_server_never_fail_while_reloads_add_and_remove_other_servers() {
    let (a, c) = (
        DemoHttp::start(&["--name", "srv-a"]),
        DemoHttp::start(&["--name", "srv-c"]),
    );
    reload_under_load(
        &http_server("a", &a),
        &stdio_server("b"),
        &http_server("c", &c),
    );
}

#[test]
fn calls_at_a_stdio_server_never_fail_while_reloads_add_and_remove_other_servers() {
    let b = DemoHttp::start(&["--name", "srv-b"]);
    reload_under_load(
        &stdio_server("a"),
        &http_server("b", &b),
        &stdio_server("c"),
    );
}

/// Sessions at `/mcp/web` (HTTP) and `/mcp/local` (stdio), and a config with both servers and a
/// third, `keep`, that stays when they go (a gateway needs some server).
fn two_servers_with_sessions(
    web: &DemoHttp,
) -> (Gateway, [String; 2], Vec<(&'static str, String)>) {
    let servers = [
        http_server("web", web),
        stdio_server("local"),
        stdio_server("keep"),
    ];
    let all = config(&[&servers[0], &servers[1], &servers[2]]);
    let without = config(&[&servers[2]]);
    let g = Gateway::start(&all);
    let sessions = ["/mcp/web", "/mcp/local"]
        .into_iter()
        .map(|path| (path, initialize_at(g.addr, path, "").1))
        .collect::<Vec<_>>();
    for (path, sid) in &sessions {
        assert_eq!(post_at(&g, path, PING, Some(sid)).status, 200, "{path}");
    }
    (g, [all, without], sessions)
}

const PING: &str = r#"{"jsonrpc":"2.0","id":7,"method":"ping"}"#;

/// A server removed by a reload takes its sessions with it: at its path they are unknown
/// (404) for every method, and a stdio server of the same name added back is a new process
/// that knows none of them.
#[test]
fn removing_a_server_ends_its_sessions() {
    let web = DemoHttp::start(&["--name", "srv-web"]);
    let (g, [all, without], sessions) = two_servers_with_sessions(&web);
    reload(&g, &without);
    for (path, sid) in &sessions {
        let r = post_at(&g, path, PING, Some(sid));
        assert_eq!(r.status, 404, "{path}: {}", r.text());
        let r = request(
            g.addr,
            &format!(
                "DELETE {path} HTTP/1.1\r\nHost: t\r\nMcp-Session-Id: {sid}\r\nConnection: close\r\n\r\n"
            ),
        );
        assert_eq!(r.status, 404, "{path}: {}", r.text());
    }
    reload(&g, &all);
    let (path, sid) = &sessions[1];
    let r = post_at(&g, path, PING, Some(sid));
    assert_eq!(r.status, 404, "{path}: {}", r.text());
    let (_, fresh) = initialize_at(g.addr, path, "");
    assert_eq!(post_at(&g, path, PING, Some(&fresh)).status, 200, "{path}");
}

/// The HTTP half of the same rule: once the gateway has answered 404 for a session, it must go
/// on doing so ("The server MAY terminate the session at any time, after which it MUST respond
/// to requests containing that session ID with HTTP 404 Not Found", MCP 2025-11-25).
#[test]
fn an_http_server_added_back_does_not_revive_the_sessions_of_the_removed_one() {
    let web = DemoHttp::start(&["--name", "srv-web"]);
    let (g, [all, without], sessions) = two_servers_with_sessions(&web);
    reload(&g, &without);
    let (path, sid) = &sessions[0];
    assert_eq!(post_at(&g, path, PING, Some(sid)).status, 404, "{path}");
    reload(&g, &all);
    let r = post_at(&g, path, PING, Some(sid));
    assert_eq!(r.status, 404, "{path}: {}", r.text());
    let (_, fresh) = initialize_at(g.addr, path, "");
    assert_eq!(post_at(&g, path, PING, Some(&fresh)).status, 200, "{path}");
}
