//! Fuzzes `parse_head`: no panic; a complete head keeps the limits and clean framing.
#![no_main]

#[allow(dead_code)]
mod checks {
    include!("../checks.rs");
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::http_head(data));
