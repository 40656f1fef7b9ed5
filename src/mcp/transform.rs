//! The response-transform chain: every JSON-RPC message an upstream sends toward a client
//! passes through one [`Transform`], built per request from what applies to it, whatever the
//! upstream kind and whatever the framing (a JSON body, one message or a batch; an SSE event of
//! a POST's answer or of a server-to-client stream; a message relayed from a stdio child or a
//! legacy SSE session).
//!
//! Steps, in order, each on the output of the one before:
//! - the `tools/list` filter: a caller only sees the tools its policy lets it call;
//! - tool-definition pinning (`crate::pinning`), in the same pass: a tool whose definition
//!   is not the pinned one is reported, and dropped in `hide` and `block` modes;
//! - secret redaction (`[redaction]`): every message of every answer, on every upstream
//!   kind, since anything a server sends may reach the model (see `mcp::redact`).
//!
//! The tool gates (the filter and pinning) look at every message of every answer, not only
//! at answers to a `tools/list`: a client matches responses by id, so an upstream could slip a
//! tool list into the stream answering another request, under the id of a `tools/list` still
//! pending. One strict scan per body (`mcp::json_scan`) checks it is JSON and finds the lists,
//! so an answer without one costs that scan and nothing more.
//!
//! A message a step cannot check is dropped (an SSE event) or refused (a JSON body): nothing
//! unchecked reaches the client. A request to which no step applies gets no `Transform` at
//! all and its answer is relayed byte for byte.

use crate::authz::Policy;
use crate::config::Settings;
use crate::mcp::filter::{ToolGate, Unfilterable, filter_message};
use crate::mcp::json_scan::{self, Message};
use crate::mcp::jsonrpc::{Body, Kind, is_spec_tool_name};
use crate::mcp::redact::Redactor;
use std::sync::Arc;

/// What a request's answers may carry, so that steps which cannot apply cost nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Expect {
    /// A `tools/list` result.
    pub tool_list: bool,
    /// A `tools/call` result.
    pub tool_result: bool,
}

impl Expect {
    /// A stream (a GET, a legacy session): any message at all.
    pub const ANY: Expect = Expect {
        tool_list: true,
        tool_result: true,
    };

    /// For a POST: what its requests ask for (a batch: any of them).
    pub fn of(body: &Body) -> Expect {
        let mut e = Expect::default();
        for m in body.messages() {
            if m.kind == Kind::Request {
                match m.method_str() {
                    "tools/list" => e.tool_list = true,
                    "tools/call" => e.tool_result = true,
                    _ => {}
                }
            }
        }
        e
    }
}

/// Most audit notes one request keeps.
pub const MAX_DETAILS: usize = 32;

/// The pinning step: the pins, the route's server and the settings of the snapshot.
struct PinStep {
    pins: Arc<crate::pinning::Pins>,
    server: Arc<str>,
    settings: crate::pinning::PinSettings,
    /// What the pin checks noted (the gate decides through `&self`).
    notes: std::cell::RefCell<Vec<(&'static str, String)>>,
}

/// The steps that apply to one request's answers.
pub struct Transform {
    /// The caller's policy, when its tool rule restricts what `tools/list` may show.
    tools: Option<Arc<Policy>>,
    /// `server.strict_tool_names`: a tool whose name a call would be refused for is not shown
    /// to a caller the tool rule applies to (it could only serve to spoof a name in a client's
    /// interface or carry text into a model's prompt).
    strict_names: bool,
    /// Tool-definition pinning, when on.
    pins: Option<PinStep>,
    /// Secret redaction, with how often each detector fired on this request's answers.
    redact: Option<(Arc<Redactor>, Vec<u32>)>,
    /// What the steps noted for the request's audit event (`details`), in order.
    details: Vec<(&'static str, String)>,
}

impl Transform {
    /// A chain holding only the `tools/list` filter of `policy`.
    pub fn tools_only(policy: Arc<Policy>) -> Self {
        Self {
            tools: Some(policy),
            strict_names: true,
            pins: None,
            redact: None,
            details: Vec::new(),
        }
    }

