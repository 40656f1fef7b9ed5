//! `tools/list` filtering: a caller only ever sees the tools its policy lets it call.
//!
//! Plain JSON responses (one message or a batch array) are rewritten whole; SSE responses are
//! rewritten event by event as they stream, so other events are not held back. Everything but
//! the `tools` array (ids, `nextCursor`, `_meta`) is kept. A `tools/list` answer that cannot be
//! parsed is dropped rather than forwarded unchecked.

use crate::authz::{Policy, Rule};
use crate::http::sse::{SseSplitter, split_field, sse_lines};
use crate::mcp::jsonrpc::folds_to;
use crate::mcp::transform::Transform;
use serde::Deserialize;
use serde::de::{MapAccess, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::sync::Arc;

/// Only what filtering needs of a tool; everything else in it is copied through verbatim. A
/// tool whose `name` appears twice, or beside a member a case-folding decoder would also read
/// as its name (`Name`, `NAME`), fails to parse and is dropped (fail closed): the tool is
/// relayed whole, so the client must not find a second name in it.
struct ToolName<'a> {
    name: Option<Cow<'a, str>>,
}

/// A string borrowed from the input when it holds no escapes (the common case: no allocation).
struct BorrowedOrOwned<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for BorrowedOrOwned<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = BorrowedOrOwned<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(BorrowedOrOwned(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(BorrowedOrOwned(Cow::Owned(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(BorrowedOrOwned(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for ToolName<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ToolName<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a tool object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                use serde::de::Error as _;
                let mut name: Option<Cow<'de, str>> = None;
                while let Some(key) = map.next_key::<BorrowedOrOwned<'de>>()? {
                    let key = key.0;
                    if key == "name" {
                        if name.is_some() {
                            return Err(A::Error::custom("duplicated name"));
                        }
                        name = Some(map.next_value::<BorrowedOrOwned<'de>>()?.0);
                    } else if folds_to(&key, "name") {
                        return Err(A::Error::custom("a second spelling of name"));
                    } else {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                Ok(ToolName { name })
            }
        }
        d.deserialize_map(V)
    }
}

/// An object's members in their order, values kept raw; duplicates are kept so they can be
/// seen (a map would silently keep one of them).
struct Members<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, &'de RawValue>()? {
                    out.push((k, v));
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V)
    }
}

impl<'a> Members<'a> {
    /// The member `key`; `Err` when it appears more than once (clients disagree on which copy
    /// counts, so such a message cannot be checked).
    fn get(&self, key: &str) -> Result<Option<&'a RawValue>, Unfilterable> {
        let mut found = None;
        for (k, v) in &self.0 {
            if k == key {
                if found.is_some() {
                    return Err(Unfilterable);
                }
                found = Some(*v);
            } else if folds_to(k, key) {
                // `Tools` beside `tools`: a case-folding client would read the other copy.
                return Err(Unfilterable);
            }
        }
        Ok(found)
    }

    /// Serialises the object with `key`'s value replaced by `value`.
    fn write_with(&self, key: &str, value: &str, out: &mut String) {
        out.push('{');
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            // Keys came from JSON strings: re-escaping them cannot fail.
            out.push_str(&serde_json::to_string(k).unwrap_or_default());
            out.push(':');
            out.push_str(if k == key { value } else { v.get() });
        }
        out.push('}');
    }
}

/// Which tools of a `tools/list` answer go on to the client. The policy's allow/deny rule is
/// one gate; the response-transform chain ([`Transform`]) combines it with the others (pins).
pub trait ToolGate {
    /// Whether the tool named `name`, whose whole definition is `tool`, is kept.
    fn keep(&self, name: &str, tool: &RawValue) -> bool;
}

impl ToolGate for Rule {
    fn keep(&self, name: &str, _tool: &RawValue) -> bool {
        self.permits(name)
    }
}

/// A message that carries a tool list the filter cannot check (duplicated members, `tools` not
/// an array): refused rather than forwarded.
#[derive(Debug, PartialEq, Eq)]
pub struct Unfilterable;

