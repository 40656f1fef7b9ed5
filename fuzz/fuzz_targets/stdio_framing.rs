//! Fuzzes the stdio router: one line per message to the child, only hub-issued ids, no id of
//! one session reaching another.
#![no_main]

#[allow(dead_code)]
mod checks {
    include!("../checks.rs");
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::stdio_framing(data));
