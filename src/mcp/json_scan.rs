//! One strict pass over a JSON answer body for the response-transform chain: it checks that
//! the body is JSON (as strictly as serde_json reads it), splits a batch into its messages and
//! finds each message's `result.tools` array, the byte range of every element and each
//! element's `name`, so that the `tools/list` filter copies the tools it keeps as slices of the
//! original instead of parsing the answer again.
//!
//! Members that decide what a client reads are compared after unescaping (`"na\u006de"` is
//! `name`) and against their case-folded twins (`Tools`, `NAME`), which lenient decoders would
//! read instead: where one is duplicated or twinned, the message is refused (`result`, `tools`)
//! or the tool has no name and is dropped (`name`).

use crate::mcp::jsonrpc::folds_to;
use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::ops::Range;

/// Why a body cannot be relayed as checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Not JSON.
    Invalid,
    /// A message whose tool list cannot be checked: `result` or `tools` given twice (or beside
    /// a member differing only in case), `tools` not an array, or a batch nested in a batch.
    Unfilterable,
}

/// A body: one message, or the messages of a batch array, in order.
#[derive(Debug)]
pub struct Body<'a> {
    /// Whether the body is a batch array.
    pub batch: bool,
    /// The messages, in order.
    pub messages: Vec<Message<'a>>,
}

/// One message of a body (any JSON value: a batch may hold anything).
#[derive(Debug)]
pub struct Message<'a> {
    /// Where it lies in the body.
    pub span: Range<usize>,
    /// Its text.
    pub text: &'a str,
    /// Its `result.tools`, when the scan looked for tool lists and found one.
    pub tools: Option<ToolList<'a>>,
}

/// A message's `result.tools` array.
#[derive(Debug)]
pub struct ToolList<'a> {
    /// Where the array (from `[` to `]`) lies in the message's text.
    pub array: Range<usize>,
    /// Its elements, in order.
    pub tools: Vec<Tool<'a>>,
    /// Whether `result` holds one `nextCursor` and it is not null (more pages follow).
    pub next_cursor: bool,
}

/// One element of a tool list.
#[derive(Debug)]
pub struct Tool<'a> {
    /// The element exactly as the upstream sent it.
    pub raw: &'a str,
    /// Its name: `None` when it is not an object or has no single name a client would agree
    /// on (missing, not a string, given twice, beside a twin, or holding a lone surrogate). A
    /// tool without a name is never kept.
    pub name: Option<Cow<'a, str>>,
}

thread_local! {
    /// The skip stack's buffer, kept between scans on this thread: nearly every answer opens a
    /// container, and a fresh buffer each time was an allocation and a free per answer.
    static SKIP_STACK: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

thread_local! {
    /// The tool lists this thread scanned last, most recent first (see [`KnownList`]).
    static KNOWN_LISTS: RefCell<Vec<KnownList>> = const { RefCell::new(Vec::new()) };
    /// Lists this thread scanned since it last recalled one.
    static UNRECALLED: Cell<usize> = const { Cell::new(0) };
    /// How many tools the last list this thread scanned held: the next scan's vector starts
    /// that large, rather than growing through six reallocations to a hundred tools.
    static LAST_TOOL_COUNT: Cell<usize> = const { Cell::new(0) };
}

/// The largest [`LAST_TOOL_COUNT`] a scan starts its vector with (40 bytes each).
const TOOL_COUNT_HINT_MAX: usize = 1024;

/// How many tool lists a thread keeps: the lists of a few routed upstreams, or a few pages of
/// one.
const KNOWN_LISTS_KEPT: usize = 8;

/// How many kept lists whose ends agree with an answer's list are compared with it whole, at
/// most: lists that differ only inside (a counter in a description) would otherwise cost a
/// compare of each kept list, on every answer, without ever being recalled.
const FULL_COMPARES: usize = 2;

/// After this many lists in a row that were not recalled, only one list in
/// [`KEEP_ONE_IN`] is kept: an upstream whose every list is new (a counter in it) would
/// otherwise cost a copy of each, never used.
const UNRECALLED_BEFORE_SPARING: usize = 2 * KNOWN_LISTS_KEPT;

/// See [`UNRECALLED_BEFORE_SPARING`]: a list that starts repeating is still kept within this
/// many answers.
const KEEP_ONE_IN: usize = 16;

/// The most a kept list may take, its bytes and what the scan found in them together (larger
/// ones are scanned every time): with [`KNOWN_LISTS_KEPT`], at most 2 MiB per thread. The
/// findings count: 256 KiB of `{},{},…` is 87,000 elements, several megabytes of ranges.
const KNOWN_LIST_MAX_BYTES: usize = 256 * 1024;

/// A `tools` array this thread has scanned and accepted, kept with what the scan found in it.
/// An upstream sends the same list to every caller (only the JSON-RPC `id` around it
/// changes), so a list whose bytes are the same bytes again is not scanned again: the scan
/// reads nothing but those bytes, so it would find the same ranges and names. The caller's
/// policy is still asked about every tool; only the parse is remembered, never a decision.
struct KnownList {
    /// The array, from `[` to `]`.
    bytes: Vec<u8>,
    tools: Vec<KnownTool>,
}

/// Forgets the tool lists this thread kept: its next scans read every list afresh (the fuzz
/// checks compare a recalled list with a fresh scan of it).
pub fn forget_tool_lists() {
    KNOWN_LISTS.with_borrow_mut(Vec::clear);
    UNRECALLED.set(0);
}

impl KnownList {
    fn empty() -> Self {
        KnownList {
            bytes: Vec::new(),
            tools: Vec::new(),
        }
    }
}

/// One element of a [`KnownList`], its ranges relative to the array's `[`.
struct KnownTool {
    raw: Range<usize>,
    name: KnownName,
}

enum KnownName {
    None,
    /// The name as it lies in the array (it has no escape).
    Raw(Range<usize>),
    /// The name decoded from its escapes.
    Decoded(Box<str>),
}

#[cfg(test)]
thread_local! {
    /// How many lists this thread's scans recalled (tests tell a recalled list from a scanned one).
    static RECALLED: Cell<usize> = const { Cell::new(0) };
}

/// A skip stack that grew past this (nesting thousands deep, which only an odd or hostile
/// upstream sends) is freed rather than kept for the thread's next scan.
const KEPT_SKIP_STACK: usize = 4096;

/// Scans `text` whole. `find_tools`: look for tool lists (else only check and split it).
pub fn body(text: &str, find_tools: bool) -> Result<Body<'_>, Refused> {
    let mut s = Scanner {
        text,
        bytes: text.as_bytes(),
        pos: 0,
        stack: SKIP_STACK.take(),
        gated: find_tools,
        nested_batch: false,
    };
    let scanned = s.body(find_tools);
    let mut stack = std::mem::take(&mut s.stack);
    if stack.capacity() <= KEPT_SKIP_STACK {
        // A refused scan may leave containers on it.
        stack.clear();
        SKIP_STACK.set(stack);
    }
    scanned
}