/// Filters one JSON-RPC message: `Ok(Some(rewritten))` when it carries `result.tools`,
/// `Ok(None)` when there is nothing to filter. Tools are kept as the raw bytes the upstream
/// sent; only their names are parsed.
pub(crate) fn filter_message(
    msg: &RawValue,
    rule: &dyn ToolGate,
) -> Result<Option<String>, Unfilterable> {
    // One page scope per answer: pinning decides the whole list against one snapshot and
    // publishes its changes once (and decides again when a later copy of a name hides an
    // earlier one); an answer it cannot settle is refused.
    crate::pinning::page::run(|| filter_once(msg, rule)).unwrap_or(Err(Unfilterable))
}

fn filter_once(msg: &RawValue, rule: &dyn ToolGate) -> Result<Option<String>, Unfilterable> {
    // The usual shape (object message, object result, `tools` array, no duplicates) is
    // rewritten in one streaming pass; anything else takes the general path below, which makes
    // the same decisions with more passes.
    if let Ok(out) = fast::filter(msg.get(), rule) {
        return Ok(Some(out));
    }
    filter_message_general(msg, rule)
}

mod fast {
    //! One streaming pass over a `tools/list` answer: members other than `result` (and, inside
    //! it, `tools`) are copied raw as they are met; each tool is captured raw once and only its
    //! name parsed. Any surprise (not an object, a duplicated or missing member) is an error,
    //! and the caller falls back to the general path.

    use super::ToolGate;
    use super::ToolName;
    use serde::de::{DeserializeSeed, Error as _, MapAccess, SeqAccess, Visitor};
    use serde_json::value::RawValue;
    use std::fmt;

    /// The message with `result.tools` filtered.
    pub(super) fn filter(text: &str, rule: &dyn ToolGate) -> Result<String, serde_json::Error> {
        let tools = ToolsSeed { rule };
        let result = Member {
            key: "tools",
            inner: tools,
        };
        let top = Member {
            key: "result",
            inner: result,
        };
        let mut de = serde_json::Deserializer::from_str(text);
        let out = top.deserialize(&mut de)?;
        de.end()?;
        Ok(out)
    }

    /// An object copied member by member, except `key`, which exactly once goes through
    /// `inner` (the rewritten text takes its place).
    #[derive(Clone, Copy)]
    struct Member<S> {
        key: &'static str,
        inner: S,
    }

    impl<'de, S: DeserializeSeed<'de, Value = String> + Copy> DeserializeSeed<'de> for Member<S> {
        type Value = String;
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
            d.deserialize_map(self)
        }
    }

    impl<'de, S: DeserializeSeed<'de, Value = String> + Copy> Visitor<'de> for Member<S> {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "an object with one `{}` member", self.key)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<String, A::Error> {
            let mut out = String::with_capacity(4096);
            out.push('{');
            let mut seen = false;
            while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                if out.len() > 1 {
                    out.push(',');
                }
                // Keys came from JSON strings: re-escaping them cannot fail.
                out.push_str(&serde_json::to_string(&key).unwrap_or_default());
                out.push(':');
                if key != self.key && crate::mcp::jsonrpc::folds_to(&key, self.key) {
                    return Err(A::Error::custom("member differing only in case"));
                }
                if key == self.key {
                    if seen {
                        return Err(A::Error::custom("duplicated member"));
                    }
                    seen = true;
                    out.push_str(&map.next_value_seed(self.inner)?);
                } else {
                    out.push_str(map.next_value::<&'de RawValue>()?.get());
                }
            }
            if !seen {
                return Err(A::Error::custom("member missing"));
            }
            out.push('}');
            Ok(out)
        }
    }

    /// The tools array, keeping only permitted tools, each copied raw.
    #[derive(Clone, Copy)]
    struct ToolsSeed<'r> {
        rule: &'r dyn ToolGate,
    }

    impl<'de> DeserializeSeed<'de> for ToolsSeed<'_> {
        type Value = String;
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
            d.deserialize_seq(self)
        }
    }

    impl<'de> Visitor<'de> for ToolsSeed<'_> {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a tools array")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<String, A::Error> {
            let mut out = String::with_capacity(4096);
            out.push('[');
            while let Some(tool) = seq.next_element::<&'de RawValue>()? {
                let permitted = serde_json::from_str::<ToolName<'_>>(tool.get())
                    .ok()
                    .and_then(|n| n.name)
                    .is_some_and(|n| self.rule.keep(&n, tool));
                if permitted {
                    if out.len() > 1 {
                        out.push(',');
                    }
                    out.push_str(tool.get());
                }
            }
            out.push(']');
            Ok(out)
        }
    }
}

