//! The configuration reference, derived from the schema the loader uses: every section and
//! key with its type in words, allowed values, default, whether a reload can change it, the
//! release that added it, and its meaning. `mcp-guard config-reference` prints it as Markdown
//! (`docs/configuration.md` is that output, and a test fails when the committed file is
//! stale); the loader reads the same key facts to word its type errors.

use super::features;
use super::schema::{FIRST_RELEASE, FileConfig};
use serde_json::{Map, Value};
use std::fmt::Write as _;

/// Whether a running gateway picks up a change of a key on reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// Applies to requests that start after the reload.
    Live,
    /// A reload that changes it is refused (the running configuration keeps serving).
    Restart,
}

/// One key of one section.
#[derive(Debug, Clone)]
pub struct KeyDoc {
    /// Dotted path without array indices (`auth.api_keys.id`).
    pub path: String,
    /// The key's own name.
    pub name: String,
    /// The type in words, allowed values included.
    pub type_words: String,
    /// The default as TOML, `None` when the key has none.
    pub default: Option<String>,
    /// The section cannot be written without it.
    pub required: bool,
    /// Reload behaviour.
    pub reload: Reload,
    /// Release that added the key.
    pub since: String,
    /// Spelled as in the original mcp-guard format.
    pub compat: bool,
    /// What it does.
    pub meaning: String,
}

/// One TOML table (or array of tables).
#[derive(Debug, Clone)]
pub struct SectionDoc {
    /// Dotted path (`server.tls`).
    pub path: String,
    /// `[[...]]`: may appear many times.
    pub array: bool,
    /// Spelled as in the original mcp-guard format.
    pub compat: bool,
    /// Prose about the section.
    pub description: String,
    /// Its plain keys, in declaration order.
    pub keys: Vec<KeyDoc>,
}

/// Every section of the schema, parents before children, in declaration order.
pub fn sections() -> Vec<SectionDoc> {
    let schema =
        serde_json::to_value(schemars::schema_for!(FileConfig)).expect("a JSON schema serialises");
    let defs = schema
        .get("$defs")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let mut out = Vec::new();
    let walker = Walker { defs: &defs };
    for (name, prop) in properties(&schema, "FileConfig") {
        walker.section(name, prop, Reload::Live, &mut out);
    }
    out
}

/// The facts about the key at dotted `path` (array indices removed), if it is a key.
pub fn key(path: &str) -> Option<KeyDoc> {
    sections()
        .into_iter()
        .flat_map(|s| s.keys)
        .find(|k| k.path == path)
}

/// The first key a reload cannot change whose value differs between two files (each as the
/// JSON form of a parsed `FileConfig`). Inside an array of tables the whole array is compared.
pub fn restart_only_change(old: &Value, new: &Value) -> Option<String> {
    for section in sections() {
        for key in section.keys.iter().filter(|k| k.reload == Reload::Restart) {
            let (at, a) = value_at(old, &key.path);
            let (_, b) = value_at(new, &key.path);
            if a != b {
                return Some(at);
            }
        }
    }
    None
}

/// The value at dotted `path`, stopping at the first array (returned whole, with its path).
fn value_at<'v>(root: &'v Value, path: &str) -> (String, Option<&'v Value>) {
    let mut v = root;
    let mut walked = Vec::new();
    for part in path.split('.') {
        if v.is_array() {
            break;
        }
        walked.push(part);
        match v.get(part) {
            Some(next) => v = next,
            None => return (walked.join("."), None),
        }
    }
    (walked.join("."), Some(v))
}

/// Whether `path` names a section.
pub fn is_section(path: &str) -> bool {
    sections().iter().any(|s| s.path == path)
}

struct Walker<'a> {
    defs: &'a Map<String, Value>,
}

