//! libFuzzer target: see `usbroute::fuzzing::control_request` for what it feeds and asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| usbroute::fuzzing::control_request(data));
