//! Fuzzes the legacy SSE inputs: the endpoint rule (same origin only), session parameters, and
//! SSE decoding across reads.
#![no_main]

#[allow(dead_code)]
mod checks {
    include!("../checks.rs");
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::sse_events(data));
