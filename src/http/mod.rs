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

/// Whether a `Content-Type` value names an SSE stream. Media types are case-insensitive
/// (RFC 9110 §8.3.1), so `Text/Event-Stream; charset=utf-8` is one too; a type that merely
/// starts with the name (`text/event-streams`) is not.
pub fn is_event_stream(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("text/event-stream"))
}

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
    fn an_event_stream_is_recognized_in_any_case_and_with_parameters() {
        for yes in [
            "text/event-stream",
            "Text/Event-Stream",
            "TEXT/EVENT-STREAM; charset=utf-8",
            " text/event-stream ;x=1",
        ] {
            assert!(super::is_event_stream(yes), "{yes}");
        }
        for no in [
            "text/event-streams",
            "application/json",
            "text/event",
            "",
            "text/plain; x=text/event-stream",
        ] {
            assert!(!super::is_event_stream(no), "{no}");
        }
    }

    #[test]
    fn percent_escapes_need_two_hex_digits() {
        assert_eq!(super::percent_decoded("a%2Fb%20").as_deref(), Some("a/b "));
        for bad in ["%+1", "%-1", "%2", "%zz", "%ff"] {
            assert_eq!(super::percent_decoded(bad), None, "{bad}");
        }
    }
}
