//! The guard through the real binary: API keys, per-identity tool policy, tools/list
//! filtering, rate limits, policy reload, and the audit trail.

mod common;

use common::*;
use mcp_guard::cli::hash_key;
use std::io::Write;
use std::time::{Duration, Instant};

const ALICE: &str = "alice-key-6f1c2d";
const BOB: &str = "bob-key-9a8b7c";

/// Keys: alice may call echo/add/tool_00* but never crash; bob may call anything.
fn keys(alice_extra: &str) -> String {
    format!(
        "[[auth.api_keys]]\nid = \"alice\"\nkey_hash = \"{}\"\nallowed_tools = [\"echo\", \"add\", \"tool_00*\", \"crash\"]\ndenied_tools = [\"crash\"]\n{alice_extra}\n\n[[auth.api_keys]]\nid = \"bob\"\nkey_hash = \"{}\"\n",
        hash_key(ALICE),
        hash_key(BOB)
    )
}

fn guarded_stdio(demo_args: &[&str], tail: &str) -> String {
    format!(
        "{}\n{}\n[rate_limit]\nenabled = false\n{tail}\n",
        stdio_config("auto", "", demo_args),
        keys("")
    )
}

fn with_key(key: &str) -> String {
    format!("Authorization: Bearer {key}\r\n")
}

fn post_as(addr: std::net::SocketAddr, key: &str, body: &str, sid: Option<&str>) -> Response {
    request(addr, &mcp_post_raw(body, sid, &with_key(key)))
}

fn init_as(addr: std::net::SocketAddr, key: &str) -> String {
    let r = post_as(addr, key, INIT, None);
    assert_eq!(r.status, 200, "{}", r.text());
    let sid = r.header("mcp-session-id").unwrap().to_string();
    let n = post_as(
        addr,
        key,
        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
        Some(&sid),
    );
    assert_eq!(n.status, 202);
    sid
}

fn tool_names(v: &serde_json::Value) -> Vec<String> {
    v["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn missing_and_wrong_keys_get_401_and_good_keys_pass() {
    let g = Gateway::start(&guarded_stdio(&[], ""));
    let r = mcp_post(g.addr, INIT, None);
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"mcp-guard\"")
    );
    assert_eq!(r.json()["error"]["code"], -32001);
    let r = post_as(g.addr, "wrong-key", INIT, None);
    assert_eq!(r.status, 401);
    assert!(
        r.header("www-authenticate")
            .unwrap()
            .contains("invalid_token")
    );
    // Both accepted header forms work.
    assert_eq!(post_as(g.addr, ALICE, INIT, None).status, 200);
    let r = request(
        g.addr,
        &mcp_post_raw(INIT, None, &format!("X-API-Key: {BOB}\r\n")),
    );
    assert_eq!(r.status, 200);
    // Two different keys in one request are refused, not resolved by preference.
    let r = request(
        g.addr,
        &mcp_post_raw(
            INIT,
            None,
            &format!("Authorization: Bearer {ALICE}\r\nX-API-Key: {BOB}\r\n"),
        ),
    );
    assert_eq!(r.status, 401);
    // A session is bound to the identity that created it.
    let sid = init_as(g.addr, ALICE);
    let ping = r#"{"jsonrpc":"2.0","id":9,"method":"ping"}"#;
    assert_eq!(post_as(g.addr, ALICE, ping, Some(&sid)).status, 200);
    assert_eq!(post_as(g.addr, BOB, ping, Some(&sid)).status, 404);
    assert!(
        g.metric(
            "mcp_guard_auth_total",
            &[("method", "api_key"), ("result", "failure")]
        ) >= 2.0
    );
    assert!(
        g.metric(
            "mcp_guard_auth_total",
            &[("method", "none"), ("result", "failure")]
        ) >= 1.0
    );
    assert!(
        g.metric(
            "mcp_guard_auth_total",
            &[("method", "api_key"), ("result", "success")]
        ) >= 3.0
    );
}

