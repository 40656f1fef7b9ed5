//! `check-upstream`: the MCP initialize handshake against each configured upstream, with a
//! clear pass/fail line per upstream. Blocking I/O with timeouts: this runs outside the gateway.

use crate::config::preflight;
use crate::config::{HttpEndpoint, Settings, StdioSettings, Transport};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

const INIT: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"mcp-guard-check","version":"1"}}}"#;
/// How many of the child's last stderr lines a failure shows, and how long each may be: enough
/// to see a stack trace's last words, bounded so a chatty server cannot flood the terminal.
const STDERR_LINES: usize = 10;
const STDERR_LINE_BYTES: usize = 300;
/// How long a child that closed its stdout gets to exit before we stop waiting for its status.
const EXIT_GRACE: Duration = Duration::from_secs(1);
/// Cap on an HTTP answer to initialize: far above any real one.
const HTTP_ANSWER_CAP: usize = 8 * 1024 * 1024;

/// Checks every upstream (the default and each routed server, each replica of a balanced
/// one); true when all pass.
pub fn check_all(s: &Settings) -> bool {
    use std::io::IsTerminal;
    let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let progress = std::io::stderr().is_terminal();
    let total: usize = s
        .routes
        .iter()
        .map(|r| match &r.upstream.transport {
            Transport::Http(h) => h.endpoints.len(),
            Transport::Stdio(_) | Transport::Sse(_) => 1,
        })
        .sum();
    let (mut passed, mut failed) = (0, 0);
    let mut report = |name: String, run: &dyn Fn() -> Result<String, String>| {
        if progress {
            // Overwritten by the result line: a slow upstream shows what is being waited on.
            eprint!("\rchecking {name} ({}/{total}) …", passed + failed + 1);
        }
        let result = run();
        if progress {
            eprint!("\r\x1b[2K");
        }
        let (word, paint) = match &result {
            Ok(_) => ("PASS", "\x1b[32m"),
            Err(_) => ("FAIL", "\x1b[31m"),
        };
        let word = if colour {
            format!("{paint}{word}\x1b[0m")
        } else {
            word.to_string()
        };
        match result {
            Ok(info) => {
                passed += 1;
                println!("{word}  {name}: {info}");
            }
            Err(e) => {
                failed += 1;
                println!("{word}  {name}: {e}");
            }
        }
    };
    for route in &s.routes {
        let timeout = route.upstream.timeout;
        match &route.upstream.transport {
            Transport::Stdio(st) => {
                report(format!("{} (stdio `{}`)", route.name, st.command), &|| {
                    preflight_stdio(&route.key, st)
                        .and_then(|()| check_stdio(&route.key, st, timeout))
                })
            }
            Transport::Sse(sse) => report(
                format!("{} (sse {})", route.name, sse.endpoint.url),
                &|| check_sse(sse, timeout),
            ),
            Transport::Http(h) => {
                for e in &h.endpoints {
                    report(format!("{} (http {})", route.name, e.url), &|| {
                        check_http(&route.key, e, &h.headers, timeout)
                    });
                }
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    failed == 0
}

/// The path checks `validate` makes, before anything is spawned: a missing `cwd` makes spawn
/// fail with the same ENOENT as a missing program, so only a check made beforehand can tell
/// the user which of the two it is.
fn preflight_stdio(key: &str, st: &StdioSettings) -> Result<(), String> {
    let problems: Vec<String> = preflight::check_stdio(key, st)
        .into_iter()
        .map(|p| p.to_string())
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("cannot start: {}", problems.join("; ")))
    }
}

/// Why spawn failed, blamed on the key to fix. The preflight has passed by now, so this is a
/// race (the file changed since) or something only exec sees, such as a missing interpreter.
fn spawn_error(key: &str, st: &StdioSettings, e: &std::io::Error) -> String {
    // Re-checked in the same order as the preflight: the world may have changed since.
    if let Some(p) = preflight::check_stdio(key, st).into_iter().next() {
        return format!("cannot start: {p}");
    }
    let cwd = st.cwd.as_deref().map(std::path::Path::new);
    match preflight::resolve_command(&st.command, cwd, preflight::child_path(st).as_deref()) {
        Err(why) => format!("cannot start: {key}.command: {why}"),
        Ok(path) => match e.kind() {
            std::io::ErrorKind::NotFound => format!(
                "cannot start: {key}.command: `{}` exists but cannot be executed ({e}); \
                 the interpreter on its `#!` line may be missing",
                path.display()
            ),
            std::io::ErrorKind::PermissionDenied => format!(
                "cannot start: {key}.command: `{}` is not executable ({e})",
                path.display()
            ),
            _ => format!("cannot start: {key}.command: `{}`: {e}", path.display()),
        },
    }
}

fn describe(resp: &serde_json::Value) -> Result<String, String> {
    if let Some(err) = resp.get("error") {
        return Err(format!("initialize returned an error: {err}"));
    }
    let result = resp.get("result").ok_or("response has no result")?;
    let name = result
        .pointer("/serverInfo/name")
        .and_then(|v| v.as_str())
        .unwrap_or("?");
    let version = result
        .get("protocolVersion")
        .and_then(|v| v.as_str())
        .unwrap_or("?");
    Ok(format!("server `{name}`, protocol {version}"))
}

/// "1 s", "30 s" and the key that sets it, for every message about waiting too long.
fn timeout_phrase(key: &str, timeout: Duration) -> String {
    format!(
        "{} s ({key}.timeout_secs; raise it if the server is slow to start)",
        timeout.as_secs()
    )
}

/// Opens a legacy SSE server's stream, follows its `endpoint` event (same origin only) and
/// runs the initialize handshake over it, as the gateway would.
fn check_sse(s: &crate::config::SseSettings, timeout: Duration) -> Result<String, String> {
    let (lines_tx, lines_rx) = mpsc::sync_channel::<Vec<u8>>(1);
    let (answer_tx, answer_rx) = mpsc::channel::<Result<serde_json::Value, String>>();
    let ended = answer_tx.clone();
    let link = crate::upstream::sse::SseLink::open(
        s,
        lines_rx,
        move |message| match serde_json::from_slice::<serde_json::Value>(&message) {
            Ok(v) if v.get("id") == Some(&serde_json::json!(1)) => {
                let _ = answer_tx.send(Ok(v));
                false
            }
            _ => true,
        },
        move |why| {
            let _ = ended.send(Err(why));
        },
    )
    .map_err(|e| format!("cannot start the check: {e}"))?;
    let _ = lines_tx.send(format!("{INIT}\n").into_bytes());
    let answer = answer_rx.recv_timeout(timeout);
    link.cut();
    match answer {
        Ok(Ok(v)) => describe(&v),
        Ok(Err(why)) => Err(why),
        Err(_) => Err(format!(
            "no answer to initialize within {} s (timeout_secs)",
            timeout.as_secs()
        )),
    }
}

fn check_stdio(key: &str, st: &StdioSettings, timeout: Duration) -> Result<String, String> {
    let mut cmd = Command::new(&st.command);
    cmd.args(&st.args)
        .envs(st.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(cwd) = &st.cwd {
        cmd.current_dir(cwd);
    }
    let mut child = cmd.spawn().map_err(|e| spawn_error(key, st, &e))?;
    let stderr = StderrTail::collect(&mut child);
    let result = handshake(key, &mut child, timeout);
    let _ = child.kill();
    let _ = child.wait();
    result.map_err(|e| e + &stderr.render())
}

/// Sends initialize and waits for its answer, the child's exit or the timeout.
fn handshake(key: &str, child: &mut Child, timeout: Duration) -> Result<String, String> {
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel();
    // Not joined: a grandchild may hold the pipe open after the child is gone.
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(None);
                    return;
                }
                Ok(_) => {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                        && v.get("id") == Some(&serde_json::json!(1))
                    {
                        let _ = tx.send(Some(v));
                        return;
                    }
                }
            }
        }
    });
    // A child that already exited makes this fail with EPIPE; its exit status says more.
    if let Err(e) = writeln!(stdin, "{INIT}").and_then(|_| stdin.flush()) {
        return Err(match wait_exit(child, EXIT_GRACE) {
            Some(status) => exited(status),
            None => format!("cannot write initialize to the process: {e}"),
        });
    }
    let answer = rx.recv_timeout(timeout);
    // Closing stdin lets a server that exits on EOF (and any helper it started) go quietly.
    drop(stdin);
    match answer {
        Ok(Some(v)) => describe(&v),
        Ok(None) => Err(match wait_exit(child, EXIT_GRACE) {
            Some(status) => exited(status),
            None => "the process closed its stdout without answering initialize".into(),
        }),
        Err(_) => Err(format!(
            "no answer to initialize within {}",
            timeout_phrase(key, timeout)
        )),
    }
}

