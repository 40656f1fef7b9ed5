//! Secret redaction: credentials in what an upstream sends toward the model (tool results and
//! every other message) are replaced with a marker naming the detector before the client
//! sees them.
//!
//! Detection runs on the decoded value of every JSON string in a message (a JSON escape such
//! as `\u0041KIA…` cannot hide a key), except the envelope's own `jsonrpc`, `id` and `method`;
//! only the strings that change are re-encoded, everything else keeps its bytes, so the
//! message stays valid JSON with its members in their order. Integer numbers are checked as
//! card numbers too (a card number needs no quotes to reach the model).
//!
//! All matching is done by the `regex` crate, whose engines run in time linear in the text:
//! an upstream's text cannot make a scan slow, whatever it holds.

use crate::mcp::filter::Unfilterable;
use base64::Engine as _;
use regex::{Regex, RegexBuilder, RegexSet, RegexSetBuilder};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, OnceLock};

/// The built-in detectors, by the names the configuration and the audit use.
pub const BUILTIN: &[&str] = &[
    "aws_access_key",
    "github_token",
    "slack_token",
    "stripe_key",
    "private_key",
    "jwt",
    "card_number",
];

/// Largest compiled program a configured pattern may take (bytes), so that a pattern such as
/// `\w{1000}{1000}` is refused at load rather than using the gateway's memory.
const PATTERN_SIZE_LIMIT: usize = 1 << 20;
/// Longest configured pattern name (it is a metric label and an audit value).
const MAX_NAME_LEN: usize = 64;

/// What a match must pass besides its regex.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    None,
    /// 13–19 digits passing the Luhn check.
    Luhn,
    /// The first segment decodes to a JSON object with an `alg` member.
    JwtHeader,
}

/// The regex of a built-in detector on a decoded string, and a looser one (no word
/// boundaries) whose absence from a message's raw text proves the detector cannot fire in it.
fn builtin(name: &str) -> Option<(&'static str, &'static str, Check)> {
    // `(?-u:\b)`: an ASCII word boundary, which the faster engines handle on any text (a
    // Unicode one makes them give way to a slower one on non-ASCII input).
    Some(match name {
        "aws_access_key" => (
            r"(?-u:\b)(?:AKIA|ASIA)[A-Z0-9]{16}(?-u:\b)",
            r"(?:AKIA|ASIA)[A-Z0-9]{16}",
            Check::None,
        ),
        "github_token" => (
            r"(?-u:\b)(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})(?-u:\b)",
            r"gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{22}",
            Check::None,
        ),
        "slack_token" => (
            r"(?-u:\b)xox[abprs]-[A-Za-z0-9-]{10,}",
            r"xox[abprs]-[A-Za-z0-9-]{10}",
            Check::None,
        ),
        "stripe_key" => (
            r"(?-u:\b)[sr]k_(?:live|test)_[A-Za-z0-9]{10,}",
            r"[sr]k_(?:live|test)_[A-Za-z0-9]{10}",
            Check::None,
        ),
        // Through the END line when there is one; a key cut off before its END is redacted to
        // the end of the string (its body would otherwise leak).
        "private_key" => (
            r"-----BEGIN[ A-Z0-9]*PRIVATE KEY-----(?:[\s\S]*?-----END[ A-Z0-9]*PRIVATE KEY-----|[\s\S]*)",
            r"-----BEGIN[ A-Z0-9]*PRIVATE KEY",
            Check::None,
        ),
        // A header is a JSON object: `{` then `"` or white space encodes to `ey` or `ew`.
        "jwt" => (
            r"(?-u:\b)e[wy][A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*",
            r"e[wy][A-Za-z0-9_-]{8}[A-Za-z0-9_-]*\.[A-Za-z0-9_-]{8}",
            Check::JwtHeader,
        ),
        // Issuers' first digits are 2–6; spaces or dashes may separate the digits.
        "card_number" => (
            r"(?-u:\b)[2-6][0-9](?:[ -]?[0-9]){11,17}(?-u:\b)",
            r"[2-6][0-9](?:[ -]?[0-9]){11}",
            Check::Luhn,
        ),
        _ => return None,
    })
}

