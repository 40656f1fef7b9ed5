//! Secret redaction (`[redaction]`) against the real binary: the demo server (stdio, HTTP with
//! JSON answers, HTTP with SSE answers) echoing secrets back, and a raw mock upstream for what
//! the demo cannot send (JSON escapes, an SSE event cut in two, answers that cannot be parsed).

mod common;

use common::*;
use mcp_guard::cli::hash_key;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const AWS: &str = "AKIAIOSFODNN7EXAMPLE";
const GITHUB: &str = "ghp_0123456789abcdefghijABCDEFGHIJ012345";
const GITHUB_PAT: &str =
    "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ012345";
const SLACK: &str = "xoxb-123456789012-abcdefghijKLMN";
const STRIPE: &str = "sk_live_4eC39HqLyjWDarjtT1zdp7dc";
const PEM: &str = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM\nQkZ1l9vQ8xYzGmP0bHHq==\n-----END RSA PRIVATE KEY-----";
const PEM_BODY: &str = "MIIEowIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM";
const JWT: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U";
const CARD: &str = "4111 1111 1111 1111";
/// Fails the Luhn check: not a card, stays.
const NOT_CARD: &str = "4111 1111 1111 1112";
const INTERNAL: &str = "INT-20261128";

const WAIT: Duration = Duration::from_secs(5);

/// Every secret with the detector that must name it.
fn secrets() -> Vec<(&'static str, &'static str)> {
    vec![
        ("aws_access_key", AWS),
        ("github_token", GITHUB),
        ("github_token", GITHUB_PAT),
        ("slack_token", SLACK),
        ("stripe_key", STRIPE),
        ("private_key", PEM_BODY),
        ("jwt", JWT),
        ("card_number", CARD),
        ("internal_id", INTERNAL),
    ]
}

fn redaction_section(audit: &Path) -> String {
    format!(
        "[redaction]\nenabled = true\npatterns = {{ \"internal_id\" = \"INT-[0-9]{{8}}\" }}\n\n[audit]\nfile = {:?}\n",
        audit.to_str().unwrap()
    )
}

struct Lab {
    g: Gateway,
    audit: PathBuf,
    _demo: Option<DemoHttp>,
    _dir: tempfile::TempDir,
}

fn lab(upstream: &str) -> Lab {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let (base, demo) = match upstream {
        "stdio" => (stdio_config("auto", "", &[]), None),
        "http-json" => {
            let d = DemoHttp::start(&[]);
            (http_config("auto", &d.url(), "", ""), Some(d))
        }
        "http-sse" => {
            let d = DemoHttp::start(&["--sse-responses"]);
            (http_config("auto", &d.url(), "", ""), Some(d))
        }
        url => (http_config("auto", url, "", ""), None),
    };
    let g = Gateway::start(&format!("{base}\n{}", redaction_section(&audit)));
    Lab {
        g,
        audit,
        _demo: demo,
        _dir: dir,
    }
}

fn echo(addr: SocketAddr, sid: &str, id: u64, text: &str) -> Response {
    let args = serde_json::json!({ "text": text }).to_string();
    let r = mcp_post(addr, &call(id, "echo", &args), Some(sid));
    assert_eq!(r.status, 200, "{}", r.text());
    r
}

