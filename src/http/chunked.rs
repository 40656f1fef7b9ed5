//! Incremental decoder for `Transfer-Encoding: chunked` bodies, strict about framing: a chunk
//! size must be hex, lines end in CRLF, and a size that overflows is invalid rather than wrapped.
//! Like every parser here it tells "need more bytes" apart from "invalid".

/// Where the decoder is inside the chunked framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading the hex size line (and any extension) up to CRLF.
    Size,
    /// Copying this many data bytes.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the zero-size chunk: trailer lines until an empty line.
    Trailer,
    /// The body is complete.
    Done,
}

/// Why a chunked body is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkError {
    /// Framing is malformed.
    Invalid,
    /// The decoded body would exceed the limit.
    TooLarge,
}

/// A chunked-body decoder.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    decoded: u64,
    limit: u64,
}

/// The longest size line (with extensions) or trailer line we accept.
const MAX_LINE: usize = 4096;

impl ChunkedDecoder {
    /// A decoder refusing bodies larger than `limit` decoded bytes.
    pub fn new(limit: u64) -> Self {
        Self {
            state: State::Size,
            decoded: 0,
            limit,
        }
    }

    /// Whether the terminating chunk and trailers have been consumed.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decodes from `input`, appending data to `out`. Returns how many input bytes were
    /// consumed; fewer than `input.len()` only when the body is done (the rest belongs to the
    /// next message) or a line is not yet complete (keep the rest and call again with more).
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, ChunkError> {
        let mut pos = 0;
        loop {
            match self.state {
                State::Done => return Ok(pos),
                State::Size => {
                    let Some(line_end) = find_crlf(&input[pos..])? else {
                        return self.incomplete_line(&input[pos..], pos);
                    };
                    let line = &input[pos..pos + line_end];
                    let size_part = match line.iter().position(|&b| b == b';') {
                        Some(i) => &line[..i],
                        None => line,
                    };
                    let size = parse_hex(size_part).ok_or(ChunkError::Invalid)?;
                    pos += line_end + 2;
                    if size == 0 {
                        self.state = State::Trailer;
                    } else {
                        if self.decoded.saturating_add(size) > self.limit {
                            return Err(ChunkError::TooLarge);
                        }
                        self.state = State::Data(size);
                    }
                }
                State::Data(remaining) => {
                    let avail = (input.len() - pos) as u64;
                    if avail == 0 {
                        return Ok(pos);
                    }
                    let take = remaining.min(avail) as usize;
                    out.extend_from_slice(&input[pos..pos + take]);
                    pos += take;
                    self.decoded += take as u64;
                    let left = remaining - take as u64;
                    self.state = if left == 0 {
                        State::DataEnd
                    } else {
                        State::Data(left)
                    };
                }
                State::DataEnd => {
                    if input.len() - pos < 2 {
                        if input[pos..].iter().any(|&b| b != b'\r') {
                            return Err(ChunkError::Invalid);
                        }
                        return Ok(pos);
                    }
                    if &input[pos..pos + 2] != b"\r\n" {
                        return Err(ChunkError::Invalid);
                    }
                    pos += 2;
                    self.state = State::Size;
                }
                State::Trailer => {
                    let Some(line_end) = find_crlf(&input[pos..])? else {
                        return self.incomplete_line(&input[pos..], pos);
                    };
                    let line = &input[pos..pos + line_end];
                    if line.iter().any(|&b| b == b'\n' || b == b'\r') {
                        return Err(ChunkError::Invalid);
                    }
                    pos += line_end + 2;
                    if line_end == 0 {
                        self.state = State::Done;
                    }
                }
            }
        }
    }

    fn incomplete_line(&self, rest: &[u8], pos: usize) -> Result<usize, ChunkError> {
        if rest.len() > MAX_LINE {
            return Err(ChunkError::Invalid);
        }
        Ok(pos)
    }
}

/// The index of the CR of the first CRLF; `Ok(None)` when no line end has arrived yet; an LF
/// without its CR is malformed framing.
fn find_crlf(b: &[u8]) -> Result<Option<usize>, ChunkError> {
    match b.iter().position(|&c| c == b'\n') {
        None => Ok(None),
        Some(i) if i > 0 && b[i - 1] == b'\r' => Ok(Some(i - 1)),
        Some(_) => Err(ChunkError::Invalid),
    }
}

fn parse_hex(s: &[u8]) -> Option<u64> {
    // Tolerate whitespace before an extension (";"), per RFC 9112's BWS, but nothing else.
    let s = trim_trailing_ws(s);
    if s.is_empty() || s.len() > 16 {
        return None;
    }
    let mut v: u64 = 0;
    for &b in s {
        let d = (b as char).to_digit(16)? as u64;
        v = v.checked_mul(16)?.checked_add(d)?;
    }
    Some(v)
}

fn trim_trailing_ws(mut s: &[u8]) -> &[u8] {
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8]) -> Result<(Vec<u8>, usize), ChunkError> {
        let mut d = ChunkedDecoder::new(1 << 20);
        let mut out = Vec::new();
        let n = d.decode(input, &mut out)?;
        assert!(d.is_done(), "not done");
        Ok((out, n))
    }

    #[test]
    fn decodes_chunks_extensions_and_trailers() {
        let (out, n) =
            decode_all(b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\nNEXT").unwrap();
        assert_eq!(out, b"hello world");
        assert_eq!(n, 40);
    }

    #[test]
    fn byte_at_a_time_gives_same_result() {
        let input = b"3\r\nabc\r\n0\r\n\r\n";
        let mut d = ChunkedDecoder::new(100);
        let mut out = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        for &b in input {
            pending.push(b);
            let n = d.decode(&pending, &mut out).unwrap();
            pending.drain(..n);
        }
        assert!(d.is_done());
        assert_eq!(out, b"abc");
    }

    #[test]
    fn rejects_bad_framing_and_overflow() {
        let bad: [&[u8]; 5] = [
            b"zz\r\n",
            b"3\r\nabcX\r\n",
            b"ffffffffffffffffff\r\n",
            b"3\nabc\r\n",
            b"-1\r\n",
        ];
        for b in bad {
            let mut d = ChunkedDecoder::new(1 << 20);
            assert_eq!(
                d.decode(b, &mut Vec::new()),
                Err(ChunkError::Invalid),
                "{b:?}"
            );
        }
    }

    #[test]
    fn enforces_the_size_limit() {
        let mut d = ChunkedDecoder::new(4);
        assert_eq!(
            d.decode(b"5\r\nhello\r\n", &mut Vec::new()),
            Err(ChunkError::TooLarge)
        );
    }
}
