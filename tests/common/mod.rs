//! Test support: start the real `mcp-guard` binary (and the demo MCP server) on loopback with
//! port 0, read the bound ports from their logs, and speak raw HTTP/1.1 to them.

#![allow(dead_code)]

pub mod legacy;
pub mod oauth;
pub mod oauth_as;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const GUARD: &str = env!("CARGO_BIN_EXE_mcp-guard");
pub const DEMO: &str = env!("CARGO_BIN_EXE_mcp-demo-server");
pub const ACCEPT_BOTH: &str = "application/json, text/event-stream";

/// Both io drivers, for tests that must pass on each.
pub const DRIVERS: [&str; 2] = ["io_uring", "epoll"];

/// A running gateway; killed on drop.
pub struct Gateway {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub logs: Arc<Mutex<Vec<String>>>,
    pub config_path: PathBuf,
    /// Started with the debug builds' panic hook armed (`MCP_GUARD_TEST_PANIC_TOOL`).
    panics_on_purpose: bool,
    _dir: tempfile::TempDir,
}

impl Gateway {
    /// Starts the gateway with `config` (a TOML document; use port 0).
    pub fn start(config: &str) -> Gateway {
        Self::start_with(config, false)
    }

    /// As [`Gateway::start`]; with `stall_stdout` its stdout is a pipe nobody reads, so
    /// anything written there (the audit trail on stdout) eventually blocks the writer.
    pub fn start_with(config: &str, stall_stdout: bool) -> Gateway {
        Self::start_full(config, stall_stdout, &[])
    }

    /// As [`Gateway::start`], with extra environment variables for the gateway process.
    pub fn start_env(config: &str, env: &[(&str, &str)]) -> Gateway {
        Self::start_full(config, false, env)
    }

    fn start_full(config: &str, stall_stdout: bool, env: &[(&str, &str)]) -> Gateway {
        Self::try_start_full(config, stall_stdout, env)
            .unwrap_or_else(|logs| panic!("mcp-guard did not start; logs:\n{logs}"))
    }

    /// As [`Gateway::start`], but a gateway that did not start gives its logs back.
    pub fn try_start(config: &str) -> Result<Gateway, String> {
        Self::try_start_full(config, false, &[])
    }

