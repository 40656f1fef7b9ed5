//! OpenTelemetry traces through the real binary: an OTLP/HTTP receiver on loopback collects
//! the gateway's exports; they are decoded from the protobuf wire format here (and, where a
//! Python with the official `opentelemetry-proto` package is found, by it too, and the two
//! must agree). Checked: one span per request, its parent the caller's span, the upstream
//! handed the gateway's span as parent, the attributes, sampling (trusted and untrusted
//! parents), hostile trace headers, no secret in any export, the trace id in every audit event.

mod common;

use common::*;
use mcp_guard::cli::hash_key;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const KEY: &str = "otel-key-5d2e7a91c4";
const SECRET_ARG: &str = "arg-secret-94c1b0";
const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// A loopback OTLP/HTTP receiver: each POST's body, kept; every answer 200.
struct Receiver {
    url: String,
    bodies: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Receiver {
    fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let b2 = bodies.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                if let Some(body) = read_post(&mut conn) {
                    b2.lock().unwrap().push(body);
                }
                let _ = conn.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
            }
        });
        Receiver { url, bodies }
    }

    /// Every span received so far, decoded.
    fn spans(&self) -> Vec<Span> {
        let bodies = self.bodies.lock().unwrap().clone();
        bodies.iter().flat_map(|b| decode_export(b)).collect()
    }

    /// Waits until some span satisfies `done`; returns all spans received.
    fn wait_for(&self, what: &str, done: impl Fn(&Span) -> bool) -> Vec<Span> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let spans = self.spans();
            if spans.iter().any(&done) {
                return spans;
            }
            assert!(Instant::now() < deadline, "no span {what}: {spans:#?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn raw(&self) -> Vec<Vec<u8>> {
        self.bodies.lock().unwrap().clone()
    }
}

fn read_post(conn: &mut std::net::TcpStream) -> Option<Vec<u8>> {
    conn.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = conn.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        assert!(head.starts_with("post /v1/traces "), "{head}");
        assert!(
            head.contains("content-type: application/x-protobuf"),
            "{head}"
        );
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())?;
        if buf.len() >= end + 4 + len {
            return Some(buf[end + 4..end + 4 + len].to_vec());
        }
    }
}

// A protobuf wire-format reader, written from the encoding spec; the field numbers are those of
// opentelemetry-proto's trace.proto and common.proto.

#[derive(Debug)]
enum Field<'a> {
    Varint(u64),
    Fixed,
    Bytes(&'a [u8]),
}

fn fields(mut b: &[u8]) -> Vec<(u64, Field<'_>)> {
    fn varint(b: &mut &[u8]) -> u64 {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = b[0];
            *b = &b[1..];
            v |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                break;
            }
        }
        v
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = varint(&mut b);
        let field = match key & 7 {
            0 => Field::Varint(varint(&mut b)),
            1 => {
                b = &b[8..];
                Field::Fixed
            }
            2 => {
                let n = varint(&mut b) as usize;
                let (v, rest) = b.split_at(n);
                b = rest;
                Field::Bytes(v)
            }
            5 => {
                b = &b[4..];
                Field::Fixed
            }
            w => panic!("unexpected wire type {w}"),
        };
        out.push((key >> 3, field));
    }
    out
}

