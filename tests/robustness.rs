//! Stable-Rust replay of the fuzz targets: every seed in `fuzz/corpus/<target>/`, then a fixed
//! number of deterministic mutations of them, through the same checks (`fuzz/checks.rs`).

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::path::Path;

mod checks {
    include!(concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/checks.rs"));
}

/// Mutations per target: keeps the whole file to a few seconds in a debug build. Set
/// `ROBUSTNESS_MUTATIONS` to run more (e.g. in release mode, where nightly fuzzing is not at hand).
fn mutations() -> usize {
    std::env::var("ROBUSTNESS_MUTATIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(3000)
}

/// xorshift64: deterministic, so a failure reproduces on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Byte strings that matter to the parsers under test, inserted whole.
const TOKENS: &[&[u8]] = &[
    b"\r\n",
    b"\n",
    b"\r",
    b"\r\n\r\n",
    b"\n\n",
    b"\"",
    b"\\",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b";",
    b" ",
    b"\t",
    b"\0",
    b"\xff",
    b"\xc3\xa9",
    b"${X}",
    b"ffffffffffffffff",
    b"0",
    b"-1",
    b"data: ",
    b"Transfer-Encoding: chunked\r\n",
    b"Content-Length: 7\r\n",
    b"\"name\":\"read_secret\"",
    b"{\"name\":\"delete\"}",
    b"\"id\":1",
    b"\\u0000",
    b".",
];

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 5, "{target}: too few seeds");
    seeds
}

/// One to four edits of a random seed: bit flip, byte or token insert, deletion, splice with
/// another seed, truncation, duplication of a slice.
fn mutate(rng: &mut Rng, seeds: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut v = seeds[rng.below(seeds.len())].1.clone();
    for _ in 0..=rng.below(4) {
        let len = v.len();
        match rng.below(7) {
            0 if len > 0 => v[rng.below(len)] ^= 1 << rng.below(8),
            1 => v.insert(rng.below(len + 1), rng.next() as u8),
            2 => {
                let at = rng.below(len + 1);
                v.splice(at..at, TOKENS[rng.below(TOKENS.len())].iter().copied());
            }
            3 if len > 0 => {
                let at = rng.below(len);
                v.drain(at..(at + 1 + rng.below(8)).min(len));
            }
            4 => {
                let other = &seeds[rng.below(seeds.len())].1;
                v.truncate(rng.below(len + 1));
                v.extend_from_slice(&other[rng.below(other.len() + 1)..]);
            }
            5 => v.truncate(rng.below(len + 1)),
            6 if len > 0 => {
                let start = rng.below(len);
                let end = start + 1 + rng.below(len - start);
                let copy = v[start..end].to_vec();
                let at = rng.below(len + 1);
                v.splice(at..at, copy);
            }
            _ => {}
        }
    }
    v
}

/// Runs `check` on every seed of `target` and on `mutations()` mutations of them; a failure
/// prints the input that caused it before failing the test.
fn replay(target: &str, check: fn(&[u8])) {
    let seeds = seeds(target);
    let mut rng = Rng(target.bytes().fold(0x9e37_79b9_7f4a_7c15, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    }));
    let inputs = seeds
        .iter()
        .map(|(name, s)| (format!("seed {name}"), s.clone()))
        .chain((0..mutations()).map(|i| (format!("mutation {i}"), mutate(&mut rng, &seeds))));
    for (what, input) in inputs {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| check(&input))) {
            eprintln!(
                "{target}: {what} broke a property; input: b\"{}\"",
                input.escape_ascii()
            );
            resume_unwind(panic);
        }
    }
}

#[test]
fn http_head_parser_never_panics_and_keeps_framing_invariants_on_mutated_input() {
    replay("http_head", checks::http_head);
}

#[test]
fn peer_inputs_resp_redis_urls_trace_headers_and_forms_never_panic_and_keep_their_rules() {
    replay("peer_inputs", checks::peer_inputs);
}

#[test]
fn chunked_decoder_never_panics_and_decodes_split_input_like_whole_input() {
    replay("chunked", checks::chunked);
}

#[test]
fn jsonrpc_classifier_never_panics_leaves_input_unchanged_and_agrees_with_serde_json() {
    replay("jsonrpc_classify", checks::jsonrpc_classify);
}

#[test]
fn sse_inputs_never_panic_never_leave_the_origin_and_decode_alike_however_split() {
    replay("sse_events", checks::sse_events);
}

#[test]
fn tools_list_filter_never_lets_a_denied_tool_through_json_or_sse() {
    replay("tools_list_filter", checks::tools_list_filter);
}

#[test]
fn redaction_never_panics_keeps_json_valid_and_leaves_nothing_to_redact() {
    replay("redaction", checks::redaction);
}

#[test]
fn config_parse_and_validate_never_panic_on_mutated_input() {
    replay("config", checks::config);
}

#[test]
fn tool_rules_never_panic_and_what_they_admit_stays_admitted_however_it_is_read() {
    replay("tool_rules", checks::tool_rules);
}

#[test]
fn session_ids_never_panic_on_decode_are_not_malleable_and_round_trip() {
    replay("session_id", checks::session_id);
}

#[test]
fn stdio_router_writes_one_line_per_message_and_keeps_every_id_to_its_session() {
    replay("stdio_framing", checks::stdio_framing);
}

#[test]
fn stdio_child_output_reads_as_the_same_lines_however_it_is_cut() {
    replay("stdio_output", checks::stdio_output_lines);
}
