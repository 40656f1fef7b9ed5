//! Server-sent events on the wire: splitting a byte stream into events the way the SSE
//! specification does (CRLF, CR and LF all end a line; a blank line ends an event; one leading
//! byte-order mark is skipped), and decoding each event's `event`, `data` and `id` fields.
//! The `tools/list` filter rewrites events with the same splitting; the legacy SSE front end
//! and upstream read whole events with [`SseDecoder`].

/// The largest single event buffered; a longer one ends the stream (a peer that never ends
/// an event must not grow our memory without bound).
pub const MAX_EVENT: usize = 16 * 1024 * 1024;

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// One decoded event.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event` field (`None`: the default type, `message`).
    pub event: Option<String>,
    /// The `data` lines joined with LF.
    pub data: String,
    /// The `id` field.
    pub id: Option<String>,
}

impl SseEvent {
    /// Whether this is a `message` event (named so, or unnamed).
    pub fn is_message(&self) -> bool {
        // An empty `event:` leaves the type "message", as the SSE specification dispatches it.
        self.event
            .as_deref()
            .is_none_or(|e| e.is_empty() || e == "message")
    }
}

/// Splits a byte stream into complete events as bytes arrive.
#[derive(Default)]
pub struct SseSplitter {
    pending: Vec<u8>,
    /// Whether the start of the stream (where a byte-order mark is skipped) is behind us.
    started: bool,
    /// How far into `pending` the search for an event's end has got: bytes arriving a little
    /// at a time are scanned once, not once per read (a 16 MiB event read 16 KiB at a time
    /// would otherwise cost a thousand rescans of its beginning).
    scan: Scan,
    /// The last event ended with a CR that was the last byte read: an LF arriving next belongs
    /// to that CR (one CRLF), not a line of its own.
    skip_lf: bool,
}

/// Where a search for an event's end stopped: the next byte to look at, and whether it starts
/// a line.
#[derive(Clone, Copy)]
struct Scan {
    at: usize,
    line_start: bool,
}

impl Default for Scan {
    fn default() -> Self {
        Scan {
            at: 0,
            line_start: true,
        }
    }
}

impl SseSplitter {
    /// Feeds bytes; calls `each` with the text of every complete event (without its blank
    /// line). Err when an unfinished event exceeds [`MAX_EVENT`].
    pub fn push(&mut self, data: &[u8], mut each: impl FnMut(&[u8])) -> Result<(), &'static str> {
        self.push_until(data, |event| {
            each(event);
            false
        })
        .map(|_| ())
    }

    /// [`Self::push`], stopping at the first event for which `each` returns true: `Ok(Some(n))`
    /// then says that the last `n` bytes of `data` come after that event (its blank line
    /// included), and the splitter is not to be fed again.
    pub fn push_until(
        &mut self,
        data: &[u8],
        mut each: impl FnMut(&[u8]) -> bool,
    ) -> Result<Option<usize>, &'static str> {
        self.pending.extend_from_slice(data);
        if !self.started {
            // A byte-order mark may arrive split across reads: wait until it is whole.
            if self.pending.len() < BOM.len() && BOM.starts_with(&self.pending) {
                return Ok(None);
            }
            if self.pending.starts_with(BOM) {
                self.pending.drain(..BOM.len());
            }
            self.started = true;
        }
        if let Some(after) = self.drain_events(&mut each) {
            return Ok(Some(after));
        }
        if self.pending.len() > MAX_EVENT {
            return Err("SSE event too large");
        }
        Ok(None)
    }

    /// The bytes of an event not yet complete, held until its end arrives.
    pub fn held(&self) -> usize {
        self.pending.len()
    }

    /// What is complete at the end of the stream: a final lone CR ends its line (no LF can
    /// follow any more); an unterminated event is dropped, as a client would drop it.
    pub fn finish(&mut self, mut each: impl FnMut(&[u8])) {
        if self.pending.last() == Some(&b'\r') {
            self.pending.push(b'\n');
        }
        self.drain_events(&mut |event| {
            each(event);
            false
        });
        self.pending.clear();
        self.scan = Scan::default();
        self.skip_lf = false;
    }

    /// Hands every complete event in `pending` to `each` and drops it, remembering how far the
    /// search for the next one got. Stops at an event for which `each` returns true, and
    /// returns how many bytes of `pending` follow it.
    fn drain_events(&mut self, each: &mut impl FnMut(&[u8]) -> bool) -> Option<usize> {
        let mut start = 0;
        if self.skip_lf && !self.pending.is_empty() {
            self.skip_lf = false;
            if self.pending[0] == b'\n' {
                start = 1;
            }
        }
        let mut scan = self.scan;
        while let Some((len, consumed)) = find_event_end_from(&self.pending[start..], &mut scan) {
            if each(&self.pending[start..start + len]) {
                return Some(self.pending.len() - (start + consumed));
            }
            start += consumed;
            scan = Scan::default();
            // Ended by a lone CR, the last byte so far: dispatched now (the event is whole
            // whatever follows), and an LF that comes next is that CR's.
            if start == self.pending.len() && self.pending[start - 1] == b'\r' {
                self.skip_lf = true;
            }
        }
        self.pending.drain(..start);
        self.scan = scan;
        None
    }
}

