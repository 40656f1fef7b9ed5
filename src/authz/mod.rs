//! Authorization: a compiled per-identity policy and the one decision function.
//!
//! A [`Policy`] is built once per config load from every source that grants or refuses tools
//! (an API key's lists today; JWT/OAuth scopes through `scope_tool_mapping` later), so a
//! request only does set lookups and glob matches. Deny always wins over allow.

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

/// A compiled glob.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Glob {
    pattern: Vec<char>,
}

impl Glob {
    fn new(p: &str) -> Self {
        Glob {
            pattern: p.chars().collect(),
        }
    }

    /// Iterative wildcard match with single backtrack point: linear in practice and never
    /// exponential, whatever a configured pattern looks like.
    fn matches(&self, name: &str) -> bool {
        let text: Vec<char> = name.chars().collect();
        let p = &self.pattern;
        let (mut ti, mut pi) = (0usize, 0usize);
        let mut star: Option<(usize, usize)> = None;
        while ti < text.len() {
            if pi < p.len() && (p[pi] == '?' || p[pi] == text[ti]) {
                ti += 1;
                pi += 1;
            } else if pi < p.len() && p[pi] == '*' {
                star = Some((pi, ti));
                pi += 1;
            } else if let Some((sp, st)) = star {
                pi = sp + 1;
                ti = st + 1;
                star = Some((sp, st + 1));
            } else {
                return false;
            }
        }
        while pi < p.len() && p[pi] == '*' {
            pi += 1;
        }
        pi == p.len()
    }
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
            Some(Target::Resource(r)) if !self.resources.permits(r) => {
                Decision::Deny(format!("Resource '{r}' is not permitted"))
            }
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
}
