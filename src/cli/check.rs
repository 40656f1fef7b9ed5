//! `check-upstream`: the MCP initialize handshake against each configured upstream, with a
//! clear pass/fail line per upstream. Blocking I/O with timeouts: this runs outside the gateway.

use crate::config::{HttpUpstream, Settings, StdioSettings, Transport};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const INIT: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"mcp-guard-check","version":"1"}}}"#;
const TIMEOUT: Duration = Duration::from_secs(10);

/// Checks every upstream; true when all pass.
pub fn check_all(s: &Settings) -> bool {
    let (name, result) = match &s.upstream.transport {
        Transport::Stdio(st) => (format!("default (stdio `{}`)", st.command), check_stdio(st)),
        Transport::Http(h) => (format!("default (http {})", h.url), check_http(h)),
    };
    match result {
        Ok(info) => {
            println!("PASS  {name}: {info}");
            true
        }
        Err(e) => {
            println!("FAIL  {name}: {e}");
            false
        }
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

fn check_stdio(st: &StdioSettings) -> Result<String, String> {
    let mut cmd = Command::new(&st.command);
    cmd.args(&st.args)
        .envs(st.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(cwd) = &st.cwd {
        cmd.current_dir(cwd);
    }
    let mut child = cmd.spawn().map_err(|e| format!("cannot start: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel();
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
    let write = writeln!(stdin, "{INIT}").and_then(|_| stdin.flush());
    let result = match write {
        Err(e) => Err(format!("cannot write to the process: {e}")),
        Ok(()) => match rx.recv_timeout(TIMEOUT) {
            Ok(Some(v)) => describe(&v),
            Ok(None) => Err("the process exited without answering initialize".into()),
            Err(_) => Err(format!("no answer to initialize within {TIMEOUT:?}")),
        },
    };
    drop(stdin);
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn check_http(h: &HttpUpstream) -> Result<String, String> {
    let mut last = String::from("no address");
    for addr in &h.addrs {
        match TcpStream::connect_timeout(addr, TIMEOUT) {
            Err(e) => last = format!("cannot connect to {addr}: {e}"),
            Ok(mut s) => {
                s.set_read_timeout(Some(TIMEOUT))
                    .map_err(|e| e.to_string())?;
                let mut req = format!(
                    "POST {} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\nconnection: close\r\ncontent-length: {}\r\n",
                    h.path,
                    h.host_header,
                    INIT.len()
                );
                for (n, v) in &h.headers {
                    req.push_str(&format!("{n}: {v}\r\n"));
                }
                req.push_str("\r\n");
                req.push_str(INIT);
                s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
                let mut raw = Vec::new();
                let _ = s.take(8 * 1024 * 1024).read_to_end(&mut raw);
                return parse_http_answer(&raw);
            }
        }
    }
    Err(last)
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