    /// A chain holding only secret redaction by `redactor` (benches and tests).
    pub fn redaction_only(redactor: Arc<Redactor>) -> Self {
        let fired = vec![0; redactor.len()];
        Self {
            tools: None,
            strict_names: true,
            pins: None,
            redact: Some((redactor, fired)),
            details: Vec::new(),
        }
    }

    /// The chain for a request to route `route` of `cfg` by a caller with `policy`, `None`
    /// when no step applies (the answer is relayed as is). `expect`: what its answers may
    /// carry.
    pub fn for_request(
        cfg: &Settings,
        route: usize,
        policy: &Arc<Policy>,
        expect: Expect,
    ) -> Option<Self> {
        // `expect` does not narrow the tool gates (see the module doc): any answer may carry
        // a list.
        let _ = expect;
        // A shadow identity's lists are not filtered: shadow changes nothing for the caller.
        let tools = policy.filters_lists().then(|| policy.clone());
        // Every caller's lists are checked, restricted or not: pins are per server.
        let pins = match (&cfg.pins, &cfg.pinning, cfg.routes.get(route)) {
            (Some(pins), Some(settings), Some(r)) => Some(PinStep {
                pins: pins.clone(),
                server: r.name.clone(),
                settings: settings.clone(),
                notes: Default::default(),
            }),
            _ => None,
        };
        // Not only tool results: an `initialize`'s instructions, a resource, a prompt, a
        // tool's description, a sampling request or a log message reach the model as well.
        let redact = cfg
            .redaction
            .as_ref()
            .filter(|r| !r.is_empty())
            .map(|r| (r.clone(), vec![0; r.len()]));
        (tools.is_some() || pins.is_some() || redact.is_some()).then_some(Self {
            tools,
            strict_names: cfg.server.strict_tool_names,
            pins,
            redact,
            details: Vec::new(),
        })
    }

    /// Notes `value` under `name` for the audit event: once per distinct pair, and at most
    /// [`MAX_DETAILS`] of them (a stream may run for hours; its one audit event stays bounded).
    pub fn note(&mut self, name: &'static str, value: String) {
        if self.details.len() < MAX_DETAILS
            && !self.details.iter().any(|(n, v)| *n == name && *v == value)
        {
            self.details.push((name, value));
        }
    }

    /// What the steps noted since the last call, for the request's audit event (texts).
    pub fn take_details(&mut self) -> Vec<(&'static str, serde_json::Value)> {
        let pinned = self
            .pins
            .as_ref()
            .map(|p| std::mem::take(&mut *p.notes.borrow_mut()))
            .unwrap_or_default();
        for (name, value) in pinned {
            self.note(name, value);
        }
        if let Some((r, fired)) = &mut self.redact
            && fired.iter().any(|n| *n > 0)
        {
            // Names and counts only, never what was matched.
            let fired_list = fired
                .iter()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(|(i, n)| format!("{}={n}", r.name(i)))
                .collect::<Vec<_>>()
                .join(",");
            fired.iter_mut().for_each(|n| *n = 0);
            self.note("redacted", fired_list);
        }
        std::mem::take(&mut self.details)
            .into_iter()
            .map(|(k, v)| (k, serde_json::Value::String(v)))
            .collect()
    }

    /// One JSON body (a message or a batch array) through the chain; `None` when it is not
    /// JSON or holds something a step cannot check (the caller refuses or drops it).
    pub fn json(&mut self, body: &[u8]) -> Option<Vec<u8>> {
        self.rewrite(body)
            .map(|changed| changed.unwrap_or_else(|| body.to_vec()))
    }

    /// [`Self::json`] without the copy of an unchanged body: `Some(None)` when every step
    /// left it as it was (the caller relays its own bytes).
    pub fn rewrite(&mut self, body: &[u8]) -> Option<Option<Vec<u8>>> {
        let find_tools = self.gates_tools();
        rewrite_messages(body, find_tools, |m| self.message(m))
    }

