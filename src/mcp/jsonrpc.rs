//! JSON-RPC 2.0 classification of a request body, parsed once with simd-json.
//!
//! The body is copied into a per-worker scratch buffer (simd-json rewrites strings in place,
//! and the bytes forwarded upstream must be the bytes received), parsed to a tape, and only the
//! fields a decision needs are kept: kind, method, id, and the tool / resource / prompt named.
//! Objects whose decision fields appear twice are refused: a parser that keeps the first copy
//! and an upstream that keeps the last would otherwise disagree about what was checked.

use simd_json::prelude::*;
use simd_json::{Buffers, ValueType};

/// A JSON-RPC id (MCP allows strings and integers; null is refused).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RpcId {
    /// An integer id.
    Num(i64),
    /// A string id.
    Str(String),
}

impl RpcId {
    /// The id as JSON text.
    pub fn to_json(&self) -> String {
        match self {
            RpcId::Num(n) => n.to_string(),
            RpcId::Str(s) => serde_json::Value::String(s.clone()).to_string(),
        }
    }
}

/// What kind of JSON-RPC message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Has `method` and `id`.
    Request,
    /// Has `method`, no `id`.
    Notification,
    /// Has `id` and `result` or `error` (a client answering a server request).
    Response,
}

/// What an MCP request acts on, where policy can name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `tools/call` params.name
    Tool(String),
    /// `resources/read` params.uri
    Resource(String),
    /// `prompts/get` params.name
    Prompt(String),
}

/// One classified JSON-RPC message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Request, notification or response.
    pub kind: Kind,
    /// The method (requests and notifications).
    pub method: Option<String>,
    /// The id (requests and responses).
    pub id: Option<RpcId>,
    /// What the request acts on.
    pub target: Option<Target>,
}

impl Message {
    /// The method, or "" for responses.
    pub fn method_str(&self) -> &str {
        self.method.as_deref().unwrap_or("")
    }
}

/// A classified body: one message, or a batch (2025-03-26 clients).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// A single message.
    Single(Message),
    /// A non-empty batch.
    Batch(Vec<Message>),
}

impl Body {
    /// The messages, in order.
    pub fn messages(&self) -> &[Message] {
        match self {
            Body::Single(m) => std::slice::from_ref(m),
            Body::Batch(v) => v,
        }
    }

    /// Whether any message expects a response.
    pub fn has_requests(&self) -> bool {
        self.messages().iter().any(|m| m.kind == Kind::Request)
    }
}

/// Why a body was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClassifyError {
    /// Not JSON (-32700).
    Parse(String),
    /// JSON, but not a valid JSON-RPC 2.0 message (-32600); carries the id if one was readable.
    Invalid(String, Option<RpcId>),
    /// A valid request whose params lack what the method requires (-32602).
    Params(String, RpcId),
}

/// Reusable per-worker parse state.
pub struct Classifier {
    scratch: Vec<u8>,
    buffers: Buffers,
}

impl Default for Classifier {
    fn default() -> Self {
        Self::new()
    }
}

/// Nesting deeper than this is refused before parsing (simd-json itself recurses on build).
const MAX_DEPTH: usize = 128;

impl Classifier {
    /// A classifier with empty buffers.
    pub fn new() -> Self {
        Self {
            scratch: Vec::with_capacity(4096),
            buffers: Buffers::default(),
        }
    }

    /// Classifies `body` without modifying it.
    pub fn classify(&mut self, body: &[u8]) -> Result<Body, ClassifyError> {
        self.classify_inspecting(body, &mut |_, _, _| {})
    }