impl<'a> Scanner<'a> {
    /// The whole text: one message or a batch of them, and nothing after.
    fn body(&mut self, find_tools: bool) -> Result<Body<'a>, Refused> {
        let s = self;
        let mut messages = Vec::new();
        let batch = s.ws() == Some(b'[');
        if batch {
            s.array(|s| {
                messages.push(s.message(find_tools)?);
                Ok(())
            })?;
        } else {
            messages.push(s.message(find_tools)?);
        }
        if s.ws().is_some() {
            return Err(Refused::Invalid);
        }
        if s.nested_batch {
            return Err(Refused::Unfilterable);
        }
        Ok(Body { batch, messages })
    }
}

/// A JSON string's content (between the quotes) as the scan met it.
struct Str {
    range: Range<usize>,
    escaped: bool,
}

struct Scanner<'a> {
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
    /// The closing bytes of the containers a skipped value is inside (kept on the heap: the
    /// nesting depth is bounded only by the body's size, never by the call stack).
    stack: Vec<u8>,
    /// Tool lists are looked for (a tool gate reads this answer).
    gated: bool,
    /// A batch holds an array, which a gated answer may not (see [`Scanner::message`]).
    nested_batch: bool,
}

impl<'a> Scanner<'a> {
    /// Skips whitespace; the byte there, not consumed (`None` at the end).
    fn ws(&mut self) -> Option<u8> {
        self.pos = skip_ws(self.bytes, self.pos);
        self.bytes.get(self.pos).copied()
    }

