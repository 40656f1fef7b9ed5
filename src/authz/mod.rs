//! Authorization: a compiled per-identity policy and the one decision function.
//!
//! A [`Policy`] is built once per config load from every source that grants or refuses tools
//! (an API key's lists today; JWT/OAuth scopes through `scope_tool_mapping` later), so a
//! request only does set lookups and glob matches. Deny always wins over allow. Resource URIs
//! are matched in their normal form (see [`uri`]), and refused when they have none.

pub mod uri;

use crate::mcp::jsonrpc::Target;
use std::collections::HashSet;

/// Names and globs (`*` any run, `?` one character) compiled for matching.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Matcher {
    /// Sorted and deduplicated. A `tools/list` answer asks once per listed tool, so a lookup
    /// is a few length-first comparisons (or a binary search in a long list) rather than a
    /// SipHash of the name: hashing dominated filtering a 100-tool list.
    exact: Vec<Box<str>>,
    globs: Vec<Glob>,
    /// A lone `*`: matches everything.
    any: bool,
    /// A list that exists but names nothing here (a caller's allow list that names tools of
    /// other servers only): not empty, matches nothing.
    restrictive: bool,
}

impl Matcher {
    /// Compiles a list of names and globs.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Self {
        let mut m = Matcher::default();
        for p in patterns {
            let p = p.as_ref();
            if p == "*" {
                m.any = true;
            } else if p.contains(['*', '?']) {
                m.globs.push(Glob::new(p));
            } else {
                m.exact.push(p.into());
            }
        }
        m.exact.sort_unstable();
        m.exact.dedup();
        m
    }

    /// A list that matches nothing and is not empty (so as an allow list it allows nothing).
    pub fn nothing() -> Self {
        Matcher {
            restrictive: true,
            ..Matcher::default()
        }
    }

    /// Whether the list was empty.
    pub fn is_empty(&self) -> bool {
        !self.any && !self.restrictive && self.exact.is_empty() && self.globs.is_empty()
    }

    /// Whether `name` matches any entry.
    pub fn matches(&self, name: &str) -> bool {
        self.any || self.is_listed(name) || self.glob_matches(name)
    }

    /// Whether `name` matches one of the globs. The name's first and last words are read once
    /// and every glob's literal ends compared with them: a `tools/list` answer asks once per
    /// listed tool, and reading the pieces of each glob afresh was most of the filter's cost
    /// outside the scan.
    fn glob_matches(&self, name: &str) -> bool {
        if self.globs.is_empty() {
            return false;
        }
        let probe = Probe::new(name.as_bytes());
        self.globs.iter().any(|g| g.matches_probe(&probe))
    }

    /// Whether `name` is one of the exact names.
    fn is_listed(&self, name: &str) -> bool {
        /// Up to this many names a linear scan (most fail on the length) beats a binary search.
        const LINEAR: usize = 8;
        if self.exact.len() <= LINEAR {
            self.exact
                .iter()
                .any(|e| crate::bytes::eq(e.as_bytes(), name.as_bytes()))
        } else {
            self.exact.binary_search_by(|e| (**e).cmp(name)).is_ok()
        }
    }

    /// The exact names listed (for metric labels).
    pub fn exact_names(&self) -> impl Iterator<Item = &str> {
        self.exact.iter().map(|e| &**e)
    }
}

/// A compiled glob: one without `?` is literal pieces found in order (`prefix*`, `*suffix`
/// and `*infix*` among them), and the rest runs the general matcher over bytes; neither
/// allocates.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Glob {
    Pieces(Pieces),
    General(Vec<u8>),
}

/// A glob of literals and `*` only (`tool_0*0`, `a*b*c`): the first piece anchors the start,
/// the last the end, and the middle ones are found in order between them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pieces {
    first: Affix,
    middle: Vec<String>,
    last: Affix,
    /// The shortest name that can match: the first and last pieces side by side.
    min_len: usize,
}

impl Pieces {
    fn new(p: &str) -> Option<Self> {
        if p.contains('?') {
            return None;
        }
        let mut parts = p.split('*');
        let first = parts.next()?;
        let mut middle: Vec<String> = parts.map(str::to_string).collect();
        let last = middle.pop()?;
        middle.retain(|m| !m.is_empty());
        Some(Pieces {
            first: Affix::prefix(first.as_bytes()),
            middle,
            last: Affix::suffix(last.as_bytes()),
            min_len: first.len() + last.len(),
        })
    }

