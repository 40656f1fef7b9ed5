//! Argument constraints (`[[tool_rules]]`), shadow policies and decisions on the
//! `Mcp-Method` / `Mcp-Name` head, through the real binary with the demo server as a stdio
//! upstream that logs every line it receives (`--log-input`): a refused call must never be in
//! that log.

mod common;

use common::*;
use mcp_guard::cli::hash_key;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

const ALICE: &str = "alice-key-6f1c2d";
const BOB: &str = "bob-key-9a8b7c";
const CI: &str = "ci-key-77aa01";

/// Rules on `echo` for everyone, one on `add` for `ci-*` only, a shadow rule on `echo`'s
/// `/note`; alice may call echo and add (never crash); bob anything; ci-1 too.
fn rules_config(log: &Path, extra: &str, alice_extra: &str) -> String {
    format!(
        r#"{}
[[auth.api_keys]]
id = "alice"
key_hash = "{}"
allowed_tools = ["echo", "add", "crash"]
denied_tools = ["crash"]
{alice_extra}

[[auth.api_keys]]
id = "bob"
key_hash = "{}"

[[auth.api_keys]]
id = "ci-1"
key_hash = "{}"

[[tool_rules]]
tool = "echo"
[[tool_rules.args]]
pointer = "/path"
path_under = ["/srv/data"]
[[tool_rules.args]]
pointer = "/mode"
regex = "^(ro|rw)$"
[[tool_rules.args]]
pointer = "/opts/depth"
type = "integer"
min = 0
max = 5
[[tool_rules.args]]
pointer = "/kind"
one_of = ["a", "b"]
[[tool_rules.args]]
pointer = "/file"
glob = ["*.md"]
[[tool_rules.args]]
pointer = "/text"
max_len = 16
[[tool_rules.args]]
pointer = "/flag"
type = "boolean"

[[tool_rules]]
tool = "add"
identities = ["ci-*"]
[[tool_rules.args]]
pointer = "/a"
required = true
max = 10

[[tool_rules]]
tool = "ec*"
mode = "shadow"
[[tool_rules.args]]
pointer = "/note"
max_len = 3

[[tool_rules]]
tool = "echo"
server = "other"
[[tool_rules.args]]
pointer = "/text"
required = true

[[upstream.servers]]
name = "other"
transport = "stdio"
command = {DEMO:?}
args = ["--test-tools"]

{extra}
"#,
        // A short body deadline: a test sending a head whose body never comes waits this long.
        stdio_config(
            "auto",
            "body_timeout_secs = 1",
            &["--test-tools", "--log-input", log.to_str().unwrap()]
        ),
        hash_key(ALICE),
        hash_key(BOB),
        hash_key(CI),
    )
}

struct Setup {
    g: Gateway,
    log: std::path::PathBuf,
    audit: std::path::PathBuf,
    /// bob's session for barrier calls ([`never_forwarded`]).
    barrier: std::cell::OnceCell<String>,
    barriers: std::cell::Cell<u64>,
    _dir: tempfile::TempDir,
}

fn start(extra: &str, alice_extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("upstream.log");
    let audit = dir.path().join("audit.jsonl");
    let extra = format!(
        "{extra}\n[audit]\nfile = {:?}\ninclude_arguments = false\n",
        audit.to_str().unwrap()
    );
    let g = Gateway::start(&rules_config(&log, &extra, alice_extra));
    Setup {
        g,
        log,
        audit,
        barrier: std::cell::OnceCell::new(),
        barriers: std::cell::Cell::new(0),
        _dir: dir,
    }
}

fn key_header(key: &str) -> String {
    format!("Authorization: Bearer {key}\r\n")
}

fn init_as(addr: std::net::SocketAddr, key: &str) -> String {
    let r = request(addr, &mcp_post_raw(INIT, None, &key_header(key)));
    assert_eq!(r.status, 200, "initialize: {}", r.text());
    let sid = r.header("mcp-session-id").unwrap().to_string();
    let n = request(
        addr,
        &mcp_post_raw(
            r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
            Some(&sid),
            &key_header(key),
        ),
    );
    assert_eq!(n.status, 202);
    sid
}

