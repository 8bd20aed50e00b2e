#![no_main]

#[path = "../harness.rs"]
mod harness;

use arbitrary::Arbitrary;

/// Same fields, same order as `harness::ErrorCase`, whose `decode` mirrors
/// this derive for the replay test.
#[derive(Arbitrary, Debug)]
struct Input<'a> {
    status: u16,
    error_type: Option<&'a str>,
    body: &'a [u8],
}

libfuzzer_sys::fuzz_target!(|input: Input<'_>| {
    harness::oidc_error_decode(&harness::ErrorCase {
        status: input.status,
        error_type: input.error_type,
        body: input.body,
    });
});