/// The audit events written so far, waiting until they satisfy `done` (workers write their
/// events in their own order).
fn audit_events(
    path: &Path,
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let events: Vec<serde_json::Value> = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if done(&events) || Instant::now() > deadline {
            return events;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn every_detector_redacts_tool_results_through_stdio_http_json_and_http_sse() {
    for upstream in ["stdio", "http-json", "http-sse"] {
        let lab = lab(upstream);
        let addr = lab.g.addr;
        let sid = initialize(addr);
        for (i, (detector, secret)) in secrets().into_iter().enumerate() {
            let text = if detector == "private_key" {
                format!("key:\n{PEM}\nend")
            } else {
                format!("found {secret} in the file")
            };
            let r = echo(addr, &sid, 10 + i as u64, &text);
            let raw = r.text();
            assert!(!raw.contains(secret), "{upstream}/{detector}: {raw}");
            let msg = rpc_result(&r);
            let shown = msg["result"]["content"][0]["text"].as_str().unwrap();
            let marker = format!("[REDACTED:{detector}]");
            assert!(shown.contains(&marker), "{upstream}/{detector}: {shown}");
            if detector == "private_key" {
                // The whole key, BEGIN to END line, and nothing around it.
                assert_eq!(shown, format!("key:\n{marker}\nend"), "{upstream}");
            }
        }
        // A long number failing the Luhn check is not a card number.
        let r = echo(addr, &sid, 50, &format!("order {NOT_CARD}"));
        let msg = rpc_result(&r);
        assert_eq!(
            msg["result"]["content"][0]["text"],
            format!("order {NOT_CARD}"),
            "{upstream}"
        );
        // The audit event of a redacted call names the detector, never the secret.
        let events = audit_events(&lab.audit, |events| {
            secrets().iter().all(|(detector, _)| {
                events.iter().any(|e| {
                    e["details"]["redacted"]
                        .as_str()
                        .is_some_and(|d| d.contains(&format!("{detector}=")))
                })
            })
        });
        let redacted: Vec<&str> = events
            .iter()
            .filter_map(|e| e["details"]["redacted"].as_str())
            .collect();
        for (detector, _) in secrets() {
            assert!(
                redacted.iter().any(|d| d.contains(&format!("{detector}="))),
                "{upstream}: no audit note for {detector}: {redacted:?}"
            );
        }
        let audit_text = std::fs::read_to_string(&lab.audit).unwrap();
        let logs = lab.g.logs.lock().unwrap().join("\n");
        for (_, secret) in secrets() {
            assert!(
                !audit_text.contains(secret),
                "{upstream}: audit holds {secret}"
            );
            assert!(!logs.contains(secret), "{upstream}: logs hold {secret}");
        }
        assert!(
            lab.g.metric_settles(
                "mcp_guard_redactions_total",
                &[("detector", "aws_access_key")],
                1.0
            ) >= 1.0,
            "{upstream}"
        );
        assert!(
            lab.g
                .metric("mcp_guard_redactions_total", &[("detector", "internal_id")])
                >= 1.0,
            "{upstream}"
        );
    }
}

// --- A raw upstream -------------------------------------------------------------------------

/// What the raw upstream answers a `tools/call` with: chunks written with a pause between.
#[derive(Clone)]
struct Canned {
    content_type: &'static str,
    chunks: Vec<Vec<u8>>,
}

/// A Streamable HTTP upstream answering initialize itself and every tools/call with `canned`
/// (chunked transfer encoding, each chunk flushed on its own after a pause).
fn raw_upstream(canned: Canned) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let canned = Arc::new(canned);
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(s) = s else { break };
            let canned = canned.clone();
            std::thread::spawn(move || serve(s, &canned));
        }
    });
    addr
}

fn serve(s: TcpStream, canned: &Canned) {
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    loop {
        let mut len = 0usize;
        let mut line = String::new();
        let mut first = true;
        let mut delete = false;
        loop {
            line.clear();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" && !first {
                break;
            }
            if first {
                delete = line.starts_with("DELETE ");
            }
            first = false;
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        if delete {
            // A hostile upstream ending a session with a body: a secret and a tool list.
            let b = r#"{"jsonrpc":"2.0","id":6,"result":{"content":[{"type":"text","text":"AKIAIOSFODNN7EXAMPLE"}],"tools":[{"name":"delete_all"}]}}"#;
            let _ = w.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                    b.len()
                )
                .as_bytes(),
            );
            continue;
        }
        let req: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let head = |ctype: &str, extra: &str| {
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\n{extra}Transfer-Encoding: chunked\r\n\r\n"
            )
        };
        let chunk = |c: &[u8]| {
            let mut v = format!("{:x}\r\n", c.len()).into_bytes();
            v.extend_from_slice(c);
            v.extend_from_slice(b"\r\n");
            v
        };
        match req["method"].as_str() {
            Some("initialize") => {
                let b = serde_json::json!({"jsonrpc":"2.0","id":req["id"],"result":{"protocolVersion":"2025-11-25","capabilities":{"tools":{}},"serverInfo":{"name":"raw","version":"1"}}}).to_string();
                let mut out = head("application/json", "Mcp-Session-Id: raw-1\r\n").into_bytes();
                out.extend(chunk(b.as_bytes()));
                out.extend_from_slice(b"0\r\n\r\n");
                let _ = w.write_all(&out);
            }
            Some("tools/call") => {
                let _ = w.write_all(head(canned.content_type, "").as_bytes());
                for c in &canned.chunks {
                    let _ = w.write_all(&chunk(c));
                    let _ = w.flush();
                    std::thread::sleep(Duration::from_millis(100));
                }
                let _ = w.write_all(b"0\r\n\r\n");
            }
            _ => {
                let _ = w.write_all(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n");
            }
        }
    }
}

