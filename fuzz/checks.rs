// The properties the fuzz targets check, in one place: each `fuzz/fuzz_targets/*.rs` and the
// stable replay in `tests/robustness.rs` pull this file in with `include!` (inside a `mod`).
// Every function takes raw fuzz input and panics when the code under test breaks a property.

use mcp_guard::authz::{Matcher, Policy, Rule};
use mcp_guard::config::HttpEndpoint;
use mcp_guard::config::schema::FileConfig;
use mcp_guard::http::chunked::{ChunkError, ChunkedDecoder};
use mcp_guard::http::request::{BodyFraming, HeadParse, parse_head};
use mcp_guard::http::sse::{SseDecoder, SseEvent};
use mcp_guard::mcp::filter::{SseFilter, filter_json};
use mcp_guard::mcp::jsonrpc::{Body, Classifier, Kind, RpcId, Target};
use mcp_guard::mcp::session::{MAX_SESSION_ID_LEN, SessionCodec};
use serde_json::Value;
use std::net::IpAddr;
use std::sync::Arc;

/// A split point chosen by the input's own bytes (FNV-1a), so replays are deterministic.
fn split_point(data: &[u8]) -> usize {
    let h = data.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    (h % (data.len() as u64 + 1)) as usize
}

/// `parse_head`: never panics; a complete head respects the limits, has origin-form target,
/// unambiguous framing and no CR/LF/NUL in any kept header value, and parses the same
/// without whatever follows it (body bytes, a pipelined request).
pub fn http_head(data: &[u8]) {
    for (max_head, max_body) in [(16 * 1024, 1 << 20), (48, 8)] {
        let h = match parse_head(data, max_head, max_body) {
            Ok(HeadParse::Complete(h)) => h,
            Ok(HeadParse::Incomplete) => {
                assert!(data.len() <= max_head, "Incomplete past max_head");
                continue;
            }
            Err(_) => continue,
        };
        assert!(h.head_len <= data.len() && h.head_len <= max_head);
        assert!(h.target.starts_with('/'), "target {:?}", h.target);
        assert!(h.minor_version <= 1);
        assert!(
            h.minor_version == 0 || h.h.host().is_some(),
            "HTTP/1.1 without Host"
        );
        match h.body {
            BodyFraming::Length(n) => assert!(n > 0 && n <= max_body),
            BodyFraming::Chunked => assert_eq!(h.minor_version, 1),
            BodyFraming::None => {}
        }
        let k = &h.h;
        for v in [
            k.host(),
            k.content_type(),
            k.accept(),
            k.origin(),
            k.authorization(),
            k.api_key(),
            k.session_id(),
            k.protocol_version(),
            k.mcp_method(),
            k.mcp_name(),
            k.last_event_id(),
            k.traceparent.as_deref(),
            k.tracestate.as_deref(),
            k.request_id(),
            k.user_agent(),
        ]
        .into_iter()
        .flatten()
        {
            assert!(!v.contains(['\r', '\n', '\0']), "header value {v:?}");
        }
        match parse_head(&data[..h.head_len], max_head, max_body) {
            Ok(HeadParse::Complete(again)) => assert_eq!(
                (again.head_len, again.method, &again.target, again.body),
                (h.head_len, h.method, &h.target, h.body),
            ),
            other => panic!("the head alone parses differently: {other:?}"),
        }
    }
}

const CHUNKED_LIMIT: u64 = 1 << 16;

/// Feeds `data` to a fresh decoder in pieces ending at `cuts` (then the rest), keeping the
/// unconsumed bytes as the server does. Returns (decoded body, bytes consumed, done).
fn decode_pieces(data: &[u8], cuts: &[usize]) -> Result<(Vec<u8>, usize, bool), ChunkError> {
    let mut d = ChunkedDecoder::new(CHUNKED_LIMIT);
    let (mut out, mut pending) = (Vec::new(), Vec::new());
    let (mut start, mut consumed) = (0, 0);
    for &end in cuts.iter().chain([data.len()].iter()) {
        pending.extend_from_slice(&data[start..end]);
        start = end;
        let n = d.decode(&pending, &mut out)?;
        assert!(n <= pending.len(), "consumed more than it was given");
        pending.drain(..n);
        consumed += n;
    }
    assert!(out.len() as u64 <= CHUNKED_LIMIT, "decoded past the limit");
    assert!(out.len() <= consumed, "decoded more bytes than it consumed");
    Ok((out, consumed, d.is_done()))
}

/// `ChunkedDecoder`: never panics, never decodes past its limit, and when both succeed, the
/// input in two pieces (and byte by byte, for short inputs) decodes exactly as in one piece.
pub fn chunked(data: &[u8]) {
    let whole = decode_pieces(data, &[]);
    let split = decode_pieces(data, &[split_point(data)]);
    if let (Ok(w), Ok(s)) = (&whole, &split) {
        assert_eq!(w, s, "split at {} changes the result", split_point(data));
    }
    if data.len() <= 512 {
        let cuts: Vec<usize> = (1..data.len()).collect();
        if let (Ok(w), Ok(b)) = (&whole, decode_pieces(data, &cuts)) {
            assert_eq!(w, &b, "byte-at-a-time changes the result");
        }
    }
}

fn rpc_id(v: &Value) -> Option<RpcId> {
    match v {
        Value::String(s) => Some(RpcId::Str(s.clone())),
        // simd-json reads `-0` as the integer 0, serde_json as the float -0.0: same id.
        Value::Number(n) if n.as_f64() == Some(0.0) => Some(RpcId::Num(0)),
        Value::Number(n) => n.as_i64().map(RpcId::Num),
        _ => None,
    }
}