/// Decodes whole events from a byte stream.
#[derive(Default)]
pub struct SseDecoder {
    splitter: SseSplitter,
}

impl SseDecoder {
    /// Feeds bytes; returns the events completed by them.
    pub fn push(&mut self, data: &[u8]) -> Result<Vec<SseEvent>, &'static str> {
        let mut events = Vec::new();
        self.splitter
            .push(data, |e| events.extend(decode_utf8_event(e)))?;
        Ok(events)
    }

    /// The events completed by the end of the stream.
    pub fn finish(&mut self) -> Vec<SseEvent> {
        let mut events = Vec::new();
        self.splitter
            .finish(|e| events.extend(decode_utf8_event(e)));
        events
    }
}

/// An event that is not UTF-8 is dropped rather than decoded with replacement characters:
/// what the gateway relays is what it checked, and a JSON body that is not UTF-8 is refused.
fn decode_utf8_event(event: &[u8]) -> Option<SseEvent> {
    if std::str::from_utf8(event).is_err() {
        tracing::warn!(target: "mcp_guard::sse", "dropped an SSE event that is not UTF-8");
        return None;
    }
    Some(decode_event(event))
}

/// The fields of one event's text, as the SSE specification reads them: a field name up to
/// the first colon (one space after it dropped), a line without a colon is a field with an
/// empty value, a line starting with a colon is a comment.
pub fn decode_event(event: &[u8]) -> SseEvent {
    let text = String::from_utf8_lossy(event);
    let mut out = SseEvent::default();
    let mut has_data = false;
    for line in sse_lines(&text) {
        let (field, value) = split_field(line);
        match field {
            "data" => {
                if has_data {
                    out.data.push('\n');
                }
                has_data = true;
                out.data.push_str(value);
            }
            "event" => out.event = Some(value.to_string()),
            // An id holding NUL is ignored, as the specification says.
            "id" if !value.contains('\0') => out.id = Some(value.to_string()),
            _ => {}
        }
    }
    out
}

/// The data of a `message` event (named so, or unnamed) as its bytes, without decoding them:
/// `None` for an event of another type or one without data. Borrowed when the event has a
/// single `data` line, as an answer usually does.
pub fn message_data(event: &[u8]) -> Option<std::borrow::Cow<'_, [u8]>> {
    let mut data: Option<std::borrow::Cow<'_, [u8]>> = None;
    let mut message = true;
    // A comment (`:` first) is a field without a name: neither of these.
    for (field, value) in sse_byte_lines(event).map(split_field_bytes) {
        match field {
            b"data" => match data.as_mut() {
                None => data = Some(std::borrow::Cow::Borrowed(value)),
                Some(joined) => {
                    let joined = joined.to_mut();
                    joined.push(b'\n');
                    joined.extend_from_slice(value);
                }
            },
            b"event" => message = value.is_empty() || value == b"message",
            _ => {}
        }
    }
    data.filter(|_| message)
}