/// One detector, compiled.
#[derive(Debug)]
struct Detector {
    name: String,
    regex: Regex,
    check: Check,
    /// The replacement, `{name}` already substituted.
    marker: String,
    /// Its metric slot.
    slot: usize,
}

/// `[redaction]`, compiled at load; shared by every worker through the config snapshot.
#[derive(Debug)]
pub struct Redactor {
    detectors: Vec<Detector>,
    /// Every detector's regex, in `detectors` order: one pass says whether a string holds
    /// anything to look at.
    any: RegexSet,
    /// Run over a message's raw text: no match proves that no string in it can hold a secret
    /// (the fast path). `None` when no such proof is possible for this configuration.
    raw: Option<RegexSet>,
    /// Whether integer numbers are checked as card numbers.
    cards: bool,
}

/// `[redaction]` as the file gives it.
pub struct RedactionConfig<'a> {
    /// Built-in detector names (`detectors`).
    pub detectors: &'a [String],
    /// Configured name → regex (`patterns`).
    pub patterns: &'a BTreeMap<String, String>,
    /// The marker, `{name}` standing for the detector's name (`replacement`).
    pub replacement: &'a str,
}

impl Redactor {
    /// Compiles the configuration; `Err((key, message))` names the offending key.
    pub fn new(cfg: &RedactionConfig<'_>) -> Result<Self, (String, String)> {
        let mut detectors = Vec::new();
        let mut raw_patterns: Vec<String> = Vec::new();
        let mut raw_possible = true;
        for (i, name) in cfg.detectors.iter().enumerate() {
            let Some((full, loose, check)) = builtin(name) else {
                return Err((
                    format!("redaction.detectors[{i}]"),
                    format!(
                        "unknown detector '{name}' (known: {}; own regexes go in redaction.patterns)",
                        BUILTIN.join(", ")
                    ),
                ));
            };
            if detectors.iter().any(|d: &Detector| d.name == *name) {
                continue;
            }
            detectors.push(Detector {
                name: name.clone(),
                regex: Regex::new(full)
                    .map_err(|e| (format!("redaction.detectors[{i}]"), e.to_string()))?,
                check,
                marker: cfg.replacement.replace("{name}", name),
                slot: metric_slot(name),
            });
            raw_patterns.push(loose.to_string());
        }
        // A JSON escape could spell any of the above: a message holding one takes the slow
        // path, whatever else it holds.
        raw_patterns.push(r"\\u".to_string());
        for (name, pattern) in cfg.patterns {
            let key = format!("redaction.patterns.{name}");
            if name.is_empty()
                || name.len() > MAX_NAME_LEN
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err((
                    key,
                    format!("a pattern name is 1–{MAX_NAME_LEN} letters, digits, '_' or '-'"),
                ));
            }
            if BUILTIN.contains(&name.as_str()) {
                return Err((key, "the name of a built-in detector".into()));
            }
            let regex = RegexBuilder::new(pattern)
                .size_limit(PATTERN_SIZE_LIMIT)
                .dfa_size_limit(PATTERN_SIZE_LIMIT)
                .build()
                .map_err(|e| (key.clone(), format!("not a valid regex: {e}")))?;
            if regex.is_match("") {
                return Err((key, "matches the empty string".into()));
            }
            // An anchor (`^`, `$`) means something else in the raw text than in a decoded
            // string, so the raw text proves nothing for such a configuration.
            let anchored = regex_syntax::parse(pattern)
                .map(|h| h.properties().look_set().contains_anchor())
                .unwrap_or(true);
            raw_possible &= !anchored;
            raw_patterns.push(pattern.clone());
            detectors.push(Detector {
                name: name.clone(),
                regex,
                check: Check::None,
                marker: cfg.replacement.replace("{name}", name),
                slot: metric_slot(name),
            });
        }
        if !cfg.patterns.is_empty() {
            // A configured pattern may match what any escape decodes to (a newline, a quote):
            // then only text without escapes is the same raw and decoded.
            raw_patterns.push(r"\\".to_string());
        }
        let any = RegexSetBuilder::new(detectors.iter().map(|d| d.regex.as_str()))
            .size_limit(PATTERN_SIZE_LIMIT * 8)
            .dfa_size_limit(PATTERN_SIZE_LIMIT * 8)
            .build()
            .map_err(|e| ("redaction.patterns".to_string(), e.to_string()))?;
        let raw = if raw_possible {
            Some(
                RegexSetBuilder::new(&raw_patterns)
                    .size_limit(PATTERN_SIZE_LIMIT * 8)
                    .dfa_size_limit(PATTERN_SIZE_LIMIT * 8)
                    .build()
                    .map_err(|e| ("redaction.patterns".to_string(), e.to_string()))?,
            )
        } else {
            None
        };
        let cards = detectors.iter().any(|d| d.check == Check::Luhn);
        Ok(Self {
            detectors,
            any,
            raw,
            cards,
        })
    }

    /// How many detectors there are (for a per-request tally).
    pub fn len(&self) -> usize {
        self.detectors.len()
    }

    /// Whether no detector is configured.
    pub fn is_empty(&self) -> bool {
        self.detectors.is_empty()
    }

    /// The name of detector `i`.
    pub fn name(&self, i: usize) -> &str {
        &self.detectors[i].name
    }

    /// Redacts one JSON message: `Ok(None)` when nothing in it matched (its bytes are kept);
    /// `Err` when it holds a string that cannot be decoded (the caller refuses it). `fired[i]`
    /// counts the redactions by detector `i`.
    pub fn message(&self, text: &str, fired: &mut [u32]) -> Result<Option<String>, Unfilterable> {
        if self.detectors.is_empty() {
            return Ok(None);
        }
        if let Some(raw) = &self.raw
            && !raw.is_match(text)
        {
            return Ok(None);
        }
        self.walk(text, fired)
    }

    /// The slow path: every string (and integer) of the message, decoded and checked.
    fn walk(&self, text: &str, fired: &mut [u32]) -> Result<Option<String>, Unfilterable> {
        let b = text.as_bytes();
        let mut out: Option<String> = None;
        let mut copied = 0;
        let mut depth = 0usize;
        let mut top_object = false;
        // At depth 1 of the envelope: whether the next string is a member name, and whether
        // the current member is one the client never shows (`jsonrpc`, `id`, `method`).
        let mut expect_key = false;
        let mut envelope_member = false;
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'"' => {
                    let (end, escaped) = string_end(b, i).ok_or(Unfilterable)?;
                    let token = &text[i..end];
                    if depth == 1 && top_object && expect_key {
                        envelope_member = matches!(token, "\"jsonrpc\"" | "\"id\"" | "\"method\"");
                        expect_key = false;
                    } else if !(depth == 1 && envelope_member) {
                        let value: Cow<'_, str> = if escaped {
                            Cow::Owned(serde_json::from_str(token).map_err(|_| Unfilterable)?)
                        } else {
                            Cow::Borrowed(&token[1..token.len() - 1])
                        };
                        if let Some(new) = self.redact_str(&value, fired) {
                            let o = out.get_or_insert_with(|| String::with_capacity(text.len()));
                            o.push_str(&text[copied..i]);
                            push_json_string(o, &new);
                            copied = end;
                        }
                    }
                    i = end;
                }
                b'{' | b'[' => {
                    depth += 1;
                    if depth == 1 {
                        top_object = b[i] == b'{';
                        expect_key = top_object;
                    }
                    i += 1;
                }
                b'}' | b']' => {
                    depth = depth.saturating_sub(1);
                    i += 1;
                }
                b',' => {
                    if depth == 1 {
                        expect_key = top_object;
                        envelope_member = false;
                    }
                    i += 1;
                }
                b'-' | b'0'..=b'9' => {
                    let end = b[i..]
                        .iter()
                        .position(|c| !matches!(c, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
                        .map_or(b.len(), |n| i + n);
                    let number = &text[i..end];
                    if self.cards
                        && !(depth == 1 && envelope_member)
                        && is_card_number(number)
                        && let Some(d) = self.detectors.iter().position(|d| d.check == Check::Luhn)
                    {
                        self.fired(d, fired);
                        let o = out.get_or_insert_with(|| String::with_capacity(text.len()));
                        o.push_str(&text[copied..i]);
                        push_json_string(o, &self.detectors[d].marker);
                        copied = end;
                    }
                    i = end;
                }
                _ => i += 1,
            }
        }
        Ok(out.map(|mut o| {
            o.push_str(&text[copied..]);
            o
        }))
    }

    /// Redacts one decoded string: `None` when no detector fires.
    pub fn redact_str(&self, s: &str, fired: &mut [u32]) -> Option<String> {
        if !self.any.is_match(s) {
            return None;
        }
        let mut spans: Vec<(usize, usize, usize)> = Vec::new();
        for d in self.any.matches(s).iter() {
            let det = &self.detectors[d];
            let mut at = 0;
            while at <= s.len() {
                let Some(m) = det.regex.find_at(s, at) else {
                    break;
                };
                if !m.is_empty() && passes(det.check, m.as_str()) {
                    spans.push((m.start(), m.end(), d));
                    at = m.end();
                } else {
                    // A failed candidate may hide a real one starting inside it (a word that
                    // looked like a JWT header just before a real token).
                    at = next_char(s, m.start());
                }
            }
        }
        if spans.is_empty() {
            return None;
        }
        // Overlapping matches are merged, so no part of either survives.
        spans.sort_unstable_by_key(|&(start, end, _)| (start, std::cmp::Reverse(end)));
        let mut out = String::with_capacity(s.len());
        let mut copied = 0;
        let mut k = 0;
        while k < spans.len() {
            let (start, mut end, d) = spans[k];
            k += 1;
            while k < spans.len() && spans[k].0 < end {
                end = end.max(spans[k].1);
                k += 1;
            }
            out.push_str(&s[copied..start]);
            out.push_str(&self.detectors[d].marker);
            copied = end;
            self.fired(d, fired);
        }
        out.push_str(&s[copied..]);
        Some(out)
    }

    /// Counts one redaction by detector `d`: in the request's tally, and in the metric at
    /// once (a stream may run for hours before its audit event is written).
    fn fired(&self, d: usize, fired: &mut [u32]) {
        if let Some(n) = fired.get_mut(d) {
            *n = n.saturating_add(1);
        }
        counters()[self.detectors[d].slot].fetch_add(1, Relaxed);
    }
}