/// The child's exit status, if it exits within `grace`.
fn wait_exit(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + grace;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => return None,
        }
    }
}

fn exited(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code} before answering initialize"),
        (None, Some(sig)) => format!("was killed by signal {sig} before answering initialize"),
        _ => format!("exited ({status}) before answering initialize"),
    }
}

/// The last lines the child wrote to stderr, kept while it runs (the pipe must be drained, or
/// a chatty child blocks on it) and bounded in count and length.
struct StderrTail {
    lines: Arc<Mutex<Tail>>,
    done: mpsc::Receiver<()>,
}

impl StderrTail {
    fn collect(child: &mut Child) -> StderrTail {
        let lines = Arc::new(Mutex::new(Tail::default()));
        let (tx, done) = mpsc::channel();
        if let Some(mut pipe) = child.stderr.take() {
            let lines = lines.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    lines
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(&buf[..n]);
                }
                let _ = tx.send(());
            });
        }
        StderrTail { lines, done }
    }

    /// The tail as indented lines to append to a failure, or "" when the child said nothing.
    /// Waits briefly for the pipe's end, so the last words of a child that just died are in.
    fn render(&self) -> String {
        let _ = self.done.recv_timeout(Duration::from_millis(500));
        let tail = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        let lines = tail.lines();
        if lines.is_empty() {
            return String::new();
        }
        let mut out = format!(
            "\n      stderr (last {} line{}):",
            lines.len(),
            if lines.len() == 1 { "" } else { "s" }
        );
        for l in lines {
            out.push_str("\n      | ");
            out.push_str(&l);
        }
        out
    }
}

