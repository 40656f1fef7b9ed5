//! Secret redaction: credentials in what an upstream sends toward the model (tool results and
//! every other message) are replaced with a marker naming the detector before the client
//! sees them.
//!
//! Detection runs on the decoded value of every JSON string in a message (a JSON escape such
//! as `\u0041KIA…` cannot hide a key), except the envelope of the kind of message it is
//! (see [`Envelope`]); only the strings that change are re-encoded, everything else keeps its
//! bytes, so the message stays valid JSON with its members in their order. Numbers are checked
//! as card numbers too, by their value (a card number needs no quotes to reach the model).
//!
//! A prefilter (literal anchors, byte scans for a card's digits and a JWT's dots) clears most
//! messages without running a regex. All matching is done by the `regex` crate, whose engines
//! run in time linear in the text, and retries after a failed check are bounded: an
//! upstream's text cannot make a scan slow, whatever it holds.

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
/// How many base64url characters may be glued before a JWT's header and still be looked
/// through (`xeyJhbGc…`): a bound, so that a long run of such characters costs a bounded
/// number of header decodes.
const MAX_JWT_GLUE: usize = 64;

/// What a match must pass besides its regex.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    None,
    /// 13–19 digits, not run together with more digits, passing the Luhn check.
    Luhn,
    /// A segment starting in the first one decodes to a JSON object with an `alg` member.
    JwtHeader,
}

/// The separators a card number may hold between its digits (up to three in a row): spaces
/// (no-break, narrow no-break, figure and thin ones too), dashes of every width and the minus
/// sign, `.`, `/` and `_`.
const CARD_SEPARATOR: &str = r"[ ._/\-\x{00A0}\x{2007}\x{2009}\x{202F}\x{2010}-\x{2015}\x{2212}]";

/// The regex and the extra check of a built-in detector, run on a decoded string.
fn builtin(name: &str) -> Option<(String, Check)> {
    // `(?-u:\b)`: an ASCII word boundary, which the faster engines handle on any text (a
    // Unicode one makes them give way to a slower one on non-ASCII input).
    Some(match name {
        // Every prefix AWS gives a unique identifier of a credential or principal (the legacy
        // `A3T` too).
        "aws_access_key" => (
            r"(?-u:\b)(?:A3T[A-Z0-9]|AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AIPA|ANPA|ANVA|APKA|AROA|ASCA)[A-Z0-9]{16}(?-u:\b)".into(),
            Check::None,
        ),
        "github_token" => (
            r"(?-u:\b)(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})(?-u:\b)".into(),
            Check::None,
        ),
        "slack_token" => (r"(?-u:\b)xox[abprs]-[A-Za-z0-9-]{10,}".into(), Check::None),
        "stripe_key" => (
            r"(?-u:\b)[sr]k_(?:live|test)_[A-Za-z0-9]{10,}".into(),
            Check::None,
        ),
        // PEM armour (and PGP's) as lenient decoders read it: three or more dashes, any letter
        // case, runs of blanks inside the label. Through the END line when there is one; a key
        // cut off before its END is redacted to the end of the string (its body would
        // otherwise leak). A PuTTY key file through its `Private-MAC` (or `Private-Hash`) line.
        "private_key" => {
            let label = r"[ \t]+(?:[A-Za-z0-9]+[ \t]+)*(?i:PRIVATE[ \t]+KEY)(?:[ \t]+(?i:BLOCK))?";
            (
                format!(
                    r"-{{3,}}[ \t]*(?i:BEGIN){label}(?:[\s\S]*?-{{3,}}[ \t]*(?i:END){label}[ \t]*-{{3,}}|[\s\S]*)|PuTTY-User-Key-File-[0-9]+:(?:[\s\S]*?Private-(?:MAC|Hash):[^\r\n]*|[\s\S]*)"
                ),
                Check::None,
            )
        }
        // Base64url segments: a JWS (three, the signature may be empty) or a JWE (five, the
        // encrypted key empty or, like any real one, of 8 characters or more: what the
        // prefilter's look at the first dot relies on). Which one starts with a JSON header is checked after
        // the match, wherever the header starts in the first segment's last characters.
        "jwt" => {
            let b = "[A-Za-z0-9_-]";
            (
                format!(r"{b}{{8,}}\.(?:(?:{b}{{8,}})?\.{b}{{8,}}\.{b}+\.{b}{{8,}}|{b}{{2,}}\.{b}*)"),
                Check::JwtHeader,
            )
        }
        // Issuers' first digits are 2–6.
        "card_number" => (
            format!(r"[2-6](?:{CARD_SEPARATOR}{{0,3}}[0-9]){{12,18}}"),
            Check::Luhn,
        ),
        _ => return None,
    })
}

