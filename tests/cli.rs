//! Every CLI command's success and error paths, through the real binary.

mod common;

use common::*;
use std::process::Command;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(GUARD).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn version_prints_the_package_version() {
    let (code, out, _) = run(&["version"]);
    assert_eq!(code, 0);
    assert_eq!(
        out.trim(),
        format!("mcp-guard {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn validate_accepts_a_good_file_and_rejects_a_bad_one_with_position() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, stdio_config("auto", "", &[])).unwrap();
    let (code, out, _) = run(&["validate", "--config", good.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(out.contains("valid"), "{out}");

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[server]\nport = 1\nmax_conections = 5\n").unwrap();
    let (code, _, err) = run(&["validate", "--config", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("bad.toml:3:1"), "{err}");
    assert!(err.contains("did you mean `max_connections`"), "{err}");

    let (code, _, err) = run(&["validate", "--config", "/nonexistent/guard.toml"]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot read config file"), "{err}");
}

#[test]
fn validate_warns_about_settings_without_effect_in_this_build() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tracing.toml");
    let cfg = format!(
        "{}\n[tracing]\nenabled = true\n",
        stdio_config("auto", "", &[])
    );
    std::fs::write(&p, cfg).unwrap();
    let (code, _, err) = run(&["validate", "--config", p.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(err.contains("warning: tracing.enabled"), "{err}");
}

#[test]
fn validate_reports_missing_environment_variables() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("env.toml");
    std::fs::write(
        &p,
        "[upstream]\ncommand = \"${MCP_GUARD_TEST_UNSET_VAR}\"\n",
    )
    .unwrap();
    let (code, _, err) = run(&["validate", "--config", p.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("MCP_GUARD_TEST_UNSET_VAR"), "{err}");
}

#[test]
fn init_writes_a_valid_starter_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("guard.toml");
    let path = p.to_str().unwrap();
    let (code, _, _) = run(&["init", "--output", path]);
    assert_eq!(code, 0);
    let (code, _, err) = run(&["validate", "--config", path]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(&["init", "--output", path]);
    assert_eq!(code, 1);
    assert!(err.contains("already exists"), "{err}");
    let (code, _, _) = run(&["init", "--output", path, "--force"]);
    assert_eq!(code, 0);
}

#[test]
fn keygen_prints_a_key_whose_hash_matches_hash_key() {
    let (code, out, _) = run(&["keygen", "--user-id", "ci-pipeline"]);
    assert_eq!(code, 0);
    let key = out
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("mcpg_"))
        .expect("a key line");
    let hash_line = out.lines().find(|l| l.starts_with("key_hash")).unwrap();
    let (code, hashed, _) = run(&["hash-key", key]);
    assert_eq!(code, 0);
    assert!(hash_line.contains(hashed.trim()), "{hash_line} vs {hashed}");
    assert!(out.contains("id = \"ci-pipeline\""));
    let (code, _, err) = run(&["keygen", "--user-id", ""]);
    assert_eq!(code, 1, "{err}");
}

#[test]
fn hash_key_is_base64_sha256() {
    // SHA-256("test") in standard base64.
    let (code, out, _) = run(&["hash-key", "test"]);
    assert_eq!(code, 0);
    assert_eq!(out.trim(), "n4bQgYhMfWWaL+qgxVrQFaO/TxsrC4Is0V1sFbDwCgg=");
}

#[test]
fn check_upstream_passes_for_live_servers_and_fails_for_dead_ones() {
    let dir = tempfile::tempdir().unwrap();
    let stdio = dir.path().join("stdio.toml");
    std::fs::write(&stdio, stdio_config("auto", "", &[])).unwrap();
    let (code, out, _) = run(&["check-upstream", "--config", stdio.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("PASS"), "{out}");

    let up = DemoHttp::start(&[]);
    let http = dir.path().join("http.toml");
    std::fs::write(&http, http_config("auto", &up.url(), "", "")).unwrap();
    let (code, out, _) = run(&["check-upstream", "--config", http.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("mcp-demo-server"), "{out}");

    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dead = dir.path().join("dead.toml");
    std::fs::write(
        &dead,
        http_config("auto", &format!("http://127.0.0.1:{dead_port}/mcp"), "", ""),
    )
    .unwrap();
    let (code, out, _) = run(&["check-upstream", "--config", dead.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(out.starts_with("FAIL"), "{out}");

    let missing = dir.path().join("missing.toml");
    std::fs::write(
        &missing,
        "[upstream]\ncommand = \"/nonexistent/mcp-server\"\n",
    )
    .unwrap();
    let (code, out, _) = run(&["check-upstream", "--config", missing.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(out.contains("cannot start"), "{out}");
}

#[test]
fn running_without_config_is_a_usage_error() {
    let (code, _, err) = run(&[]);
    assert_eq!(code, 2);
    assert!(err.contains("--config"), "{err}");
    let (code, _, err) = run(&["--config", "/nonexistent.toml"]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot read config file"), "{err}");
}