fn sub(b: &[u8], n: u64) -> Vec<&[u8]> {
    fields(b)
        .into_iter()
        .filter_map(|(f, v)| match v {
            Field::Bytes(x) if f == n => Some(x),
            _ => None,
        })
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A decoded span: what the tests look at.
#[derive(Debug, Clone, PartialEq)]
struct Span {
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
    kind: u64,
    attributes: BTreeMap<String, Value>,
    service: String,
}

fn decode_export(body: &[u8]) -> Vec<Span> {
    let mut spans = Vec::new();
    for rs in sub(body, 1) {
        let service = sub(rs, 1)
            .first()
            .and_then(|res| attributes(res, 1).get("service.name").cloned())
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        for ss in sub(rs, 2) {
            for s in sub(ss, 2) {
                let mut span = Span {
                    trace_id: String::new(),
                    span_id: String::new(),
                    parent_span_id: String::new(),
                    name: String::new(),
                    kind: 0,
                    attributes: attributes(s, 9),
                    service: service.clone(),
                };
                for (f, v) in fields(s) {
                    match (f, v) {
                        (1, Field::Bytes(b)) => span.trace_id = hex(b),
                        (2, Field::Bytes(b)) => span.span_id = hex(b),
                        (4, Field::Bytes(b)) => span.parent_span_id = hex(b),
                        (5, Field::Bytes(b)) => span.name = String::from_utf8(b.to_vec()).unwrap(),
                        (6, Field::Varint(k)) => span.kind = k,
                        _ => {}
                    }
                }
                spans.push(span);
            }
        }
    }
    spans
}

/// `repeated KeyValue attributes` (field 9 of Span, 1 of Resource): string and int values.
fn attributes(msg: &[u8], field: u64) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for (f, v) in fields(msg) {
        let Field::Bytes(kv) = v else { continue };
        if f != field {
            continue;
        }
        let (mut k, mut val) = (None, Value::Null);
        for (f, v) in fields(kv) {
            match (f, v) {
                (1, Field::Bytes(b)) => k = Some(String::from_utf8(b.to_vec()).unwrap()),
                (2, Field::Bytes(any)) => {
                    for (f, v) in fields(any) {
                        val = match (f, v) {
                            (1, Field::Bytes(s)) => String::from_utf8(s.to_vec()).unwrap().into(),
                            (3, Field::Varint(i)) => (i as i64).into(),
                            _ => continue,
                        };
                    }
                }
                _ => {}
            }
        }
        if let Some(k) = k {
            out.insert(k, val);
        }
    }
    out
}