/// `args` (a JSON object) with a member `tag` naming the call: the stdio hub remaps ids, so
/// the upstream log is searched for the tag.
fn tagged(id: u64, args: &str) -> String {
    let rest = args.trim_start().strip_prefix('{').unwrap_or("}");
    let sep = if rest.trim_start().starts_with('}') {
        ""
    } else {
        ","
    };
    format!(r#"{{"tag":"call-{id}"{sep}{rest}"#)
}

/// A tagged tools/call body.
fn tcall(id: u64, tool: &str, args: &str) -> String {
    call(id, tool, &tagged(id, args))
}

/// A call with a unique id and tag (so the upstream log can be searched for it).
fn call_as(s: &Setup, key: &str, sid: &str, id: u64, tool: &str, args: &str) -> Response {
    request(
        s.g.addr,
        &mcp_post_raw(&tcall(id, tool, args), Some(sid), &key_header(key)),
    )
}

/// Whether the upstream received the call tagged `id` (waits briefly for a forwarded one to
/// be logged; a refused one is never there).
fn upstream_saw(s: &Setup, id: u64) -> bool {
    let needle = format!("\"call-{id}\"");
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let text = std::fs::read_to_string(&s.log).unwrap_or_default();
        if text.contains(&needle) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(30));
    }
}