#[test]
fn denied_tools_never_reach_the_upstream_and_globs_allow() {
    let g = Gateway::start(&guarded_stdio(&["--test-tools", "--tools", "20"], ""));
    let sid = init_as(g.addr, ALICE);
    let r = post_as(
        g.addr,
        ALICE,
        &call(2, "echo", r#"{"text":"ok"}"#),
        Some(&sid),
    );
    assert_eq!(r.json()["result"]["content"][0]["text"], "ok");
    let r = post_as(g.addr, ALICE, &call(3, "tool_0007", "{}"), Some(&sid));
    assert_eq!(
        r.json()["result"]["content"][0]["text"],
        "called tool_0007",
        "glob allows"
    );
    let r = post_as(g.addr, ALICE, &call(4, "sleep", r#"{"ms":1}"#), Some(&sid));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["error"]["code"], -32003);
    // The reason is told (not on the allow list), the list itself never is.
    assert_eq!(
        r.json()["error"]["message"],
        "Tool 'sleep' is not on this caller's allow list"
    );
    assert_eq!(r.json()["error"]["data"]["reason"], "not_on_allow_list");
    // `crash` would kill the stdio server if it got there; deny wins over the allow entry.
    let r = post_as(g.addr, ALICE, &call(5, "crash", "{}"), Some(&sid));
    assert_eq!(r.status, 200);
    let err = &r.json()["error"];
    assert_eq!(err["code"], -32003);
    assert_eq!(
        err["message"], "Tool 'crash' is denied for this caller",
        "names the tool and the deny list: {err}"
    );
    assert_eq!(err["data"]["reason"], "denied_by_deny_list");
    assert_eq!(r.json()["id"], 5);
    let r = post_as(
        g.addr,
        ALICE,
        &call(6, "echo", r#"{"text":"still up"}"#),
        Some(&sid),
    );
    assert_eq!(r.json()["result"]["content"][0]["text"], "still up");
    assert_eq!(g.metric("mcp_guard_upstream_restarts_total", &[]), 0.0);
    assert_eq!(
        g.metric(
            "mcp_guard_decisions_total",
            &[("outcome", "deny"), ("tool", "crash")]
        ),
        1.0
    );
    assert_eq!(
        g.metric(
            "mcp_guard_decisions_total",
            &[("outcome", "allow"), ("tool", "echo")]
        ),
        2.0
    );
    // A batch holding a denied call is refused whole.
    let batch = format!(
        "[{},{}]",
        call(7, "echo", r#"{"text":"a"}"#),
        call(8, "crash", "{}")
    );
    let r = request(
        g.addr,
        &mcp_post_raw(
            &batch,
            Some(&sid),
            &format!("{}MCP-Protocol-Version: 2025-03-26\r\n", with_key(ALICE)),
        ),
    );
    let arr = r.json();
    assert_eq!(arr.as_array().unwrap().len(), 2);
    assert!(
        arr.as_array()
            .unwrap()
            .iter()
            .all(|m| m["error"]["code"] == -32003)
    );
    assert_eq!(arr[0]["error"]["data"]["reason"], "batch_refused");
    assert_eq!(arr[1]["error"]["data"]["reason"], "denied_by_deny_list");
    assert_eq!(g.metric("mcp_guard_upstream_restarts_total", &[]), 0.0);
}

#[test]
fn tools_list_is_filtered_in_json_across_pages() {
    let g = Gateway::start(&guarded_stdio(&["--tools", "120"], ""));
    let sid = init_as(g.addr, ALICE);
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let params = cursor.as_ref().map_or(String::new(), |c| {
            format!(r#","params":{{"cursor":"{c}"}}"#)
        });
        let body = format!(
            r#"{{"jsonrpc":"2.0","id":{},"method":"tools/list"{params}}}"#,
            10 + pages
        );
        let r = post_as(g.addr, ALICE, &body, Some(&sid));
        assert_eq!(r.status, 200);
        let v = r.json();
        seen.extend(tool_names(&v));
        pages += 1;
        match v["result"]["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(pages, 3, "pagination kept");
    seen.sort();
    let mut expected: Vec<String> = (0..100).map(|i| format!("tool_{i:04}")).collect();
    expected.extend(["add".to_string(), "echo".to_string()]);
    expected.sort();
    assert_eq!(seen, expected);
    // Bob has no restrictions and sees everything.
    let sid = init_as(g.addr, BOB);
    let r = post_as(
        g.addr,
        BOB,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
        Some(&sid),
    );
    assert!(tool_names(&r.json()).contains(&"sleep".to_string()));
}

/// A worker recognizes a tool list it scanned lately instead of scanning it again: callers
/// with different policies, in turn, each still get exactly their own tools from it.
#[test]
fn a_list_the_gateway_recalls_is_still_filtered_for_each_caller() {
    const CAROL: &str = "carol-key-3e4f5a";
    let carol = format!(
        "[[auth.api_keys]]\nid = \"carol\"\nkey_hash = \"{}\"\nallowed_tools = [\"sleep\", \"tool_001*\"]\n",
        hash_key(CAROL)
    );
    let g = Gateway::start(&guarded_stdio(&["--tools", "20"], &carol));
    let (alice_sid, carol_sid, bob_sid) = (
        init_as(g.addr, ALICE),
        init_as(g.addr, CAROL),
        init_as(g.addr, BOB),
    );
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let mut alice_sees: Vec<String> = (0..20).map(|i| format!("tool_{i:04}")).collect();
    alice_sees.extend(["add".to_string(), "echo".to_string()]);
    let mut carol_sees: Vec<String> = (10..20).map(|i| format!("tool_{i:04}")).collect();
    carol_sees.push("sleep".to_string());
    let list = |id: u32| format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/list"}}"#);
    for round in 0..3 {
        let r = post_as(g.addr, ALICE, &list(10 + round), Some(&alice_sid));
        assert_eq!(
            sorted(tool_names(&r.json())),
            sorted(alice_sees.clone()),
            "round {round}"
        );
        let r = post_as(g.addr, CAROL, &list(20 + round), Some(&carol_sid));
        assert_eq!(
            sorted(tool_names(&r.json())),
            sorted(carol_sees.clone()),
            "round {round}"
        );
        assert_eq!(r.json()["id"], 20 + round, "the answer's own id");
        // Bob is unrestricted: his answer is the whole list, relayed unscanned.
        let r = post_as(g.addr, BOB, &list(30 + round), Some(&bob_sid));
        let all = tool_names(&r.json());
        assert!(all.contains(&"notify".to_string()) && all.len() > alice_sees.len());
    }
}

#[test]
fn tools_list_is_filtered_inside_sse_responses() {
    let up = DemoHttp::start(&["--sse-responses", "--test-tools"]);
    let cfg = format!(
        "{}\n{}\n[rate_limit]\nenabled = false\n",
        http_config("auto", &up.url(), "", ""),
        keys("")
    );
    let g = Gateway::start(&cfg);
    let sid = init_as(g.addr, ALICE);
    let r = post_as(
        g.addr,
        ALICE,
        r#"{"jsonrpc":"2.0","id":"l1","method":"tools/list"}"#,
        Some(&sid),
    );
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("text/event-stream")
    );
    let msg = rpc_result(&r);
    assert_eq!(msg["id"], "l1");
    let mut names = tool_names(&msg);
    names.sort();
    assert_eq!(names, vec!["add".to_string(), "echo".to_string()]);
    // Responses to other methods stream through untouched.
    let r = post_as(
        g.addr,
        ALICE,
        &call(2, "echo", r#"{"text":"sse"}"#),
        Some(&sid),
    );
    assert_eq!(rpc_result(&r)["result"]["content"][0]["text"], "sse");
}

#[test]
fn burst_then_429_with_retry_after_and_rate_limit_headers() {
    let cfg = format!(
        "{}\n{}\n[rate_limit]\nrequests_per_second = 2\nburst_size = 5\n",
        stdio_config("auto", "", &[]),
        keys("")
    );
    let g = Gateway::start(&cfg);
    let ping = r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
    // initialize used one token.
    let sid = {
        let r = post_as(g.addr, BOB, INIT, None);
        r.header("mcp-session-id").unwrap().to_string()
    };
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(post_as(g.addr, BOB, ping, Some(&sid)).status);
    }
    assert_eq!(&statuses[..4], &[200, 200, 200, 200], "{statuses:?}");
    let r = post_as(g.addr, BOB, ping, Some(&sid));
    assert_eq!(r.status, 429, "{statuses:?}");
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry));
    assert_eq!(r.header("ratelimit-limit"), Some("2"));
    assert_eq!(r.header("ratelimit-remaining"), Some("0"));
    assert_eq!(r.json()["error"]["data"]["retryAfterSeconds"], retry);
    assert_eq!(r.json()["id"], 1);
    // Another identity has its own bucket.
    assert_eq!(post_as(g.addr, ALICE, INIT, None).status, 200);
    assert!(g.metric("mcp_guard_rate_limited_total", &[]) >= 1.0);
}

#[test]
fn per_tool_limit_applies_to_that_tool_only() {
    let cfg = format!(
        "{}\n{}\n[rate_limit]\nrequests_per_second = 1000\nburst_size = 1000\nper_tool = {{ \"echo\" = 2 }}\n",
        stdio_config("auto", "", &[]),
        keys("")
    );
    let g = Gateway::start(&cfg);
    let sid = init_as(g.addr, BOB);
    let echo = |id| {
        post_as(
            g.addr,
            BOB,
            &call(id, "echo", r#"{"text":"x"}"#),
            Some(&sid),
        )
        .status
    };
    assert_eq!((echo(1), echo(2)), (200, 200));
    assert_eq!(echo(3), 429);
    let r = post_as(g.addr, BOB, &call(4, "add", r#"{"a":1,"b":2}"#), Some(&sid));
    assert_eq!(
        r.status, 200,
        "other tools are not limited by echo's bucket"
    );
    assert_eq!(
        g.metric(
            "mcp_guard_decisions_total",
            &[("outcome", "rate_limited"), ("tool", "echo")]
        ),
        1.0
    );
    // The refused call is not also counted as allowed.
    assert_eq!(
        g.metric(
            "mcp_guard_decisions_total",
            &[("outcome", "allow"), ("tool", "echo")]
        ),
        2.0
    );
}

#[test]
fn limit_holds_across_connections_spread_over_all_workers() {
    // 2 workers; rate 20/s, burst 20. Lease size L = clamp(20 / (4·2), 1, 64) = 2, so over a
    // run of T seconds at most 20 + 20·T + 2·(2−1) requests may be admitted.
    let cfg = format!(
        "{}\n{}\n[rate_limit]\nrequests_per_second = 20\nburst_size = 20\n",
        stdio_config("auto", "", &[]),
        keys("")
    );
    let g = Gateway::start(&cfg);
    let ping = r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
    let raw = mcp_post_raw(ping, None, &with_key(BOB)).replace("Mcp-Session-Id", "X-Ignored");
    let start = Instant::now();
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let raw = raw.clone();
            let addr = g.addr;
            std::thread::spawn(move || {
                // One connection per thread; the kernel spreads them over both workers.
                let mut s = connect(addr);
                let (mut ok, mut limited) = (0u32, 0u32);
                for _ in 0..40 {
                    s.write_all(raw.as_bytes()).unwrap();
                    // Without a session the stdio upstream answers 400 after the limiter let
                    // the request through: anything but 429 was admitted by the limiter.
                    match read_response(&mut s).unwrap().status {
                        200 | 400 => ok += 1,
                        429 => limited += 1,
                        other => panic!("unexpected status {other}"),
                    }
                }
                (ok, limited)
            })
        })
        .collect();
    let (mut ok, mut limited) = (0, 0);
    for t in threads {
        let (a, b) = t.join().unwrap();
        ok += a;
        limited += b;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let bound = 20.0 + 20.0 * elapsed + 2.0;
    assert_eq!(ok + limited, 640);
    assert!(
        f64::from(ok) <= bound,
        "admitted {ok} > bound {bound:.1} over {elapsed:.2}s"
    );
    assert!(ok >= 20, "at least the burst is admitted: {ok}");
}

#[test]
fn policy_reload_takes_effect_without_restart() {
    let g = Gateway::start(&guarded_stdio(&[], ""));
    let sid = init_as(g.addr, ALICE);
    let sleep = call(2, "sleep", r#"{"ms":1}"#);
    assert_eq!(
        post_as(g.addr, ALICE, &sleep, Some(&sid)).json()["error"]["code"],
        -32003
    );
    let cfg = guarded_stdio(&[], "").replace(
        "allowed_tools = [\"echo\", \"add\", \"tool_00*\", \"crash\"]",
        "allowed_tools = [\"echo\", \"add\", \"sleep\"]",
    );
    g.rewrite_config(&cfg);
    g.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = post_as(g.addr, ALICE, &sleep, Some(&sid));
        if r.json()["result"]["content"][0]["text"] == "slept 1ms" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "policy change not applied: {}",
            r.text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_reload_that_revokes_a_key_ends_its_open_get_stream() {
    let g = Gateway::start(&guarded_stdio(&[], ""));
    let alice = init_as(g.addr, ALICE);
    let bob = init_as(g.addr, BOB);
    let mut stream = connect(g.addr);
    stream
        .write_all(
            format!(
                "GET /mcp HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\nMcp-Session-Id: {alice}\r\n{}\r\n",
                with_key(ALICE)
            )
            .as_bytes(),
        )
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut head = [0u8; 512];
    let n = std::io::Read::read(&mut stream, &mut head).unwrap();
    assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"));
    // Alice's key is revoked (bob's stays).
    let cfg = guarded_stdio(&[], "").replace(
        &format!("key_hash = \"{}\"", hash_key(ALICE)),
        &format!("key_hash = \"{}\"", hash_key("alice-rotated-key")),
    );
    g.rewrite_config(&cfg);
    g.signal(libc::SIGHUP);
    assert!(g.wait_log("configuration reloaded", Duration::from_secs(5)));
    // A server notification for every session: alice's stream must end instead of carrying it.
    let r = post_as(g.addr, BOB, &call(3, "notify", "{}"), Some(&bob));
    assert_eq!(r.status, 200, "{}", r.text());
    let mut rest = Vec::new();
    let read = std::io::Read::read_to_end(&mut stream, &mut rest);
    assert!(read.is_ok(), "stream did not end: {read:?}");
    let rest = String::from_utf8_lossy(&rest);
    assert!(!rest.contains("list_changed"), "{rest}");
}

#[test]
fn audit_lines_are_complete_for_each_decision_and_hold_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let cfg = format!(
        "{}\n{}\n[rate_limit]\nrequests_per_second = 1000\nburst_size = 1000\nper_tool = {{ \"add\" = 1 }}\n[audit]\nfile = {:?}\n",
        stdio_config("auto", "", &["--test-tools"]),
        keys(""),
        path.to_str().unwrap()
    );
    let g = Gateway::start(&cfg);
    let sid = init_as(g.addr, ALICE);
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = request(
        g.addr,
        &mcp_post_raw(
            &call(2, "echo", r#"{"text":"hello"}"#),
            Some(&sid),
            &format!("{}traceparent: {tp}\r\n", with_key(ALICE)),
        ),
    );
    assert_eq!(r.status, 200);
    post_as(g.addr, ALICE, &call(3, "crash", "{}"), Some(&sid)); // deny
    post_as(
        g.addr,
        ALICE,
        &call(4, "add", r#"{"a":1,"b":1}"#),
        Some(&sid),
    ); // allow
    post_as(
        g.addr,
        ALICE,
        &call(5, "add", r#"{"a":1,"b":1}"#),
        Some(&sid),
    ); // rate_limited
    post_as(g.addr, "not-a-real-key", INIT, None); // 401
    let deadline = Instant::now() + Duration::from_secs(5);
    let lines: Vec<serde_json::Value> = loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("each audit line is JSON"))
            .collect();
        if lines.len() >= 7 {
            assert!(
                !text.contains(ALICE) && !text.contains("not-a-real-key"),
                "a secret leaked into the audit trail"
            );
            break lines;
        }
        assert!(Instant::now() < deadline, "audit lines missing: {text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    for l in &lines {
        for field in [
            "timestamp",
            "request_id",
            "auth_method",
            "client_addr",
            "method",
            "decision",
            "status",
            "upstream",
            "latency_us",
        ] {
            assert!(l.get(field).is_some(), "{field} missing in {l}");
        }
    }
    let find = |tool: &str, decision: &str| {
        lines
            .iter()
            .find(|l| l["tool"] == tool && l["decision"] == decision)
            .unwrap_or_else(|| panic!("no {decision} event for {tool}: {lines:?}"))
            .clone()
    };
    let echo = find("echo", "allow");
    assert_eq!(echo["identity"], "alice");
    assert_eq!(echo["auth_method"], "api_key");
    assert_eq!(echo["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(echo["method"], "tools/call");
    assert!(
        echo.get("arguments").is_none(),
        "arguments excluded by default"
    );
    let deny = find("crash", "deny");
    assert_eq!(deny["reason"], "denied_by_deny_list");
    let limited = find("add", "rate_limited");
    assert_eq!(limited["status"], 429);
    let unauth = lines
        .iter()
        .find(|l| l["status"] == 401)
        .expect("401 event");
    assert_eq!(unauth["decision"], "deny");
    assert_eq!(unauth["reason"], "invalid_credentials");
    assert!(unauth["identity"].is_null());
    assert!(g.metric("mcp_guard_audit_events_written_total", &[]) >= 7.0);
}

#[test]
fn audit_overflow_is_counted_and_never_blocks_requests() {
    // Audit to a stdout pipe nobody reads: the writer blocks once the pipe is full, the tiny
    // queues fill, and the rest must be dropped (and counted) while requests carry on.
    let cfg = format!(
        "{}\n[rate_limit]\nenabled = false\n[audit]\nstdout = true\nqueue_capacity = 4\n",
        stdio_config("auto", "", &[])
    );
    let g = Gateway::start_with(&cfg, true);
    let sid = initialize(g.addr);
    let ping = mcp_post_raw(
        r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#,
        Some(&sid),
        "",
    );
    let mut s = connect(g.addr);
    let start = Instant::now();
    for _ in 0..600 {
        s.write_all(ping.as_bytes()).unwrap();
        assert_eq!(read_response(&mut s).unwrap().status, 200);
    }
    assert!(start.elapsed() < Duration::from_secs(30));
    assert!(g.metric("mcp_guard_audit_events_dropped_total", &[]) > 0.0);
}

#[test]
fn audit_file_is_reopened_on_sighup_for_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let rotated = dir.path().join("audit.jsonl.1");
    let cfg = format!(
        "{}\n[rate_limit]\nenabled = false\n[audit]\nfile = {:?}\n",
        stdio_config("auto", "", &[]),
        path.to_str().unwrap()
    );
    let g = Gateway::start(&cfg);
    let sid = initialize(g.addr);
    let lines = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while lines(&path) < 2 {
        assert!(Instant::now() < deadline, "first events not written");
        std::thread::sleep(Duration::from_millis(20));
    }
    // logrotate's move-then-signal: events keep going to the moved file until SIGHUP.
    std::fs::rename(&path, &rotated).unwrap();
    g.signal(libc::SIGHUP);
    assert!(g.wait_log("audit file reopened", Duration::from_secs(5)));
    let ping = r#"{"jsonrpc":"2.0","id":7,"method":"ping"}"#;
    assert_eq!(mcp_post(g.addr, ping, Some(&sid)).status, 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    while lines(&path) < 1 {
        assert!(Instant::now() < deadline, "no event in the reopened file");
        std::thread::sleep(Duration::from_millis(20));
    }
    let fresh = std::fs::read_to_string(&path).unwrap();
    assert!(fresh.contains("\"method\":\"ping\""), "{fresh}");
    assert!(
        lines(&rotated) >= 2,
        "rotated file keeps the earlier events"
    );
}

#[test]
fn refusals_at_the_rate_limit_get_an_allowance_of_audit_lines_per_caller() {
    // Red team (fleet, F2): every 429 was audited, so one caller held at its limit (or any
    // stranger, without keys) wrote ~30k lines a second. Like failed authentications, each
    // caller now gets 10 lines a minute per worker for them; the rest are counted.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let cfg = format!(
        "{}\n{}\n[rate_limit]\nrequests_per_second = 1\nburst_size = 1\n[audit]\nfile = {:?}\n",
        stdio_config("auto", "", &["--test-tools"]),
        keys(""),
        path.to_str().unwrap()
    );
    let g = Gateway::start(&cfg);
    let mut refused = 0;
    for _ in 0..60 {
        if post_as(g.addr, ALICE, INIT, None).status == 429 {
            refused += 1;
        }
    }
    assert!(refused >= 55, "only {refused} refused");
    assert_eq!(post_as(g.addr, BOB, INIT, None).status, 200);
    assert_eq!(post_as(g.addr, BOB, INIT, None).status, 429);
    // Every refusal is either a line or counted as suppressed.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let limited: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|e| e["decision"] == "rate_limited")
            .collect();
        let of = |who: &str| limited.iter().filter(|e| e["identity"] == who).count();
        let suppressed = g.metric("mcp_guard_audit_events_suppressed_total", &[]);
        if of("bob") == 1 && of("alice") as f64 + suppressed == f64::from(refused) {
            // Two workers, ten lines a minute each.
            assert!(of("alice") <= 20, "{} lines for alice", of("alice"));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alice {} + {suppressed} suppressed of {refused}, bob {}",
            of("alice"),
            of("bob")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn every_kind_of_refusal_a_client_can_repeat_gets_the_audit_allowance_batches_line_by_line() {
    // Red team (fleet, N1, N2): a bad Origin (no credentials needed), a denied tool (decided
    // before the rate limit, so free), a malformed request each wrote a line per request without
    // limit, and a batch of 40 denied calls 40 lines per request.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let cfg = format!(
        "{}\n{}\n[rate_limit]\nenabled = false\n[audit]\nfile = {:?}\n",
        stdio_config(
            "auto",
            "workers = 1\nallowed_origins = [\"https://ok.example\"]",
            &["--test-tools"]
        )
        .replace("workers = 2\n", ""),
        keys(""),
        path.to_str().unwrap()
    );
    let g = Gateway::start(&cfg);
    let sid = init_as(g.addr, ALICE);
    let denied_batch = format!(
        "[{}]",
        (0..40)
            .map(|i| call(100 + i, "crash", "{}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    for _ in 0..30 {
        let origin = request(
            g.addr,
            &mcp_post_raw(INIT, None, "Origin: https://evil.example\r\n"),
        );
        assert_eq!(origin.status, 403);
        let denied = post_as(g.addr, ALICE, &call(2, "crash", "{}"), Some(&sid));
        assert_eq!(denied.json()["error"]["code"], -32003, "{}", denied.text());
        assert_eq!(post_as(g.addr, ALICE, "{not json", Some(&sid)).status, 400);
        post_as(g.addr, ALICE, &denied_batch, Some(&sid));
    }
    // What was allowed is written whole whatever came before.
    assert_eq!(
        post_as(
            g.addr,
            ALICE,
            &call(3, "echo", r#"{"text":"hi"}"#),
            Some(&sid)
        )
        .status,
        200
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let events: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let allowed_echo = events
            .iter()
            .any(|e| e["decision"] == "allow" && e["tool"] == "echo");
        if allowed_echo {
            let refused_anonymously = events
                .iter()
                .filter(|e| e["status"] == 403 && e["identity"].is_null())
                .count();
            let refused_alice = events
                .iter()
                .filter(|e| e["identity"] == "alice" && e["decision"] != "allow")
                .count();
            // One worker: 10 lines a minute for the stranger's address, 10 for alice, where
            // 30 Origin refusals and 30 x (1 + 1 + 40) of alice's were sent.
            assert!(
                refused_anonymously <= 10,
                "{refused_anonymously} Origin lines"
            );
            assert!(
                refused_alice <= 10,
                "{refused_alice} lines for alice's refusals"
            );
            let suppressed = g.metric("mcp_guard_audit_events_suppressed_total", &[]);
            assert!(
                suppressed >= f64::from(30 + 30 * 42 - 20),
                "{suppressed} suppressed"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no allowed echo in {text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
