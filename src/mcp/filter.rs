//! `tools/list` filtering: a caller only ever sees the tools its policy lets it call.
//!
//! Plain JSON responses (one message or a batch array) are rewritten whole; SSE responses are
//! rewritten event by event as they stream, so other events are not held back. Everything but
//! the `tools` array (ids, `nextCursor`, `_meta`) is kept. A `tools/list` answer that cannot be
//! parsed is dropped rather than forwarded unchecked.

use crate::authz::{Policy, Rule};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Only what filtering needs of a tool; everything else in it is copied through verbatim.
#[derive(Deserialize)]
struct ToolName<'a> {
    #[serde(borrow)]
    name: Option<Cow<'a, str>>,
}

/// Filters one JSON-RPC message: `Some(rewritten)` when it is a response carrying
/// `result.tools`, `None` when there is nothing to filter. Tools are kept as the raw bytes the
/// upstream sent; only their names are parsed.
fn filter_message(msg: &RawValue, rule: &Rule) -> Option<String> {
    let mut top: BTreeMap<Cow<'_, str>, &RawValue> = serde_json::from_str(msg.get()).ok()?;
    let result_raw = *top.get("result")?;
    let mut result: BTreeMap<Cow<'_, str>, &RawValue> =
        serde_json::from_str(result_raw.get()).ok()?;
    let tools: Vec<&RawValue> = serde_json::from_str(result.get("tools")?.get()).ok()?;
    let kept: Vec<&RawValue> = tools
        .into_iter()
        .filter(|t| {
            serde_json::from_str::<ToolName<'_>>(t.get())
                .ok()
                .and_then(|n| n.name)
                .is_some_and(|n| rule.permits(&n))
        })
        .collect();
    let kept_json = serde_json::to_string(&kept).ok()?;
    let kept_raw = RawValue::from_string(kept_json).ok()?;
    result.insert(Cow::Borrowed("tools"), &kept_raw);
    let result_json = RawValue::from_string(serde_json::to_string(&result).ok()?).ok()?;
    top.insert(Cow::Borrowed("result"), &result_json);
    serde_json::to_string(&top).ok()
}

/// Rewrites a JSON body (object or batch array) answering a request that held `tools/list`.
/// Every message carrying `result.tools` is filtered, whatever its id says: matching by id
/// would let a response with a duplicated or odd id slip through unfiltered. `None` when the
/// body is not JSON (the caller refuses it).
pub fn filter_json(body: &[u8], rule: &Rule) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(body).ok()?;
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        let items: Vec<&RawValue> = serde_json::from_str(text).ok()?;
        let mut out = String::with_capacity(text.len());
        out.push('[');
        for (i, m) in items.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            match filter_message(m, rule) {
                Some(rewritten) => out.push_str(&rewritten),
                None => out.push_str(m.get()),
            }
        }
        out.push(']');
        return Some(out.into_bytes());
    }
    let msg: &RawValue = serde_json::from_str(text).ok()?;
    match filter_message(msg, rule) {
        Some(rewritten) => Some(rewritten.into_bytes()),
        None => Some(body.to_vec()),
    }
}

/// The largest single SSE event buffered while filtering.
const MAX_EVENT: usize = 16 * 1024 * 1024;

/// An incremental SSE filter.
pub struct SseFilter {
    policy: Arc<Policy>,
    pending: Vec<u8>,
}

impl SseFilter {
    /// A filter applying `policy`'s tool rule.
    pub fn new(policy: Arc<Policy>) -> Self {
        Self {
            policy,
            pending: Vec::new(),
        }
    }

    /// Feeds bytes; returns the complete events, filtered. Err when an event exceeds the cap.
    pub fn push(&mut self, data: &[u8]) -> Result<Vec<u8>, &'static str> {
        self.pending.extend_from_slice(data);
        let mut out = Vec::with_capacity(self.pending.len());
        while let Some((end, sep)) = find_event_end(&self.pending) {
            let event: Vec<u8> = self.pending.drain(..end + sep).collect();
            self.emit(&event[..end], &mut out);
        }
        if self.pending.len() > MAX_EVENT {
            return Err("SSE event too large to filter");
        }
        Ok(out)
    }

    /// Whatever is left at the end of the stream (an unterminated event is dropped).
    pub fn finish(&mut self) -> Vec<u8> {
        self.pending.clear();
        Vec::new()
    }

    fn emit(&self, event: &[u8], out: &mut Vec<u8>) {
        let text = String::from_utf8_lossy(event);
        let mut data = String::new();
        let mut other = Vec::new();
        for line in text.split('\n') {
            let line = line.strip_suffix('\r').unwrap_or(line);
            if let Some(d) = line.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(d.strip_prefix(' ').unwrap_or(d));
            } else {
                other.push(line);
            }
        }
        if !data.is_empty() {
            match serde_json::from_str::<&RawValue>(&data) {
                Ok(raw) => {
                    if let Some(rewritten) = filter_message(raw, &self.policy.tools) {
                        data = rewritten;
                    }
                }
                Err(_) => {
                    tracing::warn!(target: "mcp_guard::filter", "dropped an SSE event that is not JSON in a tools/list response");
                    return;
                }
            }
        }
        for l in other.iter().filter(|l| !l.is_empty()) {
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
}

/// End of the first complete event: (index of its terminating blank line, separator length).
fn find_event_end(b: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i + 1 < b.len() {
        if b[i] == b'\n' {
            if b[i + 1] == b'\n' {
                return Some((i, 2));
            }
            if b[i + 1] == b'\r' && b.get(i + 2) == Some(&b'\n') {
                return Some((i, 3));
            }
        }
        i += 1;
    }
    None
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
