//! Runs the README's quick start and "Secure it in two minutes" as written, so the README
//! cannot rot: its marked shell blocks are run by `bash` against the real binaries, and the
//! output each marked output block shows must be what they print.
//!
//! Markers (HTML comments, invisible on GitHub) stand before a fenced block:
//! `<!-- readme-test: server -->` a long-running gateway ("in another terminal"),
//! `<!-- readme-test: run -->` commands for the calling terminal (one `bash` session for the
//! whole README, so `$KEY`, `$SID` and functions carry over from block to block, as they do
//! for a reader), `<!-- readme-test: output -->` what the run block before it prints (stdout
//! and stderr together, as a terminal shows them).
//!
//! The adaptations, and nothing else:
//! - the README runs from a repository root after `cargo build --release`; the test runs in a
//!   temporary directory whose `target/release/mcp-guard` and `target/release/mcp-demo-server`
//!   are links to the binaries cargo built for this test, with a copy of `examples/`, and the
//!   `cargo build --release && ` before a server command is skipped;
//! - the fixed ports 3000 and 9090 become free ports, substituted mechanically in every command
//!   (`127.0.0.1:3000`) and in the `port = ` lines of the configuration a server block names,
//!   so this test never collides with anything else listening;
//! - starting a server block stops the previous one (the reader's Ctrl-C), and the test waits
//!   for its `/health` to say `ok` before the next block; each run block waits a quarter
//!   second first (the reader's pause: the audit trail is written by its own thread, up to
//!   50 ms after the call it records);
//! - outputs are compared after blanking what differs on every run: audit timestamps, event
//!   and request ids, client addresses and latencies.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

const README: &str = include_str!("../README.md");

/// What a marked block is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Server,
    Run,
    Output,
}

/// A marked fenced block of the README.
#[derive(Debug)]
struct Block {
    kind: Kind,
    text: String,
    /// 1-based line of its marker, for failure messages.
    line: usize,
}

/// The marked blocks, in order. A marker not followed by a fenced block is an error, so a
/// typo cannot silently drop a block from the test.
fn marked_blocks(readme: &str) -> Vec<Block> {
    let lines: Vec<&str> = readme.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some(kind) = lines[i]
            .trim()
            .strip_prefix("<!-- readme-test:")
            .and_then(|r| r.strip_suffix("-->"))
        else {
            i += 1;
            continue;
        };
        let kind = match kind.trim() {
            "server" => Kind::Server,
            "run" => Kind::Run,
            "output" => Kind::Output,
            other => panic!("README.md:{}: unknown marker `{other}`", i + 1),
        };
        let line = i + 1;
        let open = (i + 1..lines.len())
            .find(|&j| !lines[j].trim().is_empty())
            .filter(|&j| lines[j].starts_with("```"))
            .unwrap_or_else(|| panic!("README.md:{line}: marker without a fenced block"));
        let close = (open + 1..lines.len())
            .find(|&j| lines[j].starts_with("```"))
            .unwrap_or_else(|| panic!("README.md:{line}: unclosed block"));
        let text = lines[open + 1..close].join("\n");
        out.push(Block { kind, text, line });
        i = close + 1;
    }
    out
}

/// The README's ports, and the free ones the test uses instead.
struct Ports {
    main: u16,
    admin: u16,
}

impl Ports {
    fn free() -> Ports {
        // Bound together, so the two differ; released just before use (a small race that
        // port 0 in a config would avoid, but the README names its ports).
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        Ports {
            main: a.local_addr().unwrap().port(),
            admin: b.local_addr().unwrap().port(),
        }
    }

    fn in_command(&self, cmd: &str) -> String {
        cmd.replace("127.0.0.1:3000", &format!("127.0.0.1:{}", self.main))
            .replace("127.0.0.1:9090", &format!("127.0.0.1:{}", self.admin))
    }