/// The literal text every match of a built-in detector holds (or, for the JWT and card
/// detectors, the shape a byte scan looks for): absent from a text, the detector cannot fire
/// in it.
fn anchors(name: &str) -> &'static [&'static str] {
    match name {
        "aws_access_key" => &[
            "A3T", "AKIA", "ASIA", "ABIA", "ACCA", "AGPA", "AIDA", "AIPA", "ANPA", "ANVA", "APKA",
            "AROA", "ASCA",
        ],
        "github_token" => &["ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"],
        "slack_token" => &["xoxa-", "xoxb-", "xoxp-", "xoxr-", "xoxs-"],
        "stripe_key" => &["k_live_", "k_test_"],
        "private_key" => &["---", "PuTTY-User-Key-File-"],
        _ => &[],
    }
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

/// What proves, cheaply, that a text holds nothing any detector could match: the literal
/// anchors of the built-ins (one multi-pattern search), a byte scan for the shapes of a JWT
/// and of a card number, and the configured patterns (which have no anchors we know of) as a
/// regex set. Only a text it cannot clear goes to the detectors' regexes.
#[derive(Debug)]
struct Prefilter {
    /// Built-in anchors, and `\u` (a JSON escape can spell any of them): for a message's raw
    /// text. With the card detector, a digit before an exponent too (`51e14` is sixteen
    /// digits long).
    raw: Option<Anchors>,
    /// Built-in anchors alone: for a decoded string.
    decoded: Option<Anchors>,
    jwt: bool,
    cards: bool,
    /// The configured patterns, and (for raw text) any escape: a pattern may match what an
    /// escape decodes to.
    patterns_raw: Option<RegexSet>,
    patterns_decoded: Option<RegexSet>,
}

impl Prefilter {
    /// Whether a message's raw JSON text may hold a match.
    fn raw(&self, text: &str) -> bool {
        self.scan(text, self.raw.as_ref(), self.patterns_raw.as_ref())
    }

    /// Whether one decoded string may hold a match.
    fn decoded(&self, s: &str) -> bool {
        self.scan(s, self.decoded.as_ref(), self.patterns_decoded.as_ref())
    }

    fn scan(&self, text: &str, anchors: Option<&Anchors>, patterns: Option<&RegexSet>) -> bool {
        let b = text.as_bytes();
        anchors.is_some_and(|a| a.is_match(text))
            || (self.cards && may_hold_card(b))
            || (self.jwt && may_hold_jwt(b))
            || patterns.is_some_and(|p| p.is_match(text))
    }
}

/// Bytes a card number's text is made of: ASCII digits and separators, a backslash (`\/` is
/// an escaped `/`), and every non-ASCII byte (the Unicode spaces and dashes).
const fn card_bytes() -> [bool; 256] {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let c = i as u8;
        t[i] = c.is_ascii_digit()
            || c >= 0x80
            || matches!(c, b' ' | b'.' | b'/' | b'_' | b'-' | b'\\');
        i += 1;
    }
    t
}
static CARD_BYTES: [bool; 256] = card_bytes();

/// Whether `b` holds a run of card bytes with 13 digits or more. A card number is at least 13
/// bytes of them in a row, so only every 13th byte needs a look: one that is not a card byte
/// rules out every run through it.
fn may_hold_card(b: &[u8]) -> bool {
    const MIN: usize = 13;
    let mut probe = MIN - 1;
    while probe < b.len() {
        if !CARD_BYTES[usize::from(b[probe])] {
            probe += MIN;
            continue;
        }
        let mut start = probe;
        while start > 0 && CARD_BYTES[usize::from(b[start - 1])] {
            start -= 1;
        }
        let mut end = probe + 1;
        while end < b.len() && CARD_BYTES[usize::from(b[end])] {
            end += 1;
        }
        if end - start >= MIN && b[start..end].iter().filter(|c| c.is_ascii_digit()).count() >= MIN
        {
            return true;
        }
        probe = end + MIN;
    }
    false
}

fn is_base64url(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'-' || c == b'_'
}

/// Whether `b` holds a dot with eight base64url characters before it and, after it, two more
/// (the shortest payload, `{}`, is `e30`) or a second dot (a JWE's empty key): the least a JWT
/// or JWE holds.
fn may_hold_jwt(b: &[u8]) -> bool {
    memchr::memchr_iter(b'.', b).any(|dot| {
        dot >= 8
            && b[dot - 8..dot].iter().all(|&c| is_base64url(c))
            && (b.get(dot + 1) == Some(&b'.')
                || b.get(dot + 1..dot + 3)
                    .is_some_and(|s| s.iter().all(|&c| is_base64url(c))))
    })
}