/// The index just past the char at `i` (so a retry never splits a UTF-8 sequence).
fn next_char(s: &str, i: usize) -> usize {
    s[i..]
        .chars()
        .next()
        .map_or(s.len() + 1, |c| i + c.len_utf8())
}

/// Where the JSON string starting at `b[start]` (a quote) ends (just past its closing quote),
/// and whether it holds an escape. `None` when it is not terminated.
fn string_end(b: &[u8], start: usize) -> Option<(usize, bool)> {
    let mut escaped = false;
    let mut j = start + 1;
    while j < b.len() {
        match b[j] {
            b'\\' => {
                escaped = true;
                j += 2;
            }
            b'"' => return Some((j + 1, escaped)),
            _ => j += 1,
        }
    }
    None
}

fn push_json_string(out: &mut String, s: &str) {
    // Serialising a string to JSON cannot fail.
    out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into()));
}

fn passes(check: Check, m: &str) -> bool {
    match check {
        Check::None => true,
        Check::Luhn => luhn_valid(m.bytes().filter(u8::is_ascii_digit)),
        Check::JwtHeader => jwt_header(m),
    }
}

/// An integer token of 13–19 digits starting with an issuer digit and passing Luhn.
fn is_card_number(number: &str) -> bool {
    let b = number.as_bytes();
    (13..=19).contains(&b.len())
        && b.iter().all(u8::is_ascii_digit)
        && (b'2'..=b'6').contains(&b[0])
        && luhn_valid(b.iter().copied())
}

