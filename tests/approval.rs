//! Human approval through MCP elicitation (`[approval]`), against the real binary: a held call's
//! elicitation request on its own SSE stream, each answer and what it does, the answers a
//! hostile client would forge, an answer landing on the other worker, and what the upstream (a
//! stdio demo server logging every line it reads) saw.

mod common;

use common::*;
use mcp_guard::cli::hash_key;
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const ALICE: &str = "alice-key-approval-1";
const BOB: &str = "bob-key-approval-2";
const WAIT: Duration = Duration::from_secs(8);
const VERSION: &str = "MCP-Protocol-Version: 2025-11-25\r\n";

fn init_body(version: &str, capabilities: &str) -> String {
    format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"initialize","params":{{"protocolVersion":"{version}","capabilities":{capabilities},"clientInfo":{{"name":"approval-test","version":"1"}}}}}}"#
    )
}

struct Lab {
    g: Gateway,
    input_log: PathBuf,
    audit: PathBuf,
    _dir: tempfile::TempDir,
}

fn lab(timeout_secs: u64) -> Lab {
    let dir = tempfile::tempdir().unwrap();
    let input_log = dir.path().join("child-input.log");
    let audit = dir.path().join("audit.jsonl");
    let cfg = format!(
        "{}\n[[auth.api_keys]]\nid = \"alice\"\nkey_hash = \"{}\"\n\n[[auth.api_keys]]\nid = \"bob\"\nkey_hash = \"{}\"\n\
         [rate_limit]\nenabled = false\n[audit]\nfile = {:?}\n\
         [approval]\ntools = [\"ec*\", \"ask_nothing\"]\ntimeout_secs = {timeout_secs}\n",
        stdio_config(
            "auto",
            "",
            &["--test-tools", "--log-input", input_log.to_str().unwrap()]
        ),
        hash_key(ALICE),
        hash_key(BOB),
        audit,
    );
    Lab {
        g: Gateway::start(&cfg),
        input_log,
        audit,
        _dir: dir,
    }
}

/// A gateway in front of the HTTP upstream at `url`, whose calls time out after
/// `upstream_timeout` seconds, where alice's calls of `tool` wait for approval; the audit trail
/// goes to the lab's file.
fn http_lab(url: &str, tool: &str, upstream_timeout: u64) -> Lab {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let cfg = format!(
        "{}\n[[auth.api_keys]]\nid = \"alice\"\nkey_hash = \"{}\"\n[rate_limit]\nenabled = false\n\
         [approval]\ntools = [\"{tool}\"]\ntimeout_secs = 30\n[audit]\nfile = {:?}\n",
        http_config("auto", url, "", "").replace(
            "timeout_secs = 10",
            &format!("timeout_secs = {upstream_timeout}")
        ),
        hash_key(ALICE),
        audit
    );
    Lab {
        g: Gateway::start(&cfg),
        input_log: PathBuf::new(),
        audit,
        _dir: dir,
    }
}

impl Lab {
    fn addr(&self) -> SocketAddr {
        self.g.addr
    }

    fn post(&self, key: &str, body: &str, sid: Option<&str>) -> Response {
        request(
            self.addr(),
            &mcp_post_raw(body, sid, &format!("{}{VERSION}", bearer(key))),
        )
    }

    /// Initializes as `key` with `init`; returns the session id.
    fn init_with(&self, key: &str, init: &str) -> String {
        let r = self.post(key, init, None);
        assert_eq!(r.status, 200, "initialize: {}", r.text());
        let sid = r.header("mcp-session-id").expect("a session").to_string();
        let n = self.post(
            key,
            r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
            Some(&sid),
        );
        assert_eq!(n.status, 202, "initialized: {}", n.text());
        sid
    }

