//! Fuzzes `[[tool_rules]]`: the `path_under` normaliser and rule evaluation on the tape.
#![no_main]

#[allow(dead_code)]
mod checks {
    include!("../checks.rs");
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::tool_rules(data));
