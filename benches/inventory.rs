//! Benchmarks: filled in by the inventory work.
fn main() {}
