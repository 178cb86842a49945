#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshpeer_fuzz::harness::request(data));
