#![no_main]
//! Fuzz target: see `ember_nbd::fuzzing::handshake_before_tls`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = ember_nbd::fuzzing::handshake_before_tls(data);
});
