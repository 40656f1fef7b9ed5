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
    exact: HashSet<String>,
    globs: Vec<Glob>,
    /// A lone `*`: matches everything.
    any: bool,
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
                m.exact.insert(p.to_string());
            }
        }
        m
    }

    /// Whether the list was empty.
    pub fn is_empty(&self) -> bool {
        !self.any && self.exact.is_empty() && self.globs.is_empty()
    }

    /// Whether `name` matches any entry.
    pub fn matches(&self, name: &str) -> bool {
        self.any || self.exact.contains(name) || self.globs.iter().any(|g| g.matches(name))
    }

    /// The exact names listed (for metric labels).
    pub fn exact_names(&self) -> impl Iterator<Item = &str> {
        self.exact.iter().map(String::as_str)
    }
}

/// A compiled glob: the common shapes (`prefix*`, `*suffix`, `*infix*`) are plain substring
/// tests; anything else runs the general matcher over bytes, without allocating.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Glob {
    Prefix(String),
    Suffix(String),
    Contains(String),
    General(Vec<u8>),
}

impl Glob {
    fn new(p: &str) -> Self {
        let inner_wild = |s: &str| s.contains(['*', '?']);
        if let Some(prefix) = p.strip_suffix('*')
            && !inner_wild(prefix)
        {
            return Glob::Prefix(prefix.to_string());
        }
        if let Some(suffix) = p.strip_prefix('*')
            && !inner_wild(suffix)
        {
            return Glob::Suffix(suffix.to_string());
        }
        if let Some(mid) = p.strip_prefix('*').and_then(|r| r.strip_suffix('*'))
            && !inner_wild(mid)
        {
            return Glob::Contains(mid.to_string());
        }
        Glob::General(p.as_bytes().to_vec())
    }

    fn matches(&self, name: &str) -> bool {
        match self {
            Glob::Prefix(p) => name.starts_with(p.as_str()),
            Glob::Suffix(s) => name.ends_with(s.as_str()),
            Glob::Contains(m) => name.contains(m.as_str()),
            Glob::General(p) => wildcard(p, name.as_bytes()),
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
        !self.deny.matches(name) && (self.allow.is_empty() || self.allow.matches(name))
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
}

/// The outcome of a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead.
    Allow,
    /// Refused; the message names what was refused.
    Deny(String),
}

impl Policy {
    /// Decides a request by what it acts on. Protocol traffic (no target) is allowed.
    pub fn decide(&self, target: Option<&Target>) -> Decision {
        match target {
            None => Decision::Allow,
            Some(Target::Tool(t)) if !self.tools.permits(t) => {
                Decision::Deny(format!("Tool '{t}' is not permitted"))
            }
            // Globs see the normal form: `file:///public/../secret` is `file:///secret` to the
            // upstream, and must be to the policy too. What has no safe normal form is refused
            // whatever the rules say (fail closed), so an open policy refuses it as well.
            Some(Target::Resource(r)) => match uri::normalize(r) {
                Err(why) => {
                    Decision::Deny(format!("Resource '{}' is refused: {why}", r.escape_debug()))
                }
                Ok(n) if !self.resources.permits(&n) => {
                    Decision::Deny(format!("Resource '{r}' is not permitted"))
                }
                Ok(_) => Decision::Allow,
            },
            Some(Target::Prompt(p)) if !self.prompts.permits(p) => {
                Decision::Deny(format!("Prompt '{p}' is not permitted"))
            }
            Some(_) => Decision::Allow,
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
            Decision::Deny("Tool 'rm' is not permitted".into())
        );
        assert_eq!(p.decide(None), Decision::Allow);
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
            Decision::Deny(
                "Resource 'file:///public/../../etc/passwd' is refused: its path climbs above \
                 its root"
                    .into()
            )
        );
        assert_eq!(
            read(&p, "file:///public/../secret"),
            Decision::Deny("Resource 'file:///public/../secret' is not permitted".into())
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