/// A Python that has the official `opentelemetry-proto` definitions, if one is around.
fn python_with_otel_proto() -> Option<String> {
    let candidates = [
        std::env::var("MCP_GUARD_OTEL_PYTHON").ok(),
        Some(
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/interop/.venv/bin/python"
            )
            .to_string(),
        ),
    ];
    candidates.into_iter().flatten().find(|py| {
        std::process::Command::new(py)
            .args([
                "-c",
                "import opentelemetry.proto.collector.trace.v1.trace_service_pb2",
            ])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

const PY_DECODE: &str = r#"
import json, sys
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
out = []
for path in sys.argv[1:]:
    req = ExportTraceServiceRequest()
    req.ParseFromString(open(path, "rb").read())
    for rs in req.resource_spans:
        service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
        for ss in rs.scope_spans:
            for s in ss.spans:
                attrs = {}
                for a in s.attributes:
                    kind = a.value.WhichOneof("value")
                    attrs[a.key] = a.value.string_value if kind == "string_value" else a.value.int_value
                out.append({"trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                    "parent_span_id": s.parent_span_id.hex(), "name": s.name, "kind": s.kind,
                    "attributes": attrs, "service": service})
print(json.dumps(out))
"#;

/// Decodes the exports with the official definitions, when they are installed, and checks
/// that they read exactly what this file's reader read.
fn cross_check_with_official_definitions(rx: &Receiver) {
    let Some(py) = python_with_otel_proto() else {
        // In CI the venv is installed first (.ci/run): its absence there is a failure.
        assert!(
            std::env::var("CI").is_err(),
            "CI: tests/interop/.venv lacks opentelemetry-proto (INTEROP_INSTALL_ONLY=1 tests/interop/run.sh)"
        );
        eprintln!(
            "otel: no Python with opentelemetry-proto (tests/interop/.venv or MCP_GUARD_OTEL_PYTHON); \
             the official-definition cross-check is skipped"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for (i, b) in rx.raw().iter().enumerate() {
        let p = dir.path().join(format!("{i}.pb"));
        std::fs::write(&p, b).unwrap();
        paths.push(p);
    }
    let out = std::process::Command::new(py)
        .arg("-c")
        .arg(PY_DECODE)
        .args(&paths)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let official: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let ours: Vec<Value> = rx
        .spans()
        .into_iter()
        .map(|s| {
            serde_json::json!({"trace_id": s.trace_id, "span_id": s.span_id,
                "parent_span_id": s.parent_span_id, "name": s.name, "kind": s.kind,
                "attributes": s.attributes, "service": s.service})
        })
        .collect();
    assert_eq!(official, ours);
}

fn config(up: &DemoHttp, rx: &Receiver, tracing: &str, extra: &str) -> String {
    // One worker: a request's span is queued before the next request is served, so a later
    // request's span arriving proves an earlier one's absence.
    format!(
        "[server]\nport = 0\nworkers = 1\n[admin]\nport = 0\n\n[upstream]\ntransport = \"http\"\nurl = \"{}\"\ntimeout_secs = 10\n\n[[auth.api_keys]]\nid = \"carol\"\nkey_hash = \"{}\"\n\n[tracing]\nenabled = true\nservice_name = \"guard-under-test\"\notlp_endpoint = \"{}\"\n{tracing}\n{extra}\n",
        up.url(),
        hash_key(KEY),
        rx.url
    )
}

/// POSTs `body` with the key and `extra` header lines.
fn post(g: &Gateway, body: &str, sid: Option<&str>, extra: &str) -> Response {
    request(
        g.addr,
        &mcp_post_raw(body, sid, &format!("{}{extra}", bearer(KEY))),
    )
}

fn init(g: &Gateway) -> String {
    let r = post(g, INIT, None, "");
    assert_eq!(r.status, 200, "{}", r.text());
    let sid = r.header("mcp-session-id").unwrap().to_string();
    let n = post(
        g,
        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
        Some(&sid),
        "",
    );
    assert_eq!(n.status, 202);
    sid
}

/// The headers the upstream received with a `last_request_headers` call.
fn upstream_headers(g: &Gateway, sid: &str, id: u64, extra: &str) -> Value {
    let r = post(
        g,
        &call(
            id,
            "last_request_headers",
            &format!(r#"{{"token":"{SECRET_ARG}"}}"#),
        ),
        Some(sid),
        extra,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    serde_json::from_str(
        rpc_result(&r)["result"]["content"][0]["text"]
            .as_str()
            .unwrap(),
    )
    .unwrap()
}

/// `(trace id, parent id, flags)` of a `traceparent`.
fn parts(tp: &str) -> (String, String, String) {
    let p: Vec<&str> = tp.split('-').collect();
    assert_eq!(p.len(), 4, "{tp}");
    assert_eq!(
        (p[0], p[1].len(), p[2].len(), p[3].len()),
        ("00", 32, 16, 2)
    );
    (p[1].into(), p[2].into(), p[3].into())
}

fn assert_no_secret(rx: &Receiver) {
    for b in rx.raw() {
        for secret in [KEY, SECRET_ARG, "Bearer"] {
            assert!(
                !b.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "`{secret}` is in an export"
            );
        }
    }
}

#[test]
fn the_gateway_span_sits_between_the_caller_and_the_upstream() {
    let up = DemoHttp::start(&["--test-tools"]);
    let rx = Receiver::start();
    // Nothing is sampled by rate: only a caller's sampled parent (trusted) makes a span.
    let g = Gateway::start(&config(
        &up,
        &rx,
        "sample_rate = 0.0\nhonour_parent_sampling = true",
        "",
    ));
    let sid = init(&g);
    // Unsampled: no parent at all, and a parent that says "not sampled".
    let seen = upstream_headers(&g, &sid, 2, "");
    let (trace, _, flags) = parts(seen["traceparent"].as_str().unwrap());
    assert_eq!(flags, "00");
    let unsampled_parent = "00-11111111111111111111111111111111-2222222222222222-00";
    let seen = upstream_headers(&g, &sid, 3, &format!("traceparent: {unsampled_parent}\r\n"));
    let (trace2, parent2, flags2) = parts(seen["traceparent"].as_str().unwrap());
    assert_eq!(
        (trace2.as_str(), flags2.as_str()),
        ("11111111111111111111111111111111", "00")
    );
    assert_ne!(
        parent2, "2222222222222222",
        "the gateway's span is the upstream's parent"
    );
    assert_ne!(trace, trace2);

    // Sampled by the caller: one span, the caller's span its parent, itself the upstream's.
    let seen = upstream_headers(
        &g,
        &sid,
        4,
        &format!("traceparent: {TP}\r\ntracestate: rojo=00f067aa0ba902b7,congo=t61rcWkgMzE\r\n"),
    );
    let (up_trace, up_parent, up_flags) = parts(seen["traceparent"].as_str().unwrap());
    assert_eq!(up_trace, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(up_flags, "01");
    assert_eq!(
        seen["tracestate"].as_str(),
        Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
    );
    let spans = rx.wait_for("for the sampled call", |s| s.trace_id == up_trace);
    assert_eq!(
        spans.len(),
        1,
        "only the sampled request has a span: {spans:#?}"
    );
    let s = &spans[0];
    assert_eq!(s.parent_span_id, "00f067aa0ba902b7");
    assert_eq!(
        s.span_id, up_parent,
        "the upstream's parent is the gateway's span"
    );
    assert_eq!(s.kind, 2, "a server span");
    assert_eq!(s.name, "tools/call");
    assert_eq!(s.service, "guard-under-test");
    let a = &s.attributes;
    for (k, v) in [
        ("mcp.method", "tools/call"),
        ("mcp.tool.name", "last_request_headers"),
        ("enduser.id", "carol"),
        ("mcp_guard.decision", "allow"),
        ("mcp_guard.upstream", "default"),
        ("http.request.method", "POST"),
        ("url.path", "/mcp"),
        ("mcp.session.id", sid.as_str()),
    ] {
        assert_eq!(a.get(k).and_then(Value::as_str), Some(v), "{k}: {a:?}");
    }
    assert_eq!(a["http.response.status_code"], 200);
    for phase in ["admit", "body", "decide", "upstream", "reply"] {
        assert!(
            a[&format!("mcp_guard.phase.{phase}_us")].is_i64(),
            "{phase}: {a:?}"
        );
    }
    assert_no_secret(&rx);
    cross_check_with_official_definitions(&rx);
    assert_eq!(
        metric_reaches(&g, "mcp_guard_trace_spans_exported_total", 1.0),
        1.0
    );
    assert_eq!(g.metric("mcp_guard_trace_spans_dropped_total", &[]), 0.0);
}

#[test]
fn an_untrusted_sampled_flag_does_not_choose_what_is_traced() {
    let up = DemoHttp::start(&["--test-tools"]);
    let rx = Receiver::start();
    // Half the traces by the trace id's low 64 bits: ...0001 is in, ...ffff is out.
    let g = Gateway::start(&config(
        &up,
        &rx,
        "sample_rate = 0.5\nhonour_parent_sampling = false",
        "",
    ));
    let sid = init(&g);
    let out_but_claims_sampled = "00-aaaaaaaaaaaaaaaaffffffffffffffff-1111111111111111-01";
    let in_but_claims_unsampled = "00-bbbbbbbbbbbbbbbb0000000000000001-1111111111111111-00";
    let seen = upstream_headers(
        &g,
        &sid,
        2,
        &format!("traceparent: {out_but_claims_sampled}\r\n"),
    );
    assert_eq!(parts(seen["traceparent"].as_str().unwrap()).2, "00");
    let seen = upstream_headers(
        &g,
        &sid,
        3,
        &format!("traceparent: {in_but_claims_unsampled}\r\n"),
    );
    assert_eq!(parts(seen["traceparent"].as_str().unwrap()).2, "01");
    let spans = rx.wait_for("for the sampled trace", |s| {
        s.trace_id == "bbbbbbbbbbbbbbbb0000000000000001"
    });
    assert!(
        !spans
            .iter()
            .any(|s| s.trace_id == "aaaaaaaaaaaaaaaaffffffffffffffff"),
        "{spans:#?}"
    );
    cross_check_with_official_definitions(&rx);
}

#[test]
fn hostile_trace_headers_start_a_new_trace_and_every_audit_event_has_its_trace_id() {
    let up = DemoHttp::start(&["--test-tools"]);
    let rx = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let g = Gateway::start(&config(
        &up,
        &rx,
        "sample_rate = 1.0",
        &format!("[audit]\nfile = {:?}\n", audit.to_str().unwrap()),
    ));
    let sid = init(&g);
    let oversized = format!("{TP}-{}", "0".repeat(2000));
    let members: Vec<String> = (0..40).map(|i| format!("k{i}=v")).collect();
    let too_many = members.join(",");
    let hostile = [
        "traceparent: 00-zz\r\n".to_string(),
        format!("traceparent: {oversized}\r\n"),
        format!("traceparent: {}\r\n", TP.to_uppercase()),
        "traceparent: 00-00000000000000000000000000000000-00f067aa0ba902b7-01\r\n".to_string(),
        // A valid parent with a tracestate too long to forward.
        format!("traceparent: {TP}\r\ntracestate: {too_many}\r\n"),
    ];
    let mut upstream_traces = Vec::new();
    for (i, h) in hostile.iter().enumerate() {
        let seen = upstream_headers(&g, &sid, 10 + i as u64, h);
        let (trace, _, flags) = parts(seen["traceparent"].as_str().unwrap());
        assert_eq!(flags, "01", "sample_rate 1 traces everything");
        assert!(seen.get("tracestate").is_none(), "{h}: {seen}");
        upstream_traces.push(trace);
    }
    // The malformed ones started new traces; the last kept the caller's.
    for t in &upstream_traces[..4] {
        assert_ne!(t, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(t, "00000000000000000000000000000000");
    }
    assert_eq!(upstream_traces[4], "4bf92f3577b34da6a3ce929d0e0e4736");
    // A refused request is traced too, with its decision.
    let r = request(
        g.addr,
        &mcp_post_raw(PING_BODY, Some(&sid), "Authorization: Bearer wrong-key\r\n"),
    );
    assert_eq!(r.status, 401);
    let last = upstream_traces[4].clone();
    let spans = rx.wait_for("for the refused request", |s| {
        s.attributes.get("http.response.status_code") == Some(&Value::from(401))
    });
    // initialize, initialized, five calls, the refusal.
    assert_eq!(spans.len(), 8, "{spans:#?}");
    for t in &upstream_traces[..4] {
        let s = spans.iter().find(|s| &s.trace_id == t).expect("a span");
        assert_eq!(s.parent_span_id, "", "a new trace has no parent");
    }
    let s = spans.iter().find(|s| s.trace_id == last).unwrap();
    assert_eq!(s.parent_span_id, "00f067aa0ba902b7");
    let refused = spans.last().unwrap();
    assert_eq!(refused.attributes["mcp_guard.decision"], "deny");
    // Refused on the head: neither body nor upstream phase.
    assert!(refused.attributes["mcp_guard.phase.admit_us"].is_i64());
    for phase in ["body", "upstream"] {
        assert!(
            !refused
                .attributes
                .contains_key(&format!("mcp_guard.phase.{phase}_us")),
            "{phase}: {:?}",
            refused.attributes
        );
    }
    assert!(!refused.attributes.contains_key("enduser.id"));
    assert_no_secret(&rx);

    // Every audit event carries the trace id of its request's span.
    let deadline = Instant::now() + Duration::from_secs(10);
    let lines: Vec<Value> = loop {
        let text = std::fs::read_to_string(&audit).unwrap_or_default();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.len() >= 8 {
            break lines;
        }
        assert!(Instant::now() < deadline, "audit lines missing: {text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let span_traces: Vec<&str> = spans.iter().map(|s| s.trace_id.as_str()).collect();
    for l in &lines {
        let t = l["trace_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no trace id: {l}"));
        assert!(span_traces.contains(&t), "{t} is no span's trace: {l}");
    }
    cross_check_with_official_definitions(&rx);
}

#[test]
fn without_propagation_trace_headers_are_neither_read_nor_forwarded() {
    let up = DemoHttp::start(&["--test-tools"]);
    let rx = Receiver::start();
    let g = Gateway::start(&config(
        &up,
        &rx,
        "sample_rate = 1.0\npropagate_context = false",
        "",
    ));
    let sid = init(&g);
    let seen = upstream_headers(
        &g,
        &sid,
        2,
        &format!("traceparent: {TP}\r\ntracestate: a=b\r\n"),
    );
    assert!(seen.get("traceparent").is_none(), "{seen}");
    assert!(seen.get("tracestate").is_none(), "{seen}");
    let spans = rx.wait_for("for the call", |s| s.name == "tools/call");
    let s = spans.iter().find(|s| s.name == "tools/call").unwrap();
    assert_eq!(s.parent_span_id, "");
    assert_ne!(s.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
}

#[test]
fn a_dead_collector_costs_spans_not_requests() {
    let up = DemoHttp::start(&["--test-tools"]);
    // A port nothing listens on.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}/v1/traces", closed.local_addr().unwrap());
    drop(closed);
    let rx = Receiver {
        url: dead,
        bodies: Default::default(),
    };
    let g = Gateway::start(&config(&up, &rx, "sample_rate = 1.0", ""));
    let sid = init(&g);
    let seen = upstream_headers(&g, &sid, 2, "");
    assert_eq!(parts(seen["traceparent"].as_str().unwrap()).2, "01");
    assert_eq!(
        metric_reaches(&g, "mcp_guard_trace_spans_failed_total", 3.0),
        3.0
    );
    assert_eq!(g.metric("mcp_guard_trace_spans_exported_total", &[]), 0.0);
}

/// A counter, polled until it reaches `want` (the exporter counts after the collector answers).
fn metric_reaches(g: &Gateway, name: &str, want: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v = g.metric(name, &[]);
        if v >= want || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

const PING_BODY: &str = r#"{"jsonrpc":"2.0","id":9,"method":"ping"}"#;

#[test]
fn a_caller_that_cannot_authenticate_does_not_choose_to_be_traced_nor_what_a_span_holds() {
    // Red team (fleet, F3): a wrong key, a "sampled" traceparent and a 16 KB Mcp-Session-Id got
    // every refusal exported with the whole header as an attribute: 0.5 GB to the collector in
    // 4 s, and the export queue's memory grew with the header.
    let up = DemoHttp::start(&["--test-tools"]);
    let rx = Receiver::start();
    let g = Gateway::start(&config(&up, &rx, "sample_rate = 0.0", ""));
    let huge = "S".repeat(16_000);
    let refused_trace = "00-cccccccccccccccc0000000000000001-1111111111111111-01";
    for key in ["Authorization: Bearer mcpg_wrong\r\n", ""] {
        let r = request(
            g.addr,
            &mcp_post_raw(
                PING_BODY,
                Some(&huge),
                &format!("{key}traceparent: {refused_trace}\r\n"),
            ),
        );
        assert_eq!(r.status, 401, "{}", r.text());
    }
    // The same flag from the known caller is honoured (W3C's parent-based default), and what
    // its span holds of the client's text is bounded.
    let sid = init(&g);
    let known_trace = "00-dddddddddddddddd0000000000000001-1111111111111111-01";
    let r = request(
        g.addr,
        &mcp_post_raw(
            PING_BODY,
            Some(&format!("{sid}{huge}")),
            &format!("{}traceparent: {known_trace}\r\n", bearer(KEY)),
        ),
    );
    assert_eq!(r.status, 404, "{}", r.text());
    let spans = rx.wait_for("for the known caller", |s| {
        s.trace_id == "dddddddddddddddd0000000000000001"
    });
    assert!(
        !spans
            .iter()
            .any(|s| s.trace_id == "cccccccccccccccc0000000000000001"),
        "a refusal before authentication was exported on the client's say-so: {spans:#?}"
    );
    let known = spans
        .iter()
        .find(|s| s.trace_id == "dddddddddddddddd0000000000000001")
        .unwrap();
    for (name, value) in &known.attributes {
        if let Some(text) = value.as_str() {
            assert!(text.len() <= 256, "{name} holds {} bytes", text.len());
        }
    }
    for raw in rx.raw() {
        assert!(raw.len() < 8_000, "an export of {} bytes", raw.len());
    }
}