fn raw_lab(canned: Canned) -> Lab {
    let addr = raw_upstream(canned);
    lab(&format!("http://{addr}/mcp"))
}

#[test]
fn json_escapes_and_nested_arrays_do_not_hide_a_key_and_the_answer_stays_json() {
    // `\u0041KIA…` spells the key with escapes; a second copy sits deep in nested arrays of
    // structured content, a third is a member name.
    let body = r#"{"jsonrpc":"2.0","id":7,"result":{"content":[{"type":"text","text":"k=\u0041KIA\u0049OSFODNN7EXAMPLE \"quoted\"\n"}],"structuredContent":{"deep":[[["x",{"y":["AKIAIOSFODNN7EXAMPLE"]}]]],"AKIAIOSFODNN7EXAMPLE":true},"isError":false}}"#;
    for content_type in ["application/json", "text/event-stream"] {
        let chunks = if content_type == "application/json" {
            vec![body.into()]
        } else {
            vec![format!("event: message\ndata: {body}\n\n").into()]
        };
        let lab = raw_lab(Canned {
            content_type,
            chunks,
        });
        let sid = initialize(lab.g.addr);
        let r = mcp_post(lab.g.addr, &call(7, "anything", "{}"), Some(&sid));
        assert_eq!(r.status, 200, "{content_type}: {}", r.text());
        let msg = rpc_result(&r);
        assert!(
            !msg.to_string().contains("OSFODNN7"),
            "{content_type}: {msg}"
        );
        assert_eq!(
            msg["result"]["content"][0]["text"], "k=[REDACTED:aws_access_key] \"quoted\"\n",
            "{content_type}"
        );
        assert_eq!(
            msg["result"]["structuredContent"]["deep"][0][0][1]["y"][0],
            "[REDACTED:aws_access_key]"
        );
        assert_eq!(
            msg["result"]["structuredContent"]["[REDACTED:aws_access_key]"],
            true
        );
        // Members untouched by the redaction keep their order and values.
        assert_eq!(msg["id"], 7);
        assert_eq!(msg["result"]["isError"], false);
    }
}

#[test]
fn a_secret_cut_across_two_sse_chunks_is_still_found_and_the_event_still_flows() {
    let event = format!(
        "event: message\ndata: {}\n\n",
        serde_json::json!({"jsonrpc":"2.0","id":8,"result":{"content":[{"type":"text","text":format!("token {GITHUB} and {STRIPE}")}]}})
    );
    // Cut in the middle of the GitHub token, and again inside the Stripe key.
    let a = event.find("0123456789abc").unwrap();
    let b = event.find("4eC39").unwrap();
    let lab = raw_lab(Canned {
        content_type: "text/event-stream",
        chunks: vec![event[..a].into(), event[a..b].into(), event[b..].into()],
    });
    let sid = initialize(lab.g.addr);
    let r = mcp_post(lab.g.addr, &call(8, "anything", "{}"), Some(&sid));
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/event-stream")),
        "streaming stays streaming"
    );
    let raw = r.text();
    assert!(
        !raw.contains(GITHUB) && !raw.contains("0123456789abc"),
        "{raw}"
    );
    assert!(!raw.contains(STRIPE), "{raw}");
    let msg = rpc_result(&r);
    assert_eq!(
        msg["result"]["content"][0]["text"],
        "token [REDACTED:github_token] and [REDACTED:stripe_key]"
    );
}