    /// One message (any value) at the current position.
    fn message(&mut self, find_tools: bool) -> Result<Message<'a>, Refused> {
        let first = self.ws();
        let start = self.pos;
        // An array inside a batch is no JSON-RPC message, but a client that flattens nested
        // batches would read the lists inside it: a gated answer holding one is refused.
        // (Only once the whole body is read: what is not JSON is refused as that.)
        if find_tools && first == Some(b'[') {
            self.nested_batch = true;
        }
        let mut tools = None;
        if find_tools && first == Some(b'{') {
            let mut seen = false;
            self.object(|s, key| match s.key_match(&key, "result") {
                KeyMatch::Exact if !seen => {
                    seen = true;
                    if s.ws() == Some(b'{') {
                        tools = s.result(start)?;
                        Ok(())
                    } else {
                        s.skip_value()
                    }
                }
                KeyMatch::Exact | KeyMatch::Twin => Err(Refused::Unfilterable),
                KeyMatch::Other => s.skip_value(),
            })?;
        } else {
            self.skip_value()?;
        }
        let span = start..self.pos;
        let text = self.text.get(span.clone()).ok_or(Refused::Invalid)?;
        Ok(Message { span, text, tools })
    }

    /// A message's `result` object; its `tools` array if it has one. `base`: where the
    /// message starts.
    fn result(&mut self, base: usize) -> Result<Option<ToolList<'a>>, Refused> {
        let mut list: Option<ToolList<'a>> = None;
        let mut cursors = 0;
        let mut cursor_set = false;
        self.object(|s, key| {
            let name = s.decode_key(&key);
            if name == "tools" {
                if list.is_some() || s.ws() != Some(b'[') {
                    return Err(Refused::Unfilterable);
                }
                list = Some(s.tools(base)?);
                Ok(())
            } else if folds_to(&name, "tools") {
                Err(Refused::Unfilterable)
            } else {
                if name == "nextCursor" {
                    cursors += 1;
                    cursor_set = s.ws() != Some(b'n');
                }
                s.skip_value()
            }
        })?;
        Ok(list.map(|mut l| {
            l.next_cursor = cursors == 1 && cursor_set;
            l
        }))
    }

    /// The `tools` array at the current position: recalled when this thread scanned the same
    /// bytes lately (see [`KnownList`]), else scanned and remembered.
    fn tools(&mut self, base: usize) -> Result<ToolList<'a>, Refused> {
        let open = self.pos;
        let tools = match self.recall_tools(open) {
            Some(tools) => tools,
            None => {
                let tools = self.scan_tools()?;
                self.remember_tools(open, &tools);
                tools
            }
        };
        Ok(ToolList {
            array: open - base..self.pos - base,
            tools,
            next_cursor: false,
        })
    }

    /// The tools of a known list whose bytes lie at `open`, as slices of this body; the
    /// position is then past the array. The whole kept array is compared, byte for byte: an
    /// array ends at its own closing bracket, so equal bytes are the same array here.
    fn recall_tools(&mut self, open: usize) -> Option<Vec<Tool<'a>>> {
        let here = self.bytes.get(open..)?;
        let text = self.text;
        KNOWN_LISTS.with_borrow_mut(|known| {
            let mut full_compares = 0;
            let at = known
                .iter()
                .position(|k| match ends_agree(here, &k.bytes) {
                    Some(here) if full_compares < FULL_COMPARES => {
                        full_compares += 1;
                        here == &k.bytes[..]
                    }
                    _ => false,
                })?;
            let list = &known[at];
            let slice = |r: &Range<usize>| text.get(open + r.start..open + r.end);
            let mut tools = Vec::with_capacity(list.tools.len());
            for t in list.tools.iter() {
                let name = match &t.name {
                    KnownName::None => None,
                    KnownName::Raw(r) => Some(Cow::Borrowed(slice(r)?)),
                    KnownName::Decoded(n) => Some(Cow::Owned(n.to_string())),
                };
                tools.push(Tool {
                    raw: slice(&t.raw)?,
                    name,
                });
            }
            self.pos = open + list.bytes.len();
            UNRECALLED.set(0);
            #[cfg(test)]
            RECALLED.set(RECALLED.get() + 1);
            // The most recent first: a list sent again soon is found first.
            known[..=at].rotate_right(1);
            Some(tools)
        })
    }

    /// Keeps the list just scanned at `open` (up to the position) for [`Self::recall_tools`].
    fn remember_tools(&self, open: usize, tools: &[Tool<'a>]) {
        let Some(bytes) = self.bytes.get(open..self.pos) else {
            return;
        };
        let findings = tools.len() * std::mem::size_of::<KnownTool>();
        if bytes.len() + findings > KNOWN_LIST_MAX_BYTES {
            return;
        }
        let unrecalled = UNRECALLED.get() + 1;
        UNRECALLED.set(unrecalled);
        if unrecalled > UNRECALLED_BEFORE_SPARING && unrecalled % KEEP_ONE_IN != 0 {
            return;
        }
        // Where a slice of the array lies in it (every slice the scan made is one).
        let start = bytes.as_ptr() as usize;
        let range = |s: &str| {
            let from = (s.as_ptr() as usize).checked_sub(start)?;
            (from + s.len() <= bytes.len()).then_some(from..from + s.len())
        };
        KNOWN_LISTS.with_borrow_mut(|known| {
            // The oldest list's buffers take the new one: no allocation once they are grown.
            let mut list = if known.len() >= KNOWN_LISTS_KEPT {
                known.pop().unwrap_or_else(KnownList::empty)
            } else {
                KnownList::empty()
            };
            list.bytes.clear();
            list.bytes.extend_from_slice(bytes);
            list.tools.clear();
            for t in tools {
                let name = match &t.name {
                    None => KnownName::None,
                    Some(Cow::Borrowed(n)) => match range(n) {
                        Some(r) => KnownName::Raw(r),
                        None => return,
                    },
                    Some(Cow::Owned(n)) => KnownName::Decoded(n.as_str().into()),
                };
                let Some(raw) = range(t.raw) else {
                    return;
                };
                list.tools.push(KnownTool { raw, name });
            }
            known.insert(0, list);
        });
    }

    /// The elements of the `tools` array at the current position, scanned.
    fn scan_tools(&mut self) -> Result<Vec<Tool<'a>>, Refused> {
        // No more than the array's bytes could hold (an element and its comma take two), so a
        // short list after a long one does not start with room it cannot use.
        let room = self.bytes.len().saturating_sub(self.pos) / 2;
        let mut tools = Vec::with_capacity(LAST_TOOL_COUNT.get().min(room));
        self.array(|s| {
            let start = s.pos;
            let name = if s.bytes.get(start) == Some(&b'{') {
                s.tool_name()?
            } else {
                s.skip_value()?;
                None
            };
            let raw = s.text.get(start..s.pos).ok_or(Refused::Invalid)?;
            tools.push(Tool { raw, name });
            Ok(())
        })?;
        LAST_TOOL_COUNT.set(tools.len().min(TOOL_COUNT_HINT_MAX));
        Ok(tools)
    }

    /// A tool object's name (see [`Tool::name`]).
    fn tool_name(&mut self) -> Result<Option<Cow<'a, str>>, Refused> {
        let mut name: Option<Option<Cow<'a, str>>> = None;
        let mut agreed = true;
        self.object(|s, key| match s.key_match(&key, "name") {
            KeyMatch::Exact => {
                agreed &= name.is_none();
                if s.ws() == Some(b'"') {
                    let value = s.string()?;
                    name = Some(s.decode_value(&value));
                    Ok(())
                } else {
                    name = Some(None);
                    s.skip_value()
                }
            }
            KeyMatch::Twin => {
                agreed = false;
                s.skip_value()
            }
            KeyMatch::Other => s.skip_value(),
        })?;
        Ok(name.flatten().filter(|_| agreed))
    }

    /// The object at the current position: `member` gets each key and must consume its value.
    fn object(
        &mut self,
        mut member: impl FnMut(&mut Self, Str) -> Result<(), Refused>,
    ) -> Result<(), Refused> {
        self.pos += 1;
        if self.ws() == Some(b'}') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            let key = self.key()?;
            member(self, key)?;
            match self.ws() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(());
                }
                _ => return Err(Refused::Invalid),
            }
        }
    }

    /// The array at the current position: `element` starts at each element (whitespace
    /// skipped) and must consume it.
    fn array(
        &mut self,
        mut element: impl FnMut(&mut Self) -> Result<(), Refused>,
    ) -> Result<(), Refused> {
        self.pos += 1;
        if self.ws() == Some(b']') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            self.ws();
            element(self)?;
            match self.ws() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(());
                }
                _ => return Err(Refused::Invalid),
            }
        }
    }

    /// A member's key and its colon.
    #[inline(always)]
    fn key(&mut self) -> Result<Str, Refused> {
        let (name, after) = self.member_name(self.pos)?;
        self.pos = after;
        Ok(Str {
            range: name.start..name.end,
            escaped: name.escaped,
        })
    }

    /// [`Self::key`] where only the position after it matters: where the colon of the member
    /// name at or after `i` ends.
    #[inline(always)]
    fn skip_key(&self, i: usize) -> Result<usize, Refused> {
        Ok(self.member_name(i)?.1)
    }

    /// The member name at or after `i` and where its colon ends. Plain integers, not a
    /// [`Str`]: a struct built here and read back there went through memory, with loads the
    /// processor could not forward from the stores (a stall on every key).
    #[inline(always)]
    fn member_name(&self, i: usize) -> Result<(NameSpan, usize), Refused> {
        let b = self.bytes;
        let open = byte_after_ws(b, i, b'"').ok_or(Refused::Invalid)?;
        let (close, escaped) = if self.gated {
            string_end::<true>(b, open)?
        } else {
            string_end::<false>(b, open)?
        };
        let colon = byte_after_ws(b, close + 1, b':').ok_or(Refused::Invalid)?;
        if self.gated && escaped {
            self.refuse_control_in_key(open + 1..close)?;
        }
        Ok((
            NameSpan {
                start: open + 1,
                end: close,
                escaped,
            },
            colon + 1,
        ))
    }

    /// A control character in a member name is read by C decoders that stop at NUL as a
    /// shorter name, and by clients that strip control characters as the name without it:
    /// `"name\u0000"` or `"name\u007f"` would be a second `name` or `tools` to them. An answer
    /// a tool gate reads is refused, not filtered, when any member name in it holds one (the
    /// check runs wherever the scan reads a key, on every key with an escape or a byte from
    /// 0x7f up: DEL and the C1 controls are valid JSON as they are).
    #[cold]
    fn refuse_control_in_key(&self, range: Range<usize>) -> Result<(), Refused> {
        let key = Str {
            range,
            escaped: true,
        };
        if self.decode_key(&key).chars().any(char::is_control) {
            return Err(Refused::Unfilterable);
        }
        Ok(())
    }

    /// Checks one value of any kind and moves past it, without recursion. The position and
    /// the stack of open containers are locals while it runs: kept in the scanner, each push
    /// would make the compiler store and reload the position around it.
    fn skip_value(&mut self) -> Result<(), Refused> {
        let b = self.bytes;
        let mut i = self.pos;
        let mut stack = std::mem::take(&mut self.stack);
        let base = stack.len();
        loop {
            // Strings first, on a branch of their own: most values are strings, and a test
            // the processor predicts costs less than the table jump of the match below.
            if b.get(i) == Some(&b'"') {
                i = string_end::<false>(b, i)?.0 + 1;
            } else {
                match b.get(i) {
                    // Whitespace is skipped only where it is found (compact JSON has none), and
                    // the value is tried again after it.
                    Some(b' ' | b'\t' | b'\n' | b'\r') => {
                        i = skip_ws(b, i + 1);
                        continue;
                    }
                    Some(b'{') => {
                        i = skip_ws(b, i + 1);
                        if b.get(i) == Some(&b'}') {
                            i += 1;
                        } else {
                            stack.push(b'}');
                            i = self.skip_key(i)?;
                            continue;
                        }
                    }
                    Some(b'[') => {
                        i = skip_ws(b, i + 1);
                        if b.get(i) == Some(&b']') {
                            i += 1;
                        } else {
                            stack.push(b']');
                            continue;
                        }
                    }
                    Some(b'-' | b'0'..=b'9') => i = number_end(b, i)?,
                    Some(b't') => i = literal_end(b, i, b"true")?,
                    Some(b'f') => i = literal_end(b, i, b"false")?,
                    Some(b'n') => i = literal_end(b, i, b"null")?,
                    _ => return Err(Refused::Invalid),
                }
            }
            // A value ended: close the containers it ends, or go on to the next value.
            loop {
                let Some(&close) = stack.get(base..).and_then(<[u8]>::last) else {
                    self.pos = i;
                    self.stack = stack;
                    return Ok(());
                };
                match b.get(i) {
                    Some(b' ' | b'\t' | b'\n' | b'\r') => i = skip_ws(b, i + 1),
                    Some(b',') => {
                        i += 1;
                        if close == b'}' {
                            i = self.skip_key(i)?;
                        }
                        break;
                    }
                    Some(&c) if c == close => {
                        i += 1;
                        stack.pop();
                    }
                    _ => return Err(Refused::Invalid),
                }
            }
        }
    }

    /// The string at the current position (on its opening quote).
    #[inline(always)]
    fn string(&mut self) -> Result<Str, Refused> {
        let (close, escaped) = string_end::<false>(self.bytes, self.pos)?;
        let range = self.pos + 1..close;
        self.pos = close + 1;
        Ok(Str { range, escaped })
    }

    /// How a key compares with the member name `target` (lowercase ASCII). Inlined: called
    /// with a key the scan has just built, which would otherwise go through memory.
    #[inline(always)]
    fn key_match(&self, key: &Str, target: &str) -> KeyMatch {
        if !key.escaped {
            // The raw bytes are the name. A twin of the same length is ASCII (each character
            // that folds to ASCII from outside it takes two or three bytes), and one of another
            // length holds such a character, so is longer and not ASCII: most members are
            // settled here without decoding.
            let raw = self.bytes.get(key.range.clone()).unwrap_or_default();
            if raw.len() == target.len() {
                return if crate::bytes::eq(raw, target.as_bytes()) {
                    KeyMatch::Exact
                } else if raw.eq_ignore_ascii_case(target.as_bytes()) {
                    KeyMatch::Twin
                } else {
                    KeyMatch::Other
                };
            }
            if raw.len() < target.len() || raw.is_ascii() {
                return KeyMatch::Other;
            }
        }
        self.key_match_decoded(key, target)
    }

    /// [`Self::key_match`] for a key with escapes or characters outside ASCII.
    #[inline(never)]
    fn key_match_decoded(&self, key: &Str, target: &str) -> KeyMatch {
        let name = self.decode_key(key);
        if crate::bytes::eq(name.as_bytes(), target.as_bytes()) {
            KeyMatch::Exact
        } else if folds_to(&name, target) {
            KeyMatch::Twin
        } else {
            KeyMatch::Other
        }
    }

    /// A key as a decoder reads it. A lone surrogate (which no member name this scan looks for
    /// holds) reads as U+FFFD: such a key is some other member, never a reason to let the
    /// message through unchecked.
    fn decode_key(&self, key: &Str) -> Cow<'a, str> {
        let raw = self.text.get(key.range.clone()).unwrap_or_default();
        if key.escaped {
            Cow::Owned(unescape(raw, false).unwrap_or_default())
        } else {
            Cow::Borrowed(raw)
        }
    }

    /// A string value as a strict decoder reads it; `None` when it holds a lone surrogate.
    fn decode_value(&self, value: &Str) -> Option<Cow<'a, str>> {
        let raw = self.text.get(value.range.clone())?;
        if value.escaped {
            unescape(raw, true).map(Cow::Owned)
        } else {
            Some(Cow::Borrowed(raw))
        }
    }
}