/// `Classifier::classify`: never panics, leaves its input untouched, answers the same when
/// reused, returns well-formed messages, and what it read (method, id, target) is what a
/// serde_json-based upstream reads from the same bytes.
pub fn jsonrpc_classify(data: &[u8]) {
    let before = data.to_vec();
    let mut c = Classifier::new();
    let first = c.classify(data);
    assert_eq!(data, &before[..], "classify changed its input");
    assert_eq!(
        first,
        c.classify(data),
        "a reused classifier answers differently"
    );
    let Ok(body) = first else { return };
    for m in body.messages() {
        match m.kind {
            Kind::Request => assert!(m.id.is_some() && m.method.is_some()),
            Kind::Notification => assert!(m.id.is_none() && m.method.is_some()),
            Kind::Response => assert!(m.id.is_some() && m.method.is_none()),
        }
        assert!(m.target.is_none() || m.kind == Kind::Request);
    }
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let values: Vec<&Value> = match (&body, &v) {
        (Body::Batch(b), Value::Array(a)) if !b.is_empty() => a.iter().collect(),
        (Body::Single(_), v) if !v.is_array() => vec![v],
        _ => panic!("batch/single disagrees with serde_json: {body:?}"),
    };
    assert_eq!(values.len(), body.messages().len());
    for (m, v) in body.messages().iter().zip(values) {
        assert_eq!(m.method.as_deref(), v.get("method").and_then(Value::as_str));
        assert_eq!(m.id, v.get("id").and_then(rpc_id), "id differs");
        let (key, seen) = match &m.target {
            Some(Target::Tool(s) | Target::Prompt(s)) => ("name", s),
            Some(Target::Resource(s)) => ("uri", s),
            None => continue,
        };
        assert_eq!(
            Some(seen.as_str()),
            v["params"][key].as_str(),
            "target differs"
        );
    }
}

/// The policy the filter targets apply: `read_*` allowed, `read_secret` denied.
fn tool_rule() -> Rule {
    Rule {
        allow: Matcher::new(&["read_*"]),
        deny: Matcher::new(&["read_secret"]),
    }
}

/// Panics if any `result.tools` array of a message (or of a batch's messages) names a tool
/// the rule does not permit (`read_secret`, `delete`, a tool without a string name, ...).
fn assert_only_permitted_tools(v: &Value, rule: &Rule) {
    let messages = match v {
        Value::Array(a) => a.iter().collect(),
        v => vec![v],
    };
    for m in messages {
        let Some(tools) = m.pointer("/result/tools").and_then(Value::as_array) else {
            continue;
        };
        for t in tools {
            let name = t.get("name").and_then(Value::as_str);
            assert!(
                name.is_some_and(|n| rule.permits(n)),
                "tool {t} survived the tools/list filter"
            );
        }
    }
}

/// The `data` of each event in an SSE stream, read as the HTML standard's EventSource does:
/// CRLF, LF and a lone CR all end a line, and a blank line ends an event.
fn sse_event_data(stream: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(stream)
        .replace("\r\n", "\n")
        .replace('\r', "\n");
    let (mut events, mut buf) = (Vec::new(), String::new());
    for line in text.split('\n') {
        if line.is_empty() {
            if buf.pop().is_some() {
                events.push(std::mem::take(&mut buf));
            }
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        if field == "data" {
            buf.push_str(value.strip_prefix(' ').unwrap_or(value));
            buf.push('\n');
        }
    }
    events
}

/// An object's members as serde_json reads them, in order and with duplicates; keys as the
/// bytes they decode to (a lone surrogate kept as WTF-8, as lenient decoders keep it).
struct Members<'a>(Vec<(Vec<u8>, &'a serde_json::value::RawValue)>);

impl<'de> serde::Deserialize<'de> for Members<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyBytes;
        impl<'de> serde::de::Visitor<'de> for KeyBytes {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
        }
        impl<'de> serde::de::DeserializeSeed<'de> for KeyBytes {
            type Value = Vec<u8>;
            fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Vec<u8>, D::Error> {
                d.deserialize_bytes(self)
            }
        }
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(k) = map.next_key_seed(KeyBytes)? {
                    out.push((k, map.next_value()?));
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// The member `key` of `m`: `Err` when it is given twice or beside a spelling that a
/// case-folding decoder reads as `key` (ASCII case, `ſ` for `s`, the Kelvin sign for `k`).
fn only_member<'a>(
    m: &Members<'a>,
    key: &str,
) -> Result<Option<&'a serde_json::value::RawValue>, ()> {
    let mut found = None;
    // A member name holding a control character is read by C decoders as a shorter name: the
    // filter refuses the message (see `json_scan`).
    if m.0.iter().any(|(k, _)| k.iter().any(|&b| b < 0x20)) {
        return Err(());
    }
    for (k, v) in &m.0 {
        if k == key.as_bytes() {
            if found.replace(*v).is_some() {
                return Err(());
            }
            continue;
        }
        let folded: String = String::from_utf8_lossy(k)
            .chars()
            .map(|c| match c {
                '\u{17f}' => 's',
                '\u{212a}' => 'k',
                c => c.to_ascii_lowercase(),
            })
            .collect();
        if folded == key {
            return Err(());
        }
    }
    Ok(found)
}

/// Whether any member name in `v`, at any depth, holds a control character: C0, DEL or C1
/// (Unicode's Cc; serde_json's own depth limit bounds the walk).
fn control_in_a_member_name(v: &serde_json::value::RawValue) -> bool {
    use serde_json::value::RawValue;
    let text = v.get().trim_start_matches([' ', '\t', '\n', '\r']);
    if text.starts_with('{') {
        serde_json::from_str::<Members<'_>>(v.get()).is_ok_and(|m| {
            m.0.iter()
                .any(|(k, val)| {
                    String::from_utf8_lossy(k).chars().any(char::is_control)
                        || control_in_a_member_name(val)
                })
        })
    } else if text.starts_with('[') {
        serde_json::from_str::<Vec<&RawValue>>(v.get())
            .is_ok_and(|a| a.iter().any(|x| control_in_a_member_name(x)))
    } else {
        false
    }
}

/// What a client reads in one message: its text, and the names of `result.tools` when it
/// has such a list (`None` for a tool without one single string name).
type ReadMessage = (String, Option<Vec<Option<String>>>);

