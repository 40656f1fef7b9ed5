//! `tools/list` filtering: a caller only ever sees the tools its policy lets it call.
//!
//! Plain JSON responses (one message or a batch array) are rewritten whole; SSE responses are
//! rewritten event by event as they stream, so other events are not held back. Everything but
//! the `tools` array (ids, `nextCursor`, `_meta`) is kept. A `tools/list` answer that cannot be
//! parsed is dropped rather than forwarded unchecked.

use crate::authz::{Policy, Rule};
use serde_json::Value;
use std::sync::Arc;

/// Filters one JSON-RPC response value in place; returns how many tools were removed.
fn filter_message(msg: &mut Value, rule: &Rule) -> usize {
    let Some(tools) = msg
        .get_mut("result")
        .and_then(|r| r.get_mut("tools"))
        .and_then(Value::as_array_mut)
    else {
        return 0;
    };
    let before = tools.len();
    tools.retain(|t| {
        t.get("name")
            .and_then(Value::as_str)
            .is_some_and(|n| rule.permits(n))
    });
    before - tools.len()
}

/// Whether `msg` answers one of the listed request ids.
fn answers(msg: &Value, list_ids: &[Value]) -> bool {
    msg.get("id").is_some_and(|id| list_ids.contains(id))
}

/// Rewrites a JSON body (object or batch array). `list_ids` are the ids of the `tools/list`
/// requests it answers. `None` when the body is not JSON (the caller refuses it).
pub fn filter_json(body: &[u8], rule: &Rule, list_ids: &[Value]) -> Option<Vec<u8>> {
    let mut v: Value = serde_json::from_slice(body).ok()?;
    match &mut v {
        Value::Array(items) => {
            for m in items.iter_mut().filter(|m| answers(m, list_ids)) {
                filter_message(m, rule);
            }
        }
        m if answers(m, list_ids) => {
            filter_message(m, rule);
        }
        _ => {}
    }
    serde_json::to_vec(&v).ok()
}

/// The largest single SSE event buffered while filtering.
const MAX_EVENT: usize = 16 * 1024 * 1024;

/// An incremental SSE filter.
pub struct SseFilter {
    policy: Arc<Policy>,
    list_ids: Vec<Value>,
    pending: Vec<u8>,
}

impl SseFilter {
    /// A filter for the events answering `list_ids`.
    pub fn new(policy: Arc<Policy>, list_ids: Vec<Value>) -> Self {
        Self {
            policy,
            list_ids,
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
            match serde_json::from_str::<Value>(&data) {
                Ok(mut v) => {
                    if answers(&v, &self.list_ids) {
                        filter_message(&mut v, &self.policy.tools);
                    }
                    data = v.to_string();
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
        if !data.is_empty() {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(data.as_bytes());
            out.push(b'\n');
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

    fn rule() -> Rule {
        Rule {
            allow: Matcher::new(&["read_*"]),
            deny: Matcher::new(&["read_secret"]),
        }
    }

    const LIST: &str = r#"{"jsonrpc":"2.0","id":3,"result":{"tools":[{"name":"read_file"},{"name":"read_secret"},{"name":"delete"}],"nextCursor":"c2"}}"#;

    #[test]
    fn json_responses_keep_only_permitted_tools_and_the_cursor() {
        let out = filter_json(LIST.as_bytes(), &rule(), &[Value::from(3)]).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["result"]["tools"].as_array().unwrap().len(), 1);
        assert_eq!(v["result"]["tools"][0]["name"], "read_file");
        assert_eq!(v["result"]["nextCursor"], "c2");
        // Other responses are untouched.
        let out = filter_json(LIST.as_bytes(), &rule(), &[Value::from(4)]).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["result"]["tools"].as_array().unwrap().len(), 3);
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
        let mut f = SseFilter::new(policy, vec![Value::from(3)]);
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
