//! Exact comparison of a JSON number with a `min` / `max` bound.
//!
//! The tape holds a number as an `f64` (or a 64-bit integer), and `100.0000000000000001` is
//! `100.0` as an `f64`: compared as doubles it passes `max = 100`, while a server reading the
//! number with more precision (a decimal type, a big-number library) sees more than 100. Only
//! a number that lands *exactly* on the bound as a double can be misjudged that way (rounding
//! to the nearest double keeps order, so a double below or above the bound is a number below
//! or above it), so the double comparison decides every other case, and that one case is
//! decided on the decimal text: the integer itself, or the number's text in the body, found
//! again by a small scanner that follows the same pointer (rare, so its cost does not matter).
//! The bound is the decimal the operator wrote, recovered as the shortest text of its double
//! (`0.1` stays `0.1`).

use crate::mcp::jsonrpc::TapeValue;
use simd_json::ValueType;
use simd_json::prelude::*;
use std::cmp::Ordering;

/// The body a tape was parsed from, and which message of it (its index in a batch).
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    body: &'a [u8],
    index: usize,
}

impl<'a> Source<'a> {
    /// The raw `body` the classifier parsed, and the message's index in it (0 unless a batch).
    pub fn new(body: &'a [u8], index: usize) -> Self {
        Source { body, index }
    }
}

/// How the number `v` compares with `bound`; `None` when it cannot be told exactly (not a
/// number, or its text not found again): the caller refuses.
pub fn compare(
    v: TapeValue<'_, '_>,
    bound: f64,
    tokens: &[(String, String)],
    source: Source<'_>,
) -> Option<Ordering> {
    let (approx, integer) = match v.value_type() {
        ValueType::I64 => {
            let n = v.as_i64()?;
            (n as f64, Some(n.to_string()))
        }
        ValueType::U64 => {
            let n = v.as_u64()?;
            (n as f64, Some(n.to_string()))
        }
        ValueType::F64 => (v.as_f64()?, None),
        _ => return None,
    };
    match approx.partial_cmp(&bound)? {
        Ordering::Equal => {}
        other => return Some(other),
    }
    let bound_text = format!("{bound:e}");
    match integer {
        Some(text) => compare_text(&text, &bound_text),
        None => compare_text(locate(source, tokens)?, &bound_text),
    }
}

/// Compares two JSON number texts by value, exactly.
fn compare_text(a: &str, b: &str) -> Option<Ordering> {
    let (a, b) = (Decimal::parse(a)?, Decimal::parse(b)?);
    Some(a.cmp_value(&b))
}

/// A decimal as sign, significant digits (no leading or trailing zeros) and the power of ten
/// of the first digit's place plus one: `123.4` is `1234` with `exp` 3, `0.05` is `5` with -1.
#[derive(Debug, PartialEq, Eq)]
struct Decimal {
    negative: bool,
    digits: Vec<u8>,
    exp: i64,
}

impl Decimal {
    /// Parses JSON number syntax (`-?int(.frac)?([eE][+-]?digits)?`).
    fn parse(text: &str) -> Option<Decimal> {
        let b = text.as_bytes();
        let mut i = 0;
        let negative = b.first() == Some(&b'-');
        if negative {
            i += 1;
        }
        let mut all = Vec::new();
        let mut int_len: i64 = 0;
        while let Some(&c) = b.get(i).filter(|c| c.is_ascii_digit()) {
            all.push(c - b'0');
            int_len += 1;
            i += 1;
        }
        if int_len == 0 {
            return None;
        }
        if b.get(i) == Some(&b'.') {
            i += 1;
            let start = i;
            while let Some(&c) = b.get(i).filter(|c| c.is_ascii_digit()) {
                all.push(c - b'0');
                i += 1;
            }
            if i == start {
                return None;
            }
        }
        let mut exp10: i64 = 0;
        if matches!(b.get(i), Some(b'e' | b'E')) {
            i += 1;
            let minus = match b.get(i) {
                Some(b'-') => {
                    i += 1;
                    true
                }
                Some(b'+') => {
                    i += 1;
                    false
                }
                _ => false,
            };
            let start = i;
            while let Some(&c) = b.get(i).filter(|c| c.is_ascii_digit()) {
                // Saturates: an exponent past any double's range compares the same.
                exp10 = (exp10 * 10 + i64::from(c - b'0')).min(1 << 40);
                i += 1;
            }
            if i == start {
                return None;
            }
            if minus {
                exp10 = -exp10;
            }
        }
        if i != b.len() {
            return None;
        }
        let lead = all.iter().take_while(|&&d| d == 0).count();
        let mut digits = all[lead..].to_vec();
        while digits.last() == Some(&0) {
            digits.pop();
        }
        Some(Decimal {
            negative,
            exp: int_len - lead as i64 + exp10,
            digits,
        })
    }

    fn cmp_value(&self, other: &Decimal) -> Ordering {
        let sign = |d: &Decimal| match (d.digits.is_empty(), d.negative) {
            (true, _) => 0,
            (false, true) => -1,
            (false, false) => 1,
        };
        let (sa, sb) = (sign(self), sign(other));
        if sa != sb || sa == 0 {
            return sa.cmp(&sb);
        }
        let magnitude = self
            .exp
            .cmp(&other.exp)
            .then_with(|| self.digits.cmp(&other.digits));
        if sa < 0 {
            magnitude.reverse()
        } else {
            magnitude
        }
    }
}