/// An independent reading of a JSON body with serde_json, as the filter must see it: `None`
/// when it is not JSON, `Some(Err)` when a message's list is ambiguous (the filter refuses).
fn read_as_client(body: &[u8]) -> Option<Result<Vec<ReadMessage>, ()>> {
    use serde_json::value::RawValue;
    let text = std::str::from_utf8(body).ok()?;
    serde_json::from_str::<&RawValue>(text).ok()?;
    let messages: Vec<&RawValue> = if text
        .trim_start_matches([' ', '\t', '\n', '\r'])
        .starts_with('[')
    {
        serde_json::from_str(text).ok()?
    } else {
        vec![serde_json::from_str(text).ok()?]
    };
    let read = |m: &RawValue| -> Result<Option<Vec<Option<String>>>, ()> {
        // A control character in any member name makes the message unfilterable, and so does
        // an array inside a batch (a client flattening batches would read lists in it).
        if control_in_a_member_name(m) || m.get().starts_with('[') {
            return Err(());
        }
        let Ok(top) = serde_json::from_str::<Members<'_>>(m.get()) else {
            return Ok(None);
        };
        let Some(result) = only_member(&top, "result")? else {
            return Ok(None);
        };
        let Ok(result) = serde_json::from_str::<Members<'_>>(result.get()) else {
            return Ok(None);
        };
        let Some(tools) = only_member(&result, "tools")? else {
            return Ok(None);
        };
        let tools: Vec<&RawValue> = serde_json::from_str(tools.get()).map_err(|_| ())?;
        Ok(Some(
            tools
                .iter()
                .map(|t| {
                    let tool = serde_json::from_str::<Members<'_>>(t.get()).ok()?;
                    let name = only_member(&tool, "name").ok()??;
                    serde_json::from_str::<String>(name.get()).ok()
                })
                .collect(),
        ))
    };
    Some(
        messages
            .into_iter()
            .map(|m| Ok((m.get().to_string(), read(m)?)))
            .collect(),
    )
}

/// `filter_json` against the independent reading: both refuse, or the filter keeps exactly
/// the permitted named tools of each list, every other message unchanged, and what it sends
/// is JSON a client reads without ambiguity.
fn filter_matches_client_reading(data: &[u8], rule: &Rule) {
    let expected = read_as_client(data);
    let out = filter_json(data, rule);
    let (out, expected) = match (out, expected) {
        (None, None | Some(Err(()))) => return,
        (Some(out), Some(Ok(expected))) => (out, expected),
        (out, expected) => panic!(
            "filter: {:?}; client reading: {expected:?}",
            out.map(|o| String::from_utf8_lossy(&o).into_owned())
        ),
    };
    let got = read_as_client(&out)
        .expect("the filter's output is JSON")
        .expect("the filter's output is unambiguous");
    assert_eq!(got.len(), expected.len(), "messages");
    for ((got_text, got), (text, expected)) in got.iter().zip(&expected) {
        match (got, expected) {
            (None, None) => assert_eq!(got_text, text, "a message without a list changed"),
            (Some(got), Some(expected)) => {
                let kept: Vec<Option<String>> = expected
                    .iter()
                    .filter(|n| n.as_deref().is_some_and(|n| rule.permits(n)))
                    .cloned()
                    .collect();
                assert_eq!(got, &kept, "kept tools of {text}");
            }
            _ => panic!("the list changed shape: {text} -> {got_text}"),
        }
    }
}

/// `filter_json` and `SseFilter`: never panic; whatever they let through, read as JSON (and,
/// for SSE, as a browser reads an event stream), lists only permitted tools; the JSON filter
/// keeps exactly what an independent serde_json reading says it must; and the SSE output does
/// not depend on where the stream was cut.
pub fn tools_list_filter(data: &[u8]) {
    let rule = tool_rule();
    let filtered = filter_json(data, &rule);
    if let Some(out) = &filtered
        && let Ok(v) = serde_json::from_slice::<Value>(out)
    {
        assert_only_permitted_tools(&v, &rule);
    }
    // The first scan may have recalled a list kept from an earlier input, the next one
    // recalls the list the first kept: both read as a scan that knows no list.
    assert_eq!(
        filter_json(data, &rule),
        filtered,
        "a recalled tool list reads differently"
    );
    mcp_guard::mcp::json_scan::forget_tool_lists();
    assert_eq!(
        filter_json(data, &rule),
        filtered,
        "a recalled tool list reads differently from a fresh scan"
    );
    filter_matches_client_reading(data, &rule);
    let policy = Arc::new(Policy {
        tools: tool_rule(),
        ..Policy::default()
    });
    let whole = SseFilter::new(policy.clone()).push(data).expect("push");
    let k = split_point(data);
    let mut f = SseFilter::new(policy);
    let mut pieces = f.push(&data[..k]).expect("push");
    pieces.extend(f.push(&data[k..]).expect("push"));
    assert_eq!(
        whole, pieces,
        "SSE output changes when the stream is cut at {k}"
    );
    for event in sse_event_data(&whole) {
        if let Ok(v) = serde_json::from_str::<Value>(&event) {
            assert_only_permitted_tools(&v, &rule);
        }
    }
}

/// `validate` resolves host names; keep it offline and deterministic by pointing any host that
/// is not an IP literal at 127.0.0.1 (the same split of host and port as `validate` makes).
fn offline(mut file: FileConfig) -> FileConfig {
    let is_ip = |h: &str| {
        h.trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok()
    };
    for host in [&mut file.server.host, &mut file.admin.host] {
        if !is_ip(host) {
            *host = "127.0.0.1".into();
        }
    }
    if let Some(rest) = file
        .upstream
        .url
        .as_deref()
        .and_then(|u| u.strip_prefix("http://"))
    {
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let host = match authority.strip_prefix('[') {
            Some(r) => r.split_once(']').map_or(r, |(h, _)| h),
            None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
        };
        if !authority.is_empty() && !authority.contains('@') && !is_ip(host) {
            file.upstream.url = Some(format!("http://127.0.0.1{path}"));
        }
    }
    file
}