/// A line's field name and value.
pub fn split_field(line: &str) -> (&str, &str) {
    // Split at ASCII bytes, so both halves are whole characters.
    let (field, value) = split_field_bytes(line.as_bytes());
    (&line[..field.len()], &line[line.len() - value.len()..])
}

/// [`split_field`] on bytes: the name up to the first colon, the value after it without one
/// leading space; a line without a colon is a name with an empty value.
fn split_field_bytes(line: &[u8]) -> (&[u8], &[u8]) {
    match memchr::memchr(b':', line) {
        Some(i) => {
            let value = &line[i + 1..];
            (&line[..i], value.strip_prefix(b" ").unwrap_or(value))
        }
        None => (line, &line[line.len()..]),
    }
}

/// Appends one event carrying `data` (each of its lines its own `data:` field, a line ending
/// wherever SSE ends one: CRLF, LF or a lone CR) under the event type `event` (`None`: the
/// default, `message`). Whatever `data` holds, it stays one event's data: a line break in it
/// can never start a field of its own (red team: a lone LF, or CR, in relayed data let an
/// upstream write whole events, a forged `endpoint` among them, onto a legacy stream).
pub fn push_event(out: &mut Vec<u8>, event: Option<&str>, data: &[u8]) {
    out.reserve(data.len() + 24);
    if let Some(e) = event {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(e.as_bytes());
        out.push(b'\n');
    }
    for line in sse_byte_lines(data) {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    out.push(b'\n');
}

/// Splits SSE text into lines the way the SSE specification does: CRLF, lone CR and lone LF
/// all end a line.
pub fn sse_lines(text: &str) -> impl Iterator<Item = &str> {
    // Lines end at ASCII bytes: each byte line is whole characters of `text`, found by offset.
    sse_byte_lines(text.as_bytes()).map(move |line| {
        let start = line.as_ptr() as usize - text.as_ptr() as usize;
        &text[start..start + line.len()]
    })
}

/// [`sse_lines`] on bytes.
fn sse_byte_lines(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = bytes;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (len, ending) = match memchr::memchr2(b'\r', b'\n', rest) {
            None => (rest.len(), 0),
            Some(i) => (i, if rest[i..].starts_with(b"\r\n") { 2 } else { 1 }),
        };
        let line = &rest[..len];
        rest = &rest[len + ending..];
        Some(line)
    })
}

/// The first complete event: (length of its text, bytes to consume including the blank line
/// that ends it). Any of CRLF, CR and LF ends a line; a CR at the very end of the buffer waits
/// for the next byte, since it may be the first half of a CRLF.
pub fn find_event_end(b: &[u8]) -> Option<(usize, usize)> {
    find_event_end_from(b, &mut Scan::default())
}

