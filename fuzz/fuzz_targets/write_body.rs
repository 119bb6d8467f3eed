#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| walden::fuzz::write_body(data));
