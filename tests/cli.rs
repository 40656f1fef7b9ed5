//! Every CLI command's success and error paths, through the real binary.

mod common;

use common::*;
use std::process::Command;

/// Writes `content` to `path`, mode 0755.
fn write_executable(path: &std::path::Path, content: &[u8]) {
    std::fs::write(path, content).unwrap();
    let mut perms = std::fs::metadata(path).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(path, perms).unwrap();
}

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
        "{}\nurl = \"http://127.0.0.1:1/mcp\"\n[rate_limit]\nenabled = false\nburst_size = 9\n[tracing]\nenabled = true\n",
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
    assert!(err.contains("warning: [tracing] has no effect"), "{err}");
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
    // `validate` checks that the starter's command (`npx`) resolves on PATH: a stand-in keeps
    // this test independent of Node being installed.
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    write_executable(&bin.join("npx"), b"#!/bin/sh\nexit 0\n");
    let out = Command::new(GUARD)
        .args(["validate", "--config", path])
        .env("PATH", &bin)
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
    // The section is refused for what it is before any of its fields is asked for.
    std::fs::write(&p, "[auth.jwt]\nissuer = \"https://idp\"\n").unwrap();
    let (code, _, err) = run(&["validate", "--config", p.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("auth.jwt: JWT authentication is not in this build"),
        "{err}"
    );
    assert!(!err.contains("missing field"), "{err}");
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