/// The Luhn check over 13–19 ASCII digits (anything else fails).
fn luhn_valid(digits: impl DoubleEndedIterator<Item = u8>) -> bool {
    let mut sum = 0u32;
    let mut n = 0usize;
    for (k, c) in digits.rev().enumerate() {
        if !c.is_ascii_digit() {
            return false;
        }
        let mut v = u32::from(c - b'0');
        if k % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
        n += 1;
    }
    (13..=19).contains(&n) && sum % 10 == 0
}

/// Whether the first dot-separated segment decodes (base64url) to a JSON object with `alg`.
fn jwt_header(token: &str) -> bool {
    let Some(head) = token.split('.').next() else {
        return false;
    };
    let Ok(bytes) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(head) else {
        return false;
    };
    serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&bytes)
        .is_ok_and(|h| h.contains_key("alg"))
}

/// Most detector names with their own metric label (the built-ins and configured patterns,
/// over the life of the process); any beyond share the label "other".
pub const METRIC_SLOTS: usize = 64;

fn metric_names() -> &'static Mutex<Vec<String>> {
    static NAMES: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    NAMES.get_or_init(|| {
        let mut v = vec!["other".to_string()];
        v.extend(BUILTIN.iter().map(|s| s.to_string()));
        Mutex::new(v)
    })
}