    /// Classifies `body` and, for each `tools/call` in it (by index in the body), calls
    /// `inspect` with the tool's name and its `params.arguments` on this parse's tape (`Err`
    /// when `arguments` is given twice). The tape lives only during this call: argument rules
    /// run here, on the one parse, and keep only their outcome.
    pub fn classify_inspecting(
        &mut self,
        body: &[u8],
        inspect: &mut dyn FnMut(usize, &str, Arguments<'_, '_>),
    ) -> Result<Body, ClassifyError> {
        if exceeds_depth(body, MAX_DEPTH) {
            return Err(ClassifyError::Parse("JSON nested too deeply".into()));
        }
        self.scratch.clear();
        self.scratch.extend_from_slice(body);
        let tape = simd_json::to_tape_with_buffers(&mut self.scratch, &mut self.buffers)
            .map_err(|e| ClassifyError::Parse(format!("invalid JSON: {e}")))?;
        let root = tape.as_value();
        // Only an escape can put a control character into a member name, so a body without a
        // backslash skips the walk.
        if body.contains(&b'\\') && control_in_member_name(root) {
            return Err(ClassifyError::Invalid(
                "a member name holds a control character".into(),
                None,
            ));
        }
        if let Some(arr) = root.as_array() {
            if arr.is_empty() {
                return Err(ClassifyError::Invalid("empty batch".into(), None));
            }
            let mut out = Vec::with_capacity(arr.len());
            for (i, v) in arr.iter().enumerate() {
                let m = classify_one(v)?;
                inspect_call(&m, v, i, inspect);
                out.push(m);
            }
            Ok(Body::Batch(out))
        } else {
            let m = classify_one(root)?;
            inspect_call(&m, root, 0, inspect);
            Ok(Body::Single(m))
        }
    }
}