impl Walker<'_> {
    /// Follows a `$ref`, and an `anyOf [X, null]` (an optional table), to the definition and
    /// its name.
    fn resolve<'v>(&'v self, v: &'v Value) -> (&'v str, &'v Value) {
        if let Some(r) = v.get("$ref").and_then(Value::as_str) {
            let name = r.rsplit('/').next().unwrap_or_default();
            return match self.defs.get(name) {
                Some(def) => (name, def),
                None => ("", v),
            };
        }
        if let Some(any) = v.get("anyOf").and_then(Value::as_array)
            && let Some(inner) = any
                .iter()
                .find(|x| x.get("type").and_then(Value::as_str) != Some("null"))
        {
            return self.resolve(inner);
        }
        ("", v)
    }

    /// The table a property holds, if it holds one: (type name, definition, is an array of
    /// tables).
    fn table<'v>(&'v self, prop: &'v Value) -> Option<(&'v str, &'v Value, bool)> {
        let (name, target) = self.resolve(prop);
        if target.get("properties").is_some() {
            return Some((name, target, false));
        }
        let is_array = target.get("type").is_some_and(|t| {
            t == "array" || t.as_array().is_some_and(|a| a.contains(&"array".into()))
        });
        if is_array {
            let (name, items) = self.resolve(target.get("items")?);
            if items.get("properties").is_some() {
                return Some((name, items, true));
            }
        }
        None
    }

    fn section(&self, path: &str, prop: &Value, inherited: Reload, out: &mut Vec<SectionDoc>) {
        let Some((type_name, table, array)) = self.table(prop) else {
            return;
        };
        let reload = reload_of(prop)
            .or_else(|| reload_of(table))
            .unwrap_or(inherited);
        let (compat, description) = split_compat(
            table
                .get("description")
                .or_else(|| prop.get("description"))
                .and_then(Value::as_str)
                .unwrap_or_default(),
        );
        let required: Vec<&str> = table
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let prop_compat = split_compat(
            prop.get("description")
                .and_then(Value::as_str)
                .unwrap_or_default(),
        )
        .0;
        let index = out.len();
        out.push(SectionDoc {
            path: path.to_string(),
            array,
            compat: compat || prop_compat,
            description,
            keys: Vec::new(),
        });
        let mut children = Vec::new();
        for (name, field) in properties(table, type_name) {
            let child_path = format!("{path}.{name}");
            if self.table(field).is_some() {
                children.push((child_path, field));
                continue;
            }
            let doc = self.key(
                &child_path,
                name,
                field,
                required.contains(&name.as_str()),
                reload,
            );
            out[index].keys.push(doc);
        }
        for (child_path, field) in children {
            self.section(&child_path, field, reload, out);
        }
    }

    fn key(
        &self,
        path: &str,
        name: &str,
        field: &Value,
        required: bool,
        section: Reload,
    ) -> KeyDoc {
        let (compat, meaning) = split_compat(
            field
                .get("description")
                .and_then(Value::as_str)
                .unwrap_or_default(),
        );
        let type_words = field
            .get("x-type")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| self.type_words(field));
        let default = match field.get("default") {
            Some(Value::Null) | None => None,
            Some(v) => Some(toml_literal(v)),
        };
        KeyDoc {
            path: path.to_string(),
            name: name.to_string(),
            type_words,
            default,
            required,
            reload: reload_of(field).unwrap_or(section),
            since: field
                .get("x-since")
                .and_then(Value::as_str)
                .unwrap_or(FIRST_RELEASE)
                .to_string(),
            compat,
            meaning,
        }
    }

    /// The type in words, from the JSON schema when no `x-type` says it.
    fn type_words(&self, field: &Value) -> String {
        let (_, target) = self.resolve(field);
        if let Some(values) = enum_values(target) {
            let list: Vec<String> = values.iter().map(|v| format!("`{v}`")).collect();
            return format!("one of {}", list.join(", "));
        }
        let types: Vec<&str> = match target.get("type") {
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        match types.iter().find(|t| **t != "null").copied() {
            Some("string") => "string".into(),
            Some("boolean") => "`true` or `false`".into(),
            Some("integer") => match target.get("format").and_then(Value::as_str) {
                Some("uint16") => "whole number 0–65535".into(),
                _ => "whole number".into(),
            },
            Some("number") => "number".into(),
            Some("array") => match target.get("items") {
                Some(items) => format!("list of {}", plural(&self.type_words(items))),
                None => "list".into(),
            },
            Some("object") => match target.get("additionalProperties") {
                Some(v) if v.is_object() => format!("table of {}", plural(&self.type_words(v))),
                _ => "table".into(),
            },
            _ => "value".into(),
        }
    }
}