/// The bytes of `here` as long as `known`, when their first and last bytes are `known`'s: the
/// lists of other upstreams, and a list that changed length, seldom share both ends, so most
/// kept lists are passed over without reading the rest.
fn ends_agree<'h>(here: &'h [u8], known: &[u8]) -> Option<&'h [u8]> {
    const ENDS: usize = 32;
    let here = here.get(..known.len())?;
    let tail = known.len().saturating_sub(ENDS);
    let head = known.len().min(ENDS);
    (here[tail..] == known[tail..] && here[..head] == known[..head]).then_some(here)
}

/// Where a member name lies, between its quotes, and whether it holds an escape.
#[derive(Clone, Copy)]
struct NameSpan {
    start: usize,
    end: usize,
    escaped: bool,
}

enum KeyMatch {
    /// The name itself.
    Exact,
    /// A different spelling a case-folding decoder reads as the name.
    Twin,
    Other,
}

/// Where the whitespace from `i` ends.
#[inline(always)]
fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = b.get(i) {
        i += 1;
    }
    i
}

/// Where `want` lies at `i`, or after the whitespace from `i`; `None` when some other byte
/// (or the end) comes first. The byte is tried first: compact JSON has no whitespace.
#[inline(always)]
fn byte_after_ws(b: &[u8], i: usize, want: u8) -> Option<usize> {
    match b.get(i) {
        Some(&c) if c == want => Some(i),
        Some(b' ' | b'\t' | b'\n' | b'\r') => {
            let next = skip_ws(b, i + 1);
            (b.get(next) == Some(&want)).then_some(next)
        }
        _ => None,
    }
}

/// The string whose opening quote is at `open`: where its closing quote lies, and whether it
/// holds an escape. `NAME`: a member name in an answer a tool gate reads, where a byte from
/// 0x7f up counts as an escape too (it is read decoded, and checked for control characters).
#[inline(always)]
fn string_end<const NAME: bool>(b: &[u8], open: usize) -> Result<(usize, bool), Refused> {
    let mut i = open + 1;
    let mut escaped = false;
    loop {
        i = plain_run_end::<NAME>(b, i);
        match b.get(i) {
            Some(b'"') => return Ok((i, escaped)),
            Some(&c) if NAME && c >= 0x7f => {
                escaped = true;
                i += 1;
            }
            Some(b'\\') => {
                escaped = true;
                match b.get(i + 1) {
                    Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => i += 2,
                    Some(b'u')
                        if b.get(i + 2..i + 6)
                            .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) =>
                    {
                        i += 6
                    }
                    _ => return Err(Refused::Invalid),
                }
            }
            // A control character, or the end of the body.
            _ => return Err(Refused::Invalid),
        }
    }
}

/// Where the number starting at `i` ends, by JSON's grammar (no leading zeros, digits after
/// `.` and after the exponent mark).
fn number_end(b: &[u8], mut i: usize) -> Result<usize, Refused> {
    let digits = |mut i: usize| {
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        i
    };
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => i = digits(i + 1),
        _ => return Err(Refused::Invalid),
    }
    if b.get(i) == Some(&b'.') {
        if !b.get(i + 1).is_some_and(u8::is_ascii_digit) {
            return Err(Refused::Invalid);
        }
        i = digits(i + 1);
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if !b.get(i).is_some_and(u8::is_ascii_digit) {
            return Err(Refused::Invalid);
        }
        i = digits(i);
    }
    Ok(i)
}

/// Where the literal `word` starting at `i` ends.
fn literal_end(b: &[u8], i: usize, word: &[u8]) -> Result<usize, Refused> {
    if b.get(i..i + word.len()) != Some(word) {
        return Err(Refused::Invalid);
    }
    Ok(i + word.len())
}

