//! libFuzzer target: see `usbroute::fuzzing::xen` for what it feeds and asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| usbroute::fuzzing::xen(data));
