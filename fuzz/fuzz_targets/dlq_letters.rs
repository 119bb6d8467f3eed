#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| walden::fuzz::dlq_letters(data));
