//! The deployment examples stay true: the Kubernetes ConfigMap's configuration validates, and
//! every metric the Grafana dashboard queries is one a running gateway exports.

mod common;

use common::*;
use std::collections::BTreeSet;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/deploy");

/// The `guard.toml: |` block of the ConfigMap, unindented.
fn configmap_guard_toml() -> String {
    let yaml = std::fs::read_to_string(format!("{DEPLOY}/kubernetes.yaml")).unwrap();
    let mut lines = yaml
        .lines()
        .skip_while(|l| l.trim() != "guard.toml: |")
        .skip(1);
    let mut out = String::new();
    for line in lines.by_ref() {
        if !line.is_empty() && !line.starts_with("    ") {
            break;
        }
        out.push_str(line.strip_prefix("    ").unwrap_or(line));
        out.push('\n');
    }
    assert!(out.contains("[server]"), "no guard.toml block found");
    out
}

#[test]
fn the_kubernetes_configmap_validates() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("guard.toml");
    // Upstream host names are resolved at load; the cluster's Service names do not resolve here.
    let config = configmap_guard_toml()
        .replace("mcp-server:", "localhost:")
        .replace("mcp-guard-redis:", "localhost:");
    std::fs::write(&path, config).unwrap();
    let out = std::process::Command::new(GUARD)
        .args(["validate", "--config"])
        .arg(&path)
        .env(
            "MCP_GUARD_SESSION_KEY",
            "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=",
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `mcp_guard_…` names in a PromQL expression (a histogram's `_bucket` series named by its
/// family).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("mcp_guard_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.push(name);
    }
    names
}

#[test]
fn every_metric_the_dashboard_queries_is_exported() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{DEPLOY}/grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    let wanted: BTreeSet<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .flat_map(|t| metric_names(t["expr"].as_str().unwrap()))
        .collect();
    assert!(wanted.len() >= 10, "{wanted:?}");
    let g = Gateway::start(&stdio_config("auto", "", &[]));
    let exposition = g.admin_get("/metrics").text();
    let exported: BTreeSet<&str> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for name in &wanted {
        let family = name
            .strip_suffix("_bucket")
            .or_else(|| name.strip_suffix("_sum"))
            .or_else(|| name.strip_suffix("_count"))
            .filter(|f| exported.contains(f))
            .unwrap_or(name);
        assert!(
            exported.contains(family),
            "the dashboard queries {name}, which /metrics does not export"
        );
    }
}