/// Whether the upstream never received the call tagged `id`. The stdio upstream is one child
/// reading one pipe in order: once a call sent after the refused one has been logged, the
/// refused one would have been too (no waiting out a deadline).
fn never_forwarded(s: &Setup, id: u64) -> bool {
    let sid = s.barrier.get_or_init(|| init_as(s.g.addr, BOB));
    let n = s.barriers.get() + 1;
    s.barriers.set(n);
    let barrier = 1_000_000 + n;
    let r = call_as(s, BOB, sid, barrier, "echo", r#"{"text":"barrier"}"#);
    assert!(
        upstream_saw(s, barrier),
        "the barrier call was not forwarded: {}",
        r.text()
    );
    let text = std::fs::read_to_string(&s.log).unwrap_or_default();
    !text.contains(&format!("\"call-{id}\""))
}

/// Asserts the reply is the argument refusal naming `pointer` and `check`, and that the
/// upstream never saw the call.
fn assert_refused(s: &Setup, r: &Response, id: u64, pointer: &str, check: &str) {
    assert_eq!(r.status, 200, "{}", r.text());
    let m = rpc_result(r);
    assert_eq!(m["id"], id, "{m}");
    assert_eq!(m["error"]["code"], -32003, "{m}");
    assert_eq!(m["error"]["data"]["reason"], "argument_refused", "{m}");
    assert_eq!(m["error"]["data"]["pointer"], pointer, "{m}");
    assert_eq!(m["error"]["data"]["check"], check, "{m}");
    let msg = m["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(pointer) && msg.contains("tool_rules["),
        "{msg}"
    );
    assert!(never_forwarded(s, id), "the upstream saw refused call {id}");
}

fn assert_forwarded(s: &Setup, r: &Response, id: u64) {
    assert_eq!(r.status, 200, "{}", r.text());
    let m = rpc_result(r);
    assert!(
        m["error"]["data"]["reason"] != "argument_refused",
        "call {id} was refused: {m}"
    );
    assert!(
        upstream_saw(s, id),
        "the upstream never saw call {id}: {} {}",
        r.text(),
        std::fs::read_to_string(&s.log).unwrap_or_default()
    );
}

fn audit_lines(s: &Setup, at_least: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&s.audit).unwrap_or_default();
        // Complete lines only: the writer may be in the middle of the last one.
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        let lines: Vec<serde_json::Value> = complete
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.len() >= at_least || Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn each_check_passes_and_refuses() {
    let s = start("[rate_limit]\nenabled = false", "");
    let sid = init_as(s.g.addr, ALICE);
    let ok = r#"{"text":"hi","path":"/srv/data/a.txt","mode":"ro","opts":{"depth":5},"kind":"a","file":"x.md","flag":true}"#;
    let r = call_as(&s, ALICE, &sid, 100, "echo", ok);
    assert_forwarded(&s, &r, 100);
    let refused = [
        (r#"{"path":"/etc/passwd"}"#, "/path", "path_under"),
        (r#"{"mode":"ro "}"#, "/mode", "regex"),
        (r#"{"opts":{"depth":6}}"#, "/opts/depth", "max"),
        (r#"{"opts":{"depth":-1}}"#, "/opts/depth", "min"),
        (r#"{"opts":{"depth":2.5}}"#, "/opts/depth", "type"),
        (r#"{"kind":"c"}"#, "/kind", "one_of"),
        (r#"{"file":"x.mdx"}"#, "/file", "glob"),
        (r#"{"text":"seventeen chars!!"}"#, "/text", "max_len"),
        (r#"{"flag":"true"}"#, "/flag", "type"),
    ];
    for (i, (args, pointer, check)) in refused.iter().enumerate() {
        let id = 101 + i as u64;
        let r = call_as(&s, ALICE, &sid, id, "echo", args);
        assert_refused(&s, &r, id, pointer, check);
    }
    // `max_len` counts characters: 16 two-byte characters pass.
    let r = call_as(
        &s,
        ALICE,
        &sid,
        120,
        "echo",
        &format!(r#"{{"text":"{}"}}"#, "é".repeat(16)),
    );
    assert_forwarded(&s, &r, 120);
    // `required`, on `add` for ci-* identities.
    let ci = init_as(s.g.addr, CI);
    let r = call_as(&s, CI, &ci, 121, "add", r#"{"b":1}"#);
    assert_refused(&s, &r, 121, "/a", "required");
    let r = call_as(&s, CI, &ci, 122, "add", r#"{"a":3,"b":1}"#);
    assert_forwarded(&s, &r, 122);
    assert!(
        s.g.metric_settles(
            "mcp_guard_argument_refusals_total",
            &[("mode", "enforce")],
            10.0
        ) >= 10.0
    );
    // The audit trail says which argument and which check, never the value.
    let lines = audit_lines(&s, 10);
    let refusal = lines
        .iter()
        .find(|l| l["reason"] == "argument_refused" && l["details"]["pointer"] == "/path")
        .expect("an argument_refused audit event");
    assert_eq!(refusal["decision"], "deny");
    assert_eq!(refusal["details"]["check"], "path_under");
    assert_eq!(
        refusal["details"]["rule"], 0,
        "the rule index stays a number"
    );
    assert_eq!(refusal["tool"], "echo");
    assert!(
        !std::fs::read_to_string(&s.audit)
            .unwrap()
            .contains("/etc/passwd")
    );
}

#[test]
fn hostile_paths_are_refused() {
    let s = start("[rate_limit]\nenabled = false", "");
    let sid = init_as(s.g.addr, BOB);
    let hostile = [
        "/srv/data/../../etc/passwd",
        "/srv/data/%2e%2e/x",
        "/srv/data/%2E%2E/%2e%2e/etc/passwd",
        "/srv/data//..//x",
        "/srv/data/%252e%252e/x",
        "/srv/database",
        "/srv/database/x",
        "/srv/data/../data/x",
        "srv/data/x",
        "/srv/data/\\u0000x",
        "/srv/data/%00",
        "/srv/data\\\\..\\\\etc",
        "/srv/data/%5c..",
        "/srv/data/\u{ff0e}\u{ff0e}/x",
        "/srv/data/\\uff0e\\uff0e/x",
        "/srv/data/\u{2025}/x",
    ];
    for (i, p) in hostile.iter().enumerate() {
        let id = 200 + i as u64;
        let r = call_as(&s, BOB, &sid, id, "echo", &format!(r#"{{"path":"{p}"}}"#));
        assert_refused(&s, &r, id, "/path", "path_under");
    }
    for (i, p) in [
        "/srv/data",
        "/srv/data/a/../b",
        "/srv/data//x/./y",
        "/srv/data/%61.txt",
    ]
    .iter()
    .enumerate()
    {
        let id = 250 + i as u64;
        let r = call_as(&s, BOB, &sid, id, "echo", &format!(r#"{{"path":"{p}"}}"#));
        assert_forwarded(&s, &r, id);
    }
}

#[test]
fn duplicates_strings_for_numbers_and_huge_values_are_refused() {
    let s = start("[rate_limit]\nenabled = false", "");
    let sid = init_as(s.g.addr, BOB);
    let cases = [
        // A pointer target given twice, at each level of the path.
        (
            r#"{"path":"/srv/data/x","path":"/etc/passwd"}"#,
            "/path",
            "duplicate_member",
        ),
        (
            r#"{"opts":{"depth":1},"opts":{"depth":99}}"#,
            "/opts/depth",
            "duplicate_member",
        ),
        (
            r#"{"opts":{"depth":1,"depth":99}}"#,
            "/opts/depth",
            "duplicate_member",
        ),
        // A member a case-folding decoder would read as the pointer's.
        (
            r#"{"path":"/srv/data/x","PATH":"/etc/passwd"}"#,
            "/path",
            "duplicate_member",
        ),
        // A number sent as a string to dodge `max`.
        (r#"{"opts":{"depth":"99"}}"#, "/opts/depth", "type"),
        (r#"{"opts":{"depth":99.0}}"#, "/opts/depth", "type"),
        (r#"{"opts":{"depth":1e3}}"#, "/opts/depth", "type"),
        // A lookalike of `ro` (Cyrillic о).
        ("{\"mode\":\"r\u{43e}\"}", "/mode", "regex"),
    ];
    for (i, (args, pointer, check)) in cases.iter().enumerate() {
        let id = 300 + i as u64;
        let r = call_as(&s, BOB, &sid, id, "echo", args);
        assert_refused(&s, &r, id, pointer, check);
    }
    // `arguments` itself given twice.
    let body = r#"{"jsonrpc":"2.0","id":320,"method":"tools/call","params":{"name":"echo","arguments":{"tag":"call-320","path":"/srv/data/x"},"arguments":{"tag":"call-320","path":"/etc/passwd"}}}"#;
    let r = request(s.g.addr, &mcp_post_raw(body, Some(&sid), &key_header(BOB)));
    assert_eq!(rpc_result(&r)["error"]["data"]["check"], "duplicate_member");
    assert!(never_forwarded(&s, 320));
    // A huge value is refused without being echoed.
    let huge = "x".repeat(1 << 20);
    let r = call_as(
        &s,
        BOB,
        &sid,
        321,
        "echo",
        &format!(r#"{{"text":"{huge}"}}"#),
    );
    assert_refused(&s, &r, 321, "/text", "max_len");
    assert!(r.body.len() < 1024, "the refusal echoes the value");
}

#[test]
fn rules_scoped_to_another_server_or_identity_do_not_apply() {
    let s = start("[rate_limit]\nenabled = false", "");
    // The `add` rule is for ci-* only: bob calls add without `a`.
    let sid = init_as(s.g.addr, BOB);
    let r = call_as(&s, BOB, &sid, 400, "add", r#"{"a":50,"b":1}"#);
    assert_forwarded(&s, &r, 400);
    // The rule on server "other" requires /text; on the default server it does not apply.
    let r = call_as(&s, BOB, &sid, 401, "echo", r#"{}"#);
    assert_forwarded(&s, &r, 401);
    let other = request(
        s.g.addr,
        &mcp_post_raw_at("/mcp/other", INIT, None, &key_header(BOB)),
    );
    let osid = other.header("mcp-session-id").unwrap().to_string();
    let r = request(
        s.g.addr,
        &mcp_post_raw_at(
            "/mcp/other",
            &tcall(402, "echo", "{}"),
            Some(&osid),
            &key_header(BOB),
        ),
    );
    let m = rpc_result(&r);
    assert_eq!(m["error"]["data"]["pointer"], "/text", "{m}");
    assert_eq!(m["error"]["data"]["rule"], 3, "{m}");
}

#[test]
fn a_batch_with_a_refused_argument_is_refused_whole() {
    let s = start("[rate_limit]\nenabled = false", "");
    let sid = init_as(s.g.addr, BOB);
    let batch = format!(
        "[{},{}]",
        tcall(500, "echo", r#"{"text":"a"}"#),
        tcall(501, "echo", r#"{"path":"/etc/passwd"}"#)
    );
    let r = request(
        s.g.addr,
        &mcp_post_raw(
            &batch,
            Some(&sid),
            &format!("{}MCP-Protocol-Version: 2025-03-26\r\n", key_header(BOB)),
        ),
    );
    let arr = r.json();
    let arr = arr.as_array().unwrap();
    assert_eq!(arr.len(), 2);
    assert_eq!(arr[0]["error"]["data"]["reason"], "batch_refused");
    assert_eq!(arr[1]["error"]["data"]["reason"], "argument_refused");
    assert_eq!(arr[1]["error"]["data"]["pointer"], "/path");
    assert!(never_forwarded(&s, 500) && never_forwarded(&s, 501));
}

#[test]
fn shadow_rules_and_identities_audit_would_deny_and_forward() {
    let s = start("[rate_limit]\nenabled = false", "policy_mode = \"shadow\"");
    // A shadow rule (`/note` at most 3 characters) for everyone: bob is forwarded.
    let sid = init_as(s.g.addr, BOB);
    let r = call_as(
        &s,
        BOB,
        &sid,
        600,
        "echo",
        r#"{"text":"x","note":"too long"}"#,
    );
    assert_forwarded(&s, &r, 600);
    // alice is in shadow mode: her deny list and the enforced rules only report.
    let asid = init_as(s.g.addr, ALICE);
    let r = call_as(&s, ALICE, &asid, 601, "last_request_headers", "{}");
    assert_eq!(r.status, 200);
    assert!(
        upstream_saw(&s, 601),
        "a shadow identity's denied call is forwarded"
    );
    let r = call_as(&s, ALICE, &asid, 602, "echo", r#"{"path":"/etc/passwd"}"#);
    assert_forwarded(&s, &r, 602);
    // tools/list: nothing changes for a shadow caller (no filtering).
    let list = |key: &str, sid: &str, id: u64| {
        let r = request(
            s.g.addr,
            &mcp_post_raw(
                &format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/list"}}"#),
                Some(sid),
                &key_header(key),
            ),
        );
        let names: Vec<String> = rpc_result(&r)["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_string())
            .collect();
        names
    };
    let as_bob = list(BOB, &sid, 603);
    let as_alice = list(ALICE, &asid, 604);
    assert!(as_alice.iter().any(|n| n == "last_request_headers"));
    assert_eq!(as_alice, as_bob);
    let lines = audit_lines(&s, 8);
    let find = |tool: &str, reason: &str| {
        lines
            .iter()
            .find(|l| l["tool"] == tool && l["reason"] == reason)
            .unwrap_or_else(|| panic!("no {tool}/{reason} event in {lines:?}"))
            .clone()
    };
    let e = find("echo", "argument_refused");
    assert_eq!(e["decision"], "would_deny");
    assert_eq!(e["status"], 200);
    assert!(lines.iter().any(|l| l["decision"] == "would_deny"
        && l["identity"] == "bob"
        && l["details"]["pointer"] == "/note"));
    let e = find("last_request_headers", "not_on_allow_list");
    assert_eq!(e["decision"], "would_deny");
    assert_eq!(e["identity"], "alice");
    assert!(
        s.g.metric_settles(
            "mcp_guard_argument_refusals_total",
            &[("mode", "shadow")],
            2.0
        ) >= 2.0
    );
    assert!(
        s.g.metric_settles(
            "mcp_guard_decisions_total",
            &[("outcome", "would_deny"), ("tool", "other")],
            1.0
        ) >= 1.0
    );
}

/// A POST head naming `tool`, with `content_length` announced and `body` sent (maybe none).
fn head_post(key: &str, sid: &str, tool: &str, content_length: usize, body: &str) -> String {
    format!(
        "POST /mcp HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nAccept: {ACCEPT_BOTH}\r\nMcp-Session-Id: {sid}\r\n{}Mcp-Method: tools/call\r\nMcp-Name: {tool}\r\nContent-Length: {content_length}\r\n\r\n{body}",
        key_header(key)
    )
}

#[test]
fn a_call_denied_on_the_head_is_answered_without_its_body() {
    let s = start("[rate_limit]\nenabled = false", "");
    let sid = init_as(s.g.addr, ALICE);
    // A head announcing a large body that never comes: the answer arrives anyway.
    let mut c = connect(s.g.addr);
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(head_post(ALICE, &sid, "crash", 1_000_000, "").as_bytes())
        .unwrap();
    let r = read_response(&mut c).expect("an answer without the body");
    assert_eq!(r.status, 403, "{}", r.text());
    let m = r.json();
    assert_eq!(m["id"], serde_json::Value::Null);
    assert_eq!(m["error"]["code"], -32003);
    assert_eq!(m["error"]["data"]["reason"], "denied_by_deny_list");
    assert_eq!(m["error"]["data"]["decidedOn"], "headers");
    // The body still on its way: the connection is closed, never read as a next request.
    assert_eq!(r.header("connection"), Some("close"));
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    assert!(rest.is_empty());
    // With the body already sent, it is skipped and the connection serves the next request.
    let body = tcall(700, "crash", "{}");
    let mut c = connect(s.g.addr);
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(head_post(ALICE, &sid, "crash", body.len(), &body).as_bytes())
        .unwrap();
    let r = read_response(&mut c).unwrap();
    assert_eq!(r.status, 403);
    assert_ne!(r.header("connection"), Some("close"));
    c.write_all(
        mcp_post_raw(
            &tcall(701, "echo", r#"{"text":"after"}"#),
            Some(&sid),
            &key_header(ALICE),
        )
        .as_bytes(),
    )
    .unwrap();
    let r = read_response(&mut c).unwrap();
    assert_forwarded(&s, &r, 701);
    assert!(never_forwarded(&s, 700));
    // An allowed call with matching headers goes through.
    let body = tcall(702, "echo", r#"{"text":"ok"}"#);
    let r = request(s.g.addr, &head_post(ALICE, &sid, "echo", body.len(), &body));
    assert_forwarded(&s, &r, 702);
}

#[test]
fn a_lying_head_buys_no_pass() {
    let s = start("[rate_limit]\nenabled = false", "");
    let sid = init_as(s.g.addr, ALICE);
    // Mcp-Name names an allowed tool; the body calls a denied one.
    let body = tcall(800, "crash", "{}");
    let r = request(s.g.addr, &head_post(ALICE, &sid, "echo", body.len(), &body));
    assert!(
        r.status >= 400 || rpc_result(&r)["error"].is_object(),
        "{}",
        r.text()
    );
    assert!(
        never_forwarded(&s, 800),
        "a lying header reached the upstream"
    );
    // Mcp-Name names an allowed tool; the body calls it with a refused argument.
    let body = tcall(801, "echo", r#"{"path":"/etc/passwd"}"#);
    let r = request(s.g.addr, &head_post(ALICE, &sid, "echo", body.len(), &body));
    assert_refused(&s, &r, 801, "/path", "path_under");
}

#[test]
fn a_call_rated_on_the_head_spends_one_token() {
    let s = start(
        "[rate_limit]\nrequests_per_second = 1000\nburst_size = 1000\nper_tool = { \"echo\" = 2 }",
        "",
    );
    let sid = init_as(s.g.addr, ALICE);
    // Two tokens for echo: two calls named on the head pass (were each counted on the head and
    // again on the body, the second would be refused).
    for id in [900, 901] {
        let body = tcall(id, "echo", r#"{"text":"x"}"#);
        let r = request(s.g.addr, &head_post(ALICE, &sid, "echo", body.len(), &body));
        assert_forwarded(&s, &r, id);
    }
    // Then the limit holds, still on the head: a head without its body gets the 429.
    let mut limited = false;
    for _ in 0..10 {
        let mut c = connect(s.g.addr);
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(head_post(ALICE, &sid, "echo", 1_000_000, "").as_bytes())
            .unwrap();
        let r = read_response(&mut c).expect("an answer without the body");
        if r.status == 429 {
            limited = true;
            break;
        }
    }
    assert!(limited, "the per-tool limit never applied on the head");
}

#[test]
fn legacy_sse_messages_take_the_same_path() {
    use common::legacy::Legacy;
    let s = start("[rate_limit]\nenabled = false", "");
    let mut l = Legacy::open(s.g.addr, "/sse", BOB);
    l.initialize();
    let m = l.call(&tcall(1000, "echo", r#"{"path":"/srv/data/%2e%2e/x"}"#));
    assert_eq!(m["error"]["code"], -32003, "{m}");
    assert_eq!(m["error"]["data"]["reason"], "argument_refused");
    assert_eq!(m["error"]["data"]["check"], "path_under");
    assert!(never_forwarded(&s, 1000));
    let m = l.call(&tcall(
        1001,
        "echo",
        r#"{"text":"fine","path":"/srv/data/x"}"#,
    ));
    assert!(m["result"].is_object(), "{m}");
    assert!(upstream_saw(&s, 1001));
}

#[test]
fn path_under_parent_readings_of_other_consumers_are_refused() {
    let s = start("[rate_limit]\nenabled = false", "");
    let sid = init_as(s.g.addr, BOB);
    // Each is under /srv/data to a POSIX reader, and a parent reference, a network path or
    // another directory to some other reader (Windows, Tomcat, URL parsers, NFKC, IDNA).
    let hostile = [
        "//srv/data/x",
        "/%2fsrv/data/x",
        "/srv/data/..;/x",
        "/srv/data/a/..;/../../etc",
        "/srv/data/..?/x",
        "/srv/data/..#/x",
        "/srv/data/.. /x",
        "/srv/data/..%20/x",
        "/srv/data/.../x",
        "/srv/data/.;/x",
        "/srv/data/.\u{200b}./x",
        "/srv/data/.\\u200b./x",
        "/srv/data/.\u{ad}./x",
        "/srv/data/..\u{200e}/x",
        "/srv/data/.%E2%80%8B./x",
        "/srv/data/.%C2%AD./x",
        "/srv/data/\u{3002}\u{3002}/x",
        "/srv/data/%EF%BC%8E%EF%BC%8E/x",
        "/srv/data/%2e%2e%5cx",
        "/srv/data/%252e%252e%255cx",
    ];
    for (i, p) in hostile.iter().enumerate() {
        let id = 1100 + i as u64;
        let r = call_as(&s, BOB, &sid, id, "echo", &format!(r#"{{"path":"{p}"}}"#));
        assert_refused(&s, &r, id, "/path", "path_under");
    }
    for (i, p) in ["/srv/data/.hidden", "/srv/data/a..b", "/srv/data/v1.2..3"]
        .iter()
        .enumerate()
    {
        let id = 1150 + i as u64;
        let r = call_as(&s, BOB, &sid, id, "echo", &format!(r#"{{"path":"{p}"}}"#));
        assert_forwarded(&s, &r, id);
    }
}

#[test]
fn a_number_a_hair_above_max_and_an_array_on_the_pointer_are_refused() {
    let s = start("[rate_limit]\nenabled = false", "");
    let ci = init_as(s.g.addr, CI);
    // `max = 10`: each of these is 10.0 as a double, and more than 10 to a decimal reader.
    for (i, a) in ["10.000000000000000001", "1.0000000000000000001e1"]
        .iter()
        .enumerate()
    {
        let id = 1200 + i as u64;
        let r = call_as(&s, CI, &ci, id, "add", &format!(r#"{{"a":{a},"b":1}}"#));
        assert_refused(&s, &r, id, "/a", "max");
    }
    let r = call_as(&s, CI, &ci, 1210, "add", r#"{"a":10.0,"b":1}"#);
    assert_forwarded(&s, &r, 1210);
    // `/opts/depth` with `opts` an array: not the shape the rule was written for.
    let sid = init_as(s.g.addr, BOB);
    let r = call_as(&s, BOB, &sid, 1220, "echo", r#"{"opts":[{"depth":99}]}"#);
    assert_refused(&s, &r, 1220, "/opts/depth", "shape");
    let r = call_as(&s, BOB, &sid, 1221, "echo", r#"{"opts":"depth=99"}"#);
    assert_refused(&s, &r, 1221, "/opts/depth", "shape");
    let r = call_as(&s, BOB, &sid, 1222, "echo", r#"{"opts":null,"text":"x"}"#);
    assert_forwarded(&s, &r, 1222);
}

/// A POST head naming `tool` by a raw `Mcp-Name` value.
fn named_post(key: &str, sid: &str, name: &str, body: &str) -> String {
    head_post(key, sid, name, body.len(), body)
}

#[test]
fn a_base64_mcp_name_is_decided_on_its_decoded_name() {
    let s = start("[rate_limit]\nenabled = false", "");
    let sid = init_as(s.g.addr, ALICE);
    // `echo` in the sentinel form: the body agrees, the call goes through.
    let body = tcall(1300, "echo", r#"{"text":"b64"}"#);
    let r = request(
        s.g.addr,
        &named_post(ALICE, &sid, "=?base64?ZWNobw==?=", &body),
    );
    assert_forwarded(&s, &r, 1300);
    // `crash` (denied to alice) in the sentinel form: refused on the head, body unread.
    let mut c = connect(s.g.addr);
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(head_post(ALICE, &sid, "=?base64?Y3Jhc2g=?=", 1_000_000, "").as_bytes())
        .unwrap();
    let r = read_response(&mut c).expect("an answer without the body");
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.json()["error"]["data"]["decidedOn"], "headers");
    // A lie in base64: `echo` on the head, `crash` in the body.
    let body = tcall(1301, "crash", "{}");
    let r = request(
        s.g.addr,
        &named_post(ALICE, &sid, "=?base64?ZWNobw==?=", &body),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(never_forwarded(&s, 1301));
    // Bad base64 (no padding, URL-safe alphabet, not UTF-8): 400 saying so, nothing forwarded.
    for (i, bad) in ["=?base64?ZWNobw?=", "=?base64?_w==?=", "=?base64?/w==?="]
        .iter()
        .enumerate()
    {
        let id = 1310 + i as u64;
        let body = tcall(id, "echo", r#"{"text":"x"}"#);
        let r = request(s.g.addr, &named_post(ALICE, &sid, bad, &body));
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        assert!(r.text().contains("base64"), "{}", r.text());
        assert!(never_forwarded(&s, id));
    }
}

#[test]
fn a_call_refused_on_its_body_gets_its_head_token_back() {
    // alice: 5 tokens, 1 more a second; the session's initialize and notification spend 2.
    let s = start("[rate_limit]\nrequests_per_second = 1\nburst_size = 5", "");
    let sid = init_as(s.g.addr, ALICE);
    // Eight calls rated on the head and refused by an argument rule: each gets its token
    // back, as the same call without headers never spends one. Were they kept, the fourth
    // would be a 429.
    for id in 1400..1408 {
        let body = tcall(id, "echo", r#"{"path":"/etc/passwd"}"#);
        let r = request(s.g.addr, &head_post(ALICE, &sid, "echo", body.len(), &body));
        assert_eq!(r.status, 200, "call {id}: {}", r.text());
        assert_eq!(rpc_result(&r)["error"]["data"]["check"], "path_under");
    }
    let body = tcall(1410, "echo", r#"{"text":"ok"}"#);
    let r = request(s.g.addr, &head_post(ALICE, &sid, "echo", body.len(), &body));
    assert_forwarded(&s, &r, 1410);
    assert!(never_forwarded(&s, 1400));
}

#[test]
fn a_shadow_denial_is_counted_once() {
    let s = start("[rate_limit]\nenabled = false", "policy_mode = \"shadow\"");
    let asid = init_as(s.g.addr, ALICE);
    // Denied to alice (shadow): forwarded, counted `would_deny` and nothing else.
    let r = call_as(&s, ALICE, &asid, 1500, "last_request_headers", "{}");
    assert_eq!(r.status, 200);
    // An argument refused by an enforced rule, reported only since alice is in shadow mode.
    let r = call_as(&s, ALICE, &asid, 1501, "add", r#"{"a":1,"b":2}"#);
    assert_eq!(r.status, 200);
    let r = call_as(&s, ALICE, &asid, 1502, "echo", r#"{"path":"/etc/passwd"}"#);
    assert_forwarded(&s, &r, 1502);
    let m = |tool: &str, outcome: &str| {
        s.g.metric(
            "mcp_guard_decisions_total",
            &[("tool", tool), ("outcome", outcome)],
        )
    };
    assert_eq!(m("other", "would_deny"), 1.0);
    assert_eq!(m("other", "allow"), 0.0);
    assert_eq!(m("echo", "would_deny"), 1.0);
    assert_eq!(m("add", "allow"), 1.0);
    assert_eq!(m("add", "would_deny"), 0.0);
}