    fn try_start_full(
        config: &str,
        stall_stdout: bool,
        env: &[(&str, &str)],
    ) -> Result<Gateway, String> {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("guard.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut child = Command::new(GUARD)
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(if stall_stdout {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::piped())
            .spawn()
            .expect("start mcp-guard");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let logs2 = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("admin listening on http://").nth(1) {
                    let _ = tx.send(("admin", rest.trim().to_string()));
                } else if let Some(rest) = line
                    .split("listening on http://")
                    .nth(1)
                    .or_else(|| line.split("listening on https://").nth(1))
                {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                    let _ = tx.send(("main", addr));
                }
                logs2.lock().unwrap().push(line);
            }
        });
        let mut main = None;
        let mut admin = None;
        let deadline = Instant::now() + Duration::from_secs(20);
        while main.is_none() || admin.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(("main", a)) => main = Some(a.parse().unwrap()),
                Ok((_, a)) => admin = Some(a.parse().unwrap()),
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(logs.lock().unwrap().join("\n"));
                }
            }
        }
        Ok(Gateway {
            child,
            addr: main.unwrap(),
            admin: admin.unwrap(),
            logs,
            config_path,
            panics_on_purpose: env.iter().any(|(k, _)| *k == "MCP_GUARD_TEST_PANIC_TOOL"),
            _dir: dir,
        })
    }

    /// Sends a signal (e.g. `libc::SIGHUP`) to the gateway process.
    #[allow(unsafe_code)]
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0, "kill({sig}) failed");
    }

    /// Waits for exit, returning the exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether any log line contains `needle` (waiting up to `timeout`).
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.logs.lock().unwrap().iter().any(|l| l.contains(needle)) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GET on the admin port.
    pub fn admin_get(&self, path: &str) -> Response {
        request(
            self.admin,
            &format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"),
        )
    }

    /// The value of a counter/gauge on /metrics (summed across label sets matching `labels`).
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let body = self.admin_get("/metrics").text();
        let lines = body.lines().map(|l| Ok(l.to_string()));
        let scrape = prometheus_parse::Scrape::parse(lines).expect("metrics parse");
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    }

    /// [`Self::metric`], polled until it equals `want` or 3 s pass (a worker counts a request
    /// after its response is on the wire, so a client can be faster than the counter).
    pub fn metric_settles(&self, name: &str, labels: &[(&str, &str)], want: f64) -> f64 {
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        loop {
            let v = self.metric(name, labels);
            if v == want || std::time::Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Rewrites the config file (the gateway notices the change).
    /// Rewrites the file, signals SIGHUP, and waits until the gateway reports this reload
    /// applied (a refused reload fails the test).
    pub fn reload(&self, config: &str, timeout: Duration) {
        let reloads = || {
            self.logs
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains("configuration reloaded"))
                .count()
        };
        let before = reloads();
        self.rewrite_config(config);
        self.signal(libc::SIGHUP);
        let deadline = Instant::now() + timeout;
        while reloads() == before {
            let logs = self.logs.lock().unwrap().join("\n");
            assert!(!logs.contains("reload refused"), "{logs}");
            assert!(
                Instant::now() < deadline,
                "reload not applied; logs:\n{logs}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn rewrite_config(&self, config: &str) {
        std::fs::write(&self.config_path, config).unwrap();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Whatever the test asserted, the gateway must never have panicked: a panic on a worker
        // thread kills only that thread, and a test talking to another worker would not see it.
        // (The panic hook writes straight to stderr; a child's forwarded stderr is prefixed.)
        if !std::thread::panicking() && !self.panics_on_purpose {
            let logs = self.logs.lock().unwrap();
            let panics: Vec<&String> = logs
                .iter()
                .filter(|l| l.starts_with("thread '") && l.contains("panicked at"))
                .collect();
            assert!(
                panics.is_empty(),
                "mcp-guard panicked: {panics:?}\nlogs:\n{}",
                logs.join("\n")
            );
        }
    }
}

/// The demo MCP server in HTTP mode; killed on drop.
pub struct DemoHttp {
    pub child: Child,
    pub addr: SocketAddr,
}

impl DemoHttp {
    pub fn start(extra: &[&str]) -> DemoHttp {
        let mut child = Command::new(DEMO)
            .args(["--http", "127.0.0.1:0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start demo server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("unexpected demo server output: {line:?}"))
            .parse()
            .unwrap();
        DemoHttp { child, addr }
    }

    pub fn url(&self) -> String {
        format!("http://{}/mcp", self.addr)
    }
}

impl Drop for DemoHttp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A gateway config with a stdio upstream running the demo server.
pub fn stdio_config(io: &str, extra_server: &str, demo_args: &[&str]) -> String {
    let args: Vec<String> = demo_args.iter().map(|a| format!("{a:?}")).collect();
    format!(
        "[server]\nport = 0\nworkers = 2\nio = \"{io}\"\n{extra_server}\n[admin]\nport = 0\n\n[upstream]\ntransport = \"stdio\"\ncommand = {DEMO:?}\nargs = [{}]\ntimeout_secs = 10\n",
        args.join(", ")
    )
}

/// A gateway config with an HTTP upstream.
pub fn http_config(io: &str, url: &str, extra_server: &str, extra_upstream: &str) -> String {
    format!(
        "[server]\nport = 0\nworkers = 2\nio = \"{io}\"\n{extra_server}\n[admin]\nport = 0\n\n[upstream]\ntransport = \"http\"\nurl = \"{url}\"\ntimeout_secs = 10\n{extra_upstream}\n"
    )
}

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }

    /// JSON-RPC messages carried as SSE `data:` lines.
    pub fn sse_messages(&self) -> Vec<serde_json::Value> {
        self.text()
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(|d| serde_json::from_str(d.trim()).unwrap())
            .collect()
    }
}

/// Opens a connection with generous timeouts.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(15))).unwrap();
    s
}

/// Reads from `s` until what was read holds `needle`; returns all of it. Panics if the
/// connection closes first.
pub fn read_until_seen<S: Read>(s: &mut S, needle: &str) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(needle) {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    seen
}

/// Sends raw bytes on a fresh connection and reads one response.
pub fn request(addr: SocketAddr, raw: &str) -> Response {
    let mut s = connect(addr);
    s.write_all(raw.as_bytes()).unwrap();
    read_response(&mut s).expect("a response")
}

/// Reads one response (Content-Length, chunked or until close) from a stream.
pub fn read_response<S: Read>(s: &mut S) -> Option<Response> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => return None,
        }
    }
    let head = String::from_utf8(buf).unwrap();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status: u16 = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_string(), v.trim().to_string())
        })
        .collect();
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if status == 100 {
        return read_response(s);
    }
    if let Some(len) = get("content-length") {
        let len: usize = len.parse().unwrap();
        body.resize(len, 0);
        s.read_exact(&mut body).ok()?;
    } else if get("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut line = Vec::new();
            while !line.ends_with(b"\r\n") {
                match s.read(&mut byte) {
                    Ok(1) => line.push(byte[0]),
                    _ => {
                        return Some(Response {
                            status,
                            headers,
                            body,
                        });
                    }
                }
            }
            let size =
                usize::from_str_radix(std::str::from_utf8(&line).unwrap().trim(), 16).unwrap();
            if size == 0 {
                let mut crlf = [0u8; 2];
                s.read_exact(&mut crlf).ok()?;
                break;
            }
            let mut chunk = vec![0u8; size + 2];
            s.read_exact(&mut chunk).ok()?;
            body.extend_from_slice(&chunk[..size]);
        }
    } else if status != 204 && status != 304 {
        let _ = s.read_to_end(&mut body);
    }
    Some(Response {
        status,
        headers,
        body,
    })
}