/// `config::parse_str` then `config::validate`: never panic, with `${VAR}` references unset
/// or all set to a value full of quotes, backslashes and control characters.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let unset = |_: &str| None;
    let hostile = |_: &str| Some("q\"'\\\n\r\t\u{1}\u{7f}}${X}é".to_string());
    // Unquoted references take numbers and booleans: these must parse, nothing else may.
    let number = |_: &str| Some("1e3".to_string());
    let boolean = |_: &str| Some(" true ".to_string());
    let smuggled = |_: &str| Some("1\n[auth.jwt]\nmode = \"simple\"".to_string());
    for lookup in [
        &unset as &dyn Fn(&str) -> Option<String>,
        &hostile,
        &number,
        &boolean,
        &smuggled,
    ] {
        if let Ok(file) = mcp_guard::config::parse_str(&text, lookup) {
            let _ = mcp_guard::config::validate(&offline(file));
        }
    }
}

/// `SessionCodec`: decoding never panics; an id that verifies is exactly our encoding of its
/// payload (ids are not malleable) and is bound to its binding and key; any payload encodes
/// to a header-safe id that decodes back (within `MAX_SESSION_ID_LEN`). Input:
/// `binding\nid`; the bytes after the newline are also used as a payload.
pub fn session_id(data: &[u8]) {
    let codec = SessionCodec::from_key(b"k");
    let nl = data.iter().position(|&b| b == b'\n');
    let (binding, rest) = match nl {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b""[..], data),
    };
    let binding = String::from_utf8_lossy(binding);
    let id = String::from_utf8_lossy(rest);
    if let Some(payload) = codec.decode(&binding, &id) {
        assert_eq!(
            codec.encode(&binding, &payload),
            id,
            "a second spelling verifies"
        );
        assert!(codec.decode(&format!("{binding}!"), &id).is_none());
        assert!(
            SessionCodec::from_key(b"k2")
                .decode(&binding, &id)
                .is_none()
        );
    }
    let encoded = codec.encode(&binding, rest);
    assert!(encoded.bytes().all(|b| (0x21..=0x7e).contains(&b)));
    let back = codec.decode(&binding, &encoded);
    if encoded.len() <= MAX_SESSION_ID_LEN {
        assert_eq!(
            back.as_deref(),
            Some(rest),
            "encode/decode does not round-trip"
        );
    } else {
        assert!(back.is_none(), "an over-long id was accepted");
    }
}

