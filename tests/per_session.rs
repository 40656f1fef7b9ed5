//! `session_mode = "per_session"` through the real binary: a child per session (one
//! session's crash is not another's), the process cap with each identity's share, DELETE and
//! idle sessions stopping their child.

mod common;

use common::*;
use mcp_guard::cli::hash_key;
use std::time::{Duration, Instant};

const KEYS: [(&str, &str); 3] = [
    ("alice", "alice-key-0123456789"),
    ("bob", "bob-key-0123456789"),
    ("carol", "carol-key-0123456789"),
];

fn config(max_processes: usize, idle_secs: u64) -> String {
    let keys: String = KEYS
        .iter()
        .map(|(id, key)| {
            format!(
                "[[auth.api_keys]]\nid = \"{id}\"\nkey_hash = \"{}\"\n",
                hash_key(key)
            )
        })
        .collect();
    format!(
        "[server]\nport = 0\nworkers = 2\nsession_idle_secs = {idle_secs}\n[admin]\nport = 0\n[upstream]\ntransport = \"stdio\"\ncommand = {DEMO:?}\nargs = [\"--test-tools\"]\nsession_mode = \"per_session\"\nmax_processes = {max_processes}\ntimeout_secs = 10\n{keys}"
    )
}

fn post(g: &Gateway, key: &str, body: &str, sid: Option<&str>) -> Response {
    mcp_post_as(g.addr, key, body, sid)
}

fn mcp_post_as(addr: std::net::SocketAddr, key: &str, body: &str, sid: Option<&str>) -> Response {
    request(addr, &mcp_post_raw(body, sid, &bearer(key)))
}

fn init(g: &Gateway, key: &str) -> Result<String, Response> {
    let r = post(g, key, INIT, None);
    if r.status != 200 {
        return Err(r);
    }
    Ok(r.header("mcp-session-id").unwrap().to_string())
}

fn processes(g: &Gateway, want: f64) -> f64 {
    g.metric_settles("mcp_guard_stdio_processes", &[], want)
}