    fn in_config(&self, config: &str) -> String {
        config
            .lines()
            .map(|l| {
                let t = l.trim_start();
                if t.starts_with("port = 3000") {
                    l.replacen("port = 3000", &format!("port = {}", self.main), 1)
                } else if t.starts_with("port = 9090") {
                    l.replacen("port = 9090", &format!("port = {}", self.admin), 1)
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The calling terminal: one interactive-like `bash` reading commands from a pipe.
struct Shell {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

/// Printed after each block, with the block's exit status; never in the README.
const DONE: &str = "__readme_test_block_done__";

impl Shell {
    fn start(dir: &Path) -> Shell {
        let mut child = Command::new("bash")
            .args(["--noprofile", "--norc"])
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start bash");
        let mut stdin = child.stdin.take().unwrap();
        // stderr joins stdout, in order, as a terminal shows them.
        writeln!(stdin, "exec 2>&1").unwrap();
        let (tx, rx) = channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Shell {
            child,
            stdin,
            lines: rx,
        }
    }

    /// Runs `script`; returns its output and the exit status of its last command.
    fn run(&mut self, script: &str, line: usize) -> (String, i32) {
        writeln!(self.stdin, "{script}\necho \"{DONE} $?\"").unwrap();
        self.stdin.flush().unwrap();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => match l.strip_prefix(DONE) {
                    Some(code) => return (out.join("\n"), code.trim().parse().unwrap_or(-1)),
                    None => out.push(l),
                },
                Err(_) => panic!(
                    "README.md:{line}: the block did not finish; output so far:\n{}",
                    out.join("\n")
                ),
            }
        }
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server block's process, in its own process group; stopped on drop.
struct Server {
    child: Child,
    log: PathBuf,
}

impl Server {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group of a child we spawned as its leader.
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// The test's copy of what `cargo build --release` leaves in a repository root.
fn workspace() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let release = dir.path().join("target/release");
    std::fs::create_dir_all(&release).unwrap();
    std::os::unix::fs::symlink(GUARD, release.join("mcp-guard")).unwrap();
    std::os::unix::fs::symlink(DEMO, release.join("mcp-demo-server")).unwrap();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    std::fs::create_dir(dir.path().join("examples")).unwrap();
    for e in std::fs::read_dir(examples).unwrap() {
        let e = e.unwrap();
        // examples/deploy/ and the like are not read by the README's commands.
        if e.path().is_file() {
            std::fs::copy(e.path(), dir.path().join("examples").join(e.file_name())).unwrap();
        }
    }
    dir
}

/// Starts a server block the way a reader would in a second terminal.
fn start_server(dir: &Path, ports: &Ports, block: &Block) -> Server {
    let cmd = block
        .text
        .trim()
        .strip_prefix("cargo build --release && ")
        .unwrap_or(block.text.trim());
    // The configuration it names gets the test's ports.
    let config = cmd
        .split_whitespace()
        .skip_while(|w| *w != "--config")
        .nth(1)
        .unwrap_or_else(|| panic!("README.md:{}: no --config in `{cmd}`", block.line));
    let config = dir.join(config);
    let text = std::fs::read_to_string(&config)
        .unwrap_or_else(|e| panic!("README.md:{}: {}: {e}", block.line, config.display()));
    std::fs::write(&config, ports.in_config(&text)).unwrap();
    // The previous block's gateway was killed, but its process may hold the port a moment
    // longer (a second gateway on a held port is refused, as it should be): wait for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpListener::bind(("127.0.0.1", ports.main)).is_err()
        || std::net::TcpListener::bind(("127.0.0.1", ports.admin)).is_err()
    {
        assert!(Instant::now() < deadline, "ports still held");
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = dir.join(format!("server-{}.log", block.line));
    let file = std::fs::File::create(&log).unwrap();
    let child = std::os::unix::process::CommandExt::process_group(
        Command::new("bash").args(["--noprofile", "--norc", "-c", cmd]),
        0,
    )
    .current_dir(dir)
    .stdin(Stdio::null())
    .stdout(file.try_clone().unwrap())
    .stderr(file)
    .spawn()
    .expect("start the server block");
    let server = Server { child, log };
    let admin = format!("127.0.0.1:{}", ports.admin).parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ok = std::net::TcpStream::connect_timeout(&admin, Duration::from_millis(200)).is_ok()
            && request(
                admin,
                "GET /health HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            )
            .text()
            .contains("\"status\":\"ok\"");
        if ok {
            return server;
        }
        assert!(
            Instant::now() < deadline,
            "README.md:{}: `{cmd}` did not become healthy; its output:\n{}",
            block.line,
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Blanks the values that differ on every run: in audit lines, the JSON values of these fields.
fn normalise(text: &str) -> String {
    let mut s = text.trim_end().to_string();
    for field in [
        "timestamp",
        "event_id",
        "request_id",
        "client_addr",
        "latency_us",
    ] {
        let key = format!("\"{field}\":");
        let mut from = 0;
        while let Some(at) = s[from..].find(&key) {
            let start = from + at + key.len();
            let rest = &s[start..];
            let len = if let Some(body) = rest.strip_prefix('"') {
                body.find('"').map_or(rest.len(), |e| e + 2)
            } else {
                rest.find([',', '}']).unwrap_or(rest.len())
            };
            s.replace_range(start..start + len, "\"_\"");
            from = start + 3;
        }
    }
    s.lines().map(str::trim_end).collect::<Vec<_>>().join("\n")
}

#[test]
fn the_readme_quick_start_and_secure_it_sections_run_as_written() {
    assert!(
        Command::new("curl").arg("--version").output().is_ok(),
        "the README's commands need curl"
    );
    let blocks = marked_blocks(README);
    let kinds: Vec<Kind> = blocks.iter().map(|b| b.kind).collect();
    // Both sections are there: a gateway each, and the calls with what they print.
    assert_eq!(
        kinds.iter().filter(|k| **k == Kind::Server).count(),
        2,
        "{kinds:?}"
    );
    assert!(
        kinds.iter().filter(|k| **k == Kind::Output).count() >= 5,
        "{kinds:?}"
    );

    let dir = workspace();
    let ports = Ports::free();
    let mut shell = Shell::start(dir.path());
    let mut server: Option<Server> = None;
    let mut last: Option<(usize, String)> = None;
    let mut outputs_checked = 0;
    let mut last_block = None;
    for block in &blocks {
        match block.kind {
            Kind::Server => {
                drop(server.take());
                server = Some(start_server(dir.path(), &ports, block));
            }
            Kind::Run => {
                std::thread::sleep(Duration::from_millis(250));
                let (out, code) = shell.run(&ports.in_command(&block.text), block.line);
                let log = server.as_ref().map(Server::log).unwrap_or_default();
                assert_eq!(
                    code, 0,
                    "README.md:{}: the block failed:\n{out}\ngateway log:\n{log}",
                    block.line
                );
                last = Some((block.line, out));
                last_block = Some(block);
            }
            Kind::Output => {
                let (line, mut out) = last
                    .take()
                    .unwrap_or_else(|| panic!("README.md:{}: output of what?", block.line));
                // A block that only reads what the gateway wrote (the audit trail, written off
                // the request path) may run before the writer caught up on a loaded machine:
                // it is read again for a while before its output counts as wrong.
                if let Some(reader) = last_block.filter(|b| is_read_only(&b.text)) {
                    let deadline = std::time::Instant::now() + Duration::from_secs(5);
                    let ordered = !reader.text.contains("audit.jsonl");
                    while comparable(&out, ordered) != comparable(&block.text, ordered)
                        && std::time::Instant::now() < deadline
                    {
                        std::thread::sleep(Duration::from_millis(100));
                        out = shell.run(&ports.in_command(&reader.text), reader.line).0;
                    }
                }
                let ordered = !last_block.is_some_and(|b| b.text.contains("audit.jsonl"));
                assert_eq!(
                    comparable(&out, ordered),
                    comparable(&block.text, ordered),
                    "README.md:{line}: the block's output is not what README.md:{} shows",
                    block.line
                );
                outputs_checked += 1;
            }
        }
    }
    assert!(outputs_checked >= 5);
}

#[test]
fn normalising_blanks_only_the_per_run_values() {
    let line = r#"{"timestamp":"2026-11-28T12:00:00.123Z","event_id":"f85de2cd20407d6a-0-3","request_id":"ab-01","client_addr":"127.0.0.1:5555","tool":"sleep","latency_us":812,"reason":"denied_by_deny_list"}"#;
    assert_eq!(
        normalise(line),
        r#"{"timestamp":"_","event_id":"_","request_id":"_","client_addr":"_","tool":"sleep","latency_us":"_","reason":"denied_by_deny_list"}"#
    );
}

/// Whether a README block only reads what the gateway wrote (`tail`, `cat`, `grep` of a file,
/// a GET of `/metrics`), so running it again changes nothing.
fn is_read_only(text: &str) -> bool {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .all(|l| {
            l.starts_with("tail ")
                || l.starts_with("cat ")
                || l.starts_with("grep ")
                || (l.starts_with("curl -s http://") && l.contains("/metrics"))
        })
}

/// The output as compared: normalised, and for the audit trail with its lines sorted (each
/// worker queues its own events, so two requests served by different workers may be written
/// in either order; the README says so).
fn comparable(text: &str, ordered: bool) -> String {
    let n = normalise(text);
    if ordered {
        return n;
    }
    let mut lines: Vec<&str> = n.lines().collect();
    lines.sort_unstable();
    lines.join("\n")
}

/// Every relative link in the README and the docs names a file of the repository. Results under
/// `perf/results/` are ignored by git unless added by name, so a run the README quotes could be
/// linked and never committed: a clean clone (CI's) has no such file.
#[test]
fn every_relative_link_in_the_readme_and_the_docs_names_a_file_of_the_repository() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut pages = vec![root.join("README.md"), root.join("perf/README.md")];
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            pages.push(path);
        }
    }
    let mut missing = Vec::new();
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap();
        for (at, _) in text.match_indices("](") {
            let rest = &text[at + 2..];
            let Some(end) = rest.find(')') else { continue };
            let target = rest[..end].split('#').next().unwrap_or("");
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let file = page.parent().unwrap().join(target);
            if !file.exists() {
                missing.push(format!("{} -> {target}", page.display()));
            }
        }
    }
    assert!(pages.len() > 3, "the docs were not found: {pages:?}");
    assert!(
        missing.is_empty(),
        "links to files that are not there: {missing:#?}"
    );
}
