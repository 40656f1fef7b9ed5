//! `tools/list` filtering: a caller only ever sees the tools its policy lets it call.
//!
//! Plain JSON responses (one message or a batch array) are rewritten whole; SSE responses are
//! rewritten event by event as they stream, so other events are not held back. Everything but
//! the `tools` array (ids, `nextCursor`, `_meta`) is kept. A `tools/list` answer that cannot be
//! parsed is dropped rather than forwarded unchecked.

use crate::authz::{Policy, Rule};
use crate::http::sse::{SseSplitter, split_field, sse_lines};
use crate::mcp::json_scan::{Message, ToolList};
use crate::mcp::transform::Transform;
use std::sync::Arc;

/// Which tools of a `tools/list` answer go on to the client. The policy's allow/deny rule is
/// one gate; the response-transform chain ([`Transform`]) combines it with the others (pins).
pub trait ToolGate {
    /// Whether the tool named `name`, whose whole definition (the JSON the upstream sent) is
    /// `tool`, is kept.
    fn keep(&self, name: &str, tool: &str) -> bool;
}

impl ToolGate for Rule {
    fn keep(&self, name: &str, _tool: &str) -> bool {
        self.permits(name)
    }
}

/// A message that carries a tool list the filter cannot check (duplicated members, `tools` not
/// an array): refused rather than forwarded.
#[derive(Debug, PartialEq, Eq)]
pub struct Unfilterable;

/// Filters one scanned JSON-RPC message: `Ok(Some(rewritten))` when it carries
/// `result.tools`, `Ok(None)` when there is nothing to filter. The scan
/// ([`crate::mcp::json_scan`]) has already checked the message and read each tool's name:
/// kept tools are copied as the bytes the upstream sent, and everything around the array (ids,
/// `nextCursor`, `_meta`, whitespace) stays as it was.
pub(crate) fn filter_message(
    msg: &Message<'_>,
    gate: &dyn ToolGate,
) -> Result<Option<String>, Unfilterable> {
    let Some(list) = &msg.tools else {
        return Ok(None);
    };
    // One page scope per answer: pinning decides the whole list against one snapshot and
    // publishes its changes once (and decides again when a later copy of a name hides an
    // earlier one); an answer it cannot settle is refused.
    crate::pinning::page::run(|| keep_permitted(msg.text, list, gate))
        .flatten()
        .map(Some)
        .ok_or(Unfilterable)
}

/// `text` with its tool list holding only the tools `gate` keeps. A tool without a name a
/// client would agree on is never kept.
fn keep_permitted(text: &str, list: &ToolList<'_>, gate: &dyn ToolGate) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    out.push_str(text.get(..list.array.start)?);
    out.push('[');
    let mut first = true;
    for tool in &list.tools {
        if tool
            .name
            .as_deref()
            .is_some_and(|name| gate.keep(name, tool.raw))
        {
            if !first {
                out.push(',');
            }
            first = false;
            out.push_str(tool.raw);
        }
    }
    out.push(']');
    out.push_str(text.get(list.array.end..)?);
    Some(out)
}