#[test]
fn an_event_stream_labelled_in_capitals_is_read_as_one_and_still_redacted() {
    // Media types are case-insensitive: an upstream writing `Text/Event-Stream` sends a valid
    // answer, which must be neither lost (read as JSON and refused) nor relayed unchecked.
    let event = format!(
        "event: message\ndata: {}\n\n",
        serde_json::json!({"jsonrpc":"2.0","id":8,"result":{"content":[{"type":"text","text":format!("key {AWS}")}]}})
    );
    for content_type in ["Text/Event-Stream", "TEXT/EVENT-STREAM; charset=UTF-8"] {
        let lab = raw_lab(Canned {
            content_type,
            chunks: vec![event.clone().into()],
        });
        let sid = initialize(lab.g.addr);
        let r = mcp_post(lab.g.addr, &call(8, "anything", "{}"), Some(&sid));
        assert_eq!(r.status, 200, "{content_type}: {}", r.text());
        assert!(
            r.header("cache-control").is_some_and(|c| c == "no-cache"),
            "{content_type}: relayed as a stream"
        );
        assert!(!r.text().contains(AWS), "{content_type}: {}", r.text());
        assert_eq!(
            rpc_result(&r)["result"]["content"][0]["text"],
            "key [REDACTED:aws_access_key]",
            "{content_type}"
        );
    }
}

#[test]
fn an_answer_that_cannot_be_parsed_is_refused_not_relayed() {
    // Cut short: a client's lenient parser might still show the text.
    let cut =
        format!(r#"{{"jsonrpc":"2.0","id":9,"result":{{"content":[{{"type":"text","text":"{AWS}"#);
    // A lone surrogate escape beside the key: not a string every parser decodes the same.
    let surrogate = format!(
        r#"{{"jsonrpc":"2.0","id":9,"result":{{"content":[{{"type":"text","text":"\ud800 {AWS}"}}]}}}}"#
    );
    for body in [cut, surrogate] {
        let json = raw_lab(Canned {
            content_type: "application/json",
            chunks: vec![body.clone().into()],
        });
        let sid = initialize(json.g.addr);
        let r = mcp_post(json.g.addr, &call(9, "anything", "{}"), Some(&sid));
        assert_eq!(r.status, 502, "{body}: {}", r.text());
        assert!(!r.text().contains(AWS));

        let sse = raw_lab(Canned {
            content_type: "text/event-stream",
            chunks: vec![format!("event: message\ndata: {body}\n\n").into()],
        });
        let sid = initialize(sse.g.addr);
        let r = mcp_post(sse.g.addr, &call(9, "anything", "{}"), Some(&sid));
        assert!(!r.text().contains(AWS), "{body}: {}", r.text());
    }
}

#[test]
fn a_bad_redaction_config_is_refused_naming_its_key() {
    let dir = tempfile::tempdir().unwrap();
    for (section, key) in [
        (
            "[redaction]\npatterns = { \"bad\" = \"(\" }\n",
            "redaction.patterns.bad",
        ),
        (
            "[redaction]\npatterns = { \"all\" = \".*\" }\n",
            "redaction.patterns.all",
        ),
        (
            "[redaction]\ndetectors = [\"aws\"]\n",
            "redaction.detectors[0]",
        ),
        ("[redaction]\nenabled = true\nmode = \"x\"\n", "mode"),
    ] {
        let p = dir.path().join("guard.toml");
        std::fs::write(&p, format!("{}\n{section}", stdio_config("auto", "", &[]))).unwrap();
        let out = std::process::Command::new(GUARD)
            .args(["validate", "--config", p.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{section}");
        assert!(err.contains(key), "{section}: {err}");
    }
}

#[test]
fn a_tool_list_smuggled_into_another_requests_answer_is_filtered_too() {
    // A client matches responses by id: an upstream answering a tools/call could slip in a
    // tool list under the id of a tools/list the client still waits for. Every answer goes
    // through the tool gates, not only answers to a tools/list.
    let smuggled =
        r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"echo"},{"name":"delete_all"}]}}"#;
    let escaped = r#"{"jsonrpc":"2.0","id":2,"result":{"t\u006fols":[{"name":"delete_all"}]}}"#;
    let answer = r#"{"jsonrpc":"2.0","id":7,"result":{"content":[{"type":"text","text":"ok"}]}}"#;
    for content_type in ["text/event-stream", "application/json"] {
        let chunks = if content_type == "text/event-stream" {
            [smuggled, escaped, answer]
                .iter()
                .map(|m| format!("event: message\ndata: {m}\n\n").into())
                .collect()
        } else {
            vec![format!("[{smuggled},{answer}]").into()]
        };
        let r = restricted_call(Canned {
            content_type,
            chunks,
        });
        let text = r.text();
        assert_eq!(r.status, 200, "{content_type}: {text}");
        assert!(!text.contains("delete_all"), "{content_type}: {text}");
        assert!(text.contains("\"echo\""), "{content_type}: {text}");
        assert!(text.contains("\"ok\""), "{content_type}: {text}");
    }
}