/// Where the run of plain string bytes from `i` ends: the first quote, backslash or control
/// character at or after `i`, or the end. Eight bytes at a time: in a word, a byte equal to
/// `c` is a zero byte of `word ^ c`, and `(x - 0x01..) & !x & 0x80..` flags zero bytes
/// (`(x - 0x20..) & !x & 0x80..` flags bytes below 0x20); the lowest flag of each is exact, as
/// borrows only run upward, so the lowest flag of the three together is the first stop.
/// `NAME`: bytes from 0x7f up stop the run too (`x | (x + 0x01..)` flags them: a carry out of
/// a 0xff byte reaches only bytes above one already flagged).
#[inline(always)]
fn plain_run_end<const NAME: bool>(b: &[u8], mut i: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    match sse2::plain_run_end_16::<NAME>(b, i) {
        Ok(end) => return end,
        Err(tail) => i = tail,
    }
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    while let Some(chunk) = b.get(i..i + 8) {
        let Ok(word) = <[u8; 8]>::try_from(chunk) else {
            break;
        };
        let v = u64::from_le_bytes(word);
        let quote = v ^ (ONES * u64::from(b'"'));
        let backslash = v ^ (ONES * u64::from(b'\\'));
        let mut stops = (quote.wrapping_sub(ONES) & !quote)
            | (backslash.wrapping_sub(ONES) & !backslash)
            | (v.wrapping_sub(ONES * 0x20) & !v);
        if NAME {
            stops |= v | v.wrapping_add(ONES);
        }
        let stops = stops & HIGH;
        if stops != 0 {
            return i + (stops.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while let Some(&c) = b.get(i) {
        if c == b'"' || c == b'\\' || c < 0x20 || (NAME && c >= 0x7f) {
            break;
        }
        i += 1;
    }
    i
}

/// Sixteen bytes at a time with SSE2, which every x86-64 processor has.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod sse2 {
    use std::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_max_epu8, _mm_movemask_epi8, _mm_or_si128,
        _mm_set1_epi8,
    };

    /// `Ok`: where the plain run from `i` ends. `Err`: where the bytes left are fewer than
    /// sixteen, for the word-at-a-time loop to finish. `NAME`: see `plain_run_end`.
    #[inline(always)]
    pub(super) fn plain_run_end_16<const NAME: bool>(
        b: &[u8],
        mut i: usize,
    ) -> Result<usize, usize> {
        while let Some(chunk) = b.get(i..i + 16) {
            // SAFETY: SSE2 is part of the x86-64 baseline, so these intrinsics exist on every
            // processor this code can run on; `_mm_loadu_si128` reads exactly the sixteen
            // bytes of `chunk` (an in-bounds slice of that length) and needs no alignment.
            let stops = unsafe {
                let v = _mm_loadu_si128(chunk.as_ptr().cast::<__m128i>());
                let quote = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8));
                let backslash = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8));
                // Unsigned `v <= 0x1f` as `max(v, 0x1f) == 0x1f`.
                let control =
                    _mm_cmpeq_epi8(_mm_max_epu8(v, _mm_set1_epi8(0x1f)), _mm_set1_epi8(0x1f));
                let mut stops = _mm_or_si128(_mm_or_si128(quote, backslash), control);
                if NAME {
                    // The mask reads each byte's top bit: `v` itself flags 0x80 and up.
                    let del = _mm_cmpeq_epi8(v, _mm_set1_epi8(0x7f));
                    stops = _mm_or_si128(stops, _mm_or_si128(v, del));
                }
                _mm_movemask_epi8(stops) as u32
            };
            if stops != 0 {
                return Ok(i + stops.trailing_zeros() as usize);
            }
            i += 16;
        }
        Err(i)
    }
}

/// A string's content with its escapes decoded. `strict`: `None` on a lone surrogate (as a
/// strict decoder refuses it); otherwise it reads as U+FFFD. `None` too on a broken escape,
/// which the scan has already refused.
fn unescape(raw: &str, strict: bool) -> Option<String> {
    let b = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut plain = 0;
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            i += 1;
            continue;
        }
        out.push_str(raw.get(plain..i)?);
        let c = match *b.get(i + 1)? {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let unit = hex4(b.get(i + 2..i + 6)?)?;
                i += 4;
                let mut code = Some(unit);
                if (0xD800..0xDC00).contains(&unit) {
                    code = None;
                    if b.get(i + 2..i + 4) == Some(b"\\u")
                        && let Some(low) = b.get(i + 4..i + 8).and_then(hex4)
                        && (0xDC00..0xE000).contains(&low)
                    {
                        code = Some(0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00));
                        i += 6;
                    }
                }
                match code.and_then(char::from_u32) {
                    Some(c) => c,
                    None if strict => return None,
                    None => '\u{fffd}',
                }
            }
            _ => return None,
        };
        out.push(c);
        i += 2;
        plain = i;
    }
    out.push_str(raw.get(plain..)?);
    Some(out)
}