/// The general path: parses each level separately, so it copes with any shape.
fn filter_message_general(
    msg: &RawValue,
    rule: &dyn ToolGate,
) -> Result<Option<String>, Unfilterable> {
    let Ok(top) = serde_json::from_str::<Members<'_>>(msg.get()) else {
        return Ok(None);
    };
    let Some(result_raw) = top.get("result")? else {
        return Ok(None);
    };
    let Ok(result) = serde_json::from_str::<Members<'_>>(result_raw.get()) else {
        return Ok(None);
    };
    let Some(tools_raw) = result.get("tools")? else {
        return Ok(None);
    };
    let tools: Vec<&RawValue> = serde_json::from_str(tools_raw.get()).map_err(|_| Unfilterable)?;
    let mut kept = String::with_capacity(tools_raw.get().len());
    kept.push('[');
    for t in tools {
        let permitted = serde_json::from_str::<ToolName<'_>>(t.get())
            .ok()
            .and_then(|n| n.name)
            .is_some_and(|n| rule.keep(&n, t));
        if permitted {
            if kept.len() > 1 {
                kept.push(',');
            }
            kept.push_str(t.get());
        }
    }
    kept.push(']');
    let mut new_result = String::with_capacity(result_raw.get().len());
    result.write_with("tools", &kept, &mut new_result);
    let mut out = String::with_capacity(msg.get().len());
    top.write_with("result", &new_result, &mut out);
    Ok(Some(out))
}

/// Rewrites a JSON body (object or batch array) answering a request that held `tools/list`.
/// Every message carrying `result.tools` is filtered, whatever its id says: matching by id
/// would let a response with a duplicated or odd id slip through unfiltered. `None` when the
/// body is not JSON or holds a list that cannot be checked (the caller refuses it).
pub fn filter_json(body: &[u8], rule: &dyn ToolGate) -> Option<Vec<u8>> {
    crate::mcp::transform::each_message(body, |m| filter_message(m, rule))
}

/// An incremental SSE filter: each complete event's data goes through the request's
/// response-transform chain.
pub struct SseFilter {
    transform: Transform,
    splitter: SseSplitter,
}

impl SseFilter {
    /// A filter applying `policy`'s tool rule (and nothing else).
    pub fn new(policy: Arc<Policy>) -> Self {
        Self::with(Transform::tools_only(policy))
    }

    /// A filter applying a whole transform chain.
    pub fn with(transform: Transform) -> Self {
        Self {
            transform,
            splitter: SseSplitter::default(),
        }
    }

    /// Feeds bytes; returns the complete events, filtered. Err when an event exceeds the cap.
    pub fn push(&mut self, data: &[u8]) -> Result<Vec<u8>, &'static str> {
        let mut out = Vec::with_capacity(data.len());
        let Self {
            transform,
            splitter,
        } = self;
        splitter.push(data, |event| emit(transform, event, &mut out))?;
        Ok(out)
    }

    /// Whatever is complete at the end of the stream (an unterminated event is dropped, as a
    /// client would drop it).
    pub fn finish(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let Self {
            transform,
            splitter,
        } = self;
        splitter.finish(|event| emit(transform, event, &mut out));
        out
    }

    /// The transform chain, for what it noted on the way (audit facts).
    pub fn transform_mut(&mut self) -> &mut Transform {
        &mut self.transform
    }
}

