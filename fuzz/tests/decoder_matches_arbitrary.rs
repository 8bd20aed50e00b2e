//! `harness::ErrorCase::decode` (used by the replay test, which cannot use
//! the `arbitrary` crate) must decode every input exactly as the
//! `oidc_error_decode` fuzz target's `#[derive(Arbitrary)]` does, and
//! `ErrorCase::encode` (used to write seeds) must be its inverse.
//!
//! `cargo test --manifest-path fuzz/Cargo.toml` (no instrumentation needed).

#[path = "../harness.rs"]
mod harness;

use arbitrary::{Arbitrary, Unstructured};
use harness::ErrorCase;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    status: u16,
    error_type: Option<&'a str>,
    body: &'a [u8],
}

/// What libfuzzer-sys's `fuzz_target!(|input: Input|)` would run, or `None`
/// where it skips the input.
fn derived(data: &[u8]) -> Option<ErrorCase<'_>> {
    if data.len() < <Input<'_> as Arbitrary>::size_hint(0).0 {
        return None;
    }
    let input = Input::arbitrary_take_rest(Unstructured::new(data)).ok()?;
    Some(ErrorCase {
        status: input.status,
        error_type: input.error_type,
        body: input.body,
    })
}

/// xorshift64*: deterministic pseudo-random inputs without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[test]
fn min_len_is_the_size_hint() {
    assert_eq!(<Input<'_> as Arbitrary>::size_hint(0).0, ErrorCase::MIN_LEN);
}

#[test]
fn hand_decoder_matches_the_derive() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    // Lengths around every width switch of `arbitrary_byte_size`.
    let mut lengths: Vec<usize> = (0..300).collect();
    lengths.extend([
        255, 256, 257, 258, 259, 260, 511, 512, 1000, 4096, 65_535, 65_536, 65_537, 65_538, 65_539,
        65_540, 70_000,
    ]);
    for &len in &lengths {
        for round in 0..64 {
            let mut data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            if len > 2 {
                // Half of the cases take the `Some` branch.
                data[2] = (data[2] & !1) | (round & 1) as u8;
            }
            if round % 4 == 0 {
                // Mostly-ASCII bodies, so that long strings occur too.
                for b in data.iter_mut().skip(3) {
                    *b &= 0x7f;
                }
            }
            assert_eq!(
                ErrorCase::decode(&data),
                derived(&data),
                "len {len}, round {round}"
            );
            if len > 20_000 {
                break;
            }
        }
    }
}

#[test]
fn encode_is_the_inverse_of_decode() {
    let mut rng = Rng(42);
    let texts = [
        "",
        "x",
        "SlowDownException",
        "é€",
        &"a".repeat(255),
        &"b".repeat(256),
        &"c".repeat(70_000),
    ];
    let body_lengths = [0usize, 1, 100, 254, 255, 256, 257, 65_000, 65_535, 65_536];
    for text in texts {
        for &n in &body_lengths {
            let body: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            for error_type in [None, Some(text)] {
                let case = ErrorCase {
                    status: rng.next() as u16,
                    error_type,
                    body: &body,
                };
                let bytes = case.encode();
                assert_eq!(
                    ErrorCase::decode(&bytes).as_ref(),
                    Some(&case),
                    "text {} body {n}",
                    text.len()
                );
                assert_eq!(
                    derived(&bytes).as_ref(),
                    Some(&case),
                    "text {} body {n}",
                    text.len()
                );
            }
        }
    }
}

#[test]
fn seeds_decode_the_same_both_ways() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/oidc_error_decode");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("seed folder") {
        let data = std::fs::read(entry.expect("entry").path()).expect("seed");
        let case = ErrorCase::decode(&data).expect("seed is long enough");
        assert_eq!(Some(&case), derived(&data).as_ref());
        assert!(!case.body.is_empty());
        n += 1;
    }
    assert!(n > 0);
}
