//! libFuzzer target: see `usbroute::fuzzing::qmp_stream` for what it feeds and asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| usbroute::fuzzing::qmp_stream(data));
