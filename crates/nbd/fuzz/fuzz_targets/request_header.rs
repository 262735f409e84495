#![no_main]
//! Fuzz target: see `ember_nbd::fuzzing::request_headers`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| ember_nbd::fuzzing::request_headers(data));
