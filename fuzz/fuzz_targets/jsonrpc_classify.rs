//! Fuzzes `Classifier::classify`: no panic, input untouched, agrees with serde_json.
#![no_main]

#[allow(dead_code)]
mod checks {
    include!("../checks.rs");
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::jsonrpc_classify(data));
