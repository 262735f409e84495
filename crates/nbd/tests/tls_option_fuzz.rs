//! Fuzz-style checks of the FORCEDTLS option loop before STARTTLS: random
//! option sequences never panic, never reach an export and get nothing
//! but `ERR_TLS_REQD` (the assertions live in
//! `ember_nbd::fuzzing::handshake_before_tls`, shared with cargo-fuzz).

use ember_nbd::fuzzing::handshake_before_tls;
use proptest::prelude::*;

const IHAVEOPT: u64 = 0x4948_4156_454F_5054;

fn option(code: u32, data: &[u8]) -> Vec<u8> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&code.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn go(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

fn session(options: &[Vec<u8>]) -> Vec<u8> {
    let mut v = 3u32.to_be_bytes().to_vec(); // FIXED_NEWSTYLE | NO_ZEROES
    for o in options {
        v.extend_from_slice(o);
    }
    v
}

#[test]
fn every_export_option_before_starttls_is_refused_then_starttls_is_acked() {
    let input = session(&[
        option(7, &go("vol")), // GO
        option(6, &go("vol")), // INFO
        option(3, &[]),        // LIST
        option(8, &[]),        // STRUCTURED_REPLY
        option(11, &[]),       // EXTENDED_HEADERS
        option(5, b"junk"),    // STARTTLS with a payload: ERR_INVALID
        option(5, &[]),        // STARTTLS
        option(7, &go("vol")), // must not be read in plaintext
    ]);
    assert!(handshake_before_tls(&input), "STARTTLS acknowledged");
}

#[test]
fn export_name_before_tls_closes_without_an_answer() {
    let input = session(&[option(1, b"vol"), option(5, &[])]);
    assert!(
        !handshake_before_tls(&input),
        "the connection closed at EXPORT_NAME, STARTTLS never read"
    );
}

fn any_option() -> impl Strategy<Value = Vec<u8>> {
    let code = prop_oneof![
        Just(1u32),
        Just(2),
        Just(3),
        Just(5),
        Just(6),
        Just(7),
        Just(8),
        Just(9),
        Just(10),
        Just(11),
        any::<u32>(),
    ];
    (
        code,
        proptest::collection::vec(any::<u8>(), 0..64),
        any::<bool>(),
    )
        .prop_map(|(code, data, well_formed_go)| {
            if well_formed_go && matches!(code, 6 | 7) {
                option(code, &go("vol"))
            } else {
                option(code, &data)
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Random option sequences (with random truncation and junk) before
    /// STARTTLS never panic and never reach an export.
    #[test]
    fn random_option_sequences_never_reach_an_export_before_tls(
        options in proptest::collection::vec(any_option(), 0..12),
        cut in any::<prop::sample::Index>(),
        junk in proptest::collection::vec(any::<u8>(), 0..16),
    ) {
        let mut input = session(&options);
        input.truncate(cut.index(input.len() + 1).max(4));
        input.extend_from_slice(&junk);
        let _ = handshake_before_tls(&input);
    }
}
