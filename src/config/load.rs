//! Reading a config file: `${VAR}` interpolation, TOML parsing, and errors that point at
//! `file:line:col` with a hint for misspelt keys.

use super::features::{self, Seen};
use super::reference;
use super::schema::FileConfig;
use std::fmt;
use std::path::{Path, PathBuf};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// Why a config file could not be turned into a [`FileConfig`].
#[derive(Debug)]
pub struct ConfigError {
    /// The file concerned, if any.
    pub path: Option<PathBuf>,
    /// 1-based line and column, when known.
    pub position: Option<(usize, usize)>,
    /// What is wrong.
    pub message: String,
    /// A suggestion (e.g. the valid key nearest to an unknown one).
    pub hint: Option<String>,
}

impl ConfigError {
    /// An error about the file as a whole (or about a value with no position).
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            path: None,
            position: None,
            message: message.into(),
            hint: None,
        }
    }

    fn at(mut self, path: &Path) -> Self {
        self.path = Some(path.to_path_buf());
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.path, self.position) {
            (Some(p), Some((l, c))) => write!(f, "{}:{}:{}: ", p.display(), l, c)?,
            (Some(p), None) => write!(f, "{}: ", p.display())?,
            (None, Some((l, c))) => write!(f, "{}:{}: ", l, c)?,
            (None, None) => {}
        }
        f.write_str(&printable(&self.message))?;
        if let Some(h) = &self.hint {
            write!(f, " (hint: {})", printable(h))?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Control characters and bidirectional or invisible formatting characters written as
/// `\u{..}`: a message quoting a hostile file must not drive the operator's terminal.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    let hostile = |c: char| {
        c.is_control()
            || matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
    };
    if !s.chars().any(hostile) {
        return s.into();
    }
    s.chars()
        .map(|c| {
            if hostile(c) {
                format!("\\u{{{:x}}}", c as u32)
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

/// Larger configuration files are refused (`--config /dev/zero` must not eat the memory).
const MAX_CONFIG_BYTES: usize = 16 * 1024 * 1024;

/// Reads and parses `path`, resolving `${VAR}` from the process environment.
pub fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    use std::io::Read as _;
    let cannot =
        |e: std::io::Error| ConfigError::new(format!("cannot read config file: {e}")).at(path);
    // Read at most one byte past the cap: a device or a huge file is refused, not swallowed.
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(cannot)?
        .take(MAX_CONFIG_BYTES as u64 + 1)
        .read_to_string(&mut text)
        .map_err(cannot)?;
    parse_str(&text, &|name| std::env::var(name).ok()).map_err(|e| e.at(path))
}

/// Parses config text; `lookup` resolves `${NAME}` references.
///
/// In order: interpolation, TOML syntax, features this build refuses (before their inner
/// fields are asked for, so `[auth.jwt]` says JWT is not built rather than demanding `mode`),
/// then the typed schema, whose errors are reworded with the key's path and its type in words.
pub fn parse_str(
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<FileConfig, ConfigError> {
    if text.len() > MAX_CONFIG_BYTES {
        return Err(ConfigError::new(format!(
            "the configuration is {} bytes; more than {MAX_CONFIG_BYTES} is refused",
            text.len()
        )));
    }
    let (interpolated, from_env) = interpolate(text, lookup)?;
    let doc = DeTable::parse(&interpolated).map_err(|e| ConfigError {
        path: None,
        position: e.span().map(|s| line_col(&interpolated, s.start)),
        message: e.message().trim().to_string(),
        hint: None,
    })?;
    let root = doc.get_ref();
    if let Some(u) = features::first_unbuilt(&|path| lookup_seen(root, path)) {
        let position = key_span(root, u.path).map(|s| line_col(&interpolated, s.start));
        return Err(ConfigError {
            position,
            ..ConfigError::new(format!("{}: {}", u.path, u.message))
        });
    }
    let mut explicit = std::collections::BTreeSet::new();
    collect_paths(root, "", &mut explicit);
    let mut file = toml::from_str::<FileConfig>(&interpolated)
        .map_err(|e| reword(&e, &interpolated, root, &from_env))?;
    file.explicit = explicit;
    Ok(file)
}

/// A serde error in the user's words: the key's dotted path, and for a value of the wrong
/// type or out of range, the type the reference gives it and the value found.
fn reword(
    e: &toml::de::Error,
    text: &str,
    root: &DeTable<'_>,
    from_env: &[std::ops::Range<usize>],
) -> ConfigError {
    let span = e.span();
    let position = span.clone().map(|s| line_col(text, s.start));
    let raw = e.message().trim().to_string();
    let path = span
        .as_ref()
        .map(|s| path_at(root, s.start))
        .unwrap_or_default();
    let shown = display_path(&path);
    let doc_path = doc_path(&path);
    let hint = unknown_key_hint(&raw);
    let mut message = raw.clone();
    let type_problem = raw.starts_with("invalid type")
        || raw.starts_with("invalid value")
        || raw.starts_with("unknown variant")
        || raw.starts_with("invalid length");
    let mut extra_hint = None;
    if type_problem && let Some(key) = reference::key(&doc_path) {
        let found = span
            .as_ref()
            .and_then(|s| text.get(s.clone()))
            .map(|v| v.trim().to_string())
            .unwrap_or_default();
        // A value that came from the environment may be a secret: never echoed.
        let secret = span
            .as_ref()
            .is_some_and(|s| from_env.iter().any(|e| e.start < s.end && s.start < e.end));
        let shown_value = if secret {
            "a value from the environment".to_string()
        } else {
            clip(&found)
        };
        message = format!("{shown}: expected {}, found {shown_value}", key.type_words);
        let quoted_number = found
            .strip_prefix('"')
            .and_then(|f| f.strip_suffix('"'))
            .is_some_and(|inner| inner.parse::<f64>().is_ok());
        if quoted_number && !key.type_words.contains("string") {
            extra_hint = Some(format!(
                "write numbers without quotes; to take one from the environment write `{} = ${{NAME}}` (unquoted)",
                key.name
            ));
        }
    } else if let Some(field) = raw
        .strip_prefix("missing field `")
        .and_then(|r| r.strip_suffix('`'))
    {
        let where_ = if shown.is_empty() {
            "the file".to_string()
        } else {
            format!("[{shown}]")
        };
        let about = reference::key(&format!("{doc_path}.{field}"))
            .map(|k| format!(" ({}: {})", k.type_words, k.meaning))
            .unwrap_or_default();
        message = format!("{where_} needs `{field}`{about}");
    } else if raw.starts_with("unknown field") {
        // The span is the unknown key itself: name the table it was written in.
        let table = display_path(&path[..path.len().saturating_sub(1)]);
        if !table.is_empty() {
            message = format!("{raw} in [{table}]");
        }
    } else if !shown.is_empty() {
        message = format!("{shown}: {raw}");
    }
    ConfigError {
        path: None,
        position,
        message,
        hint: extra_hint.or(hint),
    }
}

/// At most 60 characters of a value, for an error message.
fn clip(value: &str) -> String {
    let mut out: String = value.chars().take(60).collect();
    if value.chars().count() > 60 {
        out.push('…');
    }
    format!("`{out}`")
}

/// One step of a path into the document.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Key(String),
    Index(usize),
}

/// The deepest key or array element whose span holds byte `offset`.
fn path_at(table: &DeTable<'_>, offset: usize) -> Vec<Step> {
    let mut path = Vec::new();
    descend_table(table, offset, &mut path);
    path
}

fn descend_table(table: &DeTable<'_>, offset: usize, path: &mut Vec<Step>) -> bool {
    for (k, v) in table.iter() {
        let in_key = k.span().contains(&offset);
        let in_value = v.span().contains(&offset);
        if in_key || in_value || contains_deep(v.get_ref(), offset) {
            path.push(Step::Key(k.get_ref().to_string()));
            if !in_key {
                descend_value(v.get_ref(), offset, path);
            }
            return true;
        }
    }
    false
}

fn descend_value(v: &DeValue<'_>, offset: usize, path: &mut Vec<Step>) {
    match v {
        DeValue::Table(t) => {
            descend_table(t, offset, path);
        }
        DeValue::Array(a) => {
            for (i, item) in a.iter().enumerate() {
                if item.span().contains(&offset) || contains_deep(item.get_ref(), offset) {
                    path.push(Step::Index(i));
                    descend_value(item.get_ref(), offset, path);
                    return;
                }
            }
        }
        _ => {}
    }
}

/// Whether any key or value inside `v` spans `offset` (a `[table]` written with a header has
/// no span of its own that covers its keys).
fn contains_deep(v: &DeValue<'_>, offset: usize) -> bool {
    match v {
        DeValue::Table(t) => t.iter().any(|(k, v)| {
            k.span().contains(&offset)
                || v.span().contains(&offset)
                || contains_deep(v.get_ref(), offset)
        }),
        DeValue::Array(a) => a
            .iter()
            .any(|i| i.span().contains(&offset) || contains_deep(i.get_ref(), offset)),
        _ => false,
    }
}

/// `auth.api_keys[1].rate_limit`.
fn display_path(path: &[Step]) -> String {
    let mut out = String::new();
    for step in path {
        match step {
            Step::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Step::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// `auth.api_keys.rate_limit`: the reference's path (no indices).
fn doc_path(path: &[Step]) -> String {
    path.iter()
        .filter_map(|s| match s {
            Step::Key(k) => Some(k.as_str()),
            Step::Index(_) => None,
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// The value at dotted `path` (tables only; arrays of tables are not descended).
fn value_at<'a, 'i>(root: &'a DeTable<'i>, path: &str) -> Option<&'a Spanned<DeValue<'i>>> {
    let mut table = root;
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        let (_, v) = table.iter().find(|(k, _)| k.get_ref().as_ref() == part)?;
        if parts.peek().is_none() {
            return Some(v);
        }
        table = v.get_ref().as_table()?;
    }
    None
}

/// The span of the key at dotted `path`.
fn key_span(root: &DeTable<'_>, path: &str) -> Option<std::ops::Range<usize>> {
    let (parent, last) = match path.rsplit_once('.') {
        Some((p, l)) => (value_at(root, p)?.get_ref().as_table()?, l),
        None => (root, path),
    };
    parent
        .iter()
        .find(|(k, _)| k.get_ref().as_ref() == last)
        .map(|(k, _)| k.span())
}

fn lookup_seen<'a>(root: &'a DeTable<'_>, path: &str) -> Option<Seen<'a>> {
    Some(match value_at(root, path)?.get_ref() {
        DeValue::String(s) => Seen::Str(s.as_ref()),
        DeValue::Boolean(b) => Seen::Bool(*b),
        DeValue::Array(a) => Seen::Array(a.len()),
        _ => Seen::Other,
    })
}

/// Every dotted key path the document sets; elements of arrays of tables contribute their
/// keys without an index (`auth.api_keys.rate_limit`).
fn collect_paths(table: &DeTable<'_>, prefix: &str, out: &mut std::collections::BTreeSet<String>) {
    for (k, v) in table.iter() {
        let path = if prefix.is_empty() {
            k.get_ref().to_string()
        } else {
            format!("{prefix}.{}", k.get_ref())
        };
        match v.get_ref() {
            DeValue::Table(t) => collect_paths(t, &path, out),
            DeValue::Array(a) => {
                for item in a.iter() {
                    if let DeValue::Table(t) = item.get_ref() {
                        collect_paths(t, &path, out);
                    }
                }
            }
            _ => {}
        }
        out.insert(path);
    }
}

/// 1-based line and column of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Replaces `${NAME}` inside TOML string literals (never in comments or bare syntax), escaping
/// the value for the kind of string it lands in, so a secret holding a quote cannot change the
/// document's structure. A missing variable is an error naming its line.
/// Returns the text and the byte ranges of it that came from the environment (never echoed in
/// errors). Keys (`"${X}" = 1`, `[a."${X}"]`) are not interpolated: the environment supplies
/// values, never the document's structure.
fn interpolate(
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<(String, Vec<std::ops::Range<usize>>), ConfigError> {
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        Bare,
        Comment,
        Basic,
        MultiBasic,
        Literal,
        MultiLiteral,
    }
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut from_env = Vec::new();
    let mut state = State::Bare;
    // The single-line string being copied is a key, not a value.
    let mut in_key = false;
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        let c = bytes[i];
        match state {
            State::Bare if rest.starts_with("${") => {
                let (len, value) = bare_reference(text, i, lookup)?;
                from_env.push(out.len()..out.len() + value.len());
                out.push_str(&value);
                i += len;
                continue;
            }
            State::Bare => {
                if rest.starts_with("\"\"\"") {
                    state = State::MultiBasic;
                    out.push_str("\"\"\"");
                    i += 3;
                    continue;
                } else if rest.starts_with("'''") {
                    state = State::MultiLiteral;
                    out.push_str("'''");
                    i += 3;
                    continue;
                } else if c == b'"' {
                    state = State::Basic;
                    in_key = string_is_key(text, i);
                } else if c == b'\'' {
                    state = State::Literal;
                    in_key = string_is_key(text, i);
                } else if c == b'#' {
                    state = State::Comment;
                }
            }
            State::Comment => {
                if c == b'\n' {
                    state = State::Bare;
                }
            }
            State::Basic | State::MultiBasic => {
                if c == b'\\' && i + 1 < bytes.len() {
                    // Copy the backslash and the whole character it escapes (which may be
                    // multi-byte: TOML will reject the escape, but we must not split it).
                    let escaped_len = text[i + 1..].chars().next().map_or(1, char::len_utf8);
                    out.push_str(&text[i..i + 1 + escaped_len]);
                    i += 1 + escaped_len;
                    continue;
                }
                if state == State::Basic && c == b'"' {
                    state = State::Bare;
                } else if state == State::MultiBasic && rest.starts_with("\"\"\"") {
                    state = State::Bare;
                    out.push_str("\"\"\"");
                    i += 3;
                    continue;
                }
            }
            State::Literal => {
                if c == b'\'' {
                    state = State::Bare;
                }
            }
            State::MultiLiteral => {
                if rest.starts_with("'''") {
                    state = State::Bare;
                    out.push_str("'''");
                    i += 3;
                    continue;
                }
            }
        }
        let in_string = matches!(
            state,
            State::Basic | State::MultiBasic | State::Literal | State::MultiLiteral
        );
        if in_string && !in_key && rest.starts_with("${") {
            let Some(end) = rest.find('}') else {
                return Err(ConfigError {
                    position: Some(line_col(text, i)),
                    ..ConfigError::new("unterminated ${...} reference")
                });
            };
            let name = &rest[2..end];
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(ConfigError {
                    position: Some(line_col(text, i)),
                    ..ConfigError::new(format!("invalid environment variable name `{name}`"))
                });
            }
            let Some(value) = lookup(name) else {
                return Err(ConfigError {
                    position: Some(line_col(text, i)),
                    ..ConfigError::new(format!("environment variable `{name}` is not set"))
                });
            };
            let start = out.len();
            match state {
                State::Basic | State::MultiBasic => push_toml_basic(&mut out, &value),
                _ => {
                    if value.contains('\'') || value.contains('\n') {
                        return Err(ConfigError {
                            position: Some(line_col(text, i)),
                            ..ConfigError::new(format!(
                                "environment variable `{name}` holds a quote or newline, which a \
                                 literal ('...') string cannot carry; use a \"...\" string"
                            ))
                        });
                    }
                    out.push_str(&value);
                }
            }
            from_env.push(start..out.len());
            i += end + 1;
            continue;
        }
        // Copy one whole UTF-8 character.
        let ch_len = rest.chars().next().map_or(1, char::len_utf8);
        out.push_str(&rest[..ch_len]);
        i += ch_len;
    }
    Ok((out, from_env))
}

/// Appends `s` escaped for the inside of a TOML basic string: quotes, backslashes and control
/// characters escaped, and `$` written as `\u0024` so that a `${NAME}` in the text stays text
/// (the loader expands references in the raw file, before TOML unescapes it). Used for
/// environment values substituted into the file and for every string `init` and `keygen`
/// write.
pub fn push_toml_basic(out: &mut String, s: &str) {
    use std::fmt::Write as _;
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '$' => out.push_str("\\u0024"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
}

/// Whether the single-line string opening at byte `at` is a key: followed by `=` or `.` (a
/// key or dotted key), or by `]` on a line that is a table header.
fn string_is_key(text: &str, at: usize) -> bool {
    let quote = text.as_bytes()[at];
    let bytes = text.as_bytes();
    let mut i = at + 1;
    while i < bytes.len() && bytes[i] != quote && bytes[i] != b'\n' {
        if quote == b'"' && bytes[i] == b'\\' {
            i += 1;
        }
        i += 1;
    }
    let after = text
        .get(i + 1..)
        .unwrap_or_default()
        .trim_start_matches([' ', '\t']);
    let line_start = text[..at].rfind('\n').map_or(0, |n| n + 1);
    let header = text[line_start..at].trim_start().starts_with('[');
    after.starts_with('=') || after.starts_with('.') || (header && after.starts_with(']'))
}

/// An unquoted `${NAME}` at byte `at`: the variable must hold a TOML integer, float or
/// boolean, and nothing else (so it cannot add keys or tables). Returns the reference's length
/// and the value to put in its place. The value is never echoed in errors: it may be a secret
/// written without quotes by mistake.
fn bare_reference(
    text: &str,
    at: usize,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<(usize, String), ConfigError> {
    let rest = &text[at..];
    let err = |message: String| ConfigError {
        position: Some(line_col(text, at)),
        ..ConfigError::new(message)
    };
    let Some(end) = rest.find('}').filter(|e| !rest[..*e].contains('\n')) else {
        return Err(err("unterminated ${...} reference".into()));
    };
    let name = &rest[2..end];
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(err(format!("invalid environment variable name `{name}`")));
    }
    let Some(value) = lookup(name) else {
        return Err(err(format!("environment variable `{name}` is not set")));
    };
    let value = value.trim();
    let token = !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'+' | b'-'));
    let scalar = token
        && DeValue::parse(value).is_ok_and(|v| {
            matches!(
                v.get_ref(),
                DeValue::Integer(_) | DeValue::Float(_) | DeValue::Boolean(_)
            )
        });
    if !scalar {
        return Err(err(format!(
            "environment variable `{name}` is not a number or boolean; an unquoted ${{{name}}} is \
             for numbers and booleans (write \"${{{name}}}\" for a string)"
        )));
    }
    Ok((end + 1, value.to_string()))
}

/// For serde's "unknown field `x`, expected one of `a`, `b`" messages: the nearest valid key.
fn unknown_key_hint(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    let (unknown, expected) = rest.split_once('`')?;
    let candidates: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    let best = candidates
        .iter()
        .map(|c| (edit_distance(unknown, c), *c))
        .min()?;
    if best.0 <= (unknown.len() / 2).max(2) {
        Some(format!("did you mean `{}`?", best.1))
    } else {
        Some(format!("valid keys here: {}", candidates.join(", ")))
    }
}

/// Levenshtein distance, small inputs only (config keys).
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "SECRET" => Some("s3\"cr\\et".into()),
            "PORT_HOST" => Some("127.0.0.2".into()),
            _ => None,
        }
    }

    #[test]
    fn interpolation_escapes_values_inside_basic_strings() {
        let cfg = parse_str(
            "[server]\nhost = \"${PORT_HOST}\"\n[upstream.headers]\nX-Key = \"${SECRET}\"\n",
            &env,
        )
        .unwrap();
        assert_eq!(cfg.server.host, "127.0.0.2");
        assert_eq!(cfg.upstream.headers["X-Key"], "s3\"cr\\et");
    }

    #[test]
    fn backslash_before_a_multibyte_character_is_an_error_not_a_panic() {
        let err = parse_str("[upstream]\ncommand = \"caf\\é\"\n", &env).unwrap_err();
        assert_eq!(err.position.map(|p| p.0), Some(2));
    }

    #[test]
    fn references_in_comments_are_left_alone() {
        let cfg = parse_str("# uses ${NOT_SET}\n[server]\nport = 1\n", &env).unwrap();
        assert_eq!(cfg.server.port, 1);
    }

    #[test]
    fn missing_variable_is_an_error_with_its_position() {
        let err = parse_str("[server]\nhost = \"${NOPE}\"\n", &env).unwrap_err();
        assert_eq!(err.position, Some((2, 9)));
        assert!(err.message.contains("NOPE"));
    }

    #[test]
    fn unknown_key_reports_line_col_and_nearest_key() {
        let err = parse_str("[server]\nport = 1\nmax_body_byte = 3\n", &env).unwrap_err();
        assert_eq!(err.position.map(|p| p.0), Some(3));
        assert_eq!(err.hint.as_deref(), Some("did you mean `max_body_bytes`?"));
    }

    fn env_numbers(name: &str) -> Option<String> {
        match name {
            "PORT" => Some("8123".into()),
            "RATE" => Some(" 250 ".into()),
            "ON" => Some("false".into()),
            "WORD" => Some("fast".into()),
            "SNEAKY" => Some("1\n[auth.jwt]\nmode = \"simple\"".into()),
            "SNEAKY2" => Some("1 # comment".into()),
            _ => None,
        }
    }

    #[test]
    fn unquoted_references_take_numbers_and_booleans() {
        let cfg = parse_str(
            "[server]\nport = ${PORT}\n[rate_limit]\nrequests_per_second = ${RATE}\nenabled = ${ON}\n",
            &env_numbers,
        )
        .unwrap();
        assert_eq!(cfg.server.port, 8123);
        assert_eq!(cfg.rate_limit.requests_per_second, 250);
        assert!(!cfg.rate_limit.enabled);
    }

    #[test]
    fn unquoted_references_refuse_anything_but_a_scalar_without_echoing_it() {
        for var in ["WORD", "SNEAKY", "SNEAKY2"] {
            let err =
                parse_str(&format!("[server]\nport = ${{{var}}}\n"), &env_numbers).unwrap_err();
            assert!(
                err.message.contains("is not a number or boolean"),
                "{var}: {err}"
            );
            assert!(
                !err.message.contains("jwt") && !err.message.contains("fast"),
                "{err}"
            );
            assert_eq!(err.position, Some((2, 8)));
        }
        let err = parse_str("[server]\nport = ${MISSING}\n", &env_numbers).unwrap_err();
        assert!(err.message.contains("`MISSING` is not set"), "{err}");
    }

    #[test]
    fn type_errors_speak_the_users_words() {
        let err = parse_str("[server]\nport = 70000\n", &env).unwrap_err();
        assert_eq!(
            err.message,
            "server.port: expected port number 1–65535, or 0 for any free port, found `70000`"
        );
        assert_eq!(err.position, Some((2, 8)));
        let err = parse_str("[server]\nport = \"3000\"\n", &env).unwrap_err();
        assert!(
            err.message.starts_with("server.port: expected port number"),
            "{err}"
        );
        assert!(
            err.hint.as_deref().unwrap().contains("port = ${NAME}"),
            "{err}"
        );
        let err = parse_str("[server]\nio = \"fast\"\n", &env).unwrap_err();
        assert_eq!(
            err.message,
            "server.io: expected one of `auto`, `io_uring`, `epoll`, found `\"fast\"`"
        );
        let err = parse_str("[server]\nstrict_tool_names = \"yes\"\n", &env).unwrap_err();
        assert!(err.message.contains("expected `true` or `false`"), "{err}");
        let err = parse_str(
            "[[auth.api_keys]]\nid = \"a\"\nkey_hash = \"x\"\n[[auth.api_keys]]\nid = \"b\"\nkey_hash = \"y\"\nrate_limit = -1\n",
            &env,
        )
        .unwrap_err();
        assert!(
            err.message
                .starts_with("auth.api_keys[1].rate_limit: expected requests per second"),
            "{err}"
        );
        let err = parse_str("[upstream]\ntimeout_secs = 1.5\n", &env).unwrap_err();
        assert!(
            err.message
                .starts_with("upstream.timeout_secs: expected seconds"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_field_names_its_table_and_what_it_is() {
        let err = parse_str("[[auth.api_keys]]\nid = \"a\"\n", &env).unwrap_err();
        assert!(
            err.message
                .starts_with("[auth.api_keys[0]] needs `key_hash`"),
            "{err}"
        );
        assert!(err.message.contains("SHA-256"), "{err}");
    }

    #[test]
    fn the_file_records_which_keys_it_sets() {
        let cfg = parse_str(
            "[server]\nport = 1\n[[auth.api_keys]]\nid = \"a\"\nkey_hash = \"x\"\nrate_limit = 3\n",
            &env,
        )
        .unwrap();
        assert!(cfg.sets("server.port"));
        assert!(cfg.sets("auth.api_keys.rate_limit"));
        assert!(!cfg.sets("server.host"));
    }

    #[test]
    fn keys_are_never_interpolated() {
        let env = |_: &str| Some("injected".to_string());
        // A quoted key holding a reference stays literal (and is then an unknown key).
        let err = parse_str("[server]\n\"${K}\" = 1\n", &env).unwrap_err();
        assert!(err.message.contains("${K}"), "{err}");
        assert!(!err.message.contains("injected"), "{err}");
        let err = parse_str("[\"${K}\"]\nx = 1\n", &env).unwrap_err();
        assert!(!err.message.contains("injected"), "{err}");
        // Values still are, also in arrays and inline tables.
        let cfg = parse_str(
            "[server]\nallowed_origins = [\"${K}\"]\n[upstream.headers]\n\"X-A\" = \"${K}\"\n",
            &env,
        )
        .unwrap();
        assert_eq!(cfg.server.allowed_origins, ["injected"]);
        assert_eq!(cfg.upstream.headers["X-A"], "injected");
    }

    #[test]
    fn a_wrong_value_from_the_environment_is_not_echoed() {
        let env = |_: &str| Some("S3cr3t-value".to_string());
        let err = parse_str("[server]\nio = \"${IO}\"\n", &env).unwrap_err();
        assert!(
            err.message.contains("found a value from the environment"),
            "{err}"
        );
        assert!(!err.to_string().contains("S3cr3t"), "{err}");
    }

    #[test]
    fn hostile_characters_in_messages_are_made_printable() {
        let err = parse_str("[server]\n\"p\\u001b[31m\" = 1\n", &env).unwrap_err();
        let shown = err.to_string();
        assert!(!shown.contains('\u{1b}'), "{shown:?}");
        assert!(shown.contains("\\u{1b}"), "{shown:?}");
    }

    #[test]
    fn an_oversized_file_is_refused() {
        let big = format!("# {}\n", "x".repeat(MAX_CONFIG_BYTES));
        assert!(
            parse_str(&big, &env)
                .unwrap_err()
                .message
                .contains("is refused")
        );
    }
}
