//! Fuzzes `ChunkedDecoder`: no panic, the limit holds, and piecewise input decodes the same.
#![no_main]

#[allow(dead_code)]
mod checks {
    include!("../checks.rs");
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::chunked(data));