/// The allowed values of a string enum (`enum` or `oneOf` of `const`s), in declaration order.
fn enum_values(v: &Value) -> Option<Vec<String>> {
    if let Some(e) = v.get("enum").and_then(Value::as_array) {
        return Some(
            e.iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect(),
        );
    }
    let one_of = v.get("oneOf").and_then(Value::as_array)?;
    let mut out = Vec::new();
    for variant in one_of {
        if let Some(c) = variant.get("const").and_then(Value::as_str) {
            out.push(c.to_string());
        } else if let Some(e) = variant.get("enum").and_then(Value::as_array) {
            out.extend(e.iter().filter_map(Value::as_str).map(String::from));
        } else {
            return None;
        }
    }
    Some(out)
}

fn plural(words: &str) -> String {
    match words {
        "string" => "strings".into(),
        "whole number" => "whole numbers".into(),
        "`true` or `false`" => "booleans".into(),
        w if w.starts_with("list of") => format!("lists ({w})"),
        w => w.to_string(),
    }
}

/// A table's properties in declaration order (JSON schema objects are sorted by name).
fn properties<'v>(v: &'v Value, type_name: &str) -> Vec<(&'v String, &'v Value)> {
    let Some(props) = v.get("properties").and_then(Value::as_object) else {
        return Vec::new();
    };
    let mut list: Vec<(&String, &Value)> = props.iter().collect();
    if let Some(order) = declared_fields(type_name) {
        list.sort_by_key(|(name, _)| order.iter().position(|f| f == name).unwrap_or(usize::MAX));
    }
    list
}

/// The field names of a schema struct in declaration order, as serde's derive lists them
/// (the list it hands a deserializer's `deserialize_struct`).
fn declared_fields(type_name: &str) -> Option<&'static [&'static str]> {
    use super::schema::*;
    fn of<T: serde::de::DeserializeOwned>() -> Option<&'static [&'static str]> {
        match T::deserialize(FieldNames) {
            Err(NamesOf(fields)) => fields,
            Ok(_) => None,
        }
    }
    match type_name {
        "FileConfig" => of::<FileConfig>(),
        "ServerSection" => of::<ServerSection>(),
        "TlsSection" => of::<TlsSection>(),
        "AdminSection" => of::<AdminSection>(),
        "UpstreamSection" => of::<UpstreamSection>(),
        "ServerRoute" => of::<ServerRoute>(),
        "AuthSection" => of::<AuthSection>(),
        "ApiKeyEntry" => of::<ApiKeyEntry>(),
        "JwtSection" => of::<JwtSection>(),
        "OauthSection" => of::<OauthSection>(),
        "MtlsSection" => of::<MtlsSection>(),
        "RateLimitSection" => of::<RateLimitSection>(),
        "AuditSection" => of::<AuditSection>(),
        "TracingSection" => of::<TracingSection>(),
        "ApprovalSection" => of::<ApprovalSection>(),
        "PinningSection" => of::<PinningSection>(),
        "RedactionSection" => of::<RedactionSection>(),
        "ToolRuleSection" => of::<ToolRuleSection>(),
        "ArgRuleSection" => of::<ArgRuleSection>(),
        _ => None,
    }
}

/// A deserializer that only asks a struct for its field list, then stops.
struct FieldNames;

/// Carries the field list out through the error channel.
#[derive(Debug)]
struct NamesOf(Option<&'static [&'static str]>);

impl std::fmt::Display for NamesOf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("field list")
    }
}

impl std::error::Error for NamesOf {}

impl serde::de::Error for NamesOf {
    fn custom<T: std::fmt::Display>(_: T) -> Self {
        NamesOf(None)
    }
}

