//! Response heads and bodies the gateway writes: status lines, headers, fixed bodies and
//! chunked framing for streamed ones.

use std::fmt::Write as _;

/// The reason phrase for the statuses the gateway produces.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        302 => "Found",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        408 => "Request Timeout",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        417 => "Expectation Failed",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// How a response body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `Content-Length: n`.
    Length(u64),
    /// `Transfer-Encoding: chunked` (streamed).
    Chunked,
}

/// Serialises a response head into `out`.
pub fn write_head(
    out: &mut Vec<u8>,
    status: u16,
    headers: &[(&str, &str)],
    framing: Framing,
    keep_alive: bool,
) {
    // Built byte by byte rather than with `write!`: this runs for every response.
    out.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(out, u64::from(status));
    out.push(b' ');
    out.extend_from_slice(reason(status).as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        // 1xx, 204 and 304 carry no body and no framing of one (RFC 9110, 8.6 and 15.3.5):
        // a client reads none, whatever a header says.
        _ if status < 200 || status == 204 || status == 304 => {}
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends `n` in decimal.
pub fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Appends `data` as one chunk (nothing for empty data, which would end the body).
pub fn write_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    let _ = write!(HexWriter(out), "{:x}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The last chunk of a chunked body.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

struct HexWriter<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for HexWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// A JSON-RPC error object as bytes; `id` is JSON text (`null` when unknown).
///
/// `id_json` is `None` when the request's id could not be known (its body unread or
/// unreadable): the member is then left out, as MCP's error response has it (`id` optional, a
/// string or a number), rather than JSON-RPC 2.0's `null`, which MCP's schema does not allow.
pub fn jsonrpc_error(
    id_json: Option<&str>,
    code: i64,
    message: &str,
    data: Option<&str>,
) -> Vec<u8> {
    let msg = serde_json::Value::String(message.to_string()).to_string();
    let mut s = String::from("{\"jsonrpc\":\"2.0\",");
    if let Some(id) = id_json {
        s.push_str("\"id\":");
        s.push_str(id);
        s.push(',');
    }
    s.push_str(&format!("\"error\":{{\"code\":{code},\"message\":{msg}"));
    if let Some(d) = data {
        s.push_str(",\"data\":");
        s.push_str(d);
    }
    s.push_str("}}");
    s.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_and_chunks_are_well_formed() {
        let mut out = Vec::new();
        write_head(
            &mut out,
            200,
            &[("content-type", "text/event-stream")],
            Framing::Chunked,
            true,
        );
        write_chunk(&mut out, b"hello world, this is a chunk");
        out.extend_from_slice(LAST_CHUNK);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n1c\r\nhello"));
        assert!(text.ends_with("\r\n0\r\n\r\n"));
    }

    #[test]
    fn jsonrpc_error_escapes_message() {
        let e = jsonrpc_error(Some("1"), -32600, "bad \"x\"", None);
        let v: serde_json::Value = serde_json::from_slice(&e).unwrap();
        assert_eq!(v["error"]["message"], "bad \"x\"");
    }
}
