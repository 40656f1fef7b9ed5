//! Fuzzes secret redaction of upstream messages: no panic, JSON stays JSON, nothing left.
#![no_main]

#[allow(dead_code)]
mod checks {
    include!("../checks.rs");
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::redaction(data));