/// The stdio router: input is records split by 0x1E, each an op byte, a selector byte and a
/// payload (`R` client request, `S` client notification/response, `I` initialize + success,
/// `A` child answers a pending request, `X` worker cancel, `D` delete a session, `K` child
/// restart, `U` undeliverable server request, anything else a child line; `$ID` in a child line
/// becomes the newest hub id, `$TOK` the newest hub progress token, `$SRQ` the newest server
/// request id given to a session; substituted in every record). Properties: every line to the child is one line of valid
/// JSON; every request id in it is one the hub issued; every response to the child answers an
/// id the child asked; nothing addressed to one session's ids reaches another session.
pub fn stdio_framing(data: &[u8]) {
    use mcp_guard::upstream::router::{Limits, Output, REPLAY_ID_BASE, Router, SessionKey};
    use std::collections::{HashMap, HashSet};

    const IDENTITIES: [&str; 3] = ["alice", "bob", "mallory"];
    let mut r: Router<u64> = Router::new(Limits {
        max_sessions: 3,
        max_sessions_per_identity: 2,
        max_pending: 4,
        max_server_requests: 2,
    });
    let mut sessions: Vec<SessionKey> = Vec::new();
    let mut next_hub = 1_u64;
    let mut generation = 0_u64;
    // Hub request id -> the session that sent it.
    let mut issued: HashMap<u64, Option<SessionKey>> = HashMap::new();
    let mut answered: HashSet<u64> = HashSet::new();
    // Hub progress token -> session; server-request hub id -> session.
    let mut tokens: HashMap<u64, Option<SessionKey>> = HashMap::new();
    let mut given: HashMap<u64, SessionKey> = HashMap::new();
    let mut server_ids: HashSet<String> = HashSet::new();
    let mut last_given = 0_u64;
    let mut last_token = 0_u64;

    for record in data.split(|b| *b == 0x1e).take(64) {
        let record = String::from_utf8_lossy(record)
            .replace("$ID", &(next_hub - 1).to_string())
            .replace("$TOK", &last_token.to_string())
            .replace("$SRQ", &last_given.to_string())
            .into_bytes();
        let (op, sel, payload) = match &record[..] {
            [op, sel, rest @ ..] => (*op, *sel as usize, rest),
            [op] => (*op, 0, &b""[..]),
            [] => continue,
        };
        let pick = |sessions: &[SessionKey]| -> Option<SessionKey> {
            let i = sel % (sessions.len() + 1);
            sessions.get(i).copied()
        };
        let identity = IDENTITIES[sel % 3];
        let mut out: Vec<Output<u64>> = Vec::new();
        // What this step is: (client session, the client's message) or a child line.
        let mut from_client: Option<(SessionKey, Value)> = None;
        let mut child_msgs: Vec<Value> = Vec::new();
        let mut child = |line: &[u8], r: &mut Router<u64>, out: &mut Vec<Output<u64>>| {
            if let Ok(v) = serde_json::from_slice::<Value>(line) {
                let items = match v {
                    Value::Array(a) => a,
                    v => vec![v],
                };
                child_msgs.extend(items);
            }
            r.child_line(line, out);
        };
        match op {
            b'R' => {
                let s = pick(&sessions);
                let hub = next_hub;
                next_hub += 1;
                issued.insert(hub, s);
                r.client_request(hub, s, identity, payload, hub, &mut out);
            }
            b'S' => {
                if let Some(s) = pick(&sessions) {
                    if let Ok(v) = serde_json::from_slice::<Value>(payload) {
                        from_client = Some((s, v));
                    }
                    let _ = r.client_send(s, payload, &mut out);
                }
            }
            b'I' => {
                let hub = next_hub;
                next_hub += 1;
                issued.insert(hub, None);
                let init = br#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{}}"#;
                r.client_request(hub, None, identity, init, hub, &mut out);
                let answer = format!(
                    r#"{{"jsonrpc":"2.0","id":{hub},"result":{{"protocolVersion":"2025-06-18"}}}}"#
                );
                child(answer.as_bytes(), &mut r, &mut out);
            }
            b'A' => {
                let open: Vec<u64> = {
                    let mut v: Vec<u64> = issued
                        .keys()
                        .copied()
                        .filter(|h| !answered.contains(h))
                        .collect();
                    v.sort();
                    v
                };
                if let Some(h) = open.get(sel % open.len().max(1)) {
                    let answer = format!(r#"{{"jsonrpc":"2.0","id":{h},"result":{{}}}}"#);
                    child(answer.as_bytes(), &mut r, &mut out);
                }
            }
            b'X' => r.cancel(sel as u64 % next_hub, &mut out),
            b'D' => {
                if let Some(s) = pick(&sessions) {
                    r.delete_session(&s, &mut out);
                }
            }
            b'K' => {
                r.child_exited(&mut out);
                generation += 1;
                r.child_started(generation, &mut out);
            }
            b'U' => r.undeliverable(last_given, &mut out),
            _ => child(&record, &mut r, &mut out),
        }
        for m in &child_msgs {
            if m.get("method").is_some()
                && let Some(id) = m.get("id")
            {
                server_ids.insert(id.to_string());
            }
        }
        let child_token_owner =
            |tokens: &HashMap<u64, Option<SessionKey>>, m: &Value| -> Option<Option<SessionKey>> {
                let t = m.pointer("/params/progressToken")?.as_u64()?;
                tokens.get(&t).copied()
            };
        for o in &out {
            match o {
                Output::ToChild { line, .. } => {
                    assert_eq!(line.last(), Some(&b'\n'), "line without its LF");
                    let body = &line[..line.len() - 1];
                    assert!(
                        !body.iter().any(|b| *b == b'\n' || *b == b'\r'),
                        "CR/LF inside a line to the child: {}",
                        String::from_utf8_lossy(line)
                    );
                    let v: Value =
                        serde_json::from_slice(body).expect("a line to the child is JSON");
                    let method = v.get("method").and_then(Value::as_str);
                    match (method, v.get("id")) {
                        (Some(_), Some(id)) => {
                            let id = id.as_u64().expect("hub ids are integers");
                            assert!(
                                issued.contains_key(&id) || id >= REPLAY_ID_BASE,
                                "request id {id} the hub never issued"
                            );
                            if let Some(t) = v.pointer("/params/_meta/progressToken") {
                                let t = t.as_u64().expect("hub progress tokens are integers");
                                assert!(!tokens.contains_key(&t), "progress token {t} reused");
                                tokens.insert(t, issued.get(&id).copied().flatten());
                                last_token = t;
                            }
                        }
                        (None, Some(id)) => {
                            assert!(
                                server_ids.contains(&id.to_string()),
                                "a response to {id}, which the child never asked"
                            );
                            if let Some((s, m)) = &from_client {
                                let h = m.get("id").and_then(Value::as_u64).expect("hub id");
                                assert_eq!(given.get(&h), Some(s), "answer from the wrong session");
                            }
                        }
                        (Some("notifications/cancelled"), None) => {
                            let rid = v.pointer("/params/requestId").and_then(Value::as_u64);
                            let rid = rid.expect("a cancel names a hub id");
                            let owner = issued.get(&rid).expect("a cancel of an id never issued");
                            if let Some((s, _)) = &from_client {
                                assert_eq!(owner, &Some(*s), "a cancel of another session's call");
                            }
                        }
                        (Some(_), None) => {}
                        (None, None) => panic!("neither method nor id: {v}"),
                    }
                }
                Output::Deliver {
                    session,
                    message,
                    server_request,
                    ..
                } => {
                    let v: Value = serde_json::from_slice(message).expect("delivered JSON");
                    if let Some(h) = server_request {
                        assert!(
                            given.insert(*h, *session).is_none(),
                            "server request id reused"
                        );
                        last_given = *h;
                        assert_eq!(v.get("id").and_then(Value::as_u64), Some(*h));
                    }
                    match v.get("method").and_then(Value::as_str) {
                        Some("notifications/progress") => {
                            assert!(
                                child_msgs
                                    .iter()
                                    .any(|m| child_token_owner(&tokens, m) == Some(Some(*session))),
                                "progress delivered to a session that did not ask for it"
                            );
                        }
                        Some("notifications/cancelled") => {
                            let h = v.pointer("/params/requestId").and_then(Value::as_u64);
                            let h = h.expect("a delivered cancel names a given id");
                            assert_eq!(given.get(&h), Some(session), "cancel to the wrong session");
                        }
                        _ => {}
                    }
                }
                Output::Broadcast { sessions: to, message } => {
                    let v: Value = serde_json::from_slice(message).expect("broadcast JSON");
                    assert!(v.get("id").is_none(), "a broadcast carries an id: {v}");
                    assert!(
                        to.iter().all(|s| sessions.contains(s)),
                        "a broadcast to a session that does not exist"
                    );
                }
                Output::Respond {
                    waiter,
                    new_session,
                    ..
                } => {
                    assert!(answered.insert(*waiter), "a waiter answered twice");
                    if let Some(s) = new_session {
                        assert!(!sessions.contains(s), "session key reused");
                        sessions.push(*s);
                    }
                }
                Output::Fail { waiter, .. } => {
                    assert!(answered.insert(*waiter), "a waiter answered twice");
                }
                Output::SessionEnded(s) => sessions.retain(|k| k != s),
                Output::Dropped(_) => {}
            }
        }
    }
}

/// The legacy SSE upstream's inputs, all from a hostile server or client. Input: a first line
/// (an `endpoint` event's data, or a messages URL's query), then an SSE stream. Properties:
/// nothing panics; an endpoint is accepted only as a path on the configured origin, in
/// visible ASCII; the stream decodes to the same events however it is split across reads.
pub fn sse_events(data: &[u8]) {
    let nl = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let (first, stream) = (&data[..nl], data.get(nl + 1..).unwrap_or_default());
    let first = String::from_utf8_lossy(first);
    let base = HttpEndpoint {
        url: "http://127.0.0.1:8080/sse".into(),
        addrs: vec!["127.0.0.1:8080".parse().unwrap()],
        host_header: "127.0.0.1:8080".into(),
        path: "/sse".into(),
    };
    if let Ok(target) = mcp_guard::upstream::sse::resolve_endpoint(&base, &first) {
        assert!(target.starts_with('/'), "{first:?} -> {target:?}");
        assert!(
            target.bytes().all(|b| (0x21..=0x7e).contains(&b)) && !target.contains('#'),
            "{first:?} -> {target:?}"
        );
        let lower = first.trim().to_ascii_lowercase();
        if let Some(rest) = lower
            .strip_prefix("http://")
            .or_else(|| lower.strip_prefix("//"))
        {
            let authority = rest.split(['/', '?']).next().unwrap_or_default();
            // The same origin, however its port is written (`08080` is port 8080, as URL
            // parsers read it); only digits.
            let same = authority.split_once(':').is_some_and(|(host, port)| {
                host == "127.0.0.1"
                    && port.bytes().all(|b| b.is_ascii_digit())
                    && port.parse::<u32>() == Ok(8080)
            });
            assert!(same, "another origin accepted: {first:?}");
        }
        // Any other scheme (`x:` before the first `/`) is another origin.
        if !lower.starts_with("http://") && !lower.starts_with('/') {
            let head = lower.split('/').next().unwrap_or_default();
            assert!(!head.contains(':'), "a scheme accepted: {first:?}");
        }
    }
    let _ = mcp_guard::mcp::legacy::session_param(&format!("/messages?{first}"));
    let _ = mcp_guard::mcp::legacy::route_of(&first);
    let decode = |parts: &[&[u8]]| -> Option<Vec<SseEvent>> {
        let mut d = SseDecoder::default();
        let mut all = Vec::new();
        for p in parts {
            all.extend(d.push(p).ok()?);
        }
        all.extend(d.finish());
        Some(all)
    };
    let at = split_point(stream);
    let whole = decode(&[stream]);
    let split = decode(&[&stream[..at], &stream[at..]]);
    assert_eq!(whole, split, "split at {at}");
    // A byte per read: every CR is the last byte of some read.
    let bytes: Vec<&[u8]> = stream.chunks(1).collect();
    assert_eq!(whole, decode(&bytes), "a byte at a time");
    sse_raw_events(stream);
    pushed_event_round_trips(stream);
}

/// Whatever data an event of the gateway's carries (relayed from an upstream, say), it is read
/// back as that one event, its data the same but for line endings (every CRLF and lone CR an
/// LF, as SSE reads them) and a final one (never part of the data): no line of it becomes a
/// field, or an event, of its own.
fn pushed_event_round_trips(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut out = Vec::new();
    mcp_guard::http::sse::push_event(&mut out, Some("message"), data);
    let back = SseDecoder::default().push(&out).expect("an event of the gateway's decodes");
    let want = text.replace("\r\n", "\n").replace('\r', "\n");
    let want = want.strip_suffix('\n').unwrap_or(&want);
    if want.is_empty() {
        // Empty data: nothing a client dispatches.
        assert!(back.iter().all(|e| e.data.is_empty()), "{text:?}");
        return;
    }
    assert_eq!(back.len(), 1, "{text:?} -> {:?}", String::from_utf8_lossy(&out));
    assert!(back[0].is_message(), "{text:?}");
    assert_eq!(back[0].data, want, "{text:?}");
}

/// The raw events of an SSE stream: `message_data` reads each as `decode_event` does, and
/// `push_until`, stopping at one of them a byte per read, reports an end after which nothing of
/// that event is left and before which the stream holds exactly the events up to it.
fn sse_raw_events(stream: &[u8]) {
    use mcp_guard::http::sse::{SseSplitter, decode_event, message_data, split_field, sse_lines};
    let raw = |input: &[u8]| -> Option<Vec<Vec<u8>>> {
        let mut events = Vec::new();
        let mut splitter = SseSplitter::default();
        splitter.push(input, |e| events.push(e.to_vec())).ok()?;
        splitter.finish(|e| events.push(e.to_vec()));
        Some(events)
    };
    let Some(events) = raw(stream) else { return };
    for event in &events {
        let Ok(text) = std::str::from_utf8(event) else {
            continue;
        };
        let decoded = decode_event(event);
        let has_data = sse_lines(text).any(|l| split_field(l).0 == "data");
        let want = (decoded.is_message() && has_data).then(|| decoded.data.clone().into_bytes());
        assert_eq!(
            message_data(event).map(|d| d.into_owned()),
            want,
            "{text:?}"
        );
    }
    for event in &events {
        if let Some(data) = mcp_guard::http::sse::message_data(event) {
            response_ids_hold(&data);
        }
    }
    if events.is_empty() {
        return;
    }
    let stop_at = stream.len() % events.len();
    let mut splitter = SseSplitter::default();
    let mut seen = 0;
    let mut fed = 0;
    for byte in stream.chunks(1) {
        fed += 1;
        let found = splitter
            .push_until(byte, |_| {
                seen += 1;
                seen == stop_at + 1
            })
            .expect("within the cap");
        if let Some(after) = found {
            let prefix = &stream[..fed - after];
            assert_eq!(
                raw(prefix).as_deref(),
                Some(&events[..=stop_at]),
                "stopped at event {stop_at}"
            );
            return;
        }
    }
    // Only an event that `finish` completes (a final lone CR) is never found while pushing.
    assert_eq!(stop_at + 1, events.len(), "event {stop_at} never found");
}

/// `response_ids` reports only responses that are there: each id it gives belongs to a message
/// (the object, or an element of the array, read for batches only) with that id, a `result` or
/// an `error` but not both, and no `method`; a single call's answer gives at most one, and
/// the same one a batch would.
fn response_ids_hold(data: &[u8]) {
    use mcp_guard::mcp::jsonrpc::{RpcId, response_ids};
    let ids = |batch: bool| {
        let mut ids = Vec::new();
        response_ids(data, batch, |id| ids.push(id));
        ids
    };
    let (single, batch) = (ids(false), ids(true));
    assert!(single.len() <= 1, "{single:?}");
    if !single.is_empty() {
        assert_eq!(single, batch);
    }
    if batch.is_empty() {
        return;
    }
    let value: serde_json::Value = serde_json::from_slice(data).expect("ids from what is not JSON");
    let messages = match &value {
        serde_json::Value::Array(all) => all.iter().collect::<Vec<_>>(),
        one => vec![one],
    };
    let mut responses = messages.into_iter().filter_map(|m| {
        let m = m.as_object()?;
        let response = !m.contains_key("method") && (m.contains_key("result") != m.contains_key("error"));
        match m.get("id")? {
            serde_json::Value::Number(n) if response => n.as_i64().map(RpcId::Num).or_else(|| {
                let f = n.as_f64()?;
                (f.fract() == 0.0 && f.abs() < 9.0e15).then_some(RpcId::Num(f as i64))
            }),
            serde_json::Value::String(s) if response => Some(RpcId::Str(s.clone())),
            _ => None,
        }
    });
    for id in &batch {
        assert!(responses.any(|r| r == *id), "{id:?} in {value}");
    }
}

/// What peers of the gateway send it outside HTTP heads and JSON-RPC: Redis replies (RESP),
/// Redis URLs from config, W3C trace headers from clients, and form bodies at the OAuth
/// endpoints. The first byte picks the parser.
pub fn peer_inputs(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => {
            // A reply is complete or not; what it consumed lies within the input, and the
            // same reply parses from a prefix cut at its end (no look-ahead past it).
            if let Ok(Some((reply, used))) = mcp_guard::ratelimit::resp::parse(rest) {
                assert!(used > 0 && used <= rest.len());
                let again = mcp_guard::ratelimit::resp::parse(&rest[..used]);
                assert!(
                    matches!(&again, Ok(Some((r, u))) if *u == used && *r == reply),
                    "{again:?}"
                );
            }
            // Cut anywhere before the end of a reply, a parse is never "complete" beyond the cut.
            let cut = split_point(rest).min(rest.len());
            if let Ok(Some((_, used))) = mcp_guard::ratelimit::resp::parse(&rest[..cut]) {
                assert!(used <= cut);
            }
        }
        1 => {
            let text = String::from_utf8_lossy(rest);
            if let Ok(url) = mcp_guard::ratelimit::resp::RedisUrl::parse(&text) {
                // The password is never shown (checked where it cannot also be read as part
                // of the host or path shown beside it).
                let shown = format!("{url} {url:?}");
                let after_userinfo = |secret: &str| text.replacen(&format!(":{secret}@"), ":@", 1);
                if url.has_password()
                    && let Some(secret) = text
                        .split_once("://")
                        .and_then(|(_, r)| r.split_once('@'))
                        .and_then(|(userinfo, _)| userinfo.rsplit_once(':'))
                        .map(|(_, p)| p)
                        .filter(|p| {
                            p.len() >= 8 && !after_userinfo(p).contains(p) && *p != "RedisUrl"
                        })
                {
                    assert!(!shown.contains(secret), "{shown}");
                }
            }
        }
        2 => {
            let text = String::from_utf8_lossy(rest);
            let (tp, ts) = text.split_once('\n').unwrap_or((&text, ""));
            if let Some(p) = mcp_guard::observe::trace::parse_traceparent(tp) {
                assert!(tp.len() <= 256);
                assert!(p.trace_id != [0; 16] && p.span_id != [0; 8]);
                // The four fields as version 00 lays them out (a later version may append
                // `-`-separated fields, which W3C says to ignore).
                let fields = &tp.as_bytes()[..55.min(tp.len())];
                assert!(
                    tp.len() == 55
                        || (!tp.starts_with("00") && tp.as_bytes().get(55) == Some(&b'-'))
                );
                assert!(fields.iter().all(|b| b.is_ascii_hexdigit() || *b == b'-'));
                assert!(!fields.iter().any(|b| b.is_ascii_uppercase()));
            }
            if mcp_guard::observe::trace::valid_tracestate(ts) {
                assert!(ts.len() <= 512, "{ts:?}");
                assert!(!ts.bytes().any(|b| b == b'\r' || b == b'\n'));
            }
        }
        _ => {
            if let Ok(pairs) = mcp_guard::facade::form::parse(rest) {
                // What is encoded again decodes to the same pairs.
                let mut sorted: Vec<(&str, &str)> = pairs
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                sorted.sort();
                let encoded = mcp_guard::facade::form::encode_pairs(&sorted);
                let back = mcp_guard::facade::form::parse(encoded.as_bytes()).expect("re-encoded");
                assert_eq!(back, pairs);
            }
        }
    }
}