    /// One message through every step: `Ok(Some(rewritten))`, `Ok(None)` when nothing changed.
    fn message(&mut self, msg: &Message<'_>) -> Result<Option<String>, Unfilterable> {
        let filtered = if let Some(list) = &msg.tools {
            // Every tool gate of the chain decides in the one pass over the list.
            let out = filter_message(msg, &*self)?;
            if let (Some(p), Some(_)) = (&self.pins, &out)
                && !list.next_cursor
            {
                // A page without `nextCursor` ends a listing: first use is over for the server.
                p.pins.seal(&p.server);
            }
            out
        } else {
            None
        };
        if let Some((r, fired)) = &mut self.redact {
            let text = filtered.as_deref().unwrap_or(msg.text);
            if let Some(redacted) = r.message(text, fired)? {
                return Ok(Some(redacted));
            }
        }
        Ok(filtered)
    }

    /// One SSE field value an upstream sends besides the data (`event`, `id`) through the
    /// redaction: `Some(redacted)` when a detector fired, `None` when it did not or redaction
    /// is off.
    pub fn redact_field(&mut self, value: &str) -> Option<String> {
        let (r, fired) = self.redact.as_mut()?;
        r.redact_str(value, fired)
    }

    /// Whether some step decides which tools a `tools/list` answer keeps.
    fn gates_tools(&self) -> bool {
        self.tools.is_some() || self.pins.is_some()
    }
}

impl ToolGate for Transform {
    fn keep(&self, name: &str, tool: &str) -> bool {
        let permitted = self.tools.as_ref().is_none_or(|p| {
            p.tools.keep(name, tool) && (!self.strict_names || is_spec_tool_name(name))
        });
        // Checked even when the policy drops the tool: a change is found by the first list
        // that shows it, whoever asked.
        let pinned = self.pins.as_ref().is_none_or(|p| {
            let mut notes = p.notes.borrow_mut();
            let keep = p.pins.keep(&p.settings, &p.server, name, tool, &mut notes);
            notes.truncate(MAX_DETAILS);
            keep
        });
        permitted && pinned
    }
}

/// Applies `step` to each message of a JSON body (an object, or each member of a batch
/// array), keeping the messages it leaves unchanged byte for byte. `find_tools`: whether the
/// scan looks for `result.tools` lists (else messages reach `step` without one). `None` when
/// the body is not JSON, holds a list that cannot be checked, or a step refuses a message.
pub fn each_message(
    body: &[u8],
    find_tools: bool,
    step: impl FnMut(&Message<'_>) -> Result<Option<String>, Unfilterable>,
) -> Option<Vec<u8>> {
    rewrite_messages(body, find_tools, step).map(|changed| changed.unwrap_or_else(|| body.to_vec()))
}

/// [`each_message`], saying `Some(None)` rather than copying a body no step changed.
fn rewrite_messages(
    body: &[u8],
    find_tools: bool,
    mut step: impl FnMut(&Message<'_>) -> Result<Option<String>, Unfilterable>,
) -> Option<Option<Vec<u8>>> {
    let text = simdutf8::basic::from_utf8(body).ok()?;
    let scanned = json_scan::body(text, find_tools).ok()?;
    // Built only once a message changes: the rewritten messages, and the original bytes
    // between them.
    let mut out: Option<String> = None;
    let mut copied = 0;
    for m in &scanned.messages {
        let Some(rewritten) = step(m).ok()? else {
            continue;
        };
        if !scanned.batch {
            return Some(Some(rewritten.into_bytes()));
        }
        let o = out.get_or_insert_with(|| String::with_capacity(text.len()));
        o.push_str(text.get(copied..m.span.start)?);
        o.push_str(&rewritten);
        copied = m.span.end;
    }
    match out {
        Some(mut o) => {
            o.push_str(text.get(copied..)?);
            Some(Some(o.into_bytes()))
        }
        None => Some(None),
    }
}
