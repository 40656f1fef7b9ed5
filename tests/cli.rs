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
        "{}\nurl = \"http://127.0.0.1:1/mcp\"\n[rate_limit]\nenabled = false\nburst_size = 9\n[tracing]\nenabled = false\nsample_rate = 0.5\n",
        stdio_config("auto", "", &[])
    );
    std::fs::write(&p, cfg).unwrap();
    let (code, _, err) = run(&["validate", "--config", p.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("warning: upstream.url has no effect: upstream.transport is \"stdio\""),
        "{err}"
    );
    assert!(
        err.contains("warning: rate_limit.burst_size has no effect: rate_limit.enabled is false"),
        "{err}"
    );
    assert!(
        err.contains("warning: tracing.sample_rate has no effect: tracing.enabled is false"),
        "{err}"
    );
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

/// Runs `mcp-guard ARGS` in `dir`; returns (exit code, stdout, stderr).
fn run_in(dir: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(GUARD)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Held by each test that validates a starter as written: `validate` checks that its fixed
/// ports (3000, 9090) are free by binding them, so two such checks at once (tests run in
/// parallel) would each find the other's bind and fail.
static STARTER_PORTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn starter_ports() -> std::sync::MutexGuard<'static, ()> {
    STARTER_PORTS.lock().unwrap_or_else(|e| e.into_inner())
}

/// A written starter with its fixed ports (3000, 9090) turned into port 0, so tests running in
/// parallel never collide; nothing else is changed.
fn on_free_ports(config: &str) -> String {
    let out = config.replacen("port = 3000 ", "port = 0    ", 1).replacen(
        "port = 9090 ",
        "port = 0    ",
        1,
    );
    assert_eq!(out.matches("port = 0 ").count(), 2, "{config}");
    out
}

#[test]
fn init_writes_a_valid_starter_and_refuses_to_overwrite() {
    let _ports = starter_ports();
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = run_in(dir.path(), &["init"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.is_empty(), "no key without --with-key: {out}");
    assert!(err.contains("validate --config guard.toml"), "{err}");
    assert!(err.contains("docs/configuration.md"), "{err}");
    let p = dir.path().join("guard.toml");
    let path = p.to_str().unwrap();
    // It validates as written, with no help from PATH: the demo server is named by full path.
    let out = Command::new(GUARD)
        .args(["validate", "--config", path])
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, _, err) = run(&["init", "--output", path]);
    assert_eq!(code, 1);
    assert!(err.contains("already exists"), "{err}");
    let (code, _, _) = run(&["init", "--output", path, "--force"]);
    assert_eq!(code, 0);
    // `-` prints it instead, the same starter.
    let (code, printed, _) = run(&["init", "--output", "-"]);
    assert_eq!(code, 0);
    assert!(
        printed.contains(&format!("command = {DEMO:?}")),
        "{printed}"
    );
    assert!(printed.contains("#[[auth.api_keys]]"), "{printed}");
}

#[test]
fn the_default_starter_runs_as_is_against_the_bundled_demo_server() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = run_in(dir.path(), &["init"]);
    assert_eq!(code, 0, "{err}");
    let written = std::fs::read_to_string(dir.path().join("guard.toml")).unwrap();
    assert!(
        written.contains(&format!("command = {DEMO:?}")),
        "{written}"
    );
    // The security blocks are there to read and turn on, and off by default.
    for block in ["#[[auth.api_keys]]", "#[rate_limit]", "#[audit]"] {
        assert!(written.contains(block), "{block} missing: {written}");
    }
    let audit = dir.path().join("audit.jsonl");
    assert!(
        written.contains(&format!("#file = {:?}", audit.to_str().unwrap())),
        "{written}"
    );
    // The alternatives stay, commented.
    assert!(written.contains("# args = [\"-y\", \"@modelcontextprotocol/server-everything\"]"));
    assert!(written.contains("# transport = \"http\""));
    let g = Gateway::start(&on_free_ports(&written));
    let sid = initialize(g.addr);
    let r = mcp_post(g.addr, &call(2, "echo", r#"{"text":"hi"}"#), Some(&sid));
    assert_eq!(rpc_result(&r)["result"]["content"][0]["text"], "hi");
}

#[test]
fn init_with_key_enables_the_key_rate_limit_and_audit_and_prints_the_key_once() {
    let _ports = starter_ports();
    let dir = tempfile::tempdir().unwrap();
    let (code, key, err) = run_in(
        dir.path(),
        &["init", "--with-key", "ci-bot", "--output", "g.toml"],
    );
    assert_eq!(code, 0, "{err}");
    // stdout is the key and nothing else, so `KEY=$(mcp-guard init --with-key ...)` works;
    // how to use it is on stderr.
    let key = key.trim_end_matches('\n');
    assert!(
        key.starts_with("mcpg_") && !key.contains(char::is_whitespace),
        "{key}"
    );
    assert!(err.contains("Authorization: Bearer <key>"), "{err}");
    assert!(!err.contains(key), "the key is printed once");
    let written = std::fs::read_to_string(dir.path().join("g.toml")).unwrap();
    assert!(!written.contains(key), "only the hash is stored");
    let (_, hash, _) = run(&["hash-key", key]);
    assert!(
        written.contains(&format!("key_hash = \"{}\"", hash.trim())),
        "{written}"
    );
    for on in [
        "[[auth.api_keys]]\nid = \"ci-bot\"",
        "\n[rate_limit]\n",
        "\n[audit]\n",
    ] {
        assert!(written.contains(on), "{on} not enabled: {written}");
    }
    let (code, _, err) = run(&[
        "validate",
        "--config",
        dir.path().join("g.toml").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");

    let g = Gateway::start(&on_free_ports(&written));
    // Without the key: 401; a wrong key: 401.
    let r = mcp_post(g.addr, INIT, None);
    assert_eq!(r.status, 401, "{}", r.text());
    let bearer = |k: &str| format!("Authorization: Bearer {k}\r\n");
    let r = request(g.addr, &mcp_post_raw(INIT, None, &bearer("mcpg_wrong")));
    assert_eq!(r.status, 401);
    // With it: the whole flow.
    let post =
        |body: &str, sid: Option<&str>| request(g.addr, &mcp_post_raw(body, sid, &bearer(key)));
    let r = post(INIT, None);
    assert_eq!(r.status, 200, "{}", r.text());
    let sid = r.header("mcp-session-id").unwrap().to_string();
    let r = post(
        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
        Some(&sid),
    );
    assert_eq!(r.status, 202);
    let r = post(&call(2, "echo", r#"{"text":"hi"}"#), Some(&sid));
    assert_eq!(rpc_result(&r)["result"]["content"][0]["text"], "hi");
    // The example policy: sleep on the deny list, notify not on the allow list.
    let r = post(&call(3, "sleep", r#"{"ms":1}"#), Some(&sid));
    let e = &rpc_result(&r)["error"];
    assert_eq!(
        e["message"], "Tool 'sleep' is denied for this caller",
        "{e}"
    );
    assert_eq!(e["data"]["reason"], "denied_by_deny_list");
    let r = post(&call(4, "notify", "{}"), Some(&sid));
    let e = &rpc_result(&r)["error"];
    assert_eq!(
        e["message"], "Tool 'notify' is not on this caller's allow list",
        "{e}"
    );
    // The audit trail is next to the configuration, with the reasons.
    let audit = dir.path().join("audit.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&audit).unwrap_or_default();
        if text.contains("\"not_on_allow_list\"") && text.contains("\"denied_by_deny_list\"") {
            assert!(text.contains("\"identity\":\"ci-bot\""), "{text}");
            assert!(!text.contains(key), "the key leaked into the audit trail");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "audit: {text}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn init_with_key_defaults_its_id_and_refuses_what_it_cannot_do() {
    let dir = tempfile::tempdir().unwrap();
    let (code, key, err) = run_in(dir.path(), &["init", "--with-key"]);
    assert_eq!(code, 0, "{err}");
    assert!(key.starts_with("mcpg_"));
    let written = std::fs::read_to_string(dir.path().join("guard.toml")).unwrap();
    assert!(
        written.contains("[[auth.api_keys]]\nid = \"agent\""),
        "{written}"
    );
    // The key goes to stdout, so the configuration cannot.
    let (code, out, err) = run(&["init", "--with-key", "x", "--output", "-"]);
    assert_eq!(code, 1);
    assert!(out.is_empty() && err.contains("--output"), "{err}");
    let (code, _, err) = run_in(dir.path(), &["init", "--with-key", "a\"b", "-o", "h.toml"]);
    assert_eq!(code, 1);
    assert!(err.contains("--with-key must be non-empty"), "{err}");
    assert!(!dir.path().join("h.toml").exists());
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

/// Runs `mcp-guard ARGS` with `input` on stdin; returns (exit code, stdout, stderr).
fn run_stdin(args: &[&str], input: &[u8]) -> (i32, String, String) {
    use std::io::Write as _;
    let mut child = Command::new(GUARD)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The key may be longer than the command reads: a closed pipe is not a test failure.
    let _ = child.stdin.take().unwrap().write_all(input);
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn hash_key_dash_reads_one_line_from_stdin_and_refuses_keys_the_gateway_never_accepts() {
    let key = "mcpg_a_long_enough_test_key";
    let (_, by_arg, err) = run(&["hash-key", key]);
    assert!(err.is_empty(), "{err}");
    // The trailing newline (LF or CRLF) is not part of the key; a second line is not read.
    for input in [format!("{key}\n"), format!("{key}\r\n"), key.to_string()] {
        let (code, out, err) = run_stdin(&["hash-key", "-"], input.as_bytes());
        assert_eq!(code, 0, "{err}");
        assert_eq!(out, by_arg, "{input:?}");
        assert!(err.is_empty(), "{err}");
    }
    let (_, out, _) = run_stdin(&["hash-key", "-"], format!("{key}\nsecond\n").as_bytes());
    assert_eq!(out, by_arg);
    assert!(run(&["hash-key", "--help"]).1.contains("stdin"));
    // A short key is hashed, with a warning on stderr only.
    let (code, out, err) = run_stdin(&["hash-key", "-"], b"test\n");
    assert_eq!(code, 0);
    assert_eq!(out.trim(), "n4bQgYhMfWWaL+qgxVrQFaO/TxsrC4Is0V1sFbDwCgg=");
    assert!(err.contains("warning: the key is only 4 bytes"), "{err}");
    // The gateway's limit is 512 bytes: up to it is fine, past it is refused, either way in.
    let (code, _, err) = run(&["hash-key", &"a".repeat(512)]);
    assert_eq!(code, 0, "{err}");
    let long = "a".repeat(513);
    let (code, out, err) = run(&["hash-key", &long]);
    assert_eq!(code, 1);
    assert!(
        out.is_empty() && err.contains("longer than 512 bytes"),
        "{err}"
    );
    let (code, out, err) = run_stdin(&["hash-key", "-"], "é".repeat(5000).as_bytes());
    assert_eq!(code, 1);
    assert!(
        out.is_empty() && err.contains("longer than 512 bytes"),
        "{err}"
    );
    for empty in [&b""[..], b"\n"] {
        let (code, _, err) = run_stdin(&["hash-key", "-"], empty);
        assert_eq!(code, 1);
        assert!(err.contains("must not be empty"), "{err}");
    }
}

#[test]
fn init_never_writes_through_a_symlink_and_its_files_are_private() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let elsewhere = d.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let important = elsewhere.join("important.conf");
    std::fs::write(&important, "IMPORTANT\n").unwrap();
    // A dangling link: without --force it "exists", and its target is not created.
    let dangling = d.join("guard.toml");
    std::os::unix::fs::symlink(elsewhere.join("created-by-init"), &dangling).unwrap();
    let (code, _, err) = run(&["init", "--output", dangling.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("already exists"), "{err}");
    assert!(!elsewhere.join("created-by-init").exists());
    // With --force, a link is replaced, and its target is left as it was.
    let linked = d.join("g2.toml");
    std::os::unix::fs::symlink(&important, &linked).unwrap();
    let (code, _, err) = run(&[
        "init",
        "--with-key",
        "--force",
        "-o",
        linked.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read_to_string(&important).unwrap(), "IMPORTANT\n");
    let meta = std::fs::symlink_metadata(&linked).unwrap();
    assert!(meta.file_type().is_file(), "{meta:?}");
    assert!(
        std::fs::read_to_string(&linked)
            .unwrap()
            .contains("[[auth.api_keys]]")
    );
    assert_eq!(mode(&linked), 0o600);
    // A file someone else left there, world-writable, is replaced by a private one.
    let open = d.join("g3.toml");
    std::fs::write(&open, "").unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (code, _, err) = run(&["init", "--force", "--output", open.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(mode(&open), 0o600);
    // A new file is private too; and no temporary file is left behind.
    let (code, _, err) = run(&["init", "--output", d.join("g4.toml").to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(mode(&d.join("g4.toml")), 0o600);
    let mut names: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["elsewhere", "g2.toml", "g3.toml", "g4.toml", "guard.toml"]
    );
}

#[test]
fn ids_and_paths_holding_dollar_braces_are_written_literally_not_as_env_references() {
    let _ports = starter_ports();
    let dir = tempfile::tempdir().unwrap();
    // The output directory's name and the identity both look like references.
    let sub = dir.path().join("${HOME}x");
    std::fs::create_dir(&sub).unwrap();
    let out = sub.join("g.toml");
    let (code, key, err) = run(&[
        "init",
        "--with-key",
        "${HOME}x",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let key = key.trim();
    let written = std::fs::read_to_string(&out).unwrap();
    assert!(!written.contains("${HOME}"), "{written}");
    assert!(written.contains("id = \"\\u0024{HOME}x\""), "{written}");
    let (code, _, err) = run(&["validate", "--config", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    // Run with HOME set to something else: the identity and the audit file's directory are
    // the literal names, not HOME's value.
    let g = Gateway::start_env(&on_free_ports(&written), &[("HOME", "/nonexistent-home")]);
    let r = request(
        g.addr,
        &mcp_post_raw(INIT, None, &format!("Authorization: Bearer {key}\r\n")),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let audit = sub.join("audit.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&audit).unwrap_or_default();
        if text.contains("\"identity\":\"${HOME}x\"") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "audit: {text}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // keygen's entry, pasted into a configuration, loads as the same literal identity.
    let (code, entry, err) = run(&["keygen", "--user-id", "${HOME}x"]);
    assert_eq!(code, 0, "{err}");
    let entry = &entry[entry.find("[[auth.api_keys]]").unwrap()..];
    assert!(entry.contains("id = \"\\u0024{HOME}x\""), "{entry}");
    let parsed: toml::Table = toml::from_str(entry).unwrap();
    assert_eq!(
        parsed["auth"]["api_keys"][0]["id"].as_str(),
        Some("${HOME}x")
    );
    let cfg = dir.path().join("keygen.toml");
    std::fs::write(&cfg, format!("{}\n{entry}", stdio_config("auto", "", &[]))).unwrap();
    let out = Command::new(GUARD)
        .args(["validate", "--config", cfg.to_str().unwrap()])
        .env_remove("HOME")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn ids_with_control_or_invisible_formatting_characters_are_refused_without_echoing_them() {
    let dir = tempfile::tempdir().unwrap();
    for id in [
        "a\u{1b}[31mRED\u{7}",
        "tab\there",
        "admin\u{202E}txt",
        "ad\u{200B}min",
        "\u{FEFF}agent",
        "x\u{2066}y",
        "c1\u{85}",
    ] {
        let out = dir.path().join("c.toml");
        let (code, _, err) = run(&["init", "--with-key", id, "-o", out.to_str().unwrap()]);
        assert_eq!(code, 1, "{id:?}");
        assert!(err.contains("--with-key must be non-empty"), "{err}");
        assert!(!err.contains(id), "the refusal echoes the id: {err:?}");
        assert!(!out.exists());
        let (code, stdout, err) = run(&["keygen", "--user-id", id]);
        assert_eq!(code, 1, "{id:?}");
        assert!(
            stdout.is_empty() && err.contains("--user-id must be"),
            "{err}"
        );
    }
    // Ordinary non-ASCII names stay welcome.
    let (code, _, err) = run(&["keygen", "--user-id", "José-Ω"]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn run_refuses_a_port_another_gateway_already_listens_on() {
    let first = Gateway::start(&stdio_config("auto", "", &[]));
    let port = first.addr.port();
    let cfg = stdio_config("auto", "", &[]).replacen("port = 0\n", &format!("port = {port}\n"), 1);
    assert!(cfg.contains(&format!("port = {port}\n")));
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("second.toml");
    std::fs::write(&p, cfg).unwrap();
    let mut second = Command::new(GUARD)
        .args(["--config", p.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // SO_REUSEPORT alone would let it start and take half of the first one's connections.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(s) = second.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            panic!("a second gateway started on port {port}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("cannot listen on {}", first.addr))
            && err.contains("another process (perhaps another mcp-guard")
            && !err.contains("listening on http"),
        "{err}"
    );
    // The first one is untouched.
    initialize(first.addr);
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

#[test]
fn validate_checks_the_world_the_file_points_at() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, cfg: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, cfg).unwrap();
        p.to_str().unwrap().to_string()
    };
    // A command that is not there (relative, as in the quick start run from elsewhere).
    let missing = write(
        "missing.toml",
        stdio_config("auto", "", &[])
            .replace(&format!("{DEMO:?}"), "\"target/none/mcp-demo-server\""),
    );
    let (code, _, err) = run(&["validate", "--config", &missing]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("upstream.command"), "{err}");
    assert!(
        err.contains("relative to the directory mcp-guard runs in"),
        "{err}"
    );
    // A bare name not on PATH.
    let bare = write(
        "bare.toml",
        stdio_config("auto", "", &[]).replace(&format!("{DEMO:?}"), "\"no-such-mcp-server-xyz\""),
    );
    let (code, _, err) = run(&["validate", "--config", &bare]);
    assert_eq!(code, 1);
    assert!(err.contains("not found on PATH"), "{err}");
    // A cwd that does not exist is blamed, not the command.
    let cwd = write(
        "cwd.toml",
        format!(
            "{}cwd = \"/nonexistent/dir\"\n",
            stdio_config("auto", "", &[])
        ),
    );
    let (code, _, err) = run(&["validate", "--config", &cwd]);
    assert_eq!(code, 1);
    assert!(
        err.contains("upstream.cwd") && !err.contains("upstream.command"),
        "{err}"
    );
    // An audit directory that can never be created.
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, "x").unwrap();
    let audit = write(
        "audit.toml",
        format!(
            "{}\n[audit]\nfile = {:?}\n",
            stdio_config("auto", "", &[]),
            blocker.join("sub/audit.jsonl")
        ),
    );
    let (code, _, err) = run(&["validate", "--config", &audit]);
    assert_eq!(code, 1);
    assert!(err.contains("audit.file"), "{err}");
    // A port already taken.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let taken = write(
        "taken.toml",
        stdio_config("auto", "", &[]).replacen("port = 0", &format!("port = {port}"), 1),
    );
    let (code, _, err) = run(&["validate", "--config", &taken]);
    assert_eq!(code, 1);
    assert!(
        err.contains("server.port") && err.contains("another process"),
        "{err}"
    );
}

#[test]
fn run_refuses_to_start_with_an_upstream_command_that_cannot_run() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("g.toml");
    std::fs::write(
        &p,
        stdio_config("auto", "", &[])
            .replace(&format!("{DEMO:?}"), "\"target/none/mcp-demo-server\""),
    )
    .unwrap();
    let out = Command::new(GUARD)
        .args(["--config", p.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("upstream.command"), "{err}");
    assert!(
        !err.contains("listening on"),
        "it bound before checking: {err}"
    );
}

#[test]
fn run_exits_when_the_stdio_upstream_cannot_be_started_at_all() {
    // An executable script whose interpreter does not exist: it passes the path checks, and
    // exec refuses it (ENOENT, so no shell fallback either).
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("server.sh");
    write_executable(&fake, b"#!/nonexistent/interpreter\n");
    let p = dir.path().join("g.toml");
    std::fs::write(
        &p,
        stdio_config("auto", "", &[]).replace(&format!("{DEMO:?}"), &format!("{fake:?}")),
    )
    .unwrap();
    let mut child = Command::new(GUARD)
        .args(["--config", p.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the gateway kept running with an upstream it cannot start");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("cannot start the stdio upstream"), "{err}");
}

#[test]
fn the_global_config_option_serves_subcommands_and_one_worker_is_singular() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("g.toml");
    std::fs::write(
        &p,
        stdio_config("auto", "", &[]).replace("workers = 2", "workers = 1"),
    )
    .unwrap();
    let path = p.to_str().unwrap();
    let (code, out, err) = run(&["--config", path, "validate"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("(1 worker,"), "{out}");
    // The subcommand's own option still works.
    let (code, out, _) = run(&["validate", "--config", path]);
    assert_eq!(code, 0);
    assert!(out.contains("valid"), "{out}");
    let (code, _, err) = run(&["validate"]);
    assert_eq!(code, 2);
    assert!(err.contains("--config"), "{err}");
}

#[test]
fn the_anonymous_warning_mentions_per_address_limits_only_when_limits_are_on() {
    for (tail, expect_limits) in [("[rate_limit]\nenabled = false\n", false), ("", true)] {
        let g = Gateway::start(&format!("{}\n{tail}", stdio_config("auto", "", &[])));
        assert!(g.wait_log(
            "every caller is anonymous",
            std::time::Duration::from_secs(5)
        ));
        let logs = g.logs.lock().unwrap().join("\n");
        assert_eq!(
            logs.contains("rate limits apply per client address"),
            expect_limits,
            "{logs}"
        );
    }
}

#[test]
fn validate_words_type_errors_and_unbuilt_sections_for_people() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("typed.toml");
    std::fs::write(&p, "[server]\nport = 70000\n").unwrap();
    let (code, _, err) = run(&["validate", "--config", p.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains(
            "typed.toml:2:8: server.port: expected port number 1–65535, or 0 for any free port, found `70000`"
        ),
        "{err}"
    );
    std::fs::write(
        &p,
        "[upstream]\ncommand = \"x\"\n[rate_limit]\nbackend = \"disk\"\n",
    )
    .unwrap();
    let (code, _, err) = run(&["validate", "--config", p.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("rate_limit.backend: expected one of `memory`, `redis`, found `\"disk\"`"),
        "{err}"
    );
    // A section missing a required key says which, in the user's words.
    std::fs::write(&p, "[server.tls]\ncert_path = \"x\"\n").unwrap();
    let (code, _, err) = run(&["validate", "--config", p.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("key_path"), "{err}");
    assert!(!err.contains("missing field"), "{err}");
    // A missing field is named in the user's words, with what it may be.
    std::fs::write(&p, "[auth.jwt]\nissuer = \"https://idp\"\n").unwrap();
    let (code, _, err) = run(&["validate", "--config", p.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("[auth.jwt] needs `mode`"), "{err}");
}

#[test]
fn config_reference_prints_the_committed_reference() {
    let (code, out, _) = run(&["config-reference"]);
    assert_eq!(code, 0);
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/configuration.md"
    ))
    .unwrap();
    assert_eq!(out, committed, "regenerate docs/configuration.md");
    assert!(out.contains("| `port` *(compat)* | port number 1–65535"));
}

/// Runs `check-upstream` on `config` written into `dir`; (exit code, stdout).
fn check_upstream_with(dir: &std::path::Path, config: &str) -> (i32, String) {
    let p = dir.join("check.toml");
    std::fs::write(&p, config).unwrap();
    let (code, out, err) = run(&["check-upstream", "--config", p.to_str().unwrap()]);
    (code, format!("{out}{err}"))
}

/// A stdio upstream config running `command` (in `cwd` when given), with `timeout_secs = 1`.
fn stdio_upstream(command: &str, cwd: Option<&str>) -> String {
    let cwd = cwd.map(|c| format!("cwd = {c:?}\n")).unwrap_or_default();
    format!("[upstream]\ncommand = {command:?}\ntimeout_secs = 1\n{cwd}")
}

#[test]
fn check_upstream_blames_a_missing_cwd_on_cwd_not_on_the_command() {
    let dir = tempfile::tempdir().unwrap();
    // The quick-start shape: a command relative to a cwd that is not there. Spawning it would
    // fail with the ENOENT of a missing program; the message must name the directory instead.
    let (code, out) = check_upstream_with(
        dir.path(),
        &stdio_upstream("./server.sh", Some("/nonexistent/mcp-dir")),
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("FAIL"), "{out}");
    assert!(
        out.contains("upstream.cwd") && out.contains("/nonexistent/mcp-dir"),
        "{out}"
    );
    assert!(!out.contains("upstream.command"), "{out}");
    assert!(!out.contains("No such file or directory"), "{out}");
    // A cwd that is a file is not a directory either.
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let (code, out) = check_upstream_with(
        dir.path(),
        &stdio_upstream(DEMO, Some(file.to_str().unwrap())),
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("upstream.cwd"), "{out}");
}

#[test]
fn check_upstream_blames_a_missing_command_on_the_command() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path().to_str().unwrap();
    // Relative to an existing cwd.
    let (code, out) = check_upstream_with(dir.path(), &stdio_upstream("./no-server", Some(cwd)));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("upstream.command") && out.contains("no-server"),
        "{out}"
    );
    assert!(out.contains(&format!("relative to cwd `{cwd}`")), "{out}");
    assert!(!out.contains("upstream.cwd"), "{out}");
    // A bare name not on PATH.
    let (code, out) = check_upstream_with(dir.path(), &stdio_upstream("no-such-mcp-xyz", None));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("upstream.command") && out.contains("not found on PATH"),
        "{out}"
    );
    // There but not executable.
    let plain = dir.path().join("plain");
    std::fs::write(&plain, "#!/bin/sh\n").unwrap();
    let (code, out) =
        check_upstream_with(dir.path(), &stdio_upstream(plain.to_str().unwrap(), None));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("not executable"), "{out}");
}

#[test]
fn check_upstream_gives_up_on_a_silent_stdio_server_after_timeout_secs() {
    let dir = tempfile::tempdir().unwrap();
    let server = dir.path().join("silent.sh");
    // Reads requests for ever and never answers. Timing is not asserted (a loaded machine may
    // be slow): the message naming 1 s shows the configured timeout is the one waited for.
    write_executable(&server, b"#!/bin/sh\nwhile read line; do :; done\n");
    let (code, out) =
        check_upstream_with(dir.path(), &stdio_upstream(server.to_str().unwrap(), None));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("no answer to initialize within 1 s"), "{out}");
    assert!(out.contains("upstream.timeout_secs"), "{out}");
}

#[test]
fn check_upstream_reports_the_exit_status_and_stderr_of_a_server_that_dies() {
    let dir = tempfile::tempdir().unwrap();
    let server = dir.path().join("dies.sh");
    write_executable(
        &server,
        b"#!/bin/sh\necho 'loading tools' >&2\necho 'Error: API_TOKEN is not set' >&2\nexit 3\n",
    );
    let (code, out) =
        check_upstream_with(dir.path(), &stdio_upstream(server.to_str().unwrap(), None));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("exited with status 3 before answering initialize"),
        "{out}"
    );
    assert!(out.contains("| Error: API_TOKEN is not set"), "{out}");
}

#[test]
fn check_upstream_names_the_timeout_of_an_http_upstream_that_never_answers() {
    let dir = tempfile::tempdir().unwrap();
    // Listening but never accepting: the kernel completes the handshake, nobody answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/mcp", silent.local_addr().unwrap());
    let cfg = http_config("auto", &url, "", "").replace("timeout_secs = 10", "timeout_secs = 1");
    let (code, out) = check_upstream_with(dir.path(), &cfg);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("no answer to initialize") && out.contains("within 1 s"),
        "{out}"
    );
    assert!(out.contains("upstream.timeout_secs"), "{out}");
}

#[test]
fn completions_are_generated_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err) = run(&["completions", shell]);
        assert_eq!(code, 0, "{shell}: {err}");
        assert!(!out.trim().is_empty(), "{shell}");
        for sub in ["validate", "check-upstream", "completions"] {
            assert!(out.contains(sub), "{shell} completion lacks {sub}");
        }
    }
    // The bash script parses.
    let (_, script, _) = run(&["completions", "bash"]);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("mcp-guard.bash");
    std::fs::write(&p, script).unwrap();
    let out = Command::new("bash").arg("-n").arg(&p).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // An unknown shell is a usage error.
    let (code, _, err) = run(&["completions", "tcsh"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("tcsh"), "{err}");
}

#[test]
fn the_man_page_is_roff_listing_the_subcommands() {
    let (code, out, err) = run(&["man"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().any(|l| l.starts_with(".TH")), "{out}");
    // roff escapes hyphens as `\-`.
    let text = out.replace("\\-", "-");
    for sub in ["validate", "check-upstream", "completions", "keygen"] {
        assert!(text.contains(sub), "the man page lacks {sub}");
    }
}

#[test]
fn check_upstream_checks_every_server_and_sums_up_without_colour_when_piped() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("servers.toml");
    std::fs::write(
        &p,
        format!(
            "[upstream]\ncommand = {DEMO:?}\ntimeout_secs = 10\n[[upstream.servers]]\nname = \"broken\"\ncommand = \"/nonexistent/mcp-server\"\n"
        ),
    )
    .unwrap();
    let (code, out, _) = run(&["check-upstream", "--config", p.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("PASS  default (stdio"), "{out}");
    assert!(out.contains("FAIL  broken (stdio"), "{out}");
    assert!(out.trim_end().ends_with("1 passed, 1 failed"), "{out}");
    assert!(
        !out.contains('\u{1b}'),
        "no colour when stdout is not a terminal: {out:?}"
    );
}