#[test]
fn the_body_of_an_upstreams_answer_to_delete_is_not_relayed() {
    // No transform reads a DELETE's answer, so its body (here a secret and a tool list) must
    // not reach the client at all: the status is relayed, the body dropped.
    let lab = raw_lab(Canned {
        content_type: "application/json",
        chunks: vec![b"{}".to_vec()],
    });
    let (_, sid) = initialize_at(lab.g.addr, "/mcp", "");
    let r = request(
        lab.g.addr,
        &format!(
            "DELETE /mcp HTTP/1.1\r\nHost: x\r\nMcp-Session-Id: {sid}\r\nMCP-Protocol-Version: 2025-06-18\r\nContent-Length: 0\r\n\r\n"
        ),
    );
    let text = r.text();
    assert_eq!(r.status, 200, "{text}");
    assert!(
        !text.contains("AKIA") && !text.contains("delete_all"),
        "{text}"
    );
    assert!(text.is_empty(), "{text}");
}

/// A caller allowed only `echo` and `anything` calls `anything` on an upstream answering it
/// with `canned`.
fn restricted_call(canned: Canned) -> Response {
    const KEY: &str = "restricted-key-1";
    let addr = raw_upstream(canned);
    let g = Gateway::start(&format!(
        "{}\n[[auth.api_keys]]\nid = \"alice\"\nkey_hash = \"{}\"\nallowed_tools = [\"echo\", \"anything\"]\n",
        http_config("auto", &format!("http://{addr}/mcp"), "", ""),
        hash_key(KEY)
    ));
    let (_, sid) = initialize_at(g.addr, "/mcp", &bearer(KEY));
    request(
        g.addr,
        &mcp_post_raw(&call(7, "anything", "{}"), Some(&sid), &bearer(KEY)),
    )
}

#[test]
fn a_control_character_in_a_tool_list_member_name_refuses_the_list() {
    // json-c reads `"tools\u0000"` as `tools` and `"name\u0000"` as `name` (a later member
    // wins there): such a list cannot be filtered the way the client reads it, so it is not
    // relayed.
    for smuggled in [
        r#"{"jsonrpc":"2.0","id":7,"result":{"tools":[{"name":"echo"}],"tools\u0000":[{"name":"delete_all"}]}}"#,
        r#"{"jsonrpc":"2.0","id":7,"result":{"tools":[{"name":"echo","name\u0000":"delete_all"}]}}"#,
    ] {
        let r = restricted_call(Canned {
            content_type: "application/json",
            chunks: vec![smuggled.as_bytes().to_vec()],
        });
        let text = r.text();
        assert!(
            !text.contains("delete_all"),
            "{smuggled}: {} {text}",
            r.status
        );
    }
}

