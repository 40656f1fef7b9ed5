//! HTTP/1.1 framing shared by the mock upstream and the load generator: message heads (httparse),
//! bodies by Content-Length or chunked, and monoio read/write helpers.
//!
//! Every parser answers `Ok(None)` for "incomplete, read more", which is a different outcome from
//! `Err` ("invalid"): a caller never mistakes a short read for a broken peer.

use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

/// Larger messages are refused: both peers are ours, so anything bigger is a bug.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
const MAX_HEADERS: usize = 32;

/// One complete request, as the mock upstream needs it.
pub struct Request {
    pub method: String,
    pub path: String,
    pub session_id: Option<String>,
    pub close: bool,
    pub body: Vec<u8>,
    /// Bytes of the buffer this request used.
    pub consumed: usize,
}

/// One complete response, as the load generator needs it.
pub struct Response {
    pub status: u16,
    pub session_id: Option<String>,
    pub close: bool,
    pub body: Vec<u8>,
    pub consumed: usize,
}

enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

struct HeadInfo {
    framing: Framing,
    session_id: Option<String>,
    close: bool,
}

fn head_info(
    headers: &[httparse::Header<'_>],
    default_framing: Framing,
) -> Result<HeadInfo, String> {
    let mut info = HeadInfo {
        framing: default_framing,
        session_id: None,
        close: false,
    };
    for h in headers {
        let value =
            std::str::from_utf8(h.value).map_err(|_| format!("non-UTF-8 {} header", h.name))?;
        if h.name.eq_ignore_ascii_case("content-length") {
            let n: usize = value
                .trim()
                .parse()
                .map_err(|_| format!("bad Content-Length {value:?}"))?;
            if n > MAX_MESSAGE_BYTES {
                return Err(format!(
                    "Content-Length {n} over the {MAX_MESSAGE_BYTES} byte limit"
                ));
            }
            info.framing = Framing::Length(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if !value.trim().eq_ignore_ascii_case("chunked") {
                return Err(format!("unsupported Transfer-Encoding {value:?}"));
            }
            info.framing = Framing::Chunked;
        } else if h.name.eq_ignore_ascii_case("mcp-session-id") {
            info.session_id = Some(value.to_string());
        } else if h.name.eq_ignore_ascii_case("connection") {
            info.close = value.to_ascii_lowercase().contains("close");
        }
    }
    Ok(info)
}

/// Finds the body after a head of `head_len` bytes: `(body, total consumed)` once complete.
fn body_after(
    buf: &[u8],
    head_len: usize,
    framing: &Framing,
    eof: bool,
) -> Result<Option<(Vec<u8>, usize)>, String> {
    let rest = &buf[head_len..];
    match framing {
        Framing::Length(n) if rest.len() >= *n => Ok(Some((rest[..*n].to_vec(), head_len + n))),
        Framing::Length(_) => Ok(None),
        Framing::Chunked => Ok(decode_chunked(rest)?.map(|(body, used)| (body, head_len + used))),
        Framing::UntilClose if eof => Ok(Some((rest.to_vec(), buf.len()))),
        Framing::UntilClose => Ok(None),
    }
}

/// Decodes a complete chunked body (trailers skipped): `(body, bytes used)`.
pub fn decode_chunked(buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, String> {
    let mut body = Vec::new();
    let mut pos = 0;
    loop {
        let (data_start, size) = match httparse::parse_chunk_size(&buf[pos..]) {
            Ok(httparse::Status::Complete((used, size))) => (pos + used, size as usize),
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err("invalid chunk size line".into()),
        };
        if body.len() + size > MAX_MESSAGE_BYTES {
            return Err("chunked body over the size limit".into());
        }
        if size == 0 {
            // Trailer section: header lines up to an empty line.
            let mut line_start = data_start;
            loop {
                let Some(offset) = find(&buf[line_start..], b"\r\n") else {
                    return Ok(None);
                };
                if offset == 0 {
                    return Ok(Some((body, line_start + 2)));
                }
                line_start += offset + 2;
            }
        }
        let data_end = data_start + size;
        if buf.len() < data_end + 2 {
            return Ok(None);
        }
        if &buf[data_end..data_end + 2] != b"\r\n" {
            return Err("chunk not followed by CRLF".into());
        }
        body.extend_from_slice(&buf[data_start..data_end]);
        pos = data_end + 2;
    }
}

/// Parses one request from the front of `buf`.
pub fn parse_request(buf: &[u8]) -> Result<Option<Request>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_MESSAGE_BYTES => {
            return Err("request head too large".into());
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("invalid request head: {e}")),
    };
    let info = head_info(req.headers, Framing::Length(0))?;
    let Some((body, consumed)) = body_after(buf, head_len, &info.framing, false)? else {
        return Ok(None);
    };
    Ok(Some(Request {
        method: req.method.unwrap_or_default().to_string(),
        path: req.path.unwrap_or_default().to_string(),
        session_id: info.session_id,
        close: info.close || req.version == Some(0),
        body,
        consumed,
    }))
}

/// Parses one response from the front of `buf`; `eof` says the peer closed (ends a body that
/// has neither length nor chunking).
pub fn parse_response(buf: &[u8], eof: bool) -> Result<Option<Response>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_MESSAGE_BYTES => {
            return Err("response head too large".into());
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("invalid response head: {e}")),
    };
    let status = resp.code.unwrap_or(0);
    // 1xx, 204 and 304 never carry a body; otherwise an unframed body runs to the close.
    let no_body = (100..200).contains(&status) || status == 204 || status == 304;
    let default = if no_body {
        Framing::Length(0)
    } else {
        Framing::UntilClose
    };
    let mut info = head_info(resp.headers, default)?;
    if no_body {
        info.framing = Framing::Length(0);
    }
    let until_close = matches!(info.framing, Framing::UntilClose);
    let Some((body, consumed)) = body_after(buf, head_len, &info.framing, eof)? else {
        return Ok(None);
    };
    Ok(Some(Response {
        status,
        session_id: info.session_id,
        close: info.close || until_close,
        body,
        consumed,
    }))
}