/// `[redaction]`, compiled at load; shared by every worker through the config snapshot.
#[derive(Debug)]
pub struct Redactor {
    detectors: Vec<Detector>,
    /// Every detector's regex, in `detectors` order: which of them to run on a string the
    /// prefilter could not clear.
    any: RegexSet,
    pre: Prefilter,
    /// Whether a message's raw text can prove anything: not when a configured pattern has an
    /// anchor (`^`, `$` mean something else in the raw text than in a decoded string).
    raw_possible: bool,
    /// Whether numbers are checked as card numbers.
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

fn set_of<I, S>(patterns: I) -> Result<RegexSet, (String, String)>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    RegexSetBuilder::new(patterns)
        .size_limit(PATTERN_SIZE_LIMIT * 8)
        .dfa_size_limit(PATTERN_SIZE_LIMIT * 8)
        .build()
        .map_err(|e| ("redaction.patterns".to_string(), e.to_string()))
}

/// A search for any of a few dozen literals. The packed (SIMD) searcher runs at several GiB/s
/// where the automaton of `AhoCorasick` runs at under one (measured: 64 KiB of log text in
/// 9 µs against 136 µs); the automaton is the fallback where the packed one is not available.
#[derive(Debug)]
enum Anchors {
    Packed(aho_corasick::packed::Searcher),
    Automaton(aho_corasick::AhoCorasick),
}

impl Anchors {
    fn is_match(&self, text: &str) -> bool {
        match self {
            Anchors::Packed(p) => p.find(text).is_some(),
            Anchors::Automaton(a) => a.is_match(text),
        }
    }
}

fn anchor_search(anchors: &[&str]) -> Result<Option<Anchors>, (String, String)> {
    if anchors.is_empty() {
        return Ok(None);
    }
    if let Some(p) = aho_corasick::packed::Config::new()
        .builder()
        .extend(anchors)
        .build()
    {
        return Ok(Some(Anchors::Packed(p)));
    }
    aho_corasick::AhoCorasick::new(anchors)
        .map(|a| Some(Anchors::Automaton(a)))
        .map_err(|e| ("redaction.detectors".to_string(), e.to_string()))
}

