//! Argument constraints (`[[tool_rules]]`): compiled once per config load, evaluated on the
//! classifier's own parse of the request.
//!
//! Where they run: the classifier parses the body once, with simd-json, into a tape that lives
//! in its per-worker scratch buffer only for the duration of [`Classifier::classify_inspecting`].
//! Rather than copy `params.arguments` out (an allocation per call, and a second tree), the
//! pipeline hands the classifier a callback that it calls with each `tools/call`'s tool name and
//! its `params.arguments` value *on the tape*; the callback runs [`ToolRules::check`] there and
//! keeps only the outcome (a [`Violation`], or nothing). The decision is applied in phase 7,
//! after the allow/deny lists, from that outcome: the JSON is never looked at again.
//!
//! Cost: a call of a tool no rule names is one hash lookup (plus one match per glob-named
//! rule); a body with no rules configured at all takes the classifier's plain path.
//!
//! [`Classifier::classify_inspecting`]: crate::mcp::jsonrpc::Classifier::classify_inspecting

pub mod exact;
pub mod path;

pub use exact::Source;

use crate::authz::Matcher;
use crate::config::schema::{ArgRuleSection, ArgType, PolicyMode, ToolRuleSection};
use crate::mcp::jsonrpc::{Arguments, TapeValue};
use simd_json::ValueType;
use simd_json::prelude::*;
use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::Arc;

/// Every `[[tool_rules]]` entry, compiled and indexed by tool name.
#[derive(Debug, Default)]
pub struct ToolRules {
    rules: Vec<ToolRule>,
    /// Rules whose `tool` is an exact name, by that name.
    by_name: HashMap<String, Vec<usize>>,
    /// Rules whose `tool` is a glob, in file order.
    by_glob: Vec<usize>,
}

/// One `[[tool_rules]]` entry.
#[derive(Debug)]
struct ToolRule {
    /// Its index in the file (`tool_rules[i]`), for messages and audit.
    index: usize,
    tool: Matcher,
    server: Option<Arc<str>>,
    identities: Option<Matcher>,
    shadow: bool,
    args: Vec<ArgCheck>,
}

/// The checks on one argument.
#[derive(Debug)]
struct ArgCheck {
    /// As configured, for messages.
    pointer: Arc<str>,
    /// Unescaped reference tokens, with each one's ASCII-lowercase form (for lookalike members).
    tokens: Vec<(String, String)>,
    required: bool,
    kind: Option<ArgType>,
    path_under: Vec<path::Root>,
    glob: Option<Matcher>,
    regex: Option<regex::Regex>,
    one_of: Vec<String>,
    min: Option<f64>,
    max: Option<f64>,
    max_len: Option<usize>,
}

/// The members of an audit event's `details` an argument refusal writes.
pub const AUDIT_KEYS: [&str; 3] = ["pointer", "check", "rule"];

/// A failed check: which rule, which argument, which check. Never the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// `tool_rules[i]`.
    pub rule: usize,
    /// The argument's pointer as configured.
    pub pointer: Arc<str>,
    /// The check that failed (`required`, `path_under`, `type`, …, or `duplicate_member`).
    pub check: &'static str,
    /// Why, in words (no part of the value).
    pub why: String,
    /// From a rule in `mode = "shadow"`: audited, not enforced.
    pub shadow: bool,
}

impl Violation {
    /// The message the caller reads.
    pub fn message(&self, tool: &str) -> String {
        format!(
            "Argument '{}' of tool '{}' refused by tool_rules[{}] ({}): {}",
            self.pointer, tool, self.rule, self.check, self.why
        )
    }