/// Byte-string search (bodies are small; no need for a SIMD crate).
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Appends whatever the peer sends next to `buf`; `Ok(0)` means the peer closed.
pub async fn read_more(stream: &mut TcpStream, buf: Vec<u8>) -> (std::io::Result<usize>, Vec<u8>) {
    let mut buf = buf;
    if buf.capacity() - buf.len() < 8192 {
        buf.reserve(16 * 1024);
    }
    let len = buf.len();
    let (result, slice) = stream.read(buf.slice_mut(len..)).await;
    (result, slice.into_inner())
}

/// Writes all of `bytes`.
pub async fn write_all(stream: &mut TcpStream, bytes: Vec<u8>) -> std::io::Result<()> {
    let (result, _) = stream.write_all(bytes).await;
    result.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_body_incomplete_then_complete() {
        let full = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\nNEXT";
        for cut in 0..full.len() - 4 {
            assert!(decode_chunked(&full[..cut]).unwrap().is_none(), "cut {cut}");
        }
        let (body, used) = decode_chunked(full).unwrap().unwrap();
        assert_eq!(body, b"hello world");
        assert_eq!(&full[used..], b"NEXT");
    }

    #[test]
    fn chunked_body_invalid() {
        assert!(decode_chunked(b"zz\r\n").is_err());
        assert!(decode_chunked(b"2\r\nabXX0\r\n\r\n").is_err());
    }

    #[test]
    fn request_with_length_and_session() {
        let raw = b"POST /mcp HTTP/1.1\r\nContent-Length: 2\r\nMcp-Session-Id: s1\r\n\r\n{}GET";
        let req = parse_request(raw).unwrap().unwrap();
        assert_eq!((req.method.as_str(), req.path.as_str()), ("POST", "/mcp"));
        assert_eq!(req.session_id.as_deref(), Some("s1"));
        assert_eq!(req.body, b"{}");
        assert_eq!(&raw[req.consumed..], b"GET");
        assert!(parse_request(&raw[..raw.len() - 4]).unwrap().is_none());
    }

    #[test]
    fn response_framings() {
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        assert_eq!(
            parse_response(chunked, false).unwrap().unwrap().body,
            b"abc"
        );
        let accepted = b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            parse_response(accepted, false).unwrap().unwrap().status,
            202
        );
        let unframed = b"HTTP/1.1 200 OK\r\n\r\nxyz";
        assert!(parse_response(unframed, false).unwrap().is_none());
        let resp = parse_response(unframed, true).unwrap().unwrap();
        assert!(resp.close && resp.body == b"xyz");
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", false).is_err());
    }
}
