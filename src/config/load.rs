//! Reading a config file: `${VAR}` interpolation, TOML parsing, and errors that point at
//! `file:line:col` with a hint for misspelt keys.

use super::schema::FileConfig;
use std::fmt;
use std::path::{Path, PathBuf};

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
        f.write_str(&self.message)?;
        if let Some(h) = &self.hint {
            write!(f, " (hint: {h})")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Reads and parses `path`, resolving `${VAR}` from the process environment.
pub fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(format!("cannot read config file: {e}")).at(path))?;
    parse_str(&text, &|name| std::env::var(name).ok()).map_err(|e| e.at(path))
}

/// Parses config text; `lookup` resolves `${NAME}` references.
pub fn parse_str(
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<FileConfig, ConfigError> {
    let interpolated = interpolate(text, lookup)?;
    toml::from_str::<FileConfig>(&interpolated).map_err(|e| {
        let position = e.span().map(|s| line_col(&interpolated, s.start));
        let message = e.message().trim().to_string();
        let hint = unknown_key_hint(&message);
        ConfigError {
            path: None,
            position,
            message,
            hint,
        }
    })
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
fn interpolate(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, ConfigError> {
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
    let mut state = State::Bare;
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        let c = bytes[i];
        match state {
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
                } else if c == b'\'' {
                    state = State::Literal;
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
        if in_string && rest.starts_with("${") {
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
            match state {
                State::Basic | State::MultiBasic => {
                    for ch in value.chars() {
                        match ch {
                            '"' => out.push_str("\\\""),
                            '\\' => out.push_str("\\\\"),
                            '\n' => out.push_str("\\n"),
                            '\r' => out.push_str("\\r"),
                            '\t' => out.push_str("\\t"),
                            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                                out.push_str(&format!("\\u{:04X}", c as u32))
                            }
                            c => out.push(c),
                        }
                    }
                }
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
            i += end + 1;
            continue;
        }
        // Copy one whole UTF-8 character.
        let ch_len = rest.chars().next().map_or(1, char::len_utf8);
        out.push_str(&rest[..ch_len]);
        i += ch_len;
    }
    Ok(out)
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
            "[server]\nhost = \"${PORT_HOST}\"\n[auth.jwt]\nmode = \"simple\"\nsecret = \"${SECRET}\"\n",
            &env,
        )
        .unwrap();
        assert_eq!(cfg.server.host, "127.0.0.2");
        assert_eq!(cfg.auth.jwt.unwrap().secret.unwrap(), "s3\"cr\\et");
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
}