    /// The facts the audit event's `details` gets: [`AUDIT_KEYS`], never the value.
    pub fn audit_details(&self) -> [(&'static str, serde_json::Value); 3] {
        [
            ("pointer", serde_json::Value::from(&*self.pointer)),
            ("check", serde_json::Value::from(self.check)),
            ("rule", serde_json::Value::from(self.rule)),
        ]
    }

    /// The JSON-RPC error's `data`.
    pub fn data_json(&self) -> String {
        serde_json::json!({
            "reason": "argument_refused",
            "pointer": &*self.pointer,
            "check": self.check,
            "rule": self.rule,
        })
        .to_string()
    }
}

impl ToolRules {
    /// Whether no rule is configured (the classifier then takes its plain path).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Checks one call of `tool` on `server` by `identity` against every rule that applies.
    /// The first failure of an enforced rule wins; else the first of a shadow rule; `None`
    /// when every check passes (or no rule applies). `source` is the body the tape was parsed
    /// from, read only to compare a number that lands exactly on a bound (see [`exact`]).
    pub fn check(
        &self,
        tool: &str,
        server: &str,
        identity: &str,
        arguments: Arguments<'_, '_>,
        source: Source<'_>,
    ) -> Option<Violation> {
        let exact = self.by_name.get(tool).map(Vec::as_slice).unwrap_or(&[]);
        if exact.is_empty() && self.by_glob.is_empty() {
            return None;
        }
        let mut shadowed = None;
        let applicable = exact.iter().chain(
            self.by_glob
                .iter()
                .filter(|&&i| self.rules[i].tool.matches(tool)),
        );
        for &i in applicable {
            let rule = &self.rules[i];
            if rule.server.as_deref().is_some_and(|s| s != server)
                || rule
                    .identities
                    .as_ref()
                    .is_some_and(|m| !m.matches(identity))
            {
                continue;
            }
            if let Some(v) = rule.evaluate(&arguments, source) {
                if !v.shadow {
                    return Some(v);
                }
                shadowed.get_or_insert(v);
            }
        }
        shadowed
    }
}

impl ToolRule {
    fn evaluate(&self, arguments: &Arguments<'_, '_>, source: Source<'_>) -> Option<Violation> {
        let fail = |arg: &ArgCheck, check: &'static str, why: String| Violation {
            rule: self.index,
            pointer: arg.pointer.clone(),
            check,
            why,
            shadow: self.shadow,
        };
        for arg in &self.args {
            let root = match arguments {
                Ok(root) => *root,
                Err(why) => return Some(fail(arg, "duplicate_member", why.clone())),
            };
            let value = match root.map(|r| resolve(r, &arg.tokens)).transpose() {
                Ok(v) => v.flatten(),
                Err(Unreadable::Duplicate(why)) => {
                    return Some(fail(arg, "duplicate_member", why));
                }
                Err(Unreadable::Shape(why)) => return Some(fail(arg, "shape", why)),
            };
            let Some(value) = value else {
                if arg.required {
                    return Some(fail(arg, "required", "the argument is required".into()));
                }
                continue;
            };
            if let Err((check, why)) = arg.check(value, source) {
                return Some(fail(arg, check, why));
            }
        }
        None
    }
}

/// Why a pointer could not be followed.
enum Unreadable {
    /// A member named twice (or in another case) on the way: two parsers could each have
    /// read a different one.
    Duplicate(String),
    /// A value on the way is neither an object nor `null` (nor an array, for an index token):
    /// the arguments do not have the shape the rule was written for. Counting it as absent
    /// would let `{"items":[{"path":"/etc"}]}` pass a rule on `/items/path` that a server
    /// iterating `items` reads through.
    Shape(String),
}

/// Follows `tokens` from `root`. `Ok(None)`: absent (a member or index that is not there, or
/// `null` on the way). A member named twice (or a member that differs from the token only in
/// case, which a case-folding decoder would read as it) along the way is an error: two parsers
/// could each have read a different one; so is a value of another shape on the way.
fn resolve<'t, 'i>(
    root: TapeValue<'t, 'i>,
    tokens: &[(String, String)],
) -> Result<Option<TapeValue<'t, 'i>>, Unreadable> {
    let mut at = root;
    for (depth, (token, lower)) in tokens.iter().enumerate() {
        let next = if let Some(obj) = at.as_object() {
            let mut found = None;
            for (k, v) in obj.iter() {
                if k == token {
                    if found.is_some() {
                        return Err(Unreadable::Duplicate(format!(
                            "member \"{}\" appears twice",
                            token.escape_debug()
                        )));
                    }
                    found = Some(v);
                } else if crate::mcp::jsonrpc::folds_to(k, lower) {
                    return Err(Unreadable::Duplicate(format!(
                        "a member differs from \"{}\" only in case",
                        token.escape_debug()
                    )));
                }
            }
            found
        } else if let Some(arr) = at.as_array() {
            match array_index(token) {
                Some(i) => arr.iter().nth(i),
                None => {
                    return Err(Unreadable::Shape(format!(
                        "not the expected shape: an array where member \"{}\" was expected \
                         (at depth {depth})",
                        token.escape_debug()
                    )));
                }
            }
        } else if at.value_type() == ValueType::Null {
            None
        } else {
            return Err(Unreadable::Shape(format!(
                "not the expected shape: a {} where an object was expected (at depth {depth})",
                json_type(at.value_type())
            )));
        };
        match next {
            Some(v) => at = v,
            None => return Ok(None),
        }
    }
    Ok(Some(at))
}