#[test]
fn each_session_has_its_own_child_and_one_crash_is_not_anothers() {
    let g = Gateway::start(&config(8, 600));
    let alice = init(&g, KEYS[0].1).unwrap();
    let bob = init(&g, KEYS[1].1).unwrap();
    assert_eq!(processes(&g, 2.0), 2.0);
    // Bob's long call is in flight when Alice's child crashes.
    let addr = g.addr;
    let bob_sid = bob.clone();
    let slow = std::thread::spawn(move || {
        mcp_post_as(
            addr,
            KEYS[1].1,
            &call(3, "sleep", r#"{"ms":1500}"#),
            Some(&bob_sid),
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    let crashed = post(&g, KEYS[0].1, &call(4, "crash", "{}"), Some(&alice));
    assert!(
        crashed.status >= 500 || rpc_result(&crashed).get("error").is_some(),
        "{}",
        crashed.text()
    );
    let r = slow.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        rpc_result(&r)["result"]["content"][0]["text"],
        "slept 1500ms"
    );
}

#[test]
fn the_process_cap_holds_with_a_share_per_identity() {
    // Two children at most; one identity may hold one.
    let g = Gateway::start(&config(2, 600));
    let _alice = init(&g, KEYS[0].1).unwrap();
    let refused = init(&g, KEYS[0].1).unwrap_err();
    assert_eq!(refused.status, 503, "{}", refused.text());
    let error = &refused.json()["error"];
    assert!(
        error["message"].as_str().unwrap().contains("the cap of 1"),
        "{error}"
    );
    let bob = init(&g, KEYS[1].1).unwrap();
    let refused = init(&g, KEYS[2].1).unwrap_err();
    assert!(
        refused.text().contains("the cap of 2"),
        "{}",
        refused.text()
    );
    assert!(g.metric("mcp_guard_stdio_process_cap_refusals_total", &[]) >= 2.0);
    // Ending a session frees its place.
    let r = request(
        g.addr,
        &format!(
            "DELETE /mcp HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\nMcp-Session-Id: {bob}\r\nConnection: close\r\n\r\n",
            KEYS[1].1
        ),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(processes(&g, 1.0), 1.0);
    let ping = r#"{"jsonrpc":"2.0","id":9,"method":"ping"}"#;
    assert_eq!(post(&g, KEYS[1].1, ping, Some(&bob)).status, 404);
    init(&g, KEYS[2].1).unwrap();
}

#[test]
fn an_idle_session_has_its_child_stopped() {
    let g = Gateway::start(&config(4, 1));
    let sid = init(&g, KEYS[0].1).unwrap();
    assert_eq!(processes(&g, 1.0), 1.0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while g.metric("mcp_guard_stdio_processes", &[]) > 0.0 {
        assert!(
            Instant::now() < deadline,
            "the idle child was never stopped"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let ping = r#"{"jsonrpc":"2.0","id":9,"method":"ping"}"#;
    assert_eq!(post(&g, KEYS[0].1, ping, Some(&sid)).status, 404);
}

#[test]
fn children_inherit_no_descriptor_of_the_gateway() {
    // A child started while clients are connected (per-session children start while the
    // gateway serves) must not hold their sockets: it could read another client's requests.
    let dir = tempfile::tempdir().unwrap();
    let listing = dir.path().join("fds.txt");
    let own_stdout = dir.path().join("stdout.txt");
    let script = dir.path().join("server.sh");
    // Its stdout is a socket by design (one end of the pair the gateway reads its output
    // from), so the script notes which one before listing what it holds.
    write_executable(&script, format!(
            "#!/bin/sh\nexec 3>&1\nreadlink /proc/$$/fd/3 > {:?}\nls -l /proc/$$/fd > {:?}\nexec 3>&-\nexec {DEMO:?}\n",
            own_stdout.to_str().unwrap(),
            listing.to_str().unwrap()
        ).as_bytes());
    let cfg = config(4, 600).replace(
        &format!("command = {DEMO:?}\nargs = [\"--test-tools\"]"),
        &format!("command = {:?}", script.to_str().unwrap()),
    );
    for io in ["io_uring", "epoll"] {
        let g = Gateway::start(&cfg.replace("[server]\n", &format!("[server]\nio = \"{io}\"\n")));
        // An idle keep-alive client connection, open while the child starts.
        let mut idle = std::net::TcpStream::connect(g.addr).unwrap();
        std::io::Write::write_all(&mut idle, b"GET /live HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        init(&g, KEYS[0].1).unwrap();
        let fds = std::fs::read_to_string(&listing).unwrap();
        let stdout = std::fs::read_to_string(&own_stdout).unwrap();
        let stdout = stdout.trim();
        assert!(stdout.starts_with("socket:"), "{io}: stdout is {stdout}");
        let sockets: Vec<&str> = fds
            .lines()
            .filter(|l| l.contains("socket:") && !l.ends_with(stdout))
            .collect();
        assert!(
            sockets.is_empty(),
            "{io}: the child inherited {sockets:?}\n{fds}"
        );
        drop(idle);
    }
}

#[test]
fn a_session_with_a_request_in_flight_is_not_idle() {
    let g = Gateway::start(&config(4, 1));
    let sid = init(&g, KEYS[0].1).unwrap();
    // The call outlasts session_idle_secs twice over; the reaper must leave its child alone.
    let r = post(
        &g,
        KEYS[0].1,
        &call(2, "sleep", r#"{"ms":2500}"#),
        Some(&sid),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        rpc_result(&r)["result"]["content"][0]["text"],
        "slept 2500ms"
    );
}

#[test]
fn shared_child_sessions_idle_past_session_idle_secs_end_and_busy_ones_do_not() {
    let cfg = config(8, 1).replace("session_mode = \"per_session\"\nmax_processes = 8\n", "");
    let g = Gateway::start(&cfg);
    let idle = init(&g, KEYS[0].1).unwrap();
    let busy = init(&g, KEYS[1].1).unwrap();
    // Bob's call outlasts the idle limit: in flight is not idle.
    let addr = g.addr;
    let busy_sid = busy.clone();
    let slow = std::thread::spawn(move || {
        mcp_post_as(
            addr,
            KEYS[1].1,
            &call(3, "sleep", r#"{"ms":4000}"#),
            Some(&busy_sid),
        )
    });
    // One second idle, swept every two: ended within four.
    std::thread::sleep(Duration::from_millis(3500));
    let ping = r#"{"jsonrpc":"2.0","id":9,"method":"ping"}"#;
    assert_eq!(post(&g, KEYS[0].1, ping, Some(&idle)).status, 404);
    let r = slow.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(post(&g, KEYS[1].1, ping, Some(&busy)).status, 200);
}

#[test]
fn a_reload_during_an_initialize_leaves_no_child_running() {
    // A child that writes its pid, answers the hub's ping at once and initialize after two
    // seconds, and exits when its stdin closes.
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    let script = dir.path().join("slow-init.sh");
    write_executable(&script, format!(
            "#!/bin/sh\necho $$ >> {pids:?}\nwhile read line; do\ncase \"$line\" in *initialize*) sleep 2;; esac\nid=$(printf '%s' \"$line\" | sed -n 's/.*\"id\":\\([0-9]*\\).*/\\1/p')\n[ -n \"$id\" ] && printf '{{\"jsonrpc\":\"2.0\",\"id\":%s,\"result\":{{\"protocolVersion\":\"2025-11-25\",\"capabilities\":{{}},\"serverInfo\":{{\"name\":\"slow\",\"version\":\"1\"}}}}}}\\n' \"$id\"\ndone\n"
        ).as_bytes());
    let first = config(4, 60).replace(
        &format!("command = {DEMO:?}\nargs = [\"--test-tools\"]"),
        &format!(
            "command = {:?}\nargs = [\"first\"]",
            script.to_str().unwrap()
        ),
    );
    let g = Gateway::start(&first);
    let addr = g.addr;
    let initializing = std::thread::spawn(move || mcp_post_as(addr, KEYS[0].1, INIT, None));
    // Reload (the server's arguments change, so its pool is replaced) while the child is
    // still answering the initialize.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(&pids)
        .unwrap_or_default()
        .is_empty()
    {
        assert!(Instant::now() < deadline, "the child never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    g.reload(
        &first.replace("args = [\"first\"]", "args = [\"second\"]"),
        Duration::from_secs(5),
    );
    let r = initializing.join().unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("initialize again"), "{}", r.text());
    let pid = std::fs::read_to_string(&pids).unwrap().trim().to_string();
    wait_until_ended(
        &pid,
        Duration::from_secs(8),
        "the child still runs, owned by no pool",
    );
    assert_eq!(processes(&g, 0.0), 0.0);
}