    /// Leftmost-first placement of each middle piece is enough: `*` takes any run, so a piece
    /// found earlier leaves at least as much room for the ones after it. Bytes are compared:
    /// a UTF-8 piece found in UTF-8 text always starts and ends on character boundaries.
    #[inline(always)]
    fn matches(&self, probe: &Probe<'_>) -> bool {
        let name = probe.name;
        if name.len() < self.min_len || !self.first.starts(probe) || !self.last.ends(probe) {
            return false;
        }
        self.middle.is_empty()
            || Self::found_in_order(
                &self.middle,
                &name[self.first.bytes.len()..name.len() - self.last.bytes.len()],
            )
    }

    /// Whether each piece of `middle` occurs in `rest`, in order, without overlapping. Out of
    /// line: a substring searcher needs a large stack frame, which every glob test would
    /// otherwise set up (a filtered `tools/list` asks once per glob and listed tool).
    #[inline(never)]
    fn found_in_order(middle: &[String], mut rest: &[u8]) -> bool {
        for piece in middle {
            match memchr::memmem::find(rest, piece.as_bytes()) {
                Some(at) => rest = &rest[at + piece.len()..],
                None => return false,
            }
        }
        true
    }
}

/// A glob's literal first or last piece, with its (up to) eight bytes nearest the name's end
/// as a word: most pieces are that short, and are then one masked compare with the
/// [`Probe`]'s word; a longer one compares its whole bytes after its word agrees.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Affix {
    /// The piece's bytes where the probe's word holds them (see [`Probe`]).
    word: u64,
    /// Which bytes of the probe's word the piece covers.
    mask: u64,
    bytes: Box<[u8]>,
}

impl Affix {
    /// A first piece: its first eight bytes, in the word's low bytes.
    fn prefix(piece: &[u8]) -> Self {
        let n = piece.len().min(8);
        Affix {
            word: head_word(&piece[..n]),
            mask: low_bytes(n),
            bytes: piece.into(),
        }
    }

    /// A last piece: its last eight bytes, in the word's high bytes.
    fn suffix(piece: &[u8]) -> Self {
        let n = piece.len().min(8);
        Affix {
            word: tail_word(&piece[piece.len() - n..]),
            mask: !low_bytes(8 - n),
            bytes: piece.into(),
        }
    }

    /// Whether the probed name starts with this piece (the name is at least as long).
    #[inline(always)]
    fn starts(&self, probe: &Probe<'_>) -> bool {
        probe.head & self.mask == self.word
            && (self.bytes.len() <= 8 || crate::bytes::starts_with(probe.name, &self.bytes))
    }

    /// Whether the probed name ends with this piece (the name is at least as long).
    #[inline(always)]
    fn ends(&self, probe: &Probe<'_>) -> bool {
        probe.tail & self.mask == self.word
            && (self.bytes.len() <= 8 || crate::bytes::ends_with(probe.name, &self.bytes))
    }
}

/// A name as the globs read it: its first (up to) eight bytes in a word's low bytes, in order,
/// and its last (up to) eight in a word's high bytes, its final byte highest. A piece of `n`
/// bytes then lies at the same place in its word whatever the name's length, as long as the
/// name has at least `n` bytes.
struct Probe<'a> {
    name: &'a [u8],
    head: u64,
    tail: u64,
}

impl<'a> Probe<'a> {
    #[inline(always)]
    fn new(name: &'a [u8]) -> Self {
        let n = name.len();
        let (head, tail) = if n >= 8 {
            (head_word(&name[..8]), tail_word(&name[n - 8..]))
        } else {
            let head = head_word(name);
            (head, tail_word(name))
        };
        Probe { name, head, tail }
    }
}

/// Up to eight bytes as a little-endian word, in its low bytes (the rest zero).
#[inline(always)]
fn head_word(b: &[u8]) -> u64 {
    let n = b.len();
    debug_assert!(n <= 8);
    if n == 8 {
        u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
    } else if n >= 4 {
        // Two overlapping four-byte reads: the bytes they share are the same bytes.
        let lo = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let hi = u32::from_le_bytes([b[n - 4], b[n - 3], b[n - 2], b[n - 1]]);
        u64::from(lo) | u64::from(hi) << ((n - 4) * 8)
    } else {
        b.iter()
            .enumerate()
            .fold(0, |w, (i, &c)| w | u64::from(c) << (i * 8))
    }
}