// --- What the red team found (each test is named after its attack) --------------------------

/// The answer to a tools/call on a raw upstream answering `chunks` as `content_type`.
fn raw_call(content_type: &'static str, chunks: Vec<Vec<u8>>) -> (Lab, Response) {
    let lab = raw_lab(Canned {
        content_type,
        chunks,
    });
    let sid = initialize(lab.g.addr);
    let r = mcp_post(lab.g.addr, &call(7, "anything", "{}"), Some(&sid));
    (lab, r)
}

#[test]
fn card_numbers_sent_as_json_numbers_in_any_spelling_are_redacted() {
    let body = r#"{"jsonrpc":"2.0","id":7,"result":{"content":[{"type":"text","text":"ok"}],"structuredContent":{"a":-4111111111111111,"b":4111111111111111.0,"c":4.111111111111111e15,"d":41111111111111110e-1,"e":[4111111111111111E+0],"pi":5.678901234567891,"n":4111111111111112}}}"#;
    for content_type in ["application/json", "text/event-stream"] {
        let chunks = if content_type == "application/json" {
            vec![body.into()]
        } else {
            vec![format!("event: message\ndata: {body}\n\n").into()]
        };
        let (_lab, r) = raw_call(content_type, chunks);
        assert_eq!(r.status, 200, "{content_type}: {}", r.text());
        for spelling in [
            "4111111111111111",
            "4.111111111111111e15",
            "41111111111111110e-1",
        ] {
            assert!(!r.text().contains(spelling), "{content_type}: {}", r.text());
        }
        let msg = rpc_result(&r);
        let s = &msg["result"]["structuredContent"];
        for key in ["a", "b", "c", "d"] {
            assert_eq!(s[key], "[REDACTED:card_number]", "{content_type}: {key}");
        }
        assert_eq!(s["e"][0], "[REDACTED:card_number]", "{content_type}");
        // A float and a number failing Luhn stay numbers.
        assert_eq!(s["pi"], 5.678901234567891, "{content_type}");
        assert_eq!(s["n"], 4111111111111112u64, "{content_type}");
    }
}

#[test]
fn secrets_in_sse_comments_event_types_ids_and_retry_lines_do_not_reach_the_client() {
    let answer = r#"{"jsonrpc":"2.0","id":7,"result":{"content":[{"type":"text","text":"ok"}]}}"#;
    let note = r#"{"jsonrpc":"2.0","method":"notifications/message","params":{"level":"info","data":"x"}}"#;
    let (_lab, r) = raw_call(
        "text/event-stream",
        vec![
            format!(": keep-alive {AWS}\n\n").into(),
            format!(": {AWS}\nevent: {SLACK}\nid: {AWS}\ndata: {note}\n\n").into(),
            format!("retry: {AWS}\nid: evt-2\nevent: message\ndata: {answer}\n\n").into(),
        ],
    );
    assert_eq!(r.status, 200);
    let raw = r.text();
    assert!(!raw.contains(AWS) && !raw.contains(SLACK), "{raw}");
    // Each SSE line is still one field: the markers replace the values in place, a
    // comment goes out emptied, and a retry that is not a number is dropped.
    let lines: Vec<&str> = raw.lines().collect();
    assert!(lines.contains(&"id: [REDACTED:aws_access_key]"), "{raw}");
    assert!(lines.contains(&"event: [REDACTED:slack_token]"), "{raw}");
    assert!(lines.contains(&":"), "{raw}");
    assert!(lines.contains(&"id: evt-2"), "{raw}");
    assert!(!raw.contains("retry"), "{raw}");
    assert_eq!(rpc_result(&r)["result"]["content"][0]["text"], "ok");
}

