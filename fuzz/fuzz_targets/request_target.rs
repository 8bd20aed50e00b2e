#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some(case) = harness::request_target(data) {
        harness::check_target(&case);
    }
});
