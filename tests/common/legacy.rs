//! A raw legacy HTTP+SSE (2024-11-05) client for tests: opens the stream, reads its events
//! (de-chunked), posts to the messages URL its `endpoint` event names.

use super::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);

/// The credentials header for `key`; none for an empty key (an anonymous caller).
pub fn auth_line(key: &str) -> String {
    if key.is_empty() {
        String::new()
    } else {
        bearer(key)
    }
}

pub const INIT_2024: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2024-11-05","capabilities":{},"clientInfo":{"name":"legacy","version":"1"}}}"#;
pub const INITIALIZED: &str = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;

/// An open legacy stream: the raw connection, the decoded SSE text so far, and the messages
/// URL its `endpoint` event named.
pub struct Legacy {
    pub conn: TcpStream,
    /// Decoded (de-chunked) body bytes not yet consumed as events.
    text: Vec<u8>,
    /// Raw bytes received and not yet de-chunked.
    raw: Vec<u8>,
    pub endpoint: String,
    pub addr: SocketAddr,
    pub key: String,
    /// Messages read while waiting for an answer (notifications, other answers).
    pub others: Vec<Value>,
}

impl Legacy {
    pub fn open(addr: SocketAddr, path: &str, key: &str) -> Legacy {
        let (status, l) = Self::try_open(addr, path, key);
        assert_eq!(status, 200, "GET {path}");
        l.expect("a stream")
    }

    pub fn try_open(addr: SocketAddr, path: &str, key: &str) -> (u16, Option<Legacy>) {
        Self::try_open_with(addr, path, key, "")
    }

    /// As [`Legacy::try_open`], with `extra` header lines on the GET.
    pub fn try_open_with(
        addr: SocketAddr,
        path: &str,
        key: &str,
        extra: &str,
    ) -> (u16, Option<Legacy>) {
        let mut conn = connect(addr);
        conn.set_read_timeout(Some(WAIT)).unwrap();
        write!(
            conn,
            "GET {path} HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n{}{extra}\r\n",
            auth_line(key)
        )
        .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if conn.read(&mut byte).unwrap_or(0) == 0 {
                break;
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_string();
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if status != 200 {
            return (status, None);
        }
        assert!(
            head.to_ascii_lowercase().contains("text/event-stream"),
            "{head}"
        );
        let mut l = Legacy {
            conn,
            text: Vec::new(),
            raw: Vec::new(),
            endpoint: String::new(),
            addr,
            key: key.to_string(),
            others: Vec::new(),
        };
        let (event, data) = l.next_event().expect("the endpoint event");
        assert_eq!(event.as_deref(), Some("endpoint"));
        l.endpoint = data;
        (status, Some(l))
    }

    /// Moves complete chunks from `raw` to `text`.
    fn dechunk(&mut self) {
        loop {
            let Some(end) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let size =
                usize::from_str_radix(std::str::from_utf8(&self.raw[..end]).unwrap().trim(), 16)
                    .unwrap();
            if self.raw.len() < end + 2 + size + 2 {
                return;
            }
            let chunk = self.raw[end + 2..end + 2 + size].to_vec();
            self.raw.drain(..end + 2 + size + 2);
            self.text.extend(chunk);
        }
    }

    /// The next event other than a keep-alive comment: (event type, data). `None` when the
    /// stream ended or nothing came within the wait.
    pub fn next_event(&mut self) -> Option<(Option<String>, String)> {
        let deadline = Instant::now() + WAIT;
        loop {
            self.dechunk();
            if let Some(at) = self.text.windows(2).position(|w| w == b"\n\n") {
                let event = String::from_utf8(self.text.drain(..at + 2).collect()).unwrap();
                let (mut name, mut data) = (None, Vec::new());
                for line in event.lines() {
                    if let Some(v) = line.strip_prefix("event: ") {
                        name = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push(v);
                    }
                }
                if data.is_empty() {
                    continue;
                }
                return Some((name, data.join("\n")));
            }
            if Instant::now() > deadline {
                return None;
            }
            let mut buf = [0u8; 8192];
            match self.conn.read(&mut buf) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.raw.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// The next `message` event's JSON.
    pub fn next_message(&mut self) -> Option<Value> {
        let (name, data) = self.next_event()?;
        assert_eq!(name.as_deref(), Some("message"), "{data}");
        Some(serde_json::from_str(&data).unwrap())
    }

    /// POSTs `body` to the messages URL (on a new connection) as `key`.
    pub fn post_as(&self, key: &str, body: &str) -> Response {
        post_to(self.addr, &self.endpoint, key, body)
    }

    pub fn post(&self, body: &str) -> Response {
        self.post_as(&self.key.clone(), body)
    }

    /// POSTs and returns the answer from the stream (the first message with the request's
    /// id; anything read before it is kept in `others`).
    pub fn call(&mut self, body: &str) -> Value {
        let id = serde_json::from_str::<Value>(body).unwrap()["id"].clone();
        let r = self.post(body);
        assert_eq!(r.status, 202, "{}", r.text());
        self.answer_to(&id)
    }

    /// The answer to request `id` from the stream (anything read before it is kept in
    /// `others`).
    pub fn answer_to(&mut self, id: &Value) -> Value {
        loop {
            let m = self.next_message().expect("an answer on the stream");
            if m.get("id") == Some(id) && m.get("method").is_none() {
                return m;
            }
            self.others.push(m);
        }
    }

    pub fn initialize(&mut self) -> Value {
        let init = self.call(INIT_2024);
        assert_eq!(self.post(INITIALIZED).status, 202);
        init
    }
}

pub fn post_to(addr: SocketAddr, target: &str, key: &str, body: &str) -> Response {
    request(
        addr,
        &format!(
            "POST {target} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n{}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            auth_line(key),
            body.len()
        ),
    )
}
