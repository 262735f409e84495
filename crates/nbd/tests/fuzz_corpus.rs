//! Replays the committed cargo-fuzz corpus (`crates/nbd/fuzz/corpus/*`)
//! through the same entry points the fuzz targets use, on stable Rust. A
//! crash found by fuzzing is added to the corpus and stays tested here.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
    {
        let path = entry.expect("corpus entry").path();
        run(&std::fs::read(&path).expect("corpus file"));
        n += 1;
    }
    n
}

#[test]
fn handshake_corpus_replays_without_panics() {
    assert!(
        replay("handshake", ember_nbd::fuzzing::handshake) >= 20,
        "corpus too small"
    );
}

#[test]
fn request_header_corpus_replays_without_panics() {
    assert!(
        replay("request_header", ember_nbd::fuzzing::request_headers) >= 10,
        "corpus too small"
    );
}

#[test]
fn option_payload_corpus_replays_without_panics() {
    assert!(
        replay("option_payload", ember_nbd::fuzzing::option_payloads) >= 10,
        "corpus too small"
    );
}

#[test]
fn handshake_tls_corpus_replays_without_panics() {
    let replay_tls = |input: &[u8]| {
        let _ = ember_nbd::fuzzing::handshake_before_tls(input);
    };
    assert!(
        replay("handshake_tls", replay_tls) >= 10,
        "corpus too small"
    );
}