fn json_type(t: ValueType) -> &'static str {
    match t {
        ValueType::String => "string",
        ValueType::I64 | ValueType::U64 | ValueType::F64 => "number",
        ValueType::Bool => "boolean",
        ValueType::Array => "array",
        ValueType::Object => "object",
        _ => "value",
    }
}

/// RFC 6901: an array index is `0` or digits without a leading zero.
fn array_index(token: &str) -> Option<usize> {
    if token.is_empty()
        || !token.bytes().all(|b| b.is_ascii_digit())
        || (token.len() > 1 && token.starts_with('0'))
    {
        return None;
    }
    token.parse().ok()
}

type CheckError = (&'static str, String);

impl ArgCheck {
    fn check(&self, v: TapeValue<'_, '_>, source: Source<'_>) -> Result<(), CheckError> {
        let vt = v.value_type();
        let is_number = matches!(vt, ValueType::I64 | ValueType::U64 | ValueType::F64);
        if let Some(kind) = self.kind {
            let ok = match kind {
                ArgType::String => vt == ValueType::String,
                ArgType::Number => is_number,
                ArgType::Integer => matches!(vt, ValueType::I64 | ValueType::U64),
                ArgType::Boolean => vt == ValueType::Bool,
            };
            if !ok {
                return Err(("type", format!("must be of type {}", type_name(kind))));
            }
        }
        if self.min.is_some() || self.max.is_some() {
            // A number sent as a string is not a number: an upstream converting it would run
            // what `max` never saw.
            let check = if self.min.is_some() { "min" } else { "max" };
            if !is_number {
                return Err((check, "must be a JSON number".into()));
            }
            if let Some(min) = self.min
                && !matches!(
                    exact::compare(v, min, &self.tokens, source),
                    Some(Ordering::Greater | Ordering::Equal)
                )
            {
                return Err(("min", format!("must be at least {min}")));
            }
            if let Some(max) = self.max
                && !matches!(
                    exact::compare(v, max, &self.tokens, source),
                    Some(Ordering::Less | Ordering::Equal)
                )
            {
                return Err(("max", format!("must be at most {max}")));
            }
        }
        let wants_string = !self.path_under.is_empty()
            || self.glob.is_some()
            || self.regex.is_some()
            || !self.one_of.is_empty()
            || self.max_len.is_some();
        if !wants_string {
            return Ok(());
        }
        let first = self.first_string_check();
        let Some(s) = v.as_str() else {
            return Err((first, "must be a string".into()));
        };
        if let Some(max) = self.max_len
            && s.len() > max
            && s.chars().nth(max).is_some()
        {
            return Err(("max_len", format!("must be at most {max} characters")));
        }
        if !self.path_under.is_empty() {
            path::check_under(s, &self.path_under).map_err(|why| ("path_under", why.into()))?;
        }
        if let Some(g) = &self.glob
            && !g.matches(s)
        {
            return Err(("glob", "matches none of the allowed patterns".into()));
        }
        if let Some(r) = &self.regex
            && !r.is_match(s)
        {
            return Err(("regex", "does not match the required pattern".into()));
        }
        if !self.one_of.is_empty() && !self.one_of.iter().any(|o| o == s) {
            return Err(("one_of", "is not one of the allowed values".into()));
        }
        Ok(())
    }

    fn first_string_check(&self) -> &'static str {
        if self.max_len.is_some() {
            "max_len"
        } else if !self.path_under.is_empty() {
            "path_under"
        } else if self.glob.is_some() {
            "glob"
        } else if self.regex.is_some() {
            "regex"
        } else {
            "one_of"
        }
    }
}

