//! libFuzzer target: see `usbroute::fuzzing::libvirt_rpc` for what it feeds and asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| usbroute::fuzzing::libvirt_rpc(data));