/// The last [`STDERR_LINES`] lines of a byte stream, each cut at [`STDERR_LINE_BYTES`].
#[derive(Default)]
struct Tail {
    done: VecDeque<Vec<u8>>,
    current: Vec<u8>,
    /// The current line was cut: what follows until its newline is dropped.
    cut: bool,
}

impl Tail {
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                let line = std::mem::take(&mut self.current);
                self.cut = false;
                // Blank lines would only push real ones out of the tail.
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                if self.done.len() == STDERR_LINES {
                    self.done.pop_front();
                }
                self.done.push_back(line);
            } else if self.current.len() < STDERR_LINE_BYTES {
                self.current.push(b);
            } else if !self.cut {
                self.cut = true;
                self.current.extend_from_slice("…".as_bytes());
            }
        }
    }

    /// The kept lines (an unfinished last line included), blank ones dropped, control
    /// characters shown as `?` so a child cannot drive the user's terminal.
    fn lines(&self) -> Vec<String> {
        let mut all: Vec<&Vec<u8>> = self.done.iter().collect();
        if !self.current.is_empty() {
            all.push(&self.current);
        }
        let mut out: Vec<String> = all
            .into_iter()
            .map(|l| {
                String::from_utf8_lossy(l)
                    .trim_end()
                    .chars()
                    .map(|c| if c.is_control() && c != '\t' { '?' } else { c })
                    .collect::<String>()
            })
            .filter(|l| !l.trim().is_empty())
            .collect();
        let excess = out.len().saturating_sub(STDERR_LINES);
        out.drain(..excess);
        out
    }
}