/// Up to eight bytes as a little-endian word, in its high bytes (the last byte highest).
#[inline(always)]
fn tail_word(b: &[u8]) -> u64 {
    match b.len() {
        0 => 0,
        n => head_word(b) << ((8 - n) * 8),
    }
}

/// A mask of a word's `n` low bytes (`n` ≤ 8).
fn low_bytes(n: usize) -> u64 {
    match n {
        8 => u64::MAX,
        n => (1u64 << (n * 8)) - 1,
    }
}

impl Glob {
    fn new(p: &str) -> Self {
        match Pieces::new(p) {
            Some(pieces) => Glob::Pieces(pieces),
            None => Glob::General(p.as_bytes().to_vec()),
        }
    }

    #[cfg(test)]
    fn matches(&self, name: &str) -> bool {
        self.matches_probe(&Probe::new(name.as_bytes()))
    }

    #[inline(always)]
    fn matches_probe(&self, probe: &Probe<'_>) -> bool {
        match self {
            Glob::Pieces(p) => p.matches(probe),
            Glob::General(p) => wildcard(p, probe.name),
        }
    }
}

/// Length of the UTF-8 character starting at `b[i]` (1 for stray continuation bytes).
fn char_len(b: &[u8], i: usize) -> usize {
    match b[i] {
        x if x < 0xC0 => 1,
        x if x < 0xE0 => 2,
        x if x < 0xF0 => 3,
        _ => 4,
    }
    .min(b.len() - i)
}

/// `*` matches any run, `?` exactly one character. Iterative with one backtrack point: at worst
/// O(pattern × name), never exponential, whatever a configured pattern looks like.
fn wildcard(p: &[u8], text: &[u8]) -> bool {
    let (mut ti, mut pi) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < text.len() {
        if pi < p.len() && p[pi] == b'?' {
            ti += char_len(text, ti);
            pi += 1;
        } else if pi < p.len() && p[pi] == text[ti] && p[pi] != b'*' {
            ti += 1;
            pi += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            let next = st + char_len(text, st);
            pi = sp + 1;
            ti = next;
            star = Some((sp, next));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

/// One allow/deny pair.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    /// Empty = everything allowed.
    pub allow: Matcher,
    /// Always refused, whatever `allow` says.
    pub deny: Matcher,
}

impl Rule {
    /// Whether `name` is permitted.
    pub fn permits(&self, name: &str) -> bool {
        self.refusal(name).is_none()
    }

    /// Why `name` is refused, if it is. The deny list is asked first: deny wins over allow, so
    /// a name on both lists is "denied", the stronger statement.
    pub fn refusal(&self, name: &str) -> Option<DenyReason> {
        if self.deny.matches(name) {
            Some(DenyReason::DenyList)
        } else if !self.allow.is_empty() && !self.allow.matches(name) {
            Some(DenyReason::NotAllowed)
        } else {
            None
        }
    }

    /// Whether the rule restricts anything at all.
    pub fn is_open(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }
}

/// What one identity may do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Tools (`tools/call`, and what `tools/list` shows).
    pub tools: Rule,
    /// Resources by URI (`resources/read`).
    pub resources: Rule,
    /// Prompts by name (`prompts/get`).
    pub prompts: Rule,
    /// Routed servers this identity may reach; `None` = all.
    pub servers: Option<HashSet<String>>,
    /// Requests per second for this identity (overrides the default).
    pub rate_limit: Option<u32>,
    /// `policy_mode = "shadow"`: refusals (lists and argument rules) are audited as
    /// `would_deny` and the request proceeds; the caller sees everything as if unrestricted.
    pub shadow: bool,
    /// The policy on a routed server, where tool entries name servers (`server/tool`); a
    /// server not listed here gets this policy.
    pub per_server: std::collections::HashMap<std::sync::Arc<str>, std::sync::Arc<Policy>>,
}

/// The policy of `policy`'s identity on the server named `server`.
pub fn policy_on<'p>(
    policy: &'p std::sync::Arc<Policy>,
    server: &str,
) -> &'p std::sync::Arc<Policy> {
    policy.per_server.get(server).unwrap_or(policy)
}