fn emit(transform: &mut Transform, event: &[u8], out: &mut Vec<u8>) {
    // Bytes that are not UTF-8 are not checked as any client will read them: the event is
    // dropped, as a JSON body that is not UTF-8 is refused.
    let Ok(text) = std::str::from_utf8(event) else {
        tracing::warn!(target: "mcp_guard::filter", "dropped an SSE event that is not UTF-8");
        return;
    };
    let mut data = String::new();
    let mut other: Vec<std::borrow::Cow<'_, str>> = Vec::new();
    let mut comment = false;
    for line in sse_lines(text) {
        // Field names as the SSE specification parses them: up to the first colon, or the
        // whole line (a value-less field).
        let (field, value) = split_field(line);
        match field {
            "data" => {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(value);
            }
            // A comment is relayed emptied (it may keep a connection alive; its text is
            // upstream text nobody checks).
            "" if !line.is_empty() && !comment => {
                comment = true;
                other.push(":".into());
            }
            // The event type and the id reach the client (an id becomes its Last-Event-ID):
            // upstream text, redacted like the data. A marker holding a line break would end
            // the line early: blanks stand in for them.
            "event" | "id" => other.push(match transform.redact_field(value) {
                Some(v) => format!("{field}: {}", v.replace(['\r', '\n'], " ")).into(),
                None => line.into(),
            }),
            // A reconnection delay is ASCII digits; anything else clients ignore, so it goes.
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                other.push(line.into())
            }
            // Anything else clients ignore: only what was checked goes out.
            _ => {}
        }
    }
    if !data.is_empty() {
        // One message or a batch array: every message in it carrying `result.tools` is
        // filtered; anything that cannot be checked is dropped, never relayed.
        match transform.json(data.as_bytes()).map(String::from_utf8) {
            Some(Ok(rewritten)) => data = rewritten,
            _ => {
                tracing::warn!(target: "mcp_guard::filter", "dropped an SSE event the response checks cannot read");
                return;
            }
        }
    }
    // Lines are re-emitted with LF endings only, so what the client parses is exactly
    // what was checked, whatever line endings the upstream used.
    for l in &other {
        out.extend_from_slice(l.as_bytes());
        out.push(b'\n');
    }
    // Multi-line data stays multi-line: each line is its own `data:` field.
    if !data.is_empty() {
        for line in data.split('\n') {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(line.as_bytes());
            out.push(b'\n');
        }
    }
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::Matcher;
    use serde_json::Value;

    fn rule() -> Rule {
        Rule {
            allow: Matcher::new(&["read_*"]),
            deny: Matcher::new(&["read_secret"]),
        }
    }

    const LIST: &str = r#"{"jsonrpc":"2.0","id":3,"result":{"tools":[{"name":"read_file"},{"name":"read_secret"},{"name":"delete"}],"nextCursor":"c2"}}"#;

    #[test]
    fn a_tool_with_a_second_spelling_of_its_name_is_dropped() {
        // `echo` is permitted; a case-folding client reading `Name` (last wins) would list `add`.
        for second in ["Name", "NAME", "nAme"] {
            let body = format!(
                r#"{{"jsonrpc":"2.0","id":1,"result":{{"tools":[{{"name":"read_a","{second}":"delete"}},{{"name":"read_b"}}]}}}}"#
            );
            let out = filter_json(body.as_bytes(), &rule()).unwrap();
            let v: Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(
                v["result"]["tools"],
                serde_json::json!([{"name": "read_b"}]),
                "{second}"
            );
        }
    }

    #[test]
    fn json_responses_keep_only_permitted_tools_and_the_cursor() {
        let out = filter_json(LIST.as_bytes(), &rule()).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["result"]["tools"].as_array().unwrap().len(), 1);
        assert_eq!(v["result"]["tools"][0]["name"], "read_file");
        assert_eq!(v["result"]["nextCursor"], "c2");
        assert_eq!(v["id"], 3);
        // Batches: each element with result.tools is filtered, the rest copied verbatim.
        let batch = format!(r#"[{LIST},{{"jsonrpc":"2.0","id":4,"result":{{}}}}]"#);
        let out = filter_json(batch.as_bytes(), &rule()).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v[0]["result"]["tools"].as_array().unwrap().len(), 1);
        assert_eq!(v[1]["id"], 4);
        // A duplicated id cannot smuggle the list past the filter.
        let dup = LIST.replacen("\"id\":3", "\"id\":3,\"id\":3", 1);
        let out = filter_json(dup.as_bytes(), &rule()).unwrap();
        assert!(!String::from_utf8(out).unwrap().contains("read_secret"));
        assert!(filter_json(b"not json", &rule()).is_none());
        // Duplicated members that would decide what a client sees are refused.
        let dup_result =
            r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"read_secret"}]},"result":0}"#;
        assert!(filter_json(dup_result.as_bytes(), &rule()).is_none());
        let dup_tools =
            r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"read_secret"}],"tools":[]}}"#;
        assert!(filter_json(dup_tools.as_bytes(), &rule()).is_none());
        // Nor may a copy differing only in case sit beside the member that was filtered.
        let case_tools =
            r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[],"Tools":[{"name":"read_secret"}]}}"#;
        assert!(filter_json(case_tools.as_bytes(), &rule()).is_none());
        let case_result = r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[]},"RESULT":{"tools":[{"name":"read_secret"}]}}"#;
        assert!(filter_json(case_result.as_bytes(), &rule()).is_none());
        // Key order is kept.
        let out = filter_json(LIST.as_bytes(), &rule()).unwrap();
        assert!(
            String::from_utf8(out)
                .unwrap()
                .starts_with(r#"{"jsonrpc":"2.0","id":3,"result":{"tools":["#)
        );
    }

    #[test]
    fn the_usual_shape_takes_the_one_pass_path() {
        let out = fast::filter(LIST, &rule()).expect("fast path");
        assert!(out.contains("read_file") && !out.contains("read_secret"));
    }

    #[test]
    fn sse_lines_ending_in_cr_or_crlf_are_filtered_too() {
        let policy = Arc::new(Policy {
            tools: rule(),
            ..Policy::default()
        });
        for stream in [
            format!("event: message\rdata: {LIST}\r\r"),
            format!("event: message\r\ndata: {LIST}\r\n\r\n"),
            format!("event: message\ndata: {LIST}\n\n"),
        ] {
            let mut f = SseFilter::new(policy.clone());
            let mut out = Vec::new();
            for chunk in stream.as_bytes().chunks(5) {
                out.extend(f.push(chunk).unwrap());
            }
            out.extend(f.finish());
            let text = String::from_utf8(out).unwrap();
            assert!(text.contains("read_file"), "{stream:?} -> {text:?}");
            assert!(!text.contains("read_secret"), "{stream:?} -> {text:?}");
        }
    }

    #[test]
    fn sse_events_holding_a_batch_array_are_filtered_too() {
        let policy = Arc::new(Policy {
            tools: rule(),
            ..Policy::default()
        });
        let mut f = SseFilter::new(policy);
        let stream = format!(
            "event: message\ndata: [{LIST},{{\"jsonrpc\":\"2.0\",\"id\":9,\"result\":{{}}}}]\n\n"
        );
        let mut out = f.push(stream.as_bytes()).unwrap();
        out.extend(f.finish());
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("read_file"), "{text}");
        assert!(!text.contains("read_secret"), "{text}");
        assert!(text.contains("\"id\":9"), "{text}");
        // A batch holding a list that cannot be checked is dropped whole.
        let mut f = SseFilter::new(Arc::new(Policy {
            tools: rule(),
            ..Policy::default()
        }));
        let bad = "data: [{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"tools\":{}}}]\n\n";
        assert!(f.push(bad.as_bytes()).unwrap().is_empty());
    }

    #[test]
    fn a_byte_order_mark_before_the_first_event_does_not_hide_it_from_the_filter() {
        let policy = Arc::new(Policy {
            tools: rule(),
            ..Policy::default()
        });
        let stream = format!("\u{feff}data: {LIST}\n\n");
        for split in [1, 2, 3, 7] {
            let mut f = SseFilter::new(policy.clone());
            let mut out = Vec::new();
            for chunk in stream.as_bytes().chunks(split) {
                out.extend(f.push(chunk).unwrap());
            }
            out.extend(f.finish());
            let text = String::from_utf8(out).unwrap();
            assert!(text.contains("read_file"), "{text:?}");
            assert!(!text.contains("read_secret"), "{text:?}");
        }
        // A value-less `data` line is a data field too; unknown fields do not pass through.
        let mut f = SseFilter::new(policy);
        let mut out = f
            .push(format!("data\nweird: {LIST}\ndata: {LIST}\n\n").as_bytes())
            .unwrap();
        out.extend(f.finish());
        let text = String::from_utf8(out).unwrap();
        assert!(
            !text.contains("read_secret") && !text.contains("weird"),
            "{text:?}"
        );
    }

    #[test]
    fn sse_events_are_filtered_across_chunk_boundaries() {
        let stream = format!(
            "event: message\ndata: {{\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}}\n\nevent: message\nid: 7\ndata: {LIST}\n\n"
        );
        let policy = Arc::new(Policy {
            tools: rule(),
            ..Policy::default()
        });
        let mut f = SseFilter::new(policy);
        let mut out = Vec::new();
        for chunk in stream.as_bytes().chunks(7) {
            out.extend(f.push(chunk).unwrap());
        }
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("notifications/progress"));
        assert!(text.contains("id: 7\n"));
        assert!(text.contains("read_file"));
        assert!(!text.contains("read_secret"));
        assert!(!text.contains("\"delete\""));
    }
}