fn check_http(
    key: &str,
    h: &HttpEndpoint,
    headers: &[(String, String)],
    timeout: Duration,
) -> Result<String, String> {
    let mut last = String::from("no address");
    for addr in &h.addrs {
        match TcpStream::connect_timeout(addr, timeout) {
            Err(e) if is_timeout(&e) => {
                last = format!(
                    "cannot connect to {addr} within {}",
                    timeout_phrase(key, timeout)
                )
            }
            Err(e) => last = format!("cannot connect to {addr}: {e}"),
            Ok(mut s) => {
                // One deadline for the whole exchange: a per-read timeout alone would let a
                // server that trickles bytes hold the check for ever.
                let deadline = Instant::now() + timeout;
                let mut req = format!(
                    "POST {} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\nconnection: close\r\ncontent-length: {}\r\n",
                    h.path,
                    h.host_header,
                    INIT.len()
                );
                for (n, v) in headers {
                    req.push_str(&format!("{n}: {v}\r\n"));
                }
                req.push_str("\r\n");
                req.push_str(INIT);
                s.set_write_timeout(Some(timeout))
                    .map_err(|e| e.to_string())?;
                s.write_all(req.as_bytes())
                    .map_err(|e| format!("cannot send initialize to {addr}: {e}"))?;
                let mut raw = Vec::new();
                let mut buf = [0u8; 16 * 1024];
                let answer = loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let read = if left.is_zero() {
                        Err(std::io::ErrorKind::TimedOut.into())
                    } else {
                        s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
                        s.read(&mut buf)
                    };
                    match read {
                        Ok(0) => break parse_http_answer(&raw),
                        Ok(n) => {
                            raw.extend_from_slice(&buf[..n]);
                            if raw.len() >= HTTP_ANSWER_CAP {
                                break parse_http_answer(&raw);
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) if is_timeout(&e) => {
                            // An SSE stream left open after the answer still answered.
                            break parse_http_answer(&raw).map_err(|_| {
                                format!(
                                    "no answer to initialize from {addr} within {}",
                                    timeout_phrase(key, timeout)
                                )
                            });
                        }
                        Err(e) => {
                            break parse_http_answer(&raw)
                                .map_err(|_| format!("reading the answer from {addr}: {e}"));
                        }
                    }
                };
                if answer.is_ok()
                    && let Some((sid, protocol)) = opened_session(&raw)
                {
                    // A client completes the handshake it started, then ends the session.
                    crate::upstream::health::end_session(*addr, h, headers, &sid, &protocol);
                }
                return answer;
            }
        }
    }
    Err(last)
}

/// The session an initialize answer opened, and the protocol version it names.
fn opened_session(raw: &[u8]) -> Option<(String, String)> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    resp.parse(raw).ok()?;
    let sid = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("mcp-session-id"))
        .map(|h| String::from_utf8_lossy(h.value).trim().to_string())?;
    let text = String::from_utf8_lossy(raw);
    let protocol = text
        .split("\"protocolVersion\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_default()
        .to_string();
    Some((sid, protocol))
}

/// Socket timeouts surface as `WouldBlock` or `TimedOut` depending on the call and platform.
fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

fn parse_http_answer(raw: &[u8]) -> Result<String, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return Err("no valid HTTP response".into()),
    };
    let status = resp.code.unwrap_or(0);
    if status != 200 {
        return Err(format!("HTTP {status} to initialize"));
    }
    let chunked = resp.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("transfer-encoding")
            && String::from_utf8_lossy(h.value).eq_ignore_ascii_case("chunked")
    });
    let mut body = raw[head_len..].to_vec();
    if chunked {
        let mut out = Vec::new();
        let mut dec = crate::http::chunked::ChunkedDecoder::new(u64::MAX);
        dec.decode(&body, &mut out)
            .map_err(|_| "malformed chunked body".to_string())?;
        body = out;
    }
    let text = String::from_utf8_lossy(&body);
    // JSON, or SSE whose data lines carry the JSON-RPC response.
    let json_text: String = if text.trim_start().starts_with('{') {
        text.into_owned()
    } else {
        text.lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(str::trim)
            .find(|d| d.contains("\"result\"") || d.contains("\"error\""))
            .ok_or("no JSON-RPC response in the SSE stream")?
            .to_string()
    };
    let v: serde_json::Value =
        serde_json::from_str(&json_text).map_err(|e| format!("invalid JSON: {e}"))?;
    describe(&v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stderr_tail_keeps_the_last_lines_bounded() {
        let mut t = Tail::default();
        for i in 0..25 {
            t.push(format!("line {i}\n").as_bytes());
        }
        // Split across reads, blank lines skipped, an unfinished last line kept.
        t.push(b"\n\nhalf ");
        t.push(b"done\x1b[31m");
        let lines = t.lines();
        assert_eq!(lines.len(), STDERR_LINES, "{lines:?}");
        assert_eq!(lines[0], "line 16");
        assert_eq!(lines.last().unwrap(), "half done?[31m");
        let mut t = Tail::default();
        t.push(&vec![b'x'; 100_000]);
        t.push(b"\nend\n");
        let lines = t.lines();
        assert_eq!(lines.len(), 2);
        assert!(
            lines[0].len() <= STDERR_LINE_BYTES + 3,
            "{}",
            lines[0].len()
        );
        assert!(lines[0].ends_with('…'));
        assert_eq!(lines[1], "end");
    }

    #[test]
    fn exit_statuses_are_told_apart_from_signals() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            exited(ExitStatus::from_raw(3 << 8)),
            "exited with status 3 before answering initialize"
        );
        assert!(exited(ExitStatus::from_raw(9)).contains("signal 9"));
    }
}