fn type_name(kind: ArgType) -> &'static str {
    match kind {
        ArgType::String => "string",
        ArgType::Number => "number",
        ArgType::Integer => "integer",
        ArgType::Boolean => "boolean",
    }
}

/// Compiles `[[tool_rules]]`; `Err((key, message))` names the offending key.
pub fn compile(
    sections: &[ToolRuleSection],
    servers: &[Arc<str>],
) -> Result<ToolRules, (String, String)> {
    let mut out = ToolRules::default();
    for (i, s) in sections.iter().enumerate() {
        let key = format!("tool_rules[{i}]");
        let err = |k: &str, m: String| (format!("{key}.{k}"), m);
        if s.tool.trim().is_empty() {
            return Err(err("tool", "must name a tool or a glob".into()));
        }
        let server = match &s.server {
            Some(name) if !servers.iter().any(|r| **r == **name) => {
                return Err(err(
                    "server",
                    format!("`{name}` is not a configured server (`default` is [upstream])"),
                ));
            }
            Some(name) => Some(Arc::<str>::from(name.as_str())),
            None => None,
        };
        let identities = match &s.identities {
            Some(ids) if ids.is_empty() || ids.iter().any(|i| i.trim().is_empty()) => {
                return Err(err(
                    "identities",
                    "must list identity ids or globs (remove the key to apply to everyone)".into(),
                ));
            }
            Some(ids) => Some(Matcher::new(ids)),
            None => None,
        };
        if s.args.is_empty() {
            return Err((
                key.clone(),
                "a rule with no checks: add [[tool_rules.args]] entries".into(),
            ));
        }
        let args = s
            .args
            .iter()
            .enumerate()
            .map(|(j, a)| compile_arg(a).map_err(|(k, m)| (format!("{key}.args[{j}].{k}"), m)))
            .collect::<Result<Vec<_>, _>>()?;
        let rule = ToolRule {
            index: i,
            tool: Matcher::new(&[&s.tool]),
            server,
            identities,
            shadow: s.mode == PolicyMode::Shadow,
            args,
        };
        let at = out.rules.len();
        if s.tool.contains(['*', '?']) {
            out.by_glob.push(at);
        } else {
            out.by_name.entry(s.tool.clone()).or_default().push(at);
        }
        out.rules.push(rule);
    }
    Ok(out)
}

fn compile_arg(a: &ArgRuleSection) -> Result<ArgCheck, (&'static str, String)> {
    let tokens = parse_pointer(&a.pointer).map_err(|m| ("pointer", m))?;
    let nonempty = |k: &'static str, l: &Option<Vec<String>>| match l {
        Some(v) if v.is_empty() => Err((k, "must not be empty (remove the key instead)".into())),
        _ => Ok(()),
    };
    nonempty("path_under", &a.path_under)?;
    nonempty("glob", &a.glob)?;
    nonempty("one_of", &a.one_of)?;
    let path_under = a
        .path_under
        .iter()
        .flatten()
        .map(|r| path::Root::parse(r))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|m| ("path_under", m))?;
    let regex = a
        .regex
        .as_deref()
        .map(|r| {
            regex::RegexBuilder::new(r)
                .size_limit(1 << 20)
                .build()
                .map_err(|e| ("regex", format!("not a valid regular expression: {e}")))
        })
        .transpose()?;
    for (k, v) in [("min", a.min), ("max", a.max)] {
        if v.is_some_and(|v| !v.is_finite()) {
            return Err((k, "must be a finite number".into()));
        }
    }
    if let (Some(min), Some(max)) = (a.min, a.max)
        && min > max
    {
        return Err(("min", format!("{min} is greater than max ({max})")));
    }
    let string_checks = a.path_under.is_some()
        || a.glob.is_some()
        || a.regex.is_some()
        || a.one_of.is_some()
        || a.max_len.is_some();
    let number_checks = a.min.is_some() || a.max.is_some();
    if string_checks && number_checks {
        return Err((
            "min",
            "numeric bounds and string checks on one argument can never both pass".into(),
        ));
    }
    match a.kind {
        Some(ArgType::String) if number_checks => {
            return Err(("type", "\"string\" with min/max can never pass".into()));
        }
        Some(k) if k != ArgType::String && string_checks => {
            return Err((
                "type",
                format!("\"{}\" with string checks can never pass", type_name(k)),
            ));
        }
        _ => {}
    }
    if !a.required && a.kind.is_none() && !string_checks && !number_checks {
        return Err((
            "pointer",
            "no check besides the pointer: add required, type or a value check".into(),
        ));
    }
    Ok(ArgCheck {
        pointer: a.pointer.as_str().into(),
        tokens: tokens
            .into_iter()
            .map(|t| {
                let lower = t.to_ascii_lowercase();
                (t, lower)
            })
            .collect(),
        required: a.required,
        kind: a.kind,
        path_under,
        glob: a.glob.as_deref().map(Matcher::new),
        regex,
        one_of: a.one_of.clone().unwrap_or_default(),
        min: a.min,
        max: a.max,
        max_len: a.max_len,
    })
}

