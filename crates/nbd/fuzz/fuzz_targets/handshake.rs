#![no_main]
//! Fuzz target: see `ember_nbd::fuzzing::handshake`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| ember_nbd::fuzzing::handshake(data));
