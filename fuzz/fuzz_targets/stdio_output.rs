//! Fuzzes the readers of a stdio child's stdout and stderr: the same lines however the output is
//! cut, none holding a line break, stderr lines bounded with the rest counted.
#![no_main]

#[allow(dead_code)]
mod checks {
    include!("../checks.rs");
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::stdio_output_lines(data));