/// Builds a POST to /mcp with the MCP headers; `extra` is raw header lines.
pub fn mcp_post_raw(body: &str, session: Option<&str>, extra: &str) -> String {
    mcp_post_raw_at("/mcp", body, session, extra)
}

/// As [`mcp_post_raw`], to `path` (a routed server's endpoint).
pub fn mcp_post_raw_at(path: &str, body: &str, session: Option<&str>, extra: &str) -> String {
    let sid = session.map_or(String::new(), |s| format!("Mcp-Session-Id: {s}\r\n"));
    format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nAccept: {ACCEPT_BOTH}\r\n{sid}{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// The header line carrying an API key.
pub fn bearer(key: &str) -> String {
    format!("Authorization: Bearer {key}\r\n")
}

/// Initializes at `path` with `extra` header lines; returns (serverInfo name, session id).
pub fn initialize_at(addr: SocketAddr, path: &str, extra: &str) -> (String, String) {
    let r = request(addr, &mcp_post_raw_at(path, INIT, None, extra));
    assert_eq!(r.status, 200, "initialize at {path}: {}", r.text());
    let name = rpc_result(&r)["result"]["serverInfo"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let sid = r.header("mcp-session-id").expect("a session").to_string();
    (name, sid)
}

/// A raw POST of `ping` with the given id, in session `sid`.
pub fn ping_raw(id: u32, sid: &str) -> String {
    mcp_post_raw(
        &format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"ping"}}"#),
        Some(sid),
        "",
    )
}

/// POSTs a JSON-RPC body to /mcp.
pub fn mcp_post(addr: SocketAddr, body: &str, session: Option<&str>) -> Response {
    request(addr, &mcp_post_raw(body, session, ""))
}

pub const INIT: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"test","version":"1"}}}"#;

/// Runs initialize + notifications/initialized; returns the session id.
pub fn initialize(addr: SocketAddr) -> String {
    let r = mcp_post(addr, INIT, None);
    assert_eq!(r.status, 200, "initialize failed: {}", r.text());
    let sid = r
        .header("mcp-session-id")
        .expect("initialize response carries Mcp-Session-Id")
        .to_string();
    let n = mcp_post(
        addr,
        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
        Some(&sid),
    );
    assert_eq!(n.status, 202, "initialized notification: {}", n.text());
    sid
}

/// The JSON-RPC message of a POST response, whether JSON or SSE.
pub fn rpc_result(r: &Response) -> serde_json::Value {
    if r.header("content-type")
        .is_some_and(|c| c.to_ascii_lowercase().starts_with("text/event-stream"))
    {
        r.sse_messages()
            .into_iter()
            .find(|m| m.get("id").is_some())
            .expect("an SSE response message")
    } else {
        r.json()
    }
}

/// A tools/call body.
pub fn call(id: u64, tool: &str, args: &str) -> String {
    format!(
        r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"{tool}","arguments":{args}}}}}"#
    )
}

/// Whether process `pid` has ended (gone, or a zombie nobody reaped yet).
pub fn process_ended(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
    }
}

/// Writes `content` to `path`, mode 0755.
pub fn write_executable(path: &std::path::Path, content: &[u8]) {
    std::fs::write(path, content).unwrap();
    let mut perms = std::fs::metadata(path).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(path, perms).unwrap();
}

/// Waits up to `within` for process `pid` to end; fails with `why` if it does not.
pub fn wait_until_ended(pid: &str, within: Duration, why: &str) {
    let deadline = Instant::now() + within;
    while !process_ended(pid) {
        assert!(Instant::now() < deadline, "process {pid}: {why}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