fn hex4(digits: &[u8]) -> Option<u32> {
    if digits.len() != 4 {
        return None;
    }
    digits
        .iter()
        .try_fold(0u32, |n, d| Some(n << 4 | char::from(*d).to_digit(16)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(body: &str) -> Vec<Option<String>> {
        let b = super::body(body, true).unwrap();
        let list = b.messages[0].tools.as_ref().unwrap();
        list.tools
            .iter()
            .map(|t| t.name.as_deref().map(str::to_string))
            .collect()
    }

    /// What a scan found, as owned text: per message, its text, and its list's array text,
    /// `nextCursor`, and each tool's raw text and name.
    type Found = Vec<(
        String,
        Option<(String, bool, Vec<(String, Option<String>)>)>,
    )>;

    fn found(text: &str) -> Result<Found, Refused> {
        Ok(body(text, true)?
            .messages
            .iter()
            .map(|m| {
                let list = m.tools.as_ref().map(|l| {
                    let tools = l
                        .tools
                        .iter()
                        .map(|t| (t.raw.to_string(), t.name.as_deref().map(str::to_string)))
                        .collect();
                    (m.text[l.array.clone()].to_string(), l.next_cursor, tools)
                });
                (m.text.to_string(), list)
            })
            .collect())
    }

    /// [`found`] by a thread that knows no list.
    fn found_afresh(text: &str) -> Result<Found, Refused> {
        forget_tool_lists();
        found(text)
    }

    fn recalled() -> usize {
        RECALLED.get()
    }

    /// Tools of every kind the scan tells apart: plain and escaped names, a name given twice
    /// or beside a twin, a name that is no string, an element that is no object, whitespace.
    const VARIED_TOOLS: &str = r#"[ {"name":"plain","d":"x"}, {"na\u006de":"esc\u0061ped"}, {"name":"a","name":"b"}, {"name":"c","NAME":"d"}, {"name":7}, "str", {"name":"l\ud800"} , {"name":"last"}]"#;

    #[test]
    fn a_list_sent_again_is_recalled_and_found_as_a_fresh_scan_finds_it() {
        let first = format!(r#"{{"jsonrpc":"2.0","id":1,"result":{{"tools":{VARIED_TOOLS}}}}}"#);
        let fresh = found_afresh(&first).unwrap();
        let before = recalled();
        // The same list under another id, and then in another place: in a batch, after
        // whitespace, beside `nextCursor`.
        let again =
            format!(r#"{{"jsonrpc":"2.0","id":"two","result":{{"tools":{VARIED_TOOLS}}}}}"#);
        let batch = format!(
            r#"[ {{"id":3,"result":{{"nextCursor":"n", "tools":  {VARIED_TOOLS}}}}}, {{"id":4,"result":{{"tools":{VARIED_TOOLS}}}}} ]"#
        );
        for text in [&first, &again, &batch] {
            let recalled_before = recalled();
            let via_memory = found(text).unwrap();
            assert!(recalled() > recalled_before, "not recalled in {text}");
            assert_eq!(via_memory, found_afresh(text).unwrap(), "{text}");
        }
        assert_eq!(found(&first).unwrap(), fresh);
        assert!(recalled() >= before + 5);
    }

    #[test]
    fn a_list_differing_in_any_byte_is_scanned_afresh() {
        let list = r#"[{"name":"alpha"},{"name":"beta","x":[1,{"y":null}]},{"name":"gamma"}]"#;
        let wrap = |l: &str| format!(r#"{{"id":1,"result":{{"tools":{l}}}}}"#);
        // Every byte of the list changed in turn to every byte that matters to the scan: each
        // body is read exactly as a thread that knows no list reads it, refusals included.
        for at in 0..list.len() {
            for replacement in [b'N', b'"', b'\\', b'}', b']', b',', b' ', 0x01] {
                let mut changed = list.as_bytes().to_vec();
                changed[at] = replacement;
                let Ok(changed) = String::from_utf8(changed) else {
                    continue;
                };
                found_afresh(&wrap(list)).unwrap();
                let via_memory = found(&wrap(&changed));
                assert_eq!(via_memory, found_afresh(&wrap(&changed)), "{changed}");
            }
        }
    }

    #[test]
    fn a_refused_list_is_never_kept() {
        let list = r#"[{"name":"a","nam\u0065\u0000":"b"}]"#;
        let text = format!(r#"{{"id":1,"result":{{"tools":{list}}}}}"#);
        let before = recalled();
        assert_eq!(found_afresh(&text), Err(Refused::Unfilterable));
        assert_eq!(found(&text), Err(Refused::Unfilterable));
        // The same bytes as the list of a message a decoder reads differently are no memory.
        assert_eq!(recalled(), before);
    }

    #[test]
    fn the_lists_kept_are_bounded_in_number_and_size() {
        let wrap = |l: &str| format!(r#"{{"id":1,"result":{{"tools":{l}}}}}"#);
        let list = |n: usize| format!(r#"[{{"name":"tool_{n}"}}]"#);
        found_afresh(&wrap(&list(0))).unwrap();
        for n in 1..=KNOWN_LISTS_KEPT {
            found(&wrap(&list(n))).unwrap();
        }
        // The first list was pushed out by the later ones; the latest are recalled.
        let before = recalled();
        found(&wrap(&list(0))).unwrap();
        assert_eq!(recalled(), before);
        found(&wrap(&list(KNOWN_LISTS_KEPT))).unwrap();
        assert_eq!(recalled(), before + 1);
        // A list longer than the most kept is scanned every time.
        let long = format!(
            r#"[{{"name":"big","description":"{}"}}]"#,
            "x".repeat(KNOWN_LIST_MAX_BYTES)
        );
        found(&wrap(&long)).unwrap();
        found(&wrap(&long)).unwrap();
        assert_eq!(recalled(), before + 1);
        // So is one whose bytes fit but whose findings would not: many tiny elements.
        let tiny = format!("[{}{{}}]", "{},".repeat(KNOWN_LIST_MAX_BYTES / 3 - 10));
        assert!(tiny.len() < KNOWN_LIST_MAX_BYTES);
        found(&wrap(&tiny)).unwrap();
        found(&wrap(&tiny)).unwrap();
        assert_eq!(recalled(), before + 1);
        KNOWN_LISTS.with_borrow(|known| {
            assert!(known.len() <= KNOWN_LISTS_KEPT);
            assert!(known.iter().all(|k| {
                k.bytes.len() + k.tools.len() * std::mem::size_of::<KnownTool>()
                    <= KNOWN_LIST_MAX_BYTES
            }));
        });
    }

    #[test]
    fn lists_never_sent_twice_are_kept_sparingly_and_a_repeated_one_again_soon() {
        let wrap = |l: &str| format!(r#"{{"id":1,"result":{{"tools":{l}}}}}"#);
        let fresh = |n: usize| wrap(&format!(r#"[{{"name":"a","description":"list {n}"}}]"#));
        forget_tool_lists();
        let mut copies = 0;
        let mut last_kept = None;
        for n in 0..200 {
            found(&fresh(n)).unwrap();
            let newest = KNOWN_LISTS.with_borrow(|k| k.first().map(|l| l.bytes.clone()));
            if newest != last_kept {
                copies += 1;
                last_kept = newest;
            }
        }
        // The first lists are all kept, then one in KEEP_ONE_IN.
        let expected = UNRECALLED_BEFORE_SPARING + (200 - UNRECALLED_BEFORE_SPARING) / KEEP_ONE_IN;
        assert!(copies <= expected + 1, "{copies} lists kept");
        // A list that starts repeating is kept within KEEP_ONE_IN answers, then recalled.
        let repeated = wrap(r#"[{"name":"steady"}]"#);
        let before = recalled();
        for _ in 0..=KEEP_ONE_IN {
            found(&repeated).unwrap();
        }
        assert!(recalled() > before, "a repeated list was never recalled");
        assert_eq!(UNRECALLED.get(), 0);
    }

    #[test]
    fn a_scan_starts_as_large_as_the_last_list_but_never_past_what_its_bytes_hold() {
        let capacity = |text: &str| {
            forget_tool_lists();
            let scanned = body(text, true).unwrap();
            let list = scanned.messages[0].tools.as_ref().unwrap();
            (list.tools.len(), list.tools.capacity())
        };
        let list_of = |count: usize| {
            let tools: Vec<String> = (0..count)
                .map(|n| format!(r#"{{"name":"t{n}"}}"#))
                .collect();
            format!(r#"{{"result":{{"tools":[{}]}}}}"#, tools.join(","))
        };
        // The hint is capped: a hostile long list does not make every later scan start huge.
        assert_eq!(capacity(&list_of(2000)).0, 2000);
        assert_eq!(capacity(&list_of(500)), (500, TOOL_COUNT_HINT_MAX));
        let (count, room) = capacity(r#"{"result":{"tools":[{"name":"a"},{"name":"b"}]}}"#);
        assert_eq!(count, 2);
        assert!(room <= 16, "a 2-tool list started with room for {room}");
        // A list as long as the last one is scanned without growing its vector.
        let hundred = list_of(100);
        capacity(&hundred);
        assert_eq!(capacity(&hundred), (100, 100));
    }

    #[test]
    fn finds_each_tool_with_its_byte_range_and_name() {
        let text = r#" {"id":1,"result":{"tools":[ {"name":"a","x":{"name":"inner","tools":[]}} , {"name":"b"}],"nextCursor":"c"}} "#;
        let b = body(text, true).unwrap();
        assert!(!b.batch);
        let m = &b.messages[0];
        assert_eq!(m.text, text.trim());
        let list = m.tools.as_ref().unwrap();
        assert!(m.text[list.array.clone()].starts_with("[ {\"name\":\"a\""));
        assert!(m.text[list.array.clone()].ends_with("{\"name\":\"b\"}]"));
        assert_eq!(
            list.tools[0].raw,
            r#"{"name":"a","x":{"name":"inner","tools":[]}}"#
        );
        assert_eq!(list.tools[0].name.as_deref(), Some("a"));
        assert_eq!(list.tools[1].raw, r#"{"name":"b"}"#);
        assert!(list.next_cursor);
    }

    /// Whitespace around every structural byte (the scan tries the expected byte before it
    /// skips any) reads exactly as the compact body: the same names, the same refusals of a
    /// twinned or doubled `name`, the same tools. Runs up to 40 bytes long cross the wide
    /// compares' boundaries.
    #[test]
    fn whitespace_anywhere_between_tokens_reads_as_the_compact_body() {
        let compact = r#"{"id":1,"result":{"tools":[{"name":"a","x":{"k":[1,-2.5e3,true,null,"s"]}},{"Name":"b","name":"c"},{"name":"d","name":"e"},{"inputSchema":{},"name":"f"}],"nextCursor":"n"}}"#;
        let want = names(compact);
        assert_eq!(
            want,
            vec![Some("a".into()), None, None, Some("f".into())],
            "the compact reading"
        );
        let runs = [" ", "\t", "\n", "\r\n", " \t\r\n ", &" ".repeat(40)];
        for (k, run) in runs.iter().enumerate() {
            // Around every structural byte outside strings, and at both ends.
            let mut spaced = String::from(*run);
            let mut in_string = false;
            let mut escaped = false;
            for c in compact.chars() {
                let structural = !in_string && "{}[]:,".contains(c);
                if structural {
                    spaced.push_str(runs[(k + spaced.len()) % runs.len()]);
                }
                spaced.push(c);
                if structural {
                    spaced.push_str(run);
                }
                if in_string {
                    (escaped, in_string) = (c == '\\' && !escaped, escaped || c != '"');
                } else if c == '"' {
                    in_string = true;
                }
            }
            spaced.push_str(run);
            assert_eq!(names(&spaced), want, "{spaced:?}");
            let b = body(&spaced, true).unwrap();
            let list = b.messages[0].tools.as_ref().unwrap();
            let squeezed: Vec<String> = list
                .tools
                .iter()
                .map(|t| t.raw.split_whitespace().collect())
                .collect();
            let compact_list = body(compact, true).unwrap();
            let compact_raws: Vec<&str> = compact_list.messages[0]
                .tools
                .as_ref()
                .unwrap()
                .tools
                .iter()
                .map(|t| t.raw)
                .collect();
            assert_eq!(squeezed, compact_raws, "{spaced:?}");
            assert!(list.next_cursor);
        }
    }

    #[test]
    fn names_are_read_as_a_decoder_reads_them() {
        // Escapes in the key and in the value.
        assert_eq!(
            names(r#"{"result":{"tools":[{"na\u006de":"r\u0065ad"}]}}"#),
            [Some("read".to_string())]
        );
        // A surrogate pair is one character; a lone one is no name at all.
        assert_eq!(
            names(
                r#"{"result":{"tools":[{"name":"\ud83d\ude00"},{"name":"a\ud800"},{"name":"\udc00"}]}}"#
            ),
            [Some("\u{1f600}".to_string()), None, None]
        );
        // Twice, beside a twin, not a string, not an object: no name.
        assert_eq!(
            names(
                r#"{"result":{"tools":[{"name":"a","name":"a"},{"name":"a","NAME":"b"},{"Name":"c"},{"name":1},"d",{"\u004eame":"e","name":"f"}]}}"#
            ),
            [None, None, None, None, None, None]
        );
    }

    #[test]
    fn members_that_decide_the_list_are_refused_when_doubled_or_twinned() {
        for text in [
            r#"{"result":{"tools":[]},"result":{}}"#,
            r#"{"Result":{"tools":[]}}"#,
            r#"{"result":{"tools":[]},"reſult":{}}"#,
            r#"{"result":{"tools":[],"tools":[]}}"#,
            r#"{"result":{"tools":[],"TOOLS":[]}}"#,
            r#"{"result":{"toolſ":[]}}"#,
            r#"{"result":{"to\u006fls":[],"tools":[]}}"#,
            r#"{"result":{"tools":{}}}"#,
            r#"{"result":{"tools":null}}"#,
        ] {
            assert_eq!(
                body(text, true).unwrap_err(),
                Refused::Unfilterable,
                "{text}"
            );
            // Without tool gates the same bodies are just JSON.
            assert!(body(text, false).is_ok(), "{text}");
        }
        // A lone surrogate in a key does not hide the list.
        let b = body(r#"{"result":{"tools":[{"name":"a"}],"x\ud800":1}}"#, true).unwrap();
        assert!(b.messages[0].tools.is_some());
    }

    #[test]
    fn a_control_character_in_a_member_name_refuses_only_a_gated_answer() {
        let text = r#"{"jsonrpc":"2.0","id":1,"result":{"data":{"a\u0000b":1},"tools":[]}}"#;
        assert!(matches!(body(text, true), Err(Refused::Unfilterable)));
        assert!(body(text, false).is_ok());
        // DEL and the C1 controls, escaped or as they are (valid JSON either way), in a tool,
        // beside its name, deep in its schema, and in a key long enough for the wide compares.
        for control in [
            "\\u007f", "\u{7f}", "\\u0080", "\u{85}", "\\u009F", "\u{9f}", "\\u001f",
        ] {
            for key in [
                format!("name{control}"),
                format!("{control}name"),
                format!("a_rather_long_member_name_{control}_past_sixteen_bytes"),
            ] {
                for text in [
                    format!(r#"{{"id":1,"result":{{"tools":[{{"name":"read","{key}":"rm"}}]}}}}"#),
                    format!(
                        r#"{{"id":1,"result":{{"tools":[{{"name":"read","s":{{"{key}":1}}}}]}}}}"#
                    ),
                    format!(r#"{{"id":1,"result":{{"{key}":[],"tools":[]}}}}"#),
                ] {
                    assert_eq!(
                        body(&text, true).unwrap_err(),
                        Refused::Unfilterable,
                        "{text}"
                    );
                    assert!(body(&text, false).is_ok(), "{text}");
                }
            }
        }
        // Other characters from 0x7f up are no controls: such keys are read as they are.
        let text =
            r#"{"id":1,"result":{"tools":[{"nämé":"x","名前":"y","name":"ok","ß":{"é":1}}]}}"#;
        assert_eq!(names(text), vec![Some("ok".into())]);
        let text =
            r#"{"id":1,"result":{"tools":[{"NAMÉ":"x","name":"ok"},{"ＮＡＭＥ":"y","name":"b"}]}}"#;
        assert_eq!(names(text), vec![Some("ok".into()), Some("b".into())]);
    }

    #[test]
    fn a_batch_nested_in_a_batch_is_refused_only_when_lists_are_looked_for() {
        let list = r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"rm"}]}}"#;
        for (text, messages) in [
            (format!("[[{list}]]"), 1),
            (format!("[{list},[{list}]]"), 2),
            ("[[]]".to_string(), 1),
        ] {
            assert_eq!(
                body(&text, true).map(|_| ()),
                Err(Refused::Unfilterable),
                "{text}"
            );
            // An answer no gate reads is only checked to be JSON and split.
            assert_eq!(
                body(&text, false).unwrap().messages.len(),
                messages,
                "{text}"
            );
        }
        // Other values inside a batch hold no list and stay relayable.
        assert_eq!(body("[1,\"x\",null,{}]", true).unwrap().messages.len(), 4);
    }

    #[test]
    fn anything_but_json_is_refused() {
        for text in [
            "",
            " ",
            "{",
            "}",
            "[1,]",
            "[,1]",
            "{\"a\":1,}",
            "{\"a\" 1}",
            "{1:1}",
            "01",
            "-",
            "1.",
            "1.e5",
            "1e",
            "1e+",
            "+1",
            ".5",
            "tru",
            "nul",
            "\"\\x\"",
            "\"\\u12g4\"",
            "\"\\u123\"",
            "\"a\u{1}b\"",
            "\"abc",
            "{} {}",
            "[] x",
            "{\"result\":{\"tools\":[{\"name\":\"a\"}]}}x",
            "[[[[]]]",
            "[{]}",
            "{\"a\":[}",
        ] {
            assert_eq!(body(text, true).unwrap_err(), Refused::Invalid, "{text:?}");
        }
        for text in [
            "0",
            "-0.5e-7",
            "1E+2",
            "\"\\u00e9\\ud800\"",
            "[]",
            "{}",
            " [ 1 , {\"a\" : [ true , false , null ] } ] ",
        ] {
            assert!(body(text, true).is_ok(), "{text:?}");
        }
    }

    #[test]
    fn deep_nesting_is_scanned_without_recursion() {
        let deep = format!("{}{}", "[".repeat(200_000), "]".repeat(200_000));
        assert!(body(&deep, false).is_ok());
        // Arrays in a batch: refused for a gate, once read to the end.
        assert_eq!(body(&deep, true).unwrap_err(), Refused::Unfilterable);
        assert_eq!(body(&deep[1..], true).unwrap_err(), Refused::Invalid);
        let open = format!(
            r#"{{"result":{{"tools":[{{"name":"a","x":{}}}]}}}}"#,
            "[".repeat(100_000)
        );
        assert_eq!(body(&open, true).unwrap_err(), Refused::Invalid);
    }

    #[test]
    fn a_scan_refused_with_containers_open_leaves_the_threads_next_scan_unaffected() {
        // Each refusal below stops inside nested containers; the next scan on the thread reuses
        // its skip stack and must start from an empty one.
        let list = r#"{"result":{"tools":[{"name":"a","x":[{"y":[1]}]},{"name":"b"}]}}"#;
        for refused in [
            r#"{"result":{"tools":[{"name":"a","x":[[[{"y":"#,
            r#"{"a":[[[[{"b":[1,2,}]]]]}"#,
            "[[[[[[[[",
            &format!("{}1", "[".repeat(10_000)),
        ] {
            assert!(body(refused, true).is_err(), "{refused}");
            assert!(body(refused, false).is_err(), "{refused}");
            assert_eq!(names(list), vec![Some("a".into()), Some("b".into())]);
            assert!(body(r#"{"a":[{"b":[]}],"c":{}}"#, true).is_ok());
            assert_eq!(body("]", false).unwrap_err(), Refused::Invalid);
        }
    }

    #[test]
    fn the_plain_run_ends_at_the_first_stop_byte_wherever_it_falls() {
        for len in 0..40 {
            for stop in [b'"', b'\\', 0x1f, 0x00] {
                let mut b = vec![b'a'; len];
                b.push(stop);
                b.extend_from_slice(b"\"\\\x01aaaaaaaaaaaa");
                assert_eq!(plain_run_end::<false>(&b, 0), len, "{len} {stop}");
            }
            // High bytes (UTF-8), DEL and the space are plain, but stop a gated member name.
            let b = "é\u{7f} ü".repeat(len);
            assert_eq!(plain_run_end::<false>(b.as_bytes(), 0), b.len());
            for stop in [0x7f, 0x80, 0xc2, 0xff] {
                let mut b = vec![b'a'; len];
                b.push(stop);
                b.extend_from_slice(&[0xff; 20]);
                assert_eq!(plain_run_end::<true>(&b, 0), len, "{len} {stop:#x}");
                for from in 0..=len {
                    assert_eq!(
                        plain_run_end::<true>(&b, from),
                        len,
                        "{len} {stop:#x} {from}"
                    );
                }
            }
            // From any starting offset, whichever of the wide and narrow loops finds the stop.
            for from in 0..=len {
                let mut b = vec![b'x'; len];
                b.extend_from_slice(b"\"tail");
                assert_eq!(plain_run_end::<false>(&b, from), len, "{len} from {from}");
            }
        }
    }

    /// Bodies built from JSON's pieces, valid and broken, shifted by up to 69 leading spaces
    /// (so that every piece meets every offset the wide compares use): the scan accepts
    /// exactly what serde_json accepts.
    #[test]
    fn accepts_exactly_what_serde_json_accepts() {
        let pieces: &[&str] = &[
            "{",
            "}",
            "[",
            "]",
            ":",
            ",",
            " ",
            "\n",
            "\t",
            "\r",
            "\u{1}",
            "\"",
            "\"a\"",
            "\"name\"",
            "\"tools\"",
            "\"result\"",
            "1",
            "-0.5",
            "1e9",
            "01",
            "true",
            "false",
            "null",
            "nul",
            "x",
            "\\",
            "\"\\n\"",
            "\"\\u00e9\"",
            "\"\\uzz\"",
            "\"\\\"\"",
            "\"\\\\\"",
            "é",
            "\"é\"",
            "{\"a\":1}",
            "[1,2]",
            "\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"",
        ];
        let mut seed: u64 = 0x5eed_1234_abcd_0001;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let valid = [
            r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"a","inputSchema":{"type":"object"}}]}}"#,
            r#"[{"a":[1,2,{"b":null}]},"x",-1.5e-3,true]"#,
            r#"{"result":{"content":[{"type":"text","text":"line\nand \"quoted\" \\ \u00e9"}]}}"#,
        ];
        let mut accepted = 0;
        for round in 0..40_000 {
            // Leading spaces move the rest across the 16- and 8-byte compares' boundaries.
            let mut text = " ".repeat((next() % 70) as usize);
            if round % 2 == 0 {
                // A valid body, or one with a piece inserted or a byte removed.
                let base = valid[(next() % 3) as usize];
                let at = (next() as usize) % base.len();
                let (head, tail) = base.split_at(at);
                let piece = pieces[(next() as usize) % pieces.len()];
                match next() % 3 {
                    0 => text.push_str(&format!("{head}{piece}{tail}")),
                    1 => text.push_str(&format!("{head}{}", &tail[1..])),
                    _ => text.push_str(base),
                }
            } else {
                for _ in 0..(next() % 40) {
                    text.push_str(pieces[(next() as usize) % pieces.len()]);
                }
            }
            let serde = serde_json::from_str::<&serde_json::value::RawValue>(&text).is_ok();
            assert_eq!(body(&text, false).is_ok(), serde, "{text:?}");
            accepted += usize::from(serde);
        }
        assert!(accepted > 5_000, "too few valid bodies: {accepted}");
    }
}
