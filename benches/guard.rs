//! Criterion benches of the guard path: API-key check, authorization, rate-limit decision,
//! audit enqueue, tools/list filtering, and the whole guarded request (head parse + auth +
//! classify + authorize + rate limit + audit enqueue), steady state.

use criterion::{Criterion, criterion_group, criterion_main};
use mcp_guard::audit::{AuditEvent, AuditOutput, AuditWriter};
use mcp_guard::auth::api_key::{ApiKeys, decode_hash};
use mcp_guard::auth::{Authenticator, RateKey};
use mcp_guard::authz::{Matcher, Policy, Rule};
use mcp_guard::cli::hash_key;
use mcp_guard::http::request::{HeadParse, parse_head};
use mcp_guard::mcp::filter::filter_json;
use mcp_guard::mcp::jsonrpc::{Body, Classifier, Target, is_spec_tool_name};
use mcp_guard::observe::metrics::Metrics;
use mcp_guard::ratelimit::{Limit, LocalLimiter, MemoryPool, bucket_key};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

const CALL: &[u8] = br#"{"jsonrpc":"2.0","id":42,"method":"tools/call","params":{"name":"read_file","arguments":{"path":"/etc/hosts","limit":100}}}"#;

fn request_head(key: &str) -> Vec<u8> {
    format!(
        "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:3000\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nMcp-Session-Id: c2Vzc2lvbg.AAAA\r\nMCP-Protocol-Version: 2025-11-25\r\nAuthorization: Bearer {key}\r\nContent-Length: {}\r\n\r\n",
        CALL.len()
    )
    .into_bytes()
}

fn policy() -> Arc<Policy> {
    Arc::new(Policy {
        tools: Rule {
            allow: Matcher::new(&["read_*", "search", "list_directory"]),
            deny: Matcher::new(&["delete_*", "read_secret*"]),
        },
        ..Policy::default()
    })
}

/// An authenticator with 1,000 keys (lookup cost must not depend on the count).
fn authenticator() -> Authenticator {
    let mut keys = ApiKeys::default();
    for i in 0..1000 {
        let k = format!("key-{i:04}-0123456789abcdef");
        keys.insert(
            &format!("id-{i}"),
            decode_hash(&hash_key(&k)).unwrap(),
            policy(),
        );
    }
    Authenticator {
        api_keys: Some(keys),
        ..Authenticator::default()
    }
}

fn event(identity: Arc<str>) -> AuditEvent {
    AuditEvent {
        time: SystemTime::now(),
        request_id: "0a1b2c3d-00-0000000001".into(),
        client_request_id: None,
        trace_id: None,
        identity: Some(identity),
        auth_method: "api_key",
        client: "127.0.0.1".parse().unwrap(),
        method: "tools/call".into(),
        target: Some(("tool", "read_file".into())),
        decision: "allow",
        reason: None,
        status: 200,
        upstream: "default".into(),
        latency_us: 120,
        arguments: None,
    }
}

fn benches(c: &mut Criterion) {
    let auth = authenticator();
    let head_bytes = request_head("key-0500-0123456789abcdef");
    let HeadParse::Complete(head) = parse_head(&head_bytes, 16384, 1 << 22).unwrap() else {
        panic!("head")
    };
    let peer = "127.0.0.1".parse().unwrap();
    c.bench_function("api_key_check_1000_keys", |b| {
        b.iter(|| auth.authenticate(black_box(&head), peer).unwrap())
    });

    let p = policy();
    let target = mcp_guard::mcp::jsonrpc::Target::Tool("read_file".into());
    c.bench_function("authorize_tools_call", |b| {
        b.iter(|| p.decide(Some(black_box(&target))))
    });

    // Resource URIs are normalised before matching; a plain one must take the borrowed path.
    for (name, uri) in [
        (
            "normalize_resource_uri_plain",
            "file:///public/reports/2024/q3.csv",
        ),
        (
            "normalize_resource_uri_dotted",
            "file:///public/a/%2e%2E/reports/./q3.csv",
        ),
    ] {
        c.bench_function(name, |b| {
            b.iter(|| mcp_guard::authz::uri::normalize(black_box(uri)).is_ok())
        });
    }

    let pool = MemoryPool::default();
    let limiter = LocalLimiter::new(2);
    let key = bucket_key(&RateKey::Identity("id-500"), None);
    let limit = Limit {
        rate: 1e9,
        burst: 1_000_000_000,
    };
    c.bench_function("rate_limit_decision", |b| {
        b.iter(|| {
            limiter
                .check(&pool, black_box(key), limit, Instant::now())
                .unwrap()
        })
    });

    // Audit into a real writer thread (writing to /dev/null), as a worker does.
    let metrics = Metrics::new(1);
    let (writer, mut sinks) = AuditWriter::start(
        AuditOutput {
            file: Some("/dev/null".into()),
            stdout: false,
        },
        &[1 << 16],
        metrics,
    )
    .unwrap();
    let sink = sinks.pop().unwrap();
    let id: Arc<str> = Arc::from("id-500");
    c.bench_function("audit_enqueue", |b| b.iter(|| sink.push(event(id.clone()))));

    let tools: Vec<String> = (0..100)
        .map(|i| {
            let name = if i % 3 == 0 { format!("read_{i}") } else { format!("write_{i}") };
            format!(r#"{{"name":"{name}","description":"Tool number {i}","inputSchema":{{"type":"object","properties":{{"path":{{"type":"string"}}}}}}}}"#)
        })
        .collect();
    let list = format!(
        r#"{{"jsonrpc":"2.0","id":1,"result":{{"tools":[{}]}}}}"#,
        tools.join(",")
    );
    c.bench_function("tools_list_filter_100_tools", |b| {
        b.iter(|| filter_json(black_box(list.as_bytes()), &p.tools).unwrap())
    });

    let mut classifier = Classifier::new();
    c.bench_function("guard_path_whole", |b| {
        b.iter(|| {
            let HeadParse::Complete(head) =
                parse_head(black_box(&head_bytes), 16384, 1 << 22).unwrap()
            else {
                unreachable!()
            };
            let caller = auth.authenticate(&head, peer).unwrap();
            let body = classifier.classify(black_box(CALL)).unwrap();
            let Body::Single(m) = &body else {
                unreachable!()
            };
            if let Some(Target::Tool(t)) = &m.target {
                assert!(is_spec_tool_name(t));
            }
            let decision = caller.identity.policy.decide(m.target.as_ref());
            let key = bucket_key(&caller.rate_key, None);
            limiter.check(&pool, key, limit, Instant::now()).unwrap();
            sink.push(event(caller.identity.id.clone()));
            decision
        })
    });
    writer.stop();
}

criterion_group!(guard, benches);
criterion_main!(guard);