/// Finds the text of the number at `params.arguments` + `tokens` of the message, by scanning
/// the raw body. The tape already refused duplicate members on this path, so the first member
/// of each name is the one the tape read.
fn locate<'a>(source: Source<'a>, tokens: &[(String, String)]) -> Option<&'a str> {
    let mut s = Scan {
        b: source.body,
        i: 0,
    };
    s.ws();
    if s.peek() == Some(b'[') {
        s.element(source.index)?;
    }
    s.member("params")?;
    s.member("arguments")?;
    for (token, _) in tokens {
        match s.peek()? {
            b'{' => s.member(token)?,
            b'[' => s.element(super::array_index(token)?)?,
            _ => return None,
        }
    }
    let start = s.i;
    while s
        .peek()
        .is_some_and(|c| matches!(c, b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'))
    {
        s.i += 1;
    }
    std::str::from_utf8(&s.b[start..s.i])
        .ok()
        .filter(|t| !t.is_empty())
}

/// A cursor over raw JSON that the classifier has already found valid.
struct Scan<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Scan<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\r' | b'\n')) {
            self.i += 1;
        }
    }

    fn expect(&mut self, c: u8) -> Option<()> {
        self.ws();
        (self.peek()? == c).then(|| self.i += 1)
    }

    /// A string's raw content (escapes kept); the cursor ends past its closing quote.
    fn string(&mut self) -> Option<&'a [u8]> {
        self.expect(b'"')?;
        let start = self.i;
        loop {
            match self.peek()? {
                b'\\' => self.i += 2,
                b'"' => break,
                _ => self.i += 1,
            }
        }
        let raw = self.b.get(start..self.i)?;
        self.i += 1;
        Some(raw)
    }

    fn skip_value(&mut self) -> Option<()> {
        self.ws();
        match self.peek()? {
            b'"' => self.string().map(|_| ()),
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match self.peek()? {
                        b'"' => {
                            self.string()?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                self.i += 1;
                                return Some(());
                            }
                        }
                        _ => {}
                    }
                    self.i += 1;
                }
            }
            _ => {
                while self.peek().is_some_and(|c| {
                    !matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\r' | b'\n')
                }) {
                    self.i += 1;
                }
                Some(())
            }
        }
    }

    /// Moves to the value of the first member named `key` of the object here.
    fn member(&mut self, key: &str) -> Option<()> {
        self.expect(b'{')?;
        self.ws();
        if self.peek()? == b'}' {
            return None;
        }
        loop {
            let raw = self.string()?;
            self.expect(b':')?;
            self.ws();
            let same = if raw.contains(&b'\\') {
                let quoted = [b"\"", raw, b"\""].concat();
                serde_json::from_slice::<String>(&quoted).ok()? == key
            } else {
                raw == key.as_bytes()
            };
            if same {
                return Some(());
            }
            self.skip_value()?;
            self.expect(b',')?;
            self.ws();
        }
    }

    /// Moves to element `n` of the array here.
    fn element(&mut self, n: usize) -> Option<()> {
        self.expect(b'[')?;
        for _ in 0..n {
            self.skip_value()?;
            self.expect(b',')?;
        }
        self.ws();
        (self.peek()? != b']').then_some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_texts_compare_by_value() {
        let c = |a: &str, b: &str| compare_text(a, b).unwrap();
        assert_eq!(c("100.0000000000000001", "1e2"), Ordering::Greater);
        assert_eq!(c("99.99999999999999999", "1e2"), Ordering::Less);
        assert_eq!(c("100.000", "1e2"), Ordering::Equal);
        assert_eq!(c("1E+2", "1e2"), Ordering::Equal);
        assert_eq!(c("0.10000000000000001", "1e-1"), Ordering::Greater);
        assert_eq!(c("-0", "0e0"), Ordering::Equal);
        assert_eq!(c("-5.5", "-5.50001"), Ordering::Greater);
        assert_eq!(c("-5.50001", "-5.5"), Ordering::Less);
        assert_eq!(
            c("9007199254740993", "9.007199254740992e15"),
            Ordering::Greater
        );
        assert_eq!(c("1e99999999999999999999", "1e308"), Ordering::Greater);
        assert_eq!(c("1e-99999999999999999999", "0e0"), Ordering::Greater);
        assert_eq!(c("00012", "1.2e1"), Ordering::Equal);
        for bad in ["", "-", "1.", ".5", "1e", "1x", "--1"] {
            assert!(Decimal::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn the_scanner_finds_the_number_the_pointer_names() {
        let tokens = |p: &str| -> Vec<(String, String)> {
            super::super::parse_pointer(p)
                .unwrap()
                .into_iter()
                .map(|t| (t.clone(), t))
                .collect()
        };
        let body = br#" { "id" : 1, "params" : { "name":"t", "x":{"arguments":0},
            "arg\u0075ments" : { "a\"b": [1, {"n": "}]"}, {"n" : 100.0000000000000001 } ] } } }"#;
        assert_eq!(
            locate(Source::new(body, 0), &tokens("/a\"b/2/n")),
            Some("100.0000000000000001")
        );
        let batch = br#"[{"params":{"arguments":{"n":1}}},{"params":{"arguments":{"n":-2.5e3}}}]"#;
        assert_eq!(locate(Source::new(batch, 1), &tokens("/n")), Some("-2.5e3"));
        assert_eq!(locate(Source::new(batch, 2), &tokens("/n")), None);
        assert_eq!(locate(Source::new(b"{", 0), &tokens("/n")), None);
    }
}