/// A cheap pre-scan: bracket depth outside strings.
fn exceeds_depth(body: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut in_str = false;
    let mut escaped = false;
    for &b in body {
        if in_str {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_str = false;
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// A value on the classifier's tape.
pub type TapeValue<'t, 'i> = simd_json::tape::Value<'t, 'i>;

/// Whether any member name, at any depth, holds a control character. Decoders written in C
/// (json-c, and others that keep names as NUL-terminated strings) read `"name\u0000x"` as
/// `name`: beside the real `name` it would be the member they use, while this gateway checked
/// the other. Depth is bounded by `exceeds_depth` before the parse.
fn control_in_member_name(v: TapeValue<'_, '_>) -> bool {
    if let Some(o) = v.as_object() {
        return o
            .iter()
            .any(|(k, v)| k.chars().any(|c| c < ' ') || control_in_member_name(v));
    }
    if let Some(a) = v.as_array() {
        return a.iter().any(control_in_member_name);
    }
    false
}

/// A `tools/call`'s `params.arguments` on the tape: absent, present, or given twice (`Err`).
pub type Arguments<'t, 'i> = Result<Option<TapeValue<'t, 'i>>, String>;

/// Hands a classified `tools/call` and its arguments to `inspect`.
fn inspect_call(
    m: &Message,
    v: TapeValue<'_, '_>,
    index: usize,
    inspect: &mut dyn FnMut(usize, &str, Arguments<'_, '_>),
) {
    let Some(Target::Tool(tool)) = &m.target else {
        return;
    };
    // classify_one has already checked that `params` is a unique object member.
    let params = v
        .as_object()
        .and_then(|o| unique_get(&o, "params").ok().flatten());
    let arguments = match params.as_ref().and_then(|p| p.as_object()) {
        Some(p) => unique_get(&p, "arguments"),
        None => Ok(None),
    };
    inspect(index, tool, arguments);
}

/// Finds `key` in `obj`, refusing a duplicate, and refusing a member whose name differs from
/// `key` only in case: some decoders (Go's `encoding/json`) match member names
/// case-insensitively, folding `ſ` to `s` and the Kelvin sign to `k`, and let a later member win,
/// so `{"name":"echo","Name":"rm"}` would be checked as `echo` and run as `rm`.
fn unique_get<'t, 'i>(
    obj: &simd_json::tape::Object<'t, 'i>,
    key: &str,
) -> Result<Option<TapeValue<'t, 'i>>, String> {
    let mut found = None;
    for (k, v) in obj.iter() {
        if k == key {
            if found.is_some() {
                return Err(format!("duplicate \"{key}\" member"));
            }
            found = Some(v);
        } else if (k.len() == key.len() || !k.is_ascii()) && folds_to(k, key) {
            // (The length test first: a member of another length folds to `key` only when it
            // holds `ſ` or the Kelvin sign, so most members are passed over without a call.)
            return Err(format!(
                "member \"{k}\" differs from \"{key}\" only in case; refused"
            ));
        }
    }
    Ok(found)
}

/// The members of a message's envelope, in the order of [`ENVELOPE`].
const ENVELOPE: [&str; 6] = ["id", "jsonrpc", "method", "result", "error", "params"];

/// [`unique_get`] of each [`ENVELOPE`] member, in one pass over the object: each member is
/// compared only with the names of its length when it is ASCII (a twin of another length holds
/// `ſ` or the Kelvin sign), with all of them otherwise. Each answer is the one `unique_get`
/// gives: the first duplicate or twin met for that name, else the member or nothing.
fn envelope_members<'t, 'i>(
    obj: &simd_json::tape::Object<'t, 'i>,
) -> [Result<Option<TapeValue<'t, 'i>>, String>; 6] {
    let mut found: [Result<Option<TapeValue<'t, 'i>>, String>; 6] =
        std::array::from_fn(|_| Ok(None));
    for (k, v) in obj.iter() {
        let ascii = k.is_ascii();
        for (slot, key) in found.iter_mut().zip(ENVELOPE) {
            if ascii && k.len() != key.len() {
                continue;
            }
            let Ok(seen) = slot else {
                continue;
            };
            if k == key {
                *slot = match seen {
                    Some(_) => Err(format!("duplicate \"{key}\" member")),
                    None => Ok(Some(v)),
                };
            } else if folds_to(k, key) {
                *slot = Err(format!(
                    "member \"{k}\" differs from \"{key}\" only in case; refused"
                ));
            }
        }
    }
    found
}

/// Whether `name` equals the lowercase ASCII `key` under case folding as lenient JSON decoders
/// apply it (ASCII case, plus U+017F `ſ` → `s` and U+212A `K` → `k`).
pub(crate) fn folds_to(name: &str, key: &str) -> bool {
    if name.len() == key.len() {
        return name.eq_ignore_ascii_case(key);
    }
    if name.is_ascii() {
        return false;
    }
    let mut folded = name.chars().map(|c| match c {
        '\u{17f}' => 's',
        '\u{212a}' => 'k',
        c => c.to_ascii_lowercase(),
    });
    key.chars().all(|k| folded.next() == Some(k)) && folded.next().is_none()
}

/// Method names are case-sensitive identifiers of printable ASCII. A name that only an upstream
/// trimming or folding case would read as a known method (`TOOLS/CALL`, `tools/call `,
/// `Notifications/cancelled`) is refused: it would escape the decision its real name gets.
fn check_method_name(method: &str) -> Result<(), String> {
    if method.len() > 128 || !method.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("\"method\" must be 1-128 printable ASCII characters".into());
    }
    let lookalike = crate::observe::metrics::MCP_METHODS
        .iter()
        .any(|m| *m != method && m.eq_ignore_ascii_case(method))
        || (!method.starts_with("notifications/")
            && method
                .get(..14)
                .is_some_and(|p| p.eq_ignore_ascii_case("notifications/")));
    if lookalike {
        return Err(format!(
            "method \"{method}\" differs from an MCP method only in case; refused"
        ));
    }
    Ok(())
}

fn read_id(v: TapeValue<'_, '_>) -> Result<RpcId, String> {
    match v.value_type() {
        ValueType::String => Ok(RpcId::Str(v.as_str().unwrap_or_default().to_string())),
        ValueType::I64 | ValueType::U64 => v
            .as_i64()
            .map(RpcId::Num)
            .ok_or_else(|| "id out of range".to_string()),
        ValueType::Null => Err("id must not be null".into()),
        _ => Err("id must be a string or an integer".into()),
    }
}

fn classify_one(v: TapeValue<'_, '_>) -> Result<Message, ClassifyError> {
    let invalid = |m: String, id: Option<RpcId>| ClassifyError::Invalid(m, id);
    let Some(obj) = v.as_object() else {
        return Err(invalid("message must be a JSON object".into(), None));
    };
    let [id, jsonrpc, method, result, error, params] = envelope_members(&obj);
    // Read the id first so later errors can echo it.
    let id = match id.map_err(|m| invalid(m, None))? {
        Some(idv) => Some(read_id(idv).map_err(|m| invalid(m, None))?),
        None => None,
    };
    match jsonrpc.map_err(|m| invalid(m, id.clone()))? {
        Some(j) if j.as_str() == Some("2.0") => {}
        _ => return Err(invalid("\"jsonrpc\" must be \"2.0\"".into(), id)),
    }
    let method = method.map_err(|m| invalid(m, id.clone()))?;
    let result = result.map_err(|m| invalid(m, id.clone()))?;
    let error = error.map_err(|m| invalid(m, id.clone()))?;
    let params = params.map_err(|m| invalid(m, id.clone()))?;
    let Some(method) = method else {
        // A response from the client to a server-initiated request.
        let Some(id) = id else {
            return Err(invalid("message has neither method nor id".into(), None));
        };
        if result.is_some() == error.is_some() {
            return Err(invalid(
                "a response must carry exactly one of result and error".into(),
                Some(id),
            ));
        }
        return Ok(Message {
            kind: Kind::Response,
            method: None,
            id: Some(id),
            target: None,
        });
    };
    let Some(method) = method.as_str() else {
        return Err(invalid("\"method\" must be a string".into(), id));
    };
    if method.is_empty() {
        return Err(invalid("\"method\" must not be empty".into(), id));
    }
    check_method_name(method).map_err(|m| invalid(m, id.clone()))?;
    if result.is_some() || error.is_some() {
        return Err(invalid(
            "a request must not carry result or error".into(),
            id,
        ));
    }
    if let Some(p) = &params
        && !p.is_object()
        && !p.is_array()
    {
        return Err(invalid("\"params\" must be an object or array".into(), id));
    }
    let kind = if id.is_some() {
        // The converse: a `notifications/*` method with an id. Servers dispatch on the method
        // name, so a "request" named `notifications/cancelled` would cancel whatever its params
        // name, past the remapping notifications get.
        if method.starts_with("notifications/") {
            return Err(invalid(
                format!("\"{method}\" is a notification and must not carry an id"),
                id,
            ));
        }
        Kind::Request
    } else {
        // Only `notifications/*` may go without an id. An id-less `tools/call` would otherwise
        // be a "notification" that no policy looks at, while an upstream may still run it.
        if !method.starts_with("notifications/") {
            return Err(invalid(
                format!("\"{method}\" is a request and needs an id"),
                None,
            ));
        }
        Kind::Notification
    };
    // The target is read for every kind, so no shape of message escapes the decision.
    let target = match method {
        "tools/call" => Some(Target::Tool(required_param(&params, "name", &id)?)),
        "resources/read" => Some(Target::Resource(required_param(&params, "uri", &id)?)),
        "prompts/get" => Some(Target::Prompt(required_param(&params, "name", &id)?)),
        _ => None,
    };
    Ok(Message {
        kind,
        method: Some(method.to_string()),
        id,
        target,
    })
}

/// The ids of the JSON-RPC responses `text` holds (each with a `result` or an `error`, no
/// `method`), each given to `each`: what ends a call's SSE stream. `batch`: an array of
/// responses is read too (the answer to a batch may come as one); a single call's answer is one
/// object. Ids are read as clients read them (red team: they take `1.0` for 1, and the last
/// `id` of a message that gives two), so that the gateway never ends a stream at a response
/// its client does not see, nor misses one its client does. Anything unclear (not JSON, a
/// number id that is not an integer, a byte that is not UTF-8 anywhere, even in a member no
/// one reads) holds none, and the stream goes on as the upstream sends it.
pub fn response_ids(text: &[u8], batch: bool, mut each: impl FnMut(RpcId)) {
    /// What a response is told by: its `id` (the last given, as clients read a member given
    /// twice), and whether `method`, `result` and `error` are present, whatever their values.
    #[derive(Default)]
    struct Envelope {
        id: Option<serde_json::Value>,
        method: bool,
        result: bool,
        error: bool,
    }
    impl<'de> serde::Deserialize<'de> for Envelope {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Members;
            impl<'de> serde::de::Visitor<'de> for Members {
                type Value = Envelope;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a JSON-RPC message")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<Envelope, A::Error> {
                    let mut env = Envelope::default();
                    while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                        let present = match &*key {
                            "id" => {
                                env.id = Some(map.next_value()?);
                                continue;
                            }
                            "method" => &mut env.method,
                            "result" => &mut env.result,
                            "error" => &mut env.error,
                            _ => {
                                map.next_value::<serde::de::IgnoredAny>()?;
                                continue;
                            }
                        };
                        map.next_value::<serde::de::IgnoredAny>()?;
                        *present = true;
                    }
                    Ok(env)
                }
            }
            d.deserialize_map(Members)
        }
    }
    impl Envelope {
        fn response_id(self) -> Option<RpcId> {
            if self.method || self.result == self.error {
                return None;
            }
            match self.id? {
                // A number as clients read it: `1.0`, `1e0` and `-0` are integers to them.
                serde_json::Value::Number(n) => n.as_i64().map(RpcId::Num).or_else(|| {
                    let f = n.as_f64()?;
                    (f.fract() == 0.0 && f.abs() < 9.0e15).then_some(RpcId::Num(f as i64))
                }),
                serde_json::Value::String(s) => Some(RpcId::Str(s)),
                _ => None,
            }
        }
    }
    // serde_json skips the strings of members it ignores without checking their UTF-8: a
    // client would refuse (or repair) what it would have recognised.
    let Ok(text) = simdutf8::basic::from_utf8(text) else {
        return;
    };
    let array = text
        .bytes()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| b == b'[');
    if !array {
        if let Some(id) = serde_json::from_str::<Envelope>(text)
            .ok()
            .and_then(Envelope::response_id)
        {
            each(id);
        }
    } else if batch && let Ok(all) = serde_json::from_str::<Vec<Envelope>>(text) {
        all.into_iter()
            .filter_map(Envelope::response_id)
            .for_each(each);
    }
}

