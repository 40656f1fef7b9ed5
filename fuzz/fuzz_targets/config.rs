//! Fuzzes `config::parse_str` then `config::validate`: neither ever panics.
#![no_main]

#[allow(dead_code)]
mod checks {
    include!("../checks.rs");
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::config(data));