impl Redactor {
    /// Compiles the configuration; `Err((key, message))` names the offending key.
    pub fn new(cfg: &RedactionConfig<'_>) -> Result<Self, (String, String)> {
        let mut detectors = Vec::new();
        let mut anchor_list: Vec<&str> = Vec::new();
        let mut raw_possible = true;
        for (i, name) in cfg.detectors.iter().enumerate() {
            let Some((full, check)) = builtin(name) else {
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
                regex: Regex::new(&full)
                    .map_err(|e| (format!("redaction.detectors[{i}]"), e.to_string()))?,
                check,
                marker: cfg.replacement.replace("{name}", name),
                slot: metric_slot(name),
            });
            anchor_list.extend(anchors(name));
        }
        let mut patterns = Vec::new();
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
            let anchored = regex_syntax::parse(pattern)
                .map(|h| h.properties().look_set().contains_anchor())
                .unwrap_or(true);
            raw_possible &= !anchored;
            patterns.push(pattern.as_str());
            detectors.push(Detector {
                name: name.clone(),
                regex,
                check: Check::None,
                marker: cfg.replacement.replace("{name}", name),
                slot: metric_slot(name),
            });
        }
        let any = set_of(detectors.iter().map(|d| d.regex.as_str()))?;
        let has = |check: Check| detectors.iter().any(|d| d.check == check);
        let cards = has(Check::Luhn);
        let decoded = anchor_search(&anchor_list)?;
        let mut raw_anchors = anchor_list;
        raw_anchors.push(r"\u");
        if cards {
            raw_anchors.extend([
                "0e", "1e", "2e", "3e", "4e", "5e", "6e", "7e", "8e", "9e", "0E", "1E", "2E", "3E",
                "4E", "5E", "6E", "7E", "8E", "9E",
            ]);
        }
        let pre = Prefilter {
            raw: anchor_search(&raw_anchors)?,
            decoded,
            jwt: has(Check::JwtHeader),
            cards,
            patterns_raw: if patterns.is_empty() {
                None
            } else {
                // A configured pattern may match what any escape decodes to (a newline, a
                // quote): then only text without escapes is the same raw and decoded.
                Some(set_of(patterns.iter().copied().chain([r"\\"]))?)
            },
            patterns_decoded: if patterns.is_empty() {
                None
            } else {
                Some(set_of(&patterns)?)
            },
        };
        Ok(Self {
            detectors,
            any,
            pre,
            raw_possible,
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
        if self.raw_possible && !self.pre.raw(text) {
            return Ok(None);
        }
        self.walk(text, fired)
    }

    /// The slow path: every string and number of the message, decoded and checked, except
    /// the envelope members of the kind of message it is.
    fn walk(&self, text: &str, fired: &mut [u32]) -> Result<Option<String>, Unfilterable> {
        let exempt = Envelope::of(text)?;
        let b = text.as_bytes();
        let mut out: Option<String> = None;
        let mut copied = 0;
        let mut depth = 0usize;
        let mut top_object = false;
        // At depth 1 of the envelope: whether the next string is a member name, and whether
        // the current member's value is one the redaction leaves alone.
        let mut expect_key = false;
        let mut envelope_member = false;
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'"' => {
                    let (end, escaped) = string_end(b, i).ok_or(Unfilterable)?;
                    let token = &text[i..end];
                    if depth == 1 && top_object && expect_key {
                        envelope_member = exempt.covers(token);
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
                        && number_is_card(number)
                        && let Some(d) = self.detectors.iter().position(|d| d.check == Check::Luhn)
                    {
                        // A string in its place: the message stays valid JSON, and the value's
                        // type changes, which a number that was a card number deserves.
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
        if !self.pre.decoded(s) {
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
                match confirm(det.check, s, m.start(), m.end()) {
                    Some((start, end)) if end > start => {
                        spans.push((start, end, d));
                        at = end;
                    }
                    // A failed candidate may hide a real one starting further on: a card
                    // number after a longer run of digits, a JWT after a dotted word (the
                    // JWT check has looked at every start in the first segment already).
                    _ if det.check == Check::JwtHeader => {
                        at = m
                            .as_str()
                            .find('.')
                            .map_or(m.end(), |dot| m.start() + dot + 1);
                    }
                    _ => at = next_char(s, m.start()),
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

/// Which top-level members of a message the redaction leaves alone: `jsonrpc`; the `method`
/// of a request or notification (it names the exchange; no client shows it); the `id` of a
/// response (the client's own id, which it matches against its pending requests). The `id` of
/// a request from the server and the `method` of a response are upstream text like any other.
struct Envelope {
    method: bool,
    id: bool,
}

impl Envelope {
    /// Reads the top-level member names of `text` (decoded: `"\u006dethod"` is `method`).
    fn of(text: &str) -> Result<Self, Unfilterable> {
        let b = text.as_bytes();
        let (mut method, mut id, mut outcome) = (false, false, false);
        let mut depth = 0usize;
        let mut expect_key = false;
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'"' => {
                    let (end, escaped) = string_end(b, i).ok_or(Unfilterable)?;
                    if depth == 1 && expect_key {
                        let token = &text[i..end];
                        let name: Cow<'_, str> = if escaped {
                            Cow::Owned(serde_json::from_str(token).map_err(|_| Unfilterable)?)
                        } else {
                            Cow::Borrowed(&token[1..token.len() - 1])
                        };
                        match &*name {
                            "method" => method = true,
                            "id" => id = true,
                            "result" | "error" => outcome = true,
                            _ => {}
                        }
                        expect_key = false;
                    }
                    i = end;
                }
                b'{' | b'[' => {
                    depth += 1;
                    if depth == 1 {
                        expect_key = b[i] == b'{';
                    }
                    i += 1;
                }
                b'}' | b']' => {
                    depth = depth.saturating_sub(1);
                    i += 1;
                }
                b',' if depth == 1 => {
                    expect_key = true;
                    i += 1;
                }
                _ => i += 1,
            }
        }
        // A message with both a `method` and a `result` is neither kind: both are scanned.
        Ok(Self {
            method: method && !outcome,
            id: id && outcome && !method,
        })
    }

    /// Whether the member named by `token` (as spelled in the text, quotes included) is left
    /// alone. A name spelled with escapes is never: only the plain spelling is exempt.
    fn covers(&self, token: &str) -> bool {
        match token {
            "\"jsonrpc\"" => true,
            "\"method\"" => self.method,
            "\"id\"" => self.id,
            _ => false,
        }
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

/// The span of `s` a regex match `start..end` redacts, if its check passes.
fn confirm(check: Check, s: &str, start: usize, end: usize) -> Option<(usize, usize)> {
    match check {
        Check::None => Some((start, end)),
        Check::Luhn => card_end(s, start, end).map(|e| (start, e)),
        Check::JwtHeader => jwt_start(&s[start..end]).map(|j| (start + j, end)),
    }
}

/// Where the card number starting at `start` ends, within the candidate `start..end` (the
/// longest 13–19 digit prefix passing Luhn that ends before a non-digit). A candidate run
/// together with more digits is not a card number (`1234111…`), nor the digits after a
/// decimal point (`1.4142…`), nor a candidate whose only separator is one `.` (a decimal
/// number: its integer part may still be one). A letter next to it does not make it safe:
/// `x4111111111111111y` is redacted.
fn card_end(s: &str, start: usize, end: usize) -> Option<usize> {
    let b = s.as_bytes();
    let before = &b[..start];
    if before.last().is_some_and(u8::is_ascii_digit)
        || (matches!(before.last(), Some(b'.' | b','))
            && before.len() >= 2
            && before[before.len() - 2].is_ascii_digit())
    {
        return None;
    }
    let mut digits = [0u8; 19];
    let mut n = 0;
    let mut dots = 0;
    let mut others = 0;
    // Each end after a digit that the next byte does not continue, with its digit count and
    // whether the candidate up to it reads as a decimal number.
    let mut ends: [(usize, usize, bool); 19] = [(0, 0, false); 19];
    let mut n_ends = 0;
    for (k, c) in s[start..end].char_indices() {
        if c.is_ascii_digit() {
            if n == digits.len() {
                break;
            }
            digits[n] = c as u8;
            n += 1;
            let at = start + k + 1;
            if !b.get(at).is_some_and(u8::is_ascii_digit) {
                ends[n_ends] = (at, n, dots == 1 && others == 0);
                n_ends += 1;
            }
        } else if c == '.' {
            dots += 1;
        } else {
            others += 1;
        }
    }
    ends[..n_ends]
        .iter()
        .rev()
        .find(|&&(_, count, decimal)| {
            !decimal && (13..=19).contains(&count) && luhn_valid(digits[..count].iter().copied())
        })
        .map(|&(at, _, _)| at)
}

/// Whether a JSON number is a card number: its value, the exponent applied, has an integer
/// part (the sign dropped) of 13–19 digits starting with an issuer digit and passing Luhn.
/// `-4111111111111111`, `4111111111111111.0`, `4.111111111111111e15` and
/// `41111111111111110e-1` all are. Digits after the point are not looked at: one float in
/// ten with sixteen digits would otherwise be a card number.
fn number_is_card(number: &str) -> bool {
    let number = number.strip_prefix('-').unwrap_or(number);
    let (mantissa, exponent) = match number.find(['e', 'E']) {
        Some(i) => (&number[..i], &number[i + 1..]),
        None => (number, ""),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int.is_empty()
        || !int.bytes().all(|c| c.is_ascii_digit())
        || !frac.bytes().all(|c| c.is_ascii_digit())
    {
        return false;
    }
    // An exponent far out of range makes an integer part of no card's length either way.
    let exponent: i64 = if exponent.is_empty() {
        0
    } else {
        let digits = exponent.trim_start_matches(['+', '-']);
        if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
            return false;
        }
        let magnitude = match digits.trim_start_matches('0') {
            "" => 0,
            d => d.parse::<i64>().map_or(1 << 20, |v| v.min(1 << 20)),
        };
        if exponent.starts_with('-') {
            -magnitude
        } else {
            magnitude
        }
    };
    let written: Vec<u8> = int.bytes().chain(frac.bytes()).collect();
    let zeros = written.iter().take_while(|&&c| c == b'0').count();
    let significant = &written[zeros..];
    // How many digits the value has before its decimal point.
    let point = int.len() as i64 - zeros as i64 + exponent;
    if significant.is_empty() || !(13..=19).contains(&point) {
        return false;
    }
    let integer: Vec<u8> = significant
        .iter()
        .copied()
        .chain(std::iter::repeat(b'0'))
        .take(point as usize)
        .collect();
    (b'2'..=b'6').contains(&integer[0]) && luhn_valid(integer.into_iter())
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

/// Where a JWT header starts in `token`'s first segment: at its first character, or after up
/// to [`MAX_JWT_GLUE`] base64url characters run together with it. `None` when no start
/// decodes to a JSON object with `alg`.
fn jwt_start(token: &str) -> Option<usize> {
    let head = token.split('.').next()?;
    let b = head.as_bytes();
    // A header's first byte is `{`, JSON white space or a byte-order mark's first byte:
    // base64 turns those into `e`, `I`, `C`, `D` or `7`.
    (0..=MAX_JWT_GLUE.min(b.len().saturating_sub(8)))
        .filter(|&j| matches!(b[j], b'e' | b'I' | b'C' | b'D' | b'7'))
        .find(|&j| header_starts_like_json(&b[j..]) && jwt_header(&head[j..]))
}

/// Decoders that JWT libraries use: base64url, padding optional, stray low bits allowed.
fn lenient_base64url() -> &'static base64::engine::GeneralPurpose {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    static ENGINE: OnceLock<GeneralPurpose> = OnceLock::new();
    ENGINE.get_or_init(|| {
        GeneralPurpose::new(
            &base64::alphabet::URL_SAFE,
            GeneralPurposeConfig::new()
                .with_decode_allow_trailing_bits(true)
                .with_decode_padding_mode(DecodePaddingMode::Indifferent),
        )
    })
}

/// A cheap look at the first three bytes a segment decodes to: white space or a byte-order
/// mark, then `{`.
fn header_starts_like_json(seg: &[u8]) -> bool {
    let Some(first) = seg.get(..4) else {
        return false;
    };
    let Ok(bytes) = lenient_base64url().decode(first) else {
        return false;
    };
    let mut rest = &bytes[..];
    loop {
        match rest {
            [] => return true,
            [b'{', ..] => return true,
            [b' ' | b'\t' | b'\n' | b'\r', tail @ ..] => rest = tail,
            [0xEF, 0xBB, 0xBF, tail @ ..] => rest = tail,
            [0xEF] | [0xEF, 0xBB] => return true,
            _ => return false,
        }
    }
}

/// Whether a segment decodes (base64url) to a JSON object with `alg`, after any white space
/// and byte-order marks a JSON or JWT library might skip.
fn jwt_header(segment: &str) -> bool {
    let Ok(bytes) = lenient_base64url().decode(segment) else {
        return false;
    };
    let mut rest = &bytes[..];
    while let [0xEF, 0xBB, 0xBF, tail @ ..] | [b' ' | b'\t' | b'\n' | b'\r', tail @ ..] = rest {
        rest = tail;
    }
    serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(rest)
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

    /// Whether detector `name` fires on `text` (a decoded string), and what is left.
    fn fires(r: &Redactor, name: &str, text: &str) -> Option<String> {
        let mut fired = vec![0; r.len()];
        let out = r.redact_str(text, &mut fired)?;
        let i = r.detectors.iter().position(|d| d.name == name).unwrap();
        (fired[i] > 0).then_some(out)
    }

    #[test]
    fn card_numbers_as_json_numbers_in_every_spelling() {
        let r = redactor(&[]);
        for number in [
            "4111111111111111",
            "-4111111111111111",
            "4111111111111111.0",
            "4.111111111111111e15",
            "4.111111111111111E+15",
            "41111111111111110e-1",
            "0.4111111111111111e16",
            "4111111111111111.5",
            "411111111111111100e-2",
        ] {
            let msg =
                format!(r#"{{"jsonrpc":"2.0","id":1,"result":{{"n":{number},"m":[{number}]}}}}"#);
            let (out, fired) = run(&r, &msg);
            assert_eq!(
                out.as_deref(),
                Some(
                    r#"{"jsonrpc":"2.0","id":1,"result":{"n":"[REDACTED:card_number]","m":["[REDACTED:card_number]"]}}"#
                ),
                "{number}"
            );
            assert_eq!(fired[6], 2, "{number}");
        }
        // Not cards: Luhn fails, too short or long, digits after the point, a float with
        // sixteen digits, an exponent far out of range.
        for number in [
            "4111111111111112",
            "4111111111111112.0",
            "411111111111",
            "41111111111111111111",
            "0.4111111111111111",
            "3.141592653589793",
            "1.4142135623730951",
            "4.111111111111111e999999999999999999999",
            "4.111111111111111e-15",
            "0",
            "-0.0e0",
        ] {
            let msg = format!(r#"{{"jsonrpc":"2.0","id":1,"result":{{"n":{number}}}}}"#);
            assert_eq!(run(&r, &msg).0, None, "{number}");
        }
    }

    #[test]
    fn card_separators_and_boundaries() {
        let r = redactor(&[]);
        for text in [
            "4111\u{00A0}1111\u{00A0}1111\u{00A0}1111",
            "4111\u{202F}1111\u{202F}1111\u{202F}1111",
            "4111\u{2013}1111\u{2013}1111\u{2013}1111",
            "4111\u{2014}1111\u{2014}1111\u{2014}1111",
            "4111.1111.1111.1111",
            "4111/1111/1111/1111",
            "4111_1111_1111_1111",
            "4111  1111--1111 - 1111",
            "x4111111111111111y",
            "card:4111111111111111.",
            "4111 1111 1111 1111 12/27",
            // Single-digit groups (red team, round 2).
            "4 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1",
            "4 111 111 111 111 111",
            "5 5 0 0 0 0 0 0 0 0 0 0 0 0 0 4",
            "4111111111111111.5",
        ] {
            let out = fires(&r, "card_number", text).unwrap_or_else(|| panic!("{text:?}"));
            assert!(!out.contains("1111"), "{text:?}: {out}");
        }
        // Run together with more digits, the digits after a decimal point, a decimal number,
        // four separators in a row: not a card.
        for text in [
            "94111111111111111",
            "41111111111111118",
            "1.4111111111111111",
            "0,4111111111111111",
            "41111111.11111111",
            "4111    1111 1111 1111",
            "4111 1111 1111 1112",
        ] {
            assert_eq!(fires(&r, "card_number", text), None, "{text:?}");
        }
    }

    #[test]
    fn private_keys_in_every_armour() {
        let r = redactor(&[]);
        for (text, body) in [
            (
                "-----BEGIN PGP PRIVATE KEY BLOCK-----\n\nlQOYBGJ\n=abcd\n-----END PGP PRIVATE KEY BLOCK-----",
                "lQOYBGJ",
            ),
            (
                "----BEGIN RSA PRIVATE KEY----\nMIIEow\n----END RSA PRIVATE KEY----",
                "MIIEow",
            ),
            (
                "------BEGIN EC PRIVATE KEY------\nMHcCAQ\n------END EC PRIVATE KEY------",
                "MHcCAQ",
            ),
            (
                "-----begin rsa private key-----\nMIIEow\n-----end rsa private key-----",
                "MIIEow",
            ),
            (
                "-----BEGIN  OPENSSH  PRIVATE  KEY-----\nb3BlbnNz\n-----END  OPENSSH  PRIVATE  KEY-----",
                "b3BlbnNz",
            ),
            (
                "PuTTY-User-Key-File-3: ssh-ed25519\nEncryption: none\nComment: k\nPublic-Lines: 2\nAAAAC3Nz\naC1lZDI1\nPrivate-Lines: 1\nAAAAIPrivPart\nPrivate-MAC: 1f2e3d",
                "AAAAIPrivPart",
            ),
            (
                "PuTTY-User-Key-File-2: ssh-rsa\nEncryption: none\nPrivate-Lines: 1\nAAAAIPrivPart",
                "AAAAIPrivPart",
            ),
        ] {
            let out = fires(&r, "private_key", &format!("a\n{text}\nb"))
                .unwrap_or_else(|| panic!("{text}"));
            // Through its end line; a key without one, to the end of the string.
            let ended =
                text.contains("Private-MAC") || text.contains("END") || text.contains("end rsa");
            let want = if ended {
                "a\n[REDACTED:private_key]\nb"
            } else {
                "a\n[REDACTED:private_key]"
            };
            assert_eq!(out, want, "{text}");
            assert!(!out.contains(body), "{text}");
        }
    }

    #[test]
    fn jwts_with_odd_headers_glued_or_encrypted() {
        let r = redactor(&[]);
        let payload = "eyJzdWIiOiIxMjM0NTY3ODkwIn0";
        let sig = "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U";
        for token in [
            // ` {"alg":…`, a byte-order mark, a newline and a tab before the header.
            format!("IHsiYWxnIjoiSFMyNTYiLCJ0eXAiOiJKV1QifQ.{payload}.{sig}"),
            format!("77u_eyJhbGciOiJIUzI1NiJ9.{payload}.{sig}"),
            format!("Cgl7ImFsZyI6Im5vbmUifQ.{payload}."),
            // A JWE: five segments, the encrypted key empty or not.
            "eyJhbGciOiJkaXIiLCJlbmMiOiJBMTI4R0NNIn0..MTIzNDU2Nzg5MDEy.c2VjcmV0IHBheWxvYWQgaGVyZQ.MDEyMzQ1Njc4OWFiY2RlZg".to_string(),
            "eyJhbGciOiJSU0EtT0FFUCIsImVuYyI6IkEyNTZHQ00ifQ.a2tra2tra2tra2tra2tra2tra2tra2tra2tra2tra2s.MTIzNDU2Nzg5MDEy.c2VjcmV0IHBheWxvYWQgaGVyZQ.MDEyMzQ1Njc4OWFiY2RlZg".to_string(),
            // Short payloads: `{}` is `e30` (red team, round 2).
            format!("eyJhbGciOiJIUzI1NiJ9.e30.{sig}"),
            "eyJhbGciOiJIUzI1NiJ9.e30.".to_string(),
            format!("eyJhbGciOiJIUzI1NiJ9.eyJ9.{sig}"),
        ] {
            let out = fires(&r, "jwt", &format!("t={token};")).unwrap_or_else(|| panic!("{token}"));
            assert_eq!(out, "t=[REDACTED:jwt];", "{token}");
        }
        // Glued to the base64url characters before it: the header is found, the glue stays.
        let jwt = format!("eyJhbGciOiJIUzI1NiJ9.{payload}.{sig}");
        for glue in ["x", "Bearer_", "access-token_", &"q".repeat(MAX_JWT_GLUE)] {
            let out = fires(&r, "jwt", &format!("{glue}{jwt}")).unwrap_or_else(|| panic!("{glue}"));
            assert_eq!(out, format!("{glue}[REDACTED:jwt]"));
        }
        // Dotted names that are not tokens stay.
        for text in [
            "mcp_guard.redaction.patterns",
            "documentation.something",
            "a..b",
        ] {
            assert_eq!(fires(&r, "jwt", text), None, "{text}");
        }
    }

    #[test]
    fn every_aws_key_prefix() {
        let r = redactor(&[]);
        for prefix in [
            "AKIA", "ASIA", "ABIA", "ACCA", "AGPA", "AIDA", "AIPA", "ANPA", "ANVA", "APKA", "AROA",
            "ASCA", "A3TX",
        ] {
            let key = format!("{prefix}IOSFODNN7EXAMPLE");
            let out = fires(&r, "aws_access_key", &format!("id {key} ok"))
                .unwrap_or_else(|| panic!("{prefix}"));
            assert_eq!(out, "id [REDACTED:aws_access_key] ok");
        }
    }

    #[test]
    fn the_envelope_exemption_follows_the_kind_of_message() {
        let r = redactor(&[]);
        // A response: its id is the client's own and stays; a `method` in it is scanned.
        let response = format!(r#"{{"jsonrpc":"2.0","id":"{AWS}","result":{{}}}}"#);
        assert_eq!(run(&r, &response).0, None);
        let with_method = format!(r#"{{"jsonrpc":"2.0","id":3,"result":{{}},"method":"{AWS}"}}"#);
        assert_eq!(
            run(&r, &with_method).0.unwrap(),
            r#"{"jsonrpc":"2.0","id":3,"result":{},"method":"[REDACTED:aws_access_key]"}"#
        );
        let error = format!(
            r#"{{"method":"{AWS}","jsonrpc":"2.0","error":{{"code":1,"message":"x"}},"id":"{AWS}"}}"#
        );
        let out = run(&r, &error).0.unwrap();
        assert!(!out.contains(AWS), "{out}");
        // A request from the server: its id is scanned (the client answers the marker), its
        // method is not.
        let request = format!(
            r#"{{"id":"{AWS}","jsonrpc":"2.0","method":"sampling/createMessage","params":{{}}}}"#
        );
        assert_eq!(
            run(&r, &request).0.unwrap(),
            r#"{"id":"[REDACTED:aws_access_key]","jsonrpc":"2.0","method":"sampling/createMessage","params":{}}"#
        );
        let card_id = r#"{"jsonrpc":"2.0","id":4111111111111111,"method":"ping"}"#;
        assert_eq!(
            run(&r, card_id).0.unwrap(),
            r#"{"jsonrpc":"2.0","id":"[REDACTED:card_number]","method":"ping"}"#
        );
        // A name spelled with escapes is never exempt.
        let escaped = format!(r#"{{"jsonrpc":"2.0","\u0069d":"{AWS}","result":{{}}}}"#);
        assert!(!run(&r, &escaped).0.unwrap().contains(AWS));
    }

    #[test]
    fn the_prefilter_clears_clean_text_and_never_a_secret() {
        let r = redactor(&[]);
        let clean = "0001: build 20261128-1 finished in 42.7 s; 1834 tests passed, 0 failed. See https://example.com/a/b.html";
        assert!(!r.pre.raw(clean));
        assert!(!r.pre.decoded(clean));
        for secret in [
            "4111111111111111",
            "4.111111111111111e15",
            "51e14",
            "\\u0041KIA",
            "aaaaaaaa.bbbbbbbb",
            "aaaaaaaa..bbbb",
            "-----BEGIN",
            "PuTTY-User-Key-File-2",
            "xoxb-",
            "ghp_",
        ] {
            assert!(r.pre.raw(&format!("{clean} {secret} {clean}")), "{secret}");
        }
    }

    #[test]
    fn the_packed_anchor_search_and_its_fallback_agree() {
        let list = ["AKIA", "---", "\\u", "0e"];
        let packed = anchor_search(&list).unwrap().unwrap();
        let automaton = Anchors::Automaton(aho_corasick::AhoCorasick::new(list).unwrap());
        for text in [
            "clean text 42.7 s",
            "x AKIA y",
            "a---b",
            "\\u0041",
            "10e5",
            "",
        ] {
            assert_eq!(packed.is_match(text), automaton.is_match(text), "{text}");
        }
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
            "ICAg".repeat(50_000) + ".aaaaaaaa.",
            "e-".repeat(50_000) + "e.aaaaaaaa.",
            "4\u{2013}".repeat(10_000),
            "-----begin private key".repeat(1000),
            "PuTTY-User-Key-File-9:".repeat(1000),
        ] {
            let _ = r.redact_str(&s, &mut fired);
        }
        for msg in [
            r#"{"a":"\ud800"}"#,
            r#"{"a":"unterminated"#,
            r#"[1,2"#,
            "-",
            "\"\\",
            "1e99999999999999999999999999",
            r#"{"a":-}"#,
            r#"[4111111111111111e"#,
        ] {
            let _ = r.message(msg, &mut fired);
        }
    }
}