/// Whether `text` is a JSON-RPC response to request `id` (see [`response_ids`]).
#[cfg(test)]
pub fn is_response_to(text: &[u8], id: &RpcId) -> bool {
    let mut found = false;
    response_ids(text, false, |got| found |= got == *id);
    found
}

/// Whether `name` is a tool name as MCP 2025-11-25 defines them: 1 to 128 characters of
/// `A-Z a-z 0-9 _ - .`. Anything else may be folded by an upstream (case, Unicode
/// compatibility forms such as `ſ` for `s`) into a name a deny rule was written for.
pub fn is_spec_tool_name(name: &str) -> bool {
    (1..=128).contains(&name.len()) && name.bytes().all(|b| TOOL_NAME_BYTE[usize::from(b)])
}

/// The bytes of [`is_spec_tool_name`], as a table: the `tools/list` filter asks once per listed
/// tool, and a lookup is one load per byte where the range tests were several branches.
const TOOL_NAME_BYTE: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.');
        b += 1;
    }
    table
};

fn required_param(
    params: &Option<TapeValue<'_, '_>>,
    key: &str,
    id: &Option<RpcId>,
) -> Result<String, ClassifyError> {
    let id = id.clone().unwrap_or(RpcId::Num(0));
    let obj = params
        .as_ref()
        .and_then(|p| p.as_object())
        .ok_or_else(|| ClassifyError::Params("params must be an object".into(), id.clone()))?;
    match unique_get(&obj, key) {
        Err(m) => Err(ClassifyError::Params(m, id)),
        Ok(Some(v)) => match v.as_str() {
            Some(s) => Ok(s.to_string()),
            None => Err(ClassifyError::Params(
                format!("params.{key} must be a string"),
                id,
            )),
        },
        Ok(None) => Err(ClassifyError::Params(
            format!("params.{key} is required"),
            id,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_is_told_by_its_id_and_a_result_or_an_error() {
        let num = RpcId::Num(7);
        let text = RpcId::Str("7".into());
        assert!(is_response_to(
            br#"{"jsonrpc":"2.0","id":7,"result":{}}"#,
            &num
        ));
        assert!(is_response_to(
            br#"{"result":null,"jsonrpc":"2.0","id":7}"#,
            &num
        ));
        assert!(is_response_to(
            br#"{"jsonrpc":"2.0","id":7,"error":{"code":1,"message":""}}"#,
            &num
        ));
        assert!(is_response_to(
            br#"{"jsonrpc":"2.0","id":"7","result":{}}"#,
            &text
        ));
        // Another request's answer, the other kind of id, a request of the server's with the
        // same id, a notification, both result and error, neither.
        assert!(!is_response_to(
            br#"{"jsonrpc":"2.0","id":8,"result":{}}"#,
            &num
        ));
        assert!(!is_response_to(
            br#"{"jsonrpc":"2.0","id":"7","result":{}}"#,
            &num
        ));
        assert!(!is_response_to(
            br#"{"jsonrpc":"2.0","id":7,"result":{}}"#,
            &text
        ));
        assert!(!is_response_to(
            br#"{"jsonrpc":"2.0","id":7,"method":"ping"}"#,
            &num
        ));
        assert!(!is_response_to(
            br#"{"jsonrpc":"2.0","id":7,"method":"x","result":{}}"#,
            &num
        ));
        assert!(!is_response_to(
            br#"{"jsonrpc":"2.0","method":"notifications/progress"}"#,
            &num
        ));
        assert!(!is_response_to(
            br#"{"jsonrpc":"2.0","id":7,"result":{},"error":{}}"#,
            &num
        ));
        assert!(!is_response_to(br#"{"jsonrpc":"2.0","id":7}"#, &num));
        // As clients read them (red team): an integral number in another spelling is the
        // integer, and of two ids the last counts.
        for integral in ["7.0", "7e0", "0.7e1", "7.000"] {
            let text = format!(r#"{{"jsonrpc":"2.0","id":{integral},"result":{{}}}}"#);
            assert!(is_response_to(text.as_bytes(), &num), "{integral}");
        }
        assert!(is_response_to(br#"{"id":-0,"error":{}}"#, &RpcId::Num(0)));
        assert!(is_response_to(br#"{"id":8,"id":7,"result":{}}"#, &num));
        assert!(!is_response_to(br#"{"id":7,"id":8,"result":{}}"#, &num));
        // Unclear: a fraction, an integer past what a double holds exactly, not JSON, a batch.
        assert!(!is_response_to(br#"{"id":7.5,"result":{}}"#, &num));
        assert!(!is_response_to(
            br#"{"id":9007199254740993.0,"result":{}}"#,
            &RpcId::Num(9007199254740993)
        ));
        assert!(!is_response_to(br#"{"id":7,"result":{}"#, &num));
        assert!(!is_response_to(
            br#"[{"jsonrpc":"2.0","id":7,"result":{}}]"#,
            &num
        ));
    }

    #[test]
    fn a_batch_answer_gives_each_response_id_and_nothing_unclear() {
        let ids = |text: &str, batch: bool| {
            let mut ids = Vec::new();
            response_ids(text.as_bytes(), batch, |id| ids.push(id));
            ids
        };
        let batch = r#" [{"jsonrpc":"2.0","id":1,"result":{}},{"jsonrpc":"2.0","id":"b","error":{}},{"jsonrpc":"2.0","method":"x","id":3},{"jsonrpc":"2.0","id":4.5,"result":1}]"#;
        assert_eq!(ids(batch, true), [RpcId::Num(1), RpcId::Str("b".into())]);
        // Read only for a batch; and one element that is not an object spoils the array.
        assert_eq!(ids(batch, false), []);
        assert_eq!(ids(r#"[{"id":1,"result":{}},7]"#, true), []);
        assert_eq!(
            ids(r#"[{"id":2,"id":1,"result":{}}]"#, true),
            [RpcId::Num(1)]
        );
        assert_eq!(ids(r#"{"id":2,"result":{}}"#, true), [RpcId::Num(2)]);
        // Fuzzing (sse_events): a byte that is not UTF-8 in a member no one reads.
        let mut bad = br#"{"jsonrpc":"2.x","id":1,"result":{}}"#.to_vec();
        bad[14] = 0xE8;
        assert!(serde_json::from_slice::<serde::de::IgnoredAny>(&bad).is_ok());
        let mut got = Vec::new();
        response_ids(&bad, true, |id| got.push(id));
        assert_eq!(got, []);
    }

    fn classify(s: &str) -> Result<Body, ClassifyError> {
        Classifier::new().classify(s.as_bytes())
    }

    fn single(s: &str) -> Message {
        match classify(s).unwrap() {
            Body::Single(m) => m,
            b => panic!("expected single, got {b:?}"),
        }
    }

    #[test]
    fn the_one_pass_envelope_lookup_answers_as_unique_get_does() {
        // Every object of up to three members drawn from the envelope's names, their twins
        // (case, `ſ`, the Kelvin sign, escapes) and strangers: each slot holds what
        // `unique_get` says of that name, error text included.
        let names = [
            "id",
            "ID",
            "Id",
            "jsonrpc",
            "JSONRPC",
            "method",
            "Method",
            "result",
            "reſult",
            "error",
            "Error",
            "params",
            "paramſ",
            "PARAMS",
            "\\u0069d",
            "idx",
            "m",
            "methods",
            "\u{212a}ey",
            "rpc",
            "é",
        ];
        let mut bodies = Vec::new();
        for a in names {
            bodies.push(vec![a]);
            for b in names {
                bodies.push(vec![a, b]);
                for c in ["id", "Params", "method", "x"] {
                    bodies.push(vec![a, b, c]);
                }
            }
        }
        for members in bodies {
            let text = format!(
                "{{{}}}",
                members
                    .iter()
                    .enumerate()
                    .map(|(i, m)| format!("\"{m}\":{i}"))
                    .collect::<Vec<_>>()
                    .join(",")
            );
            let mut scratch = text.clone().into_bytes();
            let tape = simd_json::to_tape(&mut scratch).unwrap();
            let obj = tape.as_value().as_object().unwrap();
            let one_pass = envelope_members(&obj);
            for (got, key) in one_pass.iter().zip(ENVELOPE) {
                let want = unique_get(&obj, key);
                let as_text = |r: &Result<Option<TapeValue<'_, '_>>, String>| match r {
                    Ok(v) => Ok(v.as_ref().and_then(|v| v.as_i64())),
                    Err(e) => Err(e.clone()),
                };
                assert_eq!(as_text(got), as_text(&want), "{key} in {text}");
            }
        }
    }

    #[test]
    fn tools_call_yields_method_id_and_tool() {
        let m = single(
            r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"read_file","arguments":{"path":"/x"}}}"#,
        );
        assert_eq!(m.kind, Kind::Request);
        assert_eq!(m.id, Some(RpcId::Num(7)));
        assert_eq!(m.target, Some(Target::Tool("read_file".into())));
    }

    #[test]
    fn escaped_tool_names_are_decoded_before_policy_sees_them() {
        let m = single(
            r#"{"jsonrpc":"2.0","id":"a","method":"tools/call","params":{"name":"del\u0065te"}}"#,
        );
        assert_eq!(m.target, Some(Target::Tool("delete".into())));
    }

    #[test]
    fn notifications_responses_and_batches() {
        assert_eq!(
            single(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#).kind,
            Kind::Notification
        );
        assert_eq!(
            single(r#"{"jsonrpc":"2.0","id":1,"result":{}}"#).kind,
            Kind::Response
        );
        let b = classify(
            r#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","method":"notifications/x"}]"#,
        )
        .unwrap();
        assert_eq!(b.messages().len(), 2);
    }

    #[test]
    fn invalid_messages_are_refused_with_the_right_error() {
        assert!(matches!(classify("{nope"), Err(ClassifyError::Parse(_))));
        assert!(matches!(classify("[]"), Err(ClassifyError::Invalid(..))));
        assert!(matches!(
            classify(r#"{"jsonrpc":"1.0","id":1,"method":"x"}"#),
            Err(ClassifyError::Invalid(..))
        ));
        assert!(matches!(
            classify(r#"{"jsonrpc":"2.0","id":null,"method":"x"}"#),
            Err(ClassifyError::Invalid(..))
        ));
        assert!(matches!(
            classify(r#"{"jsonrpc":"2.0","id":1.5,"method":"x"}"#),
            Err(ClassifyError::Invalid(..))
        ));
        assert!(matches!(
            classify(r#"{"jsonrpc":"2.0","id":1,"result":1,"error":{}}"#),
            Err(ClassifyError::Invalid(..))
        ));
        assert!(matches!(
            classify(r#""str""#),
            Err(ClassifyError::Invalid(..))
        ));
        assert!(matches!(
            classify(r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{}}"#),
            Err(ClassifyError::Params(_, RpcId::Num(3)))
        ));
    }

    #[test]
    fn duplicate_decision_fields_are_refused() {
        assert!(matches!(
            classify(
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"ok","name":"evil"}}"#
            ),
            Err(ClassifyError::Params(..))
        ));
        assert!(matches!(
            classify(r#"{"jsonrpc":"2.0","id":1,"method":"ping","method":"tools/call"}"#),
            Err(ClassifyError::Invalid(..))
        ));
    }

    #[test]
    fn request_methods_without_an_id_are_invalid_requests() {
        for m in [
            "tools/call",
            "resources/read",
            "prompts/get",
            "tools/list",
            "ping",
        ] {
            let body =
                format!(r#"{{"jsonrpc":"2.0","method":"{m}","params":{{"name":"x","uri":"y"}}}}"#);
            assert!(
                matches!(classify(&body), Err(ClassifyError::Invalid(_, None))),
                "{m} without id"
            );
        }
        for m in ["notifications/cancelled", "notifications/progress"] {
            let body =
                format!(r#"{{"jsonrpc":"2.0","id":9,"method":"{m}","params":{{"requestId":1}}}}"#);
            assert!(
                matches!(
                    classify(&body),
                    Err(ClassifyError::Invalid(_, Some(RpcId::Num(9))))
                ),
                "{m} with an id"
            );
        }
        let batch = r#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","method":"tools/call","params":{"name":"x"}}]"#;
        assert!(matches!(classify(batch), Err(ClassifyError::Invalid(..))));
        assert_eq!(
            single(
                r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":1}}"#
            )
            .kind,
            Kind::Notification
        );
    }

    #[test]
    fn members_differing_only_in_case_from_a_decision_field_are_refused() {
        for body in [
            r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"echo","Name":"rm"}}"#,
            r#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"echo"},"Params":{"name":"rm"}}"#,
            "{\"jsonrpc\":\"2.0\",\"id\":5,\"method\":\"tools/call\",\"params\":{\"name\":\"echo\"},\"param\u{17f}\":{\"name\":\"rm\"}}",
            r#"{"jsonrpc":"2.0","id":6,"method":"ping","Method":"tools/call","params":{"name":"rm"}}"#,
            r#"{"jsonrpc":"2.0","id":7,"method":"resources/read","params":{"uri":"file:///public/a","URI":"file:///etc/secret"}}"#,
            r#"{"jsonrpc":"2.0","id":8,"method":"ping","Method":"tools/list"}"#,
            r#"{"jsonrpc":"2.0","ID":9,"id":8,"method":"ping"}"#,
            "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"echo\",\"\u{212a}e\":1,\"NAME\":\"rm\"}}",
        ] {
            assert!(classify(body).is_err(), "{body}");
        }
        assert!(folds_to("par\u{17f}ams", "parsams") && folds_to("\u{212a}ey", "key"));
        assert!(!folds_to("nam", "name") && !folds_to("names", "name"));
        // Ordinary members that merely share letters are fine.
        assert!(classify(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","names":[]}}"#).is_ok());
    }

    #[test]
    fn method_names_that_only_fold_to_a_known_method_are_refused() {
        for m in [
            "TOOLS/CALL",
            "Tools/call",
            "tools/call ",
            " tools/call",
            "Notifications/cancelled",
            "NOTIFICATIONS/progress",
            "logging/setlevel",
            "tools/\u{e7}all",
        ] {
            let body = serde_json::json!({"jsonrpc":"2.0","id":1,"method":m,"params":{"name":"x"}})
                .to_string();
            assert!(
                matches!(classify(&body), Err(ClassifyError::Invalid(..))),
                "{m:?}"
            );
        }
        for m in [
            "tools/call",
            "logging/setLevel",
            "custom/thing",
            "x-vendor/Do",
        ] {
            let body = serde_json::json!({"jsonrpc":"2.0","id":1,"method":m,"params":{"name":"x"}})
                .to_string();
            assert!(classify(&body).is_ok(), "{m:?}");
        }
    }

    #[test]
    fn tool_names_follow_the_spec_character_set() {
        assert!(is_spec_tool_name("read_file-v2.1"));
        assert!(is_spec_tool_name(&"a".repeat(128)));
        for bad in [
            "",
            "read_\u{17f}ecret",
            "echo\0",
            "a b",
            "a/b",
            "é",
            &"a".repeat(129),
        ] {
            assert!(!is_spec_tool_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn deep_nesting_is_refused_without_recursion() {
        let deep = "[".repeat(100_000);
        assert!(matches!(classify(&deep), Err(ClassifyError::Parse(_))));
    }

    #[test]
    fn input_is_not_modified() {
        let body =
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a\"b"}}"#.to_vec();
        let copy = body.clone();
        Classifier::new().classify(&body).unwrap();
        assert_eq!(body, copy);
    }
}