impl Policy {
    /// Whether this identity may reach the route named `name` (`default` is the `[upstream]`
    /// at `server.mcp_path`; with `allowed_servers` set it must be listed like any other).
    pub fn may_reach(&self, name: &str) -> bool {
        self.shadow || self.reaches(name)
    }

    /// Whether `tools/list` answers are filtered for this identity: a restricted, enforced
    /// policy (in shadow mode the caller sees what an unrestricted caller sees).
    pub fn filters_lists(&self) -> bool {
        !self.shadow && !self.tools.is_open()
    }

    /// Whether `allowed_servers` names `name` (shadow mode or not).
    pub fn reaches(&self, name: &str) -> bool {
        self.servers.as_ref().is_none_or(|s| s.contains(name))
    }
}

/// Why a call was refused: told to the caller in words and to the audit trail as a stable
/// reason. The caller learns which rule refused it, never what the lists hold: the lists are
/// policy, and echoing them would map out what other names might pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    /// The name matches the identity's deny list.
    DenyList,
    /// The identity has an allow list and the name is not on it.
    NotAllowed,
    /// A resource URI with no safe normal form (refused whatever the lists say).
    UnsafeUri,
    /// Pinning, `hide` mode: the tool's definition changed (or is new) and awaits approval.
    ToolChanged,
    /// Pinning, `block` mode: a tool of the server changed and awaits approval.
    ServerBlocked,
}

impl DenyReason {
    /// The audit `reason` and the JSON-RPC error's `data.reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::DenyList => "denied_by_deny_list",
            DenyReason::NotAllowed => "not_on_allow_list",
            DenyReason::UnsafeUri => "unsafe_resource_uri",
            DenyReason::ToolChanged => "tool_definition_changed",
            DenyReason::ServerBlocked => "server_tools_changed",
        }
    }
}

/// A refusal: its reason, and the message the caller sees (naming what was refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// Which rule refused it.
    pub reason: DenyReason,
    /// For the caller, e.g. `Tool 'rm' is denied for this caller`.
    pub message: String,
}

impl Denial {
    /// The refusal of a `kind` ("Tool", "Resource", "Prompt") named `name` for `reason`.
    pub fn of(kind: &str, name: &str, reason: DenyReason) -> Self {
        let message = match reason {
            DenyReason::DenyList => format!("{kind} '{name}' is denied for this caller"),
            DenyReason::NotAllowed => {
                format!("{kind} '{name}' is not on this caller's allow list")
            }
            DenyReason::UnsafeUri => format!("{kind} '{name}' is refused"),
            DenyReason::ToolChanged => format!(
                "{kind} '{name}' changed since it was approved (or is new) and awaits approval"
            ),
            DenyReason::ServerBlocked => format!(
                "Server '{name}' changed a tool definition; its requests are refused until the change is approved"
            ),
        };
        Denial { reason, message }
    }
}

/// The outcome of a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead.
    Allow,
    /// Refused, and why.
    Deny(Denial),
}