/// [`find_event_end`] resuming where an earlier search of the same bytes stopped; on `None`,
/// `scan` says where to resume once more bytes have arrived.
fn find_event_end_from(b: &[u8], scan: &mut Scan) -> Option<(usize, usize)> {
    let Scan {
        at: mut i,
        line_start: mut at_line_start,
    } = *scan;
    while i < b.len() {
        let term = match b[i] {
            // A CR ending an empty line ends the event, whether an LF follows or not.
            b'\r' if i + 1 == b.len() && at_line_start => return Some((i, i + 1)),
            // One ending a line of text waits: an LF may follow, as part of the same ending.
            b'\r' if i + 1 == b.len() => break,
            b'\r' if b[i + 1] == b'\n' => 2,
            b'\r' | b'\n' => 1,
            _ => {
                // The rest of the line, to its ending, in one search.
                at_line_start = false;
                i = memchr::memchr2(b'\r', b'\n', &b[i..]).map_or(b.len(), |k| i + k);
                continue;
            }
        };
        if at_line_start {
            return Some((i, i + term));
        }
        at_line_start = true;
        i += term;
    }
    *scan = Scan {
        at: i,
        line_start: at_line_start,
    };
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_ended_by_cr_at_the_end_of_a_read_is_out_at_once_and_an_lf_after_it_is_its_own() {
        // Valid SSE: an upstream that ends an event with CR CR and then waits must not have
        // the event held until its next byte (it may be the call's answer, and the next byte
        // may never come).
        for ending in ["\r\r", "\n\r", "\r\n\r"] {
            let mut d = SseDecoder::default();
            let first = d.push(format!("data: 1{ending}").as_bytes()).unwrap();
            assert_eq!(first.len(), 1, "{ending:?}: {first:?}");
            assert_eq!(first[0].data, "1");
            // The LF completing the CR: no empty event, and the next event reads whole.
            let next = d.push(b"\ndata: 2\n\n").unwrap();
            let data: Vec<&str> = next.iter().map(|e| e.data.as_str()).collect();
            assert_eq!(data, ["2"], "{ending:?}: {next:?}");
            assert!(d.finish().is_empty());
        }
        // A CR ending a line of text still waits for what follows it.
        let mut d = SseDecoder::default();
        assert!(d.push(b"data: 3\r").unwrap().is_empty());
        let got = d.push(b"\n\n").unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].data, "3");
    }

    #[test]
    fn events_split_across_reads_and_line_endings_decode_alike() {
        let stream = b"\xEF\xBB\xBFevent: endpoint\r\ndata: /messages?sessionId=a\r\n\r\n: comment\n\ndata: {\"a\":\rdata: 1}\rid: 7\r\r";
        for cut in 0..stream.len() {
            let mut d = SseDecoder::default();
            let mut got = d.push(&stream[..cut]).unwrap();
            got.extend(d.push(&stream[cut..]).unwrap());
            got.extend(d.finish());
            let messages: Vec<_> = got.iter().filter(|e| !e.data.is_empty()).collect();
            assert_eq!(messages.len(), 2, "cut at {cut}: {got:?}");
            assert_eq!(messages[0].event.as_deref(), Some("endpoint"));
            assert_eq!(messages[0].data, "/messages?sessionId=a");
            assert!(messages[1].is_message());
            assert_eq!(messages[1].data, "{\"a\":\n1}");
            assert_eq!(messages[1].id.as_deref(), Some("7"));
        }
    }

    #[test]
    fn byte_at_a_time_input_decodes_like_whole_input() {
        let stream = b"event: endpoint\r\ndata: /m\r\n\r\ndata: a\rdata: b\r\rdata: c\n\n: x\r\n\r\ndata: {}\r\n\r\n";
        let whole = {
            let mut d = SseDecoder::default();
            let mut e = d.push(stream).unwrap();
            e.extend(d.finish());
            e
        };
        let mut d = SseDecoder::default();
        let mut bytewise = Vec::new();
        for b in stream {
            bytewise.extend(d.push(std::slice::from_ref(b)).unwrap());
        }
        bytewise.extend(d.finish());
        assert_eq!(whole, bytewise);
        assert_eq!(whole.iter().filter(|e| !e.data.is_empty()).count(), 4);
    }

    #[test]
    fn push_until_says_where_in_the_last_read_the_chosen_event_ended() {
        // Whatever the reads and line endings, the bytes before the reported end are the stream
        // up to the chosen event's blank line.
        let streams: [&[u8]; 4] = [
            b"data: a\n\ndata: stop\n\ndata: after\n\n",
            b"\xEF\xBB\xBFdata: a\r\n\r\ndata: stop\r\n\r\nrest",
            b"data: a\r\rdata: stop\r\rrest",
            b"data: stop\n\n",
        ];
        for stream in streams {
            let end = stream.windows(4).position(|w| w == b"stop").unwrap() + 4;
            let end = end
                + if stream[end..].starts_with(b"\r\n\r\n") {
                    4
                } else {
                    2
                };
            for read in [1, 2, 3, 5, stream.len()] {
                let mut splitter = SseSplitter::default();
                let mut fed = 0;
                let mut found = None;
                for piece in stream.chunks(read) {
                    let after = splitter
                        .push_until(piece, |e| e.windows(4).any(|w| w == b"stop"))
                        .unwrap();
                    fed += piece.len();
                    if let Some(after) = after {
                        found = Some(fed - after);
                        break;
                    }
                }
                // A CR ending the event as the last byte read dispatches it at once (the LF
                // that may follow is that CR's): the end is then before that LF.
                let cut_before_lf = stream[..end].ends_with(b"\r\n") && found == Some(end - 1);
                assert!(
                    found == Some(end) || cut_before_lf,
                    "{:?} read {read} at a time: {found:?}",
                    stream
                );
            }
        }
    }

    #[test]
    fn message_data_reads_an_event_as_decode_event_does() {
        let events: [&[u8]; 10] = [
            b"data: {}",
            b"event: message\ndata: {\"a\":1}",
            b"event: other\ndata: {}",
            b"event: other\r\nevent: message\r\ndata:x",
            b": comment\rdata: a\rdata:  b\rdata\rid: 1",
            b"id: 2",
            b"event:message\ndata:",
            b"data: a\r\n\xff\r\ndata: b",
            b"event\ndata: x",
            b"event:\ndata: {}",
        ];
        for event in events {
            let decoded = decode_event(event);
            let expected = (decoded.is_message() && event.windows(4).any(|w| w == b"data"))
                .then(|| decoded.data.clone().into_bytes());
            assert_eq!(
                message_data(event).map(|d| d.into_owned()),
                expected,
                "{:?}",
                String::from_utf8_lossy(event)
            );
        }
    }

    #[test]
    fn an_event_that_never_ends_is_refused_past_the_cap() {
        let mut d = SseDecoder::default();
        let chunk = vec![b'x'; 1024 * 1024];
        let mut refused = false;
        for _ in 0..17 {
            if d.push(&chunk).is_err() {
                refused = true;
                break;
            }
        }
        assert!(refused);
    }

    #[test]
    fn pushed_events_carry_every_line_as_data() {
        let mut out = Vec::new();
        push_event(&mut out, Some("message"), b"{\"a\":\n1}");
        assert_eq!(out, b"event: message\ndata: {\"a\":\ndata: 1}\n\n");
        let back = SseDecoder::default().push(&out).unwrap();
        assert_eq!(back[0].data, "{\"a\":\n1}");
        // A lone CR ends a line too, and a line break never lets a field of its own through.
        let mut out = Vec::new();
        let hostile = b"{\"id\":1}\r\revent: endpoint\rdata: http://evil/\n\nid: 9\r\nretry: 1";
        push_event(&mut out, Some("message"), hostile);
        let back = SseDecoder::default().push(&out).unwrap();
        assert_eq!(back.len(), 1, "{:?}", String::from_utf8_lossy(&out));
        assert!(back[0].is_message());
        assert_eq!(
            back[0].data,
            "{\"id\":1}\n\nevent: endpoint\ndata: http://evil/\n\nid: 9\nretry: 1"
        );
    }

    #[test]
    fn an_event_that_is_not_utf8_is_dropped_not_decoded_lossily() {
        let mut d = SseDecoder::default();
        let events = d
            .push(b"data: {\"a\":\"AKIA\xFFIOSF\"}\n\ndata: {}\n\n")
            .unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].data, "{}");
    }
}