/// RFC 6901 reference tokens of a pointer naming a member (so not the empty pointer): `/`
/// separated, `~1` for `/` and `~0` for `~`, no other `~` escape.
pub fn parse_pointer(p: &str) -> Result<Vec<String>, String> {
    let Some(rest) = p.strip_prefix('/') else {
        return Err(format!(
            "`{}` is not a JSON pointer (RFC 6901) to an argument: it must start with /",
            p.escape_debug()
        ));
    };
    rest.split('/')
        .map(|t| {
            let mut out = String::with_capacity(t.len());
            let mut chars = t.chars();
            while let Some(c) = chars.next() {
                if c == '~' {
                    match chars.next() {
                        Some('0') => out.push('~'),
                        Some('1') => out.push('/'),
                        _ => {
                            return Err(format!(
                                "`{}`: `~` must be followed by 0 or 1 (RFC 6901)",
                                p.escape_debug()
                            ));
                        }
                    }
                } else {
                    out.push(c);
                }
            }
            Ok(out)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mcp::jsonrpc::Classifier;

    fn rules(toml_text: &str) -> ToolRules {
        #[derive(serde::Deserialize)]
        struct F {
            tool_rules: Vec<ToolRuleSection>,
        }
        let f: F = toml::from_str(toml_text).unwrap();
        compile(&f.tool_rules, &["default".into(), "files".into()]).unwrap()
    }

    fn run(r: &ToolRules, identity: &str, server: &str, args: &str) -> Option<Violation> {
        let body = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"read_file","arguments":{args}}}}}"#
        );
        let mut out = None;
        Classifier::new()
            .classify_inspecting(body.as_bytes(), &mut |i, tool, a| {
                out = r.check(tool, server, identity, a, Source::new(body.as_bytes(), i));
            })
            .unwrap();
        out
    }

    const TYPICAL: &str = r#"
        [[tool_rules]]
        tool = "read_*"
        [[tool_rules.args]]
        pointer = "/path"
        required = true
        path_under = ["/srv/data"]
        [[tool_rules.args]]
        pointer = "/mode"
        regex = "^[a-z]+$"
        [[tool_rules.args]]
        pointer = "/opts/depth"
        max = 5
    "#;

    #[test]
    fn each_check_passes_and_refuses() {
        let r = rules(TYPICAL);
        assert_eq!(
            run(
                &r,
                "a",
                "default",
                r#"{"path":"/srv/data/x","mode":"ro","opts":{"depth":3}}"#
            ),
            None
        );
        let check = |args: &str| run(&r, "a", "default", args).map(|v| v.check);
        assert_eq!(check(r#"{}"#), Some("required"));
        assert_eq!(check(r#"{"path":"/etc/passwd"}"#), Some("path_under"));
        assert_eq!(
            check(r#"{"path":"/srv/data/x","mode":"RO"}"#),
            Some("regex")
        );
        assert_eq!(
            check(r#"{"path":"/srv/data/x","opts":{"depth":6}}"#),
            Some("max")
        );
        assert_eq!(
            check(r#"{"path":"/srv/data/x","opts":{"depth":"1"}}"#),
            Some("max")
        );
        assert_eq!(check(r#"{"path":7}"#), Some("path_under"));
    }

    #[test]
    fn duplicate_members_on_the_path_are_refused_at_each_level() {
        let r = rules(TYPICAL);
        let check = |args: &str| run(&r, "a", "default", args).map(|v| v.check);
        assert_eq!(
            check(r#"{"path":"/srv/data/x","path":"/etc/passwd"}"#),
            Some("duplicate_member")
        );
        assert_eq!(
            check(r#"{"path":"/srv/data/x","Path":"/etc/passwd"}"#),
            Some("duplicate_member")
        );
        assert_eq!(
            check(r#"{"path":"/srv/data/x","opts":{"depth":1},"opts":{"depth":99}}"#),
            Some("duplicate_member")
        );
        assert_eq!(
            check(r#"{"path":"/srv/data/x","opts":{"depth":1,"depth":99}}"#),
            Some("duplicate_member")
        );
        // `arguments` itself given twice.
        let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_file","arguments":{"path":"/srv/data/x"},"arguments":{"path":"/etc/passwd"}}}"#;
        let mut out = None;
        Classifier::new()
            .classify_inspecting(body.as_bytes(), &mut |i, tool, a| {
                out = r.check(tool, "default", "a", a, Source::new(body.as_bytes(), i));
            })
            .unwrap();
        assert_eq!(out.map(|v| v.check), Some("duplicate_member"));
    }

    #[test]
    fn types_lengths_and_lists() {
        let r = rules(
            r#"
            [[tool_rules]]
            tool = "read_file"
            [[tool_rules.args]]
            pointer = "/n"
            type = "integer"
            min = 0
            [[tool_rules.args]]
            pointer = "/s"
            max_len = 3
            one_of = ["abc", "é"]
            [[tool_rules.args]]
            pointer = "/g"
            glob = ["*.md"]
            [[tool_rules.args]]
            pointer = "/list/1"
            type = "boolean"
            [[tool_rules.args]]
            pointer = "/a~1b"
            type = "string"
        "#,
        );
        let check = |args: &str| run(&r, "a", "default", args).map(|v| v.check);
        assert_eq!(
            check(r#"{"n":1,"s":"é","g":"x.md","list":[0,true],"a/b":"x"}"#),
            None
        );
        assert_eq!(check(r#"{"n":1.0}"#), Some("type"));
        assert_eq!(check(r#"{"n":-1}"#), Some("min"));
        assert_eq!(check(r#"{"s":"abcd"}"#), Some("max_len"));
        assert_eq!(check(r#"{"s":"ab"}"#), Some("one_of"));
        assert_eq!(check(r#"{"g":"x.mdx"}"#), Some("glob"));
        assert_eq!(check(r#"{"list":[0,"true"]}"#), Some("type"));
        assert_eq!(check(r#"{"a/b":1}"#), Some("type"));
        let huge = format!(r#"{{"s":"{}"}}"#, "x".repeat(1 << 20));
        let v = run(&r, "a", "default", &huge).unwrap();
        assert_eq!(v.check, "max_len");
        assert!(
            v.message("read_file").len() < 200,
            "the value is never echoed"
        );
    }

    #[test]
    fn scope_by_server_identity_and_shadow() {
        let r = rules(
            r#"
            [[tool_rules]]
            tool = "read_file"
            server = "files"
            identities = ["ci-*"]
            [[tool_rules.args]]
            pointer = "/path"
            required = true
            [[tool_rules]]
            tool = "read_*"
            mode = "shadow"
            [[tool_rules.args]]
            pointer = "/x"
            required = true
        "#,
        );
        let v = run(&r, "ci-1", "files", "{}").unwrap();
        assert!(!v.shadow && v.rule == 0);
        let v = run(&r, "alice", "files", "{}").unwrap();
        assert!(v.shadow && v.rule == 1);
        let v = run(&r, "ci-1", "default", "{}").unwrap();
        assert!(v.shadow && v.rule == 1);
        assert_eq!(run(&r, "alice", "default", r#"{"x":1}"#), None);
    }

    #[test]
    fn bad_rules_are_refused_naming_the_key() {
        let bad = |body: &str, key: &str| {
            #[derive(serde::Deserialize)]
            struct F {
                tool_rules: Vec<ToolRuleSection>,
            }
            let text = format!("[[tool_rules]]\ntool = \"t\"\n{body}");
            let f: F = toml::from_str(&text).unwrap();
            let e = compile(&f.tool_rules, &["default".into()]).unwrap_err();
            assert_eq!(e.0, key, "{body}: {e:?}");
        };
        bad("", "tool_rules[0]");
        bad(
            "[[tool_rules.args]]\npointer = \"/p\"",
            "tool_rules[0].args[0].pointer",
        );
        bad(
            "[[tool_rules.args]]\npointer = \"p\"\nrequired = true",
            "tool_rules[0].args[0].pointer",
        );
        bad(
            "[[tool_rules.args]]\npointer = \"/a~2\"\nrequired = true",
            "tool_rules[0].args[0].pointer",
        );
        bad(
            "[[tool_rules.args]]\npointer = \"/p\"\nregex = \"(\"",
            "tool_rules[0].args[0].regex",
        );
        bad(
            "[[tool_rules.args]]\npointer = \"/p\"\nmin = 5\nmax = 1",
            "tool_rules[0].args[0].min",
        );
        bad(
            "[[tool_rules.args]]\npointer = \"/p\"\npath_under = [\"srv\"]",
            "tool_rules[0].args[0].path_under",
        );
        bad(
            "[[tool_rules.args]]\npointer = \"/p\"\npath_under = [\"/srv/../x\"]",
            "tool_rules[0].args[0].path_under",
        );
        bad(
            "server = \"nope\"\n[[tool_rules.args]]\npointer = \"/p\"\nrequired = true",
            "tool_rules[0].server",
        );
        bad(
            "[[tool_rules.args]]\npointer = \"/p\"\ntype = \"integer\"\nmax_len = 3",
            "tool_rules[0].args[0].type",
        );
    }

    #[test]
    fn a_number_just_above_the_bound_is_refused_exactly() {
        let r = rules(
            r#"
            [[tool_rules]]
            tool = "read_file"
            [[tool_rules.args]]
            pointer = "/n"
            max = 100
            [[tool_rules.args]]
            pointer = "/f"
            min = 0.1
            [[tool_rules.args]]
            pointer = "/big"
            max = 9007199254740992
            [[tool_rules.args]]
            pointer = "/deep/1/n"
            min = -5
        "#,
        );
        let check = |args: &str| run(&r, "a", "default", args).map(|v| v.check);
        // Each of these is the bound itself as a double.
        assert_eq!(check(r#"{"n":100.0000000000000001}"#), Some("max"));
        assert_eq!(check(r#"{"n":1.000000000000000001e2}"#), Some("max"));
        assert_eq!(check(r#"{"f":0.09999999999999999999}"#), Some("min"));
        assert_eq!(check(r#"{"big":9007199254740993}"#), Some("max"));
        assert_eq!(
            check(r#"{"deep":[0,{"n":-5.0000000000000000001}]}"#),
            Some("min")
        );
        // On or inside the bound, however written.
        for ok in [
            r#"{"n":100}"#,
            r#"{"n":100.0}"#,
            r#"{"n":1e2}"#,
            r#"{"n":99.99999999999999999}"#,
            r#"{"f":0.1}"#,
            r#"{"f":0.10000000000000001}"#,
            r#"{"big":9007199254740992}"#,
            r#"{"deep":[0,{"n":-5.0}]}"#,
        ] {
            assert_eq!(check(ok), None, "{ok}");
        }
    }

    #[test]
    fn an_array_or_scalar_in_the_middle_of_a_pointer_is_not_the_expected_shape() {
        let r = rules(TYPICAL);
        let check = |args: &str| run(&r, "a", "default", args).map(|v| v.check);
        assert_eq!(
            check(r#"{"path":"/srv/data/x","opts":[{"depth":99}]}"#),
            Some("shape")
        );
        assert_eq!(
            check(r#"{"path":"/srv/data/x","opts":"depth=99"}"#),
            Some("shape")
        );
        assert_eq!(check(r#"{"path":"/srv/data/x","opts":null}"#), None);
        assert_eq!(check(r#"{"path":"/srv/data/x","opts":{}}"#), None);
        let v = run(
            &r,
            "a",
            "default",
            r#"{"path":"/srv/data/x","opts":[{"depth":99}]}"#,
        )
        .unwrap();
        assert!(v.why.contains("not the expected shape"), "{}", v.why);
    }
}
