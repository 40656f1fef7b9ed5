//! HTTP/1.1 on httparse: request heads and bodies, responses, the client connection loop, and
//! the upstream client with its per-worker pool.

pub mod body;
pub mod chunked;
pub mod client;
pub mod io;
pub mod request;
pub mod response;
pub mod server;
pub mod sse;

/// `%XX` escapes decoded (`None` when one is malformed — two hex digits, no sign — or the
/// result is not UTF-8). `+` stays `+`: this is for URL parts, not form bodies.
pub fn percent_decoded(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn percent_escapes_need_two_hex_digits() {
        assert_eq!(super::percent_decoded("a%2Fb%20").as_deref(), Some("a/b "));
        for bad in ["%+1", "%-1", "%2", "%zz", "%ff"] {
            assert_eq!(super::percent_decoded(bad), None, "{bad}");
        }
    }
}
