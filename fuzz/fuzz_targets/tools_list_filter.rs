//! Fuzzes `filter_json` and `SseFilter`: no denied tool ever gets through.
#![no_main]

#[allow(dead_code)]
mod checks {
    include!("../checks.rs");
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::tools_list_filter(data));
