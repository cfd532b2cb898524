//! libFuzzer target: see `usbroute::fuzzing::config` for what it feeds and asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| usbroute::fuzzing::config(data));