    /// A session whose client declared elicitation.
    fn eliciting(&self, key: &str) -> String {
        let sid = self.init_with(key, &init_body("2025-11-25", r#"{"elicitation":{}}"#));
        assert!(sid.starts_with("e."), "not flagged: {sid}");
        sid
    }

    fn child_lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.input_log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn assert_child_never_saw(&self, needle: &str) {
        for l in self.child_lines() {
            assert!(!l.contains(needle), "the upstream read {needle:?}: {l}");
        }
    }

    /// A call of a tool not held, carrying a marker, and waits until the child read it: the
    /// hub writes in order, so whatever was forwarded before is in the log by then.
    fn barrier(&self, sid: &str) {
        static N: AtomicUsize = AtomicUsize::new(0);
        let marker = 990_000 + N.fetch_add(1, Ordering::Relaxed);
        let r = self.post(
            ALICE,
            &call(7, "add", &format!(r#"{{"a":{marker},"b":0}}"#)),
            Some(sid),
        );
        assert_eq!(r.status, 200, "barrier: {}", r.text());
        let deadline = Instant::now() + WAIT;
        while !self
            .child_lines()
            .iter()
            .any(|l| l.contains(&marker.to_string()))
        {
            assert!(Instant::now() < deadline, "barrier never reached the child");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The audit trail's complete lines (the writer may be in the middle of the last one).
    fn audit_lines(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.audit).unwrap_or_default();
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Waits for the approval audit event with `reason`.
    fn approval_event(&self, reason: &str) -> Value {
        self.audit_line_where(&format!("approval event {reason}"), |e| {
            e["method"] == "approval" && e["reason"] == reason
        })
    }

    /// Waits for the first audit line `wanted` picks (`what` names it in the failure).
    fn audit_line_where(&self, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(e) = self.audit_lines().into_iter().find(|e| wanted(e)) {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "no {what}: {:?}",
                self.audit_lines()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A POST whose answer is an SSE stream, read as it arrives.
struct Held {
    s: TcpStream,
    got: Vec<u8>,
}

impl Held {
    /// POSTs a call of a held tool and reads up to its elicitation request.
    fn call(lab: &Lab, key: &str, sid: &str, body: &str) -> Held {
        let mut s = connect(lab.addr());
        s.write_all(mcp_post_raw(body, Some(sid), &format!("{}{VERSION}", bearer(key))).as_bytes())
            .unwrap();
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut h = Held { s, got: Vec::new() };
        assert!(
            h.wait_for("elicitation/create", WAIT),
            "no elicitation request: {}",
            h.text()
        );
        assert!(h.text().starts_with("HTTP/1.1 200"), "{}", h.text());
        assert!(
            h.text()
                .to_ascii_lowercase()
                .contains("content-type: text/event-stream"),
            "{}",
            h.text()
        );
        h
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.got).into_owned()
    }

    fn read_some(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        match self.s.read(&mut buf) {
            Ok(0) => false,
            Ok(n) => {
                self.got.extend_from_slice(&buf[..n]);
                true
            }
            Err(e) => matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    }

    fn wait_for(&mut self, needle: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while !self.text().contains(needle) {
            if Instant::now() > deadline || !self.read_some() {
                return self.text().contains(needle);
            }
        }
        true
    }

    /// Reads until the stream ends (or the deadline).
    fn finish(&mut self) {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline && !self.text().ends_with("0\r\n\r\n") {
            if !self.read_some() {
                break;
            }
        }
    }

    fn messages(&self) -> Vec<Value> {
        self.text()
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .filter_map(|d| serde_json::from_str(d.trim()).ok())
            .collect()
    }

    /// The elicitation request.
    fn request(&self) -> Value {
        self.messages()
            .into_iter()
            .find(|m| m["method"] == "elicitation/create")
            .unwrap()
    }

    /// The answer to the call (`id`), once it arrived.
    fn answer(&mut self, id: u64) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(m) = self.messages().into_iter().find(|m| m["id"] == id) {
                return m;
            }
            assert!(
                Instant::now() < deadline && self.read_some(),
                "no answer to call {id}: {}",
                self.text()
            );
        }
    }
}

fn answer_body(id: &Value, result: Value) -> String {
    json!({"jsonrpc": "2.0", "id": id, "result": result}).to_string()
}

fn accept() -> Value {
    json!({"action": "accept", "content": {"approve": true}})
}

fn echo(id: u64, text: &str) -> String {
    call(id, "echo", &format!(r#"{{"text":"{text}"}}"#))
}

#[test]
fn an_accepted_call_goes_upstream_and_its_answer_arrives_on_the_same_stream() {
    let lab = lab(30);
    let sid = lab.eliciting(ALICE);
    let mut held = Held::call(&lab, ALICE, &sid, &echo(5, "approved-marker-1"));
    let req = held.request();
    let message = req["params"]["message"].as_str().unwrap();
    assert!(message.contains("echo"), "{message}");
    assert!(message.contains("approved-marker-1"), "{message}");
    assert_eq!(
        req["params"]["requestedSchema"]["properties"]["approve"]["type"],
        "boolean"
    );
    lab.barrier(&sid);
    lab.assert_child_never_saw("approved-marker-1");
    let r = lab.post(ALICE, &answer_body(&req["id"], accept()), Some(&sid));
    assert_eq!(r.status, 202, "{}", r.text());
    let answer = held.answer(5);
    assert_eq!(
        answer["result"]["content"][0]["text"], "approved-marker-1",
        "{answer}"
    );
    held.finish();
    assert!(
        lab.child_lines()
            .iter()
            .any(|l| l.contains("approved-marker-1"))
    );
    // The gateway's own elicitation request and the client's answer never reach the upstream.
    lab.assert_child_never_saw("mcp-guard-approval.");
    let event = lab.approval_event("approval_accepted");
    assert_eq!(event["identity"], "alice");
    assert_eq!(event["tool"], "echo");
    assert_eq!(event["decision"], "allow");
    assert!(event["session"].as_str().is_some_and(|s| s.len() == 16));
    assert_eq!(
        lab.g
            .metric_settles("mcp_guard_approvals_total", &[("outcome", "accepted")], 1.0),
        1.0
    );
}

#[test]
fn a_decline_a_cancel_an_error_or_an_accept_without_approve_refuses_the_call() {
    let lab = lab(30);
    let sid = lab.eliciting(ALICE);
    // Each answer's members besides `jsonrpc` and `id`, and the reason it is refused with.
    let cases = [
        (
            "approval_declined",
            json!({"result": {"action": "decline"}}),
        ),
        (
            "approval_cancelled",
            json!({"result": {"action": "cancel"}}),
        ),
        (
            "approval_declined",
            json!({"result": {"action": "accept", "content": {"approve": false}}}),
        ),
        (
            "approval_declined",
            json!({"result": {"action": "accept", "content": {}}}),
        ),
        (
            "approval_error",
            json!({"error": {"code": -1, "message": "no"}}),
        ),
        ("approval_error", json!({"result": "accept"})),
    ];
    let answer = |members: &Value, id: &Value| {
        let mut m = members.clone();
        m["jsonrpc"] = json!("2.0");
        m["id"] = id.clone();
        m.to_string()
    };
    for (i, (reason, members)) in cases.iter().enumerate() {
        let marker = format!("refused-marker-{i}");
        let id = 10 + i as u64;
        let mut held = Held::call(&lab, ALICE, &sid, &echo(id, &marker));
        let req = held.request();
        let r = lab.post(ALICE, &answer(members, &req["id"]), Some(&sid));
        assert_eq!(r.status, 202, "{}", r.text());
        let refused = held.answer(id);
        assert_eq!(refused["error"]["code"], -32003, "{refused}");
        assert_eq!(refused["error"]["data"]["reason"], *reason, "{refused}");
        lab.barrier(&sid);
        lab.assert_child_never_saw(&marker);
        lab.approval_event(reason);
    }
}

#[test]
fn an_unanswered_call_is_refused_when_its_time_is_up() {
    let lab = lab(1);
    let sid = lab.eliciting(ALICE);
    let mut held = Held::call(&lab, ALICE, &sid, &echo(3, "timeout-marker"));
    let req = held.request();
    let refused = held.answer(3);
    assert_eq!(
        refused["error"]["data"]["reason"], "approval_timeout",
        "{refused}"
    );
    // Too late: the id is spent.
    let r = lab.post(ALICE, &answer_body(&req["id"], accept()), Some(&sid));
    assert_eq!(r.status, 400, "{}", r.text());
    lab.barrier(&sid);
    lab.assert_child_never_saw("timeout-marker");
    lab.approval_event("approval_timeout");
}

#[test]
fn clients_that_cannot_elicit_are_refused_at_once() {
    let lab = lab(30);
    // No capability; an old revision asked at initialize; a url-only capability.
    let plain = lab.init_with(ALICE, &init_body("2025-11-25", "{}"));
    let old = lab.init_with(ALICE, &init_body("2025-03-26", r#"{"elicitation":{}}"#));
    let url_only = lab.init_with(
        ALICE,
        &init_body("2025-11-25", r#"{"elicitation":{"url":{}}}"#),
    );
    for (i, sid) in [&plain, &old, &url_only].into_iter().enumerate() {
        assert!(!sid.starts_with("e."), "flagged: {sid}");
        let r = lab.post(
            ALICE,
            &echo(4, &format!("unsupported-marker-{i}")),
            Some(sid),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let v = rpc_result(&r);
        assert_eq!(v["error"]["data"]["reason"], "approval_unsupported", "{v}");
    }
    // A client that adds the flag itself is not one of ours: unknown session.
    let forged = format!("e.{plain}");
    let r = lab.post(ALICE, &echo(4, "unsupported-marker-forged"), Some(&forged));
    assert_eq!(r.status, 404, "{}", r.text());
    // A flagged session speaking a revision before elicitation.
    let sid = lab.eliciting(ALICE);
    let r = request(
        lab.addr(),
        &mcp_post_raw(
            &echo(4, "unsupported-marker-old-header"),
            Some(&sid),
            &format!("{}MCP-Protocol-Version: 2025-03-26\r\n", bearer(ALICE)),
        ),
    );
    assert_eq!(
        rpc_result(&r)["error"]["data"]["reason"],
        "approval_unsupported",
        "{}",
        r.text()
    );
    lab.barrier(&plain);
    lab.assert_child_never_saw("unsupported-marker");
    lab.approval_event("approval_unsupported");
}

#[test]
fn forged_replayed_and_guessed_answers_are_refused_and_the_call_still_waits() {
    let lab = lab(30);
    let sid = lab.eliciting(ALICE);
    let other_sid = lab.eliciting(ALICE);
    let bob_sid = lab.eliciting(BOB);
    let mut held = Held::call(&lab, ALICE, &sid, &echo(6, "forged-marker"));
    let req = held.request();
    let id = req["id"].as_str().unwrap().to_string();
    let (head, _) = id.rsplit_once('.').unwrap();
    let refused = |key: &str, id: &str, sid: &str| {
        let r = lab.post(key, &answer_body(&json!(id), accept()), Some(sid));
        assert_eq!(r.status, 400, "{key} {id}: {}", r.text());
    };
    // Another identity, another session of the same identity, a guessed token, ids of the
    // wrong shape.
    refused(BOB, &id, &bob_sid);
    refused(ALICE, &id, &other_sid);
    refused(ALICE, &format!("{head}.{}", "0".repeat(32)), &sid);
    refused(ALICE, &format!("{head}.{}", "f".repeat(32)), &sid);
    refused(ALICE, "mcp-guard-approval.", &sid);
    refused(
        ALICE,
        &format!("mcp-guard-approval.77.{}", "0".repeat(32)),
        &sid,
    );
    refused(ALICE, &format!("{id}0"), &sid);
    // In a batch, or with no session at all.
    let batch = format!("[{}]", answer_body(&json!(id), accept()));
    let r = lab.post(ALICE, &batch, Some(&sid));
    assert!(r.status >= 400, "{}", r.text());
    let r = lab.post(ALICE, &answer_body(&json!(id), accept()), None);
    assert!(r.status >= 400, "{}", r.text());
    // The call still waits, and its own answer approves it.
    assert!(
        held.messages()
            .iter()
            .all(|m| m.get("id") != Some(&json!(6)))
    );
    let r = lab.post(ALICE, &answer_body(&json!(id), accept()), Some(&sid));
    assert_eq!(r.status, 202, "{}", r.text());
    let answer = held.answer(6);
    assert_eq!(answer["result"]["content"][0]["text"], "forged-marker");
    // Replayed: spent.
    refused(ALICE, &id, &sid);
    lab.barrier(&sid);
    lab.assert_child_never_saw("mcp-guard-approval.");
}

/// The worker that served a keep-alive connection's last answer (its `x-request-id` names it).
fn worker_of(r: &Response) -> String {
    r.header("x-request-id")
        .and_then(|id| id.split('-').nth(1))
        .expect("a request id naming its worker")
        .to_string()
}

#[test]
fn an_answer_that_lands_on_the_other_worker_is_handed_to_the_one_holding_the_call() {
    let lab = lab(30);
    let sid = lab.eliciting(ALICE);
    let mut held = Held::call(&lab, ALICE, &sid, &echo(8, "cross-worker-marker"));
    let req = held.request();
    let owner: usize = req["id"]
        .as_str()
        .unwrap()
        .split('.')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let owner = format!("{owner:02x}");
    let headers = format!("{}{VERSION}", bearer(ALICE));
    // Open connections until one is served by the other worker, then answer on it.
    let mut answered = None;
    for attempt in 0..200 {
        let mut s = connect(lab.addr());
        s.write_all(
            mcp_post_raw(
                &format!(r#"{{"jsonrpc":"2.0","id":{attempt},"method":"ping"}}"#),
                Some(&sid),
                &headers,
            )
            .as_bytes(),
        )
        .unwrap();
        let ping = read_response(&mut s).unwrap();
        assert_eq!(ping.status, 200, "{}", ping.text());
        if worker_of(&ping) == owner {
            continue;
        }
        s.write_all(
            mcp_post_raw(&answer_body(&req["id"], accept()), Some(&sid), &headers).as_bytes(),
        )
        .unwrap();
        let r = read_response(&mut s).unwrap();
        assert_ne!(
            worker_of(&r),
            owner,
            "the answer's connection moved workers"
        );
        answered = Some(r);
        break;
    }
    let r = answered.expect("no connection reached the other worker");
    assert_eq!(r.status, 202, "{}", r.text());
    let answer = held.answer(8);
    assert_eq!(
        answer["result"]["content"][0]["text"],
        "cross-worker-marker"
    );
}

#[test]
fn a_tool_not_listed_is_not_held() {
    let lab = lab(30);
    let sid = lab.eliciting(ALICE);
    let r = lab.post(ALICE, &call(2, "add", r#"{"a":1,"b":2}"#), Some(&sid));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = rpc_result(&r);
    assert_eq!(v["result"]["content"][0]["text"], "3", "{v}");
    assert!(!r.text().contains("elicitation/create"));
    // Clients that cannot elicit call it as before.
    let plain = lab.init_with(ALICE, &init_body("2025-11-25", "{}"));
    let r = lab.post(ALICE, &call(3, "add", r#"{"a":1,"b":2}"#), Some(&plain));
    assert_eq!(rpc_result(&r)["result"]["content"][0]["text"], "3");
}

#[test]
fn a_client_that_closes_the_stream_cancels_the_call() {
    let lab = lab(30);
    let sid = lab.eliciting(ALICE);
    let held = Held::call(&lab, ALICE, &sid, &echo(9, "closed-marker"));
    let req = held.request();
    drop(held);
    let event = lab.approval_event("approval_disconnected");
    assert_eq!(event["identity"], "alice");
    let r = lab.post(ALICE, &answer_body(&req["id"], accept()), Some(&sid));
    assert_eq!(r.status, 400, "{}", r.text());
    lab.barrier(&sid);
    lab.assert_child_never_saw("closed-marker");
}

#[test]
fn the_upstreams_own_elicitation_still_round_trips() {
    let lab = lab(30);
    let sid = lab.eliciting(ALICE);
    // The demo server's request goes to the session's GET stream.
    let mut stream = connect(lab.addr());
    write!(
        stream,
        "GET /mcp HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n{}{VERSION}Mcp-Session-Id: {sid}\r\n\r\n",
        bearer(ALICE)
    )
    .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut st = Held {
        s: stream,
        got: Vec::new(),
    };
    assert!(st.wait_for("\r\n\r\n", WAIT));
    let addr = lab.addr();
    let sid2 = sid.clone();
    let ask = std::thread::spawn(move || {
        request(
            addr,
            &mcp_post_raw(
                &call(4, "ask_client", r#"{"method":"elicitation/create"}"#),
                Some(&sid2),
                &format!("{}{VERSION}", bearer(ALICE)),
            ),
        )
    });
    assert!(st.wait_for("elicitation/create", WAIT), "{}", st.text());
    let req = st.request();
    assert!(
        !req["id"]
            .as_str()
            .is_some_and(|s| s.starts_with("mcp-guard-approval."))
    );
    let r = lab.post(
        ALICE,
        &answer_body(
            &req["id"],
            json!({"action": "accept", "content": {"from": "upstream-own"}}),
        ),
        Some(&sid),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let r = ask.join().unwrap();
    assert!(
        rpc_result(&r).to_string().contains("upstream-own"),
        "{}",
        r.text()
    );
}

#[test]
fn approval_settings_are_validated() {
    let check = |t: &str| {
        let text = format!("[upstream]\ncommand = \"x\"\n[approval]\n{t}\n");
        mcp_guard::config::parse_str(&text, &|_| None)
            .map_err(|e| e.to_string())
            .and_then(|f| mcp_guard::config::validate(&f).map_err(|e| e.to_string()))
            .map(|s| s.approval.is_some())
    };
    assert_eq!(check("tools = [\"delete_*\"]"), Ok(true));
    assert_eq!(check("tools = []"), Ok(false));
    assert_eq!(check(""), Ok(false));
    for (bad, key) in [
        ("tools = [\"x\"]\ntimeout_secs = 0", "approval.timeout_secs"),
        (
            "tools = [\"x\"]\ntimeout_secs = 3601",
            "approval.timeout_secs",
        ),
        ("tools = [\"\"]", "approval.tools"),
        ("tools = [\"a\\nb\"]", "approval.tools"),
        ("tools = \"x\"", "approval.tools"),
        ("unknown = 1", "unknown"),
    ] {
        let e = check(bad).unwrap_err();
        assert!(e.contains(key), "{bad}: {e}");
    }
}

#[test]
fn over_an_http_upstream_json_and_sse_answers_arrive_on_the_held_stream() {
    for extra in [&[][..], &["--sse-responses"][..]] {
        let demo = DemoHttp::start(extra);
        let lab = http_lab(&demo.url(), "echo", 10);
        let sid = lab.eliciting(ALICE);
        let mut held = Held::call(&lab, ALICE, &sid, &echo(12, "http-marker"));
        let req = held.request();
        let r = lab.post(ALICE, &answer_body(&req["id"], accept()), Some(&sid));
        assert_eq!(r.status, 202, "{extra:?}: {}", r.text());
        let answer = held.answer(12);
        assert_eq!(
            answer["result"]["content"][0]["text"], "http-marker",
            "{extra:?}: {answer}"
        );
        held.finish();
        assert!(
            held.text().ends_with("0\r\n\r\n"),
            "{extra:?}: the stream did not end"
        );
        // Declined: refused, and the stream ends.
        let mut held = Held::call(&lab, ALICE, &sid, &echo(13, "http-declined"));
        let req = held.request();
        lab.post(
            ALICE,
            &answer_body(&req["id"], json!({"action": "decline"})),
            Some(&sid),
        );
        assert_eq!(
            held.answer(13)["error"]["data"]["reason"],
            "approval_declined"
        );
    }
}

#[test]
fn an_approved_calls_sse_answer_that_stalls_past_its_timeout_ends_with_the_timeout_error() {
    // The held stream is the client's only way to its answer: an SSE answer that stops short
    // (here, the upstream's time for the call, 1 s, runs out between progress steps) leaves
    // the call its error in its place, not a stream that ends with no answer.
    let demo = DemoHttp::start(&["--sse-responses", "--test-tools"]);
    let lab = http_lab(&demo.url(), "slow_progress", 1);
    let call = r#"{"jsonrpc":"2.0","id":14,"method":"tools/call","params":{"name":"slow_progress","arguments":{"steps":3,"ms":600},"_meta":{"progressToken":"p"}}}"#;
    let mut held = approved(&lab, call);
    let answer = held.answer(14);
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("in time")),
        "{answer}"
    );
    held.finish();
    assert!(held.text().ends_with("0\r\n\r\n"), "the stream did not end");
    // Audited when approved, and again, as a call that failed upstream, when it timed out.
    let line = lab.audit_line_where("line for the failure", |l| {
        l["method"] == "tools/call" && l["decision"] == "error"
    });
    assert_eq!(line["reason"], "upstream_timeout", "{line}");
    assert_eq!(line["tool"], "slow_progress", "{line}");
    assert_eq!(line["identity"], "alice", "{line}");
}

/// `call`, sent in an eliciting session of alice's, held, and accepted.
fn approved(lab: &Lab, call: &str) -> Held {
    let sid = lab.eliciting(ALICE);
    let held = Held::call(lab, ALICE, &sid, call);
    let req = held.request();
    let r = lab.post(ALICE, &answer_body(&req["id"], accept()), Some(&sid));
    assert_eq!(r.status, 202, "{}", r.text());
    held
}

/// An HTTP upstream answering `initialize` (with a session) and every other POST with the JSON
/// `answer`, a connection each.
fn upstream_answering(answer: &'static str) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut buf = vec![0u8; 65536];
            let n = conn.read(&mut buf).unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]);
            let (body, session) = if req.contains("\"initialize\"") {
                (
                    r#"{"jsonrpc":"2.0","id":1,"result":{"protocolVersion":"2025-11-25","capabilities":{"tools":{}},"serverInfo":{"name":"scripted","version":"1"}}}"#,
                    "Mcp-Session-Id: s1\r\n",
                )
            } else if req.starts_with("POST") && req.contains("\"id\"") {
                (answer, "")
            } else {
                let _ = conn.write_all(
                    b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                continue;
            };
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{session}Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    url
}

#[test]
fn an_approved_calls_json_answer_without_its_response_leaves_it_the_gateways_error() {
    // Red team: a JSON answer holding another id's response (or only a notification) was
    // relayed and the held stream ended with the call unanswered.
    let url = upstream_answering(r#"{"jsonrpc":"2.0","id":999,"result":{"content":[]}}"#);
    let lab = http_lab(&url, "echo", 10);
    let mut held = approved(&lab, &echo(16, "unanswered"));
    let answer = held.answer(16);
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("without a response")),
        "{answer}"
    );
    held.finish();
    assert!(held.text().ends_with("0\r\n\r\n"), "the stream did not end");
}

#[test]
fn a_legacy_sse_client_cannot_approve_and_is_told_so_on_its_stream() {
    let lab = lab(30);
    let mut s = common::legacy::Legacy::open(lab.addr(), "/sse", ALICE);
    s.initialize();
    let r = s.call(&echo(3, "legacy-marker"));
    assert_eq!(r["error"]["code"], -32003, "{r}");
    assert_eq!(r["error"]["data"]["reason"], "approval_unsupported", "{r}");
    // Not held: a tool not listed still works on the same session.
    let r = s.call(&call(4, "add", r#"{"a":2,"b":2}"#));
    assert_eq!(r["result"]["content"][0]["text"], "4", "{r}");
    // A refusal answered on the stream (the POST gets 202) is audited as one, not as allowed.
    let batch = r#"[{"jsonrpc":"2.0","id":6,"method":"tools/call","params":{"name":"echo","arguments":{"text":"legacy-marker"}}}]"#;
    assert_eq!(s.post(batch).status, 202);
    let deadline = Instant::now() + WAIT;
    let event = loop {
        if let Some(e) = lab
            .audit_lines()
            .into_iter()
            .find(|e| e["method"] == "tools/call" && e["reason"] == "invalid_request")
        {
            break e;
        }
        assert!(Instant::now() < deadline, "{:?}", lab.audit_lines());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(event["decision"], "error", "{event}");
    let sid = lab.eliciting(ALICE);
    lab.barrier(&sid);
    lab.assert_child_never_saw("legacy-marker");
}

#[test]
fn the_calls_one_session_may_hold_are_bounded() {
    let lab = lab(30);
    let sid = lab.eliciting(ALICE);
    let headers = format!("{}{VERSION}", bearer(ALICE));
    let mut held = Vec::new();
    let mut full = None;
    // At most 16 per session, however the calls spread over the two workers.
    for i in 0..33u64 {
        let mut s = connect(lab.addr());
        s.write_all(
            mcp_post_raw(&echo(100 + i, "bounded-marker"), Some(&sid), &headers).as_bytes(),
        )
        .unwrap();
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut h = Held { s, got: Vec::new() };
        assert!(h.wait_for("\r\n\r\n", WAIT), "{}", h.text());
        if h.text().contains("text/event-stream") {
            assert!(h.wait_for("elicitation/create", WAIT), "{}", h.text());
            held.push(h);
        } else {
            assert!(h.wait_for("approval_full", WAIT), "{}", h.text());
            full = Some(i);
            break;
        }
    }
    assert!(full.is_some(), "33 calls held in one session");
    // 16 per session across both workers, not 16 on each.
    assert_eq!(held.len(), 16, "refused after {} held", held.len());
    // Another session is not affected.
    let other = lab.eliciting(ALICE);
    let mut h = Held::call(&lab, ALICE, &other, &echo(200, "bounded-other"));
    let req = h.request();
    lab.post(ALICE, &answer_body(&req["id"], accept()), Some(&other));
    assert_eq!(
        h.answer(200)["result"]["content"][0]["text"],
        "bounded-other"
    );
    lab.approval_event("approval_full");
    assert!(
        lab.g
            .metric_settles("mcp_guard_approvals_total", &[("outcome", "full")], 1.0)
            >= 1.0
    );
    // Closing the held streams frees their places.
    drop(held);
    let deadline = Instant::now() + WAIT;
    loop {
        let mut s = connect(lab.addr());
        s.write_all(mcp_post_raw(&echo(300, "bounded-after"), Some(&sid), &headers).as_bytes())
            .unwrap();
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut h = Held { s, got: Vec::new() };
        if h.wait_for("elicitation/create", Duration::from_secs(1)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "places never freed: {}",
            h.text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    lab.barrier(&sid);
    lab.assert_child_never_saw("bounded-marker");
}

#[test]
fn one_identity_cannot_fill_every_place_and_lock_others_out() {
    // Sessions are free to open: a key spreading its calls over many sessions still holds at
    // most 64 per worker, and another identity's call is still held and approved.
    let lab = lab(30);
    let headers = format!("{}{VERSION}", bearer(BOB));
    let mut held = Vec::new();
    let mut full = false;
    let mut sid = lab.eliciting(BOB);
    for i in 0..200u64 {
        if i % 8 == 7 {
            sid = lab.eliciting(BOB);
        }
        let mut s = connect(lab.addr());
        s.write_all(mcp_post_raw(&echo(100 + i, "flood-marker"), Some(&sid), &headers).as_bytes())
            .unwrap();
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut h = Held { s, got: Vec::new() };
        assert!(h.wait_for("\r\n\r\n", WAIT), "{}", h.text());
        if h.text().contains("text/event-stream") {
            assert!(h.wait_for("elicitation/create", WAIT), "{}", h.text());
            held.push(h);
        } else {
            assert!(h.wait_for("approval_full", WAIT), "{}", h.text());
            full = true;
            break;
        }
    }
    assert!(full, "{} calls of one identity held", held.len());
    assert!(held.len() <= 128, "{} held on two workers", held.len());
    let other = lab.eliciting(ALICE);
    let mut h = Held::call(&lab, ALICE, &other, &echo(500, "not-locked-out"));
    let req = h.request();
    lab.post(ALICE, &answer_body(&req["id"], accept()), Some(&other));
    assert_eq!(
        h.answer(500)["result"]["content"][0]["text"],
        "not-locked-out"
    );
    drop(held);
    lab.barrier(&other);
    lab.assert_child_never_saw("flood-marker");
}

#[test]
fn arguments_that_cannot_be_shown_faithfully_are_refused_before_anyone_is_asked() {
    let lab = lab(30);
    let sid = lab.eliciting(ALICE);
    // The person would read the last copy; an upstream keeping the first would run the other.
    let twice = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"echo","arguments":{"text":"EVIL-dup","text":"SAFE-dup"}}}"#;
    let r = lab.post(ALICE, twice, Some(&sid));
    let text = r.text();
    assert!(!text.contains("elicitation/create"), "{text}");
    assert!(text.contains("repeat a member"), "{text}");
    lab.barrier(&sid);
    lab.assert_child_never_saw("EVIL-dup");
}

/// `notifications/cancelled` for `call`, as a client withdrawing it sends it.
fn cancelled(call: u64) -> String {
    format!(
        r#"{{"jsonrpc":"2.0","method":"notifications/cancelled","params":{{"requestId":{call},"reason":"user gave up"}}}}"#
    )
}

#[test]
fn a_cancel_from_the_calls_own_session_ends_its_wait_and_no_other_can() {
    let lab = lab(30);
    let sid = lab.eliciting(ALICE);
    let mut held = Held::call(&lab, ALICE, &sid, &echo(40, "withdrawn-marker"));
    // Another session of the same identity, and another identity, name the same request id:
    // nothing happens to the held call (their cancels go upstream as any notification).
    let other = lab.eliciting(ALICE);
    assert_eq!(lab.post(ALICE, &cancelled(40), Some(&other)).status, 202);
    let bobs = lab.eliciting(BOB);
    assert_eq!(lab.post(BOB, &cancelled(40), Some(&bobs)).status, 202);
    assert!(
        !held.wait_for("\"id\":40", Duration::from_millis(300)),
        "a stranger's cancel ended the call: {}",
        held.text()
    );
    let cancels_upstream = || {
        lab.child_lines()
            .iter()
            .filter(|l| l.contains("notifications/cancelled"))
            .count()
    };
    lab.barrier(&sid);
    let before = cancels_upstream();
    // The call's own session: the wait ends at once, refused as cancelled.
    let r = lab.post(ALICE, &cancelled(40), Some(&sid));
    assert_eq!(r.status, 202, "{}", r.text());
    let refused = held.answer(40);
    assert_eq!(
        refused["error"]["data"]["reason"], "approval_cancelled",
        "{refused}"
    );
    held.finish();
    let event = lab.approval_event("approval_cancelled");
    assert_eq!(event["identity"], "alice");
    assert_eq!(event["tool"], "echo");
    lab.barrier(&sid);
    lab.assert_child_never_saw("withdrawn-marker");
    // The matching cancel named a call the upstream never saw: it was not forwarded either.
    assert_eq!(cancels_upstream(), before, "{:?}", lab.child_lines());
    // Its place was given back: the session can hold calls again, and they can be approved.
    let mut again = Held::call(&lab, ALICE, &sid, &echo(41, "after-cancel"));
    let req = again.request();
    lab.post(ALICE, &answer_body(&req["id"], accept()), Some(&sid));
    assert_eq!(
        again.answer(41)["result"]["content"][0]["text"],
        "after-cancel"
    );
}

#[test]
fn answered_calls_give_their_places_back() {
    // More answered calls in one session than it may hold at once: each answer frees its
    // place (an answer that removed the entry once left the count behind).
    let lab = lab(30);
    let sid = lab.eliciting(ALICE);
    for i in 0..20u64 {
        let mut h = Held::call(&lab, ALICE, &sid, &echo(600 + i, "many-answers"));
        let req = h.request();
        let decline = json!({"action": "decline"});
        assert_eq!(
            lab.post(ALICE, &answer_body(&req["id"], decline), Some(&sid))
                .status,
            202
        );
        assert_eq!(
            h.answer(600 + i)["error"]["data"]["reason"],
            "approval_declined"
        );
        h.finish();
    }
}

#[test]
fn an_http_1_0_client_is_told_it_cannot_be_asked() {
    let lab = lab(30);
    let sid = lab.eliciting(ALICE);
    // An HTTP/1.0 client cannot read a chunked stream: it gets a plain JSON answer saying why.
    let raw = mcp_post_raw(
        &echo(50, "http10-marker"),
        Some(&sid),
        &format!("{}{VERSION}", bearer(ALICE)),
    )
    .replacen("HTTP/1.1", "HTTP/1.0", 1);
    let mut s = connect(lab.addr());
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let text = String::from_utf8_lossy(&got).into_owned();
    assert!(
        text.starts_with("HTTP/1.") && text[..12].ends_with("200"),
        "{text}"
    );
    assert!(!text.to_ascii_lowercase().contains("chunked"), "{text}");
    let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
    let m: Value = serde_json::from_str(body).unwrap();
    assert_eq!(m["id"], 50);
    assert_eq!(m["error"]["data"]["reason"], "approval_unsupported", "{m}");
    assert!(
        m["error"]["message"].as_str().unwrap().contains("HTTP/1.0"),
        "{m}"
    );
    lab.approval_event("approval_unsupported");
    lab.barrier(&sid);
    lab.assert_child_never_saw("http10-marker");
}
