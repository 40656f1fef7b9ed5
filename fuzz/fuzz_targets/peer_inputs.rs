//! Fuzzes what peers send outside HTTP heads and JSON-RPC: Redis replies and URLs, W3C trace
//! headers, and OAuth form bodies (the first byte picks which).
#![no_main]

#[allow(dead_code)]
mod checks {
    include!("../checks.rs");
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::peer_inputs(data));