/// Rewrites a JSON body (object or batch array) answering a request that held `tools/list`.
/// Every message carrying `result.tools` is filtered, whatever its id says: matching by id
/// would let a response with a duplicated or odd id slip through unfiltered. `None` when the
/// body is not JSON or holds a list that cannot be checked (the caller refuses it).
pub fn filter_json(body: &[u8], rule: &dyn ToolGate) -> Option<Vec<u8>> {
    crate::mcp::transform::each_message(body, true, |m| filter_message(m, rule))
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
            // Nine digits (over eleven days) is more than any real delay and shorter than any
            // card number, so a digit run the detectors would have to read never rides here.
            "retry"
                if (1..=9).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_digit()) =>
            {
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

    fn kept_names(out: &[u8]) -> Vec<String> {
        let v: Value = serde_json::from_slice(out).unwrap();
        v["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn kept_tools_are_the_upstreams_bytes_and_the_rest_is_untouched() {
        let body = r#"{"jsonrpc":"2.0", "id":"a", "result":{ "_meta":{"k":[1, 2]}, "tools":[ {"name":"delete"} , {"name" : "read_file", "description":"R\u00e9ads.\n", "x":1.50e+3} ,{"name":"read_b"},{"name":"delete_2"}] , "nextCursor":"c2"}}"#;
        let out = String::from_utf8(filter_json(body.as_bytes(), &rule()).unwrap()).unwrap();
        assert_eq!(
            out,
            r#"{"jsonrpc":"2.0", "id":"a", "result":{ "_meta":{"k":[1, 2]}, "tools":[{"name" : "read_file", "description":"R\u00e9ads.\n", "x":1.50e+3},{"name":"read_b"}] , "nextCursor":"c2"}}"#
        );
        // Whichever tools are dropped (first, last, all, none), the commas stay right.
        for (tools, kept) in [
            (r#"{"name":"delete"},{"name":"read_a"}"#, vec!["read_a"]),
            (r#"{"name":"read_a"},{"name":"delete"}"#, vec!["read_a"]),
            (r#"{"name":"delete"},{"name":"read_secret"}"#, vec![]),
            (
                r#"{"name":"read_a"},{"name":"read_b"}"#,
                vec!["read_a", "read_b"],
            ),
            ("", vec![]),
        ] {
            let body = format!(r#"{{"result":{{"tools":[{tools}]}}}}"#);
            assert_eq!(
                kept_names(&filter_json(body.as_bytes(), &rule()).unwrap()),
                kept,
                "{tools}"
            );
        }
    }

    #[test]
    fn names_and_members_are_read_after_unescaping() {
        let body = r#"{"result":{"tools":[{"na\u006de":"read_secr\u0065t"},{"na\u006de":"r\u0065ad_a"}]}}"#;
        assert_eq!(
            kept_names(&filter_json(body.as_bytes(), &rule()).unwrap()),
            ["read_a"]
        );
        // An escaped `tools` or `result` is still the list.
        let body = r#"{"res\u0075lt":{"t\u006fols":[{"name":"read_secret"},{"name":"read_a"}]}}"#;
        let out = filter_json(body.as_bytes(), &rule()).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("read_a") && !text.contains("read_secret"),
            "{text}"
        );
    }

    #[test]
    fn a_lone_surrogate_in_some_key_does_not_let_the_list_through_unfiltered() {
        // Lenient decoders (JavaScript's JSON.parse, Python's json) read such keys; the list
        // beside them is the list a client sees.
        for body in [
            r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"read_secret"},{"name":"read_a"}],"x\ud800":1}}"#,
            r#"{"jsonrpc":"2.0","id":1,"\udfff":0,"result":{"tools":[{"name":"read_secret"},{"name":"read_a"}]}}"#,
        ] {
            let out = filter_json(body.as_bytes(), &rule()).expect("checked");
            let text = String::from_utf8(out).unwrap();
            assert!(
                text.contains("read_a") && !text.contains("read_secret"),
                "{text}"
            );
        }
        // In a name, it leaves the tool without a name: dropped.
        let body = r#"{"result":{"tools":[{"name":"read_\ud800"},{"name":"read_a"}]}}"#;
        assert_eq!(
            kept_names(&filter_json(body.as_bytes(), &rule()).unwrap()),
            ["read_a"]
        );
    }

    #[test]
    fn a_tools_member_nested_inside_a_tool_is_part_of_that_tool() {
        let body = r#"{"result":{"tools":[{"inputSchema":{"tools":[{"name":"read_a"}]},"name":"delete"},{"name":"read_b","x":{"name":"delete","tools":[{"name":"delete"}]}}]}}"#;
        let out = filter_json(body.as_bytes(), &rule()).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"result":{"tools":[{"name":"read_b","x":{"name":"delete","tools":[{"name":"delete"}]}}]}}"#
        );
        // Elements that are not objects have no name and go.
        let body = r#"{"result":{"tools":["read_a",["read_a"],null,1,{"name":"read_a"}]}}"#;
        assert_eq!(
            kept_names(&filter_json(body.as_bytes(), &rule()).unwrap()),
            ["read_a"]
        );
    }

    #[test]
    fn an_answer_that_is_not_json_is_refused_whole() {
        for body in [
            format!("{LIST}x"),
            format!("{LIST}{LIST}"),
            LIST.replace("]", ""),
            LIST.replace("\"read_file\"", "\"read_\u{1}file\""),
            LIST.replace("3", "03"),
            format!("[{LIST},]"),
            format!("[{LIST},{{\"id\":}}]"),
        ] {
            assert!(filter_json(body.as_bytes(), &rule()).is_none(), "{body}");
        }
        assert!(filter_json(b"\xff{}", &rule()).is_none());
        // A batch keeps its other messages byte for byte, whitespace included.
        let batch = format!("[ {{\"id\": 9, \"result\": {{}} }} ,{LIST} ]");
        let out = String::from_utf8(filter_json(batch.as_bytes(), &rule()).unwrap()).unwrap();
        assert!(
            out.starts_with("[ {\"id\": 9, \"result\": {} } ,{"),
            "{out}"
        );
        assert!(out.ends_with("\"nextCursor\":\"c2\"}} ]"), "{out}");
        assert!(!out.contains("read_secret"));
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