/// `[[tool_rules]]`: `path_under` on any string never panics, and what it admits stays under
/// the root however it is read again (decoded a second time, normalised a second time); a rule
/// set evaluated on the classifier's tape never panics, and an argument it admits is admitted
/// too as serde_json reads it (last member wins): no duplicate, no case-folded twin, no
/// escape sequence splits what was checked from what an upstream would read.
pub fn tool_rules(data: &[u8]) {
    use mcp_guard::rules::path::{Root, check_under, normalise};
    let roots = [Root::parse("/srv/data").unwrap()];
    let text = String::from_utf8_lossy(data);
    for candidate in [text.as_ref(), &format!("/srv/data/{text}")] {
        if check_under(candidate, &roots).is_ok() {
            let decoded = mcp_guard::http::percent_decoded(candidate).expect("admitted: decodes");
            assert!(!decoded.contains(['%', '\0', '\\']), "{candidate:?}");
            let n = normalise(candidate).unwrap();
            assert!(n.path.len() >= 2 && n.path[0] == "srv" && n.path[1] == "data");
            let again = format!("/{}", n.path.join("/"));
            assert!(
                check_under(&again, &roots).is_ok(),
                "{candidate:?} -> {again:?}"
            );
            assert!(
                !n.path.iter().any(|s| s == ".." || s == "." || s.is_empty()),
                "{candidate:?}"
            );
        }
    }
    use mcp_guard::config::schema::{ArgRuleSection, ArgType, PolicyMode, ToolRuleSection};
    let arg = |pointer: &str| ArgRuleSection {
        pointer: pointer.into(),
        required: false,
        path_under: None,
        glob: None,
        regex: None,
        one_of: None,
        min: None,
        max: None,
        max_len: None,
        kind: None,
    };
    let sections = [ToolRuleSection {
        tool: "t".into(),
        server: None,
        identities: None,
        mode: PolicyMode::Enforce,
        args: vec![
            ArgRuleSection {
                path_under: Some(vec!["/srv/data".into()]),
                ..arg("/path")
            },
            ArgRuleSection {
                kind: Some(ArgType::Integer),
                max: Some(5.0),
                ..arg("/n/m")
            },
        ],
    }];
    let rules = mcp_guard::rules::compile(&sections, &[Arc::from("default")]).unwrap();
    let body = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"t","arguments":{text}}}}}"#
    );
    let mut verdict = None;
    let classified = Classifier::new().classify_inspecting(body.as_bytes(), &mut |i, tool, a| {
        let source = mcp_guard::rules::Source::new(body.as_bytes(), i);
        verdict = Some(rules.check(tool, "default", "x", a, source));
    });
    if classified.is_err() {
        return;
    }
    let Some(None) = verdict else { return };
    let Ok(v) = serde_json::from_str::<Value>(&body) else {
        return;
    };
    let args = &v["params"]["arguments"];
    if let Some(p) = args.get("path") {
        let p = p.as_str().expect("admitted /path is a string");
        assert!(
            check_under(p, &roots).is_ok(),
            "serde_json reads /path as {p:?}"
        );
    }
    if let Some(m) = args.get("n").and_then(|n| n.get("m")) {
        assert!(m.is_i64() || m.is_u64(), "serde_json reads /n/m as {m}");
        assert!(
            m.as_i64().is_none_or(|m| m <= 5),
            "serde_json reads /n/m as {m}"
        );
    }
}