impl Policy {
    /// Decides a request by what it acts on. Protocol traffic (no target) is allowed.
    pub fn decide(&self, target: Option<&Target>) -> Decision {
        let refused = |kind: &str, name: &str, rule: &Rule, key: &str| {
            rule.refusal(key).map_or(Decision::Allow, |r| {
                Decision::Deny(Denial::of(kind, name, r))
            })
        };
        match target {
            None => Decision::Allow,
            Some(Target::Tool(t)) => refused("Tool", t, &self.tools, t),
            // Globs see the normal form: `file:///public/../secret` is `file:///secret` to the
            // upstream, and must be to the policy too. What has no safe normal form is refused
            // whatever the rules say (fail closed), so an open policy refuses it as well.
            Some(Target::Resource(r)) => match uri::normalize(r) {
                Err(why) => Decision::Deny(Denial {
                    reason: DenyReason::UnsafeUri,
                    message: format!("Resource '{}' is refused: {why}", r.escape_debug()),
                }),
                Ok(n) => refused("Resource", r, &self.resources, &n),
            },
            Some(Target::Prompt(p)) => refused("Prompt", p, &self.prompts, p),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_as_documented() {
        let m = Matcher::new(&["read_*", "search", "get_?_item", "*_admin*"]);
        assert!(m.matches("read_file"));
        assert!(m.matches("read_"));
        assert!(m.matches("search"));
        assert!(!m.matches("searches"));
        assert!(m.matches("get_a_item"));
        assert!(!m.matches("get_ab_item"));
        assert!(m.matches("x_admin_y"));
        assert!(!m.matches("write_file"));
        let g = Matcher::new(&["*file", "*tmp*", "a?c*d", "é?x"]);
        assert!(g.matches("read_file"));
        assert!(g.matches("x_tmp_y"));
        assert!(g.matches("abcxxd"));
        assert!(!g.matches("abcxx"));
        assert!(g.matches("éüx"), "? matches one whole character");
        assert!(!g.matches("éx"));
    }

    #[test]
    fn pieces_match_exactly_as_the_general_matcher() {
        let patterns = [
            "a*b", "a*b*c", "*a*b", "a*b*", "**", "a**b", "ab*ba", "a*a", "*é*", "x*é*y",
            "tool_0*0", "*", "a*", "*a", "aa*aa*aa",
        ];
        let names = [
            "", "a", "b", "ab", "aab", "abb", "abc", "acb", "aXbYc", "ba", "aba", "abba", "aa",
            "aaa", "aaaa", "aaaaa", "aaaaaa", "é", "xéy", "xy", "tool_010", "tool_011", "tool_0",
            "tool_00", "aaXaaYaa", "aaaa aa",
        ];
        for p in patterns {
            let compiled = Glob::new(p);
            for n in names {
                assert_eq!(
                    compiled.matches(n),
                    wildcard(p.as_bytes(), n.as_bytes()),
                    "pattern {p:?} on {n:?}"
                );
            }
        }
        // Every pattern of up to five characters over `a`, `b`, `*` against every name of up to
        // six characters over `a`, `b`: the compiled forms and the reference agree on all.
        fn words(alphabet: &[char], max: usize) -> Vec<String> {
            let mut all = vec![String::new()];
            let mut last = vec![String::new()];
            for _ in 0..max {
                last = last
                    .iter()
                    .flat_map(|w| alphabet.iter().map(move |c| format!("{w}{c}")))
                    .collect();
                all.extend(last.iter().cloned());
            }
            all
        }
        let names = words(&['a', 'b'], 6);
        for p in words(&['a', 'b', '*'], 5) {
            let compiled = Glob::new(&p);
            for n in &names {
                assert_eq!(
                    compiled.matches(n),
                    wildcard(p.as_bytes(), n.as_bytes()),
                    "pattern {p:?} on {n:?}"
                );
            }
        }
        assert!(matches!(Glob::new("tool_0*0"), Glob::Pieces(_)));
        assert!(matches!(Glob::new("*mid*"), Glob::Pieces(_)));
        assert!(matches!(Glob::new("a?*b"), Glob::General(_)));
    }

    #[test]
    fn long_names_and_pieces_match_exactly_as_the_general_matcher() {
        // Pieces and names on both sides of the eight-byte word, with one byte changed at
        // every position (the word compares and the whole-piece compares each see it).
        let base = "abcdefghijklmnopqrst";
        let mut names: Vec<String> = (0..=base.len()).map(|n| base[..n].to_string()).collect();
        names.extend((0..=base.len()).map(|n| base[base.len() - n..].to_string()));
        for name in names.clone() {
            for at in 0..name.len() {
                let mut changed = name.clone().into_bytes();
                changed[at] = b'Z';
                names.push(String::from_utf8(changed).unwrap());
            }
        }
        names.push("ab\u{e9}cdefghij\u{e9}klmnopq".into());
        let mut patterns = Vec::new();
        for first in 0..=12 {
            for last in 0..=12 {
                let (head, tail) = (&base[..first], &base[base.len() - last..]);
                patterns.push(format!("{head}*{tail}"));
                patterns.push(format!("{head}*j*{tail}"));
            }
        }
        patterns.push("ab\u{e9}*\u{e9}klmnopq".into());
        for p in &patterns {
            let compiled = Glob::new(p);
            for n in &names {
                assert_eq!(
                    compiled.matches(n),
                    wildcard(p.as_bytes(), n.as_bytes()),
                    "pattern {p:?} on {n:?}"
                );
            }
        }
    }

    #[test]
    fn lists_of_globs_match_as_each_glob_alone() {
        let patterns = [
            "tool_0*0", "tool_0*2", "tool_0*", "tool_*_x", "tool_?1", "*", "*a", "a*", "a*b*c",
            "ab*", "a?*", "é*x", "é*", "", "read_*", "read*",
        ];
        let names = [
            "",
            "a",
            "ab",
            "abc",
            "aXbYc",
            "tool_0",
            "tool_010",
            "tool_012",
            "tool_011",
            "tool_1_x",
            "tool_01",
            "tool_x1",
            "éx",
            "éax",
            "é",
            "read_file",
            "reads",
        ];
        // Every list of up to three of the patterns.
        for a in 0..patterns.len() {
            for b in a..patterns.len() {
                for c in b..patterns.len() {
                    let list = [patterns[a], patterns[b], patterns[c]];
                    let m = Matcher::new(&list);
                    for n in names {
                        let want = list
                            .iter()
                            .any(|p| *p == n || wildcard(p.as_bytes(), n.as_bytes()));
                        assert_eq!(m.matches(n), want, "{list:?} on {n:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn exact_names_are_found_in_short_and_long_lists() {
        let short = Matcher::new(&["b", "a", "b"]);
        assert!(short.matches("a") && short.matches("b") && !short.matches("c"));
        assert_eq!(short.exact_names().count(), 2, "duplicates are kept once");
        let names: Vec<String> = (0..50).map(|n| format!("tool_{n:03}")).collect();
        let long = Matcher::new(&names);
        assert!(names.iter().all(|n| long.matches(n)));
        assert!(!long.matches("tool_050") && !long.matches("tool_") && !long.matches(""));
    }

    #[test]
    fn pathological_globs_stay_linear() {
        let m = Matcher::new(&["*a*a*a*a*a*a*a*a*b"]);
        assert!(!m.matches(&"a".repeat(10_000)));
    }

    #[test]
    fn deny_wins_and_empty_allow_means_all() {
        let rule = Rule {
            allow: Matcher::new(&["read_*", "delete_temp"]),
            deny: Matcher::new(&["delete_*"]),
        };
        assert!(rule.permits("read_file"));
        assert!(!rule.permits("delete_temp"));
        assert!(!rule.permits("write_file"));
        let open = Rule {
            allow: Matcher::default(),
            deny: Matcher::new(&["drop_*"]),
        };
        assert!(open.permits("anything"));
        assert!(!open.permits("drop_table"));
    }

    #[test]
    fn decisions_name_what_was_refused() {
        let p = Policy {
            tools: Rule {
                allow: Matcher::new(&["echo"]),
                deny: Matcher::default(),
            },
            ..Policy::default()
        };
        assert_eq!(
            p.decide(Some(&Target::Tool("echo".into()))),
            Decision::Allow
        );
        assert_eq!(
            p.decide(Some(&Target::Tool("rm".into()))),
            deny(
                DenyReason::NotAllowed,
                "Tool 'rm' is not on this caller's allow list"
            )
        );
        assert_eq!(p.decide(None), Decision::Allow);
    }

    fn deny(reason: DenyReason, message: &str) -> Decision {
        Decision::Deny(Denial {
            reason,
            message: message.into(),
        })
    }

    #[test]
    fn decisions_say_which_list_refused_without_echoing_the_lists() {
        let rule = || Rule {
            allow: Matcher::new(&["read_*", "delete_temp"]),
            deny: Matcher::new(&["delete_*"]),
        };
        let p = Policy {
            tools: rule(),
            resources: rule(),
            prompts: rule(),
            ..Policy::default()
        };
        let cases = [
            (Target::Tool("delete_temp".into()), "Tool 'delete_temp'"),
            (
                Target::Resource("delete_temp".into()),
                "Resource 'delete_temp'",
            ),
            (Target::Prompt("delete_temp".into()), "Prompt 'delete_temp'"),
        ];
        // On both lists: deny wins, and the caller is told it is denied.
        for (target, what) in &cases {
            assert_eq!(
                p.decide(Some(target)),
                deny(
                    DenyReason::DenyList,
                    &format!("{what} is denied for this caller")
                )
            );
        }
        for target in [
            Target::Tool("write_file".into()),
            Target::Resource("write_file".into()),
            Target::Prompt("write_file".into()),
        ] {
            let Decision::Deny(d) = p.decide(Some(&target)) else {
                panic!("{target:?} allowed");
            };
            assert_eq!(d.reason, DenyReason::NotAllowed);
            assert!(
                d.message
                    .ends_with("'write_file' is not on this caller's allow list")
            );
            assert!(
                !d.message.contains("read_"),
                "the list leaked: {}",
                d.message
            );
        }
        assert_eq!(DenyReason::DenyList.as_str(), "denied_by_deny_list");
        assert_eq!(DenyReason::NotAllowed.as_str(), "not_on_allow_list");
        let open_with_deny = Policy {
            tools: Rule {
                allow: Matcher::default(),
                deny: Matcher::new(&["drop_*"]),
            },
            ..Policy::default()
        };
        assert_eq!(
            open_with_deny.decide(Some(&Target::Tool("drop_table".into()))),
            deny(
                DenyReason::DenyList,
                "Tool 'drop_table' is denied for this caller"
            )
        );
    }

    fn resource_policy(allow: &[&str], deny: &[&str]) -> Policy {
        Policy {
            resources: Rule {
                allow: Matcher::new(allow),
                deny: Matcher::new(deny),
            },
            ..Policy::default()
        }
    }

    fn read(p: &Policy, uri: &str) -> Decision {
        p.decide(Some(&Target::Resource(uri.into())))
    }

    #[test]
    fn resource_allow_globs_match_the_normalised_uri() {
        let p = resource_policy(&["file:///public/*"], &[]);
        for ok in [
            "file:///public/a",
            "file:///public/./a",
            "file:///public/a/../b",
            "file:///public/%61",
        ] {
            assert_eq!(read(&p, ok), Decision::Allow, "{ok}");
        }
        for bad in [
            "file:///public/../secret",
            "file:///public/%2e%2e/secret",
            "file:///public/%2E%2e/secret",
            "file:///public/..%2fsecret",
            "file:///public%2f..%2fsecret",
            "file:///public/%252e%252e/secret",
            "file:///public/..\\secret",
            "file:///public/..%5Csecret",
            "file:///../../etc/passwd",
            "file:///public/../../etc/passwd",
            "file:///public/a%00",
        ] {
            assert!(matches!(read(&p, bad), Decision::Deny(_)), "{bad}");
        }
        assert_eq!(
            read(&p, "file:///public/../../etc/passwd"),
            deny(
                DenyReason::UnsafeUri,
                "Resource 'file:///public/../../etc/passwd' is refused: its path climbs above \
                 its root"
            )
        );
        assert_eq!(
            read(&p, "file:///public/../secret"),
            deny(
                DenyReason::NotAllowed,
                "Resource 'file:///public/../secret' is not on this caller's allow list"
            )
        );
    }

    #[test]
    fn resource_deny_globs_catch_dot_segment_and_case_detours() {
        let p = resource_policy(&[], &["file:///secret/*"]);
        assert_eq!(read(&p, "file:///public/x"), Decision::Allow);
        for bad in [
            "file:///public/../secret/x",
            "file:///public/%2e%2E/secret/x",
            "file:///secret/./x",
            "FILE:///secret/x",
        ] {
            assert!(matches!(read(&p, bad), Decision::Deny(_)), "{bad}");
        }
    }

    #[test]
    fn resource_uris_of_other_schemes_are_normalised_too() {
        let p = resource_policy(&["https://host/b*", "custom://x"], &[]);
        assert_eq!(read(&p, "https://host/a/../b"), Decision::Allow);
        assert_eq!(read(&p, "custom://x"), Decision::Allow);
        assert!(matches!(read(&p, "https://host/../b"), Decision::Deny(_)));
        assert!(matches!(read(&p, "custom://y"), Decision::Deny(_)));
        // An open policy still refuses what has no safe normal form.
        let open = Policy::default();
        assert_eq!(read(&open, "custom://x/a/../b"), Decision::Allow);
        assert!(matches!(
            read(&open, "file:///../etc/passwd"),
            Decision::Deny(_)
        ));
    }
}