#[test]
fn invalid_utf8_is_refused_in_a_json_body_and_dropped_from_an_sse_stream() {
    let mut bad = br#"{"jsonrpc":"2.0","method":"notifications/message","params":{"level":"info","data":"AKIA"#.to_vec();
    bad.push(0xFF);
    bad.extend_from_slice(br#"IOSFODNN7EXAMPLE"}}"#);
    let answer = r#"{"jsonrpc":"2.0","id":7,"result":{"content":[{"type":"text","text":"ok"}]}}"#;
    // A JSON body: refused whole.
    let mut body = bad.clone();
    body.truncate(body.len() - 2);
    body.extend_from_slice(br#"},"id":7,"result":{}}"#);
    let (_lab, r) = raw_call("application/json", vec![body]);
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(!r.text().contains("OSFODNN7"));
    // An SSE stream: that event dropped (never relayed with U+FFFD in it), the next flows.
    let mut event = b"event: message\ndata: ".to_vec();
    event.extend_from_slice(&bad);
    event.extend_from_slice(b"\n\n");
    let (_lab, r) = raw_call(
        "text/event-stream",
        vec![event, format!("event: message\ndata: {answer}\n\n").into()],
    );
    assert_eq!(r.status, 200);
    let raw = r.text();
    assert!(
        !raw.contains("OSFODNN7") && !raw.contains('\u{FFFD}'),
        "{raw}"
    );
    assert_eq!(rpc_result(&r)["result"]["content"][0]["text"], "ok");
}

#[test]
fn red_team_detector_gaps_pgp_pem_variants_putty_odd_jwts_jwe_aws_prefixes_card_separators() {
    let lab = lab("http-json");
    let addr = lab.g.addr;
    let sid = initialize(addr);
    let jwt_payload = "eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U";
    let cases: Vec<(&str, String, &str)> = vec![
        ("private_key", "-----BEGIN PGP PRIVATE KEY BLOCK-----\n\nlQOYBGJsecretbody\n-----END PGP PRIVATE KEY BLOCK-----".into(), "lQOYBGJsecretbody"),
        ("private_key", "----begin  rsa  private  key----\nMIIEsecretbody\n----end  rsa  private  key----".into(), "MIIEsecretbody"),
        ("private_key", "------BEGIN EC PRIVATE KEY------\nMHcCsecretbody\n------END EC PRIVATE KEY------".into(), "MHcCsecretbody"),
        ("private_key", "PuTTY-User-Key-File-3: ssh-ed25519\nEncryption: none\nComment: k\nPublic-Lines: 1\nAAAAC3Nz\nPrivate-Lines: 1\nAAAAsecretbody\nPrivate-MAC: 1f2e".into(), "AAAAsecretbody"),
        ("jwt", format!("IHsiYWxnIjoiSFMyNTYiLCJ0eXAiOiJKV1QifQ.{jwt_payload}"), "IHsiYWxnIjoiSFMyNTYi"),
        ("jwt", format!("77u_eyJhbGciOiJIUzI1NiJ9.{jwt_payload}"), "77u_eyJhbGciOiJIUzI1NiJ9"),
        ("jwt", "eyJhbGciOiJkaXIiLCJlbmMiOiJBMTI4R0NNIn0..MTIzNDU2Nzg5MDEy.c2VjcmV0IHBheWxvYWQgaGVyZQ.MDEyMzQ1Njc4OWFiY2RlZg".into(), "c2VjcmV0IHBheWxvYWQgaGVyZQ"),
        ("aws_access_key", "ABIAIOSFODNN7EXAMPLE".into(), "OSFODNN7"),
        ("aws_access_key", "ACCAIOSFODNN7EXAMPLE".into(), "OSFODNN7"),
        ("card_number", "4111\u{00A0}1111\u{00A0}1111\u{00A0}1111".into(), "1111"),
        ("card_number", "4111\u{202F}1111\u{202F}1111\u{202F}1111".into(), "1111"),
        ("card_number", "4111\u{2013}1111\u{2014}1111\u{2013}1111".into(), "1111"),
        ("card_number", "4111.1111.1111.1111".into(), "1111"),
        ("card_number", "4111/1111/1111/1111".into(), "1111"),
        ("card_number", "4111_1111_1111_1111".into(), "1111"),
        ("card_number", "4111 - 1111 - 1111 - 1111".into(), "1111"),
    ];
    for (i, (detector, secret, part)) in cases.into_iter().enumerate() {
        let r = echo(addr, &sid, 100 + i as u64, &format!("found: {secret}\nend"));
        assert!(!r.text().contains(part), "{detector}: {}", r.text());
        let shown = rpc_result(&r)["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(
            shown,
            format!("found: [REDACTED:{detector}]\nend"),
            "{secret}"
        );
    }
    // A JWT glued to the base64url character before it, a card number between two letters:
    // the secret goes, the glue stays.
    for (text, shown) in [
        (
            format!("xeyJhbGciOiJIUzI1NiJ9.{jwt_payload}"),
            "x[REDACTED:jwt]",
        ),
        ("x4111111111111111y".to_string(), "x[REDACTED:card_number]y"),
    ] {
        let r = echo(addr, &sid, 199, &text);
        assert_eq!(rpc_result(&r)["result"]["content"][0]["text"], shown);
    }
    // Run together with more digits, or the digits after a decimal point: not a card.
    for text in ["id 94111111111111111", "ratio 1.4111111111111111"] {
        let r = echo(addr, &sid, 200, text);
        assert_eq!(rpc_result(&r)["result"]["content"][0]["text"], text);
    }
}

#[test]
fn a_server_request_id_and_a_response_method_are_scanned_but_a_response_id_is_left_alone() {
    // A request from the server: its id is upstream text that reaches the client. A response
    // carrying a `method` member: not the envelope of a response.
    let request = format!(r#"{{"jsonrpc":"2.0","id":"{AWS}","method":"ping"}}"#);
    let answer = format!(
        r#"{{"jsonrpc":"2.0","id":7,"method":"{STRIPE}","result":{{"content":[{{"type":"text","text":"ok"}}]}}}}"#
    );
    let (_lab, r) = raw_call(
        "text/event-stream",
        vec![
            format!("event: message\ndata: {request}\n\nevent: message\ndata: {answer}\n\n").into(),
        ],
    );
    let raw = r.text();
    assert!(!raw.contains(AWS) && !raw.contains(STRIPE), "{raw}");
    let messages = r.sse_messages();
    assert!(
        messages
            .iter()
            .any(|m| m["id"] == "[REDACTED:aws_access_key]" && m["method"] == "ping"),
        "{raw}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m["id"] == 7 && m["method"] == "[REDACTED:stripe_key]"),
        "{raw}"
    );
    // A response's id is the client's own: the gateway leaves it as the client sent it.
    let lab = lab("http-json");
    let sid = initialize(lab.g.addr);
    let body = format!(
        r#"{{"jsonrpc":"2.0","id":"{AWS}","method":"tools/call","params":{{"name":"echo","arguments":{{"text":"hi"}}}}}}"#
    );
    let r = mcp_post(lab.g.addr, &body, Some(&sid));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(rpc_result(&r)["id"], AWS);
}

#[test]
fn an_sse_event_too_large_to_check_ends_the_call_with_its_error_not_a_cut_stream() {
    // The head (200, an event stream) has gone out when the event proves too large to check:
    // the client is told why, with its call's id, rather than left with a stream cut short.
    let progress = format!(
        "event: message\ndata: {}\n\n",
        serde_json::json!({"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":"p","progress":1}})
    );
    let huge = format!("event: message\ndata: {}", "x".repeat(17 << 20));
    let lab = raw_lab(Canned {
        content_type: "text/event-stream",
        chunks: vec![progress.into(), huge.into()],
    });
    let sid = initialize(lab.g.addr);
    let r = mcp_post(lab.g.addr, &call(11, "anything", "{}"), Some(&sid));
    assert_eq!(r.status, 200, "{}", r.text());
    let messages = r.sse_messages();
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert_eq!(messages[0]["method"], "notifications/progress");
    assert_eq!(messages[1]["id"], 11, "{messages:?}");
    assert!(messages[1]["error"]["code"].is_i64(), "{messages:?}");
    assert!(
        !r.text().contains("xxxx"),
        "none of the unchecked event reached the client"
    );
}