/// Redaction of one upstream message with every built-in detector: never a panic; what comes
/// out of a JSON message is still JSON; a rewrite happens exactly when a detector fired; and
/// the rewritten message holds nothing a detector would still fire on.
pub fn redaction(data: &[u8]) {
    use mcp_guard::mcp::redact::{BUILTIN, RedactionConfig, Redactor};
    use std::collections::BTreeMap;
    use std::sync::OnceLock;
    static REDACTOR: OnceLock<Redactor> = OnceLock::new();
    let r = REDACTOR.get_or_init(|| {
        let detectors: Vec<String> = BUILTIN.iter().map(|s| s.to_string()).collect();
        Redactor::new(&RedactionConfig {
            detectors: &detectors,
            patterns: &BTreeMap::new(),
            replacement: "[REDACTED:{name}]",
        })
        .expect("the built-in detectors compile")
    });
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let is_json = serde_json::from_str::<Value>(text).is_ok();
    let mut fired = vec![0u32; r.len()];
    let Ok(out) = r.message(text, &mut fired) else {
        return;
    };
    let total: u32 = fired.iter().sum();
    match out {
        None => assert_eq!(total, 0, "a detector fired but nothing was rewritten"),
        Some(out) => {
            assert!(total > 0, "rewritten with no detector fired");
            if is_json {
                serde_json::from_str::<Value>(&out).expect("a redacted JSON message stays JSON");
                let mut again = vec![0u32; r.len()];
                if let Ok(Some(left)) = r.message(&out, &mut again) {
                    panic!("a second pass still redacts ({again:?}): {left}");
                }
            }
        }
    }
    let mut fired = vec![0u32; r.len()];
    let _ = r.redact_str(text, &mut fired);
}

