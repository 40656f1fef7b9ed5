//! The legacy HTTP+SSE transport (2024-11-05) through the real binary: the `endpoint` event,
//! messages answered 202 with their answers on the stream, over stdio and HTTP upstreams and
//! across workers; and what a hostile client tries (another caller's session URL, edited or
//! foreign session parameters, ids of one transport at the other, a closed session).

mod common;

use common::legacy::*;
use common::*;
use mcp_guard::cli::hash_key;
use serde_json::Value;
use std::time::{Duration, Instant};

const ALICE: &str = "alice-key-0123456789";
const BOB: &str = "bob-key-0123456789";
const WAIT: Duration = Duration::from_secs(10);

/// Keys: alice may call echo and add (and see only those), bob anything.
fn keys() -> String {
    format!(
        "[[auth.api_keys]]\nid = \"alice\"\nkey_hash = \"{}\"\nallowed_tools = [\"echo\", \"add\", \"progress\"]\n[[auth.api_keys]]\nid = \"bob\"\nkey_hash = \"{}\"\n",
        hash_key(ALICE),
        hash_key(BOB)
    )
}

fn tool_names(list: &Value) -> Vec<String> {
    let mut names: Vec<String> = list["result"]["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("not a tool list: {list}"))
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

/// The session every test in this file exercises, against whichever upstream `g` fronts.
fn full_session(g: &Gateway) {
    let mut s = Legacy::open(g.addr, "/sse", ALICE);
    assert!(
        s.endpoint.starts_with("/messages?sessionId="),
        "{}",
        s.endpoint
    );
    let init = s.initialize();
    assert_eq!(init["id"], 1);
    assert_eq!(init["result"]["serverInfo"]["name"], "mcp-demo-server");
    // tools/list is filtered to what alice may call.
    let list = s.call(r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#);
    assert_eq!(tool_names(&list), ["add", "echo", "progress"]);
    let r = s.call(&call(3, "echo", r#"{"text":"over legacy sse"}"#));
    assert_eq!(r["id"], 3);
    assert_eq!(r["result"]["content"][0]["text"], "over legacy sse");
    // A denied call is refused on the stream, where a legacy client reads it.
    let r = s.call(&call(4, "sleep", r#"{"ms":1}"#));
    assert_eq!(r["id"], 4);
    assert!(
        r["error"]["message"].as_str().unwrap().contains("sleep"),
        "{r}"
    );
    // Progress notifications come on the stream before the result.
    s.others.clear();
    let r = s.call(
        r#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"progress","arguments":{"steps":2},"_meta":{"progressToken":"p1"}}}"#,
    );
    assert_eq!(r["id"], 5);
    let progress: Vec<&Value> = s
        .others
        .iter()
        .filter(|m| m["method"] == "notifications/progress")
        .collect();
    assert_eq!(progress.len(), 2, "{:?}", s.others);
    assert_eq!(progress[0]["params"]["progressToken"], "p1");
}

#[test]
fn a_legacy_client_works_end_to_end_against_a_stdio_upstream() {
    let g = Gateway::start(&format!("{}{}", stdio_config("auto", "", &[]), keys()));
    full_session(&g);
}

#[test]
fn a_legacy_client_works_end_to_end_against_an_http_upstream() {
    // Answering POSTs as SSE: progress notifications travel with the answer.
    let demo = DemoHttp::start(&["--sse-responses"]);
    let g = Gateway::start(&format!(
        "{}{}",
        http_config("auto", &demo.url(), "", ""),
        keys()
    ));
    full_session(&g);
}

#[test]
fn a_legacy_client_works_end_to_end_against_a_legacy_sse_upstream() {
    let demo = DemoHttp::start(&["--legacy-sse"]);
    let g = Gateway::start(&format!(
        "[server]\nport = 0\nworkers = 2\n[admin]\nport = 0\n[upstream]\ntransport = \"sse\"\nurl = \"http://{}/sse\"\ntimeout_secs = 10\n{}",
        demo.addr,
        keys()
    ));
    full_session(&g);
}

#[test]
fn messages_reach_their_session_whichever_worker_they_land_on() {
    for io in DRIVERS {
        let mut cfg = stdio_config(io, "", &[]);
        cfg = cfg.replace("workers = 2", "workers = 4");
        let g = Gateway::start(&format!("{cfg}{}", keys()));
        // Several streams (spread over the workers by the kernel), each posted to on fresh
        // connections (spread again): every answer must reach its own stream.
        let mut sessions: Vec<Legacy> = (0..6).map(|_| Legacy::open(g.addr, "/sse", BOB)).collect();
        for s in &mut sessions {
            s.initialize();
        }
        for round in 0..5u64 {
            for (i, s) in sessions.iter_mut().enumerate() {
                let text = format!("s{i}-r{round}");
                let r = s.call(&call(
                    10 + round,
                    "echo",
                    &format!(r#"{{"text":"{text}"}}"#),
                ));
                assert_eq!(r["result"]["content"][0]["text"], text.as_str(), "{io}");
            }
        }
        assert_eq!(
            g.metric_settles("mcp_guard_legacy_sse_sessions", &[], 6.0),
            6.0
        );
        drop(sessions);
        assert_eq!(
            g.metric_settles("mcp_guard_legacy_sse_sessions", &[], 0.0),
            0.0
        );
    }
}

#[test]
fn a_session_url_is_unknown_to_another_caller_and_to_anyone_once_its_stream_ends() {
    let g = Gateway::start(&format!("{}{}", stdio_config("auto", "", &[]), keys()));
    let mut s = Legacy::open(g.addr, "/sse", ALICE);
    s.initialize();
    // Bob holds a valid key and alice's session URL: unknown to him.
    let r = s.post_as(BOB, &call(2, "echo", r#"{"text":"x"}"#));
    assert_eq!(r.status, 404, "{}", r.text());
    // Nothing reached alice's stream.
    let r = s.call(r#"{"jsonrpc":"2.0","id":3,"method":"ping"}"#);
    assert_eq!(r["id"], 3);
    // Without credentials: 401 before anything else.
    let r = post_to(
        g.addr,
        &s.endpoint,
        "",
        r#"{"jsonrpc":"2.0","id":4,"method":"ping"}"#,
    );
    assert_eq!(r.status, 401);
    // The stream ends: the URL is dead, for its owner too.
    let endpoint = s.endpoint.clone();
    drop(s);
    let deadline = Instant::now() + WAIT;
    loop {
        let r = post_to(
            g.addr,
            &endpoint,
            ALICE,
            r#"{"jsonrpc":"2.0","id":5,"method":"ping"}"#,
        );
        if r.status == 404 {
            break;
        }
        assert_eq!(r.status, 202);
        assert!(
            Instant::now() < deadline,
            "session still open after its stream closed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn edited_guessed_or_foreign_session_parameters_are_unknown() {
    let g = Gateway::start(&format!("{}{}", stdio_config("auto", "", &[]), keys()));
    let mut s = Legacy::open(g.addr, "/sse", ALICE);
    s.initialize();
    let sid = s.endpoint.strip_prefix("/messages?sessionId=").unwrap();
    let ping = r#"{"jsonrpc":"2.0","id":9,"method":"ping"}"#;
    let (payload, mac) = sid.split_once('.').unwrap();
    // Another serial on the same worker (the payload edited): the MAC no longer matches.
    let mut edited = payload.as_bytes().to_vec();
    edited[10] = if edited[10] == b'A' { b'B' } else { b'A' };
    let edited = format!("{}.{mac}", String::from_utf8(edited).unwrap());
    for target in [
        format!("/messages?sessionId={edited}"),
        "/messages?sessionId=AQABAAAAAAAAAAHPOfqP1SiW_WRlZmF1bHQ.bm9wZQ".to_string(),
        "/messages?sessionId=".to_string(),
        "/messages?sessionId=not-base64!.x".to_string(),
    ] {
        let r = post_to(g.addr, &target, ALICE, ping);
        assert_eq!(r.status, 404, "{target}: {}", r.text());
    }
    // Two session parameters, or none: which one counts is never guessed.
    let r = post_to(
        g.addr,
        &format!("/messages?sessionId={sid}&sessionId={sid}"),
        ALICE,
        ping,
    );
    assert_eq!(r.status, 400);
    assert_eq!(post_to(g.addr, "/messages", ALICE, ping).status, 400);
    // A legacy session id presented as a Streamable HTTP session, and the other way round.
    let r = request(g.addr, &mcp_post_raw(ping, Some(sid), &bearer(ALICE)));
    assert_eq!(r.status, 404, "{}", r.text());
    let (_, streamable) = initialize_at(g.addr, "/mcp", &bearer(ALICE));
    let r = post_to(
        g.addr,
        &format!("/messages?sessionId={streamable}"),
        ALICE,
        ping,
    );
    assert_eq!(r.status, 404, "{}", r.text());
    // The real one still works.
    assert_eq!(s.call(ping)["id"], 9);
}

#[test]
fn a_session_of_one_server_is_unknown_at_another() {
    let servers = format!(
        "[[upstream.servers]]\nname = \"alpha\"\ntransport = \"stdio\"\ncommand = {DEMO:?}\nargs = [\"--name\", \"srv-alpha\"]\n"
    );
    let g = Gateway::start(&format!(
        "{}{servers}{}",
        stdio_config("auto", "", &[]),
        keys()
    ));
    let mut alpha = Legacy::open(g.addr, "/sse/alpha", BOB);
    let init = alpha.initialize();
    assert_eq!(init["result"]["serverInfo"]["name"], "srv-alpha");
    let mut default = Legacy::open(g.addr, "/sse", BOB);
    let init = default.initialize();
    assert_eq!(init["result"]["serverInfo"]["name"], "mcp-demo-server");
    // The session parameter carries its server's name under the MAC: rewriting the name
    // to another server's breaks it.
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let sid = alpha.endpoint.strip_prefix("/messages?sessionId=").unwrap();
    let (payload, mac) = sid.split_once('.').unwrap();
    let mut bytes = b64.decode(payload).unwrap();
    let at = bytes.len() - "alpha".len();
    bytes.truncate(at);
    bytes.extend_from_slice(b"default");
    let forged = format!("/messages?sessionId={}.{mac}", b64.encode(&bytes));
    let r = post_to(
        g.addr,
        &forged,
        BOB,
        r#"{"jsonrpc":"2.0","id":2,"method":"ping"}"#,
    );
    assert_eq!(r.status, 404, "{}", r.text());
    // Unknown servers have no stream.
    assert_eq!(Legacy::try_open(g.addr, "/sse/nope", BOB).0, 404);
}

#[test]
fn the_stream_and_its_messages_follow_the_transport_rules() {
    let g = Gateway::start(&format!("{}{}", stdio_config("auto", "", &[]), keys()));
    // No credentials: 401; no text/event-stream in Accept: 406; POST to the stream: 405.
    assert_eq!(Legacy::try_open(g.addr, "/sse", "").0, 401);
    let r = request(
        g.addr,
        &format!(
            "GET /sse HTTP/1.1\r\nHost: t\r\nAccept: application/json\r\n{}Connection: close\r\n\r\n",
            bearer(ALICE)
        ),
    );
    assert_eq!(r.status, 406);
    let r = post_to(g.addr, "/sse", ALICE, INIT_2024);
    assert_eq!(r.status, 405);
    let mut s = Legacy::open(g.addr, "/sse", ALICE);
    // Before initialize, nothing is forwarded: the client is told on the stream.
    let r = s.call(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#);
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("initialize"),
        "{r}"
    );
    s.initialize();
    // A second initialize on the same session is refused.
    let r = s.call(INIT_2024);
    assert!(r["error"].is_object(), "{r}");
    // Not JSON: 400 in the POST's own response (there is no id to answer on the stream).
    let r = s.post("{not json");
    assert_eq!(r.status, 400);
    // Wrong content type: 415.
    let r = request(
        g.addr,
        &format!(
            "POST {} HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n{}Content-Length: 2\r\nConnection: close\r\n\r\n{{}}",
            s.endpoint,
            bearer(ALICE)
        ),
    );
    assert_eq!(r.status, 415);
    // A notification carrying a tool call is invalid, not an unchecked notification.
    let r = s.post(
        r#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"sleep","arguments":{}}}"#,
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(
        s.call(r#"{"jsonrpc":"2.0","id":7,"method":"ping"}"#)["id"],
        7
    );
}

#[test]
fn a_rate_limited_message_is_a_429_the_client_sees_when_it_posts() {
    let cfg = format!(
        "{}{}[rate_limit]\nenabled = true\nrequests_per_second = 1\nburst_size = 4\n",
        stdio_config("auto", "", &[]),
        keys()
    );
    let g = Gateway::start(&cfg);
    let mut s = Legacy::open(g.addr, "/sse", ALICE);
    s.initialize();
    let mut statuses = Vec::new();
    for i in 0..6 {
        let r = s.post(&format!(
            r#"{{"jsonrpc":"2.0","id":{},"method":"ping"}}"#,
            100 + i
        ));
        statuses.push(r.status);
        if r.status == 429 {
            assert!(r.header("retry-after").is_some());
            break;
        }
    }
    assert_eq!(statuses.last(), Some(&429), "{statuses:?}");
}

#[test]
fn a_client_that_stops_reading_its_stream_loses_the_session_not_the_gateways_memory() {
    let g = Gateway::start(&format!("{}{}", stdio_config("auto", "", &[]), keys()));
    let mut s = Legacy::open(g.addr, "/sse", BOB);
    s.initialize();
    // From here on the client reads nothing: 1 MiB answers pile up behind its stream.
    let text = "x".repeat(1 << 20);
    let mut statuses = Vec::new();
    for i in 0..48 {
        let r = s.post(&call(100 + i, "echo", &format!(r#"{{"text":"{text}"}}"#)));
        statuses.push(r.status);
        if r.status == 404 {
            break;
        }
    }
    // The session is ended once more than its byte bound waits: the next message is unknown.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = s.post(r#"{"jsonrpc":"2.0","id":9,"method":"ping"}"#);
        if r.status == 404 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "session still open: {statuses:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(g.wait_log("not reading", Duration::from_secs(5)));
    assert_eq!(
        g.metric_settles("mcp_guard_legacy_sse_sessions", &[], 0.0),
        0.0
    );
}

#[test]
fn an_open_stream_keeps_a_shared_session_alive_and_a_reaped_child_closes_the_stream() {
    // Shared child: the stream open is use enough, requests or not.
    let g = Gateway::start(&format!(
        "{}{}",
        stdio_config("auto", "session_idle_secs = 1", &[]),
        keys()
    ));
    let mut s = Legacy::open(g.addr, "/sse", BOB);
    s.initialize();
    std::thread::sleep(Duration::from_millis(4500));
    assert_eq!(
        s.call(r#"{"jsonrpc":"2.0","id":9,"method":"ping"}"#)["id"],
        9
    );
    // A child per session, stopped when idle: the session ends with it, visibly (its stream
    // closes and its URL is unknown), never a stream that answers every message with an error.
    let cfg = stdio_config("auto", "session_idle_secs = 1", &[]).replace(
        "timeout_secs = 10\n",
        "timeout_secs = 10\nsession_mode = \"per_session\"\n",
    );
    let g = Gateway::start(&format!("{cfg}{}", keys()));
    let mut s = Legacy::open(g.addr, "/sse", BOB);
    s.initialize();
    std::thread::sleep(Duration::from_millis(4500));
    let r = s.post(r#"{"jsonrpc":"2.0","id":10,"method":"ping"}"#);
    assert!(matches!(r.status, 202 | 404), "{}", r.text());
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.next_event().is_some() {
        assert!(Instant::now() < deadline, "the stream stays open");
    }
    let r = s.post(r#"{"jsonrpc":"2.0","id":11,"method":"ping"}"#);
    assert_eq!(r.status, 404, "{}", r.text());
}

#[test]
fn an_invalid_message_with_an_id_is_answered_on_the_stream_and_a_forbidden_servers_session_is_unknown()
 {
    let servers = format!(
        "[[upstream.servers]]\nname = \"alpha\"\ntransport = \"stdio\"\ncommand = {DEMO:?}\n"
    );
    let carol = "carol-key-0123456789";
    let g = Gateway::start(&format!(
        "{}{servers}{}[[auth.api_keys]]\nid = \"carol\"\nkey_hash = \"{}\"\nallowed_servers = [\"default\"]\n",
        stdio_config("auto", "", &[]),
        keys(),
        hash_key(carol)
    ));
    let mut s = Legacy::open(g.addr, "/sse/alpha", BOB);
    s.initialize();
    // A legacy client waits for its answer on the stream: an invalid request it can name by
    // id is refused there.
    let r = s.call(
        r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"echo","name":"sleep"}}"#,
    );
    assert_eq!(r["id"], 7);
    assert!(r["error"].is_object(), "{r}");
    // Carol may not reach alpha: bob's alpha session is simply unknown to her (not 403).
    let r = s.post_as(carol, r#"{"jsonrpc":"2.0","id":8,"method":"ping"}"#);
    assert_eq!(r.status, 404, "{}", r.text());
    // And she cannot open a stream there.
    assert_eq!(Legacy::try_open(g.addr, "/sse/alpha", carol).0, 403);
}

#[test]
fn refused_session_parameters_and_unnormal_paths_are_audited_under_the_allowance() {
    // Red team (fleet, R2): a messages POST with a missing, doubled or forged session
    // parameter was refused before authentication and never audited, so someone guessing
    // session URLs left no trace. A path that routes nowhere stays unaudited.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let cfg = format!(
        "{}{}[audit]\nfile = {:?}\n",
        stdio_config("auto", "", &[]).replace("workers = 2\n", "workers = 1\n"),
        keys(),
        path.to_str().unwrap()
    );
    let g = Gateway::start(&cfg);
    let ping = r#"{"jsonrpc":"2.0","id":9,"method":"ping"}"#;
    assert_eq!(post_to(g.addr, "/messages", "", ping).status, 400);
    assert_eq!(
        post_to(g.addr, "/messages?sessionId=a&sessionId=b", "", ping).status,
        400
    );
    assert_eq!(post_to(g.addr, "/x/../mcp", ALICE, ping).status, 400);
    assert_eq!(post_to(g.addr, "/nowhere", ALICE, ping).status, 404);
    // A session parameter that names no server is refused before authentication, so its
    // refusals share the address's allowance with the ones above.
    for i in 0..12 {
        let garbage = format!("/messages?sessionId=not-base64!.{i}");
        assert_eq!(post_to(g.addr, &garbage, ALICE, ping).status, 404);
    }
    // A forged one for a real server is refused once its caller is known: alice's lines.
    for i in 0..3 {
        let forged = format!("/messages?sessionId=AQABAAAAAAAAAAHPOfqP1SiW_WRlZmF1bHQ.{i}");
        assert_eq!(post_to(g.addr, &forged, ALICE, ping).status, 404);
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let suppressed = g.metric("mcp_guard_audit_events_suppressed_total", &[]);
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let events: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        // 15 refusals of one address: 10 lines, 5 counted; and alice's 3.
        if events.len() >= 13 && suppressed >= 5.0 {
            let reasons: Vec<&str> = events
                .iter()
                .map(|e| e["reason"].as_str().unwrap_or("?"))
                .collect();
            assert_eq!(events.len(), 13, "{reasons:?}");
            assert_eq!(suppressed, 5.0);
            assert_eq!(
                &reasons[..4],
                [
                    "missing_session",
                    "missing_session",
                    "path_not_normal",
                    "unknown_session"
                ],
                "{text}"
            );
            assert!(!reasons.contains(&"not_found"), "{text}");
            let (strangers, alices): (Vec<&Value>, Vec<&Value>) =
                events.iter().partition(|e| e["identity"].is_null());
            assert_eq!((strangers.len(), alices.len()), (10, 3), "{text}");
            for e in &events {
                assert!(matches!(e["status"].as_u64(), Some(400 | 404)), "{e}");
                assert_eq!(e["client_addr"], "127.0.0.1", "{e}");
            }
            break;
        }
        assert!(Instant::now() < deadline, "{suppressed} suppressed: {text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn at_shutdown_a_legacy_stream_stays_for_the_answers_in_flight_and_an_idle_one_ends_at_once() {
    let demo = DemoHttp::start(&[]);
    let mut g = Gateway::start(&format!(
        "{}{}",
        http_config("auto", &demo.url(), "shutdown_grace_secs = 20", ""),
        keys()
    ));
    let mut busy = Legacy::open(g.addr, "/sse", BOB);
    busy.initialize();
    let mut idle = Legacy::open(g.addr, "/sse", BOB);
    idle.initialize();
    let sleep = r#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"sleep","arguments":{"ms":800}}}"#;
    assert_eq!(busy.post(sleep).status, 202);
    // The call is on its way upstream.
    std::thread::sleep(Duration::from_millis(200));
    let signalled = Instant::now();
    g.signal(libc::SIGTERM);
    // The idle session's stream ends at once: it holds no answer, and must not hold the drain.
    // (What the upstream's own stream sent before, "stream opened", may still be read.)
    while let Some((_, data)) = idle.next_event() {
        assert!(data.contains("stream opened"), "{data}");
    }
    assert!(signalled.elapsed() < Duration::from_millis(500));
    // The busy one gets its answer, then ends, long before the grace (20 s) is out.
    let answer = busy.answer_to(&serde_json::json!(5));
    assert_eq!(answer["id"], 5, "{answer}");
    assert!(answer.get("result").is_some(), "{answer}");
    while let Some((_, data)) = busy.next_event() {
        assert!(
            data.contains("stream opened"),
            "after its last answer: {data}"
        );
    }
    assert!(g.wait_exit(Duration::from_secs(10)).is_some());
    assert!(signalled.elapsed() < Duration::from_secs(5));
}
