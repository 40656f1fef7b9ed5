//! Criterion bench of argument constraints (`[[tool_rules]]`): a typical rule set (three
//! rules on one tool: a `path_under`, a `regex`, a `max`) evaluated on the classifier's own
//! parse, against the same classification without rules; and a call of a tool no rule names.
//! The difference between the first two is what the constraints cost per request.

use criterion::{Criterion, criterion_group, criterion_main};
use mcp_guard::config::schema::ToolRuleSection;
use mcp_guard::mcp::jsonrpc::Classifier;
use mcp_guard::rules::{Source, ToolRules, compile};
use std::hint::black_box;
use std::sync::Arc;

const CALL: &[u8] = br#"{"jsonrpc":"2.0","id":42,"method":"tools/call","params":{"name":"read_file","arguments":{"path":"/srv/data/reports/2026/q3.md","encoding":"utf-8","limit":100}}}"#;
const OTHER: &[u8] = br#"{"jsonrpc":"2.0","id":42,"method":"tools/call","params":{"name":"search","arguments":{"query":"quarterly report","limit":100}}}"#;

const TYPICAL: &str = r#"
[[tool_rules]]
tool = "read_file"
[[tool_rules.args]]
pointer = "/path"
required = true
path_under = ["/srv/data", "/srv/shared"]

[[tool_rules]]
tool = "read_file"
[[tool_rules.args]]
pointer = "/encoding"
regex = "^(utf-8|latin-1|ascii)$"

[[tool_rules]]
tool = "read_*"
[[tool_rules.args]]
pointer = "/limit"
type = "integer"
max = 1000
"#;

fn rules() -> ToolRules {
    #[derive(serde::Deserialize)]
    struct File {
        tool_rules: Vec<ToolRuleSection>,
    }
    let f: File = toml::from_str(TYPICAL).unwrap();
    compile(&f.tool_rules, &[Arc::from("default")]).unwrap()
}

fn constraints(c: &mut Criterion) {
    let rules = rules();
    let mut classifier = Classifier::new();
    c.bench_function("rules/classify_without_rules", |b| {
        b.iter(|| black_box(classifier.classify(black_box(CALL)).unwrap()))
    });
    c.bench_function("rules/classify_with_typical_rules", |b| {
        b.iter(|| {
            let mut refused = false;
            let body = classifier
                .classify_inspecting(black_box(CALL), &mut |i, tool, args| {
                    let source = Source::new(CALL, i);
                    refused |= rules
                        .check(tool, "default", "alice", args, source)
                        .is_some();
                })
                .unwrap();
            assert!(!refused);
            black_box(body)
        })
    });
    c.bench_function("rules/classify_tool_without_rules", |b| {
        b.iter(|| {
            let body = classifier
                .classify_inspecting(black_box(OTHER), &mut |i, tool, args| {
                    let source = Source::new(OTHER, i);
                    black_box(rules.check(tool, "default", "alice", args, source));
                })
                .unwrap();
            black_box(body)
        })
    });
}

criterion_group!(benches, constraints);
criterion_main!(benches);