/// The stdio child's stdout and stderr readers: however the output is cut, the same lines; no
/// line holds a LF, ends in CR or is empty; a stderr line keeps at most `MAX_LOG_LINE` bytes and
/// counts the rest, so what is logged plus what is counted is the whole line.
pub fn stdio_output_lines(data: &[u8]) {
    use mcp_guard::upstream::stdio::{LineSplitter, MAX_LOG_LINE, stderr_lines};
    fn trim_cr(mut l: &[u8]) -> &[u8] {
        while let [rest @ .., b'\r'] = l {
            l = rest;
        }
        l
    }
    let want: Vec<Vec<u8>> = data
        .split(|b| *b == b'\n')
        .map(trim_cr)
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    let cut = split_point(data);
    for pieces in [
        vec![data],
        vec![&data[..cut], &data[cut..]],
        data.chunks(7).collect::<Vec<_>>(),
    ] {
        let mut got = Vec::new();
        let mut lines = LineSplitter::default();
        for piece in pieces {
            assert!(lines.feed(piece, |l| got.push(l.to_vec())));
        }
        lines.finish(|l| got.push(l.to_vec()));
        assert_eq!(got, want);
    }
    let mut logged = Vec::new();
    stderr_lines(data, |l, unlogged| logged.push((l.to_string(), unlogged)));
    let want_logged: Vec<(String, usize)> = data
        .split(|b| *b == b'\n')
        .filter_map(|segment| {
            let kept = &segment[..segment.len().min(MAX_LOG_LINE)];
            let unlogged = segment.len() - kept.len();
            let kept = trim_cr(kept);
            (!kept.is_empty() || unlogged > 0)
                .then(|| (String::from_utf8_lossy(kept).into_owned(), unlogged))
        })
        .collect();
    assert_eq!(logged, want_logged);
}