fn counters() -> &'static [AtomicU64; METRIC_SLOTS] {
    static COUNTS: OnceLock<[AtomicU64; METRIC_SLOTS]> = OnceLock::new();
    COUNTS.get_or_init(|| std::array::from_fn(|_| AtomicU64::new(0)))
}

/// The metric slot of a detector name; called at load, never on the request path.
fn metric_slot(name: &str) -> usize {
    let mut names = metric_names().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(i) = names.iter().position(|n| n == name) {
        return i;
    }
    if names.len() >= METRIC_SLOTS {
        return 0;
    }
    names.push(name.to_string());
    names.len() - 1
}

/// Appends `mcp_guard_redactions_total` (by detector) to a Prometheus exposition.
pub fn render_metrics(out: &mut String) {
    use std::fmt::Write as _;
    out.push_str("# HELP mcp_guard_redactions_total Secrets replaced in upstream messages, by detector (built-ins and configured pattern names).\n");
    out.push_str("# TYPE mcp_guard_redactions_total counter\n");
    let names = metric_names().lock().map(|n| n.clone()).unwrap_or_default();
    for (slot, name) in names.iter().enumerate() {
        let n = counters()[slot].load(Relaxed);
        if n > 0 {
            let _ = writeln!(out, "mcp_guard_redactions_total{{detector=\"{name}\"}} {n}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redactor(patterns: &[(&str, &str)]) -> Redactor {
        let detectors: Vec<String> = BUILTIN.iter().map(|s| s.to_string()).collect();
        let patterns: BTreeMap<String, String> = patterns
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Redactor::new(&RedactionConfig {
            detectors: &detectors,
            patterns: &patterns,
            replacement: "[REDACTED:{name}]",
        })
        .unwrap()
    }

    fn run(r: &Redactor, msg: &str) -> (Option<String>, Vec<u32>) {
        let mut fired = vec![0; r.len()];
        let out = r.message(msg, &mut fired).unwrap();
        if let Some(o) = &out {
            serde_json::from_str::<serde_json::Value>(o).expect("still JSON");
        }
        (out, fired)
    }

    const AWS: &str = "AKIAIOSFODNN7EXAMPLE";

    #[test]
    fn each_builtin_fires_and_names_itself() {
        let r = redactor(&[]);
        let jwt = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U";
        let cases = [
            ("aws_access_key", format!("key {AWS} here")),
            ("aws_access_key", "ASIAY34FZKBOKMUTVV7A".to_string()),
            ("github_token", format!("ghp_{}", "a1B2".repeat(9))),
            ("github_token", format!("github_pat_{}", "x".repeat(82))),
            ("slack_token", "xoxb-1234567890-abcdefghij".to_string()),
            ("stripe_key", "sk_live_4eC39HqLyjWDarjtT1zdp7dc".to_string()),
            ("stripe_key", "rk_test_4eC39HqLyjWDarjtT1zdp7dc".to_string()),
            (
                "private_key",
                "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\nAbc=\n-----END RSA PRIVATE KEY-----"
                    .to_string(),
            ),
            ("jwt", jwt.to_string()),
            ("card_number", "card 4111 1111 1111 1111 ok".to_string()),
            ("card_number", "5500-0000-0000-0004".to_string()),
        ];
        for (name, secret) in cases {
            let msg = serde_json::json!({"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":secret}]}}).to_string();
            let (out, fired) = run(&r, &msg);
            let out = out.unwrap_or_else(|| panic!("{name}: {secret}"));
            assert!(out.contains(&format!("[REDACTED:{name}]")), "{name}: {out}");
            let i = BUILTIN.iter().position(|n| *n == name).unwrap();
            assert_eq!(fired[i], 1, "{name}");
        }
    }

    #[test]
    fn escapes_cannot_hide_a_key_and_json_stays_valid() {
        let r = redactor(&[]);
        let msg = r#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"x \u0041KIA\u0049OSFODNN7EXAMPLE \"q\""}]}}"#;
        let (out, _) = run(&r, msg);
        let out = out.unwrap();
        assert!(
            out.contains("x [REDACTED:aws_access_key] \\\"q\\\""),
            "{out}"
        );
        // Everything outside the changed string keeps its bytes.
        assert!(
            out.starts_with(
                r#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"#
            )
        );
    }

    #[test]
    fn unchanged_messages_keep_their_bytes() {
        let r = redactor(&[("internal_id", "INT-[0-9]{8}")]);
        for msg in [
            r#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"hello\nworld"}]}}"#,
            r#"{"jsonrpc":"2.0","id":1234567890123,"result":{"n":12345678901234567890,"t":"4111111111111112"}}"#,
        ] {
            assert_eq!(run(&r, msg).0, None, "{msg}");
        }
    }

    #[test]
    fn luhn_separates_cards_from_long_numbers() {
        let r = redactor(&[]);
        for (text, hit) in [
            ("4111111111111111", true),
            ("4111111111111112", false),
            ("4111 1111 1111 1112", false),
            ("12345678901234567890123", false),
            ("378282246310005", true),
        ] {
            let mut fired = vec![0; r.len()];
            assert_eq!(r.redact_str(text, &mut fired).is_some(), hit, "{text}");
        }
        // A card number as a JSON number.
        let (out, _) = run(
            &r,
            r#"{"jsonrpc":"2.0","id":1,"result":{"card":4111111111111111}}"#,
        );
        assert_eq!(
            out.unwrap(),
            r#"{"jsonrpc":"2.0","id":1,"result":{"card":"[REDACTED:card_number]"}}"#
        );
    }

    #[test]
    fn the_envelope_is_left_alone_and_nested_values_are_not() {
        let r = redactor(&[]);
        let msg = format!(
            r#"{{"jsonrpc":"2.0","id":"{AWS}","result":{{"a":[[{{"b":["{AWS}"]}}]],"{AWS}":1}}}}"#
        );
        let out = run(&r, &msg).0.unwrap();
        assert_eq!(
            out,
            format!(
                r#"{{"jsonrpc":"2.0","id":"{AWS}","result":{{"a":[[{{"b":["[REDACTED:aws_access_key]"]}}]],"[REDACTED:aws_access_key]":1}}}}"#
            )
        );
        // Requests and notifications from the server are checked as well.
        let note = format!(
            r#"{{"jsonrpc":"2.0","method":"notifications/message","params":{{"level":"info","data":"{AWS}"}}}}"#
        );
        assert!(
            run(&r, &note)
                .0
                .unwrap()
                .contains("[REDACTED:aws_access_key]")
        );
    }

    #[test]
    fn a_jwt_behind_a_lookalike_word_is_still_found() {
        let r = redactor(&[]);
        let jwt = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.";
        let text = format!("eyeglasses00.{jwt}");
        let mut fired = vec![0; r.len()];
        let out = r.redact_str(&text, &mut fired).unwrap();
        assert!(!out.contains("eyJhbGciOiJub25lIn0"), "{out}");
        // Dotted words that are not JWTs stay.
        assert!(
            r.redact_str("eyebrows123.something12.x", &mut fired)
                .is_none()
        );
    }

    #[test]
    fn a_private_key_without_its_end_is_cut_to_the_end() {
        let r = redactor(&[]);
        let mut fired = vec![0; r.len()];
        let out = r
            .redact_str("x -----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg", &mut fired)
            .unwrap();
        assert_eq!(out, "x [REDACTED:private_key]");
    }

    #[test]
    fn configured_patterns_and_their_errors() {
        let r = redactor(&[("internal_id", "INT-[0-9]{8}"), ("line", "^secret")]);
        let (out, _) = run(
            &r,
            r#"{"jsonrpc":"2.0","id":1,"result":{"t":"see INT-12345678","u":"secret!"}}"#,
        );
        let out = out.unwrap();
        assert!(out.contains("see [REDACTED:internal_id]"), "{out}");
        assert!(out.contains("[REDACTED:line]!"), "{out}");
        let detectors = vec!["jwt".to_string()];
        for (name, pattern, want) in [
            ("bad", "(", "redaction.patterns.bad"),
            ("empty", "a*", "redaction.patterns.empty"),
            ("huge", r"\w{1000}{1000}", "redaction.patterns.huge"),
            ("jwt", "x", "redaction.patterns.jwt"),
            ("a b", "x", "redaction.patterns.a b"),
        ] {
            let patterns = BTreeMap::from([(name.to_string(), pattern.to_string())]);
            let err = Redactor::new(&RedactionConfig {
                detectors: &detectors,
                patterns: &patterns,
                replacement: "x",
            })
            .unwrap_err();
            assert_eq!(err.0, want);
        }
        let unknown = vec!["jwt".to_string(), "aws".to_string()];
        let err = Redactor::new(&RedactionConfig {
            detectors: &unknown,
            patterns: &BTreeMap::new(),
            replacement: "x",
        })
        .unwrap_err();
        assert_eq!(err.0, "redaction.detectors[1]");
    }

    #[test]
    fn hostile_text_is_handled_without_panics() {
        let r = redactor(&[("p", "Z+")]);
        let mut fired = vec![0; r.len()];
        for s in [
            "ey".repeat(10_000),
            "eyaaaaaaaaaa.".repeat(5_000),
            "4 ".repeat(10_000),
            "-----BEGIN PRIVATE KEY-----".repeat(1000),
            "é\u{200b}AKIA".repeat(100),
        ] {
            let _ = r.redact_str(&s, &mut fired);
        }
        for msg in [
            r#"{"a":"\ud800"}"#,
            r#"{"a":"unterminated"#,
            r#"[1,2"#,
            "-",
            "\"\\",
        ] {
            let _ = r.message(msg, &mut fired);
        }
    }
}