impl<'de> serde::Deserializer<'de> for FieldNames {
    type Error = NamesOf;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, NamesOf> {
        Err(NamesOf(None))
    }

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, NamesOf> {
        Err(NamesOf(Some(fields)))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

fn reload_of(v: &Value) -> Option<Reload> {
    match v.get("x-reload").and_then(Value::as_str)? {
        "restart" => Some(Reload::Restart),
        _ => Some(Reload::Live),
    }
}

/// Doc comments mark keys of the original format with a leading `(compat)`.
fn split_compat(description: &str) -> (bool, String) {
    let d = description.trim();
    match d.strip_prefix("(compat)") {
        Some(rest) => (true, rest.trim().to_string()),
        None => (false, d.to_string()),
    }
}

/// A JSON default as it would be written in TOML.
fn toml_literal(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Array(a) if a.is_empty() => "[]".into(),
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(toml_literal).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(o) if o.is_empty() => "{}".into(),
        Value::Object(o) => format!(
            "{{ {} }}",
            o.iter()
                .map(|(k, v)| format!("{k:?} = {}", toml_literal(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_string(),
    }
}

/// Table cells hold one line: doc-comment line breaks become spaces, pipes are escaped.
fn cell(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

const INTRO: &str = "\
mcp-guard reads one TOML file: `mcp-guard --config FILE`. This reference is generated from the
schema the loader itself uses (`mcp-guard config-reference` prints it; a test fails when this
file is stale), so every key the gateway accepts is here, and nothing else.

- **Checking a file.** `mcp-guard validate --config FILE` loads it exactly as start-up does and
  checks the world it points at (the stdio command resolves and is executable, `cwd` is a
  directory, the audit file's directory and the SIEM spool directory are writable, the ports
  are free). Errors name `file:line:col` and the key; an unknown key gets the nearest valid one
  as a hint; a value of the wrong type is described in the words of the *type* column below.
- **Compatibility.** Keys marked *(compat)* are spelled as in the original mcp-guard format, so
  existing files load unchanged.
- **Environment.** `${NAME}` inside a string is replaced by the variable's value (escaped, so a
  secret holding quotes cannot change the document). Unquoted, `port = ${PORT}` takes a number
  or boolean from the environment; any other value there is an error (quote it for a string).
  A missing variable is an error naming its line.
- **Reload.** SIGHUP, or a change of the file, reloads it: the new file is validated completely
  and swapped in atomically; requests already running keep the configuration they started
  with. *Reload* `live` keys apply to the next request; a reload that changes a `restart` key
  is refused (the running configuration keeps serving, the reason is logged and
  `mcp_guard_config_reload_failures_total` counts it), and so is a reload that would turn
  authentication off. See [operations.md](operations.md).
- **Not in this build.** Sections and values for features this build does not have are
  refused at start with a message naming them (a gateway that silently ignored a security
  setting would be worse than one that does not start). Keys that are accepted but have no
  effect where they stand (an HTTP key on a stdio upstream, rate-limit keys while limits are
  off, ...) are reported as warnings by `validate` and at start.

The security model behind `[auth]`, `[rate_limit]` and `[audit]` is in
[security.md](security.md).
";

/// The whole reference as Markdown.
pub fn markdown() -> String {
    let mut out = String::new();
    out.push_str(
        "<!-- Generated by `mcp-guard config-reference` from src/config/schema.rs; do not edit. -->\n\n",
    );
    out.push_str("# Configuration reference\n\n");
    out.push_str(INTRO);
    for section in sections() {
        let header = if section.array {
            format!("[[{}]]", section.path)
        } else {
            format!("[{}]", section.path)
        };
        let compat = if section.compat { " *(compat)*" } else { "" };
        let _ = write!(out, "\n## `{header}`{compat}\n\n");
        if !section.description.is_empty() {
            let _ = writeln!(out, "{}\n", section.description);
        }
        if let Some(note) = features::unbuilt_note(&section.path) {
            let _ = writeln!(out, "**Not in this build:** {note}\n");
        }
        if section.keys.is_empty() {
            continue;
        }
        out.push_str("| key | type | default | reload | since | meaning |\n");
        out.push_str("|---|---|---|---|---|---|\n");
        for k in &section.keys {
            let name = if k.compat {
                format!("`{}` *(compat)*", k.name)
            } else {
                format!("`{}`", k.name)
            };
            let default = match (&k.default, k.required) {
                (_, true) => "required".to_string(),
                (Some(d), false) => format!("`{}`", d.replace('|', "\\|")),
                (None, false) => "—".to_string(),
            };
            let reload = match k.reload {
                Reload::Live => "live",
                Reload::Restart => "restart",
            };
            let mut meaning = cell(&k.meaning);
            if let Some(note) = features::unbuilt_note(&k.path) {
                let _ = write!(meaning, " **Not in this build:** {}", cell(note));
            }
            if let Some(note) = features::no_effect_note(&k.path) {
                let _ = write!(
                    meaning,
                    " **No effect in this build** ({}); warns.",
                    cell(note)
                );
            }
            let _ = writeln!(
                out,
                "| {name} | {} | {default} | {reload} | {} | {meaning} |",
                cell(&k.type_words),
                k.since
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_reference_is_the_generated_one() {
        let committed = include_str!("../../docs/configuration.md");
        assert!(
            committed == markdown(),
            "docs/configuration.md is stale: regenerate it with \
             `cargo run --bin mcp-guard -- config-reference > docs/configuration.md`"
        );
    }

    #[test]
    fn every_table_of_the_schema_has_its_declaration_order() {
        let schema = serde_json::to_value(schemars::schema_for!(FileConfig)).unwrap();
        let mut tables = vec![("FileConfig".to_string(), schema.clone())];
        for (name, def) in schema["$defs"].as_object().unwrap() {
            tables.push((name.clone(), def.clone()));
        }
        for (title, _) in tables.iter().filter(|(_, t)| t.get("properties").is_some()) {
            assert!(
                declared_fields(title).is_some(),
                "add {title} to reference::declared_fields"
            );
        }
    }

    #[test]
    fn every_key_and_section_is_documented() {
        for s in sections() {
            for k in &s.keys {
                assert!(!k.meaning.is_empty(), "{} has no doc comment", k.path);
                assert!(!k.type_words.is_empty(), "{} has no type", k.path);
            }
        }
    }

    #[test]
    fn keys_carry_types_defaults_and_reload() {
        let port = key("server.port").unwrap();
        assert!(port.type_words.starts_with("port number"), "{port:?}");
        assert_eq!(port.default.as_deref(), Some("3000"));
        assert_eq!(port.reload, Reload::Restart);
        assert!(port.compat);
        let io = key("server.io").unwrap();
        assert_eq!(io.type_words, "one of `auto`, `io_uring`, `epoll`");
        assert_eq!(io.default.as_deref(), Some("\"auto\""));
        let body = key("server.max_body_bytes").unwrap();
        assert_eq!(body.reload, Reload::Live);
        assert_eq!(body.since, FIRST_RELEASE);
        // A section-level annotation reaches its keys.
        assert_eq!(key("admin.enabled").unwrap().reload, Reload::Restart);
        // Keys inside arrays of tables, and required keys.
        let id = key("auth.api_keys.id").unwrap();
        assert!(id.required && id.compat);
        assert!(is_section("auth.api_keys"));
        assert!(is_section("server.tls"));
        assert_eq!(
            key("upstream.servers.transport").unwrap().type_words,
            "one of `stdio`, `http`, `sse`"
        );
    }

    #[test]
    fn sections_come_in_declaration_order_parents_first() {
        let paths: Vec<String> = sections().into_iter().map(|s| s.path).collect();
        let server = paths.iter().position(|p| p == "server").unwrap();
        let tls = paths.iter().position(|p| p == "server.tls").unwrap();
        let admin = paths.iter().position(|p| p == "admin").unwrap();
        assert!(server < tls && tls < admin, "{paths:?}");
        assert_eq!(paths.first().map(String::as_str), Some("server"));
    }

    fn view(text: &str) -> Value {
        serde_json::to_value(crate::config::parse_str(text, &|_| None).unwrap()).unwrap()
    }

    #[test]
    fn restart_only_changes_are_found_by_the_schema_annotations() {
        let base = view("[server]\nport = 3000\n[upstream]\ncommand = \"a\"\n");
        let live =
            view("[server]\nport = 3000\nmax_body_bytes = 10\n[upstream]\ncommand = \"a\"\n");
        assert_eq!(restart_only_change(&base, &live), None);
        let port = view("[server]\nport = 3001\n[upstream]\ncommand = \"a\"\n");
        assert_eq!(
            restart_only_change(&base, &port).as_deref(),
            Some("server.port")
        );
        // Upstreams are reconciled on reload, not restarted.
        let cmd = view("[server]\nport = 3000\n[upstream]\ncommand = \"b\"\n");
        assert_eq!(restart_only_change(&base, &cmd), None);
        let workers = view("[server]\nport = 3000\nworkers = 3\n[upstream]\ncommand = \"a\"\n");
        assert_eq!(
            restart_only_change(&base, &workers).as_deref(),
            Some("server.workers")
        );
        let queue = view(
            "[server]\nport = 3000\n[upstream]\ncommand = \"a\"\n[audit]\nqueue_capacity = 5\n",
        );
        assert_eq!(
            restart_only_change(&base, &queue).as_deref(),
            Some("audit.queue_capacity")
        );
    }
}
