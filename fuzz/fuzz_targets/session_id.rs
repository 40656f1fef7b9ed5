//! Fuzzes `SessionCodec` (`binding\nid`): no panic, no malleable ids, round-trips.
#![no_main]

#[allow(dead_code)]
mod checks {
    include!("../checks.rs");
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::session_id(data));
