//! Secret redaction's cost per KiB of upstream answer: a JSON body and an SSE event, with no
//! secret (the fast path every clean answer takes) and with one, and the slow path a configured
//! pattern forces on text holding escapes. `scan/…` is the redaction's own scan of the message
//! text; `json/…` and `sse/…` add the transform chain around it (the body's JSON parse, the
//! event's reassembly).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mcp_guard::mcp::filter::SseFilter;
use mcp_guard::mcp::redact::{BUILTIN, RedactionConfig, Redactor};
use mcp_guard::mcp::transform::Transform;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;

/// A tool result of about `kib` KiB of log-like prose (line breaks as `\n` escapes), with
/// `secret` in the middle.
fn result(kib: usize, secret: &str) -> String {
    let mut text = String::new();
    let mut line = 0;
    while text.len() < kib * 1024 {
        line += 1;
        text.push_str(&format!(
            "{line:04}: build 20261128-{line} finished in 42.7 s; 1834 tests passed, 0 failed\\n"
        ));
        if line == 20 {
            text.push_str(secret);
        }
    }
    format!(
        r#"{{"jsonrpc":"2.0","id":7,"result":{{"content":[{{"type":"text","text":"{text}"}}],"isError":false}}}}"#
    )
}

fn redactor(patterns: &[(&str, &str)]) -> Arc<Redactor> {
    let detectors: Vec<String> = BUILTIN.iter().map(|s| s.to_string()).collect();
    let patterns: BTreeMap<String, String> = patterns
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Arc::new(
        Redactor::new(&RedactionConfig {
            detectors: &detectors,
            patterns: &patterns,
            replacement: "[REDACTED:{name}]",
        })
        .expect("bench config compiles"),
    )
}

fn benches(c: &mut Criterion) {
    let builtin = redactor(&[]);
    let with_pattern = redactor(&[("internal_id", "INT-[0-9]{8}")]);
    let mut g = c.benchmark_group("redaction");
    for kib in [4, 64] {
        for (case, secret, r) in [
            ("clean", "", &builtin),
            ("aws_key", "key AKIAIOSFODNN7EXAMPLE ", &builtin),
            ("clean_with_pattern", "", &with_pattern),
        ] {
            let body = result(kib, secret);
            g.throughput(Throughput::Bytes(body.len() as u64));
            // The scan alone, without the transform chain's parse of the body.
            let mut fired = vec![0; r.len()];
            g.bench_function(format!("scan/{case}/{kib}KiB"), |b| {
                b.iter(|| black_box(r.message(black_box(&body), &mut fired)))
            });
            let mut t = Transform::redaction_only(r.clone());
            g.bench_function(format!("json/{case}/{kib}KiB"), |b| {
                b.iter(|| black_box(t.json(black_box(body.as_bytes()))))
            });
            let event = format!("event: message\ndata: {body}\n\n");
            let mut f = SseFilter::with(Transform::redaction_only(r.clone()));
            g.bench_function(format!("sse/{case}/{kib}KiB"), |b| {
                b.iter(|| black_box(f.push(black_box(event.as_bytes()))))
            });
        }
    }
    g.finish();
}

criterion_group!(redaction, benches);
criterion_main!(redaction);
