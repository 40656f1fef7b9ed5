//! `application/x-www-form-urlencoded` and query strings, both ways: parsing with OAuth's rule
//! that no parameter may appear twice, and percent-encoding of everything that is not
//! unreserved (so a value can never end a header line or start another parameter).

use std::collections::HashMap;

/// Parameters that arrive more than once, or not as UTF-8, make the whole request invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormError {
    /// The named parameter appears more than once (RFC 6749 §3.1: MUST NOT).
    Repeated(String),
    /// A name or value is not UTF-8 after percent-decoding, or has a broken escape.
    Undecodable,
}

impl std::fmt::Display for FormError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FormError::Repeated(n) => write!(f, "parameter `{n}` is repeated"),
            FormError::Undecodable => f.write_str("parameters are not well-formed UTF-8"),
        }
    }
}

/// The most parameters read from one form or query; more is refused rather than hashed.
const MAX_PARAMS: usize = 64;

/// Parses `a=1&b=2` (empty pieces skipped). A parameter with an empty value counts as absent,
/// as RFC 6749 §3.1 says it must.
pub fn parse(input: &[u8]) -> Result<HashMap<String, String>, FormError> {
    let mut out = HashMap::new();
    for (n, piece) in input
        .split(|b| *b == b'&')
        .filter(|p| !p.is_empty())
        .enumerate()
    {
        if n >= MAX_PARAMS {
            return Err(FormError::Undecodable);
        }
        let (name, value) = match piece.iter().position(|b| *b == b'=') {
            Some(i) => (&piece[..i], &piece[i + 1..]),
            None => (piece, &b""[..]),
        };
        let name = decode(name)?;
        let value = decode(value)?;
        if out.contains_key(&name) {
            return Err(FormError::Repeated(name));
        }
        if !value.is_empty() {
            out.insert(name, value);
        } else {
            // Still counts for the repetition rule.
            out.insert(name, String::new());
        }
    }
    out.retain(|_, v| !v.is_empty());
    Ok(out)
}

/// The decoded names of a query's parameters (repeats kept, undecodable ones as `None`).
pub fn names(input: &[u8]) -> Vec<Option<String>> {
    input
        .split(|b| *b == b'&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| decode(pair.split(|b| *b == b'=').next().unwrap_or_default()).ok())
        .collect()
}

fn decode(raw: &[u8]) -> Result<String, FormError> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = raw.get(i + 1..i + 3).ok_or(FormError::Undecodable)?;
                // Two hex digits exactly (`from_str_radix` alone would take `%+1`).
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return Err(FormError::Undecodable);
                }
                let s = std::str::from_utf8(hex).map_err(|_| FormError::Undecodable)?;
                out.push(u8::from_str_radix(s, 16).map_err(|_| FormError::Undecodable)?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| FormError::Undecodable)
}

/// Percent-encodes `s` for a query or form value: only RFC 3986 unreserved characters stay.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `name=value&…`, names and values encoded (a name with `+`, `&` or `=` would otherwise come
/// back as another name; found by the `peer_inputs` fuzz target).
pub fn encode_pairs(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(n, v)| format!("{}={}", encode(n), encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// `base` with `pairs` appended as query parameters (after `&` when it already has a query).
pub fn with_query(base: &str, pairs: &[(&str, &str)]) -> String {
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}{}", encode_pairs(pairs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_decode_and_refuse_repeats() {
        assert!(parse(b"a=%+1").is_err() && parse(b"a=%-1").is_err());
        let f = parse(b"a=1&b=x+y%2Fz&c=&&d").unwrap();
        assert_eq!(f.get("a").map(String::as_str), Some("1"));
        assert_eq!(f.get("b").map(String::as_str), Some("x y/z"));
        assert!(!f.contains_key("c") && !f.contains_key("d"));
        assert_eq!(parse(b"a=1&a=2"), Err(FormError::Repeated("a".into())));
        assert_eq!(parse(b"a=1&a="), Err(FormError::Repeated("a".into())));
        assert_eq!(parse(b"a=%zz"), Err(FormError::Undecodable));
        assert_eq!(parse(b"a=%"), Err(FormError::Undecodable));
        assert_eq!(parse(b"a=%ff"), Err(FormError::Undecodable));
        let many = vec!["x=1"; 100].join("&");
        assert!(parse(many.as_bytes()).is_err());
    }

    #[test]
    fn encoding_leaves_only_unreserved_characters() {
        assert_eq!(encode("a b&c=d\r\n/é"), "a%20b%26c%3Dd%0D%0A%2F%C3%A9");
        assert_eq!(
            with_query("https://x/cb?k=1", &[("s", "a b")]),
            "https://x/cb?k=1&s=a%20b"
        );
        assert_eq!(
            with_query("https://x/cb", &[("s", "v")]),
            "https://x/cb?s=v"
        );
    }
}
